//! The virtio-net wire format, shared by the guest driver (`driver/`) and the host
//! backend (`host-backend/`): the only code the two sides of a ring have in common.
//!
//! Owns: the split-ring layout (offsets, sizes, the descriptor format, `need_event`),
//! feature bits, the virtio-net header and control-queue constants, the device config
//! space layout ([`layout`]); the packed-ring layout (descriptor, AVAIL/USED flags and
//! wrap counters, event suppression: [`packed`]); Ethernet/IPv4/UDP/ICMP/ARP header builders and the Internet
//! checksum ([`frame`]); the virtio-net header as a value, checksum completion and
//! software segmentation of TCP/UDP super-frames (GSO), as pure functions ([`offload`]);
//! the write-prefetch hint ([`prefetch`]). Must not: touch ring memory (each side reads
//! and writes its rings with its own atomics and orderings), own any state, or depend on
//! either side's crate.

pub mod frame;
pub mod layout;
pub mod offload;
pub mod packed;
pub mod prefetch;
