//! Guest memory as the front-end shares it, and fast guest-address translation.
//!
//! Owns: the mappings of the fds a front-end sends with `SET_MEM_TABLE` (memfd or
//! hugetlbfs, mapped through `vm-memory`), the sorted region table, and translation of
//! guest-physical addresses (descriptors) and front-end virtual addresses (ring
//! addresses, vhost-user §"Memory access") to pointers in this process.
//! Must not: read or write guest memory itself (the ring engine does that) or outlive
//! its mappings (users hold an `Arc<GuestMemory>`, so a replaced table stays mapped
//! until the last worker dropped it).
//!
//! A region must lie inside its file (fstat at map time): pages past the end of a file
//! raise SIGBUS when touched. A file the front-end truncates later is `sigbus.rs`'s
//! business: every mapping is registered there, and [`GuestMemory::faulted`] says whether
//! one of its pages had to be repaired (the device is then broken).
//!
//! Why our own table instead of `vm_memory::GuestMemoryMmap`: the hot path translates
//! every descriptor, and vm-memory's `GuestMemory` walks a binary search plus bounds and
//! bitmap bookkeeping per access.
//! Here a caller keeps a hint (the last region it hit) and only falls back to a
//! binary search over the sorted table on a miss: never a tree walk per descriptor.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};

use vm_memory::{FileOffset, MmapRegion};

use crate::error::{Error, Result};
use crate::sigbus;

/// One region of guest memory, as the front-end described it.
#[derive(Debug, Clone, Copy)]
pub struct RegionDesc {
    /// Guest-physical start address.
    pub gpa: u64,
    /// Size in bytes.
    pub len: u64,
    /// Start address in the front-end's own address space (used for ring addresses).
    pub uva: u64,
    /// Offset into the fd where the region starts.
    pub mmap_offset: u64,
}

#[derive(Debug)]
struct Region {
    gpa: u64,
    len: u64,
    uva: u64,
    host: *mut u8,
}

/// The mapped guest memory of one device.
pub struct GuestMemory {
    /// Sorted by `gpa`, non-overlapping in gpa space.
    regions: Vec<Region>,
    /// The mappings' registrations with the SIGBUS handler; declared before `_maps` so
    /// they are dropped (unregistered) before the mappings go.
    guards: Vec<sigbus::Guard>,
    /// Keeps the mappings alive; `regions[i].host` points into `maps[i]`.
    _maps: Vec<MmapRegion<()>>,
    /// A repaired fault has been reported (see [`GuestMemory::take_fault`]).
    fault_taken: AtomicBool,
}

// SAFETY: `GuestMemory` only holds raw pointers into mappings it owns (`_maps`); the
// pointers stay valid for its lifetime and are never dereferenced here. Access to the
// memory they point to is the callers' business, which they do with volatile/atomic
// operations (the memory is shared with another process anyway).
unsafe impl Send for GuestMemory {}
// SAFETY: as above; `GuestMemory` has no interior mutability.
unsafe impl Sync for GuestMemory {}

impl std::fmt::Debug for GuestMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMemory").field("regions", &self.regions).finish()
    }
}

/// A translation hint: the index of the region the caller hit last.
pub type Hint = usize;

impl GuestMemory {
    /// Maps `files[i]` for `regions[i]` and validates the table: non-empty regions,
    /// no address overflow, no overlap in guest-physical or front-end virtual space.
    pub fn map(regions: &[RegionDesc], files: Vec<File>) -> Result<GuestMemory> {
        if regions.len() != files.len() {
            return Err(Error::Memory(format!(
                "{} regions but {} file descriptors",
                regions.len(),
                files.len()
            )));
        }
        let mut table = Vec::with_capacity(regions.len());
        let mut maps = Vec::with_capacity(regions.len());
        let mut guards = Vec::with_capacity(regions.len());
        for (r, file) in regions.iter().zip(files) {
            if r.len == 0 {
                return Err(Error::Memory(format!("empty region at gpa {:#x}", r.gpa)));
            }
            if r.gpa.checked_add(r.len).is_none()
                || r.uva.checked_add(r.len).is_none()
                || r.mmap_offset.checked_add(r.len).is_none()
            {
                return Err(Error::Memory(format!("region at gpa {:#x} overflows", r.gpa)));
            }
            let size = usize::try_from(r.len)
                .map_err(|_| Error::Memory(format!("region of {} bytes too large", r.len)))?;
            let page = check_file(&file, r)?;
            let map =
                MmapRegion::<()>::from_file(FileOffset::new(file, r.mmap_offset), size).map_err(|e| {
                    Error::Memory(format!(
                        "mmap of region gpa {:#x} len {:#x} offset {:#x}: {e}",
                        r.gpa, r.len, r.mmap_offset
                    ))
                })?;
            guards.push(sigbus::register(map.as_ptr(), size, page)?);
            table.push(Region { gpa: r.gpa, len: r.len, uva: r.uva, host: map.as_ptr() });
            maps.push(map);
        }
        // Sort both vectors together by gpa.
        let mut order: Vec<usize> = (0..table.len()).collect();
        order.sort_by_key(|&i| table[i].gpa);
        let mut sorted = Vec::with_capacity(table.len());
        let mut sorted_maps = Vec::with_capacity(table.len());
        let mut slots: Vec<Option<(Region, MmapRegion<()>)>> =
            table.into_iter().zip(maps).map(Some).collect();
        for i in order {
            let (r, m) = slots[i].take().expect("each index taken once");
            sorted.push(r);
            sorted_maps.push(m);
        }
        for w in sorted.windows(2) {
            if w[0].gpa + w[0].len > w[1].gpa {
                return Err(Error::Memory(format!(
                    "regions at gpa {:#x} and {:#x} overlap",
                    w[0].gpa, w[1].gpa
                )));
            }
        }
        let mut by_uva: Vec<(u64, u64)> = sorted.iter().map(|r| (r.uva, r.len)).collect();
        by_uva.sort_unstable();
        for w in by_uva.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                return Err(Error::Memory(format!(
                    "regions at front-end address {:#x} and {:#x} overlap",
                    w[0].0, w[1].0
                )));
            }
        }
        Ok(GuestMemory { regions: sorted, guards, _maps: sorted_maps, fault_taken: AtomicBool::new(false) })
    }

    /// Whether a page of this memory was taken away under us (the SIGBUS handler
    /// repaired an access to it).
    pub fn faulted(&self) -> bool {
        self.guards.iter().any(|g| g.faults() > 0)
    }

    /// [`faulted`](Self::faulted), true once only: for counting each lost table once.
    pub fn take_fault(&self) -> bool {
        // Relaxed: a count-once flag, ordered with nothing else.
        self.faulted() && !self.fault_taken.swap(true, Ordering::Relaxed)
    }

    /// Number of regions.
    pub fn region_count(&self) -> usize {
        self.regions.len()
    }

    /// Translates `[gpa, gpa + len)`, `len > 0`, to a host pointer and the number of
    /// bytes (at most `len`) that are contiguous in the region holding `gpa`. `None` if
    /// `gpa` lies in no region. Checks the hinted region first and updates the hint on a
    /// miss (binary search over the sorted table).
    #[inline(always)]
    pub fn translate(&self, hint: &mut Hint, gpa: u64, len: u64) -> Option<(*mut u8, u64)> {
        let r = match self.regions.get(*hint) {
            Some(r) if gpa.wrapping_sub(r.gpa) < r.len => r,
            _ => {
                let i = self.find(gpa)?;
                *hint = i;
                &self.regions[i]
            }
        };
        let off = gpa - r.gpa;
        let avail = r.len - off;
        // SAFETY: `off < r.len`, so the result stays inside the mapping of this region.
        let host = unsafe { r.host.add(off as usize) };
        Some((host, avail.min(len)))
    }

    /// Translates a guest-physical range that must lie entirely inside one region (an
    /// indirect descriptor table). `None` otherwise.
    #[inline]
    pub fn translate_whole(&self, hint: &mut Hint, gpa: u64, len: u64) -> Option<*mut u8> {
        match self.translate(hint, gpa, len) {
            Some((p, n)) if n == len => Some(p),
            _ => None,
        }
    }

    /// Translates a front-end virtual address range (ring addresses arrive as such
    /// unless GPA addressing is negotiated) that must lie inside one region.
    pub fn uva_to_host(&self, uva: u64, len: u64) -> Option<*mut u8> {
        self.uva_span(uva).and_then(|(p, _, after)| (len <= after).then_some(p))
    }

    /// Where the front-end virtual address `uva` lies here: its pointer, and how many
    /// bytes of its region lie before it and from it to the region's end (the IOTLB
    /// clips its translations to one region with these).
    pub fn uva_span(&self, uva: u64) -> Option<(*mut u8, u64, u64)> {
        self.regions.iter().find_map(|r| {
            let off = uva.checked_sub(r.uva)?;
            // SAFETY: `off < r.len`: inside this region's mapping.
            (off < r.len).then(|| (unsafe { r.host.add(off as usize) }, off, r.len - off))
        })
    }

    /// Translates a front-end virtual address to the guest-physical address of the same
    /// byte (for tests).
    #[cfg(test)]
    pub fn uva_to_gpa(&self, uva: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = uva.checked_sub(r.uva)?;
            (off < r.len).then_some(r.gpa + off)
        })
    }

    fn find(&self, gpa: u64) -> Option<usize> {
        // Index of the last region whose start is <= gpa.
        let i = self.regions.partition_point(|r| r.gpa <= gpa).checked_sub(1)?;
        let r = &self.regions[i];
        (gpa - r.gpa < r.len).then_some(i)
    }
}

/// Checks that `r` lies inside `file` (so no page of the mapping is past the file's end,
/// which would raise SIGBUS when touched) and returns the file's page size (the huge page
/// size on hugetlbfs, whose `st_blksize` is that). Only regular files are accepted: memfd,
/// hugetlbfs and tmpfs files are; a device or pipe has no size to check.
fn check_file(file: &File, r: &RegionDesc) -> Result<usize> {
    // SAFETY: fstat writes a `stat` into the local; the fd is open (owned by `file`).
    let st = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(file.as_raw_fd(), &mut st) != 0 {
            return Err(Error::Memory(format!(
                "region at gpa {:#x}: fstat: {}",
                r.gpa,
                std::io::Error::last_os_error()
            )));
        }
        st
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(Error::Memory(format!(
            "region at gpa {:#x}: its file descriptor is not a regular file (mode {:#o})",
            r.gpa, st.st_mode
        )));
    }
    let file_len = u64::try_from(st.st_size).unwrap_or(0);
    let end = r.mmap_offset.saturating_add(r.len);
    if end > file_len {
        return Err(Error::Memory(format!(
            "region at gpa {:#x} (offset {:#x} + {:#x} bytes) is longer than its file ({file_len:#x} bytes)",
            r.gpa, r.mmap_offset, r.len
        )));
    }
    Ok(usize::try_from(st.st_blksize).unwrap_or(4096))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    /// A memfd of `len` bytes, for tests.
    pub(crate) fn memfd(len: u64) -> File {
        // SAFETY: memfd_create with a valid NUL-terminated name; the fd is checked.
        let fd = unsafe { libc::memfd_create(c"vnet-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create failed");
        // SAFETY: `fd` is a fresh, owned descriptor.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).expect("ftruncate memfd");
        f
    }

    #[test]
    fn translates_with_hint_and_splits_at_region_end() {
        let regions = [
            RegionDesc { gpa: 0x10000, len: 0x1000, uva: 0x7000_0000, mmap_offset: 0 },
            RegionDesc { gpa: 0x0, len: 0x1000, uva: 0x6000_0000, mmap_offset: 0 },
            RegionDesc { gpa: 0x1000, len: 0x2000, uva: 0x5000_0000, mmap_offset: 0 },
        ];
        let files = vec![memfd(0x1000), memfd(0x1000), memfd(0x2000)];
        let m = GuestMemory::map(&regions, files).unwrap();
        let mut hint = 0;
        let (_, n) = m.translate(&mut hint, 0x800, 0x1000).unwrap();
        assert_eq!(n, 0x800, "stops at the end of region 0");
        assert_eq!(hint, 0);
        let (_, n) = m.translate(&mut hint, 0x1000, 0x100).unwrap();
        assert_eq!((n, hint), (0x100, 1));
        assert!(m.translate(&mut hint, 0x3000, 1).is_none(), "hole");
        assert!(m.translate(&mut hint, 0x11000, 1).is_none(), "past the end");
        assert!(m.translate(&mut hint, u64::MAX, 1).is_none());
        assert!(m.translate_whole(&mut hint, 0x10ff0, 0x20).is_none());
        assert!(m.uva_to_host(0x6000_0ff0, 0x10).is_some());
        assert!(m.uva_to_host(0x6000_0ff0, 0x11).is_none());
        assert_eq!(m.uva_to_gpa(0x7000_0010), Some(0x10010));
    }

    #[test]
    fn rejects_overlap_and_overflow() {
        let r = |gpa, len, uva| RegionDesc { gpa, len, uva, mmap_offset: 0 };
        assert!(GuestMemory::map(
            &[r(0, 0x2000, 0), r(0x1000, 0x1000, 0x10000)],
            vec![memfd(0x2000), memfd(0x1000)]
        )
        .is_err());
        assert!(GuestMemory::map(&[r(u64::MAX - 10, 0x1000, 0)], vec![memfd(0x1000)]).is_err());
        assert!(GuestMemory::map(&[r(0, 0, 0)], vec![memfd(0x1000)]).is_err());
    }

    #[test]
    fn refuses_a_region_longer_than_its_file() {
        let r = |len, mmap_offset| RegionDesc { gpa: 0, len, uva: 0, mmap_offset };
        let e = GuestMemory::map(&[r(0x2000, 0)], vec![memfd(0x1000)]).unwrap_err();
        assert!(e.to_string().contains("longer than its file"), "{e}");
        assert!(GuestMemory::map(&[r(0x1000, 0x1000)], vec![memfd(0x1000)]).is_err());
        assert!(GuestMemory::map(&[r(0x1000, 0x1000)], vec![memfd(0x2000)]).is_ok());
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let sock = File::from(std::os::fd::OwnedFd::from(a));
        let e = GuestMemory::map(&[r(0x1000, 0)], vec![sock]).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn a_truncated_file_marks_the_memory_faulted() {
        let f = memfd(0x4000);
        let dup = f.try_clone().unwrap();
        let m =
            GuestMemory::map(&[RegionDesc { gpa: 0, len: 0x4000, uva: 0, mmap_offset: 0 }], vec![f]).unwrap();
        assert!(!m.faulted());
        dup.set_len(0).unwrap();
        let mut hint = 0;
        let (p, _) = m.translate(&mut hint, 0x3000, 8).unwrap();
        // SAFETY: inside the mapping; the page is gone from the file and the handler
        // repairs it with zeros.
        assert_eq!(unsafe { p.read_volatile() }, 0);
        assert!(m.faulted());
        assert!(m.take_fault());
        assert!(!m.take_fault(), "reported once");
    }
}
