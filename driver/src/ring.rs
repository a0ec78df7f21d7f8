//! The driver side of a split virtqueue, written for batching (virtio 1.2 §2.7).
//!
//! Owns: one queue's ring memory (in the DMA arena), descriptor bookkeeping in
//! driver-private arrays (an O(1) free stack and a token per descriptor), the avail
//! publish and kick decision, and the validation of everything the device writes into
//! the used ring. Must not: know what a buffer holds (the rx/tx queues do) or allocate.
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
use crate::layout::{self, Descriptor, DESC_F_NEXT, DESC_F_WRITE};
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

const NO_TOKEN: u32 = u32::MAX;
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
    /// Free descriptor ids (a stack: O(1) pop and push).
    free: Box<[u16]>,
    nfree: u16,
    /// What each in-flight head carries, and the bytes posted in its chain.
    tokens: Box<[u32]>,
    posted_len: Box<[u32]>,
    /// The next descriptor of each in-flight chain (`NO_NEXT` at its end).
    links: Box<[u16]>,
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
    pub fn new(arena: &Arc<DmaArena>, size: u16, event_idx: bool) -> Result<DriverRing> {
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
        let id = self.free[self.nfree as usize];
        let d = Descriptor { addr, len, flags: if device_writes { DESC_F_WRITE } else { 0 }, next: 0 };
        // SAFETY: `id < size`: the descriptor is inside the table; the device does not
        // read it before the avail index we publish later names it.
        unsafe {
            std::ptr::write_volatile(
                self.desc.add(id as usize * layout::DESC_SIZE) as *mut [u8; 16],
                d.to_le_bytes(),
            )
        };
        let slot = self.avail_idx & self.mask;
        // SAFETY: `avail_entry(slot)` with `slot < size` is inside the driver area, aligned.
        unsafe {
            std::ptr::write_volatile(self.avail.add(layout::avail_entry(slot)) as *mut u16, id.to_le())
        };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.tokens[id as usize] = token.unwrap_or(id as u32);
        self.posted_len[id as usize] = len;
        self.links[id as usize] = NO_NEXT;
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
        // Take the ids first, so each descriptor can name its successor.
        let n = parts.len();
        let first = self.nfree as usize - n;
        let ids: &[u16] = &self.free[first..self.nfree as usize];
        let mut total = 0u32;
        for (k, &(addr, len, writes)) in parts.iter().enumerate() {
            let id = ids[k];
            let next = ids.get(k + 1).copied();
            let mut flags = if writes { DESC_F_WRITE } else { 0 };
            if next.is_some() {
                flags |= DESC_F_NEXT;
            }
            let d = Descriptor { addr, len, flags, next: next.unwrap_or(0) };
            // SAFETY: `id < size`: inside the table; the device reads it only after the
            // avail index we publish later names its head.
            unsafe {
                std::ptr::write_volatile(
                    self.desc.add(id as usize * layout::DESC_SIZE) as *mut [u8; 16],
                    d.to_le_bytes(),
                )
            };
            self.links[id as usize] = next.unwrap_or(NO_NEXT);
            total = total.saturating_add(len);
        }
        let head = ids[0];
        self.nfree -= n as u16;
        let slot = self.avail_idx & self.mask;
        // SAFETY: `avail_entry(slot)` with `slot < size` is inside the driver area, aligned.
        unsafe {
            std::ptr::write_volatile(self.avail.add(layout::avail_entry(slot)) as *mut u16, head.to_le())
        };
        self.avail_idx = self.avail_idx.wrapping_add(1);
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

    /// Takes the next used element (call at most as often as `poll_used` allowed):
    /// returns the token posted with that buffer and the length the device wrote, after
    /// checking the id and length. The descriptor goes back on the free stack.
    #[inline(always)]
    pub fn pop_used(&mut self) -> std::result::Result<(u32, u32), DeviceError> {
        let slot = self.last_used & self.mask;
        // SAFETY: `used_entry(slot)` with `slot < size` plus 8 bytes is inside the device
        // area; 4-aligned. Volatile: the device owns this memory; our acquire load of
        // `used.idx` ordered these reads after its writes.
        let (id, len) = unsafe {
            let p = self.used.add(layout::used_entry(slot)) as *const u32;
            (u32::from_le(std::ptr::read_volatile(p)), u32::from_le(std::ptr::read_volatile(p.add(1))))
        };
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

    /// Tokens of every buffer still in flight (to return them to the pool at close).
    pub fn drain_in_flight(&mut self) -> impl Iterator<Item = u32> + '_ {
        self.heads = 0;
        self.tokens.iter_mut().filter(|t| **t != NO_TOKEN).map(|t| std::mem::replace(t, NO_TOKEN))
    }
}

/// A device played in-process on a ring's memory, for unit tests of the modules above
/// the ring (control queue, receive queue). Addresses are arena virtual addresses (a
/// fresh arena maps IOVA = VA).
#[cfg(test)]
pub(crate) mod fake {
    use super::*;

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
        DriverRing::new(&arena, size, event_idx).unwrap()
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
}
