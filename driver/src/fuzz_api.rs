//! Entry points for the fuzz targets in `tests/fuzz/` (feature `fuzzing` only; hidden
//! from the documentation, not an API).
//!
//! Owns: [`RxSession`], a receive queue (split or packed ring, any negotiated receive
//! offloads, mergeable buffers or not) over an in-process "device" that the fuzz target
//! plays: it completes posted buffers with any header and length, or writes anything at
//! all into the memory a device may write. After every step the session checks what the
//! driver promises: every buffer is free, posted or held by the application, exactly
//! once; a delivered frame lies inside its buffer; a header shown to the application is
//! one the device was allowed to write. A broken promise panics, which is how a fuzzer
//! reports it.
//! Must not: change the behaviour of the queue it wraps (it calls what an application
//! calls) or be used outside fuzzing.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::ctrl::{Control, ControlParams};
use crate::dma::DmaArena;
use crate::layout::{self, features as f, net_hdr, NET_HDR_LEN};
use crate::mempool::Mempool;
use crate::packed as p;
use crate::queue::{PairStats, RxMeta, RxQueue};
use crate::ring::{AnyRing, DriverRing, PackedRing, RingFeatures};
use crate::Packet;

/// Buffers in the session's pool.
const BUFFERS: u32 = 96;

/// A receive queue and the device side of its ring (see the module comment).
pub struct RxSession {
    rx: RxQueue,
    pool: Mempool,
    stopped: Arc<AtomicBool>,
    packed: bool,
    size: u16,
    /// Device addresses (= virtual addresses: a fresh arena maps IOVA = VA).
    desc: u64,
    avail: u64,
    used: u64,
    /// The device's position: split (avail index consumed, used index written), packed
    /// (ring position and wrap counter).
    dev_avail: u16,
    dev_used: u16,
    dev_wrap: bool,
    /// The arena's bounds (`[va, va + len)`): the only memory the device may write.
    arena: (u64, usize),
    /// What the application holds.
    held: Vec<Packet>,
    features: u64,
    /// Frames delivered so far.
    pub delivered: u64,
}

impl RxSession {
    /// A receive queue of `size` entries (split: a power of two up to 256; packed: up to
    /// 64) with `features` negotiated (receive offloads, `MRG_RXBUF`, `IN_ORDER`,
    /// `EVENT_IDX` are the ones that matter), its ring filled.
    pub fn new(packed: bool, size: u16, features: u64) -> RxSession {
        let arena = Arc::new(DmaArena::new(320 << 10, false).expect("arena"));
        let pool = Mempool::new(arena.clone(), BUFFERS, 2048 + 256, 256).expect("pool");
        let rf = RingFeatures::from_features(features);
        let ring: AnyRing = if packed {
            PackedRing::new(&arena, size.clamp(1, 64), rf).expect("packed ring").into()
        } else {
            DriverRing::new(&arena, 1 << (size.trailing_zeros().min(6)), rf).expect("split ring").into()
        };
        let a = ring.addrs();
        let size = match &ring {
            AnyRing::Split(r) => r.size(),
            AnyRing::Packed(r) => r.size(),
        };
        let stopped = Arc::new(AtomicBool::new(false));
        let control = Control::new(
            ControlParams {
                device: "fuzz".into(),
                features,
                virtio_user: true,
                timeout: Duration::from_millis(1),
                pairs: 1,
                active_pairs: 1,
            },
            None,
        );
        let mrg = features & f::bit(f::NET_MRG_RXBUF) != 0;
        let mut rx = RxQueue::with_merge(
            ring,
            pool.clone(),
            Arc::new(PairStats::default()),
            64,
            stopped.clone(),
            control,
            1500,
            mrg,
        );
        rx.refill();
        RxSession {
            rx,
            pool,
            stopped,
            packed,
            size,
            desc: a.desc,
            avail: a.avail,
            used: a.used,
            dev_avail: 0,
            dev_used: 0,
            dev_wrap: true,
            arena: (arena.va() as u64, arena.len()),
            held: Vec::new(),
            features,
            delivered: 0,
        }
    }

    /// The device area a raw write may target: 0 the used ring (split) or descriptor
    /// ring (packed), 1 the device's event suppression (packed) or used ring (split).
    fn area(&self, which: u8) -> (u64, usize) {
        match (self.packed, which % 2) {
            (false, _) => (self.used, layout::used_bytes(self.size)),
            (true, 0) => (self.desc, p::desc_ring_bytes(self.size)),
            (true, _) => (self.used, p::EVENT_SIZE),
        }
    }

    /// Writes `bytes` at `off` into device area `which` (clipped): anything a device may
    /// write there.
    pub fn device_write(&self, which: u8, off: u16, bytes: &[u8]) {
        let (a, len) = self.area(which);
        let off = off as usize % len.max(1);
        let n = bytes.len().min(len - off);
        // SAFETY: `[a + off, a + off + n)` lies inside a ring area of this session's
        // arena (IOVA = VA); the device may write it (volatile-free bytes: the driver
        // reads it with volatile loads, never through a reference).
        unsafe { std::ptr::copy(bytes.as_ptr(), (a as *mut u8).add(off), n) };
    }

    /// A device that follows the protocol for up to `n` posted buffers: writes `hdr`
    /// (its first 12 bytes, zero-padded) and `len` bytes (header included, any value)
    /// into each and completes it. Returns how many it completed.
    pub fn complete(&mut self, n: u8, hdr: &[u8], len: u32) -> u16 {
        let mut h = [0u8; NET_HDR_LEN];
        let k = hdr.len().min(NET_HDR_LEN);
        h[..k].copy_from_slice(&hdr[..k]);
        let mut done = 0;
        for _ in 0..n {
            let ok = if self.packed { self.complete_packed(&h, len) } else { self.complete_split(&h, len) };
            if !ok {
                break;
            }
            done += 1;
        }
        done
    }

    /// Writes the header into the buffer `(addr, posted)`, if that lies in the arena (a
    /// packed descriptor the fuzzer overwrote may point anywhere: a device cannot write
    /// outside the memory it was given, so neither does this one).
    fn write_hdr(&self, addr: u64, posted: u32, h: &[u8; NET_HDR_LEN]) {
        let n = (posted as usize).min(NET_HDR_LEN) as u64;
        let (va, len) = self.arena;
        if addr < va || addr.saturating_add(n) > va + len as u64 {
            return;
        }
        // SAFETY: `addr .. + n` lies inside this session's arena (checked above), memory
        // the device shares; nothing holds a reference into it.
        unsafe { std::ptr::copy(h.as_ptr(), addr as *mut u8, n as usize) };
    }

    fn complete_split(&mut self, h: &[u8; NET_HDR_LEN], len: u32) -> bool {
        let mask = self.size - 1;
        // SAFETY: the driver area's index field (a u16 at offset 2, aligned).
        let avail_idx = unsafe { std::ptr::read_volatile((self.avail + 2) as *const u16) };
        if avail_idx == self.dev_avail {
            return false;
        }
        let slot = (self.dev_avail & mask) as u64;
        // SAFETY: avail entry `slot < size`, inside the driver area.
        let head = unsafe { std::ptr::read_volatile((self.avail + 4 + 2 * slot) as *const u16) };
        if head >= self.size {
            return false;
        }
        // SAFETY: descriptor `head < size` of the table (16-byte entries).
        let (addr, posted) = unsafe {
            let d = (self.desc + 16 * head as u64) as *const u8;
            (std::ptr::read_volatile(d as *const u64), std::ptr::read_volatile(d.add(8) as *const u32))
        };
        self.write_hdr(addr, posted, h);
        let e = self.used + 4 + 8 * (self.dev_used & mask) as u64;
        // SAFETY: used element `dev_used & mask < size` inside the device area, then its
        // index field; the release store publishes the element (as a device does).
        unsafe {
            std::ptr::write_volatile(e as *mut u32, head as u32);
            std::ptr::write_volatile((e + 4) as *mut u32, len);
            self.dev_avail = self.dev_avail.wrapping_add(1);
            self.dev_used = self.dev_used.wrapping_add(1);
            std::sync::atomic::AtomicU16::from_ptr((self.used + 2) as *mut u16)
                .store(self.dev_used, Ordering::Release);
        }
        true
    }

    fn complete_packed(&mut self, h: &[u8; NET_HDR_LEN], len: u32) -> bool {
        let d = self.desc + 16 * self.dev_used as u64;
        // SAFETY: descriptor `dev_used < size` of the ring; its flags (offset 14) are
        // loaded with acquire, as a device does before it reads the rest.
        let flags =
            unsafe { std::sync::atomic::AtomicU16::from_ptr((d + 14) as *mut u16).load(Ordering::Acquire) };
        if !p::is_avail(flags, self.dev_wrap) {
            return false;
        }
        // SAFETY: the same descriptor: address and length.
        let (addr, posted) = unsafe {
            (std::ptr::read_volatile(d as *const u64), std::ptr::read_volatile((d + 8) as *const u32))
        };
        self.write_hdr(addr, posted, h);
        // SAFETY: the same descriptor: length, then the flags with release (the id the
        // driver wrote stays: receive buffers are single descriptors).
        unsafe {
            std::ptr::write_volatile((d + 8) as *mut u32, len);
            std::sync::atomic::AtomicU16::from_ptr((d + 14) as *mut u16)
                .store(p::used_flags(self.dev_wrap), Ordering::Release);
        }
        self.dev_used += 1;
        if self.dev_used == self.size {
            self.dev_used = 0;
            self.dev_wrap = !self.dev_wrap;
        }
        true
    }

    /// An application's burst: up to `max` frames, with their headers (`meta`) or not;
    /// keeps them (`keep`, up to a few dozen) or drops them at once. Checks every
    /// delivered frame and header, and the buffer accounting.
    pub fn rx(&mut self, max: u8, meta: bool, keep: bool) -> usize {
        let mut batch = Vec::with_capacity(64);
        let mut metas = Vec::with_capacity(64);
        let max = (max as usize).min(64);
        let n = if meta {
            self.rx.rx_burst_meta(&mut batch, &mut metas, max)
        } else {
            self.rx.rx_burst(&mut batch, max)
        };
        assert_eq!(n, batch.len());
        if meta {
            assert_eq!(metas.len(), n);
        }
        for (i, pkt) in batch.iter().enumerate() {
            // A merged frame is a chain: its length is the whole chain's.
            let len = pkt.total_len();
            assert!(pkt.len() <= len && len <= crate::queue::MAX_MERGED_FRAME, "frame of {len} bytes");
            if let Some(m) = metas.get(i) {
                self.check_meta(m, len);
            }
        }
        self.delivered += n as u64;
        if keep && self.held.len() < 48 {
            self.held.extend(batch);
        } else {
            drop(batch);
        }
        self.check();
        n
    }

    /// Gives back what the application holds.
    pub fn release(&mut self) {
        self.held.clear();
        self.check();
    }

    fn check_meta(&self, m: &RxMeta, frame: usize) {
        let csum = self.features & f::bit(f::NET_GUEST_CSUM) != 0;
        assert!(m.flags & !(net_hdr::F_NEEDS_CSUM | net_hdr::F_DATA_VALID) == 0, "{m:?}");
        assert!(m.flags == 0 || csum, "checksum flags without GUEST_CSUM: {m:?}");
        if m.needs_csum() {
            assert!(m.csum_start as usize + m.csum_offset as usize + 2 <= frame, "{m:?} for {frame} bytes");
        }
        if m.is_gso() {
            assert!(m.gso_size > 0 && m.hdr_len as usize <= frame, "{m:?} for {frame} bytes");
        }
    }

    /// Every buffer is free, posted or held, exactly once.
    fn check(&self) {
        let held: usize = self.held.iter().map(|p| p.nb_segs()).sum();
        let posted = self.rx.in_flight() as usize;
        let free = self.pool.available() as usize;
        assert_eq!(free + posted + held, BUFFERS as usize, "free {free} + posted {posted} + held {held}");
    }

    /// The queue's error, if the device broke the protocol.
    pub fn broken(&self) -> bool {
        self.rx.error().is_some()
    }

    /// Ends the session as a port's close does: the device is stopped, every buffer
    /// comes back exactly once.
    pub fn close(self) {
        let RxSession { rx, pool, stopped, held, .. } = self;
        drop(held);
        stopped.store(true, Ordering::Release);
        drop(rx);
        assert_eq!(pool.available(), BUFFERS, "buffers lost or doubled at close");
    }
}
