//! The benchmark harness (`lb-ebpf`'s `lb-bench-harness` object) and `cargo xtask bench`
//! share these names and this layout. Nothing here is used by the load balancer itself.
//!
//! BPF_PROG_TEST_RUN with `repeat` runs a program again and again on one buffer, so every
//! iteration after the first would see what the previous one left (an encapsulated packet,
//! moved data pointers). The harness program runs first in every iteration: it moves the
//! data pointers back to where the kernel put them for the first iteration, restores the
//! length, copies the pristine frame back in, then tail-calls the program under test.

use core::mem::size_of;

/// Program array the harness tail-calls into; slot [`TARGET_SLOT`] holds the program under
/// test.
pub const PROGS: &str = "BENCH_PROGS";
/// Array of one [`HarnessFrame`]: the pristine frame and the harness's counters.
pub const FRAME: &str = "BENCH_FRAME";
/// The slot of [`PROGS`] the harness calls.
pub const TARGET_SLOT: u32 = 0;

/// The harness: restore the frame, tail-call the program in [`TARGET_SLOT`].
pub const PROG_HARNESS: &str = "bench_harness";
/// Baseline: `XDP_DROP`, touching nothing.
pub const PROG_DROP: &str = "bench_drop";
/// Baseline: `XDP_PASS`, touching nothing.
pub const PROG_PASS: &str = "bench_pass";
/// Baseline: swap the Ethernet addresses and `XDP_TX` (the smallest useful forwarder).
pub const PROG_MACSWAP: &str = "bench_macswap";

/// Largest frame the harness can restore.
pub const FRAME_MAX: usize = 1536;
/// Largest head movement (bytes, either way) the harness undoes; the kernel's XDP headroom
/// is 256 bytes, so no program can move it further.
pub const MAX_HEAD_DELTA: i64 = 256;

/// The value of [`FRAME`]'s only entry. Userspace writes `len` and `bytes` and zeroes the
/// rest before each run; the harness fills in `anchor` and counts.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HarnessFrame {
    /// Length of the pristine frame, 14..=[`FRAME_MAX`].
    pub len: u32,
    pub _pad: u32,
    /// Address of the packet data in the first iteration (0 until the harness ran once).
    pub anchor: u64,
    /// Scratch slot: the harness stores the current data address here and reads it back,
    /// which turns the pointer into a plain number it may subtract.
    pub scratch: u64,
    /// Iterations the harness ran.
    pub runs: u64,
    /// Iterations it could not restore, or whose tail call failed (must stay 0).
    pub errors: u64,
    pub bytes: [u8; FRAME_MAX],
}

const _: () = assert!(size_of::<HarnessFrame>() == 40 + FRAME_MAX);

impl HarnessFrame {
    pub const EMPTY: HarnessFrame = HarnessFrame {
        len: 0,
        _pad: 0,
        anchor: 0,
        scratch: 0,
        runs: 0,
        errors: 0,
        bytes: [0; FRAME_MAX],
    };
}

// ---- End to end: a generator and a sink for `cargo xtask bench`'s pps measurement ----

/// Array of one [`GenFrame`]: the frame `bench_gen` sends.
pub const GEN: &str = "BENCH_GEN";
/// Array of one [`SinkConfig`].
pub const SINK_CFG: &str = "BENCH_SINK_CFG";
/// Per-CPU counters of `bench_sink`, indexed by the `SINK_*` slots.
pub const SINK: &str = "BENCH_SINK";

/// Run with BPF_F_TEST_XDP_LIVE_FRAMES: rewrites the whole frame (recycled pages keep what
/// the load balancer wrote into them), varies the UDP source port over `flows` flows, and
/// sends it out of the generator's interface (`XDP_TX`).
pub const PROG_GEN: &str = "bench_gen";
/// Counts what arrives (per backend, well-formed or not) and drops it.
pub const PROG_SINK: &str = "bench_sink";

pub const GEN_FRAME_MAX: usize = 128;
/// Offset of the UDP source port in the generator's frame (Ethernet + 20-byte IPv4).
pub const GEN_SPORT_OFFSET: usize = 34;
/// Backends the sink tells apart.
pub const SINK_BACKENDS: usize = 4;

/// Every frame the sink saw.
pub const SINK_TOTAL: u32 = 0;
/// Well-formed frames for the service that no backend received (e.g. still to the VIP).
pub const SINK_OTHER: u32 = 1;
/// IPv4 but not UDP to the service's port.
pub const SINK_MALFORMED: u32 = 2;
/// Not IPv4 at all (ARP, IPv6 neighbour discovery from the namespaces' own stacks).
pub const SINK_FOREIGN: u32 = 3;
/// `SINK_BACKEND0 + k`: well-formed frames that reached backend `k`.
pub const SINK_BACKEND0: u32 = 4;
pub const SINK_SLOTS: u32 = SINK_BACKEND0 + SINK_BACKENDS as u32;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct GenFrame {
    /// Frame length; the live-frames run must be given a frame of this length.
    pub len: u32,
    /// Source ports `sport_base .. sport_base + flows` are used in turn.
    pub flows: u32,
    pub sport_base: u16,
    pub _pad: [u8; 6],
    /// Frames generated.
    pub sent: u64,
    pub bytes: [u8; GEN_FRAME_MAX],
}

const _: () = assert!(size_of::<GenFrame>() == 24 + GEN_FRAME_MAX);

/// How the sink recognises a backend: the destination address is the backend's (NAT), or
/// the destination MAC is the backend's and the address still the VIP (L2 DSR).
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct SinkConfig {
    pub vip_be: [u8; 4],
    pub backend_ip_be: [[u8; 4]; SINK_BACKENDS],
    pub backend_mac: [[u8; 6]; SINK_BACKENDS],
    /// The service's UDP port (also the backends' port).
    pub port_be: u16,
    pub backends: u8,
    pub _pad: u8,
}

const _: () = assert!(size_of::<SinkConfig>() == 48);
