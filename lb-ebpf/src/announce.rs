//! L2 announcement: the node that owns a VIP (`VIP_F_ANSWER`) answers ARP requests (IPv4)
//! and Neighbor Solicitations (IPv6) for it with its own MAC. No interface carries the VIP,
//! so the kernel stays silent; the reply is built in place and sent back out of the ingress
//! interface (`XDP_TX`). Anything else passes untouched, counted as before (`PassNotIp` for
//! ARP, `PassNotVip` for ICMPv6).
//!
//! The parser only recognises the two (by ethertype on its non-IP branch, and by ICMPv6 type
//! where it reads that anyway) and hands them over with an internal verdict; everything
//! checked here is read here. The two entry points are out of line (a BPF-to-BPF call, as
//! `memset` already is in `lb_xdp`): inlined, they shared `lb_xdp`'s registers with the
//! forwarding paths, and the verdict of every packet moved to the stack.
//!
//! A node answers only while its agent's lease holds (`LB_L2_LEASE`, renewed with every
//! heartbeat): after the agent dies, the program stays attached and keeps forwarding, but
//! stops answering when the other nodes, missing its heartbeats, take its VIPs over. Only
//! the responder reads the lease, after the VIP lookup, so no other packet pays for it.

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    CONFIG_F_VALID, FAMILY_V4, FAMILY_V6, NodeConfig, PROTO_ICMPV6, Reason, VIP_F_ANSWER,
};
use network_types::eth::EthHdr;

use crate::{
    Verdict, csum,
    encap::mac_words,
    maps::{LB_CONFIG, LB_L2_LEASE},
    parse::{AddrWords, parse_l2, ptr_at},
    select,
    words::{self, MacWords},
};

/// ARP for IPv4 over Ethernet: hardware type, protocol type, hardware and protocol address
/// lengths, operation; then sender MAC and IPv4, target MAC and IPv4.
const ARP_LEN: usize = 28;
/// The first word of an ARP packet for IPv4 over Ethernet: hardware type 1, protocol 0x0800.
const ARP_ETH_IPV4: u32 = u32::from_ne_bytes([0, 1, 0x08, 0x00]);
/// The second word: lengths 6 and 4, and the operation (1 request, 2 reply).
const ARP_REQUEST: u32 = u32::from_ne_bytes([6, 4, 0, 1]);
const ARP_REPLY: u32 = u32::from_ne_bytes([6, 4, 0, 2]);

const V6_HDR: usize = 40;
/// A Neighbor Solicitation without options: type, code, checksum, reserved, target.
const NS_LEN: usize = 24;
/// The advertisement sent back: the same fixed part and one Target Link-Layer Address option.
const NA_LEN: usize = 32;
/// ND messages carry the largest hop limit; anything less came through a router (RFC 4861 7.1.1).
const ND_HOP_LIMIT: u8 = 255;
const ICMP6_NEIGHBOR_SOLICIT: u8 = 135;
const ICMP6_NEIGHBOR_ADVERT: u8 = 136;
/// Solicited and Override set, Router clear; the reserved bits after them zero.
const NA_FLAGS: u32 = u32::from_ne_bytes([0x60, 0, 0, 0]);
/// Target Link-Layer Address option header: type 2, length 1 (in 8 bytes).
const OPT_TLLA: u16 = u16::from_ne_bytes([2, 1]);
/// IPv6 header words 0 and 1 of the advertisement: version 6, traffic class and flow label 0;
/// payload length, next header ICMPv6, hop limit 255.
const NA_IP_W0: u32 = u32::from_ne_bytes([0x60, 0, 0, 0]);
const NA_IP_W1: u32 = u32::from_ne_bytes([0, NA_LEN as u8, PROTO_ICMPV6, ND_HOP_LIMIT]);
/// The pseudo-header's upper-layer length (32) and next header (58), summed as their words.
const NA_PSEUDO: u32 = u32::from_ne_bytes([0, 0, 0, NA_LEN as u8 + PROTO_ICMPV6]);

/// The node configuration, if `addr` is a VIP this node owns, the agent's answer lease
/// holds, and the agent wrote the configuration (its MAC is what the reply announces).
#[inline(always)]
fn owner_config(addr: AddrWords, family: u8) -> Option<&'static NodeConfig> {
    let vip = select::vip(addr, family)?;
    if vip.flags & VIP_F_ANSWER == 0 || !leased() {
        return None;
    }
    LB_CONFIG.get(0).filter(|c| c.flags & CONFIG_F_VALID != 0)
}

/// Whether the answer lease holds: the kernel's jiffies are below the deadline the agent
/// last wrote (0, no lease, is below every value).
#[inline(always)]
fn leased() -> bool {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_jiffies64() };
    LB_L2_LEASE.get(0).is_some_and(|until| now < *until)
}

/// Store a MAC address (as half-words) at `OFF` bytes after `p`.
///
/// # Safety
///
/// As for the stores of [`words`]: the 6 bytes lie inside the packet, checked by `ptr_at`.
#[inline(always)]
unsafe fn store_mac<const OFF: usize>(p: *mut u8, mac: MacWords) {
    let a = p.wrapping_add(OFF);
    // SAFETY: caller's contract.
    unsafe {
        words::store16::<0>(a, mac[0]);
        words::store16::<2>(a, mac[1]);
        words::store16::<4>(a, mac[2]);
    }
}

/// Store a 16-byte address (as words) at `OFF` bytes after `p`.
///
/// # Safety
///
/// As for [`store_mac`], for the 16 bytes.
#[inline(always)]
unsafe fn store_addr<const OFF: usize>(p: *mut u8, addr: AddrWords) {
    let a = p.wrapping_add(OFF);
    // SAFETY: caller's contract.
    unsafe {
        words::store32::<0>(a, addr[0]);
        words::store32::<4>(a, addr[1]);
        words::store32::<8>(a, addr[2]);
        words::store32::<12>(a, addr[3]);
    }
}

/// The MAC the frame came from.
#[inline(always)]
fn frame_source(ctx: &XdpContext, not_ours: Verdict) -> Result<MacWords, Verdict> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(not_ours)?;
    // SAFETY: `ptr_at` checked the Ethernet header.
    Ok(unsafe { words::load_mac::<6>(eth.cast()) })
}

/// Address the frame back: to `requester`, from the node's MAC. The ethertype and a VLAN
/// tag stay as they are.
#[inline(always)]
fn reply_macs(ctx: &XdpContext, requester: MacWords, node: MacWords) -> Result<(), Verdict> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Verdict::drop(Reason::DropNoHeadroom))?;
    let p = eth.cast::<u8>();
    // SAFETY: `ptr_at` checked the Ethernet header, after any change of the frame's bounds.
    unsafe {
        store_mac::<0>(p, requester);
        store_mac::<6>(p, node);
    }
    Ok(())
}

/// Answer an ARP request (Ethernet, IPv4) for a VIP this node owns: the request becomes the
/// reply in place, "VIP is at the node's MAC", to the requester's MAC. Other ARP packets
/// (replies, gratuitous ARP, other hardware or protocols, requests for other addresses) pass.
#[inline(never)]
pub fn arp(ctx: &XdpContext) -> Verdict {
    match arp_reply(ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn arp_reply(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    const NOT_OURS: Verdict = Verdict::pass(Reason::PassNotIp);
    let l3_off = parse_l2(ctx).ok_or(NOT_OURS)?.l3_off;
    let arp: *mut [u8; ARP_LEN] = ptr_at(ctx, l3_off).ok_or(NOT_OURS)?;
    let p = arp.cast::<u8>();
    // SAFETY: `ptr_at` checked all 28 bytes. The sender address (bytes 14..18) is read as
    // half-words: it is not word-aligned relative to the IP alignment of the frame.
    let (hw, op, sha, spa, tpa) = unsafe {
        (
            words::load32::<0>(p),
            words::load32::<4>(p),
            words::load_mac::<8>(p),
            words::join(words::load16::<14>(p), words::load16::<16>(p)),
            words::load32::<24>(p),
        )
    };
    // A gratuitous request (sender = target) announces someone else's binding: not a question.
    if hw != ARP_ETH_IPV4 || op != ARP_REQUEST || spa == tpa {
        return Err(NOT_OURS);
    }
    let cfg = owner_config([tpa, 0, 0, 0], FAMILY_V4).ok_or(NOT_OURS)?;
    let requester = frame_source(ctx, NOT_OURS)?;
    let mac = mac_words(&cfg.mac);
    let t = tpa.to_ne_bytes();
    // SAFETY: the pointer was checked for the whole ARP packet above; nothing has changed
    // the packet's bounds since.
    unsafe {
        words::store32::<4>(p, ARP_REPLY);
        store_mac::<8>(p, mac);
        words::store16::<14>(p, u16::from_ne_bytes([t[0], t[1]]));
        words::store16::<16>(p, u16::from_ne_bytes([t[2], t[3]]));
        store_mac::<18>(p, sha);
        words::store32::<24>(p, spa);
    }
    reply_macs(ctx, requester, mac)?;
    Ok(Verdict::tx(Reason::TxArpReply))
}

/// Fold a sum of words into the 16-bit checksum (bytes in memory order with `to_ne_bytes`).
#[inline(always)]
fn fold64(sum: u64) -> u16 {
    let s = (sum & 0xffff_ffff) + (sum >> 32);
    let s = (s & 0xffff_ffff) + (s >> 32);
    csum::fold(s as u32)
}

/// Answer a Neighbor Solicitation for a VIP this node owns with a solicited Neighbor
/// Advertisement (Solicited, Override; the node's MAC as Target Link-Layer Address), built
/// over the solicitation: the frame is cut or grown to exactly the advertisement, whatever
/// options the solicitation had. Duplicate address detection (unspecified source), an NS
/// that came through a router or behind extension headers, and targets that are not owned
/// VIPs pass untouched.
#[inline(never)]
pub fn neighbor(ctx: &XdpContext) -> Verdict {
    match neighbor_advert(ctx) {
        Ok(v) | Err(v) => v,
    }
}

#[inline(always)]
fn neighbor_advert(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    const NOT_OURS: Verdict = Verdict::pass(Reason::PassNotVip);
    let l3_off = parse_l2(ctx).ok_or(NOT_OURS)?.l3_off;
    let h: *const [u8; V6_HDR + NS_LEN] = ptr_at(ctx, l3_off).ok_or(NOT_OURS)?;
    let p = h.cast::<u8>();
    // SAFETY: `ptr_at` checked the IPv6 header and the solicitation's fixed part.
    let (w1, src, icmp, target) = unsafe {
        (
            words::load32::<4>(p),
            words::load_addr::<8>(p),
            words::load32::<{ V6_HDR as i16 }>(p),
            words::load_addr::<{ V6_HDR + 8 }>(p),
        )
    };
    let [len_hi, len_lo, next, hop_limit] = w1.to_ne_bytes();
    let payload_len = u16::from_be_bytes([len_hi, len_lo]) as usize;
    let [kind, code, _, _] = icmp.to_ne_bytes();
    let src_first = src[0].to_ne_bytes()[0];
    // After the reads through `ptr_at` (see `parse::icmp::within`). ICMPv6 right after the
    // fixed header; the solicitation whole inside the IP packet, and that inside the frame.
    if next != PROTO_ICMPV6
        || kind != ICMP6_NEIGHBOR_SOLICIT
        || payload_len < NS_LEN
        || l3_off + V6_HDR + payload_len > ctx.data_end() - ctx.data()
        || hop_limit != ND_HOP_LIMIT
        || code != 0
        || src == [0; 4]
        || src_first == 0xff
    {
        return Err(NOT_OURS);
    }
    let cfg = owner_config(target, FAMILY_V6).ok_or(NOT_OURS)?;
    let requester = frame_source(ctx, NOT_OURS)?;
    let mac = mac_words(&cfg.mac);

    let want = l3_off + V6_HDR + NA_LEN;
    let have = ctx.data_end() - ctx.data();
    if have != want {
        // SAFETY: helper call on our own context; every pointer is derived afresh below.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, want as i32 - have as i32) } != 0 {
            return Err(Verdict::drop(Reason::DropNoHeadroom));
        }
    }
    reply_macs(ctx, requester, mac)?;

    let opt0 = words::join(OPT_TLLA, mac[0]);
    let opt1 = words::join(mac[1], mac[2]);
    let head = u32::from_ne_bytes([ICMP6_NEIGHBOR_ADVERT, 0, 0, 0]);
    // Pseudo-header (VIP, solicitor, length, next header) and the message; the VIP is both
    // the source and the target.
    let mut sum = NA_PSEUDO as u64 + head as u64 + NA_FLAGS as u64 + opt0 as u64 + opt1 as u64;
    for i in 0..4 {
        sum += 2 * target[i] as u64 + src[i] as u64;
    }
    let c = fold64(sum).to_ne_bytes();
    let head = u32::from_ne_bytes([ICMP6_NEIGHBOR_ADVERT, 0, c[0], c[1]]);

    let h: *mut [u8; V6_HDR + NA_LEN] =
        ptr_at(ctx, l3_off).ok_or(Verdict::drop(Reason::DropNoHeadroom))?;
    let p = h.cast::<u8>();
    // SAFETY: `ptr_at` checked the 72 bytes, after the tail adjustment.
    unsafe {
        words::store32::<0>(p, NA_IP_W0);
        words::store32::<4>(p, NA_IP_W1);
        store_addr::<8>(p, target);
        store_addr::<24>(p, src);
        words::store32::<{ V6_HDR as i16 }>(p, head);
        words::store32::<{ V6_HDR as i16 + 4 }>(p, NA_FLAGS);
        store_addr::<{ V6_HDR + 8 }>(p, target);
        words::store32::<{ V6_HDR as i16 + 24 }>(p, opt0);
        words::store32::<{ V6_HDR as i16 + 28 }>(p, opt1);
    }
    Ok(Verdict::tx(Reason::TxNeighborAdvert))
}
