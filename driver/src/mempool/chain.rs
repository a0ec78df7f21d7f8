//! Multi-segment packets and transmit offload requests: what a [`Packet`] carries beyond
//! its own buffer, kept where a plain packet never looks.
//!
//! Owns: the per-buffer metadata entry ([`BufMeta`]: the next buffer of a chain, a
//! segment's offset and length, a chain head's totals and transmit offload request), the
//! two tag bits of a packet's pool pointer that say an entry is in use, and the segment
//! API on [`Packet`] (walk, append, total length, copy out, linearise). Must not: touch
//! rings, allocate (the table is made with the pool), or give a segment to anyone but
//! the packet heading its chain.
//!
//! A chain is a head packet (its own buffer, offset and length, as any packet) plus
//! segments, each a buffer of the same pool with its own data offset and length, linked
//! through the metadata table: `meta[head].next` is the first segment, `meta[seg].next`
//! the one after it, [`NO_SEG`] at the end; `meta[head]` also keeps the last segment (for
//! appending), the segment count and the segments' bytes, so `total_len` reads one entry.
//! The head owns every segment: dropping it returns them all to the pool (one lock per
//! 64 buffers). As in DPDK, [`Packet::len`] and [`Packet::data`] are the head segment's
//! (`data_len`), [`Packet::total_len`] the frame's (`pkt_len`).
//!
//! Tags, in the low bits of the packet's pool pointer (the pool is 8-aligned):
//! [`TAG_CHAIN`] (the entry's chain fields are valid) and [`TAG_TX_OFFLOAD`] (its
//! offload request is). A plain packet has neither, so its pointer equals the pool's:
//! the transmit burst's "is this packet from my pool" comparison is also the "is it
//! plain" test, and the receive burst builds packets exactly as before. Tagged packets
//! take the general paths.

use super::{Mempool, Packet, PoolInner};
use crate::error::{Error, Result};
use spec::offload::GsoKind;

/// Tag: the packet heads a chain of more than one buffer.
pub(super) const TAG_CHAIN: usize = 1;
/// Tag: the packet carries a transmit offload request.
pub(super) const TAG_TX_OFFLOAD: usize = 2;
/// Both tags.
pub(super) const TAG_MASK: usize = 3;
const _: () = assert!(std::mem::align_of::<PoolInner>() > TAG_MASK);

/// No next segment.
pub(super) const NO_SEG: u32 = u32::MAX;
/// Most buffers in a pool (indices stay clear of [`NO_SEG`]).
pub(super) const MAX_BUFFERS: u32 = 1 << 30;
/// Most segments in one chain, the head included (a count kept in 16 bits).
pub const MAX_SEGS: usize = u16::MAX as usize;

/// A checksum the device is to complete (`VIRTIO_NET_HDR_F_NEEDS_CSUM`, virtio 1.2
/// §5.1.6.2): the one's-complement sum from `start` to the end of the frame is stored at
/// `start + offset`. Offsets count from the first byte of the frame (the Ethernet
/// header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxCsum {
    /// Where checksumming starts (the transport header).
    pub start: u16,
    /// Where the checksum goes, from `start` (16 for TCP, 6 for UDP).
    pub offset: u16,
}

/// A segmentation request (`gso_type`, `gso_size`, `hdr_len`, §5.1.6.2): the device
/// cuts the frame into segments of `size` payload bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxGso {
    /// TCPv4 (`HOST_TSO4`), TCPv6 (`HOST_TSO6`) or UDP (`HOST_USO`).
    pub kind: GsoKind,
    /// Payload bytes per segment (the MSS).
    pub size: u16,
    /// Length of the headers replicated in each segment (Ethernet, IP, TCP/UDP).
    pub hdr_len: u16,
}

/// A packet's transmit offload request, written into its virtio-net header by
/// [`TxQueue::tx_burst`](crate::TxQueue::tx_burst) (DPDK's `PKT_TX_*` flags with
/// `l2_len`/`l3_len`/`tso_segsz`). A request the port did not negotiate, or whose offsets
/// fall outside the frame, is refused for that packet: counted as `tx_bad_offload` and
/// not sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TxOffload {
    /// Checksum completion (`VIRTIO_NET_F_CSUM`). Segmentation needs it too.
    pub csum: Option<TxCsum>,
    /// Segmentation (`HOST_TSO4`, `HOST_TSO6`, `HOST_USO`).
    pub gso: Option<TxGso>,
}

impl TxOffload {
    /// No request.
    pub fn is_none(&self) -> bool {
        self.csum.is_none() && self.gso.is_none()
    }
}

/// One buffer's metadata entry (see the module comment).
#[derive(Debug, Clone, Copy)]
pub(super) struct BufMeta {
    /// Next segment, or [`NO_SEG`].
    next: u32,
    /// This buffer's data, when it is a segment after a head.
    off: u16,
    len: u16,
    /// Head only: the last segment, the segments after the head, and their bytes.
    last: u32,
    nseg: u16,
    rest: u32,
    /// Head only: the transmit offload request.
    tx: TxOffload,
}

impl Default for BufMeta {
    fn default() -> Self {
        BufMeta { next: NO_SEG, off: 0, len: 0, last: NO_SEG, nseg: 0, rest: 0, tx: TxOffload::default() }
    }
}

impl PoolInner {
    /// Buffer `idx`'s metadata entry, read.
    ///
    /// # Safety
    /// As [`PoolInner::meta`].
    #[inline]
    unsafe fn meta_get(&self, idx: u32) -> BufMeta {
        // SAFETY: per the contract: the entry of a buffer the caller owns.
        unsafe { *self.meta(idx) }
    }
    /// Buffer `idx`'s link fields as a segment: (next, data offset, length), read
    /// alone (the segment walks need no more of the entry).
    ///
    /// # Safety
    /// As [`PoolInner::meta`].
    #[inline]
    unsafe fn seg_fields(&self, idx: u32) -> (u32, u16, u16) {
        // SAFETY: per the contract: the entry of a buffer the caller owns.
        unsafe {
            let m = self.meta(idx);
            ((*m).next, (*m).off, (*m).len)
        }
    }
    /// Buffer `idx`'s metadata entry, written.
    ///
    /// # Safety
    /// As [`PoolInner::meta`].
    #[inline]
    unsafe fn meta_set(&self, idx: u32, m: BufMeta) {
        // SAFETY: per the contract: the entry of a buffer the caller owns.
        unsafe { *self.meta(idx) = m }
    }
}

/// The segments that follow a buffer [`Packet::link`] adds (the rest of an appended
/// chain): the first of them and the last (`NO_SEG`: none), how many, and their bytes.
#[derive(Clone, Copy)]
struct After {
    next: u32,
    last: u32,
    segs: u16,
    bytes: u32,
}

impl After {
    /// Nothing follows: a single buffer is linked.
    const NONE: After = After { next: NO_SEG, last: NO_SEG, segs: 0, bytes: 0 };
}

/// Why [`Packet::append`] refused `tail` (out of line: building the message is not on
/// the path of an append that works).
#[cold]
#[inline(never)]
fn append_refused(head: &Packet, tail: &Packet) -> Error {
    if tail.pool_ptr() != head.pool_ptr() {
        return Error::Config("a segment must come from the packet's own pool".into());
    }
    Error::Config(format!(
        "a chain of {} + {} segments and {} + {} bytes is too long",
        head.nb_segs(),
        tail.nb_segs(),
        head.total_len(),
        tail.total_len()
    ))
}

/// The segments of a packet, head first, as byte slices ([`Packet::segments`]).
pub struct Segments<'a> {
    pkt: &'a Packet,
    /// The next segment's buffer (`NO_SEG` after the last), `None` before the head.
    next: Option<u32>,
    left: usize,
}

impl<'a> Iterator for Segments<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        match self.next {
            None => {
                self.next = Some(self.pkt.first_seg());
                Some(self.pkt.data())
            }
            Some(idx) => {
                let (next, ptr, len) = self.pkt.seg_at(idx);
                self.next = Some(next);
                // SAFETY: a segment of this packet (the chain's links are the head's),
                // `off + len` inside its buffer (`append` and the receive path keep it
                // so); borrowed for as long as the packet is.
                Some(unsafe { std::slice::from_raw_parts(ptr, len) })
            }
        }
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl Packet {
    /// The head's metadata entry.
    #[inline]
    fn head_meta(&self) -> BufMeta {
        // SAFETY: this packet owns its buffer, `idx < count`.
        unsafe { self.inner().meta_get(self.idx) }
    }
    /// The head's entry, to read one field of it (a whole entry is about 40 bytes: the
    /// chain paths read the field they need).
    #[inline]
    fn head_entry(&self) -> *const BufMeta {
        // SAFETY: this packet owns its buffer, `idx < count`.
        unsafe { self.inner().meta(self.idx) }
    }
    /// The first segment after the head (`NO_SEG` if none).
    fn first_seg(&self) -> u32 {
        if self.tags() & TAG_CHAIN == 0 {
            return NO_SEG;
        }
        // SAFETY: the head's entry, which this packet owns.
        unsafe { (*self.head_entry()).next }
    }
    /// Segment `idx` of this chain: (next, data pointer, length).
    fn seg_at(&self, idx: u32) -> (u32, *const u8, usize) {
        let inner = self.inner();
        // SAFETY: `idx` is a segment of this chain (the caller walks the head's links),
        // so a buffer of the pool this packet owns.
        let (next, off, len) = unsafe { inner.seg_fields(idx) };
        // SAFETY: as above; `off` lies inside the buffer.
        let p = unsafe { inner.buf_ptr(idx).add(off as usize) };
        (next, p, len as usize)
    }

    /// Segments in the chain, the head included (1 for a plain packet: DPDK's
    /// `nb_segs`).
    pub fn nb_segs(&self) -> usize {
        if self.tags() & TAG_CHAIN == 0 {
            return 1;
        }
        // SAFETY: as in `first_seg`.
        1 + unsafe { (*self.head_entry()).nseg } as usize
    }
    /// Bytes in the whole chain (DPDK's `pkt_len`); [`len`](Self::len) is the head's.
    pub fn total_len(&self) -> usize {
        if self.tags() & TAG_CHAIN == 0 {
            return self.len as usize;
        }
        // SAFETY: as in `first_seg`.
        self.len as usize + unsafe { (*self.head_entry()).rest } as usize
    }
    /// Whether the packet heads a chain of more than one buffer.
    pub fn is_chained(&self) -> bool {
        self.tags() & TAG_CHAIN != 0
    }
    /// The segments' bytes, head first.
    pub fn segments(&self) -> Segments<'_> {
        Segments { pkt: self, next: None, left: self.nb_segs() }
    }
    /// Segment `i`'s bytes, writable (0 is the head: [`data_mut`](Self::data_mut)).
    pub fn segment_mut(&mut self, i: usize) -> Option<&mut [u8]> {
        if i == 0 {
            return Some(self.data_mut());
        }
        let mut idx = self.first_seg();
        for _ in 1..i {
            if idx == NO_SEG {
                return None;
            }
            idx = self.seg_at(idx).0;
        }
        if idx == NO_SEG {
            return None;
        }
        let (_, p, len) = self.seg_at(idx);
        // SAFETY: a segment of this packet, inside its buffer; `&mut self` makes the
        // access exclusive.
        Some(unsafe { std::slice::from_raw_parts_mut(p as *mut u8, len) })
    }
    /// Copies the whole frame (every segment) to the front of `out`; returns its length,
    /// or an error if `out` is shorter.
    pub fn copy_to(&self, out: &mut [u8]) -> Result<usize> {
        let total = self.total_len();
        if out.len() < total {
            return Err(Error::Config(format!("a {total}-byte frame does not fit {} bytes", out.len())));
        }
        let mut at = 0;
        for s in self.segments() {
            out[at..at + s.len()].copy_from_slice(s);
            at += s.len();
        }
        Ok(at)
    }

    /// Appends `tail` (a packet of the same pool, chained or not) after this packet's
    /// last segment: its segments become this chain's, and its transmit offload request,
    /// if any, is dropped. Nothing allocates. Fails (and drops `tail`) if `tail` is from
    /// another pool or the chain would exceed [`MAX_SEGS`] segments or 4 GiB.
    #[inline]
    pub fn append(&mut self, tail: Packet) -> Result<()> {
        if tail.pool_ptr() != self.pool_ptr() {
            return Err(append_refused(self, &tail));
        }
        let add_segs = tail.nb_segs();
        let add_bytes = tail.total_len();
        if self.nb_segs() + add_segs > MAX_SEGS || self.total_len() + add_bytes > u32::MAX as usize {
            return Err(append_refused(self, &tail));
        }
        let t_first = tail.first_seg();
        // SAFETY: the tail's head entry, which the tail owns.
        let new_last = if t_first == NO_SEG { tail.idx } else { unsafe { (*tail.head_entry()).last } };
        let (t_idx, t_off, t_len) = (tail.idx, tail.off, tail.len);
        // The tail's buffers are ours now (forgotten without being returned).
        std::mem::forget(tail);
        let after = After {
            next: t_first,
            last: new_last,
            segs: add_segs as u16 - 1,
            bytes: add_bytes as u32 - t_len as u32,
        };
        // SAFETY: the tail's buffers were just taken over; its head becomes a segment
        // with its own offset and length, followed by its own segments.
        unsafe { self.link(t_idx, t_off, t_len, after) };
        Ok(())
    }

    /// Links buffer `idx` (data `off`, `len`), followed by the segments `after` says, at
    /// the end of this chain. Writes only the fields a link changes: the new segment's `next`, `off`
    /// and `len`, the old last segment's `next`, the head's `next`/`last`/`nseg`/`rest`
    /// (the head's offload request stays), so that building a chain does not copy whole
    /// entries per segment.
    ///
    /// # Safety
    /// The caller owns buffer `idx` and the segments after it and gives them to this
    /// chain; `off + len <= buf_size`; the chain stays within [`MAX_SEGS`] segments and
    /// `u32::MAX` bytes.
    #[inline]
    unsafe fn link(&mut self, idx: u32, off: u16, len: u16, after: After) {
        let After { next, last, segs: more, bytes: more_bytes } = after;
        let inner = self.inner();
        // SAFETY: (every entry below) buffers this packet owns: its head, its segments,
        // and those the caller gives it; each entry is touched through its own pointer,
        // no two live at once.
        unsafe {
            let m = inner.meta(idx);
            (*m).next = next;
            (*m).off = off;
            (*m).len = len;
            let h = inner.meta(self.idx);
            let add = 1 + more;
            let bytes = len as u32 + more_bytes;
            if self.is_chained() {
                (*inner.meta((*h).last)).next = idx;
                (*h).nseg += add;
                (*h).rest += bytes;
            } else {
                (*h).next = idx;
                (*h).nseg = add;
                (*h).rest = bytes;
            }
            (*h).last = if last == NO_SEG { idx } else { last };
        }
        self.set_tag(TAG_CHAIN, true);
    }

    /// Appends buffer `idx` of this packet's pool as a segment with `len` bytes at `off`
    /// (the receive path's merge of a frame's buffers).
    ///
    /// # Safety
    /// The caller owns buffer `idx` (and gives it to this chain), `off + len <= buf_size`,
    /// and the chain stays within [`MAX_SEGS`] segments.
    pub(crate) unsafe fn push_segment_raw(&mut self, idx: u32, off: u16, len: u16) {
        debug_assert!(idx < self.inner().count && off as u32 + len as u32 <= self.inner().buf_size);
        // SAFETY: per the contract.
        unsafe { self.link(idx, off, len, After::NONE) };
    }

    /// Calls `f(idx, off, len)` for each segment after the head, in order (the transmit
    /// path's descriptor chain).
    pub(crate) fn for_each_raw_segment(&self, mut f: impl FnMut(u32, u16, u16)) {
        let inner = self.inner();
        let mut idx = self.first_seg();
        for _ in 1..self.nb_segs() {
            // SAFETY: a segment of this chain: a buffer this packet owns.
            let (next, off, len) = unsafe { inner.seg_fields(idx) };
            f(idx, off, len);
            idx = next;
        }
    }

    /// Calls `f(device address, len)` for each segment after the head, in order.
    pub(crate) fn for_each_segment_iova(&self, mut f: impl FnMut(u64, u16)) {
        let inner = self.inner();
        self.for_each_raw_segment(|idx, off, len| {
            // SAFETY: a segment of this chain: a buffer of this packet's pool.
            let p = unsafe { inner.buf_ptr(idx).add(off as usize) };
            f(inner.arena.iova(p), len);
        });
    }

    /// Copies every segment after the head to the head's tail and returns the segments
    /// to the pool, so the frame is one buffer; fails (changing nothing) if the head's
    /// tailroom is too small.
    pub fn linearize(&mut self) -> Result<()> {
        if !self.is_chained() {
            return Ok(());
        }
        let rest = self.total_len() - self.len();
        if rest > self.tailroom() {
            return Err(Error::Config(format!(
                "a {}-byte frame does not fit one buffer ({} bytes of tailroom after the first segment)",
                self.total_len(),
                self.tailroom()
            )));
        }
        let base = self.base();
        let mut at = self.off as usize + self.len as usize;
        self.for_each_raw_segment(|idx, off, len| {
            let (_, p, _) = self.seg_at(idx);
            debug_assert_eq!(p as usize, self.inner_buf(idx) as usize + off as usize);
            // SAFETY: source: a segment of ours inside its buffer; destination: the
            // head's tailroom (checked above: `at + len` stays inside the head's buffer);
            // different buffers, so no overlap.
            unsafe { std::ptr::copy_nonoverlapping(p, base.add(at), len as usize) };
            at += len as usize;
        });
        self.release_segments();
        self.len += rest as u16;
        Ok(())
    }

    /// The first byte of buffer `idx` of this packet's pool.
    fn inner_buf(&self, idx: u32) -> *mut u8 {
        // SAFETY: callers pass buffers of this chain (below `count`).
        unsafe { self.inner().buf_ptr(idx) }
    }

    /// Returns every segment after the head to the pool; the packet is then plain
    /// (its offload request, if any, stays).
    pub(super) fn release_segments(&mut self) {
        if !self.is_chained() {
            return;
        }
        let pool = self.pool_ptr();
        let mut buf = [0u32; 64];
        let mut n = 0;
        self.for_each_raw_segment(|idx, _, _| {
            if n == buf.len() {
                // SAFETY: segments of this chain: buffers this packet owns, given back once
                // (the chain is unlinked below before anything else can walk it).
                unsafe { PoolInner::put(pool, &buf) };
                n = 0;
            }
            buf[n] = idx;
            n += 1;
        });
        // SAFETY: as above.
        unsafe { PoolInner::put(pool, &buf[..n]) };
        self.set_tag(TAG_CHAIN, false);
    }

    /// Drop of a chained packet: its segments, then its own buffer.
    pub(super) fn drop_chain(&mut self) {
        self.release_segments();
        // SAFETY: this packet's buffer is outstanding, which keeps the pool alive.
        unsafe { PoolInner::put(self.pool_ptr(), &[self.idx]) }
    }

    /// Sets or clears tag `t`.
    #[inline]
    fn set_tag(&mut self, t: usize, on: bool) {
        let a = self.pool.as_ptr() as usize;
        let a = if on { a | t } else { a & !t };
        // SAFETY: the pool's address with tag bits: never null.
        self.pool = unsafe { std::ptr::NonNull::new_unchecked(a as *mut PoolInner) };
    }

    /// Sets this packet's transmit offload request (`TxOffload::default()` clears it).
    /// It is checked against the port and the frame when the packet is sent.
    pub fn set_tx_offload(&mut self, o: TxOffload) {
        let inner = self.inner();
        // SAFETY: this packet owns its buffer's entry.
        unsafe {
            let mut m = inner.meta_get(self.idx);
            m.tx = o;
            inner.meta_set(self.idx, m);
        }
        self.set_tag(TAG_TX_OFFLOAD, !o.is_none());
    }
    /// This packet's transmit offload request, if any.
    pub fn tx_offload(&self) -> Option<TxOffload> {
        if self.tags() & TAG_TX_OFFLOAD == 0 {
            return None;
        }
        Some(self.head_meta().tx)
    }
}

impl Mempool {
    /// A packet of `len` bytes copied from `bytes`, over as many buffers of this pool as
    /// it needs, each filled up to `seg` bytes (at most the room after the headroom): a
    /// chain when it needs more than one. `None` if the pool runs out (nothing is held).
    pub fn alloc_chain(&self, bytes: &[u8], seg: usize) -> Option<Packet> {
        let room = self.buf_size() as usize - self.headroom() as usize;
        let seg = seg.clamp(1, room);
        let mut chunks = bytes.chunks(seg);
        let mut head = self.alloc()?;
        head.set_data(chunks.next().unwrap_or(&[])).ok()?;
        for c in chunks {
            let mut s = self.alloc()?;
            s.set_data(c).ok()?;
            head.append(s).ok()?;
        }
        Some(head)
    }
}
