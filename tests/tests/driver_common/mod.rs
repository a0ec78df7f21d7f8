//! Helpers shared by `driver_backend.rs` and `driver_dpdk.rs` (our driver, `vnet-driver`,
//! in the test process against a peer process): test frames, a burst sender that
//! retries what `tx_burst` hands back, and bounded waits around calls that talk to the
//! peer (so a peer that never answers fails the test instead of hanging it).
#![allow(dead_code)]

use std::time::{Duration, Instant};

use driver::{Mempool, Packet, Port, PortConfig, QueuePair, TxQueue};

/// Source MAC of our test frames (locally administered).
pub const SRC_MAC: [u8; 6] = [0x02, 0x76, 0x6e, 0x65, 0x74, 0x01];
/// Destination MAC of our test frames.
pub const DST_MAC: [u8; 6] = [0x02, 0x76, 0x6e, 0x65, 0x74, 0x02];
/// Magic before the sequence number in our frames (offset 42, after Eth/IPv4/UDP).
pub const MAGIC: [u8; 4] = *b"DRVT";
/// Offset of [`MAGIC`]; the 8-byte little-endian sequence number follows it.
pub const SEQ_OFFSET: usize = 14 + 20 + 8;
/// Frames per `tx_burst` / `rx_burst`.
pub const BURST: usize = 32;

/// The length of test frame `seq`: spread over 60..=1514 (a stride coprime to 1455, so
/// every length occurs).
pub fn frame_len(seq: u64) -> usize {
    60 + (seq.wrapping_mul(7919) % 1455) as usize
}

/// The IPv4 header checksum (RFC 791) of `hdr`; 0 for a header with a valid checksum.
pub fn ipv4_checksum(hdr: &[u8]) -> u16 {
    let mut sum: u32 =
        hdr.chunks(2).map(|w| u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u32).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Writes test frame `seq` into `buf` (resized to [`frame_len`]): a valid UDP/IPv4 frame
/// from [`SRC_MAC`] 10.0.0.1:1024 to [`DST_MAC`] 10.0.0.2:1025 whose payload is
/// [`MAGIC`], `seq` (little-endian u64) and then bytes that depend on `seq`, so no two
/// frames are alike.
pub fn write_frame(buf: &mut Vec<u8>, seq: u64) {
    let len = frame_len(seq);
    buf.clear();
    buf.resize(len, 0);
    buf[0..6].copy_from_slice(&DST_MAC);
    buf[6..12].copy_from_slice(&SRC_MAC);
    buf[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (len - 14) as u16;
    {
        let ip = &mut buf[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[4..6].copy_from_slice(&(seq as u16).to_be_bytes()); // identification
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let csum = ipv4_checksum(ip);
        ip[10..12].copy_from_slice(&csum.to_be_bytes());
    }
    buf[34..36].copy_from_slice(&1024u16.to_be_bytes());
    buf[36..38].copy_from_slice(&1025u16.to_be_bytes());
    buf[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    buf[SEQ_OFFSET..SEQ_OFFSET + 4].copy_from_slice(&MAGIC);
    buf[SEQ_OFFSET + 4..SEQ_OFFSET + 12].copy_from_slice(&seq.to_le_bytes());
    let salt = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for (i, b) in buf[SEQ_OFFSET + 12..].iter_mut().enumerate() {
        *b = (salt >> ((i % 8) * 8)) as u8 ^ i as u8;
    }
}

/// The frame [`write_frame`] makes for `seq`, as a new vector.
pub fn frame(seq: u64) -> Vec<u8> {
    let mut v = Vec::new();
    write_frame(&mut v, seq);
    v
}

/// The sequence number of one of our frames, if it is one.
pub fn seq_of(frame: &[u8]) -> Option<u64> {
    if frame.len() < SEQ_OFFSET + 12 || frame[SEQ_OFFSET..SEQ_OFFSET + 4] != MAGIC {
        return None;
    }
    Some(u64::from_le_bytes(frame[SEQ_OFFSET + 4..SEQ_OFFSET + 12].try_into().unwrap()))
}

/// Sends frames `0..total` (from [`write_frame`]) through a transmit queue in bursts,
/// keeping what `tx_burst` hands back for the next call.
pub struct Sender {
    /// Next sequence number to allocate a packet for.
    pub next: u64,
    /// Frames `tx_burst` accepted.
    pub queued: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Frames to send in all.
    pub total: u64,
    /// Times `tx_burst` handed back part of a burst (ring full).
    pub handed_back: u64,
    /// Times the pool had no buffer.
    pub pool_empty: u64,
    pending: Vec<Packet>,
    buf: Vec<u8>,
}

impl Sender {
    /// A sender of frames `0..total`.
    pub fn new(total: u64) -> Sender {
        Sender {
            next: 0,
            queued: 0,
            bytes: 0,
            total,
            handed_back: 0,
            pool_empty: 0,
            pending: Vec::with_capacity(BURST),
            buf: Vec::with_capacity(2048),
        }
    }

    /// Whether every frame was queued.
    pub fn done(&self) -> bool {
        self.queued == self.total
    }

    /// Tops the pending burst up from `pool` and offers it to `tx`; returns how many
    /// frames the queue accepted this time.
    pub fn pump(&mut self, pool: &Mempool, tx: &mut TxQueue) -> usize {
        while self.pending.len() < BURST && self.next < self.total {
            let Some(mut p) = pool.alloc() else {
                self.pool_empty += 1;
                break;
            };
            write_frame(&mut self.buf, self.next);
            p.set_data(&self.buf).expect("a test frame fits a pool buffer");
            self.pending.push(p);
            self.next += 1;
        }
        if self.pending.is_empty() {
            return 0;
        }
        let before: u64 = self.pending.iter().map(|p| p.len() as u64).sum();
        let k = tx.tx_burst(&mut self.pending);
        let after: u64 = self.pending.iter().map(|p| p.len() as u64).sum();
        if !self.pending.is_empty() {
            self.handed_back += 1;
        }
        self.queued += k as u64;
        self.bytes += before - after;
        k
    }

    /// Pumps until every frame is queued; panics after `deadline`.
    pub fn send_all(&mut self, pool: &Mempool, tx: &mut TxQueue, deadline: Instant) {
        while !self.done() {
            if self.pump(pool, tx) == 0 {
                assert!(
                    Instant::now() < deadline,
                    "only {} of {} frames queued before the deadline (tx error: {:?}, in flight {}, \
                     pool free {})",
                    self.queued,
                    self.total,
                    tx.error(),
                    tx.in_flight(),
                    pool.available()
                );
                std::hint::spin_loop();
            }
        }
    }

    /// The total bytes of frames `0..total`.
    pub fn total_bytes(total: u64) -> u64 {
        (0..total).map(|s| frame_len(s) as u64).sum()
    }
}

/// Reclaims until the device has completed every transmitted packet; panics after
/// `deadline`.
pub fn drain_tx(tx: &mut TxQueue, deadline: Instant) {
    loop {
        tx.reclaim();
        if tx.in_flight() == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the device still holds {} transmitted packets at the deadline (tx error: {:?})",
            tx.in_flight(),
            tx.error()
        );
        std::hint::spin_loop();
    }
}

pub use vnet_tests::harness::within;

/// `Port::open` with a 20 s bound.
pub fn open(cfg: PortConfig) -> driver::Result<Port> {
    within("Port::open", Duration::from_secs(20), move || Port::open(cfg))
}

/// `Port::close` with a 20 s bound; returns the pool's (available, capacity) afterwards.
pub fn close(port: Port, pairs: Vec<QueuePair>) -> (u32, u32) {
    let pool = port.pool().clone();
    within("Port::close", Duration::from_secs(20), move || port.close(pairs))
        .unwrap_or_else(|e| panic!("Port::close: {e}"));
    (pool.available(), pool.capacity())
}
