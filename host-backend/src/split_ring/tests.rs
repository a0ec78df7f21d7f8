//! Tests of the device-side split ring: against a model of what the driver wrote, and
//! against `virtio-queue` (rust-vmm's device-side implementation) as an independent
//! oracle, over random chains (direct, chained, indirect, across the ring's and the
//! u16 index's wrap), plus one test per kind of malformed input.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use proptest::prelude::*;
use spec::layout::{self, Descriptor, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::memory::tests::memfd;
use crate::memory::RegionDesc;

const BASE: u64 = 0x10_0000;
const MEM: u64 = 4 << 20;
const DESC: u64 = BASE;
const INDIRECT: u64 = BASE + 0x8_0000;
const DATA: u64 = BASE + 0x10_0000;

/// The driver's side of a test ring: writes through vm-memory's own accessors, so the
/// device under test and the test do not share translation code.
pub(crate) struct TestDriver {
    gm: GuestMemoryMmap,
    size: u16,
    avail_idx: u16,
    free: Vec<u16>,
    next_data: u64,
    next_indirect: u64,
}

impl TestDriver {
    fn avail(&self) -> u64 {
        DESC + layout::desc_table_bytes(self.size) as u64
    }
    fn used(&self) -> u64 {
        (self.avail() + layout::avail_bytes(self.size) as u64 + 3) & !3
    }
    fn write_desc(&self, table: u64, i: u16, d: Descriptor) {
        self.gm.write_slice(&d.to_le_bytes(), GuestAddress(table + i as u64 * 16)).unwrap();
    }
    fn buf(&mut self, len: u32) -> u64 {
        let a = self.next_data;
        self.next_data += (len as u64 + 63) & !63;
        if self.next_data > BASE + MEM - 0x1_0000 {
            self.next_data = DATA;
            return self.buf(len);
        }
        a
    }
    /// Posts one chain; returns its head and the (addr, len) list the device must see.
    pub(crate) fn post(&mut self, lens: &[u32], indirect: bool, flags: u16) -> (u16, Vec<(u64, u32)>) {
        let bufs: Vec<(u64, u32)> = lens.iter().map(|&l| (self.buf(l), l)).collect();
        let head;
        if indirect {
            head = self.free.pop().unwrap();
            let table = self.next_indirect;
            self.next_indirect += 16 * lens.len() as u64;
            if self.next_indirect > DATA - 0x1000 {
                self.next_indirect = INDIRECT;
            }
            for (i, &(a, l)) in bufs.iter().enumerate() {
                let last = i + 1 == bufs.len();
                let f = flags | if last { 0 } else { DESC_F_NEXT };
                self.write_desc(
                    table,
                    i as u16,
                    Descriptor { addr: a, len: l, flags: f, next: i as u16 + 1 },
                );
            }
            let d = Descriptor { addr: table, len: 16 * lens.len() as u32, flags: DESC_F_INDIRECT, next: 0 };
            self.write_desc(DESC, head, d);
        } else {
            let ids: Vec<u16> = (0..lens.len()).map(|_| self.free.pop().unwrap()).collect();
            head = ids[0];
            for (i, &(a, l)) in bufs.iter().enumerate() {
                let next = ids.get(i + 1).copied();
                let f = flags | if next.is_some() { DESC_F_NEXT } else { 0 };
                self.write_desc(
                    DESC,
                    ids[i],
                    Descriptor { addr: a, len: l, flags: f, next: next.unwrap_or(0) },
                );
            }
        }
        let slot = self.avail_idx & (self.size - 1);
        self.gm
            .write_obj(head.to_le(), GuestAddress(self.avail() + layout::avail_entry(slot) as u64))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        (head, bufs)
    }
    pub(crate) fn publish(&self) {
        self.gm.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail() + 2)).unwrap();
    }
    pub(crate) fn used_idx(&self) -> u16 {
        self.gm.read_obj(GuestAddress(self.used() + 2)).unwrap()
    }
    /// Writes `bytes` at guest address `gpa` (a posted buffer's contents).
    pub(crate) fn write(&self, gpa: u64, bytes: &[u8]) {
        self.gm.write_slice(bytes, GuestAddress(gpa)).unwrap();
    }
    /// The buffer address of descriptor `i` (a direct chain's head: its first buffer).
    pub(crate) fn addr_of(&self, i: u16) -> u64 {
        u64::from_le(self.gm.read_obj(GuestAddress(DESC + i as u64 * 16)).unwrap())
    }
    /// Reads `len` bytes at guest address `gpa`.
    pub(crate) fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        self.gm.read_slice(&mut out, GuestAddress(gpa)).unwrap();
        out
    }
    pub(crate) fn used_elem(&self, slot: u16) -> (u32, u32) {
        let a = self.used() + layout::used_entry(slot & (self.size - 1)) as u64;
        (self.gm.read_obj(GuestAddress(a)).unwrap(), self.gm.read_obj(GuestAddress(a + 4)).unwrap())
    }
}

/// A ring and the test driver that posts into it (also for `port::mrg`'s tests).
pub(crate) struct Fixture {
    pub(crate) drv: TestDriver,
    pub(crate) ring: DeviceRing,
    pub(crate) mem: Arc<GuestMemory>,
    call: EventFd,
}

pub(crate) fn fixture(size: u16, base: u16, event_idx: bool) -> Fixture {
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
    let drv = TestDriver {
        gm,
        size,
        avail_idx: base,
        free: (0..size).rev().collect(),
        next_data: DATA,
        next_indirect: INDIRECT,
    };
    drv.publish();
    let call = EventFd::new(EFD_NONBLOCK).unwrap();
    let cfg = RingConfig {
        size,
        desc_uva: DESC,
        avail_uva: drv.avail(),
        used_uva: drv.used(),
        base,
        event_idx,
        indirect: true,
        in_order: false,
    };
    let ring = DeviceRing::new(&cfg, mem.clone(), Some(call.as_raw_fd()), None).unwrap();
    Fixture { drv, ring, mem, call }
}

/// Turns the chain's host pointers back into guest addresses.
fn chain_gpas(f: &Fixture, c: &Chain<'_>) -> Vec<(u64, u32)> {
    let mut hint = 0;
    let (base, _) = f.mem.translate(&mut hint, BASE, 1).unwrap();
    c.segs().iter().map(|s| (BASE + (s.ptr as u64 - base as u64), s.len)).collect()
}

/// One chain as virtio-queue sees it: its head and its descriptors (address, length,
/// device-writable).
type OracleChain = (u16, Vec<(u64, u32, bool)>);

/// What virtio-queue sees for the chains available at `next_avail`.
fn oracle(f: &Fixture, next_avail: u16) -> Vec<OracleChain> {
    let mut q = Queue::new(f.drv.size).unwrap();
    q.set_size(f.drv.size);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(f.drv.avail() as u32), Some(0));
    q.set_used_ring_address(Some(f.drv.used() as u32), Some(0));
    q.set_next_avail(next_avail);
    q.set_ready(true);
    q.iter(&f.drv.gm)
        .unwrap()
        .map(|chain| {
            let head = chain.head_index();
            (head, chain.map(|d| (d.addr().0, d.len(), d.is_write_only())).collect())
        })
        .collect()
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
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Random rounds of chains: every chain our ring walks equals what the driver posted
    /// and what virtio-queue reads; used entries come back in order with the right ids.
    #[test]
    fn walks_match_model_and_virtio_queue(
        base in prop_oneof![Just(0u16), Just(65530u16), any::<u16>()],
        rounds in prop::collection::vec(prop::collection::vec(chain_spec(), 0..6), 1..12),
        writable in any::<bool>(),
    ) {
        let mut f = fixture(16, base, false);
        let flags = if writable { DESC_F_WRITE } else { 0 };
        let dir = if writable { Dir::DeviceWrites } else { Dir::DeviceReads };
        let mut chain = Chain::default();
        let mut expect_used = base;
        for round in rounds {
            let mut posted = Vec::new();
            for spec in round {
                let need = if spec.indirect { 1 } else { spec.lens.len() };
                if f.drv.free.len() < need {
                    break;
                }
                posted.push(f.drv.post(&spec.lens, spec.indirect, flags));
            }
            f.drv.publish();
            let orc = oracle(&f, f.ring.last_avail());
            let n = f.ring.poll_avail().unwrap();
            prop_assert_eq!(n as usize, posted.len());
            prop_assert_eq!(orc.len(), posted.len());
            // The write hint over the whole burst first, as a port does: it must change
            // nothing the walks see (writable or not, indirect or not).
            for i in 0..n {
                f.ring.prefetch_write(i, 4);
            }
            for (i, (head, bufs)) in posted.iter().enumerate() {
                let h = f.ring.head(i as u16).unwrap();
                prop_assert_eq!(h, *head);
                f.ring.walk(&f.mem, 0, h, dir, &mut chain).unwrap();
                prop_assert_eq!(&chain_gpas(&f, &chain), bufs);
                prop_assert_eq!(chain.total, bufs.iter().map(|b| b.1 as u64).sum::<u64>());
                let (oh, odescs) = &orc[i];
                prop_assert_eq!(*oh, *head);
                let from_oracle: Vec<(u64, u32)> = odescs.iter().map(|d| (d.0, d.1)).collect();
                prop_assert_eq!(&from_oracle, bufs);
                prop_assert!(odescs.iter().all(|d| d.2 == writable));
                f.ring.add_used(h, i as u32 * 7);
            }
            f.ring.consume(n);
            f.ring.publish_used();
            for (i, (head, bufs)) in posted.iter().enumerate() {
                prop_assert_eq!(f.drv.used_elem(expect_used), (*head as u32, i as u32 * 7));
                expect_used = expect_used.wrapping_add(1);
                // The driver reclaims the descriptors.
                let _ = bufs;
            }
            prop_assert_eq!(f.drv.used_idx(), expect_used);
            for (head, bufs) in posted {
                // Return descriptors to the free list: the head and, for direct chains,
                // the rest of the chain (read back from the table we wrote).
                let mut idx = head;
                let mut left = bufs.len();
                loop {
                    f.drv.free.push(idx);
                    left -= 1;
                    let d: [u8; 16] = f.drv.gm.read_obj(GuestAddress(DESC + idx as u64 * 16)).unwrap();
                    let d = Descriptor::from_le_bytes(d);
                    if d.flags & DESC_F_INDIRECT != 0 || left == 0 {
                        break;
                    }
                    idx = d.next;
                }
            }
        }
    }
}

fn bad_walk(setup: impl FnOnce(&mut Fixture)) -> Result<(), RingFault> {
    let mut f = fixture(8, 0, false);
    setup(&mut f);
    f.drv.publish();
    let n = f.ring.poll_avail()?;
    assert_eq!(n, 1);
    // The write hint goes over every malformed chain too: it must neither fault nor
    // panic, and the walk still judges the chain.
    f.ring.prefetch_write(0, 64);
    let h = f.ring.head(0)?;
    let mut c = Chain::default();
    f.ring.walk(&f.mem, 0, h, Dir::DeviceReads, &mut c)
}

/// A long burst across the u16 wrap: nothing is visible before the one publish, and
/// then every element is in its slot, in order.
#[test]
fn a_long_burst_publishes_every_element_at_once() {
    let mut f = fixture(256, 65500, false);
    let n = 141;
    let posted: Vec<u16> = (0..n).map(|_| f.drv.post(&[64], false, DESC_F_WRITE).0).collect();
    f.drv.publish();
    assert_eq!(f.ring.poll_avail().unwrap(), n);
    let mut c = Chain::default();
    for i in 0..n {
        let h = f.ring.head(i).unwrap();
        f.ring.walk(&f.mem, 0, h, Dir::DeviceWrites, &mut c).unwrap();
        f.ring.add_used(h, 1000 + i as u32);
    }
    f.ring.consume(n);
    assert_eq!(f.drv.used_idx(), 65500, "nothing is published before publish_used");
    f.ring.publish_used();
    assert_eq!(f.drv.used_idx(), 65500u16.wrapping_add(n));
    for (i, &h) in posted.iter().enumerate() {
        assert_eq!(f.drv.used_elem(65500u16.wrapping_add(i as u16)), (h as u32, 1000 + i as u32));
    }
}

/// A forwarding burst publishes its two rings with one fence: each ring's used index,
/// elements and notification decision come out as from its own `publish_used`.
#[test]
fn a_pair_publish_is_two_publishes() {
    let mut a = fixture(16, 65533, false);
    let mut b = fixture(16, 7, false);
    // `a`'s driver asked for no interrupts, `b`'s did not.
    a.drv.gm.write_obj(layout::AVAIL_F_NO_INTERRUPT, GuestAddress(a.drv.avail())).unwrap();
    let mut c = Chain::default();
    let mut heads: Vec<Vec<u16>> = Vec::new();
    for (f, n) in [(&mut a, 5u16), (&mut b, 3)] {
        let posted: Vec<u16> = (0..n).map(|_| f.drv.post(&[64], false, 0).0).collect();
        f.drv.publish();
        assert_eq!(f.ring.poll_avail().unwrap(), n);
        for i in 0..n {
            let h = f.ring.head(i).unwrap();
            f.ring.walk(&f.mem, 0, h, Dir::DeviceReads, &mut c).unwrap();
            f.ring.add_used(h, 100 + i as u32);
        }
        f.ring.consume(n);
        heads.push(posted);
    }
    assert_eq!((a.drv.used_idx(), b.drv.used_idx()), (65533, 7), "nothing before the publish");
    assert_eq!(crate::ring::publish_used_pair(&mut a.ring, &mut b.ring), (false, true));
    assert_eq!((a.drv.used_idx(), b.drv.used_idx()), (65533u16.wrapping_add(5), 10));
    for (f, base, posted) in [(&a, 65533u16, &heads[0]), (&b, 7, &heads[1])] {
        for (i, &h) in posted.iter().enumerate() {
            assert_eq!(f.drv.used_elem(base.wrapping_add(i as u16)), (h as u32, 100 + i as u32));
        }
    }
    assert!(a.call.read().is_err(), "no call where the driver asked for none");
    assert_eq!(b.call.read().unwrap(), 1);
    // Nothing pending on either ring: no store, no call.
    assert_eq!(crate::ring::publish_used_pair(&mut a.ring, &mut b.ring), (false, false));
    assert_eq!((a.drv.used_idx(), b.drv.used_idx()), (65533u16.wrapping_add(5), 10));
    assert!(b.call.read().is_err());
}

fn raw_avail(f: &mut Fixture, head: u16) {
    let slot = f.drv.avail_idx & (f.drv.size - 1);
    f.drv.gm.write_obj(head, GuestAddress(f.drv.avail() + layout::avail_entry(slot) as u64)).unwrap();
    f.drv.avail_idx = f.drv.avail_idx.wrapping_add(1);
}

#[test]
fn rejects_every_kind_of_malformed_chain() {
    let d = |addr, len, flags, next| Descriptor { addr, len, flags, next };
    // head out of range
    assert_eq!(bad_walk(|f| raw_avail(f, 8)), Err(RingFault::HeadOutOfRange { head: 8 }));
    // next out of range
    assert_eq!(
        bad_walk(|f| {
            f.drv.write_desc(DESC, 0, d(DATA, 64, DESC_F_NEXT, 9));
            raw_avail(f, 0);
        }),
        Err(RingFault::NextOutOfRange { next: 9 })
    );
    // loop 0 -> 1 -> 0
    assert_eq!(
        bad_walk(|f| {
            f.drv.write_desc(DESC, 0, d(DATA, 64, DESC_F_NEXT, 1));
            f.drv.write_desc(DESC, 1, d(DATA, 64, DESC_F_NEXT, 0));
            raw_avail(f, 0);
        }),
        Err(RingFault::ChainTooLong)
    );
    // address outside guest memory, and wrapping
    assert!(matches!(
        bad_walk(|f| {
            f.drv.write_desc(DESC, 0, d(BASE + MEM - 8, 64, 0, 0));
            raw_avail(f, 0);
        }),
        Err(RingFault::BadAddress { .. })
    ));
    assert!(matches!(
        bad_walk(|f| {
            f.drv.write_desc(DESC, 0, d(u64::MAX - 10, 64, 0, 0));
            raw_avail(f, 0);
        }),
        Err(RingFault::BadAddress { .. })
    ));
    assert!(matches!(
        bad_walk(|f| {
            f.drv.write_desc(DESC, 0, d(0x1000, 64, 0, 0));
            raw_avail(f, 0);
        }),
        Err(RingFault::BadAddress { .. })
    ));
    // direction mismatch on a queue the device reads
    assert_eq!(
        bad_walk(|f| {
            f.drv.write_desc(DESC, 0, d(DATA, 64, DESC_F_WRITE, 0));
            raw_avail(f, 0);
        }),
        Err(RingFault::Direction)
    );
    // indirect: bad length, empty, nested, with NEXT, outside memory
    for (len, flags) in [(20, DESC_F_INDIRECT), (0, DESC_F_INDIRECT), (32, DESC_F_INDIRECT | DESC_F_NEXT)] {
        assert!(matches!(
            bad_walk(|f| {
                f.drv.write_desc(DESC, 0, d(INDIRECT, len, flags, 1));
                raw_avail(f, 0);
            }),
            Err(RingFault::BadIndirect { .. })
        ));
    }
    assert!(matches!(
        bad_walk(|f| {
            f.drv.write_desc(INDIRECT, 0, d(INDIRECT + 0x100, 16, DESC_F_INDIRECT, 0));
            f.drv.write_desc(DESC, 0, d(INDIRECT, 16, DESC_F_INDIRECT, 0));
            raw_avail(f, 0);
        }),
        Err(RingFault::BadIndirect { .. })
    ));
    assert!(matches!(
        bad_walk(|f| {
            f.drv.write_desc(DESC, 0, d(BASE + MEM - 16, 32, DESC_F_INDIRECT, 0));
            raw_avail(f, 0);
        }),
        Err(RingFault::IndirectAddress { .. })
    ));
    // an indirect table longer than the ring (8): no loop, but a chain of 9 buffers
    assert_eq!(
        bad_walk(|f| {
            for i in 0..9u16 {
                let flags = if i < 8 { DESC_F_NEXT } else { 0 };
                f.drv.write_desc(INDIRECT, i, d(DATA, 8, flags, i + 1));
            }
            f.drv.write_desc(DESC, 0, d(INDIRECT, 9 * 16, DESC_F_INDIRECT, 0));
            raw_avail(f, 0);
        }),
        Err(RingFault::ChainTooLong)
    );
    // a loop inside an indirect table
    assert_eq!(
        bad_walk(|f| {
            f.drv.write_desc(INDIRECT, 0, d(DATA, 8, DESC_F_NEXT, 1));
            f.drv.write_desc(INDIRECT, 1, d(DATA, 8, DESC_F_NEXT, 0));
            f.drv.write_desc(DESC, 0, d(INDIRECT, 32, DESC_F_INDIRECT, 0));
            raw_avail(f, 0);
        }),
        Err(RingFault::ChainTooLong)
    );
}

#[test]
fn rejects_avail_jump_and_bad_ring_addresses() {
    let mut f = fixture(8, 0, false);
    f.drv.avail_idx = 9;
    f.drv.publish();
    assert_eq!(f.ring.poll_avail(), Err(RingFault::AvailJump { last_avail: 0, avail: 9 }));

    let cfg = |desc, avail, used| RingConfig {
        size: 8,
        desc_uva: desc,
        avail_uva: avail,
        used_uva: used,
        base: 0,
        event_idx: false,
        indirect: false,
        in_order: false,
    };
    let mem = f.mem.clone();
    for c in [
        cfg(DESC + 8, DESC + 0x1000, DESC + 0x2000), // misaligned table
        cfg(DESC, DESC + 0x1001, DESC + 0x2000),     // misaligned avail
        cfg(DESC, DESC + 0x1000, DESC + 0x2002),     // misaligned used
        cfg(BASE + MEM - 64, DESC + 0x1000, DESC + 0x2000), // table past the end
        cfg(0x1000, DESC + 0x1000, DESC + 0x2000),   // outside memory
    ] {
        assert_eq!(DeviceRing::new(&c, mem.clone(), None, None).err(), Some(RingFault::RingAddress));
    }
    let mut c = cfg(DESC, DESC + 0x1000, DESC + 0x2000);
    c.size = 6;
    assert_eq!(
        DeviceRing::new(&c, mem, None, None).err(),
        Some(RingFault::RingAddress),
        "not a power of two"
    );
}

#[test]
fn notifies_once_per_burst_as_the_driver_asks() {
    // Without EVENT_IDX: a call per burst unless VRING_AVAIL_F_NO_INTERRUPT.
    let mut f = fixture(16, 0, false);
    let mut c = Chain::default();
    for round in 0..3 {
        let no_int = round == 1;
        f.drv.gm.write_obj(if no_int { 1u16 } else { 0 }, GuestAddress(f.drv.avail())).unwrap();
        for _ in 0..4 {
            f.drv.post(&[64], false, 0);
        }
        f.drv.publish();
        let n = f.ring.poll_avail().unwrap();
        for i in 0..n {
            let h = f.ring.head(i).unwrap();
            f.ring.walk(&f.mem, 0, h, Dir::DeviceReads, &mut c).unwrap();
            f.ring.add_used(h, 0);
        }
        f.ring.consume(n);
        assert_eq!(f.ring.publish_used(), !no_int);
        f.drv.free.extend(0..16);
        f.drv.free.sort_unstable();
        f.drv.free.dedup();
    }
    assert_eq!(f.call.read().unwrap(), 2);

    // With EVENT_IDX: only when the used index crosses used_event.
    let mut f = fixture(16, 0, true);
    let ue = GuestAddress(f.drv.avail() + layout::used_event(16) as u64);
    f.drv.gm.write_obj(5u16, ue).unwrap();
    let mut calls = 0;
    for _ in 0..4 {
        for _ in 0..2 {
            f.drv.post(&[64], false, 0);
        }
        f.drv.publish();
        let n = f.ring.poll_avail().unwrap();
        for i in 0..n {
            let h = f.ring.head(i).unwrap();
            f.ring.walk(&f.mem, 0, h, Dir::DeviceReads, &mut c).unwrap();
            f.ring.add_used(h, 0);
        }
        f.ring.consume(n);
        calls += f.ring.publish_used() as u32;
        f.drv.free = (0..16).rev().collect();
    }
    // Used idx went 0→2→4→6→8; only the step 4→6 passes used_event 5.
    assert_eq!(calls, 1);
    assert_eq!(f.call.read().unwrap(), 1);
}

#[test]
fn kick_suppression_and_rearm() {
    let mut f = fixture(16, 0, false);
    let flags = GuestAddress(f.drv.used());
    assert_eq!(
        f.drv.gm.read_obj::<u16>(flags).unwrap(),
        layout::USED_F_NO_NOTIFY,
        "suppressed while polling"
    );
    assert!(!f.ring.set_kicks(true), "nothing new");
    assert_eq!(f.drv.gm.read_obj::<u16>(flags).unwrap(), 0);
    f.drv.post(&[64], false, 0);
    f.drv.publish();
    assert!(f.ring.set_kicks(true), "a buffer arrived: do not sleep");
    // Polled but left (the destination had no room): still work, whatever the poll saw.
    assert_eq!(f.ring.poll_avail(), Ok(1));
    assert!(f.ring.set_kicks(true), "a chain found and not consumed: do not sleep");
    let mut c = Chain::default();
    let h = f.ring.walk_avail(&f.mem, 0, Dir::DeviceReads, &mut c).unwrap();
    f.ring.add_used(h, 0);
    f.ring.consume(1);
    f.ring.publish_used();
    assert!(!f.ring.set_kicks(true), "everything consumed: sleep");

    let mut f = fixture(16, 100, true);
    let ev = GuestAddress(f.drv.used() + layout::avail_event(16) as u64);
    assert!(!f.ring.set_kicks(true));
    assert_eq!(f.drv.gm.read_obj::<u16>(ev).unwrap(), 100, "kick me when idx passes 100");
    f.ring.set_kicks(false);
    assert_eq!(f.drv.gm.read_obj::<u16>(ev).unwrap(), 99);
}

#[test]
fn copies_across_segments() {
    let f = fixture(16, 0, false);
    let mut hint = 0;
    let mk = |lens: &[u32], at: u64| {
        let mut c = Chain::default();
        let mut a = at;
        for &l in lens {
            let (p, _) = f.mem.translate(&mut hint.clone(), a, l as u64).unwrap();
            c.push(p, l);
            c.total += l as u64;
            a += l as u64 + 100;
        }
        c
    };
    let src = mk(&[5, 3, 20], DATA);
    let dst = mk(&[1, 7, 7, 30], DATA + 0x1000);
    let data: Vec<u8> = (0..28u8).collect();
    assert_eq!(scatter(&src, 0, &data), 28);
    assert_eq!(copy_chain(&src, 2, &dst, 3, 26), 26);
    let mut out = [0u8; 26];
    assert_eq!(gather(&dst, 3, &mut out), 26);
    assert_eq!(&out[..], &data[2..]);
    let _ = &mut hint;
}

/// A chain over separate heap buffers of the given lengths, and the buffers. The test
/// reads the buffers while the chain exists, so the chain cannot borrow them: its
/// lifetime says `'static`, and the test keeps the buffers (returned with it) alive for as
/// long as it uses the chain.
fn heap_chain(lens: &[u32], fill: u8) -> (Chain<'static>, Vec<Vec<u8>>) {
    let mut bufs: Vec<Vec<u8>> = lens.iter().map(|&l| vec![fill; l as usize]).collect();
    let mut c = Chain::default();
    for b in bufs.iter_mut() {
        c.push(b.as_mut_ptr(), b.len() as u32);
        c.total += b.len() as u64;
    }
    (c, bufs)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// `gather`, `scatter` and `copy_chain` against a flat model, over one piece (their
    /// inline case) and several (the piece-by-piece loop), at every offset and length,
    /// past the end included: the bytes copied and every byte of the destination agree.
    #[test]
    fn chain_copies_match_a_flat_model(
        src_lens in prop::collection::vec(1u32..40, 1..4),
        dst_lens in prop::collection::vec(1u32..40, 1..4),
        src_off in 0usize..130,
        dst_off in 0usize..130,
        len in 0usize..130,
    ) {
        let (src, src_bufs) = heap_chain(&src_lens, 0);
        let src_total = src.total as usize;
        // A pattern in the source, written through `scatter` and checked through the buffers.
        let pattern: Vec<u8> = (0..src_total).map(|i| (i * 7 + 1) as u8).collect();
        prop_assert_eq!(scatter(&src, 0, &pattern), src_total);
        prop_assert_eq!(src_bufs.concat(), pattern.clone());

        let (dst, dst_bufs) = heap_chain(&dst_lens, 0xee);
        let dst_total = dst.total as usize;
        let want = len.min(src_total.saturating_sub(src_off)).min(dst_total.saturating_sub(dst_off));
        let mut model = vec![0xeeu8; dst_total];
        if want > 0 {
            model[dst_off..dst_off + want].copy_from_slice(&pattern[src_off..src_off + want]);
        }
        prop_assert_eq!(copy_chain(&src, src_off, &dst, dst_off, len), want);
        prop_assert_eq!(dst_bufs.concat(), model);

        let mut out = vec![0u8; len];
        let got = gather(&src, src_off, &mut out);
        let avail = len.min(src_total.saturating_sub(src_off));
        prop_assert_eq!(got, avail);
        prop_assert_eq!(&out[..got], &pattern[src_off.min(src_total)..src_off.min(src_total) + got]);

        let bytes: Vec<u8> = (0..len).map(|i| i as u8 ^ 0x5a).collect();
        let put = scatter(&src, src_off, &bytes);
        prop_assert_eq!(put, avail);
        let mut flat = pattern.clone();
        flat[src_off.min(src_total)..src_off.min(src_total) + put].copy_from_slice(&bytes[..put]);
        prop_assert_eq!(src_bufs.concat(), flat);
    }
}

/// A control-queue chain: readable descriptors, then writable ones, direct or indirect;
/// `readable` counts the command bytes. A readable descriptor after a writable one
/// breaks the queue; all-readable and all-writable chains are well formed (the control
/// path then refuses them for lack of an ack byte or of a header).
#[test]
fn control_chains_are_reads_then_writes() {
    let d = |addr, len, flags, next| Descriptor { addr, len, flags, next };
    let walk = |f: &mut Fixture| {
        f.drv.publish();
        assert_eq!(f.ring.poll_avail().unwrap(), 1);
        let h = f.ring.head(0).unwrap();
        let mut c = Chain::default();
        f.ring
            .walk(&f.mem, 0, h, Dir::ReadsThenWrites, &mut c)
            .map(|()| (c.readable, c.total, c.segs().len()))
    };
    let mut f = fixture(8, 0, false);
    f.drv.write_desc(DESC, 0, d(DATA, 2, DESC_F_NEXT, 1));
    f.drv.write_desc(DESC, 1, d(DATA + 64, 6, DESC_F_NEXT, 2));
    f.drv.write_desc(DESC, 2, d(DATA + 128, 1, DESC_F_WRITE, 0));
    raw_avail(&mut f, 0);
    assert_eq!(walk(&mut f), Ok((8, 9, 3)));

    let mut f = fixture(8, 0, false);
    f.drv.write_desc(INDIRECT, 0, d(DATA, 3, DESC_F_NEXT, 1));
    f.drv.write_desc(INDIRECT, 1, d(DATA + 64, 1, DESC_F_WRITE, 0));
    f.drv.write_desc(DESC, 0, d(INDIRECT, 32, DESC_F_INDIRECT, 0));
    raw_avail(&mut f, 0);
    assert_eq!(walk(&mut f), Ok((3, 4, 2)));

    for flags in [0, DESC_F_WRITE] {
        let mut f = fixture(8, 0, false);
        f.drv.write_desc(DESC, 0, d(DATA, 4, flags, 0));
        raw_avail(&mut f, 0);
        let readable = if flags == 0 { 4 } else { 0 };
        assert_eq!(walk(&mut f), Ok((readable, 4, 1)));
    }

    let mut f = fixture(8, 0, false);
    f.drv.write_desc(DESC, 0, d(DATA, 2, DESC_F_NEXT, 1));
    f.drv.write_desc(DESC, 1, d(DATA + 64, 1, DESC_F_WRITE | DESC_F_NEXT, 2));
    f.drv.write_desc(DESC, 2, d(DATA + 128, 6, 0, 0));
    raw_avail(&mut f, 0);
    assert_eq!(walk(&mut f), Err(RingFault::Direction));
}

/// Work bounds: a chain with more pieces than a port can use is abandoned after
/// `MAX_SEGS + 1` of them (a bad address further on is never read), through links and
/// in an indirect table; a head made available again while its chain is still
/// unconsumed breaks the queue, and is fine again once the first one is consumed.
#[test]
fn long_chains_are_abandoned_and_duplicate_heads_refused() {
    let d = |addr, len, flags, next| Descriptor { addr, len, flags, next };
    let mut f = fixture(256, 0, false);
    let long = 100u16;
    // 0 -> 1 -> ... -> 99, the last one outside guest memory.
    for i in 0..long {
        let (addr, flags) = if i + 1 == long { (BASE + MEM, 0) } else { (DATA, DESC_F_NEXT) };
        f.drv.write_desc(DESC, i, d(addr, 64, flags, i + 1));
    }
    // The same in an indirect table at head 200.
    for i in 0..long {
        let (addr, flags) = if i + 1 == long { (BASE + MEM, 0) } else { (DATA, DESC_F_NEXT) };
        f.drv.write_desc(INDIRECT, i, d(addr, 64, flags, i + 1));
    }
    f.drv.write_desc(DESC, 200, d(INDIRECT, 16 * long as u32, DESC_F_INDIRECT, 0));
    for head in [0, 200, 0] {
        raw_avail(&mut f, head);
    }
    f.drv.publish();
    assert_eq!(f.ring.poll_avail().unwrap(), 3);
    let mut c = Chain::default();
    for i in 0..2 {
        f.ring.walk_avail(&f.mem, i, Dir::DeviceReads, &mut c).unwrap();
        assert!(c.truncated, "entry {i}");
        assert_eq!(c.segs().len(), MAX_SEGS, "entry {i}");
        assert_eq!(c.total, 64 * (MAX_SEGS as u64 + 1), "entry {i}: walked one piece past what fits");
    }
    assert_eq!(
        f.ring.walk_avail(&f.mem, 2, Dir::DeviceReads, &mut c).map(|_| ()),
        Err(RingFault::HeadInFlight { head: 0 })
    );
    // Walking the same entry again (a frame that waited) is no duplicate.
    assert!(f.ring.walk_avail(&f.mem, 0, Dir::DeviceReads, &mut c).is_ok());
    f.ring.consume(1);
    // Head 0's first entry is consumed: its second one (now entry 1) is fine.
    assert!(f.ring.walk_avail(&f.mem, 1, Dir::DeviceReads, &mut c).is_ok());
}

/// `avail_slots` counts the main-table descriptors of the available chains: a chain of
/// three is three, an indirect one is one; it stops at the ring's size.
#[test]
fn avail_slots_counts_ring_descriptors() {
    let mut f = fixture(16, 65534, false);
    f.drv.post(&[64], false, DESC_F_WRITE);
    f.drv.post(&[64, 64, 64], false, DESC_F_WRITE);
    f.drv.post(&[64, 64, 64, 64], true, DESC_F_WRITE);
    f.drv.publish();
    assert_eq!(f.ring.poll_avail().unwrap(), 3);
    assert_eq!((0..=3).map(|n| f.ring.avail_slots(n)).collect::<Vec<_>>(), vec![0, 1, 4, 5]);
    for _ in 0..5 {
        f.drv.post(&[64, 64], false, DESC_F_WRITE);
    }
    f.drv.publish();
    assert_eq!(f.ring.poll_avail().unwrap(), 8);
    assert_eq!(f.ring.avail_slots(7), 13);
    assert_eq!(f.ring.avail_slots(8), 15);
    f.drv.post(&[64], false, DESC_F_WRITE);
    f.drv.publish();
    assert_eq!(f.ring.poll_avail().unwrap(), 9);
    assert_eq!(f.ring.avail_slots(9), 16, "every descriptor posted");
}
