//! What the data plane counted, read from the pinned maps at each scrape: per service and
//! backend packets, bytes and new flows, every reason counter, and how full the flow tables
//! are. The maps are opened by their pins (as `lb-agent status` does), so the collector
//! needs nothing from the syncing side but the Services' names.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::maps::MapData;
use lb_common::{FlowBucket4, FlowBucket6, flowtab::WAYS, maps};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter},
};

use super::{AgentState, Labels, lock};
use crate::{
    dataplane::{Dataplane, batch},
    sync::{self, ip_from_bytes},
};

/// Buckets read per `bpf(2)` call when counting flow-table entries.
const FLOW_CHUNK: usize = 4096;

/// The maps, once their pins exist.
struct Open {
    dataplane: Dataplane,
    flows4: MapData,
    flows6: MapData,
}

pub struct DataplaneCollector {
    pin_dir: PathBuf,
    open: Mutex<Option<Open>>,
    state: Arc<Mutex<AgentState>>,
}

impl std::fmt::Debug for DataplaneCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataplaneCollector")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl DataplaneCollector {
    pub fn new(pin_dir: &Path, state: Arc<Mutex<AgentState>>) -> Self {
        DataplaneCollector {
            pin_dir: pin_dir.to_path_buf(),
            open: Mutex::new(None),
            state,
        }
    }

    fn open(&self) -> Result<Open, String> {
        let pin = |name: &str| {
            let path = self.pin_dir.join(name);
            MapData::from_pin(&path).map_err(|e| format!("{}: {e}", path.display()))
        };
        Ok(Open {
            dataplane: Dataplane::open_pinned(&self.pin_dir).map_err(|e| e.to_string())?,
            flows4: pin(maps::FLOWTAB4)?,
            flows6: pin(maps::FLOWTAB6)?,
        })
    }

    /// Read everything a scrape reports; `None` (and a log line) when the maps cannot be read.
    fn read(&self) -> Option<Reading> {
        let mut open = lock(&self.open);
        if open.is_none() {
            match self.open() {
                Ok(o) => *open = Some(o),
                Err(e) => {
                    tracing::debug!(error = %e, "metrics: the pinned maps cannot be opened");
                    return None;
                }
            }
        }
        let o = open.as_ref()?;
        match read(o, &lock(&self.state).names) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(error = %e, "metrics: reading the maps failed");
                // Open them again next time (the agent may have replaced a pinned map).
                *open = None;
                None
            }
        }
    }
}

/// One scrape's worth of data-plane numbers.
struct Reading {
    services: Vec<(Labels, lb_common::ServiceCounters)>,
    backends: Vec<(Labels, lb_common::Counters)>,
    reasons: Vec<(&'static str, lb_common::Counters)>,
    /// (family, occupied entries, capacity).
    flows: [(&'static str, u64, u64); 2],
}

fn read(
    o: &Open,
    names: &std::collections::BTreeMap<crate::state::ServiceAddr, String>,
) -> Result<Reading, String> {
    let dp = &o.dataplane;
    let snap = dp.snapshot().map_err(|e| e.to_string())?;
    let stats = dp
        .stats(
            snap.services.values().map(|v| v.id),
            snap.backends.keys().copied(),
        )
        .map_err(|e| e.to_string())?;
    let mut services = Vec::new();
    let mut by_id = std::collections::BTreeMap::new();
    for (key, value) in &snap.services {
        let Some(addr) = sync::service_addr(key) else {
            continue;
        };
        let labels: Labels = vec![
            ("service", names.get(&addr).cloned().unwrap_or_default()),
            ("vip", addr.vip.to_string()),
            ("port", addr.port.to_string()),
            ("protocol", addr.protocol.name().to_string()),
        ];
        by_id.insert(value.id, labels.clone());
        let mut with_forwarding = labels;
        with_forwarding.push(("forwarding", sync::forwarding_name(value).to_string()));
        let c = stats.services.get(&value.id).copied().unwrap_or_default();
        services.push((with_forwarding, c));
    }
    let mut backends = Vec::new();
    for (id, b) in &snap.backends {
        let Some(service) = by_id.get(&b.service_id) else {
            continue;
        };
        let Some(ip) = ip_from_bytes(&b.addr_be, b.family) else {
            continue;
        };
        let mut labels = service.clone();
        labels.push(("backend", ip.to_string()));
        backends.push((labels, stats.backends.get(id).copied().unwrap_or_default()));
    }
    let reasons = stats.reasons.iter().map(|(r, c)| (r.name(), *c)).collect();
    Ok(Reading {
        services,
        backends,
        reasons,
        flows: [
            {
                let (used, cap) =
                    count_flows::<FlowBucket4>(&o.flows4, |b| b.ways.map(|w| w.state.tag))?;
                ("ipv4", used, cap)
            },
            {
                let (used, cap) =
                    count_flows::<FlowBucket6>(&o.flows6, |b| b.ways.map(|w| w.state.tag))?;
                ("ipv6", used, cap)
            },
        ],
    })
}

/// (entries in use, capacity) of one flow table: an entry is in use while its tag is set
/// (idle entries count until a new flow takes their way).
fn count_flows<B: aya::Pod + Default + Clone>(
    map: &MapData,
    tags: impl Fn(&B) -> [u32; WAYS],
) -> Result<(u64, u64), String> {
    let mut used = 0u64;
    let mut buckets = 0u64;
    batch::for_each_array_chunk::<B>(map, FLOW_CHUNK, |chunk| {
        buckets += chunk.len() as u64;
        used += chunk
            .iter()
            .map(|b| tags(b).iter().filter(|t| **t != 0).count() as u64)
            .sum::<u64>();
    })
    .map_err(|e| format!("reading a flow table: {e}"))?;
    Ok((used, buckets * WAYS as u64))
}

impl Collector for DataplaneCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let reading = self.read();
        gauge(
            &mut encoder,
            "dataplane_up",
            "1 when the data plane's pinned maps could be read for this scrape",
            [(Vec::new(), i64::from(reading.is_some()))],
        )?;
        let Some(r) = reading else {
            return Ok(());
        };
        counter(
            &mut encoder,
            "service_packets",
            "Packets the data plane balanced for each service",
            r.services.iter().map(|(l, c)| (l, c.packets)),
        )?;
        counter(
            &mut encoder,
            "service_bytes",
            "Bytes (whole frames as received) the data plane balanced for each service",
            r.services.iter().map(|(l, c)| (l, c.bytes)),
        )?;
        counter(
            &mut encoder,
            "service_new_flows",
            "Maglev decisions of each service: flow-table misses, TCP SYNs, and every packet of an untracked service",
            r.services.iter().map(|(l, c)| (l, c.new_flows)),
        )?;
        counter(
            &mut encoder,
            "backend_packets",
            "Packets each service sent to each backend",
            r.backends.iter().map(|(l, c)| (l, c.packets)),
        )?;
        counter(
            &mut encoder,
            "backend_bytes",
            "Bytes (as received, before encapsulation) each service sent to each backend",
            r.backends.iter().map(|(l, c)| (l, c.bytes)),
        )?;
        let reasons: Vec<(Labels, lb_common::Counters)> = r
            .reasons
            .iter()
            .map(|(name, c)| (vec![("reason", name.to_string())], *c))
            .collect();
        counter(
            &mut encoder,
            "packets",
            "Packets the XDP program handled, by the reason of its verdict (README: Counters)",
            reasons.iter().map(|(l, c)| (l, c.packets)),
        )?;
        counter(
            &mut encoder,
            "bytes",
            "Bytes the XDP program handled, by the reason of its verdict",
            reasons.iter().map(|(l, c)| (l, c.bytes)),
        )?;
        gauge(
            &mut encoder,
            "flow_table_entries",
            "Flow-table entries in use (remembered flows, idle ones included until replaced)",
            r.flows
                .iter()
                .map(|(f, used, _)| (vec![("family", f.to_string())], *used as i64)),
        )?;
        gauge(
            &mut encoder,
            "flow_table_capacity",
            "Flow-table entries there are room for",
            r.flows
                .iter()
                .map(|(f, _, cap)| (vec![("family", f.to_string())], *cap as i64)),
        )?;
        Ok(())
    }
}

fn counter<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (&'a Labels, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in series {
        ConstCounter::new(value).encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, i64)>,
) -> Result<(), std::fmt::Error> {
    super::gauge_family(encoder, name, help, series)
}
