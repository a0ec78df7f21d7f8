//! Unit, property and hostile-device tests of the packed ring, against the in-process
//! [`PackedFake`](super::fake::PackedFake).

use std::collections::VecDeque;

use proptest::prelude::*;

use super::fake::PackedFake;
use super::*;
use crate::error::DeviceError;
use crate::ring::{TokenSink, UsedSink};

fn ring(size: u16, in_order: bool, event_idx: bool) -> PackedRing {
    let arena = Arc::new(DmaArena::new(1 << 20, false).unwrap());
    PackedRing::new(&arena, size, RingFeatures { event_idx, in_order }).unwrap()
}

struct Src(u32);
impl PostSource for Src {
    fn buffer(&mut self, k: usize, _id: u16) -> (u64, u32, u32) {
        (0x10_0000 + 0x1000 * (self.0 as u64 + k as u64), 1000 + k as u32, self.0 + k as u32)
    }
}

#[derive(Default)]
struct Got(Vec<(u32, u32)>);
impl UsedSink for Got {
    fn used(&mut self, token: u32, len: u32) {
        self.0.push((token, len));
    }
}
impl TokenSink for Got {
    fn token(&mut self, token: u32) {
        self.0.push((token, 0));
    }
}

#[test]
fn a_burst_is_invisible_until_its_first_descriptors_flags_are_published() {
    let mut r = ring(8, false, false);
    let mut dev = PackedFake::new(&r);
    assert_eq!(dev.driver_event_flags(), p::EVENT_FLAG_DISABLE, "a polling driver disables notifications");
    assert_eq!(r.post_burst(3, true, &mut Src(0)), 3);
    // Descriptors 1 and 2 carry their flags already; the first one does not.
    assert!(dev.pop_avail().is_none());
    dev.set_event(0, p::EVENT_FLAG_ENABLE);
    assert!(r.publish(), "notifications enabled: kick");
    let mut ids = Vec::new();
    while let Some((id, chain)) = dev.pop_avail() {
        assert_eq!(chain.len(), 1);
        assert_ne!(chain[0].flags & p::DESC_F_WRITE, 0);
        ids.push(id);
    }
    assert_eq!(ids.len(), 3);
    assert!(!r.publish(), "nothing new to publish");
}

#[test]
fn kick_decision_follows_the_device_event_structure() {
    let mut r = ring(10, false, true);
    let dev = PackedFake::new(&r);
    dev.set_event(0, p::EVENT_FLAG_DISABLE);
    r.post_burst(4, true, &mut Src(0));
    assert!(!r.publish(), "DISABLE: no kick");
    // Positions 4..8 now; wrap counter still 1.
    dev.set_event(p::event_off_wrap(6, true), p::EVENT_FLAG_DESC);
    r.post_burst(4, true, &mut Src(0));
    assert!(r.publish(), "the burst 4..8 passed descriptor 6");
    dev.set_event(p::event_off_wrap(9, true), p::EVENT_FLAG_DESC);
    let mut g = Got::default();
    // Free the ring so the next burst wraps: complete everything.
    let mut dev2 = PackedFake::new(&r);
    while let Some((id, c)) = dev2.pop_avail() {
        dev2.push_used(id, 0, c.len() as u16);
    }
    dev.set_event(p::event_off_wrap(8, false), p::EVENT_FLAG_DESC);
    assert_eq!(r.pop_used_burst(8, &mut g), Ok(8));
    // A burst 8, 9, 0, 1 (avail wrap flips to 0): passes 9 of the old lap and 0, 1 of the new.
    dev.set_event(p::event_off_wrap(9, true), p::EVENT_FLAG_DESC);
    r.post_burst(4, true, &mut Src(0));
    assert!(r.publish(), "9 in the old lap was passed");
    assert!(!r.avail_wrap);
    dev.set_event(p::event_off_wrap(3, false), p::EVENT_FLAG_DESC);
    r.post_burst(1, true, &mut Src(0));
    assert!(!r.publish(), "a burst of position 2 does not pass 3");
    dev.set_event(p::event_off_wrap(3, false), p::EVENT_FLAG_DESC);
    r.post_burst(1, true, &mut Src(0));
    assert!(r.publish(), "a burst of position 3 passes 3");
    // DESC without EVENT_IDX negotiated: kick (the safe answer).
    let mut r2 = ring(4, false, false);
    PackedFake::new(&r2).set_event(p::event_off_wrap(3, true), p::EVENT_FLAG_DESC);
    r2.post_burst(1, true, &mut Src(0));
    assert!(r2.publish());
}

#[test]
fn chains_are_in_ring_order_with_next_and_the_id_on_every_descriptor() {
    for in_order in [false, true] {
        let mut r = ring(5, in_order, false);
        let mut dev = PackedFake::new(&r);
        for round in 0..7u32 {
            let parts = [(0x1000, 2, false), (0x2000, 8, false), (0x3000, 1, true)];
            let id = r.post_chain(&parts, round).unwrap();
            assert_eq!(r.free_count(), 2);
            assert!(r.post_chain(&parts, 99).is_none(), "three descriptors do not fit in two");
            r.publish();
            let (dev_id, chain) = dev.pop_avail().unwrap();
            assert_eq!(dev_id, id);
            assert_eq!(chain.len(), 3);
            for (k, d) in chain.iter().enumerate() {
                assert_eq!((d.addr, d.len, d.id), (parts[k].0, parts[k].1, id));
                assert_eq!(d.flags & p::DESC_F_NEXT != 0, k < 2);
                assert_eq!(d.flags & p::DESC_F_WRITE != 0, parts[k].2);
            }
            dev.push_used(dev_id, 1, 3);
            assert_eq!(r.poll_used(), Ok(1));
            assert_eq!(r.pop_used(), Ok(Some((round, 1))));
            assert_eq!(r.pop_used(), Ok(None));
            assert_eq!(r.free_count(), 5);
        }
    }
}

/// One step of the property test's script.
#[derive(Debug, Clone)]
enum Step {
    /// Post up to this many buffers (one descriptor each, or chains of 2 when odd).
    Post(u16),
    /// The device takes up to this many available buffers.
    Take(u16),
    /// The device completes up to this many taken buffers; `pick` chooses which one
    /// (any-order) or the batch size (in order).
    Complete(u16, u16),
    /// The driver takes up to this many used buffers.
    Pop(u16),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (1u16..40).prop_map(Step::Post),
        (1u16..40).prop_map(Step::Take),
        ((1u16..40), any::<u16>()).prop_map(|(n, k)| Step::Complete(n, k)),
        (1u16..40).prop_map(Step::Pop),
    ]
}

/// Runs a script against the model: every token comes back exactly once, in order when
/// in order, with the length the device wrote (or the posted length inside a batch).
fn run_script(size: u16, in_order: bool, chains: bool, steps: &[Step]) {
    let mut r = ring(size, in_order, true);
    let mut dev = PackedFake::new(&r);
    let mut next_token = 0u32;
    // Driver side model: token → (posted len, descriptors).
    let mut posted: std::collections::HashMap<u32, (u32, u16)> = Default::default();
    // Device side: buffers taken and not completed (id, ndesc, token, posted len).
    let mut taken: VecDeque<(u16, u16, u32, u32)> = VecDeque::new();
    // What the driver must see next, in the order the device completed.
    let mut expect: VecDeque<(u32, u32)> = VecDeque::new();
    let mut in_flight_descs = 0u16;
    for s in steps {
        match *s {
            Step::Post(n) => {
                if chains && n % 2 == 1 {
                    if r.free_count() >= 2 {
                        let t = next_token;
                        next_token += 1;
                        r.post_chain(&[(0x1000, 14, false), (0x2000, 500 + t % 7, true)], t).unwrap();
                        posted.insert(t, (514 + t % 7, 2));
                        in_flight_descs += 2;
                    }
                } else {
                    let want = n.min(r.free_count());
                    let got = r.post_burst(n, true, &mut Src(next_token));
                    assert_eq!(got, want);
                    for k in 0..got {
                        posted.insert(next_token + k as u32, (1000 + k as u32, 1));
                    }
                    next_token += got as u32;
                    in_flight_descs += got;
                }
                r.publish();
                assert_eq!(r.free_count(), size - in_flight_descs);
            }
            Step::Take(n) => {
                for _ in 0..n {
                    let Some((id, chain)) = dev.pop_avail() else { break };
                    let total: u32 = chain.iter().map(|d| d.len).sum();
                    // The token is recovered through the address for single buffers, else
                    // from the model by id match below.
                    taken.push_back((id, chain.len() as u16, u32::MAX, total));
                }
            }
            Step::Complete(n, pick) => {
                for _ in 0..n {
                    if taken.is_empty() {
                        break;
                    }
                    if in_order {
                        // A batch of `1 + pick % 4` buffers, one used descriptor naming the
                        // last; the earlier ones count as used whole.
                        let b = (1 + pick as usize % 4).min(taken.len());
                        let batch: Vec<_> = taken.drain(..b).collect();
                        let (last_id, _, _, last_total) = *batch.last().unwrap();
                        let len = last_total / 2;
                        dev.write_used(last_id, len, p::used_flags(dev.used_wrap()));
                        let descs: u16 = batch.iter().map(|b| b.1).sum();
                        dev.skip(descs);
                        for (k, &(_, _, _, total)) in batch.iter().enumerate() {
                            expect.push_back((u32::MAX, if k + 1 == b { len } else { total }));
                        }
                    } else {
                        let i = pick as usize % taken.len();
                        let (id, nd, _, total) = taken.remove(i).unwrap();
                        let len = total / 3;
                        dev.push_used(id, len, nd);
                        expect.push_back((id as u32, len));
                    }
                }
            }
            Step::Pop(n) => {
                let mut g = Got::default();
                let bound = r.poll_used().unwrap();
                assert!(bound as usize >= expect.len().min(1), "a used buffer is seen");
                // Odd counts take tokens only (the transmit reclaim, whose in-order
                // batches go through `take_batch_tokens`), even ones tokens and lengths.
                let tokens_only = n % 2 == 1;
                let k = if tokens_only {
                    r.pop_used_tokens(n, &mut g).unwrap()
                } else {
                    r.pop_used_burst(n, &mut g).unwrap()
                };
                assert_eq!(k as usize, g.0.len());
                assert_eq!(k as usize, (n as usize).min(expect.len()));
                for (token, len) in g.0 {
                    let (want_id, want_len) = expect.pop_front().unwrap();
                    let len = if tokens_only { want_len } else { len };
                    assert_eq!(len, want_len);
                    let (plen, nd) = posted.remove(&token).expect("a token in flight, once");
                    assert!(len <= plen);
                    if !in_order {
                        let _ = want_id; // ids are the driver's business; tokens are checked.
                    }
                    in_flight_descs -= nd;
                }
                assert_eq!(r.free_count(), size - in_flight_descs);
                assert_eq!(r.in_flight() as usize, posted.len());
            }
        }
    }
    // Drain: every remaining token comes back once.
    let mut left: Vec<u32> = r.drain_in_flight().collect();
    left.sort();
    let mut want: Vec<u32> = posted.keys().copied().collect();
    want.sort();
    assert_eq!(left, want);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    #[test]
    fn packed_ring_against_a_model_device(
        size in prop_oneof![Just(1u16), Just(2), Just(3), Just(7), Just(8), Just(13), Just(64), 1u16..100],
        in_order in any::<bool>(),
        chains in any::<bool>(),
        steps in proptest::collection::vec(step(), 1..300),
    ) {
        run_script(size, in_order, chains, &steps);
    }
}

/// Many laps of both wrap counters with the device in lock-step (full ring each time).
#[test]
fn many_laps_of_both_wrap_counters() {
    for size in [1u16, 3, 8, 255, 256] {
        for in_order in [false, true] {
            let mut r = ring(size, in_order, false);
            let mut dev = PackedFake::new(&r);
            let mut token = 0;
            for lap in 0..5u32 {
                for _ in 0..3 {
                    let n = r.post_burst(size, false, &mut Src(token));
                    assert_eq!(n, r.size());
                    r.publish();
                    let mut done = Vec::new();
                    while let Some((id, c)) = dev.pop_avail() {
                        done.push((id, c.len() as u16));
                    }
                    assert_eq!(done.len(), size as usize, "lap {lap}");
                    if !in_order {
                        done.reverse();
                    }
                    for (id, nd) in done {
                        dev.push_used(id, 0, nd);
                    }
                    let mut g = Got::default();
                    assert_eq!(r.pop_used_tokens(size, &mut g), Ok(size));
                    let mut toks: Vec<u32> = g.0.iter().map(|t| t.0).collect();
                    if !in_order {
                        toks.sort();
                    }
                    assert_eq!(toks, (token..token + size as u32).collect::<Vec<_>>());
                    token += size as u32;
                }
            }
        }
    }
}

// ---- A hostile device: each check of `used.rs`. ----

/// A ring of 8 with four buffers posted, published and taken by the device.
fn posted4(in_order: bool) -> (PackedRing, PackedFake, Vec<u16>) {
    let mut r = ring(8, in_order, false);
    let mut dev = PackedFake::new(&r);
    r.post_burst(4, true, &mut Src(0));
    r.publish();
    let ids = (0..4).map(|_| dev.pop_avail().unwrap().0).collect();
    (r, dev, ids)
}

#[test]
fn used_id_not_in_flight_or_out_of_range_is_an_error() {
    for in_order in [false, true] {
        let (mut r, dev, _) = posted4(in_order);
        let stray = if in_order { 6 } else { 4 }; // never posted (free stack order is 0, 1, ...)
        dev.write_used(stray, 0, p::used_flags(true));
        assert_eq!(r.pop_used(), Err(DeviceError::UsedIdNotInFlight { id: stray as u32 }));
        dev.write_used(8, 0, p::used_flags(true));
        assert_eq!(r.pop_used(), Err(DeviceError::UsedIdOutOfRange { id: 8 }));
        dev.write_used(0xffff, 0, p::used_flags(true));
        assert_eq!(r.pop_used(), Err(DeviceError::UsedIdOutOfRange { id: 0xffff }));
        assert_eq!(r.in_flight(), 4, "nothing was taken on the strength of a bad id");
    }
}

#[test]
fn a_buffer_returned_twice_is_an_error() {
    let (mut r, mut dev, ids) = posted4(false);
    dev.push_used(ids[1], 10, 1);
    assert_eq!(r.pop_used(), Ok(Some((1, 10))));
    dev.push_used(ids[1], 10, 1);
    assert_eq!(r.pop_used(), Err(DeviceError::UsedIdNotInFlight { id: ids[1] as u32 }));
}

#[test]
fn used_len_beyond_the_buffer_is_an_error() {
    for in_order in [false, true] {
        let (mut r, mut dev, ids) = posted4(in_order);
        // Buffer k was posted with 1000 + k bytes.
        dev.push_used(ids[0], 1000, 1);
        assert_eq!(r.pop_used(), Ok(Some((0, 1000))));
        dev.write_used(ids[1], 1002, p::used_flags(true));
        assert_eq!(r.pop_used(), Err(DeviceError::UsedLenTooLarge { len: 1002, posted: 1001 }));
        // An in-order batch's length is checked against its last buffer.
        if in_order {
            dev.write_used(ids[3], 1004, p::used_flags(true));
            assert_eq!(r.pop_used(), Err(DeviceError::UsedLenTooLarge { len: 1004, posted: 1003 }));
        }
    }
}

/// Transmit reclaim takes tokens only: a used length there is not checked (DPDK's vhost
/// leaves an in-order batch's length field as the driver wrote it), the id still is.
#[test]
fn token_reclaim_ignores_the_length_but_not_the_id() {
    let (mut r, mut dev, ids) = posted4(true);
    // A batch of all four naming the last, with the first buffer's posted length.
    dev.write_used(ids[3], 1000 + 64, p::used_flags(true));
    dev.skip(4);
    let mut g = Got::default();
    assert_eq!(r.pop_used_tokens(8, &mut g), Ok(4));
    assert_eq!(g.0, vec![(0, 0), (1, 0), (2, 0), (3, 0)]);
    let (mut r, dev, _) = posted4(false);
    dev.write_used(9, 0, p::used_flags(true));
    assert_eq!(r.pop_used_tokens(8, &mut g), Err((0, DeviceError::UsedIdOutOfRange { id: 9 })));
}

#[test]
fn a_used_descriptor_with_the_wrong_wrap_is_an_error() {
    for in_order in [false, true] {
        let (mut r, dev, ids) = posted4(in_order);
        // Used flags of wrap 0 while the driver is on wrap 1 (AVAIL = USED = 0).
        dev.write_used(ids[0], 0, p::used_flags(false));
        assert_eq!(r.poll_used(), Err(DeviceError::UsedWrongWrap { pos: 0, flags: 0 }));
        assert_eq!(r.pop_used(), Err(DeviceError::UsedWrongWrap { pos: 0, flags: 0 }));
        // AVAIL = 0, USED = 1: neither available nor used for either counter.
        dev.write_used(ids[0], 0, p::DESC_F_USED | p::DESC_F_WRITE);
        assert!(matches!(r.pop_used(), Err(DeviceError::UsedWrongWrap { pos: 0, .. })));
        // Still available: not used yet, no error.
        dev.write_used(ids[0], 0, p::avail_flags(true));
        assert_eq!(r.pop_used(), Ok(None));
    }
}

#[test]
fn an_in_order_batch_id_that_skips_is_an_error() {
    // Chains of two: an id naming a chain's second descriptor is no buffer.
    let mut r = ring(8, true, false);
    let mut dev = PackedFake::new(&r);
    for t in 0..3 {
        r.post_chain(&[(0x1000, 10, false), (0x2000, 10, true)], t).unwrap();
    }
    r.publish();
    while dev.pop_avail().is_some() {}
    dev.write_used(3, 0, p::used_flags(true));
    assert_eq!(r.pop_used(), Err(DeviceError::UsedIdNotInFlight { id: 3 }));
    // Beyond what is in flight.
    dev.write_used(6, 0, p::used_flags(true));
    assert_eq!(r.pop_used(), Err(DeviceError::UsedIdNotInFlight { id: 6 }));
    // A batch ending on buffer 2 (at position 4): buffers 0 and 2 (positions 0, 2) whole.
    dev.write_used(4, 7, p::used_flags(true));
    let mut g = Got::default();
    assert_eq!(r.pop_used_burst(8, &mut g), Ok(3));
    assert_eq!(g.0, vec![(0, 20), (1, 20), (2, 7)]);
    assert_eq!(r.free_count(), 8);
    // A batch is handed out across bursts without rereading the descriptor.
    let (mut r, mut dev, ids) = posted4(true);
    dev.write_used(ids[3], 5, p::used_flags(true));
    dev.skip(4);
    let mut g = Got::default();
    assert_eq!(r.pop_used_burst(2, &mut g), Ok(2));
    assert_eq!(r.pop_used_burst(8, &mut g), Ok(2));
    assert_eq!(g.0, vec![(0, 1000), (1, 1001), (2, 1002), (3, 5)]);
    assert_eq!(r.pop_used_burst(8, &mut g), Ok(0));
}

#[test]
fn in_order_receive_takes_singles_then_a_batch_then_stops_at_an_error() {
    // Two buffers with used descriptors of their own, then a batch of two (one used
    // descriptor naming the last): one call takes all four, lengths as written / whole.
    let (mut r, mut dev, ids) = posted4(true);
    dev.push_used(ids[0], 10, 1);
    dev.push_used(ids[1], 11, 1);
    dev.write_used(ids[3], 12, p::used_flags(true));
    dev.skip(2);
    let mut g = Got::default();
    assert_eq!(r.pop_used_burst(8, &mut g), Ok(4));
    assert_eq!(g.0, vec![(0, 10), (1, 11), (2, 1002), (3, 12)]);
    assert_eq!((r.in_flight(), r.free_count()), (0, 8));
    // Good buffers before a bad one are handed out and counted; the error names the
    // bad one; nothing past it is taken.
    for bad in 0..3 {
        let (mut r, mut dev, ids) = posted4(true);
        dev.push_used(ids[0], 10, 1);
        dev.push_used(ids[1], 11, 1);
        let want = match bad {
            0 => {
                dev.write_used(ids[2], 5000, p::used_flags(true));
                DeviceError::UsedLenTooLarge { len: 5000, posted: 1002 }
            }
            1 => {
                dev.write_used(ids[2], 0, p::used_flags(false));
                DeviceError::UsedWrongWrap { pos: 2, flags: p::used_flags(false) }
            }
            _ => {
                // Buffer 1 again, at buffer 2's position: an in-order id behind the used
                // position names no buffer in flight.
                dev.write_used(ids[1], 0, p::used_flags(true));
                DeviceError::UsedIdNotInFlight { id: ids[1] as u32 }
            }
        };
        let mut g = Got::default();
        assert_eq!(r.pop_used_burst(8, &mut g), Err((2, want)), "case {bad}");
        assert_eq!(g.0, vec![(0, 10), (1, 11)], "case {bad}");
        assert_eq!((r.in_flight(), r.free_count()), (2, 6), "case {bad}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    /// Chains posted with `post_chain_id` (the transmit path's multi-segment packets) and
    /// single buffers posted with their id as token, against a model: the device sees
    /// each chain's parts as posted, in ring order across wraps; each completion's token
    /// is the id the device names; the ring's free count follows the descriptors.
    #[test]
    fn chains_with_id_tokens_match_a_model(
        size in prop_oneof![Just(5u16), Just(8), Just(13)],
        in_order in any::<bool>(),
        ops in proptest::collection::vec((0usize..=4, 0u16..=6, 0usize..100), 1..150),
    ) {
        let mut r = ring(size, in_order, false);
        let mut dev = PackedFake::new(&r);
        let mut posted: std::collections::HashMap<u16, Vec<(u64, u32)>> = Default::default();
        let mut held: Vec<(u16, u16)> = Vec::new();
        let mut descs = 0u16;
        let mut seq = 0u64;
        for (nparts, done, pick) in ops {
            if nparts > 0 && nparts <= r.free_count() as usize {
                let parts: Vec<(u64, u32, bool)> =
                    (0..nparts).map(|k| (0x10_000 + (seq * 8 + k as u64) * 64, 10 + k as u32, false)).collect();
                seq += 1;
                let id = if nparts == 1 {
                    r.post(parts[0].0, parts[0].1, false, None).unwrap()
                } else {
                    r.post_chain_id(&parts, 0).unwrap()
                };
                prop_assert!(posted.insert(id, parts.iter().map(|p| (p.0, p.1)).collect()).is_none());
                descs += nparts as u16;
                r.publish();
            }
            while let Some((id, chain)) = dev.pop_avail() {
                let got: Vec<(u64, u32)> = chain.iter().map(|d| (d.addr, d.len)).collect();
                prop_assert_eq!(Some(&got), posted.get(&id));
                held.push((id, chain.len() as u16));
            }
            let done = (done as usize).min(held.len());
            let mut order = Vec::new();
            for _ in 0..done {
                let i = if in_order { 0 } else { pick % held.len() };
                let (id, nd) = held.remove(i);
                dev.push_used(id, 0, nd);
                order.push(id);
            }
            let mut g = Got::default();
            let k = if done == 0 { 0 } else { r.pop_used_tokens(done as u16, &mut g).unwrap() };
            prop_assert_eq!(k as usize, done);
            let toks: Vec<u32> = g.0.iter().map(|t| t.0).collect();
            prop_assert_eq!(toks, order.iter().map(|&i| i as u32).collect::<Vec<_>>());
            for i in order {
                descs -= posted.remove(&i).unwrap().len() as u16;
            }
            prop_assert_eq!(r.free_count(), size - descs);
            prop_assert_eq!(r.in_flight() as usize, posted.len());
        }
    }
}
