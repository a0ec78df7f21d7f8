//! Unit and property tests of the driver ring, both bookkeeping modes, against the
//! in-process [`FakeDevice`](super::fake::FakeDevice) or hand-written used elements.

use super::*;

fn ring(size: u16, event_idx: bool) -> DriverRing {
    let arena = Arc::new(DmaArena::new(1 << 20, false).unwrap());
    DriverRing::new(&arena, size, RingFeatures { event_idx, in_order: false }).unwrap()
}

/// Plays the device: completes `n` avail entries in order with `len`.
fn complete(r: &DriverRing, from_avail: u16, n: u16, len: u32) {
    let used_idx = r.used_idx().load(Ordering::Relaxed);
    for i in 0..n {
        let slot = from_avail.wrapping_add(i) & r.mask;
        // SAFETY: test-only reads/writes inside the ring areas.
        unsafe {
            let id = std::ptr::read_volatile(r.avail.add(layout::avail_entry(slot)) as *const u16);
            let e = r.used.add(layout::used_entry(used_idx.wrapping_add(i) & r.mask)) as *mut u32;
            std::ptr::write_volatile(e, id as u32);
            std::ptr::write_volatile(e.add(1), len);
        }
    }
    r.used_idx().store(used_idx.wrapping_add(n), Ordering::Release);
}

fn write_used(r: &DriverRing, id: u32, len: u32) {
    let used_idx = r.used_idx().load(Ordering::Relaxed);
    // SAFETY: test-only write inside the used ring.
    unsafe {
        let e = r.used.add(layout::used_entry(used_idx & r.mask)) as *mut u32;
        std::ptr::write_volatile(e, id);
        std::ptr::write_volatile(e.add(1), len);
    }
    r.used_idx().store(used_idx.wrapping_add(1), Ordering::Release);
}

#[test]
fn post_publish_and_reclaim_in_bulk_across_wraps() {
    let mut r = ring(8, false);
    let mut avail = 0u16;
    for round in 0..50u32 {
        let n = (round % 8 + 1) as u16;
        for k in 0..n {
            assert!(r.post(0x1000 + k as u64, 100, true, Some(round * 100 + k as u32)).is_some());
        }
        r.publish();
        complete(&r, avail, n, 60);
        avail = avail.wrapping_add(n);
        assert_eq!(r.poll_used().unwrap(), n);
        for k in 0..n {
            assert_eq!(r.pop_used().unwrap(), (round * 100 + k as u32, 60));
        }
        assert_eq!(r.free_count(), 8);
    }
    assert!(r.post(0, 1, false, None).is_some());
    for _ in 0..7 {
        assert!(r.post(0, 1, false, None).is_some());
    }
    assert!(r.post(0, 1, false, None).is_none(), "full");
}

/// A receive burst ends on a multiple of four in the used index once it takes more
/// than four, whatever the starting point (also across the u16 wrap: 65536 is a
/// multiple of four), and never takes none of what it was offered.
#[test]
fn receive_bursts_end_on_a_line_of_descriptors() {
    let mut r = ring(16, false);
    for start in [0u16, 1, 2, 3, 65533, 65534, 65535] {
        r.last_used = start;
        for n in 0..=16u16 {
            let k = r.line_aligned(n);
            if n <= 4 {
                assert_eq!(k, n);
            } else {
                assert_eq!(start.wrapping_add(k) % 4, 0, "start {start}, n {n}");
                assert!(k <= n && n - k <= 3 && k > 0, "start {start}, n {n}, k {k}");
            }
        }
    }
}

#[test]
fn rejects_bad_used_entries() {
    let mut r = ring(8, false);
    r.post(0x1000, 100, true, Some(7));
    r.publish();
    write_used(&r, 9, 10);
    assert_eq!(r.poll_used().unwrap(), 1);
    assert_eq!(r.pop_used(), Err(DeviceError::UsedIdOutOfRange { id: 9 }));

    let mut r = ring(8, false);
    r.post(0x1000, 100, true, Some(7));
    r.publish();
    write_used(&r, 3, 10); // descriptor 3 was never posted (the stack hands out 0 first)
    assert_eq!(r.pop_used(), Err(DeviceError::UsedIdNotInFlight { id: 3 }));

    let mut r = ring(8, false);
    r.post(0x1000, 100, true, Some(7));
    r.publish();
    write_used(&r, 0, 101);
    assert_eq!(r.pop_used(), Err(DeviceError::UsedLenTooLarge { len: 101, posted: 100 }));

    let mut r = ring(8, false);
    r.post(0x1000, 100, true, Some(7));
    r.publish();
    write_used(&r, 0, 10);
    write_used(&r, 0, 10);
    assert_eq!(r.poll_used(), Err(DeviceError::UsedIdxJump { moved: 2, in_flight: 1 }));
    // A double completion of the same id is caught even within the in-flight budget.
    let mut r = ring(8, false);
    r.post(0x1000, 100, true, Some(7));
    r.post(0x2000, 100, true, Some(8));
    r.publish();
    write_used(&r, 0, 10);
    write_used(&r, 0, 10);
    assert_eq!(r.poll_used(), Ok(2));
    assert_eq!(r.pop_used(), Ok((7, 10)));
    assert_eq!(r.pop_used(), Err(DeviceError::UsedIdNotInFlight { id: 0 }));
}

#[test]
fn chains_link_their_parts_and_free_them_whole() {
    let mut r = ring(8, false);
    let mut dev = fake::FakeDevice::new(&r);
    for round in 0..20u32 {
        let head = r.post_chain(&[(0x1000, 2, false), (0x2000, 6, false), (0x3000, 1, true)], round).unwrap();
        r.publish();
        assert_eq!(r.in_flight(), 1);
        assert_eq!(r.free_count(), 5);
        let (h, chain) = dev.pop_avail().unwrap();
        assert_eq!(h, head);
        let got: Vec<(u64, u32, u16)> = chain.iter().map(|d| (d.addr, d.len, d.flags)).collect();
        assert_eq!(got, vec![(0x1000, 2, DESC_F_NEXT), (0x2000, 6, DESC_F_NEXT), (0x3000, 1, DESC_F_WRITE)]);
        dev.push_used(head as u32, 1);
        assert_eq!(r.poll_used(), Ok(1));
        assert_eq!(r.pop_used(), Ok((round, 1)));
        assert_eq!((r.free_count(), r.in_flight()), (8, 0), "the whole chain is free again");
    }
    // Too few free descriptors: refused, nothing taken.
    for _ in 0..6 {
        r.post(0, 1, false, None);
    }
    assert!(r.post_chain(&[(0, 1, false), (0, 1, false), (0, 1, true)], 0).is_none());
    assert!(r.post_chain(&[], 0).is_none());
    assert_eq!(r.free_count(), 2);
}

#[test]
fn a_used_id_naming_a_chain_tail_is_rejected() {
    let mut r = ring(8, false);
    let mut dev = fake::FakeDevice::new(&r);
    let head = r.post_chain(&[(0x1000, 2, false), (0x3000, 1, true)], 5).unwrap();
    r.publish();
    let (_, chain) = dev.pop_avail().unwrap();
    assert_ne!(chain.len(), 0);
    let tail = (0..8u32).find(|&i| i != head as u32 && r.links[head as usize] as u32 == i).unwrap();
    dev.push_used(tail, 1);
    assert_eq!(r.poll_used(), Ok(1));
    assert_eq!(r.pop_used(), Err(DeviceError::UsedIdNotInFlight { id: tail }));
}

#[test]
fn kicks_only_when_the_device_asks() {
    let mut r = ring(8, false);
    r.used_flags().store(layout::USED_F_NO_NOTIFY, Ordering::Relaxed);
    r.post(0, 1, false, None);
    assert!(!r.publish());
    r.used_flags().store(0, Ordering::Relaxed);
    r.post(0, 1, false, None);
    assert!(r.publish());
    assert!(!r.publish(), "nothing new, no kick");

    let mut r = ring(16, true);
    r.avail_event().store(3, Ordering::Relaxed);
    let mut kicks = 0;
    for _ in 0..4 {
        r.post(0, 1, false, None);
        r.post(0, 1, false, None);
        kicks += r.publish() as u32;
    }
    assert_eq!(kicks, 1, "only the publish that moved avail idx past 3 (2 -> 4) kicks");
}

/// Collects the tokens of `pop_used_tokens`.
impl TokenSink for Vec<u32> {
    fn token(&mut self, token: u32) {
        self.push(token);
    }
}

fn ring_in_order(size: u16) -> DriverRing {
    let arena = Arc::new(DmaArena::new(1 << 20, false).unwrap());
    DriverRing::new(&arena, size, RingFeatures { event_idx: false, in_order: true }).unwrap()
}

/// Plays an in-order device that returns `n` buffers with a single used element
/// naming the last one (§2.7.9), and advances the used index by `n`.
fn complete_batch(r: &DriverRing, from_avail: u16, n: u16, len: u32) {
    let used_idx = r.used_idx().load(Ordering::Relaxed);
    let last = from_avail.wrapping_add(n - 1) & r.mask;
    // SAFETY: test-only reads/writes inside the ring areas.
    unsafe {
        let id = std::ptr::read_volatile(r.avail.add(layout::avail_entry(last)) as *const u16);
        let e = r.used.add(layout::used_entry(used_idx & r.mask)) as *mut u32;
        std::ptr::write_volatile(e, id as u32);
        std::ptr::write_volatile(e.add(1), len);
    }
    r.used_idx().store(used_idx.wrapping_add(n), Ordering::Release);
}

fn avail_entry(r: &DriverRing, slot: u16) -> u16 {
    // SAFETY: test-only read of an avail entry: the slot is masked below the ring size.
    unsafe { std::ptr::read_volatile(r.avail.add(layout::avail_entry(slot & r.mask)) as *const u16) }
}

#[test]
fn in_order_takes_descriptors_in_table_order_across_wraps() {
    let mut r = ring_in_order(8);
    assert!(r.in_order());
    let mut avail = 0u16;
    let mut next_id = 0u16;
    for round in 0..50u32 {
        let n = (round % 8 + 1) as u16;
        for k in 0..n {
            let id = r.post(0x1000 + k as u64, 100, true, Some(round * 100 + k as u32)).unwrap();
            assert_eq!(id, next_id & 7, "descriptors are taken in table order");
            next_id = next_id.wrapping_add(1);
        }
        r.publish();
        for k in 0..n {
            assert_eq!(avail_entry(&r, avail.wrapping_add(k)), avail.wrapping_add(k) & 7);
        }
        complete(&r, avail, n, 60);
        avail = avail.wrapping_add(n);
        assert_eq!(r.poll_used().unwrap(), n);
        for k in 0..n {
            assert_eq!(r.pop_used().unwrap(), (round * 100 + k as u32, 60));
        }
        assert_eq!((r.free_count(), r.in_flight()), (8, 0));
    }
    for _ in 0..8 {
        assert!(r.post(0, 1, false, None).is_some());
    }
    assert!(r.post(0, 1, false, None).is_none(), "full");
}

#[test]
fn in_order_batch_with_one_used_element() {
    let mut r = ring_in_order(8);
    for k in 0..5u32 {
        r.post(0x1000, 100 + k, true, Some(10 + k));
    }
    r.publish();
    complete_batch(&r, 0, 5, 60);
    assert_eq!(r.poll_used(), Ok(5));
    // The buffers before the batch's last count as used whole.
    for k in 0..4u32 {
        assert_eq!(r.pop_used(), Ok((10 + k, 100 + k)));
    }
    assert_eq!(r.pop_used(), Ok((14, 60)));
    assert_eq!((r.free_count(), r.in_flight()), (8, 0));
    // The next completion is written where the batch ended; a batch may also be taken
    // over two bursts.
    for k in 0..6u32 {
        r.post(0x1000, 100, true, Some(20 + k));
    }
    r.publish();
    complete(&r, 5, 2, 7);
    complete_batch(&r, 7, 4, 9);
    assert_eq!(r.poll_used(), Ok(6));
    assert_eq!(r.pop_used(), Ok((20, 7)));
    assert_eq!(r.pop_used(), Ok((21, 7)));
    assert_eq!(r.pop_used(), Ok((22, 100)));
    assert_eq!(r.poll_used(), Ok(3));
    assert_eq!(r.pop_used(), Ok((23, 100)));
    assert_eq!(r.pop_used(), Ok((24, 100)));
    assert_eq!(r.pop_used(), Ok((25, 9)));
    assert_eq!(r.poll_used(), Ok(0));
}

#[test]
fn in_order_transmit_reclaim_reads_no_used_element() {
    let mut r = ring_in_order(8);
    for round in 0..20u32 {
        for k in 0..5u32 {
            r.post(0x1000, 64, false, Some(round * 10 + k));
        }
        r.publish();
        // The device moves the used index only: the elements hold garbage.
        // SAFETY: test-only writes inside the used ring.
        unsafe {
            for s in 0..8 {
                let e = r.used.add(layout::used_entry(s)) as *mut u32;
                std::ptr::write_volatile(e, 0xdead_beef);
                std::ptr::write_volatile(e.add(1), u32::MAX);
            }
        }
        let used = r.used_idx().load(Ordering::Relaxed);
        r.used_idx().store(used.wrapping_add(5), Ordering::Release);
        assert_eq!(r.poll_used(), Ok(5));
        let mut got = Vec::new();
        assert_eq!(r.pop_used_tokens(5, &mut got), Ok(5));
        assert_eq!(got, (0..5u32).map(|k| round * 10 + k).collect::<Vec<_>>());
        assert_eq!((r.free_count(), r.in_flight()), (8, 0));
    }
}

#[test]
fn in_order_rejects_bad_used_entries() {
    // Out of range.
    let mut r = ring_in_order(8);
    r.post(0x1000, 100, true, Some(7));
    r.publish();
    write_used(&r, 9, 10);
    assert_eq!(r.pop_used(), Err(DeviceError::UsedIdOutOfRange { id: 9 }));
    // A position that is not in flight (behind us, or never posted).
    let mut r = ring_in_order(8);
    r.post(0x1000, 100, true, Some(7));
    r.post(0x1000, 100, true, Some(8));
    r.publish();
    write_used(&r, 2, 10);
    assert_eq!(r.pop_used(), Err(DeviceError::UsedIdNotInFlight { id: 2 }));
    let mut r = ring_in_order(8);
    r.post(0x1000, 100, true, Some(7));
    r.post(0x1000, 100, true, Some(8));
    r.publish();
    write_used(&r, 0, 10);
    write_used(&r, 0, 10);
    assert_eq!(r.pop_used(), Ok((7, 10)));
    assert_eq!(r.pop_used(), Err(DeviceError::UsedIdNotInFlight { id: 0 }), "a double completion");
    // Too long.
    let mut r = ring_in_order(8);
    r.post(0x1000, 100, true, Some(7));
    r.publish();
    write_used(&r, 0, 101);
    assert_eq!(r.pop_used(), Err(DeviceError::UsedLenTooLarge { len: 101, posted: 100 }));
    // The index jumping past what is in flight.
    let mut r = ring_in_order(8);
    r.post(0x1000, 100, true, Some(7));
    r.publish();
    let used = r.used_idx().load(Ordering::Relaxed);
    r.used_idx().store(used.wrapping_add(2), Ordering::Release);
    assert_eq!(r.poll_used(), Err(DeviceError::UsedIdxJump { moved: 2, in_flight: 1 }));
}

#[test]
fn in_order_chains_take_consecutive_descriptors_and_wrap() {
    let mut r = ring_in_order(8);
    let mut dev = fake::FakeDevice::new(&r);
    // Move the table position to 6 with single buffers.
    for t in 0..6u32 {
        r.post(0x100, 1, false, Some(t));
    }
    r.publish();
    for _ in 0..6 {
        let (h, _) = dev.pop_avail().unwrap();
        dev.push_used(h as u32, 0);
    }
    assert_eq!(r.poll_used(), Ok(6));
    let mut got = Vec::new();
    assert_eq!(r.pop_used_tokens(6, &mut got), Ok(6));
    assert_eq!(got, (0..6u32).collect::<Vec<_>>());
    let head = r.post_chain(&[(0x1000, 2, false), (0x2000, 6, false), (0x3000, 1, true)], 77).unwrap();
    assert_eq!(head, 6);
    let single = r.post(0x4000, 9, true, Some(78)).unwrap();
    assert_eq!(single, 1, "after the chain's 6, 7, 0");
    r.publish();
    let (h, chain) = dev.pop_avail().unwrap();
    assert_eq!(h, 6);
    // SAFETY: test-only read of the table: the chain's links are x + 1, wrapping to 0.
    let next_of =
        |id: usize| unsafe { std::ptr::read_volatile(r.desc.add(id * layout::DESC_SIZE + 14) as *const u16) };
    assert_eq!((next_of(6), next_of(7)), (7, 0));
    let got: Vec<(u64, u32, u16)> = chain.iter().map(|d| (d.addr, d.len, d.flags)).collect();
    assert_eq!(got, vec![(0x1000, 2, DESC_F_NEXT), (0x2000, 6, DESC_F_NEXT), (0x3000, 1, DESC_F_WRITE)]);
    assert_eq!(r.free_count(), 4);
    dev.push_used(6, 1);
    let (h2, _) = dev.pop_avail().unwrap();
    dev.push_used(h2 as u32, 9);
    assert_eq!(r.poll_used(), Ok(2));
    assert_eq!(r.pop_used(), Ok((77, 1)));
    assert_eq!(r.pop_used(), Ok((78, 9)));
    assert_eq!((r.free_count(), r.in_flight()), (8, 0));
    // Drain sees in-flight tokens in order.
    r.post_chain(&[(0, 1, false), (0, 1, true)], 5).unwrap();
    r.post(0, 1, true, Some(6)).unwrap();
    assert_eq!(r.drain_in_flight().collect::<Vec<_>>(), vec![5, 6]);
}

proptest::proptest! {
    /// In-order mode against a model: random bursts of posts and random completions,
    /// each either one element per buffer or one element per batch; every token comes
    /// back once, in order, with the right length.
    #[test]
    fn in_order_matches_a_model(ops in proptest::collection::vec((1u16..=16, 0u16..=16, proptest::bool::ANY), 1..200)) {
        let mut r = ring_in_order(16);
        let mut posted = std::collections::VecDeque::new();
        let mut next_token = 0u32;
        let mut avail = 0u16;
        for (post, done, batch) in ops {
            let post = post.min(r.free_count());
            for _ in 0..post {
                r.post(0x1000, 1000 + next_token % 7, true, Some(next_token)).unwrap();
                posted.push_back(next_token);
                next_token += 1;
            }
            r.publish();
            let done = done.min(posted.len() as u16);
            if done == 0 {
                continue;
            }
            let expect: Vec<(u32, u32)> = if batch {
                complete_batch(&r, avail, done, 5);
                (0..done).map(|k| {
                    let t = posted.pop_front().unwrap();
                    (t, if k + 1 == done { 5 } else { 1000 + t % 7 })
                }).collect()
            } else {
                complete(&r, avail, done, 5);
                (0..done).map(|_| (posted.pop_front().unwrap(), 5)).collect()
            };
            avail = avail.wrapping_add(done);
            proptest::prop_assert_eq!(r.poll_used(), Ok(done));
            let got: Vec<(u32, u32)> = (0..done).map(|_| r.pop_used().unwrap()).collect();
            proptest::prop_assert_eq!(got, expect);
            proptest::prop_assert_eq!(r.in_flight() as usize, posted.len());
            proptest::prop_assert_eq!(r.free_count() as usize, 16 - posted.len());
        }
    }
}

proptest::proptest! {
    /// Chains posted with `post_chain_id` (the transmit path's multi-segment packets)
    /// mixed with single buffers posted with their id as token, against a model, in both
    /// bookkeeping modes: the device sees each chain's parts as posted, in order; the
    /// token of each completion is the head id the device names; descriptors come back
    /// whole; nothing is lost (drain at the end).
    #[test]
    fn chains_with_id_tokens_match_a_model(
        in_order in proptest::bool::ANY,
        ops in proptest::collection::vec((0usize..=5, 0u16..=8, 0usize..100), 1..150),
    ) {
        let size = 16u16;
        let mut r = if in_order { ring_in_order(size) } else { ring(size, false) };
        let mut dev = fake::FakeDevice::new(&r);
        // Posted, by head id: the parts.
        let mut posted: std::collections::HashMap<u16, Vec<(u64, u32)>> = Default::default();
        // Taken by the device, not completed: (head, descriptors).
        let mut held: Vec<(u16, usize)> = Vec::new();
        let mut descs = 0usize;
        let mut seq = 0u64;
        for (nparts, done, pick) in ops {
            if nparts > 0 && nparts <= r.free_count() as usize {
                let parts: Vec<(u64, u32, bool)> =
                    (0..nparts).map(|k| (0x10_000 + (seq * 8 + k as u64) * 64, 10 + k as u32, false)).collect();
                seq += 1;
                let head = if nparts == 1 {
                    r.post(parts[0].0, parts[0].1, false, None).unwrap()
                } else {
                    r.post_chain_id(&parts, 0).unwrap()
                };
                proptest::prop_assert!(posted.insert(head, parts.iter().map(|p| (p.0, p.1)).collect()).is_none());
                descs += nparts;
                r.publish();
            }
            while let Some((head, chain)) = dev.pop_avail() {
                let got: Vec<(u64, u32)> = chain.iter().map(|d| (d.addr, d.len)).collect();
                proptest::prop_assert_eq!(Some(&got), posted.get(&head));
                held.push((head, chain.len()));
            }
            let done = (done as usize).min(held.len());
            let mut order = Vec::new();
            for _ in 0..done {
                let i = if in_order { 0 } else { pick % held.len() };
                let (head, _) = held.remove(i);
                dev.push_used(head as u32, 0);
                order.push(head);
            }
            proptest::prop_assert_eq!(r.poll_used(), Ok(done as u16));
            let mut got = Vec::new();
            proptest::prop_assert_eq!(r.pop_used_tokens(done as u16, &mut got), Ok(done as u16));
            proptest::prop_assert_eq!(got, order.iter().map(|&h| h as u32).collect::<Vec<_>>());
            for h in order {
                descs -= posted.remove(&h).unwrap().len();
            }
            proptest::prop_assert_eq!(r.free_count() as usize, size as usize - descs);
            proptest::prop_assert_eq!(r.in_flight() as usize, posted.len());
        }
        let mut left: Vec<u32> = r.drain_in_flight().collect();
        left.sort_unstable();
        let mut want: Vec<u32> = posted.keys().map(|&h| h as u32).collect();
        want.sort_unstable();
        proptest::prop_assert_eq!(left, want);
    }
}
