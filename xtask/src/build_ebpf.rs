//! `cargo xtask build-ebpf`.

use anyhow::Context;
use lb_ebpf_build::{BuildOptions, workspace_root};

#[derive(clap::Args)]
pub struct Options {
    /// Debug profile instead of release.
    #[arg(long)]
    debug: bool,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    let build = BuildOptions {
        release: !opts.debug,
        target_dir: workspace_root().join("target/bpf"),
    };
    let object = lb_ebpf_build::build(&build).context("building lb-ebpf")?;
    println!("{}", object.display());
    Ok(())
}
