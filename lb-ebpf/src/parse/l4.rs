//! TCP and UDP: only the ports are needed, but the whole fixed header must be present.

use aya_ebpf::programs::XdpContext;
use lb_common::PROTO_TCP;
use network_types::{tcp::TcpHdr, udp::UdpHdr};

use super::ptr_at;

/// Source and destination port (network byte order) of the TCP/UDP header at `off`, which
/// must end before `l3_end` (the end of the IP packet).
#[inline(always)]
pub fn ports(ctx: &XdpContext, off: usize, proto: u8, l3_end: usize) -> Option<([u8; 2], [u8; 2])> {
    if proto == PROTO_TCP {
        if off + TcpHdr::LEN > l3_end {
            return None;
        }
        let tcp: *const TcpHdr = ptr_at(ctx, off)?;
        // SAFETY: `ptr_at` checked bounds.
        unsafe { Some(((*tcp).source, (*tcp).dest)) }
    } else {
        if off + UdpHdr::LEN > l3_end {
            return None;
        }
        let udp: *const UdpHdr = ptr_at(ctx, off)?;
        // SAFETY: `ptr_at` checked bounds.
        unsafe { Some(((*udp).src, (*udp).dst)) }
    }
}
