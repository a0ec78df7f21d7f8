//! AF_PACKET sockets with `PACKET_MMAP` rings: the kernel side of an `afpacket` port.
//!
//! Owns: one `AF_PACKET` socket bound to an existing interface, `TPACKET_V2`, with a
//! virtio-net header in front of every frame (`PACKET_VNET_HDR`, the 10-byte
//! `struct virtio_net_hdr`), `PACKET_QDISC_BYPASS`, `PACKET_IGNORE_OUTGOING` (our own
//! transmitted frames do not come back through the receive ring), a receive ring and a
//! transmit ring in one `mmap`, the slot handshake on `tp_status` (the kernel's
//! `Documentation/networking/packet_mmap.rst`), the flush `send`, the kernel's drop
//! counters (`PACKET_STATISTICS`) and the one-line errors at open (no such interface,
//! no `CAP_NET_RAW`).
//! Must not: create, move, bring up or down, or change anything about the interface; know
//! about virtqueues; hand out Rust references into the mapped rings (the kernel writes
//! them): every access is a raw-pointer copy, and `tp_status` an atomic with
//! acquire/release ordering.
//!
//! Handshake (per slot, each ring walked in order): receive: the kernel fills a slot and
//! then sets `TP_STATUS_USER` (its store is ordered after the frame, `smp_wmb` +
//! `flush_dcache_page`); we load `tp_status` with `Acquire`, copy the frame out, then
//! store `TP_STATUS_KERNEL` with `Release` so the kernel never sees the slot free before
//! we are done reading. Transmit: a slot is ours while its status is
//! `TP_STATUS_AVAILABLE` (loaded with `Acquire`: the kernel's last read of the slot is
//! done); we write the header, the frame and `tp_len`, then store
//! `TP_STATUS_SEND_REQUEST` with `Release`, and one `send(fd, NULL, 0, MSG_DONTWAIT)`
//! per burst makes the kernel send every requested slot. A slot the kernel refused
//! comes back `TP_STATUS_WRONG_FORMAT` (counted, then reused).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Error, Result};
use crate::port::offload::MAX_SUPER_FRAME;

/// `struct virtio_net_hdr` (without `num_buffers`): what `PACKET_VNET_HDR` puts in front.
pub(crate) const VNET_HDR_LEN: usize = 10;

/// `enum tpacket_versions`: `TPACKET_V2`.
const TPACKET_V2: libc::c_int = 1;

/// Offsets inside `struct tpacket2_hdr`.
const TP_STATUS: usize = 0;
const TP_LEN: usize = 4;
const TP_SNAPLEN: usize = 8;
const TP_MAC: usize = 12;
/// Where a transmitted frame (its virtio-net header first) starts in a slot without
/// `PACKET_TX_HAS_OFF`: `TPACKET2_HDRLEN - sizeof(struct sockaddr_ll)`.
const TX_DATA: usize = libc::TPACKET2_HDRLEN - std::mem::size_of::<libc::sockaddr_ll>();

/// One slot: the header, room for the largest super-frame and its virtio-net header,
/// rounded up to whole pages (one slot per block: a slot never straddles blocks).
const FRAME_SIZE: usize = (libc::TPACKET2_HDRLEN + 64 + VNET_HDR_LEN + MAX_SUPER_FRAME + 4095) & !4095;
/// Slots in the receive ring.
pub(crate) const RX_FRAMES: usize = 256;
/// Slots in the transmit ring.
pub(crate) const TX_FRAMES: usize = 128;

/// Which slots the rings hold and where.
struct Map {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; every access goes
// through raw pointers with the handshake above, from the one worker that owns the port.
unsafe impl Send for Map {}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly what mmap returned; nothing refers into it any
        // more (no references are ever made into it).
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// An AF_PACKET socket bound to one interface, with its two rings.
pub(crate) struct AfPacket {
    // Field order: the mapping goes before the socket closes.
    map: Map,
    fd: OwnedFd,
    name: String,
    rx_next: usize,
    tx_next: usize,
    /// Slots marked `SEND_REQUEST` since the last flush.
    tx_pending: usize,
}

/// A frame read from the receive ring: its length and the kernel's truncation.
pub(crate) struct RxFrame {
    /// Bytes of frame (the virtio-net header not counted) the slot holds.
    pub snap: usize,
    /// The frame's length on the wire (larger than `snap`: cut short).
    pub len: usize,
}

fn setopt<T>(fd: RawFd, opt: libc::c_int, v: &T) -> io::Result<()> {
    // SAFETY: `v` points at a live `T` of `size_of::<T>()` bytes that the kernel only
    // reads for the call's duration.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            opt,
            v as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Opens an AF_PACKET socket on the existing interface `name` with both rings.
pub(crate) fn open(name: &str) -> Result<AfPacket> {
    let err = |msg: String| Error::AfPacket { ifname: name.to_string(), msg };
    if !crate::tap::valid_name(name) {
        return Err(err("not a valid interface name".into()));
    }
    let cname = CString::new(name).map_err(|_| err("not a valid interface name".into()))?;
    // SAFETY: `cname` is NUL-terminated and outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(
            err("no such interface (an afpacket port needs an existing one, e.g. a veth end)".into()),
        );
    }
    // Protocol 0: nothing is received until the bind below names the interface.
    // SAFETY: plain system call; the result is a new descriptor or -1.
    let raw = unsafe {
        libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
    };
    if raw < 0 {
        let e = io::Error::last_os_error();
        return Err(err(match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => {
                format!("an AF_PACKET socket needs CAP_NET_RAW ({e}): run as root or grant the capability")
            }
            _ => format!("socket: {e}"),
        }));
    }
    // SAFETY: `raw` was just returned by socket() and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let s = fd.as_raw_fd();
    let ctx = |what: &'static str| move |e: io::Error| err(format!("{what}: {e}"));
    setopt(s, libc::PACKET_VERSION, &TPACKET_V2).map_err(ctx("PACKET_VERSION"))?;
    setopt(s, libc::PACKET_VNET_HDR, &(1 as libc::c_int)).map_err(ctx("PACKET_VNET_HDR"))?;
    setopt(s, libc::PACKET_QDISC_BYPASS, &(1 as libc::c_int)).map_err(ctx("PACKET_QDISC_BYPASS"))?;
    // Without it (kernels before 4.20) our own frames would come back through the
    // receive ring into the guest: refuse rather than echo them.
    setopt(s, libc::PACKET_IGNORE_OUTGOING, &(1 as libc::c_int)).map_err(ctx("PACKET_IGNORE_OUTGOING"))?;
    let req = |n: usize| libc::tpacket_req {
        tp_block_size: FRAME_SIZE as u32,
        tp_block_nr: n as u32,
        tp_frame_size: FRAME_SIZE as u32,
        tp_frame_nr: n as u32,
    };
    setopt(s, libc::PACKET_RX_RING, &req(RX_FRAMES)).map_err(ctx("PACKET_RX_RING"))?;
    setopt(s, libc::PACKET_TX_RING, &req(TX_FRAMES)).map_err(ctx("PACKET_TX_RING"))?;
    let len = FRAME_SIZE * (RX_FRAMES + TX_FRAMES);
    // SAFETY: a new shared mapping of the socket's rings (receive ring first, then the
    // transmit ring, as the kernel lays them out); no existing memory is affected.
    let base = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, s, 0)
    };
    if base == libc::MAP_FAILED {
        return Err(err(format!("mmap of the rings: {}", io::Error::last_os_error())));
    }
    let map = Map { base: base as *mut u8, len };
    // SAFETY: all zeros is a valid `sockaddr_ll` (integers and a byte array).
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a `sockaddr_ll` of the length passed, read only during the call.
    let r = unsafe {
        libc::bind(
            s,
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(err(format!("bind: {}", io::Error::last_os_error())));
    }
    log::info!(
        "afpacket {name}: bound (TPACKET_V2, {RX_FRAMES} rx / {TX_FRAMES} tx slots of {FRAME_SIZE} B)"
    );
    Ok(AfPacket { map, fd, name: name.to_string(), rx_next: 0, tx_next: 0, tx_pending: 0 })
}

impl AfPacket {
    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The socket (the worker also sleeps on it).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn rx_slot(&self, i: usize) -> *mut u8 {
        // SAFETY: `i < RX_FRAMES`: inside the receive ring of the mapping.
        unsafe { self.map.base.add(i * FRAME_SIZE) }
    }

    fn tx_slot(&self, i: usize) -> *mut u8 {
        // SAFETY: `i < TX_FRAMES`: inside the transmit ring, after the receive ring.
        unsafe { self.map.base.add((RX_FRAMES + i) * FRAME_SIZE) }
    }

    fn load_status(slot: *mut u8) -> u32 {
        // SAFETY: `tp_status` is a 4-byte aligned u32 at the start of a page-aligned slot
        // inside the mapping; the kernel and we only access it atomically, and the atomic
        // view lives for this one load.
        unsafe { AtomicU32::from_ptr(slot.add(TP_STATUS) as *mut u32) }.load(Ordering::Acquire)
    }

    fn store_status(slot: *mut u8, v: u32) {
        // SAFETY: as in `load_status`.
        unsafe { AtomicU32::from_ptr(slot.add(TP_STATUS) as *mut u32) }.store(v, Ordering::Release)
    }

    /// Copies the next received frame, if the kernel handed one over, into `out`
    /// (the virtio-net header, `VNET_HDR_LEN` bytes, then the frame; at most
    /// `out.len()` bytes) and gives the slot back.
    pub fn recv(&mut self, out: &mut [u8]) -> Option<RxFrame> {
        let slot = self.rx_slot(self.rx_next);
        if Self::load_status(slot) & libc::TP_STATUS_USER == 0 {
            return None;
        }
        // SAFETY: the slot is ours (TP_STATUS_USER, acquired above); the header fields
        // lie inside it and are read by value.
        let (len, snap, mac) = unsafe {
            (
                std::ptr::read_volatile(slot.add(TP_LEN) as *const u32) as usize,
                std::ptr::read_volatile(slot.add(TP_SNAPLEN) as *const u32) as usize,
                std::ptr::read_volatile(slot.add(TP_MAC) as *const u16) as usize,
            )
        };
        let ok = mac >= VNET_HDR_LEN && mac + snap <= FRAME_SIZE;
        let n = if ok { (VNET_HDR_LEN + snap).min(out.len()) } else { 0 };
        // SAFETY: `mac - VNET_HDR_LEN .. mac + snap` is inside the slot (checked), which
        // is ours; `out` is our own buffer of at least `n` bytes.
        unsafe { std::ptr::copy_nonoverlapping(slot.add(mac - VNET_HDR_LEN), out.as_mut_ptr(), n) };
        // Release: the copy above is complete before the kernel may reuse the slot.
        Self::store_status(slot, libc::TP_STATUS_KERNEL);
        self.rx_next = (self.rx_next + 1) % RX_FRAMES;
        Some(RxFrame { snap: n.saturating_sub(VNET_HDR_LEN), len: if ok { len } else { usize::MAX } })
    }

    /// Room for a frame of `len` bytes (the virtio-net header not counted) in a slot.
    pub fn fits(len: usize) -> bool {
        TX_DATA + VNET_HDR_LEN + len <= FRAME_SIZE
    }

    /// Queues one frame on the transmit ring: `fill` writes `len` bytes of frame at the
    /// pointer it gets (raw memory inside a slot that is ours). `false`: the ring is full
    /// (the kernel has not sent the slot yet); then nothing was written.
    /// Returns also whether the slot came back refused (`TP_STATUS_WRONG_FORMAT`) from its
    /// previous use.
    pub fn queue(
        &mut self,
        hdr: &[u8; VNET_HDR_LEN],
        len: usize,
        fill: impl FnOnce(*mut u8),
    ) -> Option<bool> {
        debug_assert!(Self::fits(len));
        let slot = self.tx_slot(self.tx_next);
        let s = Self::load_status(slot);
        if s != libc::TP_STATUS_AVAILABLE && s != libc::TP_STATUS_WRONG_FORMAT {
            return None;
        }
        // SAFETY: the slot is ours (status acquired above); `TX_DATA + 10 + len` fits the
        // slot (`fits`), and nothing else refers into it.
        unsafe {
            std::ptr::copy_nonoverlapping(hdr.as_ptr(), slot.add(TX_DATA), VNET_HDR_LEN);
            fill(slot.add(TX_DATA + VNET_HDR_LEN));
            std::ptr::write_volatile(slot.add(TP_LEN) as *mut u32, (VNET_HDR_LEN + len) as u32);
        }
        // Release: the frame and `tp_len` are written before the kernel may take it.
        Self::store_status(slot, libc::TP_STATUS_SEND_REQUEST);
        self.tx_next = (self.tx_next + 1) % TX_FRAMES;
        self.tx_pending += 1;
        Some(s == libc::TP_STATUS_WRONG_FORMAT)
    }

    /// Asks the kernel to send every queued slot (one system call), if any.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.tx_pending == 0 {
            return Ok(());
        }
        self.tx_pending = 0;
        // SAFETY: a NULL buffer of length 0 is what the TX ring's send takes.
        let r = unsafe { libc::send(self.fd.as_raw_fd(), std::ptr::null(), 0, libc::MSG_DONTWAIT) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if !matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::ENOBUFS)) {
                return Err(e);
            }
            // The kernel keeps the slots requested; the next flush sends them.
            self.tx_pending = 1;
        }
        Ok(())
    }

    /// The kernel's counters since the last call (`PACKET_STATISTICS` resets them):
    /// frames it could not put in the receive ring (ring full).
    pub fn kernel_drops(&self) -> u64 {
        // SAFETY: all zeros is a valid `tpacket_stats`.
        let mut st: libc::tpacket_stats = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `st`, which has that size.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_STATISTICS,
                &mut st as *mut libc::tpacket_stats as *mut libc::c_void,
                &mut len,
            )
        };
        if r < 0 {
            0
        } else {
            st.tp_drops as u64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_hold_a_super_frame() {
        assert_eq!(TX_DATA, 32);
        assert_eq!(FRAME_SIZE % 4096, 0);
        assert!(AfPacket::fits(MAX_SUPER_FRAME));
        assert!(!AfPacket::fits(FRAME_SIZE));
    }

    #[test]
    fn a_missing_interface_is_one_clear_line() {
        let e = open("vnetnosuch0").err().expect("no such interface").to_string();
        assert!(e.contains("no such interface"), "{e}");
    }
}
