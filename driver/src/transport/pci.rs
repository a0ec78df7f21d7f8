//! The modern virtio-PCI transport (virtio 1.2 §4.1) over VFIO: a virtio-net PCI device
//! bound to `vfio-pci`, its BARs mapped into this process.
//!
//! Owns: identifying the device (1af4:1041, or transitional 1af4:1000 with subsystem 1),
//! walking the PCI capability list for the virtio vendor capabilities (common config,
//! notify with its `notify_off_multiplier`, ISR, device config), mapping the BARs they
//! live in, bus mastering, the status handshake (reset and wait, ACKNOWLEDGE, DRIVER,
//! FEATURES_OK read back, DRIVER_OK), 64-bit feature negotiation, queue setup through
//! the common config (each queue's doorbell address computed once, here), device config
//! read under `config_generation`, and reset on close. DMA setup is the VFIO module's.
//! Must not: touch common config after setup (every access is a VM exit): the data path
//! only writes doorbells, through a [`Notifier::Mmio`].
//!
//! Every BAR access is a volatile read or write of the field's natural width (§4.1.3.1)
//! through a bounds-checked `Window`; windows are validated against the BAR mapping
//! once, from what the device reported, so a bad capability is an error, not a wild
//! access.

use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};

use super::{NetConfig, Notifier, Transport};
use crate::dma::DmaArena;
use crate::error::{Error, Result};
use crate::layout::{features as f, net_config};
use crate::ring::RingAddrs;
use crate::vfio::{IommuMode, RegionMap, VfioDevice};

/// PCI config-space registers and values used here.
pub mod regs {
    /// Vendor ID register.
    pub const VENDOR_ID: usize = 0x00;
    /// Device ID register.
    pub const DEVICE_ID: usize = 0x02;
    /// Command register.
    pub const COMMAND: usize = 0x04;
    /// Status register.
    pub const STATUS: usize = 0x06;
    /// Subsystem ID register.
    pub const SUBSYSTEM_ID: usize = 0x2e;
    /// First capability pointer.
    pub const CAPABILITY_LIST: usize = 0x34;
    /// Status: the capability list exists.
    pub const STATUS_CAP_LIST: u16 = 0x10;
    /// Command: memory space decoding.
    pub const COMMAND_MEMORY: u16 = 0x2;
    /// Command: bus mastering (the device may DMA).
    pub const COMMAND_MASTER: u16 = 0x4;
    /// Vendor-specific capability ID.
    pub const CAP_ID_VNDR: u8 = 0x09;
    /// Red Hat / virtio vendor ID.
    pub const VIRTIO_VENDOR: u16 = 0x1af4;
    /// Modern virtio-net device ID (0x1040 + 1).
    pub const VIRTIO_NET_MODERN: u16 = 0x1041;
    /// Transitional virtio-net device ID.
    pub const VIRTIO_NET_TRANSITIONAL: u16 = 0x1000;
}

/// `cfg_type` values of `struct virtio_pci_cap` (§4.1.4).
pub mod cfg_type {
    /// Common configuration.
    pub const COMMON: u8 = 1;
    /// Notifications.
    pub const NOTIFY: u8 = 2;
    /// ISR status.
    pub const ISR: u8 = 3;
    /// Device-specific configuration.
    pub const DEVICE: u8 = 4;
    /// PCI configuration access (a window onto the BARs through config space; unused).
    pub const PCI: u8 = 5;
}

/// `struct virtio_pci_common_cfg` field offsets (§4.1.4.3).
pub mod common {
    /// `le32 device_feature_select`.
    pub const DEVICE_FEATURE_SELECT: usize = 0x00;
    /// `le32 device_feature`.
    pub const DEVICE_FEATURE: usize = 0x04;
    /// `le32 driver_feature_select`.
    pub const DRIVER_FEATURE_SELECT: usize = 0x08;
    /// `le32 driver_feature`.
    pub const DRIVER_FEATURE: usize = 0x0c;
    /// `le16 config_msix_vector`.
    pub const CONFIG_MSIX_VECTOR: usize = 0x10;
    /// `le16 num_queues`.
    pub const NUM_QUEUES: usize = 0x12;
    /// `u8 device_status`.
    pub const DEVICE_STATUS: usize = 0x14;
    /// `u8 config_generation`.
    pub const CONFIG_GENERATION: usize = 0x15;
    /// `le16 queue_select`.
    pub const QUEUE_SELECT: usize = 0x16;
    /// `le16 queue_size`.
    pub const QUEUE_SIZE: usize = 0x18;
    /// `le16 queue_msix_vector`.
    pub const QUEUE_MSIX_VECTOR: usize = 0x1a;
    /// `le16 queue_enable`.
    pub const QUEUE_ENABLE: usize = 0x1c;
    /// `le16 queue_notify_off`.
    pub const QUEUE_NOTIFY_OFF: usize = 0x1e;
    /// `le64 queue_desc`.
    pub const QUEUE_DESC: usize = 0x20;
    /// `le64 queue_driver` (avail ring).
    pub const QUEUE_DRIVER: usize = 0x28;
    /// `le64 queue_device` (used ring).
    pub const QUEUE_DEVICE: usize = 0x30;
    /// Bytes of the structure this driver uses.
    pub const LEN: usize = 0x38;
    /// "No MSI-X vector": we poll.
    pub const NO_VECTOR: u16 = 0xffff;
}

/// Where one virtio structure lives: BAR, offset and length (`struct virtio_pci_cap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapLoc {
    /// BAR index (0..=5).
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u32,
    /// Length in bytes.
    pub length: u32,
}

/// The virtio vendor capabilities of a device (the first usable one of each type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioPciCaps {
    /// Common configuration.
    pub common: CapLoc,
    /// Notification area.
    pub notify: CapLoc,
    /// Bytes between the doorbells of consecutive `queue_notify_off` values.
    pub notify_off_multiplier: u32,
    /// ISR status.
    pub isr: Option<CapLoc>,
    /// Device-specific configuration.
    pub device: Option<CapLoc>,
}

/// Walks the capability list of a config space (at least the first 256 bytes) and
/// collects the virtio structures (§4.1.4). Capabilities naming a reserved BAR or too
/// short for their type are skipped, as the spec asks; the walk is bounded against
/// loops. Fails when there is no capability list, or no common or notify capability
/// (a legacy-only device).
pub fn parse_caps(cfg: &[u8]) -> std::result::Result<VirtioPciCaps, String> {
    if cfg.len() < 64 {
        return Err(format!("config space of {} bytes", cfg.len()));
    }
    let u16_at = |o: usize| u16::from_le_bytes([cfg[o], cfg[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([cfg[o], cfg[o + 1], cfg[o + 2], cfg[o + 3]]);
    if u16_at(regs::STATUS) & regs::STATUS_CAP_LIST == 0 {
        return Err("no PCI capability list: not a modern virtio device".into());
    }
    let (mut common, mut notify, mut isr, mut device) = (None, None, None, None);
    let mut ptr = (cfg[regs::CAPABILITY_LIST] & 0xfc) as usize;
    // At most (256 - 64) / 4 capabilities fit in standard config space.
    for _ in 0..48 {
        if ptr == 0 {
            break;
        }
        if ptr < 0x40 || ptr + 2 > cfg.len() {
            return Err(format!("capability pointer {ptr:#x} outside config space"));
        }
        let (id, next) = (cfg[ptr], (cfg[ptr + 1] & 0xfc) as usize);
        if id == regs::CAP_ID_VNDR && ptr + 16 <= cfg.len() {
            let cap_len = cfg[ptr + 2] as usize;
            let typ = cfg[ptr + 3];
            let loc = CapLoc { bar: cfg[ptr + 4], offset: u32_at(ptr + 8), length: u32_at(ptr + 12) };
            let usable = cap_len >= 16 && ptr + cap_len <= cfg.len() && loc.bar <= 5;
            match typ {
                cfg_type::COMMON if usable && common.is_none() => common = Some(loc),
                cfg_type::NOTIFY if usable && cap_len >= 20 && notify.is_none() => {
                    notify = Some((loc, u32_at(ptr + 16)))
                }
                cfg_type::ISR if usable && isr.is_none() => isr = Some(loc),
                cfg_type::DEVICE if usable && device.is_none() => device = Some(loc),
                _ => {}
            }
        }
        ptr = next;
    }
    let common = common.ok_or(
        "no virtio common-config capability: a legacy-only device (QEMU: disable-legacy=on or a PCIe slot)",
    )?;
    let (notify, notify_off_multiplier) = notify.ok_or("no virtio notify capability")?;
    Ok(VirtioPciCaps { common, notify, notify_off_multiplier, isr, device })
}

/// A bounds-checked window of MMIO: volatile accesses of natural width only.
struct Window {
    ptr: *mut u8,
    len: usize,
}

impl Window {
    #[inline]
    fn at<T>(&self, off: usize) -> *mut T {
        let size = std::mem::size_of::<T>();
        // Windows are validated at setup and the offsets used are this module's
        // constants: a failure here is a bug in this file, not device input.
        assert!(
            off + size <= self.len && (self.ptr as usize + off) % size == 0,
            "MMIO access {off:#x}/{size}"
        );
        // SAFETY: `off + size <= len`, inside the window (checked above).
        unsafe { self.ptr.add(off) as *mut T }
    }
    fn r8(&self, off: usize) -> u8 {
        // SAFETY: an aligned in-bounds MMIO address (`at`), mapped while `self` lives.
        unsafe { self.at::<u8>(off).read_volatile() }
    }
    fn r16(&self, off: usize) -> u16 {
        // SAFETY: as in `r8`.
        u16::from_le(unsafe { self.at::<u16>(off).read_volatile() })
    }
    fn r32(&self, off: usize) -> u32 {
        // SAFETY: as in `r8`.
        u32::from_le(unsafe { self.at::<u32>(off).read_volatile() })
    }
    fn w8(&self, off: usize, v: u8) {
        // SAFETY: as in `r8`.
        unsafe { self.at::<u8>(off).write_volatile(v) }
    }
    fn w16(&self, off: usize, v: u16) {
        // SAFETY: as in `r8`.
        unsafe { self.at::<u16>(off).write_volatile(v.to_le()) }
    }
    fn w32(&self, off: usize, v: u32) {
        // SAFETY: as in `r8`.
        unsafe { self.at::<u32>(off).write_volatile(v.to_le()) }
    }
    /// A 64-bit field written as its low then high 32-bit halves (§4.1.3.1 allows it).
    fn w64(&self, off: usize, v: u64) {
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }
}

/// A virtio-net PCI device driven through VFIO.
pub struct PciTransport {
    description: String,
    bdf: String,
    common: Window,
    device_cfg: Option<Window>,
    isr: Option<Window>,
    /// BAR mapping, offset and length of the notify structure.
    notify: (Arc<RegionMap>, u64, u64),
    notify_off_multiplier: u32,
    num_queues: u16,
    fallback_mac: [u8; 6],
    /// The device was told something since the last reset (status is not 0).
    dirty: bool,
    /// Keeps the windows' BARs mapped.
    _bars: Vec<Arc<RegionMap>>,
    // Last: dropped after the BAR maps, and its drop unmaps DMA after our reset.
    vfio: VfioDevice,
}

// SAFETY: the windows' pointers are into BAR mappings owned by `_bars`; the transport is
// used by one thread at a time (`&mut self` for everything but reads of immutable data).
unsafe impl Send for PciTransport {}

/// How long a device may take to finish a reset (QEMU under TCG stops vhost-user rings
/// synchronously; real devices take microseconds).
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

impl PciTransport {
    /// Opens the virtio-net device at `bdf` (bound to `vfio-pci`), maps its virtio
    /// structures, resets it and sets ACKNOWLEDGE and DRIVER. `mac` is used when the
    /// device reports none.
    pub fn open(bdf: &str, mac: [u8; 6]) -> Result<PciTransport> {
        let vfio = VfioDevice::open(bdf)?;
        let bdf = vfio.bdf().to_string();
        let perr = |reason: String| Error::VirtioPci { bdf: bdf.clone(), reason };

        if vfio.reset()? {
            log::debug!("{bdf}: function reset");
        }
        let mut cfg = [0u8; 256];
        vfio.read_config(0, &mut cfg)?;
        let id16 = |o: usize| u16::from_le_bytes([cfg[o], cfg[o + 1]]);
        let (vendor, device, subsys) =
            (id16(regs::VENDOR_ID), id16(regs::DEVICE_ID), id16(regs::SUBSYSTEM_ID));
        let is_net = vendor == regs::VIRTIO_VENDOR
            && (device == regs::VIRTIO_NET_MODERN
                || (device == regs::VIRTIO_NET_TRANSITIONAL && subsys == 1));
        if !is_net {
            return Err(perr(format!("{vendor:04x}:{device:04x} is not a virtio-net device (1af4:1041)")));
        }
        let caps = parse_caps(&cfg).map_err(perr)?;

        // Memory decoding and bus mastering: without the latter the device cannot DMA
        // (vfio-pci leaves it to the user, as DPDK's pci_vfio does).
        let cmd = vfio.config_u16(regs::COMMAND as u64)?;
        let want = cmd | regs::COMMAND_MEMORY | regs::COMMAND_MASTER;
        if want != cmd {
            vfio.set_config_u16(regs::COMMAND as u64, want)?;
        }

        let mut bars: Vec<Arc<RegionMap>> = Vec::new();
        let mut bar = |b: u8| -> Result<Arc<RegionMap>> {
            if let Some(m) = bars.iter().find(|m| m.index() == b as u32) {
                return Ok(m.clone());
            }
            let m = Arc::new(vfio.map_region(b as u32)?);
            bars.push(m.clone());
            Ok(m)
        };
        let mut window = |name: &str, loc: CapLoc, min: usize, align: u32| -> Result<Window> {
            if (loc.length as usize) < min || loc.offset % align != 0 {
                return Err(perr(format!(
                    "{name} capability at BAR{} {:#x}+{:#x}: shorter than {min} bytes or not {align}-byte aligned",
                    loc.bar, loc.offset, loc.length
                )));
            }
            let map = bar(loc.bar)?;
            let ptr = map.ptr(loc.offset as u64, loc.length as u64).ok_or_else(|| {
                perr(format!(
                    "{name} structure at BAR{} {:#x}+{:#x} is outside the mapped part of the {:#x}-byte BAR",
                    loc.bar,
                    loc.offset,
                    loc.length,
                    map.size()
                ))
            })?;
            Ok(Window { ptr, len: loc.length as usize })
        };
        let common_w = window("common config", caps.common, common::LEN, 4)?;
        let device_cfg = caps.device.map(|l| window("device config", l, 1, 4)).transpose()?;
        let isr = caps.isr.map(|l| window("ISR", l, 1, 1)).transpose()?;
        // The notify window is checked per queue (its length depends on the queues).
        window("notify", caps.notify, 2, 2)?;
        let notify_map = bar(caps.notify.bar)?;

        let mut t = PciTransport {
            description: format!("vfio-pci {bdf} ({})", vfio.mode()),
            bdf: bdf.clone(),
            common: common_w,
            device_cfg,
            isr,
            notify: (notify_map, caps.notify.offset as u64, caps.notify.length as u64),
            notify_off_multiplier: caps.notify_off_multiplier,
            num_queues: 0,
            fallback_mac: mac,
            dirty: true,
            _bars: bars,
            vfio,
        };
        // §3.1.1 steps 1-3.
        t.reset_device()?;
        t.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE as u8);
        t.add_status(VIRTIO_CONFIG_S_DRIVER as u8);
        t.common.w16(common::CONFIG_MSIX_VECTOR, common::NO_VECTOR);
        t.num_queues = t.common.r16(common::NUM_QUEUES);
        log::debug!(
            "{}: {} queues, notify multiplier {}, caps {caps:?}",
            t.description,
            t.num_queues,
            t.notify_off_multiplier
        );
        Ok(t)
    }

    fn err(&self, reason: impl Into<String>) -> Error {
        Error::VirtioPci { bdf: self.bdf.clone(), reason: reason.into() }
    }

    fn status(&self) -> u8 {
        self.common.r8(common::DEVICE_STATUS)
    }

    fn add_status(&mut self, bits: u8) {
        let s = self.status();
        self.common.w8(common::DEVICE_STATUS, s | bits);
        self.dirty = true;
    }

    /// Writes 0 to `device_status` and waits until the device reads back 0 (§4.1.4.3.2):
    /// from then on it uses no ring or buffer.
    fn reset_device(&mut self) -> Result<()> {
        self.common.w8(common::DEVICE_STATUS, 0);
        let start = Instant::now();
        let mut spins = 0u32;
        while self.status() != 0 {
            if start.elapsed() > RESET_TIMEOUT {
                return Err(self.err(format!("device did not finish its reset within {RESET_TIMEOUT:?}")));
            }
            spins += 1;
            if spins < 1000 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.dirty = false;
        Ok(())
    }

    /// The ISR status byte (reading it acknowledges an interrupt; a polling driver only
    /// needs it for diagnostics). None if the device has no ISR capability.
    pub fn isr_status(&self) -> Option<u8> {
        self.isr.as_ref().map(|w| w.r8(0))
    }

    /// The IOMMU mode the device's DMA uses.
    pub fn iommu_mode(&self) -> IommuMode {
        self.vfio.mode()
    }

    /// Queues the device has (as last read: at open, and at each queue setup).
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    fn read_features(&self) -> u64 {
        self.common.w32(common::DEVICE_FEATURE_SELECT, 0);
        let lo = self.common.r32(common::DEVICE_FEATURE) as u64;
        self.common.w32(common::DEVICE_FEATURE_SELECT, 1);
        let hi = self.common.r32(common::DEVICE_FEATURE) as u64;
        lo | hi << 32
    }
}

impl Transport for PciTransport {
    fn describe(&self) -> String {
        self.description.clone()
    }

    fn needs_physical_dma(&self) -> bool {
        self.vfio.mode() == IommuMode::NoIommu
    }

    fn map_dma(&mut self, arena: &mut DmaArena) -> Result<()> {
        self.vfio.map_arena(arena)
    }

    fn platform_features(&self) -> u64 {
        // ACCESS_PLATFORM: behind an IOMMU the device must translate our IOVAs; a device
        // that offers it requires it. ORDER_PLATFORM: our ring barriers (release stores,
        // SeqCst fence before the kick decision) are the platform's on x86, where DMA is
        // cache-coherent and stores are not reordered with other stores.
        let order = if cfg!(any(target_arch = "x86_64", target_arch = "x86")) {
            f::bit(virtio_bindings::virtio_config::VIRTIO_F_ORDER_PLATFORM)
        } else {
            0
        };
        f::bit(f::ACCESS_PLATFORM) | order
    }

    fn device_features(&mut self) -> Result<u64> {
        Ok(self.read_features())
    }

    fn negotiate(&mut self, features: u64) -> Result<()> {
        let offered = self.read_features();
        if features & !offered != 0 {
            return Err(Error::FeaturesRefused(features & !offered));
        }
        if features & f::bit(f::NET_MQ) != 0 && features & f::bit(f::NET_CTRL_VQ) == 0 {
            // A PCI device starts with one queue pair and enables more only on the
            // control queue's VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (§5.1.6.5.5; MQ requires
            // CTRL_VQ); virtio-user enables rings through vhost-user instead.
            return Err(self.err(
                "more than one queue pair needs the control queue (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET), \
                 and VIRTIO_NET_F_CTRL_VQ was not negotiated: use one queue pair",
            ));
        }
        self.common.w32(common::DRIVER_FEATURE_SELECT, 0);
        self.common.w32(common::DRIVER_FEATURE, features as u32);
        self.common.w32(common::DRIVER_FEATURE_SELECT, 1);
        self.common.w32(common::DRIVER_FEATURE, (features >> 32) as u32);
        self.add_status(VIRTIO_CONFIG_S_FEATURES_OK as u8);
        // §3.1.1 step 6: the device may refuse the subset by clearing FEATURES_OK.
        if self.status() & VIRTIO_CONFIG_S_FEATURES_OK as u8 == 0 {
            self.add_status(VIRTIO_CONFIG_S_FAILED as u8);
            return Err(Error::FeaturesRefused(features));
        }
        Ok(())
    }

    fn config(&mut self, features: u64) -> Result<NetConfig> {
        let mut cfg = NetConfig {
            mac: self.fallback_mac,
            status: net_config::S_LINK_UP,
            max_queue_pairs: 1,
            mtu: 1500,
        };
        let Some(w) = &self.device_cfg else {
            return Ok(cfg);
        };
        let need = [
            (f::NET_MAC, net_config::MAC + 6),
            (f::NET_STATUS, net_config::STATUS + 2),
            (f::NET_MQ, net_config::MAX_VQ_PAIRS + 2),
            (f::NET_MTU, net_config::MTU + 2),
        ];
        for (bit, end) in need {
            if features & f::bit(bit) != 0 && w.len < end {
                return Err(self
                    .err(format!("device config of {} bytes lacks the field of feature bit {bit}", w.len)));
            }
        }
        // §4.1.4.3.1: re-read until config_generation is the same before and after.
        for _ in 0..1000 {
            let gen = self.common.r8(common::CONFIG_GENERATION);
            if features & f::bit(f::NET_MAC) != 0 {
                for (i, b) in cfg.mac.iter_mut().enumerate() {
                    *b = w.r8(net_config::MAC + i);
                }
            }
            if features & f::bit(f::NET_STATUS) != 0 {
                cfg.status = w.r16(net_config::STATUS);
            }
            if features & f::bit(f::NET_MQ) != 0 {
                cfg.max_queue_pairs = w.r16(net_config::MAX_VQ_PAIRS).max(1);
            }
            if features & f::bit(f::NET_MTU) != 0 {
                cfg.mtu = w.r16(net_config::MTU);
            }
            if self.common.r8(common::CONFIG_GENERATION) == gen {
                return Ok(cfg);
            }
        }
        Err(self.err("device config never stable (config_generation keeps changing)"))
    }

    fn setup_queue(&mut self, index: u16, size: u16, addrs: RingAddrs) -> Result<Notifier> {
        // Read now: the count may change with the negotiated features (QEMU's
        // virtio-net adds its multiqueue rings when MQ is accepted).
        self.num_queues = self.common.r16(common::NUM_QUEUES);
        if index >= self.num_queues {
            return Err(self.err(format!("queue {index} asked for, the device has {}", self.num_queues)));
        }
        let c = &self.common;
        c.w16(common::QUEUE_SELECT, index);
        let max = c.r16(common::QUEUE_SIZE);
        if max == 0 {
            return Err(self.err(format!("queue {index} is not available (size 0)")));
        }
        if size > max {
            return Err(Error::Config(format!(
                "ring size {size} is above the device's maximum {max} for queue {index}"
            )));
        }
        if c.r16(common::QUEUE_ENABLE) != 0 {
            return Err(self.err(format!("queue {index} is already enabled")));
        }
        c.w16(common::QUEUE_SIZE, size);
        c.w16(common::QUEUE_MSIX_VECTOR, common::NO_VECTOR);
        c.w64(common::QUEUE_DESC, addrs.desc);
        c.w64(common::QUEUE_DRIVER, addrs.avail);
        c.w64(common::QUEUE_DEVICE, addrs.used);
        // The doorbell: cap.offset + queue_notify_off * notify_off_multiplier (§4.1.4.4),
        // checked against the notify structure's length.
        let off = c.r16(common::QUEUE_NOTIFY_OFF) as u64 * self.notify_off_multiplier as u64;
        let (map, base, len) = &self.notify;
        if off + 2 > *len {
            return Err(self.err(format!(
                "queue {index}'s doorbell at notify+{off:#x} is beyond the {len:#x}-byte notify structure"
            )));
        }
        let addr = map.ptr(base + off, 2).filter(|p| *p as usize % 2 == 0).ok_or_else(|| {
            self.err(format!("queue {index}'s doorbell at notify+{off:#x} is not mapped or aligned"))
        })?;
        c.w16(common::QUEUE_ENABLE, 1);
        self.dirty = true;
        Ok(Notifier::Mmio { addr: addr as *mut u16, value: index, map: map.clone() })
    }

    fn start(&mut self) -> Result<()> {
        self.add_status(VIRTIO_CONFIG_S_DRIVER_OK as u8);
        let s = self.status();
        if s & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED) as u8 != 0
            || s & VIRTIO_CONFIG_S_DRIVER_OK as u8 == 0
        {
            // Stop it before the caller frees the rings.
            let _ = self.reset_device();
            return Err(self.err(format!("device status {s:#x} after DRIVER_OK")));
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<()> {
        self.reset_device()
    }
}

impl Drop for PciTransport {
    fn drop(&mut self) {
        // The device must stop using rings and buffers before DMA is unmapped and the
        // arena freed (the VFIO device, dropped after this, unmaps DMA).
        if self.dirty {
            if let Err(e) = self.reset_device() {
                log::warn!("{e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a virtio vendor capability at `at` (16 bytes, 20 for notify).
    #[allow(clippy::too_many_arguments)]
    fn vcap(
        cfg: &mut [u8],
        at: usize,
        next: u8,
        typ: u8,
        bar: u8,
        offset: u32,
        length: u32,
        mult: Option<u32>,
    ) {
        let len = if mult.is_some() { 20 } else { 16 };
        cfg[at] = regs::CAP_ID_VNDR;
        cfg[at + 1] = next;
        cfg[at + 2] = len;
        cfg[at + 3] = typ;
        cfg[at + 4] = bar;
        cfg[at + 8..at + 12].copy_from_slice(&offset.to_le_bytes());
        cfg[at + 12..at + 16].copy_from_slice(&length.to_le_bytes());
        if let Some(m) = mult {
            cfg[at + 16..at + 20].copy_from_slice(&m.to_le_bytes());
        }
    }

    /// Config space as QEMU's virtio-net-pci lays it out (modern BAR 4, MSI-X first).
    fn qemu_like() -> [u8; 256] {
        let mut c = [0u8; 256];
        c[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
        c[2..4].copy_from_slice(&0x1041u16.to_le_bytes());
        c[regs::STATUS] = regs::STATUS_CAP_LIST as u8;
        c[regs::CAPABILITY_LIST] = 0x98;
        // MSI-X capability (id 0x11) first, then the virtio ones.
        c[0x98] = 0x11;
        c[0x99] = 0x84;
        vcap(&mut c, 0x84, 0x70, cfg_type::PCI, 0, 0, 0, None);
        vcap(&mut c, 0x70, 0x60, cfg_type::NOTIFY, 4, 0x3000, 0x1000, Some(4));
        vcap(&mut c, 0x60, 0x50, cfg_type::DEVICE, 4, 0x2000, 0x1000, None);
        vcap(&mut c, 0x50, 0x40, cfg_type::ISR, 4, 0x1000, 0x1000, None);
        vcap(&mut c, 0x40, 0x00, cfg_type::COMMON, 4, 0x0000, 0x1000, None);
        c
    }
    use cfg_type::{COMMON, DEVICE};

    #[test]
    fn parses_qemu_virtio_net_capabilities() {
        let caps = parse_caps(&qemu_like()).unwrap();
        assert_eq!(caps.common, CapLoc { bar: 4, offset: 0, length: 0x1000 });
        assert_eq!(caps.isr, Some(CapLoc { bar: 4, offset: 0x1000, length: 0x1000 }));
        assert_eq!(caps.device, Some(CapLoc { bar: 4, offset: 0x2000, length: 0x1000 }));
        assert_eq!(caps.notify, CapLoc { bar: 4, offset: 0x3000, length: 0x1000 });
        assert_eq!(caps.notify_off_multiplier, 4);
    }

    #[test]
    fn first_usable_capability_of_each_type_wins() {
        let mut c = qemu_like();
        // Put a common cap with a reserved BAR (6) in front: skipped.
        vcap(&mut c, 0xa0, 0x84, COMMON, 6, 0x8000, 0x1000, None);
        c[0x99] = 0xa0;
        // And a second common cap later in the chain: the first usable one (BAR 4) wins.
        vcap(&mut c, 0xb0, 0x00, COMMON, 2, 0x100, 0x100, None);
        c[0x41] = 0xb0;
        let caps = parse_caps(&c).unwrap();
        assert_eq!(caps.common, CapLoc { bar: 4, offset: 0, length: 0x1000 });
        // A notify cap too short to hold the multiplier is skipped.
        let mut c = qemu_like();
        c[0x72] = 16;
        assert!(parse_caps(&c).unwrap_err().contains("notify"));
    }

    #[test]
    fn broken_capability_lists_are_errors_not_loops() {
        let mut c = qemu_like();
        c[regs::STATUS] = 0;
        assert!(parse_caps(&c).unwrap_err().contains("no PCI capability list"));
        // A legacy device: capability list without virtio caps.
        let mut c = qemu_like();
        c[regs::CAPABILITY_LIST] = 0x98;
        c[0x99] = 0;
        assert!(parse_caps(&c).unwrap_err().contains("legacy-only"));
        // A pointer into the header.
        let mut c = qemu_like();
        c[regs::CAPABILITY_LIST] = 0x10;
        assert!(parse_caps(&c).unwrap_err().contains("outside config space"));
        // A loop: the walk ends (bounded) and reports what it found.
        let mut c = qemu_like();
        c[0x41] = 0x98; // common -> msix -> ... -> common
        let caps = parse_caps(&c).unwrap();
        assert_eq!(caps.common.bar, 4);
        // A capability running past the end of config space is skipped.
        let mut c = qemu_like();
        c[0xf8..0xfd].copy_from_slice(&[regs::CAP_ID_VNDR, 0, 16, DEVICE, 4]);
        c[0x41] = 0xf8;
        assert_eq!(parse_caps(&c).unwrap().device, Some(CapLoc { bar: 4, offset: 0x2000, length: 0x1000 }));
        assert!(parse_caps(&c[..32]).is_err());
    }

    /// The capability lists of real virtio devices on this machine, if any, read from
    /// sysfs (read-only): the parser must find every modern device's structures.
    #[test]
    fn parses_real_virtio_devices_from_sysfs() {
        let Ok(dir) = std::fs::read_dir("/sys/bus/pci/devices") else { return };
        let mut seen = 0;
        for d in dir.flatten() {
            let vendor = std::fs::read_to_string(d.path().join("vendor")).unwrap_or_default();
            let device = std::fs::read_to_string(d.path().join("device")).unwrap_or_default();
            if vendor.trim() != "0x1af4" || !device.trim().starts_with("0x104") {
                continue;
            }
            let Ok(cfg) = std::fs::read(d.path().join("config")) else { continue };
            if cfg.len() < 256 {
                continue; // unprivileged: only the 64-byte header is readable
            }
            let caps = parse_caps(&cfg).unwrap_or_else(|e| panic!("{}: {e}", d.path().display()));
            assert!(caps.common.length as usize >= common::LEN, "{caps:?}");
            seen += 1;
            eprintln!("{}: {caps:?}", d.file_name().to_string_lossy());
        }
        eprintln!("{seen} modern virtio PCI devices parsed");
    }

    #[test]
    fn windows_are_natural_width_little_endian() {
        let mut mem = [0u64; 8];
        let w = Window { ptr: mem.as_mut_ptr() as *mut u8, len: 64 };
        w.w32(0, 0x1122_3344);
        w.w16(4, 0x5566);
        w.w8(6, 0x77);
        w.w64(8, 0x8877_6655_4433_2211);
        assert_eq!(w.r32(0), 0x1122_3344);
        assert_eq!(w.r16(4), 0x5566);
        assert_eq!(w.r8(6), 0x77);
        assert_eq!(w.r32(8), 0x4433_2211);
        assert_eq!(w.r32(12), 0x8877_6655);
        let bytes: Vec<u8> = mem.iter().flat_map(|x| x.to_ne_bytes()).collect();
        assert_eq!(&bytes[0..7], &[0x44, 0x33, 0x22, 0x11, 0x66, 0x55, 0x77]);
    }

    #[test]
    #[should_panic(expected = "MMIO access")]
    fn windows_refuse_out_of_bounds_accesses() {
        let mut mem = [0u64; 2];
        let w = Window { ptr: mem.as_mut_ptr() as *mut u8, len: 16 };
        w.r32(14);
    }
}
