//! The driver's `l2fwd` example inside a QEMU guest with two virtio-net PCI devices,
//! both served by our host backend: `gen` (a fixed count of frames) on the first, the
//! second cross-connected (`xconnect:B,C`) to C, a driver port in this test process that
//! reads every frame. The guest's /init (tests/vm/guest-init.sh, `vt.app=l2fwd`) binds both
//! to vfio-pci and runs `l2fwd -a BDF0 -a BDF1` until SIGINT; every generated frame must
//! leave through the second device exactly once: gen's count = l2fwd's port 0 received =
//! port 1 sent = what C received, every frame with l2fwd's MAC rewrite (destination
//! 02:00:00:00:00:01, source the guest's port 1 MAC as l2fwd printed it), and per queue,
//! what port 0's queue q received is what port 1's queue q sent. With two queue pairs
//! QEMU has `mq=on` and the driver sets the pair count through the control queue over PCI.
//!
//! The layout and the backend's exact counts are `tests/vm/scenarios/l2fwd-two-devices.toml`,
//! run with the VM runner's steps (`Run::start`, C opened on the scenario's free end
//! `x.b`, `boot_all`, `finish`); what C received and l2fwd's own statistics are checked
//! here.
//!
//! Needs root and qemu-system-x86 (as the other vm_* tests); one VM at a time under the
//! [`serial`] lock, each step bounded, QEMU and the backend killed on failure.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use driver::{Port, PortConfig, QueuePair};
use vnet_tests::harness::{counter, device, serial};
use vnet_tests::l2fwd::{port_stat, printed_mac, queue_stats};
use vnet_tests::runner::{Run, Tools};
use vnet_tests::scenario::{Mode, Scenario};
use vnet_tests::vmtest::scenario_path;

/// Frames gen sends (`--count` in the scenario file).
const N: u64 = 20_000;

/// What C received: frames, those with a wrong destination MAC or length, the distinct
/// source MACs.
struct Received {
    got: u64,
    bad: u64,
    srcs: Vec<[u8; 6]>,
}

/// Receives on every queue pair of C until `stop`, then returns the pairs and counts.
fn receive(mut pairs: Vec<QueuePair>, stop: Arc<AtomicBool>) -> (Vec<QueuePair>, Received) {
    let mut r = Received { got: 0, bad: 0, srcs: Vec::new() };
    let mut rx = Vec::with_capacity(64);
    loop {
        // Read `stop` first: a last pass after it drains what arrived before.
        let last = stop.load(Ordering::Relaxed);
        for qp in pairs.iter_mut() {
            qp.rx.rx_burst(&mut rx, 64);
            for p in rx.drain(..) {
                r.got += 1;
                let d = p.data();
                if d.len() != 64 || d[..6] != [0x02, 0, 0, 0, 0, 1] {
                    r.bad += 1;
                    continue;
                }
                let src: [u8; 6] = d[6..12].try_into().expect("6 bytes");
                if !r.srcs.contains(&src) {
                    r.srcs.push(src);
                }
            }
        }
        if last {
            return (pairs, r);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn run(viommu: bool, queues: u16) {
    let _g = serial();
    let mut sc = Scenario::load(&scenario_path("l2fwd-two-devices")).unwrap_or_else(|e| panic!("{e}"));
    sc.mode = if viommu { Mode::VIommu } else { Mode::NoIommu };
    sc.devices.iter_mut().for_each(|d| d.queues = queues);
    sc.guest.params = sc.guest.params.replace("vt.l2=", &format!("vt.l2=--queues,{queues},"));
    // The image, the backend (gen, xconnect x.a/x.b); C goes on the free end x.b first,
    // so that the cross-connect has both ends when l2fwd starts sending.
    let mut run = Run::start(&sc, &Tools::for_tests(), false).unwrap_or_else(|e| panic!("{e}"));
    let c = run.socket("x.b").expect("the scenario's free end x.b").to_path_buf();
    let mut pc = PortConfig::virtio_user(&c);
    pc.queue_pairs = queues;
    let mut port_c = Port::open(pc).expect("open C");
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let (pairs, stop) = (port_c.take_queue_pairs(), stop.clone());
        std::thread::spawn(move || receive(pairs, stop))
    };
    run.boot_all().unwrap_or_else(|e| panic!("{e}"));
    // The backend has moved all N to C (or the wait fails with its stats); then C's
    // receiver drains what is still in its rings.
    let dc = c.clone();
    run.backend().wait_stats(Duration::from_secs(10), |s| counter(device(s, &dc), "tx_packets") >= N);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (pairs, got) = receiver.join().expect("receiver thread");
    port_c.close(pairs).expect("close C");
    let report = run.finish().unwrap_or_else(|e| panic!("{e}"));
    let out = report.output();
    eprintln!("guest l2fwd output:\n{out}");
    for c in &report.checks {
        eprintln!("{}", c.message);
    }
    assert!(
        report.passed(),
        "failures: {:?}\n{}",
        report.failures(),
        serde_json::to_string_pretty(&report.to_json()).unwrap_or_default()
    );
    assert_eq!(report.last().reason.split_whitespace().next(), Some("l2fwd"), "{}", report.last().console);
    assert_eq!(port_stat(&out, 0, "Packets received:"), N, "{out}");
    assert_eq!(port_stat(&out, 1, "Packets sent:"), N, "{out}");
    // C received every frame once, each with l2fwd's MAC rewrite.
    assert_eq!((got.got, got.bad), (N, 0), "frames at C (bad: wrong length or destination)");
    assert_eq!(got.srcs, [printed_mac(&out, 1)], "source MACs must all be the guest's port 1's");
    let (q0, q1) = (queue_stats(&out, 0), queue_stats(&out, 1));
    assert_eq!((q0.len(), q1.len()), (queues as usize, queues as usize), "{out}");
    for i in 0..queues as usize {
        assert_eq!(q0[i].0, q1[i].1, "queue {i}: port 0 received, port 1 sent: {q0:?} {q1:?}");
    }
    // The backend's per-queue view of B adds up to the same.
    let ds = report.device("x.a");
    let b_q: u64 = ds["queues"].as_array().expect("queues").iter().map(|q| counter(q, "rx_packets")).sum();
    assert_eq!(b_q, N, "{ds}");
}

#[test]
fn vm_l2fwd_noiommu_two_devices() {
    run(false, 1);
}

#[test]
fn vm_l2fwd_viommu_two_devices() {
    run(true, 1);
}

#[test]
fn vm_l2fwd_noiommu_two_queue_pairs() {
    run(false, 2);
}

#[test]
fn vm_l2fwd_viommu_two_queue_pairs() {
    run(true, 2);
}
