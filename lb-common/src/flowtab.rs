//! The flow tables (`LB_FLOWTAB4`, `LB_FLOWTAB6`): arrays of buckets of [`WAYS`] entries, each
//! a flow key and its [`FlowState`]. A flow lives in the bucket its key hashes to
//! ([`bucket_index`]); a new flow takes an empty way of it, else the one idle longest
//! ([`victim`]).
//!
//! Why not a kernel hash map: the data plane finds an entry here with one inlined array
//! lookup and a few word compares, where a lookup in an (LRU) hash map is a call that
//! hashes the key with jhash and compares it with `memcmp` (measured: about 8 ns per
//! packet, a quarter of the cost of forwarding a packet of a known flow). Eviction is
//! per bucket and by idle time, which is what an LRU list approximates.
//!
//! Entries are shared by all CPUs and written without locks. A reader that races a writer
//! of the same entry may see a mix of two flows' keys and states; [`FlowState::tag`]
//! (a hash of the key, stored in the same 8-byte word as the backend) makes it take such a
//! mix for a miss, never for another flow's backend.
//!
//! The bucket and the tag are keyed with the node's own random [`Secret`]
//! (`NodeConfig::flow_secret`): with a public hash a sender could compute many flows of one
//! bucket and, sending them, evict the flows it holds. The tables are node-local, so the
//! secret is too; the flow hash that picks the backend (Maglev) stays unkeyed and the same on
//! every node.
//!
//! The data plane and the agent (which moves flows into the tables on upgrades, and tests)
//! share this module: the hash, the bucket, the tag and the choice of way.

use crate::{FlowBucket4, FlowBucket6, FlowKey, FlowKeyV4, FlowState, hash::fold_v6_words};

/// Entries per bucket.
pub const WAYS: usize = 4;

/// The longest idle timeout a flow may have (7 days). Entries hold the low 32 bits of the
/// kernel's jiffies, so ages are exact up to 2³¹ ticks: 24 days at HZ 1000.
pub const MAX_IDLE_S: u32 = 7 * 24 * 3600;

/// Buckets of a table of `flows` entries (at least one).
pub const fn buckets_for(flows: u32) -> u32 {
    let b = flows.div_ceil(WAYS as u32);
    if b == 0 { 1 } else { b }
}

/// The node's key of [`key_hash`]: four random words, drawn by the agent once per node and
/// kept in `LB_CONFIG` across restarts (a new one would lose every remembered flow). All
/// zero: not drawn yet.
pub type Secret = [u64; 4];

/// The hash of a flow key under the node's `secret`, from its source and destination folded
/// to a word each (IPv4: the address word; IPv6: [`fold_v6_words`]), its ports word and its
/// last word (protocol, and family for IPv6), all as they sit in memory: Thorup's
/// pair-multiply-shift, `(s₀ + src)(s₁ + ports) + (s₂ + dst)(s₃ + last)` mod 2⁶⁴. For a
/// random secret two distinct keys share the high `l` bits (which pick the bucket) with
/// probability about 2⁻ˡ, whatever the keys, so flows cannot be aimed at one bucket without
/// the secret. Two independent multiplies: a few cycles, where the flow hash is a chain of
/// eight. The tables are the node's own, so this hash need not match anything else.
#[inline(always)]
pub const fn key_hash(secret: &Secret, src_fold: u32, dst_fold: u32, ports: u32, last: u32) -> u64 {
    let x = secret[0]
        .wrapping_add(src_fold as u64)
        .wrapping_mul(secret[1].wrapping_add(ports as u64));
    let y = secret[2]
        .wrapping_add(dst_fold as u64)
        .wrapping_mul(secret[3].wrapping_add(last as u64));
    x.wrapping_add(y)
}

/// The bucket of a key with hash `h` in a table of `buckets`: the high half scaled to the
/// table (multiply-shift, no division).
#[inline(always)]
pub const fn bucket_index(h: u64, buckets: u32) -> u32 {
    (((h >> 32) * buckets as u64) >> 32) as u32
}

/// The tag of a key with hash `h`: never 0 (which marks an empty entry), and mixed from
/// all of `h`, so keys of one bucket (which share the high bits) still differ in it.
#[inline(always)]
pub const fn tag(h: u64) -> u32 {
    ((h.wrapping_mul(0xff51_afd7_ed55_8ccd) >> 32) as u32) | 1
}

/// The way a new flow takes in a bucket whose entries have `tags` and `last_seen`: the
/// first empty one, else the one idle longest at `now` (jiffies, low 32 bits).
#[inline(always)]
pub fn victim(tags: [u32; WAYS], last_seen: [u32; WAYS], now: u32) -> usize {
    let mut best = 0;
    let mut best_idle = 0;
    let mut i = 0;
    while i < WAYS {
        let idle = if tags[i] == 0 {
            u32::MAX
        } else {
            now.wrapping_sub(last_seen[i])
        };
        if idle > best_idle || i == 0 {
            best = i;
            best_idle = idle;
        }
        i += 1;
    }
    best
}

/// A key of a flow table: its hash, its table, and lookups and inserts on a copy of its
/// bucket, for the agent and tests (the data plane has its own, on the map's memory, with
/// the same rules).
pub trait TableKey: Sized {
    /// The bucket of the key's table.
    type Bucket;
    /// The table's map.
    const MAP: &'static str;
    /// [`key_hash`] of the key under `secret`.
    fn hash(&self, secret: &Secret) -> u64;
    /// The state of the key's flow, if `bucket` holds it (placed under `secret`).
    fn find(&self, secret: &Secret, bucket: &Self::Bucket) -> Option<FlowState>;
    /// The keys and states of `bucket`'s ways (a way whose tag is 0 is empty).
    fn entries(bucket: &Self::Bucket) -> [(Self, FlowState); WAYS];
    /// Remember the key's flow in `bucket` (its tag under `secret` is set here): in its own
    /// entry if it has one, else in the [`victim`] way at `now`. Returns the way.
    fn place(
        &self,
        secret: &Secret,
        bucket: &mut Self::Bucket,
        state: FlowState,
        now: u32,
    ) -> usize;
}

macro_rules! table_key {
    ($key:ty, $bucket:ty, $map:expr, |$s:ident, $w:ident| $hash:expr) => {
        impl TableKey for $key {
            type Bucket = $bucket;
            const MAP: &'static str = $map;

            fn hash(&self, $s: &Secret) -> u64 {
                // SAFETY: the key is whole 4-aligned words; every bit pattern is a valid word.
                let $w: [u32; size_of::<$key>() / 4] = unsafe { core::mem::transmute(*self) };
                $hash
            }

            fn entries(bucket: &$bucket) -> [(Self, FlowState); WAYS] {
                core::array::from_fn(|i| (bucket.ways[i].key, bucket.ways[i].state))
            }

            fn find(&self, secret: &Secret, bucket: &$bucket) -> Option<FlowState> {
                let tag = tag(self.hash(secret));
                bucket
                    .ways
                    .iter()
                    .find(|e| e.key == *self && e.state.tag == tag)
                    .map(|e| e.state)
            }

            fn place(
                &self,
                secret: &Secret,
                bucket: &mut $bucket,
                mut state: FlowState,
                now: u32,
            ) -> usize {
                state.tag = tag(self.hash(secret));
                let ways = &mut bucket.ways;
                let way = ways
                    .iter()
                    .position(|e| e.key == *self && e.state.tag != 0)
                    .unwrap_or_else(|| {
                        victim(
                            core::array::from_fn(|i| ways[i].state.tag),
                            core::array::from_fn(|i| ways[i].state.last_seen),
                            now,
                        )
                    });
                ways[way].key = *self;
                ways[way].state = state;
                way
            }
        }
    };
}
table_key!(FlowKeyV4, FlowBucket4, crate::maps::FLOWTAB4, |s, w| {
    key_hash(s, w[0], w[1], w[2], w[3])
});
table_key!(
    FlowKey,
    FlowBucket6,
    crate::maps::FLOWTAB6,
    |s, w| key_hash(
        s,
        fold_v6_words([w[0], w[1], w[2], w[3]]),
        fold_v6_words([w[4], w[5], w[6], w[7]]),
        w[8],
        w[9],
    )
);

#[cfg(test)]
mod tests {
    use super::*;

    /// A secret as the agent draws them (these words are from a random draw).
    const SECRET: Secret = [
        0x3c6e_f372_fe94_f82b,
        0xa54f_f53a_5f1d_36f1,
        0x510e_527f_ade6_82d1,
        0x9b05_688c_2b3e_6c1f,
    ];

    fn key4(src: [u8; 4], sport: u16) -> FlowKeyV4 {
        FlowKeyV4::new(src, [198, 18, 0, 100], sport.to_be(), 80u16.to_be(), 6)
    }

    #[test]
    fn buckets_cover_the_entries() {
        assert_eq!(buckets_for(0), 1);
        assert_eq!(buckets_for(1), 1);
        assert_eq!(buckets_for(4096), 1024);
        assert_eq!(buckets_for(4097), 1025);
    }

    /// Keys as real traffic has them (clients of a few /24s, sequential ports, one VIP)
    /// spread over the buckets at least as evenly as random keys would: with four keys per
    /// bucket on average, none gets more than a few times that, and few stay empty.
    #[test]
    fn structured_keys_spread_over_the_buckets() {
        let buckets = 1u32 << 14;
        let mut load = [0u32; 1 << 14];
        let mut n = 0;
        'fill: for net in 0..4u8 {
            for host in 0..=255u8 {
                for port in 0..64u16 {
                    let k = key4([198, 18 + (net >> 1), net, host], 40000 + port);
                    load[bucket_index(k.hash(&SECRET), buckets) as usize] += 1;
                    n += 1;
                    if n == 4 * buckets {
                        break 'fill;
                    }
                }
            }
        }
        let max = *load.iter().max().unwrap();
        let empty = load.iter().filter(|l| **l == 0).count() as f64 / buckets as f64;
        // Random keys (Poisson(4)): the largest of 16k buckets holds about 13, and e^-4 ≈
        // 1.8% stay empty. Multiplicative hashing of regular keys does better than that.
        assert!(max <= 16, "fullest bucket holds {max} keys");
        assert!(empty < 0.03, "{empty} of the buckets empty");
    }

    /// Ports alone, and addresses alone, still reach every bucket bit.
    #[test]
    fn every_field_moves_the_bucket_and_the_tag() {
        let base = key4([198, 18, 1, 1], 40000);
        let h = base.hash(&SECRET);
        for other in [
            key4([198, 18, 1, 2], 40000),
            key4([198, 18, 1, 129], 40000),
            key4([199, 18, 1, 1], 40000),
            key4([198, 18, 1, 1], 40001),
            FlowKeyV4 { proto: 17, ..base },
            FlowKeyV4 {
                dst_be: [198, 18, 0, 101],
                ..base
            },
        ] {
            let o = other.hash(&SECRET);
            assert_ne!(
                bucket_index(h, 1 << 20),
                bucket_index(o, 1 << 20),
                "{other:?}"
            );
            assert_ne!(tag(h), tag(o), "{other:?}");
        }
    }

    /// One key under two secrets: another bucket and another tag. Keys that share a bucket
    /// under one secret (what a sender could aim at with a known secret) spread over the
    /// table under another.
    #[test]
    fn the_secret_moves_the_buckets_and_the_tags() {
        extern crate std;
        let other: Secret = [SECRET[2], SECRET[3], SECRET[0], SECRET[1]];
        let buckets = 1u32 << 8;
        let bucket = |k: &FlowKeyV4, s: &Secret| bucket_index(k.hash(s), buckets);
        let key = key4([198, 18, 1, 1], 40000);
        assert_ne!(bucket(&key, &SECRET), bucket(&key, &other));
        assert_ne!(tag(key.hash(&SECRET)), tag(key.hash(&other)));

        let aimed: std::vec::Vec<FlowKeyV4> = (0..=u16::MAX)
            .map(|p| key4([198, 18, 1, 1], p))
            .filter(|k| bucket(k, &SECRET) == bucket(&key, &SECRET))
            .collect();
        assert!(aimed.len() > 200, "{} keys in the bucket", aimed.len());
        let spread: std::collections::BTreeSet<u32> =
            aimed.iter().map(|k| bucket(k, &other)).collect();
        // Random placement of ~256 keys over 256 buckets reaches about 1 - 1/e of them.
        assert!(
            spread.len() > aimed.len() / 2,
            "{} keys over {} buckets",
            aimed.len(),
            spread.len()
        );
    }

    #[test]
    fn an_empty_way_is_taken_first_then_the_longest_idle() {
        assert_eq!(victim([1, 1, 0, 1], [5, 5, 5, 5], 10), 2);
        assert_eq!(victim([1, 1, 1, 1], [9, 3, 7, 8], 10), 1);
        // Jiffies wrap: an entry stamped just before the wrap is older than one just after.
        assert_eq!(victim([1, 1, 1, 1], [2, u32::MAX - 1, 1, 0], 3), 1);
    }

    #[test]
    fn a_bucket_finds_what_it_placed_and_replaces_the_idle_way() {
        let mut b = FlowBucket4::default();
        let state = |backend_id, last_seen| FlowState {
            backend_id,
            tag: 0,
            flow_hash: 0,
            last_seen,
        };
        for i in 0..WAYS as u16 {
            let way = key4([198, 18, 1, 1], i).place(
                &SECRET,
                &mut b,
                state(i as u32, 100 + i as u32),
                200,
            );
            assert_eq!(way, i as usize);
        }
        assert_eq!(
            key4([198, 18, 1, 1], 2)
                .find(&SECRET, &b)
                .unwrap()
                .backend_id,
            2
        );
        // A key already there keeps its way.
        assert_eq!(
            key4([198, 18, 1, 1], 3).place(&SECRET, &mut b, state(9, 150), 200),
            3
        );
        assert_eq!(
            key4([198, 18, 1, 1], 3)
                .find(&SECRET, &b)
                .unwrap()
                .backend_id,
            9
        );
        // A new key replaces the way idle longest (port 0, seen at 100).
        assert_eq!(
            key4([198, 18, 1, 1], 7).place(&SECRET, &mut b, state(7, 200), 200),
            0
        );
        assert!(key4([198, 18, 1, 1], 0).find(&SECRET, &b).is_none());
        // A key whose tag does not match is not found (a torn entry).
        b.ways[1].state.tag ^= 2;
        assert!(key4([198, 18, 1, 1], 1).find(&SECRET, &b).is_none());
    }
}
