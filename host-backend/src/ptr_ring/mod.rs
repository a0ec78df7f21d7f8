//! A bounded FIFO of owned pointers between host threads, after the Linux kernel's
//! `ptr_ring`: cache-friendly rings between host threads.
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
//! this design removes), it is small enough to check by hand, under `loom` and against a
//! model, and it lets us batch: one lock and one pass per burst. The benchmark in
//! `benches/ptr_ring.rs` compares it with both (`cargo bench -p host-backend --bench ptr_ring`).
//!
//! Model tests: the SPSC handles (including the batched free and a wrap) and the shared
//! handles (their lock modelled by loom's mutex instead of the spin lock, whose own code
//! loom cannot see) run under `loom` with
//! `RUSTFLAGS="--cfg loom" cargo test -p host-backend --release --lib ptr_ring`
//! (a separate `CARGO_TARGET_DIR` keeps that build from evicting the normal one).
//! The unit and property tests are in `tests.rs`, the loom models in `loom_tests.rs`.

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
mod tests;

#[cfg(all(test, loom))]
mod loom_tests;
