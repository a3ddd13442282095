//! Word loads and stores in packet memory.
//!
//! The BPF target assumes strict alignment, so the compiler splits an access to a multi-byte
//! header field (network-types headers are byte arrays: align 1) into byte loads and shifts,
//! or byte stores: 32 loads for one IPv6 address pair. The packet is not word-aligned in
//! general (the IP header follows a 14-byte Ethernet header), but the kernel accepts
//! unaligned packet access: always on architectures with efficient unaligned access (x86-64,
//! arm64), and elsewhere the verifier only asks for alignment relative to a start shifted by
//! two bytes (NET_IP_ALIGN), which every header word after Ethernet has. These functions
//! emit the single load or store instruction directly. Bytes keep their order: a word holds
//! the bytes exactly as they are in memory (network byte order stays network byte order).
//!
//! # Safety
//!
//! For every function: `p + OFF` up to the end of the access must lie inside the packet,
//! checked against `data_end` in a way the verifier sees (through [`crate::parse::ptr_at`]
//! for a header that contains it, derived after the last head adjustment).

use core::arch::asm;

/// The 32-bit word at `OFF` bytes after `p`.
#[inline(always)]
pub unsafe fn load32<const OFF: i16>(p: *const u8) -> u32 {
    let v: u64;
    // SAFETY: module contract; the instruction reads 4 bytes and nothing else.
    unsafe {
        asm!(
            "{v} = *(u32 *)({p} + {off})",
            p = in(reg) p,
            off = const OFF,
            v = lateout(reg) v,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    v as u32
}

/// The four words of a 16-byte address at `OFF` bytes after `p`.
#[inline(always)]
pub unsafe fn load_addr<const OFF: usize>(p: *const u8) -> [u32; 4] {
    let a = p.wrapping_add(OFF);
    // SAFETY: module contract, for all 16 bytes.
    unsafe {
        [
            load32::<0>(a),
            load32::<4>(a),
            load32::<8>(a),
            load32::<12>(a),
        ]
    }
}

/// The 16-bit half-word at `OFF` bytes after `p`.
#[inline(always)]
pub unsafe fn load16<const OFF: i16>(p: *const u8) -> u16 {
    let v: u64;
    // SAFETY: module contract; the instruction reads 2 bytes and nothing else.
    unsafe {
        asm!(
            "{v} = *(u16 *)({p} + {off})",
            p = in(reg) p,
            off = const OFF,
            v = lateout(reg) v,
            options(pure, readonly, nostack, preserves_flags),
        );
    }
    v as u16
}

/// A MAC address as the three half-words it is in memory.
pub type MacWords = [u16; 3];

/// The MAC address at `OFF` bytes after `p`.
#[inline(always)]
pub unsafe fn load_mac<const OFF: usize>(p: *const u8) -> MacWords {
    let a = p.wrapping_add(OFF);
    // SAFETY: module contract, for all 6 bytes.
    unsafe { [load16::<0>(a), load16::<2>(a), load16::<4>(a)] }
}

/// Store the 32-bit word `v` at `OFF` bytes after `p`.
#[inline(always)]
pub unsafe fn store32<const OFF: i16>(p: *mut u8, v: u32) {
    // SAFETY: module contract; the instruction writes 4 bytes and nothing else.
    unsafe {
        asm!(
            "*(u32 *)({p} + {off}) = {v}",
            p = in(reg) p,
            off = const OFF,
            v = in(reg) v as u64,
            options(nostack, preserves_flags),
        );
    }
}

/// Store the 16-bit half-word `v` at `OFF` bytes after `p`.
#[inline(always)]
pub unsafe fn store16<const OFF: i16>(p: *mut u8, v: u16) {
    // SAFETY: module contract; the instruction writes 2 bytes and nothing else.
    unsafe {
        asm!(
            "*(u16 *)({p} + {off}) = {v}",
            p = in(reg) p,
            off = const OFF,
            v = in(reg) v as u64,
            options(nostack, preserves_flags),
        );
    }
}

/// The word whose bytes in memory are those of `first`, then those of `second` (two
/// half-words as they are in memory).
#[inline(always)]
pub fn join(first: u16, second: u16) -> u32 {
    let (a, b) = (first.to_ne_bytes(), second.to_ne_bytes());
    u32::from_ne_bytes([a[0], a[1], b[0], b[1]])
}
