//! Unit and property tests of the packet pool: layout, head/tail adjustment, buffers
//! returning on drop, lifetime, concurrency.

use super::*;

fn pool(n: u32) -> Mempool {
    let arena = Arc::new(DmaArena::new(4 << 20, false).unwrap());
    Mempool::new(arena, n, DEFAULT_BUF_SIZE, DEFAULT_HEADROOM).unwrap()
}

#[test]
fn buffers_never_straddle_a_physical_page() {
    let mut arena = DmaArena::new(64 * 4096, false).unwrap();
    let pages: Vec<u64> = (0..64u64).map(|i| 0x100_0000 + (63 - i) * 0x1000).collect();
    arena.set_iova_map(crate::dma::IovaMap::Pages { shift: 12, pa: pages.into() });
    let p = Mempool::new(Arc::new(arena), 20, 1536, 256).unwrap();
    for i in 0..20 {
        // SAFETY: `i` ranges over the pool's buffers.
        let (ptr, iova) = unsafe { p.buf(i) };
        let off = ptr as usize - p.arena().va() as usize;
        assert_eq!(off / 4096, (off + 1535) / 4096, "buffer {i} straddles a page");
        assert_eq!(iova, p.arena().iova(ptr));
    }
}

#[test]
fn plans_size_pools_and_rings_exactly() {
    // A physically addressed arena (4 KiB "pages" here) and a linear one: the plan
    // Port::open sizes the arena with must match what the pool and rings take.
    for chunk in [Some(4096usize), None] {
        let mut plan = crate::dma::ArenaPlan::new(chunk);
        super::plan(&mut plan, 20, 1536).unwrap();
        let rings = crate::ring::DriverRing::allocations(64);
        for (len, align) in rings {
            plan.alloc(len, align).unwrap();
        }
        let mut arena = DmaArena::new(plan.size(), false).unwrap();
        if chunk.is_some() {
            let n = arena.len() / 4096;
            arena.set_iova_map(crate::dma::IovaMap::Pages {
                shift: 12,
                pa: (0..n as u64).map(|i| i << 12).collect(),
            });
        }
        let arena = Arc::new(arena);
        let _p = Mempool::new(arena.clone(), 20, 1536, 256).unwrap();
        let _r = crate::ring::DriverRing::new(&arena, 64, Default::default()).unwrap();
        assert_eq!(arena.allocated(), plan.size(), "{chunk:?}");
    }
}

#[test]
fn head_and_tail_adjustments_stay_in_bounds() {
    let p = pool(4);
    let mut pkt = p.alloc().unwrap();
    pkt.set_data(&[1, 2, 3, 4]).unwrap();
    assert_eq!(pkt.headroom(), 256 - 12);
    pkt.push_head(2).unwrap().copy_from_slice(&[8, 9]);
    assert_eq!(pkt.data(), &[8, 9, 1, 2, 3, 4]);
    pkt.push_tail(1).unwrap()[0] = 7;
    pkt.pull_head(3).unwrap();
    pkt.trim_tail(1).unwrap();
    assert_eq!(pkt.data(), &[2, 3, 4]);
    assert!(pkt.push_head(pkt.headroom() + 1).is_err());
    assert!(pkt.push_tail(pkt.tailroom() + 1).is_err());
    assert!(pkt.pull_head(4).is_err());
    assert!(pkt.trim_tail(4).is_err());
    let tail = pkt.tailroom();
    pkt.push_tail(tail).unwrap();
    assert_eq!(pkt.tailroom(), 0);
    assert!(pkt.set_data(&[0; 2049]).is_err());
}

#[test]
fn buffers_come_back_on_drop_and_are_never_handed_out_twice() {
    let p = pool(64);
    let mut held = Vec::with_capacity(64);
    assert_eq!(p.alloc_bulk(100, &mut held), 64);
    assert!(p.alloc().is_none());
    let mut seen: Vec<u32> = held.iter().map(|k| k.idx).collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 64, "no buffer twice");
    held.truncate(10);
    assert_eq!(p.available(), 54);
    drop(held);
    assert_eq!(p.available(), 64);
}

#[test]
fn free_bulk_returns_packets_to_their_own_pools() {
    let (a, b) = (pool(40), pool(40));
    let mut v = Vec::with_capacity(100);
    a.alloc_bulk(30, &mut v);
    b.alloc_bulk(5, &mut v);
    a.alloc_bulk(10, &mut v);
    assert_eq!((a.available(), b.available()), (0, 35));
    free_bulk(&mut v);
    assert!(v.is_empty());
    assert_eq!((a.available(), b.available()), (40, 40));
}

#[test]
fn for_each_data_mut_finds_every_packets_own_bytes_across_pools() {
    // A pool in one chunk and one in 4 KiB pages (two buffers a chunk): each packet's
    // bytes are its own, whichever pool comes first and however the pools interleave.
    let a = pool(40);
    let mut arena = DmaArena::new(64 * 4096, false).unwrap();
    arena.set_iova_map(crate::dma::IovaMap::Pages { shift: 12, pa: (0..64u64).map(|i| i << 12).collect() });
    let b = Mempool::new(Arc::new(arena), 20, 1536, 256).unwrap();
    for first_is_a in [true, false] {
        let mut v = Vec::new();
        let (x, y) = if first_is_a { (&a, &b) } else { (&b, &a) };
        x.alloc_bulk(3, &mut v);
        y.alloc_bulk(4, &mut v);
        x.alloc_bulk(5, &mut v);
        for (k, p) in v.iter_mut().enumerate() {
            let d = p.push_tail(10 + k).unwrap();
            d.iter_mut().enumerate().for_each(|(i, b)| *b = (k * 31 + i) as u8);
        }
        let mut k = 0;
        for_each_data_mut(&mut v, |d| {
            assert_eq!(d.len(), 10 + k);
            assert!(d.iter().enumerate().all(|(i, b)| *b == (k * 31 + i) as u8), "packet {k}");
            d[0] = 0xEE;
            k += 1;
        });
        assert_eq!(k, 12);
        assert!(v.iter().all(|p| p.data()[0] == 0xEE));
        free_bulk(&mut v);
    }
    for_each_data_mut(&mut [], |_| unreachable!());
    assert_eq!((a.available(), b.available()), (40, 20));
}

#[test]
fn pool_outlives_its_last_handle_while_packets_are_out() {
    let p = pool(8);
    let mut pkt = p.alloc().unwrap();
    let q = p.clone();
    drop(p);
    drop(q);
    pkt.set_data(b"still mapped").unwrap();
    assert_eq!(pkt.data(), b"still mapped");
    drop(pkt); // frees the pool (Miri/ASan would flag a use after free here)
}

#[test]
fn concurrent_alloc_and_free_lose_nothing() {
    let p = pool(256);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let p = p.clone();
            std::thread::spawn(move || {
                let mut v = Vec::with_capacity(32);
                for _ in 0..2000 {
                    p.alloc_bulk(32, &mut v);
                    v.clear();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(p.available(), 256);
}

#[derive(Debug, Clone)]
enum Op {
    Alloc(usize),
    Free(usize),
    PushHead(usize, usize),
    PullHead(usize, usize),
    PushTail(usize, usize),
    TrimTail(usize, usize),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        (1usize..40).prop_map(Op::Alloc),
        (0usize..64).prop_map(Op::Free),
        (0usize..64, 0usize..300).prop_map(|(i, n)| Op::PushHead(i, n)),
        (0usize..64, 0usize..300).prop_map(|(i, n)| Op::PullHead(i, n)),
        (0usize..64, 0usize..2200).prop_map(|(i, n)| Op::PushTail(i, n)),
        (0usize..64, 0usize..2200).prop_map(|(i, n)| Op::TrimTail(i, n)),
    ]
}

proptest::proptest! {
    /// Random allocations, drops and head/tail adjustments: every buffer is either
    /// held once or free, adjustments never leave the buffer, and dropping everything
    /// returns the pool to full.
    #[test]
    fn no_buffer_lost_or_duplicated(ops in proptest::collection::vec(op(), 1..200)) {
        let p = pool(48);
        let mut held: Vec<Packet> = Vec::with_capacity(64);
        for o in ops {
            match o {
                Op::Alloc(n) => { p.alloc_bulk(n, &mut held); }
                Op::Free(i) => if !held.is_empty() { held.swap_remove(i % held.len()); },
                Op::PushHead(i, n) | Op::PullHead(i, n) | Op::PushTail(i, n) | Op::TrimTail(i, n) => {
                    if held.is_empty() { continue; }
                    let k = i % held.len();
                    let pk = &mut held[k];
                    let (room_h, room_t, len) = (pk.headroom(), pk.tailroom(), pk.len());
                    let ok = match o {
                        Op::PushHead(..) => pk.push_head(n).is_ok(),
                        Op::PullHead(..) => pk.pull_head(n).is_ok(),
                        Op::PushTail(..) => pk.push_tail(n).is_ok(),
                        _ => pk.trim_tail(n).is_ok(),
                    };
                    let allowed = match o {
                        Op::PushHead(..) => n <= room_h,
                        Op::PushTail(..) => n <= room_t,
                        _ => n <= len,
                    };
                    proptest::prop_assert_eq!(ok, allowed);
                    proptest::prop_assert_eq!(pk.headroom() + 12 + pk.len() + pk.tailroom(), DEFAULT_BUF_SIZE as usize);
                    // The data slice stays inside this packet's own buffer.
                    // SAFETY: a packet's index is a buffer of its pool.
                    let (base, _) = unsafe { p.buf(pk.idx) };
                    let d = pk.data().as_ptr() as usize;
                    proptest::prop_assert!(d >= base as usize && d + pk.len() <= base as usize + DEFAULT_BUF_SIZE as usize);
                }
            }
            let mut idx: Vec<u32> = held.iter().map(|k| k.idx).collect();
            idx.sort_unstable();
            idx.dedup();
            proptest::prop_assert_eq!(idx.len(), held.len(), "a buffer handed out twice");
            proptest::prop_assert_eq!(held.len() as u32 + p.available(), 48);
        }
        drop(held);
        proptest::prop_assert_eq!(p.available(), 48);
    }
}

#[test]
fn a_chain_walks_in_order_and_returns_every_segment_on_drop() {
    let p = pool(16);
    let mut head = p.alloc().unwrap();
    head.set_data(b"head").unwrap();
    for s in [&b"one"[..], b"two", b"three"] {
        let mut seg = p.alloc().unwrap();
        seg.set_data(s).unwrap();
        head.append(seg).unwrap();
    }
    assert_eq!((head.nb_segs(), head.total_len(), head.len()), (4, 15, 4));
    let segs: Vec<&[u8]> = head.segments().collect();
    assert_eq!(segs, vec![&b"head"[..], b"one", b"two", b"three"]);
    head.segment_mut(2).unwrap().copy_from_slice(b"TWO");
    assert!(head.segment_mut(4).is_none());
    let mut flat = [0u8; 15];
    assert_eq!(head.copy_to(&mut flat).unwrap(), 15);
    assert_eq!(&flat, b"headoneTWOthree");
    assert!(head.copy_to(&mut [0u8; 14]).is_err());
    assert_eq!(p.available(), 12);
    let mut v = vec![head];
    free_bulk(&mut v);
    assert_eq!(p.available(), 16);
}

#[test]
fn chain_edges_are_refused_or_undone() {
    let (a, b) = (pool(8), pool(8));
    let mut h = a.alloc().unwrap();
    // A segment of another pool is refused (and returned to its own pool).
    assert!(h.append(b.alloc().unwrap()).is_err());
    assert_eq!(b.available(), 8);
    // A chained tail brings its segments along.
    let mut t = a.alloc().unwrap();
    t.set_data(b"t0").unwrap();
    let mut t1 = a.alloc().unwrap();
    t1.set_data(b"t1").unwrap();
    t.append(t1).unwrap();
    h.set_data(b"h").unwrap();
    h.append(t).unwrap();
    assert_eq!(h.segments().collect::<Vec<_>>(), vec![&b"h"[..], b"t0", b"t1"]);
    // Linearise: the frame becomes one buffer, the segments go back.
    h.linearize().unwrap();
    assert_eq!((h.nb_segs(), h.data()), (1, &b"ht0t1"[..]));
    assert_eq!(a.available(), 7);
    // set_data on a chain drops its segments.
    let mut s = a.alloc().unwrap();
    s.set_data(b"x").unwrap();
    h.append(s).unwrap();
    h.set_data(b"flat").unwrap();
    assert_eq!((h.nb_segs(), h.total_len(), a.available()), (1, 4, 7));
    // A chain too long for the head's tailroom is not linearised, and stays whole.
    let big = vec![7u8; 2048];
    let mut c = a.alloc_chain(&big, 1000).unwrap();
    let mut more = a.alloc().unwrap();
    more.set_data(&big).unwrap();
    c.append(more).unwrap();
    assert_eq!(c.nb_segs(), 4);
    assert!(c.linearize().is_err());
    assert_eq!(c.total_len(), 4096);
    drop((c, h));
    assert_eq!(a.available(), 8);
    // The pool runs out half way: nothing is held.
    assert!(a.alloc_chain(&vec![1u8; 9 * 100], 100).is_none());
    assert_eq!(a.available(), 8);
}

#[test]
fn an_offload_request_stays_with_its_packet_until_cleared() {
    let p = pool(4);
    let mut pkt = p.alloc().unwrap();
    assert_eq!(pkt.tx_offload(), None);
    let o = TxOffload { csum: Some(TxCsum { start: 34, offset: 16 }), gso: None };
    pkt.set_tx_offload(o);
    assert_eq!(pkt.tx_offload(), Some(o));
    assert!(p.owns(&pkt) && !p.owns_plain(&pkt));
    // It survives growing the chain, and a head adjustment.
    let seg = p.alloc().unwrap();
    pkt.append(seg).unwrap();
    pkt.push_head(4).unwrap();
    assert_eq!(pkt.tx_offload(), Some(o));
    pkt.set_tx_offload(TxOffload::default());
    assert_eq!(pkt.tx_offload(), None);
    assert!(!p.owns_plain(&pkt), "still a chain");
    pkt.set_data(b"x").unwrap();
    assert!(p.owns_plain(&pkt));
    drop(pkt);
    // A fresh packet on the same buffer carries no stale request.
    let again = p.alloc().unwrap();
    assert_eq!((again.tx_offload(), again.nb_segs()), (None, 1));
}

#[derive(Debug, Clone)]
enum ChainOp {
    /// A fresh packet holding `n` bytes of one value.
    Alloc(usize, u8),
    /// Packet `j` appended to packet `i`.
    Append(usize, usize),
    Drop(usize),
    Linearize(usize),
    /// `n` bytes more at the tail of packet `i`'s head segment.
    PushTail(usize, usize),
}

fn chain_op() -> impl proptest::strategy::Strategy<Value = ChainOp> {
    use proptest::prelude::*;
    prop_oneof![
        (0usize..1500, any::<u8>()).prop_map(|(n, v)| ChainOp::Alloc(n, v)),
        (0usize..32, 0usize..32).prop_map(|(i, j)| ChainOp::Append(i, j)),
        (0usize..32).prop_map(ChainOp::Drop),
        (0usize..32).prop_map(ChainOp::Linearize),
        (0usize..32, 0usize..600).prop_map(|(i, n)| ChainOp::PushTail(i, n)),
    ]
}

proptest::proptest! {
    /// Chains against a model (each packet a list of segments' bytes): the segments walk
    /// in order with the model's bytes, `total_len` and `nb_segs` agree, no buffer is
    /// held twice or lost, and dropping everything fills the pool again.
    #[test]
    fn chains_match_a_model(ops in proptest::collection::vec(chain_op(), 1..120)) {
        let p = pool(40);
        let mut held: Vec<(Packet, Vec<Vec<u8>>)> = Vec::new();
        for o in ops {
            match o {
                ChainOp::Alloc(n, v) => {
                    if let Some(mut pk) = p.alloc() {
                        pk.set_data(&vec![v; n]).unwrap();
                        held.push((pk, vec![vec![v; n]]));
                    }
                }
                ChainOp::Append(i, j) => {
                    if held.len() < 2 { continue; }
                    let (i, j) = (i % held.len(), j % held.len());
                    if i == j { continue; }
                    let (tail, tm) = held.remove(j);
                    let i = if i > j { i - 1 } else { i };
                    held[i].0.append(tail).unwrap();
                    held[i].1.extend(tm);
                }
                ChainOp::Drop(i) => if !held.is_empty() { held.swap_remove(i % held.len()); },
                ChainOp::Linearize(i) => {
                    if held.is_empty() { continue; }
                    let k = i % held.len();
                    let (pk, m) = &mut held[k];
                    let fits = m.iter().skip(1).map(Vec::len).sum::<usize>() <= pk.tailroom();
                    proptest::prop_assert_eq!(pk.linearize().is_ok(), fits);
                    if fits {
                        let flat = m.concat();
                        *m = vec![flat];
                    }
                }
                ChainOp::PushTail(i, n) => {
                    if held.is_empty() { continue; }
                    let k = i % held.len();
                    let (pk, m) = &mut held[k];
                    let ok = n <= pk.tailroom();
                    proptest::prop_assert_eq!(pk.push_tail(n).map(|b| b.fill(0xee)).is_ok(), ok);
                    if ok { m[0].extend(std::iter::repeat(0xee).take(n)); }
                }
            }
            let mut bufs = 0;
            for (pk, m) in &held {
                let segs: Vec<&[u8]> = pk.segments().collect();
                let want: Vec<&[u8]> = m.iter().map(Vec::as_slice).collect();
                proptest::prop_assert_eq!(segs, want);
                proptest::prop_assert_eq!(pk.nb_segs(), m.len());
                proptest::prop_assert_eq!(pk.total_len(), m.iter().map(Vec::len).sum::<usize>());
                bufs += m.len() as u32;
            }
            proptest::prop_assert_eq!(bufs + p.available(), 40);
        }
        drop(held);
        proptest::prop_assert_eq!(p.available(), 40);
    }
}
