//! `--handoff`'s two paths: the sending half on one device's transmit queue and the
//! receiving half on the other device's receive queue (the work itself is in
//! [`crate::handoff`]).
//!
//! Owns: handing a path's ring, memory and chain room to the handoff halves, and their
//! counts. Must not: touch the other worker's rings.

use super::{PathKind, PortPath, Side, BURST};
use crate::handoff::{TxSide, FRAMES};
use crate::ring::Ring;
use crate::split_ring::{DeviceRing, RingFault};
use crate::stats::{BurstCounts, DropReason};

impl PortPath {
    #[inline]
    pub(super) fn run_hand_out<R: Ring>(&mut self) -> Result<usize, (Side, RingFault)> {
        let PathKind::HandOut(sender) = &mut self.kind else { return Ok(0) };
        let Some(src) = self.src.as_mut() else { return Ok(0) };
        let pair = src.pair();
        let Some((ring, mem, rx)) = src.ring_rx::<R>() else {
            sender.flush();
            return Ok(0);
        };
        let mut c = BurstCounts::default();
        let (buf, max_frame, features) = (&mut *self.src_chain, self.max_frame, rx.features);
        let res = sender.run(TxSide { ring, mem, buf, burst: BURST, max_frame, features }, &mut c);
        src.dev.stats[pair].flush_rx(&c);
        res.map_err(|b| (Side::Src, b))
    }

    #[inline]
    pub(super) fn run_hand_in<R: Ring>(&mut self) -> Result<usize, (Side, RingFault)> {
        let PathKind::HandIn(receiver) = &mut self.kind else { return Ok(0) };
        let Some(dst) = self.dst.as_mut() else { return Ok(0) };
        let pair = dst.pair();
        let dev = dst.dev.clone();
        let mut c = BurstCounts::default();
        let res = receiver.run(
            dst.ring_rx::<R>(),
            &mut self.dst_chain,
            &mut self.mrg_chain,
            BURST as usize,
            &mut c,
        );
        dev.stats[pair].flush_tx(&c);
        res.map_err(|b| (Side::Dst, b))
    }

    /// At shutdown, once every worker has stopped (called for every path's sending half
    /// first, then for every receiving half): frames still between the two halves of a
    /// handoff are counted where they would have been delivered, as `peer_down` drops of
    /// the receiving device, so what the sender took from its guest is accounted for.
    pub fn account_in_flight(&mut self) {
        match &mut self.kind {
            PathKind::HandOut(sender) => sender.flush(),
            PathKind::HandIn(receiver) => {
                let Some(dst) = self.dst.as_ref() else { return };
                let mut c = BurstCounts::default();
                loop {
                    let before = c.drops[DropReason::PeerDown as usize];
                    // No ring: everything the receiver holds or finds is dropped.
                    let _ = receiver.run::<DeviceRing>(
                        None,
                        &mut self.dst_chain,
                        &mut self.mrg_chain,
                        FRAMES,
                        &mut c,
                    );
                    if c.drops[DropReason::PeerDown as usize] == before {
                        break;
                    }
                }
                dst.dev.stats[dst.pair()].flush_tx(&c);
            }
            _ => {}
        }
    }
}
