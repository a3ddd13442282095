//! The IPAM controller, live: reflector stores of `IPAddressPool`s, Services and the agent's
//! ConfigMap, a Lease for leader election, and while leading, a [`Reconciler`] pass after
//! every change whose plan is written to the API (Service status, pool status, Events).
//!
//! - Every agent watches (so a new leader starts from warm stores); only the leader writes.
//! - Writes are fenced twice. Before every status write the leader reads the Lease and goes
//!   on only if it is still ours exactly as we last wrote it and our renew deadline has not
//!   passed ([`LeaseLock::confirm`]); a leader paused past its Lease (SIGSTOP, a stalled VM)
//!   therefore stops at its next write. And every Service status write carries the Service's
//!   `resourceVersion` the decision was made on, so a write that was already in flight when
//!   the Lease changed hands fails with `409 Conflict` if the new leader (or anyone) wrote that
//!   Service since; if it lands first, the new leader sees it and re-plans with it.
//! - Nothing is decided before every store holds a complete first list.
//! - A new leader starts from nothing and rebuilds the allocations from the Services' status
//!   (see [`super::reconcile`]); losing the lead forgets them.
//! - Bursts of changes are coalesced for [`DEBOUNCE`]; a pass with a failed write is retried
//!   after [`RETRY`].
//! - Stopping ([`IpamController::shutdown`]) releases the Lease so another agent takes over at
//!   once; a crash leaves it to expire.

use std::{fmt::Debug, hash::Hash, net::IpAddr, time::Duration};

use futures::StreamExt;
use k8s_openapi::{
    api::core::v1::{ConfigMap, Service},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ApiResource, DynamicObject, Patch, PatchParams},
    runtime::{
        WatchStreamExt,
        reflector::{self, Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
    time::Instant,
};

use super::{
    POOL_API_VERSION, POOL_KIND,
    events::Recorder,
    lease::{Fence, LeaseLock, LeaseSettings},
    reconcile::{Plan, PoolObject, PoolStatusWrite, Reconciler, Snapshot, StatusWrite},
};
use crate::{k8s::K8sConfig, metrics::PoolUsage};

/// How long after the first change of a burst a pass runs.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// How long after a pass with a failed write the next one runs.
pub const RETRY: Duration = Duration::from_secs(2);

/// Bound on every write to the API server.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long [`IpamController::shutdown`] waits for the Lease to be released.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);

/// `ipMode` written with every address: traffic to the VIP goes through the load balancer.
pub const IP_MODE: &str = "VIP";

/// The plural of the pool resource in URLs.
pub const POOL_PLURAL: &str = "ipaddresspools";

/// What the controller needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpamOptions {
    /// Namespace of the agent's ConfigMap (and of the Lease).
    pub namespace: String,
    /// The agent's ConfigMap: which `loadBalancerClass` is ours.
    pub config_map: String,
    /// Lease name, identity and timing.
    pub lease: LeaseSettings,
}

/// The `IPAddressPool` resource.
pub fn pool_resource() -> ApiResource {
    let (group, version) = POOL_API_VERSION.split_once('/').expect("group/version");
    ApiResource {
        group: group.to_string(),
        version: version.to_string(),
        api_version: POOL_API_VERSION.to_string(),
        kind: POOL_KIND.to_string(),
        plural: POOL_PLURAL.to_string(),
    }
}

/// A running controller. Dropping it stops it at once (as a crash would: the Lease is left
/// to expire); [`IpamController::shutdown`] stops it cleanly.
pub struct IpamController {
    task: Option<JoinHandle<()>>,
    stop: Option<oneshot::Sender<()>>,
    leading: watch::Receiver<bool>,
    usage: watch::Receiver<Vec<PoolUsage>>,
}

impl Drop for IpamController {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl IpamController {
    /// Start watching and electing (on the current tokio runtime).
    pub fn spawn(client: Client, opts: IpamOptions) -> IpamController {
        let (stop, stopped) = oneshot::channel();
        let (lead_tx, leading) = watch::channel(false);
        let (usage_tx, usage) = watch::channel(Vec::new());
        let task = tokio::spawn(run(client, opts, stopped, lead_tx, usage_tx));
        IpamController {
            task: Some(task),
            stop: Some(stop),
            leading,
            usage,
        }
    }

    /// Addresses of each pool, as the last pass of this agent (while leading) counted them;
    /// empty while another agent leads.
    pub fn usage(&self) -> watch::Receiver<Vec<PoolUsage>> {
        self.usage.clone()
    }

    /// Whether this agent leads now, and its changes: the one agent that writes, which other
    /// parts use to publish cluster-wide Events once rather than from every node.
    pub fn leading(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    /// Stop: give up the Lease if held (bounded wait), stop the watchers.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let abort = task.abort_handle();
            if tokio::time::timeout(SHUTDOWN_TIMEOUT, task).await.is_err() {
                tracing::warn!("IPAM controller did not stop in time");
                abort.abort();
            }
        }
    }
}

/// Size and use of every pool the allocator knows.
fn pool_usage(alloc: &super::allocator::Allocator) -> Vec<PoolUsage> {
    alloc
        .pools()
        .iter()
        .map(|p| PoolUsage {
            name: p.name.clone(),
            size: p
                .ranges
                .iter()
                .fold(0u128, |acc, r| acc.saturating_add(r.len())),
            used: alloc.in_use(&p.name) as u64,
        })
        .collect()
}

/// The stores and their change counter. Dropping it stops the watchers.
struct Stores {
    pools: Store<DynamicObject>,
    services: Store<Service>,
    config_maps: Store<ConfigMap>,
    changes: watch::Receiver<u64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Stores {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Stores {
    fn start(client: &Client, opts: &IpamOptions) -> Stores {
        let (tx, changes) = watch::channel(0u64);
        let mut tasks = Vec::with_capacity(3);
        let resource = pool_resource();
        let writer = Writer::new(resource.clone());
        let pools = writer.as_reader();
        tasks.push(spawn_reflector(
            Api::<DynamicObject>::all_with(client.clone(), &resource),
            watcher::Config::default(),
            POOL_PLURAL,
            writer,
            tx.clone(),
        ));
        let (services, writer) = reflector::store();
        tasks.push(spawn_reflector(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            "services",
            writer,
            tx.clone(),
        ));
        let (config_maps, writer) = reflector::store();
        tasks.push(spawn_reflector(
            Api::<ConfigMap>::namespaced(client.clone(), &opts.namespace),
            watcher::Config::default().fields(&format!("metadata.name={}", opts.config_map)),
            "configmaps",
            writer,
            tx,
        ));
        Stores {
            pools,
            services,
            config_maps,
            changes,
            tasks,
        }
    }

    /// Wait until all three stores have been listed; `false` if a watcher ended first.
    async fn ready(&self) -> bool {
        tokio::try_join!(
            self.pools.wait_until_ready(),
            self.services.wait_until_ready(),
            self.config_maps.wait_until_ready(),
        )
        .is_ok()
    }
}

/// The settings in force: the ConfigMap's when valid, else the last valid ones.
struct Settings {
    config: K8sConfig,
    rejected: Option<String>,
}

impl Settings {
    fn refresh(&mut self, stores: &Stores) {
        let Some(cm) = stores.config_maps.state().into_iter().next() else {
            self.config = K8sConfig::default();
            self.rejected = None;
            return;
        };
        match K8sConfig::from_config_map(&cm) {
            Ok(config) => {
                self.config = config;
                self.rejected = None;
            }
            Err(e) => {
                let message = e.to_string();
                if self.rejected.as_ref() != Some(&message) {
                    tracing::warn!(error = %message, "IPAM: settings rejected; keeping the last valid ones");
                    self.rejected = Some(message);
                }
            }
        }
    }
}

async fn run(
    client: Client,
    opts: IpamOptions,
    mut stop: oneshot::Receiver<()>,
    lead_tx: watch::Sender<bool>,
    usage_tx: watch::Sender<Vec<PoolUsage>>,
) {
    let identity = opts.lease.identity.clone();
    let mut stores = Stores::start(&client, &opts);
    let mut lease = LeaseLock::new(client.clone(), opts.lease.clone());
    let mut writer = PlanWriter {
        client: client.clone(),
        recorder: Recorder::new(client, identity.clone()),
    };
    let mut reconciler = Reconciler::new();
    let mut settings = Settings {
        config: K8sConfig::default(),
        rejected: None,
    };
    tracing::info!(
        identity = %identity,
        lease = %format_args!("{}/{}", opts.lease.namespace, opts.lease.name),
        "IPAM controller started; waiting for the pool, Service and ConfigMap lists"
    );
    tokio::select! {
        ready = stores.ready() => if !ready { return },
        _ = &mut stop => return,
    }
    tracing::info!(
        pools = stores.pools.len(),
        services = stores.services.len(),
        "IPAM: listed"
    );

    let mut renew = tokio::time::interval(opts.lease.renew_interval);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leading = false;
    let mut dirty = true;
    let mut retry_at: Option<Instant> = None;
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            _ = renew.tick() => {
                let now_leading = lease.tick().await;
                if now_leading != leading {
                    leading = now_leading;
                    lead_tx.send_replace(leading);
                    if leading {
                        tracing::info!(identity = %identity, "IPAM: became the leader");
                        dirty = true;
                    } else {
                        tracing::info!(identity = %identity, "IPAM: no longer the leader");
                        reconciler.reset();
                        usage_tx.send_replace(Vec::new());
                        retry_at = None;
                    }
                }
            }
            changed = stores.changes.changed() => {
                if changed.is_err() {
                    // Every watcher ended: only on shutdown.
                    break;
                }
                tokio::time::sleep(DEBOUNCE).await;
                stores.changes.borrow_and_update();
                dirty = true;
            }
            _ = sleep_until(retry_at) => {
                retry_at = None;
                dirty = true;
            }
        }
        if !(leading && dirty) {
            continue;
        }
        dirty = false;
        settings.refresh(&stores);
        let pools: Vec<PoolObject> = stores
            .pools
            .state()
            .iter()
            .map(|p| PoolObject::from_dynamic(p))
            .collect();
        let services = stores.services.state();
        let plan = reconciler.reconcile(&Snapshot {
            pools: &pools,
            services: &services,
            config: &settings.config,
            now: Timestamp::now(),
        });
        if let Some(alloc) = reconciler.allocator() {
            usage_tx.send_replace(pool_usage(alloc));
        }
        match writer.apply(&plan, &lease).await {
            Outcome::Done => {}
            Outcome::Failed => retry_at = Some(Instant::now() + RETRY),
            Outcome::NotLeader => {
                tracing::info!(identity = %identity, "IPAM: lost the lead while writing");
                leading = false;
                lead_tx.send_replace(false);
                reconciler.reset();
            }
        }
    }
    lead_tx.send_replace(false);
    if leading || lease.is_leader() {
        lease.release().await;
    }
    drop(stores);
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How applying a plan went.
enum Outcome {
    Done,
    /// A write failed; the next pass plans it again.
    Failed,
    /// The lead was lost half-way; nothing more was written.
    NotLeader,
}

/// Writes plans to the API.
struct PlanWriter {
    client: Client,
    recorder: Recorder,
}

impl PlanWriter {
    async fn apply(&mut self, plan: &Plan, lease: &LeaseLock) -> Outcome {
        let mut failed = false;
        for (service, ips) in &plan.freed {
            tracing::info!(%service, ips = ?ips, "IPAM: addresses of a deleted service freed");
        }
        for write in &plan.status {
            match lease.confirm().await {
                Fence::Held => {}
                Fence::Lost => return Outcome::NotLeader,
                Fence::Unknown => return Outcome::Failed,
            }
            match bounded(self.write_status(write)).await {
                Ok(()) => tracing::info!(
                    service = %write.service,
                    ips = ?write.ips,
                    "IPAM: status.loadBalancer.ingress written"
                ),
                Err(WriteError::Api(kube::Error::Api(s))) if s.is_conflict() => {
                    failed = true;
                    tracing::info!(service = %write.service, "IPAM: the service changed since it was read; planned again");
                }
                Err(e) => {
                    failed = true;
                    tracing::warn!(service = %write.service, error = %e, "IPAM: writing the service status failed");
                }
            }
        }
        for write in &plan.pool_status {
            if !lease.is_leader() {
                return Outcome::NotLeader;
            }
            if let Err(e) = bounded(self.write_pool_status(write)).await {
                failed = true;
                tracing::warn!(pool = %write.pool, error = %e, "IPAM: writing the pool status failed");
            }
        }
        for event in &plan.events {
            if !lease.is_leader() {
                return Outcome::NotLeader;
            }
            let object = match &event.regarding.namespace {
                Some(ns) => format!(
                    "{ns}/{}",
                    event.regarding.name.as_deref().unwrap_or_default()
                ),
                None => event.regarding.name.clone().unwrap_or_default(),
            };
            let kind = event.regarding.kind.as_deref().unwrap_or_default();
            let n = &event.notice;
            match n.type_ {
                super::events::EventType::Normal => {
                    tracing::info!(kind, %object, reason = %n.reason, "{}", n.note)
                }
                super::events::EventType::Warning => {
                    tracing::warn!(kind, %object, reason = %n.reason, "{}", n.note)
                }
            }
            // Events are best effort: a lost one is not retried.
            match tokio::time::timeout(WRITE_TIMEOUT, self.recorder.publish(&event.regarding, n))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "IPAM: event not published"),
                Err(_) => {
                    tracing::warn!(%object, reason = %n.reason, "IPAM: event not published in time")
                }
            }
        }
        if failed {
            Outcome::Failed
        } else {
            Outcome::Done
        }
    }

    async fn write_status(&self, write: &StatusWrite) -> Result<(), kube::Error> {
        let api: Api<Service> = Api::namespaced(self.client.clone(), &write.service.namespace);
        api.patch_status(
            &write.service.name,
            &PatchParams::default(),
            &Patch::Merge(status_patch(&write.ips, write.resource_version.as_deref())),
        )
        .await
        .map(drop)
    }

    async fn write_pool_status(&self, write: &PoolStatusWrite) -> Result<(), kube::Error> {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &pool_resource());
        let patch = json!({"status": {"conditions": [write.condition]}});
        api.patch_status(&write.pool, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .map(drop)
    }
}

/// The merge patch that sets `status.loadBalancer.ingress` to exactly `ips` (a JSON merge
/// patch replaces lists as a whole; `null` removes the field), conditioned on
/// `resource_version` when given (the API server answers `409 Conflict` if the object changed).
pub fn status_patch(ips: &[IpAddr], resource_version: Option<&str>) -> Value {
    let ingress: Value = if ips.is_empty() {
        Value::Null
    } else {
        ips.iter()
            .map(|ip| json!({"ip": ip.to_string(), "ipMode": IP_MODE}))
            .collect()
    };
    let mut patch = json!({"status": {"loadBalancer": {"ingress": ingress}}});
    if let Some(rv) = resource_version {
        patch["metadata"] = json!({"resourceVersion": rv});
    }
    patch
}

#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

async fn bounded(fut: impl Future<Output = Result<(), kube::Error>>) -> Result<(), WriteError> {
    match tokio::time::timeout(WRITE_TIMEOUT, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(WriteError::Timeout(WRITE_TIMEOUT)),
    }
}

/// Run `watcher → backoff → reflector` for one resource until aborted; bump `changes` after
/// every object change or completed (re-)list.
fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    resource: &'static str,
    writer: Writer<K>,
    changes: watch::Sender<u64>,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let stream = watcher(api, config)
        .default_backoff()
        .modify(|obj: &mut K| obj.managed_fields_mut().clear())
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone,
                ) => {
                    changes.send_modify(|n| *n = n.wrapping_add(1));
                }
                Ok(_) => {}
                Err(watcher::Error::InitialListFailed(kube::Error::Api(s)))
                    if resource == POOL_PLURAL && s.is_not_found() =>
                {
                    tracing::warn!(
                        resource,
                        "IPAM: the IPAddressPool resource does not exist; install its CRD \
                         (deploy/crd-ipaddresspool.yaml) or run with --ipam=false; retrying"
                    );
                }
                Err(e) => {
                    tracing::warn!(resource, error = %e, "IPAM: watch failed; retrying with backoff");
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_patch_sets_or_removes_the_addresses() {
        let ips: Vec<IpAddr> = vec![
            "198.18.0.1".parse().unwrap(),
            "2001:db8::1".parse().unwrap(),
        ];
        assert_eq!(
            status_patch(&ips, None),
            json!({"status": {"loadBalancer": {"ingress": [
                {"ip": "198.18.0.1", "ipMode": "VIP"},
                {"ip": "2001:db8::1", "ipMode": "VIP"}
            ]}}})
        );
        assert_eq!(
            status_patch(&[], Some("42")),
            json!({
                "metadata": {"resourceVersion": "42"},
                "status": {"loadBalancer": {"ingress": null}}
            })
        );
    }

    #[test]
    fn pool_resource_paths() {
        let r = pool_resource();
        assert_eq!(
            (r.group.as_str(), r.version.as_str()),
            ("xdp-lb.io", "v1alpha1")
        );
        assert_eq!(r.plural, "ipaddresspools");
    }
}
