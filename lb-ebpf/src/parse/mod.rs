//! Bounds-checked header access. Every read of packet memory goes through [`ptr_at`].

mod eth;
mod ipv4;
mod l4;

pub use eth::{L2, parse_l2};
pub use ipv4::parse_v4;

use aya_ebpf::programs::XdpContext;

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

/// The parts of an IPv4 TCP/UDP packet the load balancer decides on. Addresses and ports
/// stay in network byte order.
pub struct PacketV4 {
    pub l2: L2,
    /// Offset of the IPv4 header.
    pub l3_off: usize,
    pub src_be: [u8; 4],
    pub dst_be: [u8; 4],
    pub sport_be: [u8; 2],
    pub dport_be: [u8; 2],
    pub proto: u8,
    pub tos: u8,
    /// IPv4 total length (host order).
    pub tot_len: u16,
    /// The inner packet's DF bit, copied into an outer header.
    pub dont_fragment: bool,
    /// A TCP SYN without ACK: the first packet of a connection.
    pub tcp_syn: bool,
}
