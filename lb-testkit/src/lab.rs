//! A bridged lab: client, load balancer and N backends on one L2 segment.
//!
//! ```text
//!   client ns          lb ns            backend ns b1..bN
//!   eth0 198.18.0.1    eth0 198.18.0.2  eth0 198.18.0.11.. (+ VIP/32 on lo)
//!     |                  |                |
//!     c0                lb0               b1..bN        <- veth peers
//!     +------------------+----------------+---- br0     (bridge namespace)
//! ```
//!
//! Every host also has 2001:db8::<its last IPv4 octet> (see [`v6_of`]), and the VIP has its
//! IPv6 twin, so each test can run over either family.
//!
//! The client routes the VIP via the LB; backends own the VIP on `lo` with ARP for it
//! suppressed (`arp_ignore=1`, `arp_announce=2`), the usual direct-server-return setup.
//! Every namespace is a [`NetNs`] guard, so dropping the [`Lab`] removes everything; deleting a
//! namespace removes its veth and with it the peer on the bridge.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::netns::NetNs;

/// The subnet every lab host sits on.
pub const LAB_PREFIX_LEN: u8 = 24;
/// The client's address.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The load balancer's address.
pub const LB_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Last octet of the first backend's address (`b1` = 198.18.0.11).
const FIRST_BACKEND_OCTET: u8 = 11;
/// Most backends a lab can hold (addresses 198.18.0.11 ..= 198.18.0.99).
pub const MAX_BACKENDS: usize = 89;
/// Interface name of every host's link into the lab.
pub const HOST_IFACE: &str = "eth0";
/// Name of the bridge inside the bridge namespace.
pub const BRIDGE: &str = "br0";
/// The default VIP.
pub const DEFAULT_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);

/// How long [`Lab::new`] waits for every bridge port to reach the forwarding state.
const PORT_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// What to build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabSpec {
    /// Number of backends, 1..=[`MAX_BACKENDS`]; default 3.
    pub backends: usize,
    /// The service address; must be in 198.18.0.0/15 and not a host address. Default
    /// 198.18.0.100.
    pub vip: Ipv4Addr,
    /// Route the VIP via the LB in the client (default). `false`: no route; the client,
    /// on the VIP's subnet, resolves it by ARP/NDP, so the LB must announce it (L2).
    pub vip_route: bool,
}

impl Default for LabSpec {
    fn default() -> Self {
        LabSpec {
            backends: 3,
            vip: DEFAULT_VIP,
            vip_route: true,
        }
    }
}

/// One backend host.
#[derive(Debug)]
pub struct Backend {
    /// `b1`, `b2`, ...
    pub name: String,
    /// Its namespace.
    pub ns: NetNs,
    /// Address of its `eth0`.
    pub addr: Ipv4Addr,
    /// MAC of its `eth0`.
    pub mac: [u8; 6],
    /// Name of its veth peer in the bridge namespace (same as `name`).
    pub peer: String,
}

/// The running lab; dropping it deletes every namespace.
#[derive(Debug)]
pub struct Lab {
    vip: Ipv4Addr,
    client: NetNs,
    lb: NetNs,
    backends: Vec<Backend>,
    // Declared last so it is dropped last: hosts go first, taking their veths with them.
    bridge: NetNs,
}

/// The deterministic, locally administered MAC of a host's `eth0`: `02:00:00:00:00:<last address octet>`.
pub fn host_mac(addr: Ipv4Addr) -> [u8; 6] {
    [0x02, 0, 0, 0, 0, addr.octets()[3]]
}

/// The MAC of a host's veth peer on the bridge: `02:00:00:00:01:<last address octet>`.
pub fn peer_mac(addr: Ipv4Addr) -> [u8; 6] {
    [0x02, 0, 0, 0, 1, addr.octets()[3]]
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Lab {
    /// Builds the topology described in the module docs.
    pub fn new(spec: LabSpec) -> Result<Lab> {
        ensure!(
            (1..=MAX_BACKENDS).contains(&spec.backends),
            "a lab holds 1..={MAX_BACKENDS} backends, not {}",
            spec.backends
        );
        let vip_octets = spec.vip.octets();
        ensure!(
            vip_octets[0] == 198 && (vip_octets[1] & 0xfe) == 18,
            "VIP {} is outside 198.18.0.0/15",
            spec.vip
        );
        let backend_addrs: Vec<Ipv4Addr> = (0..spec.backends)
            .map(|i| Ipv4Addr::new(198, 18, 0, FIRST_BACKEND_OCTET + i as u8))
            .collect();
        ensure!(
            spec.vip != CLIENT_ADDR && spec.vip != LB_ADDR && !backend_addrs.contains(&spec.vip),
            "VIP {} collides with a host address",
            spec.vip
        );

        let bridge = new_bridge("lbtbr", true)?;

        let client = NetNs::new("lbtc").context("creating client namespace")?;
        attach_host(&bridge, &client, "c0", CLIENT_ADDR)?;
        let lb = NetNs::new("lbtlb").context("creating lb namespace")?;
        attach_host(&bridge, &lb, "lb0", LB_ADDR)?;

        if spec.vip_route {
            route_vip_via_lb(&client, spec.vip)?;
        }

        let mut backends = Vec::with_capacity(spec.backends);
        for (i, addr) in backend_addrs.into_iter().enumerate() {
            let name = format!("b{}", i + 1);
            let ns = NetNs::new(&format!("lbt{name}"))
                .with_context(|| format!("creating backend namespace {name}"))?;
            attach_host(&bridge, &ns, &name, addr)?;
            configure_backend(&ns, spec.vip).with_context(|| format!("configuring {name}"))?;
            backends.push(Backend {
                peer: name.clone(),
                name,
                ns,
                addr,
                mac: host_mac(addr),
            });
        }

        let lab = Lab {
            vip: spec.vip,
            client,
            lb,
            backends,
            bridge,
        };
        lab.wait_ports_forwarding()?;
        Ok(lab)
    }

    /// The IPv6 VIP (`v6_of(vip)`, 198.18.0.100 → 2001:db8::100).
    pub fn vip6(&self) -> Ipv6Addr {
        v6_of(self.vip)
    }

    /// The client's IPv6 address.
    pub fn client_addr6(&self) -> Ipv6Addr {
        v6_of(CLIENT_ADDR)
    }

    /// The client namespace.
    pub fn client(&self) -> &NetNs {
        &self.client
    }

    /// The load-balancer namespace.
    pub fn lb(&self) -> &NetNs {
        &self.lb
    }

    /// The backends, `b1` first.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The namespace holding `br0` and every veth peer.
    pub fn bridge_ns(&self) -> &NetNs {
        &self.bridge
    }

    /// The service address.
    pub fn vip(&self) -> Ipv4Addr {
        self.vip
    }

    /// The client's address.
    pub fn client_addr(&self) -> Ipv4Addr {
        CLIENT_ADDR
    }

    /// The client's `eth0` MAC.
    pub fn client_mac(&self) -> [u8; 6] {
        host_mac(CLIENT_ADDR)
    }

    /// The LB's address.
    pub fn lb_addr(&self) -> Ipv4Addr {
        LB_ADDR
    }

    /// The LB's `eth0` MAC.
    pub fn lb_mac(&self) -> [u8; 6] {
        host_mac(LB_ADDR)
    }

    /// The LB's interface (where the XDP program goes): `eth0`.
    pub fn lb_iface(&self) -> &'static str {
        HOST_IFACE
    }

    /// The client's veth peer in the bridge namespace: `c0`.
    pub fn client_peer(&self) -> &'static str {
        "c0"
    }

    /// The LB's veth peer in the bridge namespace: `lb0`.
    pub fn lb_peer(&self) -> &'static str {
        "lb0"
    }

    /// Every veth peer in the bridge namespace: `c0`, `lb0`, `b1`, ...
    pub fn bridge_peers(&self) -> Vec<&str> {
        let mut peers = vec![self.client_peer(), self.lb_peer()];
        peers.extend(self.backends.iter().map(|b| b.peer.as_str()));
        peers
    }

    /// Names of every namespace this lab owns.
    pub fn netns_names(&self) -> Vec<String> {
        let mut names = vec![
            self.bridge.name().to_owned(),
            self.client.name().to_owned(),
            self.lb.name().to_owned(),
        ];
        names.extend(self.backends.iter().map(|b| b.ns.name().to_owned()));
        names
    }

    /// Waits (bounded) until every bridge port forwards.
    fn wait_ports_forwarding(&self) -> Result<()> {
        wait_ports_forwarding(&self.bridge, &self.bridge_peers())
    }
}

/// Waits until every one of `peers` (ports of [`BRIDGE`] in `bridge`) is forwarding, at most
/// 5 s in all.
pub fn wait_ports_forwarding(bridge: &NetNs, peers: &[&str]) -> Result<()> {
    let deadline = Instant::now() + PORT_READY_TIMEOUT;
    for peer in peers {
        loop {
            let out = bridge.ip(&["-d", "link", "show", "dev", peer])?;
            if out.contains("state forwarding") {
                break;
            }
            if Instant::now() >= deadline {
                bail!("bridge port {peer} not forwarding after {PORT_READY_TIMEOUT:?}: {out}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// Creates the veth pair `peer` (bridge side) / `eth0` (host side), addresses and raises it.
pub fn attach_host(bridge: &NetNs, host: &NetNs, peer: &str, addr: Ipv4Addr) -> Result<()> {
    let host_mac = fmt_mac(host_mac(addr));
    let peer_mac = fmt_mac(peer_mac(addr));
    bridge
        .ip(&[
            "link",
            "add",
            peer,
            "address",
            &peer_mac,
            "type",
            "veth",
            "peer",
            "name",
            HOST_IFACE,
            "address",
            &host_mac,
            "netns",
            host.name(),
        ])
        .with_context(|| format!("creating veth {peer} <-> {}/{HOST_IFACE}", host.name()))?;
    bridge.ip(&["link", "set", peer, "master", BRIDGE])?;
    bridge.ip(&["link", "set", peer, "up"])?;
    host.ip(&[
        "addr",
        "add",
        &format!("{addr}/{LAB_PREFIX_LEN}"),
        "dev",
        HOST_IFACE,
    ])
    .with_context(|| format!("addressing {} in {}", HOST_IFACE, host.name()))?;
    // The same host on IPv6: 2001:db8::<last octet, in decimal digits>, no DAD delay.
    host.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
    host.sysctl(&format!("net.ipv6.conf.{HOST_IFACE}.accept_dad"), "0")?;
    host.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{}/{LAB_PREFIX_LEN_V6}", v6_of(addr)),
        "dev",
        HOST_IFACE,
        "nodad",
    ])
    .with_context(|| format!("addressing {} (IPv6) in {}", HOST_IFACE, host.name()))?;
    host.ip(&["link", "set", HOST_IFACE, "up"])?;
    Ok(())
}

/// Prefix length of the lab's IPv6 subnet (2001:db8::/64).
const LAB_PREFIX_LEN_V6: u8 = 64;

/// The IPv6 address of the host whose IPv4 address is `addr`: 2001:db8::<last octet>, the
/// octet written in decimal digits (198.18.0.11 → 2001:db8::11).
pub fn v6_of(addr: Ipv4Addr) -> Ipv6Addr {
    let last = addr.octets()[3] as u16;
    let digits = (last / 100) * 0x100 + ((last / 10) % 10) * 0x10 + last % 10;
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, digits)
}

/// DSR backend: VIPs (IPv4 and IPv6) on `lo`, no ARP for them, no reverse-path filtering.
pub fn configure_backend(ns: &NetNs, vip: Ipv4Addr) -> Result<()> {
    ns.ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"])
        .context("adding the VIP to lo")?;
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{}/128", v6_of(vip)),
        "dev",
        "lo",
        "nodad",
    ])
    .context("adding the IPv6 VIP to lo")?;
    for (key, value) in [
        ("net.ipv4.conf.all.arp_ignore", "1"),
        ("net.ipv4.conf.all.arp_announce", "2"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.eth0.rp_filter", "0"),
    ] {
        ns.sysctl(key, value)?;
    }
    Ok(())
}

/// A namespace `prefix…` holding the up bridge [`BRIDGE`] (no STP, no forwarding delay;
/// multicast snooping off when `snooping` is false, so every Neighbor Solicitation reaches
/// every port).
pub fn new_bridge(prefix: &str, snooping: bool) -> Result<NetNs> {
    let bridge = NetNs::new(prefix).context("creating bridge namespace")?;
    let snooping = if snooping { "1" } else { "0" };
    bridge
        .ip(&[
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
            "mcast_snooping",
            snooping,
        ])
        .context("creating bridge")?;
    bridge.ip(&["link", "set", BRIDGE, "up"])?;
    Ok(bridge)
}

/// No unknown-unicast flooding to bridge port `port`. A NIC takes only frames to its own
/// MAC (and broadcast, multicast), but generic XDP on a veth sees every frame the bridge
/// floods: once a dead node's port is down its MAC is unknown and flooded, and a live
/// node's program would forward the dead node's traffic.
pub fn no_unicast_flood(bridge: &NetNs, port: &str) -> Result<()> {
    bridge
        .ip(&[
            "link",
            "set",
            "dev",
            port,
            "type",
            "bridge_slave",
            "flood",
            "off",
        ])
        .with_context(|| format!("no unknown-unicast flooding to {port}"))?;
    Ok(())
}

/// How long [`wait_decaps_attached`] waits for every backend's decap program.
const DECAP_ATTACH_TIMEOUT: Duration = Duration::from_secs(20);

/// Wait until each backend's XDP decap program is attached; `decaps[i]` runs on
/// `backends[i]`, and one that exits first is an error naming its backend.
pub fn wait_decaps_attached(backends: &[Backend], decaps: &mut [crate::ChildGuard]) -> Result<()> {
    let deadline = Instant::now() + DECAP_ATTACH_TIMEOUT;
    for (b, decap) in backends.iter().zip(decaps) {
        loop {
            if b.ns
                .ip(&["-d", "link", "show", HOST_IFACE])?
                .contains("prog/xdp")
            {
                break;
            }
            if let Some(status) = decap.try_wait()? {
                bail!("decap on {} exited early ({status})", b.name);
            }
            if Instant::now() > deadline {
                bail!(
                    "the decap program did not attach on {} within {DECAP_ATTACH_TIMEOUT:?}",
                    b.name
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// Route the VIP (and its IPv6 twin) via the LB in the client.
fn route_vip_via_lb(client: &NetNs, vip: Ipv4Addr) -> Result<()> {
    client
        .ip(&[
            "route",
            "add",
            &format!("{vip}/32"),
            "via",
            &LB_ADDR.to_string(),
            "dev",
            HOST_IFACE,
        ])
        .context("routing the VIP via the LB in the client")?;
    client
        .ip(&[
            "-6",
            "route",
            "add",
            &format!("{}/128", v6_of(vip)),
            "via",
            &v6_of(LB_ADDR).to_string(),
            "dev",
            HOST_IFACE,
        ])
        .context("routing the IPv6 VIP via the LB in the client")?;
    Ok(())
}
