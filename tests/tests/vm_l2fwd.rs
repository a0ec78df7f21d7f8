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
//! Needs root and qemu-system-x86 (as the other vm_* tests); one VM at a time under the
//! [`serial`] lock, each step bounded, QEMU and the backend killed on failure.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use driver::{Port, PortConfig, QueuePair};
use vnet_tests::harness::{counter, device, serial, total_drops, Backend, TempDir};
use vnet_tests::l2fwd::{port_stat, printed_mac, queue_stats};
use vnet_tests::vm::{build_image, GuestReport, Qemu, VmConfig};

/// Frames gen sends.
const N: u64 = 20_000;
/// Seconds l2fwd runs in the guest before its SIGINT.
const SECS: u64 = 15;

/// l2fwd's output between the guest's BEGIN/END markers, without the prefixes.
fn l2fwd_output(r: &GuestReport) -> String {
    let mut out = String::new();
    let mut inside = false;
    for l in r.serial.lines() {
        if l.contains("VNET-L2FWD BEGIN") {
            inside = true;
        } else if l.contains("VNET-L2FWD END") {
            inside = false;
        } else if inside {
            out.push_str(l.strip_prefix("L2| ").or_else(|| l.strip_prefix("L2! ")).unwrap_or(l));
            out.push('\n');
        }
    }
    out
}

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
    let image = build_image();
    let dir = TempDir::new("vm-l2fwd");
    let (a, b, c) = (dir.join("gen.sock"), dir.join("b.sock"), dir.join("c.sock"));
    let (pa, pb) = (format!("gen:{}", a.display()), format!("xconnect:{},{}", b.display(), c.display()));
    let (n, q) = (N.to_string(), queues.to_string());
    let mut args = vec!["--port", &pa, "--port", &pb, "--count", &n, "--queues", &q, "--poll-us", "1000"];
    if viommu {
        args.push("--iommu");
    }
    let backend = Backend::start(&args);
    // C first, so that the cross-connect has both ends when l2fwd starts sending.
    let mut pc = PortConfig::virtio_user(&c);
    pc.queue_pairs = queues;
    let mut port_c = Port::open(pc).expect("open C");
    let stop = Arc::new(AtomicBool::new(false));
    let receiver = {
        let (pairs, stop) = (port_c.take_queue_pairs(), stop.clone());
        std::thread::spawn(move || receive(pairs, stop))
    };

    // -q 2: one thread per queue index, each serving both ports' queue q.
    let params = format!("vt.app=l2fwd vt.secs={SECS} vt.l2=-q,2,--queues,{queues},--hugepages");
    let mut cfg = if viommu { VmConfig::viommu(&a, &params) } else { VmConfig::noiommu(&a, &params) };
    cfg.socket2 = Some(b.clone());
    cfg.queues = queues;
    let mut qemu = Qemu::start(&image, &cfg);
    qemu.wait_serial("VNET-L2FWD END", Duration::from_secs(SECS + 240));
    let (status, _) = qemu.wait_exit(Duration::from_secs(60));
    let report = GuestReport::new(qemu.serial());
    let diag = qemu.diagnostics();
    assert!(status.success(), "QEMU exited with {status}\n{diag}");
    assert_eq!(report.passed(), Some(true), "no VNET-RESULT PASS\n{diag}");
    let out = l2fwd_output(&report);
    eprintln!("guest l2fwd output:\n{out}");

    let (da, db) = (a.clone(), b.clone());
    backend.wait_stats(Duration::from_secs(10), |s| {
        device(s, &da)["connected"] == false && device(s, &db)["connected"] == false
    });
    // The backend has moved all N to C (or the wait fails with its stats); then C's
    // receiver drains what is still in its rings.
    let dc = c.clone();
    backend.wait_stats(Duration::from_secs(10), |s| counter(device(s, &dc), "tx_packets") >= N);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (pairs, got) = receiver.join().expect("receiver thread");
    port_c.close(pairs).expect("close C");
    let stats = backend.stop();
    let (dg, ds, dc) = (device(&stats, &a), device(&stats, &b), device(&stats, &c));
    assert_eq!((counter(dg, "generated"), counter(dg, "tx_packets")), (N, N), "{dg}");
    assert_eq!(port_stat(&out, 0, "Packets received:"), N, "{out}");
    assert_eq!(port_stat(&out, 1, "Packets sent:"), N, "{out}");
    assert_eq!(counter(ds, "rx_packets"), N, "B: {ds}");
    assert_eq!(counter(dc, "tx_packets"), N, "C: {dc}");
    for d in [dg, ds, dc] {
        assert_eq!(total_drops(d), 0, "{d}");
    }
    // C received every frame once, each with l2fwd's MAC rewrite.
    assert_eq!((got.got, got.bad), (N, 0), "frames at C (bad: wrong length or destination)");
    assert_eq!(got.srcs, [printed_mac(&out, 1)], "source MACs must all be the guest's port 1's");
    let (q0, q1) = (queue_stats(&out, 0), queue_stats(&out, 1));
    assert_eq!((q0.len(), q1.len()), (queues as usize, queues as usize), "{out}");
    for i in 0..queues as usize {
        assert_eq!(q0[i].0, q1[i].1, "queue {i}: port 0 received, port 1 sent: {q0:?} {q1:?}");
    }
    // The backend's per-queue view of B adds up to the same.
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
