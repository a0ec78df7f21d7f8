//! Unit tests of the device: offered features, queue indices, control commands.

use super::*;
use crate::ctrl::{ACK_ERR, ACK_OK};

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

fn device(pairs: u16, guest_offloads: u64) -> Arc<Device> {
    let params = DeviceParams {
        queue_pairs: pairs,
        mac: MAC,
        guest_offloads,
        packed: true,
        ..DeviceParams::for_test(PortKind::Reflect)
    };
    // No workers: every sync returns at once.
    let d = Device::new(params, Engine::new(0, 0).unwrap(), None);
    d.connect();
    d
}

fn ctrl_features() -> u64 {
    f::bit(f::VERSION_1)
        | f::bit(f::NET_CTRL_VQ)
        | f::bit(vn::VIRTIO_NET_F_CTRL_RX)
        | f::bit(vn::VIRTIO_NET_F_CTRL_MAC_ADDR)
        | f::bit(vn::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
}

#[test]
fn offers_control_features_and_guest_offloads_only_when_asked() {
    let one = offered_features(&device(1, 0).params);
    for b in [
        f::NET_CTRL_VQ,
        vn::VIRTIO_NET_F_CTRL_RX,
        vn::VIRTIO_NET_F_CTRL_RX_EXTRA,
        vn::VIRTIO_NET_F_CTRL_VLAN,
        vn::VIRTIO_NET_F_CTRL_MAC_ADDR,
        vn::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
    ] {
        assert_ne!(one & f::bit(b), 0, "bit {b}");
    }
    assert_eq!(one & (f::bit(f::NET_MQ) | ctrl::GUEST_OFFLOADS), 0);
    let csum_tso = f::bit(vn::VIRTIO_NET_F_GUEST_CSUM) | f::bit(vn::VIRTIO_NET_F_GUEST_TSO4);
    let two = offered_features(&device(2, csum_tso).params);
    assert_eq!(two & (f::bit(f::NET_MQ) | ctrl::GUEST_OFFLOADS), f::bit(f::NET_MQ) | csum_tso);
}

#[test]
fn control_queue_index_follows_negotiation() {
    let d = device(2, 0);
    let h = Handler(d.clone());
    assert!(h.set_vring_num(4, 64).is_err(), "no control queue before CTRL_VQ");
    assert!(h.set_vring_num(3, 64).is_ok());
    h.set_features(ctrl_features() | f::bit(f::NET_MQ)).unwrap();
    assert_eq!(d.lock().queue_index(4), Some(4));
    assert!(h.set_vring_num(4, 64).is_ok());
    assert!(h.set_vring_num(5, 64).is_err());
    // CTRL_VQ without MQ: one pair, control queue at index 2.
    h.set_features(ctrl_features()).unwrap();
    assert_eq!(d.lock().queue_index(2), Some(4));
    assert_eq!(d.lock().queue_index(3), None);
    assert_eq!(d.lock().queue_index(1), Some(1));
    // Neither: data queues only (DPDK and QEMU terminate the control queue).
    h.set_features(f::bit(f::VERSION_1) | f::bit(f::NET_MQ)).unwrap();
    assert_eq!(d.lock().queue_index(3), Some(3));
    assert_eq!(d.lock().queue_index(4), None);
}

#[test]
fn commands_change_device_state_and_reset_restores_it() {
    let d = device(2, 0);
    let h = Handler(d.clone());
    // Before features: nothing is negotiated, every command is refused.
    assert_eq!(d.apply_ctrl(&[4, 0, 2, 0]), ACK_ERR);
    h.set_features(ctrl_features() | f::bit(f::NET_MQ)).unwrap();
    assert_eq!(d.snapshot().active_pairs, 1, "MQ starts with one pair");
    assert_eq!(d.apply_ctrl(&[4, 0, 2, 0]), ACK_OK);
    assert_eq!(d.snapshot().active_pairs, 2);
    assert_eq!(d.apply_ctrl(&[4, 0, 3, 0]), ACK_ERR);
    assert_eq!(d.apply_ctrl(&[0, 0, 0]), ACK_OK); // promiscuous off
    assert_eq!(d.apply_ctrl(&[2, 0, 1, 0]), ACK_ERR); // VLAN not negotiated
    let new_mac = [2, 0, 0, 0, 0, 7];
    let mut cmd = vec![1, 1];
    cmd.extend_from_slice(&new_mac);
    assert_eq!(d.apply_ctrl(&cmd), ACK_OK);
    assert_eq!(&d.config_space()[..6], &new_mac, "config space follows MAC_ADDR_SET");
    let s = d.snapshot();
    assert_eq!((s.ctrl.ok, s.ctrl.err, s.ctrl.broken), (3, 3, false));
    assert_eq!(s.rx_filter["promisc"], false);
    // Same features again: state kept; other features: feature defaults.
    h.set_features(ctrl_features() | f::bit(f::NET_MQ)).unwrap();
    assert_eq!(d.snapshot().active_pairs, 2);
    d.disconnect();
    d.connect();
    let s = d.snapshot();
    assert_eq!(&d.config_space()[..6], &MAC);
    assert_eq!((s.active_pairs, s.rx_filter["promisc"].as_bool()), (2, Some(true)));
}

#[test]
fn packed_ring_base_has_an_avail_and_a_used_half() {
    let d = device(1, 0);
    let h = Handler(d.clone());
    // Split: one 16-bit index.
    h.set_features(f::bit(f::VERSION_1)).unwrap();
    assert!(h.set_vring_base(0, 0x1_0000).is_err(), "split base above 16 bits");
    h.set_vring_base(0, 5).unwrap();
    assert_eq!({ h.get_vring_base(0).unwrap().num }, 5);
    // Packed: QEMU sends avail | used << 16 (a fresh ring: both wrap counters set) and
    // restores both halves from the answer; DPDK's virtio-user sends the avail half.
    h.set_features(f::bit(f::VERSION_1) | f::bit(f::RING_PACKED)).unwrap();
    h.set_vring_base(0, 0x8000_8000).unwrap();
    assert_eq!({ h.get_vring_base(0).unwrap().num }, 0x8000_8000);
    h.set_vring_base(0, 0x8003).unwrap();
    assert_eq!({ h.get_vring_base(0).unwrap().num }, 0x8003_8003);
}

/// A worker that never reaches a burst boundary (here: a data worker slot with no thread)
/// cannot write a running ring's position back: `SET_VRING_BASE` and `GET_VRING_BASE`
/// on that ring fail and break it (counted as broken, no drop), instead of reporting or
/// replacing a base the worker may still move.
#[test]
fn a_change_a_worker_never_acknowledges_breaks_the_ring() {
    use std::os::fd::FromRawFd;
    let params = DeviceParams { mac: MAC, ..DeviceParams::for_test(PortKind::Sink) };
    let engine = Engine::with_sync_timeout(1, 0, std::time::Duration::from_millis(20)).unwrap();
    let d = Device::new(params, engine, None);
    d.connect();
    let h = Handler(d.clone());
    let mem = crate::memory::tests::memfd(0x10000);
    let region = VhostUserMemoryRegion::new(0, 0x10000, 0x10000, 0);
    h.set_mem_table(&[region], vec![mem], None).unwrap();
    h.set_features(f::bit(f::VERSION_1)).unwrap();
    h.set_vring_num(1, 8).unwrap();
    h.set_vring_addr(1, VhostUserVringAddrFlags::empty(), 0x10000, 0x12000, 0x11000, 0).unwrap();
    let kick = EventFd::new(0).unwrap();
    // SAFETY: duplicates an open fd into a fresh owned one.
    let kick_file = unsafe { File::from_raw_fd(libc::dup(kick.as_raw_fd())) };
    h.set_vring_kick(1, Some(kick_file)).unwrap();
    assert!(h.set_vring_base(1, 0).is_err(), "the worker never let go: no base change");
    let snap = d.snapshot();
    assert!(snap.pairs[0].broken);
    assert_eq!(snap.pairs[0].drops.iter().sum::<u64>(), 0, "not the driver's fault: no drop");
    // Broken: no longer running, so reading its base needs no worker.
    assert_eq!(h.get_vring_base(1).map(|s| s.num).ok(), Some(0));
}
