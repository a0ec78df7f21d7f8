//! Our driver (`vnet-driver`, in this test process, virtio-user mode) against our
//! `host-backend` (a child process whose busy-poll worker is pinned to cpu 1).
//!
//! Each test takes the cross-binary [`serial`] lock, bounds every wait, and checks exact
//! counts on both sides: the driver's `Port::stats()` and the backend's JSON stats, plus
//! the bytes of every frame where the test can know them.
//!
//! Direction names in the backend stats are the device's: `rx_*` = frames the driver
//! transmitted, `tx_*` = frames delivered into the driver's receive queue.

mod driver_common;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use driver::{Error, Packet, PortConfig, QueuePair};
use serde_json::Value;
use vnet_tests::harness::{counter, device, serial, total_drops, Backend, TempDir};

use driver_common::{close, drain_tx, frame, frame_len, ipv4_checksum, open, seq_of, Sender, BURST};

/// Frames per traffic test.
const N: u64 = 100_000;
/// Upper bound for one test's traffic phase.
const TRAFFIC_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to keep polling after the expected count, to catch extra frames.
const QUIET: Duration = Duration::from_millis(300);
/// The backend's default device MAC and MTU.
const BACKEND_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const BACKEND_MTU: u16 = 1500;

fn port(kind: &str, sock: &Path) -> String {
    format!("{kind}:{}", sock.display())
}

fn start_backend(kind: &str, sock: &Path, extra: &[&str]) -> Backend {
    let spec = port(kind, sock);
    let mut args = vec!["--port", &spec, "--cores", "1"];
    args.extend_from_slice(extra);
    Backend::start(&args)
}

/// Opens a port with default settings on `sock` and checks what the backend reports.
fn open_default(sock: &Path) -> driver::Port {
    let port = open(PortConfig::virtio_user(sock)).unwrap_or_else(|e| panic!("Port::open({sock:?}): {e}"));
    let info = port.info();
    assert_eq!(info.mac, BACKEND_MAC, "MAC from config space: {info:?}");
    assert_eq!(info.mtu, BACKEND_MTU, "MTU from config space: {info:?}");
    assert!(info.link_up, "link down: {info:?}");
    assert_eq!((info.queue_pairs, info.ring_size), (1, 256));
    port
}

/// Checks the backend's device object: no broken queue, no drop.
fn check_clean(dev: &Value) {
    assert_eq!(dev["broken_queues"].as_u64(), Some(0), "broken queues: {dev}");
    assert_eq!(total_drops(dev), 0, "backend dropped frames: {dev}");
}

/// `sink`: 100 000 valid UDP/IPv4 frames of 60..=1514 bytes; the backend counts exactly
/// that many frames and bytes, the driver exactly that many transmitted, and every
/// buffer is back in the pool after close.
#[test]
fn sink_counts_every_frame_and_byte() {
    sink_counts(&[]);
}

/// [`sink_counts_every_frame_and_byte`] with `--sink-read` (every frame copied out of
/// guest memory, as DPDK's rxonly does): the same exact counts.
#[test]
fn sink_read_counts_every_frame_and_byte() {
    sink_counts(&["--sink-read"]);
}

fn sink_counts(extra: &[&str]) {
    let _serial = serial();
    let dir = TempDir::new("drv-sink");
    let sock = dir.join("sink.sock");
    let backend = start_backend("sink", &sock, extra);
    let mut port = open_default(&sock);
    let mut qp = port.queue_pair(0).expect("queue pair 0");
    let pool = port.pool().clone();

    let deadline = Instant::now() + TRAFFIC_TIMEOUT;
    let mut sender = Sender::new(N);
    sender.send_all(&pool, &mut qp.tx, deadline);
    drain_tx(&mut qp.tx, deadline);
    let want_bytes = Sender::total_bytes(N);
    assert_eq!(sender.bytes, want_bytes);

    let s = backend.wait_stats(TRAFFIC_TIMEOUT, |s| counter(device(s, &sock), "rx_packets") >= N);
    let dev = device(&s, &sock);
    assert_eq!(counter(dev, "rx_packets"), N, "sink rx_packets: {dev}");
    assert_eq!(counter(dev, "rx_bytes"), want_bytes, "sink rx_bytes: {dev}");

    let st = port.stats();
    eprintln!("sink: driver {st:?}, sender handed back {} times", sender.handed_back);
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].tx_packets, N, "driver tx_packets");
    assert_eq!(st[0].tx_bytes, want_bytes, "driver tx_bytes");
    assert_eq!(st[0].device_errors, 0);
    assert_eq!((st[0].rx_packets, st[0].rx_errors), (0, 0));
    assert_eq!(qp.tx.error(), None);

    let (avail, cap) = close(port, vec![qp]);
    assert_eq!(avail, cap, "every buffer back in the pool after close");

    let fin = backend.stop();
    let dev = device(&fin, &sock);
    eprintln!("sink: backend {dev}");
    assert_eq!(counter(dev, "rx_packets"), N);
    assert_eq!(counter(dev, "rx_bytes"), want_bytes);
    assert_eq!(counter(dev, "tx_packets"), 0);
    check_clean(dev);
}

/// Checks one generated frame (host-backend `udp_frame`): 128 bytes to our MAC from
/// 02:00:00:00:00:01, 10.0.0.1:9 -> 10.0.0.2:9 with a valid IPv4 checksum, "VNET" and
/// the little-endian sequence number at 42, then byte i (from 54) == i as u8.
fn check_gen_frame(f: &[u8], seq: u64, mac: [u8; 6]) {
    const LEN: usize = 128;
    assert_eq!(f.len(), LEN, "frame {seq}: length");
    assert_eq!(&f[0..6], &mac, "frame {seq}: destination MAC");
    assert_eq!(&f[6..12], &[0x02, 0, 0, 0, 0, 0x01], "frame {seq}: source MAC");
    assert_eq!(&f[12..14], &[0x08, 0x00], "frame {seq}: ethertype");
    assert_eq!(f[14], 0x45, "frame {seq}: IPv4 version/IHL");
    assert_eq!(u16::from_be_bytes([f[16], f[17]]) as usize, LEN - 14, "frame {seq}: IPv4 length");
    assert_eq!(f[23], 17, "frame {seq}: UDP");
    assert_eq!(ipv4_checksum(&f[14..34]), 0, "frame {seq}: IPv4 checksum");
    assert_eq!(&f[26..34], &[10, 0, 0, 1, 10, 0, 0, 2], "frame {seq}: addresses");
    assert_eq!(u16::from_be_bytes([f[38], f[39]]) as usize, LEN - 34, "frame {seq}: UDP length");
    assert_eq!(&f[42..46], b"VNET", "frame {seq}: magic");
    let got = u64::from_le_bytes(f[46..54].try_into().unwrap());
    assert_eq!(got, seq, "sequence numbers are 0..N in order");
    for (i, &b) in f[54..].iter().enumerate() {
        assert_eq!(b, i as u8, "frame {seq}: payload byte {i} after offset 54");
    }
}

/// `gen --count N --pkt-size 128`: the driver receives exactly N frames, in sequence
/// order 0..N, each byte as the generator builds it; nothing more arrives.
#[test]
fn gen_delivers_exact_sequence() {
    let _serial = serial();
    let dir = TempDir::new("drv-gen");
    let sock = dir.join("gen.sock");
    let count = N.to_string();
    let backend = start_backend("gen", &sock, &["--count", &count, "--pkt-size", "128"]);
    let mut port = open_default(&sock);
    let mac = port.info().mac;
    let mut qp = port.queue_pair(0).expect("queue pair 0");

    let mut batch: Vec<Packet> = Vec::with_capacity(BURST);
    let mut next = 0u64;
    let deadline = Instant::now() + TRAFFIC_TIMEOUT;
    let mut quiet_until: Option<Instant> = None;
    loop {
        if qp.rx.rx_burst(&mut batch, BURST) > 0 {
            for p in batch.drain(..) {
                assert!(next < N, "frame beyond the {N} generated: {:?}", &p.data()[..54.min(p.len())]);
                check_gen_frame(p.data(), next, mac);
                next += 1;
            }
        }
        let now = Instant::now();
        if next == N {
            // Keep polling a little: an extra frame would fail the assert above.
            match quiet_until {
                None => quiet_until = Some(now + QUIET),
                Some(t) if now >= t => break,
                Some(_) => {}
            }
        }
        assert!(
            now < deadline,
            "received {next} of {N} generated frames before the deadline (rx error {:?}); backend: {:?}",
            qp.rx.error(),
            backend.latest_stats()
        );
    }

    let st = port.stats();
    eprintln!("gen: driver {st:?}");
    assert_eq!(st[0].rx_packets, N, "driver rx_packets");
    assert_eq!(st[0].rx_bytes, N * 128, "driver rx_bytes");
    assert_eq!((st[0].rx_errors, st[0].device_errors, st[0].tx_packets), (0, 0, 0));
    assert_eq!(qp.rx.error(), None);

    let s = backend.wait_stats(Duration::from_secs(10), |s| counter(device(s, &sock), "tx_packets") >= N);
    assert_eq!(counter(device(&s, &sock), "tx_packets"), N);
    let (avail, cap) = close(port, vec![qp]);
    assert_eq!(avail, cap, "every buffer back in the pool after close");

    let fin = backend.stop();
    let dev = device(&fin, &sock);
    eprintln!("gen: backend {dev}");
    assert_eq!(counter(dev, "tx_packets"), N, "backend tx_packets");
    assert_eq!(counter(dev, "tx_bytes"), N * 128, "backend tx_bytes");
    assert_eq!(counter(dev, "generated"), N, "generated = delivered, nothing dropped");
    assert_eq!(counter(dev, "rx_packets"), 0);
    check_clean(dev);
}

/// What `reflect --swap-mac` returns for our frame `seq`.
fn reflected(seq: u64) -> Vec<u8> {
    let mut f = frame(seq);
    let (dst, src) = f.split_at_mut(6);
    dst.swap_with_slice(&mut src[..6]);
    f
}

/// Checks received packets in order: each must be the reflection of frame `*next`.
fn check_reflected(batch: &mut Vec<Packet>, next: &mut u64) {
    for p in batch.drain(..) {
        let d = p.data();
        let seq =
            seq_of(d).unwrap_or_else(|| panic!("not one of our frames: {:02x?}", &d[..d.len().min(64)]));
        assert_eq!(seq, *next, "frames come back in the order sent, none lost or duplicated");
        assert!(seq < N, "frame {seq} beyond the {N} sent");
        assert_eq!(d.len(), frame_len(seq), "frame {seq}: length");
        let want = reflected(seq);
        if d != &want[..] {
            let at = d.iter().zip(&want).position(|(a, b)| a != b).unwrap_or(0);
            panic!("frame {seq}: byte {at} differs: got {:02x?}, want {:02x?}", &d[at..], &want[at..]);
        }
        *next += 1;
    }
}

/// Checks both sides' counters after a reflect run of N frames, closes the port (every
/// buffer back in the pool) and stops the backend.
fn finish_reflect(port: driver::Port, qp: QueuePair, backend: Backend, sock: &Path, what: &str) {
    let bytes = Sender::total_bytes(N);
    let st = port.stats();
    eprintln!("{what}: driver {st:?}");
    assert_eq!((st[0].tx_packets, st[0].tx_bytes), (N, bytes), "driver tx");
    assert_eq!((st[0].rx_packets, st[0].rx_bytes), (N, bytes), "driver rx");
    assert_eq!((st[0].rx_errors, st[0].device_errors), (0, 0));
    assert_eq!((qp.rx.error(), qp.tx.error()), (None, None));
    backend.wait_stats(Duration::from_secs(10), |s| counter(device(s, sock), "tx_packets") >= N);
    let (avail, cap) = close(port, vec![qp]);
    assert_eq!(avail, cap, "every buffer back in the pool after close");
    let fin = backend.stop();
    let dev = device(&fin, sock);
    eprintln!("{what}: backend {dev}");
    assert_eq!((counter(dev, "rx_packets"), counter(dev, "rx_bytes")), (N, bytes), "backend rx");
    assert_eq!((counter(dev, "tx_packets"), counter(dev, "tx_bytes")), (N, bytes), "backend tx");
    check_clean(dev);
}

/// `reflect --swap-mac`, one thread: N distinct frames out, the same N back in order,
/// each equal byte for byte to what was sent with the MAC addresses swapped. The backend
/// offers `VIRTIO_F_IN_ORDER` and the driver takes it by default.
#[test]
fn reflect_swap_mac_returns_every_frame() {
    reflect_one_thread(true, false);
}

/// As above on packed rings (`PortConfig::packed`, testpmd's `packed_vq=1`): both sides'
/// packed engines, in order; the control queue (a packed ring too) answers a command.
#[test]
fn reflect_swap_mac_returns_every_frame_packed() {
    reflect_one_thread(true, true);
}

/// Packed rings without `VIRTIO_F_IN_ORDER`: the driver's free list of buffer ids.
#[test]
fn reflect_swap_mac_returns_every_frame_packed_without_in_order() {
    reflect_one_thread(false, true);
}

/// As above with `VIRTIO_F_IN_ORDER` left out (DPDK's `in_order=0`): the driver's
/// any-order bookkeeping (free stack, every used element read).
#[test]
fn reflect_swap_mac_returns_every_frame_without_in_order() {
    reflect_one_thread(false, false);
}

/// `PortConfig::packed_if_offered` (testpmd's default for `-a` ports, as DPDK's virtio
/// PMD on PCI): packed rings when the device offers `VIRTIO_F_RING_PACKED`, split rings
/// when it does not (`--no-packed`); `PortInfo::packed` and the backend agree, and
/// 1000 frames reach the sink on either layout.
#[test]
fn packed_if_offered_follows_the_device() {
    const N: u64 = 1000;
    let _serial = serial();
    let dir = TempDir::new("drv-packed-if-offered");
    let sock = dir.join("sink.sock");
    let packed_bit = driver::layout::features::bit(driver::layout::features::RING_PACKED);
    for (extra, packed) in [(&[][..], true), (&["--no-packed"][..], false)] {
        let backend = start_backend("sink", &sock, extra);
        let cfg = PortConfig { packed_if_offered: true, ..PortConfig::virtio_user(&sock) };
        let mut port = open(cfg).unwrap_or_else(|e| panic!("Port::open {extra:?}: {e}"));
        let info = port.info().clone();
        assert_eq!(info.packed, packed, "backend {extra:?}: {info:?}");
        assert_eq!(info.features & packed_bit != 0, packed, "backend {extra:?}: {info:?}");
        let rings = if packed { "(packed rings)" } else { "(split rings)" };
        assert!(backend.log().contains(rings), "backend {extra:?} did not log {rings}:\n{}", backend.log());
        let mut qp = port.queue_pair(0).expect("queue pair 0");
        let deadline = Instant::now() + TRAFFIC_TIMEOUT;
        let mut sender = Sender::new(N);
        sender.send_all(port.pool(), &mut qp.tx, deadline);
        drain_tx(&mut qp.tx, deadline);
        let s = backend.wait_stats(TRAFFIC_TIMEOUT, |s| counter(device(s, &sock), "rx_packets") >= N);
        assert_eq!(counter(device(&s, &sock), "rx_packets"), N, "backend {extra:?}");
        assert_eq!(port.stats()[0].tx_packets, N, "backend {extra:?}");
        let (avail, cap) = close(port, vec![qp]);
        assert_eq!(avail, cap, "every buffer back in the pool after close");
        check_clean(device(&backend.stop(), &sock));
    }
}

fn reflect_one_thread(in_order: bool, packed: bool) {
    let _serial = serial();
    let dir = TempDir::new("drv-reflect");
    let sock = dir.join("reflect.sock");
    let backend = start_backend("reflect", &sock, &["--swap-mac"]);
    let in_order_bit = driver::layout::features::bit(driver::layout::features::IN_ORDER);
    let mut cfg = PortConfig::virtio_user(&sock);
    if !in_order {
        cfg.features &= !in_order_bit;
    }
    cfg.packed = packed;
    let mut port = open(cfg).unwrap_or_else(|e| panic!("Port::open({sock:?}): {e}"));
    assert_eq!(
        port.info().features & in_order_bit != 0,
        in_order,
        "IN_ORDER negotiated: {:#x}",
        port.info().features
    );
    let packed_bit = driver::layout::features::bit(driver::layout::features::RING_PACKED);
    assert_eq!(
        port.info().features & packed_bit != 0,
        packed,
        "RING_PACKED negotiated: {:#x}",
        port.info().features
    );
    if packed {
        // The control queue is a packed ring too: a command round trip through it.
        port.control().set_promisc(true).expect("set_promisc over a packed control queue");
    }
    let mut qp = port.queue_pair(0).expect("queue pair 0");
    let pool = port.pool().clone();

    let deadline = Instant::now() + TRAFFIC_TIMEOUT;
    let mut sender = Sender::new(N);
    let mut batch: Vec<Packet> = Vec::with_capacity(BURST);
    let mut next = 0u64;
    while next < N {
        if !sender.done() {
            sender.pump(&pool, &mut qp.tx);
        }
        if qp.rx.rx_burst(&mut batch, BURST) > 0 {
            check_reflected(&mut batch, &mut next);
        }
        assert!(
            Instant::now() < deadline,
            "sent {} and received {next} of {N} before the deadline (rx error {:?}, tx error {:?}); \
             backend: {:?}",
            sender.queued,
            qp.rx.error(),
            qp.tx.error(),
            backend.latest_stats()
        );
    }
    // Nothing more comes back.
    let quiet = Instant::now() + QUIET;
    while Instant::now() < quiet {
        assert_eq!(qp.rx.rx_burst(&mut batch, BURST), 0, "extra frame: {batch:?}");
    }
    drain_tx(&mut qp.tx, deadline);
    eprintln!("reflect: tx_burst handed back frames {} times", sender.handed_back);
    finish_reflect(port, qp, backend, &sock, "reflect");
}

/// `reflect --swap-mac` with the receive and transmit halves of the queue pair on two
/// threads (each half is `Send`, used through `&mut` and shares no lock with the other).
#[test]
fn reflect_swap_mac_rx_and_tx_on_two_threads() {
    let _serial = serial();
    let dir = TempDir::new("drv-reflect2");
    let sock = dir.join("reflect.sock");
    let backend = start_backend("reflect", &sock, &["--swap-mac"]);
    let mut port = open_default(&sock);
    let QueuePair { index, rx, tx } = port.queue_pair(0).expect("queue pair 0");
    let pool = port.pool().clone();
    let deadline = Instant::now() + TRAFFIC_TIMEOUT;

    let tx_thread = thread::Builder::new()
        .name("driver-tx".into())
        .spawn(move || {
            let mut tx = tx;
            let mut sender = Sender::new(N);
            sender.send_all(&pool, &mut tx, deadline);
            drain_tx(&mut tx, deadline);
            (tx, sender.queued, sender.handed_back)
        })
        .expect("spawn tx thread");
    let rx_thread = thread::Builder::new()
        .name("driver-rx".into())
        .spawn(move || {
            let mut rx = rx;
            let mut batch: Vec<Packet> = Vec::with_capacity(BURST);
            let mut next = 0u64;
            while next < N {
                if rx.rx_burst(&mut batch, BURST) > 0 {
                    check_reflected(&mut batch, &mut next);
                }
                assert!(
                    Instant::now() < deadline,
                    "received {next} of {N} before the deadline (rx error {:?})",
                    rx.error()
                );
            }
            let quiet = Instant::now() + QUIET;
            while Instant::now() < quiet {
                assert_eq!(rx.rx_burst(&mut batch, BURST), 0, "extra frame: {batch:?}");
            }
            (rx, next)
        })
        .expect("spawn rx thread");
    // Join both before judging either, so neither thread outlives the test body.
    let tx_res = tx_thread.join();
    let rx_res = rx_thread.join();
    let (tx, queued, handed_back) = tx_res.unwrap_or_else(|p| std::panic::resume_unwind(p));
    let (rx, received) = rx_res.unwrap_or_else(|p| std::panic::resume_unwind(p));
    eprintln!("reflect (2 threads): queued {queued}, received {received}, handed back {handed_back} times");
    assert_eq!((queued, received), (N, N));
    finish_reflect(port, QueuePair { index, rx, tx }, backend, &sock, "reflect (2 threads)");
}

/// `Port::open` on a path where nothing listens: `Error::Connect` naming the path.
#[test]
fn open_missing_socket_is_a_connect_error() {
    let _serial = serial();
    let dir = TempDir::new("drv-missing");
    let sock = dir.join("nobody-listens.sock");
    let err = open(PortConfig::virtio_user(&sock)).err().expect("open on a missing socket must fail");
    match &err {
        Error::Connect { path, .. } => assert_eq!(path, &sock),
        other => panic!("expected Error::Connect, got {other:?}"),
    }
    let msg = err.to_string();
    assert!(msg.contains(&sock.display().to_string()), "the message names the path: {msg}");

    // A path that exists but is no socket.
    let file = dir.join("plain-file");
    std::fs::write(&file, b"").expect("create a plain file");
    let err = open(PortConfig::virtio_user(&file)).err().expect("open on a plain file must fail");
    assert!(matches!(&err, Error::Connect { path, .. } if path == &file), "{err:?}");
    assert!(err.to_string().contains(&file.display().to_string()), "{err}");
}

/// Configuration values the driver refuses before it connects.
#[test]
fn open_rejects_bad_configuration() {
    let _serial = serial();
    let dir = TempDir::new("drv-badcfg");
    // No back-end: the checks come before the connection (a Connect error would show
    // that a check was skipped).
    let sock = dir.join("none.sock");
    let base = || PortConfig::virtio_user(&sock);
    let cases: Vec<(&str, PortConfig, &str)> = vec![
        ("ring_size 100", PortConfig { ring_size: 100, ..base() }, "ring size 100"),
        ("ring_size 0", PortConfig { ring_size: 0, ..base() }, "ring size 0"),
        (
            "ring_size 100, packed only if offered",
            PortConfig { ring_size: 100, packed_if_offered: true, ..base() },
            "ring size 100",
        ),
        ("queue_pairs 0", PortConfig { queue_pairs: 0, ..base() }, "queue pair"),
        ("too few buffers", PortConfig { buffers: Some(100), ..base() }, "100 buffers"),
        ("buf_size not a multiple of 64", PortConfig { buf_size: 2000, ..base() }, "2000"),
        ("headroom below the header", PortConfig { headroom: 8, ..base() }, "headroom 8"),
    ];
    for (what, cfg, needle) in cases {
        let err = open(cfg).err().unwrap_or_else(|| panic!("{what}: open succeeded"));
        assert!(matches!(err, Error::Config(_)), "{what}: expected Error::Config, got {err:?}");
        let msg = err.to_string();
        assert!(msg.contains(needle), "{what}: message {msg:?} does not mention {needle:?}");
    }
}

/// Buffers that cannot hold an MTU-sized frame (MTU + 14) are refused with an error that
/// says so, whether the buffers are small or the device's MTU is large; the refused
/// attempts leave the back-end serving, and a port with room enough then opens.
#[test]
fn open_rejects_buffers_below_mtu() {
    let _serial = serial();
    let dir = TempDir::new("drv-mtu");
    let sock = dir.join("sink.sock");

    // Default MTU 1500: 1024-byte buffers with 256 headroom and 64 tailroom hold 704.
    {
        let backend = start_backend("sink", &sock, &[]);
        let cfg = PortConfig { buf_size: 1024, ..PortConfig::virtio_user(&sock) };
        let err = open(cfg).err().expect("1024-byte buffers cannot hold a 1514-byte frame");
        assert!(matches!(err, Error::Config(_)), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("704-byte frames") && msg.contains("MTU 1500 + 14"), "{msg}");
        // Tailroom eating the room: 2304 - 256 - 600 = 1448 < 1514.
        let cfg = PortConfig { tailroom: 600, ..PortConfig::virtio_user(&sock) };
        let err = open(cfg).err().expect("600 bytes of tailroom leave too little room");
        assert!(err.to_string().contains("1448-byte frames"), "{err}");
        // The back-end still serves.
        let port = open_default(&sock);
        // Pairs never taken go back with the port: every buffer returns.
        let (avail, cap) = close(port, Vec::new());
        assert_eq!(avail, cap);
        let fin = backend.stop();
        check_clean(device(&fin, &sock));
    }

    // MTU 9000 from config space: the default 2304-byte buffers hold 1984-byte frames.
    let backend = start_backend("sink", &sock, &["--mtu", "9000"]);
    let err = open(PortConfig::virtio_user(&sock)).err().expect("default buffers cannot hold 9014 bytes");
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("1984-byte frames") && msg.contains("MTU 9000 + 14"), "{msg}");
    // 9600-byte buffers: 9600 - 256 - 64 = 9280 >= 9014.
    let cfg = PortConfig { buf_size: 9600, buffers: Some(512), ..PortConfig::virtio_user(&sock) };
    let mut port = open(cfg).unwrap_or_else(|e| panic!("open with 9600-byte buffers: {e}"));
    assert_eq!(port.info().mtu, 9000);
    // One jumbo frame goes through.
    let mut qp = port.queue_pair(0).expect("queue pair 0");
    let mut pkt = port.pool().alloc().expect("a buffer");
    let mut jumbo = frame(0);
    jumbo.resize(9014, 0xa5);
    pkt.set_data(&jumbo).expect("9014 bytes fit");
    let mut v = vec![pkt];
    assert_eq!(qp.tx.tx_burst(&mut v), 1);
    drain_tx(&mut qp.tx, Instant::now() + Duration::from_secs(10));
    let s = backend.wait_stats(Duration::from_secs(10), |s| counter(device(s, &sock), "rx_packets") >= 1);
    assert_eq!(counter(device(&s, &sock), "rx_bytes"), 9014);
    let (avail, cap) = close(port, vec![qp]);
    assert_eq!(avail, cap);
    let fin = backend.stop();
    let dev = device(&fin, &sock);
    assert_eq!(counter(dev, "rx_packets"), 1);
    check_clean(dev);
}

/// `PortConfig::mtu` (DPDK's `rte_eth_dev_set_mtu`, testpmd's `--max-pkt-len`): a port
/// runs at the MTU asked for when the device carries it, and the open fails with a
/// message naming the range when it does not (above the MTU the device reports, or
/// below 68); the back-end keeps serving.
#[test]
fn open_sets_the_mtu_asked_for_within_the_devices() {
    let _serial = serial();
    let dir = TempDir::new("drv-setmtu");
    let sock = dir.join("sink.sock");
    let backend = start_backend("sink", &sock, &[]);
    for (mtu, needle) in [(9000u16, "MTU 9000 asked for: this device carries 68..=1500"), (60, "68..=1500")] {
        let cfg = PortConfig { mtu: Some(mtu), ..PortConfig::virtio_user(&sock) };
        let err = open(cfg).err().unwrap_or_else(|| panic!("MTU {mtu}: open succeeded"));
        assert!(matches!(err, Error::Config(_)), "{err:?}");
        assert!(err.to_string().contains(needle), "{err}");
    }
    let port = open(PortConfig { mtu: Some(1400), ..PortConfig::virtio_user(&sock) }).expect("MTU 1400");
    assert_eq!(port.info().mtu, 1400);
    let (avail, cap) = close(port, Vec::new());
    assert_eq!(avail, cap);
    let fin = backend.stop();
    check_clean(device(&fin, &sock));
}

/// CPU time (user + system clock ticks) of the backend's data worker thread so far.
fn worker_ticks(backend: &Backend) -> u64 {
    let dir = format!("/proc/{}/task", backend.pid());
    for t in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")).flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != "vnet-worker-0" {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).expect("task stat");
        // Fields after the ")" that ends the command name: utime and stime are 14 and 15.
        let f: Vec<&str> = stat.rsplit_once(')').expect("stat format").1.split_whitespace().collect();
        return f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    }
    panic!("no vnet-worker-0 thread in {dir}");
}

/// `reflect` with its default `--poll-us 50`: a worker sleeps once its source ring has
/// had nothing for 50 µs, even though the driver keeps receive buffers posted (those are
/// no work by themselves: counted as work, they kept forwarding workers spinning for
/// ever), and the driver's kick wakes it. Two bursts of 32 frames with an idle second
/// between them: every frame comes back exactly once, and over the idle second the
/// worker used a small part of its core (a spinning worker uses all of it).
#[test]
fn an_idle_reflect_worker_sleeps_and_wakes_on_the_next_frame() {
    const ROUND: u64 = BURST as u64;
    let _serial = serial();
    let dir = TempDir::new("drv-reflect-sleep");
    let sock = dir.join("reflect.sock");
    let backend = start_backend("reflect", &sock, &["--swap-mac", "--poll-us", "50"]);
    let mut port = open(PortConfig::virtio_user(&sock)).unwrap_or_else(|e| panic!("Port::open: {e}"));
    let mut qp = port.queue_pair(0).expect("queue pair 0");
    let pool = port.pool().clone();
    let mut batch: Vec<Packet> = Vec::with_capacity(BURST);
    let mut sender = Sender::new(2 * ROUND);
    let mut next = 0u64;
    // SAFETY: sysconf reads a configuration value; no pointers.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    let mut idle_share = Vec::new();
    for round in 1..=2u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        sender.total = round * ROUND;
        while next < round * ROUND {
            if !sender.done() {
                sender.pump(&pool, &mut qp.tx);
            }
            if qp.rx.rx_burst(&mut batch, BURST) > 0 {
                check_reflected(&mut batch, &mut next);
            }
            assert!(Instant::now() < deadline, "round {round}: {next} of {} back", round * ROUND);
        }
        qp.tx.reclaim();
        if round == 1 {
            // Idle: the driver posts its buffers and sends nothing.
            thread::sleep(Duration::from_millis(200));
            let (t0, c0) = (Instant::now(), worker_ticks(&backend));
            thread::sleep(Duration::from_secs(1));
            let ticks = worker_ticks(&backend) - c0;
            idle_share.push(ticks as f64 / (t0.elapsed().as_secs_f64() * tck as f64));
        }
    }
    eprintln!("reflect --poll-us 50: worker busy {:.1}% of an idle second", idle_share[0] * 100.0);
    assert!(
        idle_share[0] < 0.3,
        "the worker kept polling an idle device: {:.0}% of a core",
        idle_share[0] * 100.0
    );
    let quiet = Instant::now() + QUIET;
    while Instant::now() < quiet {
        assert_eq!(qp.rx.rx_burst(&mut batch, BURST), 0, "extra frame: {batch:?}");
    }
    drain_tx(&mut qp.tx, Instant::now() + Duration::from_secs(5));
    let (avail, cap) = close(port, vec![qp]);
    assert_eq!(avail, cap, "every buffer back in the pool after close");
    let fin = backend.stop();
    let dev = device(&fin, &sock);
    assert_eq!((counter(dev, "rx_packets"), counter(dev, "tx_packets")), (2 * ROUND, 2 * ROUND), "{dev}");
    check_clean(dev);
}
