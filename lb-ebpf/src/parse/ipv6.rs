//! IPv6 in front of TCP or UDP, through at most four extension headers.
//!
//! Hop-by-hop, routing and destination options, and AH are skipped by their length fields;
//! an atomic fragment header (offset 0, no more fragments) is skipped too. A real fragment,
//! ESP, or anything else ends the parse: the packet is passed, untouched, never misread.

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V6, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, Reason, hash::fold_v6_words};
use network_types::ip::Ipv6Hdr;

use super::{L2, Packet, Parsed, icmp, l4, ptr_at};
use crate::Verdict;

const HOPOPTS: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AH: u8 = 51;
const DSTOPTS: u8 = 60;
const MAX_EXT_HEADERS: usize = 4;

#[inline(always)]
pub fn parse(ctx: &XdpContext, l2: L2) -> Result<Parsed, Verdict> {
    let l3_off = l2.l3_off;
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3_off).ok_or(Verdict::pass(Reason::PassMalformed))?;
    // SAFETY: `ptr_at` checked that the fixed header lies inside the packet.
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return Err(Verdict::pass(Reason::PassMalformed));
    }
    let payload_len = u16::from_be_bytes(ip.payload_len);
    if payload_len == 0 {
        // A jumbogram, or garbage: not ours to decide.
        return Err(Verdict::pass(Reason::PassMalformed));
    }
    let l3_len = Ipv6Hdr::LEN as u32 + payload_len as u32;
    if l3_len > 0xffff {
        return Err(Verdict::pass(Reason::PassMalformed));
    }
    // SAFETY: `ptr_at` checked the fixed header.
    let (src, dst) = unsafe { super::addrs_v6(ip) };
    let (src_fold, dst_fold) = (fold_v6_words(src), fold_v6_words(dst));
    let mut next = ip.next_hdr;
    let mut off = l3_off + Ipv6Hdr::LEN;
    let mut fragment = false;
    for _ in 0..MAX_EXT_HEADERS {
        if next == PROTO_TCP || next == PROTO_UDP || next == PROTO_ICMPV6 {
            break;
        }
        let ext: *const [u8; 4] = ptr_at(ctx, off).ok_or(Verdict::pass(Reason::PassMalformed))?;
        // SAFETY: `ptr_at` checked bounds.
        let ext = unsafe { *ext };
        match next {
            HOPOPTS | ROUTING | DSTOPTS => off += (ext[1] as usize + 1) * 8,
            AH => off += (ext[1] as usize + 2) * 4,
            FRAGMENT => {
                // Offset (13 bits) and M flag in bytes 2..4; an atomic fragment (both zero) is
                // a whole packet. Later fragments carry no L4 header: stop here.
                if ext[2] != 0 || ext[3] & 0xf9 != 0 {
                    fragment = true;
                    next = ext[0];
                    break;
                }
                off += 8;
            }
            _ => return Err(Verdict::pass(Reason::PassNotVip)),
        }
        next = ext[0];
    }
    let l3_end = l3_off + l3_len as usize;
    if fragment {
        if next != PROTO_TCP && next != PROTO_UDP {
            return Err(Verdict::pass(Reason::PassFragment));
        }
        if l3_end > ctx.data_end() - ctx.data() {
            return Err(Verdict::pass(Reason::PassMalformed));
        }
        return Ok(Parsed::Unusual(Packet {
            l2,
            l3_off,
            family: FAMILY_V6,
            src,
            dst,
            ports: 0,
            src_fold,
            dst_fold,
            proto: next,
            tos: (ip.vcf[0] << 4) | (ip.vcf[1] >> 4),
            l3_len: l3_len as u16,
            dont_fragment: true,
            tcp_syn: false,
            l4_off: off,
            icmp_error: false,
            fragment: true,
        }));
    }
    if next == PROTO_ICMPV6 {
        let outer = icmp::Outer {
            l2,
            l3_off,
            l4_off: off,
            l3_len: l3_len as u16,
            tos: (ip.vcf[0] << 4) | (ip.vcf[1] >> 4),
            dont_fragment: true,
            dst,
        };
        let parsed = icmp::parse_v6(ctx, outer)?;
        // Last, as for TCP/UDP below.
        if l3_end > ctx.data_end() - ctx.data() {
            return Err(Verdict::pass(Reason::PassMalformed));
        }
        return Ok(parsed);
    }
    if next != PROTO_TCP && next != PROTO_UDP {
        return Err(Verdict::pass(Reason::PassNotVip));
    }
    let (ports, tcp_syn) =
        l4::ports(ctx, off, next, l3_end).ok_or(Verdict::pass(Reason::PassMalformed))?;
    // After the L4 read, as for IPv4 (see there).
    if l3_end > ctx.data_end() - ctx.data() {
        return Err(Verdict::pass(Reason::PassMalformed));
    }
    Ok(Parsed::Flow6(Packet {
        l2,
        l3_off,
        family: FAMILY_V6,
        src,
        dst,
        ports,
        src_fold,
        dst_fold,
        proto: next,
        tos: (ip.vcf[0] << 4) | (ip.vcf[1] >> 4),
        l3_len: l3_len as u16,
        dont_fragment: true,
        tcp_syn,
        l4_off: off,
        icmp_error: false,
        fragment: false,
    }))
}
