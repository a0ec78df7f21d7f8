//! The faults a guest's ring contents can cause, and how an IOTLB fault maps onto them.
//!
//! Owns: [`RingFault`], the one value the ring engine returns when what the driver wrote
//! breaks the protocol (virtio 1.2 §2.7, §2.8 for the packed ring), and its text for the log.
//! Must not: decide what happens to the queue (the port marks it broken through its
//! device, or retries an IOTLB miss) or read ring memory.

use crate::iotlb::Fault;

/// A value the driver wrote that breaks the protocol. The queue that saw it is marked
/// broken and is not touched again until the front-end sets it up anew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RingFault {
    /// `avail.idx` moved by more than the ring size since we last consumed.
    AvailJump { last_avail: u16, avail: u16 },
    /// An avail entry names a head `>= size`.
    HeadOutOfRange { head: u16 },
    /// A `next` link points outside its table.
    NextOutOfRange { next: u16 },
    /// A chain is longer than its table (so it loops).
    ChainTooLong,
    /// A buffer lies (partly) outside guest memory or its address wraps.
    BadAddress { addr: u64, len: u32 },
    /// An indirect descriptor without the feature, with `NEXT`, inside an indirect
    /// table, or with a length that is zero, not a multiple of 16 or too large.
    BadIndirect { len: u32 },
    /// An indirect table outside guest memory (or across a region boundary).
    IndirectAddress { addr: u64, len: u32 },
    /// A device-writable buffer on a queue the device reads, or the reverse.
    Direction,
    /// The ring areas are misaligned or outside guest memory.
    RingAddress,
    /// Under a vIOMMU: the IOTLB has no translation for this IOVA yet. Not a protocol
    /// violation by itself: the ring asks the front-end and retries the chain (see
    /// `Device::iotlb_miss`); only an address that stays untranslated breaks the queue.
    IotlbMiss { iova: u64, write: bool },
    /// Packed ring (§2.8.6): a chain continues (`NEXT`) into a descriptor that is not
    /// available under the wrap counter that position has (a wrap-counter lie, or a
    /// head made available before the rest of its chain).
    ChainNotAvailable { pos: u16 },
    /// Split ring: an avail entry names a head whose chain (of several descriptors) is
    /// available at an earlier position the device has not consumed yet.
    HeadInFlight { head: u16 },
    /// Packed ring: a buffer id the device holds already (walked in this burst and not
    /// yet used) is made available again.
    IdInFlight { id: u16 },
    /// Packed ring: the ring base (`SET_VRING_BASE`: offset, wrap counter in bit 15)
    /// names an offset outside the ring.
    BadBase { base: u16 },
    /// The front-end took guest memory away (its file was truncated after it was
    /// shared): an access was repaired by the SIGBUS handler (`sigbus.rs`). Not a
    /// chain's fault, so no drop is counted for it.
    MemoryGone,
    /// A worker did not let go of the ring within the control plane's bound, so a change
    /// (a base the front-end reads or sets, an IOTLB invalidation) could not be applied
    /// safely: the ring is broken instead. Not the driver's fault: no drop is counted.
    NotQuiescent,
}

impl std::fmt::Display for RingFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            RingFault::AvailJump { last_avail, avail } => {
                write!(f, "avail idx jumped from {last_avail} to {avail}, more than the ring size")
            }
            RingFault::HeadOutOfRange { head } => write!(f, "head index {head} out of range"),
            RingFault::NextOutOfRange { next } => write!(f, "next index {next} out of range"),
            RingFault::ChainTooLong => write!(f, "descriptor chain loops or is longer than its table"),
            RingFault::BadAddress { addr, len } => {
                write!(f, "buffer {addr:#x}+{len:#x} outside guest memory")
            }
            RingFault::BadIndirect { len } => write!(f, "malformed indirect descriptor (len {len})"),
            RingFault::IndirectAddress { addr, len } => {
                write!(f, "indirect table {addr:#x}+{len:#x} outside guest memory")
            }
            RingFault::Direction => write!(f, "buffer direction does not match the queue"),
            RingFault::RingAddress => write!(f, "ring areas misaligned or outside guest memory"),
            RingFault::IotlbMiss { iova, write } => {
                write!(f, "no IOTLB translation for {iova:#x} ({})", if write { "write" } else { "read" })
            }
            RingFault::ChainNotAvailable { pos } => {
                write!(f, "descriptor chain continues into descriptor {pos}, which is not available")
            }
            RingFault::HeadInFlight { head } => {
                write!(f, "head {head} made available again while its chain is in flight")
            }
            RingFault::IdInFlight { id } => write!(f, "buffer id {id} made available while in flight"),
            RingFault::BadBase { base } => write!(f, "ring base {base:#x} outside the ring"),
            RingFault::NotQuiescent => {
                write!(f, "a worker did not let go of the ring in time; the change could not be applied")
            }
            RingFault::MemoryGone => {
                write!(f, "guest memory was truncated under the device (its file shrank after SET_MEM_TABLE)")
            }
        }
    }
}

/// The `RingFault` for an IOTLB fault: a miss is retried (see [`RingFault::IotlbMiss`]);
/// a denied access is `denied`, what the same address would be without an IOMMU.
pub(crate) fn iotlb_fault(f: Fault, write: bool, denied: RingFault) -> RingFault {
    match f {
        Fault::Miss { iova } => RingFault::IotlbMiss { iova, write },
        Fault::Denied { .. } => denied,
    }
}
