//! The driver side of a split virtqueue, written for batching (virtio 1.2 §2.7).
//!
//! Owns: one queue's ring memory (in the DMA arena), descriptor bookkeeping in
//! driver-private arrays (an O(1) free stack and a token per descriptor), the avail
//! publish and kick decision, and the validation of everything the device writes into
//! the used ring. Must not: know what a buffer holds (the rx/tx queues do) or allocate.
//!
//! Two bookkeeping modes, fixed for the ring's life ([`RingFeatures`]):
//! * **any order** (the default): descriptor ids come from an O(1) free stack, and every
//!   used element is read and checked against what is in flight;
//! * **in order** (`VIRTIO_F_IN_ORDER` negotiated, §2.7.9 / §2.8.22): the device uses
//!   buffers in the order they were made available, so the driver takes descriptors in
//!   table order (wrapping at the end), keeps no free stack and no links, and knows which
//!   buffer a used element is for before reading it. The avail ring's entries then repeat
//!   lap after lap and are written only when they change (as DPDK does), so their cache
//!   lines stay clean. A device may return a batch with one used element naming its last
//!   buffer (§2.7.9); [`DriverRing::pop_used`] takes the earlier buffers of the batch as
//!   used whole (their posted length, as Linux's in-order ring does), and
//!   [`DriverRing::pop_used_tokens`] (transmit) reads no used element at all.
//!
//! A data buffer is one descriptor (virtio-net header and frame are contiguous in one
//! pool buffer). Control commands are short chains ([`DriverRing::post_chain`]: readable
//! command, writable ack); their links live in a driver-private array too, so freeing a
//! chain never reads memory the device can write.
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

/// Device addresses of a ring's three areas (what the transport tells the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddrs {
    /// Descriptor table.
    pub desc: u64,
    /// Driver area (avail ring).
    pub avail: u64,
    /// Device area (used ring).
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
        // We poll: ask the device not to interrupt us.
        if event_idx {
            r.u16_at(r.avail, layout::used_event(size)).store(u16::MAX, Ordering::Relaxed);
        } else {
            r.u16_at(r.avail, layout::AVAIL_FLAGS).store(layout::AVAIL_F_NO_INTERRUPT, Ordering::Relaxed);
        }
        Ok(r)
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

    #[inline]
    fn u16_at(&self, area: *mut u8, off: usize) -> &AtomicU16 {
        // SAFETY: `area + off` is inside a ring area allocated in `new` for this size,
        // 2-byte aligned (areas are 64/4096-aligned, offsets even); atomics may alias
        // memory the device writes.
        unsafe { AtomicU16::from_ptr(area.add(off) as *mut u16) }
    }

    /// Whether the ring runs in in-order mode (`VIRTIO_F_IN_ORDER`).
    pub fn in_order(&self) -> bool {
        self.in_order
    }

    /// Writes descriptor `id` as two aligned 64-bit volatile stores.
    #[inline(always)]
    fn write_desc(&mut self, id: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let tail = len as u64 | (flags as u64) << 32 | (next as u64) << 48;
        // SAFETY: `id < size`: the descriptor is inside the table, 16-aligned (the table
        // is 4096-aligned); the device does not read it before the avail index we publish
        // later names it (it may still read a stale copy of a descriptor it is done with,
        // which only hurts itself).
        unsafe {
            let d = self.desc.add(id as usize * layout::DESC_SIZE) as *mut u64;
            std::ptr::write_volatile(d, addr.to_le());
            std::ptr::write_volatile(d.add(1), tail.to_le());
        }
    }

    /// Puts chain head `id` in the next avail slot (not yet visible). In in-order mode
    /// the entry usually holds `id` already from the previous lap: it is then left alone,
    /// so the line stays clean in the device's cache.
    #[inline(always)]
    fn push_avail(&mut self, id: u16) {
        let slot = self.avail_idx & self.mask;
        // SAFETY: `avail_entry(slot)` with `slot < size` is inside the driver area,
        // 2-aligned; only the driver writes it.
        unsafe {
            let e = self.avail.add(layout::avail_entry(slot)) as *mut u16;
            if !self.in_order || std::ptr::read_volatile(e) != id.to_le() {
                std::ptr::write_volatile(e, id.to_le());
            }
        }
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Makes one buffer available: writes its descriptor and avail entry (not yet
    /// visible: see [`publish`](Self::publish)). `token` comes back from
    /// [`pop_used`](Self::pop_used); `None` makes the descriptor id the token. Returns the
    /// descriptor id, or `None` if no descriptor is free.
    #[inline]
    pub fn post(&mut self, addr: u64, len: u32, device_writes: bool, token: Option<u32>) -> Option<u16> {
        if self.nfree == 0 {
            return None;
        }
        self.nfree -= 1;
        let id = if self.in_order {
            let id = self.next_desc & self.mask;
            self.next_desc = self.next_desc.wrapping_add(1);
            id
        } else {
            self.free[self.nfree as usize]
        };
        self.write_desc(id, addr, len, if device_writes { DESC_F_WRITE } else { 0 }, 0);
        self.push_avail(id);
        let i = id as usize;
        self.tokens[i] = token.unwrap_or(id as u32);
        self.posted_len[i] = len;
        // Any order: end of chain. In order: a chain of one.
        self.links[i] = if self.in_order { 1 } else { NO_NEXT };
        self.heads += 1;
        Some(id)
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
        let n = parts.len();
        // The ids, so each descriptor can name its successor: the top of the free stack,
        // or in order the next positions in the table (§2.7.5.1 with IN_ORDER: `next` is
        // x + 1, and 0 after the table's last entry).
        let first = self.nfree as usize - n;
        let id_of = |r: &DriverRing, k: usize| -> u16 {
            if r.in_order {
                r.next_desc.wrapping_add(k as u16) & r.mask
            } else {
                r.free[first + k]
            }
        };
        let mut total = 0u32;
        for (k, &(addr, len, writes)) in parts.iter().enumerate() {
            let id = id_of(self, k);
            let next = if k + 1 < n { Some(id_of(self, k + 1)) } else { None };
            let mut flags = if writes { DESC_F_WRITE } else { 0 };
            if next.is_some() {
                flags |= DESC_F_NEXT;
            }
            self.write_desc(id, addr, len, flags, next.unwrap_or(0));
            if !self.in_order {
                self.links[id as usize] = next.unwrap_or(NO_NEXT);
            }
            total = total.saturating_add(len);
        }
        let head = id_of(self, 0);
        self.nfree -= n as u16;
        if self.in_order {
            self.next_desc = self.next_desc.wrapping_add(n as u16);
            self.links[head as usize] = n as u16;
        }
        self.push_avail(head);
        self.tokens[head as usize] = token;
        self.posted_len[head as usize] = total;
        self.heads += 1;
        Some(head)
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
        self.u16_at(self.avail, layout::AVAIL_IDX).store(new, Ordering::Release);
        self.published = new;
        // Store (avail.idx) → load (avail_event / flags): full fence.
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            let ev = self.u16_at(self.used, layout::avail_event(self.size)).load(Ordering::Relaxed);
            layout::need_event(ev, new, old)
        } else {
            self.u16_at(self.used, layout::USED_FLAGS).load(Ordering::Relaxed) & layout::USED_F_NO_NOTIFY == 0
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
        let idx = self.u16_at(self.used, layout::USED_IDX).load(Ordering::Acquire);
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
    /// into a line the device is reading; that phase, once taken, persisted: our `gen`
    /// feeding our `rxonly` ran at about 22 or about 50 Mpps per run.
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
            return self.pop_used_in_order();
        }
        let (id, len) = self.read_used();
        if id >= self.size as u32 {
            return Err(DeviceError::UsedIdOutOfRange { id });
        }
        let token = self.tokens[id as usize];
        if token == NO_TOKEN {
            return Err(DeviceError::UsedIdNotInFlight { id });
        }
        let posted = self.posted_len[id as usize];
        if len > posted {
            return Err(DeviceError::UsedLenTooLarge { len, posted });
        }
        self.tokens[id as usize] = NO_TOKEN;
        self.heads -= 1;
        // Free the chain through the driver's own links (bounded: a chain never holds
        // more than `size` descriptors, and the links were written by `post*`).
        let mut d = id as u16;
        for _ in 0..self.size {
            self.free[self.nfree as usize] = d;
            self.nfree += 1;
            let next = std::mem::replace(&mut self.links[d as usize], NO_NEXT);
            if next == NO_NEXT {
                break;
            }
            d = next;
        }
        self.last_used = self.last_used.wrapping_add(1);
        Ok((token, len))
    }

    /// The `(id, len)` of the used element at `last_used`.
    #[inline(always)]
    fn read_used(&self) -> (u32, u32) {
        Self::read_used_at(self.used, self.last_used & self.mask)
    }

    /// The `(id, len)` of used element `slot` (`slot < size`) of the device area `used`.
    #[inline(always)]
    fn read_used_at(used: *mut u8, slot: u16) -> (u32, u32) {
        // SAFETY: `used_entry(slot)` with `slot < size` plus 8 bytes is inside the device
        // area, 4-aligned (elements start at offset 4 + 8k: read as two u32). Volatile:
        // the device owns this memory; our acquire load of `used.idx` ordered these reads
        // after its writes.
        unsafe {
            let p = used.add(layout::used_entry(slot)) as *const u32;
            (u32::from_le(std::ptr::read_volatile(p)), u32::from_le(std::ptr::read_volatile(p.add(1))))
        }
    }

    #[inline(always)]
    fn pop_used_in_order(&mut self) -> std::result::Result<(u32, u32), DeviceError> {
        let head = self.used_desc & self.mask;
        let (id, len) =
            if self.batch_id == NO_BATCH { self.read_used() } else { (self.batch_id, self.batch_len) };
        let len = if id == head as u32 {
            self.batch_id = NO_BATCH;
            let posted = self.posted_len[head as usize];
            if len > posted {
                return Err(DeviceError::UsedLenTooLarge { len, posted });
            }
            len
        } else {
            // A batch ending at `id`: it must be a position still in flight ahead of us.
            if id >= self.size as u32 {
                return Err(DeviceError::UsedIdOutOfRange { id });
            }
            let ahead = (id as u16).wrapping_sub(head) & self.mask;
            let descs_in_flight = self.next_desc.wrapping_sub(self.used_desc);
            if ahead >= descs_in_flight {
                return Err(DeviceError::UsedIdNotInFlight { id });
            }
            self.batch_id = id;
            self.batch_len = len;
            self.posted_len[head as usize]
        };
        Ok((self.take_head(head), len))
    }

    /// In-order mode: retires the oldest in-flight chain, whose head is `head`, and
    /// returns its token.
    #[inline(always)]
    fn take_head(&mut self, head: u16) -> u32 {
        let n = self.links[head as usize];
        self.used_desc = self.used_desc.wrapping_add(n);
        self.nfree += n;
        self.heads -= 1;
        self.last_used = self.last_used.wrapping_add(1);
        self.tokens[head as usize]
    }

    /// Posts `n` single-descriptor buffers (at most [`free_count`](Self::free_count);
    /// fewer if fewer are free) in one loop: `src` gives the `k`-th buffer, on
    /// descriptor `id`, as `(addr, len, token)`. Not visible until
    /// [`publish`](Self::publish). Returns how many were posted. The burst form of [`post`](Self::post): the ring's counters stay
    /// in registers for the whole loop (the data path's refill and transmit).
    #[inline(always)]
    pub fn post_burst(&mut self, n: u16, device_writes: bool, src: &mut impl PostSource) -> u16 {
        let n = n.min(self.nfree);
        if !self.in_order {
            for k in 0..n as usize {
                let id = self.free[self.nfree as usize - 1];
                let (addr, len, token) = src.buffer(k, id);
                self.post(addr, len, device_writes, Some(token));
            }
            return n;
        }
        let flags = if device_writes { DESC_F_WRITE } else { 0 };
        let (mask, mut next_desc) = (self.mask, self.next_desc);
        for k in 0..n as usize {
            let id = next_desc & mask;
            let (addr, len, token) = src.buffer(k, id);
            self.write_desc(id, addr, len, flags, 0);
            self.push_avail(id);
            // SAFETY (the three stores): `id <= mask < size`, the length of each array.
            unsafe {
                *self.tokens.get_unchecked_mut(id as usize) = token;
                *self.posted_len.get_unchecked_mut(id as usize) = len;
                *self.links.get_unchecked_mut(id as usize) = 1;
            }
            next_desc = next_desc.wrapping_add(1);
        }
        self.next_desc = next_desc;
        self.nfree -= n;
        self.heads += n;
        n
    }

    /// Takes `n` used buffers (at most what [`poll_used`](Self::poll_used) allowed),
    /// passing each to `sink` in order; the burst form of
    /// [`pop_used`](Self::pop_used), with the same checks. Returns how many it took, or
    /// the device error that stopped it (the buffers before it were passed to `f`).
    #[inline(always)]
    pub fn pop_used_burst(
        &mut self,
        n: u16,
        sink: &mut impl UsedSink,
    ) -> std::result::Result<u16, (u16, DeviceError)> {
        let mut k = 0;
        while k < n {
            if self.in_order && self.batch_id == NO_BATCH {
                // The common case, one used element per buffer, with the counters in
                // registers; anything else (a batch) goes through `pop_used`.
                let (mask, mut used_desc, mut last_used) = (self.mask, self.used_desc, self.last_used);
                let mut freed = 0u16;
                let start = k;
                while k < n {
                    let head = used_desc & mask;
                    let (id, len) = Self::read_used_at(self.used, last_used & mask);
                    if id != head as u32 {
                        break;
                    }
                    // SAFETY (the three loads): `head <= mask < size`, each array's length.
                    let (posted, nd, token) = unsafe {
                        (
                            *self.posted_len.get_unchecked(head as usize),
                            *self.links.get_unchecked(head as usize),
                            *self.tokens.get_unchecked(head as usize),
                        )
                    };
                    if len > posted {
                        break;
                    }
                    used_desc = used_desc.wrapping_add(nd);
                    last_used = last_used.wrapping_add(1);
                    freed += nd;
                    k += 1;
                    sink.used(token, len);
                }
                self.used_desc = used_desc;
                self.last_used = last_used;
                self.nfree += freed;
                self.heads -= k - start;
                if k == n {
                    break;
                }
            }
            match self.pop_used() {
                Ok((token, len)) => sink.used(token, len),
                Err(e) => return Err((k, e)),
            }
            k += 1;
        }
        Ok(k)
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
        if !self.in_order {
            for k in 0..n {
                match self.pop_used() {
                    Ok((t, _)) => sink.token(t),
                    Err(e) => return Err((k, e)),
                }
            }
            return Ok(n);
        }
        let (mask, mut used_desc) = (self.mask, self.used_desc);
        let mut freed = 0u16;
        for _ in 0..n {
            let head = used_desc & mask;
            // SAFETY: `head <= mask < size`, each array's length.
            let (nd, token) = unsafe {
                (*self.links.get_unchecked(head as usize), *self.tokens.get_unchecked(head as usize))
            };
            used_desc = used_desc.wrapping_add(nd);
            freed += nd;
            sink.token(token);
        }
        self.used_desc = used_desc;
        self.last_used = self.last_used.wrapping_add(n);
        self.nfree += freed;
        self.heads -= n;
        Ok(n)
    }

    /// Tokens of every buffer still in flight (to return them to the pool at close).
    pub fn drain_in_flight(&mut self) -> impl Iterator<Item = u32> + '_ {
        let mut out = Vec::with_capacity(self.heads as usize);
        if self.in_order {
            let mut pos = self.used_desc;
            for _ in 0..self.heads {
                let head = pos & self.mask;
                out.push(self.tokens[head as usize]);
                pos = pos.wrapping_add(self.links[head as usize]);
            }
        } else {
            out.extend(
                self.tokens.iter_mut().filter(|t| **t != NO_TOKEN).map(|t| std::mem::replace(t, NO_TOKEN)),
            );
        }
        self.heads = 0;
        out.into_iter()
    }
}

/// A device played in-process on a ring's memory, for unit tests of the modules above
/// the ring (control queue, receive queue). Addresses are arena virtual addresses (a
/// fresh arena maps IOVA = VA).
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use crate::layout::Descriptor;

    /// The device side of one [`DriverRing`].
    pub(crate) struct FakeDevice {
        desc: *mut u8,
        avail: *mut u8,
        used: *mut u8,
        size: u16,
        last_avail: u16,
        used_idx: u16,
    }

    // SAFETY: test-only; the ring memory lives in an arena the test keeps alive, and the
    // accesses are volatile/atomic as a real device's would be.
    unsafe impl Send for FakeDevice {}

    impl FakeDevice {
        pub(crate) fn new(r: &DriverRing) -> FakeDevice {
            FakeDevice {
                desc: r.desc,
                avail: r.avail,
                used: r.used,
                size: r.size,
                last_avail: 0,
                used_idx: 0,
            }
        }

        fn u16_at(&self, area: *mut u8, off: usize) -> &AtomicU16 {
            // SAFETY: inside the ring areas, 2-aligned.
            unsafe { AtomicU16::from_ptr(area.add(off) as *mut u16) }
        }

        /// The next available chain: its head and descriptors.
        pub(crate) fn pop_avail(&mut self) -> Option<(u16, Vec<Descriptor>)> {
            let idx = self.u16_at(self.avail, layout::AVAIL_IDX).load(Ordering::Acquire);
            if idx == self.last_avail {
                return None;
            }
            let slot = self.last_avail & (self.size - 1);
            self.last_avail = self.last_avail.wrapping_add(1);
            let head = self.u16_at(self.avail, layout::avail_entry(slot)).load(Ordering::Relaxed);
            let mut chain = Vec::new();
            let mut id = head;
            for _ in 0..self.size {
                // SAFETY: `id < size` (the driver wrote it); inside the table.
                let b = unsafe {
                    std::ptr::read_volatile(self.desc.add(id as usize * layout::DESC_SIZE) as *const [u8; 16])
                };
                let d = Descriptor::from_le_bytes(b);
                chain.push(d);
                if d.flags & DESC_F_NEXT == 0 {
                    break;
                }
                id = d.next;
            }
            Some((head, chain))
        }

        /// Returns buffer `id` with `len` bytes written.
        pub(crate) fn push_used(&mut self, id: u32, len: u32) {
            let slot = self.used_idx & (self.size - 1);
            // SAFETY: inside the used ring.
            unsafe {
                let e = self.used.add(layout::used_entry(slot)) as *mut u32;
                std::ptr::write_volatile(e, id);
                std::ptr::write_volatile(e.add(1), len);
            }
            self.used_idx = self.used_idx.wrapping_add(1);
            self.u16_at(self.used, layout::USED_IDX).store(self.used_idx, Ordering::Release);
        }

        /// Copies `len` bytes at device address `addr`.
        pub(crate) fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            // SAFETY: test-only: `addr` is an arena VA the driver posted.
            unsafe { std::slice::from_raw_parts(addr as *const u8, len).to_vec() }
        }

        /// Writes `bytes` at device address `addr`.
        pub(crate) fn write(&self, addr: u64, bytes: &[u8]) {
            // SAFETY: test-only: `addr` is a device-writable arena VA the driver posted.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(size: u16, event_idx: bool) -> DriverRing {
        let arena = Arc::new(DmaArena::new(1 << 20, false).unwrap());
        DriverRing::new(&arena, size, RingFeatures { event_idx, in_order: false }).unwrap()
    }

    /// Plays the device: completes `n` avail entries in order with `len`.
    fn complete(r: &DriverRing, from_avail: u16, n: u16, len: u32) {
        let used_idx = r.u16_at(r.used, layout::USED_IDX).load(Ordering::Relaxed);
        for i in 0..n {
            let slot = from_avail.wrapping_add(i) & r.mask;
            // SAFETY: test-only reads/writes inside the ring areas.
            unsafe {
                let id = std::ptr::read_volatile(r.avail.add(layout::avail_entry(slot)) as *const u16);
                let e = r.used.add(layout::used_entry(used_idx.wrapping_add(i) & r.mask)) as *mut u32;
                std::ptr::write_volatile(e, id as u32);
                std::ptr::write_volatile(e.add(1), len);
            }
        }
        r.u16_at(r.used, layout::USED_IDX).store(used_idx.wrapping_add(n), Ordering::Release);
    }

    fn write_used(r: &DriverRing, id: u32, len: u32) {
        let used_idx = r.u16_at(r.used, layout::USED_IDX).load(Ordering::Relaxed);
        // SAFETY: test-only write inside the used ring.
        unsafe {
            let e = r.used.add(layout::used_entry(used_idx & r.mask)) as *mut u32;
            std::ptr::write_volatile(e, id);
            std::ptr::write_volatile(e.add(1), len);
        }
        r.u16_at(r.used, layout::USED_IDX).store(used_idx.wrapping_add(1), Ordering::Release);
    }

    #[test]
    fn post_publish_and_reclaim_in_bulk_across_wraps() {
        let mut r = ring(8, false);
        let mut avail = 0u16;
        for round in 0..50u32 {
            let n = (round % 8 + 1) as u16;
            for k in 0..n {
                assert!(r.post(0x1000 + k as u64, 100, true, Some(round * 100 + k as u32)).is_some());
            }
            r.publish();
            complete(&r, avail, n, 60);
            avail = avail.wrapping_add(n);
            assert_eq!(r.poll_used().unwrap(), n);
            for k in 0..n {
                assert_eq!(r.pop_used().unwrap(), (round * 100 + k as u32, 60));
            }
            assert_eq!(r.free_count(), 8);
        }
        assert!(r.post(0, 1, false, None).is_some());
        for _ in 0..7 {
            assert!(r.post(0, 1, false, None).is_some());
        }
        assert!(r.post(0, 1, false, None).is_none(), "full");
    }

    /// A receive burst ends on a multiple of four in the used index once it takes more
    /// than four, whatever the starting point (also across the u16 wrap: 65536 is a
    /// multiple of four), and never takes none of what it was offered.
    #[test]
    fn receive_bursts_end_on_a_line_of_descriptors() {
        let mut r = ring(16, false);
        for start in [0u16, 1, 2, 3, 65533, 65534, 65535] {
            r.last_used = start;
            for n in 0..=16u16 {
                let k = r.line_aligned(n);
                if n <= 4 {
                    assert_eq!(k, n);
                } else {
                    assert_eq!(start.wrapping_add(k) % 4, 0, "start {start}, n {n}");
                    assert!(k <= n && n - k <= 3 && k > 0, "start {start}, n {n}, k {k}");
                }
            }
        }
    }

    #[test]
    fn rejects_bad_used_entries() {
        let mut r = ring(8, false);
        r.post(0x1000, 100, true, Some(7));
        r.publish();
        write_used(&r, 9, 10);
        assert_eq!(r.poll_used().unwrap(), 1);
        assert_eq!(r.pop_used(), Err(DeviceError::UsedIdOutOfRange { id: 9 }));

        let mut r = ring(8, false);
        r.post(0x1000, 100, true, Some(7));
        r.publish();
        write_used(&r, 3, 10); // descriptor 3 was never posted (the stack hands out 0 first)
        assert_eq!(r.pop_used(), Err(DeviceError::UsedIdNotInFlight { id: 3 }));

        let mut r = ring(8, false);
        r.post(0x1000, 100, true, Some(7));
        r.publish();
        write_used(&r, 0, 101);
        assert_eq!(r.pop_used(), Err(DeviceError::UsedLenTooLarge { len: 101, posted: 100 }));

        let mut r = ring(8, false);
        r.post(0x1000, 100, true, Some(7));
        r.publish();
        write_used(&r, 0, 10);
        write_used(&r, 0, 10);
        assert_eq!(r.poll_used(), Err(DeviceError::UsedIdxJump { moved: 2, in_flight: 1 }));
        // A double completion of the same id is caught even within the in-flight budget.
        let mut r = ring(8, false);
        r.post(0x1000, 100, true, Some(7));
        r.post(0x2000, 100, true, Some(8));
        r.publish();
        write_used(&r, 0, 10);
        write_used(&r, 0, 10);
        assert_eq!(r.poll_used(), Ok(2));
        assert_eq!(r.pop_used(), Ok((7, 10)));
        assert_eq!(r.pop_used(), Err(DeviceError::UsedIdNotInFlight { id: 0 }));
    }

    #[test]
    fn chains_link_their_parts_and_free_them_whole() {
        let mut r = ring(8, false);
        let mut dev = fake::FakeDevice::new(&r);
        for round in 0..20u32 {
            let head =
                r.post_chain(&[(0x1000, 2, false), (0x2000, 6, false), (0x3000, 1, true)], round).unwrap();
            r.publish();
            assert_eq!(r.in_flight(), 1);
            assert_eq!(r.free_count(), 5);
            let (h, chain) = dev.pop_avail().unwrap();
            assert_eq!(h, head);
            let got: Vec<(u64, u32, u16)> = chain.iter().map(|d| (d.addr, d.len, d.flags)).collect();
            assert_eq!(
                got,
                vec![(0x1000, 2, DESC_F_NEXT), (0x2000, 6, DESC_F_NEXT), (0x3000, 1, DESC_F_WRITE)]
            );
            dev.push_used(head as u32, 1);
            assert_eq!(r.poll_used(), Ok(1));
            assert_eq!(r.pop_used(), Ok((round, 1)));
            assert_eq!((r.free_count(), r.in_flight()), (8, 0), "the whole chain is free again");
        }
        // Too few free descriptors: refused, nothing taken.
        for _ in 0..6 {
            r.post(0, 1, false, None);
        }
        assert!(r.post_chain(&[(0, 1, false), (0, 1, false), (0, 1, true)], 0).is_none());
        assert!(r.post_chain(&[], 0).is_none());
        assert_eq!(r.free_count(), 2);
    }

    #[test]
    fn a_used_id_naming_a_chain_tail_is_rejected() {
        let mut r = ring(8, false);
        let mut dev = fake::FakeDevice::new(&r);
        let head = r.post_chain(&[(0x1000, 2, false), (0x3000, 1, true)], 5).unwrap();
        r.publish();
        let (_, chain) = dev.pop_avail().unwrap();
        assert_ne!(chain.len(), 0);
        let tail = (0..8u32).find(|&i| i != head as u32 && r.links[head as usize] as u32 == i).unwrap();
        dev.push_used(tail, 1);
        assert_eq!(r.poll_used(), Ok(1));
        assert_eq!(r.pop_used(), Err(DeviceError::UsedIdNotInFlight { id: tail }));
    }

    #[test]
    fn kicks_only_when_the_device_asks() {
        let mut r = ring(8, false);
        r.u16_at(r.used, layout::USED_FLAGS).store(layout::USED_F_NO_NOTIFY, Ordering::Relaxed);
        r.post(0, 1, false, None);
        assert!(!r.publish());
        r.u16_at(r.used, layout::USED_FLAGS).store(0, Ordering::Relaxed);
        r.post(0, 1, false, None);
        assert!(r.publish());
        assert!(!r.publish(), "nothing new, no kick");

        let mut r = ring(16, true);
        r.u16_at(r.used, layout::avail_event(16)).store(3, Ordering::Relaxed);
        let mut kicks = 0;
        for _ in 0..4 {
            r.post(0, 1, false, None);
            r.post(0, 1, false, None);
            kicks += r.publish() as u32;
        }
        assert_eq!(kicks, 1, "only the publish that moved avail idx past 3 (2 -> 4) kicks");
    }

    /// Collects the tokens of `pop_used_tokens`.
    impl TokenSink for Vec<u32> {
        fn token(&mut self, token: u32) {
            self.push(token);
        }
    }

    fn ring_in_order(size: u16) -> DriverRing {
        let arena = Arc::new(DmaArena::new(1 << 20, false).unwrap());
        DriverRing::new(&arena, size, RingFeatures { event_idx: false, in_order: true }).unwrap()
    }

    /// Plays an in-order device that returns `n` buffers with a single used element
    /// naming the last one (§2.7.9), and advances the used index by `n`.
    fn complete_batch(r: &DriverRing, from_avail: u16, n: u16, len: u32) {
        let used_idx = r.u16_at(r.used, layout::USED_IDX).load(Ordering::Relaxed);
        let last = from_avail.wrapping_add(n - 1) & r.mask;
        // SAFETY: test-only reads/writes inside the ring areas.
        unsafe {
            let id = std::ptr::read_volatile(r.avail.add(layout::avail_entry(last)) as *const u16);
            let e = r.used.add(layout::used_entry(used_idx & r.mask)) as *mut u32;
            std::ptr::write_volatile(e, id as u32);
            std::ptr::write_volatile(e.add(1), len);
        }
        r.u16_at(r.used, layout::USED_IDX).store(used_idx.wrapping_add(n), Ordering::Release);
    }

    fn avail_entry(r: &DriverRing, slot: u16) -> u16 {
        r.u16_at(r.avail, layout::avail_entry(slot & r.mask)).load(Ordering::Relaxed)
    }

    #[test]
    fn in_order_takes_descriptors_in_table_order_across_wraps() {
        let mut r = ring_in_order(8);
        assert!(r.in_order());
        let mut avail = 0u16;
        let mut next_id = 0u16;
        for round in 0..50u32 {
            let n = (round % 8 + 1) as u16;
            for k in 0..n {
                let id = r.post(0x1000 + k as u64, 100, true, Some(round * 100 + k as u32)).unwrap();
                assert_eq!(id, next_id & 7, "descriptors are taken in table order");
                next_id = next_id.wrapping_add(1);
            }
            r.publish();
            for k in 0..n {
                assert_eq!(avail_entry(&r, avail.wrapping_add(k)), avail.wrapping_add(k) & 7);
            }
            complete(&r, avail, n, 60);
            avail = avail.wrapping_add(n);
            assert_eq!(r.poll_used().unwrap(), n);
            for k in 0..n {
                assert_eq!(r.pop_used().unwrap(), (round * 100 + k as u32, 60));
            }
            assert_eq!((r.free_count(), r.in_flight()), (8, 0));
        }
        for _ in 0..8 {
            assert!(r.post(0, 1, false, None).is_some());
        }
        assert!(r.post(0, 1, false, None).is_none(), "full");
    }

    #[test]
    fn in_order_batch_with_one_used_element() {
        let mut r = ring_in_order(8);
        for k in 0..5u32 {
            r.post(0x1000, 100 + k, true, Some(10 + k));
        }
        r.publish();
        complete_batch(&r, 0, 5, 60);
        assert_eq!(r.poll_used(), Ok(5));
        // The buffers before the batch's last count as used whole.
        for k in 0..4u32 {
            assert_eq!(r.pop_used(), Ok((10 + k, 100 + k)));
        }
        assert_eq!(r.pop_used(), Ok((14, 60)));
        assert_eq!((r.free_count(), r.in_flight()), (8, 0));
        // The next completion is written where the batch ended; a batch may also be taken
        // over two bursts.
        for k in 0..6u32 {
            r.post(0x1000, 100, true, Some(20 + k));
        }
        r.publish();
        complete(&r, 5, 2, 7);
        complete_batch(&r, 7, 4, 9);
        assert_eq!(r.poll_used(), Ok(6));
        assert_eq!(r.pop_used(), Ok((20, 7)));
        assert_eq!(r.pop_used(), Ok((21, 7)));
        assert_eq!(r.pop_used(), Ok((22, 100)));
        assert_eq!(r.poll_used(), Ok(3));
        assert_eq!(r.pop_used(), Ok((23, 100)));
        assert_eq!(r.pop_used(), Ok((24, 100)));
        assert_eq!(r.pop_used(), Ok((25, 9)));
        assert_eq!(r.poll_used(), Ok(0));
    }

    #[test]
    fn in_order_transmit_reclaim_reads_no_used_element() {
        let mut r = ring_in_order(8);
        for round in 0..20u32 {
            for k in 0..5u32 {
                r.post(0x1000, 64, false, Some(round * 10 + k));
            }
            r.publish();
            // The device moves the used index only: the elements hold garbage.
            // SAFETY: test-only writes inside the used ring.
            unsafe {
                for s in 0..8 {
                    let e = r.used.add(layout::used_entry(s)) as *mut u32;
                    std::ptr::write_volatile(e, 0xdead_beef);
                    std::ptr::write_volatile(e.add(1), u32::MAX);
                }
            }
            let used = r.u16_at(r.used, layout::USED_IDX).load(Ordering::Relaxed);
            r.u16_at(r.used, layout::USED_IDX).store(used.wrapping_add(5), Ordering::Release);
            assert_eq!(r.poll_used(), Ok(5));
            let mut got = Vec::new();
            assert_eq!(r.pop_used_tokens(5, &mut got), Ok(5));
            assert_eq!(got, (0..5u32).map(|k| round * 10 + k).collect::<Vec<_>>());
            assert_eq!((r.free_count(), r.in_flight()), (8, 0));
        }
    }

    #[test]
    fn in_order_rejects_bad_used_entries() {
        // Out of range.
        let mut r = ring_in_order(8);
        r.post(0x1000, 100, true, Some(7));
        r.publish();
        write_used(&r, 9, 10);
        assert_eq!(r.pop_used(), Err(DeviceError::UsedIdOutOfRange { id: 9 }));
        // A position that is not in flight (behind us, or never posted).
        let mut r = ring_in_order(8);
        r.post(0x1000, 100, true, Some(7));
        r.post(0x1000, 100, true, Some(8));
        r.publish();
        write_used(&r, 2, 10);
        assert_eq!(r.pop_used(), Err(DeviceError::UsedIdNotInFlight { id: 2 }));
        let mut r = ring_in_order(8);
        r.post(0x1000, 100, true, Some(7));
        r.post(0x1000, 100, true, Some(8));
        r.publish();
        write_used(&r, 0, 10);
        write_used(&r, 0, 10);
        assert_eq!(r.pop_used(), Ok((7, 10)));
        assert_eq!(r.pop_used(), Err(DeviceError::UsedIdNotInFlight { id: 0 }), "a double completion");
        // Too long.
        let mut r = ring_in_order(8);
        r.post(0x1000, 100, true, Some(7));
        r.publish();
        write_used(&r, 0, 101);
        assert_eq!(r.pop_used(), Err(DeviceError::UsedLenTooLarge { len: 101, posted: 100 }));
        // The index jumping past what is in flight.
        let mut r = ring_in_order(8);
        r.post(0x1000, 100, true, Some(7));
        r.publish();
        let used = r.u16_at(r.used, layout::USED_IDX).load(Ordering::Relaxed);
        r.u16_at(r.used, layout::USED_IDX).store(used.wrapping_add(2), Ordering::Release);
        assert_eq!(r.poll_used(), Err(DeviceError::UsedIdxJump { moved: 2, in_flight: 1 }));
    }

    #[test]
    fn in_order_chains_take_consecutive_descriptors_and_wrap() {
        let mut r = ring_in_order(8);
        let mut dev = fake::FakeDevice::new(&r);
        // Move the table position to 6 with single buffers.
        for t in 0..6u32 {
            r.post(0x100, 1, false, Some(t));
        }
        r.publish();
        for _ in 0..6 {
            let (h, _) = dev.pop_avail().unwrap();
            dev.push_used(h as u32, 0);
        }
        assert_eq!(r.poll_used(), Ok(6));
        let mut got = Vec::new();
        assert_eq!(r.pop_used_tokens(6, &mut got), Ok(6));
        assert_eq!(got, (0..6u32).collect::<Vec<_>>());
        let head = r.post_chain(&[(0x1000, 2, false), (0x2000, 6, false), (0x3000, 1, true)], 77).unwrap();
        assert_eq!(head, 6);
        let single = r.post(0x4000, 9, true, Some(78)).unwrap();
        assert_eq!(single, 1, "after the chain's 6, 7, 0");
        r.publish();
        let (h, chain) = dev.pop_avail().unwrap();
        assert_eq!(h, 6);
        // SAFETY: test-only read of the table: the chain's links are x + 1, wrapping to 0.
        let next_of = |id: usize| unsafe {
            std::ptr::read_volatile(r.desc.add(id * layout::DESC_SIZE + 14) as *const u16)
        };
        assert_eq!((next_of(6), next_of(7)), (7, 0));
        let got: Vec<(u64, u32, u16)> = chain.iter().map(|d| (d.addr, d.len, d.flags)).collect();
        assert_eq!(got, vec![(0x1000, 2, DESC_F_NEXT), (0x2000, 6, DESC_F_NEXT), (0x3000, 1, DESC_F_WRITE)]);
        assert_eq!(r.free_count(), 4);
        dev.push_used(6, 1);
        let (h2, _) = dev.pop_avail().unwrap();
        dev.push_used(h2 as u32, 9);
        assert_eq!(r.poll_used(), Ok(2));
        assert_eq!(r.pop_used(), Ok((77, 1)));
        assert_eq!(r.pop_used(), Ok((78, 9)));
        assert_eq!((r.free_count(), r.in_flight()), (8, 0));
        // Drain sees in-flight tokens in order.
        r.post_chain(&[(0, 1, false), (0, 1, true)], 5).unwrap();
        r.post(0, 1, true, Some(6)).unwrap();
        assert_eq!(r.drain_in_flight().collect::<Vec<_>>(), vec![5, 6]);
    }

    proptest::proptest! {
        /// In-order mode against a model: random bursts of posts and random completions,
        /// each either one element per buffer or one element per batch; every token comes
        /// back once, in order, with the right length.
        #[test]
        fn in_order_matches_a_model(ops in proptest::collection::vec((1u16..=16, 0u16..=16, proptest::bool::ANY), 1..200)) {
            let mut r = ring_in_order(16);
            let mut posted = std::collections::VecDeque::new();
            let mut next_token = 0u32;
            let mut avail = 0u16;
            for (post, done, batch) in ops {
                let post = post.min(r.free_count());
                for _ in 0..post {
                    r.post(0x1000, 1000 + next_token % 7, true, Some(next_token)).unwrap();
                    posted.push_back(next_token);
                    next_token += 1;
                }
                r.publish();
                let done = done.min(posted.len() as u16);
                if done == 0 {
                    continue;
                }
                let expect: Vec<(u32, u32)> = if batch {
                    complete_batch(&r, avail, done, 5);
                    (0..done).map(|k| {
                        let t = posted.pop_front().unwrap();
                        (t, if k + 1 == done { 5 } else { 1000 + t % 7 })
                    }).collect()
                } else {
                    complete(&r, avail, done, 5);
                    (0..done).map(|_| (posted.pop_front().unwrap(), 5)).collect()
                };
                avail = avail.wrapping_add(done);
                proptest::prop_assert_eq!(r.poll_used(), Ok(done));
                let got: Vec<(u32, u32)> = (0..done).map(|_| r.pop_used().unwrap()).collect();
                proptest::prop_assert_eq!(got, expect);
                proptest::prop_assert_eq!(r.in_flight() as usize, posted.len());
                proptest::prop_assert_eq!(r.free_count() as usize, 16 - posted.len());
            }
        }
    }
}
