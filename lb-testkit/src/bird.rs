//! BIRD 2 daemons in network namespaces, for BGP tests with real sessions and real kernel
//! routes.
//!
//! - [`BirdDaemon`]: `bird -f` in a namespace, killed and its files removed on drop.
//! - [`router_config`]: the router side of a test: sessions to the load-balancer nodes,
//!   everything they announce installed in the namespace's kernel table, equal paths merged
//!   into one ECMP route.
//! - [`wait_route`] / [`route_nexthops`]: the kernel's next hops for a prefix.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::netns::{ChildGuard, NetNs};

/// How long [`BirdDaemon::start`] waits for the control socket to answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one `birdc` call may take.
const BIRDC_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval of the waits here.
const POLL: Duration = Duration::from_millis(20);
/// `sun_path` holds 108 bytes, the terminating NUL included.
const MAX_SOCKET_PATH: usize = 107;

/// A `bird -f -c CONF -s SOCK` process in a namespace. Dropping it stops the daemon
/// (SIGTERM, then SIGKILL) and removes its configuration, socket and log;
/// [`BirdDaemon::kill`] leaves the configuration and the log to the caller's directory guard.
#[derive(Debug)]
pub struct BirdDaemon {
    child: Option<ChildGuard>,
    /// Set by [`BirdDaemon::kill`]: drop removes only the socket.
    killed: bool,
    ns_name: String,
    config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl BirdDaemon {
    /// Writes `config_text` to `dir/bird-NS.conf` and runs BIRD with it in `ns` (its control
    /// socket `dir/bird-NS.ctl`, its output in `dir/bird-NS.log`, NS the namespace's name, so
    /// daemons may share `dir`). Returns once `birdc show status` answers.
    pub fn start(ns: &NetNs, dir: &Path, config_text: &str) -> Result<BirdDaemon> {
        let bird = find_program("bird")?;
        let name = ns.name();
        let config = dir.join(format!("bird-{name}.conf"));
        let socket = dir.join(format!("bird-{name}.ctl"));
        let log = dir.join(format!("bird-{name}.log"));
        ensure!(
            socket.as_os_str().len() <= MAX_SOCKET_PATH,
            "control socket path {} is longer than a unix socket allows",
            socket.display()
        );
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // A socket left by an earlier daemon of a namespace with the same name.
        let _ = fs::remove_file(&socket);
        fs::write(&config, config_text).with_context(|| format!("writing {}", config.display()))?;
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone().context("duplicating the log file handle")?;
        let child = ChildGuard::spawn(
            ns.command(&bird)
                .arg("-f")
                .arg("-c")
                .arg(&config)
                .arg("-s")
                .arg(&socket)
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err),
        )
        .with_context(|| format!("starting bird in {name}"))?;
        let mut daemon = BirdDaemon {
            child: Some(child),
            killed: false,
            ns_name: name.to_owned(),
            config,
            socket,
            log,
        };
        daemon.wait_ready()?;
        Ok(daemon)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "bird in {} exited at start ({status}):\n{}",
                    self.ns_name,
                    self.log_text()
                );
            }
            if self.socket.exists()
                && let Ok(out) = self.birdc(&["show", "status"])
                && out.contains("Daemon is up and running")
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "bird in {} did not answer on {} within {START_TIMEOUT:?}:\n{}",
                    self.ns_name,
                    self.socket.display(),
                    self.log_text()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// `birdc -s SOCK args...`, bounded in time; its stdout. A failing command (birdc exits
    /// non-zero) is an error with its output.
    pub fn birdc(&self, args: &[&str]) -> Result<String> {
        let birdc = find_program("birdc")?;
        let mut cmd = Command::new(birdc);
        cmd.arg("-s").arg(&self.socket).args(args);
        let what = format!("birdc -s {} {}", self.socket.display(), args.join(" "));
        let (ok, stdout, stderr) = run_bounded(&mut cmd, BIRDC_TIMEOUT).context(what.clone())?;
        if !ok {
            bail!("`{what}` failed: {}{}", stdout.trim(), stderr.trim());
        }
        Ok(stdout)
    }

    /// SIGKILL, as when a node dies: no BGP NOTIFICATION, the kernel closes the sockets.
    /// Removes the control socket; the configuration stays (a new daemon may start with it,
    /// as after a reboot) and so does the log, both for the caller's directory guard.
    pub fn kill(mut self) -> Result<()> {
        self.killed = true;
        let Some(guard) = self.child.take() else {
            return Ok(());
        };
        let mut child = guard.into_inner();
        // Already exited: `kill` fails with InvalidInput; `wait` reaps it either way.
        let _ = child.kill();
        child.wait().context("waiting for killed bird")?;
        Ok(())
    }

    /// The daemon's pid (0 once killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, ChildGuard::id)
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// What BIRD logged so far (the configuration logs to stderr).
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_else(|e| format!("(no log: {e})"))
    }
}

impl Drop for BirdDaemon {
    fn drop(&mut self) {
        // ChildGuard: SIGTERM (BIRD says goodbye to its peers), bounded, then SIGKILL.
        drop(self.child.take());
        let files = if self.killed {
            vec![&self.socket]
        } else {
            vec![&self.config, &self.socket, &self.log]
        };
        for path in files {
            match fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    eprintln!("lb-testkit: removing {}: {e}", path.display());
                }
                _ => {}
            }
        }
    }
}

/// The BGP protocol name [`router_config`] gives the neighbour `addr`.
pub fn router_protocol_name(addr: &IpAddr) -> String {
    let text: String = addr
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let family = if addr.is_ipv4() { 4 } else { 6 };
    format!("n{family}_{text}")
}

/// A router's BIRD configuration for tests: a session to each neighbour `(address, asn)`
/// (the load-balancer nodes; same ASN as `local_asn` means iBGP), importing everything and
/// exporting nothing; a kernel protocol per family puts the routes into the namespace's
/// main table, equal paths merged (ECMP). LOCAL_PREF is accepted from eBGP neighbours
/// too, so tests see what the nodes sent. Short timers so that a restarted node is back in
/// a second or two.
pub fn router_config(router_id: Ipv4Addr, local_asn: u32, neighbors: &[(IpAddr, u32)]) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = write_router_config(&mut out, router_id, local_asn, neighbors);
    out
}

fn write_router_config(
    out: &mut String,
    router_id: Ipv4Addr,
    local_asn: u32,
    neighbors: &[(IpAddr, u32)],
) -> std::fmt::Result {
    writeln!(
        out,
        "# Test router (lb-testkit): BGP from the LB nodes into the kernel, ECMP."
    )?;
    writeln!(out, "log stderr all;")?;
    writeln!(out, "router id {router_id};")?;
    writeln!(out, "\nprotocol device {{\n}}")?;
    for family in ["ipv4", "ipv6"] {
        writeln!(out, "\nprotocol kernel kernel_{family} {{")?;
        writeln!(
            out,
            "  {family} {{\n    import none;\n    export all;\n  }};"
        )?;
        writeln!(out, "  merge paths on;\n}}")?;
    }
    for (addr, asn) in neighbors {
        writeln!(out, "\nprotocol bgp {} {{", router_protocol_name(addr))?;
        writeln!(out, "  local as {local_asn};")?;
        writeln!(out, "  neighbor {addr} as {asn};")?;
        if *asn == local_asn {
            // iBGP: BIRD assumes multihop and a recursive next hop; the nodes are on-link.
            writeln!(out, "  direct;")?;
        } else {
            writeln!(out, "  allow bgp_local_pref on;")?;
        }
        writeln!(out, "  connect delay time 1;")?;
        writeln!(out, "  connect retry time 1;")?;
        writeln!(out, "  error wait time 1, 2;")?;
        let family = if addr.is_ipv4() { "ipv4" } else { "ipv6" };
        writeln!(
            out,
            "  {family} {{\n    import all;\n    export none;\n  }};\n}}"
        )?;
    }
    Ok(())
}

/// The gateways of the kernel route for exactly `prefix` in `ns` (`198.18.100.1/32`,
/// `2001:db8:100::1/128`), sorted; empty when there is none. `ip -j route show exact`, with
/// `-6` for an IPv6 prefix; one gateway per next hop of a multipath route.
pub fn route_nexthops(ns: &NetNs, prefix: &str) -> Result<Vec<IpAddr>> {
    let family = if prefix.contains(':') { "-6" } else { "-4" };
    let out = ns.ip(&["-j", family, "route", "show", "exact", prefix])?;
    let routes: serde_json::Value = if out.trim().is_empty() {
        serde_json::Value::Array(Vec::new())
    } else {
        serde_json::from_str(&out).with_context(|| format!("parsing `ip -j route`: {out}"))?
    };
    let mut gateways = Vec::new();
    for route in routes.as_array().into_iter().flatten() {
        let hops = route["nexthops"].as_array().cloned().unwrap_or_default();
        for hop in hops.iter().chain(std::iter::once(route)) {
            if let Some(gw) = hop["gateway"].as_str() {
                gateways.push(
                    gw.parse::<IpAddr>()
                        .with_context(|| format!("gateway {gw:?} in {out}"))?,
                );
            }
        }
    }
    gateways.sort();
    Ok(gateways)
}

/// Polls [`route_nexthops`] until the route for `prefix` has `expected_nexthops` next hops
/// (0: no route), at most `timeout`; returns the gateways.
pub fn wait_route(
    ns: &NetNs,
    prefix: &str,
    expected_nexthops: usize,
    timeout: Duration,
) -> Result<Vec<IpAddr>> {
    let deadline = Instant::now() + timeout;
    loop {
        let hops = route_nexthops(ns, prefix)?;
        if hops.len() == expected_nexthops {
            return Ok(hops);
        }
        if Instant::now() >= deadline {
            bail!(
                "route {prefix} in {}: {} next hops {hops:?} after {timeout:?}, expected \
                 {expected_nexthops}",
                ns.name(),
                hops.len()
            );
        }
        thread::sleep(POLL);
    }
}

/// `program` on PATH, or in /usr/sbin and /sbin (where Debian puts BIRD, and which a
/// non-login PATH may lack).
fn find_program(program: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| {
            format!(
                "`{program}` not found: BGP tests need BIRD 2 (Debian package bird2; \
                 `cargo xtask setup` or `apt-get install bird2`)"
            )
        })
}

/// Runs `cmd` with stdout and stderr captured, killing it after `timeout`; returns whether
/// it succeeded, stdout and stderr.
fn run_bounded(cmd: &mut Command, timeout: Duration) -> Result<(bool, String, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().context("polling child")? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) => Ok((status.success(), stdout, stderr)),
        None => bail!("no answer within {timeout:?}: {stdout}{stderr}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_config_shape() {
        let text = router_config(
            Ipv4Addr::new(198, 18, 2, 254),
            64500,
            &[
                ("198.18.2.1".parse().unwrap(), 64512),
                ("2001:db8:2::1".parse().unwrap(), 64500),
            ],
        );
        assert!(text.contains("router id 198.18.2.254;"), "{text}");
        assert!(text.contains("protocol kernel kernel_ipv4 {"), "{text}");
        assert!(text.contains("protocol kernel kernel_ipv6 {"), "{text}");
        assert_eq!(text.matches("merge paths on;").count(), 2, "{text}");
        assert!(text.contains("protocol bgp n4_198_18_2_1 {"), "{text}");
        assert!(text.contains("protocol bgp n6_2001_db8_2__1 {"), "{text}");
        assert!(
            text.contains("neighbor 2001:db8:2::1 as 64500;\n  direct;"),
            "{text}"
        );
    }
}
