//! The guest-side virtio-net poll-mode driver.
//!
//! Today this crate holds only [`layout`]: the virtio split-ring layout, feature bits
//! and net header that both sides of a ring share (the driver here, the device side in
//! `host-backend`), so there is exactly one copy of that arithmetic in the tree. The
//! driver itself (ports, queue pairs, the buffer pool, the virtio-user and VFIO-PCI
//! transports) is built on top of it by later work; nothing here pretends to be it.

pub mod layout;
