//! BPF_PROG_TEST_RUN on the real object: input frame → expected action and exact output bytes.
//! Needs root (loading BPF); fails with a clear message otherwise.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::{Ebpf, programs::Xdp};
use lb_agent::{
    dataplane::Dataplane,
    flowtab,
    state::{BackendSpec, DesiredState, Protocol, ServiceAddr, ServiceSpec},
    sync::{self, MapSnapshot},
};
use lb_common::{
    FlowBucket4, FlowKeyV4, FlowState, Forwarding, Reason,
    flowtab::{self as table_rules, TableKey},
    hash::{flow_hash_v4, flow_hash_v6, gue_source_port},
    maps,
};
mod prog_run;

use prog_run::assert_frame;

use lb_testkit::packet::{PacketBuilder, Tcp, arp_request, ipv4_checksum, tcp_flags};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const ENCAP_SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const ENCAP_SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
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
        source_ranges: None,
        fragments: false,
        affinity_timeout_s: None,
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
    let mut ebpf = prog_run::load_lb();
    let prog: &mut Xdp = ebpf
        .program_mut(maps::PROG_DECAP)
        .unwrap()
        .try_into()
        .unwrap();
    prog.load().expect("verifier accepts lb_decap");
    let dataplane = Dataplane::from_ebpf(&mut ebpf).unwrap();

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
            source_ranges: None,
            fragments: false,
            affinity_timeout_s: None,
            ..service("web", Forwarding::Ipip, &three, true)
        },
    );
    // Its only backend has no MAC: in the table all the same, its packets dropped.
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
        self.program_with_mtu(desired, 0);
    }

    /// As the agent does with the interface's MTU (0: no MTU check).
    fn program_with_mtu(&mut self, desired: DesiredState, mtu: u16) {
        self.program_all(desired, mtu, &BTreeSet::new());
    }

    /// As the agent does once the kernel has failed to resolve the next hops `failed`.
    fn program_with_failed(&mut self, desired: DesiredState, failed: &[Ipv4Addr]) -> sync::Plan {
        let failed = failed.iter().map(|ip| IpAddr::V4(*ip)).collect();
        self.program_all(desired, 0, &failed)
    }

    fn program_all(
        &mut self,
        desired: DesiredState,
        mtu: u16,
        failed: &BTreeSet<IpAddr>,
    ) -> sync::Plan {
        let loaded = lb_agent::loader::loaded(&mut self.ebpf).unwrap();
        let mut node =
            sync::node_config(&desired, LB_MAC, Some(ENCAP_SRC), Some(ENCAP_SRC6), loaded);
        node.mtu = mtu;
        // The MACs the services name are the ones the agent would resolve, but for the
        // next hops that `failed`.
        let mut resolving = desired.clone();
        let mut macs = BTreeMap::new();
        for spec in resolving.services.values_mut() {
            for (ip, b) in &mut spec.backends {
                if let Some(mac) = b.mac.take()
                    && !failed.contains(ip)
                {
                    macs.insert(*ip, mac);
                }
            }
        }
        let hops = sync::NextHops {
            macs: &macs,
            failed,
        };
        let plan = sync::plan_with_hops(
            &resolving,
            node,
            hops,
            &self.snapshot,
            &mut lb_agent::table_cache::TableCache::default(),
        )
        .unwrap();
        self.dataplane.apply(&plan.ops).unwrap();
        self.snapshot = self.dataplane.snapshot().unwrap();
        self.desired = desired;
        plan
    }

    fn run(&mut self, prog: &str, input: &[u8]) -> (u32, Vec<u8>) {
        prog_run::run_xdp(&mut self.ebpf, prog, input)
    }

    /// Let `lb_decap` open tunnels from the load balancer (`ENCAP_SRC`, `ENCAP_SRC6`) to
    /// `destinations`, as `lb-agent decap --allow-source` does on a backend.
    fn allow_decap(&mut self, destinations: &[IpAddr]) {
        let entry = |list, ip: IpAddr| {
            let (prefix_len, addr) = sync::decap_prefix(&ip.into());
            sync::MapOp::AddDecap {
                list,
                prefix_len,
                addr,
            }
        };
        let mut ops = vec![
            entry(sync::DecapList::Sources, ENCAP_SRC.into()),
            entry(sync::DecapList::Sources, ENCAP_SRC6.into()),
        ];
        ops.extend(
            destinations
                .iter()
                .map(|ip| entry(sync::DecapList::Destinations, *ip)),
        );
        self.dataplane.apply(&ops).unwrap();
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
        let slot = lb_common::hash::slot(h, svc.table_size);
        let backend = |id| self.snapshot.backends[&id];
        let id = lb_common::maglev::choose(
            &table,
            slot,
            |id| backend(id).is_unreachable(),
            |id| backend(id).can_take(),
        )
        .expect("a backend that can take it");
        let b = backend(id);
        Ipv4Addr::new(b.addr_be[0], b.addr_be[1], b.addr_be[2], b.addr_be[3])
    }

    fn reason(&self, r: Reason) -> u64 {
        prog_run::reason_count(&self.dataplane, r)
    }
}

fn udp_to(dst: Ipv4Addr, sport: u16, dport: u16) -> PacketBuilder {
    PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv4(CLIENT, dst)
        .udp(sport, dport, b"hello dns")
}

fn l2_expected(input: &[u8], backend: Ipv4Addr) -> Vec<u8> {
    let mut out = input.to_vec();
    out[..6].copy_from_slice(&backend_mac(backend));
    out[6..12].copy_from_slice(&LB_MAC);
    out
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
            Forwarding::Ipip => encap_expected(input, *l3_off, IpAddr::V4(backend), false, 0),
            Forwarding::L2 => l2_expected(input, backend),
            Forwarding::Gue => unreachable!("GUE cases are in the mixed-family test"),
        };
        let got = f.run(maps::PROG_LB, input);
        assert_frame(name, got, XDP_TX, &expected);
    }
    let tx_after = f.reason(Reason::TxIpip) + f.reason(Reason::TxL2);
    assert_eq!(tx_after - tx_before, cases.len() as u64, "tx counters");
}

/// The service-index slot of a UDP port of the VIP.
fn udp_slot(port: u16) -> u32 {
    lb_common::hash::service_slot(&sync::service_key(&ServiceAddr {
        vip: IpAddr::V4(VIP),
        port,
        protocol: Protocol::Udp,
    }))
}

#[test]
fn services_sharing_an_index_slot_are_each_found_and_others_pass() {
    let mut f = fixture();
    // Three UDP ports of the VIP in one slot (a, b: services; c: none), and a port in the
    // slot of PORT_L2 (alone there): its packets meet that service's record and must not
    // match it.
    let taken = [PORT_IPIP, PORT_L2, PORT_EMPTY];
    let mut by_slot: BTreeMap<u32, Vec<u16>> = BTreeMap::new();
    for port in 1000..u16::MAX {
        by_slot.entry(udp_slot(port)).or_default().push(port);
    }
    let triple = by_slot
        .values()
        .find(|ports| ports.len() >= 3 && !taken.iter().any(|t| udp_slot(*t) == udp_slot(ports[0])))
        .expect("some slot holds three ports");
    let (a, b, c) = (triple[0], triple[1], triple[2]);
    let stranger = *by_slot[&udp_slot(PORT_L2)]
        .iter()
        .find(|p| **p != PORT_L2)
        .expect("another port in PORT_L2's slot");

    let mut desired = f.desired.clone();
    let addr = |port| ServiceAddr {
        vip: IpAddr::V4(VIP),
        port,
        protocol: Protocol::Udp,
    };
    desired.services.insert(
        addr(a),
        service("a", Forwarding::L2, &[backend_ip(1)], true),
    );
    desired.services.insert(
        addr(b),
        service("b", Forwarding::L2, &[backend_ip(2)], true),
    );
    f.program(desired.clone());
    assert_eq!(
        f.snapshot.service_slots[&udp_slot(a)],
        lb_common::SLOT_SHARED
    );

    let send = |f: &mut Fixture, port: u16| {
        let input = udp_to(VIP, 40000, port).build();
        (f.run(maps::PROG_LB, &input), input)
    };
    for (port, backend) in [(a, backend_ip(1)), (b, backend_ip(2))] {
        let (got, input) = send(&mut f, port);
        assert_frame(
            &format!("port {port}"),
            got,
            XDP_TX,
            &l2_expected(&input, backend),
        );
    }
    for port in [c, stranger] {
        let before = f.reason(Reason::PassNotVip);
        let (got, input) = send(&mut f, port);
        assert_frame(&format!("port {port}"), got, XDP_PASS, &input);
        assert_eq!(f.reason(Reason::PassNotVip), before + 1, "port {port}");
    }

    // One left in the slot: found through its own record again.
    desired.services.remove(&addr(b));
    f.program(desired);
    assert_ne!(
        f.snapshot.service_slots[&udp_slot(a)],
        lb_common::SLOT_SHARED
    );
    let (got, input) = send(&mut f, a);
    assert_frame(
        "port a alone",
        got,
        XDP_TX,
        &l2_expected(&input, backend_ip(1)),
    );
    let (got, input) = send(&mut f, b);
    assert_frame("port b removed", got, XDP_PASS, &input);
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
            "VIP, icmp timestamp",
            PacketBuilder::new()
                .eth(CLIENT_MAC, LB_MAC)
                .ipv4(CLIENT, VIP)
                .raw(1, &[13, 0, 0xf2, 0xff, 0, 0, 0, 0])
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
            "ipv6, not a VIP",
            PacketBuilder::new()
                .eth(CLIENT_MAC, LB_MAC)
                .ipv6(
                    "2001:db8::1".parse().unwrap(),
                    "2001:db8::2".parse().unwrap(),
                )
                .udp(1, 53, b"x")
                .build(),
            XDP_PASS,
            Reason::PassNotVip,
        ),
        (
            "first fragment to a VIP (no service takes them)",
            udp_to(VIP, 40000, PORT_IPIP).more_fragments().build(),
            XDP_DROP,
            Reason::DropFragment,
        ),
        (
            "later fragment",
            PacketBuilder::new()
                .eth(CLIENT_MAC, LB_MAC)
                .ipv4(CLIENT, VIP)
                .frag_offset(10)
                .raw(17, b"payload!")
                .build(),
            XDP_DROP,
            Reason::DropFragment,
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
            "its only backend has no MAC",
            udp_to(VIP, 40000, PORT_EMPTY).build(),
            XDP_DROP,
            Reason::DropNoNeighbor,
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
    f.allow_decap(&[backend.into()]);
    for (name, input, l3_off) in [
        ("plain", udp_to(VIP, 40000, PORT_IPIP).build(), 14),
        ("vlan", udp_to(VIP, 40000, PORT_IPIP).vlan(9).build(), 18),
    ] {
        let encapsulated = encap_expected(&input, l3_off, IpAddr::V4(backend), false, 0);
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
    let ports = ports_that_fit(&f, 30000, 200);
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
            source_ranges: None,
            fragments: false,
            affinity_timeout_s: None,
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
    // ...and re-points the entry the port already had: the connection's next packet
    // follows it.
    let (_, out2) = f.run(maps::PROG_LB, &tcp_to_web(moved, tcp_flags::ACK));
    assert_eq!(outer_dst(&out2), outer_dst(&out));

    // A SYN of a new connection creates no entry (SYN floods leave no state); its next
    // packet is decided alike by Maglev and remembered.
    let created = f.reason(Reason::FlowCreated);
    let (_, syn) = f.run(maps::PROG_LB, &tcp_to_web(33000, tcp_flags::SYN));
    assert_eq!(
        f.reason(Reason::FlowCreated),
        created,
        "a SYN creates no entry"
    );
    let (_, ack) = f.run(maps::PROG_LB, &tcp_to_web(33000, tcp_flags::ACK));
    assert_eq!(outer_dst(&ack), outer_dst(&syn));
    assert_eq!(
        f.reason(Reason::FlowCreated),
        created + 1,
        "the next packet does"
    );
}

/// `n` client ports of the web service from `first` on whose flows all fit in their
/// buckets under this fixture's secret: in the tests' small table a fifth flow in a bucket
/// would evict one of the four (a test of its own), and with a random secret that happens
/// in about one run of 500.
fn ports_that_fit(f: &Fixture, first: u16, n: usize) -> Vec<u16> {
    let config = f.snapshot.config.unwrap();
    let mut per_bucket = BTreeMap::<u32, usize>::new();
    let ports: Vec<u16> = (first..u16::MAX)
        .filter(|&p| {
            let bucket = table_rules::bucket_index(
                web_flow_key(p).hash(&config.flow_secret),
                config.flow_buckets4,
            );
            let used = per_bucket.entry(bucket).or_default();
            *used += 1;
            *used <= table_rules::WAYS
        })
        .take(n)
        .collect();
    assert_eq!(ports.len(), n);
    ports
}

/// The web service's flow key of client port `sport`.
fn web_flow_key(sport: u16) -> FlowKeyV4 {
    FlowKeyV4::new(
        CLIENT.octets(),
        VIP.octets(),
        sport.to_be(),
        PORT_TCP.to_be(),
        lb_common::PROTO_TCP,
    )
}

/// The web service's flow entry of client port `sport`, and its key.
fn web_flow(f: &mut Fixture, sport: u16) -> (FlowKeyV4, Option<FlowState>) {
    let key = web_flow_key(sport);
    let secret = f.snapshot.config.unwrap().flow_secret;
    (key, flowtab::find(&f.ebpf, &secret, &key).unwrap())
}

fn set_web_flow(f: &mut Fixture, key: FlowKeyV4, state: FlowState) {
    let secret = f.snapshot.config.unwrap().flow_secret;
    flowtab::remember(&mut f.ebpf, &secret, &key, state, state.last_seen).unwrap();
}

#[test]
fn a_remembered_flow_is_followed_until_idle_past_its_timeout() {
    let mut f = fixture();
    let sport = 34000;
    let (_, out) = f.run(maps::PROG_LB, &tcp_to_web(sport, tcp_flags::ACK));
    let maglev = outer_dst(&out);
    let (key, entry) = web_flow(&mut f, sport);
    let entry = entry.expect("a non-SYN miss is remembered");
    // The stamp is the kernel's jiffies now; the timeout is seconds times the measured HZ.
    let now = entry.last_seen;
    let hz = u32::from(f.snapshot.config.unwrap().hz);
    let idle = f.desired.node.flows.tcp_idle_s * hz;
    // Another backend of the same service, which Maglev would not pick for this flow.
    let (other_id, other) = other_web_backend(&f, entry.backend_id);
    assert_ne!(other, maglev);

    // Seen just inside the timeout: the entry's backend is followed, and the stamp renewed.
    let inside = FlowState {
        backend_id: other_id,
        last_seen: now.wrapping_sub(idle - hz),
        ..entry
    };
    set_web_flow(&mut f, key, inside);
    let (_, out) = f.run(maps::PROG_LB, &tcp_to_web(sport, tcp_flags::ACK));
    assert_eq!(outer_dst(&out), other, "a fresh entry is followed");
    let renewed = web_flow(&mut f, sport).1.unwrap();
    assert!(
        renewed.last_seen.wrapping_sub(now) < hz,
        "stamp renewed: {renewed:?}"
    );

    // Seen just past it: decided afresh by Maglev, and remembered so.
    let created = f.reason(Reason::FlowCreated);
    set_web_flow(
        &mut f,
        key,
        FlowState {
            last_seen: now.wrapping_sub(idle + hz),
            ..inside
        },
    );
    let (_, out) = f.run(maps::PROG_LB, &tcp_to_web(sport, tcp_flags::ACK));
    assert_eq!(outer_dst(&out), maglev, "an idle entry is decided afresh");
    assert_eq!(f.reason(Reason::FlowCreated), created + 1);
    let replaced = web_flow(&mut f, sport).1.unwrap();
    assert_eq!(replaced.backend_id, entry.backend_id);
    assert!(replaced.last_seen.wrapping_sub(now) < hz, "{replaced:?}");
}

/// Another backend of the web service than `id`, with its address.
fn other_web_backend(f: &Fixture, id: u32) -> (u32, Ipv4Addr) {
    let web = f.snapshot.services[&sync::service_key(&web_addr())].id;
    f.snapshot
        .backends
        .iter()
        .find(|(other, b)| b.service_id == web && **other != id)
        .map(|(other, b)| {
            (
                *other,
                Ipv4Addr::new(b.addr_be[0], b.addr_be[1], b.addr_be[2], b.addr_be[3]),
            )
        })
        .unwrap()
}

/// An entry whose key matches but whose tag is another key's (what a reader racing a
/// writer of the entry can see) is a miss: the packet is decided by Maglev, never sent to
/// the backend of the entry.
#[test]
fn an_entry_with_another_keys_tag_is_not_followed() {
    let mut f = fixture();
    let sport = 35000;
    let (_, out) = f.run(maps::PROG_LB, &tcp_to_web(sport, tcp_flags::ACK));
    let maglev = outer_dst(&out);
    let (key, entry) = web_flow(&mut f, sport);
    let entry = entry.expect("a non-SYN miss is remembered");
    let (other_id, other) = other_web_backend(&f, entry.backend_id);
    assert_ne!(other, maglev);
    // Point the entry at the other backend, then give it a wrong tag, in place.
    set_web_flow(
        &mut f,
        key,
        FlowState {
            backend_id: other_id,
            ..entry
        },
    );
    let (_, out) = f.run(maps::PROG_LB, &tcp_to_web(sport, tcp_flags::ACK));
    assert_eq!(
        outer_dst(&out),
        other,
        "with its own tag the entry is followed"
    );
    let mut table: aya::maps::Array<_, FlowBucket4> =
        aya::maps::Array::try_from(f.ebpf.map_mut(maps::FLOWTAB4).unwrap()).unwrap();
    let secret = f.snapshot.config.unwrap().flow_secret;
    let index = table_rules::bucket_index(key.hash(&secret), table.len());
    let mut bucket = table.get(&index, 0).unwrap();
    let way = bucket.ways.iter().position(|e| e.key == key).unwrap();
    bucket.ways[way].state.tag ^= 0x10;
    table.set(index, bucket, 0).unwrap();
    let (_, out) = f.run(maps::PROG_LB, &tcp_to_web(sport, tcp_flags::ACK));
    assert_eq!(outer_dst(&out), maglev, "a torn entry is a miss");
    // And the miss remembers the flow again, with the right tag.
    assert_eq!(
        web_flow(&mut f, sport).1.unwrap().backend_id,
        entry.backend_id
    );
}

/// A new flow in a full bucket takes the way idle longest; the others stay.
#[test]
fn a_new_flow_in_a_full_bucket_replaces_the_longest_idle() {
    let mut f = fixture();
    let config = f.snapshot.config.unwrap();
    let (buckets, secret) = (config.flow_buckets4, config.flow_secret);
    let key = |sport: u16| web_flow_key(sport);
    let bucket_of = |sport: u16| table_rules::bucket_index(key(sport).hash(&secret), buckets);
    // Five client ports whose flows share a bucket.
    let target = bucket_of(36000);
    let ports: Vec<u16> = (36000..u16::MAX)
        .filter(|p| bucket_of(*p) == target)
        .take(5)
        .collect();
    assert_eq!(ports.len(), 5, "five ports in one bucket among {buckets}");
    for &p in &ports[..4] {
        f.run(maps::PROG_LB, &tcp_to_web(p, tcp_flags::ACK));
    }
    // Stamp the four older the later they came, so the second is idle longest.
    let now = web_flow(&mut f, ports[0]).1.unwrap().last_seen;
    for (i, &p) in ports[..4].iter().enumerate() {
        let mut state = web_flow(&mut f, p).1.expect("remembered");
        state.last_seen = now.wrapping_sub(if i == 1 { 50 } else { 10 + i as u32 });
        set_web_flow(&mut f, key(p), state);
    }
    f.run(maps::PROG_LB, &tcp_to_web(ports[4], tcp_flags::ACK));
    assert!(
        web_flow(&mut f, ports[4]).1.is_some(),
        "the new flow is remembered"
    );
    assert!(
        web_flow(&mut f, ports[1]).1.is_none(),
        "in place of the longest idle"
    );
    for p in [ports[0], ports[2], ports[3]] {
        assert!(web_flow(&mut f, p).1.is_some(), "port {p} stays");
    }
}

/// The bucket `key` would have in a table of `buckets` by the flow tables' hash without the
/// node's secret: the multiply fold of the key's words with its public constants, which
/// anyone can compute.
fn public_bucket(key: &FlowKeyV4, buckets: u32) -> u32 {
    let (sport, dport) = (key.sport_be.to_ne_bytes(), key.dport_be.to_ne_bytes());
    let ports = u32::from_ne_bytes([sport[0], sport[1], dport[0], dport[1]]);
    let src = u64::from(u32::from_ne_bytes(key.src_be));
    let dst = u64::from(u32::from_ne_bytes(key.dst_be));
    let x = (src << 32 | u64::from(ports)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let y = (dst << 32 | u64::from(key.proto)).wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    table_rules::bucket_index(x ^ y, buckets)
}

/// A sender who aims flows at one bucket by the public hash evicts nobody: the node's
/// secret spreads its flows over the table, and the flow already in that bucket stays.
#[test]
fn flows_aimed_at_one_bucket_by_the_public_hash_do_not_evict_its_flow() {
    const ATTACKERS: usize = 64;
    let mut f = fixture();
    let buckets = f.snapshot.config.unwrap().flow_buckets4;
    let victim_port = 37000;
    f.run(maps::PROG_LB, &tcp_to_web(victim_port, tcp_flags::ACK));
    assert!(
        web_flow(&mut f, victim_port).1.is_some(),
        "the victim is remembered"
    );
    let target = public_bucket(&web_flow_key(victim_port), buckets);
    // Flows of other clients (one /24, any port) that the public hash puts there.
    let attacker_key = |src: Ipv4Addr, sport: u16| {
        FlowKeyV4::new(
            src.octets(),
            VIP.octets(),
            sport.to_be(),
            PORT_TCP.to_be(),
            lb_common::PROTO_TCP,
        )
    };
    let attackers: Vec<FlowKeyV4> = (1..=254u8)
        .flat_map(|host| (1024..=u16::MAX).map(move |p| (Ipv4Addr::new(198, 18, 2, host), p)))
        .map(|(src, sport)| attacker_key(src, sport))
        .filter(|k| public_bucket(k, buckets) == target)
        .take(ATTACKERS)
        .collect();
    assert_eq!(attackers.len(), ATTACKERS);
    for k in &attackers {
        let src = Ipv4Addr::from(k.src_be);
        let frame = PacketBuilder::new()
            .eth(CLIENT_MAC, LB_MAC)
            .ipv4(src, VIP)
            .tcp(
                Tcp {
                    sport: u16::from_be(k.sport_be),
                    dport: PORT_TCP,
                    seq: 7,
                    ack: 9,
                    flags: tcp_flags::ACK,
                    ..Tcp::default()
                },
                b"x",
            )
            .build();
        let (action, _) = f.run(maps::PROG_LB, &frame);
        assert_eq!(action, XDP_TX);
    }
    assert!(
        web_flow(&mut f, victim_port).1.is_some(),
        "the victim's flow was evicted by {ATTACKERS} flows aimed at its bucket"
    );
    // Where the attacker's flows went: remembered, every one, over many buckets.
    let table: aya::maps::Array<_, FlowBucket4> =
        aya::maps::Array::try_from(f.ebpf.map(maps::FLOWTAB4).unwrap()).unwrap();
    let mut used = BTreeSet::new();
    let mut remembered = 0;
    for i in 0..table.len() {
        let bucket = table.get(&i, 0).unwrap();
        for e in &bucket.ways {
            if e.state.tag != 0 && attackers.contains(&e.key) {
                remembered += 1;
                used.insert(i);
            }
        }
    }
    assert_eq!(remembered, ATTACKERS, "every attacker flow is remembered");
    assert!(
        used.len() > ATTACKERS / 2,
        "the attacker's flows share {} buckets",
        used.len()
    );
}

#[test]
fn flows_of_a_removed_backend_are_rerouted_and_others_stay() {
    let mut f = fixture();
    let ports = ports_that_fit(&f, 31000, 150);
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
            source_ranges: None,
            fragments: false,
            affinity_timeout_s: None,
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
        let (a, out) = f.run(maps::PROG_LB, &tcp_to_web(p, tcp_flags::ACK));
        assert_eq!(a, XDP_TX, "flow {p} forwarded even when not remembered");
        assert_eq!(
            outer_dst(&out),
            f.expected_backend(Protocol::Tcp, p, PORT_TCP)
        );
    }
    assert_eq!(f.reason(Reason::FlowCreated) - created, 5);
    assert_eq!(f.reason(Reason::FlowGuarded) - guarded, 3);
}

/// (name, input, expected action, the reason it counts, and for the web service: the client
/// port and whether its flow is remembered afterwards)
struct NoNeighCase(&'static str, Vec<u8>, u32, Reason, Option<(u16, bool)>);

#[test]
fn a_backend_without_a_mac_keeps_its_slots_and_drops_until_it_resolves() {
    let mut f = fixture();
    let unresolved = backend_ip(2);
    let three: Vec<Ipv4Addr> = (1..=3).map(backend_ip).collect();
    let l2_addr = ServiceAddr {
        vip: IpAddr::V4(VIP),
        port: PORT_L2,
        protocol: Protocol::Udp,
    };
    let none_addr = ServiceAddr {
        port: 60,
        ..l2_addr
    };
    // The web (tracked TCP) and dns-l2 services, with or without backend 2's MAC.
    let base = f.desired.clone();
    let with = |resolved: bool| {
        let mut desired = base.clone();
        let web = ServiceSpec {
            flow_tracking: true,
            ..service("web", Forwarding::Ipip, &three, true)
        };
        let l2 = service("dns-l2", Forwarding::L2, &three, true);
        desired.services.insert(web_addr(), web);
        desired.services.insert(l2_addr, l2);
        desired
            .services
            .insert(none_addr, service("none", Forwarding::Ipip, &[], true));
        if !resolved {
            // Nowhere on this node: a next hop's MAC is the node's, whichever service.
            for s in desired.services.values_mut() {
                if let Some(b) = s.backends.get_mut(&IpAddr::V4(unresolved)) {
                    b.mac = None;
                }
            }
        }
        desired
    };
    // The services are new, so the backend has never had a MAC on this node.
    let mut fresh = base.clone();
    fresh.services.remove(&web_addr());
    fresh.services.remove(&l2_addr);
    f.program(fresh);
    f.program(with(false));
    // Client ports whose Maglev choice is (or is not) the backend without a MAC.
    let port = |f: &Fixture, proto, dport, to_it: bool| {
        (40000..41000u16)
            .find(|&p| (f.expected_backend(proto, p, dport) == unresolved) == to_it)
            .expect("the backend without a MAC has its share of the table")
    };
    let bad = port(&f, Protocol::Tcp, PORT_TCP, true);
    let good = port(&f, Protocol::Tcp, PORT_TCP, false);
    let bad_l2 = port(&f, Protocol::Udp, PORT_L2, true);
    let cases = vec![
        NoNeighCase(
            "tcp ack, Maglev picks the backend without a MAC",
            tcp_to_web(bad, tcp_flags::ACK),
            XDP_DROP,
            Reason::DropNoNeighbor,
            Some((bad, false)),
        ),
        NoNeighCase(
            "tcp syn, Maglev picks the backend without a MAC",
            tcp_to_web(bad, tcp_flags::SYN),
            XDP_DROP,
            Reason::DropNoNeighbor,
            Some((bad, false)),
        ),
        NoNeighCase(
            "l2 udp, Maglev picks the backend without a MAC",
            udp_to(VIP, bad_l2, PORT_L2).build(),
            XDP_DROP,
            Reason::DropNoNeighbor,
            None,
        ),
        NoNeighCase(
            "a service without backends",
            udp_to(VIP, 40000, 60).build(),
            XDP_DROP,
            Reason::DropNoBackend,
            None,
        ),
    ];
    for NoNeighCase(name, input, action, reason, flow) in cases {
        let (before, created) = (f.reason(reason), f.reason(Reason::FlowCreated));
        let got = f.run(maps::PROG_LB, &input);
        assert_frame(name, got, action, &input);
        assert_eq!(f.reason(reason) - before, 1, "{name}: {}", reason.name());
        assert_eq!(
            f.reason(Reason::FlowCreated),
            created,
            "{name}: flow created"
        );
        if let Some((sport, remembered)) = flow {
            assert_eq!(web_flow(&mut f, sport).1.is_some(), remembered, "{name}");
        }
    }
    // A resolved backend of the same service forwards and remembers as usual.
    let (a, _) = f.run(maps::PROG_LB, &tcp_to_web(good, tcp_flags::ACK));
    assert_eq!(a, XDP_TX);
    assert!(web_flow(&mut f, good).1.is_some());

    // The MAC resolves: one backend entry per service is rewritten, no table, no service.
    let loaded = lb_agent::loader::loaded(&mut f.ebpf).unwrap();
    let node = sync::node_config(
        &with(true),
        LB_MAC,
        Some(ENCAP_SRC),
        Some(ENCAP_SRC6),
        loaded,
    );
    let plan = sync::plan(&with(true), node, &BTreeMap::new(), &f.snapshot).unwrap();
    assert!(
        plan.ops.len() == 2
            && plan
                .ops
                .iter()
                .all(|op| matches!(op, sync::MapOp::SetBackend { fresh: false, .. })),
        "{:?}",
        plan.ops
    );
    f.program(with(true));
    // The client's retransmission takes the same decision and starts the flow.
    let created = f.reason(Reason::FlowCreated);
    let (a, out) = f.run(maps::PROG_LB, &tcp_to_web(bad, tcp_flags::ACK));
    assert_eq!((a, outer_dst(&out)), (XDP_TX, unresolved));
    assert_eq!(f.reason(Reason::FlowCreated), created + 1);
    let (_, entry) = web_flow(&mut f, bad);
    let id = entry.expect("remembered now").backend_id;
    let input = udp_to(VIP, bad_l2, PORT_L2).build();
    let got = f.run(maps::PROG_LB, &input);
    assert_frame(
        "l2 udp, resolved",
        got,
        XDP_TX,
        &l2_expected(&input, unresolved),
    );

    // The kernel forgets the MAC and is asking again: the entry stays as it is, so the
    // flow keeps flowing while the answer comes.
    let plan = f.program_with_failed(with(false), &[]);
    assert_eq!(
        plan.ops,
        vec![],
        "nothing is written while the MAC is asked again"
    );
    let (a, out) = f.run(maps::PROG_LB, &tcp_to_web(bad, tcp_flags::ACK));
    assert_eq!((a, outer_dst(&out)), (XDP_TX, unresolved));
    assert_eq!(web_flow(&mut f, bad).1.map(|e| e.backend_id), Some(id));
}

#[test]
fn a_gone_backend_s_flows_move_to_the_next_slots_and_the_others_stay() {
    let mut f = fixture();
    let gone = backend_ip(2);
    let ports = ports_that_fit(&f, 41000, 150);
    let before: Vec<Ipv4Addr> = ports
        .iter()
        .map(|&p| {
            let (a, out) = f.run(maps::PROG_LB, &tcp_to_web(p, tcp_flags::ACK));
            assert_eq!(a, XDP_TX);
            outer_dst(&out)
        })
        .collect();
    let on_gone = before.iter().filter(|&&b| b == gone).count();
    assert!(
        on_gone > 20,
        "{on_gone} of {} flows on backend 2",
        ports.len()
    );
    let tables: Vec<_> = f
        .snapshot
        .services
        .values()
        .map(|s| f.dataplane.table(s).unwrap())
        .collect();

    // Its next hop fails: its entry in each of its services is rewritten, nothing else.
    let desired = f.desired.clone();
    let plan = f.program_with_failed(desired.clone(), &[gone]);
    let rewritten = plan
        .ops
        .iter()
        .filter(|op| matches!(op, sync::MapOp::SetBackend { fresh: false, value, .. } if value.is_unreachable()))
        .count();
    assert_eq!(
        (rewritten, plan.ops.len()),
        (3, 3),
        "one entry per service of backend 2: {:?}",
        plan.ops
    );
    let after_tables: Vec<_> = f
        .snapshot
        .services
        .values()
        .map(|s| f.dataplane.table(s).unwrap())
        .collect();
    assert_eq!(
        tables, after_tables,
        "the tables stay a function of the backend set"
    );

    let (rerouted, fallback) = (
        f.reason(Reason::FlowRerouted),
        f.reason(Reason::FallbackUnreachable),
    );
    for (&p, &was) in ports.iter().zip(&before) {
        let (a, out) = f.run(maps::PROG_LB, &tcp_to_web(p, tcp_flags::ACK));
        assert_eq!(a, XDP_TX, "port {p}");
        let now = outer_dst(&out);
        if was == gone {
            assert_ne!(now, gone, "port {p} left the gone backend");
            assert_eq!(
                now,
                f.expected_backend(Protocol::Tcp, p, PORT_TCP),
                "port {p}: the backend of the next slot that can take it"
            );
        } else {
            assert_eq!(now, was, "port {p} stays");
        }
    }
    assert_eq!(f.reason(Reason::FlowRerouted) - rerouted, on_gone as u64);
    assert_eq!(
        f.reason(Reason::FallbackUnreachable) - fallback,
        on_gone as u64
    );
    // Untracked UDP: the same rule, packet by packet, in both forwarding modes.
    for p in 42000..42100u16 {
        let expected = f.expected_backend(Protocol::Udp, p, PORT_IPIP);
        assert_ne!(expected, gone);
        let (a, out) = f.run(maps::PROG_LB, &udp_to(VIP, p, PORT_IPIP).build());
        assert_eq!((a, outer_dst(&out)), (XDP_TX, expected), "udp port {p}");
        let input = udp_to(VIP, p, PORT_L2).build();
        let expected = f.expected_backend(Protocol::Udp, p, PORT_L2);
        let got = f.run(maps::PROG_LB, &input);
        assert_frame(
            "l2, a backend gone",
            got,
            XDP_TX,
            &l2_expected(&input, expected),
        );
    }

    // It comes back: new flows are Maglev's again; the moved ones stay where they went.
    f.program_with_failed(desired, &[]);
    let plan = f.program_with_failed(f.desired.clone(), &[]);
    assert_eq!(plan.ops, vec![]);
    assert!(
        f.snapshot.backends.values().all(|b| !b.is_unreachable()),
        "a resolved MAC clears the mark"
    );
}

// ---- IPv6, mixed families, GUE ----

fn backend6(i: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10 + i)
}

fn mac_of(ip: IpAddr) -> [u8; 6] {
    match ip {
        IpAddr::V4(a) => backend_mac(a),
        IpAddr::V6(a) => [0x02, 0, 0, 0, 0x06, a.octets()[15]],
    }
}

fn service_any(name: &str, forwarding: Forwarding, backends: &[IpAddr]) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        forwarding,
        table_size: None,
        flow_tracking: false,
        source_ranges: None,
        fragments: false,
        affinity_timeout_s: None,
        backends: backends
            .iter()
            .map(|ip| {
                (
                    *ip,
                    BackendSpec {
                        weight: 1,
                        mac: Some(mac_of(*ip)),
                    },
                )
            })
            .collect(),
    }
}

/// Flow hash of a client packet, as the data plane computes it.
fn hash_of(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, proto: u8) -> u32 {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => flow_hash_v4(
            u32::from_ne_bytes(s.octets()),
            u32::from_ne_bytes(d.octets()),
            sport.to_be(),
            dport.to_be(),
            proto,
        ),
        (IpAddr::V6(s), IpAddr::V6(d)) => flow_hash_v6(
            &s.octets(),
            &d.octets(),
            sport.to_be(),
            dport.to_be(),
            proto,
        ),
        _ => unreachable!("mixed-family 5-tuple"),
    }
}

impl Fixture {
    fn expected_backend_any(
        &self,
        src: IpAddr,
        vip: IpAddr,
        proto: Protocol,
        sport: u16,
        dport: u16,
    ) -> IpAddr {
        let key = sync::service_key(&ServiceAddr {
            vip,
            port: dport,
            protocol: proto,
        });
        let svc = self.snapshot.services[&key];
        let table = self.dataplane.table(&svc).unwrap();
        let h = hash_of(src, vip, sport, dport, proto.number());
        let b = self.snapshot.backends[&table[lb_common::hash::slot(h, svc.table_size) as usize]];
        sync::ip_from_bytes(&b.addr_be, b.family).unwrap()
    }
}

/// The frame encapsulation must produce, built independently: L2 (VLAN kept), outer IPv4 or
/// IPv6 header, UDP header for GUE, then the client's IP packet byte for byte.
fn encap_expected(input: &[u8], l3_off: usize, backend: IpAddr, gue: bool, hash: u32) -> Vec<u8> {
    let inner = &input[l3_off..];
    let (inner_len, tos, inner_proto, df) = if inner[0] >> 4 == 4 {
        (
            u16::from_be_bytes([inner[2], inner[3]]) as usize,
            inner[1],
            4u8,
            inner[6] & 0x40,
        )
    } else {
        (
            40 + u16::from_be_bytes([inner[4], inner[5]]) as usize,
            (inner[0] << 4) | (inner[1] >> 4),
            41u8,
            0x40,
        )
    };
    let inner = &inner[..inner_len];
    let udp_len = if gue { 8 } else { 0 };
    let mut out = Vec::new();
    out.extend_from_slice(&mac_of(backend));
    out.extend_from_slice(&LB_MAC);
    match backend {
        IpAddr::V4(b) => {
            out.extend_from_slice(&input[12..l3_off - 2]);
            out.extend_from_slice(&[0x08, 0x00]);
            let mut h = vec![0x45, tos];
            h.extend_from_slice(&((inner_len + 20 + udp_len) as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0, df, 0, 64, if gue { 17 } else { inner_proto }, 0, 0]);
            h.extend_from_slice(&ENCAP_SRC.octets());
            h.extend_from_slice(&b.octets());
            let c = ipv4_checksum(&h);
            h[10..12].copy_from_slice(&c.to_be_bytes());
            out.extend_from_slice(&h);
        }
        IpAddr::V6(b) => {
            out.extend_from_slice(&input[12..l3_off - 2]);
            out.extend_from_slice(&[0x86, 0xdd]);
            let label = hash & 0xf_ffff;
            let first = (6u32 << 28) | (u32::from(tos) << 20) | label;
            out.extend_from_slice(&first.to_be_bytes());
            out.extend_from_slice(&((inner_len + udp_len) as u16).to_be_bytes());
            out.extend_from_slice(&[if gue { 17 } else { inner_proto }, 64]);
            out.extend_from_slice(&ENCAP_SRC6.octets());
            out.extend_from_slice(&b.octets());
        }
    }
    if gue {
        out.extend_from_slice(&gue_source_port(hash).to_be_bytes());
        out.extend_from_slice(&6080u16.to_be_bytes());
        out.extend_from_slice(&((inner_len + 8) as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
    }
    out.extend_from_slice(inner);
    out
}

fn udp6_to(dst: Ipv6Addr, sport: u16, dport: u16) -> PacketBuilder {
    PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv6(CLIENT6, dst)
        .udp(sport, dport, b"hello v6")
}

/// Insert an IPv6 extension header (type `kind`, `body` after the next-header byte, padded
/// by the caller to a multiple of 8 with the length byte) right after the fixed header.
fn with_ext(frame: &[u8], l3_off: usize, kind: u8, ext: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    let next = f[l3_off + 6];
    f[l3_off + 6] = kind;
    let plen = u16::from_be_bytes([f[l3_off + 4], f[l3_off + 5]]) + ext.len() as u16;
    f[l3_off + 4..l3_off + 6].copy_from_slice(&plen.to_be_bytes());
    let mut e = ext.to_vec();
    e[0] = next;
    f.splice(l3_off + 40..l3_off + 40, e);
    f
}

const P6_IPIP: u16 = 53;
const P6_TO_V4: u16 = 54;
const P4_TO_V6: u16 = 56;
const P_GUE: u16 = 57;
const P6_L2: u16 = 58;

fn mixed_fixture() -> Fixture {
    let mut f = fixture();
    let mut desired = f.desired.clone();
    let v6: Vec<IpAddr> = (1..=3).map(|i| IpAddr::V6(backend6(i))).collect();
    let v4: Vec<IpAddr> = (1..=3).map(|i| IpAddr::V4(backend_ip(i))).collect();
    let a6 = |port, protocol| ServiceAddr {
        vip: IpAddr::V6(VIP6),
        port,
        protocol,
    };
    let a4 = |port, protocol| ServiceAddr {
        vip: IpAddr::V4(VIP),
        port,
        protocol,
    };
    desired.services.insert(
        a6(P6_IPIP, Protocol::Udp),
        service_any("ip6ip6", Forwarding::Ipip, &v6),
    );
    desired.services.insert(
        a6(P6_IPIP, Protocol::Tcp),
        service_any("ip6ip6-tcp", Forwarding::Ipip, &v6),
    );
    desired.services.insert(
        a6(P6_TO_V4, Protocol::Udp),
        service_any("6in4", Forwarding::Ipip, &v4),
    );
    desired.services.insert(
        a4(P4_TO_V6, Protocol::Udp),
        service_any("4in6", Forwarding::Ipip, &v6),
    );
    desired.services.insert(
        a4(P_GUE, Protocol::Udp),
        service_any("gue4", Forwarding::Gue, &v4),
    );
    desired.services.insert(
        a4(P_GUE, Protocol::Tcp),
        service_any("gue4-tcp", Forwarding::Gue, &v6),
    );
    desired.services.insert(
        a6(P_GUE, Protocol::Udp),
        service_any("gue6", Forwarding::Gue, &v6),
    );
    desired.services.insert(
        a6(P6_L2, Protocol::Udp),
        service_any("l2-v6", Forwarding::L2, &v6),
    );
    f.program(desired);
    f
}

/// (name, input, l3 offset, client, vip, protocol, source port, destination port, gue)
struct MixedCase(
    &'static str,
    Vec<u8>,
    usize,
    IpAddr,
    IpAddr,
    Protocol,
    u16,
    u16,
    bool,
);

#[test]
fn ipv6_mixed_family_and_gue_cases_produce_exact_frames() {
    let mut f = mixed_fixture();
    let c4 = IpAddr::V4(CLIENT);
    let c6 = IpAddr::V6(CLIENT6);
    let (v4, v6) = (IpAddr::V4(VIP), IpAddr::V6(VIP6));
    let tcp6 = PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv6(CLIENT6, VIP6)
        .tcp(
            Tcp {
                sport: 41000,
                dport: P6_IPIP,
                flags: tcp_flags::SYN,
                ..Tcp::default()
            },
            b"",
        )
        .build();
    let tcp4_gue = PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv4(CLIENT, VIP)
        .dont_fragment()
        .tcp(
            Tcp {
                sport: 41001,
                dport: P_GUE,
                flags: tcp_flags::ACK,
                ..Tcp::default()
            },
            b"data",
        )
        .build();
    let cases: Vec<MixedCase> = vec![
        MixedCase(
            "ip6ip6 udp",
            udp6_to(VIP6, 41002, P6_IPIP).build(),
            14,
            c6,
            v6,
            Protocol::Udp,
            41002,
            P6_IPIP,
            false,
        ),
        MixedCase(
            "ip6ip6 tcp",
            tcp6,
            14,
            c6,
            v6,
            Protocol::Tcp,
            41000,
            P6_IPIP,
            false,
        ),
        MixedCase(
            "ip6ip6 vlan",
            udp6_to(VIP6, 41003, P6_IPIP).vlan(5).build(),
            18,
            c6,
            v6,
            Protocol::Udp,
            41003,
            P6_IPIP,
            false,
        ),
        MixedCase(
            "6in4",
            udp6_to(VIP6, 41004, P6_TO_V4).tos(0x2e).build(),
            14,
            c6,
            v6,
            Protocol::Udp,
            41004,
            P6_TO_V4,
            false,
        ),
        MixedCase(
            "4in6",
            udp_to(VIP, 41005, P4_TO_V6).tos(0xb8).build(),
            14,
            c4,
            v4,
            Protocol::Udp,
            41005,
            P4_TO_V6,
            false,
        ),
        MixedCase(
            "gue over ipv4",
            udp_to(VIP, 41006, P_GUE).build(),
            14,
            c4,
            v4,
            Protocol::Udp,
            41006,
            P_GUE,
            true,
        ),
        MixedCase(
            "gue 4in6 tcp",
            tcp4_gue,
            14,
            c4,
            v4,
            Protocol::Tcp,
            41001,
            P_GUE,
            true,
        ),
        MixedCase(
            "gue over ipv6",
            udp6_to(VIP6, 41007, P_GUE).build(),
            14,
            c6,
            v6,
            Protocol::Udp,
            41007,
            P_GUE,
            true,
        ),
        MixedCase(
            "ipv6 hop-by-hop + dstopts",
            with_ext(
                &with_ext(
                    &udp6_to(VIP6, 41008, P6_IPIP).build(),
                    14,
                    60,
                    &[0, 0, 1, 4, 0, 0, 0, 0],
                ),
                14,
                0,
                &[0, 0, 1, 4, 0, 0, 0, 0],
            ),
            14,
            c6,
            v6,
            Protocol::Udp,
            41008,
            P6_IPIP,
            false,
        ),
        MixedCase(
            "ipv6 atomic fragment",
            with_ext(
                &udp6_to(VIP6, 41009, P6_IPIP).build(),
                14,
                44,
                &[0, 0, 0, 0, 0, 0, 0, 7],
            ),
            14,
            c6,
            v6,
            Protocol::Udp,
            41009,
            P6_IPIP,
            false,
        ),
    ];
    for MixedCase(name, input, l3_off, client, vip, proto, sport, dport, gue) in &cases {
        let backend = f.expected_backend_any(*client, *vip, *proto, *sport, *dport);
        let hash = hash_of(*client, *vip, *sport, *dport, proto.number());
        let expected = encap_expected(input, *l3_off, backend, *gue, hash);
        let got = f.run(maps::PROG_LB, input);
        assert_frame(name, got, XDP_TX, &expected);
        // The outer IPv4 header checksum is right (independently of the builder above).
        let out = encap_expected(input, *l3_off, backend, *gue, hash);
        if backend.is_ipv4() {
            assert!(
                lb_testkit::verify_ipv4_header_checksum(&out[*l3_off..*l3_off + 20]),
                "{name}"
            );
        }
    }
    // L2 rewrite of IPv6.
    let input = udp6_to(VIP6, 41010, P6_L2).build();
    let backend = f.expected_backend_any(c6, v6, Protocol::Udp, 41010, P6_L2);
    let mut expected = input.clone();
    expected[..6].copy_from_slice(&mac_of(backend));
    expected[6..12].copy_from_slice(&LB_MAC);
    assert_frame("l2 ipv6", f.run(maps::PROG_LB, &input), XDP_TX, &expected);
}

#[test]
fn ipv6_packets_that_are_not_ours_pass_untouched() {
    let mut f = mixed_fixture();
    let other = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x101);
    let frag = with_ext(
        &udp6_to(VIP6, 41000, P6_IPIP).build(),
        14,
        44,
        &[0, 0, 0, 1, 0, 0, 0, 7],
    );
    let later_frag = with_ext(
        &udp6_to(VIP6, 41000, P6_IPIP).build(),
        14,
        44,
        &[0, 0, 0, 0x10, 0, 0, 0, 7],
    );
    let esp = PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv6(CLIENT6, VIP6)
        .raw(50, &[0; 16])
        .build();
    let icmp6 = PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv6(CLIENT6, VIP6)
        .raw(58, &[135, 0, 0, 0, 0, 0, 0, 0])
        .build();
    let mut bad_len = udp6_to(VIP6, 41000, P6_IPIP).build();
    bad_len[18..20].copy_from_slice(&500u16.to_be_bytes());
    let mut zero_len = udp6_to(VIP6, 41000, P6_IPIP).build();
    zero_len[18..20].copy_from_slice(&0u16.to_be_bytes());
    // Five extension headers: more than the parser follows.
    let mut deep = udp6_to(VIP6, 41000, P6_IPIP).build();
    for _ in 0..5 {
        deep = with_ext(&deep, 14, 60, &[0, 0, 1, 4, 0, 0, 0, 0]);
    }
    let cases: Vec<(&str, Vec<u8>, u32, Reason)> = vec![
        (
            "non-VIP v6",
            udp6_to(other, 41000, P6_IPIP).build(),
            XDP_PASS,
            Reason::PassNotVip,
        ),
        (
            "VIP v6 other port",
            udp6_to(VIP6, 41000, 9).build(),
            XDP_PASS,
            Reason::PassNotVip,
        ),
        ("first fragment", frag, XDP_DROP, Reason::DropFragment),
        ("later fragment", later_frag, XDP_DROP, Reason::DropFragment),
        (
            "fragment, not a VIP",
            with_ext(
                &udp6_to(other, 41000, P6_IPIP).build(),
                14,
                44,
                &[0, 0, 0, 1, 0, 0, 0, 7],
            ),
            XDP_PASS,
            Reason::PassFragment,
        ),
        ("esp", esp, XDP_PASS, Reason::PassNotVip),
        (
            "icmpv6 neighbour solicitation",
            icmp6,
            XDP_PASS,
            Reason::PassNotVip,
        ),
        (
            "payload length beyond frame",
            bad_len,
            XDP_PASS,
            Reason::PassMalformed,
        ),
        (
            "payload length zero",
            zero_len,
            XDP_PASS,
            Reason::PassMalformed,
        ),
        (
            "too many extension headers",
            deep,
            XDP_PASS,
            Reason::PassNotVip,
        ),
    ];
    for (name, input, action, reason) in cases {
        let before = f.reason(reason);
        assert_frame(name, f.run(maps::PROG_LB, &input), action, &input);
        assert_eq!(
            f.reason(reason) - before,
            1,
            "{name}: counted as {}",
            reason.name()
        );
    }
    // Truncated at every length inside the headers.
    let full = with_ext(
        &udp6_to(VIP6, 41000, P6_IPIP).build(),
        14,
        0,
        &[0, 0, 1, 4, 0, 0, 0, 0],
    );
    for len in 14..14 + 40 + 8 + 8 {
        let input = &full[..len];
        assert_frame(
            &format!("v6 cut at {len}"),
            f.run(maps::PROG_LB, input),
            XDP_PASS,
            input,
        );
    }
}

#[test]
fn decap_handles_every_encapsulation() {
    let mut f = mixed_fixture();
    f.allow_decap(&[
        backend_ip(1).into(),
        backend_ip(2).into(),
        backend6(1).into(),
        backend6(2).into(),
    ]);
    // The decap program reads the GUE port from LB_CONFIG, which the fixture wrote (6080).
    let inputs = [
        (udp_to(VIP, 42000, 1).build(), IpAddr::V4(backend_ip(1))),
        (udp_to(VIP, 42001, 1).build(), IpAddr::V6(backend6(1))),
        (udp6_to(VIP6, 42002, 1).build(), IpAddr::V6(backend6(2))),
        (udp6_to(VIP6, 42003, 1).build(), IpAddr::V4(backend_ip(2))),
        (
            udp6_to(VIP6, 42004, 1).vlan(3).build(),
            IpAddr::V4(backend_ip(2)),
        ),
    ];
    for (input, backend) in &inputs {
        let l3_off = if input[12..14] == [0x81, 0x00] {
            18
        } else {
            14
        };
        for gue in [false, true] {
            let encapsulated = encap_expected(input, l3_off, *backend, gue, 0x1234_5678);
            let (a, out) = f.run(maps::PROG_DECAP, &encapsulated);
            let mut expected = encapsulated[..l3_off].to_vec();
            expected[l3_off - 2..l3_off].copy_from_slice(&input[l3_off - 2..l3_off]);
            expected.extend_from_slice(&input[l3_off..]);
            assert_frame(
                &format!("decap {backend} gue={gue}"),
                (a, out),
                XDP_PASS,
                &expected,
            );
        }
    }
    // GUE variant 0: a 4-byte GUE header (plus one option word) before the inner packet.
    let inner = udp_to(VIP, 42005, 1).build();
    let mut v0 = encap_expected(&inner, 14, IpAddr::V4(backend_ip(1)), true, 7);
    v0.splice(
        14 + 20 + 8..14 + 20 + 8,
        [0x01, 4, 0, 0, 0xaa, 0xbb, 0xcc, 0xdd],
    );
    let (a, out) = f.run(maps::PROG_DECAP, &v0);
    let mut expected = inner[..14].to_vec();
    expected[..12].copy_from_slice(&v0[..12]);
    expected.extend_from_slice(&inner[14..]);
    assert_frame("decap gue variant 0", (a, out), XDP_PASS, &expected);
    // UDP to another port, and a GUE control message: untouched.
    let other_port = udp_to(backend_ip(1), 42006, 6081).build();
    assert_frame(
        "udp, not gue",
        f.run(maps::PROG_DECAP, &other_port),
        XDP_PASS,
        &other_port,
    );
    let mut control = encap_expected(&inner, 14, IpAddr::V4(backend_ip(1)), true, 7);
    control.splice(14 + 28..14 + 28, [0x20, 0, 0, 0]);
    assert_frame(
        "gue control",
        f.run(maps::PROG_DECAP, &control),
        XDP_PASS,
        &control,
    );
}

// ---- ICMP: echo, errors to the owning backend, PMTU ----

fn icmp_csum_ok(ip: &[u8]) -> bool {
    lb_testkit::l4_checksum_ok(ip)
}

/// ICMPv6 checksum of `msg` (its checksum field zero) between `src` and `dst`.
fn icmp6_checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let mut data = Vec::new();
    data.extend_from_slice(&src.octets());
    data.extend_from_slice(&dst.octets());
    data.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    data.extend_from_slice(&[0, 0, 0, 58]);
    data.extend_from_slice(msg);
    ipv4_checksum(&data)
}

#[test]
fn echo_requests_to_a_vip_are_answered() {
    let mut f = mixed_fixture();
    // IPv4: the reply is the request with MACs and addresses swapped and type 0.
    let req = PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv4(CLIENT, VIP)
        .raw(1, &[8, 0, 0, 0, 0x12, 0x34, 0, 1, b'p', b'i', b'n', b'g'])
        .build();
    let mut req = req;
    let c = ipv4_checksum(&req[34..]);
    req[36..38].copy_from_slice(&c.to_be_bytes());
    let mut expected = req.clone();
    expected[..6].copy_from_slice(&CLIENT_MAC);
    expected[6..12].copy_from_slice(&LB_MAC);
    expected[26..30].copy_from_slice(&VIP.octets());
    expected[30..34].copy_from_slice(&CLIENT.octets());
    expected[34] = 0;
    expected[36..38].copy_from_slice(&[0, 0]);
    let c = ipv4_checksum(&expected[34..]);
    expected[36..38].copy_from_slice(&c.to_be_bytes());
    assert_frame("echo v4", f.run(maps::PROG_LB, &req), XDP_TX, &expected);
    assert!(lb_testkit::verify_ipv4_header_checksum(&expected[14..34]));

    // IPv6 (checksum over the pseudo-header: checked independently).
    let mut req6 = PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv6(CLIENT6, VIP6)
        .raw(58, &[128, 0, 0, 0, 0, 7, 0, 1, 1, 2, 3, 4])
        .build();
    let c = icmp6_checksum(CLIENT6, VIP6, &req6[54..]);
    req6[56..58].copy_from_slice(&c.to_be_bytes());
    assert!(icmp_csum_ok(&req6[14..]), "the request itself is valid");
    let (a, out) = f.run(maps::PROG_LB, &req6);
    assert_eq!(a, XDP_TX, "echo v6");
    assert_eq!(&out[..6], &CLIENT_MAC);
    assert_eq!(&out[22..38], &VIP6.octets());
    assert_eq!(&out[38..54], &CLIENT6.octets());
    assert_eq!(out[54], 129);
    assert_eq!(
        &out[56 + 2..],
        &req6[56 + 2..],
        "identifier, sequence and data kept"
    );
    assert!(icmp_csum_ok(&out[14..]), "ICMPv6 checksum of the reply");

    // Not a VIP: untouched.
    let other = PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv4(CLIENT, Ipv4Addr::new(198, 18, 0, 77))
        .raw(1, &[8, 0, 0xf7, 0xfe, 0, 1, 0, 0])
        .build();
    assert_frame(
        "echo to non-VIP",
        f.run(maps::PROG_LB, &other),
        XDP_PASS,
        &other,
    );
    assert_eq!(f.reason(Reason::TxEchoReply), 2);
}

#[test]
fn echo_can_be_switched_off() {
    let mut f = fixture();
    let mut desired = f.desired.clone();
    desired.node.icmp_echo = false;
    f.program(desired);
    let req = PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv4(CLIENT, VIP)
        .raw(1, &[8, 0, 0xf7, 0xff, 0, 0, 0, 0])
        .build();
    assert_frame("echo off", f.run(maps::PROG_LB, &req), XDP_PASS, &req);
}

/// The reply a backend sent (VIP → client) that a router answers with an ICMP error.
fn icmp_error_v4(kind: u8, code: u8, vip_port: u16, client_port: u16, proto: u8) -> Vec<u8> {
    let quoted = PacketBuilder::new()
        .ipv4(VIP, CLIENT)
        .dont_fragment()
        .udp(vip_port, client_port, &[0u8; 64])
        .build_ip();
    let mut quoted = quoted[..28].to_vec();
    quoted[9] = proto;
    let mut icmp = vec![kind, code, 0, 0, 0, 0, 0x05, 0x00];
    icmp.extend_from_slice(&quoted);
    let c = ipv4_checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let router = Ipv4Addr::new(198, 18, 9, 1);
    PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv4(router, VIP)
        .raw(1, &icmp)
        .build()
}

#[test]
fn icmp_errors_reach_the_backend_that_owns_the_flow() {
    let mut f = mixed_fixture();
    let c4 = IpAddr::V4(CLIENT);
    for (name, kind, code, port, proto) in [
        ("frag needed, udp", 3u8, 4u8, PORT_IPIP, Protocol::Udp),
        ("port unreachable, udp", 3, 3, PORT_IPIP, Protocol::Udp),
        ("time exceeded, tcp", 11, 0, PORT_TCP, Protocol::Tcp),
    ] {
        let client_port = 45000;
        let input = icmp_error_v4(kind, code, port, client_port, proto.number());
        let backend = f.expected_backend_any(c4, IpAddr::V4(VIP), proto, client_port, port);
        let expected = encap_expected(&input, 14, backend, false, 0);
        assert_frame(name, f.run(maps::PROG_LB, &input), XDP_TX, &expected);
    }
    assert_eq!(f.reason(Reason::IcmpToBackend), 3);
    // The same client flow, sent as data, goes to the same backend.
    let (_, data) = f.run(maps::PROG_LB, &udp_to(VIP, 45000, PORT_IPIP).build());
    let (_, err) = f.run(maps::PROG_LB, &icmp_error_v4(3, 4, PORT_IPIP, 45000, 17));
    assert_eq!(
        data[30..34],
        err[30..34],
        "error and flow reach the same backend"
    );
    // An error about a port that is no service: untouched.
    let stray = icmp_error_v4(3, 4, 9999, 45000, 17);
    assert_frame(
        "error about a non-service",
        f.run(maps::PROG_LB, &stray),
        XDP_PASS,
        &stray,
    );

    // ICMPv6 packet too big about an IP6IP6 flow.
    let quoted = PacketBuilder::new()
        .ipv6(VIP6, CLIENT6)
        .udp(P6_IPIP, 45001, &[0u8; 32])
        .build_ip();
    let mut icmp = vec![2, 0, 0, 0, 0, 0, 0x05, 0x00];
    icmp.extend_from_slice(&quoted);
    let router6 = Ipv6Addr::new(0x2001, 0xdb8, 9, 0, 0, 0, 0, 1);
    let input = PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv6(router6, VIP6)
        .raw(58, &icmp)
        .build();
    let c6 = IpAddr::V6(CLIENT6);
    let backend = f.expected_backend_any(c6, IpAddr::V6(VIP6), Protocol::Udp, 45001, P6_IPIP);
    let hash = hash_of(c6, IpAddr::V6(VIP6), 45001, P6_IPIP, 17);
    let expected = encap_expected(&input, 14, backend, false, hash);
    assert_frame(
        "icmpv6 packet too big",
        f.run(maps::PROG_LB, &input),
        XDP_TX,
        &expected,
    );
}

#[test]
fn too_big_for_the_tunnel_is_answered_with_icmp() {
    let mut f = mixed_fixture();
    let desired = f.desired.clone();
    f.program_with_mtu(desired, 1500);
    // IPv4, DF: 1490 bytes + 20 of IPIP > 1500 → fragmentation needed, MTU 1480, from the VIP.
    let big = udp_to(VIP, 46000, PORT_IPIP)
        .dont_fragment()
        .udp(46000, PORT_IPIP, &[7u8; 1462])
        .build();
    assert_eq!(big.len() - 14, 1490);
    let mut expected = Vec::new();
    expected.extend_from_slice(&CLIENT_MAC);
    expected.extend_from_slice(&LB_MAC);
    expected.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0];
    ip.extend_from_slice(&VIP.octets());
    ip.extend_from_slice(&CLIENT.octets());
    let c = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    expected.extend_from_slice(&ip);
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&1480u16.to_be_bytes());
    icmp.extend_from_slice(&big[14..14 + 28]);
    let c = ipv4_checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    expected.extend_from_slice(&icmp);
    assert_frame("frag needed", f.run(maps::PROG_LB, &big), XDP_TX, &expected);
    // Fits: forwarded as usual.
    let fits = udp_to(VIP, 46001, PORT_IPIP)
        .dont_fragment()
        .udp(46001, PORT_IPIP, &[7u8; 1442])
        .build();
    assert_eq!(f.run(maps::PROG_LB, &fits).0, XDP_TX);
    assert_eq!(f.run(maps::PROG_LB, &fits).1.len(), fits.len() + 20);
    // No DF: cannot be answered nor fragmented here: dropped and counted.
    let no_df = udp_to(VIP, 46002, PORT_IPIP)
        .udp(46002, PORT_IPIP, &[7u8; 1462])
        .build();
    let before = f.reason(Reason::DropTooBig);
    assert_frame(
        "too big, no DF",
        f.run(maps::PROG_LB, &no_df),
        XDP_DROP,
        &no_df,
    );
    assert_eq!(f.reason(Reason::DropTooBig) - before, 1);

    // IPv6 through IP6IP6 (40 bytes): packet too big with MTU 1460, quoting up to 1232 bytes.
    let big6 = udp6_to(VIP6, 46003, P6_IPIP)
        .udp(46003, P6_IPIP, &[9u8; 1442])
        .build();
    let (a, out) = f.run(maps::PROG_LB, &big6);
    assert_eq!(a, XDP_TX, "packet too big");
    assert_eq!(&out[..6], &CLIENT_MAC);
    assert_eq!(out[14 + 6], 58);
    assert_eq!(&out[22..38], &VIP6.octets());
    assert_eq!(&out[38..54], &CLIENT6.octets());
    assert_eq!(out[54], 2, "type packet too big");
    assert_eq!(
        u32::from_be_bytes([out[58], out[59], out[60], out[61]]),
        1460
    );
    assert_eq!(
        &out[62..],
        &big6[14..14 + 1232],
        "quotes the start of the packet"
    );
    assert_eq!(out.len(), 14 + 1280, "the error fits the IPv6 minimum MTU");
    assert!(icmp_csum_ok(&out[14..]), "ICMPv6 checksum");
    assert_eq!(f.reason(Reason::TxIcmpTooBig), 2);

    // Switched off: dropped instead.
    let mut desired = f.desired.clone();
    desired.node.pmtu_icmp = false;
    f.program_with_mtu(desired, 1500);
    assert_frame(
        "too big, icmp off",
        f.run(maps::PROG_LB, &big),
        XDP_DROP,
        &big,
    );
}

// ---- Source ranges ----

#[test]
fn source_ranges_admit_only_listed_clients() {
    let mut f = mixed_fixture();
    let mut desired = f.desired.clone();
    let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
    let a4 = ServiceAddr {
        vip: IpAddr::V4(VIP),
        port: PORT_IPIP,
        protocol: Protocol::Udp,
    };
    let a6 = ServiceAddr {
        vip: IpAddr::V6(VIP6),
        port: P6_IPIP,
        protocol: Protocol::Udp,
    };
    let l2 = ServiceAddr {
        vip: IpAddr::V4(VIP),
        port: PORT_L2,
        protocol: Protocol::Udp,
    };
    desired.services.get_mut(&a4).unwrap().source_ranges =
        Some(vec![net("198.18.1.0/24"), net("198.19.0.7/32")]);
    desired.services.get_mut(&a6).unwrap().source_ranges = Some(vec![net("2001:db8:1::/48")]);
    desired.services.get_mut(&l2).unwrap().source_ranges = Some(vec![]);
    f.program(desired);
    let from = |src: Ipv4Addr, port: u16| {
        PacketBuilder::new()
            .eth(CLIENT_MAC, LB_MAC)
            .ipv4(src, VIP)
            .udp(40000, port, b"x")
            .build()
    };
    let from6 = |src: Ipv6Addr| {
        PacketBuilder::new()
            .eth(CLIENT_MAC, LB_MAC)
            .ipv6(src, VIP6)
            .udp(40000, P6_IPIP, b"x")
            .build()
    };
    let before = f.reason(Reason::DropSourceRange);
    assert_eq!(
        f.run(maps::PROG_LB, &from(CLIENT, PORT_IPIP)).0,
        XDP_TX,
        "198.18.1.1 is in /24"
    );
    assert_eq!(
        f.run(
            maps::PROG_LB,
            &from(Ipv4Addr::new(198, 19, 0, 7), PORT_IPIP)
        )
        .0,
        XDP_TX,
        "/32 entry"
    );
    for (name, input) in [
        (
            "outside the /24",
            from(Ipv4Addr::new(198, 18, 2, 1), PORT_IPIP),
        ),
        (
            "next to the /32",
            from(Ipv4Addr::new(198, 19, 0, 8), PORT_IPIP),
        ),
        ("empty list admits nobody", from(CLIENT, PORT_L2)),
        (
            "ipv6 outside the /48",
            from6(Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1)),
        ),
    ] {
        assert_frame(name, f.run(maps::PROG_LB, &input), XDP_DROP, &input);
    }
    assert_eq!(
        f.run(maps::PROG_LB, &from6(CLIENT6)).0,
        XDP_TX,
        "2001:db8:1::1 is in the /48"
    );
    assert_eq!(f.reason(Reason::DropSourceRange) - before, 4);
    // Other services are not restricted.
    let tcp = tcp_to_web(40000, tcp_flags::SYN);
    let tcp = {
        let mut t = tcp;
        t[26..30].copy_from_slice(&[198, 18, 2, 1]);
        t
    };
    assert_eq!(f.run(maps::PROG_LB, &tcp).0, XDP_TX);
    // Lifting the restriction removes the entries and the flag.
    let mut desired = f.desired.clone();
    for svc in desired.services.values_mut() {
        svc.source_ranges = None;
    }
    f.program(desired);
    assert!(f.snapshot.source_ranges.is_empty());
    assert_eq!(
        f.run(
            maps::PROG_LB,
            &from(Ipv4Addr::new(198, 18, 2, 1), PORT_IPIP)
        )
        .0,
        XDP_TX
    );
}

// ---- Fragments ----

#[test]
fn fragments_of_a_datagram_meet_at_one_backend_when_enabled() {
    let mut f = mixed_fixture();
    let mut desired = f.desired.clone();
    let a4 = ServiceAddr {
        vip: IpAddr::V4(VIP),
        port: PORT_IPIP,
        protocol: Protocol::Udp,
    };
    let a6 = ServiceAddr {
        vip: IpAddr::V6(VIP6),
        port: P6_IPIP,
        protocol: Protocol::Udp,
    };
    desired.services.get_mut(&a4).unwrap().fragments = true;
    desired.services.get_mut(&a6).unwrap().fragments = true;
    f.program(desired);
    // The backend of an address-only flow: Maglev on the hash with both ports zero.
    let l3_backend = |f: &Fixture, vip: IpAddr, client: IpAddr, port: u16| {
        let key = sync::service_key(&ServiceAddr {
            vip,
            port,
            protocol: Protocol::Udp,
        });
        let svc = f.snapshot.services[&key];
        let table = f.dataplane.table(&svc).unwrap();
        let h = hash_of(client, vip, 0, 0, 17);
        let b = f.snapshot.backends[&table[lb_common::hash::slot(h, svc.table_size) as usize]];
        sync::ip_from_bytes(&b.addr_be, b.family).unwrap()
    };
    let first = udp_to(VIP, 40000, PORT_IPIP)
        .id(77)
        .more_fragments()
        .build();
    let later = PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv4(CLIENT, VIP)
        .id(77)
        .frag_offset(3)
        .raw(17, b"rest of the datagram")
        .build();
    let backend = l3_backend(&f, IpAddr::V4(VIP), IpAddr::V4(CLIENT), PORT_IPIP);
    for (name, input) in [("first", &first), ("later", &later)] {
        let expected = encap_expected(input, 14, backend, false, 0);
        assert_frame(
            &format!("v4 {name} fragment"),
            f.run(maps::PROG_LB, input),
            XDP_TX,
            &expected,
        );
    }
    // IPv6: fragment header with offset 0 and M set, then one with an offset.
    let first6 = with_ext(
        &udp6_to(VIP6, 40000, P6_IPIP).build(),
        14,
        44,
        &[0, 0, 0, 1, 0, 0, 0, 9],
    );
    let later6 = {
        let mut l = with_ext(
            &udp6_to(VIP6, 40000, P6_IPIP).build(),
            14,
            44,
            &[0, 0, 0, 0x10, 0, 0, 0, 9],
        );
        // Later fragments carry payload, not a UDP header; scramble what would be the ports.
        l[14 + 48..14 + 52].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
        l
    };
    let c6 = IpAddr::V6(CLIENT6);
    let v6 = IpAddr::V6(VIP6);
    let backend6 = l3_backend(&f, v6, c6, P6_IPIP);
    let hash6 = hash_of(c6, v6, 0, 0, 17);
    for (name, input) in [("first", &first6), ("later", &later6)] {
        let expected = encap_expected(input, 14, backend6, false, hash6);
        assert_frame(
            &format!("v6 {name} fragment"),
            f.run(maps::PROG_LB, input),
            XDP_TX,
            &expected,
        );
    }
    // TCP fragments to the VIP: no TCP service takes them.
    let tcp_frag = PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv4(CLIENT, VIP)
        .frag_offset(3)
        .raw(6, b"tcp data")
        .build();
    assert_frame(
        "tcp fragment",
        f.run(maps::PROG_LB, &tcp_frag),
        XDP_DROP,
        &tcp_frag,
    );
}
