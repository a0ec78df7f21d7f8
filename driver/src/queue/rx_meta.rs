//! The offload information of a received frame: its virtio-net header (virtio 1.2
//! §5.1.6.4), decoded.
//!
//! Owns: [`RxMeta`] and its decoding. Must not: read the header from ring memory itself
//! (the receive queue copies it out of a buffer the device has returned).

use crate::layout::{net_hdr, NET_HDR_LEN};
use spec::offload::NetHdr;

/// What the device said about a received frame: its virtio-net header (§5.1.6.4).
/// Without receive offloads negotiated it is all zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxMeta {
    /// `VIRTIO_NET_HDR_F_*` ([`net_hdr::F_NEEDS_CSUM`], [`net_hdr::F_DATA_VALID`], ...).
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`: a super-frame to be segmented, or `GSO_NONE`.
    pub gso_type: u8,
    /// Length of the headers to replicate in each segment.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// With `F_NEEDS_CSUM`: where checksumming starts.
    pub csum_start: u16,
    /// With `F_NEEDS_CSUM`: where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

impl RxMeta {
    /// Decodes a received `virtio_net_hdr_v1`.
    pub fn parse(h: &[u8; NET_HDR_LEN]) -> RxMeta {
        let NetHdr { flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, .. } =
            NetHdr::from_bytes(*h);
        RxMeta { flags, gso_type, hdr_len, gso_size, csum_start, csum_offset }
    }
    /// A segmentation super-frame (`gso_type` other than `GSO_NONE`).
    pub fn is_gso(&self) -> bool {
        self.gso_type & !net_hdr::GSO_ECN != net_hdr::GSO_NONE
    }
    /// The checksum is partial: the application must complete it (`F_NEEDS_CSUM`).
    pub fn needs_csum(&self) -> bool {
        self.flags & net_hdr::F_NEEDS_CSUM != 0
    }
    /// The device validated the checksum (`F_DATA_VALID`).
    pub fn data_valid(&self) -> bool {
        self.flags & net_hdr::F_DATA_VALID != 0
    }
}
