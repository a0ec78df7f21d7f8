//! Our `host-backend` driven by a driver we did not write: `virtio-drivers` 0.13
//! (rcore-os) `VirtIONetRaw`, over vhost-user through [`vnet_tests::vdfront`], in this
//! test process while the backend runs as a child process.
//!
//! Each test takes the cross-binary [`serial`] lock, bounds every wait with a deadline,
//! checks exact counts on both sides (the driver's and the backend's final JSON stats)
//! and byte equality, and checks that the front-end recorded no vhost-user failure.
//!
//! Direction names in the stats are the device's: backend `rx_*` = frames the driver
//! transmitted, `tx_*` = frames delivered into the driver's receive queue.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use driver::layout::{features, NET_HDR_LEN};
use serde_json::Value;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::Transport;
use vnet_tests::harness::{counter, device, serial, total_drops, Backend, TempDir};
use vnet_tests::vdfront::{live_bounce_buffers, ArenaHal, Diagnostics, VhostUserTransport, MAX_QUEUE_SIZE};

const QUEUE_SIZE: usize = MAX_QUEUE_SIZE as usize;
type Net = VirtIONetRaw<ArenaHal, VhostUserTransport, QUEUE_SIZE>;

/// virtio-drivers' minimum receive buffer (header + 1514-byte frame).
const RX_BUF_LEN: usize = 1526;

/// Upper bound for one test's traffic phase.
const TRAFFIC_TIMEOUT: Duration = Duration::from_secs(20);

/// How long to keep polling after the expected count, to catch extra frames.
const QUIET_PERIOD: Duration = Duration::from_millis(500);

fn port(kind: &str, sock: &Path) -> String {
    format!("{kind}:{}", sock.display())
}

/// Connects a `VirtIONetRaw` to the backend at `sock`.
fn open(sock: &Path) -> (Net, Diagnostics) {
    let transport = VhostUserTransport::connect(sock).unwrap_or_else(|e| panic!("vdfront connect: {e}"));
    let diag = transport.diagnostics();
    let net = Net::new(transport)
        .unwrap_or_else(|e| panic!("VirtIONetRaw::new: {e:?}; front-end errors: {:?}", diag.errors()));
    diag.check().unwrap_or_else(|e| panic!("after VirtIONetRaw::new: {e}"));
    (net, diag)
}

/// Drops the driver (which stops both rings: SET_VRING_ENABLE(0) + GET_VRING_BASE),
/// checks that no vhost-user request failed, and returns the ring bases the backend
/// reported, as `(rx queue 0, tx queue 1)`.
fn close(net: Net, diag: &Diagnostics) -> (u32, u32) {
    drop(net);
    diag.check().unwrap_or_else(|e| panic!("{e}"));
    let bases = diag.vring_bases();
    let get = |q: u16| {
        bases
            .iter()
            .find(|(i, _)| *i == q)
            .map(|(_, b)| *b)
            .unwrap_or_else(|| panic!("queue {q} was not stopped; bases {bases:?}"))
    };
    (get(0), get(1))
}

/// Checks the features virtio-drivers ended up with: it supports MAC, STATUS,
/// EVENT_IDX, INDIRECT_DESC and VERSION_1, all of which our backend offers.
fn check_negotiated(diag: &Diagnostics) {
    let want = [
        features::VERSION_1,
        features::NET_MAC,
        features::NET_STATUS,
        features::RING_EVENT_IDX,
        features::RING_INDIRECT_DESC,
        features::VHOST_USER_PROTOCOL_FEATURES,
    ]
    .iter()
    .fold(0u64, |acc, b| acc | features::bit(*b));
    assert_eq!(diag.driver_features(), want, "negotiated features");
}

/// A frame of `len` bytes from `src` to `dst`, EtherType 0x88b5 (local experimental),
/// whose payload starts with `seq` (LE u32) and continues with a pattern derived from it.
fn test_frame(dst: [u8; 6], src: [u8; 6], seq: u32, len: usize) -> Vec<u8> {
    assert!(len >= 18);
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x88b5u16.to_be_bytes());
    f.extend_from_slice(&seq.to_le_bytes());
    f.extend((18..len).map(|i| (i as u32).wrapping_mul(31).wrapping_add(seq.wrapping_mul(7)) as u8));
    f
}

/// Varied sizes across 60..=1514, deterministic.
fn frame_len(i: usize) -> usize {
    60 + (i * 397 + i * i * 13) % (1514 - 60 + 1)
}

// ------------------------------------------------------------------------------ TX / RX

/// Pipelined transmission through `transmit_begin` / `poll_transmit` /
/// `transmit_complete`: one descriptor per frame (header + frame in one buffer).
#[derive(Default)]
struct Tx {
    inflight: HashMap<u16, Vec<u8>>,
    sent: usize,
    completed: usize,
}

impl Tx {
    /// Queues `frame` if a descriptor is free; returns whether it was queued.
    fn try_send(&mut self, net: &mut Net, frame: &[u8]) -> bool {
        self.reclaim(net);
        if !net.can_send() {
            return false;
        }
        let mut buf = vec![0u8; NET_HDR_LEN + frame.len()];
        let hdr = net.fill_buffer_header(&mut buf).expect("fill_buffer_header");
        assert_eq!(hdr, NET_HDR_LEN, "virtio-drivers uses the 12-byte header with VERSION_1");
        buf[hdr..].copy_from_slice(frame);
        // SAFETY: `buf` is moved into `inflight` right away and not touched until
        // `transmit_complete` for the same token; moving a Vec does not move its heap
        // buffer, so the memory stays valid and unaliased until then.
        let token = unsafe { net.transmit_begin(&buf) }.expect("transmit_begin");
        assert!(self.inflight.insert(token, buf).is_none(), "token {token} reused while in flight");
        self.sent += 1;
        true
    }

    /// Pops every completed transmission.
    fn reclaim(&mut self, net: &mut Net) {
        while let Some(token) = net.poll_transmit() {
            let buf = self
                .inflight
                .remove(&token)
                .unwrap_or_else(|| panic!("device completed TX token {token}, which is not in flight"));
            // SAFETY: `buf` is the buffer passed to `transmit_begin` for `token`.
            let used = unsafe { net.transmit_complete(token, &buf) }.expect("transmit_complete");
            // virtio 1.x §2.7.8: `len` is the number of bytes written into the chain; a
            // TX chain is device-readable only.
            assert_eq!(used, 0, "used.len of a TX chain (nothing device-writable) must be 0");
            self.completed += 1;
        }
    }

    fn idle(&self) -> bool {
        self.inflight.is_empty()
    }
}

/// Receive buffers kept posted; completed frames are checked and returned.
#[derive(Default)]
struct Rx {
    posted: HashMap<u16, Vec<u8>>,
}

impl Rx {
    /// Posts receive buffers until the queue is full.
    fn fill(&mut self, net: &mut Net) {
        while self.posted.len() < QUEUE_SIZE {
            let mut buf = vec![0xa5u8; RX_BUF_LEN];
            // SAFETY: `buf` is moved into `posted` right away and not touched until
            // `receive_complete` for the same token (its heap buffer does not move).
            match unsafe { net.receive_begin(&mut buf) } {
                Ok(token) => {
                    assert!(self.posted.insert(token, buf).is_none(), "RX token {token} reused");
                }
                Err(virtio_drivers::Error::QueueFull) => break,
                Err(e) => panic!("receive_begin: {e:?}"),
            }
        }
    }

    /// One received frame (without the virtio-net header), if any; the buffer is
    /// reposted. Checks the header the device wrote.
    fn poll(&mut self, net: &mut Net) -> Option<Vec<u8>> {
        let token = net.poll_receive()?;
        let mut buf = self
            .posted
            .remove(&token)
            .unwrap_or_else(|| panic!("device completed RX token {token}, which is not posted"));
        // SAFETY: `buf` is the buffer passed to `receive_begin` for `token`.
        let (hdr_len, len) = unsafe { net.receive_complete(token, &mut buf) }.expect("receive_complete");
        assert_eq!(hdr_len, NET_HDR_LEN);
        let hdr = &buf[..NET_HDR_LEN];
        assert_eq!(&hdr[..10], &[0u8; 10], "virtio-net header flags/gso fields (no offloads negotiated)");
        // virtio 1.x §5.1.6.4: without MRG_RXBUF the device MUST set num_buffers to 1.
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers without MRG_RXBUF");
        assert!(hdr_len + len <= RX_BUF_LEN, "used.len {} exceeds the buffer", hdr_len + len);
        let frame = buf[hdr_len..hdr_len + len].to_vec();
        buf.fill(0xa5);
        // SAFETY: as in `fill`.
        let token = unsafe { net.receive_begin(&mut buf) }.expect("repost receive buffer");
        assert!(self.posted.insert(token, buf).is_none(), "RX token {token} reused");
        Some(frame)
    }
}

/// A bound on a polling loop: [`Deadline::tick`] panics once it has passed.
struct Deadline {
    at: Instant,
    timeout: Duration,
    spins: u32,
}

impl Deadline {
    fn new(timeout: Duration) -> Deadline {
        Deadline { at: Instant::now() + timeout, timeout, spins: 0 }
    }

    /// Panics with `what()` if the deadline has passed; yields the CPU now and then.
    fn tick(&mut self, what: impl FnOnce() -> String) {
        assert!(Instant::now() < self.at, "timed out after {:?}: {}", self.timeout, what());
        self.spins += 1;
        if self.spins & 63 == 0 {
            thread::yield_now();
        }
    }
}

/// Aborts the process (after killing `pid`) if not disarmed within `timeout`: the only
/// way to bound virtio-drivers' blocking `send`, which spins until the device completes.
struct Watchdog {
    disarm: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Watchdog {
    fn arm(timeout: Duration, pid: u32, what: &'static str) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        let thread = thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(timeout) {
                eprintln!(
                    "watchdog: {what} did not finish within {timeout:?}; killing backend {pid}, aborting"
                );
                // SAFETY: kill(2) takes plain integers; `pid` is our unreaped child.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                std::process::abort();
            }
        });
        Watchdog { disarm: Some(tx), thread: Some(thread) }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.disarm.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn show(what: &str, dev: &Value) {
    eprintln!("{what}: backend {dev}");
    assert_eq!(counter(dev, "broken_queues"), 0, "{what}: a queue broke: {dev}");
}

// ------------------------------------------------------------------------------ tests

/// `sink`: 500 frames of varied sizes, pipelined (one descriptor each). The backend
/// counts every frame and byte; the TX ring base it reports equals the frames sent.
#[test]
fn sink() {
    let _lock = serial();
    let dir = TempDir::new("vd-sink");
    let sock = dir.join("sink.sock");
    let backend = Backend::start(&["--port", &port("sink", &sock)]);
    // Bounce buffers still lent out by earlier tests in this process (posted RX buffers).
    let bounces_before = live_bounce_buffers();
    let (mut net, diag) = open(&sock);
    check_negotiated(&diag);

    const N: usize = 500;
    let frames: Vec<Vec<u8>> = (0..N)
        .map(|i| test_frame([0x02, 0, 0, 0, 0, 2], [0x02, 0, 0, 0, 0, 1], i as u32, frame_len(i)))
        .collect();
    let bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
    assert!(frames.iter().any(|f| f.len() == 60) && frames.iter().all(|f| (60..=1514).contains(&f.len())));

    let mut tx = Tx::default();
    let mut next = 0;
    let mut deadline = Deadline::new(TRAFFIC_TIMEOUT);
    loop {
        while next < N && tx.try_send(&mut net, &frames[next]) {
            next += 1;
        }
        tx.reclaim(&mut net);
        if next == N && tx.idle() {
            break;
        }
        deadline.tick(|| format!("sink: {next} queued, {} completed; log:\n{}", tx.completed, backend.log()));
    }
    assert_eq!((tx.sent, tx.completed), (N, N));

    let (rx_base, tx_base) = close(net, &diag);
    assert_eq!((rx_base, tx_base), (0, N as u32), "GET_VRING_BASE (rx, tx)");
    assert_eq!(live_bounce_buffers(), bounces_before, "every TX bounce buffer was returned");
    let stats = backend.stop();
    let dev = device(&stats, &sock);
    show("sink", dev);
    assert_eq!(counter(dev, "rx_packets"), N as u64);
    assert_eq!(counter(dev, "rx_bytes"), bytes);
    assert_eq!(counter(dev, "tx_packets"), 0);
    assert_eq!(total_drops(dev), 0, "{dev}");
}

/// `sink` through virtio-drivers' blocking `send`, which puts the header and the frame
/// in two buffers: with RING_INDIRECT_DESC negotiated that is an indirect descriptor
/// table (allocated on the heap, so bounced into the arena) per frame.
#[test]
fn sink_indirect_send() {
    let _lock = serial();
    let dir = TempDir::new("vd-sink-ind");
    let sock = dir.join("sink.sock");
    let backend = Backend::start(&["--port", &port("sink", &sock)]);
    let (mut net, diag) = open(&sock);
    check_negotiated(&diag);

    const N: usize = 200;
    let frames: Vec<Vec<u8>> = (0..N)
        .map(|i| test_frame([0x02, 0, 0, 0, 0, 2], [0x02, 0, 0, 0, 0, 1], i as u32, frame_len(i * 7 + 3)))
        .collect();
    let bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
    {
        let _wd = Watchdog::arm(TRAFFIC_TIMEOUT, backend.pid(), "sink_indirect_send: VirtIONetRaw::send");
        for (i, f) in frames.iter().enumerate() {
            net.send(f).unwrap_or_else(|e| panic!("send frame {i}: {e:?}"));
        }
    }

    let (rx_base, tx_base) = close(net, &diag);
    assert_eq!((rx_base, tx_base), (0, N as u32), "GET_VRING_BASE (rx, tx)");
    let stats = backend.stop();
    let dev = device(&stats, &sock);
    show("sink_indirect_send", dev);
    assert_eq!(counter(dev, "rx_packets"), N as u64);
    assert_eq!(counter(dev, "rx_bytes"), bytes);
    assert_eq!(total_drops(dev), 0, "{dev}");
}

/// `gen --count N --pkt-size 128`: exactly N UDP/IPv4 frames, addressed to the
/// device's MAC, with "VNET" + sequence numbers 0..N in order, and nothing more.
#[test]
fn gen() {
    let _lock = serial();
    let dir = TempDir::new("vd-gen");
    let sock = dir.join("gen.sock");
    const N: u64 = 2000;
    const PKT: usize = 128;
    let count = N.to_string();
    let pkt = PKT.to_string();
    let backend = Backend::start(&["--port", &port("gen", &sock), "--count", &count, "--pkt-size", &pkt]);
    let (mut net, diag) = open(&sock);
    let mac = net.mac_address();

    let mut rx = Rx::default();
    rx.fill(&mut net);
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut deadline = Deadline::new(TRAFFIC_TIMEOUT);
    loop {
        while let Some(f) = rx.poll(&mut net) {
            got.push(f);
        }
        if got.len() as u64 >= N {
            break;
        }
        deadline.tick(|| format!("gen: received {} of {N}; stats {:?}", got.len(), backend.latest_stats()));
    }
    let quiet_until = Instant::now() + QUIET_PERIOD;
    while Instant::now() < quiet_until {
        while let Some(f) = rx.poll(&mut net) {
            got.push(f);
        }
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(got.len() as u64, N, "frames received");

    for (i, f) in got.iter().enumerate() {
        assert_eq!(f.len(), PKT, "frame {i} length");
        assert_eq!(&f[0..6], &mac, "frame {i}: destination MAC is the device's");
        assert_eq!(&f[12..14], &[0x08, 0x00], "frame {i}: EtherType IPv4");
        let ip = &f[14..34];
        assert_eq!(ip[0], 0x45, "frame {i}: IPv4, IHL 5");
        assert_eq!(u16::from_be_bytes([ip[2], ip[3]]) as usize, PKT - 14, "frame {i}: IP total length");
        assert_eq!(ip[9], 17, "frame {i}: protocol UDP");
        assert_eq!(ipv4_header_sum(ip), 0xffff, "frame {i}: IPv4 header checksum");
        let udp = &f[34..42];
        assert_eq!(u16::from_be_bytes([udp[4], udp[5]]) as usize, PKT - 34, "frame {i}: UDP length");
        assert_eq!(&f[42..46], b"VNET", "frame {i}: magic");
        let seq = u64::from_le_bytes(f[46..54].try_into().expect("8 bytes"));
        assert_eq!(seq, i as u64, "frame {i}: sequence number");
    }

    let (rx_base, tx_base) = close(net, &diag);
    assert_eq!((rx_base, tx_base), (N as u32, 0), "GET_VRING_BASE (rx, tx)");
    let stats = backend.stop();
    let dev = device(&stats, &sock);
    show("gen", dev);
    assert_eq!(counter(dev, "tx_packets"), N);
    assert_eq!(counter(dev, "tx_bytes"), N * PKT as u64);
    assert_eq!(counter(dev, "generated"), N);
    assert_eq!(counter(dev, "rx_packets"), 0);
    assert_eq!(total_drops(dev), 0, "{dev}");
}

/// One's-complement sum of a header (0xffff when its checksum is right).
fn ipv4_header_sum(h: &[u8]) -> u16 {
    let mut sum: u32 = h.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// `reflect --swap-mac`: every frame comes back, in order, equal except for the two
/// MAC addresses, which are swapped.
#[test]
fn reflect_swap_mac() {
    let _lock = serial();
    let dir = TempDir::new("vd-reflect");
    let sock = dir.join("reflect.sock");
    let backend = Backend::start(&["--port", &port("reflect", &sock), "--swap-mac"]);
    let (mut net, diag) = open(&sock);
    check_negotiated(&diag);

    const N: usize = 1000;
    let frames: Vec<Vec<u8>> = (0..N)
        .map(|i| {
            let dst = [0x02, 0xdd, 0, 0, (i >> 8) as u8, i as u8];
            let src = [0x02, 0x55, 0, 0, (i >> 8) as u8, i as u8];
            test_frame(dst, src, i as u32, frame_len(i * 3 + 1))
        })
        .collect();
    let bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();

    let mut rx = Rx::default();
    rx.fill(&mut net);
    let mut tx = Tx::default();
    let mut got: Vec<Vec<u8>> = Vec::new();
    let mut next = 0;
    let mut deadline = Deadline::new(TRAFFIC_TIMEOUT);
    loop {
        while next < N && tx.try_send(&mut net, &frames[next]) {
            next += 1;
        }
        tx.reclaim(&mut net);
        while let Some(f) = rx.poll(&mut net) {
            got.push(f);
        }
        if got.len() >= N && tx.idle() {
            break;
        }
        deadline.tick(|| {
            format!(
                "reflect: {next} queued, {} completed, {} received; stats {:?}",
                tx.completed,
                got.len(),
                backend.latest_stats()
            )
        });
    }
    let quiet_until = Instant::now() + QUIET_PERIOD;
    while Instant::now() < quiet_until {
        while let Some(f) = rx.poll(&mut net) {
            got.push(f);
        }
        thread::sleep(Duration::from_millis(1));
    }
    assert_eq!((tx.sent, tx.completed, got.len()), (N, N, N), "(sent, completed, received)");

    let mut expected: VecDeque<Vec<u8>> = frames
        .iter()
        .map(|f| {
            let mut e = f.clone();
            e[0..6].copy_from_slice(&f[6..12]);
            e[6..12].copy_from_slice(&f[0..6]);
            e
        })
        .collect();
    for (i, f) in got.iter().enumerate() {
        let e = expected.pop_front().expect("as many expected as received");
        if *f != e {
            let first = f.iter().zip(&e).position(|(a, b)| a != b);
            panic!(
                "reflected frame {i} differs (len {} vs {}, first differing byte {first:?})",
                f.len(),
                e.len()
            );
        }
    }

    let (rx_base, tx_base) = close(net, &diag);
    assert_eq!((rx_base, tx_base), (N as u32, N as u32), "GET_VRING_BASE (rx, tx)");
    let stats = backend.stop();
    let dev = device(&stats, &sock);
    show("reflect", dev);
    assert_eq!(counter(dev, "rx_packets"), N as u64);
    assert_eq!(counter(dev, "tx_packets"), N as u64);
    assert_eq!(counter(dev, "rx_bytes"), bytes);
    assert_eq!(counter(dev, "tx_bytes"), bytes);
    assert_eq!(total_drops(dev), 0, "{dev}");
}

/// Config space: the MAC virtio-drivers reads is `--mac`, link is up, the MTU is
/// `--mtu`; the backend offers exactly the features the README lists.
#[test]
fn config_mac_and_features() {
    let _lock = serial();
    let dir = TempDir::new("vd-config");
    let sock = dir.join("cfg.sock");
    let backend =
        Backend::start(&["--port", &port("sink", &sock), "--mac", "02:ab:cd:ef:01:23", "--mtu", "9000"]);
    let transport = VhostUserTransport::connect(&sock).unwrap_or_else(|e| panic!("connect: {e}"));
    let diag = transport.diagnostics();

    let offered = transport.device_features();
    let readme = [
        features::VERSION_1,
        features::NET_MAC,
        features::NET_STATUS,
        features::NET_MTU,
        features::RING_EVENT_IDX,
        features::RING_INDIRECT_DESC,
        features::IN_ORDER,
        features::RING_PACKED,
        features::VHOST_USER_PROTOCOL_FEATURES,
        // A sink offers mergeable buffers (a driver sizes its receive buffers for the
        // MTU, 9000 here).
        features::NET_MRG_RXBUF,
        // And the host offloads (it takes a super-frame whole and drops it).
        features::NET_CSUM,
        features::NET_HOST_TSO4,
        features::NET_HOST_TSO6,
        features::NET_HOST_USO,
        // The control queue and its commands (no MQ with one pair, no guest offloads
        // without `gen --gso-size`).
        virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ,
        virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_RX,
        virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_RX_EXTRA,
        virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VLAN,
        virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_MAC_ADDR,
        virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS,
    ]
    .iter()
    .fold(0u64, |acc, b| acc | features::bit(*b));
    assert_eq!(offered, readme, "offered features {offered:#x} vs README's list {readme:#x}");
    assert_eq!(transport.config_bytes().len(), 12);
    let status: u16 = transport.read_config_space(6).expect("config status");
    let pairs: u16 = transport.read_config_space(8).expect("config max_virtqueue_pairs");
    let mtu: u16 = transport.read_config_space(10).expect("config mtu");
    eprintln!("config: {:02x?} status {status:#x} pairs {pairs} mtu {mtu}", transport.config_bytes());
    assert_eq!(status & 1, 1, "VIRTIO_NET_S_LINK_UP");
    assert_eq!(mtu, 9000);

    let net = Net::new(transport).unwrap_or_else(|e| panic!("VirtIONetRaw::new: {e:?}"));
    assert_eq!(net.mac_address(), [0x02, 0xab, 0xcd, 0xef, 0x01, 0x23]);
    close(net, &diag);
    let stats = backend.stop();
    show("config", device(&stats, &sock));
}

/// Sends `frames` through a fresh pipelined [`Tx`], bounded by [`TRAFFIC_TIMEOUT`].
fn send_all(net: &mut Net, frames: &[Vec<u8>], backend: &Backend) {
    let mut tx = Tx::default();
    let mut next = 0;
    let mut deadline = Deadline::new(TRAFFIC_TIMEOUT);
    loop {
        while next < frames.len() && tx.try_send(net, &frames[next]) {
            next += 1;
        }
        tx.reclaim(net);
        if next == frames.len() && tx.idle() {
            break;
        }
        deadline.tick(|| {
            format!(
                "send_all: {next} of {} queued, {} completed; log:\n{}",
                frames.len(),
                tx.completed,
                backend.log()
            )
        });
    }
    assert_eq!((tx.sent, tx.completed), (frames.len(), frames.len()));
}

/// More than 2^16 frames through one TX ring, so the 16-bit ring indices wrap (with
/// EVENT_IDX notification suppression in play on both sides).
#[test]
fn sink_ring_wrap() {
    let _lock = serial();
    let dir = TempDir::new("vd-wrap");
    let sock = dir.join("sink.sock");
    let backend = Backend::start(&["--port", &port("sink", &sock)]);
    let (mut net, diag) = open(&sock);

    const N: usize = 70_000;
    let frames: Vec<Vec<u8>> = (0..N)
        .map(|i| test_frame([0x02, 0, 0, 0, 0, 2], [0x02, 0, 0, 0, 0, 1], i as u32, 60 + i % 4))
        .collect();
    let bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
    send_all(&mut net, &frames, &backend);

    let (rx_base, tx_base) = close(net, &diag);
    assert_eq!((rx_base, tx_base), (0, (N % 65536) as u32), "GET_VRING_BASE (rx, tx) after wrapping");
    let stats = backend.stop();
    let dev = device(&stats, &sock);
    show("sink_ring_wrap", dev);
    assert_eq!(counter(dev, "rx_packets"), N as u64);
    assert_eq!(counter(dev, "rx_bytes"), bytes);
    assert_eq!(total_drops(dev), 0, "{dev}");
}

/// Two front-ends one after the other on one backend: the first disconnects (its
/// device is reset), the second negotiates afresh (new rings, SET_MEM_TABLE again) and
/// its traffic is counted on top of the first's.
#[test]
fn sink_reconnect() {
    let _lock = serial();
    let dir = TempDir::new("vd-reconnect");
    let sock = dir.join("sink.sock");
    let backend = Backend::start(&["--port", &port("sink", &sock)]);
    let mut total = 0u64;
    let mut bytes = 0u64;
    for round in 0..2u32 {
        let (mut net, diag) = open(&sock);
        let frames: Vec<Vec<u8>> = (0..300)
            .map(|i| {
                test_frame(
                    [0x02, 0, 0, 0, 0, 2],
                    [0x02, 0, 0, 0, 0, 1],
                    i,
                    frame_len(i as usize + 11 * round as usize),
                )
            })
            .collect();
        send_all(&mut net, &frames, &backend);
        total += frames.len() as u64;
        bytes += frames.iter().map(|f| f.len() as u64).sum::<u64>();
        let (_, tx_base) = close(net, &diag);
        assert_eq!(tx_base, 300, "round {round}: GET_VRING_BASE of TX");
        // The backend must notice the disconnect before the next front-end connects.
        backend.wait_stats(Duration::from_secs(10), |s| {
            device(s, &sock).get("connected").and_then(Value::as_bool) == Some(false)
                && counter(device(s, &sock), "rx_packets") == total
        });
    }
    let stats = backend.stop();
    let dev = device(&stats, &sock);
    show("sink_reconnect", dev);
    assert_eq!(counter(dev, "rx_packets"), total);
    assert_eq!(counter(dev, "rx_bytes"), bytes);
    assert_eq!(total_drops(dev), 0, "{dev}");
}
