//! Upgrading over the pins of an older build: a pinned map whose layout this build does not
//! share (here `LB_SERVICES` with the older 24-byte value, and `LB_REASONS` with fewer
//! counters) is replaced, so the program loads; a map whose layout is unchanged
//! (`LB_FLOWTAB4`) is adopted with its entries, so remembered connections survive the
//! upgrade; the LRU flow tables of older versions (the single `LB_FLOWS`, then `LB_FLOWS4`
//! and `LB_FLOWS6`) have their entries moved into `LB_FLOWTAB4`/`LB_FLOWTAB6` and their pins
//! removed, as is the pin of the retired `LB_VIP_BITS`. An older `LB_CONFIG` (without the
//! flow tables' secret) is replaced too, and the adopted flows move to their buckets under
//! the secret drawn then; a restarted agent keeps the node's secret.
//! Needs root (loading BPF, bpffs).

use std::{path::Path, process::Command};

use aya::maps::{HashMap, Map, MapData, MapInfo};
use lb_agent::{flowtab, loader};
use lb_common::{FlowKey, FlowKeyV4, FlowState, FlowValue, Reason, maps};
use lb_testkit::scenario::DirGuard;

fn bpftool(args: &[&str]) {
    let out = Command::new("bpftool")
        .args(args)
        .output()
        .expect("running bpftool (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "bpftool {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn pins_of_another_layout_are_replaced_and_compatible_ones_adopted() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test loads BPF programs: run it as root (cargo xtask test does)"
    );
    let pins =
        DirGuard(Path::new("/sys/fs/bpf").join(format!("lb-upgrade-test-{}", std::process::id())));
    loader::ensure_pin_dir(&pins.0).unwrap();
    let pin = |name: &str| pins.0.join(name).to_str().unwrap().to_string();

    let value = |backend_id| FlowValue {
        backend_id,
        flow_hash: 0,
        last_seen: 1,
    };
    // A running agent's pins, with one remembered connection.
    let flow = FlowKeyV4::new(
        [198, 18, 1, 1],
        [198, 18, 0, 100],
        40000u16.to_be(),
        80u16.to_be(),
        6,
    );
    {
        let mut ebpf = loader::load(&pins.0, 1 << 16, 4096).expect("first load");
        let secret = flowtab::secret(&ebpf).unwrap();
        flowtab::remember(&mut ebpf, &secret, &flow, value(7).state(), 1).unwrap();
    }
    // What older builds' layouts look like: services with a shorter value, fewer reason
    // counters, a config without the flow tables' secret, the VIP filter, one LRU flow table
    // for both families, then one per family.
    for name in [maps::SERVICES, maps::REASON_STATS, maps::CONFIG] {
        std::fs::remove_file(pins.0.join(name)).unwrap();
    }
    bpftool(&[
        "map",
        "create",
        &pin(maps::CONFIG),
        "type",
        "array",
        "key",
        "4",
        "value",
        "56",
        "entries",
        "1",
        "name",
        maps::CONFIG,
    ]);
    bpftool(&[
        "map",
        "create",
        &pin("LB_VIP_BITS"),
        "type",
        "array",
        "key",
        "4",
        "value",
        "8",
        "entries",
        "4096",
        "name",
        "LB_VIP_BITS",
    ]);
    bpftool(&[
        "map",
        "create",
        &pin(maps::LEGACY_FLOWS),
        "type",
        "lru_hash",
        "key",
        "40",
        "value",
        "16",
        "entries",
        "4096",
        "name",
        maps::LEGACY_FLOWS,
    ]);
    let old_v4 = FlowKey {
        src_be: lb_common::addr16_v4([198, 18, 1, 2]),
        dst_be: lb_common::addr16_v4([198, 18, 0, 100]),
        sport_be: 40001u16.to_be(),
        dport_be: 80u16.to_be(),
        proto: 6,
        family: lb_common::FAMILY_V4,
        _pad: [0; 2],
    };
    let old_v6 = FlowKey {
        src_be: [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
        dst_be: [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
        sport_be: 40002u16.to_be(),
        dport_be: 443u16.to_be(),
        proto: 6,
        family: lb_common::FAMILY_V6,
        _pad: [0; 2],
    };
    {
        let legacy = MapData::from_pin(pins.0.join(maps::LEGACY_FLOWS)).unwrap();
        let mut legacy: HashMap<_, FlowKey, FlowValue> =
            HashMap::try_from(Map::LruHashMap(legacy)).unwrap();
        legacy.insert(old_v4, value(8), 0).unwrap();
        legacy.insert(old_v6, value(9), 0).unwrap();
    }
    for (name, key) in [(maps::LEGACY_FLOWS4, "16"), (maps::LEGACY_FLOWS6, "40")] {
        bpftool(&[
            "map",
            "create",
            &pin(name),
            "type",
            "lru_hash",
            "key",
            key,
            "value",
            "16",
            "entries",
            "4096",
            "name",
            name,
        ]);
    }
    let v4_later = FlowKeyV4::new(
        [198, 18, 1, 3],
        [198, 18, 0, 100],
        40003u16.to_be(),
        80u16.to_be(),
        6,
    );
    let v6_later = FlowKey {
        sport_be: 40004u16.to_be(),
        ..old_v6
    };
    {
        let table = MapData::from_pin(pins.0.join(maps::LEGACY_FLOWS4)).unwrap();
        let mut table: HashMap<_, FlowKeyV4, FlowValue> =
            HashMap::try_from(Map::LruHashMap(table)).unwrap();
        table.insert(v4_later, value(10), 0).unwrap();
        let table = MapData::from_pin(pins.0.join(maps::LEGACY_FLOWS6)).unwrap();
        let mut table: HashMap<_, FlowKey, FlowValue> =
            HashMap::try_from(Map::LruHashMap(table)).unwrap();
        table.insert(v6_later, value(11), 0).unwrap();
    }
    bpftool(&[
        "map",
        "create",
        &pin(maps::SERVICES),
        "type",
        "hash",
        "key",
        "20",
        "value",
        "24",
        "entries",
        "32768",
        "name",
        maps::SERVICES,
    ]);
    bpftool(&[
        "map",
        "create",
        &pin(maps::REASON_STATS),
        "type",
        "percpu_array",
        "key",
        "4",
        "value",
        "16",
        "entries",
        "21",
        "name",
        maps::REASON_STATS,
    ]);

    let dropped = loader::drop_incompatible_pins(&pins.0).unwrap();
    assert_eq!(
        dropped,
        [
            "LB_VIP_BITS",
            maps::SERVICES,
            maps::CONFIG,
            maps::REASON_STATS
        ]
    );
    let mut ebpf = loader::load(&pins.0, 1 << 16, 4096).expect("load over the old pins");
    loader::install_decap(&mut ebpf).expect("the programs load against the new maps");
    let prog: &mut aya::programs::Xdp =
        ebpf.program_mut(maps::PROG_LB).unwrap().try_into().unwrap();
    prog.load().expect("lb_xdp loads");

    let info = MapInfo::from_pin(pins.0.join(maps::SERVICES)).unwrap();
    assert_eq!(
        info.value_size() as usize,
        size_of::<lb_common::ServiceValue>()
    );
    let info = MapInfo::from_pin(pins.0.join(maps::REASON_STATS)).unwrap();
    assert_eq!(info.max_entries(), Reason::COUNT);
    // The flow table was adopted with its connection (moved to its bucket under the secret
    // drawn for the new config), and the old tables' moved in.
    let secret = flowtab::secret(&ebpf).unwrap();
    let backend = |found: Option<FlowState>| found.expect("flow remembered").backend_id;
    assert_eq!(backend(flowtab::find(&ebpf, &secret, &flow).unwrap()), 7);
    assert_eq!(
        backend(flowtab::find(&ebpf, &secret, &old_v4.narrow().unwrap()).unwrap()),
        8
    );
    assert_eq!(backend(flowtab::find(&ebpf, &secret, &old_v6).unwrap()), 9);
    assert_eq!(
        backend(flowtab::find(&ebpf, &secret, &v4_later).unwrap()),
        10
    );
    assert_eq!(
        backend(flowtab::find(&ebpf, &secret, &v6_later).unwrap()),
        11
    );
    for name in [
        maps::LEGACY_FLOWS,
        maps::LEGACY_FLOWS4,
        maps::LEGACY_FLOWS6,
        "LB_VIP_BITS",
    ] {
        assert!(!pins.0.join(name).exists(), "{name} is still pinned");
    }
}

/// A restarted agent finds the node's secret in the pinned `LB_CONFIG` and keeps it, so the
/// flows the tables hold stay where it looks for them.
#[test]
fn a_restarted_agent_keeps_the_flow_table_secret() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test loads BPF programs: run it as root"
    );
    let pins =
        DirGuard(Path::new("/sys/fs/bpf").join(format!("lb-secret-test-{}", std::process::id())));
    let flow = FlowKeyV4::new(
        [198, 18, 1, 1],
        [198, 18, 0, 100],
        40000u16.to_be(),
        80u16.to_be(),
        6,
    );
    let state = FlowState {
        backend_id: 7,
        tag: 0,
        flow_hash: 0,
        last_seen: 1,
    };
    let first = {
        let mut ebpf = loader::load(&pins.0, 1 << 16, 4096).expect("first load");
        let secret = flowtab::secret(&ebpf).unwrap();
        flowtab::remember(&mut ebpf, &secret, &flow, state, 1).unwrap();
        secret
    };
    assert_ne!(first, [0; 4], "a new node draws a secret");
    let ebpf = loader::load(&pins.0, 1 << 16, 4096).expect("second load");
    assert_eq!(flowtab::secret(&ebpf).unwrap(), first);
    assert_eq!(
        flowtab::find(&ebpf, &first, &flow)
            .unwrap()
            .unwrap()
            .backend_id,
        7
    );
    // Another node (fresh pins) draws its own.
    drop(ebpf);
    let other =
        DirGuard(Path::new("/sys/fs/bpf").join(format!("lb-secret-other-{}", std::process::id())));
    let ebpf = loader::load(&other.0, 1 << 16, 4096).expect("another node's load");
    assert_ne!(flowtab::secret(&ebpf).unwrap(), first);
}
