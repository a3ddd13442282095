//! Randomised check of `plan` against a model of every map, `LB_MAGLEV`'s contents
//! included. Each step changes the desired state at random, plans with a kept `TableCache`
//! and from scratch (the two must be equal), applies the ops to the model one by one while
//! checking that no packet could see a dangling reference, and then checks that the maps
//! hold exactly the desired state and that planning again writes nothing.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::*;
use crate::{
    state::{BackendSpec, ServiceSpec},
    table_cache::fingerprint_of,
};

const CAPACITY: u32 = 80_000;

/// xorshift64: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// The maps, as the data plane would see them.
struct Model {
    snap: MapSnapshot,
    maglev: Vec<u32>,
}

impl Model {
    fn new() -> Self {
        Model {
            snap: MapSnapshot {
                maglev_capacity: CAPACITY,
                ..Default::default()
            },
            maglev: vec![0; CAPACITY as usize],
        }
    }

    fn table(&self, v: &ServiceValue) -> &[u32] {
        &self.maglev[v.table_offset as usize..(v.table_offset + v.table_size) as usize]
    }

    /// Apply `ops` in order, checking before each one that it leaves nothing dangling.
    fn apply(&mut self, ops: &[MapOp]) {
        for op in ops {
            match op {
                MapOp::WriteTable { offset, entries } => {
                    let (a, b) = (*offset, offset + entries.len() as u32);
                    assert!(b <= CAPACITY, "table past the end of LB_MAGLEV");
                    for v in self.snap.services.values().filter(|v| v.table_size > 0) {
                        let (c, d) = (v.table_offset, v.table_offset + v.table_size);
                        assert!(b <= c || d <= a, "table written over a live one: {op:?}");
                    }
                    self.maglev[a as usize..b as usize].copy_from_slice(entries);
                }
                MapOp::SetService { value, .. } => {
                    let table = self.table(value);
                    assert_eq!(
                        fingerprint_of(table),
                        value.fingerprint,
                        "switched too early"
                    );
                    for id in table {
                        let b = self
                            .snap
                            .backends
                            .get(id)
                            .expect("table uses an unset backend");
                        assert_eq!(b.service_id, value.id, "table uses another service's entry");
                    }
                }
                MapOp::ClearBackend { id } => {
                    for v in self.snap.services.values() {
                        assert!(
                            !self.table(v).contains(id),
                            "backend {id} cleared while in use"
                        );
                    }
                }
                MapOp::DeleteVip { key } => {
                    let (k, f) = (key.addr_be, key.family);
                    assert!(
                        !self
                            .snap
                            .services
                            .keys()
                            .any(|s| s.addr_be == k && s.family == f),
                        "VIP deleted while a service uses it"
                    );
                }
                _ => {}
            }
            apply_to_snapshot(&mut self.snap, std::slice::from_ref(op));
        }
    }

    /// The maps hold exactly `desired`: every backend in its table, with its next hop as
    /// `hops` and the entry before the plan (`prev`) say.
    fn check(&self, desired: &DesiredState, hops: &Hops, prev: &MapSnapshot) {
        assert_eq!(self.snap.services.len(), desired.services.len());
        let mut backends = 0;
        for (addr, svc) in &desired.services {
            let v = self.snap.services[&service_key(addr)];
            let mut members = Vec::new();
            for (ip, spec) in &svc.backends {
                let (id, b) = self
                    .snap
                    .backends
                    .iter()
                    .find(|(_, b)| {
                        b.service_id == v.id && ip_from_bytes(&b.addr_be, b.family) == Some(*ip)
                    })
                    .unwrap_or_else(|| panic!("{addr}: no entry for {ip}"));
                let before = prev.backends.values().find(|b| {
                    b.service_id == v.id && ip_from_bytes(&b.addr_be, b.family) == Some(*ip)
                });
                let want = match spec.mac.or_else(|| hops.macs.get(ip).copied()) {
                    Some(mac) => (mac, 0),
                    None if hops.failed.contains(ip) => ([0; 6], BACKEND_F_UNREACHABLE),
                    // Being asked again: the entry as it was.
                    None => match before {
                        Some(b) if b.can_take() => (b.mac, 0),
                        Some(b) if b.is_unreachable() => ([0; 6], BACKEND_F_UNREACHABLE),
                        _ => ([0; 6], BACKEND_F_NO_NEIGH),
                    },
                };
                assert_eq!(
                    (
                        b.mac,
                        b.flags & (BACKEND_F_NO_NEIGH | BACKEND_F_UNREACHABLE)
                    ),
                    want,
                    "{addr}: {ip}"
                );
                members.push(MaglevBackend {
                    key: maglev_key(*ip),
                    id: *id,
                    weight: spec.weight,
                });
            }
            backends += members.len();
            let total = members.iter().map(|m| u64::from(m.weight)).sum();
            let size = match (members.is_empty(), svc.table_size) {
                (true, _) => 0,
                (false, Some(size)) => size,
                (false, None) => maglev::table_size_for(total),
            };
            assert_eq!(v.table_size, size, "{addr}");
            let table = maglev::build_table(&members, size).unwrap();
            assert_eq!(self.table(&v), table, "{addr}: wrong table in LB_MAGLEV");
            assert_eq!(v.fingerprint, fingerprint_of(&table));
            assert_eq!(v.forwarding, svc.forwarding as u8);
            assert_eq!(v.flags & SERVICE_F_FLOW_TRACKING != 0, svc.flow_tracking);
        }
        assert_eq!(
            self.snap.backends.len(),
            backends,
            "leftover backend entries"
        );
    }
}

fn addrs() -> Vec<ServiceAddr> {
    let vips: [IpAddr; 3] = [
        Ipv4Addr::new(198, 18, 0, 100).into(),
        Ipv4Addr::new(198, 18, 0, 101).into(),
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100).into(),
    ];
    let mut out = Vec::new();
    for vip in vips {
        for (port, protocol) in [
            (53, Protocol::Udp),
            (53, Protocol::Tcp),
            (80, Protocol::Tcp),
        ] {
            out.push(ServiceAddr {
                vip,
                port,
                protocol,
            });
        }
    }
    out
}

fn backend_ips() -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = (1..=16)
        .map(|i| Ipv4Addr::new(198, 18, 1, i).into())
        .collect();
    out.extend((1..=4).map(|i| IpAddr::from(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, i))));
    out
}

fn random_backend(rng: &mut Rng) -> BackendSpec {
    BackendSpec {
        weight: 1 + rng.below(3) as u32,
        mac: rng
            .chance(60)
            .then(|| [2, 0, 0, 0, rng.below(2) as u8, rng.below(200) as u8]),
    }
}

fn random_service(rng: &mut Rng, ips: &[IpAddr]) -> ServiceSpec {
    let mut svc = ServiceSpec {
        name: format!("svc-{}", rng.below(1000)),
        forwarding: Forwarding::Ipip,
        table_size: None,
        flow_tracking: rng.chance(50),
        source_ranges: None,
        fragments: false,
        affinity_timeout_s: None,
        backends: BTreeMap::new(),
    };
    for _ in 0..1 + rng.below(7) {
        svc.backends
            .insert(ips[rng.below(ips.len())], random_backend(rng));
    }
    svc
}

/// What the agent knows of the next hops: resolved MACs, and those that failed.
#[derive(Default)]
struct Hops {
    macs: BTreeMap<IpAddr, [u8; 6]>,
    failed: BTreeSet<IpAddr>,
}

impl Hops {
    fn get(&self) -> NextHops<'_> {
        NextHops {
            macs: &self.macs,
            failed: &self.failed,
        }
    }
}

/// One random change to the desired state or to the next hops.
fn mutate(
    rng: &mut Rng,
    desired: &mut DesiredState,
    hops: &mut Hops,
    addrs: &[ServiceAddr],
    ips: &[IpAddr],
) {
    let addr = addrs[rng.below(addrs.len())];
    match rng.below(10) {
        0 => {
            desired.services.remove(&addr);
        }
        1 | 2 => {
            desired.services.insert(addr, random_service(rng, ips));
        }
        3 => {
            let ip = ips[rng.below(ips.len())];
            match rng.below(4) {
                // The kernel forgets it, and asks again.
                0 => {
                    hops.macs.remove(&ip);
                    hops.failed.remove(&ip);
                }
                // Nobody answers.
                1 => {
                    hops.macs.remove(&ip);
                    hops.failed.insert(ip);
                }
                _ => {
                    hops.failed.remove(&ip);
                    hops.macs.insert(ip, [2, 0, 0, 1, 0, rng.below(3) as u8]);
                }
            }
        }
        _ => {
            let Some(svc) = desired.services.get_mut(&addr) else {
                desired.services.insert(addr, random_service(rng, ips));
                return;
            };
            let ip = ips[rng.below(ips.len())];
            match rng.below(7) {
                0 => {
                    svc.backends.remove(&ip);
                }
                1 => {
                    svc.backends.insert(ip, random_backend(rng));
                }
                2 => {
                    if let Some(b) = svc.backends.values_mut().next() {
                        b.weight = 1 + b.weight % 4;
                    }
                }
                3 => svc.flow_tracking = !svc.flow_tracking,
                4 => {
                    svc.forwarding = match svc.forwarding {
                        Forwarding::Ipip => Forwarding::Gue,
                        Forwarding::Gue => Forwarding::L2,
                        Forwarding::L2 => Forwarding::Ipip,
                    }
                }
                5 => {
                    svc.table_size = match svc.table_size {
                        None => Some(2053),
                        Some(_) => None,
                    }
                }
                _ => {
                    svc.source_ranges = match svc.source_ranges {
                        None => Some(vec!["198.18.2.0/24".parse().unwrap()]),
                        Some(_) => None,
                    }
                }
            }
        }
    }
}

#[test]
fn random_changes_keep_the_maps_exact_with_a_kept_cache() {
    let (addrs, ips) = (addrs(), backend_ips());
    let node = node_config(
        &DesiredState::default(),
        [2, 0, 0, 0, 0, 2],
        Some(Ipv4Addr::new(198, 18, 0, 2)),
        Some(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2)),
        super::tests::TEST_LOADED,
    );
    for seed in [1, 7, 42, 1234] {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed);
        let mut desired = DesiredState::default();
        let mut hops = Hops::default();
        let mut model = Model::new();
        let mut tables = TableCache::default();
        for step in 0..120 {
            for _ in 0..1 + rng.below(3) {
                mutate(&mut rng, &mut desired, &mut hops, &addrs, &ips);
            }
            if rng.chance(3) {
                // The maps were recreated (pins removed) while the agent kept its memo: every
                // table must be written again although every fingerprint is remembered.
                model = Model::new();
            }
            let cached = plan_with_hops(&desired, node, hops.get(), &model.snap, &mut tables)
                .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
            let fresh = plan_with_hops(
                &desired,
                node,
                hops.get(),
                &model.snap,
                &mut TableCache::default(),
            )
            .unwrap();
            assert_eq!(
                cached, fresh,
                "seed {seed} step {step}: cached plan differs"
            );
            let prev = model.snap.clone();
            model.apply(&cached.ops);
            model.check(&desired, &hops, &prev);
            let again =
                plan_with_hops(&desired, node, hops.get(), &model.snap, &mut tables).unwrap();
            assert!(
                again.ops.is_empty(),
                "seed {seed} step {step}: {:?}",
                again.ops
            );
        }
    }
}

#[test]
fn a_changed_backend_is_never_served_from_the_cache() {
    // One service; its memo is warm. Replacing one backend (same count, same weights, same
    // table size) must give a new table, equal to a from-scratch plan.
    let addr = addrs()[0];
    let ips = backend_ips();
    let node = node_config(
        &DesiredState::default(),
        [2, 0, 0, 0, 0, 2],
        None,
        None,
        super::tests::TEST_LOADED,
    );
    let mut desired = DesiredState::default();
    let mut svc = ServiceSpec {
        name: "a".into(),
        forwarding: Forwarding::L2,
        table_size: None,
        flow_tracking: false,
        source_ranges: None,
        fragments: false,
        affinity_timeout_s: None,
        backends: BTreeMap::new(),
    };
    for ip in &ips[..4] {
        svc.backends.insert(
            *ip,
            BackendSpec {
                weight: 1,
                mac: Some([2, 0, 0, 0, 0, 1]),
            },
        );
    }
    desired.services.insert(addr, svc);
    let mut model = Model::new();
    let mut tables = TableCache::default();
    let macs = BTreeMap::new();
    let p = plan_with_cache(&desired, node, &macs, &model.snap, &mut tables).unwrap();
    model.apply(&p.ops);
    let before = model.snap.services[&service_key(&addr)];

    let svc = desired.services.get_mut(&addr).unwrap();
    let spec = svc.backends.remove(&ips[3]).unwrap();
    svc.backends.insert(ips[4], spec);
    let cached = plan_with_cache(&desired, node, &macs, &model.snap, &mut tables).unwrap();
    assert_eq!(cached, plan(&desired, node, &macs, &model.snap).unwrap());
    let prev = model.snap.clone();
    model.apply(&cached.ops);
    model.check(&desired, &Hops::default(), &prev);
    let after = model.snap.services[&service_key(&addr)];
    assert_eq!(after.table_size, before.table_size);
    assert_ne!(after.fingerprint, before.fingerprint);
}
