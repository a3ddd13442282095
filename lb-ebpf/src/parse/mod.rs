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

use crate::Verdict;

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

/// The parts of a TCP/UDP packet (IPv4 or IPv6) the load balancer decides on. Addresses and
/// ports stay in network byte order; IPv4 addresses fill the first four bytes.
pub struct Packet {
    pub l2: L2,
    /// Offset of the IP header.
    pub l3_off: usize,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub src_be: [u8; 16],
    pub dst_be: [u8; 16],
    pub sport_be: [u8; 2],
    pub dport_be: [u8; 2],
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

/// The source and destination of an IPv6 header, each folded into one word, read as words
/// straight from the packet. `ip` must have been bounds-checked (by [`ptr_at`]) for the whole
/// header: the reads go through it, so the verifier sees them covered by that check.
#[inline(always)]
pub fn fold_addrs_v6(ip: *const network_types::ip::Ipv6Hdr) -> (u32, u32) {
    // SAFETY: the header lies inside the packet (caller's check); addresses start at byte 8;
    // unaligned packet loads are allowed.
    let w = unsafe { core::ptr::read_unaligned(ip.cast::<u8>().add(8).cast::<[u32; 8]>()) };
    (
        lb_common::hash::fold_v6_words([w[0], w[1], w[2], w[3]]),
        lb_common::hash::fold_v6_words([w[4], w[5], w[6], w[7]]),
    )
}

/// An ICMP/ICMPv6 echo request, to be answered if its destination is a VIP.
pub struct Echo {
    pub l3_off: usize,
    pub family: u8,
    pub dst_be: [u8; 16],
    /// Offset of the ICMP header.
    pub icmp_off: usize,
}

/// What the load balancer may act on.
pub enum Parsed {
    Flow(Packet),
    Echo(Echo),
}

/// Parse Ethernet, IPv4 or IPv6, then TCP, UDP or ICMP. Anything else is not ours: `Err`
/// with a pass verdict, and the packet untouched.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Parsed, Verdict> {
    let l2 = parse_l2(ctx).ok_or(Verdict::pass(Reason::PassMalformed))?;
    if l2.ether_type == EtherType::Ipv4 as u16 {
        ipv4::parse(ctx, l2)
    } else if l2.ether_type == EtherType::Ipv6 as u16 {
        ipv6::parse(ctx, l2)
    } else {
        Err(Verdict::pass(Reason::PassNotIp))
    }
}
