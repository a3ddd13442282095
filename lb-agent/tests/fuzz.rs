//! Fuzzing the real XDP programs through BPF_PROG_TEST_RUN.
//!
//! `LB_FUZZ_PACKETS` frames (default 1,000,000) are generated from valid seeds — UDP/TCP to
//! VIPs of ipip, l2 and gue services (IPv4 and IPv6, mixed families, with VLAN tags, IPv4
//! options, IPv6 extension headers, Ethernet padding, frames too big for the MTU once
//! encapsulated), a service with source ranges, ICMP echo requests and ICMP errors about VIP
//! flows, traffic that is not for a VIP, ARP, fragments, and IPIP/GUE/IPv6 tunnel packets
//! for the decap program (from and to addresses inside and outside its allow lists) — and
//! mutated: byte and bit flips, truncation, trailing and inserted
//! bytes, random IHL/version/length fields, ethertypes, protocols, ports, addresses, fragment
//! fields, TCP flags, VLAN tags added or removed. The PRNG is SplitMix64 with a fixed seed
//! (`LB_FUZZ_SEED` overrides it); every failure names the seed, the packet number, the seed
//! frame and the mutations, with hexdumps.
//!
//! Every frame goes through `lb_xdp`; tunnel seeds (and one frame in eight) also through
//! `lb_decap`; every frame `lb_xdp` encapsulates goes back through `lb_decap` (round trip:
//! the original packet must come out). Two oracles judge each result:
//! - invariants that hold whatever the implementation details: only PASS/DROP/TX; PASS
//!   leaves the frame byte for byte; DROP only for a VIP's packet; a TX is a valid
//!   encapsulation (outer checksum, protocol, backend destination, encapsulation source,
//!   lengths, MTU, inner packet byte for byte), an L2 rewrite (only the MACs changed, to a
//!   backend's and the node's), an echo reply from an echo-enabled VIP (only MACs, addresses,
//!   type and checksum changed; a valid checksum stays valid) or a "too big" error from the
//!   VIP to the client (valid headers and checksums, quoting the packet); everything but the
//!   echo reply only ever for a configured VIP:port; decap only passes, unchanged or with
//!   the outer headers gone;
//! - a reference model of the documented parse/select/encap rules, which predicts action,
//!   reason and the exact output bytes (backend from the Maglev table and the shared flow
//!   hash); the reason, service and backend counters are compared with its tallies at the
//!   end.
//!
//! Needs root. Summary on stderr (shown also without `--nocapture`); 1M packets take a few
//! seconds.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{TestRun, TestRunOptions, Xdp},
};
use lb_agent::{
    EBPF_OBJECT,
    dataplane::{Dataplane, Stats},
    state::{BackendSpec, DesiredState, Protocol, ServiceAddr, ServiceSpec},
    sync,
    table_cache::TableCache,
};
use lb_common::{
    BACKEND_F_NO_NEIGH, BackendValue, CONFIG_F_PMTU_ICMP, DecapAddr, FAMILY_V4, FAMILY_V6,
    Forwarding, NodeConfig, Reason, SERVICE_F_SOURCE_RANGES, ServiceKey, ServiceValue, SourceRange,
    VIP_F_ECHO, VipKey, VipValue,
    hash::{flow_hash_v4, flow_hash_v6, gue_source_port},
    maps,
};
use lb_testkit::packet::{
    PacketBuilder, Tcp, arp_request, hexdump, ipv4_checksum, tcp_flags, verify_ipv4_header_checksum,
};

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const DEFAULT_PACKETS: u64 = 1_000_000;
const DEFAULT_SEED: u64 = 0x6c62_2d66_757a_7a31; // "lb-fuzz1"
/// Largest frame handed to the kernel (BPF_PROG_TEST_RUN takes up to a page minus room).
const MAX_FRAME: usize = 2048;
/// At most this many failures are printed in full.
const SHOWN_FAILURES: usize = 8;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;

const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const ENCAP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const ENCAP_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const VIP_A: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const VIP_B: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 101);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
const NOT_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 200);
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
const ROUTER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0xfe);
/// The node's MTU: encapsulated packets must fit it (the big seeds do not).
const MTU: u16 = 1500;

/// Ports of the services below, plus two that are never a service here.
const PORTS: [u16; 9] = [53, 54, 55, 56, 57, 80, 443, 22, 6080];

/// The backend of the service on port 58 whose node is gone.
const GONE_BACKEND: u8 = 8;

fn v4_backend(i: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10 + i))
}

fn v6_backend(i: u8) -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(
        0x2001,
        0xdb8,
        0,
        0,
        0,
        0,
        0,
        0x10 + u16::from(i),
    ))
}

fn mac_of(ip: IpAddr) -> [u8; 6] {
    match ip {
        IpAddr::V4(a) => [0x02, 0, 0, 0, 4, a.octets()[3]],
        IpAddr::V6(a) => [0x02, 0, 0, 0, 6, a.octets()[15]],
    }
}

// ---------------------------------------------------------------------------------------
// PRNG

/// SplitMix64: tiny and fast; the whole run is determined by the seed.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-enough in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }

    fn byte(&mut self) -> u8 {
        self.next_u64() as u8
    }

    fn u16(&mut self) -> u16 {
        self.next_u64() as u16
    }

    fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
}

// ---------------------------------------------------------------------------------------
// The node under test

fn service(
    forwarding: Forwarding,
    flow_tracking: bool,
    backends: impl IntoIterator<Item = IpAddr>,
) -> ServiceSpec {
    ServiceSpec {
        name: format!("fuzz-{}", forwarding.name()),
        forwarding,
        table_size: None,
        flow_tracking,
        source_ranges: None,
        fragments: false,
        affinity_timeout_s: None,
        backends: backends
            .into_iter()
            .map(|ip| {
                (
                    ip,
                    BackendSpec {
                        weight: 1,
                        mac: Some(mac_of(ip)),
                    },
                )
            })
            .collect(),
    }
}

fn desired_state() -> DesiredState {
    let mut d = DesiredState::default();
    let mut add = |vip: IpAddr, port, protocol, spec| {
        d.services.insert(
            ServiceAddr {
                vip,
                port,
                protocol,
            },
            spec,
        );
    };
    let (a, b, v6) = (IpAddr::V4(VIP_A), IpAddr::V4(VIP_B), IpAddr::V6(VIP6));
    let three4 = || (1..=3).map(v4_backend);
    let three6 = || (1..=3).map(v6_backend);
    use Forwarding::{Gue, Ipip, L2};
    use Protocol::{Tcp, Udp};
    add(a, 53, Udp, service(Ipip, false, three4()));
    add(a, 54, Udp, service(L2, false, three4()));
    // Its only backend has no MAC: in the table all the same, the data plane drops
    // (`DropNoNeighbor`).
    let mut empty = service(Ipip, false, [v4_backend(9)]);
    empty.backends.values_mut().for_each(|b| b.mac = None);
    add(a, 55, Udp, empty);
    // One of its four backends is gone (its next hop failed, `GONE_BACKEND`): its slots
    // send to the next slots' backends.
    let mut gone = service(Ipip, false, (5..=8).map(v4_backend));
    gone.backends
        .get_mut(&v4_backend(GONE_BACKEND))
        .unwrap()
        .mac = None;
    add(a, 58, Udp, gone);
    add(a, 56, Udp, service(Gue, true, three4()));
    add(a, 57, Udp, service(Ipip, false, three6())); // 4in6
    add(a, 80, Tcp, service(Ipip, true, three4()));
    add(a, 443, Tcp, service(L2, true, three4()));
    // Only clients in 198.18.1.0/24 (CLIENT is; a mutated source mostly is not).
    let mut ranged = service(Ipip, false, (11..=14).map(v4_backend));
    ranged.source_ranges = Some(vec!["198.18.1.0/24".parse().unwrap()]);
    add(b, 53, Udp, ranged);
    add(b, 80, Tcp, service(Gue, false, (11..=14).map(v4_backend)));
    add(v6, 53, Udp, service(L2, false, three6()));
    add(v6, 54, Udp, service(Ipip, false, three4())); // 6in4
    add(v6, 56, Udp, service(Gue, false, three6()));
    add(v6, 80, Tcp, service(Ipip, true, three6())); // IP6IP6
    d
}

/// What the model knows: exactly what the maps hold.
struct Model {
    cfg: NodeConfig,
    services: HashMap<ServiceKey, (ServiceValue, Vec<u32>)>,
    backends: BTreeMap<u32, BackendValue>,
    vips: BTreeMap<VipKey, VipValue>,
    /// `LB_SRC_RANGES`: (prefix bits, key data).
    source_ranges: Vec<(u32, SourceRange)>,
    /// `LB_DECAP_SRC`, `LB_DECAP_DST`: (prefix bits, key data).
    decap_sources: Vec<(u32, DecapAddr)>,
    decap_destinations: Vec<(u32, DecapAddr)>,
}

/// The decap allow lists of the fuzzed node, which is its own backend (the round trip):
/// tunnels from its encapsulation sources and from 198.18.4.0/24, to every backend address
/// and to 198.18.5.0/24. A mutated address mostly falls outside them.
fn decap_lists(desired: &DesiredState) -> Vec<sync::MapOp> {
    let entry = |list, net: ipnet::IpNet| {
        let (prefix_len, addr) = sync::decap_prefix(&net);
        sync::MapOp::AddDecap {
            list,
            prefix_len,
            addr,
        }
    };
    let mut ops: Vec<sync::MapOp> = [
        IpAddr::from(ENCAP_V4).into(),
        IpAddr::from(ENCAP_V6).into(),
        "198.18.4.0/24".parse().unwrap(),
    ]
    .into_iter()
    .map(|net| entry(sync::DecapList::Sources, net))
    .collect();
    let backends: BTreeSet<IpAddr> = desired
        .services
        .values()
        .flat_map(|s| s.backends.keys().copied())
        .collect();
    ops.extend(
        backends
            .into_iter()
            .map(ipnet::IpNet::from)
            .chain(["198.18.5.0/24".parse().unwrap()])
            .map(|net| entry(sync::DecapList::Destinations, net)),
    );
    ops
}

struct Node {
    ebpf: Ebpf,
    dataplane: Dataplane,
    model: Model,
}

fn node() -> Node {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the fuzz test loads BPF programs: run it as root (cargo xtask test does)"
    );
    let mut ebpf = EbpfLoader::new()
        .map_max_entries(maps::MAGLEV, 1 << 16)
        .map_max_entries(maps::FLOWTAB4, 1 << 14)
        .map_max_entries(maps::FLOWTAB6, 1 << 12)
        .load(EBPF_OBJECT)
        .expect("load object");
    for name in [maps::PROG_LB, maps::PROG_DECAP] {
        let prog: &mut Xdp = ebpf.program_mut(name).unwrap().try_into().unwrap();
        prog.load()
            .unwrap_or_else(|e| panic!("verifier rejects {name}: {e}"));
    }
    let mut dataplane = Dataplane::from_ebpf(&mut ebpf).unwrap();
    let desired = desired_state();
    let loaded = lb_agent::loader::loaded(&mut ebpf).unwrap();
    let mut cfg = sync::node_config(&desired, LB_MAC, Some(ENCAP_V4), Some(ENCAP_V6), loaded);
    cfg.mtu = MTU;
    let before = dataplane.snapshot().unwrap();
    let failed = BTreeSet::from([v4_backend(GONE_BACKEND)]);
    let hops = sync::NextHops {
        macs: &BTreeMap::new(),
        failed: &failed,
    };
    let plan = sync::plan_with_hops(&desired, cfg, hops, &before, &mut TableCache::default())
        .expect("plan");
    assert_eq!(plan.unreachable.len(), 1);
    dataplane.apply(&plan.ops).expect("apply");
    dataplane.apply(&decap_lists(&desired)).expect("apply");
    let snap = dataplane.snapshot().unwrap();
    assert_eq!(snap.services.len(), desired.services.len());
    let services = snap
        .services
        .iter()
        .map(|(k, v)| {
            let table = if v.table_size > 0 {
                dataplane.table(v).unwrap()
            } else {
                Vec::new()
            };
            (*k, (*v, table))
        })
        .collect();
    Node {
        ebpf,
        dataplane,
        model: Model {
            cfg: snap.config.expect("config written"),
            services,
            backends: snap.backends,
            vips: snap.vips,
            source_ranges: snap.source_ranges.into_iter().collect(),
            decap_sources: snap.decap_sources.into_iter().collect(),
            decap_destinations: snap.decap_destinations.into_iter().collect(),
        },
    }
}

/// Does any entry of a decap allow list match (family, address)? Any matching prefix will do.
fn lpm_any(entries: &[(u32, DecapAddr)], family: u8, addr: &[u8; 16]) -> bool {
    let mut key = vec![family, 0, 0, 0];
    key.extend_from_slice(addr);
    entries.iter().any(|(bits, e)| {
        let mut data = vec![e.family, 0, 0, 0];
        data.extend_from_slice(&e.addr_be);
        (0..*bits as usize).all(|i| (key[i / 8] ^ data[i / 8]) & (0x80 >> (i % 8)) == 0)
    })
}

// ---------------------------------------------------------------------------------------
// Seeds

struct Seed {
    name: &'static str,
    frame: Vec<u8>,
    /// A tunnel packet: always also run through `lb_decap`.
    tunnel: bool,
}

fn udp4(dst: Ipv4Addr, sport: u16, dport: u16) -> PacketBuilder {
    PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv4(CLIENT, dst)
        .udp(sport, dport, b"fuzz payload")
}

fn tcp4(dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> PacketBuilder {
    PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv4(CLIENT, dst)
        .tcp(
            Tcp {
                sport,
                dport,
                seq: 1,
                ack: 2,
                flags,
                ..Tcp::default()
            },
            b"x",
        )
}

fn udp6(dst: Ipv6Addr, sport: u16, dport: u16) -> PacketBuilder {
    PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv6(CLIENT_V6, dst)
        .udp(sport, dport, b"fuzz payload v6")
}

/// A UDP segment (checksum 0: the data plane does not look at it).
fn udp_segment(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut s = sport.to_be_bytes().to_vec();
    s.extend_from_slice(&dport.to_be_bytes());
    s.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(payload);
    s
}

fn seeds(gue_port: u16) -> Vec<Seed> {
    let seed = |name, frame| Seed {
        name,
        frame,
        tunnel: false,
    };
    let tunnel = |name, frame| Seed {
        name,
        frame,
        tunnel: true,
    };
    let inner4 = udp4(VIP_A, 40000, 53).build_ip();
    let inner6 = udp6(VIP6, 40000, 53).build_ip();
    let outer4 = || {
        PacketBuilder::new()
            .eth(LB_MAC, CLIENT_MAC)
            .ipv4(ENCAP_V4, Ipv4Addr::new(198, 18, 0, 11))
    };
    let outer6 = || {
        PacketBuilder::new()
            .eth(LB_MAC, CLIENT_MAC)
            .ipv6(ENCAP_V6, Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11))
    };
    let gue = |inner: &[u8]| {
        let mut seg = udp_segment(0xc123, gue_port, &[]);
        seg[4..6].copy_from_slice(&((8 + inner.len()) as u16).to_be_bytes());
        seg.extend_from_slice(inner);
        seg
    };
    let mut gue0 = udp_segment(0xc124, gue_port, &[]);
    gue0.extend_from_slice(&[0x01, 4, 0, 0, 0, 0, 0, 0]); // variant 0, hlen 1, proto 4
    gue0.extend_from_slice(&inner4);
    let mut hbh = vec![17, 0, 1, 4, 0, 0, 0, 0]; // hop-by-hop: PadN, then UDP
    hbh.extend_from_slice(&udp_segment(40001, 53, b"after hop-by-hop"));
    let mut frag6 = vec![17, 0, 0, 0, 0, 0, 0, 7]; // atomic fragment header
    frag6.extend_from_slice(&udp_segment(40002, 53, b"atomic fragment"));
    let mut frag6_real = vec![17, 0, 0, 1, 0, 0, 0, 8]; // more fragments
    frag6_real.extend_from_slice(&udp_segment(40003, 53, b"first fragment"));
    let echo4 = icmp_message(vec![8, 0, 0, 0, 0x12, 0x34, 0, 1, b'p', b'i', b'n', b'g']);
    let echo6 = vec![128, 0, 0, 0, 0x12, 0x34, 0, 1, b'p', b'i', b'n', b'g'];
    // Errors quote a reply the backend sent from the VIP to the client.
    let reply4 = PacketBuilder::new()
        .ipv4(VIP_A, CLIENT)
        .udp(53, 40000, b"answer")
        .build_ip();
    let mut unreach4 = vec![3, 4, 0, 0, 0, 0, 0x05, 0xdc];
    unreach4.extend_from_slice(&reply4[..28]);
    let unreach4 = icmp_message(unreach4);
    let reply_tcp = PacketBuilder::new()
        .ipv4(VIP_A, CLIENT)
        .tcp(
            Tcp {
                sport: 80,
                dport: 40000,
                flags: tcp_flags::ACK,
                ..Tcp::default()
            },
            b"",
        )
        .build_ip();
    let mut exceeded4 = vec![11, 0, 0, 0, 0, 0, 0, 0];
    exceeded4.extend_from_slice(&reply_tcp[..28]);
    let exceeded4 = icmp_message(exceeded4);
    let reply6 = PacketBuilder::new()
        .ipv6(VIP6, CLIENT_V6)
        .udp(53, 40000, b"answer")
        .build_ip();
    let mut too_big6 = vec![2, 0, 0, 0, 0, 0, 0x05, 0x00];
    too_big6.extend_from_slice(&reply6);
    let mut padded = udp4(VIP_A, 40004, 53).build();
    padded.resize(60, 0); // Ethernet minimum frame: IP total length < frame

    vec![
        seed("udp vip:53 ipip", udp4(VIP_A, 40000, 53).build()),
        seed("udp vip:54 l2", udp4(VIP_A, 40000, 54).build()),
        seed("udp vip:55 no neighbour", udp4(VIP_A, 40000, 55).build()),
        seed("udp vip:58 a backend gone", udp4(VIP_A, 40000, 58).build()),
        seed("udp vip:58 a backend gone", udp4(VIP_A, 40001, 58).build()),
        seed("udp vip:58 a backend gone", udp4(VIP_A, 40002, 58).build()),
        seed("udp vip:58 a backend gone", udp4(VIP_A, 40003, 58).build()),
        seed("udp vip:56 gue tracked", udp4(VIP_A, 40000, 56).build()),
        seed("udp vip:57 4in6", udp4(VIP_A, 40000, 57).build()),
        seed(
            "tcp ack vip:80 ipip tracked",
            tcp4(VIP_A, 40000, 80, tcp_flags::ACK).build(),
        ),
        seed(
            "tcp syn vip:80 ipip tracked",
            tcp4(VIP_A, 40001, 80, tcp_flags::SYN).build(),
        ),
        seed(
            "tcp ack vip:443 l2 tracked",
            tcp4(VIP_A, 40000, 443, tcp_flags::ACK).build(),
        ),
        seed("udp vip_b:53 ipip", udp4(VIP_B, 40000, 53).build()),
        seed(
            "tcp vip_b:80 gue",
            tcp4(VIP_B, 40000, 80, tcp_flags::ACK | tcp_flags::PSH).build(),
        ),
        seed("vlan udp vip:53", udp4(VIP_A, 40000, 53).vlan(7).build()),
        seed(
            "vlan tcp vip:443",
            tcp4(VIP_A, 40000, 443, tcp_flags::SYN).vlan(8).build(),
        ),
        seed(
            "vlan udp vip:56 gue",
            udp4(VIP_A, 40000, 56).vlan(9).build(),
        ),
        seed(
            "ip options udp vip:53",
            udp4(VIP_A, 40000, 53)
                .ip_options(&[0x94, 0x04, 0, 0, 1, 1, 1, 0])
                .build(),
        ),
        seed(
            "ip options tcp vip:443",
            tcp4(VIP_A, 40000, 443, tcp_flags::ACK)
                .ip_options(&[1; 12])
                .build(),
        ),
        seed(
            "df tos udp vip:53",
            udp4(VIP_A, 40000, 53).dont_fragment().tos(0xb8).build(),
        ),
        seed("padded udp vip:53", padded),
        seed("udp not vip", udp4(NOT_VIP, 40000, 53).build()),
        seed(
            "tcp vip other port",
            tcp4(VIP_A, 40000, 22, tcp_flags::SYN).build(),
        ),
        seed(
            "icmp vip",
            PacketBuilder::new()
                .eth(CLIENT_MAC, LB_MAC)
                .ipv4(CLIENT, VIP_A)
                .raw(1, &[8, 0, 0xf7, 0xff, 0, 0, 0, 0])
                .build(),
        ),
        seed("arp", arp_request(CLIENT_MAC, CLIENT, VIP_A)),
        seed(
            "first fragment",
            udp4(VIP_A, 40000, 53).more_fragments().build(),
        ),
        seed(
            "later fragment",
            PacketBuilder::new()
                .eth(CLIENT_MAC, LB_MAC)
                .ipv4(CLIENT, VIP_A)
                .frag_offset(10)
                .raw(17, b"payload!")
                .build(),
        ),
        seed("udp6 vip:53 l2", udp6(VIP6, 40000, 53).build()),
        seed("udp6 vip:54 6in4", udp6(VIP6, 40000, 54).build()),
        seed("udp6 vip:56 gue", udp6(VIP6, 40000, 56).build()),
        seed(
            "tcp6 vip:80 ip6ip6 tracked",
            PacketBuilder::new()
                .eth(CLIENT_MAC, LB_MAC)
                .ipv6(CLIENT_V6, VIP6)
                .tcp(
                    Tcp {
                        sport: 40000,
                        dport: 80,
                        flags: tcp_flags::ACK,
                        ..Tcp::default()
                    },
                    b"",
                )
                .build(),
        ),
        seed("vlan udp6 vip:53", udp6(VIP6, 40000, 53).vlan(10).build()),
        seed(
            "udp6 hop-by-hop vip:53",
            PacketBuilder::new()
                .eth(CLIENT_MAC, LB_MAC)
                .ipv6(CLIENT_V6, VIP6)
                .raw(0, &hbh)
                .build(),
        ),
        seed(
            "udp6 atomic fragment vip:53",
            PacketBuilder::new()
                .eth(CLIENT_MAC, LB_MAC)
                .ipv6(CLIENT_V6, VIP6)
                .raw(44, &frag6)
                .build(),
        ),
        seed(
            "udp6 fragment vip:53",
            PacketBuilder::new()
                .eth(CLIENT_MAC, LB_MAC)
                .ipv6(CLIENT_V6, VIP6)
                .raw(44, &frag6_real)
                .build(),
        ),
        seed(
            "udp6 not vip",
            udp6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x200), 1, 53).build(),
        ),
        tunnel("ipip", outer4().raw(4, &inner4).build()),
        tunnel("ipip vlan", outer4().vlan(11).raw(4, &inner4).build()),
        tunnel("ipip df", outer4().dont_fragment().raw(4, &inner4).build()),
        tunnel("gue v4", outer4().raw(17, &gue(&inner4)).build()),
        tunnel("gue variant 0", outer4().raw(17, &gue0).build()),
        tunnel("6in4", outer4().raw(41, &inner6).build()),
        tunnel("ip6ip6", outer6().raw(41, &inner6).build()),
        tunnel("4in6", outer6().raw(4, &inner4).build()),
        tunnel("gue v6", outer6().raw(17, &gue(&inner6)).build()),
        // The decap allow lists: a sender outside them, a destination outside them, and
        // both inside their CIDRs.
        tunnel(
            "ipip from a stranger",
            PacketBuilder::new()
                .eth(LB_MAC, CLIENT_MAC)
                .ipv4(Ipv4Addr::new(198, 18, 3, 9), Ipv4Addr::new(198, 18, 0, 11))
                .raw(4, &inner4)
                .build(),
        ),
        tunnel(
            "ipip to another host",
            PacketBuilder::new()
                .eth(LB_MAC, CLIENT_MAC)
                .ipv4(ENCAP_V4, Ipv4Addr::new(198, 18, 0, 99))
                .raw(4, &inner4)
                .build(),
        ),
        tunnel(
            "ipip within the allowed prefixes",
            PacketBuilder::new()
                .eth(LB_MAC, CLIENT_MAC)
                .ipv4(Ipv4Addr::new(198, 18, 4, 7), Ipv4Addr::new(198, 18, 5, 1))
                .raw(4, &inner4)
                .build(),
        ),
        tunnel(
            "ip6ip6 from a stranger",
            PacketBuilder::new()
                .eth(LB_MAC, CLIENT_MAC)
                .ipv6(
                    Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 9),
                    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11),
                )
                .raw(41, &inner6)
                .build(),
        ),
        seed("icmp echo vip", icmp4(CLIENT, VIP_A, &echo4)),
        seed("icmp echo vip_b vlan", {
            let mut f = icmp4(CLIENT, VIP_B, &echo4);
            f.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
            f
        }),
        seed("icmp echo not vip", icmp4(CLIENT, NOT_VIP, &echo4)),
        seed(
            "icmp frag needed about vip:53",
            icmp4(ROUTER, VIP_A, &unreach4),
        ),
        seed(
            "icmp time exceeded about vip:80",
            icmp4(ROUTER, VIP_A, &exceeded4),
        ),
        seed("icmp6 echo vip", icmp6(CLIENT_V6, VIP6, &echo6)),
        seed(
            "icmp6 too big about vip:53",
            icmp6(ROUTER_V6, VIP6, &too_big6),
        ),
        seed("big udp df vip:53 ipip", big4(53, true)),
        seed("big udp vip:53 no df", big4(53, false)),
        seed("big udp df vip:56 gue", big4(56, true)),
        seed("big udp vip:54 l2", big4(54, true)),
        seed("big tcp6 vip:80 ip6ip6", big6(80)),
        seed("big udp6 vip:54 6in4", big6(54)),
    ]
}

/// An ICMP message with its checksum filled in.
fn icmp_message(mut m: Vec<u8>) -> Vec<u8> {
    let c = ipv4_checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

fn icmp4(src: Ipv4Addr, dst: Ipv4Addr, message: &[u8]) -> Vec<u8> {
    PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv4(src, dst)
        .raw(1, message)
        .build()
}

fn icmp6(src: Ipv6Addr, dst: Ipv6Addr, message: &[u8]) -> Vec<u8> {
    let mut m = message.to_vec();
    m[2..4].copy_from_slice(&[0, 0]);
    let c = icmp6_checksum(&src.octets(), &dst.octets(), &m);
    m[2..4].copy_from_slice(&c);
    PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv6(src, dst)
        .raw(58, &m)
        .build()
}

/// A UDP packet of 1490 bytes to VIP_A: over the MTU once encapsulated.
fn big4(port: u16, df: bool) -> Vec<u8> {
    let b = udp4(VIP_A, 40100, port);
    let b = if df { b.dont_fragment() } else { b };
    b.udp(40100, port, &[0x5a; 1462]).build()
}

/// A TCP (port 80) or UDP packet of 1480 or 1500 bytes to VIP6: over the MTU once
/// encapsulated.
fn big6(port: u16) -> Vec<u8> {
    let b = PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv6(CLIENT_V6, VIP6);
    if port == 80 {
        b.tcp(
            Tcp {
                sport: 40100,
                dport: 80,
                flags: tcp_flags::ACK,
                ..Tcp::default()
            },
            &[0xa5; 1420],
        )
        .build()
    } else {
        b.udp(40100, port, &[0xa5; 1452]).build()
    }
}

// ---------------------------------------------------------------------------------------
// Mutations

fn be16(f: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([f[off], f[off + 1]])
}

/// Write `bytes` at `off` if they fit in the frame.
fn put(f: &mut [u8], off: usize, bytes: &[u8]) {
    if let Some(dst) = f.get_mut(off..off + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

/// Where L3 starts, as far as a mutation cares.
fn l3_guess(f: &[u8]) -> usize {
    if f.len() >= 18 && be16(f, 12) == ETH_P_8021Q {
        18
    } else {
        14
    }
}

/// Where L4 starts (ignoring IPv6 extension headers).
fn l4_guess(f: &[u8], l3: usize) -> usize {
    match f.get(l3) {
        Some(b) if b >> 4 == 6 => l3 + 40,
        Some(b) => l3 + usize::from(b & 0x0f) * 4,
        None => l3 + 20,
    }
}

const MUTATIONS: usize = 18;

/// Apply mutation `kind` (one that does not fit the frame changes nothing).
fn mutate(f: &mut Vec<u8>, rng: &mut Rng, kind: usize) {
    let l3 = l3_guess(f);
    let l4 = l4_guess(f, l3);
    let v6 = f.get(l3).is_some_and(|b| b >> 4 == 6);
    let len = f.len();
    match kind {
        0 => {
            let i = rng.below(len);
            f[i] ^= rng.byte() | 1;
        }
        1 => {
            let i = rng.below(len);
            f[i] ^= 1 << rng.below(8);
        }
        2 => {
            // Truncate (the kernel needs at least an Ethernet header).
            if len > 14 {
                f.truncate(14 + rng.below(len - 14));
            }
        }
        3 => {
            for _ in 0..1 + rng.below(64) {
                f.push(rng.byte());
            }
        }
        4 => {
            if let Some(b) = f.get_mut(l3) {
                *b = (*b & 0xf0) | rng.below(16) as u8;
            }
        }
        5 => {
            if let Some(b) = f.get_mut(l3) {
                *b = (rng.pick(&[4u8, 6, 0, 5, 15]) << 4) | (*b & 0x0f);
            }
        }
        6 => {
            // IPv4 total length / IPv6 payload length: random, zero, or close to right.
            let off = if v6 { l3 + 4 } else { l3 + 2 };
            let right = len.saturating_sub(l3 + if v6 { 40 } else { 0 }) as i64;
            let v = match rng.below(4) {
                0 => i64::from(rng.u16()),
                1 => 0,
                _ => right + rng.below(17) as i64 - 8,
            };
            put(f, off, &(v.clamp(0, 0xffff) as u16).to_be_bytes());
        }
        7 => {
            let any = rng.u16();
            let et = rng.pick(&[ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, 0x0806, 0x88a8, 0, any]);
            put(f, l3 - 2, &et.to_be_bytes());
        }
        8 => {
            let any = rng.byte();
            let p = rng.pick(&[6u8, 17, 4, 41, 1, 0, 43, 44, 51, 60, 50, 58, any]);
            let off = if v6 { l3 + 6 } else { l3 + 9 };
            put(f, off, &[p]);
        }
        9 => {
            let p = rng.u16();
            put(f, l4, &p.to_be_bytes());
        }
        10 => {
            let p = if rng.one_in(4) {
                rng.u16()
            } else {
                rng.pick(&PORTS)
            };
            put(f, l4 + 2, &p.to_be_bytes());
        }
        11 => {
            if v6 {
                let mut a = VIP6.octets();
                if rng.one_in(3) {
                    a[15] = rng.byte();
                }
                put(f, l3 + 24, &a);
            } else {
                let a = match rng.below(4) {
                    0 => VIP_A.octets(),
                    1 => VIP_B.octets(),
                    2 => [198, 18, 0, rng.byte()],
                    _ => rng.next_u64().to_ne_bytes()[..4].try_into().unwrap(),
                };
                put(f, l3 + 16, &a);
            }
        }
        12 => {
            let any = rng.u16();
            let w = rng.pick(&[
                0u16, 0x4000, 0x2000, 0x0001, 0x2001, 0x1fff, 0x8000, 0x6000, any,
            ]);
            put(f, l3 + 6, &w.to_be_bytes());
        }
        13 => {
            let any = rng.byte();
            let fl = rng.pick(&[
                tcp_flags::SYN,
                tcp_flags::ACK,
                tcp_flags::SYN | tcp_flags::ACK,
                0,
                tcp_flags::RST,
                any,
            ]);
            put(f, l4 + 13, &[fl]);
        }
        14 => {
            if l3 == 18 {
                f.drain(12..16);
            } else {
                let tci = rng.u16().to_be_bytes();
                f.splice(12..12, [0x81, 0x00, tci[0], tci[1]]);
            }
        }
        15 => {
            let start = rng.below(len);
            let end = (start + 1 + rng.below(16)).min(len);
            for b in &mut f[start..end] {
                *b = rng.byte();
            }
        }
        16 => {
            let at = rng.below(len + 1);
            let n = 1 + rng.below(8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
            f.splice(at..at, bytes);
        }
        _ => {
            // The source address: a new flow, otherwise valid.
            if v6 {
                put(f, l3 + 8 + 14, &rng.u16().to_be_bytes());
            } else {
                put(f, l3 + 14, &rng.u16().to_be_bytes());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The reference model

/// A packet the load balancer decides on (for an ICMP error: the flow it is about).
#[derive(Clone, Copy, Debug)]
struct Flow {
    l3: usize,
    l4: usize,
    family: u8,
    src: [u8; 16],
    dst: [u8; 16],
    sport: [u8; 2],
    dport: [u8; 2],
    proto: u8,
    tos: u8,
    /// Length of the IP packet as its header says.
    l3_len: usize,
    df: bool,
    icmp_error: bool,
}

/// An ICMP/ICMPv6 echo request.
#[derive(Clone, Copy, Debug)]
struct Echo {
    l3: usize,
    family: u8,
    dst: [u8; 16],
    icmp: usize,
}

/// A TCP/UDP fragment (no ports): balanced through the service taking its VIP's fragments.
#[derive(Clone, Copy, Debug)]
struct Frag {
    family: u8,
    dst: [u8; 16],
    proto: u8,
}

enum Parsed {
    Flow(Flow),
    Echo(Echo),
    Fragment(Frag),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Expect {
    Pass(Reason),
    Drop(Reason),
    Tx(Reason, Vec<u8>),
}

impl Expect {
    fn action(&self) -> u32 {
        match self {
            Expect::Pass(_) => XDP_PASS,
            Expect::Drop(_) => XDP_DROP,
            Expect::Tx(..) => XDP_TX,
        }
    }

    fn reason(&self) -> Reason {
        match self {
            Expect::Pass(r) | Expect::Drop(r) | Expect::Tx(r, _) => *r,
        }
    }
}

/// What the model predicts for one run of `lb_xdp`.
struct Outcome {
    expect: Expect,
    /// (service id, backend id) when a backend was selected (the service and backend
    /// counters count the packet, whatever happens next).
    selected: Option<(u32, u32)>,
    /// An ICMP error forwarded to a backend (counted as `icmp_to_backend` on the side).
    icmp_error: bool,
    /// Sent to a neighbouring slot's backend because its own is unreachable (counted as
    /// `fallback_unreachable` on the side).
    fallback: bool,
}

impl Outcome {
    fn verdict(expect: Expect) -> Self {
        Outcome {
            expect,
            selected: None,
            icmp_error: false,
            fallback: false,
        }
    }
}

/// L3 offset and ethertype: one optional 802.1Q tag.
fn parse_l2(f: &[u8]) -> Result<(usize, u16), Reason> {
    match be16(f, 12) {
        ETH_P_8021Q if f.len() < 18 => Err(Reason::PassMalformed),
        ETH_P_8021Q => Ok((18, be16(f, 16))),
        et => Ok((14, et)),
    }
}

/// Ports and SYN of the TCP/UDP header at `off`; the header must fit in the IP packet and
/// in the frame.
fn parse_ports(
    f: &[u8],
    off: usize,
    proto: u8,
    l3_end: usize,
) -> Result<([u8; 2], [u8; 2]), Reason> {
    let l4_len = if proto == 6 { 20 } else { 8 };
    if off + l4_len > l3_end || off + l4_len > f.len() {
        return Err(Reason::PassMalformed);
    }
    Ok(([f[off], f[off + 1]], [f[off + 2], f[off + 3]]))
}

fn addr16(a: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..a.len()].copy_from_slice(a);
    out
}

/// ICMP/ICMPv6 after the IP header: an echo request, or an error about a flow (the quoted
/// header is a reply from the VIP: reversed, it is the client's flow). What is read must lie
/// inside the frame and inside the IP packet (not in Ethernet padding).
fn parse_icmp(f: &[u8], outer: Flow) -> Result<Parsed, Reason> {
    let v4 = outer.family == FAMILY_V4;
    let ip_end = outer.l3 + outer.l3_len;
    let within = |off: usize, len: usize| {
        if off + len > ip_end {
            Err(Reason::PassMalformed)
        } else {
            Ok(())
        }
    };
    let icmp = f.get(outer.l4..outer.l4 + 8).ok_or(Reason::PassMalformed)?;
    within(outer.l4, 8)?;
    let (echo, errors): (u8, &[u8]) = if v4 { (8, &[3, 11]) } else { (128, &[1, 2, 3]) };
    if icmp[0] == echo {
        return Ok(Parsed::Echo(Echo {
            l3: outer.l3,
            family: outer.family,
            dst: outer.dst,
            icmp: outer.l4,
        }));
    }
    if !errors.contains(&icmp[0]) {
        return Err(Reason::PassNotVip);
    }
    let q = outer.l4 + 8;
    let (vip, client, proto, ports_off) = if v4 {
        let ip = f.get(q..q + 20).ok_or(Reason::PassMalformed)?;
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ip[0] >> 4 != 4 || ihl < 20 {
            return Err(Reason::PassMalformed);
        }
        (addr16(&ip[12..16]), addr16(&ip[16..20]), ip[9], q + ihl)
    } else {
        let ip = f.get(q..q + 40).ok_or(Reason::PassMalformed)?;
        (addr16(&ip[8..24]), addr16(&ip[24..40]), ip[6], q + 40)
    };
    if proto != 6 && proto != 17 {
        return Err(Reason::PassNotVip);
    }
    let ports = f
        .get(ports_off..ports_off + 4)
        .ok_or(Reason::PassMalformed)?;
    within(q, ports_off + 4 - q)?;
    Ok(Parsed::Flow(Flow {
        src: client,
        dst: vip,
        sport: [ports[2], ports[3]],
        dport: [ports[0], ports[1]],
        proto,
        icmp_error: true,
        ..outer
    }))
}

fn parse_v4(f: &[u8], l3: usize) -> Result<Parsed, Reason> {
    let ip = f.get(l3..l3 + 20).ok_or(Reason::PassMalformed)?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tot = usize::from(be16(ip, 2));
    if ip[0] >> 4 != 4 || ihl < 20 || tot < ihl {
        return Err(Reason::PassMalformed);
    }
    let proto = ip[9];
    if ![1, 6, 17].contains(&proto) {
        return Err(Reason::PassNotVip);
    }
    if ip[6] & 0x3f != 0 || ip[7] != 0 {
        if proto == 1 {
            return Err(Reason::PassFragment);
        }
        if l3 + tot > f.len() {
            return Err(Reason::PassMalformed);
        }
        return Ok(Parsed::Fragment(Frag {
            family: FAMILY_V4,
            dst: addr16(&ip[16..20]),
            proto,
        }));
    }
    let mut flow = Flow {
        l3,
        l4: l3 + ihl,
        family: FAMILY_V4,
        src: addr16(&ip[12..16]),
        dst: addr16(&ip[16..20]),
        sport: [0; 2],
        dport: [0; 2],
        proto,
        tos: ip[1],
        l3_len: tot,
        df: ip[6] & 0x40 != 0,
        icmp_error: false,
    };
    if proto == 1 {
        let parsed = parse_icmp(f, flow)?;
        if l3 + tot > f.len() {
            return Err(Reason::PassMalformed);
        }
        return Ok(parsed);
    }
    (flow.sport, flow.dport) = parse_ports(f, l3 + ihl, proto, l3 + tot)?;
    if l3 + tot > f.len() {
        return Err(Reason::PassMalformed);
    }
    Ok(Parsed::Flow(flow))
}

fn parse_v6(f: &[u8], l3: usize) -> Result<Parsed, Reason> {
    let ip = f.get(l3..l3 + 40).ok_or(Reason::PassMalformed)?;
    let plen = usize::from(be16(ip, 4));
    if ip[0] >> 4 != 6 || plen == 0 || 40 + plen > 0xffff {
        return Err(Reason::PassMalformed);
    }
    let mut next = ip[6];
    let mut off = l3 + 40;
    let mut fragment = false;
    for _ in 0..4 {
        if [6, 17, 58].contains(&next) {
            break;
        }
        let ext = f.get(off..off + 4).ok_or(Reason::PassMalformed)?;
        match next {
            0 | 43 | 60 => off += (usize::from(ext[1]) + 1) * 8,
            51 => off += (usize::from(ext[1]) + 2) * 4,
            44 => {
                if ext[2] != 0 || ext[3] & 0xf9 != 0 {
                    fragment = true;
                    next = ext[0];
                    break;
                }
                off += 8;
            }
            _ => return Err(Reason::PassNotVip),
        }
        next = ext[0];
    }
    if fragment {
        if next != 6 && next != 17 {
            return Err(Reason::PassFragment);
        }
        if l3 + 40 + plen > f.len() {
            return Err(Reason::PassMalformed);
        }
        return Ok(Parsed::Fragment(Frag {
            family: FAMILY_V6,
            dst: ip[24..40].try_into().unwrap(),
            proto: next,
        }));
    }
    let l3_end = l3 + 40 + plen;
    let mut flow = Flow {
        l3,
        l4: off,
        family: FAMILY_V6,
        src: ip[8..24].try_into().unwrap(),
        dst: ip[24..40].try_into().unwrap(),
        sport: [0; 2],
        dport: [0; 2],
        proto: next,
        tos: (ip[0] << 4) | (ip[1] >> 4),
        l3_len: 40 + plen,
        df: true,
        icmp_error: false,
    };
    if next == 58 {
        let parsed = parse_icmp(f, flow)?;
        if l3_end > f.len() {
            return Err(Reason::PassMalformed);
        }
        return Ok(parsed);
    }
    if next != 6 && next != 17 {
        return Err(Reason::PassNotVip);
    }
    (flow.sport, flow.dport) = parse_ports(f, off, next, l3_end)?;
    if l3_end > f.len() {
        return Err(Reason::PassMalformed);
    }
    Ok(Parsed::Flow(flow))
}

fn parse(f: &[u8]) -> Result<Parsed, Reason> {
    let (l3, et) = parse_l2(f)?;
    match et {
        ETH_P_IP => parse_v4(f, l3),
        ETH_P_IPV6 => parse_v6(f, l3),
        _ => Err(Reason::PassNotIp),
    }
}

fn service_key(p: &Flow) -> ServiceKey {
    ServiceKey {
        addr_be: p.dst,
        port_be: u16::from_ne_bytes(p.dport),
        proto: p.proto,
        family: p.family,
    }
}

fn flow_hash(p: &Flow) -> u32 {
    let (sport, dport) = (u16::from_ne_bytes(p.sport), u16::from_ne_bytes(p.dport));
    if p.family == FAMILY_V4 {
        flow_hash_v4(
            u32::from_ne_bytes(p.src[..4].try_into().unwrap()),
            u32::from_ne_bytes(p.dst[..4].try_into().unwrap()),
            sport,
            dport,
            p.proto,
        )
    } else {
        flow_hash_v6(&p.src, &p.dst, sport, dport, p.proto)
    }
}

/// The Ethernet header (and VLAN tag) a transmitted frame starts with.
fn l2_header(input: &[u8], l3: usize, dst: [u8; 6], src: [u8; 6], ether_type: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(l3);
    out.extend_from_slice(&dst);
    out.extend_from_slice(&src);
    if l3 == 18 {
        out.extend_from_slice(&input[12..16]);
    }
    out.extend_from_slice(&ether_type.to_be_bytes());
    out
}

/// Internet checksum of `data` (RFC 1071), ready to store big-endian.
fn checksum(data: &[u8]) -> [u8; 2] {
    ipv4_checksum(data).to_be_bytes()
}

/// The ICMPv6 checksum of `icmp` (checksum field zero) between `src` and `dst`.
fn icmp6_checksum(src: &[u8], dst: &[u8], icmp: &[u8]) -> [u8; 2] {
    let mut buf = src.to_vec();
    buf.extend_from_slice(dst);
    buf.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    buf.extend_from_slice(&[0, 0, 0, 58]);
    buf.extend_from_slice(icmp);
    checksum(&buf)
}

impl Model {
    fn lb(&self, f: &[u8]) -> Outcome {
        let p = match parse(f) {
            Ok(Parsed::Flow(p)) => p,
            Ok(Parsed::Echo(e)) => return Outcome::verdict(self.echo_reply(f, &e)),
            Ok(Parsed::Fragment(fr)) => return Outcome::verdict(self.fragment(&fr)),
            Err(r) => return Outcome::verdict(Expect::Pass(r)),
        };
        let Some((svc, table)) = self.services.get(&service_key(&p)) else {
            return Outcome::verdict(Expect::Pass(Reason::PassNotVip));
        };
        if svc.flags & SERVICE_F_SOURCE_RANGES != 0 && !self.source_allowed(svc.id, &p.src) {
            return Outcome::verdict(Expect::Drop(Reason::DropSourceRange));
        }
        if svc.table_size == 0 {
            return Outcome::verdict(Expect::Drop(Reason::DropNoBackend));
        }
        // With a constant configuration a remembered flow holds exactly what Maglev
        // decides, so the flow table does not change the outcome.
        let hash = flow_hash(&p);
        let of_service = |id| {
            self.backends
                .get(&id)
                .filter(|b| b.is_valid() && b.service_id == svc.id)
        };
        let slot = lb_common::hash::slot(hash, svc.table_size);
        let unreachable = |id| of_service(id).is_some_and(|b| b.is_unreachable());
        let chosen = lb_common::maglev::choose(table, slot, unreachable, |id| {
            of_service(id).is_some_and(|b| b.can_take())
        });
        let Some((id, b)) = chosen.and_then(|id| Some((id, of_service(id)?))) else {
            return Outcome::verdict(Expect::Drop(Reason::DropNoBackend));
        };
        if b.flags & BACKEND_F_NO_NEIGH != 0 {
            return Outcome::verdict(Expect::Drop(Reason::DropNoNeighbor));
        }
        let expect = match Forwarding::from_u8(svc.forwarding) {
            Some(Forwarding::L2) => {
                let mut out = f.to_vec();
                out[..6].copy_from_slice(&b.mac);
                out[6..12].copy_from_slice(&self.cfg.mac);
                Expect::Tx(Reason::TxL2, out)
            }
            Some(Forwarding::Ipip) => {
                let h = if b.family == FAMILY_V4 { 0 } else { hash };
                self.encap(f, &p, b, false, h)
            }
            Some(Forwarding::Gue) => self.encap(f, &p, b, true, hash),
            None => Expect::Drop(Reason::DropBadForwarding),
        };
        Outcome {
            expect,
            selected: Some((svc.id, id)),
            icmp_error: p.icmp_error,
            fallback: unreachable(table[slot as usize]),
        }
    }

    fn encap(&self, f: &[u8], p: &Flow, b: &BackendValue, gue: bool, hash: u32) -> Expect {
        let inner_proto = if p.family == FAMILY_V4 { 4 } else { 41 };
        let outer_proto = if gue { 17 } else { inner_proto };
        let udp_len = if gue { 8 } else { 0 };
        let extra = if b.family == FAMILY_V4 { 20 } else { 40 } + udp_len;
        let mtu = usize::from(self.cfg.mtu);
        if mtu != 0 && p.l3_len + extra > mtu {
            if self.cfg.flags & CONFIG_F_PMTU_ICMP == 0 || mtu <= extra {
                return Expect::Drop(Reason::DropTooBig);
            }
            return self.too_big(f, p, mtu - extra);
        }
        let mut out = if b.family == FAMILY_V4 {
            if self.cfg.encap_src_v4_be == [0; 4] {
                return Expect::Drop(Reason::DropNoConfig);
            }
            let len = p.l3_len + extra;
            if len > 0xffff {
                return Expect::Drop(Reason::DropTooBig);
            }
            let mut h = vec![0x45, p.tos];
            h.extend_from_slice(&(len as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0, if p.df { 0x40 } else { 0 }, 0, 64, outer_proto, 0, 0]);
            h.extend_from_slice(&self.cfg.encap_src_v4_be);
            h.extend_from_slice(&b.addr_be[..4]);
            let c = checksum(&h);
            h[10..12].copy_from_slice(&c);
            let mut out = l2_header(f, p.l3, b.mac, self.cfg.mac, ETH_P_IP);
            out.extend_from_slice(&h);
            out
        } else {
            if self.cfg.encap_src_v6_be == [0; 16] {
                return Expect::Drop(Reason::DropNoConfig);
            }
            let plen = p.l3_len + udp_len;
            if plen > 0xffff {
                return Expect::Drop(Reason::DropTooBig);
            }
            let label = hash & 0x000f_ffff;
            let mut h = vec![
                0x60 | (p.tos >> 4),
                (p.tos << 4) | (label >> 16) as u8,
                (label >> 8) as u8,
                label as u8,
            ];
            h.extend_from_slice(&(plen as u16).to_be_bytes());
            h.extend_from_slice(&[outer_proto, 64]);
            h.extend_from_slice(&self.cfg.encap_src_v6_be);
            h.extend_from_slice(&b.addr_be);
            let mut out = l2_header(f, p.l3, b.mac, self.cfg.mac, ETH_P_IPV6);
            out.extend_from_slice(&h);
            out
        };
        if gue {
            out.extend_from_slice(&gue_source_port(hash).to_be_bytes());
            out.extend_from_slice(&u16::from_be(self.cfg.gue_port_be).to_be_bytes());
            out.extend_from_slice(&((p.l3_len + 8) as u16).to_be_bytes());
            out.extend_from_slice(&[0, 0]);
        }
        out.extend_from_slice(&f[p.l3..]);
        Expect::Tx(if gue { Reason::TxGue } else { Reason::TxIpip }, out)
    }

    /// ICMP "fragmentation needed" / ICMPv6 "packet too big" from the VIP to the client,
    /// announcing `mtu`, quoting the start of the client's packet.
    fn too_big(&self, f: &[u8], p: &Flow, mtu: usize) -> Expect {
        let v4 = p.family == FAMILY_V4;
        let answerable = if v4 {
            p.df && p.l4 - p.l3 == 20
        } else {
            mtu >= 1280
        };
        if p.icmp_error || !answerable {
            return Expect::Drop(Reason::DropTooBig);
        }
        let (ip_len, quote) = if v4 { (20, 28) } else { (40, 1232) };
        if f.len() < p.l3 + quote {
            return Expect::Drop(Reason::DropTooBig);
        }
        let client_mac: [u8; 6] = f[6..12].try_into().unwrap();
        let et = if v4 { ETH_P_IP } else { ETH_P_IPV6 };
        let mut out = l2_header(f, p.l3, client_mac, self.cfg.mac, et);
        let mut icmp = if v4 {
            vec![3, 4, 0, 0, 0, 0, (mtu >> 8) as u8, mtu as u8]
        } else {
            let mut h = vec![2, 0, 0, 0];
            h.extend_from_slice(&(mtu as u32).to_be_bytes());
            h
        };
        icmp.extend_from_slice(&f[p.l3..p.l3 + quote]);
        if v4 {
            let mut h = vec![0x45, 0];
            h.extend_from_slice(&((ip_len + icmp.len()) as u16).to_be_bytes());
            h.extend_from_slice(&[0, 0, 0, 0, 64, 1, 0, 0]);
            h.extend_from_slice(&p.dst[..4]);
            h.extend_from_slice(&p.src[..4]);
            let c = checksum(&h);
            h[10..12].copy_from_slice(&c);
            let c = checksum(&icmp);
            icmp[2..4].copy_from_slice(&c);
            out.extend_from_slice(&h);
        } else {
            let mut h = vec![0x60, 0, 0, 0];
            h.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
            h.extend_from_slice(&[58, 64]);
            h.extend_from_slice(&p.dst);
            h.extend_from_slice(&p.src);
            let c = icmp6_checksum(&p.dst, &p.src, &icmp);
            icmp[2..4].copy_from_slice(&c);
            out.extend_from_slice(&h);
        }
        out.extend_from_slice(&icmp);
        Expect::Tx(Reason::TxIcmpTooBig, out)
    }

    /// An echo request to a VIP with echo enabled is answered in place.
    fn echo_reply(&self, f: &[u8], e: &Echo) -> Expect {
        if !self.is_echo_vip(&e.dst, e.family) {
            return Expect::Pass(Reason::PassNotVip);
        }
        let mut out = f.to_vec();
        out[..6].copy_from_slice(&f[6..12]);
        out[6..12].copy_from_slice(&f[..6]);
        let (a, n, reply) = if e.family == FAMILY_V4 {
            (e.l3 + 12, 4, 0)
        } else {
            (e.l3 + 8, 16, 129)
        };
        out[a..a + n].copy_from_slice(&f[a + n..a + 2 * n]);
        out[a + n..a + 2 * n].copy_from_slice(&f[a..a + n]);
        // RFC 1624: a checksum updated for one changed word, whatever it was before; the
        // all-zero result is written as 0xffff (the only zero a receiver accepts when all
        // the covered data is zero).
        let update = |check: [u8; 2], old: u16, new: u16| {
            let hc = !u16::from_be_bytes(check);
            let mut sum = u32::from(hc) + u32::from(!old) + u32::from(new);
            sum = (sum & 0xffff) + (sum >> 16);
            sum = (sum & 0xffff) + (sum >> 16);
            (!(sum as u16)).to_be_bytes()
        };
        // A fresh TTL / hop limit of 64; the IPv4 header checksum follows it.
        if e.family == FAMILY_V4 {
            let old = u16::from_be_bytes([f[e.l3 + 8], f[e.l3 + 9]]);
            let new = u16::from_be_bytes([64, f[e.l3 + 9]]);
            let c = update([f[e.l3 + 10], f[e.l3 + 11]], old, new);
            out[e.l3 + 8] = 64;
            out[e.l3 + 10..e.l3 + 12].copy_from_slice(&c);
        } else {
            out[e.l3 + 7] = 64;
        }
        let i = e.icmp;
        let old = u16::from_be_bytes([f[i], f[i + 1]]);
        let new = u16::from_be_bytes([reply, f[i + 1]]);
        let c = update([f[i + 2], f[i + 3]], old, new);
        out[i] = reply;
        out[i + 2..i + 4].copy_from_slice(if c == [0, 0] { &[0xff, 0xff] } else { &c });
        Expect::Tx(Reason::TxEchoReply, out)
    }

    /// `lb_decap`: the reason, and the output frame.
    fn decap(&self, f: &[u8]) -> (Reason, Vec<u8>) {
        match self.try_decap(f) {
            Ok(out) => (Reason::DecapPass, out),
            Err(r) => (r, f.to_vec()),
        }
    }

    fn try_decap(&self, f: &[u8]) -> Result<Vec<u8>, Reason> {
        let (l3, et) = parse_l2(f)?;
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        let (ip_len, proto, family) = match et {
            ETH_P_IP => {
                let ip = f.get(l3..l3 + 20).ok_or(Reason::PassMalformed)?;
                let ihl = usize::from(ip[0] & 0x0f) * 4;
                if ip[0] >> 4 != 4 || ihl < 20 {
                    return Err(Reason::PassMalformed);
                }
                if ip[6] & 0x3f != 0 || ip[7] != 0 {
                    return Err(Reason::PassFragment);
                }
                src[..4].copy_from_slice(&ip[12..16]);
                dst[..4].copy_from_slice(&ip[16..20]);
                (ihl, ip[9], FAMILY_V4)
            }
            ETH_P_IPV6 => {
                let ip = f.get(l3..l3 + 40).ok_or(Reason::PassMalformed)?;
                if ip[0] >> 4 != 6 {
                    return Err(Reason::PassMalformed);
                }
                src.copy_from_slice(&ip[8..24]);
                dst.copy_from_slice(&ip[24..40]);
                (40, ip[6], FAMILY_V6)
            }
            _ => return Err(Reason::PassNotIp),
        };
        let strip = match proto {
            4 | 41 => ip_len,
            17 => {
                let off = l3 + ip_len;
                let udp = f.get(off..off + 8).ok_or(Reason::PassMalformed)?;
                let port = self.cfg.gue_port_be;
                if port == 0 || u16::from_ne_bytes([udp[2], udp[3]]) != port {
                    return Err(Reason::PassNotVip);
                }
                let first = f.get(off + 8..off + 10).ok_or(Reason::PassMalformed)?[0];
                match first >> 6 {
                    0b01 => ip_len + 8,
                    0b00 if first & 0x20 == 0 => ip_len + 12 + usize::from(first & 0x1f) * 4,
                    _ => return Err(Reason::PassNotVip),
                }
            }
            _ => return Err(Reason::PassNotVip),
        };
        // The program reads the inner packet's first four bytes at once (a shorter one is
        // malformed anyway: no IP header fits).
        let version = f
            .get(l3 + strip..l3 + strip + 4)
            .ok_or(Reason::PassMalformed)?[0]
            >> 4;
        let et = match (version, proto) {
            (4, 4 | 17) => ETH_P_IP,
            (6, 41 | 17) => ETH_P_IPV6,
            _ => return Err(Reason::PassMalformed),
        };
        // Only tunnels from an allowed source to one of the node's destinations are opened.
        if !lpm_any(&self.decap_destinations, family, &dst)
            || !lpm_any(&self.decap_sources, family, &src)
        {
            return Err(Reason::PassDecapNotAllowed);
        }
        let mut out = f[..l3].to_vec();
        put(&mut out, l3 - 2, &et.to_be_bytes());
        out.extend_from_slice(&f[l3 + strip..]);
        Ok(out)
    }

    /// Longest-prefix match of (service id, client) against the service's ranges: any
    /// entry whose prefix matches will do.
    fn source_allowed(&self, id: u32, client: &[u8; 16]) -> bool {
        let mut key = id.to_be_bytes().to_vec();
        key.extend_from_slice(client);
        self.source_ranges.iter().any(|(bits, range)| {
            let mut data = range.service_id_be.to_vec();
            data.extend_from_slice(&range.addr_be);
            (0..*bits as usize).all(|i| (key[i / 8] ^ data[i / 8]) & (0x80 >> (i % 8)) == 0)
        })
    }

    /// Backends packets may be sent to: not those whose MAC is unknown or whose next hop
    /// failed.
    fn reachable(&self) -> impl Iterator<Item = &BackendValue> {
        self.backends.values().filter(|b| b.can_take())
    }

    fn is_backend_mac(&self, mac: &[u8]) -> bool {
        self.reachable().any(|b| b.mac == mac)
    }

    fn is_backend_addr(&self, addr: &[u8], family: u8) -> bool {
        self.reachable()
            .any(|b| b.family == family && b.addr_be[..addr.len()] == *addr)
    }

    /// A fragment to a VIP goes to the VIP's fragment service, if it has one for the
    /// protocol; the fuzzed configuration has none, so VIP fragments are dropped.
    fn fragment(&self, fr: &Frag) -> Expect {
        let key = VipKey::new(fr.dst, fr.family);
        let Some(v) = self.vips.get(&key) else {
            return Expect::Pass(Reason::PassFragment);
        };
        let port = if fr.proto == 6 {
            v.frag_port_tcp_be
        } else {
            v.frag_port_udp_be
        };
        assert_eq!(
            port, 0,
            "the fuzzed configuration takes no fragments: extend the model first"
        );
        Expect::Drop(Reason::DropFragment)
    }

    fn is_echo_vip(&self, addr: &[u8], family: u8) -> bool {
        let key = VipKey::new(addr16(addr), family);
        self.vips
            .get(&key)
            .is_some_and(|v| v.flags & VIP_F_ECHO != 0)
    }
}

// ---------------------------------------------------------------------------------------
// Model-free invariants

/// Length of the IP packet starting at `ip`, from its header.
fn ip_len(ip: &[u8]) -> Option<usize> {
    match ip.first()? >> 4 {
        4 => Some(usize::from(be16(ip.get(..4)?, 2))),
        6 => Some(40 + usize::from(be16(ip.get(..6)?, 4))),
        _ => None,
    }
}

/// Does the one's-complement sum over `data` verify (checksum field included)?
fn sums_to_zero(data: &[u8]) -> bool {
    ipv4_checksum(data) == 0
}

/// What any TX of `lb_xdp` must look like: an L2 rewrite or an encapsulation of a packet
/// for a configured VIP:port (an ICMP error about such a flow included), an echo reply
/// from an echo-enabled VIP, or a "too big" error from a VIP.
fn check_tx(m: &Model, input: &[u8], out: &[u8]) -> Result<&'static str, String> {
    let (l3, _) = parse_l2(input).map_err(|_| "TX of a frame without L2 header")?;
    let parsed =
        parse(input).map_err(|r| format!("TX of a packet the parser rejects ({})", r.name()))?;
    if out.len() < l3 + 20 {
        return Err("TX frame too short".into());
    }
    if let Parsed::Echo(e) = parsed {
        // Echo reply: MACs, addresses and the ICMP type changed, nothing else.
        if !m.is_echo_vip(&e.dst, e.family) {
            return Err("echo reply for an address that is not an echo-enabled VIP".into());
        }
        if out.len() != input.len() || out[..6] != input[6..12] || out[6..12] != input[..6] {
            return Err("echo reply: not the request with MACs swapped".into());
        }
        let (a, n, reply) = if e.family == FAMILY_V4 {
            (l3 + 12, 4, 0)
        } else {
            (l3 + 8, 16, 129)
        };
        if out[a..a + n] != input[a + n..a + 2 * n] || out[a + n..a + 2 * n] != input[a..a + n] {
            return Err("echo reply: addresses not swapped".into());
        }
        let i = e.icmp;
        let mut same = out.to_vec();
        same[..12].copy_from_slice(&input[..12]);
        same[a..a + 2 * n].copy_from_slice(&input[a..a + 2 * n]);
        same[i] = input[i];
        same[i + 2..i + 4].copy_from_slice(&input[i + 2..i + 4]);
        // The TTL / hop limit (and the IPv4 header checksum with it) may be reset.
        if e.family == FAMILY_V4 {
            same[l3 + 8] = input[l3 + 8];
            same[l3 + 10..l3 + 12].copy_from_slice(&input[l3 + 10..l3 + 12]);
        } else {
            same[l3 + 7] = input[l3 + 7];
        }
        if same != input || out[i] != reply {
            return Err(
                "echo reply: more than MACs, addresses, TTL, type and checksums changed".into(),
            );
        }
        // A request with a right checksum gets a reply with a right checksum.
        let end = (l3 + ip_len(&input[l3..]).unwrap_or(0)).min(input.len());
        if end > i {
            let ok = |f: &[u8]| {
                if e.family == FAMILY_V4 {
                    sums_to_zero(&f[i..end])
                } else {
                    let mut b = f[l3 + 8..l3 + 40].to_vec();
                    b.extend_from_slice(&((end - i) as u32).to_be_bytes());
                    b.extend_from_slice(&[0, 0, 0, 58]);
                    b.extend_from_slice(&f[i..end]);
                    sums_to_zero(&b)
                }
            };
            if ok(input) && !ok(out) {
                return Err("echo reply: checksum no longer verifies".into());
            }
        }
        return Ok("echo reply");
    }
    let Parsed::Flow(p) = parsed else {
        unreachable!()
    };
    // Everything else is about a configured VIP:port (for an ICMP error: the flow it quotes).
    if !m.services.contains_key(&service_key(&p)) {
        return Err("TX of a packet that is not for a VIP:port".into());
    }
    if out[6..12] != LB_MAC {
        return Err("source MAC is not the node's".into());
    }
    if out.len() == input.len() && out[12..] == input[12..] {
        // L2 rewrite: nothing but the MACs changed.
        return if m.is_backend_mac(&out[..6]) {
            Ok("l2")
        } else {
            Err("L2 rewrite to a MAC that is no backend's".into())
        };
    }
    if out[12..l3 - 2] != input[12..l3 - 2] {
        return Err("VLAN tag not preserved".into());
    }
    let inner_len = ip_len(&input[l3..]).ok_or("inner packet is not IP")?;
    if out.len() < input.len() {
        return check_too_big(&p, input, out, l3);
    }
    if !m.is_backend_mac(&out[..6]) {
        return Err("encapsulated frame to a MAC that is no backend's".into());
    }
    let extra = out.len() - input.len();
    if out[l3 + extra..] != input[l3..] {
        return Err("the inner packet is not the input's IP packet byte for byte".into());
    }
    let outer = &out[l3..l3 + extra];
    let inner_proto = if p.family == FAMILY_V4 { 4 } else { 41 };
    let (ip_hdr, proto) = match (be16(out, l3 - 2), extra) {
        (ETH_P_IP, 20 | 28) => {
            if !verify_ipv4_header_checksum(outer) || outer[0] != 0x45 {
                return Err("outer IPv4 header invalid (version/IHL/checksum)".into());
            }
            if usize::from(be16(outer, 2)) != inner_len + extra {
                return Err("outer total length is not inner length + outer headers".into());
            }
            if outer[12..16] != ENCAP_V4.octets() {
                return Err("outer source is not the encapsulation source".into());
            }
            if !m.is_backend_addr(&outer[16..20], FAMILY_V4) {
                return Err("outer destination is no backend".into());
            }
            (20, outer[9])
        }
        (ETH_P_IPV6, 40 | 48) => {
            if outer[0] >> 4 != 6 || usize::from(be16(outer, 4)) != inner_len + extra - 40 {
                return Err("outer IPv6 header invalid (version/payload length)".into());
            }
            if outer[8..24] != ENCAP_V6.octets() {
                return Err("outer source is not the encapsulation source".into());
            }
            if !m.is_backend_addr(&outer[24..40], FAMILY_V6) {
                return Err("outer destination is no backend".into());
            }
            (40, outer[6])
        }
        (et, n) => {
            return Err(format!(
                "unknown encapsulation: ethertype {et:#06x}, {n} bytes"
            ));
        }
    };
    if usize::from(m.cfg.mtu) != 0 && inner_len + extra > usize::from(m.cfg.mtu) {
        return Err("encapsulated packet exceeds the MTU".into());
    }
    match (extra - ip_hdr, proto) {
        (0, p) if p == inner_proto => Ok("ipip"),
        (8, 17) => {
            let udp = &outer[ip_hdr..];
            if be16(udp, 2) != u16::from_be(m.cfg.gue_port_be) {
                Err("GUE destination port is not the node's".into())
            } else if usize::from(be16(udp, 4)) != inner_len + 8 {
                Err("GUE UDP length is not inner length + 8".into())
            } else {
                Ok("gue")
            }
        }
        _ => Err(format!(
            "outer protocol {proto} does not fit the encapsulation"
        )),
    }
}

/// An ICMP "fragmentation needed" / ICMPv6 "packet too big" back to the client.
fn check_too_big(p: &Flow, input: &[u8], out: &[u8], l3: usize) -> Result<&'static str, String> {
    if out[..6] != input[6..12] {
        return Err("too-big error not sent back to the client's MAC".into());
    }
    let ip = &out[l3..];
    let (src, dst, icmp, expected) = if p.family == FAMILY_V4 {
        if !verify_ipv4_header_checksum(ip) || ip[9] != 1 || usize::from(be16(ip, 2)) != ip.len() {
            return Err("too-big error: invalid IPv4 header".into());
        }
        (&ip[12..16], &ip[16..20], &ip[20..], [3u8, 4])
    } else {
        if ip.len() < 48
            || ip[0] >> 4 != 6
            || ip[6] != 58
            || usize::from(be16(ip, 4)) + 40 != ip.len()
        {
            return Err("too-big error: invalid IPv6 header".into());
        }
        (&ip[8..24], &ip[24..40], &ip[40..], [2u8, 0])
    };
    let n = src.len();
    if src != &p.dst[..n] || dst != &p.src[..n] {
        return Err("too-big error not from the VIP to the client".into());
    }
    if icmp[..2] != expected {
        return Err("too-big error: wrong ICMP type/code".into());
    }
    let ok = if p.family == FAMILY_V4 {
        sums_to_zero(icmp)
    } else {
        let mut b = ip[8..40].to_vec();
        b.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
        b.extend_from_slice(&[0, 0, 0, 58]);
        b.extend_from_slice(icmp);
        sums_to_zero(&b)
    };
    if !ok {
        return Err("too-big error: ICMP checksum does not verify".into());
    }
    if !input[l3..].starts_with(&icmp[8..]) {
        return Err("too-big error does not quote the client's packet".into());
    }
    Ok("too big")
}

/// What any result of `lb_decap` must look like.
fn check_decap(input: &[u8], action: u32, out: &[u8]) -> Result<(), String> {
    if action != XDP_PASS {
        return Err(format!("decap returned action {action}, not PASS"));
    }
    if out == input {
        return Ok(());
    }
    let l3 = l3_guess(input);
    let stripped = input
        .len()
        .checked_sub(out.len())
        .filter(|n| *n >= 20)
        .ok_or("decap output is not shorter by at least an IPv4 header")?;
    if out[..12] != input[..12] || out[12..l3 - 2] != input[12..l3 - 2] {
        return Err("decap did not keep the L2 header".into());
    }
    if out[l3..] != input[l3 + stripped..] {
        return Err("decap output is not the input minus the outer headers".into());
    }
    let et = match out[l3] >> 4 {
        4 => ETH_P_IP,
        6 => ETH_P_IPV6,
        _ => return Err("decapsulated packet is not IP".into()),
    };
    if be16(out, l3 - 2) != et {
        return Err("ethertype does not match the inner packet".into());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The run

#[derive(Default)]
struct Failures {
    total: u64,
    by_kind: BTreeMap<String, u64>,
    shown: Vec<String>,
}

impl Failures {
    fn add(&mut self, kind: &str, detail: impl FnOnce() -> String) {
        self.total += 1;
        *self.by_kind.entry(kind.to_string()).or_default() += 1;
        if self.shown.len() < SHOWN_FAILURES {
            self.shown.push(format!("{kind}: {}", detail()));
        }
    }
}

#[derive(Default)]
struct Tally {
    /// (program, action name) → runs.
    actions: BTreeMap<(&'static str, &'static str), u64>,
    /// Reason index → packets the model attributes to it.
    reasons: BTreeMap<u32, u64>,
    /// Service id → (packets, bytes) forwarded.
    services: BTreeMap<u32, (u64, u64)>,
    backends: BTreeMap<u32, u64>,
    /// Kinds of TX frames (l2, ipip, gue, echo reply, too big).
    tx_kinds: BTreeMap<&'static str, u64>,
    icmp_to_backend: u64,
    fallback_unreachable: u64,
}

fn action_name(a: u32) -> &'static str {
    match a {
        XDP_ABORTED => "ABORTED",
        XDP_DROP => "DROP",
        XDP_PASS => "PASS",
        XDP_TX => "TX",
        4 => "REDIRECT",
        _ => "OTHER",
    }
}

fn run(prog: &Xdp, input: &[u8], out: &mut [u8]) -> Result<(u32, usize), String> {
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(input);
    opts.data_out = Some(out);
    let r = prog
        .test_run(opts)
        .map_err(|e| format!("BPF_PROG_TEST_RUN failed: {e}"))?;
    Ok((r.return_value, r.data_size_out as usize))
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => {
            let v = v.replace('_', "");
            let parsed = match v.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => v.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{name}={v}: not a number"))
        }
        Err(_) => default,
    }
}

fn counters(dp: &Dataplane, m: &Model) -> Stats {
    dp.stats(
        m.services.values().map(|(v, _)| v.id),
        m.backends.keys().copied(),
    )
    .unwrap()
}

#[test]
fn random_and_mutated_packets_keep_every_invariant() {
    let packets = env_u64("LB_FUZZ_PACKETS", DEFAULT_PACKETS);
    let seed = env_u64("LB_FUZZ_SEED", DEFAULT_SEED);
    let n = node();
    let m = &n.model;
    let lb: &Xdp = n.ebpf.program(maps::PROG_LB).unwrap().try_into().unwrap();
    let decap: &Xdp = n
        .ebpf
        .program(maps::PROG_DECAP)
        .unwrap()
        .try_into()
        .unwrap();
    let seeds = seeds(u16::from_be(m.cfg.gue_port_be));
    let before = counters(&n.dataplane, m);

    let mut rng = Rng(seed);
    let mut frame: Vec<u8> = Vec::with_capacity(MAX_FRAME + 64);
    let mut out = vec![0u8; 4096];
    let mut out2 = vec![0u8; 4096];
    let mut muts: Vec<usize> = Vec::with_capacity(16);
    let mut fails = Failures::default();
    let mut tally = Tally::default();
    let mut decap_runs = 0u64;
    let start = Instant::now();

    for i in 0..packets {
        let s = &seeds[rng.below(seeds.len())];
        frame.clear();
        frame.extend_from_slice(&s.frame);
        muts.clear();
        // A quarter unchanged or only a new flow (valid traffic), the rest 1-8 mutations.
        let count = match rng.below(8) {
            0 => 0,
            1 => {
                muts.push(MUTATIONS - 1);
                0
            }
            2..=4 => 1,
            5 | 6 => 2,
            _ => 3 + rng.below(6),
        };
        for _ in 0..count {
            muts.push(rng.below(MUTATIONS));
        }
        for &k in &muts {
            mutate(&mut frame, &mut rng, k);
        }
        frame.truncate(MAX_FRAME);
        if frame.len() < 14 {
            frame.resize(14, 0);
        }
        let ctx = |what: &str, action: u32, got: &[u8], expected: Option<&[u8]>| {
            let mut d = format!(
                "{what}: packet #{i} (LB_FUZZ_SEED={seed:#x}, seed frame \"{}\", mutations {muts:?})\ninput ({} bytes):\n{}\noutput (action {}, {} bytes):\n{}",
                s.name,
                frame.len(),
                hexdump(&frame),
                action_name(action),
                got.len(),
                hexdump(got)
            );
            if let Some(e) = expected {
                d.push_str(&format!("\nexpected ({} bytes):\n{}", e.len(), hexdump(e)));
            }
            d
        };

        // lb_xdp
        let (action, len) = match run(lb, &frame, &mut out) {
            Ok(r) => r,
            Err(e) => {
                fails.add("test run error", || {
                    format!("{e}\n{}", ctx("lb_xdp", 0, &[], None))
                });
                continue;
            }
        };
        let got = &out[..len];
        *tally
            .actions
            .entry(("lb_xdp", action_name(action)))
            .or_default() += 1;
        let outcome = m.lb(&frame);
        let expect = &outcome.expect;
        *tally.reasons.entry(expect.reason() as u32).or_default() += 1;
        if let Some((service, backend)) = outcome.selected {
            let e = tally.services.entry(service).or_default();
            e.0 += 1;
            e.1 += frame.len() as u64;
            *tally.backends.entry(backend).or_default() += 1;
        }
        tally.icmp_to_backend += u64::from(outcome.icmp_error && outcome.selected.is_some());
        tally.fallback_unreachable += u64::from(outcome.fallback);
        // Invariants.
        let invariant = match action {
            XDP_PASS if got != frame.as_slice() => Err("PASS changed the frame".to_string()),
            XDP_PASS => Ok(()),
            XDP_DROP if outcome.selected.is_none() && !matches!(expect, Expect::Drop(_)) => {
                Err("dropped a packet that is not for a VIP".to_string())
            }
            XDP_DROP => Ok(()),
            XDP_TX => check_tx(m, &frame, got).map(|kind| {
                *tally.tx_kinds.entry(kind).or_default() += 1;
            }),
            a => Err(format!("action {} is never allowed", action_name(a))),
        };
        if let Err(e) = invariant {
            fails.add(&format!("lb_xdp invariant: {e}"), || {
                ctx("lb_xdp", action, got, None)
            });
        }
        // The model, exactly.
        let want: &[u8] = match expect {
            Expect::Tx(_, f) => f,
            _ => &frame,
        };
        if action != expect.action() || (action != XDP_DROP && got != want) {
            fails.add(
                &format!(
                    "lb_xdp differs from the model (expected {}/{})",
                    action_name(expect.action()),
                    expect.reason().name()
                ),
                || ctx("lb_xdp", action, got, Some(want)),
            );
        }

        // Round trip: what lb_xdp encapsulated, lb_decap restores.
        if action == XDP_TX && len > frame.len() {
            let encapsulated = got.to_vec();
            decap_runs += 1;
            match run(decap, &encapsulated, &mut out2) {
                Ok((a2, len2)) => {
                    *tally
                        .actions
                        .entry(("lb_decap", action_name(a2)))
                        .or_default() += 1;
                    let (r2, _) = m.decap(&encapsulated);
                    *tally.reasons.entry(r2 as u32).or_default() += 1;
                    let mut want = encapsulated[..12].to_vec();
                    want.extend_from_slice(&frame[12..]);
                    if a2 != XDP_PASS || out2[..len2] != want[..] {
                        fails.add("round trip: lb_decap does not restore the packet", || {
                            ctx(
                                "lb_decap of lb_xdp's output",
                                a2,
                                &out2[..len2],
                                Some(&want),
                            )
                        });
                    }
                }
                Err(e) => fails.add("test run error", || e),
            }
        }

        // lb_decap on the frame itself.
        if s.tunnel || rng.one_in(8) {
            decap_runs += 1;
            match run(decap, &frame, &mut out2) {
                Ok((a2, len2)) => {
                    let got2 = &out2[..len2];
                    *tally
                        .actions
                        .entry(("lb_decap", action_name(a2)))
                        .or_default() += 1;
                    if let Err(e) = check_decap(&frame, a2, got2) {
                        fails.add(&format!("lb_decap invariant: {e}"), || {
                            ctx("lb_decap", a2, got2, None)
                        });
                    }
                    let (r2, want) = m.decap(&frame);
                    *tally.reasons.entry(r2 as u32).or_default() += 1;
                    if a2 != XDP_PASS || got2 != want.as_slice() {
                        fails.add(
                            &format!(
                                "lb_decap differs from the model (expected PASS/{})",
                                r2.name()
                            ),
                            || ctx("lb_decap", a2, got2, Some(&want)),
                        );
                    }
                }
                Err(e) => fails.add("test run error", || e),
            }
        }
    }
    let elapsed = start.elapsed();

    // The counters agree with the model: one verdict reason per run, and the service and
    // backend counters count exactly the forwarded packets.
    let after = counters(&n.dataplane, m);
    let delta = |r: Reason| {
        let get = |s: &Stats| {
            s.reasons
                .iter()
                .find(|(x, _)| *x == r)
                .map_or(0, |(_, c)| c.packets)
        };
        get(&after) - get(&before)
    };
    let side = [
        Reason::FlowCreated,
        Reason::FlowGuarded,
        Reason::FlowRerouted,
        Reason::IcmpToBackend,
        Reason::FallbackUnreachable,
    ];
    for (r, want) in [
        (Reason::IcmpToBackend, tally.icmp_to_backend),
        (Reason::FallbackUnreachable, tally.fallback_unreachable),
    ] {
        if delta(r) != want {
            fails.add("counter differs from the model", || {
                format!("{}: counted {}, model {want}", r.name(), delta(r))
            });
        }
    }
    if tally.fallback_unreachable == 0 {
        fails.add("no packet met the unreachable backend", String::new);
    }
    for r in Reason::ALL {
        if side.contains(&r) {
            continue;
        }
        let want = tally.reasons.get(&(r as u32)).copied().unwrap_or(0);
        if delta(r) != want {
            fails.add("counter differs from the model", || {
                format!("{}: counted {}, model {want}", r.name(), delta(r))
            });
        }
    }
    if delta(Reason::FlowRerouted) != 0 {
        fails.add("flow rerouted with a constant backend set", || {
            format!("flow_rerouted moved by {}", delta(Reason::FlowRerouted))
        });
    }
    for (id, (pk, by)) in &tally.services {
        let c = |s: &Stats| s.services.get(id).copied().unwrap_or_default();
        let (a, b) = (c(&after), c(&before));
        if (a.packets - b.packets, a.bytes - b.bytes) != (*pk, *by) {
            fails.add("service counter differs from the model", || {
                format!(
                    "service {id}: counted {} packets {} bytes, model {pk} / {by}",
                    a.packets - b.packets,
                    a.bytes - b.bytes
                )
            });
        }
    }
    for (id, pk) in &tally.backends {
        let c = |s: &Stats| s.backends.get(id).map_or(0, |c| c.packets);
        if c(&after) - c(&before) != *pk {
            fails.add("backend counter differs from the model", || {
                format!(
                    "backend {id}: counted {}, model {pk}",
                    c(&after) - c(&before)
                )
            });
        }
    }

    // Summary, on stderr directly so it shows without --nocapture.
    let mut summary = format!(
        "fuzz: {packets} packets (LB_FUZZ_SEED={seed:#x}) through lb_xdp, {decap_runs} lb_decap runs, in {:.1} s ({:.0} runs/s)\n",
        elapsed.as_secs_f64(),
        (packets + decap_runs) as f64 / elapsed.as_secs_f64().max(1e-9)
    );
    for ((prog, action), n) in &tally.actions {
        summary.push_str(&format!("  {prog:<9} {action:<8} {n:>10}\n"));
    }
    for r in Reason::ALL {
        let d = delta(r);
        if d > 0 {
            summary.push_str(&format!("  reason {:<20} {d:>10}\n", r.name()));
        }
    }
    for (kind, n) in &tally.tx_kinds {
        summary.push_str(&format!("  tx kind {kind:<19} {n:>10}\n"));
    }
    let _ = std::io::stderr().write_all(summary.as_bytes());

    if fails.total > 0 {
        let mut report = format!("{} failures (LB_FUZZ_SEED={seed:#x}):\n", fails.total);
        for (kind, n) in &fails.by_kind {
            report.push_str(&format!("  {n:>8}  {kind}\n"));
        }
        for d in &fails.shown {
            report.push_str(&format!("\n{d}\n"));
        }
        panic!("{report}");
    }
}

#[test]
fn the_prng_is_deterministic_and_spreads() {
    let mut a = Rng(DEFAULT_SEED);
    let mut b = Rng(DEFAULT_SEED);
    let xs: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
    let ys: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
    assert_eq!(xs, ys);
    let mut buckets = [0u32; 7];
    for _ in 0..70_000 {
        buckets[a.below(7)] += 1;
    }
    assert!(
        buckets.iter().all(|n| n.abs_diff(10_000) < 500),
        "{buckets:?}"
    );
}
