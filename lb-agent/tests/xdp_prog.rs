//! BPF_PROG_TEST_RUN on the real object: input frame → expected action and exact output bytes.
//! Needs root (loading BPF); fails with a clear message otherwise.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_agent::{
    EBPF_OBJECT,
    dataplane::Dataplane,
    state::{BackendSpec, DesiredState, Protocol, ServiceAddr, ServiceSpec},
    sync::{self, MapSnapshot},
};
use lb_common::{Forwarding, Reason, hash::flow_hash_v4, maps};
use lb_testkit::packet::{PacketBuilder, Tcp, arp_request, hexdump, ipv4_checksum, tcp_flags};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const ENCAP_SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const PORT_IPIP: u16 = 53;
const PORT_L2: u16 = 54;
const PORT_TCP: u16 = 80;
const PORT_EMPTY: u16 = 55;

fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 10 + i)
}

fn backend_mac(ip: Ipv4Addr) -> [u8; 6] {
    [0x02, 0, 0, 0, 0, ip.octets()[3]]
}

struct Fixture {
    ebpf: Ebpf,
    dataplane: Dataplane,
    snapshot: MapSnapshot,
    desired: DesiredState,
}

fn service(
    name: &str,
    forwarding: Forwarding,
    backends: &[Ipv4Addr],
    with_mac: bool,
) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        forwarding,
        table_size: None,
        flow_tracking: false,
        backends: backends
            .iter()
            .map(|ip| {
                (
                    IpAddr::V4(*ip),
                    BackendSpec {
                        weight: 1,
                        mac: with_mac.then(|| backend_mac(*ip)),
                    },
                )
            })
            .collect(),
    }
}

fn fixture() -> Fixture {
    assert!(
        nix::unistd::geteuid().is_root(),
        "BPF_PROG_TEST_RUN tests load BPF programs: run them as root (cargo xtask test does)"
    );
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(maps::MAGLEV, 1 << 16)
        .load(EBPF_OBJECT)
        .expect("load object");
    let prog: &mut Xdp = ebpf.program_mut(maps::PROG_LB).unwrap().try_into().unwrap();
    prog.load().expect("verifier accepts lb_xdp");
    let prog: &mut Xdp = ebpf
        .program_mut(maps::PROG_DECAP)
        .unwrap()
        .try_into()
        .unwrap();
    prog.load().expect("verifier accepts lb_decap");
    let mut dataplane = Dataplane::from_ebpf(&mut ebpf).unwrap();

    let three: Vec<Ipv4Addr> = (1..=3).map(backend_ip).collect();
    let mut desired = DesiredState::default();
    let addr = |port, protocol| ServiceAddr {
        vip: IpAddr::V4(VIP),
        port,
        protocol,
    };
    desired.services.insert(
        addr(PORT_IPIP, Protocol::Udp),
        service("dns", Forwarding::Ipip, &three, true),
    );
    desired.services.insert(
        addr(PORT_L2, Protocol::Udp),
        service("dns-l2", Forwarding::L2, &three, true),
    );
    desired.services.insert(
        addr(PORT_TCP, Protocol::Tcp),
        ServiceSpec {
            flow_tracking: true,
            ..service("web", Forwarding::Ipip, &three, true)
        },
    );
    // Its only backend has no MAC: programmed with an empty table.
    desired.services.insert(
        addr(PORT_EMPTY, Protocol::Udp),
        service("empty", Forwarding::Ipip, &[backend_ip(9)], false),
    );
    let snapshot = dataplane.snapshot().unwrap();
    let mut f = Fixture {
        ebpf,
        dataplane,
        snapshot,
        desired: DesiredState::default(),
    };
    f.program(desired);
    f
}

impl Fixture {
    /// Bring the maps to `desired` the way the agent does (plan + apply).
    fn program(&mut self, desired: DesiredState) {
        let node = sync::node_config(&desired, LB_MAC, ENCAP_SRC);
        let plan = sync::plan(&desired, node, &BTreeMap::new(), &self.snapshot).unwrap();
        self.dataplane.apply(&plan.ops).unwrap();
        self.snapshot = self.dataplane.snapshot().unwrap();
        self.desired = desired;
    }

    fn run(&mut self, prog: &str, input: &[u8]) -> (u32, Vec<u8>) {
        let prog: &mut Xdp = self.ebpf.program_mut(prog).unwrap().try_into().unwrap();
        let mut out = vec![0u8; input.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(input);
        opts.data_out = Some(&mut out);
        let result = prog.test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// The backend the data plane must pick, from the table in the map and the shared hash.
    fn expected_backend(&self, proto: Protocol, sport: u16, dport: u16) -> Ipv4Addr {
        let key = sync::service_key(&ServiceAddr {
            vip: IpAddr::V4(VIP),
            port: dport,
            protocol: proto,
        });
        let svc = self.snapshot.services[&key];
        let table = self.dataplane.table(&svc).unwrap();
        let h = flow_hash_v4(
            u32::from_ne_bytes(CLIENT.octets()),
            u32::from_ne_bytes(VIP.octets()),
            sport.to_be(),
            dport.to_be(),
            proto.number(),
        );
        let id = table[(h % svc.table_size) as usize];
        let b = self.snapshot.backends[&id];
        Ipv4Addr::new(b.addr_be[0], b.addr_be[1], b.addr_be[2], b.addr_be[3])
    }

    fn reason(&self, r: Reason) -> u64 {
        let stats = self.dataplane.stats([], []).unwrap();
        stats
            .reasons
            .iter()
            .find(|(x, _)| *x == r)
            .map(|(_, c)| c.packets)
            .unwrap_or(0)
    }
}

fn udp_to(dst: Ipv4Addr, sport: u16, dport: u16) -> PacketBuilder {
    PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv4(CLIENT, dst)
        .udp(sport, dport, b"hello dns")
}

/// The frame IPIP forwarding must produce: new Ethernet header (and VLAN tag), an outer
/// IPv4 header built independently here, then the original IP packet byte for byte.
fn ipip_expected(input: &[u8], l3_off: usize, backend: Ipv4Addr) -> Vec<u8> {
    let inner = &input[l3_off..];
    let inner_len = u16::from_be_bytes([inner[2], inner[3]]) as usize;
    let df = inner[6] & 0x40;
    let mut outer = vec![0x45, inner[1]];
    outer.extend_from_slice(&((inner_len + 20) as u16).to_be_bytes());
    outer.extend_from_slice(&[0, 0, df, 0, 64, 4, 0, 0]);
    outer.extend_from_slice(&ENCAP_SRC.octets());
    outer.extend_from_slice(&backend.octets());
    let c = ipv4_checksum(&outer);
    outer[10..12].copy_from_slice(&c.to_be_bytes());
    let mut out = Vec::new();
    out.extend_from_slice(&backend_mac(backend));
    out.extend_from_slice(&LB_MAC);
    out.extend_from_slice(&input[12..l3_off]); // ethertype, or VLAN tag + ethertype
    out.extend_from_slice(&outer);
    out.extend_from_slice(inner);
    out
}

fn l2_expected(input: &[u8], backend: Ipv4Addr) -> Vec<u8> {
    let mut out = input.to_vec();
    out[..6].copy_from_slice(&backend_mac(backend));
    out[6..12].copy_from_slice(&LB_MAC);
    out
}

fn assert_frame(name: &str, got: (u32, Vec<u8>), action: u32, bytes: &[u8]) {
    assert_eq!(got.0, action, "{name}: action");
    assert!(
        got.1 == bytes,
        "{name}: output differs\n got:\n{}\n expected:\n{}",
        hexdump(&got.1),
        hexdump(bytes)
    );
}

/// (name, input, l3 offset, protocol, source port, destination port, forwarding mode)
struct ForwardCase(&'static str, Vec<u8>, usize, Protocol, u16, u16, Forwarding);

#[test]
fn forwarding_cases_produce_exact_frames() {
    let mut f = fixture();
    let tcp_syn = |sport| Tcp {
        sport,
        dport: PORT_TCP,
        seq: 1,
        flags: tcp_flags::SYN,
        ..Tcp::default()
    };
    let cases: Vec<ForwardCase> = vec![
        ForwardCase(
            "udp ipip",
            udp_to(VIP, 40000, PORT_IPIP).build(),
            14,
            Protocol::Udp,
            40000,
            PORT_IPIP,
            Forwarding::Ipip,
        ),
        ForwardCase(
            "udp ipip DF",
            udp_to(VIP, 40001, PORT_IPIP)
                .dont_fragment()
                .tos(0xb8)
                .build(),
            14,
            Protocol::Udp,
            40001,
            PORT_IPIP,
            Forwarding::Ipip,
        ),
        ForwardCase(
            "udp l2",
            udp_to(VIP, 40002, PORT_L2).build(),
            14,
            Protocol::Udp,
            40002,
            PORT_L2,
            Forwarding::L2,
        ),
        ForwardCase(
            "tcp syn ipip",
            PacketBuilder::new()
                .eth(CLIENT_MAC, LB_MAC)
                .ipv4(CLIENT, VIP)
                .dont_fragment()
                .tcp(tcp_syn(40003), b"")
                .build(),
            14,
            Protocol::Tcp,
            40003,
            PORT_TCP,
            Forwarding::Ipip,
        ),
        ForwardCase(
            "tcp data ipip",
            PacketBuilder::new()
                .eth(CLIENT_MAC, LB_MAC)
                .ipv4(CLIENT, VIP)
                .tcp(
                    Tcp {
                        flags: tcp_flags::ACK | tcp_flags::PSH,
                        ..tcp_syn(40004)
                    },
                    b"GET / HTTP/1.0\r\n\r\n",
                )
                .build(),
            14,
            Protocol::Tcp,
            40004,
            PORT_TCP,
            Forwarding::Ipip,
        ),
        ForwardCase(
            "ipv4 options ipip",
            udp_to(VIP, 40005, PORT_IPIP)
                .ip_options(&[0x94, 0x04, 0, 0, 1, 1, 1, 0])
                .build(),
            14,
            Protocol::Udp,
            40005,
            PORT_IPIP,
            Forwarding::Ipip,
        ),
        ForwardCase(
            "vlan ipip",
            udp_to(VIP, 40006, PORT_IPIP).vlan(42).build(),
            18,
            Protocol::Udp,
            40006,
            PORT_IPIP,
            Forwarding::Ipip,
        ),
        ForwardCase(
            "vlan l2",
            udp_to(VIP, 40007, PORT_L2).vlan(42).build(),
            18,
            Protocol::Udp,
            40007,
            PORT_L2,
            Forwarding::L2,
        ),
    ];
    let tx_before = f.reason(Reason::TxIpip) + f.reason(Reason::TxL2);
    for ForwardCase(name, input, l3_off, proto, sport, dport, mode) in &cases {
        let backend = f.expected_backend(*proto, *sport, *dport);
        let expected = match mode {
            Forwarding::Ipip => ipip_expected(input, *l3_off, backend),
            Forwarding::L2 => l2_expected(input, backend),
        };
        let got = f.run(maps::PROG_LB, input);
        assert_frame(name, got, XDP_TX, &expected);
    }
    let tx_after = f.reason(Reason::TxIpip) + f.reason(Reason::TxL2);
    assert_eq!(tx_after - tx_before, cases.len() as u64, "tx counters");
}

#[test]
fn packets_that_are_not_ours_pass_untouched() {
    let mut f = fixture();
    let cases: Vec<(&str, Vec<u8>, u32, Reason)> = vec![
        (
            "non-VIP address",
            udp_to(Ipv4Addr::new(198, 18, 0, 101), 40000, PORT_IPIP).build(),
            XDP_PASS,
            Reason::PassNotVip,
        ),
        (
            "VIP, other port",
            udp_to(VIP, 40000, 9999).build(),
            XDP_PASS,
            Reason::PassNotVip,
        ),
        (
            "VIP, tcp on udp port",
            PacketBuilder::new()
                .eth(CLIENT_MAC, LB_MAC)
                .ipv4(CLIENT, VIP)
                .tcp(
                    Tcp {
                        sport: 1,
                        dport: PORT_IPIP,
                        ..Tcp::default()
                    },
                    b"",
                )
                .build(),
            XDP_PASS,
            Reason::PassNotVip,
        ),
        (
            "VIP, icmp",
            PacketBuilder::new()
                .eth(CLIENT_MAC, LB_MAC)
                .ipv4(CLIENT, VIP)
                .raw(1, &[8, 0, 0xf7, 0xff, 0, 0, 0, 0])
                .build(),
            XDP_PASS,
            Reason::PassNotVip,
        ),
        (
            "arp",
            arp_request(CLIENT_MAC, CLIENT, VIP),
            XDP_PASS,
            Reason::PassNotIp,
        ),
        (
            "ipv6",
            PacketBuilder::new()
                .eth(CLIENT_MAC, LB_MAC)
                .ipv6(
                    "2001:db8::1".parse().unwrap(),
                    "2001:db8::2".parse().unwrap(),
                )
                .udp(1, 53, b"x")
                .build(),
            XDP_PASS,
            Reason::PassNotIp,
        ),
        (
            "first fragment",
            udp_to(VIP, 40000, PORT_IPIP).more_fragments().build(),
            XDP_PASS,
            Reason::PassFragment,
        ),
        (
            "later fragment",
            PacketBuilder::new()
                .eth(CLIENT_MAC, LB_MAC)
                .ipv4(CLIENT, VIP)
                .frag_offset(10)
                .raw(17, b"payload!")
                .build(),
            XDP_PASS,
            Reason::PassFragment,
        ),
        (
            "ip length beyond frame",
            udp_to(VIP, 40000, PORT_IPIP).ip_len_override(1000).build(),
            XDP_PASS,
            Reason::PassMalformed,
        ),
        (
            "ip length shorter than header",
            udp_to(VIP, 40000, PORT_IPIP).ip_len_override(19).build(),
            XDP_PASS,
            Reason::PassMalformed,
        ),
        (
            "ip length cuts udp header",
            udp_to(VIP, 40000, PORT_IPIP).ip_len_override(26).build(),
            XDP_PASS,
            Reason::PassMalformed,
        ),
        (
            "no backend",
            udp_to(VIP, 40000, PORT_EMPTY).build(),
            XDP_DROP,
            Reason::DropNoBackend,
        ),
    ];
    for (name, input, action, reason) in cases {
        let before = f.reason(reason);
        let got = f.run(maps::PROG_LB, &input);
        assert_frame(name, got, action, &input);
        assert_eq!(
            f.reason(reason) - before,
            1,
            "{name}: counted as {}",
            reason.name()
        );
    }
}

#[test]
fn truncated_packets_pass_untouched_at_every_length() {
    let mut f = fixture();
    let frames = [
        ("udp", udp_to(VIP, 40000, PORT_IPIP).build()),
        (
            "tcp",
            PacketBuilder::new()
                .eth(CLIENT_MAC, LB_MAC)
                .ipv4(CLIENT, VIP)
                .tcp(
                    Tcp {
                        sport: 5,
                        dport: PORT_TCP,
                        ..Tcp::default()
                    },
                    b"",
                )
                .build(),
        ),
        ("vlan udp", udp_to(VIP, 40000, PORT_IPIP).vlan(7).build()),
        (
            "options udp",
            udp_to(VIP, 40000, PORT_IPIP)
                .ip_options(&[1, 1, 1, 0])
                .build(),
        ),
    ];
    for (name, full) in frames {
        let l2 = if name.starts_with("vlan") { 18 } else { 14 };
        let ihl = ((full[l2] & 0x0f) as usize) * 4;
        let l4 = if name == "tcp" { 20 } else { 8 };
        // Every cut that leaves Ethernet whole (the kernel needs 14 bytes) but loses part of
        // the IP or L4 header: the stack, not the load balancer, deals with it.
        for len in 14..l2 + ihl + l4 {
            let input = &full[..len];
            let got = f.run(maps::PROG_LB, input);
            assert_frame(&format!("{name} cut at {len}"), got, XDP_PASS, input);
        }
        // Cut inside the payload: the IP total length no longer fits the frame.
        if full.len() > l2 + ihl + l4 {
            let input = &full[..full.len() - 1];
            let got = f.run(maps::PROG_LB, input);
            assert_frame(&format!("{name} cut in payload"), got, XDP_PASS, input);
        }
    }
}

#[test]
fn decap_restores_the_inner_packet() {
    let mut f = fixture();
    let backend = backend_ip(1);
    for (name, input, l3_off) in [
        ("plain", udp_to(VIP, 40000, PORT_IPIP).build(), 14),
        ("vlan", udp_to(VIP, 40000, PORT_IPIP).vlan(9).build(), 18),
    ] {
        let encapsulated = ipip_expected(&input, l3_off, backend);
        let got = f.run(maps::PROG_DECAP, &encapsulated);
        // Inner packet with the encapsulated frame's L2 header (MACs as received).
        let mut expected = encapsulated[..l3_off].to_vec();
        expected.extend_from_slice(&input[l3_off..]);
        assert_frame(&format!("decap {name}"), got, XDP_PASS, &expected);
    }
    // Not IPIP: untouched.
    let plain = udp_to(backend, 40000, 53).build();
    let got = f.run(maps::PROG_DECAP, &plain);
    assert_frame("decap non-ipip", got, XDP_PASS, &plain);
    // IPIP whose payload is not IPv4: untouched.
    let bogus = PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv4(ENCAP_SRC, backend)
        .raw(4, &[0x60; 40])
        .build();
    let got = f.run(maps::PROG_DECAP, &bogus);
    assert_frame("decap bogus inner", got, XDP_PASS, &bogus);
}

#[test]
fn the_same_flow_always_picks_the_same_backend_and_flows_spread() {
    let mut f = fixture();
    let mut seen = BTreeMap::new();
    for sport in 20000..20300u16 {
        let input = udp_to(VIP, sport, PORT_IPIP).build();
        let (a1, o1) = f.run(maps::PROG_LB, &input);
        let (a2, o2) = f.run(maps::PROG_LB, &input);
        assert_eq!((a1, a2), (XDP_TX, XDP_TX));
        assert_eq!(o1, o2, "flow {sport} changed backend between two packets");
        let dst = Ipv4Addr::new(o1[30], o1[31], o1[32], o1[33]);
        *seen.entry(dst).or_insert(0u32) += 1;
    }
    assert_eq!(seen.len(), 3, "all three backends get flows: {seen:?}");
    for (b, n) in &seen {
        assert!(*n > 60, "backend {b} got only {n} of 300 flows: {seen:?}");
    }
}

fn tcp_to_web(sport: u16, flags: u8) -> Vec<u8> {
    PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv4(CLIENT, VIP)
        .tcp(
            Tcp {
                sport,
                dport: PORT_TCP,
                seq: 7,
                ack: 9,
                flags,
                ..Tcp::default()
            },
            b"x",
        )
        .build()
}

fn outer_dst(frame: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33])
}

fn web_addr() -> ServiceAddr {
    ServiceAddr {
        vip: IpAddr::V4(VIP),
        port: PORT_TCP,
        protocol: Protocol::Tcp,
    }
}

/// Keep the test on one CPU: the flow table is shared, but the flood guard counts per CPU.
fn pin_to_one_cpu() {
    let mut set = nix::sched::CpuSet::new();
    set.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
}

#[test]
fn established_tcp_flows_keep_their_backend_when_backends_are_added() {
    let mut f = fixture();
    let ports: Vec<u16> = (30000..30200).collect();
    let mut first = BTreeMap::new();
    for &p in &ports {
        let (a, out) = f.run(maps::PROG_LB, &tcp_to_web(p, tcp_flags::ACK));
        assert_eq!(a, XDP_TX);
        assert_eq!(
            outer_dst(&out),
            f.expected_backend(Protocol::Tcp, p, PORT_TCP)
        );
        first.insert(p, outer_dst(&out));
    }
    let created = f.reason(Reason::FlowCreated);
    assert!(
        created >= ports.len() as u64,
        "a non-SYN miss is remembered"
    );

    // Three more backends: Maglev now sends about half of these flows elsewhere.
    let mut desired = f.desired.clone();
    let six: Vec<Ipv4Addr> = (1..=6).map(backend_ip).collect();
    desired.services.insert(
        web_addr(),
        ServiceSpec {
            flow_tracking: true,
            ..service("web", Forwarding::Ipip, &six, true)
        },
    );
    f.program(desired);
    let mut would_move = 0;
    for &p in &ports {
        let (_, out) = f.run(maps::PROG_LB, &tcp_to_web(p, tcp_flags::ACK));
        assert_eq!(
            outer_dst(&out),
            first[&p],
            "established flow {p} kept its backend"
        );
        if f.expected_backend(Protocol::Tcp, p, PORT_TCP) != first[&p] {
            would_move += 1;
        }
    }
    assert!(
        would_move > 50,
        "the table change moved {would_move} of 200 flows' Maglev choice"
    );
    // A SYN always takes a fresh decision (a new connection on a reused port).
    let moved = ports
        .iter()
        .copied()
        .find(|&p| f.expected_backend(Protocol::Tcp, p, PORT_TCP) != first[&p])
        .unwrap();
    let (_, out) = f.run(maps::PROG_LB, &tcp_to_web(moved, tcp_flags::SYN));
    assert_eq!(
        outer_dst(&out),
        f.expected_backend(Protocol::Tcp, moved, PORT_TCP)
    );
    // ...and is remembered: the connection's next packet follows it.
    let (_, out2) = f.run(maps::PROG_LB, &tcp_to_web(moved, tcp_flags::ACK));
    assert_eq!(outer_dst(&out2), outer_dst(&out));
}

#[test]
fn flows_of_a_removed_backend_are_rerouted_and_others_stay() {
    let mut f = fixture();
    let ports: Vec<u16> = (31000..31150).collect();
    let mut first = BTreeMap::new();
    for &p in &ports {
        let (_, out) = f.run(maps::PROG_LB, &tcp_to_web(p, tcp_flags::ACK));
        first.insert(p, outer_dst(&out));
    }
    let gone = backend_ip(2);
    let mut desired = f.desired.clone();
    desired.services.insert(
        web_addr(),
        ServiceSpec {
            flow_tracking: true,
            ..service(
                "web",
                Forwarding::Ipip,
                &[backend_ip(1), backend_ip(3)],
                true,
            )
        },
    );
    f.program(desired);
    let rerouted_before = f.reason(Reason::FlowRerouted);
    let mut on_gone = 0;
    for &p in &ports {
        let (a, out) = f.run(maps::PROG_LB, &tcp_to_web(p, tcp_flags::ACK));
        assert_eq!(a, XDP_TX);
        if first[&p] == gone {
            on_gone += 1;
            assert_eq!(
                outer_dst(&out),
                f.expected_backend(Protocol::Tcp, p, PORT_TCP),
                "flow {p} rerouted by Maglev"
            );
        } else {
            assert_eq!(
                outer_dst(&out),
                first[&p],
                "flow {p} on a remaining backend stays"
            );
        }
    }
    assert!(on_gone > 20);
    assert_eq!(f.reason(Reason::FlowRerouted) - rerouted_before, on_gone);
}

#[test]
fn untracked_udp_creates_no_flow_entries() {
    let mut f = fixture();
    let before = f.reason(Reason::FlowCreated);
    for p in 40000..40050u16 {
        let (a, _) = f.run(maps::PROG_LB, &udp_to(VIP, p, PORT_IPIP).build());
        assert_eq!(a, XDP_TX);
    }
    assert_eq!(f.reason(Reason::FlowCreated), before);
    let stats = f
        .dataplane
        .stats(
            [f.snapshot.services[&sync::service_key(&ServiceAddr {
                vip: IpAddr::V4(VIP),
                port: PORT_IPIP,
                protocol: Protocol::Udp,
            })]
                .id],
            [],
        )
        .unwrap();
    let c = stats.services.values().next().unwrap();
    assert_eq!(
        (c.packets, c.new_flows),
        (50, 50),
        "every untracked packet is a Maglev decision"
    );
}

#[test]
fn flood_guard_caps_new_entries_but_forwards_every_flow() {
    pin_to_one_cpu();
    let mut f = fixture();
    let mut desired = f.desired.clone();
    desired.node.flows.new_flows_per_cpu_s = 5;
    f.program(desired);
    let (created, guarded) = (f.reason(Reason::FlowCreated), f.reason(Reason::FlowGuarded));
    for p in 32000..32008u16 {
        let (a, out) = f.run(maps::PROG_LB, &tcp_to_web(p, tcp_flags::SYN));
        assert_eq!(a, XDP_TX, "flow {p} forwarded even when not remembered");
        assert_eq!(
            outer_dst(&out),
            f.expected_backend(Protocol::Tcp, p, PORT_TCP)
        );
    }
    assert_eq!(f.reason(Reason::FlowCreated) - created, 5);
    assert_eq!(f.reason(Reason::FlowGuarded) - guarded, 3);
}
