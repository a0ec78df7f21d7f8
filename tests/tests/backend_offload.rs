//! Issue 17, the backend side: mergeable receive buffers, jumbo frames and host offloads
//! (checksum and segmentation) through `reflect` and `xconnect`, against front-ends we
//! control byte for byte ([`RawFrontend`]) and against DPDK's virtio-user.
//!
//! Every test takes the cross-binary [`serial`] lock, bounds every wait, stops every
//! process it started (the `Backend` and `Testpmd` guards kill theirs when a test
//! fails), and checks exact outcomes: frame counts on both sides, bytes equal, the
//! header fields the device wrote, and the drop reasons it counted.

use std::path::Path;
use std::time::Duration;

use driver::layout::{features, NET_HDR_LEN, NET_HDR_NUM_BUFFERS};
use serde_json::Value;
use vnet_tests::dpdk::{Role, Testpmd};
use vnet_tests::harness::{counter, device, serial, test_frame, total_drops, Backend, TempDir};
use vnet_tests::rawfront::RawFrontend;

/// Guest memory per raw front-end: rings, 64 receive buffers and the transmit buffers of
/// a few 64 KiB super-frames.
const MEM: usize = 16 << 20;
/// Ring size of the raw front-ends' queues.
const RING: u16 = 64;
/// Queue 0 of pair 0: the guest's receive queue; queue 1: its transmit queue.
const RX: u16 = 0;
const TX: u16 = 1;
/// Receive buffer of the raw front-ends (header included): what Linux's virtio-net
/// posts with mergeable buffers is of this order.
const RX_BUF: u32 = 2048;
/// Bound on every wait for the data path.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on a wait for a stats line.
const STATS_TIMEOUT: Duration = Duration::from_secs(10);

fn mrg() -> u64 {
    features::bit(features::NET_MRG_RXBUF)
}

fn port(kind: &str, sock: &Path) -> String {
    format!("{kind}:{}", sock.display())
}

/// A raw front-end on `sock` with `want` features, RX and TX of pair 0 set up and
/// `RING` receive buffers of `RX_BUF` bytes posted.
fn raw(sock: &Path, want: u64) -> RawFrontend {
    let mut fe = RawFrontend::connect(sock, MEM, want).unwrap_or_else(|e| panic!("connect {sock:?}: {e}"));
    fe.setup_queue(RX, RING).unwrap();
    fe.setup_queue(TX, RING).unwrap();
    fe.post_rx_buffers(RX, RING, RX_BUF).unwrap();
    fe
}

fn wait_connected(backend: &Backend, socks: &[&Path]) {
    backend.wait_stats(STATS_TIMEOUT, |s| {
        socks.iter().all(|p| device(s, p).get("connected").and_then(Value::as_bool) == Some(true))
    });
}

/// The 12-byte header's `num_buffers`.
fn num_buffers(hdr: &[u8]) -> u16 {
    u16::from_le_bytes([hdr[NET_HDR_NUM_BUFFERS], hdr[NET_HDR_NUM_BUFFERS + 1]])
}

/// Received packets reassembled from used receive buffers in used order (`bufs`: each
/// buffer's written bytes, the first of a packet starting with its net header), as a
/// mergeable-buffer driver does: `num_buffers` of the first says how many buffers the
/// packet spans. Returns `(header, frame, buffers)` per packet; a count that runs past
/// the buffers received is an error.
fn merge(bufs: Vec<Vec<u8>>) -> Result<Vec<([u8; NET_HDR_LEN], Vec<u8>, u16)>, String> {
    let mut out = Vec::new();
    let mut it = bufs.into_iter();
    while let Some(first) = it.next() {
        if first.len() < NET_HDR_LEN {
            return Err(format!("first buffer of {} bytes", first.len()));
        }
        let mut hdr = [0u8; NET_HDR_LEN];
        hdr.copy_from_slice(&first[..NET_HDR_LEN]);
        let n = num_buffers(&hdr);
        if n == 0 {
            return Err("num_buffers 0".into());
        }
        let mut frame = first[NET_HDR_LEN..].to_vec();
        for k in 1..n {
            let more = it.next().ok_or_else(|| format!("num_buffers {n}, buffer {k} missing"))?;
            frame.extend(more);
        }
        out.push((hdr, frame, n));
    }
    Ok(out)
}

/// Collects `n` packets from `fe`'s receive queue (merging buffers), at most `timeout`.
fn recv_merged(fe: &mut RawFrontend, n: usize) -> Vec<([u8; NET_HDR_LEN], Vec<u8>, u16)> {
    let deadline = std::time::Instant::now() + IO_TIMEOUT;
    let mut bufs = Vec::new();
    loop {
        bufs.extend(fe.poll_rx_buffers(RX).unwrap());
        if let Ok(p) = merge(bufs.clone()) {
            if p.len() >= n {
                assert_eq!(p.len(), n, "more packets than sent");
                return p;
            }
        }
        assert!(std::time::Instant::now() < deadline, "received {} buffers, {n} packets expected", bufs.len());
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Buffers of `RX_BUF` bytes a frame of `len` bytes takes with its header.
fn buffers_for(len: usize) -> u16 {
    (NET_HDR_LEN + len).div_ceil(RX_BUF as usize) as u16
}

/// Frame sizes around the buffer boundaries, up to a 9000-byte MTU's frame (with one
/// VLAN tag's room: `max_frame` is MTU + 18).
const JUMBO_SIZES: [usize; 9] = [60, 1514, 2036, 2037, 4072, 4073, 6000, 9014, 9018];

/// `reflect` with `--mtu 9000` and mergeable receive buffers on a split ring: every
/// frame comes back byte for byte, spread over exactly as many 2 KiB buffers as it
/// needs, `num_buffers` in the first header, the rest of the header zero; the counters
/// are exact.
#[test]
fn mrg_jumbo_frames_reflect_byte_exact() {
    let _serial = serial();
    let dir = TempDir::new("offload-mrg");
    let sock = dir.join("r.sock");
    let backend = Backend::start(&["--port", &port("reflect", &sock), "--mtu", "9000", "--cores", "1"]);
    let mut fe = raw(&sock, mrg());
    assert_ne!(fe.features() & mrg(), 0, "MRG_RXBUF offered and negotiated");
    wait_connected(&backend, &[&sock]);

    let frames: Vec<Vec<u8>> =
        JUMBO_SIZES.iter().enumerate().map(|(i, &l)| test_frame(l, i as u16 + 1)).collect();
    fe.send_frames(TX, &frames).unwrap();
    fe.wait_tx_done(TX, IO_TIMEOUT).unwrap();
    let got = recv_merged(&mut fe, frames.len());
    for ((hdr, frame, n), want) in got.iter().zip(&frames) {
        assert_eq!(frame, want, "frame of {} bytes reflected byte for byte", want.len());
        assert_eq!(*n, buffers_for(want.len()), "buffers for {} bytes", want.len());
        let mut rest = *hdr;
        rest[NET_HDR_NUM_BUFFERS..].fill(0);
        assert_eq!(rest, [0u8; NET_HDR_LEN], "no offload fields on a plain frame");
    }
    let fin = backend.stop();
    let dev = device(&fin, &sock);
    assert_eq!(counter(dev, "rx_packets"), frames.len() as u64);
    assert_eq!(counter(dev, "tx_packets"), frames.len() as u64);
    let bytes: u64 = JUMBO_SIZES.iter().map(|&l| l as u64).sum();
    assert_eq!(counter(dev, "rx_bytes"), bytes);
    assert_eq!(counter(dev, "tx_bytes"), bytes);
    assert_eq!(total_drops(dev), 0, "{dev}");
    assert_eq!(dev["broken_queues"].as_u64(), Some(0));
}

/// Without mergeable receive buffers a frame larger than the receive buffer is dropped
/// and counted (`rx_buffer_too_small`), as before; the frames that fit still arrive, and
/// a frame larger than the MTU allows is `oversize` with or without MRG_RXBUF.
#[test]
fn without_mrg_a_frame_over_one_buffer_is_dropped() {
    let _serial = serial();
    let dir = TempDir::new("offload-nomrg");
    let sock = dir.join("r.sock");
    let backend = Backend::start(&["--port", &port("reflect", &sock), "--mtu", "9000", "--cores", "1"]);
    let mut fe = raw(&sock, 0);
    assert_eq!(fe.features() & mrg(), 0);
    wait_connected(&backend, &[&sock]);

    let small = test_frame(2036, 7);
    let big = test_frame(2037, 8);
    let huge = test_frame(9019, 9);
    fe.send_frames(TX, &[small.clone(), big]).unwrap();
    fe.wait_tx_done(TX, IO_TIMEOUT).unwrap();
    fe.send_frames(TX, &[huge, small.clone()]).unwrap();
    fe.wait_tx_done(TX, IO_TIMEOUT).unwrap();
    let got = fe.recv_frames(RX, 2, IO_TIMEOUT).unwrap();
    assert_eq!(got, vec![small.clone(), small]);
    let fin = backend.stop();
    let dev = device(&fin, &sock);
    assert_eq!(counter(dev, "rx_packets"), 3, "the oversize frame is not counted as received");
    assert_eq!(counter(dev, "tx_packets"), 2);
    assert_eq!(counter(dev, "drops.rx_buffer_too_small"), 1);
    assert_eq!(counter(dev, "drops.oversize"), 1);
    assert_eq!(total_drops(dev), 2, "{dev}");
}

/// A frame that needs more buffers than the guest has posted waits for them (it is
/// neither dropped nor delivered in part), and arrives whole once the guest posts more.
#[test]
fn mrg_frame_waits_for_enough_buffers() {
    let _serial = serial();
    let dir = TempDir::new("offload-mrgwait");
    let sock = dir.join("r.sock");
    let backend = Backend::start(&["--port", &port("reflect", &sock), "--mtu", "9000", "--cores", "1"]);
    let mut fe = RawFrontend::connect(&sock, MEM, mrg()).unwrap();
    fe.setup_queue(RX, RING).unwrap();
    fe.setup_queue(TX, RING).unwrap();
    fe.post_rx_buffers(RX, 2, RX_BUF).unwrap();
    wait_connected(&backend, &[&sock]);

    let f = test_frame(9014, 3);
    fe.send_frames(TX, std::slice::from_ref(&f)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fe.in_flight(TX).unwrap(), 1, "the frame waits in the transmit ring");
    assert!(fe.poll_rx_buffers(RX).unwrap().is_empty(), "nothing delivered in part");
    fe.post_rx_buffers(RX, 3, RX_BUF).unwrap();
    fe.wait_tx_done(TX, IO_TIMEOUT).unwrap();
    let got = recv_merged(&mut fe, 1);
    assert_eq!(got[0].1, f);
    assert_eq!(got[0].2, 5);
    let fin = backend.stop();
    let dev = device(&fin, &sock);
    assert_eq!((counter(dev, "rx_packets"), counter(dev, "tx_packets")), (1, 1));
    assert_eq!(total_drops(dev), 0, "{dev}");
}

/// `xconnect` with mergeable buffers on one side only: A (mergeable) receives jumbo
/// frames from B in several buffers; B (without) gets what fits one buffer and counts
/// the rest as `rx_buffer_too_small`.
#[test]
fn mrg_jumbo_frames_xconnect_byte_exact() {
    let _serial = serial();
    let dir = TempDir::new("offload-mrgxc");
    let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
    let xc = format!("xconnect:{},{}", sa.display(), sb.display());
    let backend = Backend::start(&["--port", &xc, "--mtu", "9000", "--cores", "1"]);
    let mut a = raw(&sa, mrg());
    let mut b = raw(&sb, 0);
    wait_connected(&backend, &[&sa, &sb]);

    let frames: Vec<Vec<u8>> =
        JUMBO_SIZES.iter().enumerate().map(|(i, &l)| test_frame(l, i as u16 + 20)).collect();
    b.send_frames(TX, &frames).unwrap();
    b.wait_tx_done(TX, IO_TIMEOUT).unwrap();
    let got = recv_merged(&mut a, frames.len());
    for ((_, frame, n), want) in got.iter().zip(&frames) {
        assert_eq!(frame, want);
        assert_eq!(*n, buffers_for(want.len()));
    }
    let fits: Vec<Vec<u8>> = frames.iter().filter(|f| f.len() + NET_HDR_LEN <= RX_BUF as usize).cloned().collect();
    for f in &frames {
        a.send_frames(TX, std::slice::from_ref(f)).unwrap();
        a.wait_tx_done(TX, IO_TIMEOUT).unwrap();
    }
    assert_eq!(b.recv_frames(RX, fits.len(), IO_TIMEOUT).unwrap(), fits);
    let fin = backend.stop();
    let (da, db) = (device(&fin, &sa), device(&fin, &sb));
    assert_eq!(counter(da, "tx_packets"), frames.len() as u64);
    assert_eq!(counter(db, "tx_packets"), fits.len() as u64);
    assert_eq!(counter(db, "drops.rx_buffer_too_small"), (frames.len() - fits.len()) as u64);
    assert_eq!(total_drops(da), 0, "{da}");
}

// ---- DPDK's virtio-user with mergeable receive buffers ------------------------------

/// A 9000-byte frame in testpmd: five segments of 2 KiB mbufs (`--txpkts`), so that
/// transmit chains and mergeable receive buffers both span several buffers.
const DPDK_JUMBO_SEGS: &str = "--txpkts=2000,2000,2000,2000,1000";
const DPDK_JUMBO: u64 = 9000;
/// testpmd options for 9000-byte frames: the port's MTU (max-pkt-len 9018: MTU 9000 plus
/// Ethernet header and CRC), multi-segment transmit and scattered receive.
const DPDK_JUMBO_ARGS: [&str; 3] = ["--max-pkt-len=9018", "--tx-offloads=0x8000", "--enable-scatter"];

fn dpdk_jumbo(sock: &Path, devargs: &str, extra: &[&str]) -> Testpmd {
    let role = Role::VirtioUser { path: sock.to_path_buf(), queues: 1 };
    let mut args: Vec<&str> = DPDK_JUMBO_ARGS.to_vec();
    args.extend_from_slice(extra);
    // `pkt_size` is overridden by the later --txpkts.
    args.push(DPDK_JUMBO_SEGS);
    Testpmd::start_with_devargs(role, devargs, 64, 0, &args)
}

/// Sends `stop` and waits until testpmd printed its forward statistics.
fn stop_forwarding(pmd: &mut Testpmd) {
    let before = pmd.log_count("Forward statistics for port");
    pmd.cmd("stop");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pmd.log_count("Forward statistics for port") == before {
        assert!(std::time::Instant::now() < deadline, "no statistics after `stop`:\n{}", pmd.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits (max 15 s) until `value(stats)` is the same in two consecutive stats lines.
fn wait_stable(backend: &Backend, value: impl Fn(&Value) -> Vec<u64>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut prev: Option<(String, Vec<u64>)> = None;
    loop {
        if let Some(s) = backend.latest_stats() {
            let stamp = s["elapsed_s"].to_string();
            let v = value(&s);
            match &prev {
                Some((t, pv)) if *t != stamp && *pv == v => return,
                Some((t, _)) if *t == stamp => {}
                _ => prev = Some((stamp, v)),
            }
        }
        assert!(std::time::Instant::now() < deadline, "counters did not settle: {:?}", backend.latest_stats());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// DPDK's virtio-user (`mrg_rxbuf=1`, 2 KiB mbufs) runs `io` through `reflect --mtu
/// 9000` with 9000-byte frames: 2 bursts of 32 injected, then circulating. Exact
/// counts on both sides: DPDK TX = RX + injected, backend rx = DPDK TX, backend tx =
/// backend rx, every byte count 9000 per frame, nothing dropped.
#[test]
fn dpdk_mrg_jumbo_through_reflect() {
    dpdk_jumbo_reflect("mrg_rxbuf=1");
}

// No packed-ring variant of the reflect loop: DPDK 22.11's virtio-user sends a
// multi-segment frame on a packed ring through an indirect table whose header entry
// still carries the WRITE flag its initialisation gave every entry, which our packed
// walk refuses as a device-writable buffer in a transmit chain (the queue breaks). The
// packed receive side is covered by `dpdk_mrg_jumbo_xconnect_into_packed`.

fn dpdk_jumbo_reflect(devargs: &str) {
    const INJECTED: u64 = 32;
    let _serial = serial();
    let dir = TempDir::new("offload-dpdk-reflect");
    let sock = dir.join("r.sock");
    let backend = Backend::start(&["--port", &port("reflect", &sock), "--mtu", "9000", "--cores", "1"]);
    let mut pmd = dpdk_jumbo(&sock, devargs, &[]);
    wait_connected(&backend, &[&sock]);
    pmd.cmd("set fwd io");
    pmd.cmd("start tx_first 1");
    std::thread::sleep(Duration::from_secs(2));
    stop_forwarding(&mut pmd);
    wait_stable(&backend, |s| {
        let d = device(s, &sock);
        vec![counter(d, "rx_packets"), counter(d, "tx_packets")]
    });
    let dpdk = pmd.quit();
    let log = backend.log();
    let fin = backend.stop();
    let dev = device(&fin, &sock);
    eprintln!("testpmd {dpdk:?}\nbackend {dev}\nlog:\n{log}");
    let (rx, tx) = (counter(dev, "rx_packets"), counter(dev, "tx_packets"));
    assert_eq!((dpdk.rx_dropped, dpdk.tx_dropped), (0, 0), "DPDK dropped: {dpdk:?}");
    assert!(dpdk.rx_packets > INJECTED * 10, "the loop hardly circulated: {dpdk:?}");
    assert_eq!(dpdk.tx_packets, dpdk.rx_packets + INJECTED, "DPDK TX = RX + injected");
    assert_eq!(rx, dpdk.tx_packets, "backend rx == DPDK TX");
    assert_eq!(tx, rx, "reflect: backend tx == backend rx");
    assert_eq!(total_drops(dev), 0, "{dev}");
    assert_eq!(counter(dev, "rx_bytes"), rx * DPDK_JUMBO);
    assert_eq!(counter(dev, "tx_bytes"), tx * DPDK_JUMBO);
    assert_eq!(dev["broken_queues"].as_u64(), Some(0));
}

/// `xconnect` between two DPDK virtio-users with `mrg_rxbuf=1`: instance 1 sends
/// 9000-byte frames (`txonly`) on A, instance 2 receives them (`rxonly`) on B in 2 KiB
/// mbufs. Backpressure loses nothing: every frame sent is received, counts and bytes
/// equal on every side.
#[test]
fn dpdk_mrg_jumbo_xconnect() {
    dpdk_jumbo_xconnect("mrg_rxbuf=1");
}

/// [`dpdk_mrg_jumbo_xconnect`] with B on a packed ring (mergeable receive buffers found
/// beyond what the burst's first poll looked for).
#[test]
fn dpdk_mrg_jumbo_xconnect_into_packed() {
    dpdk_jumbo_xconnect("mrg_rxbuf=1,packed_vq=1");
}

fn dpdk_jumbo_xconnect(devargs_b: &str) {
    let _serial = serial();
    let dir = TempDir::new("offload-dpdk-xc");
    let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
    let xc = format!("xconnect:{},{}", sa.display(), sb.display());
    let backend = Backend::start(&["--port", &xc, "--mtu", "9000", "--cores", "1"]);
    let mut rx_side = dpdk_jumbo(&sb, devargs_b, &["--no-flush-rx"]);
    let mut tx_side = dpdk_jumbo(&sa, "mrg_rxbuf=1", &[]);
    wait_connected(&backend, &[&sa, &sb]);
    rx_side.cmd("set fwd rxonly");
    rx_side.cmd("start");
    assert!(rx_side.wait_log("rxonly packet forwarding - ports", Duration::from_secs(5)));
    tx_side.cmd("set fwd txonly");
    tx_side.cmd("start");
    std::thread::sleep(Duration::from_secs(1));
    stop_forwarding(&mut tx_side);
    wait_stable(&backend, |s| vec![counter(device(s, &sa), "rx_packets"), counter(device(s, &sb), "tx_packets")]);
    std::thread::sleep(Duration::from_millis(300));
    stop_forwarding(&mut rx_side);
    let sent = tx_side.quit();
    let received = rx_side.quit();
    let fin = backend.stop();
    let (da, db) = (device(&fin, &sa), device(&fin, &sb));
    eprintln!("sent {sent:?}\nreceived {received:?}\nA {da}\nB {db}");
    assert!(sent.tx_packets > 0, "instance 1 sent nothing");
    assert_eq!(counter(da, "rx_packets"), sent.tx_packets, "A rx == instance-1 TX");
    assert_eq!(counter(db, "tx_packets"), counter(da, "rx_packets"), "B tx == A rx");
    assert_eq!(received.rx_packets, counter(db, "tx_packets"), "instance-2 RX == B tx");
    assert_eq!(received.rx_dropped, 0);
    assert_eq!(counter(da, "rx_bytes"), sent.tx_packets * DPDK_JUMBO);
    assert_eq!(counter(db, "tx_bytes"), sent.tx_packets * DPDK_JUMBO);
    assert_eq!(total_drops(da) + total_drops(db), 0, "A {da}\nB {db}");
}
