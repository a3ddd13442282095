//! The kernel's tick rate (HZ).
//!
//! The data plane stamps flow and affinity entries with `bpf_jiffies64()`, which the verifier
//! turns into one load (a clock in ns is a helper call per packet), so the timeouts it
//! compares with are ticks: seconds times HZ (`NodeConfig::hz`). HZ is a kernel build option
//! that a container usually cannot read (`/proc/timer_list` is masked, the kernel config is
//! seldom there), so it is measured: `lb_clock`, a program that returns jiffies, runs
//! (BPF_PROG_TEST_RUN, nothing attached) before and after a short sleep. Once per process.

use std::{
    sync::OnceLock,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    programs::{ProgramError, TestRun, TestRunOptions, Xdp},
};
use lb_common::maps;

/// How long the measurement waits between its two readings: at HZ=100 that is 20 ticks,
/// enough to tell every rate a kernel is built with apart.
const WINDOW: Duration = Duration::from_millis(200);
/// The rates kernels are built with; a measurement within 10% of one is taken as it.
const KNOWN: [u16; 4] = [100, 250, 300, 1000];

#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("program {} is missing from the object", maps::PROG_CLOCK)]
    Missing,
    #[error("program {name}: {source}", name = maps::PROG_CLOCK)]
    Program {
        #[from]
        source: ProgramError,
    },
    #[error("jiffies moved by {ticks} in {elapsed:?}: not a tick rate the data plane can use")]
    Implausible { ticks: u32, elapsed: Duration },
}

static HZ: OnceLock<u16> = OnceLock::new();

/// The kernel's HZ, measured with `ebpf`'s `lb_clock` the first time (blocks for
/// [`WINDOW`]) and remembered for the process after that.
pub fn kernel_hz(ebpf: &mut Ebpf) -> Result<u16, ClockError> {
    if let Some(hz) = HZ.get() {
        return Ok(*hz);
    }
    let prog: &mut Xdp = ebpf
        .program_mut(maps::PROG_CLOCK)
        .ok_or(ClockError::Missing)?
        .try_into()?;
    if prog.fd().is_err() {
        prog.load()?;
    }
    let before = jiffies(prog)?;
    let start = Instant::now();
    std::thread::sleep(WINDOW);
    let ticks = jiffies(prog)?.wrapping_sub(before);
    let hz = rate(ticks, start.elapsed())?;
    tracing::debug!(hz, ticks, "kernel tick rate measured");
    Ok(*HZ.get_or_init(|| hz))
}

/// The low 32 bits of the kernel's jiffies.
fn jiffies(prog: &Xdp) -> Result<u32, ClockError> {
    // Any frame will do; the program only returns the counter.
    let frame = [0u8; 64];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(&frame);
    Ok(prog.test_run(opts)?.return_value)
}

/// The tick rate from `ticks` counted over `elapsed`: a known rate when it is within 10%
/// of one, else the measured rate rounded.
pub fn rate(ticks: u32, elapsed: Duration) -> Result<u16, ClockError> {
    let measured = ticks as f64 / elapsed.as_secs_f64();
    if let Some(known) = KNOWN
        .iter()
        .find(|k| (measured - f64::from(**k)).abs() <= f64::from(**k) / 10.0)
    {
        return Ok(*known);
    }
    let rounded = measured.round();
    if !(10.0..=u16::MAX as f64).contains(&rounded) {
        return Err(ClockError::Implausible { ticks, elapsed });
    }
    Ok(rounded as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_rates_are_recognised_through_tick_quantisation() {
        let w = Duration::from_millis(205);
        // One tick more or less than the exact count, as a sleep that straddles ticks gives.
        for (hz, exact) in [(100, 20), (250, 51), (300, 61), (1000, 205)] {
            for ticks in [exact - 1, exact, exact + 1] {
                assert_eq!(rate(ticks, w).unwrap(), hz, "{ticks} ticks");
            }
        }
    }

    #[test]
    fn other_rates_are_rounded_and_nonsense_refused() {
        assert_eq!(rate(1200, Duration::from_secs(2)).unwrap(), 600);
        assert!(rate(0, Duration::from_millis(200)).is_err());
        assert!(rate(u32::MAX, Duration::from_millis(200)).is_err());
    }
}
