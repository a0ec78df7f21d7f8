//! The `gen` port's bursts: generated frames into the guest's receive buffers, UDP or, with
//! `--gso-size`, TCP super-frames (see [`crate::gso`]).
//!
//! Owns: filling receive buffers with generated frames (a frame larger than one buffer
//! over several with mergeable receive buffers, through `mrg`), the generator's budget
//! (`--count`) per burst, and the UDP frame template ([`udp_frame`]).
//! Must not: read guest buffers or change device state other than through
//! `QueueSlot::fail` and the device's generator budget.

use std::sync::atomic::Ordering;

use spec::layout::NET_HDR_LEN;

use super::{mrg, PathKind, PortPath, Side, BURST, FILTER_BYTES, GEN_MAGIC, GEN_SEQ_OFFSET};
use crate::ring::Ring;
use crate::split_ring::{scatter, Dir, RingFault};
use crate::stats::{BurstCounts, DropReason};

impl PortPath {
    #[inline(always)]
    pub(super) fn run_gen<R: Ring>(&mut self) -> Result<usize, (Side, RingFault)> {
        let PathKind::Gen { frame, seq, .. } = &mut self.kind else {
            return Ok(0);
        };
        let Some(dst) = self.dst.as_mut() else {
            return Ok(0);
        };
        let pair = dst.pair();
        let dev = dst.dev.clone();
        let Some((ring, mem, rx)) = dst.ring_rx::<R>() else { return Ok(0) };
        // A `--count` spent makes no more frames: no need to look at the ring (a packed
        // ring's poll reads a descriptor per buffer).
        let left = dev.gen_budget_left();
        if left == 0 {
            return Ok(0);
        }
        let want = left.min(BURST as u64) as u16;
        let avail = ring.poll_avail_max(want).map_err(|b| (Side::Dst, b))?.min(want);
        if avail == 0 {
            return Ok(0);
        }
        let n = dev.take_gen_budget(avail as u64) as u16;
        let mut c = BurstCounts::default();
        // Frames go to the guest's current address; the filter decides once per burst
        // (every frame of a burst has the same header).
        let eth = NET_HDR_LEN..NET_HDR_LEN + 6;
        if frame[eth.clone()] != rx.mac {
            frame[eth].copy_from_slice(&rx.mac);
        }
        if !rx.accepts(&frame[NET_HDR_LEN..NET_HDR_LEN + FILTER_BYTES]) {
            c.drops[DropReason::Filtered as usize] += n as u64;
            dev.stats[pair].flush_tx(&c);
            dev.generated.fetch_add(n as u64, Ordering::Relaxed);
            return Ok(0);
        }
        let mut done = 0u16;
        let mut dropped = 0u16;
        let mut failed = None;
        let need = frame.len() as u64;
        let chain = self.dst_chain.chain(mem);
        // Receive chains used: one per frame, or several for a frame spread over
        // mergeable buffers (then fewer than `n` frames fit, and the rest of the budget
        // goes back); `nrx` is how many chains the ring has shown this burst.
        let mut used = 0u16;
        let mut nrx = avail;
        while used < n {
            let head = match ring.walk_avail(mem, used, Dir::DeviceWrites, chain) {
                Ok(h) => h,
                Err(b) => {
                    failed = Some(b);
                    break;
                }
            };
            let at = NET_HDR_LEN + GEN_SEQ_OFFSET + GEN_MAGIC.len();
            let capacity: u64 = chain.segs().iter().map(|s| s.len as u64).sum();
            if capacity < need {
                // Larger than the guest's buffer: spread over several with mergeable
                // receive buffers (out of line, `mrg`), else dropped with the buffer left
                // where it is (as DPDK's vhost does without mergeable buffers).
                let placed = if rx.mrg_rxbuf && capacity >= NET_HDR_LEN as u64 {
                    frame[at..at + 8].copy_from_slice(&seq.to_le_bytes());
                    let mut hdr = [0u8; NET_HDR_LEN];
                    hdr.copy_from_slice(&frame[..NET_HDR_LEN]);
                    let body = &frame[NET_HDR_LEN..];
                    let src = mrg::FrameSrc::Bytes(body);
                    match mrg::scatter(
                        ring,
                        mem,
                        &mut nrx,
                        used,
                        chain,
                        head,
                        &mut self.mrg_chain,
                        hdr,
                        src,
                        body.len(),
                    ) {
                        Ok(p) => p,
                        Err(b) => {
                            failed = Some(b);
                            break;
                        }
                    }
                } else {
                    mrg::Placed::NoFit
                };
                match placed {
                    mrg::Placed::Done(k) => {
                        *seq += 1;
                        used += k;
                        c.tx_packets += 1;
                        c.tx_bytes += need - NET_HDR_LEN as u64;
                        done += 1;
                        continue;
                    }
                    // The ring has too few buffers now: the frame waits for the next burst.
                    mrg::Placed::Wait => break,
                    mrg::Placed::NoFit => {
                        c.drop(DropReason::RxBufferTooSmall);
                        dropped += 1;
                        break;
                    }
                    mrg::Placed::RingTooSmall => {
                        c.drop(DropReason::RxRingTooSmall);
                        dropped += 1;
                        break;
                    }
                }
            }
            frame[at..at + 8].copy_from_slice(&seq.to_le_bytes());
            *seq += 1;
            scatter(chain, 0, frame);
            ring.add_used(head, need as u32);
            c.tx_packets += 1;
            c.tx_bytes += need - NET_HDR_LEN as u64;
            done += 1;
            used += 1;
        }
        ring.consume(used);
        ring.publish_used();
        dev.stats[pair].flush_tx(&c);
        dev.generated.fetch_add((done + dropped) as u64, Ordering::Relaxed);
        dev.return_gen_budget((n - done - dropped) as u64);
        match failed {
            Some(b) => Err((Side::Dst, b)),
            None => Ok(done as usize),
        }
    }

    /// `gen` with `--gso-size`: one super-frame per receive buffer while guest TSO4 is
    /// on, MSS-sized segments (one per buffer) otherwise; the budget (`--count`) and
    /// `generated` count super-frames, `tx_packets` the frames delivered.
    #[inline]
    pub(super) fn run_gen_tcp<R: Ring>(&mut self) -> Result<usize, (Side, RingFault)> {
        let PathKind::Gen { seq, tcp: Some(tcp), .. } = &mut self.kind else {
            return Ok(0);
        };
        let Some(dst) = self.dst.as_mut() else {
            return Ok(0);
        };
        let pair = dst.pair();
        let dev = dst.dev.clone();
        let Some((ring, mem, rx)) = dst.ring_rx::<R>() else { return Ok(0) };
        let avail = ring.poll_avail().map_err(|b| (Side::Dst, b))?.min(BURST);
        if avail == 0 {
            return Ok(0);
        }
        let mut c = BurstCounts::default();
        let mut started = 0u64;
        tcp.set_dst_mac(rx.mac);
        if !rx.accepts(tcp.eth_header()) {
            // Rejected: the rest of a super-frame in progress, and as many new ones as
            // there are buffers, are dropped without touching a buffer.
            if tcp.in_progress() {
                tcp.abort();
                c.drop(DropReason::Filtered);
            }
            let n = dev.take_gen_budget(avail as u64);
            c.drops[DropReason::Filtered as usize] += n;
            dev.stats[pair].flush_tx(&c);
            dev.generated.fetch_add(n, Ordering::Relaxed);
            *seq += n;
            return Ok(0);
        }
        let (tso, csum) = (rx.tso4(), rx.csum());
        let mut done = 0u16;
        let mut failed = None;
        let chain = self.dst_chain.chain(mem);
        for i in 0..avail {
            if !tcp.in_progress() {
                if dev.take_gen_budget(1) == 0 {
                    break;
                }
                tcp.start(*seq);
                *seq += 1;
                started += 1;
            }
            let head = match ring.walk_avail(mem, i, Dir::DeviceWrites, chain) {
                Ok(h) => h,
                Err(b) => {
                    failed = Some(b);
                    break;
                }
            };
            let capacity: u64 = chain.segs().iter().map(|s| s.len as u64).sum();
            if capacity < tcp.next_len(tso) as u64 {
                if rx.mrg_rxbuf && capacity >= NET_HDR_LEN as u64 {
                    // Over several mergeable buffers, as in `run_gen` (out of line).
                    let (out, off, len) = tcp.next_frame(tso, csum);
                    let mut hdr = [0u8; NET_HDR_LEN];
                    hdr.copy_from_slice(&out[..NET_HDR_LEN]);
                    let src = mrg::FrameSrc::Parts(&out[NET_HDR_LEN..], &tcp.payload()[off..off + len]);
                    let flen = out.len() - NET_HDR_LEN + len;
                    let mut nrx = avail;
                    match mrg::scatter(
                        ring,
                        mem,
                        &mut nrx,
                        i,
                        chain,
                        head,
                        &mut self.mrg_chain,
                        hdr,
                        src,
                        flen,
                    ) {
                        Ok(mrg::Placed::Done(k)) => {
                            tcp.advance(off, len);
                            c.tx_packets += 1;
                            c.tx_bytes += flen as u64;
                            done += k;
                            // The chains after this one were used too: end the burst here
                            // (the next burst polls on from them).
                            break;
                        }
                        Ok(mrg::Placed::Wait) => break,
                        Ok(mrg::Placed::NoFit) => {}
                        Ok(mrg::Placed::RingTooSmall) => {
                            tcp.abort();
                            c.drop(DropReason::RxRingTooSmall);
                            break;
                        }
                        Err(b) => {
                            failed = Some(b);
                            break;
                        }
                    }
                }
                // As in `run_gen`: the frame is dropped, the buffer stays.
                tcp.abort();
                c.drop(DropReason::RxBufferTooSmall);
                break;
            }
            let len = tcp.emit(chain, tso, csum);
            ring.add_used(head, len as u32);
            c.tx_packets += 1;
            c.tx_bytes += (len - NET_HDR_LEN) as u64;
            done += 1;
        }
        ring.consume(done);
        ring.publish_used();
        dev.stats[pair].flush_tx(&c);
        dev.generated.fetch_add(started, Ordering::Relaxed);
        match failed {
            Some(b) => Err((Side::Dst, b)),
            None => Ok(done as usize),
        }
    }
}

/// A UDP/IPv4 frame of `len` bytes (60 ≤ len) from 10.0.0.1:9 to 10.0.0.2:9, destined to
/// `dst_mac`, whose payload starts with [`GEN_MAGIC`] and an 8-byte little-endian
/// sequence number (patched per frame). The IPv4 header checksum is valid; the UDP
/// checksum is 0 (none), which IPv4 allows.
pub fn udp_frame(dst_mac: [u8; 6], len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (len - 14) as u16;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let csum = spec::frame::inet_checksum(ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&9u16.to_be_bytes());
    udp[2..4].copy_from_slice(&9u16.to_be_bytes());
    udp[4..6].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f[GEN_SEQ_OFFSET..GEN_SEQ_OFFSET + 4].copy_from_slice(&GEN_MAGIC);
    for (i, b) in f[GEN_SEQ_OFFSET + 12..].iter_mut().enumerate() {
        *b = i as u8;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_frame_is_valid_udp_ipv4() {
        let f = udp_frame([2, 0, 0, 0, 0, 2], 64);
        assert_eq!(f.len(), 64);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(spec::frame::inet_checksum(&f[14..34]), 0, "a valid header sums to 0xffff");
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 50);
        assert_eq!(u16::from_be_bytes([f[38], f[39]]), 30);
        assert_eq!(&f[GEN_SEQ_OFFSET..GEN_SEQ_OFFSET + 4], b"VNET");
    }
}
