//! XDP programs of the load balancer. Entry points only: the logic lives in the modules.
#![no_std]
#![no_main]

mod csum;
mod decap;
mod encap;
mod icmp;
mod maps;
mod parse;
mod select;
mod stats;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    macros::xdp,
    programs::XdpContext,
};
use lb_common::{FAMILY_V4, Forwarding, Reason};

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
}

/// The load balancer: on the node's ingress interface.
#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let verdict = match try_lb(&ctx) {
        Ok(v) | Err(v) => v,
    };
    stats::count_reason(verdict.reason, len);
    verdict.action
}

fn try_lb(ctx: &XdpContext) -> Result<Verdict, Verdict> {
    let pkt = match parse::parse(ctx)? {
        parse::Parsed::Flow(pkt) => pkt,
        parse::Parsed::Echo(echo) => return icmp::echo_reply(ctx, &echo),
    };
    let service = select::service(&pkt)?;
    let cfg = encap::node_config()?;
    let len = (ctx.data_end() - ctx.data()) as u64;
    let sel = select::select(&pkt, service, &cfg, len)?;
    if pkt.icmp_error {
        stats::count_reason(Reason::IcmpToBackend, len);
    }
    stats::count_service(sel.service.id, len, sel.new_flow);
    stats::count_backend(sel.backend_id, len);
    match Forwarding::from_u8(sel.service.forwarding) {
        Some(Forwarding::L2) => encap::l2_rewrite(ctx, &pkt, &sel.backend, &cfg),
        Some(Forwarding::Ipip) => {
            // Only an IPv6 outer header uses the hash (flow label).
            let hash = if sel.backend.family == FAMILY_V4 {
                0
            } else {
                select::flow_hash(&pkt)
            };
            encap::encapsulate(ctx, &pkt, &sel.backend, &cfg, false, hash)
        }
        Some(Forwarding::Gue) => {
            encap::encapsulate(ctx, &pkt, &sel.backend, &cfg, true, select::flow_hash(&pkt))
        }
        None => Err(Verdict::drop(Reason::DropBadForwarding)),
    }
}

/// The backend side: strips the outer IPv4 header of IPIP packets.
#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let verdict = match decap::try_decap(&ctx) {
        Ok(v) | Err(v) => v,
    };
    stats::count_reason(verdict.reason, len);
    verdict.action
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
