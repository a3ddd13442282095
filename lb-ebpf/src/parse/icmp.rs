//! ICMP and ICMPv6 to a VIP: echo requests, and errors about a VIP flow.
//!
//! An error (destination unreachable, fragmentation needed / packet too big, time exceeded)
//! quotes the header of the packet that caused it: a reply the backend sent from the VIP to
//! the client. Reversed, that quote is the client's flow, so the error is forwarded to the
//! backend that owns the flow, and PMTU discovery works through DSR.

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, Reason, hash::fold_v6_words};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use super::{AddrWords, Echo, L2, Packet, Parsed, ptr_at};
use crate::{Verdict, words};

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_PACKET_TOO_BIG: u8 = 2;
const ICMP6_TIME_EXCEEDED: u8 = 3;
const ICMP6_ECHO_REQUEST: u8 = 128;
const ICMP6_NEIGHBOR_SOLICIT: u8 = 135;
/// ICMP header before the quoted packet: type, code, checksum, 4 bytes.
const ICMP_HDR: usize = 8;

/// The IP packet carrying the ICMP message.
pub struct Outer {
    pub l2: L2,
    pub l3_off: usize,
    pub l4_off: usize,
    pub l3_len: u16,
    pub tos: u8,
    pub dont_fragment: bool,
    pub dst: AddrWords,
}

#[inline(always)]
fn icmp_type(ctx: &XdpContext, off: usize) -> Result<u8, Verdict> {
    let h: *const [u8; ICMP_HDR] = ptr_at(ctx, off).ok_or(Verdict::pass(Reason::PassMalformed))?;
    // SAFETY: `ptr_at` checked bounds.
    Ok(unsafe { (*h)[0] })
}

/// The ports of the flow a quoted L4 header at `off` belongs to (the first 8 bytes are always
/// quoted): the quote is the reply (VIP port, client port), so its two ports swap places, as
/// the two halves of the word.
#[inline(always)]
fn quoted_ports(ctx: &XdpContext, off: usize) -> Result<u32, Verdict> {
    let p: *const [u8; 4] = ptr_at(ctx, off).ok_or(Verdict::pass(Reason::PassMalformed))?;
    // SAFETY: `ptr_at` checked bounds.
    Ok(unsafe { words::load32::<0>(p.cast()) }.rotate_left(16))
}

#[inline(always)]
fn flow(
    outer: Outer,
    family: u8,
    client: AddrWords,
    vip: AddrWords,
    ports: u32,
    proto: u8,
    (client_fold, vip_fold): (u32, u32),
) -> Parsed {
    Parsed::Unusual(Packet {
        l2: outer.l2,
        l3_off: outer.l3_off,
        family,
        src: client,
        dst: vip,
        ports,
        src_fold: client_fold,
        dst_fold: vip_fold,
        proto,
        tos: outer.tos,
        l3_len: outer.l3_len,
        dont_fragment: outer.dont_fragment,
        tcp_syn: false,
        l4_off: outer.l4_off,
        icmp_error: true,
        fragment: false,
    })
}

/// Does `len` bytes at `off` lie inside the IP packet (not just the frame, which may carry
/// Ethernet padding after it)? Checked after the bytes were read through `ptr_at`: before,
/// together with the frame-length check, it would let the compiler drop `ptr_at`'s check,
/// which the verifier needs to see.
#[inline(always)]
fn within(outer: &Outer, off: usize, len: usize) -> Result<(), Verdict> {
    if off + len > outer.l3_off + outer.l3_len as usize {
        return Err(Verdict::pass(Reason::PassMalformed));
    }
    Ok(())
}

#[inline(always)]
pub fn parse_v4(ctx: &XdpContext, outer: Outer) -> Result<Parsed, Verdict> {
    let kind = icmp_type(ctx, outer.l4_off)?;
    within(&outer, outer.l4_off, ICMP_HDR)?;
    if kind == ICMP_ECHO_REQUEST {
        return Ok(Parsed::Echo(Echo {
            l3_off: outer.l3_off,
            family: FAMILY_V4,
            dst: outer.dst,
            icmp_off: outer.l4_off,
        }));
    }
    if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED {
        return Err(Verdict::pass(Reason::PassNotVip));
    }
    let q = outer.l4_off + ICMP_HDR;
    let ip: *const Ipv4Hdr = ptr_at(ctx, q).ok_or(Verdict::pass(Reason::PassMalformed))?;
    // SAFETY: `ptr_at` checked bounds.
    let ip = unsafe { &*ip };
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Err(Verdict::pass(Reason::PassMalformed));
    }
    if ip.proto != PROTO_TCP && ip.proto != PROTO_UDP {
        return Err(Verdict::pass(Reason::PassNotVip));
    }
    let ports = quoted_ports(ctx, q + ihl)?;
    within(&outer, q, ihl + 4)?;
    // The quote is the reply (VIP → client). An IPv4 address's fold is its word.
    // SAFETY: `ptr_at` checked the quoted fixed header.
    let (vip, client) = unsafe { super::addrs_v4(ip) };
    let proto = ip.proto;
    Ok(flow(
        outer,
        FAMILY_V4,
        [client, 0, 0, 0],
        [vip, 0, 0, 0],
        ports,
        proto,
        (client, vip),
    ))
}

#[inline(always)]
pub fn parse_v6(ctx: &XdpContext, outer: Outer) -> Result<Parsed, Verdict> {
    let kind = icmp_type(ctx, outer.l4_off)?;
    within(&outer, outer.l4_off, ICMP_HDR)?;
    if kind == ICMP6_ECHO_REQUEST {
        return Ok(Parsed::Echo(Echo {
            l3_off: outer.l3_off,
            family: FAMILY_V6,
            dst: outer.dst,
            icmp_off: outer.l4_off,
        }));
    }
    if kind == ICMP6_NEIGHBOR_SOLICIT {
        // Answered (or passed) by `announce`, which reads what it needs itself.
        return Err(Verdict::solicit());
    }
    if kind != ICMP6_DEST_UNREACH && kind != ICMP6_PACKET_TOO_BIG && kind != ICMP6_TIME_EXCEEDED {
        return Err(Verdict::pass(Reason::PassNotVip));
    }
    let q = outer.l4_off + ICMP_HDR;
    let ip: *const Ipv6Hdr = ptr_at(ctx, q).ok_or(Verdict::pass(Reason::PassMalformed))?;
    // SAFETY: `ptr_at` checked bounds.
    let ip = unsafe { &*ip };
    // Quoted extension headers are not followed: such errors are passed.
    if ip.next_hdr != PROTO_TCP && ip.next_hdr != PROTO_UDP {
        return Err(Verdict::pass(Reason::PassNotVip));
    }
    let ports = quoted_ports(ctx, q + Ipv6Hdr::LEN)?;
    within(&outer, q, Ipv6Hdr::LEN + 4)?;
    // The quote is the reply (VIP → client): its source is the flow's destination. (Read
    // only now: values live across the early returns above made LLVM merge paths in a way
    // the verifier rejects.)
    // SAFETY: `ptr_at` checked the quoted fixed header.
    let (vip, client) = unsafe { super::addrs_v6(ip) };
    let proto = ip.next_hdr;
    let folds = (fold_v6_words(client), fold_v6_words(vip));
    Ok(flow(outer, FAMILY_V6, client, vip, ports, proto, folds))
}
