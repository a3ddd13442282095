//! A BGP lab: a client reaches the VIP through a router that spreads it over every
//! load-balancer node announcing it (ECMP with L4 hashing), and each node runs the agent in
//! `announce: bgp` mode beside its own BIRD.
//!
//! ```text
//!  client ns              router ns                        bridge ns (br0, 198.18.2.0/24)
//!  eth0 198.18.1.1 ────── eth0 198.18.1.254                 lb1..lbN  198.18.2.1..   agent + BIRD
//!  default via .254       eth1 198.18.2.254 ── r0 ── br0 ── b1..bM    198.18.2.11..  decap + echo
//!                         BIRD: eBGP to lb1..lb<max>,                  (VIP/32 on lo)
//!                         ECMP route to the VIP
//! ```
//!
//! The router (AS [`ROUTER_ASN`]) peers with every node address up to
//! [`BgpLabSpec::max_nodes`] from the start, so a node added later ([`BgpLab::add_node`])
//! needs no change on the router: a session to an absent neighbour just stays down. Its
//! kernel protocol merges the equal BGP routes into one multipath route
//! (`fib_multipath_hash_policy=1`: the 5-tuple picks the next hop), so each TCP connection
//! sticks to one node until the set of next hops changes.
//!
//! Each node (AS [`LB_ASN`]) runs `lb-agent run` with a static config (`announce: bgp`, one
//! TCP service on the VIP, IPIP to every backend). The agent owns the node's BIRD config:
//! it writes it and asks BIRD to reload it, so the lab starts the agent first, waits until
//! the config announces the VIP (the agent writes it once its maps hold the service), then
//! starts BIRD on that very file: the agent's `bgp.bird` paths are the ones
//! [`BirdDaemon::start`] uses for the node's namespace. The backends route everything via the
//! router, own the VIP on `lo` without answering ARP for it, and run `lb-agent decap` and an
//! [`EchoServer`] on VIP:[`SERVICE_PORT`].
//!
//! Dropping the [`BgpLab`] stops every agent (all at once, so their hand-over waits
//! overlap), every BIRD, decap program and echo server, removes the pin directories (and so
//! the links of killed agents), the namespaces and the temporary files; on a panic it first
//! prints every log and the router's view.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use nix::{sys::signal::Signal, unistd::Pid};

use crate::{
    ChildGuard, EchoServer, NetNs,
    bird::{self, BirdDaemon},
    lab::{Backend, HOST_IFACE, attach_host, host_mac, wait_ports_forwarding},
    scenario::DirGuard,
};

/// The client's address (on its own segment with the router).
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// The router's address on the client's segment.
pub const ROUTER_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 254);
/// The router's address on the load-balancer segment.
pub const ROUTER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 254);
/// The VIP: off every segment, so only the BGP routes lead to it.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
/// The service port (TCP).
pub const SERVICE_PORT: u16 = 80;
/// The router's AS.
pub const ROUTER_ASN: u32 = 64500;
/// Every load-balancer node's AS.
pub const LB_ASN: u32 = 64512;
/// Most nodes a lab can hold (`lb1`..`lb8` = 198.18.2.1 ..= 198.18.2.8).
pub const MAX_NODES: usize = 8;
/// Last octet of the first backend's address (`b1` = 198.18.2.11).
const FIRST_BACKEND_OCTET: u8 = 11;
/// Most backends a lab can hold (198.18.2.11 ..= 198.18.2.99).
pub const MAX_BACKENDS: usize = 89;
/// Prefix length of both segments.
const PREFIX_LEN: u8 = 24;
/// The router's interface to the client.
pub const ROUTER_CLIENT_IFACE: &str = "eth0";
/// The router's interface to the load-balancer segment.
pub const ROUTER_LB_IFACE: &str = "eth1";
/// The router's veth peer on the bridge.
const ROUTER_PEER: &str = "r0";

/// How long [`BgpLab::start_agent`] waits for "load balancer attached".
const AGENT_ATTACH_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`BgpLab::start_bird`] waits for the agent to write the BIRD config.
const BIRD_CONFIG_TIMEOUT: Duration = Duration::from_secs(20);
/// How long [`BgpLab::stop_node`] waits for the agent to exit, beyond its hand-over time.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long [`BgpLab::stop_node`] keeps watching the route after an agent exited first.
const LATE_WITHDRAW_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of each BIRD log that [`BgpLab::logs`] shows.
const LOG_TAIL_LINES: usize = 40;
/// How often the wait loops look again.
const POLL: Duration = Duration::from_millis(50);
/// How often [`BgpLab::stop_node`] and [`BgpLab::wait_nexthops`] look at the route.
const ROUTE_POLL: Duration = Duration::from_millis(10);

/// What to build and how to run it.
#[derive(Clone, Debug)]
pub struct BgpLabSpec {
    /// Path of the `lb-agent` binary.
    pub agent_bin: PathBuf,
    /// Nodes [`BgpLab::start`] starts (`lb1`..); default 3.
    pub nodes: usize,
    /// Nodes the router peers with (`lb1`..`lb<max_nodes>`), at least `nodes`, at most
    /// [`MAX_NODES`]; default 4.
    pub max_nodes: usize,
    /// Backends, 1..=[`MAX_BACKENDS`]; default 3.
    pub backends: usize,
    /// `--xdp-mode` of agents and decap programs; default `skb`.
    pub xdp_mode: String,
    /// The nodes' `bgp.hold_time` in seconds; default 3.
    pub hold_time: u16,
    /// The agents' `--handover-ms`; default 500.
    pub handover_ms: u64,
}

impl BgpLabSpec {
    /// Three nodes of four, three backends, generic XDP, hold time 3 s, hand-over 500 ms.
    pub fn new(agent_bin: impl Into<PathBuf>) -> BgpLabSpec {
        BgpLabSpec {
            agent_bin: agent_bin.into(),
            nodes: 3,
            max_nodes: 4,
            backends: 3,
            xdp_mode: "skb".into(),
            hold_time: 3,
            handover_ms: 500,
        }
    }
}

/// One load-balancer node's host.
#[derive(Debug)]
pub struct BgpNode {
    /// `lb1`, `lb2`, ... (also its `--node-name`).
    pub name: String,
    /// Its namespace.
    pub ns: NetNs,
    /// Address of its `eth0` (also its BGP router id and the router's next hop).
    pub addr: Ipv4Addr,
    /// Name of its veth peer in the bridge namespace (same as `name`).
    pub peer: String,
}

/// A node with what runs on it.
#[derive(Debug)]
struct Node {
    // Field order is drop order: the agent withdraws through BIRD, so it goes first; the pins
    // (a killed agent's link) before the namespace.
    agent: Option<ChildGuard>,
    bird: Option<BirdDaemon>,
    pin_dir: DirGuard,
    host: BgpNode,
    /// This node's directory: agent config and logs, BIRD config and socket.
    dir: PathBuf,
    /// Agents started so far (each logs to its own file).
    starts: u32,
}

/// What [`BgpLab::stop_node`] saw after SIGTERM.
#[derive(Clone, Copy, Debug)]
pub struct GracefulStop {
    /// When the router's route to the VIP lost this node, after the signal (`None`: not
    /// within [`LATE_WITHDRAW_TIMEOUT`] after the exit).
    pub withdrawn_after: Option<Duration>,
    /// When the agent exited, after the signal.
    pub exited_after: Duration,
    /// Its exit status.
    pub status: ExitStatus,
}

impl GracefulStop {
    /// Whether the route went before the agent (and so its forwarding) did.
    pub fn withdrawn_before_exit(&self) -> bool {
        self.withdrawn_after.is_some_and(|w| w < self.exited_after)
    }
}

/// The running lab; dropping it stops and removes everything.
pub struct BgpLab {
    // Field order is drop order: nodes (agents, BIRDs, pins, namespaces) first, then the
    // router's BIRD, the backends, the other namespaces, the bridge and the files.
    nodes: Vec<Node>,
    router_bird: Option<BirdDaemon>,
    decaps: Vec<ChildGuard>,
    servers: Vec<EchoServer>,
    backends: Vec<Backend>,
    client: NetNs,
    router: NetNs,
    bridge: NetNs,
    work_dir: DirGuard,
    tag: String,
    spec: BgpLabSpec,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The address of node `i` (0-based): 198.18.2.<i + 1>.
pub fn node_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, i as u8 + 1)
}

impl BgpLab {
    /// Builds the topology, starts the backends, the router's BIRD and the first
    /// [`BgpLabSpec::nodes`] nodes (agent, then BIRD). Does not wait for the routes.
    pub fn start(spec: BgpLabSpec) -> Result<BgpLab> {
        let mut lab = BgpLab::new(spec)?;
        lab.start_backends()?;
        lab.start_router()?;
        for _ in 0..lab.spec.nodes {
            lab.add_node()?;
        }
        Ok(lab)
    }

    /// Builds the topology without nodes: client, router, bridge, backends. Nothing runs.
    pub fn new(spec: BgpLabSpec) -> Result<BgpLab> {
        ensure!(
            (1..=MAX_NODES).contains(&spec.max_nodes) && spec.nodes <= spec.max_nodes,
            "a BGP lab starts 0..=max_nodes nodes of 1..={MAX_NODES}, not {} of {}",
            spec.nodes,
            spec.max_nodes
        );
        ensure!(
            (1..=MAX_BACKENDS).contains(&spec.backends),
            "a BGP lab holds 1..={MAX_BACKENDS} backends, not {}",
            spec.backends
        );
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("lbt-bgp-{}-{n}", std::process::id());
        let work_dir = DirGuard(std::env::temp_dir().join(&tag));
        fs::create_dir_all(&work_dir.0)
            .with_context(|| format!("creating {}", work_dir.0.display()))?;

        let bridge = crate::lab::new_bridge("lbbgbr", true)?;

        let router = NetNs::new("lbbgr").context("creating router namespace")?;
        // `attach_host` names the host side eth0; the router's LB side is eth1.
        attach_host(&bridge, &router, ROUTER_PEER, ROUTER_ADDR)?;
        router.ip(&["link", "set", HOST_IFACE, "down"])?;
        router.ip(&["link", "set", HOST_IFACE, "name", ROUTER_LB_IFACE])?;
        router.ip(&["link", "set", ROUTER_LB_IFACE, "up"])?;
        let client = NetNs::new("lbbgc").context("creating client namespace")?;
        router
            .ip(&[
                "link",
                "add",
                ROUTER_CLIENT_IFACE,
                "type",
                "veth",
                "peer",
                "name",
                HOST_IFACE,
                "netns",
                client.name(),
            ])
            .context("creating the client's link to the router")?;
        router.ip(&[
            "addr",
            "add",
            &format!("{ROUTER_CLIENT_ADDR}/{PREFIX_LEN}"),
            "dev",
            ROUTER_CLIENT_IFACE,
        ])?;
        router.ip(&["link", "set", ROUTER_CLIENT_IFACE, "up"])?;
        client.ip(&[
            "addr",
            "add",
            &format!("{CLIENT_ADDR}/{PREFIX_LEN}"),
            "dev",
            HOST_IFACE,
        ])?;
        client.ip(&["link", "set", HOST_IFACE, "up"])?;
        default_via_router(&client, ROUTER_CLIENT_ADDR)?;
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            // ECMP on the 5-tuple, so connections spread over the nodes.
            ("net.ipv4.fib_multipath_hash_policy", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            (
                &format!("net.ipv4.conf.{ROUTER_CLIENT_IFACE}.rp_filter"),
                "0",
            ),
            (&format!("net.ipv4.conf.{ROUTER_LB_IFACE}.rp_filter"), "0"),
        ] {
            router.sysctl(key, value)?;
        }

        let mut backends = Vec::with_capacity(spec.backends);
        for i in 0..spec.backends {
            let name = format!("b{}", i + 1);
            let addr = Ipv4Addr::new(198, 18, 2, FIRST_BACKEND_OCTET + i as u8);
            let ns = NetNs::new(&format!("lbbg{name}"))
                .with_context(|| format!("creating backend namespace {name}"))?;
            attach_host(&bridge, &ns, &name, addr)?;
            default_via_router(&ns, ROUTER_ADDR)?;
            configure_backend(&ns).with_context(|| format!("configuring {name}"))?;
            backends.push(Backend {
                peer: name.clone(),
                name,
                ns,
                addr,
                mac: host_mac(addr),
            });
        }

        let lab = BgpLab {
            nodes: Vec::new(),
            router_bird: None,
            decaps: Vec::new(),
            servers: Vec::new(),
            backends,
            client,
            router,
            bridge,
            work_dir,
            tag,
            spec,
        };
        let mut peers = vec![ROUTER_PEER];
        peers.extend(lab.backends.iter().map(|b| b.peer.as_str()));
        wait_ports_forwarding(&lab.bridge, &peers)?;
        Ok(lab)
    }

    /// Starts `lb-agent decap` and an echo server on VIP:[`SERVICE_PORT`] on every
    /// backend, and waits until every decap program is attached.
    pub fn start_backends(&mut self) -> Result<()> {
        ensure!(self.decaps.is_empty(), "the backends already run");
        // Tunnels are accepted from the LB nodes only: every node that may join.
        let allowed: Vec<String> = (0..self.spec.max_nodes)
            .flat_map(|i| ["--allow-source".to_string(), node_addr(i).to_string()])
            .collect();
        for b in &self.backends {
            let path = self.work_dir.0.join(format!("decap-{}.log", b.name));
            let log =
                fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            let mut cmd = b.ns.command(&self.spec.agent_bin);
            cmd.args([
                "decap",
                "--interface",
                HOST_IFACE,
                "--xdp-mode",
                &self.spec.xdp_mode,
            ])
            .args(&allowed)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
            self.decaps.push(ChildGuard::spawn(&mut cmd)?);
            self.servers
                .push(EchoServer::start(&b.ns, &b.name, self.service())?);
        }
        crate::lab::wait_decaps_attached(&self.backends, &mut self.decaps)
    }

    /// Starts the router's BIRD: eBGP to every node address up to `max_nodes`, one ECMP
    /// kernel route per prefix.
    pub fn start_router(&mut self) -> Result<()> {
        ensure!(self.router_bird.is_none(), "the router's BIRD already runs");
        let dir = self.work_dir.0.join("router");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let neighbours: Vec<(IpAddr, u32)> = (0..self.spec.max_nodes)
            .map(|i| (IpAddr::V4(node_addr(i)), LB_ASN))
            .collect();
        let config = bird::router_config(ROUTER_ADDR, ROUTER_ASN, &neighbours);
        self.router_bird = Some(
            BirdDaemon::start(&self.router, &dir, &config).context("starting the router's BIRD")?,
        );
        Ok(())
    }

    /// Adds node `lb<n+1>` (namespace, link, default route via the router) and starts it
    /// ([`BgpLab::start_node`]); returns its index.
    pub fn add_node(&mut self) -> Result<usize> {
        let i = self.nodes.len();
        ensure!(
            i < self.spec.max_nodes,
            "the router peers with {} nodes only",
            self.spec.max_nodes
        );
        let name = format!("lb{}", i + 1);
        let addr = node_addr(i);
        let ns = NetNs::new(&format!("lbbg{name}"))
            .with_context(|| format!("creating node namespace {name}"))?;
        attach_host(&self.bridge, &ns, &name, addr)?;
        // A frame to a dead node's MAC must not reach a live node.
        crate::lab::no_unicast_flood(&self.bridge, &name)?;
        default_via_router(&ns, ROUTER_ADDR)?;
        let dir = self.work_dir.0.join(&name);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        wait_ports_forwarding(&self.bridge, &[name.as_str()])?;
        self.nodes.push(Node {
            agent: None,
            bird: None,
            pin_dir: DirGuard(PathBuf::from("/sys/fs/bpf").join(format!("{}-{name}", self.tag))),
            host: BgpNode {
                peer: name.clone(),
                name,
                ns,
                addr,
            },
            dir,
            starts: 0,
        });
        self.start_node(i)?;
        Ok(i)
    }

    /// Starts node `i`: its agent (unless it runs), then its BIRD (unless it runs) with the
    /// config the agent wrote.
    pub fn start_node(&mut self, i: usize) -> Result<()> {
        if !self.agent_running(i) {
            self.start_agent(i)?;
        }
        if !self.bird_running(i) {
            self.start_bird(i)?;
        }
        Ok(())
    }

    /// Writes node `i`'s config and starts its agent; waits (bounded) until it logs
    /// "load balancer attached". The BIRD config of an earlier agent is removed first, so
    /// [`BgpLab::start_bird`] waits for this agent's own.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        let text = self.config_text(i)?;
        let node = &mut self.nodes[i];
        ensure!(
            node.agent.is_none(),
            "{} already runs an agent",
            node.host.name
        );
        let config = node.dir.join("lb.yaml");
        fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        if node.bird.is_none() {
            for stale in [node.bird_config(), node.bird_socket()] {
                match fs::remove_file(&stale) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(e).with_context(|| format!("removing {}", stale.display()));
                    }
                    _ => {}
                }
            }
        }
        node.starts += 1;
        let path = agent_log_path(&node.dir, node.starts);
        let log =
            fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut cmd = node.host.ns.command(&self.spec.agent_bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .args([
                "--interface",
                HOST_IFACE,
                "--xdp-mode",
                &self.spec.xdp_mode,
                "--resync-interval",
                "2",
                "--node-name",
                &node.host.name,
                "--handover-ms",
                &self.spec.handover_ms.to_string(),
            ])
            .arg("--pin-path")
            .arg(&node.pin_dir.0)
            .env("RUST_LOG", "info,netlink_packet_route=error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let mut agent = ChildGuard::spawn(&mut cmd)?;
        let deadline = Instant::now() + AGENT_ATTACH_TIMEOUT;
        loop {
            let text = fs::read_to_string(&path).unwrap_or_default();
            if text.contains("load balancer attached") {
                break;
            }
            if let Some(status) = agent.try_wait()? {
                bail!(
                    "the agent on {} exited ({status}) before it attached; its log:\n{text}",
                    node.host.name
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent on {} did not attach within {AGENT_ATTACH_TIMEOUT:?}; its log:\n{text}",
                    node.host.name
                );
            }
            thread::sleep(POLL);
        }
        node.agent = Some(agent);
        Ok(())
    }

    /// Waits (bounded) until node `i`'s agent has written a BIRD config that announces the
    /// VIP (it does once its maps are programmed), then starts BIRD on that file in the
    /// node's namespace. [`BirdDaemon::start`] writes the text it is given to the same path,
    /// so BIRD and the agent share the file.
    pub fn start_bird(&mut self, i: usize) -> Result<()> {
        self.node(i)?;
        let node = &mut self.nodes[i];
        ensure!(node.bird.is_none(), "{} already runs BIRD", node.host.name);
        let path = node.bird_config();
        let vip = VIP.to_string();
        let deadline = Instant::now() + BIRD_CONFIG_TIMEOUT;
        let config = loop {
            let text = fs::read_to_string(&path).unwrap_or_default();
            if text.contains(&vip) {
                break text;
            }
            if let Some(agent) = node.agent.as_mut()
                && let Some(status) = agent.try_wait()?
            {
                bail!(
                    "the agent on {} exited ({status}) before it wrote {}",
                    node.host.name,
                    path.display()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent on {} wrote no BIRD config announcing {VIP} to {} within \
                     {BIRD_CONFIG_TIMEOUT:?}; the file holds:\n{text}",
                    node.host.name,
                    path.display()
                );
            }
            thread::sleep(POLL);
        };
        let dir = node.dir.clone();
        let bird = BirdDaemon::start(&node.host.ns, &dir, &config)
            .with_context(|| format!("starting BIRD on {}", node.host.name))?;
        ensure!(
            bird.config_path() == path && bird.socket() == node.bird_socket(),
            "BIRD on {} runs {} / {}, not the agent's {} / {}",
            node.host.name,
            bird.config_path().display(),
            bird.socket().display(),
            path.display(),
            node.bird_socket().display()
        );
        node.bird = Some(bird);
        Ok(())
    }

    /// Clean stop of node `i`'s agent: SIGTERM (its BIRD keeps running), then watches the
    /// router's route and the agent until it exits, and reports which went first.
    pub fn stop_node(&mut self, i: usize) -> Result<GracefulStop> {
        let addr = self.node(i)?.addr;
        let name = self.nodes[i].host.name.clone();
        let mut agent = self.nodes[i]
            .agent
            .take()
            .with_context(|| format!("no agent runs on {name}"))?;
        signal(&agent, Signal::SIGTERM)?;
        let start = Instant::now();
        let exit_deadline = start + Duration::from_millis(self.spec.handover_ms) + STOP_TIMEOUT;
        let mut withdrawn_after = None;
        let (status, exited_after) = loop {
            if withdrawn_after.is_none() && !self.nexthops()?.contains(&addr) {
                withdrawn_after = Some(start.elapsed());
            }
            if let Some(status) = agent.try_wait()? {
                break (status, start.elapsed());
            }
            if Instant::now() > exit_deadline {
                // Dropping the guard kills it.
                drop(agent);
                bail!(
                    "the agent on {name} did not exit within {:?} of SIGTERM",
                    exit_deadline - start
                );
            }
            thread::sleep(ROUTE_POLL);
        };
        let late_deadline = Instant::now() + LATE_WITHDRAW_TIMEOUT;
        while withdrawn_after.is_none() && Instant::now() < late_deadline {
            if !self.nexthops()?.contains(&addr) {
                withdrawn_after = Some(start.elapsed());
            }
            thread::sleep(ROUTE_POLL);
        }
        Ok(GracefulStop {
            withdrawn_after,
            exited_after,
            status,
        })
    }

    /// Kills node `i`'s agent and its BIRD with SIGKILL: the program stays attached (its
    /// link is pinned), the BGP session drops with BIRD's socket.
    pub fn kill_node(&mut self, i: usize) -> Result<()> {
        self.kill_agent(i)?;
        self.kill_bird(i)
    }

    /// Kills node `i`'s agent with SIGKILL (it leaves its program attached and its pins).
    pub fn kill_agent(&mut self, i: usize) -> Result<()> {
        self.node(i)?;
        let node = &mut self.nodes[i];
        let agent = node
            .agent
            .take()
            .with_context(|| format!("no agent runs on {}", node.host.name))?;
        let mut child = agent.into_inner();
        // Reap it whatever `kill` said (it fails only for a child that already exited).
        let killed = child.kill();
        child.wait().context("waiting for the killed agent")?;
        killed.context("sending SIGKILL to the agent")
    }

    /// Kills node `i`'s BIRD with SIGKILL.
    pub fn kill_bird(&mut self, i: usize) -> Result<()> {
        self.node(i)?;
        let node = &mut self.nodes[i];
        let bird = node
            .bird
            .take()
            .with_context(|| format!("BIRD does not run on {}", node.host.name))?;
        bird.kill()
            .with_context(|| format!("killing BIRD on {}", node.host.name))
    }

    /// Whether node `i` runs an agent (started and not stopped or killed here).
    pub fn agent_running(&self, i: usize) -> bool {
        self.nodes.get(i).is_some_and(|n| n.agent.is_some())
    }

    /// Whether node `i` runs BIRD.
    pub fn bird_running(&self, i: usize) -> bool {
        self.nodes.get(i).is_some_and(|n| n.bird.is_some())
    }

    /// The router's next hops for the VIP, sorted (empty: no route).
    pub fn nexthops(&self) -> Result<Vec<Ipv4Addr>> {
        Ok(bird::route_nexthops(&self.router, &format!("{VIP}/32"))?
            .into_iter()
            .filter_map(|gw| match gw {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            })
            .collect())
    }

    /// Waits until the router's next hops for the VIP are exactly `expected` (any order) and
    /// returns how long that took. Fails after `limit` with what the router has.
    pub fn wait_nexthops(&self, expected: &[Ipv4Addr], limit: Duration) -> Result<Duration> {
        let mut want = expected.to_vec();
        want.sort();
        let start = Instant::now();
        loop {
            let got = self.nexthops()?;
            if got == want {
                return Ok(start.elapsed());
            }
            if start.elapsed() > limit {
                bail!(
                    "the router's next hops for {VIP} are {got:?}, not {want:?}, after {limit:?}; \
                     BIRD's protocols:\n{}",
                    self.router_protocols()
                );
            }
            thread::sleep(ROUTE_POLL);
        }
    }

    /// The addresses of nodes `indices`, in that order.
    pub fn node_addrs(&self, indices: &[usize]) -> Vec<Ipv4Addr> {
        indices.iter().map(|&i| node_addr(i)).collect()
    }

    /// The router's `birdc show protocols` (or why it could not be asked).
    pub fn router_protocols(&self) -> String {
        match &self.router_bird {
            Some(b) => b
                .birdc(&["show", "protocols"])
                .unwrap_or_else(|e| format!("(birdc failed: {e:#})")),
            None => "(the router's BIRD does not run)".into(),
        }
    }

    /// The agent config of node `i`.
    pub fn config_text(&self, i: usize) -> Result<String> {
        self.node(i)?;
        let node = &self.nodes[i];
        let mut text = format!(
            "interface: {HOST_IFACE}\nannounce: bgp\nnode_name: {name}\nbgp:\n  local_asn: {LB_ASN}\n  \
             router_id: {addr}\n  hold_time: {hold}\n  peers:\n    - {{address: {ROUTER_ADDR}, asn: {ROUTER_ASN}}}\n  \
             bird: {{config: \"{config}\", socket: \"{socket}\"}}\nservices:\n  - name: web\n    \
             vip: \"{VIP}\"\n    port: {SERVICE_PORT}\n    protocol: tcp\n    forwarding: ipip\n    backends:\n",
            name = node.host.name,
            addr = node.host.addr,
            hold = self.spec.hold_time,
            config = node.bird_config().display(),
            socket = node.bird_socket().display(),
        );
        for b in &self.backends {
            text.push_str(&format!("      - address: \"{}\"\n", b.addr));
        }
        Ok(text)
    }

    /// `lb-agent status --json` of node `i` (read from its pins, so also while its agent is
    /// stopped or killed).
    pub fn status_json(&self, i: usize) -> Result<serde_json::Value> {
        self.node(i)?;
        let out = std::process::Command::new(&self.spec.agent_bin)
            .args(["status", "--json", "--pin-path"])
            .arg(&self.nodes[i].pin_dir.0)
            .stdin(Stdio::null())
            .output()
            .context("running lb-agent status")?;
        ensure!(
            out.status.success(),
            "lb-agent status of {} failed: {}",
            self.nodes[i].host.name,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).context("parsing lb-agent status --json")
    }

    /// Packets node `i`'s data plane counted for its services, all together.
    pub fn service_packets(&self, i: usize) -> Result<u64> {
        let status = self.status_json(i)?;
        let services = status["services"]
            .as_array()
            .with_context(|| format!("no services in the status of node {i}: {status}"))?;
        Ok(services.iter().filter_map(|s| s["packets"].as_u64()).sum())
    }

    /// Every log of node `i`'s agents so far (oldest first) and its BIRD's protocols.
    pub fn node_log(&self, i: usize) -> String {
        let Some(node) = self.nodes.get(i) else {
            return String::new();
        };
        let mut out = String::new();
        for start in 1..=node.starts {
            let text = fs::read_to_string(agent_log_path(&node.dir, start)).unwrap_or_default();
            out.push_str(&format!(
                "--- agent {} (start {start}) ---\n{text}",
                node.host.name
            ));
        }
        if let Some(b) = &node.bird {
            let protocols = b
                .birdc(&["show", "protocols"])
                .unwrap_or_else(|e| format!("(birdc failed: {e:#})"));
            out.push_str(&format!(
                "--- BIRD {} ---\n{protocols}\n{}\n",
                node.host.name,
                tail(&b.log_text(), LOG_TAIL_LINES)
            ));
        }
        out
    }

    /// Every node's logs, the decap programs' logs, the router's protocols and route.
    pub fn logs(&self) -> String {
        let mut out: String = (0..self.nodes.len()).map(|i| self.node_log(i)).collect();
        for b in &self.backends {
            let path = self.work_dir.0.join(format!("decap-{}.log", b.name));
            if let Ok(text) = fs::read_to_string(path) {
                out.push_str(&format!("--- decap {} ---\n{text}", b.name));
            }
        }
        let router_log = self
            .router_bird
            .as_ref()
            .map(|b| tail(&b.log_text(), LOG_TAIL_LINES))
            .unwrap_or_default();
        out.push_str(&format!(
            "--- router: BIRD log ---\n{router_log}\n--- router: birdc show protocols ---\n{}\n\
             --- router: route to {VIP} ---\n{}\n",
            self.router_protocols(),
            self.router
                .ip(&["-4", "route", "show", "exact", &format!("{VIP}/32")])
                .unwrap_or_else(|e| format!("{e:#}"))
        ));
        out
    }

    fn node(&self, i: usize) -> Result<&BgpNode> {
        self.nodes
            .get(i)
            .map(|n| &n.host)
            .with_context(|| format!("no node {i}: the lab has {}", self.nodes.len()))
    }

    /// The load-balancer nodes added so far, `lb1` first.
    pub fn nodes(&self) -> Vec<&BgpNode> {
        self.nodes.iter().map(|n| &n.host).collect()
    }

    /// Node `i`'s pin directory.
    pub fn pin_dir(&self, i: usize) -> Option<&Path> {
        self.nodes.get(i).map(|n| n.pin_dir.0.as_path())
    }

    /// The backends, `b1` first.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The echo servers, one per backend.
    pub fn servers(&self) -> &[EchoServer] {
        &self.servers
    }

    /// The client namespace.
    pub fn client(&self) -> &NetNs {
        &self.client
    }

    /// The router namespace.
    pub fn router(&self) -> &NetNs {
        &self.router
    }

    /// The namespace holding `br0`.
    pub fn bridge_ns(&self) -> &NetNs {
        &self.bridge
    }

    /// The client's address.
    pub fn client_addr(&self) -> Ipv4Addr {
        CLIENT_ADDR
    }

    /// The service: [`VIP`]:[`SERVICE_PORT`].
    pub fn service(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(VIP), SERVICE_PORT)
    }

    /// Names of every namespace this lab owns.
    pub fn netns_names(&self) -> Vec<String> {
        let mut names = vec![
            self.bridge.name().to_owned(),
            self.router.name().to_owned(),
            self.client.name().to_owned(),
        ];
        names.extend(self.nodes.iter().map(|n| n.host.ns.name().to_owned()));
        names.extend(self.backends.iter().map(|b| b.ns.name().to_owned()));
        names
    }
}

impl Drop for BgpLab {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("BGP lab logs:\n{}", self.logs());
        }
        // SIGTERM every agent at once, so their hand-over waits overlap; the guards then
        // wait for each (and SIGKILL one that hangs).
        for node in &self.nodes {
            if let Some(agent) = &node.agent {
                let _ = signal(agent, Signal::SIGTERM);
            }
        }
    }
}

impl Node {
    /// The BIRD config the agent writes: where [`BirdDaemon::start`] puts it for this
    /// namespace, so that BIRD runs the agent's file.
    fn bird_config(&self) -> PathBuf {
        self.dir.join(format!("bird-{}.conf", self.host.ns.name()))
    }

    /// BIRD's control socket, where [`BirdDaemon::start`] puts it for this namespace.
    fn bird_socket(&self) -> PathBuf {
        self.dir.join(format!("bird-{}.ctl", self.host.ns.name()))
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn agent_log_path(dir: &Path, start: u32) -> PathBuf {
    dir.join(format!("agent-{start}.log"))
}

fn signal(child: &ChildGuard, sig: Signal) -> Result<()> {
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    nix::sys::signal::kill(Pid::from_raw(pid), sig).with_context(|| format!("sending {sig}"))
}

fn default_via_router(ns: &NetNs, router: Ipv4Addr) -> Result<()> {
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        &router.to_string(),
        "dev",
        HOST_IFACE,
    ])
    .with_context(|| format!("default route via {router} in {}", ns.name()))?;
    Ok(())
}

/// DSR backend for IPv4: the VIP on `lo`, no ARP for it, no reverse-path filtering.
fn configure_backend(ns: &NetNs) -> Result<()> {
    ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])
        .context("adding the VIP to lo")?;
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
