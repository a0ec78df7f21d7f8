//! The mergeable receive path (`VIRTIO_NET_F_MRG_RXBUF`, virtio 1.2 §5.1.6.3-§5.1.6.4):
//! a frame the device spread over several posted buffers, returned as one chained
//! [`Packet`].
//!
//! Owns: reading `num_buffers` from each frame's first buffer, taking that many used
//! buffers as the frame's segments (the first at the headroom after its header, the
//! others from the start of what was posted: the device writes no header there), and
//! the checks of what the device said: `num_buffers` at least 1, no more than it has
//! used, every later buffer non-empty, the frame no longer than [`MAX_MERGED_FRAME`].
//! A violation is a [`DeviceError`] that stops the queue, as a bad used id does; the
//! buffers of the frame taken so far go back to the pool (the device returned them).
//! A frame longer than the queue's limit (`limit.rs`) is no fault: dropped whole, counted.
//! Must not: run when MRG_RXBUF was not negotiated (the header's `num_buffers` means
//! nothing then), or read a buffer the ring has not returned.
//!
//! Burst size: the ring's burst rule (`Ring::rx_take`, whole lines of descriptors on a
//! split ring) bounds where frames may start; a frame that starts within it is finished
//! from the rest of what `poll_used` reported, which the device published together with
//! its first buffer (§5.1.6.4.2: all of a frame's buffers are used together).

use crate::error::DeviceError;
use crate::layout::{NET_HDR_LEN, NET_HDR_NUM_BUFFERS};
use crate::mempool::Packet;
use crate::ring::Ring;

use super::super::rx_meta::RxMeta;
use super::super::stats::bump;
use super::super::xdp::{self, Verdicts};
use super::super::{Recycle, BATCH};
use super::RxHalf;

/// The longest frame a device may merge (an IPv4 or IPv6 packet of 64 KiB behind an
/// Ethernet header with two VLAN tags); a frame whose buffers add up to more is a device
/// fault.
pub const MAX_MERGED_FRAME: usize = 65535 + 14 + 8;

impl<R: Ring> RxHalf<R> {
    /// `rx_inner` with MRG_RXBUF negotiated: up to `max` frames from the `polled` used
    /// buffers `poll_used` reported.
    pub(super) fn rx_merge(
        &mut self,
        batch: &mut Vec<Packet>,
        mut meta: Option<&mut Vec<RxMeta>>,
        max: usize,
        polled: u16,
    ) -> usize {
        if polled == 0 {
            return 0;
        }
        let target = self.ring.rx_take(polled) as usize;
        let mut left = polled as usize;
        let (mut got, mut frames, mut bytes, mut errors) = (0usize, 0u64, 0u64, 0u64);
        let mut too_long = 0u64;
        let mut v = Verdicts::default();
        let mut failed = None;
        let mut rec = Recycle { pool: &self.pool, idx: [0; BATCH], n: 0 };
        let hdr_off = self.headroom as usize - NET_HDR_LEN;
        let mut taken = 0usize;
        'frames: while (frames as usize) < max && taken < target {
            let (idx, len) = match self.ring.pop_one() {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            };
            taken += 1;
            left -= 1;
            if (len as usize) < NET_HDR_LEN {
                errors += 1;
                // SAFETY: a buffer of ours (see `RxSink::used`), given back once.
                unsafe { rec.put(idx) };
                continue;
            }
            // SAFETY: `idx` is a token of this ring: a buffer of the pool (`RxSink::used`).
            let (base, _) = unsafe { self.pool.buf(idx) };
            // SAFETY: the header slot is the 12 bytes before the data at `headroom`,
            // inside buffer `idx`, which the device returned (its writes are ordered
            // before our acquire in `poll_used`/`pop_one`); ours alone now.
            let h = unsafe { std::ptr::read(base.add(hdr_off) as *const [u8; NET_HDR_LEN]) };
            let nb = u16::from_le_bytes([h[NET_HDR_NUM_BUFFERS], h[NET_HDR_NUM_BUFFERS + 1]]);
            if nb == 0 {
                // SAFETY: as above.
                unsafe { rec.put(idx) };
                failed = Some(DeviceError::MergeZeroBuffers);
                break;
            }
            let data_len = len - NET_HDR_LEN as u32;
            // SAFETY: a buffer of ours, data at the headroom within the posted length.
            let mut p = unsafe { self.pool.packet(idx, self.headroom, data_len as u16) };
            let mut total = data_len;
            for k in 1..nb {
                let beyond = DeviceError::MergeBeyondUsed { num_buffers: nb, available: k };
                if left == 0 {
                    failed = Some(beyond);
                    break 'frames; // `p` and its segments go back to the pool
                }
                let (i2, l2) = match self.ring.pop_one() {
                    Ok(Some(x)) => x,
                    Ok(None) => {
                        failed = Some(beyond);
                        break 'frames;
                    }
                    Err(e) => {
                        failed = Some(e);
                        break 'frames;
                    }
                };
                taken += 1;
                left -= 1;
                // SAFETY: `i2` is a buffer of ours the device returned; the posted area
                // starts at the header slot and `l2` is within what was posted (the
                // ring checked it), so `hdr_off + l2` stays inside the buffer; the
                // chain stays below `MAX_SEGS` (`nb` is a u16 and the head counts).
                unsafe { p.push_segment_raw(i2, hdr_off as u16, l2 as u16) };
                total += l2;
                if l2 == 0 || total as usize > MAX_MERGED_FRAME {
                    failed = Some(DeviceError::MergeBadLength { index: k, len: l2, total });
                    break 'frames;
                }
            }
            let m = if meta.is_some() || self.xdp.is_some() {
                match RxMeta::checked(&h, self.hdr_rules, total) {
                    Some(m) => m,
                    None => {
                        // A header the device may not write: the whole frame is dropped
                        // (its buffers go back with the chain) and counted.
                        errors += 1;
                        rec.packet(p);
                        continue;
                    }
                }
            } else {
                RxMeta::default()
            };
            if total > self.rx_limit && !self.exempt(&h) {
                // Longer than `set_mtu` allows: the whole frame is dropped and counted.
                too_long += 1;
                rec.packet(p);
                continue;
            }
            frames += 1;
            bytes += total as u64;
            let p = match self.xdp.as_mut() {
                // A program sees one buffer as one frame: a merged frame is aborted as a
                // super-frame is.
                Some(prog) => {
                    let whole = m.is_gso() || p.is_chained();
                    match xdp::run(prog.as_mut(), &mut self.xdp_out, &mut v, &mut rec, whole, p) {
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
        match failed {
            Some(e) => {
                self.fail(e);
            }
            None => self.refill(),
        }
        got
    }
}
