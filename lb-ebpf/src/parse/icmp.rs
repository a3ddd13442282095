//! ICMP and ICMPv6 to a VIP: echo requests, and errors about a VIP flow.
//!
//! An error (destination unreachable, fragmentation needed / packet too big, time exceeded)
//! quotes the header of the packet that caused it: a reply the backend sent from the VIP to
//! the client. Reversed, that quote is the client's flow, so the error is forwarded to the
//! backend that owns the flow, and PMTU discovery works through DSR.

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP, Reason};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use super::{Echo, L2, Packet, Parsed, ptr_at};
use crate::Verdict;

const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_PACKET_TOO_BIG: u8 = 2;
const ICMP6_TIME_EXCEEDED: u8 = 3;
const ICMP6_ECHO_REQUEST: u8 = 128;
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
    pub dst_be: [u8; 16],
}

#[inline(always)]
fn icmp_type(ctx: &XdpContext, off: usize) -> Result<u8, Verdict> {
    let h: *const [u8; ICMP_HDR] = ptr_at(ctx, off).ok_or(Verdict::pass(Reason::PassMalformed))?;
    // SAFETY: `ptr_at` checked bounds.
    Ok(unsafe { (*h)[0] })
}

/// Ports of the quoted L4 header at `off` (the first 8 bytes are always quoted).
#[inline(always)]
fn quoted_ports(ctx: &XdpContext, off: usize) -> Result<([u8; 2], [u8; 2]), Verdict> {
    let p: *const [u8; 4] = ptr_at(ctx, off).ok_or(Verdict::pass(Reason::PassMalformed))?;
    // SAFETY: `ptr_at` checked bounds.
    let p = unsafe { *p };
    Ok(([p[0], p[1]], [p[2], p[3]]))
}

#[inline(always)]
fn flow(
    outer: Outer,
    family: u8,
    client: [u8; 16],
    vip: [u8; 16],
    vip_port: [u8; 2],
    client_port: [u8; 2],
    proto: u8,
    (client_fold, vip_fold): (u32, u32),
) -> Parsed {
    Parsed::Flow(Packet {
        l2: outer.l2,
        l3_off: outer.l3_off,
        family,
        src_be: client,
        dst_be: vip,
        sport_be: client_port,
        dport_be: vip_port,
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
            dst_be: outer.dst_be,
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
    let (vip_port, client_port) = quoted_ports(ctx, q + ihl)?;
    within(&outer, q, ihl + 4)?;
    let mut vip = [0u8; 16];
    let mut client = [0u8; 16];
    vip[..4].copy_from_slice(&ip.src_addr);
    client[..4].copy_from_slice(&ip.dst_addr);
    let proto = ip.proto;
    let fold = |a: [u8; 16]| u32::from_ne_bytes([a[0], a[1], a[2], a[3]]);
    let folds = (fold(client), fold(vip));
    Ok(flow(
        outer,
        FAMILY_V4,
        client,
        vip,
        vip_port,
        client_port,
        proto,
        folds,
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
            dst_be: outer.dst_be,
            icmp_off: outer.l4_off,
        }));
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
    let (vip_port, client_port) = quoted_ports(ctx, q + Ipv6Hdr::LEN)?;
    within(&outer, q, Ipv6Hdr::LEN + 4)?;
    // The quote is the reply (VIP → client): its source folds to the flow's destination.
    // (Folded only now: values live across the early returns above made LLVM merge paths
    // in a way the verifier rejects.)
    let (vip_fold, client_fold) = super::fold_addrs_v6(ip);
    let (vip, client, proto) = (ip.src_addr, ip.dst_addr, ip.next_hdr);
    Ok(flow(
        outer,
        FAMILY_V6,
        client,
        vip,
        vip_port,
        client_port,
        proto,
        (client_fold, vip_fold),
    ))
}
