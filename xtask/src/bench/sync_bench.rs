//! Control plane on real maps: how long `sync::plan` + `Dataplane::apply` take to bring
//! freshly loaded maps to N services, and then to apply one backend change, the way the
//! agent does it (it keeps its snapshot current with `apply_to_snapshot` instead of
//! re-reading the maps, and its table fingerprints in a `TableCache`).

use std::{collections::BTreeMap, path::Path, time::Instant};

use anyhow::{Context, ensure};
use lb_agent::{
    dataplane::Dataplane,
    loader,
    state::{BackendSpec, DesiredState},
    sync,
    table_cache::TableCache,
};
use lb_common::maglev;

use super::{
    harness::PinDir,
    results::SyncRow,
    scale::{self, NODE_MAC},
    stats::Summary,
};

pub const BACKENDS_PER_SERVICE: usize = 10;

/// `LB_MAGLEV` slots for `services` tables of `per_service` backends: every table twice
/// (the agent writes a replacement before freeing the old one), at least the default.
pub fn maglev_slots(services: usize, per_service: usize) -> u32 {
    let table = u64::from(maglev::table_size_for(per_service as u64));
    let need = 2 * services as u64 * table + u64::from(maglev::MAX_TABLE_SIZE);
    need.clamp(
        u64::from(lb_common::maps::DEFAULT_MAGLEV_SLOTS),
        u64::from(u32::MAX),
    ) as u32
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Full sync of `services` services into fresh maps, then `changes` single changes.
pub fn run(services: usize, changes: usize) -> anyhow::Result<SyncRow> {
    let per = BACKENDS_PER_SERVICE;
    let yaml = scale::config_yaml(services, per, "bench0")?;
    let desired = lb_agent::config::parse(Path::new("<generated>"), &yaml)
        .context("the generated config does not validate")?;
    drop(yaml);
    ensure!(
        desired.services.len() == services,
        "generated {} services",
        desired.services.len()
    );

    let pins = PinDir::new("sync");
    let mut ebpf = loader::load(pins.path(), maglev_slots(services, per), 65_536)
        .context("loading the object")?;
    let mut dataplane = Dataplane::from_ebpf(&mut ebpf)?;
    let loaded = lb_agent::loader::loaded(&mut ebpf).context("reading the loaded data plane")?;
    let mut node = sync::node_config(&desired, NODE_MAC, Some(scale::ENCAP), None, loaded);
    node.mtu = 1500;
    let macs = BTreeMap::new();

    // Full sync from empty maps, as an agent starting on a fresh node.
    let t0 = Instant::now();
    let mut snapshot = dataplane.snapshot()?;
    let snapshot_ms = ms_since(t0);
    let mut tables = TableCache::default();
    let t1 = Instant::now();
    let plan = sync::plan_with_cache(&desired, node, &macs, &snapshot, &mut tables)?;
    let plan_ms = ms_since(t1);
    let t2 = Instant::now();
    dataplane.apply(&plan.ops)?;
    let apply_ms = ms_since(t2);
    let full_ms = ms_since(t0);
    ensure!(
        plan.unresolved.is_empty(),
        "unresolved backends in the plan"
    );
    sync::apply_to_snapshot(&mut snapshot, &plan.ops);
    let maglev_writes: usize = plan
        .ops
        .iter()
        .map(|op| match op {
            sync::MapOp::WriteTable { entries, .. } => entries.len(),
            _ => 0,
        })
        .sum();

    // Single changes: one backend leaves a service, then comes back (alternating), each
    // time in another service; plan against the kept snapshot, apply, update the snapshot.
    let mut state: DesiredState = desired;
    let addrs: Vec<_> = state.services.keys().copied().collect();
    let mut removed: Option<(usize, std::net::IpAddr, BackendSpec)> = None;
    let mut samples = Vec::with_capacity(changes);
    for k in 0..changes {
        match removed.take() {
            None => {
                let i = (k * 7919) % addrs.len();
                let svc = state.services.get_mut(&addrs[i]).context("service")?;
                let (&ip, _) = svc.backends.iter().nth(k % per).context("backend")?;
                let spec = svc.backends.remove(&ip).context("backend")?;
                removed = Some((i, ip, spec));
            }
            Some((i, ip, spec)) => {
                let svc = state.services.get_mut(&addrs[i]).context("service")?;
                svc.backends.insert(ip, spec);
            }
        }
        let t = Instant::now();
        let plan = sync::plan_with_cache(&state, node, &macs, &snapshot, &mut tables)?;
        dataplane.apply(&plan.ops)?;
        sync::apply_to_snapshot(&mut snapshot, &plan.ops);
        samples.push(ms_since(t));
    }
    // The maps must hold what the agent believes they hold.
    let truth = dataplane.snapshot()?;
    ensure!(
        truth.services == snapshot.services && truth.backends == snapshot.backends,
        "after the changes the maps differ from the agent's snapshot"
    );
    ensure!(
        truth.services.len() == services && truth.backends.len() >= services * (per - 1),
        "maps hold {} services and {} backends",
        truth.services.len(),
        truth.backends.len()
    );
    let change_ms = Summary::of(&samples).context("no change samples")?;
    drop(dataplane);
    drop(ebpf);
    drop(pins);
    Ok(SyncRow {
        services,
        backends_per_service: per,
        ops: plan.ops.len(),
        maglev_writes,
        full_ms,
        snapshot_ms,
        plan_ms,
        apply_ms,
        change_ms,
    })
}
