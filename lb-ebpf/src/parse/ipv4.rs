//! IPv4 in front of TCP or UDP.

use aya_ebpf::programs::XdpContext;
use lb_common::{PROTO_TCP, PROTO_UDP, Reason};
use network_types::{eth::EtherType, ip::Ipv4Hdr};

use super::{PacketV4, l4, parse_l2, ptr_at};
use crate::Verdict;

const IP_MF: u8 = 0x20;
const IP_DF: u8 = 0x40;
const IP_OFFSET_HI: u8 = 0x1f;

/// Parse Ethernet/IPv4/(TCP|UDP). Anything else is not ours: `Err` with a pass verdict.
#[inline(always)]
pub fn parse_v4(ctx: &XdpContext) -> Result<PacketV4, Verdict> {
    let l2 = parse_l2(ctx).ok_or(Verdict::pass(Reason::PassMalformed))?;
    if l2.ether_type != EtherType::Ipv4 as u16 {
        return Err(Verdict::pass(Reason::PassNotIp));
    }
    let l3_off = l2.l3_off;
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3_off).ok_or(Verdict::pass(Reason::PassMalformed))?;
    // SAFETY: `ptr_at` checked that the fixed header lies inside the packet.
    let ip = unsafe { &*ip };
    if ip.vihl >> 4 != 4 {
        return Err(Verdict::pass(Reason::PassMalformed));
    }
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    let tot_len = u16::from_be_bytes(ip.tot_len);
    if ihl < Ipv4Hdr::LEN || (tot_len as usize) < ihl {
        return Err(Verdict::pass(Reason::PassMalformed));
    }
    let proto = ip.proto;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Verdict::pass(Reason::PassNotVip));
    }
    if ip.frags[0] & (IP_MF | IP_OFFSET_HI) != 0 || ip.frags[1] != 0 {
        return Err(Verdict::pass(Reason::PassFragment));
    }
    let (sport_be, dport_be, tcp_syn) =
        l4::ports(ctx, l3_off + ihl, proto, l3_off + tot_len as usize)
            .ok_or(Verdict::pass(Reason::PassMalformed))?;
    // Checked only after the L4 header was read through `ptr_at`: done first, it would let
    // the compiler drop that bounds check as implied, and the verifier cannot follow that.
    if l3_off + tot_len as usize > ctx.data_end() - ctx.data() {
        return Err(Verdict::pass(Reason::PassMalformed));
    }
    Ok(PacketV4 {
        l2,
        l3_off,
        src_be: ip.src_addr,
        dst_be: ip.dst_addr,
        sport_be,
        dport_be,
        proto,
        tos: ip.tos,
        tot_len,
        dont_fragment: ip.frags[0] & IP_DF != 0,
        tcp_syn,
    })
}
