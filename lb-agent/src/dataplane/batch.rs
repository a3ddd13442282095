//! `BPF_MAP_UPDATE_BATCH` (Linux 5.6+), which aya 0.14 does not expose: one `bpf(2)` call
//! writes many entries of a map. Writing a 1031-slot Maglev table slot by slot is 1031
//! syscalls; at 10,000 services that was most of a full sync.
//!
//! The kernel updates the entries one by one, in order, exactly as `BPF_MAP_UPDATE_ELEM`
//! would (for an array: a copy of each value into its slot), so a reader of the map sees
//! each entry either old or new, as with single updates.

use std::{
    io,
    mem::{size_of, size_of_val},
    os::fd::{AsFd, AsRawFd},
};

use aya::{
    Pod,
    maps::{MapData, MapType},
    util::nr_cpus,
};

/// `BPF_MAP_UPDATE_BATCH` from `enum bpf_cmd` (include/uapi/linux/bpf.h).
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// The kernel's `ENOTSUPP` (not in libc): the map type has no batch operations.
const ENOTSUPP: i32 = 524;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h). The kernel accepts an
/// attribute shorter than its own union and reads the rest as zero.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    /// In: entries to write; out: entries written (unused here: a retry rewrites them all).
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}
const _: () = assert!(size_of::<BatchAttr>() == 56);

/// The kernel has no batch update (before 5.6) or none for this map type.
pub fn unsupported(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
}

/// Write the value(s) of each key, in order, in one `bpf(2)` call: `values[i]` under `keys[i]`,
/// or for a per-CPU map `values[i * cpus..(i + 1) * cpus]` (one per possible CPU, `V`'s size
/// a multiple of 8 as the kernel lays them out). The buffers are checked against the map's
/// key and value sizes first. On error a prefix of the entries may have been written.
pub fn update<K: Pod, V: Pod>(map: &MapData, keys: &[K], values: &[V]) -> io::Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let info = map.info().map_err(io::Error::other)?;
    let per_cpu = matches!(
        info.map_type(),
        Ok(MapType::PerCpuArray | MapType::PerCpuHash | MapType::LruPerCpuHash)
    );
    let value_bytes = if per_cpu {
        let cpus = nr_cpus().map_err(|(_, e)| e)?;
        (info.value_size() as usize).next_multiple_of(8) * cpus
    } else {
        info.value_size() as usize
    };
    // What the kernel will read: `count` keys and `count` values of these sizes.
    if size_of::<K>() != info.key_size() as usize || size_of_val(values) != keys.len() * value_bytes
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "keys or values do not match the map's key and value sizes",
        ));
    }
    let count = u32::try_from(keys.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid `union bpf_attr` prefix for BPF_MAP_UPDATE_BATCH that lives
    // across the call; `keys` and `values` hold exactly `count` keys and values of the
    // map's sizes (checked above) and are only read by the kernel, which writes nothing but
    // `attr.count`.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_BATCH,
            &mut attr as *mut BatchAttr,
            size_of::<BatchAttr>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `BPF_MAP_LOOKUP_BATCH` from `enum bpf_cmd`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Read every value of an array map, `chunk` entries per `bpf(2)` call, handing each run of
/// values to `each` in index order. `V` must be the map's value type (checked against its
/// value size); per-CPU arrays are not supported.
pub fn for_each_array_chunk<V: Pod + Default + Clone>(
    map: &MapData,
    chunk: usize,
    mut each: impl FnMut(&[V]),
) -> io::Result<()> {
    let info = map.info().map_err(io::Error::other)?;
    if !matches!(info.map_type(), Ok(MapType::Array))
        || size_of::<V>() != info.value_size() as usize
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an array of values of this size",
        ));
    }
    let chunk = chunk.clamp(1, info.max_entries().max(1) as usize);
    let mut keys = vec![0u32; chunk];
    let mut values = vec![V::default(); chunk];
    let mut token = 0u32;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token as *const u32 as u64
            },
            out_batch: &mut token as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is a valid `union bpf_attr` prefix for BPF_MAP_LOOKUP_BATCH that
        // lives across the call; the kernel writes at most `count` keys (4 bytes each, an
        // array's key) and `count` values of the map's value size (checked above) into
        // buffers of exactly that many, and one u32 batch token (an array's) at `out_batch`.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>(),
            )
        };
        let done = if ret < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOENT) {
                return Err(e);
            }
            true
        } else {
            false
        };
        let n = (attr.count as usize).min(chunk);
        each(&values[..n]);
        if done || n == 0 {
            return Ok(());
        }
        first = false;
    }
}
