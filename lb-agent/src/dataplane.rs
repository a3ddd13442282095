//! The only module that holds BPF map handles: reads the maps into a `MapSnapshot`, applies
//! `MapOp`s, and reads counters.

use std::{collections::BTreeMap, path::Path};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues,
        lpm_trie::{Key, LpmTrie},
    },
    util::nr_cpus,
};
use lb_common::{
    BackendValue, Counters, DnatKey, DnatValue, NodeConfig, Reason, ServiceCounters, ServiceKey,
    ServiceValue, SourceRange, VipKey, VipValue, maps,
};

use crate::sync::{MapOp, MapSnapshot};

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
    dnat: HashMap<MapData, DnatKey, DnatValue>,
    vip_bits: Array<MapData, u64>,
    service_stats: PerCpuArray<MapData, ServiceCounters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    reason_stats: PerCpuArray<MapData, Counters>,
    cpus: usize,
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
    /// Take the maps out of a loaded object.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Self::from_maps(|name| {
            ebpf.take_map(name)
                .ok_or(DataplaneError::Missing { map: name })
        })
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
        Ok(Dataplane {
            services: HashMap::try_from(get(maps::SERVICES)?).map_err(map_err(maps::SERVICES))?,
            backends: Array::try_from(get(maps::BACKENDS)?).map_err(map_err(maps::BACKENDS))?,
            maglev: Array::try_from(get(maps::MAGLEV)?).map_err(map_err(maps::MAGLEV))?,
            config: Array::try_from(get(maps::CONFIG)?).map_err(map_err(maps::CONFIG))?,
            vips: HashMap::try_from(get(maps::VIPS)?).map_err(map_err(maps::VIPS))?,
            source_ranges: LpmTrie::try_from(get(maps::SRC_RANGES)?)
                .map_err(map_err(maps::SRC_RANGES))?,
            dnat: HashMap::try_from(get(maps::DNAT)?).map_err(map_err(maps::DNAT))?,
            vip_bits: Array::try_from(get(maps::VIP_BITS)?).map_err(map_err(maps::VIP_BITS))?,
            service_stats: PerCpuArray::try_from(get(maps::SERVICE_STATS)?)
                .map_err(map_err(maps::SERVICE_STATS))?,
            backend_stats: PerCpuArray::try_from(get(maps::BACKEND_STATS)?)
                .map_err(map_err(maps::BACKEND_STATS))?,
            reason_stats: PerCpuArray::try_from(get(maps::REASON_STATS)?)
                .map_err(map_err(maps::REASON_STATS))?,
            cpus: nr_cpus().map_err(|(_, e)| DataplaneError::Cpus(e.to_string()))?,
        })
    }

    pub fn maglev_capacity(&self) -> u32 {
        self.maglev.len()
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
        let mut dnat = BTreeMap::new();
        for entry in self.dnat.iter() {
            let (k, v) = entry.map_err(map_err(maps::DNAT))?;
            dnat.insert(k, v);
        }
        let mut vip_bits = BTreeMap::new();
        for (word, entry) in self.vip_bits.iter().enumerate() {
            let bits = entry.map_err(map_err(maps::VIP_BITS))?;
            if bits != 0 {
                vip_bits.insert(word as u32, bits);
            }
        }
        Ok(MapSnapshot {
            vips,
            source_ranges,
            dnat,
            vip_bits,
            config: (config.flags & lb_common::CONFIG_F_VALID != 0).then_some(config),
            services,
            backends,
            maglev_capacity: self.maglev_capacity(),
        })
    }

    fn zero<T: aya::Pod + Default>(&self) -> PerCpuValues<T> {
        // `try_from` only fails for a wrong length; the length is the CPU count.
        PerCpuValues::try_from(vec![T::default(); self.cpus])
            .unwrap_or_else(|_| unreachable!("vector has one entry per CPU"))
    }

    /// Apply operations in order. On error the maps hold a prefix of `ops`: every prefix is
    /// consistent, because of the order `sync::plan` produces.
    pub fn apply(&mut self, ops: &[MapOp]) -> Result<(), DataplaneError> {
        for op in ops {
            match op {
                MapOp::SetConfig(c) => self.config.set(0, c, 0).map_err(map_err(maps::CONFIG))?,
                MapOp::SetVip { key, value } => self
                    .vips
                    .insert(key, value, 0)
                    .map_err(map_err(maps::VIPS))?,
                MapOp::DeleteVip { key } => self.vips.remove(key).map_err(map_err(maps::VIPS))?,
                MapOp::AddSourceRange { prefix_len, range } => self
                    .source_ranges
                    .insert(&Key::new(*prefix_len, *range), 1, 0)
                    .map_err(map_err(maps::SRC_RANGES))?,
                MapOp::RemoveSourceRange { prefix_len, range } => self
                    .source_ranges
                    .remove(&Key::new(*prefix_len, *range))
                    .map_err(map_err(maps::SRC_RANGES))?,
                MapOp::SetBackend { id, value, fresh } => {
                    if *fresh {
                        let zero = self.zero();
                        self.backend_stats
                            .set(*id, zero, 0)
                            .map_err(map_err(maps::BACKEND_STATS))?;
                    }
                    self.backends
                        .set(*id, value, 0)
                        .map_err(map_err(maps::BACKENDS))?;
                }
                MapOp::WriteTable { offset, entries } => {
                    for (i, backend) in entries.iter().enumerate() {
                        self.maglev
                            .set(offset + i as u32, backend, 0)
                            .map_err(map_err(maps::MAGLEV))?;
                    }
                }
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
                        .map_err(map_err(maps::SERVICES))?;
                }
                MapOp::DeleteService { key } => {
                    self.services.remove(key).map_err(map_err(maps::SERVICES))?
                }
                MapOp::ClearBackend { id } => self
                    .backends
                    .set(*id, BackendValue::EMPTY, 0)
                    .map_err(map_err(maps::BACKENDS))?,
                MapOp::SetDnat { key, value } => self
                    .dnat
                    .insert(key, value, 0)
                    .map_err(map_err(maps::DNAT))?,
                MapOp::DeleteDnat { key } => self.dnat.remove(key).map_err(map_err(maps::DNAT))?,
                MapOp::SetVipBits { word, bits } => self
                    .vip_bits
                    .set(*word, bits, 0)
                    .map_err(map_err(maps::VIP_BITS))?,
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
