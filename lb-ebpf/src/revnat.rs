//! Egress side of DSR to pods (TC, on the node's interface): a reply of a flow that `dnat`
//! translated leaves from the endpoint's address and target port; it gets the VIP and the
//! service port back, so the client sees the answer from the address it asked. Anything
//! else leaves untouched.
//!
//! A fragmented reply (a large UDP answer, as DNS gives) is restored too: its first fragment
//! has the ports and is matched as above; its 5-tuple's VIP is then remembered under the
//! fragments' IP identification (`LB_REVNAT_FRAG`), and the later fragments, which have no
//! ports, get that VIP as their source. A stack sends a datagram's fragments in order, the
//! first one first; a later fragment whose first one was not seen leaves as it is.
//!
//! Checksums go through the kernel's helpers, which also handle a checksum the device is
//! still to finish (`CHECKSUM_PARTIAL`, the usual case for locally generated traffic).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_csum_diff,
    programs::TcContext,
};
use lb_common::{
    FAMILY_V4, FAMILY_V6, FlowKey, FragKey, PROTO_TCP, PROTO_UDP, Reason, RevNatValue,
};
use network_types::eth::{EthHdr, EtherType};

use crate::{
    maps::{LB_REVNAT, LB_REVNAT_FRAG},
    stats,
};

const IPV4_CHECK: usize = 10;
const IPV4_SRC: usize = 12;
const IPV6_SRC: usize = 8;
const IPV6_LEN: usize = 40;
const IPV4_ID: usize = 4;
/// IPv6 next header of a fragment header, and that header's length.
const IPV6_FRAGMENT: u8 = 44;
const IPV6_FRAG_LEN: usize = 8;

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

/// The VIP the first fragment of this fragmented reply got.
#[inline(always)]
fn frag_lookup(key: &FragKey) -> Option<RevNatValue> {
    // SAFETY: the value is copied out at once.
    unsafe { LB_REVNAT_FRAG.get(key) }.copied()
}

#[inline(always)]
fn frag_key(src_be: [u8; 16], dst_be: [u8; 16], id: [u8; 4], proto: u8, family: u8) -> FragKey {
    FragKey {
        src_be,
        dst_be,
        id,
        proto,
        family,
        _pad: [0; 2],
    }
}

/// Replace the source port (and its share of the L4 checksum) with `orig`'s, the last step
/// of a restored reply; the first fragment of one (`key`) leaves its VIP for the later ones.
#[inline(always)]
fn finish_reply(
    ctx: &TcContext,
    l4: usize,
    check_off: usize,
    flags: u64,
    old: [u8; 2],
    orig: &RevNatValue,
    key: Option<FragKey>,
) {
    if let Some(key) = key {
        let _ = LB_REVNAT_FRAG.insert(&key, orig, 0);
    }
    let new = orig.port_be.to_ne_bytes();
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
    if vihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    let (check_off, flags) = l4_check(proto)?;
    let src_be = lb_common::addr16_v4(src);
    let dst_be = lb_common::addr16_v4(dst);
    // More fragments, or an offset: one fragment of a datagram.
    let fragment = frags[0] & 0x3f != 0 || frags[1] != 0;
    let key = if fragment {
        let id: [u8; 2] = ctx.load(l3 + IPV4_ID).ok()?;
        Some(frag_key(
            src_be,
            dst_be,
            [id[0], id[1], 0, 0],
            proto,
            FAMILY_V4,
        ))
    } else {
        None
    };
    let old = u32::from_ne_bytes(src) as u64;
    if let Some(key) = key
        .as_ref()
        .filter(|_| frags[0] & 0x1f != 0 || frags[1] != 0)
    {
        // A later fragment: the address alone.
        let orig = frag_lookup(key)?;
        let vip = [
            orig.vip_be[0],
            orig.vip_be[1],
            orig.vip_be[2],
            orig.vip_be[3],
        ];
        ctx.l3_csum_replace(l3 + IPV4_CHECK, old, u32::from_ne_bytes(vip) as u64, 4)
            .ok()?;
        ctx.store(l3 + IPV4_SRC, &vip, 0).ok()?;
        return Some(());
    }
    let l4 = l3 + ihl;
    let ports: [u8; 4] = ctx.load(l4).ok()?;
    let orig = lookup(src_be, dst_be, ports, proto, FAMILY_V4)?;
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
    finish_reply(ctx, l4, check_off, flags, [ports[0], ports[1]], &orig, key);
    Some(())
}

#[inline(always)]
fn restore_v6(ctx: &TcContext, l3: usize) -> Option<()> {
    let next: u8 = ctx.load(l3 + 6).ok()?;
    let src: [u8; 16] = ctx.load(l3 + IPV6_SRC).ok()?;
    let dst: [u8; 16] = ctx.load(l3 + IPV6_SRC + 16).ok()?;
    // A fragment header (next header, reserved, offset and M, identification): the fragment's
    // key, and whether it is a later one. An atomic fragment (offset 0, no more) is a whole
    // packet.
    let (proto, l4, key, later) = if next == IPV6_FRAGMENT {
        let fh: [u8; IPV6_FRAG_LEN] = ctx.load(l3 + IPV6_LEN).ok()?;
        let offset_m = u16::from_be_bytes([fh[2], fh[3]]);
        let key = (offset_m & 0xfff9 != 0)
            .then(|| frag_key(src, dst, [fh[4], fh[5], fh[6], fh[7]], fh[0], FAMILY_V6));
        (
            fh[0],
            l3 + IPV6_LEN + IPV6_FRAG_LEN,
            key,
            offset_m & 0xfff8 != 0,
        )
    } else {
        (next, l3 + IPV6_LEN, None, false)
    };
    let (check_off, flags) = l4_check(proto)?;
    if let Some(key) = key.as_ref().filter(|_| later) {
        // A later fragment: the address alone (IPv6 has no header checksum).
        let orig = frag_lookup(key)?;
        ctx.store(l3 + IPV6_SRC, &orig.vip_be, 0).ok()?;
        return Some(());
    }
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
    finish_reply(ctx, l4, check_off, flags, [ports[0], ports[1]], &orig, key);
    Some(())
}
