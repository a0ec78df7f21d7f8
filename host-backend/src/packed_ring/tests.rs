//! Tests of the device-side packed ring against a model of a driver (virtio 1.2 §2.8):
//! random bursts of chains (direct, chained, indirect) over ring sizes that are and are
//! not powers of two, across both wrap counters, with the used descriptors checked in
//! order (ids, lengths, flags, positions); then one test per kind of malformed input,
//! the event suppression in both directions, and the ring base.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use proptest::prelude::*;
use spec::packed::{self, PackedDescriptor, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::memory::tests::memfd;
use crate::memory::RegionDesc;
use crate::split_ring::{Chain, Dir, RingConfig};

const BASE: u64 = 0x10_0000;
const MEM: u64 = 4 << 20;
const DESC: u64 = BASE;
/// Driver and device event suppression areas (after the largest ring a test uses).
const DRIVER: u64 = BASE + 0x8_0000;
const DEVICE: u64 = DRIVER + 0x100;
const INDIRECT: u64 = BASE + 0x9_0000;
const DATA: u64 = BASE + 0x10_0000;

/// One chain the model driver has made available: its id, its ring descriptors and
/// the buffers the device must see (address, length).
#[derive(Debug, Clone)]
struct Posted {
    id: u16,
    count: u16,
    bufs: Vec<(u64, u32)>,
}

/// The driver's side of a test ring, written through vm-memory's own accessors, so the
/// device under test and the test share no ring code.
struct Drv {
    gm: GuestMemoryMmap,
    size: u16,
    avail_pos: u16,
    avail_wrap: bool,
    used_pos: u16,
    used_wrap: bool,
    free_ids: Vec<u16>,
    free_descs: u16,
    in_flight: VecDeque<Posted>,
    next_data: u64,
    next_indirect: u64,
    /// Used descriptors read (an in-order batch is one).
    used_read: usize,
}

impl Drv {
    fn write_desc(&self, at: u64, d: PackedDescriptor, flags_last: bool) {
        let (w0, w1) = d.to_le_words();
        if flags_last {
            // Everything but the flags, then the flags: as a driver makes a head available.
            self.gm.write_obj(w0, GuestAddress(at)).unwrap();
            self.gm.write_obj(d.len.to_le(), GuestAddress(at + 8)).unwrap();
            self.gm.write_obj(d.id.to_le(), GuestAddress(at + 12)).unwrap();
            self.gm.write_obj(d.flags.to_le(), GuestAddress(at + 14)).unwrap();
        } else {
            self.gm.write_obj(w0, GuestAddress(at)).unwrap();
            self.gm.write_obj(w1, GuestAddress(at + 8)).unwrap();
        }
    }
    fn ring_at(pos: u16) -> u64 {
        DESC + pos as u64 * 16
    }
    fn buf(&mut self, len: u32) -> u64 {
        if self.next_data + len as u64 > BASE + MEM - 0x1_0000 {
            self.next_data = DATA;
        }
        let a = self.next_data;
        self.next_data += (len as u64 + 63) & !63;
        a
    }
    fn room(&self, lens: usize, indirect: bool) -> bool {
        let need = if indirect { 1 } else { lens as u16 };
        !self.free_ids.is_empty() && self.free_descs >= need
    }
    /// Makes one chain available (the head's flags written last). `flags` are extra
    /// flags for every buffer (WRITE).
    fn post(&mut self, lens: &[u32], indirect: bool, flags: u16) -> Posted {
        let bufs: Vec<(u64, u32)> = lens.iter().map(|&l| (self.buf(l), l)).collect();
        let id = self.free_ids.pop().unwrap();
        let mut descs = Vec::new();
        if indirect {
            let table = self.next_indirect;
            self.next_indirect += 16 * lens.len() as u64;
            if self.next_indirect > DATA - 0x1000 {
                self.next_indirect = INDIRECT;
            }
            for (i, &(a, l)) in bufs.iter().enumerate() {
                let d = PackedDescriptor { addr: a, len: l, id: 0, flags };
                self.write_desc(table + 16 * i as u64, d, false);
            }
            descs.push(PackedDescriptor {
                addr: table,
                len: 16 * lens.len() as u32,
                id,
                flags: DESC_F_INDIRECT,
            });
        } else {
            for (i, &(a, l)) in bufs.iter().enumerate() {
                let next = if i + 1 < bufs.len() { DESC_F_NEXT } else { 0 };
                descs.push(PackedDescriptor { addr: a, len: l, id, flags: flags | next });
            }
        }
        let count = descs.len() as u16;
        let (head_pos, head_wrap) = (self.avail_pos, self.avail_wrap);
        // The rest of the chain first, then the head.
        let (mut p, mut w) = (head_pos, head_wrap);
        for (k, d) in descs.iter().enumerate() {
            if k > 0 {
                let d = PackedDescriptor { flags: d.flags | packed::avail_flags(w), ..*d };
                self.write_desc(Self::ring_at(p), d, false);
            }
            p += 1;
            if p == self.size {
                p = 0;
                w = !w;
            }
        }
        let h = PackedDescriptor { flags: descs[0].flags | packed::avail_flags(head_wrap), ..descs[0] };
        self.write_desc(Self::ring_at(head_pos), h, true);
        (self.avail_pos, self.avail_wrap) = (p, w);
        self.free_descs -= count;
        let posted = Posted { id, count, bufs };
        self.in_flight.push_back(posted.clone());
        posted
    }
    /// The used descriptors the device published, in order: (id, len, flags).
    fn take_used(&mut self) -> Vec<(u16, u32, u16)> {
        let mut out = Vec::new();
        // A driver looks only while it has buffers out (a slot past them may hold
        // anything that looks used, zeroes included).
        while !self.in_flight.is_empty() {
            let at = Self::ring_at(self.used_pos);
            let flags: u16 = self.gm.read_obj(GuestAddress(at + 14)).unwrap();
            if !packed::is_used(flags, self.used_wrap) {
                return out;
            }
            let len: u32 = self.gm.read_obj(GuestAddress(at + 8)).unwrap();
            let id: u16 = self.gm.read_obj(GuestAddress(at + 12)).unwrap();
            self.used_read += 1;
            assert!(self.in_flight.iter().any(|p| p.id == id), "a used descriptor for a chain in flight");
            // In order (§2.8.21), one used descriptor may stand for a batch ending at `id`:
            // the buffers before it are used too (reported with length 0 here).
            loop {
                let p = self.in_flight.pop_front().expect("in flight");
                let last = p.id == id;
                out.push((p.id, if last { len } else { 0 }, flags));
                self.free_ids.push(p.id);
                self.free_descs += p.count;
                self.advance_used(p.count);
                if last {
                    break;
                }
            }
        }
        out
    }
    fn advance_used(&mut self, count: u16) {
        let np = self.used_pos as u32 + count as u32;
        if np >= self.size as u32 {
            self.used_pos = (np - self.size as u32) as u16;
            self.used_wrap = !self.used_wrap;
        } else {
            self.used_pos = np as u16;
        }
    }
    fn set_event(&self, flags: u16, off_wrap: u16) {
        self.gm.write_obj(off_wrap.to_le(), GuestAddress(DRIVER)).unwrap();
        self.gm.write_obj(flags.to_le(), GuestAddress(DRIVER + 2)).unwrap();
    }
    fn device_event_flags(&self) -> u16 {
        self.gm.read_obj(GuestAddress(DEVICE + 2)).unwrap()
    }
}

struct Fixture {
    drv: Drv,
    ring: PackedRing,
    mem: Arc<GuestMemory>,
    call: EventFd,
}

fn memories() -> (GuestMemoryMmap, Arc<GuestMemory>) {
    let file = memfd(MEM);
    let gm = GuestMemoryMmap::<()>::from_ranges_with_files([(
        GuestAddress(BASE),
        MEM as usize,
        Some(FileOffset::new(file.try_clone().unwrap(), 0)),
    )])
    .unwrap();
    let mem = Arc::new(
        GuestMemory::map(&[RegionDesc { gpa: BASE, len: MEM, uva: BASE, mmap_offset: 0 }], vec![file])
            .unwrap(),
    );
    (gm, mem)
}

fn config(size: u16, base: u16, event_idx: bool) -> RingConfig {
    RingConfig {
        size,
        desc_uva: DESC,
        avail_uva: DRIVER,
        used_uva: DEVICE,
        base,
        event_idx,
        indirect: true,
        in_order: false,
    }
}

/// A ring of `size` resuming at offset `pos` with both wrap counters `wrap`.
fn fixture(size: u16, pos: u16, wrap: bool, event_idx: bool) -> Fixture {
    fixture_with(size, pos, wrap, event_idx, true, false)
}

/// [`fixture`], with or without `VIRTIO_RING_F_INDIRECT_DESC` and `VIRTIO_F_IN_ORDER`.
fn fixture_with(size: u16, pos: u16, wrap: bool, event_idx: bool, indirect: bool, in_order: bool) -> Fixture {
    let (gm, mem) = memories();
    let drv = Drv {
        gm,
        size,
        avail_pos: pos,
        avail_wrap: wrap,
        used_pos: pos,
        used_wrap: wrap,
        free_ids: (0..size).rev().collect(),
        free_descs: size,
        in_flight: VecDeque::new(),
        next_data: DATA,
        next_indirect: INDIRECT,
        used_read: 0,
    };
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    let base = pos | (wrap as u16) << 15;
    let cfg = RingConfig { indirect, in_order, ..config(size, base, event_idx) };
    let ring = PackedRing::new(&cfg, mem.clone(), Some(call.as_raw_fd()), None).unwrap();
    Fixture { drv, ring, mem, call }
}

/// Turns the chain's host pointers back into guest addresses.
fn chain_gpas(f: &Fixture, c: &Chain<'_>) -> Vec<(u64, u32)> {
    let mut hint = 0;
    let (base, _) = f.mem.translate(&mut hint, BASE, 1).unwrap();
    c.segs().iter().map(|s| (BASE + (s.ptr as u64 - base as u64), s.len)).collect()
}

/// One device burst over everything available (polls until nothing is left): walks
/// each chain, checks it against `expect` (front first), completes it with a length
/// derived from its id. Returns the chains completed and the calls made.
fn device_round(
    f: &mut Fixture,
    dir: Dir,
    expect: &mut VecDeque<Posted>,
) -> Result<(usize, usize), RingFault> {
    device_round_len(f, dir, expect, |id| 1000 + id as u32).map(|(done, calls, _)| (done, calls))
}

/// [`device_round`] completing each chain with `len(id)` bytes; also returns the bursts.
fn device_round_len(
    f: &mut Fixture,
    dir: Dir,
    expect: &mut VecDeque<Posted>,
    len: impl Fn(u16) -> u32,
) -> Result<(usize, usize, usize), RingFault> {
    let (mut done, mut calls, mut bursts) = (0, 0, 0);
    let mut c = Chain::default();
    loop {
        let n = f.ring.poll_avail()?;
        if n == 0 {
            return Ok((done, calls, bursts));
        }
        bursts += 1;
        assert!(n as usize <= MAX_BURST);
        for i in 0..n {
            f.ring.prefetch_write(i, 2);
            let h = f.ring.walk_avail(&f.mem, i, dir, &mut c)?;
            let p = expect.pop_front().expect("the device walks no more than was posted");
            assert_eq!((h.id(), h.count()), (p.id, p.count));
            // Merge adjacent pieces: a buffer may map to one piece or several.
            assert_eq!(chain_gpas(f, &c), p.bufs);
            assert_eq!(c.total, p.bufs.iter().map(|b| b.1 as u64).sum::<u64>());
            f.ring.add_used(h, len(p.id));
        }
        f.ring.consume(n);
        calls += f.ring.publish_used() as usize;
        done += n as usize;
    }
}

#[derive(Debug, Clone)]
struct ChainSpec {
    lens: Vec<u32>,
    indirect: bool,
}

fn chain_spec() -> impl Strategy<Value = ChainSpec> {
    (prop::collection::vec(1u32..3000, 1..5), any::<bool>())
        .prop_map(|(lens, indirect)| ChainSpec { lens, indirect })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Random rounds of chains over sizes that are and are not powers of two, from any
    /// position and wrap counter: every chain the ring walks is what the driver posted,
    /// and the used descriptors come back in order at the right positions with the
    /// right ids, lengths and flags (both wrap counters flip many times).
    #[test]
    fn walks_and_used_descriptors_match_a_driver_model(
        size in prop_oneof![Just(1u16), Just(2u16), Just(3u16), Just(5u16), Just(7u16), Just(16u16), Just(100u16), Just(256u16)],
        start in any::<u16>(),
        wrap in any::<bool>(),
        rounds in prop::collection::vec(prop::collection::vec(chain_spec(), 0..80), 1..16),
        writable in any::<bool>(),
    ) {
        let mut f = fixture(size, start % size, wrap, false);
        let (dir, flags) = if writable { (Dir::DeviceWrites, DESC_F_WRITE) } else { (Dir::DeviceReads, 0) };
        for round in rounds {
            let mut expect = VecDeque::new();
            for spec in round {
                let mut lens = spec.lens.clone();
                lens.truncate(size as usize);
                if !f.drv.room(lens.len(), spec.indirect) {
                    continue;
                }
                expect.push_back(f.drv.post(&lens, spec.indirect, flags));
            }
            let n = expect.len();
            let (done, _) = device_round(&mut f, dir, &mut expect).unwrap();
            prop_assert_eq!(done, n);
            let used = f.drv.take_used();
            prop_assert_eq!(used.len(), n);
            for (id, len, fl) in used {
                prop_assert_eq!(len, 1000 + id as u32);
                prop_assert_eq!(fl & DESC_F_WRITE, DESC_F_WRITE, "len > 0 is marked WRITE");
            }
            prop_assert!(f.drv.in_flight.is_empty());
            prop_assert_eq!(f.ring.last_avail(), f.drv.avail_pos | (f.drv.avail_wrap as u16) << 15);
        }
    }

    /// With `VIRTIO_F_IN_ORDER`, chains the device only read and completed with length 0
    /// come back as one used descriptor per burst naming the burst's last buffer id
    /// (§2.8.21), at the burst's first position; the driver model walks the batch by its
    /// own descriptor counts and ends exactly where the device does. Device-writable
    /// chains, or a length written, keep one used descriptor each.
    #[test]
    fn in_order_runs_of_transmit_buffers_share_one_used_descriptor(
        size in prop_oneof![Just(1u16), Just(3u16), Just(7u16), Just(16u16), Just(100u16), Just(256u16)],
        start in any::<u16>(),
        wrap in any::<bool>(),
        rounds in prop::collection::vec(prop::collection::vec(chain_spec(), 0..80), 1..16),
        writable in any::<bool>(),
        zero in any::<bool>(),
    ) {
        let mut f = fixture_with(size, start % size, wrap, false, true, true);
        let (dir, flags) = if writable { (Dir::DeviceWrites, DESC_F_WRITE) } else { (Dir::DeviceReads, 0) };
        let len = |id: u16| if zero { 0 } else { 1000 + id as u32 };
        for round in rounds {
            let mut expect = VecDeque::new();
            for spec in round {
                let mut lens = spec.lens.clone();
                lens.truncate(size as usize);
                if !f.drv.room(lens.len(), spec.indirect) {
                    continue;
                }
                expect.push_back(f.drv.post(&lens, spec.indirect, flags));
            }
            let n = expect.len();
            let before = f.drv.used_read;
            let (done, _, bursts) = device_round_len(&mut f, dir, &mut expect, len).unwrap();
            prop_assert_eq!(done, n);
            let used = f.drv.take_used();
            prop_assert_eq!(used.len(), n);
            let descs = f.drv.used_read - before;
            if !writable && zero {
                prop_assert_eq!(descs, bursts, "one used descriptor per burst");
            } else {
                prop_assert_eq!(descs, n, "one used descriptor per chain");
                for &(id, l, _) in &used {
                    prop_assert_eq!(l, len(id));
                }
            }
            prop_assert!(f.drv.in_flight.is_empty());
            prop_assert_eq!(f.ring.last_avail(), f.drv.avail_pos | (f.drv.avail_wrap as u16) << 15);
        }
    }
}

/// A burst is invisible until its one publication, then whole; the first used
/// descriptor's flags are the last thing written.
#[test]
fn a_burst_is_published_whole_by_its_first_flags() {
    let mut f = fixture(100, 90, true, false);
    for _ in 0..20 {
        f.drv.post(&[64, 64], false, DESC_F_WRITE);
    }
    let n = f.ring.poll_avail().unwrap();
    assert_eq!(n, 20);
    let mut c = Chain::default();
    for i in 0..n {
        let h = f.ring.walk_avail(&f.mem, i, Dir::DeviceWrites, &mut c).unwrap();
        assert_eq!(h.count(), 2);
        f.ring.add_used(h, 7);
    }
    f.ring.consume(n);
    assert!(f.drv.take_used().is_empty(), "nothing visible before the publication");
    f.ring.publish_used();
    let used = f.drv.take_used();
    assert_eq!(used.len(), 20);
    assert!(!f.drv.used_wrap && f.drv.used_pos == 30, "40 descriptors from 90 of 100");
    assert_eq!(f.ring.last_avail(), 30);
}

/// A burst takes at most MAX_BURST chains; the rest come with the next poll.
#[test]
fn a_poll_finds_at_most_a_burst() {
    let mut f = fixture(256, 0, true, false);
    let mut expect: VecDeque<Posted> = (0..200).map(|_| f.drv.post(&[64], false, 0)).collect();
    assert_eq!(f.ring.poll_avail().unwrap() as usize, MAX_BURST);
    assert_eq!(device_round(&mut f, Dir::DeviceReads, &mut expect).unwrap().0, 200);
    assert_eq!(f.drv.take_used().len(), 200);
}

/// A chain not completed in a burst (backpressure) stays available, and its id may be
/// walked again by the next burst.
#[test]
fn a_chain_left_in_the_ring_is_walked_again() {
    let mut f = fixture(8, 0, true, false);
    let a = f.drv.post(&[64], false, 0);
    let b = f.drv.post(&[64, 32], false, 0);
    let mut c = Chain::default();
    assert_eq!(f.ring.poll_avail().unwrap(), 2);
    let ha = f.ring.walk_avail(&f.mem, 0, Dir::DeviceReads, &mut c).unwrap();
    f.ring.walk_avail(&f.mem, 1, Dir::DeviceReads, &mut c).unwrap();
    f.ring.add_used(ha, 0);
    f.ring.consume(1);
    f.ring.publish_used();
    assert_eq!(f.ring.poll_avail().unwrap(), 1);
    let hb = f.ring.walk_avail(&f.mem, 0, Dir::DeviceReads, &mut c).unwrap();
    assert_eq!(hb, PackedHead::new(b.id, 2, true));
    f.ring.add_used(hb, 0);
    f.ring.consume(1);
    f.ring.publish_used();
    let used = f.drv.take_used();
    assert_eq!(used.iter().map(|u| u.0).collect::<Vec<_>>(), vec![a.id, b.id]);
    assert_eq!(used[0].2 & DESC_F_WRITE, 0, "len 0: no WRITE");
}

/// Posts one descriptor by hand at ring offset `pos` with the given flags and id.
fn raw(f: &Fixture, pos: u16, d: PackedDescriptor) {
    f.drv.write_desc(Drv::ring_at(pos), d, true);
}

fn first_walk(f: &mut Fixture, dir: Dir) -> Result<PackedHead, RingFault> {
    let n = f.ring.poll_avail()?;
    assert_eq!(n, 1);
    f.ring.prefetch_write(0, 64);
    let mut c = Chain::default();
    f.ring.walk_avail(&f.mem, 0, dir, &mut c)
}

#[test]
fn rejects_every_kind_of_malformed_chain() {
    let av = packed::avail_flags(true);
    let ok = |addr| PackedDescriptor { addr, len: 64, id: 0, flags: av };

    // A head available with the wrong wrap counter is simply not available.
    let mut f = fixture(8, 0, true, false);
    raw(&f, 0, PackedDescriptor { flags: packed::avail_flags(false), ..ok(DATA) });
    assert_eq!(f.ring.poll_avail(), Ok(0));
    assert!(!f.ring.set_kicks(true), "nothing new either");

    // NEXT into a descriptor marked with the other wrap counter: a wrap-counter lie.
    let mut f = fixture(8, 0, true, false);
    raw(&f, 1, PackedDescriptor { flags: packed::avail_flags(false), ..ok(DATA) });
    raw(&f, 0, PackedDescriptor { flags: av | DESC_F_NEXT, ..ok(DATA) });
    assert_eq!(f.ring.poll_avail(), Err(RingFault::ChainNotAvailable { pos: 1 }));

    // The same across the end of the ring: position 0 after a wrap must carry the
    // flipped counter.
    let mut f = fixture(4, 3, true, false);
    raw(&f, 0, ok(DATA)); // still "true": stale for the lap after the wrap
    raw(&f, 3, PackedDescriptor { flags: av | DESC_F_NEXT, ..ok(DATA) });
    assert_eq!(f.ring.poll_avail(), Err(RingFault::ChainNotAvailable { pos: 0 }));

    // A chain running past the ring's size: every descriptor NEXT, all available for
    // their lap, so the walk comes back to its own head.
    let mut f = fixture(4, 0, true, false);
    for p in (0..4).rev() {
        raw(&f, p, PackedDescriptor { flags: av | DESC_F_NEXT, ..ok(DATA) });
    }
    assert_eq!(f.ring.poll_avail(), Err(RingFault::ChainTooLong));

    // Good chains before a bad one are served first; the fault comes with the next poll.
    let mut f = fixture(8, 0, true, false);
    let good = f.drv.post(&[64], false, 0);
    raw(&f, 2, PackedDescriptor { flags: packed::avail_flags(false), ..ok(DATA) });
    raw(&f, 1, PackedDescriptor { flags: av | DESC_F_NEXT, ..ok(DATA) });
    let mut expect = VecDeque::from([good]);
    assert_eq!(
        device_round(&mut f, Dir::DeviceReads, &mut expect),
        Err(RingFault::ChainNotAvailable { pos: 2 })
    );
    assert_eq!(f.drv.take_used().len(), 1);

    // Buffer outside guest memory, and an address that wraps.
    let mut f = fixture(8, 0, true, false);
    raw(&f, 0, ok(BASE + MEM - 8));
    assert_eq!(
        first_walk(&mut f, Dir::DeviceReads),
        Err(RingFault::BadAddress { addr: BASE + MEM - 8, len: 64 })
    );
    let mut f = fixture(8, 0, true, false);
    raw(&f, 0, ok(u64::MAX - 8));
    assert!(matches!(first_walk(&mut f, Dir::DeviceReads), Err(RingFault::BadAddress { .. })));

    // Direction.
    let mut f = fixture(8, 0, true, false);
    raw(&f, 0, ok(DATA));
    assert_eq!(first_walk(&mut f, Dir::DeviceWrites), Err(RingFault::Direction));
    let mut f = fixture(8, 0, true, false);
    raw(&f, 1, PackedDescriptor { flags: av, ..ok(DATA) });
    raw(&f, 0, PackedDescriptor { flags: av | DESC_F_WRITE | DESC_F_NEXT, ..ok(DATA) });
    assert_eq!(first_walk(&mut f, Dir::ReadsThenWrites), Err(RingFault::Direction));

    // Indirect: with NEXT (in a list), bad lengths, outside memory, nested, too long,
    // without the feature.
    let ind = |len| PackedDescriptor { addr: INDIRECT, len, id: 0, flags: av | DESC_F_INDIRECT };
    let mut f = fixture(8, 0, true, false);
    raw(&f, 1, ok(DATA));
    raw(&f, 0, PackedDescriptor { flags: ind(16).flags | DESC_F_NEXT, ..ind(16) });
    assert_eq!(first_walk(&mut f, Dir::DeviceReads), Err(RingFault::BadIndirect { len: 16 }));
    for len in [0u32, 24, 16 * 9] {
        let mut f = fixture(8, 0, true, false);
        raw(&f, 0, ind(len));
        assert_eq!(first_walk(&mut f, Dir::DeviceReads), Err(RingFault::BadIndirect { len }), "len {len}");
    }
    let mut f = fixture(8, 0, true, false);
    raw(&f, 0, PackedDescriptor { addr: BASE + MEM - 16, ..ind(32) });
    assert_eq!(
        first_walk(&mut f, Dir::DeviceReads),
        Err(RingFault::IndirectAddress { addr: BASE + MEM - 16, len: 32 })
    );
    let mut f = fixture(8, 0, true, false);
    f.drv.write_desc(
        INDIRECT,
        PackedDescriptor { addr: INDIRECT, len: 16, id: 0, flags: DESC_F_INDIRECT },
        false,
    );
    raw(&f, 0, ind(16));
    assert_eq!(first_walk(&mut f, Dir::DeviceReads), Err(RingFault::BadIndirect { len: 16 }));
    let mut f = fixture_with(8, 0, true, false, false, false);
    raw(&f, 0, ind(16));
    assert_eq!(first_walk(&mut f, Dir::DeviceReads), Err(RingFault::BadIndirect { len: 16 }));

    // An id made available twice while in flight (within one burst): the poll returns
    // the chain before it, and the fault from then on, even once that chain is used.
    let mut f = fixture(8, 0, true, false);
    raw(&f, 1, PackedDescriptor { id: 5, ..ok(DATA) });
    raw(&f, 0, PackedDescriptor { id: 5, ..ok(DATA) });
    assert_eq!(f.ring.poll_avail(), Ok(1));
    let mut c = Chain::default();
    let h = f.ring.walk_avail(&f.mem, 0, Dir::DeviceReads, &mut c).unwrap();
    assert_eq!(h.id(), 5);
    // Walking the same chain again in the burst is not a reuse.
    assert_eq!(f.ring.walk_avail(&f.mem, 0, Dir::DeviceReads, &mut c), Ok(h));
    f.ring.add_used(h, 0);
    f.ring.consume(1);
    f.ring.publish_used();
    assert_eq!(f.ring.poll_avail(), Err(RingFault::IdInFlight { id: 5 }));
    assert_eq!(f.ring.poll_more(), Err(RingFault::IdInFlight { id: 5 }));
    // The same for a chain of two descriptors (its id is its last one's), found by the
    // general loop after a single descriptor.
    let mut f = fixture(8, 0, true, false);
    raw(&f, 2, PackedDescriptor { id: 3, ..ok(DATA + 64) });
    raw(&f, 1, PackedDescriptor { id: 9, flags: ok(DATA).flags | DESC_F_NEXT, ..ok(DATA) });
    raw(&f, 0, PackedDescriptor { id: 3, ..ok(DATA) });
    assert_eq!(f.ring.poll_avail(), Ok(1));
    assert_eq!(f.ring.poll_avail(), Err(RingFault::IdInFlight { id: 3 }));
    // Ids found in one burst are free again in the next.
    let mut f = fixture(8, 0, true, false);
    raw(&f, 0, PackedDescriptor { id: 5, ..ok(DATA) });
    assert_eq!(f.ring.poll_avail(), Ok(1));
    assert_eq!(f.ring.poll_avail(), Ok(1));
}

#[test]
fn rejects_bad_ring_setup() {
    let (_, mem) = memories();
    let c = config(8, 0x8000, false);
    assert!(PackedRing::new(&RingConfig { size: 0, ..c.clone() }, mem.clone(), None, None).is_err());
    assert!(PackedRing::new(&RingConfig { size: 32768, ..c.clone() }, mem.clone(), None, None).is_ok());
    assert!(PackedRing::new(&RingConfig { size: 32769, ..c.clone() }, mem.clone(), None, None).is_err());
    assert!(
        PackedRing::new(&RingConfig { size: 3, ..c.clone() }, mem.clone(), None, None).is_ok(),
        "any size"
    );
    assert_eq!(
        PackedRing::new(&RingConfig { base: 0x8008, ..c.clone() }, mem.clone(), None, None).err(),
        Some(RingFault::BadBase { base: 0x8008 })
    );
    for (d, a, u) in [(DESC + 8, DRIVER, DEVICE), (DESC, DRIVER + 2, DEVICE), (DESC, DRIVER, DEVICE + 1)] {
        let cfg = RingConfig { desc_uva: d, avail_uva: a, used_uva: u, ..c.clone() };
        assert_eq!(PackedRing::new(&cfg, mem.clone(), None, None).err(), Some(RingFault::RingAddress));
    }
    let cfg = RingConfig { desc_uva: BASE + MEM - 64, ..c.clone() };
    assert_eq!(PackedRing::new(&cfg, mem.clone(), None, None).err(), Some(RingFault::RingAddress));
    let cfg = RingConfig { used_uva: BASE + MEM, ..c };
    assert_eq!(PackedRing::new(&cfg, mem, None, None).err(), Some(RingFault::RingAddress));
}

/// Completes everything available with length 0 in one burst; returns whether it called.
fn complete_all(f: &mut Fixture) -> bool {
    let n = f.ring.poll_avail().unwrap();
    let mut c = Chain::default();
    for i in 0..n {
        let h = f.ring.walk_avail(&f.mem, i, Dir::DeviceReads, &mut c).unwrap();
        f.ring.add_used(h, 0);
    }
    f.ring.consume(n);
    let called = f.ring.publish_used();
    f.drv.take_used();
    called
}

#[test]
fn calls_once_per_burst_as_the_driver_asks() {
    // ENABLE and DISABLE.
    let mut f = fixture(16, 0, true, false);
    for (flags, want) in [
        (packed::EVENT_FLAG_ENABLE, true),
        (packed::EVENT_FLAG_DISABLE, false),
        (packed::EVENT_FLAG_ENABLE, true),
    ] {
        f.drv.set_event(flags, 0);
        for _ in 0..4 {
            f.drv.post(&[64], false, 0);
        }
        assert_eq!(complete_all(&mut f), want);
    }
    assert_eq!(f.call.read().unwrap(), 2);
    // DESC without EVENT_IDX is not the driver's to use: calls as ENABLE.
    f.drv.set_event(packed::EVENT_FLAG_DESC, packed::event_off_wrap(15, true));
    f.drv.post(&[64], false, 0);
    assert!(complete_all(&mut f));

    // DESC with EVENT_IDX: only the burst whose used descriptors pass the offset (with
    // its wrap counter) calls. Ring of 10, 3 descriptors per burst, from 0 (wrap 1).
    let mut f = fixture(10, 0, true, true);
    f.drv.set_event(packed::EVENT_FLAG_DESC, packed::event_off_wrap(4, true));
    let mut called = Vec::new();
    for _ in 0..8 {
        for _ in 0..3 {
            f.drv.post(&[64], false, 0);
        }
        called.push(complete_all(&mut f));
    }
    // Used positions: 0→3, 3→6 (passes 4, lap 1), 6→9, 9→2 (wrap), 2→5 (4 but lap 2:
    // wrap 0, not the one asked for), 5→8, 8→1, 1→4.
    assert_eq!(called, vec![false, true, false, false, false, false, false, false]);
    // Offset 5 of the current lap (wrap counter 1 again since 8→1): 4→7 passes it.
    f.drv.set_event(packed::EVENT_FLAG_DESC, packed::event_off_wrap(5, true));
    for _ in 0..3 {
        f.drv.post(&[64], false, 0);
    }
    assert!(complete_all(&mut f));
    assert_eq!(f.call.read().unwrap(), 2);
}

#[test]
fn kick_suppression_and_rearm() {
    let mut f = fixture(16, 5, false, false);
    assert_eq!(f.drv.device_event_flags(), packed::EVENT_FLAG_DISABLE, "suppressed while polling");
    assert!(!f.ring.set_kicks(true), "nothing new");
    assert_eq!(f.drv.device_event_flags(), packed::EVENT_FLAG_ENABLE);
    f.drv.post(&[64], false, 0);
    assert!(f.ring.set_kicks(true), "a chain arrived: do not sleep");
    // Polled but left (the destination had no room): still work, whatever the poll saw.
    assert_eq!(f.ring.poll_avail(), Ok(1));
    assert!(f.ring.set_kicks(true), "a chain found and not consumed: do not sleep");
    f.ring.set_kicks(false);
    assert_eq!(f.drv.device_event_flags(), packed::EVENT_FLAG_DISABLE);
    complete_all(&mut f);
    assert!(!f.ring.set_kicks(true), "nothing new after the burst");
}

/// The ring base carries the wrap counter in bit 15 both ways.
#[test]
fn ring_base_round_trips_with_the_wrap_counter() {
    let mut f = fixture(5, 3, true, false);
    assert_eq!(f.ring.last_avail(), 0x8003);
    for _ in 0..3 {
        f.drv.post(&[64], false, 0);
    }
    complete_all(&mut f);
    assert_eq!(f.ring.last_avail(), 1, "3 + 3 past 5: offset 1, wrap counter 0");
    let (_, mem) = memories();
    let r = PackedRing::new(&config(5, f.ring.last_avail(), false), mem, None, None).unwrap();
    assert_eq!((r.avail_pos, r.avail_wrap, r.used_pos, r.used_wrap), (1, false, 1, false));
}

/// Work bound: an indirect table with more entries than a port can use is abandoned
/// after `MAX_SEGS + 1` of them (its last entry, outside guest memory, is never read);
/// the chain is truncated, which every port drops.
#[test]
fn a_long_indirect_table_is_abandoned() {
    let long = 100u16;
    let mut f = fixture(128, 0, true, false);
    for i in 0..long {
        let addr = if i + 1 == long { BASE + MEM } else { DATA };
        let e = PackedDescriptor { addr, len: 64, id: 0, flags: 0 };
        f.drv.write_desc(INDIRECT + i as u64 * 16, e, false);
    }
    let flags = packed::avail_flags(true) | DESC_F_INDIRECT;
    raw(&f, 0, PackedDescriptor { addr: INDIRECT, len: 16 * long as u32, id: 3, flags });
    let n = f.ring.poll_avail().unwrap();
    assert_eq!(n, 1);
    let mut c = Chain::default();
    let h = f.ring.walk_avail(&f.mem, 0, Dir::DeviceReads, &mut c).unwrap();
    assert_eq!((h.id(), h.count()), (3, 1));
    assert!(c.truncated);
    assert_eq!(c.segs().len(), crate::split_ring::MAX_SEGS);
    assert_eq!(c.total, 64 * (crate::split_ring::MAX_SEGS as u64 + 1));
}

/// `avail_slots` adds the ring descriptors of the chains the poll found (an indirect
/// chain is one), up to the ring's size.
#[test]
fn avail_slots_counts_ring_descriptors() {
    let mut f = fixture(8, 6, true, false);
    f.drv.post(&[64, 64], false, DESC_F_WRITE);
    f.drv.post(&[64, 64, 64], true, DESC_F_WRITE);
    f.drv.post(&[64, 64, 64], false, DESC_F_WRITE);
    assert_eq!(f.ring.poll_avail().unwrap(), 3);
    assert_eq!((0..=4).map(|n| f.ring.avail_slots(n)).collect::<Vec<_>>(), vec![0, 2, 3, 6, 6]);
    f.drv.post(&[64, 64], false, DESC_F_WRITE);
    assert_eq!(f.ring.poll_more().unwrap(), 4);
    assert_eq!(f.ring.avail_slots(4), 8, "every descriptor posted");
}
