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
//! Split and packed rings set up alike: the three area addresses (§4.1.4.3), the size the
//! driver chose, and a doorbell that is written the queue index (no
//! `VIRTIO_F_NOTIFICATION_DATA`); the control queue is one more such queue.
//! Must not: touch common config after setup (every access is a VM exit): the data path
//! only writes doorbells, through a [`Notifier::Mmio`].
//!
//! Every BAR access is a volatile read or write of the field's natural width (§4.1.3.1)
//! through a bounds-checked `Window`; windows are validated against the BAR mapping
//! once, from what the device reported, so a bad capability is an error, not a wild
//! access.
//!
//! One job per file: `caps.rs` (the PCI registers and virtio capabilities), `window.rs`
//! (bounds-checked MMIO access); this file holds [`PciTransport`], the device handshake
//! and queue setup.

use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};

use super::{Doorbell, NetConfig, Notifier, Transport};
use crate::dma::DmaArena;
use crate::error::{Error, Result};
use crate::layout::{features as f, net_config};
use crate::ring::RingAddrs;
use crate::vfio::{IommuMode, RegionMap, VfioDevice};

mod caps;
mod window;

#[cfg(test)]
mod tests;

pub use caps::{cfg_type, common, parse_caps, regs, CapLoc, VirtioPciCaps};
use window::Window;

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
            // SAFETY: `ptr .. + length` lies inside one mapped area of the BAR
            // (`RegionMap::ptr` checked it), which `bars` keeps mapped for as long as the
            // transport (and so the window) lives; only volatile accesses go through it.
            Ok(unsafe { Window::new(ptr, loc.length as usize) })
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
            mtu_reported: false,
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
            if features & f::bit(bit) != 0 && w.len() < end {
                return Err(self.err(format!(
                    "device config of {} bytes lacks the field of feature bit {bit}",
                    w.len()
                )));
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
                cfg.mtu_reported = true;
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
        // Split ring: descriptor table, avail ring, used ring; packed ring (§2.8.10,
        // §4.1.4.3): descriptor ring, driver and device event suppression areas.
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
        let doorbell = Doorbell::new(map.clone(), base + off, index).ok_or_else(|| {
            self.err(format!("queue {index}'s doorbell at notify+{off:#x} is not mapped or aligned"))
        })?;
        c.w16(common::QUEUE_ENABLE, 1);
        self.dirty = true;
        Ok(Notifier::Mmio(doorbell))
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
