//! The decap program opens only tunnels between known parties: outer source in
//! `LB_DECAP_SRC` (the load balancers), outer destination in `LB_DECAP_DST` (this node).
//! Anything else passes untouched and is counted (`pass_decap_not_allowed`), so nobody who
//! can reach a node injects packets with a forged inner source through it.
//!
//! - Table-driven BPF_PROG_TEST_RUN on the real object: allowed source and destination →
//!   decapsulated; a stranger's source, another destination → the exact input back.
//! - netns, real traffic: a backend runs `lb-agent decap --allow-source <LB>` and a UDP
//!   server on the VIP; an attacker next to it sends an IPIP packet whose inner source is
//!   spoofed → the server sees nothing and the counter moves; the same packet from the LB →
//!   delivered, with the inner source.
//!
//! Needs root.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use aya::maps::{MapData, PerCpuArray};
use lb_agent::{
    dataplane::Dataplane,
    sync::{self, DecapList, MapOp},
};
use lb_common::{Counters, DEFAULT_GUE_PORT, NodeConfig, Reason, maps};
use lb_testkit::{
    ChildGuard, EchoServer, Lab, LabSpec, NetNs, l2lab::send_frame, packet::PacketBuilder,
};

mod prog_run;

use prog_run::assert_frame;

const XDP_PASS: u32 = 2;

const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const LB: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x11);
/// Another host on the segment: the attacker.
const STRANGER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const STRANGER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// An allowed prefix (besides the LB's host addresses).
const ALLOWED_NET: &str = "198.18.4.0/24";
/// The inner packet's forged source.
const SPOOFED: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 77);
const SPOOFED6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x77);
const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
const PORT: u16 = 53;

/// The inner packet: UDP from the forged source to VIP:PORT, as a whole frame.
fn inner(v6: bool) -> Vec<u8> {
    let b = PacketBuilder::new().eth(LB_MAC, NODE_MAC);
    let b = if v6 {
        b.ipv6(SPOOFED6, VIP6)
    } else {
        b.ipv4(SPOOFED, VIP)
    };
    b.udp(40000, PORT, b"let me in").build()
}

/// `inner` in a tunnel `src` → `dst` (IP-in-IP of the outer family, or GUE).
fn tunnel(inner: &[u8], src: IpAddr, dst: IpAddr, gue: bool) -> Vec<u8> {
    let b = PacketBuilder::new().eth(LB_MAC, NODE_MAC);
    let b = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => b.ipv4(s, d),
        (IpAddr::V6(s), IpAddr::V6(d)) => b.ipv6(s, d),
        _ => unreachable!("one family"),
    };
    let proto = if inner[12..14] == [0x08, 0x00] { 4 } else { 41 };
    if gue {
        b.udp(49152, DEFAULT_GUE_PORT, &inner[14..]).build()
    } else {
        b.raw(proto, &inner[14..]).build()
    }
}

/// What the stack gets from a decapsulated `tunnel`: the tunnel's L2 header with the inner
/// packet's ethertype, then the inner packet.
fn decapsulated(tunnel: &[u8], inner: &[u8]) -> Vec<u8> {
    let mut out = tunnel[..12].to_vec();
    out.extend_from_slice(&inner[12..]);
    out
}

fn allow(list: DecapList, net: &str) -> MapOp {
    let net: ipnet::IpNet = net
        .parse()
        .or_else(|_| net.parse::<IpAddr>().map(ipnet::IpNet::from))
        .unwrap();
    let (prefix_len, addr) = sync::decap_prefix(&net);
    MapOp::AddDecap {
        list,
        prefix_len,
        addr,
    }
}

struct Case {
    name: &'static str,
    input: Vec<u8>,
    action: u32,
    output: Vec<u8>,
    reason: Reason,
}

fn cases() -> Vec<Case> {
    let (i4, i6) = (inner(false), inner(true));
    let open = |name, inner: &[u8], src: IpAddr, dst: IpAddr, gue| {
        let input = tunnel(inner, src, dst, gue);
        Case {
            name,
            output: decapsulated(&input, inner),
            input,
            action: XDP_PASS,
            reason: Reason::DecapPass,
        }
    };
    let refuse = |name, inner: &[u8], src: IpAddr, dst: IpAddr, gue| {
        let input = tunnel(inner, src, dst, gue);
        Case {
            name,
            output: input.clone(),
            input,
            action: XDP_PASS,
            reason: Reason::PassDecapNotAllowed,
        }
    };
    let (lb, lb6, node, node6) = (LB.into(), LB6.into(), NODE.into(), NODE6.into());
    let (stranger, stranger6) = (STRANGER.into(), STRANGER6.into());
    let plain = PacketBuilder::new()
        .eth(LB_MAC, NODE_MAC)
        .ipv4(STRANGER, NODE)
        .udp(40000, PORT, b"hello")
        .build();
    vec![
        open("ipip from the LB", &i4, lb, node, false),
        open("ip6ip6 from the LB", &i6, lb6, node6, false),
        open("4in6 from the LB", &i4, lb6, node6, false),
        open("gue from the LB", &i4, lb, node, true),
        open(
            "ipip from an allowed prefix",
            &i4,
            Ipv4Addr::new(198, 18, 4, 9).into(),
            node,
            false,
        ),
        refuse("ipip from a stranger", &i4, stranger, node, false),
        refuse("ip6ip6 from a stranger", &i6, stranger6, node6, false),
        refuse("gue from a stranger", &i4, stranger, node, true),
        refuse(
            "ipip from the LB to another host",
            &i4,
            lb,
            Ipv4Addr::new(198, 18, 0, 12).into(),
            false,
        ),
        refuse("ipip from the LB to the VIP", &i4, lb, VIP.into(), false),
        refuse("6in4 from a stranger", &i6, stranger, node, false),
        // Not a tunnel: none of the allow lists' business.
        Case {
            name: "plain udp from a stranger",
            output: plain.clone(),
            input: plain,
            action: XDP_PASS,
            reason: Reason::PassNotVip,
        },
    ]
}

#[test]
fn decap_opens_only_tunnels_from_allowed_sources_to_this_node() {
    let mut ebpf = prog_run::load_lb();
    let prog: &mut aya::programs::Xdp = ebpf
        .program_mut(maps::PROG_DECAP)
        .unwrap()
        .try_into()
        .unwrap();
    prog.load().expect("verifier accepts lb_decap");
    let mut dataplane = Dataplane::from_ebpf(&mut ebpf).unwrap();
    // As `lb-agent decap --allow-source 198.18.0.2 --allow-source 2001:db8::2
    // --allow-source 198.18.4.0/24` on a node with 198.18.0.11 and 2001:db8::11.
    let mut node = NodeConfig::EMPTY;
    node.flags = lb_common::CONFIG_F_VALID;
    node.gue_port_be = DEFAULT_GUE_PORT.to_be();
    let ops = vec![
        MapOp::SetConfig(node),
        allow(DecapList::Sources, "198.18.0.2"),
        allow(DecapList::Sources, "2001:db8::2"),
        allow(DecapList::Sources, ALLOWED_NET),
        allow(DecapList::Destinations, "198.18.0.11"),
        allow(DecapList::Destinations, "2001:db8::11"),
    ];
    dataplane.apply(&ops).unwrap();
    let snap = dataplane.snapshot().unwrap();
    assert_eq!(
        (snap.decap_sources.len(), snap.decap_destinations.len()),
        (3, 2)
    );

    for c in cases() {
        let before = prog_run::reason_count(&dataplane, c.reason);
        let got = prog_run::run_xdp(&mut ebpf, maps::PROG_DECAP, &c.input);
        assert_frame(c.name, got, c.action, &c.output);
        assert_eq!(
            prog_run::reason_count(&dataplane, c.reason),
            before + 1,
            "{}: counted as {}",
            c.name,
            c.reason.name()
        );
    }
}

// ---- netns: real traffic ----

/// How long the decap program may take to attach, and a packet to arrive.
const WAIT: Duration = Duration::from_secs(20);
/// How long a refused packet is given to (not) arrive.
const QUIET: Duration = Duration::from_millis(700);

/// The id of the XDP program attached to `eth0` in `ns`, once there is one.
fn attached_prog(ns: &NetNs, decap: &mut ChildGuard) -> u32 {
    let deadline = Instant::now() + WAIT;
    loop {
        let out = ns.ip(&["-d", "link", "show", "eth0"]).unwrap();
        if let Some(id) = out
            .split("prog/xdp id ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|id| id.parse().ok())
        {
            return id;
        }
        assert!(
            decap.try_wait().unwrap().is_none(),
            "lb-agent decap exited early"
        );
        assert!(Instant::now() < deadline, "decap did not attach:\n{out}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// `LB_REASONS[reason]` of the (unpinned) maps of program `prog_id`, summed over CPUs.
fn reason_of_prog(prog_id: u32, reason: Reason) -> u64 {
    let info = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == prog_id)
        .expect("the attached program is loaded");
    let map = info
        .map_ids()
        .unwrap()
        .unwrap_or_default()
        .into_iter()
        .find(|id| {
            aya::maps::MapInfo::from_id(*id)
                .is_ok_and(|m| m.name_as_str() == Some(maps::REASON_STATS))
        })
        .expect("the program uses LB_REASONS");
    let map = aya::maps::Map::PerCpuArray(MapData::from_id(map).unwrap());
    let reasons: PerCpuArray<MapData, Counters> = PerCpuArray::try_from(map).unwrap();
    reasons
        .get(&(reason as u32), 0)
        .unwrap()
        .iter()
        .map(|c| c.packets)
        .sum()
}

/// An IPIP frame from a host (its MAC and address) to the node.
fn ipip_frame(src_mac: [u8; 6], src: Ipv4Addr, node: Ipv4Addr, node_mac: [u8; 6]) -> Vec<u8> {
    let inner = PacketBuilder::new()
        .ipv4(SPOOFED, VIP)
        .udp(40000, PORT, b"let me in")
        .build_ip();
    PacketBuilder::new()
        .eth(src_mac, node_mac)
        .ipv4(src, node)
        .raw(4, &inner)
        .build()
}

#[test]
fn a_spoofed_tunnel_packet_is_not_delivered_but_one_from_the_lb_is() {
    prog_run::require_root();
    let lab = Lab::new(LabSpec {
        backends: 1,
        ..LabSpec::default()
    })
    .unwrap();
    let node = &lab.backends()[0];
    let log = std::env::temp_dir().join(format!("decap-allow-{}.log", std::process::id()));
    let mut cmd = node.ns.command(env!("CARGO_BIN_EXE_lb-agent"));
    cmd.args(["decap", "--interface", "eth0", "--xdp-mode", "skb"])
        .args(["--allow-source", &lab.lb_addr().to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut decap = ChildGuard::spawn(&mut cmd).unwrap();
    let prog = attached_prog(&node.ns, &mut decap);
    let server =
        EchoServer::start(&node.ns, "node", SocketAddr::new(lab.vip().into(), PORT)).unwrap();

    // The attacker, next to the node: its own address outside, a forged one inside.
    let before = reason_of_prog(prog, Reason::PassDecapNotAllowed);
    let attack = ipip_frame(lab.client_mac(), lab.client_addr(), node.addr, node.mac);
    for _ in 0..3 {
        send_frame(lab.client(), "eth0", &attack).unwrap();
    }
    thread::sleep(QUIET);
    assert_eq!(
        server.stats().udp_requests,
        0,
        "a spoofed packet was delivered"
    );
    assert_eq!(
        reason_of_prog(prog, Reason::PassDecapNotAllowed),
        before + 3,
        "refused tunnel packets are counted"
    );

    // The same inner packet from the load balancer is delivered, forged source and all
    // (the LB forwards clients' packets unchanged).
    let from_lb = ipip_frame(lab.lb_mac(), lab.lb_addr(), node.addr, node.mac);
    let deadline = Instant::now() + WAIT;
    while server.stats().udp_requests == 0 {
        assert!(
            Instant::now() < deadline,
            "the LB's tunnel packet was not delivered"
        );
        send_frame(lab.lb(), "eth0", &from_lb).unwrap();
        thread::sleep(Duration::from_millis(100));
    }
    assert!(server.stats().clients.contains(&IpAddr::V4(SPOOFED)));
    assert!(reason_of_prog(prog, Reason::DecapPass) >= 1);
    drop(server);
    drop(decap);
    let _ = std::fs::remove_file(&log);
}
