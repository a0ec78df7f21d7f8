//! The DMA arena: one shared-memory mapping from which every ring and buffer the device
//! accesses is carved.
//!
//! Owns: the memfd (hugetlb when asked), its mapping, a bump allocator used at port
//! setup, and translation from pointers in the arena to the addresses the device uses
//! (IOVA). With virtio-user the arena's fd is what `SET_MEM_TABLE` shares and IOVA =
//! virtual address (DPDK's convention); a VFIO transport with an IOMMU maps the arena at
//! an IOVA base of its choosing; without an IOMMU it installs the physical address of
//! every hugepage ([`IovaMap::Pages`]), and allocations then never cross a page.
//! The memfd's size is sealed (`F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`) before the
//! fd exists anywhere else: a back-end that receives it cannot truncate the memory
//! under our mapping (a SIGBUS on our next access).
//! Must not: allocate on the data path (rings and pools take their memory once).
//!
//! Why our own code instead of `vm-memory`: the driver needs exactly one contiguous
//! mapping with O(1) VA→IOVA arithmetic on the hot path, nothing more.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Mutex;

use crate::error::{Error, Result};

/// How arena offsets become device addresses.
#[derive(Debug, Clone)]
pub enum IovaMap {
    /// IOVA = base + offset (virtio-user: base = VA; VFIO type-1: the mapped IOVA).
    Linear(u64),
    /// Physically addressed pages (VFIO no-IOMMU): IOVA = `pa[offset >> shift]` +
    /// offset within the page. Only memory inside one page is contiguous for the device.
    Pages {
        /// log2 of the page size.
        shift: u32,
        /// Physical address of each page of the arena.
        pa: Box<[u64]>,
    },
}

/// One mapping of DMA-able memory.
pub struct DmaArena {
    va: *mut u8,
    len: usize,
    map: IovaMap,
    file: File,
    hugepages: bool,
    next: Mutex<usize>,
}

// SAFETY: the arena owns its mapping for its whole life; the raw pointer is only used to
// compute addresses. Access to the memory itself follows the ring/packet ownership rules.
unsafe impl Send for DmaArena {}
// SAFETY: as above; the only mutable state (`next`) is behind a mutex.
unsafe impl Sync for DmaArena {}

const HUGE_2M: usize = 2 << 20;

impl DmaArena {
    /// Creates an arena of at least `len` bytes backed by a memfd (with 2 MiB hugepages
    /// when `hugepages`), mapped shared and populated.
    pub fn new(len: usize, hugepages: bool) -> Result<DmaArena> {
        let len = if hugepages { len.div_ceil(HUGE_2M) * HUGE_2M } else { len.div_ceil(4096) * 4096 };
        // Sealable: the size is sealed below, before the fd is ever shared.
        let mut flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        if hugepages {
            flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
        }
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vnet-dma".as_ptr(), flags) };
        if fd < 0 {
            return Err(Error::io("memfd_create", std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64).map_err(|e| Error::io("sizing the DMA arena", e))?;
        // The back-end gets this fd (`SET_MEM_TABLE`) and could truncate it, which would
        // make every access of ours past the new end a SIGBUS: seal its size first (and
        // seal the seals, so nobody adds one that stops our own writes). The back-end can
        // then rely on the size too (fstat tells it the region is all there).
        // SAFETY: plain fcntl on a descriptor we own; the result is checked.
        let sealed = unsafe {
            libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL)
        };
        if sealed != 0 {
            return Err(Error::io("sealing the DMA arena's size", std::io::Error::last_os_error()));
        }
        // SAFETY: maps `len` bytes of our own memfd; the result is checked. MAP_POPULATE
        // faults the pages in now, so the data path never takes a page fault.
        let va = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if va == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            return Err(if hugepages {
                Error::NoHugepages(e)
            } else {
                Error::io("mapping the DMA arena", e)
            });
        }
        if hugepages {
            // Hugetlb mappings can succeed and still have no pages behind them: check.
            // SAFETY: reading one byte of a mapping we just created.
            let probe = unsafe { libc::madvise(va, len, libc::MADV_WILLNEED) };
            let _ = probe;
        }
        Ok(DmaArena {
            va: va as *mut u8,
            len,
            map: IovaMap::Linear(va as u64),
            file,
            hugepages,
            next: Mutex::new(0),
        })
    }

    /// Bytes in the arena.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the arena is empty (never, once created).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Whether the arena uses hugepages.
    pub fn hugepages(&self) -> bool {
        self.hugepages
    }
    /// Start of the mapping in this process.
    pub fn va(&self) -> *mut u8 {
        self.va
    }
    /// The fd backing the arena (shared with a vhost-user back-end).
    pub fn file(&self) -> &File {
        &self.file
    }
    /// The device address of the arena's first byte.
    pub fn iova_base(&self) -> u64 {
        self.iova(self.va)
    }
    /// How offsets translate to device addresses.
    pub fn iova_map(&self) -> &IovaMap {
        &self.map
    }
    /// Sets how offsets translate to device addresses (a transport's DMA mapping). Must
    /// happen before anything is allocated.
    pub fn set_iova_map(&mut self, map: IovaMap) {
        self.map = map;
    }
    /// The largest run of bytes guaranteed contiguous for the device, if the arena is not
    /// contiguous as a whole (a physically addressed page).
    pub fn contiguous_chunk(&self) -> Option<usize> {
        match &self.map {
            IovaMap::Linear(_) => None,
            IovaMap::Pages { shift, .. } => Some(1usize << shift),
        }
    }

    /// Bytes handed out so far (0 until the first allocation: the time to install an
    /// IOVA map).
    pub fn allocated(&self) -> usize {
        *self.next.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `len` zeroed bytes aligned to `align` (a power of two) from the arena,
    /// contiguous for the device (never across a physically addressed page).
    pub fn alloc(&self, len: usize, align: usize) -> Result<(*mut u8, u64)> {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let start = place(*next, len, align, self.contiguous_chunk())?;
        let end = start
            .checked_add(len)
            .filter(|&e| e <= self.len)
            .ok_or(Error::ArenaTooSmall { size: self.len, need: start.saturating_add(len) })?;
        *next = end;
        // SAFETY: `start + len <= self.len`, inside the mapping; the bytes are fresh
        // (never handed out), so zeroing them races with nobody.
        let p = unsafe {
            let p = self.va.add(start);
            std::ptr::write_bytes(p, 0, len);
            p
        };
        Ok((p, self.iova(p)))
    }

    /// The device address of `p`, which must point into the arena.
    #[inline]
    pub fn iova(&self, p: *const u8) -> u64 {
        let off = p as u64 - self.va as u64;
        match &self.map {
            IovaMap::Linear(base) => base + off,
            IovaMap::Pages { shift, pa } => pa[(off >> shift) as usize] + (off & ((1u64 << shift) - 1)),
        }
    }
}

/// Where the bump allocator puts `len` bytes aligned to `align` when the next free
/// offset is `next`: aligned, and moved to the next `chunk` boundary rather than
/// straddle one (physically addressed pages).
fn place(next: usize, len: usize, align: usize, chunk: Option<usize>) -> Result<usize> {
    let mut start = next.div_ceil(align) * align;
    if let Some(chunk) = chunk {
        if len > chunk {
            return Err(Error::Config(format!(
                "a {len}-byte DMA allocation cannot be contiguous in {chunk}-byte pages"
            )));
        }
        if len > 0 && start / chunk != (start + len - 1) / chunk {
            start = (start / chunk + 1) * chunk;
        }
    }
    Ok(start)
}

/// A dry run of an arena's allocator: sizes an arena before it exists, for the same
/// sequence of allocations (and the same page rule) the real one will see.
#[derive(Debug, Clone)]
pub struct ArenaPlan {
    next: usize,
    chunk: Option<usize>,
}

impl ArenaPlan {
    /// A plan for an arena whose device-contiguous chunk is `chunk` (None: contiguous as
    /// a whole; `Some(2 MiB)`: physically addressed hugepages).
    pub fn new(chunk: Option<usize>) -> ArenaPlan {
        ArenaPlan { next: 0, chunk }
    }
    /// Reserves `len` bytes at `align`, as [`DmaArena::alloc`] would; returns the offset.
    pub fn alloc(&mut self, len: usize, align: usize) -> Result<usize> {
        let start = place(self.next, len, align, self.chunk)?;
        self.next = start + len;
        Ok(start)
    }
    /// The device-contiguous chunk the plan respects.
    pub fn chunk(&self) -> Option<usize> {
        self.chunk
    }
    /// Bytes the planned allocations need.
    pub fn size(&self) -> usize {
        self.next
    }
}

impl Drop for DmaArena {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`; nothing refers to it
        // any more (every user holds an `Arc<DmaArena>`).
        unsafe { libc::munmap(self.va as *mut libc::c_void, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_arena_size_is_sealed_before_it_is_shared() {
        let a = DmaArena::new(64 << 10, false).unwrap();
        let fd = a.file().as_raw_fd();
        // SAFETY: plain fcntl on the arena's descriptor.
        let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(seals & want, want, "seals {seals:#x}");
        // What a back-end holding a duplicate of the fd would try.
        let dup = a.file().try_clone().unwrap();
        let e = dup.set_len(4096).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "shrinking: {e}");
        let e = dup.set_len(1 << 20).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM), "growing: {e}");
        // SAFETY: plain fcntl; must fail (the seals are sealed).
        let rc = unsafe { libc::fcntl(dup.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_FUTURE_WRITE) };
        assert_eq!(rc, -1, "a new seal was added");
        assert_eq!(dup.metadata().unwrap().len(), 64 << 10);
        // The memory is still ours to write, end to end.
        let (p, _) = a.alloc(64 << 10, 4096).unwrap();
        // SAFETY: the whole arena, just allocated.
        unsafe { std::ptr::write_bytes(p, 0xa5, 64 << 10) };
    }

    #[test]
    fn allocates_aligned_and_reports_exhaustion() {
        let a = DmaArena::new(64 * 1024, false).unwrap();
        let (p1, i1) = a.alloc(100, 64).unwrap();
        let (p2, i2) = a.alloc(10, 4096).unwrap();
        assert_eq!(p1 as usize % 64, 0);
        assert_eq!(p2 as usize % 4096, 0);
        assert_eq!(a.iova(p2), i2);
        assert_eq!(i1, a.iova_base());
        let e = a.alloc(1 << 20, 8).unwrap_err();
        assert!(matches!(e, Error::ArenaTooSmall { .. }), "{e}");
    }

    #[test]
    fn page_mapped_arenas_never_straddle_a_page() {
        let mut a = DmaArena::new(4 * 4096, false).unwrap();
        a.set_iova_map(IovaMap::Pages { shift: 12, pa: vec![0x9000, 0x3000, 0x7000, 0x1000].into() });
        let (p1, i1) = a.alloc(3000, 64).unwrap();
        assert_eq!((p1 as usize - a.va() as usize, i1), (0, 0x9000));
        let (p2, i2) = a.alloc(3000, 64).unwrap();
        assert_eq!(p2 as usize - a.va() as usize, 4096, "moved to the next page");
        assert_eq!(i2, 0x3000);
        // SAFETY: pointer arithmetic inside the allocation just made.
        assert_eq!(a.iova(unsafe { p2.add(100) }), 0x3000 + 100);
        assert!(a.alloc(5000, 64).is_err(), "larger than a page");
    }

    #[test]
    fn plans_match_the_allocator() {
        let seq = [(3000usize, 64usize), (3000, 64), (100, 4096), (4000, 16), (10, 2)];
        for chunk in [None, Some(4096usize)] {
            let mut a = DmaArena::new(8 * 4096, false).unwrap();
            if chunk.is_some() {
                a.set_iova_map(IovaMap::Pages { shift: 12, pa: (0..8).map(|i| i * 0x1000).collect() });
            }
            let mut plan = ArenaPlan::new(chunk);
            for (len, align) in seq {
                let (p, _) = a.alloc(len, align).unwrap();
                assert_eq!(plan.alloc(len, align).unwrap(), p as usize - a.va() as usize);
            }
            assert_eq!(plan.size(), a.allocated());
        }
    }
}
