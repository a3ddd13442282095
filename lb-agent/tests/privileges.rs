//! Least privilege, proven: the agent runs with exactly the capabilities
//! `deploy/daemonset.yaml` grants its container (read from the manifest, so the two cannot
//! drift), as uid 0 with every other capability gone from its bounding, inheritable and
//! ambient sets and `no_new_privs` set (`allowPrivilegeEscalation: false`), via `setpriv`:
//!
//! - `lb-agent decap` on three backends and `lb-agent run` in static mode in a [`Lab`]:
//!   UDP and TCP traffic flows through them;
//! - `lb-agent run --kubernetes` against the fake API server (`fake_apiserver`) on the same
//!   lab: it syncs the Service and forwards its traffic;
//! - without `CAP_BPF`, `CAP_NET_ADMIN` or `CAP_PERFMON`, `run` and `decap` exit non-zero
//!   with an error that names the missing capability, and so does `run` with `announce: l2`
//!   without `CAP_NET_RAW` (which nothing else needs); the test prints what each one does.
//!
//! A capability the test process itself lacks cannot be granted (a container runtime may
//! withhold `CAP_SYS_RESOURCE`); it is left out with a note. Needs root and `setpriv`
//! (util-linux).

mod fake_apiserver;

use std::{
    fs,
    net::{IpAddr, SocketAddr, TcpListener},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use fake_apiserver::{FakeApiServer, Kind};
use lb_testkit::{
    ChildGuard, Lab, LabSpec, NetNs, Scenario, ScenarioSpec, require_root,
    scenario::{DirGuard, SERVICE_PORT},
    tcp_connections, udp_flows,
};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_secs(2);
/// How long a refused agent may take to exit.
const EXIT_LIMIT: Duration = Duration::from_secs(20);
/// The Kubernetes-mode agent's namespace, ConfigMap and node.
const NAMESPACE: &str = "lb-system";
const CONFIG_MAP: &str = "lb-agent";
const NODE: &str = "lbt-lb";

/// Capability numbers (linux/capability.h) of every name the manifests may use.
const CAP_NUMBERS: [(&str, u32); 6] = [
    ("NET_BIND_SERVICE", 10),
    ("NET_ADMIN", 12),
    ("NET_RAW", 13),
    ("SYS_RESOURCE", 24),
    ("PERFMON", 38),
    ("BPF", 39),
];

/// `capabilities.add` of the DaemonSet's `lb-agent` container.
fn daemonset_caps() -> Vec<String> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/daemonset.yaml");
    let text = fs::read_to_string(&path).unwrap();
    let ds: Value = serde_yaml_ng::from_str(&text).unwrap();
    let containers = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    let agent = containers
        .iter()
        .find(|c| c["name"] == "lb-agent")
        .expect("the lb-agent container");
    let sc = &agent["securityContext"];
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    sc["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().expect("a capability name").to_string())
        .collect()
}

/// This process's bounding set.
fn own_bounding_set() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .expect("CapBnd in /proc/self/status");
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

/// The DaemonSet's capabilities this process can grant; notes the ones it cannot.
fn grantable(caps: &[String]) -> Vec<String> {
    let bounding = own_bounding_set();
    caps.iter()
        .filter(|c| {
            let bit = CAP_NUMBERS
                .iter()
                .find(|(n, _)| n == c)
                .unwrap_or_else(|| panic!("unknown capability {c}: add it to CAP_NUMBERS"))
                .1;
            let ok = bounding & (1 << bit) != 0;
            if !ok {
                eprintln!("note: CAP_{c} is not in this test's bounding set; running without it");
            }
            ok
        })
        .cloned()
        .collect()
}

/// A script that runs `lb-agent` as uid 0 with only `caps`, like the container would.
fn wrapper(dir: &Path, name: &str, caps: &[String]) -> PathBuf {
    assert!(
        Command::new("setpriv").arg("--version").output().is_ok(),
        "setpriv not found: apt-get install util-linux"
    );
    let list: String = caps
        .iter()
        .map(|c| format!(",+{}", c.to_lowercase()))
        .collect();
    let path = dir.join(name);
    let script = format!(
        "#!/bin/sh\nexec setpriv --no-new-privs --inh-caps=-all{list} --ambient-caps=-all{list} \
         --bounding-set=-all{list} -- {} \"$@\"\n",
        env!("CARGO_BIN_EXE_lb-agent")
    );
    fs::write(&path, script).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn work_dir(tag: &str) -> DirGuard {
    let dir = std::env::temp_dir().join(format!("lbt-priv-{tag}-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    DirGuard(dir)
}

fn spec(agent_bin: PathBuf) -> ScenarioSpec {
    ScenarioSpec::new(agent_bin, "ipip")
}

/// Every UDP flow and TCP connection to `vip` answered, within a bounded number of tries.
fn assert_traffic_flows(lab: &Lab, vip: SocketAddr, what: &str, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let udp = udp_flows(lab.client(), vip, 60, TIMEOUT).unwrap();
        let tcp = tcp_connections(lab.client(), vip, 15, TIMEOUT).unwrap();
        let lost = udp
            .iter()
            .chain(&tcp)
            .filter(|r| r.backend.is_none())
            .count();
        if lost == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {lost} of 75 flows unanswered\nagent log:\n{}",
            log()
        );
        thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn static_and_kubernetes_mode_and_decap_run_with_the_daemonset_capabilities() {
    require_root().unwrap();
    let caps = grantable(&daemonset_caps());
    let work = work_dir("ok");
    let agent = wrapper(&work.0, "lb-agent", &caps);
    let lab = Lab::new(LabSpec::default()).unwrap();

    // Static mode; the backends' decap programs run with the same capabilities.
    let mut sc = Scenario::start(&lab, spec(agent.clone())).unwrap();
    assert_traffic_flows(&lab, sc.vip(), "static mode", || sc.agent_log_text());
    let status = sc.status_json().unwrap();
    assert!(
        status["reasons"]["tx_ipip"]["packets"].as_u64().unwrap() >= 75,
        "{status}"
    );
    assert!(sc.stop_agent().unwrap().success());

    // Kubernetes mode against the fake API server, on the same backends.
    let server = start_server(lab.client(), lab.client_addr().into());
    let vip = sc.vip();
    server.apply(Kind::ConfigMap, config_map());
    server.apply(Kind::Node, node_object(lab.lb_addr().into()));
    server.apply(Kind::Service, service(vip.ip()));
    let backends: Vec<IpAddr> = lab.backends().iter().map(|b| b.addr.into()).collect();
    server.apply(Kind::EndpointSlice, endpoint_slice(&backends));
    let kubeconfig = kubeconfig(&work.0, &server);
    let log_path = work.0.join("agent-k8s.log");
    let log = fs::File::create(&log_path).unwrap();
    // Its own pin directory: what it forwards it learnt from the API server.
    let pins = DirGuard(PathBuf::from(format!(
        "/sys/fs/bpf/lbt-priv-k8s-{}",
        std::process::id()
    )));
    let mut cmd = lab.lb().command(&agent);
    cmd.args([
        "run",
        "--kubernetes",
        "--ipam=false",
        "--namespace",
        NAMESPACE,
    ])
    .args(["--config-map", CONFIG_MAP, "--node-name", NODE])
    .args(["--xdp-mode", "skb", "--pin-path"])
    .arg(&pins.0)
    .env("KUBECONFIG", &kubeconfig)
    .env("RUST_LOG", "info,netlink_packet_route=error")
    .env_remove("NODE_NAME")
    .env_remove("POD_NAMESPACE")
    .env_remove("KUBERNETES_SERVICE_HOST")
    .stdout(Stdio::null())
    .stderr(log);
    let mut k8s = ChildGuard::spawn(&mut cmd).unwrap();
    let read_log = || fs::read_to_string(&log_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !read_log().contains("load balancer attached") {
        if let Some(status) = k8s.try_wait().unwrap() {
            panic!(
                "the Kubernetes-mode agent exited ({status}):\n{}",
                read_log()
            );
        }
        assert!(Instant::now() < deadline, "not attached:\n{}", read_log());
        thread::sleep(Duration::from_millis(100));
    }
    assert_traffic_flows(&lab, vip, "Kubernetes mode", read_log);
    assert!(k8s.try_wait().unwrap().is_none(), "{}", read_log());
    assert!(k8s.stop().unwrap().success(), "{}", read_log());
}

/// Runs `lb-agent ARGS` in `ns` with `caps`; it must exit non-zero within [`EXIT_LIMIT`].
/// Returns its stderr, or `None` if it kept running (it is stopped then).
fn refused(ns: &NetNs, agent: &Path, args: &[&str], log: &Path) -> Option<(i32, String)> {
    let mut cmd = ns.command(agent);
    cmd.args(args)
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .stderr(fs::File::create(log).unwrap());
    let mut child = ChildGuard::spawn(&mut cmd).unwrap();
    let deadline = Instant::now() + EXIT_LIMIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some((
                status.code().unwrap_or(-1),
                fs::read_to_string(log).unwrap(),
            ));
        }
        if Instant::now() > deadline {
            // It started: good enough to say it did not need the capability for this much.
            child.stop().unwrap();
            return None;
        }
        // Attached is as far as a short run gets.
        if fs::read_to_string(log).is_ok_and(|l| l.contains(" attached")) {
            child.stop().unwrap();
            return None;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn without_each_capability_the_agent_fails_naming_it() {
    require_root().unwrap();
    let caps = grantable(&daemonset_caps());
    let work = work_dir("refused");
    let lab = Lab::new(LabSpec {
        backends: 1,
        ..LabSpec::default()
    })
    .unwrap();
    let config = work.0.join("lb.yaml");
    fs::write(
        &config,
        format!("interface: {}\nservices: []\n", lab.lb_iface()),
    )
    .unwrap();
    let pins = DirGuard(PathBuf::from(format!(
        "/sys/fs/bpf/lbt-priv-{}",
        std::process::id()
    )));
    let pin_arg = pins.0.to_str().unwrap().to_string();
    let run = [
        "run",
        "--config",
        config.to_str().unwrap(),
        "--xdp-mode",
        "skb",
        "--pin-path",
        &pin_arg,
    ];
    let decap = ["decap", "--interface", "eth0", "--xdp-mode", "skb"];

    let config_l2 = work.0.join("lb-l2.yaml");
    fs::write(
        &config_l2,
        format!(
            "interface: {}\nannounce: l2\nservices: []\n",
            lab.lb_iface()
        ),
    )
    .unwrap();
    let run_l2 = [
        "run",
        "--config",
        config_l2.to_str().unwrap(),
        "--xdp-mode",
        "skb",
        "--pin-path",
        &pin_arg,
    ];
    let commands = [
        ("run", lab.lb(), &run[..]),
        ("run (announce: l2)", lab.lb(), &run_l2[..]),
        ("decap", &lab.backends()[0].ns, &decap[..]),
    ];

    // With all of them, each command starts.
    let agent = wrapper(&work.0, "lb-agent", &caps);
    for (what, ns, args) in commands {
        let log = work.0.join(format!("{}-all.log", what.replace(' ', "_")));
        if let Some((code, stderr)) = refused(ns, &agent, args, &log) {
            panic!("{what} with {caps:?} exited {code}: {stderr}");
        }
        drop(DirGuard(pins.0.clone()));
    }

    // What each capability is for, measured: each command without it, the rest granted.
    // SYS_RESOURCE (RLIMIT_MEMLOCK, on kernels before 5.11 only) is not needed here.
    for missing in &caps {
        let rest: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let agent = wrapper(&work.0, &format!("lb-agent-no-{missing}"), &rest);
        for (what, ns, args) in commands {
            let expect_named = match missing.as_str() {
                "BPF" | "NET_ADMIN" | "PERFMON" => Some(format!("CAP_{missing}")),
                "NET_RAW" if what.contains("l2") => Some(format!("CAP_{missing}")),
                _ => None,
            };
            let log = work
                .0
                .join(format!("{}-no-{missing}.log", what.replace(' ', "_")));
            let outcome = refused(ns, &agent, args, &log);
            // Every run starts afresh (with pins left, it would not create maps).
            drop(DirGuard(pins.0.clone()));
            match (&expect_named, outcome) {
                (Some(name), Some((code, stderr))) => {
                    assert_ne!(code, 0, "{what} without CAP_{missing}: {stderr}");
                    let error = stderr
                        .lines()
                        .find(|l| l.contains("denied:"))
                        .unwrap_or_else(|| panic!("{what} without CAP_{missing}: {stderr}"));
                    assert!(
                        error.contains(name.as_str()),
                        "{what} without CAP_{missing}: {error}"
                    );
                    println!(
                        "{what} without CAP_{missing}: exit {code}: {}",
                        error.trim()
                    );
                }
                (Some(_), None) => panic!("{what} ran without CAP_{missing}"),
                (None, None) => println!("{what} without CAP_{missing}: runs"),
                (None, Some((code, stderr))) => {
                    panic!("{what} without CAP_{missing} exited {code}: {stderr}")
                }
            }
        }
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

/// A kubeconfig for `server`, without credentials (the fake server wants none).
fn kubeconfig(dir: &Path, server: &FakeApiServer) -> PathBuf {
    server.write_kubeconfig(dir, NAMESPACE)
}

fn config_map() -> Value {
    json!({
        "metadata": {
            "name": CONFIG_MAP,
            "namespace": NAMESPACE,
            "uid": "0e6f1a2b-3c4d-4e5f-8a9b-0c1d2e3f4a5b",
            "creationTimestamp": "2025-05-03T12:00:00Z"
        },
        "data": {"config.yaml": "interface: eth0\n"}
    })
}

/// The LB node: Ready, its lab address as InternalIP.
fn node_object(addr: IpAddr) -> Value {
    json!({
        "metadata": {
            "name": NODE,
            "uid": "6a1d2c3b-4e5f-4a6b-8c7d-000000000001",
            "creationTimestamp": "2025-05-03T11:00:00Z",
            "labels": {"kubernetes.io/hostname": NODE, "kubernetes.io/os": "linux"}
        },
        "spec": {},
        "status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
            "addresses": [
                {"type": "InternalIP", "address": addr.to_string()},
                {"type": "Hostname", "address": NODE}
            ]
        }
    })
}

/// A Service of type LoadBalancer with the lab's VIP, UDP and TCP on [`SERVICE_PORT`].
fn service(vip: IpAddr) -> Value {
    json!({
        "metadata": {
            "name": "echo",
            "namespace": "demo",
            "uid": "5b0f3c1e-8a47-4d6b-9e21-7f3a2c9d4e10",
            "creationTimestamp": "2025-05-03T12:10:00Z"
        },
        "spec": {
            "type": "LoadBalancer",
            "ports": [
                {"name": "udp", "protocol": "UDP", "port": SERVICE_PORT, "targetPort": SERVICE_PORT},
                {"name": "tcp", "protocol": "TCP", "port": SERVICE_PORT, "targetPort": SERVICE_PORT}
            ],
            "clusterIP": "198.19.100.80",
            "clusterIPs": ["198.19.100.80"],
            "externalTrafficPolicy": "Cluster",
            "sessionAffinity": "None",
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack"
        },
        "status": {"loadBalancer": {"ingress": [{"ip": vip.to_string(), "ipMode": "VIP"}]}}
    })
}

fn endpoint_slice(backends: &[IpAddr]) -> Value {
    let endpoints: Vec<Value> = backends
        .iter()
        .map(|a| {
            json!({
                "addresses": [a.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false}
            })
        })
        .collect();
    json!({
        "metadata": {
            "name": "echo-x7k2p",
            "namespace": "demo",
            "uid": "8d2e4f6a-1b3c-4d5e-9f70-a1b2c3d4e5f6",
            "creationTimestamp": "2025-05-03T12:10:01Z",
            "labels": {"kubernetes.io/service-name": "echo"}
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [
            {"name": "udp", "protocol": "UDP", "port": SERVICE_PORT},
            {"name": "tcp", "protocol": "TCP", "port": SERVICE_PORT}
        ]
    })
}
