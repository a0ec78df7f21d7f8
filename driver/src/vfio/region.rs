//! A VFIO device's regions: their description, BAR mappings and PCI config space.
//!
//! Owns: `VFIO_DEVICE_GET_REGION_INFO` with its sparse-mmap capability, mapping a BAR
//! (whole, or its mmappable areas) as a [`RegionMap`] that unmaps on drop, and config
//! space reads and writes that report short transfers. Must not: touch the MMIO behind
//! a mapping (the PCI transport does, with volatile accesses) or know about virtio.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vfio_bindings::bindings::vfio::{
    vfio_region_info, VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP,
};
use vmm_sys_util::ioctl::ioctl_with_mut_ptr;

use super::cap_chain::parse_sparse_mmap;
use super::{last_err, nr, vfio_err, VfioDevice};
use crate::error::Result;

/// One region (BAR, config space, ...) as VFIO describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region index (BAR number for BARs).
    pub index: u32,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Size in bytes (0: the region does not exist).
    pub size: u64,
    /// Offset of the region in the device fd (for pread/pwrite/mmap).
    pub offset: u64,
    /// Parts that may be mmapped when not all of it may (`(offset, size)` in the
    /// region), from the sparse-mmap capability.
    pub sparse: Option<Vec<(u64, u64)>>,
}

impl RegionInfo {
    /// Whether (part of) the region can be mmapped.
    pub fn mappable(&self) -> bool {
        self.flags & VFIO_REGION_INFO_FLAG_MMAP != 0 && self.size > 0
    }
    /// The mmappable `(offset, size)` areas.
    pub fn mmap_areas(&self) -> Vec<(u64, u64)> {
        if !self.mappable() {
            return Vec::new();
        }
        match &self.sparse {
            Some(a) => a.clone(),
            None => vec![(0, self.size)],
        }
    }
}

/// A memory-mapped region (a BAR). Pointers into it are valid while it lives; the
/// mapping keeps the device file open, so it may outlive the [`VfioDevice`].
pub struct RegionMap {
    // Visible to the VFIO module only (as before the split): the areas must be real
    // mappings, which the drop unmaps.
    pub(super) index: u32,
    pub(super) size: u64,
    /// `(offset in region, length, address)` of each mapped area.
    pub(super) areas: Vec<(u64, usize, *mut u8)>,
}

// SAFETY: the mapping is owned by this value and only unmapped in its drop; users touch
// the MMIO behind the pointers with volatile accesses, which any thread may do.
unsafe impl Send for RegionMap {}
// SAFETY: as above; `RegionMap` has no interior mutability.
unsafe impl Sync for RegionMap {}

impl RegionMap {
    /// Region index.
    pub fn index(&self) -> u32 {
        self.index
    }
    /// Region size.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// A pointer to `len` bytes at `offset` of the region, if one mapped area holds them.
    pub fn ptr(&self, offset: u64, len: u64) -> Option<*mut u8> {
        let end = offset.checked_add(len)?;
        self.areas.iter().find(|(o, l, _)| offset >= *o && end <= *o + *l as u64).map(|(o, _, p)| {
            // SAFETY: `offset - o < l`: inside the mapped area.
            unsafe { p.add((offset - o) as usize) }
        })
    }
}

impl Drop for RegionMap {
    fn drop(&mut self) {
        for &(_, len, p) in &self.areas {
            // SAFETY: unmapping exactly an area mapped in `VfioDevice::map_region`;
            // whoever used pointers into it holds this map (through an `Arc`), so none
            // is left.
            if unsafe { libc::munmap(p as *mut libc::c_void, len) } != 0 {
                log::warn!("munmap of BAR {}: {}", self.index, io::Error::last_os_error());
            }
        }
    }
}

impl VfioDevice {
    /// `VFIO_DEVICE_GET_REGION_INFO` for `index`, with the sparse-mmap capability.
    pub fn region_info(&self, index: u32) -> Result<RegionInfo> {
        if index >= self.info.num_regions {
            return Err(vfio_err(
                "VFIO_DEVICE_GET_REGION_INFO",
                format!("region {index} beyond the device's {}", self.info.num_regions),
            ));
        }
        let base = std::mem::size_of::<vfio_region_info>();
        // u64 storage: the info and its capabilities need 8-byte alignment.
        let mut buf = vec![0u64; base.div_ceil(8)];
        let mut retried = false;
        loop {
            let argsz = buf.len() * 8;
            {
                let ri = buf.as_mut_ptr() as *mut vfio_region_info;
                // SAFETY: `buf` holds at least a `vfio_region_info`, suitably aligned.
                unsafe {
                    (*ri).argsz = argsz as u32;
                    (*ri).index = index;
                }
            }
            // SAFETY: the kernel writes at most `argsz` bytes into `buf`, which is that long.
            if unsafe {
                ioctl_with_mut_ptr(
                    &self.device,
                    nr::VFIO_DEVICE_GET_REGION_INFO(),
                    buf.as_mut_ptr() as *mut u8,
                )
            } < 0
            {
                return Err(last_err("VFIO_DEVICE_GET_REGION_INFO", |_| None));
            }
            // SAFETY: as above; the kernel filled the header.
            let ri = unsafe { *(buf.as_ptr() as *const vfio_region_info) };
            if ri.flags & VFIO_REGION_INFO_FLAG_CAPS != 0 && ri.argsz as usize > argsz && !retried {
                retried = true;
                // The capabilities did not fit: ask again with the size the kernel wants.
                buf = vec![0u64; (ri.argsz as usize).div_ceil(8)];
                continue;
            }
            let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let sparse = if ri.flags & VFIO_REGION_INFO_FLAG_CAPS != 0 && ri.cap_offset != 0 {
                parse_sparse_mmap(&bytes, ri.cap_offset)
            } else {
                None
            };
            return Ok(RegionInfo { index, flags: ri.flags, size: ri.size, offset: ri.offset, sparse });
        }
    }

    /// Maps region `index` (a BAR): all of it, or its mmappable areas when the kernel
    /// reports a sparse-mmap capability (e.g. around an MSI-X table).
    pub fn map_region(&self, index: u32) -> Result<RegionMap> {
        let info = self.region_info(index)?;
        if !info.mappable() {
            return Err(vfio_err(
                "mapping a BAR",
                format!(
                    "BAR {index} of {} ({} bytes) cannot be mmapped (flags {:#x})",
                    self.bdf, info.size, info.flags
                ),
            ));
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
        let mut map = RegionMap { index, size: info.size, areas: Vec::new() };
        for (off, size) in info.mmap_areas() {
            if size == 0 {
                continue;
            }
            let len = size.div_ceil(page) * page;
            // SAFETY: maps `len` bytes of the device fd at the region's offset (the kernel
            // checks the range against the region); the result is checked. The mapping
            // is owned by `map` and unmapped in its drop.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    self.device.as_raw_fd(),
                    (info.offset + off) as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(vfio_err(
                    "mapping a BAR",
                    format!("mmap of BAR {index} [{off:#x}+{size:#x}]: {}", io::Error::last_os_error()),
                ));
            }
            map.areas.push((off, len as usize, p as *mut u8));
        }
        Ok(map)
    }

    /// Reads `buf.len()` bytes of PCI config space at `offset`; a short read is an error.
    pub fn read_config(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.device.read_exact_at(buf, self.config_offset + offset).map_err(|e| {
            vfio_err(
                "reading config space",
                format!("{} bytes at {offset:#x} of {}: {e}", buf.len(), self.bdf),
            )
        })
    }
    /// Writes `buf` to PCI config space at `offset`; a short write is an error.
    pub fn write_config(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.device.write_all_at(buf, self.config_offset + offset).map_err(|e| {
            vfio_err(
                "writing config space",
                format!("{} bytes at {offset:#x} of {}: {e}", buf.len(), self.bdf),
            )
        })
    }
    /// A little-endian 16-bit config register.
    pub fn config_u16(&self, offset: u64) -> Result<u16> {
        let mut b = [0u8; 2];
        self.read_config(offset, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }
    /// Writes a little-endian 16-bit config register.
    pub fn set_config_u16(&self, offset: u64, v: u16) -> Result<()> {
        self.write_config(offset, &v.to_le_bytes())
    }
}
