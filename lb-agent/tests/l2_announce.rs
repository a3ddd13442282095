//! BPF_PROG_TEST_RUN on the real object for L2 announcement: `lb_xdp` answers ARP requests
//! and Neighbor Solicitations for the VIPs this node owns (`DesiredState::l2_owned` →
//! `VIP_F_ANSWER`), in place, with `XDP_TX`; everything else passes untouched, as before.
//! The expected replies are written out by hand (the main ones as hex, checksums computed
//! separately), never derived from the input by the code under test. A node answers only
//! while the agent's lease (`LB_L2_LEASE`, in kernel ticks) holds; forwarding does not care.
//! Needs root.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use aya::Ebpf;
use lb_agent::{
    clock::KernelClock,
    dataplane::{AnswerLease, Dataplane},
    state::{BackendSpec, DesiredState, Protocol, ServiceAddr, ServiceSpec},
    sync::{self, MapSnapshot},
};
use lb_common::{Forwarding, Reason, maps};
mod prog_run;

use lb_testkit::packet::{
    ETH_P_8021Q, IPPROTO_ICMPV6, ND_OPT_SOURCE_LLA, PacketBuilder, arp_reply, arp_request, hexdump,
    icmpv6_checksum, ipv6_multicast_mac, l4_checksum_ok, nd_lla_option, neighbor_solicit,
    solicited_node,
};
use prog_run::assert_frame;

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
/// A router or bridge that forwards the client's frames under its own MAC.
const RELAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x07];
const ENCAP_SRC: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const ENCAP_SRC6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
/// VIPs of services: owned by this node, and owned by another one.
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const VIP_ELSEWHERE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 101);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
const VIP6_ELSEWHERE: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x101);
/// Addresses that are no VIP at all.
const OTHER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 77);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x77);
const VLAN: u16 = 42;

struct Fixture {
    ebpf: Ebpf,
    dataplane: Dataplane,
    snapshot: MapSnapshot,
    lease: AnswerLease,
    clock: KernelClock,
}

fn service(vip: IpAddr, backend: IpAddr) -> ServiceSpec {
    ServiceSpec {
        name: format!("dns-{vip}"),
        forwarding: Forwarding::L2,
        table_size: None,
        flow_tracking: false,
        source_ranges: None,
        fragments: false,
        affinity_timeout_s: None,
        backends: BTreeMap::from([(
            backend,
            BackendSpec {
                weight: 1,
                mac: Some([0x02, 0, 0, 0, 0, 0x10]),
            },
        )]),
    }
}

/// Four VIPs, each with a UDP service; this node owns `VIP` and `VIP6`.
fn desired() -> DesiredState {
    let mut d = DesiredState::default();
    let b4 = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 10));
    let b6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10));
    for (vip, backend) in [
        (IpAddr::V4(VIP), b4),
        (IpAddr::V4(VIP_ELSEWHERE), b4),
        (IpAddr::V6(VIP6), b6),
        (IpAddr::V6(VIP6_ELSEWHERE), b6),
    ] {
        let addr = ServiceAddr {
            vip,
            port: 53,
            protocol: Protocol::Udp,
        };
        d.services.insert(addr, service(vip, backend));
    }
    d.l2_owned = [IpAddr::V4(VIP), IpAddr::V6(VIP6)].into();
    d
}

/// The maps programmed with [`desired`], and a lease that holds for the whole test.
fn fixture() -> Fixture {
    let mut ebpf = prog_run::load_lb();
    let dataplane = Dataplane::from_ebpf(&mut ebpf).unwrap();
    let snapshot = dataplane.snapshot().unwrap();
    let lease = AnswerLease::from_ebpf(&mut ebpf).unwrap();
    let clock = KernelClock::new(&mut ebpf).unwrap();
    let mut f = Fixture {
        ebpf,
        dataplane,
        snapshot,
        lease,
        clock,
    };
    f.program(&desired());
    f.lease_for(Duration::from_secs(600));
    f
}

impl Fixture {
    /// Bring the maps to `desired` the way the agent does (plan + apply).
    fn program(&mut self, desired: &DesiredState) {
        let loaded = lb_agent::loader::loaded(&mut self.ebpf).unwrap();
        let node = sync::node_config(desired, LB_MAC, Some(ENCAP_SRC), Some(ENCAP_SRC6), loaded);
        let plan = sync::plan(desired, node, &BTreeMap::new(), &self.snapshot).unwrap();
        self.dataplane.apply(&plan.ops).unwrap();
        self.snapshot = self.dataplane.snapshot().unwrap();
    }

    /// The kernel's jiffies now.
    fn now(&self) -> u64 {
        self.clock.now().unwrap()
    }

    /// Write the lease deadline (`bpf_jiffies64()`; 0: none), and read it back.
    fn set_lease(&mut self, until: u64) {
        self.lease.set(until).unwrap();
        assert_eq!(self.lease.until().unwrap(), until);
    }

    /// A lease that holds for `d` from now; returns its deadline.
    fn lease_for(&mut self, d: Duration) -> u64 {
        let until = self.now() + self.clock.ticks(d);
        self.set_lease(until);
        until
    }

    fn run(&mut self, input: &[u8]) -> (u32, Vec<u8>) {
        prog_run::run_xdp(&mut self.ebpf, maps::PROG_LB, input)
    }

    fn reason(&self, r: Reason) -> u64 {
        prog_run::reason_count(&self.dataplane, r)
    }
}

/// One case: the frame in, the verdict, the frame out (`None`: the input, untouched) and the
/// counter that must move by one.
struct Case {
    name: &'static str,
    input: Vec<u8>,
    action: u32,
    output: Option<Vec<u8>>,
    reason: Reason,
}

fn run_cases(f: &mut Fixture, cases: Vec<Case>) {
    for c in cases {
        let before = f.reason(c.reason);
        let got = f.run(&c.input);
        assert_frame(
            c.name,
            got,
            c.action,
            c.output.as_deref().unwrap_or(&c.input),
        );
        assert_eq!(
            f.reason(c.reason) - before,
            1,
            "{}: counted as {}",
            c.name,
            c.reason.name()
        );
    }
}

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// `frame` with an 802.1Q tag (VLAN `VLAN`, priority 3) after the MAC addresses.
fn tagged(frame: &[u8]) -> Vec<u8> {
    let mut out = frame[..12].to_vec();
    out.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
    out.extend_from_slice(&((3 << 13) | VLAN).to_be_bytes());
    out.extend_from_slice(&frame[12..]);
    out
}

/// `frame` padded with `n` bytes of Ethernet padding (a pattern, so a rewrite would show).
fn padded(frame: &[u8], n: usize) -> Vec<u8> {
    let mut out = frame.to_vec();
    out.extend((0..n).map(|i| 0xa0 | (i as u8 & 0x0f)));
    out
}

/// An ARP packet from `eth_src` (broadcast) with these fields.
fn arp(eth_src: [u8; 6], op: u16, sha: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&eth_src);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4]);
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&tpa.octets());
    f
}

#[test]
fn arp_requests_for_owned_vips_are_answered() {
    let mut f = fixture();
    let request = arp_request(CLIENT_MAC, CLIENT, VIP);
    // "198.18.0.100 is at 02:00:00:00:00:02", to the client.
    let reply = hex("020000000001 020000000002 0806
                     0001 0800 06 04 0002
                     020000000002 c6120064
                     020000000001 c6120101");
    assert_eq!(reply, arp_reply(LB_MAC, VIP, CLIENT_MAC, CLIENT));
    let mut bad_hw = request.clone();
    bad_hw[15] = 6; // hardware type IEEE 802
    let mut bad_ptype = request.clone();
    bad_ptype[16..18].copy_from_slice(&[0x86, 0xdd]);
    let mut bad_hlen = request.clone();
    bad_hlen[18] = 8;
    let cases = vec![
        Case {
            name: "request for an owned VIP",
            input: request.clone(),
            action: XDP_TX,
            output: Some(reply.clone()),
            reason: Reason::TxArpReply,
        },
        Case {
            name: "request with Ethernet padding: padding kept",
            input: padded(&request, 18),
            action: XDP_TX,
            output: Some(padded(&reply, 18)),
            reason: Reason::TxArpReply,
        },
        Case {
            name: "request in VLAN 42: tag kept",
            input: tagged(&request),
            action: XDP_TX,
            output: Some(tagged(&reply)),
            reason: Reason::TxArpReply,
        },
        Case {
            // The Ethernet reply goes to the frame's source; the ARP target is the sender.
            name: "request relayed under another MAC",
            input: arp(RELAY_MAC, 1, CLIENT_MAC, CLIENT, VIP),
            action: XDP_TX,
            output: Some(hex("020000000007 020000000002 0806
                              0001 0800 06 04 0002
                              020000000002 c6120064
                              020000000001 c6120101")),
            reason: Reason::TxArpReply,
        },
        Case {
            // RFC 5227 probe (sender 0.0.0.0): the owner answers, as Linux does for its own
            // addresses, so the prober sees the address in use.
            name: "address probe for an owned VIP",
            input: arp(CLIENT_MAC, 1, CLIENT_MAC, Ipv4Addr::UNSPECIFIED, VIP),
            action: XDP_TX,
            output: Some(hex("020000000001 020000000002 0806
                              0001 0800 06 04 0002
                              020000000002 c6120064
                              020000000001 00000000")),
            reason: Reason::TxArpReply,
        },
        Case {
            name: "request for a VIP another node owns",
            input: arp_request(CLIENT_MAC, CLIENT, VIP_ELSEWHERE),
            action: XDP_PASS,
            output: None,
            reason: Reason::PassNotIp,
        },
        Case {
            name: "request for an address that is no VIP",
            input: arp_request(CLIENT_MAC, CLIENT, OTHER),
            action: XDP_PASS,
            output: None,
            reason: Reason::PassNotIp,
        },
        Case {
            name: "tagged request for an address that is no VIP",
            input: tagged(&arp_request(CLIENT_MAC, CLIENT, OTHER)),
            action: XDP_PASS,
            output: None,
            reason: Reason::PassNotIp,
        },
        Case {
            name: "reply about an owned VIP",
            input: arp_reply(CLIENT_MAC, VIP, LB_MAC, CLIENT),
            action: XDP_PASS,
            output: None,
            reason: Reason::PassNotIp,
        },
        Case {
            name: "reply to an owned VIP",
            input: arp_reply(CLIENT_MAC, CLIENT, LB_MAC, VIP),
            action: XDP_PASS,
            output: None,
            reason: Reason::PassNotIp,
        },
        Case {
            name: "gratuitous ARP for an owned VIP (from another node)",
            input: arp(CLIENT_MAC, 1, CLIENT_MAC, VIP, VIP),
            action: XDP_PASS,
            output: None,
            reason: Reason::PassNotIp,
        },
        Case {
            name: "hardware type not Ethernet",
            input: bad_hw,
            action: XDP_PASS,
            output: None,
            reason: Reason::PassNotIp,
        },
        Case {
            name: "protocol type not IPv4",
            input: bad_ptype,
            action: XDP_PASS,
            output: None,
            reason: Reason::PassNotIp,
        },
        Case {
            name: "hardware address length not 6",
            input: bad_hlen,
            action: XDP_PASS,
            output: None,
            reason: Reason::PassNotIp,
        },
        Case {
            name: "request cut off before the target address",
            input: request[..request.len() - 1].to_vec(),
            action: XDP_PASS,
            output: None,
            reason: Reason::PassNotIp,
        },
    ];
    run_cases(&mut f, cases);
}

/// The solicited Neighbor Advertisement the node must send for `VIP6` to `CLIENT6` at
/// `dst_mac`, as IPv6 packet bytes after the Ethernet header.
fn advert_ip(check: u16) -> Vec<u8> {
    let mut ip = hex("60000000 0020 3a ff");
    ip.extend_from_slice(&VIP6.octets());
    ip.extend_from_slice(&CLIENT6.octets());
    ip.extend_from_slice(&[0x88, 0]);
    ip.extend_from_slice(&check.to_be_bytes());
    ip.extend_from_slice(&hex("60000000"));
    ip.extend_from_slice(&VIP6.octets());
    ip.extend_from_slice(&hex("0201 020000000002"));
    ip
}

fn ns(src: Ipv6Addr, dst: Ipv6Addr, target: Ipv6Addr, options: &[u8]) -> PacketBuilder {
    let dst_mac = if dst.is_multicast() {
        ipv6_multicast_mac(dst)
    } else {
        LB_MAC
    };
    neighbor_solicit(CLIENT_MAC, dst_mac, src, dst, target, options)
}

#[test]
fn neighbor_solicitations_for_owned_vips_are_answered() {
    let mut f = fixture();
    let group = solicited_node(VIP6);
    let slla = nd_lla_option(ND_OPT_SOURCE_LLA, CLIENT_MAC);
    // Nonce option (RFC 3971 5.3.2), 8 bytes: the NS gets longer than the NA.
    let nonce = [14, 1, 1, 2, 3, 4, 5, 6];
    let with_nonce = [slla, nonce].concat();

    // The advertisement, with its checksum computed separately (Python, RFC 1071) ...
    let advert = [&CLIENT_MAC[..], &LB_MAC, &[0x86, 0xdd], &advert_ip(0x8874)].concat();
    // ... and checked here once more, independently of that number.
    assert!(l4_checksum_ok(&advert[14..]), "\n{}", hexdump(&advert));
    let mut zeroed = advert_ip(0)[40..].to_vec();
    zeroed[2..4].copy_from_slice(&[0, 0]);
    assert_eq!(icmpv6_checksum(VIP6, CLIENT6, &zeroed), 0x8874);
    let advert_to = |mac: [u8; 6]| [&mac[..], &advert[6..]].concat();

    let mut hop_by_hop = ns(CLIENT6, group, VIP6, &slla).build();
    // The same NS behind a (padding-only) hop-by-hop options header.
    let icmp = hop_by_hop[54..].to_vec();
    hop_by_hop.truncate(54);
    hop_by_hop[20] = 0; // next header: hop-by-hop
    hop_by_hop[18..20].copy_from_slice(&((8 + icmp.len()) as u16).to_be_bytes());
    hop_by_hop.extend_from_slice(&[IPPROTO_ICMPV6, 0, 1, 4, 0, 0, 0, 0]);
    hop_by_hop.extend_from_slice(&icmp);

    // Only 16 bytes of ICMPv6: the target cut off by the payload length (the rest of the
    // frame is padding), or by the end of the frame.
    let mut short = ns(CLIENT6, group, VIP6, &[]).build();
    short[18..20].copy_from_slice(&16u16.to_be_bytes());
    let mut cut = short.clone();
    cut.truncate(14 + 40 + 16);
    // The payload length claims more than the frame holds.
    let mut overlong = ns(CLIENT6, group, VIP6, &slla).build();
    overlong[18..20].copy_from_slice(&64u16.to_be_bytes());

    let cases = vec![
        Case {
            name: "NS with source link-layer address",
            input: ns(CLIENT6, group, VIP6, &slla).build(),
            action: XDP_TX,
            output: Some(advert.clone()),
            reason: Reason::TxNeighborAdvert,
        },
        Case {
            name: "NS without options: frame grown by the option",
            input: ns(CLIENT6, group, VIP6, &[]).build(),
            action: XDP_TX,
            output: Some(advert.clone()),
            reason: Reason::TxNeighborAdvert,
        },
        Case {
            name: "NS with another option: frame cut to the advertisement",
            input: ns(CLIENT6, group, VIP6, &with_nonce).build(),
            action: XDP_TX,
            output: Some(advert.clone()),
            reason: Reason::TxNeighborAdvert,
        },
        Case {
            name: "NS with bytes after the IPv6 packet",
            input: padded(&ns(CLIENT6, group, VIP6, &slla).build(), 10),
            action: XDP_TX,
            output: Some(advert.clone()),
            reason: Reason::TxNeighborAdvert,
        },
        Case {
            name: "unicast NS (reachability probe)",
            input: ns(CLIENT6, VIP6, VIP6, &slla).build(),
            action: XDP_TX,
            output: Some(advert.clone()),
            reason: Reason::TxNeighborAdvert,
        },
        Case {
            name: "NS relayed under another MAC: the reply goes to the frame's source",
            input: neighbor_solicit(
                RELAY_MAC,
                ipv6_multicast_mac(group),
                CLIENT6,
                group,
                VIP6,
                &slla,
            )
            .build(),
            action: XDP_TX,
            output: Some(advert_to(RELAY_MAC)),
            reason: Reason::TxNeighborAdvert,
        },
        Case {
            name: "NS in VLAN 42: tag kept",
            input: tagged(&ns(CLIENT6, group, VIP6, &slla).build()),
            action: XDP_TX,
            output: Some(tagged(&advert)),
            reason: Reason::TxNeighborAdvert,
        },
        Case {
            name: "duplicate address detection (unspecified source)",
            input: ns(Ipv6Addr::UNSPECIFIED, group, VIP6, &[]).build(),
            action: XDP_PASS,
            output: None,
            reason: Reason::PassNotVip,
        },
        Case {
            name: "NS for a VIP another node owns",
            input: ns(
                CLIENT6,
                solicited_node(VIP6_ELSEWHERE),
                VIP6_ELSEWHERE,
                &slla,
            )
            .build(),
            action: XDP_PASS,
            output: None,
            reason: Reason::PassNotVip,
        },
        Case {
            name: "NS for an address that is no VIP",
            input: ns(CLIENT6, solicited_node(OTHER6), OTHER6, &slla).build(),
            action: XDP_PASS,
            output: None,
            reason: Reason::PassNotVip,
        },
        Case {
            name: "NS that came through a router (hop limit 64)",
            input: ns(CLIENT6, group, VIP6, &slla).ttl(64).build(),
            action: XDP_PASS,
            output: None,
            reason: Reason::PassNotVip,
        },
        Case {
            name: "NS with code 1",
            input: {
                let mut f = ns(CLIENT6, group, VIP6, &slla).build();
                f[55] = 1;
                f
            },
            action: XDP_PASS,
            output: None,
            reason: Reason::PassNotVip,
        },
        Case {
            name: "NS behind an extension header",
            input: hop_by_hop,
            action: XDP_PASS,
            output: None,
            reason: Reason::PassNotVip,
        },
        Case {
            name: "NS cut off before the target by the end of the frame",
            input: cut,
            action: XDP_PASS,
            output: None,
            reason: Reason::PassNotVip,
        },
        Case {
            name: "NS cut off before the target by its payload length",
            input: short,
            action: XDP_PASS,
            output: None,
            reason: Reason::PassNotVip,
        },
        Case {
            name: "NS whose payload length runs past the frame",
            input: overlong,
            action: XDP_PASS,
            output: None,
            reason: Reason::PassNotVip,
        },
        Case {
            name: "NA for an owned VIP (from someone else)",
            input: {
                let mut msg = hex("88 00 0000 20000000");
                msg.extend_from_slice(&VIP6.octets());
                msg.extend_from_slice(&nd_lla_option(2, CLIENT_MAC));
                let dst: Ipv6Addr = "ff02::1".parse().unwrap();
                let c = icmpv6_checksum(CLIENT6, dst, &msg);
                msg[2..4].copy_from_slice(&c.to_be_bytes());
                PacketBuilder::new()
                    .eth(CLIENT_MAC, ipv6_multicast_mac(dst))
                    .ipv6(CLIENT6, dst)
                    .ttl(255)
                    .raw(IPPROTO_ICMPV6, &msg)
                    .build()
            },
            action: XDP_PASS,
            output: None,
            reason: Reason::PassNotVip,
        },
    ];
    run_cases(&mut f, cases);
}

/// Ownership follows the desired state: a VIP given up is no longer answered, one taken
/// over is, with no other change to the maps.
#[test]
fn ownership_moves_with_the_desired_state() {
    let mut f = fixture();
    let arp_owned = arp_request(CLIENT_MAC, CLIENT, VIP);
    let arp_elsewhere = arp_request(CLIENT_MAC, CLIENT, VIP_ELSEWHERE);
    let ns6 = ns(
        CLIENT6,
        solicited_node(VIP6),
        VIP6,
        &nd_lla_option(ND_OPT_SOURCE_LLA, CLIENT_MAC),
    )
    .build();
    assert_eq!(f.run(&arp_owned).0, XDP_TX);
    assert_eq!(f.run(&arp_elsewhere).0, XDP_PASS);
    assert_eq!(f.run(&ns6).0, XDP_TX);

    let mut moved = desired();
    moved.l2_owned = [IpAddr::V4(VIP_ELSEWHERE)].into();
    f.program(&moved);
    assert_frame("given up (ARP)", f.run(&arp_owned), XDP_PASS, &arp_owned);
    assert_frame("given up (NS)", f.run(&ns6), XDP_PASS, &ns6);
    let (action, out) = f.run(&arp_elsewhere);
    assert_eq!(action, XDP_TX, "taken over");
    assert_eq!(out, arp_reply(LB_MAC, VIP_ELSEWHERE, CLIENT_MAC, CLIENT));
}

/// The lease decides whether an owned VIP is answered: held, ARP and NS are answered; run
/// out (by the kernel's clock), in the past or 0 (none), both pass untouched, counted as
/// any request that is not ours. Forwarding to the VIP's service is the same byte for byte
/// whatever the lease says.
#[test]
fn owned_vips_are_answered_only_while_the_lease_holds() {
    let mut f = fixture();
    let arp = arp_request(CLIENT_MAC, CLIENT, VIP);
    let ns6 = ns(
        CLIENT6,
        solicited_node(VIP6),
        VIP6,
        &nd_lla_option(ND_OPT_SOURCE_LLA, CLIENT_MAC),
    )
    .build();
    let udp = PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv4(CLIENT, VIP)
        .udp(40000, 53, b"query")
        .build();
    let udp6 = PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv6(CLIENT6, VIP6)
        .udp(40000, 53, b"query")
        .build();
    let reply = arp_reply(LB_MAC, VIP, CLIENT_MAC, CLIENT);
    let forwarded = f.run(&udp);
    let forwarded6 = f.run(&udp6);
    assert_eq!(forwarded.0, XDP_TX, "forwarded by L2 to the backend");
    assert_eq!(forwarded6.0, XDP_TX, "forwarded by L2 to the backend");
    let advert = f.run(&ns6);
    assert_eq!(advert.0, XDP_TX);

    let now = f.now();
    let hz = u64::from(f.clock.hz());
    for (name, until) in [
        ("lease 0 (none)", 0),
        ("lease ended a second ago", now - hz),
        ("lease ended a tick ago", now - 1),
        ("lease ends now", now),
    ] {
        f.set_lease(until);
        assert_frame(
            &format!("{name}: ARP request for an owned VIP passes"),
            f.run(&arp),
            XDP_PASS,
            &arp,
        );
        assert_frame(
            &format!("{name}: NS for an owned VIP passes"),
            f.run(&ns6),
            XDP_PASS,
            &ns6,
        );
        assert_frame(
            &format!("{name}: IPv4 service traffic still forwarded"),
            f.run(&udp),
            forwarded.0,
            &forwarded.1,
        );
        assert_frame(
            &format!("{name}: IPv6 service traffic still forwarded"),
            f.run(&udp6),
            forwarded6.0,
            &forwarded6.1,
        );
    }
    // The misses are counted as requests that are not ours.
    f.set_lease(0);
    let (arp_before, ns_before) = (f.reason(Reason::PassNotIp), f.reason(Reason::PassNotVip));
    let (tx_before, na_before) = (
        f.reason(Reason::TxArpReply),
        f.reason(Reason::TxNeighborAdvert),
    );
    f.run(&arp);
    f.run(&ns6);
    assert_eq!(f.reason(Reason::PassNotIp) - arp_before, 1);
    assert_eq!(f.reason(Reason::PassNotVip) - ns_before, 1);
    assert_eq!(f.reason(Reason::TxArpReply), tx_before);
    assert_eq!(f.reason(Reason::TxNeighborAdvert), na_before);

    // Renewed: answered again, and a VIP owned by another node still is not.
    let until = f.lease_for(Duration::from_secs(2));
    assert_frame("lease renewed: ARP answered", f.run(&arp), XDP_TX, &reply);
    assert_frame("lease renewed: NS answered", f.run(&ns6), XDP_TX, &advert.1);
    let elsewhere = arp_request(CLIENT_MAC, CLIENT, VIP_ELSEWHERE);
    assert_frame(
        "lease held: VIP of another node",
        f.run(&elsewhere),
        XDP_PASS,
        &elsewhere,
    );

    // The lease runs out by the kernel's clock alone: nobody writes the map.
    let limit = Instant::now() + Duration::from_secs(10);
    while f.now() < until {
        assert!(Instant::now() < limit, "jiffies stand still");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_frame("lease ran out: ARP passes", f.run(&arp), XDP_PASS, &arp);
    assert_frame("lease ran out: NS passes", f.run(&ns6), XDP_PASS, &ns6);
    assert_frame(
        "lease ran out: still forwarded",
        f.run(&udp),
        forwarded.0,
        &forwarded.1,
    );
}
