//! The driver's used-ring processing (split and packed, any-order and in-order) against
//! arbitrary device writes: the driver posts buffers and publishes, the "device" writes
//! anything into the memory it may write (the used ring, or the packed descriptor ring,
//! and its event suppression area), and the driver polls and takes used buffers. Checked
//! against a model: every buffer handed back was in flight, at most once, with a length
//! no larger than posted (the checked path); a violation must be an `Err`, never a panic.
#![no_main]

use std::collections::HashMap;
use std::sync::Arc;

use arbitrary::Arbitrary;
use driver::dma::DmaArena;
use driver::ring::{AnyRing, DriverRing, PackedRing, Ring, RingFeatures, TokenSink, UsedSink};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    /// Posts one buffer (device-writable or not) of `len` bytes.
    Post {
        len: u16,
        writes: bool,
    },
    /// Posts a chain of up to 4 parts.
    Chain {
        parts: Vec<(u16, bool)>,
    },
    Publish,
    /// Raw device write into area 0 (split: used ring; packed: descriptor ring) or 1
    /// (packed: device event suppression; split: used ring too).
    Device {
        area: bool,
        off: u16,
        bytes: Vec<u8>,
    },
    /// Split only: a well-behaved completion of the next `n` avail entries (as written).
    Complete {
        n: u8,
        len: u16,
    },
    /// Takes up to `n` used buffers with their lengths checked.
    Pop {
        n: u8,
    },
    /// Takes up to `n` used buffers' tokens (transmit reclaim).
    PopTokens {
        n: u8,
    },
    PopOne,
}

#[derive(Arbitrary, Debug)]
struct Input {
    packed: bool,
    size: u8,
    event_idx: bool,
    in_order: bool,
    ops: Vec<Op>,
}

struct Model {
    /// Token → posted length, for buffers in flight.
    in_flight: HashMap<u32, u32>,
}

impl Model {
    fn take(&mut self, token: u32, len: Option<u32>) {
        let posted = self.in_flight.remove(&token).unwrap_or_else(|| panic!("token {token} not in flight"));
        if let Some(len) = len {
            assert!(len <= posted, "token {token}: used length {len} > posted {posted}");
        }
    }
}

struct Sink<'a>(&'a mut Model, usize);
impl UsedSink for Sink<'_> {
    fn used(&mut self, token: u32, len: u32) {
        self.0.take(token, Some(len));
        self.1 += 1;
    }
}
impl TokenSink for Sink<'_> {
    fn token(&mut self, token: u32) {
        self.0.take(token, None);
        self.1 += 1;
    }
}

/// Writes `bytes` at `off` into `[area, area + len)`, clipped.
fn dev_write(area: u64, len: usize, off: u16, bytes: &[u8]) {
    let off = off as usize % len.max(1);
    let n = bytes.len().min(len - off);
    // SAFETY: `[area + off, area + off + n)` lies inside a ring area of an arena this
    // target owns (IOVA = VA in a fresh arena); the "device" may write it.
    unsafe { std::ptr::copy(bytes.as_ptr(), (area as *mut u8).add(off), n) };
}

fuzz_target!(|inp: Input| {
    if std::env::var_os("FUZZ_DEBUG").is_some() {
        eprintln!("{inp:#?}");
    }
    let arena = Arc::new(DmaArena::new(1 << 16, false).expect("arena"));
    let features = RingFeatures { event_idx: inp.event_idx, in_order: inp.in_order };
    let mut ring: AnyRing = if inp.packed {
        PackedRing::new(&arena, inp.size as u16 % 64 + 1, features).expect("packed ring").into()
    } else {
        DriverRing::new(&arena, 1 << (inp.size % 7), features).expect("split ring").into()
    };
    let addrs = ring.addrs();
    let size = match &ring {
        AnyRing::Split(r) => r.size(),
        AnyRing::Packed(r) => r.size(),
    };
    let (area0_len, area1_len) = if inp.packed {
        (driver::packed::desc_ring_bytes(size), driver::packed::EVENT_SIZE)
    } else {
        (driver::layout::used_bytes(size), driver::layout::used_bytes(size))
    };
    let (area0, area1) = if inp.packed { (addrs.desc, addrs.used) } else { (addrs.used, addrs.used) };
    let mut model = Model { in_flight: HashMap::new() };
    let mut next_token = 0u32;
    // Split: the device's view for `Complete`.
    let (mut dev_avail, mut dev_used) = (0u16, 0u16);
    for op in inp.ops.iter().take(256) {
        let res: Result<(), ()> = match op {
            Op::Post { len, writes } => {
                let t = next_token;
                let ok = match &mut ring {
                    AnyRing::Split(r) => r.post(0x1000, *len as u32, *writes, Some(t)),
                    AnyRing::Packed(r) => r.post(0x1000, *len as u32, *writes, Some(t)),
                };
                if ok.is_some() {
                    model.in_flight.insert(t, *len as u32);
                    next_token += 1;
                }
                Ok(())
            }
            Op::Chain { parts } => {
                let parts: Vec<(u64, u32, bool)> =
                    parts.iter().take(4).map(|&(l, w)| (0x2000, l as u32, w)).collect();
                if !parts.is_empty() {
                    let t = next_token;
                    if ring.post_chain(&parts, t).is_some() {
                        model.in_flight.insert(t, parts.iter().map(|p| p.1).sum());
                        next_token += 1;
                    }
                }
                Ok(())
            }
            Op::Publish => {
                ring.publish();
                Ok(())
            }
            Op::Device { area, off, bytes } => {
                if *area {
                    dev_write(area1, area1_len, *off, bytes)
                } else {
                    dev_write(area0, area0_len, *off, bytes)
                }
                Ok(())
            }
            Op::Complete { n, len } => {
                if let AnyRing::Split(_) = ring {
                    let mask = size - 1;
                    // SAFETY: the avail and used areas of this target's split ring
                    // (`avail_bytes`/`used_bytes` of its size), read and written as the
                    // device would.
                    unsafe {
                        let avail_idx = std::ptr::read_volatile((addrs.avail + 2) as *const u16);
                        let mut k = 0;
                        while k < *n && dev_avail != avail_idx {
                            let slot = (dev_avail & mask) as u64;
                            let head = std::ptr::read_volatile((addrs.avail + 4 + 2 * slot) as *const u16);
                            let e = (addrs.used + 4 + 8 * (dev_used & mask) as u64) as *mut u32;
                            std::ptr::write_volatile(e, head as u32);
                            std::ptr::write_volatile(e.add(1), *len as u32);
                            dev_avail = dev_avail.wrapping_add(1);
                            dev_used = dev_used.wrapping_add(1);
                            k += 1;
                        }
                        std::ptr::write_volatile((addrs.used + 2) as *mut u16, dev_used);
                    }
                }
                Ok(())
            }
            Op::Pop { n } => {
                let mut sink = Sink(&mut model, 0);
                match &mut ring {
                    AnyRing::Split(r) => r.poll_used().map_err(|_| ()).and_then(|avail| {
                        r.pop_used_burst(avail.min(*n as u16), &mut sink).map_err(|_| ()).map(|_| ())
                    }),
                    AnyRing::Packed(r) => r.poll_used().map_err(|_| ()).and_then(|avail| {
                        r.pop_used_burst(avail.min(*n as u16), &mut sink).map_err(|_| ()).map(|_| ())
                    }),
                }
            }
            Op::PopTokens { n } => {
                let mut sink = Sink(&mut model, 0);
                match &mut ring {
                    AnyRing::Split(r) => r.poll_used().map_err(|_| ()).and_then(|avail| {
                        r.pop_used_tokens(avail.min(*n as u16), &mut sink).map_err(|_| ()).map(|_| ())
                    }),
                    AnyRing::Packed(r) => r.poll_used().map_err(|_| ()).and_then(|avail| {
                        r.pop_used_tokens(avail.min(*n as u16), &mut sink).map_err(|_| ()).map(|_| ())
                    }),
                }
            }
            Op::PopOne => match ring.pop_one() {
                Ok(Some((t, len))) => {
                    model.take(t, Some(len));
                    Ok(())
                }
                Ok(None) => Ok(()),
                Err(_) => Err(()),
            },
        };
        if res.is_err() {
            // The device broke the protocol: the queue is reported broken and not used
            // again (the port resets the device).
            return;
        }
        let (free, held) = match &ring {
            AnyRing::Split(r) => (r.free_count(), r.in_flight()),
            AnyRing::Packed(r) => (r.free_count(), r.in_flight()),
        };
        assert!(free <= size);
        assert_eq!(held as usize, model.in_flight.len(), "buffers in flight");
    }
    // Close: every buffer still in flight comes back exactly once.
    let rest = match &mut ring {
        AnyRing::Split(r) => Ring::drain_in_flight(r),
        AnyRing::Packed(r) => Ring::drain_in_flight(r),
    };
    for t in rest {
        model.take(t, None);
    }
    assert!(model.in_flight.is_empty(), "drain missed {:?}", model.in_flight);
});
