//! A minimal, deliberately low-level vhost-user front-end for tests: it plays the guest.
//!
//! [`RawFrontend`] owns one memfd of "guest memory", shares it with a backend through
//! `SET_MEM_TABLE` (DPDK virtio-user's convention: guest-physical address = this
//! process's virtual address of the mapping, `mmap_offset` 0), lays split rings out in
//! it with a bump allocator, and lets a test write ring memory by hand: descriptors,
//! avail slots, the avail index. Tests can therefore build both correct and hostile
//! rings. The control plane is the `vhost` crate's [`Frontend`].
//!
//! Two layers, which must not be mixed on the same queue:
//!
//! * **Raw access**: [`RawFrontend::write_desc`], [`RawFrontend::write_desc_at`],
//!   [`RawFrontend::write_avail_slot`], [`RawFrontend::set_avail_idx`],
//!   [`RawFrontend::used_idx`], [`RawFrontend::used_elem`], [`RawFrontend::kick`]. They
//!   write exactly what they are told and keep no state.
//! * **Well-behaved traffic**: [`RawFrontend::send_frames`], [`RawFrontend::reclaim`],
//!   [`RawFrontend::post_rx_buffers`], [`RawFrontend::poll_rx`],
//!   [`RawFrontend::recv_frames`] (and [`RawFrontend::recv_packets`], which keeps the
//!   net header). They keep their own free list and shadow indices per
//!   queue, one descriptor per buffer, and check every used element the device returns.
//! * **Control queue**: [`RawFrontend::ctrl_command`] sends one command chain and waits
//!   for the device to use it (one command at a time, descriptors from 0).
//! * **Packed rings** (virtio 1.2 §2.8, `VIRTIO_F_RING_PACKED` negotiated):
//!   [`RawFrontend::setup_packed_queue`] lays out a descriptor ring and the driver and
//!   device event suppression areas and starts the queue at offset 0 with the wrap
//!   counter set; [`RawFrontend::write_packed_desc`] writes one descriptor (its flags
//!   word last, with a release store, so a chain is written tail first and made
//!   available by its head), [`RawFrontend::packed_desc`] reads one back,
//!   [`RawFrontend::wait_packed_used`] waits for the device to mark a position used.
//!   Raw access only: they write exactly what they are told (AVAIL/USED bits included)
//!   and keep no state. The split-ring calls refuse a packed queue and the reverse.
//! * **vIOMMU** ([`RawFrontend::connect_iommu`]): `VIRTIO_F_ACCESS_PLATFORM` and the
//!   backend channel negotiated; every address the front-end gives the device (ring
//!   addresses, descriptors of the well-behaved layer) is then an IOVA, `gpa +
//!   iova_offset`, which the test maps with [`RawFrontend::iotlb_update`], withdraws
//!   with [`RawFrontend::iotlb_invalidate`], and whose misses it reads with
//!   [`RawFrontend::next_miss`]. The IOTLB messages are encoded here from the
//!   vhost-user specification, independently of the backend's code.
//!
//! Ring memory is shared with another process that writes it concurrently (the used
//! ring) or reads it concurrently (everything else), so this module never forms a Rust
//! reference to plain data in the mapping: bytes are read and written with volatile
//! accesses, and the two indices that publish data (avail idx, used idx) with atomics.
//! Layout arithmetic, the descriptor encoding, flags and feature bits come from
//! [`driver::layout`]; nothing here duplicates them.
//!
//! The host is assumed little-endian (as the virtio 1.x ring format is).

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use driver::layout::{self, features, Descriptor};
use driver::packed::{self, PackedDescriptor};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

/// How long [`RawFrontend::connect`] retries while the socket does not exist yet or
/// refuses connections.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Queue-index bound the `vhost` frontend enforces on its side. `GET_QUEUE_NUM` is not
/// sent: for virtio-net, QEMU and DPDK read its answer as a number of queue *pairs*,
/// while `vhost::Frontend` would take it as the number of vrings and then refuse the
/// TX queue of the last pair.
const DEFAULT_MAX_QUEUES: u64 = 64;

/// Default capacity of a TX buffer the convenience layer allocates per descriptor.
const TX_BUF_MIN: usize = 2048;

/// Guest-physical addresses of the three areas of one ring (as `SET_VRING_ADDR` carries
/// them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingAddrs {
    /// Descriptor table (packed: the descriptor ring).
    pub desc: u64,
    /// Driver area: the avail ring (packed: the driver event suppression structure).
    pub avail: u64,
    /// Device area: the used ring (packed: the device event suppression structure).
    pub used: u64,
}

/// One shared mapping of a memfd: the guest's memory.
struct GuestMem {
    /// The memfd and its shared mapping (the driver's DMA arena type: the same memory a
    /// virtio-user front-end shares); the backend got its own copy of the fd through
    /// `SET_MEM_TABLE`.
    arena: driver::dma::DmaArena,
    base: *mut u8,
    size: usize,
}

impl GuestMem {
    fn new(size: usize) -> Result<GuestMem, String> {
        if size == 0 {
            return Err("guest memory size must be non-zero".into());
        }
        let arena = driver::dma::DmaArena::new(size, false).map_err(|e| format!("guest memory: {e}"))?;
        Ok(GuestMem { base: arena.va(), size: arena.len(), arena })
    }

    fn start(&self) -> u64 {
        self.base as u64
    }

    /// Translates `[gpa, gpa + len)` to a pointer into the mapping, or explains why the
    /// range is not entirely inside guest memory.
    fn ptr(&self, gpa: u64, len: usize) -> Result<*mut u8, String> {
        let start = self.start();
        let end = gpa.checked_add(len as u64).ok_or_else(|| format!("range {gpa:#x}+{len:#x} overflows"))?;
        if gpa < start || end > start + self.size as u64 {
            return Err(format!(
                "range {gpa:#x}..{end:#x} is outside guest memory {start:#x}..{:#x}",
                start + self.size as u64
            ));
        }
        // SAFETY: gpa - start < size (checked above), so the offset stays inside the
        // mapping of `size` bytes that starts at `base`.
        Ok(unsafe { self.base.add((gpa - start) as usize) })
    }

    fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), String> {
        let p = self.ptr(gpa, bytes.len())?;
        for (i, b) in bytes.iter().enumerate() {
            // SAFETY: p..p+len is inside the live mapping (checked by `ptr`); a volatile
            // byte store never forms a reference to memory the backend also touches.
            unsafe { p.add(i).write_volatile(*b) };
        }
        Ok(())
    }

    fn read(&self, gpa: u64, len: usize) -> Result<Vec<u8>, String> {
        let p = self.ptr(gpa, len)?;
        let mut out = Vec::with_capacity(len);
        for i in 0..len {
            // SAFETY: as in `write`: in bounds, volatile, no reference formed.
            out.push(unsafe { p.add(i).read_volatile() });
        }
        Ok(out)
    }

    /// The atomic u16 at `gpa` (which must be 2-aligned and inside guest memory).
    fn atomic_u16(&self, gpa: u64) -> Result<&AtomicU16, String> {
        if gpa & 1 != 0 {
            return Err(format!("ring index at {gpa:#x} is not 2-byte aligned"));
        }
        let p = self.ptr(gpa, 2)?;
        // SAFETY: p is 2-aligned, inside the mapping, and valid for the life of `self`
        // (the borrow ties the reference to it). AtomicU16 has the size and alignment
        // of u16, and every access through it is atomic, so the backend process
        // writing the same word concurrently is not a data race on our side.
        Ok(unsafe { AtomicU16::from_ptr(p.cast()) })
    }

    fn read_u32(&self, gpa: u64) -> Result<u32, String> {
        let b = self.read(gpa, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Per-queue state: where the ring is, its eventfds, and the convenience layer's
/// bookkeeping.
struct Queue {
    size: u16,
    /// A packed ring (set up with [`RawFrontend::setup_packed_queue`]).
    packed: bool,
    addrs: RingAddrs,
    kick: EventFd,
    /// Kept open so the backend's call eventfd stays valid; the tests poll instead.
    _call: EventFd,
    /// Descriptor ids free for the convenience layer.
    free: Vec<u16>,
    /// Shadow of the avail idx the convenience layer last published.
    next_avail: u16,
    /// Used idx up to which the convenience layer has consumed completions.
    last_used: u16,
    /// Per descriptor id: (gpa, capacity) of the buffer the convenience layer attached.
    bufs: Vec<Option<(u64, u32)>>,
    /// Per descriptor id: length posted, while the device owns the buffer.
    inflight: Vec<Option<u32>>,
}

/// One vhost-user device connection, seen from the guest's side. See the module docs.
pub struct RawFrontend {
    frontend: Frontend,
    features: u64,
    protocol_features: u64,
    /// Device address of guest address `gpa`: `gpa + iova_offset` (0 without a vIOMMU).
    iova_offset: u64,
    /// A second handle on the main socket, for IOTLB messages (which the `vhost`
    /// crate's front-end cannot send).
    raw: UnixStream,
    /// With a vIOMMU: our end of the backend channel.
    backend_chan: Option<UnixStream>,
    mem: GuestMem,
    /// Next free byte offset of the bump allocator.
    next_free: usize,
    queues: Vec<Option<Queue>>,
}

impl RawFrontend {
    /// Connects to the backend socket at `path` (retrying for up to [`CONNECT_TIMEOUT`]
    /// while it does not exist yet or refuses), then: `SET_OWNER`, `GET_FEATURES`,
    /// `GET_PROTOCOL_FEATURES` / `SET_PROTOCOL_FEATURES` (acking what the backend offers
    /// of MQ, REPLY_ACK and CONFIG; with REPLY_ACK every later message asks for an ack,
    /// so a backend's refusal surfaces as an `Err`), `SET_FEATURES` with `(want_features & offered) | VERSION_1 |
    /// VHOST_USER_F_PROTOCOL_FEATURES`, and `SET_MEM_TABLE` with one memfd region of
    /// `mem_size` bytes (rounded up to a page).
    pub fn connect(path: &Path, mem_size: usize, want_features: u64) -> Result<Self, String> {
        Self::connect_inner(path, mem_size, want_features, None)
    }

    /// [`RawFrontend::connect`] behind a vIOMMU: also acks `VIRTIO_F_ACCESS_PLATFORM` and
    /// `BACKEND_REQ` (failing if the backend does not offer them), sends
    /// `SET_BACKEND_REQ_FD` with one end of a socket pair, and from then on gives the
    /// device `gpa + iova_offset` wherever it gives an address. No translation exists
    /// until the test sends one.
    pub fn connect_iommu(
        path: &Path,
        mem_size: usize,
        want_features: u64,
        iova_offset: u64,
    ) -> Result<Self, String> {
        Self::connect_inner(path, mem_size, want_features, Some(iova_offset))
    }

    fn connect_inner(
        path: &Path,
        mem_size: usize,
        want_features: u64,
        iommu: Option<u64>,
    ) -> Result<Self, String> {
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
        let raw = sock.try_clone().map_err(|e| format!("clone socket: {e}"))?;
        let mut frontend = Frontend::from_stream(sock, DEFAULT_MAX_QUEUES);
        let step = |what: &str, e: vhost::Error| format!("{what}: {e}");

        frontend.set_owner().map_err(|e| step("SET_OWNER", e))?;
        let offered = frontend.get_features().map_err(|e| step("GET_FEATURES", e))?;
        let proto_bit = features::bit(features::VHOST_USER_PROTOCOL_FEATURES);
        if offered & proto_bit == 0 {
            return Err(format!(
                "backend does not offer VHOST_USER_F_PROTOCOL_FEATURES (features {offered:#x})"
            ));
        }
        let proto_offered = frontend.get_protocol_features().map_err(|e| step("GET_PROTOCOL_FEATURES", e))?;
        let mut proto_want = VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIG;
        let platform = features::bit(features::ACCESS_PLATFORM);
        if iommu.is_some() {
            proto_want |= VhostUserProtocolFeatures::BACKEND_REQ;
            if !proto_offered.contains(VhostUserProtocolFeatures::BACKEND_REQ) || offered & platform == 0 {
                return Err(format!(
                    "backend offers no ACCESS_PLATFORM/BACKEND_REQ (features {offered:#x}, protocol {proto_offered:?})"
                ));
            }
        }
        let proto_acked = proto_offered & proto_want;
        frontend.set_protocol_features(proto_acked).map_err(|e| step("SET_PROTOCOL_FEATURES", e))?;
        if proto_acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }
        let mut negotiated = (want_features & offered) | features::bit(features::VERSION_1) | proto_bit;
        if iommu.is_some() {
            negotiated |= platform;
        }
        frontend.set_features(negotiated).map_err(|e| step("SET_FEATURES", e))?;

        let mem = GuestMem::new(mem_size)?;
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: mem.start(),
            memory_size: mem.size as u64,
            userspace_addr: mem.start(),
            mmap_offset: 0,
            mmap_handle: mem.arena.file().as_raw_fd(),
        };
        frontend.set_mem_table(&[region]).map_err(|e| step("SET_MEM_TABLE", e))?;
        let backend_chan = match iommu {
            Some(_) => {
                let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
                frontend.set_backend_request_fd(&theirs).map_err(|e| step("SET_BACKEND_REQ_FD", e))?;
                Some(ours)
            }
            None => None,
        };

        Ok(RawFrontend {
            frontend,
            features: negotiated,
            protocol_features: proto_acked.bits(),
            iova_offset: iommu.unwrap_or(0),
            raw,
            backend_chan,
            mem,
            next_free: 0,
            queues: Vec::new(),
        })
    }

    /// The device address (IOVA) of guest address `gpa`.
    pub fn iova(&self, gpa: u64) -> u64 {
        gpa + self.iova_offset
    }

    /// Sends one `VHOST_USER_IOTLB_MSG` (request 22, NEED_REPLY) and returns whether the
    /// backend acknowledged it with 0. (Also on a connection without a vIOMMU, where the
    /// backend must refuse it.)
    fn iotlb_msg(&self, iova: u64, size: u64, uaddr: u64, perm: u8, kind: u8) -> Result<bool, String> {
        let sock = &self.raw;
        let mut m = Vec::with_capacity(12 + 32);
        m.extend_from_slice(&22u32.to_le_bytes());
        m.extend_from_slice(&(0x1u32 | 0x8).to_le_bytes()); // version 1, NEED_REPLY
        m.extend_from_slice(&32u32.to_le_bytes());
        m.extend_from_slice(&iova.to_le_bytes());
        m.extend_from_slice(&size.to_le_bytes());
        m.extend_from_slice(&uaddr.to_le_bytes());
        m.extend_from_slice(&[perm, kind, 0, 0, 0, 0, 0, 0]);
        use std::io::{Read, Write};
        (&*sock).write_all(&m).map_err(|e| format!("IOTLB_MSG: {e}"))?;
        sock.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
        let mut r = [0u8; 20];
        (&*sock).read_exact(&mut r).map_err(|e| format!("IOTLB_MSG reply: {e}"))?;
        let word = |i: usize| u32::from_le_bytes(r[i..i + 4].try_into().expect("4 bytes"));
        if word(0) != 22 || word(4) & 0x4 == 0 || word(8) != 8 {
            return Err(format!("unexpected reply to IOTLB_MSG: {r:02x?}"));
        }
        Ok(u64::from_le_bytes(r[12..].try_into().expect("8 bytes")) == 0)
    }

    /// Maps `[iova, iova + size)` to guest memory at `gpa` with `perm` (1 read, 2 write,
    /// 3 both): an IOTLB update. The front-end's address in the message is our virtual
    /// address of `gpa` (which is `gpa` here). Returns whether the backend accepted it.
    pub fn iotlb_update(&self, iova: u64, size: u64, gpa: u64, perm: u8) -> Result<bool, String> {
        self.iotlb_msg(iova, size, gpa, perm, 2)
    }

    /// Maps all of guest memory at its IOVA, read-write, in one update.
    pub fn iotlb_map_all(&self) -> Result<bool, String> {
        let (start, size) = self.mem_range();
        self.iotlb_update(self.iova(start), size, start, 3)
    }

    /// Withdraws `[iova, iova + size)`: an IOTLB invalidation. Returns whether the
    /// backend acknowledged it (which it does only once no worker can use the old
    /// translation any more).
    pub fn iotlb_invalidate(&self, iova: u64, size: u64) -> Result<bool, String> {
        self.iotlb_msg(iova, size, 0, 0, 3)
    }

    /// The next IOTLB miss the backend sent on the backend channel, as `(iova, perm)`,
    /// or `None` if none arrives within `timeout`.
    pub fn next_miss(&self, timeout: Duration) -> Result<Option<(u64, u8)>, String> {
        use std::io::Read;
        let chan = self.backend_chan.as_ref().ok_or("not connected with connect_iommu")?;
        chan.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
        let mut m = [0u8; 44];
        match (&*chan).read_exact(&mut m) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Ok(None)
            }
            Err(e) => return Err(format!("backend channel: {e}")),
        }
        let word = |i: usize| u32::from_le_bytes(m[i..i + 4].try_into().expect("4 bytes"));
        if word(0) != 1 || word(8) != 32 || m[12 + 25] != 1 {
            return Err(format!("unexpected backend request: {m:02x?}"));
        }
        Ok(Some((u64::from_le_bytes(m[12..20].try_into().expect("8 bytes")), m[12 + 24])))
    }

    /// The feature bits sent with `SET_FEATURES`.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// The vhost-user protocol feature bits acked.
    pub fn protocol_features(&self) -> u64 {
        self.protocol_features
    }

    /// `(first guest address, size in bytes)` of guest memory.
    pub fn mem_range(&self) -> (u64, u64) {
        (self.mem.start(), self.mem.size as u64)
    }

    /// Bump-allocates `len` bytes of zeroed guest memory aligned to `align` (a power of
    /// two) and returns its guest address (= virtual address here). Memory is never
    /// freed or reused.
    pub fn alloc(&mut self, len: usize, align: usize) -> Result<u64, String> {
        if !align.is_power_of_two() {
            return Err(format!("alignment {align} is not a power of two"));
        }
        // Aligns the absolute address (= guest address), not just the offset.
        let start = self.mem.start() as usize;
        let addr = (start + self.next_free).checked_next_multiple_of(align).ok_or("allocation overflow")?;
        let end = addr.checked_add(len).ok_or("allocation overflow")?;
        if end > start + self.mem.size {
            return Err(format!(
                "guest memory exhausted: {len} bytes (align {align}) do not fit, {} of {} used",
                self.next_free, self.mem.size
            ));
        }
        self.next_free = end - start;
        Ok(addr as u64)
    }

    /// Copies `bytes` into guest memory at `gpa` (volatile byte stores).
    pub fn write_mem(&self, gpa: u64, bytes: &[u8]) -> Result<(), String> {
        self.mem.write(gpa, bytes)
    }

    /// Copies `len` bytes of guest memory at `gpa` out (volatile byte loads).
    pub fn read_mem(&self, gpa: u64, len: usize) -> Result<Vec<u8>, String> {
        self.mem.read(gpa, len)
    }

    /// Sends `SET_MEM_TABLE` again with one region over the same guest addresses as
    /// guest memory (`mem_range`), `memory_size` bytes long, backed by `fd` at offset 0
    /// instead of our memfd. The caller owns `fd` and what is in it (a hostile table: a
    /// file shorter than the region, or one it truncates later); our own mapping is not
    /// touched. With REPLY_ACK a refusal is an `Err`.
    pub fn set_mem_table_fd(&mut self, fd: std::os::fd::RawFd, memory_size: u64) -> Result<(), String> {
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: self.mem.start(),
            memory_size,
            userspace_addr: self.mem.start(),
            mmap_offset: 0,
            mmap_handle: fd,
        };
        self.frontend.set_mem_table(&[region]).map(|_| ()).map_err(|e| format!("SET_MEM_TABLE: {e}"))
    }

    /// Sends `SET_VRING_CALL` for queue `index` with `fd`, whatever it is (a hostile
    /// front-end's pipe, or another queue's eventfd). The caller keeps `fd` open.
    pub fn set_vring_call_fd(&mut self, index: u16, fd: &EventFd) -> Result<(), String> {
        self.frontend.set_vring_call(index as usize, fd).map_err(|e| format!("SET_VRING_CALL: {e}"))
    }

    /// Sends `SET_VRING_KICK` for queue `index` with `fd`, whatever it is.
    pub fn set_vring_kick_fd(&mut self, index: u16, fd: &EventFd) -> Result<(), String> {
        self.frontend.set_vring_kick(index as usize, fd).map_err(|e| format!("SET_VRING_KICK: {e}"))
    }

    /// Lays out a split ring of `size` entries for queue `index` in fresh guest memory
    /// and starts it: see [`RawFrontend::setup_queue_at`].
    pub fn setup_queue(&mut self, index: u16, size: u16) -> Result<(), String> {
        let desc = self.alloc(layout::desc_table_bytes(size), 4096)?;
        let avail = self.alloc(layout::avail_bytes(size), 64)?;
        let used = self.alloc(layout::used_bytes(size), 64)?;
        self.setup_queue_at(index, size, RingAddrs { desc, avail, used })
    }

    /// Starts queue `index` with a ring of `size` entries at `addrs`, which may be
    /// anywhere (even outside guest memory, for hostile tests): `SET_VRING_NUM`,
    /// `SET_VRING_ADDR`, `SET_VRING_BASE(0)`, `SET_VRING_CALL`, `SET_VRING_KICK`,
    /// `SET_VRING_ENABLE(1)`. Every message is sent even if an earlier one fails (a
    /// backend may legitimately refuse a bad ring address); the first failure is
    /// returned. The queue is recorded either way, so it can still be kicked.
    pub fn setup_queue_at(&mut self, index: u16, size: u16, addrs: RingAddrs) -> Result<(), String> {
        self.start_queue(index, size, addrs, 0, false)
    }

    /// Lays out a packed ring of `size` entries (any size up to 32768) for queue `index`
    /// in fresh guest memory (descriptor ring 16-byte aligned, each event suppression
    /// structure 4-byte aligned, all zeroed: every flags word "used in wrap 0", which a
    /// device starting with wrap counter 1 does not take as available) and starts it as
    /// [`RawFrontend::setup_queue_at`] does, with `SET_VRING_BASE` = offset 0, avail wrap
    /// counter 1 (bit 15, vhost-user's convention for packed rings). Needs
    /// `VIRTIO_F_RING_PACKED` negotiated.
    pub fn setup_packed_queue(&mut self, index: u16, size: u16) -> Result<(), String> {
        if self.features & features::bit(features::RING_PACKED) == 0 {
            return Err(format!("queue {index}: VIRTIO_F_RING_PACKED was not negotiated"));
        }
        if size == 0 || size > packed::MAX_QUEUE_SIZE {
            return Err(format!("packed queue size {size} out of range"));
        }
        let desc = self.alloc(packed::desc_ring_bytes(size), 4096)?;
        let avail = self.alloc(packed::EVENT_SIZE, 64)?;
        let used = self.alloc(packed::EVENT_SIZE, 64)?;
        self.setup_packed_queue_at(
            index,
            size,
            RingAddrs { desc, avail, used },
            packed::event_off_wrap(0, true),
        )
    }

    /// Starts packed queue `index` of `size` entries with its three areas at `addrs`
    /// (which may be anywhere, for hostile tests: `avail` is the driver event
    /// suppression structure, `used` the device's) and `SET_VRING_BASE(base)` (offset in
    /// bits 0-14, avail wrap counter in bit 15), as [`RawFrontend::setup_queue_at`] does:
    /// every message is sent, the first failure returned, the queue recorded either way.
    pub fn setup_packed_queue_at(
        &mut self,
        index: u16,
        size: u16,
        addrs: RingAddrs,
        base: u16,
    ) -> Result<(), String> {
        if self.features & features::bit(features::RING_PACKED) == 0 {
            return Err(format!("queue {index}: VIRTIO_F_RING_PACKED was not negotiated"));
        }
        self.start_queue(index, size, addrs, base, true)
    }

    /// The vhost-user messages that start a queue (see [`RawFrontend::setup_queue_at`]).
    fn start_queue(
        &mut self,
        index: u16,
        size: u16,
        addrs: RingAddrs,
        base: u16,
        is_packed: bool,
    ) -> Result<(), String> {
        if size == 0 || size > layout::MAX_QUEUE_SIZE {
            return Err(format!("queue size {size} out of range"));
        }
        let kick = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        let call = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
        let q = index as usize;
        let mut errors: Vec<String> = Vec::new();
        let mut note = |what: &str, r: Result<(), vhost::Error>| {
            if let Err(e) = r {
                errors.push(format!("queue {index}: {what}: {e}"));
            }
        };
        let config = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: addrs.desc + self.iova_offset,
            used_ring_addr: addrs.used + self.iova_offset,
            avail_ring_addr: addrs.avail + self.iova_offset,
            log_addr: None,
        };
        note("SET_VRING_NUM", self.frontend.set_vring_num(q, size));
        note("SET_VRING_ADDR", self.frontend.set_vring_addr(q, &config));
        note("SET_VRING_BASE", self.frontend.set_vring_base(q, base));
        note("SET_VRING_CALL", self.frontend.set_vring_call(q, &call));
        note("SET_VRING_KICK", self.frontend.set_vring_kick(q, &kick));
        note("SET_VRING_ENABLE", self.frontend.set_vring_enable(q, true));

        if self.queues.len() <= q {
            self.queues.resize_with(q + 1, || None);
        }
        self.queues[q] = Some(Queue {
            size,
            packed: is_packed,
            addrs,
            kick,
            _call: call,
            free: (0..size).rev().collect(),
            next_avail: 0,
            last_used: 0,
            bufs: vec![None; size as usize],
            inflight: vec![None; size as usize],
        });
        match errors.into_iter().next() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Sends `SET_VRING_ENABLE(enable)` for queue `index`.
    pub fn set_vring_enable(&mut self, index: u16, enable: bool) -> Result<(), String> {
        self.frontend
            .set_vring_enable(index as usize, enable)
            .map_err(|e| format!("queue {index}: SET_VRING_ENABLE({enable}): {e}"))
    }

    /// `GET_CONFIG`: `len` bytes of the device's config space from `offset` (needs the
    /// CONFIG protocol feature, which [`RawFrontend::connect`] acks when offered).
    pub fn get_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, String> {
        let (_, payload) = self
            .frontend
            .get_config(offset, len, VhostUserConfigFlags::empty(), &vec![0u8; len as usize])
            .map_err(|e| format!("GET_CONFIG: {e}"))?;
        Ok(payload)
    }

    /// Size and ring addresses of a queue set up earlier.
    pub fn ring(&self, queue: u16) -> Result<(u16, RingAddrs), String> {
        let q = self.queue(queue)?;
        Ok((q.size, q.addrs))
    }

    fn queue(&self, queue: u16) -> Result<&Queue, String> {
        self.queues
            .get(queue as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| format!("queue {queue} was not set up"))
    }

    /// A split queue (the split-ring calls refuse a packed one).
    fn split_queue(&self, queue: u16) -> Result<&Queue, String> {
        let q = self.queue(queue)?;
        if q.packed {
            return Err(format!("queue {queue} is a packed ring"));
        }
        Ok(q)
    }

    /// A packed queue (the packed-ring calls refuse a split one).
    fn packed_queue(&self, queue: u16) -> Result<&Queue, String> {
        let q = self.queue(queue)?;
        if !q.packed {
            return Err(format!("queue {queue} is a split ring"));
        }
        Ok(q)
    }

    /// Whether queue `queue` was set up as a packed ring.
    pub fn is_packed(&self, queue: u16) -> Result<bool, String> {
        Ok(self.queue(queue)?.packed)
    }

    fn queue_mut(&mut self, queue: u16) -> Result<&mut Queue, String> {
        self.queues
            .get_mut(queue as usize)
            .and_then(Option::as_mut)
            .ok_or_else(|| format!("queue {queue} was not set up"))
    }

    // ---- raw ring access ------------------------------------------------------------

    /// Writes descriptor `i` (must be `< size`) of `queue`'s descriptor table.
    pub fn write_desc(&self, queue: u16, i: u16, d: Descriptor) -> Result<(), String> {
        let q = self.split_queue(queue)?;
        if i >= q.size {
            return Err(format!("descriptor {i} outside ring of {}", q.size));
        }
        self.write_desc_at(q.addrs.desc + (i as u64) * layout::DESC_SIZE as u64, d)
    }

    /// Writes a descriptor anywhere in guest memory (an indirect table entry, say).
    pub fn write_desc_at(&self, gpa: u64, d: Descriptor) -> Result<(), String> {
        self.mem.write(gpa, &d.to_le_bytes())
    }

    /// Writes `head` into avail-ring slot `slot % size` (plain volatile stores: they are
    /// published by the next [`RawFrontend::set_avail_idx`]).
    pub fn write_avail_slot(&self, queue: u16, slot: u16, head: u16) -> Result<(), String> {
        let q = self.split_queue(queue)?;
        let off = layout::avail_entry(slot % q.size) as u64;
        self.mem.write(q.addrs.avail + off, &head.to_le_bytes())
    }

    /// Stores `idx` into `avail.idx` with Release ordering, so the backend's Acquire
    /// load of it also sees every descriptor and avail slot written before.
    pub fn set_avail_idx(&self, queue: u16, idx: u16) -> Result<(), String> {
        let q = self.split_queue(queue)?;
        let a = self.mem.atomic_u16(q.addrs.avail + layout::AVAIL_IDX as u64)?;
        // Release: publishes the descriptors and avail slots written before this store.
        a.store(idx, Ordering::Release);
        Ok(())
    }

    /// Writes `avail.flags` (e.g. [`layout::AVAIL_F_NO_INTERRUPT`]).
    pub fn set_avail_flags(&self, queue: u16, flags: u16) -> Result<(), String> {
        let q = self.split_queue(queue)?;
        let a = self.mem.atomic_u16(q.addrs.avail + layout::AVAIL_FLAGS as u64)?;
        // Relaxed: a hint for the device; no data is published with it.
        a.store(flags, Ordering::Relaxed);
        Ok(())
    }

    /// Loads `used.idx` with Acquire ordering, so used elements read afterwards are at
    /// least as new as the index.
    pub fn used_idx(&self, queue: u16) -> Result<u16, String> {
        let q = self.split_queue(queue)?;
        let a = self.mem.atomic_u16(q.addrs.used + layout::USED_IDX as u64)?;
        // Acquire: pairs with the device's Release store of used.idx.
        Ok(a.load(Ordering::Acquire))
    }

    /// Reads used element `slot % size` as `(id, len)`. Call after [`RawFrontend::used_idx`]
    /// showed the element published.
    pub fn used_elem(&self, queue: u16, slot: u16) -> Result<(u32, u32), String> {
        let q = self.split_queue(queue)?;
        let at = q.addrs.used + layout::used_entry(slot % q.size) as u64;
        Ok((self.mem.read_u32(at)?, self.mem.read_u32(at + 4)?))
    }

    /// Signals `queue`'s kick eventfd.
    pub fn kick(&self, queue: u16) -> Result<(), String> {
        let q = self.queue(queue)?;
        q.kick.write(1).map_err(|e| format!("queue {queue}: kick: {e}"))
    }

    /// Polls until `used.idx == target`, for at most `timeout`.
    pub fn wait_used_idx(&self, queue: u16, target: u16, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.used_idx(queue)?;
            if now == target {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("queue {queue}: used idx is {now} after {timeout:?}, expected {target}"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    // ---- raw packed-ring access ----------------------------------------------------

    /// Writes descriptor `pos` (must be `< size`) of packed queue `queue`: address,
    /// length and id with volatile stores, then the flags word (AVAIL/USED bits as
    /// given) with a Release store, so a device that acquires the flags sees the rest.
    /// A chain is therefore written tail first: its head's flags make it available.
    pub fn write_packed_desc(&self, queue: u16, pos: u16, d: PackedDescriptor) -> Result<(), String> {
        let q = self.packed_queue(queue)?;
        if pos >= q.size {
            return Err(format!("descriptor {pos} outside packed ring of {}", q.size));
        }
        let at = q.addrs.desc + (pos as usize * packed::DESC_SIZE) as u64;
        let (w0, w1) = d.to_le_words();
        let mut bytes = [0u8; packed::DESC_SIZE];
        bytes[..8].copy_from_slice(&w0.to_ne_bytes());
        bytes[8..].copy_from_slice(&w1.to_ne_bytes());
        self.mem.write(at, &bytes[..packed::DESC_FLAGS])?;
        let flags = self.mem.atomic_u16(at + packed::DESC_FLAGS as u64)?;
        // Release: publishes the address, length and id written above.
        flags.store(d.flags.to_le(), Ordering::Release);
        Ok(())
    }

    /// Reads descriptor `pos` of packed queue `queue`: the flags word with Acquire (it
    /// pairs with the device's release store of a used descriptor's flags), then the
    /// rest with volatile loads.
    pub fn packed_desc(&self, queue: u16, pos: u16) -> Result<PackedDescriptor, String> {
        let q = self.packed_queue(queue)?;
        if pos >= q.size {
            return Err(format!("descriptor {pos} outside packed ring of {}", q.size));
        }
        let at = q.addrs.desc + (pos as usize * packed::DESC_SIZE) as u64;
        // Acquire: the id and length read below are at least as new as these flags.
        let flags =
            u16::from_le(self.mem.atomic_u16(at + packed::DESC_FLAGS as u64)?.load(Ordering::Acquire));
        let b = self.mem.read(at, packed::DESC_FLAGS)?;
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&b[..8]);
        Ok(PackedDescriptor {
            addr: u64::from_le_bytes(addr),
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            id: u16::from_le_bytes([b[12], b[13]]),
            flags,
        })
    }

    /// Polls until descriptor `pos` of packed queue `queue` is marked used for the used
    /// wrap counter `wrap` (AVAIL == USED == `wrap`), for at most `timeout`; returns it.
    pub fn wait_packed_used(
        &self,
        queue: u16,
        pos: u16,
        wrap: bool,
        timeout: Duration,
    ) -> Result<PackedDescriptor, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let d = self.packed_desc(queue, pos)?;
            if packed::is_used(d.flags, wrap) {
                return Ok(d);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "queue {queue}: descriptor {pos} not used (wrap {wrap}) after {timeout:?}: flags {:#06x}",
                    d.flags
                ));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    // ---- well-behaved traffic -------------------------------------------------------

    /// Takes the completions the device published since the last call, checking each:
    /// the id must name a descriptor this layer posted and still owned by the device,
    /// and the used index may not run ahead of what was posted. Returns
    /// `(id, used len, posted len)` per completion and frees the descriptors.
    fn reap(&mut self, queue: u16) -> Result<Vec<(u16, u32, u32)>, String> {
        let used = self.used_idx(queue)?;
        let mut out = Vec::new();
        let (mut last, size) = {
            let q = self.queue(queue)?;
            (q.last_used, q.size)
        };
        let outstanding = {
            let q = self.queue(queue)?;
            q.next_avail.wrapping_sub(q.last_used)
        };
        if used.wrapping_sub(last) > outstanding {
            return Err(format!(
                "queue {queue}: used idx {used} ran ahead: last seen {last}, {outstanding} outstanding"
            ));
        }
        while last != used {
            let (id, len) = self.used_elem(queue, last)?;
            let q = self.queue_mut(queue)?;
            if id >= size as u32 {
                return Err(format!("queue {queue}: used id {id} out of range"));
            }
            let posted = q.inflight[id as usize]
                .take()
                .ok_or_else(|| format!("queue {queue}: used id {id} was not in flight"))?;
            q.free.push(id as u16);
            out.push((id as u16, len, posted));
            last = last.wrapping_add(1);
            q.last_used = last;
        }
        Ok(out)
    }

    /// Posts one descriptor `d` (whose buffer the caller prepared) under id `id`.
    fn post(&mut self, queue: u16, id: u16, d: Descriptor) -> Result<(), String> {
        self.write_desc(queue, id, d)?;
        let slot = self.queue(queue)?.next_avail;
        self.write_avail_slot(queue, slot, id)?;
        let q = self.queue_mut(queue)?;
        q.inflight[id as usize] = Some(d.len);
        q.next_avail = slot.wrapping_add(1);
        Ok(())
    }

    /// Publishes everything posted so far (one Release store) and kicks.
    fn publish(&mut self, queue: u16) -> Result<(), String> {
        let idx = self.queue(queue)?.next_avail;
        self.set_avail_idx(queue, idx)?;
        self.kick(queue)
    }

    /// A descriptor id and a buffer of at least `cap` bytes attached to it.
    fn take_buffer(&mut self, queue: u16, cap: usize) -> Result<(u16, u64), String> {
        let id =
            self.queue_mut(queue)?.free.pop().ok_or_else(|| format!("queue {queue}: no free descriptor"))?;
        let have = self.queue(queue)?.bufs[id as usize];
        let gpa = match have {
            Some((gpa, c)) if c as usize >= cap => gpa,
            _ => {
                let cap = cap.max(TX_BUF_MIN);
                let gpa = match self.alloc(cap, 64) {
                    Ok(g) => g,
                    Err(e) => {
                        self.queue_mut(queue)?.free.push(id);
                        return Err(e);
                    }
                };
                self.queue_mut(queue)?.bufs[id as usize] = Some((gpa, cap as u32));
                gpa
            }
        };
        Ok((id, gpa))
    }

    /// Frees TX descriptors the device has completed; returns how many.
    pub fn reclaim(&mut self, queue: u16) -> Result<usize, String> {
        Ok(self.reap(queue)?.len())
    }

    /// Number of buffers posted by the convenience layer and not yet completed.
    pub fn in_flight(&self, queue: u16) -> Result<u16, String> {
        let q = self.queue(queue)?;
        Ok(q.next_avail.wrapping_sub(q.last_used))
    }

    /// Sends each frame on `queue` (normally 1, the TX queue of pair 0) as one
    /// device-readable descriptor holding a zeroed 12-byte `virtio_net_hdr_v1` followed
    /// by the frame; publishes them with one avail-idx store and kicks. Completed TX
    /// descriptors are reclaimed first; fails if the ring has no room.
    pub fn send_frames(&mut self, queue: u16, frames: &[Vec<u8>]) -> Result<(), String> {
        self.reclaim(queue)?;
        for f in frames {
            let total = layout::NET_HDR_LEN + f.len();
            let len = u32::try_from(total).map_err(|_| "frame too long".to_string())?;
            let (id, gpa) = self.take_buffer(queue, total)?;
            self.write_mem(gpa, &[0u8; layout::NET_HDR_LEN])?;
            self.write_mem(gpa + layout::NET_HDR_LEN as u64, f)?;
            let d = Descriptor { addr: gpa + self.iova_offset, len, flags: 0, next: 0 };
            self.post(queue, id, d)?;
        }
        self.publish(queue)
    }

    /// [`RawFrontend::send_frames`] for packets that bring their own 12-byte
    /// `virtio_net_hdr_v1` (offload requests, or lies): each packet, header included, is
    /// one device-readable descriptor, written as given.
    pub fn send_packets(&mut self, queue: u16, packets: &[Vec<u8>]) -> Result<(), String> {
        self.reclaim(queue)?;
        for p in packets {
            let len = u32::try_from(p.len()).map_err(|_| "packet too long".to_string())?;
            let (id, gpa) = self.take_buffer(queue, p.len())?;
            self.write_mem(gpa, p)?;
            let d = Descriptor { addr: gpa + self.iova_offset, len, flags: 0, next: 0 };
            self.post(queue, id, d)?;
        }
        self.publish(queue)
    }

    /// Waits until every TX buffer posted on `queue` has been completed (and reclaims
    /// them), for at most `timeout`.
    pub fn wait_tx_done(&mut self, queue: u16, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            self.reclaim(queue)?;
            let left = self.in_flight(queue)?;
            if left == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!("queue {queue}: {left} TX buffers still in flight after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Posts `n` device-writable buffers of `buf_len` bytes each on `queue` (normally
    /// 0, the RX queue of pair 0), one descriptor each; publishes and kicks.
    pub fn post_rx_buffers(&mut self, queue: u16, n: u16, buf_len: u32) -> Result<(), String> {
        for _ in 0..n {
            let (id, gpa) = self.take_buffer(queue, buf_len as usize)?;
            let d = Descriptor {
                addr: gpa + self.iova_offset,
                len: buf_len,
                flags: layout::DESC_F_WRITE,
                next: 0,
            };
            self.post(queue, id, d)?;
        }
        self.publish(queue)
    }

    /// Collects the frames the device wrote into posted RX buffers since the last call,
    /// the 12-byte net header stripped, in used-ring order. A used length shorter than
    /// the header or longer than the buffer is an error. Buffers are not re-posted.
    pub fn poll_rx(&mut self, queue: u16) -> Result<Vec<Vec<u8>>, String> {
        let packets = self.poll_rx_packets(queue)?;
        Ok(packets.into_iter().map(|p| p[layout::NET_HDR_LEN..].to_vec()).collect())
    }

    /// [`RawFrontend::poll_rx`] with the 12-byte net header kept in front of each frame.
    pub fn poll_rx_packets(&mut self, queue: u16) -> Result<Vec<Vec<u8>>, String> {
        let done = self.reap(queue)?;
        let mut packets = Vec::with_capacity(done.len());
        for (id, len, posted) in done {
            if (len as usize) < layout::NET_HDR_LEN || len > posted {
                return Err(format!(
                    "queue {queue}: used len {len} for id {id} outside [{}, {posted}]",
                    layout::NET_HDR_LEN
                ));
            }
            let (gpa, _) = self.queue(queue)?.bufs[id as usize]
                .ok_or_else(|| format!("queue {queue}: id {id} has no buffer"))?;
            packets.push(self.read_mem(gpa, len as usize)?);
        }
        Ok(packets)
    }

    /// The bytes the device wrote into each receive buffer it used since the last call,
    /// in used-ring order, whatever their length (mergeable receive buffers: only a
    /// packet's first buffer starts with a net header). A used length longer than the
    /// buffer is an error. Buffers are not re-posted.
    pub fn poll_rx_buffers(&mut self, queue: u16) -> Result<Vec<Vec<u8>>, String> {
        let done = self.reap(queue)?;
        let mut bufs = Vec::with_capacity(done.len());
        for (id, len, posted) in done {
            if len > posted {
                return Err(format!(
                    "queue {queue}: used len {len} for id {id} over the {posted}-byte buffer"
                ));
            }
            let (gpa, _) = self.queue(queue)?.bufs[id as usize]
                .ok_or_else(|| format!("queue {queue}: id {id} has no buffer"))?;
            bufs.push(self.read_mem(gpa, len as usize)?);
        }
        Ok(bufs)
    }

    /// Polls [`RawFrontend::poll_rx_packets`] until `n` packets (net header included)
    /// arrived, for at most `timeout`; more than `n` is an error.
    pub fn recv_packets(&mut self, queue: u16, n: usize, timeout: Duration) -> Result<Vec<Vec<u8>>, String> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            got.extend(self.poll_rx_packets(queue)?);
            if got.len() >= n {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!("queue {queue}: received {} of {n} packets in {timeout:?}", got.len()));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if got.len() > n {
            return Err(format!("queue {queue}: received {} packets, expected {n}", got.len()));
        }
        Ok(got)
    }

    // ---- control queue --------------------------------------------------------------

    /// Sends one command on the control queue `queue` and waits (at most `timeout`) for
    /// the device to use it: each of `readable` becomes one device-readable descriptor
    /// (the class/command header and data, split as the caller likes), then one
    /// device-writable descriptor of `ack_len` bytes (none if 0), chained from
    /// descriptor 0. The ack buffer is filled with 0xee first, so an ack the device did
    /// not write shows. Returns `(used len, first ack byte)`; the used id must be the
    /// head. Commands go one at a time: the previous one must have been used.
    pub fn ctrl_command(
        &mut self,
        queue: u16,
        readable: &[&[u8]],
        ack_len: u32,
        timeout: Duration,
    ) -> Result<(u32, Option<u8>), String> {
        let n = readable.len() + usize::from(ack_len > 0);
        let size = self.queue(queue)?.size as usize;
        if n == 0 || n > size {
            return Err(format!("control chain of {n} descriptors does not fit queue {queue}"));
        }
        let mut descs = Vec::with_capacity(n);
        for part in readable {
            let gpa = self.alloc(part.len().max(1), 64)?;
            self.write_mem(gpa, part)?;
            descs.push(Descriptor { addr: gpa, len: part.len() as u32, flags: 0, next: 0 });
        }
        let ack_gpa = if ack_len > 0 {
            let gpa = self.alloc(ack_len as usize, 64)?;
            self.write_mem(gpa, &vec![0xee; ack_len as usize])?;
            descs.push(Descriptor { addr: gpa, len: ack_len, flags: layout::DESC_F_WRITE, next: 0 });
            Some(gpa)
        } else {
            None
        };
        for (i, d) in descs.iter_mut().enumerate() {
            if i + 1 < n {
                d.flags |= layout::DESC_F_NEXT;
                d.next = i as u16 + 1;
            }
            self.write_desc(queue, i as u16, *d)?;
        }
        let (slot, last_used) = {
            let q = self.queue(queue)?;
            (q.next_avail, q.last_used)
        };
        if slot != last_used {
            return Err(format!("queue {queue}: a control command is still outstanding"));
        }
        self.write_avail_slot(queue, slot, 0)?;
        let next = slot.wrapping_add(1);
        self.queue_mut(queue)?.next_avail = next;
        self.set_avail_idx(queue, next)?;
        self.kick(queue)?;
        self.wait_used_idx(queue, next, timeout)?;
        self.queue_mut(queue)?.last_used = next;
        let (id, len) = self.used_elem(queue, slot)?;
        if id != 0 {
            return Err(format!("queue {queue}: used id {id}, expected the head 0"));
        }
        let ack = match ack_gpa {
            Some(gpa) => Some(self.read_mem(gpa, 1)?[0]),
            None => None,
        };
        Ok((len, ack))
    }

    /// Polls [`RawFrontend::poll_rx`] until `n` frames arrived, for at most `timeout`.
    /// More than `n` frames is an error too (the caller asked for an exact count).
    pub fn recv_frames(&mut self, queue: u16, n: usize, timeout: Duration) -> Result<Vec<Vec<u8>>, String> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            got.extend(self.poll_rx(queue)?);
            if got.len() >= n {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!("queue {queue}: received {} of {n} frames in {timeout:?}", got.len()));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if got.len() > n {
            return Err(format!("queue {queue}: received {} frames, expected {n}", got.len()));
        }
        Ok(got)
    }
}
