//! The backend entries of a snapshot, grouped by service id and sorted by address within a
//! group, so `plan` matches a service's desired backends against them by merging two sorted
//! lists: no per-backend map lookups, and one pass over the snapshot per plan.

use std::{collections::BTreeMap, net::IpAddr, ops::Range};

use lb_common::{BackendValue, maps::MAX_SERVICES};

use super::{alloc::IdPool, ip_from_bytes};

#[derive(Clone, Copy)]
struct Entry<'a> {
    service_id: u32,
    ip: IpAddr,
    id: u32,
    value: &'a BackendValue,
}

/// Existing entries, in (service id, address, backend id) order.
pub(super) struct Existing<'a> {
    entries: Vec<Entry<'a>>,
    /// Service id `s < MAX_SERVICES` → its group `starts[s]..starts[s + 1]`. Entries of larger
    /// service ids (never written by this agent) follow the dense ones.
    starts: Vec<u32>,
    used: Vec<bool>,
    used_count: usize,
}

/// Where a merge over one service's group stands.
pub(super) struct Cursor {
    pos: usize,
    end: usize,
}

/// One existing entry found for a desired backend.
pub(super) struct Found<'a> {
    index: usize,
    pub id: u32,
    pub value: &'a BackendValue,
}

impl<'a> Existing<'a> {
    /// Index the valid entries of `backends` (entries whose family is unknown are left out,
    /// so they are neither reused nor cleared), and mark every id of `backends` taken in
    /// `ids` (in the same pass).
    pub(super) fn new(backends: &'a BTreeMap<u32, BackendValue>, ids: &mut IdPool) -> Self {
        let mut entries = Vec::with_capacity(backends.len());
        let mut sorted = true;
        for (&id, value) in backends {
            ids.mark(id);
            let Some(ip) = ip_from_bytes(&value.addr_be, value.family) else {
                continue;
            };
            let e = Entry {
                service_id: value.service_id,
                ip,
                id,
                value,
            };
            if let Some(last) = entries.last() {
                sorted &= order(last) <= order(&e);
            }
            entries.push(e);
        }
        // Ids are handed out in plan order, so entries start out sorted; churn shuffles them.
        if !sorted {
            entries = sort(entries);
        }
        let dense = MAX_SERVICES as usize;
        let mut starts = Vec::with_capacity(dense + 1);
        for (i, e) in entries.iter().enumerate() {
            let s = (e.service_id as usize).min(dense);
            while starts.len() <= s {
                starts.push(i as u32);
            }
        }
        starts.resize(dense + 1, entries.len() as u32);
        Existing {
            used: vec![false; entries.len()],
            used_count: 0,
            entries,
            starts,
        }
    }

    fn group(&self, service_id: u32) -> Range<usize> {
        if let Some(&start) = self.starts.get(service_id as usize)
            && let Some(&end) = self.starts.get(service_id as usize + 1)
        {
            return start as usize..end as usize;
        }
        let dense_end = self.starts.last().map_or(0, |&n| n as usize);
        let rest = &self.entries[dense_end..];
        let start = dense_end + rest.partition_point(|e| e.service_id < service_id);
        let end = dense_end + rest.partition_point(|e| e.service_id <= service_id);
        start..end
    }

    /// Start a merge over the entries of `service_id`; feed [`Existing::find`] that service's
    /// desired addresses in ascending order.
    pub(super) fn cursor(&self, service_id: u32) -> Cursor {
        let g = self.group(service_id);
        Cursor {
            pos: g.start,
            end: g.end,
        }
    }

    /// The entry of the cursor's service for `ip`, if any (the lowest backend id if several).
    pub(super) fn find(&self, cursor: &mut Cursor, ip: IpAddr) -> Option<Found<'a>> {
        while cursor.pos < cursor.end && self.entries[cursor.pos].ip < ip {
            cursor.pos += 1;
        }
        let e = self
            .entries
            .get(cursor.pos)
            .filter(|_| cursor.pos < cursor.end)?;
        if e.ip != ip {
            return None;
        }
        let index = cursor.pos;
        cursor.pos += 1;
        Some(Found {
            index,
            id: e.id,
            value: e.value,
        })
    }

    /// The entry stays (it is not cleared at the end of the plan).
    pub(super) fn keep(&mut self, found: &Found<'_>) {
        if !std::mem::replace(&mut self.used[found.index], true) {
            self.used_count += 1;
        }
    }

    /// Ids of the entries not kept, in (service id, address) order.
    pub(super) fn unused(&self) -> impl Iterator<Item = u32> + '_ {
        // Usually every entry is kept: then there is nothing to walk.
        let entries = if self.used_count == self.entries.len() {
            &[][..]
        } else {
            &self.entries[..]
        };
        entries
            .iter()
            .zip(&self.used)
            .filter(|(_, used)| !**used)
            .map(|(e, _)| e.id)
    }
}

/// The order of [`Existing`]'s entries.
fn order(e: &Entry<'_>) -> (u32, IpAddr, u32) {
    (e.service_id, e.ip, e.id)
}

/// Sort by [`order`] in linear time: a counting sort by service id (dense below
/// `MAX_SERVICES`, the rest sorted after them), then each service's few entries.
fn sort(entries: Vec<Entry<'_>>) -> Vec<Entry<'_>> {
    let Some(&first) = entries.first() else {
        return entries;
    };
    let dense = MAX_SERVICES as usize;
    let mut next = vec![0u32; dense + 1];
    for e in &entries {
        if let Some(n) = next.get_mut(e.service_id as usize + 1) {
            *n += 1;
        }
    }
    for s in 1..=dense {
        next[s] += next[s - 1];
    }
    let mut overflow = next[dense] as usize;
    let mut out = vec![first; entries.len()];
    for e in entries {
        let slot = match next.get_mut(e.service_id as usize) {
            Some(n) if (e.service_id as usize) < dense => {
                *n += 1;
                *n as usize - 1
            }
            _ => {
                overflow += 1;
                overflow - 1
            }
        };
        out[slot] = e;
    }
    for group in out.chunk_by_mut(|a, b| a.service_id == b.service_id) {
        if !group.is_sorted_by_key(order) {
            group.sort_unstable_by_key(order);
        }
    }
    let dense_end = out.partition_point(|e| (e.service_id as usize) < dense);
    out[dense_end..].sort_unstable_by_key(order);
    out
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use lb_common::{BACKEND_F_VALID, FAMILY_V4};

    use super::*;

    fn value(service_id: u32, last: u8) -> BackendValue {
        let mut addr_be = [0; 16];
        addr_be[..4].copy_from_slice(&[198, 18, 0, last]);
        BackendValue {
            addr_be,
            mac: [2, 0, 0, 0, 0, last],
            family: FAMILY_V4,
            flags: BACKEND_F_VALID,
            service_id,
            _pad: [0; 4],
            via_be: [0; 16],
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, last))
    }

    #[test]
    fn merge_finds_entries_per_service_and_reports_the_rest_in_order() {
        let backends: BTreeMap<u32, BackendValue> = [
            (0, value(1, 30)),
            (1, value(0, 20)),
            (2, value(1, 10)),
            (3, value(0, 10)),
            (4, value(MAX_SERVICES + 5, 10)),
            (5, value(1, 30)), // a duplicate (service 1, .30): the lower id is used
            (
                6,
                BackendValue {
                    family: 9,
                    ..value(1, 40)
                },
            ),
        ]
        .into();
        let mut ex = Existing::new(&backends, &mut IdPool::new(8, []));
        let mut c = ex.cursor(1);
        assert!(ex.find(&mut c, ip(5)).is_none());
        let f = ex.find(&mut c, ip(10)).unwrap();
        assert_eq!(f.id, 2);
        ex.keep(&f);
        assert!(ex.find(&mut c, ip(20)).is_none());
        let f = ex.find(&mut c, ip(30)).unwrap();
        assert_eq!((f.id, f.value.service_id), (0, 1));
        ex.keep(&f);
        assert!(ex.find(&mut c, ip(40)).is_none()); // unknown family: not indexed
        let mut c = ex.cursor(MAX_SERVICES + 5);
        assert_eq!(ex.find(&mut c, ip(10)).map(|f| f.id), Some(4));
        let mut c = ex.cursor(7);
        assert!(ex.find(&mut c, ip(10)).is_none());
        // Not kept: service 0's .10 and .20, service 1's duplicate, the overflow entry.
        assert_eq!(ex.unused().collect::<Vec<_>>(), [3, 1, 5, 4]);
    }

    #[test]
    fn nothing_unused_when_all_kept() {
        let backends: BTreeMap<u32, BackendValue> = [(0, value(0, 1)), (1, value(0, 2))].into();
        let mut ex = Existing::new(&backends, &mut IdPool::new(8, []));
        let mut c = ex.cursor(0);
        for last in [1, 2] {
            let f = ex.find(&mut c, ip(last)).unwrap();
            ex.keep(&f);
        }
        assert_eq!(ex.unused().count(), 0);
    }
}
