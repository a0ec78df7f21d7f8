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
//! [`DmaArena`] reachable by the device ([`VfioDevice::map_arena`]): mapped at an IOVA
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

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_group_status, vfio_info_cap_header, vfio_iommu_type1_dma_map,
    vfio_iommu_type1_dma_unmap, vfio_iommu_type1_info, vfio_iommu_type1_info_cap_iova_range, vfio_iova_range,
    vfio_region_info, vfio_region_info_cap_sparse_mmap, vfio_region_sparse_mmap_area, VFIO_TYPE1v2_IOMMU,
    VFIO_API_VERSION, VFIO_DEVICE_FLAGS_PCI, VFIO_DEVICE_FLAGS_RESET, VFIO_DMA_MAP_FLAG_READ,
    VFIO_DMA_MAP_FLAG_WRITE, VFIO_GROUP_FLAGS_VIABLE, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_INFO_PGSIZES,
    VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, VFIO_NOIOMMU_IOMMU, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP, VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP,
};
use vmm_sys_util::ioctl::{
    ioctl, ioctl_with_mut_ptr, ioctl_with_mut_ref, ioctl_with_ptr, ioctl_with_ref, ioctl_with_val,
};

use crate::dma::{DmaArena, IovaMap};
use crate::error::{Error, Result};

/// The ioctl numbers (`linux/vfio.h`: `_IO(VFIO_TYPE, VFIO_BASE + n)`).
mod nr {
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

/// The x86 MSI window: never a DMA address (writes there are interrupts).
pub const MSI_WINDOW: (u64, u64) = (0xfee0_0000, 0xfeef_ffff);
/// The lowest IOVA handed to a device (keeps address 0 and the first megabyte free, so a
/// zero address is never valid DMA).
const MIN_IOVA: u64 = 1 << 20;
/// Hugepage size the no-IOMMU arena uses.
const HUGE_2M: usize = 2 << 20;
const SYSFS: &str = "/sys";
const DEV_VFIO: &str = "/dev/vfio";

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

fn vfio_err(op: &'static str, reason: impl Into<String>) -> Error {
    Error::Vfio { op, reason: reason.into() }
}

/// `errno` of the last failed call, as an error with context.
fn last_err(op: &'static str, hint: impl FnOnce(i32) -> Option<String>) -> Error {
    let e = io::Error::last_os_error();
    let code = e.raw_os_error().unwrap_or(0);
    match hint(code) {
        Some(h) => vfio_err(op, format!("{e}: {h}")),
        None => vfio_err(op, e.to_string()),
    }
}

/// Normalises a PCI address: `BB:DD.F` gets domain `0000`; hex digits lower-cased.
/// Errors if it is not `[DDDD:]BB:DD.F`.
pub fn parse_bdf(s: &str) -> Result<String> {
    let bad =
        || Error::Config(format!("'{s}' is not a PCI address (expected DDDD:BB:DD.F, e.g. 0000:00:03.0)"));
    let s = s.trim().to_ascii_lowercase();
    let full = if s.matches(':').count() == 1 { format!("0000:{s}") } else { s };
    let (dom, rest) = full.split_once(':').ok_or_else(bad)?;
    let (bus, rest) = rest.split_once(':').ok_or_else(bad)?;
    let (dev, func) = rest.split_once('.').ok_or_else(bad)?;
    let hex = |p: &str, n: usize| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit());
    if !hex(dom, 4) || !hex(bus, 2) || !hex(dev, 2) || !hex(func, 1) {
        return Err(bad());
    }
    if u8::from_str_radix(dev, 16).map_err(|_| bad())? > 0x1f
        || u8::from_str_radix(func, 16).map_err(|_| bad())? > 7
    {
        return Err(bad());
    }
    Ok(full)
}

/// Where a device's VFIO group lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupLocation {
    /// IOMMU group number.
    pub group: u32,
    /// The group's character device (`/dev/vfio/N` or `/dev/vfio/noiommu-N`).
    pub path: PathBuf,
    /// Which IOMMU backend the group needs.
    pub mode: IommuMode,
}

/// Finds the VFIO group of `bdf` (already normalised) under a sysfs root and a
/// `/dev/vfio` directory (parameters so tests can use a fake tree), checking on the way
/// that the device exists and is bound to `vfio-pci`.
pub fn locate_group(sysfs: &Path, dev_vfio: &Path, bdf: &str) -> Result<GroupLocation> {
    let dev = sysfs.join("bus/pci/devices").join(bdf);
    if !dev.exists() {
        let mut present: Vec<String> = std::fs::read_dir(sysfs.join("bus/pci/devices"))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        present.sort();
        return Err(vfio_err(
            "finding the PCI device",
            format!(
                "no PCI device {bdf} (present: {})",
                if present.is_empty() { "none".to_string() } else { present.join(", ") }
            ),
        ));
    }
    let driver = std::fs::read_link(dev.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    if driver.as_deref() != Some("vfio-pci") {
        return Err(Error::NotBoundToVfio { bdf: bdf.into(), driver });
    }
    let link = std::fs::read_link(dev.join("iommu_group")).map_err(|e| {
        vfio_err(
            "finding the IOMMU group",
            format!(
                "{}: {e} (no IOMMU group: boot with intel_iommu=on, or load vfio with \
                 enable_unsafe_noiommu_mode=1 before binding)",
                dev.join("iommu_group").display()
            ),
        )
    })?;
    let group: u32 =
        link.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse().ok()).ok_or_else(|| {
            vfio_err("finding the IOMMU group", format!("odd iommu_group link {}", link.display()))
        })?;
    let name = std::fs::read_to_string(dev.join("iommu_group/name")).unwrap_or_default();
    let noiommu_path = dev_vfio.join(format!("noiommu-{group}"));
    let plain_path = dev_vfio.join(group.to_string());
    let noiommu = noiommu_path.exists() || (!plain_path.exists() && name.trim() == "vfio-noiommu");
    Ok(if noiommu {
        GroupLocation { group, path: noiommu_path, mode: IommuMode::NoIommu }
    } else {
        GroupLocation { group, path: plain_path, mode: IommuMode::Type1 }
    })
}

fn open_rw(path: &Path, op: &'static str, mode: IommuMode) -> Result<File> {
    OpenOptions::new().read(true).write(true).open(path).map_err(|e| {
        let hint = match e.kind() {
            io::ErrorKind::NotFound if path == Path::new("/dev/vfio/vfio") => {
                " (VFIO is not loaded: modprobe vfio-pci)".to_string()
            }
            io::ErrorKind::NotFound => match mode {
                IommuMode::NoIommu => {
                    " (no-IOMMU group missing: is vfio loaded with enable_unsafe_noiommu_mode=1?)".into()
                }
                IommuMode::Type1 => " (is the device bound to vfio-pci?)".into(),
            },
            io::ErrorKind::PermissionDenied => match mode {
                IommuMode::NoIommu => " (permission denied: no-IOMMU mode needs root (CAP_SYS_RAWIO))".into(),
                IommuMode::Type1 => {
                    " (permission denied: run as root or give this user the group's device file)".into()
                }
            },
            _ if e.raw_os_error() == Some(libc::EBUSY) => {
                " (busy: another process, or another port of this one, holds the group)".into()
            }
            _ => String::new(),
        };
        vfio_err(op, format!("{}: {e}{hint}", path.display()))
    })
}

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
    index: u32,
    size: u64,
    /// `(offset in region, length, address)` of each mapped area.
    areas: Vec<(u64, usize, *mut u8)>,
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

/// What `VFIO_IOMMU_GET_INFO` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuInfo {
    /// Supported IOMMU page sizes (a bit per size), 0 if not reported.
    pub pgsizes: u64,
    /// Usable IOVA ranges, inclusive `(start, end)`; None if the kernel does not report
    /// them (before Linux 5.4).
    pub ranges: Option<Vec<(u64, u64)>>,
}

/// An open VFIO PCI device, with its group and container.
pub struct VfioDevice {
    bdf: String,
    mode: IommuMode,
    group_id: u32,
    info: vfio_device_info,
    config_offset: u64,
    /// Live DMA mappings `(iova, size)`, unmapped on drop.
    dma: Vec<(u64, u64)>,
    // Drop order: device, then group (which leaves the container), then container.
    device: File,
    _group: File,
    container: File,
}

impl VfioDevice {
    /// Opens the PCI device `bdf` (`DDDD:BB:DD.F` or `BB:DD.F`) bound to `vfio-pci`.
    pub fn open(bdf: &str) -> Result<VfioDevice> {
        let bdf = parse_bdf(bdf)?;
        let loc = locate_group(Path::new(SYSFS), Path::new(DEV_VFIO), &bdf)?;
        Self::open_located(&bdf, &loc)
    }

    fn open_located(bdf: &str, loc: &GroupLocation) -> Result<VfioDevice> {
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

impl Drop for VfioDevice {
    fn drop(&mut self) {
        for (iova, size) in std::mem::take(&mut self.dma) {
            if let Err(e) = self.unmap_dma(iova, size) {
                log::warn!("{}: {e}", self.bdf);
            }
        }
    }
}

/// Walks a VFIO capability chain in `buf` from `first`: `(id, version, offset)` of each
/// header (offsets checked to lie inside `buf`, at most 64 entries against loops).
fn caps(buf: &[u8], first: u32) -> Vec<(u16, u16, usize)> {
    let hdr = std::mem::size_of::<vfio_info_cap_header>();
    let mut out = Vec::new();
    let mut off = first as usize;
    while off != 0 && off + hdr <= buf.len() && out.len() < 64 {
        let id = u16::from_ne_bytes([buf[off], buf[off + 1]]);
        let ver = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]);
        let next = u32::from_ne_bytes(buf[off + 4..off + 8].try_into().unwrap_or([0; 4])) as usize;
        out.push((id, ver, off));
        if next <= off {
            break; // chains only move forward
        }
        off = next;
    }
    out
}

fn u64_at(buf: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(buf.get(off..off + 8)?.try_into().ok()?))
}
fn u32_at(buf: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(off..off + 4)?.try_into().ok()?))
}

/// The sparse-mmap areas of a region-info buffer, if it has that capability.
fn parse_sparse_mmap(buf: &[u8], first: u32) -> Option<Vec<(u64, u64)>> {
    let (_, _, off) =
        caps(buf, first).into_iter().find(|c| c.0 as u32 == VFIO_REGION_INFO_CAP_SPARSE_MMAP)?;
    let n = u32_at(buf, off + std::mem::size_of::<vfio_info_cap_header>())? as usize;
    let areas = off + std::mem::size_of::<vfio_region_info_cap_sparse_mmap>();
    let sz = std::mem::size_of::<vfio_region_sparse_mmap_area>();
    (0..n).map(|i| Some((u64_at(buf, areas + i * sz)?, u64_at(buf, areas + i * sz + 8)?))).collect()
}

/// The usable IOVA ranges of an IOMMU-info buffer, if it has that capability.
fn parse_iova_ranges(buf: &[u8], first: u32) -> Option<Vec<(u64, u64)>> {
    let (_, _, off) =
        caps(buf, first).into_iter().find(|c| c.0 as u32 == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE)?;
    let n = u32_at(buf, off + std::mem::size_of::<vfio_info_cap_header>())? as usize;
    let ranges = off + std::mem::size_of::<vfio_iommu_type1_info_cap_iova_range>();
    let sz = std::mem::size_of::<vfio_iova_range>();
    (0..n).map(|i| Some((u64_at(buf, ranges + i * sz)?, u64_at(buf, ranges + i * sz + 8)?))).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_vfio_h() {
        // Values of the _IO(';', 100 + n) macros in <linux/vfio.h>.
        assert_eq!(nr::VFIO_GET_API_VERSION(), 0x3b64);
        assert_eq!(nr::VFIO_CHECK_EXTENSION(), 0x3b65);
        assert_eq!(nr::VFIO_SET_IOMMU(), 0x3b66);
        assert_eq!(nr::VFIO_GROUP_GET_STATUS(), 0x3b67);
        assert_eq!(nr::VFIO_GROUP_SET_CONTAINER(), 0x3b68);
        assert_eq!(nr::VFIO_GROUP_GET_DEVICE_FD(), 0x3b6a);
        assert_eq!(nr::VFIO_DEVICE_GET_INFO(), 0x3b6b);
        assert_eq!(nr::VFIO_DEVICE_GET_REGION_INFO(), 0x3b6c);
        assert_eq!(nr::VFIO_DEVICE_RESET(), 0x3b6f);
        assert_eq!(nr::VFIO_IOMMU_GET_INFO(), 0x3b70);
        assert_eq!(nr::VFIO_IOMMU_MAP_DMA(), 0x3b71);
        assert_eq!(nr::VFIO_IOMMU_UNMAP_DMA(), 0x3b72);
    }

    #[test]
    fn bdfs_are_normalised_and_checked() {
        assert_eq!(parse_bdf("00:03.0").unwrap(), "0000:00:03.0");
        assert_eq!(parse_bdf("0000:0A:1f.7").unwrap(), "0000:0a:1f.7");
        for bad in ["", "00:03", "0000:00:03.8", "0000:00:20.0", "zz:00.0", "0:00:03.0", "0000:00:03.0.1"] {
            let e = parse_bdf(bad).unwrap_err().to_string();
            assert!(e.contains("not a PCI address"), "{bad}: {e}");
        }
    }

    #[test]
    fn iova_choice_stays_in_usable_ranges_and_out_of_the_msi_window() {
        // QEMU 7.2 intel-iommu, aw-bits=39.
        let q = [(0, 0xfedf_ffff), (0xfef0_0000, 0x7f_ffff_ffff)];
        assert_eq!(choose_iova(&q, 8 << 20, 2 << 20), Some(2 << 20), "lowest aligned base above 1 MiB");
        assert_eq!(choose_iova(&q, 4096, 4096), Some(1 << 20));
        // Too big for the range below the hole: goes above it, aligned.
        let big = 0xff00_0000;
        assert_eq!(choose_iova(&q, big, 2 << 20), Some(0xff00_0000));
        // A range spanning the MSI window is split around it.
        let one = [(0, u64::MAX)];
        let len = 0xfee0_0000 - (1 << 20) + 4096; // does not fit below the window
        let b = choose_iova(&one, len, 4096).unwrap();
        assert!(b > MSI_WINDOW.1, "{b:#x}");
        assert_eq!(b, 0xfef0_0000);
        // Nothing fits: None (the caller reports an aperture too small).
        assert_eq!(choose_iova(&[(0, (1 << 30) - 1)], 1 << 30, 4096), None);
        assert_eq!(choose_iova(&[], 4096, 4096), None);
        // Never wraps around the top of the address space.
        assert_eq!(choose_iova(&[(u64::MAX - 4095, u64::MAX)], 8192, 4096), None);
    }

    fn cap(id: u16, next: u32) -> Vec<u8> {
        let mut v = id.to_ne_bytes().to_vec();
        v.extend_from_slice(&1u16.to_ne_bytes());
        v.extend_from_slice(&next.to_ne_bytes());
        v
    }

    #[test]
    fn capability_chains_are_parsed_with_bounds() {
        // An IOMMU info buffer: 24-byte header, then a migration cap (id 2) at 24 and
        // an IOVA-range cap (id 1) at 40 with two ranges.
        let mut b = vec![0u8; 24];
        b.extend(cap(2, 40));
        b.extend([0u8; 8]);
        b.extend(cap(1, 0));
        b.extend(2u32.to_ne_bytes());
        b.extend(0u32.to_ne_bytes());
        for (s, e) in [(0u64, 0xfedf_ffffu64), (0xfef0_0000, 0x7f_ffff_ffff)] {
            b.extend(s.to_ne_bytes());
            b.extend(e.to_ne_bytes());
        }
        assert_eq!(parse_iova_ranges(&b, 24), Some(vec![(0, 0xfedf_ffff), (0xfef0_0000, 0x7f_ffff_ffff)]));
        // Truncated: the ranges run past the buffer.
        assert_eq!(parse_iova_ranges(&b[..b.len() - 4], 24), None);
        // A loop (next pointing backwards) ends the walk.
        let mut l = vec![0u8; 8];
        l.extend(cap(7, 8));
        assert_eq!(caps(&l, 8).len(), 1);
        // Sparse mmap: header 32 bytes, cap at 32 with one area.
        let mut s = vec![0u8; 32];
        s.extend(cap(VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16, 0));
        s.extend(1u32.to_ne_bytes());
        s.extend(0u32.to_ne_bytes());
        s.extend(0x3000u64.to_ne_bytes());
        s.extend(0x1000u64.to_ne_bytes());
        assert_eq!(parse_sparse_mmap(&s, 32), Some(vec![(0x3000, 0x1000)]));
    }

    #[test]
    fn region_maps_resolve_only_inside_mapped_areas() {
        let m = RegionMap {
            index: 4,
            size: 0x4000,
            areas: vec![(0, 0x1000, 0x10_0000 as *mut u8), (0x3000, 0x1000, 0x20_0000 as *mut u8)],
        };
        assert_eq!(m.ptr(0x10, 4), Some(0x10_0010 as *mut u8));
        assert_eq!(m.ptr(0x3ffe, 2), Some(0x20_0ffe as *mut u8));
        assert_eq!(m.ptr(0xffe, 4), None, "straddles the end of an area");
        assert_eq!(m.ptr(0x2000, 2), None, "not mapped");
        assert_eq!(m.ptr(u64::MAX, 2), None);
        std::mem::forget(m); // the addresses are fake: never munmap them
    }

    /// A fake sysfs + /dev/vfio tree.
    struct Tree(PathBuf);
    impl Tree {
        fn new(name: &str) -> Tree {
            let d = std::env::temp_dir().join(format!("vnet-vfio-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(d.join("sys/bus/pci/devices")).unwrap();
            std::fs::create_dir_all(d.join("sys/bus/pci/drivers/vfio-pci")).unwrap();
            std::fs::create_dir_all(d.join("sys/bus/pci/drivers/virtio-pci")).unwrap();
            std::fs::create_dir_all(d.join("dev")).unwrap();
            Tree(d)
        }
        fn device(&self, bdf: &str, driver: Option<&str>, group: Option<(u32, Option<&str>)>) {
            let dev = self.0.join("sys/bus/pci/devices").join(bdf);
            std::fs::create_dir_all(&dev).unwrap();
            if let Some(d) = driver {
                std::os::unix::fs::symlink(self.0.join("sys/bus/pci/drivers").join(d), dev.join("driver"))
                    .unwrap();
            }
            if let Some((g, name)) = group {
                let gd = self.0.join("sys/kernel/iommu_groups").join(g.to_string());
                std::fs::create_dir_all(&gd).unwrap();
                if let Some(n) = name {
                    std::fs::write(gd.join("name"), format!("{n}\n")).unwrap();
                }
                std::os::unix::fs::symlink(&gd, dev.join("iommu_group")).unwrap();
            }
        }
        fn locate(&self, bdf: &str) -> Result<GroupLocation> {
            locate_group(&self.0.join("sys"), &self.0.join("dev"), bdf)
        }
    }
    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn group_lookup_explains_the_usual_mistakes() {
        let t = Tree::new("locate");
        t.device("0000:00:03.0", Some("virtio-pci"), None);
        t.device("0000:00:04.0", None, None);
        t.device("0000:00:05.0", Some("vfio-pci"), Some((7, None)));
        t.device("0000:00:06.0", Some("vfio-pci"), Some((0, Some("vfio-noiommu"))));
        t.device("0000:00:07.0", Some("vfio-pci"), None);

        let e = t.locate("0000:00:09.0").unwrap_err().to_string();
        assert!(e.contains("no PCI device 0000:00:09.0") && e.contains("0000:00:03.0"), "{e}");
        let e = t.locate("0000:00:03.0").unwrap_err();
        assert!(matches!(&e, Error::NotBoundToVfio { driver: Some(d), .. } if d == "virtio-pci"), "{e}");
        assert!(e.to_string().contains("bound to virtio-pci, not to vfio-pci"), "{e}");
        assert!(e.to_string().contains("driver_override"), "{e}");
        let e = t.locate("0000:00:04.0").unwrap_err();
        assert!(matches!(&e, Error::NotBoundToVfio { driver: None, .. }), "{e}");
        let e = t.locate("0000:00:07.0").unwrap_err().to_string();
        assert!(e.contains("no IOMMU group"), "{e}");

        let g = t.locate("0000:00:05.0").unwrap();
        assert_eq!(g, GroupLocation { group: 7, path: t.0.join("dev/7"), mode: IommuMode::Type1 });
        let g = t.locate("0000:00:06.0").unwrap();
        assert_eq!(g, GroupLocation { group: 0, path: t.0.join("dev/noiommu-0"), mode: IommuMode::NoIommu });
        // The device node decides when it exists.
        std::fs::write(t.0.join("dev/noiommu-7"), "").unwrap();
        assert_eq!(t.locate("0000:00:05.0").unwrap().mode, IommuMode::NoIommu);
    }

    #[test]
    fn opening_without_vfio_says_so() {
        // This machine may or may not have VFIO; what must hold is that every failure is
        // a typed error with a reason, never a panic. With no /dev/vfio the reason names
        // the missing module.
        match VfioDevice::open("0000:ff:1f.7") {
            Ok(_) => panic!("a device at ff:1f.7 bound to vfio-pci is unexpected"),
            Err(e) => assert!(e.to_string().contains("no PCI device 0000:ff:1f.7"), "{e}"),
        }
        if !Path::new("/dev/vfio/vfio").exists() {
            let loc = GroupLocation { group: 3, path: "/dev/vfio/3".into(), mode: IommuMode::Type1 };
            let e = VfioDevice::open_located("0000:00:03.0", &loc).err().unwrap().to_string();
            assert!(e.contains("/dev/vfio/vfio") && e.contains("modprobe vfio-pci"), "{e}");
        }
    }

    #[test]
    fn pagemap_gives_physical_addresses_of_our_memory() {
        // 4 KiB pages of a populated anonymous mapping.
        let len = 16 * 4096;
        // SAFETY: a fresh private anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let r = phys_addrs(p as *const u8, len, 4096);
        // SAFETY: unmapping the mapping made above.
        unsafe { libc::munmap(p, len) };
        let privileged = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find(|l| l.starts_with("CapEff:"))
            .and_then(|l| u64::from_str_radix(l[7..].trim(), 16).ok())
            .is_some_and(|c| c & (1 << 21) /* CAP_SYS_ADMIN */ != 0);
        match r {
            Ok(pa) => {
                assert!(privileged, "physical addresses without CAP_SYS_ADMIN?");
                assert_eq!(pa.len(), 16);
                assert!(pa.iter().all(|&a| a != 0 && a % 4096 == 0), "{pa:x?}");
            }
            Err(e) => {
                assert!(!privileged, "{e}");
                assert!(e.to_string().contains("CAP_SYS_ADMIN"), "{e}");
            }
        }
        // Misaligned requests are refused.
        assert!(phys_addrs(4096 as *const u8, 4096, 2 << 20).is_err());
    }

    #[test]
    fn no_iommu_arenas_get_per_hugepage_physical_addresses() {
        let free: usize = std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .find(|l| l.starts_with("HugePages_Free:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0);
        if free < 2 {
            eprintln!("no free 2 MiB hugepages: hugepage pagemap check not run");
            return;
        }
        let Ok(a) = DmaArena::new(4 << 20, true) else {
            eprintln!("hugepage arena unavailable: hugepage pagemap check not run");
            return;
        };
        match phys_addrs(a.va(), a.len(), HUGE_2M) {
            Ok(pa) => {
                assert_eq!(pa.len(), 2);
                assert!(pa.iter().all(|&x| x != 0 && x % HUGE_2M as u64 == 0), "{pa:x?}");
            }
            Err(e) => assert!(e.to_string().contains("CAP_SYS_ADMIN"), "{e}"),
        }
    }
}
