//! Services + EndpointSlices → `DesiredState`, with kube-proxy's endpoint semantics. Pure:
//! plain API objects in, plain data and warnings out; the same input always gives the same
//! output, whatever the order of the input lists.
//!
//! - Ours: `spec.type: LoadBalancer` and a matching (or, unless required, absent)
//!   `spec.loadBalancerClass`.
//! - VIPs: `status.loadBalancer.ingress[].ip` and `spec.loadBalancerIP`, IPv4 and IPv6.
//! - Every Service port × every VIP is one `ServiceAddr`. The backends are the pod addresses
//!   of the EndpointSlices of the VIP's family labelled with the Service's name whose port
//!   has the Service port's name and protocol: the ready endpoints or, when none is ready,
//!   the serving terminating ones. `externalTrafficPolicy: Local` keeps only this node's
//!   endpoints.
//! - DSR to pods: the load-balancing node tunnels the client's packet to the pod address; the
//!   pod's node (this agent, there) decapsulates it and translates VIP:port to
//!   pod:targetPort (`DesiredState::local_endpoints`), and restores VIP:port on the replies.
//!   So `targetPort` may differ from `port` (by number or by name), and pods need nothing.
//!   With `l2` forwarding the packet reaches the backend unchanged: the backend must own the
//!   VIP and listen on the Service port, and a different `targetPort` is reported.
//! - `sessionAffinity: ClientIP`: each client keeps its backend for
//!   `sessionAffinityConfig.clientIP.timeoutSeconds` (default 10800) after its last packet.
//! - Route weights (`DesiredState::announce`): 1 per VIP on every node, except that a VIP
//!   whose Services use `externalTrafficPolicy: Local` weighs as many as this node has local
//!   endpoints for it (the largest count over its ports), so weighted ECMP towards the nodes
//!   gives every pod the same share; 0 means "do not announce from here".
//! - Two Services on one (VIP, port, protocol): the older one (then namespace/name) wins.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    fmt,
    net::IpAddr,
};

use k8s_openapi::api::{
    core::v1::{Node, Service, ServicePort},
    discovery::v1::EndpointSlice,
};
use lb_common::{
    Forwarding, maglev,
    maps::{MAX_BACKENDS, MAX_SERVICES},
};

use super::config::{K8sConfig, PodTunnel, parse_forwarding};
use crate::state::{
    BackendSpec, DesiredState, LocalEndpoint, NodeSpec, Protocol, ServiceAddr, ServiceSpec,
    default_flow_tracking, not_unicast,
};

/// Session affinity timeout when a Service sets none (Kubernetes' default, 3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// Per-Service forwarding override: `ipip` or `l2`.
pub const FORWARDING_ANNOTATION: &str = "xdp-lb.io/forwarding";

/// Which Service ports take the fragments of their VIP and protocol: `true` (the first port
/// of each protocol), `false`, or a comma-separated list of port names or numbers.
pub const FRAGMENTS_ANNOTATION: &str = "xdp-lb.io/fragments";

/// The label that ties an EndpointSlice to its Service (set by the EndpointSlice controller).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Why a Service (or part of it) is not served exactly as its spec asks. The names are
/// CamelCase so they can be used as Event reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WarningReason {
    /// A VIP or endpoint address that does not parse; it is skipped.
    InvalidAddress,
    /// A port whose protocol is not TCP or UDP (SCTP); the port is skipped.
    UnsupportedProtocol,
    /// A port number outside 1-65535; the port is skipped.
    InvalidPort,
    /// Backends listen on a `targetPort` other than the Service port, and the Service uses
    /// `l2` forwarding, which delivers packets unchanged (no translation possible).
    TargetPortRemapped,
    /// `sessionAffinityConfig.clientIP.timeoutSeconds` outside 1-86400; the default is used.
    InvalidAffinityTimeout,
    /// A `loadBalancerSourceRanges` entry that is not a CIDR; it is skipped (the others are
    /// enforced).
    InvalidSourceRange,
    /// The forwarding annotation has an unknown value; the default forwarding is used.
    InvalidAnnotation,
    /// Another (older) Service already uses this VIP, port and protocol; this port is skipped.
    AddressConflict,
    /// `externalTrafficPolicy: Local`, but this node is not among the Nodes: no endpoint can
    /// be local (usually a wrong `NODE_NAME`).
    UnknownNode,
    /// The Service asks for the fragments of a VIP and protocol another (older) Service
    /// already takes; its fragments stay with that one.
    FragmentsConflict,
    /// The port does not fit in the data plane (its tables are full, or it has more endpoints
    /// than the largest Maglev table has slots); the port is skipped, older Services keep
    /// theirs.
    CapacityExceeded,
}

impl WarningReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            WarningReason::InvalidAddress => "InvalidAddress",
            WarningReason::UnsupportedProtocol => "UnsupportedProtocol",
            WarningReason::InvalidPort => "InvalidPort",
            WarningReason::TargetPortRemapped => "TargetPortRemapped",
            WarningReason::InvalidAffinityTimeout => "InvalidAffinityTimeout",
            WarningReason::InvalidSourceRange => "InvalidSourceRange",
            WarningReason::InvalidAnnotation => "InvalidAnnotation",
            WarningReason::AddressConflict => "AddressConflict",
            WarningReason::UnknownNode => "UnknownNode",
            WarningReason::FragmentsConflict => "FragmentsConflict",
            WarningReason::CapacityExceeded => "CapacityExceeded",
        }
    }
}

impl fmt::Display for WarningReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something about one Service the operator should know; the rest of the Service (and every
/// other Service) is still served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub namespace: String,
    pub name: String,
    pub reason: WarningReason,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "service {}/{}: {}",
            self.namespace, self.name, self.message
        )
    }
}

/// Is this Service ours to serve: `type: LoadBalancer` with our class, or without a class
/// unless `cfg.require_class`.
pub fn is_ours(svc: &Service, cfg: &K8sConfig) -> bool {
    let Some(spec) = &svc.spec else {
        return false;
    };
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return false;
    }
    match spec.load_balancer_class.as_deref() {
        None => !cfg.require_class,
        Some(class) => cfg.load_balancer_class.as_deref() == Some(class),
    }
}

/// The data-plane state these API objects ask for on node `this_node`, and what could not be
/// honoured. `nodes` is used to tell whether `this_node` exists (for `externalTrafficPolicy:
/// Local`).
///
/// The lists may hold the objects or anything that borrows as them (`Arc<Service>` from a
/// reflector store), so a live watch does not copy its stores.
pub fn desired_state<S, E, N>(
    services: &[S],
    slices: &[E],
    nodes: &[N],
    cfg: &K8sConfig,
    this_node: &str,
) -> (DesiredState, Vec<Warning>)
where
    S: Borrow<Service>,
    E: Borrow<EndpointSlice>,
    N: Borrow<Node>,
{
    desired_state_with_pools(services, slices, nodes, &[], cfg, this_node)
}

/// [`desired_state`] with the valid address pools, whose `spec.announce` limits which
/// Nodes announce their addresses and sets their BGP attributes.
pub fn desired_state_with_pools<S, E, N>(
    services: &[S],
    slices: &[E],
    nodes: &[N],
    pools: &[crate::ipam::Pool],
    cfg: &K8sConfig,
    this_node: &str,
) -> (DesiredState, Vec<Warning>)
where
    S: Borrow<Service>,
    E: Borrow<EndpointSlice>,
    N: Borrow<Node>,
{
    let mut b = Builder {
        cfg,
        this_node,
        node_known: nodes
            .iter()
            .any(|n| n.borrow().metadata.name.as_deref() == Some(this_node)),
        node_addrs: nodes
            .iter()
            .filter_map(|n| {
                let n = n.borrow();
                let addrs = n
                    .status
                    .as_ref()?
                    .addresses
                    .as_ref()?
                    .iter()
                    .filter(|a| a.type_ == "InternalIP")
                    .filter_map(|a| a.address.parse::<IpAddr>().ok())
                    .collect();
                Some((n.metadata.name.as_deref()?, addrs))
            })
            .collect(),
        slices: index_slices(slices.iter().map(Borrow::borrow)),
        state: DesiredState {
            node: NodeSpec {
                announce: crate::announce::AnnounceSpec {
                    nodes: announcing_nodes(nodes.iter().map(Borrow::borrow), cfg),
                    node_name: Some(this_node.to_string()),
                    from_cluster: true,
                    ..cfg.node.announce.clone()
                },
                ..cfg.node.clone()
            },
            services: BTreeMap::new(),
            local_endpoints: BTreeMap::new(),
            announce: BTreeMap::new(),
            l2_owned: Default::default(),
            announce_nodes: Default::default(),
            announce_routes: Default::default(),
            vip_services: Default::default(),
            weighted: Default::default(),
            decap_sources: decap_sources(nodes.iter().map(Borrow::borrow)),
            node_addresses: Default::default(),
            pod_nodes: Default::default(),
        },
        owners: BTreeMap::new(),
        backend_entries: 0,
        fragment_owners: BTreeMap::new(),
        warnings: Vec::new(),
    };
    // Oldest first, so it wins every address conflict; a Service without a timestamp (never
    // from a real API server) counts as the newest.
    let mut ours: Vec<&Service> = services
        .iter()
        .map(Borrow::borrow)
        .filter(|s| is_ours(s, cfg))
        .collect();
    ours.sort_by(|a, b| age_key(a).cmp(&age_key(b)));
    for svc in ours {
        b.add_service(svc);
    }
    let mut state = b.state;
    apply_pools(&mut state, nodes.iter().map(Borrow::borrow), pools);
    (state, b.warnings)
}

/// Per VIP, its pool's announcement settings: only the Nodes its node selector admits
/// may announce it (on top of `externalTrafficPolicy: Local`), and its BGP attributes.
fn apply_pools<'a>(
    state: &mut DesiredState,
    nodes: impl Iterator<Item = &'a Node>,
    pools: &[crate::ipam::Pool],
) {
    if pools.is_empty() {
        return;
    }
    let labelled: Vec<(String, BTreeMap<String, String>)> = nodes
        .filter_map(|n| {
            Some((
                n.metadata.name.clone()?,
                n.metadata.labels.clone().unwrap_or_default(),
            ))
        })
        .collect();
    let vips: BTreeSet<IpAddr> = state.services.keys().map(|a| a.vip).collect();
    for vip in vips {
        let Some(pool) = pools.iter().find(|p| p.in_range(vip)) else {
            continue;
        };
        if let Some(sel) = &pool.announce.node_selector {
            let admitted: BTreeSet<String> = labelled
                .iter()
                .filter(|(_, labels)| sel.matches(labels))
                .map(|(name, _)| name.clone())
                .collect();
            let entry = state.announce_nodes.entry(vip);
            match entry {
                Entry::Occupied(mut o) => o.get_mut().retain(|n| admitted.contains(n)),
                Entry::Vacant(v) => {
                    v.insert(admitted);
                }
            }
        }
        if let Some(route) = &pool.announce.route {
            state.announce_routes.insert(vip, route.clone());
        }
    }
}

/// Label that takes a Node out of every external load balancer (Kubernetes' own).
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// Who may send this node tunnel packets: every Node (the agent runs on all of them, and any
/// may balance a VIP to a pod here, whether it announces or not), by all its InternalIPs.
pub fn decap_sources<'a>(nodes: impl Iterator<Item = &'a Node>) -> BTreeSet<ipnet::IpNet> {
    nodes
        .filter_map(|n| n.status.as_ref()?.addresses.as_ref())
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .map(ipnet::IpNet::from)
        .collect()
}

/// The Nodes that may announce VIPs, with the address their heartbeats come from: Ready,
/// schedulable (a cordoned, draining node withdraws first), not excluded by
/// [`EXCLUDE_LABEL`], matching the configured node selector, and with an InternalIP.
pub fn announcing_nodes<'a>(
    nodes: impl Iterator<Item = &'a Node>,
    cfg: &K8sConfig,
) -> Vec<crate::announce::Peer> {
    let mut out: Vec<crate::announce::Peer> = nodes
        .filter(|n| {
            let labels = n.metadata.labels.as_ref();
            let has = |k: &str, v: &str| labels.and_then(|l| l.get(k)).is_some_and(|x| x == v);
            let ready = n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            let cordoned = n
                .spec
                .as_ref()
                .and_then(|s| s.unschedulable)
                .unwrap_or(false);
            let excluded = labels.is_some_and(|l| l.contains_key(EXCLUDE_LABEL));
            ready
                && !cordoned
                && !excluded
                && cfg.announce_node_selector.iter().all(|(k, v)| has(k, v))
        })
        .filter_map(|n| {
            let addrs = n.status.as_ref()?.addresses.as_ref()?;
            let internal: Vec<IpAddr> = addrs
                .iter()
                .filter(|a| a.type_ == "InternalIP")
                .filter_map(|a| a.address.parse().ok())
                .collect();
            // IPv4 first: the heartbeats of a dual-stack cluster use one family.
            let address = internal
                .iter()
                .find(|a| a.is_ipv4())
                .or(internal.first())
                .copied()?;
            Some(crate::announce::Peer {
                name: n.metadata.name.clone()?,
                address,
            })
        })
        .collect();
    out.sort();
    out
}

type AgeKey<'a> = (
    bool,
    Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    &'a str,
    &'a str,
);

fn age_key(svc: &Service) -> AgeKey<'_> {
    let m = &svc.metadata;
    (
        m.creation_timestamp.is_none(),
        m.creation_timestamp.as_ref(),
        m.namespace.as_deref().unwrap_or_default(),
        m.name.as_deref().unwrap_or_default(),
    )
}

/// Slices of one Service and one address family: (namespace, Service name, IPv6?).
type SliceIndex<'a> = BTreeMap<(&'a str, &'a str, bool), Vec<&'a EndpointSlice>>;

/// IPv4 and IPv6 EndpointSlices by (namespace, Service name, family).
fn index_slices<'a>(slices: impl Iterator<Item = &'a EndpointSlice>) -> SliceIndex<'a> {
    let mut index: SliceIndex<'a> = BTreeMap::new();
    for slice in slices {
        // FQDN slices are not for proxies.
        let v6 = match slice.address_type.as_str() {
            "IPv4" => false,
            "IPv6" => true,
            _ => continue,
        };
        let Some(service) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let namespace = slice.metadata.namespace.as_deref().unwrap_or_default();
        index
            .entry((namespace, service.as_str(), v6))
            .or_default()
            .push(slice);
    }
    index
}

struct Builder<'a> {
    cfg: &'a K8sConfig,
    this_node: &'a str,
    node_known: bool,
    /// Every Node's InternalIPs, by name: where its pods are tunnelled to
    /// (`pod_tunnel: node`).
    node_addrs: BTreeMap<&'a str, Vec<IpAddr>>,
    slices: SliceIndex<'a>,
    state: DesiredState,
    /// Which Service ("namespace/name") holds each address.
    owners: BTreeMap<ServiceAddr, String>,
    /// Backend entries so far, against `LB_BACKENDS`'s capacity.
    backend_entries: usize,
    /// Which Service ("namespace/name") takes the fragments of each VIP and protocol.
    fragment_owners: BTreeMap<(IpAddr, Protocol), String>,
    warnings: Vec<Warning>,
}

/// One Service being added: its identity, for warnings and names.
struct Current<'a> {
    namespace: &'a str,
    name: &'a str,
}

impl Builder<'_> {
    /// Record a warning once per Service (a slice problem shows up for every port).
    fn warn(&mut self, svc: &Current<'_>, reason: WarningReason, message: String) {
        let warning = Warning {
            namespace: svc.namespace.to_string(),
            name: svc.name.to_string(),
            reason,
            message,
        };
        let repeated = self
            .warnings
            .iter()
            .rev()
            .take_while(|w| w.namespace == warning.namespace && w.name == warning.name)
            .any(|w| *w == warning);
        if !repeated {
            self.warnings.push(warning);
        }
    }

    fn add_service(&mut self, svc: &Service) {
        let Some(spec) = &svc.spec else {
            return;
        };
        let cur = Current {
            namespace: svc.metadata.namespace.as_deref().unwrap_or_default(),
            name: svc.metadata.name.as_deref().unwrap_or_default(),
        };

        let affinity = (spec.session_affinity.as_deref() == Some("ClientIP"))
            .then(|| self.affinity_timeout(spec, &cur));
        // loadBalancerSourceRanges: enforced in the data plane (clients outside are dropped).
        let mut ranges = Vec::new();
        for r in spec.load_balancer_source_ranges.iter().flatten() {
            match r.trim().parse::<ipnet::IpNet>() {
                Ok(net) => ranges.push(net.trunc()),
                Err(_) => self.warn(
                    &cur,
                    WarningReason::InvalidSourceRange,
                    format!("loadBalancerSourceRanges: {r:?} is not a CIDR; skipped"),
                ),
            }
        }

        let forwarding = self.forwarding(svc, &cur);
        let local = spec.external_traffic_policy.as_deref() == Some("Local");
        if local && !self.node_known {
            self.warn(
                &cur,
                WarningReason::UnknownNode,
                format!(
                    "externalTrafficPolicy Local: this node {:?} is not a known Node (check NODE_NAME), so no endpoint is local",
                    self.this_node
                ),
            );
        }

        let vips = self.vips(svc, &cur);
        if vips.is_empty() {
            // No address yet: nothing to serve.
            return;
        }

        for vip in &vips {
            self.state
                .vip_services
                .entry(*vip)
                .or_default()
                .insert(crate::state::ServiceRef {
                    namespace: cur.namespace.to_string(),
                    name: cur.name.to_string(),
                    uid: svc.metadata.uid.clone(),
                });
        }
        let fragments = self.fragment_ports(svc, &cur);
        let how = Serving {
            forwarding,
            local,
            ranges: &ranges,
            affinity,
            fragments: &fragments,
        };
        for port in spec.ports.iter().flatten() {
            self.add_port(&cur, port, &vips, &how);
        }
    }

    /// The affinity timeout a Service asks for (Kubernetes' default when unset).
    fn affinity_timeout(
        &mut self,
        spec: &k8s_openapi::api::core::v1::ServiceSpec,
        cur: &Current<'_>,
    ) -> u32 {
        let asked = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds);
        match asked {
            None => DEFAULT_AFFINITY_TIMEOUT_S,
            Some(s) if (1..=crate::config::MAX_AFFINITY_SECONDS as i32).contains(&s) => s as u32,
            Some(s) => {
                self.warn(
                    cur,
                    WarningReason::InvalidAffinityTimeout,
                    format!(
                        "sessionAffinityConfig.clientIP.timeoutSeconds {s} is not 1-86400; using {DEFAULT_AFFINITY_TIMEOUT_S}"
                    ),
                );
                DEFAULT_AFFINITY_TIMEOUT_S
            }
        }
    }

    fn forwarding(&mut self, svc: &Service, cur: &Current<'_>) -> Forwarding {
        let Some(value) = svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(FORWARDING_ANNOTATION))
        else {
            return self.cfg.default_forwarding;
        };
        match parse_forwarding(value.trim()) {
            Some(f) => f,
            None => {
                let default = self.cfg.default_forwarding;
                self.warn(
                    cur,
                    WarningReason::InvalidAnnotation,
                    format!(
                        "annotation {FORWARDING_ANNOTATION}: unknown forwarding {value:?} (ipip, gue or l2); using {}",
                        default.name()
                    ),
                );
                default
            }
        }
    }

    /// The ports (number and protocol) that take the fragments of the Service's VIPs, as
    /// `FRAGMENTS_ANNOTATION` says: at most one per protocol.
    fn fragment_ports(&mut self, svc: &Service, cur: &Current<'_>) -> BTreeSet<(u16, Protocol)> {
        let mut out = BTreeSet::new();
        let Some(value) = svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(FRAGMENTS_ANNOTATION))
        else {
            return out;
        };
        let ports: Vec<(&str, u16, Protocol)> = svc
            .spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .filter_map(|p| {
                let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
                    "TCP" => Protocol::Tcp,
                    "UDP" => Protocol::Udp,
                    _ => return None,
                };
                let number = u16::try_from(p.port).ok().filter(|&n| n != 0)?;
                Some((p.name.as_deref().unwrap_or_default(), number, protocol))
            })
            .collect();
        let value = value.trim();
        let all = value.eq_ignore_ascii_case("true");
        let chosen: Vec<(u16, Protocol)> = match value {
            _ if value.is_empty() || value.eq_ignore_ascii_case("false") => return out,
            // The first port of each protocol.
            _ if all => ports.iter().map(|&(_, n, p)| (n, p)).collect(),
            list => {
                let mut chosen = Vec::new();
                for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                    let found = ports
                        .iter()
                        .find(|(name, number, _)| *name == item || number.to_string() == item);
                    match found {
                        Some(&(_, n, p)) => chosen.push((n, p)),
                        None => self.warn(
                            cur,
                            WarningReason::InvalidAnnotation,
                            format!(
                                "annotation {FRAGMENTS_ANNOTATION}: {item:?} is not a TCP or UDP port of the Service (true, false, or port names or numbers); ignored"
                            ),
                        ),
                    }
                }
                chosen
            }
        };
        for (number, protocol) in chosen {
            if out.iter().any(|&(_, p)| p == protocol) {
                // `true` names the first port of each protocol silently; a list that names
                // two is told.
                if !all {
                    self.warn(
                        cur,
                        WarningReason::InvalidAnnotation,
                        format!(
                            "annotation {FRAGMENTS_ANNOTATION}: port {number} is a second {} port; the fragments of a VIP go to one port per protocol, ignored",
                            protocol.name()
                        ),
                    );
                }
                continue;
            }
            out.insert((number, protocol));
        }
        out
    }

    /// Let the Service take the fragments of (`vip`, `protocol`) unless an older one does.
    fn claim_fragments(&mut self, cur: &Current<'_>, vip: IpAddr, protocol: Protocol) -> bool {
        let owner = format!("{}/{}", cur.namespace, cur.name);
        match self.fragment_owners.entry((vip, protocol)) {
            Entry::Vacant(slot) => {
                slot.insert(owner);
                true
            }
            Entry::Occupied(holder) if *holder.get() == owner => true,
            Entry::Occupied(holder) => {
                let message = format!(
                    "annotation {FRAGMENTS_ANNOTATION}: the {} fragments of {vip} already go to service {}; not to this one",
                    protocol.name(),
                    holder.get()
                );
                self.warn(cur, WarningReason::FragmentsConflict, message);
                false
            }
        }
    }

    /// The Service's VIPs, deduplicated; warns about addresses that do not parse.
    fn vips(&mut self, svc: &Service, cur: &Current<'_>) -> BTreeSet<IpAddr> {
        let from_status = svc
            .status
            .iter()
            .filter_map(|s| s.load_balancer.as_ref())
            .flat_map(|lb| lb.ingress.iter().flatten())
            .filter_map(|ingress| ingress.ip.as_deref());
        let from_spec = svc
            .spec
            .iter()
            .filter_map(|s| s.load_balancer_ip.as_deref());
        let mut seen = BTreeSet::new();
        let mut vips = BTreeSet::new();
        for text in from_status.chain(from_spec) {
            let text = text.trim();
            if text.is_empty() || !seen.insert(text) {
                continue;
            }
            match text.parse::<IpAddr>() {
                Ok(ip) if not_unicast(ip).is_some() => self.warn(
                    cur,
                    WarningReason::InvalidAddress,
                    format!(
                        "VIP {ip} is {}, not a unicast address; skipped",
                        not_unicast(ip).unwrap_or_default()
                    ),
                ),
                Ok(ip) => {
                    vips.insert(ip);
                }
                Err(_) => self.warn(
                    cur,
                    WarningReason::InvalidAddress,
                    format!("VIP {text:?} is not an IP address; skipped"),
                ),
            }
        }
        vips
    }

    fn add_port(
        &mut self,
        cur: &Current<'_>,
        port: &ServicePort,
        vips: &BTreeSet<IpAddr>,
        how: &Serving<'_>,
    ) {
        let port_name = port.name.as_deref().unwrap_or_default();
        let label = if port_name.is_empty() {
            port.port.to_string()
        } else {
            port_name.to_string()
        };
        let protocol_name = port.protocol.as_deref().unwrap_or("TCP");
        let protocol = match protocol_name {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                self.warn(
                    cur,
                    WarningReason::UnsupportedProtocol,
                    format!(
                        "port {label}: protocol {other} is not supported (TCP or UDP); skipped"
                    ),
                );
                return;
            }
        };
        let Some(number) = u16::try_from(port.port).ok().filter(|&p| p != 0) else {
            self.warn(
                cur,
                WarningReason::InvalidPort,
                format!("port {label}: {} is not a port number; skipped", port.port),
            );
            return;
        };

        let owner = format!("{}/{}", cur.namespace, cur.name);
        for &vip in vips {
            let selected =
                self.select_endpoints(cur, port_name, protocol_name, how.local, vip.is_ipv6());
            // Route weight of this node for the VIP: with only local endpoints in use, their
            // number, so each pod behind an announcing node gets an even share.
            let weight = if how.local {
                u32::try_from(selected.len()).unwrap_or(u32::MAX)
            } else {
                1
            };
            let w = self.state.announce.entry(vip).or_insert(0);
            *w = (*w).max(weight);
            if how.local {
                self.state.weighted.insert(vip);
                // Only nodes with an endpoint may announce (or, in L2, own) the VIP.
                let with_endpoints =
                    self.endpoint_nodes(cur, port_name, protocol_name, vip.is_ipv6());
                self.state
                    .announce_nodes
                    .entry(vip)
                    .or_default()
                    .extend(with_endpoints);
            }
            if how.forwarding == Forwarding::L2 {
                self.warn_remapped(cur, &label, number, &selected);
            }
            let addr = ServiceAddr {
                vip,
                port: number,
                protocol,
            };
            match self.owners.entry(addr) {
                Entry::Occupied(holder) => {
                    let message = format!(
                        "port {label}: {addr} is already used by service {}; not served for this one",
                        holder.get()
                    );
                    self.warn(cur, WarningReason::AddressConflict, message);
                }
                // One message per Service, not per port: thousands of ports are one warning.
                Entry::Vacant(_) if self.state.services.len() >= MAX_SERVICES as usize => {
                    let message = format!(
                        "ports not served: the data plane holds at most {MAX_SERVICES} service ports, taken by older Services"
                    );
                    self.warn(cur, WarningReason::CapacityExceeded, message);
                }
                Entry::Vacant(_) if selected.len() > maglev::MAX_TABLE_SIZE as usize => {
                    let message = format!(
                        "port {label}: {addr} not served: {} endpoints, more than the {} slots of the largest Maglev table",
                        selected.len(),
                        maglev::MAX_TABLE_SIZE
                    );
                    self.warn(cur, WarningReason::CapacityExceeded, message);
                }
                Entry::Vacant(_)
                    if self.backend_entries + selected.len() > MAX_BACKENDS as usize =>
                {
                    let message = format!(
                        "ports not served: their endpoints would take the data plane past {MAX_BACKENDS} backend entries"
                    );
                    self.warn(cur, WarningReason::CapacityExceeded, message);
                }
                Entry::Vacant(slot) => {
                    slot.insert(owner.clone());
                    self.backend_entries += selected.len();
                    let fragments = how.fragments.contains(&(number, protocol))
                        && self.claim_fragments(cur, vip, protocol);
                    let backends: BTreeMap<IpAddr, BackendSpec> = selected
                        .keys()
                        .map(|&ip| {
                            (
                                ip,
                                BackendSpec {
                                    weight: 1,
                                    mac: None,
                                },
                            )
                        })
                        .collect();
                    for (&backend, ep) in &selected {
                        if let Some(node) = ep.via {
                            self.state.pod_nodes.insert(backend, node);
                        }
                        if ep.on_this_node {
                            self.state.local_endpoints.insert(
                                LocalEndpoint {
                                    service: addr,
                                    backend,
                                },
                                ep.target_port,
                            );
                        }
                    }
                    self.state.services.insert(
                        addr,
                        ServiceSpec {
                            name: format!("{owner}:{label}"),
                            forwarding: how.forwarding,
                            table_size: None,
                            flow_tracking: default_flow_tracking(protocol),
                            // Without the annotation, fragments to the VIP are dropped.
                            fragments,
                            affinity_timeout_s: how.affinity,
                            // The VIP's family's ranges (a list with no entry of that
                            // family admits no client).
                            source_ranges: (!how.ranges.is_empty()).then(|| {
                                how.ranges
                                    .iter()
                                    .filter(|n| n.addr().is_ipv6() == vip.is_ipv6())
                                    .copied()
                                    .collect()
                            }),
                            backends,
                        },
                    );
                }
            }
        }
    }

    /// With `l2` forwarding nothing translates the port: report backends that listen on
    /// another one.
    fn warn_remapped(
        &mut self,
        cur: &Current<'_>,
        label: &str,
        number: u16,
        selected: &BTreeMap<IpAddr, Endpoint>,
    ) {
        let remapped: BTreeSet<u16> = selected
            .values()
            .map(|ep| ep.target_port)
            .filter(|&target| target != number)
            .collect();
        if remapped.is_empty() {
            return;
        }
        let list = remapped
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        self.warn(
            cur,
            WarningReason::TargetPortRemapped,
            format!(
                "port {label}: backends listen on {list} but l2 forwarding delivers packets unchanged to port {number}; \
                 they must also accept port {number} (use ipip or gue forwarding to translate)"
            ),
        );
    }

    /// The endpoints of one family for one Service port. kube-proxy's rule: the ready
    /// endpoints (after the node filter of `externalTrafficPolicy: Local`); if there are
    /// none, the serving terminating ones.
    /// The nodes that use a local endpoint of this port: a ready one or, as the fallback
    /// applies per node (as in kube-proxy), a serving terminating one.
    fn endpoint_nodes(
        &mut self,
        cur: &Current<'_>,
        port_name: &str,
        protocol: &str,
        v6: bool,
    ) -> BTreeSet<String> {
        let slices = self
            .slices
            .get(&(cur.namespace, cur.name, v6))
            .map(Vec::as_slice)
            .unwrap_or_default();
        let mut nodes = BTreeSet::new();
        for slice in slices {
            let has_port = slice.ports.iter().flatten().any(|p| {
                p.name.as_deref().unwrap_or_default() == port_name
                    && p.protocol.as_deref().unwrap_or("TCP") == protocol
            });
            if !has_port {
                continue;
            }
            for ep in &slice.endpoints {
                let Some(node) = ep.node_name.clone() else {
                    continue;
                };
                let c = ep.conditions.as_ref();
                let ready = c.and_then(|c| c.ready).unwrap_or(true);
                let serving_terminating = c.and_then(|c| c.serving).unwrap_or(true)
                    && c.and_then(|c| c.terminating).unwrap_or(false);
                if ready || serving_terminating {
                    nodes.insert(node);
                }
            }
        }
        nodes
    }

    fn select_endpoints(
        &mut self,
        cur: &Current<'_>,
        port_name: &str,
        protocol: &str,
        local: bool,
        v6: bool,
    ) -> BTreeMap<IpAddr, Endpoint> {
        let mut ready = BTreeMap::new();
        let mut terminating = BTreeMap::new();
        let mut bad = Vec::new();
        let slices = self
            .slices
            .get(&(cur.namespace, cur.name, v6))
            .map(Vec::as_slice)
            .unwrap_or_default();
        for slice in slices {
            let Some(target) = slice
                .ports
                .iter()
                .flatten()
                .find(|p| {
                    p.name.as_deref().unwrap_or_default() == port_name
                        && p.protocol.as_deref().unwrap_or("TCP") == protocol
                })
                .and_then(|p| p.port)
                .and_then(|p| u16::try_from(p).ok())
                .filter(|&p| p != 0)
            else {
                continue;
            };
            for ep in &slice.endpoints {
                let on_this_node = ep.node_name.as_deref() == Some(self.this_node);
                if local && !on_this_node {
                    continue;
                }
                // Consumers use the first address (the API allows exactly one per endpoint).
                let Some(text) = ep.addresses.first() else {
                    continue;
                };
                let addr = match text.parse::<IpAddr>() {
                    Ok(a) if a.is_ipv6() == v6 && not_unicast(a).is_none() => a,
                    _ => {
                        bad.push(text.clone());
                        continue;
                    }
                };
                // nil ready/serving mean "unknown, treat as ready"; nil terminating: not.
                let c = ep.conditions.as_ref();
                let is_ready = c.and_then(|c| c.ready).unwrap_or(true);
                let is_serving = c.and_then(|c| c.serving).unwrap_or(true);
                let is_terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                // A remote pod is reached through its node's address of the pod's family.
                let via = match (self.cfg.pod_tunnel, on_this_node) {
                    (PodTunnel::Node, false) => ep
                        .node_name
                        .as_deref()
                        .and_then(|n| self.node_addrs.get(n))
                        .and_then(|addrs| addrs.iter().find(|a| a.is_ipv6() == v6))
                        .copied(),
                    _ => None,
                };
                let endpoint = Endpoint {
                    target_port: target,
                    on_this_node,
                    via,
                };
                if is_ready {
                    ready.insert(addr, endpoint);
                } else if is_serving && is_terminating {
                    terminating.insert(addr, endpoint);
                }
            }
        }
        bad.sort();
        bad.dedup();
        let family = if v6 { "IPv6" } else { "IPv4" };
        for text in bad {
            self.warn(
                cur,
                WarningReason::InvalidAddress,
                format!(
                    "endpoint address {text:?} in an {family} EndpointSlice is not a unicast {family} address; skipped"
                ),
            );
        }
        if ready.is_empty() { terminating } else { ready }
    }
}

/// How a Service's ports are served (the same for all of them).
struct Serving<'a> {
    forwarding: Forwarding,
    /// `externalTrafficPolicy: Local`.
    local: bool,
    ranges: &'a [ipnet::IpNet],
    affinity: Option<u32>,
    /// The ports that take their VIP's fragments (`FRAGMENTS_ANNOTATION`).
    fragments: &'a BTreeSet<(u16, Protocol)>,
}

/// A selected endpoint of one Service port.
#[derive(Clone, Copy)]
struct Endpoint {
    /// The port the endpoint listens on (from its slice).
    target_port: u16,
    /// It runs on this node (its packets are translated here).
    on_this_node: bool,
    /// The address of its node, when tunnels go to the node (`pod_tunnel: node`).
    via: Option<IpAddr>,
}
