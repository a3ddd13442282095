//! TCP and UDP: only the ports are needed, but the whole fixed header must be present.

use aya_ebpf::programs::XdpContext;
use lb_common::PROTO_TCP;
use network_types::{tcp::TcpHdr, udp::UdpHdr};

use super::ptr_at;
use crate::words;

const TCP_FLAGS_OFF: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Source and destination port of the TCP/UDP header at `off` (the header's first word, as
/// it is in memory), which must end before `l3_end` (the end of the IP packet), and whether
/// it is a TCP SYN.
#[inline(always)]
pub fn ports(ctx: &XdpContext, off: usize, proto: u8, l3_end: usize) -> Option<(u32, bool)> {
    if proto == PROTO_TCP {
        if off + TcpHdr::LEN > l3_end {
            return None;
        }
        let tcp: *const TcpHdr = ptr_at(ctx, off)?;
        // SAFETY: `ptr_at` checked bounds for the whole fixed header, flags included.
        unsafe {
            let flags = *(tcp as *const u8).add(TCP_FLAGS_OFF);
            let syn = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            Some((words::load32::<0>(tcp.cast()), syn))
        }
    } else {
        if off + UdpHdr::LEN > l3_end {
            return None;
        }
        let udp: *const UdpHdr = ptr_at(ctx, off)?;
        // SAFETY: `ptr_at` checked bounds.
        unsafe { Some((words::load32::<0>(udp.cast()), false)) }
    }
}
