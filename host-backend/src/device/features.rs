//! The features a device offers the front-end: virtio feature bits and vhost-user
//! protocol features.
//!
//! Owns: what is offered, given the device's fixed parameters (negotiation itself is the
//! handler's, `SET_FEATURES`). Must not: read or change device state.

use super::*;

/// Features this device offers: the ring and config-space features (the packed ring
/// unless `--no-packed`), the control queue
/// with RX mode (and its extra modes), VLAN filter, MAC address and guest-offload
/// commands, MQ when there is more than one pair, the guest offloads the port can
/// produce (`params.guest_offloads`), the host offloads it carries out
/// (`params.host_offloads`), and mergeable receive buffers on the
/// forwarding ports (`reflect`, `xconnect`), on `tap` and on `sink`.
pub fn offered_features(params: &DeviceParams) -> u64 {
    let mut v = f::bit(f::VERSION_1)
        | f::bit(f::NET_MAC)
        | f::bit(f::NET_STATUS)
        | f::bit(f::NET_MTU)
        | f::bit(f::RING_EVENT_IDX)
        | f::bit(f::RING_INDIRECT_DESC)
        | f::bit(f::IN_ORDER)
        | f::bit(f::VHOST_USER_PROTOCOL_FEATURES)
        | f::bit(f::NET_CTRL_VQ)
        | f::bit(vn::VIRTIO_NET_F_CTRL_RX)
        | f::bit(vn::VIRTIO_NET_F_CTRL_RX_EXTRA)
        | f::bit(vn::VIRTIO_NET_F_CTRL_VLAN)
        | f::bit(vn::VIRTIO_NET_F_CTRL_MAC_ADDR)
        | f::bit(vn::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
        | (params.guest_offloads & ctrl::GUEST_OFFLOADS)
        | params.host_offloads;
    // Forwarded and generated frames may be larger than one receive buffer (`port::mrg`).
    // `sink` delivers nothing, but a driver sizes its receive buffers for the MTU: without
    // mergeable buffers one at `--mtu 9000` would need 9 KiB buffers (ours and DPDK's
    // virtio-user refuse to start without them).
    v |= f::bit(f::NET_MRG_RXBUF);
    if params.queue_pairs > 1 {
        v |= f::bit(f::NET_MQ);
    }
    if params.iommu {
        v |= f::bit(f::ACCESS_PLATFORM);
    }
    if params.packed {
        v |= f::bit(f::RING_PACKED);
    }
    v
}

/// Protocol features this device offers: MQ, REPLY_ACK and CONFIG, plus BACKEND_REQ
/// (the channel IOTLB misses travel on) with `--iommu`. Never STATUS, RARP or MTU: the
/// `vhost` crate's request loop rejects their messages;
/// the IOTLB requests it rejects too are served by `iotlb_channel.rs` instead.
pub fn offered_protocol_features(params: &DeviceParams) -> VhostUserProtocolFeatures {
    let v = VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG;
    if params.iommu {
        v | VhostUserProtocolFeatures::BACKEND_REQ
    } else {
        v
    }
}
