//! Receive and transmit queues: the data path an application calls.
//!
//! Owns: one receive ring with its batched refill from the pool, one transmit ring with
//! its batched completion reclaim, their statistics, the virtio-net header handling
//! (written in the 12 bytes before the packet data, so a packet is one descriptor; the
//! received one is exposed as [`RxMeta`]), and the XDP-style hook of each receive queue.
//! Must not: talk to the transport (kicks go through the ring's `Notifier`; offload
//! changes through the port's [`Control`]) or allocate on the data path.
//!
//! Each half is `Send` and used through `&mut self`, so the receive and transmit sides of
//! a pair can run on different threads without locks.
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
//! off ([`Error::XdpOffloads`]), or when a full frame plus [`XDP_HEADROOM`] does not fit
//! a buffer ([`Error::XdpGeometry`]). A super-frame the device had already placed in the
//! ring before the switch is not shown to the program: it is dropped and counted as
//! `xdp_aborted`. Attach and detach take `&mut self`, so they happen between two bursts
//! of this queue while the other queues keep running: no frame in the ring is lost.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::ctrl::Control;
use crate::error::{DeviceError, Error, Result};
use crate::layout::{net_hdr, NET_HDR_LEN};
use crate::mempool::{Mempool, Packet};
use crate::ring::{DriverRing, PostSource, TokenSink, UsedSink};
use spec::prefetch::WritePrefetch;

/// Headroom (pool headroom, the virtio-net header's 12 bytes included) a receive buffer
/// needs for an XDP program, as Linux's `VIRTIO_XDP_HEADROOM`.
pub const XDP_HEADROOM: usize = 256;
/// Redirect targets an XDP program may name (`XdpVerdict::Redirect(0..XDP_TARGETS)`).
pub const XDP_TARGETS: usize = 8;
/// Bytes of the Ethernet header a full frame adds to the MTU.
const ETH_HLEN: usize = 14;

/// What an XDP program decides for one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpVerdict {
    /// Deliver it through `rx_burst`.
    Pass,
    /// Recycle the buffer at once.
    Drop,
    /// Send it back out on the same queue pair (through [`XdpOut::tx`]).
    Tx,
    /// Send it out through the transmit queue the application maps this target to
    /// (through [`XdpOut::redirect`]; targets `0..XDP_TARGETS`).
    Redirect(u16),
}

/// A program run on every received frame of a queue (see the module documentation).
pub trait XdpProgram: Send {
    /// Looks at (and may rewrite, grow or shrink) one received frame.
    fn run(&mut self, pkt: &mut Packet) -> XdpVerdict;
}

impl<F: FnMut(&mut Packet) -> XdpVerdict + Send> XdpProgram for F {
    fn run(&mut self, pkt: &mut Packet) -> XdpVerdict {
        self(pkt)
    }
}

/// The packets an XDP program sent on: to be handed to `tx_burst` by the application.
/// The vectors are sized at attach (the ring size each) and never grow.
#[derive(Default)]
pub struct XdpOut {
    /// Answered [`XdpVerdict::Tx`]: for this queue pair's transmit half.
    pub tx: Vec<Packet>,
    /// Answered [`XdpVerdict::Redirect`]`(t)`, in `redirect[t]`.
    pub redirect: Vec<Vec<Packet>>,
}

impl XdpOut {
    /// Packets waiting.
    pub fn len(&self) -> usize {
        self.tx.len() + self.redirect.iter().map(Vec::len).sum::<usize>()
    }
    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Drops every waiting packet (buffers back to their pools).
    pub fn clear(&mut self) {
        crate::mempool::free_bulk(&mut self.tx);
        for r in self.redirect.iter_mut() {
            crate::mempool::free_bulk(r);
        }
    }
}

/// What the device said about a received frame: its virtio-net header (§5.1.6.4).
/// Without receive offloads negotiated it is all zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxMeta {
    /// `VIRTIO_NET_HDR_F_*` ([`net_hdr::F_NEEDS_CSUM`], [`net_hdr::F_DATA_VALID`], ...).
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`: a super-frame to be segmented, or `GSO_NONE`.
    pub gso_type: u8,
    /// Length of the headers to replicate in each segment.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// With `F_NEEDS_CSUM`: where checksumming starts.
    pub csum_start: u16,
    /// With `F_NEEDS_CSUM`: where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
}

impl RxMeta {
    /// Decodes a received `virtio_net_hdr_v1`.
    pub fn parse(h: &[u8; NET_HDR_LEN]) -> RxMeta {
        let u = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]);
        RxMeta {
            flags: h[net_hdr::FLAGS],
            gso_type: h[net_hdr::GSO_TYPE],
            hdr_len: u(net_hdr::HDR_LEN),
            gso_size: u(net_hdr::GSO_SIZE),
            csum_start: u(net_hdr::CSUM_START),
            csum_offset: u(net_hdr::CSUM_OFFSET),
        }
    }
    /// A segmentation super-frame (`gso_type` other than `GSO_NONE`).
    pub fn is_gso(&self) -> bool {
        self.gso_type & !net_hdr::GSO_ECN != net_hdr::GSO_NONE
    }
    /// The checksum is partial: the application must complete it (`F_NEEDS_CSUM`).
    pub fn needs_csum(&self) -> bool {
        self.flags & net_hdr::F_NEEDS_CSUM != 0
    }
    /// The device validated the checksum (`F_DATA_VALID`).
    pub fn data_valid(&self) -> bool {
        self.flags & net_hdr::F_DATA_VALID != 0
    }
}

/// Most buffers refilled or reclaimed per step (bounds the stack scratch space).
const BATCH: usize = 64;

/// Counters of one receive queue (single writer: its queue; readers anywhere).
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct RxStats {
    /// Frames received from the device (delivered by `rx_burst`; with an XDP program
    /// attached, every frame it saw or could not see: the `xdp_*` counters add up to it).
    pub packets: AtomicU64,
    /// Their bytes (without the virtio-net header), as received.
    pub bytes: AtomicU64,
    /// XDP verdicts: Pass.
    pub xdp_pass: AtomicU64,
    /// XDP verdicts: Drop.
    pub xdp_drop: AtomicU64,
    /// XDP verdicts: Tx (queued in `XdpOut::tx`).
    pub xdp_tx: AtomicU64,
    /// XDP verdicts: Redirect (queued in `XdpOut::redirect`).
    pub xdp_redirect: AtomicU64,
    /// Frames dropped without a verdict taking effect: super-frames the program cannot
    /// see whole, a full `XdpOut` vector, a redirect target out of range.
    pub xdp_aborted: AtomicU64,
    /// Buffers the device returned too short to hold a header (recycled).
    pub errors: AtomicU64,
    /// Refills that found the pool empty.
    pub nombuf: AtomicU64,
    /// Protocol violations by the device (the queue stopped).
    pub device_errors: AtomicU64,
}

/// Counters of one transmit queue.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct TxStats {
    /// Packets queued to the device.
    pub packets: AtomicU64,
    /// Their bytes.
    pub bytes: AtomicU64,
    /// Packets `tx_burst` handed back because the ring was full.
    pub full: AtomicU64,
    /// Packets from another port's memory, copied into this port's buffers.
    pub copied: AtomicU64,
    /// Such packets dropped because this port's pool was empty (or its buffers too small).
    pub nobuf: AtomicU64,
    /// Protocol violations by the device (the queue stopped).
    pub device_errors: AtomicU64,
}

/// A plain copy of one queue pair's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueStatsSnapshot {
    /// Packets received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Receive errors.
    pub rx_errors: u64,
    /// Refills without buffers.
    pub rx_nombuf: u64,
    /// Packets transmitted.
    pub tx_packets: u64,
    /// Bytes transmitted.
    pub tx_bytes: u64,
    /// Packets returned to the caller because the ring was full.
    pub tx_full: u64,
    /// Packets copied in from another port's memory.
    pub tx_copied: u64,
    /// Packets dropped because no buffer was free to copy them into.
    pub tx_nobuf: u64,
    /// Device protocol violations seen on either queue.
    pub device_errors: u64,
    /// XDP Pass verdicts.
    pub xdp_pass: u64,
    /// XDP Drop verdicts.
    pub xdp_drop: u64,
    /// XDP Tx verdicts.
    pub xdp_tx: u64,
    /// XDP Redirect verdicts.
    pub xdp_redirect: u64,
    /// Frames an XDP program could not act on (dropped).
    pub xdp_aborted: u64,
}

/// Both halves' counters, shared with the port for reporting.
#[derive(Debug, Default)]
pub struct PairStats {
    /// Receive side.
    pub rx: RxStats,
    /// Transmit side.
    pub tx: TxStats,
}

impl PairStats {
    /// A snapshot.
    pub fn snapshot(&self) -> QueueStatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        QueueStatsSnapshot {
            rx_packets: l(&self.rx.packets),
            rx_bytes: l(&self.rx.bytes),
            rx_errors: l(&self.rx.errors),
            rx_nombuf: l(&self.rx.nombuf),
            tx_packets: l(&self.tx.packets),
            tx_bytes: l(&self.tx.bytes),
            tx_full: l(&self.tx.full),
            tx_copied: l(&self.tx.copied),
            tx_nobuf: l(&self.tx.nobuf),
            device_errors: l(&self.rx.device_errors) + l(&self.tx.device_errors),
            xdp_pass: l(&self.rx.xdp_pass),
            xdp_drop: l(&self.rx.xdp_drop),
            xdp_tx: l(&self.rx.xdp_tx),
            xdp_redirect: l(&self.rx.xdp_redirect),
            xdp_aborted: l(&self.rx.xdp_aborted),
        }
    }
}

/// Adds `v` to a counter only this thread writes (a relaxed load and store: no RMW).
#[inline]
fn bump(c: &AtomicU64, v: u64) {
    if v != 0 {
        c.store(c.load(Ordering::Relaxed) + v, Ordering::Relaxed);
    }
}

/// Set once the device has been reset: only then may in-flight buffers return to the
/// pool (before, the device could still write into them).
pub(crate) type Stopped = Arc<AtomicBool>;

/// The receive half of a queue pair.
pub struct RxQueue {
    ring: DriverRing,
    pool: Mempool,
    stats: Arc<PairStats>,
    /// Bytes posted per buffer: header plus data room minus reserved tailroom.
    post_len: u32,
    headroom: u16,
    /// The pool's buffer addresses as `(base, step)`, when linear
    /// ([`Mempool::linear_iova`]: fixed for the pool's life).
    linear_iova: Option<(u64, u64)>,
    error: Option<DeviceError>,
    stopped: Stopped,
    xdp: Option<Box<dyn XdpProgram>>,
    xdp_out: XdpOut,
    control: Control,
    mtu: u16,
}

/// Verdict counts of one burst.
#[derive(Default)]
struct Verdicts {
    pass: u64,
    drop: u64,
    tx: u64,
    redirect: u64,
    aborted: u64,
}

/// Buffer indices to return to the pool, in batches of [`BATCH`] under one lock.
struct Recycle<'a> {
    pool: &'a Mempool,
    idx: [u32; BATCH],
    n: usize,
}

impl Recycle<'_> {
    #[inline]
    fn put(&mut self, i: u32) {
        self.idx[self.n] = i;
        self.n += 1;
        if self.n == BATCH {
            self.pool.put_indices(&self.idx);
            self.n = 0;
        }
    }
    /// Returns `p`'s buffer: batched if it is one of ours, else to its own pool.
    #[inline]
    fn packet(&mut self, p: Packet) {
        if self.pool.owns(&p) {
            self.put(p.into_raw().0);
        } else {
            drop(p);
        }
    }
    fn flush(&mut self) {
        self.pool.put_indices(&self.idx[..self.n]);
        self.n = 0;
    }
}

/// The buffers of one refill: pool indices taken under one lock, posted at their
/// header slots.
struct RefillSource<'a> {
    idx: [u32; BATCH],
    pool: &'a Mempool,
    linear: Option<(u64, u64)>,
    off: u64,
    post_len: u32,
}

impl PostSource for RefillSource<'_> {
    #[inline(always)]
    fn buffer(&mut self, k: usize, _id: u16) -> (u64, u32, u32) {
        let i = self.idx[k & (BATCH - 1)]; // k < BATCH
        let iova = match self.linear {
            Some((base, step)) => base + i as u64 * step,
            None => self.pool.buf(i).1,
        };
        (iova + self.off, self.post_len, i)
    }
}

/// Where one plain receive burst puts its frames (see `rx_plain`).
struct RxSink<'a, 'b> {
    batch: &'b mut Vec<Packet>,
    rec: Recycle<'a>,
    headroom: u16,
    bytes: u64,
    errors: u64,
}

impl UsedSink for RxSink<'_, '_> {
    #[inline(always)]
    fn used(&mut self, idx: u32, len: u32) {
        if (len as usize) < NET_HDR_LEN {
            self.errors += 1;
            self.rec.put(idx);
            return;
        }
        let data_len = len - NET_HDR_LEN as u32;
        self.bytes += data_len as u64;
        self.batch.push(self.rec.pool.packet(idx, self.headroom, data_len as u16));
    }
}

impl RxQueue {
    pub(crate) fn new(
        ring: DriverRing,
        pool: Mempool,
        stats: Arc<PairStats>,
        tailroom: u16,
        stopped: Stopped,
        control: Control,
        mtu: u16,
    ) -> Self {
        let headroom = pool.headroom();
        let post_len = pool.buf_size() - headroom as u32 - tailroom as u32 + NET_HDR_LEN as u32;
        RxQueue {
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
            control,
            mtu,
        }
    }

    /// Posts free buffers until the ring is full or the pool is empty (one pool lock and
    /// one avail publish per batch).
    pub(crate) fn refill(&mut self) {
        let mut src = RefillSource {
            idx: [0u32; BATCH],
            pool: &self.pool,
            linear: self.linear_iova,
            // Where the device writes: the header slot, the 12 bytes before the data.
            off: self.headroom as u64 - NET_HDR_LEN as u64,
            post_len: self.post_len,
        };
        while self.ring.free_count() > 0 {
            let want = (self.ring.free_count() as usize).min(BATCH);
            let got = self.pool.take_indices(&mut src.idx[..want]);
            // `got <= want <= free_count`: every index taken is posted.
            self.ring.post_burst(got as u16, true, &mut src);
            if got < want {
                bump(&self.stats.rx.nombuf, 1);
                break;
            }
        }
        self.ring.publish();
    }

    /// Appends up to `max` received packets to `batch` (which should have the capacity:
    /// then nothing allocates) and refills the ring. Returns how many were appended.
    /// With an XDP program attached, only the frames it passed are appended (see the
    /// module documentation for the others). After a device error the queue is stopped
    /// and returns 0; see [`error`](Self::error).
    pub fn rx_burst(&mut self, batch: &mut Vec<Packet>, max: usize) -> usize {
        self.rx_inner(batch, None, max)
    }

    /// As [`rx_burst`](Self::rx_burst), and appends each delivered packet's
    /// [`RxMeta`] to `meta` (the offload information from its virtio-net header: a
    /// super-frame's `gso_type`/`gso_size`, a partial checksum to complete).
    pub fn rx_burst_meta(&mut self, batch: &mut Vec<Packet>, meta: &mut Vec<RxMeta>, max: usize) -> usize {
        self.rx_inner(batch, Some(meta), max)
    }

    /// As [`rx_burst`](Self::rx_burst), then sends the packets the XDP program answered
    /// [`XdpVerdict::Tx`] for on `tx` (this pair's transmit half, on this thread).
    /// Those that do not fit the ring wait in [`xdp_out`](Self::xdp_out) for the next
    /// call. Redirected packets stay in `xdp_out().redirect` for the caller.
    pub fn rx_burst_xdp(&mut self, batch: &mut Vec<Packet>, max: usize, tx: &mut TxQueue) -> usize {
        let n = self.rx_inner(batch, None, max);
        if !self.xdp_out.tx.is_empty() {
            tx.tx_burst(&mut self.xdp_out.tx);
        }
        n
    }

    fn rx_inner(&mut self, batch: &mut Vec<Packet>, mut meta: Option<&mut Vec<RxMeta>>, max: usize) -> usize {
        if self.error.is_some() {
            return 0;
        }
        let n = match self.ring.poll_used() {
            // `n` is a u16, so the smaller of the two fits one.
            Ok(n) => self.ring.line_aligned((n as usize).min(max) as u16) as usize,
            Err(e) => return self.fail(e),
        };
        if n == 0 {
            return 0;
        }
        if meta.is_none() && self.xdp.is_none() {
            return self.rx_plain(batch, n);
        }
        let (mut got, mut frames, mut bytes, mut errors) = (0usize, 0u64, 0u64, 0u64);
        let mut v = Verdicts::default();
        let mut failed = None;
        let mut rec = Recycle { pool: &self.pool, idx: [0; BATCH], n: 0 };
        let need_hdr = meta.is_some() || self.xdp.is_some();
        for _ in 0..n {
            let (idx, len) = match self.ring.pop_used() {
                Ok(x) => x,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            if (len as usize) < NET_HDR_LEN {
                errors += 1;
                rec.put(idx);
                continue;
            }
            let data_len = len - NET_HDR_LEN as u32;
            frames += 1;
            bytes += data_len as u64;
            let m = if need_hdr {
                let (base, _) = self.pool.buf(idx);
                // SAFETY: the header slot is the 12 bytes before the data at `headroom`,
                // inside buffer `idx`, which the device returned (its writes are ordered
                // before our acquire load of used.idx in `poll_used`); ours alone now.
                let h = unsafe {
                    std::ptr::read(base.add(self.headroom as usize - NET_HDR_LEN) as *const [u8; NET_HDR_LEN])
                };
                RxMeta::parse(&h)
            } else {
                RxMeta::default()
            };
            let mut p = self.pool.packet(idx, self.headroom, data_len as u16);
            if let Some(prog) = self.xdp.as_mut() {
                if m.is_gso() {
                    // Placed in the ring before the offloads were switched off: the
                    // program sees single frames only.
                    v.aborted += 1;
                    rec.packet(p);
                    continue;
                }
                let out = &mut self.xdp_out;
                match prog.run(&mut p) {
                    XdpVerdict::Pass => v.pass += 1,
                    XdpVerdict::Drop => {
                        v.drop += 1;
                        rec.packet(p);
                        continue;
                    }
                    XdpVerdict::Tx => {
                        if out.tx.len() < out.tx.capacity() {
                            out.tx.push(p);
                            v.tx += 1;
                        } else {
                            v.aborted += 1;
                            rec.packet(p);
                        }
                        continue;
                    }
                    XdpVerdict::Redirect(t) => {
                        match out.redirect.get_mut(t as usize) {
                            Some(q) if q.len() < q.capacity() => {
                                q.push(p);
                                v.redirect += 1;
                            }
                            _ => {
                                v.aborted += 1;
                                rec.packet(p);
                            }
                        }
                        continue;
                    }
                }
            }
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
        bump(&rx.xdp_pass, v.pass);
        bump(&rx.xdp_drop, v.drop);
        bump(&rx.xdp_tx, v.tx);
        bump(&rx.xdp_redirect, v.redirect);
        bump(&rx.xdp_aborted, v.aborted);
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
        let before = batch.len();
        let mut sink = RxSink {
            batch,
            rec: Recycle { pool: &self.pool, idx: [0; BATCH], n: 0 },
            headroom: self.headroom,
            bytes: 0,
            errors: 0,
        };
        let res = self.ring.pop_used_burst(n as u16, &mut sink);
        sink.rec.flush();
        let (bytes, errors) = (sink.bytes, sink.errors);
        let got = batch.len() - before;
        let rx = &self.stats.rx;
        bump(&rx.packets, got as u64);
        bump(&rx.bytes, bytes);
        bump(&rx.errors, errors);
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

    /// Attaches an XDP program (replacing the one attached, if any). The first program
    /// of the port switches the merging receive offloads off (see the module
    /// documentation); fails with [`Error::XdpGeometry`] when a full frame and
    /// [`XDP_HEADROOM`] do not fit a buffer, with [`Error::XdpOffloads`] when the
    /// offloads cannot be switched off, or with the control command's error.
    pub fn attach_xdp(&mut self, prog: Box<dyn XdpProgram>) -> Result<()> {
        let headroom = self.headroom as usize;
        let frame_room = self.post_len as usize - NET_HDR_LEN;
        let frame = self.mtu as usize + ETH_HLEN;
        if headroom < XDP_HEADROOM || frame_room < frame {
            return Err(Error::XdpGeometry {
                mtu: self.mtu,
                frame,
                headroom,
                need: XDP_HEADROOM,
                room: headroom + frame_room,
            });
        }
        if self.xdp.is_none() {
            self.control.xdp_attach()?;
            let cap = self.ring.size() as usize;
            if self.xdp_out.tx.capacity() < cap {
                self.xdp_out.tx.reserve_exact(cap - self.xdp_out.tx.len());
            }
            while self.xdp_out.redirect.len() < XDP_TARGETS {
                self.xdp_out.redirect.push(Vec::with_capacity(cap));
            }
        }
        self.xdp = Some(prog);
        Ok(())
    }

    /// Detaches the XDP program, if any: frames are delivered by `rx_burst` again from
    /// the next burst on. The last program of the port restores the receive offloads;
    /// if the device refuses, the program is detached anyway and the error returned.
    /// Packets waiting in [`xdp_out`](Self::xdp_out) stay there for the caller.
    pub fn detach_xdp(&mut self) -> Result<()> {
        if self.xdp.take().is_none() {
            return Ok(());
        }
        self.control.xdp_detach()
    }

    /// Whether an XDP program is attached.
    pub fn xdp_attached(&self) -> bool {
        self.xdp.is_some()
    }

    /// The packets the XDP program sent on, waiting for the application to pass them to
    /// `tx_burst` (see the module documentation).
    pub fn xdp_out(&mut self) -> &mut XdpOut {
        &mut self.xdp_out
    }

    /// The device error that stopped this queue, if any.
    pub fn error(&self) -> Option<DeviceError> {
        self.error
    }
    /// Buffers the device holds.
    pub fn in_flight(&self) -> u16 {
        self.ring.in_flight()
    }
}

impl Drop for RxQueue {
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
        let idx: Vec<u32> = self.ring.drain_in_flight().collect();
        self.pool.put_indices(&idx);
    }
}

/// The transmit half of a queue pair.
pub struct TxQueue {
    ring: DriverRing,
    pool: Mempool,
    stats: Arc<PairStats>,
    /// The packet each in-flight descriptor carries, by descriptor token.
    inflight: Box<[Option<Packet>]>,
    error: Option<DeviceError>,
    stopped: Stopped,
    /// The CPU's write prefetch, if it has one (see `spec::prefetch`).
    prefetchw: Option<WritePrefetch>,
    /// Device address minus host address in the pool, when that is one constant
    /// ([`Mempool::linear_iova`]: fixed for the pool's life).
    iova_delta: Option<u64>,
}

/// The packets of one transmit burst, moved out of the caller's vector into
/// `inflight` as they are posted (see `tx_burst`).
struct TxSource<'a> {
    /// The first packet of the burst; the vector's length is 0 meanwhile.
    pkts: *const Packet,
    /// The pool every packet of the burst comes from.
    pool: &'a Mempool,
    /// Device address minus host address in the pool, when that is one constant (see
    /// [`Mempool::linear_iova`]).
    iova_delta: Option<u64>,
    inflight: &'a mut [Option<Packet>],
    bytes: u64,
}

impl PostSource for TxSource<'_> {
    #[inline(always)]
    fn buffer(&mut self, k: usize, id: u16) -> (u64, u32, u32) {
        // SAFETY: `k` < the burst's count <= the packets initialized behind `pkts`, and
        // each is read out exactly once (`tx_burst`).
        let p = unsafe { std::ptr::read(self.pkts.add(k)) };
        let hdr = self.pool.header_ptr(&p);
        let iova = match self.iova_delta {
            Some(d) => (hdr as u64).wrapping_add(d),
            None => p.header_slot().1,
        };
        // SAFETY: the 12 bytes before the data are this packet's header slot (the pool
        // keeps `off >= NET_HDR_LEN`); the packet is ours until posted.
        unsafe {
            if !header_is_zero(hdr) {
                std::ptr::write_bytes(hdr, 0, NET_HDR_LEN);
            }
        }
        let len = p.len() as u32 + NET_HDR_LEN as u32;
        self.bytes += p.len() as u64;
        // The descriptor id (< ring size = `inflight.len()`) is the token: the packet
        // waits in `inflight[id]`, which is empty (a descriptor is free only once its
        // packet was taken out by `reclaim`): written without dropping the old value.
        let slot = &mut self.inflight[id as usize];
        debug_assert!(slot.is_none());
        // SAFETY: `slot` is a valid, aligned `Option<Packet>`; overwriting `None` leaks
        // nothing.
        unsafe { std::ptr::write(slot, Some(p)) };
        (iova, len, id as u32)
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
        // The token is the descriptor id (< ring size, the length of `inflight`).
        if let Some(p) = self.inflight.get_mut(token as usize).and_then(Option::take) {
            self.rec.packet(p);
        }
    }
}

impl TxQueue {
    pub(crate) fn new(ring: DriverRing, pool: Mempool, stats: Arc<PairStats>, stopped: Stopped) -> Self {
        let inflight = (0..ring.size()).map(|_| None).collect();
        let iova_delta = pool.linear_iova().map(|(base, _)| base.wrapping_sub(pool.buf(0).0 as u64));
        TxQueue {
            ring,
            pool,
            stats,
            inflight,
            error: None,
            stopped,
            prefetchw: WritePrefetch::detect(),
            iova_delta,
        }
    }

    /// Reclaims buffers the device has finished with (in one batch per pool lock);
    /// returns how many.
    pub fn reclaim(&mut self) -> usize {
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

    /// Queues packets from the front of `pkts` for transmission, as many as the ring has
    /// room for, with one avail publish and at most one kick. The packets it could not
    /// queue stay in `pkts`. Returns how many it took (queued, or dropped and counted in
    /// `tx_nobuf` when a packet from another port's memory found no buffer to be copied
    /// into). Packets from this port's pool go out without a copy.
    pub fn tx_burst(&mut self, pkts: &mut Vec<Packet>) -> usize {
        self.reclaim();
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
            if !self.pool.owns(p) {
                return self.tx_general(pkts, k);
            }
            let hdr = self.pool.header_ptr(p);
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
        let mut src = TxSource {
            pkts: pkts.as_ptr(),
            pool: &self.pool,
            iova_delta: self.iova_delta,
            inflight: &mut self.inflight,
            bytes: 0,
        };
        let sent = self.ring.post_burst(k as u16, false, &mut src) as usize;
        let (bytes, base) = (src.bytes, src.pkts);
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

    /// `tx_burst` for `k` packets of which some are not from this port's pool: those the
    /// device cannot reach are copied into this port's buffers (or dropped and counted
    /// when none is free).
    fn tx_general(&mut self, pkts: &mut Vec<Packet>, k: usize) -> usize {
        let mut bytes = 0u64;
        let (mut copied, mut sent) = (0u64, 0usize);
        for p in pkts.drain(..k) {
            // A buffer from another port's arena is not in this device's memory (the
            // device could not reach it): copy it into one of ours.
            let p = if self.pool.reaches(&p) {
                p
            } else {
                let own = self.pool.alloc().and_then(|mut own| own.set_data(p.data()).ok().map(|_| own));
                match own {
                    Some(own) => {
                        copied += 1;
                        own
                    }
                    None => {
                        bump(&self.stats.tx.nobuf, 1);
                        continue; // dropped: no buffer here to carry it
                    }
                }
            };
            let (hdr, iova) = p.header_slot();
            // SAFETY: the 12 bytes before the data are this packet's header slot (the
            // pool keeps `off >= NET_HDR_LEN`); the packet is ours until posted.
            unsafe { std::ptr::write_bytes(hdr, 0, NET_HDR_LEN) };
            let len = p.len() as u32 + NET_HDR_LEN as u32;
            bytes += p.len() as u64;
            // The descriptor id is the token: the packet waits in `inflight[id]`.
            let Some(id) = self.ring.post(iova, len, false, None) else {
                unreachable!("free descriptors were counted above")
            };
            self.inflight[id as usize] = Some(p);
            sent += 1;
        }
        self.ring.publish();
        bump(&self.stats.tx.packets, sent as u64);
        bump(&self.stats.tx.copied, copied);
        bump(&self.stats.tx.bytes, bytes);
        bump(&self.stats.tx.full, pkts.len() as u64);
        k
    }

    fn fail(&mut self, e: DeviceError) {
        log::error!("transmit queue stopped: {e}");
        self.error = Some(e);
        bump(&self.stats.tx.device_errors, 1);
    }

    /// The device error that stopped this queue, if any.
    pub fn error(&self) -> Option<DeviceError> {
        self.error
    }
    /// Packets the device holds.
    pub fn in_flight(&self) -> u16 {
        self.ring.in_flight()
    }
}

impl Drop for TxQueue {
    fn drop(&mut self) {
        if !self.stopped.load(Ordering::Acquire) {
            // The device may still read these buffers: leak them rather than reuse them.
            for p in self.inflight.iter_mut().filter_map(Option::take) {
                std::mem::forget(p);
            }
        }
        // Otherwise dropping `inflight` returns every packet to its pool.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctrl::ControlParams;
    use crate::dma::DmaArena;
    use crate::layout::features as f;
    use crate::ring::fake::FakeDevice;
    use std::time::Duration;

    const RING: u16 = 16;

    /// A receive queue (and optionally its transmit half) over an in-process fake device.
    struct Rig {
        rx: RxQueue,
        tx: TxQueue,
        rx_dev: FakeDevice,
        tx_dev: FakeDevice,
        pool: Mempool,
        stats: Arc<PairStats>,
        stopped: Stopped,
    }

    fn control(features: u64) -> Control {
        Control::new(
            ControlParams {
                device: "fake".into(),
                features,
                virtio_user: true,
                timeout: Duration::from_millis(10),
                pairs: 1,
                active_pairs: 1,
            },
            None,
        )
    }

    fn rig_with(headroom: u16, mtu: u16, features: u64) -> Rig {
        let arena = Arc::new(DmaArena::new(4 << 20, false).unwrap());
        let pool = Mempool::new(arena.clone(), 64, 2048 + headroom as u32, headroom).unwrap();
        let stats = Arc::new(PairStats::default());
        let stopped: Stopped = Arc::new(AtomicBool::new(false));
        let rx_ring = DriverRing::new(&arena, RING, Default::default()).unwrap();
        let tx_ring = DriverRing::new(&arena, RING, Default::default()).unwrap();
        let (rx_dev, tx_dev) = (FakeDevice::new(&rx_ring), FakeDevice::new(&tx_ring));
        let ctl = control(features);
        let mut rx = RxQueue::new(rx_ring, pool.clone(), stats.clone(), 64, stopped.clone(), ctl, mtu);
        rx.refill();
        let tx = TxQueue::new(tx_ring, pool.clone(), stats.clone(), stopped.clone());
        Rig { rx, tx, rx_dev, tx_dev, pool, stats, stopped }
    }

    fn rig() -> Rig {
        rig_with(256, 1500, 0)
    }

    impl Rig {
        /// The device delivers `frame` with header `hdr` into the next posted buffer.
        fn deliver_with(&mut self, hdr: [u8; NET_HDR_LEN], frame: &[u8]) {
            let (head, chain) = self.rx_dev.pop_avail().expect("a posted receive buffer");
            let d = chain[0];
            assert!(d.len as usize >= NET_HDR_LEN + frame.len());
            self.rx_dev.write(d.addr, &hdr);
            self.rx_dev.write(d.addr + NET_HDR_LEN as u64, frame);
            self.rx_dev.push_used(head as u32, (NET_HDR_LEN + frame.len()) as u32);
        }
        fn deliver(&mut self, frame: &[u8]) {
            self.deliver_with([0; NET_HDR_LEN], frame)
        }
        /// Frames the device took from the transmit ring: (header, frame).
        fn transmitted(&mut self) -> Vec<(Vec<u8>, Vec<u8>)> {
            let mut v = Vec::new();
            while let Some((head, chain)) = self.tx_dev.pop_avail() {
                let b = self.tx_dev.read(chain[0].addr, chain[0].len as usize);
                v.push((b[..NET_HDR_LEN].to_vec(), b[NET_HDR_LEN..].to_vec()));
                self.tx_dev.push_used(head as u32, 0);
            }
            v
        }
        fn snapshot(&self) -> QueueStatsSnapshot {
            self.stats.snapshot()
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            // The "device" is gone: posted buffers may come back.
            self.stopped.store(true, Ordering::Release);
        }
    }

    fn frame(tag: u8, len: usize) -> Vec<u8> {
        let mut f: Vec<u8> = (0..len).map(|i| i as u8 ^ 0x5a).collect();
        f[0] = tag;
        f
    }

    /// The program of the verdict tests: the first byte picks the verdict; Tx frames
    /// grow a 4-byte tag at the head and lose 2 bytes at the tail, Redirect frames lose
    /// 2 bytes at the head and grow 3 at the tail.
    fn by_first_byte(p: &mut Packet) -> XdpVerdict {
        match p.data()[0] {
            0 => XdpVerdict::Pass,
            1 => XdpVerdict::Drop,
            2 => {
                p.push_head(4).unwrap().copy_from_slice(&[0xaa, 0xbb, 0xcc, 0xdd]);
                p.trim_tail(2).unwrap();
                XdpVerdict::Tx
            }
            3 => {
                p.pull_head(2).unwrap();
                p.push_tail(3).unwrap().copy_from_slice(&[7, 8, 9]);
                XdpVerdict::Redirect(1)
            }
            _ => XdpVerdict::Redirect(XDP_TARGETS as u16),
        }
    }

    #[test]
    fn every_verdict_does_what_it_says_with_head_and_tail_adjusted() {
        let mut r = rig();
        let full = r.pool.capacity();
        r.rx.attach_xdp(Box::new(by_first_byte)).unwrap();
        let frames: Vec<Vec<u8>> = (0..5u8).map(|t| frame(t, 60 + t as usize * 100)).collect();
        for fr in &frames {
            r.deliver(fr);
        }
        let mut batch = Vec::with_capacity(32);
        // Two bursts: the first ends on a line of descriptors (4 of 5, see
        // `DriverRing::line_aligned`), the second takes the last one.
        let got = r.rx.rx_burst(&mut batch, 32) + r.rx.rx_burst(&mut batch, 32);
        assert_eq!(got, 1, "only the Pass frame is delivered");
        assert_eq!(batch[0].data(), &frames[0][..]);

        let out = r.rx.xdp_out();
        assert_eq!(out.tx.len(), 1);
        let mut want_tx = vec![0xaa, 0xbb, 0xcc, 0xdd];
        want_tx.extend_from_slice(&frames[2][..frames[2].len() - 2]);
        assert_eq!(out.tx[0].data(), &want_tx[..]);
        assert_eq!(out.redirect[1].len(), 1);
        let mut want_redir = frames[3][2..].to_vec();
        want_redir.extend_from_slice(&[7, 8, 9]);
        assert_eq!(out.redirect[1][0].data(), &want_redir[..]);
        assert_eq!(out.len(), 2);

        let s = r.snapshot();
        assert_eq!((s.xdp_pass, s.xdp_drop, s.xdp_tx, s.xdp_redirect, s.xdp_aborted), (1, 1, 1, 1, 1));
        assert_eq!(s.rx_packets, 5, "every frame received counts once");
        assert_eq!(s.rx_bytes, frames.iter().map(|f| f.len() as u64).sum::<u64>());
        // Drop and the aborted redirect went straight back: the ring is full again and
        // only the three packets held by the test are out of the pool.
        assert_eq!(r.rx.in_flight(), RING);
        assert_eq!(r.pool.available(), full - RING as u32 - 3);

        // The Tx packet goes out on the pair's transmit half without a copy, with a clean
        // virtio-net header in the headroom the program left.
        let n = r.tx.tx_burst(&mut r.rx.xdp_out().tx);
        assert_eq!(n, 1);
        let sent = r.transmitted();
        assert_eq!(sent, vec![(vec![0; NET_HDR_LEN], want_tx.clone())]);
        assert_eq!(r.snapshot().tx_copied, 0);
        r.tx.reclaim();
        drop(batch);
        r.rx.xdp_out().clear();
        assert_eq!(r.pool.available(), full - RING as u32, "no buffer lost");
    }

    /// A received frame sent back out carries an all-zero virtio-net header whatever the
    /// device wrote into the header slot (offload flags, `num_buffers` 1), and one whose
    /// slot is already zero goes out unchanged: the transmit path rewrites a header only
    /// when it must, never leaves a stale one.
    #[test]
    fn forwarded_frames_go_out_with_a_zero_header() {
        let mut r = rig();
        let dirty = [1u8, 3, 14, 0, 0xb4, 5, 34, 0, 16, 0, 1, 0];
        let frames: Vec<Vec<u8>> = (0..6u8).map(|t| frame(t, 60 + t as usize)).collect();
        for (k, fr) in frames.iter().enumerate() {
            r.deliver_with(if k % 2 == 0 { dirty } else { [0; NET_HDR_LEN] }, fr);
        }
        let mut batch = Vec::with_capacity(32);
        // Two bursts (4 and 2: the first ends on a line of descriptors).
        assert_eq!(r.rx.rx_burst(&mut batch, 32), 4);
        assert_eq!(r.rx.rx_burst(&mut batch, 32), 2);
        assert_eq!(r.tx.tx_burst(&mut batch), 6);
        let sent = r.transmitted();
        assert_eq!(sent.len(), 6);
        for (fr, (hdr, got)) in frames.iter().zip(&sent) {
            assert_eq!(hdr, &vec![0u8; NET_HDR_LEN]);
            assert_eq!(got, fr);
        }
    }

    #[test]
    fn rx_burst_xdp_bounces_tx_packets_on_the_same_thread() {
        let mut r = rig();
        r.rx.attach_xdp(Box::new(|p: &mut Packet| {
            let d = p.data_mut();
            let (a, b) = d[..12].split_at_mut(6);
            a.swap_with_slice(b);
            XdpVerdict::Tx
        }))
        .unwrap();
        let frames: Vec<Vec<u8>> = (0..8u8).map(|t| frame(t, 64 + t as usize)).collect();
        for fr in &frames {
            r.deliver(fr);
        }
        let mut batch = Vec::with_capacity(32);
        assert_eq!(r.rx.rx_burst_xdp(&mut batch, 32, &mut r.tx), 0);
        let sent = r.transmitted();
        assert_eq!(sent.len(), 8);
        for (fr, (_, got)) in frames.iter().zip(&sent) {
            let mut want = fr.clone();
            let (a, b) = want[..12].split_at_mut(6);
            a.swap_with_slice(b);
            assert_eq!(got, &want);
        }
        assert!(r.rx.xdp_out().is_empty());
        assert_eq!(r.snapshot().xdp_tx, 8);
    }

    #[test]
    fn a_full_output_vector_drops_and_counts() {
        let mut r = rig();
        r.rx.attach_xdp(Box::new(|_: &mut Packet| XdpVerdict::Tx)).unwrap();
        let mut batch = Vec::with_capacity(32);
        for _ in 0..2 {
            for i in 0..RING {
                r.deliver(&frame(i as u8, 60));
            }
            r.rx.rx_burst(&mut batch, 64);
        }
        let s = r.snapshot();
        assert_eq!((s.xdp_tx, s.xdp_aborted), (RING as u64, RING as u64));
        assert_eq!(r.rx.xdp_out().tx.len(), RING as usize);
        assert_eq!(r.rx.xdp_out().tx.capacity(), RING as usize, "never grown");
    }

    #[test]
    fn super_frames_are_not_shown_to_a_program_but_are_described_without_one() {
        let mut r = rig();
        let mut hdr = [0u8; NET_HDR_LEN];
        hdr[net_hdr::FLAGS] = net_hdr::F_NEEDS_CSUM;
        hdr[net_hdr::GSO_TYPE] = net_hdr::GSO_TCPV4;
        hdr[net_hdr::HDR_LEN..net_hdr::HDR_LEN + 2].copy_from_slice(&54u16.to_le_bytes());
        hdr[net_hdr::GSO_SIZE..net_hdr::GSO_SIZE + 2].copy_from_slice(&1448u16.to_le_bytes());
        hdr[net_hdr::CSUM_START..net_hdr::CSUM_START + 2].copy_from_slice(&34u16.to_le_bytes());
        hdr[net_hdr::CSUM_OFFSET..net_hdr::CSUM_OFFSET + 2].copy_from_slice(&16u16.to_le_bytes());
        r.deliver_with(hdr, &frame(0, 1000));
        r.deliver(&frame(0, 100));
        let (mut batch, mut meta) = (Vec::with_capacity(8), Vec::with_capacity(8));
        assert_eq!(r.rx.rx_burst_meta(&mut batch, &mut meta, 8), 2);
        let want = RxMeta {
            flags: net_hdr::F_NEEDS_CSUM,
            gso_type: net_hdr::GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        assert_eq!(meta, vec![want, RxMeta::default()]);
        assert!(meta[0].is_gso() && meta[0].needs_csum() && !meta[1].is_gso());
        drop(batch);

        let seen = Arc::new(AtomicU64::new(0));
        let s2 = seen.clone();
        r.rx.attach_xdp(Box::new(move |_: &mut Packet| {
            s2.fetch_add(1, Ordering::Relaxed);
            XdpVerdict::Pass
        }))
        .unwrap();
        r.deliver_with(hdr, &frame(0, 1000));
        r.deliver(&frame(0, 100));
        let mut batch = Vec::with_capacity(8);
        assert_eq!(r.rx.rx_burst(&mut batch, 8), 1);
        assert_eq!(seen.load(Ordering::Relaxed), 1, "the program saw the single frame only");
        assert_eq!((r.snapshot().xdp_pass, r.snapshot().xdp_aborted), (1, 1));
    }

    #[test]
    fn attach_checks_geometry_and_offloads() {
        // Headroom below XDP's 256 bytes.
        let mut r = rig_with(128, 1500, 0);
        let e = r.rx.attach_xdp(Box::new(|_: &mut Packet| XdpVerdict::Pass)).unwrap_err();
        assert!(matches!(e, Error::XdpGeometry { headroom: 128, need: 256, .. }), "{e}");
        // A 9000-byte MTU in 2 KiB buffers.
        let mut r = rig_with(256, 9000, 0);
        let e = r.rx.attach_xdp(Box::new(|_: &mut Packet| XdpVerdict::Pass)).unwrap_err();
        assert!(matches!(e, Error::XdpGeometry { mtu: 9000, .. }), "{e}");
        assert!(e.to_string().contains("MTU 9000"), "{e}");
        // Guest TSO on and no way to switch it off.
        let feats = f::bit(f::NET_GUEST_CSUM) | f::bit(f::NET_GUEST_TSO4);
        let mut r = rig_with(256, 1500, feats);
        let e = r.rx.attach_xdp(Box::new(|_: &mut Packet| XdpVerdict::Pass)).unwrap_err();
        assert!(matches!(e, Error::XdpOffloads { .. }), "{e}");
        assert!(!r.rx.xdp_attached());
        // Checksum offload alone is fine (frames stay whole).
        let mut r = rig_with(256, 1500, f::bit(f::NET_GUEST_CSUM));
        r.rx.attach_xdp(Box::new(|_: &mut Packet| XdpVerdict::Pass)).unwrap();
        assert!(r.rx.xdp_attached());
        r.rx.detach_xdp().unwrap();
        assert!(!r.rx.xdp_attached());
        r.rx.detach_xdp().unwrap(); // nothing attached: nothing to do
    }

    #[test]
    fn detach_delivers_everything_again() {
        let mut r = rig();
        r.rx.attach_xdp(Box::new(|_: &mut Packet| XdpVerdict::Drop)).unwrap();
        r.deliver(&frame(0, 60));
        let mut batch = Vec::with_capacity(8);
        assert_eq!(r.rx.rx_burst(&mut batch, 8), 0);
        r.rx.detach_xdp().unwrap();
        r.deliver(&frame(0, 61));
        assert_eq!(r.rx.rx_burst(&mut batch, 8), 1);
        let s = r.snapshot();
        assert_eq!((s.rx_packets, s.xdp_drop, s.xdp_pass), (2, 1, 0));
    }
}
