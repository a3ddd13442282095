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
//!
//! The data plane answers only while this agent's lease holds (`LB_L2_LEASE`, a deadline in
//! kernel ticks): a task renews it with every heartbeat to `dead_after` ahead, the time after
//! which the other nodes count this one dead. An agent that dies (SIGKILL, its program left
//! attached and its link up) renews it no more, so its node falls silent when the others take
//! its VIPs over, instead of answering beside the new owner until the agent is back. A clean
//! stop revokes it at once. The task is apart from the daemon's loop, which may wait seconds
//! in a sync (next hops that do not resolve), longer than `dead_after`.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use tokio::{
    sync::oneshot,
    task::{AbortHandle, JoinHandle},
    time::MissedTickBehavior,
};

use super::{
    AnnounceSpec,
    garp::{self, FrameSender},
    members::{Membership, MembershipSettings, Peer},
    owner::{self, Eligibility},
};
use crate::{
    clock::{ClockError, KernelClock},
    dataplane::{AnswerLease, DataplaneError},
};

#[derive(Debug, thiserror::Error)]
pub enum L2Error {
    #[error("L2 announcement: {0}")]
    Io(#[from] std::io::Error),
    #[error("answer lease: reading the kernel's clock: {0}")]
    Clock(#[from] ClockError),
    #[error("answer lease: {0}")]
    Lease(#[from] DataplaneError),
}

/// What the answer lease is kept with: the map and the kernel's clock.
pub struct Lease {
    pub map: AnswerLease,
    pub clock: KernelClock,
}

impl Lease {
    /// Stop answering at once (a node that does not announce by L2, or stops).
    pub fn revoke(&mut self) {
        if let Err(e) = self.map.set(0) {
            tracing::warn!(error = %e, "l2: revoking the answer lease failed; it runs out by itself");
        }
    }

    /// Answer for `ticks` from now.
    fn renew(&mut self, ticks: u64) -> Result<u64, L2Error> {
        let until = self.clock.now()?.saturating_add(ticks);
        self.map.set(until)?;
        Ok(until)
    }
}

/// The task renewing the lease; told to stop, it revokes the lease and ends. Dropped (an
/// agent going down without [`L2::leave`]), it is aborted and the lease runs out, as if
/// the agent had died.
struct LeaseKeeper {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl LeaseKeeper {
    fn start(lease: Lease, settings: MembershipSettings) -> LeaseKeeper {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(keep_lease(lease, settings, stopped));
        LeaseKeeper {
            stop: Some(stop),
            task,
        }
    }

    /// Revoke the lease (bounded wait: the task only has one map write left to do).
    async fn revoke(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if tokio::time::timeout(std::time::Duration::from_secs(1), &mut self.task)
            .await
            .is_err()
        {
            tracing::warn!("l2: the answer lease was not revoked in time; it runs out by itself");
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Renew `lease` every heartbeat `interval` to `dead_after` from now, until `stop`; then
/// revoke it. Started with the heartbeats, on the same period, so each renewal goes with a
/// heartbeat: the lease of a node that stops sending them ends no later than the others,
/// `dead_after` after the last one, count it dead (ticks are rounded down, jiffies read
/// at most a tick late).
async fn keep_lease(
    mut lease: Lease,
    settings: MembershipSettings,
    mut stop: oneshot::Receiver<()>,
) {
    let ticks = lease.clock.ticks(settings.dead_after);
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failing = false;
    let mut first = true;
    loop {
        tokio::select! {
            _ = tick.tick() => match lease.renew(ticks) {
                Ok(until) => {
                    if first || failing {
                        tracing::info!(
                            until,
                            ticks,
                            hz = lease.clock.hz(),
                            every_ms = settings.interval.as_millis() as u64,
                            "l2: answer lease renewed"
                        );
                    }
                    first = false;
                    failing = false;
                }
                Err(e) => {
                    if !failing {
                        tracing::error!(
                            error = %e,
                            "l2: renewing the answer lease failed: this node stops answering \
                             ARP/NDP for its VIPs when it runs out; retrying"
                        );
                    }
                    failing = true;
                }
            },
            _ = &mut stop => break,
        }
    }
    lease.revoke();
}

pub struct L2 {
    me: String,
    membership: Membership,
    /// Renews the answer lease with the heartbeats.
    lease: LeaseKeeper,
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
    /// Start the heartbeats, and the answer lease's renewal with them. `ifindex`/`mac`:
    /// the interface VIPs are announced on.
    pub async fn start(
        me: &str,
        spec: &AnnounceSpec,
        ifindex: u32,
        mac: [u8; 6],
        lease: Lease,
    ) -> Result<L2, L2Error> {
        let mut nodes = spec.nodes.clone();
        if nodes.is_empty() && !spec.from_cluster {
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
        let sender = Arc::new(FrameSender::open(ifindex)?);
        let membership = Membership::start(me, spec.membership, nodes).await?;
        let lease = LeaseKeeper::start(lease, spec.membership);
        tracing::info!(
            node = me,
            nodes = spec.nodes.len().max(1),
            port = spec.membership.port,
            "L2 announcement: listening for the other nodes"
        );
        Ok(L2 {
            me: me.to_string(),
            membership,
            lease,
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

    /// Clean stop: stop answering, and tell the other nodes, so they take this node's VIPs
    /// over at once.
    pub async fn leave(mut self) {
        for b in std::mem::take(&mut self.bursts).into_values() {
            b.abort();
        }
        self.lease.revoke().await;
        self.membership.leave().await;
    }
}
