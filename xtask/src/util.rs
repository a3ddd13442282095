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

/// `cargo` for building the workspace from inside `cargo xtask`: without the
/// `CARGO_PKG_*`/`CARGO_MANIFEST_*` (and crate/bin) variables `cargo run` gave this process.
/// A nested cargo passes them on to build scripts, and some (ring's) rerun on them, which
/// would rebuild half the dependency tree after every plain `cargo build`.
pub fn nested_cargo() -> Command {
    let mut cmd = cargo();
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || matches!(
                &*k,
                "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
            )
        {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// Whether `program` is an executable file in a directory of `PATH`.
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
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
