//! The virtio-user transport: the driver is the vhost-user front-end of a back-end's
//! unix socket (as DPDK's virtio-user is), for containers, tests and benchmarks.
//!
//! Owns: the connection (the `vhost` crate's `Frontend`), sharing the DMA arena with
//! `SET_MEM_TABLE` (guest-physical address = virtual address, DPDK's convention), the
//! kick and call eventfds, and the vhost-user message sequence for init and reset.
//! Must not: touch rings (the data path polls them directly and kicks through a
//! `Notifier`).
//!
//! Every request is bounded in time ([`super::deadline`]): a back-end that stops
//! answering makes the request fail with [`Error::VhostUserTimeout`] (and the connection
//! is closed), so `Port::open`, `Port::close` and every other call that talks to the
//! back-end return after at most that bound per request, never hang.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures, VHOST_USER_MAX_VRINGS};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::deadline::Deadline;
use super::{NetConfig, Notifier, Probe, Transport};
use crate::dma::DmaArena;
use crate::error::{Error, Result};
use crate::layout::{features as f, net_config};
use crate::ring::RingAddrs;

/// Protocol features the driver uses when the back-end offers them.
const WANTED_PROTOCOL: VhostUserProtocolFeatures = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::CONFIG);

/// How long a heartbeat request may wait for the back-end's answer before the back-end
/// is declared hung (see [`Transport::probe`]).
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);

/// One queue as it was set up: what a reconnection sends again.
struct QueueRec {
    kick: Arc<EventFd>,
    call: EventFd,
    size: u16,
    addrs: RingAddrs,
    enabled: bool,
}

/// A vhost-user connection acting as a virtio transport.
pub struct VhostUserTransport {
    path: PathBuf,
    /// Server role (DPDK's `server=1`): the socket the back-end connects to.
    listener: Option<UnixListener>,
    fe: Frontend,
    /// A handle on the connection's socket, to see it hang up (`probe`).
    sock: UnixStream,
    /// Bounds each request (see the module comment).
    deadline: Deadline,
    timeout: Duration,
    peer_uid: Option<u32>,
    /// The DMA arena as one memory region (set by `map_dma`; then other ports' arenas
    /// shared with `share_dma`), and the fd each names: our own duplicate, so a region
    /// stays valid whatever happens to the arena's handles.
    regions: Vec<(VhostUserMemoryRegionInfo, File)>,
    protocol: VhostUserProtocolFeatures,
    fallback_mac: [u8; 6],
    /// Each queue set up, by index (grown on demand).
    queues: Vec<Option<QueueRec>>,
    /// `VHOST_USER_F_PROTOCOL_FEATURES` was negotiated: rings start disabled and need
    /// `SET_VRING_ENABLE`.
    protocol_negotiated: bool,
    /// `VIRTIO_F_RING_PACKED` was negotiated: ring bases carry the avail wrap counter.
    packed: bool,
    /// Features negotiated (`VIRTIO_NET_F_STATUS` decides whether the heartbeat reads
    /// the link bit).
    features: u64,
    /// Why the connection is gone, once it is (until a reconnection).
    gone: Option<String>,
    /// The link bit the last heartbeat read.
    link_up: bool,
    /// During a reconnection: the bound on each request (a back-end that accepts but
    /// does not answer, a stopped one, is given up on as fast as a heartbeat would).
    handshake_limit: Option<Duration>,
}

fn vu(request: &'static str) -> impl Fn(vhost::Error) -> Error {
    move |e| Error::VhostUser { request, reason: e.to_string() }
}

/// The connected (or accepted) socket, checked and wrapped: the deadline's watchdog, the
/// `vhost` crate's front-end, and the probe's handle.
fn attach(
    sock: UnixStream,
    peer_uid: Option<u32>,
    timeout: Duration,
    path: &Path,
) -> Result<(Frontend, UnixStream, Deadline)> {
    let connect_err = |reason: String| Error::Connect { path: path.into(), reason };
    if let Some(want) = peer_uid {
        let (uid, pid) = peer_credentials(&sock).map_err(|e| connect_err(format!("SO_PEERCRED: {e}")))?;
        if uid != want {
            return Err(connect_err(format!(
                "the back-end (pid {pid}) runs as uid {uid}, not the expected uid {want}"
            )));
        }
    }
    // An accepted socket may inherit the listener's non-blocking mode; requests block.
    sock.set_nonblocking(false).map_err(|e| Error::io("making the vhost-user socket blocking", e))?;
    let watch = sock.try_clone().map_err(|e| Error::io("duplicating the vhost-user socket", e))?;
    let probe = sock.try_clone().map_err(|e| Error::io("duplicating the vhost-user socket", e))?;
    let deadline =
        Deadline::new(watch, timeout).map_err(|e| Error::io("starting the request watchdog", e))?;
    // Queue indices are bounded by vhost-user's limit; which exist is the device's
    // business (data queues, then the control queue at 2 * max_virtqueue_pairs).
    Ok((Frontend::from_stream(sock, VHOST_USER_MAX_VRINGS), probe, deadline))
}

/// Waits up to `wait` for a back-end to connect to `listener`.
fn accept_within(listener: &UnixListener, wait: Duration) -> std::io::Result<Option<UnixStream>> {
    let mut pfd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    let ms = wait.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd, ours, for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return if e.kind() == std::io::ErrorKind::Interrupted { Ok(None) } else { Err(e) };
    }
    if n == 0 {
        return Ok(None);
    }
    match listener.accept() {
        Ok((s, _)) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether the peer of `sock` hung up (or the socket failed): `Some(reason)`. Does not
/// consume anything.
fn hung_up(sock: &UnixStream) -> Option<String> {
    let mut pfd = libc::pollfd { fd: sock.as_raw_fd(), events: libc::POLLIN | libc::POLLRDHUP, revents: 0 };
    // SAFETY: one valid pollfd, ours, for the duration of the call; no wait.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    if n <= 0 {
        return None;
    }
    if pfd.revents & (libc::POLLHUP | libc::POLLRDHUP) != 0 {
        return Some("the back-end closed the connection".into());
    }
    if pfd.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
        return Some("the connection failed".into());
    }
    // Readable with no request outstanding: an end of file, or a message the back-end
    // may not send unasked on this channel.
    let mut b = [0u8; 1];
    // SAFETY: `b` is ours, one byte; MSG_PEEK leaves the data in the socket.
    let r = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            b.as_mut_ptr() as *mut libc::c_void,
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match r {
        0 => Some("the back-end closed the connection".into()),
        r if r > 0 => Some("the back-end sent a message nobody asked for".into()),
        _ => None,
    }
}

impl VhostUserTransport {
    /// Connects to the back-end at `path` and takes ownership of the device; the DMA
    /// arena given to [`Transport::map_dma`] becomes its guest memory. `mac` is the
    /// address used when the back-end does not provide config space. Each request,
    /// `SET_OWNER` here included, fails after `timeout` without an answer. With
    /// `peer_uid`, the back-end's process must run as that user (`SO_PEERCRED`).
    pub fn connect(path: &Path, mac: [u8; 6], timeout: Duration, peer_uid: Option<u32>) -> Result<Self> {
        let connect_err = |reason: String| Error::Connect { path: path.into(), reason };
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(connect_err("no such socket (is the back-end running?)".into()))
            }
            Err(e) => return Err(connect_err(e.to_string())),
            Ok(m) => {
                use std::os::unix::fs::FileTypeExt;
                if !m.file_type().is_socket() {
                    return Err(connect_err("not a unix socket".into()));
                }
            }
        }
        if timeout.is_zero() {
            return Err(Error::Config("a vhost-user request timeout of 0".into()));
        }
        // A back-end may not listen yet: retry a refused connection a few times (as the
        // `vhost` crate's own `connect` does).
        let mut tries = 5;
        let sock = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && tries > 0 => {
                    tries -= 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(connect_err(e.to_string())),
            }
        };
        Self::with_socket(path, None, sock, mac, timeout, peer_uid)
    }

    /// The server role (DPDK's virtio-user `server=1`): listens on `path` (a stale socket
    /// file there is replaced; one a process still listens on is an error) and waits up
    /// to `timeout` for the back-end (ours with `--client`, DPDK's `net_vhost` with
    /// `client=1`) to connect. After a back-end goes away, the next one connects to the
    /// same socket ([`Transport::reconnect`]). The socket file is removed at close.
    pub fn listen(path: &Path, mac: [u8; 6], timeout: Duration, peer_uid: Option<u32>) -> Result<Self> {
        let connect_err = |reason: String| Error::Connect { path: path.into(), reason };
        if timeout.is_zero() {
            return Err(Error::Config("a vhost-user request timeout of 0".into()));
        }
        if let Ok(m) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !m.file_type().is_socket() {
                return Err(connect_err("exists and is not a unix socket: not replaced".into()));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(connect_err("another process listens on this socket".into()));
            }
            std::fs::remove_file(path).map_err(|e| connect_err(format!("removing the stale socket: {e}")))?;
        }
        let listener = UnixListener::bind(path).map_err(|e| connect_err(format!("listening: {e}")))?;
        listener.set_nonblocking(true).map_err(|e| Error::io("making the listener non-blocking", e))?;
        log::info!(
            "{}: waiting up to {} ms for the back-end to connect",
            path.display(),
            timeout.as_millis()
        );
        let sock = accept_within(&listener, timeout)
            .map_err(|e| connect_err(format!("accepting: {e}")))?
            .ok_or_else(|| {
                let _ = std::fs::remove_file(path);
                connect_err(format!("no back-end connected within {} ms", timeout.as_millis()))
            })?;
        Self::with_socket(path, Some(listener), sock, mac, timeout, peer_uid)
    }

    fn with_socket(
        path: &Path,
        listener: Option<UnixListener>,
        sock: UnixStream,
        mac: [u8; 6],
        timeout: Duration,
        peer_uid: Option<u32>,
    ) -> Result<Self> {
        let (fe, sock, deadline) = attach(sock, peer_uid, timeout, path)?;
        let mut t = VhostUserTransport {
            path: path.into(),
            listener,
            fe,
            sock,
            deadline,
            timeout,
            peer_uid,
            regions: Vec::new(),
            protocol: VhostUserProtocolFeatures::empty(),
            fallback_mac: mac,
            queues: Vec::new(),
            protocol_negotiated: false,
            packed: false,
            features: 0,
            gone: None,
            link_up: true,
            handshake_limit: None,
        };
        t.call("SET_OWNER", |fe| fe.set_owner())?;
        Ok(t)
    }

    /// Runs one request under the deadline; its error becomes `Error::VhostUser`, or
    /// `Error::VhostUserTimeout` when the back-end did not answer in time.
    fn call<T>(
        &mut self,
        request: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
    ) -> Result<T> {
        self.call_or(request, f, vu(request))
    }

    /// [`call`](Self::call) with the request's own error mapping.
    fn call_or<T>(
        &mut self,
        request: &'static str,
        f: impl FnOnce(&mut Frontend) -> vhost::Result<T>,
        map: impl FnOnce(vhost::Error) -> Error,
    ) -> Result<T> {
        let fe = &mut self.fe;
        let limit = self.handshake_limit.unwrap_or(self.deadline.limit());
        let (r, fired) = self.deadline.run_within(limit, || f(fe));
        if fired {
            return Err(Error::VhostUserTimeout { request, waited_ms: limit.as_millis() as u64 });
        }
        r.map_err(map)
    }

    /// Sends queue `i`'s ring (as recorded) to the back-end.
    fn send_ring(&mut self, i: usize) -> Result<()> {
        let Some(q) = self.queues.get(i).and_then(Option::as_ref) else { return Ok(()) };
        let (size, addrs) = (q.size, q.addrs);
        let kick = q.kick.clone();
        let call = q.call.try_clone().map_err(|e| Error::io("duplicating an eventfd", e))?;
        self.call("SET_VRING_NUM", |fe| fe.set_vring_num(i, size))?;
        let cfg = VringConfigData {
            queue_max_size: size,
            queue_size: size,
            flags: 0,
            desc_table_addr: addrs.desc,
            used_ring_addr: addrs.used,
            avail_ring_addr: addrs.avail,
            log_addr: None,
        };
        self.call("SET_VRING_ADDR", |fe| fe.set_vring_addr(i, &cfg))?;
        // A ring starts (or restarts, reset by its queue) at index 0. For a packed ring
        // the three addresses are the descriptor ring, the driver and the device event
        // suppression areas, and the base carries the avail wrap counter in bit 15 (1 on
        // a fresh ring, §2.8.1), as DPDK's virtio-user sends it.
        let base = if self.packed { spec::packed::event_off_wrap(0, true) } else { 0 };
        self.call("SET_VRING_BASE", |fe| fe.set_vring_base(i, base))?;
        // We poll and ask the device not to interrupt us; the call eventfd exists because
        // vhost-user requires one, and is never read.
        self.call("SET_VRING_CALL", |fe| fe.set_vring_call(i, &call))?;
        self.call("SET_VRING_KICK", |fe| fe.set_vring_kick(i, &kick))?;
        Ok(())
    }

    /// The request just made failed because the connection is gone (a timeout shut it
    /// down, or the back-end hung up): remember why, so `probe` reports it.
    fn note_gone(&mut self, e: &Error) {
        if self.gone.is_none() {
            self.gone = Some(match e {
                Error::VhostUserTimeout { request, waited_ms } => {
                    format!("the back-end did not answer {request} within {waited_ms} ms")
                }
                e => format!("the connection failed: {e}"),
            });
        }
    }
}

/// The user id and process id of the socket's peer, as the kernel recorded them when
/// it connected (`SO_PEERCRED`).
fn peer_credentials(sock: &UnixStream) -> std::io::Result<(u32, i32)> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are ours and sized for SO_PEERCRED's `struct ucred`; the
    // result is checked.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut libc::ucred as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((cred.uid, cred.pid))
}

impl Transport for VhostUserTransport {
    fn describe(&self) -> String {
        let role = if self.listener.is_some() { " (server)" } else { "" };
        format!("virtio-user {}{role}", self.path.display())
    }

    fn map_dma(&mut self, arena: &mut DmaArena) -> Result<()> {
        // Guest-physical address = virtual address (DPDK virtio-user's convention), which
        // is the arena's default linear map: nothing to install.
        self.regions.clear();
        self.share_dma(arena)
    }

    fn share_dma(&mut self, arena: &DmaArena) -> Result<()> {
        if arena.iova_base() != arena.va() as u64 {
            return Err(Error::Config(
                "a DMA arena not addressed by its virtual address cannot be shared".into(),
            ));
        }
        let file = arena.file().try_clone().map_err(|e| Error::io("duplicating the DMA arena fd", e))?;
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: arena.iova_base(),
            memory_size: arena.len() as u64,
            userspace_addr: arena.va() as u64,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        };
        self.regions.push((region, file));
        Ok(())
    }

    fn device_features(&mut self) -> Result<u64> {
        self.call("GET_FEATURES", |fe| fe.get_features())
    }

    fn negotiate(&mut self, features: u64) -> Result<()> {
        let offered = self.device_features()?;
        let proto_bit = f::bit(f::VHOST_USER_PROTOCOL_FEATURES);
        let mut features = features;
        if offered & proto_bit != 0 {
            features |= proto_bit;
            self.protocol_negotiated = true;
            let p = self.call("GET_PROTOCOL_FEATURES", |fe| fe.get_protocol_features())?;
            self.protocol = p & WANTED_PROTOCOL;
            let p = self.protocol;
            self.call("SET_PROTOCOL_FEATURES", |fe| fe.set_protocol_features(p))?;
            if self.protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every later request waits for the back-end's acknowledgement, so a
                // refusal (of features, memory, rings) is an error here, not silence.
                self.fe.set_hdr_flags(vhost::vhost_user::message::VhostUserHeaderFlag::NEED_REPLY);
            }
        }
        if features & !offered != 0 {
            return Err(Error::FeaturesRefused(features & !offered));
        }
        self.call_or(
            "SET_FEATURES",
            |fe| fe.set_features(features),
            |e| match e {
                vhost::Error::VhostUserProtocol(_) => Error::FeaturesRefused(features),
                e => vu("SET_FEATURES")(e),
            },
        )?;
        self.packed = features & f::bit(f::RING_PACKED) != 0;
        self.features = features;
        if self.regions.is_empty() {
            return Err(Error::Config("virtio-user: no DMA arena shared before negotiation".into()));
        }
        let regions: Vec<VhostUserMemoryRegionInfo> = self.regions.iter().map(|(r, _)| *r).collect();
        self.call("SET_MEM_TABLE", |fe| fe.set_mem_table(&regions))?;
        Ok(())
    }

    fn config(&mut self, features: u64) -> Result<NetConfig> {
        let mut cfg = NetConfig {
            mac: self.fallback_mac,
            status: net_config::S_LINK_UP,
            max_queue_pairs: 1,
            mtu: 1500,
            mtu_reported: false,
        };
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Ok(cfg);
        }
        let buf = [0u8; net_config::LEN];
        let (_, data) = self.call("GET_CONFIG", |fe| {
            fe.get_config(0, net_config::LEN as u32, VhostUserConfigFlags::WRITABLE, &buf)
        })?;
        if data.len() < net_config::LEN {
            return Err(Error::VhostUser {
                request: "GET_CONFIG",
                reason: format!("{} bytes returned", data.len()),
            });
        }
        let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]);
        if features & f::bit(f::NET_MAC) != 0 {
            cfg.mac.copy_from_slice(&data[net_config::MAC..net_config::MAC + 6]);
        }
        if features & f::bit(f::NET_STATUS) != 0 {
            cfg.status = u16_at(net_config::STATUS);
        }
        if features & f::bit(f::NET_MQ) != 0 {
            cfg.max_queue_pairs = u16_at(net_config::MAX_VQ_PAIRS);
        }
        if features & f::bit(f::NET_MTU) != 0 {
            cfg.mtu = u16_at(net_config::MTU);
            cfg.mtu_reported = true;
        }
        cfg.checked(features, self.fallback_mac, &self.describe())
    }

    fn setup_queue(&mut self, index: u16, size: u16, addrs: RingAddrs) -> Result<Notifier> {
        let i = index as usize;
        if i as u64 >= VHOST_USER_MAX_VRINGS {
            return Err(Error::Config(format!("queue {index} beyond vhost-user's {VHOST_USER_MAX_VRINGS}")));
        }
        if i >= self.queues.len() {
            self.queues.resize_with(i + 1, || None);
        }
        let kick = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e))?);
        let call = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::io("eventfd", e))?;
        self.queues[i] = Some(QueueRec { kick: kick.clone(), call, size, addrs, enabled: false });
        self.send_ring(i)?;
        Ok(Notifier::EventFd(kick))
    }

    fn start(&mut self) -> Result<()> {
        // The device runs once its rings are enabled. But a back-end may act on the
        // last enable after it has answered it: DPDK's vhost library acknowledges a
        // request before it calls its application's `new_device` and queue-state
        // callbacks, and its `net_vhost` PMD drops what it forwards to a queue those
        // have not opened yet (a frame injected at once, as `--tx-first` does, was lost
        // in about one start in fifteen). A back-end handles requests one at a time, so
        // the reply to one more request means it has finished with all before it.
        self.call("GET_FEATURES", |fe| fe.get_features())?;
        Ok(())
    }

    fn enable_queue(&mut self, index: u16) -> Result<()> {
        if let Some(q) = self.queues.get_mut(index as usize).and_then(Option::as_mut) {
            q.enabled = true;
        }
        // Without protocol features rings start enabled (vhost-user "Ring states").
        if self.protocol_negotiated {
            self.call("SET_VRING_ENABLE", |fe| fe.set_vring_enable(index as usize, true))?;
        }
        Ok(())
    }

    fn control_queue_may_be_unserved(&self) -> bool {
        true
    }

    fn reset(&mut self) -> Result<()> {
        // GET_VRING_BASE stops each ring: afterwards the back-end touches neither the
        // ring nor its buffers, so they can go back to the pool.
        let mut first_err = None;
        for q in 0..self.queues.len() {
            if self.queues[q].is_none() {
                continue;
            }
            if self.gone.is_none() {
                if let Err(e) = self.call("GET_VRING_BASE", |fe| fe.get_vring_base(q)) {
                    first_err.get_or_insert(e);
                }
            }
            self.queues[q] = None;
        }
        first_err.map_or(Ok(()), Err)
    }

    fn probe(&mut self, heartbeat: bool) -> Probe {
        if let Some(why) = &self.gone {
            return Probe::Gone(why.clone());
        }
        if let Some(why) = hung_up(&self.sock) {
            self.gone = Some(why.clone());
            return Probe::Gone(why);
        }
        if !heartbeat {
            return Probe::Alive { link_up: self.link_up };
        }
        // A heartbeat: a back-end that is alive but stopped (SIGSTOP, a hang) answers no
        // request; after HEARTBEAT_TIMEOUT the watchdog shuts the connection down. With
        // config space and VIRTIO_NET_F_STATUS the same request reads the link bit.
        let with_status = self.protocol.contains(VhostUserProtocolFeatures::CONFIG)
            && self.features & f::bit(f::NET_STATUS) != 0;
        let limit = HEARTBEAT_TIMEOUT.min(self.timeout);
        let fe = &mut self.fe;
        let (r, fired) = if with_status {
            let buf = [0u8; net_config::LEN];
            let (r, fired) = self.deadline.run_within(limit, || {
                fe.get_config(0, net_config::LEN as u32, VhostUserConfigFlags::WRITABLE, &buf)
            });
            (
                r.map(|(_, data)| data.get(net_config::STATUS).map(|b| b & net_config::S_LINK_UP as u8 != 0)),
                fired,
            )
        } else {
            let (r, fired) = self.deadline.run_within(limit, || fe.get_features());
            (r.map(|_| Some(true)), fired)
        };
        let why = match (r, fired) {
            (_, true) => format!("the back-end did not answer a heartbeat within {} ms", limit.as_millis()),
            (Ok(Some(up)), false) => {
                self.link_up = up;
                return Probe::Alive { link_up: up };
            }
            (Ok(None), false) => "the back-end returned a short config space".to_string(),
            (Err(e), false) => format!("heartbeat: {e}"),
        };
        // The watchdog may not have shut the socket down (an error, not a timeout):
        // nothing more is sent on this connection either way.
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        self.gone = Some(why.clone());
        Probe::Gone(why)
    }

    fn reconnect(&mut self, features: u64) -> Result<()> {
        let connect_err = |reason: String| Error::Connect { path: self.path.clone(), reason };
        let sock = match &self.listener {
            None => UnixStream::connect(&self.path).map_err(|e| connect_err(e.to_string()))?,
            Some(l) => accept_within(l, Duration::from_millis(50))
                .map_err(|e| connect_err(format!("accepting: {e}")))?
                .ok_or_else(|| connect_err("no back-end has connected yet".into()))?,
        };
        let (fe, sock, deadline) = attach(sock, self.peer_uid, self.timeout, &self.path)?;
        // The old connection's watchdog thread ends here.
        self.fe = fe;
        self.sock = sock;
        self.deadline = deadline;
        self.gone = None;
        self.protocol = VhostUserProtocolFeatures::empty();
        self.protocol_negotiated = false;
        self.handshake_limit = Some(HEARTBEAT_TIMEOUT.min(self.timeout));
        let r = self.call("SET_OWNER", |fe| fe.set_owner()).and_then(|()| self.negotiate(features));
        self.handshake_limit = None;
        if let Err(e) = &r {
            self.note_gone(e);
            let _ = self.sock.shutdown(std::net::Shutdown::Both);
        }
        r
    }

    fn restore_queues(&mut self, which: &dyn Fn(u16) -> bool) -> Result<()> {
        let r = (|| {
            let chosen: Vec<usize> = (0..self.queues.len()).filter(|&i| which(i as u16)).collect();
            for &i in &chosen {
                self.send_ring(i)?;
            }
            for &i in &chosen {
                if self.protocol_negotiated && self.queues[i].as_ref().is_some_and(|q| q.enabled) {
                    self.call("SET_VRING_ENABLE", |fe| fe.set_vring_enable(i, true))?;
                }
            }
            self.start()
        })();
        if let Err(e) = &r {
            self.note_gone(e);
            let _ = self.sock.shutdown(std::net::Shutdown::Both);
        }
        r
    }
}

impl Drop for VhostUserTransport {
    fn drop(&mut self) {
        if self.listener.is_some() {
            // The server role created the socket file: it goes with the port.
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
