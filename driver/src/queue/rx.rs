//! The receive half of a queue pair: the receive burst and the batched refill.
//!
//! Owns: [`RxQueue`], taking used buffers off its ring as [`Packet`]s (the plain burst in
//! one ring loop; with metadata or an XDP program, one buffer at a time), reading the
//! virtio-net header of each frame when asked ([`RxMeta`]), refilling the ring from the
//! pool (one pool lock and one avail publish per batch), and returning in-flight buffers
//! at close once the device is reset. Must not: talk to the transport, allocate on the
//! data path, or return a posted buffer to the pool while the device may still write it.
//! The XDP hook's own parts (verdicts, attach, detach) live in `xdp.rs`; the mergeable
//! receive path (`VIRTIO_NET_F_MRG_RXBUF`: a frame over several buffers, returned as a
//! chain) in `rx/merge.rs`, taken only when that feature was negotiated, so the plain
//! burst is compiled as before; the frame-length limit an application may set
//! ([`RxQueue::set_mtu`]) in `rx/limit.rs`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::ctrl::Control;
use crate::error::DeviceError;
use crate::layout::NET_HDR_LEN;
use crate::link::ResetPoint;
use crate::mempool::{Mempool, Packet};
use crate::ring::{AnyRing, DriverRing, PackedRing, PostSource, Ring, UsedSink};

use super::rx_meta::{HdrRules, RxMeta};
use super::stats::{bump, PairStats};
use super::tx::TxQueue;
use super::xdp::{self, Verdicts, XdpOut, XdpProgram};
use super::{Recycle, Stopped, BATCH};

mod limit;
mod merge;
use limit::FrameLimit;
pub use merge::MAX_MERGED_FRAME;

/// The receive half of a queue pair. The ring's layout (split or packed) is matched
/// once per call; the burst itself runs on [`RxHalf`], monomorphized per layout.
pub struct RxQueue(RxKind);

/// The receive half on a ring of each layout.
pub(super) enum RxKind {
    Split(RxHalf<DriverRing>),
    Packed(RxHalf<PackedRing>),
}

/// Runs `$e` with `$h` bound to the layout's half (one match per call).
macro_rules! on_half {
    ($q:expr, $h:ident => $e:expr) => {
        match $q {
            $crate::queue::rx::RxKind::Split($h) => $e,
            $crate::queue::rx::RxKind::Packed($h) => $e,
        }
    };
}
pub(super) use on_half;

/// The receive half of a queue pair on a ring of layout `R`.
pub(super) struct RxHalf<R: Ring> {
    pub(super) ring: R,
    pub(super) pool: Mempool,
    stats: Arc<PairStats>,
    /// Bytes posted per buffer: header plus data room minus reserved tailroom.
    pub(super) post_len: u32,
    pub(super) headroom: u16,
    /// The pool's buffer addresses as `(base, step)`, when linear
    /// ([`Mempool::linear_iova`]: fixed for the pool's life).
    linear_iova: Option<(u64, u64)>,
    error: Option<DeviceError>,
    stopped: Stopped,
    pub(super) xdp: Option<Box<dyn XdpProgram>>,
    pub(super) xdp_out: XdpOut,
    pub(super) control: Control,
    pub(super) mtu: u16,
    /// The largest MTU [`RxQueue::set_mtu`] may set: the device's (`limit.rs`).
    max_mtu: u16,
    /// Longest frame delivered (`set_mtu`: MTU + 18); longer ones that are not
    /// super-frames are dropped and counted. `u32::MAX` until `set_mtu`.
    rx_limit: u32,
    /// `VIRTIO_NET_F_MRG_RXBUF` negotiated: frames may span several buffers.
    mrg: bool,
    /// What the device may write into a frame's header (negotiated features).
    pub(super) hdr_rules: HdrRules,
    /// Tells the half when the device its ring was set up on went away (`link.rs`).
    reset: ResetPoint,
}

/// How a refill finds the device address of a pool buffer: one implementation per
/// pool kind, so that the refill loop has no branch on it.
trait BufIova {
    /// The device address of the first byte of buffer `i`, a buffer the refill took
    /// from the pool.
    fn iova(&self, i: u32) -> u64;
}

/// A linearly mapped pool ([`Mempool::linear_iova`]): `base + i * step`.
struct LinearIova {
    base: u64,
    step: u64,
}

impl BufIova for LinearIova {
    #[inline(always)]
    fn iova(&self, i: u32) -> u64 {
        self.base + i as u64 * self.step
    }
}

/// Any other pool: the arena's translation per buffer.
struct PoolIova<'a>(&'a Mempool);

impl BufIova for PoolIova<'_> {
    #[inline(always)]
    fn iova(&self, i: u32) -> u64 {
        // SAFETY: `i` was taken from the pool by this refill (`BufIova`): a buffer index.
        unsafe { self.0.buf(i).1 }
    }
}

/// The buffers of one refill: pool indices taken under one lock, posted at their
/// header slots.
struct RefillSource<A: BufIova> {
    idx: [u32; BATCH],
    addr: A,
    off: u64,
    post_len: u32,
}

impl<A: BufIova> PostSource for RefillSource<A> {
    #[inline(always)]
    fn buffer(&mut self, k: usize, _id: u16) -> (u64, u32, u32) {
        let i = self.idx[k & (BATCH - 1)]; // k < BATCH
        (self.addr.iova(i) + self.off, self.post_len, i)
    }
}

/// Where one plain receive burst puts its frames (see `rx_plain`). `L`: the queue's
/// frame-length limit (`rx/limit.rs`), [`NoLimit`] (a zero-sized type: the loop is the
/// one without a limit, field for field) or [`Limit`].
struct RxSink<'a, 'r, L: FrameLimit> {
    /// The spare capacity of the caller's vector, reserved for the whole burst
    /// (`rx_plain_as`): each frame is written in place, the length set once at the end.
    out: *mut Packet,
    got: usize,
    rec: &'r mut Recycle<'a>,
    headroom: u16,
    bytes: u64,
    errors: u64,
    limit: L,
}

impl<L: FrameLimit> UsedSink for RxSink<'_, '_, L> {
    #[inline(always)]
    fn used(&mut self, idx: u32, len: u32) {
        // The ring hands back the token each buffer was posted with: a buffer of this
        // queue's pool (posted by `refill`), owned by the queue until now; `len` is at
        // most what was posted, so the data ends inside the buffer.
        if (len as usize) < NET_HDR_LEN {
            self.errors += 1;
            // SAFETY: a buffer of ours (above), given back once.
            unsafe { self.rec.put_cold(idx) };
            return;
        }
        let data_len = len - NET_HDR_LEN as u32;
        if self.limit.drops(self.rec.pool, idx, self.headroom, data_len) {
            // SAFETY: a buffer of ours (above), given back once.
            unsafe { self.rec.put_cold(idx) };
            return;
        }
        self.bytes += data_len as u64;
        // SAFETY: a buffer of ours (above), data at the headroom within the posted length;
        // written into the reserved capacity: the ring passes at most the `n` buffers
        // asked for (`rx_plain_as` reserved them), so `got < n`.
        unsafe {
            let p = self.rec.pool.packet(idx, self.headroom, data_len as u16);
            self.out.add(self.got).write(p);
        }
        self.got += 1;
    }
}

impl RxQueue {
    #[cfg(test)]
    pub(crate) fn new(
        ring: impl Into<AnyRing>,
        pool: Mempool,
        stats: Arc<PairStats>,
        tailroom: u16,
        stopped: Stopped,
        control: Control,
        mtu: u16,
    ) -> Self {
        Self::with_merge(ring, pool, stats, tailroom, stopped, control, mtu, false)
    }

    /// As `new`; `mrg`: `VIRTIO_NET_F_MRG_RXBUF` was negotiated.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn with_merge(
        ring: impl Into<AnyRing>,
        pool: Mempool,
        stats: Arc<PairStats>,
        tailroom: u16,
        stopped: Stopped,
        control: Control,
        mtu: u16,
        mrg: bool,
    ) -> Self {
        RxQueue(match ring.into() {
            AnyRing::Split(r) => {
                RxKind::Split(RxHalf::new(r, pool, stats, tailroom, stopped, control, mtu, mrg))
            }
            AnyRing::Packed(r) => {
                RxKind::Packed(RxHalf::new(r, pool, stats, tailroom, stopped, control, mtu, mrg))
            }
        })
    }

    /// Joins the port's reset handshake (`link.rs`).
    pub(crate) fn set_reset_point(&mut self, rp: ResetPoint) {
        on_half!(&mut self.0, h => h.reset = rp)
    }

    /// Whether the device this queue's ring was set up on went away and the ring waits
    /// to be reset: the next `rx_burst` does it (frames the old device completed are
    /// received first). An application that leaves this queue idle (a transmit-only
    /// engine) should poll it when this is true, or the port comes back without it. One
    /// atomic load.
    #[inline]
    pub fn reset_pending(&self) -> bool {
        on_half!(&self.0, h => h.reset.pending())
    }

    /// For a queue nobody polls (not taken from its port): if the device went away,
    /// resets the ring now, without receiving what the old device left in it (those
    /// buffers go back to the pool with the rest).
    pub(crate) fn reset_if_pending(&mut self) {
        on_half!(&mut self.0, h => if h.reset.pending() {
            h.reset_ring()
        })
    }

    /// The half on its ring's layout.
    pub(super) fn half(&mut self) -> &mut RxKind {
        &mut self.0
    }
    /// The half on its ring's layout.
    pub(super) fn half_ref(&self) -> &RxKind {
        &self.0
    }

    /// Posts free buffers until the ring is full or the pool is empty (one pool lock and
    /// one avail publish per batch).
    pub(crate) fn refill(&mut self) {
        on_half!(&mut self.0, h => h.refill())
    }

    /// Appends up to `max` received packets to `batch` (which should have the capacity:
    /// then nothing allocates) and refills the ring. Returns how many were appended.
    /// With an XDP program attached, only the frames it passed are appended (see the
    /// module documentation for the others). After a device error the queue is stopped
    /// and returns 0; see [`error`](Self::error).
    pub fn rx_burst(&mut self, batch: &mut Vec<Packet>, max: usize) -> usize {
        on_half!(&mut self.0, h => h.rx_inner(batch, None, max))
    }

    /// As [`rx_burst`](Self::rx_burst), and appends each delivered packet's
    /// [`RxMeta`] to `meta` (the offload information from its virtio-net header: a
    /// super-frame's `gso_type`/`gso_size`, a partial checksum to complete).
    pub fn rx_burst_meta(&mut self, batch: &mut Vec<Packet>, meta: &mut Vec<RxMeta>, max: usize) -> usize {
        on_half!(&mut self.0, h => h.rx_inner(batch, Some(meta), max))
    }

    /// As [`rx_burst`](Self::rx_burst), then sends the packets the XDP program answered
    /// [`XdpVerdict::Tx`](super::XdpVerdict::Tx) for on `tx` (this pair's transmit half, on this thread).
    /// Those that do not fit the ring wait in [`xdp_out`](Self::xdp_out) for the next
    /// call. Redirected packets stay in `xdp_out().redirect` for the caller.
    pub fn rx_burst_xdp(&mut self, batch: &mut Vec<Packet>, max: usize, tx: &mut TxQueue) -> usize {
        on_half!(&mut self.0, h => {
            let n = h.rx_inner(batch, None, max);
            if !h.xdp_out.tx.is_empty() {
                tx.tx_burst(&mut h.xdp_out.tx);
            }
            n
        })
    }

    /// The device error that stopped this queue, if any.
    pub fn error(&self) -> Option<DeviceError> {
        on_half!(&self.0, h => h.error)
    }
    /// Buffers the device holds.
    pub fn in_flight(&self) -> u16 {
        on_half!(&self.0, h => h.ring.in_flight())
    }
}

impl<R: Ring> RxHalf<R> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        ring: R,
        pool: Mempool,
        stats: Arc<PairStats>,
        tailroom: u16,
        stopped: Stopped,
        control: Control,
        mtu: u16,
        mrg: bool,
    ) -> Self {
        let headroom = pool.headroom();
        let post_len = pool.buf_size() - headroom as u32 - tailroom as u32 + NET_HDR_LEN as u32;
        RxHalf {
            ring,
            linear_iova: pool.linear_iova(),
            pool,
            stats,
            post_len,
            headroom,
            error: None,
            stopped,
            xdp: None,
            xdp_out: XdpOut::default(),
            hdr_rules: HdrRules::from_features(control.features()),
            control,
            mtu,
            max_mtu: mtu,
            rx_limit: u32::MAX,
            mrg,
            reset: ResetPoint::standalone(),
        }
    }

    /// Posts free buffers until the ring is full (a packed ring: up to its last whole
    /// line of free descriptors) or the pool is empty (one pool lock per batch, one avail
    /// publish).
    fn refill(&mut self) {
        // Where the device writes: the header slot, the 12 bytes before the data.
        let off = self.headroom as u64 - NET_HDR_LEN as u64;
        match self.linear_iova {
            Some((base, step)) => {
                let src = RefillSource {
                    idx: [0; BATCH],
                    addr: LinearIova { base, step },
                    off,
                    post_len: self.post_len,
                };
                Self::refill_from(&mut self.ring, &self.pool, &self.stats, src)
            }
            None => {
                let src = RefillSource {
                    idx: [0; BATCH],
                    addr: PoolIova(&self.pool),
                    off,
                    post_len: self.post_len,
                };
                Self::refill_from(&mut self.ring, &self.pool, &self.stats, src)
            }
        }
    }

    /// `refill` with the buffers' addresses from `src.addr`.
    #[inline(always)]
    fn refill_from<A: BufIova>(ring: &mut R, pool: &Mempool, stats: &PairStats, mut src: RefillSource<A>) {
        loop {
            // Whole lines of descriptors on packed rings (`Ring::refill_take`).
            let want = ring.refill_take((ring.free_count() as usize).min(BATCH) as u16) as usize;
            if want == 0 {
                break;
            }
            let got = pool.take_indices(&mut src.idx[..want]);
            // `got <= want <= free_count`: every index taken is posted.
            ring.post_burst(got as u16, true, &mut src);
            if got < want {
                bump(&stats.rx.nombuf, 1);
                break;
            }
        }
        ring.publish();
    }

    fn rx_inner(&mut self, batch: &mut Vec<Packet>, meta: Option<&mut Vec<RxMeta>>, max: usize) -> usize {
        if self.reset.pending() {
            return self.device_gone(batch, meta, max);
        }
        self.rx_ring(batch, meta, max)
    }

    /// The device this ring was set up on went away (`link.rs`): first the frames it
    /// completed before (its used index was published then), as usual; once there are
    /// none, every buffer still posted goes back to the pool (no frame is in them), the
    /// ring goes back to its initial state (a queue the old device broke included) and
    /// is filled again for the next device, which starts at index 0.
    #[cold]
    fn device_gone(&mut self, batch: &mut Vec<Packet>, meta: Option<&mut Vec<RxMeta>>, max: usize) -> usize {
        if self.error.is_none() {
            let n = self.rx_ring(batch, meta, max);
            if n > 0 {
                return n;
            }
        }
        self.reset_ring();
        0
    }

    /// Every posted buffer back to the pool, the ring in its initial state and filled
    /// again, the reset acknowledged (`device_gone`).
    fn reset_ring(&mut self) {
        let idx = self.ring.drain_in_flight();
        // SAFETY: the tokens of the buffers posted to the old device, which is gone (the
        // epoch moves only after its connection closed): ours again, each given back once.
        unsafe { self.pool.put_indices(&idx) };
        self.ring.reset();
        self.error = None;
        self.refill();
        self.reset.done();
    }

    fn rx_ring(&mut self, batch: &mut Vec<Packet>, meta: Option<&mut Vec<RxMeta>>, max: usize) -> usize {
        if self.error.is_some() {
            return 0;
        }
        let polled = match self.ring.poll_used() {
            Ok(n) => n,
            Err(e) => return self.fail(e),
        };
        if self.mrg {
            return self.rx_merge(batch, meta, max, polled);
        }
        // `polled` is a u16, so the smaller of the two fits one.
        let n = self.ring.rx_take((polled as usize).min(max) as u16) as usize;
        if n == 0 {
            return 0;
        }
        if meta.is_none() && self.xdp.is_none() {
            return self.rx_plain(batch, n);
        }
        self.rx_headers(batch, meta, n)
    }

    /// `rx_ring` with an XDP program or metadata: each of `n` used buffers' headers read
    /// and checked. Out of line, so that `rx_ring`'s plain loop is compiled on its own.
    #[inline(never)]
    fn rx_headers(&mut self, batch: &mut Vec<Packet>, mut meta: Option<&mut Vec<RxMeta>>, n: usize) -> usize {
        let (mut got, mut frames, mut bytes, mut errors) = (0usize, 0u64, 0u64, 0u64);
        let mut too_long = 0u64;
        let mut v = Verdicts::default();
        let mut failed = None;
        let mut rec = Recycle { pool: &self.pool, idx: [0; BATCH], n: 0 };
        let need_hdr = meta.is_some() || self.xdp.is_some();
        for _ in 0..n {
            let (idx, len) = match self.ring.pop_one() {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            if (len as usize) < NET_HDR_LEN {
                errors += 1;
                // SAFETY: a buffer of ours (see `RxSink::used`), given back once.
                unsafe { rec.put(idx) };
                continue;
            }
            let data_len = len - NET_HDR_LEN as u32;
            let m = if need_hdr {
                // SAFETY: `idx` is a token of this ring: a buffer of the pool (`RxSink::used`).
                let (base, _) = unsafe { self.pool.buf(idx) };
                // SAFETY: the header slot is the 12 bytes before the data at `headroom`,
                // inside buffer `idx`, which the device returned (its writes are ordered
                // before our acquire load of used.idx in `poll_used`); ours alone now.
                let h = unsafe {
                    std::ptr::read(base.add(self.headroom as usize - NET_HDR_LEN) as *const [u8; NET_HDR_LEN])
                };
                match RxMeta::checked(&h, self.hdr_rules, data_len) {
                    Some(m) => m,
                    None => {
                        // A header the device may not write: the frame is dropped and
                        // counted, never shown.
                        errors += 1;
                        // SAFETY: a buffer of ours (see `RxSink::used`), given back once.
                        unsafe { rec.put(idx) };
                        continue;
                    }
                }
            } else {
                RxMeta::default()
            };
            if data_len > self.rx_limit && !m.is_gso() {
                too_long += 1;
                // SAFETY: a buffer of ours (see `RxSink::used`), given back once.
                unsafe { rec.put(idx) };
                continue;
            }
            frames += 1;
            bytes += data_len as u64;
            // SAFETY: a buffer of ours (see `RxSink::used`), data at the headroom within the
            // posted length.
            let p = unsafe { self.pool.packet(idx, self.headroom, data_len as u16) };
            let p = match self.xdp.as_mut() {
                Some(prog) => {
                    match xdp::run(prog.as_mut(), &mut self.xdp_out, &mut v, &mut rec, m.is_gso(), p) {
                        Some(p) => p,
                        None => continue,
                    }
                }
                None => p,
            };
            batch.push(p);
            if let Some(m2) = meta.as_deref_mut() {
                m2.push(m);
            }
            got += 1;
        }
        rec.flush();
        let rx = &self.stats.rx;
        bump(&rx.packets, frames);
        bump(&rx.bytes, bytes);
        bump(&rx.errors, errors);
        bump(&rx.too_long, too_long);
        v.count(rx);
        if let Some(e) = failed {
            self.fail(e);
        } else {
            self.refill();
        }
        got
    }

    /// `rx_inner` without an XDP program or metadata: `n` used buffers (`poll_used`
    /// allowed them) straight into `batch`, in one ring loop.
    #[inline(always)]
    fn rx_plain(&mut self, batch: &mut Vec<Packet>, n: usize) -> usize {
        if self.rx_limit == u32::MAX {
            self.rx_plain_unlimited(batch, n)
        } else {
            self.rx_plain_limited(batch, n)
        }
    }

    /// `rx_plain` on a queue without a frame-length limit, a function of its own: its
    /// loop's registers do not depend on what else `rx_ring` holds.
    #[inline(never)]
    fn rx_plain_unlimited(&mut self, batch: &mut Vec<Packet>, n: usize) -> usize {
        self.rx_plain_as(batch, n, limit::NoLimit)
    }

    /// `rx_plain` on a queue with a frame-length limit, out of line.
    #[inline(never)]
    fn rx_plain_limited(&mut self, batch: &mut Vec<Packet>, n: usize) -> usize {
        let l = limit::Limit { limit: self.rx_limit, gso: self.hdr_rules.gso(), too_long: 0 };
        self.rx_plain_as(batch, n, l)
    }

    #[inline(always)]
    fn rx_plain_as<L: FrameLimit>(&mut self, batch: &mut Vec<Packet>, n: usize, limit: L) -> usize {
        // Allocates only if the caller's vector lacks the capacity (see `rx_burst`).
        batch.reserve(n);
        let before = batch.len();
        let mut rec = Recycle { pool: &self.pool, idx: [0; BATCH], n: 0 };
        let mut sink = RxSink {
            // SAFETY: `before <= capacity`: the pointer stays inside (or one past) the
            // vector's allocation.
            out: unsafe { batch.as_mut_ptr().add(before) },
            got: 0,
            rec: &mut rec,
            headroom: self.headroom,
            bytes: 0,
            errors: 0,
            limit,
        };
        let res = self.ring.pop_used_burst(n as u16, &mut sink);
        let (got, bytes, errors, too_long) = (sink.got, sink.bytes, sink.errors, sink.limit.too_long());
        // SAFETY: the sink wrote `got <= n` packets into the reserved capacity right after
        // the first `before`, in order: now the vector's.
        unsafe { batch.set_len(before + got) };
        rec.flush();
        let rx = &self.stats.rx;
        bump(&rx.packets, got as u64);
        bump(&rx.bytes, bytes);
        bump(&rx.errors, errors);
        bump(&rx.too_long, too_long);
        match res {
            Ok(_) => self.refill(),
            Err((_, e)) => {
                self.fail(e);
            }
        }
        got
    }

    fn fail(&mut self, e: DeviceError) -> usize {
        log::error!("receive queue stopped: {e}");
        self.error = Some(e);
        bump(&self.stats.rx.device_errors, 1);
        0
    }
}

impl<R: Ring> Drop for RxHalf<R> {
    fn drop(&mut self) {
        if self.xdp.take().is_some() {
            if let Err(e) = self.control.xdp_detach() {
                log::warn!("restoring receive offloads after dropping an XDP program: {e}");
            }
        }
        if !self.stopped.load(Ordering::Acquire) {
            // The device may still write into posted buffers: they are not reused.
            return;
        }
        let idx: Vec<u32> = self.ring.drain_in_flight();
        // SAFETY: the tokens of the buffers still posted: ours, and the device is reset.
        unsafe { self.pool.put_indices(&idx) };
    }
}
