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
mod cases;
#[cfg(feature = "bench")]
mod dataplane;
#[cfg(feature = "bench")]
mod harness;
#[cfg(feature = "bench")]
mod results;
#[cfg(feature = "bench")]
mod system;

use std::path::PathBuf;

use crate::util::require_root;

#[derive(clap::Args, Clone, Debug)]
pub struct Options {
    /// Fewer iterations and rounds, smaller control-plane sizes' samples, a short end-to-end
    /// window: a few minutes in all.
    #[arg(long)]
    quick: bool,
    /// CPU the data plane is measured on (default: the last one).
    #[arg(long)]
    cpu: Option<usize>,
    /// Sections to run.
    #[arg(long, value_delimiter = ',', default_value = "dataplane,control,e2e")]
    only: Vec<Section>,
    /// Directory for report.md and the plots (default: target/bench in the workspace).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    Dataplane,
    Control,
    E2e,
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
    use crate::util::{cargo, sh};
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

#[cfg(feature = "bench")]
fn measure(opts: &Options) -> anyhow::Result<()> {
    use anyhow::Context;
    use lb_ebpf_build::{BuildOptions, workspace_root};

    let machine = system::Machine::probe();
    let cpu = opts.cpu.unwrap_or(machine.cpus.saturating_sub(1));
    let out_dir = opts
        .out
        .clone()
        .unwrap_or_else(|| workspace_root().join("target/bench"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let object = lb_ebpf_build::build(&BuildOptions::default()).context("building lb-ebpf")?;
    let harness = lb_ebpf_build::harness_object(&object);

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
    let mut failed = Vec::new();
    if opts.only.contains(&Section::Dataplane) {
        let settings = dataplane::Settings {
            repeat: if opts.quick { 200_000 } else { 1_000_000 },
            rounds: if opts.quick { 5 } else { 9 },
            cpu,
        };
        match dataplane::run(&harness, settings) {
            Ok(d) => results.dataplane = Some(d),
            Err(e) => {
                eprintln!("dataplane: FAILED: {e:#}");
                results.notes.push(format!("Data plane failed: {e:#}"));
                failed.push("dataplane");
            }
        }
    }
    results.machine.load_end = system::load_average();
    if !failed.is_empty() {
        anyhow::bail!("sections failed: {}", failed.join(", "));
    }
    Ok(())
}
