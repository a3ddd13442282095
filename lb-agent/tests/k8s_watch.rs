//! Kubernetes mode end to end, without a cluster: the real agent binary (`run --kubernetes`)
//! on the LB node of a network-namespace lab, its kube client talking plain HTTP to a fake API
//! server (`fake_apiserver`) that serves the objects of `tests/fixtures/k8s/` in the API
//! server's wire format: LIST, then chunked WATCH streams the test pushes events into, cuts,
//! and refuses. Backends run the decap program and echo servers, and a client sends real UDP
//! and TCP traffic to the VIP taken from the Service's `status.loadBalancer.ingress`.
//!
//! Why a fake: no kube-apiserver (nor etcd, kind, k3s or envtest binaries) can be installed
//! here from the package registries, and the behaviour under test is the agent's: how it
//! lists, watches, resumes, re-lists and applies, which the fake reproduces at the HTTP level
//! (resource versions, `410 Expired`, field and label selectors, bookmarks).
//!
//! The fake server listens on 127.0.0.1 inside the LB namespace (its loopback, not the
//! host's). Needs root; fails with a clear message otherwise.

mod fake_apiserver;

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use fake_apiserver::{FakeApiServer, Kind};
use lb_agent::dataplane::Dataplane;
use lb_testkit::{
    ChildGuard, Distribution, EchoServer, Lab, LabSpec, NetNs, Pod,
    client::udp_exchange,
    echo::large_request,
    require_root,
    scenario::DirGuard,
    scrape::{self, http_get, parse_metrics},
    tcp_connections, udp_flow_from_port, udp_flows,
};
use serde_json::{Value, json};

const NAMESPACE: &str = "xdp-lb";
const NODE: &str = "node-a";
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const PORT: u16 = 7000;
const UDP_SERVICE: &str = "198.18.0.100:7000/udp";
const TCP_SERVICE: &str = "198.18.0.100:7000/tcp";
const SLICE: (&str, &str) = ("demo", "echo-x7k2p");
/// A bound on every wait for the agent.
const WAIT: Duration = Duration::from_secs(30);
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

fn agent_bin() -> &'static str {
    env!("CARGO_BIN_EXE_lb-agent")
}

fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/k8s")
        .join(rel)
}

/// A work directory (kubeconfig, logs) and a pin directory on bpffs, both removed on drop.
struct Dirs {
    work: DirGuard,
    pins: DirGuard,
}

impl Dirs {
    fn new() -> Dirs {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "lbt-k8s-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let work = DirGuard(std::env::temp_dir().join(&tag));
        fs::create_dir_all(&work.0).unwrap();
        Dirs {
            work,
            pins: DirGuard(PathBuf::from("/sys/fs/bpf").join(&tag)),
        }
    }

    /// A kubeconfig for `server`, without credentials (the fake server wants none).
    fn kubeconfig(&self, server: &FakeApiServer) -> PathBuf {
        server.write_kubeconfig(&self.work.0, NAMESPACE)
    }
}

/// Bind the fake server's listener on 127.0.0.1 inside `ns` (port 0: any free one).
fn listen(ns: &NetNs, addr: SocketAddr) -> TcpListener {
    ns.enter(move || TcpListener::bind(addr))
        .unwrap()
        .unwrap_or_else(|e| panic!("binding {addr} in {}: {e}", ns.name()))
}

fn start_server(ns: &NetNs, lists: &[(Kind, &str)]) -> FakeApiServer {
    let listener = listen(ns, SocketAddr::from(([127, 0, 0, 1], 0)));
    let paths: Vec<(Kind, PathBuf)> = lists.iter().map(|(k, rel)| (*k, fixture(rel))).collect();
    let refs: Vec<(Kind, &Path)> = paths.iter().map(|(k, p)| (*k, p.as_path())).collect();
    FakeApiServer::start(listener, &refs)
}

const ALL_LISTS: [(Kind, &str); 4] = [
    (Kind::Service, "watch/services.json"),
    (Kind::EndpointSlice, "watch/endpointslices.json"),
    (Kind::Node, "nodes.json"),
    (Kind::ConfigMap, "watch/configmaps.json"),
];

/// Decap programs and echo servers (bound to the VIP) on every backend.
struct Backends {
    _servers: Vec<EchoServer>,
    _decaps: Vec<ChildGuard>,
}

fn start_backends(lab: &Lab, dir: &Path) -> Backends {
    let mut decaps = Vec::new();
    let mut servers = Vec::new();
    for b in lab.backends() {
        let log = fs::File::create(dir.join(format!("decap-{}.log", b.name))).unwrap();
        let mut cmd = b.ns.command(agent_bin());
        cmd.args(["decap", "--interface", "eth0", "--xdp-mode", "skb"])
            .args(["--allow-source", &lab.lb_addr().to_string()])
            .stdout(Stdio::null())
            .stderr(log);
        decaps.push(ChildGuard::spawn(&mut cmd).unwrap());
        servers.push(EchoServer::start(&b.ns, &b.name, SocketAddr::new(VIP.into(), PORT)).unwrap());
    }
    let deadline = Instant::now() + WAIT;
    for b in lab.backends() {
        while !b
            .ns
            .ip(&["-d", "link", "show", "eth0"])
            .unwrap()
            .contains("prog/xdp")
        {
            assert!(
                Instant::now() < deadline,
                "decap did not attach on {}",
                b.name
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
    Backends {
        _servers: servers,
        _decaps: decaps,
    }
}

/// One `lb-agent run --kubernetes` in a namespace, logging to a file.
struct Agent {
    child: Option<ChildGuard>,
    log: PathBuf,
}

impl Agent {
    fn start(ns: &NetNs, dirs: &Dirs, kubeconfig: &Path, name: &str, extra: &[&str]) -> Agent {
        Agent::start_on(ns, NODE, dirs, kubeconfig, name, extra)
    }

    /// The agent of node `node`.
    fn start_on(
        ns: &NetNs,
        node: &str,
        dirs: &Dirs,
        kubeconfig: &Path,
        name: &str,
        extra: &[&str],
    ) -> Agent {
        let log = dirs.work.0.join(format!("{name}.log"));
        let file = fs::File::create(&log).unwrap();
        let mut cmd = ns.command(agent_bin());
        cmd.args(["run", "--kubernetes", "--node-name", node])
            .args(["--namespace", NAMESPACE, "--xdp-mode", "skb"])
            .args(["--resync-interval", "2", "--pin-path"])
            .arg(&dirs.pins.0)
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,netlink_packet_route=error")
            .env_remove("NODE_NAME")
            .env_remove("POD_NAMESPACE")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdout(Stdio::null())
            .stderr(file);
        Agent {
            child: Some(ChildGuard::spawn(&mut cmd).unwrap()),
            log,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait (at most `limit`) until `done`; fails with the log if the agent exits first.
    fn wait(&mut self, limit: Duration, what: &str, mut done: impl FnMut(&Agent) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            if done(self) {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().unwrap()
            {
                panic!(
                    "the agent exited ({status}) before {what}; log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out ({limit:?}) waiting until {what}; agent log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until the agent exits by itself.
    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit within {limit:?}; log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, bounded wait.
    fn stop(&mut self) -> ExitStatus {
        self.child.take().expect("running").stop().unwrap()
    }
}

/// `lb-agent status --json`.
fn status(pins: &Path) -> Option<Value> {
    let out = std::process::Command::new(agent_bin())
        .args(["status", "--json", "--pin-path"])
        .arg(pins)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

fn service<'a>(status: &'a Value, address: &str) -> Option<&'a Value> {
    status["services"]
        .as_array()?
        .iter()
        .find(|s| s["address"] == address)
}

/// The backend addresses of a service, sorted; `None` if the service is not programmed.
fn backends(status: &Value, address: &str) -> Option<Vec<String>> {
    let mut v: Vec<String> = service(status, address)?["backends"]
        .as_array()?
        .iter()
        .filter_map(|b| b["address"].as_str().map(String::from))
        .collect();
    v.sort();
    Some(v)
}

fn addrs(last_octets: &[u8]) -> Vec<String> {
    last_octets
        .iter()
        .map(|o| format!("198.18.0.{o}"))
        .collect()
}

/// Both echo services have exactly these backends.
fn echo_backends_are(pins: &Path, want: &[u8]) -> bool {
    let want = addrs(want);
    status(pins).is_some_and(|s| {
        backends(&s, UDP_SERVICE).as_ref() == Some(&want)
            && backends(&s, TCP_SERVICE).as_ref() == Some(&want)
    })
}

fn forwarding_of(pins: &Path, address: &str) -> Option<String> {
    let s = status(pins)?;
    service(&s, address)?["forwarding"]
        .as_str()
        .map(String::from)
}

/// What the pinned maps hold (not the counters): services, backends, node config, tables.
fn maps(pins: &Path) -> String {
    let dp = Dataplane::open_pinned(pins).unwrap();
    let snap = dp.snapshot().unwrap();
    let tables: Vec<Vec<u32>> = snap
        .services
        .values()
        .map(|v| dp.table(v).unwrap())
        .collect();
    format!("{snap:?}\n{tables:?}")
}

/// Real traffic to the VIP: every flow answered, from the VIP, by exactly `want` backends.
fn check_traffic(lab: &Lab, want: &[&str]) {
    let vip = SocketAddr::new(VIP.into(), PORT);
    let udp = udp_flows(lab.client(), vip, 60, REPLY_TIMEOUT).unwrap();
    let tcp = tcp_connections(lab.client(), vip, 12, REPLY_TIMEOUT).unwrap();
    let d = Distribution::new(&udp, &tcp, vip, IpAddr::V4(lab.client_addr()));
    assert_eq!(d.timeouts(), 0, "every flow answered:\n{}", d.table());
    assert!(d.all_from_vip && d.all_saw_client_ip, "DSR:\n{}", d.table());
    let hit: BTreeSet<&str> = d.per_backend.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = want.iter().copied().collect();
    assert_eq!(hit, want, "backends that answered:\n{}", d.table());
}

/// The echo EndpointSlice with endpoint `octet` set to these conditions (or removed).
fn slice_with(server: &FakeApiServer, octet: u8, conditions: Option<Value>) -> Value {
    let mut slice = server.get(Kind::EndpointSlice, SLICE.0, SLICE.1).unwrap();
    let addr = format!("198.18.0.{octet}");
    let endpoints = slice["endpoints"].as_array_mut().unwrap();
    let i = endpoints
        .iter()
        .position(|e| e["addresses"][0] == addr.as_str())
        .unwrap_or_else(|| panic!("no endpoint {addr}"));
    match conditions {
        Some(c) => endpoints[i]["conditions"] = c,
        None => {
            endpoints.remove(i);
        }
    }
    slice
}

fn ready() -> Value {
    json!({"ready": true, "serving": true, "terminating": false})
}

fn terminating() -> Value {
    json!({"ready": false, "serving": true, "terminating": true})
}

fn config_map(server: &FakeApiServer, text: &str) -> Value {
    let mut cm = server
        .get(Kind::ConfigMap, NAMESPACE, "xdp-lb-config")
        .unwrap();
    cm["data"]["config.yaml"] = json!(text);
    cm
}

/// A second Service of ours with a setting the data plane does not support (a warning).
fn dns_service() -> Value {
    json!({
        "metadata": {
            "name": "dns",
            "namespace": "demo",
            "uid": "f6a7b8c9-d0e1-5f2a-8b3c-4d5e6f7a8b9c",
            "creationTimestamp": "2025-05-03T12:30:00Z",
            "labels": {"app.kubernetes.io/name": "dns"}
        },
        "spec": {
            "ports": [
                {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 53, "nodePort": 30053},
                {"name": "sig", "protocol": "SCTP", "port": 9999, "targetPort": 9999, "nodePort": 30999}
            ],
            "selector": {"app.kubernetes.io/name": "dns"},
            "clusterIP": "198.19.42.53",
            "clusterIPs": ["198.19.42.53"],
            "type": "LoadBalancer",
            "sessionAffinity": "ClientIP",
            "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 10800}},
            "externalTrafficPolicy": "Cluster",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "allocateLoadBalancerNodePorts": true,
            "internalTrafficPolicy": "Cluster"
        },
        "status": {"loadBalancer": {"ingress": [{"ip": "198.18.0.101", "ipMode": "VIP"}]}}
    })
}

/// Wait until every resource has a live WATCH stream again (after a start or an outage, each
/// watcher reconnects after its own backoff).
fn wait_watching(server: &FakeApiServer) {
    let deadline = Instant::now() + 2 * WAIT;
    for kind in [
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Node,
        Kind::ConfigMap,
    ] {
        while server.watches(kind) == 0 {
            assert!(Instant::now() < deadline, "no watch on {kind:?}");
            thread::sleep(Duration::from_millis(50));
        }
    }
}

fn count_lists(server: &FakeApiServer, path: &str) -> usize {
    server
        .requests()
        .iter()
        .filter(|r| r.starts_with(&format!("GET {path}")) && !r.contains("watch=true"))
        .count()
}

#[test]
fn follows_the_cluster_through_watch_events_outages_and_relists() {
    require_root().unwrap();
    let lab = Lab::new(LabSpec::default()).unwrap();
    let dirs = Dirs::new();
    let _backends = start_backends(&lab, &dirs.work.0);
    let server = start_server(lab.lb(), &ALL_LISTS);
    let kubeconfig = dirs.kubeconfig(&server);
    let pins = dirs.pins.0.clone();
    let mut agent = Agent::start(lab.lb(), &dirs, &kubeconfig, "agent", &[]);

    // 1. The initial lists: the Service's two ports with the three ready endpoints; the
    // ClusterIP Service and the other ConfigMap in the namespace are not ours.
    agent.wait(WAIT, "the agent attaches", |a| {
        a.log().contains("load balancer attached")
    });
    agent.wait(WAIT, "the listed endpoints are programmed", |_| {
        echo_backends_are(&pins, &[11, 12, 13])
    });
    assert_eq!(forwarding_of(&pins, UDP_SERVICE).as_deref(), Some("ipip"));
    let log = agent.log();
    assert!(log.contains("settings read"), "{log}");
    assert!(log.contains("cluster state listed"), "{log}");
    check_traffic(&lab, &["b1", "b2", "b3"]);
    wait_watching(&server);
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.contains("/api/v1/namespaces/xdp-lb/configmaps?")
                && r.contains("fieldSelector=metadata.name%3Dxdp-lb-config")),
        "the ConfigMap is watched by name: {requests:#?}"
    );

    // 2. A new Service (ADDED): programmed without backends, its warning logged once.
    server.apply(Kind::Service, dns_service());
    agent.wait(WAIT, "the new Service is programmed", |_| {
        status(&pins).is_some_and(|s| backends(&s, "198.18.0.101:53/udp") == Some(vec![]))
    });
    agent.wait(WAIT, "its warning is logged", |a| {
        a.log().contains("UnsupportedProtocol")
    });

    // 3. An endpoint starts terminating (MODIFIED): it leaves both services; flows go to the
    // other two. Bookmarks in between change nothing.
    server.bookmark(Kind::EndpointSlice);
    server.apply(
        Kind::EndpointSlice,
        slice_with(&server, 13, Some(terminating())),
    );
    server.bookmark(Kind::Service);
    agent.wait(WAIT, "the terminating endpoint is removed", |_| {
        echo_backends_are(&pins, &[11, 12])
    });
    check_traffic(&lab, &["b1", "b2"]);

    // 4. The API server goes away: every connection is cut and new ones are refused. The
    // watchers fail and retry; the maps stay exactly as they are and traffic keeps flowing,
    // also while the cluster changes unseen (the endpoint is ready again).
    let before = maps(&pins);
    server.cut();
    agent.wait(WAIT, "the watchers notice the outage", |a| {
        a.log().contains("watch failed")
    });
    server.apply(Kind::EndpointSlice, slice_with(&server, 13, Some(ready())));
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(2) {
        assert_eq!(maps(&pins), before, "the maps changed during the outage");
        thread::sleep(Duration::from_millis(200));
    }
    check_traffic(&lab, &["b1", "b2"]);
    assert_eq!(maps(&pins), before, "the maps changed during the outage");

    // The API server is back: the watches resume from their resource version and get what
    // they missed.
    server.resume(listen(lab.lb(), server.addr()));
    agent.wait(WAIT, "the change made during the outage is applied", |_| {
        echo_backends_are(&pins, &[11, 12, 13])
    });
    check_traffic(&lab, &["b1", "b2", "b3"]);
    wait_watching(&server);

    // 5. A change after the reconnect: the ConfigMap switches the default forwarding to l2.
    server.apply(
        Kind::ConfigMap,
        config_map(&server, "default_forwarding: l2\ninterface: eth0\n"),
    );
    agent.wait(WAIT, "the new settings are applied", |_| {
        forwarding_of(&pins, UDP_SERVICE).as_deref() == Some("l2")
            && forwarding_of(&pins, TCP_SERVICE).as_deref() == Some("l2")
    });
    check_traffic(&lab, &["b1", "b2", "b3"]);

    // An invalid ConfigMap is rejected; the last valid settings stay.
    server.apply(
        Kind::ConfigMap,
        config_map(&server, "default_forwarding: gre\ninterface: eth0\n"),
    );
    agent.wait(WAIT, "the invalid settings are rejected", |a| {
        a.log().contains("settings rejected")
    });
    assert_eq!(forwarding_of(&pins, UDP_SERVICE).as_deref(), Some("l2"));

    // 6. A longer outage: the history the watches would resume from is compacted meanwhile,
    // so they get 410 Expired and re-list. The stores are replaced in one step; only the
    // difference is written (the Service deleted, one endpoint gone), nothing is flushed.
    let lists_before = count_lists(&server, "/apis/discovery.k8s.io/v1/endpointslices");
    server.cut();
    server.delete(Kind::Service, "demo", "dns");
    server.apply(Kind::EndpointSlice, slice_with(&server, 12, None));
    server.compact();
    thread::sleep(Duration::from_millis(500));
    server.resume(listen(lab.lb(), server.addr()));
    // kube's DefaultBackoff (0.8 s doubling, jittered, reset after 120 s without errors) has
    // counted every failure of both outages by now, so the re-list may take a while.
    agent.wait(2 * WAIT, "the re-listed state is applied", |_| {
        echo_backends_are(&pins, &[11, 13])
            && status(&pins).is_some_and(|s| service(&s, "198.18.0.101:53/udp").is_none())
    });
    assert!(
        count_lists(&server, "/apis/discovery.k8s.io/v1/endpointslices") > lists_before,
        "the EndpointSlices were re-listed: {:#?}",
        server.requests()
    );
    check_traffic(&lab, &["b1", "b3"]);

    let log = agent.log();
    let echo_removed = log
        .lines()
        .filter(|l| l.contains("service removed") && l.contains("198.18.0.100"))
        .count();
    assert_eq!(
        echo_removed, 0,
        "the echo services were never removed:\n{log}"
    );
    let warnings = log
        .lines()
        .filter(|l| l.contains("UnsupportedProtocol"))
        .collect::<Vec<_>>();
    assert_eq!(
        warnings.len(),
        1,
        "the warning is logged once: {warnings:#?}"
    );
    assert!(warnings[0].contains("demo/dns"), "{}", warnings[0]);

    // The IPAM controller ran too (the only agent, so it led), but without IPAddressPools it
    // left every Service's status alone.
    let writes = server.writes();
    assert!(
        writes.iter().any(|w| w.kind == Kind::Lease
            && w.code < 300
            && w.body["spec"]["holderIdentity"] == NODE),
        "the agent took the IPAM Lease"
    );
    let service_writes: Vec<_> = writes.iter().filter(|w| w.kind == Kind::Service).collect();
    assert!(service_writes.is_empty(), "{service_writes:#?}");

    let exit = agent.stop();
    assert!(exit.success(), "agent exit: {exit}\n{}", agent.log());
    assert!(agent.log().contains("detached"), "{}", agent.log());
    assert!(agent.log().contains("lease released"), "{}", agent.log());
}

#[test]
fn ipam_gives_a_pending_service_its_vip_and_the_data_plane_follows() {
    require_root().unwrap();
    let lab = Lab::new(LabSpec::default()).unwrap();
    let dirs = Dirs::new();
    let _backends = start_backends(&lab, &dirs.work.0);
    let server = start_server(lab.lb(), &ALL_LISTS);
    // The echo Service has no address yet; a pool holds exactly the lab's VIP.
    let mut echo = server.get(Kind::Service, "demo", "echo").unwrap();
    echo["status"] = json!({"loadBalancer": {}});
    server.apply(Kind::Service, echo);
    server.apply(
        Kind::IpAddressPool,
        json!({
            "metadata": {"name": "lab", "uid": "0d9c8b7a-6f5e-4d3c-2b1a-0f9e8d7c6b5a", "generation": 1},
            "spec": {"addresses": [format!("{VIP}/32")]}
        }),
    );
    let kubeconfig = dirs.kubeconfig(&server);
    let pins = dirs.pins.0.clone();
    let metrics = SocketAddr::new(lab.lb_addr().into(), 9740);
    let metrics_arg = metrics.to_string();
    let mut agent = Agent::start(
        lab.lb(),
        &dirs,
        &kubeconfig,
        "agent",
        &["--metrics-address", &metrics_arg],
    );
    // A metric of the agent, as scraped from the client's namespace.
    let scraped = |name: &str, with: &[(&str, &str)]| -> Option<f64> {
        let (status, body) = http_get(lab.client(), metrics, "/metrics", REPLY_TIMEOUT).ok()?;
        (status == 200).then_some(())?;
        let samples = parse_metrics(&body).ok()?;
        samples
            .iter()
            .any(|s| s.name == name)
            .then(|| scrape::sum(&samples, name, with))
    };
    agent.wait(WAIT, "the VIP is allocated and programmed", |_| {
        echo_backends_are(&pins, &[11, 12, 13])
    });
    let echo = server.get(Kind::Service, "demo", "echo").unwrap();
    assert_eq!(
        echo["status"]["loadBalancer"]["ingress"],
        json!([{"ip": VIP.to_string(), "ipMode": "VIP"}])
    );
    check_traffic(&lab, &["b1", "b2", "b3"]);
    agent.wait(WAIT, "the allocation is logged", |a| {
        a.log().contains("Assigned IP [198.18.0.100] from pool lab")
    });
    agent.wait(WAIT, "the IPAllocated Event is published", |_| {
        server
            .list(Kind::Event)
            .iter()
            .any(|e| e["reason"] == "IPAllocated" && e["regarding"]["name"] == "echo")
    });
    // The leader's metrics: its lead, and the pool's one address in use.
    agent.wait(WAIT, "the metrics show the pool's usage", |_| {
        scraped("xdplb_ipam_leader", &[]) == Some(1.0)
            && scraped(
                "xdplb_ipam_pool_addresses",
                &[("pool", "lab"), ("state", "used")],
            ) == Some(1.0)
            && scraped(
                "xdplb_ipam_pool_addresses",
                &[("pool", "lab"), ("state", "free")],
            ) == Some(0.0)
    });
    assert_eq!(
        scraped("xdplb_announce_mode", &[("mode", "none")]),
        Some(1.0)
    );
    // A Service with a port the data plane cannot serve (SCTP): one Warning Event from the
    // leader, naming it; the other Services are untouched.
    let events_about = |name: &str, reason: &str| {
        server
            .list(Kind::Event)
            .into_iter()
            .filter(|e| e["reason"] == reason && e["regarding"]["name"] == name)
            .collect::<Vec<_>>()
    };
    server.apply(Kind::Service, dns_service());
    agent.wait(
        WAIT,
        "the UnsupportedProtocol Warning Event is published",
        |_| !events_about("dns", "UnsupportedProtocol").is_empty(),
    );
    let warning = &events_about("dns", "UnsupportedProtocol")[0];
    assert_eq!(warning["type"], "Warning");
    assert_eq!(
        warning["regarding"]["uid"],
        dns_service()["metadata"]["uid"]
    );
    assert!(
        warning["note"]
            .as_str()
            .unwrap_or_default()
            .contains("port sig: protocol SCTP"),
        "{warning}"
    );
    check_traffic(&lab, &["b1", "b2", "b3"]);
    thread::sleep(Duration::from_secs(1));
    assert_eq!(events_about("dns", "UnsupportedProtocol").len(), 1);

    // An endpoint on no host of the lab: this node cannot resolve its MAC, then gives up on
    // it; each step is one Warning Event on the Service, from this node. Removing the
    // endpoint again is no "reachable again".
    let mut slice = server.get(Kind::EndpointSlice, SLICE.0, SLICE.1).unwrap();
    let mut ghost = slice["endpoints"][0].clone();
    ghost["addresses"] = json!(["198.18.0.99"]);
    slice["endpoints"].as_array_mut().unwrap().push(ghost);
    server.apply(Kind::EndpointSlice, slice);
    agent.wait(
        WAIT,
        "the BackendMACUnresolved Warning Event is published",
        |_| !events_about("echo", "BackendMACUnresolved").is_empty(),
    );
    agent.wait(
        WAIT,
        "the BackendUnreachable Warning Event is published",
        |_| !events_about("echo", "BackendUnreachable").is_empty(),
    );
    agent.wait(WAIT, "the metrics count the unreachable backend", |_| {
        scraped("xdplb_backends_next_hop", &[("state", "unreachable")]) == Some(2.0)
    });
    // One per Service port (UDP and TCP), each naming the node and the backend.
    for reason in ["BackendMACUnresolved", "BackendUnreachable"] {
        agent.wait(WAIT, "an Event for each port", |_| {
            events_about("echo", reason).len() == 2
        });
        for e in events_about("echo", reason) {
            assert_eq!(e["type"], "Warning", "{e}");
            assert_eq!(e["reportingInstance"], NODE, "{e}");
            assert_eq!(e["reportingController"], "xdp-lb.io/lb-agent", "{e}");
            let note = e["note"].as_str().unwrap_or_default();
            assert!(
                note.contains("backend 198.18.0.99 of 198.18.0.100:7000/")
                    && note.contains(&format!("node {NODE}:")),
                "{e}"
            );
        }
    }
    server.apply(Kind::EndpointSlice, slice_with(&server, 99, None));
    agent.wait(WAIT, "the ghost endpoint is removed", |_| {
        echo_backends_are(&pins, &[11, 12, 13])
    });
    check_traffic(&lab, &["b1", "b2", "b3"]);
    thread::sleep(Duration::from_secs(3));
    assert!(events_about("echo", "BackendReachable").is_empty());
    assert_eq!(
        scraped("xdplb_backends_next_hop", &[("state", "unreachable")]),
        Some(0.0)
    );
    assert_eq!(events_about("echo", "BackendMACUnresolved").len(), 2);
    assert_eq!(events_about("echo", "BackendUnreachable").len(), 2);
    let exit = agent.stop();
    assert!(exit.success(), "agent exit: {exit}\n{}", agent.log());

    // With --ipam=false another agent reads the status (and the pools, for their
    // announcement settings) but never writes them or elects.
    let requests_before = server.requests().len();
    let mut passive = Agent::start(lab.lb(), &dirs, &kubeconfig, "passive", &["--ipam=false"]);
    passive.wait(WAIT, "the passive agent attaches", |a| {
        a.log().contains("load balancer attached")
    });
    let later = &server.requests()[requests_before..];
    assert!(
        !later.iter().any(|r| r.contains("leases")
            || (r.contains("ipaddresspools") && !r.starts_with("GET "))
            || (r.contains("events") && !r.starts_with("GET "))),
        "{later:#?}"
    );
    let exit = passive.stop();
    assert!(exit.success(), "agent exit: {exit}\n{}", passive.log());
}

#[test]
fn restarted_agent_adopts_the_pinned_state_without_writes() {
    require_root().unwrap();
    let lab = Lab::new(LabSpec::default()).unwrap();
    let dirs = Dirs::new();
    let _backends = start_backends(&lab, &dirs.work.0);
    // No ConfigMap: the defaults apply and the interface comes from the command line.
    let server = start_server(lab.lb(), &ALL_LISTS[..3]);
    // The lab's backends are hosts of its segment, not pods behind a Node: endpoints
    // without a nodeName, which the default `pod_tunnel: node` tunnels to themselves.
    let mut slice = server.get(Kind::EndpointSlice, SLICE.0, SLICE.1).unwrap();
    for ep in slice["endpoints"].as_array_mut().unwrap() {
        ep.as_object_mut().unwrap().remove("nodeName");
    }
    server.apply(Kind::EndpointSlice, slice);
    let kubeconfig = dirs.kubeconfig(&server);
    let pins = dirs.pins.0.clone();
    let args = ["--interface", "eth0", "--keep-attached"];
    let mut first = Agent::start(lab.lb(), &dirs, &kubeconfig, "agent-1", &args);
    first.wait(WAIT, "the agent attaches", |a| {
        a.log().contains("load balancer attached")
    });
    first.wait(WAIT, "the endpoints are programmed", |_| {
        echo_backends_are(&pins, &[11, 12, 13])
    });
    assert!(
        first
            .log()
            .contains("ConfigMap not found; using the default settings"),
        "{}",
        first.log()
    );

    let vip = SocketAddr::new(VIP.into(), PORT);
    let stop = AtomicBool::new(false);
    let (sent, lost, second) = thread::scope(|s| {
        let traffic = s.spawn(|| {
            let (mut sent, mut lost) = (0usize, 0usize);
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let replies = udp_flows(lab.client(), vip, 10, REPLY_TIMEOUT).unwrap();
                sent += replies.len();
                lost += replies.iter().filter(|r| !r.answered()).count();
            }
            (sent, lost)
        });
        thread::sleep(Duration::from_millis(300));
        let exit = first.stop();
        assert!(exit.success(), "agent exit: {exit}\n{}", first.log());
        assert!(
            first.log().contains("program stays attached"),
            "{}",
            first.log()
        );
        // No agent at all: the pinned link keeps forwarding.
        thread::sleep(Duration::from_millis(500));
        let mut second = Agent::start(lab.lb(), &dirs, &kubeconfig, "agent-2", &args);
        second.wait(WAIT, "the second agent attaches", |a| {
            a.log().contains("load balancer attached")
        });
        thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::SeqCst);
        let (sent, lost) = traffic.join().unwrap();
        (sent, lost, second)
    });
    let mut second = second;
    let log = second.log();
    assert!(
        log.contains("adopted=true"),
        "the second agent adopts the link:\n{log}"
    );
    assert!(
        log.contains("initial sync done writes=0"),
        "and finds nothing to write:\n{log}"
    );
    assert!(
        sent >= 50,
        "traffic kept flowing during the test: {sent} flows"
    );
    assert_eq!(lost, 0, "{lost} of {sent} flows lost across the restart");

    // The second agent follows the cluster too.
    server.apply(Kind::EndpointSlice, slice_with(&server, 11, None));
    second.wait(WAIT, "a change reaches the second agent", |_| {
        echo_backends_are(&pins, &[12, 13])
    });
    let exit = second.stop();
    assert!(exit.success(), "agent exit: {exit}");
}

#[test]
fn invalid_config_map_at_start_is_an_error_naming_it() {
    require_root().unwrap();
    let ns = NetNs::new("lbtk").unwrap();
    let dirs = Dirs::new();
    let server = start_server(&ns, &ALL_LISTS);
    server.apply(
        Kind::ConfigMap,
        config_map(&server, "default_forwarding: gre\n"),
    );
    let kubeconfig = dirs.kubeconfig(&server);
    let mut agent = Agent::start(&ns, &dirs, &kubeconfig, "agent", &[]);
    let exit = agent.wait_exit(WAIT);
    let log = agent.log();
    assert!(!exit.success(), "{log}");
    assert!(
        log.contains("ConfigMap xdp-lb/xdp-lb-config: default_forwarding: unknown forwarding"),
        "{log}"
    );
    assert!(!dirs.pins.0.exists(), "nothing was loaded or pinned");
}

#[test]
fn unreachable_api_server_at_start_writes_nothing_and_sigterm_exits() {
    require_root().unwrap();
    let ns = NetNs::new("lbtk").unwrap();
    let dirs = Dirs::new();
    let server = start_server(&ns, &ALL_LISTS);
    server.cut();
    let kubeconfig = dirs.kubeconfig(&server);
    let mut agent = Agent::start(&ns, &dirs, &kubeconfig, "agent", &[]);
    agent.wait(WAIT, "the watchers report the refused connections", |a| {
        a.log().contains("watch failed")
    });
    thread::sleep(Duration::from_secs(1));
    assert!(
        !dirs.pins.0.exists(),
        "nothing is loaded before the stores are listed"
    );
    let started = Instant::now();
    let exit = agent.stop();
    assert!(exit.success(), "agent exit: {exit}\n{}", agent.log());
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "SIGTERM ends the wait for the API server"
    );
}

#[test]
fn the_watch_fixtures_are_typed_api_lists_with_the_expected_state() {
    use k8s_openapi::api::{
        core::v1::{ConfigMap, Node, Service},
        discovery::v1::EndpointSlice,
    };
    fn list<T>(rel: &str) -> Vec<T>
    where
        T: k8s_openapi::ListableResource + serde::de::DeserializeOwned,
    {
        let text = fs::read_to_string(fixture(rel)).unwrap();
        let list: k8s_openapi::List<T> = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{rel} is not a {}List: {e}", T::KIND));
        list.items
    }
    let config_maps: Vec<ConfigMap> = list("watch/configmaps.json");
    let cm = config_maps
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some("xdp-lb-config"))
        .unwrap();
    let cfg = lb_agent::k8s::K8sConfig::from_config_map(cm).unwrap();
    let (state, warnings) = lb_agent::k8s::desired_state(
        &list::<Service>("watch/services.json"),
        &list::<EndpointSlice>("watch/endpointslices.json"),
        &list::<Node>("nodes.json"),
        &cfg,
        NODE,
    );
    assert_eq!(warnings, vec![]);
    assert_eq!(state.node.interface.as_deref(), Some("eth0"));
    let got: Vec<(String, String, Vec<String>)> = state
        .services
        .iter()
        .map(|(addr, spec)| {
            let backends = spec.backends.keys().map(ToString::to_string).collect();
            (addr.to_string(), spec.name.clone(), backends)
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                TCP_SERVICE.to_string(),
                "demo/echo:echo-tcp".to_string(),
                addrs(&[11, 12, 13])
            ),
            (
                UDP_SERVICE.to_string(),
                "demo/echo:echo-udp".to_string(),
                addrs(&[11, 12, 13])
            ),
        ]
    );
}

#[test]
fn kubernetes_mode_and_a_config_file_exclude_each_other() {
    let out = std::process::Command::new(agent_bin())
        .args(["run", "--kubernetes", "--config", "lb.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot be used with"), "{err}");

    let out = std::process::Command::new(agent_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--ipam[=<BOOL>]") && help.contains("--ipam=false"),
        "{help}"
    );

    let out = std::process::Command::new(agent_bin())
        .args(["run", "--kubernetes"])
        .env_remove("NODE_NAME")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--node-name"), "{err}");
}

/// Packets counted under `reason` by the agent whose maps are pinned at `pins`.
fn reason_count(pins: &Path, reason: &str) -> u64 {
    status(pins)
        .and_then(|s| s["reasons"][reason]["packets"].as_u64())
        .unwrap_or(0)
}

/// How the pod network of a two-node test looks and what the ConfigMap says.
struct PodNet {
    /// Routes to each node's pods through that node (a routed pod network); without them
    /// pods are reachable only from their own node, as on an overlay.
    routed: bool,
    /// The ConfigMap's settings besides `interface`.
    config: &'static str,
    /// The Services' forwarding as configured, and the reason the LB node forwards by.
    forwarding: &'static str,
    tx: &'static str,
    gue_port: u16,
    /// The Service's UDP port takes the VIP's fragments (`xdp-lb.io/fragments`); without it
    /// the LB node drops them.
    fragments: bool,
}

/// DSR to pods, end to end: two nodes run the agent in Kubernetes mode against one API
/// server; the Service's port 7000 has a named `targetPort` that the pods' slice resolves to
/// 8080; one pod is on the load-balancing node (node-a), one behind node-b. Pods have no VIP
/// and no tunnel. The pod network is an overlay as far as the test is concerned: no node
/// has a route to the other's pods. With the default `pod_tunnel: node`, node-a tunnels to
/// node-b's address (GUE naming the pod), node-b decapsulates and translates to pod:8080,
/// node-a delivers to its own pod the same way, and each node's egress program gives the
/// replies VIP:7000 back. The client's checksums are computed in software (offload off), so
/// the pods' stacks verify the translated checksums.
#[test]
fn pods_behind_two_nodes_get_dsr_traffic_on_their_target_port() {
    check_pods_behind_two_nodes(PodNet {
        routed: false,
        config: "",
        forwarding: "ipip",
        tx: "tx_gue",
        gue_port: DEFAULT_GUE,
        fragments: true,
    });
}

/// `pod_tunnel: pod` on a routed pod network: IP-in-IP straight to the pods' addresses.
#[test]
fn pods_on_a_routed_network_get_ipip_to_their_own_address() {
    check_pods_behind_two_nodes(PodNet {
        routed: true,
        config: "pod_tunnel: pod\n",
        forwarding: "ipip",
        tx: "tx_ipip",
        gue_port: DEFAULT_GUE,
        fragments: true,
    });
}

/// GUE set in the ConfigMap (default forwarding and a non-default port, which both nodes
/// take: node-a encapsulates to it, node-b decapsulates it).
#[test]
fn pods_behind_two_nodes_get_gue_traffic_with_the_config_map_s_port() {
    check_pods_behind_two_nodes(PodNet {
        routed: false,
        config: "default_forwarding: gue\ngue_port: 6081\n",
        forwarding: "gue",
        tx: "tx_gue",
        gue_port: 6081,
        fragments: false,
    });
}

fn check_pods_behind_two_nodes(net: PodNet) {
    require_root().unwrap();
    let lab = Lab::new(LabSpec {
        backends: 1,
        ..LabSpec::default()
    })
    .unwrap();
    let node_b = &lab.backends()[0];
    let pod_a = Pod::attach(lab.lb(), "pod-a", 7).unwrap();
    let pod_b = Pod::attach(&node_b.ns, "pod-b", 8).unwrap();
    // A routed pod network: each node reaches the other's pods through it.
    if net.routed {
        lab.lb()
            .ip(&[
                "route",
                "add",
                "198.18.8.0/24",
                "via",
                &node_b.addr.to_string(),
            ])
            .unwrap();
        node_b
            .ns
            .ip(&[
                "route",
                "add",
                "198.18.7.0/24",
                "via",
                &lab.lb_addr().to_string(),
            ])
            .unwrap();
    }
    lab.client()
        .exec(&["ethtool", "-K", "eth0", "tx", "off"])
        .unwrap();
    let _servers = [&pod_a, &pod_b]
        .map(|p| EchoServer::start(&p.ns, &p.name, SocketAddr::new(p.addr.into(), 8080)).unwrap());

    // The API server on node-a's own address, so node-b's agent reaches it too.
    let listener = listen(lab.lb(), SocketAddr::new(lab.lb_addr().into(), 0));
    let lists: Vec<(Kind, PathBuf)> = [
        (Kind::Service, "pods/services.json"),
        (Kind::EndpointSlice, "pods/endpointslices.json"),
        // The nodes' real addresses: each accepts tunnels only from the Nodes' InternalIPs.
        (Kind::Node, "pods/nodes.json"),
        (Kind::ConfigMap, "watch/configmaps.json"),
    ]
    .into_iter()
    .map(|(k, rel)| (k, fixture(rel)))
    .collect();
    let refs: Vec<(Kind, &Path)> = lists.iter().map(|(k, p)| (*k, p.as_path())).collect();
    let server = FakeApiServer::start(listener, &refs);
    // This test's settings alone (the fixture's ConfigMap is for the tests whose backends
    // are hosts of the lab's segment, reached at their own addresses).
    let text = format!("{}interface: eth0\n", net.config);
    server.apply(Kind::ConfigMap, config_map(&server, &text));
    if net.fragments {
        let list: Value =
            serde_json::from_str(&fs::read_to_string(fixture("pods/services.json")).unwrap())
                .unwrap();
        let mut svc = list["items"][0].clone();
        svc["metadata"]["annotations"] = json!({"xdp-lb.io/fragments": "echo-udp"});
        server.apply(Kind::Service, svc);
    }
    let forwarding = net.forwarding;
    let (dirs_a, dirs_b) = (Dirs::new(), Dirs::new());
    let kubeconfig = dirs_a.kubeconfig(&server);
    let announce = dirs_a.work.0.join("announce.json");
    let announce_arg = announce.to_str().unwrap();
    let mut agent_a = Agent::start_on(
        lab.lb(),
        "node-a",
        &dirs_a,
        &kubeconfig,
        "node-a",
        &["--announce-file", announce_arg],
    );
    let mut agent_b = Agent::start_on(&node_b.ns, "node-b", &dirs_b, &kubeconfig, "node-b", &[]);
    let pods = vec!["198.18.7.11".to_string(), "198.18.8.11".to_string()];
    for (agent, dirs) in [(&mut agent_a, &dirs_a), (&mut agent_b, &dirs_b)] {
        agent.wait(WAIT, "egress translation is attached", |a| {
            a.log().contains("egress translation attached")
        });
        agent.wait(WAIT, "both pods are backends", |_| {
            status(&dirs.pins.0).is_some_and(|s| {
                backends(&s, UDP_SERVICE).as_ref() == Some(&pods)
                    && backends(&s, TCP_SERVICE).as_ref() == Some(&pods)
            })
        });
    }

    let vip = SocketAddr::new(VIP.into(), PORT);
    let udp = udp_flows(lab.client(), vip, 60, REPLY_TIMEOUT).unwrap();
    let tcp = tcp_connections(lab.client(), vip, 16, REPLY_TIMEOUT).unwrap();
    let d = Distribution::new(&udp, &tcp, vip, IpAddr::V4(lab.client_addr()));
    let logs = || format!("node-a:\n{}\nnode-b:\n{}", agent_a.log(), agent_b.log());
    assert_eq!(
        d.timeouts(),
        0,
        "every flow answered:\n{}\n{}",
        d.table(),
        logs()
    );
    assert!(
        d.all_from_vip && d.all_saw_client_ip && d.all_saw_client_port,
        "replies from VIP:7000, pods saw the client's address and port:\n{}",
        d.table()
    );
    let hit: BTreeSet<&str> = d.per_backend.keys().map(String::as_str).collect();
    assert_eq!(hit, BTreeSet::from(["pod-a", "pod-b"]), "{}", d.table());

    // Where it happened: node-a kept its pod's packets on the node, node-b translated the
    // tunnelled ones, both restored replies.
    let (pins_a, pins_b) = (&dirs_a.pins.0, &dirs_b.pins.0);
    assert!(reason_count(pins_a, "local_backend") > 0, "{}", logs());
    assert!(reason_count(pins_a, net.tx) > 0, "{}", logs());
    for pins in [pins_a, pins_b] {
        let s = status(pins).unwrap();
        assert_eq!(s["services"][0]["forwarding"], forwarding, "{s}");
        let udp = service(&s, UDP_SERVICE).unwrap();
        assert_eq!(udp["fragments"], net.fragments, "{s}");
        assert_eq!(service(&s, TCP_SERVICE).unwrap()["fragments"], false, "{s}");
        assert_eq!(s["gue_port"], net.gue_port, "{s}");
    }
    assert!(reason_count(pins_a, "decap_dnat") > 0);
    assert!(reason_count(pins_a, "egress_revnat") > 0);
    assert!(reason_count(pins_b, "decap_dnat") > 0);
    assert!(reason_count(pins_b, "egress_revnat") > 0);
    assert_eq!(reason_count(pins_b, "local_backend"), 0);
    check_fragments(&lab, &net, [pins_a, pins_b], &logs);
    check_path_mtu(&lab, pins_a, &logs);
    // Two balancing nodes agree: the same 5-tuples reach the same pods through either
    // node, as `lb-agent trace` on each predicts and real traffic shows.
    let ports: Vec<u16> = (41000..41048).collect();
    let through = |what: &str| -> BTreeMap<u16, String> {
        ports
            .iter()
            .map(|&port| {
                let r = udp_flow_from_port(lab.client(), vip, port, REPLY_TIMEOUT).unwrap();
                let backend = r
                    .backend
                    .unwrap_or_else(|| panic!("port {port} via {what}: no reply\n{}", logs()));
                (port, backend)
            })
            .collect()
    };
    let via_a = through("node-a");
    let tx_b = reason_count(pins_b, net.tx);
    let local_b = reason_count(pins_b, "local_backend");
    lab.client()
        .ip(&[
            "route",
            "replace",
            &format!("{VIP}/32"),
            "via",
            &node_b.addr.to_string(),
        ])
        .unwrap();
    let via_b = through("node-b");
    assert_eq!(
        via_a, via_b,
        "the same 5-tuples, the same pods through either node"
    );
    let used: BTreeSet<&str> = via_a.values().map(String::as_str).collect();
    assert_eq!(used, BTreeSet::from(["pod-a", "pod-b"]), "{via_a:?}");
    // node-b really balanced them: it tunnelled pod-a's share and kept pod-b's.
    let to_a = via_a.values().filter(|b| *b == "pod-a").count() as u64;
    let to_b = via_a.len() as u64 - to_a;
    assert!(reason_count(pins_b, net.tx) >= tx_b + to_a);
    assert!(reason_count(pins_b, "local_backend") >= local_b + to_b);
    // And both nodes' live programs choose alike for fresh 5-tuples of both protocols.
    let trace = |pins: &Path, proto: &str, port: u16| -> String {
        let out = std::process::Command::new(agent_bin())
            .args(["trace", "--proto", proto, "--json", "--pin-path"])
            .arg(pins)
            .args(["--src", &format!("{}:{port}", lab.client_addr())])
            .args(["--dst", &vip.to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Value = serde_json::from_slice(&out.stdout).unwrap();
        report["maglev_choice"]["address"]
            .as_str()
            .unwrap_or_else(|| panic!("no Maglev choice: {report}"))
            .to_string()
    };
    // (Each trace loads the program once: a few ports, in one of the variants.)
    if net.config.is_empty() {
        for port in [42000, 42101, 42202, 42303, 42404, 42505] {
            for proto in ["udp", "tcp"] {
                let a = trace(pins_a, proto, port);
                assert_eq!(a, trace(pins_b, proto, port), "{proto} from port {port}");
                assert!(pods.contains(&a), "{a}");
            }
        }
    }

    // What node-a tells its routing daemon: the VIP, equal weight (Cluster policy).
    let file: Value = serde_json::from_str(&fs::read_to_string(&announce).unwrap()).unwrap();
    assert_eq!(
        file,
        json!({"node": "node-a", "vips": [{"address": "198.18.0.100", "weight": 1}]})
    );
    agent_a.stop();
    agent_b.stop();
}

/// Fragments to the pods, end to end: the client's route to the VIP fragments at 1400 bytes
/// (room for the LB's tunnel header on every fragment), and each of several client
/// addresses (fragments are balanced on addresses, so one address reaches one pod) sends a
/// 3000-byte datagram asking for a 3000-byte answer, which the pod sends in 1500-byte
/// fragments. With the annotation every answer comes back whole from VIP:7000 and names
/// the client's address, from both pods; node-b translated the fragments of its pod's
/// requests (three each) and restored its replies' (three each). Without it, node-a drops
/// every fragment (three per datagram) and nothing is answered.
fn check_fragments(
    lab: &Lab,
    net: &PodNet,
    [pins_a, pins_b]: [&Path; 2],
    logs: &dyn Fn() -> String,
) {
    let vip = SocketAddr::new(VIP.into(), PORT);
    let clients: Vec<Ipv4Addr> = (200..if net.fragments { 216 } else { 204 })
        .map(|o| Ipv4Addr::new(198, 18, 0, o))
        .collect();
    for a in &clients {
        lab.client()
            .ip(&["addr", "add", &format!("{a}/24"), "dev", "eth0"])
            .unwrap();
    }
    let route = |extra: &[&str]| {
        let (dst, via) = (format!("{VIP}/32"), lab.lb_addr().to_string());
        let mut args = vec!["route", "replace", dst.as_str(), "via", via.as_str()];
        args.extend_from_slice(extra);
        lab.client().ip(&args).unwrap();
    };
    route(&["mtu", "1400"]);
    let before = |pins: &Path| {
        ["drop_fragment", "decap_dnat", "egress_revnat"].map(|r| reason_count(pins, r))
    };
    let (a0, b0) = (before(pins_a), before(pins_b));
    let timeout = if net.fragments {
        REPLY_TIMEOUT
    } else {
        Duration::from_millis(500)
    };
    let request = large_request(3000, 3000);
    let mut per_pod: BTreeMap<String, u64> = BTreeMap::new();
    for a in &clients {
        let got = udp_exchange(
            lab.client(),
            SocketAddr::new((*a).into(), 0),
            vip,
            &request,
            timeout,
        )
        .unwrap();
        if !net.fragments {
            assert!(
                got.is_none(),
                "from {a}: fragments are dropped, yet {got:?}"
            );
            continue;
        }
        let (reply, from) = got.unwrap_or_else(|| panic!("from {a}: no answer\n{}", logs()));
        assert_eq!(from, vip, "from {a}");
        assert_eq!(reply.len(), 3000, "from {a}: the whole answer");
        let (backend, seen) = lb_testkit::client::parse_reply(&String::from_utf8_lossy(&reply));
        assert_eq!(seen.map(|s| s.ip()), Some(IpAddr::V4(*a)), "from {a}");
        *per_pod.entry(backend.unwrap_or_default()).or_default() += 1;
    }
    let (a1, b1) = (before(pins_a), before(pins_b));
    if net.fragments {
        let pods: BTreeSet<&str> = per_pod.keys().map(String::as_str).collect();
        assert_eq!(pods, BTreeSet::from(["pod-a", "pod-b"]), "{per_pod:?}");
        assert_eq!(a1[0], a0[0], "node-a dropped no fragment");
        let to_b = per_pod["pod-b"];
        assert!(
            b1[1] >= b0[1] + 3 * to_b,
            "node-b translated {to_b} datagrams' fragments"
        );
        assert!(
            b1[2] >= b0[2] + 3 * to_b,
            "node-b restored {to_b} replies' fragments"
        );
    } else {
        assert_eq!(
            a1[0],
            a0[0] + 3 * clients.len() as u64,
            "node-a dropped every fragment"
        );
    }
    route(&[]);
    for a in &clients {
        lab.client()
            .ip(&["addr", "del", &format!("{a}/24"), "dev", "eth0"])
            .unwrap();
    }
}

/// Path MTU to the pods, end to end through a real router: a client behind a router whose
/// link to it has an MTU of 1300 asks, from 8 source ports, for 1450-byte answers. A pod's
/// first answer (VIP:7000, DF set) is too big for that link: the router drops it and sends
/// "fragmentation needed" to the VIP, which reaches node-a; node-a sends it on to the pod of
/// the quoted flow, and the pod's node translates it (to the pod, quoting pod:8080), so the
/// pod lowers its path MTU to the client. Its next answer leaves in 1300-byte fragments,
/// restored to VIP:7000 fragment by fragment. Every port is answered whole within five
/// tries, by both pods between them. Without the translation no answer would ever arrive.
fn check_path_mtu(lab: &Lab, pins_a: &Path, logs: &dyn Fn() -> String) {
    let router = NetNs::new("lbtrt").unwrap();
    let far = NetNs::new("lbtfar").unwrap();
    let router_addr = Ipv4Addr::new(198, 18, 0, 250);
    lb_testkit::lab::attach_host(lab.bridge_ns(), &router, "rt0", router_addr).unwrap();
    lb_testkit::lab::wait_ports_forwarding(lab.bridge_ns(), &["rt0"]).unwrap();
    router
        .ip(&[
            "link",
            "add",
            "far0",
            "mtu",
            "1300",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "mtu",
            "1300",
            "netns",
            far.name(),
        ])
        .unwrap();
    router
        .ip(&["addr", "add", "198.18.9.1/24", "dev", "far0"])
        .unwrap();
    router.ip(&["link", "set", "far0", "up"]).unwrap();
    router.sysctl("net.ipv4.ip_forward", "1").unwrap();
    // Every "fragmentation needed" goes out (by default one per second per destination).
    router.sysctl("net.ipv4.icmp_ratelimit", "0").unwrap();
    router
        .ip(&[
            "route",
            "add",
            &format!("{VIP}/32"),
            "via",
            &lab.lb_addr().to_string(),
        ])
        .unwrap();
    far.ip(&["addr", "add", "198.18.9.2/24", "dev", "eth0"])
        .unwrap();
    far.ip(&["link", "set", "eth0", "up"]).unwrap();
    far.ip(&["route", "add", "default", "via", "198.18.9.1"])
        .unwrap();
    // The pods' answers leave through their nodes.
    for node in [lab.lb(), &lab.backends()[0].ns] {
        node.ip(&[
            "route",
            "add",
            "198.18.9.0/24",
            "via",
            &router_addr.to_string(),
        ])
        .unwrap();
    }
    let icmp_before = reason_count(pins_a, "icmp_to_backend");
    let vip = SocketAddr::new(VIP.into(), PORT);
    let request = large_request(64, 1450);
    let mut per_pod: BTreeMap<String, u64> = BTreeMap::new();
    let mut tries = 0;
    for port in 45000..45008u16 {
        let src = SocketAddr::new(Ipv4Addr::new(198, 18, 9, 2).into(), port);
        let answer = (0..5).find_map(|_| {
            tries += 1;
            udp_exchange(&far, src, vip, &request, Duration::from_secs(1)).unwrap()
        });
        let (reply, from) =
            answer.unwrap_or_else(|| panic!("port {port}: never answered whole\n{}", logs()));
        assert_eq!(from, vip, "port {port}");
        assert_eq!(reply.len(), 1450, "port {port}");
        let (backend, _) = lb_testkit::client::parse_reply(&String::from_utf8_lossy(&reply));
        *per_pod.entry(backend.unwrap_or_default()).or_default() += 1;
    }
    let icmp = reason_count(pins_a, "icmp_to_backend") - icmp_before;
    println!(
        "path MTU: 8 ports answered whole in {tries} tries, by {per_pod:?}; node-a passed {icmp} ICMP errors on"
    );
    let pods: BTreeSet<&str> = per_pod.keys().map(String::as_str).collect();
    assert_eq!(pods, BTreeSet::from(["pod-a", "pod-b"]), "{per_pod:?}");
    // Each pod's first answer was lost to the router, the rest came through.
    assert!(
        tries >= 8 + 2,
        "{tries} tries: the router's MTU was never hit"
    );
    assert!(
        icmp >= 2,
        "node-a passed the router's errors on to the pods\n{}",
        logs()
    );
}

/// The GUE port when the ConfigMap sets none.
const DEFAULT_GUE: u16 = lb_common::DEFAULT_GUE_PORT;

/// 30 TCP connections to the VIP, each with the backend it reached.
fn open_sessions(lab: &Lab, vip: SocketAddr) -> Vec<(lb_testkit::TcpSession, String)> {
    lb_testkit::TcpSession::open_many(lab.client(), vip, 30, REPLY_TIMEOUT).unwrap()
}

/// The API server is gone for a minute under traffic and comes back with its history
/// compacted (the watches get 410 Expired and re-list): no UDP flow is lost and no
/// connection moves during the outage, the maps do not change, and afterwards only the
/// difference the cluster made meanwhile (one endpoint gone) is written.
#[test]
fn a_minute_without_the_api_server_and_a_compacted_history_lose_no_flow() {
    require_root().unwrap();
    let lab = Lab::new(LabSpec::default()).unwrap();
    let dirs = Dirs::new();
    let _backends = start_backends(&lab, &dirs.work.0);
    let server = start_server(lab.lb(), &ALL_LISTS);
    let kubeconfig = dirs.kubeconfig(&server);
    let pins = dirs.pins.0.clone();
    let mut agent = Agent::start(lab.lb(), &dirs, &kubeconfig, "agent", &[]);
    agent.wait(WAIT, "the listed endpoints are programmed", |_| {
        echo_backends_are(&pins, &[11, 12, 13])
    });
    // The program is attached after the initial sync.
    agent.wait(WAIT, "the program is attached", |a| {
        a.log().contains("load balancer attached")
    });
    wait_watching(&server);
    let vip = SocketAddr::new(VIP.into(), PORT);
    let mut sessions = open_sessions(&lab, vip);
    let before = maps(&pins);
    let lists_before = count_lists(&server, "/apis/discovery.k8s.io/v1/endpointslices");

    let stop = std::sync::atomic::AtomicBool::new(false);
    let (sent, lost) = thread::scope(|s| {
        let traffic = s.spawn(|| {
            let (mut sent, mut lost) = (0usize, 0usize);
            let deadline = Instant::now() + Duration::from_secs(240);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
                let replies = udp_flows(lab.client(), vip, 10, REPLY_TIMEOUT).unwrap();
                sent += replies.len();
                lost += replies.iter().filter(|r| !r.answered()).count();
                thread::sleep(Duration::from_millis(20));
            }
            (sent, lost)
        });

        server.cut();
        agent.wait(WAIT, "the watchers notice the outage", |a| {
            a.log().contains("watch failed")
        });
        // Meanwhile the cluster changes, and its history is compacted.
        server.apply(Kind::EndpointSlice, slice_with(&server, 13, None));
        server.compact();
        let outage = Instant::now();
        while outage.elapsed() < Duration::from_secs(60) {
            assert_eq!(maps(&pins), before, "the maps changed during the outage");
            thread::sleep(Duration::from_secs(1));
        }
        for (s, b) in &mut sessions {
            assert_eq!(
                &s.request().unwrap(),
                b,
                "a connection moved during the outage"
            );
        }
        // The echo servers close connections after two minutes: fresh ones for the re-list.
        sessions = open_sessions(&lab, vip);

        server.resume(listen(lab.lb(), server.addr()));
        // kube's backoff has grown during the minute of failures (up to 30 s, jittered).
        agent.wait(3 * WAIT, "the re-listed state is applied", |_| {
            echo_backends_are(&pins, &[11, 12])
        });
        thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        traffic.join().unwrap()
    });
    println!("UDP flows through the outage: {sent} sent, {lost} lost");
    assert!(sent >= 500, "traffic kept flowing: {sent} flows");
    assert_eq!(lost, 0, "{lost} of {sent} UDP flows lost");
    assert!(
        count_lists(&server, "/apis/discovery.k8s.io/v1/endpointslices") > lists_before,
        "the EndpointSlices were re-listed after 410: {:#?}",
        server.requests()
    );
    // Connections to the endpoints that stayed keep their backend (b3's left the table).
    for (s, b) in sessions.iter_mut().filter(|(_, b)| b != "b3") {
        assert_eq!(
            &s.request().unwrap(),
            b,
            "a connection moved after the re-list"
        );
    }
    let log = agent.log();
    assert!(
        !log.lines().any(|l| l.contains("service removed")),
        "a re-list must not flush:\n{log}"
    );
    let applied: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("cluster change applied"))
        .collect();
    let last = applied.last().expect("the re-list was applied");
    println!("after the re-list: {last}");
    check_traffic(&lab, &["b1", "b2"]);
    let exit = agent.stop();
    assert!(exit.success(), "agent exit: {exit}\n{}", agent.log());
}
