//! The transport seam: how the virtio-net device logic reaches a device.
//!
//! Owns: the [`Transport`] trait every transport implements (virtio-user over a
//! vhost-user socket today; VFIO-PCI later) and the [`Notifier`] a queue kicks with.
//! Must not: hold data-path state; after setup the data path only uses a `Notifier`.

pub mod vhost_user;

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::error::Result;
use crate::ring::RingAddrs;

/// How a queue notifies the device that buffers are available ("kick"). An enum rather
/// than a trait object: the kick is on the data path and has few, fixed forms.
#[derive(Clone)]
pub enum Notifier {
    /// Write to the back-end's kick eventfd (virtio-user).
    EventFd(Arc<EventFd>),
}

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
}

/// A way to reach a virtio device: feature negotiation, config space, queue setup,
/// start and reset (virtio 1.2 §3.1 "Device Initialization").
pub trait Transport: Send {
    /// A short description for messages (the socket path, the PCI address).
    fn describe(&self) -> String;
    /// Features the device offers.
    fn device_features(&mut self) -> Result<u64>;
    /// Acknowledges `features` and checks that the device accepted them (FEATURES_OK
    /// read back, or the back-end's acknowledgement).
    fn negotiate(&mut self, features: u64) -> Result<()>;
    /// The device's config space, given the negotiated features.
    fn config(&mut self, features: u64) -> Result<NetConfig>;
    /// Tells the device where queue `index` lives; returns how to kick it.
    fn setup_queue(&mut self, index: u16, size: u16, addrs: RingAddrs) -> Result<Notifier>;
    /// Starts the device with its first `queues` queues (DRIVER_OK).
    fn start(&mut self, queues: u16) -> Result<()>;
    /// Resets the device: it stops using every ring and buffer.
    fn reset(&mut self) -> Result<()>;
}
