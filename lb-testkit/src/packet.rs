//! A small packet builder for BPF_PROG_TEST_RUN tables.
//!
//! ```
//! use lb_testkit::packet::{PacketBuilder, l4_checksum_ok, verify_ipv4_header_checksum};
//! use std::net::Ipv4Addr;
//!
//! let frame = PacketBuilder::new()
//!     .eth([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
//!     .ipv4(Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 100))
//!     .udp(40000, 80, b"hello")
//!     .build();
//! assert_eq!(frame.len(), 14 + 20 + 8 + 5);
//! assert!(verify_ipv4_header_checksum(&frame[14..]));
//! assert!(l4_checksum_ok(&frame[14..]));
//! ```
//!
//! Lengths and checksums are computed unless explicitly overridden (for malformed-packet
//! tests). Building never fails: out-of-range inputs are clamped and documented as such.

use std::net::{Ipv4Addr, Ipv6Addr};

/// EtherType IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// EtherType 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// EtherType IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;

/// IP protocol ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IP protocol IPv4-in-IP (IPIP).
pub const IPPROTO_IPIP: u8 = 4;
/// IP protocol TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol UDP.
pub const IPPROTO_UDP: u8 = 17;
/// IP protocol IPv6-in-IP.
pub const IPPROTO_IPV6: u8 = 41;
/// IP protocol ICMPv6.
pub const IPPROTO_ICMPV6: u8 = 58;

/// IPv4 "don't fragment" flag, in the flags/fragment-offset word.
pub const IP_DF: u16 = 0x4000;
/// IPv4 "more fragments" flag, in the flags/fragment-offset word.
pub const IP_MF: u16 = 0x2000;

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// 802.1Q tag length.
pub const VLAN_HLEN: usize = 4;
/// IPv4 header length without options.
pub const IPV4_HLEN: usize = 20;
/// IPv6 header length.
pub const IPV6_HLEN: usize = 40;
/// UDP header length.
pub const UDP_HLEN: usize = 8;
/// TCP header length without options.
pub const TCP_HLEN: usize = 20;

/// Longest IPv4 options field (IHL is 4 bits: 60-byte header).
const MAX_IPV4_OPTIONS: usize = 40;

/// TCP flag bits.
pub mod tcp_flags {
    /// FIN
    pub const FIN: u8 = 0x01;
    /// SYN
    pub const SYN: u8 = 0x02;
    /// RST
    pub const RST: u8 = 0x04;
    /// PSH
    pub const PSH: u8 = 0x08;
    /// ACK
    pub const ACK: u8 = 0x10;
    /// URG
    pub const URG: u8 = 0x20;
}

/// The broadcast MAC.
pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// TCP header fields (no options; data offset 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tcp {
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number.
    pub ack: u32,
    /// Flag bits, see [`tcp_flags`].
    pub flags: u8,
    /// Receive window.
    pub window: u16,
}

impl Default for Tcp {
    fn default() -> Self {
        Tcp {
            sport: 0,
            dport: 0,
            seq: 0,
            ack: 0,
            flags: tcp_flags::SYN,
            window: 64240,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Ip {
    None,
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum L4 {
    None,
    Udp { sport: u16, dport: u16 },
    Tcp(Tcp),
    Raw(u8),
}

/// Builds Ethernet [+ 802.1Q] + IPv4/IPv6 + UDP/TCP/raw frames with correct lengths and
/// checksums.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketBuilder {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    vlan: Option<u16>,
    ethertype: Option<u16>,
    ip: Ip,
    ttl: u8,
    tos: u8,
    id: u16,
    flags_frag: u16,
    options: Vec<u8>,
    flow_label: u32,
    total_len: Option<u16>,
    ip_checksum: Option<u16>,
    l4: L4,
    l4_checksum: Option<u16>,
    payload: Vec<u8>,
}

impl Default for PacketBuilder {
    fn default() -> Self {
        PacketBuilder::new()
    }
}

impl PacketBuilder {
    /// An empty builder: zero MACs, no VLAN, no IP yet, TTL 64, TOS 0, id 0, no flags.
    pub fn new() -> PacketBuilder {
        PacketBuilder {
            src_mac: [0; 6],
            dst_mac: [0; 6],
            vlan: None,
            ethertype: None,
            ip: Ip::None,
            ttl: 64,
            tos: 0,
            id: 0,
            flags_frag: 0,
            options: Vec::new(),
            flow_label: 0,
            total_len: None,
            ip_checksum: None,
            l4: L4::None,
            l4_checksum: None,
            payload: Vec::new(),
        }
    }

    /// Source and destination MAC.
    pub fn eth(mut self, src: [u8; 6], dst: [u8; 6]) -> Self {
        self.src_mac = src;
        self.dst_mac = dst;
        self
    }

    /// Adds one 802.1Q tag with this VLAN id (PCP 0, DEI 0; `vid` is masked to 12 bits).
    pub fn vlan(mut self, vid: u16) -> Self {
        self.vlan = Some(vid & 0x0fff);
        self
    }

    /// Overrides the (inner) EtherType; by default it follows the IP version (IPv4 without
    /// IP layer).
    pub fn ethertype(mut self, ethertype: u16) -> Self {
        self.ethertype = Some(ethertype);
        self
    }

    /// An IPv4 header with these addresses.
    pub fn ipv4(mut self, src: Ipv4Addr, dst: Ipv4Addr) -> Self {
        self.ip = Ip::V4(src, dst);
        self
    }

    /// An IPv6 header with these addresses.
    pub fn ipv6(mut self, src: Ipv6Addr, dst: Ipv6Addr) -> Self {
        self.ip = Ip::V6(src, dst);
        self
    }

    /// IPv4 TTL / IPv6 hop limit.
    pub fn ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    /// IPv4 TOS / IPv6 traffic class.
    pub fn tos(mut self, tos: u8) -> Self {
        self.tos = tos;
        self
    }

    /// IPv4 identification.
    pub fn id(mut self, id: u16) -> Self {
        self.id = id;
        self
    }

    /// The raw IPv4 flags/fragment-offset word (e.g. `IP_MF | 185`).
    pub fn flags_frag(mut self, flags_frag: u16) -> Self {
        self.flags_frag = flags_frag;
        self
    }

    /// Sets the IPv4 DF flag.
    pub fn dont_fragment(mut self) -> Self {
        self.flags_frag |= IP_DF;
        self
    }

    /// Sets the IPv4 MF flag.
    pub fn more_fragments(mut self) -> Self {
        self.flags_frag |= IP_MF;
        self
    }

    /// IPv4 fragment offset in 8-byte units (masked to 13 bits).
    pub fn frag_offset(mut self, units: u16) -> Self {
        self.flags_frag = (self.flags_frag & 0xe000) | (units & 0x1fff);
        self
    }

    /// IPv4 options, zero-padded to a multiple of 4 and truncated to 40 bytes.
    pub fn ip_options(mut self, options: &[u8]) -> Self {
        self.options = options[..options.len().min(MAX_IPV4_OPTIONS)].to_vec();
        while !self.options.len().is_multiple_of(4) {
            self.options.push(0);
        }
        self
    }

    /// IPv6 flow label (masked to 20 bits).
    pub fn flow_label(mut self, label: u32) -> Self {
        self.flow_label = label & 0x000f_ffff;
        self
    }

    /// Overrides the IPv4 total length / IPv6 payload length field.
    pub fn ip_len_override(mut self, len: u16) -> Self {
        self.total_len = Some(len);
        self
    }

    /// Overrides the IPv4 header checksum.
    pub fn ip_checksum_override(mut self, csum: u16) -> Self {
        self.ip_checksum = Some(csum);
        self
    }

    /// A UDP header with this payload.
    pub fn udp(mut self, sport: u16, dport: u16, payload: &[u8]) -> Self {
        self.l4 = L4::Udp { sport, dport };
        self.payload = payload.to_vec();
        self
    }

    /// A TCP header (no options) with this payload.
    pub fn tcp(mut self, tcp: Tcp, payload: &[u8]) -> Self {
        self.l4 = L4::Tcp(tcp);
        self.payload = payload.to_vec();
        self
    }

    /// A raw payload after the IP header, with this protocol number (e.g. an inner packet
    /// with [`IPPROTO_IPIP`]). Without an IP layer the bytes follow the Ethernet header.
    pub fn raw(mut self, proto: u8, payload: &[u8]) -> Self {
        self.l4 = L4::Raw(proto);
        self.payload = payload.to_vec();
        self
    }

    /// Overrides the UDP/TCP checksum (e.g. 0 for "no UDP checksum").
    pub fn l4_checksum_override(mut self, csum: u16) -> Self {
        self.l4_checksum = Some(csum);
        self
    }

    /// The whole frame: Ethernet [+ VLAN] + IP + L4 + payload.
    pub fn build(&self) -> Vec<u8> {
        let l3 = self.build_ip();
        let ethertype = self.ethertype.unwrap_or(match self.ip {
            Ip::V6(..) => ETH_P_IPV6,
            Ip::V4(..) | Ip::None => ETH_P_IP,
        });
        let mut out = Vec::with_capacity(ETH_HLEN + VLAN_HLEN + l3.len());
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        if let Some(vid) = self.vlan {
            out.extend_from_slice(&ETH_P_8021Q.to_be_bytes());
            out.extend_from_slice(&vid.to_be_bytes());
        }
        out.extend_from_slice(&ethertype.to_be_bytes());
        out.extend_from_slice(&l3);
        out
    }

    /// Everything from the IP header on (no Ethernet), e.g. as the inner packet of a tunnel.
    /// Without an IP layer this is just the L4 segment.
    pub fn build_ip(&self) -> Vec<u8> {
        let proto = match self.l4 {
            L4::None => 0,
            L4::Udp { .. } => IPPROTO_UDP,
            L4::Tcp(_) => IPPROTO_TCP,
            L4::Raw(p) => p,
        };
        let mut seg = self.l4_segment();
        match self.ip {
            Ip::None => {
                // No pseudo-header to checksum against; only an explicit override applies.
                if let Some(off) = self.l4_checksum_offset() {
                    let csum = self.l4_checksum.unwrap_or(0);
                    seg[off..off + 2].copy_from_slice(&csum.to_be_bytes());
                }
                seg
            }
            Ip::V4(src, dst) => {
                let pseudo = pseudo_v4(src, dst, proto, seg.len());
                self.fill_l4_checksum(&mut seg, &pseudo);
                let hlen = IPV4_HLEN + self.options.len();
                let total = self
                    .total_len
                    .unwrap_or_else(|| u16::try_from(hlen + seg.len()).unwrap_or(u16::MAX));
                let mut ip = Vec::with_capacity(hlen + seg.len());
                // IHL fits: options are at most 40 bytes, so hlen / 4 <= 15.
                ip.push(0x40 | (hlen / 4) as u8);
                ip.push(self.tos);
                ip.extend_from_slice(&total.to_be_bytes());
                ip.extend_from_slice(&self.id.to_be_bytes());
                ip.extend_from_slice(&self.flags_frag.to_be_bytes());
                ip.push(self.ttl);
                ip.push(proto);
                ip.extend_from_slice(&[0, 0]);
                ip.extend_from_slice(&src.octets());
                ip.extend_from_slice(&dst.octets());
                ip.extend_from_slice(&self.options);
                let csum = self.ip_checksum.unwrap_or_else(|| ipv4_checksum(&ip));
                ip[10..12].copy_from_slice(&csum.to_be_bytes());
                ip.extend_from_slice(&seg);
                ip
            }
            Ip::V6(src, dst) => {
                let pseudo = pseudo_v6(src, dst, proto, seg.len());
                self.fill_l4_checksum(&mut seg, &pseudo);
                let plen = self
                    .total_len
                    .unwrap_or_else(|| u16::try_from(seg.len()).unwrap_or(u16::MAX));
                let word =
                    (6u32 << 28) | (u32::from(self.tos) << 20) | (self.flow_label & 0x000f_ffff);
                let mut ip = Vec::with_capacity(IPV6_HLEN + seg.len());
                ip.extend_from_slice(&word.to_be_bytes());
                ip.extend_from_slice(&plen.to_be_bytes());
                ip.push(proto);
                ip.push(self.ttl);
                ip.extend_from_slice(&src.octets());
                ip.extend_from_slice(&dst.octets());
                ip.extend_from_slice(&seg);
                ip
            }
        }
    }

    /// The L4 header (checksum zero) followed by the payload.
    fn l4_segment(&self) -> Vec<u8> {
        let mut seg = Vec::with_capacity(TCP_HLEN + self.payload.len());
        match self.l4 {
            L4::None | L4::Raw(_) => {}
            L4::Udp { sport, dport } => {
                let len = u16::try_from(UDP_HLEN + self.payload.len()).unwrap_or(u16::MAX);
                seg.extend_from_slice(&sport.to_be_bytes());
                seg.extend_from_slice(&dport.to_be_bytes());
                seg.extend_from_slice(&len.to_be_bytes());
                seg.extend_from_slice(&[0, 0]);
            }
            L4::Tcp(t) => {
                seg.extend_from_slice(&t.sport.to_be_bytes());
                seg.extend_from_slice(&t.dport.to_be_bytes());
                seg.extend_from_slice(&t.seq.to_be_bytes());
                seg.extend_from_slice(&t.ack.to_be_bytes());
                seg.push(((TCP_HLEN / 4) as u8) << 4);
                seg.push(t.flags);
                seg.extend_from_slice(&t.window.to_be_bytes());
                seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
            }
        }
        seg.extend_from_slice(&self.payload);
        seg
    }

    fn l4_checksum_offset(&self) -> Option<usize> {
        match self.l4 {
            L4::Udp { .. } => Some(6),
            L4::Tcp(_) => Some(16),
            L4::None | L4::Raw(_) => None,
        }
    }

    fn fill_l4_checksum(&self, seg: &mut [u8], pseudo: &[u8]) {
        let Some(off) = self.l4_checksum_offset() else {
            return;
        };
        let csum = self.l4_checksum.unwrap_or_else(|| {
            let c = finish(sum_words(sum_words(0, pseudo), seg));
            // A computed UDP checksum of 0 is sent as 0xffff (0 means "none").
            if c == 0 && matches!(self.l4, L4::Udp { .. }) {
                0xffff
            } else {
                c
            }
        });
        seg[off..off + 2].copy_from_slice(&csum.to_be_bytes());
    }
}

/// An ARP request (who-has `target_ip` tell `src_ip`), broadcast, 42 bytes (no padding).
pub fn arp_request(src_mac: [u8; 6], src_ip: Ipv4Addr, target_ip: Ipv4Addr) -> Vec<u8> {
    arp(1, src_mac, src_ip, BROADCAST_MAC, [0; 6], target_ip)
}

/// An ARP reply (`src_ip` is-at `src_mac`) to `dst_mac`/`dst_ip`, 42 bytes (no padding).
pub fn arp_reply(
    src_mac: [u8; 6],
    src_ip: Ipv4Addr,
    dst_mac: [u8; 6],
    dst_ip: Ipv4Addr,
) -> Vec<u8> {
    arp(2, src_mac, src_ip, dst_mac, dst_mac, dst_ip)
}

fn arp(
    op: u16,
    sha: [u8; 6],
    spa: Ipv4Addr,
    eth_dst: [u8; 6],
    tha: [u8; 6],
    tpa: Ipv4Addr,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(ETH_HLEN + 28);
    out.extend_from_slice(&eth_dst);
    out.extend_from_slice(&sha);
    out.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    out.extend_from_slice(&1u16.to_be_bytes()); // hardware type Ethernet
    out.extend_from_slice(&ETH_P_IP.to_be_bytes()); // protocol type IPv4
    out.push(6);
    out.push(4);
    out.extend_from_slice(&op.to_be_bytes());
    out.extend_from_slice(&sha);
    out.extend_from_slice(&spa.octets());
    out.extend_from_slice(&tha);
    out.extend_from_slice(&tpa.octets());
    out
}

/// Adds `data` as big-endian 16-bit words (odd tail zero-padded) to a running sum.
fn sum_words(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([w[0], w[1]])));
        // Fold early so the sum never overflows, however long the input.
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

/// Folds to 16 bits and complements.
fn finish(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // After folding, `sum` fits in 16 bits.
    !(sum as u16)
}

/// The Internet checksum (RFC 1071) of `data`: over an IPv4 header whose checksum field is
/// zero this is the value to put there; over a header with a correct checksum it is 0.
pub fn ipv4_checksum(data: &[u8]) -> u16 {
    finish(sum_words(0, data))
}

/// Whether `ip` starts with an IPv4 header (options included, per IHL) whose checksum is right.
pub fn verify_ipv4_header_checksum(ip: &[u8]) -> bool {
    let Some(hlen) = ipv4_header_len(ip) else {
        return false;
    };
    ipv4_checksum(&ip[..hlen]) == 0
}

fn ipv4_header_len(ip: &[u8]) -> Option<usize> {
    let first = *ip.first()?;
    let hlen = usize::from(first & 0x0f) * 4;
    (first >> 4 == 4 && hlen >= IPV4_HLEN && ip.len() >= hlen).then_some(hlen)
}

fn pseudo_v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.push(0);
    p.push(proto);
    p.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_be_bytes());
    p
}

fn pseudo_v6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, proto]);
    p
}

/// Whether the UDP/TCP/ICMP/ICMPv6 checksum of an IP packet (IPv4 or IPv6, starting at the
/// IP header) is right. The L4 length comes from the IP length field. An IPv4 UDP checksum
/// of 0 ("none") counts as right. False for truncated packets, non-first fragments, IPv6
/// extension headers and other protocols.
pub fn l4_checksum_ok(ip: &[u8]) -> bool {
    let Some(&first) = ip.first() else {
        return false;
    };
    let (proto, seg, pseudo) = match first >> 4 {
        4 => {
            let Some(hlen) = ipv4_header_len(ip) else {
                return false;
            };
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let frag = u16::from_be_bytes([ip[6], ip[7]]);
            if total < hlen || total > ip.len() || frag & 0x1fff != 0 {
                return false;
            }
            let proto = ip[9];
            let seg = &ip[hlen..total];
            let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            if proto == IPPROTO_UDP && seg.len() >= UDP_HLEN && seg[6..8] == [0, 0] {
                return true;
            }
            let pseudo = if proto == IPPROTO_ICMP {
                Vec::new()
            } else {
                pseudo_v4(src, dst, proto, seg.len())
            };
            (proto, seg, pseudo)
        }
        6 => {
            if ip.len() < IPV6_HLEN {
                return false;
            }
            let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if IPV6_HLEN + plen > ip.len() {
                return false;
            }
            let proto = ip[6];
            let seg = &ip[IPV6_HLEN..IPV6_HLEN + plen];
            let mut a = [0u8; 16];
            a.copy_from_slice(&ip[8..24]);
            let src = Ipv6Addr::from(a);
            a.copy_from_slice(&ip[24..40]);
            let dst = Ipv6Addr::from(a);
            (proto, seg, pseudo_v6(src, dst, proto, seg.len()))
        }
        _ => return false,
    };
    let min_len = match proto {
        IPPROTO_UDP => UDP_HLEN,
        IPPROTO_TCP => TCP_HLEN,
        IPPROTO_ICMP | IPPROTO_ICMPV6 => 4,
        _ => return false,
    };
    seg.len() >= min_len && finish(sum_words(sum_words(0, &pseudo), seg)) == 0
}

/// Splits an Ethernet frame into its (innermost) EtherType and the L3 bytes, skipping up to
/// two VLAN tags (802.1Q / 802.1ad). `None` if the frame is too short.
pub fn frame_l3(frame: &[u8]) -> Option<(u16, &[u8])> {
    let mut off = 12;
    for _ in 0..3 {
        let et = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
        if et == ETH_P_8021Q || et == 0x88a8 {
            off += VLAN_HLEN;
            continue;
        }
        return Some((et, frame.get(off + 2..)?));
    }
    None
}

/// Formats bytes as hex, 16 per line, for readable assertion failures.
pub fn hexdump(bytes: &[u8]) -> String {
    bytes
        .chunks(16)
        .enumerate()
        .map(|(i, line)| {
            let hex: Vec<String> = line.iter().map(|b| format!("{b:02x}")).collect();
            format!("{:04x}  {}", i * 16, hex.join(" "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// ICMPv6 Neighbor Solicitation (RFC 4861 4.3).
pub const ND_NEIGHBOR_SOLICIT: u8 = 135;
/// ICMPv6 Neighbor Advertisement (RFC 4861 4.4).
pub const ND_NEIGHBOR_ADVERT: u8 = 136;
/// ND option: Source Link-Layer Address.
pub const ND_OPT_SOURCE_LLA: u8 = 1;
/// ND option: Target Link-Layer Address.
pub const ND_OPT_TARGET_LLA: u8 = 2;

/// The ICMPv6 checksum of `msg` (its checksum field zero) from `src` to `dst`: the value to
/// put in bytes 2..4.
pub fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> u16 {
    let pseudo = pseudo_v6(src, dst, IPPROTO_ICMPV6, msg.len());
    finish(sum_words(sum_words(0, &pseudo), msg))
}

/// The solicited-node multicast address of `addr` (ff02::1:ffXX:XXXX, RFC 4291 2.7.1).
pub fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    let mut a = [0u8; 16];
    a[0] = 0xff;
    a[1] = 0x02;
    a[11] = 0x01;
    a[12] = 0xff;
    a[13..].copy_from_slice(&o[13..]);
    Ipv6Addr::from(a)
}

/// The Ethernet address of an IPv6 multicast group (33:33 and its last four bytes, RFC 2464 7).
pub fn ipv6_multicast_mac(group: Ipv6Addr) -> [u8; 6] {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// A Source or Target Link-Layer Address option ([`ND_OPT_SOURCE_LLA`],
/// [`ND_OPT_TARGET_LLA`]) for an Ethernet address.
pub fn nd_lla_option(kind: u8, mac: [u8; 6]) -> [u8; 8] {
    [kind, 1, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]]
}

/// An ICMPv6 Neighbor Solicitation for `target` from `src` to `dst` (the solicited-node group
/// of `target`, or `target` itself for a unicast probe), hop limit 255, followed by `options`
/// (e.g. [`nd_lla_option`]); the checksum is filled in. Ethernet: `src_mac` to `dst_mac`.
/// A builder, so a test can add a VLAN tag or change the hop limit (which the checksum does
/// not cover).
pub fn neighbor_solicit(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    target: Ipv6Addr,
    options: &[u8],
) -> PacketBuilder {
    let mut msg = vec![ND_NEIGHBOR_SOLICIT, 0, 0, 0, 0, 0, 0, 0];
    msg.extend_from_slice(&target.octets());
    msg.extend_from_slice(options);
    let c = icmpv6_checksum(src, dst, &msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    PacketBuilder::new()
        .eth(src_mac, dst_mac)
        .ipv6(src, dst)
        .ttl(255)
        .raw(IPPROTO_ICMPV6, &msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    const C1: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);

    #[test]
    fn rfc_style_ipv4_header_checksum() {
        // The classic example header: checksum b861.
        let mut header = hex("4500 0073 0000 4000 4011 0000 c0a8 0001 c0a8 00c7");
        assert_eq!(ipv4_checksum(&header), 0xb861);
        header[10..12].copy_from_slice(&[0xb8, 0x61]);
        assert!(verify_ipv4_header_checksum(&header));
        header[8] = 0x3f; // TTL changed, checksum now stale
        assert!(!verify_ipv4_header_checksum(&header));
    }

    #[test]
    fn builder_reproduces_the_example_header() {
        // Total length 0x73 = 20 + 8 + 87 bytes of payload.
        let ip = PacketBuilder::new()
            .ipv4(
                Ipv4Addr::new(192, 168, 0, 1),
                Ipv4Addr::new(192, 168, 0, 199),
            )
            .dont_fragment()
            .udp(1, 2, &[0u8; 87])
            .build_ip();
        assert_eq!(
            ip[..20],
            hex("4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7")[..]
        );
    }

    #[test]
    fn udp_checksum_known_value() {
        // By hand: c612+0001+c612+0064+0011+000a (pseudo) + 03e8+0050+000a+6869 = 1f94f,
        // folded f950, complemented 06af.
        let frame = PacketBuilder::new()
            .eth([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4(C1, VIP)
            .udp(1000, 80, b"hi")
            .build();
        assert_eq!(
            frame,
            hex("020000000002 020000000001 0800
                 4500 001e 0000 0000 4011 ee45 c612 0001 c612 0064
                 03e8 0050 000a 06af 6869")
        );
        assert!(verify_ipv4_header_checksum(&frame[14..]));
        assert!(l4_checksum_ok(&frame[14..]));
    }

    #[test]
    fn tcp_checksum_known_value() {
        let ip = PacketBuilder::new()
            .ipv4(C1, VIP)
            .tcp(
                Tcp {
                    sport: 40000,
                    dport: 80,
                    seq: 1,
                    ..Tcp::default()
                },
                &[],
            )
            .build_ip();
        assert_eq!(
            ip[20..],
            hex("9c40 0050 0000 0001 0000 0000 5002 faf0 8bd6 0000")[..]
        );
        assert!(l4_checksum_ok(&ip));
        let mut bad = ip.clone();
        bad[25] ^= 1;
        assert!(!l4_checksum_ok(&bad));
    }

    #[test]
    fn vlan_options_and_odd_payload() {
        let frame = PacketBuilder::new()
            .vlan(42)
            .ipv4(C1, VIP)
            .ttl(3)
            .tos(0x10)
            .id(7)
            .ip_options(&[0x94, 0x04, 0, 0, 1]) // router alert + 1 byte, padded to 8
            .udp(5, 6, b"odd")
            .build();
        assert_eq!(frame[12..18], [0x81, 0x00, 0x00, 42, 0x08, 0x00]);
        let (et, ip) = frame_l3(&frame).unwrap();
        assert_eq!(et, ETH_P_IP);
        assert_eq!(ip[0], 0x47);
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, 28 + 8 + 3);
        assert!(verify_ipv4_header_checksum(ip));
        assert!(l4_checksum_ok(ip));
    }

    #[test]
    fn zero_udp_checksum_and_overrides() {
        let ip = PacketBuilder::new()
            .ipv4(C1, VIP)
            .udp(5, 6, b"x")
            .l4_checksum_override(0)
            .build_ip();
        assert_eq!(ip[26..28], [0, 0]);
        assert!(l4_checksum_ok(&ip));
        let ip = PacketBuilder::new()
            .ipv4(C1, VIP)
            .ip_checksum_override(0x1234)
            .ip_len_override(1000)
            .udp(5, 6, b"x")
            .build_ip();
        assert!(!verify_ipv4_header_checksum(&ip));
        assert!(!l4_checksum_ok(&ip), "length beyond buffer");
    }

    #[test]
    fn ipip_nesting() {
        let inner = PacketBuilder::new()
            .ipv4(C1, VIP)
            .udp(1, 2, b"in")
            .build_ip();
        let frame = PacketBuilder::new()
            .ipv4(Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(198, 18, 0, 11))
            .raw(IPPROTO_IPIP, &inner)
            .build();
        let (_, outer) = frame_l3(&frame).unwrap();
        assert_eq!(outer[9], IPPROTO_IPIP);
        assert_eq!(&outer[20..], &inner[..]);
        assert!(verify_ipv4_header_checksum(outer));
    }

    #[test]
    fn ipv6_udp_and_tcp() {
        let src: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8::100".parse().unwrap();
        let frame = PacketBuilder::new()
            .ipv6(src, dst)
            .flow_label(0x12345)
            .udp(1000, 80, b"hello")
            .build();
        assert_eq!(frame[12..14], [0x86, 0xdd]);
        let ip = &frame[14..];
        assert_eq!(ip[..4], [0x60, 0x01, 0x23, 0x45]);
        assert_eq!(u16::from_be_bytes([ip[4], ip[5]]), 13);
        assert!(l4_checksum_ok(ip));
        let ip = PacketBuilder::new()
            .ipv6(src, dst)
            .tcp(Tcp::default(), b"x")
            .build_ip();
        assert!(l4_checksum_ok(&ip));
    }

    #[test]
    fn arp_request_layout() {
        let f = arp_request([2, 0, 0, 0, 0, 1], C1, Ipv4Addr::new(198, 18, 0, 2));
        assert_eq!(
            f,
            hex("ffffffffffff 020000000001 0806 0001 0800 06 04 0001
                 020000000001 c6120001 000000000000 c6120002")
        );
    }

    #[test]
    fn neighbor_solicit_layout() {
        let src: Ipv6Addr = "2001:db8:1::1".parse().unwrap();
        let target: Ipv6Addr = "2001:db8::100".parse().unwrap();
        let group = solicited_node(target);
        assert_eq!(group, "ff02::1:ff00:100".parse::<Ipv6Addr>().unwrap());
        let mac = [2, 0, 0, 0, 0, 1];
        let f = neighbor_solicit(
            mac,
            ipv6_multicast_mac(group),
            src,
            group,
            target,
            &nd_lla_option(ND_OPT_SOURCE_LLA, mac),
        )
        .build();
        // Checksum computed separately (Python, RFC 1071 over the pseudo-header).
        assert_eq!(
            f,
            hex("3333ff000100 020000000001 86dd
                 60000000 0020 3a ff
                 20010db8000100000000000000000001 ff0200000000000000000001ff000100
                 87 00 1a2a 00000000 20010db8000000000000000000000100
                 01 01 020000000001")
        );
        assert!(l4_checksum_ok(&f[ETH_HLEN..]));
    }
}
