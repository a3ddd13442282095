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
use lb_common::{FlowBucket4, FlowBucket6, FlowKey, FlowKeyV4, FlowState, flowtab, maps};

use crate::loader::LoadError;

/// A key type of a flow table.
pub trait TableKey: Sized {
    type Bucket: aya::Pod;
    /// The table's map.
    const MAP: &'static str;
    fn hash(&self) -> u64;
    fn find(bucket: &Self::Bucket, key: &Self) -> Option<FlowState>;
    fn place(bucket: &mut Self::Bucket, key: &Self, state: FlowState, now: u32);
}

impl TableKey for FlowKeyV4 {
    type Bucket = FlowBucket4;
    const MAP: &'static str = maps::FLOWTAB4;
    fn hash(&self) -> u64 {
        flowtab::v4_hash(self)
    }
    fn find(bucket: &FlowBucket4, key: &Self) -> Option<FlowState> {
        bucket.find(key)
    }
    fn place(bucket: &mut FlowBucket4, key: &Self, state: FlowState, now: u32) {
        bucket.place(key, state, now);
    }
}

impl TableKey for FlowKey {
    type Bucket = FlowBucket6;
    const MAP: &'static str = maps::FLOWTAB6;
    fn hash(&self) -> u64 {
        flowtab::v6_hash(self)
    }
    fn find(bucket: &FlowBucket6, key: &Self) -> Option<FlowState> {
        bucket.find(key)
    }
    fn place(bucket: &mut FlowBucket6, key: &Self, state: FlowState, now: u32) {
        bucket.place(key, state, now);
    }
}

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> LoadError {
    move |source| LoadError::Map { map, source }
}

/// The remembered state of `key`'s flow, if its table holds it.
pub fn find<K: TableKey>(ebpf: &Ebpf, key: &K) -> Result<Option<FlowState>, LoadError> {
    let map = ebpf.map(K::MAP).ok_or(LoadError::MissingMap(K::MAP))?;
    let table: Array<&MapData, K::Bucket> = Array::try_from(map).map_err(map_err(K::MAP))?;
    let index = flowtab::bucket_index(key.hash(), table.len());
    let bucket = table.get(&index, 0).map_err(map_err(K::MAP))?;
    Ok(K::find(&bucket, key))
}

/// Remember `key`'s flow with `state` (its tag is set here): in its own entry if it has
/// one, else in the way the data plane would take at `now` (jiffies, low 32 bits).
pub fn remember<K: TableKey>(
    ebpf: &mut Ebpf,
    key: &K,
    state: FlowState,
    now: u32,
) -> Result<(), LoadError> {
    let map = ebpf.map_mut(K::MAP).ok_or(LoadError::MissingMap(K::MAP))?;
    let mut table: Array<&mut MapData, K::Bucket> =
        Array::try_from(map).map_err(map_err(K::MAP))?;
    let index = flowtab::bucket_index(key.hash(), table.len());
    let mut bucket = table.get(&index, 0).map_err(map_err(K::MAP))?;
    K::place(&mut bucket, key, state, now);
    table.set(index, bucket, 0).map_err(map_err(K::MAP))
}

/// Buckets of `K`'s loaded table: a pinned table keeps the size it was created with,
/// whatever the configuration says now.
pub fn buckets<K: TableKey>(ebpf: &Ebpf) -> Result<u32, LoadError> {
    let map = ebpf.map(K::MAP).ok_or(LoadError::MissingMap(K::MAP))?;
    let table: Array<&MapData, K::Bucket> = Array::try_from(map).map_err(map_err(K::MAP))?;
    Ok(table.len())
}
