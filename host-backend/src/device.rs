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
//! then followed by [`Engine::sync`], which returns once every worker has dropped what
//! it held and re-activated what may run. A change to a queue that is running first
//! pauses it (sync), so the worker's final position is written back before the change.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use driver::layout::{features as f, net_config};
use log::{info, warn};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserVringAddrFlags,
    VhostUserVringState,
};
use vhost::vhost_user::{Error as VuError, Result as VuResult, VhostUserBackendReqHandler};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::{GuestMemory, RegionDesc};
use crate::split_ring::{signal, Bad, DeviceRing, RingConfig};
use crate::stats::{DeviceSnapshot, DropReason, PairStats};
use crate::worker::Engine;

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
}

impl PortKind {
    /// The name used on the command line and in statistics.
    pub fn name(self) -> &'static str {
        match self {
            PortKind::Sink => "sink",
            PortKind::Gen => "gen",
            PortKind::Reflect => "reflect",
            PortKind::Xconnect => "xconnect",
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

#[derive(Default)]
struct State {
    connected: bool,
    acked_features: u64,
    acked_protocol: u64,
    mem: Option<Arc<GuestMemory>>,
    queues: Vec<QueueState>,
}

/// A ring handed to a worker, with what it needs besides the ring itself.
pub struct ActiveRing {
    /// The ring.
    pub ring: DeviceRing,
    /// The kick eventfd the worker sleeps on, if any.
    pub kick: Option<Arc<EventFd>>,
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
    engine: Arc<Engine>,
}

/// Features this device offers.
pub fn offered_features(queue_pairs: u16) -> u64 {
    let mut v = f::bit(f::VERSION_1)
        | f::bit(f::NET_MAC)
        | f::bit(f::NET_STATUS)
        | f::bit(f::NET_MTU)
        | f::bit(f::RING_EVENT_IDX)
        | f::bit(f::RING_INDIRECT_DESC)
        | f::bit(f::IN_ORDER)
        | f::bit(f::VHOST_USER_PROTOCOL_FEATURES);
    if queue_pairs > 1 {
        v |= f::bit(f::NET_MQ);
    }
    v
}

/// Protocol features this device offers. Never STATUS, RARP, MTU or IOTLB: the `vhost`
/// crate's request loop rejects their messages (see `../shared/notes/crates.md`).
pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG
}

impl Device {
    /// A device with no front-end yet.
    pub fn new(params: DeviceParams, engine: Arc<Engine>, gen_count: Option<u64>) -> Arc<Device> {
        let nq = params.queue_pairs as usize * 2;
        let stats = (0..params.queue_pairs).map(|_| PairStats::default()).collect();
        Arc::new(Device {
            params,
            state: Mutex::new(State {
                queues: (0..nq).map(|_| QueueState::default()).collect(),
                ..State::default()
            }),
            stats,
            generated: AtomicU64::new(0),
            gen_budget: AtomicU64::new(gen_count.unwrap_or(u64::MAX)),
            logged_broken: AtomicBool::new(false),
            engine,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker that panicked while holding the lock would be a bug in this crate;
        // the state itself stays consistent (every update is a plain field write).
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The virtio-net config space (§5.1.4): MAC, link up, pairs, MTU.
    pub fn config_space(&self) -> [u8; net_config::LEN] {
        let mut c = [0u8; net_config::LEN];
        c[net_config::MAC..net_config::MAC + 6].copy_from_slice(&self.params.mac);
        c[net_config::STATUS..net_config::STATUS + 2].copy_from_slice(&net_config::S_LINK_UP.to_le_bytes());
        c[net_config::MAX_VQ_PAIRS..net_config::MAX_VQ_PAIRS + 2]
            .copy_from_slice(&self.params.queue_pairs.to_le_bytes());
        c[net_config::MTU..net_config::MTU + 2].copy_from_slice(&self.params.mtu.to_le_bytes());
        c
    }

    /// Whether queue `q` may run now (vhost-user §"Ring states": started by a kick fd,
    /// and not disabled by `SET_VRING_ENABLE`; see `QueueState::enabled` for why a ring
    /// that was never enabled explicitly still runs).
    fn runnable(st: &State, q: usize) -> bool {
        let Some(qs) = st.queues.get(q) else {
            return false;
        };
        st.connected
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
        };
        let call = qs.call.clone();
        let kick = qs.kick.clone();
        match DeviceRing::new(&cfg, mem, call.as_ref().map(|c| c.as_raw_fd())) {
            Ok(ring) => Some(ActiveRing { ring, kick, _call: call }),
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

    /// Marks queue `q` broken: counted, logged once per device, its error eventfd
    /// signalled, and never activated again until the front-end sets it up anew.
    pub fn mark_broken(&self, q: u16, bad: Bad) {
        let err = {
            let mut st = self.lock();
            let Some(qs) = st.queues.get_mut(q as usize) else {
                return;
            };
            qs.broken = true;
            qs.err.clone()
        };
        let pair = &self.stats[q as usize / 2];
        pair.broken.store(true, Ordering::Relaxed);
        pair.drops[DropReason::BadDescriptor as usize].fetch_add(1, Ordering::Relaxed);
        if !self.logged_broken.swap(true, Ordering::Relaxed) {
            warn!("{}: queue {q} broken: {bad}", self.params.socket.display());
        }
        if let Some(e) = err {
            signal(e.as_raw_fd());
        }
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

    /// Statistics at this moment.
    pub fn snapshot(&self) -> DeviceSnapshot {
        DeviceSnapshot {
            socket: self.params.socket.display().to_string(),
            port: self.params.kind.name(),
            connected: self.lock().connected,
            generated: self.generated.load(Ordering::Relaxed),
            pairs: self.stats.iter().map(|s| s.snapshot()).collect(),
        }
    }

    /// A front-end connected: start from a clean device.
    pub fn connect(&self) {
        {
            let mut st = self.lock();
            let nq = st.queues.len();
            *st = State {
                connected: true,
                queues: (0..nq).map(|_| QueueState::default()).collect(),
                ..State::default()
            };
        }
        self.logged_broken.store(false, Ordering::Relaxed);
        info!("{}: front-end connected", self.params.socket.display());
        self.engine.sync();
    }

    /// The front-end went away: reset the device (workers drop its rings and memory).
    pub fn disconnect(&self) {
        {
            let mut st = self.lock();
            let nq = st.queues.len();
            *st = State { queues: (0..nq).map(|_| QueueState::default()).collect(), ..State::default() };
        }
        self.engine.sync();
        info!("{}: front-end disconnected, device reset", self.params.socket.display());
    }

    /// Applies `change` to queue `q`: pauses it first if it is running, so that the
    /// worker's position is written back before the change, then lets workers pick up
    /// the result.
    fn change_queue(&self, q: u32, change: impl FnOnce(&mut QueueState) -> VuResult<()>) -> VuResult<()> {
        let q = q as usize;
        let running = {
            let mut st = self.lock();
            if q >= st.queues.len() {
                return Err(VuError::InvalidParam);
            }
            let running = Self::runnable(&st, q);
            if running {
                st.queues[q].paused = true;
            }
            running
        };
        if running {
            self.engine.sync();
        }
        let res = {
            let mut st = self.lock();
            let qs = &mut st.queues[q];
            qs.paused = false;
            change(qs)
        };
        self.engine.sync();
        res
    }
}

/// The vhost-user request handler of one device (interior mutability; the `vhost`
/// crate's `BackendReqHandler` calls it from the device's control thread).
pub struct Handler(pub Arc<Device>);

fn eventfd_from(file: Option<File>) -> Option<Arc<EventFd>> {
    // SAFETY: `into_raw_fd` hands over sole ownership of a valid fd to the EventFd.
    file.map(|f| Arc::new(unsafe { EventFd::from_raw_fd(f.into_raw_fd()) }))
}

impl VhostUserBackendReqHandler for Handler {
    fn set_owner(&self) -> VuResult<()> {
        Ok(())
    }
    fn reset_owner(&self) -> VuResult<()> {
        self.0.disconnect();
        self.0.connect();
        Ok(())
    }
    fn reset_device(&self) -> VuResult<()> {
        self.reset_owner()
    }
    fn get_features(&self) -> VuResult<u64> {
        Ok(offered_features(self.0.params.queue_pairs))
    }
    fn set_features(&self, features: u64) -> VuResult<()> {
        let offered = offered_features(self.0.params.queue_pairs);
        log::debug!("{}: SET_FEATURES {features:#x}", self.0.params.socket.display());
        if features & !offered != 0 {
            warn!(
                "{}: front-end acked features {:#x} we did not offer",
                self.0.params.socket.display(),
                features & !offered
            );
            return Err(VuError::InvalidParam);
        }
        self.0.lock().acked_features = features;
        self.0.engine.sync();
        Ok(())
    }
    fn set_mem_table(
        &self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<vhost::VhostUserMemoryRegionBase>>> {
        let regions: Vec<RegionDesc> = ctx
            .iter()
            .map(|r| RegionDesc {
                gpa: r.guest_phys_addr,
                len: r.memory_size,
                uva: r.user_addr,
                mmap_offset: r.mmap_offset,
            })
            .collect();
        let mem = GuestMemory::map(&regions, files).map_err(|e| {
            warn!("{}: {e}", self.0.params.socket.display());
            VuError::InvalidParam
        })?;
        info!("{}: memory table with {} region(s)", self.0.params.socket.display(), mem.region_count());
        self.0.lock().mem = Some(Arc::new(mem));
        self.0.engine.sync();
        Ok(None)
    }
    fn set_vring_num(&self, index: u32, num: u32) -> VuResult<()> {
        if num == 0 || num > driver::layout::MAX_QUEUE_SIZE as u32 || !num.is_power_of_two() {
            return Err(VuError::InvalidParam);
        }
        self.0.change_queue(index, |q| {
            q.size = num as u16;
            Ok(())
        })
    }
    fn set_vring_addr(
        &self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        self.0.change_queue(index, |q| {
            q.desc = descriptor;
            q.used = used;
            q.avail = available;
            q.addr_set = true;
            q.broken = false;
            Ok(())
        })
    }
    fn set_vring_base(&self, index: u32, base: u32) -> VuResult<()> {
        let base = u16::try_from(base).map_err(|_| VuError::InvalidParam)?;
        self.0.change_queue(index, |q| {
            q.base = base;
            q.broken = false;
            Ok(())
        })
    }
    fn get_vring_base(&self, index: u32) -> VuResult<VhostUserVringState> {
        log::debug!("{}: GET_VRING_BASE {index}", self.0.params.socket.display());
        // Stops the ring (vhost-user: "the back-end must stop the ring"); the pause in
        // `change_queue` makes the worker write its final position back first.
        self.0.change_queue(index, |q| {
            q.started = false;
            Ok(())
        })?;
        let base = self.0.lock().queues[index as usize].base;
        Ok(VhostUserVringState::new(index, base as u32))
    }
    fn set_vring_kick(&self, index: u8, fd: Option<File>) -> VuResult<()> {
        log::debug!("{}: SET_VRING_KICK {index} (fd: {})", self.0.params.socket.display(), fd.is_some());
        let kick = eventfd_from(fd);
        self.0.change_queue(index as u32, |q| {
            q.kick = kick;
            q.started = true;
            Ok(())
        })
    }
    fn set_vring_call(&self, index: u8, fd: Option<File>) -> VuResult<()> {
        let call = eventfd_from(fd);
        self.0.change_queue(index as u32, |q| {
            q.call = call;
            Ok(())
        })
    }
    fn set_vring_err(&self, index: u8, fd: Option<File>) -> VuResult<()> {
        let err = eventfd_from(fd);
        self.0.change_queue(index as u32, |q| {
            q.err = err;
            Ok(())
        })
    }
    fn get_protocol_features(&self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(offered_protocol_features())
    }
    fn set_protocol_features(&self, features: u64) -> VuResult<()> {
        self.0.lock().acked_protocol = features;
        Ok(())
    }
    fn get_queue_num(&self) -> VuResult<u64> {
        // For virtio-net, QEMU and DPDK read this as the number of queue pairs.
        Ok(self.0.params.queue_pairs as u64)
    }
    fn set_vring_enable(&self, index: u32, enable: bool) -> VuResult<()> {
        log::debug!("{}: SET_VRING_ENABLE {index} {enable}", self.0.params.socket.display());
        self.0.change_queue(index, |q| {
            q.enabled = Some(enable);
            Ok(())
        })
    }
    fn get_config(&self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        let cfg = self.0.config_space();
        let end = offset.checked_add(size).ok_or(VuError::InvalidParam)? as usize;
        cfg.get(offset as usize..end).map(|s| s.to_vec()).ok_or(VuError::InvalidParam)
    }
    fn set_config(&self, _offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> VuResult<()> {
        Err(VuError::InvalidOperation("virtio-net config space is read-only"))
    }
    fn set_gpu_socket(&self, _gpu_backend: vhost::vhost_user::GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU device"))
    }
    fn get_shared_object(&self, _uuid: vhost::vhost_user::message::VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation("no shared objects"))
    }
    fn get_inflight_fd(
        &self,
        _inflight: &vhost::vhost_user::message::VhostUserInflight,
    ) -> VuResult<(vhost::vhost_user::message::VhostUserInflight, File)> {
        Err(VuError::InvalidOperation("inflight tracking not offered"))
    }
    fn set_inflight_fd(
        &self,
        _inflight: &vhost::vhost_user::message::VhostUserInflight,
        _file: File,
    ) -> VuResult<()> {
        Err(VuError::InvalidOperation("inflight tracking not offered"))
    }
    fn get_max_mem_slots(&self) -> VuResult<u64> {
        Err(VuError::InvalidOperation("CONFIGURE_MEM_SLOTS not offered"))
    }
    fn add_mem_region(
        &self,
        _region: &vhost::vhost_user::message::VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<vhost::VhostUserMemoryRegionBase>> {
        Err(VuError::InvalidOperation("CONFIGURE_MEM_SLOTS not offered"))
    }
    fn remove_mem_region(
        &self,
        _region: &vhost::vhost_user::message::VhostUserSingleMemoryRegion,
    ) -> VuResult<()> {
        Err(VuError::InvalidOperation("CONFIGURE_MEM_SLOTS not offered"))
    }
    fn set_device_state_fd(
        &self,
        _direction: vhost::vhost_user::message::VhostTransferStateDirection,
        _phase: vhost::vhost_user::message::VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(VuError::InvalidOperation("device state transfer not offered"))
    }
    fn check_device_state(&self) -> VuResult<()> {
        Err(VuError::InvalidOperation("device state transfer not offered"))
    }
    fn get_shmem_config(&self) -> VuResult<vhost::vhost_user::message::VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("no shared memory regions"))
    }
    fn set_log_base(&self, _log: &vhost::vhost_user::message::VhostUserLog, _file: File) -> VuResult<()> {
        Err(VuError::InvalidOperation("dirty logging not offered"))
    }
}
