//! The packet buffer pool: fixed-size buffers carved from the DMA arena, each with
//! XDP-style headroom and tailroom, and the owned [`Packet`] that returns its buffer to
//! the pool when dropped (as ixy.rs does).
//!
//! Owns: buffer layout, the free list (a stack of buffer indices behind a spin lock,
//! taken once per bulk operation, so a burst costs one lock), and packet head/tail
//! adjustment. Must not: touch rings or know about the device.
//!
//! Buffer layout (`buf_size` bytes):
//! ```text
//! | headroom (default 256; its last 12 bytes hold the virtio-net header) | data ... | tailroom |
//! ```
//! Packets never allocate: a `Packet` is a buffer index plus offset and length. A packet
//! may head a chain of further buffers of its pool (a multi-segment frame, as DPDK's mbuf
//! chains) or carry a transmit offload request; both live in the pool's per-buffer
//! metadata table and are flagged in two tag bits of the packet's pool pointer, so a
//! plain single-buffer packet is the same 16 bytes as before and the data path tells it
//! from the others with the pool comparison it already makes (`chain.rs`).
//!
//! Lifetime: packets hold a raw pointer to the pool, not a reference count (an atomic
//! add per packet on a line every core shares would cost more than the rest of the
//! packet's bookkeeping). The pool's memory is released only when the last [`Mempool`]
//! handle is gone *and* every buffer is back, whichever happens last.

use std::cell::UnsafeCell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::dma::DmaArena;
use crate::error::{Error, Result};
use crate::layout::NET_HDR_LEN;

mod chain;

use chain::BufMeta;
pub use chain::{Segments, TxCsum, TxGso, TxOffload, MAX_SEGS};

/// Default headroom before packet data, as XDP reserves (`VIRTIO_XDP_HEADROOM`).
pub const DEFAULT_HEADROOM: u16 = 256;
/// Largest buffer: packet offsets and lengths are `u16`.
pub const MAX_BUF_SIZE: u32 = 65472;
/// Default total size of one buffer.
pub const DEFAULT_BUF_SIZE: u32 = 2048 + DEFAULT_HEADROOM as u32;

struct FreeList {
    stack: Vec<u32>,
    /// No `Mempool` handle is left: the last buffer to come back frees the pool.
    orphaned: bool,
}

struct PoolInner {
    /// Per buffer: its chain link and, on a chain's head, the chain's totals and the
    /// transmit offload request (`chain.rs`). Entry `i` is read and written only by the
    /// owner of buffer `i` (the packet heading the chain it is in), like the buffer.
    meta: Box<[UnsafeCell<BufMeta>]>,
    arena: Arc<DmaArena>,
    base: *mut u8,
    /// Buffers per device-contiguous chunk and the chunk's size (the whole pool when the
    /// arena is contiguous; a hugepage when it is physically addressed), so no buffer
    /// straddles memory the device sees as discontiguous.
    per_chunk: u32,
    chunk: usize,
    buf_size: u32,
    headroom: u16,
    count: u32,
    handles: AtomicUsize,
    free: spin::Mutex<FreeList>,
}

/// How a pool of `count` buffers sits in its arena: one allocation when the arena is
/// contiguous (or the pool fits one chunk), else one allocation per device-contiguous
/// chunk, back to back.
struct PoolLayout {
    per_chunk: u32,
    chunk: usize,
    chunks: usize,
    /// Bytes of the single allocation (when `chunks == 1`).
    total: usize,
    /// Alignment of each allocation.
    align: usize,
}

impl PoolLayout {
    fn new(count: u32, buf_size: u32, contiguous: Option<usize>) -> Result<PoolLayout> {
        let (per_chunk, chunk) = match contiguous {
            None => (count, count as usize * buf_size as usize),
            Some(c) => ((c / buf_size as usize) as u32, c),
        };
        if per_chunk == 0 {
            return Err(Error::Config(format!("buffers of {buf_size} bytes do not fit the arena's pages")));
        }
        let chunks = count.div_ceil(per_chunk) as usize;
        let total = if chunks == 1 { count as usize * buf_size as usize } else { chunks * chunk };
        let align = if chunks == 1 { 4096 } else { contiguous.unwrap_or(4096) };
        Ok(PoolLayout { per_chunk, chunk, chunks, total, align })
    }
}

/// Checks the pool parameters [`Mempool::new`] accepts (before an arena exists).
pub fn check_geometry(count: u32, buf_size: u32, headroom: u16) -> Result<()> {
    if count == 0 {
        return Err(Error::Config("the buffer pool needs at least one buffer".into()));
    }
    if count > chain::MAX_BUFFERS {
        return Err(Error::Config(format!("a pool holds at most {} buffers", chain::MAX_BUFFERS)));
    }
    if (headroom as usize) < NET_HDR_LEN {
        return Err(Error::Config(format!(
            "headroom {headroom} is below the {NET_HDR_LEN}-byte virtio-net header"
        )));
    }
    if buf_size % 64 != 0 || buf_size <= headroom as u32 || buf_size > MAX_BUF_SIZE {
        return Err(Error::Config(format!(
            "buffer size {buf_size} must be a multiple of 64, larger than the headroom {headroom} \
             and at most {MAX_BUF_SIZE} (packet offsets and lengths are 16-bit)"
        )));
    }
    Ok(())
}

/// Reserves in `plan` what [`Mempool::new`] will take from the arena for `count`
/// buffers of `buf_size` bytes (to size an arena before creating it).
pub fn plan(plan: &mut crate::dma::ArenaPlan, count: u32, buf_size: u32) -> Result<()> {
    let l = PoolLayout::new(count.max(1), buf_size.max(1), plan.chunk())?;
    if l.chunks == 1 {
        plan.alloc(l.total, l.align)?;
    } else {
        for _ in 0..l.chunks {
            plan.alloc(l.chunk, l.align)?;
        }
    }
    Ok(())
}

/// A pool of packet buffers. Cloning makes another handle to the same pool.
pub struct Mempool {
    inner: NonNull<PoolInner>,
}

// SAFETY: `PoolInner` is shared by handles and packets on any thread; its mutable state
// (the free list) is behind a spin lock and its handle count is atomic. Buffer memory
// is owned by whichever single `Packet` or ring slot holds the index.
unsafe impl Send for Mempool {}
// SAFETY: as above.
unsafe impl Sync for Mempool {}

impl Mempool {
    /// Carves `count` buffers of `buf_size` bytes (cache-line aligned) from `arena`,
    /// with `headroom` bytes before packet data.
    pub fn new(arena: Arc<DmaArena>, count: u32, buf_size: u32, headroom: u16) -> Result<Mempool> {
        check_geometry(count, buf_size, headroom)?;
        let PoolLayout { per_chunk, chunk, chunks, total, align } =
            PoolLayout::new(count, buf_size, arena.contiguous_chunk())?;
        let base = if chunks == 1 {
            arena.alloc(total, align)?.0
        } else {
            // One allocation per chunk, consecutive in the arena (a fresh arena hands them
            // out back to back at chunk alignment).
            let first = arena.alloc(chunk, align)?.0;
            for i in 1..chunks {
                let (p, _) = arena.alloc(chunk, align)?;
                // SAFETY: pointer arithmetic only, to compare addresses.
                if p != unsafe { first.add(i * chunk) } {
                    return Err(Error::Config("DMA arena chunks are not consecutive".into()));
                }
            }
            first
        };
        let inner = Box::new(PoolInner {
            meta: (0..count).map(|_| UnsafeCell::new(BufMeta::default())).collect(),
            arena,
            base,
            per_chunk,
            chunk,
            buf_size,
            headroom,
            count,
            handles: AtomicUsize::new(1),
            free: spin::Mutex::new(FreeList { stack: (0..count).rev().collect(), orphaned: false }),
        });
        Ok(Mempool { inner: NonNull::from(Box::leak(inner)) })
    }

    fn inner(&self) -> &PoolInner {
        // SAFETY: the pool lives while any handle exists (see the module comment).
        unsafe { self.inner.as_ref() }
    }

    /// Number of buffers.
    pub fn capacity(&self) -> u32 {
        self.inner().count
    }
    /// Buffers currently free.
    pub fn available(&self) -> u32 {
        self.inner().free.lock().stack.len() as u32
    }
    /// Bytes per buffer.
    pub fn buf_size(&self) -> u32 {
        self.inner().buf_size
    }
    /// Headroom before packet data in a fresh packet.
    pub fn headroom(&self) -> u16 {
        self.inner().headroom
    }
    /// The arena the buffers live in.
    pub fn arena(&self) -> &Arc<DmaArena> {
        &self.inner().arena
    }

    /// One packet with empty data at the default headroom, or `None` if the pool is empty.
    pub fn alloc(&self) -> Option<Packet> {
        let idx = self.inner().free.lock().stack.pop()?;
        // SAFETY: `idx` was just taken off the free list: ours; the headroom is within
        // the buffer and at least `NET_HDR_LEN` (`check_geometry`).
        Some(unsafe { self.packet(idx, self.headroom(), 0) })
    }

    /// Appends up to `n` fresh packets to `out` under one lock; returns how many.
    /// `out` should have spare capacity (then nothing allocates).
    pub fn alloc_bulk(&self, n: usize, out: &mut Vec<Packet>) -> usize {
        let headroom = self.headroom();
        let mut fl = self.inner().free.lock();
        let len = fl.stack.len();
        let k = n.min(len);
        // SAFETY: each index was just taken off the free list: ours; the headroom is
        // within the buffer and at least `NET_HDR_LEN` (`check_geometry`).
        out.extend(fl.stack.drain(len - k..).rev().map(|idx| unsafe { self.packet(idx, headroom, 0) }));
        k
    }

    /// Takes up to `out.len()` buffer indices (for ring refills) under one lock.
    #[inline]
    pub(crate) fn take_indices(&self, out: &mut [u32]) -> usize {
        let mut fl = self.inner().free.lock();
        let len = fl.stack.len();
        let k = out.len().min(len);
        out[..k].copy_from_slice(&fl.stack[len - k..]);
        fl.stack.truncate(len - k);
        k
    }

    /// The device address of every buffer as `base + index * step` when the pool is one
    /// device-contiguous run (a linearly mapped arena), so a refill needs no lookup per
    /// buffer: `Some((base, step))`; `None` otherwise (use [`buf`](Self::buf)).
    #[inline]
    pub(crate) fn linear_iova(&self) -> Option<(u64, u64)> {
        let i = self.inner();
        match i.arena.iova_map() {
            crate::dma::IovaMap::Linear(_) if i.per_chunk >= i.count => {
                Some((i.arena.iova(i.base), i.buf_size as u64))
            }
            _ => None,
        }
    }

    /// The first buffer's address and the buffer size when the pool is one chunk (a
    /// contiguous arena, the common case): buffer `i` then starts at `base + i * size`,
    /// so a burst reads the pool's geometry once instead of per packet.
    #[inline]
    pub(crate) fn single_chunk(&self) -> Option<(*mut u8, usize)> {
        let i = self.inner();
        (i.per_chunk >= i.count).then_some((i.base, i.buf_size as usize))
    }

    /// Returns buffer indices (ring reclaim) under one lock.
    ///
    /// # Safety
    /// Each index is a buffer of this pool that the caller owns (taken with
    /// [`take_indices`](Self::take_indices) or [`Packet::into_raw`], in no `Packet` and
    /// not returned yet), given back once.
    pub(crate) unsafe fn put_indices(&self, idx: &[u32]) {
        // SAFETY: `self` is a live handle, so the pool is not orphaned; the indices are
        // the caller's to give back (the contract above).
        unsafe { PoolInner::put(self.inner, idx) }
    }

    /// The packet for buffer `idx` with data at `off`, `len` bytes.
    ///
    /// # Safety
    /// The caller owns buffer `idx` of this pool (as for
    /// [`put_indices`](Self::put_indices)), and `NET_HDR_LEN <= off`,
    /// `off + len <= buf_size`.
    #[inline]
    pub(crate) unsafe fn packet(&self, idx: u32, off: u16, len: u16) -> Packet {
        Packet { pool: self.inner, idx, off, len }
    }

    /// Pointer to and device address of the first byte of buffer `idx`.
    ///
    /// # Safety
    /// `idx < capacity`.
    #[inline]
    pub(crate) unsafe fn buf(&self, idx: u32) -> (*mut u8, u64) {
        let i = self.inner();
        // SAFETY: `idx < count` (the caller's promise).
        let p = unsafe { i.buf_ptr(idx) };
        (p, i.arena.iova(p))
    }

    /// Pointer to the virtio-net header slot of `p` (the pool's geometry is read through
    /// this handle, so a loop over packets reads it once).
    ///
    /// # Safety
    /// `p` is a packet of this pool ([`owns`](Self::owns)).
    #[inline]
    pub(crate) unsafe fn header_ptr(&self, p: &Packet) -> *mut u8 {
        debug_assert!(self.owns(p));
        // SAFETY: `p` is this pool's (the caller's promise), so `p.idx < count`, and its
        // `off >= NET_HDR_LEN` (the headroom invariant): the slot is inside its buffer.
        unsafe { self.inner().buf_ptr(p.idx).add(p.off as usize - NET_HDR_LEN) }
    }

    /// Whether the device this pool serves can reach `p`'s buffer (it lives in the same
    /// DMA arena).
    pub fn reaches(&self, p: &Packet) -> bool {
        Arc::ptr_eq(&self.inner().arena, &p.inner().arena)
    }

    /// Whether `p` came from this pool.
    pub fn owns(&self, p: &Packet) -> bool {
        p.pool_ptr() == self.inner
    }

    /// Whether `p` came from this pool and is plain: one buffer, no transmit offload
    /// request (the data path's fast case; one comparison, as `owns` was before chains).
    #[inline(always)]
    pub(crate) fn owns_plain(&self, p: &Packet) -> bool {
        p.pool == self.inner
    }
}

/// Hands each packet's bytes, writable, to `f`, in order: [`Packet::data_mut`] over a
/// burst. When the first packet's pool is one chunk (a contiguous arena, the common case)
/// its geometry is read once and every packet of that pool finds its bytes from it, so a
/// per-packet edit (a forwarding engine's address swap) does not look its buffer up
/// through the pool each time; a packet of another pool takes `data_mut`.
#[inline]
pub fn for_each_data_mut(pkts: &mut [Packet], mut f: impl FnMut(&mut [u8])) {
    let Some(first) = pkts.first() else { return };
    let (pool, i) = (first.pool_ptr(), first.inner());
    if i.per_chunk < i.count {
        pkts.iter_mut().for_each(|p| f(p.data_mut()));
        return;
    }
    let (base, step) = (i.base, i.buf_size as usize);
    for p in pkts.iter_mut() {
        if p.pool_ptr() != pool {
            f(p.data_mut());
            continue;
        }
        // SAFETY: `p`'s pool is the one read above, in one chunk from `base`: its buffer
        // `idx < count` starts at `base + idx * step` (as `buf_ptr` computes it), and
        // `off + len <= buf_size` (every constructor's invariant); `&mut p` makes the
        // access exclusive, as in `data_mut`.
        let d = unsafe {
            std::slice::from_raw_parts_mut(base.add(p.idx as usize * step + p.off as usize), p.len as usize)
        };
        f(d);
    }
}

/// Drops every packet in `pkts`, returning each run of packets from the same pool under
/// one lock (dropping them one by one takes the pool lock per packet).
pub fn free_bulk(pkts: &mut Vec<Packet>) {
    const RUN: usize = 64;
    let mut idx = [0u32; RUN];
    let mut n = 0;
    let mut pool: Option<NonNull<PoolInner>> = None;
    let len = pkts.len();
    // The vector forgets its packets; each is given back below exactly once (a panic in
    // between would leak them, never free one twice). Read in place, so a plain packet
    // is never copied out.
    // SAFETY: shrinking the length only.
    unsafe { pkts.set_len(0) };
    let base = pkts.as_ptr();
    for i in 0..len {
        // SAFETY: `i < len`: an initialised packet the vector no longer owns, looked at
        // here and given back once (its index below, or moved out and dropped).
        let p = unsafe { &*base.add(i) };
        // One comparison for the common case: a plain packet of the current run's pool
        // (a tagged pointer, `chain.rs`, never equals the untagged pool address).
        if pool != Some(p.pool) || n == RUN {
            if p.tags() & chain::TAG_CHAIN != 0 {
                // A chain: its segments go back with it (out of line: the loop above is
                // the plain packets' path).
                // SAFETY: moved out once (see above); the vector will not drop it.
                drop_cold(unsafe { std::ptr::read(p) });
                continue;
            }
            let pl_p = p.pool_ptr();
            if pool != Some(pl_p) || n == RUN {
                if let Some(pl) = pool {
                    // SAFETY: the indices in `idx` are outstanding buffers of `pl`, which
                    // keeps it alive until they are back.
                    unsafe { PoolInner::put(pl, &idx[..n]) };
                }
                pool = Some(pl_p);
                n = 0;
            }
        }
        idx[n] = p.idx;
        n += 1;
    }
    if let Some(pl) = pool {
        // SAFETY: as above.
        unsafe { PoolInner::put(pl, &idx[..n]) };
    }
}

/// Drops `p` out of line (a chain in `free_bulk`).
#[cold]
#[inline(never)]
fn drop_cold(p: Packet) {
    drop(p);
}

impl PoolInner {
    /// The first byte of buffer `idx`.
    ///
    /// # Safety
    /// `idx < count`.
    #[inline]
    unsafe fn buf_ptr(&self, idx: u32) -> *mut u8 {
        // One chunk (a contiguous arena, the common case): no division per access.
        let off = if self.per_chunk >= self.count {
            idx as usize * self.buf_size as usize
        } else {
            (idx / self.per_chunk) as usize * self.chunk
                + (idx % self.per_chunk) as usize * self.buf_size as usize
        };
        // SAFETY: `idx < count` (the caller's promise), so the offset lies inside the
        // pool's arena allocation.
        unsafe { self.base.add(off) }
    }

    /// The metadata entry of buffer `idx`.
    ///
    /// # Safety
    /// `idx < count`; the caller owns buffer `idx` (only its owner touches the entry).
    #[inline]
    unsafe fn meta(&self, idx: u32) -> *mut BufMeta {
        // SAFETY: `idx < count`, the table's length (the caller's promise).
        unsafe { self.meta.get_unchecked(idx as usize) }.get()
    }

    /// Pushes indices back; frees the pool if it is orphaned and now full.
    ///
    /// # Safety
    /// `this` must point to a live pool (a handle or an outstanding buffer keeps it so).
    unsafe fn put(this: NonNull<PoolInner>, idx: &[u32]) {
        // SAFETY: per the contract.
        let inner = unsafe { this.as_ref() };
        let free_now = {
            let mut fl = inner.free.lock();
            fl.stack.extend_from_slice(idx);
            fl.orphaned && fl.stack.len() == inner.count as usize
        };
        if free_now {
            // SAFETY: no handle is left and every buffer is back: nothing can reach the
            // pool any more. It was created by `Box::leak` in `Mempool::new`.
            drop(unsafe { Box::from_raw(this.as_ptr()) });
        }
    }
}

impl Clone for Mempool {
    fn clone(&self) -> Self {
        self.inner().handles.fetch_add(1, Ordering::Relaxed);
        Mempool { inner: self.inner }
    }
}

impl Drop for Mempool {
    fn drop(&mut self) {
        // AcqRel: the last handle must see every other handle's use of the pool.
        if self.inner().handles.fetch_sub(1, Ordering::AcqRel) != 1 {
            return;
        }
        let free_now = {
            let mut fl = self.inner().free.lock();
            fl.orphaned = true;
            fl.stack.len() == self.inner().count as usize
        };
        if free_now {
            // SAFETY: last handle and every buffer is back; created by `Box::leak`.
            drop(unsafe { Box::from_raw(self.inner.as_ptr()) });
        }
    }
}

impl std::fmt::Debug for Mempool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mempool")
            .field("capacity", &self.capacity())
            .field("buf_size", &self.buf_size())
            .field("headroom", &self.headroom())
            .finish()
    }
}

/// A packet in a pool buffer, owned: dropping it returns the buffer to its pool (and,
/// when it heads a chain of segments, every segment's buffer: see [`Packet::append`]).
pub struct Packet {
    /// The pool, with `chain::TAG_*` bits in its low bits (the pool is 8-aligned).
    pool: NonNull<PoolInner>,
    idx: u32,
    off: u16,
    len: u16,
}

// SAFETY: a `Packet` is the sole owner of its buffer; the pool it points to is
// thread-safe and outlives every packet (see the module comment).
unsafe impl Send for Packet {}

impl Packet {
    /// The pool pointer without its tag bits.
    #[inline(always)]
    fn pool_ptr(&self) -> NonNull<PoolInner> {
        // The tags sit in alignment bits: clearing them gives the pool's address, not null.
        // SAFETY: a pool's address with its two low bits cleared is the address itself.
        unsafe { NonNull::new_unchecked((self.pool.as_ptr() as usize & !chain::TAG_MASK) as *mut PoolInner) }
    }
    /// The tag bits (`chain::TAG_*`).
    #[inline(always)]
    fn tags(&self) -> usize {
        self.pool.as_ptr() as usize & chain::TAG_MASK
    }
    #[inline]
    fn inner(&self) -> &PoolInner {
        // SAFETY: an outstanding buffer keeps its pool alive.
        unsafe { self.pool_ptr().as_ref() }
    }
    #[inline]
    fn base(&self) -> *mut u8 {
        // SAFETY: a packet's index is a buffer of its pool (every constructor's promise).
        unsafe { self.inner().buf_ptr(self.idx) }
    }
    /// The packet bytes.
    #[inline]
    pub fn data(&self) -> &[u8] {
        // SAFETY: `off + len <= buf_size` is an invariant of every constructor and
        // adjustment; the buffer belongs to this packet alone while it exists (the device
        // only touches buffers the driver has posted, and a posted buffer is no `Packet`).
        unsafe { std::slice::from_raw_parts(self.base().add(self.off as usize), self.len as usize) }
    }
    /// The packet bytes, writable.
    #[inline]
    pub fn data_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `data`; `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.base().add(self.off as usize), self.len as usize) }
    }
    /// Packet length.
    #[inline]
    pub fn len(&self) -> usize {
        self.len as usize
    }
    /// Whether the packet holds no bytes.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes the packet may still grow at its head (the virtio-net header's 12 bytes are
    /// reserved and not counted).
    #[inline]
    pub fn headroom(&self) -> usize {
        self.off as usize - NET_HDR_LEN
    }
    /// Bytes the packet may still grow at its tail.
    #[inline]
    pub fn tailroom(&self) -> usize {
        self.inner().buf_size as usize - self.off as usize - self.len as usize
    }
    /// Grows the packet by `n` bytes at the head and returns the new head bytes
    /// (uninitialised contents: whatever the buffer held).
    #[inline]
    pub fn push_head(&mut self, n: usize) -> Result<&mut [u8]> {
        if n > self.headroom() {
            return Err(Error::Config(format!(
                "push_head({n}) exceeds the {}-byte headroom",
                self.headroom()
            )));
        }
        self.off -= n as u16;
        self.len += n as u16;
        Ok(&mut self.data_mut()[..n])
    }
    /// Shrinks the packet by `n` bytes at the head.
    #[inline]
    pub fn pull_head(&mut self, n: usize) -> Result<()> {
        if n > self.len() {
            return Err(Error::Config(format!("pull_head({n}) exceeds the {}-byte packet", self.len)));
        }
        self.off += n as u16;
        self.len -= n as u16;
        Ok(())
    }
    /// Grows the packet by `n` bytes at the tail and returns them.
    #[inline]
    pub fn push_tail(&mut self, n: usize) -> Result<&mut [u8]> {
        if n > self.tailroom() {
            return Err(Error::Config(format!(
                "push_tail({n}) exceeds the {}-byte tailroom",
                self.tailroom()
            )));
        }
        let old = self.len as usize;
        self.len += n as u16;
        Ok(&mut self.data_mut()[old..])
    }
    /// Shrinks the packet by `n` bytes at the tail.
    #[inline]
    pub fn trim_tail(&mut self, n: usize) -> Result<()> {
        if n > self.len() {
            return Err(Error::Config(format!("trim_tail({n}) exceeds the {}-byte packet", self.len)));
        }
        self.len -= n as u16;
        Ok(())
    }
    /// Sets the packet to `bytes` at the pool's default headroom (a chain's segments go
    /// back to the pool: the packet is one buffer afterwards).
    #[inline]
    pub fn set_data(&mut self, bytes: &[u8]) -> Result<()> {
        self.release_segments();
        let room = self.inner().buf_size as usize - self.inner().headroom as usize;
        if bytes.len() > room {
            return Err(Error::Config(format!("{} bytes do not fit a {room}-byte buffer", bytes.len())));
        }
        self.off = self.inner().headroom;
        self.len = bytes.len() as u16;
        self.data_mut().copy_from_slice(bytes);
        Ok(())
    }

    /// The packet's buffer index and data offset (its header slot is the 12 bytes
    /// before the offset).
    #[inline(always)]
    pub(crate) fn buf_off(&self) -> (u32, u16) {
        (self.idx, self.off)
    }

    /// Gives up ownership of a plain packet's buffer without returning it: (index,
    /// offset, length). The caller checked it is plain ([`Mempool::owns_plain`]).
    pub(crate) fn into_raw(self) -> (u32, u16, u16) {
        debug_assert_eq!(self.tags(), 0, "into_raw of a chain or of a packet with an offload request");
        let r = (self.idx, self.off, self.len);
        std::mem::forget(self);
        r
    }
    /// Device address and pointer of the packet's virtio-net header slot (the 12 bytes
    /// just before the data).
    #[inline]
    pub(crate) fn header_slot(&self) -> (*mut u8, u64) {
        // SAFETY: `off >= NET_HDR_LEN` (headroom invariant), inside the buffer.
        let p = unsafe { self.base().add(self.off as usize - NET_HDR_LEN) };
        (p, self.inner().arena.iova(p))
    }
}

impl Drop for Packet {
    fn drop(&mut self) {
        if self.tags() & chain::TAG_CHAIN != 0 {
            self.drop_chain();
            return;
        }
        // SAFETY: this packet's buffer is outstanding, which keeps the pool alive.
        unsafe { PoolInner::put(self.pool_ptr(), &[self.idx]) }
    }
}

impl std::fmt::Debug for Packet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packet")
            .field("buf", &self.idx)
            .field("off", &self.off)
            .field("len", &self.len)
            .field("segs", &self.nb_segs())
            .field("total_len", &self.total_len())
            .finish()
    }
}

#[cfg(test)]
mod tests;
