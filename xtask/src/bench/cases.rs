//! The data-plane cases: the services the maps hold and one input frame per case.

use std::{
    fmt::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use anyhow::Context;
use lb_agent::state::DesiredState;
use lb_common::{Forwarding, Reason};
use lb_testkit::packet::{PacketBuilder, Tcp, tcp_flags};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const ENCAP4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const ENCAP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 5, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 5, 0, 0, 0, 0, 1);
const VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
const VIP6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
const NOT_VIP4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 101);
/// Backends per service (a realistic small service; the Maglev table has 1031 slots).
const BACKENDS: u8 = 10;
const CLIENT_PORT: u16 = 40000;
/// The interface MTU the agent would write (it enables the data plane's MTU check).
pub const MTU: u16 = 1500;

pub const MODES: [Forwarding; 3] = [Forwarding::Ipip, Forwarding::Gue, Forwarding::L2];

/// What a case sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Udp64,
    Udp64Tracked,
    Udp512,
    TcpSyn,
    TcpAck,
    Udp6,
    NotVip,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Udp64,
        Kind::Udp64Tracked,
        Kind::Udp512,
        Kind::TcpSyn,
        Kind::TcpAck,
        Kind::Udp6,
        Kind::NotVip,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Kind::Udp64 => "UDP 64 B to a VIP, tracking off",
            Kind::Udp64Tracked => "UDP 64 B to a VIP, tracking on",
            Kind::Udp512 => "UDP 512 B to a VIP",
            Kind::TcpSyn => "TCP SYN, new flow",
            Kind::TcpAck => "TCP ACK, known flow",
            Kind::Udp6 => "IPv6 UDP 64 B to a VIP",
            Kind::NotVip => "UDP 64 B, not a VIP",
        }
    }

    /// The target for the ns over the same-verdict baseline.
    pub fn target(self) -> Option<f64> {
        match self {
            Kind::Udp64 | Kind::Udp64Tracked | Kind::Udp6 => Some(40.0),
            Kind::TcpAck => Some(30.0),
            Kind::TcpSyn => Some(70.0),
            Kind::NotVip => Some(10.0),
            Kind::Udp512 => None,
        }
    }
}

/// One data-plane case.
#[derive(Clone, Debug)]
pub struct Case {
    pub kind: Kind,
    /// `None` for packets that are not load-balanced.
    pub mode: Option<Forwarding>,
    pub input: Vec<u8>,
    pub verdict: u32,
    /// The reason counter every iteration must bump.
    pub reason: Reason,
    /// Each iteration creates a flow-table entry (no case does: a SYN is not remembered, and
    /// tracked cases hit the entry their first packet created).
    pub creates_flow: bool,
}

fn mode_index(mode: Forwarding) -> u16 {
    match mode {
        Forwarding::Ipip => 0,
        Forwarding::Gue => 1,
        Forwarding::L2 => 2,
    }
}

fn udp_port(mode: Forwarding, tracked: bool) -> u16 {
    5301 + 10 * mode_index(mode) + u16::from(tracked)
}

fn tcp_port(mode: Forwarding) -> u16 {
    8001 + 10 * mode_index(mode)
}

fn backend4(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, i)
}

fn backend6(i: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, u16::from(i))
}

/// The MAC given for a backend (no neighbour resolution in the bench).
pub fn backend_mac(i: u8) -> [u8; 6] {
    [0x02, 0, 0, 0x01, 0, i]
}

pub fn is_backend_mac(mac: &[u8]) -> bool {
    mac.len() == 6 && mac[..5] == backend_mac(0)[..5] && (1..=BACKENDS).contains(&mac[5])
}

/// The static config the data-plane bench programs, in the agent's own YAML format, so it
/// goes through the same validation as a real config.
fn config_yaml() -> String {
    let mut y = format!(
        "interface: bench0\nencap_source: {ENCAP4}\nencap_source_v6: {ENCAP6}\n\
         flow_table:\n  new_flows_per_cpu_per_second: {}\nservices:\n",
        u32::MAX
    );
    let mut service = |name: String, vip: IpAddr, port: u16, proto: &str, mode, tracked| {
        let _ = write!(
            y,
            "  - name: {name}\n    vip: \"{vip}\"\n    port: {port}\n    protocol: {proto}\n    \
             forwarding: {}\n    flow_tracking: {tracked}\n    backends:\n",
            Forwarding::name(mode)
        );
        for i in 1..=BACKENDS {
            let addr: IpAddr = if vip.is_ipv4() {
                backend4(i).into()
            } else {
                backend6(i).into()
            };
            let mac = backend_mac(i)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":");
            let _ = writeln!(y, "      - address: \"{addr}\"\n        mac: \"{mac}\"");
        }
    };
    for mode in MODES {
        let m = mode.name();
        service(
            format!("udp-{m}"),
            VIP4.into(),
            udp_port(mode, false),
            "udp",
            mode,
            false,
        );
        service(
            format!("udpt-{m}"),
            VIP4.into(),
            udp_port(mode, true),
            "udp",
            mode,
            true,
        );
        service(
            format!("tcp-{m}"),
            VIP4.into(),
            tcp_port(mode),
            "tcp",
            mode,
            true,
        );
        service(
            format!("udp6-{m}"),
            VIP6.into(),
            udp_port(mode, false),
            "udp",
            mode,
            false,
        );
    }
    y
}

/// The desired state of the bench's maps.
pub fn desired() -> anyhow::Result<DesiredState> {
    lb_agent::config::parse(Path::new("<bench data plane>"), &config_yaml())
        .context("the bench's own config does not validate")
}

fn udp4(dst: Ipv4Addr, dport: u16, frame_len: usize) -> Vec<u8> {
    let payload = vec![0xab; frame_len - 14 - 20 - 8];
    PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv4(CLIENT4, dst)
        .udp(CLIENT_PORT, dport, &payload)
        .build()
}

fn tcp4(dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    PacketBuilder::new()
        .eth(CLIENT_MAC, LB_MAC)
        .ipv4(CLIENT4, VIP4)
        .dont_fragment()
        .tcp(
            Tcp {
                sport: CLIENT_PORT,
                dport,
                seq: 1000,
                ack: if flags & tcp_flags::ACK != 0 { 2000 } else { 0 },
                flags,
                ..Tcp::default()
            },
            payload,
        )
        .build()
}

fn tx_reason(mode: Forwarding) -> Reason {
    match mode {
        Forwarding::Ipip => Reason::TxIpip,
        Forwarding::Gue => Reason::TxGue,
        Forwarding::L2 => Reason::TxL2,
    }
}

/// Every case: each kind in each forwarding mode, and the non-VIP packet once.
pub fn cases() -> Vec<Case> {
    let mut out = Vec::new();
    for kind in Kind::ALL {
        if kind == Kind::NotVip {
            out.push(Case {
                kind,
                mode: None,
                input: udp4(NOT_VIP4, udp_port(Forwarding::Ipip, false), 64),
                verdict: XDP_PASS,
                reason: Reason::PassNotVip,
                creates_flow: false,
            });
            continue;
        }
        for mode in MODES {
            let input = match kind {
                Kind::Udp64 => udp4(VIP4, udp_port(mode, false), 64),
                Kind::Udp64Tracked => udp4(VIP4, udp_port(mode, true), 64),
                Kind::Udp512 => udp4(VIP4, udp_port(mode, false), 512),
                Kind::TcpSyn => tcp4(tcp_port(mode), tcp_flags::SYN, b""),
                Kind::TcpAck => tcp4(tcp_port(mode), tcp_flags::ACK, b"0123456789"),
                Kind::Udp6 => PacketBuilder::new()
                    .eth(CLIENT_MAC, LB_MAC)
                    .ipv6(CLIENT6, VIP6)
                    .udp(CLIENT_PORT, udp_port(mode, false), b"v6")
                    .build(),
                Kind::NotVip => unreachable!("handled above"),
            };
            out.push(Case {
                kind,
                mode: Some(mode),
                input,
                verdict: XDP_TX,
                reason: tx_reason(mode),
                creates_flow: false,
            });
        }
    }
    out
}

/// The 64-byte UDP frame the baselines run on.
pub fn baseline_frame() -> Vec<u8> {
    udp4(VIP4, udp_port(Forwarding::Ipip, false), 64)
}

/// Check what one plain run of the real program made of a case's frame: the verdict, and
/// for forwarded frames the shape the forwarding mode gives (outer headers of the right
/// size, a backend's MAC, the client's packet intact). Returns a short description.
pub fn check_output(case: &Case, action: u32, out: &[u8]) -> Result<String, String> {
    if action != case.verdict {
        return Err(format!("action {action}, expected {}", case.verdict));
    }
    let input = &case.input;
    let Some(mode) = case.mode else {
        return if out == input.as_slice() {
            Ok("PASS, frame untouched".into())
        } else {
            Err("a PASS frame was modified".into())
        };
    };
    let inner = &input[14..];
    let v6 = case.kind == Kind::Udp6;
    let extra = match (mode, v6) {
        (Forwarding::L2, _) => 0,
        (Forwarding::Ipip, false) => 20,
        (Forwarding::Ipip, true) => 40,
        (Forwarding::Gue, false) => 28,
        (Forwarding::Gue, true) => 48,
    };
    if out.len() != input.len() + extra {
        return Err(format!(
            "output {} bytes, expected {} + {extra}",
            out.len(),
            input.len()
        ));
    }
    if !is_backend_mac(&out[..6]) || out[6..12] != LB_MAC {
        return Err("Ethernet addresses are not backend ← LB".into());
    }
    if !out.ends_with(inner) {
        return Err("the client's IP packet is not intact after the outer headers".into());
    }
    if extra > 0 {
        let outer_dst: IpAddr = if v6 {
            let b: [u8; 16] = out[14 + 24..14 + 40].try_into().map_err(|_| "short")?;
            Ipv6Addr::from(b).into()
        } else {
            Ipv4Addr::new(out[30], out[31], out[32], out[33]).into()
        };
        let ok = (1..=BACKENDS).any(|i| {
            outer_dst == IpAddr::from(backend4(i)) || outer_dst == IpAddr::from(backend6(i))
        });
        if !ok {
            return Err(format!("outer destination {outer_dst} is not a backend"));
        }
        return Ok(format!("TX, +{extra} B outer to {outer_dst}"));
    }
    Ok("TX, MACs rewritten".into())
}
