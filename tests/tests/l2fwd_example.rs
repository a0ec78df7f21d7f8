//! The driver's `l2fwd` example (driver/examples/l2fwd.rs) forwarding between two
//! virtio-user ports of our host backend.
//!
//! Topology: the backend's `gen:A` (a fixed count of frames) -> l2fwd port 0 (A) ->
//! l2fwd port 1 (B) -> the backend's `xconnect:B,C` -> C, a driver port in this test
//! process that reads every frame. So every count is checked on both sides (the gen,
//! l2fwd's final statistics per port and per queue, the backend's B and C devices, the
//! frames this test received) and every frame's MAC addresses as l2fwd rewrites them.
//!
//! A third test runs the XDP filter (`--drop-ethertype`) instead of forwarding.
//!
//! Each test takes the [`serial`] lock, bounds every wait, and kills what it started.

use std::path::Path;
use std::time::{Duration, Instant};

use driver::{Port, PortConfig};
use vnet_tests::harness::{counter, device, serial, total_drops, workspace_example, Backend, TempDir};
use vnet_tests::l2fwd::{port_stat, printed_mac, queue_stats};
use vnet_tests::testpmd_proc::{Spawn, Testpmd};

/// Frames the backend's gen sends.
const N: u64 = 50_000;
/// Upper bound for the traffic phase.
const TRAFFIC_TIMEOUT: Duration = Duration::from_secs(60);
/// How long to keep polling after the expected count, to catch extra frames.
const QUIET: Duration = Duration::from_millis(300);
/// gen's frame size.
const FRAME: usize = 64;

fn run(queues: u16) {
    let _serial = serial();
    let dir = TempDir::new("l2fwd");
    let (a, b, c) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("c.sock"));
    let sock = |p: &Path| p.display().to_string();
    let (gen, xc) = (format!("gen:{}", sock(&a)), format!("xconnect:{},{}", sock(&b), sock(&c)));
    let (n, q) = (N.to_string(), queues.to_string());
    let backend =
        Backend::start(&["--port", &gen, "--port", &xc, "--count", &n, "--queues", &q, "--cores", "1"]);

    // C first, so that the cross-connect has both ends when l2fwd starts sending.
    let mut pc = PortConfig::virtio_user(&c);
    pc.queue_pairs = queues;
    let mut sink = Port::open(pc).expect("open C");
    let mut pairs = sink.take_queue_pairs();

    let l2fwd = workspace_example("vnet-driver", "l2fwd");
    let va = format!("net_virtio_user0,path={},queues={queues}", sock(&a));
    let vb = format!("net_virtio_user1,path={},queues={queues}", sock(&b));
    // Two units (port 0 and port 1 of one queue index) per thread: one thread per queue.
    let app = Testpmd::spawn_program(
        &l2fwd,
        &["--vdev", &va, "--vdev", &vb, "--", "-p", "0x3", "-q", "2", "-T", "0"],
        Spawn::default(),
    );

    // Receive on every queue of C until N frames, then a quiet period for extras.
    let mut got = 0u64;
    let mut bad = Vec::new();
    let mut rx = Vec::with_capacity(64);
    let deadline = Instant::now() + TRAFFIC_TIMEOUT;
    let mut quiet_until: Option<Instant> = None;
    // Every distinct source MAC seen (checked below against what l2fwd printed).
    let mut srcs: Vec<[u8; 6]> = Vec::new();
    while quiet_until.map_or(true, |t| Instant::now() < t) {
        assert!(
            Instant::now() < deadline,
            "received {got} of {N} frames within {TRAFFIC_TIMEOUT:?}:\n{}\n{}",
            app.outputs(),
            backend.log()
        );
        for qp in pairs.iter_mut() {
            qp.rx.rx_burst(&mut rx, 64);
            for p in rx.drain(..) {
                got += 1;
                let d = p.data();
                if d.len() != FRAME || d[..6] != [0x02, 0, 0, 0, 0, 1] {
                    bad.push(d[..d.len().min(14)].to_vec());
                    continue;
                }
                let src: [u8; 6] = d[6..12].try_into().expect("6 bytes");
                if !srcs.contains(&src) {
                    srcs.push(src);
                }
            }
        }
        if got >= N && quiet_until.is_none() {
            quiet_until = Some(Instant::now() + QUIET);
        }
    }

    app.signal(libc::SIGINT);
    let exit = app.wait(Duration::from_secs(10));
    assert_eq!(exit.code(), 0, "{exit:?}");
    let out = &exit.stdout;
    sink.close(pairs).expect("close C");
    let stats = backend.stop();

    assert_eq!(got, N, "frames at C:\n{out}");
    assert!(
        bad.is_empty(),
        "{} frames with a wrong length or destination MAC, e.g. {:02x?}",
        bad.len(),
        bad[0]
    );
    let mac1 = printed_mac(out, 1);
    assert_eq!(srcs, [mac1], "source MACs must all be l2fwd port 1's");
    // l2fwd's own count, per port and per queue.
    assert_eq!(port_stat(out, 0, "Packets received:"), N, "{out}");
    assert_eq!(port_stat(out, 1, "Packets sent:"), N, "{out}");
    assert_eq!(port_stat(out, 0, "Packets sent:"), 0, "{out}");
    assert_eq!(port_stat(out, 1, "Packets received:"), 0, "{out}");
    for p in [0, 1] {
        assert_eq!(port_stat(out, p, "Packets dropped:"), 0, "{out}");
    }
    let (q0, q1) = (queue_stats(out, 0), queue_stats(out, 1));
    assert_eq!((q0.len(), q1.len()), (queues as usize, queues as usize), "{out}");
    assert_eq!(q0.iter().map(|q| q.0).sum::<u64>(), N, "port 0 queues: {q0:?}");
    assert_eq!(q1.iter().map(|q| q.1).sum::<u64>(), N, "port 1 queues: {q1:?}");
    // Unit (0, q) sends on port 1's queue q: per-queue counts match one to one.
    for i in 0..queues as usize {
        assert_eq!(q0[i].0, q1[i].1, "queue {i}: port 0 received, port 1 sent: {q0:?} {q1:?}");
    }
    // The backend's view: gen sent N, B took N from l2fwd, C got N; nothing dropped.
    let (da, db, dc) = (device(&stats, &a), device(&stats, &b), device(&stats, &c));
    assert_eq!((counter(da, "generated"), counter(da, "tx_packets")), (N, N), "{da}");
    assert_eq!(counter(db, "rx_packets"), N, "{db}");
    assert_eq!(counter(dc, "tx_packets"), N, "{dc}");
    for d in [da, db, dc] {
        assert_eq!(total_drops(d), 0, "{d}");
    }
}

#[test]
fn forwards_every_frame_once_with_macs_rewritten() {
    run(1);
}

#[test]
fn two_queue_pairs_per_port_counts_add_up() {
    run(2);
}

/// `--drop-ethertype 0x0800`: the XDP filter in front of forwarding drops every IPv4
/// frame gen makes, so port 0 receives and drops all N and nothing reaches the sink.
#[test]
fn xdp_filter_drops_the_given_ethertype() {
    let _serial = serial();
    let dir = TempDir::new("l2fwd-xdp");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let (gen, sink) = (format!("gen:{}", a.display()), format!("sink:{}", b.display()));
    let n = N.to_string();
    let backend = Backend::start(&["--port", &gen, "--port", &sink, "--count", &n, "--cores", "1"]);
    let va = format!("net_virtio_user0,path={}", a.display());
    let vb = format!("net_virtio_user1,path={}", b.display());
    let app = Testpmd::spawn_program(
        &workspace_example("vnet-driver", "l2fwd"),
        &["--vdev", &va, "--vdev", &vb, "-q", "2", "-T", "0", "--drop-ethertype", "0x0800"],
        Spawn::default(),
    );
    backend.wait_stats(TRAFFIC_TIMEOUT, |s| {
        s["devices"].as_array().is_some_and(|d| d.iter().any(|d| d["tx_packets"].as_u64() == Some(N)))
    });
    std::thread::sleep(QUIET);
    app.signal(libc::SIGINT);
    let exit = app.wait(Duration::from_secs(10));
    assert_eq!(exit.code(), 0, "{exit:?}");
    let out = &exit.stdout;
    let stats = backend.stop();
    assert_eq!(port_stat(out, 0, "Packets received:"), N, "{out}");
    assert_eq!(port_stat(out, 0, "Packets dropped:"), N, "{out}");
    assert_eq!(port_stat(out, 1, "Packets sent:"), 0, "{out}");
    assert_eq!(counter(device(&stats, &a), "tx_packets"), N);
    assert_eq!(counter(device(&stats, &b), "rx_packets"), 0);
}
