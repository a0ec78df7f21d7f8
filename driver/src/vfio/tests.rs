//! Unit tests of the VFIO module: ioctl numbers, PCI addresses, IOVA choice,
//! capability parsing, BAR maps, group lookup, pagemap.

use std::path::{Path, PathBuf};

use vfio_bindings::bindings::vfio::VFIO_REGION_INFO_CAP_SPARSE_MMAP;

use super::cap_chain::{caps, parse_iova_ranges, parse_sparse_mmap};
use super::dma_map::HUGE_2M;
use super::*;
use crate::dma::DmaArena;
use crate::error::Result;

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
