//! Tests of the handoff: tokens, buffers, and frames with offload requests crossing
//! between a sending and a receiving half over test rings.

use super::*;
use crate::config::PortKind;
use crate::device::DeviceParams;
use crate::port::offload::tests::{packet, tcp4, tso4};
use crate::split_ring::tests::{fixture, Fixture};
use crate::split_ring::DeviceRing;
use crate::stats::OffloadEvent;
use crate::worker::Engine;
use spec::layout::features::{self as f, bit};
use spec::layout::DESC_F_WRITE;

#[test]
fn tokens_round_trip_and_are_never_zero() {
    for (i, l) in [(0, 0), (0, 1), (FRAMES - 1, 1518), (5, 65535), (FRAMES + BIG_FRAMES - 1, MAX_SUPER_FRAME)]
    {
        let t = token(i, l);
        assert_eq!(untoken(t), (i, l));
        assert!(!has_hdr(t));
        let t = token_hdr(i, l);
        assert_eq!(untoken(t), (i, l));
        assert!(has_hdr(t));
    }
}

#[test]
fn every_buffer_starts_on_the_sender_side() {
    let (s, r) = channel(1518, None);
    assert_eq!(s.idle.len(), FRAMES);
    assert!(!r.has_work());
    // The largest frame and a virtio-net header, in whole cache lines.
    assert_eq!(s.store.slot, 1536);
    assert!(s.offload.is_none() && r.offload.is_none());
    assert_eq!(s.store.big, 0);
}

/// A device to count offload events on (no workers, nothing connected).
fn device() -> Arc<Device> {
    let params =
        DeviceParams { host_offloads: offload::HOST_OFFLOADS, ..DeviceParams::for_test(PortKind::Xconnect) };
    Device::new(params, Engine::new(0, 0).expect("engine"), None)
}

fn offload_counts(dev: &Device) -> [u64; 6] {
    std::array::from_fn(|i| dev.stats[0].offloads[i].load(Ordering::Relaxed))
}

const MAX_FRAME: u64 = 1518;
/// CSUM and HOST_TSO4: what the sending driver negotiated.
fn tso_features() -> u64 {
    bit(f::NET_CSUM) | bit(f::NET_HOST_TSO4)
}

/// Posts `packets` (header and frame each, one buffer) on a transmit ring.
fn transmit(tx: &mut Fixture, packets: &[Vec<u8>]) {
    for p in packets {
        let (_, bufs) = tx.drv.post(&[p.len() as u32], false, 0);
        tx.drv.write(bufs[0].0, p);
    }
    tx.drv.publish();
}

/// Posts `n` receive buffers of `len` bytes.
fn post_rx(rx: &mut Fixture, n: usize, len: u32) {
    for _ in 0..n {
        rx.drv.post(&[len], false, DESC_F_WRITE);
    }
    rx.drv.publish();
}

/// What the device wrote into the receive buffers it used from `from` on.
fn used_bufs(rx: &Fixture, from: u16) -> Vec<Vec<u8>> {
    (from..rx.drv.used_idx())
        .map(|k| {
            let (id, len) = rx.drv.used_elem(k);
            rx.drv.read(rx.drv.addr_of(id as u16), len as usize)
        })
        .collect()
}

fn send(s: &mut Sender, tx: &mut Fixture, features: u64, c: &mut BurstCounts) -> usize {
    let mut buf = ChainBuf::default();
    let mem = tx.mem.clone();
    let side =
        TxSide { ring: &mut tx.ring, mem: &mem, buf: &mut buf, burst: 64, max_frame: MAX_FRAME, features };
    s.run(side, c).expect("a good ring")
}

fn receive(r: &mut Receiver, rx: Option<(&mut Fixture, &RxConfig)>, c: &mut BurstCounts) -> usize {
    let (mut buf, mut more) = (ChainBuf::default(), ChainBuf::default());
    let ring = rx.map(|(f, cfg)| (&mut f.ring, &*f.mem, cfg));
    r.run::<DeviceRing>(ring, &mut buf, &mut more, 64, c).expect("a good ring")
}

/// A TSO super-frame (4000 bytes of payload, MSS 1448) crosses the handoff with its
/// header in a big buffer: to a receiver without guest offloads as three segments
/// whose payloads concatenate to the original; to one with GUEST_CSUM, GUEST_TSO4
/// and mergeable buffers whole, its GSO fields kept. A plain frame behind it keeps
/// its place. Counted on the sending pair as a direct path counts them.
#[test]
fn a_super_frame_crosses_whole_or_in_segments() {
    let dev = device();
    let (mut s, mut r) = channel(MAX_FRAME as usize, Some(OffloadStats::new(dev.clone(), 0)));
    let (mut tx, mut rx) = (fixture(16, 0, false), fixture(16, 0, false));
    let super_frame = tcp4(4000);
    let plain = tcp4(100);
    let mut plain_pkt = vec![0u8; NET_HDR_LEN];
    plain_pkt.extend_from_slice(&plain);
    for (whole, mut want_used) in [(false, 3usize), (true, 2)] {
        transmit(&mut tx, &[packet(tso4(1448), &super_frame), plain_pkt.clone()]);
        let mut sc = BurstCounts::default();
        assert_eq!(send(&mut s, &mut tx, tso_features(), &mut sc), 2);
        assert_eq!((sc.rx_packets, sc.rx_bytes), (2, (4054 + 154) as u64));
        assert!(s.store.headers.load(Ordering::Relaxed));
        assert_eq!(s.offload.as_ref().unwrap().idle.len(), BIG_FRAMES - 1, "a big buffer in flight");

        let feats =
            if whole { bit(f::NET_GUEST_CSUM) | bit(f::NET_GUEST_TSO4) | bit(f::NET_MRG_RXBUF) } else { 0 };
        let cfg = RxConfig::reset([2, 0, 0, 0, 0, 2], feats);
        let used0 = rx.drv.used_idx();
        post_rx(&mut rx, 6, 2048);
        let mut dc = BurstCounts::default();
        assert_eq!(receive(&mut r, Some((&mut rx, &cfg)), &mut dc), 2, "both frames done with");
        want_used += 1; // the plain frame
        let got = used_bufs(&rx, used0);
        assert_eq!(got.len(), want_used);
        if whole {
            let first = NetHdr::from_bytes(got[0][..NET_HDR_LEN].try_into().unwrap());
            assert_eq!(first, NetHdr { num_buffers: 2, ..tso4(1448) }, "the request, as sent");
            let mut joined = got[0][NET_HDR_LEN..].to_vec();
            joined.extend_from_slice(&got[1]);
            assert_eq!(joined, super_frame, "the super-frame, byte for byte");
            assert_eq!((dc.tx_packets, dc.tx_bytes), (2, (4054 + 154) as u64));
        } else {
            let mut payload = Vec::new();
            for seg in &got[..3] {
                assert_eq!(&seg[..NET_HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "a plain header");
                let frame = &seg[NET_HDR_LEN..];
                let ip_len = u16::from_be_bytes([frame[16], frame[17]]) as usize;
                assert_eq!(ip_len, frame.len() - 14, "IPv4 total length");
                assert!(frame.len() <= MAX_FRAME as usize);
                payload.extend_from_slice(&frame[54..]);
            }
            assert_eq!(payload, super_frame[54..], "the payloads concatenate to the original");
            assert_eq!(dc.tx_packets, 4);
        }
        assert_eq!(&got[want_used - 1][NET_HDR_LEN..], &plain[..], "the plain frame after it");
        assert_eq!(dc.drops, [0; crate::stats::DROP_REASONS]);
        // The big buffer comes back.
        s.offload.as_mut().unwrap().reclaim();
        assert_eq!(s.offload.as_ref().unwrap().idle.len(), BIG_FRAMES);
    }
    let mut want = [0u64; 6];
    want[OffloadEvent::GsoRequests as usize] = 2;
    want[OffloadEvent::SwGso as usize] = 1;
    want[OffloadEvent::SwSegments as usize] = 3;
    want[OffloadEvent::PassedWhole as usize] = 1;
    assert_eq!(offload_counts(&dev), want);
}

/// A request the driver did not negotiate is dropped on the sending side with its
/// reason, as on a direct path; and a driver that negotiated no host offload has its
/// header ignored (the frame, within the MTU, goes as a plain one): nothing crosses
/// with a header.
#[test]
fn requests_are_checked_on_the_sending_side() {
    let dev = device();
    let (mut s, r) = channel(MAX_FRAME as usize, Some(OffloadStats::new(dev.clone(), 0)));
    let mut tx = fixture(16, 0, false);
    transmit(&mut tx, &[packet(tso4(1448), &tcp4(4000))]);
    let mut c = BurstCounts::default();
    assert_eq!(send(&mut s, &mut tx, bit(f::NET_CSUM), &mut c), 1);
    assert_eq!(c.drops[DropReason::OffloadNotNegotiated as usize], 1);
    let csum = NetHdr { gso_type: 0, gso_size: 0, hdr_len: 0, ..tso4(0) };
    transmit(&mut tx, &[packet(csum, &tcp4(100))]);
    let mut c = BurstCounts::default();
    assert_eq!(send(&mut s, &mut tx, 0, &mut c), 1);
    assert_eq!(c.rx_packets, 1);
    assert!(!s.store.headers.load(Ordering::Relaxed), "no header handed over");
    assert_eq!(offload_counts(&dev), [0; 6]);
    assert!(r.has_work());
}

/// With every big buffer in flight, the next super-frame waits in the transmit ring
/// (with the frames behind it) until one comes back.
#[test]
fn a_super_frame_waits_for_a_big_buffer() {
    let dev = device();
    let (mut s, mut r) = channel(MAX_FRAME as usize, Some(OffloadStats::new(dev, 0)));
    let mut tx = fixture(32, 0, false);
    let pkts = vec![packet(tso4(1448), &tcp4(4000)); BIG_FRAMES + 1];
    transmit(&mut tx, &pkts);
    let mut c = BurstCounts::default();
    assert_eq!(send(&mut s, &mut tx, tso_features(), &mut c), BIG_FRAMES);
    assert_eq!(send(&mut s, &mut tx, tso_features(), &mut c), 0, "no big buffer free");
    // The receiver's queue does not run: the frames are dropped, their buffers back.
    let mut dc = BurstCounts::default();
    receive(&mut r, None, &mut dc);
    assert_eq!(dc.drops[DropReason::PeerDown as usize], BIG_FRAMES as u64);
    assert_eq!(send(&mut s, &mut tx, tso_features(), &mut c), 1);
    assert_eq!(c.rx_packets, BIG_FRAMES as u64 + 1);
}

/// A super-frame whose segments wait for receive buffers, and whose receive queue then
/// stops: the segments not delivered are each a `peer_down` drop.
#[test]
fn segments_left_when_the_peer_goes_are_counted() {
    let dev = device();
    let (mut s, mut r) = channel(MAX_FRAME as usize, Some(OffloadStats::new(dev, 0)));
    let (mut tx, mut rx) = (fixture(16, 0, false), fixture(16, 0, false));
    transmit(&mut tx, &[packet(tso4(1448), &tcp4(4000))]);
    let mut c = BurstCounts::default();
    assert_eq!(send(&mut s, &mut tx, tso_features(), &mut c), 1);
    post_rx(&mut rx, 1, 2048);
    let cfg = RxConfig::reset([2, 0, 0, 0, 0, 2], 0);
    let mut dc = BurstCounts::default();
    assert_eq!(receive(&mut r, Some((&mut rx, &cfg)), &mut dc), 0, "two segments wait");
    assert_eq!(dc.tx_packets, 1);
    receive(&mut r, None, &mut dc);
    assert_eq!(dc.drops[DropReason::PeerDown as usize], 2);
    assert!(!r.has_work());
}
