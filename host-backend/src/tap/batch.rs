//! Batched writes and reads on one tap queue: a burst's frames go to the kernel, or come
//! from it, in one `io_uring_enter` instead of one `writev`/`readv` each.
//!
//! Owns: one io_uring instance per tap queue (the tap descriptor registered as its one
//! fixed file, which spares the kernel a descriptor lookup per frame; unregistered
//! explicitly on drop, since the instance's own teardown is asynchronous and would keep a
//! tap we created alive after we exit), the burst's copy slots for small frames, header
//! copies and iovecs, and each queued frame's result.
//! Must not: know about rings or statistics (the port's burst, `port::tap`, walks the
//! chains and decides what each result means), or leave anything in flight when
//! [`Batch::submit`] returns: it waits for every operation it queued, so no pointer it
//! handed the kernel is used after the burst.
//!
//! Why our own code over the `io-uring` crate: the tap character device takes or gives
//! one frame per `write`/`read`, and io_uring is Linux's only way to move several frames
//! through it in one system call. The kernel completes each operation inline, so one
//! `io_uring_enter` submits the burst and finds every result in the completion ring. Each
//! carries `RWF_NOWAIT`: a write the kernel would block on, or a read with no frame
//! queued, fails with `EAGAIN` at once (without it, io_uring would wait for the
//! descriptor, holding the worker). The operations are not linked (`IOSQE_IO_LINK` makes
//! the kernel run each through task work and costs most of the gain), so they are
//! independent: see [`Batch::submit`] for what that means for a write the kernel would
//! block on, and a read that found nothing may be followed by one that found a frame
//! which arrived in between. A batch holds writes or reads, never both (a transmit burst
//! submits before the receive burst queues).
//!
//! Frames up to a full Ethernet frame (header and frame up to [`SLOT`] bytes) are copied
//! into a slot and written as one buffer: the kernel's one-buffer path costs less than
//! importing an iovec array, more than the copy saves. Larger frames (jumbo frames,
//! super-frames) go as the header copy plus iovecs into guest memory.
//!
//! Without io_uring (the kernel or a sandbox refuses it, `--tap-syscalls` asks for it,
//! or the tap has a send buffer limit, under which writes can be refused out of order),
//! each frame is a `write`/`writev` of its own, in order, stopping at the first one the
//! kernel would block on.

use std::io;
use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring};
use spec::layout::NET_HDR_LEN;

/// Header and frame bytes a copy slot holds: frames up to this size are copied (a
/// full-size Ethernet frame with a VLAN tag and its header fit).
pub(crate) const SLOT: usize = 1536;

/// What one queued frame is.
#[derive(Clone, Copy)]
enum Op {
    /// A copy in slot `k`: `len` bytes, header first.
    Copy { len: u32 },
    /// Header copy `k`, then `cnt` iovecs from `start` (entry `start` is the header).
    Iov { start: u16, cnt: u16 },
    /// A read into the `cnt` iovecs from `start`.
    Read { start: u16, cnt: u16 },
}

/// A burst's queued writes or reads on one tap queue; see the module comment.
pub(crate) struct Batch {
    fd: RawFd,
    uring: Option<IoUring>,
    /// Why the batch does not use io_uring (for the log, once).
    why_not: Option<String>,
    slots: Box<[[u8; SLOT]]>,
    hdrs: Box<[[u8; NET_HDR_LEN]]>,
    iov: Box<[libc::iovec]>,
    iov_used: usize,
    ops: Box<[Op]>,
    res: Box<[i32]>,
    n: usize,
}

// SAFETY: the raw pointers in `iov` are written by the burst that queues a frame and
// read by the same burst's `submit`; what a previous burst left is never read. The
// io_uring instance is owned, used by one thread at a time. Moving it to a worker is
// harmless.
unsafe impl Send for Batch {}

/// Whether a result is "the kernel would block" (nothing written).
pub(crate) fn would_block(res: i32) -> bool {
    res == -libc::EAGAIN || res == -libc::ENOBUFS
}

impl Batch {
    /// Room for `cap` frames and `iov_cap` iovec entries over the tap descriptor `fd`;
    /// `batched`: use io_uring if it can be set up.
    pub fn new(fd: RawFd, cap: usize, iov_cap: usize, batched: bool) -> Batch {
        let (uring, why_not) = if !batched {
            (None, Some("--tap-syscalls".to_string()))
        } else if let Some(limit) = send_buffer_limit(fd) {
            (None, Some(format!("the tap has a send buffer limit ({limit} bytes)")))
        } else {
            match setup(fd, cap) {
                Ok(u) => (Some(u), None),
                Err(e) => (None, Some(format!("io_uring: {e}"))),
            }
        };
        Batch {
            fd,
            uring,
            why_not,
            slots: vec![[0u8; SLOT]; cap].into_boxed_slice(),
            hdrs: vec![[0u8; NET_HDR_LEN]; cap].into_boxed_slice(),
            iov: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; iov_cap].into_boxed_slice(),
            iov_used: 0,
            ops: vec![Op::Copy { len: 0 }; cap].into_boxed_slice(),
            res: vec![0; cap].into_boxed_slice(),
            n: 0,
        }
    }

    /// `None` when frames go in one system call per burst, else why they do not.
    pub fn per_frame_reason(&self) -> Option<&str> {
        self.why_not.as_deref()
    }

    /// Frames queued.
    pub fn len(&self) -> usize {
        self.n
    }

    /// No room for another frame.
    pub fn is_full(&self) -> bool {
        self.n == self.ops.len()
    }

    /// The next copy slot (for [`Self::queue_copy`]); `None` when the batch is full.
    pub fn slot(&mut self) -> Option<&mut [u8; SLOT]> {
        self.slots.get_mut(self.n)
    }

    /// Queues the `len` bytes written into [`Self::slot`].
    pub fn queue_copy(&mut self, len: usize) {
        debug_assert!(len <= SLOT && !self.is_full());
        self.ops[self.n] = Op::Copy { len: len as u32 };
        self.n += 1;
    }

    /// Free iovec entries after the header's, for [`Self::queue_iov`]; empty when the
    /// batch is full or has no iovec room left.
    pub fn iov_room(&mut self) -> &mut [libc::iovec] {
        if self.is_full() || self.iov_used >= self.iov.len() {
            return &mut [];
        }
        &mut self.iov[self.iov_used + 1..]
    }

    /// Queues `hdr` followed by the first `cnt` entries of [`Self::iov_room`].
    ///
    /// # Safety
    /// Those entries must describe memory readable for their lengths until the next
    /// [`Self::submit`] returns.
    pub unsafe fn queue_iov(&mut self, hdr: [u8; NET_HDR_LEN], cnt: usize) {
        debug_assert!(!self.is_full() && self.iov_used + 1 + cnt <= self.iov.len());
        let k = self.n;
        self.hdrs[k] = hdr;
        let start = self.iov_used;
        self.iov[start] =
            libc::iovec { iov_base: self.hdrs[k].as_mut_ptr() as *mut libc::c_void, iov_len: NET_HDR_LEN };
        self.iov_used += 1 + cnt;
        self.ops[k] = Op::Iov { start: start as u16, cnt: (1 + cnt) as u16 };
        self.n += 1;
    }

    /// Free iovec entries for [`Self::queue_read`]; empty when the batch is full or has
    /// no iovec room left.
    pub fn read_room(&mut self) -> &mut [libc::iovec] {
        if self.is_full() {
            return &mut [];
        }
        &mut self.iov[self.iov_used..]
    }

    /// Queues a read of one frame into the first `cnt` entries of [`Self::read_room`].
    ///
    /// # Safety
    /// Those entries must describe memory writable for their lengths, with no Rust
    /// reference to it, until the next [`Self::submit`] returns.
    pub unsafe fn queue_read(&mut self, cnt: usize) {
        debug_assert!(!self.is_full() && cnt > 0 && self.iov_used + cnt <= self.iov.len());
        let start = self.iov_used;
        self.iov_used += cnt;
        self.ops[self.n] = Op::Read { start: start as u16, cnt: cnt as u16 };
        self.n += 1;
    }

    /// Writes or reads every queued frame and returns the results in queue order: bytes
    /// written or read, or `-errno`. The batch is empty afterwards.
    ///
    /// With io_uring the operations are independent: a write the kernel would block on
    /// (which needs a send buffer limit, refused at setup, or memory pressure) can be
    /// followed by one that went through, and a read that found no frame by one that
    /// found a frame queued in between. Without it, the first would-block stops the
    /// burst and the operations after it report `-EAGAIN` undone.
    pub fn submit(&mut self) -> &[i32] {
        let n = self.n;
        self.n = 0;
        self.iov_used = 0;
        if n == 0 {
            return &self.res[..0];
        }
        if self.uring.is_some() {
            match self.submit_uring(n) {
                // A kernel whose tap does not take non-blocking io_uring operations
                // refuses every one: the same frames again, one system call each, from
                // now on.
                Ok(()) if self.res[..n].iter().all(|&r| r == -libc::EOPNOTSUPP) => {
                    log::warn!(
                        "tap: io_uring operations refused (EOPNOTSUPP); one frame per system call from now on"
                    );
                    self.why_not = Some("the kernel refuses non-blocking io_uring operations".into());
                    self.uring = None;
                    self.submit_each(n);
                }
                Ok(()) => {}
                Err(e) => {
                    // The kernel refused the ring itself. What was not reaped counts as
                    // refused; dropping the instance cancels what it still holds (its
                    // pointers are into `self`, which stays, and guest memory, which the
                    // burst still holds). Per-frame calls from now on.
                    log::warn!("tap: io_uring_enter: {e}; one frame per system call from now on");
                    self.why_not = Some(format!("io_uring_enter: {e}"));
                    self.uring = None;
                }
            }
        } else {
            self.submit_each(n);
        }
        &self.res[..n]
    }

    fn submit_uring(&mut self, n: usize) -> io::Result<()> {
        let uring = self.uring.as_mut().expect("checked by the caller");
        {
            let mut sq = uring.submission();
            for (k, op) in self.ops[..n].iter().enumerate() {
                let e = match *op {
                    Op::Copy { len } => opcode::Write::new(types::Fixed(0), self.slots[k].as_ptr(), len)
                        .rw_flags(libc::RWF_NOWAIT)
                        .build(),
                    Op::Iov { start, cnt } => {
                        opcode::Writev::new(types::Fixed(0), self.iov[start as usize..].as_ptr(), cnt as u32)
                            .rw_flags(libc::RWF_NOWAIT)
                            .build()
                    }
                    Op::Read { start, cnt } => {
                        opcode::Readv::new(types::Fixed(0), self.iov[start as usize..].as_ptr(), cnt as u32)
                            .rw_flags(libc::RWF_NOWAIT)
                            .build()
                    }
                };
                // SAFETY: the entry points at a slot, a header copy and iovecs owned by
                // `self`, or at guest memory the caller keeps readable (`queue_iov`) or
                // writable (`queue_read`), all alive until this function has reaped the
                // entry's completion below.
                // The submission ring has room for `cap` entries and `n <= cap`; it was
                // emptied by the previous submit.
                unsafe { sq.push(&e.user_data(k as u64)) }.expect("room for a whole batch");
            }
        }
        self.res[..n].fill(-libc::ECANCELED);
        let mut reaped = 0;
        while reaped < n {
            // Submits what the submission ring still holds, waits for the rest.
            match uring.submit_and_wait(n - reaped) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
                    ) => {}
                Err(e) => return Err(e),
            }
            for c in uring.completion() {
                if let Some(r) = self.res.get_mut(c.user_data() as usize) {
                    *r = c.result();
                    reaped += 1;
                }
            }
        }
        Ok(())
    }

    fn submit_each(&mut self, n: usize) {
        let mut blocked = false;
        for k in 0..n {
            if blocked {
                self.res[k] = -libc::EAGAIN;
                continue;
            }
            let r = match self.ops[k] {
                // SAFETY: the slot is ours, `len` bytes of it written by the caller.
                Op::Copy { len } => unsafe {
                    libc::write(self.fd, self.slots[k].as_ptr().cast(), len as usize)
                },
                // SAFETY: the iovecs point at our header copy and at memory the caller
                // keeps readable (`queue_iov`); `cnt` entries from `start` were written.
                Op::Iov { start, cnt } => unsafe {
                    libc::writev(self.fd, self.iov[start as usize..].as_ptr(), cnt as libc::c_int)
                },
                // SAFETY: the iovecs point at memory the caller keeps writable and
                // unreferenced (`queue_read`); `cnt` entries from `start` were written.
                Op::Read { start, cnt } => unsafe {
                    libc::readv(self.fd, self.iov[start as usize..].as_ptr(), cnt as libc::c_int)
                },
            };
            self.res[k] = if r < 0 {
                -io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
            } else {
                r as i32
            };
            blocked = would_block(self.res[k]);
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if let Some(u) = &self.uring {
            // The registered tap descriptor is released now, not in the instance's
            // asynchronous teardown (see the module comment). Nothing is in flight.
            if let Err(e) = u.submitter().unregister_files() {
                log::debug!("tap: io_uring unregister: {e}");
            }
        }
    }
}

/// The tap's send buffer limit, if it has one (`TUNSETSNDBUF` by whoever made it).
fn send_buffer_limit(fd: RawFd) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    // SAFETY: TUNGETSNDBUF writes one `int` through the pointer, which points at `v`.
    if unsafe { libc::ioctl(fd, libc::TUNGETSNDBUF, &mut v as *mut libc::c_int) } < 0 {
        return None;
    }
    (v != libc::c_int::MAX).then_some(v)
}

fn setup(fd: RawFd, cap: usize) -> io::Result<IoUring> {
    let entries = (cap as u32).next_power_of_two();
    // Completions are reaped by the submitting thread right away: no interrupt for them.
    let uring = IoUring::builder().setup_coop_taskrun().build(entries).or_else(|_| IoUring::new(entries))?;
    uring.submitter().register_files(&[fd])?;
    Ok(uring)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// A non-blocking `SOCK_SEQPACKET` pair: each write is one message at the other end,
    /// as each write is one frame on a tap. `sndbuf`: the writer's send buffer.
    fn pair(sndbuf: Option<libc::c_int>) -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two descriptors into the array it points at.
        let r = unsafe {
            libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK, 0, fds.as_mut_ptr())
        };
        assert_eq!(r, 0, "socketpair: {}", io::Error::last_os_error());
        // SAFETY: both were just returned by socketpair and are owned by nobody else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        if let Some(v) = sndbuf {
            // SAFETY: SO_SNDBUF reads one int from the pointer, which points at `v`.
            let r = unsafe {
                libc::setsockopt(
                    a.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    &v as *const libc::c_int as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(r, 0);
        }
        (a, b)
    }

    fn recv_all(fd: &OwnedFd) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: `buf` is ours and writable for its length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return out;
            }
            out.push(buf[..n as usize].to_vec());
        }
    }

    fn frame(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i * 7 + j) as u8).collect()
    }

    /// Queues frame `i` of `len` bytes (header included): a copy if it fits a slot,
    /// else the header and the rest as two iovecs over `store`.
    fn queue(b: &mut Batch, i: usize, len: usize, store: &mut Vec<Vec<u8>>) {
        let f = frame(i, len);
        if len <= SLOT {
            b.slot().expect("room")[..len].copy_from_slice(&f);
            b.queue_copy(len);
        } else {
            let mut hdr = [0u8; NET_HDR_LEN];
            hdr.copy_from_slice(&f[..NET_HDR_LEN]);
            store.push(f[NET_HDR_LEN..].to_vec());
            let body = store.last().expect("pushed");
            let (a, rest) = body.split_at(body.len() / 2);
            let room = b.iov_room();
            room[0] = libc::iovec { iov_base: a.as_ptr() as *mut libc::c_void, iov_len: a.len() };
            room[1] = libc::iovec { iov_base: rest.as_ptr() as *mut libc::c_void, iov_len: rest.len() };
            // SAFETY: both entries point into `store`, alive until after `submit`.
            unsafe { b.queue_iov(hdr, 2) };
        }
    }

    fn io_uring_allowed() -> bool {
        std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").map_or(true, |s| s.trim() == "0")
    }

    #[test]
    fn a_burst_of_copies_and_iovecs_arrives_whole_and_in_order_both_ways() {
        for batched in [true, false] {
            let (a, b) = pair(None);
            let mut tx = Batch::new(a.as_raw_fd(), 32, 1024, batched);
            assert_eq!(
                tx.per_frame_reason().is_none(),
                batched && io_uring_allowed(),
                "{:?}",
                tx.per_frame_reason()
            );
            // Within the socket's default send buffer.
            let lens: Vec<usize> = (0..32).map(|i| [60, SLOT, SLOT + 1, 9012][i % 4]).collect();
            let mut store = Vec::new();
            for (i, &len) in lens.iter().enumerate() {
                queue(&mut tx, i, len, &mut store);
            }
            assert!(tx.is_full() && tx.slot().is_none() && tx.iov_room().is_empty());
            let res = tx.submit().to_vec();
            assert_eq!(res, lens.iter().map(|&l| l as i32).collect::<Vec<_>>(), "batched {batched}");
            assert_eq!(tx.len(), 0);
            let got = recv_all(&b);
            assert_eq!(got.len(), 32);
            for (i, g) in got.iter().enumerate() {
                assert_eq!(g, &frame(i, lens[i]), "frame {i}, batched {batched}");
            }
            // Empty submit: nothing written.
            assert!(tx.submit().is_empty());
            assert!(recv_all(&b).is_empty());
        }
    }

    #[test]
    fn writes_the_peer_cannot_take_report_would_block_as_a_suffix() {
        for batched in [true, false] {
            let (a, b) = pair(Some(4096));
            let mut tx = Batch::new(a.as_raw_fd(), 64, 1024, batched);
            let mut store = Vec::new();
            for i in 0..64 {
                queue(&mut tx, i, 1000, &mut store);
            }
            let res = tx.submit().to_vec();
            let ok = res.iter().take_while(|&&r| r == 1000).count();
            assert!(ok > 0 && ok < 64, "some went, some did not: {res:?}");
            assert!(res[ok..].iter().all(|&r| would_block(r)), "a suffix would block: {res:?}");
            let got = recv_all(&b);
            assert_eq!(got.len(), ok, "exactly the written frames arrived");
            assert!(got.iter().enumerate().all(|(i, g)| g == &frame(i, 1000)));
        }
    }

    #[test]
    fn a_burst_of_reads_takes_what_is_queued_in_order_and_finds_the_rest_empty() {
        for batched in [true, false] {
            let (a, b) = pair(None);
            let mut rx = Batch::new(b.as_raw_fd(), 8, 16, batched);
            let lens = [60, 1514, 9000, 100, 61];
            for (i, &len) in lens.iter().enumerate() {
                let f = frame(i, len);
                // SAFETY: `f` is ours and readable for its length.
                let r = unsafe { libc::send(a.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
                assert_eq!(r, len as isize);
            }
            // Eight reads, each into two buffers (the second only used by larger frames).
            let mut bufs = vec![[0u8; 2 * 4096 + 1000]; 8];
            for buf in bufs.iter_mut() {
                let (x, y) = buf.split_at_mut(4096);
                let room = rx.read_room();
                room[0] = libc::iovec { iov_base: x.as_mut_ptr().cast(), iov_len: x.len() };
                room[1] = libc::iovec { iov_base: y.as_mut_ptr().cast(), iov_len: y.len() };
                // SAFETY: both entries point into `bufs`, not borrowed until after `submit`.
                unsafe { rx.queue_read(2) };
            }
            assert!(rx.is_full() && rx.read_room().is_empty());
            let res = rx.submit().to_vec();
            let want: Vec<i32> = lens.iter().map(|&l| l as i32).chain([-libc::EAGAIN; 3]).collect();
            assert_eq!(res, want, "batched {batched}");
            for (i, &len) in lens.iter().enumerate() {
                assert_eq!(&bufs[i][..len], &frame(i, len)[..], "frame {i}, batched {batched}");
            }
        }
    }

    #[test]
    fn a_refused_write_is_its_errno_and_the_others_go() {
        // A write to a peer that closed: EPIPE for every frame; the batch reports it per
        // frame and stays usable.
        let (a, b) = pair(None);
        let mut tx = Batch::new(a.as_raw_fd(), 8, 16, true);
        drop(b);
        let mut store = Vec::new();
        for i in 0..3 {
            queue(&mut tx, i, 100, &mut store);
        }
        assert_eq!(tx.submit(), &[-libc::EPIPE; 3]);
        queue(&mut tx, 0, 100, &mut store);
        assert_eq!(tx.submit(), &[-libc::EPIPE]);
    }
}
