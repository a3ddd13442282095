//! Egress side of DSR to pods (TC, on the node's interface): a reply of a flow that `dnat`
//! translated leaves from the endpoint's address and target port; it gets the VIP and the
//! service port back, so the client sees the answer from the address it asked. Anything
//! else leaves untouched.
//!
//! Checksums go through the kernel's helpers, which also handle a checksum the device is
//! still to finish (`CHECKSUM_PARTIAL`, the usual case for locally generated traffic).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use lb_common::{FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP, Reason, RevNatValue};
use network_types::eth::{EthHdr, EtherType};

use crate::{maps::LB_REVNAT, stats};

const IPV4_CHECK: usize = 10;
const IPV4_SRC: usize = 12;
const IPV6_SRC: usize = 8;
const IPV6_LEN: usize = 40;

/// Restore the VIP and port of a translated reply (if it is one).
#[inline(always)]
pub fn run(ctx: &TcContext) {
    let Ok(ether_type) = ctx.load::<u16>(EthHdr::LEN - 2) else {
        return;
    };
    let done = if ether_type == EtherType::Ipv4 as u16 {
        restore_v4(ctx, EthHdr::LEN)
    } else if ether_type == EtherType::Ipv6 as u16 {
        restore_v6(ctx, EthHdr::LEN)
    } else {
        None
    };
    if done.is_some() {
        stats::count_reason(Reason::RevNat, ctx.len() as u64);
    }
}

/// Offset of the checksum in the L4 header, and the helper flags for it.
#[inline(always)]
fn l4_check(proto: u8) -> Option<(usize, u64)> {
    match proto {
        PROTO_TCP => Some((16, 0)),
        // A UDP checksum of 0 means "none" and stays so; a computed 0 becomes 0xffff.
        PROTO_UDP => Some((6, BPF_F_MARK_MANGLED_0 as u64)),
        _ => None,
    }
}

#[inline(always)]
fn lookup(
    src_be: [u8; 16],
    dst_be: [u8; 16],
    ports: [u8; 4],
    proto: u8,
    family: u8,
) -> Option<RevNatValue> {
    let key = FlowKey {
        src_be,
        dst_be,
        sport_be: u16::from_ne_bytes([ports[0], ports[1]]),
        dport_be: u16::from_ne_bytes([ports[2], ports[3]]),
        proto,
        family,
        _pad: [0; 2],
    };
    // SAFETY: the value is copied out at once.
    unsafe { LB_REVNAT.get(&key) }.copied()
}

/// Replace the source port (and its share of the L4 checksum).
#[inline(always)]
fn restore_port(ctx: &TcContext, l4: usize, check_off: usize, flags: u64, old: [u8; 2], new: u16) {
    let new = new.to_ne_bytes();
    if old == new {
        return;
    }
    let _ = ctx.l4_csum_replace(
        l4 + check_off,
        u16::from_ne_bytes(old) as u64,
        u16::from_ne_bytes(new) as u64,
        flags | 2,
    );
    let _ = ctx.store(l4, &new, 0);
}

#[inline(always)]
fn restore_v4(ctx: &TcContext, l3: usize) -> Option<()> {
    let vihl: u8 = ctx.load(l3).ok()?;
    let frags: [u8; 2] = ctx.load(l3 + 6).ok()?;
    let proto: u8 = ctx.load(l3 + 9).ok()?;
    let src: [u8; 4] = ctx.load(l3 + IPV4_SRC).ok()?;
    let dst: [u8; 4] = ctx.load(l3 + IPV4_SRC + 4).ok()?;
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 || frags[0] & 0x3f != 0 || frags[1] != 0 {
        return None;
    }
    let (check_off, flags) = l4_check(proto)?;
    let l4 = l3 + ihl;
    let ports: [u8; 4] = ctx.load(l4).ok()?;
    let src_be = lb_common::addr16_v4(src);
    let dst_be = lb_common::addr16_v4(dst);
    let orig = lookup(src_be, dst_be, ports, proto, FAMILY_V4)?;
    let old = u32::from_ne_bytes(src) as u64;
    let vip = [
        orig.vip_be[0],
        orig.vip_be[1],
        orig.vip_be[2],
        orig.vip_be[3],
    ];
    let new = u32::from_ne_bytes(vip) as u64;
    ctx.l4_csum_replace(
        l4 + check_off,
        old,
        new,
        flags | BPF_F_PSEUDO_HDR as u64 | 4,
    )
    .ok()?;
    ctx.l3_csum_replace(l3 + IPV4_CHECK, old, new, 4).ok()?;
    ctx.store(l3 + IPV4_SRC, &vip, 0).ok()?;
    restore_port(
        ctx,
        l4,
        check_off,
        flags,
        [ports[0], ports[1]],
        orig.port_be,
    );
    Some(())
}

#[inline(always)]
fn restore_v6(ctx: &TcContext, l3: usize) -> Option<()> {
    let proto: u8 = ctx.load(l3 + 6).ok()?;
    let (check_off, flags) = l4_check(proto)?;
    let src: [u8; 16] = ctx.load(l3 + IPV6_SRC).ok()?;
    let dst: [u8; 16] = ctx.load(l3 + IPV6_SRC + 16).ok()?;
    let l4 = l3 + IPV6_LEN;
    let ports: [u8; 4] = ctx.load(l4).ok()?;
    let orig = lookup(src, dst, ports, proto, FAMILY_V6)?;
    let mut old = src;
    let mut new = orig.vip_be;
    // SAFETY: both buffers are 16-byte stack arrays, as the sizes say.
    let diff =
        unsafe { bpf_csum_diff(old.as_mut_ptr().cast(), 16, new.as_mut_ptr().cast(), 16, 0) };
    if diff < 0 {
        return None;
    }
    ctx.l4_csum_replace(
        l4 + check_off,
        0,
        diff as u64,
        flags | BPF_F_PSEUDO_HDR as u64,
    )
    .ok()?;
    ctx.store(l3 + IPV6_SRC, &new, 0).ok()?;
    restore_port(
        ctx,
        l4,
        check_off,
        flags,
        [ports[0], ports[1]],
        orig.port_be,
    );
    Some(())
}
