//! The offload information of a received frame: its virtio-net header (virtio 1.2
//! §5.1.6.4), decoded.
//!
//! Owns: [`RxMeta`], its decoding, and the check of every field the device wrote
//! against what was negotiated and the frame's length ([`HdrRules`]), so that an
//! application never sees a header the device was not allowed to write. Must not: read
//! the header from ring memory itself (the receive queue copies it out of a buffer the
//! device has returned).

use crate::layout::features::{self as f, bit};
use crate::layout::{net_hdr, NET_HDR_LEN};
use spec::offload::NetHdr;

/// What a device may write into a received frame's header, from the negotiated
/// features (virtio 1.2 §5.1.6.4.1): checksum flags only with `GUEST_CSUM`, each
/// segmentation type only with its `GUEST_*` feature, the ECN bit only with `GUEST_ECN`.
/// Fixed for the queue's life: what was negotiated, not what `GUEST_OFFLOADS_SET`
/// switched on now (frames already in the ring when it switched were allowed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct HdrRules {
    csum: bool,
    tso4: bool,
    tso6: bool,
    ufo: bool,
    uso: bool,
    ecn: bool,
}

impl HdrRules {
    /// The rules of a negotiated feature set.
    pub(crate) fn from_features(features: u64) -> HdrRules {
        let has = |b: u32| features & bit(b) != 0;
        HdrRules {
            csum: has(f::NET_GUEST_CSUM),
            tso4: has(f::NET_GUEST_TSO4),
            tso6: has(f::NET_GUEST_TSO6),
            ufo: has(f::NET_GUEST_UFO),
            uso: has(f::NET_GUEST_USO4) || has(f::NET_GUEST_USO6),
            ecn: has(f::NET_GUEST_ECN),
        }
    }

    /// Whether the device may send segmentation super-frames (any `GUEST_*` GSO type).
    pub(crate) fn gso(self) -> bool {
        self.tso4 || self.tso6 || self.ufo || self.uso
    }
}

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
    /// Decodes a received header and checks it against `rules` for a frame of
    /// `frame_len` bytes (after the header): `None` if the device wrote something it
    /// may not (an unknown or un-negotiated flag or segmentation type, a checksum
    /// position outside the frame, a super-frame without a segment size or with headers
    /// longer than the frame). `num_buffers` is the merge path's business.
    pub(crate) fn checked(h: &[u8; NET_HDR_LEN], rules: HdrRules, frame_len: u32) -> Option<RxMeta> {
        let m = RxMeta::parse(h);
        let known = net_hdr::F_NEEDS_CSUM | net_hdr::F_DATA_VALID;
        if m.flags & !known != 0 || (m.flags != 0 && !rules.csum) {
            return None;
        }
        if m.needs_csum() && m.csum_start as u32 + m.csum_offset as u32 + 2 > frame_len {
            return None;
        }
        let allowed = match m.gso_type & !net_hdr::GSO_ECN {
            net_hdr::GSO_NONE => m.gso_type & net_hdr::GSO_ECN == 0,
            net_hdr::GSO_TCPV4 => rules.tso4,
            net_hdr::GSO_TCPV6 => rules.tso6,
            net_hdr::GSO_UDP => rules.ufo,
            net_hdr::GSO_UDP_L4 => rules.uso,
            _ => false,
        };
        if !allowed || (m.gso_type & net_hdr::GSO_ECN != 0 && !rules.ecn) {
            return None;
        }
        if m.is_gso() && (m.gso_size == 0 || m.hdr_len as u32 > frame_len) {
            return None;
        }
        Some(m)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(flags: u8, gso: u8, hdr_len: u16, gso_size: u16, start: u16, off: u16) -> [u8; NET_HDR_LEN] {
        NetHdr {
            flags,
            gso_type: gso,
            hdr_len,
            gso_size,
            csum_start: start,
            csum_offset: off,
            num_buffers: 1,
        }
        .to_bytes()
    }

    #[test]
    fn only_negotiated_and_consistent_headers_pass() {
        let none = HdrRules::default();
        let csum = HdrRules::from_features(bit(f::NET_GUEST_CSUM));
        let all = HdrRules::from_features(
            bit(f::NET_GUEST_CSUM)
                | bit(f::NET_GUEST_TSO4)
                | bit(f::NET_GUEST_TSO6)
                | bit(f::NET_GUEST_UFO)
                | bit(f::NET_GUEST_USO4)
                | bit(f::NET_GUEST_ECN),
        );
        let zero = hdr(0, 0, 0, 0, 0, 0);
        assert_eq!(RxMeta::checked(&zero, none, 60), Some(RxMeta::default()));
        // Checksum flags: only with GUEST_CSUM, only known bits, position inside the frame.
        let partial = hdr(net_hdr::F_NEEDS_CSUM, 0, 0, 0, 34, 16);
        assert_eq!(RxMeta::checked(&partial, none, 100), None);
        assert!(RxMeta::checked(&partial, csum, 100).is_some());
        assert!(RxMeta::checked(&partial, csum, 52).is_some(), "34 + 16 + 2 = 52 fits");
        assert_eq!(RxMeta::checked(&partial, csum, 51), None);
        assert_eq!(
            RxMeta::checked(&hdr(net_hdr::F_NEEDS_CSUM, 0, 0, 0, u16::MAX, u16::MAX), csum, 9000),
            None
        );
        assert_eq!(RxMeta::checked(&hdr(net_hdr::F_DATA_VALID, 0, 0, 0, 0, 0), none, 60), None);
        assert!(RxMeta::checked(&hdr(net_hdr::F_DATA_VALID, 0, 0, 0, 0, 0), csum, 60).is_some());
        assert_eq!(RxMeta::checked(&hdr(net_hdr::F_RSC_INFO, 0, 0, 0, 0, 0), all, 60), None);
        assert_eq!(RxMeta::checked(&hdr(0x80, 0, 0, 0, 0, 0), all, 60), None);
        // Segmentation: each type with its feature, a segment size, headers inside.
        for gso in [net_hdr::GSO_TCPV4, net_hdr::GSO_TCPV6, net_hdr::GSO_UDP, net_hdr::GSO_UDP_L4] {
            let h = hdr(net_hdr::F_NEEDS_CSUM, gso, 54, 1448, 34, 16);
            assert!(RxMeta::checked(&h, all, 3000).is_some(), "gso {gso}");
            assert_eq!(RxMeta::checked(&h, csum, 3000), None, "gso {gso} not negotiated");
            assert_eq!(RxMeta::checked(&hdr(net_hdr::F_NEEDS_CSUM, gso, 54, 0, 34, 16), all, 3000), None);
            assert_eq!(RxMeta::checked(&h, all, 53), None, "headers longer than the frame");
        }
        let tso4 = HdrRules::from_features(bit(f::NET_GUEST_CSUM) | bit(f::NET_GUEST_TSO4));
        let ecn = hdr(net_hdr::F_NEEDS_CSUM, net_hdr::GSO_TCPV4 | net_hdr::GSO_ECN, 54, 1448, 34, 16);
        assert_eq!(RxMeta::checked(&ecn, tso4, 3000), None, "ECN without GUEST_ECN");
        assert!(RxMeta::checked(&ecn, all, 3000).is_some());
        assert_eq!(RxMeta::checked(&hdr(0, net_hdr::GSO_ECN, 0, 0, 0, 0), all, 60), None, "ECN alone");
        for gso in [2u8, 6, 7, 0x7f, 0xff] {
            assert_eq!(RxMeta::checked(&hdr(0, gso, 54, 1448, 0, 0), all, 3000), None, "gso {gso}");
        }
    }
}
