//! The running BIRD: the configuration file the agent owns, and `birdc configure`.

use std::{
    collections::BTreeMap,
    io::{self, Write as _},
    net::Ipv4Addr,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use super::{
    render::render,
    settings::{BgpSettings, BirdPaths},
};

/// How long one `birdc` call may take. `configure` answers as soon as BIRD has parsed the
/// file and started switching over, so this bounds a hung daemon, not a large config.
pub const BIRDC_TIMEOUT: Duration = Duration::from_secs(10);

/// BIRD's reply codes that mean the new configuration is (being) taken into use:
/// "Reconfigured", "Reconfiguration in progress", and "Reconfiguration already in
/// progress, queueing new config" (it follows when the current one is done).
const CONFIGURE_OK: [&str; 3] = ["0003", "0004", "0005"];

/// What [`Bird::apply`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The text is what BIRD last took successfully: nothing written, BIRD not asked.
    Unchanged,
    /// BIRD took the (new) file.
    Reconfigured,
}

#[derive(Debug, thiserror::Error)]
pub enum BgpError {
    #[error("writing BIRD's configuration {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "BIRD's control socket {} does not exist: is BIRD running (`bird -s {}`)?",
        socket.display(),
        socket.display()
    )]
    NoSocket { socket: PathBuf },
    #[error("running `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` gave no answer within {timeout:?}")]
    Timeout { command: String, timeout: Duration },
    #[error("`{command}` failed: {output}")]
    Rejected { command: String, output: String },
}

/// The agent's handle on the BIRD beside it.
#[derive(Debug)]
pub struct Bird {
    paths: BirdPaths,
    /// The text BIRD last took; `None` at start and after a failure, so the next
    /// [`Bird::apply`] asks BIRD again even for the same text.
    applied: Option<String>,
    timeout: Duration,
}

impl Bird {
    pub fn new(paths: BirdPaths) -> Bird {
        Bird {
            paths,
            applied: None,
            timeout: BIRDC_TIMEOUT,
        }
    }

    /// The same, with another bound on each `birdc` call.
    pub fn with_timeout(mut self, timeout: Duration) -> Bird {
        self.timeout = timeout;
        self
    }

    pub fn paths(&self) -> &BirdPaths {
        &self.paths
    }

    /// Makes `text` BIRD's configuration: unless BIRD already took exactly this text, writes
    /// the file (atomically, and only if its content differs) and runs `birdc configure`.
    ///
    /// The file is written even when BIRD is not running, so a BIRD that starts later reads
    /// it; the error then says so, and the next call asks BIRD again.
    pub async fn apply(&mut self, text: &str) -> Result<Applied, BgpError> {
        if self.applied.as_deref() == Some(text) {
            return Ok(Applied::Unchanged);
        }
        self.applied = None;
        write_if_changed(&self.paths.config, text).await?;
        self.configure().await?;
        tracing::debug!(config = %self.paths.config.display(), "BIRD reconfigured");
        self.applied = Some(text.to_owned());
        Ok(Applied::Reconfigured)
    }

    /// Withdraws every route and keeps the sessions: the configuration with no VIPs, for a
    /// clean stop (the peers move the traffic away before the node stops forwarding).
    pub async fn withdraw_all(
        &mut self,
        s: &BgpSettings,
        router_id: Ipv4Addr,
    ) -> Result<Applied, BgpError> {
        self.apply(&render(s, router_id, &BTreeMap::new())).await
    }

    /// `birdc -v -s SOCKET configure`: Ok when BIRD answers that it takes the file.
    async fn configure(&self) -> Result<(), BgpError> {
        let (command, output) = self.run(&["configure"]).await?;
        let codes: Vec<&str> = output.lines().filter_map(reply_code).collect();
        let failed = codes
            .iter()
            .any(|c| c.starts_with('8') || c.starts_with('9'));
        if !failed && codes.iter().any(|c| CONFIGURE_OK.contains(c)) {
            return Ok(());
        }
        Err(BgpError::Rejected {
            command,
            output: one_line(&output),
        })
    }

    /// Runs `birdc -v -s SOCKET args...` (each line with its reply code), bounded by the
    /// timeout, and returns its output; a non-zero exit (BIRD refused) is an error.
    pub async fn birdc(&self, args: &[&str]) -> Result<String, BgpError> {
        self.run(args).await.map(|(_, output)| output)
    }

    /// [`Bird::birdc`], also returning the command line (stdout, then stderr, as output).
    async fn run(&self, args: &[&str]) -> Result<(String, String), BgpError> {
        let socket = &self.paths.socket;
        let command = format!(
            "{} -v -s {} {}",
            self.paths.birdc.display(),
            socket.display(),
            args.join(" ")
        );
        if !socket_exists(socket).await {
            return Err(BgpError::NoSocket {
                socket: socket.clone(),
            });
        }
        let child = tokio::process::Command::new(&self.paths.birdc)
            .arg("-v")
            .arg("-s")
            .arg(socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| BgpError::Spawn {
                command: command.clone(),
                source,
            })?;
        let out = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Err(_) => {
                return Err(BgpError::Timeout {
                    command,
                    timeout: self.timeout,
                });
            }
            Ok(Err(source)) => return Err(BgpError::Spawn { command, source }),
            Ok(Ok(out)) => out,
        };
        let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
        output.push_str(&String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            return Err(BgpError::Rejected {
                output: format!("{}: {}", out.status, one_line(&output)),
                command,
            });
        }
        Ok((command, output))
    }
}

async fn socket_exists(path: &Path) -> bool {
    tokio::fs::symlink_metadata(path).await.is_ok()
}

/// The reply code of a `birdc -v` line (`0003 Reconfigured`, `0002-Reading ...`).
fn reply_code(line: &str) -> Option<&str> {
    let code = line.get(..4)?;
    let sep = line.as_bytes().get(4).copied();
    (code.bytes().all(|b| b.is_ascii_digit()) && matches!(sep, Some(b' ' | b'-') | None))
        .then_some(code)
}

/// BIRD's answer on one line, for an error message: lines without their reply codes,
/// joined with "; ", the greeting left out.
fn one_line(output: &str) -> String {
    let lines: Vec<&str> = output
        .lines()
        .filter(|l| reply_code(l) != Some("0001"))
        .map(|l| match reply_code(l) {
            Some(_) => l.get(5..).unwrap_or_default().trim(),
            None => l.trim(),
        })
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        "no output".to_owned()
    } else {
        lines.join("; ")
    }
}

/// Writes `text` to `path` through a temporary file renamed over it, unless the file holds
/// it already. Mode 0600: the file may hold TCP-MD5 keys (BIRD runs as the same user).
async fn write_if_changed(path: &Path, text: &str) -> Result<(), BgpError> {
    let (owned_path, text) = (path.to_path_buf(), text.to_owned());
    let written = tokio::task::spawn_blocking(move || write_file(&owned_path, &text))
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
    written.map_err(|source| BgpError::Write {
        path: path.to_path_buf(),
        source,
    })
}

fn write_file(path: &Path, text: &str) -> io::Result<()> {
    match std::fs::read(path) {
        Ok(old) if old == text.as_bytes() => return Ok(()),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        // A leftover of an interrupted write would keep its old mode.
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};

    use super::*;

    /// A directory with a stand-in `birdc` (a shell script) that records its arguments
    /// and answers what the test put into `reply` with exit status `rc`.
    struct Fake {
        dir: PathBuf,
    }

    impl Fake {
        fn new(name: &str) -> Fake {
            let dir = std::env::temp_dir().join(format!("lb-bgp-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let script = dir.join("birdc");
            std::fs::write(
                &script,
                "#!/bin/sh\nd=$(dirname \"$0\")\necho \"$@\" >> \"$d/calls\"\n\
                 [ -f \"$d/sleep\" ] && exec sleep \"$(cat \"$d/sleep\")\"\n\
                 cat \"$d/reply\"\nexit \"$(cat \"$d/rc\")\"\n",
            )
            .unwrap();
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
            let fake = Fake { dir };
            fake.answer(
                "0001 BIRD 2.0.12 ready.\n0002-Reading configuration from x\n0003 Reconfigured\n",
                0,
            );
            fake
        }

        fn paths(&self) -> BirdPaths {
            BirdPaths {
                config: self.dir.join("etc/bird.conf"),
                socket: self.dir.join("bird.ctl"),
                birdc: self.dir.join("birdc"),
            }
        }

        fn answer(&self, reply: &str, rc: i32) {
            std::fs::write(self.dir.join("reply"), reply).unwrap();
            std::fs::write(self.dir.join("rc"), rc.to_string()).unwrap();
        }

        fn socket_up(&self) {
            std::fs::write(self.dir.join("bird.ctl"), "").unwrap();
        }

        fn calls(&self) -> Vec<String> {
            std::fs::read_to_string(self.dir.join("calls"))
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect()
        }

        fn config(&self) -> String {
            std::fs::read_to_string(self.paths().config).unwrap()
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[tokio::test]
    async fn writes_then_reconfigures_only_on_change() {
        let fake = Fake::new("apply");
        let paths = fake.paths();
        let mut bird = Bird::new(paths.clone());

        // BIRD not running: the file is written anyway, and the error says why.
        let e = bird.apply("one\n").await.unwrap_err();
        assert!(matches!(e, BgpError::NoSocket { .. }), "{e}");
        assert!(e.to_string().contains("bird.ctl does not exist"), "{e}");
        assert_eq!(fake.config(), "one\n");
        let meta = std::fs::metadata(&paths.config).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert!(fake.calls().is_empty());

        // Running: the same text is not rewritten, but BIRD is asked (the last try failed).
        fake.socket_up();
        let inode = meta.ino();
        assert_eq!(bird.apply("one\n").await.unwrap(), Applied::Reconfigured);
        assert_eq!(std::fs::metadata(&paths.config).unwrap().ino(), inode);
        let socket = paths.socket.display().to_string();
        assert_eq!(fake.calls(), [format!("-v -s {socket} configure")]);

        // Unchanged: neither written nor asked.
        assert_eq!(bird.apply("one\n").await.unwrap(), Applied::Unchanged);
        assert_eq!(fake.calls().len(), 1);

        // Changed and refused: the error carries BIRD's words; the same text is retried.
        fake.answer(
            "0001 BIRD 2.0.12 ready.\n0002-Reading configuration from x\n\
             8002 x:1:1 syntax error, unexpected CF_SYM_UNDEFINED\n",
            1,
        );
        let e = bird.apply("two\n").await.unwrap_err();
        assert!(matches!(e, BgpError::Rejected { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("syntax error, unexpected CF_SYM_UNDEFINED"),
            "{msg}"
        );
        assert!(
            msg.contains("configure` failed: exit status: 1: Reading configuration"),
            "{msg}"
        );
        assert!(!msg.contains("8002"), "reply codes left out: {msg}");
        assert!(!msg.contains("ready"), "greeting left out: {msg}");
        assert_eq!(fake.config(), "two\n");
        fake.answer(
            "0001 BIRD 2.0.12 ready.\n0004 Reconfiguration in progress\n",
            0,
        );
        assert_eq!(bird.apply("two\n").await.unwrap(), Applied::Reconfigured);
        assert_eq!(fake.calls().len(), 3);
        assert!(!paths.config.with_extension("conf.tmp").exists());
    }

    #[tokio::test]
    async fn answers_that_are_not_success() {
        let fake = Fake::new("answers");
        fake.socket_up();
        for (reply, rc, ok) in [
            ("0001 BIRD ready.\n0003 Reconfigured\n", 0, true),
            (
                "0001 BIRD ready.\n0004 Reconfiguration in progress\n",
                0,
                true,
            ),
            (
                "0001 BIRD ready.\n0005 Reconfiguration already in progress, queueing new config\n",
                0,
                true,
            ),
            (
                "0001 BIRD ready.\n0006 Reconfiguration ignored, shutting down\n",
                0,
                false,
            ),
            (
                "0001 BIRD ready.\n0002-Reading configuration from x\n8002 x: bad\n",
                0,
                false,
            ),
            ("0001 BIRD ready.\n9001 Parse error\n", 0, false),
            ("0001 BIRD ready.\n0003 Reconfigured\n", 1, false),
            ("", 0, false),
        ] {
            fake.answer(reply, rc);
            // A fresh handle: nothing applied yet, so it asks every time.
            let got = Bird::new(fake.paths()).apply("x\n").await;
            assert_eq!(got.is_ok(), ok, "{reply:?} rc {rc}: {got:?}");
        }
    }

    #[tokio::test]
    async fn bounded_and_missing_birdc() {
        let fake = Fake::new("bounded");
        fake.socket_up();
        std::fs::write(fake.dir.join("sleep"), "5").unwrap();
        let mut bird = Bird::new(fake.paths()).with_timeout(Duration::from_millis(200));
        let started = std::time::Instant::now();
        let e = bird.apply("x\n").await.unwrap_err();
        assert!(matches!(e, BgpError::Timeout { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(3));

        let mut paths = fake.paths();
        paths.birdc = fake.dir.join("no-such-birdc");
        let e = Bird::new(paths).apply("x\n").await.unwrap_err();
        assert!(matches!(e, BgpError::Spawn { .. }), "{e}");
        assert!(e.to_string().contains("no-such-birdc"), "{e}");
    }

    #[tokio::test]
    async fn withdraw_all_renders_no_routes() {
        let fake = Fake::new("withdraw");
        fake.socket_up();
        let s = super::super::settings(
            &serde_yaml_ng::from_str(
                "local_asn: 64512\npeers: [{address: 198.18.2.254, asn: 64500}]\n",
            )
            .unwrap(),
        )
        .unwrap();
        let mut bird = Bird::new(fake.paths());
        let id = Ipv4Addr::new(198, 18, 2, 1);
        assert_eq!(
            bird.withdraw_all(&s, id).await.unwrap(),
            Applied::Reconfigured
        );
        assert_eq!(fake.config(), render(&s, id, &BTreeMap::new()));
        assert!(!fake.config().contains("  route "));
        assert_eq!(bird.withdraw_all(&s, id).await.unwrap(), Applied::Unchanged);
    }

    #[test]
    fn reply_codes() {
        assert_eq!(reply_code("0003 Reconfigured"), Some("0003"));
        assert_eq!(reply_code("0002-Reading configuration"), Some("0002"));
        assert_eq!(reply_code("1002"), Some("1002"));
        assert_eq!(reply_code(" continuation"), None);
        assert_eq!(reply_code("BIRD 2.0.12 ready."), None);
        assert_eq!(reply_code("12345 x"), None);
    }
}
