//! Results → tables (terminal and Markdown) and the report file.

use std::fmt::Write;

use super::{
    announce::{self, Announce},
    results::{DpRow, Results},
    stats::Summary,
    table::Table,
};

/// Targets from the issue.
pub const FULL_SYNC_10K_S: f64 = 2.0;
pub const CHANGE_P99_MS: f64 = 20.0;
pub const RSS_MIB: f64 = 100.0;
pub const E2E_VS_NFT: f64 = 3.0;

/// The report's sections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Dataplane,
    Control,
    E2e,
    Announce,
}

/// The reference C load balancer, measured on this machine with the same method (from the
/// issue): UDP to a VIP, TCP ACK, TCP SYN, IPv6 UDP, non-VIP, ns over the baseline.
const C_REFERENCE: [(&str, f64); 5] = [
    ("UDP 64 B to a VIP", 83.0),
    ("TCP ACK, known flow", 62.0),
    ("TCP SYN, new flow", 146.0),
    ("IPv6 UDP 64 B to a VIP", 81.0),
    ("UDP 64 B, not a VIP", 19.0),
];

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

fn dp_table(rows: &[DpRow], baselines: &[DpRow]) -> Table {
    let mut t = Table::new(&[
        "case",
        "mode",
        "frame",
        "verdict",
        "ns/pkt",
        "over baseline",
        "±",
        "target",
        "harness",
        "kernel",
    ]);
    for r in baselines.iter().chain(rows) {
        let (over, spread) = match (&r.baseline, &r.over) {
            (Some((name, _)), Some(o)) => (
                format!("{:+.1} vs {name}", o.median),
                format!("{:.1}", o.half_iqr()),
            ),
            _ => ("-".into(), format!("{:.1}", r.ns.half_iqr())),
        };
        let target = match (r.target, &r.over) {
            (Some(t), Some(o)) => format!("≤ {t:.0} {}", verdict(o.median <= t)),
            _ => "-".into(),
        };
        t.row(vec![
            r.name.clone(),
            r.mode.clone(),
            format!("{} B", r.frame_len),
            r.verdict.into(),
            format!("{:.1}", r.ns.median),
            over,
            spread,
            target,
            format!("{:.1}", r.harness.median),
            format!("{:.0}", r.kernel_ns),
        ]);
    }
    t
}

/// Every table of the run, titled, in report order.
pub fn tables(r: &Results) -> Vec<(Part, String, Table)> {
    let mut out = Vec::new();
    if let Some(d) = &r.dataplane {
        out.push((
            Part::Dataplane,
            format!(
                "Data plane: BPF_PROG_TEST_RUN, ns per packet (median of {} rounds × {} iterations, CPU {})",
                d.rounds, d.repeat, r.cpu
            ),
            dp_table(&d.cases, &d.baselines),
        ));
    }
    if let Some(m) = &r.maglev {
        let mut t = Table::new(&["backends", "slots", "build ms", "min", "max"]);
        for b in &m.builds {
            t.row(vec![
                b.backends.to_string(),
                b.slots.to_string(),
                format!("{:.2}", b.ms.median),
                format!("{:.2}", b.ms.min),
                format!("{:.2}", b.ms.max),
            ]);
        }
        out.push((
            Part::Control,
            "Maglev table build (CPU time, median)".into(),
            t,
        ));
        let mut t = Table::new(&[
            "N",
            "remove one",
            "ideal 1/N",
            "ratio",
            "add one",
            "ideal 1/(N+1)",
            "ratio",
            "size rule (N→N-1/N+1)",
            "rule: remove",
            "rule: add",
        ]);
        for d in &m.disruption {
            let (i_rm, i_add) = (1.0 / d.n as f64, 1.0 / (d.n + 1) as f64);
            t.row(vec![
                d.n.to_string(),
                format!("{:.4}", d.removed),
                format!("{i_rm:.4}"),
                format!("{:.2}", d.removed / i_rm),
                format!("{:.4}", d.added),
                format!("{i_add:.4}"),
                format!("{:.2}", d.added / i_add),
                format!("{}→{}/{}", d.rule_slots.0, d.rule_slots.1, d.rule_slots.2),
                format!("{:.4}", d.rule_removed),
                format!("{:.4}", d.rule_added),
            ]);
        }
        out.push((
            Part::Control,
            format!(
                "Maglev disruption: fraction of flows that change backend ({} slots fixed, and with the agent's size rule)",
                m.disruption.first().map_or(0, |d| d.fixed_slots)
            ),
            t,
        ));
    }
    if let Some(s) = &r.sync {
        let mut t = Table::new(&[
            "services",
            "endpoints",
            "plan ops",
            "Maglev slots",
            "full sync s",
            "read/plan/apply s",
            "change p50 ms",
            "p99 ms",
            "max ms",
            "n",
            "targets",
        ]);
        for row in &s.rows {
            let mut targets = format!(
                "p99 < {CHANGE_P99_MS:.0} ms {}",
                verdict(row.change_ms.p99 < CHANGE_P99_MS)
            );
            if row.services >= 10_000 {
                targets = format!(
                    "full < {FULL_SYNC_10K_S:.0} s {}; {targets}",
                    verdict(row.full_ms / 1e3 < FULL_SYNC_10K_S)
                );
            }
            t.row(vec![
                row.services.to_string(),
                (row.services * row.backends_per_service).to_string(),
                row.ops.to_string(),
                row.maglev_writes.to_string(),
                format!("{:.3}", row.full_ms / 1e3),
                format!(
                    "{:.3}/{:.3}/{:.3}",
                    row.snapshot_ms / 1e3,
                    row.plan_ms / 1e3,
                    row.apply_ms / 1e3
                ),
                format!("{:.2}", row.change_ms.median),
                format!("{:.2}", row.change_ms.p99),
                format!("{:.2}", row.change_ms.max),
                row.change_ms.n.to_string(),
                targets,
            ]);
        }
        out.push((
            Part::Control,
            "Sync: sync::plan + Dataplane::apply on real maps (wall clock)".into(),
            t,
        ));
        if !s.rss.is_empty() {
            let mut t = Table::new(&[
                "services",
                "endpoints",
                "VmRSS MiB",
                "VmHWM MiB",
                "start → all programmed s",
                "target",
            ]);
            for a in &s.rss {
                t.row(vec![
                    a.services.to_string(),
                    a.backends.to_string(),
                    format!("{:.1}", a.rss_mib),
                    format!("{:.1}", a.peak_mib),
                    format!("{:.1}", a.ready_s),
                    if a.services >= 10_000 {
                        format!("< {RSS_MIB:.0} MiB {}", verdict(a.rss_mib < RSS_MIB))
                    } else {
                        "-".into()
                    },
                ]);
            }
            out.push((
                Part::Control,
                "Agent memory: lb-agent run on a generated config".into(),
                t,
            ));
        }
    }
    if let Some(e) = &r.e2e {
        let mut t = Table::new(&[
            "setup",
            "flows",
            "offered pps",
            "accepted pps",
            "delivered pps",
            "±",
            "dropped",
            "vs nftables",
            "checks",
        ]);
        for row in &e.rows {
            let vs = match row.vs_nft {
                Some(v) if row.flows > 1000 && row.setup.contains("native") => {
                    format!(
                        "{v:.2}× (target ≥ {E2E_VS_NFT:.0}× {})",
                        verdict(v >= E2E_VS_NFT)
                    )
                }
                Some(v) => format!("{v:.2}×"),
                None => "-".into(),
            };
            let dropped = if row.offered.median > 0.0 && row.delivered.median > 0.0 {
                format!(
                    "{:.1} %",
                    100.0 * (1.0 - row.delivered.median / row.offered.median)
                )
            } else {
                "-".into()
            };
            t.row(vec![
                row.setup.clone(),
                row.flows.to_string(),
                format!("{:.0}", row.offered.median),
                format!("{:.0}", row.accepted.median),
                format!("{:.0}", row.delivered.median),
                format!("{:.0}", row.delivered.half_iqr()),
                dropped,
                vs,
                row.checks.clone(),
            ]);
        }
        out.push((
            Part::E2e,
            "End to end: packets per second through the LB namespace".into(),
            t,
        ));
    }
    out
}

/// `median / max s`, or `-`.
fn secs(s: &Option<Summary>) -> String {
    s.as_ref()
        .map_or("-".into(), |s| format!("{:.3} / {:.3}", s.median, s.max))
}

/// The announcement failover table, titled.
fn announce_table(a: &Announce) -> (Part, String, Table) {
    let mut t = Table::new(&[
        "case",
        "trials ok",
        "route / neighbour moved s",
        "first new connection s",
        "all connections answering s",
        "slowest request s",
        "broken",
        "settings",
    ]);
    for row in &a.rows {
        t.row(vec![
            row.case.into(),
            format!("{}/{}", row.ok, a.trials),
            secs(&row.converged),
            secs(&row.first_new),
            secs(&row.recovered),
            secs(&row.slowest),
            format!(
                "{}/{}{}",
                row.broken,
                row.connections,
                if row.broken > 0 { " (must be 0)" } else { "" }
            ),
            row.note.clone(),
        ]);
    }
    (
        Part::Announce,
        format!(
            "VIP announcement failover: median / max over {} trial(s), {} open TCP connections each",
            a.trials,
            announce::CONNECTIONS
        ),
        t,
    )
}

/// The terminal summary.
pub fn text(r: &Results, announce: Option<&Announce>) -> String {
    let mut s = String::new();
    for (_, title, t) in tables(r).into_iter().chain(announce.map(announce_table)) {
        let _ = write!(s, "\n{title}\n{}", t.text());
    }
    s.push_str("\nAgainst the targets:\n");
    for line in summary(r) {
        let _ = writeln!(s, "  {line}");
    }
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s
}

/// One line per target of the issue: what was measured, met or missed.
pub fn summary(r: &Results) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(d) = &r.dataplane {
        let mut by_target: Vec<(String, f64, Vec<String>)> = Vec::new();
        for c in &d.cases {
            let (Some(t), Some(o)) = (c.target, &c.over) else {
                continue;
            };
            let name = c
                .name
                .split(", tracking")
                .next()
                .unwrap_or(&c.name)
                .to_string();
            let entry = format!(
                "{}{} {:.1} {}",
                if c.mode == "-" { "" } else { c.mode.as_str() },
                if c.name.contains("tracking on") {
                    " (tracked)"
                } else {
                    ""
                },
                o.median,
                verdict(o.median <= t)
            )
            .trim_start()
            .to_string();
            match by_target.iter_mut().find(|(n, _, _)| *n == name) {
                Some((_, _, v)) => v.push(entry),
                None => by_target.push((name, t, vec![entry])),
            }
        }
        for (name, t, entries) in by_target {
            let reference = C_REFERENCE
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(String::new(), |(_, ns)| format!(" (C reference: {ns:.0})"));
            out.push(format!(
                "{name}: ≤ {t:.0} ns over the baseline{reference}: {}",
                entries.join(", ")
            ));
        }
    }
    if let Some(s) = &r.sync {
        for row in &s.rows {
            if row.services >= 10_000 {
                out.push(format!(
                    "full sync of {} services: < {FULL_SYNC_10K_S:.0} s: {:.2} s {}",
                    row.services,
                    row.full_ms / 1e3,
                    verdict(row.full_ms / 1e3 < FULL_SYNC_10K_S)
                ));
            }
        }
        let changes: Vec<String> = s
            .rows
            .iter()
            .map(|row| {
                format!(
                    "{} services {:.2} ms {}",
                    row.services,
                    row.change_ms.p99,
                    verdict(row.change_ms.p99 < CHANGE_P99_MS)
                )
            })
            .collect();
        if !changes.is_empty() {
            out.push(format!(
                "single change p99 < {CHANGE_P99_MS:.0} ms: {}",
                changes.join(", ")
            ));
        }
        for a in s.rss.iter().filter(|a| a.services >= 10_000) {
            out.push(format!(
                "agent RSS at {} services < {RSS_MIB:.0} MiB: {:.1} MiB {} (peak {:.1} MiB)",
                a.services,
                a.rss_mib,
                verdict(a.rss_mib < RSS_MIB),
                a.peak_mib
            ));
        }
    }
    if let Some(e) = &r.e2e {
        for row in e
            .rows
            .iter()
            .filter(|row| row.vs_nft.is_some() && !row.setup.contains("nftables"))
        {
            let v = row.vs_nft.unwrap_or(f64::NAN);
            let target = if row.flows > 1000 && row.setup.contains("native") {
                format!(" (target ≥ {E2E_VS_NFT:.0}×: {})", verdict(v >= E2E_VS_NFT))
            } else {
                String::new()
            };
            out.push(format!(
                "{} vs nftables DNAT, {} flows: {v:.2}×{target}",
                row.setup, row.flows
            ));
        }
    }
    out
}

/// The Markdown report; `plots` are (section, file, caption).
pub fn markdown(
    r: &Results,
    announce: Option<&Announce>,
    date: &str,
    plots: &[(Part, &str, &str)],
) -> String {
    let m = &r.machine;
    let mut s = format!(
        "# lb benchmarks\n\n\
         `cargo xtask bench{}` on {date}.\n\n\
         | machine | |\n|---|---|\n\
         | CPU | {} ({} CPUs) |\n| kernel | {} |\n| memory | {:.1} GiB |\n\
         | load average (1 min) at start / end | {:.2} / {:.2} |\n\
         | data plane measured on | CPU {} |\n\n\
         The machine is shared: other work ran during the measurement (see the load average). \
         Every figure is a median over rounds, and each is set against a baseline measured \
         the same way in the same run, interleaved with it.\n",
        if r.quick { " --quick" } else { "" },
        m.cpu_model,
        m.cpus,
        m.kernel,
        m.memory_gib,
        m.load_start,
        m.load_end,
        r.cpu
    );
    let lines = summary(r);
    if !lines.is_empty() {
        s.push_str("\n## Against the targets\n\n");
        for l in lines {
            let _ = writeln!(s, "- {l}");
        }
    }
    let mut tables = tables(r);
    tables.extend(announce.map(announce_table));
    for (part, heading, method) in [
        (Part::Dataplane, "Data plane", DATAPLANE_METHOD),
        (Part::Control, "Control plane", CONTROL_METHOD),
        (Part::E2e, "End to end", ""),
        (Part::Announce, "VIP announcement failover", ANNOUNCE_METHOD),
    ] {
        if !tables.iter().any(|(p, _, _)| *p == part) {
            continue;
        }
        let _ = write!(s, "\n## {heading}\n{method}");
        if let (Part::E2e, Some(e)) = (part, &r.e2e) {
            let _ = write!(s, "\n{}\n", e.method);
        }
        for (_, title, t) in tables.iter().filter(|(p, _, _)| *p == part) {
            let _ = write!(s, "\n### {title}\n\n{}", t.markdown());
        }
        if let (Part::Dataplane, Some(d)) = (part, &r.dataplane) {
            s.push_str("\n<details><summary>What was verified per case</summary>\n\n");
            for row in d.baselines.iter().chain(&d.cases) {
                let _ = writeln!(s, "- {} [{}]: {}", row.name, row.mode, row.checks);
            }
            s.push_str("\n</details>\n");
        }
        for (_, file, caption) in plots.iter().filter(|(p, _, _)| *p == part) {
            let _ = write!(s, "\n![{caption}]({file})\n");
        }
    }
    if !r.notes.is_empty() {
        s.push_str("\n## Notes\n\n");
        for n in &r.notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}

const DATAPLANE_METHOD: &str = "
BPF_PROG_TEST_RUN on the real object (`lb_xdp`, loaded by the agent's own loader, maps
programmed by `sync::plan` + `Dataplane::apply`). A plain `repeat` would time the wrong thing
(after the first iteration the frame is already encapsulated), so each iteration runs a
harness program first (`lb-ebpf/src/bin/bench_harness.rs`): it moves the data pointer back to
where the kernel put it for the first iteration, restores the length, copies the pristine
frame in, and tail-calls the program under test. Per round, on the same frame and CPU:
harness → `lb_xdp`, harness → `XDP_DROP`, `XDP_DROP` alone, harness → the baseline with the
case's verdict (a MAC-swap `XDP_TX`, or `XDP_PASS`). ns/packet = (harness → `lb_xdp`) −
harness cost, where harness cost = (harness → `XDP_DROP`) − `XDP_DROP`; *over baseline* =
(harness → `lb_xdp`) − (harness → baseline), in which the harness cancels. Times are the
thread's CPU time over the call divided by the iterations; *kernel* is the kernel's own
whole-ns figure for harness → `lb_xdp` (harness included), as a cross-check. `±` is half the
interquartile range over rounds.

Checked for every case: one plain run gives the expected verdict and frame shape (outer
header size, backend MAC and address, inner packet intact, or an untouched frame for PASS);
every timed run ends with exactly that verdict and those bytes, the harness counted every
iteration and no restore error, and the case's reason counter moved once per iteration, and
`flow_created` never: tracked flows hit their entry, and a SYN of a new connection is
decided by Maglev without creating one (its next packet does; SYN floods leave no state).
";

const CONTROL_METHOD: &str = "
Maglev: `lb_common::maglev::build_table` (the agent's code), CPU time. Disruption: fraction of
the table's slots (or, when the size changes, of 200,000 sampled flow hashes) whose backend
changes when one of N backends is removed (mean over up to 5 choices) or one is added; at a
fixed 65,537 slots, and with the agent's size rule (`table_size_for`), which changes the size
when the total weight crosses a power of two above 16.

Sync: the object loaded by `loader::load` with `LB_MAGLEV` sized for every table twice; a
generated config (10 backends per service, MACs given, parsed by the agent's config parser);
full sync = read the maps + `sync::plan_with_cache` + `Dataplane::apply` from empty maps; a
change = one backend removed from (or re-added to) one service, planned against the agent's
kept snapshot and table memo (`TableCache`: only changed tables are rebuilt) and applied.
Afterwards the maps are read back and must equal that snapshot. Agent memory: the
release `lb-agent run` on the same generated config in its own network namespace (XDP in skb
mode on a veth); VmRSS/VmHWM from /proc once every service is in the pinned maps, plus 2 s.
";

const ANNOUNCE_METHOD: &str = "
Every trial of every case in a fresh lab (`lb_testkit::bgplab`: client, router running BIRD
with ECMP on the 5-tuple, 3 nodes each running `lb-agent` (`announce: bgp`) and BIRD, 3 DSR
backends; `lb_testkit::l2lab`: client, 3 nodes (`announce: l2`) and 3 backends on one
bridge), generic XDP. 30 long-lived TCP connections each send a request every 20 ms across
the event. *Route / neighbour moved*: BGP, until the router's kernel route to the VIP lost the
node's next hop (or, graceful stop, the lab's withdrawal time after SIGTERM); L2, until the
client's neighbour entry for the VIP names another node. *First new connection* (L2): a new
connection is started every 50 ms (500 ms each) after the kill, until one is answered. *All
connections answering*: until every connection answered a request sent after the event and
its last stall (a request slower than 100 ms) ended;
*slowest request*: the longest any request took after it. *Broken*: a connection that got an
error, no reply within 15 s, or a reply from another backend. The BGP baseline is the same
node death behind a link taken down first: no FIN from the killed BIRD reaches the router,
which only notices when the hold time (3 s) expires; a killed agent leaves its XDP program
attached, so a killed node whose link stays up keeps forwarding until its route goes. An event
that does not converge within 30 s fails its trial (listed under Notes).
";
