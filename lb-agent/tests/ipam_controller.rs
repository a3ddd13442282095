//! The IPAM controller end to end, without a cluster: real controller instances
//! ([`IpamController`], as `lb-agent run --kubernetes` starts it) talking through the real
//! kube-rs client to the fake API server (`fake_apiserver`), which serves IPAddressPools,
//! Services and the ConfigMap in the API server's wire format and takes the writes with its
//! semantics: Lease create/replace with `409` on a stale resource version, merge patches on
//! `services/NAME/status` and `ipaddresspools/NAME/status`, Event creation and patches.
//!
//! Every "agent" is one controller on its own thread and tokio runtime inside a network
//! namespace the test creates, or, where a test pauses it with SIGSTOP, in a child process
//! (this test binary run again as [`child_agent`]); its client adds an `x-test-agent` header
//! to every request, so the test can tell who wrote what. The fake server listens on 127.0.0.1 in that namespace.
//! Lease timing is shortened (3 s duration, 250 ms renewal). Needs root (network namespaces).
//! Every wait is bounded.

mod fake_apiserver;

use std::{
    net::{SocketAddr, TcpListener},
    process::Stdio,
    sync::mpsc,
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use fake_apiserver::{FakeApiServer, Kind, Write};
use lb_agent::ipam::{IpamController, IpamOptions, LeaseSettings, controller::RETRY};
use lb_testkit::{ChildGuard, NetNs, require_root};
use serde_json::{Value, json};

const NAMESPACE: &str = "lb-system";
const LEASE: &str = "xdp-lb-ipam";
const AGENT_HEADER: &str = "x-test-agent";
/// Bound on every wait for the controllers.
const WAIT: Duration = Duration::from_secs(20);
const LEASE_DURATION: Duration = Duration::from_secs(3);
const RENEW: Duration = Duration::from_millis(250);

/// A namespace with the fake API server on its loopback.
struct Cluster {
    ns: NetNs,
    server: FakeApiServer,
}

impl Cluster {
    fn new() -> Cluster {
        require_root().unwrap();
        let ns = NetNs::new("lbti").unwrap();
        let listener = ns
            .enter(|| TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))))
            .unwrap()
            .unwrap();
        let server = FakeApiServer::start(listener, &[]);
        Cluster { ns, server }
    }

    fn agent(&self, name: &str) -> Agent {
        Agent::start(&self.ns, &self.server.url(), name)
    }

    fn ingress(&self, namespace: &str, name: &str) -> Vec<String> {
        let svc = self
            .server
            .get(Kind::Service, namespace, name)
            .unwrap_or_else(|| panic!("no Service {namespace}/{name}"));
        svc["status"]["loadBalancer"]["ingress"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i["ip"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Events about `name` with this reason.
    fn events(&self, name: &str, reason: &str) -> Vec<Value> {
        self.server
            .list(Kind::Event)
            .into_iter()
            .filter(|e| e["regarding"]["name"] == name && e["reason"] == reason)
            .collect()
    }

    /// Accepted status writes on Services, in order.
    fn status_writes(&self) -> Vec<Write> {
        self.server
            .writes()
            .into_iter()
            .filter(|w| {
                w.kind == Kind::Service
                    && w.subresource.as_deref() == Some("status")
                    && w.code == 200
            })
            .collect()
    }

    fn lease_holder(&self) -> Option<String> {
        let lease = self.server.get(Kind::Lease, NAMESPACE, LEASE)?;
        lease["spec"]["holderIdentity"].as_str().map(String::from)
    }

    /// Wait (at most [`WAIT`]) until `done`.
    fn wait(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + WAIT;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "timed out ({WAIT:?}) waiting until {what}; writes:\n{}",
                self.write_log()
            );
            thread::sleep(Duration::from_millis(25));
        }
    }

    fn write_log(&self) -> String {
        self.server
            .writes()
            .iter()
            .map(|w| {
                format!(
                    "{} {:?} {}/{} {:?} by {:?}: {} {}",
                    w.method,
                    w.kind,
                    w.namespace,
                    w.name,
                    w.subresource,
                    w.header(AGENT_HEADER),
                    w.code,
                    w.body
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// How an agent stops.
enum Stop {
    /// `IpamController::shutdown`: the Lease is released.
    Clean,
    /// The controller is dropped mid-flight, as a crash would leave it: the Lease expires.
    Crash,
}

/// One controller on its own thread and runtime inside the namespace.
struct Agent {
    stop: Option<mpsc::Sender<Stop>>,
    thread: Option<JoinHandle<()>>,
}

impl Agent {
    fn start(ns: &NetNs, url: &str, name: &str) -> Agent {
        let (tx, rx) = mpsc::channel::<Stop>();
        let url = url.to_string();
        let identity = name.to_string();
        let thread = ns
            .spawn_thread(&format!("agent-{name}"), move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let controller = spawn_controller(&url, &identity);
                    // The std channel is polled so the runtime keeps driving the controller.
                    let stop = loop {
                        match rx.try_recv() {
                            Ok(stop) => break stop,
                            Err(mpsc::TryRecvError::Empty) => {
                                tokio::time::sleep(Duration::from_millis(10)).await
                            }
                            Err(mpsc::TryRecvError::Disconnected) => break Stop::Crash,
                        }
                    };
                    match stop {
                        Stop::Clean => controller.shutdown().await,
                        Stop::Crash => drop(controller),
                    }
                });
            })
            .unwrap();
        Agent {
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    fn stop(&mut self, how: Stop) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(how);
        }
        if let Some(thread) = self.thread.take() {
            thread.join().expect("agent thread");
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop(Stop::Crash);
    }
}

/// Start a controller for `identity` against `url` with the tests' Lease timing (inside a
/// tokio runtime).
fn spawn_controller(url: &str, identity: &str) -> IpamController {
    let mut config = kube::Config::new(url.parse().expect("server URL"));
    config.headers.push((
        AGENT_HEADER.parse().expect("header name"),
        identity.parse().expect("header value"),
    ));
    let client = kube::Client::try_from(config).expect("client");
    let mut lease = LeaseSettings::new(NAMESPACE, LEASE, identity);
    lease.duration = LEASE_DURATION;
    lease.renew_interval = RENEW;
    lease.renew_deadline = LEASE_DURATION * 2 / 3;
    IpamController::spawn(
        client,
        IpamOptions {
            namespace: NAMESPACE.into(),
            config_map: "lb-agent".into(),
            lease,
        },
    )
}

/// The child process's environment: the server URL and the agent's identity.
const CHILD_URL: &str = "LB_TEST_IPAM_CHILD_URL";
const CHILD_NAME: &str = "LB_TEST_IPAM_CHILD_NAME";
/// A child agent exits by itself after this long, should its test not kill it.
const CHILD_LIFETIME: Duration = Duration::from_secs(120);

/// One controller in a child process inside the namespace, so that it can be paused.
/// Dropping it continues and kills it.
struct ProcessAgent {
    child: Option<ChildGuard>,
}

impl ProcessAgent {
    fn start(ns: &NetNs, url: &str, name: &str) -> ProcessAgent {
        let exe = std::env::current_exe().expect("test binary path");
        let mut cmd = ns.command(exe);
        cmd.args(["child_agent", "--exact", "--ignored", "--nocapture"])
            .env(CHILD_URL, url)
            .env(CHILD_NAME, name)
            .stdin(Stdio::null())
            // The harness's own lines; the controller logs nothing without a subscriber.
            .stdout(Stdio::null());
        ProcessAgent {
            child: Some(ChildGuard::spawn(&mut cmd).expect("child agent")),
        }
    }

    /// `kill -SIG pid`.
    fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().map_or(0, ChildGuard::id).to_string();
        lb_testkit::netns::run("kill", &[&format!("-{sig}"), &pid]).expect("kill");
    }
}

impl Drop for ProcessAgent {
    fn drop(&mut self) {
        // A stopped process would take SIGTERM only once continued.
        self.signal("CONT");
        drop(self.child.take());
    }
}

/// Not a test of its own: the body of [`ProcessAgent`]'s child process.
#[test]
#[ignore = "the agent process that a_leader_paused_past_its_lease_writes_nothing_stale starts"]
fn child_agent() {
    let (Ok(url), Ok(identity)) = (std::env::var(CHILD_URL), std::env::var(CHILD_NAME)) else {
        panic!("only run as the child of a_leader_paused_past_its_lease_writes_nothing_stale");
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let _controller = spawn_controller(&url, &identity);
        tokio::time::sleep(CHILD_LIFETIME).await;
    });
}

/// Twelve hex digits from a name, for uids.
fn hex12(name: &str) -> String {
    let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{hex:0>12}")[..12].to_string()
}

/// An `IPAddressPool` as `kubectl get -o json` shows it.
fn pool(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "xdp-lb.io/v1alpha1",
        "kind": "IPAddressPool",
        "metadata": {
            "name": name,
            "uid": format!("5b0e6a4e-0000-4000-8000-{}", hex12(name)),
            "generation": 1,
            "creationTimestamp": "2025-05-01T08:00:00Z"
        },
        "spec": spec
    })
}

/// A Service in namespace `web` as the API server returns it, created `minute` minutes after
/// 09:00; `edit` adjusts it.
fn service(name: &str, minute: u32, edit: impl FnOnce(&mut Value)) -> Value {
    let mut svc = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": "web",
            "uid": format!("8c1f2d3e-{minute:04}-4a5b-9c6d-{}", hex12(name)),
            "creationTimestamp": format!("2025-05-02T09:{minute:02}:00Z"),
            "labels": {"app.kubernetes.io/name": name}
        },
        "spec": {
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 80, "nodePort": 30080}],
            "selector": {"app.kubernetes.io/name": name},
            "clusterIP": "198.19.0.10",
            "clusterIPs": ["198.19.0.10"],
            "type": "LoadBalancer",
            "sessionAffinity": "None",
            "externalTrafficPolicy": "Cluster",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "allocateLoadBalancerNodePorts": true,
            "internalTrafficPolicy": "Cluster"
        },
        "status": {"loadBalancer": {}}
    });
    edit(&mut svc);
    svc
}

fn pending(name: &str, minute: u32) -> Value {
    service(name, minute, |_| {})
}

fn by(w: &Write) -> &str {
    w.header(AGENT_HEADER).unwrap_or("?")
}

#[test]
fn a_pending_service_gets_an_address_in_its_status_and_an_event() {
    let c = Cluster::new();
    c.server.apply(
        Kind::IpAddressPool,
        pool(
            "public",
            json!({"addresses": ["198.18.100.0/30"], "ipv6": ["2001:db8:100::/126"]}),
        ),
    );
    c.server.apply(Kind::Service, pending("shop", 1));
    c.server.apply(
        Kind::Service,
        service("dual", 2, |s| {
            s["spec"]["ipFamilies"] = json!(["IPv6", "IPv4"]);
            s["spec"]["ipFamilyPolicy"] = json!("RequireDualStack");
        }),
    );
    // Not ours: a ClusterIP Service and a LoadBalancer of another class.
    c.server.apply(
        Kind::Service,
        service("internal", 3, |s| {
            s["spec"]["type"] = json!("ClusterIP");
        }),
    );
    c.server.apply(
        Kind::Service,
        service("elsewhere", 4, |s| {
            s["spec"]["loadBalancerClass"] = json!("example.com/other");
        }),
    );
    let _a = c.agent("agent-a");

    c.wait("shop and dual have addresses", || {
        c.ingress("web", "shop") == ["198.18.100.0"]
            && c.ingress("web", "dual") == ["2001:db8:100::", "198.18.100.1"]
    });
    let shop = c.server.get(Kind::Service, "web", "shop").unwrap();
    assert_eq!(
        shop["status"]["loadBalancer"]["ingress"],
        json!([{"ip": "198.18.100.0", "ipMode": "VIP"}])
    );
    let writes = c.status_writes();
    let shop_write = writes.iter().find(|w| w.name == "shop").unwrap();
    assert_eq!(shop_write.method, "PATCH");
    assert_eq!(
        shop_write.header("content-type"),
        Some("application/merge-patch+json")
    );
    assert_eq!(by(shop_write), "agent-a");

    c.wait("the IPAllocated Events are published", || {
        !c.events("shop", "IPAllocated").is_empty() && !c.events("dual", "IPAllocated").is_empty()
    });
    let ev = &c.events("shop", "IPAllocated")[0];
    assert_eq!(ev["type"], "Normal");
    assert_eq!(ev["note"], "Assigned IP [198.18.100.0] from pool public");
    assert_eq!(ev["regarding"]["kind"], "Service");
    assert_eq!(ev["regarding"]["uid"], shop["metadata"]["uid"]);
    assert_eq!(ev["metadata"]["namespace"], "web");
    assert_eq!(ev["reportingController"], "xdp-lb.io/lb-agent");
    assert_eq!(ev["reportingInstance"], "agent-a");
    assert_eq!(
        c.events("dual", "IPAllocated")[0]["note"],
        "Assigned IP [2001:db8:100::, 198.18.100.1] from pool public"
    );

    // The pool says it is valid; the lease names the writer.
    c.wait("the pool condition is written", || {
        c.server
            .get(Kind::IpAddressPool, "", "public")
            .is_some_and(|p| p["status"]["conditions"][0]["status"] == "True")
    });
    let cond = &c.server.get(Kind::IpAddressPool, "", "public").unwrap()["status"]["conditions"][0];
    assert_eq!(cond["type"], "Valid");
    assert_eq!(cond["observedGeneration"], 1);
    assert_eq!(c.lease_holder().as_deref(), Some("agent-a"));

    // Nothing is written for Services that are not ours, and nothing twice.
    thread::sleep(RENEW * 4);
    let writes = c.status_writes();
    let names: Vec<&str> = writes.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names.contains(&"shop") && names.contains(&"dual"),
        "{names:?}"
    );
    assert!(c.ingress("web", "internal").is_empty());
    assert!(c.ingress("web", "elsewhere").is_empty());
    assert!(c.events("elsewhere", "AllocationFailed").is_empty());
}

#[test]
fn an_exhausted_pool_gives_a_warning_event_and_no_address() {
    let c = Cluster::new();
    c.server.apply(
        Kind::IpAddressPool,
        pool("tiny", json!({"addresses": ["198.18.101.0/32"]})),
    );
    c.server.apply(Kind::Service, pending("first", 1));
    c.server.apply(Kind::Service, pending("second", 2));
    let _a = c.agent("agent-a");

    c.wait("the older Service gets the only address", || {
        c.ingress("web", "first") == ["198.18.101.0"]
    });
    c.wait("the other one gets a Warning", || {
        !c.events("second", "AllocationFailed").is_empty()
    });
    let ev = &c.events("second", "AllocationFailed")[0];
    assert_eq!(ev["type"], "Warning");
    assert_eq!(
        ev["note"],
        "cannot allocate an address: no free IPv4 address left in pool tiny"
    );
    assert!(c.ingress("web", "second").is_empty());
    assert!(
        !c.status_writes().iter().any(|w| w.name == "second"),
        "{}",
        c.write_log()
    );

    // Unrelated changes do not repeat the Warning.
    let mut second = c.server.get(Kind::Service, "web", "second").unwrap();
    second["metadata"]["labels"]["tier"] = json!("edge");
    c.server.apply(Kind::Service, second);
    c.server.apply(Kind::Service, pending("third", 3));
    c.wait("the third Service is reported too", || {
        !c.events("third", "AllocationFailed").is_empty()
    });
    thread::sleep(RENEW * 4);
    assert_eq!(c.events("second", "AllocationFailed").len(), 1);
    assert!(c.events("second", "AllocationFailed")[0]["series"].is_null());
}

#[test]
fn deleting_a_service_frees_its_address_for_the_next_one() {
    let c = Cluster::new();
    c.server.apply(
        Kind::IpAddressPool,
        pool("tiny", json!({"addresses": ["198.18.102.7-198.18.102.7"]})),
    );
    c.server.apply(Kind::Service, pending("old", 1));
    c.server.apply(Kind::Service, pending("waiting", 2));
    let _a = c.agent("agent-a");
    c.wait("old holds the address", || {
        c.ingress("web", "old") == ["198.18.102.7"]
    });
    c.wait("waiting is told the pool is full", || {
        !c.events("waiting", "AllocationFailed").is_empty()
    });

    c.server.delete(Kind::Service, "web", "old");
    c.wait("the waiting Service gets the freed address", || {
        c.ingress("web", "waiting") == ["198.18.102.7"]
    });
    c.wait("its IPAllocated Event is published", || {
        c.events("waiting", "IPAllocated").len() == 1
    });

    // A Service that stops being a LoadBalancer gives its address back too, and loses it
    // from its status.
    let mut waiting = c.server.get(Kind::Service, "web", "waiting").unwrap();
    waiting["spec"]["type"] = json!("ClusterIP");
    c.server.apply(Kind::Service, waiting);
    c.server.apply(Kind::Service, pending("next", 3));
    c.wait("the next Service gets it", || {
        c.ingress("web", "next") == ["198.18.102.7"] && c.ingress("web", "waiting").is_empty()
    });
    c.wait("the release is reported", || {
        !c.events("waiting", "IPReleased").is_empty()
    });
    assert_eq!(
        c.events("waiting", "IPReleased")[0]["note"],
        "Released IP [198.18.102.7]: it is no longer of type LoadBalancer"
    );
}

#[test]
fn an_invalid_pool_is_reported_and_a_valid_pool_still_serves() {
    let c = Cluster::new();
    // Host bits set.
    c.server.apply(
        Kind::IpAddressPool,
        pool("broken", json!({"addresses": ["198.18.103.1/24"]})),
    );
    c.server.apply(
        Kind::IpAddressPool,
        pool("good", json!({"addresses": ["198.18.104.0/30"]})),
    );
    // Overlaps "good", which sorts first.
    c.server.apply(
        Kind::IpAddressPool,
        pool("shadow", json!({"addresses": ["198.18.104.2/31"]})),
    );
    c.server.apply(Kind::Service, pending("app", 1));
    c.server.apply(
        Kind::Service,
        service("picky", 2, |s| {
            s["metadata"]["annotations"] = json!({"metallb.universe.tf/address-pool": "broken"});
        }),
    );
    let _a = c.agent("agent-a");

    c.wait("the valid pool serves", || {
        c.ingress("web", "app") == ["198.18.104.0"]
    });
    c.wait("both invalid pools are reported", || {
        !c.events("broken", "InvalidPool").is_empty()
            && !c.events("shadow", "InvalidPool").is_empty()
    });
    let ev = &c.events("broken", "InvalidPool")[0];
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["regarding"]["kind"], "IPAddressPool");
    assert_eq!(ev["regarding"]["apiVersion"], "xdp-lb.io/v1alpha1");
    assert_eq!(ev["metadata"]["namespace"], "default");
    assert_eq!(
        ev["note"],
        "addresses: \"198.18.103.1/24\" has host bits set (did you mean 198.18.103.0/24?); \
         the pool is not used"
    );
    let note = c.events("shadow", "InvalidPool")[0]["note"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        note.contains("overlaps range 198.18.104.0-198.18.104.3 of pool good"),
        "{note}"
    );

    c.wait("the pool conditions are written", || {
        ["broken", "good", "shadow"].iter().all(|p| {
            c.server
                .get(Kind::IpAddressPool, "", p)
                .is_some_and(|o| !o["status"]["conditions"][0].is_null())
        })
    });
    let cond = |p: &str| {
        c.server.get(Kind::IpAddressPool, "", p).unwrap()["status"]["conditions"][0].clone()
    };
    assert_eq!(cond("broken")["status"], "False");
    assert_eq!(cond("broken")["reason"], "InvalidPool");
    assert_eq!(cond("shadow")["status"], "False");
    assert_eq!(cond("good")["status"], "True");
    assert_eq!(cond("good")["message"], "198.18.104.0-198.18.104.3");

    c.wait("the Service asking for the invalid pool is told", || {
        !c.events("picky", "AllocationFailed").is_empty()
    });
    assert_eq!(
        c.events("picky", "AllocationFailed")[0]["note"],
        "cannot allocate an address: the requested address pool \"broken\" does not exist \
         (or is invalid)"
    );
    assert!(c.ingress("web", "picky").is_empty());

    // Fixing the pool makes it serve.
    c.server.apply(
        Kind::IpAddressPool,
        pool("broken", json!({"addresses": ["198.18.103.0/24"]})),
    );
    c.wait("the fixed pool serves", || {
        c.ingress("web", "picky") == ["198.18.103.0"]
    });
    c.wait("its condition turns True", || {
        cond("broken")["status"] == "True"
    });
}

#[test]
fn two_agents_one_writer_and_takeover_after_the_lease_expires() {
    let c = Cluster::new();
    c.server.apply(
        Kind::IpAddressPool,
        pool("public", json!({"addresses": ["198.18.105.0/29"]})),
    );
    c.server.apply(Kind::Service, pending("one", 1));
    let mut agents = vec![
        ("agent-a", c.agent("agent-a")),
        ("agent-b", c.agent("agent-b")),
    ];
    c.wait("one has an address", || {
        c.ingress("web", "one") == ["198.18.105.0"]
    });
    c.wait("the IPAllocated Event is published", || {
        !c.events("one", "IPAllocated").is_empty()
    });
    let leader = c.lease_holder().expect("a holder");
    let follower = if leader == "agent-a" {
        "agent-b"
    } else {
        "agent-a"
    };
    // Give the follower time to misbehave, then check that only the leader wrote anything but
    // (attempts at) the Lease.
    thread::sleep(RENEW * 6);
    for w in c.server.writes() {
        if w.kind != Kind::Lease {
            assert_eq!(
                by(&w),
                leader,
                "a non-Lease write by the follower:\n{}",
                c.write_log()
            );
        }
    }
    assert_eq!(c.status_writes().len(), 1, "{}", c.write_log());
    assert_eq!(c.events("one", "IPAllocated").len(), 1);
    let lease_wins: Vec<String> = c
        .server
        .writes()
        .iter()
        .filter(|w| w.kind == Kind::Lease && w.code < 300)
        .map(|w| by(w).to_string())
        .collect();
    assert!(
        lease_wins.iter().all(|w| *w == leader),
        "only the leader wrote the Lease: {lease_wins:?}"
    );

    // The leader crashes: its Lease stays until it expires; a Service created meanwhile waits.
    let pos = agents.iter().position(|(n, _)| *n == leader).unwrap();
    let (_, mut gone) = agents.remove(pos);
    gone.stop(Stop::Crash);
    let crashed = Instant::now();
    c.server.apply(Kind::Service, pending("two", 2));
    thread::sleep(LEASE_DURATION / 2);
    assert!(
        c.ingress("web", "two").is_empty(),
        "nobody may write before the Lease expires:\n{}",
        c.write_log()
    );
    c.wait("the follower takes over and serves the new Service", || {
        c.ingress("web", "two") == ["198.18.105.1"]
    });
    let took = crashed.elapsed();
    assert!(
        took >= LEASE_DURATION - RENEW,
        "taken over after {took:?}, before the Lease expired"
    );
    let lease = c.server.get(Kind::Lease, NAMESPACE, LEASE).unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], follower);
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    let writes = c.status_writes();
    assert_eq!(by(writes.last().unwrap()), follower);
    // The new leader rebuilt the allocations from the status: "one" kept its address and
    // was not written again.
    assert_eq!(c.ingress("web", "one"), ["198.18.105.0"]);
    assert_eq!(writes.iter().filter(|w| w.name == "one").count(), 1);

    // A clean stop releases the Lease: a third agent takes over well before it would expire.
    let _c3 = c.agent("agent-c");
    thread::sleep(RENEW * 4);
    let (_, mut current) = agents.pop().unwrap();
    current.stop(Stop::Clean);
    let stopped = Instant::now();
    c.server.apply(Kind::Service, pending("three", 3));
    c.wait("agent-c serves", || {
        c.ingress("web", "three") == ["198.18.105.2"]
    });
    let took = stopped.elapsed();
    assert!(
        took < LEASE_DURATION - RENEW,
        "a released Lease is taken at once, not after {took:?}"
    );
    assert_eq!(c.lease_holder().as_deref(), Some("agent-c"));
}

#[test]
fn a_restarted_controller_keeps_every_address() {
    let c = Cluster::new();
    c.server.apply(
        Kind::IpAddressPool,
        pool("public", json!({"addresses": ["198.18.106.0/29"]})),
    );
    // Written earlier by MetalLB (or an earlier agent): adopted as it is.
    c.server.apply(
        Kind::Service,
        service("legacy", 0, |s| {
            s["status"] =
                json!({"loadBalancer": {"ingress": [{"ip": "198.18.106.5", "ipMode": "VIP"}]}});
        }),
    );
    for (i, name) in ["s1", "s2", "s3"].iter().enumerate() {
        c.server.apply(Kind::Service, pending(name, i as u32 + 1));
    }
    let mut a = c.agent("agent-a");
    c.wait("three addresses", || {
        c.ingress("web", "s1") == ["198.18.106.0"]
            && c.ingress("web", "s2") == ["198.18.106.1"]
            && c.ingress("web", "s3") == ["198.18.106.2"]
    });
    // s1 goes: .0 is free. A fresh allocation of s2 and s3 would now give them .0 and .1.
    c.server.delete(Kind::Service, "web", "s1");
    thread::sleep(RENEW * 2);
    a.stop(Stop::Clean);
    let before = c.status_writes().len();

    let _b = c.agent("agent-b");
    c.server.apply(Kind::Service, pending("s4", 9));
    c.wait("the new Service gets the lowest free address", || {
        c.ingress("web", "s4") == ["198.18.106.0"]
    });
    thread::sleep(RENEW * 4);
    assert_eq!(c.ingress("web", "s2"), ["198.18.106.1"]);
    assert_eq!(c.ingress("web", "s3"), ["198.18.106.2"]);
    assert_eq!(c.ingress("web", "legacy"), ["198.18.106.5"]);
    let after: Vec<String> = c.status_writes()[before..]
        .iter()
        .map(|w| format!("{} by {}", w.name, by(w)))
        .collect();
    assert_eq!(after, ["s4 by agent-b"], "only the new Service is written");
    assert!(
        c.events("s2", "IPAllocated").len() == 1 && c.events("legacy", "IPAllocated").is_empty()
    );
}

/// A leader is paused (SIGSTOP) with a status write in flight, past its Lease; a new leader
/// takes over and gives that address to another Service. When the old write finally arrives
/// it is refused (it is conditioned on the resource version it was decided on), and the old
/// leader, resumed, writes nothing more: no address is ever in two Services' status.
#[test]
fn a_leader_paused_past_its_lease_writes_nothing_stale() {
    let c = Cluster::new();
    c.server.apply(
        Kind::IpAddressPool,
        pool("public", json!({"addresses": ["198.18.106.0/29"]})),
    );
    c.server.apply(Kind::Service, pending("one", 1));
    // An older Service that becomes a LoadBalancer later: it sorts before "two".
    let cluster_ip = |s: &mut Value| s["spec"]["type"] = json!("ClusterIP");
    c.server
        .apply(Kind::Service, service("early", 2, cluster_ip));
    let a = ProcessAgent::start(&c.ns, &c.server.url(), "agent-a");
    c.wait("agent-a leads and serves one", || {
        c.lease_holder().as_deref() == Some("agent-a")
            && c.ingress("web", "one") == ["198.18.106.0"]
    });
    let _b = c.agent("agent-b");
    thread::sleep(RENEW * 4);
    assert_eq!(c.lease_holder().as_deref(), Some("agent-a"));

    // agent-a decides "two" gets .1 and sends the write; it stays in flight, and agent-a is
    // paused right then.
    c.server.hold_writes(Kind::Service, AGENT_HEADER, "agent-a");
    c.server.apply(Kind::Service, pending("two", 3));
    assert!(
        c.server.wait_held(WAIT),
        "agent-a sent no status write for two:\n{}",
        c.write_log()
    );
    a.signal("STOP");
    let paused = Instant::now();
    let from = c.server.writes().len();
    c.server.apply(Kind::Service, service("early", 2, |_| {}));

    // agent-b takes over once the Lease expired and serves the older Service first.
    c.wait("agent-b took over and served both", || {
        c.ingress("web", "early") == ["198.18.106.1"] && c.ingress("web", "two") == ["198.18.106.2"]
    });
    assert!(
        paused.elapsed() >= LEASE_DURATION - RENEW,
        "taken over {:?} after the pause, before the Lease expired",
        paused.elapsed()
    );
    assert_eq!(c.lease_holder().as_deref(), Some("agent-b"));

    // The old write arrives now, then agent-a resumes.
    c.server.release_held();
    let stale = |c: &Cluster| {
        c.server.writes()[from..]
            .iter()
            .find(|w| by(w) == "agent-a" && w.kind == Kind::Service)
            .cloned()
    };
    c.wait("the held write is answered", || stale(&c).is_some());
    let held = stale(&c).unwrap();
    assert_eq!(
        (held.name.as_str(), held.code),
        ("two", 409),
        "the stale write must be refused: {}\n{}",
        held.body,
        c.write_log()
    );
    a.signal("CONT");
    // Long enough for agent-a to retry its failed pass and to renew, had it still believed it
    // led.
    thread::sleep(RETRY + RENEW * 8);
    let applied: Vec<String> = c.server.writes()[from..]
        .iter()
        .filter(|w| by(w) == "agent-a" && w.code < 300)
        .map(|w| format!("{} {:?} {}", w.method, w.kind, w.name))
        .collect();
    assert!(
        applied.is_empty(),
        "agent-a wrote after its Lease was gone: {applied:?}\n{}",
        c.write_log()
    );
    assert_eq!(c.lease_holder().as_deref(), Some("agent-b"));
    let mut seen = std::collections::BTreeMap::new();
    for name in ["one", "early", "two"] {
        for ip in c.ingress("web", name) {
            if let Some(other) = seen.insert(ip.clone(), name) {
                panic!("{ip} is in the status of both {other} and {name}");
            }
        }
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
}
