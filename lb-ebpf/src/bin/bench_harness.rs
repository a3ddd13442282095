//! Benchmark harness for `cargo xtask bench` (a separate object; the load balancer never
//! loads it).
//!
//! `bench_harness` runs first in every BPF_PROG_TEST_RUN iteration: it puts the frame back
//! exactly as the kernel handed it to the first iteration (data pointer, length, bytes), then
//! tail-calls the program under test, so each measured iteration processes a fresh,
//! unmodified packet. Its own cost is measured by tail-calling `bench_drop` and subtracted.
//! It always makes the same helper calls (head and tail adjustments of zero included), so
//! that cost does not depend on what the program under test did.
//!
//! `bench_drop`, `bench_pass` and `bench_macswap` are the baselines: the cheapest programs
//! with each verdict.
//!
//! `bench_gen` and `bench_sink` serve the end-to-end measurement: a live-frames traffic
//! generator and a counting drop at the far end of the load balancer's link.
#![no_std]
#![no_main]

use core::ptr::{addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX},
    btf_maps::{Array, PerCpuArray, ProgramArray},
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_store_bytes},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use lb_common::bench::{
    FRAME_MAX, GEN_FRAME_MAX, GEN_SPORT_OFFSET, GenFrame, HarnessFrame, MAX_HEAD_DELTA,
    SINK_BACKEND0, SINK_BACKENDS, SINK_FOREIGN, SINK_MALFORMED, SINK_OTHER, SINK_SLOTS, SINK_TOTAL,
    SinkConfig, TARGET_SLOT,
};

#[btf_map]
static BENCH_PROGS: ProgramArray<1> = ProgramArray::new();

#[btf_map]
static BENCH_FRAME: Array<HarnessFrame, 1> = Array::new();

#[btf_map]
static BENCH_GEN: Array<GenFrame, 1> = Array::new();

#[btf_map]
static BENCH_SINK_CFG: Array<SinkConfig, 1> = Array::new();

#[btf_map]
static BENCH_SINK: PerCpuArray<u64, { SINK_SLOTS as usize }> = PerCpuArray::new();

#[xdp]
pub fn bench_harness(ctx: XdpContext) -> u32 {
    let Some(frame) = BENCH_FRAME.get_ptr_mut(0) else {
        return XDP_ABORTED;
    };
    // SAFETY: the map value stays valid for this run; one CPU runs the test at a time.
    unsafe {
        (*frame).runs += 1;
        if restore(&ctx, frame).is_err() {
            (*frame).errors += 1;
            return XDP_ABORTED;
        }
        BENCH_PROGS.tail_call(&ctx, TARGET_SLOT);
        // Only reached when the tail call failed (empty slot, incompatible program).
        (*frame).errors += 1;
    }
    XDP_ABORTED
}

/// A packet pointer as a plain number: stored into the map value and read back (only a
/// privileged loader may do this; the bench runs as root). Volatile keeps the compiler from
/// forwarding the pointer itself, and so keeps the verifier from seeing pointer arithmetic.
///
/// # Safety
/// `frame` points to the value of `BENCH_FRAME`.
#[inline(always)]
unsafe fn address(frame: *mut HarnessFrame, ptr: usize) -> u64 {
    // SAFETY: `frame` is valid (caller).
    unsafe {
        let scratch = addr_of_mut!((*frame).scratch);
        write_volatile(scratch, ptr as u64);
        read_volatile(scratch)
    }
}

/// Move the data pointer back to the first iteration's position, restore the length, and
/// copy the pristine bytes in.
///
/// # Safety
/// `frame` points to the value of `BENCH_FRAME`.
#[inline(always)]
unsafe fn restore(ctx: &XdpContext, frame: *mut HarnessFrame) -> Result<(), ()> {
    // SAFETY: `frame` is valid (caller), here and below.
    let data = unsafe { address(frame, ctx.data()) };
    let anchor = unsafe {
        if (*frame).anchor == 0 {
            (*frame).anchor = data;
        }
        (*frame).anchor
    };
    // Positive when the program under test pushed headers in front of the frame.
    let delta = anchor.wrapping_sub(data) as i64;
    if !(-MAX_HEAD_DELTA..=MAX_HEAD_DELTA).contains(&delta) {
        return Err(());
    }
    // SAFETY: helper calls on our own context; no packet pointer is kept across them.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, delta as i32) } != 0 {
        return Err(());
    }
    let (start, end) = unsafe { (address(frame, ctx.data()), address(frame, ctx.data_end())) };
    let want = unsafe { (*frame).len } as i64;
    let have = end.wrapping_sub(start) as i64;
    // SAFETY: as above.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, (want - have) as i32) } != 0 {
        return Err(());
    }
    let len = want as u32;
    if len == 0 || len > FRAME_MAX as u32 {
        return Err(());
    }
    // SAFETY: `bytes` holds FRAME_MAX bytes and `len` is within 1..=FRAME_MAX; the frame is
    // now exactly `len` bytes long.
    let copied =
        unsafe { bpf_xdp_store_bytes(ctx.ctx, 0, addr_of_mut!((*frame).bytes).cast(), len) };
    if copied != 0 {
        return Err(());
    }
    Ok(())
}

/// Baseline: drop, touching nothing.
#[xdp]
pub fn bench_drop(_ctx: XdpContext) -> u32 {
    XDP_DROP
}

/// Baseline: pass, touching nothing.
#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// Baseline: swap source and destination MAC, send back out.
#[xdp]
pub fn bench_macswap(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        return XDP_PASS;
    }
    let macs = start as *mut [u8; 12];
    // SAFETY: the 12 bytes were bounds-checked above.
    unsafe {
        let m = *macs;
        let mut swapped = [0u8; 12];
        swapped[..6].copy_from_slice(&m[6..]);
        swapped[6..].copy_from_slice(&m[..6]);
        *macs = swapped;
    }
    XDP_TX
}

/// Traffic generator (BPF_F_TEST_XDP_LIVE_FRAMES, one CPU): write the whole frame, set the
/// flow's source port, send it.
#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    let Some(g) = BENCH_GEN.get_ptr_mut(0) else {
        return XDP_ABORTED;
    };
    // SAFETY: the map value stays valid for this run; only the generating CPU writes it.
    unsafe {
        let len = (*g).len;
        if len < (GEN_SPORT_OFFSET + 2) as u32 || len > GEN_FRAME_MAX as u32 {
            return XDP_ABORTED;
        }
        if bpf_xdp_store_bytes(ctx.ctx, 0, addr_of_mut!((*g).bytes).cast(), len) != 0 {
            return XDP_ABORTED;
        }
        let n = (*g).sent;
        (*g).sent = n + 1;
        let flows = u64::from((*g).flows.max(1));
        let sport = (*g).sport_base.wrapping_add((n % flows) as u16);
        let start = ctx.data();
        if start + GEN_SPORT_OFFSET + 2 > ctx.data_end() {
            return XDP_ABORTED;
        }
        *((start + GEN_SPORT_OFFSET) as *mut [u8; 2]) = sport.to_be_bytes();
    }
    XDP_TX
}

#[inline(always)]
fn sink_count(slot: u32) {
    if let Some(c) = BENCH_SINK.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot is only touched by this CPU while the program runs.
        unsafe { *c += 1 };
    }
}

/// Which `BENCH_SINK` slot a frame belongs to.
#[inline(always)]
fn sink_classify(ctx: &XdpContext) -> u32 {
    let Some(cfg) = BENCH_SINK_CFG.get(0) else {
        return SINK_OTHER;
    };
    let start = ctx.data();
    if start + 42 > ctx.data_end() {
        return SINK_FOREIGN;
    }
    // SAFETY: 42 bytes (Ethernet, a 20-byte IPv4 header, UDP) were bounds-checked above.
    let (eth, ip, udp) = unsafe {
        (
            *(start as *const [u8; 14]),
            *((start + 14) as *const [u8; 20]),
            *((start + 34) as *const [u8; 8]),
        )
    };
    if eth[12..14] != [0x08, 0x00] {
        return SINK_FOREIGN;
    }
    if ip[0] != 0x45 || ip[9] != 17 {
        return SINK_MALFORMED;
    }
    if udp[2..4] != cfg.port_be.to_ne_bytes() {
        return SINK_MALFORMED;
    }
    let dst_ip = [ip[16], ip[17], ip[18], ip[19]];
    let dst_mac = [eth[0], eth[1], eth[2], eth[3], eth[4], eth[5]];
    for k in 0..SINK_BACKENDS {
        if k >= cfg.backends as usize {
            break;
        }
        if dst_ip == cfg.backend_ip_be[k] || (dst_mac == cfg.backend_mac[k] && dst_ip == cfg.vip_be)
        {
            return SINK_BACKEND0 + k as u32;
        }
    }
    SINK_OTHER
}

/// The far end of the load balancer's link: count, then drop.
#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    sink_count(SINK_TOTAL);
    sink_count(sink_classify(&ctx));
    XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
