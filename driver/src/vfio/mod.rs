//! Userspace VFIO for one PCI device: container, group, device, BARs, config space and
//! DMA mappings, in type-1 (IOMMU) or no-IOMMU mode.
//!
//! Owns: finding the device's IOMMU group from sysfs (with the usual mistakes turned
//! into clear errors: no such device, not bound to `vfio-pci`, group not viable, no
//! permission), the VFIO ioctl sequence (`GET_API_VERSION`, `CHECK_EXTENSION`,
//! `GROUP_GET_STATUS`, `GROUP_SET_CONTAINER`, `SET_IOMMU`, `GROUP_GET_DEVICE_FD`,
//! `DEVICE_GET_INFO`, `DEVICE_GET_REGION_INFO` with its capabilities, `DEVICE_RESET`,
//! `IOMMU_GET_INFO` with the IOVA-range capability, `IOMMU_MAP_DMA`/`UNMAP_DMA`), BAR
//! mappings, config-space reads and writes that report short transfers, and making a
//! [`DmaArena`](crate::dma::DmaArena) reachable by the device ([`VfioDevice::map_arena`]): mapped at an IOVA
//! inside a usable range (type 1), or translated page by page through
//! `/proc/self/pagemap` (no-IOMMU, hugepages only). DMA mappings are undone on drop.
//! Must not: know about virtio (the PCI transport does).
//!
//! Why our own module instead of `vfio-ioctls` or `pci-driver`: both reject no-IOMMU
//! mode, which is the common way to run a PMD in a guest; `vfio-ioctls` also swallows
//! config-space errors and has no `IOMMU_GET_INFO` (notes/crates.md §2-3). The structs
//! and constants come from `vfio-bindings`; the ioctl numbers from `vmm-sys-util`'s
//! macros, as `vfio-ioctls` defines them.
//!
//! Type-1 IOVAs: QEMU's intel-iommu defaults to a 39-bit aperture, which does not cover
//! user virtual addresses, so the arena is mapped at an IOVA chosen inside a range that
//! `VFIO_IOMMU_GET_INFO` reports usable, never IOVA = VA, and never in the x86 MSI
//! window (0xfee00000-0xfeefffff).
//!
//! One job per file: `group.rs` (finding the group from sysfs, opening VFIO files with
//! clear errors), `device.rs` ([`VfioDevice`]: the container/group/device ioctl sequence,
//! reset, undoing DMA mappings on drop), `region.rs` (region info, BAR mappings
//! ([`RegionMap`]), config space), `dma_map.rs` (IOMMU info, DMA mapping, placing the
//! arena in IOVA space), `pagemap.rs` (physical addresses for no-IOMMU mode),
//! `cap_chain.rs` (parsing the capability chains VFIO returns).

use std::io;

use crate::error::Error;

mod cap_chain;
mod device;
mod dma_map;
mod group;
mod pagemap;
mod region;

#[cfg(test)]
mod tests;

pub use device::VfioDevice;
pub use dma_map::{choose_iova, IommuInfo, MSI_WINDOW};
pub use group::{locate_group, parse_bdf, GroupLocation};
pub use pagemap::phys_addrs;
pub use region::{RegionInfo, RegionMap};

/// The ioctl numbers (`linux/vfio.h`: `_IO(VFIO_TYPE, VFIO_BASE + n)`).
pub(crate) mod nr {
    use vfio_bindings::bindings::vfio::{VFIO_BASE, VFIO_TYPE};
    use vmm_sys_util::ioctl_io_nr;

    const T: u32 = VFIO_TYPE as u32;
    ioctl_io_nr!(VFIO_GET_API_VERSION, T, VFIO_BASE);
    ioctl_io_nr!(VFIO_CHECK_EXTENSION, T, VFIO_BASE + 1);
    ioctl_io_nr!(VFIO_SET_IOMMU, T, VFIO_BASE + 2);
    ioctl_io_nr!(VFIO_GROUP_GET_STATUS, T, VFIO_BASE + 3);
    ioctl_io_nr!(VFIO_GROUP_SET_CONTAINER, T, VFIO_BASE + 4);
    ioctl_io_nr!(VFIO_GROUP_GET_DEVICE_FD, T, VFIO_BASE + 6);
    ioctl_io_nr!(VFIO_DEVICE_GET_INFO, T, VFIO_BASE + 7);
    ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, T, VFIO_BASE + 8);
    ioctl_io_nr!(VFIO_DEVICE_RESET, T, VFIO_BASE + 11);
    ioctl_io_nr!(VFIO_IOMMU_GET_INFO, T, VFIO_BASE + 12);
    ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, T, VFIO_BASE + 13);
    ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, T, VFIO_BASE + 14);
}

/// How the device's DMA is translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IommuMode {
    /// A (possibly virtual) IOMMU: `VFIO_TYPE1v2_IOMMU`, DMA through `MAP_DMA`.
    Type1,
    /// No IOMMU (`enable_unsafe_noiommu_mode`): the device uses physical addresses.
    NoIommu,
}

impl std::fmt::Display for IommuMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IommuMode::Type1 => "type1",
            IommuMode::NoIommu => "noiommu",
        })
    }
}

pub(crate) fn vfio_err(op: &'static str, reason: impl Into<String>) -> Error {
    Error::Vfio { op, reason: reason.into() }
}

/// `errno` of the last failed call, as an error with context.
pub(crate) fn last_err(op: &'static str, hint: impl FnOnce(i32) -> Option<String>) -> Error {
    let e = io::Error::last_os_error();
    let code = e.raw_os_error().unwrap_or(0);
    match hint(code) {
        Some(h) => vfio_err(op, format!("{e}: {h}")),
        None => vfio_err(op, e.to_string()),
    }
}
