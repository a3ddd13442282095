//! Which load-balancer nodes are alive: UDP heartbeats between the agents.
//!
//! Every agent sends a small datagram to every other node each `interval` and counts a node
//! alive while its heartbeats keep arriving; one silent for `dead_after` is dead. This
//! detects a dead node in about a second, where Node Ready takes 40 s and a per-node Lease
//! renewed every second would cost the API server a write per node per second; it also
//! tests the path that matters (the node's network), and works without a cluster. An agent
//! that stops cleanly sends "leaving" heartbeats, so its VIPs move at once.
//!
//! A new agent claims nothing until it has listened for `dead_after` (so a starting node does
//! not briefly take every VIP before it has heard the others).
//!
//! Datagram: `b"LBHB"`, version (1), flags (bit 0: leaving), name length, name. A heartbeat
//! counts only from the address configured for its name.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use tokio::{
    net::UdpSocket,
    sync::watch,
    time::{Instant, MissedTickBehavior},
};

const MAGIC: &[u8; 4] = b"LBHB";
const VERSION: u8 = 1;
const FLAG_LEAVING: u8 = 1;
/// Leaving heartbeats sent on a clean stop (datagrams may be lost).
const LEAVE_REPEATS: usize = 3;

/// Default UDP port of the heartbeats (not MetalLB's 7946, so both can run during a move).
pub const DEFAULT_PORT: u16 = 7473;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MembershipSettings {
    pub port: u16,
    pub interval: Duration,
    pub dead_after: Duration,
}

impl Default for MembershipSettings {
    fn default() -> Self {
        MembershipSettings {
            port: DEFAULT_PORT,
            interval: Duration::from_millis(300),
            dead_after: Duration::from_millis(1200),
        }
    }
}

/// A load-balancer node: its name and the address its heartbeats come from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    pub name: String,
    pub address: IpAddr,
}

/// A heartbeat datagram.
fn encode(name: &str, leaving: bool) -> Vec<u8> {
    let name = &name.as_bytes()[..name.len().min(255)];
    let mut out = Vec::with_capacity(7 + name.len());
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(if leaving { FLAG_LEAVING } else { 0 });
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out
}

/// (name, leaving) of a heartbeat, `None` for anything else.
fn decode(buf: &[u8]) -> Option<(&str, bool)> {
    let (head, rest) = buf.split_at_checked(7)?;
    if &head[..4] != MAGIC || head[4] != VERSION {
        return None;
    }
    let name = rest.get(..usize::from(head[6]))?;
    Some((std::str::from_utf8(name).ok()?, head[5] & FLAG_LEAVING != 0))
}

/// What the heartbeats say so far.
#[derive(Debug)]
struct View {
    me: String,
    peers: BTreeMap<String, IpAddr>,
    /// Per peer: its last heartbeat, the first of its current run of heartbeats, and
    /// whether it said it is leaving.
    seen: BTreeMap<String, Seen>,
    /// When this node started listening.
    start: Instant,
}

#[derive(Clone, Copy, Debug)]
struct Seen {
    last: Instant,
    since: Instant,
    leaving: bool,
}

impl View {
    fn heard(
        &mut self,
        from: IpAddr,
        name: &str,
        leaving: bool,
        now: Instant,
        dead_after: Duration,
    ) -> bool {
        let canonical = match from {
            IpAddr::V6(a) => a.to_canonical(),
            a => a,
        };
        if name == self.me || self.peers.get(name) != Some(&canonical) {
            return false;
        }
        let since = match self.seen.get(name) {
            Some(s) if !s.leaving && now.duration_since(s.last) < dead_after => s.since,
            // New, back from the dead, or back after leaving: a new run starts.
            _ => now,
        };
        self.seen.insert(
            name.to_string(),
            Seen {
                last: now,
                since,
                leaving,
            },
        );
        true
    }

    /// The live nodes. A node that (re)appears after this one's own listening period
    /// counts only once it has been heard for `dead_after`: that is how long it listens
    /// itself before it claims VIPs, so the others hand them over when it takes them, not
    /// before (no gap in which nobody answers).
    fn alive(&self, now: Instant, dead_after: Duration) -> BTreeSet<String> {
        let mut alive: BTreeSet<String> = self
            .seen
            .iter()
            .filter(|(n, s)| {
                let settled = s.since.duration_since(self.start) < dead_after
                    || now.duration_since(s.since) >= dead_after;
                !s.leaving
                    && now.duration_since(s.last) < dead_after
                    && settled
                    && self.peers.contains_key(*n)
            })
            .map(|(n, _)| n.clone())
            .collect();
        alive.insert(self.me.clone());
        alive
    }
}

/// The running heartbeat task. Dropping it stops the task without saying goodbye; use
/// [`Membership::leave`] on a clean stop.
pub struct Membership {
    alive: watch::Receiver<Option<BTreeSet<String>>>,
    peers: watch::Sender<Vec<Peer>>,
    leave: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Membership {
    /// Bind the heartbeat port (every address, both families) and start. `peers` may list
    /// this node too (it is skipped).
    pub async fn start(
        me: &str,
        settings: MembershipSettings,
        peers: Vec<Peer>,
    ) -> io::Result<Membership> {
        let socket = bind(settings.port).await?;
        let (alive_tx, alive) = watch::channel(None);
        let (peers_tx, peers_rx) = watch::channel(peers);
        let (leave_tx, leave_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(run(
            socket,
            me.to_string(),
            settings,
            peers_rx,
            alive_tx,
            leave_rx,
        ));
        Ok(Membership {
            alive,
            peers: peers_tx,
            leave: Some(leave_tx),
            task,
        })
    }

    /// The live nodes (this one included), or `None` while still listening after the start.
    pub fn alive(&self) -> Option<BTreeSet<String>> {
        self.alive.borrow().clone()
    }

    /// Wait until the live set changes. Cancel-safe.
    pub async fn changed(&mut self) {
        if self.alive.changed().await.is_err() {
            // The task ended (it only does on leave): never report again.
            std::future::pending::<()>().await;
        }
    }

    /// Replace the node list (Kubernetes mode: Nodes come and go).
    pub fn set_peers(&self, peers: Vec<Peer>) {
        self.peers.send_if_modified(|p| {
            if *p == peers {
                false
            } else {
                *p = peers;
                true
            }
        });
    }

    /// Tell the others this node is going, so they take its VIPs over now.
    pub async fn leave(&mut self) {
        if let Some(tx) = self.leave.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut self.task).await;
    }
}

/// The heartbeat socket: IPv6 dual-stack (`[::]`), or IPv4 only (`0.0.0.0`) on a host
/// without IPv6.
async fn bind(port: u16) -> io::Result<UdpSocket> {
    let any6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port);
    match UdpSocket::bind(any6).await {
        Ok(s) => Ok(s),
        Err(e6) => {
            let any4 = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), port);
            UdpSocket::bind(any4).await.map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("binding the heartbeat port [::]:{port} ({e6}) or 0.0.0.0:{port}: {e}"),
                )
            })
        }
    }
}

fn target(socket: &UdpSocket, addr: IpAddr, port: u16) -> SocketAddr {
    // A dual-stack socket reaches IPv4 peers as mapped addresses.
    match (socket.local_addr().map(|a| a.is_ipv6()), addr) {
        (Ok(true), IpAddr::V4(a)) => SocketAddr::new(IpAddr::V6(a.to_ipv6_mapped()), port),
        _ => SocketAddr::new(addr, port),
    }
}

async fn send_all(socket: &UdpSocket, view: &View, port: u16, leaving: bool) {
    let msg = encode(&view.me, leaving);
    for (name, addr) in &view.peers {
        if *name == view.me {
            continue;
        }
        if let Err(e) = socket.send_to(&msg, target(socket, *addr, port)).await {
            tracing::debug!(peer = %name, %addr, error = %e, "heartbeat not sent");
        }
    }
}

async fn run(
    socket: UdpSocket,
    me: String,
    settings: MembershipSettings,
    mut peers_rx: watch::Receiver<Vec<Peer>>,
    alive_tx: watch::Sender<Option<BTreeSet<String>>>,
    mut leave_rx: tokio::sync::oneshot::Receiver<()>,
) {
    let start = Instant::now();
    let mut view = View {
        peers: peers_rx
            .borrow_and_update()
            .iter()
            .map(|p| (p.name.clone(), p.address))
            .collect(),
        me,
        seen: BTreeMap::new(),
        start,
    };
    let publish = |view: &View, now: Instant| {
        // Alone, there is nobody to wait for.
        let lonely = view.peers.keys().all(|n| *n == view.me);
        if !lonely && now.duration_since(start) < settings.dead_after {
            return;
        }
        let alive = Some(view.alive(now, settings.dead_after));
        alive_tx.send_if_modified(|cur| {
            if *cur == alive {
                false
            } else {
                tracing::info!(alive = ?alive.as_ref().map(|a| a.iter().collect::<Vec<_>>()), "load-balancer nodes alive");
                *cur = alive;
                true
            }
        });
    };
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut buf = [0u8; 512];
    loop {
        tokio::select! {
            _ = tick.tick() => {
                send_all(&socket, &view, settings.port, false).await;
                publish(&view, Instant::now());
            }
            r = socket.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                if let Some((name, leaving)) = decode(&buf[..n])
                    && view.heard(from.ip(), name, leaving, Instant::now(), settings.dead_after)
                {
                    publish(&view, Instant::now());
                }
            }
            changed = peers_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                view.peers = peers_rx
                    .borrow_and_update()
                    .iter()
                    .map(|p| (p.name.clone(), p.address))
                    .collect();
                publish(&view, Instant::now());
            }
            _ = &mut leave_rx => {
                for _ in 0..LEAVE_REPEATS {
                    send_all(&socket, &view, settings.port, true).await;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_round_trip_and_garbage_is_ignored() {
        assert_eq!(decode(&encode("lb-1", false)), Some(("lb-1", false)));
        assert_eq!(decode(&encode("lb-1", true)), Some(("lb-1", true)));
        assert_eq!(decode(b"LBHB"), None);
        assert_eq!(decode(b"XXXX\x01\x00\x01a"), None);
        assert_eq!(decode(b"LBHB\x02\x00\x01a"), None, "other version");
        assert_eq!(decode(b"LBHB\x01\x00\x05ab"), None, "cut short");
    }

    fn view() -> View {
        View {
            start: Instant::now(),
            me: "a".into(),
            peers: BTreeMap::from([
                ("a".into(), "198.18.0.2".parse().unwrap()),
                ("b".into(), "198.18.0.3".parse().unwrap()),
                ("c".into(), "2001:db8::4".parse().unwrap()),
            ]),
            seen: BTreeMap::new(),
        }
    }

    #[test]
    fn a_node_joining_later_counts_once_it_has_listened_as_long_as_it_waits() {
        let dead_after = Duration::from_millis(1000);
        let ms = Duration::from_millis;
        let mut v = view();
        let t0 = v.start;
        let b = "198.18.0.3".parse().unwrap();
        // b heard during our own listening period: alive at once.
        assert!(v.heard(b, "b", false, t0 + ms(100), dead_after));
        assert!(v.alive(t0 + ms(150), dead_after).contains("b"));
        // b dies, and comes back later: it listens 1 s before claiming, so do we.
        let back = t0 + ms(5000);
        assert!(v.heard(b, "b", false, back, dead_after));
        assert!(!v.alive(back + ms(10), dead_after).contains("b"));
        for t in (200..1000).step_by(200) {
            assert!(v.heard(b, "b", false, back + ms(t), dead_after));
        }
        assert!(!v.alive(back + ms(999), dead_after).contains("b"));
        assert!(v.alive(back + ms(1000), dead_after).contains("b"));
    }

    #[test]
    fn nodes_are_alive_while_heard_and_dead_after_silence_or_leaving() {
        let dead_after = Duration::from_millis(1000);
        let ms = Duration::from_millis;
        let mut v = view();
        let t0 = Instant::now();
        assert_eq!(v.alive(t0, dead_after), BTreeSet::from(["a".to_string()]));
        // b from its own address, mapped as the dual-stack socket reports it.
        let b_mapped = IpAddr::V6(
            "198.18.0.3"
                .parse::<std::net::Ipv4Addr>()
                .unwrap()
                .to_ipv6_mapped(),
        );
        assert!(v.heard(b_mapped, "b", false, t0, dead_after));
        assert!(v.heard("2001:db8::4".parse().unwrap(), "c", false, t0, dead_after));
        assert!(
            !v.heard("198.18.0.9".parse().unwrap(), "b", false, t0, dead_after),
            "wrong address"
        );
        assert!(
            !v.heard("198.18.0.3".parse().unwrap(), "x", false, t0, dead_after),
            "unknown name"
        );
        assert!(
            !v.heard("198.18.0.2".parse().unwrap(), "a", false, t0, dead_after),
            "itself"
        );
        assert_eq!(v.alive(t0, dead_after).len(), 3);
        assert_eq!(v.alive(t0 + ms(999), dead_after).len(), 3);
        assert_eq!(
            v.alive(t0 + ms(1001), dead_after).len(),
            1,
            "silent past dead_after"
        );
        // Back from the dead: counted after a run of dead_after (see the test above).
        assert!(v.heard(b_mapped, "b", false, t0 + ms(1001), dead_after));
        assert!(!v.alive(t0 + ms(1002), dead_after).contains("b"));
        assert!(v.heard(b_mapped, "b", false, t0 + ms(1800), dead_after));
        assert!(v.alive(t0 + ms(2001), dead_after).contains("b"));
        assert!(v.heard(b_mapped, "b", true, t0 + ms(2003), dead_after));
        assert!(!v.alive(t0 + ms(2004), dead_after).contains("b"), "leaving");
        // A node removed from the list is no longer counted, whatever it sent.
        v.peers.remove("c");
        assert!(!v.heard("2001:db8::4".parse().unwrap(), "c", false, t0, dead_after));
    }

    /// Several agents need a namespace each (one port per node): the netns end-to-end
    /// tests cover the wire; here only the lonely start.
    #[tokio::test]
    async fn a_lonely_node_is_alive_at_once() {
        let settings = MembershipSettings {
            port: 0,
            ..MembershipSettings::default()
        };
        let mut m = Membership::start(
            "solo",
            settings,
            vec![Peer {
                name: "solo".into(),
                address: "198.18.0.2".parse().unwrap(),
            }],
        )
        .await
        .unwrap();
        tokio::time::timeout(Duration::from_secs(2), m.changed())
            .await
            .unwrap();
        assert_eq!(m.alive(), Some(BTreeSet::from(["solo".to_string()])));
        m.leave().await;
    }
}
