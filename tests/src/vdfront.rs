//! `virtio-drivers` (rcore-os, crates.io) as an independent reference front-end over
//! vhost-user ("virtio-user"), for checking our backend with a driver we did not write.
//!
//! Two pieces plug `virtio-drivers`' device drivers (e.g. `VirtIONetRaw`) into a
//! vhost-user socket:
//!
//! * [`VhostUserTransport`] implements [`virtio_drivers::transport::Transport`] on the
//!   `vhost` crate's [`Frontend`]: feature bits map to `GET_FEATURES`/`SET_FEATURES`,
//!   `queue_set` to `SET_VRING_NUM/ADDR/BASE/CALL/KICK` + `SET_VRING_ENABLE(1)`,
//!   `notify` to a write of the queue's kick eventfd, config space to a copy of the
//!   backend's `GET_CONFIG` answer taken at connect time, and a reset (status 0) or
//!   `queue_unset` to `SET_VRING_ENABLE(0)` + `GET_VRING_BASE` per started ring (what
//!   DPDK's virtio-user does on stop). Device status is local state: vhost-user has no
//!   status register.
//! * [`ArenaHal`] implements [`virtio_drivers::Hal`] on one process-wide "guest memory"
//!   arena: a memfd of [`ARENA_SIZE`] bytes mapped `MAP_SHARED` and given to the backend
//!   with `SET_MEM_TABLE` as one region whose guest-physical address is its virtual
//!   address in this process (`mmap_offset` 0; DPDK virtio-user's convention). Ring
//!   memory comes from it (`dma_alloc`); `share` passes buffers that already lie inside
//!   it through unchanged and copies every other buffer (stack, heap) into a bounce
//!   buffer from the same arena, which `unshare` copies back from (device-writable
//!   buffers) and frees.
//!
//! # One front-end per process
//!
//! The `Hal` trait's methods take no `self`, so the arena is process-global (a
//! `static`). The arena is shared memory with whatever backend this front-end talks
//! to, so only **one** [`VhostUserTransport`] may exist at a time in a process:
//! [`VhostUserTransport::connect`] fails while another is alive. (Tests in one binary
//! take the harness lock, `harness::serial()`, anyway.) A later front-end in the same
//! process reuses the same arena and registers it with its own backend.
//!
//! # Errors
//!
//! Most `Transport` methods return nothing, so a failed vhost-user message cannot be
//! reported where it happens. Every such failure is recorded in the transport's
//! [`Diagnostics`] (a cheap cloneable handle, to keep after the transport has been moved
//! into a driver); tests must check [`Diagnostics::errors`]. `Hal::share` cannot fail
//! either: when the bounce arena is exhausted it panics with an explanation (there is
//! no other way to refuse).

use std::collections::{BTreeMap, HashMap};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use driver::layout::features;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{BufferDirection, Hal, PhysAddr, PAGE_SIZE};
use vmm_sys_util::eventfd::EventFd;
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Size of the process-wide guest-memory arena. Ring pages are never freed (see
/// [`ArenaHal`]); bounce buffers are, except those still posted when a driver is
/// dropped (e.g. unused receive buffers: 256 x ~1.5 KiB per device), so this leaves room
/// for many sequential front-ends in one test process.
pub const ARENA_SIZE: usize = 16 << 20;

/// What [`Transport::max_queue_size`] reports for every queue.
pub const MAX_QUEUE_SIZE: u32 = 256;

/// Bytes of `struct virtio_net_config` fetched with `GET_CONFIG`: mac[6], status u16,
/// max_virtqueue_pairs u16, mtu u16.
pub const NET_CONFIG_LEN: usize = 12;

/// How long [`VhostUserTransport::connect`] retries while the socket does not exist yet
/// or refuses connections.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one vhost-user request may wait for the socket (send or reply).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Queue-index bound the `vhost` frontend enforces on its side: virtio-drivers' net
/// driver uses one RX/TX pair (queues 0 and 1).
const MAX_QUEUES: u64 = 2;

/// Alignment of bounce buffers.
const BOUNCE_ALIGN: usize = 64;

// ------------------------------------------------------------------------------ arena

/// First-fit allocator over `[0, size)` offsets, with coalescing frees.
struct Allocator {
    /// Free ranges, offset -> length, non-adjacent and non-overlapping.
    free: BTreeMap<usize, usize>,
    /// Live bounce buffers: guest address -> length.
    bounces: HashMap<u64, usize>,
}

impl Allocator {
    fn new(size: usize) -> Allocator {
        Allocator { free: BTreeMap::from([(0, size)]), bounces: HashMap::new() }
    }

    /// Offset of `len` bytes aligned to `align` (a power of two) relative to `base`,
    /// which is the arena's (page-aligned) address, so aligning the absolute address.
    fn alloc(&mut self, base: usize, len: usize, align: usize) -> Option<usize> {
        let len = len.max(1);
        let (start, size, at) = self.free.iter().find_map(|(&start, &size)| {
            let at = (base + start).checked_next_multiple_of(align)? - base;
            (at + len <= start + size).then_some((start, size, at))
        })?;
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at - start);
        }
        if at + len < start + size {
            self.free.insert(at + len, start + size - (at + len));
        }
        Some(at)
    }

    fn release(&mut self, off: usize, len: usize) {
        let len = len.max(1);
        let mut start = off;
        let mut end = off + len;
        if let Some((&p, &plen)) = self.free.range(..off).next_back() {
            if p + plen == off {
                self.free.remove(&p);
                start = p;
            }
        }
        if let Some(nlen) = self.free.remove(&end) {
            end += nlen;
        }
        self.free.insert(start, end - start);
    }

    fn free_bytes(&self) -> usize {
        self.free.values().sum()
    }
}

/// The process-wide guest memory: one shared memfd mapping, never unmapped.
struct Arena {
    /// The memfd and its shared mapping (the driver's DMA arena type); `SET_MEM_TABLE`
    /// sends its fd to each backend.
    mem: driver::dma::DmaArena,
    /// Address of the mapping (= guest-physical address of its first byte).
    base: usize,
    size: usize,
    alloc: Mutex<Allocator>,
}

impl Arena {
    fn create(size: usize) -> Result<Arena, String> {
        let mem = driver::dma::DmaArena::new(size, false).map_err(|e| format!("arena: {e}"))?;
        // The mapping lives for the rest of the process: `Arena` sits in a static and is
        // never dropped, so every pointer handed out stays valid.
        let (base, size) = (mem.va() as usize, mem.len());
        Ok(Arena { mem, base, size, alloc: Mutex::new(Allocator::new(size)) })
    }

    fn contains(&self, addr: usize, len: usize) -> bool {
        addr >= self.base && addr.checked_add(len).is_some_and(|end| end <= self.base + self.size)
    }

    fn lock(&self) -> MutexGuard<'_, Allocator> {
        self.alloc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Allocates `len` bytes aligned to `align`; returns the address.
    fn alloc(&self, len: usize, align: usize) -> Result<usize, String> {
        let mut a = self.lock();
        match a.alloc(self.base, len, align) {
            Some(off) => Ok(self.base + off),
            None => Err(format!(
                "vdfront arena exhausted: {len} bytes (align {align}) do not fit; {} of {} bytes free",
                a.free_bytes(),
                self.size
            )),
        }
    }
}

static ARENA: OnceLock<Result<Arena, String>> = OnceLock::new();

/// The process-wide arena, created on first use.
fn arena() -> Result<&'static Arena, String> {
    ARENA.get_or_init(|| Arena::create(ARENA_SIZE)).as_ref().map_err(|e| format!("vdfront arena: {e}"))
}

/// `(guest address, size)` of the process-wide arena (creating it if needed).
pub fn arena_range() -> Result<(u64, u64), String> {
    let a = arena()?;
    Ok((a.base as u64, a.size as u64))
}

/// Number of bounce buffers currently lent to the device (for leak checks in tests).
pub fn live_bounce_buffers() -> usize {
    arena().map(|a| a.lock().bounces.len()).unwrap_or(0)
}

/// [`Hal`] over the process-wide memfd arena. See the module docs.
///
/// * `dma_alloc` carves zeroed, 4 KiB-aligned pages from the arena. `dma_dealloc` is a
///   no-op: ring memory is never reused, so a backend that still reads or writes a ring
///   after the driver let go of it (it learns only through `GET_VRING_BASE` or the
///   disconnect, asynchronously) cannot corrupt a later allocation.
/// * `share` returns the buffer's own address if it lies entirely inside the arena
///   (guest-physical = virtual); otherwise it copies the buffer into a bounce buffer
///   from the arena (for every direction, so bytes the device does not write keep the
///   caller's values when copied back) and returns that.
/// * `unshare` copies a bounce buffer back into the caller's buffer unless the
///   direction is `DriverToDevice`, and frees it.
pub struct ArenaHal;

// SAFETY: `dma_alloc` returns page-aligned, zeroed memory inside the arena mapping, which
// is never unmapped, and hands each range out once (it is never reused, see
// `dma_dealloc`), so it aliases no other allocation. `share` returns the address of
// memory the device can reach (inside the arena registered with SET_MEM_TABLE) holding
// the buffer's contents, and `unshare` copies device-written bytes back. MMIO is not
// used by this transport.
unsafe impl Hal for ArenaHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let fail = (0, NonNull::dangling());
        let Some(len) = pages.checked_mul(PAGE_SIZE) else {
            return fail;
        };
        let Ok(arena) = arena() else {
            return fail;
        };
        let Ok(addr) = arena.alloc(len, PAGE_SIZE) else {
            return fail; // virtio-drivers turns paddr 0 into Error::DmaError.
        };
        let ptr = addr as *mut u8;
        // SAFETY: [addr, addr + len) lies inside the live arena mapping and was just
        // handed out by the allocator, so nothing else uses it.
        unsafe { ptr.write_bytes(0, len) };
        match NonNull::new(ptr) {
            Some(p) => (addr as PhysAddr, p),
            None => fail,
        }
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, _vaddr: NonNull<u8>, _pages: usize) -> i32 {
        // Deliberately leaked: see the type docs (ring memory is never reused).
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, size: usize) -> NonNull<u8> {
        // Only PciTransport calls this; VhostUserTransport has no MMIO.
        panic!("ArenaHal::mmio_phys_to_virt({paddr:#x}, {size}): vhost-user has no MMIO regions");
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        let len = buffer.len();
        let src = buffer.as_ptr().cast::<u8>();
        let arena = arena().unwrap_or_else(|e| panic!("ArenaHal::share: {e}"));
        if arena.contains(src as usize, len) {
            return src as PhysAddr;
        }
        let addr = arena.alloc(len, BOUNCE_ALIGN).unwrap_or_else(|e| {
            panic!("ArenaHal::share: cannot bounce a {len}-byte buffer: {e} (Hal::share cannot fail)")
        });
        // SAFETY: the caller guarantees `buffer` is valid for `len` bytes and not accessed
        // by others during this call; [addr, addr + len) is a fresh arena allocation that
        // the device does not own yet (it is published only after we return). The two
        // ranges cannot overlap: `buffer` is not inside the arena.
        unsafe { std::ptr::copy_nonoverlapping(src, addr as *mut u8, len) };
        arena.lock().bounces.insert(addr as u64, len);
        addr as PhysAddr
    }

    unsafe fn unshare(paddr: PhysAddr, buffer: NonNull<[u8]>, direction: BufferDirection) {
        let dst = buffer.as_ptr().cast::<u8>();
        if paddr == dst as PhysAddr {
            return; // shared in place, not bounced
        }
        let arena = arena().unwrap_or_else(|e| panic!("ArenaHal::unshare: {e}"));
        let len = arena
            .lock()
            .bounces
            .remove(&paddr)
            .unwrap_or_else(|| panic!("ArenaHal::unshare: {paddr:#x} is not a live bounce buffer"));
        if len != buffer.len() {
            panic!(
                "ArenaHal::unshare: bounce buffer {paddr:#x} has {len} bytes, buffer has {}",
                buffer.len()
            );
        }
        if direction != BufferDirection::DriverToDevice {
            // SAFETY: the bounce buffer [paddr, paddr + len) is a live arena allocation
            // (just removed from `bounces`, so ours alone); the device has returned it
            // (unshare runs after pop_used); the caller guarantees `buffer` is valid for
            // `len` bytes and unaliased during this call; they do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(paddr as *const u8, dst, len) };
        }
        arena.lock().release(paddr as usize - arena.base, len);
    }
}

// ------------------------------------------------------------------------------ diagnostics

#[derive(Default)]
struct DiagInner {
    errors: Vec<String>,
    vring_bases: Vec<(u16, u32)>,
    driver_features: u64,
}

/// What a [`VhostUserTransport`] could not report through the `Transport` trait: failed
/// vhost-user messages, and the ring positions the backend returned when rings were
/// stopped. Cloning shares the same record.
#[derive(Clone, Default)]
pub struct Diagnostics(Arc<Mutex<DiagInner>>);

impl Diagnostics {
    fn lock(&self) -> MutexGuard<'_, DiagInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn error(&self, e: String) {
        self.lock().errors.push(e);
    }

    /// Every failure so far, in order.
    pub fn errors(&self) -> Vec<String> {
        self.lock().errors.clone()
    }

    /// `Err` with every failure so far, if any.
    pub fn check(&self) -> Result<(), String> {
        let e = self.errors();
        if e.is_empty() {
            Ok(())
        } else {
            Err(format!("vhost-user front-end errors: {}", e.join("; ")))
        }
    }

    /// `(queue, GET_VRING_BASE answer)` for every ring stopped so far, in order.
    pub fn vring_bases(&self) -> Vec<(u16, u32)> {
        self.lock().vring_bases.clone()
    }

    /// The feature bits last sent with `SET_FEATURES` (0 before).
    pub fn driver_features(&self) -> u64 {
        self.lock().driver_features
    }
}

// ------------------------------------------------------------------------------ transport

/// A started ring's eventfds.
struct QueueFds {
    kick: EventFd,
    call: EventFd,
}

/// Set while a [`VhostUserTransport`] exists (one per process; see the module docs).
static CLAIMED: AtomicBool = AtomicBool::new(false);

/// `virtio_drivers` transport over a vhost-user socket. See the module docs.
pub struct VhostUserTransport {
    frontend: Frontend,
    device_features: u64,
    protocol_features: VhostUserProtocolFeatures,
    driver_features: u64,
    status: DeviceStatus,
    /// The config space the backend returned at connect (empty without CONFIG).
    config: Vec<u8>,
    queues: Vec<Option<QueueFds>>,
    diag: Diagnostics,
}

impl VhostUserTransport {
    /// Connects to the backend listening at `path` (retrying for up to
    /// [`CONNECT_TIMEOUT`] while it does not exist or refuses), then sends `SET_OWNER`,
    /// `GET_FEATURES`, and, if `VHOST_USER_F_PROTOCOL_FEATURES` is offered,
    /// `GET_PROTOCOL_FEATURES` / `SET_PROTOCOL_FEATURES` (acking MQ, REPLY_ACK and
    /// CONFIG as offered; with REPLY_ACK every later request asks for an ack, so a
    /// refusal shows up in [`Diagnostics`]) and, with CONFIG, `GET_CONFIG` of the
    /// [`NET_CONFIG_LEN`]-byte virtio-net config space, which is cached.
    ///
    /// Fails if another `VhostUserTransport` is alive in this process.
    pub fn connect(path: &Path) -> Result<VhostUserTransport, String> {
        if CLAIMED.swap(true, Ordering::AcqRel) {
            return Err("another VhostUserTransport exists in this process (the Hal arena is global)".into());
        }
        match Self::connect_claimed(path) {
            Ok(t) => Ok(t),
            Err(e) => {
                CLAIMED.store(false, Ordering::Release);
                Err(e)
            }
        }
    }

    fn connect_claimed(path: &Path) -> Result<VhostUserTransport, String> {
        arena()?; // surface an arena failure here rather than in a Hal call
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let sock = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(format!("connect {}: {e}", path.display())),
            }
        };
        // Bounds every request/reply exchange: a backend that stops answering makes the
        // pending call fail instead of blocking the test forever.
        sock.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(|e| format!("set_read_timeout: {e}"))?;
        sock.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(|e| format!("set_write_timeout: {e}"))?;
        let mut frontend = Frontend::from_stream(sock, MAX_QUEUES);
        let step = |what: &str, e: vhost::Error| format!("{}: {what}: {e}", path.display());

        frontend.set_owner().map_err(|e| step("SET_OWNER", e))?;
        let device_features = frontend.get_features().map_err(|e| step("GET_FEATURES", e))?;
        let mut protocol_features = VhostUserProtocolFeatures::empty();
        let mut config = Vec::new();
        if device_features & features::bit(features::VHOST_USER_PROTOCOL_FEATURES) != 0 {
            let offered = frontend.get_protocol_features().map_err(|e| step("GET_PROTOCOL_FEATURES", e))?;
            protocol_features = offered
                & (VhostUserProtocolFeatures::MQ
                    | VhostUserProtocolFeatures::REPLY_ACK
                    | VhostUserProtocolFeatures::CONFIG);
            frontend
                .set_protocol_features(protocol_features)
                .map_err(|e| step("SET_PROTOCOL_FEATURES", e))?;
            if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if protocol_features.contains(VhostUserProtocolFeatures::CONFIG) {
                let (_, payload) = frontend
                    .get_config(
                        0,
                        NET_CONFIG_LEN as u32,
                        VhostUserConfigFlags::empty(),
                        &[0u8; NET_CONFIG_LEN],
                    )
                    .map_err(|e| step("GET_CONFIG", e))?;
                if payload.len() != NET_CONFIG_LEN {
                    return Err(format!(
                        "{}: GET_CONFIG returned {} bytes, asked for {NET_CONFIG_LEN}",
                        path.display(),
                        payload.len()
                    ));
                }
                config = payload;
            }
        }
        Ok(VhostUserTransport {
            frontend,
            device_features,
            protocol_features,
            driver_features: 0,
            status: DeviceStatus::empty(),
            config,
            queues: Vec::new(),
            diag: Diagnostics::default(),
        })
    }

    /// A handle on this transport's error and ring-base record; it stays usable after the
    /// transport has been moved into (and dropped with) a driver.
    pub fn diagnostics(&self) -> Diagnostics {
        self.diag.clone()
    }

    /// The feature bits the backend offered at connect.
    pub fn device_features(&self) -> u64 {
        self.device_features
    }

    /// The feature bits sent with `SET_FEATURES` (0 before `write_driver_features`).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// The vhost-user protocol features acked.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// The config space bytes cached at connect.
    pub fn config_bytes(&self) -> &[u8] {
        &self.config
    }

    /// Stops ring `queue` if it was started: `SET_VRING_ENABLE(0)` and `GET_VRING_BASE`
    /// (whose answer goes to [`Diagnostics::vring_bases`]).
    fn stop_queue(&mut self, queue: u16) {
        let q = queue as usize;
        if self.queues.get(q).and_then(Option::as_ref).is_none() {
            return;
        }
        if let Err(e) = self.frontend.set_vring_enable(q, false) {
            self.diag.error(format!("queue {queue}: SET_VRING_ENABLE(0): {e}"));
        }
        match self.frontend.get_vring_base(q) {
            Ok(base) => self.diag.lock().vring_bases.push((queue, base)),
            Err(e) => self.diag.error(format!("queue {queue}: GET_VRING_BASE: {e}")),
        }
        self.queues[q] = None;
    }

    fn stop_all_queues(&mut self) {
        for q in 0..self.queues.len() {
            self.stop_queue(q as u16);
        }
    }

    fn set_mem_table(&mut self) -> Result<(), String> {
        let a = arena()?;
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: a.base as u64,
            memory_size: a.size as u64,
            userspace_addr: a.base as u64,
            mmap_offset: 0,
            mmap_handle: a.mem.file().as_raw_fd(),
        };
        self.frontend.set_mem_table(&[region]).map(|_| ()).map_err(|e| format!("SET_MEM_TABLE: {e}"))
    }
}

impl Drop for VhostUserTransport {
    fn drop(&mut self) {
        self.stop_all_queues();
        CLAIMED.store(false, Ordering::Release);
    }
}

impl Transport for VhostUserTransport {
    fn device_type(&self) -> DeviceType {
        DeviceType::Network
    }

    fn read_device_features(&mut self) -> u64 {
        match self.frontend.get_features() {
            Ok(f) => {
                if f != self.device_features {
                    self.diag.error(format!(
                        "GET_FEATURES changed from {:#x} (at connect) to {f:#x}",
                        self.device_features
                    ));
                }
                self.device_features = f;
            }
            Err(e) => self.diag.error(format!("GET_FEATURES: {e}")),
        }
        self.device_features
    }

    /// `SET_FEATURES` with the driver's bits plus `VHOST_USER_F_PROTOCOL_FEATURES` when
    /// offered, then `SET_MEM_TABLE` with the arena (QEMU's and DPDK's order).
    fn write_driver_features(&mut self, driver_features: u64) {
        let proto = features::bit(features::VHOST_USER_PROTOCOL_FEATURES);
        let f = driver_features | (self.device_features & proto);
        self.driver_features = f;
        self.diag.lock().driver_features = f;
        if let Err(e) = self.frontend.set_features(f) {
            self.diag.error(format!("SET_FEATURES({f:#x}): {e}"));
        }
        if let Err(e) = self.set_mem_table() {
            self.diag.error(e);
        }
    }

    fn max_queue_size(&mut self, _queue: u16) -> u32 {
        MAX_QUEUE_SIZE
    }

    fn notify(&mut self, queue: u16) {
        match self.queues.get(queue as usize).and_then(Option::as_ref) {
            Some(q) => {
                if let Err(e) = q.kick.write(1) {
                    self.diag.error(format!("queue {queue}: kick: {e}"));
                }
            }
            None => self.diag.error(format!("notify of queue {queue}, which is not set up")),
        }
    }

    fn get_status(&self) -> DeviceStatus {
        self.status
    }

    /// Local state only; status 0 (reset) stops every started ring first.
    fn set_status(&mut self, status: DeviceStatus) {
        if status.is_empty() {
            self.stop_all_queues();
        }
        self.status = status;
    }

    fn set_guest_page_size(&mut self, _guest_page_size: u32) {}

    fn requires_legacy_layout(&self) -> bool {
        false
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        let q = queue as usize;
        let Ok(size) = u16::try_from(size) else {
            self.diag.error(format!("queue {queue}: size {size} does not fit in u16"));
            return;
        };
        let (kick, call) = match (EventFd::new(libc::EFD_NONBLOCK), EventFd::new(libc::EFD_NONBLOCK)) {
            (Ok(k), Ok(c)) => (k, c),
            (Err(e), _) | (_, Err(e)) => {
                self.diag.error(format!("queue {queue}: eventfd: {e}"));
                return;
            }
        };
        let config = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: descriptors,
            used_ring_addr: device_area,
            avail_ring_addr: driver_area,
            log_addr: None,
        };
        let fe = &mut self.frontend;
        let steps: [(&str, Result<(), vhost::Error>); 6] = [
            ("SET_VRING_NUM", fe.set_vring_num(q, size)),
            ("SET_VRING_ADDR", fe.set_vring_addr(q, &config)),
            ("SET_VRING_BASE", fe.set_vring_base(q, 0)),
            ("SET_VRING_CALL", fe.set_vring_call(q, &call)),
            ("SET_VRING_KICK", fe.set_vring_kick(q, &kick)),
            ("SET_VRING_ENABLE(1)", fe.set_vring_enable(q, true)),
        ];
        for (what, r) in steps {
            if let Err(e) = r {
                self.diag.error(format!("queue {queue}: {what}: {e}"));
            }
        }
        if self.queues.len() <= q {
            self.queues.resize_with(q + 1, || None);
        }
        self.queues[q] = Some(QueueFds { kick, call });
    }

    fn queue_unset(&mut self, queue: u16) {
        self.stop_queue(queue);
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.queues.get(queue as usize).is_some_and(Option::is_some)
    }

    /// Drains the call eventfds; any signal counts as a queue interrupt.
    fn ack_interrupt(&mut self) -> InterruptStatus {
        let mut st = InterruptStatus::empty();
        for q in self.queues.iter().flatten() {
            if q.call.read().is_ok() {
                st |= InterruptStatus::QUEUE_INTERRUPT;
            }
        }
        st
    }

    fn read_config_generation(&self) -> u32 {
        0 // the cached copy never changes
    }

    fn read_config_space<T: FromBytes + IntoBytes>(&self, offset: usize) -> virtio_drivers::Result<T> {
        if self.config.is_empty() {
            return Err(virtio_drivers::Error::ConfigSpaceMissing);
        }
        let end = offset.checked_add(size_of::<T>()).ok_or(virtio_drivers::Error::ConfigSpaceTooSmall)?;
        let bytes = self.config.get(offset..end).ok_or(virtio_drivers::Error::ConfigSpaceTooSmall)?;
        T::read_from_bytes(bytes).map_err(|_| virtio_drivers::Error::ConfigSpaceTooSmall)
    }

    fn write_config_space<T: IntoBytes + Immutable>(
        &mut self,
        _offset: usize,
        _value: T,
    ) -> virtio_drivers::Result<()> {
        // virtio-net's config space is read-only for the driver.
        Err(virtio_drivers::Error::Unsupported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_first_fit_aligns_and_coalesces() {
        let base = 0x10_0000;
        let mut a = Allocator::new(0x4000);
        let x = a.alloc(base, 100, 64).expect("fits");
        assert_eq!(x, 0);
        let y = a.alloc(base, 10, 4096).expect("fits");
        assert_eq!(y, 0x1000);
        let z = a.alloc(base, 100, 64).expect("fits");
        assert_eq!(z, 128, "first fit reuses the gap before the page-aligned block");
        assert!(a.alloc(base, 0x4000, 1).is_none());
        a.release(x, 100);
        a.release(z, 100);
        a.release(y, 10);
        assert_eq!(a.free.len(), 1, "all frees coalesce: {:?}", a.free);
        assert_eq!(a.free_bytes(), 0x4000);
        assert_eq!(a.alloc(base, 0x4000, 4096), Some(0));
    }

    #[test]
    fn share_bounces_outside_and_passes_inside() {
        // Uses the process arena directly; no transport (and no backend) is needed.
        let mut outside = [7u8; 100];
        let nn = NonNull::from(&mut outside[..]);
        // SAFETY: `outside` is a live, non-empty buffer not otherwise accessed meanwhile.
        let pa = unsafe { ArenaHal::share(nn, BufferDirection::DeviceToDriver) };
        let (start, size) = arena_range().expect("arena");
        assert!(pa >= start && pa + 100 <= start + size);
        assert_ne!(pa, outside.as_ptr() as u64);
        // SAFETY: `pa` is a live 100-byte bounce buffer inside the arena mapping.
        unsafe { (pa as *mut u8).write_bytes(9, 50) };
        // SAFETY: same buffer and paddr as the share above.
        unsafe { ArenaHal::unshare(pa, nn, BufferDirection::DeviceToDriver) };
        assert_eq!(&outside[..50], &[9u8; 50][..]);
        assert_eq!(&outside[50..], &[7u8; 50][..], "bytes the device did not write are kept");

        let (pa, ptr) = ArenaHal::dma_alloc(1, BufferDirection::Both);
        assert_ne!(pa, 0);
        assert_eq!(pa % PAGE_SIZE as u64, 0);
        let inside = NonNull::slice_from_raw_parts(ptr, 64);
        // SAFETY: a page just allocated from the arena, unaliased.
        let pa2 = unsafe { ArenaHal::share(inside, BufferDirection::DriverToDevice) };
        assert_eq!(pa2, pa, "arena buffers are shared in place");
        // SAFETY: same buffer and paddr as the share above.
        unsafe { ArenaHal::unshare(pa2, inside, BufferDirection::DriverToDevice) };
    }
}
