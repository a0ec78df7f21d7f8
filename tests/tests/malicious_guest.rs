//! The host backend treats the guest as hostile (docs/ARCHITECTURE.md, "Trust boundaries").
//!
//! Every test starts one `host-backend` process with one or more BAD devices and one
//! GOOD `reflect` device, plays a well-behaved guest on GOOD (frames reflected
//! byte-for-byte), plays a hostile guest on each BAD device (one variant of the attack
//! per device, written straight into ring memory with [`RawFrontend`]), and then proves:
//!
//! * (a) each BAD device has exactly one broken queue, counted once in `broken_queues`
//!   and once in `drops.bad_descriptor`, its queue pair 0 is flagged `broken` (the
//!   per-queue stats entries are per queue pair), and the device delivered nothing from
//!   the bad chain (its `rx_packets`/`tx_packets` are exact);
//! * the backend never completed anything on the broken queue (its used index is 0) and
//!   ignores it when it is kicked again;
//! * (b) the process is still running;
//! * (c) GOOD still reflects frames correctly afterwards, byte-for-byte, with exact
//!   counters, and all of this still holds in the final stats line at SIGTERM.
//!
//! Two positive tests check that well-formed chained and indirect TX descriptors into a
//! `sink` are counted exactly and returned in the used ring with the right ids.
//!
//! The `packed_*` tests run the same fixture with hostile guests on packed rings
//! (`VIRTIO_F_RING_PACKED`, virtio 1.2 §2.8; GOOD stays a split-ring guest on the same
//! worker): bad descriptors, wrap-counter lies, ids reused while in flight, chains longer
//! than the ring and malformed indirect descriptors. There "used" means descriptors the
//! backend marked used in the ring. One more test shows what a packed ring must NOT
//! break on: a head with the wrong polarity is simply not available yet, an id beyond
//! the ring size is only a number, a used descriptor flipped back is not taken twice,
//! and a zero-length buffer is a counted drop (as on a split ring).

use std::path::{Path, PathBuf};
use std::time::Duration;

use driver::layout::{
    features, Descriptor, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE, NET_HDR_LEN,
};
use driver::packed::{self, PackedDescriptor};
use serde_json::Value;
use vnet_tests::harness::{self, Backend, TempDir};
use vnet_tests::rawfront::{RawFrontend, RingAddrs};

type R = Result<(), String>;

/// Guest memory per connection.
const MEM: usize = 4 << 20;
/// Ring size of the hostile devices' queues (small, so "more than the ring" is cheap).
const BAD_RING: u16 = 8;
/// Ring size of the well-behaved devices' queues.
const GOOD_RING: u16 = 64;
/// Queue 0 of pair 0: the guest's receive queue.
const RX: u16 = 0;
/// Queue 1 of pair 0: the guest's transmit queue.
const TX: u16 = 1;
/// Bound on every wait for a stats line to show something (the period is 1 s).
const STATS_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on every wait for the data path.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Receive buffer length: the net header plus the largest frame used here, with room.
const RX_BUF: u32 = 2048;
/// Frame sizes of one reflect round on GOOD.
const REFLECT_SIZES: [usize; 8] = [60, 64, 65, 128, 333, 512, 1000, 1514];

/// Features every test asks for: indirect descriptors (VERSION_1 and
/// VHOST_USER_F_PROTOCOL_FEATURES are always added by `RawFrontend`).
fn want() -> u64 {
    features::bit(features::RING_INDIRECT_DESC)
}

/// Arguments that make the backend print one JSON stats line per second.
const STATS_ARGS: [&str; 4] = ["--stats-format", "json", "--stats-period", "1"];

// ---- small helpers ------------------------------------------------------------------

fn frame(len: usize, seed: u8) -> Vec<u8> {
    harness::test_frame(len, seed as u16)
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Descriptor {
    Descriptor { addr, len, flags, next }
}

/// Allocates guest memory holding `bytes`; returns its guest address.
fn buf(fe: &mut RawFrontend, bytes: &[u8]) -> Result<u64, String> {
    let gpa = fe.alloc(bytes.len().max(1), 64)?;
    fe.write_mem(gpa, bytes)?;
    Ok(gpa)
}

/// A zeroed net header followed by a `frame_len`-byte frame, in guest memory: a packet
/// that is valid in every respect. Returns `(gpa, total length)`.
fn pkt(fe: &mut RawFrontend, frame_len: usize) -> Result<(u64, u32), String> {
    let mut bytes = vec![0u8; NET_HDR_LEN];
    bytes.extend(frame(frame_len, 0x5a));
    let gpa = buf(fe, &bytes)?;
    Ok((gpa, bytes.len() as u32))
}

/// Writes `descs` as a table in fresh guest memory (an indirect table); returns its gpa.
fn table(fe: &mut RawFrontend, descs: &[Descriptor]) -> Result<u64, String> {
    let gpa = fe.alloc(descs.len().max(1) * DESC_SIZE, 16)?;
    for (i, d) in descs.iter().enumerate() {
        fe.write_desc_at(gpa + (i * DESC_SIZE) as u64, *d)?;
    }
    Ok(gpa)
}

/// Puts `heads` in the avail ring of `queue` from slot 0, publishes them and kicks.
fn offer(fe: &RawFrontend, queue: u16, heads: &[u16]) -> R {
    for (slot, head) in heads.iter().enumerate() {
        fe.write_avail_slot(queue, slot as u16, *head)?;
    }
    fe.set_avail_idx(queue, heads.len() as u16)?;
    fe.kick(queue)
}

/// Sets up RX and TX of pair 0 with `BAD_RING` entries each.
fn std_queues(fe: &mut RawFrontend) -> R {
    fe.setup_queue(RX, BAD_RING)?;
    fe.setup_queue(TX, BAD_RING)
}

/// First guest address past the end of guest memory.
fn mem_end(fe: &RawFrontend) -> u64 {
    let (start, size) = fe.mem_range();
    start + size
}

/// The device of `stats` whose socket is `path`, without panicking (for predicates).
fn find_dev<'a>(stats: &'a Value, path: &Path) -> Option<&'a Value> {
    stats["devices"].as_array()?.iter().find(|d| d["socket"].as_str() == path.to_str())
}

/// The `broken` flag of queue pair `index` of a device (`"queues"` in the stats holds one
/// entry per queue pair: its RX and TX counters and whether either of its rings broke).
fn pair_broken(dev: &Value, index: u16) -> Option<bool> {
    dev["queues"].as_array()?.iter().find(|q| q["index"].as_u64() == Some(index as u64))?["broken"].as_bool()
}

/// Connects a well-behaved guest with both queues of pair 0.
fn connect_good(path: &Path) -> Result<RawFrontend, String> {
    let mut fe = RawFrontend::connect(path, MEM, want())?;
    fe.setup_queue(RX, GOOD_RING)?;
    fe.setup_queue(TX, GOOD_RING)?;
    Ok(fe)
}

/// One reflect round on a well-behaved guest: posts RX buffers, sends
/// [`REFLECT_SIZES`] frames and checks they come back unchanged and in order.
fn reflect_round(fe: &mut RawFrontend, seed: u8) -> R {
    let frames: Vec<Vec<u8>> = REFLECT_SIZES
        .iter()
        .enumerate()
        .map(|(i, len)| frame(*len, seed.wrapping_mul(16).wrapping_add(i as u8)))
        .collect();
    fe.post_rx_buffers(RX, frames.len() as u16, RX_BUF)?;
    fe.send_frames(TX, &frames)?;
    let got = fe.recv_frames(RX, frames.len(), IO_TIMEOUT)?;
    fe.wait_tx_done(TX, IO_TIMEOUT)?;
    for (i, (sent, back)) in frames.iter().zip(&got).enumerate() {
        if sent != back {
            return Err(format!(
                "round {seed}: frame {i} came back different: sent {} bytes, got {} bytes",
                sent.len(),
                back.len()
            ));
        }
    }
    Ok(())
}

/// Asserts the GOOD device's counters after `rounds` reflect rounds: exact packet and
/// byte counts both ways, no drops, nothing broken.
fn assert_good(stats: &Value, path: &Path, rounds: u64) {
    let dev = harness::device(stats, path);
    let n = REFLECT_SIZES.len() as u64 * rounds;
    let bytes = REFLECT_SIZES.iter().sum::<usize>() as u64 * rounds;
    assert_eq!(harness::counter(dev, "rx_packets"), n, "GOOD rx_packets: {dev}");
    assert_eq!(harness::counter(dev, "rx_bytes"), bytes, "GOOD rx_bytes: {dev}");
    assert_eq!(harness::counter(dev, "tx_packets"), n, "GOOD tx_packets: {dev}");
    assert_eq!(harness::counter(dev, "tx_bytes"), bytes, "GOOD tx_bytes: {dev}");
    assert_eq!(harness::total_drops(dev), 0, "GOOD drops: {dev}");
    assert_eq!(harness::counter(dev, "broken_queues"), 0, "GOOD broken_queues: {dev}");
}

// ---- the hostile-guest fixture ------------------------------------------------------

/// One hostile guest: a device kind, the attack it runs, and what must follow.
struct Case {
    /// Names the variant in failure messages.
    name: &'static str,
    /// `sink`, `gen` or `reflect`.
    kind: &'static str,
    /// The queue the attack breaks.
    queue: u16,
    /// Sets up the device's queues and writes the hostile ring.
    attack: fn(&mut RawFrontend) -> R,
    /// Exact `rx_packets` of the device afterwards (frames legitimately taken from TX).
    rx_packets: u64,
    /// Features the hostile guest asks for.
    want: u64,
    /// Exact completions the backend made on the broken queue before it broke: the used
    /// index (split), or the descriptors marked used in the first lap (packed).
    used: u16,
    /// If set, what the backend's log must give as the reason the queue broke.
    reason: Option<&'static str>,
}

impl Case {
    fn sink_tx(name: &'static str, attack: fn(&mut RawFrontend) -> R) -> Case {
        Case { name, kind: "sink", queue: TX, attack, rx_packets: 0, want: want(), used: 0, reason: None }
    }

    /// A hostile packed-ring guest of a `sink` breaking its TX queue.
    fn packed_tx(name: &'static str, attack: fn(&mut RawFrontend) -> R) -> Case {
        Case { want: want_packed(), ..Case::sink_tx(name, attack) }
    }

    /// A hostile packed-ring guest of a `kind` device breaking its RX queue.
    fn packed_rx(name: &'static str, kind: &'static str, attack: fn(&mut RawFrontend) -> R) -> Case {
        Case { kind, queue: RX, ..Case::packed_tx(name, attack) }
    }

    /// This case's device legitimately took `rx_packets` frames and completed `used`
    /// chains on the broken queue before the bad one.
    fn served(self, rx_packets: u64, used: u16) -> Case {
        Case { rx_packets, used, ..self }
    }

    /// The guest does not ask for feature `bit`.
    fn without(self, bit: u32) -> Case {
        Case { want: self.want & !features::bit(bit), ..self }
    }

    /// The backend must log `reason` (a part of its text for the fault) for this case.
    fn because(self, reason: &'static str) -> Case {
        Case { reason: Some(reason), ..self }
    }
}

/// Asserts the backend logged why `case`'s queue broke, if the case says what it must be
/// (the log has one line per broken device: `SOCKET: queue Q broken: REASON`).
fn assert_reason(log: &str, path: &Path, case: &Case) {
    let Some(reason) = case.reason else { return };
    let prefix = format!("{}: queue {} broken: ", path.display(), case.queue);
    let line = log.lines().find(|l| l.contains(&prefix));
    assert!(
        line.is_some_and(|l| l.contains(reason)),
        "{}: expected the log to say the queue broke with {reason:?}, found {line:?}",
        case.name
    );
}

/// Asserts (a) for one hostile device in one stats line.
fn assert_bad(stats: &Value, path: &Path, case: &Case) {
    let dev = harness::device(stats, path);
    let name = case.name;
    assert_eq!(harness::counter(dev, "broken_queues"), 1, "{name}: broken_queues: {dev}");
    assert_eq!(harness::counter(dev, "drops.bad_descriptor"), 1, "{name}: drops.bad_descriptor: {dev}");
    assert_eq!(pair_broken(dev, 0), Some(true), "{name}: queue pair 0 must be broken: {dev}");
    assert_eq!(harness::counter(dev, "rx_packets"), case.rx_packets, "{name}: rx_packets: {dev}");
    assert_eq!(harness::counter(dev, "tx_packets"), 0, "{name}: tx_packets: {dev}");
}

/// Asserts the backend completed exactly `case.used` chains on the broken queue (0 for
/// most cases): its used index (split) or the descriptors marked used in the first lap
/// (packed). Only a used ring placed outside guest memory (test 11) cannot be read from
/// here.
fn assert_unused(case: &Case, fe: &RawFrontend) {
    let (ring_size, ring) = fe.ring(case.queue).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let (start, size) = fe.mem_range();
    if fe.is_packed(case.queue) == Ok(true) {
        let end = ring.desc + packed::desc_ring_bytes(ring_size) as u64;
        if ring.desc < start || end > start + size {
            return; // a descriptor ring outside guest memory (packed_bad_ring_setup_never_starts)
        }
        let used = (0..ring_size)
            .filter(|&p| {
                let d = fe.packed_desc(case.queue, p).unwrap_or_else(|e| panic!("{}: {e}", case.name));
                packed::is_used(d.flags, true)
            })
            .count();
        assert_eq!(used, case.used as usize, "{}: descriptors used on the broken packed queue", case.name);
        return;
    }
    let readable = ring.used >= start && ring.used + 4 <= start + size;
    match fe.used_idx(case.queue) {
        Ok(used) => assert_eq!(used, case.used, "{}: used idx of the broken queue", case.name),
        Err(e) => assert!(!readable, "{}: used idx unreadable: {e}", case.name),
    }
}

/// Runs `cases` against one backend (one BAD device per case, plus GOOD) and checks
/// (a), (b) and (c) from the module docs.
fn run_cases(tag: &str, cases: &[Case]) {
    let _serial = harness::serial();
    let dir = TempDir::new(tag);
    let good_path = dir.join("good.sock");
    let bad_paths: Vec<PathBuf> = (0..cases.len()).map(|i| dir.join(&format!("bad{i}.sock"))).collect();

    let mut args: Vec<String> = Vec::new();
    for (case, path) in cases.iter().zip(&bad_paths) {
        args.push("--port".into());
        args.push(format!("{}:{}", case.kind, path.display()));
    }
    args.push("--port".into());
    args.push(format!("reflect:{}", good_path.display()));
    args.extend(STATS_ARGS.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut backend = Backend::start(&argv);

    // GOOD works before anything hostile happens.
    let mut good = connect_good(&good_path).unwrap_or_else(|e| panic!("GOOD: {e}"));
    reflect_round(&mut good, 0).unwrap_or_else(|e| panic!("GOOD before the attacks: {e}"));

    // The attacks.
    let mut bads = Vec::new();
    for (case, path) in cases.iter().zip(&bad_paths) {
        let mut fe = RawFrontend::connect(path, MEM, case.want)
            .unwrap_or_else(|e| panic!("{}: connect: {e}", case.name));
        (case.attack)(&mut fe).unwrap_or_else(|e| panic!("{}: attack: {e}", case.name));
        bads.push(fe);
    }

    // (a) Every hostile device has its queue flagged.
    let stats = backend.wait_stats(STATS_TIMEOUT, |s| {
        bad_paths
            .iter()
            .all(|p| find_dev(s, p).is_some_and(|d| d["broken_queues"].as_u64().unwrap_or(0) >= 1))
    });
    for (case, path) in cases.iter().zip(&bad_paths) {
        assert_bad(&stats, path, case);
    }
    for (case, fe) in cases.iter().zip(&bads) {
        assert_unused(case, fe);
        // Kick it again: a broken queue stays ignored.
        fe.kick(case.queue).unwrap_or_else(|e| panic!("{}: kick: {e}", case.name));
    }

    // (b) The process is still up.
    assert!(backend.is_running(), "backend died after the attacks; log:\n{}", backend.log());

    // (c) GOOD still reflects, byte-for-byte, with exact counters.
    reflect_round(&mut good, 1).unwrap_or_else(|e| panic!("GOOD after the attacks: {e}"));
    let n = 2 * REFLECT_SIZES.len() as u64;
    let stats = backend.wait_stats(STATS_TIMEOUT, |s| {
        find_dev(s, &good_path)
            .is_some_and(|d| d["rx_packets"].as_u64() == Some(n) && d["tx_packets"].as_u64() == Some(n))
    });
    assert_good(&stats, &good_path, 2);
    for (case, path) in cases.iter().zip(&bad_paths) {
        assert_bad(&stats, path, case);
    }
    for (case, fe) in cases.iter().zip(&bads) {
        assert_unused(case, fe);
    }

    let log = backend.log();
    for (case, path) in cases.iter().zip(&bad_paths) {
        assert_reason(&log, path, case);
    }
    let last = backend.stop();
    assert_eq!(last["final"].as_bool(), Some(true), "final line: {last}");
    assert_good(&last, &good_path, 2);
    for (case, path) in cases.iter().zip(&bad_paths) {
        assert_bad(&last, path, case);
    }
    drop(bads);
    drop(good);
}

// ---- 1. avail idx moved by more than the ring size ----------------------------------

fn valid_first_desc(fe: &mut RawFrontend) -> R {
    let (g, l) = pkt(fe, 64)?;
    fe.write_desc(TX, 0, desc(g, l, 0, 0))?;
    fe.write_avail_slot(TX, 0, 0)
}

#[test]
fn avail_idx_beyond_ring_size_breaks_queue() {
    run_cases(
        "avail-idx",
        &[
            Case::sink_tx("avail idx = size + 1", |fe| {
                std_queues(fe)?;
                valid_first_desc(fe)?;
                fe.set_avail_idx(TX, BAD_RING + 1)?;
                fe.kick(TX)
            }),
            Case::sink_tx("avail idx = 0x8000", |fe| {
                std_queues(fe)?;
                valid_first_desc(fe)?;
                fe.set_avail_idx(TX, 0x8000)?;
                fe.kick(TX)
            }),
        ],
    );
}

// ---- 2. head index out of range -----------------------------------------------------

#[test]
fn head_index_out_of_range_breaks_queue() {
    run_cases(
        "head-range",
        &[
            Case::sink_tx("head = size", |fe| {
                std_queues(fe)?;
                valid_first_desc(fe)?;
                offer(fe, TX, &[BAD_RING])
            }),
            Case::sink_tx("head = 0xffff", |fe| {
                std_queues(fe)?;
                valid_first_desc(fe)?;
                offer(fe, TX, &[0xffff])
            }),
        ],
    );
}

// ---- 3. next index out of range -----------------------------------------------------

fn next_out_of_range(fe: &mut RawFrontend, next: u16) -> R {
    std_queues(fe)?;
    let hdr = buf(fe, &[0u8; NET_HDR_LEN])?;
    fe.write_desc(TX, 0, desc(hdr, NET_HDR_LEN as u32, DESC_F_NEXT, next))?;
    offer(fe, TX, &[0])
}

#[test]
fn next_index_out_of_range_breaks_queue() {
    run_cases(
        "next-range",
        &[
            Case::sink_tx("next = size", |fe| next_out_of_range(fe, BAD_RING)),
            Case::sink_tx("next = 0xffff", |fe| next_out_of_range(fe, 0xffff)),
        ],
    );
}

// ---- 4. chain loops -----------------------------------------------------------------

#[test]
fn chain_loop_breaks_queue() {
    run_cases(
        "loop",
        &[
            Case::sink_tx("0 -> 1 -> 0", |fe| {
                std_queues(fe)?;
                let hdr = buf(fe, &[0u8; NET_HDR_LEN])?;
                let body = buf(fe, &frame(64, 1))?;
                fe.write_desc(TX, 0, desc(hdr, NET_HDR_LEN as u32, DESC_F_NEXT, 1))?;
                fe.write_desc(TX, 1, desc(body, 64, DESC_F_NEXT, 0))?;
                offer(fe, TX, &[0])
            }),
            Case::sink_tx("0 -> 0", |fe| {
                std_queues(fe)?;
                let (g, l) = pkt(fe, 64)?;
                fe.write_desc(TX, 0, desc(g, l, DESC_F_NEXT, 0))?;
                offer(fe, TX, &[0])
            }),
        ],
    );
}

// ---- 5. over-long chains ------------------------------------------------------------

#[test]
fn chain_longer_than_ring_breaks_queue() {
    run_cases(
        "long-chain",
        &[
            // A loop-free indirect chain of size + 1 entries: header, then 8-byte pieces.
            Case::sink_tx("indirect chain of size + 1", |fe| {
                std_queues(fe)?;
                let n = BAD_RING + 1;
                let mut descs = vec![desc(buf(fe, &[0u8; NET_HDR_LEN])?, 12, DESC_F_NEXT, 1)];
                let body = frame(8 * (n as usize - 1), 2);
                for i in 1..n {
                    let piece = &body[(i as usize - 1) * 8..i as usize * 8];
                    let flags = if i + 1 < n { DESC_F_NEXT } else { 0 };
                    descs.push(desc(buf(fe, piece)?, 8, flags, i + 1));
                }
                let t = table(fe, &descs)?;
                fe.write_desc(TX, 0, desc(t, (descs.len() * DESC_SIZE) as u32, DESC_F_INDIRECT, 0))?;
                offer(fe, TX, &[0])
            }),
            // A loop inside an indirect table: endless unless bounded.
            Case::sink_tx("indirect 0 -> 1 -> 0", |fe| {
                std_queues(fe)?;
                let hdr = buf(fe, &[0u8; NET_HDR_LEN])?;
                let body = buf(fe, &frame(64, 3))?;
                let t = table(
                    fe,
                    &[desc(hdr, NET_HDR_LEN as u32, DESC_F_NEXT, 1), desc(body, 64, DESC_F_NEXT, 0)],
                )?;
                fe.write_desc(TX, 0, desc(t, 2 * DESC_SIZE as u32, DESC_F_INDIRECT, 0))?;
                offer(fe, TX, &[0])
            }),
        ],
    );
}

// ---- 6. descriptor address outside guest memory -------------------------------------

#[test]
fn descriptor_address_outside_memory_breaks_queue() {
    run_cases(
        "addr-outside",
        &[
            Case::sink_tx("addr 0x1000", |fe| {
                std_queues(fe)?;
                fe.write_desc(TX, 0, desc(0x1000, 76, 0, 0))?;
                offer(fe, TX, &[0])
            }),
            Case::sink_tx("addr = end of memory", |fe| {
                std_queues(fe)?;
                let end = mem_end(fe);
                fe.write_desc(TX, 0, desc(end, 76, 0, 0))?;
                offer(fe, TX, &[0])
            }),
            Case::sink_tx("second segment outside", |fe| {
                std_queues(fe)?;
                let hdr = buf(fe, &[0u8; NET_HDR_LEN])?;
                fe.write_desc(TX, 0, desc(hdr, NET_HDR_LEN as u32, DESC_F_NEXT, 1))?;
                fe.write_desc(TX, 1, desc(0x1000, 64, 0, 0))?;
                offer(fe, TX, &[0])
            }),
        ],
    );
}

// ---- 7. address + len overflowing or crossing the end -------------------------------

#[test]
fn descriptor_range_overflow_or_crossing_end_breaks_queue() {
    run_cases(
        "addr-overflow",
        &[
            Case::sink_tx("addr + len wraps u64", |fe| {
                std_queues(fe)?;
                fe.write_desc(TX, 0, desc(u64::MAX - 15, 76, 0, 0))?;
                offer(fe, TX, &[0])
            }),
            Case::sink_tx("crosses the end of memory", |fe| {
                std_queues(fe)?;
                let end = mem_end(fe);
                fe.write_desc(TX, 0, desc(end - 16, 76, 0, 0))?;
                offer(fe, TX, &[0])
            }),
        ],
    );
}

// ---- 8. bad indirect tables ---------------------------------------------------------

/// An indirect descriptor at head 0 pointing at `(addr, len)`, where `addr` (if inside
/// memory) holds a valid one-entry table.
fn bad_indirect(fe: &mut RawFrontend, table_addr: Option<u64>, len: u32) -> R {
    std_queues(fe)?;
    let (g, l) = pkt(fe, 64)?;
    let valid = table(fe, &[desc(g, l, 0, 0), desc(g, l, 0, 0)])?;
    fe.write_desc(TX, 0, desc(table_addr.unwrap_or(valid), len, DESC_F_INDIRECT, 0))?;
    offer(fe, TX, &[0])
}

#[test]
fn bad_indirect_table_breaks_queue() {
    run_cases(
        "indirect-table",
        &[
            Case::sink_tx("table len 24", |fe| bad_indirect(fe, None, 24)),
            Case::sink_tx("table len 0", |fe| bad_indirect(fe, None, 0)),
            Case::sink_tx("table at 0x1000", |fe| bad_indirect(fe, Some(0x1000), 32)),
            Case::sink_tx("table crosses the end", |fe| {
                let end = mem_end(fe);
                bad_indirect(fe, Some(end - 16), 32)
            }),
        ],
    );
}

// ---- 9. nested indirect -------------------------------------------------------------

#[test]
fn nested_indirect_breaks_queue() {
    run_cases(
        "nested",
        &[
            Case::sink_tx("indirect -> indirect", |fe| {
                std_queues(fe)?;
                let (g, l) = pkt(fe, 64)?;
                let inner = table(fe, &[desc(g, l, 0, 0)])?;
                let outer = table(fe, &[desc(inner, DESC_SIZE as u32, DESC_F_INDIRECT, 0)])?;
                fe.write_desc(TX, 0, desc(outer, DESC_SIZE as u32, DESC_F_INDIRECT, 0))?;
                offer(fe, TX, &[0])
            }),
            Case::sink_tx("indirect -> header, indirect", |fe| {
                std_queues(fe)?;
                let hdr = buf(fe, &[0u8; NET_HDR_LEN])?;
                let body = buf(fe, &frame(64, 4))?;
                let inner = table(fe, &[desc(body, 64, 0, 0)])?;
                let outer = table(
                    fe,
                    &[
                        desc(hdr, NET_HDR_LEN as u32, DESC_F_NEXT, 1),
                        desc(inner, DESC_SIZE as u32, DESC_F_INDIRECT, 0),
                    ],
                )?;
                fe.write_desc(TX, 0, desc(outer, 2 * DESC_SIZE as u32, DESC_F_INDIRECT, 0))?;
                offer(fe, TX, &[0])
            }),
        ],
    );
}

// ---- 10. direction mismatch ---------------------------------------------------------

/// A device-readable buffer posted on RX.
fn readable_rx(fe: &mut RawFrontend) -> R {
    let b = fe.alloc(RX_BUF as usize, 64)?;
    fe.write_desc(RX, 0, desc(b, RX_BUF, 0, 0))?;
    offer(fe, RX, &[0])
}

#[test]
fn direction_mismatch_breaks_queue() {
    run_cases(
        "direction",
        &[
            Case::sink_tx("writable descriptor on TX", |fe| {
                std_queues(fe)?;
                let (g, l) = pkt(fe, 64)?;
                fe.write_desc(TX, 0, desc(g, l, DESC_F_WRITE, 0))?;
                offer(fe, TX, &[0])
            }),
            Case::sink_tx("readable header then writable body on TX", |fe| {
                std_queues(fe)?;
                let hdr = buf(fe, &[0u8; NET_HDR_LEN])?;
                let body = buf(fe, &frame(64, 5))?;
                fe.write_desc(TX, 0, desc(hdr, NET_HDR_LEN as u32, DESC_F_NEXT, 1))?;
                fe.write_desc(TX, 1, desc(body, 64, DESC_F_WRITE, 0))?;
                offer(fe, TX, &[0])
            }),
            Case::sink_tx("writable entry in an indirect table on TX", |fe| {
                std_queues(fe)?;
                let hdr = buf(fe, &[0u8; NET_HDR_LEN])?;
                let body = buf(fe, &frame(64, 6))?;
                let t = table(
                    fe,
                    &[desc(hdr, NET_HDR_LEN as u32, DESC_F_NEXT, 1), desc(body, 64, DESC_F_WRITE, 0)],
                )?;
                fe.write_desc(TX, 0, desc(t, 2 * DESC_SIZE as u32, DESC_F_INDIRECT, 0))?;
                offer(fe, TX, &[0])
            }),
            Case {
                name: "readable buffer on RX of gen",
                kind: "gen",
                queue: RX,
                attack: |fe| {
                    std_queues(fe)?;
                    readable_rx(fe)
                },
                rx_packets: 0,
                want: want(),
                used: 0,
                reason: None,
            },
            Case {
                // The guest sends one valid frame; reflecting it hits the bad RX buffer.
                name: "readable buffer on RX of reflect",
                kind: "reflect",
                queue: RX,
                attack: |fe| {
                    std_queues(fe)?;
                    readable_rx(fe)?;
                    let (g, l) = pkt(fe, 64)?;
                    fe.write_desc(TX, 0, desc(g, l, 0, 0))?;
                    offer(fe, TX, &[0])
                },
                rx_packets: 1,
                want: want(),
                used: 0,
                reason: None,
            },
        ],
    );
}

// ---- 11. ring address outside guest memory ------------------------------------------

/// Sets up RX normally and TX with a ring whose area `which` is moved to `at(fe)`;
/// then offers a valid packet on TX where the avail ring and descriptor table are
/// reachable, and kicks. The backend may refuse `SET_VRING_ADDR` (an error reply is
/// fine); it must never start the queue.
fn bad_ring(fe: &mut RawFrontend, which: &str, at: u64) -> R {
    fe.setup_queue(RX, BAD_RING)?;
    let mut a = RingAddrs {
        desc: fe.alloc(BAD_RING as usize * DESC_SIZE, 4096)?,
        avail: fe.alloc(4096, 64)?,
        used: fe.alloc(4096, 64)?,
    };
    match which {
        "desc" => a.desc = at,
        "avail" => a.avail = at,
        "used" => a.used = at,
        _ => return Err(format!("no ring area {which}")),
    }
    if let Err(e) = fe.setup_queue_at(TX, BAD_RING, a) {
        eprintln!("setup with {which} ring at {at:#x} refused (allowed): {e}");
    }
    let (g, l) = pkt(fe, 64)?;
    // Where the ring areas are reachable, make the queue look busy.
    let _ = fe.write_desc(TX, 0, desc(g, l, 0, 0));
    if fe.write_avail_slot(TX, 0, 0).is_ok() {
        fe.set_avail_idx(TX, 1)?;
    }
    fe.kick(TX)
}

#[test]
fn ring_address_outside_memory_never_starts() {
    run_cases(
        "ring-addr",
        &[
            Case::sink_tx("desc table at 0x1000", |fe| bad_ring(fe, "desc", 0x1000)),
            Case::sink_tx("avail ring at end of memory", |fe| {
                let end = mem_end(fe);
                bad_ring(fe, "avail", end)
            }),
            Case::sink_tx("used ring crosses the end", |fe| {
                let end = mem_end(fe);
                bad_ring(fe, "used", end - 8)
            }),
        ],
    );
}

// ---- positive: well-formed TX chains into a sink ------------------------------------

/// Starts a backend with one `sink` device per path and connects each (both queues,
/// ring `size`).
fn start_sinks(tag: &str, names: &[&str], size: u16) -> (TempDir, Backend, Vec<PathBuf>, Vec<RawFrontend>) {
    let dir = TempDir::new(tag);
    let paths: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    let mut args: Vec<String> = Vec::new();
    for p in &paths {
        args.push("--port".into());
        args.push(format!("sink:{}", p.display()));
    }
    args.extend(STATS_ARGS.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let backend = Backend::start(&argv);
    let fes = paths
        .iter()
        .map(|p| {
            let mut fe = RawFrontend::connect(p, MEM, want()).unwrap_or_else(|e| panic!("{e}"));
            fe.setup_queue(RX, size).unwrap_or_else(|e| panic!("{e}"));
            fe.setup_queue(TX, size).unwrap_or_else(|e| panic!("{e}"));
            fe
        })
        .collect();
    (dir, backend, paths, fes)
}

/// Asserts a sink device counted exactly `packets` frames of `bytes` bytes and nothing
/// else.
fn assert_sink(stats: &Value, path: &Path, packets: u64, bytes: u64) {
    let dev = harness::device(stats, path);
    assert_eq!(harness::counter(dev, "rx_packets"), packets, "rx_packets: {dev}");
    assert_eq!(harness::counter(dev, "rx_bytes"), bytes, "rx_bytes: {dev}");
    assert_eq!(harness::counter(dev, "tx_packets"), 0, "tx_packets: {dev}");
    assert_eq!(harness::total_drops(dev), 0, "drops: {dev}");
    assert_eq!(harness::counter(dev, "broken_queues"), 0, "broken_queues: {dev}");
}

/// Offers `chains` (head ids) on TX, waits until all are used, and checks the used ring
/// returns exactly those ids, each with len 0 (TX buffers are only read).
fn offer_and_check_used(fe: &RawFrontend, heads: &[u16]) -> R {
    offer(fe, TX, heads)?;
    fe.wait_used_idx(TX, heads.len() as u16, IO_TIMEOUT)?;
    let mut used = Vec::new();
    for slot in 0..heads.len() as u16 {
        used.push(fe.used_elem(TX, slot)?);
    }
    used.sort_unstable();
    let mut want: Vec<(u32, u32)> = heads.iter().map(|h| (*h as u32, 0)).collect();
    want.sort_unstable();
    if used != want {
        return Err(format!("used ring holds {used:?}, expected {want:?} (id, len)"));
    }
    Ok(())
}

#[test]
fn wellformed_chained_and_indirect_tx_is_counted_exactly() {
    let _serial = harness::serial();
    let (_dir, backend, paths, mut fes) = start_sinks("wellformed", &["raw.sock", "easy.sock"], 16);
    let mut frames_a: Vec<usize> = Vec::new();

    // Device "raw": chains written by hand.
    let fe = &mut fes[0];
    let mut heads = Vec::new();
    // A: one descriptor, header + 60-byte frame.
    let (g, l) = pkt(fe, 60).unwrap();
    fe.write_desc(TX, 0, desc(g, l, 0, 0)).unwrap();
    heads.push(0);
    frames_a.push(60);
    // B: header, then a 100-byte frame.
    let f = frame(100, 10);
    let h = buf(fe, &[0u8; NET_HDR_LEN]).unwrap();
    let b = buf(fe, &f).unwrap();
    fe.write_desc(TX, 1, desc(h, NET_HDR_LEN as u32, DESC_F_NEXT, 2)).unwrap();
    fe.write_desc(TX, 2, desc(b, 100, 0, 0)).unwrap();
    heads.push(1);
    frames_a.push(100);
    // C: header + 20 frame bytes, 50 bytes, 30 bytes, in descriptors 5 -> 3 -> 4 (out of
    // table order on purpose).
    let f = frame(100, 11);
    let mut first = vec![0u8; NET_HDR_LEN];
    first.extend_from_slice(&f[..20]);
    let p0 = buf(fe, &first).unwrap();
    let p1 = buf(fe, &f[20..70]).unwrap();
    let p2 = buf(fe, &f[70..]).unwrap();
    fe.write_desc(TX, 5, desc(p0, first.len() as u32, DESC_F_NEXT, 3)).unwrap();
    fe.write_desc(TX, 3, desc(p1, 50, DESC_F_NEXT, 4)).unwrap();
    fe.write_desc(TX, 4, desc(p2, 30, 0, 0)).unwrap();
    heads.push(5);
    frames_a.push(100);
    // D: indirect table: header, 64 bytes, 64 bytes.
    let f = frame(128, 12);
    let h = buf(fe, &[0u8; NET_HDR_LEN]).unwrap();
    let b0 = buf(fe, &f[..64]).unwrap();
    let b1 = buf(fe, &f[64..]).unwrap();
    let t = table(
        fe,
        &[desc(h, NET_HDR_LEN as u32, DESC_F_NEXT, 1), desc(b0, 64, DESC_F_NEXT, 2), desc(b1, 64, 0, 0)],
    )
    .unwrap();
    fe.write_desc(TX, 6, desc(t, 3 * DESC_SIZE as u32, DESC_F_INDIRECT, 0)).unwrap();
    heads.push(6);
    frames_a.push(128);
    // E: indirect table of one entry, header + 1514-byte frame.
    let (g, l) = pkt(fe, 1514).unwrap();
    let t = table(fe, &[desc(g, l, 0, 0)]).unwrap();
    fe.write_desc(TX, 9, desc(t, DESC_SIZE as u32, DESC_F_INDIRECT, 0)).unwrap();
    heads.push(9);
    frames_a.push(1514);
    // F: indirect table whose chain runs out of table order: 0 (header) -> 2 -> 1.
    let f = frame(90, 13);
    let h = buf(fe, &[0u8; NET_HDR_LEN]).unwrap();
    let b0 = buf(fe, &f[..45]).unwrap();
    let b1 = buf(fe, &f[45..]).unwrap();
    let t = table(
        fe,
        &[desc(h, NET_HDR_LEN as u32, DESC_F_NEXT, 2), desc(b1, 45, 0, 0), desc(b0, 45, DESC_F_NEXT, 1)],
    )
    .unwrap();
    fe.write_desc(TX, 12, desc(t, 3 * DESC_SIZE as u32, DESC_F_INDIRECT, 0)).unwrap();
    heads.push(12);
    frames_a.push(90);
    offer_and_check_used(fe, &heads).unwrap();

    // Device "easy": 3 rounds of 10 frames through a ring of 16, so the avail and used
    // indices wrap around the ring.
    let fe = &mut fes[1];
    let mut frames_b: Vec<usize> = Vec::new();
    for round in 0..3u8 {
        let frames: Vec<Vec<u8>> = (0..10).map(|i| frame(60 + 97 * i, round)).collect();
        frames_b.extend(frames.iter().map(Vec::len));
        fe.send_frames(TX, &frames).unwrap();
        fe.wait_tx_done(TX, IO_TIMEOUT).unwrap();
    }

    let (na, ba) = (frames_a.len() as u64, frames_a.iter().sum::<usize>() as u64);
    let (nb, bb) = (frames_b.len() as u64, frames_b.iter().sum::<usize>() as u64);
    let stats = backend.wait_stats(STATS_TIMEOUT, |s| {
        find_dev(s, &paths[0]).is_some_and(|d| d["rx_packets"].as_u64() == Some(na))
            && find_dev(s, &paths[1]).is_some_and(|d| d["rx_packets"].as_u64() == Some(nb))
    });
    assert_sink(&stats, &paths[0], na, ba);
    assert_sink(&stats, &paths[1], nb, bb);
    let last = backend.stop();
    assert_sink(&last, &paths[0], na, ba);
    assert_sink(&last, &paths[1], nb, bb);
}

#[test]
fn tx_indirect_spec_corner_cases_are_accepted() {
    // virtio 1.2 §2.7.5.3.2: the device MUST handle normal chained descriptors followed
    // by one indirect descriptor, and MUST ignore VIRTQ_DESC_F_WRITE on a descriptor
    // that refers to an indirect table.
    let _serial = harness::serial();
    let (_dir, backend, paths, mut fes) = start_sinks("corner", &["corner.sock"], 16);
    let fe = &mut fes[0];
    // Direct header, then an indirect table with the 200-byte frame in two pieces.
    let f = frame(200, 20);
    let h = buf(fe, &[0u8; NET_HDR_LEN]).unwrap();
    let b0 = buf(fe, &f[..120]).unwrap();
    let b1 = buf(fe, &f[120..]).unwrap();
    let t = table(fe, &[desc(b0, 120, DESC_F_NEXT, 1), desc(b1, 80, 0, 0)]).unwrap();
    fe.write_desc(TX, 0, desc(h, NET_HDR_LEN as u32, DESC_F_NEXT, 1)).unwrap();
    fe.write_desc(TX, 1, desc(t, 2 * DESC_SIZE as u32, DESC_F_INDIRECT, 0)).unwrap();
    // An indirect descriptor with WRITE set (to be ignored) over header + 300 bytes.
    let (g, l) = pkt(fe, 300).unwrap();
    let t = table(fe, &[desc(g, l, 0, 0)]).unwrap();
    fe.write_desc(TX, 2, desc(t, DESC_SIZE as u32, DESC_F_INDIRECT | DESC_F_WRITE, 0)).unwrap();
    offer_and_check_used(fe, &[0, 2]).unwrap();

    let stats = backend.wait_stats(STATS_TIMEOUT, |s| {
        find_dev(s, &paths[0]).is_some_and(|d| d["rx_packets"].as_u64() == Some(2))
    });
    assert_sink(&stats, &paths[0], 2, 500);
    let last = backend.stop();
    assert_sink(&last, &paths[0], 2, 500);
}

// ---- packed rings (virtio 1.2 §2.8) -------------------------------------------------

/// Features of a packed-ring guest: [`want`] and `VIRTIO_F_RING_PACKED`.
fn want_packed() -> u64 {
    want() | features::bit(features::RING_PACKED)
}

/// AVAIL/USED bits of a descriptor made available in the first lap (wrap counter 1).
const AV: u16 = packed::avail_flags(true);
/// The bits of the other wrap counter: a descriptor available only in the second lap.
const AV_OTHER_LAP: u16 = packed::avail_flags(false);
/// NEXT, WRITE and INDIRECT of a packed descriptor.
const P_NEXT: u16 = packed::DESC_F_NEXT;
const P_WRITE: u16 = packed::DESC_F_WRITE;
const P_INDIRECT: u16 = packed::DESC_F_INDIRECT;

fn pdesc(addr: u64, len: u32, id: u16, flags: u16) -> PackedDescriptor {
    PackedDescriptor { addr, len, id, flags }
}

/// Sets up RX and TX of pair 0 as packed rings of `BAD_RING` entries.
fn packed_queues(fe: &mut RawFrontend) -> R {
    fe.setup_packed_queue(RX, BAD_RING)?;
    fe.setup_packed_queue(TX, BAD_RING)
}

/// Writes `descs` into packed ring `queue` (of `BAD_RING` entries) at positions `first`,
/// `first + 1`, ... (around the end), the last one first, so that the first one's flags
/// make the whole run visible at once; then kicks.
fn packed_offer(fe: &RawFrontend, queue: u16, first: u16, descs: &[PackedDescriptor]) -> R {
    for (k, d) in descs.iter().enumerate().rev() {
        fe.write_packed_desc(queue, (first + k as u16) % BAD_RING, *d)?;
    }
    fe.kick(queue)
}

/// Writes `descs` as a packed indirect table (§2.8.7: packed descriptors, in order) in
/// fresh guest memory; returns its gpa.
fn ptable(fe: &mut RawFrontend, descs: &[PackedDescriptor]) -> Result<u64, String> {
    let mut bytes = Vec::with_capacity(descs.len() * packed::DESC_SIZE);
    for d in descs {
        let (w0, w1) = d.to_le_words();
        bytes.extend_from_slice(&w0.to_ne_bytes());
        bytes.extend_from_slice(&w1.to_ne_bytes());
    }
    let gpa = fe.alloc(bytes.len().max(1), 16)?;
    fe.write_mem(gpa, &bytes)?;
    Ok(gpa)
}

/// A valid header + `frame_len`-byte packet as a one-entry packed indirect table; returns
/// the table's gpa (16 bytes long).
fn one_entry_ptable(fe: &mut RawFrontend, frame_len: usize) -> Result<u64, String> {
    let (g, l) = pkt(fe, frame_len)?;
    ptable(fe, &[pdesc(g, l, 0, 0)])
}

/// (a) Bad buffers: outside guest memory, wrapping, the wrong direction for the queue.
#[test]
fn packed_bad_descriptor_breaks_queue() {
    run_cases(
        "packed-desc",
        &[
            Case::packed_tx("packed: addr 0x1000", |fe| {
                packed_queues(fe)?;
                packed_offer(fe, TX, 0, &[pdesc(0x1000, 76, 0, AV)])
            })
            .because("buffer 0x1000+0x4c outside guest memory"),
            Case::packed_tx("packed: addr = end of memory", |fe| {
                packed_queues(fe)?;
                let end = mem_end(fe);
                packed_offer(fe, TX, 0, &[pdesc(end, 76, 0, AV)])
            })
            .because("+0x4c outside guest memory"),
            Case::packed_tx("packed: addr + len wraps u64", |fe| {
                packed_queues(fe)?;
                packed_offer(fe, TX, 0, &[pdesc(u64::MAX - 15, 76, 0, AV)])
            })
            .because("buffer 0xfffffffffffffff0+0x4c outside guest memory"),
            Case::packed_tx("packed: second descriptor of a chain outside memory", |fe| {
                packed_queues(fe)?;
                let hdr = buf(fe, &[0u8; NET_HDR_LEN])?;
                packed_offer(
                    fe,
                    TX,
                    0,
                    &[pdesc(hdr, NET_HDR_LEN as u32, 0, AV | P_NEXT), pdesc(0x1000, 64, 0, AV)],
                )
            })
            .because("buffer 0x1000+0x40 outside guest memory"),
            Case::packed_tx("packed: writable descriptor on TX", |fe| {
                packed_queues(fe)?;
                let (g, l) = pkt(fe, 64)?;
                packed_offer(fe, TX, 0, &[pdesc(g, l, 0, AV | P_WRITE)])
            })
            .because("buffer direction does not match the queue"),
            Case::packed_rx("packed: readable buffer on RX of gen", "gen", |fe| {
                packed_queues(fe)?;
                let b = fe.alloc(RX_BUF as usize, 64)?;
                packed_offer(fe, RX, 0, &[pdesc(b, RX_BUF, 0, AV)])
            })
            .because("buffer direction does not match the queue"),
            // The guest sends one valid frame; reflecting it hits the bad RX buffer.
            Case::packed_rx("packed: readable buffer on RX of reflect", "reflect", |fe| {
                packed_queues(fe)?;
                let b = fe.alloc(RX_BUF as usize, 64)?;
                packed_offer(fe, RX, 0, &[pdesc(b, RX_BUF, 0, AV)])?;
                let (g, l) = pkt(fe, 64)?;
                packed_offer(fe, TX, 0, &[pdesc(g, l, 0, AV)])
            })
            .served(1, 0)
            .because("buffer direction does not match the queue"),
        ],
    );
}

/// (b) Wrap-counter lies: a chain continuing into a descriptor whose AVAIL/USED bits do
/// not say "available" for the wrap counter of its position.
#[test]
fn packed_wrap_counter_lie_breaks_queue() {
    run_cases(
        "packed-wrap",
        &[
            Case::packed_tx("packed: NEXT into a descriptor of the other lap", |fe| {
                packed_queues(fe)?;
                let hdr = buf(fe, &[0u8; NET_HDR_LEN])?;
                let body = buf(fe, &frame(64, 7))?;
                packed_offer(
                    fe,
                    TX,
                    0,
                    &[pdesc(hdr, NET_HDR_LEN as u32, 0, AV | P_NEXT), pdesc(body, 64, 0, AV_OTHER_LAP)],
                )
            })
            .because("continues into descriptor 1, which is not available"),
            // (The one descriptor marked used in the ring is the lie itself.)
            Case::packed_tx("packed: NEXT into a descriptor marked used", |fe| {
                packed_queues(fe)?;
                let hdr = buf(fe, &[0u8; NET_HDR_LEN])?;
                let body = buf(fe, &frame(64, 8))?;
                let used = packed::used_flags(true);
                packed_offer(
                    fe,
                    TX,
                    0,
                    &[pdesc(hdr, NET_HDR_LEN as u32, 0, AV | P_NEXT), pdesc(body, 64, 0, used)],
                )
            })
            .served(0, 1)
            .because("continues into descriptor 1, which is not available"),
            // Seven good frames take the device to the last position of the first lap;
            // a chain from there continues into position 0, which in the second lap must
            // read AVAIL = 0, USED = 1, but keeps the first lap's AVAIL = 1, USED = 0.
            // (Position 0's used descriptor is overwritten by that lie: six stay used.)
            Case::packed_tx("packed: NEXT across the ring's end into a stale wrap counter", |fe| {
                packed_queues(fe)?;
                let n = BAD_RING - 1;
                let mut descs = Vec::new();
                for id in 0..n {
                    let (g, l) = pkt(fe, 64)?;
                    descs.push(pdesc(g, l, id, AV));
                }
                packed_offer(fe, TX, 0, &descs)?;
                // Position 0's flags are the burst's last store: wait for it, then the rest.
                fe.wait_packed_used(TX, 0, true, IO_TIMEOUT)?;
                fe.wait_packed_used(TX, n - 1, true, IO_TIMEOUT)?;
                let hdr = buf(fe, &[0u8; NET_HDR_LEN])?;
                let body = buf(fe, &frame(64, 9))?;
                packed_offer(
                    fe,
                    TX,
                    n,
                    &[pdesc(hdr, NET_HDR_LEN as u32, 0, AV | P_NEXT), pdesc(body, 64, 0, AV)],
                )
            })
            .served(BAD_RING as u64 - 1, BAD_RING - 2)
            .because("continues into descriptor 0, which is not available"),
        ],
    );
}

/// (c) Ids, chain extents and indirect descriptors: an id made available again while the
/// device holds it, a NEXT chain longer than the ring, and indirect descriptors that are
/// not offered, in a list, of a bad length, too long, outside memory or nested.
#[test]
fn packed_bad_id_chain_or_indirect_breaks_queue() {
    run_cases(
        "packed-id",
        &[
            // The first is a valid frame, taken and completed; the second reuses its id
            // in the same burst.
            Case::packed_tx("packed: one buffer id twice in one burst", |fe| {
                packed_queues(fe)?;
                let (g, l) = pkt(fe, 64)?;
                packed_offer(fe, TX, 0, &[pdesc(g, l, 5, AV), pdesc(g, l, 5, AV)])
            })
            .served(1, 1)
            .because("buffer id 5 made available while in flight"),
            Case::packed_tx("packed: NEXT chain around the whole ring", |fe| {
                packed_queues(fe)?;
                let hdr = buf(fe, &[0u8; NET_HDR_LEN])?;
                let body = buf(fe, &frame(64, 10))?;
                let mut descs = vec![pdesc(hdr, NET_HDR_LEN as u32, 0, AV | P_NEXT)];
                descs.extend((1..BAD_RING).map(|_| pdesc(body, 8, 0, AV | P_NEXT)));
                packed_offer(fe, TX, 0, &descs)
            })
            .because("descriptor chain loops or is longer than its table"),
            Case::packed_tx("packed: indirect descriptor without INDIRECT_DESC", |fe| {
                packed_queues(fe)?;
                let t = one_entry_ptable(fe, 64)?;
                packed_offer(fe, TX, 0, &[pdesc(t, packed::DESC_SIZE as u32, 0, AV | P_INDIRECT)])
            })
            .without(features::RING_INDIRECT_DESC)
            .because("malformed indirect descriptor (len 16)"),
            Case::packed_tx("packed: indirect descriptor in a NEXT list", |fe| {
                packed_queues(fe)?;
                let hdr = buf(fe, &[0u8; NET_HDR_LEN])?;
                let body = buf(fe, &frame(64, 11))?;
                let t = ptable(fe, &[pdesc(body, 64, 0, 0)])?;
                packed_offer(
                    fe,
                    TX,
                    0,
                    &[
                        pdesc(hdr, NET_HDR_LEN as u32, 0, AV | P_NEXT),
                        pdesc(t, packed::DESC_SIZE as u32, 0, AV | P_INDIRECT),
                    ],
                )
            })
            .because("malformed indirect descriptor (len 16)"),
            Case::packed_tx("packed: indirect table of 24 bytes", |fe| {
                packed_queues(fe)?;
                let t = one_entry_ptable(fe, 64)?;
                packed_offer(fe, TX, 0, &[pdesc(t, 24, 0, AV | P_INDIRECT)])
            })
            .because("malformed indirect descriptor (len 24)"),
            Case::packed_tx("packed: indirect table of size + 1 entries", |fe| {
                packed_queues(fe)?;
                let n = BAD_RING as usize + 1;
                let body = frame(8 * (n - 1), 12);
                let mut descs = vec![pdesc(buf(fe, &[0u8; NET_HDR_LEN])?, NET_HDR_LEN as u32, 0, 0)];
                for piece in body.chunks(8) {
                    descs.push(pdesc(buf(fe, piece)?, 8, 0, 0));
                }
                let t = ptable(fe, &descs)?;
                packed_offer(fe, TX, 0, &[pdesc(t, (n * packed::DESC_SIZE) as u32, 0, AV | P_INDIRECT)])
            })
            .because("malformed indirect descriptor (len 144)"),
            Case::packed_tx("packed: indirect table crosses the end of memory", |fe| {
                packed_queues(fe)?;
                let end = mem_end(fe);
                packed_offer(fe, TX, 0, &[pdesc(end - 16, 32, 0, AV | P_INDIRECT)])
            })
            .because("+0x20 outside guest memory"),
            Case::packed_tx("packed: indirect table inside an indirect table", |fe| {
                packed_queues(fe)?;
                let inner = one_entry_ptable(fe, 64)?;
                let outer = ptable(fe, &[pdesc(inner, packed::DESC_SIZE as u32, 0, P_INDIRECT)])?;
                packed_offer(fe, TX, 0, &[pdesc(outer, packed::DESC_SIZE as u32, 0, AV | P_INDIRECT)])
            })
            .because("malformed indirect descriptor (len 16)"),
        ],
    );
}

/// Exact counters of a device that must not have broken: frames taken from TX
/// (`rx_packets`) and delivered to RX (`tx_packets`), short-frame and too-small-buffer
/// drops, and nothing else.
fn assert_unbroken(stats: &Value, path: &Path, what: &str, rx: u64, tx: u64, short: u64, small: u64) {
    let dev = harness::device(stats, path);
    assert_eq!(harness::counter(dev, "rx_packets"), rx, "{what}: rx_packets: {dev}");
    assert_eq!(harness::counter(dev, "tx_packets"), tx, "{what}: tx_packets: {dev}");
    assert_eq!(harness::counter(dev, "drops.short_frame"), short, "{what}: short_frame: {dev}");
    assert_eq!(
        harness::counter(dev, "drops.rx_buffer_too_small"),
        small,
        "{what}: rx_buffer_too_small: {dev}"
    );
    assert_eq!(harness::total_drops(dev), short + small, "{what}: drops: {dev}");
    assert_eq!(harness::counter(dev, "broken_queues"), 0, "{what}: broken_queues: {dev}");
    assert_eq!(pair_broken(dev, 0), Some(false), "{what}: queue pair 0: {dev}");
}

/// What a packed ring must NOT break on, each with an exact outcome, and a zero-length
/// buffer treated on a packed ring exactly as on a split one:
/// * a head whose AVAIL/USED bits have the other lap's polarity is not available yet
///   (§2.8.1): the device leaves it alone; the same descriptor made available properly
///   is then served;
/// * a buffer id beyond the ring size is the driver's number (§2.8.6 only asks that ids
///   in flight be unique): served, and returned as is in the used descriptor;
/// * a used descriptor flipped back to "available" in the same lap lies behind the
///   device: it is not taken twice;
/// * a zero-length TX buffer is a short frame (dropped, completed), a zero-length RX
///   buffer too small for any frame (the frame dropped, the buffer left), on both
///   layouts.
#[test]
fn packed_benign_lies_are_served_or_ignored_exactly() {
    let _serial = harness::serial();
    let dir = TempDir::new("packed-benign");
    let names = ["psink.sock", "preflect.sock", "ssink.sock", "sreflect.sock"];
    let paths: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
    let kinds = ["sink", "reflect", "sink", "reflect"];
    let mut args: Vec<String> = Vec::new();
    for (kind, p) in kinds.iter().zip(&paths) {
        args.push("--port".into());
        args.push(format!("{kind}:{}", p.display()));
    }
    args.extend(STATS_ARGS.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut backend = Backend::start(&argv);

    // Packed sink.
    let mut ps = RawFrontend::connect(&paths[0], MEM, want_packed()).unwrap();
    packed_queues(&mut ps).unwrap();
    let (g, l) = pkt(&mut ps, 64).unwrap();
    packed_offer(&ps, TX, 0, &[pdesc(g, l, 0, AV_OTHER_LAP)]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ps.packed_desc(TX, 0).unwrap(), pdesc(g, l, 0, AV_OTHER_LAP), "the device took a lap-2 head");
    packed_offer(&ps, TX, 0, &[pdesc(g, l, 0xffff, AV)]).unwrap();
    let u = ps.wait_packed_used(TX, 0, true, IO_TIMEOUT).unwrap();
    assert_eq!((u.id, u.len), (0xffff, 0), "used descriptor for the id beyond the ring size");
    // Flipped back to available, then a new frame after it: one more frame, not two.
    ps.write_packed_desc(TX, 0, pdesc(g, l, 0xffff, AV)).unwrap();
    let (g2, l2) = pkt(&mut ps, 100).unwrap();
    packed_offer(&ps, TX, 1, &[pdesc(g2, l2, 1, AV)]).unwrap();
    let u = ps.wait_packed_used(TX, 1, true, IO_TIMEOUT).unwrap();
    assert_eq!((u.id, u.len), (1, 0));
    // Zero length.
    packed_offer(&ps, TX, 2, &[pdesc(g, 0, 2, AV)]).unwrap();
    let u = ps.wait_packed_used(TX, 2, true, IO_TIMEOUT).unwrap();
    assert_eq!((u.id, u.len), (2, 0));
    assert_eq!(ps.packed_desc(TX, 0).unwrap().flags, AV, "the flipped descriptor was not used again");

    // Packed reflect: a zero-length receive buffer, then one frame to reflect into it.
    let mut pr = RawFrontend::connect(&paths[1], MEM, want_packed()).unwrap();
    packed_queues(&mut pr).unwrap();
    let b = pr.alloc(RX_BUF as usize, 64).unwrap();
    packed_offer(&pr, RX, 0, &[pdesc(b, 0, 0, AV | P_WRITE)]).unwrap();
    let (g, l) = pkt(&mut pr, 64).unwrap();
    packed_offer(&pr, TX, 0, &[pdesc(g, l, 3, AV)]).unwrap();
    let u = pr.wait_packed_used(TX, 0, true, IO_TIMEOUT).unwrap();
    assert_eq!((u.id, u.len), (3, 0));

    // The same zero-length buffers on split rings.
    let mut ss = RawFrontend::connect(&paths[2], MEM, want()).unwrap();
    std_queues(&mut ss).unwrap();
    let (g, _) = pkt(&mut ss, 64).unwrap();
    ss.write_desc(TX, 0, desc(g, 0, 0, 0)).unwrap();
    offer(&ss, TX, &[0]).unwrap();
    ss.wait_used_idx(TX, 1, IO_TIMEOUT).unwrap();
    assert_eq!(ss.used_elem(TX, 0).unwrap(), (0, 0));
    let mut sr = RawFrontend::connect(&paths[3], MEM, want()).unwrap();
    std_queues(&mut sr).unwrap();
    let b = sr.alloc(RX_BUF as usize, 64).unwrap();
    sr.write_desc(RX, 0, desc(b, 0, DESC_F_WRITE, 0)).unwrap();
    offer(&sr, RX, &[0]).unwrap();
    let (g, l) = pkt(&mut sr, 64).unwrap();
    sr.write_desc(TX, 0, desc(g, l, 0, 0)).unwrap();
    offer(&sr, TX, &[0]).unwrap();
    sr.wait_used_idx(TX, 1, IO_TIMEOUT).unwrap();

    let check = |s: &Value| {
        assert_unbroken(s, &paths[0], "packed sink", 2, 0, 1, 0);
        assert_unbroken(s, &paths[1], "packed reflect", 1, 0, 0, 1);
        assert_unbroken(s, &paths[2], "split sink", 0, 0, 1, 0);
        assert_unbroken(s, &paths[3], "split reflect", 1, 0, 0, 1);
    };
    let stats = backend.wait_stats(STATS_TIMEOUT, |s| {
        find_dev(s, &paths[0]).is_some_and(|d| d["rx_packets"].as_u64() == Some(2))
            && [&paths[1], &paths[3]]
                .iter()
                .all(|p| find_dev(s, p).is_some_and(|d| d["rx_packets"].as_u64() == Some(1)))
            && find_dev(s, &paths[2]).is_some_and(|d| d["drops"]["short_frame"].as_u64() == Some(1))
    });
    check(&stats);
    // The zero-length receive buffers were left where they were.
    assert!(!packed::is_used(pr.packed_desc(RX, 0).unwrap().flags, true), "packed RX buffer used");
    assert_eq!(sr.used_idx(RX).unwrap(), 0, "split RX buffer used");
    assert!(backend.is_running(), "backend died; log:\n{}", backend.log());
    let last = backend.stop();
    check(&last);
}

/// A packed `reflect` burst whose plain frames are forwarded by the backend's loop for
/// plain frames (`port/plain.rs`) until a frame that is not plain, where the general loop
/// takes over within the same burst: five frames made available at once (the first
/// one's flags written last), five receive buffers before them. Frame 1 is too short
/// (a counted drop, completed, no receive buffer used), frame 3 an indirect table (the
/// general walk); every other frame, and frame 3, arrives byte for byte in the next
/// receive buffer, with a header saying one buffer, in order.
#[test]
fn packed_reflect_hands_plain_frames_over_to_the_general_loop_mid_burst() {
    let _serial = harness::serial();
    let dir = TempDir::new("packed-plain");
    let path = dir.join("reflect.sock");
    let mut args = vec!["--port".to_string(), format!("reflect:{}", path.display())];
    args.extend(STATS_ARGS.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut backend = Backend::start(&argv);
    let mut fe = RawFrontend::connect(&path, MEM, want_packed()).unwrap();
    packed_queues(&mut fe).unwrap();

    let mut rx = Vec::new();
    for id in 0..5u16 {
        let b = fe.alloc(RX_BUF as usize, 64).unwrap();
        rx.push(pdesc(b, RX_BUF, id, AV | P_WRITE));
    }
    packed_offer(&fe, RX, 0, &rx).unwrap();
    // Frame lengths (without the header); 10 is shorter than an Ethernet header.
    let lens = [64usize, 10, 100, 80, 70];
    let mut tx = Vec::new();
    let mut frames = Vec::new();
    for (id, &len) in lens.iter().enumerate() {
        let f = if len >= 14 { frame(len, id as u8) } else { vec![0xab; len] };
        let mut bytes = vec![0u8; NET_HDR_LEN];
        bytes.extend_from_slice(&f);
        let g = buf(&mut fe, &bytes).unwrap();
        let d = if id == 3 {
            let t = ptable(&mut fe, &[pdesc(g, bytes.len() as u32, 0, 0)]).unwrap();
            pdesc(t, packed::DESC_SIZE as u32, id as u16, AV | P_INDIRECT)
        } else {
            pdesc(g, bytes.len() as u32, id as u16, AV)
        };
        tx.push(d);
        frames.push(f);
    }
    packed_offer(&fe, TX, 0, &tx).unwrap();

    // Every transmitted chain is completed (no IN_ORDER: one used descriptor each).
    for pos in 0..5u16 {
        let u = fe.wait_packed_used(TX, pos, true, IO_TIMEOUT).unwrap();
        assert_eq!((u.id, u.len), (pos, 0), "TX used descriptor {pos}");
    }
    // Frames 0, 2, 3, 4 in receive buffers 0..4, in order; buffer 4 left.
    let mut hdr = [0u8; NET_HDR_LEN];
    hdr[driver::layout::NET_HDR_NUM_BUFFERS] = 1;
    for (pos, k) in [0usize, 2, 3, 4].into_iter().enumerate() {
        let u = fe.wait_packed_used(RX, pos as u16, true, IO_TIMEOUT).unwrap();
        let want_len = (NET_HDR_LEN + lens[k]) as u32;
        assert_eq!((u.id, u.len), (pos as u16, want_len), "RX used descriptor {pos} (frame {k})");
        let got = fe.read_mem(rx[pos].addr, want_len as usize).unwrap();
        assert_eq!(&got[..NET_HDR_LEN], &hdr[..], "header of frame {k}");
        assert_eq!(&got[NET_HDR_LEN..], &frames[k][..], "bytes of frame {k}");
    }
    std::thread::sleep(Duration::from_millis(100));
    assert!(!packed::is_used(fe.packed_desc(RX, 4).unwrap().flags, true), "receive buffer 4 used");

    let check = |s: &Value| {
        let dev = harness::device(s, &path);
        assert_eq!(harness::counter(dev, "rx_bytes"), (64 + 100 + 80 + 70) as u64, "rx_bytes: {dev}");
        assert_eq!(harness::counter(dev, "tx_bytes"), (64 + 100 + 80 + 70) as u64, "tx_bytes: {dev}");
        assert_unbroken(s, &path, "packed reflect", 4, 4, 1, 0);
    };
    let stats = backend.wait_stats(STATS_TIMEOUT, |s| {
        find_dev(s, &path).is_some_and(|d| d["tx_packets"].as_u64() == Some(4))
    });
    check(&stats);
    assert!(backend.is_running(), "backend died; log:\n{}", backend.log());
    let last = backend.stop();
    check(&last);
}

/// Sets up RX normally and TX as a packed ring whose area `which` is moved to `at`, or
/// (`which` = "base") whose `SET_VRING_BASE` is `at`; then makes a valid packet available
/// at position 0 where the descriptor ring is reachable, and kicks. The backend may
/// refuse the setup message (an error reply is fine); it must never start the queue.
fn bad_packed_ring(fe: &mut RawFrontend, which: &str, at: u64) -> R {
    fe.setup_packed_queue(RX, BAD_RING)?;
    let mut a = RingAddrs {
        desc: fe.alloc(packed::desc_ring_bytes(BAD_RING) + 16, 4096)?,
        avail: fe.alloc(packed::EVENT_SIZE, 64)?,
        used: fe.alloc(packed::EVENT_SIZE, 64)?,
    };
    let mut base = packed::event_off_wrap(0, true);
    match which {
        "desc" => a.desc = at,
        "driver" => a.avail = at,
        "device" => a.used = at,
        "base" => base = at as u16,
        _ => return Err(format!("no packed ring area {which}")),
    }
    if let Err(e) = fe.setup_packed_queue_at(TX, BAD_RING, a, base) {
        eprintln!("packed setup with {which} at {at:#x} refused (allowed): {e}");
    }
    let (g, l) = pkt(fe, 64)?;
    // Where the descriptor ring is reachable, make the queue look busy (from position 0
    // and from the bad base's offset).
    let _ = fe.write_packed_desc(TX, 0, pdesc(g, l, 0, AV));
    fe.kick(TX)
}

/// Packed ring setup the backend must refuse at activation: a base offset outside the
/// ring, areas (partly) outside guest memory. (Misaligned areas never get this far: the
/// `vhost` crate refuses such a `SET_VRING_ADDR` and closes the connection.)
#[test]
fn packed_bad_ring_setup_never_starts() {
    run_cases(
        "packed-ring",
        &[
            Case::packed_tx("packed: base offset = ring size", |fe| {
                bad_packed_ring(fe, "base", (BAD_RING | packed::EVENT_F_WRAP_CTR) as u64)
            })
            .because("ring base 0x8008 outside the ring"),
            Case::packed_tx("packed: descriptor ring crosses the end of memory", |fe| {
                let end = mem_end(fe);
                bad_packed_ring(fe, "desc", end - 64)
            })
            .because("ring areas misaligned or outside guest memory"),
            Case::packed_tx("packed: descriptor ring at 0x1000", |fe| bad_packed_ring(fe, "desc", 0x1000))
                .because("ring areas misaligned or outside guest memory"),
            Case::packed_tx("packed: driver event area at the end of memory", |fe| {
                let end = mem_end(fe);
                bad_packed_ring(fe, "driver", end)
            })
            .because("ring areas misaligned or outside guest memory"),
            Case::packed_tx("packed: device event area at the end of memory", |fe| {
                let end = mem_end(fe);
                bad_packed_ring(fe, "device", end)
            })
            .because("ring areas misaligned or outside guest memory"),
        ],
    );
}
