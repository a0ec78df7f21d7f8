//! A device played in-process on a ring's memory, for unit tests of the modules above
//! the ring (control queue, receive queue). Addresses are arena virtual addresses (a
//! fresh arena maps IOVA = VA).
//!
//! Owns: the device side of one test ring (reading avail chains, writing used elements,
//! reading and writing posted buffers). Must not: be used outside tests.

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
        FakeDevice { desc: r.desc, avail: r.avail, used: r.used, size: r.size, last_avail: 0, used_idx: 0 }
    }

    /// The 16-bit field at `off` in ring area `area`, as an atomic.
    ///
    /// # Safety
    /// `area` is one of the ring's areas and `area + off .. + 2` lies inside it, `off`
    /// even.
    unsafe fn u16_at(&self, area: *mut u8, off: usize) -> &AtomicU16 {
        // SAFETY: inside the ring areas, 2-aligned (the caller's promise).
        unsafe { AtomicU16::from_ptr(area.add(off) as *mut u16) }
    }

    /// The next available chain: its head and descriptors.
    pub(crate) fn pop_avail(&mut self) -> Option<(u16, Vec<Descriptor>)> {
        // SAFETY: `AVAIL_IDX` is a field of the driver area.
        let idx = unsafe { self.u16_at(self.avail, layout::AVAIL_IDX) }.load(Ordering::Acquire);
        if idx == self.last_avail {
            return None;
        }
        let slot = self.last_avail & (self.size - 1);
        self.last_avail = self.last_avail.wrapping_add(1);
        // SAFETY: `slot < size`: an entry of the driver area.
        let head = unsafe { self.u16_at(self.avail, layout::avail_entry(slot)) }.load(Ordering::Relaxed);
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
        // SAFETY: `USED_IDX` is a field of the device area.
        unsafe { self.u16_at(self.used, layout::USED_IDX) }.store(self.used_idx, Ordering::Release);
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
