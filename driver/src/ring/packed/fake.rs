//! A device played in-process on a packed ring's memory, for unit tests of the packed
//! ring and of the modules above it. Addresses are arena virtual addresses (a fresh
//! arena maps IOVA = VA).
//!
//! Owns: the device side of one test ring (virtio 1.2 §2.8: reading available chains
//! with its own avail wrap counter, writing used descriptors with its own used wrap
//! counter, its event suppression structure, reading and writing posted buffers), and
//! raw writes a hostile device would make. Must not: be used outside tests.

use std::sync::atomic::{AtomicU16, Ordering};

use spec::packed::{self as p, PackedDescriptor};

use super::PackedRing;

/// The device side of one [`PackedRing`].
pub(crate) struct PackedFake {
    desc: *mut u8,
    device_event: *mut u8,
    driver_event: *mut u8,
    size: u16,
    next_avail: u16,
    avail_wrap: bool,
    next_used: u16,
    used_wrap: bool,
}

// SAFETY: test-only; the ring memory lives in an arena the test keeps alive, and the
// accesses are volatile/atomic as a real device's would be.
unsafe impl Send for PackedFake {}

impl PackedFake {
    pub(crate) fn new(r: &PackedRing) -> PackedFake {
        PackedFake {
            desc: r.desc,
            device_event: r.device_event,
            driver_event: r.driver_event,
            size: r.size,
            next_avail: 0,
            avail_wrap: true,
            next_used: 0,
            used_wrap: true,
        }
    }

    fn flags(&self, pos: u16) -> &AtomicU16 {
        assert!(pos < self.size);
        // SAFETY: `pos < size`: inside the ring, the flags 2-aligned.
        unsafe { AtomicU16::from_ptr(self.desc.add(pos as usize * p::DESC_SIZE + p::DESC_FLAGS) as *mut u16) }
    }

    fn read_desc(&self, pos: u16) -> PackedDescriptor {
        assert!(pos < self.size);
        // SAFETY: `pos < size`: inside the ring, 16-aligned.
        unsafe {
            let d = self.desc.add(pos as usize * p::DESC_SIZE) as *const u64;
            PackedDescriptor::from_le_words(std::ptr::read_volatile(d), std::ptr::read_volatile(d.add(1)))
        }
    }

    /// The next available buffer: its id (from its last descriptor, §2.8.6) and
    /// descriptors, or `None` if the driver has not made one available.
    pub(crate) fn pop_avail(&mut self) -> Option<(u16, Vec<PackedDescriptor>)> {
        let mut chain = Vec::new();
        let (mut pos, mut wrap) = (self.next_avail, self.avail_wrap);
        loop {
            let f = u16::from_le(self.flags(pos).load(Ordering::Acquire));
            if !p::is_avail(f, wrap) {
                assert!(chain.is_empty(), "a chain's later descriptor was not available with its head");
                return None;
            }
            let d = self.read_desc(pos);
            chain.push(d);
            pos += 1;
            if pos == self.size {
                pos = 0;
                wrap = !wrap;
            }
            if d.flags & p::DESC_F_NEXT == 0 {
                break;
            }
            assert!(chain.len() <= self.size as usize, "endless chain");
        }
        self.next_avail = pos;
        self.avail_wrap = wrap;
        Some((chain.last().unwrap().id, chain))
    }

    /// Writes a used descriptor for buffer `id` (which took `ndesc` descriptors) with
    /// `len` bytes written, at the used position, flags last with `Release`.
    pub(crate) fn push_used(&mut self, id: u16, len: u32, ndesc: u16) {
        self.write_used(id, len, p::used_flags(self.used_wrap));
        self.skip(ndesc);
    }

    /// Moves the used position past `n` descriptors without writing (the rest of an
    /// in-order batch).
    pub(crate) fn skip(&mut self, n: u16) {
        let next = self.next_used as u32 + n as u32;
        if next >= self.size as u32 {
            self.next_used = (next - self.size as u32) as u16;
            self.used_wrap = !self.used_wrap;
        } else {
            self.next_used = next as u16;
        }
    }

    /// Writes id, length and then `flags` (raw: a hostile device picks them) at the used
    /// position, without moving it.
    pub(crate) fn write_used(&self, id: u16, len: u32, flags: u16) {
        let pos = self.next_used;
        // SAFETY: `pos < size`: inside the ring, 16-aligned.
        unsafe {
            let d = self.desc.add(pos as usize * p::DESC_SIZE);
            std::ptr::write_volatile(d.add(p::DESC_LEN) as *mut u32, len.to_le());
            std::ptr::write_volatile(d.add(p::DESC_ID) as *mut u16, id.to_le());
        }
        self.flags(pos).store(flags.to_le(), Ordering::Release);
    }

    /// The used wrap counter the device is on.
    pub(crate) fn used_wrap(&self) -> bool {
        self.used_wrap
    }

    /// Sets the device's event suppression structure (`desc_event_off_wrap`, flags).
    pub(crate) fn set_event(&self, off_wrap: u16, flags: u16) {
        // SAFETY: the device area: 4 bytes, 4-aligned.
        unsafe {
            AtomicU16::from_ptr(self.device_event.add(p::EVENT_OFF_WRAP) as *mut u16)
                .store(off_wrap.to_le(), Ordering::Relaxed);
            AtomicU16::from_ptr(self.device_event.add(p::EVENT_FLAGS) as *mut u16)
                .store(flags.to_le(), Ordering::SeqCst);
        }
    }

    /// The driver's `desc_event_flags`.
    pub(crate) fn driver_event_flags(&self) -> u16 {
        // SAFETY: the driver area: 4 bytes, 4-aligned.
        u16::from_le(
            unsafe { AtomicU16::from_ptr(self.driver_event.add(p::EVENT_FLAGS) as *mut u16) }
                .load(Ordering::Relaxed),
        )
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
