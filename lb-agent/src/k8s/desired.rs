//! Services + EndpointSlices → `DesiredState`, with kube-proxy's endpoint semantics. Pure:
//! plain API objects in, plain data and warnings out; the same input always gives the same
//! output, whatever the order of the input lists.
//!
//! - Ours: `spec.type: LoadBalancer` and a matching (or, unless required, absent)
//!   `spec.loadBalancerClass`.
//! - VIPs: `status.loadBalancer.ingress[].ip` and `spec.loadBalancerIP`; IPv4 only for now.
//! - Every Service port × every VIP is one `ServiceAddr`. The backends are the pod addresses
//!   of the IPv4 EndpointSlices labelled with the Service's name whose port has the Service
//!   port's name and protocol: the ready endpoints or, when none is ready, the serving
//!   terminating ones. `externalTrafficPolicy: Local` keeps only this node's endpoints.
//! - DSR delivers the packet unchanged, so a backend receives it on the Service port; a
//!   `targetPort` that differs is reported (a backend-side DNAT would be needed).
//! - Two Services on one (VIP, port, protocol): the older one (then namespace/name) wins.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet, btree_map::Entry},
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::{
    core::v1::{Node, Service, ServicePort},
    discovery::v1::EndpointSlice,
};
use lb_common::Forwarding;

use super::config::{K8sConfig, parse_forwarding};
use crate::state::{
    BackendSpec, DesiredState, NodeSpec, Protocol, ServiceAddr, ServiceSpec, default_flow_tracking,
};

/// Per-Service forwarding override: `ipip` or `l2`.
pub const FORWARDING_ANNOTATION: &str = "xdp-lb.io/forwarding";

/// The label that ties an EndpointSlice to its Service (set by the EndpointSlice controller).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Why a Service (or part of it) is not served exactly as its spec asks. The names are
/// CamelCase so they can be used as Event reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WarningReason {
    /// An IPv6 VIP: the data plane forwards IPv4 only; the VIP is skipped.
    Ipv6VipUnsupported,
    /// A VIP or endpoint address that does not parse; it is skipped.
    InvalidAddress,
    /// A port whose protocol is not TCP or UDP (SCTP); the port is skipped.
    UnsupportedProtocol,
    /// A port number outside 1-65535; the port is skipped.
    InvalidPort,
    /// Backends listen on a `targetPort` other than the Service port; DSR cannot remap it.
    TargetPortRemapped,
    /// `sessionAffinity: ClientIP` is not implemented; flows are balanced per 5-tuple.
    SessionAffinityUnsupported,
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
}

impl WarningReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            WarningReason::Ipv6VipUnsupported => "IPv6VIPUnsupported",
            WarningReason::InvalidAddress => "InvalidAddress",
            WarningReason::UnsupportedProtocol => "UnsupportedProtocol",
            WarningReason::InvalidPort => "InvalidPort",
            WarningReason::TargetPortRemapped => "TargetPortRemapped",
            WarningReason::SessionAffinityUnsupported => "SessionAffinityUnsupported",
            WarningReason::InvalidSourceRange => "InvalidSourceRange",
            WarningReason::InvalidAnnotation => "InvalidAnnotation",
            WarningReason::AddressConflict => "AddressConflict",
            WarningReason::UnknownNode => "UnknownNode",
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
    let mut b = Builder {
        cfg,
        this_node,
        node_known: nodes
            .iter()
            .any(|n| n.borrow().metadata.name.as_deref() == Some(this_node)),
        slices: index_slices(slices.iter().map(Borrow::borrow)),
        state: DesiredState {
            node: NodeSpec {
                interface: cfg.interface.clone(),
                encap_source: cfg.encap_source,
                ..NodeSpec::default()
            },
            services: BTreeMap::new(),
        },
        owners: BTreeMap::new(),
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
    (b.state, b.warnings)
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

/// IPv4 EndpointSlices by (namespace, Service name).
fn index_slices<'a>(
    slices: impl Iterator<Item = &'a EndpointSlice>,
) -> BTreeMap<(&'a str, &'a str), Vec<&'a EndpointSlice>> {
    let mut index: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        // IPv6 slices serve IPv6 VIPs (not supported yet); FQDN slices are not for proxies.
        if slice.address_type != "IPv4" {
            continue;
        }
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
            .entry((namespace, service.as_str()))
            .or_default()
            .push(slice);
    }
    index
}

struct Builder<'a> {
    cfg: &'a K8sConfig,
    this_node: &'a str,
    node_known: bool,
    slices: BTreeMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
    state: DesiredState,
    /// Which Service ("namespace/name") holds each address.
    owners: BTreeMap<ServiceAddr, String>,
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

        if spec.session_affinity.as_deref() == Some("ClientIP") {
            self.warn(
                &cur,
                WarningReason::SessionAffinityUnsupported,
                "sessionAffinity ClientIP is not supported yet: connections are balanced per flow"
                    .into(),
            );
        }
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
            // No address yet (or only IPv6): nothing to serve.
            return;
        }

        for port in spec.ports.iter().flatten() {
            self.add_port(&cur, port, &vips, forwarding, local, &ranges);
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
                        "annotation {FORWARDING_ANNOTATION}: unknown forwarding {value:?} (ipip or l2); using {}",
                        default.name()
                    ),
                );
                default
            }
        }
    }

    /// The Service's IPv4 VIPs, deduplicated; warns about the others.
    fn vips(&mut self, svc: &Service, cur: &Current<'_>) -> BTreeSet<Ipv4Addr> {
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
                Ok(IpAddr::V4(v4)) => {
                    vips.insert(v4);
                }
                Ok(IpAddr::V6(v6)) => self.warn(
                    cur,
                    WarningReason::Ipv6VipUnsupported,
                    format!("VIP {v6}: IPv6 VIPs are not supported yet; skipped"),
                ),
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
        vips: &BTreeSet<Ipv4Addr>,
        forwarding: Forwarding,
        local: bool,
        ranges: &[ipnet::IpNet],
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

        let selected = self.select_endpoints(cur, port_name, protocol_name, local);
        let remapped: BTreeSet<u16> = selected
            .values()
            .copied()
            .filter(|&target| target != number)
            .collect();
        if !remapped.is_empty() {
            let list = remapped
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            self.warn(
                cur,
                WarningReason::TargetPortRemapped,
                format!(
                    "port {label}: backends listen on {list} but DSR delivers packets unchanged to port {number}; \
                     they must also accept port {number} (port remapping is not supported yet)"
                ),
            );
        }
        let backends: BTreeMap<IpAddr, BackendSpec> = selected
            .keys()
            .map(|&addr| {
                (
                    IpAddr::V4(addr),
                    BackendSpec {
                        weight: 1,
                        mac: None,
                    },
                )
            })
            .collect();

        let owner = format!("{}/{}", cur.namespace, cur.name);
        for &vip in vips {
            let addr = ServiceAddr {
                vip: IpAddr::V4(vip),
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
                Entry::Vacant(slot) => {
                    slot.insert(owner.clone());
                    self.state.services.insert(
                        addr,
                        ServiceSpec {
                            name: format!("{owner}:{label}"),
                            forwarding,
                            table_size: None,
                            flow_tracking: default_flow_tracking(protocol),
                            // The VIPs are IPv4: their ranges are the IPv4 ones (a list
                            // with no IPv4 entry admits no IPv4 client).
                            // Kubernetes has no notion of fragments: dropped, as
                            // kube-proxy's conntrack-less paths would.
                            fragments: false,
                            source_ranges: (!ranges.is_empty()).then(|| {
                                ranges
                                    .iter()
                                    .filter(|n| n.addr().is_ipv4())
                                    .copied()
                                    .collect()
                            }),
                            backends: backends.clone(),
                        },
                    );
                }
            }
        }
    }

    /// The endpoints for one Service port: address → the port the slice gives for it.
    /// kube-proxy's rule: the ready endpoints (after the node filter of
    /// `externalTrafficPolicy: Local`); if there are none, the serving terminating ones.
    fn select_endpoints(
        &mut self,
        cur: &Current<'_>,
        port_name: &str,
        protocol: &str,
        local: bool,
    ) -> BTreeMap<Ipv4Addr, u16> {
        let mut ready = BTreeMap::new();
        let mut terminating = BTreeMap::new();
        let mut bad = Vec::new();
        let slices = self
            .slices
            .get(&(cur.namespace, cur.name))
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
                if local && ep.node_name.as_deref() != Some(self.this_node) {
                    continue;
                }
                // Consumers use the first address (the API allows exactly one for IPv4).
                let Some(text) = ep.addresses.first() else {
                    continue;
                };
                let Ok(addr) = text.parse::<Ipv4Addr>() else {
                    bad.push(text.clone());
                    continue;
                };
                // nil ready/serving mean "unknown, treat as ready"; nil terminating: not.
                let c = ep.conditions.as_ref();
                let is_ready = c.and_then(|c| c.ready).unwrap_or(true);
                let is_serving = c.and_then(|c| c.serving).unwrap_or(true);
                let is_terminating = c.and_then(|c| c.terminating).unwrap_or(false);
                if is_ready {
                    ready.insert(addr, target);
                } else if is_serving && is_terminating {
                    terminating.insert(addr, target);
                }
            }
        }
        bad.sort();
        bad.dedup();
        for text in bad {
            self.warn(
                cur,
                WarningReason::InvalidAddress,
                format!("endpoint address {text:?} in an IPv4 EndpointSlice is not IPv4; skipped"),
            );
        }
        if ready.is_empty() { terminating } else { ready }
    }
}
