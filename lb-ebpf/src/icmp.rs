//! ICMP the load balancer sends itself: echo replies for VIPs, and "fragmentation needed" /
//! "packet too big" when a packet would not fit the MTU once encapsulated. Both are built in
//! place and sent back out of the ingress interface (`XDP_TX`).

use core::ptr::null_mut;

use aya_ebpf::{
    helpers::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{FAMILY_V4, NodeConfig, PROTO_ICMP, PROTO_ICMPV6, Reason, VIP_F_ECHO};
use network_types::eth::{EthHdr, EtherType};

use crate::{
    Verdict, csum,
    encap::{mac_words, write_l2},
    parse::{Echo, Packet, addr_bytes, ptr_at},
    select, words,
};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP6_ECHO_REQUEST: u8 = 128;
const ICMP6_ECHO_REPLY: u8 = 129;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP6_PACKET_TOO_BIG: u8 = 2;
const V4_HDR: usize = 20;
/// TTL / hop limit of what the node sends itself.
const REPLY_TTL: u8 = 64;
const V6_HDR: usize = 40;
const ICMP_HDR: usize = 8;
/// An ICMPv6 error must fit the IPv6 minimum MTU.
const V6_MIN_MTU: usize = 1280;

/// Answer an echo request to a VIP that has echo enabled; anything else passes untouched.
#[inline(always)]
pub fn echo_reply(ctx: &XdpContext, echo: &Echo) -> Result<Verdict, Verdict> {
    let vip = select::vip(echo.dst, echo.family).ok_or(Verdict::pass(Reason::PassNotVip))?;
    if vip.flags & VIP_F_ECHO == 0 {
        return Err(Verdict::pass(Reason::PassNotVip));
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Verdict::pass(Reason::PassMalformed))?;
    // SAFETY: `ptr_at` checked bounds for every pointer below.
    unsafe {
        let (d, s) = ((*eth).dst_addr, (*eth).src_addr);
        (*eth).dst_addr = s;
        (*eth).src_addr = d;
    }
    // Swapping source and destination leaves every checksum as it is (sums commute). The
    // reply starts with a fresh TTL / hop limit, so it gets as far as the request came.
    if echo.family == FAMILY_V4 {
        let h: *mut [u8; V4_HDR] =
            ptr_at(ctx, echo.l3_off).ok_or(Verdict::pass(Reason::PassMalformed))?;
        unsafe {
            let mut v = *h;
            let old = u16::from_be_bytes([v[8], v[9]]);
            let new = u16::from_be_bytes([REPLY_TTL, v[9]]);
            let c = csum::replace16([v[10], v[11]], old, new);
            v[8] = REPLY_TTL;
            v[10] = c[0];
            v[11] = c[1];
            let src = [v[12], v[13], v[14], v[15]];
            v.copy_within(16..20, 12);
            v[16..20].copy_from_slice(&src);
            *h = v;
        }
    } else {
        let h: *mut [u8; V6_HDR] =
            ptr_at(ctx, echo.l3_off).ok_or(Verdict::pass(Reason::PassMalformed))?;
        unsafe {
            let mut v = *h;
            v[7] = REPLY_TTL;
            let mut src = [0u8; 16];
            src.copy_from_slice(&v[8..24]);
            v.copy_within(24..40, 8);
            v[24..40].copy_from_slice(&src);
            *h = v;
        }
    }
    let (request, reply) = if echo.family == FAMILY_V4 {
        (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY)
    } else {
        (ICMP6_ECHO_REQUEST, ICMP6_ECHO_REPLY)
    };
    let h: *mut [u8; 4] = ptr_at(ctx, echo.icmp_off).ok_or(Verdict::pass(Reason::PassMalformed))?;
    unsafe {
        let v = *h;
        let old = u16::from_be_bytes([request, v[1]]);
        let new = u16::from_be_bytes([reply, v[1]]);
        let c = csum::replace16([v[2], v[3]], old, new);
        // All-zero data sums to zero: only 0xffff is then a valid checksum (0x0000 is the
        // other zero of one's complement and fails the receiver's check). 0xffff is valid
        // whenever 0x0000 is, so it is always the one written.
        let c = if c == [0, 0] { [0xff, 0xff] } else { c };
        *h = [reply, v[1], c[0], c[1]];
    }
    Ok(Verdict::tx(Reason::TxEchoReply))
}

/// Add the one's-complement sum of `N` packet bytes at `off` (a multiple of 4, at most 512)
/// to `seed`, with `bpf_csum_diff`. Sums are in the host's byte order, like the kernel's.
#[inline(always)]
fn csum_packet<const N: usize>(ctx: &XdpContext, off: usize, seed: u32) -> Result<u32, Verdict> {
    let p: *mut [u8; N] = ptr_at(ctx, off).ok_or(Verdict::drop(Reason::DropTooBig))?;
    // SAFETY: `ptr_at` checked that all N bytes lie inside the packet.
    let r = unsafe { bpf_csum_diff(null_mut(), 0, p.cast(), N as u32, seed) };
    if r < 0 {
        return Err(Verdict::drop(Reason::DropTooBig));
    }
    Ok(r as u32)
}

/// One's-complement sum of `bytes` taken as host-order 16-bit words, as `csum_packet`.
#[inline(always)]
fn csum_bytes(bytes: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u16::from_ne_bytes([bytes[i], bytes[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// Fold a (possibly carrying) 32-bit sum plus `extra` into the final checksum bytes.
#[inline(always)]
fn finish(sum: u32, extra: u32) -> [u8; 2] {
    let wide = sum as u64 + extra as u64;
    let folded = (wide & 0xffff_ffff) + (wide >> 32);
    let s = ((folded & 0xffff) + (folded >> 16)) as u32;
    csum::fold(s).to_ne_bytes()
}

/// IPv4 quotes the header and 8 bytes: only headers without options are answered.
const V4_QUOTE: usize = V4_HDR + 8;
/// IPv6 quotes as much as fits 1280 bytes; a packet too big for an MTU of at least 1280
/// always has that much.
const V6_QUOTE: usize = V6_MIN_MTU - V6_HDR - ICMP_HDR;

/// Turn `pkt` into an ICMP "fragmentation needed" (IPv4, when DF is set) or ICMPv6 "packet
/// too big" to the client, from the VIP, announcing `mtu`; the error quotes the start of the
/// client's packet as the RFCs ask. What cannot be answered (IPv4 without DF or with
/// options, an IPv6 MTU under 1280) is dropped and counted.
#[inline(always)]
pub fn too_big(
    ctx: &XdpContext,
    pkt: &Packet,
    cfg: &NodeConfig,
    mtu: u16,
) -> Result<Verdict, Verdict> {
    let v4 = pkt.family == FAMILY_V4;
    let answerable = if v4 {
        pkt.dont_fragment && pkt.l4_off - pkt.l3_off == V4_HDR
    } else {
        mtu as usize >= V6_MIN_MTU
    };
    if pkt.icmp_error || !answerable {
        return Err(Verdict::drop(Reason::DropTooBig));
    }
    let (ip_len, quote) = if v4 {
        (V4_HDR, V4_QUOTE)
    } else {
        (V6_HDR, V6_QUOTE)
    };
    let client_mac: *const EthHdr = ptr_at(ctx, 0).ok_or(Verdict::drop(Reason::DropTooBig))?;
    // SAFETY: `ptr_at` checked bounds.
    let client_mac = unsafe { words::load_mac::<6>(client_mac.cast()) };
    let grow = (ip_len + ICMP_HDR) as i32;
    // SAFETY: helper calls on our own context; every pointer is re-derived afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -grow) } != 0 {
        return Err(Verdict::drop(Reason::DropNoHeadroom));
    }
    let want = pkt.l3_off + ip_len + ICMP_HDR + quote;
    let have = ctx.data_end() - ctx.data();
    if have < want {
        return Err(Verdict::drop(Reason::DropTooBig));
    }
    // SAFETY: as above.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((have - want) as i32)) } != 0 {
        return Err(Verdict::drop(Reason::DropTooBig));
    }
    let icmp_len = ICMP_HDR + quote;
    let icmp_off = pkt.l3_off + ip_len;
    let quote_off = icmp_off + ICMP_HDR;
    let mut icmp = [0u8; ICMP_HDR];
    let check;
    if v4 {
        write_l2(
            ctx,
            &pkt.l2,
            client_mac,
            mac_words(&cfg.mac),
            EtherType::Ipv4 as u16,
        )?;
        let mut h = [0u8; V4_HDR];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&((V4_HDR + icmp_len) as u16).to_be_bytes());
        h[8] = 64;
        h[9] = PROTO_ICMP;
        h[12..16].copy_from_slice(&pkt.dst[0].to_ne_bytes());
        h[16..20].copy_from_slice(&pkt.src[0].to_ne_bytes());
        let c = csum::ipv4_header(&h);
        h[10] = c[0];
        h[11] = c[1];
        let p: *mut [u8; V4_HDR] =
            ptr_at(ctx, pkt.l3_off).ok_or(Verdict::drop(Reason::DropTooBig))?;
        // SAFETY: `ptr_at` checked bounds.
        unsafe { *p = h };
        icmp[0] = ICMP_DEST_UNREACH;
        icmp[1] = ICMP_FRAG_NEEDED;
        icmp[6..8].copy_from_slice(&mtu.to_be_bytes());
        let sum = csum_packet::<V4_QUOTE>(ctx, quote_off, 0)?;
        check = finish(sum, csum_bytes(&icmp));
    } else {
        write_l2(
            ctx,
            &pkt.l2,
            client_mac,
            mac_words(&cfg.mac),
            EtherType::Ipv6 as u16,
        )?;
        let mut h = [0u8; V6_HDR];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&(icmp_len as u16).to_be_bytes());
        h[6] = PROTO_ICMPV6;
        h[7] = 64;
        h[8..24].copy_from_slice(&addr_bytes(pkt.dst));
        h[24..40].copy_from_slice(&addr_bytes(pkt.src));
        let p: *mut [u8; V6_HDR] =
            ptr_at(ctx, pkt.l3_off).ok_or(Verdict::drop(Reason::DropTooBig))?;
        // SAFETY: `ptr_at` checked bounds.
        unsafe { *p = h };
        icmp[0] = ICMP6_PACKET_TOO_BIG;
        icmp[4..8].copy_from_slice(&(mtu as u32).to_be_bytes());
        // Pseudo-header: addresses, upper-layer length, next header.
        let mut tail = [0u8; 8];
        tail[2..4].copy_from_slice(&(icmp_len as u16).to_be_bytes());
        tail[7] = PROTO_ICMPV6;
        let seed = csum_bytes(&h[8..40]) + csum_bytes(&tail) + csum_bytes(&icmp);
        let s = csum_packet::<512>(ctx, quote_off, seed)?;
        let s = csum_packet::<512>(ctx, quote_off + 512, s)?;
        let s = csum_packet::<{ V6_QUOTE - 1024 }>(ctx, quote_off + 1024, s)?;
        check = finish(s, 0);
    }
    icmp[2] = check[0];
    icmp[3] = check[1];
    let p: *mut [u8; ICMP_HDR] = ptr_at(ctx, icmp_off).ok_or(Verdict::drop(Reason::DropTooBig))?;
    // SAFETY: `ptr_at` checked bounds.
    unsafe { *p = icmp };
    Ok(Verdict::tx(Reason::TxIcmpTooBig))
}
