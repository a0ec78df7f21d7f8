//! The driver treats the device as hostile (docs/ARCHITECTURE.md, "Trust boundaries": used
//! ids and lengths are checked).
//!
//! Every test starts an `evil-device` process (`vnet_tests::evildevice`), opens a
//! `driver::Port` on it in virtio-user mode, reflects a few frames faithfully, then makes
//! the device write one bad used entry (one variant per test, on the receive or the
//! transmit queue) and proves that:
//!
//! * the driver does not panic, and the queue reports exactly the matching
//!   `DeviceError` (the one the device says it provoked, itself checked against what the
//!   driver posted), while the other queue of the pair is unaffected;
//! * `port.stats()` counts exactly one device error;
//! * no packet is delivered and no buffer is freed on the strength of the bad entry
//!   (exact packet counters, no device-written poison in any received packet, and the
//!   pool's free count plus the buffers in flight plus the packets the test holds add up
//!   to the pool's capacity at every step);
//! * further bursts on the stopped queue return 0 and do not touch its ring (the device
//!   hashes the descriptor table and avail ring before and after);
//! * after `port.close`, every buffer is back exactly once: the pool is full, never
//!   over-full, and allocating all of it yields distinct buffers.
//!
//! A `good` test shows the evil device is a faithful device when told to be: hundreds
//! of frames reflected byte-for-byte with exact counters.
//!
//! The `in_order_*` tests repeat the faults with `VIRTIO_F_IN_ORDER` negotiated (the
//! device offers it with `--in-order`), where the driver knows which buffer a used
//! element is for before it reads it: receive elements are still checked the same way,
//! and the transmit reclaim reads no element at all, so only a used index that jumps
//! past what is in flight can break the transmit queue there.
//!
//! The `packed_*` tests repeat them on packed rings (`PortConfig::packed`; the device
//! offers `VIRTIO_F_RING_PACKED` with `--packed`), where used descriptors are written into
//! the descriptor ring in ring order: ids out of range, not in flight or completed twice,
//! receive lengths too large, and used descriptors marked with the wrong wrap counter
//! stop the queue the same way; there is no used index to jump, and a used descriptor
//! written ahead of the used position is not looked at (nothing is taken, nothing
//! stops). On a packed ring the transmit length is not checked (the driver never uses
//! it; see `driver::ring::packed::used`): a transmit length too large stops nothing.
//!
//! The `*_merge_*` tests negotiate `VIRTIO_NET_F_MRG_RXBUF` and lie in the mergeable
//! header of a received frame (split and packed rings): `num_buffers` 0, a frame that
//! claims more buffers than the device used, a later buffer of length 0. Each stops the
//! receive queue with its own `DeviceError`; the lying frame's buffers go back to the
//! pool (the device did return them), nothing of it is delivered.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use driver::layout::{features, NET_HDR_LEN};
use driver::packed;
use driver::{DeviceError, Mempool, Packet, Port, PortConfig, QueuePair};
use vnet_tests::evildevice::{
    EvilDevice, Fault, Mode, DEVICE_MAC, DEVICE_MTU, POISON, RX_QUEUE, TRIGGER_FRAMES, TX_QUEUE,
};
use vnet_tests::harness;

/// The device binary (cargo builds a package's binaries for its integration tests).
const BIN: &str = env!("CARGO_BIN_EXE_evil-device");
/// Frames reflected faithfully before the device misbehaves.
const GOOD_FRAMES: u32 = 3;
/// Bound on every wait for the device or the data path.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Bursts on a stopped queue that must all return 0 without touching its ring.
const DEAD_BURSTS: usize = 100;
/// Frame sizes the faithful device reflects.
const SIZES: [usize; 8] = [60, 64, 65, 128, 333, 512, 1000, 1514];

/// An Ethernet frame of `len` bytes with locally administered MACs, the local
/// experimental EtherType and a payload that depends on `seed`.
fn frame(len: usize, seed: u32) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&DEVICE_MAC);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    f[14..18].copy_from_slice(&seed.to_be_bytes());
    for (i, b) in f.iter_mut().enumerate().skip(18) {
        *b = (i as u32).wrapping_mul(7).wrapping_add(seed.wrapping_mul(13)) as u8;
    }
    f
}

fn contains_poison(data: &[u8]) -> bool {
    data.windows(POISON.len()).any(|w| w == POISON)
}

struct Setup {
    dev: EvilDevice,
    in_order: bool,
    packed: bool,
    cfg: PortConfig,
    port: Port,
    qp: QueuePair,
    /// A handle that outlives the port, to check every buffer comes back.
    pool: Mempool,
}

impl Setup {
    /// Receive buffers posted once `received` frames came back through a ring that
    /// started full at position 0: all of them, except that a packed ring whose size is a
    /// multiple of four refills whole lines of descriptors only (`PackedRing::
    /// line_aligned_post`), so the buffers of an unfinished line wait.
    fn rx_posted(&self, received: u32) -> u16 {
        let size = self.cfg.ring_size;
        if self.packed && size % 4 == 0 {
            size - (received % 4) as u16
        } else {
            size
        }
    }
}

fn open_in(mode: Mode, in_order: bool) -> Setup {
    open_opts(mode, in_order, false)
}

fn open_opts(mode: Mode, in_order: bool, packed: bool) -> Setup {
    let dev = EvilDevice::spawn_opts(Path::new(BIN), mode, GOOD_FRAMES, in_order, packed);
    let mut cfg = PortConfig::virtio_user(dev.socket());
    cfg.packed = packed;
    let merge = mode.fault.is_some_and(|f| f.merge());
    if merge {
        cfg.features |= features::bit(features::NET_MRG_RXBUF);
    }
    let mut port = Port::open(cfg.clone())
        .unwrap_or_else(|e| panic!("Port::open on the {} device: {e}; log:\n{}", mode.name(), dev.log()));
    let info = port.info().clone();
    assert_eq!(info.mac, DEVICE_MAC, "MAC from the device's config space");
    assert_eq!(info.mtu, DEVICE_MTU, "MTU from the device's config space");
    assert!(info.link_up, "status from the device's config space says link up");
    assert_eq!(info.ring_size, cfg.ring_size);
    let want = features::bit(features::VERSION_1)
        | features::bit(features::NET_MAC)
        | features::bit(features::NET_STATUS)
        | features::bit(features::NET_MTU)
        | if in_order { features::bit(features::IN_ORDER) } else { 0 }
        | if packed { features::bit(features::RING_PACKED) } else { 0 }
        | if merge { features::bit(features::NET_MRG_RXBUF) } else { 0 };
    assert_eq!(info.features, want, "negotiated {:#x}", info.features);
    let qp = port.queue_pair(0).expect("queue pair 0");
    let pool = port.pool().clone();
    Setup { dev, in_order, packed, cfg, port, qp, pool }
}

impl Setup {
    /// Pool accounting: free buffers + receive and transmit buffers in flight + packets
    /// the test holds = capacity (nothing lost, nothing freed twice).
    fn check_pool(&self, held: usize, what: &str) {
        let avail = self.pool.available();
        let cap = self.pool.capacity();
        assert!(avail <= cap, "{what}: {avail} free buffers in a pool of {cap}");
        let rx = self.qp.rx.in_flight() as usize;
        let tx = self.qp.tx.in_flight() as usize;
        assert_eq!(
            avail as usize + rx + tx + held,
            cap as usize,
            "{what}: {avail} free + {rx} rx in flight + {tx} tx in flight + {held} held != {cap}"
        );
    }

    fn packet(&self, bytes: &[u8]) -> Packet {
        let mut p = self.pool.alloc().expect("the pool has a free buffer");
        p.set_data(bytes).expect("frame fits a buffer");
        p
    }

    /// Sends `f` and waits for it to come back.
    fn round_trip(&mut self, f: &[u8]) {
        let mut v = vec![self.packet(f)];
        assert_eq!(self.qp.tx.tx_burst(&mut v), 1, "ring has room for one frame");
        let mut rx = Vec::with_capacity(32);
        let deadline = Instant::now() + IO_TIMEOUT;
        while rx.is_empty() {
            self.qp.rx.rx_burst(&mut rx, 32);
            if Instant::now() > deadline {
                panic!(
                    "no reflected frame within {IO_TIMEOUT:?} (rx error {:?}, tx error {:?}); log:\n{}",
                    self.qp.rx.error(),
                    self.qp.tx.error(),
                    self.dev.log()
                );
            }
            thread::yield_now();
        }
        assert_eq!(rx.len(), 1, "one frame sent, one back");
        assert_eq!(rx[0].data(), f, "reflected byte-for-byte");
    }

    /// Closes the port and proves every buffer came back exactly once.
    fn close_and_check_buffers(self) {
        let Setup { mut dev, port, qp, pool, .. } = self;
        port.close(vec![qp]).unwrap_or_else(|e| panic!("close: {e}; log:\n{}", dev.log()));
        let cap = pool.capacity();
        assert_eq!(pool.available(), cap, "after close every buffer is back, once");
        let mut all = Vec::with_capacity(cap as usize + 1);
        assert_eq!(pool.alloc_bulk(cap as usize + 1, &mut all), cap as usize);
        assert!(pool.alloc().is_none(), "the pool holds exactly its capacity");
        let mut ptrs: Vec<usize> = all.iter().map(|p| p.data().as_ptr() as usize).collect();
        ptrs.sort_unstable();
        ptrs.dedup();
        assert_eq!(ptrs.len(), cap as usize, "no buffer handed out twice");
        let spacing = ptrs.windows(2).map(|w| w[1] - w[0]).min().unwrap_or(usize::MAX);
        assert!(spacing >= pool.buf_size() as usize, "buffers overlap: {spacing} bytes apart");
        drop(all);
        assert_eq!(pool.available(), cap);
        // Closing the port closed the connection: the device saw it go.
        assert!(
            dev.wait_line("DISCONNECTED", IO_TIMEOUT).is_some(),
            "the device did not see the front-end disconnect; log:\n{}",
            dev.log()
        );
        let deadline = Instant::now() + IO_TIMEOUT;
        while dev.is_running() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The error the device provoked must be the one its mode promises, with values the
/// test derives from what the driver posted (not only from the device's word).
fn check_report(s: &Setup, mode: Mode, trigger: &[Vec<u8>], e: DeviceError) {
    let size = s.cfg.ring_size;
    let rx_posted = s.cfg.buf_size - s.cfg.headroom as u32 - s.cfg.tailroom as u32 + NET_HDR_LEN as u32;
    let tx_posted = (trigger[0].len() + NET_HDR_LEN) as u32;
    let fault = mode.fault.expect("a bad mode");
    let ok = match (fault, mode.queue, e) {
        (Fault::IdOutOfRange, _, DeviceError::UsedIdOutOfRange { id }) => id == size as u32,
        // Receive: a double completion of a posted descriptor.
        (Fault::IdNotInFlight | Fault::IdTwice, RX_QUEUE, DeviceError::UsedIdNotInFlight { id }) => {
            id < size as u32
        }
        // Transmit: the highest id, never posted (the driver hands out low ids first and
        // this test never has more than a few frames in flight).
        (Fault::IdNotInFlight, TX_QUEUE, DeviceError::UsedIdNotInFlight { id }) => id == size as u32 - 1,
        // (In order on a packed ring a buffer's id is its ring position: the first trigger
        // frame's is the number of frames sent before.)
        (Fault::IdTwice, TX_QUEUE, DeviceError::UsedIdNotInFlight { id }) if s.packed && s.in_order => {
            id == GOOD_FRAMES
        }
        (Fault::IdTwice, TX_QUEUE, DeviceError::UsedIdNotInFlight { id }) => id < TRIGGER_FRAMES as u32 + 1,
        (Fault::LenTooLarge, RX_QUEUE, DeviceError::UsedLenTooLarge { len, posted }) => {
            posted == rx_posted && len == posted + 1
        }
        (Fault::LenTooLarge, TX_QUEUE, DeviceError::UsedLenTooLarge { len, posted }) => {
            posted == tx_posted && len == posted + 1
        }
        // Receive: the ring is full; transmit: only the trigger frames are in flight.
        (Fault::IdxJump, RX_QUEUE, DeviceError::UsedIdxJump { moved, in_flight }) => {
            in_flight == size && moved == size + 1
        }
        (Fault::IdxJump, TX_QUEUE, DeviceError::UsedIdxJump { moved, in_flight }) => {
            in_flight == TRIGGER_FRAMES as u16 && moved == in_flight + 1
        }
        // Packed: at the used position (one descriptor per frame so far on either queue),
        // AVAIL = USED = 0 (the first lap's counter is 1), WRITE only for a receive buffer.
        (Fault::WrongWrap, q, DeviceError::UsedWrongWrap { pos, flags }) => {
            let write = if q == RX_QUEUE { packed::DESC_F_WRITE } else { 0 };
            s.packed && pos == GOOD_FRAMES as u16 && flags == write
        }
        (Fault::MrgZero, RX_QUEUE, DeviceError::MergeZeroBuffers) => true,
        (Fault::MrgBeyond, RX_QUEUE, DeviceError::MergeBeyondUsed { num_buffers, available }) => {
            num_buffers == 2 && available == 1
        }
        // The device's 64 poison bytes in the first buffer, then an empty one.
        (Fault::MrgBadLen, RX_QUEUE, DeviceError::MergeBadLength { index, len, total }) => {
            index == 1 && len == 0 && total == 64
        }
        _ => false,
    };
    assert!(ok, "mode {} produced the unexpected report {e:?}", mode.name());
}

fn bad_device(mode: Mode) {
    bad_device_in(mode, false);
}

fn bad_device_in(mode: Mode, in_order: bool) {
    bad_device_opts(mode, in_order, false);
}

fn bad_device_opts(mode: Mode, in_order: bool, packed: bool) {
    let _serial = harness::serial();
    let fault = mode.fault.expect("a bad mode");
    let mut s = open_opts(mode, in_order, packed);
    assert!(
        !(in_order && !packed && mode.queue == TX_QUEUE && fault != Fault::IdxJump),
        "in order, the split transmit queue reads no used element: see in_order_tx_used_elements_are_not_read"
    );
    s.check_pool(0, "after open");

    // A faithful start.
    for i in 0..GOOD_FRAMES {
        s.round_trip(&frame(SIZES[i as usize % SIZES.len()], i));
        s.check_pool(0, "after a good round trip");
    }
    assert_eq!(s.dev.frames(), GOOD_FRAMES as u64);

    // The trigger: TRIGGER_FRAMES frames in one burst.
    let trigger: Vec<Vec<u8>> = (0..TRIGGER_FRAMES).map(|k| frame(100 + k, 1000 + k as u32)).collect();
    let mut v: Vec<Packet> = trigger.iter().map(|b| s.packet(b)).collect();
    assert_eq!(s.qp.tx.tx_burst(&mut v), TRIGGER_FRAMES);
    let (queue, expected) = s.dev.wait_report(IO_TIMEOUT);
    assert_eq!(queue, mode.queue, "the device broke the queue its mode names");
    check_report(&s, mode, &trigger, expected);

    // Drive both halves until the bad queue stops (and, when the receive queue is the
    // bad one, the transmit queue has everything back).
    let mut got: Vec<Packet> = Vec::with_capacity(64);
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        s.qp.rx.rx_burst(&mut got, 32);
        s.qp.tx.reclaim();
        s.check_pool(got.len(), "while the device misbehaves");
        let stopped = match mode.queue {
            RX_QUEUE => s.qp.rx.error().is_some() && s.qp.tx.in_flight() == 0,
            _ => s.qp.tx.error().is_some(),
        };
        if stopped {
            break;
        }
        if Instant::now() > deadline {
            panic!(
                "mode {}: the driver did not stop the queue within {IO_TIMEOUT:?}: rx error {:?}, tx error {:?}, \
                 tx in flight {}; log:\n{}",
                mode.name(),
                s.qp.rx.error(),
                s.qp.tx.error(),
                s.qp.tx.in_flight(),
                s.dev.log()
            );
        }
        thread::yield_now();
    }

    // Exactly the matching error, on exactly the bad queue.
    let (bad_err, other_err) = match mode.queue {
        RX_QUEUE => (s.qp.rx.error(), s.qp.tx.error()),
        _ => (s.qp.tx.error(), s.qp.rx.error()),
    };
    assert_eq!(bad_err, Some(expected), "mode {}", mode.name());
    assert_eq!(other_err, None, "mode {}: the other queue of the pair is unaffected", mode.name());
    let st = s.port.stats();
    assert_eq!(st.len(), 1);
    assert_eq!(st[0].device_errors, 1, "one device error counted: {:?}", st[0]);

    // Nothing delivered from the bad entry. Only the receive double completion carries a
    // legitimate first completion: the first trigger frame, reflected correctly.
    let legit_first = mode.queue == RX_QUEUE && matches!(fault, Fault::IdNotInFlight | Fault::IdTwice);
    let want_after: Vec<&[u8]> = if legit_first { vec![&trigger[0][..]] } else { vec![] };
    let got_after: Vec<&[u8]> = got.iter().map(|p| p.data()).collect();
    assert_eq!(got_after, want_after, "mode {}: packets delivered after the trigger", mode.name());
    assert!(got.iter().all(|p| !contains_poison(p.data())), "a packet carries device poison");
    let rx_packets = GOOD_FRAMES as u64 + want_after.len() as u64;
    assert_eq!(st[0].rx_packets, rx_packets, "{:?}", st[0]);
    let rx_bytes: u64 = (0..GOOD_FRAMES).map(|i| SIZES[i as usize % SIZES.len()] as u64).sum::<u64>()
        + want_after.iter().map(|d| d.len() as u64).sum::<u64>();
    assert_eq!(st[0].rx_bytes, rx_bytes, "{:?}", st[0]);
    assert_eq!(st[0].rx_errors, 0, "{:?}", st[0]);
    assert_eq!(st[0].tx_packets, GOOD_FRAMES as u64 + TRIGGER_FRAMES as u64, "{:?}", st[0]);

    // What is still in flight: nothing was taken back on the strength of the bad entry.
    let (rx_in_flight, tx_in_flight) = match (mode.queue, fault) {
        (RX_QUEUE, Fault::IdNotInFlight | Fault::IdTwice) => (s.rx_posted(GOOD_FRAMES) - 1, 0),
        // The lying frame's buffers came back with it (and went to the pool).
        (RX_QUEUE, Fault::MrgZero | Fault::MrgBeyond) => (s.rx_posted(GOOD_FRAMES) - 1, 0),
        (RX_QUEUE, Fault::MrgBadLen) => (s.rx_posted(GOOD_FRAMES) - 2, 0),
        (RX_QUEUE, _) => (s.rx_posted(GOOD_FRAMES), 0),
        (_, Fault::IdTwice) => (s.rx_posted(GOOD_FRAMES), TRIGGER_FRAMES as u16 - 1),
        (_, _) => (s.rx_posted(GOOD_FRAMES), TRIGGER_FRAMES as u16),
    };
    assert_eq!(s.qp.rx.in_flight(), rx_in_flight, "mode {}: receive buffers in flight", mode.name());
    assert_eq!(s.qp.tx.in_flight(), tx_in_flight, "mode {}: transmit buffers in flight", mode.name());
    s.check_pool(got.len(), "after the queue stopped");

    // The stopped queue stays stopped and does not touch its ring.
    let before = s.dev.snapshot(mode.queue);
    assert!(!before.ends_with("none"), "the device cannot see queue {}: {before}", mode.queue);
    for _ in 0..DEAD_BURSTS {
        if mode.queue == RX_QUEUE {
            assert_eq!(s.qp.rx.rx_burst(&mut got, 32), 0, "a stopped receive queue delivers nothing");
        } else {
            let mut pkts: Vec<Packet> = (0..4).map(|i| s.packet(&frame(64, 2000 + i))).collect();
            assert_eq!(s.qp.tx.tx_burst(&mut pkts), 0, "a stopped transmit queue takes nothing");
            assert_eq!(pkts.len(), 4, "the packets stay with the caller");
            assert_eq!(s.qp.tx.reclaim(), 0);
            drop(pkts);
        }
        s.check_pool(got.len(), "bursting on the stopped queue");
    }
    let after = s.dev.snapshot(mode.queue);
    assert_eq!(before, after, "mode {}: the driver touched the stopped queue's ring", mode.name());
    assert_eq!(bad_err, if mode.queue == RX_QUEUE { s.qp.rx.error() } else { s.qp.tx.error() });
    let st2 = s.port.stats();
    assert_eq!(st2[0].device_errors, 1, "the stop is counted once: {:?}", st2[0]);
    assert_eq!(st2[0].rx_packets, rx_packets);
    assert_eq!(st2[0].tx_packets, st[0].tx_packets);

    drop(got);
    s.check_pool(0, "after dropping the received packets");
    s.close_and_check_buffers();
}

fn rx(fault: Fault) -> Mode {
    Mode { fault: Some(fault), queue: RX_QUEUE }
}

fn tx(fault: Fault) -> Mode {
    Mode { fault: Some(fault), queue: TX_QUEUE }
}

#[test]
fn rx_used_id_out_of_range() {
    bad_device(rx(Fault::IdOutOfRange));
}

#[test]
fn rx_used_id_not_in_flight() {
    bad_device(rx(Fault::IdNotInFlight));
}

#[test]
fn rx_used_id_twice() {
    bad_device(rx(Fault::IdTwice));
}

#[test]
fn rx_used_len_too_large() {
    bad_device(rx(Fault::LenTooLarge));
}

#[test]
fn rx_used_idx_jump() {
    bad_device(rx(Fault::IdxJump));
}

#[test]
fn tx_used_id_out_of_range() {
    bad_device(tx(Fault::IdOutOfRange));
}

#[test]
fn tx_used_id_never_posted() {
    bad_device(tx(Fault::IdNotInFlight));
}

#[test]
fn tx_used_id_twice() {
    bad_device(tx(Fault::IdTwice));
}

#[test]
fn tx_used_len_too_large() {
    bad_device(tx(Fault::LenTooLarge));
}

#[test]
fn tx_used_idx_jump() {
    bad_device(tx(Fault::IdxJump));
}

/// The evil device in `good` mode is a faithful device: every frame comes back
/// byte-for-byte, in order, with exact counters on both sides, across many ring wraps.
#[test]
fn good_device_reflects_faithfully() {
    good_device(false);
}

/// [`good_device_reflects_faithfully`] on packed rings (both wrap counters flip several
/// times).
#[test]
fn packed_good_device_reflects_faithfully() {
    good_device(true);
}

fn good_device(packed: bool) {
    const FRAMES: usize = 1000;
    let _serial = harness::serial();
    let mut s = open_opts(Mode::GOOD, false, packed);
    s.check_pool(0, "after open");
    let frames: Vec<Vec<u8>> = (0..FRAMES).map(|i| frame(SIZES[i % SIZES.len()], i as u32)).collect();

    let mut pending: Vec<Packet> = Vec::with_capacity(32);
    let mut rx: Vec<Packet> = Vec::with_capacity(64);
    let (mut next, mut received) = (0usize, 0usize);
    let deadline = Instant::now() + Duration::from_secs(30);
    while received < FRAMES {
        while pending.len() < 32 && next < FRAMES {
            pending.push(s.packet(&frames[next]));
            next += 1;
        }
        s.qp.tx.tx_burst(&mut pending);
        s.qp.rx.rx_burst(&mut rx, 64);
        s.check_pool(pending.len() + rx.len(), "while reflecting");
        for p in rx.drain(..) {
            assert!(received < FRAMES, "more frames back than sent");
            assert_eq!(p.data(), &frames[received][..], "frame {received} reflected byte-for-byte");
            received += 1;
        }
        if Instant::now() > deadline {
            panic!(
                "{received} of {FRAMES} frames back after 30 s; stats {:?}; log:\n{}",
                s.port.stats(),
                s.dev.log()
            );
        }
        thread::yield_now();
    }
    // Transmit buffers all come back too.
    let deadline = Instant::now() + IO_TIMEOUT;
    while s.qp.tx.in_flight() > 0 && Instant::now() < deadline {
        s.qp.tx.reclaim();
        thread::yield_now();
    }
    assert_eq!(s.qp.tx.in_flight(), 0, "every transmit buffer completed");
    // Nothing more arrives.
    thread::sleep(Duration::from_millis(50));
    assert_eq!(s.qp.rx.rx_burst(&mut rx, 64), 0, "no extra frames");

    let bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
    let st = s.port.stats();
    assert_eq!(st[0].tx_packets, FRAMES as u64, "{:?}", st[0]);
    assert_eq!(st[0].tx_bytes, bytes, "{:?}", st[0]);
    assert_eq!(st[0].rx_packets, FRAMES as u64, "{:?}", st[0]);
    assert_eq!(st[0].rx_bytes, bytes, "{:?}", st[0]);
    assert_eq!(st[0].rx_errors, 0, "{:?}", st[0]);
    assert_eq!(st[0].device_errors, 0, "{:?}", st[0]);
    assert_eq!(s.qp.rx.error(), None);
    assert_eq!(s.qp.tx.error(), None);
    assert_eq!(s.dev.frames(), FRAMES as u64, "the device reflected every frame once");
    assert_eq!(s.qp.rx.in_flight(), s.cfg.ring_size, "the receive ring is kept full");
    s.check_pool(0, "after reflecting");
    s.close_and_check_buffers();
}

/// The device clears `VIRTIO_NET_S_LINK_UP` (as QEMU does while its back-end is away,
/// discarding what the guest transmits then): the port reports the link down within its
/// heartbeat, `tx_burst` takes nothing while it is down (the packets stay with the
/// caller), and once the bit is back every packet goes out, reflected exactly once.
#[test]
fn link_down_holds_transmit_until_link_up() {
    const BURST: usize = 8;
    let _serial = harness::serial();
    let mut s = open_opts(Mode::GOOD, false, false);
    let frames: Vec<Vec<u8>> = (0..BURST).map(|i| frame(64, i as u32)).collect();
    let wait_link = |s: &Setup, up: bool| {
        let deadline = Instant::now() + Duration::from_secs(3);
        while s.port.link().up != up {
            assert!(Instant::now() < deadline, "link not {up} within 3 s: {:?}", s.port.link());
            thread::sleep(Duration::from_millis(10));
        }
    };
    let reflect = |s: &mut Setup, pending: &mut Vec<Packet>, want: u64| {
        let mut rx = Vec::with_capacity(64);
        let mut got = 0;
        let deadline = Instant::now() + IO_TIMEOUT;
        while got < BURST {
            s.qp.tx.tx_burst(pending);
            s.qp.rx.rx_burst(&mut rx, 64);
            for p in rx.drain(..) {
                assert_eq!(p.data(), &frames[got][..], "frame {got} reflected byte-for-byte");
                got += 1;
            }
            assert!(Instant::now() < deadline, "{got} of {BURST} frames back; log:\n{}", s.dev.log());
            thread::yield_now();
        }
        assert!(pending.is_empty());
        assert_eq!(s.dev.frames(), want, "frames the device reflected");
    };
    let mut pending: Vec<Packet> = frames.iter().map(|f| s.packet(f)).collect();
    reflect(&mut s, &mut pending, BURST as u64);

    assert_eq!(s.dev.request("link down", "LINK"), "LINK down");
    wait_link(&s, false);
    let changes = s.port.link().changes;
    let mut pending: Vec<Packet> = frames.iter().map(|f| s.packet(f)).collect();
    for _ in 0..100 {
        assert_eq!(s.qp.tx.tx_burst(&mut pending), 0, "transmit while the device says its link is down");
    }
    assert_eq!(pending.len(), BURST, "the packets stay with the caller");
    thread::sleep(Duration::from_millis(50));
    assert_eq!(s.dev.frames(), BURST as u64, "nothing reached the device while its link was down");
    s.check_pool(BURST, "while held");

    assert_eq!(s.dev.request("link up", "LINK"), "LINK up");
    wait_link(&s, true);
    assert_eq!(s.port.link().changes, changes + 1);
    assert_eq!(s.port.link().reconnects, 0, "a link bit is no reconnection");
    reflect(&mut s, &mut pending, 2 * BURST as u64);
    let st = s.port.stats();
    assert_eq!((st[0].tx_packets, st[0].rx_packets), (2 * BURST as u64, 2 * BURST as u64), "{:?}", st[0]);
    s.check_pool(0, "after the link came back");
    s.close_and_check_buffers();
}

/// A receive buffer's posted length must never exceed the buffer: a tailroom larger than
/// the buffer is a configuration error (it used to wrap `buf_size - headroom - tailroom`
/// and post ~4 GiB receive descriptors, letting used lengths run past the buffer).
#[test]
fn tailroom_larger_than_the_buffer_is_refused() {
    let _serial = harness::serial();
    let dev = EvilDevice::spawn(Path::new(BIN), Mode::GOOD, GOOD_FRAMES);
    let mut cfg = PortConfig::virtio_user(dev.socket());
    cfg.tailroom = (cfg.buf_size - cfg.headroom as u32 + 52) as u16;
    let (buf_size, headroom, tailroom) = (cfg.buf_size, cfg.headroom, cfg.tailroom);
    match Port::open(cfg) {
        Err(driver::Error::Config(_)) => {}
        Err(e) => panic!("expected a configuration error, got {e}"),
        Ok(mut port) => {
            // Let the device look at a receive descriptor: it refuses the length.
            let mut qp = port.queue_pair(0).expect("queue pair 0");
            let mut p = port.pool().alloc().expect("a buffer");
            p.set_data(&frame(60, 0)).expect("fits");
            let mut v = vec![p];
            qp.tx.tx_burst(&mut v);
            let seen = dev.wait_line("BROKEN", IO_TIMEOUT);
            drop(qp);
            drop(port);
            panic!(
                "Port::open accepted tailroom {tailroom} with {buf_size}-byte buffers and {headroom} headroom; \
                 the device saw: {seen:?}"
            );
        }
    }
}

#[test]
fn in_order_rx_used_id_out_of_range() {
    bad_device_in(rx(Fault::IdOutOfRange), true);
}

#[test]
fn in_order_rx_used_id_twice() {
    bad_device_in(rx(Fault::IdTwice), true);
}

#[test]
fn in_order_rx_used_len_too_large() {
    bad_device_in(rx(Fault::LenTooLarge), true);
}

#[test]
fn in_order_rx_used_idx_jump() {
    bad_device_in(rx(Fault::IdxJump), true);
}

#[test]
fn in_order_tx_used_idx_jump() {
    bad_device_in(tx(Fault::IdxJump), true);
}

/// In order, a transmit used element is never read (a device may write one for a whole
/// batch, virtio 1.2 §2.7.9): an id out of range written there stops nothing, and the
/// used index, which moved by one, frees exactly one buffer, the oldest in flight. The
/// device then goes quiet; every buffer comes back at close.
#[test]
fn in_order_tx_used_elements_are_not_read() {
    let _serial = harness::serial();
    let mode = tx(Fault::IdOutOfRange);
    let mut s = open_in(mode, true);
    assert!(s.in_order);
    let size = s.cfg.ring_size;
    for i in 0..GOOD_FRAMES {
        s.round_trip(&frame(SIZES[i as usize % SIZES.len()], i));
        s.check_pool(0, "after a good round trip");
    }
    let trigger: Vec<Vec<u8>> = (0..TRIGGER_FRAMES).map(|k| frame(100 + k, 1000 + k as u32)).collect();
    let mut v: Vec<Packet> = trigger.iter().map(|b| s.packet(b)).collect();
    assert_eq!(s.qp.tx.tx_burst(&mut v), TRIGGER_FRAMES);
    let (queue, claimed) = s.dev.wait_report(IO_TIMEOUT);
    assert_eq!((queue, claimed), (TX_QUEUE, DeviceError::UsedIdOutOfRange { id: size as u32 }));
    let deadline = Instant::now() + IO_TIMEOUT;
    while s.qp.tx.in_flight() as usize != TRIGGER_FRAMES - 1 {
        s.qp.tx.reclaim();
        assert!(Instant::now() < deadline, "the used index moved by one: one buffer must come back");
        thread::yield_now();
    }
    let mut got: Vec<Packet> = Vec::with_capacity(32);
    for _ in 0..DEAD_BURSTS {
        assert_eq!(s.qp.rx.rx_burst(&mut got, 32), 0, "the device wrote nothing to the receive queue");
        s.qp.tx.reclaim();
    }
    assert_eq!((s.qp.tx.error(), s.qp.rx.error()), (None, None));
    assert_eq!(s.qp.tx.in_flight() as usize, TRIGGER_FRAMES - 1, "no more than the used index covers");
    assert_eq!(s.qp.rx.in_flight(), size);
    let st = s.port.stats();
    assert_eq!(st[0].device_errors, 0, "{:?}", st[0]);
    assert_eq!(st[0].tx_packets, GOOD_FRAMES as u64 + TRIGGER_FRAMES as u64, "{:?}", st[0]);
    assert_eq!(st[0].rx_packets, GOOD_FRAMES as u64, "{:?}", st[0]);
    s.check_pool(0, "after the reclaim");
    s.close_and_check_buffers();
}

// ---- packed rings ---------------------------------------------------------------------

#[test]
fn packed_rx_used_id_out_of_range() {
    bad_device_opts(rx(Fault::IdOutOfRange), false, true);
}

#[test]
fn packed_rx_used_id_not_in_flight() {
    bad_device_opts(rx(Fault::IdNotInFlight), false, true);
}

#[test]
fn packed_rx_used_id_twice() {
    bad_device_opts(rx(Fault::IdTwice), false, true);
}

#[test]
fn packed_rx_used_len_too_large() {
    bad_device_opts(rx(Fault::LenTooLarge), false, true);
}

#[test]
fn packed_rx_used_wrong_wrap() {
    bad_device_opts(rx(Fault::WrongWrap), false, true);
}

#[test]
fn packed_tx_used_id_out_of_range() {
    bad_device_opts(tx(Fault::IdOutOfRange), false, true);
}

#[test]
fn packed_tx_used_id_never_posted() {
    bad_device_opts(tx(Fault::IdNotInFlight), false, true);
}

#[test]
fn packed_tx_used_id_twice() {
    bad_device_opts(tx(Fault::IdTwice), false, true);
}

#[test]
fn packed_tx_used_wrong_wrap() {
    bad_device_opts(tx(Fault::WrongWrap), false, true);
}

/// In order on a packed ring the driver still reads every used descriptor (a device may
/// write one for a batch, naming its last buffer): the same faults stop the queue.
#[test]
fn packed_in_order_rx_used_id_out_of_range() {
    bad_device_opts(rx(Fault::IdOutOfRange), true, true);
}

#[test]
fn packed_in_order_rx_used_len_too_large() {
    bad_device_opts(rx(Fault::LenTooLarge), true, true);
}

#[test]
fn packed_in_order_rx_used_id_twice() {
    bad_device_opts(rx(Fault::IdTwice), true, true);
}

#[test]
fn packed_in_order_tx_used_id_twice() {
    bad_device_opts(tx(Fault::IdTwice), true, true);
}

#[test]
fn packed_in_order_tx_used_wrong_wrap() {
    bad_device_opts(tx(Fault::WrongWrap), true, true);
}

/// Sends the good frames and the trigger on a packed ring `s`; returns the trigger.
fn good_start_and_trigger(s: &mut Setup) -> Vec<Vec<u8>> {
    for i in 0..GOOD_FRAMES {
        s.round_trip(&frame(SIZES[i as usize % SIZES.len()], i));
        s.check_pool(0, "after a good round trip");
    }
    let trigger: Vec<Vec<u8>> = (0..TRIGGER_FRAMES).map(|k| frame(100 + k, 1000 + k as u32)).collect();
    let mut v: Vec<Packet> = trigger.iter().map(|b| s.packet(b)).collect();
    assert_eq!(s.qp.tx.tx_burst(&mut v), TRIGGER_FRAMES);
    trigger
}

/// Drives both halves of `s` for `time`, checking the pool at every step; returns what
/// was received.
fn drive(s: &mut Setup, time: Duration) -> Vec<Packet> {
    let mut got: Vec<Packet> = Vec::with_capacity(64);
    let deadline = Instant::now() + time;
    while Instant::now() < deadline {
        s.qp.rx.rx_burst(&mut got, 32);
        s.qp.tx.reclaim();
        s.check_pool(got.len(), "while driving");
        thread::yield_now();
    }
    got
}

/// Packed: the device writes a valid used descriptor for the second buffer it took one
/// position past the used position, whose descriptor stays as the driver made it
/// available. A driver reads used descriptors in ring order only (§2.8.7), so it takes
/// nothing: no error, no packet (the device's poison never shows), no buffer back; every
/// buffer returns at close.
fn used_ahead_is_ignored(queue: u16) {
    let _serial = harness::serial();
    let mut s = open_opts(Mode { fault: Some(Fault::UsedAhead), queue }, false, true);
    good_start_and_trigger(&mut s);
    let line = s
        .dev
        .wait_line("AHEAD", IO_TIMEOUT)
        .unwrap_or_else(|| panic!("no AHEAD line; log:\n{}", s.dev.log()));
    let want = format!("AHEAD queue={queue} pos={} ", GOOD_FRAMES + 1);
    assert!(line.starts_with(&want), "{line:?} should start with {want:?}");
    let got = drive(&mut s, Duration::from_millis(200));
    assert!(got.is_empty(), "{} packets delivered from a used descriptor ahead", got.len());
    assert_eq!((s.qp.rx.error(), s.qp.tx.error()), (None, None));
    let tx_in_flight = if queue == TX_QUEUE { TRIGGER_FRAMES as u16 } else { 0 };
    assert_eq!(s.qp.rx.in_flight(), s.rx_posted(GOOD_FRAMES), "receive buffers in flight");
    assert_eq!(s.qp.tx.in_flight(), tx_in_flight, "transmit buffers in flight");
    let st = s.port.stats();
    assert_eq!(st[0].device_errors, 0, "{:?}", st[0]);
    assert_eq!(st[0].rx_packets, GOOD_FRAMES as u64, "{:?}", st[0]);
    assert_eq!(st[0].tx_packets, GOOD_FRAMES as u64 + TRIGGER_FRAMES as u64, "{:?}", st[0]);
    s.check_pool(0, "after driving");
    s.close_and_check_buffers();
}

#[test]
fn packed_rx_used_ahead_is_ignored() {
    used_ahead_is_ignored(RX_QUEUE);
}

#[test]
fn packed_tx_used_ahead_is_ignored() {
    used_ahead_is_ignored(TX_QUEUE);
}

/// Packed: the transmit used length is not read (the driver never uses it, and DPDK's
/// vhost leaves an in-order batch's length as the driver wrote it): a length one byte
/// larger than the buffer stops nothing; the buffer it names comes back once and the
/// other trigger buffer (never completed) stays in flight until close.
#[test]
fn packed_tx_used_len_is_not_checked() {
    let _serial = harness::serial();
    let mut s = open_opts(tx(Fault::LenTooLarge), false, true);
    let trigger = good_start_and_trigger(&mut s);
    let (queue, claimed) = s.dev.wait_report(IO_TIMEOUT);
    let posted = (trigger[0].len() + NET_HDR_LEN) as u32;
    assert_eq!((queue, claimed), (TX_QUEUE, DeviceError::UsedLenTooLarge { len: posted + 1, posted }));
    let deadline = Instant::now() + IO_TIMEOUT;
    while s.qp.tx.in_flight() as usize != TRIGGER_FRAMES - 1 {
        s.qp.tx.reclaim();
        assert!(Instant::now() < deadline, "the completed transmit buffer did not come back");
        thread::yield_now();
    }
    let got = drive(&mut s, Duration::from_millis(100));
    assert!(got.is_empty(), "nothing was written to the receive queue");
    assert_eq!((s.qp.tx.error(), s.qp.rx.error()), (None, None));
    assert_eq!(s.qp.tx.in_flight() as usize, TRIGGER_FRAMES - 1);
    assert_eq!(s.qp.rx.in_flight(), s.rx_posted(GOOD_FRAMES));
    let st = s.port.stats();
    assert_eq!(st[0].device_errors, 0, "{:?}", st[0]);
    s.check_pool(0, "after the reclaim");
    s.close_and_check_buffers();
}

#[test]
fn rx_merge_zero_buffers() {
    bad_device(rx(Fault::MrgZero));
}

#[test]
fn rx_merge_beyond_used() {
    bad_device(rx(Fault::MrgBeyond));
}

#[test]
fn rx_merge_empty_later_buffer() {
    bad_device(rx(Fault::MrgBadLen));
}

#[test]
fn packed_rx_merge_zero_buffers() {
    bad_device_opts(rx(Fault::MrgZero), false, true);
}

#[test]
fn packed_rx_merge_beyond_used() {
    bad_device_opts(rx(Fault::MrgBeyond), false, true);
}

#[test]
fn packed_rx_merge_empty_later_buffer() {
    bad_device_opts(rx(Fault::MrgBadLen), false, true);
}

// ------------------------------------------------------------------ a silent back-end

/// The vhost-user header: request, flags, payload size (u32 each).
const VU_HEADER: usize = 12;

/// A back-end that accepts the connection, reads every request and never answers:
/// `Port::open` fails after `vhost_user_timeout` on the first request that waits for an
/// answer (`GET_FEATURES`, after `SET_OWNER`, which needs none), instead of hanging, and
/// the driver closes the connection.
#[test]
fn a_back_end_that_never_answers_fails_open_after_the_timeout() {
    use std::io::Read;
    use std::os::unix::net::UnixListener;
    let _serial = harness::serial();
    let dir = harness::TempDir::new("silent-backend");
    let sock = dir.join("silent.sock");
    let listener = UnixListener::bind(&sock).expect("bind");
    let backend = thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        // Bounded: the driver shuts the connection down at its deadline.
        conn.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let mut got = Vec::new();
        conn.read_to_end(&mut got).map(|_| got)
    });
    let mut cfg = PortConfig::virtio_user(&sock);
    cfg.vhost_user_timeout = Duration::from_millis(500);
    let started = Instant::now();
    let err = match Port::open(cfg) {
        Ok(_) => panic!("Port::open succeeded on a back-end that never answers"),
        Err(e) => e,
    };
    let waited = started.elapsed();
    assert!(
        matches!(err, driver::Error::VhostUserTimeout { request: "GET_FEATURES", waited_ms: 500 }),
        "{err}"
    );
    assert!(waited >= Duration::from_millis(500), "failed before its deadline: {waited:?}");
    assert!(err.to_string().contains("no answer from the back-end within 500 ms"), "{err}");
    // The back-end saw exactly the two requests, then the connection closed.
    let got = backend.join().expect("back-end thread").expect("read until the driver closed");
    assert_eq!(got.len(), 2 * VU_HEADER, "SET_OWNER and GET_FEATURES: {got:02x?}");
    assert_eq!(u32::from_le_bytes(got[0..4].try_into().unwrap()), 3, "SET_OWNER");
    assert_eq!(u32::from_le_bytes(got[12..16].try_into().unwrap()), 1, "GET_FEATURES");
}

/// A back-end that serves the port, then stops answering when it is asked to stop its
/// rings (`GET_VRING_BASE`, at close): `Port::close` fails after `vhost_user_timeout`
/// instead of hanging, and every buffer still comes back to the pool exactly once.
#[test]
fn a_back_end_that_stops_answering_fails_close_after_the_timeout() {
    let _serial = harness::serial();
    let dev =
        EvilDevice::spawn_args(Path::new(BIN), Mode::GOOD, GOOD_FRAMES, false, false, &["--hang-on-stop"]);
    let mut cfg = PortConfig::virtio_user(dev.socket());
    cfg.vhost_user_timeout = Duration::from_secs(1);
    let mut port = Port::open(cfg).unwrap_or_else(|e| panic!("open: {e}; log:\n{}", dev.log()));
    let pool = port.pool().clone();
    let mut qp = port.queue_pair(0).expect("queue pair 0");
    // The device works: frames come back byte for byte.
    let frames: Vec<Vec<u8>> = (0..4).map(|i| frame(SIZES[i], i as u32)).collect();
    let mut tx: Vec<Packet> = frames
        .iter()
        .map(|f| {
            let mut p = pool.alloc().expect("a buffer");
            p.set_data(f).expect("fits");
            p
        })
        .collect();
    assert_eq!(qp.tx.tx_burst(&mut tx), frames.len());
    let mut rx = Vec::with_capacity(8);
    let deadline = Instant::now() + IO_TIMEOUT;
    while rx.len() < frames.len() && Instant::now() < deadline {
        qp.rx.rx_burst(&mut rx, 8);
        thread::yield_now();
    }
    let got: Vec<&[u8]> = rx.iter().map(|p| p.data()).collect();
    assert_eq!(got, frames.iter().map(|f| &f[..]).collect::<Vec<_>>(), "log:\n{}", dev.log());
    drop(rx);

    let started = Instant::now();
    let err = port.close(vec![qp]).expect_err("close succeeded although the back-end never answered");
    assert!(
        matches!(err, driver::Error::VhostUserTimeout { request: "GET_VRING_BASE", waited_ms: 1000 }),
        "{err}"
    );
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(dev.wait_line("HANG GET_VRING_BASE", IO_TIMEOUT).is_some(), "log:\n{}", dev.log());
    // The connection is closed; every buffer is back, once.
    assert_eq!(pool.available(), pool.capacity());
}

/// `PortConfig::vhost_user_peer_uid`: a back-end running as another user is refused
/// before the driver sends it anything (its memory, in particular); the expected user
/// is accepted.
#[test]
fn a_back_end_of_another_user_is_refused_before_anything_is_sent() {
    use std::io::Read;
    use std::os::unix::net::UnixListener;
    let _serial = harness::serial();
    let dir = harness::TempDir::new("peer-uid");
    let sock = dir.join("peer.sock");
    let listener = UnixListener::bind(&sock).expect("bind");
    let backend = thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let mut got = Vec::new();
        conn.read_to_end(&mut got).map(|_| got)
    });
    // SAFETY: getuid has no preconditions.
    let me = unsafe { libc::getuid() };
    let mut cfg = PortConfig::virtio_user(&sock);
    cfg.vhost_user_peer_uid = Some(me.wrapping_add(1));
    let err = match Port::open(cfg) {
        Ok(_) => panic!("Port::open accepted a back-end of another user"),
        Err(e) => e,
    };
    assert!(matches!(err, driver::Error::Connect { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!("runs as uid {me}, not the expected uid {}", me.wrapping_add(1))),
        "{err}"
    );
    let got = backend.join().expect("back-end thread").expect("read until the driver closed");
    assert!(got.is_empty(), "the driver sent {} bytes to a refused back-end", got.len());

    // The expected user: the port opens (on a faithful device) and works.
    let dev = EvilDevice::spawn(Path::new(BIN), Mode::GOOD, GOOD_FRAMES);
    let mut cfg = PortConfig::virtio_user(dev.socket());
    cfg.vhost_user_peer_uid = Some(me);
    let port =
        Port::open(cfg).unwrap_or_else(|e| panic!("open with the right uid: {e}; log:\n{}", dev.log()));
    assert_eq!(port.info().mac, DEVICE_MAC);
    port.close(Vec::new()).expect("close");
}
