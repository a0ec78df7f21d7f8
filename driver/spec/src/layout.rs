//! Virtio split-ring layout, feature bits and the virtio-net header, shared by the
//! driver and the host backend (virtio 1.2 §2.7 "Split Virtqueues", §5.1.6 "Device
//! Operation").
//!
//! Owns: byte offsets and sizes of the three split-ring areas, the descriptor format,
//! `vring_need_event` (§2.7.10), the feature-bit numbers both sides negotiate, and the
//! 12-byte `virtio_net_hdr_v1`. It must not touch ring memory itself: each side reads
//! and writes the ring with its own atomics and volatile accesses, because each side
//! needs different orderings.
//!
//! The constants come from `virtio-bindings` (the Linux UAPI headers); this module only
//! turns them into the types and arithmetic the hot paths use.

use virtio_bindings::{virtio_config, virtio_net, virtio_ring};

/// Size of one split-ring descriptor (`struct virtq_desc`): addr u64, len u32, flags u16,
/// next u16.
pub const DESC_SIZE: usize = 16;
/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = virtio_ring::VRING_DESC_F_NEXT as u16;
/// Descriptor flag: the buffer is device-writable (driver-readable).
pub const DESC_F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;
/// Descriptor flag: the buffer holds a table of indirect descriptors.
pub const DESC_F_INDIRECT: u16 = virtio_ring::VRING_DESC_F_INDIRECT as u16;
/// Avail-ring flag: the driver does not want used-buffer notifications.
pub const AVAIL_F_NO_INTERRUPT: u16 = virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16;
/// Used-ring flag: the device does not want available-buffer notifications (kicks).
pub const USED_F_NO_NOTIFY: u16 = virtio_ring::VRING_USED_F_NO_NOTIFY as u16;

/// Largest split-ring size the spec allows (§2.7: "Queue Size ... maximum 32768").
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// Required alignment of the descriptor table (§2.7, table "Virtqueue Part Alignment").
pub const DESC_ALIGN: u64 = 16;
/// Required alignment of the driver (avail) area.
pub const AVAIL_ALIGN: u64 = 2;
/// Required alignment of the device (used) area.
pub const USED_ALIGN: u64 = 4;

/// Byte offset of `avail.flags`.
pub const AVAIL_FLAGS: usize = 0;
/// Byte offset of `avail.idx`.
pub const AVAIL_IDX: usize = 2;
/// Byte offset of `used.flags`.
pub const USED_FLAGS: usize = 0;
/// Byte offset of `used.idx`.
pub const USED_IDX: usize = 2;
/// Size of one used-ring element (`struct virtq_used_elem`: id u32, len u32).
pub const USED_ELEM_SIZE: usize = 8;

/// Size in bytes of the descriptor table of a ring of `size` entries.
pub const fn desc_table_bytes(size: u16) -> usize {
    DESC_SIZE * size as usize
}
/// Size in bytes of the driver area, `used_event` included.
pub const fn avail_bytes(size: u16) -> usize {
    4 + 2 * size as usize + 2
}
/// Size in bytes of the device area, `avail_event` included.
pub const fn used_bytes(size: u16) -> usize {
    4 + USED_ELEM_SIZE * size as usize + 2
}
/// Byte offset of avail-ring entry `slot` (already reduced modulo the ring size).
pub const fn avail_entry(slot: u16) -> usize {
    4 + 2 * slot as usize
}
/// Byte offset of `used_event` (the trailing field of the driver area).
pub const fn used_event(size: u16) -> usize {
    4 + 2 * size as usize
}
/// Byte offset of used-ring element `slot` (already reduced modulo the ring size).
pub const fn used_entry(slot: u16) -> usize {
    4 + USED_ELEM_SIZE * slot as usize
}
/// Byte offset of `avail_event` (the trailing field of the device area).
pub const fn avail_event(size: u16) -> usize {
    4 + USED_ELEM_SIZE * size as usize
}

/// The spec's `vring_need_event` (§2.7.10): with EVENT_IDX negotiated, a side that moved
/// its index from `old` to `new` must notify when `event` lies in `[old, new)`,
/// computed in wrapping u16 arithmetic.
#[inline]
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// One split-ring descriptor as plain values (decoded from little-endian ring memory).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical (or I/O virtual) address of the buffer.
    pub addr: u64,
    /// Buffer length in bytes.
    pub len: u32,
    /// `DESC_F_*` flags.
    pub flags: u16,
    /// Next descriptor index when `flags & DESC_F_NEXT`.
    pub next: u16,
}

impl Descriptor {
    /// Decodes a descriptor from its 16 little-endian bytes.
    #[inline]
    pub fn from_le_bytes(b: [u8; DESC_SIZE]) -> Self {
        let w0 = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        let w1 = u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]);
        Self::from_le_words(w0, w1)
    }
    /// Decodes a descriptor from its two little-endian 64-bit words as ring memory holds
    /// them (address; length, flags and next).
    #[inline]
    pub fn from_le_words(w0: u64, w1: u64) -> Self {
        let (w0, w1) = (u64::from_le(w0), u64::from_le(w1));
        Descriptor { addr: w0, len: w1 as u32, flags: (w1 >> 32) as u16, next: (w1 >> 48) as u16 }
    }
    /// Encodes the descriptor as ring memory holds it.
    #[inline]
    pub fn to_le_bytes(self) -> [u8; DESC_SIZE] {
        let mut b = [0u8; DESC_SIZE];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// Length of `virtio_net_hdr_v1`, the header every packet carries once VERSION_1 is
/// negotiated (§5.1.6: 12 bytes, `num_buffers` included, mergeable buffers or not).
pub const NET_HDR_LEN: usize = 12;
/// Byte offset of `num_buffers` inside the header.
pub const NET_HDR_NUM_BUFFERS: usize = 10;

/// Feature bits (bit numbers) the two sides negotiate.
pub mod features {
    use super::{virtio_config, virtio_net, virtio_ring};
    /// `VIRTIO_NET_F_MTU`: `mtu` in config space is valid.
    pub const NET_MTU: u32 = virtio_net::VIRTIO_NET_F_MTU;
    /// `VIRTIO_NET_F_MAC`: `mac` in config space is valid.
    pub const NET_MAC: u32 = virtio_net::VIRTIO_NET_F_MAC;
    /// `VIRTIO_NET_F_MRG_RXBUF`: a received packet may span several buffers.
    pub const NET_MRG_RXBUF: u32 = virtio_net::VIRTIO_NET_F_MRG_RXBUF;
    /// `VIRTIO_NET_F_STATUS`: `status` in config space is valid.
    pub const NET_STATUS: u32 = virtio_net::VIRTIO_NET_F_STATUS;
    /// `VIRTIO_NET_F_CTRL_VQ`: a control virtqueue follows the data queues.
    pub const NET_CTRL_VQ: u32 = virtio_net::VIRTIO_NET_F_CTRL_VQ;
    /// `VIRTIO_NET_F_MQ`: several queue pairs.
    pub const NET_MQ: u32 = virtio_net::VIRTIO_NET_F_MQ;
    /// `VIRTIO_RING_F_INDIRECT_DESC`.
    pub const RING_INDIRECT_DESC: u32 = virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
    /// `VIRTIO_RING_F_EVENT_IDX`.
    pub const RING_EVENT_IDX: u32 = virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    /// `VIRTIO_F_VERSION_1`.
    pub const VERSION_1: u32 = virtio_config::VIRTIO_F_VERSION_1;
    /// `VIRTIO_F_ACCESS_PLATFORM`.
    pub const ACCESS_PLATFORM: u32 = virtio_config::VIRTIO_F_ACCESS_PLATFORM;
    /// `VIRTIO_F_RING_PACKED`.
    pub const RING_PACKED: u32 = virtio_config::VIRTIO_F_RING_PACKED;
    /// `VIRTIO_F_IN_ORDER`: buffers are used in the order they were made available.
    pub const IN_ORDER: u32 = virtio_config::VIRTIO_F_IN_ORDER;
    /// `VHOST_USER_F_PROTOCOL_FEATURES` (vhost-user only, bit 30).
    pub const VHOST_USER_PROTOCOL_FEATURES: u32 = 30;

    /// `VIRTIO_NET_F_CSUM`: the device completes partial checksums of transmitted packets.
    pub const NET_CSUM: u32 = virtio_net::VIRTIO_NET_F_CSUM;
    /// `VIRTIO_NET_F_HOST_TSO4`: the device segments TCPv4 super-frames the driver sends.
    pub const NET_HOST_TSO4: u32 = virtio_net::VIRTIO_NET_F_HOST_TSO4;
    /// `VIRTIO_NET_F_HOST_TSO6`: the device segments TCPv6 super-frames the driver sends.
    pub const NET_HOST_TSO6: u32 = virtio_net::VIRTIO_NET_F_HOST_TSO6;
    /// `VIRTIO_NET_F_HOST_ECN`: transmitted TSO super-frames may carry ECN.
    pub const NET_HOST_ECN: u32 = virtio_net::VIRTIO_NET_F_HOST_ECN;
    /// `VIRTIO_NET_F_HOST_UFO`: the device fragments UDP super-frames the driver sends.
    pub const NET_HOST_UFO: u32 = virtio_net::VIRTIO_NET_F_HOST_UFO;
    /// `VIRTIO_NET_F_HOST_USO`: the device segments UDP (USO) super-frames the driver sends.
    pub const NET_HOST_USO: u32 = virtio_net::VIRTIO_NET_F_HOST_USO;
    /// `VIRTIO_NET_F_GUEST_CSUM`: the driver accepts packets with a partial checksum.
    pub const NET_GUEST_CSUM: u32 = virtio_net::VIRTIO_NET_F_GUEST_CSUM;
    /// `VIRTIO_NET_F_CTRL_GUEST_OFFLOADS`: receive offloads can be switched at run time.
    pub const NET_CTRL_GUEST_OFFLOADS: u32 = virtio_net::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS;
    /// `VIRTIO_NET_F_GUEST_TSO4`: the driver accepts TCPv4 super-frames.
    pub const NET_GUEST_TSO4: u32 = virtio_net::VIRTIO_NET_F_GUEST_TSO4;
    /// `VIRTIO_NET_F_GUEST_TSO6`: the driver accepts TCPv6 super-frames.
    pub const NET_GUEST_TSO6: u32 = virtio_net::VIRTIO_NET_F_GUEST_TSO6;
    /// `VIRTIO_NET_F_GUEST_ECN`: TSO super-frames may carry ECN.
    pub const NET_GUEST_ECN: u32 = virtio_net::VIRTIO_NET_F_GUEST_ECN;
    /// `VIRTIO_NET_F_GUEST_UFO`: the driver accepts UDP fragmentation super-frames.
    pub const NET_GUEST_UFO: u32 = virtio_net::VIRTIO_NET_F_GUEST_UFO;
    /// `VIRTIO_NET_F_GUEST_USO4`: the driver accepts UDPv4 segmentation super-frames.
    pub const NET_GUEST_USO4: u32 = virtio_net::VIRTIO_NET_F_GUEST_USO4;
    /// `VIRTIO_NET_F_GUEST_USO6`: the driver accepts UDPv6 segmentation super-frames.
    pub const NET_GUEST_USO6: u32 = virtio_net::VIRTIO_NET_F_GUEST_USO6;
    /// `VIRTIO_NET_F_CTRL_RX`: promiscuous / all-multicast modes and the MAC table.
    pub const NET_CTRL_RX: u32 = virtio_net::VIRTIO_NET_F_CTRL_RX;
    /// `VIRTIO_NET_F_CTRL_VLAN`: VLAN filtering.
    pub const NET_CTRL_VLAN: u32 = virtio_net::VIRTIO_NET_F_CTRL_VLAN;
    /// `VIRTIO_NET_F_CTRL_RX_EXTRA`: the extra RX modes (all-unicast, no-multicast, ...).
    pub const NET_CTRL_RX_EXTRA: u32 = virtio_net::VIRTIO_NET_F_CTRL_RX_EXTRA;
    /// `VIRTIO_NET_F_GUEST_ANNOUNCE`.
    pub const NET_GUEST_ANNOUNCE: u32 = virtio_net::VIRTIO_NET_F_GUEST_ANNOUNCE;
    /// `VIRTIO_NET_F_CTRL_MAC_ADDR`: the MAC address can be set through the control queue.
    pub const NET_CTRL_MAC_ADDR: u32 = virtio_net::VIRTIO_NET_F_CTRL_MAC_ADDR;

    /// The receive offloads `VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET` switches, as feature
    /// bits (its `u64` argument uses the feature bit numbers, §5.1.6.5.6.1).
    pub const GUEST_OFFLOADS: u64 = bit(NET_GUEST_CSUM)
        | bit(NET_GUEST_TSO4)
        | bit(NET_GUEST_TSO6)
        | bit(NET_GUEST_ECN)
        | bit(NET_GUEST_UFO)
        | bit(NET_GUEST_USO4)
        | bit(NET_GUEST_USO6);
    /// The receive offloads that make the device merge several wire frames into one
    /// super-frame (Linux's `GUEST_OFFLOAD_GRO_HW_MASK`): what an XDP-style program,
    /// which sees one buffer as one frame, cannot handle.
    pub const GUEST_GRO_HW: u64 = bit(NET_GUEST_TSO4)
        | bit(NET_GUEST_TSO6)
        | bit(NET_GUEST_ECN)
        | bit(NET_GUEST_UFO)
        | bit(NET_GUEST_USO4)
        | bit(NET_GUEST_USO6);

    /// The mask of one feature bit.
    pub const fn bit(b: u32) -> u64 {
        1u64 << b
    }

    /// The spec's name of feature bit `b` (for messages), or "feature bit" if unknown.
    pub fn name(b: u32) -> &'static str {
        match b {
            NET_CSUM => "VIRTIO_NET_F_CSUM",
            NET_HOST_TSO4 => "VIRTIO_NET_F_HOST_TSO4",
            NET_HOST_TSO6 => "VIRTIO_NET_F_HOST_TSO6",
            NET_HOST_ECN => "VIRTIO_NET_F_HOST_ECN",
            NET_HOST_UFO => "VIRTIO_NET_F_HOST_UFO",
            NET_HOST_USO => "VIRTIO_NET_F_HOST_USO",
            NET_GUEST_CSUM => "VIRTIO_NET_F_GUEST_CSUM",
            NET_CTRL_GUEST_OFFLOADS => "VIRTIO_NET_F_CTRL_GUEST_OFFLOADS",
            NET_MTU => "VIRTIO_NET_F_MTU",
            NET_MAC => "VIRTIO_NET_F_MAC",
            NET_GUEST_TSO4 => "VIRTIO_NET_F_GUEST_TSO4",
            NET_GUEST_TSO6 => "VIRTIO_NET_F_GUEST_TSO6",
            NET_GUEST_ECN => "VIRTIO_NET_F_GUEST_ECN",
            NET_GUEST_UFO => "VIRTIO_NET_F_GUEST_UFO",
            NET_MRG_RXBUF => "VIRTIO_NET_F_MRG_RXBUF",
            NET_STATUS => "VIRTIO_NET_F_STATUS",
            NET_CTRL_VQ => "VIRTIO_NET_F_CTRL_VQ",
            NET_CTRL_RX => "VIRTIO_NET_F_CTRL_RX",
            NET_CTRL_VLAN => "VIRTIO_NET_F_CTRL_VLAN",
            NET_CTRL_RX_EXTRA => "VIRTIO_NET_F_CTRL_RX_EXTRA",
            NET_GUEST_ANNOUNCE => "VIRTIO_NET_F_GUEST_ANNOUNCE",
            NET_MQ => "VIRTIO_NET_F_MQ",
            NET_CTRL_MAC_ADDR => "VIRTIO_NET_F_CTRL_MAC_ADDR",
            NET_GUEST_USO4 => "VIRTIO_NET_F_GUEST_USO4",
            NET_GUEST_USO6 => "VIRTIO_NET_F_GUEST_USO6",
            RING_INDIRECT_DESC => "VIRTIO_RING_F_INDIRECT_DESC",
            RING_EVENT_IDX => "VIRTIO_RING_F_EVENT_IDX",
            VERSION_1 => "VIRTIO_F_VERSION_1",
            ACCESS_PLATFORM => "VIRTIO_F_ACCESS_PLATFORM",
            RING_PACKED => "VIRTIO_F_RING_PACKED",
            IN_ORDER => "VIRTIO_F_IN_ORDER",
            _ => "feature bit",
        }
    }

    /// The names of the feature bits set in `mask`, joined with `", "`.
    pub fn names(mask: u64) -> String {
        (0..64).filter(|b| mask & bit(*b) != 0).map(name).collect::<Vec<_>>().join(", ")
    }
}

/// The virtio-net header's fields (`struct virtio_net_hdr_v1`, §5.1.6): byte offsets and
/// the values of `flags` and `gso_type`.
pub mod net_hdr {
    use super::virtio_net;
    /// `u8 flags`.
    pub const FLAGS: usize = 0;
    /// `u8 gso_type`.
    pub const GSO_TYPE: usize = 1;
    /// `le16 hdr_len`.
    pub const HDR_LEN: usize = 2;
    /// `le16 gso_size`.
    pub const GSO_SIZE: usize = 4;
    /// `le16 csum_start`.
    pub const CSUM_START: usize = 6;
    /// `le16 csum_offset`.
    pub const CSUM_OFFSET: usize = 8;
    /// `flags`: the checksum at `csum_start + csum_offset` is partial (to be completed).
    pub const F_NEEDS_CSUM: u8 = virtio_net::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    /// `flags`: the device validated the checksum.
    pub const F_DATA_VALID: u8 = virtio_net::VIRTIO_NET_HDR_F_DATA_VALID as u8;
    /// `flags`: RSC coalescing information is present.
    pub const F_RSC_INFO: u8 = virtio_net::VIRTIO_NET_HDR_F_RSC_INFO as u8;
    /// `gso_type`: not a super-frame.
    pub const GSO_NONE: u8 = virtio_net::VIRTIO_NET_HDR_GSO_NONE as u8;
    /// `gso_type`: TCPv4 segmentation.
    pub const GSO_TCPV4: u8 = virtio_net::VIRTIO_NET_HDR_GSO_TCPV4 as u8;
    /// `gso_type`: UDP fragmentation (UFO).
    pub const GSO_UDP: u8 = virtio_net::VIRTIO_NET_HDR_GSO_UDP as u8;
    /// `gso_type`: TCPv6 segmentation.
    pub const GSO_TCPV6: u8 = virtio_net::VIRTIO_NET_HDR_GSO_TCPV6 as u8;
    /// `gso_type`: UDP segmentation (USO).
    pub const GSO_UDP_L4: u8 = virtio_net::VIRTIO_NET_HDR_GSO_UDP_L4 as u8;
    /// `gso_type` flag: the super-frame carries ECN (CWR set).
    pub const GSO_ECN: u8 = virtio_net::VIRTIO_NET_HDR_GSO_ECN as u8;
}

/// The control virtqueue's commands (§5.1.6.5): every command is `struct
/// virtio_net_ctrl_hdr { u8 class; u8 command; }`, command-specific data (device-
/// readable), then one device-writable `u8 ack`.
pub mod ctrl {
    use super::virtio_net;
    /// Bytes of the command header (class, command).
    pub const HDR_LEN: usize = 2;
    /// `ack`: the command succeeded.
    pub const OK: u8 = virtio_net::VIRTIO_NET_OK as u8;
    /// `ack`: the command failed.
    pub const ERR: u8 = virtio_net::VIRTIO_NET_ERR as u8;
    /// Class: receive filtering modes (`VIRTIO_NET_F_CTRL_RX`); data: `u8 on`.
    pub const CLASS_RX: u8 = virtio_net::VIRTIO_NET_CTRL_RX as u8;
    /// RX: promiscuous mode.
    pub const RX_PROMISC: u8 = virtio_net::VIRTIO_NET_CTRL_RX_PROMISC as u8;
    /// RX: receive every multicast frame.
    pub const RX_ALLMULTI: u8 = virtio_net::VIRTIO_NET_CTRL_RX_ALLMULTI as u8;
    /// RX (`CTRL_RX_EXTRA`): receive every unicast frame.
    pub const RX_ALLUNI: u8 = virtio_net::VIRTIO_NET_CTRL_RX_ALLUNI as u8;
    /// RX (`CTRL_RX_EXTRA`): no multicast.
    pub const RX_NOMULTI: u8 = virtio_net::VIRTIO_NET_CTRL_RX_NOMULTI as u8;
    /// RX (`CTRL_RX_EXTRA`): no unicast.
    pub const RX_NOUNI: u8 = virtio_net::VIRTIO_NET_CTRL_RX_NOUNI as u8;
    /// RX (`CTRL_RX_EXTRA`): no broadcast.
    pub const RX_NOBCAST: u8 = virtio_net::VIRTIO_NET_CTRL_RX_NOBCAST as u8;
    /// Class: MAC filtering.
    pub const CLASS_MAC: u8 = virtio_net::VIRTIO_NET_CTRL_MAC as u8;
    /// MAC (`CTRL_RX`): the filter table; data: two `struct virtio_net_ctrl_mac { le32
    /// entries; u8 macs[entries][6]; }`, unicast then multicast.
    pub const MAC_TABLE_SET: u8 = virtio_net::VIRTIO_NET_CTRL_MAC_TABLE_SET as u8;
    /// MAC (`CTRL_MAC_ADDR`): the device's own address; data: `u8 mac[6]`.
    pub const MAC_ADDR_SET: u8 = virtio_net::VIRTIO_NET_CTRL_MAC_ADDR_SET as u8;
    /// Class: VLAN filtering (`CTRL_VLAN`); data: `le16 vid`.
    pub const CLASS_VLAN: u8 = virtio_net::VIRTIO_NET_CTRL_VLAN as u8;
    /// VLAN: accept frames of this VLAN.
    pub const VLAN_ADD: u8 = virtio_net::VIRTIO_NET_CTRL_VLAN_ADD as u8;
    /// VLAN: stop accepting frames of this VLAN.
    pub const VLAN_DEL: u8 = virtio_net::VIRTIO_NET_CTRL_VLAN_DEL as u8;
    /// Class: gratuitous-packet announcement (`GUEST_ANNOUNCE`).
    pub const CLASS_ANNOUNCE: u8 = virtio_net::VIRTIO_NET_CTRL_ANNOUNCE as u8;
    /// ANNOUNCE: acknowledge the announcement request.
    pub const ANNOUNCE_ACK: u8 = virtio_net::VIRTIO_NET_CTRL_ANNOUNCE_ACK as u8;
    /// Class: multi-queue (`MQ`).
    pub const CLASS_MQ: u8 = virtio_net::VIRTIO_NET_CTRL_MQ as u8;
    /// MQ: the number of queue pairs the device uses; data: `le16 virtqueue_pairs`.
    pub const MQ_VQ_PAIRS_SET: u8 = virtio_net::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8;
    /// Smallest `virtqueue_pairs`.
    pub const MQ_VQ_PAIRS_MIN: u16 = virtio_net::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN as u16;
    /// Largest `virtqueue_pairs`.
    pub const MQ_VQ_PAIRS_MAX: u16 = virtio_net::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX as u16;
    /// Class: receive offloads (`CTRL_GUEST_OFFLOADS`).
    pub const CLASS_GUEST_OFFLOADS: u8 = virtio_net::VIRTIO_NET_CTRL_GUEST_OFFLOADS as u8;
    /// GUEST_OFFLOADS: the offloads in use; data: `le64 offloads` (feature bit numbers).
    pub const GUEST_OFFLOADS_SET: u8 = virtio_net::VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET as u8;

    /// Index of the control virtqueue: after every data queue, `2 * max_virtqueue_pairs`
    /// when `VIRTIO_NET_F_MQ` is negotiated, else 2 (§5.1.2).
    pub const fn queue_index(mq_negotiated: bool, max_virtqueue_pairs: u16) -> u32 {
        if mq_negotiated {
            2 * max_virtqueue_pairs as u32
        } else {
            2
        }
    }
}

/// Byte offsets in `struct virtio_net_config` (§5.1.4).
pub mod net_config {
    /// `mac[6]`.
    pub const MAC: usize = 0;
    /// `status` (u16).
    pub const STATUS: usize = 6;
    /// `max_virtqueue_pairs` (u16).
    pub const MAX_VQ_PAIRS: usize = 8;
    /// `mtu` (u16).
    pub const MTU: usize = 10;
    /// Size of the fields above.
    pub const LEN: usize = 12;
    /// `VIRTIO_NET_S_LINK_UP`.
    pub const S_LINK_UP: u16 = super::virtio_net::VIRTIO_NET_S_LINK_UP as u16;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_matches_spec_examples() {
        // The driver asked to be told once used idx passes 5.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 10, 3));
        assert!(!need_event(5, 5, 3));
        assert!(!need_event(5, 9, 6));
        // Across the u16 wrap.
        assert!(need_event(0xffff, 2, 0xfffe));
        assert!(!need_event(3, 2, 0xfffe));
    }

    #[test]
    fn descriptor_round_trips() {
        let d = Descriptor { addr: 0x1122_3344_5566_7788, len: 0x99aa_bbcc, flags: 7, next: 0xfedc };
        assert_eq!(Descriptor::from_le_bytes(d.to_le_bytes()), d);
    }

    #[test]
    fn layout_sizes_match_spec() {
        assert_eq!(avail_bytes(256), 6 + 512);
        assert_eq!(used_bytes(256), 6 + 2048);
        assert_eq!(used_event(256), 516);
        assert_eq!(avail_event(256), 2052);
    }
}
