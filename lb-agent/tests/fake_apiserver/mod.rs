//! A small fake Kubernetes API server for the agent's watch tests: plain HTTP/1.1 on a
//! listener the test binds (127.0.0.1 inside a network namespace), no TLS, no auth.
//!
//! It serves what a reflector needs, in the API server's wire format:
//!
//! - LIST `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`,
//!   `/api/v1/nodes`, `/api/v1/namespaces/NS/configmaps` (also namespaced forms of the
//!   others): a `...List` with `metadata.resourceVersion`, filtered by `fieldSelector`
//!   (`metadata.name`, `metadata.namespace`) and `labelSelector` (`key`, `!key`,
//!   `key=value`, `key!=value`);
//! - WATCH (`?watch=true&resourceVersion=RV`): `200`, then a chunked stream of
//!   newline-delimited `{"type":"ADDED"|"MODIFIED"|"DELETED"|"BOOKMARK","object":{...}}`:
//!   first every stored event after RV, then live ones as the test pushes them. A resource
//!   version older than the last [`FakeApiServer::compact`] gets the `ERROR` event with the
//!   `410 Expired` Status a real server sends, which makes a client re-list.
//!
//! It also takes the writes the IPAM controller makes, with the API server's semantics:
//!
//! - GET of one object (`.../NAME`): the object, or `404 NotFound`;
//! - POST to a collection: create (`201`), `409 AlreadyExists` if the name is taken;
//! - PUT of one object: replace (`200`), `404` if it does not exist, `409 Conflict` when the
//!   body's `metadata.resourceVersion` is not the stored one (optimistic concurrency, which the
//!   Lease election relies on);
//! - PATCH of one object or its `status` subresource with `application/merge-patch+json`
//!   (RFC 7386; `status` patches change only the status, others everything but the status),
//!   `415` for other patch types, `409` on a stale `metadata.resourceVersion`;
//! - resources: also `IPAddressPool` (`xdp-lb.io/v1alpha1`, cluster-scoped), `Lease`
//!   (`coordination.k8s.io/v1`) and `Event` (`events.k8s.io/v1`).
//!
//! Every write is a watch event like any change, and is recorded ([`FakeApiServer::writes`])
//! with the request's headers, so a test can tell which client wrote what.
//!
//! A test can also hold writes in flight: [`FakeApiServer::hold_writes`] makes the server
//! take matching requests but apply (and answer) them only after
//! [`FakeApiServer::release_held`], as a request delayed on the network or a writer paused
//! after sending would look.
//!
//! Every object change gets the next resource version, as etcd would hand out. The test can
//! cut every connection and refuse new ones ([`FakeApiServer::cut`]: the listener is closed,
//! so connects fail with ECONNREFUSED), and accept again on a fresh listener
//! ([`FakeApiServer::resume`]).
//!
//! Plain threads and blocking sockets: one thread accepts, one serves each connection.

// Each test crate uses a different part of it.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, ErrorKind, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use serde_json::{Value, json};

/// How often the accept loop looks at its stop flag, and idle watch streams at theirs.
const POLL: Duration = Duration::from_millis(20);

/// The resources the agent watches and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
    ConfigMap,
    IpAddressPool,
    Lease,
    Event,
}

impl Kind {
    const ALL: [Kind; 7] = [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Node,
        Kind::ConfigMap,
        Kind::IpAddressPool,
        Kind::Lease,
        Kind::Event,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Node => "Node",
            Kind::ConfigMap => "ConfigMap",
            Kind::IpAddressPool => "IPAddressPool",
            Kind::Lease => "Lease",
            Kind::Event => "Event",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            Kind::IpAddressPool => "xdp-lb.io/v1alpha1",
            Kind::Lease => "coordination.k8s.io/v1",
            Kind::Event => "events.k8s.io/v1",
            _ => "v1",
        }
    }

    /// The plural in URLs.
    fn plural(self) -> &'static str {
        match self {
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices",
            Kind::Node => "nodes",
            Kind::ConfigMap => "configmaps",
            Kind::IpAddressPool => "ipaddresspools",
            Kind::Lease => "leases",
            Kind::Event => "events",
        }
    }

    fn namespaced(self) -> bool {
        !matches!(self, Kind::Node | Kind::IpAddressPool)
    }

    /// `/api/v1` or `/apis/discovery.k8s.io/v1`.
    fn prefix(self) -> String {
        match self.api_version() {
            "v1" => "/api/v1".to_string(),
            group => format!("/apis/{group}"),
        }
    }
}

/// A write the server accepted or refused.
#[derive(Clone, Debug)]
pub struct Write {
    /// `POST`, `PUT` or `PATCH`.
    pub method: String,
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    /// `Some("status")` for the status subresource.
    pub subresource: Option<String>,
    /// Request headers, names in lower case.
    pub headers: BTreeMap<String, String>,
    pub body: Value,
    /// The HTTP status of the answer.
    pub code: u16,
}

impl Write {
    /// A request header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// One stored watch event.
#[derive(Clone, Debug)]
struct Event {
    rv: u64,
    kind: &'static str,
    object: Value,
}

#[derive(Debug, Default)]
struct Collection {
    /// (namespace, name) → object, as a LIST item (no `kind`/`apiVersion`).
    objects: BTreeMap<(String, String), Value>,
    /// Every change, in order; BOOKMARKs too (they are never replayed).
    events: Vec<Event>,
    /// Watches from a resource version older than this get 410 Expired.
    compacted: u64,
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    collections: BTreeMap<Kind, Collection>,
    /// Open connections (a clone of each socket, to cut them), by id.
    conns: BTreeMap<u64, TcpStream>,
    next_conn: u64,
    /// Bumped by every cut: streams of an older epoch end.
    epoch: u64,
    /// Live WATCH streams per kind.
    watches: BTreeMap<Kind, usize>,
    /// Request lines, in arrival order.
    requests: Vec<String>,
    /// Writes, in arrival order.
    writes: Vec<Write>,
    /// For `metadata.uid` of created objects.
    next_uid: u64,
    /// Writes matching this wait before they are applied.
    hold: Option<Hold>,
    /// How many writes wait now.
    held: usize,
}

/// Which writes [`FakeApiServer::hold_writes`] holds.
#[derive(Clone, Debug)]
struct Hold {
    kind: Kind,
    /// Header name (lower case) and value the request must carry.
    header: (String, String),
}

impl State {
    /// Store `object` (create or replace) with the next resource version and tell the
    /// watches; returns the stored object.
    fn put(&mut self, kind: Kind, mut object: Value) -> Value {
        self.rv += 1;
        let rv = self.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key_of(&object);
        let coll = self.collections.get_mut(&kind).expect("collection");
        let event_kind = if coll.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        coll.objects.insert(key, object.clone());
        coll.events.push(Event {
            rv,
            kind: event_kind,
            object: object.clone(),
        });
        object
    }
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Signalled on every new event and every cut.
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

struct Acceptor {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// The running server; dropping it closes the listener and every connection.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Mutex<Option<Acceptor>>,
}

impl FakeApiServer {
    /// Serve the objects of these `...List` files (as returned by LIST) on `listener`.
    pub fn start(listener: TcpListener, lists: &[(Kind, &Path)]) -> FakeApiServer {
        let addr = listener.local_addr().expect("listener address");
        let shared = Arc::new(Shared::default());
        {
            let mut st = shared.lock();
            for kind in Kind::ALL {
                st.collections.insert(kind, Collection::default());
            }
            for (kind, path) in lists {
                let text = fs::read_to_string(path)
                    .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
                let list: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
                assert_eq!(
                    list["kind"],
                    format!("{}List", kind.name()),
                    "{}",
                    path.display()
                );
                let list_rv = parse_rv(&list["metadata"]["resourceVersion"]);
                st.rv = st.rv.max(list_rv);
                for item in list["items"].as_array().expect("items") {
                    st.rv = st.rv.max(parse_rv(&item["metadata"]["resourceVersion"]));
                    let key = key_of(item);
                    let coll = st.collections.get_mut(kind).expect("collection");
                    coll.objects.insert(key, item.clone());
                }
            }
        }
        let server = FakeApiServer {
            shared,
            addr,
            acceptor: Mutex::new(None),
        };
        server.resume(listener);
        server
    }

    /// `http://ADDR`, for a kubeconfig.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Write `DIR/kubeconfig` for this server, its context in `namespace`, without
    /// credentials (the fake server wants none); returns its path.
    pub fn write_kubeconfig(&self, dir: &Path, namespace: &str) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.url()
        );
        fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The stored object, as a LIST would return it.
    pub fn get(&self, kind: Kind, namespace: &str, name: &str) -> Option<Value> {
        let st = self.shared.lock();
        st.collections[&kind]
            .objects
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// Create or replace an object (ADDED or MODIFIED); returns its new resource version.
    pub fn apply(&self, kind: Kind, object: Value) -> u64 {
        let mut st = self.shared.lock();
        st.put(kind, object);
        let rv = st.rv;
        drop(st);
        self.shared.changed.notify_all();
        rv
    }

    /// Every stored object of `kind`, as a LIST would return them.
    pub fn list(&self, kind: Kind) -> Vec<Value> {
        let st = self.shared.lock();
        st.collections[&kind].objects.values().cloned().collect()
    }

    /// Every write so far, in arrival order.
    pub fn writes(&self) -> Vec<Write> {
        self.shared.lock().writes.clone()
    }

    /// Delete an object (DELETED carries its last state with a new resource version).
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) -> u64 {
        let mut st = self.shared.lock();
        st.rv += 1;
        let rv = st.rv;
        let coll = st.collections.get_mut(&kind).expect("collection");
        let mut object = coll
            .objects
            .remove(&(namespace.to_string(), name.to_string()))
            .unwrap_or_else(|| panic!("no {} {namespace}/{name} to delete", kind.name()));
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        coll.events.push(Event {
            rv,
            kind: "DELETED",
            object,
        });
        drop(st);
        self.shared.changed.notify_all();
        rv
    }

    /// Send a BOOKMARK with the current resource version on the live watches of `kind`.
    pub fn bookmark(&self, kind: Kind) {
        let mut st = self.shared.lock();
        let rv = st.rv;
        let object = json!({"metadata": {"resourceVersion": rv.to_string()}});
        let coll = st.collections.get_mut(&kind).expect("collection");
        coll.events.push(Event {
            rv,
            kind: "BOOKMARK",
            object,
        });
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Forget the history: a watch from any resource version before now gets 410 Expired.
    pub fn compact(&self) {
        let mut st = self.shared.lock();
        let rv = st.rv;
        for coll in st.collections.values_mut() {
            coll.compacted = rv;
        }
    }

    /// The API server goes away: close the listener (new connections are refused) and every
    /// open connection, watches included.
    pub fn cut(&self) {
        if let Some(acceptor) = self.acceptor_slot().take() {
            acceptor.stop.store(true, Ordering::SeqCst);
            let _ = acceptor.thread.join();
        }
        self.close_connections();
    }

    /// Close every open connection but keep accepting.
    pub fn close_connections(&self) {
        let mut st = self.shared.lock();
        st.epoch += 1;
        for conn in st.conns.values() {
            let _ = conn.shutdown(Shutdown::Both);
        }
        drop(st);
        self.shared.changed.notify_all();
    }

    /// Accept again, on `listener` (bound to the same address by the caller).
    pub fn resume(&self, listener: TcpListener) {
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let shared = self.shared.clone();
        let flag = stop.clone();
        let thread = thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || accept_loop(&listener, &shared, &flag))
            .expect("spawning the accept thread");
        let old = self.acceptor_slot().replace(Acceptor { stop, thread });
        assert!(old.is_none(), "resume without cut");
    }

    /// Hold every write of `kind` whose request carries `header: value`: it is read but
    /// applied and answered only after [`FakeApiServer::release_held`].
    pub fn hold_writes(&self, kind: Kind, header: &str, value: &str) {
        self.shared.lock().hold = Some(Hold {
            kind,
            header: (header.to_ascii_lowercase(), value.to_string()),
        });
    }

    /// Wait (at most `limit`) until a write is held; whether one is.
    pub fn wait_held(&self, limit: Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        let mut st = self.shared.lock();
        while st.held == 0 {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, left.min(POLL))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Stop holding: the held writes are applied, in arrival order as far as the threads go.
    pub fn release_held(&self) {
        self.shared.lock().hold = None;
        self.shared.changed.notify_all();
    }

    /// Every request line so far (`GET /api/v1/services?...`).
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// Live WATCH streams of `kind`.
    pub fn watches(&self, kind: Kind) -> usize {
        self.shared.lock().watches.get(&kind).copied().unwrap_or(0)
    }

    fn acceptor_slot(&self) -> MutexGuard<'_, Option<Acceptor>> {
        self.acceptor.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.cut();
    }
}

fn parse_rv(v: &Value) -> u64 {
    v.as_str().and_then(|s| s.parse().ok()).unwrap_or(0)
}

fn key_of(object: &Value) -> (String, String) {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_string(),
        meta["name"].as_str().expect("metadata.name").to_string(),
    )
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let shared = shared.clone();
                let spawned = thread::Builder::new()
                    .name("fake-apiserver-conn".into())
                    .spawn(move || serve_connection(&shared, stream));
                if let Err(e) = spawned {
                    eprintln!("fake apiserver: spawning a connection thread: {e}");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(POLL),
            Err(e) => {
                eprintln!("fake apiserver: accept: {e}");
                thread::sleep(POLL);
            }
        }
    }
}

/// One HTTP/1.1 request: method, path, query parameters (decoded), headers, body.
struct Request {
    line: String,
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    /// Names in lower case.
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

fn serve_connection(shared: &Shared, stream: TcpStream) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_nodelay(true);
    let (Ok(registered), Ok(read_half)) = (stream.try_clone(), stream.try_clone()) else {
        return;
    };
    let (id, epoch) = {
        let mut st = shared.lock();
        let id = st.next_conn;
        st.next_conn += 1;
        st.conns.insert(id, registered);
        (id, st.epoch)
    };
    let mut reader = BufReader::new(read_half);
    let mut out = stream;
    // Keep-alive: requests follow each other until the client closes or a WATCH takes over.
    while let Some(req) = read_request(&mut reader) {
        shared.lock().requests.push(req.line.clone());
        let Some(target) = route(&req.path) else {
            let status = status_json(
                404,
                "NotFound",
                &format!(
                    "the server could not find the requested resource ({})",
                    req.path
                ),
            );
            if respond_json(&mut out, 404, &status).is_err() {
                break;
            }
            continue;
        };
        let (code, body) = match (req.method.as_str(), &target.name) {
            ("GET", None) => {
                let filter = Filter::new(target.namespace.clone(), &req.query);
                if req
                    .query
                    .get("watch")
                    .is_some_and(|w| w == "true" || w == "1")
                {
                    let from = req
                        .query
                        .get("resourceVersion")
                        .and_then(|s| s.parse::<u64>().ok())
                        .unwrap_or(0);
                    serve_watch(shared, &mut out, target.kind, &filter, from, epoch);
                    break;
                }
                (200, list_json(shared, target.kind, &filter))
            }
            ("GET", Some(name)) => get_one(shared, &target, name),
            ("POST", None) | ("PUT" | "PATCH", Some(_)) => {
                wait_while_held(shared, &target, &req);
                let answer = write(shared, &target, &req);
                shared.changed.notify_all();
                answer
            }
            (method, _) => (
                405,
                status_json(
                    405,
                    "MethodNotAllowed",
                    &format!("{method} is not supported on {}", req.path),
                ),
            ),
        };
        if respond_json(&mut out, code, &body).is_err() {
            break;
        }
    }
    let _ = out.shutdown(Shutdown::Both);
    shared.lock().conns.remove(&id);
}

/// Block while a [`Hold`] matches this write.
fn wait_while_held(shared: &Shared, target: &Target, req: &Request) {
    let matches = |hold: &Option<Hold>| {
        hold.as_ref().is_some_and(|h| {
            h.kind == target.kind && req.headers.get(&h.header.0) == Some(&h.header.1)
        })
    };
    let mut st = shared.lock();
    if !matches(&st.hold) {
        return;
    }
    st.held += 1;
    shared.changed.notify_all();
    while matches(&st.hold) {
        st = shared
            .changed
            .wait_timeout(st, POLL)
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
    st.held -= 1;
}

/// Reads a request line, headers and body (by Content-Length or chunked); `None` at EOF or
/// on a malformed request.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let line = line.trim_end().to_string();
    let mut headers = BTreeMap::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 {
            return None;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    let body = if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.eq_ignore_ascii_case("chunked"))
    {
        read_chunked(reader)?
    } else {
        let len: usize = match headers.get("content-length") {
            Some(v) => v.parse().ok()?,
            None => 0,
        };
        let mut body = vec![0u8; len];
        std::io::Read::read_exact(reader, &mut body).ok()?;
        body
    };
    let mut words = line.split_whitespace();
    let method = words.next()?.to_string();
    let target = words.next()?.to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Some(Request {
        line,
        method,
        path: path.to_string(),
        query,
        headers,
        body,
    })
}

fn read_chunked(reader: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size).ok()?;
        let size = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
        let mut chunk = vec![0u8; size + 2];
        std::io::Read::read_exact(reader, &mut chunk).ok()?;
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(&chunk[..size]);
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What a URL names: a collection (all namespaces, or one) or one object, maybe a
/// subresource of it.
struct Target {
    kind: Kind,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

/// `/api/v1/services`, `/api/v1/namespaces/NS/configmaps`,
/// `/api/v1/namespaces/NS/services/NAME/status`, `/apis/xdp-lb.io/v1alpha1/ipaddresspools/NAME`.
fn route(path: &str) -> Option<Target> {
    for kind in Kind::ALL {
        let Some(rest) = path.strip_prefix(&kind.prefix()) else {
            continue;
        };
        let (namespace, rest) = match rest.strip_prefix("/namespaces/") {
            Some(ns_rest) if kind.namespaced() => {
                let (ns, rest) = ns_rest.split_once('/')?;
                (Some(ns.to_string()), rest)
            }
            Some(_) => continue,
            None => match rest.strip_prefix('/') {
                Some(rest) => (None, rest),
                None => continue,
            },
        };
        let mut parts = rest.split('/');
        if parts.next() != Some(kind.plural()) {
            continue;
        }
        let name = parts.next().map(str::to_string);
        let subresource = parts.next().map(str::to_string);
        if parts.next().is_some() || (name.is_some() && kind.namespaced() && namespace.is_none()) {
            return None;
        }
        return Some(Target {
            kind,
            namespace,
            name,
            subresource,
        });
    }
    None
}

/// The object as a GET returns it.
fn with_type(kind: Kind, mut object: Value) -> Value {
    object["kind"] = json!(kind.name());
    object["apiVersion"] = json!(kind.api_version());
    object
}

fn not_found(kind: Kind, name: &str) -> (u16, Value) {
    (
        404,
        status_json(
            404,
            "NotFound",
            &format!("{} \"{name}\" not found", kind.plural()),
        ),
    )
}

fn get_one(shared: &Shared, target: &Target, name: &str) -> (u16, Value) {
    let st = shared.lock();
    let key = (
        target.namespace.clone().unwrap_or_default(),
        name.to_string(),
    );
    match st.collections[&target.kind].objects.get(&key) {
        Some(object) => (200, with_type(target.kind, object.clone())),
        None => not_found(target.kind, name),
    }
}

/// POST, PUT or PATCH, recorded in `writes`.
fn write(shared: &Shared, target: &Target, req: &Request) -> (u16, Value) {
    let body: Value = match serde_json::from_slice(&req.body) {
        Ok(v) => v,
        Err(e) => {
            return (
                400,
                status_json(400, "BadRequest", &format!("body is not JSON: {e}")),
            );
        }
    };
    let mut st = shared.lock();
    let namespace = target.namespace.clone().unwrap_or_default();
    let name = target
        .name
        .clone()
        .or_else(|| body["metadata"]["name"].as_str().map(str::to_string))
        .unwrap_or_default();
    let (code, answer) = apply_write(&mut st, target, req, &namespace, &name, &body);
    st.writes.push(Write {
        method: req.method.clone(),
        kind: target.kind,
        namespace,
        name,
        subresource: target.subresource.clone(),
        headers: req.headers.clone(),
        body,
        code,
    });
    (code, answer)
}

fn apply_write(
    st: &mut State,
    target: &Target,
    req: &Request,
    namespace: &str,
    name: &str,
    body: &Value,
) -> (u16, Value) {
    let kind = target.kind;
    let key = (namespace.to_string(), name.to_string());
    let stored = st.collections[&kind].objects.get(&key).cloned();
    let conflict = || {
        (
            409,
            status_json(
                409,
                "Conflict",
                &format!(
                    "Operation cannot be fulfilled on {} \"{name}\": the object has been \
                     modified; please apply your changes to the latest version and try again",
                    kind.plural()
                ),
            ),
        )
    };
    let stale = |stored: &Value| {
        body["metadata"]["resourceVersion"]
            .as_str()
            .is_some_and(|rv| Some(rv) != stored["metadata"]["resourceVersion"].as_str())
    };
    match req.method.as_str() {
        "POST" => {
            if name.is_empty() {
                return (
                    422,
                    status_json(422, "Invalid", "metadata.name: Required value"),
                );
            }
            if stored.is_some() {
                return (
                    409,
                    status_json(
                        409,
                        "AlreadyExists",
                        &format!("{} \"{name}\" already exists", kind.plural()),
                    ),
                );
            }
            let mut object = body.clone();
            if let Some(o) = object.as_object_mut() {
                o.remove("kind");
                o.remove("apiVersion");
            }
            st.next_uid += 1;
            let meta = &mut object["metadata"];
            meta["name"] = json!(name);
            if kind.namespaced() {
                meta["namespace"] = json!(namespace);
            }
            meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012}", st.next_uid));
            meta["creationTimestamp"] = json!(now_rfc3339());
            (201, with_type(kind, st.put(kind, object)))
        }
        "PUT" => {
            let Some(stored) = stored else {
                return not_found(kind, name);
            };
            if stale(&stored) {
                return conflict();
            }
            let mut object = body.clone();
            if let Some(o) = object.as_object_mut() {
                o.remove("kind");
                o.remove("apiVersion");
            }
            for field in ["uid", "creationTimestamp", "namespace", "name"] {
                object["metadata"][field] = stored["metadata"][field].clone();
            }
            (200, with_type(kind, st.put(kind, object)))
        }
        "PATCH" => {
            let content_type = req.headers.get("content-type").map(String::as_str);
            if content_type != Some("application/merge-patch+json") {
                return (
                    415,
                    status_json(
                        415,
                        "UnsupportedMediaType",
                        &format!("only merge patches are served here, not {content_type:?}"),
                    ),
                );
            }
            let Some(mut object) = stored else {
                return not_found(kind, name);
            };
            if stale(&object) {
                return conflict();
            }
            match target.subresource.as_deref() {
                Some("status") => merge(&mut object["status"], &body["status"]),
                None => {
                    let mut patch = body.clone();
                    if let Some(o) = patch.as_object_mut() {
                        o.remove("status");
                    }
                    merge(&mut object, &patch);
                }
                Some(other) => {
                    return (
                        404,
                        status_json(404, "NotFound", &format!("no subresource {other}")),
                    );
                }
            }
            (200, with_type(kind, st.put(kind, object)))
        }
        _ => unreachable!("routed writes only"),
    }
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` removes, anything else
/// replaces (lists as a whole).
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let target = target.as_object_mut().expect("object");
    for (k, v) in patch {
        if v.is_null() {
            target.remove(k);
        } else {
            merge(target.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// The current time as the API server writes timestamps (RFC 3339, seconds).
fn now_rfc3339() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(now.as_second())
        .expect("valid time")
        .to_string()
}

/// Which objects a request sees: namespace, field and label selectors.
struct Filter {
    namespace: Option<String>,
    /// (field path, value, equal?)
    fields: Vec<(String, String, bool)>,
    /// (key, Some(value) or None for existence, equal?)
    labels: Vec<(String, Option<String>, bool)>,
}

impl Filter {
    fn new(namespace: Option<String>, query: &BTreeMap<String, String>) -> Filter {
        let fields = query
            .get("fieldSelector")
            .map(|s| {
                s.split(',')
                    .filter(|t| !t.is_empty())
                    .map(|t| match t.split_once("!=") {
                        Some((k, v)) => (k.to_string(), v.to_string(), false),
                        None => {
                            let (k, v) = t.split_once('=').expect("field selector term");
                            (k.to_string(), v.trim_start_matches('=').to_string(), true)
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let labels = query
            .get("labelSelector")
            .map(|s| {
                s.split(',')
                    .filter(|t| !t.is_empty())
                    .map(|t| {
                        if let Some((k, v)) = t.split_once("!=") {
                            (k.to_string(), Some(v.to_string()), false)
                        } else if let Some((k, v)) = t.split_once('=') {
                            (
                                k.to_string(),
                                Some(v.trim_start_matches('=').to_string()),
                                true,
                            )
                        } else if let Some(k) = t.strip_prefix('!') {
                            (k.to_string(), None, false)
                        } else {
                            (t.to_string(), None, true)
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        Filter {
            namespace,
            fields,
            labels,
        }
    }

    fn matches(&self, object: &Value) -> bool {
        let meta = &object["metadata"];
        if let Some(ns) = &self.namespace
            && meta["namespace"].as_str() != Some(ns.as_str())
        {
            return false;
        }
        let fields_ok = self.fields.iter().all(|(path, value, eq)| {
            let got = match path.as_str() {
                "metadata.name" => meta["name"].as_str(),
                "metadata.namespace" => meta["namespace"].as_str(),
                other => panic!("fake apiserver: unsupported field selector {other}"),
            };
            (got == Some(value.as_str())) == *eq
        });
        let labels_ok = self.labels.iter().all(|(key, value, eq)| {
            let got = meta["labels"][key.as_str()].as_str();
            let hit = match value {
                None => got.is_some(),
                Some(v) => got == Some(v.as_str()),
            };
            hit == *eq
        });
        fields_ok && labels_ok
    }
}

fn list_json(shared: &Shared, kind: Kind, filter: &Filter) -> Value {
    let st = shared.lock();
    let items: Vec<Value> = st.collections[&kind]
        .objects
        .values()
        .filter(|o| filter.matches(o))
        .cloned()
        .collect();
    json!({
        "kind": format!("{}List", kind.name()),
        "apiVersion": kind.api_version(),
        "metadata": {"resourceVersion": st.rv.to_string()},
        "items": items,
    })
}

fn status_json(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

fn respond_json(out: &mut TcpStream, code: u16, body: &Value) -> std::io::Result<()> {
    let body = serde_json::to_vec(body).expect("JSON");
    let reason = match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        _ => "Error",
    };
    let mut msg = format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    msg.extend_from_slice(&body);
    out.write_all(&msg)
}

fn write_chunk(out: &mut TcpStream, line: &Value) -> std::io::Result<()> {
    let mut data = serde_json::to_vec(line).expect("JSON");
    data.push(b'\n');
    let mut msg = format!("{:x}\r\n", data.len()).into_bytes();
    msg.extend_from_slice(&data);
    msg.extend_from_slice(b"\r\n");
    out.write_all(&msg)
}

/// A watch event on the wire: the object with its `kind` and `apiVersion`.
fn event_json(kind: Kind, event: &Event) -> Value {
    json!({"type": event.kind, "object": with_type(kind, event.object.clone())})
}

/// Index of the first event pushed after now.
fn cursor_live(shared: &Shared, kind: Kind) -> usize {
    shared.lock().collections[&kind].events.len()
}

fn serve_watch(
    shared: &Shared,
    out: &mut TcpStream,
    kind: Kind,
    filter: &Filter,
    from: u64,
    epoch: u64,
) {
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if out.write_all(head.as_bytes()).is_err() {
        return;
    }
    let (expired, mut cursor) = {
        let st = shared.lock();
        let coll = &st.collections[&kind];
        let start = coll.events.partition_point(|e| e.rv <= from);
        (from < coll.compacted, start)
    };
    if expired {
        let status = status_json(
            410,
            "Expired",
            &format!(
                "too old resource version: {from} ({})",
                shared.lock().collections[&kind].compacted
            ),
        );
        let _ = write_chunk(out, &json!({"type": "ERROR", "object": status}));
        let _ = out.write_all(b"0\r\n\r\n");
        return;
    }
    *shared.lock().watches.entry(kind).or_default() += 1;
    // Replay what happened after `from` (bookmarks are not replayed), then follow live.
    let live_from = cursor_live(shared, kind);
    loop {
        let (first, batch): (usize, Vec<Event>) = {
            let mut st = shared.lock();
            while st.epoch == epoch && st.collections[&kind].events.len() <= cursor {
                st = shared
                    .changed
                    .wait_timeout(st, POLL)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            if st.epoch != epoch {
                break;
            }
            let events = &st.collections[&kind].events;
            let batch = (cursor, events[cursor..].to_vec());
            cursor = events.len();
            batch
        };
        let sent = batch.iter().enumerate().try_for_each(|(i, event)| {
            let wanted = if event.kind == "BOOKMARK" {
                first + i >= live_from
            } else {
                filter.matches(&event.object)
            };
            if wanted {
                write_chunk(out, &event_json(kind, event))
            } else {
                Ok(())
            }
        });
        if sent.is_err() {
            break;
        }
    }
    *shared.lock().watches.entry(kind).or_default() -= 1;
}
