//! The long-running commands: `run` (load balancer) and `decap` (backend side).
//!
//! `run` takes its desired state from a `Source` (a static file, or the Kubernetes API),
//! and one `Syncer` keeps the maps equal to it in both modes: initial sync before attach,
//! every change, and a periodic resync that re-resolves next hops.

mod next_hops;

use std::{collections::BTreeSet, net::IpAddr, path::PathBuf, time::Duration};

use lb_common::NodeConfig;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::{
    announce::{
        events::{AnnounceEvents, Transition},
        l2::Lease,
        run::{AnnounceError, Announcing, Wake},
    },
    cli::{DecapArgs, RunArgs},
    clock::KernelClock,
    config::{self, ConfigError},
    dataplane::{AnswerLease, Dataplane, DataplaneError},
    ipam::{EventSink, IpamController, IpamOptions, LeaseSettings, service_reference},
    k8s::{ClusterWatch, WatchError, WatchOptions},
    loader::{self, LoadError},
    metrics::{self, Metrics, ServeError, SyncFailure},
    netinfo::{Interface, NetError, NetInfo},
    state::DesiredState,
    sync::{self, MapOp, MapSnapshot, PlanError},
    table_cache::TableCache,
};

/// How long a sync waits for missing neighbour entries.
const RESOLVE_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("no interface: give --interface or set `interface` in {0}")]
    NoInterface(String),
    #[error("no node name: give --node-name or set NODE_NAME")]
    NoNodeName,
    #[error(transparent)]
    Kubernetes(#[from] WatchError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Announce(#[from] AnnounceError),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Metrics(#[from] ServeError),
}

/// Keeps the maps equal to a desired state.
struct Syncer {
    net: NetInfo,
    iface_name: String,
    dataplane: Dataplane,
    /// What the maps hold: read once at start, then kept current with every applied op.
    snapshot: MapSnapshot,
    /// Fingerprints of the tables of the last plan, so a change rebuilds only its tables.
    tables: TableCache,
    /// Tick rate and flow-table sizes, for the node config.
    loaded: loader::Loaded,
    /// Backends whose next hop is unresolved or unreachable, logged when that changes.
    neighbours: next_hops::NextHopReport,
    metrics: Metrics,
    /// Kubernetes mode: Events about next hops on the Services, from this node.
    hop_events: Option<(EventSink, String)>,
}

impl Syncer {
    async fn node_config(
        &self,
        desired: &DesiredState,
    ) -> Result<(Interface, NodeConfig), AgentError> {
        let iface = self.net.interface(&self.iface_name).await?;
        let encap_v4 = desired.node.encap_source.or(iface.ipv4);
        let encap_v6 = desired.node.encap_source_v6.or(iface.ipv6);
        // An encapsulating service needs an outer source of each backend family it uses.
        for svc in desired.services.values() {
            if svc.forwarding == lb_common::Forwarding::L2 {
                continue;
            }
            for ip in svc.backends.keys() {
                match ip {
                    IpAddr::V4(_) if encap_v4.is_none() => {
                        return Err(NetError::NoIpv4(self.iface_name.clone()).into());
                    }
                    IpAddr::V6(_) if encap_v6.is_none() => {
                        return Err(NetError::NoIpv6(self.iface_name.clone()).into());
                    }
                    _ => {}
                }
            }
        }
        let mut node = sync::node_config(desired, iface.mac, encap_v4, encap_v6, self.loaded);
        node.mtu = iface.mtu;
        Ok((iface, node))
    }

    /// Bring the maps to `desired` (its `node_addresses` set from the interface first);
    /// returns the number of map writes. Measured and counted in the metrics.
    async fn sync(&mut self, desired: &mut DesiredState) -> Result<usize, AgentError> {
        let started = std::time::Instant::now();
        let result = self.sync_once(desired).await;
        let outcome = match &result {
            Ok(writes) => Ok(*writes),
            Err(AgentError::Dataplane(_)) => Err(SyncFailure::MapWrite),
            Err(_) => Err(SyncFailure::Other),
        };
        self.metrics.agent().sync_done(started.elapsed(), outcome);
        self.metrics
            .set_sync_error(result.as_ref().err().map(ToString::to_string));
        if result.is_ok() {
            let names = desired
                .services
                .iter()
                .map(|(addr, spec)| (*addr, spec.name.clone()))
                .collect();
            self.metrics.update_state(|s| s.names = names);
        }
        result
    }

    async fn sync_once(&mut self, desired: &mut DesiredState) -> Result<usize, AgentError> {
        let (iface, node) = self.node_config(desired).await?;
        if desired.node.decap && desired.node_addresses != iface.addresses {
            desired.node_addresses = iface.addresses.clone();
        }
        let desired = &*desired;
        // Local endpoints need no next hop: their packets stay on the node.
        let local: BTreeSet<IpAddr> = desired.local_endpoints.keys().map(|e| e.backend).collect();
        let need: BTreeSet<IpAddr> = desired
            .services
            .values()
            .flat_map(|s| {
                s.backends
                    .iter()
                    .filter(|(ip, b)| b.mac.is_none() && !local.contains(ip))
                    .map(|(ip, _)| sync::next_hop_target(desired, s.forwarding, ip))
            })
            .collect();
        // Known failures, as next hops: a pod's node, or the pod.
        let failed: BTreeSet<IpAddr> = self
            .neighbours
            .unreachable()
            .iter()
            .flat_map(|ip| {
                desired
                    .services
                    .values()
                    .filter(|s| s.backends.contains_key(ip))
                    .map(|s| sync::next_hop_target(desired, s.forwarding, ip))
            })
            .collect();
        let found = self.net.resolve(&iface, &need, &failed, RESOLVE_WAIT).await;
        let hops = sync::NextHops {
            macs: &found.macs,
            failed: &found.failed,
        };
        let plan = sync::plan_with_hops(desired, node, hops, &self.snapshot, &mut self.tables)?;
        let changes = self.neighbours.report(&plan);
        let (unresolved, unreachable) = self.neighbours.counts();
        self.metrics.agent().set_next_hops(unresolved, unreachable);
        if let Some((sink, node)) = &self.hop_events {
            for change in &changes {
                // A backend removed from its service is not "reachable again".
                let present = desired
                    .services
                    .get(&change.service)
                    .is_some_and(|s| s.backends.contains_key(&change.backend));
                if change.now.is_none() && !present {
                    continue;
                }
                if let Some(svc) = next_hops::service_ref(desired, &change.service) {
                    sink.send(service_reference(svc), next_hops::notice(change, node));
                }
            }
        }
        let result = self.dataplane.apply(&plan.ops);
        if result.is_err() {
            // Part of the plan may be applied: re-read the truth before the next attempt.
            self.snapshot = self.dataplane.snapshot()?;
        } else {
            sync::apply_to_snapshot(&mut self.snapshot, &plan.ops);
        }
        result?;
        for op in &plan.ops {
            match op {
                MapOp::SetService {
                    key,
                    value,
                    fresh,
                    name,
                } => {
                    let addr = sync::service_addr(key)
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    tracing::info!(service = %name, %addr, slots = value.table_size, new = fresh, "service programmed");
                }
                MapOp::DeleteService { key } => {
                    let addr = sync::service_addr(key)
                        .map(|a| a.to_string())
                        .unwrap_or_default();
                    tracing::info!(%addr, "service removed");
                }
                _ => {}
            }
        }
        Ok(plan.ops.len())
    }
}

/// Where the desired state comes from.
enum Source {
    /// A static file, re-read on SIGHUP.
    File(PathBuf),
    /// The Kubernetes API, applied as it changes; with the IPAM controller unless disabled.
    Cluster {
        client: kube::Client,
        watch: Box<ClusterWatch>,
        ipam: Option<IpamController>,
    },
}

/// What the source has to say, see [`Source::next`].
enum Change {
    /// SIGHUP: the file re-read (or why it was rejected).
    Reloaded(Result<DesiredState, ConfigError>),
    /// The cluster's desired state changed.
    Cluster(DesiredState),
    /// SIGHUP in Kubernetes mode: re-apply the current state now.
    Resync,
}

impl Source {
    async fn open(args: &RunArgs) -> Result<Source, AgentError> {
        if let Some(path) = &args.config {
            return Ok(Source::File(path.clone()));
        }
        let node_name = args
            .cluster
            .node_name
            .clone()
            .ok_or(AgentError::NoNodeName)?;
        let client = kube::Client::try_default()
            .await
            .map_err(WatchError::Client)?;
        let ipam = args.cluster.ipam.then(|| {
            IpamController::spawn(
                client.clone(),
                IpamOptions {
                    namespace: args.cluster.namespace.clone(),
                    config_map: args.cluster.config_map.clone(),
                    lease: LeaseSettings::new(
                        &args.cluster.namespace,
                        &args.cluster.ipam_lease,
                        &node_name,
                    ),
                },
            )
        });
        let opts = WatchOptions {
            node_name,
            namespace: args.cluster.namespace.clone(),
            config_map: args.cluster.config_map.clone(),
        };
        let mut watch = ClusterWatch::start(client.clone(), opts.clone());
        // The IPAM leader speaks for every node; without IPAM the warnings are only logged.
        if let Some(ipam) = &ipam {
            watch.publish_warnings(
                EventSink::start(client.clone(), &opts.node_name, "Service warning"),
                ipam.leading(),
            );
        }
        Ok(Source::Cluster {
            client,
            watch: Box::new(watch),
            ipam,
        })
    }

    /// Stop watching; the IPAM controller gives up its Lease.
    async fn close(self) {
        if let Source::Cluster {
            watch,
            ipam: Some(ipam),
            ..
        } = self
        {
            drop(watch);
            ipam.shutdown().await;
        }
    }

    /// Where `interface` can be set, for messages.
    fn origin(&self) -> String {
        match self {
            Source::File(path) => path.display().to_string(),
            Source::Cluster { watch, .. } => watch.origin(),
        }
    }

    /// The first desired state (in Kubernetes mode: once every store is listed).
    async fn initial(&mut self) -> Result<DesiredState, AgentError> {
        match self {
            Source::File(path) => Ok(config::load(path)?),
            Source::Cluster { watch, .. } => Ok(watch.initial().await.inspect_err(|e| {
                tracing::error!(error = %e, "no initial state from the cluster");
            })?),
        }
    }

    /// Wait for SIGHUP or a change in the cluster. Cancel-safe.
    async fn next(&mut self, hup: &mut Signal) -> Change {
        match self {
            Source::File(path) => {
                hup.recv().await;
                Change::Reloaded(config::load(path))
            }
            Source::Cluster { watch, .. } => tokio::select! {
                state = watch.next() => Change::Cluster(state),
                _ = hup.recv() => Change::Resync,
            },
        }
    }
}

pub async fn run(args: RunArgs) -> Result<(), AgentError> {
    let mut hup = signal(SignalKind::hangup()).map_err(AgentError::Signal)?;
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    // The main loop turns at least every resync; a loop quiet for three of them (plus room
    // for a slow sync) is stuck.
    let beat_limit = Duration::from_secs(3 * args.resync_interval.max(1) + 30);
    let metrics = Metrics::new(&args.pin_path, beat_limit);
    let _server = match args.metrics_address {
        Some(address) => Some(AbortOnDrop(metrics::serve(address, metrics.clone()).await?)),
        None => None,
    };
    let mut source = Source::open(&args).await?;
    if let Source::Cluster {
        ipam: Some(ipam), ..
    } = &source
    {
        tokio::spawn(report_ipam(ipam.leading(), ipam.usage(), metrics.clone()));
    }
    // Kubernetes mode may wait for the API server here: stay responsive to SIGTERM/SIGINT,
    // and healthy (the wait is expected; readiness says it is not serving yet).
    let initial = {
        let init = source.initial();
        tokio::pin!(init);
        let mut beat = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                desired = &mut init => break Some(desired),
                _ = beat.tick() => metrics.beat(),
                _ = term.recv() => break None,
                _ = int.recv() => break None,
            }
        }
    };
    let mut desired = match initial {
        Some(Ok(desired)) => desired,
        Some(Err(e)) => {
            source.close().await;
            return Err(e);
        }
        None => {
            source.close().await;
            return Ok(());
        }
    };
    let iface_name = args
        .interface
        .clone()
        .or_else(|| desired.node.interface.clone())
        .ok_or_else(|| AgentError::NoInterface(source.origin()))?;

    if desired.node.decap && desired.decap_sources.is_empty() {
        tracing::warn!(
            "decap is on but no decap_sources: only this node's own tunnels are decapsulated"
        );
    }
    let node = args
        .cluster
        .node_name
        .clone()
        .or_else(|| desired.node.announce.node_name.clone())
        .unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map_or_else(|_| "localhost".into(), |h| h.trim().to_string())
        });
    let flows = args.flow_table_size.unwrap_or(desired.node.flows.size);
    let mut ebpf = loader::load(&args.pin_path, args.maglev_slots, flows)?;
    loader::install_decap(&mut ebpf)?;
    // Blocks this (only) thread briefly, once, before anything else runs.
    let loaded = loader::loaded(&mut ebpf)?;
    let dataplane = Dataplane::from_ebpf(&mut ebpf)?;
    // The ARP/NDP responder's lease, with the clock it is kept in (L2 renews it).
    let lease = Lease {
        map: AnswerLease::from_ebpf(&mut ebpf)?,
        clock: KernelClock::new(&mut ebpf).map_err(LoadError::from)?,
    };
    let snapshot = dataplane.snapshot()?;
    tracing::info!(
        pin_path = %args.pin_path.display(),
        services = snapshot.services.len(),
        backends = snapshot.backends.len(),
        maglev_slots = snapshot.maglev_capacity,
        hz = loaded.hz,
        flow_buckets4 = loaded.flow_buckets4,
        flow_buckets6 = loaded.flow_buckets6,
        "maps opened"
    );
    let mut syncer = Syncer {
        net: NetInfo::connect()?,
        iface_name: iface_name.clone(),
        dataplane,
        snapshot,
        tables: TableCache::default(),
        loaded,
        neighbours: Default::default(),
        metrics: metrics.clone(),
        hop_events: match &source {
            Source::Cluster { client, .. } => Some((
                EventSink::start(client.clone(), &node, "next-hop"),
                node.clone(),
            )),
            Source::File(_) => None,
        },
    };
    // Fill the maps before the program sees traffic (or, when adopting, before it is replaced).
    let writes = syncer.sync(&mut desired).await?;
    tracing::info!(writes, "initial sync done");
    let mut announcer = args
        .announce_file
        .clone()
        .map(|path| crate::announce::Announcer::new(path, node.clone()));
    let mut announce = |desired: &DesiredState| {
        if let Some(a) = announcer.as_mut() {
            match a.update(&desired.announce) {
                Ok(true) => {
                    tracing::info!(vips = ?desired.announce, "announcement weights written")
                }
                Ok(false) => {}
                Err(e) => tracing::error!(error = %e, "writing the announcement file failed"),
            }
        }
    };
    announce(&desired);
    let attachment = loader::attach_lb(&mut ebpf, &args.pin_path, &iface_name, args.xdp_mode)?;
    tracing::info!(
        iface = %iface_name,
        adopted = attachment.adopted,
        link = %attachment.pin.display(),
        "load balancer attached"
    );
    metrics.set_attached(true);
    // Replies of flows translated for this node's endpoints get their VIP back on egress.
    let revnat = if desired.node.decap {
        let a = loader::attach_revnat(&mut ebpf, &args.pin_path, &iface_name)?;
        tracing::info!(iface = %iface_name, adopted = a.adopted, link = %a.pin.display(), "egress translation attached");
        Some(a)
    } else {
        None
    };
    // Announce only now: the maps serve every VIP, and the program is attached.
    let iface = syncer.net.interface(&iface_name).await?;
    let mut announcing = Announcing::start(
        &node,
        &desired.node.announce,
        iface.index,
        iface.mac,
        desired.node.encap_source.or(iface.ipv4),
        lease,
    )
    .await?;
    // Kubernetes mode: Events on the Services say which node announces their VIPs.
    let events = match &source {
        Source::Cluster { client, .. } => Some(AnnounceEvents::start(client.clone(), &node)),
        Source::File(_) => None,
    };
    let mode = announcing.mode().name();
    let report = |desired: &DesiredState, t: Vec<Transition>, how: &str| {
        if let Some(e) = &events {
            e.publish(desired, &t, how);
        }
    };
    let show_announced = |announcing: &Announcing, desired: &DesiredState| {
        let now = announcing.announced(desired);
        metrics.update_state(|s| {
            s.announce_mode = mode;
            s.announced = now;
        });
    };
    let t = announcing.committed(&desired).await;
    report(&desired, t, announcing.how());
    show_announced(&announcing, &desired);

    let mut resync = tokio::time::interval(Duration::from_secs(args.resync_interval.max(1)));
    resync.tick().await;
    loop {
        metrics.beat();
        tokio::select! {
            change = source.next(&mut hup) => {
                let new = match change {
                    Change::Reloaded(Ok(new)) | Change::Cluster(new) => new,
                    Change::Reloaded(Err(e)) => {
                        tracing::error!(error = %e, "reload rejected; nothing changed");
                        continue;
                    }
                    Change::Resync => {
                        match syncer.sync(&mut desired).await {
                            Ok(writes) => tracing::info!(writes, "resync on SIGHUP done"),
                            Err(e) => tracing::warn!(error = %e, "resync on SIGHUP failed"),
                        }
                        continue;
                    }
                };
                if new.node.interface.is_some() && new.node.interface != desired.node.interface && args.interface.is_none() {
                    tracing::warn!("changing `interface` needs a restart; keeping {iface_name}");
                }
                let mut new = new;
                if new.node.announce.mode != announcing.mode() {
                    tracing::warn!(
                        now = announcing.mode().name(),
                        asked = new.node.announce.mode.name(),
                        "changing `announce` needs a restart; keeping the current mode"
                    );
                }
                announcing.reconfigure(&new.node.announce);
                announcing.prepare(&mut new);
                let cluster = matches!(source, Source::Cluster { .. });
                match syncer.sync(&mut new).await {
                    Ok(writes) if cluster => {
                        tracing::info!(writes, "cluster change applied");
                        desired = new;
                        announce(&desired);
                        let t = announcing.committed(&desired).await;
                        report(&desired, t, announcing.how());
                        show_announced(&announcing, &desired);
                    }
                    Ok(writes) => {
                        tracing::info!(writes, "config reloaded");
                        desired = new;
                        announce(&desired);
                        let t = announcing.committed(&desired).await;
                        report(&desired, t, announcing.how());
                        show_announced(&announcing, &desired);
                    }
                    // The cluster is the truth: keep the new state so the periodic resync
                    // retries it (the maps hold a consistent older state meanwhile).
                    Err(e) if cluster => {
                        tracing::error!(error = %e, "applying a cluster change failed; the periodic resync retries it");
                        desired = new;
                    }
                    Err(e) => tracing::error!(error = %e, "reload failed; maps hold a consistent older state"),
                }
            }
            _ = resync.tick() => {
                match syncer.sync(&mut desired).await {
                    Ok(0) => {
                        let t = announcing.committed(&desired).await;
                        report(&desired, t, announcing.how());
                        show_announced(&announcing, &desired);
                    }
                    Ok(writes) => {
                        tracing::info!(writes, "periodic resync applied changes");
                        let t = announcing.committed(&desired).await;
                        report(&desired, t, announcing.how());
                        show_announced(&announcing, &desired);
                    }
                    Err(e) => tracing::warn!(error = %e, "periodic resync failed"),
                }
            }
            wake = announcing.changed() => match wake {
                Wake::Members => {
                    announcing.prepare(&mut desired);
                    match syncer.sync(&mut desired).await {
                        Ok(writes) => {
                            if writes > 0 {
                                tracing::info!(writes, "ownership change applied");
                            }
                            let t = announcing.committed(&desired).await;
                            report(&desired, t, announcing.how());
                            show_announced(&announcing, &desired);
                        }
                        Err(e) => tracing::warn!(error = %e, "applying an ownership change failed; the periodic resync retries it"),
                    }
                }
                Wake::Retry => {
                    let t = announcing.retry().await;
                    report(&desired, t, announcing.how());
                    show_announced(&announcing, &desired);
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // Stop watching before the data plane is left alone.
    source.close().await;
    // Withdraw or hand over first, and keep forwarding while the others take over.
    announcing
        .stop(Duration::from_millis(args.handover_ms))
        .await;
    if args.keep_attached {
        tracing::info!(link = %attachment.pin.display(), "exiting; program stays attached (--keep-attached)");
        drop(attachment);
        drop(revnat);
    } else {
        attachment.detach()?;
        if let Some(r) = revnat {
            r.detach()?;
        }
        tracing::info!(iface = %iface_name, "detached");
    }
    Ok(())
}

/// Aborts a task when dropped (the metrics server, when `run` returns).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Keep the metrics' IPAM leadership and pool usage current.
async fn report_ipam(
    mut leading: tokio::sync::watch::Receiver<bool>,
    mut usage: tokio::sync::watch::Receiver<Vec<metrics::PoolUsage>>,
    metrics: Metrics,
) {
    loop {
        let lead = *leading.borrow_and_update();
        let pools = usage.borrow_and_update().clone();
        metrics.update_state(|s| {
            s.ipam_leader = Some(lead);
            s.pools = pools;
        });
        tokio::select! {
            r = leading.changed() => if r.is_err() { return },
            r = usage.changed() => if r.is_err() { return },
        }
    }
}

pub async fn decap(args: DecapArgs) -> Result<(), AgentError> {
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Signal)?;
    // The decap program needs none of the load balancer's maps: keep them tiny and unpinned.
    let mut ebpf = aya::EbpfLoader::new()
        .map_max_entries(lb_common::maps::MAGLEV, 1)
        .map_max_entries(lb_common::maps::FLOWTAB4, 1)
        .map_max_entries(lb_common::maps::FLOWTAB6, 1)
        .map_max_entries(lb_common::maps::AFFINITY, 1)
        .map_max_entries(lb_common::maps::REVNAT, 1)
        .load(loader::EBPF_OBJECT)
        .map_err(LoadError::from)?;
    // Its settings: the GUE port, in LB_CONFIG; who may tunnel to which of our addresses.
    let mut dataplane = Dataplane::from_ebpf(&mut ebpf)?;
    let mut node = lb_common::NodeConfig::EMPTY;
    node.flags = lb_common::CONFIG_F_VALID;
    node.gue_port_be = args.gue_port.to_be();
    let iface = NetInfo::connect()?.interface(&args.interface).await?;
    if args.allow_source.is_empty() {
        tracing::warn!("no --allow-source: no tunnel packet will be decapsulated");
    }
    let mut ops = vec![MapOp::SetConfig(node)];
    let entry = |list, net: &ipnet::IpNet| {
        let (prefix_len, addr) = sync::decap_prefix(net);
        MapOp::AddDecap {
            list,
            prefix_len,
            addr,
        }
    };
    ops.extend(
        args.allow_source
            .iter()
            .map(|net| entry(sync::DecapList::Sources, net)),
    );
    ops.extend(
        iface
            .addresses
            .iter()
            .map(|ip| entry(sync::DecapList::Destinations, &ipnet::IpNet::from(*ip))),
    );
    dataplane.apply(&ops)?;
    let link = loader::attach_decap(&mut ebpf, &args.interface, args.xdp_mode)?;
    tracing::info!(
        iface = %args.interface,
        allowed = ?args.allow_source,
        addresses = ?iface.addresses,
        "decap attached"
    );
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    drop(link);
    tracing::info!(iface = %args.interface, "decap detached");
    Ok(())
}
