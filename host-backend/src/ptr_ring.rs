//! A bounded FIFO of owned pointers between host threads, after the Linux kernel's
//! `ptr_ring` (DESIGN.md idea 3, "cache-friendly rings between host threads").
//!
//! Owns: one fixed array of slots, each an `AtomicPtr` where null means empty, and the
//! handles that fill and empty it: [`Producer`] / [`Consumer`] for one thread per side
//! (no lock at all), [`SharedProducer`] / [`SharedConsumer`] for several threads per side
//! (one spin lock per side, taken once per call, so once per burst with the batch calls).
//! Items are owned values that travel as one pointer ([`Pointer`]: `Box<T>`, or a
//! `NonZeroUsize` token such as a buffer index + 1); whatever is still in the ring when
//! its last handle goes is dropped, never leaked.
//! Must not: allocate after [`PtrRing::new`] (the batch calls fill and drain vectors the
//! caller owns, within their capacity), block or make a syscall, drop an item it was
//! handed (what does not fit is handed back), or know what the items mean.
//!
//! How it works. There is no shared index: the producer fills the slot at its own index
//! if that slot is null, the consumer takes the slot at its own index if it is non-null.
//! Each index lives in its side's handle, on cache lines of its own (for a shared side,
//! next to the lock that guards it), and is written by one thread at a time. The only
//! shared writes are to slots, so when the ring is neither nearly empty nor nearly full
//! the two sides work on different cache lines and nothing bounces.
//!
//! Near full, a naive consumer that nulls each slot as it takes it would write the very
//! line the producer is about to fill, once per item, and the line would ping-pong. So
//! (as the kernel's `__ptr_ring_discard_one` does) the consumer leaves taken slots
//! non-null, which the producer reads as "full", and only once it is `batch` slots past
//! the last slot it freed (two cache lines of slots by default, at most half the ring),
//! or at the end of the array, it nulls them all, last slot first: the slot the producer
//! is polling is the oldest of the batch, so it turns null last, and the producer moves
//! on only when the whole batch is free, into lines the consumer is done writing. The
//! price: up to `batch - 1` taken slots may still read as full, so a producer facing a
//! consumer that keeps up can see between `capacity - batch + 1` and `capacity` items'
//! worth of room.
//!
//! Orderings: a producer's `Release` store of a pointer pairs with the consumer's
//! `Acquire` load of the slot, so everything written to the item before it was produced
//! is visible to the consumer; the consumer's `Release` store of null pairs with the
//! producer's `Acquire` load that finds the slot free, so the consumer is done with the
//! slot before the producer reuses it (coherence of the one slot would already keep the
//! consumer from reading the new pointer for the old; the pair makes the hand-back a
//! plain happens-before edge, and both are plain moves on x86). The shared handles add
//! the spin lock's own acquire/release, which hands a side's index from one thread to
//! the next.
//!
//! Why not a crate: this is on the packet path between pinned workers, where the ring's
//! cache-line behaviour is the point (crossbeam's `ArrayQueue` and Lamport-style rings
//! share head/tail indices that both sides write, which is exactly the line bouncing
//! idea 3 removes), it is small enough to check by hand, under `loom` and against a
//! model, and it lets us batch: one lock and one pass per burst. The benchmark in
//! `benches/ptr_ring.rs` compares it with both (`cargo bench -p host-backend --bench ptr_ring`).
//!
//! Model tests: the SPSC handles (including the batched free and a wrap) and the shared
//! handles (their lock modelled by loom's mutex instead of the spin lock, whose own code
//! loom cannot see) run under `loom` with
//! `RUSTFLAGS="--cfg loom" cargo test -p host-backend --release --lib ptr_ring`
//! (a separate `CARGO_TARGET_DIR` keeps that build from evicting the normal one).

use std::cell::Cell;
use std::marker::PhantomData;
use std::num::NonZeroUsize;
use std::ptr::{self, NonNull};

use sync::{Arc, AtomicPtr, Lock, Ordering};

/// The atomics, `Arc` and lock the ring uses: std's and `spin`'s normally, loom's under
/// `--cfg loom` so that its model tests see every access.
#[cfg(not(all(test, loom)))]
mod sync {
    pub(super) use std::sync::atomic::{AtomicPtr, Ordering};
    pub(super) use std::sync::Arc;

    /// The per-side lock of the shared handles.
    pub(super) struct Lock<T>(spin::Mutex<T>);

    impl<T> Lock<T> {
        pub(super) fn new(v: T) -> Self {
            Lock(spin::Mutex::new(v))
        }
        #[inline]
        pub(super) fn lock(&self) -> spin::MutexGuard<'_, T> {
            self.0.lock()
        }
    }
}

#[cfg(all(test, loom))]
mod sync {
    pub(super) use loom::sync::atomic::{AtomicPtr, Ordering};
    pub(super) use loom::sync::Arc;

    pub(super) struct Lock<T>(loom::sync::Mutex<T>);

    impl<T> Lock<T> {
        pub(super) fn new(v: T) -> Self {
            Lock(loom::sync::Mutex::new(v))
        }
        pub(super) fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
            self.0.lock().unwrap()
        }
    }
}

/// Cache line size assumed for padding (x86-64 and most AArch64 parts).
const CACHE_LINE: usize = 64;
/// Slots in one cache line.
const SLOTS_PER_LINE: usize = CACHE_LINE / size_of::<*mut ()>();
/// Default free batch: two cache lines of slots (16 with 8-byte pointers), as the kernel.
pub const DEFAULT_BATCH: usize = 2 * SLOTS_PER_LINE;
/// Largest capacity accepted (16 Mi slots, 128 MiB): far beyond any burst pipeline, and
/// it keeps a wrong argument from allocating gigabytes.
pub const MAX_CAPACITY: usize = 1 << 24;

/// Why a ring could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Fewer than two slots (a one-slot ring cannot defer any free).
    #[error("pointer ring capacity {0} is too small: it needs at least 2 slots")]
    CapacityTooSmall(usize),
    /// More than [`MAX_CAPACITY`] slots.
    #[error("pointer ring capacity {0} is larger than {MAX_CAPACITY}")]
    CapacityTooLarge(usize),
    /// A free batch of 0 or of more than half the capacity.
    #[error("pointer ring free batch {batch} must be between 1 and half the capacity {capacity}")]
    Batch {
        /// The batch asked for.
        batch: usize,
        /// The ring's capacity.
        capacity: usize,
    },
}

/// An owned value that travels through the ring as one non-null pointer.
///
/// # Safety
///
/// `into_ptr` must hand the value's ownership to the returned pointer and `from_ptr`
/// must take it back: for `p = x.into_ptr()`, one call of `P::from_ptr(p)` returns `x`.
/// The ring calls `from_ptr` exactly once for every `into_ptr`, possibly on another
/// thread (hence `Send`), and never dereferences the pointer itself.
pub unsafe trait Pointer: Send + Sized {
    /// Gives up the value as a pointer.
    fn into_ptr(self) -> NonNull<()>;
    /// Takes the value back.
    ///
    /// # Safety
    ///
    /// `ptr` came from `into_ptr` of this type and has not been taken back before.
    unsafe fn from_ptr(ptr: NonNull<()>) -> Self;
}

// SAFETY: `Box::leak` gives up the allocation (or the dangling, non-null pointer of a
// zero-sized value) without dropping it; `Box::from_raw` on that very pointer owns it
// again. `T: Send` because the box may be dropped on the consumer's thread.
unsafe impl<T: Send> Pointer for Box<T> {
    #[inline]
    fn into_ptr(self) -> NonNull<()> {
        NonNull::from(Box::leak(self)).cast()
    }
    #[inline]
    unsafe fn from_ptr(ptr: NonNull<()>) -> Self {
        // SAFETY: the caller passes a pointer `into_ptr` made from a `Box<T>`, once.
        unsafe { Box::from_raw(ptr.cast::<T>().as_ptr()) }
    }
}

// SAFETY: a token is a non-zero integer dressed as a pointer, never dereferenced (the
// ring never dereferences slots); `from_ptr` reads the same integer back.
unsafe impl Pointer for NonZeroUsize {
    #[inline]
    fn into_ptr(self) -> NonNull<()> {
        // SAFETY: a non-zero address is a non-null pointer.
        unsafe { NonNull::new_unchecked(self.get() as *mut ()) }
    }
    #[inline]
    unsafe fn from_ptr(ptr: NonNull<()>) -> Self {
        // SAFETY: a non-null pointer has a non-zero address.
        unsafe { NonZeroUsize::new_unchecked(ptr.as_ptr() as usize) }
    }
}

/// One cache line of slots, aligned so that the slot array shares no line with other
/// data and "two lines of slots" means exactly that.
#[repr(align(64))]
struct Line([AtomicPtr<()>; SLOTS_PER_LINE]);

/// Keeps a value (a lock and the index it guards) on cache lines of its own.
#[repr(align(64))]
struct CachePadded<T>(T);

/// What both sides share: the slots and two constants.
struct Inner<P: Pointer> {
    lines: Box<[Line]>,
    capacity: usize,
    batch: usize,
    /// Each non-null slot owns a `P` (see `Drop`).
    _owns: PhantomData<P>,
}

// SAFETY: the ring moves `P`s from one thread to another and never hands out `&P`, so
// `P: Send` (implied by `Pointer`) is all it needs; everything else is atomics.
unsafe impl<P: Pointer> Send for Inner<P> {}
// SAFETY: as above: a shared `&Inner` only shares the atomic slots.
unsafe impl<P: Pointer> Sync for Inner<P> {}

impl<P: Pointer> Inner<P> {
    #[inline]
    fn slot(&self, i: usize) -> &AtomicPtr<()> {
        &self.lines[i / SLOTS_PER_LINE].0[i % SLOTS_PER_LINE]
    }

    #[inline]
    fn next(&self, i: usize) -> usize {
        if i + 1 == self.capacity {
            0
        } else {
            i + 1
        }
    }
}

impl<P: Pointer> Drop for Inner<P> {
    fn drop(&mut self) {
        // Both sides are gone, and the consumer side nulled the slots it had taken but
        // not freed (`ConsumerSide::drop`), so every non-null slot is an item nobody took.
        for i in 0..self.capacity {
            // Acquire: pairs with the producer's release like a consume does (the last
            // `Arc` drop already ordered everything; the ordering costs nothing here).
            if let Some(ptr) = NonNull::new(self.slot(i).load(Ordering::Acquire)) {
                // SAFETY: a non-null slot holds a pointer the producer made with
                // `into_ptr` and that no consumer took back; this is its only take.
                drop(unsafe { P::from_ptr(ptr) });
            }
        }
    }
}

/// A ring before it is split into its two sides.
pub struct PtrRing<P: Pointer> {
    inner: Arc<Inner<P>>,
}

impl<P: Pointer> PtrRing<P> {
    /// A ring of `capacity` slots (at least 2) with the default free batch
    /// ([`DEFAULT_BATCH`], at most half the capacity).
    pub fn new(capacity: usize) -> Result<Self, Error> {
        Self::with_batch(capacity, DEFAULT_BATCH.min(capacity / 2))
    }

    /// A ring of `capacity` slots whose consumer frees taken slots `batch` at a time
    /// (`1 <= batch <= capacity / 2`).
    pub fn with_batch(capacity: usize, batch: usize) -> Result<Self, Error> {
        if capacity < 2 {
            return Err(Error::CapacityTooSmall(capacity));
        }
        if capacity > MAX_CAPACITY {
            return Err(Error::CapacityTooLarge(capacity));
        }
        if batch == 0 || batch > capacity / 2 {
            return Err(Error::Batch { batch, capacity });
        }
        let lines = (0..capacity.div_ceil(SLOTS_PER_LINE))
            .map(|_| Line(std::array::from_fn(|_| AtomicPtr::new(ptr::null_mut()))))
            .collect();
        Ok(PtrRing { inner: Arc::new(Inner { lines, capacity, batch, _owns: PhantomData }) })
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.inner.capacity
    }

    /// How many taken slots the consumer frees at a time.
    pub fn batch(&self) -> usize {
        self.inner.batch
    }

    /// Handles for one producer thread and one consumer thread: no lock.
    pub fn split(self) -> (Producer<P>, Consumer<P>) {
        let producer = ProducerSide { ring: self.inner.clone(), head: 0 };
        let consumer = ConsumerSide { ring: self.inner, head: 0, tail: 0 };
        (
            Producer { side: producer, _not_sync: PhantomData },
            Consumer { side: consumer, _not_sync: PhantomData },
        )
    }

    /// Handles for any number of producer and consumer threads (clone them): one spin
    /// lock per side, taken once per call.
    pub fn shared(self) -> (SharedProducer<P>, SharedConsumer<P>) {
        let (p, c) = self.split();
        (p.into(), c.into())
    }
}

/// The producer's state. `head` is written by one thread at a time: the owner of the
/// [`Producer`], or whoever holds the [`SharedProducer`] lock.
struct ProducerSide<P: Pointer> {
    ring: Arc<Inner<P>>,
    /// Next slot to fill.
    head: usize,
}

impl<P: Pointer> ProducerSide<P> {
    /// Whether the slot at `head` is in use. Only this side makes a slot non-null, so a
    /// slot seen free stays free until we fill it; one seen in use may be freed any time.
    #[inline]
    fn is_full(&self) -> bool {
        // Acquire: pairs with the consumer's `Release` store of null (see `fill`).
        !self.ring.slot(self.head).load(Ordering::Acquire).is_null()
    }

    #[inline]
    fn produce(&mut self, item: P) -> Result<(), P> {
        if self.is_full() {
            // Either an item not consumed yet or one taken but not freed: full, either way.
            return Err(item);
        }
        self.fill(item);
        Ok(())
    }

    fn produce_batch(&mut self, items: &mut Vec<P>) -> usize {
        // Count the free slots ahead first (a free slot stays free until we fill it, see
        // `is_full`; at most one lap, or we would count the same slots twice), then
        // fill them with the first items in order. The rest stay in `items`.
        let want = items.len().min(self.ring.capacity);
        let mut n = 0;
        let mut i = self.head;
        // Acquire: as in `is_full`.
        while n < want && self.ring.slot(i).load(Ordering::Acquire).is_null() {
            n += 1;
            i = self.ring.next(i);
        }
        for item in items.drain(..n) {
            self.fill(item);
        }
        n
    }

    /// Fills the slot at `head`, which this side saw null with an `Acquire` load. That
    /// load pairs with the consumer's `Release` store of null in `free_taken`: the
    /// consumer's last use of the slot happens before we reuse it.
    #[inline]
    fn fill(&mut self, item: P) {
        // Release: pairs with the consumer's `Acquire` load in `consume`, so everything
        // written to the item before it was produced is visible to the consumer.
        self.ring.slot(self.head).store(item.into_ptr().as_ptr(), Ordering::Release);
        self.head = self.ring.next(self.head);
    }
}

/// The consumer's state, written by one thread at a time like [`ProducerSide`].
///
/// Slots `tail..head` are taken but not yet freed: still non-null, so the producer sees
/// them as full. `tail <= head` always: at the end of the array both go back to 0.
struct ConsumerSide<P: Pointer> {
    ring: Arc<Inner<P>>,
    /// Next slot to take.
    head: usize,
    /// First taken slot not yet freed.
    tail: usize,
}

impl<P: Pointer> ConsumerSide<P> {
    /// Whether the slot at `head` holds no item. A slot at `head` is never a taken one
    /// (the consumer frees everything before it wraps), so non-null means an item.
    #[inline]
    fn is_empty(&self) -> bool {
        // Acquire: as in `consume`.
        self.ring.slot(self.head).load(Ordering::Acquire).is_null()
    }

    #[inline]
    fn consume(&mut self) -> Option<P> {
        // Acquire: pairs with the producer's `Release` store in `fill`: the item's
        // contents are visible before we hand it out.
        let ptr = NonNull::new(self.ring.slot(self.head).load(Ordering::Acquire))?;
        self.advance();
        // SAFETY: the producer stored this pointer from `into_ptr` (the non-null slot
        // at `head` is an item, see `is_empty`), and only this side takes items: `head`
        // has moved past it, so this is its one and only take.
        Some(unsafe { P::from_ptr(ptr) })
    }

    fn consume_batch(&mut self, out: &mut Vec<P>, max: usize) -> usize {
        // Never more than `out` holds without growing: no allocation here.
        let max = max.min(out.capacity() - out.len());
        let mut n = 0;
        while n < max {
            match self.consume() {
                Some(item) => out.push(item),
                None => break,
            }
            n += 1;
        }
        n
    }

    /// Moves past the slot just taken, freeing the taken slots once there are `batch`
    /// of them or the array ends (the kernel does the same: it keeps `tail..head` from
    /// ever wrapping).
    #[inline]
    fn advance(&mut self) {
        self.head += 1;
        let end = self.head == self.ring.capacity;
        if end || self.head - self.tail >= self.ring.batch {
            self.free_taken();
            if end {
                self.head = 0;
                self.tail = 0;
            }
        }
    }

    /// Nulls `tail..head`, last slot first. When the ring is full the producer is polling
    /// `tail` (the oldest slot), so it sees "full" until the whole batch is free and then
    /// runs into lines we no longer write, instead of trailing us line by line.
    fn free_taken(&mut self) {
        for i in (self.tail..self.head).rev() {
            // Release: pairs with the producer's `Acquire` load that finds the slot free
            // (see `ProducerSide::fill`). On x86 both are plain moves.
            self.ring.slot(i).store(ptr::null_mut(), Ordering::Release);
        }
        self.tail = self.head;
    }
}

impl<P: Pointer> Drop for ConsumerSide<P> {
    fn drop(&mut self) {
        // Free what we took, so that the ring's own drop (or a producer still running)
        // sees only items in the non-null slots.
        self.free_taken();
    }
}

/// Fills the ring from one thread. `Send`, not `Sync` and not `Clone`: one thread owns
/// it, so it needs no lock. Its index sits on its own cache line.
///
/// ```
/// use host_backend::ptr_ring::PtrRing;
/// let (mut tx, mut rx) = PtrRing::new(256)?.split();
/// let worker = std::thread::spawn(move || {
///     let mut burst: Vec<Box<u32>> = (0..32).map(Box::new).collect();
///     while !burst.is_empty() {
///         tx.produce_batch(&mut burst); // what did not fit stays in `burst`
///     }
/// });
/// let mut out = Vec::with_capacity(32);
/// while out.len() < 32 {
///     rx.consume_batch(&mut out, 32);
/// }
/// worker.join().unwrap();
/// assert!(out.iter().enumerate().all(|(i, b)| **b == i as u32));
/// # Ok::<(), host_backend::ptr_ring::Error>(())
/// ```
///
/// Sharing or cloning it does not compile:
///
/// ```compile_fail
/// fn sync<T: Sync>() {}
/// sync::<host_backend::ptr_ring::Producer<Box<u8>>>();
/// ```
/// ```compile_fail
/// fn clone<T: Clone>() {}
/// clone::<host_backend::ptr_ring::Consumer<Box<u8>>>();
/// ```
#[repr(align(64))]
pub struct Producer<P: Pointer> {
    side: ProducerSide<P>,
    _not_sync: PhantomData<Cell<()>>,
}

impl<P: Pointer> Producer<P> {
    /// Puts `item` in the ring, or hands it back if the next slot is not free.
    #[inline]
    pub fn produce(&mut self, item: P) -> Result<(), P> {
        self.side.produce(item)
    }

    /// Moves as many items as fit from the front of `items` into the ring, in order, and
    /// returns how many. It stops at the first slot not free; the items that did not fit
    /// stay in `items`, in order. Does not allocate.
    #[inline]
    pub fn produce_batch(&mut self, items: &mut Vec<P>) -> usize {
        self.side.produce_batch(items)
    }

    /// Whether [`produce`](Self::produce) would fail now (a hint: the consumer may free
    /// the slot at any time).
    pub fn is_full(&self) -> bool {
        self.side.is_full()
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.side.ring.capacity
    }
}

/// Empties the ring from one thread. `Send`, not `Sync` and not `Clone`, like
/// [`Producer`].
#[repr(align(64))]
pub struct Consumer<P: Pointer> {
    side: ConsumerSide<P>,
    _not_sync: PhantomData<Cell<()>>,
}

impl<P: Pointer> Consumer<P> {
    /// Takes the oldest item, if any.
    #[inline]
    pub fn consume(&mut self) -> Option<P> {
        self.side.consume()
    }

    /// Appends up to `max` items to `out`, oldest first, and returns how many; never more
    /// than `out`'s spare capacity, so it does not allocate (give `out` capacity).
    #[inline]
    pub fn consume_batch(&mut self, out: &mut Vec<P>, max: usize) -> usize {
        self.side.consume_batch(out, max)
    }

    /// Whether [`consume`](Self::consume) would find nothing now (a hint: the producer
    /// may fill the slot at any time).
    pub fn is_empty(&self) -> bool {
        self.side.is_empty()
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.side.ring.capacity
    }
}

/// Fills the ring from any number of threads: `Clone`, `Send` and `Sync`. Each call takes
/// the producer side's spin lock once, so use the batch call on hot paths.
pub struct SharedProducer<P: Pointer>(Arc<CachePadded<Lock<ProducerSide<P>>>>);

impl<P: Pointer> Clone for SharedProducer<P> {
    fn clone(&self) -> Self {
        SharedProducer(self.0.clone())
    }
}

impl<P: Pointer> From<Producer<P>> for SharedProducer<P> {
    fn from(p: Producer<P>) -> Self {
        SharedProducer(Arc::new(CachePadded(Lock::new(p.side))))
    }
}

impl<P: Pointer> SharedProducer<P> {
    /// [`Producer::produce`] under the lock.
    pub fn produce(&self, item: P) -> Result<(), P> {
        self.0 .0.lock().produce(item)
    }

    /// [`Producer::produce_batch`] under the lock, taken once.
    pub fn produce_batch(&self, items: &mut Vec<P>) -> usize {
        self.0 .0.lock().produce_batch(items)
    }
}

/// Empties the ring from any number of threads: `Clone`, `Send` and `Sync`, like
/// [`SharedProducer`].
pub struct SharedConsumer<P: Pointer>(Arc<CachePadded<Lock<ConsumerSide<P>>>>);

impl<P: Pointer> Clone for SharedConsumer<P> {
    fn clone(&self) -> Self {
        SharedConsumer(self.0.clone())
    }
}

impl<P: Pointer> From<Consumer<P>> for SharedConsumer<P> {
    fn from(c: Consumer<P>) -> Self {
        SharedConsumer(Arc::new(CachePadded(Lock::new(c.side))))
    }
}

impl<P: Pointer> SharedConsumer<P> {
    /// [`Consumer::consume`] under the lock.
    pub fn consume(&self) -> Option<P> {
        self.0 .0.lock().consume()
    }

    /// [`Consumer::consume_batch`] under the lock, taken once.
    pub fn consume_batch(&self, out: &mut Vec<P>, max: usize) -> usize {
        self.0 .0.lock().consume_batch(out, max)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::time::{Duration, Instant};

    use proptest::prelude::*;

    fn tok(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n + 1).unwrap()
    }
    fn untok(t: NonZeroUsize) -> usize {
        t.get() - 1
    }

    /// Counts how many times values of it were dropped.
    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits without hogging a core the other side may need (the machine may have two),
    /// and fails the test if `until` has passed, so a livelock fails instead of hanging.
    fn backoff(spins: &mut u32, until: Instant, who: &str) {
        *spins = spins.wrapping_add(1);
        if *spins & 63 == 0 {
            std::thread::yield_now();
            assert!(Instant::now() < until, "{who} stuck");
        } else {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn rejects_bad_sizes() {
        type R = PtrRing<Box<u32>>;
        assert_eq!(R::new(0).err(), Some(Error::CapacityTooSmall(0)));
        assert_eq!(R::new(1).err(), Some(Error::CapacityTooSmall(1)));
        assert_eq!(R::new(MAX_CAPACITY + 1).err(), Some(Error::CapacityTooLarge(MAX_CAPACITY + 1)));
        assert_eq!(R::with_batch(8, 0).err(), Some(Error::Batch { batch: 0, capacity: 8 }));
        assert_eq!(R::with_batch(8, 5).err(), Some(Error::Batch { batch: 5, capacity: 8 }));
        let r = R::new(2).unwrap();
        assert_eq!((r.capacity(), r.batch()), (2, 1));
        assert_eq!(R::new(20).unwrap().batch(), 10);
        assert_eq!(R::new(1024).unwrap().batch(), DEFAULT_BATCH);
        assert_eq!(DEFAULT_BATCH, 2 * 64 / size_of::<usize>());
    }

    #[test]
    fn empty_and_full_boundaries() {
        let (mut p, mut c) = PtrRing::<Box<u32>>::new(8).unwrap().split();
        assert!(c.is_empty() && !p.is_full());
        assert!(c.consume().is_none());
        for i in 0..8 {
            p.produce(Box::new(i)).unwrap();
        }
        assert!(p.is_full() && !c.is_empty());
        // The item that does not fit comes back, intact.
        assert_eq!(*p.produce(Box::new(99)).unwrap_err(), 99);

        // Taken slots stay "full" until a batch (4 here) is freed.
        assert_eq!(*c.consume().unwrap(), 0);
        assert!(p.is_full());
        for i in 1..4 {
            assert_eq!(*c.consume().unwrap(), i);
        }
        assert!(!p.is_full());
        for i in 8..12 {
            p.produce(Box::new(i)).unwrap();
        }
        assert!(p.produce(Box::new(12)).is_err());
        for i in 4..12 {
            assert_eq!(*c.consume().unwrap(), i);
        }
        assert!(c.is_empty() && c.consume().is_none());
        assert!(!p.is_full());
    }

    #[test]
    fn capacity_two() {
        let (mut p, mut c) = PtrRing::<Box<&str>>::new(2).unwrap().split();
        p.produce(Box::new("a")).unwrap();
        p.produce(Box::new("b")).unwrap();
        assert_eq!(*p.produce(Box::new("x")).unwrap_err(), "x");
        assert_eq!(*c.consume().unwrap(), "a");
        // Batch 1: the slot is free at once.
        p.produce(Box::new("c")).unwrap();
        assert!(p.produce(Box::new("y")).is_err());
        assert_eq!(*c.consume().unwrap(), "b");
        assert_eq!(*c.consume().unwrap(), "c");
        assert!(c.consume().is_none());
        p.produce(Box::new("d")).unwrap();
        assert_eq!(*c.consume().unwrap(), "d");
    }

    #[test]
    fn wraps_around_many_times() {
        // Odd capacity, so wraps land on every slot.
        let (mut p, mut c) = PtrRing::<NonZeroUsize>::with_batch(5, 2).unwrap().split();
        let (mut next_in, mut next_out) = (0, 0);
        for round in 0..20_000 {
            for _ in 0..round % 7 {
                if p.produce(tok(next_in)).is_err() {
                    break;
                }
                next_in += 1;
            }
            for _ in 0..(round * 3) % 6 {
                match c.consume() {
                    Some(t) => {
                        assert_eq!(untok(t), next_out);
                        next_out += 1;
                    }
                    None => break,
                }
            }
        }
        while let Some(t) = c.consume() {
            assert_eq!(untok(t), next_out);
            next_out += 1;
        }
        assert_eq!(next_out, next_in);
        assert!(next_in > 20_000 * 5 / 6, "too few items went through: {next_in}");
    }

    #[test]
    fn batch_partial_fill_hands_back_the_rest() {
        let (mut p, mut c) = PtrRing::<Box<u32>>::new(4).unwrap().split();
        let mut items: Vec<Box<u32>> = (0..6).map(Box::new).collect();
        assert_eq!(p.produce_batch(&mut items), 4);
        assert_eq!(items.iter().map(|b| **b).collect::<Vec<_>>(), [4, 5]);
        assert_eq!(p.produce_batch(&mut items), 0);
        assert_eq!(items.len(), 2);

        // `max` and the spare capacity of `out` both bound a consume.
        let mut out = Vec::with_capacity(8);
        assert_eq!(c.consume_batch(&mut out, 1), 1);
        let mut small = Vec::with_capacity(2);
        small.push(Box::new(100));
        assert_eq!(c.consume_batch(&mut small, 8), small.capacity() - 1);
        assert_eq!(small.capacity(), 2, "consume_batch must not grow its output");
        assert_eq!(c.consume_batch(&mut out, 8), 2);
        let seen: Vec<u32> = out.iter().chain(&small[1..]).map(|b| **b).collect();
        assert_eq!(seen.len(), 4);
        assert_eq!(*out[0], 0);
        assert_eq!(*small[1], 1);
        assert_eq!((*out[1], *out[2]), (2, 3));

        assert_eq!(p.produce_batch(&mut items), 2);
        assert!(items.is_empty());
        out.clear();
        assert_eq!(c.consume_batch(&mut out, 8), 2);
        assert_eq!((*out[0], *out[1]), (4, 5));
        // An empty ring and an empty batch are fine.
        assert_eq!(c.consume_batch(&mut out, 8), 0);
        assert_eq!(p.produce_batch(&mut Vec::new()), 0);
    }

    #[test]
    fn drop_frees_leftovers_exactly_once() {
        let drops = Arc::new(AtomicUsize::new(0));
        let item = || Counted(drops.clone());
        {
            // Batch 4: the two consumed slots are taken but not freed when dropped.
            let (mut p, mut c) = PtrRing::<Box<Counted>>::new(8).unwrap().split();
            for _ in 0..6 {
                p.produce(Box::new(item())).ok().unwrap();
            }
            drop(c.consume());
            drop(c.consume());
            assert_eq!(drops.load(Ordering::Relaxed), 2);
            // Consumer first: the producer keeps working on the ring alone.
            drop(c);
            p.produce(Box::new(item())).ok().unwrap();
        }
        assert_eq!(drops.load(Ordering::Relaxed), 7);

        // A refused item is handed back, not dropped.
        drops.store(0, Ordering::Relaxed);
        let (mut p, c) = PtrRing::<Box<Counted>>::new(2).unwrap().split();
        p.produce(Box::new(item())).ok().unwrap();
        p.produce(Box::new(item())).ok().unwrap();
        let back = p.produce(Box::new(item())).err().unwrap();
        assert_eq!(drops.load(Ordering::Relaxed), 0);
        drop((p, c, back));
        assert_eq!(drops.load(Ordering::Relaxed), 3);

        // Shared handles, dropped in any order; and a ring never split holds nothing.
        drops.store(0, Ordering::Relaxed);
        let (sp, sc) = PtrRing::<Box<Counted>>::new(16).unwrap().shared();
        let sp2 = sp.clone();
        let mut batch: Vec<_> = (0..5).map(|_| Box::new(item())).collect();
        assert_eq!(sp2.produce_batch(&mut batch), 5);
        drop(sc.clone().consume());
        drop((sc, sp));
        assert_eq!(drops.load(Ordering::Relaxed), 1);
        drop(sp2);
        assert_eq!(drops.load(Ordering::Relaxed), 5);
        drop(PtrRing::<Box<Counted>>::new(4).unwrap());
    }

    #[test]
    fn handles_are_send_and_shared_handles_sync() {
        fn send<T: Send>() {}
        fn sync<T: Send + Sync + Clone>() {}
        send::<Producer<Box<Vec<u8>>>>();
        send::<Consumer<Box<Vec<u8>>>>();
        sync::<SharedProducer<Box<Vec<u8>>>>();
        sync::<SharedConsumer<Box<Vec<u8>>>>();
        assert_eq!(std::mem::align_of::<Producer<NonZeroUsize>>(), CACHE_LINE);
        assert_eq!(std::mem::align_of::<Consumer<NonZeroUsize>>(), CACHE_LINE);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Produce(usize),
        Consume(usize),
    }

    proptest! {
        /// Against a `VecDeque`: FIFO order, nothing lost or duplicated, and the room the
        /// producer sees is the free slots less at most `batch - 1` taken ones.
        #[test]
        fn behaves_like_a_bounded_fifo(
            capacity in 2usize..40,
            batch_pick in 0usize..20,
            ops in prop::collection::vec(
                prop_oneof![(0usize..50).prop_map(Op::Produce), (0usize..50).prop_map(Op::Consume)],
                1..60,
            ),
        ) {
            let batch = 1 + batch_pick % (capacity / 2);
            let (mut p, mut c) = PtrRing::<NonZeroUsize>::with_batch(capacity, batch).unwrap().split();
            let mut model = VecDeque::new();
            let mut next = 0;
            let mut items = Vec::with_capacity(64);
            let mut out = Vec::with_capacity(64);
            for op in ops {
                match op {
                    Op::Produce(n) => {
                        items.clear();
                        items.extend((next..next + n).map(tok));
                        let before = model.len();
                        let done = p.produce_batch(&mut items);
                        prop_assert_eq!(done + items.len(), n);
                        prop_assert!(before + done <= capacity);
                        if done < n {
                            prop_assert!(before + done + batch > capacity, "refused with room");
                            prop_assert_eq!(untok(items[0]), next + done);
                        }
                        model.extend(next..next + done);
                        next += done;
                    }
                    Op::Consume(n) => {
                        out.clear();
                        let done = c.consume_batch(&mut out, n);
                        prop_assert_eq!(done, n.min(model.len()));
                        for t in &out {
                            prop_assert_eq!(Some(untok(*t)), model.pop_front());
                        }
                    }
                }
            }
        }
    }

    /// Bounds a stress test's wall time, so a livelock fails instead of hanging.
    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[test]
    fn spsc_stress_in_order() {
        const N: u64 = 1_000_000;
        let (mut p, mut c) = PtrRing::<Box<u64>>::new(256).unwrap().split();
        let until = deadline();
        let producer = std::thread::spawn(move || {
            let mut items = Vec::with_capacity(32);
            let (mut next, mut spins, mut round) = (0u64, 0, 0u64);
            while next < N || !items.is_empty() {
                if items.is_empty() {
                    // Bursts of 1 to 32 in a scrambled order, single items through `produce`.
                    round += 1;
                    let burst = 1 + (round * 13) % 32;
                    if burst == 1 {
                        let mut item = Box::new(next);
                        while let Err(back) = p.produce(item) {
                            item = back;
                            backoff(&mut spins, until, "producer");
                        }
                        next += 1;
                        continue;
                    }
                    items.extend((next..(next + burst).min(N)).map(Box::new));
                    next = (next + burst).min(N);
                }
                if p.produce_batch(&mut items) == 0 {
                    backoff(&mut spins, until, "producer");
                }
            }
        });
        let mut out = Vec::with_capacity(32);
        let (mut expect, mut spins, mut sum, mut round) = (0u64, 0u32, 0u64, 0usize);
        while expect < N {
            out.clear();
            round += 1;
            let max = 1 + (round * 7) % 32;
            if c.consume_batch(&mut out, max) == 0 {
                backoff(&mut spins, until, "consumer");
                continue;
            }
            for item in out.drain(..) {
                assert_eq!(*item, expect, "out of order");
                sum += *item;
                expect += 1;
            }
        }
        producer.join().unwrap();
        assert_eq!(sum, N * (N - 1) / 2);
        assert!(c.consume().is_none(), "more items than produced");
    }

    #[test]
    fn mpmc_stress_every_item_once() {
        const PRODUCERS: u64 = 4;
        const CONSUMERS: usize = 4;
        const PER: u64 = 100_000;
        const TOTAL: u64 = PRODUCERS * PER;
        let (sp, sc) = PtrRing::<Box<u64>>::new(64).unwrap().shared();
        let taken = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let until = deadline();
        let producers: Vec<_> = (0..PRODUCERS)
            .map(|id| {
                let sp = sp.clone();
                std::thread::spawn(move || {
                    let mut items = Vec::with_capacity(16);
                    let (mut next, mut spins) = (0, 0);
                    while next < PER || !items.is_empty() {
                        if items.is_empty() {
                            let end = (next + 16).min(PER);
                            items.extend((next..end).map(|i| Box::new(id << 32 | i)));
                            next = end;
                        }
                        if sp.produce_batch(&mut items) == 0 {
                            backoff(&mut spins, until, "producer");
                        }
                    }
                })
            })
            .collect();
        drop(sp);
        let consumers: Vec<_> = (0..CONSUMERS)
            .map(|_| {
                let (sc, taken, stop) = (sc.clone(), taken.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut out = Vec::with_capacity(16);
                    let mut seen = Vec::with_capacity(TOTAL as usize);
                    let mut last = [None::<u64>; PRODUCERS as usize];
                    let mut spins = 0;
                    while !stop.load(Ordering::Relaxed) {
                        out.clear();
                        let n = sc.consume_batch(&mut out, 16);
                        if n == 0 {
                            backoff(&mut spins, until, "consumer");
                            continue;
                        }
                        for v in out.drain(..) {
                            // One producer's items reach one consumer in its order.
                            let (id, seq) = ((*v >> 32) as usize, *v & 0xffff_ffff);
                            if let Some(l) = last[id] {
                                assert!(l < seq, "reordered");
                            }
                            last[id] = Some(seq);
                            seen.push(*v);
                        }
                        if taken.fetch_add(n, Ordering::Relaxed) + n == TOTAL as usize {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                    seen
                })
            })
            .collect();
        for p in producers {
            p.join().unwrap();
        }
        let mut all: Vec<u64> = consumers.into_iter().flat_map(|c| c.join().unwrap()).collect();
        assert_eq!(all.len() as u64, TOTAL);
        let sum: u64 = all.iter().map(|v| (v >> 32) * PER + (v & 0xffff_ffff)).sum();
        assert_eq!(sum, TOTAL * (TOTAL - 1) / 2);
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len() as u64, TOTAL, "an item was seen twice");
        assert!(sc.consume().is_none());
    }
}

/// Model tests: every interleaving (within loom's bounds) of the two sides, with loom's
/// atomics in the ring. See the module comment for how to run them.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::cell::UnsafeCell;
    use loom::sync::atomic::AtomicUsize;
    use loom::thread;

    /// An item whose contents loom tracks: reading it on the consumer's thread is a
    /// data race unless the producer's write happens before (the slot's release/acquire).
    struct Item(UnsafeCell<u32>);

    fn item(v: u32) -> Box<Item> {
        let it = Box::new(Item(UnsafeCell::new(0)));
        // SAFETY: the item is not shared yet.
        it.0.with_mut(|p| unsafe { *p = v });
        it
    }

    fn read(it: &Item) -> u32 {
        // SAFETY: the consumer owns the item; loom checks the producer's write is visible.
        it.0.with(|p| unsafe { *p })
    }

    fn produce_all(p: &mut Producer<Box<Item>>, items: impl IntoIterator<Item = u32>) {
        for v in items {
            let mut it = item(v);
            while let Err(back) = p.produce(it) {
                it = back;
                thread::yield_now();
            }
        }
    }

    fn consume_n(c: &mut Consumer<Box<Item>>, n: usize) -> Vec<u32> {
        let mut got = Vec::new();
        while got.len() < n {
            match c.consume() {
                Some(b) => got.push(read(&b)),
                None => thread::yield_now(),
            }
        }
        got
    }

    /// Capacity 2, batch 1: the producer laps the ring and waits on the consumer.
    #[test]
    fn spsc_capacity_two() {
        loom::model(|| {
            let (mut p, mut c) = PtrRing::<Box<Item>>::new(2).unwrap().split();
            let t = thread::spawn(move || produce_all(&mut p, 0..3));
            assert_eq!(consume_n(&mut c, 3), [0, 1, 2]);
            t.join().unwrap();
            assert!(c.consume().is_none());
        });
    }

    /// Capacity 4, batch 2, starting with a taken-but-not-freed slot 0 right where the
    /// producer must write its second item: it may go on only after the consumer's
    /// reverse-order free of slots 1 and 0; the consumer also wraps (frees at the end).
    #[test]
    fn spsc_batched_free_and_wrap() {
        loom::model(|| {
            let (mut p, mut c) = PtrRing::<Box<Item>>::with_batch(4, 2).unwrap().split();
            produce_all(&mut p, 0..3);
            assert_eq!(read(&c.consume().unwrap()), 0);
            let t = thread::spawn(move || {
                let mut items = vec![item(3), item(4)];
                while !items.is_empty() {
                    if p.produce_batch(&mut items) == 0 {
                        thread::yield_now();
                    }
                }
            });
            let (mut out, mut got) = (Vec::with_capacity(2), Vec::new());
            while got.len() < 4 {
                if c.consume_batch(&mut out, 2) == 0 {
                    thread::yield_now();
                }
                // Read before the join, which would order everything by itself.
                got.extend(out.drain(..).map(|b| read(&b)));
            }
            t.join().unwrap();
            assert_eq!(got, [1, 2, 3, 4]);
        });
    }

    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Each side drops its handle on its own thread while items are in flight, the
    /// consumer with a taken slot not yet freed (batch 2): every item is dropped exactly
    /// once, whoever ends up owning it (a refused one by the producer, a taken one by the
    /// consumer, the rest by the ring).
    #[test]
    fn handles_dropped_mid_flight() {
        loom::model(|| {
            let drops = Arc::new(AtomicUsize::new(0));
            let (mut p, mut c) = PtrRing::<Box<Counted>>::with_batch(4, 2).unwrap().split();
            let d = drops.clone();
            let t = thread::spawn(move || {
                for _ in 0..5 {
                    drop(p.produce(Box::new(Counted(d.clone()))));
                }
            });
            drop(c.consume());
            drop(c.consume());
            drop(c);
            t.join().unwrap();
            assert_eq!(drops.load(Ordering::Relaxed), 5);
        });
    }

    /// Two producer threads through the shared handle (loom's mutex stands in for the
    /// spin lock), the consumer on the main thread.
    #[test]
    fn shared_two_producers() {
        loom::model(|| {
            let (sp, sc) = PtrRing::<Box<Item>>::new(2).unwrap().shared();
            let threads: Vec<_> = [10, 20]
                .into_iter()
                .map(|v| {
                    let sp = sp.clone();
                    thread::spawn(move || {
                        let mut items = vec![item(v)];
                        while sp.produce_batch(&mut items) == 0 {
                            thread::yield_now();
                        }
                    })
                })
                .collect();
            let mut got = Vec::new();
            while got.len() < 2 {
                match sc.consume() {
                    Some(b) => got.push(read(&b)),
                    None => thread::yield_now(),
                }
            }
            for t in threads {
                t.join().unwrap();
            }
            got.sort_unstable();
            assert_eq!(got, [10, 20]);
        });
    }
}
