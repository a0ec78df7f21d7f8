//! Frames handed from one worker to another through batched pointer rings
//! (`--handoff`): the two halves of a cross-connect on different cores.
//!
//! Without `--handoff`, one path copies a frame straight from device A's transmit ring
//! into device B's receive ring, so both rings of a direction belong to one worker. With
//! it, each device's rings belong to the worker of that device (as each vhost port has
//! its own core in DPDK's testpmd): A's worker copies what A transmits into a host frame
//! buffer and produces its token on an [`ptr_ring`](crate::ptr_ring) to B's worker,
//! which copies the frame into B's receive buffers and returns the token on a second
//! ring. Both rings are single-producer single-consumer, touched once per burst.
//!
//! Owns: the frame store of one direction (fixed buffers allocated at start, never
//! again), the rings, and the per-burst logic of the sending half ([`Sender::run`],
//! device A's transmit queue) and the receiving half ([`Receiver::run`], device B's
//! receive queue). Must not: block, allocate per burst, or lose a frame silently: a frame
//! the sender took from the guest is delivered or counted as a drop (receive filter,
//! receive buffer too small, peer down), and a full ring or an empty receive queue holds
//! frames back (backpressure up to the guest's transmit ring), as a direct path does.
//! Checking, planning and carrying out offload requests is `port::offload`'s, not this
//! module's: it only moves the frames and their headers between the two.
//!
//! A token is `buffer index << 18 | header flag << 17 | frame length`, plus one (never
//! zero). A buffer is owned by exactly one side at a time: the sender's free lists, its
//! not-yet-produced batch, the ring, the receiver's pending batch, the return rings. The
//! ring's release store and acquire load of a token order the bytes written before it.
//!
//! **Host offloads.** When the sending device offers host offloads (`channel` is given
//! the pair to count them on), a frame whose driver negotiated them and whose header asks
//! for a checksum or segmentation is checked on the sending side ([`offload::check`]:
//! against the sender's features and the frame, counted there as a request or as a drop
//! with its reason, exactly as a direct path does) and handed over with its virtio-net
//! header in front of it (the token's header flag). The receiving side plans and delivers
//! it ([`offload::Delivery`]): whole with its header to a receive queue whose driver
//! negotiated the matching `GUEST_*` offload, else with its checksum completed or cut
//! into segments in software, the choice counted on the sending pair. The plan is made
//! there because only the receiving worker knows the receive queue's configuration at
//! delivery (its `RxConfig`, taken with the ring; `GUEST_OFFLOADS_SET` changes it) and
//! whether its buffers take the frame, which is when a direct path decides too; the
//! sending side would have to guess.
//!
//! Buffer sizes: a frame buffer holds the largest frame plus a header, so a checksum
//! request and a small super-frame travel in one. A larger super-frame (up to
//! [`MAX_SUPER_FRAME`]) takes one of [`BIG_FRAMES`] big buffers, allocated with the
//! direction only when its sending device offers host offloads, and returned on a ring
//! of their own (the plain frames' return path stays as it was). While every big buffer
//! is in flight, a super-frame waits in the guest's transmit ring with the frames behind
//! it, as behind a full ring. Segmenting on the sending side instead would lose whole
//! delivery to a receiver that takes super-frames (the point of `GUEST_TSO*`), and the
//! sender cannot know whether it does (above).
//!
//! The cost for frames without requests: a sender whose driver negotiated no host
//! offload runs the burst compiled without any of this (a const generic, as the direct
//! forwarding burst, chosen once per burst); the receiver runs its variant that looks
//! at each token's header flag only once the store's `headers` flag says a token with a
//! header was ever produced (set before the first one, never cleared).

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use spec::layout::{NET_HDR_LEN, NET_HDR_NUM_BUFFERS};
use spec::offload::NetHdr;

use crate::ctrl::RxConfig;
use crate::device::Device;
use crate::memory::GuestMemory;
use crate::port::mrg::{self, FrameSrc, Placed};
use crate::port::offload::{self, Delivery, MAX_SUPER_FRAME};
use crate::port::{PortPath, Took};
use crate::ptr_ring::{Consumer, Producer, PtrRing};
use crate::ring::Ring;
use crate::split_ring::{gather, scatter, Chain, ChainBuf, Dir, RingFault};
use crate::stats::{BurstCounts, DropReason, OffloadCounts, OFFLOAD_EVENTS};

/// Frame buffers per direction (also the capacity of both rings, so returns always fit).
pub const FRAMES: usize = 1024;
/// Big buffers (a super-frame each) per direction whose sending device offers host
/// offloads: the super-frames that may be between the two workers at once.
pub const BIG_FRAMES: usize = 16;
/// Bytes of a receive filter's look at a frame (destination MAC up to the VLAN id).
const FILTER_BYTES: usize = 16;

/// Bits of a token's frame length (a super-frame's included).
const LEN_BITS: u32 = 17;
const LEN_MASK: usize = (1 << LEN_BITS) - 1;
/// A token's header flag: its buffer holds the frame's virtio-net header, then the frame.
const WITH_HDR: usize = 1 << LEN_BITS;
/// Where a token's buffer index starts.
const IDX_SHIFT: u32 = LEN_BITS + 1;
const _: () = assert!(MAX_SUPER_FRAME <= LEN_MASK);

/// The buffers of one direction: `FRAMES` frame buffers of `slot` bytes, then `big`
/// buffers of `big_slot` bytes (indices `FRAMES ..`).
struct FrameStore {
    base: *mut u8,
    slot: usize,
    big_base: *mut u8,
    big_slot: usize,
    big: usize,
    /// Set by the sender before it produces its first token with a header, never
    /// cleared. Relaxed on both sides: the sender's store is sequenced before that
    /// token's release into the ring, and the receiver loads it after its acquiring
    /// consume, so a receiver holding such a token sees it set.
    headers: AtomicBool,
    _mem: Box<[u8]>,
    _big: Box<[u8]>,
}

// SAFETY: the store only hands out slices of a buffer to the side that owns that
// buffer's token (see the module comment); ownership moves between threads through the
// rings, whose release/acquire pairs order the bytes. The store itself is never resized,
// and its one shared write is the atomic `headers`.
unsafe impl Send for FrameStore {}
// SAFETY: as above: concurrent users touch disjoint buffers.
unsafe impl Sync for FrameStore {}

impl FrameStore {
    fn new(slot: usize, big: usize) -> FrameStore {
        let mut mem = vec![0u8; slot * FRAMES].into_boxed_slice();
        let big_slot = (NET_HDR_LEN + MAX_SUPER_FRAME).next_multiple_of(64);
        let mut big_mem = vec![0u8; big_slot * big].into_boxed_slice();
        FrameStore {
            base: mem.as_mut_ptr(),
            slot,
            big_base: big_mem.as_mut_ptr(),
            big_slot,
            big,
            headers: AtomicBool::new(false),
            _mem: mem,
            _big: big_mem,
        }
    }

    /// The frame buffer `idx`.
    ///
    /// # Safety
    /// The caller owns `idx`'s token, and `idx < FRAMES`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slot(&self, idx: usize) -> &mut [u8] {
        // SAFETY: `idx < FRAMES` keeps the slot inside `_mem`; the token's owner is the
        // only one touching it (caller's contract).
        unsafe { std::slice::from_raw_parts_mut(self.base.add(idx * self.slot), self.slot) }
    }

    /// Buffer `idx`, a frame buffer or a big one (empty for an index past both).
    ///
    /// # Safety
    /// The caller owns `idx`'s token.
    #[allow(clippy::mut_from_ref)]
    unsafe fn buffer(&self, idx: usize) -> &mut [u8] {
        if idx < FRAMES {
            // SAFETY: `idx < FRAMES`, and the caller owns it.
            return unsafe { self.slot(idx) };
        }
        match idx - FRAMES {
            // SAFETY: `k < big` keeps the buffer inside `_big`; the token's owner is the
            // only one touching it (caller's contract).
            k if k < self.big => unsafe {
                std::slice::from_raw_parts_mut(self.big_base.add(k * self.big_slot), self.big_slot)
            },
            _ => &mut [],
        }
    }
}

fn token(idx: usize, len: usize) -> NonZeroUsize {
    NonZeroUsize::new(((idx << IDX_SHIFT) | len) + 1).expect("non-zero by construction")
}

/// A token whose buffer holds the frame's header, then the frame.
fn token_hdr(idx: usize, len: usize) -> NonZeroUsize {
    token(idx, WITH_HDR | (len & LEN_MASK))
}

fn untoken(t: NonZeroUsize) -> (usize, usize) {
    let v = t.get() - 1;
    (v >> IDX_SHIFT, v & LEN_MASK)
}

fn has_hdr(t: NonZeroUsize) -> bool {
    (t.get() - 1) & WITH_HDR != 0
}

/// Runs `f` in a function of its own: a burst's variant that looks at offload requests
/// is compiled there, so that the variant without them stays as it was (the code a frame
/// never runs still costs a loop registers).
#[inline(never)]
fn out_of_line<T>(f: impl FnOnce() -> T) -> T {
    f()
}

/// The sending device's queue pair, on which a direction's offload events are counted
/// (a direct path counts them on its sending pair too).
#[derive(Clone)]
pub struct OffloadStats {
    /// The sending device.
    pub dev: Arc<Device>,
    /// Its queue pair.
    pub pair: usize,
    /// Events of this burst not added yet: both workers add to that pair's counters, so
    /// each does so once per burst, not per frame (the line would bounce between them).
    counts: OffloadCounts,
}

impl OffloadStats {
    /// Counts offload events on `dev`'s queue pair `pair`.
    pub fn new(dev: Arc<Device>, pair: usize) -> OffloadStats {
        OffloadStats { dev, pair, counts: OffloadCounts::default() }
    }

    /// Adds the burst's events to the pair's counters.
    fn flush(&mut self) {
        if self.counts.0 != [0; OFFLOAD_EVENTS] {
            if let Some(s) = self.dev.stats.get(self.pair) {
                s.flush_offloads(&self.counts);
            }
            self.counts = OffloadCounts::default();
        }
    }
}

/// What one sending burst works on: device A's transmit ring, the guest memory its
/// buffers are in, room to walk a chain into, at most `burst` chains, frames of at most
/// `max_frame` bytes, offload requests checked against the driver's `features`.
pub struct TxSide<'a, R> {
    /// The transmit ring.
    pub ring: &'a mut R,
    /// Its guest memory.
    pub mem: &'a GuestMemory,
    /// Room for a walked chain.
    pub buf: &'a mut ChainBuf,
    /// Most chains taken.
    pub burst: u16,
    /// Largest frame without a GSO request.
    pub max_frame: u64,
    /// The driver's negotiated features.
    pub features: u64,
}

/// The sending half: device A's transmit queue into the ring.
pub struct Sender {
    store: Arc<FrameStore>,
    full: Producer<NonZeroUsize>,
    free: Consumer<NonZeroUsize>,
    /// Buffer indices this side owns and may fill.
    idle: Vec<usize>,
    /// Filled buffers not yet produced (the ring was full).
    out: Vec<NonZeroUsize>,
    scratch: Vec<NonZeroUsize>,
    /// Host offloads: present when the sending device offers them.
    offload: Option<Box<TxOffload>>,
}

/// The sending half's part of host offloads.
struct TxOffload {
    /// Big buffer indices this side owns.
    idle: Vec<usize>,
    /// Big buffers given back by the receiver.
    free: Consumer<NonZeroUsize>,
    scratch: Vec<NonZeroUsize>,
    stats: OffloadStats,
}

/// The receiving half: the ring into device B's receive queue.
pub struct Receiver {
    store: Arc<FrameStore>,
    full: Consumer<NonZeroUsize>,
    free: Producer<NonZeroUsize>,
    /// Frames taken from the ring, oldest first, not yet delivered.
    pending: Vec<NonZeroUsize>,
    /// Buffers to give back.
    done: Vec<NonZeroUsize>,
    /// Host offloads: present when the sending device offers them.
    offload: Option<Box<RxOffload>>,
}

/// The receiving half's part of host offloads.
struct RxOffload {
    /// The frame at the head of `pending`, once planned: what is left of it to deliver.
    out: Delivery,
    /// Room for one segment.
    seg: Box<[u8]>,
    /// Big buffers back to the sender.
    free: Producer<NonZeroUsize>,
    done: Vec<NonZeroUsize>,
    stats: OffloadStats,
}

/// One direction: frames of at most `max_frame` bytes; with `offloads` (the sending
/// device offers host offloads, counted on that pair), frames with offload requests and
/// super-frames too (see the module comment).
pub fn channel(max_frame: usize, offloads: Option<OffloadStats>) -> (Sender, Receiver) {
    let big = if offloads.is_some() { BIG_FRAMES } else { 0 };
    let store = Arc::new(FrameStore::new((max_frame + NET_HDR_LEN).next_multiple_of(64), big));
    let (full_p, full_c) = PtrRing::new(FRAMES).expect("FRAMES is a valid capacity").split();
    let (free_p, free_c) = PtrRing::new(FRAMES).expect("FRAMES is a valid capacity").split();
    let (tx_off, rx_off) = match offloads {
        Some(stats) => {
            let (p, c) = PtrRing::new(BIG_FRAMES).expect("BIG_FRAMES is a valid capacity").split();
            let tx = TxOffload {
                idle: (FRAMES..FRAMES + BIG_FRAMES).rev().collect(),
                free: c,
                scratch: Vec::with_capacity(BIG_FRAMES),
                stats: stats.clone(),
            };
            let rx = RxOffload {
                out: Delivery::default(),
                seg: vec![0u8; max_frame].into_boxed_slice(),
                free: p,
                done: Vec::with_capacity(BIG_FRAMES),
                stats,
            };
            (Some(Box::new(tx)), Some(Box::new(rx)))
        }
        None => (None, None),
    };
    let sender = Sender {
        store: store.clone(),
        full: full_p,
        free: free_c,
        idle: (0..FRAMES).rev().collect(),
        out: Vec::with_capacity(FRAMES + big),
        scratch: Vec::with_capacity(FRAMES),
        offload: tx_off,
    };
    let receiver = Receiver {
        store,
        full: full_c,
        free: free_p,
        pending: Vec::with_capacity(FRAMES),
        done: Vec::with_capacity(FRAMES),
        offload: rx_off,
    };
    (sender, receiver)
}

impl Sender {
    /// Takes back returned buffers and produces frames held back earlier (also while
    /// device A's ring does not run, so its frames still reach B).
    pub fn flush(&mut self) {
        self.scratch.clear();
        self.free.consume_batch(&mut self.scratch, FRAMES);
        self.idle.extend(self.scratch.drain(..).map(|t| untoken(t).0));
        if !self.out.is_empty() {
            self.full.produce_batch(&mut self.out);
        }
    }

    /// One burst from device A's transmit queue (`tx`): frames are copied out, their
    /// chains completed, their tokens produced. Counts go to `c` (receive side of A).
    /// Returns the chains completed, or the bad value.
    pub fn run<R: Ring>(&mut self, tx: TxSide<'_, R>, c: &mut BurstCounts) -> Result<usize, RingFault> {
        self.flush();
        if !self.out.is_empty() {
            return Ok(0); // the ring is full: the guest's frames wait in its ring
        }
        if self.offload.is_some() && tx.features & offload::HOST_OFFLOADS != 0 {
            out_of_line(|| self.burst::<R, true>(tx, c))
        } else {
            self.burst::<R, false>(tx, c)
        }
    }

    /// The burst itself; `OFFLOAD`: look at each frame's offload request.
    #[inline(always)]
    fn burst<R: Ring, const OFFLOAD: bool>(
        &mut self,
        tx: TxSide<'_, R>,
        c: &mut BurstCounts,
    ) -> Result<usize, RingFault> {
        let TxSide { ring, mem, buf, burst, max_frame, features } = tx;
        let mut off = if OFFLOAD { self.offload.as_deref_mut() } else { None };
        if let Some(o) = off.as_deref_mut() {
            o.reclaim();
        }
        let n = ring.poll_avail()?.min(burst).min(self.idle.len() as u16);
        let (idle, store, out) = (&mut self.idle, &*self.store, &mut self.out);
        let res = PortPath::consume_tx(ring, mem, buf, n, c, |chain| {
            if let Some(o) = off.as_deref_mut().filter(|_| offload::requested(chain)) {
                // Checksum or segmentation asked for: out of line.
                return o.hand(chain, idle, store, out, features, max_frame);
            }
            PortPath::take_frame(chain, max_frame, |chain, len| {
                let idx = idle.pop().expect("n <= idle");
                // SAFETY: `idx` came from `idle`: this side owns it.
                let slot = unsafe { store.slot(idx) };
                gather(chain, NET_HDR_LEN, &mut slot[..len as usize]);
                out.push(token(idx, len as usize));
            })
        });
        if let Some(o) = off {
            o.stats.flush();
        }
        self.full.produce_batch(&mut self.out);
        res
    }
}

impl TxOffload {
    /// Takes back the big buffers the receiver returned.
    fn reclaim(&mut self) {
        self.scratch.clear();
        self.free.consume_batch(&mut self.scratch, BIG_FRAMES);
        self.idle.extend(self.scratch.drain(..).map(|t| untoken(t).0));
    }

    /// A transmitted chain whose header asks for an offload: checked against the
    /// driver's `features` and the frame ([`offload::check`]) into a frame buffer from
    /// `idle` (or a big one, for a super-frame that needs it), its header in front, and
    /// its token added to `out`. Left in the ring while no big buffer is free.
    #[cold]
    #[inline(never)]
    fn hand(
        &mut self,
        chain: &Chain<'_>,
        idle: &mut Vec<usize>,
        store: &FrameStore,
        out: &mut Vec<NonZeroUsize>,
        features: u64,
        max_frame: u64,
    ) -> Took {
        let big = chain.total > store.slot as u64;
        let idx = if big {
            match self.idle.pop() {
                Some(i) => i,
                None => return Took::Left,
            }
        } else {
            idle.pop().expect("the burst takes no more chains than idle frame buffers")
        };
        // SAFETY: `idx` came from one of this side's idle lists: this side owns it.
        let (hdr_room, frame_room) = unsafe { store.buffer(idx) }.split_at_mut(NET_HDR_LEN);
        match offload::check(chain, features, max_frame, false, frame_room) {
            Ok((len, hdr)) => {
                hdr_room.copy_from_slice(&hdr.to_bytes());
                if !store.headers.load(Ordering::Relaxed) {
                    // Relaxed: see `FrameStore::headers`.
                    store.headers.store(true, Ordering::Relaxed);
                }
                out.push(token_hdr(idx, len));
                self.stats.counts.add(offload::request_event(&hdr), 1);
                Took::Frame(len as u64)
            }
            Err(why) => {
                if big {
                    self.idle.push(idx);
                } else {
                    idle.push(idx);
                }
                Took::Dropped(why)
            }
        }
    }
}

impl Receiver {
    /// Whether frames are waiting (in the ring or taken from it).
    #[cfg(test)]
    pub fn has_work(&self) -> bool {
        !self.pending.is_empty() || !self.full.is_empty()
    }

    /// One burst into `ring` (device B's receive queue with its memory, `None` if it
    /// does not run; chains walked into `buf`, and a frame's further chains with
    /// mergeable receive buffers into `more`): up to `burst` frames delivered, filtered
    /// by `rx`, or dropped as `PeerDown` when the ring does not run. Counts go to `c`
    /// (transmit side of B).
    pub fn run<R: Ring>(
        &mut self,
        ring: Option<(&mut R, &GuestMemory, &RxConfig)>,
        buf: &mut ChainBuf,
        more: &mut ChainBuf,
        burst: usize,
        c: &mut BurstCounts,
    ) -> Result<usize, RingFault> {
        if self.pending.len() < burst {
            let want = burst - self.pending.len();
            self.full.consume_batch(&mut self.pending, want);
        }
        if self.pending.is_empty() {
            return Ok(0);
        }
        // After the consume (see `FrameStore::headers`).
        if self.offload.is_some() && self.store.headers.load(Ordering::Relaxed) {
            out_of_line(|| self.deliver::<R, true>(ring, buf, more, c))
        } else {
            self.deliver::<R, false>(ring, buf, more, c)
        }
    }

    /// The pending frames into the ring; `OFFLOAD`: look at each token's header flag.
    #[inline(always)]
    fn deliver<R: Ring, const OFFLOAD: bool>(
        &mut self,
        ring: Option<(&mut R, &GuestMemory, &RxConfig)>,
        buf: &mut ChainBuf,
        more: &mut ChainBuf,
        c: &mut BurstCounts,
    ) -> Result<usize, RingFault> {
        let Some((ring, mem, rx)) = ring else {
            self.peer_down(c);
            return Ok(0);
        };
        let filter = (!rx.pass_all()).then_some(rx);
        let mut nrx = ring.poll_avail()?;
        let chain = buf.chain(mem);
        let (mut used, mut taken) = (0u16, 0usize);
        let mut failed = None;
        for &t in &self.pending {
            if OFFLOAD && has_hdr(t) {
                // A frame with its offload request: out of line.
                // (The variant runs only with an offload part.)
                let Some(o) = self.offload.as_deref_mut() else { break };
                let res = o.take(
                    &self.store,
                    t,
                    &mut self.done,
                    &mut *ring,
                    mem,
                    rx,
                    &mut nrx,
                    &mut used,
                    chain,
                    more,
                    c,
                );
                match res {
                    Ok(true) => {
                        taken += 1;
                        continue;
                    }
                    Ok(false) => break, // the rest waits for receive buffers
                    Err(b) => {
                        failed = Some(b);
                        break;
                    }
                }
            }
            let (idx, len) = untoken(t);
            // SAFETY: the token was consumed from the ring: this side owns `idx`.
            let frame = &unsafe { self.store.slot(idx) }[..len];
            if let Some(rx) = filter {
                if !rx.accepts(&frame[..FILTER_BYTES.min(len)]) {
                    c.drop(DropReason::Filtered);
                    self.done.push(t);
                    taken += 1;
                    continue;
                }
            }
            if used == nrx {
                break; // backpressure: the frame waits for a receive buffer
            }
            let head = match ring.walk_avail(mem, used, Dir::DeviceWrites, chain) {
                Ok(h) => h,
                Err(b) => {
                    failed = Some(b);
                    break;
                }
            };
            let need = (NET_HDR_LEN + len) as u64;
            let capacity = mrg::capacity(chain);
            if capacity < need {
                // Over several receive chains with mergeable receive buffers; else, as a
                // direct path does: the frame is dropped, the buffer stays.
                let placed = if rx.mrg_rxbuf && capacity >= (NET_HDR_LEN + 14) as u64 {
                    let src = FrameSrc::Bytes(frame);
                    match mrg::scatter(
                        &mut *ring,
                        mem,
                        &mut nrx,
                        used,
                        chain,
                        head,
                        more,
                        [0; NET_HDR_LEN],
                        src,
                        len,
                    ) {
                        Ok(p) => p,
                        Err(b) => {
                            failed = Some(b);
                            break;
                        }
                    }
                } else {
                    Placed::NoFit
                };
                match placed {
                    Placed::Done(k) => {
                        used += k;
                        c.tx_packets += 1;
                        c.tx_bytes += len as u64;
                        taken += 1;
                        self.done.push(t);
                        continue;
                    }
                    Placed::Wait => break,
                    Placed::NoFit => {
                        taken += 1;
                        self.done.push(t);
                        c.drop(DropReason::RxBufferTooSmall);
                        break;
                    }
                    Placed::RingTooSmall => {
                        taken += 1;
                        self.done.push(t);
                        c.drop(DropReason::RxRingTooSmall);
                        break;
                    }
                }
            }
            taken += 1;
            self.done.push(t);
            let mut hdr = [0u8; NET_HDR_LEN];
            hdr[NET_HDR_NUM_BUFFERS..NET_HDR_NUM_BUFFERS + 2].copy_from_slice(&1u16.to_le_bytes());
            scatter(chain, 0, &hdr);
            scatter(chain, NET_HDR_LEN, frame);
            ring.add_used(head, need as u32);
            used += 1;
            c.tx_packets += 1;
            c.tx_bytes += len as u64;
        }
        ring.consume(used);
        ring.publish_used();
        self.pending.drain(..taken);
        self.free.produce_batch(&mut self.done);
        if let Some(o) = self.offload.as_deref_mut().filter(|_| OFFLOAD) {
            o.free.produce_batch(&mut o.done);
            o.stats.flush();
        }
        match failed {
            Some(b) => Err(b),
            None => Ok(taken),
        }
    }
    /// No receive ring: every pending frame is dropped as `PeerDown` (a frame partly
    /// delivered counts the segments it had left) and its buffer given back.
    #[cold]
    #[inline(never)]
    fn peer_down(&mut self, c: &mut BurstCounts) {
        if let Some(o) = self.offload.as_deref_mut() {
            // The head frame's own drop is counted below.
            c.drops[DropReason::PeerDown as usize] += o.out.discard().saturating_sub(1);
        }
        for t in self.pending.drain(..) {
            c.drop(DropReason::PeerDown);
            match self.offload.as_deref_mut() {
                Some(o) => o.give_back(t, &mut self.done),
                None => self.done.push(t),
            }
        }
        self.free.produce_batch(&mut self.done);
        if let Some(o) = self.offload.as_deref_mut() {
            o.free.produce_batch(&mut o.done);
        }
    }
}

impl RxOffload {
    /// Token `t` back to the sender: into `done` (a frame buffer) or this side's own
    /// list (a big one).
    fn give_back(&mut self, t: NonZeroUsize, done: &mut Vec<NonZeroUsize>) {
        if untoken(t).0 >= FRAMES {
            self.done.push(t);
        } else {
            done.push(t);
        }
    }

    /// The pending frame `t`, handed over with its offload request: filtered (once),
    /// planned for the receive queue `rx` (once; counted on the sending pair) and
    /// delivered into `ring` as far as its buffers go (from chain `*used`, `nrx` known
    /// available; `chain` and `more` the path's chain rooms), counting into `c`. Returns
    /// whether the frame is done with (its buffer given back into `done` or this side's
    /// list) or some of it waits for receive buffers, or the receive ring's fault.
    #[cold]
    #[inline(never)]
    #[allow(clippy::too_many_arguments, reason = "the burst's receive side, borrowed piece by piece")]
    fn take<'m, R: Ring>(
        &mut self,
        store: &FrameStore,
        t: NonZeroUsize,
        done: &mut Vec<NonZeroUsize>,
        ring: &mut R,
        mem: &'m GuestMemory,
        rx: &RxConfig,
        nrx: &mut u16,
        used: &mut u16,
        chain: &mut Chain<'m>,
        more: &mut ChainBuf,
        c: &mut BurstCounts,
    ) -> Result<bool, RingFault> {
        let (idx, len) = untoken(t);
        // SAFETY: the token was consumed from the ring (and kept in `pending` since):
        // this side owns `idx`.
        let buf = unsafe { store.buffer(idx) };
        let (hdr, frame) = buf.split_at_mut(NET_HDR_LEN.min(buf.len()));
        let len = len.min(frame.len());
        let frame = &mut frame[..len];
        if !self.out.pending() {
            if !rx.pass_all() && !rx.accepts(&frame[..FILTER_BYTES.min(frame.len())]) {
                c.drop(DropReason::Filtered);
                self.give_back(t, done);
                return Ok(true);
            }
            let mut h = [0u8; NET_HDR_LEN];
            let n = hdr.len().min(NET_HDR_LEN);
            h[..n].copy_from_slice(&hdr[..n]);
            self.out.plan(NetHdr::from_bytes(h), frame, rx, &mut self.stats.counts);
        }
        self.out.drain(frame, &mut self.seg, ring, mem, nrx, used, chain, more, rx.mrg_rxbuf, c)?;
        if self.out.pending() {
            return Ok(false);
        }
        self.give_back(t, done);
        Ok(true)
    }
}

#[cfg(test)]
mod tests;
