//! The device side of a packed virtqueue, written for batching (virtio 1.2 §2.8).
//!
//! Owns: one packed queue's ring pointers (translated once at activation), its private
//! positions (the next available descriptor and the next used one, each with its wrap
//! counter, §2.8.1), the avail/used/notification protocol (§2.8.6-§2.8.10) and the
//! validation of everything the driver wrote: AVAIL/USED bits against the wrap counter,
//! chain extents and buffer ids in flight (the poll), indirect tables, buffer directions
//! and addresses (the walk, in `walk`).
//! Must not: decide what a packet means (the ports do), allocate, lock, or make a
//! syscall other than the one call-eventfd write a burst may need; nor share state with
//! the split engine (`split_ring`), whose chain types, copies, faults and address
//! translation it uses.
//!
//! Shared ring memory is only touched through raw pointers with atomic or volatile
//! accesses; no Rust reference into it is ever formed. The orderings:
//! * The flags word of each chain's first descriptor is loaded with `Acquire`: it pairs
//!   with the driver's release (write barrier) before it made that head available (a
//!   driver makes a chain's first descriptor available only after all the others,
//!   §2.8.21), so the rest of the chain (its flags words
//!   loaded `Relaxed`, then every descriptor's address, length and id read by the walk)
//!   is what the driver published.
//! * Used descriptors are written in order: id and length with volatile stores, the
//!   flags word last; for every used descriptor of a burst but the first, with a
//!   `Relaxed` store, and the first one's flags with one `Release` store at the end of
//!   the burst (as DPDK's vhost and Linux do), so the driver, which looks at that
//!   position first, sees the burst whole: every used descriptor and the data written
//!   into device-writable buffers before it. One publication per burst.
//! * Before reading the driver's event suppression to decide whether to call, and before
//!   re-checking for new descriptors after re-enabling kicks, a `SeqCst` fence orders our
//!   store before that load (store→load), pairing with the driver's full barrier.
//!
//! A burst looks as with the split engine: [`PackedRing::poll_avail`] (finds up to
//! [`MAX_BURST`] available chains in ring order, checks their buffer ids and remembers
//! where each starts, how many descriptors it has and its id), [`PackedRing::walk_avail`] (`walk`) over them, one
//! [`PackedRing::add_used`] per finished chain, [`PackedRing::consume`], then one
//! [`PackedRing::publish_used`].
//!
//! Here: the ring (areas, positions, poll, used descriptors, notifications). In `walk`:
//! the walk of one chain (ring descriptors, indirect tables) into a [`Chain`]; in
//! `setup`: building a ring at activation; `tests`: unit and property tests against a
//! model of a driver.

use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;

use spec::packed::{self, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use spec::prefetch::WritePrefetch;

use crate::iotlb::IovaView;
use crate::memory::{GuestMemory, Hint};
use crate::split_ring::{prefetch_lines, prefetch_lines_read, signal, RingFault};

mod setup;
mod walk;

/// Most chains one poll finds (a burst never takes more: the ports' bursts are at most
/// this long, see `port::BURST`).
pub(crate) const MAX_BURST: usize = 64;

/// Entries of the walked-id table: one per possible buffer id (ids are 16 bits).
const IDS: usize = u16::MAX as usize + 1;

/// Where one available chain lies in the ring and its buffer id, as the poll found them.
///
/// One word (offset in bits 0-15, ring descriptors in 16-31, buffer id in 32-47, the
/// avail wrap counter at the offset in bit 48; an indirect descriptor counts as one): the
/// poll's loop stores one word per chain, not four fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ChainAt(u64);

impl ChainAt {
    #[inline(always)]
    fn new(pos: u16, count: u16, id: u16, wrap: bool) -> ChainAt {
        ChainAt(pos as u64 | (count as u64) << 16 | (id as u64) << 32 | (wrap as u64) << 48)
    }

    /// Offset of its first descriptor.
    #[inline(always)]
    fn pos(self) -> u16 {
        self.0 as u16
    }

    /// Descriptors it occupies in the ring.
    #[inline(always)]
    fn count(self) -> u16 {
        (self.0 >> 16) as u16
    }

    /// Its buffer id (the last descriptor's, §2.8.6).
    #[inline(always)]
    fn id(self) -> u16 {
        (self.0 >> 32) as u16
    }

    /// The avail wrap counter at `pos`.
    #[inline(always)]
    fn wrap(self) -> bool {
        self.0 >> 48 & 1 != 0
    }
}

/// What [`PackedRing::walk_avail`] hands back for [`PackedRing::add_used`]: the buffer
/// id (the last descriptor's, §2.8.6), how many ring descriptors the chain used (the
/// used position skips them, §2.8.6), and whether the device only reads it.
///
/// One word (id in bits 0-15, count in 16-31, reads-only in bit 32) rather than a struct
/// of three fields: a burst loop passes it from the walk to `add_used` in one register;
/// as a struct the compiler assembled it on the stack for every chain
/// (`bench/callgrind.sh` be-gtx, per-instruction costs).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct PackedHead(u64);

impl PackedHead {
    #[inline(always)]
    pub fn new(id: u16, count: u16, reads_only: bool) -> PackedHead {
        PackedHead(id as u64 | (count as u64) << 16 | (reads_only as u64) << 32)
    }

    /// Buffer id to return.
    #[inline(always)]
    pub fn id(self) -> u16 {
        self.0 as u16
    }

    /// Ring descriptors the chain occupies.
    #[inline(always)]
    pub fn count(self) -> u16 {
        (self.0 >> 16) as u16
    }

    /// No descriptor of the chain is device-writable (a transmit buffer).
    #[inline(always)]
    pub fn reads_only(self) -> bool {
        self.0 >> 32 != 0
    }
}

impl std::fmt::Debug for PackedHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedHead")
            .field("id", &self.id())
            .field("count", &self.count())
            .field("reads_only", &self.reads_only())
            .finish()
    }
}

/// The first half of a publication, for the notification decision after the fence: the
/// used position before and after the burst and the wrap counter after it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UsedStep {
    old: u16,
    new: u16,
    wrap: bool,
}

/// The device side of one packed virtqueue, owned by exactly one worker.
pub(crate) struct PackedRing {
    /// Descriptor ring (read, and written with used descriptors).
    desc: *mut u8,
    /// Driver event suppression (read: when the driver wants calls).
    driver: *mut u8,
    /// Device event suppression (written: when we want kicks).
    device: *mut u8,
    size: u16,
    /// Next descriptor to consume and its avail wrap counter.
    avail_pos: u16,
    avail_wrap: bool,
    /// Next used descriptor to write and the used wrap counter.
    used_pos: u16,
    used_wrap: bool,
    /// Used position at the last publication (for EVENT_IDX's decision).
    signalled: u16,
    /// Chains the last poll found, in ring order from `avail_pos`.
    found: u16,
    chains: [ChainAt; MAX_BURST],
    /// Where the last poll stopped looking (and its wrap counter).
    seen_pos: u16,
    seen_wrap: bool,
    /// By buffer id: the burst (`burst`) whose poll last found it. An id whose entry
    /// holds the current burst is in flight in it; a new burst needs no clearing, only a
    /// new number (the table is cleared when the number wraps).
    found_in: Box<[u16]>,
    burst: u16,
    /// An id the poll found twice in one burst ([`RingFault::IdInFlight`]): the chains
    /// before it were returned; every later poll reports it (the queue is broken).
    id_fault: Option<RingFault>,
    /// Used descriptors written and not yet published.
    pending: u16,
    /// The first pending used descriptor: its offset and the flags it gets at publication.
    first_pos: u16,
    first_flags: u16,
    /// `VIRTIO_F_IN_ORDER`: a run of device-read-only chains completed one after the
    /// other is returned with one used descriptor (see [`add_used`](Self::add_used)).
    in_order: bool,
    /// The pending used descriptor that stands for the run being completed, if the last
    /// [`add_used`](Self::add_used) of this burst opened or extended one.
    run_pos: Option<u16>,
    /// The buffer id the run's descriptor gets when the run closes (the last chain folded
    /// into it), and the ring descriptors of the chains folded into it since it opened,
    /// which the used position skips when the run closes ([`close_run`](Self::close_run)):
    /// a chain folded into a run costs two stores to the ring's own fields, not a ring
    /// write and a wrapping position update each.
    run_id: u16,
    run_skip: u32,
    event_idx: bool,
    indirect: bool,
    mem: Arc<GuestMemory>,
    hint: Hint,
    /// With `ACCESS_PLATFORM`: addresses are IOVAs, translated through the IOTLB.
    iova: Option<IovaView>,
    notify_fd: Option<i32>,
    /// The CPU has `PREFETCHW`.
    write_prefetch: Option<WritePrefetch>,
    /// Calls made to the driver (used-buffer notifications).
    pub calls: u64,
}

// SAFETY: the raw pointers point into `mem`'s mappings, which the `Arc` keeps alive; a
// `PackedRing` is moved to its worker once and used by that thread only.
unsafe impl Send for PackedRing {}

impl PackedRing {
    /// Where the device resumes, as vhost-user's `GET_VRING_BASE` reports it for a packed
    /// ring: the next available offset, with the avail wrap counter in bit 15 (DPDK's
    /// and QEMU's convention).
    pub fn last_avail(&self) -> u16 {
        self.avail_pos | (self.avail_wrap as u16) << 15
    }

    /// `pos` moved on by `n` descriptors (`n <= size`), flipping `wrap` past the end.
    #[inline(always)]
    fn advance(&self, pos: u16, wrap: bool, n: u16) -> (u16, bool) {
        let p = pos as u32 + n as u32;
        if p >= self.size as u32 {
            ((p - self.size as u32) as u16, !wrap)
        } else {
            (p as u16, wrap)
        }
    }

    /// The flags word of ring descriptor `pos`, as an atomic.
    ///
    /// # Safety
    ///
    /// `pos < self.size`.
    #[inline(always)]
    unsafe fn flags_at(&self, pos: u16) -> &AtomicU16 {
        // SAFETY: descriptor `pos < size` lies inside the descriptor ring validated in
        // `new` (16-byte aligned, so its flags word is 2-byte aligned); the mapping
        // outlives `self`. An atomic may alias memory another process writes.
        unsafe {
            AtomicU16::from_ptr(
                self.desc.add(pos as usize * packed::DESC_SIZE + packed::DESC_FLAGS) as *mut u16
            )
        }
    }

    /// A 16-bit field of an event suppression area (`area` is `self.driver` or
    /// `self.device`, `off` is `EVENT_OFF_WRAP` or `EVENT_FLAGS`).
    #[inline(always)]
    fn event_u16(&self, area: *mut u8, off: usize) -> &AtomicU16 {
        debug_assert!(off + 2 <= packed::EVENT_SIZE);
        // SAFETY: both areas were validated in `new` as `EVENT_SIZE` bytes, 4-byte
        // aligned, inside guest memory the ring's `Arc` keeps mapped; `off` is 0 or 2.
        unsafe { AtomicU16::from_ptr(area.add(off) as *mut u16) }
    }

    /// Finds the available chains from the next available position on, in ring order, up
    /// to [`MAX_BURST`], and returns how many (what [`walk_avail`](Self::walk_avail) may
    /// then take); [`poll_avail_max`](Self::poll_avail_max) with that bound. A chain
    /// whose `NEXT` leads into a descriptor that is not available
    /// is [`RingFault::ChainNotAvailable`], one longer than the ring
    /// [`RingFault::ChainTooLong`], one whose buffer id another chain found in this burst
    /// has [`RingFault::IdInFlight`] (the driver must not make an id available again
    /// before the device used it, §2.8.6; a burst completes in ring order, so the ids a
    /// burst finds are exactly those it may still complete); the chains before a bad one
    /// are returned first, and the fault comes with the next poll. Also ends the previous
    /// burst's in-flight ids.
    #[inline(always)]
    pub fn poll_avail(&mut self) -> Result<u16, RingFault> {
        self.poll_avail_max(MAX_BURST as u16)
    }

    /// [`poll_avail`](Self::poll_avail) looking for at most `max` chains (at most
    /// [`MAX_BURST`]): a forwarding burst needs no more receive buffers than it has
    /// frames, and each descriptor looked at is a line the driver may be writing.
    #[inline]
    pub fn poll_avail_max(&mut self, max: u16) -> Result<u16, RingFault> {
        let max = (max as usize).min(MAX_BURST);
        if let Some(f) = self.id_fault {
            return Err(f);
        }
        self.burst = self.burst.wrapping_add(1);
        if self.burst == 0 {
            self.found_in.fill(0);
            self.burst = 1;
        }
        let (mut pos, mut wrap) = (self.avail_pos, self.avail_wrap);
        let mut n = 0usize;
        // The common case first, in a loop of its own with the ring's fields in locals:
        // single descriptors (no NEXT), available in this wrap, up to the ring's end.
        let desc = self.desc;
        let burst = self.burst;
        // The id table and the chain records through raw pointers held in locals: stores
        // through them in the loop do not make the compiler load the table's address
        // again for every descriptor.
        let table = self.found_in.as_mut_ptr();
        let chains = self.chains.as_mut_ptr();
        const MASK: u16 = packed::DESC_F_AVAIL | packed::DESC_F_USED | DESC_F_NEXT;
        let mut fault = 'singles: loop {
            let want = packed::avail_flags(wrap);
            let end = (n + (self.size - pos) as usize).min(max);
            let start = n;
            // A single descriptor at `pos` in this wrap, as a `ChainAt` without its
            // offset and id.
            let single = ChainAt::new(0, 1, 0, wrap).0;
            // The offset as a machine word in the loop (no 16-bit arithmetic per
            // descriptor): `first + n` is `pos` (wrapping: after the ring's end `pos` is 0
            // and `n` is not, so `first` alone may wrap below zero).
            let first = (pos as usize).wrapping_sub(n);
            while n < end {
                let at = first.wrapping_add(n);
                // SAFETY: `at < size`: `end - n` positions remain before the ring's end.
                // Inside the ring validated in `new` (16-byte aligned: the flags and id
                // words are 2-aligned).
                let id = unsafe {
                    let d = desc.add(at * packed::DESC_SIZE);
                    // Acquire: see the module doc.
                    let f =
                        AtomicU16::from_ptr(d.add(packed::DESC_FLAGS) as *mut u16).load(Ordering::Acquire);
                    if u16::from_le(f) & MASK != want {
                        break;
                    }
                    // After the acquire: the id the driver published with the flags.
                    // Volatile: the driver owns this memory.
                    u16::from_le(std::ptr::read_volatile(d.add(packed::DESC_ID) as *const u16))
                };
                // SAFETY: `found_in` has an entry for every u16 (`IDS`, never resized);
                // our own memory, which nothing else touches during the poll.
                unsafe {
                    let seen = table.add(id as usize);
                    if *seen == burst {
                        break 'singles Some(self.id_in_flight(id));
                    }
                    *seen = burst;
                }
                // SAFETY: `n < end <= max <= MAX_BURST`, the length of `chains`.
                unsafe { chains.add(n).write(ChainAt(single | at as u64 | (id as u64) << 32)) };
                n += 1;
            }
            pos = first.wrapping_add(n) as u16;
            if pos == self.size {
                (pos, wrap) = (0, !wrap);
            }
            if n == start || n == max || n < end {
                break None;
            }
        };
        if fault.is_none() {
            fault = self.find_chains(&mut n, &mut pos, &mut wrap, max);
        }
        (self.seen_pos, self.seen_wrap) = (pos, wrap);
        self.found = n as u16;
        match fault {
            Some(f) if n == 0 => Err(f),
            _ => Ok(n as u16),
        }
    }

    /// Marks `id` found in burst `burst` and returns true, or returns false when this
    /// burst already found it.
    #[inline(always)]
    fn mark_found(&mut self, id: u16, burst: u16) -> bool {
        debug_assert_eq!(self.found_in.len(), IDS);
        // SAFETY: `found_in` has an entry for every u16 (built with `IDS` entries in
        // `new` and never resized), so no bounds check is needed.
        let seen = unsafe { self.found_in.get_unchecked_mut(id as usize) };
        if *seen == burst {
            return false;
        }
        *seen = burst;
        true
    }

    /// The fault for an id this burst already found, kept for every later poll (the poll
    /// that finds the chain again would otherwise find the id free: the chains before it
    /// are completed by then).
    #[cold]
    fn id_in_flight(&mut self, id: u16) -> RingFault {
        let f = RingFault::IdInFlight { id };
        self.id_fault = Some(f);
        f
    }

    /// Asks for the first `lines` cache lines of the buffer of the `i`-th chain the last
    /// poll found in a writable state (a hint only; see `DeviceRing::prefetch_write`).
    /// Always inlined, as the split engine's: behind the port's generic `Ring` call the
    /// compiler kept it out of line, a call per frame in `reflect`'s burst.
    #[inline(always)]
    pub fn prefetch_write(&mut self, i: u16, lines: usize) {
        let Some(pw) = self.write_prefetch else { return };
        if let Some((ptr, n)) = self.first_buffer(i) {
            prefetch_lines(pw, ptr, n, lines);
        }
    }

    /// The first buffer of the `i`-th chain the last poll found, translated, for the
    /// prefetch hints (none behind an IOMMU or for an indirect table).
    #[inline(always)]
    fn first_buffer(&mut self, i: u16) -> Option<(*mut u8, u64)> {
        if self.iova.is_some() || i >= self.found {
            return None;
        }
        let at = self.chains[i as usize];
        // SAFETY: `at.pos() < size`.
        let d = unsafe { walk::read_ring_desc(self.desc, at.pos()) };
        if d.flags & DESC_F_INDIRECT != 0 {
            return None;
        }
        self.mem.translate(&mut self.hint, d.addr, d.len as u64)
    }

    /// [`prefetch_write`](Self::prefetch_write)'s counterpart for a buffer the burst
    /// will read (`--prefetch-tx`).
    #[inline(always)]
    pub fn prefetch_read(&mut self, i: u16, lines: usize) {
        if let Some((ptr, n)) = self.first_buffer(i) {
            prefetch_lines_read(ptr, n, lines);
        }
    }

    /// Writes the used descriptor for `head` with `len` bytes written, after the ones
    /// already pending (id and length now; the flags word now, or, for the burst's
    /// first, at [`publish_used`](Self::publish_used)); nothing is visible to the driver
    /// before that.
    ///
    /// With `VIRTIO_F_IN_ORDER`, a chain the device only read, completed with nothing
    /// written right after another such chain of the same burst, gets no used descriptor
    /// of its own: the run's one used descriptor is renamed to this buffer id, and the
    /// used position skips this chain's descriptors (§2.8.21: the device may write a
    /// single used descriptor with the id of a batch's last buffer and skip the rest, as
    /// DPDK's vhost does for transmit rings). The driver learns nothing from a transmit
    /// buffer's used length, and it reads one descriptor per run instead of one per
    /// frame; the device writes one line of the ring instead of one per four frames.
    /// Device-writable chains always get their own descriptor: their lengths matter.
    #[inline(always)]
    pub fn add_used(&mut self, head: PackedHead, len: u32) {
        let coalesce = self.in_order && head.reads_only() && len == 0;
        if coalesce && self.run_pos.is_some() {
            // Folded into the open run: its descriptor is renamed and the used position
            // moved on when the run closes.
            // No clamp to the ring size here: `close_run` moves on by whole laps, so any
            // sum of counts keeps the position inside the ring.
            self.run_id = head.id();
            self.run_skip += head.count() as u32;
            return;
        }
        self.close_run();
        let pos = self.used_pos;
        self.run_pos = coalesce.then_some(pos);
        // SAFETY: `pos < size`: the descriptor lies inside the ring validated in `new`
        // (16-byte aligned: the length and id fields are aligned). The device owns a
        // descriptor it has consumed; volatile because the driver reads it concurrently.
        unsafe {
            let p = self.desc.add(pos as usize * packed::DESC_SIZE);
            std::ptr::write_volatile(p.add(packed::DESC_LEN) as *mut u32, len.to_le());
            std::ptr::write_volatile(p.add(packed::DESC_ID) as *mut u16, head.id().to_le());
        }
        // WRITE marks a used length the driver should read (§2.8.4).
        let flags = packed::used_flags(self.used_wrap) | if len > 0 { DESC_F_WRITE } else { 0 };
        if self.pending == 0 {
            (self.first_pos, self.first_flags) = (pos, flags);
        } else {
            // SAFETY: `pos < size`. `Relaxed`: the driver reads it only after the
            // burst's first flags word, whose release store comes later.
            unsafe { self.flags_at(pos) }.store(flags.to_le(), Ordering::Relaxed);
        }
        self.pending += 1;
        (self.used_pos, self.used_wrap) = self.advance(pos, self.used_wrap, head.count().min(self.size));
    }

    /// Closes the open run, if chains were folded into it: its used descriptor takes the
    /// last folded chain's id and the used position skips their descriptors. (Called
    /// before the next used descriptor is written and at publication, so the driver never
    /// sees a run that is not closed.)
    #[inline(always)]
    fn close_run(&mut self) {
        let Some(run) = self.run_pos.take() else { return };
        if self.run_skip == 0 {
            return;
        }
        // SAFETY: `run < size` (a used position of this burst). The descriptor is
        // pending: the driver reads it only after the burst's publication (its own
        // flags, or the first pending one's, released after this store).
        unsafe {
            let p = self.desc.add(run as usize * packed::DESC_SIZE);
            std::ptr::write_volatile(p.add(packed::DESC_ID) as *mut u16, self.run_id.to_le());
        }
        // A lying driver can make a burst's chains cover more than one lap (a wrap
        // counter that matches again after a lap): move on by whole laps too, so the
        // position stays inside the ring whatever the sum.
        let size = self.size as u32;
        let p = self.used_pos as u32 + self.run_skip;
        self.used_pos = (p % size) as u16;
        self.used_wrap ^= (p / size) & 1 == 1;
        self.run_skip = 0;
    }

    /// Marks the first `n` chains the last poll found consumed (they must have been
    /// walked and completed with [`add_used`](Self::add_used)).
    #[inline]
    pub fn consume(&mut self, n: u16) {
        let n = n.min(self.found);
        if n > 0 {
            let c = self.chains[n as usize - 1];
            (self.avail_pos, self.avail_wrap) = self.advance(c.pos(), c.wrap(), c.count());
        }
        self.found = 0;
    }

    /// Publishes every pending used descriptor (one `Release` store of the first one's
    /// flags) and makes the burst's one notification decision. Returns whether it called.
    #[inline]
    pub fn publish_used(&mut self) -> bool {
        let Some(step) = self.publish_begin() else {
            return false;
        };
        // Store (flags) → load (driver event suppression): full fence, see module doc.
        fence(Ordering::SeqCst);
        self.publish_end(step)
    }

    /// The first half of a publication: the release store, and the step for the call
    /// decision (`None` when nothing was pending or there is no call eventfd).
    #[inline]
    pub fn publish_begin(&mut self) -> Option<UsedStep> {
        if self.pending == 0 {
            return None;
        }
        self.close_run();
        self.pending = 0;
        // SAFETY: `first_pos < size`.
        unsafe { self.flags_at(self.first_pos) }.store(self.first_flags.to_le(), Ordering::Release);
        let step = UsedStep { old: self.signalled, new: self.used_pos, wrap: self.used_wrap };
        self.signalled = self.used_pos;
        self.notify_fd.map(|_| step)
    }

    /// The second half, after the caller's `SeqCst` fence: the driver's event suppression
    /// (§2.8.10) decides, and the call is made when it asks for one.
    #[inline]
    pub fn publish_end(&mut self, step: UsedStep) -> bool {
        let Some(fd) = self.notify_fd else {
            return false;
        };
        let flags = u16::from_le(self.event_u16(self.driver, packed::EVENT_FLAGS).load(Ordering::Relaxed));
        let notify = match flags {
            packed::EVENT_FLAG_DISABLE => false,
            packed::EVENT_FLAG_DESC if self.event_idx => {
                let ow =
                    u16::from_le(self.event_u16(self.driver, packed::EVENT_OFF_WRAP).load(Ordering::Relaxed));
                self.need_event(ow, step)
            }
            // ENABLE, and anything the driver may not write (DESC without EVENT_IDX, the
            // reserved value): calling too often is harmless, missing a call is not.
            _ => true,
        };
        if notify {
            signal(fd);
            self.calls += 1;
        }
        notify
    }

    /// Whether the used positions `step.old .. step.new` (a burst's, at most one lap)
    /// passed the descriptor `desc_event_off_wrap` names: the split ring's `need_event`
    /// over positions unrolled across the wrap (as DPDK's vhost computes it).
    #[inline]
    fn need_event(&self, off_wrap: u16, step: UsedStep) -> bool {
        let (off, wrap) = packed::split_off_wrap(off_wrap);
        let size = self.size;
        let (new, mut old) = (step.new, step.old);
        if new <= old {
            old = old.wrapping_sub(size);
        }
        let off = if wrap != step.wrap { off.wrapping_sub(size) } else { off };
        spec::layout::need_event(off, new, old)
    }

    /// Enables (before the worker sleeps) or disables (while it polls) the driver's
    /// available-buffer notifications through the device event suppression area. When
    /// enabling, returns whether the next descriptor to consume is available: a new
    /// chain, or one a burst found and left (its destination had no room); either way
    /// the caller must poll instead of sleeping.
    pub fn set_kicks(&mut self, enable: bool) -> bool {
        let flags = if enable { packed::EVENT_FLAG_ENABLE } else { packed::EVENT_FLAG_DISABLE };
        self.event_u16(self.device, packed::EVENT_FLAGS).store(flags.to_le(), Ordering::Relaxed);
        if !enable {
            return false;
        }
        // Store (event flags) → load (descriptor flags): full fence, see module doc.
        fence(Ordering::SeqCst);
        // SAFETY: `avail_pos < size`.
        let f = unsafe { self.flags_at(self.avail_pos) }.load(Ordering::Acquire);
        packed::is_avail(u16::from_le(f), self.avail_wrap)
    }
}

impl PackedRing {
    /// The general poll from `pos` (with its wrap counter) on: chains of any length, in
    /// ring order, recorded in `chains[*n..]` until `max` are found or the next is not
    /// available; `pos`, `wrap` and `n` move past what was found. Returns the fault that
    /// stopped it, if any: a chain whose `NEXT` leads into a descriptor that is not
    /// available, one longer than the ring, or one whose id this burst already found. Shared by [`poll_avail_max`]
    /// (after its loop over single descriptors) and [`poll_more`](Self::poll_more).
    ///
    /// [`poll_avail_max`]: Self::poll_avail_max
    #[inline]
    fn find_chains(
        &mut self,
        n: &mut usize,
        pos: &mut u16,
        wrap: &mut bool,
        max: usize,
    ) -> Option<RingFault> {
        while *n < max {
            // SAFETY: `pos < size` (an invariant of every position). Acquire: see the
            // module doc.
            let head = u16::from_le(unsafe { self.flags_at(*pos) }.load(Ordering::Acquire));
            if !packed::is_avail(head, *wrap) {
                return None;
            }
            let mut count = 1u16;
            let mut flags = head;
            let mut last = *pos;
            let (mut p, mut w) = self.advance(*pos, *wrap, 1);
            while flags & DESC_F_NEXT != 0 {
                if count == self.size {
                    return Some(RingFault::ChainTooLong);
                }
                // SAFETY: `p < size`. `Relaxed`: ordered after the head's acquire above.
                flags = u16::from_le(unsafe { self.flags_at(p) }.load(Ordering::Relaxed));
                if !packed::is_avail(flags, w) {
                    return Some(RingFault::ChainNotAvailable { pos: p });
                }
                count += 1;
                last = p;
                (p, w) = self.advance(p, w, 1);
            }
            // The buffer id is the last descriptor's (§2.8.6). SAFETY: `last < size`.
            let id = unsafe { walk::read_ring_desc(self.desc, last) }.id;
            if !self.mark_found(id, self.burst) {
                return Some(self.id_in_flight(id));
            }
            self.chains[*n] = ChainAt::new(*pos, count, id, *wrap);
            *n += 1;
            (*pos, *wrap) = (p, w);
        }
        None
    }

    /// Looks for more available chains after the ones this burst's poll found, up to
    /// [`MAX_BURST`] in all, without starting a new burst (the chains already found, walked
    /// or completed stay as they are), and returns how many there are now. For a receive
    /// burst that polled for one chain per frame and then meets a frame that needs several
    /// (mergeable receive buffers). A chain that breaks the protocol where the look
    /// stopped is the fault, as [`poll_avail`](Self::poll_avail) would report it next:
    /// the caller would otherwise wait forever for buffers behind it.
    pub fn poll_more(&mut self) -> Result<u16, RingFault> {
        if let Some(f) = self.id_fault {
            return Err(f);
        }
        let mut n = self.found as usize;
        let (mut pos, mut wrap) = (self.seen_pos, self.seen_wrap);
        let fault = self.find_chains(&mut n, &mut pos, &mut wrap, MAX_BURST);
        (self.seen_pos, self.seen_wrap) = (pos, wrap);
        self.found = n as u16;
        match fault {
            Some(f) => Err(f),
            None => Ok(n as u16),
        }
    }

    /// Descriptors in the ring.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Ring descriptors the first `chains` of the chains the last poll found occupy (an
    /// indirect descriptor counts as one), at most `size`.
    pub fn avail_slots(&mut self, chains: u16) -> u16 {
        let n = chains.min(self.found) as usize;
        let total: u32 = self.chains[..n].iter().map(|c| c.count() as u32).sum();
        total.min(self.size as u32) as u16
    }
}

#[cfg(test)]
mod tests;
