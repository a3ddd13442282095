//! The flow tables (`LB_FLOWTAB4`, `LB_FLOWTAB6`) from the agent's side: remembering a flow
//! (the flows of an older version's tables move in on an upgrade) and finding one (tests,
//! debugging). Buckets, tags and the choice of way are `lb_common::flowtab`'s, the same as
//! the data plane's. A bucket is read, changed and written whole: do it while no program
//! that uses the table is attached, or accept that a flow the data plane remembers at the
//! same moment in the same bucket may be lost (it is then decided by Maglev again).

use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use lb_common::{
    FlowState,
    flowtab::{self, TableKey},
};

use crate::loader::LoadError;

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> LoadError {
    move |source| LoadError::Map { map, source }
}

/// The remembered state of `key`'s flow, if its table holds it.
pub fn find<K: TableKey>(ebpf: &Ebpf, key: &K) -> Result<Option<FlowState>, LoadError>
where
    K::Bucket: aya::Pod,
{
    let map = ebpf.map(K::MAP).ok_or(LoadError::MissingMap(K::MAP))?;
    let table: Array<&MapData, K::Bucket> = Array::try_from(map).map_err(map_err(K::MAP))?;
    let index = flowtab::bucket_index(key.hash(), table.len());
    let bucket = table.get(&index, 0).map_err(map_err(K::MAP))?;
    Ok(key.find(&bucket))
}

/// Remember `key`'s flow with `state` (its tag is set here): in its own entry if it has
/// one, else in the way the data plane would take at `now` (jiffies, low 32 bits).
pub fn remember<K: TableKey>(
    ebpf: &mut Ebpf,
    key: &K,
    state: FlowState,
    now: u32,
) -> Result<(), LoadError>
where
    K::Bucket: aya::Pod,
{
    let map = ebpf.map_mut(K::MAP).ok_or(LoadError::MissingMap(K::MAP))?;
    let mut table: Array<&mut MapData, K::Bucket> =
        Array::try_from(map).map_err(map_err(K::MAP))?;
    let index = flowtab::bucket_index(key.hash(), table.len());
    let mut bucket = table.get(&index, 0).map_err(map_err(K::MAP))?;
    key.place(&mut bucket, state, now);
    table.set(index, bucket, 0).map_err(map_err(K::MAP))
}

/// Buckets of `K`'s loaded table: a pinned table keeps the size it was created with,
/// whatever the configuration says now.
pub fn buckets<K: TableKey>(ebpf: &Ebpf) -> Result<u32, LoadError>
where
    K::Bucket: aya::Pod,
{
    let map = ebpf.map(K::MAP).ok_or(LoadError::MissingMap(K::MAP))?;
    let table: Array<&MapData, K::Bucket> = Array::try_from(map).map_err(map_err(K::MAP))?;
    Ok(table.len())
}
