//! The buffers of one walked descriptor chain, as pointers into guest memory.
//!
//! Owns: [`Seg`] and [`Chain`], which carry raw pointers into the guest memory mappings,
//! and [`ChainBuf`], the storage a path keeps for a chain across bursts.
//! Must not: translate addresses or read descriptors (the ring engine fills a chain), or
//! let a pointer outlive the mapping it points into.
//!
//! Lifetimes: a `Chain<'m>` and its `Seg<'m>`s borrow, for `'m`, the [`GuestMemory`] whose
//! mappings their pointers point into (the ring's walk takes that `&'m GuestMemory` and
//! translates through it), so the borrow checker rejects using a chain after its memory
//! table can have been replaced or dropped. The lifetime is a `PhantomData`: nothing at
//! run time.
//!
//! Why [`ChainBuf`]: a chain has room for [`MAX_SEGS`] segments (1 KiB); a path keeps
//! one (boxed) across bursts so that no burst allocates or initialises that room. The
//! buffer itself cannot be read: the only way in is [`ChainBuf::chain`], which empties it
//! and hands it out as a `Chain<'m>` for the memory the burst borrows. Pointers a
//! previous burst left in it are never visible again.

use std::marker::PhantomData;

use super::MAX_SEGS;
use crate::memory::GuestMemory;

/// One contiguous piece of a buffer, in this process's address space, inside the guest
/// memory borrowed for `'m`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seg<'m> {
    /// Start of the piece (inside a guest memory mapping).
    pub ptr: *mut u8,
    /// Length in bytes.
    pub len: u32,
    _mem: PhantomData<&'m GuestMemory>,
}

/// The buffers of one walked chain, pointing into guest memory borrowed for `'m`.
///
/// Invariant (what the copies rely on): each of the first `n` segments is a range of
/// `len` bytes inside a mapping of that memory, which `'m` keeps alive: only the ring's
/// walk (through a translation) and the tests' helpers over their own buffers push one.
pub(crate) struct Chain<'m> {
    segs: [Seg<'m>; MAX_SEGS],
    n: usize,
    /// Total bytes over all descriptors (also those past `MAX_SEGS`).
    pub total: u64,
    /// Bytes in device-readable descriptors (all of `total` for a transmit chain, none
    /// for a receive chain; the command part of a control chain).
    pub readable: u64,
    /// More than `MAX_SEGS` pieces: `segs` holds only the first ones.
    pub truncated: bool,
}

impl Default for Chain<'_> {
    fn default() -> Self {
        Chain {
            segs: [Seg { ptr: std::ptr::null_mut(), len: 0, _mem: PhantomData }; MAX_SEGS],
            n: 0,
            total: 0,
            readable: 0,
            truncated: false,
        }
    }
}

impl<'m> Chain<'m> {
    /// The recorded pieces.
    #[inline]
    pub fn segs(&self) -> &[Seg<'m>] {
        &self.segs[..self.n]
    }
    #[inline]
    pub(crate) fn clear(&mut self) {
        self.n = 0;
        self.total = 0;
        self.readable = 0;
        self.truncated = false;
    }
    /// One buffer of `len` bytes (> 0) at `ptr`, readable by the device or not. `ptr ..
    /// + len` must lie inside the memory `'m` borrows (the struct's invariant).
    #[inline]
    pub(crate) fn set_single(&mut self, ptr: *mut u8, len: u32, readable: bool) {
        self.segs[0] = Seg { ptr, len, _mem: PhantomData };
        self.n = 1;
        self.total = len as u64;
        self.readable = if readable { len as u64 } else { 0 };
        self.truncated = false;
    }
    /// Where bytes `off .. off + len` are, when they all lie inside the first piece
    /// (the case the copies take inline).
    #[inline(always)]
    pub(super) fn in_first(&self, off: usize, len: usize) -> Option<*mut u8> {
        let s = self.segs().first()?;
        let end = off.checked_add(len)?;
        // SAFETY: `off <= end <= s.len`: the offset stays inside the first piece's
        // translated buffer.
        (end <= s.len as usize).then(|| unsafe { s.ptr.add(off) })
    }
    /// Appends a piece (`ptr .. + len` inside the memory `'m` borrows), or marks the
    /// chain truncated when it is full.
    #[inline]
    pub(crate) fn push(&mut self, ptr: *mut u8, len: u32) {
        if self.n < MAX_SEGS {
            self.segs[self.n] = Seg { ptr, len, _mem: PhantomData };
            self.n += 1;
        } else {
            self.truncated = true;
        }
    }

    /// A chain of one segment over `buf`, as a walk of a one-descriptor chain records it
    /// (unit tests, and `port::afpacket`'s staging of a received frame: the chain borrows
    /// a buffer of ours instead of guest memory).
    pub fn over(buf: &'m mut [u8]) -> Chain<'m> {
        let mut c = Chain::default();
        c.push(buf.as_mut_ptr(), buf.len() as u32);
        c.total = buf.len() as u64;
        c
    }
}

/// Storage for one chain that a path keeps across bursts (see the module comment).
#[derive(Default)]
pub(crate) struct ChainBuf(Chain<'static>);

// SAFETY: the pointers a `ChainBuf` holds are never dereferenced through it: they can only
// be reached through `ChainBuf::chain`, which empties the buffer first, on the thread that
// borrows it. Moving the empty or stale storage to a worker is harmless.
unsafe impl Send for ChainBuf {}

impl ChainBuf {
    /// Empties the buffer and lends it as a chain into `mem` for this burst.
    #[inline(always)]
    pub fn chain<'m>(&mut self, _mem: &'m GuestMemory) -> &mut Chain<'m> {
        self.0.clear();
        let p: *mut Chain<'static> = &mut self.0;
        // SAFETY: `Chain<'static>` and `Chain<'m>` are the same type but for a lifetime
        // that only lives in `PhantomData`, so the layouts are identical. The chain was just
        // emptied, so no pointer into another memory is visible through the result; what
        // the caller pushes through it is for `'m`, and becomes unreachable again when this
        // borrow ends (the next `chain` empties it first). The `'static` is never seen.
        unsafe { &mut *p.cast::<Chain<'m>>() }
    }
}
