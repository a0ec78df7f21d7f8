//! The register side of the virtio-PCI handshake (virtio 1.2 §3.1.1, §4.1.4.3), over any
//! [`Regs`]: reset and wait, the status bits, 64-bit feature negotiation, the device
//! config read under `config_generation`, a queue's registers. Every value read is the
//! device's word, checked before use: a device that returns all-ones (removed, or a
//! broken BAR) or garbage makes each step an error, never a panic, a wild access or an
//! unbounded wait.
//!
//! Owns: those steps as functions of the registers alone, so that they can be tested
//! against a fake device. Must not: map BARs, talk to VFIO or build doorbells (the
//! transport in `mod.rs` does, from what these return).

use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
};

use super::caps::common;
use super::window::Window;
use crate::layout::{features as f, net_config};
use crate::ring::RingAddrs;
use crate::transport::NetConfig;

/// Natural-width register access (a BAR window; in tests, a fake device).
pub(super) trait Regs {
    /// The structure's length in bytes.
    fn len(&self) -> usize;
    fn r8(&self, off: usize) -> u8;
    fn r16(&self, off: usize) -> u16;
    fn r32(&self, off: usize) -> u32;
    fn w8(&self, off: usize, v: u8);
    fn w16(&self, off: usize, v: u16);
    fn w32(&self, off: usize, v: u32);
    /// A 64-bit field written as its low then high 32-bit halves (§4.1.3.1 allows it).
    fn w64(&self, off: usize, v: u64) {
        self.w32(off, v as u32);
        self.w32(off + 4, (v >> 32) as u32);
    }
}

impl Regs for Window {
    fn len(&self) -> usize {
        Window::len(self)
    }
    fn r8(&self, off: usize) -> u8 {
        Window::r8(self, off)
    }
    fn r16(&self, off: usize) -> u16 {
        Window::r16(self, off)
    }
    fn r32(&self, off: usize) -> u32 {
        Window::r32(self, off)
    }
    fn w8(&self, off: usize, v: u8) {
        Window::w8(self, off, v)
    }
    fn w16(&self, off: usize, v: u16) {
        Window::w16(self, off, v)
    }
    fn w32(&self, off: usize, v: u32) {
        Window::w32(self, off, v)
    }
}

/// A status byte with every bit set: no device reports it (FAILED and NEEDS_RESET with
/// DRIVER_OK, and undefined bits); it is what a read of a vanished device returns.
const ALL_ONES: u8 = 0xff;

/// Writes 0 to `device_status` and waits until the device reads back 0 (§4.1.4.3.2),
/// at most `timeout`; a status of all-ones is an error at once.
pub(super) fn reset(c: &impl Regs, timeout: Duration) -> Result<(), String> {
    c.w8(common::DEVICE_STATUS, 0);
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        match c.r8(common::DEVICE_STATUS) {
            0 => return Ok(()),
            ALL_ONES => return Err("device status reads all-ones (device gone or its BAR broken)".into()),
            _ => {}
        }
        if start.elapsed() > timeout {
            return Err(format!("device did not finish its reset within {timeout:?}"));
        }
        spins += 1;
        if spins < 1000 {
            std::hint::spin_loop();
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Sets `bits` in `device_status`; an all-ones status is an error (nothing is written).
pub(super) fn add_status(c: &impl Regs, bits: u8) -> Result<(), String> {
    let s = c.r8(common::DEVICE_STATUS);
    if s == ALL_ONES {
        return Err("device status reads all-ones (device gone or its BAR broken)".into());
    }
    c.w8(common::DEVICE_STATUS, s | bits);
    Ok(())
}

/// The 64 bits of device features.
pub(super) fn read_features(c: &impl Regs) -> u64 {
    c.w32(common::DEVICE_FEATURE_SELECT, 0);
    let lo = c.r32(common::DEVICE_FEATURE) as u64;
    c.w32(common::DEVICE_FEATURE_SELECT, 1);
    let hi = c.r32(common::DEVICE_FEATURE) as u64;
    lo | hi << 32
}

/// Writes the driver features and sets FEATURES_OK; `Ok(false)` if the device refused
/// them (cleared FEATURES_OK, or reports FAILED or NEEDS_RESET).
pub(super) fn write_features(c: &impl Regs, features: u64) -> Result<bool, String> {
    c.w32(common::DRIVER_FEATURE_SELECT, 0);
    c.w32(common::DRIVER_FEATURE, features as u32);
    c.w32(common::DRIVER_FEATURE_SELECT, 1);
    c.w32(common::DRIVER_FEATURE, (features >> 32) as u32);
    add_status(c, VIRTIO_CONFIG_S_FEATURES_OK as u8)?;
    let s = c.r8(common::DEVICE_STATUS);
    let bad = (VIRTIO_CONFIG_S_FAILED | VIRTIO_CONFIG_S_NEEDS_RESET) as u8;
    Ok(s & VIRTIO_CONFIG_S_FEATURES_OK as u8 != 0 && s & bad == 0)
}

/// Reads the virtio-net config (`dev`) for `features` under `config_generation`
/// (§4.1.4.3.1, at most 1000 tries), range-checked ([`NetConfig::checked`]).
pub(super) fn read_config(
    c: &impl Regs,
    dev: Option<&impl Regs>,
    features: u64,
    fallback_mac: [u8; 6],
    device: &str,
) -> Result<NetConfig, String> {
    let mut cfg = NetConfig {
        mac: fallback_mac,
        status: net_config::S_LINK_UP,
        max_queue_pairs: 1,
        mtu: 1500,
        mtu_reported: false,
    };
    let Some(w) = dev else {
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
            return Err(format!("device config of {} bytes lacks the field of feature bit {bit}", w.len()));
        }
    }
    for _ in 0..1000 {
        let gen = c.r8(common::CONFIG_GENERATION);
        if features & f::bit(f::NET_MAC) != 0 {
            for (i, b) in cfg.mac.iter_mut().enumerate() {
                *b = w.r8(net_config::MAC + i);
            }
        }
        if features & f::bit(f::NET_STATUS) != 0 {
            cfg.status = w.r16(net_config::STATUS);
        }
        if features & f::bit(f::NET_MQ) != 0 {
            cfg.max_queue_pairs = w.r16(net_config::MAX_VQ_PAIRS);
        }
        if features & f::bit(f::NET_MTU) != 0 {
            cfg.mtu = w.r16(net_config::MTU);
            cfg.mtu_reported = true;
        }
        if c.r8(common::CONFIG_GENERATION) == gen {
            return cfg.checked(features, fallback_mac, device).map_err(|e| e.to_string());
        }
    }
    Err("device config never stable (config_generation keeps changing)".into())
}

/// What [`setup_queue`] refused.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum QueueRefused {
    /// The port asked for more than the device takes (a configuration error).
    TooLarge { max: u16 },
    /// The device's registers say no (or say nonsense).
    Device(String),
}

/// Programs queue `index` (size, vector, the three addresses) and returns its doorbell
/// offset in the notify structure (`queue_notify_off * multiplier`, checked against
/// `notify_len`); the caller maps the doorbell and then calls [`enable_queue`].
/// Also returns `num_queues` as read now.
pub(super) fn setup_queue(
    c: &impl Regs,
    index: u16,
    size: u16,
    addrs: RingAddrs,
    multiplier: u32,
    notify_len: u64,
) -> Result<(u64, u16), QueueRefused> {
    let dev = |s: String| QueueRefused::Device(s);
    // Read now: the count may change with the negotiated features (QEMU's
    // virtio-net adds its multiqueue rings when MQ is accepted).
    let num_queues = c.r16(common::NUM_QUEUES);
    if index >= num_queues {
        return Err(dev(format!("queue {index} asked for, the device has {num_queues}")));
    }
    c.w16(common::QUEUE_SELECT, index);
    if c.r16(common::QUEUE_SELECT) != index {
        return Err(dev(format!("queue_select reads back other than {index}")));
    }
    let max = c.r16(common::QUEUE_SIZE);
    if max == 0 {
        return Err(dev(format!("queue {index} is not available (size 0)")));
    }
    if size > max {
        return Err(QueueRefused::TooLarge { max });
    }
    if c.r16(common::QUEUE_ENABLE) != 0 {
        return Err(dev(format!("queue {index} is already enabled")));
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
    let off = c.r16(common::QUEUE_NOTIFY_OFF) as u64 * multiplier as u64;
    if off + 2 > notify_len {
        return Err(dev(format!(
            "queue {index}'s doorbell at notify+{off:#x} is beyond the {notify_len:#x}-byte notify structure"
        )));
    }
    Ok((off, num_queues))
}

/// Enables the selected queue.
pub(super) fn enable_queue(c: &impl Regs) {
    c.w16(common::QUEUE_ENABLE, 1);
}

/// What a running device shows now (the port's supervisor asks): gone (all-ones),
/// failed (`DEVICE_NEEDS_RESET` or `FAILED` set, which this driver does not recover from:
/// it would need the whole initialisation again), or alive with its link bit
/// (`VIRTIO_NET_S_LINK_UP`, read when `VIRTIO_NET_F_STATUS` was negotiated).
pub(super) fn probe(c: &impl Regs, dev: Option<&impl Regs>, features: u64) -> crate::transport::Probe {
    use crate::transport::Probe;
    let s = c.r8(common::DEVICE_STATUS);
    if s == ALL_ONES {
        return Probe::Failed("device status reads all-ones (device gone or its BAR broken)".into());
    }
    if s & VIRTIO_CONFIG_S_NEEDS_RESET as u8 != 0 {
        return Probe::Failed(format!(
            "the device needs a reset (DEVICE_NEEDS_RESET, status {s:#x}); this driver does not re-initialise \
             a running VFIO device: close and open the port again"
        ));
    }
    if s & VIRTIO_CONFIG_S_FAILED as u8 != 0 {
        return Probe::Failed(format!("the device reports FAILED (status {s:#x})"));
    }
    let link_up = match dev {
        Some(d) if features & f::bit(f::NET_STATUS) != 0 && d.len() >= net_config::STATUS + 2 => {
            d.r16(net_config::STATUS) & net_config::S_LINK_UP != 0
        }
        _ => true,
    };
    Probe::Alive { link_up }
}

/// Sets DRIVER_OK and checks the device took it.
pub(super) fn start(c: &impl Regs) -> Result<(), String> {
    add_status(c, VIRTIO_CONFIG_S_DRIVER_OK as u8)?;
    let s = c.r8(common::DEVICE_STATUS);
    if s & (VIRTIO_CONFIG_S_NEEDS_RESET | VIRTIO_CONFIG_S_FAILED) as u8 != 0
        || s & VIRTIO_CONFIG_S_DRIVER_OK as u8 == 0
    {
        return Err(format!("device status {s:#x} after DRIVER_OK"));
    }
    Ok(())
}
