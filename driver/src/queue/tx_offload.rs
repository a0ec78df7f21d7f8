//! A packet's transmit offload request checked against the port and the frame, and
//! turned into the virtio-net header it is sent with (virtio 1.2 §5.1.6.2).
//!
//! Owns: which offloads a transmit queue may request ([`TxCaps`], from the negotiated
//! features) and the checks a request must pass ([`tx_header`]): the feature negotiated,
//! offsets inside the frame, segmentation with a checksum request and a non-zero size, as
//! the spec asks of a driver (§5.1.6.2.1) and DPDK's `tx_prepare` checks. Must not: touch
//! the packet's bytes or the ring (the transmit burst writes the header it returns).

use crate::layout::{features as f, net_hdr};
use crate::mempool::TxOffload;
use spec::offload::{GsoKind, NetHdr};

/// The transmit offloads a queue's device accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct TxCaps {
    csum: bool,
    tso4: bool,
    tso6: bool,
    uso: bool,
}

impl TxCaps {
    /// The transmit offloads of a negotiated feature set.
    pub(crate) fn from_features(features: u64) -> TxCaps {
        let has = |b| features & f::bit(b) != 0;
        TxCaps {
            csum: has(f::NET_CSUM),
            tso4: has(f::NET_HOST_TSO4),
            tso6: has(f::NET_HOST_TSO6),
            uso: has(f::NET_HOST_USO),
        }
    }
}

/// Why a request was refused (for the log; the packet is counted in `tx_errors`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BadOffload {
    /// The feature the request needs was not negotiated.
    NotNegotiated(&'static str),
    /// The checksum field does not lie inside the frame.
    CsumOutside,
    /// Segmentation without a checksum request, or with a zero segment size.
    GsoWithoutCsum,
    /// A zero segment size.
    GsoSizeZero,
    /// `hdr_len` past the end of the frame or before the checksum field's end.
    GsoHdrLen,
}

/// The virtio-net header for `o` on a frame of `total_len` bytes, or why not.
pub(crate) fn tx_header(o: &TxOffload, total_len: usize, caps: TxCaps) -> Result<NetHdr, BadOffload> {
    let mut h = NetHdr::default();
    if let Some(c) = o.csum {
        if !caps.csum {
            return Err(BadOffload::NotNegotiated("VIRTIO_NET_F_CSUM"));
        }
        // The 16-bit checksum field must be inside the frame, after `start`.
        if c.start as usize + c.offset as usize + 2 > total_len {
            return Err(BadOffload::CsumOutside);
        }
        h.flags = net_hdr::F_NEEDS_CSUM;
        h.csum_start = c.start;
        h.csum_offset = c.offset;
    }
    if let Some(g) = o.gso {
        let (ok, name, ty) = match g.kind {
            GsoKind::TcpV4 => (caps.tso4, "VIRTIO_NET_F_HOST_TSO4", net_hdr::GSO_TCPV4),
            GsoKind::TcpV6 => (caps.tso6, "VIRTIO_NET_F_HOST_TSO6", net_hdr::GSO_TCPV6),
            GsoKind::UdpL4 => (caps.uso, "VIRTIO_NET_F_HOST_USO", net_hdr::GSO_UDP_L4),
        };
        if !ok {
            return Err(BadOffload::NotNegotiated(name));
        }
        // §5.1.6.2.1: a segmentation request also sets NEEDS_CSUM.
        let Some(c) = o.csum else { return Err(BadOffload::GsoWithoutCsum) };
        if g.size == 0 {
            return Err(BadOffload::GsoSizeZero);
        }
        if g.hdr_len as usize > total_len || (g.hdr_len as usize) < c.start as usize + c.offset as usize + 2 {
            return Err(BadOffload::GsoHdrLen);
        }
        h.gso_type = ty;
        h.gso_size = g.size;
        h.hdr_len = g.hdr_len;
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mempool::{TxCsum, TxGso};

    const ALL: u64 =
        f::bit(f::NET_CSUM) | f::bit(f::NET_HOST_TSO4) | f::bit(f::NET_HOST_TSO6) | f::bit(f::NET_HOST_USO);

    fn tcp4(size: u16) -> TxOffload {
        TxOffload {
            csum: Some(TxCsum { start: 34, offset: 16 }),
            gso: Some(TxGso { kind: GsoKind::TcpV4, size, hdr_len: 54 }),
        }
    }

    #[test]
    fn a_good_request_becomes_its_header() {
        let h = tx_header(&tcp4(1448), 9000, TxCaps::from_features(ALL)).unwrap();
        assert_eq!(
            h,
            NetHdr {
                flags: net_hdr::F_NEEDS_CSUM,
                gso_type: net_hdr::GSO_TCPV4,
                hdr_len: 54,
                gso_size: 1448,
                csum_start: 34,
                csum_offset: 16,
                num_buffers: 0
            }
        );
        let c = TxOffload { csum: Some(TxCsum { start: 34, offset: 6 }), gso: None };
        let h = tx_header(&c, 42, TxCaps::from_features(f::bit(f::NET_CSUM))).unwrap();
        assert_eq!((h.flags, h.gso_type, h.csum_start, h.csum_offset), (net_hdr::F_NEEDS_CSUM, 0, 34, 6));
    }

    #[test]
    fn each_bad_request_is_refused_for_its_reason() {
        let caps = TxCaps::from_features(ALL);
        // Each feature missing in turn.
        for (drop, kind, name) in [
            (f::NET_HOST_TSO4, GsoKind::TcpV4, "VIRTIO_NET_F_HOST_TSO4"),
            (f::NET_HOST_TSO6, GsoKind::TcpV6, "VIRTIO_NET_F_HOST_TSO6"),
            (f::NET_HOST_USO, GsoKind::UdpL4, "VIRTIO_NET_F_HOST_USO"),
        ] {
            let mut o = tcp4(100);
            o.gso.as_mut().unwrap().kind = kind;
            assert_eq!(
                tx_header(&o, 500, TxCaps::from_features(ALL & !f::bit(drop))),
                Err(BadOffload::NotNegotiated(name))
            );
            assert!(tx_header(&o, 500, caps).is_ok());
        }
        let csum_only = TxOffload { csum: Some(TxCsum { start: 34, offset: 16 }), gso: None };
        assert_eq!(
            tx_header(&csum_only, 500, TxCaps::from_features(0)),
            Err(BadOffload::NotNegotiated("VIRTIO_NET_F_CSUM"))
        );
        // The checksum field's last byte exactly at the end is fine, one past is not.
        assert!(tx_header(&csum_only, 52, caps).is_ok());
        assert_eq!(tx_header(&csum_only, 51, caps), Err(BadOffload::CsumOutside));
        let far = TxOffload { csum: Some(TxCsum { start: u16::MAX, offset: u16::MAX }), gso: None };
        assert_eq!(tx_header(&far, 9000, caps), Err(BadOffload::CsumOutside));
        let mut o = tcp4(100);
        o.csum = None;
        assert_eq!(tx_header(&o, 500, caps), Err(BadOffload::GsoWithoutCsum));
        assert_eq!(tx_header(&tcp4(0), 500, caps), Err(BadOffload::GsoSizeZero));
        assert_eq!(tx_header(&tcp4(100), 53, caps), Err(BadOffload::GsoHdrLen));
        let mut o = tcp4(100);
        o.gso.as_mut().unwrap().hdr_len = 40;
        assert_eq!(tx_header(&o, 500, caps), Err(BadOffload::GsoHdrLen));
    }
}
