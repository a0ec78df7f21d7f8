//! Physical addresses of our own memory, from `/proc/self/pagemap` (no-IOMMU mode).
//!
//! Owns: reading and checking pagemap entries (present, not hidden, hugepage-aligned).
//! Must not: dereference the addresses it is given (it only looks them up).

use std::fs::File;
use std::os::unix::fs::FileExt;

use super::vfio_err;
use crate::error::Result;

/// Physical addresses of the `page`-sized pages of `[va, va + len)`, from
/// `/proc/self/pagemap`. Every page must be present (populated) and, for pages above
/// 4 KiB, physically contiguous as the address alignment shows (hugepages).
pub fn phys_addrs(va: *const u8, len: usize, page: usize) -> Result<Box<[u64]>> {
    const PRESENT: u64 = 1 << 63;
    const PFN_MASK: u64 = (1 << 55) - 1;
    let op = "reading physical addresses";
    if !page.is_power_of_two() || page < 4096 || va as usize % page != 0 {
        return Err(vfio_err(op, format!("{va:p} is not aligned to {page:#x}-byte pages")));
    }
    let f = File::open("/proc/self/pagemap").map_err(|e| vfio_err(op, format!("/proc/self/pagemap: {e}")))?;
    let mut out = Vec::with_capacity(len.div_ceil(page));
    for i in 0..len.div_ceil(page) {
        let addr = va as u64 + (i * page) as u64;
        let mut e = [0u8; 8];
        f.read_exact_at(&mut e, (addr / 4096) * 8)
            .map_err(|err| vfio_err(op, format!("/proc/self/pagemap at {addr:#x}: {err}")))?;
        let e = u64::from_le_bytes(e);
        if e & PRESENT == 0 {
            return Err(vfio_err(op, format!("page at {addr:#x} is not present in memory")));
        }
        let pfn = e & PFN_MASK;
        if pfn == 0 {
            return Err(vfio_err(
                op,
                "/proc/self/pagemap hides physical addresses: no-IOMMU mode needs CAP_SYS_ADMIN (run as root)",
            ));
        }
        let pa = pfn << 12;
        if pa % page as u64 != 0 {
            return Err(vfio_err(
                op,
                format!(
                    "page at {addr:#x} has physical address {pa:#x}, not {page:#x}-aligned (not a hugepage?)"
                ),
            ));
        }
        out.push(pa);
    }
    Ok(out.into_boxed_slice())
}
