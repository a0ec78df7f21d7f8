//! Tap devices: the kernel side of a `tap` port, one file descriptor per queue.
//!
//! Owns: creating a tap interface (or attaching to an existing one) with
//! `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` through `/dev/net/tun`, its virtio-net header
//! size (`TUNSETVNETHDRSZ`), the offloads the kernel may use towards us
//! (`TUNSETOFFLOAD`), non-blocking `readv`/`writev` on the descriptor (a burst's writes
//! batched through io_uring in [`batch`]), and the one-line
//! errors for what can go wrong at open (no `/dev/net/tun`, no `CAP_NET_ADMIN`, the
//! device busy, a name that is not a tap).
//! Must not: bring any interface up or down, change its addresses, MTU or namespace
//! (the user's, or the test's), touch any interface that is not the one named, or
//! know about rings.
//!
//! Lifetime: the tap is opened non-persistent. A tap we created disappears when its
//! last descriptor closes (when the port's paths are dropped at shutdown, or when the
//! process dies); a tap that existed before (made persistent by someone else, e.g.
//! `ip tuntap add`) is only detached from and stays.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use spec::layout::NET_HDR_LEN;

use crate::error::{Error, Result};

pub(crate) mod batch;

/// Longest interface name (`IFNAMSIZ` - 1).
pub(crate) const MAX_IFNAME: usize = libc::IFNAMSIZ - 1;

/// Checks an interface name the way the kernel does (`dev_valid_name`).
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b == b',' || b.is_ascii_whitespace() || b == 0)
}

/// Offload flags the kernel may use in what it hands us (`TUNSETOFFLOAD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Offloads {
    /// Partial checksums (`TUN_F_CSUM`).
    pub csum: bool,
    /// TCP/IPv4 super-frames (`TUN_F_TSO4`, needs `csum`).
    pub tso4: bool,
    /// TCP/IPv6 super-frames (`TUN_F_TSO6`, needs `csum`).
    pub tso6: bool,
}

impl Offloads {
    fn flags(self) -> libc::c_uint {
        let mut f = 0;
        if self.csum {
            f |= libc::TUN_F_CSUM;
            if self.tso4 {
                f |= libc::TUN_F_TSO4;
            }
            if self.tso6 {
                f |= libc::TUN_F_TSO6;
            }
        }
        f
    }
    /// Whether the kernel may send super-frames.
    pub fn gso(self) -> bool {
        self.csum && (self.tso4 || self.tso6)
    }
}

/// One queue of a tap device: an open, non-blocking `/dev/net/tun` descriptor attached
/// to the interface.
pub(crate) struct TapQueue {
    fd: OwnedFd,
    name: String,
    /// Opened with `IFF_MULTI_QUEUE`: the queue can be detached from the kernel's
    /// steering (`TUNSETQUEUE`).
    multi_queue: bool,
    /// Attached to the kernel's steering (every queue starts attached).
    enabled: bool,
    /// What `TUNSETOFFLOAD` was last set to (`None`: not yet).
    offloads: Option<Offloads>,
}

/// A tap device's queues.
pub(crate) struct Tap {
    /// One descriptor per queue (one unless multi-queue). A tap this process created
    /// goes away when they all close.
    pub queues: Vec<TapQueue>,
}

fn exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

fn is_tun(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).join("tun_flags").exists()
}

/// Opens (creating it if it does not exist) the tap interface `name` with `queues`
/// queues (`IFF_MULTI_QUEUE` when more than one), each descriptor non-blocking, with a
/// virtio-net header of [`NET_HDR_LEN`] bytes and no offloads until
/// [`TapQueue::set_offloads`].
pub(crate) fn open(name: &str, queues: u16) -> Result<Tap> {
    let err = |msg: String| Error::Tap { ifname: name.to_string(), msg };
    if !valid_name(name) {
        return Err(err(format!(
            "not a valid interface name (1 to {MAX_IFNAME} bytes, no '/', ':', ',' or spaces)"
        )));
    }
    let existed = exists(name);
    if existed && !is_tun(name) {
        return Err(err("an interface of that name exists and is not a tap device".into()));
    }
    let mut out = Vec::with_capacity(queues as usize);
    for _ in 0..queues {
        out.push(open_queue(name, queues > 1).map_err(|e| err(open_error(e, existed)))?);
    }
    if existed {
        log::info!(
            "tap {name}: attached to the existing interface ({} queue(s)); it stays after exit",
            queues
        );
    } else {
        log::info!("tap {name}: created ({} queue(s)); removed at exit", queues);
    }
    Ok(Tap { queues: out })
}

/// The one line a failed open becomes.
fn open_error(e: io::Error, existed: bool) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENODEV) => {
            format!("cannot open /dev/net/tun ({e}): is the tun module loaded?")
        }
        Some(libc::EPERM) | Some(libc::EACCES) => format!(
            "{} needs CAP_NET_ADMIN ({e}): run as root or grant the capability",
            if existed { "attaching to the tap" } else { "creating the tap" }
        ),
        Some(libc::EBUSY) => format!("the device is busy ({e}): another process has it open"),
        Some(libc::EINVAL) if existed => format!(
            "the existing interface does not take these flags ({e}): a tun (not tap) device, or \
             created with a different multi-queue setting"
        ),
        _ => format!("{e}"),
    }
}

fn open_queue(name: &str, multi_queue: bool) -> io::Result<TapQueue> {
    let path = CString::new("/dev/net/tun").expect("no NUL inside");
    // SAFETY: `path` is a NUL-terminated string that outlives the call; the result is a
    // new descriptor (or -1) that nothing else owns.
    let raw = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just returned by open() and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `ifreq` is a plain C struct (integers, arrays, a union of them): all zeros
    // is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes an `ifreq`, which `ifr` is, for the call's length;
    // `fd` is an open /dev/net/tun descriptor.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr as *mut libc::ifreq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let hdr: libc::c_int = NET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one `int` from the pointer, which points at `hdr`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr as *const libc::c_int) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut q = TapQueue { fd, name: name.to_string(), multi_queue, enabled: true, offloads: None };
    q.set_offloads(Offloads::default())?;
    Ok(q)
}

impl TapQueue {
    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The descriptor (for the worker's epoll set).
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// A multi-queue tap's queue attached to (`on`) or detached from the kernel's
    /// steering (`TUNSETQUEUE`), as QEMU does for queue pairs the guest does not use: the
    /// kernel sends a detached queue nothing, and refuses its writes. A system call only
    /// when it changes; nothing for a single-queue tap.
    pub fn set_enabled(&mut self, on: bool) -> io::Result<()> {
        if !self.multi_queue || self.enabled == on {
            return Ok(());
        }
        // SAFETY: all zeros is a valid `ifreq` (see `open_queue`).
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        let flags = if on { libc::IFF_ATTACH_QUEUE } else { libc::IFF_DETACH_QUEUE };
        ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
        // SAFETY: TUNSETQUEUE reads an `ifreq`, which `ifr` is; `fd` is our tap queue.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETQUEUE, &mut ifr as *mut libc::ifreq) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.enabled = on;
        Ok(())
    }

    /// Whether the kernel may send frames to this queue (a single-queue tap's always;
    /// a multi-queue tap's while attached).
    pub fn steered(&self) -> bool {
        self.enabled
    }

    /// Tells the kernel which offloads it may use in the frames it hands us (a system
    /// call only when they change).
    pub fn set_offloads(&mut self, o: Offloads) -> io::Result<()> {
        if self.offloads == Some(o) {
            return Ok(());
        }
        let flags = o.flags();
        // SAFETY: TUNSETOFFLOAD takes its argument by value (an unsigned int); no memory
        // is passed.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
        self.offloads = Some(o);
        Ok(())
    }

    /// One frame (virtio-net header first) in from the kernel: its length, or
    /// `WouldBlock` when there is none.
    ///
    /// # Safety
    /// Each of `iov`'s entries must describe memory writable for its length for the
    /// duration of the call, with no Rust reference to it alive.
    pub unsafe fn readv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller guarantees every entry is writable memory nobody holds a
        // reference to; the count is the slice's length.
        let n = unsafe { libc::readv(self.fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_as_the_kernel_does() {
        assert!(valid_name("vnt0"));
        assert!(valid_name("a23456789012345"));
        assert!(!valid_name("a234567890123456"));
        assert!(!valid_name(""));
        assert!(!valid_name("."));
        assert!(!valid_name("a/b"));
        assert!(!valid_name("a b"));
        assert!(!valid_name("a:b"));
    }

    #[test]
    fn offload_flags_need_csum_for_tso() {
        let o = Offloads { csum: false, tso4: true, tso6: true };
        assert_eq!(o.flags(), 0);
        assert!(!o.gso());
        let o = Offloads { csum: true, tso4: true, tso6: false };
        assert_eq!(o.flags(), libc::TUN_F_CSUM | libc::TUN_F_TSO4);
        assert!(o.gso());
    }
}
