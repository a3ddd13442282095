//! Small helpers shared by the tasks.

use std::process::Command;

use anyhow::{Context, bail};

/// Run a command, inheriting stdio; fail with the command line if it fails.
pub fn sh(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("+ {shown}");
    let status = cmd.status().with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

/// `cargo`, as invoked for this task (the same toolchain).
pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

pub fn require_root(what: &str) -> anyhow::Result<()> {
    if !nix_is_root() {
        bail!("{what} needs root (BPF programs, network namespaces): run it with sudo or as root");
    }
    Ok(())
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
