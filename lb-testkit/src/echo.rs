//! UDP + TCP "who am I" server for backends.
//!
//! Every UDP datagram and every TCP connection (one request line) gets the reply
//! `backend=<name> client=<peer ip>:<peer port>\n`, so a client learns which backend answered
//! and which source address that backend saw. A UDP datagram that starts `LARGE <n>\n`
//! (see [`large_request`]) gets that reply padded to `n` bytes, so replies can be made
//! larger than the MTU (fragmented). Bind to the VIP itself on a DSR backend, so UDP
//! replies leave from the VIP.

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::netns::NetNs;

/// How often the server threads look at the stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long a TCP connection may take to deliver its request line.
const TCP_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request line we read (TCP).
const MAX_REQUEST: usize = 2048;
/// Largest UDP datagram we read, and the largest padded reply.
pub const MAX_DATAGRAM: usize = 65_507;

/// What a server has seen so far.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EchoStats {
    /// UDP datagrams answered.
    pub udp_requests: u64,
    /// TCP connections answered.
    pub tcp_requests: u64,
    /// Every distinct source IP seen (UDP and TCP).
    pub clients: BTreeSet<IpAddr>,
}

impl EchoStats {
    /// UDP + TCP requests answered.
    pub fn requests(&self) -> u64 {
        self.udp_requests + self.tcp_requests
    }
}

/// A running echo server; stops and joins its threads when dropped.
#[derive(Debug)]
pub struct EchoServer {
    name: String,
    bind: SocketAddr,
    stop: Arc<AtomicBool>,
    stats: Arc<Mutex<EchoStats>>,
    threads: Vec<JoinHandle<()>>,
}

/// The reply text for a request from `peer`.
pub fn reply_text(name: &str, peer: SocketAddr) -> String {
    format!("backend={name} client={peer}\n")
}

/// A UDP request of `len` bytes (padded with `.`, at least the header) asking for a reply of
/// `reply_len` bytes.
pub fn large_request(len: usize, reply_len: usize) -> Vec<u8> {
    let mut out = format!("LARGE {reply_len}\n").into_bytes();
    if out.len() < len {
        out.resize(len, b'.');
    }
    out
}

/// The reply to a UDP request: the reply text, padded as a `LARGE` request asks.
fn udp_reply(name: &str, peer: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut reply = reply_text(name, peer).into_bytes();
    let asked = request
        .strip_prefix(b"LARGE ")
        .and_then(|rest| rest.split(|b| *b == b'\n').next())
        .and_then(|n| std::str::from_utf8(n).ok()?.parse::<usize>().ok());
    if let Some(n) = asked.filter(|&n| n > reply.len()) {
        reply.resize(n.min(MAX_DATAGRAM), b'.');
    }
    reply
}

impl EchoServer {
    /// Binds UDP and TCP sockets to exactly `bind` inside `ns` and serves them on two threads.
    pub fn start(ns: &NetNs, name: &str, bind: SocketAddr) -> Result<EchoServer> {
        // Sockets belong to the namespace they were created in; after that any thread may
        // use them, so only the bind needs to happen inside.
        let (udp, tcp) = ns
            .enter(move || -> Result<(UdpSocket, TcpListener)> {
                let udp = UdpSocket::bind(bind).with_context(|| format!("binding UDP {bind}"))?;
                let tcp = TcpListener::bind(bind).with_context(|| format!("binding TCP {bind}"))?;
                Ok((udp, tcp))
            })?
            .with_context(|| format!("echo server {name} in {}", ns.name()))?;
        udp.set_read_timeout(Some(POLL_INTERVAL))
            .context("setting UDP read timeout")?;

        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(EchoStats::default()));
        let mut server = EchoServer {
            name: name.to_owned(),
            bind,
            stop: stop.clone(),
            stats: stats.clone(),
            threads: Vec::new(),
        };

        let (n, s, st) = (name.to_owned(), stop.clone(), stats.clone());
        server.threads.push(
            thread::Builder::new()
                .name(format!("echo-udp-{name}"))
                .spawn(move || serve_udp(&udp, &n, &s, &st))
                .context("spawning UDP server thread")?,
        );
        let n = name.to_owned();
        server.threads.push(
            thread::Builder::new()
                .name(format!("echo-tcp-{name}"))
                .spawn(move || serve_tcp(&tcp, &n, &stop, &stats))
                .context("spawning TCP server thread")?,
        );
        Ok(server)
    }

    /// The name put into replies.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address both sockets are bound to.
    pub fn bind_addr(&self) -> SocketAddr {
        self.bind
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> EchoStats {
        lock(&self.stats).clone()
    }

    /// Stops the server and returns the final counters.
    pub fn stop(mut self) -> EchoStats {
        self.shutdown();
        self.stats()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                eprintln!("lb-testkit: echo server {} thread panicked", self.name);
            }
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn lock(stats: &Mutex<EchoStats>) -> std::sync::MutexGuard<'_, EchoStats> {
    stats.lock().unwrap_or_else(|e| e.into_inner())
}

fn serve_udp(sock: &UdpSocket, name: &str, stop: &AtomicBool, stats: &Mutex<EchoStats>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    while !stop.load(Ordering::Relaxed) {
        match sock.recv_from(&mut buf) {
            Ok((len, peer)) => {
                if let Err(e) = sock.send_to(&udp_reply(name, peer, &buf[..len]), peer) {
                    eprintln!("lb-testkit: echo {name}: UDP reply to {peer}: {e}");
                    continue;
                }
                let mut s = lock(stats);
                s.udp_requests += 1;
                s.clients.insert(peer.ip());
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => {
                eprintln!("lb-testkit: echo {name}: UDP receive: {e}");
                thread::sleep(POLL_INTERVAL);
            }
        }
    }
}

fn serve_tcp(listener: &TcpListener, name: &str, stop: &AtomicBool, stats: &Mutex<EchoStats>) {
    // One short-lived thread per connection, so a silent client cannot hold up the others.
    thread::scope(|scope| {
        while !stop.load(Ordering::Relaxed) {
            if !readable(listener, POLL_INTERVAL) {
                continue;
            }
            match listener.accept() {
                Ok((stream, peer)) => {
                    let spawned = thread::Builder::new()
                        .name(format!("echo-conn-{name}"))
                        .spawn_scoped(scope, move || {
                            match serve_connection(stream, name, peer, stop) {
                                Ok(true) => {
                                    let mut s = lock(stats);
                                    s.tcp_requests += 1;
                                    s.clients.insert(peer.ip());
                                }
                                Ok(false) => {}
                                Err(e) => eprintln!("lb-testkit: echo {name}: TCP {peer}: {e:#}"),
                            }
                        });
                    if let Err(e) = spawned {
                        eprintln!("lb-testkit: echo {name}: spawning connection thread: {e}");
                    }
                }
                Err(e) => {
                    eprintln!("lb-testkit: echo {name}: accept: {e}");
                    thread::sleep(POLL_INTERVAL);
                }
            }
        }
    });
}

/// Longest a connection may stay open.
const TCP_CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
/// Largest upload `BULK <n>` accepts.
const MAX_BULK: usize = 64 << 20;

/// Answers request lines until the client closes (each line bounded in size and time; the
/// connection in lifetime). A line `BULK <n>` is followed by `n` bytes of payload, answered
/// with `received=<n> backend=<name>`. `Ok(false)` when the client closed without sending
/// anything.
fn serve_connection(
    mut stream: TcpStream,
    name: &str,
    peer: SocketAddr,
    stop: &AtomicBool,
) -> Result<bool> {
    stream.set_read_timeout(Some(POLL_INTERVAL))?;
    stream.set_write_timeout(Some(TCP_REQUEST_TIMEOUT))?;
    let end_of_life = Instant::now() + TCP_CONNECTION_LIFETIME;
    let mut served = false;
    let mut buf = [0u8; MAX_REQUEST];
    let mut len = 0;
    loop {
        // Read up to a newline.
        let line_end = loop {
            if let Some(i) = buf[..len].iter().position(|b| *b == b'\n') {
                break Some(i);
            }
            if len == buf.len() {
                break Some(len);
            }
            if stop.load(Ordering::Relaxed) || Instant::now() >= end_of_life {
                return Ok(served);
            }
            match stream.read(&mut buf[len..]) {
                // The client closed: a last line without its newline still counts.
                Ok(0) => break (len > 0).then_some(len),
                Ok(n) => len += n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e).context("reading request"),
            }
        };
        let Some(i) = line_end else {
            return Ok(served);
        };
        let line = String::from_utf8_lossy(&buf[..i]).trim().to_string();
        // `i` is the newline's index, or `len` for a line that ends without one.
        let rest = buf[(i + 1).min(len)..len].to_vec();
        let reply = match line
            .strip_prefix("BULK ")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(n) if n <= MAX_BULK => {
                let got = drain(&mut stream, n, rest.len(), stop, end_of_life)?;
                len = 0;
                format!("received={got} backend={name}\n")
            }
            _ => {
                len = rest.len();
                buf[..len].copy_from_slice(&rest);
                reply_text(name, peer)
            }
        };
        stream
            .write_all(reply.as_bytes())
            .context("writing reply")?;
        served = true;
    }
}

/// Read and discard `n` bytes of which `already` have arrived; returns how many arrived.
fn drain(
    stream: &mut TcpStream,
    n: usize,
    already: usize,
    stop: &AtomicBool,
    until: Instant,
) -> Result<usize> {
    let mut got = already.min(n);
    let mut chunk = vec![0u8; 64 << 10];
    while got < n && !stop.load(Ordering::Relaxed) && Instant::now() < until {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e).context("reading upload"),
        }
    }
    Ok(got.min(n))
}

/// Waits up to `timeout` for a connection to accept.
fn readable(listener: &TcpListener, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call; the fd outlives it.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    rc > 0 && pfd.revents & libc::POLLIN != 0
}
