//! Entry points for the fuzz targets in `tests/fuzz/` (feature `fuzzing` only; hidden
//! from the documentation, not an API).
//!
//! Owns: thin wrappers that let a fuzz target drive crate-internal code with values it
//! decoded from its input: a device ring (split or packed) over guest memory built from
//! the input ([`RingSession`]), the control-command parser ([`ctrl_command`]), the IOTLB
//! table and a ring's view of it ([`IotlbSession`]), and a device's vhost-user handler
//! ([`HandlerSession`]). Each wrapper checks what the code under test promises (every
//! walked buffer lies inside guest memory, translations land where the mapping says) and
//! panics when a promise is broken, which is how a fuzzer reports it.
//! Must not: change the behaviour of the code it wraps (no checks are relaxed for fuzzing;
//! it only calls what the workers and the control thread call).

use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserMemoryRegion, VhostUserVringAddrFlags};
use vhost::vhost_user::VhostUserBackendReqHandler;

use crate::config::PortKind;
use crate::ctrl::{self, RxConfig};
use crate::device::{Device, DeviceParams, Handler};
use crate::iotlb::{Iotlb, IovaView, Mapping};
use crate::memory::{GuestMemory, RegionDesc};
use crate::packed_ring::PackedRing;
use crate::ring::{AnyRing, Ring};
use crate::split_ring::{gather, scatter, Chain, DeviceRing, Dir, RingConfig, RingFault};
use crate::worker::Engine;

/// Guest-physical start of the fuzzed guest memory's first region.
pub const MEM_GPA: u64 = 0x1_0000;
/// Its length (the ring areas' default places lie inside it).
pub const MEM_LEN: u64 = 0x1_0000;
/// The second region: right after the first in guest-physical space (so buffers can
/// straddle the two), elsewhere in the front-end's address space.
pub const MEM2_GPA: u64 = MEM_GPA + MEM_LEN;
/// Its length.
pub const MEM2_LEN: u64 = 0x4000;
/// Front-end virtual address of the first region (ring addresses are these).
pub const MEM_UVA: u64 = 0x7f00_0000_0000;
/// Front-end virtual address of the second region (not adjacent to the first).
pub const MEM2_UVA: u64 = 0x7e00_0000_0000;
/// Default ring placement inside the first region (guest-physical offsets from
/// [`MEM_GPA`]): descriptor table or ring, driver area, device area; each fits a ring of
/// up to 256 entries.
pub const DESC_OFF: u64 = 0;
/// See [`DESC_OFF`].
pub const AVAIL_OFF: u64 = 0x1000;
/// See [`DESC_OFF`].
pub const USED_OFF: u64 = 0x2000;

/// A memfd of `len` bytes (the fuzz targets' guest memory).
fn memfd(len: u64) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"vnet-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` is a fresh descriptor we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("ftruncate memfd");
    f
}

/// How a fuzzed ring is set up.
#[derive(Debug, Clone, Copy)]
pub struct RingParams {
    /// Packed (§2.8) rather than split (§2.7).
    pub packed: bool,
    /// Queue size (any value: the set-up must refuse a bad one).
    pub size: u16,
    /// `SET_VRING_BASE`.
    pub base: u16,
    /// Front-end virtual addresses of the three areas.
    pub desc_uva: u64,
    /// Driver area.
    pub avail_uva: u64,
    /// Device area.
    pub used_uva: u64,
    /// `VIRTIO_RING_F_EVENT_IDX`.
    pub event_idx: bool,
    /// `VIRTIO_RING_F_INDIRECT_DESC`.
    pub indirect: bool,
    /// `VIRTIO_F_IN_ORDER`.
    pub in_order: bool,
}

/// A device ring over two regions of guest memory that the fuzz target writes as the
/// driver would.
pub struct RingSession {
    mem: Arc<GuestMemory>,
    ring: AnyRing,
    /// Host ranges of the two regions: every walked buffer must lie inside one.
    hosts: [(usize, usize); 2],
    /// Scratch for gathered bytes and bytes to scatter.
    buf: Vec<u8>,
    /// Chains completed so far.
    pub completed: u64,
}

/// What one burst did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BurstOutcome {
    /// The burst completed this many chains.
    Done(u16),
    /// The ring found a protocol violation (the queue would now be marked broken).
    Broken,
}

impl RingSession {
    /// Maps the guest memory (zeroed), writes `image` at [`MEM_GPA`], and sets the ring
    /// up; `None` if the set-up refused the parameters (as activation would).
    pub fn new(p: &RingParams, image: &[u8]) -> Option<RingSession> {
        // One mapping per thread, zeroed for each session: mapping fresh memfds for every
        // input cost most of an execution (a ring holds its own `Arc`, and sessions do
        // not overlap on a thread).
        thread_local! {
            static MEM: Arc<GuestMemory> = Arc::new(
                GuestMemory::map(&[
                    RegionDesc { gpa: MEM_GPA, len: MEM_LEN, uva: MEM_UVA, mmap_offset: 0 },
                    RegionDesc { gpa: MEM2_GPA, len: MEM2_LEN, uva: MEM2_UVA, mmap_offset: 0 },
                ], vec![memfd(MEM_LEN), memfd(MEM2_LEN)])
                .expect("fuzz guest memory"),
            );
        }
        let mem = MEM.with(|m| m.clone());
        let mut hint = 0;
        let h0 = mem.translate_whole(&mut hint, MEM_GPA, MEM_LEN).expect("region 0") as usize;
        let h1 = mem.translate_whole(&mut hint, MEM2_GPA, MEM2_LEN).expect("region 1") as usize;
        // SAFETY: both regions, whole, inside the mapping `mem` keeps alive; no ring of an
        // earlier session is alive (each session owns the only other `Arc` while it runs).
        unsafe {
            std::ptr::write_bytes(h0 as *mut u8, 0, MEM_LEN as usize);
            std::ptr::write_bytes(h1 as *mut u8, 0, MEM2_LEN as usize);
        }
        let cfg = RingConfig {
            size: p.size,
            desc_uva: p.desc_uva,
            avail_uva: p.avail_uva,
            used_uva: p.used_uva,
            base: p.base,
            event_idx: p.event_idx,
            indirect: p.indirect,
            in_order: p.in_order,
        };
        // The image goes in before the ring exists (set-up publishes its used index).
        write_mem(&mem, MEM_GPA, image);
        let ring = if p.packed {
            AnyRing::Packed(Box::new(PackedRing::new(&cfg, mem.clone(), None, None).ok()?))
        } else {
            AnyRing::Split(DeviceRing::new(&cfg, mem.clone(), None, None).ok()?)
        };
        Some(RingSession {
            ring,
            mem,
            hosts: [(h0, h0 + MEM_LEN as usize), (h1, h1 + MEM2_LEN as usize)],
            buf: vec![0; 1 << 16],
            completed: 0,
        })
    }

    /// Writes `bytes` at guest-physical `gpa` as the driver would (clipped to guest
    /// memory; a write outside it is dropped).
    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        write_mem(&self.mem, gpa, bytes)
    }

    /// One device burst, as a port runs it: poll, walk up to `max` chains in `dir`
    /// (0: transmit, 1: receive, 2: control), read every readable byte, write `written`
    /// bytes into the writable part, complete them and publish.
    pub fn burst(&mut self, dir: u8, max: u16, written: u32) -> BurstOutcome {
        let dir = match dir % 3 {
            0 => Dir::DeviceReads,
            1 => Dir::DeviceWrites,
            _ => Dir::ReadsThenWrites,
        };
        let mem = self.mem.clone();
        let res = match &mut self.ring {
            AnyRing::Split(r) => run_burst(r, &mem, dir, max, written, &self.hosts, &mut self.buf),
            AnyRing::Packed(r) => run_burst(&mut **r, &mem, dir, max, written, &self.hosts, &mut self.buf),
        };
        match res {
            Ok(n) => {
                self.completed += n as u64;
                BurstOutcome::Done(n)
            }
            Err(_) => BurstOutcome::Broken,
        }
    }

    /// Where the ring resumes (`GET_VRING_BASE`).
    pub fn last_avail(&self) -> u16 {
        self.ring.last_avail()
    }
}

/// Writes `bytes` at guest-physical `gpa` of `mem`, up to the first byte outside it.
fn write_mem(mem: &GuestMemory, gpa: u64, bytes: &[u8]) {
    let mut hint = 0;
    let mut at = gpa;
    let mut rest = bytes;
    while !rest.is_empty() {
        let Some((p, n)) = mem.translate(&mut hint, at, rest.len() as u64) else {
            return;
        };
        let n = n as usize;
        // SAFETY: `p .. + n` lies inside a mapping of `mem` (`translate`); `rest` is ours
        // and at least `n` long.
        unsafe { std::ptr::copy(rest.as_ptr(), p, n) };
        rest = &rest[n..];
        at += n as u64;
    }
}

fn check_inside(hosts: &[(usize, usize); 2], chain: &Chain<'_>) {
    for s in chain.segs() {
        let (lo, hi) = (s.ptr as usize, s.ptr as usize + s.len as usize);
        assert!(
            hosts.iter().any(|&(a, b)| a <= lo && hi <= b),
            "walked buffer {lo:#x}+{} outside guest memory {hosts:x?}",
            s.len
        );
    }
}

fn run_burst<R: Ring>(
    r: &mut R,
    mem: &GuestMemory,
    dir: Dir,
    max: u16,
    written: u32,
    hosts: &[(usize, usize); 2],
    buf: &mut [u8],
) -> Result<u16, RingFault> {
    let avail = r.poll_avail_max(max)?;
    let n = avail.min(max);
    let mut chain = Chain::default();
    for i in 0..n {
        let head = r.walk_avail(mem, i, dir, &mut chain)?;
        check_inside(hosts, &chain);
        assert!(chain.readable <= chain.total);
        // Every readable byte (at most the scratch buffer), then the writable part.
        let readable = (chain.readable as usize).min(buf.len());
        let got = gather(&chain, 0, &mut buf[..readable]);
        // A truncated chain holds only its first pieces (`Chain::truncated`): the bytes
        // of those, never more.
        if chain.truncated {
            assert!(got <= readable);
        } else {
            assert_eq!(got, readable, "a walked chain holds its readable bytes");
        }
        let room = (chain.total - chain.readable) as usize;
        let w = (written as usize).min(room).min(buf.len());
        let put = scatter(&chain, chain.readable as usize, &buf[..w]);
        if !chain.truncated {
            assert_eq!(put, w, "a walked chain holds its writable bytes");
        }
        r.add_used(head, put as u32);
    }
    r.consume(n);
    r.publish_used();
    Ok(n)
}

/// Parses one control command as the control queue would, applies it to a fresh
/// receive configuration and runs the filter over `frame`. Returns whether it parsed.
pub fn ctrl_command(data: &[u8], features: u64, max_pairs: u16, frame: &[u8]) -> bool {
    let mut rx = RxConfig::reset([0x52, 0x54, 0, 0x12, 0x34, 0x56], features);
    match ctrl::parse(data, features, max_pairs) {
        Ok(cmd) => {
            rx.apply(&cmd);
            let _ = rx.accepts(frame);
            let _ = (rx.pass_all(), rx.tso4(), rx.tso6(), rx.csum(), rx.vlan_count());
            let _ = rx.to_json();
            true
        }
        Err(why) => {
            let _ = why.to_string();
            false
        }
    }
}

/// One IOTLB message's outcome as the table reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// Added; `true` if it replaced part of an older mapping.
    Added(bool),
    /// Refused (bad range, bad permission, full).
    Refused,
}

/// The IOTLB of one connection and guest memory its translations point into (one
/// region: [`MEM_UVA`], [`MEM_LEN`] bytes).
pub struct IotlbSession {
    tlb: Arc<Iotlb>,
    mem: GuestMemory,
    host: usize,
}

impl Default for IotlbSession {
    fn default() -> Self {
        Self::new()
    }
}

impl IotlbSession {
    /// An empty table.
    pub fn new() -> IotlbSession {
        let mem = GuestMemory::map(
            &[RegionDesc { gpa: MEM_GPA, len: MEM_LEN, uva: MEM_UVA, mmap_offset: 0 }],
            vec![memfd(MEM_LEN)],
        )
        .expect("iotlb memory");
        let host = mem.uva_to_host(MEM_UVA, 1).expect("region") as usize;
        IotlbSession { tlb: Iotlb::new(), mem, host }
    }

    /// `VHOST_IOTLB_UPDATE`.
    pub fn update(&self, iova: u64, size: u64, uaddr: u64, perm: u8) -> UpdateOutcome {
        match self.tlb.update(Mapping { iova, size, uaddr, perm }) {
            Ok(replaced) => UpdateOutcome::Added(replaced),
            Err(_) => UpdateOutcome::Refused,
        }
    }

    /// `VHOST_IOTLB_INVALIDATE`; whether anything changed.
    pub fn invalidate(&self, iova: u64, size: u64) -> bool {
        self.tlb.invalidate(iova, size)
    }

    /// Mappings in the table.
    pub fn len(&self) -> usize {
        self.tlb.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The table's answer for `iova`: `(uaddr, perm)` of the byte.
    pub fn lookup(&self, iova: u64) -> Option<(u64, u8)> {
        self.tlb.lookup(iova).map(|m| (m.uaddr + (iova - m.iova), m.perm))
    }

    /// Translates `[iova, iova + len)` through a fresh ring view twice (the second time
    /// from its cache) for a read or a write; returns the front-end address of `iova`
    /// and the contiguous length, or `None` (a miss or a denial). Panics if the two
    /// answers differ or the pointer is not where the front-end address lies in memory.
    pub fn translate(&self, iova: u64, len: u64, write: bool) -> Option<(u64, u64)> {
        let mut view = IovaView::new(self.tlb.clone());
        let first = view.translate(&self.mem, iova, len.max(1), write);
        let again = view.translate(&self.mem, iova, len.max(1), write);
        assert_eq!(first, again, "a cached translation differs from the table's");
        let (p, n) = first.ok()?;
        let off = (p as usize).checked_sub(self.host).expect("pointer before the region");
        assert!(off as u64 + n <= MEM_LEN, "translation runs past the region");
        assert!(n >= 1 && n <= len.max(1));
        Some((MEM_UVA + off as u64, n))
    }

    /// Translates a whole range (ring areas, indirect tables) through a fresh view:
    /// whether it succeeded; panics if the pointer is outside the region.
    pub fn translate_whole(&self, iova: u64, len: u64, write: bool) -> bool {
        let mut view = IovaView::new(self.tlb.clone());
        match view.translate_whole(&self.mem, iova, len.max(1), write) {
            Ok(p) => {
                let off = (p as usize).checked_sub(self.host).expect("pointer before the region");
                assert!(off as u64 + len.max(1) <= MEM_LEN, "whole translation runs past the region");
                true
            }
            Err(_) => false,
        }
    }
}

/// One memory region of a fuzzed `SET_MEM_TABLE`: its file is exactly `mmap_offset +
/// len` bytes long (a region longer than its file is the backend hardening's case, not
/// this target's).
#[derive(Debug, Clone, Copy)]
pub struct FuzzRegion {
    /// Guest-physical address.
    pub gpa: u64,
    /// Length (clipped to 256 KiB so that inputs cannot ask for gigabytes; at most four
    /// regions are used).
    pub len: u64,
    /// Front-end virtual address.
    pub uva: u64,
    /// Offset into the file (clipped to 64 KiB, page-aligned).
    pub mmap_offset: u64,
}

/// What a fuzzed message gives as a file descriptor.
#[derive(Debug, Clone, Copy)]
pub enum FuzzFd {
    /// None (`VHOST_USER_VRING_NOFD_MASK`).
    None,
    /// A fresh eventfd.
    EventFd,
    /// An eventfd already signalled.
    Signalled,
    /// The read end of a pipe in place of an eventfd.
    Pipe,
}

impl FuzzFd {
    fn file(self) -> Option<File> {
        let efd = |n: u64| {
            // SAFETY: plain syscall; the result is checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            assert!(fd >= 0, "eventfd failed");
            // SAFETY: a fresh descriptor we own.
            let mut f = unsafe { File::from_raw_fd(fd) };
            if n > 0 {
                f.write_all(&n.to_ne_bytes()).expect("eventfd write");
            }
            f
        };
        match self {
            FuzzFd::None => None,
            FuzzFd::EventFd => Some(efd(0)),
            FuzzFd::Signalled => Some(efd(1)),
            FuzzFd::Pipe => {
                let mut fds = [0; 2];
                // SAFETY: `fds` has room for the two descriptors; the result is checked.
                let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
                assert_eq!(rc, 0, "pipe2 failed");
                // SAFETY: `fds[1]` is a descriptor we own and drop here.
                drop(unsafe { File::from_raw_fd(fds[1]) });
                // SAFETY: `fds[0]` is a descriptor we own.
                Some(unsafe { File::from_raw_fd(fds[0]) })
            }
        }
    }
}

/// A device (a `reflect` port of `queue_pairs` pairs, packed rings and the vIOMMU
/// offered) with no workers, driven through its vhost-user handler. After each message
/// [`HandlerSession::activate_all`] does what a worker's resync does: builds every ring
/// that may run from the device state, runs one burst on it and lets it go.
pub struct HandlerSession {
    device: Arc<Device>,
    handler: Handler,
}

impl HandlerSession {
    /// A connected device.
    pub fn new(queue_pairs: u16, iommu: bool) -> HandlerSession {
        let params = DeviceParams {
            socket: "/nonexistent/fuzz.sock".into(),
            kind: PortKind::Reflect,
            queue_pairs: queue_pairs.clamp(1, 4),
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            mtu: 1500,
            guest_offloads: 0,
            host_offloads: 0,
            iommu,
            packed: true,
            sink_read: false,
            prefetch_tx: false,
            tap: None,
            tap_syscalls: false,
        };
        // No workers: every resync returns at once; `activate_all` plays the worker.
        let engine = Engine::new(0, 0).expect("engine");
        let device = Device::new(params, engine, None);
        device.connect();
        HandlerSession { handler: Handler(device.clone()), device }
    }

    /// `GET_FEATURES`.
    pub fn get_features(&self) -> u64 {
        self.handler.get_features().unwrap_or(0)
    }
    /// `SET_FEATURES`.
    pub fn set_features(&self, f: u64) -> bool {
        self.handler.set_features(f).is_ok()
    }
    /// `SET_PROTOCOL_FEATURES`.
    pub fn set_protocol_features(&self, f: u64) -> bool {
        self.handler.set_protocol_features(f).is_ok()
    }
    /// `SET_OWNER`.
    pub fn set_owner(&self) -> bool {
        self.handler.set_owner().is_ok()
    }
    /// `RESET_OWNER`.
    pub fn reset_owner(&self) -> bool {
        self.handler.reset_owner().is_ok()
    }
    /// `SET_MEM_TABLE` with one memfd per region, each filled with `fill`.
    pub fn set_mem_table(&self, regions: &[FuzzRegion], fill: &[u8]) -> bool {
        let mut ctx = Vec::new();
        let mut files = Vec::new();
        for r in regions.iter().take(4) {
            let len = r.len.min(256 << 10);
            let off = (r.mmap_offset & 0xffff) & !0xfff;
            let f = memfd(off + len.max(1));
            if !fill.is_empty() {
                let _ = (&f).write_all(&fill[..fill.len().min((off + len) as usize)]);
            }
            ctx.push(VhostUserMemoryRegion::new(r.gpa, len, r.uva, off));
            files.push(f);
        }
        self.handler.set_mem_table(&ctx, files, None).is_ok()
    }
    /// `SET_VRING_NUM`.
    pub fn set_vring_num(&self, index: u32, num: u32) -> bool {
        self.handler.set_vring_num(index, num).is_ok()
    }
    /// `SET_VRING_ADDR`.
    pub fn set_vring_addr(&self, index: u32, desc: u64, used: u64, avail: u64) -> bool {
        self.handler.set_vring_addr(index, VhostUserVringAddrFlags::empty(), desc, used, avail, 0).is_ok()
    }
    /// `SET_VRING_BASE`.
    pub fn set_vring_base(&self, index: u32, base: u32) -> bool {
        self.handler.set_vring_base(index, base).is_ok()
    }
    /// `GET_VRING_BASE`.
    pub fn get_vring_base(&self, index: u32) -> Option<u32> {
        self.handler.get_vring_base(index).ok().map(|s| s.num)
    }
    /// `SET_VRING_KICK`.
    pub fn set_vring_kick(&self, index: u8, fd: FuzzFd) -> bool {
        self.handler.set_vring_kick(index, fd.file()).is_ok()
    }
    /// `SET_VRING_CALL`.
    pub fn set_vring_call(&self, index: u8, fd: FuzzFd) -> bool {
        self.handler.set_vring_call(index, fd.file()).is_ok()
    }
    /// `SET_VRING_ERR`.
    pub fn set_vring_err(&self, index: u8, fd: FuzzFd) -> bool {
        self.handler.set_vring_err(index, fd.file()).is_ok()
    }
    /// `SET_VRING_ENABLE`.
    pub fn set_vring_enable(&self, index: u32, enable: bool) -> bool {
        self.handler.set_vring_enable(index, enable).is_ok()
    }
    /// `GET_CONFIG`: the bytes, checked to be exactly `size` long.
    pub fn get_config(&self, offset: u32, size: u32) -> bool {
        match self.handler.get_config(offset, size, VhostUserConfigFlags::empty()) {
            Ok(v) => {
                assert_eq!(v.len(), size as usize);
                true
            }
            Err(_) => false,
        }
    }
    /// `SET_CONFIG` (refused: read-only).
    pub fn set_config(&self, offset: u32, data: &[u8]) -> bool {
        self.handler.set_config(offset, data, VhostUserConfigFlags::empty()).is_ok()
    }
    /// `GET_QUEUE_NUM`.
    pub fn get_queue_num(&self) -> u64 {
        self.handler.get_queue_num().unwrap_or(0)
    }
    /// A control command as the control worker applies it; the acknowledgement byte.
    pub fn ctrl(&self, data: &[u8]) -> u8 {
        self.device.apply_ctrl(data)
    }
    /// One request on the IOTLB channel (the messages the `vhost` crate does not serve):
    /// `bytes` as the front-end sent them (padded to a whole header), served as the
    /// device's control thread serves them; the connection then closes.
    pub fn iotlb_raw(&self, bytes: &[u8]) {
        let Ok((front, back)) = std::os::unix::net::UnixStream::pair() else {
            return;
        };
        let mut b = bytes[..bytes.len().min(4096)].to_vec();
        if b.len() < crate::iotlb_channel::HDR_LEN {
            b.resize(crate::iotlb_channel::HDR_LEN, 0);
        }
        if (&front).write_all(&b).is_err() || front.shutdown(std::net::Shutdown::Write).is_err() {
            return;
        }
        if let Ok(Some(h)) = crate::iotlb_channel::peek_header(&back) {
            if h.is_iotlb_protocol() {
                let _ = self.device.handle_iotlb_request(&back, &h);
            }
        }
    }

    /// `VHOST_USER_IOTLB_MSG` with a well-formed header (asking for a reply) and this
    /// body: an update (`kind` 2), an invalidation (3) or anything else.
    pub fn iotlb_msg(&self, iova: u64, size: u64, uaddr: u64, perm: u8, kind: u8) {
        let msg = crate::iotlb_channel::IotlbMsg { iova, size, uaddr, perm, kind };
        let mut b = Vec::with_capacity(crate::iotlb_channel::HDR_LEN + crate::iotlb_channel::IOTLB_MSG_LEN);
        b.extend_from_slice(&crate::iotlb_channel::REQ_IOTLB_MSG.to_le_bytes());
        b.extend_from_slice(&(0x1u32 | 0x8).to_le_bytes());
        b.extend_from_slice(&(crate::iotlb_channel::IOTLB_MSG_LEN as u32).to_le_bytes());
        b.extend_from_slice(&msg.bytes());
        self.iotlb_raw(&b);
    }

    /// A front-end hang-up and a new connection.
    pub fn reconnect(&self) {
        self.device.disconnect();
        self.device.connect();
    }

    /// What a worker's resync does for every queue (data and control): activates the
    /// ring if it may run (a bad ring is marked broken), runs one small burst on it and
    /// deactivates it, writing its position back. Returns the rings that ran.
    pub fn activate_all(&self) -> u32 {
        let mut ran = 0;
        for q in 0..=self.device.ctrl_queue() {
            let Some(mut active) = self.device.activate(q) else {
                continue;
            };
            ran += 1;
            let dir = if q == self.device.ctrl_queue() {
                Dir::ReadsThenWrites
            } else if q % 2 == 0 {
                Dir::DeviceWrites
            } else {
                Dir::DeviceReads
            };
            let mem = active.mem.clone();
            let res = match &mut active.ring {
                AnyRing::Split(r) => small_burst(r, &mem, dir),
                AnyRing::Packed(r) => small_burst(&mut **r, &mem, dir),
            };
            if let Err(bad) = res {
                self.device.mark_broken(q, bad);
            }
            self.device.deactivate(q, active);
        }
        ran
    }

    /// The device's statistics as the front-end's stats line shows them.
    pub fn snapshot_json(&self) -> String {
        self.device.snapshot().to_json().to_string()
    }
}

/// One burst of up to 8 chains on an activated ring: walk, read a little, complete.
fn small_burst<R: Ring>(r: &mut R, mem: &GuestMemory, dir: Dir) -> Result<(), RingFault> {
    let n = r.poll_avail_max(8)?.min(8);
    let mut chain = Chain::default();
    let mut buf = [0u8; 64];
    for i in 0..n {
        let head = r.walk_avail(mem, i, dir, &mut chain)?;
        let got = gather(&chain, 0, &mut buf[..(chain.readable as usize).min(64)]);
        r.add_used(head, got as u32);
    }
    r.consume(n);
    r.publish_used();
    Ok(())
}
