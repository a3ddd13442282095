//! How `Dataplane::apply` writes Maglev tables into the real `LB_MAGLEV`: through a memory
//! mapping of the array (it is created `BPF_F_MMAPABLE`), and with batch updates when the
//! pinned array predates that flag (an upgraded node). Every table read back from the map
//! must be the one the plan built, after a full sync and after changes.
//! Needs root (loading BPF).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    process::Command,
};

use aya::{maps::MapInfo, programs::Xdp};
use lb_agent::{
    dataplane::Dataplane,
    loader,
    state::{BackendSpec, DesiredState, Protocol, ServiceAddr, ServiceSpec},
    sync,
    table_cache::TableCache,
};
use lb_common::{Forwarding, maglev, maps};
use lb_testkit::scenario::DirGuard;

/// Enough slots that a full sync spans several mapping windows.
const SLOTS: u32 = 1 << 20;
const SERVICES: u16 = 150;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test loads BPF programs: run it as root (cargo xtask test does)"
    );
}

fn pin_dir(tag: &str) -> DirGuard {
    DirGuard(Path::new("/sys/fs/bpf").join(format!("lb-maglev-test-{}-{tag}", std::process::id())))
}

/// `SERVICES` services of 1 to 12 backends each (so some tables are 2053 slots), MACs given.
fn desired() -> DesiredState {
    let mut d = DesiredState::default();
    let mut next = u32::from(Ipv4Addr::new(198, 18, 4, 0));
    for i in 0..SERVICES {
        let backends = (0..1 + i % 12)
            .map(|j| {
                next += 1;
                (
                    IpAddr::V4(Ipv4Addr::from(next)),
                    BackendSpec {
                        weight: 1 + u32::from(j % 3),
                        mac: Some([2, 0, 0, 0, (next >> 8) as u8, next as u8]),
                    },
                )
            })
            .collect();
        d.services.insert(
            ServiceAddr {
                vip: Ipv4Addr::new(198, 18, 0, 100).into(),
                port: 1000 + i,
                protocol: Protocol::Tcp,
            },
            ServiceSpec {
                name: format!("svc-{i}"),
                forwarding: Forwarding::Ipip,
                table_size: None,
                flow_tracking: true,
                source_ranges: None,
                fragments: false,
                affinity_timeout_s: None,
                backends,
            },
        );
    }
    d
}

/// Every service's table as read back from `LB_MAGLEV` is the one the plan built (its
/// fingerprint) and holds only that service's backends.
fn check_tables(dp: &Dataplane, desired: &DesiredState) {
    let snap = dp.snapshot().unwrap();
    assert_eq!(snap.services.len(), desired.services.len());
    for addr in desired.services.keys() {
        let v = snap.services[&sync::service_key(addr)];
        let table = dp.table(&v).unwrap();
        assert_eq!(table.len(), v.table_size as usize, "{addr}");
        assert_eq!(maglev::fingerprint(&table), v.fingerprint, "{addr}: table");
        for id in &table {
            assert_eq!(
                snap.backends[id].service_id, v.id,
                "{addr}: slot holds {id}"
            );
        }
    }
}

/// Full sync, then changes (one backend fewer in every fifth service, then back), each
/// checked against the maps.
fn sync_and_change(dp: &mut Dataplane) {
    let mut desired = desired();
    let node = sync::node_config(
        &desired,
        [2, 0, 0, 0, 0, 2],
        Some(Ipv4Addr::new(198, 18, 0, 2)),
        None,
        lb_agent::loader::Loaded {
            hz: 250,
            flow_buckets4: 1,
            flow_buckets6: 1,
        },
    );
    let macs = BTreeMap::new();
    let mut tables = TableCache::default();
    let mut snap = dp.snapshot().unwrap();
    let mut program = |desired: &DesiredState| {
        let plan = sync::plan_with_cache(desired, node, &macs, &snap, &mut tables).unwrap();
        dp.apply(&plan.ops).unwrap();
        sync::apply_to_snapshot(&mut snap, &plan.ops);
        check_tables(dp, desired);
        assert_eq!(dp.snapshot().unwrap(), snap);
    };
    program(&desired);
    let full = desired.clone();
    for svc in desired.services.values_mut().step_by(5) {
        if svc.backends.len() > 1 {
            svc.backends.pop_first();
        }
    }
    program(&desired);
    program(&full);
}

#[test]
fn tables_are_written_through_a_mapping_of_lb_maglev() {
    require_root();
    let pins = pin_dir("mmap");
    let mut ebpf = loader::load(&pins.0, SLOTS, 1024).unwrap();
    let info = MapInfo::from_pin(pins.0.join(maps::MAGLEV)).unwrap();
    assert_ne!(info.map_flags() as usize & maps::MMAPABLE_FLAG, 0);
    let mut dp = Dataplane::from_ebpf(&mut ebpf).unwrap();
    assert_eq!(dp.maglev_capacity(), SLOTS);
    sync_and_change(&mut dp);
}

#[test]
fn an_lb_maglev_pinned_without_mmap_is_written_with_batches() {
    require_root();
    let pins = pin_dir("legacy");
    loader::ensure_pin_dir(&pins.0).unwrap();
    // As an agent from before BPF_F_MMAPABLE left it, with another size than asked for.
    let legacy_slots = SLOTS / 2;
    let status = Command::new("bpftool")
        .args(["map", "create"])
        .arg(pins.0.join(maps::MAGLEV))
        .args(["type", "array", "key", "4", "value", "4", "entries"])
        .arg(legacy_slots.to_string())
        .args(["name", maps::MAGLEV])
        .status()
        .expect("running bpftool");
    assert!(status.success(), "bpftool map create: {status}");
    let mut ebpf = loader::load(&pins.0, SLOTS, 1024).unwrap();
    // The program runs with the old array.
    let prog: &mut Xdp = ebpf.program_mut(maps::PROG_LB).unwrap().try_into().unwrap();
    prog.load().unwrap();
    let mut dp = Dataplane::from_ebpf(&mut ebpf).unwrap();
    assert_eq!(dp.maglev_capacity(), legacy_slots);
    sync_and_change(&mut dp);
}
