//! The driver side of a split virtqueue, written for batching (virtio 1.2 §2.7).
//!
//! Owns: one queue's ring memory (in the DMA arena), descriptor bookkeeping in
//! driver-private arrays (a token, a posted length and a link per descriptor), the avail
//! publish and kick decision, and the validation of everything the device writes into
//! the used ring. Must not: know what a buffer holds (the rx/tx queues do) or allocate.
//!
//! This file holds what both bookkeeping modes share: the ring memory and every access
//! to it, publishing and the kick decision, polling the used index, and the entry points
//! that pick the mode once per call. The modes, fixed for the ring's life
//! ([`RingFeatures`]), each live in their own file, readable alone:
//! * **any order** (the default, `any_order.rs`): descriptor ids come from an O(1) free
//!   stack, and every used element is read and checked against what is in flight;
//! * **in order** (`VIRTIO_F_IN_ORDER` negotiated, §2.7.9 / §2.8.22, `in_order.rs`): the
//!   device uses buffers in the order they were made available, so the driver takes
//!   descriptors in table order and knows which buffer a used element is for before
//!   reading it.
//!
//! A data buffer is one descriptor (virtio-net header and frame are contiguous in one
//! pool buffer), except a multi-segment transmit packet, a chain with its head's id as
//! token ([`DriverRing::post_chain_id`]). Control commands are short chains
//! ([`DriverRing::post_chain`]: readable command, writable ack); chain links live in a
//! driver-private array too, so freeing a chain never reads memory the device can write.
//!
//! Shared memory is touched only through raw pointers with volatile or atomic accesses:
//! * descriptors and avail entries are written with volatile stores, then published by
//!   one `Release` store of `avail.idx` per burst, so the device, after its acquire load
//!   of the index, sees them complete;
//! * `used.idx` is loaded with `Acquire` (pairs with the device's release store after it
//!   wrote used elements and received data), then elements are read volatile;
//! * the kick decision reads `avail_event`/`used.flags` after a `SeqCst` fence that
//!   orders the avail-index store before that load (store→load), pairing with the
//!   device's fence when it re-enables notifications.

use std::sync::atomic::{fence, AtomicU16, Ordering};
use std::sync::Arc;

use crate::dma::DmaArena;
use crate::error::{DeviceError, Result};
use crate::layout::{self, DESC_F_NEXT, DESC_F_WRITE};
use crate::transport::Notifier;

mod any_order;
mod api;
mod in_order;
pub mod packed;

pub use api::{AnyRing, Ring};
pub use packed::PackedRing;

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;

/// Device addresses of a ring's three areas (what the transport tells the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddrs {
    /// Descriptor table (packed: the descriptor ring).
    pub desc: u64,
    /// Driver area (avail ring; packed: the driver's event suppression structure).
    pub avail: u64,
    /// Device area (used ring; packed: the device's event suppression structure).
    pub used: u64,
}

/// The negotiated features that change how a ring is driven.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingFeatures {
    /// `VIRTIO_F_RING_EVENT_IDX`: notifications through `avail_event`/`used_event`.
    pub event_idx: bool,
    /// `VIRTIO_F_IN_ORDER`: buffers are used in the order they were made available.
    pub in_order: bool,
}

impl RingFeatures {
    /// The ring features of a negotiated feature set.
    pub fn from_features(features: u64) -> RingFeatures {
        use crate::layout::features as f;
        RingFeatures {
            event_idx: features & f::bit(f::RING_EVENT_IDX) != 0,
            in_order: features & f::bit(f::IN_ORDER) != 0,
        }
    }
}

/// Supplies the buffers of a [`DriverRing::post_burst`]. The data path implements it
/// on small structs with an `#[inline(always)]` method, so that a burst compiles into one
/// loop (a closure called from the burst's two loops would stay a call per buffer).
pub trait PostSource {
    /// The `k`-th buffer of the burst, on descriptor `id`: `(addr, len, token)`.
    fn buffer(&mut self, k: usize, id: u16) -> (u64, u32, u32);
}

/// Receives the buffers of a [`DriverRing::pop_used_burst`], in order.
pub trait UsedSink {
    /// One used buffer: the token it was posted with and the length the device wrote.
    fn used(&mut self, token: u32, len: u32);
}

/// Receives the tokens of a [`DriverRing::pop_used_tokens`], in order.
pub trait TokenSink {
    /// One used buffer's token.
    fn token(&mut self, token: u32);
}

const NO_TOKEN: u32 = u32::MAX;
/// No batch pending (in-order mode: see [`DriverRing::pop_used`]).
const NO_BATCH: u32 = u32::MAX;
/// End of a chain in the driver-private link array.
const NO_NEXT: u16 = u16::MAX;

/// One split virtqueue, driver side.
pub struct DriverRing {
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    addrs: RingAddrs,
    size: u16,
    mask: u16,
    /// Free descriptor ids (a stack: O(1) pop and push). Any-order mode only.
    free: Box<[u16]>,
    nfree: u16,
    /// What each in-flight head carries, and the bytes posted in its chain.
    tokens: Box<[u32]>,
    posted_len: Box<[u32]>,
    /// Any-order mode: the next descriptor of each in-flight chain (`NO_NEXT` at its
    /// end). In-order mode: the number of descriptors in the chain at each head.
    links: Box<[u16]>,
    in_order: bool,
    /// In-order mode: table position (wrapping counter) of the next descriptor to post,
    /// and of the oldest in-flight chain's head.
    next_desc: u16,
    used_desc: u16,
    /// In-order mode: the id and length of the used element that ends a batch being
    /// taken (`NO_BATCH` when none).
    batch_id: u32,
    batch_len: u32,
    /// Buffers (chain heads) the device holds.
    heads: u16,
    /// Next avail index to fill, and the value last published.
    avail_idx: u16,
    published: u16,
    last_used: u16,
    event_idx: bool,
    notifier: Option<Notifier>,
    /// Kicks sent.
    pub kicks: u64,
    _arena: Arc<DmaArena>,
}

// SAFETY: the ring's pointers point into an arena kept alive by `_arena`; a ring is used
// by one thread at a time (`&mut self` for every operation).
unsafe impl Send for DriverRing {}

impl DriverRing {
    /// Carves a ring of `size` entries (a power of two) from `arena`.
    pub fn new(arena: &Arc<DmaArena>, size: u16, features: RingFeatures) -> Result<DriverRing> {
        let RingFeatures { event_idx, in_order } = features;
        if size == 0 || !size.is_power_of_two() || size > layout::MAX_QUEUE_SIZE {
            return Err(crate::Error::Config(format!("ring size {size} is not a power of two in 1..=32768")));
        }
        let [d, a, u] = Self::allocations(size);
        let (desc, desc_iova) = arena.alloc(d.0, d.1)?;
        let (avail, avail_iova) = arena.alloc(a.0, a.1)?;
        let (used, used_iova) = arena.alloc(u.0, u.1)?;
        let r = DriverRing {
            desc,
            avail,
            used,
            addrs: RingAddrs { desc: desc_iova, avail: avail_iova, used: used_iova },
            size,
            mask: size - 1,
            free: (0..size).rev().collect(),
            nfree: size,
            tokens: vec![NO_TOKEN; size as usize].into_boxed_slice(),
            posted_len: vec![0; size as usize].into_boxed_slice(),
            links: vec![NO_NEXT; size as usize].into_boxed_slice(),
            in_order,
            next_desc: 0,
            used_desc: 0,
            batch_id: NO_BATCH,
            batch_len: 0,
            heads: 0,
            avail_idx: 0,
            published: 0,
            last_used: 0,
            event_idx,
            notifier: None,
            kicks: 0,
            _arena: arena.clone(),
        };
        let mut r = r;
        r.reset();
        Ok(r)
    }

    /// Puts the ring in its initial state: ring memory zeroed, every descriptor free,
    /// indices at 0, the device asked not to interrupt. At creation, and for a new device
    /// after the one the ring was set up on went away (a back-end restart): every buffer
    /// must have been taken back first ([`drain_in_flight`](Self::drain_in_flight)). The
    /// notifier and the kick count stay. Control path only.
    pub fn reset(&mut self) {
        debug_assert_eq!(self.heads, 0, "buffers still in flight");
        let [d, a, u] = Self::allocations(self.size);
        // SAFETY: the three areas are this ring's, of these sizes (`allocations`); no
        // device uses them now (new, or the caller's contract: the device it was set up
        // on is gone and the next gets it only after this), so plain writes race with
        // nothing.
        unsafe {
            std::ptr::write_bytes(self.desc, 0, d.0);
            std::ptr::write_bytes(self.avail, 0, a.0);
            std::ptr::write_bytes(self.used, 0, u.0);
        }
        let size = self.size;
        for (i, f) in self.free.iter_mut().enumerate() {
            *f = size - 1 - i as u16;
        }
        self.nfree = size;
        self.tokens.fill(NO_TOKEN);
        self.posted_len.fill(0);
        self.links.fill(NO_NEXT);
        self.next_desc = 0;
        self.used_desc = 0;
        self.batch_id = NO_BATCH;
        self.batch_len = 0;
        self.heads = 0;
        self.avail_idx = 0;
        self.published = 0;
        self.last_used = 0;
        // We poll: ask the device not to interrupt us.
        if self.event_idx {
            self.used_event().store(u16::MAX, Ordering::Relaxed);
        } else {
            self.avail_flags().store(layout::AVAIL_F_NO_INTERRUPT, Ordering::Relaxed);
        }
    }

    /// What [`DriverRing::new`] takes from the arena, in order: `(bytes, alignment)` of
    /// the descriptor table, the avail ring and the used ring (to size an arena).
    pub const fn allocations(size: u16) -> [(usize, usize); 3] {
        [
            (layout::desc_table_bytes(size), 4096),
            (layout::avail_bytes(size), 64),
            (layout::used_bytes(size), 4096),
        ]
    }

    /// The ring's device addresses.
    pub fn addrs(&self) -> RingAddrs {
        self.addrs
    }
    /// Ring size.
    pub fn size(&self) -> u16 {
        self.size
    }
    /// Free descriptors.
    pub fn free_count(&self) -> u16 {
        self.nfree
    }
    /// Buffers (descriptor chains) the device holds.
    pub fn in_flight(&self) -> u16 {
        self.heads
    }
    /// Sets how this ring kicks the device (after the transport set it up).
    pub fn set_notifier(&mut self, n: Notifier) {
        self.notifier = Some(n);
    }

    /// Whether the ring runs in in-order mode (`VIRTIO_F_IN_ORDER`).
    pub fn in_order(&self) -> bool {
        self.in_order
    }

    // ---- Ring memory: every access to what the device shares goes through here. ----

    /// The 16-bit field at `off` in ring area `area`, as an atomic.
    ///
    /// # Safety
    /// `area` is one of this ring's three areas and `area + off .. + 2` lies inside it
    /// (for this ring's size), with `off` even.
    #[inline(always)]
    unsafe fn u16_at(&self, area: *mut u8, off: usize) -> &AtomicU16 {
        // SAFETY: `area + off` is inside a ring area allocated in `new` for this size
        // (the caller's promise), 2-byte aligned (areas are 64/4096-aligned, offsets
        // even); atomics may alias memory the device writes.
        unsafe { AtomicU16::from_ptr(area.add(off) as *mut u16) }
    }

    /// `avail.flags` (driver area).
    #[inline(always)]
    fn avail_flags(&self) -> &AtomicU16 {
        // SAFETY: `AVAIL_FLAGS` is a field of the driver area, of any size.
        unsafe { self.u16_at(self.avail, layout::AVAIL_FLAGS) }
    }
    /// `avail.idx` (driver area).
    #[inline(always)]
    fn avail_idx_field(&self) -> &AtomicU16 {
        // SAFETY: `AVAIL_IDX` is a field of the driver area, of any size.
        unsafe { self.u16_at(self.avail, layout::AVAIL_IDX) }
    }
    /// `used_event`, after the avail ring's `size` entries (EVENT_IDX).
    #[inline(always)]
    fn used_event(&self) -> &AtomicU16 {
        // SAFETY: `used_event(size)` is the driver area's last field for this ring's size
        // (`avail_bytes(size)` covers it).
        unsafe { self.u16_at(self.avail, layout::used_event(self.size)) }
    }
    /// `used.flags` (device area).
    #[inline(always)]
    fn used_flags(&self) -> &AtomicU16 {
        // SAFETY: `USED_FLAGS` is a field of the device area, of any size.
        unsafe { self.u16_at(self.used, layout::USED_FLAGS) }
    }
    /// `used.idx` (device area).
    #[inline(always)]
    fn used_idx(&self) -> &AtomicU16 {
        // SAFETY: `USED_IDX` is a field of the device area, of any size.
        unsafe { self.u16_at(self.used, layout::USED_IDX) }
    }
    /// `avail_event`, after the used ring's `size` elements (EVENT_IDX).
    #[inline(always)]
    fn avail_event(&self) -> &AtomicU16 {
        // SAFETY: `avail_event(size)` is the device area's last field for this ring's
        // size (`used_bytes(size)` covers it).
        unsafe { self.u16_at(self.used, layout::avail_event(self.size)) }
    }

    /// Writes descriptor `id` as two aligned 64-bit volatile stores.
    ///
    /// # Safety
    /// `id < size`.
    #[inline(always)]
    unsafe fn write_desc(&mut self, id: u16, addr: u64, len: u32, flags: u16, next: u16) {
        // SAFETY: `desc` is this ring's table and `id < size` (the caller's promise).
        unsafe { Self::write_desc_at(self.desc, id, addr, len, flags, next) }
    }

    /// Writes descriptor `id` of the table at `desc` as two aligned 64-bit volatile
    /// stores (the burst loops keep the table's address in a register).
    ///
    /// # Safety
    /// `desc` is the descriptor table of a ring of more than `id` entries.
    #[inline(always)]
    unsafe fn write_desc_at(desc: *mut u8, id: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let tail = len as u64 | (flags as u64) << 32 | (next as u64) << 48;
        // SAFETY: `id < size` (the caller's promise): the descriptor is inside the table,
        // 16-aligned (the table is 4096-aligned); the device does not read it before the
        // avail index we publish later names it (it may still read a stale copy of a
        // descriptor it is done with, which only hurts itself).
        unsafe {
            let d = desc.add(id as usize * layout::DESC_SIZE) as *mut u64;
            std::ptr::write_volatile(d, addr.to_le());
            std::ptr::write_volatile(d.add(1), tail.to_le());
        }
    }

    /// The avail entry of the next avail slot (not yet visible).
    #[inline(always)]
    fn next_avail_entry(&self) -> *mut u16 {
        // SAFETY: `avail` is this ring's driver area, the slot is masked below `size`.
        unsafe { Self::avail_entry_at(self.avail, self.avail_idx & self.mask) }
    }

    /// Avail entry `slot` of the driver area `avail`.
    ///
    /// # Safety
    /// `avail` is the driver area of a ring of more than `slot` entries.
    #[inline(always)]
    unsafe fn avail_entry_at(avail: *mut u8, slot: u16) -> *mut u16 {
        // SAFETY: `avail_entry(slot)` with `slot < size` is inside the driver area,
        // 2-aligned; only the driver writes it.
        unsafe { avail.add(layout::avail_entry(slot)) as *mut u16 }
    }

    /// Puts chain head `id` in the next avail slot (not yet visible).
    #[inline(always)]
    fn push_avail(&mut self, id: u16) {
        let e = self.next_avail_entry();
        // SAFETY: an avail entry of this ring (`next_avail_entry`), which only the driver
        // writes.
        unsafe { std::ptr::write_volatile(e, id.to_le()) };
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// The `(id, len)` of the used element at `last_used`.
    #[inline(always)]
    fn read_used(&self) -> (u32, u32) {
        // SAFETY: `used` is this ring's device area and the slot is masked below `size`.
        unsafe { Self::read_used_at(self.used, self.last_used & self.mask) }
    }

    /// The `(id, len)` of used element `slot` of the device area `used`.
    ///
    /// # Safety
    /// `used` is the device area of a ring of at least `slot + 1` entries.
    #[inline(always)]
    unsafe fn read_used_at(used: *mut u8, slot: u16) -> (u32, u32) {
        // SAFETY: `used_entry(slot)` with `slot < size` plus 8 bytes is inside the device
        // area, 4-aligned (elements start at offset 4 + 8k: read as two u32). Volatile:
        // the device owns this memory; our acquire load of `used.idx` ordered these reads
        // after its writes.
        unsafe {
            let p = used.add(layout::used_entry(slot)) as *const u32;
            (u32::from_le(std::ptr::read_volatile(p)), u32::from_le(std::ptr::read_volatile(p.add(1))))
        }
    }

    /// Writes the descriptors of a chain of `parts` on the ids `id_of(self, 0..n)`, each
    /// naming the next, and returns the bytes posted (saturating).
    fn write_chain(&mut self, parts: &[(u64, u32, bool)], id_of: impl Fn(&DriverRing, usize) -> u16) -> u32 {
        let n = parts.len();
        let mut total = 0u32;
        for (k, &(addr, len, writes)) in parts.iter().enumerate() {
            let id = id_of(self, k);
            let next = if k + 1 < n { Some(id_of(self, k + 1)) } else { None };
            let mut flags = if writes { DESC_F_WRITE } else { 0 };
            if next.is_some() {
                flags |= DESC_F_NEXT;
            }
            // SAFETY: `id_of` gives ids below `size` (free-stack entries or masked table
            // positions).
            unsafe { self.write_desc(id, addr, len, flags, next.unwrap_or(0)) };
            total = total.saturating_add(len);
        }
        total
    }

    // ---- The entry points: one branch on the mode per call. ----

    /// Makes one buffer available: writes its descriptor and avail entry (not yet
    /// visible: see [`publish`](Self::publish)). `token` comes back from
    /// [`pop_used`](Self::pop_used); `None` makes the descriptor id the token. Returns the
    /// descriptor id, or `None` if no descriptor is free.
    #[inline]
    pub fn post(&mut self, addr: u64, len: u32, device_writes: bool, token: Option<u32>) -> Option<u16> {
        if self.nfree == 0 {
            return None;
        }
        let flags = if device_writes { DESC_F_WRITE } else { 0 };
        Some(if self.in_order {
            self.post_in_order(addr, len, flags, token)
        } else {
            self.post_any_order(addr, len, flags, token)
        })
    }

    /// Makes one buffer of several parts available as a descriptor chain: `parts` are
    /// `(addr, len, device_writes)` in order (the spec puts every device-readable part
    /// before the device-writable ones). Not visible until [`publish`](Self::publish).
    /// `token` comes back from [`pop_used`](Self::pop_used). Returns the head id, or
    /// `None` if fewer than `parts.len()` descriptors are free (or `parts` is empty).
    pub fn post_chain(&mut self, parts: &[(u64, u32, bool)], token: u32) -> Option<u16> {
        if parts.is_empty() || parts.len() > self.nfree as usize {
            return None;
        }
        let (head, total) =
            if self.in_order { self.post_chain_in_order(parts) } else { self.post_chain_any_order(parts) };
        self.tokens[head as usize] = token;
        self.posted_len[head as usize] = total;
        self.heads += 1;
        Some(head)
    }

    /// [`post_chain`](Self::post_chain) with the head's descriptor id, or'd with `tag`
    /// (bits no id has: `tag & 0xffff == 0`), as the token (the
    /// transmit path keeps such a packet by the id its chain starts on, tagged to tell it
    /// from a bare buffer index).
    pub fn post_chain_id(&mut self, parts: &[(u64, u32, bool)], tag: u32) -> Option<u16> {
        debug_assert_eq!(tag & 0xffff, 0);
        let head = self.post_chain(parts, NO_TOKEN - 1)?;
        self.tokens[head as usize] = head as u32 | tag;
        Some(head)
    }

    /// Posts `n` single-descriptor buffers (at most [`free_count`](Self::free_count);
    /// fewer if fewer are free) in one loop: `src` gives the `k`-th buffer, on
    /// descriptor `id`, as `(addr, len, token)`. Not visible until
    /// [`publish`](Self::publish). Returns how many were posted. The burst form of
    /// [`post`](Self::post): the ring's counters stay in registers for the whole loop
    /// (the data path's refill and transmit).
    #[inline(always)]
    pub fn post_burst(&mut self, n: u16, device_writes: bool, src: &mut impl PostSource) -> u16 {
        let n = n.min(self.nfree);
        let flags = if device_writes { DESC_F_WRITE } else { 0 };
        if self.in_order {
            self.post_burst_in_order(n, flags, src)
        } else {
            self.post_burst_any_order(n, flags, src)
        }
    }

    /// Publishes everything posted since the last publish with one `Release` store of
    /// `avail.idx`, and makes the burst's one kick decision (EVENT_IDX's `avail_event`
    /// with the spec's wrap-safe formula, or `VRING_USED_F_NO_NOTIFY`). Returns whether
    /// it kicked.
    #[inline]
    pub fn publish(&mut self) -> bool {
        let (old, new) = (self.published, self.avail_idx);
        if old == new {
            return false;
        }
        self.avail_idx_field().store(new, Ordering::Release);
        self.published = new;
        // Store (avail.idx) → load (avail_event / flags): full fence.
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            let ev = self.avail_event().load(Ordering::Relaxed);
            layout::need_event(ev, new, old)
        } else {
            self.used_flags().load(Ordering::Relaxed) & layout::USED_F_NO_NOTIFY == 0
        };
        if kick {
            if let Some(n) = &self.notifier {
                n.notify();
                self.kicks += 1;
            }
        }
        kick
    }

    /// Loads `used.idx` once (`Acquire`) and returns how many buffers the device has
    /// returned since the last [`pop_used`](Self::pop_used), validated against what is
    /// in flight.
    #[inline]
    pub fn poll_used(&self) -> std::result::Result<u16, DeviceError> {
        let idx = self.used_idx().load(Ordering::Acquire);
        let n = idx.wrapping_sub(self.last_used);
        let in_flight = self.heads;
        if n > in_flight {
            return Err(DeviceError::UsedIdxJump { moved: n, in_flight });
        }
        Ok(n)
    }

    /// How many of `n` returned buffers (at most what [`poll_used`](Self::poll_used)
    /// allowed) a receive burst should take: all of them when there are at most four,
    /// else as many as end on a multiple of four in the used index, leaving the rest (at
    /// most three) for the next burst.
    ///
    /// Why (DPDK's split-ring receive does the same): the refill that follows posts as
    /// many buffers as were taken, so the burst boundaries stay on whole cache lines of
    /// descriptors (four per line). Without it a burst that ends inside a line leaves
    /// the line half written when the device reads it, and every later refill writes
    /// into a line the device is reading; that phase, once taken, persisted, so the
    /// receive rate of a whole run depended on which phase it fell into.
    #[inline]
    pub fn line_aligned(&self, n: u16) -> u16 {
        const PER_LINE: u16 = (64 / layout::DESC_SIZE) as u16;
        if n <= PER_LINE {
            return n;
        }
        n - self.last_used.wrapping_add(n) % PER_LINE
    }

    /// Takes the next used element (call at most as often as `poll_used` allowed):
    /// returns the token posted with that buffer and the length the device wrote, after
    /// checking the id and length. The descriptors go back to the free ones.
    ///
    /// In in-order mode the buffer is known before the element is read: the element must
    /// name it, or name a later in-flight head, which ends a batch (§2.7.9): the buffers
    /// up to that head count as used whole (their posted length).
    #[inline(always)]
    pub fn pop_used(&mut self) -> std::result::Result<(u32, u32), DeviceError> {
        if self.in_order {
            self.pop_used_in_order()
        } else {
            self.pop_used_any_order()
        }
    }

    /// Takes `n` used buffers (at most what [`poll_used`](Self::poll_used) allowed),
    /// passing each to `sink` in order; the burst form of
    /// [`pop_used`](Self::pop_used), with the same checks. Returns how many it took, or
    /// the device error that stopped it (the buffers before it were passed to `sink`).
    #[inline(always)]
    pub fn pop_used_burst(
        &mut self,
        n: u16,
        sink: &mut impl UsedSink,
    ) -> std::result::Result<u16, (u16, DeviceError)> {
        if self.in_order {
            self.pop_used_burst_in_order(n, sink)
        } else {
            self.pop_used_burst_any_order(n, sink)
        }
    }

    /// Takes `n` used buffers' tokens (at most what [`poll_used`](Self::poll_used)
    /// allowed), passing each to `sink` in order, for a queue that needs neither the
    /// lengths nor the used elements (transmit). In in-order mode it reads nothing the
    /// device wrote: `poll_used` has checked that the used index covers these buffers,
    /// and they are used in order, whether the device wrote one element each or one per
    /// batch. In any-order mode it is [`pop_used`](Self::pop_used) per buffer. A ring is
    /// consumed through either this or `pop_used`/[`pop_used_burst`](Self::pop_used_burst),
    /// not both: in in-order mode only the latter keep track of a batch's used element.
    #[inline(always)]
    pub fn pop_used_tokens(
        &mut self,
        n: u16,
        sink: &mut impl TokenSink,
    ) -> std::result::Result<u16, (u16, DeviceError)> {
        if self.in_order {
            self.pop_used_tokens_in_order(n, sink)
        } else {
            self.pop_used_tokens_any_order(n, sink)
        }
    }

    /// Tokens of every buffer still in flight (to return them to the pool at close).
    pub fn drain_in_flight(&mut self) -> impl Iterator<Item = u32> + '_ {
        let mut out = Vec::with_capacity(self.heads as usize);
        if self.in_order {
            self.drain_in_order(&mut out);
        } else {
            self.drain_any_order(&mut out);
        }
        self.heads = 0;
        out.into_iter()
    }
}
