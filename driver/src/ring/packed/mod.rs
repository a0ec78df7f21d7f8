//! The driver side of a packed virtqueue, written for batching (virtio 1.2 §2.8).
//!
//! Owns: one packed queue's memory in the DMA arena (the descriptor ring, the driver's
//! and the device's event suppression structures, §2.8.10), the avail and used wrap
//! counters (§2.8.1), buffer-id bookkeeping in driver-private arrays (a token, a posted
//! length and a descriptor count per buffer id), posting with one release store per
//! burst, the kick decision (§2.8.10.1), and the validation of every used descriptor the
//! device writes (`used.rs`). Must not: know what a buffer holds (the rx/tx queues do),
//! allocate after `new`, touch the split ring's code or memory (`ring/mod.rs`), or read
//! a chain's shape back from the ring (the device can write it).
//!
//! Ids and modes, fixed for the ring's life ([`RingFeatures`]):
//! * **any order** (the default): buffer ids come from an O(1) free stack; a used
//!   descriptor names one buffer, which must be in flight, and the used position then
//!   moves past as many descriptors as that buffer was posted with (§2.8.7, as Linux's
//!   `virtqueue_get_buf_ctx_packed` does);
//! * **in order** (`VIRTIO_F_IN_ORDER`, §2.8.21/§2.8.22): a buffer's id is the ring
//!   position of its first descriptor, as DPDK's in-order ring does; the device may write
//!   one used descriptor for a batch, naming the batch's last buffer, at the batch's first
//!   position: the earlier buffers count as used whole (their posted length).
//!
//! Shared memory is touched only through raw pointers with volatile or atomic accesses:
//! * a burst's descriptors are written with volatile stores, each one's flags word last;
//!   the flags of the burst's FIRST descriptor are stored last of all, with `Release`, at
//!   [`publish`](PackedRing::publish): a device that acquires that flags word sees the
//!   whole burst (Linux and DPDK publish the same way);
//! * used descriptors are read in ring order: the flags word with `Acquire` (pairs with
//!   the device's release store of it after writing id, length and the buffer), checked
//!   against the used wrap counter, then id and length with volatile loads;
//! * the kick decision loads the device's event suppression structure after a `SeqCst`
//!   fence that orders the head's flags store before that load (store→load), pairing
//!   with the device's fence when it re-enables notifications.

use std::sync::atomic::{fence, AtomicU16, AtomicU32, Ordering};
use std::sync::Arc;

use spec::packed::{self as p, DESC_F_NEXT, DESC_F_WRITE};

use super::{PostSource, RingAddrs, RingFeatures, NO_TOKEN};
use crate::dma::DmaArena;
use crate::error::Result;
use crate::transport::Notifier;

mod used;

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;

/// No batch pending (in-order mode: see `used.rs`).
const NO_BATCH: u32 = u32::MAX;

/// What the ring keeps of one buffer id: the token (`NO_TOKEN` when the id is not in
/// flight), the bytes posted, and the descriptors the buffer occupies in the ring.
/// 16 bytes, a descriptor's size: an in-order ring finds a buffer's slot and its
/// descriptor at the same offset (the id is the position), computed once.
#[derive(Debug, Clone, Copy)]
#[repr(align(16))]
struct Slot {
    token: u32,
    len: u32,
    ndesc: u16,
}

/// One packed virtqueue, driver side.
pub struct PackedRing {
    desc: *mut u8,
    driver_event: *mut u8,
    device_event: *mut u8,
    addrs: RingAddrs,
    size: u16,
    /// Next ring position to fill, and the avail wrap counter that goes with it.
    next_avail: u16,
    avail_wrap: bool,
    /// Next ring position the device writes a used descriptor at, and the used wrap
    /// counter that goes with it.
    next_used: u16,
    used_wrap: bool,
    /// Descriptors (ring positions) not in flight.
    free_slots: u16,
    /// Any-order mode: free buffer ids (a stack, top at `nfree_ids - 1`).
    free_ids: Box<[u16]>,
    nfree_ids: u16,
    /// By buffer id: what the ring keeps of each buffer (one entry, one bounds check).
    slots: Box<[Slot]>,
    /// Buffers the device holds, published or not.
    heads: u16,
    /// Posted since the last publish: buffers, descriptors, and the first descriptor's
    /// position and flags (stored at publish).
    unpublished: u16,
    unpublished_descs: u16,
    pending_head: u16,
    pending_flags: u16,
    /// In-order mode: the id and length of the used descriptor that ends a batch being
    /// taken (`NO_BATCH` when none).
    batch_id: u32,
    batch_len: u32,
    in_order: bool,
    event_idx: bool,
    notifier: Option<Notifier>,
    /// Kicks sent.
    pub kicks: u64,
    _arena: Arc<DmaArena>,
}

// SAFETY: the ring's pointers point into an arena kept alive by `_arena`; a ring is used
// by one thread at a time (`&mut self` for every operation).
unsafe impl Send for PackedRing {}

impl PackedRing {
    /// Carves a ring of `size` entries (1..=32768, any size: §2.8 does not ask for a
    /// power of two) from `arena`.
    pub fn new(arena: &Arc<DmaArena>, size: u16, features: RingFeatures) -> Result<PackedRing> {
        let RingFeatures { event_idx, in_order } = features;
        if size == 0 || size > p::MAX_QUEUE_SIZE {
            return Err(crate::Error::Config(format!("packed ring size {size} is not in 1..=32768")));
        }
        let [d, a, u] = Self::allocations(size);
        let (desc, desc_iova) = arena.alloc(d.0, d.1)?;
        let (driver_event, driver_iova) = arena.alloc(a.0, a.1)?;
        let (device_event, device_iova) = arena.alloc(u.0, u.1)?;
        let r = PackedRing {
            desc,
            driver_event,
            device_event,
            addrs: RingAddrs { desc: desc_iova, avail: driver_iova, used: device_iova },
            size,
            next_avail: 0,
            avail_wrap: true,
            next_used: 0,
            used_wrap: true,
            free_slots: size,
            free_ids: (0..size).rev().collect(),
            nfree_ids: size,
            slots: vec![Slot { token: NO_TOKEN, len: 0, ndesc: 0 }; size as usize].into_boxed_slice(),
            heads: 0,
            unpublished: 0,
            unpublished_descs: 0,
            pending_head: 0,
            pending_flags: 0,
            batch_id: NO_BATCH,
            batch_len: 0,
            in_order,
            event_idx,
            notifier: None,
            kicks: 0,
            _arena: arena.clone(),
        };
        let mut r = r;
        r.reset();
        Ok(r)
    }

    /// Puts the ring in its initial state: ring memory zeroed, every descriptor and id
    /// free, positions at 0 with both wrap counters 1, the device asked not to notify.
    /// At creation, and for a new device after the one the ring was set up on went away
    /// (a back-end restart): every buffer must have been taken back first
    /// ([`drain_in_flight`](Self::drain_in_flight)). The notifier and the kick count
    /// stay. Control path only.
    pub fn reset(&mut self) {
        debug_assert_eq!(self.heads, 0, "buffers still in flight");
        let [d, a, u] = Self::allocations(self.size);
        // SAFETY: the three areas are this ring's, of these sizes (`allocations`); no
        // device uses them now (new, or the caller's contract: the device it was set up
        // on is gone and the next gets it only after this), so plain writes race with
        // nothing. Zero flags are "used in wrap 0", which the device (starting at wrap 1)
        // does not take as available.
        unsafe {
            std::ptr::write_bytes(self.desc, 0, d.0);
            std::ptr::write_bytes(self.driver_event, 0, a.0);
            std::ptr::write_bytes(self.device_event, 0, u.0);
        }
        let size = self.size;
        self.next_avail = 0;
        self.avail_wrap = true;
        self.next_used = 0;
        self.used_wrap = true;
        self.free_slots = size;
        for (i, f) in self.free_ids.iter_mut().enumerate() {
            *f = size - 1 - i as u16;
        }
        self.nfree_ids = size;
        self.slots.fill(Slot { token: NO_TOKEN, len: 0, ndesc: 0 });
        self.heads = 0;
        self.unpublished = 0;
        self.unpublished_descs = 0;
        self.pending_head = 0;
        self.pending_flags = 0;
        self.batch_id = NO_BATCH;
        self.batch_len = 0;
        // We poll: ask the device not to notify us (§2.8.10).
        self.event_u16(self.driver_event, p::EVENT_FLAGS)
            .store(p::EVENT_FLAG_DISABLE.to_le(), Ordering::Relaxed);
    }

    /// What [`PackedRing::new`] takes from the arena, in order: `(bytes, alignment)` of
    /// the descriptor ring, the driver area and the device area (to size an arena).
    pub const fn allocations(size: u16) -> [(usize, usize); 3] {
        [(p::desc_ring_bytes(size), 4096), (p::EVENT_SIZE, 64), (p::EVENT_SIZE, 64)]
    }

    /// The ring's device addresses: descriptor ring, driver area, device area.
    pub fn addrs(&self) -> RingAddrs {
        self.addrs
    }
    /// Ring size.
    pub fn size(&self) -> u16 {
        self.size
    }
    /// Free descriptors.
    pub fn free_count(&self) -> u16 {
        self.free_slots
    }
    /// Buffers the device holds.
    pub fn in_flight(&self) -> u16 {
        self.heads
    }
    /// Whether the ring runs in in-order mode.
    pub fn in_order(&self) -> bool {
        self.in_order
    }
    /// Sets how this ring kicks the device (after the transport set it up).
    pub fn set_notifier(&mut self, n: Notifier) {
        self.notifier = Some(n);
    }
    /// The avail wrap counter and next position, as vhost-user's `SET_VRING_BASE`
    /// carries them for a packed ring (position in bits 0-14, wrap counter in bit 15).
    pub fn vring_base(&self) -> u16 {
        p::event_off_wrap(self.next_avail, self.avail_wrap)
    }

    // ---- Ring memory: every access to what the device shares goes through here. ----

    /// A 16-bit field of an event suppression structure, as an atomic.
    #[inline(always)]
    fn event_u16(&self, area: *mut u8, off: usize) -> &AtomicU16 {
        debug_assert!(area == self.driver_event || area == self.device_event);
        debug_assert!(off == p::EVENT_FLAGS || off == p::EVENT_OFF_WRAP);
        // SAFETY: `area` is one of this ring's two event structures (4 bytes, 64-aligned,
        // allocated in `new`) and `off` is 0 or 2; atomics may alias device writes.
        unsafe { AtomicU16::from_ptr(area.add(off) as *mut u16) }
    }

    /// The flags word of the descriptor at ring position `pos`.
    ///
    /// # Safety
    /// `pos < size`.
    #[inline(always)]
    unsafe fn flags_at(&self, pos: u16) -> &AtomicU16 {
        // SAFETY: `pos < size` (the caller's promise): the descriptor is inside the ring,
        // 16-aligned, its flags 2-aligned at offset 14; atomics may alias device writes.
        unsafe { AtomicU16::from_ptr(self.desc.add(pos as usize * p::DESC_SIZE + p::DESC_FLAGS) as *mut u16) }
    }

    /// Writes address, length and id of the descriptor at `pos`, then its flags: with a
    /// relaxed store, unless it is the first descriptor since the last publish, whose
    /// flags wait for [`publish`](Self::publish).
    ///
    /// # Safety
    /// `pos < size`.
    #[inline(always)]
    unsafe fn write_desc(&mut self, pos: u16, addr: u64, len: u32, id: u16, flags: u16) {
        // SAFETY: `pos < size` (the caller's promise): inside the ring, 16-aligned. The
        // device does not read this descriptor before it sees its flags (or those of
        // the burst's first descriptor) marked available, which happens after these
        // stores (release at publish).
        unsafe { store_fields(self.desc.add(pos as usize * p::DESC_SIZE), addr, len, id) };
        if self.unpublished_descs == 0 {
            self.pending_head = pos;
            self.pending_flags = flags;
        } else {
            // SAFETY: `pos < size`.
            unsafe { self.flags_at(pos) }.store(flags.to_le(), Ordering::Relaxed);
        }
        self.unpublished_descs += 1;
    }

    /// The flags a descriptor gets at the next avail position, and moves that position
    /// on (flipping the avail wrap counter at the ring's end).
    #[inline(always)]
    fn take_avail_pos(&mut self, flags: u16) -> (u16, u16) {
        let pos = self.next_avail;
        let f = flags | p::avail_flags(self.avail_wrap);
        self.next_avail += 1;
        if self.next_avail == self.size {
            self.next_avail = 0;
            self.avail_wrap = !self.avail_wrap;
        }
        (pos, f)
    }

    /// A buffer id for a buffer starting at ring position `pos`: that position in
    /// in-order mode, else the top of the free stack (never empty while a descriptor is
    /// free: every id in flight holds at least one descriptor).
    #[inline(always)]
    fn take_id(&mut self, pos: u16) -> u16 {
        if self.in_order {
            pos
        } else {
            self.nfree_ids -= 1;
            self.free_ids[self.nfree_ids as usize]
        }
    }

    /// Records buffer `id` as in flight.
    #[inline(always)]
    fn track(&mut self, id: u16, token: u32, len: u32, ndesc: u16) {
        self.slots[id as usize] = Slot { token, len, ndesc };
        self.heads += 1;
        self.unpublished += 1;
        self.free_slots -= ndesc;
    }

    // ---- Posting and publishing. ----

    /// Makes one buffer available (not yet visible: see [`publish`](Self::publish)).
    /// `token` comes back with the used buffer; `None` makes the buffer id the token.
    /// Returns the buffer id, or `None` if no descriptor is free.
    pub fn post(&mut self, addr: u64, len: u32, device_writes: bool, token: Option<u32>) -> Option<u16> {
        if self.free_slots == 0 {
            return None;
        }
        let (pos, flags) = self.take_avail_pos(if device_writes { DESC_F_WRITE } else { 0 });
        let id = self.take_id(pos);
        // SAFETY: `pos < size` (`take_avail_pos`).
        unsafe { self.write_desc(pos, addr, len, id, flags) };
        self.track(id, token.unwrap_or(id as u32), len, 1);
        Some(id)
    }

    /// Makes one buffer of several parts available as a chain of descriptors in ring
    /// order, each but the last with NEXT (§2.8.6), all carrying the buffer id. `parts`
    /// are `(addr, len, device_writes)`, device-readable ones first. Not visible until
    /// [`publish`](Self::publish). Returns the buffer id, or `None` if fewer than
    /// `parts.len()` descriptors are free (or `parts` is empty).
    pub fn post_chain(&mut self, parts: &[(u64, u32, bool)], token: u32) -> Option<u16> {
        let n = parts.len();
        if n == 0 || n > self.free_slots as usize {
            return None;
        }
        let id = self.take_id(self.next_avail);
        let mut total = 0u32;
        for (k, &(addr, len, writes)) in parts.iter().enumerate() {
            let mut flags = if writes { DESC_F_WRITE } else { 0 };
            if k + 1 < n {
                flags |= DESC_F_NEXT;
            }
            let (pos, flags) = self.take_avail_pos(flags);
            // SAFETY: `pos < size` (`take_avail_pos`).
            unsafe { self.write_desc(pos, addr, len, id, flags) };
            total = total.saturating_add(len);
        }
        self.track(id, token, total, n as u16);
        Some(id)
    }

    /// [`post_chain`](Self::post_chain) with the buffer id, or'd with `tag` (bits no id
    /// has: `tag & 0xffff == 0`), as the token (as
    /// [`DriverRing::post_chain_id`](crate::ring::DriverRing::post_chain_id)).
    pub fn post_chain_id(&mut self, parts: &[(u64, u32, bool)], tag: u32) -> Option<u16> {
        debug_assert_eq!(tag & 0xffff, 0);
        let id = self.post_chain(parts, NO_TOKEN - 1)?;
        self.slots[id as usize].token = id as u32 | tag;
        Some(id)
    }

    /// Posts `n` single-descriptor buffers (fewer if fewer descriptors are free) in one
    /// loop: `src` gives the `k`-th buffer, on buffer id `id`, as `(addr, len, token)`.
    /// Not visible until [`publish`](Self::publish). Returns how many were posted.
    #[inline(always)]
    pub fn post_burst(&mut self, n: u16, device_writes: bool, src: &mut impl PostSource) -> u16 {
        let n = n.min(self.free_slots);
        if n == 0 {
            return 0;
        }
        let wflag = if device_writes { DESC_F_WRITE } else { 0 };
        if self.in_order {
            self.post_singles::<true>(n, wflag, src);
        } else {
            self.post_singles::<false>(n, wflag, src);
        }
        // `track` for the whole burst: one descriptor per buffer.
        self.heads += n;
        self.unpublished += n;
        self.free_slots -= n;
        n
    }

    /// The loop of [`post_burst`](Self::post_burst) (`0 < n <= free_slots`), for one id
    /// mode: the same steps as `take_avail_pos`, `take_id` and `write_desc` for each
    /// buffer, with the avail position, its wrap counter and the ring's address in locals
    /// and written back once.
    ///
    /// Why: through those helpers every descriptor loaded and stored the ring's position
    /// and counts in memory (the volatile stores to the ring keep the compiler from
    /// holding them in registers) and asked for the id mode again
    /// (`host-backend/bench/callgrind.sh` fe-grx, per-instruction costs of the refill).
    #[inline(always)]
    fn post_singles<const IN_ORDER: bool>(&mut self, n: u16, wflag: u16, src: &mut impl PostSource) {
        debug_assert!(n > 0 && n <= self.free_slots && IN_ORDER == self.in_order);
        let (desc, size, slots) = (self.desc, self.size, self.slots.as_mut_ptr());
        let (mut pos, mut wrap) = (self.next_avail, self.avail_wrap);
        let mut first = self.unpublished_descs == 0;
        let mut k = 0usize;
        while k < n as usize {
            // One stretch of positions without the ring's end inside, so one wrap counter
            // and one flags value for all of it (no wrap test per descriptor).
            let flags = wflag | p::avail_flags(wrap);
            let end = k + (n as usize - k).min((size - pos) as usize);
            while k < end {
                let id = if IN_ORDER { pos } else { self.take_id(pos) };
                let (addr, len, token) = src.buffer(k, id);
                // SAFETY: `pos < size` (the stretch ends at the ring's end at the latest):
                // inside the ring, 16-aligned. The device reads none of it before the
                // burst's publish (see `write_desc`); the flags word is written last.
                unsafe {
                    let d = desc.add(pos as usize * p::DESC_SIZE);
                    store_fields(d, addr, len, id);
                    if first {
                        // The burst's first descriptor: its flags wait for `publish`.
                        (self.pending_head, self.pending_flags) = (pos, flags);
                        first = false;
                    } else {
                        AtomicU16::from_ptr(d.add(p::DESC_FLAGS) as *mut u16)
                            .store(flags.to_le(), Ordering::Relaxed);
                    }
                }
                debug_assert!(id < size);
                // SAFETY: ids are `< size`, the length of `slots` (in order the position;
                // else from `free_ids`, which holds ids only); driver-private memory.
                unsafe { slots.add(id as usize).write(Slot { token, len, ndesc: 1 }) };
                pos += 1;
                k += 1;
            }
            if pos == size {
                (pos, wrap) = (0, !wrap);
            }
        }
        (self.next_avail, self.avail_wrap) = (pos, wrap);
        self.unpublished_descs += n;
    }

    /// How many of `n` free descriptors to post so that the posting ends on a whole line
    /// of descriptors (four per 64-byte line): all `n` if that is where they end, else
    /// fewer (none if fewer than a line's worth would remain; they wait for the next
    /// refill). For a receive ring, whose device writes used descriptors over the
    /// available ones in place (§2.8.7): a refill that ends inside a line writes into a
    /// line whose other descriptors the device is about to overwrite with used ones, and
    /// the device then reads avail descriptors from a line the driver is still filling;
    /// both sides then take the line from each other for every burst. The split ring's
    /// receive burst keeps to lines for the same reason (`DriverRing::line_aligned`).
    /// Rings whose size is not a multiple of four post everything (lines do not repeat
    /// with the ring's laps there).
    #[inline(always)]
    pub fn line_aligned_post(&self, n: u16) -> u16 {
        const PER_LINE: u16 = (64 / p::DESC_SIZE) as u16;
        if self.size % PER_LINE != 0 {
            return n;
        }
        let end = (self.next_avail as u32 + n as u32) % PER_LINE as u32;
        n.saturating_sub(end as u16)
    }

    /// Publishes everything posted since the last publish (the first descriptor's flags,
    /// with `Release`) and makes the burst's one kick decision from the device's event
    /// suppression structure (§2.8.10.1). Returns whether it kicked.
    #[inline]
    pub fn publish(&mut self) -> bool {
        let count = self.unpublished_descs;
        if count == 0 {
            return false;
        }
        // SAFETY: `pending_head` is a position `take_avail_pos` gave (< size).
        unsafe { self.flags_at(self.pending_head) }.store(self.pending_flags.to_le(), Ordering::Release);
        self.unpublished = 0;
        self.unpublished_descs = 0;
        // Store (the head's flags) → load (the device's event structure): full fence.
        fence(Ordering::SeqCst);
        let kick = self.need_kick(count);
        if kick {
            if let Some(n) = &self.notifier {
                n.notify();
                self.kicks += 1;
            }
        }
        kick
    }

    /// The kick decision for a burst of `count` descriptors ending at `next_avail`:
    /// ENABLE kicks, DISABLE does not, DESC (with EVENT_IDX) kicks if the burst passed
    /// the descriptor `desc_event_off_wrap` names, as Linux's
    /// `virtqueue_kick_prepare_packed` decides (an offset of the other wrap lies one
    /// ring behind).
    #[inline(always)]
    fn need_kick(&self, count: u16) -> bool {
        // SAFETY: the device's event structure: 4 bytes, 64-aligned (allocated in `new`);
        // one 32-bit load reads offset and flags as one snapshot.
        let ev = u32::from_le(
            unsafe { AtomicU32::from_ptr(self.device_event as *mut u32) }.load(Ordering::Relaxed),
        );
        let (off_wrap, flags) = (ev as u16, (ev >> 16) as u16 & 0x3);
        match flags {
            p::EVENT_FLAG_DISABLE => false,
            p::EVENT_FLAG_DESC if self.event_idx => {
                let (off, wrap) = p::split_off_wrap(off_wrap);
                let event = if wrap != self.avail_wrap { off.wrapping_sub(self.size) } else { off };
                let new = self.next_avail;
                spec::layout::need_event(event, new, new.wrapping_sub(count))
            }
            // ENABLE, DESC without EVENT_IDX (not allowed: kicking is safe) or reserved.
            _ => true,
        }
    }
}

/// Writes address, length and id (not the flags) of the descriptor at `d`, with volatile
/// stores (the device shares the ring).
///
/// # Safety
/// `d` must point to a descriptor of a live ring (16-aligned, inside it) that the device
/// does not read before the flags that make it available are published.
#[inline(always)]
unsafe fn store_fields(d: *mut u8, addr: u64, len: u32, id: u16) {
    // SAFETY: the caller's promise: 16 bytes inside the ring, each field aligned.
    unsafe {
        std::ptr::write_volatile(d as *mut u64, addr.to_le());
        std::ptr::write_volatile(d.add(p::DESC_LEN) as *mut u32, len.to_le());
        std::ptr::write_volatile(d.add(p::DESC_ID) as *mut u16, id.to_le());
    }
}
