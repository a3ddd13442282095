//! Control plane, pure part: Maglev table build time and disruption (`lb_common::maglev`,
//! the code the agent runs).

use lb_common::{
    FAMILY_V4,
    hash::fmix32,
    maglev::{self, MAX_TABLE_SIZE, MaglevBackend},
};

use super::{
    results::{self, Disruption, MaglevBuild},
    stats::Summary,
    system::thread_cpu_time,
};

/// Flows sampled to compare two tables of different sizes.
const SAMPLED_FLOWS: u32 = 200_000;
/// Backends removed in turn (and results averaged) for each N.
const VICTIMS: usize = 5;

/// Backend `i` as the agent keys it: IPv4 address bytes, zero padding, family byte.
fn backend(i: usize) -> MaglevBackend {
    let addr = u32::from_be_bytes([198, 18, 0, 0]) + 256 + i as u32;
    let mut key = [0u8; 17];
    key[..4].copy_from_slice(&addr.to_be_bytes());
    key[16] = FAMILY_V4;
    MaglevBackend {
        key,
        id: i as u32,
        weight: 1,
    }
}

fn backends(n: usize) -> Vec<MaglevBackend> {
    (0..n).map(backend).collect()
}

fn build(members: &[MaglevBackend], size: u32) -> anyhow::Result<Vec<u32>> {
    maglev::build_table(members, size).map_err(|e| anyhow::anyhow!("Maglev: {e}"))
}

/// Fraction of flows that map to another backend in `b` than in `a`: slot by slot when
/// the sizes match (exact), else over sampled flow hashes (`hash % size`, as the data plane
/// indexes).
pub fn moved(a: &[u32], b: &[u32]) -> f64 {
    if a.len() == b.len() {
        let n = a.iter().zip(b).filter(|(x, y)| x != y).count();
        return n as f64 / a.len().max(1) as f64;
    }
    let n = (0..SAMPLED_FLOWS)
        .map(fmix32)
        .filter(|h| a[*h as usize % a.len()] != b[*h as usize % b.len()])
        .count();
    n as f64 / f64::from(SAMPLED_FLOWS)
}

/// Mean fraction moved when each of up to `VICTIMS` backends is removed from `n`, and when
/// one backend is added; tables of `size(n)` slots.
fn disruption(n: usize, size: &dyn Fn(usize) -> u32) -> anyhow::Result<(f64, f64)> {
    let all = backends(n);
    let base = build(&all, size(n))?;
    let victims: Vec<usize> = (0..VICTIMS.min(n))
        .map(|k| k * n / VICTIMS.min(n))
        .collect();
    let mut removed = 0.0;
    for &v in &victims {
        let rest: Vec<MaglevBackend> = all.iter().copied().filter(|b| b.id != v as u32).collect();
        removed += moved(&base, &build(&rest, size(n - 1))?);
    }
    let grown = build(&backends(n + 1), size(n + 1))?;
    Ok((removed / victims.len() as f64, moved(&base, &grown)))
}

pub fn run(quick: bool) -> anyhow::Result<results::Maglev> {
    let mut out = results::Maglev::default();
    let rounds = if quick { 5 } else { 15 };
    for n in [10, 100, 1000] {
        let members = backends(n);
        let mut ms = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let start = thread_cpu_time();
            let table = build(&members, MAX_TABLE_SIZE)?;
            ms.push(thread_cpu_time().saturating_sub(start).as_secs_f64() * 1e3);
            std::hint::black_box(table);
        }
        let ms = Summary::of(&ms).ok_or_else(|| anyhow::anyhow!("no samples"))?;
        eprintln!(
            "maglev: build {MAX_TABLE_SIZE} slots, {n:>4} backends: {:.2} ms (median of {rounds})",
            ms.median
        );
        out.builds.push(MaglevBuild {
            backends: n,
            slots: MAX_TABLE_SIZE,
            ms,
        });
    }
    for n in [2, 3, 5, 10, 16, 20, 50, 100, 200, 500, 1000] {
        let (removed, added) = disruption(n, &|_| MAX_TABLE_SIZE)?;
        let rule = |k: usize| maglev::table_size_for(k as u64);
        let (rule_removed, rule_added) = disruption(n, &rule)?;
        let row = Disruption {
            n,
            fixed_slots: MAX_TABLE_SIZE,
            removed,
            added,
            rule_slots: (rule(n), rule(n - 1), rule(n + 1)),
            rule_removed,
            rule_added,
        };
        eprintln!(
            "maglev: N={n:>4}: remove one {:.4}, add one {:.4} (ideal {:.4} / {:.4}); \
             size rule {}→{}/{}: {:.4} / {:.4}",
            removed,
            added,
            1.0 / n as f64,
            1.0 / (n + 1) as f64,
            row.rule_slots.0,
            row.rule_slots.1,
            row.rule_slots.2,
            rule_removed,
            rule_added
        );
        out.disruption.push(row);
    }
    Ok(out)
}
