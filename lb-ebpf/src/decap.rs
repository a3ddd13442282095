//! Backend side: remove the outer IPv4 header of IPIP packets and hand the inner packet to
//! the stack, so no ipip kernel module is needed.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{PROTO_IPIP, Reason};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::Ipv4Hdr,
};

use crate::{
    Verdict,
    parse::{parse_l2, ptr_at},
};

#[inline(always)]
pub fn try_decap(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    let l2 = parse_l2(ctx).ok_or(Verdict::pass(Reason::PassMalformed))?;
    if l2.ether_type != EtherType::Ipv4 as u16 {
        return Err(Verdict::pass(Reason::PassNotIp));
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, l2.l3_off).ok_or(Verdict::pass(Reason::PassMalformed))?;
    // SAFETY: `ptr_at` checked bounds.
    let (vihl, proto, frags) = unsafe { ((*ip).vihl, (*ip).proto, (*ip).frags) };
    if proto != PROTO_IPIP {
        return Err(Verdict::pass(Reason::PassNotVip));
    }
    // A fragmented outer packet must be reassembled by the stack first.
    if frags[0] & 0x3f != 0 || frags[1] != 0 {
        return Err(Verdict::pass(Reason::PassFragment));
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(Verdict::pass(Reason::PassMalformed));
    }
    // The inner header must at least start with an IPv4 version nibble.
    let inner: *const u8 =
        ptr_at(ctx, l2.l3_off + ihl).ok_or(Verdict::pass(Reason::PassMalformed))?;
    // SAFETY: `ptr_at` checked bounds.
    if unsafe { *inner } >> 4 != 4 {
        return Err(Verdict::pass(Reason::PassMalformed));
    }

    // Keep the L2 header, move it forward over the outer IP header.
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Verdict::pass(Reason::PassMalformed))?;
    // SAFETY: `ptr_at` checked bounds.
    let (dst, src) = unsafe { ((*eth).dst_addr, (*eth).src_addr) };
    let vlan_tci = l2.vlan_tci;
    // SAFETY: helper call on our own context; every pointer is re-derived afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, ihl as i32) } != 0 {
        return Err(Verdict::pass(Reason::PassMalformed));
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Verdict::drop(Reason::PassMalformed))?;
    // SAFETY: as above.
    unsafe {
        (*eth).dst_addr = dst;
        (*eth).src_addr = src;
    }
    match vlan_tci {
        None => unsafe { (*eth).ether_type = EtherType::Ipv4 as u16 },
        Some(tci) => {
            let vlan: *mut network_types::vlan::VlanHdr =
                ptr_at(ctx, EthHdr::LEN).ok_or(Verdict::drop(Reason::PassMalformed))?;
            // SAFETY: as above.
            unsafe {
                (*eth).ether_type = EtherType::Ieee8021q as u16;
                (*vlan).tci = tci;
                (*vlan).ether_type = EtherType::Ipv4 as u16;
            }
        }
    }
    Ok(Verdict::pass(Reason::DecapPass))
}
