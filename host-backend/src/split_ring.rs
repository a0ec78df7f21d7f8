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
//! A burst looks like: [`DeviceRing::poll_avail`] (one acquire load), [`DeviceRing::head`]
//! and [`DeviceRing::walk`] over the run of new entries, [`DeviceRing::add_used`] per
//! finished chain, [`DeviceRing::consume`], then one [`DeviceRing::publish_used`] (or
//! [`DeviceRing::publish_used_pair`] for a burst that completes on two rings).

use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;

use spec::layout::{self, Descriptor, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};

use spec::prefetch::WritePrefetch;

use crate::iotlb::{Fault, Iotlb, IovaView};
use crate::memory::{GuestMemory, Hint};

/// Most segments one chain may map to. Longer (valid) chains are dropped, counted as
/// `too_many_segments`, and returned to the driver; they do not break the queue.
pub const MAX_SEGS: usize = 64;
/// Largest indirect table accepted, in descriptors. The spec sets no limit; a larger
/// table is treated as malformed so that one chain cannot make us walk megabytes.
pub const MAX_INDIRECT: u32 = 1024;

/// A value the driver wrote that breaks the protocol. The queue that saw it is marked
/// broken and is not touched again until the front-end sets it up anew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingFault {
    /// `avail.idx` moved by more than the ring size since we last consumed.
    AvailJump { last_avail: u16, avail: u16 },
    /// An avail entry names a head `>= size`.
    HeadOutOfRange { head: u16 },
    /// A `next` link points outside its table.
    NextOutOfRange { next: u16 },
    /// A chain is longer than its table (so it loops).
    ChainTooLong,
    /// A buffer lies (partly) outside guest memory or its address wraps.
    BadAddress { addr: u64, len: u32 },
    /// An indirect descriptor without the feature, with `NEXT`, inside an indirect
    /// table, or with a length that is zero, not a multiple of 16 or too large.
    BadIndirect { len: u32 },
    /// An indirect table outside guest memory (or across a region boundary).
    IndirectAddress { addr: u64, len: u32 },
    /// A device-writable buffer on a queue the device reads, or the reverse.
    Direction,
    /// The ring areas are misaligned or outside guest memory.
    RingAddress,
    /// Under a vIOMMU: the IOTLB has no translation for this IOVA yet. Not a protocol
    /// violation by itself: the ring asks the front-end and retries the chain (see
    /// `Device::iotlb_miss`); only an address that stays untranslated breaks the queue.
    IotlbMiss { iova: u64, write: bool },
}

impl std::fmt::Display for RingFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            RingFault::AvailJump { last_avail, avail } => {
                write!(f, "avail idx jumped from {last_avail} to {avail}, more than the ring size")
            }
            RingFault::HeadOutOfRange { head } => write!(f, "head index {head} out of range"),
            RingFault::NextOutOfRange { next } => write!(f, "next index {next} out of range"),
            RingFault::ChainTooLong => write!(f, "descriptor chain loops or is longer than its table"),
            RingFault::BadAddress { addr, len } => {
                write!(f, "buffer {addr:#x}+{len:#x} outside guest memory")
            }
            RingFault::BadIndirect { len } => write!(f, "malformed indirect descriptor (len {len})"),
            RingFault::IndirectAddress { addr, len } => {
                write!(f, "indirect table {addr:#x}+{len:#x} outside guest memory")
            }
            RingFault::Direction => write!(f, "buffer direction does not match the queue"),
            RingFault::RingAddress => write!(f, "ring areas misaligned or outside guest memory"),
            RingFault::IotlbMiss { iova, write } => {
                write!(f, "no IOTLB translation for {iova:#x} ({})", if write { "write" } else { "read" })
            }
        }
    }
}

/// The `RingFault` for an IOTLB fault: a miss is retried (see [`RingFault::IotlbMiss`]); a denied
/// access is `denied`, what the same address would be without an IOMMU.
fn iotlb_fault(f: Fault, write: bool, denied: RingFault) -> RingFault {
    match f {
        Fault::Miss { iova } => RingFault::IotlbMiss { iova, write },
        Fault::Denied { .. } => denied,
    }
}

/// Which buffers a queue must carry: the device reads the transmit queue and writes the
/// receive queue (§5.1.6); a control queue's chain is a command the device reads followed
/// by the acknowledgement it writes (§5.1.6.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    /// Every descriptor must be device-readable (a transmit queue).
    DeviceReads,
    /// Every descriptor must be device-writable (a receive queue).
    DeviceWrites,
    /// Device-readable descriptors, then device-writable ones ("the driver MUST place any
    /// device-writable descriptor elements after any device-readable descriptor elements",
    /// §2.7.4.2); a readable one after a writable one is [`RingFault::Direction`].
    ReadsThenWrites,
}

/// One contiguous piece of a buffer, in this process's address space.
#[derive(Debug, Clone, Copy)]
pub struct Seg {
    /// Start of the piece (inside a guest memory mapping).
    pub ptr: *mut u8,
    /// Length in bytes.
    pub len: u32,
}

/// The buffers of one walked chain.
pub struct Chain {
    segs: [Seg; MAX_SEGS],
    n: usize,
    /// Total bytes over all descriptors (also those past `MAX_SEGS`).
    pub total: u64,
    /// Bytes in device-readable descriptors (all of `total` for a transmit chain, none
    /// for a receive chain; the command part of a control chain).
    pub readable: u64,
    /// More than `MAX_SEGS` pieces: `segs` holds only the first ones.
    pub truncated: bool,
}

// SAFETY: a `Chain` is scratch space: its pointers are only dereferenced during the
// burst that filled them, by the thread that owns the ring (and the `Arc<GuestMemory>`
// keeping the mapping alive). Moving the empty or stale scratch to a worker is harmless.
unsafe impl Send for Chain {}

impl Default for Chain {
    fn default() -> Self {
        Chain {
            segs: [Seg { ptr: std::ptr::null_mut(), len: 0 }; MAX_SEGS],
            n: 0,
            total: 0,
            readable: 0,
            truncated: false,
        }
    }
}

impl Chain {
    /// The recorded pieces.
    pub fn segs(&self) -> &[Seg] {
        &self.segs[..self.n]
    }
    fn clear(&mut self) {
        self.n = 0;
        self.total = 0;
        self.readable = 0;
        self.truncated = false;
    }
    /// One buffer of `len` bytes (> 0) at `ptr`, readable by the device or not.
    #[inline]
    fn set_single(&mut self, ptr: *mut u8, len: u32, readable: bool) {
        self.segs[0] = Seg { ptr, len };
        self.n = 1;
        self.total = len as u64;
        self.readable = if readable { len as u64 } else { 0 };
        self.truncated = false;
    }
    /// Where bytes `off .. off + len` are, when they all lie inside the first piece
    /// (the case the copies below take inline).
    #[inline(always)]
    fn in_first(&self, off: usize, len: usize) -> Option<*mut u8> {
        let s = self.segs().first()?;
        let end = off.checked_add(len)?;
        // SAFETY: `off <= end <= s.len`: the offset stays inside the first piece's
        // translated buffer.
        (end <= s.len as usize).then(|| unsafe { s.ptr.add(off) })
    }
    fn push(&mut self, ptr: *mut u8, len: u32) {
        if self.n < MAX_SEGS {
            self.segs[self.n] = Seg { ptr, len };
            self.n += 1;
        } else {
            self.truncated = true;
        }
    }
}

/// Host addresses of the three ring areas of one queue.
#[derive(Debug, Clone, Copy)]
pub struct RingAreas {
    /// Descriptor table.
    pub desc: *mut u8,
    /// Driver area (avail ring).
    pub avail: *mut u8,
    /// Device area (used ring).
    pub used: *mut u8,
}

/// The device side of one split virtqueue, owned by exactly one worker.
pub struct DeviceRing {
    areas: RingAreas,
    size: u16,
    mask: u16,
    last_avail: u16,
    used_idx: u16,
    pending_used: u16,
    avail_cached: u16,
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
}

// SAFETY: the raw pointers point into `mem`'s mappings, which the `Arc` keeps alive; a
// `DeviceRing` is moved to its worker once and used by that thread only.
unsafe impl Send for DeviceRing {}

/// How a ring is placed and negotiated, as the control plane knows it.
#[derive(Debug, Clone)]
pub struct RingConfig {
    /// Queue size (a power of two).
    pub size: u16,
    /// Front-end virtual addresses of the three areas.
    pub desc_uva: u64,
    /// Driver area.
    pub avail_uva: u64,
    /// Device area.
    pub used_uva: u64,
    /// Where to resume (`SET_VRING_BASE`).
    pub base: u16,
    /// `VIRTIO_RING_F_EVENT_IDX` negotiated.
    pub event_idx: bool,
    /// `VIRTIO_RING_F_INDIRECT_DESC` negotiated.
    pub indirect: bool,
}

impl DeviceRing {
    /// Translates and validates the ring areas and builds the ring, resuming at
    /// `cfg.base` with every earlier buffer already used (the vhost-user convention:
    /// the used index starts at the base). `call_fd` is the driver's call eventfd.
    /// With `iotlb` (`ACCESS_PLATFORM` negotiated) the ring and buffer addresses are
    /// IOVAs; a missing translation is [`RingFault::IotlbMiss`].
    pub fn new(
        cfg: &RingConfig,
        mem: Arc<GuestMemory>,
        call_fd: Option<i32>,
        iotlb: Option<Arc<Iotlb>>,
    ) -> Result<Self, RingFault> {
        let size = cfg.size;
        if size == 0 || !size.is_power_of_two() || size > layout::MAX_QUEUE_SIZE {
            return Err(RingFault::RingAddress);
        }
        if cfg.desc_uva % layout::DESC_ALIGN != 0
            || cfg.avail_uva % layout::AVAIL_ALIGN != 0
            || cfg.used_uva % layout::USED_ALIGN != 0
        {
            return Err(RingFault::RingAddress);
        }
        let areas = [
            (cfg.desc_uva, layout::desc_table_bytes(size) as u64, false),
            (cfg.avail_uva, layout::avail_bytes(size) as u64, false),
            (cfg.used_uva, layout::used_bytes(size) as u64, true),
        ];
        let mut view = iotlb.map(IovaView::new);
        let mut host = [std::ptr::null_mut(); 3];
        for (h, &(addr, len, write)) in host.iter_mut().zip(&areas) {
            *h = match view.as_mut() {
                None => mem.uva_to_host(addr, len).ok_or(RingFault::RingAddress)?,
                Some(v) => v
                    .translate_whole(&mem, addr, len, write)
                    .map_err(|f| iotlb_fault(f, write, RingFault::RingAddress))?,
            };
        }
        let [desc, avail, used] = host;
        let mut ring = DeviceRing {
            areas: RingAreas { desc, avail, used },
            size,
            mask: size - 1,
            last_avail: cfg.base,
            used_idx: cfg.base,
            pending_used: 0,
            avail_cached: cfg.base,
            event_idx: cfg.event_idx,
            indirect: cfg.indirect,
            mem,
            hint: 0,
            iova: view,
            notify_fd: call_fd,
            write_prefetch: WritePrefetch::detect(),
            calls: 0,
        };
        // Publish where we stand, so a driver that restarts reads a consistent used idx.
        ring.u16_at(ring.areas.used, layout::USED_IDX).store(cfg.base, Ordering::Release);
        ring.set_kicks(false);
        Ok(ring)
    }

    /// The next avail slot the device will consume (what `GET_VRING_BASE` reports).
    pub fn last_avail(&self) -> u16 {
        self.last_avail
    }

    #[inline]
    fn u16_at(&self, area: *mut u8, off: usize) -> &AtomicU16 {
        // SAFETY: `area + off` lies inside a ring area validated in `new` (all offsets
        // used are within `avail_bytes`/`used_bytes`), is 2-byte aligned (area alignment
        // was checked and every offset is even), and the mapping outlives `self`.
        // `AtomicU16` may alias memory another process writes: that is what atomics are for.
        unsafe { AtomicU16::from_ptr(area.add(off) as *mut u16) }
    }

    /// Loads `avail.idx` once (`Acquire`, see the module comment) and returns how many
    /// new chains the driver has made available, or `RingFault::AvailJump`.
    #[inline]
    pub fn poll_avail(&mut self) -> Result<u16, RingFault> {
        let avail = self.u16_at(self.areas.avail, layout::AVAIL_IDX).load(Ordering::Acquire);
        let n = avail.wrapping_sub(self.last_avail);
        if n > self.size {
            return Err(RingFault::AvailJump { last_avail: self.last_avail, avail });
        }
        self.avail_cached = avail;
        Ok(n)
    }

    /// The head index of the `i`-th unconsumed avail entry (`i` < the value
    /// [`poll_avail`](Self::poll_avail) returned), validated against the ring size.
    #[inline]
    pub fn head(&self, i: u16) -> Result<u16, RingFault> {
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
    /// skips, and [`walk`](Self::walk) judges the chain as always.
    ///
    /// Why: a receive buffer is a line the driver wrote last (its previous frame's
    /// header, its own forwarding), so each store of a burst's copies waits for a
    /// line to come over from the other core, one after another as the stores retire.
    /// Asking for all of a burst's lines first lets those transfers overlap. Against
    /// DPDK's virtio-user `macswap` this removed a level of our `reflect` at a third of
    /// its usual rate (`docs/PERFORMANCE.md`).
    #[inline]
    pub fn prefetch_write(&mut self, i: u16, lines: usize) {
        let Some(pw) = self.write_prefetch else { return };
        if self.iova.is_some() {
            return;
        }
        let Ok(head) = self.head(i) else { return };
        let d = Self::read_desc(self.areas.desc, head);
        if d.flags & DESC_F_INDIRECT != 0 {
            return;
        }
        let Some((ptr, n)) = self.mem.translate(&mut self.hint, d.addr, d.len as u64) else { return };
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

    #[inline(always)]
    fn read_desc(table: *const u8, i: u16) -> Descriptor {
        // SAFETY (both reads): callers pass `i` below the table length they validated
        // against the mapping (`size` for the main table, `len / 16` for an indirect
        // table); volatile because the driver owns this memory.
        let p = unsafe { table.add(i as usize * layout::DESC_SIZE) };
        if p as usize % 8 == 0 {
            // Two aligned 64-bit loads (the main table is 16-byte aligned, checked in
            // `new`): a byte-array read compiles to 16 byte loads and ~30 shifts.
            // SAFETY: as above, and `p` is 8-byte aligned.
            let (w0, w1) = unsafe {
                let q = p as *const u64;
                (std::ptr::read_volatile(q), std::ptr::read_volatile(q.add(1)))
            };
            Descriptor::from_le_words(w0, w1)
        } else {
            // An indirect table the driver placed at an odd address (the spec does not
            // forbid it).
            // SAFETY: as above; a byte array has no alignment requirement.
            Descriptor::from_le_bytes(unsafe { std::ptr::read_volatile(p as *const [u8; 16]) })
        }
    }

    /// Walks the chain starting at `head` (a value [`head`](Self::head) returned),
    /// checking every link, direction and address, and records its buffers in `out`.
    ///
    /// The common case, one direct descriptor in one memory region without an IOMMU, is
    /// decided here inline; anything else (and every case that fails a check) goes the
    /// general way, which reads the descriptor again and decides everything itself, so the
    /// result never depends on the shortcut.
    ///
    /// Always inlined, with the descriptor read and the address translation: with
    /// `#[inline]` alone the compiler kept all three out of line in the burst loops (a
    /// call, six saved registers and a returned result per chain). Inlining them took
    /// `bench/callgrind.sh` from 325 to 271 Ir per packet on be-loop, 173 to 144 on be-grx
    /// and 111 to 77 on be-gtx.
    #[inline(always)]
    pub fn walk(&mut self, head: u16, dir: Dir, out: &mut Chain) -> Result<(), RingFault> {
        let d = Self::read_desc(self.areas.desc, head);
        if d.flags & (DESC_F_NEXT | DESC_F_INDIRECT) == 0 && d.len > 0 && self.iova.is_none() {
            let writable = d.flags & DESC_F_WRITE != 0;
            let ok = match dir {
                Dir::DeviceReads => !writable,
                Dir::DeviceWrites => writable,
                Dir::ReadsThenWrites => true,
            };
            if ok {
                if let Some((ptr, n)) = self.mem.translate(&mut self.hint, d.addr, d.len as u64) {
                    if n == d.len as u64 {
                        out.set_single(ptr, d.len, !writable);
                        return Ok(());
                    }
                }
            }
        }
        self.walk_chain(head, dir, out)
    }

    /// [`walk`](Self::walk) for any chain: links, indirect tables, several regions.
    #[inline(never)]
    fn walk_chain(&mut self, head: u16, dir: Dir, out: &mut Chain) -> Result<(), RingFault> {
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
            let d = Self::read_desc(table, idx);
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
                    None => self.mem.translate_whole(&mut self.hint, d.addr, d.len as u64).ok_or(bad)?,
                    Some(v) => v
                        .translate_whole(&self.mem, d.addr, d.len as u64, false)
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
            let ok = match dir {
                Dir::DeviceReads => !writable,
                Dir::DeviceWrites => writable,
                Dir::ReadsThenWrites => writable || !writing,
            };
            if !ok {
                return Err(RingFault::Direction);
            }
            writing |= writable;
            self.map_buffer(d.addr, d.len, writable, out)?;
            if !writable {
                out.readable += d.len as u64;
            }
            if d.flags & DESC_F_NEXT == 0 {
                return Ok(());
            }
            if d.next as u32 >= table_len {
                return Err(RingFault::NextOutOfRange { next: d.next });
            }
            idx = d.next;
        }
    }

    #[inline]
    fn map_buffer(&mut self, addr: u64, len: u32, write: bool, out: &mut Chain) -> Result<(), RingFault> {
        if addr.checked_add(len as u64).is_none() {
            return Err(RingFault::BadAddress { addr, len });
        }
        let mut gpa = addr;
        let mut left = len as u64;
        while left > 0 {
            let (ptr, n) = match self.iova.as_mut() {
                None => self.mem.translate(&mut self.hint, gpa, left).ok_or(RingFault::BadAddress { addr, len })?,
                Some(v) => v
                    .translate(&self.mem, gpa, left, write)
                    .map_err(|f| iotlb_fault(f, write, RingFault::BadAddress { addr, len }))?,
            };
            out.push(ptr, n as u32);
            gpa += n;
            left -= n;
        }
        out.total += len as u64;
        Ok(())
    }

    /// Writes the used element for `head` with `len` bytes written, after the ones
    /// already pending; nothing is visible to the driver before
    /// [`publish_used`](Self::publish_used).
    ///
    /// (Holding a burst's elements back and writing them in one run before the publish,
    /// as DPDK's vhost does, was measured: about 5% more in be-loop, 16 more
    /// instructions per packet in every path. Not kept.)
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

    /// [`publish_used`](Self::publish_used) for two rings at once (a forwarding burst's
    /// source and destination), with one fence between both index stores and both
    /// notification reads instead of one per ring. Returns whether each called.
    ///
    /// Why: the fence waits until the index store owns its line, which the driver polls
    /// from the other core; two publishes in a row wait for two such transfers one after
    /// the other, one fence for both lets them overlap. (No gain could be measured on the
    /// machine of `docs/PERFORMANCE.md` when this was added: its levels drowned it.)
    #[inline]
    pub fn publish_used_pair(a: &mut DeviceRing, b: &mut DeviceRing) -> (bool, bool) {
        let pa = a.store_used_idx().filter(|_| a.notify_fd.is_some());
        let pb = b.store_used_idx().filter(|_| b.notify_fd.is_some());
        if pa.is_none() && pb.is_none() {
            return (false, false);
        }
        // Both stores (used.idx) → both loads (used_event / flags), as in `publish_used`.
        fence(Ordering::SeqCst);
        let ca = pa.is_some_and(|(old, new)| a.notify_after_fence(old, new));
        let cb = pb.is_some_and(|(old, new)| b.notify_after_fence(old, new));
        (ca, cb)
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
        self.u16_at(self.areas.used, layout::USED_IDX).store(new, Ordering::Release);
        Some((old, new))
    }

    /// The second half, after the caller's `SeqCst` fence: the notification decision for
    /// the step `old` → `new` of the used index, and the call when it is needed.
    #[inline]
    fn notify_after_fence(&mut self, old: u16, new: u16) -> bool {
        let Some(fd) = self.notify_fd else {
            return false;
        };
        let notify = if self.event_idx {
            let ev = self.u16_at(self.areas.avail, layout::used_event(self.size)).load(Ordering::Relaxed);
            layout::need_event(ev, new, old)
        } else {
            let flags = self.u16_at(self.areas.avail, layout::AVAIL_FLAGS).load(Ordering::Relaxed);
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
    /// `VRING_USED_F_NO_NOTIFY`. When enabling, returns whether new buffers arrived in
    /// the meantime (the caller must then poll instead of sleeping).
    pub fn set_kicks(&mut self, enable: bool) -> bool {
        if self.event_idx {
            // Kick me when avail idx moves past what I have consumed (enable), or only
            // after a full u16 wrap (suppress).
            let ev = if enable { self.last_avail } else { self.last_avail.wrapping_sub(1) };
            self.u16_at(self.areas.used, layout::avail_event(self.size)).store(ev, Ordering::Relaxed);
        } else {
            let flags = if enable { 0 } else { layout::USED_F_NO_NOTIFY };
            self.u16_at(self.areas.used, layout::USED_FLAGS).store(flags, Ordering::Relaxed);
        }
        if !enable {
            return false;
        }
        // Store (event/flags) → load (avail.idx): full fence, see module doc.
        fence(Ordering::SeqCst);
        let avail = self.u16_at(self.areas.avail, layout::AVAIL_IDX).load(Ordering::Acquire);
        avail != self.avail_cached
    }
}

/// Writes 1 to an eventfd. Errors are ignored: the counter cannot overflow in practice
/// and a closed fd only means the driver is gone.
#[inline]
pub fn signal(fd: i32) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid local to an fd; no memory is handed over.
    let _ = unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
}

// `gather`, `scatter` and `copy_chain` first try the case of every burst path: the whole
// range inside the first piece (a one-descriptor chain, which `walk` decides inline). That
// case is inlined into the caller, so a copy of a constant length (a header, two MAC
// addresses) becomes a few moves; anything else goes to the piece-by-piece loop out of
// line. Measured with `bench/callgrind.sh` (be-loop: `reflect`'s three small copies and its
// frame copy).

/// Copies `len` bytes out of `chain` starting at byte `off` into `dst`. Returns the bytes
/// copied (less than `len` if the chain is shorter).
#[inline(always)]
pub fn gather(chain: &Chain, off: usize, dst: &mut [u8]) -> usize {
    if let Some(p) = chain.in_first(off, dst.len()) {
        // SAFETY: `p .. + dst.len()` is inside a translated guest buffer (`in_first`);
        // `dst` is ours. `copy` as in `gather_pieces`.
        unsafe { std::ptr::copy(p, dst.as_mut_ptr(), dst.len()) };
        return dst.len();
    }
    gather_pieces(chain, off, dst)
}

#[inline(never)]
fn gather_pieces(chain: &Chain, mut off: usize, dst: &mut [u8]) -> usize {
    let mut done = 0;
    for s in chain.segs() {
        let l = s.len as usize;
        if off >= l {
            off -= l;
            continue;
        }
        let n = (l - off).min(dst.len() - done);
        // SAFETY: `s.ptr + off .. + n` is inside a translated guest buffer; `dst` is ours.
        // `copy` (memmove semantics) because guest memory is foreign; the bytes may be
        // torn if the driver rewrites them concurrently, which only harms that driver.
        unsafe { std::ptr::copy(s.ptr.add(off), dst.as_mut_ptr().add(done), n) };
        done += n;
        off = 0;
        if done == dst.len() {
            break;
        }
    }
    done
}

/// Copies `src` into `chain` starting at byte `off`. Returns the bytes copied.
#[inline(always)]
pub fn scatter(chain: &Chain, off: usize, src: &[u8]) -> usize {
    if let Some(p) = chain.in_first(off, src.len()) {
        // SAFETY: `p .. + src.len()` is inside a translated, device-writable guest buffer
        // (`in_first`).
        unsafe { std::ptr::copy(src.as_ptr(), p, src.len()) };
        return src.len();
    }
    scatter_pieces(chain, off, src)
}

#[inline(never)]
fn scatter_pieces(chain: &Chain, mut off: usize, src: &[u8]) -> usize {
    let mut done = 0;
    for s in chain.segs() {
        let l = s.len as usize;
        if off >= l {
            off -= l;
            continue;
        }
        let n = (l - off).min(src.len() - done);
        // SAFETY: the destination lies inside a translated, device-writable guest buffer.
        unsafe { std::ptr::copy(src.as_ptr().add(done), s.ptr.add(off), n) };
        done += n;
        off = 0;
        if done == src.len() {
            break;
        }
    }
    done
}

/// Copies `len` bytes from `src` (from byte `src_off`) to `dst` (from byte `dst_off`),
/// piece by piece. Returns the bytes copied.
#[inline(always)]
pub fn copy_chain(src: &Chain, src_off: usize, dst: &Chain, dst_off: usize, len: usize) -> usize {
    if let (Some(s), Some(d)) = (src.in_first(src_off, len), dst.in_first(dst_off, len)) {
        // SAFETY: both ranges lie inside a translated guest buffer (`in_first`); `copy`
        // as in `copy_pieces`.
        unsafe { std::ptr::copy(s, d, len) };
        return len;
    }
    copy_pieces(src, src_off, dst, dst_off, len)
}

#[inline(never)]
fn copy_pieces(src: &Chain, src_off: usize, dst: &Chain, dst_off: usize, len: usize) -> usize {
    let (mut si, mut so) = (0usize, src_off);
    let (mut di, mut dof) = (0usize, dst_off);
    let (ss, ds) = (src.segs(), dst.segs());
    let mut done = 0;
    while done < len {
        while si < ss.len() && so >= ss[si].len as usize {
            so -= ss[si].len as usize;
            si += 1;
        }
        while di < ds.len() && dof >= ds[di].len as usize {
            dof -= ds[di].len as usize;
            di += 1;
        }
        if si == ss.len() || di == ds.len() {
            break;
        }
        let n = (ss[si].len as usize - so).min(ds[di].len as usize - dof).min(len - done);
        // SAFETY: both ranges lie inside translated guest buffers (bounds from the segs);
        // `copy` tolerates a malicious driver pointing both at the same memory.
        unsafe { std::ptr::copy(ss[si].ptr.add(so), ds[di].ptr.add(dof), n) };
        so += n;
        dof += n;
        done += n;
    }
    done
}

#[cfg(test)]
#[path = "split_ring_tests.rs"]
mod tests;

/// Helpers for other modules' unit tests.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::Chain;

    /// A chain of one segment over `buf`, as a walk of a one-descriptor chain records it.
    pub fn chain_over(buf: &mut [u8]) -> Chain {
        let mut c = Chain::default();
        c.push(buf.as_mut_ptr(), buf.len() as u32);
        c.total = buf.len() as u64;
        c
    }
}
