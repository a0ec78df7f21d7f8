//! Receive and transmit queues: the data path an application calls.
//!
//! Owns: one receive ring with its batched refill from the pool, one transmit ring with
//! its batched completion reclaim, their statistics, the virtio-net header handling
//! (written in the 12 bytes before the packet data, so a plain packet is one descriptor
//! and a chained one a descriptor chain whose first part carries the header; the
//! received one is exposed as [`RxMeta`]), mergeable receive buffers (`rx/merge.rs`),
//! transmit offload requests (`tx_offload.rs`), and the XDP-style hook of each receive
//! queue.
//! Must not: talk to the transport (kicks go through the ring's `Notifier`; offload
//! changes through the port's [`Control`](crate::Control)) or allocate on the data path.
//!
//! Each half is `Send` and used through `&mut self`, so the receive and transmit sides of
//! a pair can run on different threads without locks.
//!
//! One job per file: `rx.rs` ([`RxQueue`]: receive burst, refill; `rx/merge.rs`: frames
//! over several buffers), `tx.rs` ([`TxQueue`]: transmit burst, reclaim), `tx_offload.rs`
//! (a packet's offload request checked and made a header), `xdp.rs` (the XDP-style hook below),
//! `rx_meta.rs` ([`RxMeta`]), `stats.rs` (the counters); this file holds the
//! [`QueuePair`] and what both halves share (recycling buffers to the pool in batches).
//!
//! # The XDP-style hook
//!
//! [`RxQueue::attach_xdp`] installs an [`XdpProgram`] (a trait object, or any
//! `FnMut(&mut Packet) -> XdpVerdict + Send` closure) that runs on every received frame
//! inside `rx_burst`, before the application sees it. The program may grow or shrink
//! the frame at both ends within the buffer's headroom and tailroom
//! ([`Packet::push_head`] and friends) and answers:
//! * [`XdpVerdict::Pass`]: delivered by `rx_burst` as usual;
//! * [`XdpVerdict::Drop`]: the buffer goes straight back to the pool (recycled in the
//!   same batch as the refill, one pool lock per burst);
//! * [`XdpVerdict::Tx`]: queued in the receive queue's [`XdpOut::tx`], to go out on
//!   the same queue pair without a copy;
//! * [`XdpVerdict::Redirect`]`(t)`: queued in [`XdpOut::redirect`]`[t]` (t <
//!   [`XDP_TARGETS`]), for whichever transmit queue the application maps `t` to: another
//!   queue of this port (no copy), or another port's (no copy when that port's device
//!   reaches the buffer; otherwise [`TxQueue::tx_burst`] copies and counts `tx_copied`).
//!
//! Tx and Redirect packets never wait on a lock: the receive and transmit halves may live
//! on different threads, so `rx_burst` parks them in the queue's own [`XdpOut`] (vectors
//! sized at attach, never grown) and the application hands them to the right
//! `tx_burst` itself: [`RxQueue::xdp_out`] on any thread layout, or
//! [`RxQueue::rx_burst_xdp`] when the pair's transmit half is on the same thread. When a
//! vector is full, further packets for it are dropped and counted as `xdp_aborted`.
//!
//! Attaching switches the receive offloads that merge frames (guest TSO/UFO/ECN/USO) off
//! through the control queue (`GUEST_OFFLOADS_SET`) for the whole port while any program
//! is attached; detaching the last program restores them. Attaching fails, as Linux's
//! `virtnet_xdp_set` does, when such offloads are on and the device cannot switch them
//! off ([`Error::XdpOffloads`](crate::Error::XdpOffloads)), or when a full frame plus [`XDP_HEADROOM`] does not fit
//! a buffer ([`Error::XdpGeometry`](crate::Error::XdpGeometry)). A super-frame the device had already placed in the
//! ring before the switch is not shown to the program: it is dropped and counted as
//! `xdp_aborted`. Attach and detach take `&mut self`, so they happen between two bursts
//! of this queue while the other queues keep running: no frame in the ring is lost.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::mempool::{Mempool, Packet};

mod rx;
mod rx_meta;
mod stats;
mod tx;
mod tx_offload;
mod xdp;

#[cfg(test)]
mod packed_tests;
#[cfg(test)]
mod tests;

pub use rx::{RxQueue, MAX_MERGED_FRAME};
pub use rx_meta::RxMeta;
pub use stats::{PairStats, QueueStatsSnapshot, RxStats, TxStats};
pub use tx::{TxQueue, MAX_TX_SEGS};
pub use xdp::{XdpOut, XdpProgram, XdpVerdict, XDP_HEADROOM, XDP_TARGETS};

/// Most buffers refilled or reclaimed per step (bounds the stack scratch space).
const BATCH: usize = 64;

/// Set once the device has been reset: only then may in-flight buffers return to the
/// pool (before, the device could still write into them).
pub(crate) type Stopped = Arc<AtomicBool>;

/// Buffer indices to return to the pool, in batches of [`BATCH`] under one lock.
struct Recycle<'a> {
    pool: &'a Mempool,
    idx: [u32; BATCH],
    n: usize,
}

impl Recycle<'_> {
    /// Queues buffer `i` for return.
    ///
    /// # Safety
    /// As for [`Mempool::put_indices`]: `i` is a buffer of this pool the caller owns,
    /// given back once.
    #[inline]
    unsafe fn put(&mut self, i: u32) {
        // `n < BATCH` always (it goes back to 0 on reaching it), so `n % BATCH` is `n`:
        // a mask instead of a bounds check, and `n` read once (a store into `idx`
        // would otherwise make the compiler load it again).
        let n = self.n % BATCH;
        self.idx[n] = i;
        self.n = n + 1;
        if self.n == BATCH {
            // SAFETY: every queued index came through `put`, under its contract.
            unsafe { self.pool.put_indices(&self.idx) };
            self.n = 0;
        }
    }
    /// [`put`](Self::put) out of line, for a loop's rare branch (a frame dropped on
    /// receive): inlined there, it cost the loop's common path registers.
    ///
    /// # Safety
    /// As for [`put`](Self::put).
    #[cold]
    #[inline(never)]
    unsafe fn put_cold(&mut self, i: u32) {
        // SAFETY: the caller's promise.
        unsafe { self.put(i) }
    }
    /// Returns `p`'s buffer: batched if it is a plain packet of ours, else (a chain, a
    /// packet of another pool) through its own drop.
    #[inline]
    fn packet(&mut self, p: Packet) {
        if self.pool.owns_plain(&p) {
            // SAFETY: the buffer of a packet of this pool, which `into_raw` gives up.
            unsafe { self.put(p.into_raw().0) };
        } else {
            drop(p);
        }
    }
    #[inline]
    fn flush(&mut self) {
        // SAFETY: every queued index came through `put`, under its contract.
        unsafe { self.pool.put_indices(&self.idx[..self.n]) };
        self.n = 0;
    }
}

/// The two halves of one queue pair (virtio queues `2i` and `2i + 1`).
pub struct QueuePair {
    /// Queue pair index.
    pub index: u16,
    /// Receive half.
    pub rx: RxQueue,
    /// Transmit half.
    pub tx: TxQueue,
}
