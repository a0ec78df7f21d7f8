//! Interop: our driver (`vnet-driver`, virtio-user mode, in this test process) against
//! DPDK 22.11's vhost PMD (`net_vhost`, in `dpdk-testpmd`), the vhost-user server our
//! driver connects to.
//!
//! Each test takes the cross-binary [`serial`] lock, bounds every wait, and checks exact
//! frame counts from both sides: testpmd's "Forward statistics" block (and its port
//! statistics for bytes) against the driver's `Port::stats()`.
//!
//! CPU placement on the 2-cpu machine: testpmd's forwarding lcore on cpu 1 (its CLI
//! lcore on cpu 0), our driver busy-polling in the test thread.
//!
//! Direction names in testpmd's counters are the vhost port's: RX = frames our driver
//! transmitted, TX = frames DPDK placed in our receive queue.

mod driver_common;

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use driver::{Packet, Port, PortConfig};
use vnet_tests::dpdk::{Role, Testpmd};
use vnet_tests::harness::{serial, TempDir};

use driver_common::{close, drain_tx, open, Sender, BURST};

/// testpmd's `--txpkts` (txonly frame size) and its forwarding cpu.
const PKT: u16 = 64;
const DPDK_FWD_CPU: u32 = 1;
const TRAFFIC_TIMEOUT: Duration = Duration::from_secs(30);

fn vhost(sock: &Path) -> Testpmd {
    Testpmd::start(Role::Vhost { path: sock.to_path_buf(), queues: 1 }, PKT, DPDK_FWD_CPU, &["--no-flush-rx"])
}

/// The ring layout a test opens the port with.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Packed rings (`PortConfig::packed`), else split.
    packed: bool,
    /// Ask for `VIRTIO_F_IN_ORDER`.
    in_order: bool,
}

const SPLIT: Layout = Layout { packed: false, in_order: true };

/// Opens our port on DPDK's socket with `layout`; on failure, panics with the error and
/// testpmd's log (the evidence of what the vhost PMD offered and refused).
fn open_on(pmd: &Testpmd, sock: &Path, layout: Layout) -> Port {
    use driver::layout::features as f;
    let mut cfg = PortConfig::virtio_user(sock);
    cfg.packed = layout.packed;
    if !layout.in_order {
        cfg.features &= !f::bit(f::IN_ORDER);
    }
    let port = open(cfg).unwrap_or_else(|e| {
        panic!("Port::open against DPDK net_vhost: {e} ({e:?})\ntestpmd log:\n{}", pmd.log())
    });
    assert!(
        pmd.wait_log("virtio is now ready", Duration::from_secs(10)),
        "DPDK's vhost device never became ready after Port::open ({:?}):\n{}",
        port.info(),
        pmd.log()
    );
    eprintln!("port against DPDK ({layout:?}): {:?}", port.info());
    let features = port.info().features;
    assert_eq!(
        features & f::bit(f::IN_ORDER) != 0,
        layout.in_order,
        "DPDK's vhost PMD offers IN_ORDER and the driver takes it when asked"
    );
    assert_eq!(
        features & f::bit(f::RING_PACKED) != 0,
        layout.packed,
        "DPDK's vhost PMD offers RING_PACKED and the driver takes it only when asked"
    );
    port
}

/// Sends `stop` and runs `poll` until testpmd has printed its forward statistics (its
/// forwarding lcore no longer touches the rings).
fn stop_forwarding(pmd: &mut Testpmd, mut poll: impl FnMut()) {
    let before = pmd.log_count("Forward statistics for port");
    pmd.cmd("stop");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut next_check = Instant::now();
    loop {
        poll();
        let now = Instant::now();
        if now >= next_check {
            if pmd.log_count("Forward statistics for port") > before {
                return;
            }
            assert!(now < deadline, "testpmd printed no statistics after `stop`:\n{}", pmd.log());
            next_check = now + Duration::from_millis(20);
        }
    }
}

/// The port 0 byte counter `key` ("RX-bytes:" or "TX-bytes:") from `show port stats 0`.
fn port_bytes(pmd: &mut Testpmd, key: &str) -> u64 {
    const HDR: &str = "NIC statistics for port 0";
    let before = pmd.log_count(HDR);
    pmd.cmd("show port stats 0");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = pmd.log();
        if log.matches(HDR).count() > before {
            let block = &log[log.rfind(HDR).expect("header counted")..];
            if let Some(at) = block.find(key) {
                let digits: String =
                    block[at + key.len()..].trim_start().chars().take_while(|c| c.is_ascii_digit()).collect();
                if !digits.is_empty() {
                    return digits.parse().expect("digits");
                }
            }
        }
        assert!(Instant::now() < deadline, "no {key} in `show port stats 0`:\n{log}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Our TX into DPDK `rxonly`: 100 000 frames of 60..=1514 bytes; DPDK receives exactly
/// that many frames and bytes.
#[test]
fn driver_tx_into_dpdk_rxonly() {
    tx_into_rxonly(SPLIT);
}

/// As `driver_tx_into_dpdk_rxonly`, on packed rings with IN_ORDER (DPDK's vhost then
/// writes one used descriptor per batch).
#[test]
fn driver_tx_into_dpdk_rxonly_packed() {
    tx_into_rxonly(Layout { packed: true, in_order: true });
}

/// As `driver_tx_into_dpdk_rxonly`, on packed rings without IN_ORDER.
#[test]
fn driver_tx_into_dpdk_rxonly_packed_any_order() {
    tx_into_rxonly(Layout { packed: true, in_order: false });
}

fn tx_into_rxonly(layout: Layout) {
    const N: u64 = 100_000;
    let _serial = serial();
    let dir = TempDir::new("drv-dpdk-rx");
    let sock = dir.join("vhost.sock");
    let mut pmd = vhost(&sock);
    let mut port = open_on(&pmd, &sock, layout);
    let mut qp = port.queue_pair(0).expect("queue pair 0");
    let pool = port.pool().clone();

    pmd.cmd("set fwd rxonly");
    pmd.cmd("start");
    assert!(pmd.wait_log("rxonly packet forwarding - ports", Duration::from_secs(5)), "{}", pmd.log());

    let deadline = Instant::now() + TRAFFIC_TIMEOUT;
    let mut sender = Sender::new(N);
    sender.send_all(&pool, &mut qp.tx, deadline);
    // DPDK has dequeued (and counted) every frame once it has completed them all.
    drain_tx(&mut qp.tx, deadline);
    stop_forwarding(&mut pmd, || {});
    let rx_bytes = port_bytes(&mut pmd, "RX-bytes:");

    let st = port.stats();
    eprintln!("rxonly: driver {st:?}; tx_burst handed back frames {} times", sender.handed_back);
    let want_bytes = Sender::total_bytes(N);
    assert_eq!((st[0].tx_packets, st[0].tx_bytes), (N, want_bytes), "driver tx");
    assert_eq!(st[0].device_errors, 0);
    assert_eq!(qp.tx.error(), None);
    let (avail, cap) = close(port, vec![qp]);
    assert_eq!(avail, cap, "every buffer back in the pool after close");

    let dpdk = pmd.quit();
    eprintln!("rxonly: testpmd {dpdk:?}, RX-bytes {rx_bytes}");
    assert_eq!(dpdk.rx_packets, N, "DPDK RX-packets == frames we sent");
    assert_eq!(rx_bytes, want_bytes, "DPDK RX-bytes == bytes we sent");
    assert_eq!(dpdk.rx_dropped, 0);
    assert_eq!(dpdk.tx_packets, 0);
}

/// Counts what an [`driver::RxQueue`] delivers.
struct Receiver {
    batch: Vec<Packet>,
    received: u64,
    /// Frames whose length is not `PKT`.
    bad_len: u64,
    last_rx: Instant,
}

impl Receiver {
    fn new() -> Receiver {
        Receiver { batch: Vec::with_capacity(BURST), received: 0, bad_len: 0, last_rx: Instant::now() }
    }

    fn poll(&mut self, rx: &mut driver::RxQueue) {
        if rx.rx_burst(&mut self.batch, BURST) > 0 {
            for p in self.batch.drain(..) {
                self.received += 1;
                self.bad_len += u64::from(p.len() != PKT as usize);
            }
            self.last_rx = Instant::now();
        }
    }
}

/// DPDK `txonly` into our RX: everything DPDK placed in our receive ring (its
/// TX-packets) is received, since we keep polling until the ring stays empty.
#[test]
fn dpdk_txonly_into_driver_rx() {
    txonly_into_rx(SPLIT);
}

/// As `dpdk_txonly_into_driver_rx`, on packed rings with IN_ORDER.
#[test]
fn dpdk_txonly_into_driver_rx_packed() {
    txonly_into_rx(Layout { packed: true, in_order: true });
}

/// As `dpdk_txonly_into_driver_rx`, on packed rings without IN_ORDER.
#[test]
fn dpdk_txonly_into_driver_rx_packed_any_order() {
    txonly_into_rx(Layout { packed: true, in_order: false });
}

fn txonly_into_rx(layout: Layout) {
    let _serial = serial();
    let dir = TempDir::new("drv-dpdk-tx");
    let sock = dir.join("vhost.sock");
    let mut pmd = vhost(&sock);
    let mut port = open_on(&pmd, &sock, layout);
    let mut qp = port.queue_pair(0).expect("queue pair 0");

    let mut r = Receiver::new();
    pmd.cmd("set fwd txonly");
    pmd.cmd("start");
    assert!(pmd.wait_log("txonly packet forwarding - ports", Duration::from_secs(5)), "{}", pmd.log());
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        r.poll(&mut qp.rx);
    }
    stop_forwarding(&mut pmd, || r.poll(&mut qp.rx));
    let at_stop = r.received;
    // Keep receiving until the ring stays empty for 500 ms.
    let deadline = Instant::now() + TRAFFIC_TIMEOUT;
    while r.last_rx.elapsed() < Duration::from_millis(500) {
        r.poll(&mut qp.rx);
        assert!(Instant::now() < deadline, "frames kept arriving after `stop`");
    }
    let tx_bytes = port_bytes(&mut pmd, "TX-bytes:");
    let (received, bad_len) = (r.received, r.bad_len);
    eprintln!("txonly: received {at_stop} before testpmd's stop completed, {received} in all");

    let st = port.stats();
    eprintln!("txonly: driver {st:?}");
    assert_eq!(qp.rx.error(), None);
    let (avail, cap) = close(port, vec![qp]);
    assert_eq!(avail, cap, "every buffer back in the pool after close");
    let dpdk = pmd.quit();
    eprintln!("txonly: testpmd {dpdk:?}, TX-bytes {tx_bytes}; we received {received}");

    assert!(dpdk.tx_packets > 0, "testpmd sent nothing: {dpdk:?}");
    assert_eq!(bad_len, 0, "every frame is {PKT} bytes");
    assert_eq!(received, dpdk.tx_packets, "we received exactly what DPDK placed in our ring");
    assert_eq!((st[0].rx_packets, st[0].rx_bytes), (received, received * u64::from(PKT)), "driver rx");
    assert_eq!(tx_bytes, dpdk.tx_packets * u64::from(PKT), "DPDK TX-bytes");
    assert_eq!((st[0].rx_errors, st[0].device_errors, st[0].tx_packets), (0, 0, 0));
    assert_eq!(dpdk.rx_packets, 0);
}
