//! Agent memory: the real `lb-agent` binary (release) on a generated config, in a private
//! network namespace with one veth pair, its maps pinned in a private directory. RSS is
//! read from /proc once every service is in the pinned maps.

use std::{
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use aya::maps::{HashMap, Map, MapData};
use lb_common::{ServiceKey, ServiceValue, maps};
use lb_testkit::{ChildGuard, NetNs};

use super::{harness::PinDir, results::AgentRss, scale, sync_bench, system::rss_kib};

const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// Entries of the pinned `LB_SERVICES` under `pin_dir` (None while it does not exist).
pub fn services_in(pin_dir: &Path) -> Option<usize> {
    let data = MapData::from_pin(pin_dir.join(maps::SERVICES)).ok()?;
    let map: HashMap<MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(Map::from_map_data(data).ok()?).ok()?;
    Some(map.keys().filter(Result::is_ok).count())
}

/// Start the agent with `services` services and measure it once they are all programmed.
pub fn run(agent: &Path, services: usize) -> anyhow::Result<AgentRss> {
    let per = sync_bench::BACKENDS_PER_SERVICE;
    let ns = NetNs::new("lbbench").context("creating the agent's namespace")?;
    ns.ip(&[
        "link", "add", "bench0", "type", "veth", "peer", "name", "bench1",
    ])?;
    ns.ip(&["addr", "add", "198.18.0.2/24", "dev", "bench0"])?;
    ns.ip(&["link", "set", "bench0", "up"])?;
    ns.ip(&["link", "set", "bench1", "up"])?;

    let config =
        std::env::temp_dir().join(format!("lb-bench-{}-{services}.yaml", std::process::id()));
    std::fs::write(&config, scale::config_yaml(services, per, "bench0")?)
        .with_context(|| format!("writing {}", config.display()))?;
    let pins = PinDir::new("agent");
    let log = std::fs::File::create(config.with_extension("log"))?;
    let started = Instant::now();
    let mut child = ChildGuard::spawn(
        ns.command(agent)
            .args(["run", "--config"])
            .arg(&config)
            .args(["--interface", "bench0", "--xdp-mode", "skb", "--pin-path"])
            .arg(pins.path())
            .args(["--maglev-slots"])
            .arg(sync_bench::maglev_slots(services, per).to_string())
            .args(["--flow-table-size", "65536"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log),
    )?;
    let result = (|| {
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("lb-agent exited early ({status})");
            }
            if services_in(pins.path()) == Some(services) {
                break;
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!("lb-agent did not program {services} services within {READY_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let ready_s = started.elapsed().as_secs_f64();
        // Let it settle (allocator, the first resync) before reading.
        std::thread::sleep(Duration::from_secs(2));
        let (rss, peak) = rss_kib(child.id())?;
        Ok(AgentRss {
            services,
            backends: services * per,
            rss_mib: rss as f64 / 1024.0,
            peak_mib: peak as f64 / 1024.0,
            ready_s,
        })
    })();
    let stopped = child.stop();
    let log_path = config.with_extension("log");
    let log_text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&config);
    let _ = std::fs::remove_file(&log_path);
    drop(pins);
    drop(ns);
    let out = result.map_err(|e| {
        let tail: Vec<&str> = log_text.lines().rev().take(10).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        e.context(format!("agent log (last lines):\n{}", tail.join("\n")))
    })?;
    stopped.context("stopping lb-agent")?;
    Ok(out)
}
