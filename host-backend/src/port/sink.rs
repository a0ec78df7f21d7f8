//! The `sink` port's burst, and taking frames out of a guest's transmit queue (shared with
//! `--handoff`'s sending half).
//!
//! Owns: classifying a transmitted chain ([`PortPath::tx_frame`]), completing a burst of
//! transmit chains ([`PortPath::consume_tx`]) and `sink`'s count-and-drop (with
//! `--sink-read`, each frame copied out first).
//! Must not: write into guest buffers (a transmit chain is device-readable) or change
//! device state other than through `QueueSlot::fail`.

use spec::layout::NET_HDR_LEN;

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
        } else if chain.total < NET_HDR_LEN as u64 + ETH_HLEN {
            Err(DropReason::ShortFrame)
        } else if chain.total - NET_HDR_LEN as u64 > max_frame {
            Err(DropReason::Oversize)
        } else {
            Ok(chain.total - NET_HDR_LEN as u64)
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
            gather(chain, NET_HDR_LEN, &mut slots[at..at + len as usize]);
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
        let Some((ring, mem)) = src.ring::<R>() else { return Ok(0) };
        let n = ring.poll_avail().map_err(|b| (Side::Src, b))?.min(BURST);
        if n == 0 {
            return Ok(0);
        }
        let mut c = BurstCounts::default();
        let res = Self::consume_tx(ring, mem, buf, n, &mut c, |chain| {
            Self::take_frame(chain, max_frame, &mut frame)
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
