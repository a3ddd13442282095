//! Word loads from packet memory.
//!
//! The BPF target assumes strict alignment, so the compiler splits a load of a multi-byte
//! header field (network-types headers are byte arrays: align 1) into byte loads, shifts and
//! ors: 32 loads for one IPv6 address pair. The packet is not word-aligned in general (the IP
//! header follows a 14-byte Ethernet header), but the kernel accepts unaligned packet loads:
//! always on architectures with efficient unaligned access (x86-64, arm64), and elsewhere the
//! verifier only asks for alignment relative to a 2-byte-shifted start (NET_IP_ALIGN), which
//! every field read here has. These functions emit the single load instruction directly; it
//! reads the bytes exactly as they are in memory (network byte order stays network byte
//! order).

use core::arch::asm;

/// The 32-bit word at `OFF` bytes after `p`, as it is in memory.
///
/// # Safety
///
/// `p + OFF .. p + OFF + 4` must lie inside the packet, checked against `data_end` in a way
/// the verifier sees (through [`super::ptr_at`] for a header that contains it).
#[inline(always)]
pub unsafe fn word<const OFF: i16>(p: *const u8) -> u32 {
    let v: u64;
    // SAFETY: caller's contract; the instruction reads 4 bytes and touches nothing else.
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

/// The four words of a 16-byte address at `OFF` bytes after `p`, as they are in memory.
///
/// # Safety
///
/// As for [`word`], for 16 bytes.
#[inline(always)]
pub unsafe fn addr<const OFF: usize>(p: *const u8) -> [u32; 4] {
    let a = p.wrapping_add(OFF);
    // SAFETY: caller's contract covers all 16 bytes.
    unsafe { [word::<0>(a), word::<4>(a), word::<8>(a), word::<12>(a)] }
}
