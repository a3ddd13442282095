//! Backend side of DSR to pods: after the decap program stripped the tunnel, a packet for a
//! local endpoint (`LB_DNAT`: VIP, port, protocol and the tunnel's destination = the pod's
//! address) is translated to the pod's address and target port, so the pod needs no VIP and
//! no tunnel of its own, and still sees the client's address. The reply direction is
//! remembered in `LB_REVNAT` for `lb_revnat`, which puts the VIP and port back on egress.
//!
//! Checksums are updated incrementally (RFC 1624) over the words that changed; a UDP/IPv4
//! datagram without a checksum keeps none. IPv6 packets with extension headers other than a
//! fragment header are left untranslated (passed as decapsulated).
//!
//! Fragments are translated for the endpoints of a service that takes its VIP's fragments
//! (the `DNAT_FRAGMENTS` entry of `LB_DNAT`; the load balancer sends every fragment of a
//! datagram to the same endpoint): a later fragment has no ports, so only its destination
//! address changes; the first one is translated as a whole packet of its port would be (its
//! transport checksum covers the whole datagram, and changes by the same words). The pod
//! reassembles them. Fragments for anyone else are passed as decapsulated.
//!
//! An ICMP "fragmentation needed" / ICMPv6 "packet too big" from the path about one of the
//! pod's replies (which left as VIP:port → client) is translated the same way, so the pod
//! learns the path MTU: its destination becomes the pod, and the packet it quotes becomes
//! pod:targetPort → client, as the pod sent it. The quoted transport checksum is left as
//! it is (it may be cut off, and no receiver checks it).

use aya_ebpf::programs::XdpContext;
use lb_common::{
    DNAT_FRAGMENTS, DnatKey, FAMILY_V4, FAMILY_V6, FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP,
    PROTO_UDP, Reason, RevNatValue,
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};

use crate::{
    Verdict,
    csum::{apply_diff, diff_words},
    maps::{LB_DNAT, LB_REVNAT},
    parse::ptr_at,
};

/// `BPF_ANY`.
const ANY: u64 = 0;

/// Offset of the TCP/UDP checksum field within the L4 header.
#[inline(always)]
fn check_offset(proto: u8) -> Option<usize> {
    match proto {
        PROTO_TCP => Some(16),
        PROTO_UDP => Some(6),
        _ => None,
    }
}

/// Translate the (decapsulated) IP packet at `l3_off` if it is for a local endpoint;
/// `backend_be` is the destination of the tunnel the packet came in (the endpoint's address),
/// `family` its family. Returns the decap verdict to report.
#[inline(always)]
pub fn translate(ctx: &XdpContext, l3_off: usize, backend_be: [u8; 16], family: u8) -> Verdict {
    let done = if family == FAMILY_V4 {
        translate_v4(ctx, l3_off, backend_be)
    } else {
        translate_v6(ctx, l3_off, backend_be)
    };
    match done {
        Some(()) => Verdict::pass(Reason::DecapDnat),
        None => Verdict::pass(Reason::DecapPass),
    }
}

/// The endpoint's target port for this packet, if it is for a local endpoint.
#[inline(always)]
fn target_port(
    vip_be: [u8; 16],
    backend_be: [u8; 16],
    dport: [u8; 2],
    proto: u8,
    family: u8,
) -> Option<[u8; 2]> {
    let key = DnatKey {
        vip_be,
        backend_be,
        port_be: u16::from_ne_bytes(dport),
        proto,
        family,
    };
    // SAFETY: the value is copied out at once.
    let value = unsafe { LB_DNAT.get(&key) }?;
    Some(value.target_port_be.to_ne_bytes())
}

/// Does the endpoint take the fragments of (`vip_be`, `proto`)?
#[inline(always)]
fn takes_fragments(vip_be: [u8; 16], backend_be: [u8; 16], proto: u8, family: u8) -> bool {
    let key = DnatKey {
        vip_be,
        backend_be,
        port_be: DNAT_FRAGMENTS,
        proto,
        family,
    };
    // SAFETY: only the presence is looked at.
    unsafe { LB_DNAT.get(&key) }.is_some()
}

/// IPv6 next header of a fragment header.
const IPV6_FRAGMENT: u8 = 44;

/// Remember how to restore the reply: endpoint:target → client:port becomes VIP:port again.
#[inline(always)]
fn remember_reply(
    backend_be: [u8; 16],
    client_be: [u8; 16],
    target: [u8; 2],
    ports: [u8; 4],
    proto: u8,
    family: u8,
    vip_be: [u8; 16],
) {
    let key = FlowKey {
        src_be: backend_be,
        dst_be: client_be,
        sport_be: u16::from_ne_bytes(target),
        dport_be: u16::from_ne_bytes([ports[0], ports[1]]),
        proto,
        family,
        _pad: [0; 2],
    };
    let value = RevNatValue::new(vip_be, u16::from_ne_bytes([ports[2], ports[3]]));
    // SAFETY: compared at once; a concurrent replacement is benign (same value).
    if unsafe { LB_REVNAT.get(&key) }.is_some_and(|v| *v == value) {
        return;
    }
    let _ = LB_REVNAT.insert(&key, &value, ANY);
}

/// ICMP type and code of "fragmentation needed", and ICMPv6 "packet too big".
const ICMP_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP6_TOO_BIG: u8 = 2;

/// Translate an ICMP "fragmentation needed" to VIP `dst` (outer IPv4 header at `l3`, its
/// ICMP message at `l4`) about a reply of a flow to a local endpoint.
#[inline(always)]
fn translate_icmp_v4(
    ctx: &XdpContext,
    ip: *mut Ipv4Hdr,
    l4: usize,
    dst: [u8; 4],
    ip_check: [u8; 2],
    backend_be: [u8; 16],
) -> Option<()> {
    let icmp: *mut [u8; 4] = ptr_at(ctx, l4)?;
    // SAFETY: `ptr_at` checked bounds.
    let head = unsafe { *icmp };
    if head[0] != ICMP_UNREACH || head[1] != ICMP_FRAG_NEEDED {
        return None;
    }
    // The quoted packet: a 20-byte IPv4 header (options are not translated) and ports.
    let quoted: *mut Ipv4Hdr = ptr_at(ctx, l4 + 8)?;
    let ports: *mut [u8; 4] = ptr_at(ctx, l4 + 8 + Ipv4Hdr::LEN)?;
    // SAFETY: `ptr_at` checked bounds.
    let (q_vihl, q_proto, q_src, q_check, old_ports) = unsafe {
        (
            (*quoted).vihl,
            (*quoted).proto,
            (*quoted).src_addr,
            (*quoted).check,
            *ports,
        )
    };
    // It quotes a reply from the VIP it was sent to.
    if q_vihl != 0x45 || q_src != dst {
        return None;
    }
    check_offset(q_proto)?;
    let vip_be = lb_common::addr16_v4(dst);
    let target = target_port(
        vip_be,
        backend_be,
        [old_ports[0], old_ports[1]],
        q_proto,
        FAMILY_V4,
    )?;
    let pod = [backend_be[0], backend_be[1], backend_be[2], backend_be[3]];
    let addr_diff = diff_words(&dst, &pod, 0);
    let new_ip_check = apply_diff(ip_check, addr_diff);
    let new_q_check = apply_diff(q_check, addr_diff);
    // The ICMP checksum covers the quoted source, its header checksum and its port.
    let icmp_diff = diff_words(
        &[old_ports[0], old_ports[1]],
        &target,
        diff_words(&q_check, &new_q_check, addr_diff),
    );
    let new_icmp_check = apply_diff([head[2], head[3]], icmp_diff);
    // SAFETY: the pointers were bounds-checked above and no helper moved the packet since.
    unsafe {
        (*ip).dst_addr = pod;
        (*ip).check = new_ip_check;
        (*quoted).src_addr = pod;
        (*quoted).check = new_q_check;
        (*ports)[0] = target[0];
        (*ports)[1] = target[1];
        (*icmp)[2] = new_icmp_check[0];
        (*icmp)[3] = new_icmp_check[1];
    }
    Some(())
}

/// Translate an ICMPv6 "packet too big" to VIP `dst` (its message at `l4`) about a reply of
/// a flow to a local endpoint. The ICMPv6 checksum also covers the destination address.
#[inline(always)]
fn translate_icmp_v6(
    ctx: &XdpContext,
    ip: *mut Ipv6Hdr,
    l4: usize,
    dst: [u8; 16],
    backend_be: [u8; 16],
) -> Option<()> {
    let icmp: *mut [u8; 4] = ptr_at(ctx, l4)?;
    // SAFETY: `ptr_at` checked bounds.
    let head = unsafe { *icmp };
    if head[0] != ICMP6_TOO_BIG || head[1] != 0 {
        return None;
    }
    let quoted: *mut Ipv6Hdr = ptr_at(ctx, l4 + 8)?;
    let ports: *mut [u8; 4] = ptr_at(ctx, l4 + 8 + Ipv6Hdr::LEN)?;
    // SAFETY: `ptr_at` checked bounds.
    let (q_next, q_src, old_ports) = unsafe { ((*quoted).next_hdr, (*quoted).src_addr, *ports) };
    if q_src != dst {
        return None;
    }
    check_offset(q_next)?;
    let target = target_port(
        dst,
        backend_be,
        [old_ports[0], old_ports[1]],
        q_next,
        FAMILY_V6,
    )?;
    // Outer destination (pseudo-header), quoted source, quoted port.
    let addr_diff = diff_words(&dst, &backend_be, 0);
    let diff = diff_words(
        &[old_ports[0], old_ports[1]],
        &target,
        addr_diff + addr_diff,
    );
    let new_check = apply_diff([head[2], head[3]], diff);
    // SAFETY: the pointers were bounds-checked above and no helper moved the packet since.
    unsafe {
        (*ip).dst_addr = backend_be;
        (*quoted).src_addr = backend_be;
        (*ports)[0] = target[0];
        (*ports)[1] = target[1];
        (*icmp)[2] = new_check[0];
        (*icmp)[3] = new_check[1];
    }
    Some(())
}

#[inline(always)]
fn translate_v4(ctx: &XdpContext, l3: usize, backend_be: [u8; 16]) -> Option<()> {
    let ip: *mut Ipv4Hdr = ptr_at(ctx, l3)?;
    // SAFETY: `ptr_at` checked bounds.
    let (vihl, proto, frags, src, dst, ip_check) = unsafe {
        (
            (*ip).vihl,
            (*ip).proto,
            (*ip).frags,
            (*ip).src_addr,
            (*ip).dst_addr,
            (*ip).check,
        )
    };
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return None;
    }
    let vip_be = lb_common::addr16_v4(dst);
    let new_dst = [backend_be[0], backend_be[1], backend_be[2], backend_be[3]];
    // More fragments, or an offset: one fragment of a datagram.
    if frags[0] & 0x3f != 0 || frags[1] != 0 {
        let check_off = check_offset(proto)?;
        if !takes_fragments(vip_be, backend_be, proto, FAMILY_V4) {
            return None;
        }
        if frags[0] & 0x1f != 0 || frags[1] != 0 {
            // A later fragment: the address alone.
            let new_ip_check = apply_diff(ip_check, diff_words(&dst, &new_dst, 0));
            // SAFETY: `ptr_at` checked bounds and no helper moved the packet since.
            unsafe {
                (*ip).dst_addr = new_dst;
                (*ip).check = new_ip_check;
            }
            return Some(());
        }
        // The first one must hold the ports and the checksum it translates.
        // SAFETY: `ptr_at` checked bounds.
        let tot_len = u16::from_be_bytes(unsafe { (*ip).tot_len }) as usize;
        if tot_len < ihl + check_off + 2 {
            return None;
        }
    } else if proto == PROTO_ICMP {
        return translate_icmp_v4(ctx, ip, l3 + ihl, dst, ip_check, backend_be);
    }
    let check_off = check_offset(proto)?;
    let l4 = l3 + ihl;
    let ports: *mut [u8; 4] = ptr_at(ctx, l4)?;
    let l4_check: *mut [u8; 2] = ptr_at(ctx, l4 + check_off)?;
    // SAFETY: `ptr_at` checked bounds.
    let (old_ports, old_check) = unsafe { (*ports, *l4_check) };
    let target = target_port(
        vip_be,
        backend_be,
        [old_ports[2], old_ports[3]],
        proto,
        FAMILY_V4,
    )?;
    let addr_diff = diff_words(&dst, &new_dst, 0);
    let new_ip_check = apply_diff(ip_check, addr_diff);
    // A UDP/IPv4 datagram may carry no checksum (0); it keeps none.
    let new_l4_check = if proto == PROTO_UDP && old_check == [0, 0] {
        old_check
    } else {
        let c = apply_diff(
            old_check,
            diff_words(&[old_ports[2], old_ports[3]], &target, addr_diff),
        );
        if proto == PROTO_UDP && c == [0, 0] {
            [0xff, 0xff]
        } else {
            c
        }
    };
    let src_be = lb_common::addr16_v4(src);
    // SAFETY: the pointers were bounds-checked above and no helper moved the packet since.
    unsafe {
        (*ip).dst_addr = new_dst;
        (*ip).check = new_ip_check;
        (*ports)[2] = target[0];
        (*ports)[3] = target[1];
        *l4_check = new_l4_check;
    }
    remember_reply(
        backend_be, src_be, target, old_ports, proto, FAMILY_V4, vip_be,
    );
    Some(())
}

#[inline(always)]
fn translate_v6(ctx: &XdpContext, l3: usize, backend_be: [u8; 16]) -> Option<()> {
    let ip: *mut Ipv6Hdr = ptr_at(ctx, l3)?;
    // SAFETY: `ptr_at` checked bounds.
    let (v, next, src, dst, payload_len) = unsafe {
        (
            (*ip).vcf[0] >> 4,
            (*ip).next_hdr,
            (*ip).src_addr,
            (*ip).dst_addr,
            u16::from_be_bytes((*ip).payload_len) as usize,
        )
    };
    if v != 6 {
        return None;
    }
    if next == PROTO_ICMPV6 {
        return translate_icmp_v6(ctx, ip, l3 + Ipv6Hdr::LEN, dst, backend_be);
    }
    let (proto, l4) = if next == IPV6_FRAGMENT {
        // Next header, reserved, then offset (13 bits), two reserved bits and M.
        let fh: *const [u8; 4] = ptr_at(ctx, l3 + Ipv6Hdr::LEN)?;
        // SAFETY: `ptr_at` checked bounds.
        let fh = unsafe { *fh };
        let proto = fh[0];
        let check_off = check_offset(proto)?;
        let offset_m = u16::from_be_bytes([fh[2], fh[3]]);
        // An atomic fragment (offset 0, no more) is a whole packet.
        if offset_m & 0xfff9 != 0 {
            if !takes_fragments(dst, backend_be, proto, FAMILY_V6) {
                return None;
            }
            if offset_m & 0xfff8 != 0 {
                // A later fragment: the address alone (IPv6 has no header checksum).
                // SAFETY: `ptr_at` checked bounds and no helper moved the packet since.
                unsafe { (*ip).dst_addr = backend_be };
                return Some(());
            }
            if payload_len < 8 + check_off + 2 {
                return None;
            }
        }
        (proto, l3 + Ipv6Hdr::LEN + 8)
    } else {
        // Other extension headers: not translated (the packet is passed as decapsulated).
        (next, l3 + Ipv6Hdr::LEN)
    };
    let check_off = check_offset(proto)?;
    let ports: *mut [u8; 4] = ptr_at(ctx, l4)?;
    let l4_check: *mut [u8; 2] = ptr_at(ctx, l4 + check_off)?;
    // SAFETY: `ptr_at` checked bounds.
    let (old_ports, old_check) = unsafe { (*ports, *l4_check) };
    let target = target_port(
        dst,
        backend_be,
        [old_ports[2], old_ports[3]],
        proto,
        FAMILY_V6,
    )?;
    let diff = diff_words(
        &[old_ports[2], old_ports[3]],
        &target,
        diff_words(&dst, &backend_be, 0),
    );
    let mut new_check = apply_diff(old_check, diff);
    if proto == PROTO_UDP && new_check == [0, 0] {
        new_check = [0xff, 0xff];
    }
    // SAFETY: the pointers were bounds-checked above and no helper moved the packet since.
    unsafe {
        (*ip).dst_addr = backend_be;
        (*ports)[2] = target[0];
        (*ports)[3] = target[1];
        *l4_check = new_check;
    }
    remember_reply(backend_be, src, target, old_ports, proto, FAMILY_V6, dst);
    Some(())
}
