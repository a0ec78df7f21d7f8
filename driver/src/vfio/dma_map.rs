//! Making memory reachable by a VFIO device: IOMMU info, DMA mappings, and placing the
//! DMA arena in IOVA space.
//!
//! Owns: `VFIO_IOMMU_GET_INFO` with the IOVA-range capability, `IOMMU_MAP_DMA` and
//! `UNMAP_DMA`, the choice of IOVA for the arena (inside a usable range, never IOVA = VA,
//! never in the x86 MSI window), and installing the arena's address map (type 1: one
//! linear mapping; no-IOMMU: per-hugepage physical addresses from `pagemap.rs`).
//! Must not: allocate from the arena or touch its contents.

use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap, vfio_iommu_type1_info, VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_WRITE, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_INFO_PGSIZES,
};
use vmm_sys_util::ioctl::{ioctl_with_mut_ptr, ioctl_with_mut_ref, ioctl_with_ref};

use super::cap_chain::parse_iova_ranges;
use super::pagemap::phys_addrs;
use super::{last_err, nr, vfio_err, IommuMode, VfioDevice};
use crate::dma::{DmaArena, IovaMap};
use crate::error::{Error, Result};

/// The x86 MSI window: never a DMA address (writes there are interrupts).
pub const MSI_WINDOW: (u64, u64) = (0xfee0_0000, 0xfeef_ffff);
/// The lowest IOVA handed to a device (keeps address 0 and the first megabyte free, so a
/// zero address is never valid DMA).
const MIN_IOVA: u64 = 1 << 20;
/// Hugepage size the no-IOMMU arena uses.
pub(super) const HUGE_2M: usize = 2 << 20;

/// What `VFIO_IOMMU_GET_INFO` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuInfo {
    /// Supported IOMMU page sizes (a bit per size), 0 if not reported.
    pub pgsizes: u64,
    /// Usable IOVA ranges, inclusive `(start, end)`; None if the kernel does not report
    /// them (before Linux 5.4).
    pub ranges: Option<Vec<(u64, u64)>>,
}

impl VfioDevice {
    /// `VFIO_IOMMU_GET_INFO`: page sizes and usable IOVA ranges (type-1 mode only).
    pub fn iommu_info(&self) -> Result<IommuInfo> {
        if self.mode != IommuMode::Type1 {
            return Err(vfio_err("VFIO_IOMMU_GET_INFO", "not available in no-IOMMU mode"));
        }
        let base = std::mem::size_of::<vfio_iommu_type1_info>();
        let mut buf = vec![0u64; base.div_ceil(8)];
        let mut retried = false;
        loop {
            let argsz = buf.len() * 8;
            // SAFETY: `buf` holds at least a `vfio_iommu_type1_info`, 8-byte aligned.
            unsafe { (*(buf.as_mut_ptr() as *mut vfio_iommu_type1_info)).argsz = argsz as u32 };
            // SAFETY: the kernel writes at most `argsz` bytes into `buf`, which is that long.
            if unsafe {
                ioctl_with_mut_ptr(&self.container, nr::VFIO_IOMMU_GET_INFO(), buf.as_mut_ptr() as *mut u8)
            } < 0
            {
                return Err(last_err("VFIO_IOMMU_GET_INFO", |_| None));
            }
            // SAFETY: as above; the kernel filled the header.
            let ii = unsafe { *(buf.as_ptr() as *const vfio_iommu_type1_info) };
            if ii.argsz as usize > argsz && !retried {
                retried = true;
                buf = vec![0u64; (ii.argsz as usize).div_ceil(8)];
                continue;
            }
            let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let pgsizes = if ii.flags & VFIO_IOMMU_INFO_PGSIZES != 0 { ii.iova_pgsizes } else { 0 };
            let ranges = if ii.flags & VFIO_IOMMU_INFO_CAPS != 0 && ii.cap_offset != 0 {
                parse_iova_ranges(&bytes, ii.cap_offset)
            } else {
                None
            };
            return Ok(IommuInfo { pgsizes, ranges });
        }
    }

    /// Maps `size` bytes at `vaddr` for the device at `iova`, read and write.
    ///
    /// # Safety
    /// The device may read and write that memory at any time until it is unmapped (or
    /// the device is reset): the caller must own it for DMA and never hold Rust
    /// references into parts the device writes. The pages are pinned by the kernel.
    pub unsafe fn map_dma(&mut self, vaddr: *mut u8, iova: u64, size: u64) -> Result<()> {
        if self.mode != IommuMode::Type1 {
            return Err(vfio_err(
                "VFIO_IOMMU_MAP_DMA",
                "not available in no-IOMMU mode (physical addresses)",
            ));
        }
        let m = vfio_iommu_type1_dma_map {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_map>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
            vaddr: vaddr as u64,
            iova,
            size,
        };
        // SAFETY: the kernel reads a `vfio_iommu_type1_dma_map`; the memory contract is
        // the caller's (see above).
        if unsafe { ioctl_with_ref(&self.container, nr::VFIO_IOMMU_MAP_DMA(), &m) } < 0 {
            return Err(last_err("VFIO_IOMMU_MAP_DMA", |c| {
                Some(match c {
                    libc::EINVAL => format!(
                        "{size:#x} bytes at IOVA {iova:#x}: outside the IOMMU aperture or misaligned \
                         (QEMU intel-iommu: aw-bits=48 widens the aperture)"
                    ),
                    libc::ENOMEM => {
                        "cannot pin the memory: raise the locked-memory limit (ulimit -l) or run as root"
                            .into()
                    }
                    libc::ENOSPC => "too many DMA mappings (vfio_iommu_type1 dma_entry_limit)".into(),
                    libc::EEXIST => format!("IOVA {iova:#x} is already mapped"),
                    _ => return None,
                })
            }));
        }
        self.dma.push((iova, size));
        Ok(())
    }

    /// Undoes a [`VfioDevice::map_dma`] of exactly `iova`/`size`.
    pub fn unmap_dma(&mut self, iova: u64, size: u64) -> Result<()> {
        let mut u = vfio_iommu_type1_dma_unmap {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_unmap>() as u32,
            flags: 0,
            iova,
            size,
            ..Default::default()
        };
        // SAFETY: the kernel reads a `vfio_iommu_type1_dma_unmap` and writes back the
        // size unmapped into it.
        if unsafe { ioctl_with_mut_ref(&self.container, nr::VFIO_IOMMU_UNMAP_DMA(), &mut u) } < 0 {
            return Err(last_err("VFIO_IOMMU_UNMAP_DMA", |_| None));
        }
        self.dma.retain(|&m| m != (iova, size));
        if u.size != size {
            return Err(vfio_err(
                "VFIO_IOMMU_UNMAP_DMA",
                format!("unmapped {:#x} of {size:#x} bytes", u.size),
            ));
        }
        Ok(())
    }

    /// Makes `arena` reachable by the device and installs its address map; must run
    /// before anything is allocated from the arena.
    ///
    /// Type 1: the whole arena is mapped once at an IOVA inside a usable range (avoiding
    /// the MSI window), and IOVA = base + offset. No-IOMMU: the arena must be backed by
    /// hugepages; the physical address of every 2 MiB page comes from
    /// `/proc/self/pagemap` (needs CAP_SYS_ADMIN), and allocations never cross a page.
    pub fn map_arena(&mut self, arena: &mut DmaArena) -> Result<()> {
        if arena.allocated() != 0 {
            return Err(Error::Config(
                "the DMA arena must be mapped before anything is allocated from it".into(),
            ));
        }
        match self.mode {
            IommuMode::Type1 => {
                let info = self.iommu_info()?;
                let ranges = info.ranges.clone().unwrap_or_else(|| {
                    log::warn!(
                        "{}: the kernel reports no usable IOVA ranges; assuming a 39-bit aperture",
                        self.bdf
                    );
                    vec![(0, (1u64 << 39) - 1)]
                });
                let min_page = if info.pgsizes == 0 { 4096 } else { 1u64 << info.pgsizes.trailing_zeros() };
                let align = min_page.max(if arena.hugepages() { HUGE_2M as u64 } else { 4096 });
                let len = arena.len() as u64;
                let base = choose_iova(&ranges, len, align).ok_or_else(|| {
                    vfio_err(
                        "choosing an IOVA",
                        format!(
                            "IOMMU aperture too small: no usable IOVA range holds the {len:#x}-byte DMA arena \
                             (usable: {}); QEMU intel-iommu: aw-bits=48",
                            ranges.iter().map(|(s, e)| format!("{s:#x}-{e:#x}")).collect::<Vec<_>>().join(", ")
                        ),
                    )
                })?;
                // SAFETY: the arena is DMA memory by contract (rings and buffers in it are
                // only touched through raw pointers, with volatile or atomic accesses).
                // The mapping is undone in our drop; should the arena be unmapped first,
                // the kernel keeps its pages pinned until then, so the device never
                // reaches memory that was reused.
                unsafe { self.map_dma(arena.va(), base, len)? };
                log::debug!(
                    "{}: DMA arena of {len:#x} bytes at IOVA {base:#x} (usable IOVA ranges {ranges:x?}, page sizes {:#x})",
                    self.bdf,
                    info.pgsizes
                );
                arena.set_iova_map(IovaMap::Linear(base));
            }
            IommuMode::NoIommu => {
                if !arena.hugepages() {
                    return Err(Error::Config(
                        "no-IOMMU mode needs a hugepage-backed DMA arena (physical addresses)".into(),
                    ));
                }
                let pa = phys_addrs(arena.va(), arena.len(), HUGE_2M)?;
                log::debug!("{}: DMA arena in {} hugepages at physical {pa:x?}", self.bdf, pa.len());
                arena.set_iova_map(IovaMap::Pages { shift: HUGE_2M.trailing_zeros(), pa });
            }
        }
        Ok(())
    }
}

/// Chooses where `len` bytes go in IOVA space: the lowest `align`-aligned base at or
/// above 1 MiB that lies inside one usable range (`(start, end)`, inclusive) and does
/// not overlap the MSI window.
pub fn choose_iova(ranges: &[(u64, u64)], len: u64, align: u64) -> Option<u64> {
    if len == 0 || !align.is_power_of_two() {
        return None;
    }
    let mut sorted = ranges.to_vec();
    sorted.sort();
    let align_up = |x: u64| x.checked_add(align - 1).map(|v| v & !(align - 1));
    for (start, end) in sorted {
        // Split around the MSI window, then try the lowest fit in each piece.
        let mut pieces = Vec::new();
        if end < MSI_WINDOW.0 || start > MSI_WINDOW.1 {
            pieces.push((start, end));
        } else {
            if start < MSI_WINDOW.0 {
                pieces.push((start, MSI_WINDOW.0 - 1));
            }
            if end > MSI_WINDOW.1 {
                pieces.push((MSI_WINDOW.1 + 1, end));
            }
        }
        for (s, e) in pieces {
            let Some(base) = align_up(s.max(MIN_IOVA)) else { continue };
            if base.checked_add(len - 1).is_some_and(|last| last <= e) {
                return Some(base);
            }
        }
    }
    None
}
