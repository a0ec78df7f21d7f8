//! The listening socket's file: whether an existing one may be replaced, creating it with
//! the requested mode and group, and removing it at exit.
//!
//! Owns: the socket path on the filesystem from start to exit. Must not: accept or serve
//! connections (`server.rs` does) or change the process-wide umask (other threads, and a
//! program that embeds this library, create files meanwhile).
//!
//! * An existing path is replaced only if it is a stale socket: a socket nobody listens
//!   on (`connect` is refused). A live one (another running instance, or QEMU in server
//!   mode) is an error, as is anything that is not a socket (it is never removed).
//! * The socket is bound inside a private directory (mode 0700) made next to the path,
//!   given its mode (`--socket-mode`, default 0600) and group (`--socket-group`) there,
//!   and then renamed into place with `RENAME_NOREPLACE`: it never exists at the path
//!   with other permissions, whatever the umask, and an instance that took the path
//!   meanwhile is not replaced. Only if that private path would be too long for a socket
//!   address is it bound in place and then changed (the permissions the umask gives
//!   apply for that moment).
//! * At exit the path is removed only if it is still our socket (same device and inode).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Longest socket path (`sun_path` is 108 bytes with its terminating NUL).
const MAX_PATH: usize = 107;

/// Who may connect to a listening socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// Permission bits (at most 0o777).
    pub mode: u32,
    /// Group to give the socket, if not the process's.
    pub group: Option<u32>,
}

impl Default for Access {
    fn default() -> Self {
        Access { mode: 0o600, group: None }
    }
}

/// A bound socket at its path; removes the path on drop if it is still this socket.
#[derive(Debug)]
pub struct Bound {
    /// The listening socket.
    pub listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file.
    id: (u64, u64),
}

impl Drop for Bound {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

fn err(path: &Path, kind: std::io::ErrorKind, msg: String) -> Error {
    Error::Socket { path: path.into(), source: std::io::Error::new(kind, msg) }
}

fn io_err(path: &Path, what: &str, e: std::io::Error) -> Error {
    err(path, e.kind(), format!("{what}: {e}"))
}

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Config(format!("socket path {} contains a NUL byte", p.display())))
}

/// Checks what is at `path` now: nothing, or a stale socket (removed); anything else is
/// an error that names it.
fn clear_stale(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path, "cannot inspect the existing path", e)),
    };
    if !meta.file_type().is_socket() {
        return Err(err(
            path,
            std::io::ErrorKind::AlreadyExists,
            "exists and is not a socket (not removed)".into(),
        ));
    }
    match probe(path) {
        Ok(()) => Err(err(
            path,
            std::io::ErrorKind::AddrInUse,
            "in use: another running instance is listening on it (not taken over)".into(),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            // Stale: left behind by an instance that is gone.
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_err(path, "cannot remove the stale socket", e)),
            }
        }
        Err(e) => Err(io_err(path, "an existing socket whose state cannot be checked (not taken over)", e)),
    }
}

/// Connects to the socket at `path` without blocking (a listener whose backlog is full
/// answers `EAGAIN`, which means it is alive too) and closes the connection at once.
fn probe(path: &Path) -> std::io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the result is checked and owned below.
    let fd = unsafe {
        libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_un is valid; the path fits (checked by the caller).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, b) in addr.sun_path.iter_mut().zip(path.as_os_str().as_bytes()) {
        *d = *b as libc::c_char;
    }
    // SAFETY: `addr` is a valid sockaddr_un of the given size; `sock` is open.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            &addr as *const libc::sockaddr_un as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => Ok(()),
        _ => Err(e),
    }
}

/// Gives the socket file at `p` its mode and group.
fn apply(p: &Path, access: Access, shown: &Path) -> Result<()> {
    let c = cstr(p)?;
    // SAFETY: chmod with a valid NUL-terminated path; no memory is handed over.
    if unsafe { libc::chmod(c.as_ptr(), access.mode as libc::mode_t) } != 0 {
        return Err(io_err(shown, "chmod", std::io::Error::last_os_error()));
    }
    if let Some(gid) = access.group {
        // SAFETY: as above; uid -1 leaves the owner unchanged.
        if unsafe { libc::chown(c.as_ptr(), u32::MAX, gid) } != 0 {
            return Err(io_err(shown, &format!("chown to group {gid}"), std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Binds a listening socket at `path` with `access` (see the module comment).
pub fn bind(path: &Path, access: Access) -> Result<Bound> {
    if access.mode > 0o777 {
        return Err(Error::Config(format!("socket mode {:#o} is not a permission mode", access.mode)));
    }
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.to_path_buf(),
        None => PathBuf::from("."),
    };
    if !dir.is_dir() {
        return Err(err(path, std::io::ErrorKind::NotFound, "directory does not exist".into()));
    }
    if path.as_os_str().len() > MAX_PATH {
        return Err(Error::Config(format!("socket path {} is longer than {MAX_PATH} bytes", path.display())));
    }
    clear_stale(path)?;

    // The private directory: `dir/.vnet-XXXXXX/s`.
    let template = dir.join(".vnet-XXXXXX");
    let private_len = template.as_os_str().len() + 2;
    let listener = if private_len <= MAX_PATH {
        let mut tpl = cstr(&template)?.into_bytes_with_nul();
        // SAFETY: `tpl` is a writable NUL-terminated template ending in XXXXXX.
        let p = unsafe { libc::mkdtemp(tpl.as_mut_ptr() as *mut libc::c_char) };
        if p.is_null() {
            return Err(io_err(
                path,
                "cannot create a private directory next to it",
                std::io::Error::last_os_error(),
            ));
        }
        tpl.pop();
        let private = PathBuf::from(std::ffi::OsStr::from_bytes(&tpl));
        let tmp = private.join("s");
        let res = (|| {
            let l = UnixListener::bind(&tmp).map_err(|e| io_err(path, "bind", e))?;
            apply(&tmp, access, path)?;
            let (from, to) = (cstr(&tmp)?, cstr(path)?);
            // SAFETY: renameat2 with valid NUL-terminated paths relative to the cwd.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_renameat2,
                    libc::AT_FDCWD,
                    from.as_ptr(),
                    libc::AT_FDCWD,
                    to.as_ptr(),
                    libc::RENAME_NOREPLACE,
                )
            };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
                    err(
                        path,
                        e.kind(),
                        "in use: another instance created it meanwhile (not taken over)".into(),
                    )
                } else {
                    io_err(path, "rename into place", e)
                });
            }
            Ok(l)
        })();
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_dir(&private);
        res?
    } else {
        let l = UnixListener::bind(path).map_err(|e| io_err(path, "bind", e))?;
        if let Err(e) = apply(path, access, path) {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        l
    };
    let m = std::fs::symlink_metadata(path).map_err(|e| io_err(path, "stat after bind", e))?;
    Ok(Bound { listener, path: path.into(), id: (m.dev(), m.ino()) })
}

/// Parses `--socket-mode`: octal permission bits such as `0660` or `660`.
pub fn parse_mode(s: &str) -> Result<u32> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8).ok().filter(|m| *m <= 0o777).ok_or_else(|| {
        Error::Config(format!("socket mode '{s}': expected octal permission bits such as 0660"))
    })
}

/// Parses `--socket-group`: a group name or a numeric gid.
pub fn parse_group(s: &str) -> Result<u32> {
    if let Ok(gid) = s.parse::<u32>() {
        return Ok(gid);
    }
    let name = CString::new(s).map_err(|_| Error::Config(format!("socket group '{s}': bad name")))?;
    // SAFETY: a plain C struct of integers and pointers, filled by getgrnam_r below.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16384];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: all pointers are to live locals of the sizes given.
    let rc = unsafe { libc::getgrnam_r(name.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return Err(Error::Config(format!("socket group '{s}': no such group")));
    }
    Ok(grp.gr_gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir() -> PathBuf {
        let mut tpl = b"/tmp/vnet-sock-XXXXXX\0".to_vec();
        // SAFETY: a writable NUL-terminated template.
        assert!(!unsafe { libc::mkdtemp(tpl.as_mut_ptr() as *mut libc::c_char) }.is_null());
        tpl.pop();
        PathBuf::from(std::ffi::OsStr::from_bytes(&tpl))
    }

    #[test]
    fn live_taken_stale_replaced_files_kept_mode_set() {
        let dir = tmpdir();
        let p = dir.join("a.sock");
        let a = bind(&p, Access::default()).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.mode() & 0o777, 0o600);
        let e = bind(&p, Access::default()).unwrap_err().to_string();
        assert!(e.contains("in use"), "{e}");
        // Stale: the file stays when a listener goes without our Drop.
        let stale = dir.join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        let b = bind(&stale, Access { mode: 0o660, group: None }).unwrap();
        assert_eq!(std::fs::metadata(&stale).unwrap().mode() & 0o777, 0o660);
        let file = dir.join("file");
        std::fs::write(&file, b"keep").unwrap();
        assert!(bind(&file, Access::default()).unwrap_err().to_string().contains("not a socket"));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        // Nothing left behind but what we made; drop removes our sockets.
        drop(a);
        drop(b);
        assert!(!p.exists() && !stale.exists());
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("file")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn parses_modes_and_groups() {
        assert_eq!(parse_mode("0660").unwrap(), 0o660);
        assert_eq!(parse_mode("600").unwrap(), 0o600);
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("1777").is_err());
        assert_eq!(parse_group("0").unwrap(), 0);
        assert_eq!(parse_group("root").unwrap(), 0);
        assert!(parse_group("no-such-group-vnet").is_err());
    }
}
