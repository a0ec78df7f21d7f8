//! Mergeable receive buffers (`VIRTIO_NET_F_MRG_RXBUF`, virtio 1.2 §5.1.6.3.2): one
//! frame scattered over several receive chains, the first chain's header saying how many
//! (`num_buffers`), each chain completed with the bytes written into it, all of them in
//! one burst (a driver that sees the first chain used expects the others used with it).
//!
//! Owns: finding enough receive chains for one frame (and deciding that a frame must
//! wait for the driver to post more, or can never fit), the copy of the header and the
//! frame over them, and their used entries. Must not: decide whether a frame is
//! delivered (filters, offloads: the caller's), consume chains (`Ring::consume` is the
//! caller's, which advances its own count by what [`scatter`] reports), or publish.
//!
//! Out of line on purpose: a frame that fits its first chain (every 64-byte frame) never
//! comes here, so the forwarding burst's per-frame path stays as it was.

use spec::layout::{NET_HDR_LEN, NET_HDR_NUM_BUFFERS};

use crate::memory::GuestMemory;
use crate::ring::Ring;
use crate::split_ring::{copy_chain, scatter as scatter_into, Chain, ChainBuf, Dir, RingFault};

/// Most receive chains one frame may span: a packed ring shows at most this many per
/// burst (`packed_ring::MAX_BURST`), and a 64 KiB super-frame in 1 KiB buffers needs no
/// more.
pub(crate) const MAX_BUFFERS: u16 = 64;

/// Where a frame's bytes come from.
#[derive(Clone, Copy)]
pub(crate) enum FrameSrc<'a, 'm> {
    /// A walked transmit chain, the frame starting at byte `.1` (after its net header).
    Chain(&'a Chain<'m>, usize),
    /// Bytes in host memory (a staged or segmented frame).
    Bytes(&'a [u8]),
    /// Bytes in host memory in two pieces, the frame being the first followed by the
    /// second (a generated frame's headers and its payload).
    Parts(&'a [u8], &'a [u8]),
}

impl FrameSrc<'_, '_> {
    /// Copies frame bytes `off .. off + len` into `dst` at `dst_off`.
    #[inline]
    pub(crate) fn copy_to(&self, off: usize, dst: &Chain<'_>, dst_off: usize, len: usize) -> usize {
        match *self {
            FrameSrc::Chain(c, base) => copy_chain(c, base + off, dst, dst_off, len),
            FrameSrc::Bytes(b) => match b.get(off..off + len) {
                Some(part) => scatter_into(dst, dst_off, part),
                None => 0,
            },
            FrameSrc::Parts(a, b) => {
                // The part of `off .. off + len` in `a`, then the rest from `b`.
                let in_a = a.len().saturating_sub(off).min(len);
                let mut n = 0;
                if in_a > 0 {
                    n += scatter_into(dst, dst_off, &a[off..off + in_a]);
                }
                let from_b = off + in_a - a.len().min(off + in_a);
                match b.get(from_b..from_b + (len - in_a)) {
                    Some(part) if n == in_a => n + scatter_into(dst, dst_off + n, part),
                    _ => n,
                }
            }
        }
    }
}

/// What became of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placed {
    /// Delivered over this many chains (the first one included), each completed.
    Done(u16),
    /// Not enough receive chains now; more may come (nothing was written or completed).
    Wait,
    /// It can never fit the chain it starts in, and may not spread over several (no
    /// mergeable buffers, or a first chain without room for the headers): the callers'
    /// `rx_buffer_too_small`. Nothing was written or completed.
    NoFit,
    /// It can never fit the ring: the chains a full ring holds (every descriptor posted),
    /// or [`MAX_BUFFERS`] of them, are too small: `rx_ring_too_small`. Nothing was written
    /// or completed.
    RingTooSmall,
}

/// Bytes a walked receive chain can take (its recorded pieces). Always inlined: out of
/// line it cost the forwarding burst a call per frame (`bench/callgrind.sh`).
#[inline(always)]
pub(crate) fn capacity(c: &Chain<'_>) -> u64 {
    c.segs().iter().map(|s| s.len as u64).sum()
}

/// Delivers `hdr` (its `num_buffers` is set here) followed by `len` bytes of `src` into
/// the receive chains `first_i ..` of `dr`: the chain `first_i` is already walked into
/// `first` (head `first_head`, room for at least the header), the next ones are walked
/// into `more`. `nrx` is how many chains the burst may walk; it grows when the ring
/// shows more ([`Ring::poll_more`]).
///
/// Looks first, writes second: the chains are walked once to find enough room, and only
/// then walked again for the copies, so a frame that must wait leaves every chain as it
/// was. A chain that breaks the protocol is the receive ring's fault.
#[inline(never)]
#[allow(clippy::too_many_arguments, reason = "one call site per burst kind; a struct would only rename them")]
pub(crate) fn scatter<'m, D: Ring>(
    dr: &mut D,
    dmem: &'m GuestMemory,
    nrx: &mut u16,
    first_i: u16,
    first: &Chain<'m>,
    first_head: D::Head,
    more: &mut ChainBuf,
    mut hdr: [u8; NET_HDR_LEN],
    src: FrameSrc<'_, '_>,
    len: usize,
) -> Result<Placed, RingFault> {
    let need = (NET_HDR_LEN + len) as u64;
    let first_cap = capacity(first);
    let mut cap = first_cap;
    let mut end = first_i + 1;
    let chain = more.chain(dmem);
    while cap < need {
        if end - first_i == MAX_BUFFERS {
            return Ok(Placed::RingTooSmall);
        }
        if end >= *nrx {
            *nrx = dr.poll_more()?;
            if end >= *nrx {
                // The chains posted fill every descriptor of the ring and it is not
                // enough: it never will be (the driver can post nothing more until this
                // frame is gone). A frame that does not start the burst gets a fresh look
                // at the next one.
                let full = first_i == 0 && (*nrx >= dr.size() || dr.avail_slots(*nrx) >= dr.size());
                return Ok(if full { Placed::RingTooSmall } else { Placed::Wait });
            }
        }
        dr.walk_avail(dmem, end, Dir::DeviceWrites, chain)?;
        cap += capacity(chain);
        end += 1;
    }
    let count = end - first_i;
    hdr[NET_HDR_NUM_BUFFERS..NET_HDR_NUM_BUFFERS + 2].copy_from_slice(&count.to_le_bytes());
    scatter_into(first, 0, &hdr);
    let n = (first_cap as usize).saturating_sub(NET_HDR_LEN).min(len);
    src.copy_to(0, first, NET_HDR_LEN, n);
    dr.add_used(first_head, (NET_HDR_LEN + n) as u32);
    let mut done = n;
    for i in first_i + 1..end {
        let h = dr.walk_avail(dmem, i, Dir::DeviceWrites, chain)?;
        let n = (capacity(chain) as usize).min(len - done);
        src.copy_to(done, chain, 0, n);
        dr.add_used(h, n as u32);
        done += n;
    }
    Ok(Placed::Done(count))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame larger than every chain the receive ring can hold at once: with the
    /// ring's descriptors not all posted it waits (the driver may post more); once the
    /// posted chains fill every descriptor it is `RingTooSmall` (chains of two
    /// descriptors: before, a ring that could never show `size` chains made it wait for
    /// ever); a frame that fits those chains is delivered over them, `num_buffers` set.
    #[test]
    fn a_frame_the_full_ring_cannot_hold_is_ring_too_small() {
        use crate::split_ring::tests::{fixture, Fixture};
        use spec::layout::DESC_F_WRITE;
        // 8 descriptors; chains of two 512-byte buffers: 4 chains, 4 KiB, fill the ring.
        let mut f = fixture(8, 0, false);
        let place = |f: &mut Fixture, len: usize| -> Placed {
            let mem = f.mem.clone();
            let mut nrx = f.ring.poll_avail().unwrap();
            let (mut first, mut more) = (ChainBuf::default(), ChainBuf::default());
            let c = first.chain(&mem);
            let head = f.ring.walk_avail(&mem, 0, Dir::DeviceWrites, c).unwrap();
            let frame: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let src = FrameSrc::Bytes(&frame);
            scatter(&mut f.ring, &mem, &mut nrx, 0, c, head, &mut more, [0; NET_HDR_LEN], src, len).unwrap()
        };
        for _ in 0..3 {
            f.drv.post(&[512, 512], false, DESC_F_WRITE);
        }
        f.drv.publish();
        assert_eq!(place(&mut f, 5000), Placed::Wait, "6 of 8 descriptors posted");
        f.drv.post(&[512, 512], false, DESC_F_WRITE);
        f.drv.publish();
        assert_eq!(place(&mut f, 5000), Placed::RingTooSmall);
        assert_eq!(place(&mut f, 4096 - NET_HDR_LEN + 1), Placed::RingTooSmall);
        assert_eq!(place(&mut f, 4096 - NET_HDR_LEN), Placed::Done(4));
    }

    /// `Parts` copies any range of the two pieces as if they were one frame.
    #[test]
    fn parts_copy_like_one_frame() {
        let a: Vec<u8> = (0..7).collect();
        let b: Vec<u8> = (7..20).collect();
        let whole: Vec<u8> = (0..20).collect();
        let src = FrameSrc::Parts(&a, &b);
        for off in 0..=20 {
            for len in 0..=20 - off {
                let mut buf = vec![0xeeu8; 32];
                let n = src.copy_to(off, &Chain::over(&mut buf), 3, len);
                assert_eq!(n, len, "off {off} len {len}");
                assert_eq!(&buf[3..3 + len], &whole[off..off + len], "off {off} len {len}");
                assert!(buf[..3].iter().chain(&buf[3 + len..]).all(|&x| x == 0xee), "off {off} len {len}");
            }
        }
    }
}
