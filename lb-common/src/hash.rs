//! The flow hash. The XDP program computes it per packet to pick a Maglev slot; the agent
//! computes the same value to explain a decision and in tests. It must stay cheap (a few
//! multiplies) and identical on both sides, so it lives here once.

const SEED: u32 = 0x9e37_79b9;

/// Murmur3's 32-bit finaliser: full avalanche in five operations.
#[inline(always)]
pub const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

#[inline(always)]
const fn mix(h: u32, word: u32) -> u32 {
    let k = word
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// Hash of an IPv4 5-tuple. Addresses and ports are taken exactly as they sit in the packet
/// (network byte order, read as native `u32`/`u16`), so neither side converts per packet.
/// The protocol goes into the seed, so three rounds cover the tuple.
#[inline(always)]
pub const fn flow_hash_v4(
    src_be: u32,
    dst_be: u32,
    sport_be: u16,
    dport_be: u16,
    proto: u8,
) -> u32 {
    let mut h = SEED ^ ((proto as u32) << 24);
    h = mix(h, src_be);
    h = mix(h, dst_be);
    h = mix(h, ((sport_be as u32) << 16) | dport_be as u32);
    fmix32(h ^ 12)
}

/// An IPv6 address folded into one word, from its four 32-bit words as read from memory
/// (native order): each rotated by its own amount, then XORed, so a change in any bit changes
/// the result. The data plane folds each address once, straight from the packet.
#[inline(always)]
pub const fn fold_v6_words(w: [u32; 4]) -> u32 {
    w[0] ^ w[1].rotate_left(7) ^ w[2].rotate_left(14) ^ w[3].rotate_left(21)
}

/// [`fold_v6_words`] of an address given as bytes.
#[inline(always)]
pub fn fold_v6(a: &[u8; 16]) -> u32 {
    let w = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    fold_v6_words([w(0), w(4), w(8), w(12)])
}

/// Hash of an IPv6 5-tuple with the addresses already folded ([`fold_v6`]): three rounds, as
/// for IPv4 (the rounds are a serial chain of multiplies, the expensive part per packet).
#[inline(always)]
pub const fn flow_hash_v6_folded(
    src_fold: u32,
    dst_fold: u32,
    sport_be: u16,
    dport_be: u16,
    proto: u8,
) -> u32 {
    let mut h = (SEED ^ 0x6) ^ ((proto as u32) << 24);
    h = mix(h, src_fold);
    h = mix(h, dst_fold);
    h = mix(h, ((sport_be as u32) << 16) | dport_be as u32);
    fmix32(h ^ 36)
}

/// Hash of an IPv6 5-tuple, on the same terms as [`flow_hash_v4`] (bytes as in the packet).
#[inline(always)]
pub fn flow_hash_v6(
    src_be: &[u8; 16],
    dst_be: &[u8; 16],
    sport_be: u16,
    dport_be: u16,
    proto: u8,
) -> u32 {
    flow_hash_v6_folded(fold_v6(src_be), fold_v6(dst_be), sport_be, dport_be, proto)
}

/// The `LB_SVC_SLOTS` slot of a service key, from its destination already folded (IPv4: the
/// address word; IPv6: [`fold_v6`]), by the finaliser alone: every non-VIP packet pays for
/// it. The port goes into the low half, where an IPv4 address word has its first two
/// bytes (those a pool of VIPs shares), so keys of one pool stay distinct before the
/// (bijective) finaliser.
#[inline(always)]
pub const fn service_slot_folded(dst_fold: u32, port_be: u16, proto: u8, family: u8) -> u32 {
    let tail = port_be as u32 | ((proto as u32) << 16) | ((family as u32) << 24);
    fmix32(dst_fold ^ tail) >> (32 - crate::maps::SVC_SLOT_BITS)
}

/// [`service_slot_folded`] of a key as the agent holds it.
#[inline(always)]
pub fn service_slot(key: &crate::ServiceKey) -> u32 {
    let a = &key.addr_be;
    let folded = if key.family == crate::FAMILY_V4 {
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]])
    } else {
        fold_v6(a)
    };
    service_slot_folded(folded, key.port_be, key.proto, key.family)
}

/// The Maglev slot of a flow hash in a table of `size` slots: the hash scaled to the table
/// (`hash × size / 2³²`, Lemire's multiply-shift) rather than `hash % size`, which costs a
/// division per packet. The hash's high bits are well mixed (`fmix32`), so slots are hit
/// evenly.
#[inline(always)]
pub const fn slot(hash: u32, size: u32) -> u32 {
    ((hash as u64 * size as u64) >> 32) as u32
}

/// How many slots after its own a packet whose backend is unreachable
/// (`BACKEND_F_UNREACHABLE`) may look at for one that can take it.
pub const FALLBACK_SLOTS: u32 = 16;

/// The `attempt`-th slot (1..=[`FALLBACK_SLOTS`]) after `slot` in a table of `size` slots,
/// wrapping: where a packet goes when the backend of its own slot is unreachable (the first
/// of these whose backend can take it). Only the unreachable backend's flows move, each to
/// the backend of a neighbouring slot, so they spread over the others by their shares.
#[inline(always)]
pub const fn fallback_slot(slot: u32, attempt: u32, size: u32) -> u32 {
    ((slot as u64 + attempt as u64) % size as u64) as u32
}

/// UDP source port of a GUE packet: the flow hash folded into the dynamic range
/// 49152-65535, so routers hashing the outer header spread flows (and keep each one on a
/// path).
#[inline(always)]
pub const fn gue_source_port(flow_hash: u32) -> u16 {
    0xc000 | ((flow_hash ^ (flow_hash >> 16)) as u16 & 0x3fff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_every_field() {
        let base = flow_hash_v4(1, 2, 3, 4, 17);
        assert_ne!(base, flow_hash_v4(9, 2, 3, 4, 17));
        assert_ne!(base, flow_hash_v4(1, 9, 3, 4, 17));
        assert_ne!(base, flow_hash_v4(1, 2, 9, 4, 17));
        assert_ne!(base, flow_hash_v4(1, 2, 3, 9, 17));
        assert_ne!(base, flow_hash_v4(1, 2, 3, 4, 6));
    }

    #[test]
    fn v6_hash_depends_on_every_byte() {
        let a = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let b = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let base = flow_hash_v6(&a, &b, 1, 2, 17);
        for i in 0..16 {
            let mut x = a;
            x[i] ^= 0x80;
            assert_ne!(base, flow_hash_v6(&x, &b, 1, 2, 17), "src byte {i}");
            let mut y = b;
            y[i] ^= 0x80;
            assert_ne!(base, flow_hash_v6(&a, &y, 1, 2, 17), "dst byte {i}");
        }
        assert_ne!(base, flow_hash_v6(&a, &b, 1, 3, 17));
    }

    #[test]
    fn slots_stay_in_the_table_and_spread() {
        for size in [1u32, 7, 1031, 65537] {
            assert_eq!(slot(0, size), 0);
            assert_eq!(slot(u32::MAX, size), size - 1);
        }
        let mut buckets = [0u32; 7];
        for port in 0..10_000u16 {
            let h = flow_hash_v4(0x0a00_0001, 0x0a00_0064, port.to_be(), 53u16.to_be(), 17);
            buckets[slot(h, 7) as usize] += 1;
        }
        let mean = 10_000 / 7;
        for b in buckets {
            assert!(b.abs_diff(mean) < mean / 10, "{buckets:?}");
        }
    }

    #[test]
    fn v6_hash_spreads_clients_and_ports() {
        // Clients differing in their last bytes (one /64), and in the interface id's middle:
        // each of 7 buckets within 10 % of the mean.
        let vip = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        for vary in [14usize, 10] {
            let mut buckets = [0u32; 7];
            for i in 0..10_000u16 {
                let mut client = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                client[vary..vary + 2].copy_from_slice(&i.to_be_bytes());
                let h = flow_hash_v6(&client, &vip, 4000u16.to_be(), 53u16.to_be(), 17);
                buckets[slot(h, 7) as usize] += 1;
            }
            let mean = 10_000 / 7;
            for b in buckets {
                assert!(b.abs_diff(mean) < mean / 10, "byte {vary}: {buckets:?}");
            }
        }
    }

    #[test]
    fn service_slots_stay_in_the_index_and_spread() {
        // 20,000 services (1,000 addresses × 20 ports): about as many distinct slots as a
        // uniform hash gives (≈ 17,240 of 65,536), and none outside the index.
        extern crate std;
        let mut used = std::collections::BTreeSet::new();
        for a in 0..1000u32 {
            for port in 0..20u16 {
                let key = crate::ServiceKey::v4(
                    (0xc612_0000 + a).to_be_bytes(),
                    (8000 + port).to_be(),
                    6,
                );
                let s = service_slot(&key);
                assert!(s < crate::maps::SVC_SLOT_COUNT);
                used.insert(s);
            }
        }
        assert!(used.len() > 16_900, "{} distinct slots", used.len());
    }

    #[test]
    fn gue_ports_stay_in_the_dynamic_range() {
        for h in [0u32, 1, 0xffff, 0xdead_beef, u32::MAX] {
            assert!(gue_source_port(h) >= 0xc000);
        }
        assert_ne!(gue_source_port(0x1234_5678), gue_source_port(0x1234_5679));
    }

    #[test]
    fn hash_spreads_source_ports() {
        // 10,000 source ports over 7 buckets: each bucket within 10 % of the mean.
        let mut buckets = [0u32; 7];
        for port in 0..10_000u16 {
            let h = flow_hash_v4(0x0a00_0001, 0x0a00_0064, port.to_be(), 53u16.to_be(), 17);
            buckets[(h % 7) as usize] += 1;
        }
        let mean = 10_000 / 7;
        for b in buckets {
            assert!(b.abs_diff(mean) < mean / 10, "{buckets:?}");
        }
    }
}
