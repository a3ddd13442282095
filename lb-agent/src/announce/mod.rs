//! Making the VIPs reachable: which node announces which VIP, and how.
//!
//! - `owner`: the L2 owner of each VIP, a rendezvous hash over the live eligible nodes.
//! - `members`: which nodes are alive (UDP heartbeats between the agents).
//! - `l2`: the L2 mode at run time: owned VIPs for the data plane's ARP/NDP responder, and
//!   gratuitous ARP / unsolicited NA (`garp`) on takeover.
//! - `bgp`: BGP through BIRD 2: the agent renders BIRD's configuration from the VIPs this
//!   node announces and asks the running daemon to reload it.
//! - `file`: the announcement file (VIPs and route weights) for a routing daemon of the
//!   operator's own.

pub mod bgp;
pub mod events;
pub mod file;
pub mod garp;
pub mod l2;
pub mod members;
pub mod owner;
pub mod run;

pub use file::Announcer;
pub use members::{MembershipSettings, Peer};

impl AnnounceSpec {
    /// May node `me` announce at all (it is among the eligible nodes)?
    pub fn admits(&self, me: &str) -> bool {
        if self.nodes.is_empty() {
            return !self.from_cluster;
        }
        self.nodes.iter().any(|p| p.name == me)
    }
}

/// How the VIPs are made reachable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AnnounceMode {
    /// Not by the agent: the operator routes the VIPs (or `--announce-file` feeds a daemon).
    #[default]
    None,
    /// One owner node per VIP answers ARP / Neighbor Solicitations for it.
    L2,
    /// Every node that balances a VIP announces a host route for it over BGP (BIRD 2).
    Bgp,
}

impl AnnounceMode {
    pub fn parse(s: &str) -> Option<AnnounceMode> {
        match s {
            "none" => Some(AnnounceMode::None),
            "l2" => Some(AnnounceMode::L2),
            "bgp" => Some(AnnounceMode::Bgp),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            AnnounceMode::None => "none",
            AnnounceMode::L2 => "l2",
            AnnounceMode::Bgp => "bgp",
        }
    }
}

/// The announcement settings of a node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AnnounceSpec {
    pub mode: AnnounceMode,
    /// This node's name among `nodes` (`--node-name` wins; default: the hostname).
    pub node_name: Option<String>,
    /// The load-balancer nodes sharing the VIPs, for L2 ownership and liveness (static
    /// mode; in Kubernetes mode the Nodes). Empty: this node alone, unless `from_cluster`.
    pub nodes: Vec<Peer>,
    /// `nodes` is the cluster's list of eligible Nodes (Kubernetes mode): empty means that
    /// no node may announce, not "this node alone".
    pub from_cluster: bool,
    pub membership: MembershipSettings,
    /// `mode: bgp` only.
    pub bgp: Option<bgp::BgpSettings>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_cluster_list_admits_nobody_an_absent_static_list_admits_this_node() {
        let alone = AnnounceSpec::default();
        assert!(alone.admits("lb1"));
        let cluster = AnnounceSpec {
            from_cluster: true,
            ..AnnounceSpec::default()
        };
        assert!(!cluster.admits("lb1"));
        let listed = AnnounceSpec {
            nodes: vec![Peer {
                name: "lb2".into(),
                address: "198.18.0.3".parse().unwrap(),
            }],
            ..AnnounceSpec::default()
        };
        assert!(listed.admits("lb2"));
        assert!(!listed.admits("lb1"));
    }
}
