//! Writing an array map through a memory mapping of it (`BPF_F_MMAPABLE`, Linux 5.5+): a
//! Maglev table becomes a copy into memory instead of one `bpf(2)` update per slot.
//!
//! The mapping is the map's own memory, so a BPF program sees a slot change as soon as it is
//! written, exactly as after a `BPF_MAP_UPDATE_ELEM` on an array (an in-place copy there
//! too). Tables are only written into regions no service entry points to; the entry is
//! switched afterwards by a `bpf(2)` update, which orders it after these stores.
//!
//! Only a window of the map is mapped at a time, and unmapped when the writer is dropped:
//! mapped pages count towards the agent's resident memory, and the map may be large.

use std::{
    io,
    mem::size_of,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    ptr,
};

use aya::{Pod, maps::MapData};

/// Bytes mapped at least at a time (then at most as many more as one write needs).
const WINDOW: usize = 1 << 20;

/// Writes slots of one mmapable array map with values of type `T`.
pub struct ArrayWriter<'a, T: Pod> {
    fd: BorrowedFd<'a>,
    /// Bytes of one slot in the map's memory: the value size rounded up to 8 (as the kernel
    /// lays array elements out).
    stride: usize,
    /// Bytes of the map's memory (what `mmap` accepts: whole pages).
    map_bytes: usize,
    page: usize,
    /// The current window: its offset in the map's memory, length and address.
    window: Option<(usize, usize, *mut u8)>,
    _value: std::marker::PhantomData<T>,
}

impl<'a, T: Pod> ArrayWriter<'a, T> {
    /// A writer for `map`, an array of `max_entries` values of type `T` created with
    /// `BPF_F_MMAPABLE`. Nothing is mapped until the first write.
    pub fn new(map: &'a MapData, max_entries: u32) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = usize::try_from(page).map_err(|_| io::Error::last_os_error())?;
        let stride = size_of::<T>().next_multiple_of(8);
        Ok(ArrayWriter {
            fd: map.fd().as_fd(),
            stride,
            map_bytes: (max_entries as usize * stride).next_multiple_of(page),
            page,
            window: None,
            _value: std::marker::PhantomData,
        })
    }

    /// Write `values` into slots `first`, `first + 1`, ...
    pub fn write(&mut self, first: u32, values: &[T]) -> io::Result<()> {
        let begin = first as usize * self.stride;
        let end = begin + values.len() * self.stride;
        if end > self.map_bytes {
            return Err(io::Error::from_raw_os_error(libc::E2BIG));
        }
        if values.is_empty() {
            return Ok(());
        }
        let base = match self.window {
            Some((start, len, addr)) if start <= begin && end <= start + len => {
                // SAFETY: `begin - start` is within the window.
                unsafe { addr.add(begin - start) }
            }
            _ => {
                let (start, addr) = self.map_window(begin, end)?;
                // SAFETY: the new window starts at or before `begin` and covers `end`.
                unsafe { addr.add(begin - start) }
            }
        };
        for (i, v) in values.iter().enumerate() {
            // SAFETY: slot `first + i` lies in the mapped window (checked above), is aligned
            // to 8 (page-aligned window, stride a multiple of 8) and is not otherwise
            // referenced from Rust. Volatile: BPF programs may read the memory concurrently.
            unsafe { ptr::write_volatile(base.add(i * self.stride).cast::<T>(), *v) };
        }
        Ok(())
    }

    /// Replace the window by one covering bytes `begin..end` of the map's memory.
    fn map_window(&mut self, begin: usize, end: usize) -> io::Result<(usize, *mut u8)> {
        self.unmap();
        let start = begin / self.page * self.page;
        let len = (end - start)
            .max(WINDOW)
            .next_multiple_of(self.page)
            .min(self.map_bytes - start);
        let offset = libc::off_t::try_from(start).map_err(|_| io::Error::other("offset"))?;
        // SAFETY: a new shared mapping of the map's fd, no fixed address; the kernel checks
        // that `offset..offset + len` lies within the map and that it is mmapable.
        let addr = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                self.fd.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr = addr.cast::<u8>();
        self.window = Some((start, len, addr));
        Ok((start, addr))
    }

    fn unmap(&mut self) {
        if let Some((_, len, addr)) = self.window.take() {
            // SAFETY: `addr`/`len` are a mapping this writer made and nothing else uses.
            unsafe { libc::munmap(addr.cast(), len) };
        }
    }
}

impl<T: Pod> Drop for ArrayWriter<'_, T> {
    fn drop(&mut self) {
        self.unmap();
    }
}
