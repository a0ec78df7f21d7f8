//! Hostile vhost-user front-ends against the backend's control plane (issue 19): what a
//! front-end sends besides ring contents (memory files, eventfds) must only ever break
//! its own device.
//!
//! Every test starts one `host-backend` process with one worker (`--cores 0`) serving a
//! BAD device and a GOOD `reflect` device; a well-behaved guest on GOOD reflects frames
//! byte-for-byte before and after the attack, and its counters stay exact; BAD's
//! attack is written with [`RawFrontend`] over the real protocol, and BAD's counters
//! (`peer.*`, `broken_queues`, packets) are checked exactly, in a periodic stats line
//! and in the final one at SIGTERM.
//!
//! * guest memory: a `SET_MEM_TABLE` region longer than its file is refused (the old
//!   connection ends after the error reply); a file truncated after it was shared breaks BAD's rings
//!   (the SIGBUS its pages raise is repaired for that device only).
//! * file descriptors: a pipe in place of a kick or call eventfd is refused; a blocking
//!   call eventfd preloaded to its maximum cannot block the worker's signal.
//! * work bounds: a chain longer than a port can use is abandoned (and dropped, counted)
//!   before its bad tail is read; a long chain's head made available twice breaks the
//!   queue.
//! * the listening socket: a live one (GOOD's) is not taken over by a second instance,
//!   nor is a regular file at the path removed; a stale one is replaced, with the mode
//!   and group asked for.
//! * control-plane isolation: one front-end's ring messages re-activate its own rings
//!   only, never GOOD's (the devices' `activations` counters).
//! * IOTLB: a front-end that fills the table to its bound cannot grow it past it, with
//!   updates that replace part of a mapping or invalidations that split one.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use driver::layout::{features, Descriptor, DESC_F_INDIRECT, DESC_F_NEXT, DESC_SIZE, NET_HDR_LEN};
use serde_json::Value;
use vmm_sys_util::eventfd::EventFd;
use vnet_tests::harness::{self, Backend, TempDir};
use vnet_tests::rawfront::RawFrontend;

/// Guest memory of each front-end.
const MEM: usize = 1 << 20;
/// Ring size of every queue.
const RING: u16 = 64;
/// Queue 0 of pair 0: the guest's receive queue.
const RX: u16 = 0;
/// Queue 1 of pair 0: the guest's transmit queue.
const TX: u16 = 1;
/// Bound on every wait for a stats line to show something (the period is 1 s).
const STATS_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on every wait for the data path.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Receive buffer length.
const RX_BUF: u32 = 2048;
/// Frame sizes of one reflect round on GOOD.
const SIZES: [usize; 4] = [60, 128, 1000, 1514];

type R = Result<(), String>;

/// The backend (BAD as a `bad_kind` device, GOOD as `reflect`, one worker), with GOOD
/// connected and one round reflected.
struct Fixture {
    dir: TempDir,
    backend: Backend,
    bad: PathBuf,
    good: PathBuf,
    good_fe: RawFrontend,
    rounds: u64,
}

impl Fixture {
    fn start(tag: &str, bad_kind: &str) -> Fixture {
        Fixture::start_with(tag, bad_kind, &[])
    }

    /// [`Fixture::start`] with more backend options.
    fn start_with(tag: &str, bad_kind: &str, extra: &[&str]) -> Fixture {
        let dir = TempDir::new(tag);
        let bad = dir.join("bad.sock");
        let good = dir.join("good.sock");
        let ports = [format!("{bad_kind}:{}", bad.display()), format!("reflect:{}", good.display())];
        let mut args = vec!["--cores", "0", "--port", &ports[0], "--port", &ports[1]];
        args.extend_from_slice(extra);
        let backend = Backend::start(&args);
        let mut good_fe = RawFrontend::connect(&good, MEM, 0).unwrap_or_else(|e| panic!("GOOD: {e}"));
        good_fe.setup_queue(RX, RING).unwrap_or_else(|e| panic!("GOOD: {e}"));
        good_fe.setup_queue(TX, RING).unwrap_or_else(|e| panic!("GOOD: {e}"));
        let mut f = Fixture { dir, backend, bad, good, good_fe, rounds: 0 };
        f.reflect_round();
        f
    }

    /// One round on GOOD: every frame comes back unchanged.
    fn reflect_round(&mut self) {
        let seed = self.rounds as u16 * 16;
        let frames: Vec<Vec<u8>> =
            SIZES.iter().enumerate().map(|(i, len)| harness::test_frame(*len, seed + i as u16)).collect();
        let fe = &mut self.good_fe;
        let r: R = (|| {
            fe.post_rx_buffers(RX, frames.len() as u16, RX_BUF)?;
            fe.send_frames(TX, &frames)?;
            let got = fe.recv_frames(RX, frames.len(), IO_TIMEOUT)?;
            fe.wait_tx_done(TX, IO_TIMEOUT)?;
            if got != frames {
                return Err("frames came back different".into());
            }
            Ok(())
        })();
        r.unwrap_or_else(|e| panic!("GOOD round {}: {e}; log:\n{}", self.rounds, self.backend.log()));
        self.rounds += 1;
    }

    /// Asserts GOOD's exact counters in `stats` after `rounds` rounds.
    fn assert_good(stats: &Value, good: &Path, rounds: u64) {
        let dev = harness::device(stats, good);
        let n = SIZES.len() as u64 * rounds;
        let bytes = SIZES.iter().sum::<usize>() as u64 * rounds;
        for c in ["rx_packets", "tx_packets"] {
            assert_eq!(harness::counter(dev, c), n, "GOOD {c}: {dev}");
        }
        for c in ["rx_bytes", "tx_bytes"] {
            assert_eq!(harness::counter(dev, c), bytes, "GOOD {c}: {dev}");
        }
        assert_eq!(harness::total_drops(dev), 0, "GOOD drops: {dev}");
        assert_eq!(harness::counter(dev, "broken_queues"), 0, "GOOD broken_queues: {dev}");
        for c in ["peer.mem_table_refused", "peer.fds_refused", "peer.mem_faults"] {
            assert_eq!(harness::counter(dev, c), 0, "GOOD {c}: {dev}");
        }
    }

    /// After an attack: the backend is alive, GOOD reflects another round with exact
    /// counters, `check_bad` holds for BAD in the stats line that shows GOOD's round and
    /// in the final line at SIGTERM; returns the backend's log.
    fn finish(mut self, check_bad: impl Fn(&Value)) -> String {
        assert!(self.backend.is_running(), "backend died after the attack; log:\n{}", self.backend.log());
        self.reflect_round();
        let n = SIZES.len() as u64 * self.rounds;
        let good = self.good.clone();
        let stats = self.backend.wait_stats(STATS_TIMEOUT, |s| {
            find_dev(s, &good).is_some_and(|d| d["tx_packets"].as_u64() == Some(n))
        });
        Fixture::assert_good(&stats, &good, self.rounds);
        check_bad(harness::device(&stats, &self.bad));
        let log = self.backend.log();
        let Fixture { backend, good_fe, bad, rounds, .. } = self;
        let last = backend.stop();
        assert_eq!(last["final"].as_bool(), Some(true), "final line: {last}");
        Fixture::assert_good(&last, &good, rounds);
        check_bad(harness::device(&last, &bad));
        drop(good_fe);
        log
    }
}

/// The device of `stats` whose socket is `path`, without panicking (for predicates).
fn find_dev<'a>(stats: &'a Value, path: &Path) -> Option<&'a Value> {
    stats["devices"].as_array()?.iter().find(|d| d["socket"].as_str() == path.to_str())
}

/// A fresh memfd of `len` bytes, owned by the test (never mapped here).
fn memfd(len: u64) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
    let fd = unsafe { libc::memfd_create(c"hostile-mem".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("ftruncate");
    f
}

/// Sends `frames` frames of 64 bytes on BAD's TX queue and waits until they are used.
fn sink_frames(fe: &mut RawFrontend, frames: usize) -> R {
    let fs: Vec<Vec<u8>> = (0..frames).map(|i| harness::test_frame(64, i as u16)).collect();
    fe.send_frames(TX, &fs)?;
    fe.wait_tx_done(TX, IO_TIMEOUT)
}

// ---- 1. guest memory ----------------------------------------------------------------

/// A region longer than its file (here: an empty file) would raise SIGBUS on the first
/// ring access: the table is refused (error reply, connection closed) and counted; BAD
/// connects again and sinks frames; GOOD never notices.
#[test]
fn mem_region_longer_than_its_file_is_refused() {
    let _serial = harness::serial();
    let f = Fixture::start("hostile-memlen", "sink");
    let mut bad = RawFrontend::connect(&f.bad, MEM, 0).expect("BAD connect");
    bad.setup_queue(TX, RING).expect("BAD queue");
    sink_frames(&mut bad, 3).expect("BAD before");
    let short = memfd(0);
    let (_, size) = bad.mem_range();
    let refused = bad.set_mem_table_fd(short.as_raw_fd(), size);
    assert!(refused.is_err(), "a region longer than its file must be refused");
    // A refused request ends the connection (after the error reply, as for every
    // refused request); the same front-end connects again and works.
    drop(bad);
    let mut bad = RawFrontend::connect(&f.bad, MEM, 0).expect("BAD reconnect");
    bad.setup_queue(TX, RING).expect("BAD queue");
    sink_frames(&mut bad, 2).expect("BAD after reconnecting");
    let log = f.finish(|dev| {
        assert_eq!(harness::counter(dev, "peer.mem_table_refused"), 1, "BAD: {dev}");
        assert_eq!(harness::counter(dev, "peer.mem_faults"), 0, "BAD: {dev}");
        assert_eq!(harness::counter(dev, "rx_packets"), 5, "BAD: {dev}");
        assert_eq!(harness::counter(dev, "broken_queues"), 0, "BAD: {dev}");
    });
    assert!(log.contains("longer than its file"), "the log must say why; log:\n{log}");
    drop(bad);
}

/// The front-end shares a file that holds its rings, then truncates it: every page the
/// backend touches is gone. The SIGBUS is repaired for BAD only: BAD's queue pair is
/// broken (counted once as a memory fault, no drop counted), GOOD on the same worker
/// keeps reflecting.
#[test]
fn mem_truncated_after_sharing_breaks_only_that_device() {
    let _serial = harness::serial();
    let f = Fixture::start("hostile-memtrunc", "sink");
    let mut bad = RawFrontend::connect(&f.bad, MEM, 0).expect("BAD connect");
    bad.setup_queue(TX, RING).expect("BAD queue");
    sink_frames(&mut bad, 3).expect("BAD before");
    // The same guest memory, in a file of the test's: the backend's rings resume from
    // the copy exactly where they were.
    let (start, size) = bad.mem_range();
    let copy = memfd(size);
    copy.write_all_at(&bad.read_mem(start, size as usize).expect("read guest memory"), 0).expect("copy");
    bad.set_mem_table_fd(copy.as_raw_fd(), size).expect("BAD: a whole file is accepted");
    copy.set_len(0).expect("truncate");
    // A busy-polling worker touches the ring at once; a sleeping one on this kick.
    bad.kick(TX).expect("kick");
    let bad_path = f.bad.clone();
    f.backend.wait_stats(STATS_TIMEOUT, |s| {
        find_dev(s, &bad_path).is_some_and(|d| d["broken_queues"].as_u64() == Some(1))
    });
    let log = f.finish(|dev| {
        assert_eq!(harness::counter(dev, "peer.mem_faults"), 1, "BAD: {dev}");
        assert_eq!(harness::counter(dev, "broken_queues"), 1, "BAD: {dev}");
        assert_eq!(harness::total_drops(dev), 0, "BAD drops: {dev}");
        assert_eq!(harness::counter(dev, "rx_packets"), 3, "BAD: {dev}");
    });
    assert!(log.contains("guest memory was truncated"), "the log must say why; log:\n{log}");
    drop(bad);
}

// ---- 2. file descriptors ------------------------------------------------------------

/// A pipe of one page (`F_SETPIPE_SZ`) whose write end poses as an eventfd, and its
/// read end (kept open and never read, so the pipe fills).
fn small_pipe() -> (File, EventFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two fds into the array; the result is checked.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe: {}", std::io::Error::last_os_error());
    // SAFETY: fcntl on the fresh pipe; shrinking its buffer is best effort.
    unsafe { libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 4096) };
    // SAFETY: fresh descriptors nobody else owns.
    unsafe { (File::from_raw_fd(fds[0]), EventFd::from_raw_fd(fds[1])) }
}

/// A pipe in place of the call eventfd, then of the kick eventfd: each is refused (error
/// reply, connection ended) and counted; BAD connects again and sinks frames; GOOD on the
/// same worker never notices. (Accepted, the call pipe fills after a page of calls and
/// the worker's blocking write never returns.)
#[test]
fn pipe_in_place_of_an_eventfd_is_refused() {
    let _serial = harness::serial();
    let f = Fixture::start("hostile-pipefd", "sink");
    let (_read_end, pipe) = small_pipe();
    let mut bad = RawFrontend::connect(&f.bad, MEM, 0).expect("BAD connect");
    bad.setup_queue(TX, RING).expect("BAD queue");
    sink_frames(&mut bad, 2).expect("BAD before");
    assert!(bad.set_vring_call_fd(TX, &pipe).is_err(), "a pipe as call fd must be refused");
    drop(bad);
    let mut bad = RawFrontend::connect(&f.bad, MEM, 0).expect("BAD reconnect");
    bad.setup_queue(TX, RING).expect("BAD queue");
    assert!(bad.set_vring_kick_fd(TX, &pipe).is_err(), "a pipe as kick fd must be refused");
    drop(bad);
    let mut bad = RawFrontend::connect(&f.bad, MEM, 0).expect("BAD reconnect");
    bad.setup_queue(TX, RING).expect("BAD queue");
    sink_frames(&mut bad, 3).expect("BAD after reconnecting");
    let log = f.finish(|dev| {
        assert_eq!(harness::counter(dev, "peer.fds_refused"), 2, "BAD: {dev}");
        assert_eq!(harness::counter(dev, "rx_packets"), 5, "BAD: {dev}");
        assert_eq!(harness::counter(dev, "broken_queues"), 0, "BAD: {dev}");
    });
    assert!(log.contains("SET_VRING_CALL 1 refused: not an eventfd (pipe:"), "log:\n{log}");
    assert!(log.contains("SET_VRING_KICK 1 refused: not an eventfd (pipe:"), "log:\n{log}");
    drop(bad);
}

/// A blocking call eventfd the front-end preloaded to its maximum: the backend's next
/// signal would block forever in a blocking write. It is made non-blocking when it
/// arrives, so the signal is dropped (the counter is non-zero: the front-end is
/// signalled anyway), BAD keeps sinking and GOOD keeps reflecting on the same worker.
#[test]
fn preloaded_blocking_call_eventfd_cannot_stall_the_worker() {
    let _serial = harness::serial();
    let f = Fixture::start("hostile-callfull", "sink");
    let mut bad = RawFrontend::connect(&f.bad, MEM, 0).expect("BAD connect");
    bad.setup_queue(TX, RING).expect("BAD queue");
    sink_frames(&mut bad, 2).expect("BAD before");
    let call = EventFd::new(0).expect("eventfd");
    call.write(u64::MAX - 1).expect("preload");
    bad.set_vring_call_fd(TX, &call).expect("an eventfd is accepted");
    for _ in 0..4 {
        sink_frames(&mut bad, 1).expect("BAD with a full call eventfd");
    }
    let log = f.finish(|dev| {
        assert_eq!(harness::counter(dev, "peer.fds_refused"), 0, "BAD: {dev}");
        assert_eq!(harness::counter(dev, "rx_packets"), 6, "BAD: {dev}");
        assert_eq!(harness::counter(dev, "broken_queues"), 0, "BAD: {dev}");
    });
    drop(log);
    drop(bad);
}

// ---- 3. work bounds -----------------------------------------------------------------

/// Ring size of BAD's queue in the work-bound test (room for a 100-descriptor chain).
const LONG_RING: u16 = 256;
/// Descriptors of BAD's long chains: more than a port can use (64 pieces).
const LONG: u16 = 100;

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Descriptor {
    Descriptor { addr, len, flags, next }
}

/// Publishes `heads` at avail slots `from..` of BAD's TX queue with one index store,
/// kicks, and waits until the device used `wait_used` chains in all.
fn offer(fe: &RawFrontend, from: u16, heads: &[u16], wait_used: Option<u16>) -> R {
    for (k, h) in heads.iter().enumerate() {
        fe.write_avail_slot(TX, from + k as u16, *h)?;
    }
    fe.set_avail_idx(TX, from + heads.len() as u16)?;
    fe.kick(TX)?;
    match wait_used {
        Some(n) => fe.wait_used_idx(TX, n, IO_TIMEOUT),
        None => Ok(()),
    }
}

/// A chain longer than a port can use is abandoned after 65 pieces (its 100th
/// descriptor, outside guest memory, is never read): dropped and counted
/// (`too_many_segments`), through links and in an indirect table, and the queue keeps
/// working. The same long chain made available twice at once breaks the queue (a head
/// in flight), after the first one is dropped. GOOD on the same worker keeps reflecting.
#[test]
fn long_chains_are_abandoned_and_duplicate_heads_break_the_queue() {
    let _serial = harness::serial();
    let f = Fixture::start("hostile-longchain", "sink");
    let mut bad =
        RawFrontend::connect(&f.bad, MEM, features::bit(features::RING_INDIRECT_DESC)).expect("BAD");
    bad.setup_queue(TX, LONG_RING).expect("BAD queue");
    let (start, size) = bad.mem_range();
    let outside = start + size;
    let r: R = (|| {
        let piece = bad.alloc(64, 64)?;
        // Head 0: 0 -> 1 -> ... -> 99, the last descriptor outside guest memory.
        for i in 0..LONG {
            let (addr, flags) = if i + 1 == LONG { (outside, 0) } else { (piece, DESC_F_NEXT) };
            bad.write_desc(TX, i, desc(addr, 64, flags, i + 1))?;
        }
        // Head 200: the same as an indirect table.
        let table = bad.alloc(LONG as usize * DESC_SIZE, 16)?;
        for i in 0..LONG {
            let (addr, flags) = if i + 1 == LONG { (outside, 0) } else { (piece, DESC_F_NEXT) };
            bad.write_desc_at(table + (i as usize * DESC_SIZE) as u64, desc(addr, 64, flags, i + 1))?;
        }
        bad.write_desc(TX, 200, desc(table, (LONG as usize * DESC_SIZE) as u32, DESC_F_INDIRECT, 0))?;
        // Head 201: one good frame.
        let mut frame = vec![0u8; NET_HDR_LEN];
        frame.extend(harness::test_frame(64, 7));
        let good = bad.alloc(frame.len(), 64)?;
        bad.write_mem(good, &frame)?;
        bad.write_desc(TX, 201, desc(good, frame.len() as u32, 0, 0))?;
        offer(&bad, 0, &[0], Some(1))?;
        offer(&bad, 1, &[200], Some(2))?;
        offer(&bad, 2, &[201], Some(3))?;
        offer(&bad, 3, &[0, 0], None)
    })();
    r.unwrap_or_else(|e| panic!("BAD: {e}; log:\n{}", f.backend.log()));
    let bad_path = f.bad.clone();
    f.backend.wait_stats(STATS_TIMEOUT, |s| {
        find_dev(s, &bad_path).is_some_and(|d| d["broken_queues"].as_u64() == Some(1))
    });
    assert_eq!(bad.used_idx(TX), Ok(4), "the first of the two duplicates was used, the second not");
    let log = f.finish(|dev| {
        assert_eq!(harness::counter(dev, "drops.too_many_segments"), 3, "BAD: {dev}");
        assert_eq!(harness::counter(dev, "drops.bad_descriptor"), 1, "BAD: {dev}");
        assert_eq!(harness::counter(dev, "broken_queues"), 1, "BAD: {dev}");
        assert_eq!(harness::counter(dev, "rx_packets"), 1, "BAD: {dev}");
    });
    assert!(
        log.contains("queue 1 broken: head 0 made available again while its chain is in flight"),
        "log:\n{log}"
    );
    drop(bad);
}

// ---- 4. the listening socket --------------------------------------------------------

/// Runs `host-backend` with `args`, expecting it to exit by itself within 10 s (it is
/// killed, and the test fails, if it does not); returns its exit code and stderr.
fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(harness::workspace_bin("host-backend"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn host-backend");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("host-backend {args:?} did not exit within 10 s (it took the path over?)");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err).expect("stderr");
    (status.code(), err)
}

/// A second instance on GOOD's live socket exits with one error line and leaves it alone
/// (GOOD keeps reflecting through the first one); a regular file at a socket path is
/// neither removed nor replaced; a stale socket (nobody listens) is replaced, with
/// `--socket-mode` and `--socket-group` applied; GOOD's socket has the default 0600.
#[test]
fn a_live_socket_is_not_taken_over_and_a_stale_one_is() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let _serial = harness::serial();
    let f = Fixture::start("hostile-sock", "sink");
    assert_eq!(std::fs::metadata(&f.good).expect("GOOD socket").permissions().mode() & 0o777, 0o600);

    let live = format!("sink:{}", f.good.display());
    let (code, err) = run_to_exit(&["--port", &live]);
    assert_eq!(code, Some(1), "second instance on a live socket; stderr: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one error line: {err}");
    assert!(err.contains("in use"), "stderr: {err}");

    let file = f.dir.join("file.sock");
    std::fs::write(&file, b"not a socket").expect("write");
    let (code, err) = run_to_exit(&["--port", &format!("sink:{}", file.display())]);
    assert_eq!(code, Some(1), "a regular file at the path; stderr: {err}");
    assert!(err.contains("not a socket"), "stderr: {err}");
    assert_eq!(std::fs::read(&file).expect("file kept"), b"not a socket");

    let stale = f.dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    // SAFETY: getuid and getegid have no memory effects.
    let gid = if unsafe { libc::getuid() } == 0 { 1 } else { unsafe { libc::getegid() } };
    let port = format!("sink:{}", stale.display());
    let gid_arg = gid.to_string();
    let second = Backend::start(&["--port", &port, "--socket-mode", "0660", "--socket-group", &gid_arg]);
    let mut fe = RawFrontend::connect(&stale, MEM, 0).expect("connect to the replaced stale socket");
    fe.setup_queue(TX, RING).expect("queue");
    sink_frames(&mut fe, 2).expect("frames through the second instance");
    let meta = std::fs::metadata(&stale).expect("stale socket replaced");
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), gid);
    drop(fe);
    let last = second.stop();
    assert_eq!(harness::counter(harness::device(&last, &stale), "rx_packets"), 2, "{last}");
    assert!(!stale.exists(), "the socket is removed at exit");

    f.finish(|dev| {
        assert_eq!(harness::counter(dev, "rx_packets"), 0, "BAD: {dev}");
    });
}

// ---- 5. IOTLB table bound -----------------------------------------------------------

/// Most translations the backend keeps per connection (`host-backend`'s
/// `iotlb::MAX_ENTRIES`).
const IOTLB_MAX: u64 = 1 << 16;
/// IOVA offset of BAD's vIOMMU.
const IOVA_OFFSET: u64 = 1 << 40;
const PAGE: u64 = 4096;

/// BAD fills its IOTLB to the bound (one 16-page mapping, then single pages): a further
/// mapping is refused; so is an update that replaces the middle of the big mapping
/// (it would split it into more entries), and the table is left as it was; an
/// invalidation that punches a hole in it is acknowledged and the table stays at the
/// bound. GOOD on the same worker keeps reflecting.
#[test]
fn iotlb_table_stays_bounded_on_every_path() {
    let _serial = harness::serial();
    let f = Fixture::start_with("hostile-iotlb", "sink", &["--iommu"]);
    let bad = RawFrontend::connect_iommu(&f.bad, MEM, 0, IOVA_OFFSET).expect("BAD connect");
    let (start, _) = bad.mem_range();
    let r: Result<(), String> = (|| {
        let ok = |accepted: bool, what: &str| if accepted { Ok(()) } else { Err(format!("{what} refused")) };
        ok(bad.iotlb_update(0, 16 * PAGE, start, 3)?, "the first mapping")?;
        for i in 0..IOTLB_MAX - 1 {
            ok(bad.iotlb_update((16 + i) * PAGE, PAGE, start, 3)?, "a mapping below the bound")?;
        }
        if bad.iotlb_update(1 << 39, PAGE, start, 3)? {
            return Err("a mapping beyond the bound was accepted".into());
        }
        if bad.iotlb_update(4 * PAGE, PAGE, start, 1)? {
            return Err("an update splitting a mapping beyond the bound was accepted".into());
        }
        ok(bad.iotlb_invalidate(4 * PAGE, PAGE)?, "the invalidation")
    })();
    r.unwrap_or_else(|e| panic!("BAD: {e}; log tail:\n{}", tail(&f.backend.log())));
    let bad_path = f.bad.clone();
    let stats = f.backend.wait_stats(STATS_TIMEOUT, |s| {
        find_dev(s, &bad_path).is_some_and(|d| d["iotlb"]["invalidates"].as_u64() == Some(1))
    });
    // The table of the connection (the final line comes after it closed).
    let dev = harness::device(&stats, &bad_path);
    assert_eq!(harness::counter(dev, "iotlb.entries"), IOTLB_MAX, "BAD: {dev}");
    f.finish(|dev| {
        assert_eq!(harness::counter(dev, "iotlb.updates"), IOTLB_MAX, "BAD: {dev}");
        assert_eq!(harness::counter(dev, "iotlb.refused"), 2, "BAD: {dev}");
        assert_eq!(harness::counter(dev, "iotlb.invalidates"), 1, "BAD: {dev}");
    });
    drop(bad);
}

/// The last lines of a long log.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

// ---- 6. control-plane isolation -----------------------------------------------------

/// Messages BAD sends in the isolation test.
const TOGGLES: u64 = 200;

/// BAD disables and enables its running TX queue again and again (`SET_VRING_ENABLE`
/// false, true, ...): each enable re-activates BAD's ring (exactly one activation per
/// pair of messages; an enable of a ring that runs already changes nothing and
/// re-activates nothing), and never GOOD's, whose rings on the same worker stay as they
/// were (GOOD's `activations` unchanged) while it keeps reflecting.
#[test]
fn one_front_ends_ring_messages_do_not_resync_other_devices() {
    let _serial = harness::serial();
    let f = Fixture::start("hostile-resync", "sink");
    let mut bad = RawFrontend::connect(&f.bad, MEM, 0).expect("BAD connect");
    bad.setup_queue(TX, RING).expect("BAD queue");
    sink_frames(&mut bad, 1).expect("BAD before");
    let (bad_path, good_path) = (f.bad.clone(), f.good.clone());
    let before = f.backend.wait_stats(STATS_TIMEOUT, |s| {
        find_dev(s, &bad_path).is_some_and(|d| d["rx_packets"].as_u64() == Some(1))
    });
    let act = |s: &Value, p: &Path| harness::counter(harness::device(s, p), "activations");
    let (bad0, good0) = (act(&before, &bad_path), act(&before, &good_path));
    // An enable of the running ring first: recorded without a resync.
    bad.set_vring_enable(TX, true).expect("SET_VRING_ENABLE");
    for i in 0..TOGGLES {
        bad.set_vring_enable(TX, i % 2 == 1).expect("SET_VRING_ENABLE");
    }
    sink_frames(&mut bad, 1).expect("BAD after");
    let after = f.backend.wait_stats(STATS_TIMEOUT, |s| {
        find_dev(s, &bad_path).is_some_and(|d| d["rx_packets"].as_u64() == Some(2))
    });
    assert_eq!(act(&after, &bad_path), bad0 + TOGGLES / 2, "BAD's ring re-activated once per enable");
    assert_eq!(act(&after, &good_path), good0, "GOOD's rings untouched by BAD's messages");
    f.finish(|dev| {
        assert_eq!(harness::counter(dev, "rx_packets"), 2, "BAD: {dev}");
    });
    drop(bad);
}
