//! Network-namespace guard and child-process guard.
//!
//! [`NetNs`] creates a named namespace with `ip netns add` and deletes it again on drop, also
//! when a test panics half-way. Code runs inside it in three ways:
//!
//! - [`NetNs::enter`] / [`NetNs::spawn_thread`]: a fresh thread that `setns`es into the
//!   namespace (network namespace only) before running a closure. Sockets created there stay in
//!   the namespace and may be used from any thread afterwards.
//! - [`NetNs::command`]: a [`Command`] whose child enters only the network namespace, so it
//!   still sees the host's `/sys/fs/bpf` (unlike `ip netns exec`, which remounts `/sys`).
//! - [`NetNs::exec`] / [`NetNs::ip`]: run a short command and collect its stdout.

use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Directory where `ip netns` keeps its namespace handles.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// How many names [`NetNs::new`] tries before giving up (a name may be left over from a
/// crashed earlier process that had the same pid).
const NAME_ATTEMPTS: u32 = 16;

/// How long [`NetNs::spawn_thread`] waits for the new thread to report that it entered.
const ENTER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`ChildGuard`] waits after SIGTERM before it sends SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// Process-wide counter that makes namespace names unique within this process.
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// Serialises `ip netns add/del`: the first `add` on a machine turns `/run/netns` into a shared
/// bind mount, and two racing processes could stack two such mounts.
static NETNS_LOCK: Mutex<()> = Mutex::new(());

/// A named network namespace, deleted when dropped.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    path: PathBuf,
}

impl NetNs {
    /// Creates a namespace named `{prefix}{pid}n{counter}`, unique within this process and
    /// across processes running at the same time.
    pub fn new(prefix: &str) -> Result<NetNs> {
        let pid = std::process::id();
        for _ in 0..NAME_ATTEMPTS {
            let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            let name = format!("{prefix}{pid}n{n}");
            let path = Path::new(NETNS_RUN_DIR).join(&name);
            if path.exists() {
                continue;
            }
            {
                let _lock = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
                run("ip", &["netns", "add", &name])
                    .with_context(|| format!("creating network namespace {name}"))?;
            }
            let ns = NetNs { name, path };
            ns.ip(&["link", "set", "lo", "up"])
                .with_context(|| format!("bringing up lo in {}", ns.name))?;
            return Ok(ns);
        }
        bail!("no free network namespace name with prefix {prefix:?} after {NAME_ATTEMPTS} tries")
    }

    /// The namespace's name as `ip netns list` shows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace handle, `/run/netns/NAME`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `ip netns exec NAME args...` and returns its stdout.
    ///
    /// Note that `ip netns exec` remounts `/sys` in the child; use [`NetNs::command`] for
    /// programs that need the host's bpffs.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full).with_context(|| format!("in network namespace {}", self.name))
    }

    /// Runs `ip -n NAME args...` (iproute2 enters the namespace itself) and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Sets a sysctl below `/proc/sys` in this namespace, e.g.
    /// `sysctl("net.ipv4.conf.all.rp_filter", "0")`.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let value = value.to_owned();
        self.enter(move || std::fs::write(&path, value.as_bytes()))?
            .with_context(|| format!("setting sysctl {key} in {}", self.name))
    }

    /// Reads a sysctl below `/proc/sys` in this namespace (trailing newline removed).
    pub fn read_sysctl(&self, key: &str) -> Result<String> {
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        let value = self
            .enter(move || std::fs::read_to_string(&path))?
            .with_context(|| format!("reading sysctl {key} in {}", self.name))?;
        Ok(value.trim_end().to_owned())
    }

    /// Runs `f` on a new thread that first enters this network namespace, and waits for it.
    ///
    /// A panic inside `f` is re-raised in the caller, so test assertions work as usual.
    pub fn enter<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file = self.open()?;
        let name = &self.name;
        thread::scope(|scope| {
            let handle = thread::Builder::new()
                .name(format!("netns-{name}"))
                .spawn_scoped(scope, move || -> Result<R> {
                    setns(&file, CloneFlags::CLONE_NEWNET)
                        .with_context(|| format!("setns into network namespace {name}"))?;
                    drop(file);
                    Ok(f())
                })
                .context("spawning namespace thread")?;
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Spawns a named, long-running thread inside this network namespace.
    ///
    /// Returns once the thread has entered the namespace (or with the `setns` error).
    pub fn spawn_thread<F, R>(&self, thread_name: &str, f: F) -> Result<JoinHandle<R>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let file = self.open()?;
        let ns_name = self.name.clone();
        let (tx, rx) = mpsc::sync_channel::<Result<()>>(1);
        let handle = thread::Builder::new()
            .name(thread_name.to_owned())
            .spawn(move || {
                let entered = setns(&file, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("setns into network namespace {ns_name}"));
                drop(file);
                let ok = entered.is_ok();
                // A failed send means the caller gave up waiting and reported an error.
                if tx.send(entered).is_err() || !ok {
                    // Not running `f` outside the namespace; the caller already has the error.
                    // `resume_unwind` skips the panic hook, so this prints nothing.
                    std::panic::resume_unwind(Box::new("namespace thread did not start"));
                }
                f()
            })
            .with_context(|| format!("spawning thread {thread_name}"))?;
        match rx.recv_timeout(ENTER_TIMEOUT) {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            Err(e) => Err(anyhow!(
                "thread {thread_name} did not report entering {}: {e}",
                self.name
            )),
        }
    }

    /// A [`Command`] whose child enters only this network namespace before `exec`.
    ///
    /// Unlike `ip netns exec` this leaves the mount namespace alone, so the child sees the
    /// host's `/sys/fs/bpf` and its pins.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        // A path from `ip netns` never contains NUL; fall back to a path that fails to open.
        let path = CString::new(self.path.as_os_str().as_bytes())
            .unwrap_or_else(|_| c"/nonexistent".to_owned());
        let enter_netns = move || -> std::io::Result<()> {
            // SAFETY: `path` is a valid NUL-terminated string owned by this closure.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `fd` is the namespace handle just opened; setns only reads it.
            let rc = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
            let err = std::io::Error::last_os_error();
            // SAFETY: we own `fd` and close it exactly once.
            unsafe { libc::close(fd) };
            if rc != 0 {
                return Err(err);
            }
            Ok(())
        };
        // SAFETY: the closure only makes async-signal-safe syscalls (open, setns, close) on
        // memory allocated before fork, as `pre_exec` requires.
        unsafe {
            cmd.pre_exec(enter_netns);
        }
        cmd
    }

    fn open(&self) -> Result<File> {
        File::open(&self.path)
            .with_context(|| format!("opening network namespace {}", self.path.display()))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _lock = NETNS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!(
                "lb-testkit: deleting network namespace {}: {e:#}",
                self.name
            );
        }
    }
}

/// Names of all namespaces `ip netns list` shows.
pub fn list_netns() -> Result<Vec<String>> {
    let out = run("ip", &["netns", "list"])?;
    // Lines look like `name` or `name (id: 3)`.
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Runs `program args...`, returning stdout; the error carries the command line and stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout)
        .with_context(|| format!("output of {program} {} is not UTF-8", args.join(" ")))
}

/// A child process that is terminated when dropped: SIGTERM, up to 3 s grace, then SIGKILL.
#[derive(Debug)]
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    /// Takes ownership of a running child.
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard { child: Some(child) }
    }

    /// Spawns `cmd` and guards the child.
    pub fn spawn(cmd: &mut Command) -> Result<ChildGuard> {
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
        Ok(ChildGuard::new(child))
    }

    /// The child's pid.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The guarded child, e.g. to take its stdout.
    pub fn child_mut(&mut self) -> &mut Child {
        // Only `stop`/`into_inner` (which consume self) and `drop` take the child out.
        self.child
            .as_mut()
            .expect("ChildGuard always holds a child until consumed")
    }

    /// Whether the child has exited (and its status), without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child_mut().try_wait().context("polling child")
    }

    /// Sends SIGTERM, waits up to 3 s, then SIGKILL; returns the exit status.
    pub fn stop(mut self) -> Result<ExitStatus> {
        match self.child.take() {
            Some(mut child) => terminate(&mut child),
            None => bail!("child already taken"),
        }
    }

    /// Releases the child without terminating it.
    pub fn into_inner(mut self) -> Child {
        self.child
            .take()
            .expect("ChildGuard always holds a child until consumed")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take()
            && let Err(e) = terminate(&mut child)
        {
            eprintln!("lb-testkit: stopping child {}: {e:#}", child.id());
        }
    }
}

/// SIGTERM, bounded wait, SIGKILL, wait.
fn terminate(child: &mut Child) -> Result<ExitStatus> {
    if let Some(status) = child.try_wait().context("polling child")? {
        return Ok(status);
    }
    let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
    // ESRCH means it exited in between; `wait` below reaps it either way.
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + TERM_GRACE;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().context("polling child")? {
            return Ok(status);
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().context("waiting for killed child")
}
