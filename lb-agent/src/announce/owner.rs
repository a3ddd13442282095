//! Which node owns a VIP in L2 announcement: a rendezvous (highest random weight) hash of
//! the VIP over the eligible nodes. Every agent computes it alike from the same inputs, so
//! no election is needed, and a node joining or leaving moves only the VIPs it wins or held
//! (about 1/N of them), never the others.
//!
//! The score is a fixed function of the VIP's bytes and the node's name (FNV-1a, then a
//! 64-bit finalizer for avalanche): agents of different versions agree as long as it stays
//! so. Ties (practically impossible) go to the smaller name.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

/// The score of `node` for `vip`; the highest score owns the VIP.
pub fn score(vip: IpAddr, node: &str) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    };
    match vip {
        IpAddr::V4(a) => a.octets().into_iter().for_each(&mut eat),
        IpAddr::V6(a) => a.octets().into_iter().for_each(&mut eat),
    }
    // A separator, so (vip, name) pairs cannot run into each other.
    eat(0xff);
    node.bytes().for_each(&mut eat);
    // splitmix64's finalizer: FNV alone leaves the high bits weakly mixed for short inputs.
    let mut z = h;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The owner of `vip` among `candidates` (none when there is no candidate).
pub fn owner<'a>(vip: IpAddr, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|n| (score(vip, n), std::cmp::Reverse(n)))
        .max()
        .map(|(_, std::cmp::Reverse(n))| n)
}

/// Who may own each VIP: `None` = every live node; `Some(set)` = only these (for
/// `externalTrafficPolicy: Local`, the nodes with a local endpoint; per pool, the nodes its
/// node selector admits).
pub type Eligibility = BTreeMap<IpAddr, Option<BTreeSet<String>>>;

/// The owner of every VIP of `eligible` among the `alive` nodes; VIPs no live node may own
/// are left out (nobody answers for them).
pub fn owners(eligible: &Eligibility, alive: &BTreeSet<String>) -> BTreeMap<IpAddr, String> {
    eligible
        .iter()
        .filter_map(|(vip, allowed)| {
            let candidates = alive
                .iter()
                .filter(|n| allowed.as_ref().is_none_or(|a| a.contains(*n)))
                .map(String::as_str);
            owner(*vip, candidates).map(|o| (*vip, o.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vip(i: u32) -> IpAddr {
        IpAddr::V4(std::net::Ipv4Addr::from(0xc612_6400 + i))
    }

    fn names(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("node-{i}")).collect()
    }

    #[test]
    fn owner_is_independent_of_candidate_order() {
        let nodes = names(5);
        for i in 0..200 {
            let fwd = owner(vip(i), nodes.iter().map(String::as_str));
            let rev = owner(vip(i), nodes.iter().rev().map(String::as_str));
            assert_eq!(fwd, rev);
            assert!(fwd.is_some());
        }
        assert_eq!(owner(vip(1), std::iter::empty()), None);
    }

    #[test]
    fn ownership_spreads_over_the_nodes() {
        let nodes = names(3);
        let mut count = BTreeMap::<&str, usize>::new();
        for i in 0..3000 {
            *count
                .entry(owner(vip(i), nodes.iter().map(String::as_str)).unwrap())
                .or_default() += 1;
        }
        assert_eq!(count.len(), 3);
        for (n, c) in &count {
            assert!((800..1200).contains(c), "{n} owns {c} of 3000 VIPs");
        }
    }

    #[test]
    fn a_node_leaving_moves_only_its_own_vips() {
        let all: BTreeSet<String> = names(4).into_iter().collect();
        let eligible: Eligibility = (0..1000).map(|i| (vip(i), None)).collect();
        let before = owners(&eligible, &all);
        let mut fewer = all.clone();
        fewer.remove("node-2");
        let after = owners(&eligible, &fewer);
        for (v, o) in &before {
            if o != "node-2" {
                assert_eq!(&after[v], o, "{v} moved although its owner stayed");
            } else {
                assert_ne!(after[v], "node-2");
            }
        }
        // And joining moves back exactly those.
        assert_eq!(owners(&eligible, &all), before);
    }

    #[test]
    fn eligibility_limits_the_candidates() {
        let alive: BTreeSet<String> = names(3).into_iter().collect();
        let only3 = BTreeSet::from(["node-3".to_string()]);
        let gone = BTreeSet::from(["node-9".to_string()]);
        let eligible: Eligibility =
            BTreeMap::from([(vip(1), Some(only3)), (vip(2), Some(gone)), (vip(3), None)]);
        let o = owners(&eligible, &alive);
        assert_eq!(o[&vip(1)], "node-3");
        assert!(
            !o.contains_key(&vip(2)),
            "no live eligible node: nobody answers"
        );
        assert!(o.contains_key(&vip(3)));
    }

    #[test]
    fn scores_are_pinned() {
        // Agents of different versions must agree: the function may never change.
        let v: IpAddr = "198.18.0.100".parse().unwrap();
        assert_eq!(score(v, "lb1"), 0x0416_6fe6_a1b2_f3ea);
        assert_eq!(score(v, "lb2"), 0xa794_bb63_7604_6acc);
        assert_eq!(score(v, "lb3"), 0xf552_2de1_e1bc_f9a3);
        assert_eq!(owner(v, ["lb1", "lb2", "lb3"]), Some("lb3"));
    }
}
