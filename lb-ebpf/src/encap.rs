//! Forwarding: IP-in-IP and GUE encapsulation, and L2 MAC rewrite. Each sends the frame
//! back out of the interface it came in on (`XDP_TX`).

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    BackendValue, CONFIG_F_PMTU_ICMP, FAMILY_V4, NodeConfig, PROTO_IPIP, PROTO_IPV6, PROTO_UDP,
    Reason, hash::gue_source_port,
};
use network_types::{
    eth::{EthHdr, EtherType},
    vlan::VlanHdr,
};

use crate::{
    Verdict, csum, icmp,
    maps::LB_CONFIG,
    parse::{L2, Packet, ptr_at},
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

/// Write the Ethernet header (and VLAN tag, if the frame had one) at the start of the frame.
#[inline(always)]
pub fn write_l2(
    ctx: &XdpContext,
    l2: &L2,
    dst: [u8; 6],
    src: [u8; 6],
    ether_type: u16,
) -> Result<(), Verdict> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Verdict::drop(Reason::DropNoHeadroom))?;
    // SAFETY: `ptr_at` checked bounds; the pointer was derived after the last head adjustment.
    unsafe {
        (*eth).dst_addr = dst;
        (*eth).src_addr = src;
    }
    match l2.vlan_tci {
        None => unsafe { (*eth).ether_type = ether_type },
        Some(tci) => {
            let vlan: *mut VlanHdr =
                ptr_at(ctx, EthHdr::LEN).ok_or(Verdict::drop(Reason::DropNoHeadroom))?;
            // SAFETY: as above.
            unsafe {
                (*eth).ether_type = EtherType::Ieee8021q as u16;
                (*vlan).tci = tci;
                (*vlan).ether_type = ether_type;
            }
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
    let udp_len = pkt.l3_len as u32 + UDP_HDR as u32;
    let mut udp = [0u8; UDP_HDR];
    if gue {
        udp[0..2].copy_from_slice(&gue_source_port(hash).to_be_bytes());
        udp[2..4].copy_from_slice(&cfg.gue_port_be.to_ne_bytes());
        udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
        // Checksum 0: allowed for IPv4, and for IPv6 tunnels (RFC 6935); the decap side
        // does not check it.
    }
    let reason = if gue { Reason::TxGue } else { Reason::TxIpip };
    let extra = overhead(backend.family, gue);
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
    if backend.family == FAMILY_V4 {
        if cfg.encap_src_v4_be == [0; 4] {
            return Err(Verdict::drop(Reason::DropNoConfig));
        }
        let outer_len = pkt.l3_len as u32 + extra as u32;
        if outer_len > 0xffff {
            return Err(Verdict::drop(Reason::DropTooBig));
        }
        let mut hdr = [0u8; V4_HDR];
        hdr[0] = 0x45;
        hdr[1] = pkt.tos;
        hdr[2..4].copy_from_slice(&(outer_len as u16).to_be_bytes());
        // id 0; DF copied from the inner packet so PMTU discovery keeps working.
        hdr[6] = if pkt.dont_fragment { 0x40 } else { 0 };
        hdr[8] = 64;
        hdr[9] = outer_proto;
        hdr[12..16].copy_from_slice(&cfg.encap_src_v4_be);
        hdr[16..20].copy_from_slice(&backend.addr_be[..4]);
        let check = csum::ipv4_header(&hdr);
        hdr[10] = check[0];
        hdr[11] = check[1];
        grow(ctx, extra)?;
        write_l2(ctx, &pkt.l2, backend.mac, cfg.mac, EtherType::Ipv4 as u16)?;
        let outer: *mut [u8; V4_HDR] =
            ptr_at(ctx, pkt.l3_off).ok_or(Verdict::drop(Reason::DropNoHeadroom))?;
        // SAFETY: `ptr_at` checked bounds after the head adjustment.
        unsafe { *outer = hdr };
    } else {
        if cfg.encap_src_v6_be == [0; 16] {
            return Err(Verdict::drop(Reason::DropNoConfig));
        }
        let payload_len = pkt.l3_len as u32 + extra as u32 - V6_HDR as u32;
        if payload_len > 0xffff {
            return Err(Verdict::drop(Reason::DropTooBig));
        }
        let label = hash & 0x000f_ffff;
        let mut hdr = [0u8; V6_HDR];
        hdr[0] = 0x60 | (pkt.tos >> 4);
        hdr[1] = (pkt.tos << 4) | (label >> 16) as u8;
        hdr[2] = (label >> 8) as u8;
        hdr[3] = label as u8;
        hdr[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
        hdr[6] = outer_proto;
        hdr[7] = 64;
        hdr[8..24].copy_from_slice(&cfg.encap_src_v6_be);
        hdr[24..40].copy_from_slice(&backend.addr_be);
        grow(ctx, extra)?;
        write_l2(ctx, &pkt.l2, backend.mac, cfg.mac, EtherType::Ipv6 as u16)?;
        let outer: *mut [u8; V6_HDR] =
            ptr_at(ctx, pkt.l3_off).ok_or(Verdict::drop(Reason::DropNoHeadroom))?;
        // SAFETY: `ptr_at` checked bounds after the head adjustment.
        unsafe { *outer = hdr };
    }
    if gue {
        let ip_len = extra - UDP_HDR;
        let u: *mut [u8; UDP_HDR] =
            ptr_at(ctx, pkt.l3_off + ip_len).ok_or(Verdict::drop(Reason::DropNoHeadroom))?;
        // SAFETY: `ptr_at` checked bounds after the head adjustment.
        unsafe { *u = udp };
    }
    Ok(Verdict::tx(reason))
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
    pkt: &Packet,
    backend: &BackendValue,
    cfg: &NodeConfig,
) -> Result<Verdict, Verdict> {
    write_l2(ctx, &pkt.l2, backend.mac, cfg.mac, pkt.l2.ether_type)?;
    Ok(Verdict::tx(Reason::TxL2))
}
