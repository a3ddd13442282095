//! VIP announcement failover: how long a node's death (or clean stop) takes to reach the
//! client's path to the VIP, and what it costs the connections open at the time.
//!
//! Every trial of every case runs in a fresh lab ([`lb_testkit::bgplab`] or
//! [`lb_testkit::l2lab`]), with [`CONNECTIONS`] long-lived TCP connections each sending a
//! request every [`PACE`] across the event. Per trial:
//!
//! - BGP, node killed (agent + BIRD SIGKILL): until the router's route lost the node's next
//!   hop (BIRD's closed session tells the router at once). Baseline: the same death behind a
//!   link taken down first, so no FIN gets out and the router only notices at hold-time
//!   expiry. Graceful stop (SIGTERM): the lab's own withdrawal time.
//! - L2, owner killed (link down, then agent SIGKILL): until a new connection is answered
//!   (one started every [`PROBE_EVERY`]), and until the client's neighbour entry for the VIP
//!   names another node.
//!
//! For both: until every connection answered a request sent after the event and its last
//! stall (a request slower than [`STALL`]) ended, the slowest
//! request seen, and the connections that broke (an error, a timeout of
//! [`REQUEST_TIMEOUT`], or a reply from another backend). Everything is bounded: an event
//! that does not converge within [`CONVERGE_LIMIT`] fails the trial.

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use lb_testkit::{
    L2Lab, L2LabSpec, Membership, NetNs, TcpSession,
    bgplab::{BgpLab, BgpLabSpec},
    lab::HOST_IFACE,
    tcp_connections,
};

use super::stats::Summary;

/// Long-lived connections per trial.
pub const CONNECTIONS: usize = 30;
/// A trial whose event has not converged (or whose connections have not all answered
/// again) this long after it failed.
const CONVERGE_LIMIT: Duration = Duration::from_secs(30);
/// A request unanswered this long breaks its connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause between two requests on one connection.
const PACE: Duration = Duration::from_millis(20);
/// A request slower than this was a stall: its connection answers again when it does.
const STALL: Duration = Duration::from_millis(100);
/// Traffic before the event, and after everything converged (a late break still counts).
const WARM: Duration = Duration::from_millis(300);
const MARGIN: Duration = Duration::from_secs(1);
/// L2: a new probe connection this often, each given [`PROBE_TIMEOUT`].
const PROBE_EVERY: Duration = Duration::from_millis(50);
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How often the client's neighbour entry is looked at.
const POLL: Duration = Duration::from_millis(10);
/// The node the BGP cases take down.
const VICTIM: usize = 0;

#[derive(Clone, Copy, Debug)]
pub struct Settings {
    pub trials: usize,
}

/// What the section found.
#[derive(Clone, Debug, Default)]
pub struct Announce {
    pub trials: usize,
    pub rows: Vec<Row>,
    /// One line per failed trial.
    pub failures: Vec<String>,
}

/// One case over its trials; times in seconds.
#[derive(Clone, Debug)]
pub struct Row {
    pub case: &'static str,
    /// Trials that converged.
    pub ok: usize,
    /// BGP: the route lost the next hop; L2: the client's entry names the new owner.
    pub converged: Option<Summary>,
    /// L2: the first new connection answered.
    pub first_new: Option<Summary>,
    /// Every connection answered a request sent after the event.
    pub recovered: Option<Summary>,
    /// The slowest request of the trial (seconds).
    pub slowest: Option<Summary>,
    pub broken: usize,
    pub connections: usize,
    /// Settings and extra figures.
    pub note: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Case {
    BgpKill,
    BgpLinkDown,
    BgpStop,
    L2Kill,
}

impl Case {
    const ALL: [Case; 4] = [
        Case::BgpKill,
        Case::BgpLinkDown,
        Case::BgpStop,
        Case::L2Kill,
    ];

    fn name(self) -> &'static str {
        match self {
            Case::BgpKill => "BGP: node killed (agent + BIRD SIGKILL)",
            Case::BgpLinkDown => "BGP baseline: link down, then killed (hold time)",
            Case::BgpStop => "BGP: graceful stop (SIGTERM)",
            Case::L2Kill => "L2: owner killed (link down + agent SIGKILL)",
        }
    }
}

/// One trial's figures (seconds).
struct Trial {
    converged: f64,
    first_new: Option<f64>,
    recovered: f64,
    slowest: f64,
    broken: usize,
    /// BGP graceful stop: when the agent exited.
    exited: Option<f64>,
}

pub fn run(
    agent: &std::path::Path,
    settings: Settings,
    check_stop: &dyn Fn() -> anyhow::Result<()>,
) -> anyhow::Result<Announce> {
    ensure!(
        agent.exists(),
        "{} is missing (cargo build --release -p lb-agent)",
        agent.display()
    );
    let bgp = BgpLabSpec::new(agent);
    let l2 = L2LabSpec::new(agent);
    let mut out = Announce {
        trials: settings.trials,
        ..Default::default()
    };
    let mut trials: Vec<(Case, Trial)> = Vec::new();
    // Trial-major, so a slow phase of the machine spreads over every case.
    for t in 0..settings.trials {
        for case in Case::ALL {
            check_stop()?;
            eprintln!(
                "announce: trial {}/{}: {}",
                t + 1,
                settings.trials,
                case.name()
            );
            let result = match case {
                Case::L2Kill => l2_trial(&l2),
                _ => bgp_trial(&bgp, case),
            };
            match result {
                Ok(trial) => {
                    eprintln!(
                        "announce:   converged {:.3} s{}, all answering {:.3} s, slowest request {:.3} s, broken {}/{CONNECTIONS}",
                        trial.converged,
                        trial.first_new.map_or(String::new(), |f| format!(
                            ", first new connection {f:.3} s"
                        )),
                        trial.recovered,
                        trial.slowest,
                        trial.broken
                    );
                    trials.push((case, trial));
                }
                Err(e) => {
                    eprintln!("announce:   FAILED: {e:#}");
                    out.failures.push(format!(
                        "announce: {} (trial {}) failed: {e:#}",
                        case.name(),
                        t + 1
                    ));
                }
            }
        }
    }
    for case in Case::ALL {
        let of = |f: &dyn Fn(&Trial) -> Option<f64>| -> Option<Summary> {
            let v: Vec<f64> = trials
                .iter()
                .filter(|(c, _)| *c == case)
                .filter_map(|(_, t)| f(t))
                .collect();
            Summary::of(&v)
        };
        let ok = trials.iter().filter(|(c, _)| *c == case).count();
        let broken = trials
            .iter()
            .filter(|(c, _)| *c == case)
            .map(|(_, t)| t.broken)
            .sum();
        let note = match case {
            Case::BgpKill | Case::BgpLinkDown => format!("hold time {} s", bgp.hold_time),
            Case::BgpStop => format!(
                "hand-over {} ms; agent exited after {}",
                bgp.handover_ms,
                of(&|t| t.exited).map_or("-".into(), |s| format!("{:.3} s", s.median))
            ),
            Case::L2Kill => {
                let Membership {
                    interval_ms,
                    dead_after_ms,
                    ..
                } = l2.membership;
                format!(
                    "heartbeat every {interval_ms} ms, dead_after {dead_after_ms} ms (the detection floor)"
                )
            }
        };
        out.rows.push(Row {
            case: case.name(),
            ok,
            converged: of(&|t| Some(t.converged)),
            first_new: of(&|t| t.first_new),
            recovered: of(&|t| Some(t.recovered)),
            slowest: of(&|t| Some(t.slowest)),
            broken,
            connections: ok * CONNECTIONS,
            note,
        });
    }
    Ok(out)
}

fn bgp_trial(spec: &BgpLabSpec, case: Case) -> anyhow::Result<Trial> {
    let mut lab = BgpLab::start(spec.clone()).context("starting the BGP lab")?;
    let all: Vec<usize> = (0..spec.nodes).collect();
    lab.wait_nexthops(&lab.node_addrs(&all), CONVERGE_LIMIT)
        .context("waiting for every node's route")?;
    let rest: Vec<usize> = all.into_iter().filter(|&i| i != VICTIM).collect();
    let rest = lab.node_addrs(&rest);
    let load = Load::start(lab.client(), lab.service())?;
    thread::sleep(WARM);
    let at = load.mark();
    let mut exited = None;
    let converged = match case {
        Case::BgpKill | Case::BgpLinkDown => {
            if case == Case::BgpLinkDown {
                lab.nodes()[VICTIM]
                    .ns
                    .ip(&["link", "set", HOST_IFACE, "down"])
                    .context("taking the node's link down")?;
            }
            lab.kill_node(VICTIM)?;
            lab.wait_nexthops(&rest, CONVERGE_LIMIT)?;
            at.elapsed()
        }
        Case::BgpStop => {
            let stop = lab.stop_node(VICTIM)?;
            ensure!(
                stop.status.success(),
                "the agent exited with {}",
                stop.status
            );
            exited = Some(stop.exited_after.as_secs_f64());
            stop.withdrawn_after
                .context("the route was not withdrawn")?
        }
        Case::L2Kill => unreachable!("not a BGP case"),
    };
    let conns = load.finish(at)?;
    Ok(Trial {
        converged: converged.as_secs_f64(),
        first_new: None,
        recovered: conns.recovered,
        slowest: conns.slowest,
        broken: conns.broken,
        exited,
    })
}

fn l2_trial(spec: &L2LabSpec) -> anyhow::Result<Trial> {
    let mut lab = L2Lab::start(spec.clone()).context("starting the L2 lab")?;
    let service = lab.service(false);
    let vip = service.ip();
    // Reachable first (the client resolves the VIP), then one steady owner, whose takeover
    // announcement the client's entry follows.
    let start = Instant::now();
    first_answer(lab.client(), service, start, start + CONVERGE_LIMIT)
        .with_context(|| format!("{service} not reachable within {CONVERGE_LIMIT:?}"))?;
    lab.wait_single_answerer(vip, CONVERGE_LIMIT)?;
    // The client may have resolved the VIP while the nodes still disagreed, and kept that
    // entry (a takeover announcement within its locktime is ignored): resolve it afresh.
    lab.client()
        .ip(&["neigh", "flush", "to", &vip.to_string(), "dev", HOST_IFACE])
        .context("flushing the client's entry for the VIP")?;
    let load = Load::start(lab.client(), service)?;
    thread::sleep(WARM);
    // The owner the client's traffic goes to now (ownership can still have moved).
    let owner = lab.wait_single_answerer(vip, CONVERGE_LIMIT)?;
    wait_entry(&lab, owner)?;
    let at = load.mark();
    lab.link_down(owner)?;
    lab.kill_agent(owner)?;
    let deadline = at + CONVERGE_LIMIT;
    let (first_new, moved) = thread::scope(|scope| {
        let client = lab.client();
        let probe = scope.spawn(move || first_answer(client, service, at, deadline));
        let moved = loop {
            let mac = lab.client_neighbour(vip)?.and_then(|e| e.mac);
            if mac
                .and_then(|m| lab.node_by_mac(m))
                .is_some_and(|i| i != owner)
            {
                break at.elapsed();
            }
            if Instant::now() > deadline {
                bail!(
                    "the client's entry for {vip} still names {:?} after {CONVERGE_LIMIT:?}",
                    mac.map(|m| lab.describe_mac(m))
                );
            }
            thread::sleep(POLL);
        };
        let first = probe
            .join()
            .map_err(|_| anyhow::anyhow!("the probe thread panicked"))?
            .with_context(|| format!("no new connection answered within {CONVERGE_LIMIT:?}"))?;
        Ok((first, moved))
    })?;
    let conns = load.finish(at)?;
    Ok(Trial {
        converged: moved.as_secs_f64(),
        first_new: Some(first_new.as_secs_f64()),
        recovered: conns.recovered,
        slowest: conns.slowest,
        broken: conns.broken,
        exited: None,
    })
}

/// Waits (bounded) until the client's entry for the VIP names node `owner`.
fn wait_entry(lab: &L2Lab, owner: usize) -> anyhow::Result<()> {
    let vip = lab.service(false).ip();
    let want = lab.nodes()[owner].mac;
    let deadline = Instant::now() + CONVERGE_LIMIT;
    loop {
        let entry = lab.client_neighbour(vip)?;
        if entry.as_ref().and_then(|e| e.mac) == Some(want) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the client's entry for {vip} is {entry:?}, not the owner {}, after {CONVERGE_LIMIT:?}",
                lab.describe_mac(want)
            );
        }
        thread::sleep(POLL);
    }
}

/// Starts a new connection every [`PROBE_EVERY`] (each on its own thread, at most
/// [`PROBE_TIMEOUT`] long) until one is answered; returns when that was, after `since`.
fn first_answer(
    client: &NetNs,
    service: SocketAddr,
    since: Instant,
    deadline: Instant,
) -> Option<Duration> {
    let (tx, rx) = mpsc::channel::<Instant>();
    thread::scope(|scope| {
        let mut next = Instant::now();
        while Instant::now() < deadline {
            if Instant::now() >= next {
                let tx = tx.clone();
                scope.spawn(move || {
                    if tcp_connections(client, service, 1, PROBE_TIMEOUT)
                        .is_ok_and(|r| r.iter().all(|r| r.answered()))
                    {
                        let _ = tx.send(Instant::now());
                    }
                });
                next += PROBE_EVERY;
            }
            let wait = next.min(deadline).saturating_duration_since(Instant::now());
            if let Ok(answered) = rx.recv_timeout(wait) {
                return Some(answered.saturating_duration_since(since));
            }
        }
        None
    })
}

/// What one connection saw.
#[derive(Default)]
struct ConnLog {
    /// (sent, answered) of every answered request.
    samples: Vec<(Instant, Instant)>,
    /// Why it stopped early.
    broken: Option<String>,
}

/// What the connections saw after the event (seconds).
struct Conns {
    recovered: f64,
    slowest: f64,
    broken: usize,
}

/// [`CONNECTIONS`] connections, each on its own thread sending a request every [`PACE`]
/// until told to stop.
struct Load {
    stop: Arc<AtomicBool>,
    event: Arc<OnceLock<Instant>>,
    /// Connections that answered a request sent after the event, or broke.
    settled: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<ConnLog>>,
}

impl Load {
    fn start(client: &NetNs, service: SocketAddr) -> anyhow::Result<Load> {
        let mut load = Load {
            stop: Arc::default(),
            event: Arc::default(),
            settled: Arc::default(),
            threads: Vec::with_capacity(CONNECTIONS),
        };
        for _ in 0..CONNECTIONS {
            let mut session = TcpSession::connect(client, service, REQUEST_TIMEOUT)?;
            let backend = session.request().context("the first request")?;
            let (stop, event, settled) =
                (load.stop.clone(), load.event.clone(), load.settled.clone());
            load.threads.push(thread::spawn(move || {
                let mut log = ConnLog::default();
                let mut counted = false;
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let after_event = event.get().is_some_and(|e| sent >= *e);
                    match session.request() {
                        Ok(b) if b == backend => log.samples.push((sent, Instant::now())),
                        Ok(b) => log.broken = Some(format!("answered by {b}, not {backend}")),
                        Err(e) => log.broken = Some(format!("{e:#}")),
                    }
                    if !counted && (after_event || log.broken.is_some()) {
                        counted = true;
                        settled.fetch_add(1, Ordering::Relaxed);
                    }
                    if log.broken.is_some() {
                        break;
                    }
                    thread::sleep(PACE);
                }
                log
            }));
        }
        Ok(load)
    }

    /// Marks now as the event.
    fn mark(&self) -> Instant {
        *self.event.get_or_init(Instant::now)
    }

    /// Waits (bounded) until every connection answered after the event `at` (or broke),
    /// keeps the traffic on for [`MARGIN`], stops it and sums up.
    fn finish(mut self, at: Instant) -> anyhow::Result<Conns> {
        let deadline = at + CONVERGE_LIMIT;
        while self.settled.load(Ordering::Relaxed) < self.threads.len() {
            if Instant::now() > deadline {
                bail!(
                    "{} of {} connections answered again within {CONVERGE_LIMIT:?}",
                    self.settled.load(Ordering::Relaxed),
                    self.threads.len()
                );
            }
            thread::sleep(POLL);
        }
        thread::sleep(MARGIN);
        self.stop.store(true, Ordering::Relaxed);
        let mut logs = Vec::with_capacity(self.threads.len());
        for t in std::mem::take(&mut self.threads) {
            logs.push(
                t.join()
                    .map_err(|_| anyhow::anyhow!("a connection's thread panicked"))?,
            );
        }
        let mut recovered: f64 = 0.0;
        let mut slowest: f64 = 0.0;
        let mut broken = 0;
        for log in &logs {
            if log.broken.is_some() {
                broken += 1;
                continue;
            }
            let first = log
                .samples
                .iter()
                .find(|(sent, _)| *sent >= at)
                .context("a connection sent no request after the event")?;
            let mut answering = first.1.duration_since(at);
            for (sent, answered) in log.samples.iter().filter(|(_, a)| *a >= at) {
                let took = answered.duration_since(*sent);
                slowest = slowest.max(took.as_secs_f64());
                // A stall (also one that began after the event) ends with its answer.
                if took > STALL {
                    answering = answering.max(answered.duration_since(at));
                }
            }
            recovered = recovered.max(answering.as_secs_f64());
        }
        if let Some(why) = logs.iter().find_map(|l| l.broken.as_deref()) {
            eprintln!("announce:   {broken} connection(s) broke, e.g.: {why}");
        }
        Ok(Conns {
            recovered,
            slowest,
            broken,
        })
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        // Each thread ends within one request (at most REQUEST_TIMEOUT).
        self.stop.store(true, Ordering::Relaxed);
    }
}
