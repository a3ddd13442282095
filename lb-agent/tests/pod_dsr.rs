//! BPF_PROG_TEST_RUN on the real object for DSR to pods and session affinity: tunnelled
//! packets for this node's endpoints are decapsulated and translated to pod:targetPort
//! (`lb_decap`, also reached from `lb_xdp` by tail call), a local backend is delivered on the
//! node, replies get their VIP and service port back (`lb_revnat`, TC egress), and a client
//! of an affinity service keeps its backend. Exact output bytes: the expected frames are
//! built independently (checksums computed from scratch by the packet builder), so a wrong
//! incremental checksum update fails the comparison. Needs root.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use aya::{Ebpf, programs::SchedClassifier};
use lb_agent::{
    dataplane::Dataplane,
    loader,
    state::{BackendSpec, DesiredState, LocalEndpoint, Protocol, ServiceAddr, ServiceSpec},
    sync::{self, MapSnapshot},
};
use lb_common::{DEFAULT_GUE_PORT, Forwarding, Reason, maps};
mod prog_run;

use prog_run::assert_frame;

use lb_testkit::packet::{IPPROTO_IPIP, IPPROTO_IPV6, PacketBuilder, Tcp, tcp_flags};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_OK: u32 = 0;

const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const PEER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x03];
const ENCAP_SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
const NODE_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
/// A pod on this node, and one elsewhere.
const POD_HERE: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 22);
const POD_THERE: Ipv4Addr = Ipv4Addr::new(198, 18, 6, 11);
const ENCAP_SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 3);
const NODE_ADDR6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
const POD_HERE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 0x22);

const DNS: u16 = 53;
const DNS_TARGET: u16 = 5353;
const WEB: u16 = 80;
const WEB_TARGET: u16 = 8080;
/// UDP service with session affinity over three remote pods.
const STICKY: u16 = 54;
const STICKY_PODS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(198, 18, 6, 1),
    Ipv4Addr::new(198, 18, 6, 2),
    Ipv4Addr::new(198, 18, 6, 3),
];

struct Fixture {
    ebpf: Ebpf,
    dataplane: Dataplane,
    snapshot: MapSnapshot,
}

fn addr(vip: IpAddr, port: u16, protocol: Protocol) -> ServiceAddr {
    ServiceAddr {
        vip,
        port,
        protocol,
    }
}

fn service(name: &str, backends: &[IpAddr], affinity: Option<u32>) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        forwarding: Forwarding::Ipip,
        table_size: None,
        flow_tracking: false,
        source_ranges: None,
        fragments: false,
        affinity_timeout_s: affinity,
        backends: backends
            .iter()
            .map(|ip| {
                (
                    *ip,
                    BackendSpec {
                        weight: 1,
                        mac: Some(PEER_MAC),
                    },
                )
            })
            .collect(),
    }
}

/// DNS (UDP 53 → 5353) and web (TCP 80 → 8080) on VIP and VIP6, each with the pod here;
/// DNS also has a pod elsewhere.
fn desired(sticky_pods: &[Ipv4Addr], affinity_s: u32) -> DesiredState {
    let mut d = DesiredState::default();
    d.node.decap = true;
    // The other node, the tunnels' source.
    d.decap_sources = [IpAddr::from(ENCAP_SRC), ENCAP_SRC6.into()]
        .into_iter()
        .map(ipnet::IpNet::from)
        .collect();
    let dns = addr(VIP.into(), DNS, Protocol::Udp);
    let web = addr(VIP.into(), WEB, Protocol::Tcp);
    let dns6 = addr(VIP6.into(), DNS, Protocol::Udp);
    let web6 = addr(VIP6.into(), WEB, Protocol::Tcp);
    d.services.insert(
        dns,
        service("dns", &[POD_HERE.into(), POD_THERE.into()], None),
    );
    d.services
        .insert(web, service("web", &[POD_HERE.into()], None));
    d.services
        .insert(dns6, service("dns6", &[POD_HERE6.into()], None));
    d.services
        .insert(web6, service("web6", &[POD_HERE6.into()], None));
    for (svc, pod, target) in [
        (dns, IpAddr::from(POD_HERE), DNS_TARGET),
        (web, POD_HERE.into(), WEB_TARGET),
        (dns6, POD_HERE6.into(), DNS_TARGET),
        (web6, POD_HERE6.into(), WEB_TARGET),
    ] {
        d.local_endpoints.insert(
            LocalEndpoint {
                service: svc,
                backend: pod,
            },
            target,
        );
    }
    let sticky: Vec<IpAddr> = sticky_pods.iter().map(|&p| p.into()).collect();
    d.services.insert(
        addr(VIP.into(), STICKY, Protocol::Udp),
        service("sticky", &sticky, Some(affinity_s)),
    );
    d
}

fn fixture() -> Fixture {
    let mut ebpf = prog_run::load_lb();
    loader::install_decap(&mut ebpf).expect("verifier accepts lb_decap; LB_PROGS set");
    let prog: &mut SchedClassifier = ebpf
        .program_mut(maps::PROG_REVNAT)
        .unwrap()
        .try_into()
        .unwrap();
    prog.load().expect("verifier accepts lb_revnat");
    let dataplane = Dataplane::from_ebpf(&mut ebpf).unwrap();
    let snapshot = dataplane.snapshot().unwrap();
    let mut f = Fixture {
        ebpf,
        dataplane,
        snapshot,
    };
    f.program(&desired(&STICKY_PODS, 3600));
    f
}

impl Fixture {
    fn program(&mut self, desired: &DesiredState) {
        let loaded = lb_agent::loader::loaded(&mut self.ebpf).unwrap();
        let node = sync::node_config(desired, NODE_MAC, Some(NODE_ADDR), Some(NODE_ADDR6), loaded);
        let plan = sync::plan(desired, node, &BTreeMap::new(), &self.snapshot).unwrap();
        assert!(plan.unresolved.is_empty(), "{:?}", plan.unresolved);
        self.dataplane.apply(&plan.ops).unwrap();
        self.snapshot = self.dataplane.snapshot().unwrap();
    }

    fn run_xdp(&mut self, prog: &str, input: &[u8]) -> (u32, Vec<u8>) {
        prog_run::run_xdp(&mut self.ebpf, prog, input)
    }

    fn run_revnat(&mut self, input: &[u8]) -> (u32, Vec<u8>) {
        prog_run::run_tc(&mut self.ebpf, maps::PROG_REVNAT, input)
    }

    fn reason(&self, r: Reason) -> u64 {
        prog_run::reason_count(&self.dataplane, r)
    }
}

/// A client packet to `dst`:`dport` (UDP, or a TCP ACK when `tcp`), from `sport`.
fn client_packet(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, tcp: bool) -> PacketBuilder {
    let b = PacketBuilder::new().eth(PEER_MAC, NODE_MAC);
    let b = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => b.ipv4(s, d),
        (IpAddr::V6(s), IpAddr::V6(d)) => b.ipv6(s, d),
        _ => unreachable!("one family"),
    };
    if tcp {
        b.tcp(
            Tcp {
                sport,
                dport,
                seq: 7,
                ack: 9,
                flags: tcp_flags::ACK,
                ..Tcp::default()
            },
            b"GET / HTTP/1.0\r\n\r\n",
        )
    } else {
        b.udp(sport, dport, b"query")
    }
}

/// `inner` (a whole frame) tunnelled from another node to `pod`: IP-in-IP of the pod's
/// family, or GUE.
fn tunnelled(inner: &[u8], pod: IpAddr, gue: bool) -> Vec<u8> {
    let b = PacketBuilder::new().eth(PEER_MAC, NODE_MAC);
    let b = match pod {
        IpAddr::V4(p) => b.ipv4(ENCAP_SRC, p),
        IpAddr::V6(p) => b.ipv6(ENCAP_SRC6, p),
    };
    let proto = if pod.is_ipv4() {
        IPPROTO_IPIP
    } else {
        IPPROTO_IPV6
    };
    if gue {
        b.udp(49200, DEFAULT_GUE_PORT, &inner[14..]).build()
    } else {
        b.raw(proto, &inner[14..]).build()
    }
}

/// (name, client, VIP, pod, service port, target port, TCP?, GUE?)
type Case = (&'static str, IpAddr, IpAddr, IpAddr, u16, u16, bool, bool);

fn cases() -> Vec<Case> {
    let (c4, v4, p4) = (
        IpAddr::from(CLIENT),
        IpAddr::from(VIP),
        IpAddr::from(POD_HERE),
    );
    let (c6, v6, p6) = (
        IpAddr::from(CLIENT6),
        IpAddr::from(VIP6),
        IpAddr::from(POD_HERE6),
    );
    vec![
        ("udp4 ipip", c4, v4, p4, DNS, DNS_TARGET, false, false),
        ("tcp4 ipip", c4, v4, p4, WEB, WEB_TARGET, true, false),
        ("udp4 gue", c4, v4, p4, DNS, DNS_TARGET, false, true),
        ("udp6 ip6ip6", c6, v6, p6, DNS, DNS_TARGET, false, false),
        ("tcp6 ip6ip6", c6, v6, p6, WEB, WEB_TARGET, true, false),
        ("tcp6 gue", c6, v6, p6, WEB, WEB_TARGET, true, true),
    ]
}

#[test]
fn tunnelled_packets_for_local_pods_are_translated_and_replies_restored() {
    let mut f = fixture();
    for (i, (name, client, vip, pod, port, target, tcp, gue)) in cases().into_iter().enumerate() {
        let sport = 40000 + i as u16;
        let inner = client_packet(client, vip, sport, port, tcp).build();
        let input = tunnelled(&inner, pod, gue);
        // What the pod must receive: the client's packet to pod:target, checksums computed
        // from scratch; L2 header as the tunnel arrived.
        let mut expected = input[..12].to_vec();
        expected.extend_from_slice(&client_packet(client, pod, sport, target, tcp).build()[12..]);

        let before = f.reason(Reason::DecapDnat);
        let got = f.run_xdp(maps::PROG_DECAP, &input);
        assert_frame(&format!("{name}: lb_decap"), &got, XDP_PASS, &expected);
        // The node's load balancer hands tunnel packets to the decap program.
        let got = f.run_xdp(maps::PROG_LB, &input);
        assert_frame(&format!("{name}: lb_xdp"), &got, XDP_PASS, &expected);
        assert_eq!(f.reason(Reason::DecapDnat), before + 2, "{name}");

        // The pod's reply leaves with the VIP and service port again.
        let reply = client_packet(pod, client, target, sport, tcp).build();
        let restored = client_packet(vip, client, port, sport, tcp).build();
        let got = f.run_revnat(&reply);
        assert_frame(&format!("{name}: lb_revnat"), &got, TC_ACT_OK, &restored);
        // Other traffic of the pod (another peer port) is left alone.
        let other = client_packet(pod, client, target, sport + 1000, tcp).build();
        let got = f.run_revnat(&other);
        assert_frame(
            &format!("{name}: unrelated egress"),
            &got,
            TC_ACT_OK,
            &other,
        );
    }
}

#[test]
fn udp_without_checksum_stays_without_one() {
    let mut f = fixture();
    let plain = client_packet(CLIENT.into(), VIP.into(), 41000, DNS, false);
    let inner = plain.clone().l4_checksum_override(0).build();
    let input = tunnelled(&inner, POD_HERE.into(), false);
    let mut expected = input[..12].to_vec();
    expected.extend_from_slice(
        &client_packet(CLIENT.into(), POD_HERE.into(), 41000, DNS_TARGET, false)
            .l4_checksum_override(0)
            .build()[12..],
    );
    let got = f.run_xdp(maps::PROG_DECAP, &input);
    assert_frame("udp checksum 0", &got, XDP_PASS, &expected);
}

#[test]
fn tunnel_traffic_not_for_a_local_endpoint_is_only_decapsulated() {
    let mut f = fixture();
    let before = f.reason(Reason::DecapPass);
    // A port nothing maps on a pod here, and the node's own address.
    for (pod, port) in [(POD_HERE, 9999), (NODE_ADDR, DNS)] {
        let inner = client_packet(CLIENT.into(), VIP.into(), 42000, port, false).build();
        let input = tunnelled(&inner, pod.into(), false);
        let mut expected = input[..12].to_vec();
        expected.extend_from_slice(&inner[12..]);
        let got = f.run_xdp(maps::PROG_DECAP, &input);
        assert_frame(&format!("{pod}:{port}"), &got, XDP_PASS, &expected);
    }
    assert_eq!(f.reason(Reason::DecapPass), before + 2);
    // A pod of the service that is not on this node: not our address, passed untouched.
    let before = f.reason(Reason::PassDecapNotAllowed);
    let inner = client_packet(CLIENT.into(), VIP.into(), 42000, DNS, false).build();
    let input = tunnelled(&inner, POD_THERE.into(), false);
    let got = f.run_xdp(maps::PROG_DECAP, &input);
    assert_frame("pod elsewhere", &got, XDP_PASS, &input);
    assert_eq!(f.reason(Reason::PassDecapNotAllowed), before + 1);
    // Without decap on the node, lb_xdp passes tunnel packets untouched.
    let mut d = desired(&STICKY_PODS, 3600);
    d.node.decap = false;
    f.program(&d);
    let inner = client_packet(CLIENT.into(), VIP.into(), 42001, DNS, false).build();
    let input = tunnelled(&inner, POD_HERE.into(), false);
    let got = f.run_xdp(maps::PROG_LB, &input);
    assert_frame("decap off", &got, XDP_PASS, &input);
}

#[test]
fn a_local_backend_is_delivered_on_this_node() {
    let mut f = fixture();
    let before = (f.reason(Reason::LocalBackend), f.reason(Reason::DecapDnat));
    for (client, vip, pod) in [
        (
            IpAddr::from(CLIENT),
            IpAddr::from(VIP),
            IpAddr::from(POD_HERE),
        ),
        (CLIENT6.into(), VIP6.into(), POD_HERE6.into()),
    ] {
        // web's only backend is the pod here.
        let input = client_packet(client, vip, 43000, WEB, true).build();
        let got = f.run_xdp(maps::PROG_LB, &input);
        // Addressed to the node itself, so its stack takes the frame and routes it to the pod.
        let mut expected = NODE_MAC.to_vec();
        expected.extend_from_slice(&NODE_MAC);
        expected
            .extend_from_slice(&client_packet(client, pod, 43000, WEB_TARGET, true).build()[12..]);
        assert_frame(&format!("{vip} local backend"), &got, XDP_PASS, &expected);
    }
    assert_eq!(
        (f.reason(Reason::LocalBackend), f.reason(Reason::DecapDnat)),
        (before.0 + 2, before.1 + 2)
    );
    // A remote pod of the same kind of service still leaves encapsulated.
    let mut seen = BTreeSet::new();
    for sport in 0..64 {
        let input = client_packet(CLIENT.into(), VIP.into(), 44000 + sport, DNS, false).build();
        let (action, out) = f.run_xdp(maps::PROG_LB, &input);
        seen.insert(action);
        if action == XDP_TX {
            assert_eq!(out[30..34], POD_THERE.octets(), "tunnel to the remote pod");
        }
    }
    assert_eq!(seen, BTreeSet::from([XDP_PASS, XDP_TX]), "both pods chosen");
}

/// The pod `lb_xdp` sends a packet from `client`:`sport` of the sticky service to.
fn sticky_backend(f: &mut Fixture, client: Ipv4Addr, sport: u16) -> Ipv4Addr {
    let input = PacketBuilder::new()
        .eth(PEER_MAC, NODE_MAC)
        .ipv4(client, VIP)
        .udp(sport, STICKY, b"hi")
        .build();
    let (action, out) = f.run_xdp(maps::PROG_LB, &input);
    assert_eq!(action, XDP_TX);
    Ipv4Addr::new(out[30], out[31], out[32], out[33])
}

#[test]
fn session_affinity_keeps_each_client_on_its_backend_until_the_timeout() {
    let mut f = fixture();
    let clients: Vec<Ipv4Addr> = (1..=60).map(|i| Ipv4Addr::new(198, 18, 2, i)).collect();
    let mut placed = BTreeMap::new();
    for &c in &clients {
        let first = sticky_backend(&mut f, c, 30000);
        for sport in 30001..30010 {
            assert_eq!(
                sticky_backend(&mut f, c, sport),
                first,
                "{c} changed backend"
            );
        }
        placed.insert(c, first);
    }
    let used: BTreeSet<Ipv4Addr> = placed.values().copied().collect();
    assert_eq!(used.len(), 3, "clients spread over all pods: {placed:?}");
    assert!(f.reason(Reason::AffinityHit) >= 60 * 9);

    // A fourth pod: Maglev would move about a quarter of the clients, affinity keeps them.
    let mut four = STICKY_PODS.to_vec();
    four.push(Ipv4Addr::new(198, 18, 6, 4));
    f.program(&desired(&four, 1));
    for &c in &clients {
        assert_eq!(sticky_backend(&mut f, c, 31000), placed[&c], "{c} moved");
    }
    // New clients do reach the new pod.
    let fresh: BTreeSet<Ipv4Addr> = (1..=60)
        .map(|i| sticky_backend(&mut f, Ipv4Addr::new(198, 18, 3, i), 30000))
        .collect();
    assert!(fresh.contains(&four[3]), "{fresh:?}");

    // After the timeout (1 s now) without packets, clients are placed afresh by Maglev
    // on their address: some move to the new pod.
    std::thread::sleep(Duration::from_millis(2500));
    let moved = clients
        .iter()
        .filter(|&&c| sticky_backend(&mut f, c, 32000) != placed[&c])
        .count();
    assert!(
        (5..=30).contains(&moved),
        "{moved} of 60 clients moved after the timeout (expected about a quarter)"
    );
}

/// Another node, the one `POD_THERE` runs on (`pod_tunnel: node`).
const NODE_THERE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 20);

/// `inner` tunnelled by GUE to a node, naming `pod` in the GUE header (as a load balancer
/// sends to a pod behind its node): outer from the other node to `node`.
fn via_node(inner: &[u8], node: IpAddr, pod: IpAddr, sport: u16, from: IpAddr) -> Vec<u8> {
    let mut payload = Vec::new();
    match pod {
        IpAddr::V4(p) => {
            payload.extend_from_slice(&[1, IPPROTO_IPIP, 0, 0]);
            payload.extend_from_slice(&p.octets());
        }
        IpAddr::V6(p) => {
            payload.extend_from_slice(&[4, IPPROTO_IPV6, 0, 0]);
            payload.extend_from_slice(&p.octets());
        }
    }
    payload.extend_from_slice(&inner[14..]);
    let b = PacketBuilder::new().eth(PEER_MAC, NODE_MAC);
    let b = match (from, node) {
        (IpAddr::V4(s), IpAddr::V4(d)) => b.ipv4(s, d),
        (IpAddr::V6(s), IpAddr::V6(d)) => b.ipv6(s, d),
        _ => unreachable!("one family"),
    };
    b.udp(sport, DEFAULT_GUE_PORT, &payload)
        .l4_checksum_override(0)
        .build()
}

#[test]
fn a_pod_behind_its_node_is_tunnelled_to_the_node_by_gue_naming_the_pod() {
    let mut f = fixture();
    let mut d = desired(&STICKY_PODS, 3600);
    d.pod_nodes.insert(POD_THERE.into(), NODE_THERE.into());
    f.program(&d);
    let before = f.reason(Reason::TxGue);
    let mut sent = 0;
    for sport in 0..64 {
        let inner = client_packet(CLIENT.into(), VIP.into(), 45000 + sport, DNS, false).build();
        let (action, out) = f.run_xdp(maps::PROG_LB, &inner);
        if action != XDP_TX {
            continue;
        }
        sent += 1;
        // The service forwards by ipip; a pod behind its node still gets GUE (only GUE can
        // name it), from this node to the pod's node, with the pod in the GUE header.
        let gue_sport = u16::from_be_bytes([out[34], out[35]]);
        let mut expected = via_node(
            &inner,
            NODE_THERE.into(),
            POD_THERE.into(),
            gue_sport,
            NODE_ADDR.into(),
        );
        // As this node sends it: to the next hop's MAC, from its own.
        expected[..6].copy_from_slice(&PEER_MAC);
        expected[6..12].copy_from_slice(&NODE_MAC);
        assert_frame(
            &format!("port {}", 45000 + sport),
            &(action, out),
            XDP_TX,
            &expected,
        );
    }
    assert!(sent > 0, "the remote pod was chosen");
    assert_eq!(f.reason(Reason::TxGue), before + sent);

    // IPv6: a remote pod of dns6 behind its node; 16 bytes of pod in the GUE header.
    let pod6 = Ipv6Addr::new(0x2001, 0xdb8, 6, 0, 0, 0, 0, 0x11);
    let node6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x20);
    let mut d6 = d.clone();
    d6.services
        .get_mut(&addr(VIP6.into(), DNS, Protocol::Udp))
        .unwrap()
        .backends
        .insert(
            pod6.into(),
            BackendSpec {
                weight: 1,
                mac: Some(PEER_MAC),
            },
        );
    d6.pod_nodes.insert(pod6.into(), node6.into());
    f.program(&d6);
    let mut sent6 = 0;
    for sport in 0..64 {
        let inner = client_packet(CLIENT6.into(), VIP6.into(), 45100 + sport, DNS, false).build();
        let (action, out) = f.run_xdp(maps::PROG_LB, &inner);
        if action != XDP_TX {
            continue;
        }
        sent6 += 1;
        let gue_sport = u16::from_be_bytes([out[54], out[55]]);
        let mut expected = via_node(
            &inner,
            node6.into(),
            pod6.into(),
            gue_sport,
            NODE_ADDR6.into(),
        );
        expected[..6].copy_from_slice(&PEER_MAC);
        expected[6..12].copy_from_slice(&NODE_MAC);
        // Version 6, traffic class 0, and the flow label (the flow hash) as sent.
        assert_eq!(out[14] & 0xf0, 0x60, "IPv6 outer header");
        assert_eq!(out[14] & 0x0f, 0, "traffic class copied (0)");
        expected[15..18].copy_from_slice(&out[15..18]);
        assert_frame(
            &format!("ipv6 port {}", 45100 + sport),
            &(action, out),
            XDP_TX,
            &expected,
        );
    }
    assert!(sent6 > 0, "the remote IPv6 pod was chosen");
    // The status shows the node it goes through.
    let status = lb_agent::status::collect(&f.dataplane).unwrap();
    let dns = status
        .services
        .iter()
        .find(|s| s.address == format!("{VIP}:{DNS}/udp"))
        .unwrap();
    let there = dns
        .backends
        .iter()
        .find(|b| b.address == POD_THERE.to_string())
        .unwrap();
    assert_eq!(there.via.as_deref(), Some("198.18.0.20"));
}

#[test]
fn a_gue_tunnel_to_this_node_naming_a_local_pod_is_translated_to_it() {
    let mut f = fixture();
    let cases: [(&str, IpAddr, IpAddr, IpAddr, IpAddr, IpAddr); 2] = [
        (
            "ipv4",
            CLIENT.into(),
            VIP.into(),
            POD_HERE.into(),
            NODE_ADDR.into(),
            ENCAP_SRC.into(),
        ),
        (
            "ipv6",
            CLIENT6.into(),
            VIP6.into(),
            POD_HERE6.into(),
            NODE_ADDR6.into(),
            ENCAP_SRC6.into(),
        ),
    ];
    for (i, (name, client, vip, pod, node, from)) in cases.into_iter().enumerate() {
        let sport = 46000 + i as u16;
        let inner = client_packet(client, vip, sport, DNS, false).build();
        let input = via_node(&inner, node, pod, 49300, from);
        let mut expected = input[..12].to_vec();
        expected
            .extend_from_slice(&client_packet(client, pod, sport, DNS_TARGET, false).build()[12..]);
        let before = f.reason(Reason::DecapDnat);
        for prog in [maps::PROG_DECAP, maps::PROG_LB] {
            let got = f.run_xdp(prog, &input);
            assert_frame(&format!("{name}: {prog}"), &got, XDP_PASS, &expected);
        }
        assert_eq!(f.reason(Reason::DecapDnat), before + 2, "{name}");
    }
    // Naming a pod that is not on this node: only decapsulated, nothing translated.
    let inner = client_packet(CLIENT.into(), VIP.into(), 46100, DNS, false).build();
    let input = via_node(
        &inner,
        NODE_ADDR.into(),
        POD_THERE.into(),
        49300,
        ENCAP_SRC.into(),
    );
    let mut expected = input[..12].to_vec();
    expected.extend_from_slice(&inner[12..]);
    let before = f.reason(Reason::DecapPass);
    let got = f.run_xdp(maps::PROG_DECAP, &input);
    assert_frame("pod elsewhere", &got, XDP_PASS, &expected);
    assert_eq!(f.reason(Reason::DecapPass), before + 1);
    // From a sender that may not tunnel here: untouched, whatever it names.
    let input = via_node(
        &inner,
        NODE_ADDR.into(),
        POD_HERE.into(),
        49300,
        CLIENT.into(),
    );
    let before = f.reason(Reason::PassDecapNotAllowed);
    let got = f.run_xdp(maps::PROG_DECAP, &input);
    assert_frame("not allowed", &got, XDP_PASS, &input);
    assert_eq!(f.reason(Reason::PassDecapNotAllowed), before + 1);
}

/// An ICMP "fragmentation needed" (IPv4, next-hop MTU `mtu`) quoting `quoted`, with its
/// checksum.
fn frag_needed(mtu: u16, quoted: &[u8]) -> Vec<u8> {
    let mut m = vec![3, 4, 0, 0, 0, 0];
    m.extend_from_slice(&mtu.to_be_bytes());
    m.extend_from_slice(quoted);
    let c = lb_testkit::ipv4_checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// An ICMPv6 "packet too big" (MTU `mtu`) from `src` to `dst` quoting `quoted`.
fn too_big6(src: Ipv6Addr, dst: Ipv6Addr, mtu: u32, quoted: &[u8]) -> Vec<u8> {
    let mut m = vec![2, 0, 0, 0];
    m.extend_from_slice(&mtu.to_be_bytes());
    m.extend_from_slice(quoted);
    let c = lb_testkit::packet::icmpv6_checksum(src, dst, &m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// A router on the client's path.
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 1);

#[test]
fn path_mtu_errors_about_a_pod_s_replies_reach_the_pod_translated() {
    let mut f = fixture();
    let sport = 47000;
    // IPv4: the pod's reply left as VIP:53 → client (lb_revnat); a router says it was too
    // big. The error goes to the VIP, and a load balancer tunnels it to the flow's pod.
    let left = client_packet(VIP.into(), CLIENT.into(), DNS, sport, false).build();
    let sent = client_packet(POD_HERE.into(), CLIENT.into(), DNS_TARGET, sport, false).build();
    let error = PacketBuilder::new()
        .eth(PEER_MAC, NODE_MAC)
        .ipv4(ROUTER, VIP)
        .raw(1, &frag_needed(1400, &left[14..14 + 28]))
        .build();
    // What the pod gets: the error to itself, quoting the packet as it sent it (the quoted
    // UDP checksum stays as it was: nobody checks it).
    let mut quoted = sent[14..14 + 28].to_vec();
    quoted[26..28].copy_from_slice(&left[14 + 26..14 + 28]);
    let translated = PacketBuilder::new()
        .eth(PEER_MAC, NODE_MAC)
        .ipv4(ROUTER, POD_HERE)
        .raw(1, &frag_needed(1400, &quoted))
        .build();
    // IPv6 alike, "packet too big".
    let left6 = client_packet(VIP6.into(), CLIENT6.into(), WEB, sport, true).build();
    let sent6 = client_packet(POD_HERE6.into(), CLIENT6.into(), WEB_TARGET, sport, true).build();
    let error6 = PacketBuilder::new()
        .eth(PEER_MAC, NODE_MAC)
        .ipv6(ROUTER6, VIP6)
        .raw(58, &too_big6(ROUTER6, VIP6, 1400, &left6[14..14 + 48]))
        .build();
    // (Eight bytes of TCP quoted: ports and sequence number, no checksum.)
    let quoted6 = sent6[14..14 + 48].to_vec();
    let translated6 = PacketBuilder::new()
        .eth(PEER_MAC, NODE_MAC)
        .ipv6(ROUTER6, POD_HERE6)
        .raw(58, &too_big6(ROUTER6, POD_HERE6, 1400, &quoted6))
        .build();
    let cases = [
        (
            "ipv4, ipip to the pod",
            tunnelled(&error, POD_HERE.into(), false),
            &translated,
        ),
        (
            "ipv4, gue through the node",
            via_node(
                &error,
                NODE_ADDR.into(),
                POD_HERE.into(),
                49300,
                ENCAP_SRC.into(),
            ),
            &translated,
        ),
        (
            "ipv6, ip6ip6 to the pod",
            tunnelled(&error6, POD_HERE6.into(), false),
            &translated6,
        ),
        (
            "ipv6, gue through the node",
            via_node(
                &error6,
                NODE_ADDR6.into(),
                POD_HERE6.into(),
                49300,
                ENCAP_SRC6.into(),
            ),
            &translated6,
        ),
    ];
    for (name, input, inner) in cases {
        let mut expected = input[..12].to_vec();
        expected.extend_from_slice(&inner[12..]);
        let before = f.reason(Reason::DecapDnat);
        let got = f.run_xdp(maps::PROG_DECAP, &input);
        assert_frame(name, &got, XDP_PASS, &expected);
        assert!(
            lb_testkit::l4_checksum_ok(&got.1[14..]),
            "{name}: ICMP checksum"
        );
        assert_eq!(f.reason(Reason::DecapDnat), before + 1, "{name}");
    }
    // An error quoting a flow no local endpoint serves (another service port) is only
    // decapsulated.
    let other = client_packet(VIP.into(), CLIENT.into(), 9999, sport, false).build();
    let error = PacketBuilder::new()
        .eth(PEER_MAC, NODE_MAC)
        .ipv4(ROUTER, VIP)
        .raw(1, &frag_needed(1400, &other[14..14 + 28]))
        .build();
    let input = tunnelled(&error, POD_HERE.into(), false);
    let mut expected = input[..12].to_vec();
    expected.extend_from_slice(&error[12..]);
    let got = f.run_xdp(maps::PROG_DECAP, &input);
    assert_frame("not a local flow", &got, XDP_PASS, &expected);
}

/// IPv6 fragment header (offset in 8-byte units, M flag, identification) inserted after the
/// fixed header of the IPv6 frame `frame`; what followed becomes the fragment's payload.
fn frag6(frame: &[u8], offset: u16, more: bool, id: u32) -> Vec<u8> {
    let mut f = frame.to_vec();
    let next = f[14 + 6];
    f[14 + 6] = 44;
    let plen = u16::from_be_bytes([f[18], f[19]]) + 8;
    f[18..20].copy_from_slice(&plen.to_be_bytes());
    let off_m = (offset << 3) | u16::from(more);
    let mut header = vec![next, 0];
    header.extend_from_slice(&off_m.to_be_bytes());
    header.extend_from_slice(&id.to_be_bytes());
    f.splice(14 + 40..14 + 40, header);
    f
}

/// A datagram's fragments to a pod here, both families: passed as decapsulated while its
/// service does not take fragments; once it does, the first fragment is translated like a
/// whole packet (address, port, transport checksum), a later one gets the pod's address
/// only, and fragments of another service (TCP web) stay untranslated. The pod's fragmented
/// reply gets the VIP and port back on its first fragment and the VIP on the later ones of
/// the same identification; another identification leaves as it is.
#[test]
fn fragments_reach_the_pods_of_a_service_that_takes_them_and_replies_are_restored() {
    let mut f = fixture();
    let payload = [0x5a; 24];
    const ID: u16 = 0x1234;
    const ID6: u32 = 0x0bad_cafe;
    // (first fragment to the VIP, the same to the pod, later fragment to the VIP, the same
    // to the pod), as inner frames; tunnelled by IP-in-IP.
    let v4 = |dst: Ipv4Addr, dport: u16| {
        let first = PacketBuilder::new()
            .eth(PEER_MAC, NODE_MAC)
            .ipv4(CLIENT, dst)
            .id(ID)
            .more_fragments()
            .udp(43000, dport, &payload)
            .build();
        let later = PacketBuilder::new()
            .eth(PEER_MAC, NODE_MAC)
            .ipv4(CLIENT, dst)
            .id(ID)
            .frag_offset(4)
            .raw(17, &payload)
            .build();
        (first, later)
    };
    let v6 = |dst: Ipv6Addr, dport: u16| {
        let b = PacketBuilder::new()
            .eth(PEER_MAC, NODE_MAC)
            .ipv6(CLIENT6, dst);
        let first = frag6(&b.clone().udp(43000, dport, &payload).build(), 0, true, ID6);
        let later = frag6(&b.raw(17, &payload).build(), 4, false, ID6);
        (first, later)
    };
    let (first4, later4) = v4(VIP, DNS);
    let (first4_pod, later4_pod) = v4(POD_HERE, DNS_TARGET);
    let (first6, later6) = v6(VIP6, DNS);
    let (first6_pod, later6_pod) = v6(POD_HERE6, DNS_TARGET);
    let decapped = |inner: &[u8], pod: IpAddr| {
        let input = tunnelled(inner, pod, false);
        let mut expected = input[..12].to_vec();
        expected.extend_from_slice(&inner[12..]);
        (input, expected)
    };
    let cases = [
        ("v4 first", &first4, &first4_pod, IpAddr::from(POD_HERE)),
        ("v4 later", &later4, &later4_pod, POD_HERE.into()),
        ("v6 first", &first6, &first6_pod, POD_HERE6.into()),
        ("v6 later", &later6, &later6_pod, POD_HERE6.into()),
    ];
    // The service does not take fragments: decapsulated, not translated.
    for (name, to_vip, _, pod) in &cases {
        let (input, untranslated) = decapped(to_vip, *pod);
        let got = f.run_xdp(maps::PROG_DECAP, &input);
        assert_frame(
            &format!("{name}, no fragments"),
            &got,
            XDP_PASS,
            &untranslated,
        );
    }

    let mut d = desired(&STICKY_PODS, 3600);
    for vip in [IpAddr::from(VIP), VIP6.into()] {
        d.services
            .get_mut(&addr(vip, DNS, Protocol::Udp))
            .unwrap()
            .fragments = true;
    }
    f.program(&d);
    let before = f.reason(Reason::DecapDnat);
    for (name, to_vip, to_pod, pod) in &cases {
        let (input, _) = decapped(to_vip, *pod);
        let (_, translated) = decapped(to_pod, *pod);
        let got = f.run_xdp(maps::PROG_DECAP, &input);
        assert_frame(name, &got, XDP_PASS, &translated);
        // Through the node's load balancer too.
        let got = f.run_xdp(maps::PROG_LB, &input);
        assert_frame(&format!("{name}, lb_xdp"), &got, XDP_PASS, &translated);
    }
    assert_eq!(f.reason(Reason::DecapDnat), before + 8);
    // A later TCP fragment to web (its service takes none) stays as it came.
    let web_later = PacketBuilder::new()
        .eth(PEER_MAC, NODE_MAC)
        .ipv4(CLIENT, VIP)
        .id(ID)
        .frag_offset(4)
        .raw(6, &payload)
        .build();
    let (input, untranslated) = decapped(&web_later, POD_HERE.into());
    let got = f.run_xdp(maps::PROG_DECAP, &input);
    assert_frame("tcp later fragment", &got, XDP_PASS, &untranslated);

    // The pod's fragmented reply (pod:5353 → client:43000, the first fragment's 5-tuple was
    // remembered above), and its restored form.
    let reply4 = |src: Ipv4Addr, sport: u16, id: u16| {
        let b = PacketBuilder::new()
            .eth(NODE_MAC, PEER_MAC)
            .ipv4(src, CLIENT)
            .id(id);
        (
            b.clone()
                .more_fragments()
                .udp(sport, 43000, &payload)
                .build(),
            b.frag_offset(4).raw(17, &payload).build(),
        )
    };
    let reply6 = |src: Ipv6Addr, sport: u16, id: u32| {
        let b = PacketBuilder::new()
            .eth(NODE_MAC, PEER_MAC)
            .ipv6(src, CLIENT6);
        (
            frag6(&b.clone().udp(sport, 43000, &payload).build(), 0, true, id),
            frag6(&b.raw(17, &payload).build(), 4, false, id),
        )
    };
    let before = f.reason(Reason::RevNat);
    for (name, (first, later), (first_vip, later_vip), (_, other_id)) in [
        (
            "v4 reply",
            reply4(POD_HERE, DNS_TARGET, ID),
            reply4(VIP, DNS, ID),
            reply4(POD_HERE, DNS_TARGET, ID + 1),
        ),
        (
            "v6 reply",
            reply6(POD_HERE6, DNS_TARGET, ID6),
            reply6(VIP6, DNS, ID6),
            reply6(POD_HERE6, DNS_TARGET, ID6 + 1),
        ),
    ] {
        // A later fragment before its first one: nothing to go by, left alone.
        let got = f.run_revnat(&other_id);
        assert_frame(&format!("{name}, unknown id"), &got, TC_ACT_OK, &other_id);
        let got = f.run_revnat(&first);
        assert_frame(&format!("{name}, first"), &got, TC_ACT_OK, &first_vip);
        let got = f.run_revnat(&later);
        assert_frame(&format!("{name}, later"), &got, TC_ACT_OK, &later_vip);
    }
    assert_eq!(f.reason(Reason::RevNat), before + 4);
}
