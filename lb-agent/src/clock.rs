//! The kernel's clock: jiffies, and their rate (HZ).
//!
//! The data plane stamps flow and affinity entries with `bpf_jiffies64()`, which the verifier
//! turns into one load (a clock in ns is a helper call per packet), so the timeouts it
//! compares with are ticks: seconds times HZ (`NodeConfig::hz`). HZ is a kernel build option
//! that a container usually cannot read (`/proc/timer_list` is masked, the kernel config is
//! seldom there), so it is measured: `lb_clock`, a program that returns jiffies, runs
//! (BPF_PROG_TEST_RUN, nothing attached) before and after a short sleep. Once per process.
//!
//! The answer lease (`LB_L2_LEASE`) is a deadline in jiffies too, renewed from a task that
//! does not hold the loaded object: [`KernelClock`] keeps a descriptor of `lb_clock` of its
//! own and reads the current jiffies through it at every renewal (one `bpf(2)` call), so
//! there is no userspace clock to keep in step with the kernel's.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd},
    sync::OnceLock,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    programs::{ProgramError, ProgramFd, Xdp},
};
use lb_common::maps;

/// How long the measurement waits between its two readings: at HZ=100 that is 20 ticks,
/// enough to tell every rate a kernel is built with apart.
const WINDOW: Duration = Duration::from_millis(200);
/// The rates kernels are built with; a measurement within 10% of one is taken as it.
const KNOWN: [u16; 4] = [100, 250, 300, 1000];
/// `BPF_PROG_TEST_RUN` from `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// The frame `lb_clock` runs on (an XDP test run needs at least an Ethernet header); it
/// writes the jiffies over its first 8 bytes.
const FRAME: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ClockError {
    #[error("program {} is missing from the object", maps::PROG_CLOCK)]
    Missing,
    #[error("program {name}: {source}", name = maps::PROG_CLOCK)]
    Program {
        #[from]
        source: ProgramError,
    },
    #[error("running {name}: {source}", name = maps::PROG_CLOCK)]
    Run { source: io::Error },
    #[error("jiffies moved by {ticks} in {elapsed:?}: not a tick rate the data plane can use")]
    Implausible { ticks: u32, elapsed: Duration },
}

static HZ: OnceLock<u16> = OnceLock::new();

/// The kernel's HZ, measured with `ebpf`'s `lb_clock` the first time (blocks for
/// [`WINDOW`]) and remembered for the process after that.
pub fn kernel_hz(ebpf: &mut Ebpf) -> Result<u16, ClockError> {
    Ok(KernelClock::new(ebpf)?.hz())
}

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h) as far as a run on a
/// frame needs it; the kernel reads the rest (context, flags, CPU) as zero.
#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
}
const _: () = assert!(size_of::<TestRunAttr>() == 40);

/// The kernel's jiffies, read through a descriptor of `lb_clock` that outlives the borrow
/// of the object it came from (so it can move into a task), and their rate.
#[derive(Debug)]
pub struct KernelClock {
    prog: ProgramFd,
    hz: u16,
}

impl KernelClock {
    /// A clock from `ebpf`'s `lb_clock` (loaded here if it is not yet). Blocks for the HZ
    /// measurement the first time in a process.
    pub fn new(ebpf: &mut Ebpf) -> Result<KernelClock, ClockError> {
        let prog: &mut Xdp = ebpf
            .program_mut(maps::PROG_CLOCK)
            .ok_or(ClockError::Missing)?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load()?;
        }
        let prog = prog
            .fd()?
            .try_clone()
            .map_err(|source| ClockError::Run { source })?;
        let mut clock = KernelClock { prog, hz: 0 };
        clock.hz = match HZ.get() {
            Some(hz) => *hz,
            None => {
                let hz = clock.measure()?;
                *HZ.get_or_init(|| hz)
            }
        };
        Ok(clock)
    }

    /// The kernel's tick rate.
    pub fn hz(&self) -> u16 {
        self.hz
    }

    /// Whole ticks in `d` (rounded down).
    pub fn ticks(&self, d: Duration) -> u64 {
        ticks(d, self.hz)
    }

    /// `bpf_jiffies64()` now.
    pub fn now(&self) -> Result<u64, ClockError> {
        let frame = [0u8; FRAME];
        let mut out = [0u8; FRAME];
        let mut attr = TestRunAttr {
            prog_fd: self.prog.as_fd().as_raw_fd() as u32,
            data_size_in: FRAME as u32,
            data_size_out: FRAME as u32,
            data_in: frame.as_ptr() as u64,
            data_out: out.as_mut_ptr() as u64,
            repeat: 1,
            ..Default::default()
        };
        // SAFETY: `attr` is a valid `union bpf_attr` prefix for BPF_PROG_TEST_RUN that lives
        // across the call; `frame` is read and `out` written by the kernel, each at most
        // `FRAME` bytes as the attribute says, and both outlive the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &mut attr as *mut TestRunAttr,
                size_of::<TestRunAttr>(),
            )
        };
        if ret < 0 {
            return Err(ClockError::Run {
                source: io::Error::last_os_error(),
            });
        }
        let mut now = [0u8; 8];
        now.copy_from_slice(&out[..8]);
        Ok(u64::from_ne_bytes(now))
    }

    /// HZ from two readings [`WINDOW`] apart.
    fn measure(&self) -> Result<u16, ClockError> {
        let before = self.now()?;
        let start = Instant::now();
        std::thread::sleep(WINDOW);
        let ticks = self.now()?.wrapping_sub(before);
        let ticks = u32::try_from(ticks).unwrap_or(u32::MAX);
        let hz = rate(ticks, start.elapsed())?;
        tracing::debug!(hz, ticks, "kernel tick rate measured");
        Ok(hz)
    }
}

/// Whole ticks at `hz` in `d` (rounded down).
pub fn ticks(d: Duration, hz: u16) -> u64 {
    u64::try_from(d.as_nanos() * u128::from(hz) / 1_000_000_000).unwrap_or(u64::MAX)
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
    fn durations_become_whole_ticks_rounded_down() {
        let ms = Duration::from_millis;
        assert_eq!(ticks(ms(1000), 250), 250);
        assert_eq!(ticks(ms(1200), 300), 360);
        assert_eq!(ticks(ms(1203), 100), 120, "never past the duration");
        assert_eq!(ticks(ms(3), 250), 0);
        assert_eq!(ticks(Duration::MAX, 1000), u64::MAX);
    }

    #[test]
    fn other_rates_are_rounded_and_nonsense_refused() {
        assert_eq!(rate(1200, Duration::from_secs(2)).unwrap(), 600);
        assert!(rate(0, Duration::from_millis(200)).is_err());
        assert!(rate(u32::MAX, Duration::from_millis(200)).is_err());
    }
}
