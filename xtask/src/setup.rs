//! `cargo xtask setup`: install what building and testing need on a fresh Debian machine.

use std::process::Command;

use anyhow::Context;

use crate::util::{require_root, sh};

/// Debian packages: the rustc with library sources that can build for BPF (rustc-web, LLVM
/// 22), LLVM 22 for bpf-linker, and the tools the tests and demo drive.
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "rust-web-src",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "clang-22",
    "bpftool",
    "libbpf-dev",
    "iproute2",
    "iputils-ping",
    "ethtool",
    "util-linux",
    // `cargo xtask bench`: the nftables DNAT baseline of the end-to-end measurement.
    "nftables",
    // BIRD 2 (`bird`, `birdc`): the BGP tests check the rendered bird.conf with `bird -p`
    // and run real daemons (LB nodes and a router) in namespaces.
    "bird2",
];

fn installed(package: &str) -> bool {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output();
    matches!(out, Ok(o) if String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn missing_packages() -> Vec<&'static str> {
    let mut missing: Vec<&'static str> =
        PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    // The deploy/ manifests are rendered with `kubectl kustomize` in the tests. Any kubectl
    // will do; Debian's comes in kubernetes-client (another package may already provide one,
    // and the two would conflict).
    if !crate::util::on_path("kubectl") {
        missing.push("kubernetes-client");
    }
    missing
}

pub fn run_setup() -> anyhow::Result<()> {
    let missing = missing_packages();
    if missing.is_empty() {
        eprintln!("setup: apt packages present");
    } else {
        eprintln!("setup: installing apt packages: {}", missing.join(" "));
        sh(Command::new("apt-get").arg("update").arg("-q"))?;
        sh(Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing))?;
    }
    let toolchain = lb_ebpf_build::Toolchain::discover();
    if toolchain.bpf_linker.is_none() {
        eprintln!("setup: building bpf-linker against LLVM 22 (about a minute)");
        sh(crate::util::cargo()
            .env("LLVM_PREFIX", "/usr/lib/llvm-22")
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
                "llvm-22",
            ]))?;
    } else {
        eprintln!("setup: bpf-linker present");
    }
    // Optional convenience: Debian's rustc as a rustup toolchain (`cargo +debian`).
    if Command::new("rustup").arg("--version").output().is_ok() {
        let _ = Command::new("rustup")
            .args(["toolchain", "link", "debian", "/usr"])
            .status();
    }
    let still = lb_ebpf_build::Toolchain::discover().check();
    if !still.is_empty() {
        anyhow::bail!(
            "setup finished but the toolchain is still incomplete: {}",
            still
                .iter()
                .map(|m| m.what.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    eprintln!("setup: done; `cargo xtask build-ebpf` will work");
    Ok(())
}

/// Install what is missing, only if something is (cheap when all is there): the demo and the
/// tests call this so they work on a fresh machine.
pub fn ensure() -> anyhow::Result<()> {
    if lb_ebpf_build::Toolchain::discover().check().is_empty() && missing_packages().is_empty() {
        return Ok(());
    }
    eprintln!("setup: the toolchain is incomplete; installing it first (`cargo xtask setup`)");
    run_setup().context("setup")
}

pub fn run() -> anyhow::Result<()> {
    require_root("cargo xtask setup")?;
    run_setup().context("setup")
}
