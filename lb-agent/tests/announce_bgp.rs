//! End to end over BGP: a client reaches the VIP through a router that spreads it with ECMP
//! (L4 hashing) over every load-balancer node announcing it, each node running the real
//! agent in `announce: bgp` mode beside its own BIRD 2 ([`lb_testkit::bgplab`]).
//!
//! Every change of the router's next-hop set rehashes some connections onto another node.
//! That node may never have seen them, and must send them to the same backend as before
//! (Maglev is the same on every node), so no connection breaks: not when a node dies
//! (SIGKILL of agent and BIRD), comes back, joins, or leaves cleanly (SIGTERM: the route is
//! withdrawn while the agent still forwards). Needs root and `bird`/`birdc` (bird2).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use lb_testkit::{
    TcpSession,
    bgplab::{BgpLab, BgpLabSpec},
    require_root,
};

/// A request that takes longer than this counts as a broken connection.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the router may take to reach the expected next hops.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Long-lived connections opened at the start.
const CONNECTIONS: usize = 40;
/// New connections opened in every later step (and kept for the steps after).
const NEW_PER_STEP: usize = 20;

/// One long-lived connection and the backend it reached first.
struct Conn {
    session: TcpSession,
    backend: String,
}

/// What one step saw.
struct Step {
    name: &'static str,
    nexthops: Vec<Ipv4Addr>,
    converged: Option<Duration>,
    ok: usize,
    broken: usize,
    new_ok: usize,
    /// Nodes whose service counters moved during the step's traffic, with the packets.
    carried: BTreeMap<String, u64>,
}

impl Step {
    fn row(&self) -> String {
        let hops: Vec<String> = self.nexthops.iter().map(Ipv4Addr::to_string).collect();
        let carried: Vec<String> = self
            .carried
            .iter()
            .map(|(n, p)| format!("{n}({p})"))
            .collect();
        format!(
            "| {:<22} | {:<44} | {:>9} | {:>3} / {:<3} | {:>3} | {}",
            self.name,
            hops.join(" "),
            self.converged
                .map_or_else(|| "-".into(), |d| format!("{} ms", d.as_millis())),
            self.ok,
            self.broken,
            self.new_ok,
            carried.join(" ")
        )
    }
}

fn header() -> String {
    format!(
        "| {:<22} | {:<44} | {:>9} | {:>9} | {:>3} | LB nodes that carried packets\n",
        "step", "router next hops for the VIP", "converged", "ok / brk", "new"
    )
}

/// Opens `n` connections from the client, one request on each.
fn open(lab: &BgpLab, n: usize) -> Result<Vec<Conn>> {
    (0..n)
        .map(|k| {
            let mut session = TcpSession::connect(lab.client(), lab.service(), REQUEST_TIMEOUT)
                .with_context(|| format!("opening connection {k}"))?;
            let backend = session
                .request()
                .with_context(|| format!("first request on connection {k}"))?;
            Ok(Conn { session, backend })
        })
        .collect()
}

/// One request on every connection at once; returns the description of each broken one
/// (failed, timed out, or answered by another backend).
fn check(conns: &mut [Conn]) -> Vec<String> {
    thread::scope(|s| {
        let handles: Vec<_> = conns
            .iter_mut()
            .map(|c| {
                s.spawn(move || {
                    let port = c.session.local_port;
                    match c.session.request() {
                        Ok(b) if b == c.backend => None,
                        Ok(b) => Some(format!("port {port}: {} -> {b}", c.backend)),
                        Err(e) => Some(format!("port {port} (on {}): {e:#}", c.backend)),
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().unwrap_or_else(|_| Some("checker panicked".into())))
            .collect()
    })
}

/// Every node's service packet counter, by name.
fn counters(lab: &BgpLab) -> Result<BTreeMap<String, u64>> {
    lab.nodes()
        .iter()
        .enumerate()
        .map(|(i, n)| Ok((n.name.clone(), lab.service_packets(i)?)))
        .collect()
}

/// The nodes whose counters moved between `before` and `after` (a node new in `after`
/// counts from zero).
fn carried(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .filter_map(|(n, a)| {
            let d = a.saturating_sub(before.get(n).copied().unwrap_or(0));
            (d > 0).then(|| (n.clone(), d))
        })
        .collect()
}

/// The checks after a change: every connection still answers from its backend, then
/// `NEW_PER_STEP` new connections work (and join the pool).
fn after_change(
    lab: &BgpLab,
    conns: &mut Vec<Conn>,
    name: &'static str,
    converged: Duration,
) -> Result<Step> {
    let before = counters(lab)?;
    let broken = check(conns);
    let fresh = open(lab, NEW_PER_STEP).with_context(|| format!("{name}: new connections"))?;
    let after = counters(lab)?;
    let step = Step {
        name,
        nexthops: lab.nexthops()?,
        converged: Some(converged),
        ok: conns.len() - broken.len(),
        broken: broken.len(),
        new_ok: fresh.len(),
        carried: carried(&before, &after),
    };
    println!("{}\n{}", header().trim_end(), step.row());
    ensure!(
        broken.is_empty(),
        "{name}: {} of {} connections broke:\n  {}",
        broken.len(),
        conns.len(),
        broken.join("\n  ")
    );
    conns.extend(fresh);
    Ok(step)
}

fn run(lab: &mut BgpLab, steps: &mut Vec<Step>) -> Result<()> {
    let (lb1, lb2, lb3) = (0, 1, 2);

    // 1. Three nodes announce the VIP: the router has three next hops.
    let t = Instant::now();
    lab.wait_nexthops(&lab.node_addrs(&[lb1, lb2, lb3]), CONVERGE_TIMEOUT)?;
    let up = t.elapsed();
    steps.push(Step {
        name: "3 nodes up",
        nexthops: lab.nexthops()?,
        converged: Some(up),
        ok: 0,
        broken: 0,
        new_ok: 0,
        carried: BTreeMap::new(),
    });
    println!("{}\n{}", header().trim_end(), steps[0].row());

    // 2. Long-lived connections, spread over the nodes by the router's hash.
    let before = counters(lab)?;
    let mut conns = open(lab, CONNECTIONS)?;
    let after = counters(lab)?;
    let ports: BTreeSet<u16> = conns.iter().map(|c| c.session.local_port).collect();
    ensure!(
        ports.len() == CONNECTIONS,
        "distinct source ports: {ports:?}"
    );
    let mut per_backend: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &conns {
        *per_backend.entry(c.backend.as_str()).or_default() += 1;
    }
    let step = Step {
        name: "40 connections",
        nexthops: lab.nexthops()?,
        converged: None,
        ok: conns.len(),
        broken: 0,
        new_ok: 0,
        carried: carried(&before, &after),
    };
    println!("{}\nbackends: {per_backend:?}", step.row());
    ensure!(
        step.carried.len() > 1,
        "ECMP spread the connections over more than one node: {:?}",
        step.carried
    );
    steps.push(step);

    // 3. lb2 dies: agent and BIRD, SIGKILL. Its session drops, the router rehashes.
    let t = Instant::now();
    lab.kill_node(lb2)?;
    lab.wait_nexthops(&lab.node_addrs(&[lb1, lb3]), CONVERGE_TIMEOUT)?;
    let converged = t.elapsed();
    println!("lb2 killed: 2 next hops after {} ms", converged.as_millis());
    let step = after_change(lab, &mut conns, "lb2 killed", converged)?;
    ensure!(
        !step.carried.contains_key("lb2"),
        "lb2 carried packets after its route was gone: {:?}",
        step.carried
    );
    steps.push(step);

    // 4. lb2 comes back (its agent adopts the pinned maps): three next hops again, and
    //    connections hash back onto it mid-flight.
    let t = Instant::now();
    lab.start_node(lb2)?;
    let started = t.elapsed();
    lab.wait_nexthops(&lab.node_addrs(&[lb1, lb2, lb3]), CONVERGE_TIMEOUT)?;
    println!(
        "lb2 back: agent and BIRD up after {} ms, 3 next hops after {} ms",
        started.as_millis(),
        t.elapsed().as_millis()
    );
    let step = after_change(lab, &mut conns, "lb2 back", t.elapsed())?;
    ensure!(
        step.carried.contains_key("lb2"),
        "some connections moved back onto lb2: {:?}",
        step.carried
    );
    steps.push(step);

    // 5. lb4 joins: it never saw any of these connections open, and keeps each on its
    //    backend.
    let t = Instant::now();
    let lb4 = lab.add_node()?;
    let started = t.elapsed();
    lab.wait_nexthops(&lab.node_addrs(&[lb1, lb2, lb3, lb4]), CONVERGE_TIMEOUT)?;
    println!(
        "lb4 added: agent and BIRD up after {} ms, 4 next hops after {} ms",
        started.as_millis(),
        t.elapsed().as_millis()
    );
    let step = after_change(lab, &mut conns, "lb4 added", t.elapsed())?;
    ensure!(
        step.carried.contains_key("lb4"),
        "some connections moved onto lb4: {:?}",
        step.carried
    );
    steps.push(step);

    // 6. lb3 leaves cleanly: SIGTERM to its agent (BIRD keeps running). The agent withdraws
    //    its route and keeps forwarding for the hand-over time, so the router has moved
    //    away before the program goes.
    let stop = lab.stop_node(lb3)?;
    println!(
        "lb3 SIGTERM: route withdrawn after {}, agent exited after {} ms ({})",
        stop.withdrawn_after
            .map_or_else(|| "never".into(), |d| format!("{} ms", d.as_millis())),
        stop.exited_after.as_millis(),
        stop.status
    );
    ensure!(stop.status.success(), "lb3's agent exit: {}", stop.status);
    ensure!(
        stop.withdrawn_before_exit(),
        "lb3's route was withdrawn before its agent exited: {stop:?}"
    );
    let converged = lab.wait_nexthops(&lab.node_addrs(&[lb1, lb2, lb4]), CONVERGE_TIMEOUT)?;
    let step = after_change(
        lab,
        &mut conns,
        "lb3 stopped (SIGTERM)",
        stop.withdrawn_after.unwrap_or_default() + converged,
    )?;
    ensure!(
        !step.carried.contains_key("lb3"),
        "lb3 carried packets after its route was withdrawn: {:?}",
        step.carried
    );
    steps.push(step);
    Ok(())
}

#[test]
fn bgp_ecmp_changes_break_no_connection() {
    require_root().unwrap();
    let mut lab = BgpLab::new(BgpLabSpec::new(env!("CARGO_BIN_EXE_lb-agent"))).unwrap();
    let mut steps = Vec::new();
    let result = (|| -> Result<()> {
        lab.start_backends()?;
        lab.start_router()?;
        for _ in 0..3 {
            lab.add_node()?;
        }
        run(&mut lab, &mut steps)
    })();
    let mut summary = header();
    for s in &steps {
        summary.push_str(&s.row());
        summary.push('\n');
    }
    println!("\nsummary:\n{summary}");
    if let Err(e) = result {
        // The lab prints every agent log and the router's `birdc show protocols` as it
        // unwinds.
        panic!("{e:#}");
    }
}
