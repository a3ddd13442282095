//! What the agent learns from the kernel over rtnetlink: the interface's index, MAC and
//! first IPv4 address, and the MAC address of the next hop towards each backend (asking the
//! kernel to resolve it when the neighbour table has no entry yet).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use futures::TryStreamExt;
use netlink_packet_route::{
    address::AddressAttribute,
    link::LinkAttribute,
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourState},
    route::{RouteAddress, RouteAttribute, RouteMessage},
};
use rtnetlink::{Handle, RouteMessageBuilder};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("netlink: {0}")]
    Connect(std::io::Error),
    #[error("interface {0:?} not found")]
    NoInterface(String),
    #[error("interface {iface:?}: {what}: {source}")]
    Netlink {
        iface: String,
        what: &'static str,
        source: rtnetlink::Error,
    },
    #[error("interface {0:?} has no MAC address")]
    NoMac(String),
    #[error("interface {0:?} has no IPv4 address; set encap_source in the config")]
    NoIpv4(String),
    #[error("interface {0:?} has no global IPv6 address; set encap_source_v6 in the config")]
    NoIpv6(String),
}

/// What [`NetInfo::resolve`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// The next-hop MAC of each backend address that has one.
    pub macs: BTreeMap<IpAddr, [u8; 6]>,
    /// Backend addresses whose next hop failed to resolve: nobody answered ARP/ND.
    pub failed: BTreeSet<IpAddr>,
}

/// One neighbour entry of the kernel.
#[derive(Clone, Copy, Debug)]
struct Neighbour {
    state: NeighbourState,
    mac: Option<[u8; 6]>,
}

impl Neighbour {
    /// The MAC, if the entry's state makes it one to send to: reachable, or stale and
    /// being verified (still the best known).
    fn usable_mac(&self) -> Option<[u8; 6]> {
        matches!(
            self.state,
            NeighbourState::Reachable
                | NeighbourState::Stale
                | NeighbourState::Delay
                | NeighbourState::Probe
                | NeighbourState::Permanent
                | NeighbourState::Noarp
        )
        .then_some(self.mac)
        .flatten()
    }

    /// Whether the kernel should be asked to resolve or verify it.
    fn needs_probe(&self) -> bool {
        self.usable_mac().is_none() || self.state == NeighbourState::Stale
    }
}

/// The attached interface as the data plane needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: [u8; 6],
    pub ipv4: Option<Ipv4Addr>,
    /// First global-scope IPv6 address (no link-local, no ULA preference).
    pub ipv6: Option<Ipv6Addr>,
    /// MTU (0 if the kernel did not say, or above 65535).
    pub mtu: u16,
    /// Every address of the interface but IPv6 link-local ones.
    pub addresses: BTreeSet<IpAddr>,
}

/// A netlink connection bound to the network namespace of the thread that opened it.
pub struct NetInfo {
    handle: Handle,
}

/// How a backend is reached from the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NextHop {
    /// On the same link: the backend's own MAC is the destination.
    Direct(IpAddr),
    /// Through a router.
    Gateway(IpAddr),
}

impl NextHop {
    pub fn addr(self) -> IpAddr {
        match self {
            NextHop::Direct(a) | NextHop::Gateway(a) => a,
        }
    }
}

impl NetInfo {
    pub fn connect() -> Result<Self, NetError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Connect)?;
        tokio::spawn(conn);
        Ok(NetInfo { handle })
    }

    pub async fn interface(&self, name: &str) -> Result<Interface, NetError> {
        let nl = |what| {
            move |source| NetError::Netlink {
                iface: name.to_string(),
                what,
                source,
            }
        };
        let link = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await
            .map_err(|e| match e {
                rtnetlink::Error::NetlinkError(ref m) if m.raw_code() == -libc::ENODEV => {
                    NetError::NoInterface(name.to_string())
                }
                e => nl("get link")(e),
            })?
            .ok_or_else(|| NetError::NoInterface(name.to_string()))?;
        let index = link.header.index;
        let mtu = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(m) => u16::try_from(*m).ok(),
                _ => None,
            })
            .unwrap_or(0);
        let mac = link
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(bytes) if bytes.len() == 6 => {
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(bytes);
                    Some(mac)
                }
                _ => None,
            })
            .ok_or_else(|| NetError::NoMac(name.to_string()))?;
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut ipv4 = None;
        let mut ipv6 = None;
        let mut addresses = BTreeSet::new();
        while let Some(msg) = addrs.try_next().await.map_err(nl("get addresses"))? {
            for a in &msg.attributes {
                if let AddressAttribute::Address(ip) = a
                    && !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
                {
                    addresses.insert(*ip);
                }
                match a {
                    AddressAttribute::Address(IpAddr::V4(v4)) if ipv4.is_none() => ipv4 = Some(*v4),
                    AddressAttribute::Address(IpAddr::V6(v6))
                        if ipv6.is_none() && !v6.is_unicast_link_local() && !v6.is_loopback() =>
                    {
                        ipv6 = Some(*v6)
                    }
                    _ => {}
                }
            }
        }
        Ok(Interface {
            name: name.to_string(),
            index,
            mac,
            ipv4,
            ipv6,
            mtu,
            addresses,
        })
    }

    /// The next hop towards `dst` according to the routing table.
    pub async fn next_hop(&self, iface: &Interface, dst: IpAddr) -> Option<NextHop> {
        let msg: RouteMessage = match dst {
            IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .build(),
        };
        let route = self
            .handle
            .route()
            .get(msg)
            .execute()
            .try_next()
            .await
            .ok()??;
        let oif = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        });
        if oif.is_some_and(|o| o != iface.index) {
            tracing::warn!(backend = %dst, iface = %iface.name, "route to backend leaves through another interface");
        }
        let gateway = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => Some(IpAddr::V4(*g)),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => Some(IpAddr::V6(*g)),
            _ => None,
        });
        Some(gateway.map_or(NextHop::Direct(dst), NextHop::Gateway))
    }

    /// The neighbour entries of the interface, with their state and MAC (if they have one).
    async fn neighbours(&self, iface: &Interface) -> BTreeMap<IpAddr, Neighbour> {
        let mut out = BTreeMap::new();
        let mut stream = self.handle.neighbours().get().execute();
        while let Ok(Some(msg)) = stream.try_next().await {
            if msg.header.ifindex != iface.index {
                continue;
            }
            let mut ip = None;
            let mut mac = None;
            for a in &msg.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v4)) => {
                        ip = Some(IpAddr::V4(*v4))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v6)) => {
                        ip = Some(IpAddr::V6(*v6))
                    }
                    NeighbourAttribute::LinkLocalAddress(b) if b.len() == 6 => {
                        let mut m = [0u8; 6];
                        m.copy_from_slice(b);
                        mac = Some(m);
                    }
                    _ => {}
                }
            }
            if let Some(ip) = ip {
                out.insert(
                    ip,
                    Neighbour {
                        state: msg.header.state,
                        mac,
                    },
                );
            }
        }
        out
    }

    /// Ask the kernel to resolve `ip` on the interface (like `ip neigh ... use`): it sends the
    /// ARP/ND request itself.
    async fn trigger_resolution(&self, iface: &Interface, ip: IpAddr) {
        let res = self
            .handle
            .neighbours()
            .add(iface.index, ip)
            .flags(NeighbourFlags::Use)
            .state(NeighbourState::None)
            .replace()
            .execute()
            .await;
        if let Err(e) = res {
            tracing::debug!(neighbour = %ip, error = %e, "could not trigger neighbour resolution");
        }
    }

    /// Resolve the next-hop MAC of every address in `backends`, waiting up to `wait` for
    /// missing neighbours, and find those whose next hop failed.
    ///
    /// The kernel learns nothing from the traffic XDP sends, so its entries of live next
    /// hops go stale; each stale one is re-verified here (the kernel probes it by unicast,
    /// keeping its MAC meanwhile), and one whose node is gone turns FAILED a few seconds
    /// later, seen by the next call. A next hop counts as failed when it has no MAC now and
    /// its entry was FAILED as this call began or is when it ends, or its backend is in
    /// `known_failed` (the caller's previous answer: it is being asked again, so the kernel
    /// shows it as INCOMPLETE meanwhile). Failed next hops are not waited for.
    pub async fn resolve(
        &self,
        iface: &Interface,
        backends: &BTreeSet<IpAddr>,
        known_failed: &BTreeSet<IpAddr>,
        wait: Duration,
    ) -> Resolved {
        let mut hops = BTreeMap::new();
        for ip in backends {
            match self.next_hop(iface, *ip).await {
                Some(hop) => {
                    hops.insert(*ip, hop.addr());
                }
                None => tracing::warn!(backend = %ip, "no route to backend"),
            }
        }
        let first = self.neighbours(iface).await;
        let failed_before: BTreeSet<IpAddr> = hops
            .iter()
            .filter(|(ip, hop)| {
                known_failed.contains(ip)
                    || first
                        .get(hop)
                        .is_some_and(|n| n.state == NeighbourState::Failed)
            })
            .map(|(_, hop)| *hop)
            .collect();
        // Everything not known for sure is (re)probed: missing, failed and stale entries.
        let probe: BTreeSet<IpAddr> = hops
            .values()
            .filter(|a| first.get(a).is_none_or(|n| n.needs_probe()))
            .copied()
            .collect();
        for addr in &probe {
            self.trigger_resolution(iface, *addr).await;
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut neigh = first;
        loop {
            let macs: BTreeMap<IpAddr, [u8; 6]> = hops
                .iter()
                .filter_map(|(ip, hop)| Some((*ip, neigh.get(hop)?.usable_mac()?)))
                .collect();
            // Next hops that had already failed are not waited for (they are re-probed, and
            // an answer is seen by the next call), so a gone node slows no sync.
            let waiting = hops
                .iter()
                .any(|(ip, hop)| !macs.contains_key(ip) && !failed_before.contains(hop));
            if !waiting || tokio::time::Instant::now() >= deadline {
                let failed = hops
                    .iter()
                    .filter(|(ip, hop)| {
                        !macs.contains_key(ip)
                            && (failed_before.contains(hop)
                                || neigh
                                    .get(hop)
                                    .is_some_and(|n| n.state == NeighbourState::Failed))
                    })
                    .map(|(ip, _)| *ip)
                    .collect();
                return Resolved { macs, failed };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            neigh = self.neighbours(iface).await;
        }
    }
}
