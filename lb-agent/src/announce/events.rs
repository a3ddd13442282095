//! Events about the announcement on the Services behind a VIP (Kubernetes mode), so
//! `kubectl describe service` shows which node announces it: the owner that takes an L2
//! VIP over says so (one Event per takeover, from the node that now answers), and a BGP
//! node says when it starts or stops announcing a VIP.
//!
//! Publishing goes through a task of its own, so a slow or absent API server never holds
//! the sync loop up; Events that cannot be published are logged and dropped.

use std::net::IpAddr;

use crate::{
    ipam::{EventSink, Notice, service_reference},
    state::DesiredState,
};

/// Reason of the Event a node publishes when it starts announcing a VIP.
pub const REASON_ANNOUNCED: &str = "Announced";
/// Reason of the Event a BGP node publishes when it stops announcing a VIP.
pub const REASON_WITHDRAWN: &str = "Withdrawn";

/// A change in what this node announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// This node took the VIP over (L2) or started announcing its route (BGP).
    Announced(IpAddr),
    /// This node stopped announcing the VIP's route (BGP).
    Withdrawn(IpAddr),
}

/// The notice for a transition on node `node` in mode `how` (`L2` or `BGP`).
pub fn notice(t: Transition, node: &str, how: &str) -> Notice {
    match t {
        Transition::Announced(vip) => Notice::normal(
            REASON_ANNOUNCED,
            "Announce",
            match how {
                "L2" => format!("{vip} announced from node {node} (L2: it answers ARP/NDP for it)"),
                _ => format!("{vip} announced from node {node} ({how})"),
            },
        ),
        Transition::Withdrawn(vip) => Notice::normal(
            REASON_WITHDRAWN,
            "Withdraw",
            format!("{vip} no longer announced from node {node} ({how})"),
        ),
    }
}

/// Publishes announcement Events in the background.
pub struct AnnounceEvents {
    node: String,
    sink: EventSink,
}

impl AnnounceEvents {
    pub fn start(client: kube::Client, node: &str) -> AnnounceEvents {
        AnnounceEvents {
            node: node.to_string(),
            sink: EventSink::start(client, node, "announcement"),
        }
    }

    /// Tell every Service behind the VIPs of `transitions`.
    pub fn publish(&self, desired: &DesiredState, transitions: &[Transition], how: &str) {
        for t in transitions {
            let (Transition::Announced(vip) | Transition::Withdrawn(vip)) = t;
            let n = notice(*t, &self.node, how);
            for svc in desired.vip_services.get(vip).into_iter().flatten() {
                self.sink.send(service_reference(svc), n.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_name_the_node_and_the_mode() {
        let vip: IpAddr = "198.18.10.1".parse().unwrap();
        let n = notice(Transition::Announced(vip), "node-b", "L2");
        assert_eq!(n.reason, "Announced");
        assert_eq!(
            n.note,
            "198.18.10.1 announced from node node-b (L2: it answers ARP/NDP for it)"
        );
        let n = notice(Transition::Withdrawn(vip), "node-b", "BGP");
        assert_eq!(n.reason, "Withdrawn");
        assert_eq!(
            n.note,
            "198.18.10.1 no longer announced from node node-b (BGP)"
        );
    }
}
