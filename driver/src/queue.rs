//! Receive and transmit queues: the data path an application calls.
//!
//! Owns: one receive ring with its batched refill from the pool, one transmit ring with
//! its batched completion reclaim, their statistics, and the virtio-net header handling
//! (written in the 12 bytes before the packet data, so a packet is one descriptor).
//! Must not: talk to the transport (kicks go through the ring's `Notifier`) or allocate.
//!
//! Each half is `Send` and used through `&mut self`, so the receive and transmit sides of
//! a pair can run on different threads without locks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::DeviceError;
use crate::layout::NET_HDR_LEN;
use crate::mempool::{Mempool, Packet};
use crate::ring::DriverRing;

/// Most buffers refilled or reclaimed per step (bounds the stack scratch space).
const BATCH: usize = 64;

/// Counters of one receive queue (single writer: its queue; readers anywhere).
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct RxStats {
    /// Packets delivered by `rx_burst`.
    pub packets: AtomicU64,
    /// Their bytes (without the virtio-net header).
    pub bytes: AtomicU64,
    /// Buffers the device returned too short to hold a header (recycled).
    pub errors: AtomicU64,
    /// Refills that found the pool empty.
    pub nombuf: AtomicU64,
    /// Protocol violations by the device (the queue stopped).
    pub device_errors: AtomicU64,
}

/// Counters of one transmit queue.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct TxStats {
    /// Packets queued to the device.
    pub packets: AtomicU64,
    /// Their bytes.
    pub bytes: AtomicU64,
    /// Packets `tx_burst` handed back because the ring was full.
    pub full: AtomicU64,
    /// Packets from another port's memory, copied into this port's buffers.
    pub copied: AtomicU64,
    /// Such packets dropped because this port's pool was empty (or its buffers too small).
    pub nobuf: AtomicU64,
    /// Protocol violations by the device (the queue stopped).
    pub device_errors: AtomicU64,
}

/// A plain copy of one queue pair's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueStatsSnapshot {
    /// Packets received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Receive errors.
    pub rx_errors: u64,
    /// Refills without buffers.
    pub rx_nombuf: u64,
    /// Packets transmitted.
    pub tx_packets: u64,
    /// Bytes transmitted.
    pub tx_bytes: u64,
    /// Packets returned to the caller because the ring was full.
    pub tx_full: u64,
    /// Packets copied in from another port's memory.
    pub tx_copied: u64,
    /// Packets dropped because no buffer was free to copy them into.
    pub tx_nobuf: u64,
    /// Device protocol violations seen on either queue.
    pub device_errors: u64,
}

/// Both halves' counters, shared with the port for reporting.
#[derive(Debug, Default)]
pub struct PairStats {
    /// Receive side.
    pub rx: RxStats,
    /// Transmit side.
    pub tx: TxStats,
}

impl PairStats {
    /// A snapshot.
    pub fn snapshot(&self) -> QueueStatsSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        QueueStatsSnapshot {
            rx_packets: l(&self.rx.packets),
            rx_bytes: l(&self.rx.bytes),
            rx_errors: l(&self.rx.errors),
            rx_nombuf: l(&self.rx.nombuf),
            tx_packets: l(&self.tx.packets),
            tx_bytes: l(&self.tx.bytes),
            tx_full: l(&self.tx.full),
            tx_copied: l(&self.tx.copied),
            tx_nobuf: l(&self.tx.nobuf),
            device_errors: l(&self.rx.device_errors) + l(&self.tx.device_errors),
        }
    }
}

/// Adds `v` to a counter only this thread writes (a relaxed load and store: no RMW).
#[inline]
fn bump(c: &AtomicU64, v: u64) {
    if v != 0 {
        c.store(c.load(Ordering::Relaxed) + v, Ordering::Relaxed);
    }
}

/// Set once the device has been reset: only then may in-flight buffers return to the
/// pool (before, the device could still write into them).
pub(crate) type Stopped = Arc<AtomicBool>;

/// The receive half of a queue pair.
pub struct RxQueue {
    ring: DriverRing,
    pool: Mempool,
    stats: Arc<PairStats>,
    /// Bytes posted per buffer: header plus data room minus reserved tailroom.
    post_len: u32,
    headroom: u16,
    error: Option<DeviceError>,
    stopped: Stopped,
}

impl RxQueue {
    pub(crate) fn new(
        ring: DriverRing,
        pool: Mempool,
        stats: Arc<PairStats>,
        tailroom: u16,
        stopped: Stopped,
    ) -> Self {
        let headroom = pool.headroom();
        let post_len = pool.buf_size() - headroom as u32 - tailroom as u32 + NET_HDR_LEN as u32;
        RxQueue { ring, pool, stats, post_len, headroom, error: None, stopped }
    }

    /// Posts free buffers until the ring is full or the pool is empty (one pool lock and
    /// one avail publish per batch).
    pub(crate) fn refill(&mut self) {
        let mut idx = [0u32; BATCH];
        while self.ring.free_count() > 0 {
            let want = (self.ring.free_count() as usize).min(BATCH);
            let got = self.pool.take_indices(&mut idx[..want]);
            for &i in &idx[..got] {
                let (_, iova) = self.pool.buf(i);
                let addr = iova + self.headroom as u64 - NET_HDR_LEN as u64;
                self.ring.post(addr, self.post_len, true, Some(i));
            }
            if got < want {
                bump(&self.stats.rx.nombuf, 1);
                break;
            }
        }
        self.ring.publish();
    }

    /// Appends up to `max` received packets to `batch` (which should have the capacity:
    /// then nothing allocates) and refills the ring. Returns how many were appended.
    /// After a device error the queue is stopped and returns 0; see [`error`](Self::error).
    pub fn rx_burst(&mut self, batch: &mut Vec<Packet>, max: usize) -> usize {
        if self.error.is_some() {
            return 0;
        }
        let n = match self.ring.poll_used() {
            Ok(n) => (n as usize).min(max),
            Err(e) => return self.fail(e),
        };
        let (mut got, mut bytes, mut errors) = (0usize, 0u64, 0u64);
        let mut recycle = [0u32; BATCH];
        let mut nrec = 0;
        for _ in 0..n {
            let (idx, len) = match self.ring.pop_used() {
                Ok(x) => x,
                Err(e) => {
                    self.fail(e);
                    break;
                }
            };
            if (len as usize) < NET_HDR_LEN {
                errors += 1;
                recycle[nrec] = idx;
                nrec += 1;
                if nrec == BATCH {
                    self.pool.put_indices(&recycle[..nrec]);
                    nrec = 0;
                }
                continue;
            }
            let data_len = len - NET_HDR_LEN as u32;
            batch.push(self.pool.packet(idx, self.headroom, data_len as u16));
            got += 1;
            bytes += data_len as u64;
        }
        self.pool.put_indices(&recycle[..nrec]);
        bump(&self.stats.rx.packets, got as u64);
        bump(&self.stats.rx.bytes, bytes);
        bump(&self.stats.rx.errors, errors);
        if self.error.is_none() && n > 0 {
            self.refill();
        }
        got
    }

    fn fail(&mut self, e: DeviceError) -> usize {
        log::error!("receive queue stopped: {e}");
        self.error = Some(e);
        bump(&self.stats.rx.device_errors, 1);
        0
    }

    /// The device error that stopped this queue, if any.
    pub fn error(&self) -> Option<DeviceError> {
        self.error
    }
    /// Buffers the device holds.
    pub fn in_flight(&self) -> u16 {
        self.ring.in_flight()
    }
}

impl Drop for RxQueue {
    fn drop(&mut self) {
        if !self.stopped.load(Ordering::Acquire) {
            // The device may still write into posted buffers: they are not reused.
            return;
        }
        let idx: Vec<u32> = self.ring.drain_in_flight().collect();
        self.pool.put_indices(&idx);
    }
}

/// The transmit half of a queue pair.
pub struct TxQueue {
    ring: DriverRing,
    pool: Mempool,
    stats: Arc<PairStats>,
    /// The packet each in-flight descriptor carries, by descriptor token.
    inflight: Box<[Option<Packet>]>,
    error: Option<DeviceError>,
    stopped: Stopped,
}

impl TxQueue {
    pub(crate) fn new(ring: DriverRing, pool: Mempool, stats: Arc<PairStats>, stopped: Stopped) -> Self {
        let inflight = (0..ring.size()).map(|_| None).collect();
        TxQueue { ring, pool, stats, inflight, error: None, stopped }
    }

    /// Reclaims buffers the device has finished with (in one batch per pool lock);
    /// returns how many.
    pub fn reclaim(&mut self) -> usize {
        if self.error.is_some() {
            return 0;
        }
        let n = match self.ring.poll_used() {
            Ok(n) => n as usize,
            Err(e) => {
                self.fail(e);
                return 0;
            }
        };
        let mut own = [0u32; BATCH];
        let mut nown = 0;
        let mut done = 0;
        for _ in 0..n {
            let token = match self.ring.pop_used() {
                Ok((t, _)) => t,
                Err(e) => {
                    self.fail(e);
                    break;
                }
            };
            done += 1;
            let Some(p) = self.inflight[token as usize].take() else { continue };
            if self.pool.owns(&p) {
                own[nown] = p.into_raw().0;
                nown += 1;
                if nown == BATCH {
                    self.pool.put_indices(&own);
                    nown = 0;
                }
            } else {
                drop(p); // back to the pool it came from
            }
        }
        self.pool.put_indices(&own[..nown]);
        done
    }

    /// Queues packets from the front of `pkts` for transmission, as many as the ring has
    /// room for, with one avail publish and at most one kick. The packets it could not
    /// queue stay in `pkts`. Returns how many it took (queued, or dropped and counted in
    /// `tx_nobuf` when a packet from another port's memory found no buffer to be copied
    /// into). Packets from this port's pool go out without a copy.
    pub fn tx_burst(&mut self, pkts: &mut Vec<Packet>) -> usize {
        self.reclaim();
        if self.error.is_some() {
            return 0;
        }
        let k = pkts.len().min(self.ring.free_count() as usize);
        let mut bytes = 0u64;
        let (mut copied, mut sent) = (0u64, 0usize);
        for p in pkts.drain(..k) {
            // A buffer from another port's arena is not in this device's memory (the
            // device could not reach it): copy it into one of ours.
            let p = if self.pool.reaches(&p) {
                p
            } else {
                let own = self.pool.alloc().and_then(|mut own| own.set_data(p.data()).ok().map(|_| own));
                match own {
                    Some(own) => {
                        copied += 1;
                        own
                    }
                    None => {
                        bump(&self.stats.tx.nobuf, 1);
                        continue; // dropped: no buffer here to carry it
                    }
                }
            };
            let (hdr, iova) = p.header_slot();
            // SAFETY: the 12 bytes before the data are this packet's header slot (the
            // pool keeps `off >= NET_HDR_LEN`); the packet is ours until posted.
            unsafe { std::ptr::write_bytes(hdr, 0, NET_HDR_LEN) };
            let len = p.len() as u32 + NET_HDR_LEN as u32;
            bytes += p.len() as u64;
            // The descriptor id is the token: the packet waits in `inflight[id]`.
            let Some(id) = self.ring.post(iova, len, false, None) else {
                unreachable!("free descriptors were counted above")
            };
            self.inflight[id as usize] = Some(p);
            sent += 1;
        }
        self.ring.publish();
        bump(&self.stats.tx.packets, sent as u64);
        bump(&self.stats.tx.copied, copied);
        bump(&self.stats.tx.bytes, bytes);
        bump(&self.stats.tx.full, pkts.len() as u64);
        k
    }

    fn fail(&mut self, e: DeviceError) {
        log::error!("transmit queue stopped: {e}");
        self.error = Some(e);
        bump(&self.stats.tx.device_errors, 1);
    }

    /// The device error that stopped this queue, if any.
    pub fn error(&self) -> Option<DeviceError> {
        self.error
    }
    /// Packets the device holds.
    pub fn in_flight(&self) -> u16 {
        self.ring.in_flight()
    }
}

impl Drop for TxQueue {
    fn drop(&mut self) {
        if !self.stopped.load(Ordering::Acquire) {
            // The device may still read these buffers: leak them rather than reuse them.
            for p in self.inflight.iter_mut().filter_map(Option::take) {
                std::mem::forget(p);
            }
        }
        // Otherwise dropping `inflight` returns every packet to its pool.
    }
}

/// The two halves of one queue pair (virtio queues `2i` and `2i + 1`).
pub struct QueuePair {
    /// Queue pair index.
    pub index: u16,
    /// Receive half.
    pub rx: RxQueue,
    /// Transmit half.
    pub tx: TxQueue,
}
