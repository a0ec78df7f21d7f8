//! The `sink` port's burst, and taking frames out of a guest's transmit queue (shared with
//! `--handoff`'s sending half).
//!
//! Owns: classifying a transmitted chain ([`PortPath::tx_frame`]), completing a burst of
//! transmit chains ([`PortPath::consume_tx`]) and `sink`'s count-and-drop (with
//! `--sink-read`, each frame copied out first). A `sink` offers the host offloads (unless
//! `--no-offloads`): a checksum request is dropped with its frame like any other, and a
//! segmentation super-frame of a type the driver negotiated is taken whole, up to 64 KiB,
//! and counted as one frame of its length ([`super_frame`]).
//! Must not: write into guest buffers (a transmit chain is device-readable) or change
//! device state other than through `QueueSlot::fail`.

use spec::layout::NET_HDR_LEN;

use spec::layout::features::{self as f, bit};
use spec::offload::NetHdr;

use super::offload::{host_gso_feature, MAX_SUPER_FRAME};
use super::{PathKind, PortPath, QueueSlot, Side, BURST, ETH_HLEN};
use crate::memory::GuestMemory;
use crate::ring::Ring;
use crate::split_ring::{gather, Chain, ChainBuf, Dir, RingFault};
use crate::stats::{BurstCounts, DropReason};

/// What became of a transmitted chain [`PortPath::consume_tx`] handed over.
pub(crate) enum Took {
    /// A frame of this many bytes, taken (counted as received); the chain is completed.
    Frame(u64),
    /// Dropped for this reason (counted); the chain is completed.
    Dropped(DropReason),
    /// Left in the ring, with the chains after it, for a later burst (what it needs is
    /// not free now).
    Left,
}

impl PortPath {
    /// Classifies a transmitted chain: the frame length, or why it is dropped.
    pub(crate) fn tx_frame(chain: &Chain<'_>, max_frame: u64) -> Result<u64, DropReason> {
        if chain.truncated {
            Err(DropReason::TooManySegments)
        } else {
            Self::frame_len(chain.total, max_frame)
        }
    }

    /// The frame length of a transmitted buffer of `total` bytes (the header included),
    /// or why it is dropped: [`tx_frame`](Self::tx_frame)'s checks on the length.
    #[inline(always)]
    pub(crate) fn frame_len(total: u64, max_frame: u64) -> Result<u64, DropReason> {
        if total < NET_HDR_LEN as u64 + ETH_HLEN {
            Err(DropReason::ShortFrame)
        } else if total - NET_HDR_LEN as u64 > max_frame {
            Err(DropReason::Oversize)
        } else {
            Ok(total - NET_HDR_LEN as u64)
        }
    }

    #[inline(always)]
    pub(super) fn run_sink<R: Ring>(&mut self) -> Result<usize, (Side, RingFault)> {
        Self::sink_burst::<R>(self.src.as_mut(), &mut self.src_chain, self.max_frame, |_, _| {})
    }

    /// `sink --sink-read`'s burst: [`run_sink`](Self::run_sink) with each frame copied
    /// out into its own slot (`BURST` slots of `max_frame` bytes). Its own function,
    /// chosen in `run`, so that the plain sink's burst stays as it was (a second copy of
    /// the loop in it cost every frame 2-4 instructions, `bench/callgrind.sh` be-gtx).
    #[inline(never)]
    pub(super) fn run_sink_read<R: Ring>(&mut self) -> Result<usize, (Side, RingFault)> {
        let max_frame = self.max_frame;
        let PathKind::Sink { copy: Some(slots) } = &mut self.kind else {
            return Ok(0);
        };
        let slot = max_frame as usize;
        let mut k = 0;
        Self::sink_burst::<R>(self.src.as_mut(), &mut self.src_chain, max_frame, |chain, len| {
            let at = (k % BURST as usize) * slot;
            let len = len as usize;
            if len <= slot {
                gather(chain, NET_HDR_LEN, &mut slots[at..at + len]);
            } else {
                read_super_frame(chain, len, &mut slots[at..at + slot]);
            }
            k += 1;
        })
    }

    /// One sink burst on `src`: what its transmit ring holds (up to `BURST`) taken with
    /// [`consume_tx`](Self::consume_tx), each frame handed to `frame`, the counts flushed.
    #[inline(always)]
    fn sink_burst<R: Ring>(
        src: Option<&mut QueueSlot>,
        buf: &mut ChainBuf,
        max_frame: u64,
        mut frame: impl FnMut(&Chain<'_>, u64),
    ) -> Result<usize, (Side, RingFault)> {
        let Some(src) = src else {
            return Ok(0);
        };
        let pair = src.pair();
        let gso = src.active.as_ref().map_or(0, |a| a.rx.features & SINK_GSO);
        let Some((ring, mem)) = src.ring::<R>() else { return Ok(0) };
        let n = ring.poll_avail().map_err(|b| (Side::Src, b))?.min(BURST);
        if n == 0 {
            return Ok(0);
        }
        let mut c = BurstCounts::default();
        let res = Self::consume_tx(ring, mem, buf, n, &mut c, |chain| {
            match Self::take_frame(chain, max_frame, &mut frame) {
                Took::Dropped(DropReason::Oversize) if gso != 0 && super_frame(chain, gso) => {
                    let len = chain.total - NET_HDR_LEN as u64;
                    frame(chain, len);
                    Took::Frame(len)
                }
                took => took,
            }
        });
        src.dev.stats[pair].flush_rx(&c);
        res.map_err(|b| (Side::Src, b))
    }

    /// A transmitted chain as [`consume_tx`](Self::consume_tx)'s callers usually take it:
    /// classified ([`tx_frame`](Self::tx_frame)), and a frame handed to `frame(chain, len)`.
    #[inline(always)]
    pub(crate) fn take_frame(chain: &Chain<'_>, max_frame: u64, frame: impl FnOnce(&Chain<'_>, u64)) -> Took {
        match Self::tx_frame(chain, max_frame) {
            Ok(len) => {
                frame(chain, len);
                Took::Frame(len)
            }
            Err(why) => Took::Dropped(why),
        }
    }

    /// Takes `n` available chains from `ring` (a guest's transmit queue, `n` at most
    /// what `poll_avail` reported): each is walked (through `mem`, into `buf`) and handed
    /// to `take`, which says what became of it ([`take_frame`](Self::take_frame) for a
    /// plain frame); a frame is counted in `c`, a bad one counted as a drop, and both
    /// completed with length 0; a chain `take` leaves stops the burst. The used index is
    /// published once. Returns the chains completed, or the bad descriptor that stopped
    /// the burst (the chains before it are completed).
    #[inline(always)]
    pub(crate) fn consume_tx<R: Ring>(
        ring: &mut R,
        mem: &GuestMemory,
        buf: &mut ChainBuf,
        n: u16,
        c: &mut BurstCounts,
        mut take: impl FnMut(&Chain<'_>) -> Took,
    ) -> Result<usize, RingFault> {
        let chain = buf.chain(mem);
        let mut done = 0;
        let mut failed = None;
        // Counted in locals, added to `c` once: the loop keeps them in registers however
        // large `BurstCounts` grows (in `c` they cost every frame a load and a store
        // each, `bench/callgrind.sh` be-gtx).
        let (mut packets, mut bytes) = (0u64, 0u64);
        for i in 0..n {
            let head = match ring.walk_avail(mem, i, Dir::DeviceReads, chain) {
                Ok(h) => h,
                Err(b) => {
                    failed = Some(b);
                    break;
                }
            };
            match take(chain) {
                Took::Frame(len) => {
                    packets += 1;
                    bytes += len;
                }
                Took::Dropped(why) => c.drop(why),
                Took::Left => break,
            }
            ring.add_used(head, 0);
            done += 1;
        }
        c.rx_packets += packets;
        c.rx_bytes += bytes;
        ring.consume(done);
        ring.publish_used();
        match failed {
            Some(b) => Err(b),
            None => Ok(done as usize),
        }
    }
}

/// The host segmentation offloads whose super-frames a `sink` takes whole.
const SINK_GSO: u64 = bit(f::NET_HOST_TSO4) | bit(f::NET_HOST_TSO6) | bit(f::NET_HOST_USO);

/// Whether a transmitted chain longer than the largest frame is a super-frame a sink
/// takes: its header asks for a segmentation type whose feature is among `gso`, and it
/// is at most 64 KiB of IP packet behind Ethernet and two VLAN tags. Its headers are not
/// checked (the frame is dropped anyway). Out of line: only oversize frames come here.
#[cold]
#[inline(never)]
fn super_frame(chain: &Chain<'_>, gso: u64) -> bool {
    let mut h = [0u8; NET_HDR_LEN];
    if chain.truncated || gather(chain, 0, &mut h) != NET_HDR_LEN {
        return false;
    }
    let Ok(Some(kind)) = NetHdr::from_bytes(h).gso_kind() else {
        return false;
    };
    gso & host_gso_feature(kind) != 0 && chain.total - NET_HDR_LEN as u64 <= MAX_SUPER_FRAME as u64
}

/// `--sink-read` of a super-frame longer than one slot: every byte read, a slot at a
/// time (out of line, as [`super_frame`]).
#[cold]
#[inline(never)]
fn read_super_frame(chain: &Chain<'_>, len: usize, slot: &mut [u8]) {
    let mut at = 0;
    while at < len {
        let n = (len - at).min(slot.len());
        gather(chain, NET_HDR_LEN + at, &mut slot[..n]);
        at += n;
    }
}
