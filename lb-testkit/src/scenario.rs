//! A running load balancer in a [`Lab`]: decap programs and echo servers on the backends, the
//! agent on the LB node with a static config it can rewrite and reload. Shared by the
//! end-to-end tests and `cargo xtask demo`, so both exercise the same thing.

use std::{
    fs,
    io::Read,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{ChildGuard, EchoServer, Lab};

/// The service port used for both UDP and TCP.
pub const SERVICE_PORT: u16 = 7000;

/// How the agent and backends are started.
#[derive(Clone, Debug)]
pub struct ScenarioSpec {
    /// Path of the `lb-agent` binary.
    pub agent_bin: PathBuf,
    /// `ipip` or `l2`.
    pub forwarding: String,
    /// `skb`, `native` or `auto`.
    pub xdp_mode: String,
    /// Run the agent with `--keep-attached` (program and pins survive its exit).
    pub keep_attached: bool,
    /// Balance the IPv6 VIP to the backends' IPv6 addresses instead of IPv4.
    pub ipv6: bool,
    /// The config's `announce` (`l2`: the LB answers ARP/NDP for the VIPs; for a lab built
    /// with `vip_route: false`). `None`: not set.
    pub announce: Option<String>,
    /// More arguments of `lb-agent run` (e.g. `--metrics-address`).
    pub agent_args: Vec<String>,
}

impl ScenarioSpec {
    /// `forwarding` with generic XDP, IPv4, no announcement, nothing kept attached, no extra
    /// agent arguments.
    pub fn new(agent_bin: impl Into<PathBuf>, forwarding: &str) -> ScenarioSpec {
        ScenarioSpec {
            agent_bin: agent_bin.into(),
            forwarding: forwarding.into(),
            xdp_mode: "skb".into(),
            keep_attached: false,
            ipv6: false,
            announce: None,
            agent_args: Vec::new(),
        }
    }
}

/// Removes a directory tree on drop (temporary files, bpffs pin directories).
#[derive(Debug)]
pub struct DirGuard(pub PathBuf);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if self.0.exists()
            && let Err(e) = fs::remove_dir_all(&self.0)
        {
            eprintln!("cleanup: removing {}: {e}", self.0.display());
        }
    }
}

/// A load balancer with three (or more) backends behind one VIP, for UDP and TCP.
pub struct Scenario {
    // Field order is drop order: agent first (it detaches), then servers and decaps, then
    // the directories.
    agent: Option<ChildGuard>,
    servers: Vec<EchoServer>,
    decaps: Vec<ChildGuard>,
    spec: ScenarioSpec,
    vip: IpAddr,
    lb_iface: String,
    /// How many agents were started (each logs to its own file).
    starts: u32,
    pin_dir: DirGuard,
    work_dir: DirGuard,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl Scenario {
    /// Start decap and echo servers on every backend, then the agent with all backends.
    pub fn start(lab: &Lab, spec: ScenarioSpec) -> Result<Scenario> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("lbt-{}-{n}", std::process::id());
        let work_dir = DirGuard(std::env::temp_dir().join(&tag));
        fs::create_dir_all(&work_dir.0)
            .with_context(|| format!("creating {}", work_dir.0.display()))?;
        let pin_dir = DirGuard(PathBuf::from("/sys/fs/bpf").join(&tag));
        let mut decaps = Vec::new();
        let mut servers = Vec::new();
        let vip: IpAddr = if spec.ipv6 {
            lab.vip6().into()
        } else {
            lab.vip().into()
        };
        for b in lab.backends() {
            let log = work_dir.0.join(format!("decap-{}.log", b.name));
            let log =
                fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
            let mut cmd = b.ns.command(&spec.agent_bin);
            // Tunnels are accepted from the load balancer only.
            let lb4 = lab.lb_addr().to_string();
            let lb6 = crate::lab::v6_of(lab.lb_addr()).to_string();
            cmd.args(["decap", "--interface", "eth0", "--xdp-mode", &spec.xdp_mode])
                .args(["--allow-source", &lb4, "--allow-source", &lb6])
                .stdout(Stdio::null())
                .stderr(log);
            decaps.push(ChildGuard::spawn(&mut cmd)?);
            servers.push(EchoServer::start(
                &b.ns,
                &b.name,
                SocketAddr::new(vip, SERVICE_PORT),
            )?);
        }
        let mut scenario = Scenario {
            agent: None,
            servers,
            decaps,
            spec,
            vip,
            lb_iface: lab.lb_iface().to_string(),
            starts: 0,
            pin_dir,
            work_dir,
        };
        let all: Vec<Ipv4Addr> = lab.backends().iter().map(|b| b.addr).collect();
        scenario.write_config(&all, None)?;
        // Give the decap programs a moment to attach before traffic arrives.
        scenario.wait_for_decaps(lab)?;
        scenario.start_agent(lab)?;
        Ok(scenario)
    }

    /// Start an agent on the LB node and wait until its program is attached (a second agent
    /// adopts the pinned link of the first).
    pub fn start_agent(&mut self, lab: &Lab) -> Result<()> {
        if self.agent.is_some() {
            bail!("an agent is already running");
        }
        self.starts += 1;
        let log_path = self.agent_log();
        let log = fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = lab.lb().command(&self.spec.agent_bin);
        cmd.args(["run", "--config"])
            .arg(self.config_path())
            .args(["--xdp-mode", &self.spec.xdp_mode, "--resync-interval", "2"])
            .arg("--pin-path")
            .arg(&self.pin_dir.0)
            .env("RUST_LOG", "info,netlink_packet_route=error")
            .stdout(Stdio::null())
            .stderr(log);
        if self.spec.keep_attached {
            cmd.arg("--keep-attached");
        }
        cmd.args(&self.spec.agent_args);
        self.agent = Some(ChildGuard::spawn(&mut cmd)?);
        self.wait_until(Duration::from_secs(20), "the agent attaches", |s| {
            Ok(s.agent_log_text().contains("load balancer attached"))
        })
    }

    pub fn vip(&self) -> SocketAddr {
        SocketAddr::new(self.vip, SERVICE_PORT)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir.0
    }

    pub fn config_path(&self) -> PathBuf {
        self.work_dir.0.join("lb.yaml")
    }

    /// Log of the most recently started agent.
    pub fn agent_log(&self) -> PathBuf {
        self.work_dir.0.join(format!("agent-{}.log", self.starts))
    }

    /// The agent's log so far (for failure messages).
    pub fn agent_log_text(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(self.agent_log()) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn servers(&self) -> &[EchoServer] {
        &self.servers
    }

    /// Write the config: one UDP and one TCP service on the VIP, with these backends.
    /// `forwarding` overrides the scenario's mode.
    /// The address the config uses for a backend host: its IPv4 address, or its IPv6 twin.
    pub fn backend_ip(&self, host: Ipv4Addr) -> IpAddr {
        if self.spec.ipv6 {
            crate::lab::v6_of(host).into()
        } else {
            host.into()
        }
    }

    pub fn write_config(&self, backends: &[Ipv4Addr], forwarding: Option<&str>) -> Result<()> {
        let forwarding = forwarding.unwrap_or(&self.spec.forwarding);
        let mut text = format!("interface: {}\n", self.lb_iface);
        if let Some(a) = &self.spec.announce {
            text.push_str(&format!("announce: {a}\n"));
        }
        text.push_str("services:\n");
        for proto in ["udp", "tcp"] {
            text.push_str(&format!(
                "  - name: echo-{proto}\n    vip: \"{}\"\n    port: {SERVICE_PORT}\n    protocol: {proto}\n    forwarding: {forwarding}\n    backends:\n",
                self.vip
            ));
            for b in backends {
                text.push_str(&format!("      - address: \"{}\"\n", self.backend_ip(*b)));
            }
        }
        let path = self.config_path();
        fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// SIGHUP the agent and wait until `lb-agent status` shows exactly `backends` on both
    /// services.
    pub fn reload(&mut self, backends: &[Ipv4Addr]) -> Result<()> {
        self.hup_agent()?;
        let mut want: Vec<String> = backends
            .iter()
            .map(|b| self.backend_ip(*b).to_string())
            .collect();
        want.sort();
        self.wait_until(Duration::from_secs(20), "the reload is applied", |s| {
            let status = s.status_json()?;
            let services = status["services"].as_array().cloned().unwrap_or_default();
            Ok(!services.is_empty()
                && services.iter().all(|svc| {
                    let mut got: Vec<String> = svc["backends"]
                        .as_array()
                        .map(|b| {
                            b.iter()
                                .filter_map(|x| x["address"].as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default();
                    got.sort();
                    got == want
                }))
        })
    }

    /// `lb-agent status --json` for this scenario's pin directory.
    pub fn status_json(&self) -> Result<serde_json::Value> {
        let out = std::process::Command::new(&self.spec.agent_bin)
            .args(["status", "--json", "--pin-path"])
            .arg(&self.pin_dir.0)
            .output()
            .context("running lb-agent status")?;
        if !out.status.success() {
            bail!(
                "lb-agent status failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).context("parsing lb-agent status --json")
    }

    fn wait_for_decaps(&mut self, lab: &Lab) -> Result<()> {
        crate::lab::wait_decaps_attached(lab.backends(), &mut self.decaps)
    }

    fn wait_until(
        &mut self,
        limit: Duration,
        what: &str,
        mut done: impl FnMut(&Scenario) -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if done(self).unwrap_or(false) {
                return Ok(());
            }
            if let Some(agent) = self.agent.as_mut()
                && let Some(status) = agent.try_wait()?
            {
                bail!(
                    "the agent exited ({status}) before {what}; its log:\n{}",
                    self.agent_log_text()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out waiting until {what}; agent log:\n{}",
                    self.agent_log_text()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stop the agent (SIGTERM: it detaches) and return its exit status.
    pub fn stop_agent(&mut self) -> Result<std::process::ExitStatus> {
        self.agent.take().context("agent not running")?.stop()
    }

    /// Kill the agent with SIGKILL, as a crash or the OOM killer would: it cleans nothing up.
    pub fn kill_agent(&mut self) -> Result<std::process::ExitStatus> {
        let agent = self.agent.take().context("agent not running")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(agent.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .context("sending SIGKILL to the agent")?;
        // Reaps it (its SIGTERM reaches a process that is already gone).
        agent.stop()
    }

    /// Send SIGHUP to the agent (re-read the file), without waiting for anything.
    pub fn hup_agent(&self) -> Result<()> {
        let pid = self
            .agent
            .as_ref()
            .map(ChildGuard::id)
            .context("agent not running")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .context("sending SIGHUP to the agent")
    }
}
