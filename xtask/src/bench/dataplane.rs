//! Data plane: ns per packet of the real `lb_xdp` under BPF_PROG_TEST_RUN.
//!
//! Every measured iteration runs the harness, which restores the pristine frame and
//! tail-calls the program under test (see `lb-ebpf/src/bin/bench_harness.rs`). Each round
//! runs, back to back on the same input and CPU:
//!
//! - `H→lb`:   harness → `lb_xdp`
//! - `H→drop`: harness → `XDP_DROP`
//! - `drop`:   `XDP_DROP` alone (no harness)
//! - `H→base`: harness → the baseline with the case's verdict (MAC-swap TX or PASS)
//!
//! so per round: harness = `H→drop − drop`, ns/packet = `H→lb − harness`, and ns over the
//! baseline = `H→lb − H→base` (the harness cancels exactly). The figures are medians over
//! rounds; the order of the four runs rotates from round to round. Time is the thread's CPU
//! time over the call (sub-ns resolution; it does not count time other processes hold the
//! CPU), with the kernel's whole-ns figure kept as a cross-check.
//!
//! Before timing, each case runs once on its own (plain BPF_PROG_TEST_RUN) and its verdict
//! and output are checked; then every timed run must end with exactly that verdict and
//! output, the harness must report no restore error, and the case's reason counter (and
//! flow-creation counter) must have moved once per iteration.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, bail, ensure};
use lb_agent::{dataplane::Dataplane, loader, sync};
use lb_common::{Reason, maps};

use super::{
    cases::{self, Case, XDP_DROP, XDP_PASS, XDP_TX},
    harness::{Objects, Prog, Run},
    results::{self, DpRow},
    stats::Summary,
    system,
};

/// How much to measure.
#[derive(Clone, Debug)]
pub struct Settings {
    pub repeat: u32,
    pub rounds: usize,
    pub cpu: usize,
    /// Only the cases whose label contains this text.
    pub case: Option<String>,
}

fn baseline_of(verdict: u32) -> (Prog, &'static str) {
    match verdict {
        XDP_TX => (Prog::MacSwap, "MAC-swap TX"),
        XDP_PASS => (Prog::Pass, "XDP_PASS"),
        _ => (Prog::Drop, "XDP_DROP"),
    }
}

fn verdict_name(v: u32) -> &'static str {
    match v {
        XDP_DROP => "DROP",
        XDP_PASS => "PASS",
        XDP_TX => "TX",
        _ => "?",
    }
}

/// Packets per reason counter, summed over CPUs, keyed by the counter index.
fn reasons(dp: &Dataplane) -> anyhow::Result<BTreeMap<u32, u64>> {
    Ok(dp
        .stats([], [])?
        .reasons
        .into_iter()
        .map(|(r, c)| (r as u32, c.packets))
        .collect())
}

/// The four timings of one round, per iteration (ns).
struct Round {
    lb: f64,
    h_drop: f64,
    drop: f64,
    h_base: f64,
    kernel_lb: u32,
}

/// What one row measures.
struct Subject<'a> {
    name: String,
    mode: String,
    prog: Prog,
    input: &'a [u8],
    /// The reference run: every timed run must end with its action and output.
    expect: &'a Run,
    target: Option<f64>,
    checks: String,
}

struct Bench {
    objects: Objects,
    dataplane: Dataplane,
    settings: Settings,
}

impl Bench {
    /// One round for `prog` (which must end with `expect`), in an order rotated by `turn`.
    fn round(
        &mut self,
        prog: Prog,
        input: &[u8],
        expect: &Run,
        turn: usize,
        verify: &mut dyn FnMut(&Dataplane, &Run) -> anyhow::Result<()>,
    ) -> anyhow::Result<Round> {
        let repeat = self.settings.repeat;
        let (base, _) = baseline_of(expect.action);
        let mut r = Round {
            lb: 0.0,
            h_drop: 0.0,
            drop: 0.0,
            h_base: 0.0,
            kernel_lb: 0,
        };
        for step in 0..4 {
            match (step + turn) % 4 {
                0 => {
                    let run = self.objects.through_harness(prog, input, repeat)?;
                    if run.action != expect.action || run.output != expect.output {
                        bail!(
                            "after {repeat} iterations through the harness the output differs \
                             from one plain run (action {} vs {}, {} vs {} bytes): the frame \
                             was not restored",
                            run.action,
                            expect.action,
                            run.output.len(),
                            expect.output.len()
                        );
                    }
                    verify(&self.dataplane, &run)?;
                    r.lb = run.cpu_ns;
                    r.kernel_lb = run.kernel_ns;
                }
                1 => {
                    r.h_drop = self
                        .objects
                        .through_harness(Prog::Drop, input, repeat)?
                        .cpu_ns
                }
                2 => r.drop = self.objects.direct(Prog::Drop, input, repeat)?.cpu_ns,
                _ => {
                    r.h_base = if base == Prog::Drop {
                        f64::NAN
                    } else {
                        self.objects.through_harness(base, input, repeat)?.cpu_ns
                    }
                }
            }
        }
        if base == Prog::Drop {
            r.h_base = r.h_drop;
        }
        Ok(r)
    }

    /// Measure `subject` for every round and summarise.
    fn measure(
        &mut self,
        subject: Subject<'_>,
        verify: &mut dyn FnMut(&Dataplane, &Run) -> anyhow::Result<()>,
    ) -> anyhow::Result<DpRow> {
        let Subject {
            name,
            mode,
            prog,
            input,
            expect,
            target,
            checks,
        } = subject;
        let mut rounds = Vec::with_capacity(self.settings.rounds);
        for turn in 0..self.settings.rounds {
            rounds.push(self.round(prog, input, expect, turn, verify)?);
        }
        let col = |f: &dyn Fn(&Round) -> f64| -> anyhow::Result<Summary> {
            Summary::of(&rounds.iter().map(f).collect::<Vec<_>>()).context("no valid measurement")
        };
        let harness = col(&|r| r.h_drop - r.drop)?;
        let ns = col(&|r| r.lb - (r.h_drop - r.drop))?;
        let (_, base_name) = baseline_of(expect.action);
        let is_baseline = prog != Prog::Lb;
        let baseline = col(&|r| r.h_base - (r.h_drop - r.drop))?;
        let over = col(&|r| r.lb - r.h_base)?;
        let mut kernel: Vec<f64> = rounds.iter().map(|r| f64::from(r.kernel_lb)).collect();
        kernel.sort_by(f64::total_cmp);
        Ok(DpRow {
            name,
            mode,
            frame_len: input.len(),
            verdict: verdict_name(expect.action),
            ns,
            harness,
            baseline: (!is_baseline).then_some((base_name, baseline)),
            over: (!is_baseline).then_some(over),
            target,
            kernel_ns: super::stats::percentile(&kernel, 50.0),
            checks,
        })
    }
}

fn fmt_progress(row: &DpRow) -> String {
    let mut s = format!(
        "dataplane: {:<34} {:<5} {:>4} B  {:>6.1} ns/pkt (harness {:.1})",
        row.name, row.mode, row.frame_len, row.ns.median, row.harness.median
    );
    if let (Some((base, _)), Some(over)) = (&row.baseline, &row.over) {
        s.push_str(&format!("  {:+.1} over {base}", over.median));
        if let Some(t) = row.target {
            s.push_str(&format!(
                " (target ≤ {t:.0}: {})",
                if over.median <= t { "met" } else { "missed" }
            ));
        }
    }
    s
}

/// Program the maps as the agent would for the bench's config.
fn program(dataplane: &mut Dataplane, loaded: loader::Loaded) -> anyhow::Result<()> {
    let desired = cases::desired()?;
    let mut node = sync::node_config(
        &desired,
        cases::LB_MAC,
        desired.node.encap_source,
        desired.node.encap_source_v6,
        loaded,
    );
    node.mtu = cases::MTU;
    let current = dataplane.snapshot()?;
    let plan = sync::plan(&desired, node, &BTreeMap::new(), &current)?;
    ensure!(
        plan.unresolved.is_empty(),
        "backends without MAC: {:?}",
        plan.unresolved
    );
    dataplane.apply(&plan.ops)?;
    Ok(())
}

pub fn run(harness_object: &Path, settings: Settings) -> anyhow::Result<results::Dataplane> {
    let (objects, mut dataplane) = Objects::load(harness_object, maps::DEFAULT_MAGLEV_SLOTS)?;
    program(&mut dataplane, objects.loaded)?;
    system::pin_to_cpu(settings.cpu)?;
    let mut bench = Bench {
        objects,
        dataplane,
        settings,
    };
    let result = measure_all(&mut bench);
    let unpinned = system::unpin(std::thread::available_parallelism().map_or(1, |n| n.get()));
    let out = result?;
    unpinned?;
    Ok(out)
}

fn measure_all(bench: &mut Bench) -> anyhow::Result<results::Dataplane> {
    let mut out = results::Dataplane {
        repeat: bench.settings.repeat,
        rounds: bench.settings.rounds,
        ..Default::default()
    };
    let frame = cases::baseline_frame();
    for (prog, name) in [
        (Prog::Drop, "XDP_DROP"),
        (Prog::Pass, "XDP_PASS"),
        (Prog::MacSwap, "MAC-swap XDP_TX"),
    ] {
        let expect = bench.objects.direct(prog, &frame, 1)?;
        let subject = Subject {
            name: format!("baseline {name}"),
            mode: "-".into(),
            prog,
            input: &frame,
            expect: &expect,
            target: None,
            checks: format!("{} every iteration", verdict_name(expect.action)),
        };
        let row = bench.measure(subject, &mut |_, _| Ok(()))?;
        eprintln!("{}", fmt_progress(&row));
        out.baselines.push(row);
    }
    let filter = bench.settings.case.clone();
    let wanted = |case: &Case| {
        filter
            .as_deref()
            .is_none_or(|want| case.kind.label().contains(want))
    };
    for case in cases::cases().into_iter().filter(|c| wanted(c)) {
        let row = measure_case(bench, &case)
            .with_context(|| format!("case {} ({:?})", case.kind.label(), case.mode))?;
        eprintln!("{}", fmt_progress(&row));
        out.cases.push(row);
    }
    Ok(out)
}

fn measure_case(bench: &mut Bench, case: &Case) -> anyhow::Result<DpRow> {
    // One plain run: the reference verdict and output (for tracked flows it also creates the
    // flow entry, so the timed runs measure the known-flow path).
    let plain = bench.objects.direct(Prog::Lb, &case.input, 1)?;
    let shape = cases::check_output(case, plain.action, &plain.output)
        .map_err(|e| anyhow::anyhow!("plain run: {e}"))?;
    let repeat = u64::from(bench.settings.repeat);
    let (reason, creates) = (case.reason, case.creates_flow);
    let mut before = reasons(&bench.dataplane)?;
    let mut verify = |dp: &Dataplane, _: &Run| -> anyhow::Result<()> {
        let after = reasons(dp)?;
        let delta = |r: Reason| after[&(r as u32)] - before[&(r as u32)];
        ensure!(
            delta(reason) == repeat,
            "reason {} moved by {} in {repeat} iterations",
            reason.name(),
            delta(reason)
        );
        let want_created = if creates { repeat } else { 0 };
        ensure!(
            delta(Reason::FlowCreated) == want_created && delta(Reason::FlowGuarded) == 0,
            "flow_created moved by {} (expected {want_created}), flow_guarded by {}",
            delta(Reason::FlowCreated),
            delta(Reason::FlowGuarded)
        );
        before = after;
        Ok(())
    };
    let checks = format!(
        "{shape}; every timed run: same output as the plain run, {} ×{repeat}{}",
        reason.name(),
        if creates { ", flow_created ×N" } else { "" }
    );
    let mode = case.mode.map_or("-", |m| m.name()).to_string();
    let subject = Subject {
        name: case.kind.label().to_string(),
        mode,
        prog: Prog::Lb,
        input: &case.input,
        expect: &plain,
        target: case.kind.target(),
        checks,
    };
    bench.measure(subject, &mut verify)
}
