//! BGP announcement through real BIRD 2 daemons and real kernel ECMP routes.
//!
//! ```text
//!   router ns  eth0 198.18.2.254 / 2001:db8:2::254   BIRD: AS 64500, kernel protocol, ECMP
//!   lb1..lb3   eth0 198.18.2.1..3 / 2001:db8:2::1..3 BIRD: AS 64512, bird.conf = render(...)
//!       all on br0 in a bridge namespace (veth pairs)
//! ```
//!
//! Each LB node's BIRD runs the configuration the agent's own code renders, announcing
//! 198.18.100.1 and 2001:db8:100::1, and is driven by the agent's [`Bird`] controller. The
//! router's kernel route for each VIP must have one next hop per node announcing it: through
//! a graceful withdraw (`Bird::apply` of an empty route set), a refused configuration, a
//! SIGKILLed BIRD and the way back. Needs root and BIRD 2 (Debian package bird2); fails with
//! a clear message otherwise. Prints the measured times.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lb_agent::announce::bgp::{
    self, Applied, BgpError, BgpSettings, Bird, BirdPaths, RawBgp, RouteAttrs,
};
use lb_testkit::{
    NetNs,
    bird::{BirdDaemon, route_nexthops, router_config, wait_route},
    require_root,
    scenario::DirGuard,
};

const ROUTER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 254);
const ROUTER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x254);
const ROUTER_ASN: u32 = 64500;
const LB_ASN: u32 = 64512;
const NODES: u8 = 3;
const VIP4: &str = "198.18.100.1/32";
const VIP6: &str = "2001:db8:100::1/128";
/// A VIP only node 1 announces for a while, to show a reload keeps the sessions.
const EXTRA_VIP4: &str = "198.18.100.2/32";

/// Sessions coming up from nothing (connect delay 1 s on both sides, retries).
const SESSION_TIMEOUT: Duration = Duration::from_secs(30);
/// A withdrawal or announcement over established sessions, or a session closing.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the measuring loops look at the router's routes.
const POLL: Duration = Duration::from_millis(5);

/// The settings every node uses, through the same YAML path as the static config.
const SETTINGS_YAML: &str = r#"
local_asn: 64512
hold_time: 9
communities: ["64512:100"]
large_communities: ["64512:1:2"]
local_pref: 200
peers:
  - address: 198.18.2.254
    asn: 64500
    hold_time: 3
  - address: "2001:db8:2::254"
    asn: 64500
"#;

struct Node {
    ns: NetNs,
    v4: Ipv4Addr,
    v6: Ipv6Addr,
    link_local: Ipv6Addr,
}

impl Node {
    /// Whether `gw` (a router's next hop) is this node.
    fn is(&self, gw: &IpAddr) -> bool {
        *gw == IpAddr::V4(self.v4)
            || *gw == IpAddr::V6(self.v6)
            || *gw == IpAddr::V6(self.link_local)
    }
}

/// Field order is drop order: daemons first, then the hosts (their veths go with them),
/// the bridge, the directory.
struct Topology {
    router_bird: Option<BirdDaemon>,
    lb_birds: Vec<Option<BirdDaemon>>,
    router: Node,
    lbs: Vec<Node>,
    _bridge: NetNs,
    dir: DirGuard,
}

fn settings() -> BgpSettings {
    let raw: RawBgp = serde_yaml_ng::from_str(SETTINGS_YAML).expect("test settings parse");
    bgp::settings(&raw).expect("test settings are valid")
}

fn vip_routes(s: &BgpSettings, vips: &[&str]) -> BTreeMap<IpAddr, RouteAttrs> {
    vips.iter()
        .map(|v| {
            let addr = v.split('/').next().unwrap_or(v);
            (addr.parse().expect("test VIP"), s.default_route_attrs())
        })
        .collect()
}

impl Topology {
    fn build() -> Result<Topology> {
        let dir =
            DirGuard(std::env::temp_dir().join(format!("lb-bgp-bird-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).context("creating the work directory")?;
        let bridge = NetNs::new("bgpbr").context("creating the bridge namespace")?;
        bridge.ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "stp_state",
            "0",
            "forward_delay",
            "0",
            "mcast_snooping",
            "0",
        ])?;
        bridge.ip(&["link", "set", "br0", "up"])?;
        let router = host(&bridge, "bgprt", "r0", ROUTER_V4, ROUTER_V6)?;
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.ipv4.fib_multipath_hash_policy", "1"),
            ("net.ipv6.fib_multipath_hash_policy", "1"),
        ] {
            router.ns.sysctl(key, value)?;
        }
        let mut lbs = Vec::new();
        for i in 1..=NODES {
            let v4 = Ipv4Addr::new(198, 18, 2, i);
            let v6 = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, u16::from(i));
            lbs.push(host(&bridge, "bgplb", &format!("l{i}"), v4, v6)?);
        }
        Ok(Topology {
            router_bird: None,
            lb_birds: (0..NODES).map(|_| None).collect(),
            router,
            lbs,
            _bridge: bridge,
            dir,
        })
    }

    fn start_router(&mut self) -> Result<()> {
        let neighbors: Vec<(IpAddr, u32)> = self
            .lbs
            .iter()
            .flat_map(|n| [(IpAddr::V4(n.v4), LB_ASN), (IpAddr::V6(n.v6), LB_ASN)])
            .collect();
        let config = router_config(ROUTER_V4, ROUTER_ASN, &neighbors);
        self.router_bird = Some(BirdDaemon::start(&self.router.ns, &self.dir.0, &config)?);
        Ok(())
    }

    fn start_lb(&mut self, i: usize, config: &str) -> Result<()> {
        let bird = BirdDaemon::start(&self.lbs[i].ns, &self.dir.0, config)
            .with_context(|| format!("starting BIRD on lb{}", i + 1))?;
        self.lb_birds[i] = Some(bird);
        Ok(())
    }

    fn lb_bird(&self, i: usize) -> Result<&BirdDaemon> {
        self.lb_birds[i]
            .as_ref()
            .with_context(|| format!("BIRD does not run on lb{}", i + 1))
    }

    /// The agent's view of node `i`'s BIRD.
    fn paths(&self, i: usize) -> Result<BirdPaths> {
        let bird = self.lb_bird(i)?;
        Ok(BirdPaths {
            config: bird.config_path().to_path_buf(),
            socket: bird.socket().to_path_buf(),
            birdc: PathBuf::from("birdc"),
        })
    }

    fn router_birdc(&self, args: &[&str]) -> Result<String> {
        self.router_bird
            .as_ref()
            .context("the router's BIRD does not run")?
            .birdc(args)
    }

    /// Which nodes the router's route for `prefix` leads to (indices), and whether every
    /// next hop is a node, at most once.
    fn nodes_of(&self, prefix: &str) -> Result<BTreeSet<usize>> {
        let hops = route_nexthops(&self.router.ns, prefix)?;
        let mut nodes = BTreeSet::new();
        for gw in &hops {
            let i =
                self.lbs.iter().position(|n| n.is(gw)).with_context(|| {
                    format!("next hop {gw} of {prefix} is no LB node ({hops:?})")
                })?;
            ensure!(
                nodes.insert(i),
                "lb{} twice in {prefix}'s next hops {hops:?}",
                i + 1
            );
        }
        Ok(nodes)
    }

    /// Waits until both VIPs lead to exactly `want`; returns how long after `start` each
    /// family got there.
    fn wait_both(
        &self,
        want: &[usize],
        start: Instant,
        timeout: Duration,
    ) -> Result<(Duration, Duration)> {
        let want: BTreeSet<usize> = want.iter().copied().collect();
        let (mut t4, mut t6) = (None, None);
        loop {
            if t4.is_none() && self.nodes_of(VIP4)? == want {
                t4 = Some(start.elapsed());
            }
            if t6.is_none() && self.nodes_of(VIP6)? == want {
                t6 = Some(start.elapsed());
            }
            if let (Some(a), Some(b)) = (t4, t6) {
                return Ok((a, b));
            }
            if start.elapsed() > timeout {
                bail!(
                    "after {timeout:?}: {VIP4} leads to nodes {:?}, {VIP6} to {:?}, want {want:?}",
                    self.nodes_of(VIP4)?,
                    self.nodes_of(VIP6)?
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Everything that helps to see why a step failed.
    fn dump(&self) -> String {
        let mut out = String::new();
        if let Some(b) = &self.router_bird {
            out += &format!(
                "--- router protocols:\n{}\n--- router routes:\n{}\n--- router log:\n{}\n",
                b.birdc(&["show", "protocols"])
                    .unwrap_or_else(|e| format!("{e:#}")),
                b.birdc(&["show", "route"])
                    .unwrap_or_else(|e| format!("{e:#}")),
                b.log_text()
            );
        }
        for (i, b) in self.lb_birds.iter().enumerate() {
            if let Some(b) = b {
                out += &format!(
                    "--- lb{} protocols:\n{}\n--- lb{} log:\n{}\n",
                    i + 1,
                    b.birdc(&["show", "protocols"])
                        .unwrap_or_else(|e| format!("{e:#}")),
                    i + 1,
                    b.log_text()
                );
            }
        }
        for prefix in [VIP4, VIP6] {
            out += &format!(
                "--- router kernel route {prefix}: {:?}\n",
                route_nexthops(&self.router.ns, prefix)
            );
        }
        out
    }
}

/// A namespace on the bridge: veth `peer` (bridge side) / `eth0`, both addresses, no DAD.
fn host(bridge: &NetNs, prefix: &str, peer: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Result<Node> {
    let ns = NetNs::new(prefix)?;
    bridge
        .ip(&[
            "link",
            "add",
            peer,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ])
        .with_context(|| format!("creating veth {peer}"))?;
    bridge.ip(&["link", "set", peer, "master", "br0"])?;
    bridge.ip(&["link", "set", peer, "up"])?;
    ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
    ns.sysctl("net.ipv6.conf.eth0.accept_dad", "0")?;
    ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{v6}/64"),
        "dev",
        "eth0",
        "nodad",
    ])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    let link_local = link_local(&ns)?;
    Ok(Node {
        ns,
        v4,
        v6,
        link_local,
    })
}

fn link_local(ns: &NetNs) -> Result<Ipv6Addr> {
    let out = ns.ip(&["-j", "-6", "addr", "show", "dev", "eth0", "scope", "link"])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parsing `ip -j addr`")?;
    v.as_array()
        .into_iter()
        .flatten()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
        .find_map(|a| a["local"].as_str().and_then(|s| s.parse().ok()))
        .with_context(|| format!("no link-local address on eth0 in {}: {out}", ns.name()))
}

/// The `since` column of `birdc show protocols` for every BGP protocol of node `i`'s BIRD:
/// it changes whenever a session goes down or up.
fn session_lines(t: &Topology, i: usize) -> Result<BTreeMap<String, String>> {
    let out = t.lb_bird(i)?.birdc(&["show", "protocols"])?;
    let lines: BTreeMap<String, String> = out
        .lines()
        .filter(|l| l.starts_with("lb_peer"))
        .filter_map(|l| {
            l.split_once(' ')
                .map(|(n, rest)| (n.to_owned(), rest.trim().to_owned()))
        })
        .collect();
    ensure!(
        lines.len() == 2,
        "lb{}: not two BGP protocols:\n{out}",
        i + 1
    );
    for (name, rest) in &lines {
        ensure!(rest.contains("Established"), "lb{} {name}: {rest}", i + 1);
    }
    Ok(lines)
}

/// Node `i`'s BGP sessions are as in `before` (none restarted), else `what`, with both and
/// why BIRD says each changed one went down. A session whose hold timer ran out (3 s on
/// IPv4) restarted because the machine stalled a BIRD that long, not because of a
/// reconfiguration: that is reported, not failed.
fn same_sessions(
    t: &Topology,
    i: usize,
    before: &BTreeMap<String, String>,
    what: &str,
) -> Result<()> {
    let after = session_lines(t, i)?;
    if after == *before {
        return Ok(());
    }
    let mut last_errors = BTreeMap::new();
    for (name, line) in &after {
        if before.get(name) == Some(line) {
            continue;
        }
        let out = t.lb_bird(i)?.birdc(&["show", "protocols", "all", name])?;
        let last = out
            .lines()
            .find(|l| l.trim_start().starts_with("Last error:"))
            .map(|l| l.trim().to_owned());
        last_errors.insert(name.clone(), last);
    }
    let stalled = last_errors.values().all(|e| {
        e.as_deref()
            .is_some_and(|e| e.contains("Hold timer expired"))
    });
    ensure!(
        stalled,
        "{what}: before {before:#?}, after {after:#?}, last errors {last_errors:#?}"
    );
    println!(
        "note: lb{} sessions restarted by an expired hold timer (the machine stalled BIRD), not by the reconfiguration: {last_errors:?}",
        i + 1
    );
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[test]
fn vips_announced_withdrawn_and_killed_through_bird() {
    require_root().unwrap();
    let mut t = Topology::build().expect("building the namespaces");
    if let Err(e) = scenario(&mut t) {
        panic!("{e:#}\n{}", t.dump());
    }
}

fn scenario(t: &mut Topology) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let s = settings();
    let full = vip_routes(&s, &[VIP4, VIP6]);
    let text = |i: usize, routes: &BTreeMap<IpAddr, RouteAttrs>| bgp::render(&s, t_v4(i), routes);
    let mut times: Vec<(String, Duration)> = Vec::new();

    t.start_router()?;
    let started = Instant::now();
    for i in 0..usize::from(NODES) {
        t.start_lb(i, &text(i, &full))?;
    }
    let (up4, up6) = t.wait_both(&[0, 1, 2], started, SESSION_TIMEOUT)?;
    println!(
        "all sessions up, 3 next hops: IPv4 after {}, IPv6 after {}",
        ms(up4),
        ms(up6)
    );
    println!(
        "  {VIP4}: {:?}",
        wait_route(&t.router.ns, VIP4, 3, CHANGE_TIMEOUT)?
    );
    println!(
        "  {VIP6}: {:?}",
        wait_route(&t.router.ns, VIP6, 3, CHANGE_TIMEOUT)?
    );

    // Hold time 3 s on the IPv4 sessions (the peer's override), 9 s on the IPv6 ones, and
    // keepalives every third of it.
    for i in 0..usize::from(NODES) {
        for (proto, hold, keepalive) in [
            (bgp::protocol_name(&IpAddr::V4(ROUTER_V4)), "/3", "/1"),
            (bgp::protocol_name(&IpAddr::V6(ROUTER_V6)), "/9", "/3"),
        ] {
            let out = t.lb_bird(i)?.birdc(&["show", "protocols", "all", &proto])?;
            let timer = |name: &str| {
                out.lines()
                    .find(|l| l.trim_start().starts_with(name))
                    .map(|l| l.trim().to_owned())
            };
            let (h, k) = (timer("Hold timer:"), timer("Keepalive timer:"));
            ensure!(
                h.as_deref().is_some_and(|l| l.ends_with(hold))
                    && k.as_deref().is_some_and(|l| l.ends_with(keepalive)),
                "lb{} {proto}: hold {h:?}, keepalive {k:?}, want *{hold} and *{keepalive}:\n{out}",
                i + 1
            );
        }
    }

    // The LB nodes install nothing in their own kernel.
    for (i, n) in t.lbs.iter().enumerate() {
        for prefix in [VIP4, VIP6] {
            let family = if prefix.contains(':') { "-6" } else { "-4" };
            let out = n.ns.ip(&[
                "-j", family, "route", "show", "table", "all", "exact", prefix,
            ])?;
            ensure!(
                out.trim().is_empty() || out.trim() == "[]",
                "lb{} has a kernel route for {prefix}: {out}",
                i + 1
            );
        }
    }

    // The router sees the attributes of every node's route.
    for prefix in [VIP4, VIP6] {
        let out = t.router_birdc(&["show", "route", "for", prefix, "all"])?;
        for needle in [
            "BGP.community: (64512,100)",
            "BGP.large_community: (64512, 1, 2)",
            "BGP.local_pref: 200",
        ] {
            ensure!(
                out.matches(needle).count() == 3,
                "{prefix}: not 3 routes with {needle:?} on the router:\n{out}"
            );
        }
        println!("router: {prefix} from 3 nodes with (64512,100), (64512, 1, 2), local_pref 200");
    }

    // The agent's controller takes over each node's BIRD: the first apply asks BIRD, the
    // second finds nothing to do.
    let mut birds: Vec<Bird> = (0..usize::from(NODES))
        .map(|i| t.paths(i).map(Bird::new))
        .collect::<Result<_>>()?;
    for (i, b) in birds.iter_mut().enumerate() {
        let before = session_lines(t, i)?;
        let applied = rt.block_on(b.apply(&text(i, &full)))?;
        ensure!(
            applied == Applied::Reconfigured,
            "lb{}: first apply {applied:?}",
            i + 1
        );
        let applied = rt.block_on(b.apply(&text(i, &full)))?;
        ensure!(
            applied == Applied::Unchanged,
            "lb{}: second apply {applied:?}",
            i + 1
        );
        same_sessions(t, i, &before, &format!("lb{}: sessions flapped", i + 1))?;
    }

    // A changed route set is a reload that keeps the sessions up.
    let before = session_lines(t, 0)?;
    let more = vip_routes(&s, &[VIP4, VIP6, EXTRA_VIP4]);
    let started = Instant::now();
    rt.block_on(birds[0].apply(&text(0, &more)))?;
    let hops = wait_route(&t.router.ns, EXTRA_VIP4, 1, CHANGE_TIMEOUT)?;
    let announced = started.elapsed();
    ensure!(t.lbs[0].is(&hops[0]), "{EXTRA_VIP4} via {hops:?}, not lb1");
    same_sessions(
        t,
        0,
        &before,
        "lb1: a reload with a new VIP restarted a session",
    )?;
    println!(
        "lb1 announced {EXTRA_VIP4} by reload in {}; its sessions stayed up",
        ms(announced)
    );
    times.push((format!("announce {EXTRA_VIP4} by reload (lb1)"), announced));
    rt.block_on(birds[0].apply(&text(0, &full)))?;
    wait_route(&t.router.ns, EXTRA_VIP4, 0, CHANGE_TIMEOUT)?;

    // Graceful withdraw: no routes, sessions stay. Timed from the call (birdc included).
    let started = Instant::now();
    let applied = rt.block_on(birds[0].withdraw_all(&s, t_v4(0)))?;
    ensure!(
        applied == Applied::Reconfigured,
        "withdraw_all: {applied:?}"
    );
    let (w4, w6) = t.wait_both(&[1, 2], started, CHANGE_TIMEOUT)?;
    println!(
        "lb1 withdrew gracefully: gone from {VIP4} after {}, from {VIP6} after {}",
        ms(w4),
        ms(w6)
    );
    times.push(("graceful withdraw (lb1), IPv4".into(), w4));
    times.push(("graceful withdraw (lb1), IPv6".into(), w6));
    same_sessions(t, 0, &before, "lb1: withdrawing restarted a session")?;

    // Announce again.
    let started = Instant::now();
    rt.block_on(birds[0].apply(&text(0, &full)))?;
    let (a4, a6) = t.wait_both(&[0, 1, 2], started, CHANGE_TIMEOUT)?;
    println!(
        "lb1 announced again: back in {VIP4} after {}, {VIP6} after {}",
        ms(a4),
        ms(a6)
    );
    times.push(("re-announce (lb1), IPv4".into(), a4));
    times.push(("re-announce (lb1), IPv6".into(), a6));

    // A configuration BIRD refuses: an error with BIRD's words, the old one stays in use,
    // and the next apply asks BIRD again.
    let e = rt
        .block_on(birds[0].apply("this is not a BIRD configuration\n"))
        .expect_err("BIRD must refuse garbage");
    ensure!(matches!(e, BgpError::Rejected { .. }), "{e}");
    ensure!(e.to_string().contains("syntax error"), "{e}");
    println!("refused config: {e}");
    thread::sleep(Duration::from_millis(200));
    ensure!(
        t.nodes_of(VIP4)?.len() == 3,
        "a refused config changed the routes"
    );
    let applied = rt.block_on(birds[0].apply(&text(0, &full)))?;
    ensure!(
        applied == Applied::Reconfigured,
        "after a refusal: {applied:?}"
    );
    same_sessions(t, 0, &before, "lb1: sessions flapped over a refused config")?;

    // SIGKILL lb2's BIRD: its sessions close with its sockets.
    let killed = t.lb_birds[1].take().context("lb2's BIRD")?;
    let started = Instant::now();
    killed.kill()?;
    let (k4, k6) = t.wait_both(&[0, 2], started, CHANGE_TIMEOUT)?;
    println!(
        "lb2's BIRD killed: gone from {VIP4} after {}, from {VIP6} after {}",
        ms(k4),
        ms(k6)
    );
    times.push(("SIGKILL BIRD (lb2), IPv4".into(), k4));
    times.push(("SIGKILL BIRD (lb2), IPv6".into(), k6));
    let e = rt
        .block_on(birds[1].apply(&text(1, &vip_routes(&s, &[VIP4]))))
        .expect_err("no BIRD on lb2");
    ensure!(matches!(e, BgpError::NoSocket { .. }), "{e}");

    // lb2's BIRD starts again (with both VIPs, as the agent rendered them before); the
    // agent's next apply asks it again, since the last one failed.
    let started = Instant::now();
    t.start_lb(1, &text(1, &full))?;
    let (r4, r6) = t.wait_both(&[0, 1, 2], started, SESSION_TIMEOUT)?;
    println!(
        "lb2's BIRD restarted: back in {VIP4} after {}, {VIP6} after {}",
        ms(r4),
        ms(r6)
    );
    times.push(("BIRD restart to route (lb2), IPv4".into(), r4));
    times.push(("BIRD restart to route (lb2), IPv6".into(), r6));
    let applied = rt.block_on(birds[1].apply(&text(1, &full)))?;
    ensure!(
        applied == Applied::Reconfigured,
        "lb2 after restart: {applied:?}"
    );
    t.wait_both(&[0, 1, 2], Instant::now(), CHANGE_TIMEOUT)?;

    println!("\nmeasured:");
    for (what, d) in &times {
        println!("  {what:<40} {:>10}", ms(*d));
    }
    Ok(())
}

/// Node `i`'s address, its router id.
fn t_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, i as u8 + 1)
}
