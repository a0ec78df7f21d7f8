//! The `tap` port's burst: a device's transmit queue written to a kernel tap interface,
//! and what the kernel sends to the tap read into the device's receive queue.
//!
//! Owns: per queue pair, one path holding both rings of the pair and one tap queue
//! ([`TapState`]): guest → kernel, a burst's transmit chains go in one batch of writes
//! (`crate::tap::batch`: one `io_uring_enter`, or one `write` each without io_uring),
//! each frame the guest's virtio-net header, checked against what the guest negotiated
//! and copied out of guest memory first, then the frame (a small one copied beside the
//! header, a larger one as iovecs straight into guest memory); kernel → guest, while
//! each receive chain can take any frame the kernel may send, a batch of reads, one
//! straight into each chain (`tap_rx_batch`); otherwise one `readv` per frame over as many
//! receive chains as a largest frame needs (mergeable buffers), or into the path's
//! staging buffer and from there into the receive chains with `mrg` (`offload::deliver`),
//! the rest waiting in the staging buffer for more buffers. Both directions are bounded
//! per burst ([`BURST`] frames).
//! The kernel's offloads towards the guest follow the guest's negotiated `GUEST_*`
//! offloads (`TUNSETOFFLOAD`, set when the rings are taken).
//! Must not: bring the interface up or down or change anything else about it
//! (`crate::tap`), or change device state other than through `QueueSlot::fail`.
//!
//! System calls: one per transmit burst and one per receive batch (io_uring: the tap
//! character device moves one frame per `read`/`write`), one per received frame that
//! needs several chains or staging, none per frame otherwise. A transmit
//! frame the kernel would block on (`EAGAIN`, `ENOBUFS`) stays in the ring
//! (backpressure) unless a later frame of its batch went through, which overtook it: then
//! it is dropped as `kernel_refused`, as is a frame of any other write error. A frame with a
//! checksum or segmentation request that the kernel took counts as `csum_requests` or
//! `gso_requests` and `passed_whole` in the pair's `offloads` (the kernel does the work).

use std::io;
use std::time::{Duration, Instant};

use spec::layout::features::{self as f, bit};
use spec::layout::{net_hdr, NET_HDR_LEN, NET_HDR_NUM_BUFFERS};

use super::mrg::{self, MAX_BUFFERS};
use super::offload::{self, MAX_SUPER_FRAME};
use super::{PathKind, PortPath, Side, BURST, ETH_HLEN, FILTER_BYTES};
use crate::ctrl::RxConfig;
use crate::memory::GuestMemory;
use crate::ring::Ring;
use crate::split_ring::{copy_chain, gather, scatter, Chain, Dir, RingFault};
use crate::stats::{BurstCounts, DropReason, OffloadCounts, OffloadEvent};
use crate::tap::batch::{self, Batch};
use crate::tap::{Offloads, TapQueue};

/// How often frames are drained from a tap whose receive queue does not run (not every
/// loop: a worker busy with other paths would pay a system call per loop).
const DRAIN_EVERY: Duration = Duration::from_millis(1);

/// Most iovec entries one `readv`/`writev` takes (Linux's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// Room for `IOV_MAX` iovecs, kept across bursts.
struct Iov(Box<[libc::iovec]>);

// SAFETY: the pointers an `Iov` holds are written by the burst that builds the vector
// and passed to the kernel in that burst only; what a previous burst left is never read
// (every use rebuilds the entries it passes). Moving the storage to a worker is harmless.
unsafe impl Send for Iov {}

impl Iov {
    fn new() -> Iov {
        Iov(vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; IOV_MAX].into_boxed_slice())
    }
}

/// One tap queue and the path's state for it.
pub(crate) struct TapState {
    tap: TapQueue,
    /// The transmit burst's writes, then the receive burst's reads.
    io: Batch,
    /// Reads the next receive batch queues: twice what the last one found, so an idle
    /// tap costs one read per poll and a busy one a whole burst per system call.
    rx_want: u16,
    iov: Iov,
    /// A frame read from the kernel that did not go straight into receive buffers:
    /// header and frame, `staged` bytes of it waiting for receive buffers.
    staging: Box<[u8]>,
    staged: Option<usize>,
    /// The largest header plus frame the kernel may send now (with `TUNSETOFFLOAD`'s
    /// TSO on, a super-frame).
    max_rx: usize,
    /// The guest negotiated mergeable receive buffers.
    mrg: bool,
    /// A failed `TUNSETOFFLOAD` or read was logged already.
    warned: bool,
    /// The last receive burst stopped for want of receive buffers, with a frame staged
    /// or (maybe) more in the kernel's queue: the guest's refill is work for the path.
    pub(super) rx_waiting: bool,
    /// When frames were last drained while the receive queue does not run.
    last_drain: Option<Instant>,
}

impl TapState {
    /// `batched`: write a burst in one system call (io_uring) if the kernel allows.
    pub fn new(tap: TapQueue, max_frame: u64, batched: bool) -> TapState {
        let io = Batch::new(tap.raw_fd(), BURST as usize, IOV_MAX, batched);
        match io.per_frame_reason() {
            None => log::debug!("tap {}: bursts in one io_uring_enter each", tap.name()),
            Some(why) => log::info!("tap {}: one system call per frame ({why})", tap.name()),
        }
        TapState {
            tap,
            io,
            rx_want: 1,
            iov: Iov::new(),
            // One byte more than any frame: a read that fills it was cut short.
            staging: vec![0u8; NET_HDR_LEN + MAX_SUPER_FRAME + 1].into_boxed_slice(),
            staged: None,
            max_rx: NET_HDR_LEN + max_frame as usize,
            mrg: false,
            warned: false,
            rx_waiting: false,
            last_drain: None,
        }
    }

    /// The tap descriptor (the worker also sleeps on it).
    pub fn raw_fd(&self) -> i32 {
        self.tap.raw_fd()
    }

    /// The rings were (re)taken; `rx`: the receive queue's configuration, if it runs.
    /// A multi-queue tap's queue is attached to the kernel's steering only while the
    /// receive queue runs; the kernel may send what the guest takes now (partial
    /// checksums, TCP super-frames), no more.
    pub fn configure(&mut self, rx: Option<&RxConfig>, max_frame: u64) {
        if let Err(e) = self.tap.set_enabled(rx.is_some()) {
            if !self.warned {
                log::warn!("tap {}: TUNSETQUEUE: {e}", self.tap.name());
                self.warned = true;
            }
        }
        let Some(rx) = rx else { return };
        let o = Offloads { csum: rx.csum(), tso4: rx.tso4(), tso6: rx.tso6() };
        if let Err(e) = self.tap.set_offloads(o) {
            if !self.warned {
                log::warn!(
                    "tap {}: TUNSETOFFLOAD: {e}; the kernel keeps its previous offloads",
                    self.tap.name()
                );
                self.warned = true;
            }
        }
        self.mrg = rx.mrg_rxbuf;
        let frame = if o.gso() { MAX_SUPER_FRAME } else { max_frame as usize };
        self.max_rx = NET_HDR_LEN + frame;
    }
}

/// What the offload bits of a guest's header need negotiated, or why it is refused.
pub(super) fn tx_header_ok(hdr: &[u8; NET_HDR_LEN], features: u64) -> Result<bool, DropReason> {
    let mut need = 0;
    if hdr[net_hdr::FLAGS] & net_hdr::F_NEEDS_CSUM != 0 {
        need |= bit(f::NET_CSUM);
    }
    let gso = hdr[net_hdr::GSO_TYPE];
    match gso & !net_hdr::GSO_ECN {
        net_hdr::GSO_NONE => {}
        net_hdr::GSO_TCPV4 => need |= bit(f::NET_HOST_TSO4),
        net_hdr::GSO_TCPV6 => need |= bit(f::NET_HOST_TSO6),
        net_hdr::GSO_UDP_L4 => need |= bit(f::NET_HOST_USO),
        _ => return Err(DropReason::BadGso),
    }
    if gso & net_hdr::GSO_ECN != 0 {
        need |= bit(f::NET_HOST_ECN);
    }
    if features & need != need {
        return Err(DropReason::OffloadNotNegotiated);
    }
    Ok(gso != net_hdr::GSO_NONE)
}

/// Appends `chain`'s bytes from `off` on to `iov` (from entry `n`); returns the new
/// count, or `None` if they do not fit [`IOV_MAX`].
fn push_iov(iov: &mut [libc::iovec], mut n: usize, chain: &Chain<'_>, mut off: usize) -> Option<usize> {
    for s in chain.segs() {
        let len = s.len as usize;
        if off >= len {
            off -= len;
            continue;
        }
        let e = iov.get_mut(n)?;
        // SAFETY: `off < len`: the address stays inside the segment's buffer.
        e.iov_base = unsafe { s.ptr.add(off) } as *mut libc::c_void;
        e.iov_len = len - off;
        off = 0;
        n += 1;
    }
    Some(n)
}

/// What a receive batch did.
#[derive(Clone, Copy)]
enum RxBatch {
    /// The next receive chain cannot take every frame the kernel may send: nothing read.
    Unsuited,
    /// No receive chain is available: nothing read.
    NoBuffer,
    /// `frames` frames read (delivered or dropped); `empty`: a read found nothing, so the
    /// kernel had no more.
    Read { frames: u16, empty: bool },
}

/// What a walked transmit chain became in a burst.
#[derive(Clone, Copy)]
enum Tx {
    /// Refused before the kernel saw it.
    Drop(DropReason),
    /// Queued in the batch: its frame length and the offload its header requests.
    Write { len: u32, ev: Option<OffloadEvent> },
}

/// What a batched write's result `r` means for its frame, the `k`th written of a batch
/// whose last written frame that went through is `last_ok`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// The kernel took it.
    Sent,
    /// The kernel would block and nothing after it went through: it stays in the ring,
    /// with every frame after it (backpressure, order kept).
    Stays,
    /// Refused: an error, or a would-block that a later frame of the batch overtook (the
    /// writes are independent); dropped as `kernel_refused`.
    Refused,
}

fn fate(r: i32, k: usize, last_ok: Option<usize>) -> Fate {
    if r >= 0 {
        Fate::Sent
    } else if batch::would_block(r) && !last_ok.is_some_and(|l| k < l) {
        Fate::Stays
    } else {
        Fate::Refused
    }
}

/// The offload a (checked) header requests of the kernel, if any.
fn offload_event(hdr: &[u8; NET_HDR_LEN]) -> Option<OffloadEvent> {
    if hdr[net_hdr::GSO_TYPE] != net_hdr::GSO_NONE {
        Some(OffloadEvent::GsoRequests)
    } else if hdr[net_hdr::FLAGS] & net_hdr::F_NEEDS_CSUM != 0 {
        Some(OffloadEvent::CsumRequests)
    } else {
        None
    }
}

fn would_block(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::ENOBUFS))
}

impl PortPath {
    /// One burst each way; a bad descriptor on one side does not stop the other.
    #[inline(always)]
    pub(super) fn run_tap<R: Ring>(&mut self) -> Result<usize, (Side, RingFault)> {
        let tx = self.tap_tx::<R>();
        let rx = self.tap_rx::<R>();
        match (tx, rx) {
            (Ok(a), Ok(b)) => Ok(a + b),
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    }

    /// Guest → kernel: up to [`BURST`] transmit chains, written in one batch
    /// (`crate::tap::batch`).
    fn tap_tx<S: Ring>(&mut self) -> Result<usize, (Side, RingFault)> {
        let max_frame = self.max_frame;
        let PathKind::Tap(t) = &mut self.kind else { return Ok(0) };
        let Some(src) = self.src.as_mut() else { return Ok(0) };
        let pair = src.pair();
        let dev = src.dev.clone();
        let Some((ring, mem, rx)) = src.ring_rx::<S>() else { return Ok(0) };
        let features = rx.features;
        let offloads = features & offload::HOST_OFFLOADS != 0;
        let n = ring.poll_avail().map_err(|b| (Side::Src, b))?.min(BURST);
        if n == 0 {
            return Ok(0);
        }
        let chain = self.src_chain.chain(mem);
        let mut c = BurstCounts::default();
        let mut oc = OffloadCounts::default();
        let mut failed = None;
        // What each walked chain became, in ring order.
        let mut walked: [Option<(S::Head, Tx)>; BURST as usize] = [None; BURST as usize];
        let mut w = 0;
        let mut hdr = [0u8; NET_HDR_LEN];
        for i in 0..n {
            let head = match ring.walk_avail(mem, i, Dir::DeviceReads, chain) {
                Ok(h) => h,
                Err(b) => {
                    failed = Some((Side::Src, b));
                    break;
                }
            };
            let verdict = if chain.truncated {
                Err(DropReason::TooManySegments)
            } else if chain.total < (NET_HDR_LEN as u64 + ETH_HLEN) {
                Err(DropReason::ShortFrame)
            } else {
                // The header is copied out of guest memory: the kernel reads this copy,
                // which the guest cannot change under it.
                gather(chain, 0, &mut hdr);
                hdr[NET_HDR_NUM_BUFFERS..].fill(0);
                let gso = if offloads {
                    tx_header_ok(&hdr, features)
                } else {
                    // A driver without host offloads has its header ignored (as on the
                    // forwarding ports).
                    hdr.fill(0);
                    Ok(false)
                };
                let len = chain.total - NET_HDR_LEN as u64;
                gso.and_then(|gso| {
                    let limit = if gso { MAX_SUPER_FRAME as u64 } else { max_frame };
                    if len > limit {
                        Err(DropReason::Oversize)
                    } else {
                        Ok(len as usize)
                    }
                })
            };
            let tx = match verdict {
                Err(why) => Tx::Drop(why),
                Ok(len) if NET_HDR_LEN + len <= batch::SLOT => {
                    // Small: header and frame copied into a slot, one buffer.
                    let Some(slot) = t.io.slot() else { break };
                    slot[..NET_HDR_LEN].copy_from_slice(&hdr);
                    gather(chain, NET_HDR_LEN, &mut slot[NET_HDR_LEN..NET_HDR_LEN + len]);
                    t.io.queue_copy(NET_HDR_LEN + len);
                    Tx::Write { len: len as u32, ev: offload_event(&hdr) }
                }
                Ok(len) => match push_iov(t.io.iov_room(), 0, chain, NET_HDR_LEN) {
                    Some(cnt) => {
                        // SAFETY: the entries lie inside the chain's buffers, inside the
                        // guest memory `mem` keeps mapped for this burst, which outlasts
                        // the `submit` below; the kernel only reads them.
                        unsafe { t.io.queue_iov(hdr, cnt) };
                        Tx::Write { len: len as u32, ev: offload_event(&hdr) }
                    }
                    None if t.io.len() == 0 => Tx::Drop(DropReason::TooManySegments),
                    None => break, // no iovec room left: the chain waits for the next burst
                },
            };
            walked[w] = Some((head, tx));
            w += 1;
        }
        let res = t.io.submit();
        let last_ok = res.iter().rposition(|&r| r >= 0);
        let mut k = 0;
        let mut done = 0u16;
        for &(head, tx) in walked[..w].iter().flatten() {
            match tx {
                Tx::Drop(why) => c.drop(why),
                Tx::Write { len, ev } => {
                    match fate(res[k], k, last_ok) {
                        Fate::Sent => {
                            c.rx_packets += 1;
                            c.rx_bytes += len as u64;
                            if let Some(ev) = ev {
                                oc.add(ev, 1);
                                oc.add(OffloadEvent::PassedWhole, 1);
                            }
                        }
                        Fate::Stays => break,
                        Fate::Refused => {
                            let e = io::Error::from_raw_os_error(-res[k]);
                            log::debug!("tap {}: write: {e}", t.tap.name());
                            c.drop(DropReason::KernelRefused);
                        }
                    }
                    k += 1;
                }
            }
            ring.add_used(head, 0);
            done += 1;
        }
        ring.consume(done);
        ring.publish_used();
        dev.stats[pair].flush_rx(&c);
        dev.stats[pair].flush_offloads(&oc);
        match failed {
            Some(f) => Err(f),
            None => Ok(done as usize),
        }
    }

    /// Kernel → guest: up to [`BURST`] frames, in batches of reads where the receive
    /// chains allow (see the module comment).
    fn tap_rx<D: Ring>(&mut self) -> Result<usize, (Side, RingFault)> {
        let PathKind::Tap(t) = &mut self.kind else { return Ok(0) };
        let Some(dst) = self.dst.as_mut() else { return Ok(0) };
        let pair = dst.pair();
        let dev = dst.dev.clone();
        let mut c = BurstCounts::default();
        let Some((dr, dmem, rx)) = dst.ring_rx::<D>() else {
            // No receive queue: what the kernel sends is read and dropped, as a NIC
            // without buffers drops (the kernel's queue would hold it stale otherwise),
            // at most every `DRAIN_EVERY`; a detached queue gets nothing.
            if !t.tap.steered() || t.last_drain.is_some_and(|l| l.elapsed() < DRAIN_EVERY) {
                return Ok(0);
            }
            t.last_drain = Some(Instant::now());
            let n = Self::tap_drain(t);
            c.drops[DropReason::NoBuffer as usize] += n;
            dev.stats[pair].flush_tx(&c);
            return Ok(0);
        };
        let filter = Some(rx).filter(|rx| !rx.pass_all());
        let res = Self::tap_rx_burst(t, dr, dmem, filter, &mut self.dst_chain, &mut self.mrg_chain, &mut c);
        dev.stats[pair].flush_tx(&c);
        res.map_err(|b| (Side::Dst, b))
    }

    /// Reads and drops up to [`BURST`] frames (and a staged one); returns how many.
    #[cold]
    fn tap_drain(t: &mut TapState) -> u64 {
        let mut n = t.staged.take().map_or(0, |_| 1);
        for _ in 0..BURST {
            let iov = [libc::iovec {
                iov_base: t.staging.as_mut_ptr() as *mut libc::c_void,
                iov_len: t.staging.len(),
            }];
            // SAFETY: the one entry is the staging buffer, owned by `t` and not borrowed.
            match unsafe { t.tap.readv(&iov) } {
                Ok(_) => n += 1,
                Err(_) => break,
            }
        }
        n
    }

    #[allow(clippy::too_many_arguments, reason = "the burst's receive side, borrowed piece by piece")]
    fn tap_rx_burst<D: Ring>(
        t: &mut TapState,
        dr: &mut D,
        dmem: &GuestMemory,
        filter: Option<&RxConfig>,
        first_buf: &mut crate::split_ring::ChainBuf,
        more_buf: &mut crate::split_ring::ChainBuf,
        c: &mut BurstCounts,
    ) -> Result<usize, RingFault> {
        t.rx_waiting = false;
        let mut nrx = dr.poll_avail_max(BURST)?;
        let mut rx_done = 0u16;
        let first = first_buf.chain(dmem);
        let mut frames = 0u16;
        let mut res = Ok(());
        while frames < BURST {
            // A staged frame goes first; while it waits, nothing more is read (order).
            if let Some(n) = t.staged {
                let mut hdr = [0u8; NET_HDR_LEN];
                hdr.copy_from_slice(&t.staging[..NET_HDR_LEN]);
                let bytes = &t.staging[NET_HDR_LEN..n];
                let placed =
                    match offload::deliver(dr, dmem, &mut nrx, rx_done, first, more_buf, t.mrg, hdr, bytes) {
                        Ok(p) => p,
                        Err(b) => {
                            res = Err(b);
                            break;
                        }
                    };
                match placed {
                    mrg::Placed::Done(k) => {
                        rx_done += k;
                        c.tx_packets += 1;
                        c.tx_bytes += bytes.len() as u64;
                    }
                    mrg::Placed::Wait => {
                        t.rx_waiting = true;
                        break;
                    }
                    mrg::Placed::NoFit => c.drop(DropReason::RxBufferTooSmall),
                    mrg::Placed::RingTooSmall => c.drop(DropReason::RxRingTooSmall),
                }
                t.staged = None;
                frames += 1;
                continue;
            }
            // Frames that fit one receive chain each: a batch of reads.
            let (got, fault) = Self::tap_rx_batch(
                t,
                dr,
                dmem,
                filter,
                (&mut *first, &mut *more_buf),
                (&mut nrx, &mut rx_done),
                BURST - frames,
                c,
            );
            if let Some(b) = fault {
                if let RxBatch::Read { frames: f, .. } = got {
                    frames += f;
                }
                res = Err(b);
                break;
            }
            match got {
                RxBatch::Read { frames: f, empty } => {
                    frames += f;
                    if empty {
                        break;
                    }
                    continue;
                }
                RxBatch::NoBuffer => {
                    // No receive buffer: the frames wait in the kernel's queue.
                    t.rx_waiting = true;
                    break;
                }
                // The next chain cannot take every frame the kernel may send: one read
                // over several chains, or into the staging buffer (below).
                RxBatch::Unsuited => {}
            }
            if rx_done >= nrx {
                nrx = match dr.poll_more() {
                    Ok(n) => n,
                    Err(b) => {
                        res = Err(b);
                        break;
                    }
                };
                if rx_done >= nrx {
                    // No receive buffer: the frames wait in the kernel's queue.
                    t.rx_waiting = true;
                    break;
                }
            }
            // Receive chains for the largest frame the kernel may send: the first one,
            // then (mergeable buffers) as many more as it takes.
            let head = match dr.walk_avail(dmem, rx_done, Dir::DeviceWrites, first) {
                Ok(h) => h,
                Err(b) => {
                    res = Err(b);
                    break;
                }
            };
            let mut cap = mrg::capacity(first) as usize;
            let mut cnt = push_iov(&mut t.iov.0, 0, first, 0);
            let mut end = rx_done + 1;
            if t.mrg {
                let more = more_buf.chain(dmem);
                while cap <= t.max_rx && cnt.is_some() && end - rx_done < MAX_BUFFERS {
                    if end >= nrx {
                        nrx = match dr.poll_more() {
                            Ok(n) => n,
                            Err(b) => {
                                res = Err(b);
                                break;
                            }
                        };
                        if end >= nrx {
                            break;
                        }
                    }
                    if let Err(b) = dr.walk_avail(dmem, end, Dir::DeviceWrites, more) {
                        res = Err(b);
                        break;
                    }
                    cap += mrg::capacity(more) as usize;
                    cnt = cnt.and_then(|n| push_iov(&mut t.iov.0, n, more, 0));
                    end += 1;
                }
                if res.is_err() {
                    break;
                }
            }
            let direct = match cnt {
                Some(n)
                    if cap > t.max_rx && mrg::capacity(first) as usize >= NET_HDR_LEN + ETH_HLEN as usize =>
                {
                    n
                }
                _ => 0,
            };
            if direct == 0 {
                // Not enough room for any frame the kernel may send: into the staging
                // buffer, delivered from there (next turn of the loop).
                let iov = [libc::iovec {
                    iov_base: t.staging.as_mut_ptr() as *mut libc::c_void,
                    iov_len: t.staging.len(),
                }];
                // SAFETY: the one entry is the staging buffer, owned by `t`, not borrowed.
                match unsafe { t.tap.readv(&iov) } {
                    Ok(n) if n >= t.staging.len() => c.drop(DropReason::RxBufferTooSmall),
                    Ok(n) if n < NET_HDR_LEN + ETH_HLEN as usize => c.drop(DropReason::ShortFrame),
                    Ok(n) => {
                        if filter.is_some_and(|rx| !rx.accepts(&t.staging[NET_HDR_LEN..n])) {
                            c.drop(DropReason::Filtered);
                        } else {
                            t.staged = Some(n);
                            continue; // not a frame yet: delivered at the loop's top
                        }
                    }
                    Err(e) => {
                        Self::read_error(t, e);
                        break;
                    }
                }
                frames += 1;
                continue;
            }
            // SAFETY: every entry lies inside a walked receive chain's device-writable
            // buffers, inside the guest memory `dmem` keeps mapped for this burst; no Rust
            // reference into them exists.
            let n = match unsafe { t.tap.readv(&t.iov.0[..direct]) } {
                Ok(n) => n,
                Err(e) => {
                    Self::read_error(t, e);
                    break;
                }
            };
            frames += 1;
            if n < NET_HDR_LEN + ETH_HLEN as usize {
                c.drop(DropReason::ShortFrame); // the chains stay available
                continue;
            }
            if n >= cap {
                c.drop(DropReason::RxBufferTooSmall); // cut short: the chains stay available
                continue;
            }
            if filter.is_some_and(|rx| !accepts_chain(rx, first)) {
                c.drop(DropReason::Filtered);
                continue;
            }
            // The bytes went over the chains in order: complete as many as they filled,
            // the first (with the header) first.
            let first_len = (mrg::capacity(first) as usize).min(n);
            dr.add_used(head, first_len as u32);
            let mut left = n - first_len;
            let mut k = 1u16;
            if left > 0 {
                let more = more_buf.chain(dmem);
                while left > 0 {
                    let h = match dr.walk_avail(dmem, rx_done + k, Dir::DeviceWrites, more) {
                        Ok(h) => h,
                        Err(b) => {
                            res = Err(b);
                            break;
                        }
                    };
                    let l = (mrg::capacity(more) as usize).min(left);
                    dr.add_used(h, l as u32);
                    left -= l;
                    k += 1;
                }
                if res.is_err() {
                    break;
                }
            }
            // The kernel wrote the first 10 bytes of the header; `num_buffers` is ours.
            scatter(first, NET_HDR_NUM_BUFFERS, &k.to_le_bytes());
            rx_done += k;
            c.tx_packets += 1;
            c.tx_bytes += (n - NET_HDR_LEN) as u64;
        }
        dr.consume(rx_done);
        dr.publish_used();
        res.map(|()| frames as usize)
    }

    /// Up to `max` frames in one batch of reads (`crate::tap::batch`), each straight
    /// into a receive chain of its own that can take any frame the kernel may send now;
    /// queues at most [`TapState::rx_want`] reads. A read that found nothing leaves its
    /// chain available; so does a frame that is dropped (short, cut short, filtered). A
    /// frame read into a chain after such a one is copied down into the first chain left
    /// available, so chains complete in ring order. Also returns the fault that stopped
    /// the walk or the refill, after delivering what was read.
    #[allow(clippy::too_many_arguments, reason = "the burst's receive side, borrowed piece by piece")]
    fn tap_rx_batch<'m, D: Ring>(
        t: &mut TapState,
        dr: &mut D,
        dmem: &'m GuestMemory,
        filter: Option<&RxConfig>,
        (first, more_buf): (&mut Chain<'m>, &mut crate::split_ring::ChainBuf),
        (nrx, rx_done): (&mut u16, &mut u16),
        max: u16,
        c: &mut BurstCounts,
    ) -> (RxBatch, Option<RingFault>) {
        let want = t.rx_want.min(max) as usize;
        let mut heads: [Option<D::Head>; BURST as usize] = [None; BURST as usize];
        let mut caps = [0usize; BURST as usize];
        // Where each chain's `num_buffers` is, when its first piece holds the whole
        // header (else null: the chain is walked again to write it).
        let mut num_at = [std::ptr::null_mut::<u8>(); BURST as usize];
        let mut fault = None;
        let mut k = 0;
        let mut no_buffer = false;
        while k < want {
            let i = *rx_done + k as u16;
            if i >= *nrx {
                match dr.poll_more() {
                    Ok(n) => *nrx = n,
                    Err(b) => {
                        fault = Some(b);
                        break;
                    }
                }
                if i >= *nrx {
                    no_buffer = true;
                    break;
                }
            }
            let head = match dr.walk_avail(dmem, i, Dir::DeviceWrites, first) {
                Ok(h) => h,
                Err(b) => {
                    fault = Some(b);
                    break;
                }
            };
            let cap = mrg::capacity(first) as usize;
            if cap <= t.max_rx || cap < NET_HDR_LEN + ETH_HLEN as usize {
                break;
            }
            let Some(cnt) = push_iov(t.io.read_room(), 0, first, 0) else { break };
            // SAFETY: the entries lie inside the walked chain's device-writable buffers,
            // inside the guest memory `dmem` keeps mapped for this burst, which outlasts
            // the `submit` below; no Rust reference into them exists.
            unsafe { t.io.queue_read(cnt) };
            heads[k] = Some(head);
            caps[k] = cap;
            if let Some(p) = first.segs().first().filter(|p| p.len as usize >= NET_HDR_LEN) {
                // SAFETY: `NET_HDR_NUM_BUFFERS < NET_HDR_LEN <= p.len`: inside the piece.
                num_at[k] = unsafe { p.ptr.add(NET_HDR_NUM_BUFFERS) };
            }
            k += 1;
        }
        if k == 0 {
            let b = if no_buffer { RxBatch::NoBuffer } else { RxBatch::Unsuited };
            return (b, fault);
        }
        let mut got = [0i32; BURST as usize];
        got[..k].copy_from_slice(t.io.submit());
        let (mut w, mut frames, mut stop) = (0usize, 0u16, false);
        for j in 0..k {
            let r = got[j];
            if r < 0 {
                // Nothing read: the kernel's queue is empty (or the read failed).
                Self::read_error(t, io::Error::from_raw_os_error(-r));
                stop = true;
                continue;
            }
            frames += 1;
            let n = r as usize;
            if n < NET_HDR_LEN + ETH_HLEN as usize {
                c.drop(DropReason::ShortFrame); // the chain stays available
                continue;
            }
            if n >= caps[j] {
                c.drop(DropReason::RxBufferTooSmall); // cut short: the chain stays
                continue;
            }
            if w == j && filter.is_none() && !num_at[j].is_null() {
                // Delivered where it was read: only `num_buffers` to write (the kernel
                // wrote the first 10 bytes of the header), without walking again.
                // SAFETY: `num_at[j]` points at two bytes inside the device-writable
                // first piece of chain `j`, in the guest memory `dmem` keeps mapped for
                // this burst; no Rust reference into it exists.
                unsafe { std::ptr::copy(1u16.to_le_bytes().as_ptr(), num_at[j], 2) };
            } else {
                // The chain holding the frame, walked again (the walks above reused one
                // chain buffer).
                let src = more_buf.chain(dmem);
                if let Err(b) = dr.walk_avail(dmem, *rx_done + j as u16, Dir::DeviceWrites, src) {
                    fault = Some(b);
                    break;
                }
                if filter.is_some_and(|rx| !accepts_chain(rx, src)) {
                    c.drop(DropReason::Filtered);
                    continue;
                }
                let into = if w == j {
                    &*src
                } else {
                    // A chain before it was left available: the frame moves down into it.
                    if let Err(b) = dr.walk_avail(dmem, *rx_done + w as u16, Dir::DeviceWrites, first) {
                        fault = Some(b);
                        break;
                    }
                    copy_chain(src, 0, first, 0, n);
                    &*first
                };
                // The kernel wrote the first 10 bytes of the header; `num_buffers` is ours.
                scatter(into, NET_HDR_NUM_BUFFERS, &1u16.to_le_bytes());
            }
            if let Some(h) = heads[w] {
                dr.add_used(h, n as u32);
            }
            w += 1;
            c.tx_packets += 1;
            c.tx_bytes += (n - NET_HDR_LEN) as u64;
        }
        *rx_done += w as u16;
        let next = if stop { 2 * frames } else { 2 * k as u16 };
        t.rx_want = next.clamp(1, BURST);
        (RxBatch::Read { frames, empty: stop }, fault)
    }

    #[cold]
    fn read_error(t: &mut TapState, e: io::Error) {
        if !would_block(&e) && !t.warned {
            log::warn!("tap {}: read: {e}", t.tap.name());
            t.warned = true;
        }
    }
}

/// Whether the guest's receive filter accepts the frame the kernel read into `chain`
/// (its first bytes after the virtio-net header).
fn accepts_chain(rx: &RxConfig, chain: &Chain<'_>) -> bool {
    let mut h = [0u8; FILTER_BYTES];
    let got = gather(chain, NET_HDR_LEN, &mut h);
    rx.accepts(&h[..got])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(flags: u8, gso: u8) -> [u8; NET_HDR_LEN] {
        let mut h = [0u8; NET_HDR_LEN];
        h[net_hdr::FLAGS] = flags;
        h[net_hdr::GSO_TYPE] = gso;
        h
    }

    #[test]
    fn a_guests_offload_request_needs_its_feature() {
        let csum = bit(f::NET_CSUM);
        let tso4 = csum | bit(f::NET_HOST_TSO4);
        assert_eq!(tx_header_ok(&hdr(0, 0), 0), Ok(false));
        assert_eq!(tx_header_ok(&hdr(net_hdr::F_NEEDS_CSUM, 0), 0), Err(DropReason::OffloadNotNegotiated));
        assert_eq!(tx_header_ok(&hdr(net_hdr::F_NEEDS_CSUM, 0), csum), Ok(false));
        let t4 = hdr(net_hdr::F_NEEDS_CSUM, net_hdr::GSO_TCPV4);
        assert_eq!(tx_header_ok(&t4, csum), Err(DropReason::OffloadNotNegotiated));
        assert_eq!(tx_header_ok(&t4, tso4), Ok(true));
        let t6 = hdr(net_hdr::F_NEEDS_CSUM, net_hdr::GSO_TCPV6);
        assert_eq!(tx_header_ok(&t6, tso4), Err(DropReason::OffloadNotNegotiated));
        let ecn = hdr(net_hdr::F_NEEDS_CSUM, net_hdr::GSO_TCPV4 | net_hdr::GSO_ECN);
        assert_eq!(tx_header_ok(&ecn, tso4), Err(DropReason::OffloadNotNegotiated));
        assert_eq!(tx_header_ok(&hdr(0, 0x42), tso4), Err(DropReason::BadGso));
    }

    #[test]
    fn a_blocked_write_stays_unless_a_later_one_overtook_it() {
        let eagain = -libc::EAGAIN;
        // [ok, EAGAIN, EAGAIN]: the two stay (the first of them breaks the burst).
        assert_eq!(fate(60, 0, Some(0)), Fate::Sent);
        assert_eq!(fate(eagain, 1, Some(0)), Fate::Stays);
        // Nothing went: the first stays.
        assert_eq!(fate(-libc::ENOBUFS, 0, None), Fate::Stays);
        // [EAGAIN, ok]: the second overtook the first, which is refused.
        assert_eq!(fate(eagain, 0, Some(1)), Fate::Refused);
        // Any other error is refused wherever it is.
        assert_eq!(fate(-libc::EIO, 0, None), Fate::Refused);
        assert_eq!(fate(-libc::EINVAL, 2, Some(1)), Fate::Refused);
    }

    #[test]
    fn iovecs_skip_the_header_across_segments() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 100];
        let mut c = Chain::over(&mut a);
        c.push(b.as_mut_ptr(), b.len() as u32);
        let mut iov = Iov::new();
        let n = push_iov(&mut iov.0, 1, &c, NET_HDR_LEN).expect("fits");
        assert_eq!(n, 2);
        assert_eq!(iov.0[1].iov_base as usize, b.as_ptr() as usize + 4);
        assert_eq!(iov.0[1].iov_len, 96);
        assert_eq!(push_iov(&mut iov.0, IOV_MAX, &c, 0), None);
    }
}
