//! The wire side of the vhost-user IOTLB protocol: the two front-end requests the `vhost`
//! crate's request loop does not serve (`VHOST_USER_IOTLB_MSG` and
//! `VHOST_USER_SET_BACKEND_REQ_FD`), and miss requests on the backend channel.
//!
//! Owns: the 12-byte vhost-user header of those messages, the 32-byte
//! `struct vhost_iotlb_msg` body, the acknowledgement (`REPLY_ACK`) and the backend
//! channel socket. Must not: decide what a translation means or when workers see it
//! (`device.rs` and `iotlb.rs` do).
//!
//! Why not the `vhost` crate for these: its 0.18 `BackendReqHandler` answers
//! `IOTLB_MSG` with an error, and it keeps the backend channel's socket inside a
//! `Backend` that can only send shared-object and shared-memory requests, not IOTLB
//! misses; its message framing (`Endpoint`, `VhostUserMsgHeader`) is private. So the
//! server peeks at each header ([`peek_header`], `MSG_PEEK` leaves the message and any
//! file descriptors in the socket) and hands every other request to the crate.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::iotlb::{Mapping, ACCESS_READ, ACCESS_WRITE, MSG_MISS};

/// `VHOST_USER_SET_BACKEND_REQ_FD` (front-end request 21).
pub const REQ_SET_BACKEND_REQ_FD: u32 = 21;
/// `VHOST_USER_IOTLB_MSG` (front-end request 22).
pub const REQ_IOTLB_MSG: u32 = 22;
/// `VHOST_USER_BACKEND_IOTLB_MSG` (backend request 1).
pub const BACKEND_REQ_IOTLB_MSG: u32 = 1;

/// Header length: request, flags, size (u32 each, little-endian on the only hosts
/// vhost-user runs on: the protocol uses host byte order).
pub const HDR_LEN: usize = 12;
/// `sizeof(struct vhost_iotlb_msg)`: iova, size, uaddr (u64), perm, type (u8), padding.
pub const IOTLB_MSG_LEN: usize = 32;

const FLAG_VERSION: u32 = 0x1;
const FLAG_REPLY: u32 = 0x4;
const FLAG_NEED_REPLY: u32 = 0x8;
const VERSION_MASK: u32 = 0x3;

/// A vhost-user message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Request code.
    pub request: u32,
    /// Flags: version (bits 0-1), reply (bit 2), need reply (bit 3).
    pub flags: u32,
    /// Body length in bytes.
    pub size: u32,
}

impl Header {
    fn parse(b: &[u8; HDR_LEN]) -> Header {
        let w = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Header { request: w(0), flags: w(4), size: w(8) }
    }

    fn bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..4].copy_from_slice(&self.request.to_le_bytes());
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..12].copy_from_slice(&self.size.to_le_bytes());
        b
    }

    /// Whether the front-end asked for an acknowledgement.
    pub fn need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }

    /// Whether this is one of the requests this module serves.
    pub fn is_iotlb_protocol(&self) -> bool {
        self.request == REQ_IOTLB_MSG || self.request == REQ_SET_BACKEND_REQ_FD
    }
}

/// A protocol violation in one of our messages; the connection is closed.
#[derive(Debug)]
pub enum ChannelError {
    /// The socket failed.
    Io(io::Error),
    /// A header or body that breaks the protocol.
    Malformed(String),
}

impl std::fmt::Display for ChannelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChannelError::Io(e) => write!(f, "socket: {e}"),
            ChannelError::Malformed(m) => f.write_str(m),
        }
    }
}

impl From<io::Error> for ChannelError {
    fn from(e: io::Error) -> Self {
        ChannelError::Io(e)
    }
}

/// Waits for the next message and returns its header without consuming anything.
/// `None`: the front-end closed the connection.
pub fn peek_header(sock: &UnixStream) -> io::Result<Option<Header>> {
    let mut b = [0u8; HDR_LEN];
    // A peer that dies after part of a header leaves those bytes peekable forever.
    let mut partial_ms = 0;
    loop {
        // SAFETY: `recv` writes at most `HDR_LEN` bytes into `b`, which is ours.
        let n = unsafe {
            libc::recv(
                sock.as_raw_fd(),
                b.as_mut_ptr() as *mut libc::c_void,
                HDR_LEN,
                libc::MSG_PEEK | libc::MSG_WAITALL,
            )
        };
        match n {
            0 => return Ok(None),
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            n if (n as usize) < HDR_LEN => {
                // The rest of the header is on its way (a peek returns what is there).
                partial_ms += 1;
                if partial_ms > 1000 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "partial message header"));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            _ => return Ok(Some(Header::parse(&b))),
        }
    }
}

/// What one of our requests carried.
#[derive(Debug)]
pub enum Request {
    /// `IOTLB_MSG`: an update, invalidation or other `type`.
    Iotlb(IotlbMsg),
    /// `SET_BACKEND_REQ_FD`: the backend channel.
    BackendChannel(UnixStream),
}

/// `struct vhost_iotlb_msg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IotlbMsg {
    /// First I/O virtual address.
    pub iova: u64,
    /// Length.
    pub size: u64,
    /// Front-end virtual address (updates).
    pub uaddr: u64,
    /// Access permission bits.
    pub perm: u8,
    /// Message type (`MSG_*` in `iotlb.rs`).
    pub kind: u8,
}

impl IotlbMsg {
    /// Parses a 32-byte body.
    pub fn parse(b: &[u8; IOTLB_MSG_LEN]) -> IotlbMsg {
        let q = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        IotlbMsg { iova: q(0), size: q(8), uaddr: q(16), perm: b[24], kind: b[25] }
    }

    /// The 32-byte body.
    pub fn bytes(&self) -> [u8; IOTLB_MSG_LEN] {
        let mut b = [0u8; IOTLB_MSG_LEN];
        b[0..8].copy_from_slice(&self.iova.to_le_bytes());
        b[8..16].copy_from_slice(&self.size.to_le_bytes());
        b[16..24].copy_from_slice(&self.uaddr.to_le_bytes());
        b[24] = self.perm;
        b[25] = self.kind;
        b
    }

    /// The mapping an update describes.
    pub fn mapping(&self) -> Mapping {
        Mapping { iova: self.iova, size: self.size, uaddr: self.uaddr, perm: self.perm }
    }
}

/// Reads the whole request `hdr` announced (it must be one of ours).
pub fn read_request(sock: &UnixStream, hdr: &Header) -> Result<Request, ChannelError> {
    if hdr.flags & VERSION_MASK != FLAG_VERSION {
        return Err(ChannelError::Malformed(format!("request {} with flags {:#x}", hdr.request, hdr.flags)));
    }
    match hdr.request {
        REQ_IOTLB_MSG => {
            if hdr.size as usize != IOTLB_MSG_LEN {
                return Err(ChannelError::Malformed(format!(
                    "IOTLB_MSG of {} bytes (expected {IOTLB_MSG_LEN})",
                    hdr.size
                )));
            }
            let mut b = [0u8; HDR_LEN + IOTLB_MSG_LEN];
            (&*sock).read_exact(&mut b)?;
            let body: &[u8; IOTLB_MSG_LEN] = b[HDR_LEN..].try_into().expect("sized above");
            Ok(Request::Iotlb(IotlbMsg::parse(body)))
        }
        REQ_SET_BACKEND_REQ_FD => {
            let mut b = [0u8; HDR_LEN];
            let (n, file) = sock.recv_with_fd(&mut b).map_err(|e| ChannelError::Io(e.into()))?;
            if n < HDR_LEN {
                (&*sock).read_exact(&mut b[n..])?;
            }
            // A body here is not in the protocol; read it so the stream stays in step.
            let mut rest = vec![0u8; hdr.size.min(4096) as usize];
            (&*sock).read_exact(&mut rest)?;
            let file: File = file.ok_or_else(|| {
                ChannelError::Malformed("SET_BACKEND_REQ_FD without a file descriptor".into())
            })?;
            if hdr.size != 0 {
                return Err(ChannelError::Malformed(format!(
                    "SET_BACKEND_REQ_FD with a {}-byte body",
                    hdr.size
                )));
            }
            // SAFETY: `into_raw_fd` hands over sole ownership of a valid descriptor.
            Ok(Request::BackendChannel(unsafe { UnixStream::from_raw_fd(file.into_raw_fd()) }))
        }
        other => Err(ChannelError::Malformed(format!("request {other} is not an IOTLB request"))),
    }
}

/// Acknowledges `hdr` (`REPLY_ACK`): `ok` becomes 0, a failure 1.
pub fn reply(sock: &UnixStream, hdr: &Header, ok: bool) -> io::Result<()> {
    let h = Header { request: hdr.request, flags: FLAG_VERSION | FLAG_REPLY, size: 8 };
    let mut b = [0u8; HDR_LEN + 8];
    b[..HDR_LEN].copy_from_slice(&h.bytes());
    b[HDR_LEN..].copy_from_slice(&u64::from(!ok).to_le_bytes());
    (&*sock).write_all(&b)
}

/// The backend channel: where misses go. Sends never block (a worker calls them).
#[derive(Debug)]
pub struct BackendChannel {
    sock: UnixStream,
}

impl BackendChannel {
    /// Takes over the socket the front-end sent with `SET_BACKEND_REQ_FD`.
    pub fn new(sock: UnixStream) -> io::Result<BackendChannel> {
        sock.set_nonblocking(true)?;
        Ok(BackendChannel { sock })
    }

    /// Asks the front-end for the translation of `iova` (a device read, or a write).
    /// No reply is requested: the answer is an `IOTLB_MSG` update on the main socket.
    /// `WouldBlock` when the front-end is not reading (the caller retries later).
    pub fn send_miss(&self, iova: u64, write: bool) -> io::Result<()> {
        let h = Header { request: BACKEND_REQ_IOTLB_MSG, flags: FLAG_VERSION, size: IOTLB_MSG_LEN as u32 };
        let body = IotlbMsg {
            iova,
            size: 0,
            uaddr: 0,
            perm: if write { ACCESS_WRITE } else { ACCESS_READ },
            kind: MSG_MISS,
        };
        let mut b = [0u8; HDR_LEN + IOTLB_MSG_LEN];
        b[..HDR_LEN].copy_from_slice(&h.bytes());
        b[HDR_LEN..].copy_from_slice(&body.bytes());
        let n = (&self.sock).write(&b)?;
        if n != b.len() {
            // A partial message would desynchronise the channel for good.
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "partial IOTLB miss written"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(request: u32, flags: u32, size: u32) -> Vec<u8> {
        Header { request, flags, size }.bytes().to_vec()
    }

    #[test]
    fn peeks_then_reads_an_iotlb_update_and_acks_it() {
        let (a, b) = UnixStream::pair().unwrap();
        let msg = IotlbMsg { iova: 0x1000, size: 0x2000, uaddr: 0x7f00_0000, perm: 3, kind: 2 };
        let mut wire = header(REQ_IOTLB_MSG, FLAG_VERSION | FLAG_NEED_REPLY, 32);
        wire.extend_from_slice(&msg.bytes());
        (&a).write_all(&wire).unwrap();
        let h = peek_header(&b).unwrap().unwrap();
        assert!(h.is_iotlb_protocol() && h.need_reply());
        // Peeking twice sees the same header: nothing was consumed.
        assert_eq!(peek_header(&b).unwrap().unwrap(), h);
        match read_request(&b, &h).unwrap() {
            Request::Iotlb(m) => assert_eq!(m, msg),
            other => panic!("{other:?}"),
        }
        reply(&b, &h, true).unwrap();
        let mut ack = [0u8; 20];
        (&a).read_exact(&mut ack).unwrap();
        assert_eq!(&ack[..12], &header(REQ_IOTLB_MSG, FLAG_VERSION | FLAG_REPLY, 8)[..]);
        assert_eq!(u64::from_le_bytes(ack[12..].try_into().unwrap()), 0);
        drop(a);
        assert!(peek_header(&b).unwrap().is_none(), "EOF");
    }

    #[test]
    fn backend_channel_fd_arrives_and_carries_misses() {
        let (a, b) = UnixStream::pair().unwrap();
        let (chan_front, chan_back) = UnixStream::pair().unwrap();
        a.send_with_fd(&header(REQ_SET_BACKEND_REQ_FD, FLAG_VERSION, 0)[..], chan_back.as_raw_fd()).unwrap();
        drop(chan_back);
        let h = peek_header(&b).unwrap().unwrap();
        let Request::BackendChannel(s) = read_request(&b, &h).unwrap() else { panic!("not the channel") };
        let ch = BackendChannel::new(s).unwrap();
        ch.send_miss(0xdead_b000, true).unwrap();
        let mut m = [0u8; 44];
        (&chan_front).read_exact(&mut m).unwrap();
        assert_eq!(&m[..12], &header(BACKEND_REQ_IOTLB_MSG, FLAG_VERSION, 32)[..]);
        let body = IotlbMsg::parse(m[12..].try_into().unwrap());
        assert_eq!((body.iova, body.perm, body.kind), (0xdead_b000, ACCESS_WRITE, MSG_MISS));
    }

    #[test]
    fn a_header_cut_short_by_a_dead_peer_is_an_error() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&header(REQ_IOTLB_MSG, FLAG_VERSION, 32)[..5]).unwrap();
        drop(a);
        let e = peek_header(&b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn malformed_requests_are_errors() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&header(REQ_IOTLB_MSG, FLAG_VERSION, 16)).unwrap();
        let h = peek_header(&b).unwrap().unwrap();
        assert!(matches!(read_request(&b, &h), Err(ChannelError::Malformed(_))));
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&header(REQ_SET_BACKEND_REQ_FD, FLAG_VERSION, 0)).unwrap();
        let h = peek_header(&b).unwrap().unwrap();
        assert!(matches!(read_request(&b, &h), Err(ChannelError::Malformed(_))), "no fd");
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&header(REQ_IOTLB_MSG, 0x2, 32)).unwrap();
        let h = peek_header(&b).unwrap().unwrap();
        assert!(matches!(read_request(&b, &h), Err(ChannelError::Malformed(_))), "bad version");
    }
}
