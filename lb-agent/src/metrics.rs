//! Prometheus metrics and health endpoints of `run` (`--metrics-address`).
//!
//! Three sources, one registry:
//! - what the agent does, kept as it happens ([`AgentMetrics`]): syncs, their duration and
//!   map writes, backends without a usable next hop;
//! - what the agent knows at the moment ([`AgentState`]): the VIPs this node announces, IPAM
//!   leadership and pool usage, the Services' names;
//! - what the data plane counted, read from the pinned maps at each scrape
//!   ([`dataplane::DataplaneCollector`]): per service and backend, per reason, flow-table
//!   occupancy.
//!
//! Every name is listed in the README ("Metrics"). `/healthz` answers whether the main loop
//! runs, `/readyz` whether the program is attached and the last sync succeeded.

mod dataplane;
mod server;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

pub use server::{ServeError, serve};

use crate::state::ServiceAddr;

/// Prefix of every metric name.
pub const PREFIX: &str = "xdplb";

/// Labels of a family: name and value pairs.
pub type Labels = Vec<(&'static str, String)>;

/// What the agent counts as it works; cheap handles, shared with the registry.
#[derive(Clone, Debug)]
pub struct AgentMetrics {
    /// Duration of each sync (next-hop resolution, plan and map writes).
    pub sync_duration: Histogram,
    /// Syncs by `result` (`ok`, `error`).
    pub syncs: Family<Labels, Counter>,
    /// Map operations applied (entries written or deleted).
    pub map_writes: Counter,
    /// Syncs whose map writes failed.
    pub map_write_errors: Counter,
    /// Backends by next-hop `state` (`unresolved`: no MAC yet; `unreachable`: FAILED).
    pub next_hops: Family<Labels, Gauge>,
}

impl AgentMetrics {
    fn new() -> Self {
        AgentMetrics {
            sync_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            syncs: Family::default(),
            map_writes: Counter::default(),
            map_write_errors: Counter::default(),
            next_hops: Family::default(),
        }
    }

    /// Record one sync: how long it took, and its map writes or its error.
    pub fn sync_done(&self, took: Duration, result: Result<usize, SyncFailure>) {
        self.sync_duration.observe(took.as_secs_f64());
        let outcome = match result {
            Ok(writes) => {
                self.map_writes.inc_by(writes as u64);
                "ok"
            }
            Err(SyncFailure::MapWrite) => {
                self.map_write_errors.inc();
                "error"
            }
            Err(SyncFailure::Other) => "error",
        };
        self.syncs
            .get_or_create(&vec![("result", outcome.to_string())])
            .inc();
    }

    /// The number of backends whose next hop is unresolved and unreachable now.
    pub fn set_next_hops(&self, unresolved: usize, unreachable: usize) {
        for (state, n) in [("unresolved", unresolved), ("unreachable", unreachable)] {
            self.next_hops
                .get_or_create(&vec![("state", state.to_string())])
                .set(n as i64);
        }
    }
}

/// Why a sync failed, as far as the metrics tell it apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncFailure {
    /// Writing the maps failed.
    MapWrite,
    /// Anything before the writes (interface, plan).
    Other,
}

/// Addresses of one IPAM pool.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolUsage {
    pub name: String,
    /// Addresses in its ranges.
    pub size: u128,
    /// Addresses given to Services.
    pub used: u64,
}

/// What the agent knows now, read at each scrape.
#[derive(Clone, Debug, Default)]
pub struct AgentState {
    /// `none`, `l2` or `bgp`.
    pub announce_mode: &'static str,
    /// The VIPs this node announces (L2: answers ARP/NDP for; BGP: routes BIRD accepted).
    pub announced: BTreeSet<IpAddr>,
    /// `Some` in Kubernetes mode with IPAM: whether this agent leads.
    pub ipam_leader: Option<bool>,
    /// Pool usage, as the IPAM leader last computed it (empty on other agents).
    pub pools: Vec<PoolUsage>,
    /// Names of the services the maps hold (`namespace/name:port` or the config's name).
    pub names: BTreeMap<ServiceAddr, String>,
}

/// Health as `/healthz` and `/readyz` report it.
#[derive(Debug)]
struct Health {
    /// The main loop's last turn.
    beat: Instant,
    /// Longest time between turns that is still healthy.
    beat_limit: Duration,
    attached: bool,
    /// Why the last sync failed, if it did.
    last_error: Option<String>,
}

/// The registry and the state behind it; clone freely.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    agent: AgentMetrics,
    state: Arc<Mutex<AgentState>>,
    health: Mutex<Health>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind: keep using it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// The registry of an agent whose maps are pinned under `pin_dir`; `beat_limit` is the
    /// longest quiet time of a healthy main loop (it turns at least every resync interval).
    pub fn new(pin_dir: &Path, beat_limit: Duration) -> Metrics {
        let agent = AgentMetrics::new();
        let state = Arc::new(Mutex::new(AgentState {
            announce_mode: "none",
            ..AgentState::default()
        }));
        let mut registry = Registry::with_prefix(PREFIX);
        registry.register_with_unit(
            "sync_duration",
            "Time one sync of the maps to the desired state took: next-hop resolution, plan, map writes",
            Unit::Seconds,
            agent.sync_duration.clone(),
        );
        registry.register(
            "syncs",
            "Syncs of the maps to the desired state, by result",
            agent.syncs.clone(),
        );
        registry.register(
            "map_writes",
            "Map entries written or deleted by syncs",
            agent.map_writes.clone(),
        );
        registry.register(
            "map_write_errors",
            "Syncs whose map writes failed (the next sync re-reads the maps and retries)",
            agent.map_write_errors.clone(),
        );
        registry.register(
            "backends_next_hop",
            "Backends by next-hop state: unresolved (no MAC yet, their packets are dropped) or unreachable (neighbour FAILED, their slots fall back to others)",
            agent.next_hops.clone(),
        );
        registry.register_collector(Box::new(StateCollector(state.clone())));
        registry.register_collector(Box::new(dataplane::DataplaneCollector::new(
            pin_dir,
            state.clone(),
        )));
        Metrics {
            inner: Arc::new(Inner {
                registry,
                agent,
                state,
                health: Mutex::new(Health {
                    beat: Instant::now(),
                    beat_limit,
                    attached: false,
                    last_error: None,
                }),
            }),
        }
    }

    pub fn agent(&self) -> &AgentMetrics {
        &self.inner.agent
    }

    /// Change what the agent knows.
    pub fn update_state(&self, f: impl FnOnce(&mut AgentState)) {
        f(&mut lock(&self.inner.state));
    }

    /// The main loop turned.
    pub fn beat(&self) {
        lock(&self.inner.health).beat = Instant::now();
    }

    /// The program is attached (or no longer).
    pub fn set_attached(&self, attached: bool) {
        lock(&self.inner.health).attached = attached;
    }

    /// The outcome of the last sync.
    pub fn set_sync_error(&self, error: Option<String>) {
        lock(&self.inner.health).last_error = error;
    }

    /// The text exposition (OpenMetrics). Reads the maps: call it off the async runtime.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry) {
            tracing::warn!(error = %e, "encoding the metrics failed");
            out.clear();
            let _ = writeln!(out, "# EOF");
        }
        out
    }

    /// `Ok` with a short text when healthy, `Err` with the reason otherwise.
    pub fn healthz(&self) -> Result<String, String> {
        let h = lock(&self.inner.health);
        let quiet = h.beat.elapsed();
        if quiet > h.beat_limit {
            return Err(format!(
                "the main loop has not turned for {:.1} s (limit {:.1} s)",
                quiet.as_secs_f64(),
                h.beat_limit.as_secs_f64()
            ));
        }
        Ok("ok\n".into())
    }

    /// Ready: attached, and the last sync succeeded.
    pub fn readyz(&self) -> Result<String, String> {
        self.healthz()?;
        let h = lock(&self.inner.health);
        if !h.attached {
            return Err("the load balancer is not attached yet".into());
        }
        if let Some(e) = &h.last_error {
            return Err(format!("the last sync failed: {e}"));
        }
        Ok("ready\n".into())
    }
}

/// Encodes [`AgentState`].
#[derive(Debug)]
struct StateCollector(Arc<Mutex<AgentState>>);

fn gauge_family(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(
        name,
        help,
        None,
        prometheus_client::metrics::MetricType::Gauge,
    )?;
    for (labels, value) in series {
        ConstGauge::new(value).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = lock(&self.0).clone();
        gauge_family(
            &mut encoder,
            "announce_mode",
            "How this node announces VIPs: 1 for the mode in use (none, l2, bgp)",
            [(vec![("mode", s.announce_mode.to_string())], 1)],
        )?;
        gauge_family(
            &mut encoder,
            "vip_announced",
            "1 for each VIP this node announces now (l2: answers ARP/NDP for it; bgp: its route is configured in BIRD)",
            s.announced.iter().map(|vip| {
                (
                    vec![
                        ("vip", vip.to_string()),
                        ("mode", s.announce_mode.to_string()),
                    ],
                    1,
                )
            }),
        )?;
        if let Some(leader) = s.ipam_leader {
            gauge_family(
                &mut encoder,
                "ipam_leader",
                "1 when this agent is the IPAM leader (the one that allocates and writes Service status)",
                [(Vec::new(), i64::from(leader))],
            )?;
        }
        gauge_family(
            &mut encoder,
            "ipam_pool_addresses",
            "Addresses of each IPAddressPool by state (used: given to Services; free: the rest of its ranges), on the IPAM leader",
            s.pools.iter().flat_map(|p| {
                let size = i64::try_from(p.size).unwrap_or(i64::MAX);
                let used = i64::try_from(p.used).unwrap_or(i64::MAX);
                [
                    (
                        vec![("pool", p.name.clone()), ("state", "used".to_string())],
                        used,
                    ),
                    (
                        vec![("pool", p.name.clone()), ("state", "free".to_string())],
                        size.saturating_sub(used).max(0),
                    ),
                ]
            }),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Metrics {
        // A pin directory that does not exist: the data plane is reported down.
        Metrics::new(
            Path::new("/nonexistent/lb-metrics-test"),
            Duration::from_secs(30),
        )
    }

    #[test]
    fn agent_metrics_and_state_are_exposed_by_their_documented_names() {
        let m = metrics();
        m.agent().sync_done(Duration::from_millis(3), Ok(7));
        m.agent()
            .sync_done(Duration::from_millis(1), Err(SyncFailure::MapWrite));
        m.agent().set_next_hops(2, 1);
        m.update_state(|s| {
            s.announce_mode = "l2";
            s.announced.insert("198.18.0.100".parse().unwrap());
            s.ipam_leader = Some(true);
            s.pools.push(PoolUsage {
                name: "default".into(),
                size: 16,
                used: 3,
            });
        });
        let text = m.encode();
        for line in [
            "xdplb_syncs_total{result=\"ok\"} 1",
            "xdplb_syncs_total{result=\"error\"} 1",
            "xdplb_map_writes_total 7",
            "xdplb_map_write_errors_total 1",
            "xdplb_sync_duration_seconds_count 2",
            "xdplb_backends_next_hop{state=\"unresolved\"} 2",
            "xdplb_backends_next_hop{state=\"unreachable\"} 1",
            "xdplb_announce_mode{mode=\"l2\"} 1",
            "xdplb_vip_announced{vip=\"198.18.0.100\",mode=\"l2\"} 1",
            "xdplb_ipam_leader 1",
            "xdplb_ipam_pool_addresses{pool=\"default\",state=\"used\"} 3",
            "xdplb_ipam_pool_addresses{pool=\"default\",state=\"free\"} 13",
            "xdplb_dataplane_up 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn ready_only_once_attached_and_synced() {
        let m = metrics();
        assert!(m.healthz().is_ok());
        assert!(m.readyz().unwrap_err().contains("not attached"));
        m.set_attached(true);
        assert!(m.readyz().is_ok());
        m.set_sync_error(Some("map LB_SERVICES: no space".into()));
        assert!(m.readyz().unwrap_err().contains("no space"));
        m.set_sync_error(None);
        assert!(m.readyz().is_ok());
    }

    #[test]
    fn a_main_loop_that_stopped_turning_is_unhealthy() {
        let m = Metrics::new(Path::new("/nonexistent"), Duration::from_millis(1));
        lock(&m.inner.health).beat = Instant::now() - Duration::from_secs(1);
        assert!(m.healthz().unwrap_err().contains("has not turned"));
        assert!(m.readyz().is_err());
        m.beat();
        lock(&m.inner.health).beat_limit = Duration::from_secs(30);
        assert!(m.healthz().is_ok());
    }
}
