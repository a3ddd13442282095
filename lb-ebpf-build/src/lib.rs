//! Builds the `lb-ebpf` object for `bpfel-unknown-none`.
//!
//! The BPF target needs `-Z build-std=core`, which needs the standard library's sources and a
//! rustc whose LLVM matches `bpf-linker`'s. On this project's machines that is Debian's
//! `rustc-web` (rustc 1.96, LLVM 22) at /usr/bin with `RUSTC_BOOTSTRAP=1`, and a `bpf-linker`
//! built against LLVM 22. Both `cargo xtask build-ebpf` and `lb-agent`'s build script call
//! [`build`], so the object the agent embeds is always rebuilt from the current sources.

use std::{
    env,
    ffi::OsString,
    fmt,
    path::{Path, PathBuf},
    process::Command,
};

/// The target triple of the data-plane object.
pub const TARGET: &str = "bpfel-unknown-none";
/// The command that installs everything the build needs.
pub const SETUP_COMMAND: &str = "cargo xtask setup";

/// Where the toolchain pieces are; each can be overridden by an environment variable.
#[derive(Debug, Clone)]
pub struct Toolchain {
    /// A cargo able to drive the toolchain below (`LB_EBPF_CARGO`, default /usr/bin/cargo).
    pub cargo: PathBuf,
    /// A rustc with library sources (`LB_EBPF_RUSTC`, default /usr/bin/rustc).
    pub rustc: PathBuf,
    /// `bpf-linker`, looked up on PATH and in $CARGO_HOME/bin.
    pub bpf_linker: Option<PathBuf>,
}

/// Something the build needs and does not have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub what: String,
    pub hint: String,
}

#[derive(Debug)]
pub enum BuildError {
    /// The toolchain is incomplete; nothing was run.
    Missing(Vec<Missing>),
    /// The compiler ran and failed (its output went to stderr).
    Failed { status: String, command: String },
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Missing(items) => {
                writeln!(
                    f,
                    "cannot build the eBPF object, the toolchain is incomplete:"
                )?;
                for m in items {
                    writeln!(f, "  - {}: {}", m.what, m.hint)?;
                }
                write!(f, "run `{SETUP_COMMAND}` (as root) to install all of it")
            }
            BuildError::Failed { status, command } => {
                write!(f, "eBPF build failed ({status}): {command}")
            }
            BuildError::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for BuildError {}

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Directory of the eBPF crate's sources, for change tracking.
pub fn ebpf_source_dirs() -> Vec<PathBuf> {
    let root = workspace_root();
    vec![
        root.join("lb-ebpf/src"),
        root.join("lb-ebpf/Cargo.toml"),
        root.join("lb-common/src"),
        root.join("lb-common/Cargo.toml"),
        root.join("Cargo.lock"),
    ]
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = env::var_os("PATH")
        .map(|p| env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

impl Toolchain {
    /// Locate the toolchain from the environment and the usual places.
    pub fn discover() -> Toolchain {
        let pick = |var: &str, default: &str| {
            env::var_os(var)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(default))
        };
        Toolchain {
            cargo: pick("LB_EBPF_CARGO", "/usr/bin/cargo"),
            rustc: pick("LB_EBPF_RUSTC", "/usr/bin/rustc"),
            bpf_linker: find_on_path("bpf-linker"),
        }
    }

    /// Everything that is missing, each with what installs it. Empty when the build can run.
    pub fn check(&self) -> Vec<Missing> {
        let mut missing = Vec::new();
        if !self.cargo.is_file() || !self.rustc.is_file() {
            missing.push(Missing {
                what: format!("{} / {}", self.cargo.display(), self.rustc.display()),
                hint: "apt-get install rustc-web cargo-web rust-web-src".into(),
            });
        } else {
            match sysroot(&self.rustc) {
                Some(root) if root.join("lib/rustlib/src/rust/library/core").is_dir() => {}
                Some(root) => missing.push(Missing {
                    what: format!(
                        "standard library sources under {}/lib/rustlib/src",
                        root.display()
                    ),
                    hint: "apt-get install rust-web-src".into(),
                }),
                None => missing.push(Missing {
                    what: format!("a working {}", self.rustc.display()),
                    hint: "apt-get install --reinstall rustc-web".into(),
                }),
            }
        }
        if self.bpf_linker.is_none() {
            missing.push(Missing {
                what: "bpf-linker".into(),
                hint: "apt-get install llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev && \
                       LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker \
                       --no-default-features --features llvm-22"
                    .into(),
            });
        }
        missing
    }
}

fn sysroot(rustc: &Path) -> Option<PathBuf> {
    let out = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Name of the benchmark harness object (`lb-ebpf/src/bin/bench_harness.rs`, used only by
/// `cargo xtask bench`). [`build`] builds every binary of `lb-ebpf`, so it lands next to the
/// load balancer's object.
pub const HARNESS_BIN: &str = "lb-bench-harness";

/// The benchmark harness object built alongside `object` (a path [`build`] returned).
pub fn harness_object(object: &Path) -> PathBuf {
    object.with_file_name(HARNESS_BIN)
}

/// Options of one build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Release profile (the default, and what the agent embeds).
    pub release: bool,
    /// Directory for the eBPF build's own target dir.
    pub target_dir: PathBuf,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            release: true,
            target_dir: workspace_root().join("target/bpf"),
        }
    }
}

/// Environment variables a surrounding cargo (build script, `cargo run`) sets that must not
/// leak into the nested build with another toolchain.
const SCRUB: &[&str] = &[
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTDOC",
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET_DIR",
    "RUSTUP_TOOLCHAIN",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
    "CARGO_PRIMARY_PACKAGE",
    "TARGET",
    "HOST",
    "OUT_DIR",
    "PROFILE",
    "OPT_LEVEL",
    "DEBUG",
    "NUM_JOBS",
];

/// Build the object and return its path.
pub fn build(opts: &BuildOptions) -> Result<PathBuf, BuildError> {
    let tc = Toolchain::discover();
    let missing = tc.check();
    if !missing.is_empty() {
        return Err(BuildError::Missing(missing));
    }
    let root = workspace_root();
    let profile = if opts.release { "release" } else { "debug" };

    let mut cmd = Command::new(&tc.cargo);
    for var in SCRUB {
        cmd.env_remove(var);
    }
    // Also drop per-target/profile settings a caller's environment may carry.
    for (key, _) in env::vars_os() {
        let key: OsString = key;
        let k = key.to_string_lossy();
        if k.starts_with("CARGO_FEATURE_")
            || k.starts_with("CARGO_CFG_")
            || k.starts_with("CARGO_PROFILE_")
            || k.starts_with("DEP_")
        {
            cmd.env_remove(&key);
        }
    }
    let mut path = OsString::new();
    if let Some(dir) = tc.bpf_linker.as_deref().and_then(Path::parent) {
        path.push(dir);
        path.push(":");
    }
    path.push(env::var_os("PATH").unwrap_or_default());
    cmd.current_dir(&root)
        .env("PATH", path)
        .env("RUSTC", &tc.rustc)
        .env("RUSTC_BOOTSTRAP", "1")
        .env(
            "CARGO_TARGET_BPFEL_UNKNOWN_NONE_RUSTFLAGS",
            "-C debuginfo=2 -C link-arg=--btf",
        )
        .args(["build", "--package", "lb-ebpf", "--target", TARGET])
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&opts.target_dir);
    if opts.release {
        cmd.arg("--release");
    }
    let command = format!("{cmd:?}");
    let status = cmd.status().map_err(|source| BuildError::Io {
        context: format!("running {}", tc.cargo.display()),
        source,
    })?;
    if !status.success() {
        return Err(BuildError::Failed {
            status: status.to_string(),
            command,
        });
    }
    let object = opts.target_dir.join(TARGET).join(profile).join("lb-ebpf");
    if !object.is_file() {
        return Err(BuildError::Io {
            context: format!("expected object at {}", object.display()),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    Ok(object)
}
