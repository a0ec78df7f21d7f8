//! The device side of a split virtqueue, written for batching (virtio 1.2 §2.7).
//!
//! Owns: one queue's ring pointers (translated once at activation), its private indices
//! (`last_avail`, the shadow used index), the avail/used/notification protocol and the
//! validation of everything the driver wrote: indices, heads, `next` links, chain
//! lengths, indirect tables, buffer directions and addresses.
//! Must not: decide what a packet means (the ports do), allocate, lock, or make a
//! syscall other than the one call-eventfd write a burst may need.
//!
//! Shared ring memory is only touched through raw pointers with atomic or volatile
//! accesses; no Rust reference into it is ever formed. The orderings:
//! * `avail.idx` is loaded with `Acquire` once per burst: it pairs with the driver's
//!   release (write barrier) after it wrote the avail entries and descriptors, so every
//!   entry and descriptor read after that load is what the driver published.
//! * Used elements are written with volatile stores and published by one `Release`
//!   store of `used.idx` per burst: packet data written into device-writable buffers and
//!   the elements themselves become visible to the driver before the new index.
//! * Before reading `used_event` / `avail.flags` to decide whether to notify, and before
//!   re-checking `avail.idx` after re-enabling kicks, a `SeqCst` fence orders our store
//!   before that load (store→load), pairing with the driver's full barrier on its side,
//!   so neither side can miss the other's update.
//!
//! A burst looks like: [`DeviceRing::poll_avail`] (one acquire load),
//! [`DeviceRing::walk_avail`] over the run of new entries (head, then chain, into a
//! [`Chain`] that borrows the guest memory), [`DeviceRing::add_used`] per finished chain,
//! [`DeviceRing::consume`], then one [`DeviceRing::publish_used`] (or
//! `ring::publish_used_pair` for a burst that completes on two rings).
//!
//! Here: the ring itself (areas, indices, walk, used elements, notifications). In
//! `chain`: the walked chain's types ([`Chain`], [`ChainBuf`]) and their lifetime; in
//! `copy`: the copies over a chain; in `fault`: [`RingFault`]; in `setup`: building a
//! ring from its [`RingConfig`] at activation; `tests`: the unit and
//! property tests (virtio-queue's driver side as the oracle).

use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;

use spec::layout::{self, Descriptor, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};

use spec::prefetch::WritePrefetch;

use crate::iotlb::IovaView;
use crate::memory::{GuestMemory, Hint};

mod chain;
mod copy;
mod fault;
mod setup;

pub(crate) use chain::{Chain, ChainBuf};
pub(crate) use copy::{copy_chain, gather, scatter};
pub(crate) use fault::iotlb_fault;
pub(crate) use fault::RingFault;
pub(crate) use setup::{translate_areas, RingConfig};

/// Most segments one chain may map to. Longer (valid) chains are dropped, counted as
/// `too_many_segments`, and returned to the driver; they do not break the queue.
pub(crate) const MAX_SEGS: usize = 64;
/// Largest indirect table accepted, in descriptors. The spec sets no limit; a larger
/// table is treated as malformed so that one chain cannot make us walk megabytes.
pub(crate) const MAX_INDIRECT: u32 = 1024;

/// Which buffers a queue must carry: the device reads the transmit queue and writes the
/// receive queue (§5.1.6); a control queue's chain is a command the device reads followed
/// by the acknowledgement it writes (§5.1.6.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    /// Every descriptor must be device-readable (a transmit queue).
    DeviceReads,
    /// Every descriptor must be device-writable (a receive queue).
    DeviceWrites,
    /// Device-readable descriptors, then device-writable ones ("the driver MUST place any
    /// device-writable descriptor elements after any device-readable descriptor elements",
    /// §2.7.4.2); a readable one after a writable one is [`RingFault::Direction`].
    ReadsThenWrites,
}

impl Dir {
    /// Whether a descriptor that is device-writable (`writable`) may come next in a chain
    /// of this direction, `writing` telling whether a writable one came before it.
    #[inline(always)]
    pub(crate) fn admits(self, writable: bool, writing: bool) -> bool {
        match self {
            Dir::DeviceReads => !writable,
            Dir::DeviceWrites => writable,
            Dir::ReadsThenWrites => writable || !writing,
        }
    }
}

/// The two 64-bit words of the 16-byte descriptor at `p`, as they lie in memory (each
/// layout's `from_le_words` decodes them), read with volatile loads (the driver owns
/// this memory). Shared by both ring engines: a split descriptor and a packed one are
/// both 16 bytes.
///
/// # Safety
///
/// `p` must point to 16 readable bytes that stay mapped for the call.
#[inline(always)]
pub(crate) unsafe fn read_desc_words(p: *const u8) -> (u64, u64) {
    if p as usize % 8 == 0 {
        // SAFETY: 16 readable bytes (the caller's promise), 8-byte aligned.
        unsafe { read_desc_words_aligned(p) }
    } else {
        // An indirect table the driver placed at an address that is not 8-byte aligned
        // (the spec does not forbid it).
        // SAFETY: 16 readable bytes; a byte array has no alignment requirement.
        let b = unsafe { std::ptr::read_volatile(p as *const [u8; 16]) };
        let w = |r: &[u8]| u64::from_ne_bytes(r.try_into().unwrap_or([0; 8]));
        (w(&b[..8]), w(&b[8..]))
    }
}

/// [`read_desc_words`] for a descriptor known to be 8-byte aligned (a ring's own, whose
/// area `new` checked): two aligned 64-bit loads, no test (a byte-array read compiles
/// to 16 byte loads and ~30 shifts).
///
/// # Safety
///
/// `p` must be 8-byte aligned and point to 16 readable bytes that stay mapped for the
/// call.
#[inline(always)]
pub(crate) unsafe fn read_desc_words_aligned(p: *const u8) -> (u64, u64) {
    // SAFETY: the caller's promise.
    unsafe {
        let q = p as *const u64;
        (std::ptr::read_volatile(q), std::ptr::read_volatile(q.add(1)))
    }
}

/// Asks for the first `lines` cache lines of the `n` bytes at `ptr` (to read): a hint
/// only, it never faults whatever the address.
#[inline(always)]
pub(crate) fn prefetch_lines_read(ptr: *const u8, n: u64, lines: usize) {
    let end = ptr as usize + n as usize;
    let mut line = ptr as usize & !63;
    for _ in 0..lines {
        if line >= end {
            break;
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: PREFETCHT0 (SSE, present on every x86_64 CPU) only hints the cache: it
        // reads no architectural state and does not fault on any address.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line as *const i8)
        };
        line += 64;
    }
}

/// Asks for the first `lines` cache lines of the `n` bytes at `ptr` in a writable state
/// (the receive-buffer hint both engines give before a burst's copies).
#[inline(always)]
pub(crate) fn prefetch_lines(pw: WritePrefetch, ptr: *mut u8, n: u64, lines: usize) {
    let end = ptr as usize + n as usize;
    let mut line = ptr as usize & !63;
    for _ in 0..lines {
        if line >= end {
            break;
        }
        pw.line(line as *const u8);
        line += 64;
    }
}

/// Host addresses of the three ring areas of one queue.
#[derive(Debug, Clone, Copy)]
struct RingAreas {
    /// Descriptor table.
    pub desc: *mut u8,
    /// Driver area (avail ring).
    pub avail: *mut u8,
    /// Device area (used ring).
    pub used: *mut u8,
}

/// The device side of one split virtqueue, owned by exactly one worker.
pub(crate) struct DeviceRing {
    areas: RingAreas,
    size: u16,
    mask: u16,
    last_avail: u16,
    used_idx: u16,
    pending_used: u16,
    event_idx: bool,
    indirect: bool,
    mem: Arc<GuestMemory>,
    hint: Hint,
    /// With `ACCESS_PLATFORM`: addresses are IOVAs, translated through the IOTLB.
    iova: Option<IovaView>,
    notify_fd: Option<i32>,
    /// The CPU has `PREFETCHW` (see [`prefetch_write`](Self::prefetch_write)).
    write_prefetch: Option<WritePrefetch>,
    /// Calls made to the driver (used-buffer notifications).
    pub calls: u64,
    /// Avail entries consumed since activation (`last_avail` without wrapping).
    consumed: u64,
    /// Per head: 1 + the unwrapped avail position at which a chain of several
    /// descriptors last started there (0: never). A head found again at a later position
    /// while that earlier one is not consumed yet is available twice
    /// ([`RingFault::HeadInFlight`]). Only the out-of-line walk keeps it: a
    /// one-descriptor chain costs the same whether its head is duplicated or not.
    walked_at: Box<[u64]>,
}

// SAFETY: the raw pointers point into `mem`'s mappings, which the `Arc` keeps alive; a
// `DeviceRing` is moved to its worker once and used by that thread only.
unsafe impl Send for DeviceRing {}

impl DeviceRing {
    /// The next avail slot the device will consume (what `GET_VRING_BASE` reports).
    pub fn last_avail(&self) -> u16 {
        self.last_avail
    }

    /// Entries in the ring.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Descriptors of the main table the first `chains` available chains occupy (links
    /// followed in the main table; an indirect descriptor counts as one), at most `size`.
    /// Each chain's count stops at `size` links and at anything out of range: the walk
    /// judges those, this only counts (a driver whose chains overlap is told the ring is
    /// full sooner, which costs only its own frames).
    #[inline(never)]
    pub fn avail_slots(&mut self, chains: u16) -> u16 {
        let mut total: u32 = 0;
        for i in 0..chains.min(self.size) {
            let Ok(mut idx) = self.head(i) else { break };
            for _ in 0..self.size {
                total += 1;
                // SAFETY: `idx < size` (from `head`, or checked below), the main table's
                // length.
                let d = unsafe { Self::read_desc(self.areas.desc, idx) };
                if d.flags & DESC_F_NEXT == 0 || d.flags & DESC_F_INDIRECT != 0 || d.next >= self.size {
                    break;
                }
                idx = d.next;
            }
            if total >= self.size as u32 {
                return self.size;
            }
        }
        total as u16
    }

    /// The 16-bit field at byte `off` of a ring area, as an atomic.
    ///
    /// # Safety
    ///
    /// `area` must be one of `self.areas`' `avail` or `used` and `off + 2` at most that
    /// area's size for `self.size` (`avail_bytes`/`used_bytes`), `off` even.
    #[inline(always)]
    unsafe fn ring_u16(&self, area: *mut u8, off: usize) -> &AtomicU16 {
        // SAFETY: by the caller's promise `area + off` lies inside a ring area validated
        // in `new`; it is 2-byte aligned (area alignment was checked, `off` is even), and
        // the mapping outlives `self` (the ring holds its `Arc<GuestMemory>`).
        // `AtomicU16` may alias memory another process writes: that is what atomics are for.
        unsafe { AtomicU16::from_ptr(area.add(off) as *mut u16) }
    }
    /// `avail.idx` (driver area).
    #[inline(always)]
    fn avail_idx(&self) -> &AtomicU16 {
        // SAFETY: `AVAIL_IDX + 2 <= avail_bytes(size)`, even.
        unsafe { self.ring_u16(self.areas.avail, layout::AVAIL_IDX) }
    }
    /// `avail.flags` (driver area).
    #[inline(always)]
    fn avail_flags(&self) -> &AtomicU16 {
        // SAFETY: `AVAIL_FLAGS + 2 <= avail_bytes(size)`, even.
        unsafe { self.ring_u16(self.areas.avail, layout::AVAIL_FLAGS) }
    }
    /// `used_event`, after the avail ring (driver area, EVENT_IDX).
    #[inline(always)]
    fn used_event(&self) -> &AtomicU16 {
        // SAFETY: `used_event(size) + 2 == avail_bytes(size)`, even.
        unsafe { self.ring_u16(self.areas.avail, layout::used_event(self.size)) }
    }
    /// `used.idx` (device area).
    #[inline(always)]
    fn used_idx_field(&self) -> &AtomicU16 {
        // SAFETY: `USED_IDX + 2 <= used_bytes(size)`, even.
        unsafe { self.ring_u16(self.areas.used, layout::USED_IDX) }
    }
    /// `used.flags` (device area).
    #[inline(always)]
    fn used_flags(&self) -> &AtomicU16 {
        // SAFETY: `USED_FLAGS + 2 <= used_bytes(size)`, even.
        unsafe { self.ring_u16(self.areas.used, layout::USED_FLAGS) }
    }
    /// `avail_event`, after the used ring (device area, EVENT_IDX).
    #[inline(always)]
    fn avail_event(&self) -> &AtomicU16 {
        // SAFETY: `avail_event(size) + 2 == used_bytes(size)`, even.
        unsafe { self.ring_u16(self.areas.used, layout::avail_event(self.size)) }
    }

    /// Loads `avail.idx` once (`Acquire`, see the module comment) and returns how many
    /// new chains the driver has made available, or `RingFault::AvailJump`.
    #[inline]
    pub fn poll_avail(&mut self) -> Result<u16, RingFault> {
        let avail = self.avail_idx().load(Ordering::Acquire);
        let n = avail.wrapping_sub(self.last_avail);
        if n > self.size {
            return Err(RingFault::AvailJump { last_avail: self.last_avail, avail });
        }
        Ok(n)
    }

    /// The head index of the `i`-th unconsumed avail entry (`i` < the value
    /// [`poll_avail`](Self::poll_avail) returned), validated against the ring size.
    #[inline]
    fn head(&self, i: u16) -> Result<u16, RingFault> {
        let slot = self.last_avail.wrapping_add(i) & self.mask;
        // SAFETY: `avail_entry(slot)` with `slot < size` is inside the driver area;
        // 2-byte aligned; the entry was published before the avail idx we acquired.
        let head =
            unsafe { std::ptr::read_volatile(self.areas.avail.add(layout::avail_entry(slot)) as *const u16) };
        let head = u16::from_le(head);
        if head >= self.size {
            return Err(RingFault::HeadOutOfRange { head });
        }
        Ok(head)
    }

    /// Asks for the first `lines` cache lines of the buffer behind the `i`-th
    /// unconsumed avail entry in a writable state, before the burst writes them. A hint
    /// only: it validates nothing and reports nothing; whatever it cannot place cheaply
    /// (a bad head, an indirect table, an address under an IOMMU or outside memory) it
    /// skips, and [`walk_avail`](Self::walk_avail) judges the chain as always.
    ///
    /// Why: a receive buffer is a line the driver wrote last (its previous frame's
    /// header, its own forwarding), so each store of a burst's copies waits for a
    /// line to come over from the other core, one after another as the stores retire.
    /// Asking for all of a burst's lines first lets those transfers overlap (see
    /// `host-backend/bench/results/HISTORY.md` for what it changed against DPDK's
    /// virtio-user `macswap`).
    ///
    /// Always inlined: behind the port's generic `Ring` call the compiler kept it out of
    /// line in `reflect`'s burst (`bench/callgrind.sh`).
    #[inline(always)]
    pub fn prefetch_write(&mut self, i: u16, lines: usize) {
        let Some(pw) = self.write_prefetch else { return };
        if let Some((ptr, n)) = self.first_buffer(i) {
            prefetch_lines(pw, ptr, n, lines);
        }
    }

    /// The first buffer of the `i`-th available chain, translated, for the prefetch
    /// hints: none behind an IOMMU (a miss must not be raised for a hint) or for an
    /// indirect table.
    #[inline(always)]
    fn first_buffer(&mut self, i: u16) -> Option<(*mut u8, u64)> {
        if self.iova.is_some() {
            return None;
        }
        let head = self.head(i).ok()?;
        // SAFETY: `head < size` (checked by `head`), the main table's length.
        let d = unsafe { Self::read_desc(self.areas.desc, head) };
        if d.flags & DESC_F_INDIRECT != 0 {
            return None;
        }
        self.mem.translate(&mut self.hint, d.addr, d.len as u64)
    }

    /// [`prefetch_write`](Self::prefetch_write)'s counterpart for a transmitted frame the
    /// burst will read (`--prefetch-tx`): its lines were written last by the driver, on
    /// the other core.
    #[inline(always)]
    pub fn prefetch_read(&mut self, i: u16, lines: usize) {
        if let Some((ptr, n)) = self.first_buffer(i) {
            prefetch_lines_read(ptr, n, lines);
        }
    }

    /// Reads descriptor `i` of the descriptor table at `table` (volatile: the driver owns
    /// this memory).
    ///
    /// # Safety
    ///
    /// `table` must point to a descriptor table of more than `i` entries that stays mapped
    /// for the call: callers pass `i` below the table length they validated against the
    /// mapping (`size` for the main table, `len / 16` for an indirect table).
    #[inline(always)]
    unsafe fn read_desc(table: *const u8, i: u16) -> Descriptor {
        // SAFETY: entry `i` lies inside the table and stays mapped (the caller's promise).
        let (w0, w1) = unsafe { read_desc_words(table.add(i as usize * layout::DESC_SIZE)) };
        Descriptor::from_le_words(w0, w1)
    }

    /// Takes the head of the `i`-th unconsumed avail entry (`i` < the value
    /// [`poll_avail`](Self::poll_avail) returned; see [`head`](Self::head)) and walks its
    /// chain, checking every link, direction and address, and records its buffers in
    /// `out`. Returns the head, for [`add_used`](Self::add_used).
    ///
    /// The buffers are translated through `mem`, which the chain then borrows: `mem` is
    /// the ring's own memory (the `Arc` the ring was activated with), borrowed by the
    /// caller for as long as it uses the chain, so no chain outlives its mappings.
    #[inline(always)]
    pub fn walk_avail<'m>(
        &mut self,
        mem: &'m GuestMemory,
        i: u16,
        dir: Dir,
        out: &mut Chain<'m>,
    ) -> Result<u16, RingFault> {
        let head = self.head(i)?;
        self.walk(mem, i, head, dir, out)?;
        Ok(head)
    }

    /// Walks the chain starting at `head` (`head < size`: a value [`head`](Self::head)
    /// returned) into `out`, its buffers translated through `mem`.
    ///
    /// The common case, one direct descriptor in one memory region without an IOMMU, is
    /// decided here inline; anything else (and every case that fails a check) goes the
    /// general way, which reads the descriptor again and decides everything itself, so the
    /// result never depends on the shortcut.
    ///
    /// Always inlined, with the descriptor read and the address translation: with
    /// `#[inline]` alone the compiler kept all three out of line in the burst loops (a
    /// call, six saved registers and a returned result per chain), which cost every
    /// path a large share of its instructions per packet (`bench/callgrind.sh`).
    #[inline(always)]
    fn walk<'m>(
        &mut self,
        mem: &'m GuestMemory,
        i: u16,
        head: u16,
        dir: Dir,
        out: &mut Chain<'m>,
    ) -> Result<(), RingFault> {
        debug_assert!(head < self.size);
        // SAFETY: `head < size` (from `head`), the main table's length.
        let d = unsafe { Self::read_desc(self.areas.desc, head) };
        if d.flags & (DESC_F_NEXT | DESC_F_INDIRECT) == 0 && d.len > 0 && self.iova.is_none() {
            let writable = d.flags & DESC_F_WRITE != 0;
            if dir.admits(writable, false) {
                if let Some((ptr, n)) = mem.translate(&mut self.hint, d.addr, d.len as u64) {
                    if n == d.len as u64 {
                        out.set_single(ptr, d.len, !writable);
                        return Ok(());
                    }
                }
            }
        }
        self.walk_chain(mem, i, head, dir, out)
    }

    /// [`walk`](Self::walk) for any chain: links, indirect tables, several regions.
    ///
    /// Work bounds: the walk stops as soon as the chain has more pieces than a port can
    /// use ([`MAX_SEGS`]): the chain is then `truncated`, which every port drops and
    /// counts (`too_many_segments`), without reading the rest of it; so one chain costs
    /// at most `MAX_SEGS + 1` buffer descriptors (plus one indirect one) whatever its
    /// length. A head whose chain is already available at an earlier unconsumed
    /// position (`walked_at`) breaks the queue: a hostile driver cannot make the device
    /// walk one long chain for every avail entry of a burst.
    #[inline(never)]
    fn walk_chain<'m>(
        &mut self,
        mem: &'m GuestMemory,
        i: u16,
        head: u16,
        dir: Dir,
        out: &mut Chain<'m>,
    ) -> Result<(), RingFault> {
        let pos = self.consumed.wrapping_add(i as u64);
        if let Some(at) = self.walked_at.get_mut(head as usize) {
            if *at > self.consumed && *at - 1 < pos {
                return Err(RingFault::HeadInFlight { head });
            }
            *at = pos + 1;
        }
        out.clear();
        let mut table = self.areas.desc as *const u8;
        let mut table_len = self.size as u32;
        let mut idx = head;
        // `seen` bounds the walk through the current table (a loop revisits an entry);
        // `buffers` bounds the whole chain: "a driver MUST NOT create a descriptor chain
        // longer than the Queue Size" (§2.7.5.3.1), indirect entries included.
        let mut seen: u32 = 0;
        let mut buffers: u32 = 0;
        let mut in_indirect = false;
        let mut writing = false;
        loop {
            seen += 1;
            if seen > table_len {
                return Err(RingFault::ChainTooLong);
            }
            // SAFETY: `idx < table_len`: `head < size` for the main table, 0 for an
            // indirect one, and every `next` was checked against `table_len` below;
            // `table` is the main table or an indirect one translated whole.
            let d = unsafe { Self::read_desc(table, idx) };
            if d.flags & DESC_F_INDIRECT != 0 {
                if in_indirect
                    || !self.indirect
                    || d.flags & DESC_F_NEXT != 0
                    || d.len == 0
                    || d.len % layout::DESC_SIZE as u32 != 0
                    || d.len / layout::DESC_SIZE as u32 > MAX_INDIRECT
                {
                    return Err(RingFault::BadIndirect { len: d.len });
                }
                let bad = RingFault::IndirectAddress { addr: d.addr, len: d.len };
                table = match self.iova.as_mut() {
                    None => mem.translate_whole(&mut self.hint, d.addr, d.len as u64).ok_or(bad)?,
                    Some(v) => v
                        .translate_whole(mem, d.addr, d.len as u64, false)
                        .map_err(|f| iotlb_fault(f, false, bad))?,
                };
                table_len = d.len / layout::DESC_SIZE as u32;
                idx = 0;
                seen = 0;
                in_indirect = true;
                continue;
            }
            buffers += 1;
            if buffers > self.size as u32 {
                return Err(RingFault::ChainTooLong);
            }
            let writable = d.flags & DESC_F_WRITE != 0;
            if !dir.admits(writable, writing) {
                return Err(RingFault::Direction);
            }
            writing |= writable;
            self.map_buffer(mem, d.addr, d.len, writable, out)?;
            if !writable {
                out.readable += d.len as u64;
            }
            if d.flags & DESC_F_NEXT == 0 || out.truncated {
                // The end, or more than a port can use: abandoned here (see above).
                return Ok(());
            }
            if d.next as u32 >= table_len {
                return Err(RingFault::NextOutOfRange { next: d.next });
            }
            idx = d.next;
        }
    }

    #[inline]
    fn map_buffer<'m>(
        &mut self,
        mem: &'m GuestMemory,
        addr: u64,
        len: u32,
        write: bool,
        out: &mut Chain<'m>,
    ) -> Result<(), RingFault> {
        map_buffer(mem, &mut self.hint, self.iova.as_mut(), addr, len, write, out)
    }

    /// Writes the used element for `head` with `len` bytes written, after the ones
    /// already pending; nothing is visible to the driver before
    /// [`publish_used`](Self::publish_used).
    ///
    /// (Holding a burst's elements back and writing them in one run before the publish,
    /// as DPDK's vhost does, was tried: it cost more instructions per packet in every
    /// path. Not kept.)
    #[inline]
    pub fn add_used(&mut self, head: u16, len: u32) {
        let slot = self.used_idx.wrapping_add(self.pending_used) & self.mask;
        let off = layout::used_entry(slot);
        // SAFETY: `used_entry(slot)` with `slot < size` plus 8 bytes is inside the device
        // area (validated in `new`), 4-byte aligned (area alignment checked). The device
        // owns used elements; volatile because the driver reads them concurrently.
        unsafe {
            let p = self.areas.used.add(off) as *mut u32;
            std::ptr::write_volatile(p, (head as u32).to_le());
            std::ptr::write_volatile(p.add(1), len.to_le());
        }
        self.pending_used += 1;
    }

    /// Marks `n` avail entries consumed (they must have been walked and completed, or
    /// be about to be, with [`add_used`](Self::add_used)).
    #[inline]
    pub fn consume(&mut self, n: u16) {
        self.last_avail = self.last_avail.wrapping_add(n);
        self.consumed = self.consumed.wrapping_add(n as u64);
    }

    /// Publishes every pending used element with one `Release` store of `used.idx` and
    /// makes the burst's one notification decision: EVENT_IDX's `used_event` with the
    /// spec's wrap-safe formula, or `VRING_AVAIL_F_NO_INTERRUPT`. Writes the call
    /// eventfd when the driver asked for it. Returns whether it called.
    #[inline]
    pub fn publish_used(&mut self) -> bool {
        let Some((old, new)) = self.store_used_idx() else {
            return false;
        };
        if self.notify_fd.is_none() {
            return false;
        }
        // Store (used.idx) → load (used_event / flags): needs a full fence, see module doc.
        fence(Ordering::SeqCst);
        self.notify_after_fence(old, new)
    }

    /// [`store_used_idx`](Self::store_used_idx) when a call decision follows (there is a
    /// call eventfd): the first half of [`crate::ring::publish_used_pair`].
    #[inline]
    pub fn publish_begin(&mut self) -> Option<(u16, u16)> {
        self.store_used_idx().filter(|_| self.notify_fd.is_some())
    }

    /// The first half of a publish: the one `Release` store of `used.idx` covering every
    /// pending element. Returns the old and new index, or `None` when nothing was pending.
    #[inline]
    fn store_used_idx(&mut self) -> Option<(u16, u16)> {
        if self.pending_used == 0 {
            return None;
        }
        let old = self.used_idx;
        let new = old.wrapping_add(self.pending_used);
        self.pending_used = 0;
        self.used_idx = new;
        self.used_idx_field().store(new, Ordering::Release);
        Some((old, new))
    }

    /// The second half, after the caller's `SeqCst` fence: the notification decision for
    /// the step `old` → `new` of the used index, and the call when it is needed.
    #[inline]
    pub(crate) fn notify_after_fence(&mut self, old: u16, new: u16) -> bool {
        let Some(fd) = self.notify_fd else {
            return false;
        };
        let notify = if self.event_idx {
            let ev = self.used_event().load(Ordering::Relaxed);
            layout::need_event(ev, new, old)
        } else {
            let flags = self.avail_flags().load(Ordering::Relaxed);
            flags & layout::AVAIL_F_NO_INTERRUPT == 0
        };
        if notify {
            signal(fd);
            self.calls += 1;
        }
        notify
    }

    /// Enables (before the worker sleeps) or suppresses (while it polls) the driver's
    /// available-buffer notifications: `avail_event` with EVENT_IDX, else
    /// `VRING_USED_F_NO_NOTIFY`. When enabling, returns whether any chain is available
    /// and not consumed yet: new ones, or ones a burst found and left (its destination
    /// had no room); either way the caller must poll instead of sleeping.
    pub fn set_kicks(&mut self, enable: bool) -> bool {
        if self.event_idx {
            // Kick me when avail idx moves past what I have consumed (enable), or only
            // after a full u16 wrap (suppress).
            let ev = if enable { self.last_avail } else { self.last_avail.wrapping_sub(1) };
            self.avail_event().store(ev, Ordering::Relaxed);
        } else {
            let flags = if enable { 0 } else { layout::USED_F_NO_NOTIFY };
            self.used_flags().store(flags, Ordering::Relaxed);
        }
        if !enable {
            return false;
        }
        // Store (event/flags) → load (avail.idx): full fence, see module doc.
        fence(Ordering::SeqCst);
        let avail = self.avail_idx().load(Ordering::Acquire);
        avail != self.last_avail
    }
}

/// Translates the buffer `addr .. + len` (through `iova` under a vIOMMU, else through
/// `mem` with the ring's `hint`) and appends its pieces to `out`; counts it in
/// `out.total`. Shared by both ring engines (`packed_ring` walks with it too).
#[inline]
pub(crate) fn map_buffer<'m>(
    mem: &'m GuestMemory,
    hint: &mut Hint,
    mut iova: Option<&mut IovaView>,
    addr: u64,
    len: u32,
    write: bool,
    out: &mut Chain<'m>,
) -> Result<(), RingFault> {
    if addr.checked_add(len as u64).is_none() {
        return Err(RingFault::BadAddress { addr, len });
    }
    let mut gpa = addr;
    let mut left = len as u64;
    while left > 0 {
        let (ptr, n) = match iova.as_deref_mut() {
            None => mem.translate(hint, gpa, left).ok_or(RingFault::BadAddress { addr, len })?,
            Some(v) => v
                .translate(mem, gpa, left, write)
                .map_err(|f| iotlb_fault(f, write, RingFault::BadAddress { addr, len }))?,
        };
        out.push(ptr, n as u32);
        gpa += n;
        left -= n;
    }
    out.total += len as u64;
    Ok(())
}

/// Writes 1 to an eventfd. Errors are ignored: the counter cannot overflow in practice
/// and a closed fd only means the driver is gone.
#[inline]
pub(crate) fn signal(fd: i32) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid local to an fd; no memory is handed over.
    let _ = unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
}

#[cfg(test)]
pub(crate) mod tests;
