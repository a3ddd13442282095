//! `cargo xtask demo` (placeholder until the lab is ready).

#[derive(clap::Args)]
pub struct Options {}

pub fn run(_opts: &Options) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
