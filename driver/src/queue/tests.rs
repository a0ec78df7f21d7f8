//! Unit tests of the receive and transmit queues and the XDP hook, over an in-process
//! fake device.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::*;
use crate::ctrl::Control;
use crate::ctrl::ControlParams;
use crate::dma::DmaArena;
use crate::error::Error;
use crate::layout::features as f;
use crate::layout::{net_hdr, NET_HDR_LEN};
use crate::ring::fake::FakeDevice;
use crate::ring::DriverRing;
use std::time::Duration;

const RING: u16 = 16;

/// A receive queue (and optionally its transmit half) over an in-process fake device.
struct Rig {
    rx: RxQueue,
    tx: TxQueue,
    rx_dev: FakeDevice,
    tx_dev: FakeDevice,
    pool: Mempool,
    stats: Arc<PairStats>,
    stopped: Stopped,
}

fn control(features: u64) -> Control {
    Control::new(
        ControlParams {
            device: "fake".into(),
            features,
            virtio_user: true,
            timeout: Duration::from_millis(10),
            pairs: 1,
            active_pairs: 1,
        },
        None,
    )
}

fn rig_with(headroom: u16, mtu: u16, features: u64) -> Rig {
    rig_full(headroom, mtu, features, false)
}

fn rig_full(headroom: u16, mtu: u16, features: u64, mrg: bool) -> Rig {
    let arena = Arc::new(DmaArena::new(4 << 20, false).unwrap());
    let pool = Mempool::new(arena.clone(), 64, 2048 + headroom as u32, headroom).unwrap();
    let stats = Arc::new(PairStats::default());
    let stopped: Stopped = Arc::new(AtomicBool::new(false));
    let rx_ring = DriverRing::new(&arena, RING, Default::default()).unwrap();
    let tx_ring = DriverRing::new(&arena, RING, Default::default()).unwrap();
    let (rx_dev, tx_dev) = (FakeDevice::new(&rx_ring), FakeDevice::new(&tx_ring));
    let ctl = control(features);
    let mut rx =
        RxQueue::with_merge(rx_ring, pool.clone(), stats.clone(), 64, stopped.clone(), ctl, mtu, mrg);
    rx.refill();
    let tx = TxQueue::new(tx_ring, pool.clone(), stats.clone(), stopped.clone(), features);
    Rig { rx, tx, rx_dev, tx_dev, pool, stats, stopped }
}

fn rig() -> Rig {
    rig_with(256, 1500, 0)
}

impl Rig {
    /// The device delivers `frame` with header `hdr` into the next posted buffer.
    fn deliver_with(&mut self, hdr: [u8; NET_HDR_LEN], frame: &[u8]) {
        let (head, chain) = self.rx_dev.pop_avail().expect("a posted receive buffer");
        let d = chain[0];
        assert!(d.len as usize >= NET_HDR_LEN + frame.len());
        self.rx_dev.write(d.addr, &hdr);
        self.rx_dev.write(d.addr + NET_HDR_LEN as u64, frame);
        self.rx_dev.push_used(head as u32, (NET_HDR_LEN + frame.len()) as u32);
    }
    fn deliver(&mut self, frame: &[u8]) {
        self.deliver_with([0; NET_HDR_LEN], frame)
    }
    /// Frames the device took from the transmit ring: (header, frame).
    fn transmitted(&mut self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut v = Vec::new();
        while let Some((head, chain)) = self.tx_dev.pop_avail() {
            let b = self.tx_dev.read(chain[0].addr, chain[0].len as usize);
            v.push((b[..NET_HDR_LEN].to_vec(), b[NET_HDR_LEN..].to_vec()));
            self.tx_dev.push_used(head as u32, 0);
        }
        v
    }
    fn snapshot(&self) -> QueueStatsSnapshot {
        self.stats.snapshot()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // The "device" is gone: posted buffers may come back.
        self.stopped.store(true, Ordering::Release);
    }
}

fn frame(tag: u8, len: usize) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| i as u8 ^ 0x5a).collect();
    f[0] = tag;
    f
}

/// The program of the verdict tests: the first byte picks the verdict; Tx frames
/// grow a 4-byte tag at the head and lose 2 bytes at the tail, Redirect frames lose
/// 2 bytes at the head and grow 3 at the tail.
fn by_first_byte(p: &mut Packet) -> XdpVerdict {
    match p.data()[0] {
        0 => XdpVerdict::Pass,
        1 => XdpVerdict::Drop,
        2 => {
            p.push_head(4).unwrap().copy_from_slice(&[0xaa, 0xbb, 0xcc, 0xdd]);
            p.trim_tail(2).unwrap();
            XdpVerdict::Tx
        }
        3 => {
            p.pull_head(2).unwrap();
            p.push_tail(3).unwrap().copy_from_slice(&[7, 8, 9]);
            XdpVerdict::Redirect(1)
        }
        _ => XdpVerdict::Redirect(XDP_TARGETS as u16),
    }
}

#[test]
fn every_verdict_does_what_it_says_with_head_and_tail_adjusted() {
    let mut r = rig();
    let full = r.pool.capacity();
    r.rx.attach_xdp(Box::new(by_first_byte)).unwrap();
    let frames: Vec<Vec<u8>> = (0..5u8).map(|t| frame(t, 60 + t as usize * 100)).collect();
    for fr in &frames {
        r.deliver(fr);
    }
    let mut batch = Vec::with_capacity(32);
    // Two bursts: the first ends on a line of descriptors (4 of 5, see
    // `DriverRing::line_aligned`), the second takes the last one.
    let got = r.rx.rx_burst(&mut batch, 32) + r.rx.rx_burst(&mut batch, 32);
    assert_eq!(got, 1, "only the Pass frame is delivered");
    assert_eq!(batch[0].data(), &frames[0][..]);

    let out = r.rx.xdp_out();
    assert_eq!(out.tx.len(), 1);
    let mut want_tx = vec![0xaa, 0xbb, 0xcc, 0xdd];
    want_tx.extend_from_slice(&frames[2][..frames[2].len() - 2]);
    assert_eq!(out.tx[0].data(), &want_tx[..]);
    assert_eq!(out.redirect[1].len(), 1);
    let mut want_redir = frames[3][2..].to_vec();
    want_redir.extend_from_slice(&[7, 8, 9]);
    assert_eq!(out.redirect[1][0].data(), &want_redir[..]);
    assert_eq!(out.len(), 2);

    let s = r.snapshot();
    assert_eq!((s.xdp_pass, s.xdp_drop, s.xdp_tx, s.xdp_redirect, s.xdp_aborted), (1, 1, 1, 1, 1));
    assert_eq!(s.rx_packets, 5, "every frame received counts once");
    assert_eq!(s.rx_bytes, frames.iter().map(|f| f.len() as u64).sum::<u64>());
    // Drop and the aborted redirect went straight back: the ring is full again and
    // only the three packets held by the test are out of the pool.
    assert_eq!(r.rx.in_flight(), RING);
    assert_eq!(r.pool.available(), full - RING as u32 - 3);

    // The Tx packet goes out on the pair's transmit half without a copy, with a clean
    // virtio-net header in the headroom the program left.
    let n = r.tx.tx_burst(&mut r.rx.xdp_out().tx);
    assert_eq!(n, 1);
    let sent = r.transmitted();
    assert_eq!(sent, vec![(vec![0; NET_HDR_LEN], want_tx.clone())]);
    assert_eq!(r.snapshot().tx_copied, 0);
    r.tx.reclaim();
    drop(batch);
    r.rx.xdp_out().clear();
    assert_eq!(r.pool.available(), full - RING as u32, "no buffer lost");
}

/// Delivers `n` frames, the even ones with a header the device filled in (offload flags,
/// `num_buffers` 1) and the odd ones with a zero header; returns the frames.
fn deliver_dirty_and_clean(r: &mut Rig, n: u8) -> Vec<Vec<u8>> {
    let dirty = [1u8, 3, 14, 0, 0xb4, 5, 34, 0, 16, 0, 1, 0];
    let frames: Vec<Vec<u8>> = (0..n).map(|t| frame(t, 60 + t as usize)).collect();
    for (k, fr) in frames.iter().enumerate() {
        r.deliver_with(if k % 2 == 0 { dirty } else { [0; NET_HDR_LEN] }, fr);
    }
    frames
}

/// A received frame sent back out carries an all-zero virtio-net header whatever the
/// device wrote into the header slot (offload flags, `num_buffers` 1), and one whose
/// slot is already zero goes out unchanged: the transmit path rewrites a header only
/// when it must, never leaves a stale one.
#[test]
fn forwarded_frames_go_out_with_a_zero_header() {
    let mut r = rig();
    let frames = deliver_dirty_and_clean(&mut r, 6);
    let mut batch = Vec::with_capacity(32);
    // Two bursts (4 and 2: the first ends on a line of descriptors).
    assert_eq!(r.rx.rx_burst(&mut batch, 32), 4);
    assert_eq!(r.rx.rx_burst(&mut batch, 32), 2);
    assert_eq!(r.tx.tx_burst(&mut batch), 6);
    let sent = r.transmitted();
    assert_eq!(sent.len(), 6);
    for (fr, (hdr, got)) in frames.iter().zip(&sent) {
        assert_eq!(hdr, &vec![0u8; NET_HDR_LEN]);
        assert_eq!(got, fr);
    }
}

/// The same for chains (the general transmit path): a received frame with a second
/// segment appended goes out with an all-zero header whether its slot held what the
/// device wrote or was zero already.
#[test]
fn forwarded_chains_go_out_with_a_zero_header() {
    let mut r = rig();
    let frames = deliver_dirty_and_clean(&mut r, 4);
    let mut batch = Vec::with_capacity(32);
    assert_eq!(r.rx.rx_burst(&mut batch, 32), 4);
    let tail: Vec<u8> = (0..100u8).collect();
    for p in batch.iter_mut() {
        let mut seg = r.pool.alloc().unwrap();
        seg.set_data(&tail).unwrap();
        p.append(seg).unwrap();
        assert_eq!(p.nb_segs(), 2);
    }
    assert_eq!(r.tx.tx_burst(&mut batch), 4);
    let out = transmitted_chains(&mut r);
    assert_eq!(out.len(), 4);
    for (fr, (hdr, got, descs)) in frames.iter().zip(&out) {
        assert_eq!(hdr, &vec![0u8; NET_HDR_LEN]);
        assert_eq!(&got[..fr.len()], fr.as_slice());
        assert_eq!(&got[fr.len()..], tail.as_slice());
        assert_eq!(*descs, 2);
    }
}

#[test]
fn rx_burst_xdp_bounces_tx_packets_on_the_same_thread() {
    let mut r = rig();
    r.rx.attach_xdp(Box::new(|p: &mut Packet| {
        let d = p.data_mut();
        let (a, b) = d[..12].split_at_mut(6);
        a.swap_with_slice(b);
        XdpVerdict::Tx
    }))
    .unwrap();
    let frames: Vec<Vec<u8>> = (0..8u8).map(|t| frame(t, 64 + t as usize)).collect();
    for fr in &frames {
        r.deliver(fr);
    }
    let mut batch = Vec::with_capacity(32);
    assert_eq!(r.rx.rx_burst_xdp(&mut batch, 32, &mut r.tx), 0);
    let sent = r.transmitted();
    assert_eq!(sent.len(), 8);
    for (fr, (_, got)) in frames.iter().zip(&sent) {
        let mut want = fr.clone();
        let (a, b) = want[..12].split_at_mut(6);
        a.swap_with_slice(b);
        assert_eq!(got, &want);
    }
    assert!(r.rx.xdp_out().is_empty());
    assert_eq!(r.snapshot().xdp_tx, 8);
}

#[test]
fn a_full_output_vector_drops_and_counts() {
    let mut r = rig();
    r.rx.attach_xdp(Box::new(|_: &mut Packet| XdpVerdict::Tx)).unwrap();
    let mut batch = Vec::with_capacity(32);
    for _ in 0..2 {
        for i in 0..RING {
            r.deliver(&frame(i as u8, 60));
        }
        r.rx.rx_burst(&mut batch, 64);
    }
    let s = r.snapshot();
    assert_eq!((s.xdp_tx, s.xdp_aborted), (RING as u64, RING as u64));
    assert_eq!(r.rx.xdp_out().tx.len(), RING as usize);
    assert_eq!(r.rx.xdp_out().tx.capacity(), RING as usize, "never grown");
}

#[test]
fn super_frames_are_described_when_negotiated_and_dropped_when_not() {
    let mut r = rig_with(256, 1500, f::bit(f::NET_GUEST_CSUM) | f::bit(f::NET_GUEST_TSO4));
    let mut hdr = [0u8; NET_HDR_LEN];
    hdr[net_hdr::FLAGS] = net_hdr::F_NEEDS_CSUM;
    hdr[net_hdr::GSO_TYPE] = net_hdr::GSO_TCPV4;
    hdr[net_hdr::HDR_LEN..net_hdr::HDR_LEN + 2].copy_from_slice(&54u16.to_le_bytes());
    hdr[net_hdr::GSO_SIZE..net_hdr::GSO_SIZE + 2].copy_from_slice(&1448u16.to_le_bytes());
    hdr[net_hdr::CSUM_START..net_hdr::CSUM_START + 2].copy_from_slice(&34u16.to_le_bytes());
    hdr[net_hdr::CSUM_OFFSET..net_hdr::CSUM_OFFSET + 2].copy_from_slice(&16u16.to_le_bytes());
    r.deliver_with(hdr, &frame(0, 1000));
    r.deliver(&frame(0, 100));
    let (mut batch, mut meta) = (Vec::with_capacity(8), Vec::with_capacity(8));
    assert_eq!(r.rx.rx_burst_meta(&mut batch, &mut meta, 8), 2);
    let want = RxMeta {
        flags: net_hdr::F_NEEDS_CSUM,
        gso_type: net_hdr::GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
    };
    assert_eq!(meta, vec![want, RxMeta::default()]);
    assert!(meta[0].is_gso() && meta[0].needs_csum() && !meta[1].is_gso());
    drop(batch);

    let before = r.snapshot();

    // Without GUEST_TSO4 (and GUEST_CSUM) the device may not write that header: the frame
    // is dropped and counted as an error, neither described nor shown to a program.
    let mut r = rig();
    r.deliver_with(hdr, &frame(0, 1000));
    r.deliver(&frame(1, 100));
    let (mut batch, mut meta) = (Vec::with_capacity(8), Vec::with_capacity(8));
    assert_eq!(r.rx.rx_burst_meta(&mut batch, &mut meta, 8), 1);
    assert_eq!(meta, vec![RxMeta::default()]);
    assert_eq!(batch[0].data(), &frame(1, 100)[..]);
    drop(batch);
    assert_eq!((r.snapshot().rx_packets, r.snapshot().rx_errors), (1, 1));
    assert_eq!((before.rx_packets, before.rx_errors), (2, 0));
    let seen = Arc::new(AtomicU64::new(0));
    let s2 = seen.clone();
    r.rx.attach_xdp(Box::new(move |_: &mut Packet| {
        s2.fetch_add(1, Ordering::Relaxed);
        XdpVerdict::Pass
    }))
    .unwrap();
    r.deliver_with(hdr, &frame(0, 1000));
    r.deliver(&frame(0, 100));
    let mut batch = Vec::with_capacity(8);
    assert_eq!(r.rx.rx_burst(&mut batch, 8), 1);
    assert_eq!(seen.load(Ordering::Relaxed), 1, "the program saw the good frame only");
    assert_eq!((r.snapshot().xdp_pass, r.snapshot().xdp_aborted, r.snapshot().rx_errors), (1, 0, 2));
}

#[test]
fn headers_the_device_may_not_write_are_dropped_and_counted() {
    // Checksum offload negotiated, no segmentation: bad flags, a checksum position past
    // the frame, any segmentation type are each one dropped frame; good ones pass.
    let mut r = rig_with(256, 1500, f::bit(f::NET_GUEST_CSUM));
    let h = |flags: u8, gso: u8, start: u16, off: u16| {
        let mut h = [0u8; NET_HDR_LEN];
        h[net_hdr::FLAGS] = flags;
        h[net_hdr::GSO_TYPE] = gso;
        h[net_hdr::GSO_SIZE..net_hdr::GSO_SIZE + 2].copy_from_slice(&1448u16.to_le_bytes());
        h[net_hdr::HDR_LEN..net_hdr::HDR_LEN + 2].copy_from_slice(&54u16.to_le_bytes());
        h[net_hdr::CSUM_START..net_hdr::CSUM_START + 2].copy_from_slice(&start.to_le_bytes());
        h[net_hdr::CSUM_OFFSET..net_hdr::CSUM_OFFSET + 2].copy_from_slice(&off.to_le_bytes());
        h
    };
    let bad = [
        h(net_hdr::F_NEEDS_CSUM, 0, 90, 16),
        h(net_hdr::F_RSC_INFO, 0, 0, 0),
        h(0x80, 0, 0, 0),
        h(net_hdr::F_NEEDS_CSUM, net_hdr::GSO_TCPV4, 34, 16),
        h(0, net_hdr::GSO_ECN, 0, 0),
        h(0, 9, 0, 0),
    ];
    let good = [h(net_hdr::F_NEEDS_CSUM, 0, 34, 16), h(net_hdr::F_DATA_VALID, 0, 0, 0), h(0, 0, 0, 0)];
    for (i, hd) in bad.iter().enumerate() {
        r.deliver_with(*hd, &frame(0xb0 + i as u8, 100));
    }
    for (i, hd) in good.iter().enumerate() {
        r.deliver_with(*hd, &frame(i as u8, 100));
    }
    let (mut batch, mut meta) = (Vec::with_capacity(16), Vec::with_capacity(16));
    // (A burst takes whole lines of used elements: two bursts for nine frames.)
    while r.rx.rx_burst_meta(&mut batch, &mut meta, 16) > 0 {}
    assert_eq!(batch.len(), good.len());
    for (i, p) in batch.iter().enumerate() {
        assert_eq!(p.data(), &frame(i as u8, 100)[..]);
    }
    assert_eq!(
        meta.iter().map(|m| m.flags).collect::<Vec<_>>(),
        vec![net_hdr::F_NEEDS_CSUM, net_hdr::F_DATA_VALID, 0]
    );
    let s = r.snapshot();
    assert_eq!((s.rx_packets, s.rx_errors), (good.len() as u64, bad.len() as u64));
    drop(batch);
    // Every buffer is back or posted again: nothing leaked on the dropped frames.
    assert_eq!(r.pool.available() + RING as u32, 64);
}

#[test]
fn attach_checks_geometry_and_offloads() {
    // Headroom below XDP's 256 bytes.
    let mut r = rig_with(128, 1500, 0);
    let e = r.rx.attach_xdp(Box::new(|_: &mut Packet| XdpVerdict::Pass)).unwrap_err();
    assert!(matches!(e, Error::XdpGeometry { headroom: 128, need: 256, .. }), "{e}");
    // A 9000-byte MTU in 2 KiB buffers.
    let mut r = rig_with(256, 9000, 0);
    let e = r.rx.attach_xdp(Box::new(|_: &mut Packet| XdpVerdict::Pass)).unwrap_err();
    assert!(matches!(e, Error::XdpGeometry { mtu: 9000, .. }), "{e}");
    assert!(e.to_string().contains("MTU 9000"), "{e}");
    // Guest TSO on and no way to switch it off.
    let feats = f::bit(f::NET_GUEST_CSUM) | f::bit(f::NET_GUEST_TSO4);
    let mut r = rig_with(256, 1500, feats);
    let e = r.rx.attach_xdp(Box::new(|_: &mut Packet| XdpVerdict::Pass)).unwrap_err();
    assert!(matches!(e, Error::XdpOffloads { .. }), "{e}");
    assert!(!r.rx.xdp_attached());
    // Checksum offload alone is fine (frames stay whole).
    let mut r = rig_with(256, 1500, f::bit(f::NET_GUEST_CSUM));
    r.rx.attach_xdp(Box::new(|_: &mut Packet| XdpVerdict::Pass)).unwrap();
    assert!(r.rx.xdp_attached());
    r.rx.detach_xdp().unwrap();
    assert!(!r.rx.xdp_attached());
    r.rx.detach_xdp().unwrap(); // nothing attached: nothing to do
}

#[test]
fn detach_delivers_everything_again() {
    let mut r = rig();
    r.rx.attach_xdp(Box::new(|_: &mut Packet| XdpVerdict::Drop)).unwrap();
    r.deliver(&frame(0, 60));
    let mut batch = Vec::with_capacity(8);
    assert_eq!(r.rx.rx_burst(&mut batch, 8), 0);
    r.rx.detach_xdp().unwrap();
    r.deliver(&frame(0, 61));
    assert_eq!(r.rx.rx_burst(&mut batch, 8), 1);
    let s = r.snapshot();
    assert_eq!((s.rx_packets, s.xdp_drop, s.xdp_pass), (2, 1, 0));
}

/// Every chain the device took from the transmit ring, each part of it concatenated:
/// (header, frame, descriptors).
fn transmitted_chains(r: &mut Rig) -> Vec<(Vec<u8>, Vec<u8>, usize)> {
    let mut v = Vec::new();
    while let Some((head, chain)) = r.tx_dev.pop_avail() {
        let mut b = Vec::new();
        for d in &chain {
            assert_eq!(d.flags & crate::layout::DESC_F_WRITE, 0, "transmit buffers are device-readable");
            b.extend(r.tx_dev.read(d.addr, d.len as usize));
        }
        v.push((b[..NET_HDR_LEN].to_vec(), b[NET_HDR_LEN..].to_vec(), chain.len()));
        r.tx_dev.push_used(head as u32, 0);
    }
    v
}

#[test]
fn a_chained_packet_goes_out_as_one_descriptor_chain_and_comes_back_whole() {
    let mut r = rig();
    let f = frame(9, 5000);
    let chained = r.pool.alloc_chain(&f, 2000).unwrap();
    assert_eq!(chained.nb_segs(), 3);
    let plain = r.pool.alloc_chain(&f[..100], 2000).unwrap();
    let before = r.pool.available();
    let mut v = vec![plain, chained];
    assert_eq!(r.tx.tx_burst(&mut v), 2);
    assert!(v.is_empty());
    let out = transmitted_chains(&mut r);
    assert_eq!(out.len(), 2);
    assert_eq!((out[0].1.as_slice(), out[0].2), (&f[..100], 1));
    assert_eq!((out[1].1.as_slice(), out[1].2), (f.as_slice(), 3));
    assert_eq!(out[1].0, vec![0; NET_HDR_LEN]);
    r.tx.reclaim();
    assert_eq!(r.pool.available(), before + 4, "every segment back after reclaim");
    let s = r.snapshot();
    assert_eq!((s.tx_packets, s.tx_bytes, s.tx_errors), (2, 5100, 0));
}

#[test]
fn a_chain_waits_for_room_and_one_longer_than_the_ring_is_refused() {
    let mut r = rig();
    // RING descriptors: 14 single packets leave 2, so a 3-segment chain waits.
    let mut v: Vec<Packet> =
        (0..RING - 2).map(|i| r.pool.alloc_chain(&frame(i as u8, 60), 2048).unwrap()).collect();
    v.push(r.pool.alloc_chain(&frame(0xc, 300), 100).unwrap());
    assert_eq!(r.tx.tx_burst(&mut v), (RING - 2) as usize);
    assert_eq!((v.len(), v[0].nb_segs()), (1, 3));
    assert_eq!(transmitted_chains(&mut r).len(), (RING - 2) as usize);
    assert_eq!(r.tx.tx_burst(&mut v), 1);
    assert_eq!(transmitted_chains(&mut r)[0].1, frame(0xc, 300));
    // More segments than the ring has descriptors: never sendable, dropped and counted.
    r.tx.reclaim();
    let mut v = vec![r.pool.alloc_chain(&frame(1, (RING as usize + 1) * 10), 10).unwrap()];
    let before = r.pool.available();
    assert_eq!(r.tx.tx_burst(&mut v), 1);
    assert!(transmitted_chains(&mut r).is_empty());
    assert_eq!(r.pool.available(), before + RING as u32 + 1);
    assert_eq!(r.snapshot().tx_errors, 1);
}

#[test]
fn offload_requests_are_written_into_the_header_or_refused_per_packet() {
    use crate::mempool::{TxCsum, TxGso, TxOffload};
    use spec::offload::{GsoKind, NetHdr};
    let csum = TxOffload { csum: Some(TxCsum { start: 34, offset: 16 }), gso: None };
    let tso =
        TxOffload { csum: csum.csum, gso: Some(TxGso { kind: GsoKind::TcpV4, size: 1000, hdr_len: 54 }) };
    let uso = TxOffload {
        csum: Some(TxCsum { start: 34, offset: 6 }),
        gso: Some(TxGso { kind: GsoKind::UdpL4, size: 1000, hdr_len: 42 }),
    };
    let outside = TxOffload { csum: Some(TxCsum { start: 100, offset: 16 }), gso: None };
    // Negotiated: CSUM and HOST_TSO4, not HOST_USO.
    let mut r = rig_with(256, 1500, f::bit(f::NET_CSUM) | f::bit(f::NET_HOST_TSO4));
    let mk = |r: &Rig, len: usize, o: TxOffload, segs: usize| {
        let mut p = r.pool.alloc_chain(&frame(len as u8, len), len.div_ceil(segs)).unwrap();
        p.set_tx_offload(o);
        p
    };
    let before = r.pool.available();
    let mut v = vec![
        mk(&r, 100, csum, 1),
        mk(&r, 4000, tso, 2),
        mk(&r, 4000, uso, 2),    // refused: HOST_USO not negotiated
        mk(&r, 117, outside, 1), // refused: the checksum field ends past the frame
        mk(&r, 118, outside, 1), // just fits
    ];
    assert_eq!(r.tx.tx_burst(&mut v), 5);
    let out = transmitted_chains(&mut r);
    let hdrs: Vec<NetHdr> = out.iter().map(|(h, _, _)| NetHdr::parse(h).unwrap()).collect();
    assert_eq!(out.len(), 3);
    assert_eq!(
        (hdrs[0].flags, hdrs[0].gso_type, hdrs[0].csum_start, hdrs[0].csum_offset),
        (net_hdr::F_NEEDS_CSUM, 0, 34, 16)
    );
    assert_eq!(
        (hdrs[1].gso_type, hdrs[1].gso_size, hdrs[1].hdr_len, out[1].2),
        (net_hdr::GSO_TCPV4, 1000, 54, 2)
    );
    assert_eq!(out[1].1, frame((4000 % 256) as u8, 4000));
    assert_eq!((hdrs[2].csum_start, out[2].1.len()), (100, 118));
    assert!(hdrs.iter().all(|h| h.num_buffers == 0));
    let s = r.snapshot();
    assert_eq!((s.tx_packets, s.tx_errors), (3, 2));
    r.tx.reclaim();
    assert_eq!(r.pool.available(), before, "refused packets went back to the pool");
    // A plain packet sent next on a buffer that carried a request goes out with a zero
    // header (the request went with the packet).
    let mut v = vec![r.pool.alloc_chain(&frame(1, 60), 2048).unwrap()];
    r.tx.tx_burst(&mut v);
    assert_eq!(transmitted_chains(&mut r)[0].0, vec![0; NET_HDR_LEN]);
}

/// A rig whose receive queue negotiated MRG_RXBUF (buffers of 2048 bytes of data room;
/// 1996 posted after the 64-byte tailroom: 1984 frame bytes after the header in a
/// frame's first buffer).
fn mrg_rig() -> Rig {
    rig_full(256, 1500, 0, true)
}

impl Rig {
    /// The device writes `frame` over as many posted buffers as it takes (each filled
    /// whole but the last), with `num_buffers` = `nb` (the truth when `None`), and
    /// publishes them together; `lens` overrides the used lengths.
    fn deliver_merged(&mut self, frame: &[u8], nb: Option<u16>, lens: Option<&[u32]>) -> usize {
        let mut bufs = Vec::new();
        let mut rest = frame;
        let mut first = true;
        while first || !rest.is_empty() {
            let (head, chain) = self.rx_dev.pop_avail().expect("a posted receive buffer");
            let d = chain[0];
            let skip = if first { NET_HDR_LEN } else { 0 };
            let n = rest.len().min(d.len as usize - skip);
            self.rx_dev.write(d.addr + skip as u64, &rest[..n]);
            bufs.push((head, d.addr, (skip + n) as u32));
            rest = &rest[n..];
            first = false;
        }
        let mut hdr = [0u8; NET_HDR_LEN];
        hdr[10..12].copy_from_slice(&nb.unwrap_or(bufs.len() as u16).to_le_bytes());
        self.rx_dev.write(bufs[0].1, &hdr);
        for (k, (head, _, len)) in bufs.iter().enumerate() {
            let len = lens.map_or(*len, |l| l[k]);
            self.rx_dev.push_used(*head as u32, len);
        }
        bufs.len()
    }
}

#[test]
fn merged_frames_arrive_as_chains_with_their_bytes() {
    let mut r = mrg_rig();
    let mut batch = Vec::with_capacity(32);
    let mut meta = Vec::with_capacity(32);
    let frames = [frame(1, 60), frame(2, 9000), frame(3, 1984), frame(4, 1985)];
    for round in 0..3 {
        let mut bufs = 0;
        for f in &frames {
            bufs += r.deliver_merged(f, None, None);
        }
        assert_eq!(bufs, 1 + 5 + 1 + 2);
        // A burst may end before a frame that starts past its whole line of
        // descriptors; the next burst takes it.
        let mut got = 0;
        for _ in 0..3 {
            got += if round == 1 {
                r.rx.rx_burst_meta(&mut batch, &mut meta, 32)
            } else {
                r.rx.rx_burst(&mut batch, 32)
            };
        }
        assert_eq!(got, 4, "round {round}");
        for (p, f) in batch.iter().zip(&frames) {
            let mut flat = vec![0u8; p.total_len()];
            p.copy_to(&mut flat).unwrap();
            assert_eq!(&flat, f);
        }
        assert_eq!(batch.iter().map(|p| p.nb_segs()).collect::<Vec<_>>(), vec![1, 5, 1, 2]);
        batch.clear();
        assert_eq!(r.rx.in_flight(), RING, "refilled");
    }
    let s = r.snapshot();
    assert_eq!(
        (s.rx_packets, s.rx_bytes, s.device_errors),
        (12, 3 * frames.iter().map(|f| f.len() as u64).sum::<u64>(), 0)
    );
    assert_eq!(r.pool.available(), 64 - RING as u32);
}

#[test]
fn merge_faults_stop_the_queue_and_return_the_frames_buffers() {
    use crate::DeviceError;
    // Each lie, and that it is caught as that fault.
    // (what, num_buffers, used lengths, the error)
    type Case = (&'static str, Option<u16>, Option<Vec<u32>>, DeviceError);
    let cases: Vec<Case> = vec![
        ("num_buffers 0", Some(0), None, DeviceError::MergeZeroBuffers),
        (
            "num_buffers beyond used",
            Some(4),
            None,
            DeviceError::MergeBeyondUsed { num_buffers: 4, available: 3 },
        ),
        (
            "num_buffers beyond posted",
            Some(RING + 1),
            None,
            DeviceError::MergeBeyondUsed { num_buffers: RING + 1, available: 3 },
        ),
        (
            "an empty later buffer",
            None,
            Some(vec![1996, 0, 532]),
            DeviceError::MergeBadLength { index: 1, len: 0, total: 1984 },
        ),
    ];
    for (what, nb, lens, want) in cases {
        let mut r = mrg_rig();
        let mut batch = Vec::with_capacity(32);
        // A good frame first: delivered before the fault is seen.
        r.deliver_merged(&frame(1, 3000), None, None);
        assert_eq!(r.deliver_merged(&frame(2, 4500), nb, lens.as_deref()), 3);
        let got = r.rx.rx_burst(&mut batch, 32);
        assert_eq!((got, r.rx.error()), (1, Some(want)), "{what}");
        assert_eq!(batch[0].total_len(), 3000);
        assert_eq!(r.snapshot().device_errors, 1, "{what}");
        // Stopped: nothing more, and the faulty frame's buffers are back in the pool
        // (the two of the good frame are in `batch`; the rest of the ring stays posted).
        assert_eq!(r.rx.rx_burst(&mut batch, 32), 0);
        let outside = 64 - r.pool.available() - batch.iter().map(|p| p.nb_segs() as u32).sum::<u32>();
        assert_eq!(outside, r.rx.in_flight() as u32, "{what}: in flight {}", r.rx.in_flight());
    }
}

#[test]
fn an_xdp_program_sees_single_buffer_frames_and_merged_ones_are_aborted() {
    let mut r = mrg_rig();
    let seen = Arc::new(AtomicU64::new(0));
    let s2 = seen.clone();
    r.rx.attach_xdp(Box::new(move |_: &mut Packet| {
        s2.fetch_add(1, Ordering::Relaxed);
        XdpVerdict::Pass
    }))
    .unwrap();
    r.deliver_merged(&frame(1, 100), None, None);
    r.deliver_merged(&frame(2, 3000), None, None);
    r.deliver_merged(&frame(3, 200), None, None);
    let mut batch = Vec::with_capacity(8);
    let mut got = 0;
    for _ in 0..3 {
        got += r.rx.rx_burst(&mut batch, 8);
    }
    assert_eq!(got, 2);
    assert_eq!(batch.iter().map(|p| p.data()[0]).collect::<Vec<_>>(), vec![1, 3]);
    assert_eq!(seen.load(Ordering::Relaxed), 2, "the program never saw the merged frame");
    let s = r.snapshot();
    assert_eq!((s.rx_packets, s.xdp_pass, s.xdp_aborted), (3, 2, 1));
    drop(batch);
    assert_eq!(r.pool.available(), 64 - RING as u32, "the aborted frame's buffers are back");
}

/// `set_mtu`: its bounds (68 up to the device's MTU; one buffer without MRG_RXBUF), and
/// frames above MTU + 18 dropped and counted on every receive path (plain, with
/// metadata, merged), super-frames exempt when GSO was negotiated; every dropped
/// frame's buffers back in the pool.
#[test]
fn set_mtu_holds_frames_to_its_limit() {
    let mut r = rig();
    assert_eq!(r.rx.max_frame_len(), None, "no limit until set_mtu");
    for bad in [67, 1501] {
        assert!(matches!(r.rx.set_mtu(bad), Err(Error::Config(_))), "MTU {bad}");
    }
    r.rx.set_max_mtu(9000);
    // 1984 frame bytes per buffer: MTU 1970 fits (+14), 1971 does not.
    assert!(matches!(r.rx.set_mtu(1971), Err(Error::Config(_))));
    r.rx.set_mtu(1970).unwrap();
    r.rx.set_mtu(100).unwrap();
    assert_eq!(r.rx.max_frame_len(), Some(118));
    let mut batch = Vec::with_capacity(16);
    let mut meta = Vec::with_capacity(16);
    for with_meta in [false, true] {
        for len in [118, 119, 60, 1984] {
            r.deliver(&frame(len as u8, len));
        }
        let got = if with_meta {
            r.rx.rx_burst_meta(&mut batch, &mut meta, 16)
        } else {
            r.rx.rx_burst(&mut batch, 16)
        };
        assert_eq!(got, 2);
        assert_eq!(batch.iter().map(|p| p.len()).collect::<Vec<_>>(), vec![118, 60]);
        batch.clear();
    }
    let s = r.snapshot();
    assert_eq!((s.rx_packets, s.rx_bytes, s.rx_too_long, s.rx_errors), (4, 2 * 178, 4, 4));
    assert_eq!(r.pool.available(), 64 - RING as u32, "dropped buffers back");

    // GSO negotiated: a super-frame above the limit passes, a plain frame does not.
    let mut r = rig_with(256, 1500, f::bit(f::NET_GUEST_CSUM) | f::bit(f::NET_GUEST_TSO4));
    r.rx.set_mtu(100).unwrap();
    let mut hdr = [0u8; NET_HDR_LEN];
    hdr[net_hdr::GSO_TYPE] = net_hdr::GSO_TCPV4;
    hdr[net_hdr::HDR_LEN..net_hdr::HDR_LEN + 2].copy_from_slice(&54u16.to_le_bytes());
    hdr[net_hdr::GSO_SIZE..net_hdr::GSO_SIZE + 2].copy_from_slice(&100u16.to_le_bytes());
    r.deliver_with(hdr, &frame(1, 1000));
    r.deliver(&frame(2, 1000));
    assert_eq!(r.rx.rx_burst(&mut batch, 16), 1);
    assert_eq!(batch[0].data(), &frame(1, 1000)[..]);
    batch.clear();
    assert_eq!(r.snapshot().rx_too_long, 1);

    // Mergeable buffers: the limit may exceed a buffer; a merged frame above it is
    // dropped whole.
    let mut r = mrg_rig();
    r.rx.set_max_mtu(9000);
    r.rx.set_mtu(4000).unwrap();
    assert_eq!(r.rx.max_frame_len(), Some(4018));
    for len in [4018, 4019, 9000, 60] {
        r.deliver_merged(&frame(len as u8, len), None, None);
    }
    let mut got = 0;
    for _ in 0..3 {
        got += r.rx.rx_burst(&mut batch, 16);
    }
    assert_eq!(got, 2);
    assert_eq!(batch.iter().map(|p| p.total_len()).collect::<Vec<_>>(), vec![4018, 60]);
    batch.clear();
    let s = r.snapshot();
    assert_eq!((s.rx_packets, s.rx_too_long, s.device_errors), (2, 2, 0));
    assert_eq!(r.pool.available(), 64 - RING as u32, "dropped chains back");
}
