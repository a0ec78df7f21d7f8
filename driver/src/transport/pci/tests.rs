//! Unit tests of the virtio-PCI transport: capability parsing (synthetic and, when
//! present, real devices from sysfs), MMIO windows, and the handshake against a device
//! whose registers read all-ones or garbage.

use std::cell::Cell;

use super::handshake::{self, QueueRefused, Regs};
use super::*;
use crate::layout::net_config;

/// Writes a virtio vendor capability at `at` (16 bytes, 20 for notify).
#[allow(clippy::too_many_arguments)]
fn vcap(cfg: &mut [u8], at: usize, next: u8, typ: u8, bar: u8, offset: u32, length: u32, mult: Option<u32>) {
    let len = if mult.is_some() { 20 } else { 16 };
    cfg[at] = regs::CAP_ID_VNDR;
    cfg[at + 1] = next;
    cfg[at + 2] = len;
    cfg[at + 3] = typ;
    cfg[at + 4] = bar;
    cfg[at + 8..at + 12].copy_from_slice(&offset.to_le_bytes());
    cfg[at + 12..at + 16].copy_from_slice(&length.to_le_bytes());
    if let Some(m) = mult {
        cfg[at + 16..at + 20].copy_from_slice(&m.to_le_bytes());
    }
}

/// Config space as QEMU's virtio-net-pci lays it out (modern BAR 4, MSI-X first).
fn qemu_like() -> [u8; 256] {
    let mut c = [0u8; 256];
    c[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
    c[2..4].copy_from_slice(&0x1041u16.to_le_bytes());
    c[regs::STATUS] = regs::STATUS_CAP_LIST as u8;
    c[regs::CAPABILITY_LIST] = 0x98;
    // MSI-X capability (id 0x11) first, then the virtio ones.
    c[0x98] = 0x11;
    c[0x99] = 0x84;
    vcap(&mut c, 0x84, 0x70, cfg_type::PCI, 0, 0, 0, None);
    vcap(&mut c, 0x70, 0x60, cfg_type::NOTIFY, 4, 0x3000, 0x1000, Some(4));
    vcap(&mut c, 0x60, 0x50, cfg_type::DEVICE, 4, 0x2000, 0x1000, None);
    vcap(&mut c, 0x50, 0x40, cfg_type::ISR, 4, 0x1000, 0x1000, None);
    vcap(&mut c, 0x40, 0x00, cfg_type::COMMON, 4, 0x0000, 0x1000, None);
    c
}
use cfg_type::{COMMON, DEVICE};

#[test]
fn parses_qemu_virtio_net_capabilities() {
    let caps = parse_caps(&qemu_like()).unwrap();
    assert_eq!(caps.common, CapLoc { bar: 4, offset: 0, length: 0x1000 });
    assert_eq!(caps.isr, Some(CapLoc { bar: 4, offset: 0x1000, length: 0x1000 }));
    assert_eq!(caps.device, Some(CapLoc { bar: 4, offset: 0x2000, length: 0x1000 }));
    assert_eq!(caps.notify, CapLoc { bar: 4, offset: 0x3000, length: 0x1000 });
    assert_eq!(caps.notify_off_multiplier, 4);
}

#[test]
fn first_usable_capability_of_each_type_wins() {
    let mut c = qemu_like();
    // Put a common cap with a reserved BAR (6) in front: skipped.
    vcap(&mut c, 0xa0, 0x84, COMMON, 6, 0x8000, 0x1000, None);
    c[0x99] = 0xa0;
    // And a second common cap later in the chain: the first usable one (BAR 4) wins.
    vcap(&mut c, 0xb0, 0x00, COMMON, 2, 0x100, 0x100, None);
    c[0x41] = 0xb0;
    let caps = parse_caps(&c).unwrap();
    assert_eq!(caps.common, CapLoc { bar: 4, offset: 0, length: 0x1000 });
    // A notify cap too short to hold the multiplier is skipped.
    let mut c = qemu_like();
    c[0x72] = 16;
    assert!(parse_caps(&c).unwrap_err().contains("notify"));
}

#[test]
fn broken_capability_lists_are_errors_not_loops() {
    let mut c = qemu_like();
    c[regs::STATUS] = 0;
    assert!(parse_caps(&c).unwrap_err().contains("no PCI capability list"));
    // A legacy device: capability list without virtio caps.
    let mut c = qemu_like();
    c[regs::CAPABILITY_LIST] = 0x98;
    c[0x99] = 0;
    assert!(parse_caps(&c).unwrap_err().contains("legacy-only"));
    // A pointer into the header.
    let mut c = qemu_like();
    c[regs::CAPABILITY_LIST] = 0x10;
    assert!(parse_caps(&c).unwrap_err().contains("outside config space"));
    // A loop: the walk ends (bounded) and reports what it found.
    let mut c = qemu_like();
    c[0x41] = 0x98; // common -> msix -> ... -> common
    let caps = parse_caps(&c).unwrap();
    assert_eq!(caps.common.bar, 4);
    // A capability running past the end of config space is skipped.
    let mut c = qemu_like();
    c[0xf8..0xfd].copy_from_slice(&[regs::CAP_ID_VNDR, 0, 16, DEVICE, 4]);
    c[0x41] = 0xf8;
    assert_eq!(parse_caps(&c).unwrap().device, Some(CapLoc { bar: 4, offset: 0x2000, length: 0x1000 }));
    assert!(parse_caps(&c[..32]).is_err());
}

/// The capability lists of real virtio devices on this machine, if any, read from
/// sysfs (read-only): the parser must find every modern device's structures.
#[test]
fn parses_real_virtio_devices_from_sysfs() {
    let Ok(dir) = std::fs::read_dir("/sys/bus/pci/devices") else { return };
    let mut seen = 0;
    for d in dir.flatten() {
        let vendor = std::fs::read_to_string(d.path().join("vendor")).unwrap_or_default();
        let device = std::fs::read_to_string(d.path().join("device")).unwrap_or_default();
        if vendor.trim() != "0x1af4" || !device.trim().starts_with("0x104") {
            continue;
        }
        let Ok(cfg) = std::fs::read(d.path().join("config")) else { continue };
        if cfg.len() < 256 {
            continue; // unprivileged: only the 64-byte header is readable
        }
        let caps = parse_caps(&cfg).unwrap_or_else(|e| panic!("{}: {e}", d.path().display()));
        assert!(caps.common.length as usize >= common::LEN, "{caps:?}");
        seen += 1;
        eprintln!("{}: {caps:?}", d.file_name().to_string_lossy());
    }
    eprintln!("{seen} modern virtio PCI devices parsed");
}

#[test]
fn windows_are_natural_width_little_endian() {
    let mut mem = [0u64; 8];
    // SAFETY: `mem` is 64 bytes of our own memory, alive for the test, with no
    // reference into it while the window is used.
    let w = unsafe { Window::new(mem.as_mut_ptr() as *mut u8, 64) };
    w.w32(0, 0x1122_3344);
    w.w16(4, 0x5566);
    w.w8(6, 0x77);
    w.w64(8, 0x8877_6655_4433_2211);
    assert_eq!(w.r32(0), 0x1122_3344);
    assert_eq!(w.r16(4), 0x5566);
    assert_eq!(w.r8(6), 0x77);
    assert_eq!(w.r32(8), 0x4433_2211);
    assert_eq!(w.r32(12), 0x8877_6655);
    let bytes: Vec<u8> = mem.iter().flat_map(|x| x.to_ne_bytes()).collect();
    assert_eq!(&bytes[0..7], &[0x44, 0x33, 0x22, 0x11, 0x66, 0x55, 0x77]);
}

#[test]
#[should_panic(expected = "MMIO access")]
fn windows_refuse_out_of_bounds_accesses() {
    let mut mem = [0u64; 2];
    // SAFETY: `mem` is 16 bytes of our own memory, alive for the test.
    let w = unsafe { Window::new(mem.as_mut_ptr() as *mut u8, 16) };
    w.r32(14);
}

/// A device whose every register read returns `read(offset, width)` whatever was
/// written (a vanished device reads all-ones; a broken one, anything).
struct FakeRegs {
    len: usize,
    read: Box<dyn Fn(usize, u32) -> u64>,
    writes: Cell<u32>,
}

impl FakeRegs {
    fn all_ones(len: usize) -> FakeRegs {
        FakeRegs { len, read: Box::new(|_, _| u64::MAX), writes: Cell::new(0) }
    }
    /// Reads from a xorshift stream seeded with `seed`.
    fn garbage(len: usize, seed: u64) -> FakeRegs {
        let state = Cell::new(seed | 1);
        FakeRegs {
            len,
            read: Box::new(move |_, _| {
                let mut x = state.get();
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                state.set(x);
                x
            }),
            writes: Cell::new(0),
        }
    }
    fn get(&self, off: usize, width: u32) -> u64 {
        assert!(off + width as usize <= self.len, "access {off:#x}/{width} beyond {:#x}", self.len);
        (self.read)(off, width)
    }
}

impl Regs for FakeRegs {
    fn len(&self) -> usize {
        self.len
    }
    fn r8(&self, off: usize) -> u8 {
        self.get(off, 1) as u8
    }
    fn r16(&self, off: usize) -> u16 {
        self.get(off, 2) as u16
    }
    fn r32(&self, off: usize) -> u32 {
        self.get(off, 4) as u32
    }
    fn w8(&self, off: usize, _: u8) {
        self.get(off, 1);
        self.writes.set(self.writes.get() + 1);
    }
    fn w16(&self, off: usize, _: u16) {
        self.get(off, 2);
        self.writes.set(self.writes.get() + 1);
    }
    fn w32(&self, off: usize, _: u32) {
        self.get(off, 4);
        self.writes.set(self.writes.get() + 1);
    }
}

const ADDRS: crate::ring::RingAddrs = crate::ring::RingAddrs { desc: 0x1000, avail: 0x2000, used: 0x3000 };
const FALLBACK: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];

#[test]
fn a_device_that_reads_all_ones_fails_every_step_at_once() {
    let c = FakeRegs::all_ones(common::LEN);
    let dev = FakeRegs::all_ones(net_config::LEN);
    // Reset: all-ones is never a status, so no 5-second wait for it to clear.
    let started = std::time::Instant::now();
    let e = handshake::reset(&c, Duration::from_secs(5)).unwrap_err();
    assert!(e.contains("all-ones"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5), "waited out the reset timeout");
    assert!(handshake::add_status(&c, 1).unwrap_err().contains("all-ones"));
    assert_eq!(handshake::read_features(&c), u64::MAX, "every feature claimed: negotiation decides");
    assert!(handshake::write_features(&c, f::bit(f::VERSION_1)).is_err());
    // Config: max pairs 0xffff is out of range; a broadcast MAC is replaced.
    let all = f::bit(f::NET_MAC) | f::bit(f::NET_STATUS) | f::bit(f::NET_MQ) | f::bit(f::NET_MTU);
    let e = handshake::read_config(&c, Some(&dev), all, FALLBACK, "t").unwrap_err();
    assert!(e.contains("max_virtqueue_pairs 65535"), "{e}");
    let cfg = handshake::read_config(&c, Some(&dev), all & !f::bit(f::NET_MQ), FALLBACK, "t").unwrap();
    assert_eq!((cfg.mac, cfg.mtu), (FALLBACK, u16::MAX), "MTU is clamped where it is used (Port::open)");
    // Queues: num_queues 0xffff, but queue_select reads back wrong.
    let e = handshake::setup_queue(&c, 0, 256, ADDRS, 4, 0x1000).unwrap_err();
    assert!(matches!(&e, QueueRefused::Device(why) if why.contains("queue_select")), "{e:?}");
    assert!(handshake::start(&c).is_err());
}

#[test]
fn a_device_that_reads_garbage_never_panics_or_hangs() {
    let all = f::bit(f::NET_MAC) | f::bit(f::NET_STATUS) | f::bit(f::NET_MQ) | f::bit(f::NET_MTU);
    let (mut reset_ok, mut config_ok, mut queue_ok) = (0, 0, 0);
    for seed in 1..=2000u64 {
        let c = FakeRegs::garbage(common::LEN, seed);
        let dev = FakeRegs::garbage(net_config::LEN, seed.wrapping_mul(0x9e37_79b9));
        reset_ok += handshake::reset(&c, Duration::from_millis(1)).is_ok() as u32;
        let _ = handshake::add_status(&c, 1);
        let _ = handshake::read_features(&c);
        let _ = handshake::write_features(&c, f::bit(f::VERSION_1));
        if let Ok(cfg) = handshake::read_config(&c, Some(&dev), all, FALLBACK, "t") {
            config_ok += 1;
            assert!((1..=0x8000).contains(&cfg.max_queue_pairs), "{cfg:?}");
            assert!(cfg.mac[0] & 1 == 0 && cfg.mac != [0; 6], "{cfg:?}");
        }
        match handshake::setup_queue(&c, 0, 256, ADDRS, 4, 0x1000) {
            Ok((off, _)) => {
                queue_ok += 1;
                assert!(off + 2 <= 0x1000, "doorbell offset {off:#x} outside the notify structure");
            }
            Err(QueueRefused::TooLarge { max }) => assert!(max < 256),
            Err(QueueRefused::Device(_)) => {}
        }
        let _ = handshake::start(&c);
        assert!(c.writes.get() > 0);
    }
    // Garbage that happens to look right is accepted as such (and checked above): the
    // two generation reads agree about once in 256 tries, within 1000 tries.
    assert!(config_ok > 0 && reset_ok > 0, "config {config_ok}, reset {reset_ok}, queue {queue_ok}");
}

/// A device with a fixed status byte and a fixed net config `status` field.
fn status_device(status: u8, net_status: u16) -> (FakeRegs, FakeRegs) {
    let c = FakeRegs {
        len: common::LEN,
        read: Box::new(move |off, _| if off == common::DEVICE_STATUS { status as u64 } else { 0 }),
        writes: Cell::new(0),
    };
    let dev = FakeRegs {
        len: net_config::LEN,
        read: Box::new(move |off, _| if off == net_config::STATUS { net_status as u64 } else { 0 }),
        writes: Cell::new(0),
    };
    (c, dev)
}

#[test]
fn the_probe_tells_a_failed_or_vanished_device_from_a_link_change() {
    use crate::transport::Probe;
    use virtio_bindings::virtio_config::{
        VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
        VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    };
    let running = (VIRTIO_CONFIG_S_ACKNOWLEDGE
        | VIRTIO_CONFIG_S_DRIVER
        | VIRTIO_CONFIG_S_FEATURES_OK
        | VIRTIO_CONFIG_S_DRIVER_OK) as u8;
    let with_status = f::bit(f::NET_STATUS);
    let probe = |status: u8, net: u16, features: u64| {
        let (c, dev) = status_device(status, net);
        let p = handshake::probe(&c, Some(&dev), features);
        assert_eq!(c.writes.get() + dev.writes.get(), 0, "a probe only reads");
        p
    };
    assert!(matches!(probe(running, net_config::S_LINK_UP, with_status), Probe::Alive { link_up: true }));
    assert!(matches!(probe(running, 0, with_status), Probe::Alive { link_up: false }));
    // Without VIRTIO_NET_F_STATUS the link is up whatever the field says.
    assert!(matches!(probe(running, 0, 0), Probe::Alive { link_up: true }));
    match probe(running | VIRTIO_CONFIG_S_NEEDS_RESET as u8, net_config::S_LINK_UP, with_status) {
        Probe::Failed(why) => {
            assert!(why.contains("DEVICE_NEEDS_RESET") && why.contains("open the port again"), "{why}")
        }
        p => panic!("NEEDS_RESET probed as {p:?}"),
    }
    match probe(running | VIRTIO_CONFIG_S_FAILED as u8, net_config::S_LINK_UP, with_status) {
        Probe::Failed(why) => assert!(why.contains("FAILED"), "{why}"),
        p => panic!("FAILED probed as {p:?}"),
    }
    match probe(0xff, 0xffff, with_status) {
        Probe::Failed(why) => assert!(why.contains("all-ones"), "{why}"),
        p => panic!("all-ones probed as {p:?}"),
    }
}
