//! Bounds-checked header access. Every read of packet memory goes through [`ptr_at`].

mod eth;
mod icmp;
mod ipv4;
mod ipv6;
mod l4;

pub use eth::{L2, parse_l2};

use aya_ebpf::programs::XdpContext;
use lb_common::Reason;
use network_types::eth::EtherType;

use crate::{
    Verdict,
    words::{load_addr, load32},
};

/// A pointer to a `T` at `off` bytes into the packet, if the whole `T` lies inside it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// A 16-byte address as the four words it is in memory (network byte order stays); an IPv4
/// address is the first word, the others zero (as `lb_common::addr16_v4` lays it out).
pub type AddrWords = [u32; 4];

/// The bytes of an address held as words.
#[inline(always)]
pub fn addr_bytes(w: AddrWords) -> [u8; 16] {
    let b = |i: usize| w[i].to_ne_bytes();
    let (a, c, d, e) = (b(0), b(1), b(2), b(3));
    [
        a[0], a[1], a[2], a[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3], e[0], e[1], e[2],
        e[3],
    ]
}

/// The parts of a TCP/UDP packet (IPv4 or IPv6) the load balancer decides on, held as the
/// words they are in the packet (network byte order), so keys are built from whole words.
pub struct Packet {
    pub l2: L2,
    /// Offset of the IP header.
    pub l3_off: usize,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub src: AddrWords,
    pub dst: AddrWords,
    /// Source and destination port, as the word they are in the L4 header.
    pub ports: u32,
    /// The addresses folded into one word each (`hash::fold_v6_words`), for the flow hash
    /// and the service index: IPv6 only (IPv4: the address word itself).
    pub src_fold: u32,
    pub dst_fold: u32,
    pub proto: u8,
    /// IPv4 TOS or IPv6 traffic class, copied into an outer header.
    pub tos: u8,
    /// Length of the whole IP packet, headers included (host order).
    pub l3_len: u16,
    /// IPv4 DF bit (always set for IPv6, which routers never fragment); copied into an
    /// outer IPv4 header so PMTU discovery keeps working.
    pub dont_fragment: bool,
    /// A TCP SYN without ACK: the first packet of a connection.
    pub tcp_syn: bool,
    /// Offset of the L4 header (of the ICMP header for an ICMP error).
    pub l4_off: usize,
    /// An ICMP/ICMPv6 error about a VIP flow: the 5-tuple fields above are those of the flow
    /// (client → VIP), read from the quoted header; the frame is the ICMP packet.
    pub icmp_error: bool,
    /// A TCP/UDP fragment (first or later): no ports (both zero here), so it is balanced by
    /// addresses and protocol only, through the service that takes the VIP's fragments.
    pub fragment: bool,
}

impl Packet {
    /// The source port as `u16::from_ne_bytes` of its bytes (network byte order).
    #[inline(always)]
    pub fn sport_be(&self) -> u16 {
        let b = self.ports.to_ne_bytes();
        u16::from_ne_bytes([b[0], b[1]])
    }

    /// The destination port, as [`Packet::sport_be`].
    #[inline(always)]
    pub fn dport_be(&self) -> u16 {
        let b = self.ports.to_ne_bytes();
        u16::from_ne_bytes([b[2], b[3]])
    }
}

/// The source and destination address of the IPv6 header at `ip`, as words.
///
/// # Safety
///
/// `ip` must have been bounds-checked (by [`ptr_at`]) for the whole fixed header: the loads
/// go through it, so the verifier sees them covered by that check.
#[inline(always)]
pub unsafe fn addrs_v6(ip: *const network_types::ip::Ipv6Hdr) -> (AddrWords, AddrWords) {
    let p = ip.cast::<u8>();
    // SAFETY: caller's contract; the addresses are bytes 8..40 of the header.
    unsafe { (load_addr::<8>(p), load_addr::<24>(p)) }
}

/// The source and destination address words of the IPv4 header at `ip`.
///
/// # Safety
///
/// As for [`addrs_v6`], for the fixed IPv4 header.
#[inline(always)]
pub unsafe fn addrs_v4(ip: *const network_types::ip::Ipv4Hdr) -> (u32, u32) {
    let p = ip.cast::<u8>();
    // SAFETY: caller's contract; the addresses are bytes 12..20 of the header.
    unsafe { (load32::<12>(p), load32::<16>(p)) }
}

/// An ICMP/ICMPv6 echo request, to be answered if its destination is a VIP.
pub struct Echo {
    pub l3_off: usize,
    pub family: u8,
    pub dst: AddrWords,
    /// Offset of the ICMP header.
    pub icmp_off: usize,
}

/// What the load balancer may act on. The common cases have variants of their own, so the
/// caller handles each in a copy of the code of its own: merged into one, every `Packet`
/// field costs moves between stack slots where the paths join.
pub enum Parsed {
    /// A whole TCP/UDP packet over IPv4.
    Flow4(Packet),
    /// A whole TCP/UDP packet over IPv6.
    Flow6(Packet),
    /// A TCP/UDP fragment, or an ICMP error about a flow (`Packet::fragment`,
    /// `Packet::icmp_error`).
    Unusual(Packet),
    Echo(Echo),
}

/// Parse Ethernet, IPv4 or IPv6, then TCP, UDP or ICMP. Anything else is not ours: `Err`
/// with a pass verdict, and the packet untouched; ARP and Neighbor Solicitations with the
/// internal verdicts that send them to `announce`.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Parsed, Verdict> {
    let l2 = parse_l2(ctx).ok_or(Verdict::pass(Reason::PassMalformed))?;
    if l2.ether_type == EtherType::Ipv4 as u16 {
        ipv4::parse(ctx, l2)
    } else if l2.ether_type == EtherType::Ipv6 as u16 {
        ipv6::parse(ctx, l2)
    } else if l2.ether_type == EtherType::Arp as u16 {
        Err(Verdict::arp())
    } else {
        Err(Verdict::pass(Reason::PassNotIp))
    }
}
