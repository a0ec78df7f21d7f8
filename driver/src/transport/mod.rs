//! The transport seam: how the virtio-net device logic reaches a device.
//!
//! Owns: the [`Transport`] trait every transport implements (virtio-user over a
//! vhost-user socket; virtio-PCI over VFIO) and the [`Notifier`] a queue kicks with.
//! Must not: hold data-path state; after setup the data path only uses a `Notifier`.

mod deadline;
pub mod pci;
pub mod vhost_user;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::dma::DmaArena;
use crate::error::Result;
use crate::ring::RingAddrs;
use crate::vfio::RegionMap;

/// How a queue notifies the device that buffers are available ("kick"). An enum rather
/// than a trait object: the kick is on the data path and has few, fixed forms.
#[derive(Clone)]
pub enum Notifier {
    /// Write to the back-end's kick eventfd (virtio-user).
    EventFd(Arc<EventFd>),
    /// Write the queue index to the queue's doorbell in a mapped BAR (virtio-PCI; the
    /// address was computed once at queue setup, so a kick is one MMIO write).
    Mmio(Doorbell),
}

/// A virtio-PCI doorbell (virtio 1.2 §4.1.5.2): an aligned 16-bit register inside a
/// mapped BAR, and the value a kick writes there. Built only by [`Doorbell::new`], which
/// checks the address against the mapping, so a kick never writes anywhere else.
#[derive(Clone)]
pub struct Doorbell {
    /// The doorbell (2-byte aligned, inside `map`).
    addr: *mut u16,
    /// What to write: the queue index (no `VIRTIO_F_NOTIFICATION_DATA`).
    value: u16,
    /// Keeps the BAR mapped while any ring can still kick.
    _map: Arc<RegionMap>,
}

impl Doorbell {
    /// The doorbell at `offset` of the BAR mapping `map`, written with `value`; `None`
    /// unless two bytes there are mapped and 2-byte aligned.
    pub fn new(map: Arc<RegionMap>, offset: u64, value: u16) -> Option<Doorbell> {
        let addr = map.ptr(offset, 2).filter(|p| *p as usize % 2 == 0)? as *mut u16;
        Some(Doorbell { addr, value, _map: map })
    }
}

// SAFETY: `Mmio`'s pointer is into a BAR mapping kept alive by the `Arc<RegionMap>` next
// to it (in its `Doorbell`); a doorbell write is a single volatile store, which any
// thread may issue (the device serialises them). The other variant is an `Arc<EventFd>`, Send and Sync.
unsafe impl Send for Notifier {}
// SAFETY: as above; `notify` takes `&self` and only stores to the doorbell.
unsafe impl Sync for Notifier {}

impl Notifier {
    /// Notifies the device.
    #[inline]
    pub fn notify(&self) {
        match self {
            // A failed write means the back-end is gone; the queue simply stops moving,
            // which the caller sees as no progress.
            Notifier::EventFd(e) => {
                let _ = e.write(1);
            }
            // The ring's SeqCst fence before the kick decision orders the avail-index
            // store before this write (on x86 stores are not reordered anyway).
            Notifier::Mmio(d) => {
                // SAFETY: `d.addr` is an aligned doorbell inside the BAR mapping that the
                // `_map` Arc keeps alive (checked in `Doorbell::new`); a volatile 16-bit
                // store is the access the device expects (virtio 1.2 §4.1.5.2).
                unsafe { d.addr.write_volatile(d.value.to_le()) }
            }
        }
    }
}

/// What the driver reads from the device's config space (virtio 1.2 §5.1.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetConfig {
    /// MAC address.
    pub mac: [u8; 6],
    /// `VIRTIO_NET_S_*` status bits (link up = 1).
    pub status: u16,
    /// Queue pairs the device supports.
    pub max_queue_pairs: u16,
    /// MTU.
    pub mtu: u16,
    /// `mtu` is what the device reported (`VIRTIO_NET_F_MTU` negotiated and its config
    /// space read), not the 1500 assumed without it (a vhost-user back-end without
    /// `VHOST_USER_PROTOCOL_F_CONFIG` offers the feature but shows no config space).
    pub mtu_reported: bool,
}

impl NetConfig {
    /// Range-checks what the device reported for `features` (virtio 1.2 §5.1.4.1): with
    /// `MQ`, `max_virtqueue_pairs` must be 1..=0x8000 (an error otherwise: queue set-up
    /// would follow it); with `MAC`, an address that is multicast or all zero cannot be
    /// a station's, and `fallback` (the port's configured or random address) is used
    /// instead, with a warning, as Linux does. The MTU is checked where it is used
    /// (`Port::open`, against what the port asks for).
    pub(crate) fn checked(mut self, features: u64, fallback: [u8; 6], device: &str) -> Result<NetConfig> {
        use crate::layout::ctrl::{MQ_VQ_PAIRS_MAX, MQ_VQ_PAIRS_MIN};
        use crate::layout::features as f;
        if features & f::bit(f::NET_MQ) != 0
            && !(MQ_VQ_PAIRS_MIN..=MQ_VQ_PAIRS_MAX).contains(&self.max_queue_pairs)
        {
            return Err(crate::Error::Config(format!(
                "{device}: the device reports max_virtqueue_pairs {}, outside {MQ_VQ_PAIRS_MIN}..={MQ_VQ_PAIRS_MAX}",
                self.max_queue_pairs
            )));
        }
        if features & f::bit(f::NET_MAC) != 0 && (self.mac[0] & 1 != 0 || self.mac == [0; 6]) {
            log::warn!(
                "{device}: the device reports MAC {:02x?}, not a station address: using {:02x?}",
                self.mac,
                fallback
            );
            self.mac = fallback;
        }
        Ok(self)
    }
}

/// A way to reach a virtio device: feature negotiation, config space, queue setup,
/// start and reset (virtio 1.2 §3.1 "Device Initialization").
pub trait Transport: Send {
    /// A short description for messages (the socket path, the PCI address).
    fn describe(&self) -> String;
    /// Whether the device addresses the DMA arena physically, page by page (VFIO
    /// no-IOMMU): the arena must then use 2 MiB hugepages, and nothing carved from it
    /// may cross one.
    fn needs_physical_dma(&self) -> bool {
        false
    }
    /// Makes the freshly created DMA arena reachable by the device and installs its
    /// address map ([`DmaArena::set_iova_map`]), before anything is carved from it
    /// (VFIO: `MAP_DMA` or physical addresses; virtio-user: the memory table to share).
    fn map_dma(&mut self, arena: &mut DmaArena) -> Result<()>;
    /// Makes another port's DMA arena (already mapped by that port) reachable by this
    /// device too, at the addresses that arena uses, so the two ports can share a buffer
    /// pool. Only transports whose device addresses are the same for every port can
    /// (virtio-user: guest-physical = virtual address); called before negotiation.
    fn share_dma(&mut self, _arena: &DmaArena) -> Result<()> {
        Err(crate::Error::Config(format!(
            "{}: sharing another port's buffer pool needs virtio-user (device addresses are per-device here)",
            self.describe()
        )))
    }
    /// Transport-level features the driver acknowledges whenever the device offers them
    /// (virtio-PCI: `VIRTIO_F_ACCESS_PLATFORM`, which such a device requires).
    fn platform_features(&self) -> u64 {
        0
    }
    /// Features the device offers.
    fn device_features(&mut self) -> Result<u64>;
    /// Acknowledges `features` and checks that the device accepted them (FEATURES_OK
    /// read back, or the back-end's acknowledgement).
    fn negotiate(&mut self, features: u64) -> Result<()>;
    /// The device's config space, given the negotiated features.
    fn config(&mut self, features: u64) -> Result<NetConfig>;
    /// Tells the device where queue `index` lives; returns how to kick it.
    fn setup_queue(&mut self, index: u16, size: u16, addrs: RingAddrs) -> Result<Notifier>;
    /// Starts the device (DRIVER_OK). Queues it may use are enabled with
    /// [`enable_queue`](Self::enable_queue), before or after.
    fn start(&mut self) -> Result<()>;
    /// Lets the device use queue `index`, which was set up (virtio-user:
    /// `SET_VRING_ENABLE`; virtio-PCI enables each queue at setup and chooses the pairs
    /// in use through the control queue, so there this does nothing).
    fn enable_queue(&mut self, _index: u16) -> Result<()> {
        Ok(())
    }
    /// Whether the device may offer `VIRTIO_NET_F_CTRL_VQ` without serving the control
    /// queue: vhost-user back-ends, since QEMU and DPDK's virtio-user terminate the
    /// control queue in the front-end. A PCI device always serves it.
    fn control_queue_may_be_unserved(&self) -> bool {
        false
    }
    /// Resets the device: it stops using every ring and buffer.
    fn reset(&mut self) -> Result<()>;

    /// How often the port's supervisor calls [`probe`](Self::probe).
    fn probe_every(&self) -> std::time::Duration {
        crate::supervisor::TICK
    }

    /// Whether the device is still there and what its link is (the port's supervisor
    /// asks every [`probe_every`](Self::probe_every); a call is bounded in time). With
    /// `heartbeat`, a device that is there but stopped answering is found too (a request
    /// it must answer), and the link bit is read again. Once it said [`Probe::Gone`], the device touches the rings
    /// no more and the transport waits for [`reconnect`](Self::reconnect).
    fn probe(&mut self, _heartbeat: bool) -> Probe {
        Probe::Alive { link_up: true }
    }
    /// After [`Probe::Gone`]: reaches the device again (a new connection, a device
    /// reset) and negotiates `features` on it, ready for
    /// [`restore_queues`](Self::restore_queues). An error is either temporary (tried
    /// again later: the back-end is not back yet) or, for [`Error::Config`] and
    /// [`Error::FeaturesRefused`], permanent.
    fn reconnect(&mut self, _features: u64) -> Result<()> {
        Err(crate::Error::Config(format!("{}: this transport cannot reconnect", self.describe())))
    }
    /// Sets the queues that were set up before and that `which` names up again (same
    /// rings, whose state the queues reset, and the same notifiers), enables those of
    /// them that were enabled, and makes sure the device has acted on it all (as
    /// [`start`](Self::start)). Called once after [`reconnect`](Self::reconnect) for the
    /// queues ready then, and again for each queue that becomes ready later.
    fn restore_queues(&mut self, _which: &dyn Fn(u16) -> bool) -> Result<()> {
        Err(crate::Error::Config(format!("{}: this transport cannot reconnect", self.describe())))
    }
}

/// What [`Transport::probe`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// The device answers; `link_up` is its `VIRTIO_NET_S_LINK_UP` (true when it has no
    /// status).
    Alive {
        /// The link bit.
        link_up: bool,
    },
    /// The device went away (the reason): it uses the rings no more; the port can
    /// reconnect.
    Gone(String),
    /// The device failed in a way this transport cannot recover from (the reason).
    Failed(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::features as f;

    const FALLBACK: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];

    fn cfg(mac: [u8; 6], pairs: u16) -> NetConfig {
        NetConfig { mac, status: 1, max_queue_pairs: pairs, mtu: 1500, mtu_reported: true }
    }

    #[test]
    fn config_values_are_range_checked() {
        let mq = f::bit(f::NET_MQ);
        let mac = f::bit(f::NET_MAC);
        let good = [0x52, 0x54, 0, 1, 2, 3];
        for pairs in [1, 2, 0x8000] {
            assert_eq!(cfg(good, pairs).checked(mq | mac, FALLBACK, "t").unwrap(), cfg(good, pairs));
        }
        for pairs in [0, 0x8001, u16::MAX] {
            let e = cfg(good, pairs).checked(mq, FALLBACK, "t").unwrap_err();
            assert!(
                e.to_string().contains(&format!("max_virtqueue_pairs {pairs}, outside 1..=32768")),
                "{e}"
            );
            // Without MQ the field is not read: nothing to check.
            assert!(cfg(good, pairs).checked(mac, FALLBACK, "t").is_ok());
        }
        for bad in [[0; 6], [0x01, 0, 0x5e, 0, 0, 1], [0xff; 6], [0x33, 0x33, 0, 0, 0, 1]] {
            assert_eq!(cfg(bad, 1).checked(mac, FALLBACK, "t").unwrap().mac, FALLBACK, "{bad:02x?}");
        }
        // Locally administered unicast is a station address.
        assert_eq!(
            cfg([0x02, 0xe7, 0x11, 0xde, 0x71, 0xce], 1).checked(mac, FALLBACK, "t").unwrap().mac[0],
            0x02
        );
    }
}
