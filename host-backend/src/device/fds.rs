//! File descriptors a front-end hands over (kick, call and error eventfds, the backend
//! channel): what they must be before a worker or the control plane uses them.
//!
//! Owns: the type checks and the switch to non-blocking mode. Must not: keep the fds
//! (the handler stores what this returns) or read or write them.
//!
//! Why: a worker reads kick eventfds after epoll reports them and writes call and error
//! eventfds after a burst. A pipe in place of an eventfd fills up and a blocking write on
//! it never returns; a blocking eventfd whose counter the front-end preloaded near its
//! maximum blocks the write too; an eventfd shared with another reader can be drained
//! between epoll's report and our read. Any of these would freeze the worker and every
//! device it serves. So every eventfd must be one (the kernel names it
//! `anon_inode:[eventfd]` under `/proc/self/fd`), and it is switched to `O_NONBLOCK`:
//! a write that would block is dropped (the counter is non-zero, so the peer is
//! signalled anyway) and a read that would block finds nothing. The flag is the open
//! file's, shared with the front-end; QEMU, DPDK and our driver make their eventfds
//! non-blocking themselves.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};

use vmm_sys_util::eventfd::EventFd;

/// Makes `fd` non-blocking (`O_NONBLOCK` added to its file status flags).
fn set_nonblocking(fd: i32) -> Result<(), String> {
    // SAFETY: fcntl on an fd we own; no memory is handed over.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(format!("cannot make it non-blocking: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// What `/proc/self/fd/N` names for `fd` (`anon_inode:[eventfd]`, `pipe:[...]`, a path).
fn fd_kind(fd: i32) -> String {
    match std::fs::read_link(format!("/proc/self/fd/{fd}")) {
        Ok(p) => p.to_string_lossy().into_owned(),
        Err(e) => format!("unknown ({e})"),
    }
}

/// `file` as a non-blocking eventfd, or why it cannot be one.
pub(crate) fn eventfd(file: File) -> Result<EventFd, String> {
    let fd = file.as_raw_fd();
    let kind = fd_kind(fd);
    if kind != "anon_inode:[eventfd]" {
        return Err(format!("not an eventfd ({kind})"));
    }
    set_nonblocking(fd)?;
    // SAFETY: `into_raw_fd` hands sole ownership of a valid eventfd to the EventFd.
    Ok(unsafe { EventFd::from_raw_fd(file.into_raw_fd()) })
}

/// Checks that `fd` is a socket and makes it non-blocking (the backend channel).
pub(crate) fn socket(fd: i32) -> Result<(), String> {
    // SAFETY: fstat writes a `stat` into the local; the fd is open (owned by the caller).
    let mode = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Err(format!("fstat: {}", std::io::Error::last_os_error()));
        }
        st.st_mode
    };
    if mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(format!("not a socket ({})", fd_kind(fd)));
    }
    set_nonblocking(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two fds into the array; the result is checked.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: fresh descriptors nobody else owns.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    #[test]
    fn eventfds_only_and_made_non_blocking() {
        let (r, w) = pipe();
        assert!(eventfd(w).unwrap_err().contains("not an eventfd (pipe:"));
        let e = EventFd::new(0).unwrap();
        // SAFETY: duplicates an open fd into a fresh owned one.
        let dup = unsafe { File::from_raw_fd(libc::dup(e.as_raw_fd())) };
        let got = eventfd(dup).unwrap();
        // Preloaded to the maximum: a further write would block a blocking eventfd.
        e.write(u64::MAX - 1).unwrap();
        assert_eq!(got.write(1).unwrap_err().kind(), std::io::ErrorKind::WouldBlock);
        assert!(socket(r.as_raw_fd()).unwrap_err().contains("not a socket"));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        socket(a.as_raw_fd()).unwrap();
    }
}
