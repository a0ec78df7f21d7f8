//! The backend's IOTLB (`host-backend --iommu`) against a raw front-end that plays a
//! vIOMMU ([`RawFrontend::connect_iommu`]): every ring and buffer address it gives the
//! device is an IOVA (`gpa + OFFSET`, far from any address the backend could reach by
//! accident), and the test decides which translations exist.
//!
//! * translations sent up front: frames are reflected byte for byte, no miss;
//! * no translations: the backend asks for each one on the backend channel (ring areas
//!   first, then buffers); the test answers page by page and traffic flows;
//! * an invalidation is acknowledged, and afterwards a buffer in the withdrawn range is
//!   never read or written: the backend asks, gets no answer, and after its timeout
//!   counts a bad descriptor and stops that queue; the buffer's bytes are unchanged;
//! * a write the translation forbids breaks the queue at once, untouched memory again;
//! * IOTLB messages from a front-end without `ACCESS_PLATFORM` are refused (acked
//!   non-zero), and the connection stays usable.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use vnet_tests::harness::{self, counter, Backend, TempDir};
use vnet_tests::rawfront::RawFrontend;

/// Guest memory per connection.
const MEM: usize = 4 << 20;
/// Ring size.
const RING: u16 = 64;
/// IOVA = guest address + OFFSET.
const OFFSET: u64 = 0x5a00_0000_0000;
/// Bound on every wait for the data path.
const IO: Duration = Duration::from_secs(5);
/// Bound on a stats line (the period is 1 s).
const STATS: Duration = Duration::from_secs(10);
/// The backend's miss timeout (`iotlb::MISS_TIMEOUT`, 3 s) plus a margin.
const MISS_TIMEOUT: Duration = Duration::from_secs(8);
const PAGE: u64 = 4096;
const RX_BUF: u32 = 2048;

fn frame(len: usize, seed: u8) -> Vec<u8> {
    harness::test_frame(len, seed as u16)
}

fn start(dir: &TempDir, kind: &str) -> (Backend, std::path::PathBuf) {
    let sock = dir.join("iommu.sock");
    let port = format!("{kind}:{}", sock.display());
    (Backend::start(&["--port", &port, "--iommu", "--poll-us", "0"]), sock)
}

/// Connects with a vIOMMU; with `map_all`, maps all guest memory read-write before the
/// queues start (so the backend never misses); then sets up queue pair 0.
fn connect(sock: &Path, map_all: bool) -> RawFrontend {
    let mut fe = RawFrontend::connect_iommu(sock, MEM, 0, OFFSET).unwrap_or_else(|e| panic!("connect: {e}"));
    if map_all {
        assert!(fe.iotlb_map_all().unwrap(), "update refused");
    }
    for q in 0..2 {
        fe.setup_queue(q, RING).unwrap_or_else(|e| panic!("queue {q}: {e}"));
    }
    fe
}

/// The device's stats once `pred` holds.
fn dev_when(backend: &Backend, sock: &Path, pred: impl Fn(&Value) -> bool) -> Value {
    let s = backend.wait_stats(STATS, |s| pred(harness::device(s, sock)));
    harness::device(&s, sock).clone()
}

/// Guest address of the buffer in the last descriptor posted on queue `q` (read back
/// from the ring: avail idx, the slot before it, its head's descriptor).
fn last_posted_gpa(fe: &RawFrontend, q: u16) -> u64 {
    let (size, a) = fe.ring(q).unwrap();
    let rd = |gpa: u64, n: usize| fe.read_mem(gpa, n).unwrap();
    let idx = u16::from_le_bytes(rd(a.avail + 2, 2).try_into().unwrap());
    let slot = idx.wrapping_sub(1) % size;
    let head = u16::from_le_bytes(rd(a.avail + 4 + 2 * slot as u64, 2).try_into().unwrap());
    let addr = u64::from_le_bytes(rd(a.desc + 16 * head as u64, 8).try_into().unwrap());
    addr - OFFSET
}

/// Fills guest memory from `gpa` to its end with `byte`.
fn fill_from(fe: &RawFrontend, gpa: u64, byte: u8) {
    let (start, size) = fe.mem_range();
    fe.write_mem(gpa, &vec![byte; (start + size - gpa) as usize]).unwrap();
}

/// Answers misses with 4 KiB read-write pages until `done` or `timeout`; returns the
/// pages mapped.
fn answer_misses(
    fe: &mut RawFrontend,
    timeout: Duration,
    mut done: impl FnMut(&mut RawFrontend) -> bool,
) -> u64 {
    let (start, size) = fe.mem_range();
    let deadline = Instant::now() + timeout;
    let mut pages = std::collections::BTreeSet::new();
    while !done(fe) {
        assert!(Instant::now() < deadline, "traffic did not complete; pages mapped: {}", pages.len());
        let Some((iova, perm)) = fe.next_miss(Duration::from_millis(20)).expect("backend channel") else {
            continue;
        };
        assert!(perm == 1 || perm == 2, "miss with perm {perm}");
        let page = iova & !(PAGE - 1);
        let gpa = page.checked_sub(OFFSET).expect("miss below the IOVA window");
        assert!(gpa >= start && gpa + PAGE <= start + size, "miss for {iova:#x} outside guest memory");
        if pages.insert(page) {
            assert!(fe.iotlb_update(page, PAGE, gpa, 3).unwrap(), "update refused");
        }
    }
    pages.len() as u64
}

#[test]
fn mapped_up_front_frames_reflect_byte_for_byte() {
    let _g = harness::serial();
    let dir = TempDir::new("iotlb-mapped");
    let (backend, sock) = start(&dir, "reflect");
    let mut fe = connect(&sock, true);
    fe.post_rx_buffers(0, RING, RX_BUF).unwrap();
    let frames: Vec<Vec<u8>> = (0..40u8).map(|i| frame(60 + i as usize * 31, i)).collect();
    fe.send_frames(1, &frames).unwrap();
    let got = fe.recv_frames(0, frames.len(), IO).unwrap();
    assert_eq!(got, frames, "reflected frames differ");
    fe.wait_tx_done(1, IO).unwrap();
    let dev = dev_when(&backend, &sock, |d| counter(d, "tx_packets") == 40);
    assert_eq!((counter(&dev, "rx_packets"), counter(&dev, "tx_packets")), (40, 40), "{dev}");
    let t = &dev["iotlb"];
    assert_eq!((counter(t, "updates"), counter(t, "misses"), counter(t, "entries")), (1, 0, 1), "{dev}");
    assert_eq!(counter(&dev, "broken_queues"), 0, "{dev}");
}

#[test]
fn misses_are_asked_for_and_answered_page_by_page() {
    let _g = harness::serial();
    let dir = TempDir::new("iotlb-miss");
    let (backend, sock) = start(&dir, "reflect");
    let mut fe = connect(&sock, false);
    fe.post_rx_buffers(0, 8, RX_BUF).unwrap();
    let frames: Vec<Vec<u8>> = (0..8u8).map(|i| frame(100 + i as usize, i)).collect();
    fe.send_frames(1, &frames).unwrap();
    let mut got = Vec::new();
    let pages = answer_misses(&mut fe, Duration::from_secs(20), |fe| {
        got.extend(fe.poll_rx(0).unwrap());
        got.len() >= frames.len()
    });
    assert_eq!(got, frames, "reflected frames differ");
    // The 2 queues' rings (3 areas each), 8 TX buffers and 8 RX buffers at least
    // partly share pages; what matters is that every page was asked for.
    assert!(pages >= 3, "only {pages} pages mapped");
    let dev = dev_when(&backend, &sock, |d| counter(d, "tx_packets") == 8);
    let t = &dev["iotlb"];
    assert_eq!(counter(t, "updates"), pages, "{dev}");
    assert_eq!(counter(t, "entries"), pages, "{dev}");
    assert!(counter(t, "misses") >= pages, "{dev}");
    assert_eq!((counter(t, "refused"), counter(t, "timeouts")), (0, 0), "{dev}");
    assert_eq!(counter(&dev, "broken_queues"), 0, "{dev}");
}

#[test]
fn invalidated_buffers_are_never_touched_and_count_as_bad_descriptors() {
    let _g = harness::serial();
    let dir = TempDir::new("iotlb-inval");
    let (backend, sock) = start(&dir, "gen");
    let mut fe = connect(&sock, true);
    // Everything after the rings is where buffers will go.
    let bufs = fe.alloc(1, PAGE as usize).unwrap();
    let (start, size) = fe.mem_range();
    // Traffic while mapped: the generator fills 16 buffers.
    fe.post_rx_buffers(0, 16, RX_BUF).unwrap();
    assert_eq!(fe.recv_frames(0, 16, IO).unwrap().len(), 16);
    // Withdraw the buffer area; the ack means no worker can use the old translation.
    assert!(fe.iotlb_invalidate(fe.iova(bufs), start + size - bufs).unwrap());
    // A buffer there, filled with a pattern, must stay as it is.
    fill_from(&fe, bufs, 0xa5);
    fe.post_rx_buffers(0, 1, RX_BUF).unwrap();
    let gpa = last_posted_gpa(&fe, 0);
    assert!(gpa >= bufs, "the buffer is not in the withdrawn range");
    let t0 = Instant::now();
    let mut asked = 0;
    while t0.elapsed() < MISS_TIMEOUT {
        if let Some((iova, perm)) = fe.next_miss(Duration::from_millis(50)).unwrap() {
            assert_eq!((iova & !(PAGE - 1), perm), (fe.iova(gpa) & !(PAGE - 1), 2), "miss for the buffer");
            asked += 1;
        }
        if backend.latest_stats().is_some_and(|s| harness::device(&s, &sock)["broken_queues"] == 1) {
            break;
        }
    }
    let dev = dev_when(&backend, &sock, |d| counter(d, "broken_queues") == 1);
    assert!(asked >= 1, "the backend never asked for the withdrawn page");
    assert!(t0.elapsed() >= Duration::from_secs(2), "broke before its miss timeout: {:?}", t0.elapsed());
    assert_eq!(fe.read_mem(gpa, RX_BUF as usize).unwrap(), vec![0xa5; RX_BUF as usize], "buffer written");
    assert_eq!(fe.poll_rx(0).unwrap().len(), 0, "a buffer was used after the invalidation");
    let t = &dev["iotlb"];
    assert_eq!((counter(t, "invalidates"), counter(t, "timeouts")), (1, 1), "{dev}");
    assert_eq!(counter(&dev, "drops.bad_descriptor"), 1, "{dev}");
    assert_eq!(counter(&dev, "tx_packets"), 16, "{dev}");
}

#[test]
fn a_write_the_translation_forbids_breaks_the_queue_untouched() {
    let _g = harness::serial();
    let dir = TempDir::new("iotlb-perm");
    let (backend, sock) = start(&dir, "gen");
    let mut fe = connect(&sock, true);
    let bufs = fe.alloc(1, PAGE as usize).unwrap();
    let (start, size) = fe.mem_range();
    // Rings stay read-write; the buffers become read-only to the device (an update
    // replaces the part of the mapping it overlaps).
    assert!(fe.iotlb_update(fe.iova(bufs), start + size - bufs, bufs, 1).unwrap());
    fill_from(&fe, bufs, 0x5a);
    fe.post_rx_buffers(0, 1, RX_BUF).unwrap();
    let gpa = last_posted_gpa(&fe, 0);
    assert!(gpa >= bufs, "the buffer is not in the read-only range");
    let dev = dev_when(&backend, &sock, |d| counter(d, "broken_queues") == 1);
    assert_eq!(fe.read_mem(gpa, RX_BUF as usize).unwrap(), vec![0x5a; RX_BUF as usize], "buffer written");
    assert_eq!(fe.used_idx(0).unwrap(), 0, "the buffer was used");
    let t = &dev["iotlb"];
    assert_eq!((counter(t, "misses"), counter(t, "timeouts"), counter(t, "entries")), (0, 0, 2), "{dev}");
    assert_eq!((counter(&dev, "drops.bad_descriptor"), counter(&dev, "tx_packets")), (1, 0), "{dev}");
}

#[test]
fn iotlb_messages_without_access_platform_are_refused() {
    let _g = harness::serial();
    let dir = TempDir::new("iotlb-noplat");
    let (backend, sock) = start(&dir, "reflect");
    // A first connection with a vIOMMU leaves a translation behind...
    drop(connect(&sock, true));
    dev_when(&backend, &sock, |d| d["connected"] == false);
    // ...which the next, plain connection does not inherit, and may not change.
    let mut plain = RawFrontend::connect(&sock, MEM, 0).unwrap();
    for q in 0..2 {
        plain.setup_queue(q, RING).unwrap();
    }
    assert!(!plain.iotlb_map_all().unwrap(), "IOTLB update accepted without ACCESS_PLATFORM");
    assert!(!plain.iotlb_invalidate(0, u64::MAX).unwrap(), "invalidation accepted without ACCESS_PLATFORM");
    // Addresses are guest addresses on this connection: traffic flows untranslated.
    plain.post_rx_buffers(0, 4, RX_BUF).unwrap();
    let frames: Vec<Vec<u8>> = (0..4u8).map(|i| frame(64, i)).collect();
    plain.send_frames(1, &frames).unwrap();
    assert_eq!(plain.recv_frames(0, 4, IO).unwrap(), frames);
    let dev = dev_when(&backend, &sock, |d| counter(d, "tx_packets") == 4);
    let t = &dev["iotlb"];
    assert_eq!((counter(t, "entries"), counter(t, "refused"), counter(t, "updates")), (0, 2, 1), "{dev}");
    assert_eq!(counter(&dev, "broken_queues"), 0, "{dev}");
}
