//! Forwarding bursts: from one device's transmit queue to a receive queue (`reflect`: the
//! same device; `xconnect`: the other device), with backpressure (a frame waits in the
//! transmit ring until a receive buffer is free).
//!
//! Owns: the copy of each frame (header, frame bytes, optional MAC swap; a burst's plain
//! frames on packed rings go through `plain.rs` first), the receive filter's per-frame
//! decision, and the one publish for both rings.
//! Must not: change device state other than through `QueueSlot::fail`.

use spec::layout::NET_HDR_LEN;

use super::mrg::{self, FrameSrc, Placed};
use super::offload;
use super::{plain, PortPath, Side, BURST, ETH_HLEN, FILTER_BYTES, ONE_BUFFER_HDR};
use crate::ring::{publish_used_pair, Ring};
use crate::split_ring::{copy_chain, gather, scatter, Dir, RingFault};
use crate::stats::{BurstCounts, DropReason, OffloadCounts};

impl PortPath {
    /// One forwarding burst. A burst whose sending driver negotiated no host offload, and
    /// with nothing staged, runs a loop compiled without the offload code (the 64-byte
    /// benchmarks' case: the code a frame never runs still cost every frame a few
    /// instructions in register pressure, `bench/callgrind.sh`); otherwise the loop
    /// that looks at each frame's request runs, out of line.
    #[inline(always)]
    pub(super) fn run_forward<S: Ring, D: Ring>(
        &mut self,
        swap_mac: bool,
    ) -> Result<usize, (Side, RingFault)> {
        let staged = self.staging.as_ref().is_some_and(|s| s.pending());
        let asks = self.staging.is_some()
            && self
                .src
                .as_ref()
                .and_then(|s| s.active.as_ref())
                .is_some_and(|a| a.rx.features & offload::HOST_OFFLOADS != 0);
        if staged || asks {
            self.run_forward_offload::<S, D>(swap_mac)
        } else {
            self.forward_burst::<S, D, false>(swap_mac)
        }
    }

    #[inline(never)]
    fn run_forward_offload<S: Ring, D: Ring>(&mut self, swap_mac: bool) -> Result<usize, (Side, RingFault)> {
        self.forward_burst::<S, D, true>(swap_mac)
    }

    /// The burst itself; `OFFLOAD`: look at each frame's offload request and at what is
    /// staged.
    #[inline(always)]
    fn forward_burst<S: Ring, D: Ring, const OFFLOAD: bool>(
        &mut self,
        swap_mac: bool,
    ) -> Result<usize, (Side, RingFault)> {
        let max_frame = self.max_frame;
        let prefetch_tx = self.prefetch_tx;
        let (Some(src), Some(dst)) = (self.src.as_mut(), self.dst.as_mut()) else {
            return Ok(0);
        };
        let (spair, dpair) = (src.pair(), dst.pair());
        let (sdev, ddev) = (src.dev.clone(), dst.dev.clone());
        let Some((sring, smem, srx)) = src.ring_rx::<S>() else {
            return Ok(0);
        };
        // Offload requests are checked against what the sending driver negotiated. A
        // driver that negotiated no host offload at all has its header ignored, as before
        // there were any (its frames are held to the MTU), so its bursts never look.
        let sfeatures = srx.features;
        let may_offload = OFFLOAD && sfeatures & offload::HOST_OFFLOADS != 0;
        let mut staging = if OFFLOAD { self.staging.as_deref_mut() } else { None };
        let pending = staging.as_ref().is_some_and(|s| s.pending());
        let ntx = sring.poll_avail().map_err(|b| (Side::Src, b))?.min(BURST);
        if ntx == 0 && !pending {
            return Ok(0);
        }
        let dst_active = dst.active.is_some();
        // The receive side: its ring, its memory and the chain that borrows it.
        let (mut dside, filter, mrg, drx) = match dst.ring_rx::<D>() {
            // The filter is looked at per frame only when it is not promiscuous.
            Some((r, m, rx)) => (Some((r, m)), Some(rx).filter(|rx| !rx.pass_all()), rx.mrg_rxbuf, Some(rx)),
            None => (None, None, false, None),
        };
        let mut nrx = match dside.as_mut() {
            // No more receive buffers than frames (a packed ring looks at no more).
            Some((r, _)) => r.poll_avail_max(ntx).map_err(|b| (Side::Dst, b))?,
            None => 0,
        };
        let peer_down = dside.is_none();
        if peer_down {
            Self::log_peer_down(dst_active, ntx);
        }
        let mut dside = dside.map(|(r, m)| (r, m, self.dst_chain.chain(m)));
        let schain = self.src_chain.chain(smem);
        let mrg_chain = &mut self.mrg_chain;
        if prefetch_tx {
            // `--prefetch-tx`: the transmitted frames' first two lines, for the whole
            // burst, before any walk (see `DeviceRing::prefetch_read`).
            for j in 0..ntx {
                sring.prefetch_read(j, 2);
            }
        }
        if let Some((dr, _, _)) = dside.as_mut() {
            // The receive buffers' header line and first frame line, for the whole
            // burst, before any copy (see `DeviceRing::prefetch_write`).
            for j in 0..nrx.min(ntx) {
                dr.prefetch_write(j, 2);
            }
        }
        let mut sc = BurstCounts::default();
        let mut dc = BurstCounts::default();
        // The frames forwarded, counted in locals and added to `sc` and `dc` once: the
        // loop keeps them in registers (in the counts, which the out-of-line offload code
        // borrows, every frame paid loads and stores for them, `bench/callgrind.sh`).
        let (mut rx_packets, mut rx_bytes, mut tx_packets, mut tx_bytes) = (0u64, 0u64, 0u64, 0u64);
        let (mut tx_done, mut rx_done) = (0u16, 0u16);
        let mut failed = None;
        // A staged super-frame (or the rest of its segments) goes first; while some of
        // it waits for receive buffers, no new transmit frame is taken (order).
        let mut ntx = ntx;
        if let Some(st) = staging.as_deref_mut().filter(|s| s.pending()) {
            match dside.as_mut() {
                None => sc.drops[DropReason::PeerDown as usize] += st.discard(),
                Some((dr, dmem, dchain)) => {
                    // Copies lent to the out-of-line code (see below).
                    let (mut n, mut done, mut c) = (nrx, rx_done, BurstCounts::default());
                    let (out, frame, seg) = st.parts();
                    let res = out.drain(
                        frame, seg, &mut **dr, dmem, &mut n, &mut done, dchain, mrg_chain, mrg, &mut c,
                    );
                    (nrx, rx_done) = (n, done);
                    dc.add(&c);
                    if let Err(b) = res {
                        failed = Some((Side::Dst, b));
                    }
                }
            }
            if st.pending() || failed.is_some() {
                ntx = 0;
            }
        }
        // Plain frames first, on rings that hand out direct buffers (`plain.rs`); the
        // general loop goes on from the first frame that is not plain.
        // (Chain `i` of one ring goes into chain `i` of the other: nothing is taken yet.)
        let mut first = 0;
        if S::DIRECT && D::DIRECT && !OFFLOAD && filter.is_none() && tx_done == 0 && rx_done == 0 {
            if let Some((dr, dmem, _)) = dside.as_mut() {
                let (k, bytes) =
                    plain::forward(sring, smem, &mut **dr, dmem, ntx.min(nrx), max_frame, swap_mac);
                (first, tx_done, rx_done) = (k, k, k);
                (rx_packets, rx_bytes) = (rx_packets + k as u64, rx_bytes + bytes);
                (tx_packets, tx_bytes) = (tx_packets + k as u64, tx_bytes + bytes);
            }
        }
        for i in first..ntx {
            if !peer_down && rx_done == nrx {
                break; // backpressure: the frame waits for a receive buffer
            }
            let th = match sring.walk_avail(smem, i, Dir::DeviceReads, schain) {
                Ok(h) => h,
                Err(b) => {
                    failed = Some((Side::Src, b));
                    break;
                }
            };
            if may_offload && offload::requested(schain) {
                // Checksum or segmentation asked for: staged, then delivered whole or
                // in segments (out of line, `offload`).
                sring.add_used(th, 0);
                tx_done += 1;
                let rx = match (dside.as_mut(), drx) {
                    (Some((dr, dmem, dchain)), Some(rx)) => Some((&mut **dr, *dmem, &mut **dchain, rx)),
                    _ => None,
                };
                let cx = offload::Forward {
                    max_frame,
                    swap_mac,
                    features: sfeatures,
                    filter: filter.is_some(),
                    mrg,
                };
                // The out-of-line code works on copies of the burst's cursor and counts:
                // lending the burst's own would make them live in memory, and cost every
                // frame of the burst loads and stores (`bench/callgrind.sh`).
                let (mut n, mut done) = (nrx, rx_done);
                let (mut c_s, mut c_d) = (BurstCounts::default(), BurstCounts::default());
                let mut c_o = OffloadCounts::default();
                let res = offload::forward(
                    staging.as_deref_mut(),
                    schain,
                    cx,
                    rx,
                    &mut n,
                    &mut done,
                    mrg_chain,
                    (&mut c_s, &mut c_d, &mut c_o),
                );
                (nrx, rx_done) = (n, done);
                sc.add(&c_s);
                dc.add(&c_d);
                // Per super-frame, straight into the shared counters (see `OffloadCounts`).
                sdev.stats[spair].flush_offloads(&c_o);
                match res {
                    Ok(false) => continue,
                    Ok(true) => break, // the rest waits for receive buffers
                    Err(b) => {
                        failed = Some((Side::Dst, b));
                        break;
                    }
                }
            }
            let len = match Self::tx_frame(schain, max_frame) {
                Ok(len) => len,
                Err(why) => {
                    sc.drop(why);
                    sring.add_used(th, 0);
                    tx_done += 1;
                    continue;
                }
            };
            rx_packets += 1;
            rx_bytes += len;
            let Some((dr, dmem, dchain)) = dside.as_mut() else {
                sc.drop(DropReason::PeerDown);
                sring.add_used(th, 0);
                tx_done += 1;
                continue;
            };
            if let Some(rx) = filter {
                // The header as it will be delivered (addresses swapped with --swap-mac).
                let mut hdr = [0u8; FILTER_BYTES];
                let got = gather(schain, NET_HDR_LEN, &mut hdr);
                if swap_mac {
                    hdr[..12].rotate_left(6);
                }
                if !rx.accepts(&hdr[..got]) {
                    dc.drop(DropReason::Filtered);
                    sring.add_used(th, 0);
                    tx_done += 1;
                    continue;
                }
            }
            let rh = match dr.walk_avail(dmem, rx_done, Dir::DeviceWrites, dchain) {
                Ok(h) => h,
                Err(b) => {
                    // The frame stays in the transmit ring; only the receive side is broken.
                    rx_packets -= 1;
                    rx_bytes -= len;
                    failed = Some((Side::Dst, b));
                    break;
                }
            };
            let need = NET_HDR_LEN as u64 + len;
            let capacity = mrg::capacity(dchain);
            if capacity < need {
                // Larger than the receive chain: spread over several with mergeable
                // receive buffers, else dropped (the receive buffer stays).
                // The first chain must hold the header and the Ethernet header (the MAC
                // swap below writes there).
                let placed = if mrg && capacity >= NET_HDR_LEN as u64 + ETH_HLEN {
                    let hdr = [0u8; NET_HDR_LEN];
                    let src = FrameSrc::Chain(schain, NET_HDR_LEN);
                    let mut n = nrx; // a copy, as for `offload::forward`
                    let placed = mrg::scatter(
                        &mut **dr,
                        dmem,
                        &mut n,
                        rx_done,
                        dchain,
                        rh,
                        mrg_chain,
                        hdr,
                        src,
                        len as usize,
                    );
                    nrx = n;
                    match placed {
                        Ok(p) => p,
                        Err(b) => {
                            rx_packets -= 1;
                            rx_bytes -= len;
                            failed = Some((Side::Dst, b));
                            break;
                        }
                    }
                } else {
                    Placed::NoFit
                };
                match placed {
                    Placed::Done(k) => {
                        if swap_mac {
                            let mut macs = [0u8; 12];
                            gather(schain, NET_HDR_LEN, &mut macs);
                            macs.rotate_left(6);
                            // The addresses are in the first chain (see above).
                            scatter(dchain, NET_HDR_LEN, &macs);
                        }
                        sring.add_used(th, 0);
                        tx_done += 1;
                        rx_done += k;
                        tx_packets += 1;
                        tx_bytes += len;
                        continue;
                    }
                    Placed::Wait => {
                        // The frame waits in the transmit ring for more receive buffers.
                        rx_packets -= 1;
                        rx_bytes -= len;
                        break;
                    }
                    Placed::NoFit => {
                        sring.add_used(th, 0);
                        tx_done += 1;
                        dc.drop(DropReason::RxBufferTooSmall);
                        break; // the receive buffer stays; this frame is dropped
                    }
                    Placed::RingTooSmall => {
                        // No buffer the guest can post would make it fit: dropped, so
                        // the frames behind it do not wait forever.
                        sring.add_used(th, 0);
                        tx_done += 1;
                        dc.drop(DropReason::RxRingTooSmall);
                        break;
                    }
                }
            }
            sring.add_used(th, 0);
            tx_done += 1;
            scatter(dchain, 0, &ONE_BUFFER_HDR);
            copy_chain(schain, NET_HDR_LEN, dchain, NET_HDR_LEN, len as usize);
            if swap_mac {
                let mut macs = [0u8; 12];
                gather(schain, NET_HDR_LEN, &mut macs);
                macs.rotate_left(6);
                scatter(dchain, NET_HDR_LEN, &macs);
            }
            dr.add_used(rh, need as u32);
            rx_done += 1;
            tx_packets += 1;
            tx_bytes += len;
        }
        sc.rx_packets += rx_packets;
        sc.rx_bytes += rx_bytes;
        dc.tx_packets += tx_packets;
        dc.tx_bytes += tx_bytes;
        sring.consume(tx_done);
        match dside {
            Some((dr, _, _)) => {
                dr.consume(rx_done);
                // The receive side first: if this process dies between the two stores,
                // the frames are delivered and the sender (whose transmit ring then
                // still holds them) counts them as lost in flight, never the other way
                // (frames completed on transmit but delivered nowhere, counted by no one).
                publish_used_pair(dr, sring);
            }
            None => {
                sring.publish_used();
            }
        }
        sdev.stats[spair].flush_rx(&sc);
        ddev.stats[dpair].flush_tx(&dc);
        match failed {
            Some(f) => Err(f),
            None => Ok(tx_done as usize),
        }
    }

    /// A burst found frames to forward and no receive ring to put them in (they are
    /// dropped as `peer_down`): at debug level, what the path saw. Out of line and cold:
    /// only that burst pays for it. (A packed `reflect` loop was seen to lose its frames
    /// this way under callgrind with the receive ring attached; this is to catch it.)
    #[cold]
    #[inline(never)]
    fn log_peer_down(dst_active: bool, ntx: u16) {
        log::debug!("forward: {ntx} frame(s) and no receive ring (destination active: {dst_active})");
    }
}
