//! The driver's `l2fwd` example inside a QEMU guest with two virtio-net PCI devices,
//! both served by our host backend: `gen` (a fixed count of frames) on the first, `sink`
//! on the second. The guest's /init (tests/vm/guest-init.sh, `vt.app=l2fwd`) binds both
//! to vfio-pci and runs `l2fwd -a BDF0 -a BDF1` until SIGINT; every generated frame must
//! leave through the second device exactly once: gen's count = l2fwd's port 0 received =
//! port 1 sent = the sink's count, and per queue, what port 0's queue q received is what
//! port 1's queue q sent. With two queue pairs QEMU has `mq=on` and the driver sets the
//! pair count through the control queue over PCI.
//!
//! The sink counts frames without reading them: the MAC rewrite is checked outside the
//! VM (tests/l2fwd_example.rs), on the same code path.
//!
//! Needs root and qemu-system-x86 (as the other vm_* tests); one VM at a time under the
//! [`serial`] lock, each step bounded, QEMU and the backend killed on failure.

use std::time::Duration;

use vnet_tests::harness::{counter, device, serial, total_drops, Backend, TempDir};
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

/// The number after `key` in port `port`'s last statistics block.
fn port_stat(out: &str, port: usize, key: &str) -> u64 {
    let start = out
        .rfind(&format!("Statistics for port {port} "))
        .unwrap_or_else(|| panic!("no port {port} in:\n{out}"));
    let line =
        out[start..].lines().find(|l| l.starts_with(key)).unwrap_or_else(|| panic!("no {key}:\n{out}"));
    line[key.len()..].trim().parse().unwrap_or_else(|_| panic!("bad line {line}"))
}

/// `queue Q: received R sent S` of port `port`'s last block.
fn queue_stats(out: &str, port: usize) -> Vec<(u64, u64)> {
    let start = out.rfind(&format!("Statistics for port {port} ")).expect("port block");
    out[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("Statistics for port") && !l.starts_with("Aggregate"))
        .filter_map(|l| l.trim().strip_prefix("queue "))
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w[2].parse().expect("received"), w[4].parse().expect("sent"))
        })
        .collect()
}

fn run(viommu: bool, queues: u16) {
    let _g = serial();
    let image = build_image();
    let dir = TempDir::new("vm-l2fwd");
    let (a, b) = (dir.join("gen.sock"), dir.join("sink.sock"));
    let (pa, pb) = (format!("gen:{}", a.display()), format!("sink:{}", b.display()));
    let (n, q) = (N.to_string(), queues.to_string());
    let mut args = vec!["--port", &pa, "--port", &pb, "--count", &n, "--queues", &q, "--poll-us", "1000"];
    if viommu {
        args.push("--iommu");
    }
    let backend = Backend::start(&args);

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

    backend.wait_stats(Duration::from_secs(10), |s| {
        s["devices"].as_array().is_some_and(|d| d.iter().all(|d| d["connected"] == false))
    });
    let stats = backend.stop();
    let (dg, ds) = (device(&stats, &a), device(&stats, &b));
    assert_eq!((counter(dg, "generated"), counter(dg, "tx_packets")), (N, N), "{dg}");
    assert_eq!(port_stat(&out, 0, "Packets received:"), N, "{out}");
    assert_eq!(port_stat(&out, 1, "Packets sent:"), N, "{out}");
    assert_eq!(counter(ds, "rx_packets"), N, "sink: {ds}");
    for d in [dg, ds] {
        assert_eq!(total_drops(d), 0, "{d}");
    }
    let (q0, q1) = (queue_stats(&out, 0), queue_stats(&out, 1));
    assert_eq!((q0.len(), q1.len()), (queues as usize, queues as usize), "{out}");
    for i in 0..queues as usize {
        assert_eq!(q0[i].0, q1[i].1, "queue {i}: port 0 received, port 1 sent: {q0:?} {q1:?}");
    }
    // The backend's per-queue view of the sink adds up to the same.
    let sink_q: u64 = ds["queues"].as_array().expect("queues").iter().map(|q| counter(q, "rx_packets")).sum();
    assert_eq!(sink_q, N, "{ds}");
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
