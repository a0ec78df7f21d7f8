//! Finding a PCI device's VFIO group, and opening VFIO files.
//!
//! Owns: normalising PCI addresses, the sysfs lookup of a device's IOMMU group (with the
//! usual mistakes turned into clear errors: no such device, not bound to `vfio-pci`,
//! no-IOMMU group), and opening `/dev/vfio` files with hints for the errors users hit.
//! Must not: issue VFIO ioctls (`device.rs` does) or know about virtio.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use super::{vfio_err, IommuMode};
use crate::error::{Error, Result};

/// The sysfs root.
pub(super) const SYSFS: &str = "/sys";
/// Where VFIO's device files live.
pub(super) const DEV_VFIO: &str = "/dev/vfio";

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

pub(super) fn open_rw(path: &Path, op: &'static str, mode: IommuMode) -> Result<File> {
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
