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

use std::path::{Path, PathBuf};
use std::time::Duration;

use driver::layout::{
    features, Descriptor, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DESC_SIZE, NET_HDR_LEN,
};
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
}

impl Case {
    fn sink_tx(name: &'static str, attack: fn(&mut RawFrontend) -> R) -> Case {
        Case { name, kind: "sink", queue: TX, attack, rx_packets: 0 }
    }
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

/// Asserts the backend completed nothing on the broken queue: its used index is still
/// 0. Only a used ring placed outside guest memory (test 11) cannot be read from here.
fn assert_unused(case: &Case, fe: &RawFrontend) {
    let (_, ring) = fe.ring(case.queue).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let (start, size) = fe.mem_range();
    let readable = ring.used >= start && ring.used + 4 <= start + size;
    match fe.used_idx(case.queue) {
        Ok(used) => assert_eq!(used, 0, "{}: used idx of the broken queue", case.name),
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
        let mut fe =
            RawFrontend::connect(path, MEM, want()).unwrap_or_else(|e| panic!("{}: connect: {e}", case.name));
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
