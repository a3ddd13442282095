//! Backend side: remove the outer headers of IP-in-IP (IPIP, IP6IP6, 4in6, 6in4) and GUE
//! packets and hand the inner packet to the stack, so no tunnel kernel module is needed.
//!
//! GUE is recognised by the UDP destination port in `LB_CONFIG[0].gue_port_be` (set by
//! `lb-agent decap --gue-port`); both GUE variant 1 (the IP packet right after UDP, as the
//! load balancer sends it and Linux FOU does) and variant 0 (a GUE header first) are
//! accepted. A GUE control message, or anything that is not a tunnel packet, is passed
//! untouched.
//!
//! Only tunnels between known parties are opened: the outer source must be in
//! `LB_DECAP_SRC` (the load-balancer nodes, as the agent keeps them) and the outer
//! destination in `LB_DECAP_DST` (this node's addresses and its local endpoints'). Anyone
//! else's tunnel packet is passed untouched and counted (`PassDecapNotAllowed`): without
//! tunnel modules the stack drops it, so nobody can inject packets with a forged inner
//! source through this program.
//!
//! A decapsulated packet for an endpoint on this node (`LB_DNAT`) is then translated to the
//! endpoint's address and port (`dnat`); `lb_xdp` tail-calls this program for tunnel packets
//! when the node decapsulates (`CONFIG_F_DECAP`), and for its own local backends.

use aya_ebpf::{btf_maps::lpm_trie::Key, helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    CONFIG_F_VALID, DecapAddr, FAMILY_V4, FAMILY_V6, PROTO_IPIP, PROTO_IPV6, PROTO_UDP, Reason,
};
use network_types::{
    eth::{EthHdr, EtherType},
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
};

use crate::{
    Verdict, dnat,
    encap::write_l2,
    maps::{LB_CONFIG, LB_DECAP_DST, LB_DECAP_SRC},
    parse::{L2, parse_l2, ptr_at},
    words::load_mac,
};

/// The node's GUE port (network byte order), or 0 when GUE decapsulation is off.
#[inline(always)]
fn gue_port_be() -> u16 {
    match LB_CONFIG.get(0) {
        Some(c) if c.flags & CONFIG_F_VALID != 0 => c.gue_port_be,
        _ => 0,
    }
}

/// The outer IP header: its length, what follows it, its addresses and family (`Err`: not
/// an IP packet).
struct Outer {
    len: usize,
    proto: u8,
    src_be: [u8; 16],
    dst_be: [u8; 16],
    family: u8,
}

#[inline(always)]
fn outer_ip(ctx: &XdpContext, l2: &L2) -> Result<Outer, Verdict> {
    let l3 = l2.l3_off;
    if l2.ether_type == EtherType::Ipv4 as u16 {
        let ip: *const Ipv4Hdr = ptr_at(ctx, l3).ok_or(Verdict::pass(Reason::PassMalformed))?;
        // SAFETY: `ptr_at` checked bounds.
        let (vihl, proto, frags, src, dst) = unsafe {
            (
                (*ip).vihl,
                (*ip).proto,
                (*ip).frags,
                (*ip).src_addr,
                (*ip).dst_addr,
            )
        };
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
            return Err(Verdict::pass(Reason::PassMalformed));
        }
        // A fragmented outer packet must be reassembled by the stack first.
        if frags[0] & 0x3f != 0 || frags[1] != 0 {
            return Err(Verdict::pass(Reason::PassFragment));
        }
        Ok(Outer {
            len: ihl,
            proto,
            src_be: lb_common::addr16_v4(src),
            dst_be: lb_common::addr16_v4(dst),
            family: FAMILY_V4,
        })
    } else if l2.ether_type == EtherType::Ipv6 as u16 {
        let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(Verdict::pass(Reason::PassMalformed))?;
        // SAFETY: `ptr_at` checked bounds.
        let (v, next, src_be, dst_be) = unsafe {
            (
                (*ip).vcf[0] >> 4,
                (*ip).next_hdr,
                (*ip).src_addr,
                (*ip).dst_addr,
            )
        };
        if v != 6 {
            return Err(Verdict::pass(Reason::PassMalformed));
        }
        Ok(Outer {
            len: Ipv6Hdr::LEN,
            proto: next,
            src_be,
            dst_be,
            family: FAMILY_V6,
        })
    } else {
        Err(Verdict::pass(Reason::PassNotIp))
    }
}

/// Is the tunnel between parties the agent allows: from an allowed sender to this node?
#[inline(always)]
fn allowed(outer: &Outer) -> bool {
    let key = |addr_be| {
        Key::new(
            DecapAddr::FAMILY_BITS + 128,
            DecapAddr::new(addr_be, outer.family),
        )
    };
    LB_DECAP_DST.get(&key(outer.dst_be)).is_some() && LB_DECAP_SRC.get(&key(outer.src_be)).is_some()
}

/// A GUE packet's headers after the outer IP header: the bytes to strip (UDP and any GUE
/// header), and the pod its private data names (a tunnel to the pod's node,
/// `lb_common::gue_pod_header`) with that address's family.
struct Gue {
    strip: usize,
    pod: Option<([u8; 16], u8)>,
}

#[inline(always)]
fn gue(ctx: &XdpContext, off: usize) -> Result<Gue, Verdict> {
    let port = gue_port_be();
    let udp: *const UdpHdr = ptr_at(ctx, off).ok_or(Verdict::pass(Reason::PassMalformed))?;
    // SAFETY: `ptr_at` checked bounds.
    let dport = u16::from_ne_bytes(unsafe { (*udp).dst });
    if port == 0 || dport != port {
        return Err(Verdict::pass(Reason::PassNotVip));
    }
    let first: *const [u8; 2] =
        ptr_at(ctx, off + UdpHdr::LEN).ok_or(Verdict::pass(Reason::PassMalformed))?;
    // SAFETY: `ptr_at` checked bounds.
    let b = unsafe { *first };
    match b[0] >> 6 {
        // Variant 1: the IP header itself.
        0b01 => Ok(Gue {
            strip: UdpHdr::LEN,
            pod: None,
        }),
        // Variant 0 data message: 4-byte header plus hlen words of options; one address
        // of private data (and no flags) names a pod.
        0b00 if b[0] & 0x20 == 0 => {
            let hlen = (b[0] & 0x1f) as usize;
            let opt = off + UdpHdr::LEN + 4;
            let flags: *const [u8; 4] =
                ptr_at(ctx, off + UdpHdr::LEN).ok_or(Verdict::pass(Reason::PassMalformed))?;
            // SAFETY: `ptr_at` checked bounds.
            let no_flags = unsafe { (*flags)[2] == 0 && (*flags)[3] == 0 };
            let pod = match hlen {
                1 if no_flags => {
                    let p: *const [u8; 4] =
                        ptr_at(ctx, opt).ok_or(Verdict::pass(Reason::PassMalformed))?;
                    // SAFETY: `ptr_at` checked bounds.
                    Some((lb_common::addr16_v4(unsafe { *p }), FAMILY_V4))
                }
                4 if no_flags => {
                    let p: *const [u8; 16] =
                        ptr_at(ctx, opt).ok_or(Verdict::pass(Reason::PassMalformed))?;
                    // SAFETY: `ptr_at` checked bounds.
                    Some((unsafe { *p }, FAMILY_V6))
                }
                _ => None,
            };
            Ok(Gue {
                strip: UdpHdr::LEN + 4 + hlen * 4,
                pod,
            })
        }
        _ => Err(Verdict::pass(Reason::PassNotVip)),
    }
}

#[inline(always)]
pub fn try_decap(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    let l2 = parse_l2(ctx).ok_or(Verdict::pass(Reason::PassMalformed))?;
    let outer = outer_ip(ctx, &l2)?;
    let proto = outer.proto;
    let (strip, pod) = match proto {
        PROTO_IPIP | PROTO_IPV6 => (outer.len, None),
        PROTO_UDP => {
            let g = gue(ctx, l2.l3_off + outer.len)?;
            (outer.len + g.strip, g.pod)
        }
        _ => return Err(Verdict::pass(Reason::PassNotVip)),
    };
    // The inner packet decides the new ethertype; it must agree with an IP-in-IP protocol.
    // (Four bytes, not one: a one-byte bound check is compiled to a comparison the
    // verifier cannot take as a range for this variable offset.)
    let inner: *const [u8; 4] =
        ptr_at(ctx, l2.l3_off + strip).ok_or(Verdict::pass(Reason::PassMalformed))?;
    // SAFETY: `ptr_at` checked bounds.
    let version = unsafe { (*inner)[0] } >> 4;
    let (ether_type, family) = match (version, proto) {
        (4, PROTO_IPIP | PROTO_UDP) => (EtherType::Ipv4 as u16, FAMILY_V4),
        (6, PROTO_IPV6 | PROTO_UDP) => (EtherType::Ipv6 as u16, FAMILY_V6),
        _ => return Err(Verdict::pass(Reason::PassMalformed)),
    };
    // A tunnel packet: opened only between the parties the agent allows.
    if !allowed(&outer) {
        return Err(Verdict::pass(Reason::PassDecapNotAllowed));
    }
    // The endpoint it names: the pod in the GUE header (a tunnel to the pod's node), if it
    // is of the inner family, else the tunnel's destination (a tunnel to the pod itself).
    let endpoint_be = match pod {
        Some((addr, f)) if f == family => addr,
        _ => outer.dst_be,
    };

    // Keep the L2 header, moved forward over the outer headers.
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Verdict::pass(Reason::PassMalformed))?;
    // SAFETY: `ptr_at` checked bounds.
    let (dst, src) = unsafe { (load_mac::<0>(eth.cast()), load_mac::<6>(eth.cast())) };
    // SAFETY: helper call on our own context; every pointer is re-derived afterwards.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, strip as i32) } != 0 {
        return Err(Verdict::pass(Reason::PassMalformed));
    }
    write_l2(ctx, &l2, dst, src, ether_type)?;
    // Only a tunnel of the inner packet's family names an endpoint address it can take.
    if family != outer.family {
        return Ok(Verdict::pass(Reason::DecapPass));
    }
    Ok(dnat::translate(ctx, l2.l3_off, endpoint_be, family))
}
