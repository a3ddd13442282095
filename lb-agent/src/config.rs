//! Static configuration: a YAML file → `DesiredState`, with errors that name the file, the
//! service and the field.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use lb_common::{
    DEFAULT_GUE_PORT, Forwarding, maglev,
    maps::{MAX_BACKENDS, MAX_SERVICES},
};
use serde::Deserialize;

use crate::announce::{AnnounceMode, AnnounceSpec, MembershipSettings, Peer};
use crate::state::{
    BackendSpec, DesiredState, FlowSettings, NodeSpec, Protocol, ServiceAddr, ServiceSpec,
    default_flow_tracking, not_unicast,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: {message}")]
    Syntax { file: PathBuf, message: String },
    #[error("{file}: service {service:?}: {field}: {message}")]
    Service {
        file: PathBuf,
        service: String,
        field: String,
        message: String,
    },
    #[error("{file}: {field}: {message}")]
    Node {
        file: PathBuf,
        field: String,
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interface: Option<String>,
    encap_source: Option<String>,
    encap_source_v6: Option<String>,
    gue_port: Option<u16>,
    icmp_echo: Option<bool>,
    pmtu_icmp: Option<bool>,
    decap: Option<bool>,
    /// With `decap`: the outer sources tunnel packets are accepted from (addresses or CIDRs).
    #[serde(default)]
    decap_sources: Vec<String>,
    #[serde(default)]
    flow_table: RawFlowTable,
    /// `none` (default), `l2` or `bgp`.
    announce: Option<String>,
    node_name: Option<String>,
    #[serde(default)]
    nodes: Vec<RawNode>,
    #[serde(default)]
    membership: RawMembership,
    bgp: Option<crate::announce::bgp::RawBgp>,
    #[serde(default)]
    services: Vec<RawService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawNode {
    name: String,
    address: String,
}

/// The `membership` section (static file and ConfigMap alike).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMembership {
    port: Option<u16>,
    interval_ms: Option<u64>,
    dead_after_ms: Option<u64>,
}

/// The `flow_table` section (static file and ConfigMap alike).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFlowTable {
    size: Option<u32>,
    tcp_idle_seconds: Option<u32>,
    udp_idle_seconds: Option<u32>,
    new_flows_per_cpu_per_second: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    vip: String,
    port: u16,
    protocol: String,
    forwarding: Option<String>,
    table_size: Option<u32>,
    flow_tracking: Option<bool>,
    #[serde(default)]
    fragments: bool,
    session_affinity_seconds: Option<u32>,
    #[serde(default)]
    source_ranges: Vec<String>,
    #[serde(default)]
    backends: Vec<RawBackend>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: String,
    weight: Option<u32>,
    mac: Option<String>,
}

/// An address or CIDR (an address stands for its host prefix).
pub fn parse_net(s: &str) -> Option<ipnet::IpNet> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
        .ok()
        .map(|n| n.trunc())
}

/// The `decap_sources` field: who may send this node tunnel packets.
fn decap_sources(file: &Path, raw: &[String]) -> Result<BTreeSet<ipnet::IpNet>, ConfigError> {
    raw.iter()
        .enumerate()
        .map(|(i, r)| {
            parse_net(r).ok_or_else(|| ConfigError::Node {
                file: file.to_path_buf(),
                field: format!("decap_sources[{i}]"),
                message: format!("{r:?} is not an address or CIDR (198.18.0.2, 198.18.0.0/24)"),
            })
        })
        .collect()
}

/// The `announce`, `node_name`, `nodes`, `membership` and `bgp` fields, validated (the
/// ConfigMap has the same fields but `node_name` and `nodes`, which come from the Nodes);
/// errors are (field, message).
pub(crate) fn announce_spec(
    announce: Option<&str>,
    node_name: Option<&str>,
    raw_nodes: &[RawNode],
    m: &RawMembership,
    raw_bgp: Option<&crate::announce::bgp::RawBgp>,
) -> Result<AnnounceSpec, (String, String)> {
    let err = |field: String, message: String| (field, message);
    let mode = match announce {
        None => AnnounceMode::None,
        Some(s) => AnnounceMode::parse(s).ok_or_else(|| {
            err(
                "announce".into(),
                format!("unknown announcement {s:?} (none, l2 or bgp)"),
            )
        })?,
    };
    if node_name == Some("") {
        return Err(err("node_name".into(), "must not be empty".into()));
    }
    let mut nodes: Vec<Peer> = Vec::new();
    for (i, n) in raw_nodes.iter().enumerate() {
        let field = |f: &str| format!("nodes[{i}].{f}");
        if n.name.is_empty() || n.name.len() > 253 {
            return Err(err(field("name"), "must be 1-253 characters".into()));
        }
        let address: IpAddr = n.address.parse().map_err(|_| {
            err(
                field("address"),
                format!("{:?} is not an IP address", n.address),
            )
        })?;
        if let Some(why) = not_unicast(address) {
            return Err(err(
                field("address"),
                format!("{address} is {why}, not a node's unicast address"),
            ));
        }
        if let Some(other) = nodes.iter().find(|p| p.name == n.name) {
            return Err(err(
                field("name"),
                format!(
                    "node {:?} listed twice (also with {})",
                    n.name, other.address
                ),
            ));
        }
        if let Some(other) = nodes.iter().find(|p| p.address == address) {
            return Err(err(
                field("address"),
                format!("{address} is also node {:?}'s", other.name),
            ));
        }
        nodes.push(Peer {
            name: n.name.clone(),
            address,
        });
    }
    if let Some(me) = node_name
        && !nodes.is_empty()
        && !nodes.iter().any(|p| p.name == me)
    {
        return Err(err(
            "node_name".into(),
            format!("{me:?} is not one of `nodes`"),
        ));
    }
    let defaults = MembershipSettings::default();
    if m.port == Some(0) {
        return Err(err("membership.port".into(), "must be 1-65535".into()));
    }
    let interval = m
        .interval_ms
        .map_or(defaults.interval, Duration::from_millis);
    if !(Duration::from_millis(50)..=Duration::from_secs(10)).contains(&interval) {
        return Err(err(
            "membership.interval_ms".into(),
            "must be 50-10000".into(),
        ));
    }
    let dead_after = m
        .dead_after_ms
        .map_or(defaults.dead_after.max(interval * 3), Duration::from_millis);
    if dead_after < interval * 2 || dead_after > Duration::from_secs(60) {
        return Err(err(
            "membership.dead_after_ms".into(),
            format!(
                "must be at least twice interval_ms ({} ms) and at most 60000",
                interval.as_millis() * 2
            ),
        ));
    }
    let bgp = match (raw_bgp, mode) {
        (Some(b), AnnounceMode::Bgp) => Some(crate::announce::bgp::settings(b).map_err(|e| {
            err(
                format!("bgp.{}", e.field.trim_start_matches("bgp.")),
                e.message,
            )
        })?),
        (None, AnnounceMode::Bgp) => {
            return Err(err(
                "bgp".into(),
                "`announce: bgp` needs a `bgp` section (local_asn, peers)".into(),
            ));
        }
        (Some(_), _) => {
            return Err(err(
                "bgp".into(),
                format!("given, but `announce` is {:?}, not bgp", mode.name()),
            ));
        }
        (None, _) => None,
    };
    Ok(AnnounceSpec {
        mode,
        node_name: node_name.map(str::to_string),
        nodes,
        from_cluster: false,
        membership: MembershipSettings {
            port: m.port.unwrap_or(defaults.port),
            interval,
            dead_after,
        },
        bgp,
    })
}

/// Longest session affinity, as Kubernetes allows (`timeoutSeconds` ≤ 86400).
pub const MAX_AFFINITY_SECONDS: u32 = 86_400;

/// Largest backend weight (as IPVS): a weight is a share of the Maglev table, whose largest
/// size is 65537 slots, so larger ratios cannot be expressed anyway.
pub const MAX_WEIGHT: u32 = 65_535;

/// Read and validate a config file.
/// The node settings as read, from the static file or the ConfigMap: both sources declare
/// these keys and hand them to [`node_spec`], so they take the same values, defaults and
/// checks.
pub(crate) struct NodeFields<'a> {
    pub interface: Option<&'a str>,
    pub encap_source: Option<&'a str>,
    pub encap_source_v6: Option<&'a str>,
    pub gue_port: Option<u16>,
    pub icmp_echo: Option<bool>,
    pub pmtu_icmp: Option<bool>,
    pub flow_table: &'a RawFlowTable,
    pub announce: Option<&'a str>,
    /// Static file only (Kubernetes: the node name and the Nodes come from the cluster).
    pub node_name: Option<&'a str>,
    pub nodes: &'a [RawNode],
    pub membership: &'a RawMembership,
    pub bgp: Option<&'a crate::announce::bgp::RawBgp>,
}

/// Validate the node settings; an error is (field, message). `decap` is left off: each
/// source decides it.
pub(crate) fn node_spec(f: NodeFields<'_>) -> Result<NodeSpec, (String, String)> {
    let err = |field: &str, message: String| (field.to_string(), message);
    if f.interface == Some("") {
        return Err(err("interface", "must not be empty".into()));
    }
    let encap_source = f
        .encap_source
        .map(|s| {
            s.parse::<Ipv4Addr>()
                .map_err(|_| err("encap_source", format!("{s:?} is not an IPv4 address")))
        })
        .transpose()?;
    let encap_source_v6 = f
        .encap_source_v6
        .map(|s| {
            s.parse::<Ipv6Addr>()
                .map_err(|_| err("encap_source_v6", format!("{s:?} is not an IPv6 address")))
        })
        .transpose()?;
    if f.gue_port == Some(0) {
        return Err(err("gue_port", "must be 1-65535".into()));
    }
    Ok(NodeSpec {
        interface: f.interface.map(str::to_string),
        encap_source,
        encap_source_v6,
        gue_port: f.gue_port.unwrap_or(DEFAULT_GUE_PORT),
        icmp_echo: f.icmp_echo.unwrap_or(true),
        pmtu_icmp: f.pmtu_icmp.unwrap_or(true),
        decap: false,
        flows: flow_settings(f.flow_table)?,
        announce: announce_spec(f.announce, f.node_name, f.nodes, f.membership, f.bgp)?,
    })
}

/// `ipip`, `gue` or `l2`: a service's forwarding in the static file, the ConfigMap's
/// `default_forwarding` and the Service annotation.
pub fn parse_forwarding(s: &str) -> Option<Forwarding> {
    match s {
        "ipip" => Some(Forwarding::Ipip),
        "gue" => Some(Forwarding::Gue),
        "l2" => Some(Forwarding::L2),
        _ => None,
    }
}

pub fn load(file: &Path) -> Result<DesiredState, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    parse(file, &text)
}

/// Parse and validate config text; `file` is only used in messages.
pub fn parse(file: &Path, text: &str) -> Result<DesiredState, ConfigError> {
    let raw: RawConfig = serde_yaml_ng::from_str(text).map_err(|e| ConfigError::Syntax {
        file: file.to_path_buf(),
        message: e.to_string(),
    })?;
    let mut node = node_spec(NodeFields {
        interface: raw.interface.as_deref(),
        encap_source: raw.encap_source.as_deref(),
        encap_source_v6: raw.encap_source_v6.as_deref(),
        gue_port: raw.gue_port,
        icmp_echo: raw.icmp_echo,
        pmtu_icmp: raw.pmtu_icmp,
        flow_table: &raw.flow_table,
        announce: raw.announce.as_deref(),
        node_name: raw.node_name.as_deref(),
        nodes: &raw.nodes,
        membership: &raw.membership,
        bgp: raw.bgp.as_ref(),
    })
    .map_err(|(field, message)| ConfigError::Node {
        file: file.to_path_buf(),
        field,
        message,
    })?;
    node.decap = raw.decap.unwrap_or(false);
    let mut state = DesiredState {
        node,
        services: BTreeMap::new(),
        local_endpoints: BTreeMap::new(),
        announce: BTreeMap::new(),
        l2_owned: Default::default(),
        announce_nodes: Default::default(),
        announce_routes: Default::default(),
        vip_services: Default::default(),
        weighted: Default::default(),
        decap_sources: decap_sources(file, &raw.decap_sources)?,
        node_addresses: Default::default(),
        pod_nodes: Default::default(),
    };
    if raw.services.len() > MAX_SERVICES as usize {
        return Err(ConfigError::Node {
            file: file.to_path_buf(),
            field: "services".into(),
            message: format!(
                "{} services; at most {MAX_SERVICES} (LB_SERVICES)",
                raw.services.len()
            ),
        });
    }
    let mut names = BTreeSet::new();
    let mut backend_entries = 0usize;
    for svc in &raw.services {
        let err = |field: &str, message: String| ConfigError::Service {
            file: file.to_path_buf(),
            service: svc.name.clone(),
            field: field.into(),
            message,
        };
        if svc.name.is_empty() {
            return Err(err("name", "must not be empty".into()));
        }
        if !names.insert(svc.name.as_str()) {
            return Err(err("name", "duplicate service name".into()));
        }
        let vip: IpAddr = svc
            .vip
            .parse()
            .map_err(|_| err("vip", format!("{:?} is not an IP address", svc.vip)))?;
        if let Some(why) = not_unicast(vip) {
            return Err(err("vip", format!("{vip} is {why}, not a unicast address")));
        }
        if svc.port == 0 {
            return Err(err("port", "must be 1-65535".into()));
        }
        let protocol = match svc.protocol.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            other => {
                return Err(err(
                    "protocol",
                    format!("unknown protocol {other:?} (tcp or udp)"),
                ));
            }
        };
        let name = svc.forwarding.as_deref().unwrap_or("ipip");
        let forwarding = parse_forwarding(name).ok_or_else(|| {
            err(
                "forwarding",
                format!("unknown forwarding {name:?} (ipip, gue or l2)"),
            )
        })?;
        if svc.backends.is_empty() {
            return Err(err("backends", "at least one backend is required".into()));
        }
        if svc.backends.len() > maglev::MAX_TABLE_SIZE as usize {
            return Err(err(
                "backends",
                format!(
                    "{} backends; at most {} per service (the largest Maglev table)",
                    svc.backends.len(),
                    maglev::MAX_TABLE_SIZE
                ),
            ));
        }
        backend_entries += svc.backends.len();
        if backend_entries > MAX_BACKENDS as usize {
            return Err(err(
                "backends",
                format!(
                    "more than {MAX_BACKENDS} backends in all services together (LB_BACKENDS is full)"
                ),
            ));
        }
        let mut backends = BTreeMap::new();
        for (i, b) in svc.backends.iter().enumerate() {
            let field = |f: &str| format!("backends[{i}].{f}");
            let addr: IpAddr = b.address.parse().map_err(|_| {
                err(
                    &field("address"),
                    format!("{:?} is not an IP address", b.address),
                )
            })?;
            if let Some(why) = not_unicast(addr) {
                return Err(err(
                    &field("address"),
                    format!("{addr} is {why}, not a unicast address"),
                ));
            }
            if forwarding == Forwarding::L2 && addr.is_ipv4() != vip.is_ipv4() {
                return Err(err(
                    &field("address"),
                    format!(
                        "{addr}: l2 forwarding cannot change the address family of {vip}; use ipip or gue"
                    ),
                ));
            }
            let weight = b.weight.unwrap_or(1);
            if !(1..=MAX_WEIGHT).contains(&weight) {
                return Err(err(&field("weight"), format!("must be 1-{MAX_WEIGHT}")));
            }
            let mac = match &b.mac {
                None => None,
                Some(m) => Some(parse_mac(m).ok_or_else(|| {
                    err(
                        &field("mac"),
                        format!("{m:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"),
                    )
                })?),
            };
            if backends.insert(addr, BackendSpec { weight, mac }).is_some() {
                return Err(err(
                    &field("address"),
                    format!("backend {addr} listed twice"),
                ));
            }
        }
        if let Some(size) = svc.table_size {
            if !maglev::is_prime(size) || size > maglev::MAX_TABLE_SIZE {
                return Err(err(
                    "table_size",
                    format!(
                        "{size} must be a prime no larger than {}",
                        maglev::MAX_TABLE_SIZE
                    ),
                ));
            }
            if (size as usize) < backends.len() {
                return Err(err(
                    "table_size",
                    format!("{size} is smaller than the number of backends"),
                ));
            }
        }
        let mut source_ranges = Vec::new();
        for (i, r) in svc.source_ranges.iter().enumerate() {
            let field = format!("source_ranges[{i}]");
            let net: ipnet::IpNet = r
                .parse()
                .or_else(|_| r.parse::<IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    err(
                        &field,
                        format!("{r:?} is not a CIDR (198.18.0.0/15, 2001:db8::/32)"),
                    )
                })?;
            if net.addr().is_ipv4() != vip.is_ipv4() {
                return Err(err(
                    &field,
                    format!("{net} is not of the VIP's address family"),
                ));
            }
            source_ranges.push(net.trunc());
        }
        if svc.fragments
            && let Some(other) = state
                .services
                .iter()
                .find(|(a, o)| o.fragments && a.vip == vip && a.protocol == protocol)
        {
            return Err(err(
                "fragments",
                format!(
                    "service {:?} already takes the {} fragments of {vip}",
                    other.1.name,
                    protocol.name()
                ),
            ));
        }
        if let Some(s) = svc.session_affinity_seconds
            && !(1..=MAX_AFFINITY_SECONDS).contains(&s)
        {
            return Err(err(
                "session_affinity_seconds",
                format!("{s} is not 1-{MAX_AFFINITY_SECONDS}"),
            ));
        }
        let key = ServiceAddr {
            vip,
            port: svc.port,
            protocol,
        };
        if let Some(other) = state.services.get(&key) {
            return Err(err(
                "vip",
                format!("{key} is already used by service {:?}", other.name),
            ));
        }
        state.services.insert(
            key,
            ServiceSpec {
                name: svc.name.clone(),
                forwarding,
                table_size: svc.table_size,
                flow_tracking: svc.flow_tracking.unwrap_or(default_flow_tracking(protocol)),
                source_ranges: (!source_ranges.is_empty()).then_some(source_ranges),
                fragments: svc.fragments,
                affinity_timeout_s: svc.session_affinity_seconds,
                backends,
            },
        );
    }
    // Every node balances every static service over all its backends: equal weights.
    state.announce = state.services.keys().map(|a| (a.vip, 1)).collect();
    Ok(state)
}

fn flow_settings(raw: &RawFlowTable) -> Result<FlowSettings, (String, String)> {
    let d = FlowSettings::default();
    let positive = |field: &str, v: Option<u32>, default: u32| match v {
        Some(0) => Err((
            format!("flow_table.{field}"),
            "must be at least 1".to_string(),
        )),
        Some(v) => Ok(v),
        None => Ok(default),
    };
    let idle = |field: &str, v: Option<u32>, default: u32| {
        let v = positive(field, v, default)?;
        if v > lb_common::flowtab::MAX_IDLE_S {
            return Err((
                format!("flow_table.{field}"),
                format!(
                    "must be at most {} (7 days)",
                    lb_common::flowtab::MAX_IDLE_S
                ),
            ));
        }
        Ok(v)
    };
    Ok(FlowSettings {
        tcp_idle_s: idle("tcp_idle_seconds", raw.tcp_idle_seconds, d.tcp_idle_s)?,
        udp_idle_s: idle("udp_idle_seconds", raw.udp_idle_seconds, d.udp_idle_s)?,
        new_flows_per_cpu_s: raw
            .new_flows_per_cpu_per_second
            .unwrap_or(d.new_flows_per_cpu_s),
        size: positive("size", raw.size, d.size)?,
    })
}

/// Parse `aa:bb:cc:dd:ee:ff` (or with dashes).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
interface: eth0
encap_source: 198.18.0.2
flow_table:
  size: 4096
  udp_idle_seconds: 30
services:
  - name: dns
    vip: 198.18.0.100
    port: 53
    protocol: udp
    forwarding: ipip
    backends:
      - address: 198.18.0.11
      - address: 198.18.0.12
        weight: 2
        mac: "02:00:00:00:00:12"
  - name: web
    vip: 198.18.0.100
    port: 80
    protocol: TCP
    forwarding: l2
    table_size: 307
    backends:
      - address: 198.18.0.13
"#;

    fn parse_str(text: &str) -> Result<DesiredState, ConfigError> {
        parse(Path::new("lb.yaml"), text)
    }

    fn error_of(text: &str) -> String {
        parse_str(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    fn with_service(service_yaml: &str) -> String {
        format!("services:\n{service_yaml}")
    }

    #[test]
    fn parses_the_documented_example() {
        let state = parse_str(GOOD).unwrap();
        assert_eq!(state.node.interface.as_deref(), Some("eth0"));
        assert_eq!(state.node.encap_source, Some(Ipv4Addr::new(198, 18, 0, 2)));
        assert_eq!(state.services.len(), 2);
        let dns = &state.services[&ServiceAddr {
            vip: "198.18.0.100".parse().unwrap(),
            port: 53,
            protocol: Protocol::Udp,
        }];
        assert_eq!(dns.name, "dns");
        assert!(!dns.flow_tracking, "UDP is stateless by default");
        assert_eq!(state.node.flows.udp_idle_s, 30);
        assert_eq!(state.node.flows.size, 4096);
        assert_eq!(
            state.node.flows.tcp_idle_s,
            FlowSettings::default().tcp_idle_s
        );
        assert_eq!(dns.forwarding, Forwarding::Ipip);
        let b12 = &dns.backends[&"198.18.0.12".parse::<IpAddr>().unwrap()];
        assert_eq!(b12.weight, 2);
        assert_eq!(b12.mac, Some([2, 0, 0, 0, 0, 0x12]));
        let b11 = &dns.backends[&"198.18.0.11".parse::<IpAddr>().unwrap()];
        assert_eq!((b11.weight, b11.mac), (1, None));
        let web = state.services.values().find(|s| s.name == "web").unwrap();
        assert_eq!(
            (web.forwarding, web.table_size),
            (Forwarding::L2, Some(307))
        );
        assert!(web.flow_tracking, "TCP is tracked by default");
    }

    /// `n` distinct backends in 198.18.0.0/15, as YAML list items.
    fn many_backends(n: u32) -> String {
        (0..n)
            .map(|i| {
                let [_, _, c, d] = (0xc612_0000u32 + 1 + i).to_be_bytes();
                format!("      - address: 198.{}.{c}.{d}\n", 18 + (i >> 16))
            })
            .collect()
    }

    #[test]
    fn rejects_bad_input_naming_file_service_and_field() {
        let svc = |extra: &str, backends: &str| {
            with_service(&format!(
                "  - name: s1\n    vip: 198.18.0.100\n    port: 53\n{extra}{backends}"
            ))
        };
        let one_backend = "    backends:\n      - address: 198.18.0.11\n";
        let cases = [
            (
                svc("    protocol: sctp\n", one_backend),
                "lb.yaml: service \"s1\": protocol: unknown protocol \"sctp\"",
            ),
            (
                with_service(
                    "  - name: s1\n    vip: not-an-ip\n    port: 53\n    protocol: udp\n    backends:\n      - address: 198.18.0.11\n",
                ),
                "lb.yaml: service \"s1\": vip: \"not-an-ip\" is not an IP address",
            ),
            (
                svc("    protocol: udp\n", ""),
                "service \"s1\": backends: at least one backend is required",
            ),
            (
                svc(
                    "    protocol: udp\n",
                    "    backends:\n      - address: 198.18.0.11\n        weight: 0\n",
                ),
                "service \"s1\": backends[0].weight: must be 1-65535",
            ),
            (
                svc(
                    "    protocol: udp\n",
                    "    backends:\n      - address: 198.18.0.1x\n",
                ),
                "service \"s1\": backends[0].address: \"198.18.0.1x\" is not an IP address",
            ),
            (
                svc(
                    "    protocol: udp\n",
                    "    backends:\n      - address: 198.18.0.11\n        mac: zz\n",
                ),
                "backends[0].mac: \"zz\" is not a MAC address",
            ),
            (
                svc("    protocol: udp\n    forwarding: gre\n", one_backend),
                "forwarding: unknown forwarding \"gre\"",
            ),
            (
                svc("    protocol: udp\n    table_size: 100\n", one_backend),
                "table_size: 100 must be a prime",
            ),
            (
                "services:\n  - {name: a, vip: 198.18.0.100, port: 53, protocol: udp, backends: [{address: 198.18.0.11}]}\n  - {name: a, vip: 198.18.0.101, port: 53, protocol: udp, backends: [{address: 198.18.0.11}]}\n".to_string(),
                "service \"a\": name: duplicate service name",
            ),
            (
                "services:\n  - {name: a, vip: 198.18.0.100, port: 53, protocol: udp, backends: [{address: 198.18.0.11}]}\n  - {name: b, vip: 198.18.0.100, port: 53, protocol: udp, backends: [{address: 198.18.0.11}]}\n".to_string(),
                "service \"b\": vip: 198.18.0.100:53/udp is already used by service \"a\"",
            ),
            (
                "encap_source: 2001:db8::1\n".to_string(),
                "lb.yaml: encap_source: \"2001:db8::1\" is not an IPv4 address",
            ),
            ("servces: []\n".to_string(), "unknown field `servces`"),
            (
                "services: [\n".to_string(),
                "lb.yaml: did not find expected node content at line 2 column 1",
            ),
            (
                "services:\n  - name: [\n".to_string(),
                "lb.yaml: services[0].name: invalid type: sequence, expected a string at line 2",
            ),
            (
                with_service(
                    "  - {name: s1, vip: 0.0.0.0, port: 53, protocol: udp, backends: [{address: 198.18.0.11}]}\n",
                ),
                "service \"s1\": vip: 0.0.0.0 is the unspecified address, not a unicast address",
            ),
            (
                with_service(
                    "  - {name: s1, vip: 255.255.255.255, port: 53, protocol: udp, backends: [{address: 198.18.0.11}]}\n",
                ),
                "vip: 255.255.255.255 is the broadcast address",
            ),
            (
                with_service(
                    "  - {name: s1, vip: 239.1.2.3, port: 53, protocol: udp, backends: [{address: 198.18.0.11}]}\n",
                ),
                "vip: 239.1.2.3 is a multicast address",
            ),
            (
                with_service(
                    "  - {name: s1, vip: \"ff02::1\", port: 53, protocol: udp, backends: [{address: \"2001:db8::11\"}]}\n",
                ),
                "vip: ff02::1 is a multicast address",
            ),
            (
                with_service(
                    "  - {name: s1, vip: 127.0.0.1, port: 53, protocol: udp, backends: [{address: 198.18.0.11}]}\n",
                ),
                "vip: 127.0.0.1 is a loopback address",
            ),
            (
                svc("    protocol: udp\n", "    backends:\n      - address: 0.0.0.0\n"),
                "service \"s1\": backends[0].address: 0.0.0.0 is the unspecified address",
            ),
            (
                with_service(
                    "  - {name: s1, vip: 198.18.0.100, port: 0, protocol: udp, backends: [{address: 198.18.0.11}]}\n",
                ),
                "service \"s1\": port: must be 1-65535",
            ),
            (
                svc(
                    "    protocol: udp\n",
                    "    backends:\n      - address: 198.18.0.11\n        weight: 65536\n",
                ),
                "service \"s1\": backends[0].weight: must be 1-65535",
            ),
            (
                svc(
                    "    protocol: udp\n",
                    "    backends:\n      - address: 198.18.0.11\n        weight: 99999999999\n",
                ),
                "lb.yaml: services[0].backends[0].weight: invalid value: integer `99999999999`, expected u32",
            ),
            (
                svc("    protocol: udp\n    forwarding: l2\n", "    backends:\n      - address: \"2001:db8::11\"\n"),
                "backends[0].address: 2001:db8::11: l2 forwarding cannot change the address family",
            ),
            (
                svc(
                    "    protocol: udp\n",
                    &format!("    backends:\n{}", many_backends(70_000)),
                ),
                "service \"s1\": backends: 70000 backends; at most 65537 per service",
            ),
            (
                "flow_table:\n  tcp_idle_seconds: 604801\n".to_string(),
                "lb.yaml: flow_table.tcp_idle_seconds: must be at most 604800 (7 days)",
            ),
        ];
        for (text, expected) in cases {
            let msg = error_of(&text);
            assert!(
                msg.contains(expected),
                "for config:\n{text}\nexpected {expected:?} in {msg:?}"
            );
        }
    }

    #[test]
    fn ipv6_gue_and_mixed_families() {
        let text = r#"
encap_source_v6: "2001:db8::2"
gue_port: 7777
services:
  - name: v6
    vip: "2001:db8::100"
    port: 53
    protocol: udp
    forwarding: gue
    backends:
      - address: "2001:db8::11"
      - address: 198.18.0.12
"#;
        let state = parse_str(text).unwrap();
        assert_eq!(state.node.gue_port, 7777);
        assert_eq!(
            state.node.encap_source_v6,
            Some("2001:db8::2".parse().unwrap())
        );
        let svc = state.services.values().next().unwrap();
        assert_eq!(svc.forwarding, Forwarding::Gue);
        assert_eq!(svc.backends.len(), 2);
        assert_eq!(
            parse_str("services: []").unwrap().node.gue_port,
            DEFAULT_GUE_PORT
        );
        let msg = error_of(
            "services:\n  - {name: a, vip: \"2001:db8::100\", port: 53, protocol: udp, forwarding: l2, backends: [{address: 198.18.0.11}]}\n",
        );
        assert!(
            msg.contains("l2 forwarding cannot change the address family"),
            "{msg}"
        );
        let msg = error_of("gue_port: 0\n");
        assert!(msg.contains("gue_port: must be 1-65535"), "{msg}");
        let msg = error_of("encap_source_v6: 198.18.0.1\n");
        assert!(
            msg.contains("encap_source_v6: \"198.18.0.1\" is not an IPv6 address"),
            "{msg}"
        );
    }

    #[test]
    fn decap_sources() {
        let ok =
            parse_str("decap: true\ndecap_sources: [198.18.0.2, \"2001:db8::2\", 198.18.4.9/24]\n")
                .unwrap();
        let want: BTreeSet<ipnet::IpNet> = ["198.18.0.2/32", "2001:db8::2/128", "198.18.4.0/24"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(ok.decap_sources, want);
        // Default: nobody.
        assert!(parse_str("decap: true\n").unwrap().decap_sources.is_empty());
        let msg = error_of("decap_sources: [198.18.0.2, lb2]\n");
        assert!(
            msg.contains("decap_sources[1]: \"lb2\" is not an address or CIDR"),
            "{msg}"
        );
    }

    #[test]
    fn source_ranges() {
        let ok = parse_str(
            "services:\n  - {name: a, vip: 198.18.0.100, port: 53, protocol: udp, source_ranges: [198.18.1.7/24, 198.19.0.1], backends: [{address: 198.18.0.11}]}\n",
        )
        .unwrap();
        let svc = ok.services.values().next().unwrap();
        let want: Vec<ipnet::IpNet> = vec![
            "198.18.1.0/24".parse().unwrap(),
            "198.19.0.1/32".parse().unwrap(),
        ];
        assert_eq!(
            svc.source_ranges.as_deref(),
            Some(&want[..]),
            "host bits cleared, bare address = /32"
        );
        let none = parse_str("services:\n  - {name: a, vip: 198.18.0.100, port: 53, protocol: udp, backends: [{address: 198.18.0.11}]}\n").unwrap();
        assert_eq!(none.services.values().next().unwrap().source_ranges, None);
        let msg = error_of(
            "services:\n  - {name: a, vip: 198.18.0.100, port: 53, protocol: udp, source_ranges: [\"2001:db8::/32\"], backends: [{address: 198.18.0.11}]}\n",
        );
        assert!(
            msg.contains("source_ranges[0]: 2001:db8::/32 is not of the VIP's address family"),
            "{msg}"
        );
        let msg = error_of(
            "services:\n  - {name: a, vip: 198.18.0.100, port: 53, protocol: udp, source_ranges: [bogus], backends: [{address: 198.18.0.11}]}\n",
        );
        assert!(
            msg.contains("source_ranges[0]: \"bogus\" is not a CIDR"),
            "{msg}"
        );
    }

    #[test]
    fn one_fragment_service_per_vip_and_protocol() {
        let two = "services:\n  - {name: a, vip: 198.18.0.100, port: 53, protocol: udp, fragments: true, backends: [{address: 198.18.0.11}]}\n  - {name: b, vip: 198.18.0.100, port: 54, protocol: udp, fragments: true, backends: [{address: 198.18.0.11}]}\n";
        let msg = error_of(two);
        assert!(msg.contains("service \"b\": fragments: service \"a\" already takes the udp fragments of 198.18.0.100"), "{msg}");
        let ok = two.replacen("port: 54, protocol: udp", "port: 54, protocol: tcp", 1);
        let state = parse_str(&ok).unwrap();
        assert!(state.services.values().all(|s| s.fragments));
    }

    #[test]
    fn mac_round_trip() {
        assert_eq!(parse_mac("02:00:00:00:00:12"), Some([2, 0, 0, 0, 0, 0x12]));
        assert_eq!(
            parse_mac("02-AB-00-00-00-12"),
            Some([2, 0xab, 0, 0, 0, 0x12])
        );
        assert_eq!(parse_mac("02:00:00:00:00"), None);
        assert_eq!(parse_mac("02:00:00:00:00:12:13"), None);
        assert_eq!(format_mac(&[2, 0xab, 0, 0, 0, 0x12]), "02:ab:00:00:00:12");
    }

    #[test]
    fn announcement_settings() {
        let ok = parse_str(
            "announce: l2\nnode_name: lb2\nnodes:\n  - {name: lb1, address: 198.18.0.2}\n  - {name: lb2, address: \"2001:db8::3\"}\nmembership: {port: 7000, interval_ms: 100}\n",
        )
        .unwrap();
        let a = &ok.node.announce;
        assert_eq!(a.mode, AnnounceMode::L2);
        assert_eq!(a.node_name.as_deref(), Some("lb2"));
        assert_eq!(a.nodes.len(), 2);
        assert_eq!(a.membership.port, 7000);
        assert_eq!(a.membership.interval, Duration::from_millis(100));
        // dead_after defaults to the larger of 1.2 s and three intervals.
        assert_eq!(a.membership.dead_after, Duration::from_millis(1200));
        assert_eq!(
            parse_str("").unwrap().node.announce,
            AnnounceSpec::default()
        );

        let node = |n: &str, a: &str| format!("  - {{name: {n}, address: \"{a}\"}}\n");
        let cases = [
            (
                "announce: arp\n".to_string(),
                "lb.yaml: announce: unknown announcement \"arp\"",
            ),
            (
                format!(
                    "announce: l2\nnodes:\n{}{}",
                    node("a", "198.18.0.2"),
                    node("a", "198.18.0.3")
                ),
                "lb.yaml: nodes[1].name: node \"a\" listed twice",
            ),
            (
                format!(
                    "nodes:\n{}{}",
                    node("a", "198.18.0.2"),
                    node("b", "198.18.0.2")
                ),
                "lb.yaml: nodes[1].address: 198.18.0.2 is also node \"a\"'s",
            ),
            (
                format!("nodes:\n{}", node("a", "198.18.0")),
                "lb.yaml: nodes[0].address: \"198.18.0\" is not an IP address",
            ),
            (
                format!("nodes:\n{}", node("a", "224.0.0.1")),
                "nodes[0].address: 224.0.0.1 is a multicast address, not a node's unicast address",
            ),
            (
                format!("node_name: c\nnodes:\n{}", node("a", "198.18.0.2")),
                "lb.yaml: node_name: \"c\" is not one of `nodes`",
            ),
            (
                "membership: {port: 0}\n".to_string(),
                "membership.port: must be 1-65535",
            ),
            (
                "membership: {interval_ms: 10}\n".to_string(),
                "membership.interval_ms: must be 50-10000",
            ),
            (
                "membership: {interval_ms: 500, dead_after_ms: 600}\n".to_string(),
                "membership.dead_after_ms: must be at least twice interval_ms (1000 ms)",
            ),
            (
                "announce: bgp\n".to_string(),
                "lb.yaml: bgp: `announce: bgp` needs a `bgp` section",
            ),
            (
                "membership: {ports: 1}\n".to_string(),
                "unknown field `ports`",
            ),
        ];
        for (text, expected) in cases {
            let msg = error_of(&text);
            assert!(
                msg.contains(expected),
                "for config:\n{text}\nexpected {expected:?} in {msg:?}"
            );
        }
    }
}
