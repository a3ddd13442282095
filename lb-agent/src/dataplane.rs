//! The only module that holds BPF map handles: reads the maps into a `MapSnapshot`, applies
//! `MapOp`s, and reads counters; and [`AnswerLease`], the handle of the one map the sync
//! does not write.

use std::{collections::BTreeMap, path::Path};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, IterableMap, Map, MapData, MapError, PerCpuArray, PerCpuValues,
        lpm_trie::{Key, LpmTrie},
    },
    util::nr_cpus,
};
use lb_common::{
    BackendValue, Counters, DecapAddr, DnatKey, DnatValue, NodeConfig, Reason, SLOT_EMPTY,
    SLOT_SHARED, ServiceCounters, ServiceKey, ServiceRecord, ServiceValue, SourceRange, VipKey,
    VipValue, maps,
};

use crate::sync::{DecapList, MapOp, MapSnapshot};

pub(crate) mod batch;
mod mmap;

use mmap::ArrayWriter;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("map {map} is missing from the object")]
    Missing { map: &'static str },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("map {map}: cannot open pin {path}: {source}")]
    Pin {
        map: &'static str,
        path: String,
        source: MapError,
    },
    #[error("cannot count CPUs: {0}")]
    Cpus(String),
    #[error(transparent)]
    Secret(#[from] crate::flowtab::SecretError),
    #[error("map {map}: batch update of {entries} entries: {source}")]
    Batch {
        map: &'static str,
        entries: usize,
        source: std::io::Error,
    },
    #[error("map {map}: writing {entries} slots from {offset} through a memory mapping: {source}")]
    Mmap {
        map: &'static str,
        offset: u32,
        entries: usize,
        source: std::io::Error,
    },
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

/// Handles to every map of the data plane.
pub struct Dataplane {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: Array<MapData, BackendValue>,
    maglev: Array<MapData, u32>,
    config: Array<MapData, NodeConfig>,
    vips: HashMap<MapData, VipKey, VipValue>,
    source_ranges: LpmTrie<MapData, SourceRange, u32>,
    decap_sources: LpmTrie<MapData, DecapAddr, u32>,
    decap_destinations: LpmTrie<MapData, DecapAddr, u32>,
    dnat: HashMap<MapData, DnatKey, DnatValue>,
    service_slots: Array<MapData, u32>,
    service_records: Array<MapData, ServiceRecord>,
    service_stats: PerCpuArray<MapData, ServiceCounters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    reason_stats: PerCpuArray<MapData, Counters>,
    cpus: usize,
    /// Slots of `LB_MAGLEV` as created (a pinned map keeps its size).
    maglev_slots: u32,
    /// `LB_MAGLEV` was created with `BPF_F_MMAPABLE`: tables are written as memory.
    maglev_mmapable: bool,
    /// Write runs of entries with batch updates (until the kernel says it cannot).
    batch_updates: bool,
}

/// Counters summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub services: BTreeMap<u32, ServiceCounters>,
    pub backends: BTreeMap<u32, Counters>,
    pub reasons: Vec<(Reason, Counters)>,
}

fn sum(values: &PerCpuValues<Counters>) -> Counters {
    values.iter().fold(Counters::default(), |acc, c| Counters {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
    })
}

fn sum_service(values: &PerCpuValues<ServiceCounters>) -> ServiceCounters {
    values
        .iter()
        .fold(ServiceCounters::default(), |acc, c| ServiceCounters {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
            new_flows: acc.new_flows + c.new_flows,
        })
}

impl Dataplane {
    /// Take the maps out of a loaded object. A config without the flow tables' secret (a
    /// new node's) gets one drawn now ([`crate::flowtab::ensure_secret`]); configs written
    /// later keep it.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        let mut dataplane = Self::from_maps(|name| {
            ebpf.take_map(name)
                .ok_or(DataplaneError::Missing { map: name })
        })?;
        crate::flowtab::ensure_secret(&mut dataplane.config)?;
        Ok(dataplane)
    }

    /// Open the maps a running (or kept-attached) agent pinned under `dir`.
    pub fn open_pinned(dir: &Path) -> Result<Self, DataplaneError> {
        Self::from_maps(|name| {
            let path = dir.join(name);
            MapData::from_pin(&path)
                .and_then(Map::from_map_data)
                .map_err(|source| DataplaneError::Pin {
                    map: name,
                    path: path.display().to_string(),
                    source,
                })
        })
    }

    /// Build the handles from `get(name)`, one call per map, each map typed as `lb_common`
    /// says (aya checks key and value sizes).
    fn from_maps(
        mut get: impl FnMut(&'static str) -> Result<Map, DataplaneError>,
    ) -> Result<Self, DataplaneError> {
        let maglev: Array<MapData, u32> =
            Array::try_from(get(maps::MAGLEV)?).map_err(map_err(maps::MAGLEV))?;
        // The map as the kernel has it: a pinned map may predate this object's definition.
        let info = maglev.map().info().map_err(map_err(maps::MAGLEV))?;
        Ok(Dataplane {
            maglev_slots: info.max_entries().min(maglev.len()),
            maglev_mmapable: info.map_flags() as usize & maps::MMAPABLE_FLAG != 0,
            services: HashMap::try_from(get(maps::SERVICES)?).map_err(map_err(maps::SERVICES))?,
            backends: Array::try_from(get(maps::BACKENDS)?).map_err(map_err(maps::BACKENDS))?,
            maglev,
            config: Array::try_from(get(maps::CONFIG)?).map_err(map_err(maps::CONFIG))?,
            vips: HashMap::try_from(get(maps::VIPS)?).map_err(map_err(maps::VIPS))?,
            source_ranges: LpmTrie::try_from(get(maps::SRC_RANGES)?)
                .map_err(map_err(maps::SRC_RANGES))?,
            decap_sources: LpmTrie::try_from(get(maps::DECAP_SRC)?)
                .map_err(map_err(maps::DECAP_SRC))?,
            decap_destinations: LpmTrie::try_from(get(maps::DECAP_DST)?)
                .map_err(map_err(maps::DECAP_DST))?,
            dnat: HashMap::try_from(get(maps::DNAT)?).map_err(map_err(maps::DNAT))?,
            service_slots: Array::try_from(get(maps::SVC_SLOTS)?)
                .map_err(map_err(maps::SVC_SLOTS))?,
            service_records: Array::try_from(get(maps::SVC_RECORDS)?)
                .map_err(map_err(maps::SVC_RECORDS))?,
            service_stats: PerCpuArray::try_from(get(maps::SERVICE_STATS)?)
                .map_err(map_err(maps::SERVICE_STATS))?,
            backend_stats: PerCpuArray::try_from(get(maps::BACKEND_STATS)?)
                .map_err(map_err(maps::BACKEND_STATS))?,
            reason_stats: PerCpuArray::try_from(get(maps::REASON_STATS)?)
                .map_err(map_err(maps::REASON_STATS))?,
            cpus: nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e.to_string()))?,
            batch_updates: true,
        })
    }

    pub fn maglev_capacity(&self) -> u32 {
        self.maglev_slots
    }

    /// Read what the maps hold.
    pub fn snapshot(&self) -> Result<MapSnapshot, DataplaneError> {
        let config = self.config.get(&0, 0).map_err(map_err(maps::CONFIG))?;
        let mut services = BTreeMap::new();
        for entry in self.services.iter() {
            let (k, v) = entry.map_err(map_err(maps::SERVICES))?;
            services.insert(k, v);
        }
        let mut backends = BTreeMap::new();
        for (id, entry) in self.backends.iter().enumerate() {
            let v = entry.map_err(map_err(maps::BACKENDS))?;
            if v.is_valid() {
                backends.insert(id as u32, v);
            }
        }
        let mut vips = BTreeMap::new();
        for entry in self.vips.iter() {
            let (k, v) = entry.map_err(map_err(maps::VIPS))?;
            vips.insert(k, v);
        }
        let mut source_ranges = std::collections::BTreeSet::new();
        for key in self.source_ranges.keys() {
            let key = key.map_err(map_err(maps::SRC_RANGES))?;
            source_ranges.insert((key.prefix_len(), key.data()));
        }
        let decap = |trie: &LpmTrie<MapData, DecapAddr, u32>, name| {
            trie.keys()
                .map(|key| {
                    key.map(|k| (k.prefix_len(), k.data()))
                        .map_err(map_err(name))
                })
                .collect::<Result<std::collections::BTreeSet<_>, _>>()
        };
        let decap_sources = decap(&self.decap_sources, maps::DECAP_SRC)?;
        let decap_destinations = decap(&self.decap_destinations, maps::DECAP_DST)?;
        let mut dnat = BTreeMap::new();
        for entry in self.dnat.iter() {
            let (k, v) = entry.map_err(map_err(maps::DNAT))?;
            dnat.insert(k, v);
        }
        let mut service_slots = BTreeMap::new();
        let mut service_records = BTreeMap::new();
        for (slot, entry) in self.service_slots.iter().enumerate() {
            let value = entry.map_err(map_err(maps::SVC_SLOTS))?;
            if value == SLOT_EMPTY {
                continue;
            }
            service_slots.insert(slot as u32, value);
            if value != SLOT_SHARED {
                let index = value - 1;
                // A slot pointing past the records (a damaged map) is rewritten by the plan.
                if let Ok(record) = self.service_records.get(&index, 0) {
                    service_records.insert(index, record);
                }
            }
        }
        Ok(MapSnapshot {
            vips,
            source_ranges,
            dnat,
            service_slots,
            service_records,
            config: (config.flags & lb_common::CONFIG_F_VALID != 0).then_some(config),
            flow_secret: config.flow_secret,
            services,
            backends,
            maglev_capacity: self.maglev_capacity(),
            decap_sources,
            decap_destinations,
        })
    }

    fn zero<T: aya::Pod + Default>(&self) -> PerCpuValues<T> {
        // `try_from` only fails for a wrong length; the length is the CPU count.
        PerCpuValues::try_from(vec![T::default(); self.cpus])
            .unwrap_or_else(|_| unreachable!("vector has one entry per CPU"))
    }

    /// Apply operations in order. On error the maps hold a prefix of `ops`: every prefix is
    /// consistent, because of the order `sync::plan` produces.
    ///
    /// Runs of backend, table and service writes (a full sync is mostly that) go in bulk:
    /// one batch update per map and run, tables through a memory mapping of `LB_MAGLEV`. A
    /// batch writes its entries in order, so the prefix property holds.
    pub fn apply(&mut self, ops: &[MapOp]) -> Result<(), DataplaneError> {
        use std::mem::discriminant;
        for run in ops.chunk_by(|a, b| discriminant(a) == discriminant(b)) {
            match &run[0] {
                MapOp::SetBackend { .. } if run.len() > 1 => self.set_backends(run)?,
                MapOp::SetService { .. } if run.len() > 1 => self.set_services(run)?,
                MapOp::SetServiceRecord { .. } if run.len() > 1 => self.set_plain(
                    maps::SVC_RECORDS,
                    |d| d.service_records.map(),
                    run,
                    |op| match op {
                        MapOp::SetServiceRecord { index, record } => Some((*index, *record)),
                        _ => None,
                    },
                )?,
                MapOp::SetServiceSlot { .. } if run.len() > 1 => self.set_plain(
                    maps::SVC_SLOTS,
                    |d| d.service_slots.map(),
                    run,
                    |op| match op {
                        MapOp::SetServiceSlot { slot, value } => Some((*slot, *value)),
                        _ => None,
                    },
                )?,
                MapOp::WriteTable { .. } => self.write_tables(run)?,
                _ => run.iter().try_for_each(|op| self.apply_one(op))?,
            }
        }
        Ok(())
    }

    fn apply_one(&mut self, op: &MapOp) -> Result<(), DataplaneError> {
        match op {
            MapOp::SetConfig(c) => {
                // The node's flow-table secret stays what the map holds unless `c` has one.
                let mut c = *c;
                if c.flow_secret == [0; 4] {
                    let held = self.config.get(&0, 0).map_err(map_err(maps::CONFIG))?;
                    c.flow_secret = held.flow_secret;
                }
                self.config.set(0, c, 0).map_err(map_err(maps::CONFIG))
            }
            MapOp::SetVip { key, value } => {
                self.vips.insert(key, value, 0).map_err(map_err(maps::VIPS))
            }
            MapOp::DeleteVip { key } => self.vips.remove(key).map_err(map_err(maps::VIPS)),
            MapOp::AddSourceRange { prefix_len, range } => self
                .source_ranges
                .insert(&Key::new(*prefix_len, *range), 1, 0)
                .map_err(map_err(maps::SRC_RANGES)),
            MapOp::RemoveSourceRange { prefix_len, range } => self
                .source_ranges
                .remove(&Key::new(*prefix_len, *range))
                .map_err(map_err(maps::SRC_RANGES)),
            MapOp::SetBackend { id, value, fresh } => {
                if *fresh {
                    let zero = self.zero();
                    self.backend_stats
                        .set(*id, zero, 0)
                        .map_err(map_err(maps::BACKEND_STATS))?;
                }
                self.backends
                    .set(*id, value, 0)
                    .map_err(map_err(maps::BACKENDS))
            }
            MapOp::WriteTable { .. } => self.write_tables(std::slice::from_ref(op)),
            MapOp::SetService {
                key, value, fresh, ..
            } => {
                if *fresh {
                    let zero = self.zero();
                    self.service_stats
                        .set(value.id, zero, 0)
                        .map_err(map_err(maps::SERVICE_STATS))?;
                }
                self.services
                    .insert(key, value, 0)
                    .map_err(map_err(maps::SERVICES))
            }
            MapOp::DeleteService { key } => {
                self.services.remove(key).map_err(map_err(maps::SERVICES))
            }
            MapOp::ClearBackend { id } => self
                .backends
                .set(*id, BackendValue::EMPTY, 0)
                .map_err(map_err(maps::BACKENDS)),
            MapOp::SetDnat { key, value } => {
                self.dnat.insert(key, value, 0).map_err(map_err(maps::DNAT))
            }
            MapOp::DeleteDnat { key } => self.dnat.remove(key).map_err(map_err(maps::DNAT)),
            MapOp::SetServiceRecord { index, record } => self
                .service_records
                .set(*index, record, 0)
                .map_err(map_err(maps::SVC_RECORDS)),
            MapOp::SetServiceSlot { slot, value } => self
                .service_slots
                .set(*slot, value, 0)
                .map_err(map_err(maps::SVC_SLOTS)),
            MapOp::AddDecap {
                list,
                prefix_len,
                addr,
            } => {
                let (trie, name) = self.decap_list(*list);
                trie.insert(&Key::new(*prefix_len, *addr), 1, 0)
                    .map_err(map_err(name))
            }
            MapOp::RemoveDecap {
                list,
                prefix_len,
                addr,
            } => {
                let (trie, name) = self.decap_list(*list);
                trie.remove(&Key::new(*prefix_len, *addr))
                    .map_err(map_err(name))
            }
        }
    }

    fn decap_list(
        &mut self,
        list: DecapList,
    ) -> (&mut LpmTrie<MapData, DecapAddr, u32>, &'static str) {
        match list {
            DecapList::Sources => (&mut self.decap_sources, maps::DECAP_SRC),
            DecapList::Destinations => (&mut self.decap_destinations, maps::DECAP_DST),
        }
    }

    /// One batch update of `keys` → `values` into `map`; `Ok(false)` when the kernel has no
    /// batch update (nothing written; batches are not tried again).
    fn batch_update<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
        map: impl FnOnce(&Self) -> &MapData,
        keys: &[K],
        values: &[V],
    ) -> Result<bool, DataplaneError> {
        if !self.batch_updates {
            return Ok(false);
        }
        match batch::update(map(self), keys, values) {
            Ok(()) => Ok(true),
            Err(e) if batch::unsupported(&e) => {
                tracing::debug!(map = name, error = %e, "no batch map updates; writing entry by entry");
                self.batch_updates = false;
                Ok(false)
            }
            Err(source) => Err(DataplaneError::Batch {
                map: name,
                entries: keys.len(),
                source,
            }),
        }
    }

    /// A run of `SetBackend`: counters of fresh ids zeroed, then every entry written.
    fn set_backends(&mut self, run: &[MapOp]) -> Result<(), DataplaneError> {
        let (mut ids, mut values, mut fresh) = (Vec::new(), Vec::new(), Vec::new());
        for op in run {
            if let MapOp::SetBackend {
                id,
                value,
                fresh: f,
            } = op
            {
                ids.push(*id);
                values.push(*value);
                if *f {
                    fresh.push(*id);
                }
            }
        }
        let zeros = vec![Counters::default(); fresh.len() * self.cpus];
        let done = self.batch_update(
            maps::BACKEND_STATS,
            |d| d.backend_stats.map(),
            &fresh,
            &zeros,
        )? && self.batch_update(maps::BACKENDS, |d| d.backends.map(), &ids, &values)?;
        if !done {
            run.iter().try_for_each(|op| self.apply_one(op))?;
        }
        Ok(())
    }

    /// A run of `SetService`: counters of fresh ids zeroed, then every entry written.
    fn set_services(&mut self, run: &[MapOp]) -> Result<(), DataplaneError> {
        let (mut keys, mut values, mut fresh) = (Vec::new(), Vec::new(), Vec::new());
        for op in run {
            if let MapOp::SetService {
                key,
                value,
                fresh: f,
                ..
            } = op
            {
                keys.push(*key);
                values.push(*value);
                if *f {
                    fresh.push(value.id);
                }
            }
        }
        let zeros = vec![ServiceCounters::default(); fresh.len() * self.cpus];
        let done = self.batch_update(
            maps::SERVICE_STATS,
            |d| d.service_stats.map(),
            &fresh,
            &zeros,
        )? && self.batch_update(maps::SERVICES, |d| d.services.map(), &keys, &values)?;
        if !done {
            run.iter().try_for_each(|op| self.apply_one(op))?;
        }
        Ok(())
    }

    /// A run of `SetServiceRecord` or `SetServiceSlot` (no counters to reset): one batch
    /// update, applied in order, into `map`, else op by op.
    fn set_plain<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &'static str,
        map: impl FnOnce(&Self) -> &MapData,
        run: &[MapOp],
        entry: impl Fn(&MapOp) -> Option<(K, V)>,
    ) -> Result<(), DataplaneError> {
        let (keys, values): (Vec<K>, Vec<V>) = run.iter().filter_map(entry).unzip();
        if !self.batch_update(name, map, &keys, &values)? {
            run.iter().try_for_each(|op| self.apply_one(op))?;
        }
        Ok(())
    }

    /// A run of `WriteTable`: through a memory mapping of `LB_MAGLEV` when it is mmapable
    /// (maps pinned by an older agent are not), else one batch update per table, else slot
    /// by slot.
    fn write_tables(&mut self, run: &[MapOp]) -> Result<(), DataplaneError> {
        let tables = run.iter().filter_map(|op| match op {
            MapOp::WriteTable { offset, entries } => Some((*offset, entries.as_slice())),
            _ => None,
        });
        let capacity = self.maglev_capacity();
        for (offset, entries) in tables.clone() {
            let end = u64::from(offset) + entries.len() as u64;
            if end > u64::from(capacity) {
                return Err(DataplaneError::Map {
                    map: maps::MAGLEV,
                    source: MapError::OutOfBounds {
                        index: u32::try_from(end - 1).unwrap_or(u32::MAX),
                        max_entries: capacity,
                    },
                });
            }
        }
        if self.maglev_mmapable {
            let mut writer =
                ArrayWriter::<u32>::new(self.maglev.map(), capacity).map_err(|source| {
                    DataplaneError::Mmap {
                        map: maps::MAGLEV,
                        offset: 0,
                        entries: 0,
                        source,
                    }
                })?;
            for (offset, entries) in tables {
                writer
                    .write(offset, entries)
                    .map_err(|source| DataplaneError::Mmap {
                        map: maps::MAGLEV,
                        offset,
                        entries: entries.len(),
                        source,
                    })?;
            }
            return Ok(());
        }
        let mut slots = Vec::new();
        for (offset, entries) in tables {
            // In bounds (checked above), so the end fits in u32.
            let range = offset..offset + entries.len() as u32;
            slots.clear();
            slots.extend(range.clone());
            if !self.batch_update(maps::MAGLEV, |d| d.maglev.map(), &slots, entries)? {
                for (slot, backend) in range.zip(entries) {
                    self.maglev
                        .set(slot, backend, 0)
                        .map_err(map_err(maps::MAGLEV))?;
                }
            }
        }
        Ok(())
    }

    /// Read one Maglev table (for `status --table` and tests).
    pub fn table(&self, value: &ServiceValue) -> Result<Vec<u32>, DataplaneError> {
        (value.table_offset..value.table_offset + value.table_size)
            .map(|slot| self.maglev.get(&slot, 0).map_err(map_err(maps::MAGLEV)))
            .collect()
    }

    /// Counters of the given services and backends, and of every reason.
    pub fn stats(
        &self,
        service_ids: impl IntoIterator<Item = u32>,
        backend_ids: impl IntoIterator<Item = u32>,
    ) -> Result<Stats, DataplaneError> {
        let mut out = Stats::default();
        for id in service_ids {
            let v = self
                .service_stats
                .get(&id, 0)
                .map_err(map_err(maps::SERVICE_STATS))?;
            out.services.insert(id, sum_service(&v));
        }
        for id in backend_ids {
            let v = self
                .backend_stats
                .get(&id, 0)
                .map_err(map_err(maps::BACKEND_STATS))?;
            out.backends.insert(id, sum(&v));
        }
        for reason in Reason::ALL {
            let v = self
                .reason_stats
                .get(&(reason as u32), 0)
                .map_err(map_err(maps::REASON_STATS))?;
            out.reasons.push((reason, sum(&v)));
        }
        Ok(out)
    }
}

/// `LB_L2_LEASE`: the `bpf_jiffies64()` until which `lb_xdp` answers ARP requests and
/// Neighbor Solicitations for the VIPs this node owns (0: it answers for none). A handle of
/// its own, apart from [`Dataplane`]: the L2 announcement renews the lease from a task of its
/// own, at its own pace, and no plan ever writes it.
pub struct AnswerLease {
    map: Array<MapData, u64>,
    /// Created with `BPF_F_MMAPABLE` (always, by this build): written with one 8-byte store.
    mmapable: bool,
}

impl AnswerLease {
    /// Take the map out of a loaded object.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        let name = maps::L2_LEASE;
        let map = ebpf
            .take_map(name)
            .ok_or(DataplaneError::Missing { map: name })?;
        let map: Array<MapData, u64> = Array::try_from(map).map_err(map_err(name))?;
        let info = map.map().info().map_err(map_err(name))?;
        Ok(AnswerLease {
            mmapable: info.map_flags() as usize & maps::MMAPABLE_FLAG != 0,
            map,
        })
    }

    /// The deadline as the data plane sees it.
    pub fn until(&self) -> Result<u64, DataplaneError> {
        self.map.get(&0, 0).map_err(map_err(maps::L2_LEASE))
    }

    /// Answer until `until` (`bpf_jiffies64()`); 0 stops answering at once. Through the
    /// map's memory when it is mmapable: an update by `bpf(2)` copies the value with the
    /// kernel's `memcpy`, which does not promise to store 8 bytes at once, and a responder
    /// reading a deadline half old, half new could answer far too long.
    pub fn set(&mut self, until: u64) -> Result<(), DataplaneError> {
        let name = maps::L2_LEASE;
        if !self.mmapable {
            return self.map.set(0, until, 0).map_err(map_err(name));
        }
        let mmap_err = |source| DataplaneError::Mmap {
            map: name,
            offset: 0,
            entries: 1,
            source,
        };
        ArrayWriter::<u64>::new(self.map.map(), 1)
            .and_then(|mut w| w.write(0, &[until]))
            .map_err(mmap_err)
    }
}
