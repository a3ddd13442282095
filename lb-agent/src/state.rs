//! The desired state of the data plane: plain data, built by the static config loader (and
//! later by the Kubernetes watcher), compared and applied by `sync`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use lb_common::Forwarding;

/// Why `ip` cannot be a VIP, a backend or a node address, if it cannot: the packets of a
/// load-balanced flow go to and come from one host, so only unicast addresses qualify.
pub fn not_unicast(ip: IpAddr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        Some("the broadcast address")
    } else {
        None
    }
}

/// Transport protocol of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }

    pub const fn from_number(n: u8) -> Option<Self> {
        match n {
            lb_common::PROTO_TCP => Some(Protocol::Tcp),
            lb_common::PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// What identifies a service in the data plane: (VIP, port, protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceAddr {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl std::fmt::Display for ServiceAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.vip {
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.protocol.name()),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.protocol.name()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub weight: u32,
    /// A MAC address given by the operator; otherwise the agent resolves the next hop.
    pub mac: Option<[u8; 6]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub name: String,
    pub forwarding: Forwarding,
    /// Maglev table size override (prime); `None` sizes it from the total weight.
    pub table_size: Option<u32>,
    /// Remember each flow's backend (see `default_flow_tracking`).
    pub flow_tracking: bool,
    /// Clients allowed to use the service (`None`: everyone; an empty list: nobody). Others
    /// are dropped and counted.
    pub source_ranges: Option<Vec<ipnet::IpNet>>,
    /// This service takes the IP fragments of its VIP and protocol (at most one per VIP and
    /// protocol), balanced on addresses only so all fragments of a datagram meet at one
    /// backend. Without one, fragments to the VIP are dropped and counted.
    pub fragments: bool,
    /// Session affinity (`sessionAffinity: ClientIP`): a client keeps its backend for this
    /// many seconds after its last packet. `None`: balanced per flow.
    pub affinity_timeout_s: Option<u32>,
    pub backends: BTreeMap<IpAddr, BackendSpec>,
}

/// Flow tracking is on by default for TCP: an established connection must keep its backend
/// when backends come and go. It is off for UDP: request/response protocols such as DNS
/// use a fresh source port per query, so remembering them only churns the table, and the
/// stateless Maglev path already sends each 5-tuple to the same backend on every node.
pub const fn default_flow_tracking(protocol: Protocol) -> bool {
    matches!(protocol, Protocol::Tcp)
}

/// Flow-table settings of the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowSettings {
    /// A TCP flow idle this long is decided afresh (by Maglev, so usually the same backend).
    pub tcp_idle_s: u32,
    pub udp_idle_s: u32,
    /// Flood guard: new entries per second per CPU; past it, flows are forwarded unremembered.
    pub new_flows_per_cpu_s: u32,
    /// Entries of the flow table (all CPUs together). Takes effect when the table is
    /// created: a pinned table keeps its size across restarts.
    pub size: u32,
}

impl Default for FlowSettings {
    fn default() -> Self {
        FlowSettings {
            tcp_idle_s: 3600,
            udp_idle_s: 60,
            new_flows_per_cpu_s: 125_000,
            size: lb_common::maps::DEFAULT_FLOWS,
        }
    }
}

/// Node-level settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeSpec {
    /// Interface the load balancer is attached to.
    pub interface: Option<String>,
    /// Source address of outer IPv4 headers; default: the interface's first IPv4 address.
    pub encap_source: Option<Ipv4Addr>,
    /// Source address of outer IPv6 headers; default: the interface's first global IPv6
    /// address.
    pub encap_source_v6: Option<Ipv6Addr>,
    /// UDP destination port of GUE encapsulation.
    pub gue_port: u16,
    /// Answer ICMP/ICMPv6 echo requests to VIPs on the load-balancer node.
    pub icmp_echo: bool,
    /// Answer packets too big for the encapsulation with ICMP "fragmentation needed" /
    /// ICMPv6 "packet too big" (else drop them).
    pub pmtu_icmp: bool,
    /// Decapsulate tunnel packets addressed to this node's endpoints (`local_endpoints`) and
    /// translate them; restore their replies on egress. On in Kubernetes mode.
    pub decap: bool,
    pub flows: FlowSettings,
    /// How the VIPs are announced (L2, BGP or not at all).
    pub announce: crate::announce::AnnounceSpec,
}

impl Default for NodeSpec {
    fn default() -> Self {
        NodeSpec {
            interface: None,
            encap_source: None,
            encap_source_v6: None,
            gue_port: lb_common::DEFAULT_GUE_PORT,
            icmp_echo: true,
            pmtu_icmp: true,
            decap: false,
            flows: FlowSettings::default(),
            announce: crate::announce::AnnounceSpec::default(),
        }
    }
}

/// A backend of a service that runs on this node (a pod here). Other nodes tunnel its
/// packets to its address; this node decapsulates them and translates the VIP and service
/// port to the backend's address and target port (and back for the replies).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LocalEndpoint {
    pub service: ServiceAddr,
    pub backend: IpAddr,
}

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DesiredState {
    pub node: NodeSpec,
    pub services: BTreeMap<ServiceAddr, ServiceSpec>,
    /// This node's endpoints and the port each listens on.
    pub local_endpoints: BTreeMap<LocalEndpoint, u16>,
    /// The VIPs this node balances and the weight its route for each should get: equal (1)
    /// when every node balances over all endpoints; the number of endpoints on this node
    /// when only local ones are used (0: nothing to send here, do not announce).
    pub announce: BTreeMap<IpAddr, u32>,
    /// The VIPs this node owns in L2 announcement: its `lb_xdp` answers ARP requests and
    /// Neighbor Solicitations for them (`VIP_F_ANSWER`). Computed by the membership
    /// (`announce::owner`), not read from the config.
    pub l2_owned: BTreeSet<IpAddr>,
    /// VIPs only some nodes may announce, and which (`externalTrafficPolicy: Local`: the
    /// nodes with a ready endpoint). A VIP not here may be announced by any node.
    pub announce_nodes: BTreeMap<IpAddr, BTreeSet<String>>,
    /// BGP attributes of VIPs whose pool sets its own (`spec.announce.bgp`); the others get
    /// the node's.
    pub announce_routes: BTreeMap<IpAddr, crate::announce::bgp::RouteAttrs>,
    /// VIPs whose route weight counts this node's endpoints (`externalTrafficPolicy: Local`):
    /// BGP sends it as link bandwidth for weighted ECMP.
    pub weighted: BTreeSet<IpAddr>,
    /// Kubernetes mode: the Services behind each VIP, for Events about its announcement.
    pub vip_services: BTreeMap<IpAddr, BTreeSet<ServiceRef>>,
    /// With `node.decap`: the outer sources tunnel packets are accepted from (the
    /// load-balancer nodes: `decap_sources` in the file, every Node's InternalIPs in
    /// Kubernetes mode). Empty: none. The node's own encapsulation sources are added by
    /// `sync` (its local backends are tunnelled from them).
    pub decap_sources: BTreeSet<ipnet::IpNet>,
    /// This node's own addresses (the interface's, filled in by the agent, not read from the
    /// config): the outer destinations tunnel packets are accepted for, besides the
    /// encapsulation sources and the local endpoints.
    pub node_addresses: BTreeSet<IpAddr>,
    /// Pods reached through their node (Kubernetes mode, `pod_tunnel: node`): each remote
    /// pod address with the address of its node, the tunnel's destination.
    pub pod_nodes: BTreeMap<IpAddr, IpAddr>,
}

/// A Service object (Kubernetes mode), as an Event refers to it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
}
