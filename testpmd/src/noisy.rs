//! The `noisy` forwarding mode (DPDK testpmd's noisy VNF): frames are forwarded as `io`
//! forwards them, after a simulated per-packet workload and through a per-stream FIFO
//! that holds them back, like a VNF that buffers and touches memory.
//!
//! Owns: the `--noisy-*` settings, the lookup memory of one forwarding thread and its
//! random reads and writes, and the FIFO policy: a burst goes into the stream's FIFO
//! (`--noisy-tx-sw-buffer-size` frames; 0: no FIFO, sent at once); when it does not fit,
//! the oldest frames are sent first to make room; the whole FIFO is sent once
//! `--noisy-tx-sw-buffer-flushtime` ms passed since the last flush (0: every burst).
//! Frames the transmit ring has no room for are dropped and counted, as DPDK's are.
//! Must not: allocate on the data path (the FIFO's room and the memory are taken at
//! start) or read the clock when the FIFO is empty. Frames sent in this mode are not
//! shown by `set verbose 2` nor captured on transmit (received ones are).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use driver::Packet;

/// `--noisy-*` settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NoisyCfg {
    /// Frames the FIFO holds (0: none).
    pub bufsz: usize,
    /// Milliseconds after which the FIFO is flushed (0: every burst).
    pub flush_ms: u64,
    /// Megabytes of lookup memory per forwarding thread.
    pub lkup_mb: usize,
    /// Random writes per packet.
    pub writes: u32,
    /// Random reads per packet.
    pub reads: u32,
    /// Random read-modify-writes per packet.
    pub reads_writes: u32,
}

/// A stream's FIFO.
#[derive(Default)]
pub struct Fifo {
    q: VecDeque<Packet>,
    last_flush: Option<Instant>,
}

impl Fifo {
    /// Takes the room for `n` frames (at start, off the data path).
    pub fn reserve(&mut self, n: usize) {
        self.q.reserve(n.saturating_sub(self.q.capacity()));
    }
}

/// One forwarding thread's noisy state.
pub struct Noisy {
    cfg: NoisyCfg,
    mem: Vec<u64>,
    rng: u64,
    /// Frames on their way from the FIFO to `tx_burst` (sized once).
    out: Vec<Packet>,
    sink: u64,
}

impl Noisy {
    /// State for `cfg`, frames of bursts up to `burst`.
    pub fn new(cfg: NoisyCfg, burst: usize) -> Noisy {
        let words = cfg.lkup_mb * (1 << 20) / 8;
        Noisy {
            cfg,
            mem: vec![0; words],
            rng: 0x9e37_79b9_7f4a_7c15,
            out: Vec::with_capacity(burst.max(cfg.bufsz)),
            sink: 0,
        }
    }

    fn next(&mut self) -> usize {
        // xorshift64
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng as usize
    }

    /// The simulated per-packet work for `n` packets.
    pub fn lookups(&mut self, n: usize) {
        if self.mem.is_empty() {
            return;
        }
        let len = self.mem.len();
        for _ in 0..n {
            for _ in 0..self.cfg.writes {
                let i = self.next() % len;
                self.mem[i] = self.rng;
            }
            for _ in 0..self.cfg.reads {
                let i = self.next() % len;
                self.sink = self.sink.wrapping_add(self.mem[i]);
            }
            for _ in 0..self.cfg.reads_writes {
                let i = self.next() % len;
                self.mem[i] = self.mem[i].wrapping_add(1);
            }
        }
        std::hint::black_box(self.sink);
    }

    /// Takes `batch` (emptied) into `fifo`, sending what must go out with `send`
    /// (which returns how many of the frames it was given it queued); returns (sent,
    /// dropped).
    pub fn enqueue(
        &mut self,
        fifo: &mut Fifo,
        batch: &mut Vec<Packet>,
        send: &mut dyn FnMut(&mut Vec<Packet>) -> usize,
    ) -> (u64, u64) {
        self.lookups(batch.len());
        if self.cfg.bufsz == 0 {
            let sent = send(batch);
            let dropped = batch.len();
            driver::free_bulk(batch);
            return (sent as u64, dropped as u64);
        }
        let (mut sent, mut dropped) = (0, 0);
        let room = self.cfg.bufsz - fifo.q.len();
        if batch.len() > room {
            let k = (batch.len() - room).min(fifo.q.len());
            self.out.extend(fifo.q.drain(..k));
            sent += send(&mut self.out) as u64;
            dropped += self.out.len() as u64;
            driver::free_bulk(&mut self.out);
        }
        // Still too many (a burst larger than the FIFO): the rest goes out at once.
        let fit = self.cfg.bufsz - fifo.q.len();
        if batch.len() > fit {
            self.out.extend(batch.drain(fit..));
            sent += send(&mut self.out) as u64;
            dropped += self.out.len() as u64;
            driver::free_bulk(&mut self.out);
        }
        fifo.q.extend(batch.drain(..));
        (sent, dropped)
    }

    /// Sends the whole FIFO now (at stop); returns (sent, dropped).
    pub fn flush_all(
        &mut self,
        fifo: &mut Fifo,
        burst: usize,
        send: &mut dyn FnMut(&mut Vec<Packet>) -> usize,
    ) -> (u64, u64) {
        fifo.last_flush = None;
        let (mut sent, mut dropped) = (0, 0);
        while !fifo.q.is_empty() {
            let k = fifo.q.len().min(burst.max(1));
            self.out.extend(fifo.q.drain(..k));
            sent += send(&mut self.out) as u64;
            dropped += self.out.len() as u64;
            driver::free_bulk(&mut self.out);
        }
        (sent, dropped)
    }

    /// Sends the whole FIFO if the flush time passed; returns (sent, dropped).
    pub fn flush(
        &mut self,
        fifo: &mut Fifo,
        burst: usize,
        send: &mut dyn FnMut(&mut Vec<Packet>) -> usize,
    ) -> (u64, u64) {
        if fifo.q.is_empty() {
            return (0, 0);
        }
        let now = Instant::now();
        let last = *fifo.last_flush.get_or_insert(now);
        if now.duration_since(last) < Duration::from_millis(self.cfg.flush_ms) {
            return (0, 0);
        }
        let r = self.flush_all(fifo, burst, send);
        fifo.last_flush = Some(now);
        r
    }
}
