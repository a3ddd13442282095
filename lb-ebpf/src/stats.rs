//! Per-CPU counters: no atomics needed, each CPU owns its slot.

use lb_common::{Counters, Reason, ServiceCounters};

use crate::maps::{LB_BE_STATS, LB_REASONS, LB_SVC_STATS};

#[inline(always)]
fn bump(slot: Option<*mut Counters>, bytes: u64) {
    if let Some(c) = slot {
        // SAFETY: a per-CPU slot is only touched by this CPU while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
        }
    }
}

#[inline(always)]
pub fn count_reason(reason: Reason, bytes: u64) {
    bump(LB_REASONS.get_ptr_mut(reason as u32), bytes);
}

#[inline(always)]
pub fn count_service(id: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = LB_SVC_STATS.get_ptr_mut(id) {
        let c: *mut ServiceCounters = c;
        // SAFETY: as in `bump`.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += new_flow as u64;
        }
    }
}

#[inline(always)]
pub fn count_backend(id: u32, bytes: u64) {
    bump(LB_BE_STATS.get_ptr_mut(id), bytes);
}
