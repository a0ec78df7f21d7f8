//! Issue 17, driver side, across processes: our driver (virtio-user mode, in this test
//! process) against DPDK 22.11's vhost PMD (`net_vhost` in `dpdk-testpmd`), which offers
//! `MRG_RXBUF` and `CSUM` by default, and `HOST_TSO4/6` with its `tso=1` devarg.
//!
//! * `jumbo_frames_*`: 9000-byte frames with `VIRTIO_NET_F_MRG_RXBUF` both ways. Each
//!   frame leaves as a chain of pool buffers (one descriptor chain), DPDK's `io` engine
//!   sends it straight back, and it arrives spread over several receive buffers, merged
//!   into one chained packet: every frame's bytes compared exactly with what was sent, the
//!   counts equal on both sides (split and packed rings).
//! * `chained_transmit_arrives_whole`: frames built from `--txpkts`-style segments
//!   (60 + 200 + 1000 + 254 bytes, four pool buffers each) come back from DPDK's `io`
//!   engine as one flat frame each (no MRG_RXBUF), byte for byte.
//! * `bad_offload_requests_are_counted_and_not_sent`: requests the port did not
//!   negotiate, or whose checksum field lies outside the frame, are dropped and counted in
//!   `tx_errors`; DPDK's `rxonly` engine receives exactly the good frames.
//!
//! * `device_mtu_is_read_and_bounded` (against the `evil-device` in its faithful mode,
//!   which reports the MTU `--mtu` gives): 9000 is taken (with MRG_RXBUF; without it the
//!   2 KiB buffers are refused with a reason), above 9000 is used as 9000, below 68 is
//!   refused.
//!
//! Each test takes the cross-binary [`serial`] lock, bounds every wait, and closes the
//! port and testpmd (whose `Drop` kills it if an assertion fails first).

mod driver_common;

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use driver::layout::features as f;
use driver::offload::GsoKind;
use driver::{Packet, Port, PortConfig, QueuePair, TxCsum, TxGso, TxOffload};
use vnet_tests::dpdk::{Role, Testpmd};
use vnet_tests::harness::{serial, TempDir};

use driver_common::{close, drain_tx, open, BURST};

const DPDK_FWD_CPU: u32 = 1;
const TRAFFIC_TIMEOUT: Duration = Duration::from_secs(60);

/// DPDK's vhost PMD with testpmd; `--no-flush-rx` so nothing sent before `start` is lost.
fn vhost(sock: &Path) -> Testpmd {
    vhost_with(sock, "")
}

/// [`vhost`] with extra `net_vhost` devargs (`tso=1`: offer HOST_TSO4/TSO6, which 22.11's
/// vhost PMD leaves out by default).
fn vhost_with(sock: &Path, devargs: &str) -> Testpmd {
    Testpmd::start_with_devargs(
        Role::Vhost { path: sock.to_path_buf(), queues: 1 },
        devargs,
        64,
        DPDK_FWD_CPU,
        &["--no-flush-rx", "--mbuf-size=2176", "--max-pkt-len=9018"],
    )
}

fn open_on(pmd: &Testpmd, sock: &Path, packed: bool, extra: u64) -> Port {
    let mut cfg = PortConfig::virtio_user(sock);
    cfg.packed = packed;
    cfg.features |= extra;
    let port = open(cfg).unwrap_or_else(|e| {
        panic!("Port::open against DPDK net_vhost: {e} ({e:?})\ntestpmd log:\n{}", pmd.log())
    });
    assert!(
        pmd.wait_log("virtio is now ready", Duration::from_secs(10)),
        "DPDK's vhost device never became ready:\n{}",
        pmd.log()
    );
    let got = port.info().features;
    assert_eq!(got & extra, extra, "DPDK's vhost PMD offers {} (negotiated {got:#x})", f::names(extra));
    assert_eq!(got & f::bit(f::RING_PACKED) != 0, packed);
    port
}

/// Frame `seq` of `len` bytes: Ethernet/IPv4/UDP headers with consistent lengths, the
/// sequence number at offset 42, then bytes that depend on `seq` and the offset.
fn frame(seq: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    b[0..6].copy_from_slice(&driver_common::DST_MAC);
    b[6..12].copy_from_slice(&driver_common::SRC_MAC);
    b[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (len - 14) as u16;
    b[14] = 0x45;
    b[16..18].copy_from_slice(&ip_len.to_be_bytes());
    b[22] = 64;
    b[23] = 17;
    b[26..30].copy_from_slice(&[10, 0, 0, 1]);
    b[30..34].copy_from_slice(&[10, 0, 0, 2]);
    let c = driver_common::ipv4_checksum(&b[14..34]);
    b[24..26].copy_from_slice(&c.to_be_bytes());
    b[34..36].copy_from_slice(&1024u16.to_be_bytes());
    b[36..38].copy_from_slice(&1025u16.to_be_bytes());
    b[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    b[42..50].copy_from_slice(&seq.to_le_bytes());
    for (i, x) in b[50..].iter_mut().enumerate() {
        *x = (seq as usize).wrapping_mul(31).wrapping_add(i.wrapping_mul(7)) as u8;
    }
    b
}

fn seq_of(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[42..50].try_into().expect("8 bytes"))
}

/// The whole frame of `p` (every segment).
fn flat(p: &Packet) -> Vec<u8> {
    let mut v = vec![0u8; p.total_len()];
    p.copy_to(&mut v).expect("fits");
    v
}

/// Sends frames `0..n` (each built by `make` as a packet, kept in flight at most
/// `window` at a time) through DPDK's `io` engine and receives them back: every frame
/// arrives once, in order, byte for byte. Returns (segments per received frame, seen).
fn loop_through_io(
    qp: &mut QueuePair,
    port: &Port,
    n: u64,
    window: u64,
    make: impl Fn(&Port, u64) -> Packet,
    expect: impl Fn(u64) -> Vec<u8>,
) -> Vec<usize> {
    let deadline = Instant::now() + TRAFFIC_TIMEOUT;
    let (mut sent, mut got) = (0u64, 0u64);
    let mut pending: VecDeque<Packet> = VecDeque::new();
    let mut batch = Vec::with_capacity(BURST);
    let mut segs = Vec::new();
    while got < n {
        assert!(
            Instant::now() < deadline,
            "{got} of {n} frames back ({sent} sent) at the deadline: rx error {:?}, tx error {:?}, stats {:?}",
            qp.rx.error(),
            qp.tx.error(),
            port.stats()
        );
        while sent < n && sent - got < window && pending.len() < 4 {
            pending.push_back(make(port, sent));
            sent += 1;
        }
        if !pending.is_empty() {
            let mut v: Vec<Packet> = pending.drain(..).collect();
            qp.tx.tx_burst(&mut v);
            pending.extend(v);
        }
        qp.tx.reclaim();
        qp.rx.rx_burst(&mut batch, BURST);
        for p in batch.drain(..) {
            let bytes = flat(&p);
            assert_eq!(seq_of(&bytes), got, "frames come back in order");
            assert!(bytes == expect(got), "frame {got} came back different ({} bytes)", bytes.len());
            segs.push(p.nb_segs());
            got += 1;
        }
    }
    drain_tx(&mut qp.tx, deadline);
    assert_eq!((qp.rx.error(), qp.tx.error()), (None, None));
    segs
}

/// Stops DPDK's forwarding and returns its forward statistics (`quit` sends `stop`).
fn finish(pmd: Testpmd) -> vnet_tests::dpdk::PortCounts {
    pmd.quit()
}

fn jumbo(packed: bool) {
    const N: u64 = 300;
    const LEN: usize = 9000;
    let _serial = serial();
    let dir = TempDir::new("drv-offload-jumbo");
    let sock = dir.join("vhost.sock");
    let mut pmd = vhost(&sock);
    let mut port = open_on(&pmd, &sock, packed, f::bit(f::NET_MRG_RXBUF));
    let mut qp = port.queue_pair(0).expect("queue pair 0");
    pmd.cmd("set fwd io");
    pmd.cmd("start");
    assert!(pmd.wait_log("io packet forwarding - ports", Duration::from_secs(5)), "{}", pmd.log());

    let segs = loop_through_io(
        &mut qp,
        &port,
        N,
        16,
        |port, s| {
            let p = port.pool().alloc_chain(&frame(s, LEN), 2048).expect("pool has buffers");
            assert_eq!(p.nb_segs(), 5, "9000 bytes in 2048-byte segments");
            p
        },
        |s| frame(s, LEN),
    );
    // 9000 bytes and a 12-byte header over buffers of 1996 posted bytes: 5 of them.
    assert!(segs.iter().all(|&k| k == 5), "segments per received frame: {segs:?}");
    let st = port.stats();
    assert_eq!((st[0].tx_packets, st[0].tx_bytes), (N, N * LEN as u64));
    assert_eq!((st[0].rx_packets, st[0].rx_bytes), (N, N * LEN as u64));
    assert_eq!((st[0].rx_errors, st[0].tx_errors, st[0].device_errors), (0, 0, 0));
    let (avail, cap) = close(port, vec![qp]);
    assert_eq!(avail, cap, "every buffer (every segment) back in the pool after close");
    let dpdk = finish(pmd);
    assert_eq!((dpdk.rx_packets, dpdk.tx_packets, dpdk.tx_dropped), (N, N, 0), "DPDK's counts");
}

#[test]
fn jumbo_frames_with_mergeable_buffers_both_ways() {
    jumbo(false);
}

#[test]
fn jumbo_frames_with_mergeable_buffers_both_ways_packed() {
    jumbo(true);
}

/// `--txpkts=60,200,1000,254`-style frames: four segments each, sent as one descriptor
/// chain, reflected by DPDK as one flat 1514-byte frame.
#[test]
fn chained_transmit_arrives_whole() {
    const N: u64 = 2000;
    const SEGS: [usize; 4] = [60, 200, 1000, 254];
    let total: usize = SEGS.iter().sum();
    let _serial = serial();
    let dir = TempDir::new("drv-offload-chain");
    let sock = dir.join("vhost.sock");
    let mut pmd = vhost(&sock);
    let mut port = open_on(&pmd, &sock, false, 0);
    let mut qp = port.queue_pair(0).expect("queue pair 0");
    pmd.cmd("set fwd io");
    pmd.cmd("start");
    assert!(pmd.wait_log("io packet forwarding - ports", Duration::from_secs(5)), "{}", pmd.log());
    let segs = loop_through_io(
        &mut qp,
        &port,
        N,
        64,
        |port, s| {
            let f = frame(s, total);
            let pool = port.pool();
            let mut at = 0;
            let mut head: Option<Packet> = None;
            for len in SEGS {
                let mut p = pool.alloc().expect("pool has buffers");
                p.set_data(&f[at..at + len]).expect("fits");
                at += len;
                match head.as_mut() {
                    None => head = Some(p),
                    Some(h) => h.append(p).expect("same pool"),
                }
            }
            let h = head.expect("four segments");
            assert_eq!((h.nb_segs(), h.total_len()), (4, total));
            h
        },
        |s| frame(s, total),
    );
    assert!(segs.iter().all(|&k| k == 1), "without MRG_RXBUF every frame is one buffer");
    let st = port.stats();
    assert_eq!((st[0].tx_packets, st[0].tx_bytes), (N, N * total as u64));
    assert_eq!((st[0].rx_packets, st[0].rx_bytes, st[0].tx_errors), (N, N * total as u64, 0));
    let (avail, cap) = close(port, vec![qp]);
    assert_eq!(avail, cap);
    let dpdk = finish(pmd);
    assert_eq!((dpdk.rx_packets, dpdk.tx_packets), (N, N));
}

/// Sends rounds of frames with the requests `reqs` (each marked good or bad) into DPDK's
/// `rxonly`: the bad ones are counted in `tx_errors` and never reach DPDK.
fn offload_round(extra: u64, reqs: &[(TxOffload, bool)]) {
    const ROUNDS: u64 = 50;
    let _serial = serial();
    let dir = TempDir::new("drv-offload-bad");
    let sock = dir.join("vhost.sock");
    let mut pmd = vhost_with(&sock, "tso=1");
    let mut port = open_on(&pmd, &sock, false, extra);
    let mut qp = port.queue_pair(0).expect("queue pair 0");
    pmd.cmd("set fwd rxonly");
    pmd.cmd("start");
    assert!(pmd.wait_log("rxonly packet forwarding - ports", Duration::from_secs(5)), "{}", pmd.log());
    let deadline = Instant::now() + TRAFFIC_TIMEOUT;
    let (mut good, mut bad, mut bytes) = (0u64, 0u64, 0u64);
    let len = 1000;
    for r in 0..ROUNDS {
        let mut v: Vec<Packet> = reqs
            .iter()
            .enumerate()
            .map(|(k, (o, ok))| {
                let mut p = port.pool().alloc().expect("pool has buffers");
                p.set_data(&frame(r * 100 + k as u64, len)).expect("fits");
                p.set_tx_offload(*o);
                if *ok {
                    good += 1;
                    bytes += len as u64;
                } else {
                    bad += 1;
                }
                p
            })
            .collect();
        while !v.is_empty() {
            qp.tx.tx_burst(&mut v);
            assert!(Instant::now() < deadline, "transmit ring stuck: {:?}", qp.tx.error());
        }
    }
    drain_tx(&mut qp.tx, deadline);
    let st = port.stats();
    assert_eq!((st[0].tx_packets, st[0].tx_bytes, st[0].tx_errors), (good, bytes, bad), "{st:?}");
    let (avail, cap) = close(port, vec![qp]);
    assert_eq!(avail, cap, "refused packets went back to the pool");
    let dpdk = finish(pmd);
    assert_eq!(dpdk.rx_packets, good, "DPDK received exactly the good frames");
}

const CSUM_UDP: TxOffload = TxOffload { csum: Some(TxCsum { start: 34, offset: 6 }), gso: None };

#[test]
fn bad_offload_requests_are_counted_and_not_sent() {
    // CSUM, HOST_TSO4 negotiated: a checksum past the frame's end, a TSO request without
    // its checksum, and USO (not offered by DPDK 22.11's vhost PMD) are refused.
    let tso = TxOffload {
        csum: Some(TxCsum { start: 34, offset: 16 }),
        gso: Some(TxGso { kind: GsoKind::TcpV4, size: 500, hdr_len: 54 }),
    };
    let outside = TxOffload { csum: Some(TxCsum { start: 990, offset: 16 }), gso: None };
    let tso_no_csum = TxOffload { csum: None, gso: tso.gso };
    let uso =
        TxOffload { csum: CSUM_UDP.csum, gso: Some(TxGso { kind: GsoKind::UdpL4, size: 500, hdr_len: 42 }) };
    offload_round(
        f::bit(f::NET_CSUM) | f::bit(f::NET_HOST_TSO4),
        &[
            (TxOffload::default(), true),
            (CSUM_UDP, true),
            (outside, false),
            (tso, true),
            (tso_no_csum, false),
            (uso, false),
        ],
    );
}

/// Without `VIRTIO_NET_F_CSUM` negotiated, every request is refused; plain frames pass.
#[test]
fn offload_requests_without_the_features_are_refused() {
    offload_round(0, &[(TxOffload::default(), true), (CSUM_UDP, false), (TxOffload::default(), true)]);
}

/// The `evil-device` binary of this package.
const EVIL: &str = env!("CARGO_BIN_EXE_evil-device");

/// Opens a port on an evil-device (faithful mode) reporting `mtu`, with `features` added.
fn open_with_mtu(
    mtu: u16,
    features: u64,
) -> Result<(Port, vnet_tests::evildevice::EvilDevice), driver::Error> {
    use vnet_tests::evildevice::{EvilDevice, Mode};
    let mtu = mtu.to_string();
    let dev = EvilDevice::spawn_args(Path::new(EVIL), Mode::GOOD, 3, false, false, &["--mtu", &mtu]);
    let mut cfg = PortConfig::virtio_user(dev.socket());
    cfg.features |= features;
    open(cfg).map(|p| (p, dev))
}

#[test]
fn device_mtu_is_read_and_bounded() {
    let _serial = serial();
    let mrg = f::bit(f::NET_MRG_RXBUF);
    // 9000 with mergeable buffers: frames span several 2 KiB buffers.
    let (port, _dev) = open_with_mtu(9000, mrg).expect("MTU 9000 with MRG_RXBUF");
    assert_eq!(port.info().mtu, 9000);
    assert_ne!(port.info().features & mrg, 0);
    let (avail, cap) = close(port, Vec::new());
    assert_eq!(avail, cap);
    // Without them one buffer must hold a whole frame: refused with the reason.
    match open_with_mtu(9000, 0) {
        Err(e) => assert!(e.to_string().contains("below MTU 9000 + 14"), "{e}"),
        Ok(_) => panic!("MTU 9000 in 2 KiB buffers without MRG_RXBUF was accepted"),
    }
    // Above 9000: used as 9000.
    let (port, _dev) = open_with_mtu(65535, mrg).expect("MTU 65535");
    assert_eq!(port.info().mtu, 9000);
    close(port, Vec::new());
    // Below 68: a config-space value out of range.
    match open_with_mtu(67, mrg) {
        Err(e) => assert!(e.to_string().contains("MTU 67, below 68"), "{e}"),
        Ok(_) => panic!("MTU 67 was accepted"),
    }
}
