//! A multi-node lab for L2 announcement: several load-balancer nodes share the VIPs on the
//! client's own segment, and exactly one of them (the owner) should answer ARP and Neighbor
//! Solicitations for each VIP.
//!
//! ```text
//!   client ns          lb1..lbN ns                 b1..bM ns
//!   eth0 198.18.0.1    eth0 198.18.0.2..           eth0 198.18.0.11.. (+ VIPs on lo)
//!     |                  |                           |
//!     c0                lb1..lbN                    b1..bM        <- veth peers
//!     +------------------+---------------------------+---- br0    (bridge namespace)
//! ```
//!
//! Every host also has its IPv6 twin `2001:db8::<last octet>` ([`v6_of`]). The client has no
//! route and no neighbour entry for the VIPs: 198.18.0.100 is in its /24 and 2001:db8::100 in
//! its /64, so it finds them by ARP / Neighbor Discovery alone, and the node that answers
//! gets the traffic. The bridge does no multicast snooping, so a Neighbor Solicitation
//! reaches every node, like ARP's broadcast; and it floods no unknown unicast to the nodes,
//! as their NICs would filter it: generic XDP on a veth sees every frame that arrives, so
//! after a node died, frames still sent to its MAC would otherwise reach a live node's
//! program (which does not look at the destination MAC) and be forwarded from there.
//!
//! Each node runs `lb-agent run` with a static config (`announce: l2`, every node listed,
//! one TCP service per family on port [`SERVICE_PORT`], IPIP to every backend); the backends
//! run `lb-agent decap` and an [`EchoServer`] on each VIP. Nodes can lose their link
//! ([`L2Lab::link_down`]: the still-attached XDP program cannot answer either) and their
//! agent (SIGTERM or SIGKILL), and come back.
//!
//! Dropping the [`L2Lab`] stops every agent, decap program and echo server, removes the pin
//! directories (so the links of killed agents go too), the namespaces and the temporary
//! files; on a panic it first prints every log.

use std::{
    ffi::CString,
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use crate::{
    ChildGuard, EchoServer, NetNs,
    lab::{
        Backend, DEFAULT_VIP, HOST_IFACE, MAX_BACKENDS, attach_host, configure_backend, fmt_mac,
        host_mac, v6_of, wait_ports_forwarding,
    },
    packet::{
        ETH_P_ARP, ETH_P_IPV6, IPPROTO_ICMPV6, ND_NEIGHBOR_ADVERT, ND_OPT_SOURCE_LLA,
        ND_OPT_TARGET_LLA, PacketBuilder, arp_request, icmpv6_checksum, ipv6_multicast_mac,
        nd_lla_option, neighbor_solicit, solicited_node,
    },
    scenario::DirGuard,
};

/// The client's address.
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Last octet of the first node's address (`lb1` = 198.18.0.2).
const FIRST_NODE_OCTET: u8 = 2;
/// Most load-balancer nodes a lab can hold (198.18.0.2 ..= 198.18.0.9).
pub const MAX_NODES: usize = 8;
/// Last octet of the first backend's address (`b1` = 198.18.0.11).
const FIRST_BACKEND_OCTET: u8 = 11;
/// The port of both services (TCP).
pub const SERVICE_PORT: u16 = 80;

/// How long [`L2Lab::start_agent`] waits for "load balancer attached".
const AGENT_ATTACH_TIMEOUT: Duration = Duration::from_secs(20);
/// How often the wait loops look again.
const POLL: Duration = Duration::from_millis(50);
/// How long one round of [`L2Lab::wait_single_answerer`] listens for answers.
const ANSWER_WINDOW: Duration = Duration::from_millis(300);

/// The agents' membership settings (the config's `membership:`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Membership {
    /// UDP port of the heartbeats.
    pub port: u16,
    /// Heartbeat interval.
    pub interval_ms: u64,
    /// A node silent this long is dead.
    pub dead_after_ms: u64,
}

impl Default for Membership {
    fn default() -> Self {
        Membership {
            port: 7946,
            interval_ms: 200,
            dead_after_ms: 1000,
        }
    }
}

/// What to build and how to run it.
#[derive(Clone, Debug)]
pub struct L2LabSpec {
    /// Path of the `lb-agent` binary.
    pub agent_bin: PathBuf,
    /// Load-balancer nodes, 1..=[`MAX_NODES`]; default 3.
    pub nodes: usize,
    /// Backends, 1..=89; default 3.
    pub backends: usize,
    /// The IPv4 VIP (its IPv6 twin is `v6_of(vip)`); in 198.18.0.0/24 and no host's address.
    /// Default 198.18.0.100.
    pub vip: Ipv4Addr,
    /// `--xdp-mode` of agents and decap programs; default `skb`.
    pub xdp_mode: String,
    /// Default: port 7946, every 200 ms, dead after 1000 ms.
    pub membership: Membership,
}

impl L2LabSpec {
    /// Three nodes, three backends, the default VIP, generic XDP.
    pub fn new(agent_bin: impl Into<PathBuf>) -> L2LabSpec {
        L2LabSpec {
            agent_bin: agent_bin.into(),
            nodes: 3,
            backends: 3,
            vip: DEFAULT_VIP,
            xdp_mode: "skb".into(),
            membership: Membership::default(),
        }
    }
}

/// One load-balancer node.
#[derive(Debug)]
pub struct L2Node {
    /// `lb1`, `lb2`, ... (also its `--node-name`).
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

impl L2Node {
    /// Its IPv6 address.
    pub fn addr6(&self) -> Ipv6Addr {
        v6_of(self.addr)
    }
}

/// The client's neighbour entry for an address (`ip -j neigh show`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    /// The link-layer address; `None` while unresolved (`INCOMPLETE`, `FAILED`).
    pub mac: Option<[u8; 6]>,
    /// The NUD states, e.g. `["REACHABLE"]`.
    pub state: Vec<String>,
}

/// The running lab; dropping it stops and removes everything.
pub struct L2Lab {
    // Field order is drop order: agents first, then decaps and servers, then the pins (a
    // killed agent's link goes with them), the namespaces, the bridge and the files.
    agents: Vec<Option<ChildGuard>>,
    decaps: Vec<ChildGuard>,
    servers: Vec<EchoServer>,
    pin_dirs: Vec<DirGuard>,
    client: NetNs,
    nodes: Vec<L2Node>,
    backends: Vec<Backend>,
    bridge: NetNs,
    work_dir: DirGuard,
    /// Agents started so far on each node (each start logs to its own file).
    starts: Vec<u32>,
    spec: L2LabSpec,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl L2Lab {
    /// Builds the topology, starts the backends and an agent on every node.
    pub fn start(spec: L2LabSpec) -> Result<L2Lab> {
        let mut lab = L2Lab::new(spec)?;
        lab.start_backends()?;
        for i in 0..lab.nodes.len() {
            lab.start_agent(i)?;
        }
        Ok(lab)
    }

    /// Builds the topology only: no agent, no decap program, no server.
    pub fn new(spec: L2LabSpec) -> Result<L2Lab> {
        ensure!(
            (1..=MAX_NODES).contains(&spec.nodes),
            "an L2 lab holds 1..={MAX_NODES} nodes, not {}",
            spec.nodes
        );
        ensure!(
            (1..=MAX_BACKENDS).contains(&spec.backends),
            "an L2 lab holds 1..={MAX_BACKENDS} backends, not {}",
            spec.backends
        );
        let [a, b, c, last] = spec.vip.octets();
        ensure!(
            [a, b, c] == [198, 18, 0] && last > FIRST_BACKEND_OCTET + MAX_BACKENDS as u8 - 1,
            "VIP {} must be on the lab's segment 198.18.0.0/24, above every host address",
            spec.vip
        );
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("lbt-l2-{}-{n}", std::process::id());
        let work_dir = DirGuard(std::env::temp_dir().join(&tag));
        fs::create_dir_all(&work_dir.0)
            .with_context(|| format!("creating {}", work_dir.0.display()))?;

        let bridge = crate::lab::new_bridge("lbl2br", false)?;

        let client = NetNs::new("lbl2c").context("creating client namespace")?;
        attach_host(&bridge, &client, "c0", CLIENT_ADDR)?;

        let mut nodes = Vec::with_capacity(spec.nodes);
        let mut pin_dirs = Vec::with_capacity(spec.nodes);
        for i in 0..spec.nodes {
            let name = format!("lb{}", i + 1);
            let addr = Ipv4Addr::new(198, 18, 0, FIRST_NODE_OCTET + i as u8);
            let ns = NetNs::new(&format!("lbl2{name}"))
                .with_context(|| format!("creating node namespace {name}"))?;
            attach_host(&bridge, &ns, &name, addr)?;
            // A frame to a dead node's MAC must not reach a live node.
            crate::lab::no_unicast_flood(&bridge, &name)?;
            // Keep the IPv6 address across `link_down` / `link_up`, as IPv4 keeps its own.
            ns.sysctl(
                &format!("net.ipv6.conf.{HOST_IFACE}.keep_addr_on_down"),
                "1",
            )?;
            pin_dirs.push(DirGuard(
                PathBuf::from("/sys/fs/bpf").join(format!("{tag}-{name}")),
            ));
            nodes.push(L2Node {
                peer: name.clone(),
                name,
                ns,
                addr,
                mac: host_mac(addr),
            });
        }

        let mut backends = Vec::with_capacity(spec.backends);
        for i in 0..spec.backends {
            let name = format!("b{}", i + 1);
            let addr = Ipv4Addr::new(198, 18, 0, FIRST_BACKEND_OCTET + i as u8);
            let ns = NetNs::new(&format!("lbl2{name}"))
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

        let lab = L2Lab {
            agents: (0..spec.nodes).map(|_| None).collect(),
            decaps: Vec::new(),
            servers: Vec::new(),
            pin_dirs,
            client,
            nodes,
            backends,
            bridge,
            work_dir,
            starts: vec![0; spec.nodes],
            spec,
        };
        wait_ports_forwarding(&lab.bridge, &lab.bridge_peers())?;
        Ok(lab)
    }

    /// Starts `lb-agent decap` and an echo server on each VIP on every backend, and waits
    /// until every decap program is attached.
    pub fn start_backends(&mut self) -> Result<()> {
        ensure!(self.decaps.is_empty(), "the backends already run");
        // Tunnels are accepted from the LB nodes only.
        let allowed: Vec<String> = self
            .nodes
            .iter()
            .flat_map(|n| {
                [
                    "--allow-source".to_string(),
                    n.addr.to_string(),
                    "--allow-source".into(),
                    n.addr6().to_string(),
                ]
            })
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
            for vip in [IpAddr::V4(self.vip()), IpAddr::V6(self.vip6())] {
                self.servers.push(EchoServer::start(
                    &b.ns,
                    &b.name,
                    SocketAddr::new(vip, SERVICE_PORT),
                )?);
            }
        }
        crate::lab::wait_decaps_attached(&self.backends, &mut self.decaps)
    }

    /// The agent config of node `i` (every node's differs in `node_name` only).
    pub fn config_text(&self, i: usize) -> Result<String> {
        let me = self.node(i)?;
        let m = self.spec.membership;
        let mut text = format!(
            "interface: {HOST_IFACE}\nannounce: l2\nnode_name: {}\nnodes:\n",
            me.name
        );
        for n in &self.nodes {
            text.push_str(&format!("  - {{name: {}, address: {}}}\n", n.name, n.addr));
        }
        text.push_str(&format!(
            "membership: {{port: {}, interval_ms: {}, dead_after_ms: {}}}\nservices:\n",
            m.port, m.interval_ms, m.dead_after_ms
        ));
        let v4 = self.backends.iter().map(|b| IpAddr::V4(b.addr));
        let v6 = self.backends.iter().map(|b| IpAddr::V6(v6_of(b.addr)));
        for (name, vip, backends) in [
            ("web", IpAddr::V4(self.vip()), v4.collect::<Vec<_>>()),
            ("web6", IpAddr::V6(self.vip6()), v6.collect()),
        ] {
            text.push_str(&format!(
                "  - name: {name}\n    vip: \"{vip}\"\n    port: {SERVICE_PORT}\n    protocol: tcp\n    forwarding: ipip\n    backends:\n"
            ));
            for b in backends {
                text.push_str(&format!("      - address: \"{b}\"\n"));
            }
        }
        Ok(text)
    }

    /// Where node `i`'s config is written.
    pub fn config_path(&self, i: usize) -> Result<PathBuf> {
        Ok(self.work_dir.0.join(format!("{}.yaml", self.node(i)?.name)))
    }

    /// Writes node `i`'s config and starts its agent; waits (bounded) until it logs
    /// "load balancer attached". An agent that finds the pins of an earlier one (killed, say)
    /// adopts them.
    pub fn start_agent(&mut self, i: usize) -> Result<()> {
        self.ensure_no_agent(i)?;
        let text = self.config_text(i)?;
        let config = self.config_path(i)?;
        fs::write(&config, text).with_context(|| format!("writing {}", config.display()))?;
        self.start_agent_with(i, |cmd| {
            cmd.arg("--config").arg(&config);
        })
    }

    /// Starts node `i`'s agent as `lb-agent run` with the lab's own options (`--interface`,
    /// `--xdp-mode`, `--resync-interval 2`, `--node-name`, `--pin-path`) plus whatever
    /// `configure` adds: where its settings come from (`--config FILE`, or `--kubernetes`
    /// with a `KUBECONFIG`), more options, environment. Waits (bounded) until it logs "load
    /// balancer attached"; its log is [`L2Lab::agent_log`], like every other start's.
    pub fn start_agent_with(
        &mut self,
        i: usize,
        configure: impl FnOnce(&mut Command),
    ) -> Result<()> {
        self.ensure_no_agent(i)?;
        self.starts[i] += 1;
        let path = self.agent_log_path(i, self.starts[i]);
        let log =
            fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let node = &self.nodes[i];
        let mut cmd = node.ns.command(&self.spec.agent_bin);
        cmd.arg("run")
            .args([
                "--interface",
                HOST_IFACE,
                "--xdp-mode",
                &self.spec.xdp_mode,
                "--resync-interval",
                "2",
                "--node-name",
                &node.name,
            ])
            .arg("--pin-path")
            .arg(&self.pin_dirs[i].0)
            .env("RUST_LOG", "info,netlink_packet_route=error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        configure(&mut cmd);
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
                    node.name
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "the agent on {} did not attach within {AGENT_ATTACH_TIMEOUT:?}; its log:\n{text}",
                    node.name
                );
            }
            thread::sleep(POLL);
        }
        self.agents[i] = Some(agent);
        Ok(())
    }

    fn ensure_no_agent(&self, i: usize) -> Result<()> {
        let node = self.node(i)?;
        ensure!(
            self.agents[i].is_none(),
            "{} already runs an agent",
            node.name
        );
        Ok(())
    }

    /// Stops node `i`'s agent with SIGTERM (it detaches) and returns its exit status.
    pub fn stop_agent(&mut self, i: usize) -> Result<ExitStatus> {
        self.take_agent(i)?.stop()
    }

    /// Kills node `i`'s agent with SIGKILL: it leaves its program attached and its pins.
    pub fn kill_agent(&mut self, i: usize) -> Result<()> {
        let mut child = self.take_agent(i)?.into_inner();
        // Reap it whatever `kill` said (it fails only for a child that already exited).
        let killed = child.kill();
        child.wait().context("waiting for the killed agent")?;
        killed.context("sending SIGKILL to the agent")
    }

    /// Whether node `i` runs an agent (started and not stopped or killed here).
    pub fn agent_running(&self, i: usize) -> bool {
        self.agents.get(i).is_some_and(Option::is_some)
    }

    fn take_agent(&mut self, i: usize) -> Result<ChildGuard> {
        let name = self.node(i)?.name.clone();
        self.agents[i]
            .take()
            .with_context(|| format!("no agent runs on {name}"))
    }

    /// Takes node `i`'s `eth0` down: nothing in or out, whatever is attached to it.
    pub fn link_down(&self, i: usize) -> Result<()> {
        let node = self.node(i)?;
        node.ns
            .ip(&["link", "set", HOST_IFACE, "down"])
            .with_context(|| format!("taking {}'s link down", node.name))?;
        Ok(())
    }

    /// Brings node `i`'s `eth0` back up and waits until its bridge port forwards.
    pub fn link_up(&self, i: usize) -> Result<()> {
        let node = self.node(i)?;
        node.ns
            .ip(&["link", "set", HOST_IFACE, "up"])
            .with_context(|| format!("bringing {}'s link up", node.name))?;
        wait_ports_forwarding(&self.bridge, &[node.peer.as_str()])
    }

    /// The client's neighbour entry for `addr` on its `eth0`, if it has one.
    pub fn client_neighbour(&self, addr: IpAddr) -> Result<Option<Neighbour>> {
        let out = self.client.ip(&[
            "-j",
            "neigh",
            "show",
            "to",
            &addr.to_string(),
            "dev",
            HOST_IFACE,
        ])?;
        parse_neighbour(&out, addr)
    }

    /// Sends one ARP request (IPv4) or Neighbor Solicitation (IPv6) for `target` from the
    /// client and returns the MAC of every host that answered within `listen`, in order.
    pub fn who_answers(&self, target: IpAddr, listen: Duration) -> Result<Vec<[u8; 6]>> {
        let src = match target {
            IpAddr::V4(_) => IpAddr::V4(CLIENT_ADDR),
            IpAddr::V6(_) => IpAddr::V6(v6_of(CLIENT_ADDR)),
        };
        who_answers(&self.client, self.client_mac(), src, target, listen)
    }

    /// Waits until exactly one node answers for `vip` (ARP / NDP from the client), the same
    /// one for the membership's `dead_after_ms` (every node changes its mind within that),
    /// and returns its index. Fails after `limit` with what answered last.
    pub fn wait_single_answerer(&self, vip: IpAddr, limit: Duration) -> Result<usize> {
        let stable = Duration::from_millis(self.spec.membership.dead_after_ms);
        self.wait_stable_answerer(vip, stable, limit)
    }

    /// Waits until exactly one node, the same one in every round for at least `stable` (and
    /// in two rounds at least), answers for `vip`, and returns its index. Fails after
    /// `limit` with what answered last.
    pub fn wait_stable_answerer(
        &self,
        vip: IpAddr,
        stable: Duration,
        limit: Duration,
    ) -> Result<usize> {
        let deadline = Instant::now() + limit;
        // The single answerer so far, since when, in how many rounds.
        let mut streak: Option<(usize, Instant, u32)> = None;
        loop {
            let asked = Instant::now();
            let answers = self.who_answers(vip, ANSWER_WINDOW)?;
            let single = match answers.as_slice() {
                [mac] => self.node_by_mac(*mac),
                _ => None,
            };
            streak = match (single, streak) {
                (Some(i), Some((j, since, rounds))) if i == j => Some((i, since, rounds + 1)),
                (Some(i), _) => Some((i, asked, 1)),
                (None, _) => None,
            };
            if let Some((i, since, rounds)) = streak
                && rounds >= 2
                && since.elapsed() >= stable
            {
                return Ok(i);
            }
            if Instant::now() > deadline {
                let last: Vec<String> = answers.iter().map(|m| self.describe_mac(*m)).collect();
                bail!(
                    "no single node answered for {vip} steadily for {stable:?} within \
                     {limit:?}; last answers: {last:?}"
                );
            }
            thread::sleep(POLL);
        }
    }

    /// The node whose `eth0` has `mac`.
    pub fn node_by_mac(&self, mac: [u8; 6]) -> Option<usize> {
        self.nodes.iter().position(|n| n.mac == mac)
    }

    /// `lb2 (02:00:00:00:00:03)`, or the bare MAC of a host that is no node.
    pub fn describe_mac(&self, mac: [u8; 6]) -> String {
        match self.node_by_mac(mac) {
            Some(i) => format!("{} ({})", self.nodes[i].name, fmt_mac(mac)),
            None => fmt_mac(mac),
        }
    }

    /// `lb-agent status --json` of node `i` (read from its pins).
    pub fn status_json(&self, i: usize) -> Result<serde_json::Value> {
        self.node(i)?;
        let out = std::process::Command::new(&self.spec.agent_bin)
            .args(["status", "--json", "--pin-path"])
            .arg(&self.pin_dirs[i].0)
            .stdin(Stdio::null())
            .output()
            .context("running lb-agent status")?;
        ensure!(
            out.status.success(),
            "lb-agent status of {} failed: {}",
            self.nodes[i].name,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).context("parsing lb-agent status --json")
    }

    /// Entry 0 of the array map `map` pinned under node `i`'s pins, as a native-endian
    /// `u64` (`bpftool map lookup`): the answer lease, say, which outlives a killed agent.
    pub fn pinned_u64(&self, i: usize, map: &str) -> Result<u64> {
        self.node(i)?;
        let path = self.pin_dirs[i].0.join(map);
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "lookup", "pinned"])
            .arg(&path)
            .args(["key", "0", "0", "0", "0"])
            .stdin(Stdio::null())
            .output()
            .context("running bpftool (cargo xtask setup installs it)")?;
        ensure!(
            out.status.success(),
            "bpftool map lookup {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("parsing bpftool map lookup")?;
        parse_u64_value(&json).with_context(|| format!("{}: entry 0 is {json}", path.display()))
    }

    /// Every log of node `i`'s agents so far, oldest first, each under a header.
    pub fn agent_log(&self, i: usize) -> String {
        let Some(node) = self.nodes.get(i) else {
            return String::new();
        };
        let mut out = String::new();
        for start in 1..=self.starts[i] {
            let path = self.agent_log_path(i, start);
            let text = fs::read_to_string(&path).unwrap_or_default();
            out.push_str(&format!(
                "--- agent {} (start {start}) ---\n{text}",
                node.name
            ));
        }
        out
    }

    /// Every agent's and decap program's log.
    pub fn logs(&self) -> String {
        let mut out: String = (0..self.nodes.len()).map(|i| self.agent_log(i)).collect();
        for b in &self.backends {
            let path = self.work_dir.0.join(format!("decap-{}.log", b.name));
            if let Ok(text) = fs::read_to_string(path) {
                out.push_str(&format!("--- decap {} ---\n{text}", b.name));
            }
        }
        out
    }

    fn agent_log_path(&self, i: usize, start: u32) -> PathBuf {
        self.work_dir
            .0
            .join(format!("agent-{}-{start}.log", self.nodes[i].name))
    }

    fn node(&self, i: usize) -> Result<&L2Node> {
        self.nodes
            .get(i)
            .with_context(|| format!("no node {i}: the lab has {}", self.nodes.len()))
    }

    /// The load-balancer nodes, `lb1` first.
    pub fn nodes(&self) -> &[L2Node] {
        &self.nodes
    }

    /// The backends, `b1` first.
    pub fn backends(&self) -> &[Backend] {
        &self.backends
    }

    /// The echo servers (two per backend: IPv4 VIP, IPv6 VIP).
    pub fn servers(&self) -> &[EchoServer] {
        &self.servers
    }

    /// The client namespace.
    pub fn client(&self) -> &NetNs {
        &self.client
    }

    /// The namespace holding `br0` and every veth peer.
    pub fn bridge_ns(&self) -> &NetNs {
        &self.bridge
    }

    /// The client's IPv4 address.
    pub fn client_addr(&self) -> Ipv4Addr {
        CLIENT_ADDR
    }

    /// The client's IPv6 address.
    pub fn client_addr6(&self) -> Ipv6Addr {
        v6_of(CLIENT_ADDR)
    }

    /// The client's `eth0` MAC.
    pub fn client_mac(&self) -> [u8; 6] {
        host_mac(CLIENT_ADDR)
    }

    /// The IPv4 VIP.
    pub fn vip(&self) -> Ipv4Addr {
        self.spec.vip
    }

    /// The IPv6 VIP.
    pub fn vip6(&self) -> Ipv6Addr {
        v6_of(self.spec.vip)
    }

    /// The TCP service of one family: VIP:[`SERVICE_PORT`].
    pub fn service(&self, ipv6: bool) -> SocketAddr {
        let vip = if ipv6 {
            IpAddr::V6(self.vip6())
        } else {
            IpAddr::V4(self.vip())
        };
        SocketAddr::new(vip, SERVICE_PORT)
    }

    /// Node `i`'s pin directory.
    pub fn pin_dir(&self, i: usize) -> Option<&Path> {
        self.pin_dirs.get(i).map(|d| d.0.as_path())
    }

    /// Every veth peer in the bridge namespace: `c0`, `lb1`.., `b1`..
    pub fn bridge_peers(&self) -> Vec<&str> {
        let mut peers = vec!["c0"];
        peers.extend(self.nodes.iter().map(|n| n.peer.as_str()));
        peers.extend(self.backends.iter().map(|b| b.peer.as_str()));
        peers
    }

    /// Names of every namespace this lab owns.
    pub fn netns_names(&self) -> Vec<String> {
        let mut names = vec![self.bridge.name().to_owned(), self.client.name().to_owned()];
        names.extend(self.nodes.iter().map(|n| n.ns.name().to_owned()));
        names.extend(self.backends.iter().map(|b| b.ns.name().to_owned()));
        names
    }
}

impl Drop for L2Lab {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("L2 lab logs:\n{}", self.logs());
        }
    }
}

/// Parses `ip -j neigh show to ADDR` output.
fn parse_neighbour(json: &str, addr: IpAddr) -> Result<Option<Neighbour>> {
    if json.trim().is_empty() {
        return Ok(None);
    }
    let entries: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("parsing `ip -j neigh`: {json}"))?;
    let want = addr.to_string();
    let Some(entry) = entries
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["dst"].as_str() == Some(want.as_str()))
    else {
        return Ok(None);
    };
    let mac = match entry["lladdr"].as_str() {
        Some(s) => Some(parse_mac(s).with_context(|| format!("neighbour entry {entry}"))?),
        None => None,
    };
    let state = entry["state"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect();
    Ok(Some(Neighbour { mac, state }))
}

/// The `u64` value of a `bpftool -j map lookup` entry: raw bytes (`"value": ["0x2a", ...]`,
/// in memory order) or, for a map with BTF, the formatted number.
fn parse_u64_value(entry: &serde_json::Value) -> Result<u64> {
    let value = entry.get("formatted").unwrap_or(entry)["value"].clone();
    if let Some(n) = value.as_u64() {
        return Ok(n);
    }
    let bytes = value.as_array().context("no value")?;
    ensure!(bytes.len() == 8, "{} bytes, not 8", bytes.len());
    let mut raw = [0u8; 8];
    for (b, v) in raw.iter_mut().zip(bytes) {
        let text = v.as_str().context("a byte that is no string")?;
        *b = u8::from_str_radix(text.trim_start_matches("0x"), 16)
            .with_context(|| format!("byte {text:?}"))?;
    }
    Ok(u64::from_ne_bytes(raw))
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts
            .next()
            .with_context(|| format!("MAC {text:?} too short"))?;
        *byte = u8::from_str_radix(part, 16).with_context(|| format!("MAC {text:?}"))?;
    }
    ensure!(parts.next().is_none(), "MAC {text:?} too long");
    Ok(mac)
}

/// Sends one ARP request (IPv4 `target`) or Neighbor Solicitation (IPv6) from `ns`'s `eth0`
/// (as `src_mac`/`src`) and returns the MAC of every host that answered it within `listen`,
/// in the order the answers came: the sender hardware address of an ARP reply, the target
/// link-layer address of a solicited Neighbor Advertisement (its Ethernet source without
/// one). Gratuitous ARP and unsolicited advertisements are not answers.
pub fn who_answers(
    ns: &NetNs,
    src_mac: [u8; 6],
    src: IpAddr,
    target: IpAddr,
    listen: Duration,
) -> Result<Vec<[u8; 6]>> {
    let (ethertype, request) = match (src, target) {
        (IpAddr::V4(s), IpAddr::V4(t)) => (ETH_P_ARP, arp_request(src_mac, s, t)),
        (IpAddr::V6(s), IpAddr::V6(t)) => (ETH_P_IPV6, neighbor_solicitation(src_mac, s, t)),
        _ => bail!("{src} cannot ask for {target}: different families"),
    };
    ns.enter(move || -> io::Result<Vec<[u8; 6]>> {
        let sock = PacketSocket::open(HOST_IFACE, ethertype)?;
        sock.send(&request)?;
        let deadline = Instant::now() + listen;
        let mut macs = Vec::new();
        let mut buf = [0u8; 2048];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let Some(len) = sock.recv(&mut buf, left)? else {
                break;
            };
            if let Some(mac) = answer_mac(&buf[..len], src, target)
                && !macs.contains(&mac)
            {
                macs.push(mac);
            }
        }
        Ok(macs)
    })?
    .with_context(|| format!("asking for {target} from {}", ns.name()))
}

/// Sends one Ethernet frame out of `iface` in `ns` as it is (a gratuitous ARP, say).
pub fn send_frame(ns: &NetNs, iface: &str, frame: &[u8]) -> Result<()> {
    let ethertype = frame
        .get(12..14)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .context("frame shorter than an Ethernet header")?;
    let iface = iface.to_owned();
    ns.enter(move || PacketSocket::open(&iface, ethertype)?.send(frame))?
        .with_context(|| format!("sending a frame in {}", ns.name()))
}

/// The MAC an answer to our request for `target` from `asker` advertises; `None` for every
/// other frame.
fn answer_mac(frame: &[u8], asker: IpAddr, target: IpAddr) -> Option<[u8; 6]> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    match (asker, target) {
        (IpAddr::V4(asker), IpAddr::V4(target)) if ethertype == ETH_P_ARP => {
            let arp = frame.get(14..42)?;
            let op = u16::from_be_bytes([arp[6], arp[7]]);
            let sha: [u8; 6] = arp[8..14].try_into().ok()?;
            let spa = Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]);
            let tpa = Ipv4Addr::new(arp[24], arp[25], arp[26], arp[27]);
            (op == 2 && spa == target && tpa == asker).then_some(sha)
        }
        (IpAddr::V6(asker), IpAddr::V6(target)) if ethertype == ETH_P_IPV6 => {
            let ip = frame.get(14..)?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            let icmp = ip.get(40..)?;
            let na_target: [u8; 16] = icmp.get(8..24)?.try_into().ok()?;
            let solicited = icmp[4] & 0x40 != 0;
            if ip[6] != IPPROTO_ICMPV6
                || icmp[0] != ND_NEIGHBOR_ADVERT
                || !solicited
                || Ipv6Addr::from(dst) != asker
                || Ipv6Addr::from(na_target) != target
            {
                return None;
            }
            let mut opts = &icmp[24..];
            while let [kind, len, ..] = *opts {
                let len = usize::from(len) * 8;
                if len == 0 || len > opts.len() {
                    break;
                }
                if kind == ND_OPT_TARGET_LLA && len >= 8 {
                    return opts[2..8].try_into().ok();
                }
                opts = &opts[len..];
            }
            frame[6..12].try_into().ok()
        }
        _ => None,
    }
}

/// A Neighbor Solicitation for `target` from `src`/`src_mac` to the target's solicited-node
/// multicast group, with the source link-layer address option, hop limit 255.
pub fn neighbor_solicitation(src_mac: [u8; 6], src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let group = solicited_node(target);
    neighbor_solicit(
        src_mac,
        ipv6_multicast_mac(group),
        src,
        group,
        target,
        &nd_lla_option(ND_OPT_SOURCE_LLA, src_mac),
    )
    .build()
}

/// A Neighbor Advertisement of `target` at `mac` (target link-layer address option), from
/// `src` to `dst`/`dst_mac` (`ff02::1` for an unsolicited one), hop limit 255, with the
/// override flag, and the solicited flag when `solicited`: what a takeover sends, or an
/// answer to [`neighbor_solicitation`].
pub fn neighbor_advertisement(
    mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    dst_mac: [u8; 6],
    target: Ipv6Addr,
    solicited: bool,
) -> Vec<u8> {
    let flags = 0x20 | if solicited { 0x40 } else { 0 };
    let mut msg = vec![ND_NEIGHBOR_ADVERT, 0, 0, 0, flags, 0, 0, 0];
    msg.extend_from_slice(&target.octets());
    msg.extend_from_slice(&nd_lla_option(ND_OPT_TARGET_LLA, mac));
    let csum = icmpv6_checksum(src, dst, &msg);
    msg[2..4].copy_from_slice(&csum.to_be_bytes());
    PacketBuilder::new()
        .eth(mac, dst_mac)
        .ipv6(src, dst)
        .ttl(255)
        .raw(IPPROTO_ICMPV6, &msg)
        .build()
}

/// An `AF_PACKET` socket bound to one interface and EtherType. Open it on a thread inside
/// the namespace (interface indexes are per namespace).
struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    fn open(iface: &str, ethertype: u16) -> io::Result<PacketSocket> {
        let protocol = ethertype.to_be();
        // SAFETY: plain socket(2); the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(protocol),
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a descriptor just returned by socket(2), owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let name = CString::new(iface).map_err(io::Error::other)?;
        // SAFETY: `name` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = i32::try_from(ifindex).map_err(io::Error::other)?;
        // SAFETY: `addr` is a valid sockaddr_ll and the length says so.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketSocket { fd })
    }

    /// Sends `frame` out of the bound interface.
    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: the pointer and length describe `frame`, which outlives the call.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != frame.len() {
            return Err(io::Error::other(format!(
                "sent {n} of {} bytes",
                frame.len()
            )));
        }
        Ok(())
    }

    /// The next frame that arrived (not one this host sent) within `timeout`, copied into
    /// `buf`; `None` when none came.
    fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // Round up so a sub-millisecond remainder still waits.
            let ms = i32::try_from(left.as_millis() + 1).unwrap_or(i32::MAX);
            // SAFETY: one valid pollfd for the duration of the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if rc == 0 {
                return Ok(None);
            }
            // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
            // SAFETY: `buf` and `from` are valid for writes of the lengths passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    (&raw mut from).cast::<libc::sockaddr>(),
                    &mut from_len,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) {
                    continue;
                }
                return Err(err);
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            return Ok(Some(n as usize));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::l4_checksum_ok;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

    #[test]
    fn neighbor_solicitation_is_well_formed() {
        let src: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let target: Ipv6Addr = "2001:db8::100".parse().unwrap();
        let frame = neighbor_solicitation(MAC, src, target);
        assert_eq!(frame.len(), 14 + 40 + 32);
        assert_eq!(frame[..6], [0x33, 0x33, 0xff, 0x00, 0x01, 0x00]);
        assert_eq!(frame[14 + 7], 255, "hop limit");
        let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&frame[14 + 24..14 + 40]).unwrap());
        assert_eq!(dst, "ff02::1:ff00:100".parse::<Ipv6Addr>().unwrap());
        assert!(l4_checksum_ok(&frame[14..]), "ICMPv6 checksum");
        assert_eq!(frame[14 + 40], crate::packet::ND_NEIGHBOR_SOLICIT);
        assert_eq!(frame[14 + 40 + 24..], [1, 1, 2, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn answers_are_recognised() {
        let asker: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let vip: Ipv6Addr = "2001:db8::100".parse().unwrap();
        let owner = [2, 0, 0, 0, 0, 3];
        let na = neighbor_advertisement(owner, vip, asker, MAC, vip, true);
        assert!(l4_checksum_ok(&na[14..]));
        assert_eq!(answer_mac(&na, asker.into(), vip.into()), Some(owner));
        // Unsolicited, or about another address: not an answer.
        let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
        let unsolicited = neighbor_advertisement(owner, vip, all_nodes, MAC, vip, false);
        assert_eq!(answer_mac(&unsolicited, asker.into(), vip.into()), None);
        let other = neighbor_advertisement(owner, vip, asker, MAC, asker, true);
        assert_eq!(answer_mac(&other, asker.into(), vip.into()), None);

        let client = Ipv4Addr::new(198, 18, 0, 1);
        let vip4 = Ipv4Addr::new(198, 18, 0, 100);
        let reply = crate::packet::arp_reply(owner, vip4, MAC, client);
        assert_eq!(answer_mac(&reply, client.into(), vip4.into()), Some(owner));
        let garp = crate::packet::arp_reply(owner, vip4, [0xff; 6], vip4);
        assert_eq!(answer_mac(&garp, client.into(), vip4.into()), None);
        let request = arp_request(MAC, client, vip4);
        assert_eq!(answer_mac(&request, client.into(), vip4.into()), None);
    }

    #[test]
    fn parses_neighbour_entries() {
        let vip: IpAddr = "198.18.0.100".parse().unwrap();
        let json = r#"[{"dst":"198.18.0.100","lladdr":"02:00:00:00:00:03","state":["REACHABLE"]}]"#;
        assert_eq!(
            parse_neighbour(json, vip).unwrap(),
            Some(Neighbour {
                mac: Some([2, 0, 0, 0, 0, 3]),
                state: vec!["REACHABLE".into()]
            })
        );
        let failed = r#"[{"dst":"198.18.0.100","state":["FAILED"]}]"#;
        assert_eq!(parse_neighbour(failed, vip).unwrap().unwrap().mac, None);
        assert_eq!(parse_neighbour("[]", vip).unwrap(), None);
        assert_eq!(parse_neighbour("", vip).unwrap(), None);
        assert!(parse_mac("02:00:00:00:00").is_err());
    }

    #[test]
    fn parses_map_values() {
        let raw: serde_json::Value = serde_json::from_str(
            r#"{"key":["0x00","0x00","0x00","0x00"],"value":["0x2a","0x01","0x00","0x00","0x00","0x00","0x00","0x00"]}"#,
        )
        .unwrap();
        assert_eq!(
            parse_u64_value(&raw).unwrap(),
            u64::from_ne_bytes([0x2a, 1, 0, 0, 0, 0, 0, 0])
        );
        let btf: serde_json::Value = serde_json::from_str(
            r#"{"key":["0x00"],"value":["0x00"],"formatted":{"key":0,"value":4294967596}}"#,
        )
        .unwrap();
        assert_eq!(parse_u64_value(&btf).unwrap(), 4_294_967_596);
        let short: serde_json::Value = serde_json::from_str(r#"{"value":["0x01"]}"#).unwrap();
        assert!(parse_u64_value(&short).is_err());
    }
}
