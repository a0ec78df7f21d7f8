//! Finding the virtio structures of a PCI device (virtio 1.2 §4.1.4): the config-space
//! registers used, the virtio vendor capabilities and where each structure lives.
//!
//! Owns: the PCI register and common-config offsets ([`regs`], [`cfg_type`], [`common`]),
//! and walking a config-space image's capability list for the first usable capability
//! of each type ([`parse_caps`]), bounded against loops. Must not: access the device
//! (it parses a copy of config space) or map anything.

/// PCI config-space registers and values used here.
pub mod regs {
    /// Vendor ID register.
    pub const VENDOR_ID: usize = 0x00;
    /// Device ID register.
    pub const DEVICE_ID: usize = 0x02;
    /// Command register.
    pub const COMMAND: usize = 0x04;
    /// Status register.
    pub const STATUS: usize = 0x06;
    /// Subsystem ID register.
    pub const SUBSYSTEM_ID: usize = 0x2e;
    /// First capability pointer.
    pub const CAPABILITY_LIST: usize = 0x34;
    /// Status: the capability list exists.
    pub const STATUS_CAP_LIST: u16 = 0x10;
    /// Command: memory space decoding.
    pub const COMMAND_MEMORY: u16 = 0x2;
    /// Command: bus mastering (the device may DMA).
    pub const COMMAND_MASTER: u16 = 0x4;
    /// Vendor-specific capability ID.
    pub const CAP_ID_VNDR: u8 = 0x09;
    /// Red Hat / virtio vendor ID.
    pub const VIRTIO_VENDOR: u16 = 0x1af4;
    /// Modern virtio-net device ID (0x1040 + 1).
    pub const VIRTIO_NET_MODERN: u16 = 0x1041;
    /// Transitional virtio-net device ID.
    pub const VIRTIO_NET_TRANSITIONAL: u16 = 0x1000;
}

/// `cfg_type` values of `struct virtio_pci_cap` (§4.1.4).
pub mod cfg_type {
    /// Common configuration.
    pub const COMMON: u8 = 1;
    /// Notifications.
    pub const NOTIFY: u8 = 2;
    /// ISR status.
    pub const ISR: u8 = 3;
    /// Device-specific configuration.
    pub const DEVICE: u8 = 4;
    /// PCI configuration access (a window onto the BARs through config space; unused).
    pub const PCI: u8 = 5;
}

/// `struct virtio_pci_common_cfg` field offsets (§4.1.4.3).
pub mod common {
    /// `le32 device_feature_select`.
    pub const DEVICE_FEATURE_SELECT: usize = 0x00;
    /// `le32 device_feature`.
    pub const DEVICE_FEATURE: usize = 0x04;
    /// `le32 driver_feature_select`.
    pub const DRIVER_FEATURE_SELECT: usize = 0x08;
    /// `le32 driver_feature`.
    pub const DRIVER_FEATURE: usize = 0x0c;
    /// `le16 config_msix_vector`.
    pub const CONFIG_MSIX_VECTOR: usize = 0x10;
    /// `le16 num_queues`.
    pub const NUM_QUEUES: usize = 0x12;
    /// `u8 device_status`.
    pub const DEVICE_STATUS: usize = 0x14;
    /// `u8 config_generation`.
    pub const CONFIG_GENERATION: usize = 0x15;
    /// `le16 queue_select`.
    pub const QUEUE_SELECT: usize = 0x16;
    /// `le16 queue_size`.
    pub const QUEUE_SIZE: usize = 0x18;
    /// `le16 queue_msix_vector`.
    pub const QUEUE_MSIX_VECTOR: usize = 0x1a;
    /// `le16 queue_enable`.
    pub const QUEUE_ENABLE: usize = 0x1c;
    /// `le16 queue_notify_off`.
    pub const QUEUE_NOTIFY_OFF: usize = 0x1e;
    /// `le64 queue_desc`.
    pub const QUEUE_DESC: usize = 0x20;
    /// `le64 queue_driver` (avail ring).
    pub const QUEUE_DRIVER: usize = 0x28;
    /// `le64 queue_device` (used ring).
    pub const QUEUE_DEVICE: usize = 0x30;
    /// Bytes of the structure this driver uses.
    pub const LEN: usize = 0x38;
    /// "No MSI-X vector": we poll.
    pub const NO_VECTOR: u16 = 0xffff;
}

/// Where one virtio structure lives: BAR, offset and length (`struct virtio_pci_cap`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapLoc {
    /// BAR index (0..=5).
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u32,
    /// Length in bytes.
    pub length: u32,
}

/// The virtio vendor capabilities of a device (the first usable one of each type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtioPciCaps {
    /// Common configuration.
    pub common: CapLoc,
    /// Notification area.
    pub notify: CapLoc,
    /// Bytes between the doorbells of consecutive `queue_notify_off` values.
    pub notify_off_multiplier: u32,
    /// ISR status.
    pub isr: Option<CapLoc>,
    /// Device-specific configuration.
    pub device: Option<CapLoc>,
}

/// Walks the capability list of a config space (at least the first 256 bytes) and
/// collects the virtio structures (§4.1.4). Capabilities naming a reserved BAR or too
/// short for their type are skipped, as the spec asks; the walk is bounded against
/// loops. Fails when there is no capability list, or no common or notify capability
/// (a legacy-only device).
pub fn parse_caps(cfg: &[u8]) -> std::result::Result<VirtioPciCaps, String> {
    if cfg.len() < 64 {
        return Err(format!("config space of {} bytes", cfg.len()));
    }
    let u16_at = |o: usize| u16::from_le_bytes([cfg[o], cfg[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([cfg[o], cfg[o + 1], cfg[o + 2], cfg[o + 3]]);
    if u16_at(regs::STATUS) & regs::STATUS_CAP_LIST == 0 {
        return Err("no PCI capability list: not a modern virtio device".into());
    }
    let (mut common, mut notify, mut isr, mut device) = (None, None, None, None);
    let mut ptr = (cfg[regs::CAPABILITY_LIST] & 0xfc) as usize;
    // At most (256 - 64) / 4 capabilities fit in standard config space.
    for _ in 0..48 {
        if ptr == 0 {
            break;
        }
        if ptr < 0x40 || ptr + 2 > cfg.len() {
            return Err(format!("capability pointer {ptr:#x} outside config space"));
        }
        let (id, next) = (cfg[ptr], (cfg[ptr + 1] & 0xfc) as usize);
        if id == regs::CAP_ID_VNDR && ptr + 16 <= cfg.len() {
            let cap_len = cfg[ptr + 2] as usize;
            let typ = cfg[ptr + 3];
            let loc = CapLoc { bar: cfg[ptr + 4], offset: u32_at(ptr + 8), length: u32_at(ptr + 12) };
            let usable = cap_len >= 16 && ptr + cap_len <= cfg.len() && loc.bar <= 5;
            match typ {
                cfg_type::COMMON if usable && common.is_none() => common = Some(loc),
                cfg_type::NOTIFY if usable && cap_len >= 20 && notify.is_none() => {
                    notify = Some((loc, u32_at(ptr + 16)))
                }
                cfg_type::ISR if usable && isr.is_none() => isr = Some(loc),
                cfg_type::DEVICE if usable && device.is_none() => device = Some(loc),
                _ => {}
            }
        }
        ptr = next;
    }
    let common = common.ok_or(
        "no virtio common-config capability: a legacy-only device (QEMU: disable-legacy=on or a PCIe slot)",
    )?;
    let (notify, notify_off_multiplier) = notify.ok_or("no virtio notify capability")?;
    Ok(VirtioPciCaps { common, notify, notify_off_multiplier, isr, device })
}
