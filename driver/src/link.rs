//! A port's link state, its change notifications, and the lock-free handshake that lets
//! each queue reset its own ring when the device behind it went away.
//!
//! Owns: [`LinkStatus`] (up or down, why, how many changes and reconnections), the
//! [`LinkWatch`] handle an application polls or waits on, and the reset epoch: when the
//! port's supervisor (`supervisor.rs`) finds the device gone (a back-end that hung up,
//! stopped answering, or a device that needs a reset) it bumps the epoch; every queue
//! half sees that at its next burst (one atomic load per burst), takes what the old
//! device completed, reclaims the rest, puts its ring back in its initial state and
//! acknowledges with the epoch ([`ResetPoint`]). The supervisor sets the rings up on the
//! new device only once every half has acknowledged, so no ring is touched by two sides
//! that disagree about its state, and no lock is held across a burst.
//!
//! The same word carries the transmit hold: while the device says its link is down
//! (QEMU does while its vhost-user back-end is away) transmit queues take nothing, since
//! QEMU completes and discards whatever a guest transmits then; the frames stay with the
//! application, which counts them, as the kernel's `virtio_net` stops its queues at
//! carrier off. Transmit checks reset and hold with the same single load.
//! Must not: touch rings or the transport (the queues and the supervisor do).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What a port's link is doing now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStatus {
    /// The device carries frames: connected, started, its `VIRTIO_NET_S_LINK_UP` set.
    pub up: bool,
    /// Why the link is down (`None` while up).
    pub reason: Option<String>,
    /// The link will not come back (the transport cannot reconnect, or the device failed
    /// in a way the driver cannot recover from): the reason says why.
    pub failed: bool,
    /// Link state changes so far (up to down, down to up, or down to failed); a change
    /// notification is this number moving.
    pub changes: u64,
    /// Times the port came back on a new connection or a reset device.
    pub reconnects: u64,
    /// The port was closed: the link changes no more (waiters return at once).
    pub closed: bool,
}

/// A queue half's acknowledgement slot value for a half that no longer exists (dropped):
/// the supervisor does not wait for it.
const GONE: u32 = u32::MAX;
/// The epoch word's top bit: transmit held (the epoch is the other 31 bits, so an
/// acknowledged epoch is never [`GONE`]).
const HOLD: u32 = 1 << 31;

/// The state a port, its supervisor and its queues share.
pub(crate) struct LinkShared {
    /// Bumped each time the rings must be reset (the low 31 bits), with [`HOLD`].
    /// Written by the supervisor only.
    epoch: AtomicU32,
    /// Per queue half: the epoch it has reset its ring for (or [`GONE`]).
    acks: Box<[AtomicU32]>,
    status: Mutex<LinkStatus>,
    changed: Condvar,
}

impl LinkShared {
    /// Link state for `halves` queue halves (two per queue pair), up or down at start.
    pub(crate) fn new(halves: usize, up: bool) -> Arc<LinkShared> {
        let reason = (!up).then(|| "the device reports its link down".to_string());
        Arc::new(LinkShared {
            epoch: AtomicU32::new(if up { 0 } else { HOLD }),
            acks: (0..halves).map(|_| AtomicU32::new(0)).collect(),
            status: Mutex::new(LinkStatus { up, reason, ..LinkStatus::default() }),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LinkStatus> {
        // Plain values, consistent after every write.
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The reset point of queue half `slot` (rx of pair p: 2p, tx: 2p + 1).
    pub(crate) fn reset_point(self: &Arc<Self>, slot: usize) -> ResetPoint {
        ResetPoint { shared: self.clone(), slot, seen: self.epoch.load(Ordering::Acquire) & !HOLD }
    }

    pub(crate) fn status(&self) -> LinkStatus {
        self.lock().clone()
    }

    /// Link up, or down for `reason`; a change wakes the waiters.
    pub(crate) fn set(&self, up: bool, reason: Option<String>, failed: bool) {
        let mut s = self.lock();
        // Going down for good is a change even when the link was down already (a failed
        // reconnection): the application must hear that it will not come back.
        if s.up != up || (failed && !s.failed) {
            s.changes += 1;
        }
        s.up = up;
        s.reason = if up { None } else { reason };
        s.failed = failed;
        drop(s);
        self.changed.notify_all();
    }

    /// The port is closed: wakes the waiters for good.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// One more reconnection done (before the link is set up again).
    pub(crate) fn count_reconnect(&self) {
        self.lock().reconnects += 1;
    }

    /// Starts a reset: every queue half must reset its ring before the rings are set up
    /// on a device again. Returns the new epoch.
    pub(crate) fn begin_reset(&self) -> u32 {
        // Relaxed: the supervisor is the only writer.
        let w = self.epoch.load(Ordering::Relaxed);
        let e = (w & !HOLD).wrapping_add(1) & !HOLD;
        // Release: a half that sees the new epoch also sees the device gone (the
        // transport closed the connection before this).
        self.epoch.store(e | (w & HOLD), Ordering::Release);
        e
    }

    /// Holds transmit (`true`: the device reports its link down) or lets it go.
    pub(crate) fn hold_tx(&self, hold: bool) {
        // Relaxed load: the supervisor is the only writer; the store needs no ordering
        // (no memory is handed over with it).
        let w = self.epoch.load(Ordering::Relaxed);
        let n = if hold { w | HOLD } else { w & !HOLD };
        if n != w {
            self.epoch.store(n, Ordering::Relaxed);
        }
    }

    /// Whether every queue half has reset its ring for `epoch` (or no longer exists).
    pub(crate) fn all_reset(&self, epoch: u32) -> bool {
        self.acks.iter().all(|a| {
            let v = a.load(Ordering::Acquire);
            v == epoch || v == GONE
        })
    }

    /// Waits until [`all_reset`](Self::all_reset) or `stop()` says to stop waiting; polls
    /// every millisecond (control path). Returns whether every half reset.
    pub(crate) fn wait_all_reset(&self, epoch: u32, mut stop: impl FnMut() -> bool) -> bool {
        loop {
            if self.all_reset(epoch) {
                return true;
            }
            if stop() {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Queue halves taking part (two per queue pair).
    pub(crate) fn halves(&self) -> usize {
        self.acks.len()
    }

    /// Whether queue half `slot` has reset its ring for `epoch` (or no longer exists).
    pub(crate) fn is_reset(&self, slot: usize, epoch: u32) -> bool {
        self.acks.get(slot).map_or(true, |a| {
            let v = a.load(Ordering::Acquire);
            v == epoch || v == GONE
        })
    }
}

/// A port's link, as an application watches it: cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct LinkWatch {
    shared: Arc<LinkShared>,
}

impl std::fmt::Debug for LinkWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LinkWatch").field(&self.status()).finish()
    }
}

impl LinkWatch {
    pub(crate) fn new(shared: Arc<LinkShared>) -> LinkWatch {
        LinkWatch { shared }
    }

    /// The link now.
    pub fn status(&self) -> LinkStatus {
        self.shared.status()
    }

    /// Waits until the link has changed more than `seen` times ([`LinkStatus::changes`]),
    /// the port closed, or `timeout` passed, and returns the link then.
    pub fn wait_change(&self, seen: u64, timeout: Duration) -> LinkStatus {
        let end = Instant::now() + timeout;
        let mut s = self.shared.lock();
        while s.changes <= seen && !s.closed {
            let now = Instant::now();
            if now >= end {
                break;
            }
            s = self.shared.changed.wait_timeout(s, end - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        s.clone()
    }
}

/// One queue half's side of the reset handshake (see the module comment).
pub(crate) struct ResetPoint {
    shared: Arc<LinkShared>,
    slot: usize,
    /// The epoch this half's ring is in.
    seen: u32,
}

impl ResetPoint {
    /// The reset point of a queue on its own (not part of a port): never reset.
    pub(crate) fn standalone() -> ResetPoint {
        LinkShared::new(1, true).reset_point(0)
    }

    /// Whether the ring must be reset (the device it was set up on is gone): one load,
    /// once per burst.
    #[inline(always)]
    pub(crate) fn pending(&self) -> bool {
        // Acquire: pairs with `begin_reset`.
        self.shared.epoch.load(Ordering::Acquire) & !HOLD != self.seen
    }

    /// A reset pending or transmit held: the one load of a transmit burst; the rare
    /// `true` is sorted out by [`pending`](Self::pending) and [`tx_held`](Self::tx_held).
    #[inline(always)]
    pub(crate) fn tx_attention(&self) -> bool {
        // Acquire: pairs with `begin_reset`.
        self.shared.epoch.load(Ordering::Acquire) != self.seen
    }

    /// Whether transmit is held (the device reports its link down).
    pub(crate) fn tx_held(&self) -> bool {
        self.shared.epoch.load(Ordering::Relaxed) & HOLD != 0
    }

    /// The ring has been reset for the current epoch (call after [`pending`](Self::pending)
    /// and the reset): the supervisor may set it up on the new device.
    pub(crate) fn done(&mut self) {
        let e = self.shared.epoch.load(Ordering::Acquire) & !HOLD;
        self.seen = e;
        // Release: the ring's reset (its memory and indices) happens before the
        // supervisor, which acquires this, hands the ring to a new device.
        self.shared.acks[self.slot].store(e, Ordering::Release);
    }
}

impl Drop for ResetPoint {
    fn drop(&mut self) {
        self.shared.acks[self.slot].store(GONE, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_handshake_waits_for_every_half() {
        let l = LinkShared::new(3, true);
        let mut a = l.reset_point(0);
        let mut b = l.reset_point(1);
        let c = l.reset_point(2);
        assert!(!a.pending() && l.all_reset(0));
        let e = l.begin_reset();
        assert!(a.pending() && b.pending() && c.pending());
        assert!(!l.all_reset(e));
        a.done();
        assert!(!a.pending());
        assert!(l.is_reset(0, e) && !l.is_reset(1, e) && !l.is_reset(2, e));
        b.done();
        assert!(!l.all_reset(e));
        drop(c); // a dropped half is not waited for
        assert!(l.all_reset(e));
        assert!(l.wait_all_reset(e, || panic!("must not wait")));
        let e2 = l.begin_reset();
        assert!(!l.wait_all_reset(e2, || true));
    }

    #[test]
    fn transmit_hold_shares_the_word_without_touching_the_epoch() {
        let l = LinkShared::new(2, true);
        let mut a = l.reset_point(0);
        assert!(!a.tx_attention() && !a.tx_held());
        l.hold_tx(true);
        assert!(a.tx_attention() && a.tx_held() && !a.pending());
        // A reset while held: the epoch moves, the hold stays.
        let e = l.begin_reset();
        assert!(a.pending() && a.tx_held());
        a.done();
        assert!(!a.pending() && a.tx_attention() && l.is_reset(0, e) && !l.is_reset(1, e));
        l.hold_tx(false);
        assert!(!a.tx_attention() && !a.tx_held());
        // The epoch wraps within its 31 bits and never reaches GONE.
        l.epoch.store(HOLD - 1, Ordering::Relaxed);
        assert_eq!(l.begin_reset(), 0);
    }

    #[test]
    fn changes_wake_waiters_and_are_counted() {
        let l = LinkShared::new(0, true);
        let w = LinkWatch::new(l.clone());
        assert_eq!(w.status().changes, 0);
        let t = std::thread::spawn({
            let w = w.clone();
            move || w.wait_change(0, Duration::from_secs(5))
        });
        l.set(false, Some("gone".into()), false);
        let s = t.join().unwrap();
        assert!(!s.up && s.changes == 1 && s.reason.as_deref() == Some("gone"));
        // Same state again: no change counted.
        l.set(false, Some("still gone".into()), false);
        assert_eq!(w.status().changes, 1);
        l.set(true, None, false);
        let s = w.wait_change(1, Duration::from_millis(10));
        assert!(s.up && s.changes == 2 && s.reason.is_none());
        // Nothing new: returns at the timeout with the same state.
        assert_eq!(w.wait_change(2, Duration::from_millis(5)).changes, 2);
        // Down, then down for good: two changes (the application hears the failure).
        l.set(false, Some("gone".into()), false);
        l.set(false, Some("cannot be used".into()), true);
        let s = w.wait_change(3, Duration::from_millis(10));
        assert!(!s.up && s.failed && s.changes == 4 && s.reason.as_deref() == Some("cannot be used"));
        l.set(false, Some("again".into()), true);
        assert_eq!(w.status().changes, 4, "failed twice is one change");
    }
}
