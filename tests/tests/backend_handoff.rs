//! `host-backend --port xconnect:A,B --handoff --cores 0,1`: each device's rings on its
//! own worker, frames handed between the two workers through the batched pointer rings
//! (`host-backend/src/handoff.rs`). Two raw front-ends play the guests; every frame is
//! checked byte for byte and every count exactly, on both sides:
//!
//! * both directions at once, in order;
//! * backpressure: B has fewer receive buffers than A sends; the rest wait (in A's
//!   transmit ring and the handoff rings) and arrive once B posts more: nothing is lost;
//! * a peer that goes away: what A sends meanwhile is counted as `peer_down`, and traffic
//!   resumes when B comes back.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use vnet_tests::harness::{self, counter, total_drops, Backend, TempDir};
use vnet_tests::rawfront::RawFrontend;

const MEM: usize = 8 << 20;
const RING: u16 = 256;
const RX_BUF: u32 = 2048;
const IO: Duration = Duration::from_secs(10);
const STATS: Duration = Duration::from_secs(10);

use harness::test_frame as frame;

fn guest(sock: &Path) -> RawFrontend {
    let mut fe = RawFrontend::connect(sock, MEM, 0).unwrap_or_else(|e| panic!("connect {sock:?}: {e}"));
    for q in 0..2 {
        fe.setup_queue(q, RING).unwrap_or_else(|e| panic!("queue {q}: {e}"));
    }
    fe
}

fn start(dir: &TempDir) -> (Backend, std::path::PathBuf, std::path::PathBuf) {
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let port = format!("xconnect:{},{}", a.display(), b.display());
    let backend = Backend::start(&["--port", &port, "--handoff", "--cores", "0,1", "--poll-us", "0"]);
    (backend, a, b)
}

fn devs(backend: &Backend, a: &Path, b: &Path, pred: impl Fn(&Value, &Value) -> bool) -> (Value, Value) {
    let s = backend.wait_stats(STATS, |s| pred(harness::device(s, a), harness::device(s, b)));
    (harness::device(&s, a).clone(), harness::device(&s, b).clone())
}

/// Sends `frames` on `from` in bursts that fit its transmit ring.
fn send_all(from: &mut RawFrontend, frames: &[Vec<u8>]) {
    for chunk in frames.chunks(64) {
        from.wait_tx_done(1, IO).unwrap();
        from.send_frames(1, chunk).unwrap();
    }
}

#[test]
fn both_directions_arrive_in_order_byte_for_byte() {
    let _g = harness::serial();
    let dir = TempDir::new("handoff");
    let (backend, a, b) = start(&dir);
    let (mut ga, mut gb) = (guest(&a), guest(&b));
    const N: usize = 2000;
    let to_b: Vec<Vec<u8>> = (0..N).map(|i| frame(60 + i % 1400, i as u16)).collect();
    let to_a: Vec<Vec<u8>> = (0..N).map(|i| frame(1514 - i % 1400, 40000 + i as u16)).collect();
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    for (ca, cb) in to_b.chunks(200).zip(to_a.chunks(200)) {
        ga.post_rx_buffers(0, 200, RX_BUF).unwrap();
        gb.post_rx_buffers(0, 200, RX_BUF).unwrap();
        send_all(&mut ga, ca);
        send_all(&mut gb, cb);
        got_b.extend(gb.recv_frames(0, ca.len(), IO).unwrap());
        got_a.extend(ga.recv_frames(0, cb.len(), IO).unwrap());
    }
    assert!(got_b == to_b, "A -> B: frames differ or are out of order");
    assert!(got_a == to_a, "B -> A: frames differ or are out of order");
    let (da, db) = devs(&backend, &a, &b, |da, db| {
        counter(da, "tx_packets") == N as u64 && counter(db, "tx_packets") == N as u64
    });
    for d in [&da, &db] {
        assert_eq!(
            (counter(d, "rx_packets"), counter(d, "tx_packets"), total_drops(d)),
            (N as u64, N as u64, 0),
            "{d}"
        );
    }
}

#[test]
fn backpressure_holds_frames_until_buffers_arrive() {
    let _g = harness::serial();
    let dir = TempDir::new("handoff-bp");
    let (backend, a, b) = start(&dir);
    let (mut ga, mut gb) = (guest(&a), guest(&b));
    let frames: Vec<Vec<u8>> = (0..200).map(|i| frame(64 + i, i as u16)).collect();
    gb.post_rx_buffers(0, 16, RX_BUF).unwrap();
    ga.send_frames(1, &frames).unwrap();
    let mut got = gb.recv_frames(0, 16, IO).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(gb.poll_rx(0).unwrap().is_empty(), "more frames than receive buffers arrived");
    // The other 184 wait; none is dropped.
    let (da, db) = devs(&backend, &a, &b, |_, db| counter(db, "tx_packets") == 16);
    assert_eq!((total_drops(&da), total_drops(&db)), (0, 0), "{da}\n{db}");
    gb.post_rx_buffers(0, 184, RX_BUF).unwrap();
    got.extend(gb.recv_frames(0, 184, IO).unwrap());
    assert!(got == frames, "frames differ or are out of order after backpressure");
    ga.wait_tx_done(1, IO).unwrap();
    let (da, db) = devs(&backend, &a, &b, |_, db| counter(db, "tx_packets") == 200);
    assert_eq!((counter(&da, "rx_packets"), total_drops(&da), total_drops(&db)), (200, 0, 0), "{da}\n{db}");
}

#[test]
fn a_missing_peer_counts_peer_down_and_traffic_resumes() {
    let _g = harness::serial();
    let dir = TempDir::new("handoff-down");
    let (backend, a, b) = start(&dir);
    let mut ga = guest(&a);
    let lost: Vec<Vec<u8>> = (0..50).map(|i| frame(100, i)).collect();
    ga.send_frames(1, &lost).unwrap();
    ga.wait_tx_done(1, IO).unwrap();
    let (da, db) = devs(&backend, &a, &b, |_, db| counter(db, "drops.peer_down") == 50);
    assert_eq!((counter(&da, "rx_packets"), counter(&db, "tx_packets")), (50, 0), "{da}\n{db}");
    let mut gb = guest(&b);
    gb.post_rx_buffers(0, 64, RX_BUF).unwrap();
    let frames: Vec<Vec<u8>> = (0..64).map(|i| frame(200, 1000 + i)).collect();
    ga.send_frames(1, &frames).unwrap();
    assert!(gb.recv_frames(0, 64, IO).unwrap() == frames, "frames after the peer came back");
    let (_, db) = devs(&backend, &a, &b, |_, db| counter(db, "tx_packets") == 64);
    assert_eq!(counter(&db, "drops.peer_down"), 50, "{db}");
}

/// Frames handed over but not yet delivered when the backend stops (B posted no receive
/// buffers, so they wait between the workers) are accounted for in the final line: each
/// frame A's guest sent is B's `peer_down` drop, none is lost silently.
#[test]
fn frames_in_flight_at_shutdown_are_counted() {
    let _g = harness::serial();
    let dir = TempDir::new("handoff-stop");
    let (backend, a, b) = start(&dir);
    let (mut ga, _gb) = (guest(&a), guest(&b));
    const N: usize = 100;
    let frames: Vec<Vec<u8>> = (0..N).map(|i| frame(64, i as u16)).collect();
    send_all(&mut ga, &frames);
    ga.wait_tx_done(1, IO).unwrap();
    let (da, db) = devs(&backend, &a, &b, |da, _| counter(da, "rx_packets") == N as u64);
    assert_eq!((counter(&db, "tx_packets"), total_drops(&db)), (0, 0), "B holds them: {db}");
    let _ = da;
    let last = backend.stop();
    let (da, db) = (harness::device(&last, &a), harness::device(&last, &b));
    assert_eq!(counter(da, "rx_packets"), N as u64, "A: {da}");
    assert_eq!(counter(db, "tx_packets"), 0, "B: {db}");
    assert_eq!(counter(db, "drops.peer_down"), N as u64, "B: what was in flight at stop: {db}");
    assert_eq!(total_drops(db), N as u64, "B: {db}");
}
