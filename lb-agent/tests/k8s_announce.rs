//! L2 announcement in Kubernetes mode, end to end: three agents (`run --kubernetes
//! --ipam=false`) on the three nodes of an [`L2Lab`] read one fake API server
//! (`fake_apiserver`) that holds their ConfigMap (`announce: l2`), the Nodes `lb1`..`lb3`
//! (Ready, InternalIP = the node's address on the bridge), a Service of type LoadBalancer with
//! `status.loadBalancer.ingress` 198.18.0.100 and its EndpointSlice (the lab's backends). The
//! client finds the VIP by ARP alone, so whoever answers gets the traffic.
//!
//! One test walks through what the cluster can do to ownership, checking each time who
//! answers ARP (exactly one node, the one the agents' rendezvous hash picks among the
//! eligible live nodes), the `Announced` Event the new owner publishes on the Service, and
//! that established TCP connections keep their backend:
//!
//! 1. start: one owner, reachable, its Event;
//! 2. the owner is cordoned: the VIP moves to another node;
//! 3. an IPAddressPool holding the VIP limits it to Nodes labelled `edge=true`, one node
//!    carries the label: it becomes the owner;
//! 4. that node dies (agent SIGKILLed, link down): no other node is eligible, so nobody
//!    answers; the pool's selector removed, the last live, uncordoned node takes the VIP.
//!
//! The fake API server listens on the client's address, which every node reaches over the
//! bridge (and which a node whose link is down cannot reach, as a real one could not).
//! Needs root.

mod fake_apiserver;

use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use fake_apiserver::{FakeApiServer, Kind};
use lb_agent::announce::owner;
use lb_testkit::{
    L2Lab, L2LabSpec, L2Node, NetNs, TcpSession, require_root, scenario::DirGuard, scrape,
};
use serde_json::{Value, json};

/// The agents' namespace and ConfigMap.
const NAMESPACE: &str = "xdp-lb";
const CONFIG_MAP: &str = "xdp-lb-config";
/// The Service (namespace, name, uid) and its EndpointSlice.
const SERVICE: (&str, &str) = ("demo", "web");
const SERVICE_UID: &str = "5b0f3c1e-8a47-4d6b-9e21-7f3a2c9d4e10";
const SLICE: &str = "web-9t4xq";
/// The pool holding the VIP, and the label its node selector asks for.
const POOL: &str = "edge";
const EDGE: (&str, &str) = ("edge", "true");
/// Long-lived connections kept across every ownership change.
const SESSIONS: usize = 10;
/// Request timeout on every connection.
const TIMEOUT: Duration = Duration::from_secs(2);
/// How long the agents may take to agree on the first owner.
const SETTLE_LIMIT: Duration = Duration::from_secs(20);
/// How long the first owner must stay the same to count (the agents start one by one).
const SETTLE_STABLE: Duration = Duration::from_secs(3);
/// The longest one ownership change may take, from the API change, until the new owner
/// answers alone, is in the client's neighbour entry and has published its Event.
const MOVE_LIMIT: Duration = Duration::from_secs(10);
/// How long the new owner must then keep answering alone.
const MOVE_STABLE: Duration = Duration::from_millis(1500);
/// How long nobody may answer when no eligible node is alive (several `dead_after`s).
const SILENCE: Duration = Duration::from_secs(4);
/// How long one round of ARP polling listens for answers (they come within a millisecond).
const ROUND: Duration = Duration::from_millis(100);

fn spec() -> L2LabSpec {
    L2LabSpec::new(env!("CARGO_BIN_EXE_lb-agent"))
}

/// A directory for the kubeconfig, removed on drop.
struct Work(DirGuard);

impl Work {
    fn new() -> Work {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lbt-k8s-announce-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        Work(DirGuard(dir))
    }

    /// A kubeconfig for `server`, without credentials (the fake server wants none).
    fn kubeconfig(&self, server: &FakeApiServer) -> PathBuf {
        server.write_kubeconfig(&self.0.0, NAMESPACE)
    }
}

/// The fake API server on the client's address (port 0: any free one), empty.
fn start_server(client: &NetNs, addr: IpAddr) -> FakeApiServer {
    let bind = SocketAddr::new(addr, 0);
    let listener = client
        .enter(move || TcpListener::bind(bind))
        .unwrap()
        .unwrap_or_else(|e| panic!("binding {bind} in {}: {e}", client.name()));
    FakeApiServer::start(listener, &[])
}

/// The agents' ConfigMap: the lab's interface, L2 announcement, its heartbeat settings.
fn config_map(spec: &L2LabSpec) -> Value {
    let m = spec.membership;
    json!({
        "metadata": {
            "name": CONFIG_MAP,
            "namespace": NAMESPACE,
            "uid": "0e6f1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b",
            "creationTimestamp": "2025-05-03T12:00:00Z"
        },
        "data": {
            "config.yaml": format!(
                "interface: eth0\nannounce: l2\nmembership: {{port: {}, interval_ms: {}, dead_after_ms: {}}}\n",
                m.port, m.interval_ms, m.dead_after_ms
            )
        }
    })
}

/// The Node of an LB node: Ready, its bridge address as InternalIP.
fn node_object(i: usize, node: &L2Node) -> Value {
    json!({
        "metadata": {
            "name": node.name,
            "uid": format!("6a1d2c3b-4e5f-4a6b-8c7d-00000000000{}", i + 1),
            "creationTimestamp": "2025-05-03T11:00:00Z",
            "labels": {
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": node.name,
                "kubernetes.io/os": "linux"
            }
        },
        "spec": {"podCIDR": format!("198.19.{}.0/24", i + 1)},
        "status": {
            "conditions": [
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory"},
                {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "kubelet is posting ready status",
                 "lastHeartbeatTime": "2025-05-03T12:00:00Z",
                 "lastTransitionTime": "2025-05-03T11:00:00Z"}
            ],
            "addresses": [
                {"type": "InternalIP", "address": node.addr.to_string()},
                {"type": "Hostname", "address": node.name}
            ]
        }
    })
}

/// The Service: type LoadBalancer, no class (ours), port 80/TCP, the VIP in its status.
fn service(vip: IpAddr) -> Value {
    json!({
        "metadata": {
            "name": SERVICE.1,
            "namespace": SERVICE.0,
            "uid": SERVICE_UID,
            "creationTimestamp": "2025-05-03T12:10:00Z",
            "labels": {"app.kubernetes.io/name": "web"}
        },
        "spec": {
            "type": "LoadBalancer",
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 80, "nodePort": 30080}],
            "selector": {"app.kubernetes.io/name": "web"},
            "clusterIP": "198.19.100.80",
            "clusterIPs": ["198.19.100.80"],
            "externalTrafficPolicy": "Cluster",
            "internalTrafficPolicy": "Cluster",
            "sessionAffinity": "None",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "allocateLoadBalancerNodePorts": true
        },
        "status": {"loadBalancer": {"ingress": [{"ip": vip.to_string(), "ipMode": "VIP"}]}}
    })
}

/// The Service's EndpointSlice: every backend of the lab, ready, on no LB node.
fn endpoint_slice(lab: &L2Lab) -> Value {
    let endpoints: Vec<Value> = lab
        .backends()
        .iter()
        .map(|b| {
            json!({
                "addresses": [b.addr.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "targetRef": {"kind": "Pod", "namespace": SERVICE.0, "name": format!("web-{}", b.name)}
            })
        })
        .collect();
    json!({
        "metadata": {
            "name": SLICE,
            "namespace": SERVICE.0,
            "uid": "8d2e4f6a-1b3c-4d5e-9f70-a1b2c3d4e5f6",
            "creationTimestamp": "2025-05-03T12:10:01Z",
            "labels": {
                "kubernetes.io/service-name": SERVICE.1,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"
            }
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "protocol": "TCP", "port": 80}]
    })
}

/// The pool holding exactly the VIP; with `selector`, only Nodes labelled [`EDGE`] may
/// announce it.
fn pool(vip: IpAddr, selector: bool) -> Value {
    let mut spec = json!({"addresses": [format!("{vip}/32")]});
    if selector {
        spec["announce"] = json!({"nodeSelector": {"matchLabels": {EDGE.0: EDGE.1}}});
    }
    json!({
        "metadata": {"name": POOL, "uid": "2c4e6a8b-0d1f-4a3b-9c5d-7e9f1a3b5c7d", "generation": 1},
        "spec": spec
    })
}

/// Node `name` as stored, changed by `edit`, applied back (a `kubectl` edit).
fn edit_node(server: &FakeApiServer, name: &str, edit: impl FnOnce(&mut Value)) {
    let mut node = server
        .get(Kind::Node, "", name)
        .unwrap_or_else(|| panic!("no Node {name}"));
    edit(&mut node);
    server.apply(Kind::Node, node);
}

/// `kubectl cordon`: unschedulable, with the taint the node controller adds.
fn cordon(node: &mut Value) {
    node["spec"]["unschedulable"] = json!(true);
    node["spec"]["taints"] = json!([{
        "key": "node.kubernetes.io/unschedulable",
        "effect": "NoSchedule",
        "timeAdded": "2025-05-03T12:30:00Z"
    }]);
}

/// Where node `i`'s agent serves its metrics.
fn metrics_addr(lab: &L2Lab, i: usize) -> SocketAddr {
    SocketAddr::new(lab.nodes()[i].addr.into(), 9740)
}

/// The nodes whose `/metrics` (scraped from the client) say they announce `vip` by L2, or
/// `None` while a node does not answer.
fn announcing_by_metrics(lab: &L2Lab, vip: IpAddr) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for i in 0..lab.nodes().len() {
        let (status, body) =
            scrape::http_get(lab.client(), metrics_addr(lab, i), "/metrics", TIMEOUT).ok()?;
        (status == 200).then_some(())?;
        let samples = scrape::parse_metrics(&body).ok()?;
        let vip = vip.to_string();
        let with = [("vip", vip.as_str()), ("mode", "l2")];
        if scrape::sum(&samples, "xdplb_vip_announced", &with) == 1.0 {
            out.push(i);
        }
    }
    Some(out)
}

/// Waits (bounded) until exactly `owner` says by its metrics that it announces `vip`.
fn wait_announced_by_metrics(lab: &L2Lab, vip: IpAddr, owner: usize) {
    let deadline = Instant::now() + MOVE_LIMIT;
    let mut last = None;
    while Instant::now() < deadline {
        last = announcing_by_metrics(lab, vip);
        if last.as_deref() == Some(&[owner][..]) {
            return;
        }
        thread::sleep(ROUND);
    }
    panic!(
        "xdplb_vip_announced: want only {} announcing {vip}, the metrics say {last:?}",
        lab.nodes()[owner].name
    );
}

/// Starts node `i`'s agent in Kubernetes mode against the kubeconfig's server.
fn start_agent(lab: &mut L2Lab, i: usize, kubeconfig: &Path) {
    let metrics = metrics_addr(lab, i).to_string();
    lab.start_agent_with(i, |cmd| {
        cmd.args(["--kubernetes", "--ipam=false", "--namespace", NAMESPACE])
            .args(["--metrics-address", &metrics])
            .env("KUBECONFIG", kubeconfig)
            .env_remove("NODE_NAME")
            .env_remove("POD_NAMESPACE")
            .env_remove("KUBERNETES_SERVICE_HOST");
    })
    .unwrap();
}

/// The node the agents' rendezvous hash gives `vip` among `candidates` (indexes).
fn expected_owner(lab: &L2Lab, vip: IpAddr, candidates: &[usize]) -> usize {
    let names = candidates.iter().map(|&i| lab.nodes()[i].name.as_str());
    let name = owner::owner(vip, names).expect("a candidate");
    lab.nodes().iter().position(|n| n.name == name).unwrap()
}

/// `Announced` Events about the Service: name → (reporting node, note, count).
type Announcements = BTreeMap<String, (String, String, u64)>;

fn announcements(server: &FakeApiServer) -> Announcements {
    server
        .list(Kind::Event)
        .iter()
        .filter(|e| e["reason"] == "Announced")
        .map(|e| {
            let r = &e["regarding"];
            assert_eq!(
                (
                    &r["apiVersion"],
                    &r["kind"],
                    &r["namespace"],
                    &r["name"],
                    &r["uid"]
                ),
                (
                    &json!("v1"),
                    &json!("Service"),
                    &json!(SERVICE.0),
                    &json!(SERVICE.1),
                    &json!(SERVICE_UID)
                ),
                "an Announced Event is about the Service: {e}"
            );
            assert_eq!(e["type"], "Normal", "{e}");
            assert_eq!(e["metadata"]["namespace"], SERVICE.0, "{e}");
            let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
            (
                text(&e["metadata"]["name"]),
                (
                    text(&e["reportingInstance"]),
                    text(&e["note"]),
                    e["series"]["count"].as_u64().unwrap_or(1),
                ),
            )
        })
        .collect()
}

/// Whether `now` holds an `Announced` Event from `node` naming it that is not in `before`,
/// or is counted again (a repeat within the series window is the same Event, counted).
fn announced_anew(now: &Announcements, before: &Announcements, vip: IpAddr, node: &str) -> bool {
    let note = format!("{vip} announced from node {node} (L2: it answers ARP/NDP for it)");
    now.iter().any(|(name, (from, text, count))| {
        from == node && *text == note && before.get(name).is_none_or(|(_, _, was)| count > was)
    })
}

/// How an ownership change went, each time from the change.
struct Move {
    /// The node that answers alone at the end.
    owner: usize,
    /// The first ARP request only the new owner answered was sent this long after.
    arp: Duration,
    /// The client's neighbour entry named the new owner (gratuitous ARP).
    entry: Duration,
    /// The new owner's `Announced` Event was in the API server.
    event: Duration,
    /// Rounds (of [`ROUND`]) before, in which nobody answered, or several nodes did.
    silent: usize,
    doubled: usize,
}

/// Polls ARP from the client, its neighbour entry and the Events until node `want` answers
/// alone, is in the entry and has published a new `Announced` Event (not in `before`),
/// then checks that it keeps answering alone for [`MOVE_STABLE`]. Times are from `since`.
fn wait_move(
    lab: &L2Lab,
    server: &FakeApiServer,
    vip: IpAddr,
    want: usize,
    before: &Announcements,
    since: Instant,
) -> Move {
    let node = &lab.nodes()[want];
    let (mut arp, mut entry, mut event) = (None, None, None);
    let (mut silent, mut doubled) = (0, 0);
    while arp.is_none() || entry.is_none() || event.is_none() {
        let asked = since.elapsed();
        let answers = lab.who_answers(vip, ROUND).unwrap();
        if arp.is_none() {
            match answers.as_slice() {
                [mac] if *mac == node.mac => arp = Some(asked),
                [] => silent += 1,
                [_] => {}
                _ => doubled += 1,
            }
        }
        if entry.is_none()
            && lab.client_neighbour(vip).unwrap().and_then(|e| e.mac) == Some(node.mac)
        {
            entry = Some(since.elapsed());
        }
        if event.is_none() && announced_anew(&announcements(server), before, vip, &node.name) {
            event = Some(since.elapsed());
        }
        assert!(
            since.elapsed() < MOVE_LIMIT,
            "within {MOVE_LIMIT:?} {} should answer alone for {vip} (first at {arp:?}; last \
             answers {:?}), be in the client's entry (at {entry:?}: {:?}) and publish an \
             Announced Event (at {event:?}; Events {:#?})",
            node.name,
            answers
                .iter()
                .map(|m| lab.describe_mac(*m))
                .collect::<Vec<_>>(),
            lab.client_neighbour(vip),
            announcements(server)
        );
    }
    let owner = lab
        .wait_stable_answerer(vip, MOVE_STABLE, MOVE_LIMIT)
        .unwrap();
    assert_eq!(
        owner,
        want,
        "{} answered first, then {} took over",
        node.name,
        lab.nodes()[owner].name
    );
    Move {
        owner,
        arp: arp.unwrap(),
        entry: entry.unwrap(),
        event: event.unwrap(),
        silent,
        doubled,
    }
}

/// The backend addresses node `i`'s data plane holds for `service`, sorted.
fn backends(lab: &L2Lab, i: usize, service: SocketAddr) -> Vec<String> {
    let status = lab.status_json(i).unwrap();
    let want = format!("{service}/tcp");
    let svc = status["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["address"] == want.as_str())
        .unwrap_or_else(|| panic!("{} does not serve {want}: {status:#}", lab.nodes()[i].name));
    let mut v: Vec<String> = svc["backends"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["address"].as_str().map(String::from))
        .collect();
    v.sort();
    v
}

/// Opens the long-lived connections; each one's backend.
fn open_sessions(client: &NetNs, service: SocketAddr) -> Vec<(TcpSession, String)> {
    TcpSession::open_many(client, service, SESSIONS, TIMEOUT).unwrap_or_else(|e| panic!("{e:#}"))
}

/// One request on every connection: a line for each that failed or changed backend.
fn broken(sessions: &mut [(TcpSession, String)]) -> Vec<String> {
    sessions
        .iter_mut()
        .filter_map(|(s, before)| match s.request() {
            Ok(now) if now == *before => None,
            Ok(now) => Some(format!(
                "port {}: moved from {before} to {now}",
                s.local_port
            )),
            Err(e) => Some(format!("port {} (on {before}): {e:#}", s.local_port)),
        })
        .collect()
}

fn assert_unbroken(step: &str, sessions: &mut [(TcpSession, String)]) {
    let broken = broken(sessions);
    println!(
        "{step}: {} of {SESSIONS} established connections work, {} broken",
        SESSIONS - broken.len(),
        broken.len()
    );
    assert!(
        broken.is_empty(),
        "{step}: broken connections:\n{}",
        broken.join("\n")
    );
}

fn report(lab: &L2Lab, step: &str, m: &Move) {
    println!(
        "{step}: owner {} answers ARP alone {:.2?} after the change ({} rounds of {ROUND:?} \
         before with no answer, {} with several), in the client's entry after {:.2?}, its \
         Announced Event after {:.2?}",
        lab.nodes()[m.owner].name,
        m.arp,
        m.silent,
        m.doubled,
        m.entry,
        m.event
    );
}

#[test]
fn l2_ownership_follows_nodes_pools_and_failures() {
    require_root().unwrap();
    let spec = spec();
    let mut lab = L2Lab::new(spec.clone()).unwrap();
    lab.start_backends().unwrap();
    let vip = IpAddr::V4(lab.vip());
    let service_addr = lab.service(false);
    let server = start_server(lab.client(), IpAddr::V4(lab.client_addr()));
    server.apply(Kind::ConfigMap, config_map(&spec));
    for (i, node) in lab.nodes().iter().enumerate() {
        server.apply(Kind::Node, node_object(i, node));
    }
    server.apply(Kind::Service, service(vip));
    server.apply(Kind::EndpointSlice, endpoint_slice(&lab));
    let work = Work::new();
    let kubeconfig = work.kubeconfig(&server);
    let started = Instant::now();
    for i in 0..lab.nodes().len() {
        start_agent(&mut lab, i, &kubeconfig);
    }
    let names: Vec<String> = lab.nodes().iter().map(|n| n.name.clone()).collect();

    // 1. One owner, the rendezvous winner among all three; the client reaches the VIP; the
    // owner says so on the Service.
    let owner = lab
        .wait_stable_answerer(vip, SETTLE_STABLE, SETTLE_LIMIT)
        .unwrap();
    let all: Vec<usize> = (0..names.len()).collect();
    assert_eq!(
        owner,
        expected_owner(&lab, vip, &all),
        "the owner is the rendezvous winner"
    );
    let settled = started.elapsed();
    for i in all.iter().copied() {
        assert_eq!(
            backends(&lab, i, service_addr),
            lab.backends()
                .iter()
                .map(|b| b.addr.to_string())
                .collect::<Vec<_>>(),
            "{} balances over the EndpointSlice's endpoints",
            names[i]
        );
    }
    // The client resolves the VIP (its first traffic) to the owner, whose Event is out.
    let mut sessions = open_sessions(lab.client(), service_addr);
    wait_move(&lab, &server, vip, owner, &BTreeMap::new(), Instant::now());
    // Each node's metrics agree: the owner announces the VIP, no other node does.
    wait_announced_by_metrics(&lab, vip, owner);
    let mut spread = BTreeMap::<&str, usize>::new();
    for (_, b) in &sessions {
        *spread.entry(b.as_str()).or_default() += 1;
    }
    println!(
        "1. start: owner {} (the only node answering ARP), {settled:.2?} after the first agent \
         started (one by one, each waiting until it attached), in the client's entry, its Announced \
         Event out; {SESSIONS} connections over {spread:?}; Announced Events so far: {:#?}",
        names[owner],
        announcements(&server)
    );

    // 2. The owner is cordoned: it withdraws, the winner among the other two takes over.
    let before = announcements(&server);
    let cordoned = owner;
    let others: Vec<usize> = all.iter().copied().filter(|&i| i != cordoned).collect();
    let want = expected_owner(&lab, vip, &others);
    let changed = Instant::now();
    edit_node(&server, &names[cordoned], cordon);
    let moved = wait_move(&lab, &server, vip, want, &before, changed);
    report(&lab, &format!("2. {} cordoned", names[cordoned]), &moved);
    assert_unbroken("2. after the cordon", &mut sessions);
    let owner = moved.owner;
    wait_announced_by_metrics(&lab, vip, owner);

    // 3. A pool admits only Nodes labelled edge=true; the one uncordoned node that does not
    // own the VIP gets the label: the VIP must move to it.
    let labelled = others.iter().copied().find(|&i| i != owner).unwrap();
    edit_node(&server, &names[labelled], |n| {
        n["metadata"]["labels"][EDGE.0] = json!(EDGE.1);
    });
    // The label alone changes nothing (no pool asks for it yet).
    thread::sleep(Duration::from_millis(500));
    assert_eq!(
        lab.who_answers(vip, ROUND * 3).unwrap(),
        [lab.nodes()[owner].mac],
        "a label no pool selects moves nothing"
    );
    let before = announcements(&server);
    let changed = Instant::now();
    server.apply(Kind::IpAddressPool, pool(vip, true));
    let moved = wait_move(&lab, &server, vip, labelled, &before, changed);
    report(
        &lab,
        &format!(
            "3. pool {POOL} with nodeSelector {}={}, only {} labelled",
            EDGE.0, EDGE.1, names[labelled]
        ),
        &moved,
    );
    assert_unbroken("3. after the pool", &mut sessions);

    // 4. The only eligible node dies: nobody may answer, not the last live node.
    let last = owner;
    let killed = Instant::now();
    lab.link_down(labelled).unwrap();
    lab.kill_agent(labelled).unwrap();
    let mut rounds = 0;
    while killed.elapsed() < SILENCE {
        let answers = lab.who_answers(vip, ROUND).unwrap();
        assert!(
            answers.is_empty(),
            "{:.2?} after {} died, with no other node eligible, {:?} answered for {vip}",
            killed.elapsed(),
            names[labelled],
            answers
                .iter()
                .map(|m| lab.describe_mac(*m))
                .collect::<Vec<_>>()
        );
        rounds += 1;
    }
    let log = lab.agent_log(last);
    assert!(
        log.contains("no live eligible node; nobody answers for it"),
        "{} says nobody answers:\n{log}",
        names[last]
    );
    println!(
        "4. {} killed (agent SIGKILL, link down), the only node the pool admits: nobody answered \
         ARP for {vip} in {rounds} rounds over {SILENCE:?}; {} logged that no live eligible node \
         is left",
        names[labelled], names[last]
    );

    // The selector goes: the last live, uncordoned node takes the VIP.
    let before = announcements(&server);
    let changed = Instant::now();
    server.apply(Kind::IpAddressPool, pool(vip, false));
    let moved = wait_move(&lab, &server, vip, last, &before, changed);
    report(
        &lab,
        &format!("4. pool {POOL} without a node selector"),
        &moved,
    );
    assert_unbroken("4. after the selector went", &mut sessions);
    let fresh = lb_testkit::tcp_connections(lab.client(), service_addr, 10, TIMEOUT).unwrap();
    assert!(
        fresh.iter().all(|r| r.answered()),
        "new connections: {fresh:?}"
    );

    // 5. The last eligible Node is cordoned: no Node is eligible, so nobody answers (an
    //    empty list of eligible Nodes is not "this node alone").
    edit_node(&server, &names[last], cordon);
    let cordoned = Instant::now();
    let mut silent_since = None;
    while cordoned.elapsed() < SILENCE * 2 {
        let answers = lab.who_answers(vip, ROUND).unwrap();
        match (answers.is_empty(), silent_since) {
            (true, None) => silent_since = Some(cordoned.elapsed()),
            (false, Some(_)) => panic!(
                "{} answered again after falling silent, with no Node eligible",
                names[last]
            ),
            _ => {}
        }
    }
    let silent = silent_since.unwrap_or_else(|| {
        panic!(
            "{} kept answering for {vip} although it is the last Node and cordoned",
            names[last]
        )
    });
    println!(
        "5. {} (the last eligible Node) cordoned: silent after {silent:.2?}",
        names[last]
    );
    println!("Announced Events at the end: {:#?}", announcements(&server));
}
