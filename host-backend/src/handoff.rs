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
//! again), the two rings, and the per-burst logic of the sending half ([`Sender::run`],
//! device A's transmit queue) and the receiving half ([`Receiver::run`], device B's
//! receive queue). Must not: block, allocate per burst, or lose a frame silently: a frame
//! the sender took from the guest is delivered or counted as a drop (receive filter,
//! receive buffer too small, peer down), and a full ring or an empty receive queue holds
//! frames back (backpressure up to the guest's transmit ring), as a direct path does.
//!
//! A token is `buffer index << 16 | frame length`, plus one (never zero). A buffer is
//! owned by exactly one side at a time: the sender's free list, its not-yet-produced
//! batch, the ring, the receiver's pending batch, the return ring. The ring's release
//! store and acquire load of a token order the frame bytes written before it.

use std::num::NonZeroUsize;
use std::sync::Arc;

use spec::layout::{NET_HDR_LEN, NET_HDR_NUM_BUFFERS};

use crate::ctrl::RxConfig;
use crate::memory::GuestMemory;
use crate::port::mrg::{self, FrameSrc, Placed};
use crate::port::PortPath;
use crate::ptr_ring::{Consumer, Producer, PtrRing};
use crate::ring::Ring;
use crate::split_ring::{gather, scatter, ChainBuf, Dir, RingFault};
use crate::stats::{BurstCounts, DropReason};

/// Frame buffers per direction (also the capacity of both rings, so returns always fit).
pub const FRAMES: usize = 1024;
/// Bytes of a receive filter's look at a frame (destination MAC up to the VLAN id).
const FILTER_BYTES: usize = 16;

/// The frame buffers of one direction: `FRAMES` slots of `slot` bytes.
struct FrameStore {
    base: *mut u8,
    slot: usize,
    _mem: Box<[u8]>,
}

// SAFETY: the store only hands out slices of a slot to the side that owns that slot's
// token (see the module comment); ownership moves between threads through the ring,
// whose release/acquire pair orders the bytes. The store itself is never resized.
unsafe impl Send for FrameStore {}
// SAFETY: as above: concurrent users touch disjoint slots.
unsafe impl Sync for FrameStore {}

impl FrameStore {
    fn new(slot: usize) -> FrameStore {
        let mut mem = vec![0u8; slot * FRAMES].into_boxed_slice();
        FrameStore { base: mem.as_mut_ptr(), slot, _mem: mem }
    }

    /// The slot of buffer `idx`.
    ///
    /// # Safety
    /// The caller owns `idx`'s token, and `idx < FRAMES`.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slot(&self, idx: usize) -> &mut [u8] {
        // SAFETY: `idx < FRAMES` keeps the slot inside `_mem`; the token's owner is the
        // only one touching it (caller's contract).
        unsafe { std::slice::from_raw_parts_mut(self.base.add(idx * self.slot), self.slot) }
    }
}

fn token(idx: usize, len: usize) -> NonZeroUsize {
    NonZeroUsize::new(((idx << 16) | len) + 1).expect("non-zero by construction")
}

fn untoken(t: NonZeroUsize) -> (usize, usize) {
    let v = t.get() - 1;
    (v >> 16, v & 0xffff)
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
}

/// One direction: frames of at most `max_frame` bytes.
pub fn channel(max_frame: usize) -> (Sender, Receiver) {
    let store = Arc::new(FrameStore::new(max_frame.next_multiple_of(64)));
    let (full_p, full_c) = PtrRing::new(FRAMES).expect("FRAMES is a valid capacity").split();
    let (free_p, free_c) = PtrRing::new(FRAMES).expect("FRAMES is a valid capacity").split();
    let sender = Sender {
        store: store.clone(),
        full: full_p,
        free: free_c,
        idle: (0..FRAMES).rev().collect(),
        out: Vec::with_capacity(FRAMES),
        scratch: Vec::with_capacity(FRAMES),
    };
    let receiver = Receiver {
        store,
        full: full_c,
        free: free_p,
        pending: Vec::with_capacity(FRAMES),
        done: Vec::with_capacity(FRAMES),
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

    /// One burst of at most `burst` chains from `ring` (device A's transmit queue, its
    /// buffers in `mem`, walked into `buf`): frames are copied out, their chains
    /// completed, their tokens produced. Counts go to `c` (receive side of A). Returns
    /// the chains completed, or the bad value.
    pub fn run<R: Ring>(
        &mut self,
        ring: &mut R,
        mem: &GuestMemory,
        buf: &mut ChainBuf,
        burst: u16,
        max_frame: u64,
        c: &mut BurstCounts,
    ) -> Result<usize, RingFault> {
        self.flush();
        if !self.out.is_empty() {
            return Ok(0); // the ring is full: the guest's frames wait in its ring
        }
        let n = ring.poll_avail()?.min(burst).min(self.idle.len() as u16);
        let (idle, store, out) = (&mut self.idle, &self.store, &mut self.out);
        let res = PortPath::consume_tx(ring, mem, buf, n, max_frame, 0, c, |chain, len| {
            let idx = idle.pop().expect("n <= idle");
            // SAFETY: `idx` came from `idle`: this side owns it.
            let slot = unsafe { store.slot(idx) };
            gather(chain, NET_HDR_LEN, &mut slot[..len as usize]);
            out.push(token(idx, len as usize));
        });
        self.full.produce_batch(&mut self.out);
        res
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
        let Some((ring, mem, rx)) = ring else {
            for t in self.pending.drain(..) {
                c.drop(DropReason::PeerDown);
                self.done.push(t);
            }
            self.free.produce_batch(&mut self.done);
            return Ok(0);
        };
        let filter = (!rx.pass_all()).then_some(rx);
        let mut nrx = ring.poll_avail()?;
        let chain = buf.chain(mem);
        let (mut used, mut taken) = (0u16, 0usize);
        let mut failed = None;
        for &t in &self.pending {
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
        match failed {
            Some(b) => Err(b),
            None => Ok(taken),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_are_never_zero() {
        for (i, l) in [(0, 0), (0, 1), (FRAMES - 1, 1518), (5, 65535)] {
            let t = token(i, l);
            assert_eq!(untoken(t), (i, l));
        }
    }

    #[test]
    fn every_buffer_starts_on_the_sender_side() {
        let (s, r) = channel(1518);
        assert_eq!(s.idle.len(), FRAMES);
        assert!(!r.has_work());
        assert_eq!(s.store.slot, 1536);
    }
}
