//! Allocators of `sync::plan`: ids (services, backends) and regions of `LB_MAGLEV`. Both are
//! derived from a snapshot at the start of a plan, never stored.

use std::collections::BTreeMap;

use lb_common::ServiceValue;

/// Ids `0..max` not taken, handed out lowest first.
pub(super) struct IdPool {
    /// One bit per id; set: taken.
    taken: Vec<u64>,
    max: u32,
    /// Every id below this is taken.
    next: u32,
    /// Taken ids when built plus ids handed out since.
    count: usize,
}

impl IdPool {
    pub(super) fn new(max: u32, taken: impl IntoIterator<Item = u32>) -> Self {
        let mut pool = IdPool {
            taken: vec![0; (max as usize).div_ceil(64)],
            max,
            next: 0,
            count: 0,
        };
        for id in taken {
            pool.mark(id);
        }
        pool
    }

    /// `id` is taken (ids from `max` on are ignored).
    pub(super) fn mark(&mut self, id: u32) {
        if id < self.max && !self.is_taken(id) {
            self.set(id);
        }
    }

    fn is_taken(&self, id: u32) -> bool {
        self.taken[id as usize / 64] & (1 << (id % 64)) != 0
    }

    fn set(&mut self, id: u32) {
        self.taken[id as usize / 64] |= 1 << (id % 64);
        self.count += 1;
    }

    /// The lowest free id, now taken.
    pub(super) fn take(&mut self) -> Option<u32> {
        let mut word = self.next as usize / 64;
        while word < self.taken.len() {
            // Bits below `next` are all set, so the lowest clear bit is the lowest free id.
            let free = !self.taken[word];
            if free != 0 {
                let id = (word * 64) as u32 + free.trailing_zeros();
                if id >= self.max {
                    break;
                }
                self.set(id);
                self.next = id + 1;
                return Some(id);
            }
            word += 1;
        }
        self.next = self.max;
        None
    }

    /// Ids taken (those given to `new` below `max`, plus those handed out).
    pub(super) fn count(&self) -> usize {
        self.count
    }
}

/// First-fit allocator over the free gaps of `LB_MAGLEV`: every region a service entry points
/// to stays in use for the whole plan (packets may still read it), new tables go into gaps.
pub(super) struct Regions {
    /// Free gaps: offset → length, none empty, none touching a used slot.
    gaps: BTreeMap<u32, u32>,
}

impl Regions {
    pub(super) fn new<'a>(
        capacity: u32,
        services: impl IntoIterator<Item = &'a ServiceValue>,
    ) -> Self {
        let mut used: Vec<(u32, u32)> = services
            .into_iter()
            .filter(|v| v.table_size > 0)
            .map(|v| (v.table_offset, v.table_size))
            .collect();
        used.sort_unstable();
        let mut gaps = BTreeMap::new();
        let mut cursor = 0u32;
        for (off, len) in used {
            let start = off.min(capacity);
            if start > cursor {
                gaps.insert(cursor, start - cursor);
            }
            cursor = cursor.max(off.saturating_add(len));
        }
        if capacity > cursor {
            gaps.insert(cursor, capacity - cursor);
        }
        Regions { gaps }
    }

    /// The lowest offset where `size` slots are free, now used.
    pub(super) fn allocate(&mut self, size: u32) -> Option<u32> {
        let (&off, &len) = self.gaps.iter().find(|(_, len)| **len >= size)?;
        self.gaps.remove(&off);
        if len > size {
            self.gaps.insert(off + size, len - size);
        }
        Some(off)
    }

    /// Free slots (in all gaps together).
    pub(super) fn free(&self) -> u32 {
        self.gaps.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(table_offset: u32, table_size: u32) -> ServiceValue {
        ServiceValue {
            id: 0,
            table_offset,
            table_size,
            forwarding: 1,
            flags: 0,
            _pad: [0; 2],
            fingerprint: 0,
            affinity_timeout_s: 0,
            _pad2: [0; 4],
        }
    }

    #[test]
    fn ids_lowest_free_first() {
        let mut pool = IdPool::new(130, [0, 1, 3, 64, 200]);
        assert_eq!(pool.count(), 4); // 200 is out of range
        let got: Vec<u32> = std::iter::from_fn(|| pool.take()).take(5).collect();
        assert_eq!(got, [2, 4, 5, 6, 7]);
        let rest: Vec<u32> = std::iter::from_fn(|| pool.take()).collect();
        assert_eq!(rest.len(), 130 - 4 - 5);
        assert!(!rest.contains(&64));
        assert_eq!(rest.last(), Some(&129));
        assert_eq!(pool.take(), None);
        assert_eq!(pool.count(), 130);
    }

    #[test]
    fn regions_first_fit_between_used_ones() {
        // Used: [10, 20) and [25, 40); capacity 100.
        let used = [svc(10, 10), svc(25, 15), svc(0, 0)];
        let mut r = Regions::new(100, &used);
        assert_eq!(r.free(), 100 - 25);
        assert_eq!(r.allocate(11), Some(40)); // [0, 10) and [20, 25) are too small
        assert_eq!(r.allocate(5), Some(0));
        assert_eq!(r.allocate(5), Some(5));
        assert_eq!(r.allocate(5), Some(20));
        assert_eq!(r.allocate(49), Some(51));
        assert_eq!(r.allocate(1), None);
        assert_eq!(r.free(), 0);
    }

    #[test]
    fn regions_tolerate_overlaps_and_regions_past_capacity() {
        // Overlapping entries (never written by this agent) and a region past the end.
        let used = [svc(0, 50), svc(10, 5), svc(90, 20)];
        let mut r = Regions::new(100, &used);
        assert_eq!(r.free(), 40);
        assert_eq!(r.allocate(41), None);
        assert_eq!(r.allocate(40), Some(50));
    }
}
