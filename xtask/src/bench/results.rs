//! What a bench run found: plain data, filled in by the measuring modules, read by the
//! report and the plots.

use super::{stats::Summary, system::Machine};

/// Everything one run produced. A section that did not run (or failed) is `None` and its
/// reason is in `notes`.
#[derive(Clone, Debug, Default)]
pub struct Results {
    pub machine: Machine,
    pub quick: bool,
    /// CPU the data plane was measured on.
    pub cpu: usize,
    pub dataplane: Option<Dataplane>,
    pub maglev: Option<Maglev>,
    pub sync: Option<Sync>,
    pub e2e: Option<E2e>,
    /// Caveats and failures, in the order they happened.
    pub notes: Vec<String>,
}

/// BPF_PROG_TEST_RUN figures, in ns per packet.
#[derive(Clone, Debug, Default)]
pub struct Dataplane {
    /// Iterations per test run, and rounds (each round measures every variant once).
    pub repeat: u32,
    pub rounds: usize,
    pub baselines: Vec<DpRow>,
    pub cases: Vec<DpRow>,
}

/// One measured program on one input.
#[derive(Clone, Debug)]
pub struct DpRow {
    pub name: String,
    /// Forwarding mode, or "-".
    pub mode: String,
    pub frame_len: usize,
    /// "TX", "PASS" or "DROP".
    pub verdict: &'static str,
    /// ns/packet, harness cost subtracted (per round, then summarised).
    pub ns: Summary,
    /// The harness's own cost with this input (harness → XDP_DROP minus XDP_DROP).
    pub harness: Summary,
    /// The same-verdict baseline this case is compared with, and the difference (paired per
    /// round: both ran through the harness on the same input, so its cost cancels).
    pub baseline: Option<(&'static str, Summary)>,
    pub over: Option<Summary>,
    /// Target for `over`, from the issue.
    pub target: Option<f64>,
    /// Median of the kernel's own per-iteration figure (whole ns, harness included), a
    /// cross-check of the CPU-time measurement.
    pub kernel_ns: f64,
    /// What was verified about this case.
    pub checks: String,
}

/// Maglev table build times and disruption.
#[derive(Clone, Debug, Default)]
pub struct Maglev {
    pub builds: Vec<MaglevBuild>,
    pub disruption: Vec<Disruption>,
}

#[derive(Clone, Debug)]
pub struct MaglevBuild {
    pub backends: usize,
    pub slots: u32,
    /// Milliseconds per build.
    pub ms: Summary,
}

/// Fraction of slots that changed backend when one of `n` backends is removed (or one is
/// added), at a fixed table size and with the production size rule.
#[derive(Clone, Debug)]
pub struct Disruption {
    pub n: usize,
    pub fixed_slots: u32,
    pub removed: f64,
    pub added: f64,
    /// Table sizes of the production rule before/after removal and addition.
    pub rule_slots: (u32, u32, u32),
    pub rule_removed: f64,
    pub rule_added: f64,
}

/// sync::plan + Dataplane::apply on real maps.
#[derive(Clone, Debug, Default)]
pub struct Sync {
    pub rows: Vec<SyncRow>,
    pub rss: Vec<AgentRss>,
}

#[derive(Clone, Debug)]
pub struct SyncRow {
    pub services: usize,
    pub backends_per_service: usize,
    /// Map writes of the full sync.
    pub ops: usize,
    pub maglev_writes: usize,
    /// Full sync from empty maps: read the maps, plan, apply (ms).
    pub full_ms: f64,
    pub snapshot_ms: f64,
    pub plan_ms: f64,
    pub apply_ms: f64,
    /// One backend removed from (or re-added to) one service: plan + apply (ms).
    pub change_ms: Summary,
}

/// The real agent binary, run on a generated config.
#[derive(Clone, Debug)]
pub struct AgentRss {
    pub services: usize,
    pub backends: usize,
    pub rss_mib: f64,
    pub peak_mib: f64,
    /// From the agent's start to every service being in the pinned maps.
    pub ready_s: f64,
}

/// Packets per second through an LB namespace.
#[derive(Clone, Debug, Default)]
pub struct E2e {
    pub rows: Vec<E2eRow>,
    pub method: String,
}

#[derive(Clone, Debug)]
pub struct E2eRow {
    pub setup: String,
    pub flows: usize,
    /// Medians over runs, packets per second.
    pub offered: Summary,
    pub accepted: Summary,
    pub delivered: Summary,
    /// Delivered relative to nftables DNAT with the same flows (same run).
    pub vs_nft: Option<f64>,
    pub checks: String,
}
