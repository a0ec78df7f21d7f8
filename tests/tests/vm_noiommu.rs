//! Our driver inside a QEMU guest, on a virtio-net PCI device bound to vfio-pci in
//! no-IOMMU mode, against our host backend on the device's vhost-user socket.
//!
//! The guest's /init (tests/vm/guest-init.sh) loads vfio with
//! `enable_unsafe_noiommu_mode=1`, binds the device and runs our testpmd with
//! `-a <BDF>`; the scenarios (tests/src/vmtest.rs) pass only when the counts testpmd
//! prints inside the guest and the counts of the backend agree exactly. The `packed_`
//! tests run io and txonly again with the NIC's `packed=on` (packed rings on both sides,
//! checked from testpmd's port info and the backend's log).
//!
//! Needs root, qemu-system-x86 and the image's build tools (build-image.sh installs
//! missing ones when run as root); a missing prerequisite fails the test. QEMU under TCG
//! takes a whole CPU: the tests take the cross-process lock and boot one VM at a time.

use serde_json::Value;
use vnet_tests::harness::serial;
use vnet_tests::vmtest::{self, Mode, Rings};

/// The device never negotiated ACCESS_PLATFORM: no IOTLB traffic at all.
fn assert_no_iotlb(dev: &Value) {
    for k in ["updates", "invalidates", "misses"] {
        assert_eq!(dev["iotlb"][k].as_u64(), Some(0), "iotlb.{k} without a vIOMMU: {dev}");
    }
}

#[test]
fn vm_noiommu_boot_bind_and_reconnect() {
    let _g = serial();
    vmtest::boot_bind_and_reconnect(Mode::NoIommu);
}

#[test]
fn vm_noiommu_txonly_to_sink() {
    let _g = serial();
    assert_no_iotlb(&vmtest::txonly_to_sink(Mode::NoIommu, Rings::Split));
}

#[test]
fn vm_noiommu_rxonly_from_gen() {
    let _g = serial();
    assert_no_iotlb(&vmtest::rxonly_from_gen(Mode::NoIommu, Rings::Split));
}

/// Mergeable receive buffers over VFIO-PCI: 9014-byte frames into testpmd with
/// `--max-pkt-len 9018` (see the scenario file), every one received.
#[test]
fn vm_noiommu_rxonly_jumbo_mrg_from_gen() {
    let _g = serial();
    assert_no_iotlb(&vmtest::rxonly_jumbo_mrg_from_gen(Mode::NoIommu, Rings::Split));
}

#[test]
fn vm_noiommu_io_through_reflect() {
    let _g = serial();
    assert_no_iotlb(&vmtest::io_through_reflect(Mode::NoIommu, Rings::Split));
}

/// [`vm_noiommu_txonly_to_sink`] with the NIC's `packed=on`: testpmd's `-a` port takes the
/// packed rings the device offers, and the scenario checks both sides used them.
#[test]
fn vm_noiommu_packed_txonly_to_sink() {
    let _g = serial();
    assert_no_iotlb(&vmtest::txonly_to_sink(Mode::NoIommu, Rings::Packed));
}

/// [`vm_noiommu_io_through_reflect`] with the NIC's `packed=on`.
#[test]
fn vm_noiommu_packed_io_through_reflect() {
    let _g = serial();
    assert_no_iotlb(&vmtest::io_through_reflect(Mode::NoIommu, Rings::Packed));
}
