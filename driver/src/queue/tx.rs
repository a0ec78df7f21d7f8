//! The transmit half of a queue pair: the transmit burst and the batched reclaim.
//!
//! Owns: [`TxQueue`], posting packets (zero-copy from this port's pool; copied into it
//! from another port's memory the device cannot reach), the virtio-net header of each
//! transmitted frame (zeroed, written only when not already zero; a packet's transmit
//! offload request written there once `tx_offload.rs` accepted it), a multi-segment
//! packet as one descriptor chain (the header in its first buffer's headroom), holding
//! each packet until the device is done with it, and reclaiming those in batches. Must
//! not: talk to the transport, allocate on the data path, or reuse a buffer the device
//! may still read (in-flight packets are leaked, not freed, if the device was not reset).
//!
//! Plain packets of this port's pool (one buffer, no offload request) take the burst
//! loop; anything else (a chain, an offload request, a packet from another port's
//! memory) takes `tx_general`, which posts one packet at a time.
//!
//! What the ring holds for each in-flight packet is its token: for a plain packet of
//! this port's pool, the bare buffer index (the packet gave its buffer up with
//! `Packet::into_raw`: reclaiming it is returning that index to the pool, nothing else
//! is stored or read per packet); for any other packet, its head's descriptor id tagged
//! with [`IN_SLOT`], the packet itself waiting whole in `inflight[id]`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::DeviceError;
use crate::layout::NET_HDR_LEN;
use crate::link::ResetPoint;
use crate::mempool::{Mempool, Packet};
use crate::ring::{AnyRing, DriverRing, PackedRing, PostSource, Ring, TokenSink};
use spec::prefetch::WritePrefetch;

use super::stats::{bump, PairStats};
use super::tx_offload::{tx_header, TxCaps};
use super::{Recycle, Stopped, BATCH};

/// The transmit half of a queue pair. The ring's layout (split or packed) is matched
/// once per call; the burst itself runs on [`TxHalf`], monomorphized per layout.
pub struct TxQueue(TxKind);

/// The transmit half on a ring of each layout.
enum TxKind {
    Split(TxHalf<DriverRing>),
    Packed(TxHalf<PackedRing>),
}

/// Runs `$e` with `$h` bound to the layout's half (one match per call).
macro_rules! on_half {
    ($q:expr, $h:ident => $e:expr) => {
        match $q {
            TxKind::Split($h) => $e,
            TxKind::Packed($h) => $e,
        }
    };
}

/// The transmit half of a queue pair on a ring of layout `R`.
struct TxHalf<R: Ring> {
    ring: R,
    pool: Mempool,
    stats: Arc<PairStats>,
    /// The packets posted with an [`IN_SLOT`] token, by their head's descriptor id
    /// (plain packets of the pool are only a buffer index in the ring: see the module
    /// comment).
    inflight: Box<[Option<Packet>]>,
    error: Option<DeviceError>,
    stopped: Stopped,
    /// The CPU's write prefetch, if it has one (see `spec::prefetch`).
    prefetchw: Option<WritePrefetch>,
    /// Device address minus host address in the pool, when that is one constant
    /// ([`Mempool::linear_iova`]: fixed for the pool's life).
    iova_delta: Option<u64>,
    /// The transmit offloads the device accepted.
    caps: TxCaps,
    /// Tells the half when the device its ring was set up on went away (`link.rs`).
    reset: ResetPoint,
}

/// Most descriptors one packet may take (its segments); a longer chain is refused and
/// counted in `tx_errors`.
pub const MAX_TX_SEGS: usize = 64;

/// Tags a ring token that names an `inflight` slot (the packet's head descriptor id);
/// a token without it is a buffer index of this port's pool, which is below 2^30
/// (`mempool::check_geometry`).
const IN_SLOT: u32 = 1 << 31;

/// How a transmit burst finds a packet's header slot and its device address: one
/// implementation per pool kind, so that the burst loop has no branch on it.
trait HdrAddr {
    /// The header slot of `p` and its device address.
    ///
    /// # Safety
    /// `p` is a packet of the burst's pool.
    unsafe fn header(&self, pool: &Mempool, p: &Packet) -> (*mut u8, u64);
}

/// A pool in one chunk of a linearly mapped arena: the geometry and the device offset
/// read once per burst.
struct LinearHdr {
    /// The first buffer and the buffer size ([`Mempool::single_chunk`]).
    base: *mut u8,
    step: usize,
    /// Device address minus host address ([`Mempool::linear_iova`]).
    delta: u64,
}

impl HdrAddr for LinearHdr {
    #[inline(always)]
    unsafe fn header(&self, _: &Mempool, p: &Packet) -> (*mut u8, u64) {
        let (idx, off) = p.buf_off();
        // SAFETY: `p` is a packet of the pool (the caller's promise), which is one chunk
        // from `base`: its buffer `idx < count` starts at `base + idx * step`, and its
        // `off >= NET_HDR_LEN` (the headroom invariant): the slot is inside the buffer.
        let hdr = unsafe { self.base.add(idx as usize * self.step + off as usize - NET_HDR_LEN) };
        (hdr, (hdr as u64).wrapping_add(self.delta))
    }
}

/// Any other pool: its geometry and the arena's translation per packet.
struct PoolHdr;

impl HdrAddr for PoolHdr {
    #[inline(always)]
    unsafe fn header(&self, pool: &Mempool, p: &Packet) -> (*mut u8, u64) {
        // SAFETY: `p` is a packet of `pool` (the caller's promise).
        let hdr = unsafe { pool.header_ptr(p) };
        (hdr, p.header_slot().1)
    }
}

/// The packets of one transmit burst, moved out of the caller's vector as they are
/// posted, each giving up its buffer to the ring as a bare index (see `tx_burst`).
struct TxSource<'a, A: HdrAddr> {
    /// The first packet of the burst; the vector's length is 0 meanwhile.
    pkts: *const Packet,
    /// The pool every packet of the burst comes from.
    pool: &'a Mempool,
    addr: A,
    bytes: u64,
}

impl<A: HdrAddr> PostSource for TxSource<'_, A> {
    #[inline(always)]
    fn buffer(&mut self, k: usize, _id: u16) -> (u64, u32, u32) {
        // SAFETY: `k` < the burst's count <= the packets initialized behind `pkts`, and
        // each is read out exactly once (`tx_burst`).
        let p = unsafe { std::ptr::read(self.pkts.add(k)) };
        // SAFETY: every packet of the burst is from this pool (`tx_burst` checked).
        let (hdr, iova) = unsafe { self.addr.header(self.pool, &p) };
        // SAFETY: the 12 bytes before the data are this packet's header slot (the pool
        // keeps `off >= NET_HDR_LEN`); the packet is ours until posted.
        unsafe {
            if !header_is_zero(hdr) {
                std::ptr::write_bytes(hdr, 0, NET_HDR_LEN);
            }
        }
        let len = p.len() as u32 + NET_HDR_LEN as u32;
        self.bytes += p.len() as u64;
        // The token is the buffer index: the ring holds the buffer until `reclaim` gives
        // the index back to the pool (a plain packet: `tx_burst` checked).
        let (idx, _, _) = p.into_raw();
        (iova, len, idx)
    }
}

/// Whether the 12-byte virtio-net header at `hdr` is all zero: what a transmitted frame
/// carries without offloads (flags, GSO type, sizes and checksum fields 0, and
/// `num_buffers` 0 as the spec asks of a driver, §5.1.6.2.1). The transmit path writes a
/// header only when it is not, as DPDK's PMD writes only differing fields: a line the
/// device left zero then stays shared instead of being pulled over and dirtied (a
/// back-end that writes `num_buffers` 1 into received frames, as ours does, still gets
/// the header rewritten).
///
/// # Safety
/// `hdr` points to 12 readable bytes no one writes meanwhile.
#[inline(always)]
unsafe fn header_is_zero(hdr: *const u8) -> bool {
    // SAFETY: per the contract; unaligned reads (the slot is 4-aligned).
    let (a, b) = unsafe {
        (std::ptr::read_unaligned(hdr as *const u64), std::ptr::read_unaligned(hdr.add(8) as *const u32))
    };
    a | b as u64 == 0
}

/// Where one reclaim puts the packets the device is done with.
struct ReclaimSink<'a> {
    inflight: &'a mut [Option<Packet>],
    rec: Recycle<'a>,
}

impl TokenSink for ReclaimSink<'_> {
    #[inline(always)]
    fn token(&mut self, token: u32) {
        if token & IN_SLOT == 0 {
            // SAFETY: an untagged token is the buffer index a plain packet of this pool
            // gave up when posted (`TxSource`, `tx_general`); the device is done with it
            // and the ring hands each token back once.
            unsafe { self.rec.put(token) };
        } else {
            self.slot(token);
        }
    }
}

impl ReclaimSink<'_> {
    /// The packet waiting in the slot a tagged token names (out of line: chains and
    /// packets with an offload request only).
    #[cold]
    #[inline(never)]
    fn slot(&mut self, token: u32) {
        // The tagged descriptor id (< ring size, the length of `inflight`).
        if let Some(p) = self.inflight.get_mut((token & !IN_SLOT) as usize).and_then(Option::take) {
            self.rec.packet(p);
        }
    }
}

impl TxQueue {
    pub(crate) fn new(
        ring: impl Into<AnyRing>,
        pool: Mempool,
        stats: Arc<PairStats>,
        stopped: Stopped,
        features: u64,
    ) -> Self {
        let caps = TxCaps::from_features(features);
        TxQueue(match ring.into() {
            AnyRing::Split(r) => TxKind::Split(TxHalf::new(r, pool, stats, stopped, caps)),
            AnyRing::Packed(r) => TxKind::Packed(TxHalf::new(r, pool, stats, stopped, caps)),
        })
    }

    /// Joins the port's reset handshake (`link.rs`).
    pub(crate) fn set_reset_point(&mut self, rp: ResetPoint) {
        on_half!(&mut self.0, h => h.reset = rp)
    }

    /// Whether the device this queue's ring was set up on went away and the ring waits
    /// to be reset: the next `tx_burst` or [`reclaim`](Self::reclaim) does it (what the
    /// old device held is counted in `tx_lost`). An application that may leave this
    /// queue idle should call `reclaim` when this is true, or the port comes back
    /// without it (and the frames it held stay uncounted). One atomic load.
    #[inline]
    pub fn reset_pending(&self) -> bool {
        on_half!(&self.0, h => h.reset.pending())
    }

    /// For a queue nobody polls (not taken from its port): if the device went away,
    /// counts what it held as lost and resets the ring now.
    pub(crate) fn reset_if_pending(&mut self) {
        on_half!(&mut self.0, h => if h.reset.pending() {
            h.reset_ring()
        })
    }

    /// Reclaims buffers the device has finished with (in one batch per pool lock);
    /// returns how many.
    pub fn reclaim(&mut self) -> usize {
        on_half!(&mut self.0, h => h.reclaim())
    }

    /// Queues packets from the front of `pkts` for transmission, as many as the ring has
    /// room for, with one avail publish and at most one kick. The packets it could not
    /// queue stay in `pkts`. Returns how many it took (queued, or dropped: counted in
    /// `tx_nobuf` when a packet from another port's memory found no buffer to be copied
    /// into, in `tx_errors` when its offload request was refused or its chain has more
    /// than [`MAX_TX_SEGS`] segments or more than the ring holds). Packets from this
    /// port's pool go out without a copy; a chain as one descriptor chain. While the
    /// device reports its link down it takes nothing (QEMU would discard the frames
    /// unseen, see `link.rs`).
    pub fn tx_burst(&mut self, pkts: &mut Vec<Packet>) -> usize {
        on_half!(&mut self.0, h => h.tx_burst(pkts))
    }

    /// The device error that stopped this queue, if any.
    pub fn error(&self) -> Option<DeviceError> {
        on_half!(&self.0, h => h.error)
    }
    /// Packets the device holds.
    pub fn in_flight(&self) -> u16 {
        on_half!(&self.0, h => h.ring.in_flight())
    }
}

impl<R: Ring> TxHalf<R> {
    fn new(ring: R, pool: Mempool, stats: Arc<PairStats>, stopped: Stopped, caps: TxCaps) -> Self {
        let inflight = (0..ring.size()).map(|_| None).collect();
        let iova_delta = pool.linear_iova().map(|(base, _)| {
            // SAFETY: a pool has at least one buffer (`check_geometry`).
            base.wrapping_sub(unsafe { pool.buf(0) }.0 as u64)
        });
        TxHalf {
            ring,
            pool,
            stats,
            inflight,
            error: None,
            stopped,
            prefetchw: WritePrefetch::detect(),
            iova_delta,
            caps,
            reset: ResetPoint::standalone(),
        }
    }

    fn reclaim(&mut self) -> usize {
        if self.reset.pending() {
            return self.device_gone();
        }
        self.reclaim_ring()
    }

    /// A reset pending (done now) or transmit held: returns whether transmit is held (the
    /// burst takes nothing; what the device completes is still reclaimed).
    #[cold]
    fn attend(&mut self) -> bool {
        if self.reset.pending() {
            self.device_gone();
        }
        if !self.reset.tx_held() {
            return false;
        }
        self.reclaim_ring();
        true
    }

    /// The device this ring was set up on went away (`link.rs`): the packets it
    /// completed before are reclaimed as usual, every other packet it held is freed and
    /// counted in `tx_lost` (it may or may not have been sent: it is not sent again), and
    /// the ring goes back to its initial state for the next device (a queue the old
    /// device broke included).
    #[cold]
    fn device_gone(&mut self) -> usize {
        let done = self.reclaim_ring();
        self.reset_ring();
        done
    }

    /// Frees (and counts as lost) every packet still in flight, puts the ring in its
    /// initial state and acknowledges the reset (`device_gone`).
    fn reset_ring(&mut self) {
        // The old device is gone (the epoch moves only after its connection closed):
        // every buffer it held is ours again.
        let lost = self.free_in_flight();
        bump(&self.stats.tx.lost, lost);
        self.ring.reset();
        self.error = None;
        self.reset.done();
    }

    /// Takes every packet the ring holds back (the device is reset or gone): buffer
    /// indices go back to the pool, `inflight` packets are dropped. Returns how many.
    fn free_in_flight(&mut self) -> u64 {
        let tokens = self.ring.drain_in_flight();
        let plain: Vec<u32> = tokens.iter().copied().filter(|t| t & IN_SLOT == 0).collect();
        // SAFETY: untagged tokens are buffer indices plain packets of this pool gave up
        // when posted (see `ReclaimSink::token`), each drained once; the caller's device
        // no longer reads them.
        unsafe { self.pool.put_indices(&plain) };
        let slots = self.inflight.iter_mut().filter_map(Option::take).count();
        (plain.len() + slots) as u64
    }

    fn reclaim_ring(&mut self) -> usize {
        if self.error.is_some() {
            return 0;
        }
        let n = match self.ring.poll_used() {
            Ok(0) => return 0,
            Ok(n) => n,
            Err(e) => {
                self.fail(e);
                return 0;
            }
        };
        let mut sink = ReclaimSink {
            inflight: &mut self.inflight,
            rec: Recycle { pool: &self.pool, idx: [0; BATCH], n: 0 },
        };
        let res = self.ring.pop_used_tokens(n, &mut sink);
        sink.rec.flush();
        match res {
            Ok(done) => done as usize,
            Err((done, e)) => {
                self.fail(e);
                done as usize
            }
        }
    }

    #[inline(always)]
    fn tx_burst(&mut self, pkts: &mut Vec<Packet>) -> usize {
        // One load for both: a reset pending, or transmit held (`link.rs`).
        if self.reset.tx_attention() && self.attend() {
            return 0;
        }
        self.reclaim_ring();
        if self.error.is_some() {
            return 0;
        }
        let k = pkts.len().min(self.ring.free_count() as usize);
        // The common case, every packet from this port's pool, in one ring loop; packets
        // from elsewhere (which may need a copy) take the general loop. The same pass
        // reads every header and asks for the lines of those that must be rewritten, so
        // that their transfers overlap instead of queueing behind each other in the ring
        // loop.
        for p in &pkts[..k] {
            // A chain or an offload request is tagged in the pool pointer: not "plain
            // from this pool" either (`mempool::chain`).
            if !self.pool.owns_plain(p) {
                return self.tx_general(pkts);
            }
            // SAFETY: `p` is this pool's (checked just above).
            let hdr = unsafe { self.pool.header_ptr(p) };
            if let Some(pw) = self.prefetchw {
                // SAFETY: the header slot of a packet of ours: 12 readable bytes.
                if !unsafe { header_is_zero(hdr) } {
                    pw.line(hdr);
                }
            }
        }
        let total = pkts.len();
        // The vector forgets its packets while the first `k` are moved out (a panic in
        // between would leak them, never drop one twice).
        // SAFETY: shrinking the length only.
        unsafe { pkts.set_len(0) };
        let (base, pool) = (pkts.as_ptr(), &self.pool);
        let (sent, bytes) = match (self.iova_delta, pool.single_chunk()) {
            (Some(delta), Some((first, step))) => {
                let addr = LinearHdr { base: first, step, delta };
                let mut src = TxSource { pkts: base, pool, addr, bytes: 0 };
                (self.ring.post_burst(k as u16, false, &mut src) as usize, src.bytes)
            }
            _ => {
                let mut src = TxSource { pkts: base, pool, addr: PoolHdr, bytes: 0 };
                (self.ring.post_burst(k as u16, false, &mut src) as usize, src.bytes)
            }
        };
        debug_assert_eq!(sent, k, "free descriptors were counted above");
        // SAFETY: the first `k` packets were moved out above; the other `total - k` are
        // still initialized in the buffer: shift them down and own them again.
        unsafe {
            let rest = total - k;
            std::ptr::copy(base.add(k), pkts.as_mut_ptr(), rest);
            pkts.set_len(rest);
        }
        self.ring.publish();
        bump(&self.stats.tx.packets, sent as u64);
        bump(&self.stats.tx.bytes, bytes);
        bump(&self.stats.tx.full, pkts.len() as u64);
        k
    }

    /// `tx_burst` when some packet is not plain from this port's pool: one packet at a
    /// time, from the front of `pkts`, until the ring has no room for the next. A packet
    /// the device cannot reach is copied into this port's buffers (or dropped and
    /// counted when none is free); an offload request is checked and written into the
    /// header (or the packet dropped and counted); a chain goes out as one descriptor
    /// chain.
    fn tx_general(&mut self, pkts: &mut Vec<Packet>) -> usize {
        let (mut bytes, mut copied, mut sent, mut nobuf, mut bad) = (0u64, 0u64, 0u64, 0u64, 0u64);
        let limit = MAX_TX_SEGS.min(self.ring.size() as usize);
        let mut taken = 0;
        // A chain's descriptors (address, length, device-writable), filled per chain.
        // Zeroed once per burst, not per chain: its elements have padding, so zeroing it
        // is four stores an element, 256 a chain.
        let mut parts = [(0u64, 0u32, false); MAX_TX_SEGS];
        // Packets are moved out of the front of `pkts` one at a time; a `VecDeque`-free
        // way to do that without shifting per packet: reverse once, pop from the back,
        // reverse the rest back at the end.
        pkts.reverse();
        while let Some(p) = pkts.pop() {
            let p = if self.pool.reaches(&p) {
                p
            } else {
                // A buffer from another port's arena is not in this device's memory (the
                // device could not reach it): copy it into one of ours, keeping its
                // offload request.
                let room = self.pool.buf_size() as usize - self.pool.headroom() as usize;
                let need = p.total_len().div_ceil(room).max(1);
                if need > self.ring.free_count() as usize && need <= limit {
                    pkts.push(p);
                    break;
                }
                match copy_into(&self.pool, &p) {
                    Some(own) => {
                        copied += 1;
                        own
                    }
                    None => {
                        taken += 1;
                        nobuf += 1;
                        continue; // dropped: no buffer here to carry it
                    }
                }
            };
            let segs = p.nb_segs();
            if segs > limit {
                log::debug!("transmit: a chain of {segs} segments refused (at most {limit})");
                taken += 1;
                bad += 1;
                continue;
            }
            if segs > self.ring.free_count() as usize {
                pkts.push(p);
                break;
            }
            let hdr_val = match p.tx_offload() {
                None => None,
                Some(o) => match tx_header(&o, p.total_len(), self.caps) {
                    Ok(h) => Some(h),
                    Err(e) => {
                        log::debug!("transmit: offload request {o:?} refused: {e:?}");
                        taken += 1;
                        bad += 1;
                        continue;
                    }
                },
            };
            let (hdr, iova) = p.header_slot();
            // A zero header that is zero already is left alone (as in `tx_burst`): the
            // device read that line last, and a store would wait for it to come back.
            // SAFETY: the 12 bytes before the data are this packet's header slot (the
            // pool keeps `off >= NET_HDR_LEN`); the packet is ours until posted.
            unsafe {
                match hdr_val {
                    None if header_is_zero(hdr) => {}
                    None => std::ptr::write_bytes(hdr, 0, NET_HDR_LEN),
                    Some(h) => std::ptr::copy_nonoverlapping(h.to_bytes().as_ptr(), hdr, NET_HDR_LEN),
                }
            }
            let len = p.len() as u32 + NET_HDR_LEN as u32;
            bytes += p.total_len() as u64;
            if self.pool.owns_plain(&p) {
                // The buffer index is the token, as in `tx_burst`.
                let (idx, _, _) = p.into_raw();
                let Some(_) = self.ring.post(iova, len, false, Some(idx)) else {
                    unreachable!("free descriptors were counted above")
                };
            } else {
                // The tagged head id is the token: the packet waits in `inflight[id]`.
                parts[0] = (iova, len, false);
                let mut n = 1;
                p.for_each_segment_iova(|addr, slen| {
                    parts[n] = (addr, slen as u32, false);
                    n += 1;
                });
                let Some(id) = self.ring.post_chain_id(&parts[..n], IN_SLOT) else {
                    unreachable!("free descriptors were counted above")
                };
                self.inflight[id as usize] = Some(p);
            }
            sent += 1;
            taken += 1;
        }
        pkts.reverse();
        self.ring.publish();
        bump(&self.stats.tx.packets, sent);
        bump(&self.stats.tx.copied, copied);
        bump(&self.stats.tx.bytes, bytes);
        bump(&self.stats.tx.nobuf, nobuf);
        bump(&self.stats.tx.errors, bad);
        bump(&self.stats.tx.full, pkts.len() as u64);
        taken
    }

    fn fail(&mut self, e: DeviceError) {
        log::error!("transmit queue stopped: {e}");
        self.error = Some(e);
        bump(&self.stats.tx.device_errors, 1);
    }
}

/// A copy of `p` (every segment, and its offload request) in buffers of `pool`, chained
/// when it needs more than one; `None` if the pool runs out.
fn copy_into(pool: &Mempool, p: &Packet) -> Option<Packet> {
    let room = pool.buf_size() as usize - pool.headroom() as usize;
    let mut head: Option<Packet> = None;
    let mut cur = pool.alloc()?;
    for mut s in p.segments() {
        while !s.is_empty() {
            if cur.len() == room {
                let full = std::mem::replace(&mut cur, pool.alloc()?);
                match head.as_mut() {
                    None => head = Some(full),
                    Some(h) => h.append(full).ok()?,
                }
            }
            let n = s.len().min(room - cur.len());
            cur.push_tail(n).ok()?.copy_from_slice(&s[..n]);
            s = &s[n..];
        }
    }
    let mut out = match head {
        None => cur,
        Some(mut h) => {
            if !cur.is_empty() {
                h.append(cur).ok()?;
            }
            h
        }
    };
    if let Some(o) = p.tx_offload() {
        out.set_tx_offload(o);
    }
    Some(out)
}

impl<R: Ring> Drop for TxHalf<R> {
    fn drop(&mut self) {
        if !self.stopped.load(Ordering::Acquire) {
            // The device may still read these buffers: leak them rather than reuse them
            // (the buffer indices in the ring are simply never given back).
            for p in self.inflight.iter_mut().filter_map(Option::take) {
                std::mem::forget(p);
            }
            return;
        }
        // The device is reset: every buffer goes back to its pool.
        self.free_in_flight();
    }
}
