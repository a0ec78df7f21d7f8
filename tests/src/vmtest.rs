//! The VM test scenarios, shared by the no-IOMMU and the vIOMMU test binaries
//! (`tests/tests/vm_noiommu.rs`, `tests/tests/vm_viommu.rs`).
//!
//! Each scenario builds (or reuses) the guest image, starts `host-backend` with one port
//! (with `--iommu` under a vIOMMU), boots QEMU (TCG) whose `virtio-net-pci` device uses
//! the backend, and lets the guest's /init bind the device to vfio-pci and run our
//! testpmd with `-a <BDF>`. A scenario returns only when the counts testpmd printed
//! inside the guest and the backend's counts agree exactly; it returns the backend's
//! final device statistics (for the IOTLB counters) and the guest's report.
//!
//! Each runs on split rings (QEMU's default) or packed ones ([`Rings::Packed`]: the NIC
//! with `packed=on`, which testpmd's `-a` port takes because the device offers it); either
//! way the scenario checks that both sides used the layout asked for (testpmd's "Ring
//! layout" line in the guest, the backend's "(packed rings)"/"(split rings)" log line),
//! so a packed run cannot pass on split rings.
//!
//! QEMU under TCG takes a whole CPU: callers hold the cross-process lock
//! ([`crate::harness::serial`]) and boot one VM at a time.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{counter, device, total_drops, Backend, TempDir};
use crate::vm::{build_image, GuestReport, Image, Qemu, VmConfig};

/// QEMU start to the guest's /init (measured: 5-9 s on 2 shared cores).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// /init to the device bound to vfio-pci (measured: about 1 s).
pub const BIND_TIMEOUT: Duration = Duration::from_secs(120);
/// testpmd's burst size (its default) and the bursts io mode injects first (guest-init.sh).
pub const BURST: u64 = 32;
pub const IO_TX_FIRST: u64 = 4;

/// How the guest reaches its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// No IOMMU: vfio in `enable_unsafe_noiommu_mode`, physical addresses.
    NoIommu,
    /// QEMU's `intel-iommu` with `iommu_platform=on`: type-1 VFIO in the guest, IOVAs on
    /// the rings, the backend translating them through its IOTLB (`--iommu`).
    VIommu,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::NoIommu => "noiommu",
            Mode::VIommu => "viommu",
        }
    }
}

/// The virtqueue layout of the guest's NIC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rings {
    /// Split rings (QEMU's default, `packed=off`).
    Split,
    /// Packed rings (virtio 1.2 §2.8): QEMU's `packed=on`.
    Packed,
}

impl Rings {
    fn name(self) -> &'static str {
        match self {
            Rings::Split => "split",
            Rings::Packed => "packed",
        }
    }

    /// What testpmd's `show port info` prints for it ("Ring layout: ...").
    fn testpmd_layout(self) -> &'static str {
        match self {
            Rings::Split => "Ring layout: split",
            Rings::Packed => "Ring layout: packed (VIRTIO_F_RING_PACKED)",
        }
    }
}

/// The layout the backend last logged as acked ("features 0x.. acked (packed rings)"):
/// QEMU sets the features again at every device start, the last one is the guest's.
fn backend_rings(log: &str) -> Option<&'static str> {
    log.lines().rev().find_map(|l| {
        if l.contains("acked (packed rings)") {
            Some("packed")
        } else if l.contains("acked (split rings)") {
            Some("split")
        } else {
            None
        }
    })
}

/// Prints phase timings as they complete.
pub struct Clock {
    name: String,
    t0: Instant,
    last: Instant,
}

impl Clock {
    pub fn new(name: &str) -> Clock {
        let now = Instant::now();
        Clock { name: name.to_string(), t0: now, last: now }
    }
    /// The name phases are printed under.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Prints the time since the previous phase and since the start.
    pub fn phase(&mut self, what: &str) {
        let now = Instant::now();
        eprintln!(
            "[{}] {what}: {:.1} s (total {:.1} s)",
            self.name,
            (now - self.last).as_secs_f64(),
            (now - self.t0).as_secs_f64()
        );
        self.last = now;
    }
}

pub fn connected(stats: &Value, sock: &Path) -> bool {
    device(stats, sock).get("connected").and_then(Value::as_bool) == Some(true)
}

/// Waits until the backend's stats show the device connected; panics with the backend's
/// and QEMU's logs if QEMU exits or `timeout` passes first.
pub fn wait_connected(backend: &Backend, qemu: &mut Qemu, sock: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !backend.latest_stats().is_some_and(|s| connected(&s, sock)) {
        let why = if qemu.has_exited() {
            "QEMU exited"
        } else if Instant::now() >= deadline {
            "timeout"
        } else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        panic!(
            "the backend never reported QEMU connected ({why} after {:?}); last stats: {:?}\n\
             --- backend log\n{}\n{}",
            qemu.elapsed(),
            backend.latest_stats().map(|s| s.to_string()),
            backend.log(),
            qemu.diagnostics()
        );
    }
}

/// One guest run against `backend`: boots, checks the backend sees QEMU connected, the
/// modules and the vfio-pci bind in `mode`, waits for testpmd (unless `fwd` is "none")
/// and for QEMU to power off; with testpmd, checks that the guest and the backend both
/// used `rings`. Returns what the guest printed.
#[allow(clippy::too_many_arguments)]
pub fn run_guest(
    clock: &mut Clock,
    mode: Mode,
    rings: Rings,
    image: &Image,
    backend: &Backend,
    sock: &Path,
    fwd: &str,
    secs: u64,
) -> GuestReport {
    let params = format!("vt.fwd={fwd} vt.secs={secs}");
    let mut cfg = match mode {
        Mode::NoIommu => VmConfig::noiommu(sock, &params),
        // Hugepages: the arena is mapped in 2 MiB IOMMU pages, so the backend's IOTLB
        // needs a handful of translations instead of thousands.
        Mode::VIommu => VmConfig::viommu(sock, &format!("{params} vt.tp=--hugepages")),
    };
    cfg.packed = rings == Rings::Packed;
    let mut qemu = Qemu::start(image, &cfg);
    eprintln!("[{}] {}", clock.name, qemu.cmdline());
    wait_connected(backend, &mut qemu, sock, Duration::from_secs(30));
    clock.phase("QEMU started, backend reports the front-end connected");
    qemu.wait_serial("VNET-INIT", BOOT_TIMEOUT);
    clock.phase("guest boot (QEMU start to /init)");
    // Still connected once the guest runs (not just a connect-and-drop).
    backend.wait_stats(Duration::from_secs(5), |s| connected(s, sock));
    qemu.wait_serial("VNET-VFIO-OK", BIND_TIMEOUT);
    clock.phase(&format!("modules loaded, device bound to vfio-pci ({})", mode.name()));
    if fwd != "none" {
        qemu.wait_serial("VNET-TESTPMD BEGIN", Duration::from_secs(60));
        qemu.wait_serial("VNET-TESTPMD END", Duration::from_secs(secs + 180));
        clock.phase(&format!("testpmd --forward-mode={fwd} --duration {secs} in the guest"));
    }
    let (status, _) = qemu.wait_exit(Duration::from_secs(60));
    clock.phase("guest power-off, QEMU exited");
    let report = GuestReport::new(qemu.serial());
    let diag = qemu.diagnostics();
    assert!(status.success(), "QEMU exited with {status}\n{diag}");
    match mode {
        Mode::NoIommu => {
            assert!(
                report.serial.contains("VNET-NOIOMMU enable_unsafe_noiommu_mode=Y"),
                "no-IOMMU mode is off\n{diag}"
            );
            assert!(
                report.serial.contains("VNET-VFIO-OK /dev/vfio/noiommu-"),
                "no /dev/vfio/noiommu-N\n{diag}"
            );
        }
        Mode::VIommu => {
            let node = report.marker("VNET-VFIO-OK").unwrap_or_default();
            assert!(
                node.starts_with("/dev/vfio/") && !node.contains("noiommu"),
                "no type-1 group node /dev/vfio/N: {node:?}\n{diag}"
            );
        }
    }
    if fwd != "none" {
        let rc = report.testpmd_rc();
        assert_eq!(
            rc,
            Some(0),
            "testpmd in the guest failed (rc {rc:?}); its output:\n{}\n{diag}",
            report.testpmd_output()
        );
        eprintln!("[{}] guest testpmd output:\n{}", clock.name, report.testpmd_output());
        let out = report.testpmd_output();
        assert!(
            out.contains(rings.testpmd_layout()),
            "testpmd in the guest did not print {:?}:\n{out}\n{diag}",
            rings.testpmd_layout()
        );
        let log = backend.log();
        assert_eq!(
            backend_rings(&log),
            Some(rings.name()),
            "the backend's last feature negotiation was not on {} rings:\n{log}",
            rings.name()
        );
    }
    assert_eq!(report.passed(), Some(true), "the guest did not report VNET-RESULT PASS\n{diag}");
    report
}

/// Starts our backend with one `kind` port on a socket in `dir` (`--iommu` in vIOMMU
/// mode); `--poll-us` > 0 lets its worker sleep while QEMU boots instead of taking a
/// CPU from TCG.
pub fn start_backend(
    clock: &mut Clock,
    mode: Mode,
    dir: &TempDir,
    kind: &str,
    extra: &[&str],
) -> (Backend, PathBuf) {
    let sock = dir.join("vhost.sock");
    let port = format!("{kind}:{}", sock.display());
    let mut args = vec!["--port", &port, "--poll-us", "1000"];
    if mode == Mode::VIommu {
        args.push("--iommu");
    }
    args.extend_from_slice(extra);
    let backend = Backend::start(&args);
    clock.phase(&format!("host-backend {kind} started"));
    (backend, sock)
}

/// The backend's final device stats after QEMU has gone (waits until it has seen the
/// disconnect, then stops it).
pub fn finish_backend(backend: Backend, sock: &Path) -> Value {
    backend.wait_stats(Duration::from_secs(10), |s| !connected(s, sock));
    let fin = backend.stop();
    device(&fin, sock).clone()
}

/// What every scenario starts from: the image, our backend with one `kind` port, and a
/// clock named after the scenario (the temporary directory holds the socket).
struct Setup {
    clock: Clock,
    image: Image,
    backend: Backend,
    sock: PathBuf,
    _dir: TempDir,
}

fn setup(mode: Mode, rings: Rings, scenario: &str, kind: &str, extra: &[&str]) -> Setup {
    let mut clock = Clock::new(&format!("vm {} {} {scenario}", mode.name(), rings.name()));
    let image = build_image();
    clock.phase("image (tests/vm/build-image.sh)");
    let dir = TempDir::new(&format!("vm-{scenario}"));
    let (backend, sock) = start_backend(&mut clock, mode, &dir, kind, extra);
    Setup { clock, image, backend, sock, _dir: dir }
}

/// Prints the backend's IOTLB counters (what a vIOMMU run asked and was told).
fn print_iotlb(clock: &Clock, dev: &Value) {
    if let Some(t) = dev.get("iotlb") {
        eprintln!("[{}] backend IOTLB: {t}", clock.name);
    }
}

/// Boots the guest twice with nothing to forward: the device binds, and after QEMU exits
/// the backend resets the device and serves the next front-end.
pub fn boot_bind_and_reconnect(mode: Mode) -> Value {
    let rings = Rings::Split;
    let Setup { mut clock, image, backend, sock, _dir } = setup(mode, rings, "boot", "sink", &[]);
    run_guest(&mut clock, mode, rings, &image, &backend, &sock, "none", 0);
    backend.wait_stats(Duration::from_secs(10), |s| !connected(s, &sock));
    clock.phase("backend saw the disconnect");
    run_guest(&mut clock, mode, rings, &image, &backend, &sock, "none", 0);
    let dev = finish_backend(backend, &sock);
    eprintln!("[{}] backend final: {dev}", clock.name);
    assert_eq!(counter(&dev, "broken_queues"), 0, "{dev}");
    dev
}

/// Guest testpmd txonly into a sink: guest TX == backend rx, no drops.
pub fn txonly_to_sink(mode: Mode, rings: Rings) -> Value {
    let Setup { mut clock, image, backend, sock, _dir } = setup(mode, rings, "txonly", "sink", &[]);
    let report = run_guest(&mut clock, mode, rings, &image, &backend, &sock, "txonly", 5);
    let dev = finish_backend(backend, &sock);
    let g_tx = report.fwd_counter(0, "tx_packets");
    let g_txdrop = report.fwd_counter(0, "tx_dropped");
    let b_rx = counter(&dev, "rx_packets");
    eprintln!(
        "[{}] guest TX-packets {g_tx} (TX-dropped {g_txdrop}); backend rx_packets {b_rx}, drops {}",
        clock.name,
        total_drops(&dev)
    );
    print_iotlb(&clock, &dev);
    assert!(g_tx > 0, "the guest sent nothing\n{}", report.serial);
    assert_eq!(g_tx, b_rx, "guest TX != backend rx\nbackend: {dev}\n{}", report.testpmd_output());
    assert_eq!(total_drops(&dev), 0, "backend drops: {dev}");
    assert_eq!(counter(&dev, "broken_queues"), 0, "{dev}");
    dev
}

/// A gen port with `--count` frames into guest testpmd rxonly: every frame generated
/// is either received by the guest or counted as a backend drop.
pub fn rxonly_from_gen(mode: Mode, rings: Rings) -> Value {
    // About 1 Mpps reach the guest's testpmd under TCG: this takes 1-2 s of the 8.
    const COUNT: u64 = 1_000_000;
    let count = COUNT.to_string();
    let Setup { mut clock, image, backend, sock, _dir } =
        setup(mode, rings, "rxonly", "gen", &["--count", &count]);
    let report = run_guest(&mut clock, mode, rings, &image, &backend, &sock, "rxonly", 8);
    let dev = finish_backend(backend, &sock);
    let g_rx = report.fwd_counter(0, "rx_packets");
    let b_tx = counter(&dev, "tx_packets");
    let drops = total_drops(&dev);
    eprintln!(
        "[{}] guest RX-packets {g_rx}; backend tx_packets {b_tx}, generated {}, drops {drops} (--count {COUNT})",
        clock.name,
        counter(&dev, "generated")
    );
    print_iotlb(&clock, &dev);
    assert_eq!(counter(&dev, "generated"), COUNT, "the backend did not generate --count frames: {dev}");
    assert_eq!(b_tx, COUNT - drops, "backend tx + drops != --count: {dev}");
    assert_eq!(g_rx, b_tx, "guest RX != backend tx\nbackend: {dev}\n{}", report.testpmd_output());
    assert_eq!(counter(&dev, "broken_queues"), 0, "{dev}");
    dev
}

/// io with `--tx-first 4` through a reflect port: the guest injects 4 bursts of 32, then
/// sends back everything it receives; the backend sends back everything it receives.
/// At stop the injected frames still in the loop sit in the guest's receive ring
/// (delivered by the backend, not yet polled by testpmd, which does not drain). So, with
/// T = 4 * 32 injected:
///   guest TX + guest TX-dropped == T + guest RX   (io forwards every frame it receives)
///   backend rx == guest TX,  backend tx + peer_down == backend rx, no other drops
///   (peer_down: frames still queued for transmit when the device's receive queue
///   stopped first at testpmd's exit)
///   hence backend tx - guest RX + peer_down == T - guest TX-dropped (in flight at stop).
pub fn io_through_reflect(mode: Mode, rings: Rings) -> Value {
    let Setup { mut clock, image, backend, sock, _dir } = setup(mode, rings, "io", "reflect", &[]);
    let report = run_guest(&mut clock, mode, rings, &image, &backend, &sock, "io", 5);
    let dev = finish_backend(backend, &sock);
    let t = IO_TX_FIRST * BURST;
    let g_rx = report.fwd_counter(0, "rx_packets");
    let g_tx = report.fwd_counter(0, "tx_packets");
    let g_txdrop = report.fwd_counter(0, "tx_dropped");
    let b_rx = counter(&dev, "rx_packets");
    let b_tx = counter(&dev, "tx_packets");
    let drops = total_drops(&dev);
    eprintln!(
        "[{}] guest RX {g_rx} TX {g_tx} TX-dropped {g_txdrop}; backend rx {b_rx} tx {b_tx} drops {drops}; \
         injected {t}, in flight at stop {}",
        clock.name,
        b_tx as i128 - g_rx as i128
    );
    print_iotlb(&clock, &dev);
    let ctx = format!("backend: {dev}\n{}", report.testpmd_output());
    assert!(g_rx > 0, "the guest received nothing back\n{ctx}");
    assert_eq!(g_tx + g_txdrop, t + g_rx, "guest: TX + TX-dropped != injected + RX\n{ctx}");
    assert_eq!(b_rx, g_tx, "backend rx != guest TX\n{ctx}");
    // When testpmd resets the device at exit, its receive queue may stop before its
    // transmit queue: frames still queued for transmit are then dropped as peer_down.
    let pd = counter(&dev, "drops.peer_down");
    assert_eq!(drops, pd, "backend drops other than peer_down\n{ctx}");
    assert!(pd <= t, "more peer_down than frames in flight\n{ctx}");
    assert_eq!(b_tx + pd, b_rx, "backend tx + peer_down != backend rx\n{ctx}");
    assert_eq!(b_tx - g_rx + pd, t - g_txdrop, "frames in flight at stop\n{ctx}");
    assert_eq!(counter(&dev, "broken_queues"), 0, "{dev}");
    dev
}
