//! End-to-end tests of the `testpmd` binary: the real executable (a child process, see
//! `vnet_tests::testpmd_proc`) against the real `host-backend` (another child process),
//! and where a test needs to see frames, our driver library in this test process on
//! the other device of an `xconnect` port.
//!
//! Every test takes the cross-binary [`serial`] lock first, bounds every wait (a testpmd
//! or backend that hangs is killed and the test fails with its output), and checks exact
//! outcomes: exit codes, the one stderr line of a rejected command line, frame bytes,
//! and counters on both sides.
//!
//! Backend direction names are the device's: `rx_*` = frames the front-end sent,
//! `tx_*` = frames delivered into the front-end's receive queue. `xconnect:A,B` moves
//! A's transmit queue into B's receive queue and back; the backend's default MAC is
//! 52:54:00:12:34:56 for the first device and counts up for later ones.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use driver::{Packet, Port, PortConfig, QueuePair};
use serde_json::Value;
use vnet_tests::dpdk::PortCounts;
use vnet_tests::harness::{counter, device, serial, total_drops, within, Backend, TempDir};
use vnet_tests::testpmd_proc::{
    accumulated_forward_stats, forward_stats, forward_stats_json, forward_totals, json_port_counts,
    nic_stats, number_after, port_mac, run, Exit, Spawn, Testpmd,
};

/// Upper bound for a testpmd run that is expected to end by itself.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for a rejected command line.
const REJECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for any traffic phase.
const TRAFFIC_TIMEOUT: Duration = Duration::from_secs(30);
/// Silence that ends a receive phase (catches extra frames).
const QUIET: Duration = Duration::from_millis(300);
/// Frames per driver burst.
const BURST: usize = 32;
/// The "... packet forwarding - ports=" line testpmd prints once forwarding runs.
const FORWARDING: &str = "packet forwarding - ports=";
/// The vdev ring size (testpmd's default queue_size).
const RING: u64 = 256;
/// Most frames a [`Peer`] has out at once: a ring minus a burst.
const WINDOW: usize = RING as usize - BURST;

// ------------------------------------------------------------------------------ helpers

fn vdev(n: usize, sock: &Path) -> String {
    format!("virtio_user{n},path={}", sock.display())
}

fn port_arg(kind: &str, sock: &Path) -> String {
    format!("{kind}:{}", sock.display())
}

fn xconnect_arg(a: &Path, b: &Path) -> String {
    format!("xconnect:{},{}", a.display(), b.display())
}

/// Asserts a rejected command line: exit `code`, nothing on stdout, exactly one
/// non-empty stderr line, starting with "testpmd: " and containing every `needle`.
fn assert_rejected(exit: &Exit, code: i32, needles: &[&str]) {
    assert_eq!(exit.code(), code, "exit code\n{exit}");
    let lines: Vec<&str> = exit.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected exactly one stderr line\n{exit}");
    assert!(lines[0].starts_with("testpmd: "), "stderr line not prefixed 'testpmd: '\n{exit}");
    for n in needles {
        assert!(lines[0].contains(n), "stderr line lacks {n:?}\n{exit}");
    }
    assert!(exit.stdout.trim().is_empty(), "a rejected run printed on stdout\n{exit}");
}

/// Asserts a clean exit 0.
fn assert_ok(exit: &Exit) {
    assert_eq!(exit.code(), 0, "testpmd failed\n{exit}");
}

/// The backend's device object for `sock` in `stats`, checked for no broken queue and
/// no drop.
fn clean_device<'a>(stats: &'a Value, sock: &Path) -> &'a Value {
    let dev = device(stats, sock);
    assert_eq!(counter(dev, "broken_queues"), 0, "broken queues: {dev}");
    assert_eq!(total_drops(dev), 0, "backend dropped frames: {dev}");
    dev
}

fn fwd(out: &str, port: usize) -> PortCounts {
    forward_stats(out, port).unwrap_or_else(|| panic!("no forward statistics for port {port} in:\n{out}"))
}

/// Our driver on one device: the far end of an `xconnect` from testpmd's port.
struct Peer {
    port: Port,
    qp: QueuePair,
}

impl Peer {
    fn open(sock: &Path) -> Peer {
        Self::open_with(sock, PortConfig::virtio_user(sock))
    }

    /// As [`Peer::open`] with `cfg` (a virtio-user port on `sock`).
    fn open_with(sock: &Path, cfg: PortConfig) -> Peer {
        let mut port = within("Port::open", Duration::from_secs(20), move || Port::open(cfg))
            .unwrap_or_else(|e| panic!("Port::open({}): {e}", sock.display()));
        let qp = port.queue_pair(0).expect("queue pair 0");
        Peer { port, qp }
    }

    fn mac(&self) -> [u8; 6] {
        self.port.info().mac
    }

    /// Sends every frame of `frames` (in order) and meanwhile receives; returns what
    /// arrived, as soon as `expect` frames have, then keeps receiving for [`QUIET`] to
    /// catch extra ones. Panics at the deadline, with `diag()` (the peers' state).
    ///
    /// At most [`WINDOW`] frames are out (sent and not yet back) at any time, so the
    /// forwarder's transmit ring always has room for a whole burst: a forwarder may
    /// legitimately drop (and count in TX-dropped) a burst that does not fit its ring,
    /// which happens when a receive-ring backlog is forwarded faster than the device
    /// drains the transmit ring.
    fn exchange(&mut self, frames: &[Vec<u8>], expect: usize, diag: &dyn Fn() -> String) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + TRAFFIC_TIMEOUT;
        let pool = self.port.pool().clone();
        let mut next = 0;
        let mut pending: Vec<Packet> = Vec::with_capacity(BURST);
        let mut batch: Vec<Packet> = Vec::with_capacity(BURST);
        let mut got = Vec::new();
        while next < frames.len() || !pending.is_empty() || got.len() < expect {
            while pending.len() < BURST && next < frames.len() && next < got.len() + WINDOW {
                // A frame larger than one buffer goes out as a chain.
                let Some(p) = pool.alloc_chain(&frames[next], usize::MAX) else { break };
                pending.push(p);
                next += 1;
            }
            if !pending.is_empty() {
                self.qp.tx.tx_burst(&mut pending);
            } else {
                self.qp.tx.reclaim();
            }
            self.qp.rx.rx_burst(&mut batch, BURST);
            got.extend(batch.drain(..).map(|p| p.data().to_vec()));
            if Instant::now() >= deadline {
                let back: Vec<u32> = got.iter().filter_map(|f| seq_of(f)).collect();
                let missing: Vec<u32> = (0..frames.len() as u32).filter(|s| !back.contains(s)).collect();
                panic!(
                    "missing test frames (by sequence number): {missing:?}\n\
                     queued {} of {} frames, received {} of {expect} before the deadline; our port: \
                     tx in flight {}, rx posted {}, stats {:?}, tx error {:?}, rx error {:?}\n{}",
                    next - pending.len(),
                    frames.len(),
                    got.len(),
                    self.qp.tx.in_flight(),
                    self.qp.rx.in_flight(),
                    self.port.stats(),
                    self.qp.tx.error(),
                    self.qp.rx.error(),
                    diag()
                );
            }
        }
        let mut last = Instant::now();
        while last.elapsed() < QUIET {
            self.qp.tx.reclaim();
            if self.qp.rx.rx_burst(&mut batch, BURST) > 0 {
                got.extend(batch.drain(..).map(|p| p.data().to_vec()));
                last = Instant::now();
            }
        }
        got
    }

    /// Closes the port (bounded); every buffer must be back in the pool.
    fn close(self) {
        let pool = self.port.pool().clone();
        let Peer { port, qp } = self;
        within("Port::close", Duration::from_secs(20), move || port.close(vec![qp]))
            .unwrap_or_else(|e| panic!("Port::close: {e}"));
        assert_eq!(pool.available(), pool.capacity(), "buffers missing from the peer's pool after close");
    }
}

/// The Internet checksum (RFC 1071), written here independently of the driver's.
fn csum(data: &[u8]) -> u16 {
    let mut sum: u64 = 0;
    for (i, b) in data.iter().enumerate() {
        sum += if i % 2 == 0 { (*b as u64) << 8 } else { *b as u64 };
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn put_csum(buf: &mut [u8], at: usize, range: std::ops::Range<usize>) {
    buf[at..at + 2].copy_from_slice(&[0, 0]);
    let c = csum(&buf[range]);
    buf[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// A UDP/IPv4 test frame of `len` bytes whose payload starts with `seq` and then varies
/// with it, from `src` to `dst`.
fn test_frame(len: usize, dst: [u8; 6], src: [u8; 6], seq: u32) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip_len = (len - 14) as u16;
    f[14] = 0x45;
    f[16..18].copy_from_slice(&ip_len.to_be_bytes());
    f[22] = 64;
    f[23] = 17;
    f[26..30].copy_from_slice(&[10, 1, 0, 1]);
    f[30..34].copy_from_slice(&[10, 1, 0, 2]);
    put_csum(&mut f, 24, 14..34);
    f[34..36].copy_from_slice(&4000u16.to_be_bytes());
    f[36..38].copy_from_slice(&4001u16.to_be_bytes());
    f[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f[42..46].copy_from_slice(&seq.to_le_bytes());
    for (i, b) in f[46..].iter_mut().enumerate() {
        *b = (i as u32).wrapping_mul(31).wrapping_add(seq.wrapping_mul(7)) as u8;
    }
    f
}

/// The sequence number of a [`test_frame`].
fn seq_of(f: &[u8]) -> Option<u32> {
    (f.len() >= 46 && f[12..14] == [0x08, 0x00] && f[23] == 17)
        .then(|| u32::from_le_bytes([f[42], f[43], f[44], f[45]]))
}

/// `n` test frames of lengths spread over 60..=1514, from `src` to `dst`.
fn test_frames(n: u32, dst: [u8; 6], src: [u8; 6]) -> Vec<Vec<u8>> {
    (0..n).map(|s| test_frame(60 + (s as usize * 7919) % 1455, dst, src, s)).collect()
}

/// Starts testpmd on `args` and waits until it forwards; reads port 0's MAC.
fn start_forwarding(args: &[&str]) -> (Testpmd, [u8; 6]) {
    let mut tp = Testpmd::spawn(args);
    tp.wait_stdout(FORWARDING, Duration::from_secs(20));
    let mac =
        port_mac(&tp.stdout(), 0).unwrap_or_else(|| panic!("no MAC address for port 0\n{}", tp.outputs()));
    (tp, mac)
}

/// What testpmd printed (with `--stats-period 1`: its port counters every second) and
/// the backend's latest statistics.
fn diag(tp: &Testpmd, backend: &Backend) -> String {
    // SIGINT makes it print its forward statistics.
    tp.signal(libc::SIGINT);
    thread::sleep(Duration::from_secs(1));
    format!("backend stats: {:?}\nbackend log:\n{}\n{}", backend.latest_stats(), backend.log(), tp.outputs())
}

/// Stops a testpmd that forwards until a signal (SIGINT), expecting exit 0.
fn interrupt(tp: Testpmd) -> Exit {
    tp.signal(libc::SIGINT);
    let exit = tp.wait(Duration::from_secs(20));
    assert_ok(&exit);
    exit
}

// ------------------------------------------------------------------------------ 1. rejected input

/// Command lines testpmd rejects before touching any port: one stderr line naming the
/// problem, exit 1 (exit 2 for what the option parser itself rejects, like clap).
#[test]
fn rejects_bad_command_lines() {
    let _serial = serial();
    let e = run(&["--forward-mode", "warp"], REJECT_TIMEOUT);
    assert_rejected(
        &e,
        1,
        &["unknown forwarding mode 'warp'", "io, mac, macswap, rxonly, txonly, flowgen, icmpecho"],
    );

    let e = run(&["--bogus-option"], REJECT_TIMEOUT);
    assert_rejected(&e, 2, &["'--bogus-option'"]);

    let e = run(&["--txpkts", "59"], REJECT_TIMEOUT);
    assert_rejected(&e, 1, &["--txpkts 59", "60-byte"]);

    let e = run(&["--vdev", "virtio_user0,path=/nonexistent/x.sock"], REJECT_TIMEOUT);
    assert_rejected(&e, 1, &["/nonexistent/x.sock", "no such socket"]);
}

/// `packed_vq=1` against a back-end that does not offer `VIRTIO_F_RING_PACKED` (our
/// backend with `--no-packed`) is one error line naming the feature, exit code 1;
/// `packed_vq=0` is the default and opens the split rings as before; a bad value is
/// rejected; against a back-end that offers it (our backend's default), `packed_vq=1`
/// forwards and the sink counts exactly what testpmd sent.
#[test]
fn packed_vq_needs_the_feature() {
    let _serial = serial();
    let dir = TempDir::new("tp-packed");
    let sock = dir.join("sink.sock");
    let backend = Backend::start(&["--port", &port_arg("sink", &sock), "--no-packed"]);
    let vd = vdev(0, &sock);

    let e = run(&["--vdev", &format!("{vd},packed_vq=1"), "--forward-mode", "txonly"], REJECT_TIMEOUT);
    assert_rejected(&e, 1, &["VIRTIO_F_RING_PACKED"]);
    let e = run(&["--vdev", &format!("{vd},packed_vq=2")], REJECT_TIMEOUT);
    assert_rejected(&e, 1, &["packed_vq must be 0 or 1"]);
    let ok = run(
        &["--vdev", &format!("{vd},packed_vq=0"), "--forward-mode", "txonly", "--duration", "0.5"],
        RUN_TIMEOUT,
    );
    assert_ok(&ok);
    let f = fwd(&ok.stdout, 0);
    let fin = backend.stop();
    let dev = clean_device(&fin, &sock);
    assert!(f.tx_packets > 0, "nothing sent: {f:?}\n{ok}");
    assert_eq!(counter(dev, "rx_packets"), f.tx_packets, "sink count vs testpmd TX-packets\n{ok}");

    let sock = dir.join("sink-packed.sock");
    let backend = Backend::start(&["--port", &port_arg("sink", &sock)]);
    let vd = vdev(0, &sock);
    let ok = run(
        &["--vdev", &format!("{vd},packed_vq=1"), "--forward-mode", "txonly", "--duration", "0.5"],
        RUN_TIMEOUT,
    );
    assert_ok(&ok);
    let f = fwd(&ok.stdout, 0);
    let fin = backend.stop();
    let dev = clean_device(&fin, &sock);
    assert!(f.tx_packets > 0, "nothing sent on packed rings: {f:?}\n{ok}");
    assert_eq!(counter(dev, "rx_packets"), f.tx_packets, "sink count vs testpmd TX-packets (packed)\n{ok}");
}

/// `--txpkts` above the port's MTU + 14 is rejected once the port reports its MTU
/// (1000 here); exactly MTU + 14 is accepted and every frame the sink counts has that
/// length.
#[test]
fn rejects_txpkts_above_the_port_mtu() {
    let _serial = serial();
    let dir = TempDir::new("tp-mtu");
    let sock = dir.join("sink.sock");
    let backend = Backend::start(&["--port", &port_arg("sink", &sock), "--mtu", "1000"]);
    let vd = vdev(0, &sock);

    let e = run(&["--vdev", &vd, "--forward-mode", "txonly", "--txpkts", "1100"], REJECT_TIMEOUT);
    assert_rejected(&e, 1, &["--txpkts 1100", "MTU 1000"]);

    let ok = run(
        &["--vdev", &vd, "--forward-mode", "txonly", "--txpkts", "1014", "--duration", "0.5"],
        RUN_TIMEOUT,
    );
    assert_ok(&ok);
    let f = fwd(&ok.stdout, 0);
    assert!(f.tx_packets > 0, "nothing sent: {f:?}\n{ok}");

    let fin = backend.stop();
    let dev = clean_device(&fin, &sock);
    assert_eq!(counter(dev, "rx_packets"), f.tx_packets, "sink count vs testpmd TX-packets\n{ok}");
    assert_eq!(counter(dev, "rx_bytes"), f.tx_packets * 1014, "every frame is 1014 bytes");
}

/// A socket inside a directory of mode 000: connecting is denied. Root bypasses file
/// permissions, so as root this testpmd runs as user `nobody` (uid and gid switched,
/// supplementary groups cleared, like `setpriv --reuid nobody --regid nogroup
/// --clear-groups`); the path up to the locked directory stays searchable for it.
#[test]
fn rejects_a_socket_it_may_not_open() {
    use std::os::unix::fs::PermissionsExt;
    let _serial = serial();
    let dir = TempDir::new("tp-perm");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).expect("chmod tempdir");
    let locked = dir.join("locked");
    std::fs::create_dir(&locked).expect("mkdir locked");
    let sock = locked.join("s.sock");
    let backend = Backend::start(&["--port", &port_arg("sink", &sock)]);
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).expect("chmod 000");

    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 { Some(nobody()) } else { None };
    let vd = vdev(0, &sock);
    let e = Testpmd::spawn_with(&["--vdev", &vd], Spawn { stdin: false, user }).wait(REJECT_TIMEOUT);
    assert_rejected(&e, 1, &[&sock.display().to_string(), "Permission denied"]);

    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o700)).expect("chmod back");
    let fin = backend.stop();
    let dev = clean_device(&fin, &sock);
    assert_eq!(counter(dev, "rx_packets"), 0);
}

/// (uid, gid) of user `nobody`.
fn nobody() -> (u32, u32) {
    // SAFETY: getpwnam takes a NUL-terminated name and returns a pointer into static
    // storage (or null); we copy the two ids out immediately, single-threaded use here
    // is serialised by the test lock.
    unsafe {
        let pw = libc::getpwnam(c"nobody".as_ptr());
        assert!(!pw.is_null(), "no user 'nobody' on this system: cannot test permission checks as root");
        ((*pw).pw_uid, (*pw).pw_gid)
    }
}

/// Two queue pairs against a device started with `--queues 1`: the device does not
/// offer VIRTIO_NET_F_MQ, so the port cannot open.
#[test]
fn rejects_multiqueue_on_a_single_queue_device() {
    let _serial = serial();
    let dir = TempDir::new("tp-mq");
    let sock = dir.join("sink.sock");
    let backend = Backend::start(&["--port", &port_arg("sink", &sock), "--queues", "1"]);
    let e = run(&["--vdev", &vdev(0, &sock), "--rxq", "2", "--txq", "2"], REJECT_TIMEOUT);
    assert_rejected(&e, 1, &["VIRTIO_NET_F_MQ", &sock.display().to_string()]);
    let fin = backend.stop();
    clean_device(&fin, &sock);
}

// ------------------------------------------------------------------------------ 2. forwarding modes

/// txonly into a `sink`: the sink counts exactly the frames testpmd reports as sent
/// (TX-packets), all `--txpkts` long; testpmd receives nothing.
///
/// (TX-packets counts frames placed in the ring, and testpmd resets the device at exit
/// without waiting for the ring to drain; the busy-polling sink empties a 256-entry ring
/// in microseconds, long before testpmd has printed its statistics and closed the port.)
#[test]
fn txonly_sink_counts_exactly_what_testpmd_sent() {
    let _serial = serial();
    let dir = TempDir::new("tp-txonly-sink");
    let sock = dir.join("sink.sock");
    let backend = Backend::start(&["--port", &port_arg("sink", &sock)]);
    let exit = run(
        &["--vdev", &vdev(0, &sock), "--forward-mode", "txonly", "--txpkts", "128", "--duration", "2"],
        RUN_TIMEOUT,
    );
    assert_ok(&exit);
    let f = fwd(&exit.stdout, 0);
    assert_eq!((f.rx_packets, f.rx_dropped), (0, 0), "{exit}");
    assert!(f.tx_packets > 1000, "txonly hardly sent anything: {f:?}");
    let fin = backend.stop();
    let dev = clean_device(&fin, &sock);
    assert_eq!(counter(dev, "rx_packets"), f.tx_packets, "sink rx_packets vs testpmd TX-packets\n{exit}");
    assert_eq!(counter(dev, "rx_bytes"), f.tx_packets * 128);
    assert_eq!(counter(dev, "tx_packets"), 0);
    // DPDK's exit statistics in a non-interactive run: the NIC statistics block, the
    // driver's count of what the device took.
    let nic = nic_stats(&exit.stdout, 0).unwrap_or_else(|| panic!("no NIC statistics at exit\n{exit}"));
    assert_eq!((nic.tx_packets, nic.tx_bytes), (f.tx_packets, f.tx_packets * 128), "{exit}");
    assert_eq!((nic.rx_packets, nic.rx_errors), (0, 0), "{exit}");
}

/// txonly through `xconnect:A,B` into our driver on B: every frame is exactly
/// `--txpkts` bytes, byte-identical to the first, a valid UDP/IPv4 frame (checksums
/// included) from testpmd's port MAC to the `--eth-peer` MAC, 198.18.0.1:9 ->
/// 198.18.0.2:9. The driver receives exactly what the backend moved; testpmd's count
/// exceeds that only by what was still in A's transmit ring when it reset the device.
#[test]
fn txonly_frames_are_valid_udp_ipv4() {
    const LEN: usize = 200;
    const PEER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
    let _serial = serial();
    let dir = TempDir::new("tp-txonly-x");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let backend = Backend::start(&["--port", &xconnect_arg(&a, &b)]);
    let mut peer = Peer::open(&b);
    let mut tp = Testpmd::spawn(&[
        "--vdev",
        &vdev(0, &a),
        "--forward-mode",
        "txonly",
        "--txpkts",
        &LEN.to_string(),
        "--eth-peer",
        "0,02:00:00:00:00:99",
        "--duration",
        "2",
    ]);

    let deadline = Instant::now() + TRAFFIC_TIMEOUT;
    let mut batch = Vec::with_capacity(BURST);
    let mut first: Option<Vec<u8>> = None;
    let (mut count, mut bad) = (0u64, 0u64);
    let mut bad_sample = None;
    let mut last = Instant::now();
    loop {
        if peer.qp.rx.rx_burst(&mut batch, BURST) == 0 {
            if !tp.running() && last.elapsed() > QUIET {
                break;
            }
            assert!(Instant::now() < deadline, "testpmd still running at the deadline\n{}", tp.outputs());
            continue;
        }
        last = Instant::now();
        for p in batch.drain(..) {
            count += 1;
            let d = p.data();
            match &first {
                None => first = Some(d.to_vec()),
                Some(f) if f.as_slice() == d => {}
                Some(_) => {
                    bad += 1;
                    bad_sample.get_or_insert_with(|| d.to_vec());
                }
            }
        }
    }
    let exit = tp.wait(Duration::from_secs(10));
    assert_ok(&exit);
    let f = fwd(&exit.stdout, 0);
    let mac = port_mac(&exit.stdout, 0).expect("port 0 MAC");

    assert_eq!(bad, 0, "{bad} of {count} frames differ from the first; one: {bad_sample:02x?}");
    let fr = first.unwrap_or_else(|| panic!("no frame arrived\n{exit}"));
    assert_eq!(fr.len(), LEN, "frame length: {fr:02x?}");
    assert!(driver::frame::valid_udp4(&fr), "not a valid UDP/IPv4 frame: {fr:02x?}");
    assert_eq!(csum(&fr[14..34]), 0, "IPv4 header checksum");
    assert_eq!(&fr[0..6], &PEER, "destination MAC = --eth-peer");
    assert_eq!(&fr[6..12], &mac, "source MAC = testpmd's port MAC");
    assert_eq!(&fr[12..14], &[0x08, 0x00], "EtherType IPv4");
    assert_eq!(u16::from_be_bytes([fr[16], fr[17]]) as usize, LEN - 14, "IPv4 total length");
    assert_eq!(fr[23], 17, "protocol UDP");
    assert_eq!((&fr[26..30], &fr[30..34]), (&[198, 18, 0, 1][..], &[198, 18, 0, 2][..]), "addresses");
    assert_eq!((&fr[34..36], &fr[36..38]), (&[0, 9][..], &[0, 9][..]), "ports");
    assert_eq!(u16::from_be_bytes([fr[38], fr[39]]) as usize, LEN - 34, "UDP length");
    // The payload is written once per buffer (testpmd pre-fills its pool), not per frame.
    let pattern: Vec<u8> = (0..LEN - 42).map(|i| i as u8).collect();
    assert_eq!(&fr[42..], &pattern[..], "txonly payload");

    peer.close();
    let fin = backend.stop();
    let (da, db) = (clean_device(&fin, &a), clean_device(&fin, &b));
    assert_eq!(counter(da, "rx_packets"), counter(db, "tx_packets"), "backend moved A -> B");
    assert_eq!(counter(db, "tx_packets"), count, "the driver received every frame the backend delivered");
    assert_eq!(counter(db, "tx_bytes"), count * LEN as u64);
    assert_eq!((counter(db, "rx_packets"), counter(da, "tx_packets")), (0, 0), "nothing went B -> A");
    assert_eq!((f.rx_packets, f.rx_dropped), (0, 0));
    let left = f.tx_packets.checked_sub(count).unwrap_or_else(|| {
        panic!("the driver received {count} frames, more than testpmd sent ({})", f.tx_packets)
    });
    eprintln!("txonly: testpmd sent {}, received {count}, left in A's ring at reset: {left}", f.tx_packets);
    assert!(left <= RING, "{left} frames lost: more than A's transmit ring holds\n{exit}");
}

/// macswap: our driver on B sends 2000 distinct frames (60..=1514 bytes) through
/// `xconnect:A,B` to testpmd on A, which sends each back; every one returns once, in
/// order, with source and destination MACs swapped and every other byte equal.
#[test]
fn macswap_returns_every_frame_with_macs_swapped() {
    const N: u32 = 2000;
    let _serial = serial();
    let dir = TempDir::new("tp-macswap");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let backend = Backend::start(&["--port", &xconnect_arg(&a, &b)]);
    let mut peer = Peer::open(&b);
    let (tp, _) =
        start_forwarding(&["--vdev", &vdev(0, &a), "--forward-mode", "macswap", "--stats-period", "1"]);

    let frames = test_frames(N, [0x02, 0, 0, 0, 0xaa, 0x01], [0x02, 0, 0, 0, 0xbb, 0x02]);
    let got = peer.exchange(&frames, N as usize, &|| diag(&tp, &backend));
    assert_eq!(got.len(), N as usize, "frames back");
    for (i, (sent, back)) in frames.iter().zip(&got).enumerate() {
        let mut want = sent.clone();
        want[0..6].copy_from_slice(&sent[6..12]);
        want[6..12].copy_from_slice(&sent[0..6]);
        assert_eq!(back, &want, "frame {i} (len {}) did not come back MAC-swapped", sent.len());
    }

    let exit = interrupt(tp);
    let f = fwd(&exit.stdout, 0);
    assert_eq!(f, PortCounts { rx_packets: N as u64, rx_dropped: 0, tx_packets: N as u64, tx_dropped: 0 });
    peer.close();
    let fin = backend.stop();
    let bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
    for s in [&a, &b] {
        let d = clean_device(&fin, s);
        assert_eq!((counter(d, "rx_packets"), counter(d, "tx_packets")), (N as u64, N as u64), "{d}");
        assert_eq!((counter(d, "rx_bytes"), counter(d, "tx_bytes")), (bytes, bytes), "{d}");
    }
}

/// mac: every frame comes back with destination = the `--eth-peer` MAC and source =
/// testpmd's port MAC, the rest unchanged.
#[test]
fn mac_mode_rewrites_both_addresses() {
    const N: u32 = 500;
    const PEER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x42];
    let _serial = serial();
    let dir = TempDir::new("tp-mac");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let backend = Backend::start(&["--port", &xconnect_arg(&a, &b)]);
    let mut peer = Peer::open(&b);
    let (tp, mac) = start_forwarding(&[
        "--vdev",
        &vdev(0, &a),
        "--forward-mode",
        "mac",
        "--eth-peer",
        "0,02:00:00:00:00:42",
        "--stats-period",
        "1",
    ]);

    let frames = test_frames(N, [0x02, 0, 0, 0, 0xaa, 0x01], [0x02, 0, 0, 0, 0xbb, 0x02]);
    let got = peer.exchange(&frames, N as usize, &|| diag(&tp, &backend));
    assert_eq!(got.len(), N as usize, "frames back");
    for (i, (sent, back)) in frames.iter().zip(&got).enumerate() {
        let mut want = sent.clone();
        want[0..6].copy_from_slice(&PEER);
        want[6..12].copy_from_slice(&mac);
        assert_eq!(back, &want, "frame {i}");
    }
    let exit = interrupt(tp);
    assert_eq!(
        fwd(&exit.stdout, 0),
        PortCounts { rx_packets: N as u64, rx_dropped: 0, tx_packets: N as u64, tx_dropped: 0 }
    );
    peer.close();
    let fin = backend.stop();
    clean_device(&fin, &a);
    clean_device(&fin, &b);
}

/// Hand-built ARP request (RFC 826) for `tpa` from `sha`/`spa`, padded to 60 bytes with
/// 0xee.
fn arp_request(sha: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xeeu8; 60];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&sha);
    f[12..14].copy_from_slice(&[0x08, 0x06]);
    f[14..22].copy_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&sha);
    f[28..32].copy_from_slice(&spa);
    f[32..38].copy_from_slice(&[0; 6]);
    f[38..42].copy_from_slice(&tpa);
    f
}

/// Hand-built ICMP echo request (RFC 792): 56 payload bytes, identifier 0xbeef.
fn echo_request(dst: [u8; 6], src: [u8; 6], sip: [u8; 4], dip: [u8; 4], seq: u16) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 8 + 56];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = [0x45, 0, 0, 84, 0x12, 0x34, 0x40, 0, 64, 1, 0, 0];
    f[14..26].copy_from_slice(&ip);
    f[26..30].copy_from_slice(&sip);
    f[30..34].copy_from_slice(&dip);
    put_csum(&mut f, 24, 14..34);
    f[34] = 8;
    f[35] = 0;
    f[38..40].copy_from_slice(&0xbeefu16.to_be_bytes());
    f[40..42].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in f[42..].iter_mut().enumerate() {
        *b = 0x30 + i as u8;
    }
    put_csum(&mut f, 36, 34..98);
    f
}

/// icmpecho: testpmd on A answers an ARP request for any address with its port MAC
/// and ICMP echo requests to its MAC or broadcast; everything else is dropped. The
/// replies are checked byte for byte against replies built here by hand.
#[test]
fn icmpecho_answers_arp_and_echo_requests() {
    let _serial = serial();
    let dir = TempDir::new("tp-icmpecho");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let backend = Backend::start(&["--port", &xconnect_arg(&a, &b)]);
    let mut peer = Peer::open(&b);
    let me = peer.mac();
    let (tp, them) =
        start_forwarding(&["--vdev", &vdev(0, &a), "--forward-mode", "icmpecho", "--stats-period", "1"]);
    assert_ne!(me, them);
    let (my_ip, their_ip) = ([192, 0, 2, 1], [192, 0, 2, 2]);

    let arp = arp_request(me, my_ip, their_ip);
    let echo = echo_request(them, me, my_ip, their_ip, 7);
    let echo_bcast = echo_request([0xff; 6], me, my_ip, their_ip, 8);
    let mut arp_reply_in = arp.clone();
    arp_reply_in[21] = 2; // an ARP reply: not a request, dropped
    let echo_other = echo_request([0x02, 9, 9, 9, 9, 9], me, my_ip, their_ip, 9); // not its MAC: dropped
    let udp = test_frame(100, them, me, 1); // not ARP/ICMP: dropped
    let sent = vec![arp.clone(), echo.clone(), arp_reply_in, udp, echo_other, echo_bcast.clone()];
    let got = peer.exchange(&sent, 3, &|| diag(&tp, &backend));

    // ARP reply: to the requester, from testpmd's MAC; op 2; sender = testpmd's MAC and
    // the address asked for; target = the requester; padding unchanged.
    let mut want_arp = arp.clone();
    want_arp[0..6].copy_from_slice(&me);
    want_arp[6..12].copy_from_slice(&them);
    want_arp[21] = 2;
    want_arp[22..28].copy_from_slice(&them);
    want_arp[28..32].copy_from_slice(&their_ip);
    want_arp[32..38].copy_from_slice(&me);
    want_arp[38..42].copy_from_slice(&my_ip);

    // Echo reply: MACs and IPs swapped, type 0, both checksums recomputed; identifier,
    // sequence and payload unchanged.
    let want_echo = |req: &[u8]| {
        let mut w = req.to_vec();
        w[0..6].copy_from_slice(&me);
        w[6..12].copy_from_slice(&them);
        w[26..30].copy_from_slice(&their_ip);
        w[30..34].copy_from_slice(&my_ip);
        put_csum(&mut w, 24, 14..34);
        w[34] = 0;
        put_csum(&mut w, 36, 34..98);
        w
    };
    assert_eq!(got.len(), 3, "replies: {got:02x?}");
    assert_eq!(got[0], want_arp, "ARP reply");
    for (reply, req) in [(&got[1], &echo), (&got[2], &echo_bcast)] {
        assert_eq!(reply, &want_echo(req), "ICMP echo reply");
        assert_eq!(csum(&reply[14..34]), 0, "IPv4 header checksum");
        assert_eq!(csum(&reply[34..]), 0, "ICMP checksum");
        assert_eq!(&reply[38..], &req[38..], "identifier, sequence and payload");
    }

    let exit = interrupt(tp);
    let f = fwd(&exit.stdout, 0);
    // RX-packets counts every frame received, RX-dropped the ones the engine dropped.
    assert_eq!(f, PortCounts { rx_packets: 6, rx_dropped: 3, tx_packets: 3, tx_dropped: 0 }, "{exit}");
    peer.close();
    let fin = backend.stop();
    let (da, db) = (clean_device(&fin, &a), clean_device(&fin, &b));
    assert_eq!((counter(db, "rx_packets"), counter(da, "tx_packets")), (6, 6));
    assert_eq!((counter(da, "rx_packets"), counter(db, "tx_packets")), (3, 3));
    // DPDK's RX-total is every frame that reached the port (RX-packets + the port's
    // misses): 6 here. RX-dropped counts frames already in RX-packets, so adding them
    // again would count the 3 dropped frames twice.
    assert_eq!(forward_totals(&exit.stdout, 0), Some((6, 3)), "RX-total / TX-total\n{exit}");
}

/// io between the two devices of one `xconnect`, `--tx-first 4 --duration 2`.
///
/// Streams: port 0 RX -> port 1 TX and port 1 RX -> port 0 TX. With the xconnect (A's
/// TX to B's RX and back) that makes two closed loops, each seeded with 4 bursts of 32
/// (I = 128) frames by tx_first on its transmitting port:
///   loop 0: port 0 TX -> backend A->B -> port 1 RX -> (stream 1) -> port 0 TX
///   loop 1: port 1 TX -> backend B->A -> port 0 RX -> (stream 0) -> port 1 TX
/// io forwards every frame it receives (RX-dropped 0); 128 frames never fill a 256-entry
/// ring (TX-dropped 0); the backend applies backpressure (no drop). So every frame is
/// kept, and at stop each loop's I frames are in flight (in a ring, between a TX and an
/// RX count):
///   TX-packets(0) = RX-packets(1) + I,   TX-packets(1) = RX-packets(0) + I,
///   total TX = total RX + 2 I.
/// Backend: A.rx = B.tx and B.rx = A.tx (it moves every frame it takes), and between
/// the two testpmd counts of its loop: RX-packets(1) <= B.tx and A.rx <= TX-packets(0)
/// (the I in-flight frames of a loop were either still in the transmit ring or already
/// in the receive ring when testpmd reset the devices).
#[test]
fn io_between_two_ports_keeps_every_packet() {
    io_between_two_ports(&[], &[]);
}

/// The same with the loop probes on both sides (`--prefetch-tx` and `--idle-pause` on the
/// backend, `--idle-pause` on testpmd): they change no count.
#[test]
fn io_between_two_ports_with_the_probes_on() {
    io_between_two_ports(&["--prefetch-tx", "--idle-pause", "16"], &["--idle-pause", "16"]);
}

fn io_between_two_ports(backend_extra: &[&str], pmd_extra: &[&str]) {
    const I: u64 = 4 * 32;
    let _serial = serial();
    let dir = TempDir::new("tp-io2");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let backend = Backend::start(&[&["--port", &xconnect_arg(&a, &b)], backend_extra].concat());
    let args = [
        "--vdev",
        &vdev(0, &a),
        "--vdev",
        &vdev(1, &b),
        "--forward-mode",
        "io",
        "--tx-first",
        "4",
        "--duration",
        "2",
        "--stats-format",
        "json",
    ];
    let exit = run(&[&args[..], pmd_extra].concat(), RUN_TIMEOUT);
    assert_ok(&exit);
    let log = backend.log();
    let fin = backend.stop();
    // First: every buffer testpmd posted was one the device may read (a frame received
    // on one port and sent on the other must still be in that device's memory).
    let (da, db) = (device(&fin, &a), device(&fin, &b));
    // At exit testpmd resets one port before the other: what the second still had in
    // its transmit ring then has no receive ring to go to and is dropped as peer_down
    // (counted on the sending device, as received from it). Nothing else is dropped.
    let (pd_a, pd_b) = (counter(da, "drops.peer_down"), counter(db, "drops.peer_down"));
    for d in [da, db] {
        assert_eq!(
            counter(d, "broken_queues"),
            0,
            "backend marked a queue broken: {d}\nbackend log:\n{log}\n{exit}"
        );
        assert_eq!(
            total_drops(d),
            counter(d, "drops.peer_down"),
            "backend dropped frames: {d}\nbackend log:\n{log}"
        );
    }
    assert!(pd_a <= I && pd_b <= I, "more peer_down than frames in flight: {pd_a} {pd_b}");
    let js = forward_stats_json(&exit.stdout).unwrap_or_else(|| panic!("no forward_stats JSON line\n{exit}"));
    let p = json_port_counts(&js);
    assert_eq!(p.len(), 2, "{js}");
    for (i, c) in p.iter().enumerate() {
        assert_eq!((c.rx_dropped, c.tx_dropped), (0, 0), "port {i}: {js}");
        assert!(c.rx_packets > 10_000, "port {i}: the loop hardly ran: {js}");
    }
    assert_eq!(p[0].tx_packets, p[1].rx_packets + I, "loop 0: {js}");
    assert_eq!(p[1].tx_packets, p[0].rx_packets + I, "loop 1: {js}");
    let (tx, rx) = (p[0].tx_packets + p[1].tx_packets, p[0].rx_packets + p[1].rx_packets);
    assert_eq!(tx, rx + 2 * I, "total TX = total RX + in flight");

    let (a_rx, a_tx, b_rx, b_tx) = (
        counter(da, "rx_packets"),
        counter(da, "tx_packets"),
        counter(db, "rx_packets"),
        counter(db, "tx_packets"),
    );
    assert_eq!(a_rx, b_tx + pd_a, "backend: A's TX all went to B (or was dropped at exit)");
    assert_eq!(b_rx, a_tx + pd_b, "backend: B's TX all went to A (or was dropped at exit)");
    eprintln!("io: testpmd {p:?}; backend A rx {a_rx} tx {a_tx}, B rx {b_rx} tx {b_tx}");
    assert!(
        p[1].rx_packets <= b_tx && a_rx <= p[0].tx_packets,
        "loop 0: port1 RX {} <= backend A->B {a_rx} <= port0 TX {}",
        p[1].rx_packets,
        p[0].tx_packets
    );
    assert!(
        p[0].rx_packets <= a_tx && b_rx <= p[1].tx_packets,
        "loop 1: port0 RX {} <= backend B->A {b_rx} <= port1 TX {}",
        p[0].rx_packets,
        p[1].tx_packets
    );
    // Bytes: tx_first frames are 64 bytes and io does not change lengths.
    assert_eq!(counter(da, "rx_bytes"), a_rx * 64);
    assert_eq!(counter(db, "rx_bytes"), b_rx * 64);
}

/// flowgen through `xconnect:A,B` into our driver: valid UDP/IPv4 frames of `--txpkts`
/// bytes whose destination address walks exactly `--flowgen-flows` flows.
#[test]
fn flowgen_frames_cover_every_flow() {
    const LEN: usize = 90;
    const FLOWS: u64 = 8;
    let _serial = serial();
    let dir = TempDir::new("tp-flowgen");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let backend = Backend::start(&["--port", &xconnect_arg(&a, &b)]);
    let mut peer = Peer::open(&b);
    let mut tp = Testpmd::spawn(&[
        "--vdev",
        &vdev(0, &a),
        "--forward-mode",
        "flowgen",
        "--txpkts",
        &LEN.to_string(),
        "--flowgen-flows",
        &FLOWS.to_string(),
        "--duration",
        "1",
    ]);
    let deadline = Instant::now() + TRAFFIC_TIMEOUT;
    let mut batch = Vec::with_capacity(BURST);
    let mut flows = std::collections::BTreeSet::new();
    let (mut count, mut invalid) = (0u64, Vec::new());
    let mut last = Instant::now();
    loop {
        if peer.qp.rx.rx_burst(&mut batch, BURST) == 0 {
            if !tp.running() && last.elapsed() > QUIET {
                break;
            }
            assert!(Instant::now() < deadline, "testpmd still running at the deadline\n{}", tp.outputs());
            continue;
        }
        last = Instant::now();
        for p in batch.drain(..) {
            count += 1;
            let d = p.data();
            if d.len() != LEN || !driver::frame::valid_udp4(d) || d[30..32] != [198, 18] {
                if invalid.len() < 3 {
                    invalid.push(d.to_vec());
                }
                continue;
            }
            flows.insert(u16::from_be_bytes([d[32], d[33]]) as u64);
        }
    }
    let exit = tp.wait(Duration::from_secs(10));
    assert_ok(&exit);
    assert!(invalid.is_empty(), "invalid frames: {invalid:02x?}");
    assert_eq!(flows, (0..FLOWS).collect(), "flows seen");
    peer.close();
    let fin = backend.stop();
    let db = clean_device(&fin, &b);
    assert_eq!(counter(db, "tx_packets"), count);
    let f = fwd(&exit.stdout, 0);
    assert!(count <= f.tx_packets && f.tx_packets - count <= RING, "sent {} received {count}", f.tx_packets);
}

// ------------------------------------------------------------------------------ 3. interactive

/// A `gen` backend producing `count` frames of `len` bytes on a socket in `dir`, and our
/// testpmd at its prompt (`-i`, rxonly) on it: the start of the prompt tests.
fn gen_and_prompt(dir: &TempDir, count: u64, len: u64) -> (std::path::PathBuf, Backend, Testpmd) {
    let sock = dir.join("gen.sock");
    let backend = Backend::start(&[
        "--port",
        &port_arg("gen", &sock),
        "--count",
        &count.to_string(),
        "--pkt-size",
        &len.to_string(),
    ]);
    let mut tp = Testpmd::spawn_with(
        &["-i", "--vdev", &vdev(0, &sock), "--forward-mode", "rxonly"],
        Spawn { stdin: true, user: None },
    );
    tp.wait_stdout("testpmd> ", Duration::from_secs(20));
    (sock, backend, tp)
}

/// The prompt over a pipe: `start`, `show port stats all`, `stop`, `quit` with rxonly
/// against a `gen` port that makes exactly 1000 frames of 100 bytes.
#[test]
fn interactive_prompt_over_stdin() {
    const N: u64 = 1000;
    let _serial = serial();
    let dir = TempDir::new("tp-interactive");
    let (sock, backend, mut tp) = gen_and_prompt(&dir, N, 100);
    tp.send("start");
    tp.wait_stdout("rxonly packet forwarding - ports=1", Duration::from_secs(10));
    backend.wait_stats(Duration::from_secs(20), |s| counter(device(s, &sock), "tx_packets") == N);
    // Everything is in the receive ring; give the forwarding thread a moment.
    thread::sleep(Duration::from_millis(300));
    tp.send("show port stats all");
    tp.wait_stdout("NIC statistics for port 0", Duration::from_secs(10));
    tp.send("stop");
    tp.wait_stdout("Forward statistics for port 0", Duration::from_secs(10));
    tp.send("quit");
    let exit = tp.wait(Duration::from_secs(20));
    assert_ok(&exit);

    let nic = nic_stats(&exit.stdout, 0).unwrap_or_else(|| panic!("no NIC statistics\n{exit}"));
    assert_eq!((nic.rx_packets, nic.rx_bytes), (N, N * 100), "{exit}");
    assert_eq!((nic.rx_errors, nic.rx_nombuf, nic.tx_packets, nic.tx_bytes), (0, 0, 0, 0), "{exit}");
    assert_eq!(
        fwd(&exit.stdout, 0),
        PortCounts { rx_packets: N, rx_dropped: 0, tx_packets: 0, tx_dropped: 0 }
    );
    assert!(accumulated_forward_stats(&exit.stdout).is_some(), "no accumulated block\n{exit}");
    for cmd in ["start", "show port stats all", "stop", "quit"] {
        assert!(exit.stdout.contains(&format!("testpmd> {cmd}\n")), "prompt echo of {cmd:?}\n{exit}");
    }
    assert!(exit.stdout.contains("Bye..."), "{exit}");
    let fin = backend.stop();
    let dev = clean_device(&fin, &sock);
    assert_eq!(counter(dev, "generated"), N);
}

// ------------------------------------------------------------------------------ 4. embedded default

/// No port option: the embedded reflect loop runs, checks its own accounting and says
/// so; the printed numbers agree with each other.
#[test]
fn embedded_default_accounts_for_every_packet() {
    let _serial = serial();
    let exit = run(&["--duration", "2"], RUN_TIMEOUT);
    assert_ok(&exit);
    let out = &exit.stdout;
    assert!(out.contains("unaccounted loss: 0\n"), "{exit}");
    let f = fwd(out, 0);
    assert!(f.rx_packets > 10_000 && f.tx_packets > 10_000, "hardly forwarded: {f:?}");
    assert_eq!((f.rx_dropped, f.tx_dropped), (0, 0));
    // The summary: "testpmd sent S and received R (+D drained at stop)" and "backend
    // received S', sent R', dropped 0".
    let line = |start: &str| {
        out.lines()
            .map(str::trim)
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line starting {start:?}\n{exit}"))
    };
    let ours = line("testpmd sent ");
    let theirs = line("backend received ");
    let num = |l: &str, key: &str| number_after(l, key).unwrap_or_else(|| panic!("no {key:?} in {l:?}"));
    let (sent, received, drained) = (num(ours, "testpmd sent"), num(ours, "and received"), num(ours, "(+"));
    let (be_rx, be_tx, be_drop) =
        (num(theirs, "backend received"), num(theirs, ", sent"), num(theirs, ", dropped"));
    assert_eq!((sent, received), (f.tx_packets, f.rx_packets), "summary vs forward statistics");
    assert_eq!((be_rx, be_tx, be_drop), (sent, received + drained, 0), "{exit}");
    // 6 bursts of 32 were injected (tx_first 6), all in flight at stop, all drained.
    assert_eq!(drained, 6 * 32, "{exit}");
    assert_eq!(sent, received + drained);
    assert!(exit.stderr.contains("embedded host backend (reflect)"), "{exit}");
}

// ------------------------------------------------------------------------------ 5. prompt: DPDK's debugging commands

/// The value of `name` in the last "NIC extended statistics for port `port`" block.
fn xstat(out: &str, port: usize, name: &str) -> u64 {
    let hdr = format!("###### NIC extended statistics for port {port} \n");
    let at = out.rfind(&hdr).unwrap_or_else(|| panic!("no xstats block for port {port}\n{out}"));
    let block = &out[at + hdr.len()..];
    let block = &block[..block.find("testpmd>").unwrap_or(block.len())];
    block
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no xstat {name:?} for port {port} in:\n{block}"))
}

/// Sends `cmd` and waits until `pattern` has been printed once more than before.
fn command(tp: &mut Testpmd, cmd: &str, pattern: &str) {
    let n = tp.stdout().matches(pattern).count();
    tp.send(cmd);
    tp.wait_stdout_n(pattern, n + 1, Duration::from_secs(10));
}

/// `port stop` freezes a port's counters while forwarding runs and `port start` resumes
/// them; `show port xstats` counts exactly the frames a `gen` port made; `set verbose 1`
/// prints one dump line per received frame; `show fwd stats all` / `clear fwd stats
/// all`; `show config fwd|rxtx`; `port config mtu`; `set nbcore`; `set link-down`.
#[test]
fn prompt_port_stop_xstats_verbose_and_fwd_stats() {
    const N: u64 = 1000;
    const LEN: u64 = 100;
    let _serial = serial();
    let dir = TempDir::new("tp-xstats");
    let (sock, backend, mut tp) = gen_and_prompt(&dir, N, LEN);
    command(&mut tp, "set verbose 1", "Change verbose level from 0 to 1");
    command(&mut tp, "port stop 0", "Port 0 stopped");
    command(&mut tp, "start", "rxonly packet forwarding - ports=1");
    // The generator fills the receive ring, then waits for buffers: frames are at the
    // port, and testpmd must not take any.
    backend.wait_stats(Duration::from_secs(20), |s| counter(device(s, &sock), "tx_packets") > 0);
    thread::sleep(Duration::from_millis(300));
    command(&mut tp, "show port xstats 0", "NIC extended statistics for port 0");
    let out = tp.stdout();
    assert_eq!(xstat(&out, 0, "rx_good_packets"), 0, "a stopped port received");
    assert_eq!(xstat(&out, 0, "rx_q0_packets"), 0);
    command(&mut tp, "show config fwd", "forwards packets on 1 streams");
    assert!(
        tp.stdout().contains("RX P=0/Q=0 -> TX P=0/Q=0 peer=02:00:00:00:00:00 (port stopped)"),
        "{}",
        tp.outputs()
    );
    command(&mut tp, "port start 0", "Done");
    backend.wait_stats(Duration::from_secs(20), |s| counter(device(s, &sock), "tx_packets") == N);
    thread::sleep(Duration::from_millis(300));
    command(&mut tp, "show port xstats 0", "NIC extended statistics for port 0");
    let out = tp.stdout();
    for (name, v) in [
        ("rx_good_packets", N),
        ("rx_good_bytes", N * LEN),
        ("rx_q0_packets", N),
        ("rx_q0_bytes", N * LEN),
        ("tx_good_packets", 0),
        ("rx_errors", 0),
        ("rx_q0_xdp_pass", 0),
        ("ring_faults", 0),
        ("ctrl_cmd_ok", 0),
        ("ctrl_cmd_failed", 0),
    ] {
        assert_eq!(xstat(&out, 0, name), v, "xstat {name}");
    }
    let (free, cap) = (xstat(&out, 0, "pool_free"), xstat(&out, 0, "pool_capacity"));
    assert_eq!(free + xstat(&out, 0, "pool_in_use"), cap);
    // `clear port xstats`: counters restart from zero, the pool's levels stay.
    command(&mut tp, "clear port xstats 0", "NIC extended statistics for port 0 cleared");
    command(&mut tp, "show port xstats 0", "NIC extended statistics for port 0");
    let out = tp.stdout();
    assert_eq!((xstat(&out, 0, "rx_good_packets"), xstat(&out, 0, "rx_q0_bytes")), (0, 0));
    assert_eq!((xstat(&out, 0, "pool_free"), xstat(&out, 0, "pool_capacity")), (free, cap));
    command(&mut tp, "show port 0 rss-hash", "RSS disabled");
    command(&mut tp, "show fwd stats all", "Accumulated forward statistics");
    assert_eq!(
        fwd(&tp.stdout(), 0),
        PortCounts { rx_packets: N, rx_dropped: 0, tx_packets: 0, tx_dropped: 0 }
    );
    command(&mut tp, "clear fwd stats all", "Forward statistics cleared");
    command(&mut tp, "show fwd stats all", "Accumulated forward statistics");
    assert_eq!(fwd(&tp.stdout(), 0), PortCounts::default());
    command(&mut tp, "set verbose 0", "Change verbose level from 1 to 0");
    command(&mut tp, "set nbcore 1", "Please stop forwarding first");
    command(&mut tp, "stop", "Forward statistics for port 0");
    command(&mut tp, "set nbcore 2", "out of range 1..=1");
    command(&mut tp, "set nbcore 1", "Number of forwarding cores set to 1");
    command(&mut tp, "show config rxtx", "RX desc=256");
    command(&mut tp, "port config mtu 0 60000", "Set MTU failed");
    tp.send("port config mtu 0 1000");
    command(&mut tp, "show port info 0", "Infos for port 0");
    // max-pkt-len: the port stopped first, within the device's MTU (1500), effective at
    // port start (`port_config_max_pkt_len_applies_at_port_start` checks the frames).
    command(&mut tp, "port config all max-pkt-len 1218", "Please stop port 0 first");
    command(&mut tp, "port config all max-pkt-len 20", "out of range 64..=9018");
    assert!(tp.stdout().contains("MTU: 1000\n"), "{}", tp.outputs());
    command(&mut tp, "port stop all", "Port 0 stopped");
    command(&mut tp, "port config all max-pkt-len 1519", "outside 68..=1500");
    command(
        &mut tp,
        "port config all max-pkt-len 1218",
        "Port 0: max-pkt-len 1218 (MTU 1200) from the next port start",
    );
    command(&mut tp, "port start all", "Done");
    command(&mut tp, "show port info 0", "Infos for port 0");
    command(&mut tp, "set link-down port 0", "Set link down fail: not supported");
    tp.send("quit");
    let exit = tp.wait(Duration::from_secs(20));
    assert_ok(&exit);
    let out = &exit.stdout;
    // One dump line per received frame, and the burst headers add up to N.
    let dumps =
        out.lines().filter(|l| l.starts_with("  src=") && l.ends_with(" - Receive queue=0x0")).count();
    assert_eq!(dumps as u64, N, "verbose dump lines\n{exit}");
    let per_line = format!(" - type=0x0800 - length={LEN} - nb_segs=1 - Receive queue=0x0");
    assert_eq!(out.matches(&per_line).count() as u64, N);
    let headers: u64 = out
        .lines()
        .filter_map(|l| {
            // A burst's header may follow a "testpmd> " prompt on its line.
            l.split("port 0/queue 0: received ").nth(1)?.strip_suffix(" packets")?.parse::<u64>().ok()
        })
        .sum();
    assert_eq!(headers, N, "verbose burst headers\n{exit}");
    assert!(out.contains("MTU: 1000\n") && out.contains("MTU: 1200\n"), "{exit}");
    assert!(out.contains("  port 0: RX queue number: 1 Tx queue number: 1\n"), "{exit}");
    let fin = backend.stop();
    let dev = clean_device(&fin, &sock);
    assert_eq!(counter(dev, "generated"), N);
}

/// `port close`: refused while the port runs; after `port stop` it resets the device
/// (the backend sees the front-end go away) having received nothing; commands naming
/// the port then say it is closed, and `quit` still exits cleanly.
#[test]
fn port_close_resets_a_stopped_port() {
    let _serial = serial();
    let dir = TempDir::new("tp-close");
    let (sock, backend, mut tp) = gen_and_prompt(&dir, 1000, 64);
    backend.wait_stats(Duration::from_secs(20), |s| device(s, &sock)["connected"] == true);
    command(&mut tp, "port close 0", "Please stop port 0 first");
    command(&mut tp, "port stop 0", "Port 0 stopped");
    command(&mut tp, "port close 0", "Port 0 is closed");
    let s = backend.wait_stats(Duration::from_secs(20), |s| device(s, &sock)["connected"] == false);
    assert_eq!(counter(device(&s, &sock), "broken_queues"), 0);
    for cmd in ["show port stats 0", "port start 0", "show port xstats 0", "port close 0"] {
        let n = tp.stdout().matches("Port 0 is closed").count();
        tp.send(cmd);
        tp.wait_stdout_n("Port 0 is closed", n + 1, Duration::from_secs(10));
    }
    command(&mut tp, "start", "rxonly packet forwarding - ports=1 - cores=1 - streams=0");
    command(&mut tp, "stop", "Forward statistics for port 0");
    tp.send("quit");
    let exit = tp.wait(Duration::from_secs(20));
    assert_ok(&exit);
    assert_eq!(fwd(&exit.stdout, 0), PortCounts::default(), "{exit}");
    backend.stop();
}

/// `mac_addr add` lets frames to that address through the device's filter (the
/// backend's, set over the control queue), `mac_addr remove` stops them again: testpmd
/// on device A of an `xconnect` with promiscuous mode off; our driver on B sends 10
/// frames to the address each time.
#[test]
fn mac_addr_add_opens_the_device_filter() {
    const N: u32 = 10;
    const EXTRA: [u8; 6] = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
    let _serial = serial();
    let dir = TempDir::new("tp-macaddr");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let backend = Backend::start(&["--port", &xconnect_arg(&a, &b)]);
    let mut tp = Testpmd::spawn_with(
        &["-i", "--vdev", &vdev(0, &a), "--forward-mode", "rxonly"],
        Spawn { stdin: true, user: None },
    );
    tp.wait_stdout("testpmd> ", Duration::from_secs(20));
    let mut peer = Peer::open(&b);
    command(&mut tp, "set promisc 0 off", "promiscuous mode disabled");
    command(&mut tp, "start", "rxonly packet forwarding - ports=1");
    let dev_a = |s: &Value, name: &str| counter(device(s, &a), name);
    let round = |peer: &mut Peer, seq0: u32| {
        let frames: Vec<Vec<u8>> = (seq0..seq0 + N).map(|s| test_frame(100, EXTRA, peer.mac(), s)).collect();
        let back = peer.exchange(&frames, 0, &|| String::new());
        assert!(back.is_empty(), "rxonly sent frames back");
    };
    // Filtered: not for the port's own address, not promiscuous.
    round(&mut peer, 0);
    let s = backend.wait_stats(Duration::from_secs(20), |s| dev_a(s, "drops.filtered") == N as u64);
    assert_eq!(dev_a(&s, "tx_packets"), 0);
    command(&mut tp, "mac_addr add 0 02:11:22:33:44:55", "testpmd> ");
    round(&mut peer, N);
    let s = backend.wait_stats(Duration::from_secs(20), |s| dev_a(s, "tx_packets") == N as u64);
    assert_eq!(dev_a(&s, "drops.filtered"), N as u64);
    thread::sleep(Duration::from_millis(300));
    command(&mut tp, "show port xstats 0", "NIC extended statistics for port 0");
    let out = tp.stdout();
    assert_eq!(xstat(&out, 0, "rx_good_packets"), N as u64);
    assert_eq!(xstat(&out, 0, "rx_good_bytes"), N as u64 * 100);
    assert_eq!(xstat(&out, 0, "ctrl_cmd_ok"), 2, "promisc off + MAC table");
    command(&mut tp, "mac_addr remove 0 02:11:22:33:44:55", "testpmd> ");
    round(&mut peer, 2 * N);
    let s = backend.wait_stats(Duration::from_secs(20), |s| dev_a(s, "drops.filtered") == 2 * N as u64);
    assert_eq!(dev_a(&s, "tx_packets"), N as u64);
    thread::sleep(Duration::from_millis(300));
    command(&mut tp, "show port xstats 0", "NIC extended statistics for port 0");
    let out = tp.stdout();
    assert_eq!(xstat(&out, 0, "rx_good_packets"), N as u64);
    assert_eq!((xstat(&out, 0, "ctrl_cmd_ok"), xstat(&out, 0, "ctrl_cmd_refused")), (3, 0));
    command(&mut tp, "stop", "Forward statistics for port 0");
    tp.send("quit");
    let exit = tp.wait(Duration::from_secs(20));
    assert_ok(&exit);
    assert_eq!(fwd(&exit.stdout, 0).rx_packets, N as u64, "{exit}");
    peer.close();
    backend.stop();
}

/// `port config all|P max-pkt-len N` as DPDK's: refused while the port runs and beyond
/// the device's MTU (8000 here: at most 8018), effective only at `port start` (which
/// forwarding must not be running for). testpmd on A (`--max-pkt-len 8018`: mergeable
/// buffers) in rxonly with `set verbose 1`; our driver on B sends 10 frames of each
/// length per round through `xconnect:A,B`. At max-pkt-len 1518 the 60- and 1518-byte
/// frames arrive and the 1519- and 4018-byte ones are dropped and counted
/// (`rx_q0_too_long_errors`, in `rx_errors`); at 4018 the 1519- and 4018-byte ones
/// (above the old limit) arrive and the 4019- and 8018-byte ones are dropped. The
/// backend delivered every frame (its counts are exact, nothing dropped there); the
/// verbose dump shows exactly the frames that passed, by length.
#[test]
fn port_config_max_pkt_len_applies_at_port_start() {
    const N: u32 = 10;
    let _serial = serial();
    let dir = TempDir::new("tp-maxpkt");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let backend = Backend::start(&["--port", &xconnect_arg(&a, &b), "--mtu", "8000"]);
    let mut tp = Testpmd::spawn_with(
        &["-i", "--vdev", &vdev(0, &a), "--forward-mode", "rxonly", "--max-pkt-len", "8018"],
        Spawn { stdin: true, user: None },
    );
    tp.wait_stdout("testpmd> ", Duration::from_secs(20));
    let mut cfg = PortConfig::virtio_user(&b);
    cfg.features |= driver::layout::features::bit(driver::layout::features::NET_MRG_RXBUF);
    let mut peer = Peer::open_with(&b, cfg);
    let a_mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    let dev_a = |s: &Value, name: &str| counter(device(s, &a), name);
    let mut seq = 0u32;
    let mut sent = 0u64;
    let mut round = |peer: &mut Peer, lens: &[usize]| {
        let mut frames = Vec::new();
        for _ in 0..N {
            for &l in lens {
                frames.push(test_frame(l, a_mac, peer.mac(), seq));
                seq += 1;
            }
        }
        let back = peer.exchange(&frames, 0, &String::new);
        assert!(back.is_empty(), "rxonly sent frames back");
        sent += frames.len() as u64;
        backend.wait_stats(Duration::from_secs(20), |s| dev_a(s, "tx_packets") == sent);
        // Everything is in testpmd's receive ring; give the forwarding thread a moment.
        thread::sleep(Duration::from_millis(300));
    };

    command(&mut tp, "set verbose 1", "Change verbose level from 0 to 1");
    command(&mut tp, "start", "rxonly packet forwarding - ports=1");
    command(&mut tp, "port config all max-pkt-len 1518", "Please stop port 0 first");
    command(&mut tp, "port stop all", "Port 0 stopped");
    command(&mut tp, "port config all max-pkt-len 8019", "outside 68..=8000");
    command(&mut tp, "port config 1 max-pkt-len 1518", "Invalid port 1");
    command(
        &mut tp,
        "port config 0 max-pkt-len 1518",
        "Port 0: max-pkt-len 1518 (MTU 1500) from the next port start",
    );
    command(&mut tp, "show port info 0", "Infos for port 0");
    let out = tp.stdout();
    assert!(out.contains("MTU: 8000\n"), "not in force before port start\n{}", tp.outputs());
    assert!(out.contains("max-pkt-len at the next port start: 1518\n"), "{}", tp.outputs());
    command(&mut tp, "port start all", "Please stop forwarding first");
    command(&mut tp, "stop", "Forward statistics for port 0");
    command(&mut tp, "port start all", "Done");
    command(&mut tp, "start", "rxonly packet forwarding - ports=1");
    round(&mut peer, &[60, 1518, 1519, 4018]);
    command(&mut tp, "show port xstats 0", "NIC extended statistics for port 0");
    let out = tp.stdout();
    assert_eq!(xstat(&out, 0, "rx_good_packets"), 2 * N as u64);
    assert_eq!(xstat(&out, 0, "rx_good_bytes"), N as u64 * (60 + 1518));
    assert_eq!(xstat(&out, 0, "rx_q0_too_long_errors"), 2 * N as u64);
    assert_eq!(xstat(&out, 0, "rx_errors"), 2 * N as u64);

    command(&mut tp, "stop", "Forward statistics for port 0");
    command(&mut tp, "port stop 0", "Port 0 stopped");
    command(
        &mut tp,
        "port config all max-pkt-len 4018",
        "Port 0: max-pkt-len 4018 (MTU 4000) from the next port start",
    );
    command(&mut tp, "port start 0", "Done");
    command(&mut tp, "start", "rxonly packet forwarding - ports=1");
    round(&mut peer, &[1519, 4018, 4019, 8018]);
    command(&mut tp, "show port xstats 0", "NIC extended statistics for port 0");
    let out = tp.stdout();
    assert_eq!(xstat(&out, 0, "rx_good_packets"), 4 * N as u64);
    assert_eq!(xstat(&out, 0, "rx_good_bytes"), N as u64 * (60 + 1518 + 1519 + 4018));
    assert_eq!(xstat(&out, 0, "rx_q0_too_long_errors"), 4 * N as u64);
    assert_eq!(xstat(&out, 0, "rx_errors"), 4 * N as u64);
    command(&mut tp, "show port info 0", "Infos for port 0");
    let out = tp.stdout();
    assert!(out.contains("MTU: 4000\nMax RX frame: 4018 (port config max-pkt-len)\n"), "{}", tp.outputs());
    command(&mut tp, "stop", "Forward statistics for port 0");
    tp.send("quit");
    let exit = tp.wait(Duration::from_secs(20));
    assert_ok(&exit);
    // The per-frame dump: exactly the frames that passed, by length.
    for (len, n) in [(60, N), (1518, N), (1519, N), (4018, N), (4019, 0), (8018, 0)] {
        let pat = format!(" - length={len} - nb_segs=");
        assert_eq!(exit.stdout.matches(&pat).count(), n as usize, "dumped frames of {len} bytes\n{exit}");
    }
    peer.close();
    let fin = backend.stop();
    let dev = clean_device(&fin, &a);
    assert_eq!((counter(dev, "tx_packets"), counter(dev, "rx_packets")), (8 * N as u64, 0));
    assert_eq!(counter(device(&fin, &b), "rx_packets"), 8 * N as u64);
}

/// 5tswap: our driver on B sends 1000 distinct UDP/IPv4 frames through `xconnect:A,B`
/// to testpmd on A; each returns once, in order, with MACs, IPv4 addresses and UDP ports
/// swapped and every other byte (checksums included) equal.
#[test]
fn fivetswap_swaps_macs_addresses_and_ports() {
    const N: u32 = 1000;
    let _serial = serial();
    let dir = TempDir::new("tp-5tswap");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let backend = Backend::start(&["--port", &xconnect_arg(&a, &b)]);
    let mut peer = Peer::open(&b);
    let (tp, _) = start_forwarding(&["--vdev", &vdev(0, &a), "--forward-mode", "5tswap"]);
    let frames = test_frames(N, [0x02, 0, 0, 0, 0xaa, 0x01], [0x02, 0, 0, 0, 0xbb, 0x02]);
    let got = peer.exchange(&frames, N as usize, &|| diag(&tp, &backend));
    assert_eq!(got.len(), N as usize, "frames back");
    for (i, (sent, back)) in frames.iter().zip(&got).enumerate() {
        let mut want = sent.clone();
        for (x, y, n) in [(0, 6, 6), (26, 30, 4), (34, 36, 2)] {
            want[x..x + n].copy_from_slice(&sent[y..y + n]);
            want[y..y + n].copy_from_slice(&sent[x..x + n]);
        }
        assert_eq!(back, &want, "frame {i} (len {}) did not come back 5-tuple-swapped", sent.len());
    }
    let exit = interrupt(tp);
    let f = fwd(&exit.stdout, 0);
    assert_eq!(f, PortCounts { rx_packets: N as u64, rx_dropped: 0, tx_packets: N as u64, tx_dropped: 0 });
    peer.close();
    let fin = backend.stop();
    for s in [&a, &b] {
        let d = clean_device(&fin, s);
        assert_eq!((counter(d, "rx_packets"), counter(d, "tx_packets")), (N as u64, N as u64), "{d}");
    }
}

/// `set xdp 0 drop|tx|off` at the prompt between runs of io forwarding: our driver on
/// the far side of an `xconnect` sends 100 frames per phase; with `drop` none return and
/// the queue's XDP-drop counter counts them, with `tx` each returns MAC-swapped by the
/// program, with `off` (and before any program) each returns unchanged.
#[test]
fn set_xdp_at_the_prompt_changes_the_program() {
    const N: u32 = 100;
    let _serial = serial();
    let dir = TempDir::new("tp-setxdp");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let backend = Backend::start(&["--port", &xconnect_arg(&a, &b)]);
    let mut tp = Testpmd::spawn_with(
        &["-i", "--vdev", &vdev(0, &a), "--forward-mode", "io"],
        Spawn { stdin: true, user: None },
    );
    tp.wait_stdout("testpmd> ", Duration::from_secs(20));
    let mut peer = Peer::open(&b);
    let (mac, pmac) = (port_mac(&tp.stdout(), 0).expect("port 0's MAC"), peer.mac());
    let mut seq = 0;
    let mut phase = |tp: &mut Testpmd, peer: &mut Peer, prog: Option<&str>, back: usize| {
        if let Some(p) = prog {
            command(tp, &format!("set xdp 0 {p}"), "Port 0: XDP program");
        }
        command(tp, "start", "io packet forwarding - ports=1");
        let frames: Vec<Vec<u8>> =
            (seq..seq + N).map(|s| test_frame(60 + (s as usize * 7919) % 1455, mac, pmac, s)).collect();
        seq += N;
        let got = peer.exchange(&frames, back, &|| String::new());
        command(tp, "stop", "Forward statistics for port 0");
        (frames, got)
    };
    let (sent, got) = phase(&mut tp, &mut peer, None, N as usize);
    assert_eq!(got, sent, "no program: io returns every frame unchanged");
    let (_, got) = phase(&mut tp, &mut peer, Some("drop"), 0);
    assert!(got.is_empty(), "drop: {} frames came back", got.len());
    command(&mut tp, "show port xstats 0", "NIC extended statistics for port 0");
    assert_eq!(xstat(&tp.stdout(), 0, "rx_q0_xdp_drop"), N as u64);
    let (sent, got) = phase(&mut tp, &mut peer, Some("tx"), N as usize);
    let swapped: Vec<Vec<u8>> = sent
        .iter()
        .map(|f| {
            let mut w = f.clone();
            w[0..6].copy_from_slice(&f[6..12]);
            w[6..12].copy_from_slice(&f[0..6]);
            w
        })
        .collect();
    assert_eq!(got, swapped, "tx: every frame back MAC-swapped by the program");
    command(&mut tp, "show port xstats 0", "NIC extended statistics for port 0");
    let out = tp.stdout();
    assert_eq!((xstat(&out, 0, "rx_q0_xdp_drop"), xstat(&out, 0, "rx_q0_xdp_tx")), (N as u64, N as u64));
    let (sent, got) = phase(&mut tp, &mut peer, Some("off"), N as usize);
    assert_eq!(got, sent, "off: io returns every frame unchanged");
    command(&mut tp, "show port xstats 0", "NIC extended statistics for port 0");
    let out = tp.stdout();
    assert_eq!((xstat(&out, 0, "rx_q0_xdp_drop"), xstat(&out, 0, "rx_q0_xdp_tx")), (N as u64, N as u64));
    assert_eq!(xstat(&out, 0, "rx_q0_xdp_pass"), 0);
    command(&mut tp, "set xdp 0 redirect:1", "Invalid port 1");
    tp.send("quit");
    let exit = tp.wait(Duration::from_secs(20));
    assert_ok(&exit);
    peer.close();
    let fin = backend.stop();
    clean_device(&fin, &b);
}

/// noisy: io through a 64-frame FIFO flushed every 5 ms, with a simulated lookup
/// workload: our driver on B sends 1000 distinct frames through `xconnect:A,B`; each
/// returns once, unchanged and in order, and the forward counters agree.
#[test]
fn noisy_returns_every_frame_in_order() {
    const N: u32 = 1000;
    let _serial = serial();
    let dir = TempDir::new("tp-noisy");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let backend = Backend::start(&["--port", &xconnect_arg(&a, &b)]);
    let mut peer = Peer::open(&b);
    let (tp, _) = start_forwarding(&[
        "--vdev",
        &vdev(0, &a),
        "--forward-mode",
        "noisy",
        "--noisy-tx-sw-buffer-size",
        "64",
        "--noisy-tx-sw-buffer-flushtime",
        "5",
        "--noisy-lkup-memory",
        "1",
        "--noisy-lkup-num-reads",
        "4",
        "--noisy-lkup-num-writes",
        "4",
        "--noisy-lkup-num-reads-writes",
        "2",
    ]);
    let frames = test_frames(N, [0x02, 0, 0, 0, 0xaa, 0x01], [0x02, 0, 0, 0, 0xbb, 0x02]);
    let got = peer.exchange(&frames, N as usize, &|| diag(&tp, &backend));
    assert_eq!(got, frames, "noisy returns every frame unchanged, in order");
    let exit = interrupt(tp);
    let f = fwd(&exit.stdout, 0);
    assert_eq!(f, PortCounts { rx_packets: N as u64, rx_dropped: 0, tx_packets: N as u64, tx_dropped: 0 });
    peer.close();
    let fin = backend.stop();
    for s in [&a, &b] {
        let d = clean_device(&fin, s);
        assert_eq!((counter(d, "rx_packets"), counter(d, "tx_packets")), (N as u64, N as u64), "{d}");
    }
}

// ------------------------------------------------------------------------------ 6. packet capture

/// The records of a pcap file (microsecond, little-endian, Ethernet): (captured bytes,
/// original length) each, after checking the file header.
fn pcap_records(path: &Path) -> Vec<(Vec<u8>, u32)> {
    let d = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let u32_at = |o: usize| u32::from_le_bytes(d[o..o + 4].try_into().expect("4 bytes"));
    assert!(d.len() >= 24, "{}: no pcap header", path.display());
    assert_eq!(u32_at(0), 0xa1b2_c3d4, "pcap magic");
    assert_eq!((&d[4..6], &d[6..8]), (&[2u8, 0][..], &[4u8, 0][..]), "pcap version 2.4");
    assert_eq!(u32_at(20), 1, "link type Ethernet");
    let mut recs = Vec::new();
    let mut o = 24;
    while o < d.len() {
        assert!(o + 16 <= d.len(), "truncated record header at {o}");
        let (incl, orig) = (u32_at(o + 8) as usize, u32_at(o + 12));
        assert!(o + 16 + incl <= d.len(), "truncated record at {o}");
        recs.push((d[o + 16..o + 16 + incl].to_vec(), orig));
        o += 16 + incl;
    }
    recs
}

/// Frames `tcpdump -r` reads from `path` (one output line per frame with `-q`).
fn tcpdump_count(path: &Path) -> usize {
    let out = std::process::Command::new("tcpdump")
        .args(["-r", &path.display().to_string(), "-nn", "-q"])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run tcpdump ({e}): tests/run.sh installs it (Debian package tcpdump)")
        });
    assert!(out.status.success(), "tcpdump -r failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// `--pcap-out FILE,port=0,dir=rx` captures every frame testpmd receives (io mode,
/// 500 frames of 60..1514 bytes from our driver on the far side of an `xconnect`), then
/// `set capture FILE2,dir=tx,count=100` at the prompt the first 100 frames it sends:
/// `tcpdump -r` reads exactly those counts, and the records are the frames' bytes, in
/// order.
#[test]
fn pcap_capture_holds_exactly_the_frames() {
    const N: u32 = 500;
    const COUNT: usize = 100;
    let _serial = serial();
    let dir = TempDir::new("tp-pcap");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let (rx_pcap, tx_pcap) = (dir.join("rx.pcap"), dir.join("tx.pcap"));
    let backend = Backend::start(&["--port", &xconnect_arg(&a, &b)]);
    let mut tp = Testpmd::spawn_with(
        &[
            "-i",
            "--vdev",
            &vdev(0, &a),
            "--forward-mode",
            "io",
            "--pcap-out",
            &format!("{},port=0,dir=rx", rx_pcap.display()),
        ],
        Spawn { stdin: true, user: None },
    );
    tp.wait_stdout("testpmd> ", Duration::from_secs(20));
    let mut peer = Peer::open(&b);
    let (mac, pmac) = (port_mac(&tp.stdout(), 0).expect("port 0's MAC"), peer.mac());
    command(&mut tp, "start", "io packet forwarding - ports=1");
    let first = test_frames(N, mac, pmac);
    let back = peer.exchange(&first, N as usize, &|| String::new());
    assert_eq!(back, first, "io returns every frame unchanged");
    command(&mut tp, "stop", "Forward statistics for port 0");
    command(&mut tp, &format!("set capture {},dir=tx,count={COUNT}", tx_pcap.display()), "Capturing to");
    assert!(tp
        .stdout()
        .contains(&format!("Capture: {N} frames written to {}, 0 dropped", rx_pcap.display())));
    // And DPDK's per-frame dump of the frames sent (verbose 2: sent only).
    command(&mut tp, "set verbose 2", "Change verbose level from 0 to 2");
    command(&mut tp, "start", "io packet forwarding - ports=1");
    let second: Vec<Vec<u8>> =
        (N..2 * N).map(|s| test_frame(60 + (s as usize * 7919) % 1455, mac, pmac, s)).collect();
    let back = peer.exchange(&second, N as usize, &|| String::new());
    assert_eq!(back, second);
    command(&mut tp, "stop", "Forward statistics for port 0");
    command(&mut tp, "set verbose 0", "Change verbose level from 2 to 0");
    tp.send("quit");
    let exit = tp.wait(Duration::from_secs(20));
    assert_ok(&exit);
    assert!(
        exit.stdout.contains(&format!("Capture: {COUNT} frames written to {}, 0 dropped", tx_pcap.display())),
        "{exit}"
    );
    peer.close();
    backend.stop();
    let sent_dumps: Vec<&str> = exit.stdout.lines().filter(|l| l.starts_with("  src=")).collect();
    assert_eq!(sent_dumps.len(), N as usize, "one dump line per frame sent\n{exit}");
    assert!(sent_dumps.iter().all(|l| !l.contains("Receive queue")), "verbose 2 dumps no received frame");
    for (l, f) in sent_dumps.iter().zip(&second) {
        assert!(l.ends_with(&format!(" - type=0x0800 - length={} - nb_segs=1", f.len())), "{l}");
    }
    let headers: u64 = exit
        .stdout
        .lines()
        .filter_map(|l| {
            l.split("port 0/queue 0: sent ").nth(1)?.strip_suffix(" packets")?.parse::<u64>().ok()
        })
        .sum();
    assert_eq!(headers, N as u64, "verbose 2 burst headers");

    assert_eq!(tcpdump_count(&rx_pcap), N as usize, "tcpdump -r {}", rx_pcap.display());
    assert_eq!(tcpdump_count(&tx_pcap), COUNT, "tcpdump -r {}", tx_pcap.display());
    let recs = pcap_records(&rx_pcap);
    assert_eq!(recs.len(), N as usize);
    for (i, ((data, orig), sent)) in recs.iter().zip(&first).enumerate() {
        assert_eq!((data, *orig as usize), (sent, sent.len()), "rx record {i}");
    }
    let recs = pcap_records(&tx_pcap);
    assert_eq!(recs.len(), COUNT);
    for (i, ((data, orig), sent)) in recs.iter().zip(&second).enumerate() {
        assert_eq!((data, *orig as usize), (sent, sent.len()), "tx record {i}");
    }
}

// ------------------------------------------------------------------------------ 6. latency

/// The `port_latency` JSON line of `port` (`--latency --stats-format json`, at stop).
fn latency_json(stdout: &str, port: u64) -> Value {
    stdout
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .find(|v| v["type"] == "port_latency" && v["port"] == port)
        .unwrap_or_else(|| panic!("no port_latency line for port {port}\n{stdout}"))
}

/// The figures of a latency report hang together: every counted sample was stamped
/// once, in order, with min <= p50 <= p99 <= p99.9 <= max and a positive minimum.
fn assert_latency_sane(l: &Value, samples: u64) {
    let n = |k: &str| l[k].as_u64().unwrap_or_else(|| panic!("no {k} in {l}"));
    assert_eq!((n("samples"), n("lost"), n("reordered"), n("stale")), (samples, 0, 0, 0), "{l}");
    let (min, p50, p99, p999, max) = (n("min_ns"), n("p50_ns"), n("p99_ns"), n("p999_ns"), n("max_ns"));
    assert!(0 < min && min <= p50 && p50 <= p99 && p99 <= p999 && p999 <= max, "{l}");
    assert!(min <= n("mean_ns") && n("mean_ns") <= max, "{l}");
}

/// `--latency` round trip: txonly paced by `--tx-pps` through `reflect` measures every
/// frame that came back exactly once, none lost or reordered; pacing never sends more
/// than the rate allows over the run; the backend saw exactly what testpmd sent.
#[test]
fn latency_round_trip_through_reflect_measures_every_frame() {
    const PPS: u64 = 20_000;
    let _serial = serial();
    let dir = TempDir::new("tp-lat-rt");
    let sock = dir.join("r.sock");
    let backend = Backend::start(&["--port", &port_arg("reflect", &sock)]);
    let exit = run(
        &[
            "--vdev",
            &vdev(0, &sock),
            "--forward-mode",
            "txonly",
            "--txpkts",
            "64",
            "--latency",
            "--tx-pps",
            &PPS.to_string(),
            "--duration",
            "2",
            "--stats-format",
            "json",
        ],
        RUN_TIMEOUT,
    );
    assert_ok(&exit);
    let js = forward_stats_json(&exit.stdout).unwrap_or_else(|| panic!("no forward_stats JSON line\n{exit}"));
    let p = json_port_counts(&js)[0];
    let secs = js["seconds"].as_f64().unwrap_or_else(|| panic!("no seconds in {js}"));
    assert!(p.tx_packets > 1000, "txonly hardly sent anything: {js}");
    assert!(p.tx_packets as f64 <= PPS as f64 * secs + BURST as f64, "pacing exceeded {PPS}/s: {js}");
    // The backend sleeps when idle (--poll-us 50): on a loaded machine it may wake late
    // enough for the ring to fill; refused frames are TX-dropped, retried, and give their
    // sequence numbers back, so nothing counts as lost.
    let lat = latency_json(&exit.stdout, 0);
    assert_latency_sane(&lat, p.rx_packets);
    let fin = backend.stop();
    let dev = clean_device(&fin, &sock);
    assert_eq!(counter(dev, "rx_packets"), p.tx_packets, "reflect received what testpmd sent\n{exit}");
    // What reflect sent back and testpmd had not taken at stop was in flight.
    let back = counter(dev, "tx_packets");
    assert!(p.rx_packets <= back && back - p.rx_packets <= RING, "reflect sent {back}\n{exit}");
}

/// `--latency` one way, across processes: txonly on A, xconnect A->B, rxonly on B in
/// another testpmd; the receiver measures exactly the frames the backend moved to B,
/// in order, none lost, under the sender's stamps (one system-wide clock).
#[test]
fn latency_one_way_across_processes_counts_what_the_backend_moved() {
    let _serial = serial();
    let dir = TempDir::new("tp-lat-ow");
    let (a, b) = (dir.join("a.sock"), dir.join("b.sock"));
    let backend = Backend::start(&["--port", &xconnect_arg(&a, &b)]);
    let (rx, _) = start_forwarding(&[
        "--vdev",
        &vdev(0, &b),
        "--forward-mode",
        "rxonly",
        "--latency",
        "--stats-format",
        "json",
    ]);
    let sent = run(
        &[
            "--vdev",
            &vdev(0, &a),
            "--forward-mode",
            "txonly",
            "--latency",
            "--tx-pps",
            "50000",
            "--duration",
            "2",
            "--stats-format",
            "json",
        ],
        RUN_TIMEOUT,
    );
    assert_ok(&sent);
    let tx = json_port_counts(&forward_stats_json(&sent.stdout).expect("sender forward_stats"))[0];
    let moved = backend.wait_stats(TRAFFIC_TIMEOUT, |s| counter(device(s, &b), "tx_packets") > 0);
    drop(moved);
    thread::sleep(QUIET);
    let exit = interrupt(rx);
    let got = json_port_counts(&forward_stats_json(&exit.stdout).expect("receiver forward_stats"))[0];
    let fin = backend.stop();
    let (da, db) = (device(&fin, &a), device(&fin, &b));
    assert_eq!((total_drops(da), total_drops(db)), (0, 0), "{fin}");
    assert_eq!(counter(db, "tx_packets"), counter(da, "rx_packets"));
    assert_eq!(got.rx_packets, counter(db, "tx_packets"), "receiver vs backend\n{exit}");
    assert!(counter(da, "rx_packets") <= tx.tx_packets && tx.tx_packets - counter(da, "rx_packets") <= RING);
    assert_latency_sane(&latency_json(&exit.stdout, 0), got.rx_packets);
}

/// `--record-burst-stats`: the burst spreads account for every packet: the receive
/// spread's packets (size × calls) are the port's RX-packets, the transmit spread's its
/// TX-packets less the `--tx-first` bursts (sent before forwarding, not burst calls of
/// the engine); the text block shows both lines.
#[test]
fn record_burst_stats_accounts_for_every_packet() {
    let _serial = serial();
    let dir = TempDir::new("tp-bursts");
    let sock = dir.join("r.sock");
    let backend = Backend::start(&["--port", &port_arg("reflect", &sock)]);
    let common = ["--vdev", &vdev(0, &sock), "--forward-mode", "io", "--tx-first", "4", "--duration", "1"];
    let exit = run(&[&common[..], &["--record-burst-stats", "--stats-format", "json"]].concat(), RUN_TIMEOUT);
    assert_ok(&exit);
    let js = forward_stats_json(&exit.stdout).unwrap_or_else(|| panic!("no forward_stats JSON line\n{exit}"));
    let p = &js["ports"][0];
    let pkts = |k: &str| -> (u64, u64) {
        let m = p[k].as_object().unwrap_or_else(|| panic!("no {k} in {js}"));
        let calls = m.values().map(|c| c.as_u64().expect("count")).sum();
        let n =
            m.iter().map(|(size, c)| size.parse::<u64>().expect("size") * c.as_u64().expect("count")).sum();
        (calls, n)
    };
    let ((rx_calls, rx), (tx_calls, tx)) = (pkts("rx_bursts"), pkts("tx_bursts"));
    assert_eq!(rx, p["rx_packets"].as_u64().unwrap(), "{js}");
    assert_eq!(tx + 4 * BURST as u64, p["tx_packets"].as_u64().unwrap(), "{js}");
    assert!(rx > 10_000 && rx_calls >= tx_calls && tx_calls > 0, "{js}");
    // The text form, from a second run.
    let exit = run(&[&common[..], &["--record-burst-stats"]].concat(), RUN_TIMEOUT);
    assert_ok(&exit);
    for what in ["  RX-bursts : ", "  TX-bursts : "] {
        assert_eq!(exit.stdout.matches(what).count(), 1, "{what}: one line in port 0's block\n{exit}");
    }
    drop(backend);
}

/// A `gen` back-end on `sock` sending `count` TCP super-frames of `size` bytes that ask
/// for segmentation at `mss`.
fn gso_gen(sock: &Path, mss: u64, size: u64, count: u64) -> Backend {
    Backend::start(&[
        "--port",
        &port_arg("gen", sock),
        "--gso-size",
        &mss.to_string(),
        "--pkt-size",
        &size.to_string(),
        "--count",
        &count.to_string(),
    ])
}

/// `--enable-lro` (DPDK's option): against `gen --gso-size`, every super-frame arrives
/// whole (GUEST_TSO4 and mergeable buffers negotiated): RX-packets is the generator's
/// count and RX-bytes its bytes; without the option the same stream arrives cut into
/// MSS-sized segments.
#[test]
fn enable_lro_receives_super_frames_whole() {
    const COUNT: u64 = 400;
    const SIZE: u64 = 6000;
    const MSS: u64 = 1448;
    let _serial = serial();
    let dir = TempDir::new("tp-lro");
    let sock = dir.join("g.sock");
    for lro in [true, false] {
        let backend = gso_gen(&sock, MSS, SIZE, COUNT);
        let vd = vdev(0, &sock);
        let mut args = vec!["--vdev", &vd, "--forward-mode", "rxonly", "--duration", "2"];
        if lro {
            args.push("--enable-lro");
        }
        let exit = run(&args, RUN_TIMEOUT);
        assert_ok(&exit);
        let nic = nic_stats(&exit.stdout, 0).unwrap_or_else(|| panic!("no NIC statistics\n{exit}"));
        let fin = backend.stop();
        let dev = clean_device(&fin, &sock);
        assert_eq!(counter(dev, "generated"), COUNT, "{exit}");
        // Payload per super-frame: SIZE less Ethernet, IPv4 and TCP headers.
        let payload = SIZE - 54;
        let segs = payload.div_ceil(MSS);
        if lro {
            assert_eq!((nic.rx_packets, nic.rx_bytes), (COUNT, COUNT * SIZE), "{exit}");
        } else {
            assert_eq!(nic.rx_packets, COUNT * segs, "{exit}");
            assert_eq!(nic.rx_bytes, COUNT * (payload + segs * 54), "{exit}");
        }
        assert_eq!(nic.rx_errors, 0, "{exit}");
    }
}

/// `port config N rx_offload tcp_lro off|on` (DPDK's command) switches the device's
/// guest TSO through the control queue: after `off`, `gen --gso-size` cuts its TCP
/// super-frames into MSS-sized segments for the port (what it had put in the ring
/// before stays whole: frame and byte counts fit exactly one split); `on` is accepted
/// once forwarding stops. Refused while forwarding runs and on a port that did not
/// negotiate guest TSO (no `--enable-lro`).
#[test]
fn rx_offload_tcp_lro_switches_guest_tso() {
    const COUNT: u64 = 2000;
    const SIZE: u64 = 6000;
    const MSS: u64 = 1448;
    let _serial = serial();
    let dir = TempDir::new("tp-lro-switch");
    let sock = dir.join("g.sock");
    let payload = SIZE - 54;
    let segs = payload.div_ceil(MSS);
    for lro in [true, false] {
        let backend = gso_gen(&sock, MSS, SIZE, COUNT);
        let vd = vdev(0, &sock);
        let mut args = vec!["-i", "--vdev", &vd, "--forward-mode", "rxonly"];
        if lro {
            args.push("--enable-lro");
        }
        let mut tp = Testpmd::spawn_with(&args, Spawn { stdin: true, user: None });
        tp.wait_stdout("testpmd> ", Duration::from_secs(20));
        if !lro {
            command(&mut tp, "port config 0 rx_offload tcp_lro off", "tcp_lro was not negotiated");
            tp.send("quit");
            assert_ok(&tp.wait(Duration::from_secs(20)));
            backend.stop();
            continue;
        }
        command(&mut tp, "port config 0 rx_offload tcp_lro off", "Port 0: rx_offload tcp_lro off");
        command(&mut tp, "start", "rxonly packet forwarding - ports=1");
        command(&mut tp, "port config all rx_offload tcp_lro on", "Please stop forwarding first");
        backend.wait_stats(Duration::from_secs(20), |s| counter(device(s, &sock), "generated") == COUNT);
        thread::sleep(QUIET);
        command(&mut tp, "stop", "Forward statistics for port 0");
        let out = tp.stdout();
        let fs = fwd(&out, 0);
        // `whole` super-frames were in the ring before the switch; the rest came cut.
        let whole = (segs * COUNT - fs.rx_packets) / (segs - 1);
        assert_eq!(whole * (segs - 1), segs * COUNT - fs.rx_packets, "{out}");
        assert!(whole <= RING, "{whole} whole super-frames: more than the ring held\n{out}");
        command(&mut tp, "show port stats 0", "Tx-pps");
        let nic = nic_stats(&tp.stdout(), 0).expect("NIC statistics");
        assert_eq!(nic.rx_bytes, whole * SIZE + (COUNT - whole) * (payload + segs * 54), "{out}");
        command(&mut tp, "port config all rx_offload tcp_lro on", "Port 0: rx_offload tcp_lro on");
        tp.send("quit");
        assert_ok(&tp.wait(Duration::from_secs(20)));
        let fin = backend.stop();
        let dev = clean_device(&fin, &sock);
        assert_eq!(counter(dev, "tx_packets"), fs.rx_packets, "{dev}");
    }
}

/// `--hold-tx`: io from a `gen` port (5000 frames) into device A of an `xconnect` whose
/// far end (our driver on B) receives nothing for the first second: A's ring fills,
/// testpmd holds what it cannot send and stops taking from the generator, which waits;
/// once B drains, every generated frame arrives, in order, and testpmd dropped none.
/// Without the option the same run drops (TX-dropped) and B gets fewer.
#[test]
fn hold_tx_drops_nothing_behind_a_full_ring() {
    const N: u64 = 5000;
    let _serial = serial();
    let dir = TempDir::new("tp-hold-tx");
    let (g, a, b) = (dir.join("g.sock"), dir.join("a.sock"), dir.join("b.sock"));
    for hold in [true, false] {
        let backend = Backend::start(&[
            "--port",
            &port_arg("gen", &g),
            "--port",
            &xconnect_arg(&a, &b),
            "--count",
            &N.to_string(),
            "--pkt-size",
            "200",
        ]);
        let mut peer = Peer::open(&b);
        let (vg, va) = (vdev(0, &g), vdev(1, &a));
        let mut args = vec!["--vdev", &vg, "--vdev", &va, "--forward-mode", "io", "--duration", "4"];
        if hold {
            args.push("--hold-tx");
        }
        let tp = Testpmd::spawn(&args);
        thread::sleep(Duration::from_secs(1));
        let mut seqs = Vec::new();
        let mut batch = Vec::with_capacity(BURST);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            peer.qp.rx.rx_burst(&mut batch, BURST);
            for p in batch.drain(..) {
                let d = p.data();
                seqs.push(u64::from_le_bytes(d[46..54].try_into().expect("8 bytes")));
            }
        }
        let exit = tp.wait(RUN_TIMEOUT);
        assert_ok(&exit);
        peer.close();
        let fin = backend.stop();
        assert_eq!(counter(device(&fin, &g), "generated"), N, "{exit}");
        let (f, t) = (fwd(&exit.stdout, 0), fwd(&exit.stdout, 1));
        if hold {
            assert_eq!((f.rx_packets, t.tx_packets, t.tx_dropped), (N, N, 0), "{exit}");
            assert_eq!(seqs, (0..N).collect::<Vec<_>>(), "every frame, in order");
            clean_device(&fin, &b);
        } else {
            assert!(
                t.tx_dropped > 0 && (seqs.len() as u64) < N,
                "dropped {} got {}\n{exit}",
                t.tx_dropped,
                seqs.len()
            );
        }
    }
}
