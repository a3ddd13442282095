//! Forwarding: IPIP encapsulation and L2 MAC rewrite. Both send the frame back out of the
//! interface it came in on (`XDP_TX`).

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{BackendValue, NodeConfig, PROTO_IPIP, Reason};
use network_types::{
    eth::{EthHdr, EtherType},
    vlan::VlanHdr,
};

use crate::{
    Verdict, csum,
    maps::LB_CONFIG,
    parse::{L2, PacketV4, ptr_at},
};

const OUTER_V4_LEN: usize = 20;

/// The node configuration; a VIP packet arriving before the agent wrote it is dropped.
#[inline(always)]
pub fn node_config() -> Result<NodeConfig, Verdict> {
    match LB_CONFIG.get(0) {
        Some(c) if c.flags & lb_common::CONFIG_F_VALID != 0 => Ok(*c),
        _ => Err(Verdict::drop(Reason::DropNoConfig)),
    }
}

/// Write the Ethernet header (and VLAN tag, if the frame had one) at the start of the frame.
#[inline(always)]
fn write_l2(
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

/// Prepend an outer IPv4 header (protocol 4) from the node's encapsulation source to the
/// backend. The inner packet is not touched.
#[inline(always)]
pub fn ipip_v4(
    ctx: &XdpContext,
    pkt: &PacketV4,
    backend: &BackendValue,
    cfg: &NodeConfig,
) -> Result<Verdict, Verdict> {
    let outer_len = pkt.tot_len as u32 + OUTER_V4_LEN as u32;
    if outer_len > 0xffff {
        return Err(Verdict::drop(Reason::DropNoHeadroom));
    }
    let mut hdr = [0u8; OUTER_V4_LEN];
    hdr[0] = 0x45;
    hdr[1] = pkt.tos;
    hdr[2..4].copy_from_slice(&(outer_len as u16).to_be_bytes());
    // id 0; DF copied from the inner header so PMTU discovery keeps working.
    hdr[6] = if pkt.dont_fragment { 0x40 } else { 0 };
    hdr[8] = 64;
    hdr[9] = PROTO_IPIP;
    hdr[12..16].copy_from_slice(&cfg.encap_src_v4_be);
    hdr[16..20].copy_from_slice(&backend.addr_be[..4]);
    let check = csum::ipv4_header(&hdr);
    hdr[10] = check[0];
    hdr[11] = check[1];

    // SAFETY: plain helper call on our own context; pointers are re-derived below.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(OUTER_V4_LEN as i32)) } != 0 {
        return Err(Verdict::drop(Reason::DropNoHeadroom));
    }
    write_l2(ctx, &pkt.l2, backend.mac, cfg.mac, EtherType::Ipv4 as u16)?;
    let outer: *mut [u8; OUTER_V4_LEN] =
        ptr_at(ctx, pkt.l3_off).ok_or(Verdict::drop(Reason::DropNoHeadroom))?;
    // SAFETY: `ptr_at` checked bounds after the head adjustment.
    unsafe { *outer = hdr };
    Ok(Verdict::tx(Reason::TxIpip))
}

/// Send the unchanged IP packet to the backend's MAC address.
#[inline(always)]
pub fn l2_rewrite(
    ctx: &XdpContext,
    pkt: &PacketV4,
    backend: &BackendValue,
    cfg: &NodeConfig,
) -> Result<Verdict, Verdict> {
    write_l2(ctx, &pkt.l2, backend.mac, cfg.mac, pkt.l2.ether_type)?;
    Ok(Verdict::tx(Reason::TxL2))
}
