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
//! (bounds-checked MMIO access), `handshake.rs` (the register steps of the handshake,
//! each value the device returns checked: all-ones or garbage is an error); this file
//! holds [`PciTransport`]: mapping, the order of the steps, doorbells.

use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_FAILED,
};

use super::{Doorbell, NetConfig, Notifier, Probe, Transport};
use crate::dma::DmaArena;
use crate::error::{Error, Result};
use crate::layout::features as f;
use crate::ring::RingAddrs;
use crate::vfio::{IommuMode, RegionMap, VfioDevice};

mod caps;
mod handshake;
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
    /// Features negotiated (the link bit is read with `VIRTIO_NET_F_STATUS`).
    features: u64,
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
            features: 0,
            _bars: bars,
            vfio,
        };
        // §3.1.1 steps 1-3.
        t.reset_device()?;
        t.add_status(VIRTIO_CONFIG_S_ACKNOWLEDGE as u8)?;
        t.add_status(VIRTIO_CONFIG_S_DRIVER as u8)?;
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

    fn add_status(&mut self, bits: u8) -> Result<()> {
        self.dirty = true;
        handshake::add_status(&self.common, bits).map_err(|e| self.err(e))
    }

    /// Writes 0 to `device_status` and waits until the device reads back 0 (§4.1.4.3.2):
    /// from then on it uses no ring or buffer.
    fn reset_device(&mut self) -> Result<()> {
        handshake::reset(&self.common, RESET_TIMEOUT).map_err(|e| self.err(e))?;
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
        handshake::read_features(&self.common)
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
        self.dirty = true;
        self.features = features;
        // §3.1.1 step 6: the device may refuse the subset by clearing FEATURES_OK.
        if !handshake::write_features(&self.common, features).map_err(|e| self.err(e))? {
            let _ = self.add_status(VIRTIO_CONFIG_S_FAILED as u8);
            return Err(Error::FeaturesRefused(features));
        }
        Ok(())
    }

    fn config(&mut self, features: u64) -> Result<NetConfig> {
        handshake::read_config(
            &self.common,
            self.device_cfg.as_ref(),
            features,
            self.fallback_mac,
            &self.description,
        )
        .map_err(|e| self.err(e))
    }

    fn setup_queue(&mut self, index: u16, size: u16, addrs: RingAddrs) -> Result<Notifier> {
        let (map, base, len) = &self.notify;
        let (off, num_queues) =
            handshake::setup_queue(&self.common, index, size, addrs, self.notify_off_multiplier, *len)
                .map_err(|e| match e {
                    handshake::QueueRefused::TooLarge { max } => Error::Config(format!(
                        "ring size {size} is above the device's maximum {max} for queue {index}"
                    )),
                    handshake::QueueRefused::Device(why) => self.err(why),
                })?;
        self.num_queues = num_queues;
        let doorbell = Doorbell::new(map.clone(), base + off, index).ok_or_else(|| {
            self.err(format!("queue {index}'s doorbell at notify+{off:#x} is not mapped or aligned"))
        })?;
        handshake::enable_queue(&self.common);
        self.dirty = true;
        Ok(Notifier::Mmio(doorbell))
    }

    fn start(&mut self) -> Result<()> {
        self.dirty = true;
        if let Err(why) = handshake::start(&self.common) {
            // Stop it before the caller frees the rings.
            let _ = self.reset_device();
            return Err(self.err(why));
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<()> {
        self.reset_device()
    }

    /// Every 10 ms: two register reads (a VM exit each under KVM, 200 a second). QEMU
    /// completes and discards what a guest transmits while it reports the link down
    /// (its back-end away), until the supervisor sees the bit and holds transmit: the
    /// sooner, the fewer frames lost unseen.
    fn probe_every(&self) -> std::time::Duration {
        std::time::Duration::from_millis(10)
    }

    fn probe(&mut self, _heartbeat: bool) -> Probe {
        // Two register reads (no heartbeat needed: a device that stops is its own
        // emulator's business; QEMU clears the link bit when its vhost-user back-end goes
        // away and restores the rings itself when it comes back).
        handshake::probe(&self.common, self.device_cfg.as_ref(), self.features)
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
