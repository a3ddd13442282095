//! L2 announcement at run time. Per VIP exactly one node, the owner ([`super::owner`]),
//! answers ARP requests and Neighbor Solicitations for it, from XDP (`VIP_F_ANSWER` in
//! `LB_VIPS`); the others stay silent. Every node keeps forwarding whatever reaches it, by
//! the same Maglev tables, so a client still using an old owner's MAC, or a flow that moves
//! to the new owner, keeps its backend.
//!
//! The daemon asks [`L2::owned`] for the VIPs this node owns before each sync and tells
//! [`L2::committed`] once the data plane has them; a VIP newly owned is then announced with
//! gratuitous ARP / unsolicited NA, several times, spaced, so switches and clients move at
//! once. A burst stops when the VIP is lost again.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use tokio::task::AbortHandle;

use super::{
    AnnounceSpec,
    garp::{self, FrameSender},
    members::{Membership, Peer},
    owner::{self, Eligibility},
};

#[derive(Debug, thiserror::Error)]
pub enum L2Error {
    #[error("L2 announcement: {0}")]
    Io(#[from] std::io::Error),
}

pub struct L2 {
    me: String,
    membership: Membership,
    /// The nodes that may own VIPs (empty: this node alone). A node not listed (in
    /// Kubernetes mode: not Ready, cordoned or excluded) owns nothing.
    listed: BTreeSet<String>,
    sender: Arc<FrameSender>,
    mac: [u8; 6],
    /// Owners as last computed, for logging changes.
    owners: BTreeMap<IpAddr, String>,
    /// What the data plane answers for now.
    committed: BTreeSet<IpAddr>,
    /// Gratuitous ARP / NA bursts still running, per VIP.
    bursts: BTreeMap<IpAddr, AbortHandle>,
}

impl Drop for L2 {
    fn drop(&mut self) {
        for b in self.bursts.values() {
            b.abort();
        }
    }
}

impl L2 {
    /// Start the heartbeats. `ifindex`/`mac`: the interface VIPs are announced on.
    pub async fn start(
        me: &str,
        spec: &AnnounceSpec,
        ifindex: u32,
        mac: [u8; 6],
    ) -> Result<L2, L2Error> {
        let mut nodes = spec.nodes.clone();
        if nodes.is_empty() {
            // Alone: no heartbeats to wait for.
            nodes.push(Peer {
                name: me.to_string(),
                address: IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            });
        } else if !nodes.iter().any(|p| p.name == me) {
            tracing::warn!(
                node = me,
                "this node is not among the announcing nodes: it owns no VIP"
            );
        }
        let listed = nodes.iter().map(|p| p.name.clone()).collect();
        let membership = Membership::start(me, spec.membership, nodes).await?;
        let sender = Arc::new(FrameSender::open(ifindex)?);
        tracing::info!(
            node = me,
            nodes = spec.nodes.len().max(1),
            port = spec.membership.port,
            "L2 announcement: listening for the other nodes"
        );
        Ok(L2 {
            me: me.to_string(),
            membership,
            listed,
            sender,
            mac,
            owners: BTreeMap::new(),
            committed: BTreeSet::new(),
            bursts: BTreeMap::new(),
        })
    }

    /// The VIPs of `eligible` this node owns now (none while it is still listening after
    /// its start). Logs every owner change it sees.
    pub fn owned(&mut self, eligible: &Eligibility) -> BTreeSet<IpAddr> {
        let Some(mut alive) = self.membership.alive() else {
            return BTreeSet::new();
        };
        alive.retain(|n| self.listed.contains(n));
        let owners = owner::owners(eligible, &alive);
        for (vip, o) in &owners {
            if self.owners.get(vip) != Some(o) {
                tracing::info!(%vip, owner = %o, me = o == &self.me, "l2 owner");
            }
        }
        for vip in self.owners.keys() {
            if !owners.contains_key(vip) && eligible.contains_key(vip) {
                tracing::warn!(%vip, "l2 owner: no live eligible node; nobody answers for it");
            }
        }
        self.owners = owners;
        self.owners
            .iter()
            .filter(|(_, o)| **o == self.me)
            .map(|(vip, _)| *vip)
            .collect()
    }

    /// The owner of `vip` as last computed.
    pub fn owner_of(&self, vip: &IpAddr) -> Option<&str> {
        self.owners.get(vip).map(String::as_str)
    }

    /// The data plane now answers for `owned`: announce the VIPs it did not answer for
    /// before; stop the bursts of VIPs lost. Returns the VIPs taken over.
    pub fn committed(&mut self, owned: &BTreeSet<IpAddr>) -> Vec<IpAddr> {
        for lost in self.committed.difference(owned) {
            if let Some(b) = self.bursts.remove(lost) {
                b.abort();
            }
            tracing::info!(vip = %lost, "l2: no longer answering for the VIP");
        }
        self.bursts.retain(|_, b| !b.is_finished());
        let taken: Vec<IpAddr> = owned.difference(&self.committed).copied().collect();
        for vip in &taken {
            let frame = match vip {
                IpAddr::V4(a) => garp::gratuitous_arp(self.mac, *a),
                IpAddr::V6(a) => garp::unsolicited_na(self.mac, *a),
            };
            tracing::info!(%vip, "announcing: this node took the VIP over");
            let sender = self.sender.clone();
            let vip_log = *vip;
            let task = tokio::spawn(async move {
                if let Err(e) = garp::announce(&sender, &frame).await {
                    tracing::warn!(vip = %vip_log, error = %e, "gratuitous ARP/NA not sent");
                }
            });
            self.bursts.insert(*vip, task.abort_handle());
        }
        self.committed = owned.clone();
        taken
    }

    /// Wait until the set of live nodes changes. Cancel-safe.
    pub async fn changed(&mut self) {
        self.membership.changed().await;
    }

    /// Replace the node list (Kubernetes mode).
    pub fn set_nodes(&mut self, nodes: Vec<Peer>) {
        self.listed = nodes.iter().map(|p| p.name.clone()).collect();
        self.membership.set_peers(nodes);
    }

    /// Clean stop: tell the other nodes, so they take this node's VIPs over at once.
    pub async fn leave(mut self) {
        for b in std::mem::take(&mut self.bursts).into_values() {
            b.abort();
        }
        self.membership.leave().await;
    }
}
