//! `lb-agent trace`: run the real data plane on one synthesized packet and explain what it
//! did.
//!
//! The embedded object is loaded with every map taken from the pins of a running (or
//! kept-attached) agent, `lb_xdp` is loaded but not attached, and one frame goes through it
//! with `BPF_PROG_TEST_RUN`. The counters are read before and after, the output frame is
//! decoded, and the backend is named by address.
//!
//! Side effects, by design (the program runs against the live maps):
//! - the synthetic packet is counted in the live counters (reasons, service, backend);
//! - for a flow-tracked service a non-SYN trace follows the flow entry of its 5-tuple, or
//!   creates the entry the real first packet would create; a SYN trace (`--syn`) takes a
//!   fresh Maglev decision and overwrites the entry of that 5-tuple.
//!
//! Packet synthesis and output decoding are pure functions ([`build_frame`],
//! [`decode_output`], [`backends_for`]), tested without BPF.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    programs::{ProgramError, TestRun, TestRunOptions, Xdp},
};
use lb_common::{BackendValue, Reason, SERVICE_F_FLOW_TRACKING, ServiceValue, maps};
use serde::Serialize;

use crate::{
    EBPF_OBJECT,
    cli::TraceArgs,
    config::format_mac,
    dataplane::{Dataplane, DataplaneError, Stats},
    state::{Protocol, ServiceAddr},
    sync::{self, MapSnapshot, ip_from_bytes},
};

/// Source MAC of synthesized frames: locally administered, spells "lbtrc".
pub const PROBE_SRC_MAC: [u8; 6] = [0x02, 0x6c, 0x62, 0x74, 0x72, 0x63];
/// Destination MAC when the node configuration is not written yet.
const FALLBACK_DST_MAC: [u8; 6] = [0xff; 6];
/// UDP payload of synthesized packets.
pub const PROBE_PAYLOAD: &[u8] = b"lb-agent trace";
/// Sequence and acknowledgement numbers of synthesized TCP segments.
const PROBE_SEQ: u32 = 0x6c62_0001;
const PROBE_ACK: u32 = 0x6c62_0002;

const ETH_HLEN: usize = 14;
const VLAN_HLEN: usize = 4;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const UDP_HLEN: usize = 8;
const TCP_HLEN: usize = 20;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;
/// Room for whatever headers the program prepends (the kernel gives it 256 bytes).
const OUTPUT_SLACK: usize = 512;

/// Whether `lb_xdp` balances IPv6 VIPs (it parses IPv6, and lb-common has the IPv6 flow
/// hash); when false, IPv6 traces are refused with [`TraceError::Ipv6Unsupported`].
const DATAPLANE_HAS_IPV6: bool = true;

#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("no agent state under {}: is lb-agent running? ({missing} is not pinned)", dir.display())]
    NoAgentState { dir: PathBuf, missing: &'static str },
    #[error("source {src} and destination {dst} are not of the same address family")]
    FamilyMismatch { src: SocketAddr, dst: SocketAddr },
    #[error("IPv6 VIPs are not supported by this data plane yet")]
    Ipv6Unsupported,
    #[error("--syn needs --proto tcp")]
    SynNeedsTcp,
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("loading the eBPF object with the maps pinned under {}: {source}", dir.display())]
    Load {
        dir: PathBuf,
        source: Box<aya::EbpfError>,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("program {0} is missing from the object")]
    MissingProgram(&'static str),
    #[error("BPF_PROG_TEST_RUN of {name}: {source}")]
    TestRun {
        name: &'static str,
        source: ProgramError,
    },
}

/// The packet to trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Probe {
    pub protocol: Protocol,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// TCP only: a SYN (fresh decision) instead of an ACK.
    pub syn: bool,
}

impl Probe {
    fn validate(&self) -> Result<(), TraceError> {
        if self.src.is_ipv4() != self.dst.is_ipv4() {
            return Err(TraceError::FamilyMismatch {
                src: self.src,
                dst: self.dst,
            });
        }
        if self.syn && self.protocol != Protocol::Tcp {
            return Err(TraceError::SynNeedsTcp);
        }
        if self.dst.is_ipv6() && !DATAPLANE_HAS_IPV6 {
            return Err(TraceError::Ipv6Unsupported);
        }
        Ok(())
    }

    fn service_addr(&self) -> ServiceAddr {
        ServiceAddr {
            vip: self.dst.ip(),
            port: self.dst.port(),
            protocol: self.protocol,
        }
    }

    /// The flow hash the data plane computes for this packet.
    pub fn flow_hash(&self) -> u32 {
        let (sport, dport, proto) = (
            self.src.port().to_be(),
            self.dst.port().to_be(),
            self.protocol.number(),
        );
        match (self.src.ip(), self.dst.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => lb_common::hash::flow_hash_v4(
                u32::from_ne_bytes(s.octets()),
                u32::from_ne_bytes(d.octets()),
                sport,
                dport,
                proto,
            ),
            (s, d) => {
                lb_common::hash::flow_hash_v6(&v6_bytes(s), &v6_bytes(d), sport, dport, proto)
            }
        }
    }
}

fn v6_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

// ---------------------------------------------------------------------------------------
// Packet synthesis (pure)

/// One's-complement sum of big-endian 16-bit words (odd tail padded with zero).
fn sum16(mut sum: u32, data: &[u8]) -> u32 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The L4 segment (header + payload) with its checksum over the pseudo-header of
/// `pseudo_addrs` (source then destination address).
fn l4_segment(probe: &Probe, pseudo_addrs: &[u8]) -> Vec<u8> {
    let (sport, dport) = (probe.src.port(), probe.dst.port());
    let mut seg = Vec::with_capacity(TCP_HLEN + PROBE_PAYLOAD.len());
    seg.extend_from_slice(&sport.to_be_bytes());
    seg.extend_from_slice(&dport.to_be_bytes());
    let csum_off = match probe.protocol {
        Protocol::Udp => {
            seg.extend_from_slice(&((UDP_HLEN + PROBE_PAYLOAD.len()) as u16).to_be_bytes());
            seg.extend_from_slice(&[0, 0]);
            seg.extend_from_slice(PROBE_PAYLOAD);
            6
        }
        Protocol::Tcp => {
            let (flags, ack) = if probe.syn {
                (TCP_SYN, 0)
            } else {
                (TCP_ACK, PROBE_ACK)
            };
            seg.extend_from_slice(&PROBE_SEQ.to_be_bytes());
            seg.extend_from_slice(&ack.to_be_bytes());
            seg.push((TCP_HLEN as u8 / 4) << 4);
            seg.push(flags);
            seg.extend_from_slice(&64240u16.to_be_bytes());
            seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
            16
        }
    };
    // IPv4 and IPv6 pseudo-headers sum alike: addresses, zero, protocol, L4 length (the
    // IPv6 32-bit length and 24 zero bits add nothing more).
    let mut pseudo = pseudo_addrs.to_vec();
    pseudo.extend_from_slice(&[0, probe.protocol.number()]);
    pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    let mut csum = fold(sum16(sum16(0, &pseudo), &seg));
    if csum == 0 && probe.protocol == Protocol::Udp {
        csum = 0xffff;
    }
    seg[csum_off..csum_off + 2].copy_from_slice(&csum.to_be_bytes());
    seg
}

/// The frame `trace` sends: Ethernet (to `node_mac`, from [`PROBE_SRC_MAC`]), IPv4 or IPv6,
/// then UDP with [`PROBE_PAYLOAD`] or a TCP ACK (SYN with `probe.syn`) without payload.
/// Lengths and checksums are correct.
pub fn build_frame(probe: &Probe, node_mac: [u8; 6]) -> Result<Vec<u8>, TraceError> {
    probe.validate()?;
    let mut frame = Vec::with_capacity(ETH_HLEN + IPV6_HLEN + TCP_HLEN + PROBE_PAYLOAD.len());
    frame.extend_from_slice(&node_mac);
    frame.extend_from_slice(&PROBE_SRC_MAC);
    match (probe.src.ip(), probe.dst.ip()) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => {
            let mut addrs = src.octets().to_vec();
            addrs.extend_from_slice(&dst.octets());
            let seg = l4_segment(probe, &addrs);
            let mut ip = [0u8; IPV4_HLEN];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((IPV4_HLEN + seg.len()) as u16).to_be_bytes());
            ip[6] = 0x40; // DF
            ip[8] = 64;
            ip[9] = probe.protocol.number();
            ip[12..16].copy_from_slice(&src.octets());
            ip[16..20].copy_from_slice(&dst.octets());
            let csum = fold(sum16(0, &ip));
            ip[10..12].copy_from_slice(&csum.to_be_bytes());
            frame.extend_from_slice(&ETH_P_IP.to_be_bytes());
            frame.extend_from_slice(&ip);
            frame.extend_from_slice(&seg);
        }
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let mut addrs = src.octets().to_vec();
            addrs.extend_from_slice(&dst.octets());
            let seg = l4_segment(probe, &addrs);
            let mut ip = [0u8; IPV6_HLEN];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&(seg.len() as u16).to_be_bytes());
            ip[6] = probe.protocol.number();
            ip[7] = 64;
            ip[8..24].copy_from_slice(&src.octets());
            ip[24..40].copy_from_slice(&dst.octets());
            frame.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
            frame.extend_from_slice(&ip);
            frame.extend_from_slice(&seg);
        }
        _ => unreachable!("validate() checked the families"),
    }
    Ok(frame)
}

// ---------------------------------------------------------------------------------------
// Output decoding (pure)

/// The XDP verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpAction {
    Aborted,
    Drop,
    Pass,
    Tx,
    Redirect,
    Other(u32),
}

impl XdpAction {
    pub const fn from_raw(v: u32) -> Self {
        match v {
            0 => XdpAction::Aborted,
            1 => XdpAction::Drop,
            2 => XdpAction::Pass,
            3 => XdpAction::Tx,
            4 => XdpAction::Redirect,
            n => XdpAction::Other(n),
        }
    }
}

impl fmt::Display for XdpAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            XdpAction::Aborted => f.write_str("ABORTED"),
            XdpAction::Drop => f.write_str("DROP"),
            XdpAction::Pass => f.write_str("PASS"),
            XdpAction::Tx => f.write_str("TX"),
            XdpAction::Redirect => f.write_str("REDIRECT"),
            XdpAction::Other(n) => write!(f, "UNKNOWN({n})"),
        }
    }
}

impl Serialize for XdpAction {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What the program did to the frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Encapsulation {
    /// Returned byte for byte.
    Unchanged,
    /// Only the Ethernet addresses were rewritten.
    L2 { eth_src: String, eth_dst: String },
    /// An outer IP header was prepended (IPIP, IP6IP6, 4in6, 6in4); the original IP packet
    /// follows it unchanged.
    Ipip {
        outer_src: IpAddr,
        outer_dst: IpAddr,
        eth_src: String,
        eth_dst: String,
    },
    /// An outer IP and UDP header were prepended (GUE variant 1), or for a pod reached
    /// through its node also a GUE header naming the pod (`pod`); the original IP packet
    /// follows unchanged.
    Gue {
        outer_src: IpAddr,
        outer_dst: IpAddr,
        udp_sport: u16,
        udp_dport: u16,
        #[serde(skip_serializing_if = "Option::is_none")]
        pod: Option<IpAddr>,
        eth_src: String,
        eth_dst: String,
    },
    /// Changed in a way this tool does not recognise (e.g. an ICMP error sent back).
    Unrecognised,
}

impl Encapsulation {
    /// The address the frame is now sent to (outer destination), for encapsulations.
    pub fn outer_dst(&self) -> Option<IpAddr> {
        match self {
            Encapsulation::Ipip { outer_dst, .. } | Encapsulation::Gue { outer_dst, .. } => {
                Some(*outer_dst)
            }
            _ => None,
        }
    }
}

impl fmt::Display for Encapsulation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Encapsulation::Unchanged => f.write_str("none (frame unchanged)"),
            Encapsulation::L2 { eth_src, eth_dst } => {
                write!(f, "l2: MAC rewrite, eth {eth_src} -> {eth_dst}")
            }
            Encapsulation::Ipip {
                outer_src,
                outer_dst,
                eth_src,
                eth_dst,
            } => write!(
                f,
                "ipip: outer {outer_src} -> {outer_dst}, eth {eth_src} -> {eth_dst}"
            ),
            Encapsulation::Gue {
                outer_src,
                outer_dst,
                udp_sport,
                udp_dport,
                pod,
                eth_src,
                eth_dst,
            } => {
                write!(
                    f,
                    "gue: outer {outer_src} -> {outer_dst}, udp {udp_sport} -> {udp_dport}, "
                )?;
                if let Some(pod) = pod {
                    write!(f, "pod {pod} (through its node), ")?;
                }
                write!(f, "eth {eth_src} -> {eth_dst}")
            }
            Encapsulation::Unrecognised => f.write_str("unrecognised change"),
        }
    }
}

/// Offset of the L3 header of an Ethernet frame with at most one 802.1Q tag, and its
/// ethertype.
fn l3_of(frame: &[u8]) -> Option<(usize, u16)> {
    let et = |off: usize| Some(u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]));
    match et(12)? {
        ETH_P_8021Q => Some((ETH_HLEN + VLAN_HLEN, et(16)?)),
        t => Some((ETH_HLEN, t)),
    }
}

fn mac_at(frame: &[u8], off: usize) -> String {
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&frame[off..off + 6]);
    format_mac(&mac)
}

/// Outer header fields: (source, destination, protocol / next header, header length).
fn outer_ip(hdr: &[u8], ether_type: u16) -> Option<(IpAddr, IpAddr, u8, usize)> {
    match ether_type {
        ETH_P_IP if hdr.len() >= IPV4_HLEN && hdr[0] >> 4 == 4 => {
            let ihl = usize::from(hdr[0] & 0x0f) * 4;
            let s: [u8; 4] = hdr[12..16].try_into().ok()?;
            let d: [u8; 4] = hdr[16..20].try_into().ok()?;
            Some((
                Ipv4Addr::from(s).into(),
                Ipv4Addr::from(d).into(),
                hdr[9],
                ihl,
            ))
        }
        ETH_P_IPV6 if hdr.len() >= IPV6_HLEN && hdr[0] >> 4 == 6 => {
            let s: [u8; 16] = hdr[8..24].try_into().ok()?;
            let d: [u8; 16] = hdr[24..40].try_into().ok()?;
            Some((
                Ipv6Addr::from(s).into(),
                Ipv6Addr::from(d).into(),
                hdr[6],
                IPV6_HLEN,
            ))
        }
        _ => None,
    }
}

/// Compare the output frame with the input and say what was done to it.
pub fn decode_output(input: &[u8], output: &[u8]) -> Encapsulation {
    if input == output {
        return Encapsulation::Unchanged;
    }
    if input.len() < ETH_HLEN || output.len() < ETH_HLEN {
        return Encapsulation::Unrecognised;
    }
    if input.len() == output.len() && input[12..] == output[12..] {
        return Encapsulation::L2 {
            eth_src: mac_at(output, 6),
            eth_dst: mac_at(output, 0),
        };
    }
    let (Some((l3_in, _)), Some((l3_out, ether_type))) = (l3_of(input), l3_of(output)) else {
        return Encapsulation::Unrecognised;
    };
    // Output: L2 header, outer headers, then the original IP packet byte for byte.
    let Some(outer_len) = (output.len() - l3_out).checked_sub(input.len() - l3_in) else {
        return Encapsulation::Unrecognised;
    };
    if output[l3_out + outer_len..] != input[l3_in..] {
        return Encapsulation::Unrecognised;
    }
    let outer = &output[l3_out..l3_out + outer_len];
    let Some((src, dst, proto, ip_len)) = outer_ip(outer, ether_type) else {
        return Encapsulation::Unrecognised;
    };
    let (eth_src, eth_dst) = (mac_at(output, 6), mac_at(output, 0));
    match proto {
        lb_common::PROTO_IPIP | lb_common::PROTO_IPV6 if ip_len == outer_len => {
            Encapsulation::Ipip {
                outer_src: src,
                outer_dst: dst,
                eth_src,
                eth_dst,
            }
        }
        lb_common::PROTO_UDP if outer_len >= ip_len + UDP_HLEN => {
            let udp = &outer[ip_len..];
            let gue = &udp[UDP_HLEN..];
            // Variant 1 has no GUE header; a pod behind its node has one naming the pod.
            let pod = match gue.len() {
                0 => None,
                8 if gue[..4] == lb_common::gue_pod_header(lb_common::FAMILY_V4) => {
                    Some(IpAddr::from([gue[4], gue[5], gue[6], gue[7]]))
                }
                20 if gue[..4] == lb_common::gue_pod_header(lb_common::FAMILY_V6) => {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(&gue[4..]);
                    Some(IpAddr::from(a))
                }
                _ => return Encapsulation::Unrecognised,
            };
            Encapsulation::Gue {
                outer_src: src,
                outer_dst: dst,
                udp_sport: u16::from_be_bytes([udp[0], udp[1]]),
                udp_dport: u16::from_be_bytes([udp[2], udp[3]]),
                pod,
                eth_src,
                eth_dst,
            }
        }
        _ => Encapsulation::Unrecognised,
    }
}

/// The backend entries of service `service_id` the frame went to: by outer destination
/// address for encapsulations, by destination MAC for an L2 rewrite (several backends may
/// share a next-hop MAC, e.g. a gateway's).
pub fn backends_for(
    encap: &Encapsulation,
    service_id: u32,
    backends: &BTreeMap<u32, BackendValue>,
) -> Vec<u32> {
    let of_service = backends
        .iter()
        .filter(|(_, b)| b.is_valid() && b.service_id == service_id);
    match encap {
        Encapsulation::Gue { pod: Some(pod), .. } => of_service
            .filter(|(_, b)| ip_from_bytes(&b.addr_be, b.family) == Some(*pod))
            .map(|(id, _)| *id)
            .collect(),
        Encapsulation::Ipip { outer_dst, .. } | Encapsulation::Gue { outer_dst, .. } => of_service
            .filter(|(_, b)| ip_from_bytes(&b.addr_be, b.family) == Some(*outer_dst))
            .map(|(id, _)| *id)
            .collect(),
        Encapsulation::L2 { eth_dst, .. } => of_service
            .filter(|(_, b)| format_mac(&b.mac) == *eth_dst)
            .map(|(id, _)| *id)
            .collect(),
        Encapsulation::Unchanged | Encapsulation::Unrecognised => Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------
// The report

#[derive(Clone, Debug, Serialize)]
pub struct TraceReport {
    pub packet: PacketInfo,
    /// The service the destination names, if it is a VIP:port of this node.
    pub service: Option<ServiceInfo>,
    pub action: XdpAction,
    /// Every reason counter that moved during the run (live traffic included).
    pub reasons: Vec<ReasonDelta>,
    /// "maglev" (decided now) or "flow_table" (followed a remembered flow), when forwarded.
    pub decision: Option<&'static str>,
    /// The backend Maglev picks for this 5-tuple now.
    pub maglev_choice: Option<BackendInfo>,
    /// The backend the frame went to.
    pub backend: Option<BackendInfo>,
    /// Several backends of the service share the destination MAC: any of these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backend_candidates: Vec<BackendInfo>,
    pub encapsulation: Encapsulation,
    pub output_len: usize,
    /// Side effects and caveats.
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct PacketInfo {
    pub protocol: &'static str,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// "ACK" or "SYN" for TCP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_flags: Option<&'static str>,
    pub eth_src: String,
    pub eth_dst: String,
    pub len: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ServiceInfo {
    pub address: String,
    pub id: u32,
    pub forwarding: &'static str,
    pub flow_tracking: bool,
    pub table_size: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendInfo {
    pub address: IpAddr,
    pub id: u32,
    pub mac: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReasonDelta {
    pub reason: &'static str,
    pub packets: u64,
    pub bytes: u64,
}

fn backend_info(id: u32, snap: &MapSnapshot) -> Option<BackendInfo> {
    let b = snap.backends.get(&id)?;
    Some(BackendInfo {
        address: ip_from_bytes(&b.addr_be, b.family)?,
        id,
        mac: format_mac(&b.mac),
    })
}

fn reason_deltas(before: &Stats, after: &Stats) -> Vec<ReasonDelta> {
    after
        .reasons
        .iter()
        .filter_map(|(reason, a)| {
            let b = before
                .reasons
                .iter()
                .find(|(r, _)| r == reason)
                .map(|(_, c)| *c)
                .unwrap_or_default();
            let packets = a.packets.wrapping_sub(b.packets);
            (packets != 0).then(|| ReasonDelta {
                reason: reason.name(),
                packets,
                bytes: a.bytes.wrapping_sub(b.bytes),
            })
        })
        .collect()
}

/// Reasons counted on the side of a packet's verdict (flow-table events and the like).
const SIDE_REASONS: [Reason; 6] = [
    Reason::FlowCreated,
    Reason::FlowGuarded,
    Reason::FlowRerouted,
    Reason::IcmpToBackend,
    Reason::AffinityHit,
    // Counted before the hand-over to the decap program, which counts the verdict.
    Reason::LocalBackend,
];

/// Every pin `trace` needs, or the first one missing.
fn check_pins(dir: &Path) -> Result<(), TraceError> {
    for name in maps::ALL {
        if !dir.join(name).exists() {
            return Err(TraceError::NoAgentState {
                dir: dir.to_path_buf(),
                missing: name,
            });
        }
    }
    Ok(())
}

/// Run `probe` through `lb_xdp` against the maps pinned under `pin_dir`.
pub fn trace(pin_dir: &Path, probe: &Probe) -> Result<TraceReport, TraceError> {
    probe.validate()?;
    // Checked first: the loader would otherwise create (and pin) empty maps.
    check_pins(pin_dir)?;
    let dp = Dataplane::open_pinned(pin_dir)?;
    let snap = dp.snapshot()?;
    let mut notes = Vec::new();
    let node_mac = match snap.config {
        Some(c) => c.mac,
        None => {
            notes.push(
                "the node configuration is not written yet: the frame goes to the broadcast MAC"
                    .to_string(),
            );
            FALLBACK_DST_MAC
        }
    };
    let input = build_frame(probe, node_mac)?;

    let addr = probe.service_addr();
    let service: Option<ServiceValue> = snap.services.get(&sync::service_key(&addr)).copied();
    let tracked = service.is_some_and(|s| s.flags & SERVICE_F_FLOW_TRACKING != 0);
    let maglev_choice = match &service {
        Some(s) if s.table_size > 0 => {
            let table = dp.table(s)?;
            let slot = lb_common::hash::slot(probe.flow_hash(), s.table_size);
            // As the data plane decides: a gone backend's slot sends to a neighbour's.
            let backend = |id| snap.backends.get(&id).filter(|b| b.service_id == s.id);
            lb_common::maglev::choose(
                &table,
                slot,
                |id| backend(id).is_some_and(|b| b.is_unreachable()),
                |id| backend(id).is_some_and(|b| b.can_take()),
            )
            .and_then(|id| backend_info(id, &snap))
        }
        _ => None,
    };
    let service_ids: Vec<u32> = service.iter().map(|s| s.id).collect();

    // Load the program against the live maps; nothing is attached.
    let mut loader = EbpfLoader::new();
    for name in maps::ALL {
        loader.map_pin_path(name, pin_dir.join(name));
    }
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .map_err(|source| TraceError::Load {
            dir: pin_dir.to_path_buf(),
            source: Box::new(source),
        })?;
    let prog: &mut Xdp = ebpf
        .program_mut(maps::PROG_LB)
        .ok_or(TraceError::MissingProgram(maps::PROG_LB))?
        .try_into()
        .map_err(|source| TraceError::Program {
            name: maps::PROG_LB,
            source,
        })?;
    prog.load().map_err(|source| TraceError::Program {
        name: maps::PROG_LB,
        source,
    })?;

    let before = dp.stats(service_ids.iter().copied(), [])?;
    let mut out = vec![0u8; input.len() + OUTPUT_SLACK];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(&input);
    opts.data_out = Some(&mut out);
    let result = prog.test_run(opts).map_err(|source| TraceError::TestRun {
        name: maps::PROG_LB,
        source,
    })?;
    let after = dp.stats(service_ids.iter().copied(), [])?;
    out.truncate(result.data_size_out as usize);

    let action = XdpAction::from_raw(result.return_value);
    let reasons = reason_deltas(&before, &after);
    let encapsulation = decode_output(&input, &out);

    let mut backend = None;
    let mut backend_candidates = Vec::new();
    let mut decision = None;
    if let (Some(s), XdpAction::Tx) = (&service, action) {
        let ids = backends_for(&encapsulation, s.id, &snap.backends);
        let infos: Vec<BackendInfo> = ids
            .iter()
            .filter_map(|id| backend_info(*id, &snap))
            .collect();
        match infos.as_slice() {
            [one] => backend = Some(one.clone()),
            [] => notes.push(
                "the output frame goes to no backend of the service (see the reason)".to_string(),
            ),
            several => {
                // Several backends behind one next-hop MAC: Maglev's choice is the one,
                // unless a remembered flow says otherwise.
                backend = maglev_choice
                    .clone()
                    .filter(|m| several.contains(m))
                    .filter(|_| !tracked);
                backend_candidates = several.to_vec();
            }
        }
        let new_flows = |st: &Stats| st.services.get(&s.id).map_or(0, |c| c.new_flows);
        decision = Some(if new_flows(&after) > new_flows(&before) {
            "maglev"
        } else {
            "flow_table"
        });
    }

    let verdicts: u64 = reasons
        .iter()
        .filter(|d| !SIDE_REASONS.iter().any(|r| r.name() == d.reason))
        .map(|d| d.packets)
        .sum();
    notes.push(
        "the synthetic packet was counted in the live counters (its reason, and the service's and backend's counters if forwarded)"
            .to_string(),
    );
    if verdicts > 1 {
        notes.push(format!(
            "{verdicts} packets were counted during the run: live traffic moved the counters too"
        ));
    }
    if tracked {
        notes.push(if probe.syn {
            "flow-tracked service: the SYN took a fresh Maglev decision and overwrote the flow entry of this 5-tuple".to_string()
        } else {
            "flow-tracked service: the trace followed the flow entry of this 5-tuple, or created the one its real first packet would create".to_string()
        });
    }
    if service.is_none() {
        notes.push(format!(
            "{addr} is not a service of this node: the data plane leaves such packets to the stack"
        ));
    }

    Ok(TraceReport {
        packet: PacketInfo {
            protocol: probe.protocol.name(),
            src: probe.src,
            dst: probe.dst,
            tcp_flags: (probe.protocol == Protocol::Tcp).then_some(if probe.syn {
                "SYN"
            } else {
                "ACK"
            }),
            eth_src: format_mac(&PROBE_SRC_MAC),
            eth_dst: format_mac(&node_mac),
            len: input.len(),
        },
        service: service.map(|s| ServiceInfo {
            address: addr.to_string(),
            id: s.id,
            forwarding: sync::forwarding_name(&s),
            flow_tracking: tracked,
            table_size: s.table_size,
        }),
        action,
        reasons,
        decision,
        maglev_choice,
        backend,
        backend_candidates,
        encapsulation,
        output_len: out.len(),
        notes,
    })
}

fn fmt_backend(b: &BackendInfo) -> String {
    format!("{} (id {}, next-hop mac {})", b.address, b.id, b.mac)
}

/// The human-readable report.
pub fn render(r: &TraceReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let p = &r.packet;
    let flags = p.tcp_flags.map(|f| format!(" {f}")).unwrap_or_default();
    let _ = writeln!(
        out,
        "packet     {}{flags} {} -> {}, {}-byte frame, eth {} -> {}",
        p.protocol, p.src, p.dst, p.len, p.eth_src, p.eth_dst
    );
    match &r.service {
        Some(s) => {
            let _ = writeln!(
                out,
                "service    {} (id {}), forwarding {}, {}, {} Maglev slots",
                s.address,
                s.id,
                s.forwarding,
                if s.flow_tracking {
                    "flow-tracked"
                } else {
                    "untracked"
                },
                s.table_size
            );
        }
        None => {
            let _ = writeln!(out, "service    none (not a VIP:port of this node)");
        }
    }
    let _ = writeln!(out, "action     {}", r.action);
    let reasons: Vec<String> = r
        .reasons
        .iter()
        .map(|d| format!("{} +{}", d.reason, d.packets))
        .collect();
    let _ = writeln!(
        out,
        "reason     {}",
        if reasons.is_empty() {
            "(no counter moved)".to_string()
        } else {
            reasons.join(", ")
        }
    );
    if let Some(d) = r.decision {
        let _ = writeln!(
            out,
            "decision   {}",
            match d {
                "maglev" => "Maglev (decided now)",
                _ => "flow table (followed a remembered flow)",
            }
        );
    }
    match (&r.backend, r.backend_candidates.as_slice()) {
        (Some(b), _) => {
            let _ = writeln!(out, "backend    {}", fmt_backend(b));
        }
        (None, []) => {}
        (None, several) => {
            let list: Vec<String> = several.iter().map(|b| b.address.to_string()).collect();
            let _ = writeln!(
                out,
                "backend    one of {} (they share the next-hop mac)",
                list.join(", ")
            );
        }
    }
    if let Some(m) = &r.maglev_choice
        && r.backend.as_ref() != Some(m)
    {
        let _ = writeln!(out, "maglev     would pick {}", fmt_backend(m));
    }
    let _ = writeln!(out, "encap      {}", r.encapsulation);
    let _ = writeln!(out, "output     {} bytes", r.output_len);
    for n in &r.notes {
        let _ = writeln!(out, "note       {n}");
    }
    out
}

pub fn print(args: &TraceArgs) -> Result<(), TraceError> {
    let probe = Probe {
        protocol: args.proto.into(),
        src: args.src,
        dst: args.dst,
        syn: args.syn,
    };
    crate::output::print(&trace(&args.pin_path, &probe)?, args.json, render);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn probe(protocol: Protocol, src: &str, dst: &str, syn: bool) -> Probe {
        Probe {
            protocol,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            syn,
        }
    }

    fn udp_probe() -> Probe {
        probe(Protocol::Udp, "198.18.1.1:40000", "198.18.0.100:53", false)
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Checksum over a pseudo-header (addresses, protocol, length) and the segment.
    fn l4_sum(addrs: &[u8], proto: u8, seg: &[u8]) -> u16 {
        let mut pseudo = addrs.to_vec();
        pseudo.extend_from_slice(&[0, proto]);
        pseudo.extend_from_slice(&(seg.len() as u16).to_be_bytes());
        fold(sum16(sum16(0, &pseudo), seg))
    }

    #[test]
    fn udp_frame_has_right_lengths_and_checksums() {
        let f = build_frame(&udp_probe(), NODE_MAC).unwrap();
        assert_eq!(f.len(), 14 + 20 + 8 + PROBE_PAYLOAD.len());
        assert_eq!(f[..12], hex("020000000002 026c62747263")[..]);
        assert_eq!(f[12..14], [0x08, 0x00]);
        let ip = &f[14..];
        assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), ip.len());
        assert_eq!(fold(sum16(0, &ip[..20])), 0, "IPv4 header checksum");
        assert_eq!(ip[9], 17);
        assert_eq!(ip[12..20], hex("c6120101 c6120064")[..]);
        assert_eq!(ip[20..24], hex("9c40 0035")[..]);
        assert_eq!(l4_sum(&ip[12..20], 17, &ip[20..]), 0, "UDP checksum");
    }

    #[test]
    fn tcp_frames_are_ack_or_syn() {
        let ack = build_frame(
            &probe(Protocol::Tcp, "198.18.1.1:1234", "198.18.0.100:80", false),
            NODE_MAC,
        )
        .unwrap();
        assert_eq!(ack.len(), 14 + 20 + 20);
        assert_eq!(ack[14 + 20 + 12], 0x50, "data offset 5");
        assert_eq!(ack[14 + 20 + 13], TCP_ACK);
        let syn = build_frame(
            &probe(Protocol::Tcp, "198.18.1.1:1234", "198.18.0.100:80", true),
            NODE_MAC,
        )
        .unwrap();
        assert_eq!(syn[14 + 20 + 13], TCP_SYN);
        assert_eq!(
            l4_sum(&syn[14 + 12..14 + 20], 6, &syn[34..]),
            0,
            "TCP checksum"
        );
    }

    #[test]
    fn ipv6_frame_and_argument_checks() {
        let p = probe(
            Protocol::Udp,
            "[2001:db8::1]:5000",
            "[2001:db8::100]:53",
            false,
        );
        match build_frame(&p, NODE_MAC) {
            Ok(f) => {
                assert_eq!(f[12..14], [0x86, 0xdd]);
                assert_eq!(f.len(), 14 + 40 + 8 + PROBE_PAYLOAD.len());
                let ip = &f[14..];
                assert_eq!(
                    usize::from(u16::from_be_bytes([ip[4], ip[5]])),
                    ip.len() - 40
                );
                // The RFC 8200 pseudo-header: 32-bit length, next header last.
                let mut pseudo = ip[8..40].to_vec();
                pseudo.extend_from_slice(&((ip.len() - 40) as u32).to_be_bytes());
                pseudo.extend_from_slice(&[0, 0, 0, 17]);
                assert_eq!(fold(sum16(sum16(0, &pseudo), &ip[40..])), 0);
            }
            Err(e) => assert!(matches!(e, TraceError::Ipv6Unsupported), "{e}"),
        }
        let mixed = probe(Protocol::Udp, "198.18.1.1:1", "[2001:db8::100]:53", false);
        assert!(matches!(
            build_frame(&mixed, NODE_MAC),
            Err(TraceError::FamilyMismatch { .. })
        ));
        let syn_udp = probe(Protocol::Udp, "198.18.1.1:1", "198.18.0.100:53", true);
        assert!(matches!(
            build_frame(&syn_udp, NODE_MAC),
            Err(TraceError::SynNeedsTcp)
        ));
    }

    /// What the data plane does for IPIP, built independently: new MACs, a 20-byte outer
    /// header, the IP packet unchanged.
    fn ipip(input: &[u8], l3: usize, outer_dst: [u8; 4]) -> Vec<u8> {
        let mut out = hex("02000000000c 020000000002");
        out.extend_from_slice(&input[12..l3]);
        let inner = &input[l3..];
        let mut hdr = vec![0x45, 0];
        hdr.extend_from_slice(&((inner.len() + 20) as u16).to_be_bytes());
        hdr.extend_from_slice(&[0, 0, 0x40, 0, 64, 4, 0, 0, 198, 18, 0, 2]);
        hdr.extend_from_slice(&outer_dst);
        let c = fold(sum16(0, &hdr));
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        out.extend_from_slice(&hdr);
        out.extend_from_slice(inner);
        out
    }

    #[test]
    fn decodes_an_ipip_frame() {
        let input = build_frame(&udp_probe(), NODE_MAC).unwrap();
        let out = ipip(&input, 14, [198, 18, 0, 12]);
        assert_eq!(
            decode_output(&input, &out),
            Encapsulation::Ipip {
                outer_src: "198.18.0.2".parse().unwrap(),
                outer_dst: "198.18.0.12".parse().unwrap(),
                eth_src: "02:00:00:00:00:02".into(),
                eth_dst: "02:00:00:00:00:0c".into(),
            }
        );
        // A VLAN-tagged frame keeps its tag in front of the outer header.
        let mut tagged = input[..12].to_vec();
        tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
        tagged.extend_from_slice(&input[12..]);
        let out = ipip(&tagged, 18, [198, 18, 0, 13]);
        assert_eq!(
            decode_output(&tagged, &out).outer_dst(),
            Some("198.18.0.13".parse().unwrap())
        );
        // The inner packet must be intact, or the frame is not recognised as IPIP.
        let mut broken = ipip(&input, 14, [198, 18, 0, 12]);
        let last = broken.len() - 1;
        broken[last] ^= 1;
        assert_eq!(decode_output(&input, &broken), Encapsulation::Unrecognised);
    }

    #[test]
    fn decodes_a_gue_frame() {
        let input = build_frame(&udp_probe(), NODE_MAC).unwrap();
        let inner = &input[14..];
        let mut out = hex("02000000000c 020000000002 0800");
        let mut hdr = vec![0x45, 0];
        hdr.extend_from_slice(&((inner.len() + 28) as u16).to_be_bytes());
        hdr.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0, 198, 18, 0, 2, 198, 18, 0, 12]);
        out.extend_from_slice(&hdr);
        out.extend_from_slice(&hex("d431 17c0"));
        out.extend_from_slice(&((inner.len() + 8) as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(inner);
        assert_eq!(
            decode_output(&input, &out),
            Encapsulation::Gue {
                outer_src: "198.18.0.2".parse().unwrap(),
                outer_dst: "198.18.0.12".parse().unwrap(),
                udp_sport: 0xd431,
                udp_dport: 6080,
                pod: None,
                eth_src: "02:00:00:00:00:02".into(),
                eth_dst: "02:00:00:00:00:0c".into(),
            }
        );
    }

    #[test]
    fn decodes_gue_to_a_pod_through_its_node_and_finds_the_pod() {
        let input = build_frame(&udp_probe(), NODE_MAC).unwrap();
        let inner = &input[14..];
        let mut out = hex("02000000000c 020000000002 0800");
        let mut hdr = vec![0x45, 0];
        hdr.extend_from_slice(&((inner.len() + 36) as u16).to_be_bytes());
        hdr.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0, 198, 18, 0, 2, 198, 18, 0, 12]);
        out.extend_from_slice(&hdr);
        out.extend_from_slice(&hex("d431 17c0"));
        out.extend_from_slice(&((inner.len() + 16) as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        // GUE variant 0, hlen 1, protocol IPIP, no flags; the pod 198.18.8.11.
        out.extend_from_slice(&[1, 4, 0, 0, 198, 18, 8, 11]);
        out.extend_from_slice(inner);
        let encap = decode_output(&input, &out);
        let pod: IpAddr = "198.18.8.11".parse().unwrap();
        assert_eq!(
            encap,
            Encapsulation::Gue {
                outer_src: "198.18.0.2".parse().unwrap(),
                outer_dst: "198.18.0.12".parse().unwrap(),
                udp_sport: 0xd431,
                udp_dport: 6080,
                pod: Some(pod),
                eth_src: "02:00:00:00:00:02".into(),
                eth_dst: "02:00:00:00:00:0c".into(),
            }
        );
        let (pod_be, family) = crate::sync::ip_bytes(pod);
        let (node_be, _) = crate::sync::ip_bytes("198.18.0.12".parse().unwrap());
        let backends = BTreeMap::from([(
            3,
            BackendValue {
                addr_be: pod_be,
                family,
                flags: lb_common::BACKEND_F_VALID | lb_common::BACKEND_F_VIA_NODE,
                service_id: 1,
                via_be: node_be,
                ..BackendValue::EMPTY
            },
        )]);
        assert_eq!(backends_for(&encap, 1, &backends), [3]);
        // Any other private data is not ours.
        let last = out.len() - inner.len() - 8;
        out[last] = 2;
        assert_eq!(decode_output(&input, &out), Encapsulation::Unrecognised);
    }

    #[test]
    fn decodes_an_l2_frame_and_finds_the_backend_by_mac() {
        let input = build_frame(&udp_probe(), NODE_MAC).unwrap();
        let mut out = input.clone();
        out[..12].copy_from_slice(&hex("02000000000d 020000000002"));
        let encap = decode_output(&input, &out);
        assert_eq!(
            encap,
            Encapsulation::L2 {
                eth_src: "02:00:00:00:00:02".into(),
                eth_dst: "02:00:00:00:00:0d".into(),
            }
        );
        let backend = |last: u8, service_id: u32| {
            let mut addr_be = [0u8; 16];
            addr_be[..4].copy_from_slice(&[198, 18, 0, last]);
            BackendValue {
                addr_be,
                mac: [2, 0, 0, 0, 0, last],
                family: lb_common::FAMILY_V4,
                flags: lb_common::BACKEND_F_VALID,
                service_id,
                ..BackendValue::EMPTY
            }
        };
        // The same address in two services: only the traced service's entry counts.
        let backends = BTreeMap::from([
            (0, backend(12, 0)),
            (1, backend(13, 0)),
            (2, backend(13, 1)),
        ]);
        assert_eq!(backends_for(&encap, 0, &backends), vec![1]);
        assert_eq!(backends_for(&encap, 1, &backends), vec![2]);
        assert_eq!(backends_for(&encap, 7, &backends), Vec::<u32>::new());
        let by_addr = decode_output(&input, &ipip(&input, 14, [198, 18, 0, 12]));
        assert_eq!(backends_for(&by_addr, 0, &backends), vec![0]);
    }

    #[test]
    fn a_passed_frame_is_unchanged() {
        let input = build_frame(&udp_probe(), NODE_MAC).unwrap();
        assert_eq!(decode_output(&input, &input), Encapsulation::Unchanged);
        assert_eq!(
            backends_for(&Encapsulation::Unchanged, 0, &BTreeMap::new()),
            Vec::<u32>::new()
        );
        // Anything else that changed is reported as such, not guessed at.
        let mut other = input.clone();
        other[20] ^= 0xff;
        assert_eq!(decode_output(&input, &other), Encapsulation::Unrecognised);
        assert_eq!(XdpAction::from_raw(3).to_string(), "TX");
        assert_eq!(XdpAction::from_raw(9).to_string(), "UNKNOWN(9)");
    }
}
