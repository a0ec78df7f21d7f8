//! A port's supervisor: the thread that watches the device behind an open port and
//! brings the port back when its back-end restarts.
//!
//! Owns: the watch loop (every [`Transport::probe_every`], by default [`TICK`]:
//! [`Transport::probe`], which sees a hang-up at
//! once and sends a heartbeat every few ticks), the link state it reports (`link.rs`),
//! and the recovery sequence: link down, control commands refused, reset epoch bumped
//! (each queue then resets its own ring at its next burst, lock-free), reconnection with
//! backoff (client: connect again; server: accept the back-end's new connection), rings
//! set up again from the driver's own state once their queue has reset them
//! ([`Transport::restore_queues`]: same rings, same kick eventfds, the queues that were
//! enabled), the control queue's settings replayed ([`Control::replay`]), link up.
//! Must not: touch rings or buffers (the queues do, on their own threads) or run on the
//! data path.
//!
//! A queue handed to the application resets its ring at its next `rx_burst`,
//! `tx_burst` or `reclaim` (an application that leaves a queue idle, as a transmit-only
//! engine leaves its receive queues, checks `reset_pending()` now and then and polls it
//! then, as testpmd does). The link comes up with the queues that have reset within
//! 50 ms of the reconnection; a queue polled later (an idle transmit queue) is set up
//! on the device as soon as it has reset (the supervisor then looks every 2 ms), and
//! its frames wait in its ring meanwhile. Queues the application has not taken are
//! reset here. A failure the transport cannot recover from (a back-end that comes back
//! without the features negotiated before, a device that needs a reset over VFIO) is
//! reported as a failed link, with the reason, and the supervisor ends. While the
//! device itself reports its link down, transmit is held (`link.rs`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ctrl::Control;
use crate::error::Error;
use crate::link::LinkShared;
use crate::queue::QueuePair;
use crate::transport::{Probe, Transport};

/// How often the supervisor looks at the device, unless its transport says otherwise.
pub const TICK: Duration = Duration::from_millis(100);
/// How often while queue halves wait to be set up again after a reconnection.
const STRAGGLER_TICK: Duration = Duration::from_millis(2);
/// How long a reconnection waits for every queue half to reset before the link comes up
/// with those that have (the others follow as they are polled).
const STRAGGLER_WAIT: Duration = Duration::from_millis(50);
/// A heartbeat request this often (a hang-up is seen at every tick).
const HEARTBEAT: Duration = Duration::from_millis(500);
/// Reconnection attempts start this far apart and back off up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// The longest wait between two reconnection attempts: a back-end that is back is
/// found within this (plus one attempt).
pub const MAX_BACKOFF: Duration = Duration::from_millis(200);

/// What the supervisor works on, shared with the port.
pub(crate) struct Watched {
    pub transport: Arc<Mutex<Box<dyn Transport>>>,
    pub link: Arc<LinkShared>,
    pub control: Control,
    /// Queue pairs the application has not taken (reset here, not by a burst).
    pub untaken: Arc<Mutex<Vec<Option<QueuePair>>>>,
    /// The features negotiated at open, asked for again on every new connection.
    pub features: u64,
    pub device: String,
}

/// The running supervisor of one port; stopped (and joined) on drop.
pub(crate) struct Supervisor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each holder leaves the value consistent between its calls.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Supervisor {
    /// Starts watching.
    pub(crate) fn start(w: Watched) -> std::io::Result<Supervisor> {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let thread = std::thread::Builder::new().name("vnet-link".into()).spawn(move || run(&w, &s2))?;
        Ok(Supervisor { stop, thread: Some(thread) })
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sleeps `d` in short steps; false if asked to stop meanwhile.
fn nap(d: Duration, stop: &AtomicBool) -> bool {
    let end = Instant::now() + d;
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            return true;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(10)));
    }
}

/// Queue halves reset but not set up on the new device yet, after a reconnection.
struct Stragglers {
    epoch: u32,
    slots: Vec<usize>,
}

fn run(w: &Watched, stop: &AtomicBool) {
    let mut last_heartbeat = Instant::now();
    let mut stragglers: Option<Stragglers> = None;
    let every = lock(&w.transport).probe_every();
    // While queue halves wait to be set up, look at them often: their frames wait too.
    while nap(if stragglers.is_some() { STRAGGLER_TICK.min(every) } else { every }, stop) {
        let heartbeat = last_heartbeat.elapsed() >= HEARTBEAT;
        if heartbeat {
            last_heartbeat = Instant::now();
        }
        let mut probe = lock(&w.transport).probe(heartbeat);
        if let (Probe::Alive { .. }, Some(st)) = (&probe, stragglers.as_mut()) {
            if let Err(why) = restore_ready(w, st) {
                probe = Probe::Gone(why);
            }
            if st.slots.is_empty() {
                stragglers = None;
            }
        }
        match probe {
            Probe::Alive { link_up } => {
                let was = w.link.status().up;
                if was != link_up {
                    log::info!(
                        "{}: link {}",
                        w.device,
                        if link_up { "up" } else { "down (the device says so)" }
                    );
                }
                w.link.hold_tx(!link_up);
                w.link.set(link_up, Some("the device reports its link down".into()), false);
            }
            Probe::Failed(why) => {
                log::error!("{}: link down for good: {why}", w.device);
                fail(w, &why);
                return;
            }
            Probe::Gone(why) => match recover(w, stop, why) {
                Some(st) => stragglers = (!st.slots.is_empty()).then_some(st),
                None => return,
            },
        }
    }
}

/// Sets up the rings of the stragglers that have reset meanwhile.
fn restore_ready(w: &Watched, st: &mut Stragglers) -> Result<(), String> {
    reset_untaken(w);
    let mut ready: Vec<usize> = st.slots.iter().copied().filter(|&h| w.link.is_reset(h, st.epoch)).collect();
    // A transmit ring only once its pair's receive ring is set up (see `rx_first`).
    let waiting_rx: Vec<usize> =
        st.slots.iter().copied().filter(|h| h % 2 == 0 && !ready.contains(h)).collect();
    ready.retain(|h| h % 2 == 0 || !waiting_rx.contains(&(h - 1)));
    if ready.is_empty() {
        return Ok(());
    }
    lock(&w.transport)
        .restore_queues(&|q| ready.contains(&(q as usize)))
        .map_err(|e| format!("setting rings up again failed: {e}"))?;
    log::info!("{}: queue(s) {ready:?} set up again", w.device);
    st.slots.retain(|h| !ready.contains(h));
    Ok(())
}

/// The device failed for good: the queues reclaim what it held (after a reset the
/// transport tries), commands are refused, the link stays down.
fn fail(w: &Watched, why: &str) {
    let _ = lock(&w.transport).reset();
    w.control.device_gone(why);
    w.link.begin_reset();
    reset_untaken(w);
    w.link.set(false, Some(why.to_string()), true);
}

/// Brings the port back on a new connection (see the module comment). Returns the
/// queue halves still to be set up (not polled yet), or `None` when the supervisor
/// should end (stopping, or a permanent failure).
fn recover(w: &Watched, stop: &AtomicBool, first_why: String) -> Option<Stragglers> {
    let mut why = first_why;
    loop {
        log::warn!("{}: link down: {why}; reconnecting", w.device);
        w.control.device_gone(&why);
        let epoch = w.link.begin_reset();
        w.link.set(false, Some(why.clone()), false);
        reset_untaken(w);
        // Reconnect, with backoff.
        let mut backoff = FIRST_BACKOFF;
        let mut attempts = 0u64;
        loop {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            let r = lock(&w.transport).reconnect(w.features);
            match r {
                Ok(()) => break,
                Err(e @ (Error::FeaturesRefused(_) | Error::Config(_))) => {
                    let why = format!("the back-end came back but cannot be used: {e}");
                    log::error!("{}: link down for good: {why}", w.device);
                    fail(w, &why);
                    return None;
                }
                Err(e) => {
                    attempts += 1;
                    if attempts == 1 {
                        log::info!("{}: waiting for the back-end ({e})", w.device);
                    }
                    if !nap(backoff, stop) {
                        return None;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        // Rings are set up only once back in their initial state. The halves polled
        // now reset at their next burst: wait a little for them; a half nobody polls
        // (an idle transmit queue) is set up later, when it has reset (`restore_ready`).
        let until = Instant::now() + STRAGGLER_WAIT;
        w.link.wait_all_reset(epoch, || {
            reset_untaken(w);
            stop.load(Ordering::Relaxed) || Instant::now() >= until
        });
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        let halves = w.link.halves();
        let ready = rx_first((0..halves).map(|h| w.link.is_reset(h, epoch)).collect());
        // Queue indices beyond the halves are the control queue's, reset above.
        let r = lock(&w.transport).restore_queues(&|q| ready.get(q as usize).copied().unwrap_or(true));
        if let Err(e) = r {
            why = format!("setting the rings up again failed: {e}");
            continue;
        }
        let (sent, err) = w.control.replay();
        match err {
            None if sent > 0 => log::info!("{}: {sent} control command(s) replayed", w.device),
            None => {}
            Some(e @ Error::ControlNotServed { .. }) => {
                log::info!("{}: control state not replayed: {e}", w.device)
            }
            Some(e) => log::warn!("{}: replaying the control state: {e}", w.device),
        }
        w.link.count_reconnect();
        w.link.hold_tx(false);
        w.link.set(true, None, false);
        let slots: Vec<usize> = (0..halves).filter(|&h| !ready[h]).collect();
        if slots.is_empty() {
            log::info!("{}: link up (reconnected)", w.device);
        } else {
            log::info!(
                "{}: link up (reconnected); queue halves {slots:?} are set up once polled (their rings are reset by their own thread)",
                w.device
            );
        }
        return Some(Stragglers { epoch, slots });
    }
}

/// Half `2p + 1` (pair p's transmit ring) counts as ready only with half `2p` (its
/// receive ring): a back-end that forwards a pair's transmit ring into its receive ring
/// (ours with `reflect`) would otherwise take the frames waiting there before it has
/// anywhere to put them, and drop them, counted only in its own statistics. (An
/// application that never polls a receive queue polls it once `reset_pending` says so,
/// or the pair's transmit ring waits too.)
fn rx_first(mut ready: Vec<bool>) -> Vec<bool> {
    for h in (1..ready.len()).step_by(2) {
        ready[h] &= ready[h - 1];
    }
    ready
}

/// Resets the rings of the queue pairs the application has not taken.
fn reset_untaken(w: &Watched) {
    for p in lock(&w.untaken).iter_mut().flatten() {
        p.rx.reset_if_pending();
        p.tx.reset_if_pending();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn transmit_rings_wait_for_their_receive_ring() {
        let got = super::rx_first(vec![true, true, false, true, true, false]);
        assert_eq!(got, vec![true, true, false, false, true, false]);
    }
}
