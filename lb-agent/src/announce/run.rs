//! The announcement beside the sync loop: what the daemon calls around each sync, in every
//! mode, so `daemon` does not care which one runs.
//!
//! Order matters for not breaking connections: a node announces a VIP only after its maps
//! hold the VIP's services (`committed` runs after a successful sync), and on a clean stop
//! it withdraws first and keeps forwarding for `withdraw_wait` while the others take over.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use super::{
    AnnounceMode, AnnounceSpec,
    bgp::{self, BgpSettings, Bird, RouteAttrs},
    events::Transition,
    l2::{L2, L2Error, Lease},
    owner::Eligibility,
};
use crate::state::DesiredState;

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error(transparent)]
    L2(#[from] L2Error),
    #[error("BGP: no router id: set `bgp.router_id` (the node has no IPv4 address)")]
    NoRouterId,
}

/// BGP through BIRD: the routes of the last good apply, and whether the last one failed.
pub struct BgpRun {
    me: String,
    settings: BgpSettings,
    router_id: Ipv4Addr,
    bird: Bird,
    /// The config text last applied successfully (`None`: retry).
    applied: Option<String>,
    /// The VIPs of the last successful apply, and of the one being applied.
    announced: BTreeSet<IpAddr>,
    wanted_vips: BTreeSet<IpAddr>,
    wanted: String,
    ever_applied: bool,
}

impl BgpRun {
    /// Apply `text`; returns what changed in the announced VIPs once it took effect.
    async fn apply(&mut self, text: String) -> Vec<Transition> {
        self.wanted = text;
        if self.applied.as_deref() == Some(self.wanted.as_str()) {
            return Vec::new();
        }
        match self.bird.apply(&self.wanted).await {
            Ok(_) => {
                tracing::info!(config = %self.settings.bird.config.display(), "BGP: BIRD reconfigured");
                self.applied = Some(self.wanted.clone());
                self.ever_applied = true;
                let now = self.wanted_vips.clone();
                let mut out: Vec<Transition> = now
                    .difference(&self.announced)
                    .map(|v| Transition::Announced(*v))
                    .collect();
                out.extend(
                    self.announced
                        .difference(&now)
                        .map(|v| Transition::Withdrawn(*v)),
                );
                self.announced = now;
                return out;
            }
            // A sidecar BIRD starts once the agent has written its file: no socket before
            // the first success is expected.
            Err(e @ bgp::BgpError::NoSocket { .. }) if !self.ever_applied => {
                tracing::info!(error = %e, "BGP: BIRD not running yet; retrying");
                self.applied = None;
            }
            Err(e) => {
                tracing::warn!(error = %e, "BGP: reconfiguring BIRD failed; retrying");
                self.applied = None;
            }
        }
        Vec::new()
    }
}

pub enum Announcing {
    None,
    L2(Box<L2>),
    Bgp(Box<BgpRun>),
}

/// Every VIP the desired state balances, with the nodes that may announce it.
pub fn eligibility(desired: &DesiredState) -> Eligibility {
    desired
        .services
        .keys()
        .map(|a| (a.vip, desired.announce_nodes.get(&a.vip).cloned()))
        .collect()
}

/// The host routes this node announces over BGP: the VIPs it balances with a weight above
/// zero (`externalTrafficPolicy: Local` without a local endpoint: none) that this node may
/// announce (`announce_nodes`), each with its pool's attributes or the node's.
pub fn bgp_routes(
    desired: &DesiredState,
    s: &BgpSettings,
    me: &str,
) -> BTreeMap<IpAddr, RouteAttrs> {
    let vips: BTreeSet<IpAddr> = desired.services.keys().map(|a| a.vip).collect();
    vips.into_iter()
        .filter(|v| desired.announce.get(v).is_none_or(|w| *w > 0))
        .filter(|v| desired.announce_nodes.get(v).is_none_or(|n| n.contains(me)))
        .map(|v| {
            let mut attrs = desired
                .announce_routes
                .get(&v)
                .cloned()
                .unwrap_or_else(|| s.default_route_attrs());
            // `externalTrafficPolicy: Local`: weighted by this node's endpoints.
            if desired.weighted.contains(&v) {
                attrs.weight = desired.announce.get(&v).copied().filter(|w| *w > 0);
            }
            (v, attrs)
        })
        .collect()
}

impl Announcing {
    /// Start the mode `spec` asks for on interface `ifindex`/`mac`; `node_v4` is the node's
    /// IPv4 address (the default BGP router id). L2 keeps the answer `lease`; every other
    /// mode revokes it, so the data plane answers ARP/NDP for nothing.
    pub async fn start(
        me: &str,
        spec: &AnnounceSpec,
        ifindex: u32,
        mac: [u8; 6],
        node_v4: Option<Ipv4Addr>,
        mut lease: Lease,
    ) -> Result<Announcing, AnnounceError> {
        if spec.mode == AnnounceMode::L2 {
            return Ok(Announcing::L2(Box::new(
                L2::start(me, spec, ifindex, mac, lease).await?,
            )));
        }
        lease.revoke();
        match (spec.mode, &spec.bgp) {
            (AnnounceMode::Bgp, Some(settings)) => {
                let router_id = settings
                    .router_id
                    .or(node_v4)
                    .ok_or(AnnounceError::NoRouterId)?;
                tracing::info!(
                    %router_id,
                    asn = settings.local_asn,
                    peers = settings.peers.len(),
                    config = %settings.bird.config.display(),
                    "BGP announcement through BIRD"
                );
                Ok(Announcing::Bgp(Box::new(BgpRun {
                    me: me.to_string(),
                    bird: Bird::new(settings.bird.clone()),
                    settings: settings.clone(),
                    router_id,
                    applied: None,
                    announced: BTreeSet::new(),
                    wanted_vips: BTreeSet::new(),
                    wanted: String::new(),
                    ever_applied: false,
                })))
            }
            _ => Ok(Announcing::None),
        }
    }

    pub fn mode(&self) -> AnnounceMode {
        match self {
            Announcing::None => AnnounceMode::None,
            Announcing::L2(_) => AnnounceMode::L2,
            Announcing::Bgp(_) => AnnounceMode::Bgp,
        }
    }

    /// A reloaded config: new node list (L2) or BGP settings take effect; the mode and the
    /// heartbeat settings need a restart.
    pub fn reconfigure(&mut self, spec: &AnnounceSpec) {
        match self {
            Announcing::None => {}
            Announcing::L2(l2) => {
                // Static mode without a list: this node alone, as started.
                if !spec.nodes.is_empty() || spec.from_cluster {
                    l2.set_nodes(spec.nodes.clone());
                }
            }
            Announcing::Bgp(b) => {
                if let Some(s) = &spec.bgp
                    && *s != b.settings
                {
                    if s.bird != b.settings.bird {
                        tracing::warn!("changing `bgp.bird` needs a restart; keeping the paths");
                    }
                    let bird = b.settings.bird.clone();
                    b.settings = s.clone();
                    b.settings.bird = bird;
                    b.router_id = s.router_id.unwrap_or(b.router_id);
                }
            }
        }
    }

    /// Before a sync: the VIPs this node answers ARP/NDP for.
    pub fn prepare(&mut self, desired: &mut DesiredState) {
        desired.l2_owned = match self {
            Announcing::L2(l2) => l2.owned(&eligibility(desired)),
            _ => BTreeSet::new(),
        };
    }

    /// After a successful sync: announce what the maps now serve. Returns what this node
    /// started or stopped announcing, for Events.
    pub async fn committed(&mut self, desired: &DesiredState) -> Vec<Transition> {
        match self {
            Announcing::None => Vec::new(),
            Announcing::L2(l2) => l2
                .committed(&desired.l2_owned)
                .into_iter()
                .map(Transition::Announced)
                .collect(),
            Announcing::Bgp(b) => {
                // A node not among the announcing ones (Kubernetes: not Ready, cordoned
                // before a drain, excluded) withdraws everything.
                let routes = if desired.node.announce.admits(&b.me) {
                    bgp_routes(desired, &b.settings, &b.me)
                } else {
                    BTreeMap::new()
                };
                let text = bgp::render(&b.settings, b.router_id, &routes);
                b.wanted_vips = routes.keys().copied().collect();
                b.apply(text).await
            }
        }
    }

    /// The VIPs this node announces now: the ones it answers ARP/NDP for (L2, after the
    /// sync of `desired`), or the routes of BIRD's last successful reconfiguration (BGP).
    pub fn announced(&self, desired: &DesiredState) -> BTreeSet<IpAddr> {
        match self {
            Announcing::None => BTreeSet::new(),
            Announcing::L2(_) => desired.l2_owned.clone(),
            Announcing::Bgp(b) => b.announced.clone(),
        }
    }

    /// `L2` or `BGP`, for Events.
    pub fn how(&self) -> &'static str {
        match self {
            Announcing::L2(_) => "L2",
            _ => "BGP",
        }
    }

    /// Wait until the announcement needs the daemon: the live nodes changed (L2), or a
    /// failed reconfiguration is due for a retry (BGP). Cancel-safe.
    pub async fn changed(&mut self) -> Wake {
        match self {
            Announcing::L2(l2) => {
                l2.changed().await;
                Wake::Members
            }
            Announcing::Bgp(b) if b.applied.is_none() => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Wake::Retry
            }
            _ => std::future::pending().await,
        }
    }

    /// Retry a failed BGP reconfiguration.
    pub async fn retry(&mut self) -> Vec<Transition> {
        if let Announcing::Bgp(b) = self {
            let text = std::mem::take(&mut b.wanted);
            return b.apply(text).await;
        }
        Vec::new()
    }

    /// Clean stop: withdraw (BGP) or hand the VIPs over (L2), then keep forwarding for
    /// `wait` while routers and clients move to the other nodes.
    pub async fn stop(self, wait: Duration) {
        match self {
            Announcing::None => return,
            Announcing::L2(l2) => {
                l2.leave().await;
                tracing::info!("L2: told the other nodes this one is leaving");
            }
            Announcing::Bgp(mut b) => {
                let text = bgp::render(&b.settings, b.router_id, &BTreeMap::new());
                match b.bird.apply(&text).await {
                    Ok(_) => tracing::info!("BGP: every route withdrawn"),
                    Err(e) => tracing::warn!(error = %e, "BGP: withdrawing the routes failed"),
                }
            }
        }
        tokio::time::sleep(wait).await;
    }
}

/// Why [`Announcing::changed`] returned.
pub enum Wake {
    Members,
    Retry,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Protocol, ServiceAddr, ServiceSpec};

    fn settings() -> BgpSettings {
        let raw: bgp::RawBgp = serde_yaml_ng::from_str(
            "local_asn: 64512\ncommunities: [\"64512:1\"]\npeers: [{address: 198.18.2.254, asn: 64500}]\n",
        )
        .unwrap();
        bgp::settings(&raw).unwrap()
    }

    fn with_vips(vips: &[&str]) -> DesiredState {
        let mut d = DesiredState::default();
        for v in vips {
            let vip: IpAddr = v.parse().unwrap();
            d.services.insert(
                ServiceAddr {
                    vip,
                    port: 80,
                    protocol: Protocol::Tcp,
                },
                ServiceSpec {
                    name: v.to_string(),
                    forwarding: lb_common::Forwarding::Ipip,
                    table_size: None,
                    flow_tracking: true,
                    source_ranges: None,
                    fragments: false,
                    affinity_timeout_s: None,
                    backends: BTreeMap::new(),
                },
            );
            d.announce.insert(vip, 1);
        }
        d
    }

    #[test]
    fn routes_follow_weights_admission_and_pool_attributes() {
        let s = settings();
        let ip = |v: &str| v.parse::<IpAddr>().unwrap();
        let mut d = with_vips(&["198.18.0.1", "198.18.0.2", "198.18.0.3", "198.18.0.4"]);
        // .2: Local without an endpoint here; .3: Local with three; .4: a pool admits only
        // node-b, and sets its own attributes.
        d.announce.insert(ip("198.18.0.2"), 0);
        d.announce.insert(ip("198.18.0.3"), 3);
        d.weighted.extend([ip("198.18.0.2"), ip("198.18.0.3")]);
        d.announce_nodes
            .insert(ip("198.18.0.4"), ["node-b".to_string()].into());
        d.announce_routes.insert(
            ip("198.18.0.4"),
            RouteAttrs {
                local_pref: Some(50),
                ..RouteAttrs::default()
            },
        );
        let a = bgp_routes(&d, &s, "node-a");
        assert_eq!(
            a.keys().copied().collect::<Vec<_>>(),
            [ip("198.18.0.1"), ip("198.18.0.3")]
        );
        assert_eq!(a[&ip("198.18.0.1")].communities, [(64512, 1)]);
        assert_eq!(a[&ip("198.18.0.1")].weight, None, "Cluster: plain ECMP");
        assert_eq!(a[&ip("198.18.0.3")].weight, Some(3));
        let b = bgp_routes(&d, &s, "node-b");
        assert_eq!(b[&ip("198.18.0.4")].local_pref, Some(50));
        assert!(
            b[&ip("198.18.0.4")].communities.is_empty(),
            "the pool's, not the node's"
        );
    }
}
