//! Interop: DPDK 22.11's virtio-user PMD (in `dpdk-testpmd`) against our `host-backend`.
//!
//! Each test takes the cross-binary [`serial`] lock, bounds every wait, and checks exact
//! frame counts from both sides: testpmd's "Forward statistics" block (parsed after
//! `quit`) against the backend's final JSON stats.
//!
//! CPU placement on the 2-cpu machine: the backend's single busy-poll worker on cpu 1,
//! testpmd forwarding lcores on cpu 0 (their idle CLI lcore on cpu 1).
//!
//! Direction names are the device's: backend `rx_*` = frames the front-end transmitted,
//! `tx_*` = frames delivered into the front-end's receive queue.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use vnet_tests::dpdk::{PortCounts, Role, Testpmd};
use vnet_tests::harness::{counter, device, serial, total_drops, Backend, TempDir};

/// testpmd frame size (`--txpkts`; no CRC) and the backend's busy-poll cpu.
const PKT: u16 = 64;
const BACKEND_CPU: &str = "1";
const DPDK_FWD_CPU: u32 = 0;

fn port(kind: &str, sock: &Path) -> String {
    format!("{kind}:{}", sock.display())
}

fn virtio_user(sock: &Path, extra: &[&str]) -> Testpmd {
    Testpmd::start(Role::VirtioUser { path: sock.to_path_buf(), queues: 1 }, PKT, DPDK_FWD_CPU, extra)
}

/// [`virtio_user`] with extra vdev arguments (`packed_vq=1`, `in_order=0`).
fn virtio_user_with(sock: &Path, devargs: &str, extra: &[&str]) -> Testpmd {
    let role = Role::VirtioUser { path: sock.to_path_buf(), queues: 1 };
    Testpmd::start_with_devargs(role, devargs, PKT, DPDK_FWD_CPU, extra)
}

/// The ring layout virtio-user negotiated, from the backend's log: `packed` or `split`.
fn rings_negotiated(backend: &Backend) -> &'static str {
    let log = backend.log();
    if log.contains("(packed rings)") {
        "packed"
    } else if log.contains("(split rings)") {
        "split"
    } else {
        panic!("the backend logged no feature negotiation:\n{log}")
    }
}

/// What [`rings_negotiated`] must say for `devargs`.
fn expected_rings(devargs: &str) -> &'static str {
    if devargs.contains("packed_vq=1") {
        "packed"
    } else {
        "split"
    }
}

/// The devargs of the packed-ring variants: DPDK's virtio-user takes `packed_vq` and
/// `in_order` (its default is `in_order=1`).
const PACKED_IN_ORDER: &str = "packed_vq=1,in_order=1";
const PACKED_ANY_ORDER: &str = "packed_vq=1,in_order=0";

/// Waits until the backend reports `socket` as connected.
fn wait_connected(backend: &Backend, socket: &Path) {
    backend.wait_stats(Duration::from_secs(10), |s| {
        device(s, socket).get("connected").and_then(Value::as_bool) == Some(true)
    });
}

/// Sends `stop` and waits until testpmd has printed its forward statistics, i.e. its
/// forwarding lcore has really stopped touching the rings.
fn stop_forwarding(pmd: &mut Testpmd) {
    let before = pmd.log_count("Forward statistics for port");
    pmd.cmd("stop");
    let deadline = Instant::now() + Duration::from_secs(10);
    while pmd.log_count("Forward statistics for port") == before {
        assert!(Instant::now() < deadline, "testpmd printed no statistics after `stop`:\n{}", pmd.log());
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (max 15 s) until `value(stats)` is the same in two consecutive stats reports
/// (the backend prints one per second) and returns those stats.
fn wait_stable(backend: &Backend, value: impl Fn(&Value) -> Vec<u64>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut prev: Option<(String, Vec<u64>)> = None;
    loop {
        if let Some(s) = backend.latest_stats() {
            let stamp = s["elapsed_s"].to_string();
            let v = value(&s);
            match &prev {
                Some((t, pv)) if *t != stamp && *pv == v => return s,
                Some((t, _)) if *t == stamp => {}
                _ => prev = Some((stamp, v)),
            }
        }
        assert!(
            Instant::now() < deadline,
            "backend counters did not settle within 15 s; last stats: {:?}\nlog:\n{}",
            backend.latest_stats(),
            backend.log()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Prints both sides' counters (shown on failure) and checks that no queue broke.
fn show(what: &str, dpdk: &PortCounts, dev: &Value) {
    eprintln!("{what}: testpmd {dpdk:?}\n{what}: backend {dev}");
    assert_eq!(dev["broken_queues"].as_u64(), Some(0), "{what}: broken queues: {dev}");
}

/// virtio-user `txonly` into a `sink` port: every frame testpmd placed in its TX ring
/// (TX-packets) is consumed and counted by the backend, even those still in the ring
/// when testpmd stopped.
#[test]
fn dpdk_txonly_into_sink() {
    txonly_into_sink("");
}

/// [`dpdk_txonly_into_sink`] over packed rings (virtio-user `packed_vq=1`), in order.
#[test]
fn dpdk_packed_txonly_into_sink() {
    txonly_into_sink(PACKED_IN_ORDER);
}

/// [`dpdk_txonly_into_sink`] over packed rings, `in_order=0`.
#[test]
fn dpdk_packed_any_order_txonly_into_sink() {
    txonly_into_sink(PACKED_ANY_ORDER);
}

fn txonly_into_sink(devargs: &str) {
    let _serial = serial();
    let dir = TempDir::new("dpdk-sink");
    let sock = dir.join("sink.sock");
    let backend = Backend::start(&["--port", &port("sink", &sock), "--cores", BACKEND_CPU]);
    let mut pmd = virtio_user_with(&sock, devargs, &[]);
    wait_connected(&backend, &sock);

    pmd.cmd("set fwd txonly");
    pmd.cmd("start");
    thread::sleep(Duration::from_secs(2));
    stop_forwarding(&mut pmd);
    assert_eq!(rings_negotiated(&backend), expected_rings(devargs));
    wait_stable(&backend, |s| vec![counter(device(s, &sock), "rx_packets")]);
    let dpdk = pmd.quit();
    let fin = backend.stop();
    let dev = device(&fin, &sock);
    show("sink", &dpdk, dev);

    assert!(dpdk.tx_packets > 0, "testpmd sent nothing: {dpdk:?}");
    assert_eq!(counter(dev, "rx_packets"), dpdk.tx_packets, "sink rx == DPDK TX");
    assert_eq!(
        counter(dev, "rx_bytes"),
        dpdk.tx_packets * u64::from(PKT),
        "rx_bytes counts frame bytes (no virtio-net header)"
    );
    assert_eq!(counter(dev, "tx_packets"), 0);
    assert_eq!(total_drops(dev), 0, "sink dropped frames: {dev}");
}

/// A `gen` port with `--count 100000` into virtio-user `rxonly`: every generated frame
/// is either delivered (and received by testpmd) or dropped for lack of a receive
/// buffer. `--no-flush-rx` keeps testpmd from discarding (uncounted) the frames that
/// were already in its RX ring when forwarding starts.
#[test]
fn dpdk_rxonly_from_gen() {
    rxonly_from_gen("");
}

/// [`dpdk_rxonly_from_gen`] over packed rings, in order.
#[test]
fn dpdk_packed_rxonly_from_gen() {
    rxonly_from_gen(PACKED_IN_ORDER);
}

/// [`dpdk_rxonly_from_gen`] over packed rings, `in_order=0`.
#[test]
fn dpdk_packed_any_order_rxonly_from_gen() {
    rxonly_from_gen(PACKED_ANY_ORDER);
}

fn rxonly_from_gen(devargs: &str) {
    const COUNT: u64 = 100_000;
    let _serial = serial();
    let dir = TempDir::new("dpdk-gen");
    let sock = dir.join("gen.sock");
    let count = COUNT.to_string();
    let pkt = PKT.to_string();
    let backend = Backend::start(&[
        "--port",
        &port("gen", &sock),
        "--count",
        &count,
        "--pkt-size",
        &pkt,
        "--cores",
        BACKEND_CPU,
    ]);
    let mut pmd = virtio_user_with(&sock, devargs, &["--no-flush-rx"]);
    wait_connected(&backend, &sock);
    pmd.cmd("set fwd rxonly");
    pmd.cmd("start");
    backend.wait_stats(Duration::from_secs(30), |s| counter(device(s, &sock), "generated") == COUNT);
    assert_eq!(rings_negotiated(&backend), expected_rings(devargs));
    // rxonly drains its ring within microseconds; give it ample time, then stop.
    thread::sleep(Duration::from_millis(500));
    stop_forwarding(&mut pmd);
    let dpdk = pmd.quit();
    let fin = backend.stop();
    let dev = device(&fin, &sock);
    show("gen", &dpdk, dev);

    let delivered = counter(dev, "tx_packets");
    let drops = total_drops(dev);
    assert_eq!(counter(dev, "generated"), COUNT);
    assert!(dpdk.rx_packets > 0, "testpmd received nothing: {dpdk:?}");
    assert_eq!(dpdk.rx_packets, delivered, "DPDK RX == backend tx");
    assert_eq!(dpdk.rx_packets + drops, COUNT, "received + dropped == generated");
    assert_eq!(
        drops,
        counter(dev, "drops.rx_buffer_too_small"),
        "a generator only drops for small buffers: {dev}"
    );
    assert_eq!(counter(dev, "tx_bytes"), delivered * u64::from(PKT));
    assert_eq!(counter(dev, "rx_packets"), 0);
    assert_eq!(dpdk.rx_dropped, 0);
}

/// virtio-user `io` (port 0 forwards to itself) through a `reflect` port.
///
/// `start tx_first 2` injects 2 bursts of 32 = 64 frames, which then circulate: testpmd
/// receives each frame and sends it back, the backend reflects it. 64 frames never fill
/// a 256-entry ring, so nobody ever has to drop one. After `stop`, the backend moves
/// every frame still in the TX ring into the (nearly empty) RX ring, where all 64 stay
/// unread. That gives exact equations:
/// * DPDK TX-packets = DPDK RX-packets + 64 (the injected frames), nothing dropped;
/// * backend rx == DPDK TX-packets (the backend consumed everything sent);
/// * backend tx == backend rx (reflect loses nothing);
/// * backend tx == DPDK RX-packets + 64 (the 64 frames left unread in the RX ring).
#[test]
fn dpdk_io_through_reflect() {
    io_through_reflect("");
}

/// [`dpdk_io_through_reflect`] over packed rings, in order.
#[test]
fn dpdk_packed_io_through_reflect() {
    io_through_reflect(PACKED_IN_ORDER);
}

/// [`dpdk_io_through_reflect`] over packed rings, `in_order=0`.
#[test]
fn dpdk_packed_any_order_io_through_reflect() {
    io_through_reflect(PACKED_ANY_ORDER);
}

fn io_through_reflect(devargs: &str) {
    const INJECTED: u64 = 2 * 32;
    let _serial = serial();
    let dir = TempDir::new("dpdk-reflect");
    let sock = dir.join("reflect.sock");
    let backend = Backend::start(&["--port", &port("reflect", &sock), "--cores", BACKEND_CPU]);
    let mut pmd = virtio_user_with(&sock, devargs, &[]);
    wait_connected(&backend, &sock);

    pmd.cmd("set fwd io");
    pmd.cmd("start tx_first 2");
    thread::sleep(Duration::from_secs(2));
    stop_forwarding(&mut pmd);
    assert_eq!(rings_negotiated(&backend), expected_rings(devargs));
    wait_stable(&backend, |s| {
        let d = device(s, &sock);
        vec![counter(d, "rx_packets"), counter(d, "tx_packets")]
    });
    let dpdk = pmd.quit();
    let fin = backend.stop();
    let dev = device(&fin, &sock);
    show("reflect", &dpdk, dev);

    let (rx, tx) = (counter(dev, "rx_packets"), counter(dev, "tx_packets"));
    assert_eq!((dpdk.rx_dropped, dpdk.tx_dropped), (0, 0), "DPDK dropped: {dpdk:?}");
    assert!(dpdk.rx_packets > INJECTED * 100, "the loop hardly circulated: {dpdk:?}");
    assert_eq!(dpdk.tx_packets, dpdk.rx_packets + INJECTED, "DPDK TX = RX + injected");
    assert_eq!(rx, dpdk.tx_packets, "backend rx == DPDK TX");
    assert_eq!(tx, rx, "reflect: backend tx == backend rx");
    assert_eq!(tx, dpdk.rx_packets + INJECTED, "injected frames left in the RX ring");
    assert_eq!(total_drops(dev), 0, "reflect dropped frames: {dev}");
    assert_eq!(counter(dev, "rx_bytes"), rx * u64::from(PKT));
    assert_eq!(counter(dev, "tx_bytes"), tx * u64::from(PKT));
}

/// `xconnect:A,B` between two virtio-user testpmds: instance 1 (on A) runs `txonly`
/// for ~1 s, instance 2 (on B, started first) runs `rxonly`. Backpressure means that
/// nothing is lost: every frame instance 1 placed in its TX ring reaches instance 2.
/// Both forwarding lcores share cpu 0 (correctness only, not speed).
#[test]
fn dpdk_xconnect_two_instances() {
    xconnect_two_instances("", "");
}

/// [`dpdk_xconnect_two_instances`] with A on packed rings and B on split rings: frames
/// go from a packed transmit ring into a split receive ring in one burst.
#[test]
fn dpdk_xconnect_packed_into_split() {
    xconnect_two_instances(PACKED_ANY_ORDER, "");
}

fn xconnect_two_instances(devargs_a: &str, devargs_b: &str) {
    let _serial = serial();
    let dir = TempDir::new("dpdk-xc");
    let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
    let xc = format!("xconnect:{},{}", sa.display(), sb.display());
    let backend = Backend::start(&["--port", &xc, "--cores", BACKEND_CPU]);
    let mut rx_side = virtio_user_with(&sb, devargs_b, &["--no-flush-rx"]);
    let mut tx_side = virtio_user_with(&sa, devargs_a, &[]);
    backend.wait_stats(Duration::from_secs(10), |s| {
        [&sa, &sb].iter().all(|p| device(s, p).get("connected").and_then(Value::as_bool) == Some(true))
    });

    rx_side.cmd("set fwd rxonly");
    rx_side.cmd("start");
    assert!(rx_side.wait_log("rxonly packet forwarding - ports", Duration::from_secs(5)));
    tx_side.cmd("set fwd txonly");
    tx_side.cmd("start");
    thread::sleep(Duration::from_secs(1));
    stop_forwarding(&mut tx_side);
    if !devargs_a.is_empty() || !devargs_b.is_empty() {
        let log = backend.log();
        for (sock, devargs) in [(&sa, devargs_a), (&sb, devargs_b)] {
            let want = format!("{}: features", sock.display());
            let line = log
                .lines()
                .find(|l| l.contains(&want) && l.contains("acked"))
                .unwrap_or_else(|| panic!("no negotiation for {sock:?}:\n{log}"));
            assert!(line.contains(&format!("({} rings)", expected_rings(devargs))), "{line}");
        }
    }
    // The backend keeps draining A's TX ring into B while instance 2 keeps receiving.
    wait_stable(&backend, |s| {
        vec![counter(device(s, &sa), "rx_packets"), counter(device(s, &sb), "tx_packets")]
    });
    thread::sleep(Duration::from_millis(300));
    stop_forwarding(&mut rx_side);
    let sent = tx_side.quit();
    let received = rx_side.quit();
    let fin = backend.stop();
    let (da, db) = (device(&fin, &sa), device(&fin, &sb));
    show("xconnect instance 1 (A)", &sent, da);
    show("xconnect instance 2 (B)", &received, db);

    assert!(sent.tx_packets > 0, "instance 1 sent nothing: {sent:?}");
    assert_eq!(counter(da, "rx_packets"), sent.tx_packets, "A rx == instance-1 TX");
    assert_eq!(counter(db, "tx_packets"), counter(da, "rx_packets"), "B tx == A rx");
    assert_eq!(received.rx_packets, counter(db, "tx_packets"), "instance-2 RX == B tx");
    assert_eq!(received.rx_dropped, 0);
    assert_eq!((sent.rx_packets, received.tx_packets), (0, 0), "nothing flows B -> A");
    assert_eq!(counter(da, "tx_packets"), 0);
    assert_eq!(counter(db, "rx_packets"), 0);
    assert_eq!(total_drops(da), 0, "A dropped frames: {da}");
    assert_eq!(total_drops(db), 0, "B dropped frames: {db}");
}

/// Lifecycle: a front-end that quits resets its device, and the backend serves the next
/// one on the same socket. Two testpmd instances in turn send into one `sink`; the
/// backend's count is exactly the sum of their TX counts.
#[test]
fn dpdk_reconnect_after_quit() {
    let _serial = serial();
    let dir = TempDir::new("dpdk-reconnect");
    let sock = dir.join("sink.sock");
    let backend = Backend::start(&["--port", &port("sink", &sock), "--cores", BACKEND_CPU]);
    let mut sent = 0;
    for round in 0..2 {
        let mut pmd = virtio_user(&sock, &[]);
        wait_connected(&backend, &sock);
        pmd.cmd("set fwd txonly");
        pmd.cmd("start");
        thread::sleep(Duration::from_secs(1));
        stop_forwarding(&mut pmd);
        let want = sent;
        wait_stable(&backend, |s| vec![counter(device(s, &sock), "rx_packets")]);
        let dpdk = pmd.quit();
        assert!(dpdk.tx_packets > 0, "round {round}: testpmd sent nothing");
        sent = want + dpdk.tx_packets;
        backend.wait_stats(Duration::from_secs(10), |s| {
            device(s, &sock).get("connected").and_then(Value::as_bool) == Some(false)
        });
    }
    let fin = backend.stop();
    let dev = device(&fin, &sock);
    assert_eq!(counter(dev, "rx_packets"), sent, "sink rx == sum of both instances' TX: {dev}");
    assert_eq!(total_drops(dev), 0);
    assert_eq!(dev["broken_queues"].as_u64(), Some(0));
}

/// `--client`: DPDK's virtio-user listens (`server=1`) and our backend connects to it;
/// txonly into a `sink` with exact counts.
#[test]
fn dpdk_server_mode_backend_client() {
    let _serial = serial();
    let dir = TempDir::new("dpdk-client");
    let sock = dir.join("srv.sock");
    // In server mode testpmd blocks during start-up until a back-end connects, so it
    // starts on its own thread while we wait for its socket and connect the backend.
    let path = sock.clone();
    let starting = thread::spawn(move || {
        Testpmd::start_with_devargs(Role::VirtioUser { path, queues: 1 }, "server=1", PKT, DPDK_FWD_CPU, &[])
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sock.exists() {
        assert!(Instant::now() < deadline && !starting.is_finished(), "testpmd did not create {sock:?}");
        thread::sleep(Duration::from_millis(50));
    }
    let backend = Backend::start(&["--client", "--port", &port("sink", &sock), "--cores", BACKEND_CPU]);
    let mut pmd = starting.join().expect("testpmd start-up");
    wait_connected(&backend, &sock);
    // Give DPDK a moment to finish setting up its rings over the new connection.
    thread::sleep(Duration::from_millis(500));
    pmd.cmd("set fwd txonly");
    pmd.cmd("start");
    thread::sleep(Duration::from_secs(1));
    stop_forwarding(&mut pmd);
    wait_stable(&backend, |s| vec![counter(device(s, &sock), "rx_packets")]);
    let dpdk = pmd.quit();
    let fin = backend.stop();
    let dev = device(&fin, &sock);
    show("client", &dpdk, dev);
    assert!(dpdk.tx_packets > 0, "testpmd sent nothing: {dpdk:?}");
    assert_eq!(counter(dev, "rx_packets"), dpdk.tx_packets, "sink rx == DPDK TX");
    assert_eq!(total_drops(dev), 0);
}
