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
