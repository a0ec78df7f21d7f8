//! Unit tests of the receive and transmit queues on packed rings, over the in-process
//! [`PackedFake`](crate::ring::packed::fake::PackedFake): the same queue code as on split
//! rings, monomorphized for the packed layout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::*;
use crate::ctrl::{Control, ControlParams};
use crate::dma::DmaArena;
use crate::layout::NET_HDR_LEN;
use crate::ring::packed::fake::PackedFake;
use crate::ring::{PackedRing, RingFeatures};
use std::time::Duration;

/// A ring size that is no power of two.
const RING: u16 = 13;

fn control() -> Control {
    let params = ControlParams {
        device: "fake".into(),
        features: 0,
        virtio_user: true,
        timeout: Duration::from_millis(10),
        pairs: 1,
        active_pairs: 1,
    };
    Control::new(params, None)
}

#[test]
fn receive_and_transmit_on_packed_rings_with_exact_counts() {
    for in_order in [false, true] {
        let arena = Arc::new(DmaArena::new(4 << 20, false).unwrap());
        let pool = Mempool::new(arena.clone(), 64, 2048 + 256, 256).unwrap();
        let stats = Arc::new(PairStats::default());
        let stopped: Stopped = Arc::new(AtomicBool::new(false));
        let features = RingFeatures { event_idx: true, in_order };
        let rx_ring = PackedRing::new(&arena, RING, features).unwrap();
        let tx_ring = PackedRing::new(&arena, RING, features).unwrap();
        let (mut rx_dev, mut tx_dev) = (PackedFake::new(&rx_ring), PackedFake::new(&tx_ring));
        let mut rx = RxQueue::new(rx_ring, pool.clone(), stats.clone(), 64, stopped.clone(), control(), 1500);
        rx.refill();
        let mut tx = TxQueue::new(tx_ring, pool.clone(), stats.clone(), stopped.clone(), 0);
        assert_eq!(rx.in_flight(), RING);

        let mut received = 0usize;
        let mut batch = Vec::with_capacity(64);
        // Five rounds of 7 frames: both rings wrap several times (13 entries).
        for round in 0..5u8 {
            for k in 0..7u8 {
                let (id, chain) = rx_dev.pop_avail().expect("a posted receive buffer");
                let frame: Vec<u8> = (0..60 + k as usize).map(|i| i as u8 ^ round ^ k).collect();
                rx_dev.write(chain[0].addr, &[0; NET_HDR_LEN]);
                rx_dev.write(chain[0].addr + NET_HDR_LEN as u64, &frame);
                rx_dev.push_used(id, (NET_HDR_LEN + frame.len()) as u32, 1);
            }
            received += rx.rx_burst(&mut batch, 64);
            assert_eq!(batch.len(), 7, "round {round}");
            for (k, p) in batch.iter().enumerate() {
                assert_eq!(p.len(), 60 + k, "round {round}");
                assert_eq!(p.data()[1], 1 ^ round ^ k as u8);
            }
            // Send them back out, then the device takes and completes them.
            assert_eq!(tx.tx_burst(&mut batch), 7);
            assert!(batch.is_empty());
            let mut seen = 0;
            while let Some((id, chain)) = tx_dev.pop_avail() {
                let b = tx_dev.read(chain[0].addr, chain[0].len as usize);
                assert_eq!(&b[..NET_HDR_LEN], &[0; NET_HDR_LEN]);
                assert_eq!(b.len() - NET_HDR_LEN, 60 + seen);
                tx_dev.push_used(id, 0, 1);
                seen += 1;
            }
            assert_eq!(seen, 7);
            assert_eq!(tx.reclaim(), 7);
            assert_eq!(tx.in_flight(), 0);
            assert_eq!(rx.in_flight(), RING, "refilled");
        }
        assert_eq!(received, 35);
        let s = stats.snapshot();
        assert_eq!((s.rx_packets, s.tx_packets, s.rx_errors, s.device_errors), (35, 35, 0, 0));
        assert_eq!(pool.available(), 64 - RING as u32);
        assert!(rx.error().is_none() && tx.error().is_none());
        // A hostile used descriptor stops the receive queue, counted.
        rx_dev.write_used(RING + 1, 0, spec::packed::used_flags(rx_dev.used_wrap()));
        assert_eq!(rx.rx_burst(&mut batch, 64), 0);
        assert!(matches!(rx.error(), Some(crate::DeviceError::UsedIdOutOfRange { id: 14 })));
        assert_eq!(stats.snapshot().device_errors, 1);
        stopped.store(true, Ordering::Release);
    }
}

/// On a ring whose size is a multiple of four, the receive refill posts whole lines of
/// descriptors only (`PackedRing::line_aligned_post`): the free descriptors of a line
/// the device has not finished wait for it; a ring of another size posts everything.
#[test]
fn receive_refill_posts_whole_lines_of_descriptors() {
    for (size, after_6, after_8) in [(16u16, 14u16, 16u16), (RING, RING, RING)] {
        let arena = Arc::new(DmaArena::new(4 << 20, false).unwrap());
        let pool = Mempool::new(arena.clone(), 64, 2048 + 256, 256).unwrap();
        let stats = Arc::new(PairStats::default());
        let stopped: Stopped = Arc::new(AtomicBool::new(false));
        let features = RingFeatures { event_idx: true, in_order: true };
        let rx_ring = PackedRing::new(&arena, size, features).unwrap();
        let mut rx_dev = PackedFake::new(&rx_ring);
        let mut rx = RxQueue::new(rx_ring, pool.clone(), stats.clone(), 64, stopped.clone(), control(), 1500);
        rx.refill();
        assert_eq!(rx.in_flight(), size);
        let mut batch = Vec::with_capacity(64);
        let mut round = |rx: &mut RxQueue, n: usize, batch: &mut Vec<Packet>| {
            for _ in 0..n {
                let (id, chain) = rx_dev.pop_avail().expect("a posted receive buffer");
                rx_dev.write(chain[0].addr, &[0; NET_HDR_LEN + 60]);
                rx_dev.push_used(id, (NET_HDR_LEN + 60) as u32, 1);
            }
            let got = rx.rx_burst(batch, 64);
            batch.clear();
            (got, rx.in_flight())
        };
        assert_eq!(round(&mut rx, 6, &mut batch), (6, after_6), "size {size}: 6 used from position 0");
        assert_eq!(round(&mut rx, 2, &mut batch), (2, after_8), "size {size}: the line is whole again");
        // Many more rounds of odd sizes: every frame arrives, nothing leaks.
        let mut total = 8;
        for n in [3usize, 5, 7, 1, 2, 9, 4, 6] {
            let n = n.min(rx.in_flight() as usize);
            let (got, _) = round(&mut rx, n, &mut batch);
            assert_eq!(got, n);
            total += got;
        }
        assert_eq!(stats.snapshot().rx_packets, total as u64);
        assert_eq!(pool.available() + rx.in_flight() as u32, 64);
        stopped.store(true, Ordering::Release);
    }
}

/// Chained packets on a packed ring: each goes out as one chain of descriptors in ring
/// order (wrapping the 13-entry ring), with its offload header, and every segment comes
/// back to the pool once the device has used the chain.
#[test]
fn chains_and_offload_headers_on_packed_rings() {
    use crate::layout::{features as f, net_hdr};
    use crate::mempool::{TxCsum, TxOffload};
    for in_order in [false, true] {
        let arena = Arc::new(DmaArena::new(4 << 20, false).unwrap());
        let pool = Mempool::new(arena.clone(), 64, 2048 + 256, 256).unwrap();
        let stats = Arc::new(PairStats::default());
        let stopped: Stopped = Arc::new(AtomicBool::new(false));
        let tx_ring = PackedRing::new(&arena, RING, RingFeatures { event_idx: true, in_order }).unwrap();
        let mut tx_dev = PackedFake::new(&tx_ring);
        let mut tx = TxQueue::new(tx_ring, pool.clone(), stats.clone(), stopped.clone(), f::bit(f::NET_CSUM));
        let mut sent = 0u64;
        for round in 0..6u8 {
            let frames: Vec<Vec<u8>> =
                (0..3).map(|k| (0..1000 + 700 * k).map(|i| (i as u8) ^ round ^ k as u8).collect()).collect();
            let mut v: Vec<Packet> = frames
                .iter()
                .enumerate()
                .map(|(k, fr)| {
                    let mut p = pool.alloc_chain(fr, 600).unwrap();
                    if k == 1 {
                        p.set_tx_offload(TxOffload {
                            csum: Some(TxCsum { start: 34, offset: 16 }),
                            gso: None,
                        });
                    }
                    p
                })
                .collect();
            // 2 + 3 + 4 descriptors: all fit the 13-entry ring.
            assert_eq!(tx.tx_burst(&mut v), 3, "round {round}");
            for (k, fr) in frames.iter().enumerate() {
                let (id, chain) = tx_dev.pop_avail().expect("a chain");
                assert_eq!(chain.len(), 2 + k);
                let mut b = Vec::new();
                for d in &chain {
                    b.extend(tx_dev.read(d.addr, d.len as usize));
                }
                let flags = if k == 1 { net_hdr::F_NEEDS_CSUM } else { 0 };
                assert_eq!(b[0], flags);
                assert_eq!(&b[NET_HDR_LEN..], fr.as_slice());
                tx_dev.push_used(id, 0, chain.len() as u16);
                sent += 1;
            }
            assert_eq!(tx.reclaim(), 3);
            assert_eq!(pool.available(), 64, "round {round}: every segment back");
        }
        assert_eq!(stats.snapshot().tx_packets, sent);
        stopped.store(true, Ordering::Release);
    }
}
