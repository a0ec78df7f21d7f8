//! Issue 17, the backend side: mergeable receive buffers, jumbo frames and host offloads
//! (checksum and segmentation) through `reflect` and `xconnect`, against front-ends we
//! control byte for byte ([`RawFrontend`]), against DPDK's virtio-user, and with our
//! driver on both ends (`driver_tso_through_xconnect_*`: its TSO requests segmented here
//! for a receiver without GUEST_TSO, or delivered whole to one with it). The offload
//! tests of `xconnect` run twice: on one worker, and with `--handoff` (`*_handoff*`: each
//! device on its own worker, the frames and their headers handed between the two), with
//! the same outcomes and counts.
//!
//! Every test takes the cross-binary [`serial`] lock, bounds every wait, stops every
//! process it started (the `Backend` and `Testpmd` guards kill theirs when a test
//! fails), and checks exact outcomes: frame counts on both sides, bytes equal, the
//! header fields the device wrote, and the drop reasons it counted.

mod driver_common;

use std::path::Path;
use std::time::{Duration, Instant};

use driver::layout::{features, net_hdr, NET_HDR_LEN, NET_HDR_NUM_BUFFERS};
use driver::offload::GsoKind;
use driver::{Packet, PortConfig, RxMeta, TxCsum, TxGso, TxOffload};
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

/// A backend with one `xconnect` pair (sockets `a.sock`, `b.sock` in a new temporary
/// directory tagged `tag`) on one worker, plus `extra` arguments.
fn xconnect(tag: &str, extra: &[&str]) -> (TempDir, std::path::PathBuf, std::path::PathBuf, Backend) {
    xconnect_on(tag, false, extra)
}

/// The workers: one, or with `handoff` two, each device of a cross-connect on its own
/// (`--handoff`: frames handed between the two workers through the pointer rings).
fn workers(handoff: bool) -> &'static [&'static str] {
    if handoff {
        &["--handoff", "--cores", "0,1"]
    } else {
        &["--cores", "1"]
    }
}

/// [`xconnect`], or with `handoff` each device on its own worker ([`workers`]).
fn xconnect_on(
    tag: &str,
    handoff: bool,
    extra: &[&str],
) -> (TempDir, std::path::PathBuf, std::path::PathBuf, Backend) {
    let dir = TempDir::new(tag);
    let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
    let xc = format!("xconnect:{},{}", sa.display(), sb.display());
    let mut args = vec!["--port", xc.as_str()];
    args.extend_from_slice(workers(handoff));
    args.extend_from_slice(extra);
    let backend = Backend::start(&args);
    (dir, sa, sb, backend)
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

/// A received packet: its header, its frame, the buffers it spanned.
type Received = ([u8; NET_HDR_LEN], Vec<u8>, u16);

/// Received packets reassembled from used receive buffers in used order (`bufs`: each
/// buffer's written bytes, the first of a packet starting with its net header), as a
/// mergeable-buffer driver does: `num_buffers` of the first says how many buffers the
/// packet spans. Returns `(header, frame, buffers)` per packet; a count that runs past
/// the buffers received is an error.
fn merge(bufs: Vec<Vec<u8>>) -> Result<Vec<Received>, String> {
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
fn recv_merged(fe: &mut RawFrontend, n: usize) -> Vec<Received> {
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
        assert!(
            std::time::Instant::now() < deadline,
            "received {} buffers, {n} packets expected",
            bufs.len()
        );
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

/// `gen --pkt-size 9014` with mergeable receive buffers: each generated frame spreads
/// over exactly the 2 KiB buffers it needs (`num_buffers` in the first header), is the
/// generator's UDP frame (valid IPv4 header, 9000 bytes of IP, the "VNET" magic and the
/// sequence numbers 0, 1, 2, ... in order); `--count` frames exactly, no drop. Without
/// mergeable buffers the same frames are dropped as `rx_buffer_too_small`.
#[test]
fn gen_jumbo_frames_over_mergeable_buffers() {
    const COUNT: usize = 10;
    const LEN: usize = 9014;
    let _serial = serial();
    let dir = TempDir::new("offload-genmrg");
    let sock = dir.join("g.sock");
    let count = COUNT.to_string();
    let args = ["--port", &port("gen", &sock), "--pkt-size", "9014", "--mtu", "9000", "--count", &count];
    let backend = Backend::start(&[&args[..], &["--cores", "1"]].concat());
    let mut fe = raw(&sock, mrg());
    assert_ne!(fe.features() & mrg(), 0, "gen offers MRG_RXBUF");
    let got = recv_merged(&mut fe, COUNT);
    for (i, (hdr, frame, n)) in got.iter().enumerate() {
        assert_eq!((frame.len(), *n), (LEN, buffers_for(LEN)), "frame {i}");
        let mut rest = *hdr;
        rest[NET_HDR_NUM_BUFFERS..NET_HDR_NUM_BUFFERS + 2].fill(0);
        assert_eq!(rest, [0u8; NET_HDR_LEN], "frame {i}: no offload fields");
        assert_eq!(u16::from_be_bytes([frame[16], frame[17]]) as usize, LEN - 14, "IPv4 total length");
        assert_eq!(spec_csum(&frame[14..34]), 0, "frame {i}: IPv4 header checksum");
        assert_eq!(&frame[42..46], b"VNET");
        assert_eq!(u64::from_le_bytes(frame[46..54].try_into().unwrap()), i as u64, "sequence");
    }
    let fin = backend.stop();
    let dev = device(&fin, &sock);
    assert_eq!((counter(dev, "generated"), counter(dev, "tx_packets")), (COUNT as u64, COUNT as u64));
    assert_eq!(counter(dev, "tx_bytes"), (COUNT * LEN) as u64);
    assert_eq!(total_drops(dev), 0, "{dev}");

    // The same without mergeable buffers: nothing fits one 2 KiB buffer.
    let backend = Backend::start(&[&args[..], &["--cores", "1"]].concat());
    let mut fe = raw(&sock, 0);
    let s = backend.wait_stats(STATS_TIMEOUT, |s| counter(device(s, &sock), "generated") == COUNT as u64);
    let dev = device(&s, &sock);
    assert_eq!(counter(dev, "drops.rx_buffer_too_small"), COUNT as u64, "{dev}");
    assert_eq!(counter(dev, "tx_packets"), 0);
    assert!(fe.poll_rx_buffers(RX).unwrap().is_empty(), "nothing delivered");
    drop(backend);
}

/// The frame `gen --pkt-size len` makes as its frame `seq` for a guest of address
/// `mac`, written here from the generator's documented layout (host-backend
/// `udp_frame`): to `mac` from 02:00:00:00:00:01, IPv4 10.0.0.1 -> 10.0.0.2 (TTL 64, a
/// valid header checksum), UDP 9 -> 9 without checksum, "VNET" and the little-endian
/// sequence number at 42, then byte i (from 54) == i as u8.
fn gen_frame(len: usize, seq: u64, mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&mac);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip_len = (len - 14) as u16;
    f[14] = 0x45;
    f[16..18].copy_from_slice(&ip_len.to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..34].copy_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
    let c = spec_csum(&f[14..34]);
    f[24..26].copy_from_slice(&c.to_be_bytes());
    f[34..36].copy_from_slice(&9u16.to_be_bytes());
    f[36..38].copy_from_slice(&9u16.to_be_bytes());
    f[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f[42..46].copy_from_slice(b"VNET");
    f[46..54].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in f[54..].iter_mut().enumerate() {
        *b = i as u8;
    }
    f
}

/// `gen` into our driver with `VIRTIO_NET_F_MRG_RXBUF` negotiated, on split and packed
/// rings: 128-byte frames each in one buffer (`num_buffers` 1: the driver would stop the
/// queue on 0) and 9014-byte frames (`--mtu 9000`) each a chain of exactly the 5 pool
/// buffers it needs (1984 frame bytes in the first, 1996 in the others). Every frame is
/// byte for byte the generator's, in sequence order, exactly `--count` of them; the
/// driver's and the backend's counters agree, nothing is dropped or broken, and every
/// buffer is back in the pool at close.
#[test]
fn gen_into_our_driver_with_mergeable_buffers() {
    for (len, count, segs, packed) in
        [(128usize, 20_000u64, 1usize, false), (9014, 2000, 5, false), (9014, 2000, 5, true)]
    {
        gen_into_our_driver(len, count, segs, packed);
    }
}

fn gen_into_our_driver(len: usize, count: u64, segs: usize, packed: bool) {
    let what = format!("{len}-byte frames, {} rings", if packed { "packed" } else { "split" });
    let _serial = serial();
    let dir = TempDir::new("offload-gen-driver");
    let sock = dir.join("g.sock");
    let (count_s, len_s) = (count.to_string(), len.to_string());
    let args = ["--port", &port("gen", &sock), "--pkt-size", &len_s, "--mtu", "9000", "--count", &count_s];
    let backend = Backend::start(&[&args[..], &["--cores", "1"]].concat());
    let mut cfg = PortConfig::virtio_user(&sock);
    cfg.features |= mrg();
    cfg.packed = packed;
    let mut port = driver_common::open(cfg).unwrap_or_else(|e| panic!("{what}: open: {e}"));
    assert_ne!(port.info().features & mrg(), 0, "{what}: MRG_RXBUF negotiated");
    assert_eq!(port.info().packed, packed);
    let mac = port.info().mac;
    let mut qp = port.queue_pair(0).expect("queue pair 0");
    let mut batch: Vec<Packet> = Vec::with_capacity(32);
    let mut next = 0u64;
    let mut flat = vec![0u8; len];
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut quiet_until = None;
    loop {
        qp.rx.rx_burst(&mut batch, 32);
        for p in batch.drain(..) {
            assert!(next < count, "{what}: a frame beyond the {count} generated");
            assert_eq!((p.total_len(), p.nb_segs()), (len, segs), "{what}: frame {next}");
            p.copy_to(&mut flat).unwrap();
            assert!(flat == gen_frame(len, next, mac), "{what}: frame {next} differs from the generator's");
            next += 1;
        }
        let now = Instant::now();
        if next == count {
            // Keep polling a little: an extra frame would fail above.
            match quiet_until {
                None => quiet_until = Some(now + Duration::from_millis(300)),
                Some(t) if now >= t => break,
                Some(_) => {}
            }
        }
        assert!(
            now < deadline,
            "{what}: received {next} of {count} (rx error {:?}); backend {:?}",
            qp.rx.error(),
            backend.latest_stats()
        );
    }
    let st = port.stats();
    assert_eq!((st[0].rx_packets, st[0].rx_bytes), (count, count * len as u64), "{what}");
    assert_eq!((st[0].rx_errors, st[0].device_errors), (0, 0), "{what}");
    assert_eq!(qp.rx.error(), None);
    let (avail, cap) = driver_common::close(port, vec![qp]);
    assert_eq!(avail, cap, "{what}: every buffer back in the pool");
    let fin = backend.stop();
    let dev = device(&fin, &sock);
    assert_eq!((counter(dev, "generated"), counter(dev, "tx_packets")), (count, count), "{what}: {dev}");
    assert_eq!(counter(dev, "tx_bytes"), count * len as u64);
    assert_eq!(total_drops(dev), 0, "{what}: {dev}");
    assert_eq!(dev["broken_queues"].as_u64(), Some(0));
}

/// DPDK's virtio-user with `mrg_rxbuf=1` (2 KiB mbufs, scattered receive) in `rxonly`
/// on a `gen --pkt-size 9014 --mtu 9000 --count 20000` port: the backend logs MRG_RXBUF
/// (bit 15) among the features DPDK acked; every generated frame reaches DPDK (a
/// generator waits for receive buffers with mergeable buffers, it drops nothing), so
/// DPDK's RX = the backend's tx = 20000, bytes exact.
#[test]
fn dpdk_mrg_rxonly_jumbo_from_gen() {
    const COUNT: u64 = 20_000;
    let _serial = serial();
    let dir = TempDir::new("offload-dpdk-gen");
    let sock = dir.join("g.sock");
    let count = COUNT.to_string();
    let backend = Backend::start(&[
        "--port",
        &port("gen", &sock),
        "--pkt-size",
        "9014",
        "--mtu",
        "9000",
        "--count",
        &count,
        "--cores",
        "1",
    ]);
    let mut pmd = dpdk_jumbo(&sock, "mrg_rxbuf=1", &["--no-flush-rx"]);
    wait_connected(&backend, &[&sock]);
    pmd.cmd("set fwd rxonly");
    pmd.cmd("start");
    backend.wait_stats(Duration::from_secs(30), |s| counter(device(s, &sock), "tx_packets") == COUNT);
    std::thread::sleep(Duration::from_millis(500));
    stop_forwarding(&mut pmd);
    let dpdk = pmd.quit();
    let log = backend.log();
    let fin = backend.stop();
    let dev = device(&fin, &sock);
    let acked = log
        .lines()
        .find_map(|l| {
            l.split("features ").nth(1)?.split(" acked").next()?.strip_prefix("0x").map(str::to_string)
        })
        .and_then(|h| u64::from_str_radix(&h, 16).ok())
        .unwrap_or_else(|| panic!("no acked features in the backend log:\n{log}"));
    assert_ne!(acked & mrg(), 0, "DPDK acked {acked:#x} without MRG_RXBUF");
    assert_eq!((counter(dev, "generated"), counter(dev, "tx_packets")), (COUNT, COUNT), "{dev}");
    assert_eq!(counter(dev, "tx_bytes"), COUNT * 9014);
    assert_eq!(total_drops(dev), 0, "{dev}");
    assert_eq!((dpdk.rx_packets, dpdk.rx_dropped), (COUNT, 0), "{dpdk:?}");
}

/// The Internet checksum of `b` folded (0 for a valid IPv4 header).
fn spec_csum(b: &[u8]) -> u16 {
    let mut s: u32 = b.chunks(2).map(|w| u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u32).sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
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

/// A frame no receive ring can ever hold does not block the frames behind it: the guest
/// (mergeable buffers, an 8-entry receive ring) posts chains of two 512-byte
/// descriptors, so the full ring holds 4 chains, 4 KiB. A 5000-byte frame through
/// `reflect` first waits while the ring has free descriptors (3 chains posted: the guest
/// may post more), then, once the 4th chain fills the ring, is dropped and counted as
/// `rx_ring_too_small` (its transmit buffer completed); the three frames sent after it
/// arrive byte for byte, one chain each with `num_buffers` 1, and the counts are exact.
/// (Before, a ring that can never show `size` chains made such a frame wait for ever.)
#[test]
fn a_frame_no_receive_ring_can_hold_is_dropped_and_the_rest_flow() {
    use driver::layout::{Descriptor, DESC_F_NEXT, DESC_F_WRITE};
    const RX_RING: u16 = 8;
    let _serial = serial();
    let dir = TempDir::new("offload-ringsmall");
    let sock = dir.join("r.sock");
    let backend = Backend::start(&["--port", &port("reflect", &sock), "--mtu", "9000", "--cores", "1"]);
    let mut fe = RawFrontend::connect(&sock, MEM, mrg()).unwrap();
    fe.setup_queue(RX, RX_RING).unwrap();
    fe.setup_queue(TX, RING).unwrap();
    wait_connected(&backend, &[&sock]);
    // Chain c: descriptors 2c -> 2c+1, 512 bytes each.
    let mut bufs = Vec::new();
    let mut post = |fe: &mut RawFrontend, c: u16| {
        let (a, b) = (fe.alloc(512, 64).unwrap(), fe.alloc(512, 64).unwrap());
        let d = |addr, flags, next| Descriptor { addr, len: 512, flags, next };
        fe.write_desc(RX, 2 * c, d(a, DESC_F_WRITE | DESC_F_NEXT, 2 * c + 1)).unwrap();
        fe.write_desc(RX, 2 * c + 1, d(b, DESC_F_WRITE, 0)).unwrap();
        fe.write_avail_slot(RX, c, 2 * c).unwrap();
        fe.set_avail_idx(RX, c + 1).unwrap();
        fe.kick(RX).unwrap();
        bufs.push(a);
    };
    for c in 0..3 {
        post(&mut fe, c);
    }
    let jumbo = test_frame(5000, 1);
    fe.send_frames(TX, std::slice::from_ref(&jumbo)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(fe.in_flight(TX).unwrap(), 1, "with free descriptors in the ring the frame waits");
    assert_eq!(fe.used_idx(RX).unwrap(), 0);
    post(&mut fe, 3);
    fe.wait_tx_done(TX, IO_TIMEOUT).unwrap();
    assert_eq!(fe.used_idx(RX).unwrap(), 0, "nothing of the dropped frame delivered");
    let small: Vec<Vec<u8>> = [100, 100, 300].iter().zip(2u16..).map(|(&l, s)| test_frame(l, s)).collect();
    fe.send_frames(TX, &small).unwrap();
    fe.wait_tx_done(TX, IO_TIMEOUT).unwrap();
    fe.wait_used_idx(RX, 3, IO_TIMEOUT).unwrap();
    for (k, f) in small.iter().enumerate() {
        let (id, len) = fe.used_elem(RX, k as u16).unwrap();
        assert_eq!((id, len as usize), (2 * k as u32, NET_HDR_LEN + f.len()), "frame {k}: used element");
        let got = fe.read_mem(bufs[k], NET_HDR_LEN + f.len()).unwrap();
        assert_eq!(num_buffers(&got), 1, "frame {k}");
        assert_eq!(&got[NET_HDR_LEN..], &f[..], "frame {k}: bytes");
    }
    one_dropped_as_ring_too_small(backend, &sock);
}

/// The final counts of the `rx_ring_too_small` tests: four frames received, the three
/// small ones (500 bytes) delivered, the jumbo one dropped as `rx_ring_too_small`, and
/// nothing else; no queue broken.
fn one_dropped_as_ring_too_small(backend: Backend, sock: &Path) {
    let fin = backend.stop();
    let dev = device(&fin, sock);
    assert_eq!((counter(dev, "rx_packets"), counter(dev, "tx_packets")), (4, 3), "{dev}");
    assert_eq!(counter(dev, "tx_bytes"), 500);
    assert_eq!(counter(dev, "drops.rx_ring_too_small"), 1, "{dev}");
    assert_eq!(total_drops(dev), 1, "{dev}");
    assert_eq!(dev["broken_queues"].as_u64(), Some(0));
}

/// [`a_frame_no_receive_ring_can_hold_is_dropped_and_the_rest_flow`] on packed rings
/// (`VIRTIO_F_RING_PACKED` negotiated, rings written by hand): the same 8-entry receive
/// ring of chains of two 512-byte descriptors (chain c at positions 2c, 2c+1, its buffer
/// id c in both), the same 5000-byte frame through `reflect`: it waits while the ring has
/// free descriptors (its transmit descriptor stays available, no receive descriptor
/// used), then, once the 4th chain fills the ring, is dropped as `rx_ring_too_small` (its
/// transmit descriptor used); the three frames after it arrive byte for byte, each in one
/// chain (used descriptors at positions 0, 2, 4 with ids 0, 1, 2, `num_buffers` 1), and
/// the counts are exact.
#[test]
fn a_frame_no_packed_receive_ring_can_hold_is_dropped_and_the_rest_flow() {
    use driver::packed::{self, PackedDescriptor, DESC_F_NEXT, DESC_F_WRITE};
    const RX_RING: u16 = 8;
    const AV: u16 = packed::avail_flags(true);
    let _serial = serial();
    let dir = TempDir::new("offload-ringsmall-packed");
    let sock = dir.join("r.sock");
    let backend = Backend::start(&["--port", &port("reflect", &sock), "--mtu", "9000", "--cores", "1"]);
    let want = mrg() | features::bit(features::RING_PACKED);
    let mut fe = RawFrontend::connect(&sock, MEM, want).unwrap();
    assert_eq!(fe.features() & want, want, "packed rings and mergeable buffers negotiated");
    fe.setup_packed_queue(RX, RX_RING).unwrap();
    fe.setup_packed_queue(TX, RING).unwrap();
    wait_connected(&backend, &[&sock]);
    let pdesc = |addr, len, id, flags| PackedDescriptor { addr, len, id, flags };
    // Chain c: its second descriptor first, then the head, whose flags make it available.
    let mut bufs = Vec::new();
    let mut post = |fe: &mut RawFrontend, c: u16| {
        let (a, b) = (fe.alloc(512, 64).unwrap(), fe.alloc(512, 64).unwrap());
        fe.write_packed_desc(RX, 2 * c + 1, pdesc(b, 512, c, AV | DESC_F_WRITE)).unwrap();
        fe.write_packed_desc(RX, 2 * c, pdesc(a, 512, c, AV | DESC_F_WRITE | DESC_F_NEXT)).unwrap();
        fe.kick(RX).unwrap();
        bufs.push(a);
    };
    // Frame k goes out in transmit descriptor k (header and frame in one buffer).
    let send = |fe: &mut RawFrontend, k: u16, frame: &[u8]| {
        let mut p = vec![0u8; NET_HDR_LEN];
        p.extend_from_slice(frame);
        let g = fe.alloc(p.len(), 64).unwrap();
        fe.write_mem(g, &p).unwrap();
        fe.write_packed_desc(TX, k, pdesc(g, p.len() as u32, k, AV)).unwrap();
        fe.kick(TX).unwrap();
    };
    let used =
        |fe: &RawFrontend, q: u16, pos: u16| packed::is_used(fe.packed_desc(q, pos).unwrap().flags, true);
    for c in 0..3 {
        post(&mut fe, c);
    }
    let jumbo = test_frame(5000, 1);
    send(&mut fe, 0, &jumbo);
    std::thread::sleep(Duration::from_millis(300));
    assert!(!used(&fe, TX, 0), "with free descriptors in the ring the frame waits");
    assert!(!used(&fe, RX, 0));
    post(&mut fe, 3);
    fe.wait_packed_used(TX, 0, true, IO_TIMEOUT).unwrap();
    assert!(!used(&fe, RX, 0), "nothing of the dropped frame delivered");
    let small: Vec<Vec<u8>> = [100, 100, 300].iter().zip(2u16..).map(|(&l, s)| test_frame(l, s)).collect();
    for (k, f) in small.iter().enumerate() {
        send(&mut fe, 1 + k as u16, f);
    }
    fe.wait_packed_used(TX, 3, true, IO_TIMEOUT).unwrap();
    for (k, f) in small.iter().enumerate() {
        let u = fe.wait_packed_used(RX, 2 * k as u16, true, IO_TIMEOUT).unwrap();
        assert_eq!((u.id, u.len as usize), (k as u16, NET_HDR_LEN + f.len()), "frame {k}: used descriptor");
        let got = fe.read_mem(bufs[k], NET_HDR_LEN + f.len()).unwrap();
        assert_eq!(num_buffers(&got), 1, "frame {k}");
        assert_eq!(&got[NET_HDR_LEN..], &f[..], "frame {k}: bytes");
    }
    assert!(!used(&fe, RX, 6), "the 4th chain stays available");
    one_dropped_as_ring_too_small(backend, &sock);
}

/// `xconnect` with mergeable buffers on one side only: A (mergeable) receives jumbo
/// frames from B in several buffers; B (without) gets what fits one buffer and counts
/// the rest as `rx_buffer_too_small`.
#[test]
fn mrg_jumbo_frames_xconnect_byte_exact() {
    let _serial = serial();
    let (_dir, sa, sb, backend) = xconnect("offload-mrgxc", &["--mtu", "9000"]);
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
    let fits: Vec<Vec<u8>> =
        frames.iter().filter(|f| f.len() + NET_HDR_LEN <= RX_BUF as usize).cloned().collect();
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
        assert!(
            std::time::Instant::now() < deadline,
            "counters did not settle: {:?}",
            backend.latest_stats()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// DPDK's virtio-user (`mrg_rxbuf=1`, 2 KiB mbufs) runs `io` through `reflect --mtu
/// 9000` with 9000-byte frames: one burst of 32 injected, then circulating. Exact
/// counts on both sides: DPDK TX = RX + injected, backend rx = DPDK TX, backend tx =
/// backend rx, every byte count 9000 per frame, nothing dropped.
///
/// Rings of 1024: the back-end publishes a burst's receive side before its transmit
/// completions (a back-end dying between the two stores then loses no frame uncounted,
/// see `host-backend/src/port/forward.rs`), so DPDK may see a burst come back before
/// the transmit slots of that same burst are free. 32 frames of 5 or 6 descriptors
/// twice over do not fit the default 256 (io forwarding then drops, counted, in about
/// one run in four), they fit 1024.
#[test]
fn dpdk_mrg_jumbo_through_reflect() {
    dpdk_jumbo_reflect("mrg_rxbuf=1,queue_size=1024");
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
    let (_dir, sa, sb, backend) = xconnect("offload-dpdk-xc", &["--mtu", "9000"]);
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
    wait_stable(&backend, |s| {
        vec![counter(device(s, &sa), "rx_packets"), counter(device(s, &sb), "tx_packets")]
    });
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

// ---- host offloads: checksum completion and segmentation ----------------------------

fn bits(list: &[u32]) -> u64 {
    list.iter().fold(0, |acc, b| acc | features::bit(*b))
}

/// What a sending guest negotiates: checksum offload and TSO for both IP versions.
fn host_offloads() -> u64 {
    bits(&[features::NET_CSUM, features::NET_HOST_TSO4, features::NET_HOST_TSO6])
}

/// What a receiving guest that takes super-frames whole negotiates.
fn guest_offloads() -> u64 {
    bits(&[features::NET_GUEST_CSUM, features::NET_GUEST_TSO4, features::NET_GUEST_TSO6])
}

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
const IP4_A: [u8; 4] = [10, 0, 0, 1];
const IP4_B: [u8; 4] = [10, 0, 0, 2];
const IP6_A: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const IP6_B: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const SEQ: u32 = 0x1234_5678;

/// A TCP frame (IPv4 or IPv6) with `payload`, checksums complete (etherparse builds it),
/// PSH and ACK set, IPv4 id 0x4242.
fn tcp_frame(v6: bool, payload: &[u8]) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2(MAC_A, MAC_B);
    let b = if v6 { b.ipv6(IP6_A, IP6_B, 64) } else { b.ipv4(IP4_A, IP4_B, 64) };
    let b = b.tcp(40000, 5201, SEQ, 64240).psh().ack(1);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).unwrap();
    with_ip4_id(out, v6)
}

/// Gives an IPv4 frame the id 0x4242 (etherparse writes 0), so that the segments' ids
/// show, and its header checksum again; an IPv6 frame stays as it is.
fn with_ip4_id(mut out: Vec<u8>, v6: bool) -> Vec<u8> {
    if !v6 {
        out[14 + 4..14 + 6].copy_from_slice(&0x4242u16.to_be_bytes());
        let sum = ip4_header_csum(&out[14..34]);
        out[14 + 10..14 + 12].copy_from_slice(&sum.to_be_bytes());
    }
    out
}

fn ip4_header_csum(h: &[u8]) -> u16 {
    let mut acc: u32 = 0;
    for (i, w) in h.chunks(2).enumerate() {
        if i != 5 {
            acc += u16::from_be_bytes([w[0], w[1]]) as u32;
        }
    }
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// Where the transport header starts.
fn l4(v6: bool) -> usize {
    if v6 {
        14 + 40
    } else {
        14 + 20
    }
}

/// The frame as a driver hands a partial checksum to the device: the transport
/// checksum field holds the pseudo-header sum (what Linux puts there), not the checksum.
fn with_partial_csum(mut frame: Vec<u8>, v6: bool, csum_off: usize) -> Vec<u8> {
    let start = l4(v6);
    let l4_len = frame.len() - start;
    let mut acc: u64 = 0;
    let addrs = if v6 { &frame[22..54] } else { &frame[26..34] };
    for w in addrs.chunks(2) {
        acc += u16::from_be_bytes([w[0], w[1]]) as u64;
    }
    let proto = if v6 { frame[20] } else { frame[23] };
    acc += proto as u64 + l4_len as u64;
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    frame[start + csum_off..start + csum_off + 2].copy_from_slice(&(acc as u16).to_be_bytes());
    frame
}

/// A virtio-net header.
fn hdr(flags: u8, gso_type: u8, hdr_len: u16, gso_size: u16, csum_start: u16, csum_offset: u16) -> Vec<u8> {
    let mut h = vec![0u8; NET_HDR_LEN];
    h[0] = flags;
    h[1] = gso_type;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&csum_start.to_le_bytes());
    h[8..10].copy_from_slice(&csum_offset.to_le_bytes());
    h
}

/// A TSO super-frame as a driver sends it: header (NEEDS_CSUM, TCPV4/TCPV6, `mss`) and
/// the frame with its partial checksum.
fn tso_packet(v6: bool, payload: &[u8], mss: u16) -> (Vec<u8>, Vec<u8>) {
    let frame = with_partial_csum(tcp_frame(v6, payload), v6, 16);
    let t = if v6 { net_hdr::GSO_TCPV6 } else { net_hdr::GSO_TCPV4 };
    let start = l4(v6) as u16;
    let mut p = hdr(net_hdr::F_NEEDS_CSUM, t, start + 20, mss, start, 16);
    p.extend_from_slice(&frame);
    (p, frame)
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)).collect()
}

/// Checks one received segment independently (etherparse): the IPv4 header checksum,
/// the TCP checksum over the pseudo-header, the IP length; returns (seq, flags (fin,
/// psh), IPv4 id, payload).
fn check_segment(frame: &[u8], v6: bool) -> (u32, (bool, bool), Option<u16>, Vec<u8>) {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let p = SlicedPacket::from_ethernet(frame).unwrap_or_else(|e| panic!("segment does not parse: {e}"));
    let (Some(net), Some(TransportSlice::Tcp(tcp))) = (p.net, p.transport) else {
        panic!("not TCP/IP: {frame:?}")
    };
    let (want, id) = match net {
        NetSlice::Ipv4(ip) => {
            assert!(!v6);
            let h = ip.header();
            assert_eq!(h.header_checksum(), h.to_header().calc_header_checksum(), "IPv4 header checksum");
            assert_eq!(h.total_len() as usize, frame.len() - 14, "IPv4 total length");
            (tcp.calc_checksum_ipv4(h.source(), h.destination()).unwrap(), Some(h.identification()))
        }
        NetSlice::Ipv6(ip) => {
            assert!(v6);
            let h = ip.header();
            assert_eq!(h.payload_length() as usize, frame.len() - 54, "IPv6 payload length");
            (tcp.calc_checksum_ipv6(h.source(), h.destination()).unwrap(), None)
        }
        NetSlice::Arp(_) => panic!("ARP"),
    };
    assert_eq!(tcp.checksum(), want, "TCP checksum");
    (tcp.sequence_number(), (tcp.fin(), tcp.psh()), id, tcp.payload().to_vec())
}

/// A TSO super-frame (TCPv4 and TCPv6, 20 000 bytes of payload, MSS 1448 and 1440) sent by A into
/// `xconnect`: B without guest TSO receives valid segments (checksums verified
/// independently, sequence numbers and IPv4 ids consecutive, PSH on the last only) whose
/// payloads concatenate to the original; with guest TSO (and mergeable buffers) B
/// receives the super-frame whole with its GSO header.
#[test]
fn tso_super_frames_segmented_or_whole() {
    tso_super_frames(false);
}

/// [`tso_super_frames_segmented_or_whole`] with `--handoff`.
#[test]
fn tso_super_frames_segmented_or_whole_handoff() {
    tso_super_frames(true);
}

fn tso_super_frames(handoff: bool) {
    let _serial = serial();
    for b_whole in [false, true] {
        let (_dir, sa, sb, backend) = xconnect_on("offload-tso", handoff, &[]);
        let mut a = raw(&sa, host_offloads() | mrg());
        let b_want = if b_whole { guest_offloads() | mrg() } else { 0 };
        let mut b = raw(&sb, b_want);
        assert_eq!(a.features() & host_offloads(), host_offloads(), "host offloads offered");
        assert_eq!(b.features() & b_want, b_want);
        wait_connected(&backend, &[&sa, &sb]);

        let mut sent = 0u64;
        let mut segments = 0u64;
        for v6 in [false, true] {
            let data = payload(20_000, v6 as u8);
            // The MSS a 1500-byte MTU allows: 1460 - 12 option bytes Linux would carry
            // for IPv4, 1440 for IPv6 (its header is 20 bytes longer).
            let mss: u16 = if v6 { 1440 } else { 1448 };
            let (pkt, frame) = tso_packet(v6, &data, mss);
            a.send_packets(TX, &[pkt]).unwrap();
            a.wait_tx_done(TX, IO_TIMEOUT).unwrap();
            sent += 1;
            if b_whole {
                let got = recv_merged(&mut b, 1);
                let (h, f, _) = &got[0];
                assert_eq!(f, &frame, "the super-frame arrives whole, byte for byte");
                assert_eq!(h[0], net_hdr::F_NEEDS_CSUM);
                assert_eq!(h[1], if v6 { net_hdr::GSO_TCPV6 } else { net_hdr::GSO_TCPV4 });
                assert_eq!(u16::from_le_bytes([h[4], h[5]]), mss, "gso_size");
                assert_eq!(u16::from_le_bytes([h[6], h[7]]) as usize, l4(v6), "csum_start");
                assert_eq!(u16::from_le_bytes([h[8], h[9]]), 16, "csum_offset");
                assert_eq!(u16::from_le_bytes([h[2], h[3]]) as usize, l4(v6) + 20, "hdr_len");
                segments += 1;
            } else {
                let n = data.len().div_ceil(mss as usize);
                let got = b.recv_packets(RX, n, IO_TIMEOUT).unwrap_or_else(|e| {
                    panic!("{e}; stats {:?}\nlog {}", backend.latest_stats(), backend.log())
                });
                let mut joined = Vec::new();
                for (k, p) in got.iter().enumerate() {
                    assert_eq!(&p[..NET_HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "plain header");
                    let f = &p[NET_HDR_LEN..];
                    assert!(f.len() <= 1514, "segment of {} bytes over the MTU", f.len());
                    assert_eq!(&f[..12], &frame[..12], "addresses");
                    let (seq, (fin, psh), id, pl) = check_segment(f, v6);
                    assert_eq!(seq, SEQ.wrapping_add(joined.len() as u32), "sequence number of segment {k}");
                    assert_eq!((fin, psh), (false, k + 1 == n), "PSH only on the last segment");
                    if let Some(id) = id {
                        assert_eq!(id, 0x4242 + k as u16, "IPv4 id of segment {k}");
                    }
                    joined.extend(pl);
                }
                assert_eq!(joined, data, "payloads concatenate to the original");
                segments += n as u64;
            }
        }
        let fin = backend.stop();
        let (da, db) = (device(&fin, &sa), device(&fin, &sb));
        assert_eq!(counter(da, "rx_packets"), sent);
        assert_eq!(counter(db, "tx_packets"), segments);
        assert_eq!(total_drops(da) + total_drops(db), 0, "A {da}\nB {db}");
        // What the offloads did, counted on A (the sender): every super-frame passed
        // whole, or every one segmented into exactly the segments B received.
        let want = if b_whole { [0, sent, sent, 0, 0, 0] } else { [0, sent, 0, 0, sent, segments] };
        assert_eq!(offloads(da), want, "A {da}");
        assert_eq!(offloads(db), [0; 6], "B sent nothing: {db}");
    }
}

/// A `sink` offers the host offloads and takes a super-frame of a negotiated type whole:
/// TSO super-frames (TCPv4 of 20 000 and 64 000 payload bytes, TCPv6 of 20 000) and a
/// frame asking for a checksum are each counted as one frame of their length, with and
/// without `--sink-read`; a frame over the MTU without a segmentation request is still
/// dropped as `oversize`; a driver that negotiated no host offload has its super-frame
/// dropped as `oversize` too.
#[test]
fn sink_takes_super_frames_whole() {
    let _serial = serial();
    for read in [false, true] {
        let dir = TempDir::new("offload-sink");
        let (s1, s2) = (dir.join("s1.sock"), dir.join("s2.sock"));
        let (p1, p2) = (port("sink", &s1), port("sink", &s2));
        let mut args = vec!["--port", p1.as_str(), "--port", p2.as_str(), "--cores", "1"];
        if read {
            args.push("--sink-read");
        }
        let backend = Backend::start(&args);
        let mut a = raw(&s1, host_offloads() | mrg());
        let mut plain = raw(&s2, mrg());
        assert_eq!(a.features() & host_offloads(), host_offloads(), "sink offers the host offloads");
        assert_eq!(plain.features() & host_offloads(), 0);
        wait_connected(&backend, &[&s1, &s2]);
        let mut pkts = Vec::new();
        for (v6, len) in [(false, 20_000), (false, 64_000), (true, 20_000)] {
            pkts.push(tso_packet(v6, &payload(len, 3), if v6 { 1440 } else { 1448 }).0);
        }
        let csum = with_partial_csum(tcp_frame(false, &payload(1000, 5)), false, 16);
        let mut p = hdr(net_hdr::F_NEEDS_CSUM, 0, 0, 0, l4(false) as u16, 16);
        p.extend_from_slice(&csum);
        pkts.push(p);
        let whole: u64 = pkts.iter().map(|p| (p.len() - NET_HDR_LEN) as u64).sum();
        let mut big = hdr(0, 0, 0, 0, 0, 0);
        big.extend_from_slice(&tcp_frame(false, &payload(3000, 7)));
        pkts.push(big.clone());
        for p in &pkts {
            a.send_packets(TX, std::slice::from_ref(p)).unwrap();
            a.wait_tx_done(TX, IO_TIMEOUT).unwrap();
        }
        plain.send_packets(TX, &[pkts[0].clone()]).unwrap();
        plain.wait_tx_done(TX, IO_TIMEOUT).unwrap();
        let fin = backend.stop();
        let (d1, d2) = (device(&fin, &s1), device(&fin, &s2));
        assert_eq!((counter(d1, "rx_packets"), counter(d1, "rx_bytes")), (4, whole), "read {read}: {d1}");
        assert_eq!((counter(d1, "drops.oversize"), total_drops(d1)), (1, 1), "read {read}: {d1}");
        assert_eq!(counter(d2, "rx_packets"), 0, "{d2}");
        assert_eq!((counter(d2, "drops.oversize"), total_drops(d2)), (1, 1), "{d2}");
    }
}

/// A device's `offloads` counters, in the README's order.
fn offloads(dev: &Value) -> [u64; 6] {
    ["csum_requests", "gso_requests", "passed_whole", "sw_csum", "sw_gso", "sw_segments"]
        .map(|k| dev["offloads"][k].as_u64().unwrap_or_else(|| panic!("no offloads.{k}: {dev}")))
}

/// A frame with `NEEDS_CSUM` (TCP over IPv4 and IPv6, the field seeded with the
/// pseudo-header sum as Linux does) reaches a peer without GUEST_CSUM with a correct
/// checksum (verified independently), and one with GUEST_CSUM unchanged with the
/// request in its header.
#[test]
fn needs_csum_completed_for_a_peer_without_guest_csum() {
    needs_csum(false);
}

/// [`needs_csum_completed_for_a_peer_without_guest_csum`] with `--handoff`.
#[test]
fn needs_csum_completed_for_a_peer_without_guest_csum_handoff() {
    needs_csum(true);
}

fn needs_csum(handoff: bool) {
    let _serial = serial();
    for b_csum in [false, true] {
        let (_dir, sa, sb, backend) = xconnect_on("offload-csum", handoff, &[]);
        let mut a = raw(&sa, bits(&[features::NET_CSUM]));
        let b_want = if b_csum { bits(&[features::NET_GUEST_CSUM]) } else { 0 };
        let mut b = raw(&sb, b_want);
        wait_connected(&backend, &[&sa, &sb]);
        for (i, v6) in [false, true].into_iter().enumerate() {
            let frame = with_partial_csum(tcp_frame(v6, &payload(1000 + i, 3)), v6, 16);
            let start = l4(v6) as u16;
            let mut pkt = hdr(net_hdr::F_NEEDS_CSUM, net_hdr::GSO_NONE, 0, 0, start, 16);
            pkt.extend_from_slice(&frame);
            a.send_packets(TX, &[pkt]).unwrap();
            a.wait_tx_done(TX, IO_TIMEOUT).unwrap();
            let got = b.recv_packets(RX, 1, IO_TIMEOUT).unwrap();
            let (h, f) = got[0].split_at(NET_HDR_LEN);
            if b_csum {
                assert_eq!(f, &frame[..], "delivered unchanged");
                assert_eq!(h[0], net_hdr::F_NEEDS_CSUM);
                assert_eq!(u16::from_le_bytes([h[6], h[7]]), start);
                assert_eq!(u16::from_le_bytes([h[8], h[9]]), 16);
            } else {
                assert_eq!(h[0], 0, "no request left for a driver without GUEST_CSUM");
                check_segment(f, v6);
                let at = l4(v6) + 16;
                assert_eq!(
                    (&f[..at], &f[at + 2..]),
                    (&frame[..at], &frame[at + 2..]),
                    "only the checksum changed"
                );
            }
        }
        let fin = backend.stop();
        let (da, db) = (device(&fin, &sa), device(&fin, &sb));
        assert_eq!((counter(da, "rx_packets"), counter(db, "tx_packets")), (2, 2));
        assert_eq!(total_drops(da) + total_drops(db), 0, "A {da}\nB {db}");
        let want = if b_csum { [2, 0, 2, 0, 0, 0] } else { [2, 0, 0, 2, 0, 0] };
        assert_eq!(offloads(da), want, "A {da}");
    }
}

/// Hostile offload requests: num_buffers is the device's to write, so the guest's lies
/// are in its transmit header. On one device (xconnect A -> B): a gso_size larger than
/// the frame and the MTU allow, a checksum offset past the end of the frame, a chain
/// that ends in the middle of the TCP header, a GSO type the driver did not negotiate
/// (TSO6 with only TSO4), an unknown GSO type. Each is dropped and counted with its
/// reason, nothing of it reaches B, the queue keeps running (a good super-frame after
/// them is segmented), and a good `reflect` device on the same worker forwards exact
/// counts byte for byte all along.
#[test]
fn hostile_offload_requests_are_dropped_and_counted() {
    hostile_offload_requests(false);
}

/// [`hostile_offload_requests_are_dropped_and_counted`] with `--handoff` (A and the
/// `reflect` device on one worker, B on the other): refused on A's side, as there.
#[test]
fn hostile_offload_requests_are_dropped_and_counted_handoff() {
    hostile_offload_requests(true);
}

fn hostile_offload_requests(handoff: bool) {
    let _serial = serial();
    let dir = TempDir::new("offload-hostile");
    let (sa, sb, sg) = (dir.join("a.sock"), dir.join("b.sock"), dir.join("good.sock"));
    let xc = format!("xconnect:{},{}", sa.display(), sb.display());
    let reflect = port("reflect", &sg);
    let mut args = vec!["--port", xc.as_str(), "--port", reflect.as_str()];
    args.extend_from_slice(workers(handoff));
    let backend = Backend::start(&args);
    let tso4_only = bits(&[features::NET_CSUM, features::NET_HOST_TSO4]);
    let mut a = raw(&sa, tso4_only);
    let mut b = raw(&sb, 0);
    let mut good = raw(&sg, 0);
    wait_connected(&backend, &[&sa, &sb, &sg]);

    let mut good_frames = 0u64;
    let mut reflect_round = |good: &mut RawFrontend, seed: u16| {
        let frames: Vec<Vec<u8>> = (0..4).map(|i| test_frame(60 + 300 * i, seed + i as u16)).collect();
        good.send_frames(TX, &frames).unwrap();
        good.wait_tx_done(TX, IO_TIMEOUT).unwrap();
        assert_eq!(good.recv_frames(RX, frames.len(), IO_TIMEOUT).unwrap(), frames);
        good.post_rx_buffers(RX, frames.len() as u16, RX_BUF).unwrap();
        good_frames += frames.len() as u64;
    };
    reflect_round(&mut good, 100);

    let data = payload(4000, 9);
    let (ok4, _) = tso_packet(false, &data, 1448);
    // gso_size 60000: larger than the frame, and segments over the 1500-byte MTU.
    let mut big_mss = ok4.clone();
    big_mss[4..6].copy_from_slice(&60000u16.to_le_bytes());
    // NEEDS_CSUM at 34 + 4000: past the end of a 1054-byte frame.
    let mut past_end = hdr(net_hdr::F_NEEDS_CSUM, net_hdr::GSO_NONE, 0, 0, 34, 4000);
    past_end.extend(with_partial_csum(tcp_frame(false, &payload(1000, 1)), false, 16));
    // The chain ends 10 bytes into the TCP header.
    let cut = ok4[..NET_HDR_LEN + 34 + 10].to_vec();
    // TSO6 without HOST_TSO6.
    let (tso6, _) = tso_packet(true, &data, 1448);
    // gso_type 0x42: no such type.
    let mut unknown = ok4.clone();
    unknown[1] = 0x42;
    let bad = [
        (big_mss, "drops.bad_gso"),
        (past_end, "drops.bad_csum"),
        (cut, "drops.truncated_header"),
        (tso6, "drops.offload_not_negotiated"),
        (unknown, "drops.bad_gso"),
    ];
    for (p, _) in &bad {
        a.send_packets(TX, std::slice::from_ref(p)).unwrap();
        a.wait_tx_done(TX, IO_TIMEOUT).unwrap();
        reflect_round(&mut good, 200);
    }
    assert!(b.poll_rx_buffers(RX).unwrap().is_empty(), "nothing of the bad frames reached B");
    // The queue still runs: a good super-frame is segmented.
    a.send_packets(TX, &[ok4]).unwrap();
    a.wait_tx_done(TX, IO_TIMEOUT).unwrap();
    let got = b.recv_packets(RX, 3, IO_TIMEOUT).unwrap();
    let joined: Vec<u8> = got.iter().flat_map(|p| check_segment(&p[NET_HDR_LEN..], false).3).collect();
    assert_eq!(joined, data);
    reflect_round(&mut good, 300);

    let fin = backend.stop();
    let (da, db, dg) = (device(&fin, &sa), device(&fin, &sb), device(&fin, &sg));
    eprintln!("A {da}\nB {db}\ngood {dg}");
    assert_eq!(counter(da, "drops.bad_gso"), 2);
    assert_eq!(counter(da, "drops.bad_csum"), 1);
    assert_eq!(counter(da, "drops.truncated_header"), 1);
    assert_eq!(counter(da, "drops.offload_not_negotiated"), 1);
    assert_eq!(total_drops(da), bad.len() as u64, "{da}");
    assert_eq!(counter(da, "rx_packets"), 1, "only the good super-frame counts as received");
    assert_eq!(counter(db, "tx_packets"), 3);
    assert_eq!(total_drops(db), 0);
    assert_eq!(da["broken_queues"].as_u64(), Some(0));
    assert_eq!((counter(dg, "rx_packets"), counter(dg, "tx_packets")), (good_frames, good_frames));
    assert_eq!(total_drops(dg), 0);
}

/// A UDP frame (IPv4 or IPv6) with `payload`, checksums complete, IPv4 id 0x4242.
fn udp_frame(v6: bool, payload: &[u8]) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2(MAC_A, MAC_B);
    let b = if v6 { b.ipv6(IP6_A, IP6_B, 64) } else { b.ipv4(IP4_A, IP4_B, 64) };
    let b = b.udp(40000, 4789);
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).unwrap();
    with_ip4_id(out, v6)
}

/// A USO super-frame (`GSO_UDP_L4`, UDP over IPv4 and IPv6, 10 000 bytes of payload cut
/// at 1000) from A, a driver that negotiated `HOST_USO`, reaches B (no receive offloads)
/// as ten UDP datagrams, each with its own correct checksum and length (verified
/// independently), IPv4 ids counting up, and payloads that concatenate to the original;
/// counted as segmented on A.
#[test]
fn uso_super_frames_segmented_into_valid_datagrams() {
    uso_super_frames(false);
}

/// [`uso_super_frames_segmented_into_valid_datagrams`] with `--handoff`.
#[test]
fn uso_super_frames_segmented_into_valid_datagrams_handoff() {
    uso_super_frames(true);
}

fn uso_super_frames(handoff: bool) {
    use etherparse::{NetSlice, SlicedPacket, TransportSlice};
    let _serial = serial();
    let (_dir, sa, sb, backend) = xconnect_on("offload-uso", handoff, &[]);
    let uso = bits(&[features::NET_CSUM, features::NET_HOST_USO]);
    let mut a = raw(&sa, uso);
    let mut b = raw(&sb, 0);
    assert_eq!(a.features() & uso, uso, "HOST_USO offered");
    wait_connected(&backend, &[&sa, &sb]);
    const SIZE: usize = 1000;
    let mut segments = 0u64;
    for v6 in [false, true] {
        let data = payload(10 * SIZE, 5 + v6 as u8);
        let frame = with_partial_csum(udp_frame(v6, &data), v6, 6);
        let start = l4(v6) as u16;
        let mut pkt = hdr(net_hdr::F_NEEDS_CSUM, net_hdr::GSO_UDP_L4, start + 8, SIZE as u16, start, 6);
        pkt.extend_from_slice(&frame);
        a.send_packets(TX, &[pkt]).unwrap();
        a.wait_tx_done(TX, IO_TIMEOUT).unwrap();
        let got = b
            .recv_packets(RX, 10, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e}; stats {:?}\nlog {}", backend.latest_stats(), backend.log()));
        let mut joined = Vec::new();
        for (k, p) in got.iter().enumerate() {
            assert_eq!(&p[..NET_HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "plain header");
            let f = &p[NET_HDR_LEN..];
            let s =
                SlicedPacket::from_ethernet(f).unwrap_or_else(|e| panic!("segment {k} does not parse: {e}"));
            let (Some(net), Some(TransportSlice::Udp(udp))) = (s.net, s.transport) else {
                panic!("segment {k} is not UDP/IP: {f:?}")
            };
            assert_eq!(udp.length() as usize, 8 + SIZE, "UDP length of segment {k}");
            let want = match net {
                NetSlice::Ipv4(ip) => {
                    let h = ip.header();
                    assert_eq!(
                        h.header_checksum(),
                        h.to_header().calc_header_checksum(),
                        "IPv4 header checksum"
                    );
                    assert_eq!(h.total_len() as usize, f.len() - 14, "IPv4 total length");
                    assert_eq!(h.identification(), 0x4242 + k as u16, "IPv4 id of segment {k}");
                    udp.to_header()
                        .calc_checksum_ipv4_raw(h.source(), h.destination(), udp.payload())
                        .unwrap()
                }
                NetSlice::Ipv6(ip) => {
                    let h = ip.header();
                    assert_eq!(h.payload_length() as usize, f.len() - 54, "IPv6 payload length");
                    udp.to_header()
                        .calc_checksum_ipv6_raw(h.source(), h.destination(), udp.payload())
                        .unwrap()
                }
                NetSlice::Arp(_) => panic!("ARP"),
            };
            assert_eq!(udp.checksum(), want, "UDP checksum of segment {k} (v6 {v6})");
            joined.extend_from_slice(udp.payload());
        }
        assert_eq!(joined, data, "payloads concatenate to the original");
        segments += got.len() as u64;
    }
    let fin = backend.stop();
    let (da, db) = (device(&fin, &sa), device(&fin, &sb));
    assert_eq!((counter(da, "rx_packets"), counter(db, "tx_packets")), (2, segments));
    assert_eq!(total_drops(da) + total_drops(db), 0, "A {da}\nB {db}");
    assert_eq!(offloads(da), [0, 2, 0, 0, 2, segments], "A {da}");
}

/// Our driver on both ends of an `xconnect`: A negotiates CSUM and HOST_TSO4/6 and sends
/// TCP super-frames (IPv4 and IPv6, 20 000 bytes of payload, each a chain of pool
/// buffers) with their TSO request on the packet; B, without receive offloads, gets
/// valid segments (checked independently) whose payloads concatenate to the original;
/// with GUEST_CSUM, GUEST_TSO4/6 and MRG_RXBUF it gets each super-frame whole (merged
/// from several buffers) with the request in its receive metadata. With `handoff`, each
/// device on its own worker (`--handoff`).
fn driver_tso_through_xconnect(b_whole: bool, handoff: bool) {
    let _serial = serial();
    let (_dir, sa, sb, backend) = xconnect_on("offload-drv-tso", handoff, &[]);
    let mut a = driver_common::open(PortConfig { features: host_offloads(), ..PortConfig::virtio_user(&sa) })
        .unwrap_or_else(|e| panic!("open A: {e}"));
    let b_features = if b_whole { guest_offloads() | mrg() } else { 0 };
    let mut b = driver_common::open(PortConfig { features: b_features, ..PortConfig::virtio_user(&sb) })
        .unwrap_or_else(|e| panic!("open B: {e}"));
    assert_eq!(a.info().features & host_offloads(), host_offloads(), "A negotiated CSUM, HOST_TSO4/6");
    assert_eq!(b.info().features & b_features, b_features);
    let mut qa = a.queue_pair(0).expect("A's pair");
    let mut qb = b.queue_pair(0).expect("B's pair");
    wait_connected(&backend, &[&sa, &sb]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut sent, mut segments) = (0u64, 0u64);
    for v6 in [false, true] {
        let data = payload(20_000, 9 + v6 as u8);
        let mss: u16 = if v6 { 1440 } else { 1448 };
        let frame = with_partial_csum(tcp_frame(v6, &data), v6, 16);
        // The frame as a chain of 2000-byte pool buffers.
        let mut head: Option<Packet> = None;
        for part in frame.chunks(2000) {
            let mut p = a.pool().alloc().expect("A's pool has buffers");
            p.set_data(part).expect("2000 bytes fit a buffer");
            match head.as_mut() {
                None => head = Some(p),
                Some(h) => h.append(p).expect("same pool"),
            }
        }
        let mut pkt = head.expect("a frame");
        let kind = if v6 { GsoKind::TcpV6 } else { GsoKind::TcpV4 };
        pkt.set_tx_offload(TxOffload {
            csum: Some(TxCsum { start: l4(v6) as u16, offset: 16 }),
            gso: Some(TxGso { kind, size: mss, hdr_len: l4(v6) as u16 + 20 }),
        });
        let mut v = vec![pkt];
        while !v.is_empty() {
            qa.tx.tx_burst(&mut v);
            assert!(Instant::now() < deadline, "A's transmit ring stuck: {:?}", qa.tx.error());
        }
        sent += 1;
        let want = if b_whole { 1 } else { data.len().div_ceil(mss as usize) };
        let (mut got, mut meta): (Vec<Packet>, Vec<RxMeta>) = (Vec::new(), Vec::new());
        while got.len() < want {
            qb.rx.rx_burst_meta(&mut got, &mut meta, 32);
            assert!(
                Instant::now() < deadline,
                "B received {} of {want}; stats {:?}\n{}",
                got.len(),
                backend.latest_stats(),
                backend.log()
            );
        }
        assert_eq!(got.len(), want, "exactly the frames expected");
        let flat: Vec<Vec<u8>> = got
            .iter()
            .map(|p| {
                let mut f = Vec::with_capacity(p.total_len());
                for seg in p.segments() {
                    f.extend_from_slice(seg);
                }
                f
            })
            .collect();
        if b_whole {
            assert_eq!(flat[0], frame, "the super-frame arrives whole, byte for byte");
            let m = meta[0];
            let t = if v6 { net_hdr::GSO_TCPV6 } else { net_hdr::GSO_TCPV4 };
            assert_eq!(
                (m.gso_type, m.gso_size, m.flags & net_hdr::F_NEEDS_CSUM),
                (t, mss, net_hdr::F_NEEDS_CSUM),
                "{m:?}"
            );
            assert_eq!((m.csum_start as usize, m.csum_offset), (l4(v6), 16), "{m:?}");
            segments += 1;
        } else {
            let mut joined = Vec::new();
            for (k, f) in flat.iter().enumerate() {
                assert!(f.len() <= 1514, "segment of {} bytes over the MTU", f.len());
                let (seq, (fin, psh), id, pl) = check_segment(f, v6);
                assert_eq!(seq, SEQ.wrapping_add(joined.len() as u32), "sequence number of segment {k}");
                assert_eq!((fin, psh), (false, k + 1 == want), "PSH only on the last segment");
                if let Some(id) = id {
                    assert_eq!(id, 0x4242 + k as u16, "IPv4 id of segment {k}");
                }
                joined.extend(pl);
                assert_eq!(meta[k].gso_type, net_hdr::GSO_NONE, "a plain segment");
            }
            assert_eq!(joined, data, "payloads concatenate to the original");
            segments += want as u64;
        }
        drop(got);
    }
    driver_common::drain_tx(&mut qa.tx, deadline);
    let sa_stats = a.stats();
    assert_eq!((sa_stats[0].tx_packets, sa_stats[0].tx_errors), (sent, 0), "{sa_stats:?}");
    assert_eq!(b.stats()[0].rx_packets, segments);
    let (avail, cap) = driver_common::close(a, vec![qa]);
    assert_eq!(avail, cap, "A's buffers all back");
    let (avail, cap) = driver_common::close(b, vec![qb]);
    assert_eq!(avail, cap, "B's buffers all back");
    let fin = backend.stop();
    let (da, db) = (device(&fin, &sa), device(&fin, &sb));
    assert_eq!((counter(da, "rx_packets"), counter(db, "tx_packets")), (sent, segments));
    assert_eq!(total_drops(da) + total_drops(db), 0, "A {da}\nB {db}");
    let want = if b_whole { [0, sent, sent, 0, 0, 0] } else { [0, sent, 0, 0, sent, segments] };
    assert_eq!(offloads(da), want, "A {da}");
}

#[test]
fn driver_tso_through_xconnect_segmented() {
    driver_tso_through_xconnect(false, false);
}

#[test]
fn driver_tso_through_xconnect_whole() {
    driver_tso_through_xconnect(true, false);
}

#[test]
fn driver_tso_through_xconnect_handoff_segmented() {
    driver_tso_through_xconnect(false, true);
}

#[test]
fn driver_tso_through_xconnect_handoff_whole() {
    driver_tso_through_xconnect(true, true);
}
