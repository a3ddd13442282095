//! IPv4 in front of TCP or UDP.

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V4, PROTO_ICMP, PROTO_TCP, PROTO_UDP, Reason};
use network_types::ip::Ipv4Hdr;

use super::{L2, Packet, Parsed, icmp, l4, ptr_at};
use crate::Verdict;

const IP_MF: u8 = 0x20;
const IP_DF: u8 = 0x40;
const IP_OFFSET_HI: u8 = 0x1f;

#[inline(always)]
pub fn parse(ctx: &XdpContext, l2: L2) -> Result<Parsed, Verdict> {
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
    if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_ICMP {
        return Err(Verdict::pass(Reason::PassNotVip));
    }
    let fragment = ip.frags[0] & (IP_MF | IP_OFFSET_HI) != 0 || ip.frags[1] != 0;
    if fragment && proto == PROTO_ICMP {
        return Err(Verdict::pass(Reason::PassFragment));
    }
    // SAFETY: `ptr_at` checked the fixed header.
    let (src_w, dst_w) = unsafe { super::addrs_v4(ip) };
    let (src, dst) = ([src_w, 0, 0, 0], [dst_w, 0, 0, 0]);
    if fragment {
        if l3_off + tot_len as usize > ctx.data_end() - ctx.data() {
            return Err(Verdict::pass(Reason::PassMalformed));
        }
        return Ok(Parsed::Unusual(Packet {
            l2,
            l3_off,
            family: FAMILY_V4,
            src,
            dst,
            ports: 0,
            src_fold: src_w,
            dst_fold: dst_w,
            proto,
            tos: ip.tos,
            l3_len: tot_len,
            dont_fragment: false,
            tcp_syn: false,
            l4_off: l3_off + ihl,
            icmp_error: false,
            fragment: true,
        }));
    }
    if proto == PROTO_ICMP {
        let outer = icmp::Outer {
            l2,
            l3_off,
            l4_off: l3_off + ihl,
            l3_len: tot_len,
            tos: ip.tos,
            dont_fragment: ip.frags[0] & IP_DF != 0,
            dst,
        };
        let parsed = icmp::parse_v4(ctx, outer)?;
        // Last, for the reason given below for TCP/UDP.
        if l3_off + tot_len as usize > ctx.data_end() - ctx.data() {
            return Err(Verdict::pass(Reason::PassMalformed));
        }
        return Ok(parsed);
    }
    let (ports, tcp_syn) = l4::ports(ctx, l3_off + ihl, proto, l3_off + tot_len as usize)
        .ok_or(Verdict::pass(Reason::PassMalformed))?;
    // Checked only after the L4 header was read through `ptr_at`: done first, it would let
    // the compiler drop that bounds check as implied, and the verifier cannot follow that.
    if l3_off + tot_len as usize > ctx.data_end() - ctx.data() {
        return Err(Verdict::pass(Reason::PassMalformed));
    }
    Ok(Parsed::Flow4(Packet {
        l2,
        l3_off,
        family: FAMILY_V4,
        src,
        dst,
        ports,
        src_fold: src_w,
        dst_fold: dst_w,
        proto,
        tos: ip.tos,
        l3_len: tot_len,
        dont_fragment: ip.frags[0] & IP_DF != 0,
        tcp_syn,
        l4_off: l3_off + ihl,
        icmp_error: false,
        fragment: false,
    }))
}
