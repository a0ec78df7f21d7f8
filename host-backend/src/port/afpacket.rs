//! The `afpacket` port's burst: a device's transmit queue written into an AF_PACKET
//! socket's mmap'd transmit ring, and what the kernel puts in its receive ring read into
//! the device's receive queue.
//!
//! Owns: per port one path holding both rings of the queue pair and the socket
//! ([`AfpState`]). Guest → kernel: each transmit chain's virtio-net header is copied out
//! and checked as the tap port does (`tap::tx_header_ok`), then header and frame are
//! copied from guest memory into the next free transmit slot; one `send` per burst
//! flushes them (`crate::afpacket`). A full transmit ring leaves the chain in the
//! virtqueue (backpressure). Kernel → guest: each slot the kernel handed over is copied
//! into the path's buffer and given back at once; a frame without an offload request
//! goes to the receive chains with `offload::deliver`, one with a partial checksum or a
//! GSO type through the path's `offload::Staging` (whole to a guest that negotiated the
//! matching `GUEST_*` offload, else checksummed/segmented here). What does not fit the
//! receive queue yet waits in the buffer (order kept).
//! Must not: change the interface, or device state other than through the ring faults
//! it returns.
//!
//! System calls: one `send` per transmit burst that queued frames, none on receive (the
//! ring is read from memory); `PACKET_STATISTICS` at most every [`STATS_EVERY`].

use std::time::{Duration, Instant};

use spec::layout::{net_hdr, NET_HDR_LEN, NET_HDR_NUM_BUFFERS};

use super::mrg::Placed;
use super::offload::{self, Staging, MAX_SUPER_FRAME};
use super::tap::tx_header_ok;
use super::{PathKind, PortPath, Side, BURST, ETH_HLEN};
use crate::afpacket::{AfPacket, VNET_HDR_LEN};
use crate::ring::Ring;
use crate::split_ring::{gather, Chain, Dir, RingFault};
use crate::stats::{BurstCounts, DropReason, OffloadCounts, OffloadEvent};

/// How often frames are drained while the receive queue does not run.
const DRAIN_EVERY: Duration = Duration::from_millis(1);
/// How often the kernel's ring-full drops are read.
const STATS_EVERY: Duration = Duration::from_millis(100);

/// The socket and the path's state for it.
pub(crate) struct AfpState {
    sock: AfPacket,
    /// A received frame: the 12-byte virtio-net header, then the frame.
    buf: Box<[u8]>,
    /// `Some(len)`: a frame without offload request waits in `buf` for receive buffers.
    held: Option<usize>,
    /// Frames with offload requests, staged for whole or segmented delivery.
    staging: Box<Staging>,
    max_frame: u64,
    last_drain: Option<Instant>,
    last_stats: Option<Instant>,
    warned: bool,
}

impl AfpState {
    /// A frame taken from the kernel waits for receive buffers (held, or staged in
    /// part): the guest's refill is work for the path (`PortPath::set_kicks`).
    pub(super) fn rx_waiting(&self) -> bool {
        self.held.is_some() || self.staging.pending()
    }

    pub fn new(sock: AfPacket, max_frame: u64) -> AfpState {
        AfpState {
            sock,
            buf: vec![0u8; NET_HDR_LEN + MAX_SUPER_FRAME].into_boxed_slice(),
            held: None,
            staging: Box::new(Staging::new(max_frame as usize)),
            max_frame,
            last_drain: None,
            last_stats: None,
            warned: false,
        }
    }

    /// The socket (the worker also sleeps on it).
    pub fn raw_fd(&self) -> i32 {
        self.sock.raw_fd()
    }

    /// Takes the next frame from the receive ring into `buf` (header rearranged to the
    /// 12-byte virtio-net layout); `Ok(len)` of header plus frame, `Err` a drop reason,
    /// `None` when the ring is empty.
    fn take(&mut self) -> Option<Result<usize, DropReason>> {
        let f = self.sock.recv(&mut self.buf[NET_HDR_LEN - VNET_HDR_LEN..])?;
        if f.len != f.snap {
            return Some(Err(DropReason::Oversize));
        }
        if f.snap < ETH_HLEN as usize {
            return Some(Err(DropReason::ShortFrame));
        }
        // The kernel's 10 bytes sit at 2..12: move them to 0..10, `num_buffers` after.
        self.buf.copy_within(NET_HDR_LEN - VNET_HDR_LEN..NET_HDR_LEN, 0);
        self.buf[NET_HDR_NUM_BUFFERS..NET_HDR_LEN].fill(0);
        Some(Ok(NET_HDR_LEN + f.snap))
    }
}

/// Copies `len` bytes of `chain` from byte `off` to `dst` (raw memory).
///
/// # Safety
/// `dst .. dst + len` must be writable memory no Rust reference points into.
unsafe fn gather_raw(chain: &Chain<'_>, mut off: usize, dst: *mut u8, len: usize) {
    let mut done = 0;
    for s in chain.segs() {
        let l = s.len as usize;
        if off >= l {
            off -= l;
            continue;
        }
        let n = (l - off).min(len - done);
        // SAFETY: the source lies inside a translated guest buffer; the destination
        // inside `dst .. + len` (the caller's promise). `copy`: guest memory is foreign.
        unsafe { std::ptr::copy(s.ptr.add(off), dst.add(done), n) };
        done += n;
        off = 0;
        if done == len {
            break;
        }
    }
}

impl PortPath {
    /// One burst each way.
    #[inline(always)]
    pub(super) fn run_afp<R: Ring>(&mut self) -> Result<usize, (Side, RingFault)> {
        let tx = self.afp_tx::<R>();
        let rx = self.afp_rx::<R>();
        match (tx, rx) {
            (Ok(a), Ok(b)) => Ok(a + b),
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    }

    /// Guest → kernel: up to [`BURST`] transmit chains into the transmit ring, one flush.
    fn afp_tx<S: Ring>(&mut self) -> Result<usize, (Side, RingFault)> {
        let max_frame = self.max_frame;
        let PathKind::AfPacket(t) = &mut self.kind else { return Ok(0) };
        let Some(src) = self.src.as_mut() else { return Ok(0) };
        let pair = src.pair();
        let dev = src.dev.clone();
        let Some((ring, mem, rx)) = src.ring_rx::<S>() else { return Ok(0) };
        let features = rx.features;
        let offloads = features & offload::HOST_OFFLOADS != 0;
        let n = ring.poll_avail().map_err(|b| (Side::Src, b))?.min(BURST);
        if n == 0 {
            // Slots a refused flush (`EAGAIN`/`ENOBUFS`) left requested go out now.
            let _ = t.sock.flush();
            return Ok(0);
        }
        let chain = self.src_chain.chain(mem);
        let mut c = BurstCounts::default();
        let mut oc = OffloadCounts::default();
        let mut done = 0u16;
        let mut failed = None;
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
                gather(chain, 0, &mut hdr);
                hdr[NET_HDR_NUM_BUFFERS..].fill(0);
                let gso = if offloads {
                    tx_header_ok(&hdr, features)
                } else {
                    hdr.fill(0);
                    Ok(false)
                };
                let len = chain.total - NET_HDR_LEN as u64;
                gso.and_then(|gso| {
                    let limit = if gso { MAX_SUPER_FRAME as u64 } else { max_frame };
                    if len > limit || !AfPacket::fits(len as usize) {
                        Err(DropReason::Oversize)
                    } else {
                        Ok(len as usize)
                    }
                })
            };
            match verdict {
                Ok(len) => {
                    let mut h10 = [0u8; VNET_HDR_LEN];
                    h10.copy_from_slice(&hdr[..VNET_HDR_LEN]);
                    // SAFETY: `queue` hands `fill` a slot of ours with room for `len` bytes
                    // (`fits` checked above), referenced by nothing.
                    let queued =
                        t.sock.queue(&h10, len, |dst| unsafe { gather_raw(chain, NET_HDR_LEN, dst, len) });
                    match queued {
                        None => break, // ring full: the chain stays in the virtqueue
                        Some(refused_before) => {
                            if refused_before {
                                c.drop(DropReason::KernelRefused);
                            }
                            c.rx_packets += 1;
                            c.rx_bytes += len as u64;
                            if hdr[net_hdr::GSO_TYPE] != net_hdr::GSO_NONE {
                                oc.add(OffloadEvent::GsoRequests, 1);
                                oc.add(OffloadEvent::PassedWhole, 1);
                            } else if hdr[net_hdr::FLAGS] & net_hdr::F_NEEDS_CSUM != 0 {
                                oc.add(OffloadEvent::CsumRequests, 1);
                                oc.add(OffloadEvent::PassedWhole, 1);
                            }
                        }
                    }
                }
                Err(why) => c.drop(why),
            }
            ring.add_used(head, 0);
            done += 1;
        }
        if let Err(e) = t.sock.flush() {
            if !t.warned {
                log::warn!("afpacket {}: send: {e}", t.sock.name());
                t.warned = true;
            }
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

    /// Kernel → guest: up to [`BURST`] frames from the receive ring.
    fn afp_rx<D: Ring>(&mut self) -> Result<usize, (Side, RingFault)> {
        let PathKind::AfPacket(t) = &mut self.kind else { return Ok(0) };
        let Some(dst) = self.dst.as_mut() else { return Ok(0) };
        let pair = dst.pair();
        let dev = dst.dev.clone();
        let mut c = BurstCounts::default();
        let mut oc = OffloadCounts::default();
        if !t.last_stats.is_some_and(|l| l.elapsed() < STATS_EVERY) {
            t.last_stats = Some(Instant::now());
            c.drops[DropReason::KernelRingFull as usize] += t.sock.kernel_drops();
        }
        let Some((dr, dmem, rx)) = dst.ring_rx::<D>() else {
            if !t.last_drain.is_some_and(|l| l.elapsed() < DRAIN_EVERY) {
                t.last_drain = Some(Instant::now());
                let mut n = t.held.take().map_or(0, |_| 1) + t.staging.discard();
                for _ in 0..BURST {
                    match t.take() {
                        None => break,
                        Some(_) => n += 1,
                    }
                }
                c.drops[DropReason::NoBuffer as usize] += n;
            }
            dev.stats[pair].flush_tx(&c);
            return Ok(0);
        };
        let mrg = rx.mrg_rxbuf;
        let rx_csum = rx.csum();
        let filter = Some(rx).filter(|rx| !rx.pass_all());
        let mut res = Ok(());
        let mut rx_done = 0u16;
        let mut frames = 0usize;
        let mut nrx = match dr.poll_avail_max(BURST) {
            Ok(n) => n,
            Err(b) => return Err((Side::Dst, b)),
        };
        let first = self.dst_chain.chain(dmem);
        while frames < BURST as usize {
            if t.staging.pending() {
                let (out, frame, seg) = t.staging.parts();
                let more = &mut self.mrg_chain;
                if let Err(b) =
                    out.drain(frame, seg, dr, dmem, &mut nrx, &mut rx_done, first, more, mrg, &mut c)
                {
                    res = Err(b);
                    break;
                }
                if t.staging.pending() {
                    break;
                }
                frames += 1;
                continue;
            }
            if let Some(len) = t.held {
                let mut hdr = [0u8; NET_HDR_LEN];
                hdr.copy_from_slice(&t.buf[..NET_HDR_LEN]);
                let bytes = &t.buf[NET_HDR_LEN..len];
                match offload::deliver(
                    dr,
                    dmem,
                    &mut nrx,
                    rx_done,
                    first,
                    &mut self.mrg_chain,
                    mrg,
                    hdr,
                    bytes,
                ) {
                    Ok(Placed::Done(k)) => {
                        rx_done += k;
                        c.tx_packets += 1;
                        c.tx_bytes += bytes.len() as u64;
                    }
                    Ok(Placed::Wait) => break,
                    Ok(Placed::NoFit) => c.drop(DropReason::RxBufferTooSmall),
                    Ok(Placed::RingTooSmall) => c.drop(DropReason::RxRingTooSmall),
                    Err(b) => {
                        res = Err(b);
                        break;
                    }
                }
                t.held = None;
                frames += 1;
                continue;
            }
            let len = match t.take() {
                None => break,
                Some(Err(why)) => {
                    c.drop(why);
                    frames += 1;
                    continue;
                }
                Some(Ok(len)) => len,
            };
            if filter.is_some_and(|rx| !rx.accepts(&t.buf[NET_HDR_LEN..len])) {
                c.drop(DropReason::Filtered);
                frames += 1;
                continue;
            }
            let requested =
                t.buf[net_hdr::FLAGS] & net_hdr::F_NEEDS_CSUM != 0 || t.buf[net_hdr::GSO_TYPE] != 0;
            if requested {
                let staged = {
                    let chain = Chain::over(&mut t.buf[..len]);
                    t.staging.stage(&chain, offload::HOST_OFFLOADS | GSO_ALL, t.max_frame, false)
                };
                match staged {
                    Ok(_) => t.staging.plan(rx, &mut oc),
                    Err(why) => {
                        c.drop(why);
                        frames += 1;
                    }
                }
                continue; // delivered at the loop's top
            }
            // No request: keep `DATA_VALID` for a guest that takes checksum offloads.
            let valid = t.buf[net_hdr::FLAGS] & net_hdr::F_DATA_VALID;
            t.buf[..NET_HDR_LEN].fill(0);
            if rx_csum {
                t.buf[net_hdr::FLAGS] = valid;
            }
            t.held = Some(len);
        }
        dr.consume(rx_done);
        dr.publish_used();
        dev.stats[pair].flush_tx(&c);
        dev.stats[pair].flush_offloads(&oc);
        res.map(|()| frames).map_err(|b| (Side::Dst, b))
    }
}

/// Every GSO feature (the kernel's header is checked for form, not for what a guest
/// negotiated: the guest did not send it).
const GSO_ALL: u64 = {
    use spec::layout::features::{self as f, bit};
    bit(f::NET_HOST_ECN)
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_raw_skips_the_header_across_segments() {
        let mut a = [1u8; 8];
        let mut b: Vec<u8> = (0..100).collect();
        let mut c = Chain::over(&mut a);
        c.push(b.as_mut_ptr(), b.len() as u32);
        let mut out = [0u8; 20];
        // SAFETY: `out` is ours and 20 bytes long.
        unsafe { gather_raw(&c, 10, out.as_mut_ptr(), 20) };
        let want: Vec<u8> = (2..22).collect();
        assert_eq!(&out[..], &want[..]);
    }
}
