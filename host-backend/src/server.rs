//! The control plane of one device: its vhost-user socket and the thread that serves it.
//!
//! Owns: listening (on the socket `socket.rs` creates) or connecting (`--client`), accepting one
//! front-end at a time, running the `vhost` crate's request loop against the device's
//! [`Handler`] (after a peek at each header routes the IOTLB requests that crate does
//! not serve to `iotlb_channel.rs`), and resetting the device when the front-end goes
//! away.
//! Must not: touch rings or guest memory (the device and workers do).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use log::{debug, info, warn};
use std::io::ErrorKind;

use vhost::vhost_user::{BackendReqHandler, Error as VuError};

use crate::device::{Device, Handler};
use crate::error::Result;
use crate::iotlb_channel;
use crate::socket;

/// Creates the listening socket for `path` with `access` (see `socket.rs`: a live
/// socket is not taken over, a stale one is, the mode and group are set without the
/// umask).
pub fn listen(path: &Path, access: socket::Access) -> Result<socket::Bound> {
    socket::bind(path, access)
}

/// Serves one device until `stop` is set.
pub struct Server {
    device: Arc<Device>,
    stop: Arc<AtomicBool>,
    /// A clone of the current connection, so `shutdown` can unblock the request loop.
    conn: Arc<Mutex<Option<UnixStream>>>,
}

/// Handle to stop a [`Server`] thread.
#[derive(Clone)]
pub struct ServerHandle {
    stop: Arc<AtomicBool>,
    conn: Arc<Mutex<Option<UnixStream>>>,
}

impl ServerHandle {
    /// Stops accepting and closes the current connection.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Server {
    /// A server for `device`.
    pub fn new(device: Arc<Device>) -> (Server, ServerHandle) {
        let stop = Arc::new(AtomicBool::new(false));
        let conn = Arc::new(Mutex::new(None));
        (Server { device, stop: stop.clone(), conn: conn.clone() }, ServerHandle { stop, conn })
    }

    /// Accepts front-ends on `listener` one after another. (The `vhost` crate's
    /// `BackendListener` serves a single connection, so we accept ourselves and hand
    /// each stream to a `BackendReqHandler`.)
    pub fn run_listening(self, bound: socket::Bound) {
        let handler = Arc::new(Handler(self.device.clone()));
        if let Err(e) = bound.listener.set_nonblocking(true) {
            warn!("{}: {e}", self.device.params.socket.display());
        }
        while !self.stop.load(Ordering::Relaxed) {
            match bound.listener.accept() {
                Ok((stream, _)) => self.serve(BackendReqHandler::from_stream(stream, handler.clone())),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::ConnectionAborted) => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("{}: accept: {e}", self.device.params.socket.display());
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        // `bound` goes here: the socket file is removed if it is still ours.
    }

    /// Connects to a listening front-end at `path`, and again after each disconnect.
    pub fn run_client(self, path: PathBuf) {
        let handler = Arc::new(Handler(self.device.clone()));
        let mut waiting_logged = false;
        while !self.stop.load(Ordering::Relaxed) {
            match UnixStream::connect(&path) {
                Ok(stream) => {
                    waiting_logged = false;
                    self.serve(BackendReqHandler::from_stream(stream, handler.clone()));
                }
                Err(e) => {
                    if !waiting_logged {
                        info!("{}: waiting for the front-end to listen ({e})", path.display());
                        waiting_logged = true;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn serve(&self, mut conn: BackendReqHandler<Handler>) {
        let sock = match conn.try_clone_connection() {
            Ok(c) => c,
            Err(e) => {
                warn!("{}: cannot clone the connection: {e}", self.device.params.socket.display());
                return;
            }
        };
        // Accepted sockets inherit the listener's non-blocking mode; the request loop
        // wants blocking reads.
        let _ = sock.set_nonblocking(false);
        if let Ok(c) = sock.try_clone() {
            *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = Some(c);
        }
        self.device.connect();
        // Why the connection ends, for the log (`Err`: a fault, logged as a warning): a
        // front-end that goes away and a socket that fails look the same to the guest;
        // the operator needs to tell them apart.
        let why = loop {
            if self.stop.load(Ordering::Relaxed) {
                break Ok("the backend is stopping");
            }
            match iotlb_channel::peek_header(&sock) {
                Ok(Some(h)) if h.is_iotlb_protocol() => {
                    if let Err(e) = self.device.handle_iotlb_request(&sock, &h) {
                        break Err(format!("vhost-user error: {e}"));
                    }
                    continue;
                }
                Ok(Some(_)) => {}
                Ok(None) => break Ok("the front-end closed the connection"),
                Err(e) => break Err(format!("socket error: {e}")),
            }
            match conn.handle_request() {
                Ok(()) => {}
                Err(VuError::Disconnected) => break Ok("the front-end closed the connection"),
                Err(VuError::PartialMessage) => break Err("a message cut short".to_string()),
                Err(VuError::SocketBroken(e)) => break Err(format!("socket error: {e}")),
                Err(VuError::InactiveFeature(f)) => {
                    // QEMU (7.2) sends SET_VRING_ENABLE at device realize, before any
                    // SET_FEATURES; the `vhost` crate refuses it because
                    // VHOST_USER_F_PROTOCOL_FEATURES is not acknowledged yet, after the
                    // message was read in full. QEMU enables the rings again once it
                    // has set features (vhost_dev_start), so the early request can be
                    // dropped without losing state; the connection stays up.
                    debug!(
                        "{}: request before feature {:#x} was acknowledged; ignored",
                        self.device.params.socket.display(),
                        f.bits()
                    );
                }
                Err(e) => {
                    // A protocol error from the front-end: drop this connection, keep serving.
                    break Err(format!("vhost-user error: {e}"));
                }
            }
        };
        match why {
            Ok(why) => info!("{}: connection ends: {why}", self.device.params.socket.display()),
            Err(why) => warn!("{}: {why}; closing the connection", self.device.params.socket.display()),
        }
        *self.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.device.disconnect();
    }
}
