//! The driver's control queue, multi-queue and XDP-style hook against our `host-backend`
//! (a child process serving the control queue), and against DPDK's `net_vhost` (which
//! offers `VIRTIO_NET_F_CTRL_VQ` without serving the control queue).
//!
//! Every control command is checked by its effect on the traffic the backend delivers
//! (frames a filter rejects do not arrive and are counted as `drops.filtered`; the pair
//! count decides which receive queues carry traffic; the guest-offload state decides
//! whether `gen` sends super-frames), and by the backend's own view at the end
//! (`ctrl.commands`, `rx_filter`, `active_pairs`). XDP verdicts are checked byte for byte
//! on frames that went round the backend. Each test takes the cross-binary
//! [`serial`] lock, bounds every wait, and asserts exact counts.

mod driver_common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use driver::layout::{features as f, net_hdr};
use driver::mempool::MAX_BUF_SIZE;
use driver::{Control, Error, Packet, Port, PortConfig, RxMeta, RxQueue, TxQueue, XdpVerdict};
use serde_json::Value;
use vnet_tests::dpdk::{Role, Testpmd};
use vnet_tests::harness::{counter, device, serial, Backend, TempDir};

use driver_common::{close, drain_tx, open, write_frame, BURST, DST_MAC, SEQ_OFFSET};

/// The backend's default device MAC.
const BACKEND_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const TIMEOUT: Duration = Duration::from_secs(30);
/// How long to keep polling after the last expected frame, to catch extra ones.
const QUIET: Duration = Duration::from_millis(150);

fn backend(args: &[&str]) -> Backend {
    let mut v = vec!["--cores", "1"];
    v.extend_from_slice(args);
    Backend::start(&v)
}

fn port_arg(kind: &str, sock: &Path) -> String {
    format!("{kind}:{}", sock.display())
}

/// Test frame `seq` (UDP/IPv4, from `driver_common`) with destination `dst`, cut to at
/// most `max` bytes.
fn frame_to(dst: [u8; 6], seq: u64, max: usize) -> Vec<u8> {
    let mut f = Vec::new();
    write_frame(&mut f, seq);
    f.truncate(max.max(SEQ_OFFSET + 12));
    f[0..6].copy_from_slice(&dst);
    f
}

/// `frame` with an 802.1Q tag for `vid` after the MAC addresses.
fn tagged(frame: &[u8], vid: u16) -> Vec<u8> {
    let mut v = frame[..12].to_vec();
    v.extend_from_slice(&[0x81, 0x00]);
    v.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    v.extend_from_slice(&frame[12..]);
    v
}

/// Sends `frames` on `tx` (retrying what the ring hands back) and waits until the device
/// has completed them all.
fn send(pool: &driver::Mempool, tx: &mut TxQueue, frames: &[Vec<u8>]) {
    let deadline = Instant::now() + TIMEOUT;
    let mut pending: Vec<Packet> = Vec::with_capacity(BURST);
    let mut next = 0;
    while next < frames.len() || !pending.is_empty() {
        while pending.len() < BURST && next < frames.len() {
            let Some(mut p) = pool.alloc() else { break };
            p.set_data(&frames[next]).expect("a test frame fits a buffer");
            pending.push(p);
            next += 1;
        }
        tx.tx_burst(&mut pending);
        assert!(
            Instant::now() < deadline,
            "could not send {} frames (tx error {:?})",
            frames.len(),
            tx.error()
        );
    }
    drain_tx(tx, deadline);
}

/// Receives on `rx` until `want` frames arrived and then nothing more for [`QUIET`]
/// (panics on more, or on fewer by the deadline); returns their bytes.
fn receive_exactly(rx: &mut RxQueue, want: usize) -> Vec<Vec<u8>> {
    let deadline = Instant::now() + TIMEOUT;
    let mut got = Vec::new();
    let mut batch = Vec::with_capacity(BURST);
    let mut last = Instant::now();
    loop {
        if rx.rx_burst(&mut batch, BURST) > 0 {
            got.extend(batch.drain(..).map(|p| p.data().to_vec()));
            last = Instant::now();
            assert!(got.len() <= want, "{} frames arrived, {want} expected", got.len());
        }
        if got.len() == want && last.elapsed() >= QUIET {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {want} frames arrived before the deadline (rx error {:?})",
            got.len(),
            rx.error()
        );
    }
}

/// Sends `frames` on a reflecting port and checks that exactly those at `arrive`
/// (indices) come back, byte for byte, in order.
fn round(pool: &driver::Mempool, qp: &mut driver::QueuePair, frames: &[Vec<u8>], arrive: bool) -> u64 {
    send(pool, &mut qp.tx, frames);
    let want: Vec<&Vec<u8>> = if arrive { frames.iter().collect() } else { Vec::new() };
    let got = receive_exactly(&mut qp.rx, want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(&g, w, "frame {i} came back different");
    }
    if arrive {
        0
    } else {
        frames.len() as u64
    }
}

fn final_device(fin: &Value, sock: &Path) -> Value {
    let d = device(fin, sock).clone();
    eprintln!("backend: {d}");
    assert_eq!(counter(&d, "broken_queues"), 0, "broken queues: {d}");
    assert_eq!(d["ctrl"]["broken"], Value::Bool(false), "control queue broken: {d}");
    d
}

/// Promiscuous and all-multicast modes, the MAC table and the MAC address, each checked
/// by what a `reflect` port delivers back (frames the filter rejects are counted as
/// `drops.filtered` by the backend and never arrive).
#[test]
fn rx_mode_and_mac_filters_decide_what_arrives() {
    let _serial = serial();
    let dir = TempDir::new("ctrl-rx");
    let sock = dir.join("reflect.sock");
    let be = backend(&["--port", &port_arg("reflect", &sock)]);
    let mut port = open(PortConfig::virtio_user(&sock)).expect("open");
    let info = port.info().clone();
    assert!(info.control_queue, "our backend serves the control queue: {info:?}");
    for b in
        [f::NET_CTRL_VQ, f::NET_CTRL_RX, f::NET_CTRL_VLAN, f::NET_CTRL_MAC_ADDR, f::NET_CTRL_GUEST_OFFLOADS]
    {
        assert!(info.features & f::bit(b) != 0, "{} not negotiated: {info:?}", f::name(b));
    }
    let ctl = port.control();
    let pool = port.pool().clone();
    let mut qp = port.queue_pair(0).unwrap();

    const OTHER: [u8; 6] = [0x02, 0x76, 0x6e, 0x65, 0x74, 0x03];
    const MCAST: [u8; 6] = [0x01, 0x00, 0x5e, 0x00, 0x00, 0x01];
    const MCAST2: [u8; 6] = [0x01, 0x00, 0x5e, 0x00, 0x00, 0x02];
    let mut seq = 0u64;
    let mut batch = |dst: [u8; 6], n: usize| -> Vec<Vec<u8>> {
        (0..n)
            .map(|_| {
                seq += 1;
                frame_to(dst, seq, 1514)
            })
            .collect()
    };
    let (mut filtered, mut commands) = (0u64, 0u64);
    let mut cmd = |r: driver::Result<()>| {
        r.expect("control command");
        commands += 1;
    };

    // The device starts promiscuous (QEMU's default): a foreign unicast frame arrives.
    filtered += round(&pool, &mut qp, &batch(DST_MAC, 50), true);
    cmd(ctl.set_promisc(false));
    filtered += round(&pool, &mut qp, &batch(DST_MAC, 50), false);
    filtered += round(&pool, &mut qp, &batch(BACKEND_MAC, 50), true);
    filtered += round(&pool, &mut qp, &batch([0xff; 6], 20), true);
    filtered += round(&pool, &mut qp, &batch(MCAST, 20), false);
    cmd(ctl.set_allmulti(true));
    filtered += round(&pool, &mut qp, &batch(MCAST, 20), true);
    cmd(ctl.set_allmulti(false));
    filtered += round(&pool, &mut qp, &batch(MCAST, 20), false);
    cmd(ctl.set_mac_table(&[DST_MAC], &[MCAST]));
    filtered += round(&pool, &mut qp, &batch(DST_MAC, 50), true);
    filtered += round(&pool, &mut qp, &batch(MCAST, 20), true);
    filtered += round(&pool, &mut qp, &batch(MCAST2, 20), false);
    filtered += round(&pool, &mut qp, &batch(OTHER, 20), false);
    cmd(ctl.set_mac_table(&[], &[]));
    filtered += round(&pool, &mut qp, &batch(DST_MAC, 50), false);
    cmd(ctl.set_mac_addr(DST_MAC));
    filtered += round(&pool, &mut qp, &batch(DST_MAC, 50), true);
    filtered += round(&pool, &mut qp, &batch(BACKEND_MAC, 50), false);
    cmd(ctl.set_promisc(true));
    filtered += round(&pool, &mut qp, &batch(OTHER, 50), true);
    // Bad arguments never reach the device.
    assert!(matches!(ctl.set_mac_addr(MCAST), Err(Error::Config(_))));
    assert!(matches!(ctl.set_mac_table(&[MCAST], &[]), Err(Error::Config(_))));

    let st = port.stats()[0];
    assert_eq!((st.rx_errors, st.device_errors), (0, 0));
    // The device's filter state while the port is open (a reset restores the defaults).
    let live =
        be.wait_stats(Duration::from_secs(5), |s| counter(device(s, &sock), "ctrl.commands") == commands);
    let rx_filter = device(&live, &sock)["rx_filter"].clone();
    assert_eq!(rx_filter["promisc"], Value::Bool(true), "{rx_filter}");
    assert_eq!(rx_filter["allmulti"], Value::Bool(false), "{rx_filter}");
    assert_eq!(rx_filter["mac"], Value::String("02:76:6e:65:74:02".into()), "{rx_filter}");
    assert_eq!((rx_filter["unicast"].as_u64(), rx_filter["multicast"].as_u64()), (Some(0), Some(0)));
    let (avail, cap) = close(port, vec![qp]);
    assert_eq!(avail, cap, "every buffer back in the pool");
    let d = final_device(&be.stop(), &sock);
    assert_eq!(counter(&d, "drops.filtered"), filtered, "filtered frames: {d}");
    assert_eq!(counter(&d, "rx_packets"), st.tx_packets);
    assert_eq!(counter(&d, "tx_packets"), st.rx_packets);
    assert_eq!(st.tx_packets - st.rx_packets, filtered);
    assert_eq!(counter(&d, "ctrl.commands"), commands);
    assert_eq!(counter(&d, "ctrl.errors"), 0);
}

/// VLAN filtering: with `CTRL_VLAN` negotiated and promiscuous mode off, tagged frames
/// arrive only for the VLANs added; untagged ones are not affected.
#[test]
fn vlan_filter_follows_add_and_del() {
    let _serial = serial();
    let dir = TempDir::new("ctrl-vlan");
    let sock = dir.join("reflect.sock");
    let be = backend(&["--port", &port_arg("reflect", &sock)]);
    let mut port = open(PortConfig::virtio_user(&sock)).expect("open");
    let ctl = port.control();
    let pool = port.pool().clone();
    let mut qp = port.queue_pair(0).unwrap();
    let frames = |vid: Option<u16>, from: u64| -> Vec<Vec<u8>> {
        (from..from + 40)
            .map(|s| {
                let f = frame_to(BACKEND_MAC, s, 1400);
                vid.map_or(f.clone(), |v| tagged(&f, v))
            })
            .collect()
    };
    let mut filtered = 0;
    ctl.set_promisc(false).unwrap();
    filtered += round(&pool, &mut qp, &frames(Some(100), 0), false);
    filtered += round(&pool, &mut qp, &frames(None, 100), true);
    ctl.vlan_add(100).unwrap();
    filtered += round(&pool, &mut qp, &frames(Some(100), 200), true);
    filtered += round(&pool, &mut qp, &frames(Some(200), 300), false);
    ctl.vlan_add(200).unwrap();
    filtered += round(&pool, &mut qp, &frames(Some(200), 400), true);
    ctl.vlan_del(100).unwrap();
    filtered += round(&pool, &mut qp, &frames(Some(100), 500), false);
    filtered += round(&pool, &mut qp, &frames(Some(200), 600), true);
    let live = be.wait_stats(Duration::from_secs(5), |s| counter(device(s, &sock), "ctrl.commands") == 4);
    assert_eq!(counter(device(&live, &sock), "rx_filter.vlans"), 1, "VLAN 200 only");
    ctl.vlan_del(200).unwrap();
    assert!(matches!(ctl.vlan_add(4096), Err(Error::Config(_))), "VLAN ids are 12 bits");
    let live = be.wait_stats(Duration::from_secs(5), |s| counter(device(s, &sock), "ctrl.commands") == 5);
    assert_eq!(counter(device(&live, &sock), "rx_filter.vlans"), 0, "every VLAN deleted again");

    let (avail, cap) = close(port, vec![qp]);
    assert_eq!(avail, cap);
    let d = final_device(&be.stop(), &sock);
    assert_eq!(counter(&d, "drops.filtered"), filtered);
    assert_eq!(counter(&d, "ctrl.commands"), 5);
}

/// Receives on every queue of `rxs` for `dur`; returns the frames each received.
fn receive_for(rxs: &mut [RxQueue], dur: Duration) -> Vec<u64> {
    let mut n = vec![0u64; rxs.len()];
    let mut batch = Vec::with_capacity(BURST);
    let until = Instant::now() + dur;
    while Instant::now() < until {
        for (i, rx) in rxs.iter_mut().enumerate() {
            n[i] += rx.rx_burst(&mut batch, BURST) as u64;
            driver::free_bulk(&mut batch);
        }
    }
    n
}

/// `VQ_PAIRS_SET` at run time, while `gen` sends on every active pair: after the device
/// acknowledged one pair, the second receive queue gets nothing beyond what its ring
/// already held; after two, both carry traffic again. Pairs beyond those set up are
/// refused before anything is sent.
#[test]
fn queue_pairs_choose_the_receive_queues_at_run_time() {
    let _serial = serial();
    let dir = TempDir::new("ctrl-mq");
    let sock = dir.join("gen.sock");
    let be = backend(&["--port", &port_arg("gen", &sock), "--queues", "2", "--pkt-size", "64"]);
    let mut cfg = PortConfig::virtio_user(&sock);
    cfg.queue_pairs = 2;
    let mut port = open(cfg).expect("open");
    assert_eq!((port.info().queue_pairs, port.info().max_queue_pairs), (2, 2));
    let ctl = port.control();
    assert_eq!(ctl.queue_pairs(), 2);
    let pairs = port.take_queue_pairs();
    let (mut rxs, txs): (Vec<RxQueue>, Vec<TxQueue>) = pairs.into_iter().map(|p| (p.rx, p.tx)).unzip();

    let n = receive_for(&mut rxs, Duration::from_millis(500));
    assert!(n[0] > 1000 && n[1] > 1000, "both queues carry traffic with 2 pairs: {n:?}");
    ctl.set_queue_pairs(1).unwrap();
    assert_eq!(ctl.queue_pairs(), 1);
    // What the second ring held when the device acknowledged, then nothing.
    let n = receive_for(&mut rxs, Duration::from_millis(300));
    assert!(n[1] <= 256, "queue 1 got {} frames after VQ_PAIRS_SET 1 (ring of 256)", n[1]);
    let n = receive_for(&mut rxs, Duration::from_millis(500));
    assert!(n[0] > 1000, "queue 0 keeps receiving: {n:?}");
    assert_eq!(n[1], 0, "queue 1 is inactive: {n:?}");
    let mid = be.wait_stats(Duration::from_secs(5), |s| device(s, &sock)["active_pairs"] == 1);
    assert_eq!(device(&mid, &sock)["active_pairs"], 1);

    ctl.set_queue_pairs(2).unwrap();
    let n = receive_for(&mut rxs, Duration::from_millis(500));
    assert!(n[0] > 1000 && n[1] > 1000, "both queues again: {n:?}");
    assert!(matches!(ctl.set_queue_pairs(3), Err(Error::Config(_))), "only 2 pairs set up");
    assert!(matches!(ctl.set_queue_pairs(0), Err(Error::Config(_))));

    let st = port.stats();
    assert_eq!(st.iter().map(|s| s.rx_errors + s.device_errors).sum::<u64>(), 0);
    let pairs: Vec<driver::QueuePair> = rxs
        .into_iter()
        .zip(txs)
        .enumerate()
        .map(|(i, (rx, tx))| driver::QueuePair { index: i as u16, rx, tx })
        .collect();
    let (avail, cap) = close(port, pairs);
    assert_eq!(avail, cap);
    let d = final_device(&be.stop(), &sock);
    assert_eq!(counter(&d, "ctrl.commands"), 3, "VQ_PAIRS_SET 2 at open, then 1, then 2");
    assert_eq!(counter(&d, "ctrl.errors"), 0);
}

/// Two pairs on two threads through `reflect --queues 2`: each pair sends N frames and
/// receives exactly those N back, byte for byte; the per-queue counts of the driver and
/// of the backend agree and add up to 2N.
#[test]
fn two_pairs_carry_exact_per_queue_counts() {
    const N: u64 = 30_000;
    let _serial = serial();
    let dir = TempDir::new("ctrl-2q");
    let sock = dir.join("reflect.sock");
    let be = backend(&["--port", &port_arg("reflect", &sock), "--queues", "2"]);
    let mut cfg = PortConfig::virtio_user(&sock);
    cfg.queue_pairs = 2;
    let mut port = open(cfg).expect("open");
    let pool = port.pool().clone();
    let handles: Vec<_> = port
        .take_queue_pairs()
        .into_iter()
        .map(|mut qp| {
            let pool = pool.clone();
            thread::spawn(move || {
                let q = qp.index as u64;
                // Queue q sends the sequence numbers q, q+2, q+4, ...
                let seqs: Vec<u64> = (0..N).map(|i| 2 * i + q).collect();
                let deadline = Instant::now() + TIMEOUT;
                let (mut next, mut got) = (0usize, 0usize);
                let mut pending = Vec::with_capacity(BURST);
                let mut batch = Vec::with_capacity(BURST);
                let mut buf = Vec::new();
                while got < seqs.len() {
                    while pending.len() < BURST && next < seqs.len() {
                        let Some(mut p) = pool.alloc() else { break };
                        write_frame(&mut buf, seqs[next]);
                        p.set_data(&buf).unwrap();
                        pending.push(p);
                        next += 1;
                    }
                    qp.tx.tx_burst(&mut pending);
                    if qp.rx.rx_burst(&mut batch, BURST) > 0 {
                        for p in batch.drain(..) {
                            write_frame(&mut buf, seqs[got]);
                            assert_eq!(
                                p.data(),
                                &buf[..],
                                "queue {q}: frame {got} (in order, byte for byte)"
                            );
                            got += 1;
                        }
                    }
                    assert!(Instant::now() < deadline, "queue {q}: {got} of {N} back before the deadline");
                }
                drain_tx(&mut qp.tx, deadline);
                assert_eq!(receive_exactly(&mut qp.rx, 0).len(), 0);
                qp
            })
        })
        .collect();
    let pairs: Vec<driver::QueuePair> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let st = port.stats();
    for (q, s) in st.iter().enumerate() {
        assert_eq!((s.tx_packets, s.rx_packets), (N, N), "driver queue {q}: {s:?}");
    }
    let (avail, cap) = close(port, pairs);
    assert_eq!(avail, cap);
    let d = final_device(&be.stop(), &sock);
    let queues = d["queues"].as_array().unwrap();
    for (q, s) in st.iter().enumerate() {
        assert_eq!(counter(&queues[q], "rx_packets"), N, "backend queue {q}");
        assert_eq!(counter(&queues[q], "tx_packets"), N, "backend queue {q}");
        assert_eq!(counter(&queues[q], "rx_bytes"), s.tx_bytes, "backend queue {q} bytes");
    }
    assert_eq!(counter(&d, "rx_packets"), 2 * N);
    assert_eq!(counter(&d, "tx_packets"), 2 * N);
}

/// A port that negotiates guest checksum and TSO4 with a `gen --gso-size` device: big
/// buffers (receive super-frames), and the opt-in features.
fn gso_port(sock: &Path) -> Port {
    let mut cfg = PortConfig::virtio_user(sock);
    cfg.features |= f::bit(f::NET_GUEST_CSUM) | f::bit(f::NET_GUEST_TSO4);
    cfg.buf_size = MAX_BUF_SIZE;
    cfg.buffers = Some(600);
    let port = open(cfg).expect("open with GUEST_TSO4");
    let feats = port.info().features;
    assert!(feats & f::bit(f::NET_GUEST_TSO4) != 0, "GUEST_TSO4 negotiated: {feats:#x}");
    port
}

const GSO_PKT: usize = 6000;
const MSS: usize = 1448;

/// What kind of frame `gen --gso-size` delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A TCPv4 super-frame, partial checksum.
    Super,
    /// A segment with a partial checksum.
    Partial,
    /// A segment with a complete checksum.
    Whole,
}

fn kind(p: &Packet, m: &RxMeta) -> Kind {
    if m.is_gso() {
        assert_eq!(m.gso_type, net_hdr::GSO_TCPV4);
        assert_eq!(m.gso_size as usize, MSS);
        assert!(m.needs_csum());
        assert_eq!(p.total_len(), GSO_PKT, "a whole super-frame");
        Kind::Super
    } else {
        assert!(p.total_len() <= 14 + 20 + 20 + MSS, "a segment of at most one MSS: {}", p.total_len());
        if m.needs_csum() {
            assert_eq!((m.csum_start, m.csum_offset), (34, 16), "TCP checksum after Ethernet+IPv4");
            Kind::Partial
        } else {
            assert_eq!(m.flags & net_hdr::F_NEEDS_CSUM, 0);
            Kind::Whole
        }
    }
}

/// Receives until frames of kind `want` arrive, then checks that the next `n` frames are
/// all of that kind (frames already in the ring when the device acknowledged a command
/// may be of the old kind; none after the first new one).
fn expect_kind(rx: &mut RxQueue, want: Kind, n: usize) {
    let deadline = Instant::now() + TIMEOUT;
    let (mut batch, mut meta) = (Vec::with_capacity(BURST), Vec::with_capacity(BURST));
    let (mut seen, mut old) = (0usize, 0usize);
    while seen < n {
        rx.rx_burst_meta(&mut batch, &mut meta, BURST);
        for (p, m) in batch.drain(..).zip(meta.drain(..)) {
            let k = kind(&p, &m);
            if seen == 0 && k != want {
                old += 1;
                assert!(old <= 600, "still {k:?} frames, {want:?} expected");
                continue;
            }
            assert_eq!(k, want, "frame {seen} after the switch");
            seen += 1;
        }
        assert!(Instant::now() < deadline, "{seen} of {n} {want:?} frames before the deadline");
    }
}

/// `GUEST_OFFLOADS_SET` changes what `gen --gso-size` delivers: super-frames with TSO4,
/// partially checksummed segments with checksum offload only, complete segments with
/// neither; an XDP program switches TSO off while attached (it never sees a
/// super-frame) and detaching restores it.
#[test]
fn guest_offloads_change_what_the_backend_delivers() {
    let _serial = serial();
    let dir = TempDir::new("ctrl-gso");
    let sock = dir.join("gen.sock");
    let size = GSO_PKT.to_string();
    let mss = MSS.to_string();
    let be = backend(&["--port", &port_arg("gen", &sock), "--pkt-size", &size, "--gso-size", &mss]);
    let mut port = gso_port(&sock);
    let ctl = port.control();
    let mut qp = port.queue_pair(0).unwrap();
    let csum = f::bit(f::NET_GUEST_CSUM);
    let tso = csum | f::bit(f::NET_GUEST_TSO4);
    assert_eq!(ctl.guest_offloads(), tso, "every negotiated offload starts on");

    expect_kind(&mut qp.rx, Kind::Super, 200);
    ctl.set_guest_offloads(csum).unwrap();
    expect_kind(&mut qp.rx, Kind::Partial, 500);
    ctl.set_guest_offloads(0).unwrap();
    expect_kind(&mut qp.rx, Kind::Whole, 500);
    ctl.set_guest_offloads(tso).unwrap();
    expect_kind(&mut qp.rx, Kind::Super, 200);
    let e = ctl.set_guest_offloads(f::bit(f::NET_GUEST_TSO6)).unwrap_err();
    assert!(e.to_string().contains("VIRTIO_NET_F_GUEST_TSO6"), "{e}");

    // An XDP program: TSO goes off, checksum offload stays.
    let big = Arc::new(AtomicBool::new(false));
    let b2 = big.clone();
    qp.rx
        .attach_xdp(Box::new(move |p: &mut Packet| {
            if p.len() > 1514 {
                b2.store(true, Ordering::Relaxed);
            }
            XdpVerdict::Pass
        }))
        .unwrap();
    assert_eq!(ctl.guest_offloads(), csum);
    expect_kind(&mut qp.rx, Kind::Partial, 500);
    assert!(!big.load(Ordering::Relaxed), "the program never saw a super-frame");
    qp.rx.detach_xdp().unwrap();
    assert_eq!(ctl.guest_offloads(), tso, "restored");
    expect_kind(&mut qp.rx, Kind::Super, 200);

    let st = port.stats()[0];
    eprintln!("gso: driver {st:?}");
    assert_eq!((st.rx_errors, st.device_errors), (0, 0));
    let live = be.wait_stats(Duration::from_secs(5), |s| counter(device(s, &sock), "ctrl.commands") == 5);
    assert_eq!(counter(device(&live, &sock), "rx_filter.guest_offloads"), tso);
    let (avail, cap) = close(port, vec![qp]);
    assert_eq!(avail, cap);
    let d = final_device(&be.stop(), &sock);
    // Three sets, then the attach and the detach.
    assert_eq!(counter(&d, "ctrl.commands"), 5);
    assert_eq!(counter(&d, "ctrl.errors"), 0);
}

/// `gen --gso-size` into a port with mergeable receive buffers (2 KiB pool buffers
/// instead of 64 KiB ones): the super-frames arrive whole as multi-buffer packets with
/// their GSO metadata, and with TSO off as segments; the pool is whole at the end.
#[test]
fn gen_super_frames_over_mergeable_buffers() {
    let _serial = serial();
    let dir = TempDir::new("ctrl-gso-mrg");
    let sock = dir.join("gen.sock");
    let size = GSO_PKT.to_string();
    let mss = MSS.to_string();
    let be = backend(&["--port", &port_arg("gen", &sock), "--pkt-size", &size, "--gso-size", &mss]);
    let mut cfg = PortConfig::virtio_user(&sock);
    cfg.features |= f::bit(f::NET_GUEST_CSUM) | f::bit(f::NET_GUEST_TSO4) | f::bit(f::NET_MRG_RXBUF);
    let mut port = open(cfg).expect("open with GUEST_TSO4 and MRG_RXBUF");
    assert_ne!(port.info().features & f::bit(f::NET_MRG_RXBUF), 0, "MRG_RXBUF negotiated");
    let ctl = port.control();
    let mut qp = port.queue_pair(0).unwrap();
    expect_kind(&mut qp.rx, Kind::Super, 300);
    ctl.set_guest_offloads(0).unwrap();
    expect_kind(&mut qp.rx, Kind::Whole, 300);
    let st = port.stats()[0];
    assert_eq!((st.rx_errors, st.device_errors), (0, 0), "{st:?}");
    let (avail, cap) = close(port, vec![qp]);
    assert_eq!(avail, cap);
    let d = final_device(&be.stop(), &sock);
    assert_eq!(counter(&d, "drops.rx_buffer_too_small"), 0, "{d}");
}

/// Frames of the XDP test: 60..=1400 bytes (room for the program's growth within the
/// MTU), never ending with a program trailer.
fn xdp_frame(seq: u64) -> Vec<u8> {
    let len = 60 + (seq.wrapping_mul(7919) % 1341) as usize;
    let f = frame_to(DST_MAC, seq, len);
    assert!(!f.ends_with(b"XDPT"));
    f
}

fn seq_in(d: &[u8]) -> Option<u64> {
    driver_common::seq_of(d)
}

/// Each verdict on frames that went round a `reflect` port, checked byte for byte: PASS
/// with 4 bytes pushed at the head; DROP; TX with the head grown and the tail cut and
/// grown (the bounced frame comes back and passes); REDIRECT with the head pulled and
/// the tail grown, to another queue of the same port and to another port sharing the
/// buffer pool. No copy anywhere (`tx_copied` 0), exact verdict counts, and every
/// buffer back in the pool.
#[test]
fn xdp_verdicts_with_head_and_tail_adjustments_byte_for_byte() {
    const N: u64 = 8_000;
    let _serial = serial();
    let dir = TempDir::new("ctrl-xdp");
    let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
    let be =
        backend(&["--port", &port_arg("reflect", &sa), "--port", &port_arg("reflect", &sb), "--queues", "2"]);
    let mut ca = PortConfig::virtio_user(&sa);
    ca.queue_pairs = 2;
    ca.buffers = Some(4096);
    let mut a = open(ca).expect("open port A");
    let mut cb = PortConfig::virtio_user(&sb);
    cb.pool = Some(a.pool().clone());
    let mut b = open(cb).expect("open port B on A's pool");
    let pool = a.pool().clone();
    let mut pa = a.take_queue_pairs();
    let mut a1 = pa.pop().unwrap();
    let mut a0 = pa.pop().unwrap();
    let mut b0 = b.queue_pair(0).unwrap();

    a0.rx
        .attach_xdp(Box::new(|p: &mut Packet| {
            if p.data().ends_with(b"XDPT") {
                return XdpVerdict::Pass; // a TX bounce, back from the reflector
            }
            let seq = seq_in(p.data()).expect("a test frame");
            match seq % 8 {
                0 | 4 => {
                    p.push_head(4).unwrap().copy_from_slice(&[0xde, 0xad, 0xbe, 0xef]);
                    XdpVerdict::Pass
                }
                1 | 5 => XdpVerdict::Drop,
                2 | 6 => {
                    p.push_head(2).unwrap().copy_from_slice(&[0x11, 0x22]);
                    p.trim_tail(3).unwrap();
                    p.push_tail(4).unwrap().copy_from_slice(b"XDPT");
                    XdpVerdict::Tx
                }
                3 => {
                    p.pull_head(2).unwrap();
                    p.push_tail(3).unwrap().copy_from_slice(&[7, 8, 9]);
                    XdpVerdict::Redirect(0)
                }
                _ => {
                    p.pull_head(2).unwrap();
                    p.push_tail(3).unwrap().copy_from_slice(&[7, 8, 9]);
                    XdpVerdict::Redirect(1)
                }
            }
        }))
        .unwrap();

    let mut want_a0 = std::collections::VecDeque::new();
    let (mut want_a1, mut want_b) = (std::collections::VecDeque::new(), std::collections::VecDeque::new());
    for s in 0..N {
        let f = xdp_frame(s);
        match s % 8 {
            0 | 4 => want_a0.push_back([&[0xde, 0xad, 0xbe, 0xef][..], &f].concat()),
            2 | 6 => {} // the bounce order interleaves with passes: checked as a set below
            3 => want_a1.push_back([&f[2..], &[7, 8, 9][..]].concat()),
            7 => want_b.push_back([&f[2..], &[7, 8, 9][..]].concat()),
            _ => {}
        }
    }
    let mut want_bounced: std::collections::HashMap<u64, Vec<u8>> = (0..N)
        .filter(|s| s % 4 == 2)
        .map(|s| {
            let f = xdp_frame(s);
            (s, [&[0x11, 0x22][..], &f[..f.len() - 3], b"XDPT"].concat())
        })
        .collect();

    let deadline = Instant::now() + TIMEOUT;
    let (mut next, mut got) = (0u64, 0usize);
    let total = want_a0.len() + want_bounced.len() + want_a1.len() + want_b.len();
    let mut pending = Vec::with_capacity(BURST);
    let mut batch = Vec::with_capacity(BURST);
    while got < total {
        // The program's TX output goes first: new frames only once it is all out (the
        // output vectors are bounded; what overflows them is dropped as aborted).
        if a0.rx.xdp_out().tx.is_empty() {
            while pending.len() < BURST && next < N {
                let Some(mut p) = pool.alloc() else { break };
                p.set_data(&xdp_frame(next)).unwrap();
                pending.push(p);
                next += 1;
            }
            a0.tx.tx_burst(&mut pending);
        }
        // A0: PASS (tagged) and bounced TX frames; flush the program's output.
        a0.rx.rx_burst(&mut batch, BURST);
        for p in batch.drain(..) {
            let d = p.data();
            if d.ends_with(b"XDPT") {
                let s = seq_in(&d[2..]).expect("bounced frame keeps its sequence number");
                assert_eq!(want_bounced.remove(&s).as_deref(), Some(d), "bounced frame {s}");
            } else {
                assert_eq!(Some(d), want_a0.pop_front().as_deref(), "passed frame");
            }
            got += 1;
        }
        let out = a0.rx.xdp_out();
        a0.tx.tx_burst(&mut out.tx);
        a1.tx.tx_burst(&mut out.redirect[0]);
        b0.tx.tx_burst(&mut out.redirect[1]);
        for (rx, want, name) in [(&mut a1.rx, &mut want_a1, "A queue 1"), (&mut b0.rx, &mut want_b, "B")] {
            rx.rx_burst(&mut batch, BURST);
            for p in batch.drain(..) {
                assert_eq!(Some(p.data()), want.pop_front().as_deref(), "redirected frame on {name}");
                got += 1;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{got} of {total} frames back before the deadline: missing {} passed, {} bounced, {} on A1, {} on B; \
             A {:?} B {:?}; backend {:?}",
            want_a0.len(),
            want_bounced.len(),
            want_a1.len(),
            want_b.len(),
            a.stats(),
            b.stats(),
            be.latest_stats()
        );
    }
    assert!(want_a0.is_empty() && want_bounced.is_empty() && want_a1.is_empty() && want_b.is_empty());
    for q in [&mut a0.tx, &mut a1.tx, &mut b0.tx] {
        drain_tx(q, deadline);
    }
    for rx in [&mut a0.rx, &mut a1.rx, &mut b0.rx] {
        assert_eq!(receive_exactly(rx, 0).len(), 0);
    }
    assert!(a0.rx.xdp_out().is_empty());

    let (sa_st, sb_st) = (a.stats(), b.stats());
    eprintln!("xdp: A {sa_st:?}\nB {sb_st:?}");
    let q = N / 8;
    let s0 = sa_st[0];
    assert_eq!(s0.xdp_pass, 2 * q + 2 * q, "passed: 2 classes + the TX bounces");
    assert_eq!((s0.xdp_drop, s0.xdp_tx, s0.xdp_redirect, s0.xdp_aborted), (2 * q, 2 * q, 2 * q, 0));
    assert_eq!(s0.rx_packets, N + 2 * q, "every frame once, the bounces twice");
    assert_eq!(s0.tx_packets, N + 2 * q, "sent: N, then the TX verdicts");
    assert_eq!((sa_st[1].tx_packets, sa_st[1].rx_packets), (q, q));
    assert_eq!((sb_st[0].tx_packets, sb_st[0].rx_packets), (q, q));
    for s in sa_st.iter().chain(&sb_st) {
        assert_eq!((s.tx_copied, s.tx_nobuf, s.device_errors), (0, 0, 0), "zero-copy: {s:?}");
    }
    a0.rx.detach_xdp().unwrap();
    let (avail_b, _) = close(b, vec![b0]);
    let (avail, cap) = close(a, vec![a0, a1]);
    assert!(avail_b <= avail);
    assert_eq!(avail, cap, "every buffer of the shared pool back");
    let fin = be.stop();
    let (da, db) = (final_device(&fin, &sa), final_device(&fin, &sb));
    assert_eq!(counter(&da, "rx_packets"), N + 2 * q + q);
    assert_eq!(counter(&db, "rx_packets"), q);
}

/// Attaching and detaching programs over and over while `gen` sends super-frames and a
/// second thread sends control commands on the same port: the offloads switch with
/// every first attach and last detach, every frame the device delivered is accounted
/// for exactly (delivered, dropped by the program, or aborted as a super-frame that was
/// already in the ring), and every buffer is back in the pool at the end.
#[test]
fn attach_and_detach_under_traffic_lose_nothing() {
    const COUNT: &str = "40000";
    let _serial = serial();
    let dir = TempDir::new("ctrl-xdp-live");
    let sock = dir.join("gen.sock");
    let size = "3000".to_string();
    let mss = MSS.to_string();
    let be = backend(&[
        "--port",
        &port_arg("gen", &sock),
        "--pkt-size",
        &size,
        "--gso-size",
        &mss,
        "--count",
        COUNT,
    ]);
    let mut port = gso_port(&sock);
    let ctl = port.control();
    let pool = port.pool().clone();
    let mut qp = port.queue_pair(0).unwrap();

    // Another thread drives the control queue meanwhile (the device's MAC stays the
    // destination of gen's frames, so promiscuous mode does not change what arrives).
    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let (ctl, stop): (Control, _) = (ctl.clone(), stop.clone());
        thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                ctl.set_promisc(n % 2 == 0).expect("set_promisc from another thread");
                n += 1;
                thread::sleep(Duration::from_millis(2));
            }
            n
        })
    };

    let mut batch = Vec::with_capacity(BURST);
    let (mut delivered, mut toggles) = (0u64, 0u64);
    let mut last = Instant::now();
    let deadline = Instant::now() + TIMEOUT;
    let mut k = 0u64;
    loop {
        let n = qp.rx.rx_burst(&mut batch, BURST);
        if n > 0 {
            last = Instant::now();
            delivered += n as u64;
            for p in &batch {
                if qp.rx.xdp_attached() {
                    assert!(p.len() <= 1514, "a program passed a {}-byte frame", p.len());
                }
            }
            driver::free_bulk(&mut batch);
        }
        k += 1;
        if k % 200 == 0 {
            if qp.rx.xdp_attached() {
                qp.rx.detach_xdp().expect("detach under traffic");
            } else {
                let mut i = 0u64;
                qp.rx
                    .attach_xdp(Box::new(move |_: &mut Packet| {
                        i += 1;
                        if i % 3 == 0 {
                            XdpVerdict::Drop
                        } else {
                            XdpVerdict::Pass
                        }
                    }))
                    .expect("attach under traffic");
            }
            toggles += 1;
        }
        // gen sends as fast as we take frames: a second without any means it is done.
        if delivered > 0 && last.elapsed() > Duration::from_secs(1) {
            break;
        }
        assert!(Instant::now() < deadline, "gen did not finish: {:?}", be.latest_stats());
    }
    stop.store(true, Ordering::Relaxed);
    let commands = other.join().unwrap();
    if qp.rx.xdp_attached() {
        qp.rx.detach_xdp().unwrap();
        toggles += 1;
    }
    let st = port.stats()[0];
    eprintln!("live: {toggles} toggles, {commands} promisc commands, delivered {delivered}, {st:?}");
    assert!(toggles >= 10, "only {toggles} attach/detach cycles");
    assert_eq!(st.rx_packets, delivered + st.xdp_drop + st.xdp_aborted, "every frame accounted for");
    assert_eq!(ctl.guest_offloads(), f::bit(f::NET_GUEST_CSUM) | f::bit(f::NET_GUEST_TSO4));
    let (avail, cap) = close(port, vec![qp]);
    assert_eq!(avail, cap, "every buffer back in the pool");
    assert_eq!(pool.available(), pool.capacity());
    let d = final_device(&be.stop(), &sock);
    assert_eq!(counter(&d, "tx_packets"), st.rx_packets, "the device delivered exactly what we received");
    assert_eq!(counter(&d, "ctrl.errors"), 0);
    // Every attach switched TSO off and every detach switched it back on.
    assert_eq!(counter(&d, "ctrl.commands"), commands + toggles);
}

/// DPDK's `net_vhost` offers `VIRTIO_NET_F_CTRL_VQ` (and MQ, CTRL_RX) but does not serve
/// the control queue: the first command reports it clearly after the timeout, the next
/// at once; commands whose feature DPDK does not offer name it without waiting; an XDP
/// program cannot switch DPDK's guest TSO off. The data path is unaffected.
#[test]
fn dpdk_net_vhost_does_not_serve_the_control_queue() {
    const N: u64 = 2_000;
    let _serial = serial();
    let dir = TempDir::new("ctrl-dpdk");
    let sock = dir.join("vhost.sock");
    let mut pmd = Testpmd::start(Role::Vhost { path: sock.clone(), queues: 1 }, 64, 1, &["--no-flush-rx"]);
    let mut cfg = PortConfig::virtio_user(&sock);
    cfg.ctrl_timeout = Duration::from_millis(500);
    let t = Instant::now();
    let mut port = open(cfg).unwrap_or_else(|e| panic!("open on net_vhost: {e}\n{}", pmd.log()));
    eprintln!("open took {:?}: {:?}", t.elapsed(), port.info());
    assert!(pmd.wait_log("virtio is now ready", Duration::from_secs(10)), "{}", pmd.log());
    let ctl = port.control();
    assert!(port.info().control_queue, "DPDK offers CTRL_VQ");

    // The first command waits for the timeout, the next fails at once.
    let t = Instant::now();
    let e = ctl.set_promisc(true).unwrap_err();
    let waited = t.elapsed();
    assert!(matches!(e, Error::ControlNotServed { .. }), "{e:?}");
    assert!(e.to_string().contains("does not serve the control virtqueue"), "{e}");
    assert!(waited >= Duration::from_millis(500) && waited < Duration::from_secs(5), "{waited:?}");
    let t = Instant::now();
    let e = ctl.set_allmulti(true).unwrap_err();
    assert!(matches!(e, Error::ControlNotServed { waited_ms: 0, .. }), "{e:?}");
    assert!(t.elapsed() < Duration::from_millis(200), "no second wait: {:?}", t.elapsed());
    for (r, name) in [
        (ctl.vlan_add(10), "VIRTIO_NET_F_CTRL_VLAN"),
        (ctl.set_mac_addr([2, 0, 0, 0, 0, 9]), "VIRTIO_NET_F_CTRL_MAC_ADDR"),
        (ctl.set_guest_offloads(0), "VIRTIO_NET_F_CTRL_GUEST_OFFLOADS"),
    ] {
        match r {
            Err(Error::Unsupported { feature, .. }) => assert_eq!(feature, name),
            other => panic!("{name}: {other:?}"),
        }
    }

    // The data path is unaffected (DPDK counts what it received).
    pmd.cmd("set fwd rxonly");
    pmd.cmd("start");
    assert!(pmd.wait_log("rxonly packet forwarding - ports", Duration::from_secs(5)), "{}", pmd.log());
    let pool = port.pool().clone();
    let mut pairs = port.take_queue_pairs();
    for (i, qp) in pairs.iter_mut().enumerate() {
        let frames: Vec<Vec<u8>> = (0..N).map(|s| frame_to(DST_MAC, s + i as u64 * N, 1514)).collect();
        send(&pool, &mut qp.tx, &frames);
    }
    let st = port.stats();
    assert_eq!(st[0].tx_packets, N);
    let (avail, cap) = close(port, pairs);
    assert_eq!(avail, cap);
    let counts = pmd.quit();
    assert_eq!(counts.rx_packets, N, "DPDK received every frame");

    // Guest TSO on and no CTRL_GUEST_OFFLOADS: an XDP program is refused, as Linux does.
    let mut pmd = Testpmd::start(Role::Vhost { path: sock.clone(), queues: 1 }, 64, 1, &["--no-flush-rx"]);
    let mut cfg = PortConfig::virtio_user(&sock);
    cfg.features |= f::bit(f::NET_GUEST_CSUM) | f::bit(f::NET_GUEST_TSO4);
    cfg.buf_size = MAX_BUF_SIZE;
    cfg.buffers = Some(600);
    let mut port = open(cfg).unwrap_or_else(|e| panic!("open with TSO on net_vhost: {e}\n{}", pmd.log()));
    assert!(port.info().features & f::bit(f::NET_GUEST_TSO4) != 0, "DPDK offers GUEST_TSO4");
    let mut qp = port.queue_pair(0).unwrap();
    let e = qp.rx.attach_xdp(Box::new(|_: &mut Packet| XdpVerdict::Pass)).unwrap_err();
    assert!(matches!(e, Error::XdpOffloads { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("VIRTIO_NET_F_GUEST_TSO4") && msg.contains("VIRTIO_NET_F_CTRL_GUEST_OFFLOADS"),
        "{msg}"
    );
    assert!(!qp.rx.xdp_attached());
    let (avail, cap) = close(port, vec![qp]);
    assert_eq!(avail, cap);
    pmd.cmd("quit");
    drop(pmd);
}
