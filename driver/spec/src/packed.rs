//! Virtio packed-ring layout (virtio 1.2 §2.8 "Packed Virtqueues"), shared by the driver
//! and the host backend.
//!
//! Owns: the packed descriptor format (addr u64, len u32, id u16, flags u16), the
//! AVAIL/USED flag bits and what they mean against a wrap counter (§2.8.1), and the
//! event suppression structure (§2.8.10: `desc_event_off_wrap`, `desc_event_flags`) with
//! the offsets, sizes and alignments of the three areas. Must not: touch ring memory
//! (each side reads and writes it with its own atomics and volatile accesses: the
//! descriptor's flags word is the one a side publishes with a release store and the
//! other side acquires) or keep ring state.
//!
//! The split-ring counterpart is [`crate::layout`]; the feature bit is
//! [`crate::layout::features::RING_PACKED`].

use virtio_bindings::virtio_ring as vr;

/// Size of one packed descriptor (`struct pvirtq_desc`).
pub const DESC_SIZE: usize = 16;
/// Byte offset of `len` inside a descriptor.
pub const DESC_LEN: usize = 8;
/// Byte offset of `id` inside a descriptor.
pub const DESC_ID: usize = 12;
/// Byte offset of `flags` inside a descriptor.
pub const DESC_FLAGS: usize = 14;

/// Descriptor flag: the buffer continues in the next descriptor of the ring.
pub const DESC_F_NEXT: u16 = vr::VRING_DESC_F_NEXT as u16;
/// Descriptor flag: the buffer is device-writable.
pub const DESC_F_WRITE: u16 = vr::VRING_DESC_F_WRITE as u16;
/// Descriptor flag: the buffer holds a table of indirect descriptors.
pub const DESC_F_INDIRECT: u16 = vr::VRING_DESC_F_INDIRECT as u16;
/// Descriptor flag bit 7: AVAIL (§2.8.1).
pub const DESC_F_AVAIL: u16 = 1 << vr::VRING_PACKED_DESC_F_AVAIL;
/// Descriptor flag bit 15: USED (§2.8.1).
pub const DESC_F_USED: u16 = 1 << vr::VRING_PACKED_DESC_F_USED;

/// Largest packed-ring size (§2.8: queue size up to 2^15; it need not be a power of two).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Required alignment of the descriptor ring (§2.8.10.1: 16 bytes).
pub const DESC_ALIGN: u64 = 16;
/// Required alignment of each event suppression structure (4 bytes).
pub const EVENT_ALIGN: u64 = 4;
/// Size of an event suppression structure (`struct pvirtq_event_suppress`).
pub const EVENT_SIZE: usize = 4;
/// Byte offset of `desc_event_off_wrap` inside an event suppression structure.
pub const EVENT_OFF_WRAP: usize = 0;
/// Byte offset of `desc_event_flags` inside an event suppression structure.
pub const EVENT_FLAGS: usize = 2;

/// `desc_event_flags`: notifications enabled.
pub const EVENT_FLAG_ENABLE: u16 = vr::VRING_PACKED_EVENT_FLAG_ENABLE as u16;
/// `desc_event_flags`: notifications disabled.
pub const EVENT_FLAG_DISABLE: u16 = vr::VRING_PACKED_EVENT_FLAG_DISABLE as u16;
/// `desc_event_flags`: notify only for the descriptor `desc_event_off_wrap` names
/// (needs `VIRTIO_RING_F_EVENT_IDX`).
pub const EVENT_FLAG_DESC: u16 = vr::VRING_PACKED_EVENT_FLAG_DESC as u16;
/// Bit of `desc_event_off_wrap` that holds the wrap counter (the rest is the offset).
pub const EVENT_F_WRAP_CTR: u16 = 1 << vr::VRING_PACKED_EVENT_F_WRAP_CTR;

/// Size in bytes of the descriptor ring of a queue of `size` entries.
pub const fn desc_ring_bytes(size: u16) -> usize {
    DESC_SIZE * size as usize
}

/// The AVAIL and USED bits a driver writes to make a descriptor available while its
/// avail wrap counter is `wrap` (§2.8.1: AVAIL = wrap, USED = !wrap).
#[inline(always)]
pub const fn avail_flags(wrap: bool) -> u16 {
    if wrap {
        DESC_F_AVAIL
    } else {
        DESC_F_USED
    }
}

/// The AVAIL and USED bits a device writes to mark a descriptor used while its used
/// wrap counter is `wrap` (§2.8.1: both equal to the counter).
#[inline(always)]
pub const fn used_flags(wrap: bool) -> u16 {
    if wrap {
        DESC_F_AVAIL | DESC_F_USED
    } else {
        0
    }
}

/// Whether `flags` marks a descriptor available to the device for a device whose
/// expected wrap counter is `wrap` (AVAIL == wrap and USED != wrap).
#[inline(always)]
pub const fn is_avail(flags: u16, wrap: bool) -> bool {
    flags & (DESC_F_AVAIL | DESC_F_USED) == avail_flags(wrap)
}

/// Whether `flags` marks a descriptor used for a driver whose used wrap counter is
/// `wrap` (AVAIL == USED == wrap).
#[inline(always)]
pub const fn is_used(flags: u16, wrap: bool) -> bool {
    flags & (DESC_F_AVAIL | DESC_F_USED) == used_flags(wrap)
}

/// Encodes `desc_event_off_wrap`: the ring offset of the descriptor that should trigger
/// a notification, and the wrap counter that goes with it.
#[inline(always)]
pub const fn event_off_wrap(off: u16, wrap: bool) -> u16 {
    (off & !EVENT_F_WRAP_CTR) | if wrap { EVENT_F_WRAP_CTR } else { 0 }
}

/// Decodes `desc_event_off_wrap` into (offset, wrap counter).
#[inline(always)]
pub const fn split_off_wrap(v: u16) -> (u16, bool) {
    (v & !EVENT_F_WRAP_CTR, v & EVENT_F_WRAP_CTR != 0)
}

/// One packed descriptor as plain values (decoded from little-endian ring memory).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PackedDescriptor {
    /// Guest-physical (or I/O virtual) address of the buffer.
    pub addr: u64,
    /// Buffer length in bytes (for a used descriptor: bytes the device wrote).
    pub len: u32,
    /// Buffer id: chosen by the driver, returned by the device in the used descriptor.
    pub id: u16,
    /// `DESC_F_*` flags, AVAIL and USED included.
    pub flags: u16,
}

impl PackedDescriptor {
    /// Decodes a descriptor from its two little-endian 64-bit words as ring memory holds
    /// them (address; length, id and flags).
    #[inline]
    pub fn from_le_words(w0: u64, w1: u64) -> Self {
        let (w0, w1) = (u64::from_le(w0), u64::from_le(w1));
        PackedDescriptor { addr: w0, len: w1 as u32, id: (w1 >> 32) as u16, flags: (w1 >> 48) as u16 }
    }
    /// Encodes the descriptor as the two little-endian words ring memory holds.
    #[inline]
    pub fn to_le_words(self) -> (u64, u64) {
        let w1 = self.len as u64 | (self.id as u64) << 32 | (self.flags as u64) << 48;
        (self.addr.to_le(), w1.to_le())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_match_the_spec_struct() {
        // struct pvirtq_desc { le64 addr; le32 len; le16 id; le16 flags; }
        let d = PackedDescriptor { addr: 0x1122_3344_5566_7788, len: 0x99aa_bbcc, id: 0xddee, flags: 0x8081 };
        let (w0, w1) = d.to_le_words();
        let mut b = [0u8; DESC_SIZE];
        b[..8].copy_from_slice(&w0.to_ne_bytes());
        b[8..].copy_from_slice(&w1.to_ne_bytes());
        assert_eq!(u64::from_le_bytes(b[..8].try_into().unwrap()), d.addr);
        assert_eq!(u32::from_le_bytes(b[DESC_LEN..DESC_LEN + 4].try_into().unwrap()), d.len);
        assert_eq!(u16::from_le_bytes(b[DESC_ID..DESC_ID + 2].try_into().unwrap()), d.id);
        assert_eq!(u16::from_le_bytes(b[DESC_FLAGS..DESC_FLAGS + 2].try_into().unwrap()), d.flags);
        assert_eq!(PackedDescriptor::from_le_words(w0, w1), d);
    }

    #[test]
    fn avail_and_used_against_the_wrap_counters() {
        for wrap in [false, true] {
            let a = avail_flags(wrap);
            assert!(is_avail(a | DESC_F_NEXT, wrap));
            assert!(!is_avail(a, !wrap));
            assert!(!is_used(a, wrap) && !is_used(a, !wrap));
            let u = used_flags(wrap);
            assert!(is_used(u | DESC_F_WRITE, wrap));
            assert!(!is_used(u, !wrap));
            assert!(!is_avail(u, wrap) && !is_avail(u, !wrap));
        }
        assert_eq!(DESC_F_AVAIL, 0x80);
        assert_eq!(DESC_F_USED, 0x8000);
    }

    #[test]
    fn event_offset_and_wrap_round_trip() {
        for off in [0u16, 1, 255, 0x7fff] {
            for wrap in [false, true] {
                assert_eq!(split_off_wrap(event_off_wrap(off, wrap)), (off, wrap));
            }
        }
    }
}
