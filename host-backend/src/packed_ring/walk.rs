//! Walking one available chain of a packed ring into a [`Chain`] (virtio 1.2 §2.8.6
//! "Next Flag: Descriptor Chaining", §2.8.7 "Indirect Flag: Scatter-Gather Support").
//!
//! Owns: reading the descriptors of a chain the poll found (in the ring, or in an
//! indirect table), every check on them (directions, addresses, indirect tables) and on
//! the buffer id (not one in flight), and their translation into the chain.
//! Must not: move the ring's positions or write ring memory; decide a chain's extent
//! (the poll did, from the flags it acquired: a flags word the driver rewrites between
//! the poll and the walk changes nothing here).

use spec::packed::{PackedDescriptor, DESC_F_INDIRECT, DESC_F_WRITE, DESC_SIZE};

use super::{ChainAt, PackedHead, PackedRing};
use crate::iotlb::IovaView;
use crate::memory::GuestMemory;
use crate::split_ring::{
    iotlb_fault, map_buffer, read_desc_words, read_desc_words_aligned, Chain, Dir, RingFault, MAX_INDIRECT,
};

/// Reads descriptor `pos` of the descriptor ring at `ring` (16-byte aligned, checked in
/// `new`; volatile: the driver owns this memory).
///
/// # Safety
///
/// `ring` must be the ring's descriptor area and `pos` less than its size.
#[inline(always)]
pub(super) unsafe fn read_ring_desc(ring: *const u8, pos: u16) -> PackedDescriptor {
    // SAFETY: entry `pos` lies inside the ring (the caller's promise), 16-byte aligned.
    let (w0, w1) = unsafe { read_desc_words_aligned(ring.add(pos as usize * DESC_SIZE)) };
    PackedDescriptor::from_le_words(w0, w1)
}

/// Reads descriptor `i` of an indirect table at `table`, which may lie at any address
/// (volatile: the driver owns this memory).
///
/// # Safety
///
/// `table` must point to at least `i + 1` descriptors that stay mapped for the call
/// (callers pass `i < len / 16` for a table translated whole).
#[inline(always)]
unsafe fn read_desc(table: *const u8, i: u32) -> PackedDescriptor {
    // SAFETY: entry `i` lies inside the table (the caller's promise).
    let (w0, w1) = unsafe { read_desc_words(table.add(i as usize * DESC_SIZE)) };
    PackedDescriptor::from_le_words(w0, w1)
}

impl PackedRing {
    /// Walks the `i`-th chain the last poll found (`i` < what
    /// [`poll_avail`](Self::poll_avail) returned), checking every descriptor, direction
    /// and address, and records its buffers in `out` (translated through `mem`, which the
    /// chain then borrows, as with the split engine). Returns the buffer id and the
    /// chain's extent, for [`add_used`](Self::add_used).
    ///
    /// The id is the one the poll found and checked (not one in flight): a driver that
    /// rewrites it after the poll changes nothing here.
    #[inline(always)]
    pub fn walk_avail<'m>(
        &mut self,
        mem: &'m GuestMemory,
        i: u16,
        dir: Dir,
        out: &mut Chain<'m>,
    ) -> Result<PackedHead, RingFault> {
        if i >= self.found {
            // Not a guest's doing: a port asked past its poll. No chain there.
            return Err(RingFault::HeadOutOfRange { head: i });
        }
        // The common case decided inline, returning straight from here (see `direct`).
        // Anything else (and every case that fails a check) goes the general way, which
        // reads the descriptors again and decides everything itself, so the result never
        // depends on the shortcut.
        let at = self.chains[i as usize];
        if let Some((ptr, len, head)) = self.direct_at(mem, at, dir) {
            out.set_single(ptr, len, head.reads_only());
            return Ok(head);
        }
        self.walk_avail_general(mem, at, dir, out)
    }

    /// The `i`-th chain the last poll found, when it is the common case: one direct
    /// descriptor, not empty, of direction `dir`, whose buffer lies whole in one memory
    /// region, on a ring without an IOMMU. Returns the buffer's host address and length
    /// and the head for [`add_used`](Self::add_used); `None` for anything else (the
    /// general walk then decides, and reports what is wrong). The walk's inline case, and
    /// a forwarding burst's plain frames, which need no [`Chain`] (`port/plain.rs`).
    #[inline(always)]
    pub fn direct(&mut self, mem: &GuestMemory, i: u16, dir: Dir) -> Option<(*mut u8, u32, PackedHead)> {
        if i >= self.found {
            return None;
        }
        self.direct_at(mem, self.chains[i as usize], dir)
    }

    /// [`direct`](Self::direct) of the chain the poll recorded as `at`.
    #[inline(always)]
    fn direct_at(&mut self, mem: &GuestMemory, at: ChainAt, dir: Dir) -> Option<(*mut u8, u32, PackedHead)> {
        if at.count() != 1 || self.iova.is_some() {
            return None;
        }
        // SAFETY: `at.pos() < size`, the ring's length.
        let d = unsafe { read_ring_desc(self.desc, at.pos()) };
        let writable = d.flags & DESC_F_WRITE != 0;
        if d.flags & DESC_F_INDIRECT != 0 || d.len == 0 || !dir.admits(writable, false) {
            return None;
        }
        match mem.translate(&mut self.hint, d.addr, d.len as u64) {
            Some((ptr, n)) if n == d.len as u64 => Some((ptr, d.len, PackedHead::new(at.id(), 1, !writable))),
            _ => None,
        }
    }

    /// [`walk_avail`](Self::walk_avail) for every case the inline one does not take.
    #[inline(never)]
    fn walk_avail_general<'m>(
        &mut self,
        mem: &'m GuestMemory,
        at: ChainAt,
        dir: Dir,
        out: &mut Chain<'m>,
    ) -> Result<PackedHead, RingFault> {
        let reads_only = self.walk_chain(mem, at, dir, out)?;
        Ok(PackedHead::new(at.id(), at.count(), reads_only))
    }

    /// The walk of any chain: several descriptors, an indirect table, several regions,
    /// an IOMMU. Returns whether no buffer of the chain is device-writable.
    #[inline]
    fn walk_chain<'m>(
        &mut self,
        mem: &'m GuestMemory,
        at: ChainAt,
        dir: Dir,
        out: &mut Chain<'m>,
    ) -> Result<bool, RingFault> {
        out.clear();
        let mut writing = false;
        let mut pos = at.pos();
        for _ in 0..at.count() {
            // SAFETY: `pos < size` (every position is).
            let d = unsafe { read_ring_desc(self.desc, pos) };
            if d.flags & DESC_F_INDIRECT != 0 {
                // A driver must not put an indirect descriptor in a list linked by NEXT
                // (§2.8.19, driver requirements on indirect descriptors): it is a chain
                // of its own.
                let n = d.len / DESC_SIZE as u32;
                if at.count() != 1
                    || !self.indirect
                    || d.len == 0
                    || d.len % DESC_SIZE as u32 != 0
                    || n > MAX_INDIRECT
                    || n > self.size as u32
                {
                    return Err(RingFault::BadIndirect { len: d.len });
                }
                let bad = RingFault::IndirectAddress { addr: d.addr, len: d.len };
                let table = match self.iova.as_mut() {
                    None => mem.translate_whole(&mut self.hint, d.addr, d.len as u64).ok_or(bad)?,
                    Some(v) => v
                        .translate_whole(mem, d.addr, d.len as u64, false)
                        .map_err(|f| iotlb_fault(f, false, bad))?,
                };
                for j in 0..n {
                    // SAFETY: `j < len / 16`, and the table was translated whole.
                    let e = unsafe { read_desc(table, j) };
                    // Entries are in order; only WRITE means anything in them
                    // (§2.8.19: no other flag may be set); a nested table is malformed.
                    if e.flags & DESC_F_INDIRECT != 0 {
                        return Err(RingFault::BadIndirect { len: e.len });
                    }
                    self.buffer(mem, e, dir, &mut writing, out)?;
                    if out.truncated {
                        // More pieces than a port can use: the port drops the chain
                        // (`too_many_segments`); the rest of the table is not read.
                        break;
                    }
                }
            } else {
                self.buffer(mem, d, dir, &mut writing, out)?;
            }
            (pos, _) = self.advance(pos, false, 1);
        }
        Ok(!writing)
    }

    /// One buffer of a chain: its direction checked against the queue's (and against
    /// those before it), then translated into `out`.
    #[inline]
    fn buffer<'m>(
        &mut self,
        mem: &'m GuestMemory,
        d: PackedDescriptor,
        dir: Dir,
        writing: &mut bool,
        out: &mut Chain<'m>,
    ) -> Result<(), RingFault> {
        let writable = d.flags & DESC_F_WRITE != 0;
        if !dir.admits(writable, *writing) {
            return Err(RingFault::Direction);
        }
        *writing |= writable;
        let iova: Option<&mut IovaView> = self.iova.as_mut();
        map_buffer(mem, &mut self.hint, iova, d.addr, d.len, writable, out)?;
        if !writable {
            out.readable += d.len as u64;
        }
        Ok(())
    }
}
