//! Services + EndpointSlices → DesiredState, from API objects in the form the API server
//! returns them (`tests/fixtures/k8s/<scenario>/{services,endpointslices}.json`, plus
//! `nodes.json`): the same types and the same function a live watch feeds.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use k8s_openapi::{
    List, ListableResource,
    api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    },
    serde::de::DeserializeOwned,
};
use lb_agent::{
    k8s::{K8sConfig, Warning, WarningReason, desired_state},
    state::{DesiredState, Protocol, ServiceAddr, ServiceSpec},
};
use lb_common::Forwarding;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/k8s")
}

fn read_list<T: ListableResource + DeserializeOwned>(rel: &str) -> Vec<T> {
    let path = fixture_dir().join(rel);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let list: List<T> = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not a {}List: {e}", path.display(), T::KIND));
    list.items
}

struct Snapshot {
    services: Vec<Service>,
    slices: Vec<EndpointSlice>,
    nodes: Vec<Node>,
}

fn snapshot(scenario: &str) -> Snapshot {
    Snapshot {
        services: read_list(&format!("{scenario}/services.json")),
        slices: read_list(&format!("{scenario}/endpointslices.json")),
        nodes: read_list("nodes.json"),
    }
}

/// `desired_state` on a snapshot; also checks that the result does not depend on the order of
/// the lists (a reflector store has none).
fn run_with(scenario: &str, cfg: &K8sConfig, node: &str) -> (DesiredState, Vec<Warning>) {
    let s = snapshot(scenario);
    let out = desired_state(&s.services, &s.slices, &s.nodes, cfg, node);
    let reversed = desired_state(
        &rev(&s.services),
        &rev(&s.slices),
        &rev(&s.nodes),
        cfg,
        node,
    );
    assert_eq!(out.0, reversed.0, "{scenario}: state depends on list order");
    let mut a: Vec<String> = out.1.iter().map(Warning::to_string).collect();
    let mut b: Vec<String> = reversed.1.iter().map(Warning::to_string).collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "{scenario}: warnings depend on list order");
    out
}

fn run(scenario: &str) -> (DesiredState, Vec<Warning>) {
    run_with(scenario, &K8sConfig::default(), "node-a")
}

fn rev<T: Clone>(v: &[T]) -> Vec<T> {
    v.iter().rev().cloned().collect()
}

/// `"198.18.0.10:80/tcp"` → ServiceAddr.
fn addr(s: &str) -> ServiceAddr {
    let (hostport, proto) = s.rsplit_once('/').unwrap();
    let sa: std::net::SocketAddr = hostport.parse().unwrap();
    ServiceAddr {
        vip: sa.ip(),
        port: sa.port(),
        protocol: match proto {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            _ => panic!("{proto}"),
        },
    }
}

fn service<'a>(state: &'a DesiredState, key: &str) -> &'a ServiceSpec {
    state
        .services
        .get(&addr(key))
        .unwrap_or_else(|| panic!("{key} missing; have {:?}", keys(state)))
}

fn backends(state: &DesiredState, key: &str) -> Vec<String> {
    let spec = service(state, key);
    for b in spec.backends.values() {
        assert_eq!((b.weight, b.mac), (1, None), "{key}");
    }
    spec.backends.keys().map(IpAddr::to_string).collect()
}

fn keys(state: &DesiredState) -> Vec<String> {
    state.services.keys().map(ServiceAddr::to_string).collect()
}

/// (namespace/name, reason) of every warning, in order.
fn reasons(warnings: &[Warning]) -> Vec<(String, WarningReason)> {
    warnings
        .iter()
        .map(|w| (format!("{}/{}", w.namespace, w.name), w.reason))
        .collect()
}

fn w(service: &str, reason: WarningReason) -> (String, WarningReason) {
    (service.to_string(), reason)
}

#[test]
fn ready_then_serving_terminating_and_never_the_rest() {
    let (state, warnings) = run("conditions");
    assert_eq!(warnings, vec![]);
    assert_eq!(
        keys(&state),
        [
            "198.18.0.10:80/tcp",
            "198.18.0.11:443/tcp",
            "198.18.0.12:53/udp",
            "198.18.0.13:80/tcp"
        ]
    );
    // ready:true and conditions without `ready` (unknown → ready); the serving terminating
    // and the not-ready endpoints are not used while a ready one exists.
    assert_eq!(
        backends(&state, "198.18.0.10:80/tcp"),
        ["198.18.10.1", "198.18.10.2"]
    );
    // No ready endpoint: fall back to serving && terminating; not-serving ones never.
    assert_eq!(backends(&state, "198.18.0.11:443/tcp"), ["198.18.10.3"]);
    // Nothing usable: the service stays, with no backends (the data plane drops, like
    // kube-proxy's reject), rather than letting the VIP fall through to the host.
    assert!(backends(&state, "198.18.0.12:53/udp").is_empty());
    assert!(backends(&state, "198.18.0.13:80/tcp").is_empty());

    let web = service(&state, "198.18.0.10:80/tcp");
    assert_eq!(web.name, "default/web:http");
    assert_eq!(web.forwarding, Forwarding::Ipip);
    assert_eq!(web.table_size, None);
    assert_eq!(
        service(&state, "198.18.0.12:53/udp").name,
        "default/down:dns"
    );
}

#[test]
fn successive_snapshots_add_update_and_delete() {
    let cfg = K8sConfig {
        node: lb_agent::state::NodeSpec {
            interface: Some("eth1".into()),
            encap_source: Some("198.18.1.1".parse().unwrap()),
            ..K8sConfig::default().node
        },
        ..K8sConfig::default()
    };
    let step = |s: &str| run_with(&format!("lifecycle/{s}"), &cfg, "node-a");

    // Created, no address allocated yet, no endpoints: nothing to serve.
    let (s1, w1) = step("1-created");
    assert_eq!((keys(&s1), w1), (vec![], vec![]));
    assert_eq!(s1.node.interface.as_deref(), Some("eth1"));
    assert_eq!(s1.node.encap_source, cfg.node.encap_source);

    // Address in status, one slice with two ready pods.
    let (s2, _) = step("2-ip-and-endpoints");
    assert_eq!(keys(&s2), ["198.18.0.20:8080/tcp"]);
    assert_eq!(
        backends(&s2, "198.18.0.20:8080/tcp"),
        ["198.18.10.21", "198.18.20.21"]
    );
    assert_eq!(service(&s2, "198.18.0.20:8080/tcp").name, "shop/api:http");

    // A second port, a second slice, one pod terminating (others ready: it is dropped).
    let (s3, _) = step("3-scaled-and-new-port");
    assert_eq!(keys(&s3), ["198.18.0.20:8080/tcp", "198.18.0.20:9090/tcp"]);
    for key in ["198.18.0.20:8080/tcp", "198.18.0.20:9090/tcp"] {
        assert_eq!(
            backends(&s3, key),
            ["198.18.10.22", "198.18.20.21", "198.18.20.22"],
            "{key}"
        );
    }
    assert_eq!(service(&s3, "198.18.0.20:9090/tcp").name, "shop/api:grpc");

    // The port and the first slice removed.
    let (s4, _) = step("4-port-and-slice-removed");
    assert_eq!(keys(&s4), ["198.18.0.20:8080/tcp"]);
    assert_eq!(backends(&s4, "198.18.0.20:8080/tcp"), ["198.18.20.22"]);

    // Service deleted; its slice lingers until garbage collection and is ignored.
    let (s5, w5) = step("5-service-deleted");
    assert_eq!((keys(&s5), w5), (vec![], vec![]));
}

#[test]
fn external_traffic_policy_local_keeps_this_nodes_endpoints() {
    let local = "198.18.0.30:443/tcp";
    let cluster = "198.18.0.31:443/tcp";

    let (a, wa) = run_with("etp-local", &K8sConfig::default(), "node-a");
    assert_eq!(wa, vec![]);
    assert_eq!(backends(&a, local), ["198.18.10.31", "198.18.10.32"]);

    // node-b has only a serving terminating pod: the fallback applies per node, as in
    // kube-proxy; its not-serving pod is never used.
    let (b, wb) = run_with("etp-local", &K8sConfig::default(), "node-b");
    assert_eq!(wb, vec![]);
    assert_eq!(backends(&b, local), ["198.18.20.31"]);

    // Cluster: every node sees the same ready set.
    for state in [&a, &b] {
        assert_eq!(backends(state, cluster), ["198.18.10.31", "198.18.10.32"]);
    }

    // A node name that matches no Node: no local endpoints, and a warning naming the cause.
    let (c, wc) = run_with("etp-local", &K8sConfig::default(), "node-typo");
    assert!(backends(&c, local).is_empty());
    assert_eq!(
        reasons(&wc),
        [w("edge/ingress", WarningReason::UnknownNode)]
    );
    assert!(wc[0].to_string().contains("\"node-typo\""), "{}", wc[0]);

    // Route weights: node-a has two pods of the Local service, node-b one (its terminating
    // fallback), the typo node none (not announced); the Cluster VIP weighs 1 everywhere. So
    // weighted ECMP over the nodes sends each pod the same share.
    let vip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    for (state, weight) in [(&a, 2), (&b, 1), (&c, 0)] {
        assert_eq!(state.announce.get(&vip("198.18.0.30")), Some(&weight));
        assert_eq!(state.announce.get(&vip("198.18.0.31")), Some(&1));
        // Who may announce (L2: own) the Local VIP: the nodes using a local endpoint, the
        // same on every node; the Cluster VIP: any node.
        assert_eq!(
            state.announce_nodes.get(&vip("198.18.0.30")),
            Some(&["node-a".to_string(), "node-b".to_string()].into())
        );
        assert_eq!(state.announce_nodes.get(&vip("198.18.0.31")), None);
    }
}

#[test]
fn announcing_nodes_are_ready_schedulable_not_excluded_and_selected() {
    let mut nodes: Vec<Node> = read_list("nodes.json");
    let cfg = K8sConfig::default();
    let names = |nodes: &[Node], cfg: &K8sConfig| -> Vec<(String, IpAddr)> {
        lb_agent::k8s::desired::announcing_nodes(nodes.iter(), cfg)
            .into_iter()
            .map(|p| (p.name, p.address))
            .collect()
    };
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert_eq!(
        names(&nodes, &cfg),
        [
            ("node-a".to_string(), ip("198.18.1.1")),
            ("node-b".to_string(), ip("198.18.1.2"))
        ]
    );
    // The state carries them, with this node's name.
    let s = snapshot("etp-local");
    let (state, _) = desired_state(&s.services, &s.slices, &nodes, &cfg, "node-a");
    assert_eq!(state.node.announce.nodes.len(), 2);
    assert_eq!(state.node.announce.node_name.as_deref(), Some("node-a"));

    // Cordoned (before a drain): out. Not Ready: out. Excluded by label: out.
    nodes[0].spec.get_or_insert_default().unschedulable = Some(true);
    assert_eq!(
        names(&nodes, &cfg),
        [("node-b".to_string(), ip("198.18.1.2"))]
    );
    nodes[0].spec.get_or_insert_default().unschedulable = None;
    for c in nodes[1]
        .status
        .get_or_insert_default()
        .conditions
        .get_or_insert_default()
    {
        if c.type_ == "Ready" {
            c.status = "Unknown".into();
        }
    }
    assert_eq!(
        names(&nodes, &cfg),
        [("node-a".to_string(), ip("198.18.1.1"))]
    );
    nodes[0]
        .metadata
        .labels
        .get_or_insert_default()
        .insert(lb_agent::k8s::desired::EXCLUDE_LABEL.into(), String::new());
    assert!(names(&nodes, &cfg).is_empty());

    // The node selector of the ConfigMap.
    let mut nodes: Vec<Node> = read_list("nodes.json");
    nodes[1]
        .metadata
        .labels
        .get_or_insert_default()
        .insert("edge".into(), "true".into());
    let selective = K8sConfig {
        announce_node_selector: [("edge".to_string(), "true".to_string())].into(),
        ..K8sConfig::default()
    };
    assert_eq!(
        names(&nodes, &selective),
        [("node-b".to_string(), ip("198.18.1.2"))]
    );
}

#[test]
fn tcp_and_udp_share_an_address_and_conflicts_go_to_the_oldest() {
    let (state, warnings) = run("shared-ip");
    assert_eq!(
        keys(&state),
        [
            "198.18.0.53:53/tcp",
            "198.18.0.53:53/udp",
            "198.18.0.53:5353/udp",
            "198.18.0.54:80/tcp"
        ]
    );
    let udp = service(&state, "198.18.0.53:53/udp");
    assert_eq!(
        (udp.name.as_str(), backends(&state, "198.18.0.53:53/udp")),
        ("dns/dns-udp:dns", vec!["198.18.10.53".to_string()])
    );
    let tcp = service(&state, "198.18.0.53:53/tcp");
    assert_eq!(
        (tcp.name.as_str(), backends(&state, "198.18.0.53:53/tcp")),
        ("dns/dns-tcp:dns-tcp", vec!["198.18.10.54".to_string()])
    );
    // The newer copy loses 53/udp but keeps its other port.
    assert_eq!(
        service(&state, "198.18.0.53:5353/udp").name,
        "dns/dns-udp-copy:mdns"
    );
    // Same creation time: namespace/name decides.
    assert_eq!(
        service(&state, "198.18.0.54:80/tcp").name,
        "team-a/dup:http"
    );
    assert_eq!(backends(&state, "198.18.0.54:80/tcp"), ["198.18.10.55"]);

    assert_eq!(
        reasons(&warnings),
        [
            w("dns/dns-udp-copy", WarningReason::AddressConflict),
            w("team-b/dup", WarningReason::AddressConflict),
        ]
    );
    assert_eq!(
        warnings[0].to_string(),
        "service dns/dns-udp-copy: port dns: 198.18.0.53:53/udp is already used by service dns/dns-udp; not served for this one"
    );
    assert!(
        warnings[1].message.contains("team-a/dup"),
        "{}",
        warnings[1]
    );
}

#[test]
fn load_balancer_class_selects_the_services() {
    let run_cfg = |cfg: K8sConfig| {
        let (state, warnings) = run_with("classes", &cfg, "node-a");
        assert_eq!(warnings, vec![]);
        state
            .services
            .values()
            .map(|s| s.name.clone())
            .collect::<Vec<_>>()
    };
    // Default: our class, and Services without one.
    assert_eq!(
        run_cfg(K8sConfig::default()),
        ["default/ours:http", "default/unset:http"]
    );
    assert_eq!(
        run_cfg(K8sConfig {
            require_class: true,
            ..K8sConfig::default()
        }),
        ["default/ours:http"]
    );
    // No class of our own: only Services without one.
    assert_eq!(
        run_cfg(K8sConfig {
            load_balancer_class: None,
            ..K8sConfig::default()
        }),
        ["default/unset:http"]
    );
    assert_eq!(
        run_cfg(K8sConfig {
            load_balancer_class: Some("example.com/other-lb".into()),
            ..K8sConfig::default()
        }),
        ["default/unset:http", "default/other:http"]
    );
}

/// This node's endpoints of one service: (address, target port).
fn local(state: &DesiredState, key: &str) -> Vec<(String, u16)> {
    let a = addr(key);
    state
        .local_endpoints
        .iter()
        .filter(|(ep, _)| ep.service == a)
        .map(|(ep, port)| (ep.backend.to_string(), *port))
        .collect()
}

#[test]
fn dual_stack_serves_each_vip_from_the_slices_of_its_family() {
    let (state, warnings) = run("dual-stack");
    assert_eq!(
        keys(&state),
        [
            "198.18.0.70:80/tcp",
            "[2001:db8::70]:80/tcp",
            "[2001:db8::72]:80/tcp"
        ]
    );
    // Neither family's slice leaks into the other family's VIP.
    assert_eq!(backends(&state, "198.18.0.70:80/tcp"), ["198.18.10.71"]);
    assert_eq!(
        backends(&state, "[2001:db8::70]:80/tcp"),
        ["2001:db8:10::71"]
    );
    assert_eq!(
        backends(&state, "[2001:db8::72]:80/tcp"),
        ["2001:db8:10::72"]
    );
    // Every pod is on node-a (this node): translated here, IPv6 too.
    assert_eq!(
        local(&state, "[2001:db8::70]:80/tcp"),
        [("2001:db8:10::71".to_string(), 80)]
    );
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[test]
fn ports_named_target_ports_and_protocols() {
    let (state, warnings) = run("ports");
    assert_eq!(
        keys(&state),
        [
            "198.18.0.80:80/tcp",
            "198.18.0.81:80/tcp",
            "198.18.0.82:53/tcp",
            "198.18.0.82:53/udp",
            "198.18.0.83:8443/tcp"
        ]
    );
    // targetPort "web" resolves per pod (8080 in one slice, 8081 in the other): every pod
    // is a backend, keyed by address only; the pods on this node (node-a) are translated to
    // their own target port, the one on node-b by node-b.
    assert_eq!(
        backends(&state, "198.18.0.80:80/tcp"),
        ["198.18.10.81", "198.18.10.82", "198.18.20.81"]
    );
    assert_eq!(
        local(&state, "198.18.0.80:80/tcp"),
        [
            ("198.18.10.81".to_string(), 8080),
            ("198.18.10.82".to_string(), 8081)
        ]
    );
    let (node_b, _) = run_with("ports", &K8sConfig::default(), "node-b");
    assert_eq!(
        local(&node_b, "198.18.0.80:80/tcp"),
        [("198.18.20.81".to_string(), 8080)]
    );
    assert!(node_b.node.decap && state.node.decap);
    // Pods on the other node are tunnelled to that node's InternalIP (`pod_tunnel: node`,
    // the default); pods here need no tunnel. With `pod_tunnel: pod`, to the pods themselves.
    let node_of = |s: &DesiredState| -> Vec<(String, String)> {
        s.pod_nodes
            .iter()
            .map(|(pod, node)| (pod.to_string(), node.to_string()))
            .collect()
    };
    assert!(node_of(&state).contains(&("198.18.20.81".into(), "198.18.1.2".into())));
    assert!(
        !node_of(&state)
            .iter()
            .any(|(p, _)| p.starts_with("198.18.10."))
    );
    assert!(node_of(&node_b).contains(&("198.18.10.81".into(), "198.18.1.1".into())));
    assert!(!node_of(&node_b).iter().any(|(p, _)| p == "198.18.20.81"));
    let (routed, _) = run_with(
        "ports",
        &K8sConfig::parse("cm", "pod_tunnel: pod\n").unwrap(),
        "node-a",
    );
    assert!(routed.pod_nodes.is_empty());
    assert!(
        K8sConfig::parse("cm", "pod_tunnel: vxlan\n")
            .unwrap_err()
            .to_string()
            .contains("unknown pod_tunnel \"vxlan\" (node or pod)")
    );
    assert_eq!(backends(&state, "198.18.0.81:80/tcp"), ["198.18.10.84"]);
    assert_eq!(backends(&state, "198.18.0.82:53/tcp"), ["198.18.10.85"]);
    assert_eq!(backends(&state, "198.18.0.82:53/udp"), ["198.18.10.85"]);
    assert_eq!(
        service(&state, "198.18.0.82:53/udp").name,
        "default/multi:dns-udp"
    );
    // An unnamed port is named by its number; its slice port has the name "".
    assert_eq!(
        service(&state, "198.18.0.83:8443/tcp").name,
        "default/unnamed:8443"
    );
    assert_eq!(backends(&state, "198.18.0.83:8443/tcp"), ["198.18.10.86"]);

    assert_eq!(
        reasons(&warnings),
        [w("default/multi", WarningReason::UnsupportedProtocol)]
    );
    assert!(warnings[0].message.contains("SCTP"), "{}", warnings[0]);

    // With l2 forwarding nothing translates: the remapping is reported.
    let (l2, warnings) = run_with(
        "ports",
        &K8sConfig {
            default_forwarding: Forwarding::L2,
            ..K8sConfig::default()
        },
        "node-a",
    );
    assert_eq!(l2.services.len(), 5);
    let remapped: Vec<&Warning> = warnings
        .iter()
        .filter(|w| w.reason == WarningReason::TargetPortRemapped)
        .collect();
    assert_eq!(remapped.len(), 1, "{warnings:?}");
    assert_eq!(remapped[0].name, "named-target");
    assert!(
        remapped[0].message.starts_with(
            "port http: backends listen on 8080, 8081 but l2 forwarding delivers packets unchanged to port 80"
        ),
        "{}",
        remapped[0]
    );
}

#[test]
fn addresses_types_annotations_and_unsupported_fields() {
    let (state, warnings) = run("misc");
    assert_eq!(
        keys(&state),
        [
            "198.18.0.90:80/tcp",
            "198.18.0.91:80/tcp",
            "198.18.0.92:80/tcp",
            "198.18.0.93:80/tcp",
            "198.18.0.94:80/tcp",
            "198.18.0.95:80/tcp"
        ]
    );
    // spec.loadBalancerIP without status; with status, deduplicated.
    assert_eq!(backends(&state, "198.18.0.90:80/tcp"), ["198.18.10.90"]);
    for key in ["198.18.0.91:80/tcp", "198.18.0.92:80/tcp"] {
        assert_eq!(service(&state, key).name, "default/both-ips:http");
    }
    // ClusterIP, NodePort and ExternalName Services (and their slices) are not ours.
    let names: Vec<&str> = state.services.values().map(|s| s.name.as_str()).collect();
    for other in ["internal", "nodeport", "external"] {
        assert!(!names.iter().any(|n| n.contains(other)), "{names:?}");
    }

    let forwarding = |key| service(&state, key).forwarding;
    assert_eq!(forwarding("198.18.0.93:80/tcp"), Forwarding::L2);
    assert_eq!(forwarding("198.18.0.94:80/tcp"), Forwarding::Ipip);
    assert_eq!(forwarding("198.18.0.90:80/tcp"), Forwarding::Ipip);

    // Served anyway, with warnings; the IPv6 address in an IPv4 slice is skipped.
    assert_eq!(backends(&state, "198.18.0.95:80/tcp"), ["198.18.10.96"]);
    // loadBalancerSourceRanges: the IPv4 ranges of an IPv4 VIP are enforced; junk is warned.
    let restricted = service(&state, "198.18.0.95:80/tcp");
    assert_eq!(
        restricted.source_ranges,
        Some(vec!["198.18.0.0/24".parse::<ipnet::IpNet>().unwrap()])
    );
    // sessionAffinity ClientIP with its timeout; others have none.
    assert_eq!(restricted.affinity_timeout_s, Some(10_800));
    assert_eq!(
        service(&state, "198.18.0.90:80/tcp").affinity_timeout_s,
        None
    );
    assert_eq!(
        reasons(&warnings),
        [
            w("default/bad-annotation", WarningReason::InvalidAnnotation),
            w("default/restricted", WarningReason::InvalidSourceRange),
            w("default/restricted", WarningReason::InvalidAddress),
        ]
    );
    assert_eq!(
        warnings[0].to_string(),
        "service default/bad-annotation: annotation xdp-lb.io/forwarding: unknown forwarding \"gre\" (ipip, gue or l2); using ipip"
    );
    assert_eq!(warnings[0].reason.as_str(), "InvalidAnnotation");

    // The configured default applies where there is no annotation; the annotation wins.
    let (l2, _) = run_with(
        "misc",
        &K8sConfig {
            default_forwarding: Forwarding::L2,
            ..K8sConfig::default()
        },
        "node-a",
    );
    let by_name: BTreeMap<&str, Forwarding> = l2
        .services
        .values()
        .map(|s| (s.name.as_str(), s.forwarding))
        .collect();
    assert_eq!(by_name["default/spec-ip:http"], Forwarding::L2);
    assert_eq!(by_name["default/bad-annotation:http"], Forwarding::L2);
    assert_eq!(by_name["default/l2:http"], Forwarding::L2);
    // GUE is a forwarding like the others in Kubernetes mode (ConfigMap default here).
    let (gue, _) = run_with(
        "misc",
        &K8sConfig::parse("cm", "default_forwarding: gue\ngue_port: 6081\n").unwrap(),
        "node-a",
    );
    assert_eq!(gue.node.gue_port, 6081);
    let by_name: BTreeMap<&str, Forwarding> = gue
        .services
        .values()
        .map(|s| (s.name.as_str(), s.forwarding))
        .collect();
    assert_eq!(by_name["default/spec-ip:http"], Forwarding::Gue);
    assert_eq!(by_name["default/l2:http"], Forwarding::L2);
}

#[test]
fn fixtures_are_real_api_lists() {
    // Guards the fixtures themselves: every object has the metadata a real server sets, and
    // only documentation address ranges are used.
    for scenario in [
        "conditions",
        "lifecycle/1-created",
        "lifecycle/2-ip-and-endpoints",
        "lifecycle/3-scaled-and-new-port",
        "lifecycle/4-port-and-slice-removed",
        "lifecycle/5-service-deleted",
        "etp-local",
        "shared-ip",
        "classes",
        "dual-stack",
        "ports",
        "misc",
    ] {
        let s = snapshot(scenario);
        let metas = s
            .services
            .iter()
            .map(|x| &x.metadata)
            .chain(s.slices.iter().map(|x| &x.metadata));
        for m in metas {
            assert!(
                m.uid.is_some() && m.resource_version.is_some() && m.creation_timestamp.is_some(),
                "{scenario}: {:?} lacks server-set metadata",
                m.name
            );
        }
        for file in ["services.json", "endpointslices.json"] {
            check_addresses(&read_json(&format!("{scenario}/{file}")), scenario);
        }
    }
    check_addresses(&read_json("nodes.json"), "nodes");
}

fn read_json(rel: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir().join(rel)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Every string that parses as an IP address is in 198.18.0.0/15 or 2001:db8::/32.
fn check_addresses(v: &serde_json::Value, scenario: &str) {
    match v {
        serde_json::Value::String(s) => {
            let s = s.split('/').next().unwrap_or_default();
            if let Ok(ip) = s.parse::<IpAddr>() {
                let ok = match ip {
                    IpAddr::V4(a) => a.octets()[0] == 198 && (a.octets()[1] & 0xfe) == 18,
                    IpAddr::V6(a) => a.segments()[0] == 0x2001 && a.segments()[1] == 0xdb8,
                };
                assert!(ok, "{scenario}: address {ip} outside the test ranges");
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| check_addresses(x, scenario)),
        serde_json::Value::Object(o) => o.values().for_each(|x| check_addresses(x, scenario)),
        _ => {}
    }
}

#[test]
fn a_pools_announce_settings_limit_the_nodes_and_set_the_bgp_attributes() {
    use lb_agent::ipam::{IpAddressPoolSpec, PoolAnnounceSpec, PoolBgpSpec, validate_pools};
    let mut nodes: Vec<Node> = read_list("nodes.json");
    nodes[1]
        .metadata
        .labels
        .get_or_insert_default()
        .insert("edge".into(), "true".into());
    let spec = IpAddressPoolSpec {
        addresses: vec!["198.18.0.31/32".into()],
        announce: Some(PoolAnnounceSpec {
            node_selector: Some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                    match_labels: Some([("edge".to_string(), "true".to_string())].into()),
                    ..Default::default()
                },
            ),
            bgp: Some(PoolBgpSpec {
                communities: vec!["64512:7".into()],
                large_communities: vec![],
                local_pref: Some(300),
            }),
        }),
        ..Default::default()
    };
    let (pools, errors) = validate_pools([("edge", &spec)]);
    assert!(errors.is_empty(), "{errors:?}");
    let s = snapshot("etp-local");
    let cfg = K8sConfig::default();
    let (state, _) = lb_agent::k8s::desired_state_with_pools(
        &s.services,
        &s.slices,
        &nodes,
        &pools,
        &cfg,
        "node-a",
    );
    let vip = |s: &str| s.parse::<IpAddr>().unwrap();
    // The Cluster VIP of the pool: only the selected node; its own attributes.
    assert_eq!(
        state.announce_nodes.get(&vip("198.18.0.31")),
        Some(&["node-b".to_string()].into())
    );
    let route = &state.announce_routes[&vip("198.18.0.31")];
    assert_eq!(route.communities, [(64512, 7)]);
    assert_eq!(route.local_pref, Some(300));
    // The Local VIP is in no pool: unchanged.
    assert_eq!(
        state.announce_nodes.get(&vip("198.18.0.30")),
        Some(&["node-a".to_string(), "node-b".to_string()].into())
    );
    assert!(!state.announce_routes.contains_key(&vip("198.18.0.30")));
}

#[test]
fn every_nodes_internal_ips_may_send_tunnels() {
    let mut nodes: Vec<Node> = read_list("nodes.json");
    let cfg = K8sConfig::default();
    let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
    let sources = |nodes: &[Node]| {
        let s = snapshot("etp-local");
        desired_state(&s.services, &s.slices, nodes, &cfg, "node-a")
            .0
            .decap_sources
    };
    assert_eq!(
        sources(&nodes),
        [net("198.18.1.1/32"), net("198.18.1.2/32")].into()
    );
    // A cordoned or not-Ready Node still balances (or drains) traffic to pods here: kept.
    // Every InternalIP counts (dual stack); other address types do not.
    nodes[0].spec.get_or_insert_default().unschedulable = Some(true);
    let addrs = nodes[1]
        .status
        .get_or_insert_default()
        .addresses
        .get_or_insert_default();
    addrs.push(k8s_openapi::api::core::v1::NodeAddress {
        type_: "InternalIP".into(),
        address: "2001:db8::12".into(),
    });
    addrs.push(k8s_openapi::api::core::v1::NodeAddress {
        type_: "ExternalIP".into(),
        address: "198.18.9.9".into(),
    });
    assert_eq!(
        sources(&nodes),
        [
            net("198.18.1.1/32"),
            net("198.18.1.2/32"),
            net("2001:db8::12/128")
        ]
        .into()
    );
}

/// A Service `default/NAME` of type LoadBalancer with these VIPs in its status and ports,
/// created `minute` minutes after 10:00 (older Services win conflicts and capacity).
fn lb_service(name: &str, minute: u32, vips: &[&str], ports: serde_json::Value) -> Service {
    let ingress: Vec<serde_json::Value> = vips
        .iter()
        .map(|ip| serde_json::json!({"ip": ip, "ipMode": "VIP"}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": name, "namespace": "default",
            "uid": format!("7e57c0de-0000-4000-8000-{minute:012}"),
            "creationTimestamp": format!("2025-06-01T10:{minute:02}:00Z")
        },
        "spec": {"type": "LoadBalancer", "ports": ports},
        "status": {"loadBalancer": {"ingress": ingress}}
    }))
    .expect("a Service")
}

/// An IPv4 EndpointSlice of Service `default/SERVICE` with these endpoint addresses, each
/// ready, and port `http` = 8080/TCP.
fn lb_slice(service: &str, suffix: &str, addresses: &[&str]) -> EndpointSlice {
    let endpoints: Vec<serde_json::Value> = addresses
        .iter()
        .map(|a| serde_json::json!({"addresses": [a], "conditions": {"ready": true}, "nodeName": "node-a"}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {
            "name": format!("{service}-{suffix}"), "namespace": "default",
            "labels": {"kubernetes.io/service-name": service}
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    }))
    .expect("an EndpointSlice")
}

fn http_port() -> serde_json::Value {
    serde_json::json!([{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}])
}

/// Garbage in one Service: a warning naming the Service and the field, the rest of that
/// Service served where it can be, and every other Service exactly as without it.
#[test]
fn garbage_in_one_service_is_warned_and_the_others_are_untouched() {
    let good = lb_service("good", 0, &["198.18.0.80"], http_port());
    let good_slice = lb_slice("good", "1", &["198.18.10.1", "198.18.10.2"]);
    let nodes: Vec<Node> = read_list("nodes.json");
    let cfg = K8sConfig::default();
    let (baseline, none) = desired_state(
        std::slice::from_ref(&good),
        std::slice::from_ref(&good_slice),
        &nodes,
        &cfg,
        "node-a",
    );
    assert!(none.is_empty(), "{none:?}");
    let good_key = "198.18.0.80:80/tcp";
    assert_eq!(
        backends(&baseline, good_key),
        ["198.18.10.1", "198.18.10.2"]
    );

    let many_ports = |n: u32| {
        serde_json::Value::Array(
            (1..=n)
                .map(|p| serde_json::json!({"name": format!("p{p}"), "port": p, "protocol": "TCP", "targetPort": 8080}))
                .collect(),
        )
    };
    let ok_slice = || lb_slice("bad", "1", &["198.18.10.9"]);
    // (what, the bad Services, their slices, expected reason, expected text, bad's ports served)
    type Case = (
        &'static str,
        Vec<Service>,
        Vec<EndpointSlice>,
        WarningReason,
        &'static str,
        usize,
    );
    let cases: Vec<Case> = vec![
        (
            "VIP that does not parse",
            vec![lb_service("bad", 1, &["198.18.0.300"], http_port())],
            vec![ok_slice()],
            WarningReason::InvalidAddress,
            "VIP \"198.18.0.300\" is not an IP address; skipped",
            0,
        ),
        (
            "multicast VIP",
            vec![lb_service("bad", 1, &["224.0.0.5"], http_port())],
            vec![ok_slice()],
            WarningReason::InvalidAddress,
            "VIP 224.0.0.5 is a multicast address, not a unicast address; skipped",
            0,
        ),
        (
            "unspecified VIP",
            vec![lb_service("bad", 1, &["0.0.0.0"], http_port())],
            vec![ok_slice()],
            WarningReason::InvalidAddress,
            "VIP 0.0.0.0 is the unspecified address",
            0,
        ),
        (
            "broadcast VIP next to a good one",
            vec![lb_service(
                "bad",
                1,
                &["255.255.255.255", "198.18.0.81"],
                http_port(),
            )],
            vec![ok_slice()],
            WarningReason::InvalidAddress,
            "VIP 255.255.255.255 is the broadcast address",
            1,
        ),
        (
            "port 0 next to a good port",
            vec![lb_service(
                "bad",
                1,
                &["198.18.0.81"],
                serde_json::json!([
                    {"name": "zero", "port": 0, "protocol": "TCP", "targetPort": 8080},
                    {"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}
                ]),
            )],
            vec![ok_slice()],
            WarningReason::InvalidPort,
            "zero",
            1,
        ),
        (
            "endpoint addresses that are garbage or multicast",
            vec![lb_service("bad", 1, &["198.18.0.81"], http_port())],
            vec![lb_slice(
                "bad",
                "1",
                &["198.18.10.x", "224.0.0.9", "198.18.10.9"],
            )],
            WarningReason::InvalidAddress,
            "endpoint address \"198.18.10.x\" in an IPv4 EndpointSlice is not a unicast IPv4 address; skipped",
            1,
        ),
        (
            "more ports than the data plane holds, with an older Service holding most",
            vec![
                lb_service("bad", 2, &["198.18.0.82"], many_ports(20_000)),
                lb_service("older", 1, &["198.18.0.81"], many_ports(20_000)),
            ],
            vec![ok_slice(), lb_slice("older", "1", &["198.18.10.8"])],
            WarningReason::CapacityExceeded,
            "ports not served: the data plane holds at most 32768 service ports",
            // 32768 in all: the good one, the older one's 20000, and the rest for bad.
            32_768 - 1 - 20_000,
        ),
    ];
    for (what, bad, slices, reason, text, served) in cases {
        let mut services = bad.clone();
        services.push(good.clone());
        let mut all_slices = slices.clone();
        all_slices.push(good_slice.clone());
        let (state, warnings) = desired_state(&services, &all_slices, &nodes, &cfg, "node-a");
        assert_eq!(
            state.services.get(&addr(good_key)),
            baseline.services.get(&addr(good_key)),
            "{what}: the good Service changed"
        );
        assert!(
            warnings
                .iter()
                .any(|w| w.name == "bad" && w.reason == reason && w.message.contains(text)),
            "{what}: no {reason} warning with {text:?} on bad: {warnings:#?}"
        );
        assert!(
            warnings.len() <= 3,
            "{what}: one warning per problem, not per port: {}",
            warnings.len()
        );
        assert!(
            warnings.iter().all(|w| w.name == "bad"),
            "{what}: {warnings:#?}"
        );
        let bad_ports = state
            .services
            .values()
            .filter(|s| s.name.starts_with("default/bad:"))
            .count();
        assert_eq!(bad_ports, served, "{what}");
    }

    // The same endpoint twice in a slice and again in a second slice is one backend.
    let services = [lb_service("bad", 1, &["198.18.0.81"], http_port()), good];
    let slices = [
        lb_slice("bad", "1", &["198.18.10.9", "198.18.10.9"]),
        lb_slice("bad", "2", &["198.18.10.9", "198.18.10.7"]),
        good_slice,
    ];
    let (state, warnings) = desired_state(&services, &slices, &nodes, &cfg, "node-a");
    assert!(warnings.is_empty(), "{warnings:#?}");
    assert_eq!(
        backends(&state, "198.18.0.81:80/tcp"),
        ["198.18.10.7", "198.18.10.9"]
    );
}

/// `xdp-lb.io/fragments`: `true` gives each protocol's first port the VIP's fragments, a
/// list names ports (one per protocol), anything else is warned about; the oldest Service
/// on a VIP keeps its fragments. The data plane lets the fragments through to the local
/// endpoints of those ports only (`DNAT_FRAGMENTS` entries).
#[test]
fn the_fragments_annotation_gives_one_port_per_protocol_its_vip_s_fragments() {
    let nodes: Vec<Node> = read_list("nodes.json");
    let cfg = K8sConfig::default();
    let ports = serde_json::json!([
        {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 5353},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 5353},
        {"name": "alt", "port": 5300, "protocol": "UDP", "targetPort": 5353},
    ]);
    let annotated = |name: &str, minute: u32, value: Option<&str>, ports: &serde_json::Value| {
        let mut svc = lb_service(name, minute, &["198.18.0.90"], ports.clone());
        if let Some(v) = value {
            svc.metadata.annotations =
                Some([("xdp-lb.io/fragments".to_string(), v.to_string())].into());
        }
        svc
    };
    let slice = |service: &str| -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": format!("{service}-1"), "namespace": "default",
                "labels": {"kubernetes.io/service-name": service}
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["198.18.10.5"], "conditions": {"ready": true}, "nodeName": "node-a"}],
            "ports": [
                {"name": "dns", "port": 5353, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 5353, "protocol": "TCP"},
                {"name": "alt", "port": 5353, "protocol": "UDP"},
                {"name": "other", "port": 5400, "protocol": "UDP"}
            ]
        }))
        .expect("an EndpointSlice")
    };
    let taking = |state: &DesiredState| -> Vec<String> {
        state
            .services
            .iter()
            .filter(|(_, s)| s.fragments)
            .map(|(a, _)| a.to_string())
            .collect()
    };
    let cases: [(Option<&str>, &[&str], Option<&str>); 6] = [
        (None, &[], None),
        (Some("False"), &[], None),
        (
            Some("true"),
            &["198.18.0.90:53/tcp", "198.18.0.90:53/udp"],
            None,
        ),
        (Some(" dns-tcp "), &["198.18.0.90:53/tcp"], None),
        // 53 names the first port numbered so, a second UDP port after 5300.
        (
            Some("5300,53"),
            &["198.18.0.90:5300/udp"],
            Some("port 53 is a second udp port"),
        ),
        (Some("yes"), &[], Some("\"yes\" is not a TCP or UDP port")),
    ];
    for (value, want, warning) in cases {
        let services = [annotated("dns", 1, value, &ports)];
        let (state, warnings) = desired_state(&services, &[slice("dns")], &nodes, &cfg, "node-a");
        assert_eq!(taking(&state), want, "{value:?}");
        match warning {
            None => assert!(warnings.is_empty(), "{value:?}: {warnings:#?}"),
            Some(text) => assert!(
                warnings.len() == 1
                    && warnings[0].reason == WarningReason::InvalidAnnotation
                    && warnings[0].message.contains(text),
                "{value:?}: {warnings:#?}"
            ),
        }
        // The pod here gets the fragments entry of exactly those ports' (VIP, protocol).
        let frag_entries: Vec<u8> = lb_agent::sync::dnat_entries(&state)
            .keys()
            .filter(|k| k.port_be == lb_common::DNAT_FRAGMENTS)
            .map(|k| k.proto)
            .collect();
        let mut want_protos: Vec<u8> = want.iter().map(|a| addr(a).protocol.number()).collect();
        want_protos.sort();
        assert_eq!(frag_entries, want_protos, "{value:?}");
    }

    // A younger Service on the same VIP asking for the UDP fragments gets a warning; the
    // older one keeps them.
    let other_ports = serde_json::json!([{"name": "other", "port": 5400, "protocol": "UDP"}]);
    let services = [
        annotated("younger", 2, Some("true"), &other_ports),
        annotated("dns", 1, Some("true"), &ports),
    ];
    let (state, warnings) = desired_state(
        &services,
        &[slice("dns"), slice("younger")],
        &nodes,
        &cfg,
        "node-a",
    );
    assert_eq!(taking(&state), ["198.18.0.90:53/tcp", "198.18.0.90:53/udp"]);
    assert!(!service(&state, "198.18.0.90:5400/udp").fragments);
    assert_eq!(
        reasons(&warnings),
        [w("default/younger", WarningReason::FragmentsConflict)],
        "{warnings:#?}"
    );
    assert!(
        warnings[0]
            .message
            .contains("the udp fragments of 198.18.0.90 already go to service default/dns"),
        "{}",
        warnings[0].message
    );
}
