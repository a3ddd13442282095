//! Kubernetes mode, live: reflector stores of Services and EndpointSlices (all namespaces),
//! Nodes and the agent's ConfigMap, each fed by a `watcher` that retries with backoff, and
//! the desired state computed from their snapshots whenever they change. No map handles
//! here: the daemon applies what [`ClusterWatch`] returns by diff, as it does a static config.
//!
//! - Nothing is computed before every store holds a complete first list.
//! - Bursts are coalesced: the state is computed [`DEBOUNCE`] after the first event of a
//!   burst, from the stores as they are by then, and handed out only when it differs from
//!   the previous one.
//! - While the API server is unreachable the watchers retry with backoff and the stores keep
//!   their contents, so the data plane keeps the last state. A watch resumes from the last
//!   resource version; when that is too old, the re-list replaces a store in one step (it is
//!   never seen empty), and only the difference reaches the maps.
//! - Warnings about Services (an invalid address, a port skipped, an address conflict, …)
//!   are logged once when they appear and, with [`ClusterWatch::publish_warnings`], also
//!   published as Warning Events on the Service, by one agent only (the IPAM leader).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    hash::Hash,
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::{
    core::v1::{ConfigMap, Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::DynamicObject,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::{sync::watch, task::JoinHandle};

use super::{
    K8sConfig, K8sConfigError, SERVICE_NAME_LABEL, Warning, WarningReason, desired_state_with_pools,
};
use crate::{
    ipam::{EventSink, Notice},
    state::DesiredState,
};

/// `action` of the Warning Events about Services.
const WARNING_ACTION: &str = "Program";

/// Namespace of the agent's ConfigMap unless `--namespace`/`POD_NAMESPACE` says otherwise.
pub const DEFAULT_NAMESPACE: &str = "xdp-lb";

/// Name of the agent's ConfigMap unless `--config-map` says otherwise.
pub const DEFAULT_CONFIG_MAP: &str = "xdp-lb-config";

/// How long after the first event of a burst the desired state is computed.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

/// How long the first state waits for the IPAddressPools (their CRD may be missing).
const POOLS_WAIT: Duration = Duration::from_secs(5);

/// Which objects to watch and for which node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchOptions {
    /// This node's name, as in its Node object.
    pub node_name: String,
    /// Namespace of the agent's ConfigMap.
    pub namespace: String,
    /// Name of the agent's ConfigMap.
    pub config_map: String,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("Kubernetes client: {0}")]
    Client(kube::Error),
    #[error(transparent)]
    Config(#[from] K8sConfigError),
    #[error("the {0} watcher stopped before its first list")]
    Stopped(&'static str),
}

/// What the agent's ConfigMap held at the last look.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Settings {
    Missing,
    Valid(Box<K8sConfig>),
    /// Rejected (the message); the last valid settings stay in use.
    Invalid(String),
}

/// A warning as a set element (log each one once, when it appears).
type WarningKey = (String, String, WarningReason, String);

/// The live stores and what was last computed from them. Dropping it stops the watchers.
pub struct ClusterWatch {
    opts: WatchOptions,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    config_maps: Store<ConfigMap>,
    /// The address pools, for their `spec.announce` (absent CRD: none).
    pools: Store<DynamicObject>,
    /// Bumped by the watcher tasks after every relevant change to a store.
    changes: watch::Receiver<u64>,
    tasks: Vec<JoinHandle<()>>,
    /// A change was seen but not computed yet (survives a cancelled [`ClusterWatch::next`]).
    pending: bool,
    /// The settings in use: the last valid ones (the defaults without a ConfigMap).
    config: K8sConfig,
    settings: Option<Settings>,
    warnings: BTreeSet<WarningKey>,
    /// The warnings this agent published as Events (while it is the publisher).
    published: BTreeSet<WarningKey>,
    /// Where warnings are published as Events, and whether this agent is the one that does.
    events: Option<(EventSink, Gate)>,
    last: Option<DesiredState>,
}

/// Whether this agent publishes the cluster-wide Events now (the IPAM leader's flag).
type Gate = watch::Receiver<bool>;

impl Drop for ClusterWatch {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl ClusterWatch {
    /// Connect with the default client configuration (`KUBECONFIG` or `~/.kube/config`, else
    /// the pod's service account) and start watching.
    pub async fn connect(opts: WatchOptions) -> Result<ClusterWatch, WatchError> {
        let client = Client::try_default().await.map_err(WatchError::Client)?;
        Ok(ClusterWatch::start(client, opts))
    }

    /// Start the four watchers (on the current tokio runtime).
    pub fn start(client: Client, opts: WatchOptions) -> ClusterWatch {
        let (tx, changes) = watch::channel(0u64);
        let mut tasks = Vec::with_capacity(4);

        let (services, writer) = reflector::store();
        tasks.push(spawn_reflector(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            "services",
            writer,
            strip_managed_fields,
            tx.clone(),
            any_change,
        ));

        // Slices without a Service (mirrored or hand-made ones) are never used.
        let (slices, writer) = reflector::store();
        tasks.push(spawn_reflector(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(SERVICE_NAME_LABEL),
            "endpointslices",
            writer,
            strip_managed_fields,
            tx.clone(),
            any_change,
        ));

        // Only the names matter; status updates must not cause a recomputation.
        let (nodes, writer) = reflector::store();
        tasks.push(spawn_reflector(
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
            "nodes",
            writer,
            strip_node,
            tx.clone(),
            node_names_changed(nodes.clone()),
        ));

        let resource = crate::ipam::controller::pool_resource();
        let writer = Writer::new(resource.clone());
        let pools = writer.as_reader();
        tasks.push(spawn_reflector(
            Api::<DynamicObject>::all_with(client.clone(), &resource),
            watcher::Config::default(),
            "ipaddresspools",
            writer,
            strip_managed_fields,
            tx.clone(),
            any_change,
        ));

        let (config_maps, writer) = reflector::store();
        tasks.push(spawn_reflector(
            Api::<ConfigMap>::namespaced(client, &opts.namespace),
            watcher::Config::default().fields(&format!("metadata.name={}", opts.config_map)),
            "configmaps",
            writer,
            strip_managed_fields,
            tx,
            any_change,
        ));

        ClusterWatch {
            opts,
            services,
            slices,
            nodes,
            config_maps,
            pools,
            changes,
            tasks,
            pending: false,
            config: K8sConfig::default(),
            settings: None,
            warnings: BTreeSet::new(),
            published: BTreeSet::new(),
            events: None,
            last: None,
        }
    }

    /// Also publish each warning as a Warning Event on its Service, once, while `gate` is true
    /// (the IPAM leader's flag, so that one agent speaks for all nodes). An agent
    /// that becomes the publisher publishes the warnings in force once; one that stops
    /// forgets what it published.
    pub fn publish_warnings(&mut self, sink: EventSink, gate: Gate) {
        self.events = Some((sink, gate));
    }

    /// Publish the warnings of `current` not published yet, if this agent publishes.
    fn publish(&mut self, services: &[std::sync::Arc<Service>], current: &BTreeSet<WarningKey>) {
        let Some((sink, gate)) = &self.events else {
            return;
        };
        if !*gate.borrow() {
            self.published.clear();
            return;
        }
        for (namespace, name, reason, message) in current.difference(&self.published) {
            let uid = services
                .iter()
                .find(|s| {
                    s.metadata.namespace.as_deref() == Some(namespace.as_str())
                        && s.metadata.name.as_deref() == Some(name.as_str())
                })
                .and_then(|s| s.metadata.uid.clone());
            let regarding = ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Service".into()),
                namespace: Some(namespace.clone()),
                name: Some(name.clone()),
                uid,
                ..ObjectReference::default()
            };
            sink.send(
                regarding,
                Notice::warning(reason.as_str(), WARNING_ACTION, message.clone()),
            );
        }
        self.published = current.clone();
    }

    /// Where the settings come from: `ConfigMap NAMESPACE/NAME`.
    pub fn origin(&self) -> String {
        format!("ConfigMap {}/{}", self.opts.namespace, self.opts.config_map)
    }

    /// Wait until every store holds a complete first list, then compute the first desired
    /// state. An invalid ConfigMap is an error here: there are no earlier settings to keep.
    pub async fn initial(&mut self) -> Result<DesiredState, WatchError> {
        tracing::info!(
            node = %self.opts.node_name,
            config_map = %self.origin(),
            "waiting for the first lists of Services, EndpointSlices, Nodes and the ConfigMap"
        );
        tokio::try_join!(
            ready(&self.services, "services"),
            ready(&self.slices, "endpointslices"),
            ready(&self.nodes, "nodes"),
            ready(&self.config_maps, "configmaps"),
        )?;
        // Pools only refine the announcement, and their CRD may not be installed: wait a
        // moment for them, not forever.
        if tokio::time::timeout(POOLS_WAIT, ready(&self.pools, "ipaddresspools"))
            .await
            .is_err()
        {
            tracing::warn!(
                "no list of IPAddressPools yet (is the CRD installed?); announcing without their settings until it comes"
            );
        }
        self.changes.borrow_and_update();
        self.pending = false;
        if let Err(e) = self.refresh_settings() {
            return Err(e.into());
        }
        let state = self.compute();
        tracing::info!(
            services = self.services.len(),
            endpointslices = self.slices.len(),
            nodes = self.nodes.len(),
            addresses = state.services.len(),
            "cluster state listed"
        );
        self.last = Some(state.clone());
        Ok(state)
    }

    /// Wait for the next change that alters the desired state, and return that state.
    /// Cancel-safe: a change seen by a cancelled call is computed by the next one.
    pub async fn next(&mut self) -> DesiredState {
        loop {
            if !self.pending {
                let gate = self.events.as_mut().map(|(_, g)| g);
                tokio::select! {
                    changed = self.changes.changed() => if changed.is_err() {
                        // Every watcher task ended; they retry forever, so only on shutdown.
                        std::future::pending::<()>().await;
                    },
                    // This agent became (or stopped being) the one that publishes: the
                    // warnings in force are published once by the new publisher.
                    () = gate_changed(gate) => {}
                }
                self.pending = true;
            }
            tokio::time::sleep(DEBOUNCE).await;
            self.changes.borrow_and_update();
            self.pending = false;
            if let Err(e) = self.refresh_settings() {
                let message = e.to_string();
                if self.settings != Some(Settings::Invalid(message.clone())) {
                    tracing::error!(
                        config_map = %self.origin(),
                        error = %message,
                        "settings rejected; keeping the last valid ones"
                    );
                    self.settings = Some(Settings::Invalid(message));
                }
            }
            let state = self.compute();
            if self.last.as_ref() != Some(&state) {
                self.last = Some(state.clone());
                return state;
            }
        }
    }

    /// Read the ConfigMap into `self.config`: the defaults when there is none, unchanged when
    /// it is invalid (the error is returned).
    fn refresh_settings(&mut self) -> Result<(), K8sConfigError> {
        let found = self
            .config_maps
            .state()
            .into_iter()
            .find(|cm| cm.metadata.name.as_deref() == Some(self.opts.config_map.as_str()));
        let now = match found {
            None => Settings::Missing,
            Some(cm) => Settings::Valid(Box::new(K8sConfig::from_config_map(&cm)?)),
        };
        if self.settings.as_ref() != Some(&now) {
            match &now {
                Settings::Missing => tracing::info!(
                    config_map = %self.origin(),
                    "ConfigMap not found; using the default settings"
                ),
                Settings::Valid(cfg) => tracing::info!(
                    config_map = %self.origin(),
                    settings = ?cfg,
                    "settings read"
                ),
                Settings::Invalid(_) => {}
            }
        }
        self.config = match &now {
            Settings::Valid(cfg) => (**cfg).clone(),
            _ => K8sConfig::default(),
        };
        self.settings = Some(now);
        Ok(())
    }

    /// The desired state of the stores' current contents; logs each warning once, when it
    /// first appears.
    fn compute(&mut self) -> DesiredState {
        let services = self.services.state();
        let slices = self.slices.state();
        let nodes = self.nodes.state();
        let pools = self.pools.state();
        let specs: Vec<(String, crate::ipam::IpAddressPoolSpec)> = pools
            .iter()
            .filter_map(|p| {
                let spec = p.data.get("spec")?.clone();
                Some((p.name_any(), serde_json::from_value(spec).ok()?))
            })
            .collect();
        // Invalid pools are reported by the IPAM controller; here they are left out.
        let (pools, _) = crate::ipam::validate_pools(specs.iter().map(|(n, s)| (n.as_str(), s)));
        let (state, warnings) = desired_state_with_pools(
            &services,
            &slices,
            &nodes,
            &pools,
            &self.config,
            &self.opts.node_name,
        );
        let current: BTreeSet<WarningKey> = warnings.into_iter().map(warning_key).collect();
        for (namespace, name, reason, message) in current.difference(&self.warnings) {
            tracing::warn!(
                service = %format_args!("{namespace}/{name}"),
                reason = reason.as_str(),
                "{message}"
            );
        }
        self.publish(&services, &current);
        self.warnings = current;
        state
    }
}

/// Resolves when `gate` changes; never without one, or once its sender is gone.
async fn gate_changed(gate: Option<&mut watch::Receiver<bool>>) {
    let Some(g) = gate else {
        return std::future::pending().await;
    };
    if g.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn warning_key(w: Warning) -> WarningKey {
    (w.namespace, w.name, w.reason, w.message)
}

async fn ready<K>(store: &Store<K>, resource: &'static str) -> Result<(), WatchError>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    store
        .wait_until_ready()
        .await
        .map_err(|_| WatchError::Stopped(resource))?;
    tracing::debug!(resource, "listed");
    Ok(())
}

/// Run `watcher → backoff → strip → reflector` for one resource until aborted; bump
/// `changes` after every event `relevant` accepts (the store already holds it then).
fn spawn_reflector<K, F>(
    api: Api<K>,
    config: watcher::Config,
    resource: &'static str,
    writer: Writer<K>,
    strip: fn(&mut K),
    changes: watch::Sender<u64>,
    mut relevant: F,
) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
    F: FnMut(&watcher::Event<K>) -> bool + Send + 'static,
{
    let stream = watcher(api, config)
        .default_backoff()
        .modify(strip)
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    if relevant(&event) {
                        changes.send_modify(|n| *n = n.wrapping_add(1));
                    }
                }
                Err(e) => {
                    tracing::warn!(resource, error = %e, "watch failed; retrying with backoff");
                }
            }
        }
    })
}

/// Objects added, changed or deleted, or a (re-)list completed.
fn any_change<K>(event: &watcher::Event<K>) -> bool {
    matches!(
        event,
        watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone
    )
}

/// What of a Node the desired state reads (after [`strip_node`]): its name, labels,
/// cordon, Ready and addresses. Heartbeats and other status updates are no change.
fn node_facts(node: &Node) -> String {
    // Stripped nodes are small; their JSON is a faithful key.
    serde_json::to_string(&(&node.metadata.labels, &node.spec, &node.status)).unwrap_or_default()
}

/// A node joining, leaving, or changing what [`node_facts`] covers.
fn node_names_changed(store: Store<Node>) -> impl FnMut(&watcher::Event<Node>) -> bool + Send {
    let mut facts: BTreeMap<String, String> = BTreeMap::new();
    move |event| match event {
        watcher::Event::Apply(node) => {
            let f = node_facts(node);
            facts.insert(node.name_any(), f.clone()).as_ref() != Some(&f)
        }
        watcher::Event::Delete(node) => facts.remove(&node.name_any()).is_some(),
        watcher::Event::InitDone => {
            let now: BTreeMap<String, String> = store
                .state()
                .iter()
                .map(|n| (n.name_any(), node_facts(n)))
                .collect();
            let changed = now != facts;
            facts = now;
            changed
        }
        watcher::Event::Init | watcher::Event::InitApply(_) => false,
    }
}

/// Managed fields are large and never read.
fn strip_managed_fields<K: ResourceExt>(obj: &mut K) {
    obj.managed_fields_mut().clear();
}

/// Of a Node only its name, labels, cordon, Ready condition (without its timestamps) and
/// addresses are used (who may announce VIPs, and where its heartbeats come from).
fn strip_node(node: &mut Node) {
    strip_managed_fields(node);
    node.metadata.annotations = None;
    node.spec = node
        .spec
        .take()
        .map(|s| k8s_openapi::api::core::v1::NodeSpec {
            unschedulable: s.unschedulable,
            ..Default::default()
        });
    node.status = node
        .status
        .take()
        .map(|s| k8s_openapi::api::core::v1::NodeStatus {
            addresses: s.addresses,
            conditions: s.conditions.map(|c| {
                c.into_iter()
                    .filter(|c| c.type_ == "Ready")
                    .map(|c| k8s_openapi::api::core::v1::NodeCondition {
                        type_: c.type_,
                        status: c.status,
                        ..Default::default()
                    })
                    .collect()
            }),
            ..Default::default()
        });
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::NodeStatus;
    use kube::api::ObjectMeta;

    use super::*;

    fn node(name: &str, heartbeat: &str) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                resource_version: Some(heartbeat.into()),
                ..ObjectMeta::default()
            },
            status: Some(NodeStatus::default()),
            ..Node::default()
        }
    }

    #[test]
    fn nodes_joining_leaving_or_changing_what_is_read_are_changes() {
        let (store, mut writer) = reflector::store::<Node>();
        let mut changed = node_names_changed(store);
        let mut feed = |event: watcher::Event<Node>| {
            writer.apply_watcher_event(&event);
            changed(&event)
        };
        let steps = [
            (watcher::Event::Init, false),
            (watcher::Event::InitApply(node("node-a", "1")), false),
            (watcher::Event::InitApply(node("node-b", "2")), false),
            (watcher::Event::InitDone, true),
            (watcher::Event::Apply(node("node-a", "3")), false),
            (watcher::Event::Apply(node("node-c", "4")), true),
            (watcher::Event::Delete(node("node-b", "5")), true),
            (watcher::Event::Delete(node("node-b", "5")), false),
            // A re-list with the same nodes is no change; one without node-c is.
            (watcher::Event::Init, false),
            (watcher::Event::InitApply(node("node-a", "6")), false),
            (watcher::Event::InitApply(node("node-c", "7")), false),
            (watcher::Event::InitDone, false),
            (watcher::Event::Init, false),
            (watcher::Event::InitApply(node("node-a", "8")), false),
            (watcher::Event::InitDone, true),
        ];
        for (i, (event, want)) in steps.into_iter().enumerate() {
            let what = event.to_string();
            assert_eq!(feed(event), want, "step {i}: {what}");
        }
    }

    #[test]
    fn other_resources_change_on_every_object_event_and_list() {
        let cm = ConfigMap::default();
        assert!(any_change(&watcher::Event::Apply(cm.clone())));
        assert!(any_change(&watcher::Event::Delete(cm.clone())));
        assert!(any_change(&watcher::Event::<ConfigMap>::InitDone));
        assert!(!any_change(&watcher::Event::<ConfigMap>::Init));
        assert!(!any_change(&watcher::Event::InitApply(cm)));
    }

    #[test]
    fn stripping_keeps_what_the_translation_reads() {
        use k8s_openapi::api::core::v1::{NodeAddress, NodeCondition, NodeSpec};
        let full = |heartbeat: &str, ready: &str| {
            let mut n = node("node-a", "1");
            n.metadata.managed_fields = Some(vec![Default::default()]);
            n.metadata.labels = Some([("edge".to_string(), "true".to_string())].into());
            n.spec = Some(NodeSpec {
                unschedulable: Some(true),
                pod_cidr: Some("198.18.64.0/24".into()),
                ..NodeSpec::default()
            });
            n.status = Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: "198.18.0.2".into(),
                }]),
                conditions: Some(vec![
                    NodeCondition {
                        type_: "Ready".into(),
                        status: ready.into(),
                        last_heartbeat_time: Some(
                            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                                heartbeat.parse().unwrap(),
                            ),
                        ),
                        ..NodeCondition::default()
                    },
                    NodeCondition {
                        type_: "MemoryPressure".into(),
                        status: "False".into(),
                        ..NodeCondition::default()
                    },
                ]),
                ..NodeStatus::default()
            });
            strip_node(&mut n);
            n
        };
        let n = full("2026-12-02T10:00:00Z", "True");
        assert_eq!(n.metadata.name.as_deref(), Some("node-a"));
        assert_eq!(n.metadata.managed_fields, Some(vec![]));
        assert_eq!(n.spec.as_ref().unwrap().unschedulable, Some(true));
        assert_eq!(n.spec.as_ref().unwrap().pod_cidr, None);
        let st = n.status.as_ref().unwrap();
        assert_eq!(st.addresses.as_ref().unwrap()[0].address, "198.18.0.2");
        let conds = st.conditions.as_ref().unwrap();
        assert_eq!(conds.len(), 1, "only Ready");
        assert_eq!(conds[0].last_heartbeat_time, None);
        // A heartbeat alone is no change; readiness is.
        assert_eq!(
            node_facts(&n),
            node_facts(&full("2026-12-02T10:05:00Z", "True"))
        );
        assert_ne!(
            node_facts(&n),
            node_facts(&full("2026-12-02T10:05:00Z", "False"))
        );
    }
}
