//! Memo of Maglev table fingerprints, so a plan rebuilds only the tables whose inputs changed.
//!
//! `sync::plan` needs every service's table fingerprint to tell whether the table in the maps
//! is the one it wants; building every table for that is most of the cost of a plan at 10,000
//! services. A table is a pure function of its members (key, backend id, weight, in the order
//! given) and its size, so its fingerprint can be remembered per service next to the exact
//! inputs it was computed from: a hit gives the same answer as a rebuild, whatever the maps
//! hold. Only fingerprints are kept (a table is rebuilt when it must be written), about 300
//! bytes per service of 10 backends.
//!
//! A plan looks up every service in ascending order, so the memo is two sorted lists walked
//! with a cursor (the previous plan's, and the one being built) with the members of all
//! services in one flat array each: a plan reads and writes memory sequentially.

use lb_common::maglev::{self, MaglevBackend, MaglevError};

use crate::state::ServiceAddr;

/// Remembered inputs and fingerprints of the tables of the last plan. Keep one across plans
/// (see `sync::plan_with_cache`); a fresh one is always correct, only slower.
#[derive(Clone, Debug, Default)]
pub struct TableCache {
    /// What the last completed round looked up, in ascending service order.
    prev: Memo,
    /// The round in progress.
    next: Memo,
    /// Position in `prev.services`.
    cursor: usize,
}

#[derive(Clone, Debug, Default)]
struct Memo {
    services: Vec<Item>,
    members: Vec<MaglevBackend>,
}

#[derive(Clone, Copy, Debug)]
struct Item {
    service: ServiceAddr,
    size: u32,
    /// `members[start..start + len]` of its memo.
    start: usize,
    len: usize,
    fingerprint: u64,
}

impl Memo {
    fn members(&self, item: &Item) -> &[MaglevBackend] {
        &self.members[item.start..item.start + item.len]
    }

    fn clear(&mut self) {
        self.services.clear();
        self.members.clear();
    }
}

/// A table's fingerprint, and the table itself when it had to be built to get it.
#[derive(Debug, PartialEq, Eq)]
pub struct Lookup {
    pub fingerprint: u64,
    pub table: Option<Vec<u32>>,
}

/// The fingerprint of a table as `ServiceValue::fingerprint` stores it: 0 for no table.
pub fn fingerprint_of(table: &[u32]) -> u64 {
    if table.is_empty() {
        0
    } else {
        maglev::fingerprint(table)
    }
}

impl TableCache {
    /// Start a round of lookups (a plan); an unfinished round is discarded.
    pub fn begin(&mut self) {
        self.next.clear();
        // A round usually looks up what the previous one did: grow once, not by doubling.
        self.next.services.reserve(self.prev.services.len());
        self.next.members.reserve(self.prev.members.len());
        self.cursor = 0;
    }

    /// The fingerprint of `service`'s table built from `members` with `size` slots: the
    /// remembered one when the previous round saw exactly these inputs for `service`, else
    /// built (and returned, so the caller need not build it again to write it). Any order of
    /// calls is correct; ascending service order, as `sync::plan` calls it, is fast.
    pub fn fingerprint(
        &mut self,
        service: ServiceAddr,
        members: &[MaglevBackend],
        size: u32,
    ) -> Result<Lookup, MaglevError> {
        let prev = &self.prev.services;
        while self.cursor < prev.len() && prev[self.cursor].service < service {
            self.cursor += 1;
        }
        let hit = prev
            .get(self.cursor)
            .filter(|p| p.service == service && p.size == size)
            .filter(|p| self.prev.members(p) == members)
            .map(|p| p.fingerprint);
        let (fingerprint, table) = match hit {
            Some(f) => (f, None),
            None => {
                let table = maglev::build_table(members, size)?;
                (fingerprint_of(&table), Some(table))
            }
        };
        let start = self.next.members.len();
        self.next.members.extend_from_slice(members);
        self.next.services.push(Item {
            service,
            size,
            start,
            len: members.len(),
            fingerprint,
        });
        Ok(Lookup { fingerprint, table })
    }

    /// End the round: what it looked up is what the next round remembers (services not
    /// looked up, e.g. removed ones, are forgotten).
    pub fn finish(&mut self) {
        std::mem::swap(&mut self.prev, &mut self.next);
        // Out-of-order calls leave the list unsorted: keep it searchable by the cursor.
        if !self.prev.services.is_sorted_by_key(|i| i.service) {
            self.prev.services.sort_by_key(|i| i.service);
        }
        self.next.clear();
        self.cursor = 0;
    }

    /// Services remembered.
    pub fn len(&self) -> usize {
        self.prev.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prev.services.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::state::Protocol;

    fn member(last: u8, id: u32, weight: u32) -> MaglevBackend {
        let mut key = [0u8; 17];
        key[..4].copy_from_slice(&[198, 18, 0, last]);
        key[16] = lb_common::FAMILY_V4;
        MaglevBackend { key, id, weight }
    }

    fn svc(port: u16) -> ServiceAddr {
        ServiceAddr {
            vip: Ipv4Addr::new(198, 18, 0, 100).into(),
            port,
            protocol: Protocol::Tcp,
        }
    }

    fn fresh(members: &[MaglevBackend], size: u32) -> u64 {
        fingerprint_of(&maglev::build_table(members, size).unwrap())
    }

    /// One round of lookups; `true` where the table was built.
    fn round(cache: &mut TableCache, lookups: &[(u16, &[MaglevBackend], u32)]) -> Vec<bool> {
        cache.begin();
        let built = lookups
            .iter()
            .map(|&(port, members, size)| {
                let got = cache.fingerprint(svc(port), members, size).unwrap();
                assert_eq!(got.fingerprint, fresh(members, size), "{port} {members:?}");
                if let Some(t) = &got.table {
                    assert_eq!(*t, maglev::build_table(members, size).unwrap());
                }
                got.table.is_some()
            })
            .collect();
        cache.finish();
        built
    }

    #[test]
    fn a_hit_needs_identical_inputs() {
        let mut cache = TableCache::default();
        let a: &[MaglevBackend] = &[member(1, 0, 1), member(2, 1, 1)];
        assert_eq!(round(&mut cache, &[(1, a, 1031)]), [true]);
        assert_eq!(round(&mut cache, &[(1, a, 1031)]), [false]);
        // Any change of an id, a weight, a key, the size or the member count is a miss, and
        // the answer is what a fresh build gives (checked by `round`).
        let variants: [(&[MaglevBackend], u32); 5] = [
            (&[member(1, 0, 1), member(2, 7, 1)], 1031),
            (&[member(1, 0, 1), member(2, 1, 2)], 1031),
            (&[member(1, 0, 1), member(3, 1, 1)], 1031),
            (&[member(1, 0, 1), member(2, 1, 1)], 2053),
            (&[member(1, 0, 1)], 1031),
        ];
        for (members, size) in variants {
            assert_eq!(round(&mut cache, &[(1, members, size)]), [true]);
            assert_eq!(round(&mut cache, &[(1, a, 1031)]), [true]);
        }
    }

    #[test]
    fn services_are_remembered_apart_and_forgotten_when_gone() {
        let mut cache = TableCache::default();
        let a: &[MaglevBackend] = &[member(1, 0, 1)];
        let b: &[MaglevBackend] = &[member(1, 5, 1)];
        let c: &[MaglevBackend] = &[member(1, 9, 1)];
        assert_eq!(
            round(&mut cache, &[(1, a, 1031), (2, b, 1031)]),
            [true, true]
        );
        assert_eq!(cache.len(), 2);
        // Service 1's inputs under service 2's name are a miss; service 3 is new.
        assert_eq!(
            round(&mut cache, &[(1, a, 1031), (2, a, 1031), (3, c, 1031)]),
            [false, true, true]
        );
        // Service 2 is gone for one round, then back: built again.
        assert_eq!(
            round(&mut cache, &[(1, a, 1031), (3, c, 1031)]),
            [false, false]
        );
        assert_eq!(cache.len(), 2);
        assert_eq!(
            round(&mut cache, &[(1, a, 1031), (2, a, 1031), (3, c, 1031)]),
            [false, true, false]
        );
    }

    #[test]
    fn any_order_is_correct_and_an_unfinished_round_is_dropped() {
        let mut cache = TableCache::default();
        let a: &[MaglevBackend] = &[member(1, 0, 1)];
        let b: &[MaglevBackend] = &[member(2, 1, 1)];
        assert_eq!(
            round(&mut cache, &[(3, b, 1031), (1, a, 1031)]),
            [true, true]
        );
        assert_eq!(
            round(&mut cache, &[(1, a, 1031), (3, b, 1031)]),
            [false, false]
        );
        // A round that stops half-way (a failed plan) leaves the previous memo in place.
        cache.begin();
        cache.fingerprint(svc(1), b, 1031).unwrap();
        assert_eq!(
            round(&mut cache, &[(1, a, 1031), (3, b, 1031)]),
            [false, false]
        );
    }

    #[test]
    fn empty_table_has_fingerprint_zero() {
        let mut cache = TableCache::default();
        cache.begin();
        let got = cache.fingerprint(svc(1), &[], 0).unwrap();
        assert_eq!((got.fingerprint, got.table), (0, Some(Vec::new())));
    }
}
