//! Our driver inside a QEMU guest behind a virtual IOMMU (`intel-iommu`, the NIC with
//! `iommu_platform=on`), against our host backend started with `--iommu`.
//!
//! The guest binds the device to vfio-pci with the type-1 IOMMU driver; our testpmd maps
//! its DMA arena with `VFIO_IOMMU_MAP_DMA` at IOVAs inside the ranges the vIOMMU reports
//! and negotiates `VIRTIO_F_ACCESS_PLATFORM`. Every ring and buffer address the backend
//! sees is then an IOVA: it asks QEMU for translations with IOTLB misses on the backend
//! channel and gets them as `IOTLB_MSG` updates. The scenarios (tests/src/vmtest.rs)
//! are those of the no-IOMMU tests, with the same exact counts on both sides; here
//! the backend must also have used the IOTLB (misses sent, updates received) and never
//! let a miss time out. The `packed_` tests run io and txonly again with the NIC's
//! `packed=on`: the backend's packed ring engine translating through the IOTLB.
//!
//! Needs root and qemu-system-x86, like vm_noiommu.rs; one VM at a time.

use serde_json::Value;
use vnet_tests::harness::serial;
use vnet_tests::vmtest::{self, Mode, Rings};

/// The backend translated through its IOTLB: it asked (misses), QEMU answered
/// (updates), nothing was refused and no miss went unanswered.
fn assert_used_iotlb(dev: &Value) {
    let t = &dev["iotlb"];
    let n = |k: &str| t[k].as_u64().unwrap_or_else(|| panic!("no iotlb.{k}: {dev}"));
    assert!(n("misses") > 0, "the backend never asked for a translation: {t}");
    assert!(n("updates") > 0, "QEMU never sent a translation: {t}");
    assert_eq!(n("refused"), 0, "IOTLB requests refused: {t}");
    assert_eq!(n("timeouts"), 0, "IOTLB misses unanswered: {t}");
}

#[test]
fn vm_viommu_boot_bind_and_reconnect() {
    let _g = serial();
    vmtest::boot_bind_and_reconnect(Mode::VIommu);
}

#[test]
fn vm_viommu_txonly_to_sink() {
    let _g = serial();
    assert_used_iotlb(&vmtest::txonly_to_sink(Mode::VIommu, Rings::Split));
}

#[test]
fn vm_viommu_rxonly_from_gen() {
    let _g = serial();
    assert_used_iotlb(&vmtest::rxonly_from_gen(Mode::VIommu, Rings::Split));
}

/// [`vm_viommu_rxonly_from_gen`]'s jumbo variant with mergeable receive buffers.
#[test]
fn vm_viommu_rxonly_jumbo_mrg_from_gen() {
    let _g = serial();
    assert_used_iotlb(&vmtest::rxonly_jumbo_mrg_from_gen(Mode::VIommu, Rings::Split));
}

#[test]
fn vm_viommu_io_through_reflect() {
    let _g = serial();
    assert_used_iotlb(&vmtest::io_through_reflect(Mode::VIommu, Rings::Split));
}

/// [`vm_viommu_txonly_to_sink`] with the NIC's `packed=on`: testpmd's `-a` port takes the
/// packed rings the device offers, and the scenario checks both sides used them.
#[test]
fn vm_viommu_packed_txonly_to_sink() {
    let _g = serial();
    assert_used_iotlb(&vmtest::txonly_to_sink(Mode::VIommu, Rings::Packed));
}

/// [`vm_viommu_io_through_reflect`] with the NIC's `packed=on`.
#[test]
fn vm_viommu_packed_io_through_reflect() {
    let _g = serial();
    assert_used_iotlb(&vmtest::io_through_reflect(Mode::VIommu, Rings::Packed));
}
