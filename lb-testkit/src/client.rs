//! Traffic generators that talk to [`crate::echo`] servers and summarise where flows landed.
//!
//! Each flow uses its own socket (so its own source port). Flows run in batches of
//! [`BATCH`] at once, so many flows cost a few timeouts at most, not one per flow. Every call
//! is bounded: at most `ceil(flows / BATCH)` times the per-flow timeout.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::netns::NetNs;

/// Flows in flight at once.
pub const BATCH: usize = 50;
/// Most flows one call may ask for (keeps every call bounded).
pub const MAX_FLOWS: usize = 20_000;
/// How long the UDP receive loop sleeps when nothing is pending.
const UDP_IDLE: Duration = Duration::from_millis(1);
/// Binds tried per flow to find a source port not used earlier in the same call.
const PORT_ATTEMPTS: usize = 64;

/// The outcome of one flow. All `Option`s are `None` when no reply came in time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The client socket's source port.
    pub local_port: u16,
    /// The `backend=` field of the reply.
    pub backend: Option<String>,
    /// The `client=` field: the source address the backend saw.
    pub seen_client: Option<SocketAddr>,
    /// Where the reply came from (UDP: datagram source; TCP: connected peer).
    pub reply_from: Option<SocketAddr>,
}

impl Reply {
    fn timeout(local_port: u16) -> Reply {
        Reply {
            local_port,
            backend: None,
            seen_client: None,
            reply_from: None,
        }
    }

    /// Whether a reply arrived.
    pub fn answered(&self) -> bool {
        self.backend.is_some()
    }
}

/// Parses `backend=<name> client=<addr>` into its two fields.
pub fn parse_reply(text: &str) -> (Option<String>, Option<SocketAddr>) {
    let mut backend = None;
    let mut client = None;
    for field in text.split_whitespace() {
        if let Some(v) = field.strip_prefix("backend=") {
            backend = Some(v.to_owned());
        } else if let Some(v) = field.strip_prefix("client=") {
            client = v.parse().ok();
        }
    }
    (backend, client)
}

fn unspecified_for(target: SocketAddr, port: u16) -> SocketAddr {
    match target {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
    }
}

/// Sends one UDP request per flow from `ns` to `vip`, each from its own socket (bound to
/// port 0), and collects the replies in flow order.
pub fn udp_flows(
    ns: &NetNs,
    vip: SocketAddr,
    flows: usize,
    timeout: Duration,
) -> Result<Vec<Reply>> {
    ensure!(flows <= MAX_FLOWS, "at most {MAX_FLOWS} flows, not {flows}");
    ns.enter(move || -> Result<Vec<Reply>> {
        let mut replies = Vec::with_capacity(flows);
        let mut used_ports = HashSet::new();
        let mut start = 0;
        while start < flows {
            let n = BATCH.min(flows - start);
            let mut socks = Vec::with_capacity(n);
            while socks.len() < n {
                let sock = bind_fresh_port(vip, &mut used_ports)?;
                socks.push(sock);
            }
            replies.extend(udp_batch(&socks, vip, start, timeout)?);
            start += n;
        }
        Ok(replies)
    })?
    .with_context(|| format!("UDP flows from {} to {vip}", ns.name()))
}

/// Binds a UDP socket to an ephemeral port not in `used` (so every flow of one call is a
/// distinct 5-tuple, also across batches), and records the port.
fn bind_fresh_port(vip: SocketAddr, used: &mut HashSet<u16>) -> Result<UdpSocket> {
    for _ in 0..PORT_ATTEMPTS {
        let sock = UdpSocket::bind(unspecified_for(vip, 0)).context("binding UDP client socket")?;
        let port = sock.local_addr().context("UDP local address")?.port();
        if used.insert(port) {
            return Ok(sock);
        }
    }
    bail!("no unused ephemeral UDP port after {PORT_ATTEMPTS} tries")
}

/// Sends one UDP request from source port `local_port` (e.g. to re-check a flow seen earlier).
pub fn udp_flow_from_port(
    ns: &NetNs,
    vip: SocketAddr,
    local_port: u16,
    timeout: Duration,
) -> Result<Reply> {
    ns.enter(move || -> Result<Reply> {
        let sock = UdpSocket::bind(unspecified_for(vip, local_port))
            .with_context(|| format!("binding UDP port {local_port}"))?;
        let mut replies = udp_batch(&[sock], vip, 0, timeout)?;
        Ok(replies.remove(0))
    })?
    .with_context(|| format!("UDP flow from {}:{local_port} to {vip}", ns.name()))
}

/// Sends `request` from `src` (a port of 0: any) to `vip` in one datagram and waits up to
/// `timeout` for one reply: its bytes and where it came from (`None`: no reply).
pub fn udp_exchange(
    ns: &NetNs,
    src: SocketAddr,
    vip: SocketAddr,
    request: &[u8],
    timeout: Duration,
) -> Result<Option<(Vec<u8>, SocketAddr)>> {
    let request = request.to_vec();
    ns.enter(move || -> Result<Option<(Vec<u8>, SocketAddr)>> {
        let sock = UdpSocket::bind(src).with_context(|| format!("binding UDP {src}"))?;
        sock.set_read_timeout(Some(timeout))
            .context("setting UDP read timeout")?;
        sock.send_to(&request, vip)
            .with_context(|| format!("sending {} bytes to {vip}", request.len()))?;
        let mut buf = vec![0u8; crate::echo::MAX_DATAGRAM];
        match sock.recv_from(&mut buf) {
            Ok((len, from)) => {
                buf.truncate(len);
                Ok(Some((buf, from)))
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(None),
            // ICMP errors (e.g. port unreachable) surface here; no reply.
            Err(_) => Ok(None),
        }
    })?
    .with_context(|| format!("UDP exchange from {}:{src} to {vip}", ns.name()))
}

/// Sends one request on every socket, then polls them all until each has a reply or
/// `timeout` passes. Replies from wrong sources are still recorded (tests check `reply_from`).
fn udp_batch(
    socks: &[UdpSocket],
    vip: SocketAddr,
    first_flow: usize,
    timeout: Duration,
) -> Result<Vec<Reply>> {
    let mut replies = Vec::with_capacity(socks.len());
    for (i, sock) in socks.iter().enumerate() {
        sock.set_nonblocking(true)
            .context("making UDP socket non-blocking")?;
        let port = sock.local_addr().context("UDP local address")?.port();
        replies.push(Reply::timeout(port));
        let request = format!("flow {}\n", first_flow + i);
        sock.send_to(request.as_bytes(), vip)
            .with_context(|| format!("sending UDP request to {vip}"))?;
    }
    let deadline = Instant::now() + timeout;
    let mut pending = socks.len();
    let mut buf = [0u8; 2048];
    while pending > 0 && Instant::now() < deadline {
        let mut progressed = false;
        for (sock, reply) in socks.iter().zip(replies.iter_mut()) {
            if reply.reply_from.is_some() {
                continue;
            }
            match sock.recv_from(&mut buf) {
                Ok((len, from)) => {
                    let (backend, seen) = parse_reply(&String::from_utf8_lossy(&buf[..len]));
                    reply.backend = backend;
                    reply.seen_client = seen;
                    reply.reply_from = Some(from);
                    pending -= 1;
                    progressed = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                // ICMP errors (e.g. port unreachable) surface here; treat as no reply.
                Err(_) => {}
            }
        }
        if !progressed {
            thread::sleep(UDP_IDLE);
        }
    }
    Ok(replies)
}

/// Opens `count` TCP connections from `ns` to `vip` (up to [`BATCH`] at once), sends one line
/// on each and reads the reply.
pub fn tcp_connections(
    ns: &NetNs,
    vip: SocketAddr,
    count: usize,
    timeout: Duration,
) -> Result<Vec<Reply>> {
    ensure!(
        count <= MAX_FLOWS,
        "at most {MAX_FLOWS} connections, not {count}"
    );
    ns.enter(move || -> Vec<Reply> {
        let mut replies = Vec::with_capacity(count);
        let mut start = 0;
        while start < count {
            let n = BATCH.min(count - start);
            // Threads spawned from a thread inside the namespace start inside it too.
            thread::scope(|scope| {
                let handles: Vec<_> = (start..start + n)
                    .map(|i| scope.spawn(move || tcp_one(vip, i, timeout)))
                    .collect();
                for h in handles {
                    replies.push(h.join().unwrap_or_else(|_| Reply::timeout(0)));
                }
            });
            start += n;
        }
        replies
    })
    .with_context(|| format!("TCP connections from {} to {vip}", ns.name()))
}

/// One TCP exchange; any failure is a timeout-like `Reply` (with the port if we had one).
fn tcp_one(vip: SocketAddr, flow: usize, timeout: Duration) -> Reply {
    let deadline = Instant::now() + timeout;
    let Ok(mut stream) = TcpStream::connect_timeout(&vip, timeout) else {
        return Reply::timeout(0);
    };
    let port = stream.local_addr().map_or(0, |a| a.port());
    let mut reply = Reply::timeout(port);
    let remaining = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    if stream.set_write_timeout(Some(remaining())).is_err()
        || stream
            .write_all(format!("flow {flow}\n").as_bytes())
            .is_err()
    {
        return reply;
    }
    let mut buf = [0u8; 2048];
    let mut len = 0;
    while Instant::now() < deadline && len < buf.len() {
        if stream.set_read_timeout(Some(remaining())).is_err() {
            break;
        }
        match stream.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => {
                len += n;
                if buf[..len].contains(&b'\n') {
                    break;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    if buf[..len].contains(&b'\n') {
        let (backend, seen) = parse_reply(&String::from_utf8_lossy(&buf[..len]));
        reply.backend = backend;
        reply.seen_client = seen;
        reply.reply_from = stream.peer_addr().ok();
    }
    reply
}

/// Per-backend counts in a [`Distribution`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendCount {
    /// UDP replies from this backend.
    pub udp: usize,
    /// TCP replies from this backend.
    pub tcp: usize,
    /// Whether every reply from this backend reported the real client IP.
    pub saw_client_ip: bool,
}

/// Where flows landed, and whether DSR looked right.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Distribution {
    /// Replies per backend name.
    pub per_backend: BTreeMap<String, BackendCount>,
    /// UDP flows without a reply.
    pub udp_timeouts: usize,
    /// TCP connections without a reply.
    pub tcp_timeouts: usize,
    /// Every reply that arrived came from the VIP (address and port).
    pub all_from_vip: bool,
    /// Every reply that arrived reported the real client IP.
    pub all_saw_client_ip: bool,
    /// Every reply that arrived reported the client's own source port (no port rewriting).
    pub all_saw_client_port: bool,
}

impl Distribution {
    /// Summarises UDP and TCP replies for traffic to `vip` from `client_ip`.
    pub fn new(udp: &[Reply], tcp: &[Reply], vip: SocketAddr, client_ip: IpAddr) -> Distribution {
        let mut d = Distribution {
            per_backend: BTreeMap::new(),
            udp_timeouts: 0,
            tcp_timeouts: 0,
            all_from_vip: true,
            all_saw_client_ip: true,
            all_saw_client_port: true,
        };
        for (replies, is_udp) in [(udp, true), (tcp, false)] {
            for r in replies {
                let Some(backend) = &r.backend else {
                    if is_udp {
                        d.udp_timeouts += 1;
                    } else {
                        d.tcp_timeouts += 1;
                    }
                    continue;
                };
                let saw_ip = r.seen_client.is_some_and(|a| a.ip() == client_ip);
                d.all_from_vip &= r.reply_from == Some(vip);
                d.all_saw_client_ip &= saw_ip;
                d.all_saw_client_port &= r.seen_client.is_some_and(|a| a.port() == r.local_port);
                let entry = d
                    .per_backend
                    .entry(backend.clone())
                    .or_insert_with(|| BackendCount {
                        saw_client_ip: true,
                        ..BackendCount::default()
                    });
                if is_udp {
                    entry.udp += 1;
                } else {
                    entry.tcp += 1;
                }
                entry.saw_client_ip &= saw_ip;
            }
        }
        d
    }

    /// UDP + TCP flows without a reply.
    pub fn timeouts(&self) -> usize {
        self.udp_timeouts + self.tcp_timeouts
    }

    /// Number of distinct backends that answered.
    pub fn backends_hit(&self) -> usize {
        self.per_backend.len()
    }

    /// Renders the distribution as an ASCII table.
    pub fn table(&self) -> String {
        const HEAD: [&str; 4] = ["backend", "udp", "tcp", "saw client ip"];
        let mut rows: Vec<[String; 4]> = self
            .per_backend
            .iter()
            .map(|(name, c)| {
                [
                    name.clone(),
                    c.udp.to_string(),
                    c.tcp.to_string(),
                    if c.saw_client_ip { "yes" } else { "NO" }.to_owned(),
                ]
            })
            .collect();
        rows.push([
            "(timeout)".to_owned(),
            self.udp_timeouts.to_string(),
            self.tcp_timeouts.to_string(),
            "-".to_owned(),
        ]);
        let mut widths = HEAD.map(str::len);
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let rule = {
            let mut s = String::from("+");
            for w in widths {
                s.push_str(&"-".repeat(w + 2));
                s.push('+');
            }
            s.push('\n');
            s
        };
        let line = |cells: [&str; 4]| {
            let mut s = String::from("|");
            for (i, (w, cell)) in widths.iter().zip(cells).enumerate() {
                // Left-align names, right-align numbers.
                if i == 0 || i == 3 {
                    let _ = write!(s, " {cell:<w$} |");
                } else {
                    let _ = write!(s, " {cell:>w$} |");
                }
            }
            s.push('\n');
            s
        };
        let mut out = rule.clone();
        out.push_str(&line(HEAD));
        out.push_str(&rule);
        for row in &rows {
            out.push_str(&line([&row[0], &row[1], &row[2], &row[3]]));
        }
        out.push_str(&rule);
        let _ = writeln!(
            out,
            "replies from VIP: {}  real client IP seen: {}  client port kept: {}",
            yes_no(self.all_from_vip),
            yes_no(self.all_saw_client_ip),
            yes_no(self.all_saw_client_port)
        );
        out
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "NO" }
}

/// A TCP connection kept open across several requests (to see whether a connection survives
/// changes on the load balancer).
pub struct TcpSession {
    stream: TcpStream,
    reader: std::io::BufReader<TcpStream>,
    /// The client's port.
    pub local_port: u16,
}

impl TcpSession {
    /// Connect from inside `ns` (the socket stays in that namespace afterwards).
    pub fn connect(ns: &NetNs, vip: SocketAddr, timeout: Duration) -> Result<TcpSession> {
        let stream = ns
            .enter(move || TcpStream::connect_timeout(&vip, timeout))?
            .with_context(|| format!("connecting to {vip}"))?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let local_port = stream.local_addr()?.port();
        let reader = std::io::BufReader::new(stream.try_clone()?);
        Ok(TcpSession {
            stream,
            reader,
            local_port,
        })
    }

    /// Open `n` connections from `ns` and make one request on each; each connection with
    /// the backend it reached.
    pub fn open_many(
        ns: &NetNs,
        vip: SocketAddr,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<(TcpSession, String)>> {
        (0..n)
            .map(|i| {
                let mut s = TcpSession::connect(ns, vip, timeout)
                    .with_context(|| format!("connection {i} to {vip}"))?;
                let backend = s
                    .request()
                    .with_context(|| format!("first request on connection {i}"))?;
                Ok((s, backend))
            })
            .collect()
    }

    /// Send one request line and return the backend name in the reply.
    pub fn request(&mut self) -> Result<String> {
        use std::io::{BufRead, Write};
        self.stream.write_all(b"hello\n").context("sending")?;
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .context("reading the reply")?;
        let (backend, _) = parse_reply(&line);
        backend.with_context(|| format!("no reply on the connection from port {}", self.local_port))
    }

    /// Upload `bytes` bytes in one request; returns (bytes the backend received, backend).
    pub fn upload(&mut self, bytes: usize) -> Result<(usize, String)> {
        use std::io::{BufRead, Write};
        self.stream
            .write_all(format!("BULK {bytes}\n").as_bytes())?;
        let chunk = vec![0x5a_u8; 64 << 10];
        let mut sent = 0;
        while sent < bytes {
            let n = chunk.len().min(bytes - sent);
            self.stream.write_all(&chunk[..n]).context("uploading")?;
            sent += n;
        }
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .context("reading the upload receipt")?;
        let received = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("received="))
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("bad receipt {line:?}"))?;
        let backend = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("backend="))
            .unwrap_or_default()
            .to_string();
        Ok((received, backend))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(port: u16, backend: &str, seen: &str, from: &str) -> Reply {
        Reply {
            local_port: port,
            backend: Some(backend.to_owned()),
            seen_client: Some(seen.parse().unwrap()),
            reply_from: Some(from.parse().unwrap()),
        }
    }

    #[test]
    fn parses_reply_text() {
        let (b, c) = parse_reply("backend=b2 client=198.18.0.1:40000\n");
        assert_eq!(b.as_deref(), Some("b2"));
        assert_eq!(c, Some("198.18.0.1:40000".parse().unwrap()));
        let (b, c) = parse_reply("backend=b1 client=[2001:db8::1]:5\n");
        assert_eq!(b.as_deref(), Some("b1"));
        assert_eq!(c, Some("[2001:db8::1]:5".parse().unwrap()));
        assert_eq!(parse_reply("garbage"), (None, None));
    }

    #[test]
    fn distribution_counts_and_flags() {
        let vip: SocketAddr = "198.18.0.100:80".parse().unwrap();
        let client: IpAddr = "198.18.0.1".parse().unwrap();
        let udp = vec![
            reply(1000, "b1", "198.18.0.1:1000", "198.18.0.100:80"),
            reply(1001, "b2", "198.18.0.1:1001", "198.18.0.100:80"),
            Reply::timeout(1002),
        ];
        let tcp = vec![reply(2000, "b1", "198.18.0.2:2000", "198.18.0.100:80")];
        let d = Distribution::new(&udp, &tcp, vip, client);
        assert_eq!(d.udp_timeouts, 1);
        assert_eq!(d.tcp_timeouts, 0);
        assert_eq!(d.backends_hit(), 2);
        assert!(d.all_from_vip);
        assert!(!d.all_saw_client_ip);
        assert!(d.all_saw_client_port);
        assert_eq!(
            d.per_backend["b1"],
            BackendCount {
                udp: 1,
                tcp: 1,
                saw_client_ip: false
            }
        );
        assert!(d.per_backend["b2"].saw_client_ip);
        let table = d.table();
        assert!(
            table.contains("| b1        |   1 |   1 | NO            |"),
            "{table}"
        );
        assert!(table.contains("(timeout)"), "{table}");
    }
}
