//! The VM test scenarios, shared by the no-IOMMU and the vIOMMU test binaries
//! (`tests/tests/vm_noiommu.rs`, `tests/tests/vm_viommu.rs`), run through the VM runner
//! (`crate::runner`, the harness `vm-runner` users have) from the scenario files in
//! `tests/vm/scenarios/`.
//!
//! Each scenario file names our backend's port, the guest's NIC, what the guest's /init
//! runs (our testpmd with `-a <BDF>` on the device bound to vfio-pci) and the exact-count
//! checks between what testpmd printed inside the guest and the backend's final
//! statistics. A test sets the mode (no-IOMMU, or a vIOMMU with the backend's `--iommu`)
//! and the rings on top, runs the scenario, and passes only when the runner's report
//! has no failure (the guest passed, the backend saw QEMU connect and go, every check
//! held); it then checks here what the check language does not say: the VFIO nodes of
//! the mode, and that both sides used the ring layout asked for (testpmd's "Ring layout"
//! line in the guest, the backend's "(packed rings)"/"(split rings)" log line), so a
//! packed run cannot pass on split rings. It returns the backend's final device
//! statistics (for the IOTLB counters).
//!
//! QEMU under TCG takes a whole CPU: callers hold the cross-process lock
//! ([`crate::harness::serial`]) and boot one VM at a time.
//!
//! [`Clock`], [`wait_connected`] and [`finish_backend`] serve the VM tests that drive
//! QEMU and the backend step by step (`vm_reconnect.rs`, `vm_linux.rs`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{device, Backend};
use crate::runner::{run, Report, Tools};
pub use crate::scenario::Mode;
use crate::scenario::Scenario;
use crate::vm::Qemu;

/// QEMU start to the guest's /init (measured: 5-9 s on 2 shared cores).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// /init to the device bound to vfio-pci (measured: about 1 s).
pub const BIND_TIMEOUT: Duration = Duration::from_secs(120);

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

/// The backend's final device stats after QEMU has gone (waits until it has seen the
/// disconnect, then stops it).
pub fn finish_backend(backend: Backend, sock: &Path) -> Value {
    backend.wait_stats(Duration::from_secs(10), |s| !connected(s, sock));
    let fin = backend.stop();
    device(&fin, sock).clone()
}

/// A scenario file of `tests/vm/scenarios/`.
pub fn scenario_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/scenarios").join(format!("{name}.toml"))
}

/// Runs the scenario file `name` in `mode` on `rings` through the runner and checks its
/// report (see the module doc); returns the report.
pub fn run_scenario(name: &str, mode: Mode, rings: Rings) -> Report {
    let mut clock = Clock::new(&format!("vm {} {} {name}", mode.name(), rings.name()));
    let mut sc = Scenario::load(&scenario_path(name)).unwrap_or_else(|e| panic!("{e}"));
    sc.mode = mode;
    if mode == Mode::VIommu {
        // Hugepages: the arena is mapped in 2 MiB IOMMU pages, so the backend's IOTLB
        // needs a handful of translations instead of thousands.
        // Added to the scenario's own `vt.tp=` if it has one (guest-init takes the last).
        sc.guest.params = match sc.guest.params.find("vt.tp=") {
            Some(at) => {
                let end = sc.guest.params[at..].find(' ').map_or(sc.guest.params.len(), |e| at + e);
                format!("{},--hugepages{}", &sc.guest.params[..end], &sc.guest.params[end..])
            }
            None => format!("{} vt.tp=--hugepages", sc.guest.params),
        };
    }
    sc.devices.iter_mut().for_each(|d| d.packed = rings == Rings::Packed);
    let report = run(&sc, &Tools::for_tests(), false).unwrap_or_else(|e| panic!("[{}] {e}", clock.name()));
    clock.phase(&format!(
        "image {:.1} s, {} boot(s) ({})",
        report.image.build_time.as_secs_f64(),
        report.boots.len(),
        report.accel
    ));
    let diag = || {
        format!(
            "--- report\n{}\n--- QEMU command line\n{}",
            serde_json::to_string_pretty(&report.to_json()).unwrap_or_default(),
            report.qemu_argv.join(" ")
        )
    };
    assert!(report.passed(), "[{}] failures: {:?}\n{}", clock.name(), report.failures(), diag());
    for c in &report.checks {
        eprintln!("[{}] {}", clock.name(), c.message);
    }
    for (i, boot) in report.boots.iter().enumerate() {
        let markers = |m: &str| {
            boot.console.lines().find_map(|l| l.find(m).map(|i| l[i + m.len()..].trim().to_string()))
        };
        match mode {
            Mode::NoIommu => {
                assert_eq!(
                    markers("VNET-NOIOMMU "),
                    Some("enable_unsafe_noiommu_mode=Y".into()),
                    "boot {i}: no-IOMMU mode is off\n{}",
                    diag()
                );
                let node = markers("VNET-VFIO-OK ").unwrap_or_default();
                assert!(
                    node.starts_with("/dev/vfio/noiommu-"),
                    "boot {i}: no /dev/vfio/noiommu-N: {node:?}\n{}",
                    diag()
                );
            }
            Mode::VIommu => {
                let node = markers("VNET-VFIO-OK ").unwrap_or_default();
                assert!(
                    node.starts_with("/dev/vfio/") && !node.contains("noiommu"),
                    "boot {i}: no type-1 group node /dev/vfio/N: {node:?}\n{}",
                    diag()
                );
            }
            Mode::Kernel => panic!("the VFIO scenarios do not run in kernel mode"),
        }
    }
    if !sc.guest.params.contains("vt.fwd=none") {
        let out = report.output();
        eprintln!("[{}] guest testpmd output:\n{out}", clock.name());
        assert!(
            out.contains(rings.testpmd_layout()),
            "testpmd in the guest did not print {:?}\n{}",
            rings.testpmd_layout(),
            diag()
        );
        let end = &sc.ends[sc.device_ends[0]].name;
        assert_eq!(
            report.rings.get(end).map(String::as_str),
            Some(rings.name()),
            "the backend's last feature negotiation was not on {} rings\n{}",
            rings.name(),
            diag()
        );
    }
    if let Some(t) = report.backend.values().next().and_then(|d| d.get("iotlb")) {
        eprintln!("[{}] backend IOTLB: {t}", clock.name());
    }
    report
}

/// The backend's final statistics of the scenario's only device.
fn only_device(report: &Report) -> Value {
    assert_eq!(report.backend.len(), 1, "{:?}", report.backend);
    report.backend.values().next().cloned().unwrap_or_default()
}

/// Boots the guest twice with nothing to forward: the device binds, and after QEMU exits
/// the backend resets the device and serves the next front-end.
pub fn boot_bind_and_reconnect(mode: Mode) -> Value {
    let report = run_scenario("boot-bind", mode, Rings::Split);
    assert_eq!(report.boots.len(), 2, "two boots against the same backend");
    only_device(&report)
}

/// Guest testpmd txonly into a sink: guest TX == backend rx, no drops.
pub fn txonly_to_sink(mode: Mode, rings: Rings) -> Value {
    only_device(&run_scenario("txonly-to-sink", mode, rings))
}

/// A gen port with `--count` frames into guest testpmd rxonly: every frame generated
/// is either received by the guest or counted as a backend drop.
pub fn rxonly_from_gen(mode: Mode, rings: Rings) -> Value {
    only_device(&run_scenario("rxonly-from-gen", mode, rings))
}

/// 9014-byte frames from a gen port into guest testpmd rxonly with `--max-pkt-len 9018`:
/// mergeable receive buffers negotiated over VFIO-PCI, every frame received (the counts
/// are in the scenario file).
pub fn rxonly_jumbo_mrg_from_gen(mode: Mode, rings: Rings) -> Value {
    let report = run_scenario("rxonly-jumbo-mrg-from-gen", mode, rings);
    // testpmd's port info in the guest: VIRTIO_NET_F_MRG_RXBUF (bit 15) negotiated.
    let out = report.output();
    let features = out
        .lines()
        .find_map(|l| l.split("Negotiated features: 0x").nth(1))
        .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        .unwrap_or_else(|| panic!("no negotiated features in the guest's testpmd output:\n{out}"));
    assert_ne!(features & 1 << 15, 0, "MRG_RXBUF not negotiated: {features:#x}\n{out}");
    only_device(&report)
}

/// io with `--tx-first 4` through a reflect port (the accounting is in the scenario
/// file).
pub fn io_through_reflect(mode: Mode, rings: Rings) -> Value {
    only_device(&run_scenario("io-through-reflect", mode, rings))
}
