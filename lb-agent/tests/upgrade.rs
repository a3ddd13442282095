//! Upgrading over the pins of an older build: a pinned map whose layout this build does not
//! share (here `LB_SERVICES` with the older 24-byte value, and `LB_REASONS` with fewer
//! counters) is replaced, so the program loads; a map whose layout is unchanged (`LB_FLOWS`)
//! is adopted with its entries, so remembered connections survive the upgrade.
//! Needs root (loading BPF, bpffs).

use std::{path::Path, process::Command};

use aya::maps::{HashMap, Map, MapData, MapInfo};
use lb_agent::loader;
use lb_common::{FlowKey, FlowValue, Reason, maps};
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

    // A running agent's pins, with one remembered connection.
    let flow = FlowKey {
        src_be: [198, 18, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        dst_be: [198, 18, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        sport_be: 40000u16.to_be(),
        dport_be: 80u16.to_be(),
        proto: 6,
        family: 4,
        _pad: [0; 2],
    };
    {
        let mut ebpf = loader::load(&pins.0, 1 << 16, 4096).expect("first load");
        let mut flows: HashMap<_, FlowKey, FlowValue> =
            HashMap::try_from(ebpf.map_mut(maps::FLOWS).unwrap()).unwrap();
        let value = FlowValue {
            backend_id: 7,
            _pad: [0; 4],
            last_seen_ns: 1,
        };
        flows.insert(flow, value, 0).unwrap();
    }
    // What an older build's layout looks like: services with a shorter value, fewer reason
    // counters (the flow table's layout is unchanged).
    for name in [maps::SERVICES, maps::REASON_STATS] {
        std::fs::remove_file(pins.0.join(name)).unwrap();
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
    assert_eq!(dropped, [maps::SERVICES, maps::REASON_STATS]);
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
    // The flow table was adopted with its connection.
    let flows = MapData::from_pin(pins.0.join(maps::FLOWS)).unwrap();
    let flows: HashMap<_, FlowKey, FlowValue> = HashMap::try_from(Map::LruHashMap(flows)).unwrap();
    assert_eq!(flows.get(&flow, 0).unwrap().backend_id, 7);
}
