//! The counters of a queue pair: what each half counts, the snapshot the port reports,
//! and the single-writer increment the data path uses.
//!
//! Owns: [`RxStats`], [`TxStats`] (one cache line each, written only by their queue's
//! thread), [`PairStats`] (both, shared with the port) and [`QueueStatsSnapshot`].
//! Must not: take locks or use read-modify-write atomics on the data path (`bump` is a
//! relaxed load and store: each counter has one writer).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of one receive queue (single writer: its queue; readers anywhere).
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct RxStats {
    /// Frames received from the device (delivered by `rx_burst`; with an XDP program
    /// attached, every frame it saw or could not see: the `xdp_*` counters add up to it).
    pub packets: AtomicU64,
    /// Their bytes (without the virtio-net header), as received.
    pub bytes: AtomicU64,
    /// XDP verdicts: Pass.
    pub xdp_pass: AtomicU64,
    /// XDP verdicts: Drop.
    pub xdp_drop: AtomicU64,
    /// XDP verdicts: Tx (queued in `XdpOut::tx`).
    pub xdp_tx: AtomicU64,
    /// XDP verdicts: Redirect (queued in `XdpOut::redirect`).
    pub xdp_redirect: AtomicU64,
    /// Frames dropped without a verdict taking effect: super-frames the program cannot
    /// see whole, a full `XdpOut` vector, a redirect target out of range.
    pub xdp_aborted: AtomicU64,
    /// Buffers the device returned too short to hold a header (recycled).
    pub errors: AtomicU64,
    /// Frames longer than the queue's MTU allows ([`RxQueue::set_mtu`](crate::RxQueue::set_mtu)),
    /// dropped (recycled).
    pub too_long: AtomicU64,
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
    /// Packets refused and dropped (not sent): a transmit offload request the port did
    /// not negotiate or whose offsets fall outside the frame, a chain of more segments
    /// than one packet may take (DPDK's `tx_prepare` refusals, counted as `oerrors`).
    pub errors: AtomicU64,
    /// Protocol violations by the device (the queue stopped).
    pub device_errors: AtomicU64,
    /// Packets the device held when it went away (a back-end that restarted or died):
    /// freed when the ring was reset for the next device; sent or not, never sent again.
    pub lost: AtomicU64,
}

/// A plain copy of one queue pair's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct QueueStatsSnapshot {
    /// Packets received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Receive errors (`rx_too_long` included).
    pub rx_errors: u64,
    /// Frames dropped for being longer than the queue's MTU allows.
    pub rx_too_long: u64,
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
    /// Packets refused and dropped: a bad or unnegotiated offload request, a chain too
    /// long.
    pub tx_errors: u64,
    /// Packets the device held when it went away (freed at the ring's reset).
    pub tx_lost: u64,
    /// Device protocol violations seen on either queue.
    pub device_errors: u64,
    /// XDP Pass verdicts.
    pub xdp_pass: u64,
    /// XDP Drop verdicts.
    pub xdp_drop: u64,
    /// XDP Tx verdicts.
    pub xdp_tx: u64,
    /// XDP Redirect verdicts.
    pub xdp_redirect: u64,
    /// Frames an XDP program could not act on (dropped).
    pub xdp_aborted: u64,
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
            rx_errors: l(&self.rx.errors) + l(&self.rx.too_long),
            rx_too_long: l(&self.rx.too_long),
            rx_nombuf: l(&self.rx.nombuf),
            tx_packets: l(&self.tx.packets),
            tx_bytes: l(&self.tx.bytes),
            tx_full: l(&self.tx.full),
            tx_copied: l(&self.tx.copied),
            tx_nobuf: l(&self.tx.nobuf),
            tx_errors: l(&self.tx.errors),
            tx_lost: l(&self.tx.lost),
            device_errors: l(&self.rx.device_errors) + l(&self.tx.device_errors),
            xdp_pass: l(&self.rx.xdp_pass),
            xdp_drop: l(&self.rx.xdp_drop),
            xdp_tx: l(&self.rx.xdp_tx),
            xdp_redirect: l(&self.rx.xdp_redirect),
            xdp_aborted: l(&self.rx.xdp_aborted),
        }
    }
}

/// Adds `v` to a counter only this thread writes (a relaxed load and store: no RMW).
#[inline]
pub(super) fn bump(c: &AtomicU64, v: u64) {
    if v != 0 {
        c.store(c.load(Ordering::Relaxed) + v, Ordering::Relaxed);
    }
}
