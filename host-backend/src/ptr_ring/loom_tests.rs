//! Model tests: every interleaving (within loom's bounds) of the two sides, with loom's
//! atomics in the ring. See the parent module's comment for how to run them.

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
