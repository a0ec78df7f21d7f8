//! An open VFIO PCI device with its group and container.
//!
//! Owns: the ioctl sequence that opens a device (`GET_API_VERSION`, `CHECK_EXTENSION`,
//! `GROUP_GET_STATUS`, `GROUP_SET_CONTAINER`, `SET_IOMMU`, `GROUP_GET_DEVICE_FD`,
//! `DEVICE_GET_INFO`), the device's identity, `DEVICE_RESET`, and undoing its DMA
//! mappings on drop (the container, group and device files close in that order).
//! Must not: know about virtio (the PCI transport does) or map regions or memory itself
//! (`region.rs`, `dma_map.rs`).

use std::ffi::CString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_group_status, VFIO_TYPE1v2_IOMMU, VFIO_API_VERSION, VFIO_DEVICE_FLAGS_PCI,
    VFIO_DEVICE_FLAGS_RESET, VFIO_GROUP_FLAGS_VIABLE, VFIO_NOIOMMU_IOMMU, VFIO_PCI_CONFIG_REGION_INDEX,
};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref, ioctl_with_val};

use super::group::{locate_group, open_rw, parse_bdf, GroupLocation, DEV_VFIO, SYSFS};
use super::{last_err, nr, vfio_err, IommuMode};
use crate::error::{Error, Result};

/// An open VFIO PCI device, with its group and container.
pub struct VfioDevice {
    pub(super) bdf: String,
    pub(super) mode: IommuMode,
    pub(super) group_id: u32,
    pub(super) info: vfio_device_info,
    pub(super) config_offset: u64,
    /// Live DMA mappings `(iova, size)`, unmapped on drop.
    pub(super) dma: Vec<(u64, u64)>,
    // Drop order: device, then group (which leaves the container), then container.
    pub(super) device: File,
    pub(super) _group: File,
    pub(super) container: File,
}

impl VfioDevice {
    /// Opens the PCI device `bdf` (`DDDD:BB:DD.F` or `BB:DD.F`) bound to `vfio-pci`.
    pub fn open(bdf: &str) -> Result<VfioDevice> {
        let bdf = parse_bdf(bdf)?;
        let loc = locate_group(Path::new(SYSFS), Path::new(DEV_VFIO), &bdf)?;
        Self::open_located(&bdf, &loc)
    }

    pub(super) fn open_located(bdf: &str, loc: &GroupLocation) -> Result<VfioDevice> {
        let container = open_rw(Path::new("/dev/vfio/vfio"), "opening the container", loc.mode)?;
        // SAFETY: VFIO_GET_API_VERSION takes no argument; the result is checked.
        let api = unsafe { ioctl(&container, nr::VFIO_GET_API_VERSION()) };
        if api != VFIO_API_VERSION as i32 {
            return Err(vfio_err(
                "VFIO_GET_API_VERSION",
                format!("kernel reports API version {api}, this driver speaks {VFIO_API_VERSION}"),
            ));
        }
        let iommu_type = match loc.mode {
            IommuMode::Type1 => VFIO_TYPE1v2_IOMMU,
            IommuMode::NoIommu => VFIO_NOIOMMU_IOMMU,
        };
        // SAFETY: VFIO_CHECK_EXTENSION takes an integer argument; the result is checked.
        let ext = unsafe { ioctl_with_val(&container, nr::VFIO_CHECK_EXTENSION(), iommu_type.into()) };
        if ext <= 0 {
            return Err(vfio_err(
                "VFIO_CHECK_EXTENSION",
                match loc.mode {
                    IommuMode::Type1 => {
                        "the type-1 v2 IOMMU backend is not available (modprobe vfio_iommu_type1)".to_string()
                    }
                    IommuMode::NoIommu => {
                        "no-IOMMU mode is not enabled (load vfio with enable_unsafe_noiommu_mode=1; \
                                           the kernel needs CONFIG_VFIO_NOIOMMU)"
                            .to_string()
                    }
                },
            ));
        }

        let group = open_rw(&loc.path, "opening the group", loc.mode)?;
        let mut status =
            vfio_group_status { argsz: std::mem::size_of::<vfio_group_status>() as u32, flags: 0 };
        // SAFETY: the kernel writes a `vfio_group_status` of `argsz` bytes into `status`.
        if unsafe { ioctl_with_mut_ref(&group, nr::VFIO_GROUP_GET_STATUS(), &mut status) } < 0 {
            return Err(last_err("VFIO_GROUP_GET_STATUS", |_| None));
        }
        if status.flags & VFIO_GROUP_FLAGS_VIABLE == 0 {
            return Err(Error::GroupNotViable { bdf: bdf.into(), group: loc.group });
        }
        let cfd: libc::c_int = container.as_raw_fd();
        // SAFETY: VFIO_GROUP_SET_CONTAINER reads one int (the container fd) from the pointer.
        if unsafe { ioctl_with_ref(&group, nr::VFIO_GROUP_SET_CONTAINER(), &cfd) } < 0 {
            return Err(last_err("VFIO_GROUP_SET_CONTAINER", |c| {
                (c == libc::EBUSY).then(|| "the group is already attached to a container".into())
            }));
        }
        // SAFETY: VFIO_SET_IOMMU takes an integer argument; the result is checked.
        if unsafe { ioctl_with_val(&container, nr::VFIO_SET_IOMMU(), iommu_type.into()) } < 0 {
            return Err(last_err("VFIO_SET_IOMMU", |c| match (c, loc.mode) {
                (libc::EPERM, IommuMode::Type1) => Some(
                    "the IOMMU has no interrupt remapping (QEMU: intel-iommu,intremap=on; or load \
                     vfio_iommu_type1 allow_unsafe_interrupts=1)"
                        .into(),
                ),
                (libc::EPERM, IommuMode::NoIommu) => {
                    Some("no-IOMMU mode needs CAP_SYS_RAWIO (run as root)".into())
                }
                _ => None,
            }));
        }
        let name = CString::new(bdf).map_err(|_| Error::Config(format!("bad PCI address {bdf}")))?;
        // SAFETY: VFIO_GROUP_GET_DEVICE_FD reads a NUL-terminated string; it returns a new
        // fd or -1 (checked).
        let fd = unsafe { ioctl_with_ptr(&group, nr::VFIO_GROUP_GET_DEVICE_FD(), name.as_ptr()) };
        if fd < 0 {
            return Err(last_err("VFIO_GROUP_GET_DEVICE_FD", |c| match c {
                libc::EPERM if loc.mode == IommuMode::NoIommu => {
                    Some("no-IOMMU devices need CAP_SYS_RAWIO (run as root)".into())
                }
                libc::EBUSY => Some("the device is already open".into()),
                _ => None,
            }));
        }
        // SAFETY: `fd` is a fresh descriptor the kernel just gave us; we own it.
        let device = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mut info =
            vfio_device_info { argsz: std::mem::size_of::<vfio_device_info>() as u32, ..Default::default() };
        // SAFETY: the kernel writes at most `argsz` bytes of `vfio_device_info` into `info`.
        if unsafe { ioctl_with_mut_ref(&device, nr::VFIO_DEVICE_GET_INFO(), &mut info) } < 0 {
            return Err(last_err("VFIO_DEVICE_GET_INFO", |_| None));
        }
        if info.flags & VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(vfio_err(
                "VFIO_DEVICE_GET_INFO",
                format!("{bdf} is not a PCI device (flags {:#x})", info.flags),
            ));
        }
        let mut dev = VfioDevice {
            bdf: bdf.into(),
            mode: loc.mode,
            group_id: loc.group,
            info,
            config_offset: 0,
            dma: Vec::new(),
            device,
            _group: group,
            container,
        };
        let cfg = dev.region_info(VFIO_PCI_CONFIG_REGION_INDEX)?;
        if cfg.size < 256 {
            return Err(vfio_err("config space", format!("config region of {} bytes", cfg.size)));
        }
        dev.config_offset = cfg.offset;
        log::debug!(
            "vfio {bdf}: group {} ({}), flags {:#x}, {} regions, {} irqs",
            loc.group,
            loc.mode,
            info.flags,
            info.num_regions,
            info.num_irqs
        );
        Ok(dev)
    }

    /// The PCI address.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }
    /// IOMMU mode of the container.
    pub fn mode(&self) -> IommuMode {
        self.mode
    }
    /// IOMMU group number.
    pub fn group(&self) -> u32 {
        self.group_id
    }
    /// `VFIO_DEVICE_FLAGS_*`.
    pub fn flags(&self) -> u32 {
        self.info.flags
    }
    /// Number of regions.
    pub fn num_regions(&self) -> u32 {
        self.info.num_regions
    }

    /// Resets the function (`VFIO_DEVICE_RESET`) if the device supports it; returns
    /// whether it did. The kernel restores config space around the reset.
    pub fn reset(&self) -> Result<bool> {
        if self.info.flags & VFIO_DEVICE_FLAGS_RESET == 0 {
            return Ok(false);
        }
        // SAFETY: VFIO_DEVICE_RESET takes no argument; the result is checked.
        if unsafe { ioctl(&self.device, nr::VFIO_DEVICE_RESET()) } < 0 {
            return Err(last_err("VFIO_DEVICE_RESET", |_| None));
        }
        Ok(true)
    }
}

impl Drop for VfioDevice {
    fn drop(&mut self) {
        for (iova, size) in std::mem::take(&mut self.dma) {
            if let Err(e) = self.unmap_dma(iova, size) {
                log::warn!("{}: {e}", self.bdf);
            }
        }
    }
}
