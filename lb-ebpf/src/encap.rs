//! Forwarding: IP-in-IP and GUE encapsulation, and L2 MAC rewrite. Each sends the frame
//! back out of the interface it came in on (`XDP_TX`).

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    BACKEND_F_VIA_NODE, BackendValue, CONFIG_F_PMTU_ICMP, FAMILY_V4, NodeConfig, PROTO_IPIP,
    PROTO_IPV6, PROTO_UDP, Reason, hash::gue_source_port,
};
use network_types::{
    eth::{EthHdr, EtherType},
    vlan::VlanHdr,
};

use crate::{
    Verdict, csum, icmp,
    maps::LB_CONFIG,
    parse::{L2, Packet, ptr_at},
    words::{self, MacWords},
};

const V4_HDR: usize = 20;
const V6_HDR: usize = 40;
const UDP_HDR: usize = 8;

/// The node configuration; a VIP packet arriving before the agent wrote it is dropped.
#[inline(always)]
pub fn node_config() -> Result<&'static NodeConfig, Verdict> {
    // By reference: the agent replaces the whole value at once, and copying it per packet
    // costs more than reading the few fields a packet needs.
    match LB_CONFIG.get(0) {
        Some(c) if c.flags & lb_common::CONFIG_F_VALID != 0 => Ok(c),
        _ => Err(Verdict::drop(Reason::DropNoConfig)),
    }
}

/// The half-words of a MAC address field of a shared type (in a map value, or a stack copy
/// of one): those fields are 2-aligned (`lb_common` asserts it).
#[inline(always)]
pub fn mac_words(mac: &[u8; 6]) -> MacWords {
    let p = mac.as_ptr().cast::<u16>();
    // SAFETY: in bounds; the field is 2-aligned (see above).
    unsafe { [*p, *p.add(1), *p.add(2)] }
}

/// Write the destination and source MAC address at the start of the frame, as three words.
#[inline(always)]
fn write_macs(ctx: &XdpContext, dst: MacWords, src: MacWords) -> Result<*mut u8, Verdict> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Verdict::drop(Reason::DropNoHeadroom))?;
    let p = eth.cast::<u8>();
    // SAFETY: `ptr_at` checked the 14 bytes; the pointer was derived after the last head
    // adjustment.
    unsafe {
        words::store32::<0>(p, words::join(dst[0], dst[1]));
        words::store32::<4>(p, words::join(dst[2], src[0]));
        words::store32::<8>(p, words::join(src[1], src[2]));
    }
    Ok(p)
}

/// Write the Ethernet header (and VLAN tag, if the frame had one) at the start of the frame.
#[inline(always)]
pub fn write_l2(
    ctx: &XdpContext,
    l2: &L2,
    dst: MacWords,
    src: MacWords,
    ether_type: u16,
) -> Result<(), Verdict> {
    let p = write_macs(ctx, dst, src)?;
    if !l2.tagged {
        // SAFETY: `write_macs` checked the whole Ethernet header.
        unsafe { words::store16::<12>(p, ether_type) };
    } else {
        let vlan: *mut VlanHdr =
            ptr_at(ctx, EthHdr::LEN).ok_or(Verdict::drop(Reason::DropNoHeadroom))?;
        // SAFETY: as above, and `ptr_at` checked the tag.
        unsafe {
            words::store16::<12>(p, EtherType::Ieee8021q as u16);
            (*vlan).tci = l2.vlan_tci;
            (*vlan).ether_type = ether_type;
        }
    }
    Ok(())
}

/// Length of the outer headers `encapsulate` prepends.
#[inline(always)]
const fn overhead(backend_family: u8, gue: bool) -> usize {
    let ip = if backend_family == FAMILY_V4 {
        V4_HDR
    } else {
        V6_HDR
    };
    if gue { ip + UDP_HDR } else { ip }
}

/// Prepend an outer IP header of the backend's family (IPIP, IP6IP6, 4in6, 6in4), and for
/// GUE a UDP header, from the node's encapsulation source to the backend. The inner packet
/// is not touched. `hash` is the flow hash (GUE source port, IPv6 flow label).
///
/// A pod reached through its node (`BACKEND_F_VIA_NODE`, with `gue`): the outer
/// destination is the node, and a GUE header carrying the pod's address follows the UDP
/// header (`lb_common::gue_pod_header`).
#[inline(always)]
pub fn encapsulate(
    ctx: &XdpContext,
    pkt: &Packet,
    backend: &BackendValue,
    cfg: &NodeConfig,
    gue: bool,
    hash: u32,
) -> Result<Verdict, Verdict> {
    let inner_proto = if pkt.family == FAMILY_V4 {
        PROTO_IPIP
    } else {
        PROTO_IPV6
    };
    let outer_proto = if gue { PROTO_UDP } else { inner_proto };
    let (dst_mac, src_mac) = (mac_words(&backend.mac), mac_words(&cfg.mac));
    let via = gue
        && backend.flags & (BACKEND_F_VIA_NODE | lb_common::BACKEND_F_LOCAL) == BACKEND_F_VIA_NODE;
    let option = if !via {
        0
    } else if backend.family == FAMILY_V4 {
        8
    } else {
        20
    };
    let gue_hdr = u32::from_ne_bytes(lb_common::gue_pod_header(backend.family));
    // GUE: source port, destination port; length, checksum 0 (allowed for IPv4, and for
    // IPv6 tunnels by RFC 6935; the decap side does not check it). Stored with the IP header.
    // (A length that wraps belongs to a packet the length checks below drop.)
    let udp_len = pkt.l3_len.wrapping_add((UDP_HDR + option) as u16);
    let u = [
        words::join(gue_source_port(hash).to_be(), cfg.gue_port_be),
        words::join(udp_len.to_be(), 0),
    ];
    let reason = if gue { Reason::TxGue } else { Reason::TxIpip };
    let extra = overhead(backend.family, gue) + option;
    // A local backend's tunnel never leaves the node.
    let mtu = if backend.flags & lb_common::BACKEND_F_LOCAL != 0 {
        0
    } else {
        cfg.mtu as usize
    };
    if mtu != 0 && pkt.l3_len as usize + extra > mtu {
        if cfg.flags & CONFIG_F_PMTU_ICMP == 0 || mtu <= extra {
            return Err(Verdict::drop(Reason::DropTooBig));
        }
        return icmp::too_big(ctx, pkt, cfg, (mtu - extra) as u16);
    }
    // The outer headers are built as words in registers and stored whole: built byte by byte
    // on the stack and copied, they cost a byte load and store each, and reading narrow
    // stores back as words stalls.
    if backend.family == FAMILY_V4 {
        let src = word(&cfg.encap_src_v4_be, 0);
        if src == 0 {
            return Err(Verdict::drop(Reason::DropNoConfig));
        }
        let outer_len = pkt.l3_len as u32 + extra as u32;
        if outer_len > 0xffff {
            return Err(Verdict::drop(Reason::DropTooBig));
        }
        // Version/IHL, TOS, length; id 0 and DF copied from the inner packet (so PMTU
        // discovery keeps working); TTL 64, protocol, checksum; source; destination.
        let mut w = [
            0x45 | ((pkt.tos as u32) << 8) | (((outer_len as u16).to_be() as u32) << 16),
            if pkt.dont_fragment { 0x40 << 16 } else { 0 },
            64 | ((outer_proto as u32) << 8),
            src,
            word(
                if via {
                    &backend.via_be
                } else {
                    &backend.addr_be
                },
                0,
            ),
        ];
        w[2] |= (csum::ipv4_header_words(&w) as u32) << 16;
        grow(ctx, extra)?;
        write_l2(ctx, &pkt.l2, dst_mac, src_mac, EtherType::Ipv4 as u16)?;
        if via {
            let pod = word(&backend.addr_be, 0);
            store_words(
                ctx,
                pkt.l3_off,
                &[w[0], w[1], w[2], w[3], w[4], u[0], u[1], gue_hdr, pod],
            )?;
        } else if gue {
            store_words(ctx, pkt.l3_off, &[w[0], w[1], w[2], w[3], w[4], u[0], u[1]])?;
        } else {
            store_words(ctx, pkt.l3_off, &w)?;
        }
    } else {
        let src = words4(&cfg.encap_src_v6_be);
        if src == [0; 4] {
            return Err(Verdict::drop(Reason::DropNoConfig));
        }
        let payload_len = pkt.l3_len as u32 + extra as u32 - V6_HDR as u32;
        if payload_len > 0xffff {
            return Err(Verdict::drop(Reason::DropTooBig));
        }
        let label = hash & 0x000f_ffff;
        // Version, traffic class and flow label (big-endian); payload length, next header,
        // hop limit; source; destination.
        let first = (6u32 << 28) | ((pkt.tos as u32) << 20) | label;
        let dst = words4(if via {
            &backend.via_be
        } else {
            &backend.addr_be
        });
        let w = [
            first.to_be(),
            ((payload_len as u16).to_be() as u32) | ((outer_proto as u32) << 16) | (64 << 24),
            src[0],
            src[1],
            src[2],
            src[3],
            dst[0],
            dst[1],
            dst[2],
            dst[3],
        ];
        grow(ctx, extra)?;
        write_l2(ctx, &pkt.l2, dst_mac, src_mac, EtherType::Ipv6 as u16)?;
        if via {
            let pod = words4(&backend.addr_be);
            let mut all = [0u32; 17];
            all[..10].copy_from_slice(&w);
            all[10..12].copy_from_slice(&u);
            all[12] = gue_hdr;
            all[13..].copy_from_slice(&pod);
            store_words(ctx, pkt.l3_off, &all)?;
        } else if gue {
            let mut all = [0u32; 12];
            all[..10].copy_from_slice(&w);
            all[10..].copy_from_slice(&u);
            store_words(ctx, pkt.l3_off, &all)?;
        } else {
            store_words(ctx, pkt.l3_off, &w)?;
        }
    }
    Ok(Verdict::tx(reason))
}

/// Word `i` of a byte array that starts 4-aligned in memory (every address field of the
/// shared types, which assert their layouts, in a map value or a stack copy of one).
#[inline(always)]
fn word<const N: usize>(bytes: &[u8; N], i: usize) -> u32 {
    // SAFETY: in bounds for every caller (constant `i` below N / 4); the field is 4-aligned.
    unsafe { *bytes.as_ptr().add(i * 4).cast::<u32>() }
}

#[inline(always)]
fn words4(bytes: &[u8; 16]) -> [u32; 4] {
    [
        word(bytes, 0),
        word(bytes, 1),
        word(bytes, 2),
        word(bytes, 3),
    ]
}

/// Store `w` (words as they are in memory) at `off` bytes into the packet.
#[inline(always)]
fn store_words<const N: usize>(ctx: &XdpContext, off: usize, w: &[u32; N]) -> Result<(), Verdict> {
    let p: *mut [u32; N] = ptr_at(ctx, off).ok_or(Verdict::drop(Reason::DropNoHeadroom))?;
    let p = p.cast::<u8>();
    for (i, w) in w.iter().enumerate() {
        // SAFETY: `ptr_at` checked that all N words lie in the packet.
        unsafe { words::store32::<0>(p.wrapping_add(4 * i), *w) };
    }
    Ok(())
}

/// Make room for `extra` bytes of headers in front of the packet.
#[inline(always)]
fn grow(ctx: &XdpContext, extra: usize) -> Result<(), Verdict> {
    // SAFETY: plain helper call on our own context; every pointer is re-derived afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(extra as i32)) } != 0 {
        return Err(Verdict::drop(Reason::DropNoHeadroom));
    }
    Ok(())
}

/// Send the unchanged IP packet to the backend's MAC address.
#[inline(always)]
pub fn l2_rewrite(
    ctx: &XdpContext,
    backend: &BackendValue,
    cfg: &NodeConfig,
) -> Result<Verdict, Verdict> {
    // The Ethernet type and a VLAN tag stay as they are.
    write_macs(ctx, mac_words(&backend.mac), mac_words(&cfg.mac))?;
    Ok(Verdict::tx(Reason::TxL2))
}
