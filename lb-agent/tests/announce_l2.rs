//! End to end, L2 announcement with failover: three load-balancer nodes (the real agent
//! binary, `announce: l2`) share one IPv4 and one IPv6 VIP on the client's own segment; the
//! client finds the VIPs by ARP / Neighbor Discovery alone. Exactly one node must answer for
//! each VIP; when it dies (agent SIGKILLed and link down) another takes the VIP over within
//! 3 s, moves the client's neighbour entry with gratuitous ARP / unsolicited NA, and every
//! established TCP connection keeps its backend (the new owner decides by Maglev, as the
//! old one did), also when the dead node comes back. Needs root.
//!
//! `l2_killed_agent_falls_silent_when_its_vips_move`: only the owner's agent is SIGKILLed,
//! its link and attached program stay up; its answer lease runs out `dead_after` after its
//! last heartbeat, when the others take the VIP over, so exactly one node answers at any
//! time; its agent restarted adopts the pins and renews the lease again.
//!
//! `lab_resolves_vips_by_arp_and_ndp_alone` checks the lab itself, with the kernel of a node
//! standing in for the agent.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
    sync::{Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use lb_common::{Reason, maps};
use lb_testkit::{
    L2Lab, L2LabSpec, NetNs, TcpSession,
    l2lab::{neighbor_advertisement, send_frame},
    lab::{HOST_IFACE, fmt_mac},
    list_netns,
    packet::{BROADCAST_MAC, PacketBuilder, arp_reply},
    require_root, tcp_connections,
};

/// Long-lived connections opened before the failover.
const CONNECTIONS: usize = 30;
/// The longest a failover may take, from the kill to the first answered new connection.
const FAILOVER_LIMIT: Duration = Duration::from_secs(3);
/// A new probe connection this often while waiting for the failover.
const PROBE_EVERY: Duration = Duration::from_millis(50);
/// How long one probe connection may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long the probing goes on before giving up.
const PROBE_WINDOW: Duration = Duration::from_secs(10);
/// How long the nodes may take to agree on one owner (at start, and after a node returns).
const SETTLE_LIMIT: Duration = Duration::from_secs(15);
/// How long the owner must stay the same after a node returned before it counts as final
/// (the returning node first listens, then may take its VIPs back).
const RETURN_STABLE: Duration = Duration::from_secs(3);
/// How long the client's neighbour entry may take to follow the owner (gratuitous ARP / NA
/// are repeated for 2 s).
const NEIGHBOUR_LIMIT: Duration = Duration::from_secs(5);
/// Request timeout on the long-lived connections.
const TIMEOUT: Duration = Duration::from_secs(2);

/// One test at a time: a failover test starts three agents and times a failover, which a
/// second lab on the same two CPUs would make needlessly noisy.
static SERIAL: Mutex<()> = Mutex::new(());

fn spec() -> L2LabSpec {
    L2LabSpec::new(env!("CARGO_BIN_EXE_lb-agent"))
}

#[test]
fn l2_failover_ipv4() {
    failover(false);
}

#[test]
fn l2_failover_ipv6() {
    failover(true);
}

fn failover(ipv6: bool) {
    require_root().unwrap();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let family = if ipv6 { "IPv6" } else { "IPv4" };
    let mut lab = L2Lab::start(spec()).unwrap();
    let service = lab.service(ipv6);
    let vip = service.ip();

    // 1. One owner answers for the VIP, and the client's entry names it.
    let reach = wait_reachable(lab.client(), service);
    // The agents start one after another: ownership settles once all have heard each other.
    let owner = lab
        .wait_stable_answerer(vip, RETURN_STABLE, SETTLE_LIMIT)
        .unwrap();
    wait_client_entry(&lab, vip, owner);
    assert_only_owner_answers(&lab, vip, owner);
    println!(
        "{family}: VIP {vip} reachable after {:.2?} of probing; owner {} (the only node answering)",
        reach,
        lab.describe_mac(lab.nodes()[owner].mac)
    );

    // 2. Long-lived connections, each on its backend.
    let mut sessions = open_sessions(lab.client(), service);
    println!(
        "{family}: {CONNECTIONS} connections over backends {}",
        spread(&sessions)
    );

    // 3. The owner dies: link down (its attached program cannot answer either) and agent
    // SIGKILLed (no goodbye to the other nodes).
    let killed_at = Instant::now();
    lab.link_down(owner).unwrap();
    lab.kill_agent(owner).unwrap();
    let probe = probe_until_answered(lab.client(), service, killed_at);
    let failover = probe.first_reply.unwrap_or_else(|| {
        panic!(
            "{family}: no new connection answered within {PROBE_WINDOW:?} of killing {} \
             ({} probes); client entry: {:?}",
            lab.nodes()[owner].name,
            probe.sent,
            lab.client_neighbour(vip)
        )
    });
    let entry = lab.client_neighbour(vip).unwrap();
    println!(
        "{family}: failover {failover:.2?} after the kill ({} probes, {} answered); client \
         entry then: {entry:?}",
        probe.sent, probe.answered
    );
    let moved_to = entry
        .as_ref()
        .and_then(|e| e.mac)
        .and_then(|mac| lab.node_by_mac(mac));
    assert!(
        moved_to.is_some_and(|i| i != owner),
        "{family}: after the failover the client's entry for {vip} names another node: {entry:?}"
    );
    assert!(
        failover < FAILOVER_LIMIT,
        "{family}: failover took {failover:.2?}, more than {FAILOVER_LIMIT:?}"
    );
    let new_owner = lab.wait_single_answerer(vip, SETTLE_LIMIT).unwrap();
    assert_ne!(new_owner, owner, "{family}: the dead node cannot answer");
    wait_client_entry(&lab, vip, new_owner);
    assert_only_owner_answers(&lab, vip, new_owner);
    println!(
        "{family}: new owner {}",
        lab.describe_mac(lab.nodes()[new_owner].mac)
    );

    // 4. Every established connection still answers, from its backend.
    let broken = broken_sessions(&mut sessions);
    println!(
        "{family}: after the failover {} of {CONNECTIONS} connections work, {} broken",
        CONNECTIONS - broken.len(),
        broken.len()
    );
    assert!(
        broken.is_empty(),
        "{family}: connections broken by the failover:\n{}",
        broken.join("\n")
    );

    // 5. The node comes back; ownership may move back to it (rendezvous), and still no
    // connection breaks.
    let back_at = Instant::now();
    lab.link_up(owner).unwrap();
    lab.start_agent(owner).unwrap();
    let final_owner = lab
        .wait_stable_answerer(vip, RETURN_STABLE, SETTLE_LIMIT)
        .unwrap();
    wait_client_entry(&lab, vip, final_owner);
    assert_only_owner_answers(&lab, vip, final_owner);
    let settled = back_at.elapsed();
    let broken = broken_sessions(&mut sessions);
    println!(
        "{family}: {} back; owner {} ({}) {settled:.2?} after; {} of {CONNECTIONS} \
         connections work, {} broken",
        lab.nodes()[owner].name,
        lab.describe_mac(lab.nodes()[final_owner].mac),
        if final_owner == owner {
            "moved back"
        } else {
            "stayed"
        },
        CONNECTIONS - broken.len(),
        broken.len()
    );
    print_announcement_facts(&lab);
    assert!(
        broken.is_empty(),
        "{family}: connections broken when {} came back:\n{}",
        lab.nodes()[owner].name,
        broken.join("\n")
    );
    // New connections work too.
    let fresh = tcp_connections(lab.client(), service, 10, TIMEOUT).unwrap();
    assert!(
        fresh.iter().all(|r| r.answered()),
        "{family}: new connections after the return: {fresh:?}"
    );
}

/// How long one round of asking who answers listens, while watching a takeover.
const WATCH_LISTEN: Duration = Duration::from_millis(60);
/// While watching a takeover, the VIPs that do not move are asked about every this many
/// rounds (the ones that move, every round).
const WATCH_OTHERS_EVERY: usize = 4;
/// How long after `dead_after` the takeover is watched.
const WATCH_AFTER: Duration = Duration::from_secs(2);
/// Slack on "silent `dead_after` after the kill": a tick of jiffies, and the time between
/// reading the clock and the request leaving.
const SILENCE_SLACK: Duration = Duration::from_millis(50);

/// One round of [`watch_answers`]: when the request was about to be sent (since the kill),
/// for which VIP, and who answered it.
struct Round {
    at: Duration,
    vip: IpAddr,
    answers: Vec<[u8; 6]>,
}

/// Asks who answers for each of `focus` in turn, and every [`WATCH_OTHERS_EVERY`] turns
/// for each of `others` too, from `since` until `until` after it.
fn watch_answers(
    lab: &L2Lab,
    focus: &[IpAddr],
    others: &[IpAddr],
    since: Instant,
    until: Duration,
) -> Vec<Round> {
    let mut rounds = Vec::new();
    for turn in 0.. {
        if since.elapsed() >= until {
            break;
        }
        let extra = if turn % WATCH_OTHERS_EVERY == 0 {
            others
        } else {
            &[]
        };
        for vip in focus.iter().chain(extra) {
            let at = since.elapsed();
            let answers = lab.who_answers(*vip, WATCH_LISTEN).unwrap();
            rounds.push(Round {
                at,
                vip: *vip,
                answers,
            });
        }
    }
    rounds
}

/// The answer lease in node `i`'s pins, read twice `gap` apart.
fn lease_twice(lab: &L2Lab, i: usize, gap: Duration) -> (u64, u64) {
    let first = lab.pinned_u64(i, maps::L2_LEASE).unwrap();
    thread::sleep(gap);
    (first, lab.pinned_u64(i, maps::L2_LEASE).unwrap())
}

#[test]
fn l2_killed_agent_falls_silent_when_its_vips_move() {
    require_root().unwrap();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let spec = spec();
    let dead_after = Duration::from_millis(spec.membership.dead_after_ms);
    let interval = Duration::from_millis(spec.membership.interval_ms);
    let mut lab = L2Lab::start(spec).unwrap();
    let services = [lab.service(false), lab.service(true)];
    let vips = services.map(|s| s.ip());

    // 1. Settled: one owner per VIP (the victim: the IPv4 VIP's), each the only one
    // answering, and connections open on both.
    for s in services {
        wait_reachable(lab.client(), s);
    }
    let owners = vips.map(|vip| {
        lab.wait_stable_answerer(vip, RETURN_STABLE, SETTLE_LIMIT)
            .unwrap()
    });
    for (vip, owner) in vips.iter().zip(owners) {
        wait_client_entry(&lab, *vip, owner);
        assert_only_owner_answers(&lab, *vip, owner);
    }
    let victim = owners[0];
    let name = lab.nodes()[victim].name.clone();
    let mut sessions: Vec<_> = services
        .iter()
        .map(|s| open_sessions(lab.client(), *s))
        .collect();
    println!(
        "owners: {} for {}, {} for {}; {CONNECTIONS} connections each",
        lab.describe_mac(lab.nodes()[owners[0]].mac),
        vips[0],
        lab.describe_mac(lab.nodes()[owners[1]].mac),
        vips[1]
    );
    // A running agent renews its lease with every heartbeat.
    let (a, b) = lease_twice(&lab, victim, interval * 3);
    assert!(b > a, "{name}'s lease renewed: {a} then {b}");

    // 2. Only the agent dies: link up, program attached, pins kept.
    let killed_at = Instant::now();
    lab.kill_agent(victim).unwrap();
    let last_lease = lab.pinned_u64(victim, maps::L2_LEASE).unwrap();
    let owned_by = |dead: bool| -> Vec<IpAddr> {
        vips.iter()
            .zip(owners)
            .filter(|(_, o)| (*o == victim) == dead)
            .map(|(v, _)| *v)
            .collect()
    };
    let (moving, staying) = (owned_by(true), owned_by(false));
    let rounds = watch_answers(&lab, &moving, &staying, killed_at, dead_after + WATCH_AFTER);

    // 3. Never two answers; the victim silent from `dead_after` after the kill on (its last
    // renewal was at most then), and a new owner answering once it is.
    let victim_mac = lab.nodes()[victim].mac;
    for r in &rounds {
        let who: Vec<String> = r.answers.iter().map(|m| lab.describe_mac(*m)).collect();
        assert!(
            r.answers.len() <= 1,
            "{:.0?} after killing {name}'s agent, several nodes answered for {}: {who:?}",
            r.at,
            r.vip
        );
        if r.answers.contains(&victim_mac) {
            assert!(
                r.at < dead_after + SILENCE_SLACK,
                "{name} still answered for {} {:.0?} after its agent died (dead_after \
                 {dead_after:?})",
                r.vip,
                r.at
            );
        }
    }
    for (vip, owner) in vips.iter().zip(owners) {
        let of_vip: Vec<&Round> = rounds.iter().filter(|r| r.vip == *vip).collect();
        if owner != victim {
            assert!(
                of_vip.iter().all(|r| r.answers == [lab.nodes()[owner].mac]),
                "{vip}'s owner {} answered throughout, alone",
                lab.nodes()[owner].name
            );
            println!(
                "{vip}: owner {} answered throughout",
                lab.nodes()[owner].name
            );
            continue;
        }
        let last_heard = of_vip
            .iter()
            .rev()
            .find(|r| r.answers.contains(&victim_mac))
            .map(|r| r.at);
        let silent = of_vip
            .iter()
            .find(|r| last_heard.is_none_or(|t| r.at > t))
            .map(|r| r.at);
        let taken = of_vip
            .iter()
            .find(|r| r.answers.iter().any(|m| *m != victim_mac))
            .map(|r| r.at);
        let ms =
            |t: Option<Duration>| t.map_or("never".to_owned(), |t| format!("{} ms", t.as_millis()));
        println!(
            "{vip}: old owner {name} last answered {} after the kill, silent from {} on \
             (lease ran out; dead_after {} ms); a new owner first answered {} after \
             ({} rounds of {} ms)",
            ms(last_heard),
            ms(silent),
            dead_after.as_millis(),
            ms(taken),
            of_vip.len(),
            WATCH_LISTEN.as_millis()
        );
        assert!(
            taken.is_some(),
            "nobody took {vip} over within {:?} of the kill",
            dead_after + WATCH_AFTER
        );
    }
    let new_owners = vips.map(|vip| lab.wait_single_answerer(vip, SETTLE_LIMIT).unwrap());
    for (vip, (owner, new_owner)) in vips.iter().zip(owners.iter().zip(new_owners)) {
        if *owner == victim {
            assert_ne!(new_owner, victim, "{vip}: {name}'s agent is dead");
        } else {
            assert_eq!(new_owner, *owner, "{vip} stays where it was");
        }
        wait_client_entry(&lab, *vip, new_owner);
        // On the wire and by every node's counters, the victim's pins included.
        assert_only_owner_answers(&lab, *vip, new_owner);
    }
    assert_eq!(
        lab.pinned_u64(victim, maps::L2_LEASE).unwrap(),
        last_lease,
        "nobody renews a dead agent's lease"
    );
    for (s, sessions) in services.iter().zip(&mut sessions) {
        let broken = broken_sessions(sessions);
        println!(
            "{s}: after the takeover {} of {CONNECTIONS} connections work, {} broken",
            CONNECTIONS - broken.len(),
            broken.len()
        );
        assert!(broken.is_empty(), "{s}: broken:\n{}", broken.join("\n"));
    }

    // 4. The agent restarts over its pins: it adopts the attached program, renews the
    // lease again, and ownership settles with one node answering per VIP.
    let back_at = Instant::now();
    lab.start_agent(victim).unwrap();
    let log = lab.agent_log(victim);
    let restart = log.rsplit("(start ").next().unwrap_or_default();
    assert!(
        restart.contains("adopted=true"),
        "the restarted agent adopts the pinned link:\n{restart}"
    );
    let (a, b) = lease_twice(&lab, victim, interval * 3);
    assert!(
        a > last_lease && b > a,
        "{name}'s lease renewed after the restart: {last_lease}, then {a}, {b}"
    );
    let finals = vips.map(|vip| {
        lab.wait_stable_answerer(vip, RETURN_STABLE, SETTLE_LIMIT)
            .unwrap()
    });
    for (vip, owner) in vips.iter().zip(finals) {
        wait_client_entry(&lab, *vip, owner);
        assert_only_owner_answers(&lab, *vip, owner);
        println!(
            "{vip}: owner after {name}'s return: {} ({:.2?} after the restart)",
            lab.describe_mac(lab.nodes()[owner].mac),
            back_at.elapsed()
        );
    }
    for (s, sessions) in services.iter().zip(&mut sessions) {
        let broken = broken_sessions(sessions);
        println!(
            "{s}: after the return {} of {CONNECTIONS} connections work, {} broken",
            CONNECTIONS - broken.len(),
            broken.len()
        );
        assert!(broken.is_empty(), "{s}: broken:\n{}", broken.join("\n"));
        let fresh = tcp_connections(lab.client(), *s, 10, TIMEOUT).unwrap();
        assert!(
            fresh.iter().all(|r| r.answered()),
            "{s}: new connections: {fresh:?}"
        );
    }
}

/// Waits (bounded) until a new connection to `service` is answered; returns how long it
/// took.
fn wait_reachable(client: &NetNs, service: SocketAddr) -> Duration {
    let start = Instant::now();
    let probe = probe_until_answered(client, service, start);
    probe.first_reply.unwrap_or_else(|| {
        panic!(
            "{service} not reachable within {PROBE_WINDOW:?} of the agents attaching ({} probes)",
            probe.sent
        )
    })
}

/// Waits (bounded) until the client's neighbour entry for `vip` carries node `i`'s MAC.
fn wait_client_entry(lab: &L2Lab, vip: IpAddr, i: usize) {
    let want = lab.nodes()[i].mac;
    let deadline = Instant::now() + NEIGHBOUR_LIMIT;
    loop {
        let entry = lab.client_neighbour(vip).unwrap();
        if entry.as_ref().and_then(|e| e.mac) == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the client's entry for {vip} should name the owner {} within {NEIGHBOUR_LIMIT:?}, \
             but is {entry:?} ({})",
            lab.describe_mac(want),
            entry
                .as_ref()
                .and_then(|e| e.mac)
                .map_or_else(|| "unresolved".to_owned(), |m| lab.describe_mac(m))
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// What [`probe_until_answered`] saw.
struct Probe {
    /// From `since` to the first answer.
    first_reply: Option<Duration>,
    /// Probe connections started.
    sent: usize,
    /// Of those, answered (the ones in flight at the first answer are waited for).
    answered: usize,
}

/// Starts a new connection to `service` every [`PROBE_EVERY`] (each on its own thread, at
/// most [`PROBE_TIMEOUT`] long) until one is answered or [`PROBE_WINDOW`] has passed since
/// `since`.
fn probe_until_answered(client: &NetNs, service: SocketAddr, since: Instant) -> Probe {
    let (tx, rx) = mpsc::channel::<bool>();
    let deadline = since + PROBE_WINDOW;
    thread::scope(|scope| {
        let mut sent = 0;
        let mut answered = 0;
        let mut first_reply = None;
        let mut next = Instant::now();
        while first_reply.is_none() && Instant::now() < deadline {
            if Instant::now() >= next {
                let tx = tx.clone();
                scope.spawn(move || {
                    let ok = tcp_connections(client, service, 1, PROBE_TIMEOUT)
                        .is_ok_and(|r| r.iter().all(|r| r.answered()));
                    // The receiver outlives every probe (the scope joins them first).
                    let _ = tx.send(ok);
                });
                sent += 1;
                next += PROBE_EVERY;
            }
            let wait = next.min(deadline).saturating_duration_since(Instant::now());
            if let Ok(true) = rx.recv_timeout(wait) {
                answered += 1;
                first_reply = Some(since.elapsed());
            }
        }
        drop(tx);
        // Count the probes still in flight (each ends within PROBE_TIMEOUT).
        answered += rx.iter().filter(|ok| *ok).count();
        Probe {
            first_reply,
            sent,
            answered,
        }
    })
}

/// Opens [`CONNECTIONS`] connections and records each one's backend.
fn open_sessions(client: &NetNs, service: SocketAddr) -> Vec<(TcpSession, String)> {
    TcpSession::open_many(client, service, CONNECTIONS, TIMEOUT).unwrap_or_else(|e| panic!("{e:#}"))
}

/// One request on every connection; a line for each that failed or moved.
fn broken_sessions(sessions: &mut [(TcpSession, String)]) -> Vec<String> {
    sessions
        .iter_mut()
        .filter_map(|(s, before)| match s.request() {
            Ok(now) if now == *before => None,
            Ok(now) => Some(format!(
                "port {}: moved from {before} to {now}",
                s.local_port
            )),
            Err(e) => Some(format!("port {} (on {before}): {e:#}", s.local_port)),
        })
        .collect()
}

/// `b1: 9, b2: 11, b3: 10`.
fn spread(sessions: &[(TcpSession, String)]) -> String {
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for (_, b) in sessions {
        *counts.entry(b).or_default() += 1;
    }
    let mut out = String::new();
    for (b, n) in counts {
        let _ = write!(out, "{}{b}: {n}", if out.is_empty() { "" } else { ", " });
    }
    out
}

/// The data-plane reason that counts the answers of one family.
fn answer_reason(ipv6: bool) -> &'static str {
    if ipv6 {
        Reason::TxNeighborAdvert.name()
    } else {
        Reason::TxArpReply.name()
    }
}

/// Each node's count of `reason` (from its pins; a node never started counts 0).
fn counted(lab: &L2Lab, reason: &str) -> Vec<u64> {
    (0..lab.nodes().len())
        .map(|i| {
            lab.status_json(i)
                .map(|s| s["reasons"][reason]["packets"].as_u64().unwrap_or(0))
                .unwrap_or(0)
        })
        .collect()
}

/// One ARP request / Neighbor Solicitation from the client: only `owner` answers it, seen
/// on the wire and in every node's data-plane counters.
fn assert_only_owner_answers(lab: &L2Lab, vip: IpAddr, owner: usize) {
    let reason = answer_reason(vip.is_ipv6());
    let before = counted(lab, reason);
    let answers = lab.who_answers(vip, Duration::from_millis(300)).unwrap();
    let after = counted(lab, reason);
    let answered: Vec<String> = answers.iter().map(|m| lab.describe_mac(*m)).collect();
    assert_eq!(
        answers,
        vec![lab.nodes()[owner].mac],
        "only {} answers for {vip}: {answered:?}",
        lab.nodes()[owner].name
    );
    for (i, node) in lab.nodes().iter().enumerate() {
        let delta = after[i] - before[i];
        if i == owner {
            assert!(delta >= 1, "{} counted no {reason} for {vip}", node.name);
        } else {
            assert_eq!(delta, 0, "{} counted {reason} for {vip}", node.name);
        }
    }
}

/// What each node says about announcing, for the record: its answer counters and its
/// ownership log lines.
fn print_announcement_facts(lab: &L2Lab) {
    for (i, node) in lab.nodes().iter().enumerate() {
        let counters = match lab.status_json(i) {
            Ok(status) => [false, true]
                .map(|v6| {
                    let r = answer_reason(v6);
                    format!("{r}={}", status["reasons"][r]["packets"])
                })
                .join(" "),
            Err(e) => format!("(status: {e:#})"),
        };
        let log = lab.agent_log(i);
        let owner_lines = log.lines().filter(|l| l.contains("l2 owner")).count();
        let announcing = log.lines().filter(|l| l.contains("announcing")).count();
        println!(
            "{}: counters [{counters}]; log: {owner_lines} `l2 owner` lines, {announcing} `announcing`",
            node.name
        );
    }
}

/// Frames sent to a dead node's MAC in the lab test.
const FLOOD_PROBES: u64 = 50;

/// Frames received on `eth0` in `ns`, whatever their destination.
fn rx_packets(ns: &NetNs) -> u64 {
    let out = ns
        .ip(&["-j", "-s", "link", "show", "dev", HOST_IFACE])
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    json[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no rx counter in {out}"))
}

/// The lab without agents: nobody answers for the VIPs (the backends hold them on `lo` but
/// stay silent), the client has no route for them, a node whose kernel holds a VIP is found
/// by ARP / NDP alone, a node whose link is down is not (nor do frames to its MAC reach the
/// others), its addresses survive the link coming back, and a gratuitous ARP / unsolicited NA moves the client's entry: what the
/// failover test relies on.
#[test]
fn lab_resolves_vips_by_arp_and_ndp_alone() {
    require_root().unwrap();
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let lab = L2Lab::new(spec()).unwrap();
    let names = lab.netns_names();
    let listed = list_netns().unwrap();
    assert!(names.iter().all(|n| listed.contains(n)), "{names:?}");
    let (vip4, vip6) = (IpAddr::V4(lab.vip()), IpAddr::V6(lab.vip6()));
    let listen = Duration::from_millis(300);

    for vip in [vip4, vip6] {
        let route = lab
            .client()
            .ip(&["route", "get", &vip.to_string()])
            .unwrap();
        assert!(
            !route.contains(" via "),
            "the client reaches {vip} on-link: {route}"
        );
        assert!(lab.who_answers(vip, listen).unwrap().is_empty(), "{vip}");
        assert_eq!(lab.client_neighbour(vip).unwrap(), None);
    }

    // lb2's kernel holds the IPv4 VIP, lb3's the IPv6 one, each with a server on it.
    let (lb1, lb2, lb3) = (&lab.nodes()[0], &lab.nodes()[1], &lab.nodes()[2]);
    lb2.ns
        .ip(&["addr", "add", &format!("{vip4}/32"), "dev", HOST_IFACE])
        .unwrap();
    lb3.ns
        .ip(&[
            "-6",
            "addr",
            "add",
            &format!("{vip6}/128"),
            "dev",
            HOST_IFACE,
            "nodad",
        ])
        .unwrap();
    let servers = [(lb2, vip4), (lb3, vip6)].map(|(n, vip)| {
        lb_testkit::EchoServer::start(&n.ns, &n.name, lab.service(vip.is_ipv6())).unwrap()
    });
    for (vip, node) in [(vip4, lb2), (vip6, lb3)] {
        assert_eq!(
            lab.who_answers(vip, listen).unwrap(),
            vec![node.mac],
            "{vip}"
        );
        let replies =
            tcp_connections(lab.client(), lab.service(vip.is_ipv6()), 3, TIMEOUT).unwrap();
        assert!(
            replies
                .iter()
                .all(|r| r.backend.as_deref() == Some(&node.name)),
            "{replies:?}"
        );
        let entry = lab.client_neighbour(vip).unwrap().unwrap();
        assert_eq!(entry.mac, Some(node.mac), "{vip}: {entry:?}");
    }

    // Link down: silent, and frames still sent to its MAC reach no other node (as a NIC
    // would drop them; generic XDP would see them). Link up: both addresses kept,
    // answering again.
    for (vip, i) in [(vip4, 1), (vip6, 2)] {
        lab.link_down(i).unwrap();
        assert!(lab.who_answers(vip, listen).unwrap().is_empty(), "{vip}");
        let others: Vec<&NetNs> = (0..lab.nodes().len())
            .filter(|&j| j != i)
            .map(|j| &lab.nodes()[j].ns)
            .collect();
        let before: Vec<u64> = others.iter().map(|ns| rx_packets(ns)).collect();
        let to_dead = PacketBuilder::new()
            .eth(lab.client_mac(), lab.nodes()[i].mac)
            .ipv4(lab.client_addr(), lab.vip())
            .udp(40000, 80, b"to a dead node")
            .build();
        for _ in 0..FLOOD_PROBES {
            send_frame(lab.client(), HOST_IFACE, &to_dead).unwrap();
        }
        for (ns, before) in others.iter().zip(before) {
            let got = rx_packets(ns) - before;
            assert!(
                got < FLOOD_PROBES / 2,
                "{} received {got} of {FLOOD_PROBES} frames to a dead node's MAC",
                ns.name()
            );
        }
        lab.link_up(i).unwrap();
        let node = &lab.nodes()[i];
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if lab.who_answers(vip, listen).unwrap() == vec![node.mac] {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{} silent after link up",
                node.name
            );
        }
        let addrs = node.ns.ip(&["addr", "show", "dev", HOST_IFACE]).unwrap();
        for addr in [node.addr.to_string(), node.addr6().to_string()] {
            assert!(addrs.contains(&addr), "{addr} kept: {addrs}");
        }
    }

    // A takeover by hand: lb1 sends a gratuitous ARP / unsolicited NA for each VIP, and
    // the client's entry moves to it, however recently it was confirmed.
    let garp = arp_reply(lb1.mac, lab.vip(), BROADCAST_MAC, lab.vip());
    let all_nodes = "ff02::1".parse().unwrap();
    let na = neighbor_advertisement(
        lb1.mac,
        lb1.addr6(),
        all_nodes,
        [0x33, 0x33, 0, 0, 0, 1],
        lab.vip6(),
        false,
    );
    for (vip, frame) in [(vip4, garp), (vip6, na)] {
        tcp_connections(lab.client(), lab.service(vip.is_ipv6()), 1, TIMEOUT).unwrap();
        let sent = Instant::now();
        send_frame(&lb1.ns, HOST_IFACE, &frame).unwrap();
        loop {
            let entry = lab.client_neighbour(vip).unwrap();
            if entry.as_ref().and_then(|e| e.mac) == Some(lb1.mac) {
                println!(
                    "{vip}: client entry moved to lb1 {:.2?} after one announcement: {entry:?}",
                    sent.elapsed()
                );
                break;
            }
            assert!(
                sent.elapsed() < Duration::from_secs(1),
                "{vip}: the client ignored the announcement from {}: {entry:?}",
                fmt_mac(lb1.mac)
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    drop(servers);
    drop(lab);
    let listed = list_netns().unwrap();
    for name in &names {
        assert!(!listed.contains(name), "namespace {name} left behind");
    }
}
