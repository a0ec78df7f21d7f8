//! Bounds-checked MMIO windows into a mapped BAR (virtio 1.2 §4.1.3.1: each field is
//! accessed with its natural width).
//!
//! Owns: [`Window`], whose every access is a volatile read or write of a field's natural
//! width, checked against the window's length and alignment. Must not: be built from an
//! unchecked pointer: [`Window::new`] is `unsafe`, its caller vouches for the mapping.

/// A bounds-checked window of MMIO: volatile accesses of natural width only.
pub(super) struct Window {
    ptr: *mut u8,
    len: usize,
}

impl Window {
    /// A window over `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr .. ptr + len` is mapped memory (MMIO or ordinary), valid for volatile reads
    /// and writes for as long as the window is used, and nothing holds a Rust reference
    /// into it.
    pub(super) unsafe fn new(ptr: *mut u8, len: usize) -> Window {
        Window { ptr, len }
    }

    /// The window's length in bytes.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    fn at<T>(&self, off: usize) -> *mut T {
        let size = std::mem::size_of::<T>();
        // Windows are validated at setup and the offsets used are this module's
        // constants: a failure here is a bug in this file, not device input.
        assert!(
            off + size <= self.len && (self.ptr as usize + off) % size == 0,
            "MMIO access {off:#x}/{size}"
        );
        // SAFETY: `off + size <= len`, inside the window (checked above).
        unsafe { self.ptr.add(off) as *mut T }
    }
    pub(super) fn r8(&self, off: usize) -> u8 {
        // SAFETY: an aligned in-bounds MMIO address (`at`), mapped while `self` lives.
        unsafe { self.at::<u8>(off).read_volatile() }
    }
    pub(super) fn r16(&self, off: usize) -> u16 {
        // SAFETY: as in `r8`.
        u16::from_le(unsafe { self.at::<u16>(off).read_volatile() })
    }
    pub(super) fn r32(&self, off: usize) -> u32 {
        // SAFETY: as in `r8`.
        u32::from_le(unsafe { self.at::<u32>(off).read_volatile() })
    }
    pub(super) fn w8(&self, off: usize, v: u8) {
        // SAFETY: as in `r8`.
        unsafe { self.at::<u8>(off).write_volatile(v) }
    }
    pub(super) fn w16(&self, off: usize, v: u16) {
        // SAFETY: as in `r8`.
        unsafe { self.at::<u16>(off).write_volatile(v.to_le()) }
    }
    pub(super) fn w32(&self, off: usize, v: u32) {
        // SAFETY: as in `r8`.
        unsafe { self.at::<u32>(off).write_volatile(v.to_le()) }
    }
}
