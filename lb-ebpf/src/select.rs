//! VIP lookup and backend choice through the service's Maglev table.

use lb_common::{BackendValue, Reason, ServiceKey, ServiceValue, hash::flow_hash_v4};

use crate::{
    Verdict,
    maps::{LB_BACKENDS, LB_MAGLEV, LB_SERVICES},
    parse::PacketV4,
};

/// The service the packet is addressed to, the chosen backend's id and its entry.
#[inline(always)]
pub fn select_v4(pkt: &PacketV4) -> Result<(ServiceValue, u32, BackendValue), Verdict> {
    let key = ServiceKey::v4(pkt.dst_be, u16::from_ne_bytes(pkt.dport_be), pkt.proto);
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    let service = unsafe { LB_SERVICES.get(&key) }
        .copied()
        .ok_or(Verdict::pass(Reason::PassNotVip))?;
    if service.table_size == 0 {
        return Err(Verdict::drop(Reason::DropNoBackend));
    }
    let hash = flow_hash_v4(
        u32::from_ne_bytes(pkt.src_be),
        u32::from_ne_bytes(pkt.dst_be),
        u16::from_ne_bytes(pkt.sport_be),
        u16::from_ne_bytes(pkt.dport_be),
        pkt.proto,
    );
    let slot = service.table_offset.wrapping_add(hash % service.table_size);
    let backend_id = *LB_MAGLEV
        .get(slot)
        .ok_or(Verdict::drop(Reason::DropNoBackend))?;
    let backend = *LB_BACKENDS
        .get(backend_id)
        .ok_or(Verdict::drop(Reason::DropNoBackend))?;
    if !backend.is_valid() {
        return Err(Verdict::drop(Reason::DropNoBackend));
    }
    Ok((service, backend_id, backend))
}
