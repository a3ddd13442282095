//! `cargo xtask image`: the lb-agent container image, built without a container registry.
//!
//! `deploy/Containerfile` starts `FROM docker.io/library/debian:bookworm-slim`, which needs a
//! registry. This task builds the same image from a Debian mirror instead: a `debootstrap
//! --variant=minbase` bookworm with bird2 (the DaemonSet's BGP sidecar runs `bird` from this
//! image), trimmed like Debian's slim images, plus the release agent at
//! `/usr/local/bin/lb-agent`, with the Containerfile's entrypoint and cmd. buildah commits it
//! from scratch as `lb-agent:<version>` in the local containers storage and writes an OCI
//! archive that `ctr -n k8s.io images import` loads on a node (deploy/IMAGE.md).

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use lb_ebpf_build::workspace_root;

use crate::util::{require_root, sh};

/// The image's name; the version is the workspace's (the agent's).
const NAME: &str = "lb-agent";
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The Containerfile's base: Debian 12.
const SUITE: &str = "bookworm";
const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// On top of minbase: BIRD 2 for the DaemonSet's `bird` container.
const INCLUDE: &[&str] = &["bird2"];
/// As in deploy/Containerfile.
const AGENT_PATH: &str = "/usr/local/bin/lb-agent";
const CMD: &[&str] = &["--help"];
/// Debian images' PATH (a `FROM scratch` image has none; the sidecar's shell finds `bird`).
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";

#[derive(clap::Args)]
pub struct Options {
    /// The OCI archive to write [default: <target dir>/image/lb-agent-<version>.oci.tar].
    #[arg(long)]
    output: Option<PathBuf>,
    /// Package the lb-agent already built (<target dir>/release/lb-agent) instead of running
    /// `cargo build --release --locked -p lb-agent`.
    #[arg(long)]
    skip_build: bool,
    /// Debian mirror for debootstrap. A snapshot.debian.org URL pins every package version.
    #[arg(long, default_value = DEFAULT_MIRROR)]
    mirror: String,
}

/// `lb-agent:0.1.0`: what deploy/daemonset.yaml runs. buildah stores it as
/// `localhost/lb-agent:0.1.0`.
fn local_tag() -> String {
    format!("{NAME}:{VERSION}")
}

/// The name inside the OCI archive (`org.opencontainers.image.ref.name`): the fully
/// qualified form of `lb-agent:0.1.0`, which is the name a node's containerd (and so the
/// kubelet) resolves the DaemonSet's `image: lb-agent:0.1.0` to.
fn archive_ref() -> String {
    format!("docker.io/library/{NAME}:{VERSION}")
}

/// The cargo target directory: `CARGO_TARGET_DIR` if set, else `<workspace>/target`.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                std::env::current_dir().unwrap_or_default().join(dir)
            }
        }
        _ => workspace_root().join("target"),
    }
}

/// `SOURCE_DATE_EPOCH`, or 0: the image's creation time and every file's mtime.
fn source_date_epoch(value: Option<&OsStr>) -> anyhow::Result<i64> {
    match value {
        None => Ok(0),
        Some(v) => v
            .to_str()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .filter(|&t| t >= 0)
            .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds")),
    }
}

fn debootstrap_args(rootfs: &Path, cache: &Path, mirror: &str) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--variant=minbase".into(),
        format!("--include={}", INCLUDE.join(",")).into(),
        format!("--keyring={KEYRING}").into(),
    ];
    let mut cache_arg = OsString::from("--cache-dir=");
    cache_arg.push(cache);
    args.push(cache_arg);
    args.extend([SUITE.into(), rootfs.into(), mirror.into()]);
    args
}

fn config_args(container: &str) -> Vec<String> {
    let json = |items: &[&str]| {
        let quoted: Vec<String> = items.iter().map(|s| format!("{s:?}")).collect();
        format!("[{}]", quoted.join(","))
    };
    vec![
        "config".into(),
        "--entrypoint".into(),
        json(&[AGENT_PATH]),
        "--cmd".into(),
        json(CMD),
        "--env".into(),
        PATH_ENV.into(),
        "--label".into(),
        format!("org.opencontainers.image.title={NAME}"),
        "--label".into(),
        format!("org.opencontainers.image.version={VERSION}"),
        "--label".into(),
        "org.opencontainers.image.description=XDP load balancer agent (and BIRD 2 for its BGP sidecar)".into(),
        container.into(),
    ]
}

fn commit_args(container: &str, epoch: i64) -> Vec<String> {
    vec![
        "commit".into(),
        "--quiet".into(),
        "--format".into(),
        "oci".into(),
        // Creation time and file mtimes fixed; no buildah-version label.
        "--timestamp".into(),
        epoch.to_string(),
        "--identity-label=false".into(),
        "--rm".into(),
        container.into(),
        local_tag(),
    ]
}

/// `buildah push` into an OCI layout directory (the archive is tarred from it, with fixed
/// mtimes: `oci-archive:` stamps the tar entries with the current time).
fn push_args(layout: &Path, digest_file: &Path) -> anyhow::Result<Vec<OsString>> {
    // oci:PATH:REF splits at the first colon after PATH.
    if layout.to_string_lossy().contains(':') {
        bail!(
            "{} contains ':', which buildah's oci: transport cannot take",
            layout.display()
        );
    }
    let mut dest = OsString::from("oci:");
    dest.push(layout);
    dest.push(format!(":{}", archive_ref()));
    let mut digest = OsString::from("--digestfile=");
    digest.push(digest_file);
    Ok(vec![
        "push".into(),
        "--quiet".into(),
        "--format=oci".into(),
        digest,
        local_tag().into(),
        dest,
    ])
}

/// The OCI layout as an archive (the `oci-archive:` layout: `blobs/`, `index.json`,
/// `oci-layout` at the top), byte for byte the same for the same image.
fn tar_args(layout: &Path, output: &Path, epoch: i64) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["--create".into(), "--file".into(), output.into()];
    args.extend(["--directory".into(), layout.into()]);
    args.extend(
        [
            "--force-local",
            "--format=gnu",
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mode=go-w",
        ]
        .map(OsString::from),
    );
    args.push(format!("--mtime=@{epoch}").into());
    args.extend(["blobs", "index.json", "oci-layout"].map(OsString::from));
    args
}

/// `/etc/shadow` with every "date of last password change" set to `days` (debootstrap and
/// adduser write today's date there).
fn fix_shadow(text: &str, days: i64) -> String {
    let days = days.to_string();
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let mut fields: Vec<&str> = line.split(':').collect();
        if fields.len() > 2 && !fields[2].is_empty() {
            fields[2] = &days;
            out.push_str(&fields.join(":"));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// buildah and debootstrap, installed with apt if missing.
fn ensure_tools() -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for (program, package) in [("buildah", "buildah"), ("debootstrap", "debootstrap")] {
        if !crate::util::on_path(program) {
            missing.push(package);
        }
    }
    if !Path::new(KEYRING).is_file() {
        missing.push("debian-archive-keyring");
    }
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("image: installing apt packages: {}", missing.join(" "));
    let installed = sh_stderr(Command::new("apt-get").arg("update").arg("-q")).and_then(|()| {
        sh_stderr(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing),
        )
    });
    if let Err(e) = installed {
        bail!(
            "cargo xtask image needs {} (Debian packages: {}); installing them failed: {e:#}",
            missing.join(" and "),
            missing.join(" "),
        );
    }
    Ok(())
}

/// `cargo build --release --locked -p lb-agent`, without the `CARGO_PKG_*`/`CARGO_MANIFEST_*`
/// variables `cargo run` gave this process (ring's build script reruns on them).
fn build_agent() -> anyhow::Result<()> {
    let mut cmd = crate::util::nested_cargo();
    crate::setup::ensure()?;
    sh_stderr(cmd.current_dir(workspace_root()).args([
        "build",
        "--release",
        "--locked",
        "-p",
        "lb-agent",
    ]))
}

/// [`sh`] with the command's stdout sent to stderr: this task's stdout is only the archive's
/// path and digest.
fn sh_stderr(cmd: &mut Command) -> anyhow::Result<()> {
    use std::os::fd::AsFd;
    let stderr = std::io::stderr().as_fd().try_clone_to_owned()?;
    sh(cmd.stdout(stderr))
}

fn output_of(cmd: &mut Command) -> anyhow::Result<String> {
    let shown = format!("{cmd:?}");
    eprintln!("+ {shown}");
    let out = cmd
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("starting {shown}"))?;
    if !out.status.success() {
        bail!("{shown} failed: {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The ID of the image `name` names in containers storage, if any.
fn image_id(name: &str) -> Option<String> {
    let out = Command::new("buildah")
        .args([
            "inspect",
            "--type",
            "image",
            "--format",
            "{{.FromImageID}}",
            name,
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !id.is_empty()).then_some(id)
}

/// A buildah working container, removed (after unmounting whatever debootstrap left mounted
/// in it) unless committed.
struct WorkingContainer {
    id: String,
    mountpoint: Option<PathBuf>,
}

impl WorkingContainer {
    fn new() -> anyhow::Result<Self> {
        let id = output_of(Command::new("buildah").args(["from", "--quiet", "scratch"]))?;
        Ok(WorkingContainer {
            id,
            mountpoint: None,
        })
    }

    fn mount(&mut self) -> anyhow::Result<PathBuf> {
        let dir = PathBuf::from(output_of(
            Command::new("buildah").args(["mount", &self.id]),
        )?);
        self.mountpoint = Some(dir.clone());
        Ok(dir)
    }

    fn unmount(&mut self) -> anyhow::Result<()> {
        if let Some(dir) = self.mountpoint.take() {
            unmount_below(&dir);
            sh_stderr(Command::new("buildah").args(["umount", &self.id]))?;
        }
        Ok(())
    }

    /// Commit and consume the container (`--rm`); returns the image ID.
    fn commit(mut self, epoch: i64) -> anyhow::Result<String> {
        self.unmount()?;
        sh_stderr(Command::new("buildah").args(config_args(&self.id)))?;
        let id = output_of(Command::new("buildah").args(commit_args(&self.id, epoch)))?;
        self.id.clear();
        Ok(id)
    }
}

impl Drop for WorkingContainer {
    fn drop(&mut self) {
        if self.id.is_empty() {
            return;
        }
        let _ = self.unmount();
        let _ = Command::new("buildah")
            .args(["rm", &self.id])
            .stdout(std::process::Stdio::null())
            .status();
    }
}

/// Lazily unmount every mount below `dir` (proc, sys, dev/pts of an interrupted debootstrap),
/// deepest first.
fn unmount_below(dir: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let mut below: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(PathBuf::from)
        .filter(|m| m != dir && m.starts_with(dir))
        .collect();
    below.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in below {
        let _ = Command::new("umount").arg("--lazy").arg(&m).status();
    }
}

fn remove(path: &Path) -> anyhow::Result<()> {
    let result = if path.is_dir() && !path.is_symlink() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Remove what `keep` does not accept from directory `dir`.
fn remove_children(dir: &Path, keep: impl Fn(&Path) -> bool) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries {
        let path = entry?.path();
        if !keep(&path) {
            remove(&path)?;
        }
    }
    Ok(())
}

/// Trim the debootstrapped tree to what a runtime image needs, the way Debian's slim images
/// and debuerreotype do, and drop what records the build host or the build day.
fn trim(root: &Path, epoch: i64) -> anyhow::Result<()> {
    // Documentation, except the copyright files.
    let doc = root.join("usr/share/doc");
    if let Ok(entries) = std::fs::read_dir(&doc) {
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() && !path.is_symlink() {
                remove_children(&path, |p| p.file_name() == Some(OsStr::new("copyright")))?;
            } else {
                remove(&path)?;
            }
        }
    }
    for dir in [
        "usr/share/man",
        "usr/share/info",
        "usr/share/lintian",
        "usr/share/linda",
    ] {
        remove_children(&root.join(dir), |_| false)?;
    }
    remove_children(&root.join("usr/share/locale"), |p| {
        p.file_name() == Some(OsStr::new("locale.alias"))
    })?;
    // Package indexes, downloaded packages, logs, caches, backups.
    remove_children(&root.join("var/lib/apt/lists"), |p| {
        p.file_name() == Some(OsStr::new("partial"))
    })?;
    remove_children(&root.join("var/cache/apt/archives"), |p| {
        p.file_name() == Some(OsStr::new("partial"))
    })?;
    remove_children(&root.join("var/cache/apt"), |p| {
        p.extension() != Some(OsStr::new("bin"))
    })?;
    remove_children(&root.join("var/log"), |p| p.is_dir())?;
    remove_children(&root.join("var/log/apt"), |_| false)?;
    remove(&root.join("var/cache/ldconfig/aux-cache"))?;
    for dir in ["var/lib/dpkg", "var/cache/debconf", "etc"] {
        remove_children(&root.join(dir), |p| {
            !p.to_string_lossy().ends_with('-') && !p.to_string_lossy().ends_with("-old")
        })?;
    }
    // The runtime provides /dev (debootstrap made device nodes) and mounts hostname and
    // resolv.conf (debootstrap copies the build host's): keep those as empty mount points.
    remove_children(&root.join("dev"), |_| false)?;
    remove_children(&root.join("tmp"), |_| false)?;
    remove(&root.join("run/mount/utab"))?;
    remove(&root.join("run/adduser"))?;
    for file in ["etc/hostname", "etc/resolv.conf"] {
        let path = root.join(file);
        remove(&path)?;
        std::fs::write(&path, "").with_context(|| format!("writing {}", path.display()))?;
    }
    let machine_id = root.join("etc/machine-id");
    if machine_id.is_file() {
        std::fs::write(&machine_id, "")
            .with_context(|| format!("writing {}", machine_id.display()))?;
    }
    let shadow = root.join("etc/shadow");
    let text = std::fs::read_to_string(&shadow)
        .with_context(|| format!("reading {}", shadow.display()))?;
    std::fs::write(&shadow, fix_shadow(&text, epoch / 86_400))
        .with_context(|| format!("writing {}", shadow.display()))?;
    Ok(())
}

fn install_agent(binary: &Path, root: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dest = root.join(AGENT_PATH.trim_start_matches('/'));
    std::fs::create_dir_all(dest.parent().expect("AGENT_PATH has a parent"))?;
    std::fs::copy(binary, &dest)
        .with_context(|| format!("copying {} to {}", binary.display(), dest.display()))?;
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Run both programs inside the tree before committing: every shared library resolves.
fn smoke_test(root: &Path) -> anyhow::Result<()> {
    for argv in [
        &[AGENT_PATH, "--version"][..],
        &["/usr/sbin/bird", "--version"],
    ] {
        sh_stderr(
            Command::new("chroot")
                .arg(root)
                .args(argv)
                .env_clear()
                .env("PATH", PATH_ENV.trim_start_matches("PATH=")),
        )
        .with_context(|| format!("{} does not run in the image", argv[0]))?;
    }
    Ok(())
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    require_root("cargo xtask image")?;
    ensure_tools()?;
    let target = target_dir();
    let work = target.join("image");
    let output = opts
        .output
        .clone()
        .unwrap_or_else(|| work.join(format!("{NAME}-{VERSION}.oci.tar")));
    let output = if output.is_absolute() {
        output
    } else {
        std::env::current_dir()?.join(output)
    };
    let digest_file = work.join(format!("{NAME}-{VERSION}.digest"));
    let layout = work.join("oci");
    // Checked before the slow part.
    let push = push_args(&layout, &digest_file)?;
    let epoch = source_date_epoch(std::env::var_os("SOURCE_DATE_EPOCH").as_deref())?;

    if !opts.skip_build {
        eprintln!("image: building lb-agent (release)");
        build_agent()?;
    }
    let binary = target.join("release/lb-agent");
    if !binary.is_file() {
        bail!(
            "{} does not exist: run without --skip-build",
            binary.display()
        );
    }

    let cache = work.join("debs");
    std::fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let mut container = WorkingContainer::new()?;
    let root = container.mount()?;
    eprintln!(
        "image: debootstrap {SUITE} (minbase + {}) from {}",
        INCLUDE.join(" "),
        opts.mirror
    );
    sh_stderr(Command::new("debootstrap").args(debootstrap_args(&root, &cache, &opts.mirror)))
        .context("debootstrap (is the Debian mirror reachable? see --mirror)")?;
    unmount_below(&root);
    trim(&root, epoch)?;
    install_agent(&binary, &root)?;
    smoke_test(&root)?;
    let previous = image_id(&local_tag());
    let image_id = container.commit(epoch)?;
    // The tag moved: drop the image it named before, unless a container still uses it.
    if let Some(old) = previous.filter(|old| *old != image_id) {
        let _ = Command::new("buildah")
            .args(["rmi", &old])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }

    if let Some(dir) = output.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    remove(&layout)?;
    remove(&output)?;
    sh_stderr(Command::new("buildah").args(&push))?;
    sh_stderr(Command::new("tar").args(tar_args(&layout, &output, epoch)))?;
    remove(&layout)?;
    let digest = std::fs::read_to_string(&digest_file)
        .with_context(|| format!("reading {}", digest_file.display()))?;
    let size = std::fs::metadata(&output)
        .with_context(|| format!("reading {}", output.display()))?
        .len();
    eprintln!(
        "image: localhost/{} (image ID {image_id}) in containers storage",
        local_tag()
    );
    eprintln!(
        "image: OCI archive, {:.1} MiB, manifest {}, named {}",
        size as f64 / (1024.0 * 1024.0),
        digest.trim(),
        archive_ref()
    );
    println!("{}", output.display());
    println!("{}", digest.trim());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_defaults_to_zero_and_rejects_garbage() {
        assert_eq!(source_date_epoch(None).unwrap(), 0);
        assert_eq!(
            source_date_epoch(Some(OsStr::new("1700000000"))).unwrap(),
            1_700_000_000
        );
        assert!(source_date_epoch(Some(OsStr::new("yesterday"))).is_err());
        assert!(source_date_epoch(Some(OsStr::new("-1"))).is_err());
    }

    #[test]
    fn debootstrap_minbase_with_bird() {
        let args = debootstrap_args(Path::new("/m"), Path::new("/c"), DEFAULT_MIRROR);
        let args: Vec<&str> = args.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            args,
            [
                "--variant=minbase",
                "--include=bird2",
                "--keyring=/usr/share/keyrings/debian-archive-keyring.gpg",
                "--cache-dir=/c",
                "bookworm",
                "/m",
                "http://deb.debian.org/debian",
            ]
        );
    }

    #[test]
    fn config_matches_containerfile() {
        let args = config_args("ctr");
        let containerfile =
            std::fs::read_to_string(workspace_root().join("deploy/Containerfile")).unwrap();
        let value = |flag: &str| {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1].clone()
        };
        assert!(containerfile.contains(&format!("ENTRYPOINT {}", value("--entrypoint"))));
        assert!(containerfile.contains(&format!("CMD {}", value("--cmd"))));
        assert!(containerfile.contains(&format!(
            "COPY --from=build /src/target/release/lb-agent {AGENT_PATH}"
        )));
        assert_eq!(args.last().unwrap(), "ctr");
    }

    #[test]
    fn tag_is_the_daemonsets_image() {
        let daemonset =
            std::fs::read_to_string(workspace_root().join("deploy/daemonset.yaml")).unwrap();
        assert!(daemonset.contains(&format!("image: {}\n", local_tag())));
        assert_eq!(archive_ref(), format!("docker.io/library/{}", local_tag()));
    }

    #[test]
    fn commit_is_reproducible() {
        let args = commit_args("ctr", 0);
        assert!(args.windows(2).any(|w| w == ["--timestamp", "0"]));
        assert!(args.contains(&"--identity-label=false".to_string()));
        assert_eq!(&args[args.len() - 2..], ["ctr", "lb-agent:0.1.0"]);
    }

    #[test]
    fn push_names_the_archive_and_rejects_colons() {
        let args = push_args(Path::new("/t/oci"), Path::new("/t/d")).unwrap();
        assert_eq!(
            args.last().unwrap(),
            "oci:/t/oci:docker.io/library/lb-agent:0.1.0"
        );
        assert!(push_args(Path::new("/t/a:b"), Path::new("/t/d")).is_err());
        let tar = tar_args(Path::new("/t/oci"), Path::new("/t/a.tar"), 7);
        assert!(tar.contains(&OsString::from("--mtime=@7")));
        assert_eq!(&tar[..3], ["--create", "--file", "/t/a.tar"]);
    }

    #[test]
    fn shadow_dates_are_fixed() {
        let text = "root:*:20425:0:99999:7:::\nbird:!:20425::::::\nodd:x\n";
        assert_eq!(
            fix_shadow(text, 0),
            "root:*:0:0:99999:7:::\nbird:!:0::::::\nodd:x\n"
        );
    }
}
