//! XDP programs of the load balancer. Entry points only: the logic lives in the modules.
#![no_std]
#![no_main]
// Inline assembly: the one-instruction packet loads and stores of `words`.
#![feature(asm_experimental_arch)]

mod announce;
mod csum;
mod decap;
mod dnat;
mod encap;
mod icmp;
mod maps;
mod parse;
mod revnat;
mod select;
mod stats;
mod words;

use aya_ebpf::{
    bindings::{
        TC_ACT_OK,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    BACKEND_F_LOCAL, BACKEND_F_VIA_NODE, CONFIG_F_DECAP, FAMILY_V4, Forwarding, Reason,
    maps::PROGS_DECAP,
};

use crate::{
    maps::{LB_CONFIG, LB_PROGS},
    parse::Packet,
};

// Internal verdicts, never returned to the kernel. They lie above every XDP action, so the
// one compare on the way out that looks for them costs the other packets nothing more.
/// The packet (already encapsulated for a backend on this node) goes on to the decap program.
const ACTION_DECAP: u32 = u32::MAX;
/// An ARP packet, or an ICMPv6 Neighbor Solicitation: `announce` answers it if it asks for
/// a VIP this node owns. The parser only recognises them; the responder runs after the
/// parse, out of line, so none of it shares registers with the forwarding paths.
const ACTION_ARP: u32 = u32::MAX - 1;
const ACTION_SOLICIT: u32 = u32::MAX - 2;
/// The lowest internal verdict.
const ACTION_INTERNAL: u32 = ACTION_SOLICIT;

/// What to do with a packet, and the counter that explains it.
pub(crate) struct Verdict {
    pub action: u32,
    pub reason: Reason,
}

impl Verdict {
    pub const fn pass(reason: Reason) -> Self {
        Verdict {
            action: XDP_PASS,
            reason,
        }
    }
    pub const fn drop(reason: Reason) -> Self {
        Verdict {
            action: XDP_DROP,
            reason,
        }
    }
    pub const fn tx(reason: Reason) -> Self {
        Verdict {
            action: XDP_TX,
            reason,
        }
    }
    /// An ARP packet for `announce`; counted as not IP unless answered.
    pub const fn arp() -> Self {
        Verdict {
            action: ACTION_ARP,
            reason: Reason::PassNotIp,
        }
    }
    /// A Neighbor Solicitation for `announce`; counted as not for a VIP unless answered.
    pub const fn solicit() -> Self {
        Verdict {
            action: ACTION_SOLICIT,
            reason: Reason::PassNotVip,
        }
    }
}

/// Does this node decapsulate tunnel packets for its own endpoints?
#[inline(always)]
fn decap_enabled() -> bool {
    LB_CONFIG
        .get(0)
        .is_some_and(|c| c.flags & CONFIG_F_DECAP != 0)
}

/// The load balancer: on the node's ingress interface.
///
/// Every entry point is `inline(always)`: the macro turns this function into an inner one
/// of the real entry point, which LLVM leaves out of line once it is large, and every packet
/// would then pay a BPF-to-BPF call.
#[xdp]
#[inline(always)]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let mut verdict = match try_lb(&ctx) {
        Ok(v) | Err(v) => v,
    };
    if verdict.action >= ACTION_INTERNAL {
        if verdict.action == ACTION_DECAP {
            // A local backend: decap and translate here; the stack delivers it.
            stats::count_reason(verdict.reason, len);
            // SAFETY: tail call with our own context; it returns only if the slot is empty.
            unsafe { LB_PROGS.tail_call(&ctx, PROGS_DECAP) };
            stats::count_reason(Reason::DropNoDecap, len);
            return XDP_DROP;
        }
        verdict = if verdict.action == ACTION_ARP {
            announce::arp(&ctx)
        } else {
            announce::neighbor(&ctx)
        };
    }
    if verdict.reason as u32 == Reason::PassNotVip as u32 && decap_enabled() {
        // Possibly a tunnel packet for an endpoint here; the decap program counts it.
        // SAFETY: as above; an empty slot falls through to the plain pass.
        unsafe { LB_PROGS.tail_call(&ctx, PROGS_DECAP) };
    }
    stats::count_reason(verdict.reason, len);
    verdict.action
}

#[inline(always)]
fn try_lb(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    // Three copies of `forward`: each common case gets straight-line code.
    match parse::parse(ctx)? {
        parse::Parsed::Flow4(pkt) => forward(ctx, &pkt),
        parse::Parsed::Flow6(pkt) => forward(ctx, &pkt),
        parse::Parsed::Unusual(pkt) => forward(ctx, &pkt),
        parse::Parsed::Echo(echo) => icmp::echo_reply(ctx, &echo),
    }
}

/// Balance and forward a TCP/UDP packet (or an ICMP error about a flow).
#[inline(always)]
fn forward(ctx: &XdpContext, pkt: &Packet) -> Result<Verdict, Verdict> {
    let service = select::service(pkt)?;
    let cfg = encap::node_config()?;
    let len = (ctx.data_end() - ctx.data()) as u64;
    let sel = select::select(pkt, service, cfg, len)?;
    if pkt.icmp_error {
        stats::count_reason(Reason::IcmpToBackend, len);
    }
    stats::count_service(service.id, len, sel.new_flow);
    stats::count_backend(sel.backend_id, len);
    if sel.backend.flags & BACKEND_F_LOCAL != 0 {
        // The backend is a pod on this node: the tunnel header carries its address to the
        // decap program, which translates and passes the packet to the stack.
        encap::encapsulate(ctx, pkt, sel.backend, cfg, false, 0)?;
        return Ok(Verdict {
            action: ACTION_DECAP,
            reason: Reason::LocalBackend,
        });
    }
    // A pod behind its node is reached by GUE, which carries the pod's address.
    let via_node = sel.backend.flags & BACKEND_F_VIA_NODE != 0;
    match Forwarding::from_u8(service.forwarding) {
        Some(Forwarding::L2) => encap::l2_rewrite(ctx, sel.backend, cfg),
        Some(Forwarding::Ipip) if !via_node => {
            // Only an IPv6 outer header uses the hash (flow label).
            let hash = if sel.backend.family == FAMILY_V4 {
                0
            } else {
                if sel.flow_hash != 0 {
                    sel.flow_hash
                } else {
                    select::flow_hash(pkt)
                }
            };
            encap::encapsulate(ctx, pkt, sel.backend, cfg, false, hash)
        }
        Some(Forwarding::Gue | Forwarding::Ipip) => {
            let hash = if sel.flow_hash != 0 {
                sel.flow_hash
            } else {
                select::flow_hash(pkt)
            };
            encap::encapsulate(ctx, pkt, sel.backend, cfg, true, hash)
        }
        None => Err(Verdict::drop(Reason::DropBadForwarding)),
    }
}

/// The backend side: strips the outer IPv4 header of IPIP packets.
#[xdp]
#[inline(always)]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let verdict = match decap::try_decap(&ctx) {
        Ok(v) | Err(v) => v,
    };
    stats::count_reason(verdict.reason, len);
    verdict.action
}

/// The kernel's jiffies: all 64 bits over the first 8 bytes of the frame (in memory order),
/// the low 32 returned. Never attached: the agent runs it (BPF_PROG_TEST_RUN) twice, a
/// moment apart, to measure HZ (`NodeConfig::hz`), which containers cannot read, and to
/// read the clock its answer lease (`LB_L2_LEASE`) is kept in.
#[xdp]
pub fn lb_clock(ctx: XdpContext) -> u32 {
    // SAFETY: helper without arguments.
    let now = unsafe { aya_ebpf::helpers::bpf_jiffies64() };
    if let Some(p) = parse::ptr_at::<[u8; 8]>(&ctx, 0) {
        let b = now.to_ne_bytes();
        let p = p.cast::<u8>();
        // SAFETY: `ptr_at` checked the 8 bytes.
        unsafe {
            words::store32::<0>(p, u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
            words::store32::<4>(p, u32::from_ne_bytes([b[4], b[5], b[6], b[7]]));
        }
    }
    now as u32
}

/// Egress of a node with local endpoints: replies of translated flows get their VIP and
/// service port back. Never drops.
#[classifier]
#[inline(always)]
pub fn lb_revnat(ctx: TcContext) -> i32 {
    revnat::run(&ctx);
    TC_ACT_OK as i32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
