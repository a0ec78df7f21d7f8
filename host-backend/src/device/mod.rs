//! One virtio-net device: what the front-end configured (features, memory, rings,
//! eventfds), its statistics, and the vhost-user request handler that configures it.
//!
//! Owns: the control-plane state of one socket's device under one mutex, the rule for
//! when a queue may run, and the hand-over of rings to and from workers (a worker
//! activates a ring from this state and writes its position back when it lets go).
//! Must not: touch ring memory on the data path (workers do) or hold its lock while
//! waiting for workers (it would deadlock their resync).
//!
//! Every message that changes a queue or the memory table is applied under the lock and
//! then followed by [`Device::resync`] (this device's epoch, then [`Engine::sync`]),
//! which returns once every worker has dropped what it held of this device and
//! re-activated what may run; other devices' rings are not touched. A change to a queue that is running first
//! pauses it (sync), so the worker's final position is written back before the change.
//!
//! The control queue (virtio 1.2 §5.1.6.5) changes device state the same way: the
//! control worker hands each command to [`Device::apply_ctrl`], which replaces the
//! receive configuration ([`RxConfig`]: filters, MAC, guest offloads) or the number of
//! active queue pairs under the lock and then runs [`Engine::sync_workers`]; a data
//! worker re-activating a receive ring takes the new `Arc<RxConfig>` with it, so the
//! data path reads filters without a lock or an atomic. The acknowledgement is written
//! only after that sync, so a driver that saw `VIRTIO_NET_OK` never receives a frame
//! the new state rejects.
//!
//! Queue indices: the front-end's vhost-user index `i` is data queue `i` (`2p` receive,
//! `2p + 1` transmit of pair `p`), except the control queue, which is at `2N` when MQ is
//! negotiated and at 2 otherwise (§5.1.2); internally it is always index `2N`
//! ([`Device::ctrl_queue`]).
//!
//! Here: the device's state, its parameters, and the ring hand-over, control commands and
//! statistics. In `handler`: the vhost-user request handler; in `features`: what is
//! offered; in `fds`: the checks on file descriptors a front-end sends; in `iotlb`: the
//! device's side of the IOTLB protocol; `tests`: unit tests.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use log::{debug, info, warn};
use spec::layout::{features as f, net_config};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserVringAddrFlags,
    VhostUserVringState,
};
use vhost::vhost_user::{Error as VuError, Result as VuResult, VhostUserBackendReqHandler};
use vmm_sys_util::eventfd::EventFd;

use crate::ctrl::{self, Command, Refused, RxConfig};
use crate::iotlb::{Iotlb, PendingMiss, MISS_RESEND, MISS_TIMEOUT, MSG_INVALIDATE, MSG_UPDATE};
use crate::iotlb_channel::{self, BackendChannel, ChannelError, Header, Request};
use crate::memory::{GuestMemory, RegionDesc};
use crate::packed_ring::PackedRing;
use crate::ring::AnyRing;
use crate::split_ring::{signal, DeviceRing, RingConfig, RingFault};
use crate::stats::{CtrlSnapshot, DeviceSnapshot, DropReason, IotlbSnapshot, PairStats, PeerSnapshot};
use crate::worker::Engine;
use virtio_bindings::virtio_net as vn;

mod fds;
mod features;
mod handler;
mod iotlb;
#[cfg(test)]
mod tests;

pub(crate) use features::{offered_features, offered_protocol_features};
pub(crate) use handler::Handler;

/// What a port does with its device's traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortKind {
    /// Counts and drops what the guest sends.
    Sink,
    /// Sends generated frames to the guest as fast as it takes them.
    Gen,
    /// Sends each frame back to the guest that sent it.
    Reflect,
    /// Two devices: A's transmit queue feeds B's receive queue and back.
    Xconnect,
    /// A device joined to a kernel tap interface: its transmit queue goes to the tap,
    /// what the kernel sends to the tap comes back in its receive queue.
    Tap,
    /// A queue pair to and from an AF_PACKET socket with mmap rings on an existing
    /// interface.
    AfPacket,
}

impl PortKind {
    /// The name used on the command line and in statistics.
    pub fn name(self) -> &'static str {
        match self {
            PortKind::Sink => "sink",
            PortKind::Gen => "gen",
            PortKind::Reflect => "reflect",
            PortKind::Xconnect => "xconnect",
            PortKind::Tap => "tap",
            PortKind::AfPacket => "afpacket",
        }
    }
}

/// Static properties of a device, fixed at start.
#[derive(Debug, Clone)]
pub struct DeviceParams {
    /// The vhost-user socket path.
    pub socket: PathBuf,
    /// The port this device belongs to.
    pub kind: PortKind,
    /// Queue pairs offered.
    pub queue_pairs: u16,
    /// MAC address in config space.
    pub mac: [u8; 6],
    /// MTU in config space.
    pub mtu: u16,
    /// Guest offload features offered (`GUEST_CSUM`, `GUEST_TSO4`): only where the port
    /// can produce such packets (a `gen` port with `--gso-size`).
    pub guest_offloads: u64,
    /// Host offload features offered (`CSUM`, `HOST_TSO4/6`, `HOST_USO`): on forwarding
    /// ports, which complete and segment what a guest sends (`port::offload`).
    pub host_offloads: u64,
    /// Offer `VIRTIO_F_ACCESS_PLATFORM` and serve the IOTLB protocol (`--iommu`): for
    /// front-ends whose device sits behind a vIOMMU (QEMU `iommu_platform=on`).
    pub iommu: bool,
    /// Offer `VIRTIO_F_RING_PACKED` (virtio 1.2 §2.8; off with `--no-packed`).
    pub packed: bool,
    /// `sink`: copy each frame out before completing it (`--sink-read`).
    pub sink_read: bool,
    /// Forwarding: prefetch a burst's transmitted frames first (`--prefetch-tx`).
    pub prefetch_tx: bool,
    /// `tap`: the interface the device is joined to (for the statistics).
    pub tap: Option<String>,
    /// `tap`: one system call per frame each way (`--tap-syscalls`).
    pub tap_syscalls: bool,
}

#[cfg(test)]
impl DeviceParams {
    /// A unit test's device of `kind`: one queue pair, MTU 1500, nothing optional offered.
    pub(crate) fn for_test(kind: PortKind) -> DeviceParams {
        DeviceParams {
            socket: "/nonexistent/test.sock".into(),
            kind,
            queue_pairs: 1,
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            mtu: 1500,
            guest_offloads: 0,
            host_offloads: 0,
            iommu: false,
            packed: false,
            sink_read: false,
            prefetch_tx: false,
            tap: None,
            tap_syscalls: false,
        }
    }
}

#[derive(Default)]
struct QueueState {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    addr_set: bool,
    base: u16,
    kick: Option<Arc<EventFd>>,
    call: Option<Arc<EventFd>>,
    err: Option<Arc<EventFd>>,
    /// A kick fd (or the no-fd polling flag) arrived since the ring was last stopped.
    started: bool,
    /// The last `SET_VRING_ENABLE`, if one was applied. `None` counts as enabled: QEMU
    /// (7.2) sends its enables at realize, before SET_FEATURES, and the `vhost` crate's
    /// request loop refuses them then (before our handler sees them; see server.rs), so
    /// a started ring runs unless the front-end explicitly disabled it.
    enabled: Option<bool>,
    /// Saw a bad value; stays off until the front-end sets the ring up again.
    broken: bool,
    /// Held off by the control plane while it changes the ring.
    paused: bool,
}

struct State {
    connected: bool,
    acked_features: u64,
    acked_protocol: u64,
    mem: Option<Arc<GuestMemory>>,
    /// Data queues `0..2N`, then the control queue at `2N`.
    queues: Vec<QueueState>,
    /// What the device delivers into receive queues; replaced as a whole by commands.
    rx: Arc<RxConfig>,
    /// Queue pairs whose receive queues carry traffic (`VQ_PAIRS_SET`).
    active_pairs: u16,
    /// The IOTLB of this connection (used when `ACCESS_PLATFORM` is negotiated).
    iotlb: Arc<Iotlb>,
}

impl State {
    /// The state after reset (and before any front-end).
    fn reset(params: &DeviceParams, connected: bool) -> State {
        State {
            connected,
            acked_features: 0,
            acked_protocol: 0,
            mem: None,
            queues: (0..params.queue_pairs as usize * 2 + 1).map(|_| QueueState::default()).collect(),
            rx: Arc::new(RxConfig::reset(params.mac, 0)),
            active_pairs: params.queue_pairs,
            iotlb: Iotlb::new(),
        }
    }

    fn acked(&self, feature: u32) -> bool {
        self.acked_features & f::bit(feature) != 0
    }

    /// Number of data queue pairs the device has (`N`).
    fn pairs(&self) -> usize {
        self.queues.len() / 2
    }

    /// The internal index of the front-end's queue `index`, if the device has it.
    fn queue_index(&self, index: u32) -> Option<usize> {
        let (index, n) = (index as usize, self.pairs());
        if self.acked(f::NET_CTRL_VQ) {
            let mq = self.acked(f::NET_MQ);
            if index == if mq { 2 * n } else { 2 } {
                return Some(2 * n);
            }
            if !mq && index >= 2 {
                return None; // one pair only, and the control queue is index 2
            }
        }
        (index < 2 * n).then_some(index)
    }
}

/// A ring handed to a worker, with what it needs besides the ring itself.
pub struct ActiveRing {
    /// The ring (split or packed, as negotiated).
    pub ring: AnyRing,
    /// The guest memory the ring was activated with (the same `Arc` the ring holds),
    /// held beside the ring so that a burst can borrow it while it mutates the ring:
    /// chains walked in a burst borrow this (see `split_ring::Chain`).
    pub mem: Arc<GuestMemory>,
    /// The kick eventfd the worker sleeps on, if any.
    pub kick: Option<Arc<EventFd>>,
    /// The device's receive configuration when the ring was activated (filters and
    /// guest offloads for a receive queue); replaced by re-activation after a change.
    pub rx: Arc<RxConfig>,
    /// Keeps the call eventfd open while the ring uses its raw fd.
    _call: Option<Arc<EventFd>>,
}

/// One virtio-net device behind one vhost-user socket.
pub struct Device {
    /// Static properties.
    pub params: DeviceParams,
    state: Mutex<State>,
    /// Counters per queue pair.
    pub stats: Vec<PairStats>,
    /// Frames a `gen` port produced (delivered plus dropped).
    pub generated: AtomicU64,
    /// Frames a `gen` port may still produce (`u64::MAX`: unlimited).
    pub gen_budget: AtomicU64,
    logged_broken: AtomicBool,
    /// Control commands acknowledged `VIRTIO_NET_OK`.
    pub ctrl_ok: AtomicU64,
    /// Control commands refused (`VIRTIO_NET_ERR`, or unanswerable).
    pub ctrl_err: AtomicU64,
    /// The control queue saw a protocol violation and stopped.
    pub ctrl_broken: AtomicBool,
    logged_ctrl: AtomicBool,
    /// IOTLB counters.
    pub iotlb_stats: IotlbCounters,
    /// Where IOTLB misses go (`SET_BACKEND_REQ_FD`); `None` before the front-end sent it.
    backend_channel: Mutex<Option<BackendChannel>>,
    logged_iotlb: AtomicBool,
    /// A ring waits for a translation: the next update resyncs the workers (which
    /// retries ring activation and wakes a sleeping worker).
    iotlb_waiting: AtomicBool,
    /// What a hostile or broken front-end had refused or taken away.
    pub peer: PeerCounters,
    /// Bumped by every change of this device's state that workers must pick up: a
    /// worker re-activates only the paths whose devices' epochs moved (see
    /// [`Device::resync`]), so one front-end's messages do not re-sync other devices.
    epoch: AtomicU64,
    /// Rings handed to workers (activations), over the device's life.
    pub activations: AtomicU64,
    engine: Arc<Engine>,
}

/// Front-end messages refused and memory lost on one device (totals over all
/// connections).
#[derive(Debug, Default)]
pub struct PeerCounters {
    /// `SET_MEM_TABLE` messages refused (a region longer than its file, not a regular
    /// file, overlapping or overflowing regions, a failed mapping).
    pub mem_table_refused: AtomicU64,
    /// Kick, call or error file descriptors refused (not an eventfd).
    pub fds_refused: AtomicU64,
    /// Memory tables found truncated under the device (each counted once; its rings are
    /// broken).
    pub mem_faults: AtomicU64,
}

/// What the IOTLB protocol did on one device (totals over all connections).
#[derive(Debug, Default)]
pub struct IotlbCounters {
    /// Updates applied.
    pub updates: AtomicU64,
    /// Invalidations applied.
    pub invalidates: AtomicU64,
    /// Misses sent to the front-end.
    pub misses: AtomicU64,
    /// Requests refused (bad range or permission, unknown type, no `ACCESS_PLATFORM`).
    pub refused: AtomicU64,
    /// Addresses still untranslated after [`MISS_TIMEOUT`]: counted as bad descriptors.
    pub timeouts: AtomicU64,
}

impl Device {
    /// A device with no front-end yet.
    pub fn new(params: DeviceParams, engine: Arc<Engine>, gen_count: Option<u64>) -> Arc<Device> {
        let stats = (0..params.queue_pairs).map(|_| PairStats::default()).collect();
        Arc::new(Device {
            state: Mutex::new(State::reset(&params, false)),
            params,
            stats,
            generated: AtomicU64::new(0),
            gen_budget: AtomicU64::new(gen_count.unwrap_or(u64::MAX)),
            logged_broken: AtomicBool::new(false),
            ctrl_ok: AtomicU64::new(0),
            ctrl_err: AtomicU64::new(0),
            ctrl_broken: AtomicBool::new(false),
            logged_ctrl: AtomicBool::new(false),
            iotlb_stats: IotlbCounters::default(),
            backend_channel: Mutex::new(None),
            logged_iotlb: AtomicBool::new(false),
            iotlb_waiting: AtomicBool::new(false),
            peer: PeerCounters::default(),
            epoch: AtomicU64::new(1),
            activations: AtomicU64::new(0),
            engine,
        })
    }

    /// This device's epoch (see the field): a worker compares it with the one its
    /// path last took rings at.
    pub fn epoch(&self) -> u64 {
        // Acquire: pairs with the Release increment in `resync`; the worker then reads
        // the state under the mutex anyway.
        self.epoch.load(Ordering::Acquire)
    }

    /// Makes every worker re-activate this device's rings from its current state and
    /// returns once all have (or [`Engine::sync`]'s bound passed: then `false`). Only the
    /// paths of this device let go of their rings; a worker without any just notes the
    /// generation.
    fn resync(&self) -> bool {
        // Release: the state change before it is visible to a worker that sees the epoch.
        self.epoch.fetch_add(1, Ordering::Release);
        self.engine.sync()
    }

    /// [`resync`](Self::resync) waiting for the data workers only (the control worker
    /// applies control commands from inside its burst).
    fn resync_workers(&self) -> bool {
        self.epoch.fetch_add(1, Ordering::Release);
        self.engine.sync_workers()
    }

    /// Internal index of the control queue (`2N`).
    pub fn ctrl_queue(&self) -> u16 {
        2 * self.params.queue_pairs
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker that panicked while holding the lock would be a bug in this crate;
        // the state itself stays consistent (every update is a plain field write).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The virtio-net config space (§5.1.4): MAC (as `MAC_ADDR_SET` last set it), link
    /// up, pairs, MTU.
    pub fn config_space(&self) -> [u8; net_config::LEN] {
        let mut c = [0u8; net_config::LEN];
        let mac = self.lock().rx.mac;
        c[net_config::MAC..net_config::MAC + 6].copy_from_slice(&mac);
        c[net_config::STATUS..net_config::STATUS + 2].copy_from_slice(&net_config::S_LINK_UP.to_le_bytes());
        c[net_config::MAX_VQ_PAIRS..net_config::MAX_VQ_PAIRS + 2]
            .copy_from_slice(&self.params.queue_pairs.to_le_bytes());
        c[net_config::MTU..net_config::MTU + 2].copy_from_slice(&self.params.mtu.to_le_bytes());
        c
    }

    /// Whether queue `q` (internal index) may run now (vhost-user §"Ring states": started
    /// by a kick fd, and not disabled by `SET_VRING_ENABLE`; see `QueueState::enabled` for
    /// why a ring that was never enabled explicitly still runs), plus virtio's rules: a
    /// receive queue of a pair beyond `VQ_PAIRS_SET` carries nothing (its transmit queue
    /// still runs, so what the guest sends there is consumed), and the control queue
    /// exists only with `CTRL_VQ`.
    fn runnable(st: &State, q: usize) -> bool {
        let Some(qs) = st.queues.get(q) else {
            return false;
        };
        let n = st.pairs();
        let allowed = if q == 2 * n {
            st.acked(f::NET_CTRL_VQ)
        } else {
            q % 2 == 1 || q / 2 < st.active_pairs as usize
        };
        allowed
            && st.connected
            && st.mem.is_some()
            && qs.addr_set
            && qs.size != 0
            && qs.started
            && qs.enabled != Some(false)
            && !qs.broken
            && !qs.paused
    }

    /// Called by a worker during resync: the ring for queue `q` if it may run now.
    /// Rings that fail validation are marked broken and counted.
    pub fn activate(&self, q: u16) -> Option<ActiveRing> {
        let st = self.lock();
        if !Self::runnable(&st, q as usize) {
            return None;
        }
        let mem = st.mem.clone()?;
        if mem.faulted() {
            drop(st);
            self.mark_broken(q, RingFault::MemoryGone);
            return None;
        }
        let feats = st.acked_features;
        let qs = &st.queues[q as usize];
        let cfg = RingConfig {
            size: qs.size,
            desc_uva: qs.desc,
            avail_uva: qs.avail,
            used_uva: qs.used,
            base: qs.base,
            event_idx: feats & f::bit(f::RING_EVENT_IDX) != 0,
            indirect: feats & f::bit(f::RING_INDIRECT_DESC) != 0,
            in_order: feats & f::bit(f::IN_ORDER) != 0,
        };
        let call = qs.call.clone();
        let kick = qs.kick.clone();
        let rx = st.rx.clone();
        // With ACCESS_PLATFORM every address the driver gives is an IOVA (vhost-user
        // §"IOMMU support"), ring addresses included.
        let iotlb = (feats & f::bit(f::ACCESS_PLATFORM) != 0).then(|| st.iotlb.clone());
        let call_fd = call.as_ref().map(|c| c.as_raw_fd());
        // VIRTIO_F_RING_PACKED makes every ring of the device packed (§2.8).
        let ring = if feats & f::bit(f::RING_PACKED) != 0 {
            PackedRing::new(&cfg, mem.clone(), call_fd, iotlb).map(|r| AnyRing::Packed(Box::new(r)))
        } else {
            DeviceRing::new(&cfg, mem.clone(), call_fd, iotlb).map(AnyRing::Split)
        };
        match ring {
            Ok(ring) => {
                // Relaxed: a statistics counter.
                self.activations.fetch_add(1, Ordering::Relaxed);
                Some(ActiveRing { ring, mem, kick, rx, _call: call })
            }
            Err(RingFault::IotlbMiss { iova, write }) => {
                // Not the driver's fault (yet): ask, and retry when the answer arrives.
                drop(st);
                self.iotlb_waiting.store(true, Ordering::Relaxed);
                self.send_miss(iova, write);
                None
            }
            Err(bad) => {
                drop(st);
                self.mark_broken(q, bad);
                None
            }
        }
    }

    /// Called by a worker during resync: it lets go of queue `q`'s ring; its position
    /// becomes the base the ring resumes from (and what `GET_VRING_BASE` reports).
    pub fn deactivate(&self, q: u16, active: ActiveRing) {
        let mut st = self.lock();
        if let Some(qs) = st.queues.get_mut(q as usize) {
            qs.base = active.ring.last_avail();
        }
    }

    /// Marks every queue of the device broken with `bad` (see [`mark_broken`](Self::mark_broken)).
    fn break_all(&self, bad: RingFault) {
        let ctrl = self.lock().acked(f::NET_CTRL_VQ);
        let last = if ctrl { self.ctrl_queue() + 1 } else { self.ctrl_queue() };
        for q in 0..last {
            self.mark_broken(q, bad);
        }
    }

    /// Marks queue `q` broken: counted, logged once per device, its error eventfd
    /// signalled, and never activated again until the front-end sets it up anew.
    ///
    /// When the device's memory was truncated under it (`sigbus.rs`), whatever the ring
    /// engine found is a consequence (the burst that faulted read zeros: an avail index
    /// that jumped back, a zero descriptor), so the fault is [`RingFault::MemoryGone`]
    /// whatever `bad` says: no drop is counted, the lost table once in `peer.mem_faults`.
    pub fn mark_broken(&self, q: u16, bad: RingFault) {
        let (err, bad) = {
            let mut st = self.lock();
            let bad = match &st.mem {
                Some(m) if m.faulted() => {
                    if m.take_fault() {
                        // Relaxed: a statistics counter.
                        self.peer.mem_faults.fetch_add(1, Ordering::Relaxed);
                    }
                    RingFault::MemoryGone
                }
                _ => bad,
            };
            let Some(qs) = st.queues.get_mut(q as usize) else {
                return;
            };
            qs.broken = true;
            (qs.err.clone(), bad)
        };
        match self.stats.get(q as usize / 2) {
            Some(pair) => {
                pair.broken.store(true, Ordering::Relaxed);
                if !matches!(bad, RingFault::MemoryGone | RingFault::NotQuiescent) {
                    pair.drops[DropReason::BadDescriptor as usize].fetch_add(1, Ordering::Relaxed);
                }
            }
            // The control queue. Relaxed: a statistics flag; the queue itself is stopped
            // through `qs.broken` under the lock.
            None => self.ctrl_broken.store(true, Ordering::Relaxed),
        }
        if !self.logged_broken.swap(true, Ordering::Relaxed) {
            warn!("{}: queue {q} broken: {bad}", self.params.socket.display());
        }
        if let Some(e) = err {
            signal(e.as_raw_fd());
        }
    }

    /// Frames the generator may still make (`u64::MAX`: no `--count`).
    pub fn gen_budget_left(&self) -> u64 {
        self.gen_budget.load(Ordering::Relaxed)
    }

    /// Reserves up to `n` frames of the generator's budget; returns how many it may make.
    pub fn take_gen_budget(&self, n: u64) -> u64 {
        let mut cur = self.gen_budget.load(Ordering::Relaxed);
        loop {
            if cur == u64::MAX {
                return n;
            }
            let take = n.min(cur);
            // Relaxed: the budget orders nothing else; the CAS alone keeps it exact.
            match self.gen_budget.compare_exchange_weak(cur, cur - take, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return take,
                Err(now) => cur = now,
            }
        }
    }

    /// Gives back frames reserved with [`take_gen_budget`](Self::take_gen_budget) but not made.
    pub fn return_gen_budget(&self, n: u64) {
        if n > 0 && self.gen_budget.load(Ordering::Relaxed) != u64::MAX {
            self.gen_budget.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Applies one control command (`data`: its device-readable bytes) and returns the
    /// acknowledgement. A valid command changes device state under the lock, then (if it
    /// changed anything) every data worker re-activates its rings from it
    /// ([`Engine::sync_workers`]) before this returns `VIRTIO_NET_OK`: the change is in
    /// effect for every frame the guest sees after the acknowledgement. Called by the
    /// control worker only (never with a lock held).
    pub fn apply_ctrl(&self, data: &[u8]) -> u8 {
        let (parsed, changed) = {
            let mut st = self.lock();
            let parsed = ctrl::parse(data, st.acked_features, self.params.queue_pairs);
            let changed = match &parsed {
                Ok(Command::VqPairs(n)) => std::mem::replace(&mut st.active_pairs, *n) != *n,
                Ok(cmd) => {
                    let mut rx = (*st.rx).clone();
                    rx.apply(cmd);
                    let changed = rx != *st.rx;
                    st.rx = Arc::new(rx);
                    changed
                }
                Err(_) => false,
            };
            (parsed, changed)
        };
        match parsed {
            Ok(cmd) => {
                // A command that changes nothing (the driver repeating itself) costs the
                // data workers no resync.
                if changed {
                    self.resync_workers();
                }
                // Relaxed: statistics counters, ordered with nothing else.
                self.ctrl_ok.fetch_add(1, Ordering::Relaxed);
                debug!("{}: control command {cmd:?} applied", self.params.socket.display());
                ctrl::ACK_OK
            }
            Err(why) => {
                self.refuse_ctrl(&why);
                ctrl::ACK_ERR
            }
        }
    }

    /// Counts a refused control command (logged once per connection, then at debug level).
    pub fn refuse_ctrl(&self, why: &Refused) {
        // Relaxed: a statistics counter and a log-once flag, ordered with nothing else.
        self.ctrl_err.fetch_add(1, Ordering::Relaxed);
        if !self.logged_ctrl.swap(true, Ordering::Relaxed) {
            warn!("{}: control command refused: {why}", self.params.socket.display());
        } else {
            debug!("{}: control command refused: {why}", self.params.socket.display());
        }
    }

    /// Statistics at this moment.
    pub fn snapshot(&self) -> DeviceSnapshot {
        let (connected, rx, active_pairs, tlb) = {
            let st = self.lock();
            (st.connected, st.rx.clone(), st.active_pairs, st.iotlb.clone())
        };
        let c = &self.iotlb_stats;
        let iotlb = IotlbSnapshot {
            updates: c.updates.load(Ordering::Relaxed),
            invalidates: c.invalidates.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            timeouts: c.timeouts.load(Ordering::Relaxed),
            entries: tlb.len() as u64,
        };
        DeviceSnapshot {
            socket: self.params.socket.display().to_string(),
            port: self.params.kind.name(),
            connected,
            generated: self.generated.load(Ordering::Relaxed),
            pairs: self.stats.iter().map(|s| s.snapshot()).collect(),
            ctrl: CtrlSnapshot {
                ok: self.ctrl_ok.load(Ordering::Relaxed),
                err: self.ctrl_err.load(Ordering::Relaxed),
                broken: self.ctrl_broken.load(Ordering::Relaxed),
            },
            active_pairs,
            rx_filter: rx.to_json(),
            iotlb,
            tap: self.params.tap.clone(),
            activations: self.activations.load(Ordering::Relaxed),
            peer: PeerSnapshot {
                mem_table_refused: self.peer.mem_table_refused.load(Ordering::Relaxed),
                fds_refused: self.peer.fds_refused.load(Ordering::Relaxed),
                mem_faults: self.peer.mem_faults.load(Ordering::Relaxed),
            },
        }
    }

    /// A front-end connected: start from a clean device.
    pub fn connect(&self) {
        *self.lock() = State::reset(&self.params, true);
        *self.backend_channel.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.logged_broken.store(false, Ordering::Relaxed);
        self.logged_ctrl.store(false, Ordering::Relaxed);
        self.logged_iotlb.store(false, Ordering::Relaxed);
        info!("{}: front-end connected", self.params.socket.display());
        self.resync();
    }

    /// The front-end went away: reset the device (workers drop its rings and memory).
    pub fn disconnect(&self) {
        *self.lock() = State::reset(&self.params, false);
        *self.backend_channel.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.resync();
        info!("{}: front-end disconnected, device reset", self.params.socket.display());
    }

    /// Applies `change` to the front-end's queue `index`: pauses it first if it is
    /// running, so that the worker's position is written back before the change, then
    /// lets workers pick up the result.
    /// `SET_VRING_ENABLE(true)` for a queue whose runnability it does not change (not
    /// disabled now): recorded in place, no resync. Returns whether it was (false: go
    /// through [`change_queue`](Self::change_queue)).
    pub(crate) fn enable_running_queue(&self, index: u32) -> bool {
        let mut st = self.lock();
        let Some(q) = st.queue_index(index) else {
            return false;
        };
        let qs = &mut st.queues[q];
        if qs.enabled == Some(false) {
            return false;
        }
        qs.enabled = Some(true);
        true
    }

    fn change_queue(&self, index: u32, change: impl FnOnce(&mut QueueState) -> VuResult<()>) -> VuResult<()> {
        self.change_queue_at(index, change).map(|_| ())
    }

    /// [`change_queue`](Self::change_queue), returning the queue's internal index.
    fn change_queue_at(
        &self,
        index: u32,
        change: impl FnOnce(&mut QueueState) -> VuResult<()>,
    ) -> VuResult<usize> {
        let (q, running) = {
            let mut st = self.lock();
            let Some(q) = st.queue_index(index) else {
                return Err(VuError::InvalidParam);
            };
            let running = Self::runnable(&st, q);
            if running {
                st.queues[q].paused = true;
            }
            (q, running)
        };
        if running && !self.resync() {
            // The worker may still hold the ring (its position not written back): a base
            // read or set now would be wrong. The ring breaks instead.
            self.lock().queues[q].paused = false;
            self.mark_broken(q as u16, RingFault::NotQuiescent);
            return Err(VuError::BackendInternalError);
        }
        let res = {
            let mut st = self.lock();
            let qs = &mut st.queues[q];
            qs.paused = false;
            change(qs)
        };
        self.resync();
        res.map(|()| q)
    }
}
