//! `cargo xtask test`: every tier, in order of speed.

use crate::util::{cargo, require_root, sh};

#[derive(clap::Args)]
pub struct Options {
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    no_lint: bool,
    /// Extra arguments for `cargo test` (e.g. a test name filter).
    #[arg(last = true)]
    args: Vec<String>,
}

pub fn run_tests(opts: &Options) -> anyhow::Result<()> {
    if !opts.no_lint {
        sh(cargo().args(["fmt", "--all", "--check"]))?;
        sh(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
    }
    // Host unit tests, BPF_PROG_TEST_RUN tests and the netns end-to-end tests: one run over
    // the default members (lb-ebpf is built for BPF by lb-agent's build script instead).
    sh(cargo()
        .args(["test", "--no-fail-fast"])
        .arg("--")
        .args(&opts.args))?;
    Ok(())
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    require_root("cargo xtask test")?;
    crate::setup::ensure()?;
    run_tests(opts)
}
