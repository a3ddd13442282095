//! `cargo xtask bench [--quick]`: data-plane, control-plane and end-to-end figures, each
//! next to a baseline measured in the same run, printed as a table and written to
//! `target/bench/` (report.md and SVG plots).
//!
//! The measuring code links lb-agent, whose build script needs the eBPF toolchain; the
//! default xtask build must not (it is what installs that toolchain), so `cargo xtask bench`
//! first builds the agent and then re-runs xtask in release mode with the `bench` feature.

#[cfg_attr(not(feature = "bench"), allow(dead_code))]
mod stats;
#[cfg_attr(not(feature = "bench"), allow(dead_code))]
mod svg;
#[cfg_attr(not(feature = "bench"), allow(dead_code))]
mod table;

#[cfg(feature = "bench")]
mod announce;
#[cfg(feature = "bench")]
mod cases;
#[cfg(feature = "bench")]
mod dataplane;
#[cfg(feature = "bench")]
mod e2e;
#[cfg(feature = "bench")]
mod harness;
#[cfg(feature = "bench")]
mod maglev;
#[cfg(feature = "bench")]
mod plots;
#[cfg(feature = "bench")]
mod report;
#[cfg(feature = "bench")]
mod results;
#[cfg(feature = "bench")]
mod rss;
#[cfg(feature = "bench")]
mod scale;
#[cfg(feature = "bench")]
mod sync_bench;
#[cfg(feature = "bench")]
mod system;

use std::path::PathBuf;

use crate::util::require_root;

#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    /// Fewer iterations, rounds and samples, and short end-to-end windows: a few minutes.
    #[arg(long)]
    quick: bool,
    /// CPU the data plane is measured on (default: the last one).
    #[arg(long)]
    cpu: Option<usize>,
    /// Sections to run.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "dataplane,control,e2e,announce"
    )]
    only: Vec<Section>,
    /// Data plane: only the cases whose label contains this text (baselines always run).
    #[arg(long)]
    case: Option<String>,
    /// Directory for report.md and the plots (default: target/bench in the workspace).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    Dataplane,
    Control,
    E2e,
    Announce,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    require_root("cargo xtask bench")?;
    #[cfg(not(feature = "bench"))]
    {
        let _ = opts;
        relaunch()
    }
    #[cfg(feature = "bench")]
    {
        measure(opts)
    }
}

/// Build the agent binary (the RSS measurement runs it) and re-run this command from a
/// release xtask with the `bench` feature.
#[cfg(not(feature = "bench"))]
fn relaunch() -> anyhow::Result<()> {
    use crate::util::sh;
    let cargo = crate::util::nested_cargo;
    crate::setup::ensure()?;
    eprintln!("bench: building lb-agent and the measuring xtask (release, feature `bench`)");
    sh(cargo().args([
        "build",
        "--release",
        "--package",
        "lb-agent",
        "--bin",
        "lb-agent",
    ]))?;
    // The child handles Ctrl-C and cleans up; this process only waits for it.
    let _ = ctrlc::set_handler(|| {});
    sh(cargo()
        .args(["run", "--quiet", "--release", "--package", "xtask"])
        .args(["--features", "bench", "--"])
        .args(std::env::args_os().skip(1)))
}

/// Set by Ctrl-C; checked between measurements (every resource is in a guard, so leaving
/// early cleans up).
#[cfg(feature = "bench")]
static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[cfg(feature = "bench")]
fn check_stop() -> anyhow::Result<()> {
    if STOP.load(std::sync::atomic::Ordering::SeqCst) {
        anyhow::bail!("interrupted");
    }
    Ok(())
}

/// Run one section; a failure is reported, noted, and does not stop the others.
#[cfg(feature = "bench")]
fn section<T>(
    name: &str,
    results: &mut results::Results,
    failed: &mut Vec<String>,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> Option<T> {
    if check_stop().is_err() {
        return None;
    }
    match f() {
        Ok(v) => Some(v),
        Err(e) => {
            eprintln!("{name}: FAILED: {e:#}");
            results.notes.push(format!("{name} failed: {e:#}"));
            failed.push(name.to_string());
            None
        }
    }
}

#[cfg(feature = "bench")]
fn measure(opts: &Options) -> anyhow::Result<()> {
    use std::time::Duration;

    use anyhow::Context;
    use lb_ebpf_build::{BuildOptions, workspace_root};

    ctrlc::set_handler(|| STOP.store(true, std::sync::atomic::Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    let machine = system::Machine::probe();
    let cpu = opts.cpu.unwrap_or(machine.cpus.saturating_sub(1));
    let out_dir = opts
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/bench"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let object = lb_ebpf_build::build(&BuildOptions::default()).context("building lb-ebpf")?;
    let harness = lb_ebpf_build::harness_object(&object);
    let agent = workspace_root().join("target/release/lb-agent");

    let mut results = results::Results {
        machine,
        quick: opts.quick,
        cpu,
        ..Default::default()
    };
    eprintln!(
        "bench: {} ({} CPUs), kernel {}, load {:.2}; data plane on CPU {cpu}",
        results.machine.cpu_model,
        results.machine.cpus,
        results.machine.kernel,
        results.machine.load_start
    );
    let quick = opts.quick;
    let mut failed = Vec::new();
    if opts.only.contains(&Section::Dataplane) {
        let settings = dataplane::Settings {
            repeat: if quick { 200_000 } else { 1_000_000 },
            rounds: if quick { 5 } else { 9 },
            cpu,
            case: opts.case.clone(),
        };
        results.dataplane = section("data plane", &mut results, &mut failed, || {
            dataplane::run(&harness, settings)
        });
    }
    if opts.only.contains(&Section::Control) {
        results.maglev = section("Maglev", &mut results, &mut failed, || maglev::run(quick));
        let mut sync = results::Sync::default();
        for (services, changes) in [(1, 200), (1_000, 100), (10_000, 30)] {
            let changes = if quick { changes / 4 } else { changes };
            if let Some(row) = section("sync", &mut results, &mut failed, || {
                let row = sync_bench::run(services, changes)?;
                eprintln!(
                    "sync: {services:>6} services: full {:.3} s ({} Maglev slots written), change p50 {:.2} ms p99 {:.2} ms (n={changes})",
                    row.full_ms / 1e3,
                    row.maglev_writes,
                    row.change_ms.median,
                    row.change_ms.p99
                );
                Ok(row)
            }) {
                sync.rows.push(row);
            }
        }
        for services in [1, 10_000] {
            if let Some(a) = section("agent RSS", &mut results, &mut failed, || {
                let a = rss::run(&agent, services)?;
                eprintln!(
                    "agent: {services:>6} services: VmRSS {:.1} MiB, peak {:.1} MiB, all programmed after {:.1} s",
                    a.rss_mib, a.peak_mib, a.ready_s
                );
                Ok(a)
            }) {
                sync.rss.push(a);
            }
        }
        if !sync.rows.is_empty() || !sync.rss.is_empty() {
            results.sync = Some(sync);
        }
    }
    if opts.only.contains(&Section::E2e) {
        let settings = e2e::Settings {
            runs: if quick { 3 } else { 5 },
            warmup: Duration::from_secs(1),
            window: Duration::from_secs(if quick { 2 } else { 5 }),
            repeat: if quick { 4_000_000 } else { 50_000_000 },
        };
        results.e2e = section("end to end", &mut results, &mut failed, || {
            e2e::run(&harness, &agent, settings, &check_stop)
        });
    }
    let mut announce = None;
    if opts.only.contains(&Section::Announce) {
        let settings = announce::Settings {
            trials: if quick { 1 } else { 3 },
        };
        announce = section("announce", &mut results, &mut failed, || {
            announce::run(&agent, settings, &check_stop)
        });
        if let Some(a) = &announce {
            results.notes.extend(a.failures.iter().cloned());
            if !a.failures.is_empty() {
                failed.push("announce".into());
            }
        }
    }
    results.machine.load_end = system::load_average();
    write_outputs(&results, announce.as_ref(), &out_dir)?;
    if !failed.is_empty() {
        anyhow::bail!("sections failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Terminal tables, report.md and the plots.
#[cfg(feature = "bench")]
fn write_outputs(
    results: &results::Results,
    announce: Option<&announce::Announce>,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use report::Part;
    let mut plots: Vec<(Part, &str, &str)> = Vec::new();
    let mut write = |part: Part,
                     file: &'static str,
                     caption: &'static str,
                     svg: String|
     -> anyhow::Result<()> {
        let path = dir.join(file);
        std::fs::write(&path, svg).with_context(|| format!("writing {}", path.display()))?;
        plots.push((part, file, caption));
        Ok(())
    };
    if let Some(d) = &results.dataplane {
        write(
            Part::Dataplane,
            "dataplane.svg",
            "ns per packet per case, with baselines",
            plots::dataplane(d),
        )?;
    }
    if let Some(e) = &results.e2e {
        write(
            Part::E2e,
            "e2e.svg",
            "packets per second delivered, per setup",
            plots::e2e(e),
        )?;
    }
    if let Some(m) = &results.maglev {
        write(
            Part::Control,
            "disruption.svg",
            "Maglev disruption vs N against 1/N",
            plots::disruption(m),
        )?;
    }
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let report = dir.join("report.md");
    std::fs::write(&report, report::markdown(results, announce, &date, &plots))
        .with_context(|| format!("writing {}", report.display()))?;
    println!("{}", report::text(results, announce));
    println!("report: {}", report.display());
    for (_, file, _) in &plots {
        println!("plot:   {}", dir.join(file).display());
    }
    Ok(())
}
