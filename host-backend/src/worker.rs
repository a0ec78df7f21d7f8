//! Busy-poll workers and the engine that hands rings to them.
//!
//! Owns: the worker threads (one per `--cores` entry, pinned), their poll loop, the
//! poll budget (`--poll-us`: how long a worker spins without work before it re-enables
//! kicks and sleeps on the kick eventfds and on its paths' own descriptors, a tap's), and the generation protocol by which the
//! control plane changes what workers run: [`Engine::sync`] bumps a generation and
//! waits until every worker has seen it at a burst boundary; a worker then re-reads the
//! state of the paths whose devices' epochs moved (`Device::resync` bumps the changed
//! device's), and leaves the others' rings alone.
//! Must not: parse vhost-user messages or touch rings outside a path's burst.
//!
//! Fairness between devices: each loop iteration gives every path one burst, at most
//! `port::BURST` chains, and a chain costs at most `split_ring::MAX_SEGS + 1` buffer
//! descriptors however long the guest made it (the walk abandons longer ones), so one
//! device's burst is bounded whatever its guest writes and cannot starve the others.
//!
//! A worker checks two atomics per loop iteration (the generation, and the SIGBUS
//! repair count that changes only when a front-end took its memory away); everything else it
//! touches on the hot path is its own.
//!
//! Besides the data workers there is one control worker ([`WorkerKind::Control`]): it
//! owns every device's control queue (one ring, one owner, like every other ring),
//! never busy-polls (it sleeps on the control queues' kick eventfds, or wakes every
//! millisecond for a front-end that gave none), and applies commands through
//! [`Engine::sync_workers`], which waits for the data workers only: the control worker
//! calls it from inside its own burst, and waiting for itself would never return.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::error::{Error, Result};
use crate::port::PortPath;
use crate::sigbus;

struct Slot {
    /// The last generation this worker has applied.
    seen: AtomicU64,
    wake: EventFd,
}

/// Shared between the control plane and the workers.
pub struct Engine {
    generation: AtomicU64,
    stop: AtomicBool,
    /// Data workers first, then control workers.
    slots: Vec<Slot>,
    /// How many of `slots` are data workers.
    data_workers: usize,
    /// How long [`sync`](Self::sync) waits for a worker before it gives up.
    sync_timeout: Duration,
}

const WAKE_TOKEN: u64 = u64::MAX;
/// Token of a path's own descriptor (a tap's): readiness only wakes the worker, nothing
/// is read from it here.
const POLL_TOKEN: u64 = u64::MAX - 1;

impl Engine {
    /// An engine for `workers` data workers and `control` control workers.
    pub fn new(workers: usize, control: usize) -> Result<Arc<Engine>> {
        let slots = (0..workers + control)
            .map(|_| {
                Ok(Slot {
                    seen: AtomicU64::new(0),
                    wake: EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Arc::new(Engine {
            generation: AtomicU64::new(1),
            stop: AtomicBool::new(false),
            slots,
            data_workers: workers,
            sync_timeout: Duration::from_secs(5),
        }))
    }

    /// [`new`](Self::new) with another bound on waiting for a worker (tests of a worker
    /// that never answers).
    #[cfg(test)]
    pub fn with_sync_timeout(workers: usize, control: usize, timeout: Duration) -> Result<Arc<Engine>> {
        let mut e = Engine::new(workers, control)?;
        Arc::get_mut(&mut e).expect("not shared yet").sync_timeout = timeout;
        Ok(e)
    }

    /// Makes every worker drop its rings and re-activate from current device state, and
    /// returns once all have done so (bounded: a worker finishes its burst first, which
    /// takes microseconds), `true`; `false` if a worker did not within the bound (the
    /// caller must then not act as if the change were in effect). Must not be called with
    /// a device lock held, nor by a worker.
    pub fn sync(&self) -> bool {
        self.sync_slots(self.slots.len())
    }

    /// [`sync`](Self::sync) for the data workers only: what the control worker calls to
    /// put a control command into effect before it acknowledges it. Control workers see
    /// the new generation too and re-activate their rings after their burst.
    pub fn sync_workers(&self) -> bool {
        self.sync_slots(self.data_workers)
    }

    fn sync_slots(&self, wait_for: usize) -> bool {
        // AcqRel: device-state writes made before this call (under the device mutex) are
        // visible to a worker that observes the new generation (it also takes the mutex).
        let g = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        for s in &self.slots {
            let _ = s.wake.write(1);
        }
        let deadline = Instant::now() + self.sync_timeout;
        for (i, s) in self.slots.iter().enumerate().take(wait_for) {
            // Acquire: pairs with the worker's release store after its resync.
            while s.seen.load(Ordering::Acquire) < g {
                if self.stop.load(Ordering::Relaxed) {
                    return true;
                }
                if Instant::now() > deadline {
                    warn!("worker {i} did not pick up a configuration change within {:?}", self.sync_timeout);
                    return false;
                }
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        true
    }

    /// Asks every worker to let go of its rings and exit.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in &self.slots {
            let _ = s.wake.write(1);
        }
    }
}

/// What a worker runs and how it waits for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerKind {
    /// Data paths: busy-polls for `--poll-us`, then sleeps on the kick eventfds.
    Data,
    /// Control queues: sleeps on their kick eventfds as soon as it is idle (every
    /// millisecond it looks anyway when a ring has no kick fd).
    Control,
}

/// How long the control worker sleeps between looks at a ring without a kick fd.
const CONTROL_POLL_MS: i32 = 1;

/// One busy-poll worker.
pub struct Worker {
    index: usize,
    cpu: Option<usize>,
    paths: Vec<PortPath>,
    engine: Arc<Engine>,
    poll: Duration,
    kind: WorkerKind,
    /// `--idle-pause`: pause instructions after a loop without work.
    idle_pause: u32,
}

impl Worker {
    /// A data worker running `paths` on `cpu` (unpinned if `None`), engine slot `index`.
    pub fn new(
        index: usize,
        cpu: Option<usize>,
        paths: Vec<PortPath>,
        engine: Arc<Engine>,
        poll_us: u64,
        idle_pause: u32,
    ) -> Worker {
        let poll = Duration::from_micros(poll_us);
        Worker { index, cpu, paths, engine, poll, kind: WorkerKind::Data, idle_pause }
    }

    /// The control worker (unpinned) running the control-queue `paths`, engine slot
    /// `index` (after every data worker's).
    pub fn control(index: usize, paths: Vec<PortPath>, engine: Arc<Engine>) -> Worker {
        Worker {
            index,
            cpu: None,
            paths,
            engine,
            poll: Duration::ZERO,
            kind: WorkerKind::Control,
            idle_pause: 0,
        }
    }

    /// Starts the worker thread; it hands its paths back when it exits (for what
    /// `Backend::shutdown` accounts after every worker stopped).
    pub fn spawn(self) -> Result<std::thread::JoinHandle<Vec<PortPath>>> {
        let name = match self.kind {
            WorkerKind::Data => format!("vnet-worker-{}", self.index),
            WorkerKind::Control => "vnet-control".to_string(),
        };
        std::thread::Builder::new()
            .name(name)
            .spawn(move || self.run())
            .map_err(|e| Error::Worker(format!("cannot start worker thread: {e}")))
    }

    fn pin(&self) {
        let Some(cpu) = self.cpu else { return };
        // SAFETY: `set` is a plain C struct initialised by CPU_ZERO/CPU_SET; the call
        // only reads it.
        let rc = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_ZERO(&mut set);
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        if rc != 0 {
            warn!("worker {}: cannot pin to cpu {cpu}: {}", self.index, std::io::Error::last_os_error());
        }
    }

    fn run(mut self) -> Vec<PortPath> {
        self.pin();
        let slot = &self.engine.slots[self.index];
        let mut seen = 0;
        let mut seen_repairs = sigbus::repairs();
        let mut epoll = None;
        let mut kick_fds: Vec<i32> = Vec::new();
        let mut poll_fds: Vec<i32> = Vec::new();
        let mut can_sleep = true;
        let mut idle_since: Option<Instant> = None;
        let mut idle_loops: u32 = 0;
        loop {
            if self.engine.stop.load(Ordering::Relaxed) {
                break;
            }
            // Acquire: pairs with `sync`'s AcqRel increment.
            let g = self.engine.generation.load(Ordering::Acquire);
            // A repaired SIGBUS (a front-end truncated its memory): re-activating the
            // rings breaks those of the device whose memory it was (`sigbus.rs`).
            let repairs = sigbus::repairs();
            if g != seen || repairs != seen_repairs {
                // Only the paths whose devices changed let go of their rings; after a
                // SIGBUS repair every path does (which device lost memory is found
                // when its rings are re-activated).
                let force = repairs != seen_repairs;
                seen_repairs = repairs;
                let stale: Vec<bool> = self.paths.iter_mut().map(|p| p.take_epochs(force)).collect();
                for (p, _) in self.paths.iter_mut().zip(&stale).filter(|(_, s)| **s) {
                    p.detach();
                }
                for (p, _) in self.paths.iter_mut().zip(&stale).filter(|(_, s)| **s) {
                    p.attach();
                }
                kick_fds.clear();
                can_sleep = true;
                poll_fds.clear();
                for p in &self.paths {
                    can_sleep &= p.kick_fds(&mut kick_fds);
                    p.poll_fds(&mut poll_fds);
                }
                epoll = self.build_epoll(&kick_fds, &poll_fds);
                seen = g;
                // Release: our detach/attach (device state writes) happen-before `sync` returns.
                slot.seen.store(g, Ordering::Release);
                debug!("worker {}: generation {g}, {} kick fds", self.index, kick_fds.len());
            }
            let mut work = 0;
            for p in &mut self.paths {
                work += p.run();
            }
            if work > 0 {
                idle_since = None;
                continue;
            }
            let any_active = self.paths.iter().any(|p| p.any_active());
            if self.kind == WorkerKind::Control {
                // Never spin: kicks stay enabled on control queues; re-check after
                // enabling (work that raced in), then sleep until a kick or a wake-up.
                let mut arrived = false;
                for p in &mut self.paths {
                    arrived |= p.set_kicks(true);
                }
                if !arrived {
                    let timeout = if can_sleep || !any_active { 1000 } else { CONTROL_POLL_MS };
                    match &epoll {
                        Some(ep) => Self::sleep(ep, &kick_fds, slot, timeout),
                        None => std::thread::sleep(Duration::from_millis(CONTROL_POLL_MS as u64)),
                    }
                }
                continue;
            }
            for _ in 0..self.idle_pause {
                std::hint::spin_loop();
            }
            if any_active {
                if self.poll.is_zero() || !can_sleep {
                    continue; // --poll-us 0, or a ring without a kick fd: never sleep
                }
                idle_loops = idle_loops.wrapping_add(1);
                if idle_loops % 128 != 0 {
                    continue;
                }
                let start = *idle_since.get_or_insert_with(Instant::now);
                if start.elapsed() < self.poll {
                    continue;
                }
                // Re-enable kicks, then re-check: work that raced in means no sleep.
                let mut arrived = false;
                for p in &mut self.paths {
                    arrived |= p.set_kicks(true);
                }
                if arrived {
                    for p in &mut self.paths {
                        p.set_kicks(false);
                    }
                    idle_since = None;
                    continue;
                }
            }
            if let Some(ep) = &epoll {
                Self::sleep(ep, &kick_fds, slot, 1000);
            }
            if any_active {
                for p in &mut self.paths {
                    p.set_kicks(false);
                }
            }
            idle_since = None;
        }
        for p in &mut self.paths {
            p.detach();
        }
        self.paths
    }

    fn build_epoll(&self, kick_fds: &[i32], poll_fds: &[i32]) -> Option<Epoll> {
        let ep = match Epoll::new() {
            Ok(ep) => ep,
            Err(e) => {
                warn!("worker {}: epoll: {e}; polling without sleeping", self.index);
                return None;
            }
        };
        use std::os::fd::AsRawFd;
        let wake = self.engine.slots[self.index].wake.as_raw_fd();
        let _ = ep.ctl(ControlOperation::Add, wake, EpollEvent::new(EventSet::IN, WAKE_TOKEN));
        for (i, fd) in kick_fds.iter().enumerate() {
            // A shared fd appears once: EEXIST on the second add is fine.
            let _ = ep.ctl(ControlOperation::Add, *fd, EpollEvent::new(EventSet::IN, i as u64));
        }
        for fd in poll_fds {
            // Edge-triggered: a frame the path cannot take yet (no receive buffer) does
            // not keep waking the worker; the next frame or the guest's kick does.
            let ev = EpollEvent::new(EventSet::IN | EventSet::EDGE_TRIGGERED, POLL_TOKEN);
            let _ = ep.ctl(ControlOperation::Add, *fd, ev);
        }
        Some(ep)
    }

    /// Sleeps until a kick, a wake-up from the control plane, or `timeout_ms` pass; then
    /// drains the eventfds that fired.
    fn sleep(ep: &Epoll, kick_fds: &[i32], slot: &Slot, timeout_ms: i32) {
        let mut events = [EpollEvent::default(); 16];
        let n = ep.wait(timeout_ms, &mut events).unwrap_or(0);
        for ev in &events[..n] {
            let fd = if ev.data() == WAKE_TOKEN {
                let _ = slot.wake.read();
                continue;
            } else if ev.data() == POLL_TOKEN {
                continue;
            } else {
                match kick_fds.get(ev.data() as usize) {
                    Some(fd) => *fd,
                    None => continue,
                }
            };
            let mut v: u64 = 0;
            // SAFETY: reads 8 bytes into a local from an eventfd that epoll reported
            // readable, so the read does not block.
            let _ = unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
        }
    }
}
