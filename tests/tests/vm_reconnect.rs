//! The host back-end serving one of a guest's NICs is restarted while our testpmd
//! forwards inside the guest (issue 20): QEMU's chardev has `reconnect=1`, so QEMU
//! connects to the new back-end by itself and replays the device's state to it (memory
//! table, features, and each ring from its used index: what the old back-end took but
//! never completed is taken again); the guest's driver sees the link bit go down and up
//! (QEMU clears `VIRTIO_NET_S_LINK_UP` while its back-end is away) and holds transmit
//! meanwhile, so the frames stay with testpmd, which counts them as TX-dropped. QEMU
//! completes and discards unseen whatever a guest transmits while the link is down
//! (`virtio_net_drop_tx_queue_data`); what it discards before the driver sees the link
//! bit (it looks every 10 ms) is lost without a count: measured and bounded below.
//!
//! Topology: a `gen` back-end A (never restarted) feeds the guest's port 0; testpmd
//! forwards (io) port 0 to port 1, whose back-end K (`reflect`) sends each frame back,
//! and port 1 to port 0, back to A. K is restarted [`RESTARTS`] times while frames flow.
//!
//! * Stopped with SIGTERM, each K finishes its burst, publishes it and exits with its
//!   final counts, so the frames add up over all the K's: their rx is port 1's TX less
//!   what QEMU discarded (less than 100 ms of forwarding per restart; without the
//!   transmit hold it is the whole time away), their tx plus what they dropped is their
//!   rx exactly, and port 1 received what they sent back but for the frames still in its
//!   receive ring when testpmd stopped (at most a ring).
//! * Killed with SIGKILL, a K's counts die with it, and QEMU hands its successor what it
//!   took but had not completed: frames it had already put into the guest's receive ring
//!   come round twice (a back-end publishes receive before transmit). What is checked:
//!   testpmd's own accounting, the last K's, frames flowing after each restart, the link
//!   events and the guest's pools.
//!
//! Needs what the other VM tests need (tests/vm/README.md); the tests hold the serial
//! lock (QEMU under TCG takes a whole CPU) and every process is killed on drop.

use std::path::Path;
use std::time::{Duration, Instant};

use vnet_tests::harness::{counter, device, serial, signal, total_drops, Backend, TempDir};
use vnet_tests::testpmd_proc::assert_pools_whole;
use vnet_tests::vm::{build_image, GuestReport, Qemu, VmConfig};
use vnet_tests::vmtest::{self, Clock, BIND_TIMEOUT, BOOT_TIMEOUT};

/// K's restarts per run.
const RESTARTS: usize = 2;
/// testpmd's `--duration` in the guest: room for the restarts (each takes QEMU's 1 s
/// reconnect tick and a few seconds of TCG) with frames flowing before and after.
const SECS: u64 = 30;
/// A receive ring's entries (QEMU's default queue size): frames that can sit in one at
/// the end, delivered but not yet received by testpmd when it stopped.
const RING: u64 = 256;

fn reflect(sock: &Path) -> Backend {
    let port = format!("reflect:{}", sock.display());
    Backend::start(&["--port", &port, "--poll-us", "1000"])
}

/// Waits (max 20 s) until this back-end has forwarded frames (QEMU reconnected, the
/// guest's frames flow through it); returns how long that took.
fn wait_flowing(b: &Backend, qemu: &mut Qemu, sock: &Path, what: &str) -> Duration {
    let t0 = Instant::now();
    let flowing =
        |s: &serde_json::Value| vmtest::connected(s, sock) && counter(device(s, sock), "tx_packets") > 0;
    while !b.latest_stats().is_some_and(|s| flowing(&s)) {
        assert!(
            t0.elapsed() < Duration::from_secs(20) && !qemu.has_exited(),
            "{what}: no frames through it within {:?}; last stats: {:?}\n--- back-end log\n{}\n{}",
            t0.elapsed(),
            b.latest_stats().map(|s| s.to_string()),
            b.log(),
            qemu.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let d = t0.elapsed();
    eprintln!("{what}: frames flow through the back-end {d:?} after it started");
    d
}

/// Counts over the back-ends whose final counts are known.
#[derive(Default, Debug)]
struct Sums {
    rx: u64,
    tx: u64,
    peer_down: u64,
    other_drops: u64,
}

impl Sums {
    fn add(&mut self, dev: &serde_json::Value) {
        let pd = counter(dev, "drops.peer_down");
        self.rx += counter(dev, "rx_packets");
        self.tx += counter(dev, "tx_packets");
        self.peer_down += pd;
        self.other_drops += total_drops(dev) - pd;
        assert_eq!(counter(dev, "broken_queues"), 0, "{dev}");
    }
}

fn restarted_under_io(sigkill: bool) {
    let _g = serial();
    let name = if sigkill { "killed" } else { "restarted" };
    let mut clock = Clock::new(&format!("vm noiommu split backend {name}"));
    let image = build_image();
    clock.phase("image (tests/vm/build-image.sh)");
    let dir = TempDir::new("vm-reconnect");
    let (a_sock, sock) = (dir.join("a.sock"), dir.join("k.sock"));
    let a_port = format!("gen:{}", a_sock.display());
    let gen = Backend::start(&["--port", &a_port, "--poll-us", "1000"]);
    let mut backend = reflect(&sock);
    let mut cfg = VmConfig::noiommu(&a_sock, &format!("vt.fwd=io vt.secs={SECS} vt.txfirst=0"));
    cfg.socket2 = Some(sock.clone());
    cfg.reconnect = true;
    let mut qemu = Qemu::start(&image, &cfg);
    eprintln!("[{}] {}", clock.name(), qemu.cmdline());
    vmtest::wait_connected(&backend, &mut qemu, &sock, Duration::from_secs(30));
    qemu.wait_serial("VNET-INIT", BOOT_TIMEOUT);
    qemu.wait_serial("VNET-TESTPMD BEGIN", BIND_TIMEOUT);
    clock.phase("guest booted, testpmd started");
    wait_flowing(&backend, &mut qemu, &sock, "first K");

    let mut sums = Sums::default();
    let mut resumed = Vec::new();
    for i in 1..=RESTARTS {
        // Frames flow through this K for a while.
        std::thread::sleep(Duration::from_secs(2));
        if sigkill {
            signal(backend.pid(), libc::SIGKILL);
            drop(backend);
        } else {
            let fin = backend.stop();
            sums.add(device(&fin, &sock));
        }
        clock.phase(&format!("K {i} gone"));
        // Away for a while: QEMU notices, the guest's driver sees the link go down.
        std::thread::sleep(Duration::from_millis(1500));
        backend = reflect(&sock);
        resumed.push(wait_flowing(&backend, &mut qemu, &sock, &format!("K {}", i + 1)));
        clock.phase(&format!("K {} serving", i + 1));
    }
    qemu.wait_serial("VNET-TESTPMD END", Duration::from_secs(SECS + 180));
    clock.phase("testpmd done in the guest");
    let (status, _) = qemu.wait_exit(Duration::from_secs(60));
    let report = GuestReport::new(qemu.serial());
    assert!(status.success(), "QEMU exited with {status}\n{}", qemu.diagnostics());
    let dev = vmtest::finish_backend(backend, &sock);
    sums.add(&dev);
    let a_dev = vmtest::finish_backend(gen, &a_sock);
    let out = report.testpmd_output();
    assert_eq!(report.testpmd_rc(), Some(0), "testpmd in the guest failed\n{}", report.serial);

    let c = |port, name| report.fwd_counter(port, name);
    let (p0_rx, p0_tx, p0_drop) = (c(0, "rx_packets"), c(0, "tx_packets"), c(0, "tx_dropped"));
    let (p1_rx, p1_tx, p1_drop) = (c(1, "rx_packets"), c(1, "tx_packets"), c(1, "tx_dropped"));
    let a_tx = counter(&a_dev, "tx_packets");
    eprintln!(
        "[{}] A tx {a_tx}; port 0 RX {p0_rx} TX {p0_tx} TX-dropped {p0_drop}; port 1 RX {p1_rx} TX {p1_tx} \
         TX-dropped {p1_drop}; K's {sums:?} (last: rx {} tx {}); frames flowed again after {resumed:?}",
        clock.name(),
        counter(&dev, "rx_packets"),
        counter(&dev, "tx_packets")
    );
    let ctx = format!("last K: {dev}\nA: {a_dev}\n{out}");
    // testpmd's own accounting: io forwards every frame it receives, to the other port.
    assert_eq!(p1_tx + p1_drop, p0_rx, "port 1 TX + TX-dropped != port 0 RX\n{ctx}");
    assert_eq!(p0_tx + p0_drop, p1_rx, "port 0 TX + TX-dropped != port 1 RX\n{ctx}");
    // A delivered what port 0 received, and at most a ring more (not yet received).
    assert!(p0_rx <= a_tx && a_tx - p0_rx <= RING, "A tx {a_tx} vs port 0 RX {p0_rx}\n{ctx}");
    assert_eq!(sums.other_drops, 0, "K drops other than peer_down\n{ctx}");
    // The last K's own accounting (reflect): it sent back what it took, less what it
    // dropped because the guest's receive ring was not running yet.
    let (lrx, ltx, lpd) =
        (counter(&dev, "rx_packets"), counter(&dev, "tx_packets"), counter(&dev, "drops.peer_down"));
    assert_eq!(ltx + lpd, lrx, "last K: tx + peer_down != rx\n{ctx}");
    assert!(ltx > 0, "nothing flowed through the last K\n{ctx}");
    if !sigkill {
        // Every K counted. Nothing came back twice; what port 1 sent and no K took was
        // discarded by QEMU between its link going down and the guest seeing it (the
        // driver looks every 10 ms; TCG delays it): less than 100 ms of forwarding per
        // restart (not holding transmit loses the whole time away, seconds of it).
        assert!(sums.rx <= p1_tx, "K's rx {} > port 1 TX {p1_tx}\n{ctx}", sums.rx);
        let lost = p1_tx - sums.rx;
        let per_100ms = p0_rx / (SECS * 10);
        eprintln!(
            "discarded by QEMU while its link was down: {lost} ({per_100ms} frames per 100 ms forwarded)"
        );
        assert!(lost < RESTARTS as u64 * per_100ms, "{lost} frames lost at the restarts\n{ctx}");
        assert_eq!(sums.tx + sums.peer_down, sums.rx, "K's: tx + peer_down != rx\n{ctx}");
        assert!(
            p1_rx <= sums.tx && sums.tx - p1_rx <= RING,
            "port 1 RX {p1_rx} vs K's tx {} (at most a ring in flight at stop)\n{ctx}",
            sums.tx
        );
    }
    // The link: down and up once per restart, on port 1 only (the driver reads the
    // device's link bit).
    assert_eq!(out.matches("Port 1: link state change event").count(), 2 * RESTARTS, "{ctx}");
    assert_eq!(out.matches("Port 1: link down").count(), RESTARTS, "{ctx}");
    assert_eq!(out.matches("Port 0: link state change event").count(), 0, "{ctx}");
    // QEMU's reconnect timer ticks once a second; the guest looks at the link every 100 ms.
    for (i, d) in resumed.iter().enumerate() {
        assert!(*d < Duration::from_secs(3), "restart {}: frames flowed again only after {d:?}", i + 1);
    }
    assert_pools_whole(&out, 2);
}

/// SIGTERM: every back-end's final counts are known, the sums are exact.
#[test]
fn vm_backend_restarted_under_io() {
    restarted_under_io(false);
}

/// SIGKILL: the dead back-ends' counts are gone; the guest's and the last back-end's
/// accounting, the link events, the pool.
#[test]
fn vm_backend_killed_under_io() {
    restarted_under_io(true);
}
