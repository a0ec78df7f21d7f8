//! A receive queue's frame-length limit: [`RxQueue::set_mtu`] (what DPDK's
//! `rte_eth_dev_set_mtu` and testpmd's `port config all max-pkt-len` ask of a port).
//!
//! Owns: the checks of a new MTU against the device, the buffers and an attached XDP
//! program; the queue's limit (MTU + 18: an Ethernet header and one VLAN tag, as
//! Linux's `virtio_net` and our backend count a frame); and the cold decision for a frame
//! above it (a segmentation super-frame the device may send is exempt, anything else is
//! dropped and counted in `too_long`). Must not: touch the ring or count anything else.
//! The per-frame comparison itself sits in the receive loops (`rx.rs`, `merge.rs`): one
//! compare against a field, the limit `u32::MAX` until an application sets one, so a
//! queue without a limit behaves as before.

use crate::error::{Error, Result};
use crate::layout::NET_HDR_LEN;
use crate::mempool::Mempool;
use crate::ring::Ring;

use super::super::rx_meta::RxMeta;
use super::{on_half, RxHalf, RxQueue};

/// The smallest MTU (virtio 1.2 §5.1.4.1).
const MIN_MTU: u16 = 68;
/// Bytes a frame may have beyond its MTU: the Ethernet header and one VLAN tag.
pub(crate) const FRAME_OVER_MTU: u32 = 14 + 4;

impl RxQueue {
    /// Holds received frames to `mtu` + 18 bytes (an Ethernet header and one VLAN tag):
    /// from the next burst on, a longer frame that is not a segmentation super-frame
    /// (those come only with a negotiated `GUEST_TSO*`/`UFO`/`USO`) is dropped and
    /// counted in `rx_too_long` (part of `rx_errors`). Until this is called frames are
    /// held only to what the buffers take (as before there was a limit).
    ///
    /// `mtu` may be 68 up to the device's MTU ([`PortInfo::max_mtu`](crate::PortInfo::max_mtu));
    /// without mergeable receive buffers, a frame of `mtu` + 14 bytes must fit one
    /// buffer (as at open); with an XDP program attached, one with the program's
    /// headroom. Otherwise [`Error::Config`] says why, and the limit stays as it was.
    pub fn set_mtu(&mut self, mtu: u16) -> Result<()> {
        on_half!(&mut self.0, h => h.set_mtu(mtu))
    }

    /// The limit set by [`set_mtu`](Self::set_mtu): the longest frame delivered, if any.
    pub fn max_frame_len(&self) -> Option<u32> {
        on_half!(&self.0, h => (h.rx_limit != u32::MAX).then_some(h.rx_limit))
    }

    /// The largest MTU [`set_mtu`](Self::set_mtu) takes (the port's, at open).
    pub(crate) fn set_max_mtu(&mut self, max: u16) {
        on_half!(&mut self.0, h => h.max_mtu = max)
    }
}

impl<R: Ring> RxHalf<R> {
    fn set_mtu(&mut self, mtu: u16) -> Result<()> {
        if !(MIN_MTU..=self.max_mtu).contains(&mtu) {
            return Err(Error::Config(format!(
                "MTU {mtu} is outside {MIN_MTU}..={}, what the device carries",
                self.max_mtu
            )));
        }
        let frame_room = self.post_len as usize - NET_HDR_LEN;
        let frame = mtu as usize + 14;
        if !self.mrg && frame > frame_room {
            return Err(Error::Config(format!(
                "MTU {mtu}: a {frame}-byte frame does not fit the {frame_room}-byte buffers \
                 (negotiate VIRTIO_NET_F_MRG_RXBUF at open to receive frames over several)"
            )));
        }
        if self.xdp.is_some() && frame > frame_room {
            return Err(Error::Config(format!(
                "MTU {mtu}: an attached XDP program needs a {frame}-byte frame in one \
                 {frame_room}-byte buffer"
            )));
        }
        self.mtu = mtu;
        self.rx_limit = mtu as u32 + FRAME_OVER_MTU;
        Ok(())
    }

    /// Whether a frame above the limit with header `h` is a super-frame the device may
    /// send (kept).
    pub(super) fn exempt(&self, h: &[u8; NET_HDR_LEN]) -> bool {
        self.hdr_rules.gso() && RxMeta::parse(h).is_gso()
    }
}

/// The plain receive loop's limit check (`RxSink`): whether the frame of `data_len`
/// bytes in buffer `idx` is dropped (counted here; the caller gives the buffer back).
pub(super) trait FrameLimit {
    fn drops(&mut self, pool: &Mempool, idx: u32, headroom: u16, data_len: u32) -> bool;
    /// Frames dropped so far.
    fn too_long(&self) -> u64;
}

/// No limit set: nothing is dropped, nothing is kept (a zero-sized type).
pub(super) struct NoLimit;

impl FrameLimit for NoLimit {
    #[inline(always)]
    fn drops(&mut self, _: &Mempool, _: u32, _: u16, _: u32) -> bool {
        false
    }
    #[inline(always)]
    fn too_long(&self) -> u64 {
        0
    }
}

/// A limit set by `set_mtu`: frames over `limit` bytes are dropped unless they are
/// super-frames and the queue negotiated a `GUEST_*` segmentation offload (`gso`).
pub(super) struct Limit {
    pub limit: u32,
    pub gso: bool,
    pub too_long: u64,
}

impl FrameLimit for Limit {
    #[inline(always)]
    fn drops(&mut self, pool: &Mempool, idx: u32, headroom: u16, data_len: u32) -> bool {
        // SAFETY: `idx` is a buffer of ours the device returned (`RxSink::used`).
        if data_len > self.limit && !(self.gso && unsafe { hdr_is_gso(pool, idx, headroom) }) {
            self.too_long += 1;
            return true;
        }
        false
    }
    #[inline(always)]
    fn too_long(&self) -> u64 {
        self.too_long
    }
}

/// Whether the header in buffer `idx` of `pool` (before the data at `headroom`) asks
/// for segmentation: the cold half of the plain receive loop's limit check. It takes
/// the values it needs, not the loop's sink: a `&mut` of the sink passed out of line
/// would keep the sink's fields in memory for the whole loop, which costs instructions
/// on every frame (`bench/callgrind.sh`, fe-grx).
///
/// # Safety
///
/// `idx` must be a buffer of `pool` the device has returned (ours alone now), and
/// `headroom` at least [`NET_HDR_LEN`] (the pool's headroom).
#[cold]
#[inline(never)]
unsafe fn hdr_is_gso(pool: &Mempool, idx: u32, headroom: u16) -> bool {
    // SAFETY: `idx` is a buffer of the pool (the caller's promise).
    let (base, _) = unsafe { pool.buf(idx) };
    // SAFETY: the header slot lies inside the buffer, before the data at `headroom`;
    // the device's writes are ordered before the used index we acquired.
    let h = unsafe { std::ptr::read(base.add(headroom as usize - NET_HDR_LEN) as *const [u8; NET_HDR_LEN]) };
    RxMeta::parse(&h).is_gso()
}
