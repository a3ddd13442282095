//! The flow tables (`LB_FLOWTAB4`, `LB_FLOWTAB6`) from the agent's side: remembering a flow
//! (the flows of an older version's tables move in on an upgrade) and finding one (tests,
//! debugging). Buckets, tags and the choice of way are `lb_common::flowtab`'s, the same as
//! the data plane's, under the node's secret (`NodeConfig::flow_secret`, [`node_secret`]).
//! A bucket is read, changed and written whole: do it while no program that uses the table
//! is attached, or accept that a flow the data plane remembers at the same moment in the
//! same bucket may be lost (it is then decided by Maglev again).

use std::{borrow::BorrowMut, fs::File, io::Read};

use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use lb_common::{
    FlowState, NodeConfig,
    flowtab::{self, Secret, TableKey},
    maps,
};

use crate::loader::LoadError;

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> LoadError {
    move |source| LoadError::Map { map, source }
}

/// Why the node's secret could not be read or drawn.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("map LB_CONFIG: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("drawing the flow tables' secret from {RANDOM}: {0}")]
    Random(#[from] std::io::Error),
}

const RANDOM: &str = "/dev/urandom";

/// The node's flow-table secret as `LB_CONFIG` holds it (all zero: none drawn yet), while
/// `ebpf` still holds the map (a [`crate::dataplane::Dataplane`] takes it).
pub fn secret(ebpf: &Ebpf) -> Result<Secret, LoadError> {
    let map = ebpf
        .map(maps::CONFIG)
        .ok_or(LoadError::MissingMap(maps::CONFIG))?;
    let config: Array<&MapData, NodeConfig> =
        Array::try_from(map).map_err(map_err(maps::CONFIG))?;
    let node = config.get(&0, 0).map_err(map_err(maps::CONFIG))?;
    Ok(node.flow_secret)
}

/// [`ensure_secret`] on `ebpf`'s `LB_CONFIG`.
pub fn node_secret(ebpf: &mut Ebpf) -> Result<(Secret, bool), LoadError> {
    let map = ebpf
        .map_mut(maps::CONFIG)
        .ok_or(LoadError::MissingMap(maps::CONFIG))?;
    let mut config: Array<&mut MapData, NodeConfig> =
        Array::try_from(map).map_err(map_err(maps::CONFIG))?;
    Ok(ensure_secret(&mut config)?)
}

/// The node's flow-table secret: the one the config map holds (an earlier agent's, through
/// the pin), else a new random one, written there at once with the rest of the config left
/// as it is (not valid before the first sync, so no program reads it). True when new: flows
/// already in the tables were placed under another secret ([`rekey`]).
pub fn ensure_secret<T: BorrowMut<MapData>>(
    config: &mut Array<T, NodeConfig>,
) -> Result<(Secret, bool), SecretError> {
    let mut node = config.get(&0, 0)?;
    if node.flow_secret != [0; 4] {
        return Ok((node.flow_secret, false));
    }
    let mut bytes = [0u8; 32];
    File::open(RANDOM)?.read_exact(&mut bytes)?;
    node.flow_secret =
        std::array::from_fn(|i| u64::from_ne_bytes(std::array::from_fn(|j| bytes[8 * i + j])));
    if node.flow_secret == [0; 4] {
        // All zero means "none"; 2⁻²⁵⁶ away.
        node.flow_secret[0] = 1;
    }
    config.set(0, node, 0)?;
    Ok((node.flow_secret, true))
}

/// The remembered state of `key`'s flow, if its table holds it (placed under `secret`, the
/// node's: `NodeConfig::flow_secret`).
pub fn find<K: TableKey>(
    ebpf: &Ebpf,
    secret: &Secret,
    key: &K,
) -> Result<Option<FlowState>, LoadError>
where
    K::Bucket: aya::Pod,
{
    let map = ebpf.map(K::MAP).ok_or(LoadError::MissingMap(K::MAP))?;
    let table: Array<&MapData, K::Bucket> = Array::try_from(map).map_err(map_err(K::MAP))?;
    let index = flowtab::bucket_index(key.hash(secret), table.len());
    let bucket = table.get(&index, 0).map_err(map_err(K::MAP))?;
    Ok(key.find(secret, &bucket))
}

/// Remember `key`'s flow with `state` under `secret` (its tag is set here): in its own
/// entry if it has one, else in the way the data plane would take at `now` (jiffies, low
/// 32 bits).
pub fn remember<K: TableKey>(
    ebpf: &mut Ebpf,
    secret: &Secret,
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
    let index = flowtab::bucket_index(key.hash(secret), table.len());
    let mut bucket = table.get(&index, 0).map_err(map_err(K::MAP))?;
    key.place(secret, &mut bucket, state, now);
    table.set(index, bucket, 0).map_err(map_err(K::MAP))
}

/// Move every flow of `K`'s table to its place under `secret`: for tables filled under
/// another secret (an older version's, which had none, or a replaced `LB_CONFIG`'s), whose
/// flows would be lost otherwise. Each is placed as if now were its own last packet (in a
/// full bucket the longest idle lose). Reads and writes the whole table: call it before the
/// program that uses the secret is attached. Returns how many flows it holds.
pub fn rekey<K: TableKey>(ebpf: &mut Ebpf, secret: &Secret) -> Result<usize, LoadError>
where
    K::Bucket: aya::Pod + Default,
{
    let map = ebpf.map_mut(K::MAP).ok_or(LoadError::MissingMap(K::MAP))?;
    let mut table: Array<&mut MapData, K::Bucket> =
        Array::try_from(map).map_err(map_err(K::MAP))?;
    let buckets = table.len();
    let mut flows = Vec::new();
    for i in 0..buckets {
        let bucket = table.get(&i, 0).map_err(map_err(K::MAP))?;
        flows.extend(K::entries(&bucket).into_iter().filter(|(_, s)| s.tag != 0));
    }
    if flows.is_empty() {
        return Ok(0);
    }
    let mut placed = vec![K::Bucket::default(); buckets as usize];
    for (key, state) in &flows {
        let index = flowtab::bucket_index(key.hash(secret), buckets);
        key.place(secret, &mut placed[index as usize], *state, state.last_seen);
    }
    for (i, bucket) in (0..buckets).zip(placed) {
        table.set(i, bucket, 0).map_err(map_err(K::MAP))?;
    }
    Ok(flows.len())
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
