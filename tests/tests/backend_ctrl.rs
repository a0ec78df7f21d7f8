//! The host backend's control queue (virtio 1.2 §5.1.6.5), driven by a raw front-end
//! ([`RawFrontend`]) against the real `host-backend` binary. Every command is checked by
//! its effect on what the device delivers, with exact counts:
//!
//! * RX modes, the MAC table, the MAC address and the VLAN table decide which reflected
//!   frames arrive (the others are consumed and counted as `drops.filtered`);
//!   promiscuous mode lets everything through;
//! * `VQ_PAIRS_SET` decides which queue pairs carry traffic (`reflect` and `gen`);
//! * `GUEST_OFFLOADS_SET` decides whether `gen --gso-size` delivers TCP super-frames,
//!   partially checksummed segments or fully checksummed ones;
//! * malformed commands are acknowledged `VIRTIO_NET_ERR` (or, for a chain that breaks
//!   the ring protocol, break the control queue only) and the process stays up;
//! * a front-end that does not negotiate `CTRL_VQ` (as DPDK's virtio-user and QEMU
//!   present themselves) has no control queue and no filtering.

use std::path::Path;
use std::time::Duration;

use driver::layout::{features, Descriptor, DESC_F_NEXT, DESC_F_WRITE, NET_HDR_LEN};
use serde_json::Value;
use virtio_bindings::virtio_net as vn;
use vnet_tests::harness::{self, Backend, TempDir};
use vnet_tests::rawfront::RawFrontend;

/// Guest memory per connection.
const MEM: usize = 8 << 20;
/// Data ring size.
const RING: u16 = 256;
/// Control ring size.
const CTRL_RING: u16 = 16;
/// Bound on every wait for the data path or a command.
const IO: Duration = Duration::from_secs(5);
/// Bound on every wait for a stats line (the period is 1 s).
const STATS: Duration = Duration::from_secs(10);
/// How long "nothing more arrives" is watched after the device consumed every frame
/// (it publishes the receive side in the same burst as the transmit side).
const QUIET: Duration = Duration::from_millis(100);
/// Receive buffer length for the reflect tests.
const RX_BUF: u32 = 2048;
/// The device's MAC (`--mac`).
const DEV_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0x01];
const DEV_MAC_ARG: &str = "52:54:00:aa:bb:01";
const OK: u8 = vn::VIRTIO_NET_OK as u8;
const ERR: u8 = vn::VIRTIO_NET_ERR as u8;

const RX_CLASS: u8 = vn::VIRTIO_NET_CTRL_RX as u8;
const MAC_CLASS: u8 = vn::VIRTIO_NET_CTRL_MAC as u8;
const VLAN_CLASS: u8 = vn::VIRTIO_NET_CTRL_VLAN as u8;
const MQ_CLASS: u8 = vn::VIRTIO_NET_CTRL_MQ as u8;
const OFFLOADS_CLASS: u8 = vn::VIRTIO_NET_CTRL_GUEST_OFFLOADS as u8;

fn bit(b: u32) -> u64 {
    features::bit(b)
}

/// Control-queue features every filtering test negotiates.
fn ctrl_features() -> u64 {
    bit(vn::VIRTIO_NET_F_CTRL_VQ)
        | bit(vn::VIRTIO_NET_F_CTRL_RX)
        | bit(vn::VIRTIO_NET_F_CTRL_RX_EXTRA)
        | bit(vn::VIRTIO_NET_F_CTRL_VLAN)
        | bit(vn::VIRTIO_NET_F_CTRL_MAC_ADDR)
        | bit(features::RING_INDIRECT_DESC)
}

// ---- frames -------------------------------------------------------------------------

const OTHER: [u8; 6] = [0x02, 0, 0, 0, 0, 0x77];
const LISTED: [u8; 6] = [0x02, 0, 0, 0, 0, 0x88];
const MCAST1: [u8; 6] = [0x01, 0x00, 0x5e, 0, 0, 0x01];
const MCAST2: [u8; 6] = [0x33, 0x33, 0, 0, 0, 0x01];
const BCAST: [u8; 6] = [0xff; 6];

/// A 64-byte frame to `dst`, optionally 802.1Q-tagged (PCP 3, which the filter must
/// ignore), whose payload is `tag` repeated (to tell frames apart).
fn frame(dst: [u8; 6], vlan: Option<u16>, tag: u8) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    if let Some(v) = vlan {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&(0x6000 | v).to_be_bytes());
    }
    f.extend_from_slice(&[0x88, 0xb5]);
    f.resize(64, tag);
    f
}

/// The frames of the RX-mode and MAC tests, by index.
fn filter_frames() -> Vec<Vec<u8>> {
    vec![
        frame(DEV_MAC, None, 0),    // 0: to us
        frame(OTHER, None, 1),      // 1: another unicast address
        frame(MCAST1, None, 2),     // 2: multicast 1
        frame(BCAST, None, 3),      // 3: broadcast
        frame(DEV_MAC, Some(5), 4), // 4: to us, VLAN 5
        frame(MCAST2, None, 5),     // 5: multicast 2
        frame(LISTED, None, 6),     // 6: the unicast address the MAC table lists
    ]
}

// ---- the guest ----------------------------------------------------------------------

/// A raw front-end with `pairs` queue pairs and (if negotiated) the control queue.
struct Guest {
    fe: RawFrontend,
    ctrl: u16,
    /// Commands the device has used (the next avail slot of the control queue).
    used: u16,
}

impl Guest {
    /// Connects, negotiates `want`, sets up every data queue and the control queue at
    /// its index (2N with MQ, else 2).
    fn connect(path: &Path, pairs: u16, want: u64) -> Guest {
        let mut fe = RawFrontend::connect(path, MEM, want).unwrap_or_else(|e| panic!("connect: {e}"));
        for q in 0..2 * pairs {
            fe.setup_queue(q, RING).unwrap_or_else(|e| panic!("queue {q}: {e}"));
        }
        let mq = fe.features() & bit(vn::VIRTIO_NET_F_MQ) != 0;
        let ctrl = if mq { 2 * pairs } else { 2 };
        if fe.features() & bit(vn::VIRTIO_NET_F_CTRL_VQ) != 0 {
            fe.setup_queue(ctrl, CTRL_RING).unwrap_or_else(|e| panic!("control queue {ctrl}: {e}"));
        }
        Guest { fe, ctrl, used: 0 }
    }

    /// Sends `parts` (header and data, one descriptor each) with a 1-byte ack buffer;
    /// returns the ack after checking the used length is 1.
    fn send(&mut self, parts: &[&[u8]]) -> u8 {
        let (len, ack) = self
            .fe
            .ctrl_command(self.ctrl, parts, 1, IO)
            .unwrap_or_else(|e| panic!("command {parts:?}: {e}"));
        self.used = self.used.wrapping_add(1);
        assert_eq!(len, 1, "used length of command {parts:?}");
        ack.expect("ack buffer")
    }

    /// One command: the header in one descriptor, the data in another (as Linux does).
    fn cmd(&mut self, class: u8, command: u8, data: &[u8]) -> u8 {
        let hdr = [class, command];
        if data.is_empty() {
            self.send(&[&hdr])
        } else {
            self.send(&[&hdr, data])
        }
    }

    fn ok(&mut self, class: u8, command: u8, data: &[u8]) {
        assert_eq!(self.cmd(class, command, data), OK, "class {class} command {command} data {data:?}");
    }

    fn err(&mut self, class: u8, command: u8, data: &[u8]) {
        assert_eq!(self.cmd(class, command, data), ERR, "class {class} command {command} data {data:?}");
    }

    fn rx_mode(&mut self, command: u32, on: bool) {
        self.ok(RX_CLASS, command as u8, &[on as u8]);
    }

    /// Makes sure at least `n` receive buffers are posted on `queue`.
    fn ensure_rx(&mut self, queue: u16, n: u16, len: u32) {
        let have = self.fe.in_flight(queue).unwrap();
        if have < n {
            self.fe.post_rx_buffers(queue, n - have, len).unwrap();
        }
    }

    /// Sends `frames` on pair `pair` of a reflect device and checks that exactly the
    /// frames at `expect` come back on the same pair, in order, and nothing else.
    fn reflect(&mut self, pair: u16, frames: &[Vec<u8>], expect: &[usize]) {
        let (rx, tx) = (2 * pair, 2 * pair + 1);
        self.ensure_rx(rx, frames.len() as u16, RX_BUF);
        self.fe.send_frames(tx, frames).unwrap();
        self.fe.wait_tx_done(tx, IO).unwrap_or_else(|e| panic!("frames not consumed: {e}"));
        let got =
            self.fe.recv_frames(rx, expect.len(), IO).unwrap_or_else(|e| panic!("expect {expect:?}: {e}"));
        std::thread::sleep(QUIET);
        let extra = self.fe.poll_rx(rx).unwrap();
        assert!(extra.is_empty(), "{} frames arrived beyond {expect:?}", extra.len());
        let want: Vec<&Vec<u8>> = expect.iter().map(|&i| &frames[i]).collect();
        let got_idx: Vec<u8> = got.iter().map(|f| f[63]).collect();
        assert!(
            got.iter().eq(want.iter().copied()),
            "expected frames {expect:?}, got the ones tagged {got_idx:?}"
        );
    }
}

fn start(tag: &str, port: &str, extra: &[&str]) -> (TempDir, Backend, std::path::PathBuf) {
    let dir = TempDir::new(tag);
    let sock = dir.join("dev.sock");
    let port = format!("{port}:{}", sock.display());
    let mut args = vec!["--port", &port, "--mac", DEV_MAC_ARG];
    args.extend_from_slice(extra);
    let backend = Backend::start(&args);
    (dir, backend, sock)
}

/// Waits for a stats line where `check` holds for our device; returns that device.
fn dev_stats(backend: &Backend, sock: &Path, check: impl Fn(&Value) -> bool) -> Value {
    let s =
        backend.wait_stats(STATS, |s| s["devices"].as_array().and_then(|d| d.first()).is_some_and(&check));
    harness::device(&s, sock).clone()
}

fn c(dev: &Value, name: &str) -> u64 {
    harness::counter(dev, name)
}

/// The device's exact counters after `sent` frames, `delivered` of them back.
fn assert_reflect_counts(dev: &Value, sent: u64, delivered: u64, filtered: u64) {
    assert_eq!(c(dev, "rx_packets"), sent, "rx_packets: {dev}");
    assert_eq!(c(dev, "tx_packets"), delivered, "tx_packets: {dev}");
    assert_eq!(c(dev, "drops.filtered"), filtered, "drops.filtered: {dev}");
    assert_eq!(harness::total_drops(dev), filtered, "drops other than filtered: {dev}");
    assert_eq!(c(dev, "broken_queues"), 0, "broken_queues: {dev}");
}

// ---- RX modes ---------------------------------------------------------------------------

#[test]
fn rx_modes_decide_what_is_delivered() {
    let _serial = harness::serial();
    let (_dir, mut backend, sock) = start("ctrl-rxmode", "reflect", &[]);
    let mut g = Guest::connect(&sock, 1, ctrl_features());
    let frames = filter_frames();
    let all: Vec<usize> = (0..frames.len()).collect();

    // Promiscuous after reset: everything, whatever the VLAN table says.
    g.reflect(0, &frames, &all);
    g.rx_mode(vn::VIRTIO_NET_CTRL_RX_PROMISC, false);
    // Our address and broadcast; VLAN 5 is not in the (empty) VLAN table.
    g.reflect(0, &frames, &[0, 3]);
    g.rx_mode(vn::VIRTIO_NET_CTRL_RX_ALLMULTI, true);
    g.reflect(0, &frames, &[0, 2, 3, 5]);
    g.rx_mode(vn::VIRTIO_NET_CTRL_RX_NOMULTI, true);
    g.reflect(0, &frames, &[0, 3]); // NOMULTI wins over ALLMULTI, not over broadcast
    g.rx_mode(vn::VIRTIO_NET_CTRL_RX_NOBCAST, true);
    g.reflect(0, &frames, &[0]);
    g.rx_mode(vn::VIRTIO_NET_CTRL_RX_ALLUNI, true);
    g.reflect(0, &frames, &[0, 1, 6]);
    g.rx_mode(vn::VIRTIO_NET_CTRL_RX_NOUNI, true);
    g.reflect(0, &frames, &[]); // NOUNI wins over ALLUNI: nothing at all
    for m in [
        vn::VIRTIO_NET_CTRL_RX_NOUNI,
        vn::VIRTIO_NET_CTRL_RX_ALLUNI,
        vn::VIRTIO_NET_CTRL_RX_NOBCAST,
        vn::VIRTIO_NET_CTRL_RX_NOMULTI,
        vn::VIRTIO_NET_CTRL_RX_ALLMULTI,
    ] {
        g.rx_mode(m, false);
    }
    g.reflect(0, &frames, &[0, 3]);
    g.rx_mode(vn::VIRTIO_NET_CTRL_RX_PROMISC, true);
    g.reflect(0, &frames, &all);

    // 9 rounds of 7 frames; filtered: 0 + 5 + 3 + 5 + 6 + 4 + 7 + 5 + 0.
    let (sent, filtered) = (63, 35);
    let dev = dev_stats(&backend, &sock, |d| d["rx_packets"].as_u64() == Some(sent));
    assert_reflect_counts(&dev, sent, sent - filtered, filtered);
    assert_eq!((c(&dev, "ctrl.commands"), c(&dev, "ctrl.errors")), (12, 0), "{dev}");
    assert_eq!(dev["rx_filter"]["promisc"], true, "{dev}");
    assert!(backend.is_running());
    let last = backend.stop();
    assert_reflect_counts(harness::device(&last, &sock), sent, sent - filtered, filtered);
}

// ---- MAC table and MAC address ------------------------------------------------------

fn mac_table(uni: &[[u8; 6]], multi: &[[u8; 6]]) -> Vec<u8> {
    let mut v = (uni.len() as u32).to_le_bytes().to_vec();
    uni.iter().for_each(|m| v.extend_from_slice(m));
    v.extend_from_slice(&(multi.len() as u32).to_le_bytes());
    multi.iter().for_each(|m| v.extend_from_slice(m));
    v
}

#[test]
fn mac_table_and_mac_address_filter_unicast_and_multicast() {
    let _serial = harness::serial();
    let (_dir, backend, sock) = start("ctrl-mac", "reflect", &[]);
    let mut g = Guest::connect(&sock, 1, ctrl_features());
    let frames = filter_frames();
    let set_table = vn::VIRTIO_NET_CTRL_MAC_TABLE_SET as u8;

    g.rx_mode(vn::VIRTIO_NET_CTRL_RX_PROMISC, false);
    g.ok(MAC_CLASS, set_table, &mac_table(&[LISTED], &[MCAST1]));
    g.reflect(0, &frames, &[0, 2, 3, 6]);
    let dev = dev_stats(&backend, &sock, |d| d["rx_packets"].as_u64() == Some(7));
    assert_eq!(
        (dev["rx_filter"]["unicast"].as_u64(), dev["rx_filter"]["multicast"].as_u64()),
        (Some(1), Some(1))
    );

    g.ok(MAC_CLASS, set_table, &mac_table(&[], &[]));
    g.reflect(0, &frames, &[0, 3]);

    // A new address: frames to the old one are filtered, config space shows the new one.
    assert_eq!(g.fe.get_config(0, 6).unwrap(), DEV_MAC);
    g.ok(MAC_CLASS, vn::VIRTIO_NET_CTRL_MAC_ADDR_SET as u8, &OTHER);
    assert_eq!(g.fe.get_config(0, 6).unwrap(), OTHER, "config space follows MAC_ADDR_SET");
    g.reflect(0, &frames, &[1, 3]);

    // More unicast addresses than the table holds: every unicast frame passes.
    let many: Vec<[u8; 6]> = (0..65u8).map(|i| [0x02, 0, 0, 0, 1, i]).collect();
    g.ok(MAC_CLASS, set_table, &mac_table(&many, &[]));
    g.reflect(0, &frames, &[0, 1, 3, 6]);

    let (sent, filtered) = (28, 3 + 5 + 5 + 3);
    let dev = dev_stats(&backend, &sock, |d| d["rx_packets"].as_u64() == Some(sent));
    assert_reflect_counts(&dev, sent, sent - filtered, filtered);
    assert_eq!(dev["rx_filter"]["uni_overflow"], true, "{dev}");
    assert_eq!(dev["rx_filter"]["mac"], "02:00:00:00:00:77", "{dev}");
    assert_eq!((c(&dev, "ctrl.commands"), c(&dev, "ctrl.errors")), (5, 0), "{dev}");

    // A reconnect resets the device: promiscuous again, the configured MAC.
    drop(g);
    let mut g = Guest::connect(&sock, 1, ctrl_features());
    assert_eq!(g.fe.get_config(0, 6).unwrap(), DEV_MAC);
    g.reflect(0, &frames, &(0..7).collect::<Vec<_>>());
    let last = backend.stop();
    assert_reflect_counts(harness::device(&last, &sock), sent + 7, sent + 7 - filtered, filtered);
}

// ---- the receiving device's filter, as delivered ------------------------------------

/// A 64-byte frame from `src` to `dst`.
fn frame_from(src: [u8; 6], dst: [u8; 6], tag: u8) -> Vec<u8> {
    let mut f = frame(dst, None, tag);
    f[6..12].copy_from_slice(&src);
    f
}

#[test]
fn swap_mac_filters_the_header_as_delivered() {
    let _serial = harness::serial();
    let (_dir, backend, sock) = start("ctrl-swap", "reflect", &["--swap-mac"]);
    let mut g = Guest::connect(&sock, 1, ctrl_features());
    g.rx_mode(vn::VIRTIO_NET_CTRL_RX_PROMISC, false);
    // Delivered with the addresses swapped: what counts is the source sent.
    let frames =
        vec![frame_from(DEV_MAC, OTHER, 0), frame_from(OTHER, DEV_MAC, 1), frame_from(BCAST, OTHER, 2)];
    let (rx, tx) = (0, 1);
    g.ensure_rx(rx, 3, RX_BUF);
    g.fe.send_frames(tx, &frames).unwrap();
    g.fe.wait_tx_done(tx, IO).unwrap();
    let got = g.fe.recv_frames(rx, 2, IO).unwrap();
    std::thread::sleep(QUIET);
    assert!(g.fe.poll_rx(rx).unwrap().is_empty());
    assert_eq!((&got[0][..6], &got[0][6..12], got[0][63]), (&DEV_MAC[..], &OTHER[..], 0));
    assert_eq!((&got[1][..6], got[1][63]), (&BCAST[..], 2));
    let dev = dev_stats(&backend, &sock, |d| d["rx_packets"].as_u64() == Some(3));
    assert_reflect_counts(&dev, 3, 2, 1);
    backend.stop();
}

#[test]
fn xconnect_applies_the_receiving_devices_filter() {
    let _serial = harness::serial();
    let dir = TempDir::new("ctrl-xc");
    let (a_sock, b_sock) = (dir.join("a.sock"), dir.join("b.sock"));
    let port = format!("xconnect:{},{}", a_sock.display(), b_sock.display());
    let backend = Backend::start(&["--port", &port, "--mac", DEV_MAC_ARG]);
    let b_mac = [DEV_MAC[0], DEV_MAC[1], DEV_MAC[2], DEV_MAC[3], DEV_MAC[4], DEV_MAC[5] + 1];
    let mut a = Guest::connect(&a_sock, 1, ctrl_features());
    let mut b = Guest::connect(&b_sock, 1, ctrl_features());
    b.rx_mode(vn::VIRTIO_NET_CTRL_RX_PROMISC, false);
    let frames = vec![frame(b_mac, None, 0), frame(DEV_MAC, None, 1), frame(OTHER, None, 2)];
    // A to B: only B's address passes B's filter.
    b.ensure_rx(0, 3, RX_BUF);
    a.fe.send_frames(1, &frames).unwrap();
    a.fe.wait_tx_done(1, IO).unwrap();
    let got = b.fe.recv_frames(0, 1, IO).unwrap();
    std::thread::sleep(QUIET);
    assert!(b.fe.poll_rx(0).unwrap().is_empty());
    assert_eq!(got[0], frames[0]);
    // B to A: A is still promiscuous.
    a.ensure_rx(0, 3, RX_BUF);
    b.fe.send_frames(1, &frames).unwrap();
    b.fe.wait_tx_done(1, IO).unwrap();
    assert_eq!(a.fe.recv_frames(0, 3, IO).unwrap(), frames);
    let s = backend.wait_stats(STATS, |s| {
        s["devices"].as_array().is_some_and(|d| d.iter().all(|d| d["rx_packets"].as_u64() == Some(3)))
    });
    let (da, db) = (harness::device(&s, &a_sock), harness::device(&s, &b_sock));
    assert_eq!((c(da, "tx_packets"), c(da, "drops.filtered")), (3, 0), "{da}");
    assert_eq!((c(db, "tx_packets"), c(db, "drops.filtered")), (1, 2), "{db}");
    backend.stop();
}

// ---- VLAN filter --------------------------------------------------------------------

#[test]
fn vlan_table_filters_tagged_frames() {
    let _serial = harness::serial();
    let (_dir, backend, sock) = start("ctrl-vlan", "reflect", &[]);
    let mut g = Guest::connect(&sock, 1, ctrl_features());
    let frames = vec![
        frame(DEV_MAC, None, 0),
        frame(DEV_MAC, Some(5), 1),
        frame(DEV_MAC, Some(6), 2),
        frame(DEV_MAC, Some(4095), 3),
        frame(DEV_MAC, Some(0), 4), // priority-tagged
    ];
    let (add, del) = (vn::VIRTIO_NET_CTRL_VLAN_ADD as u8, vn::VIRTIO_NET_CTRL_VLAN_DEL as u8);
    g.rx_mode(vn::VIRTIO_NET_CTRL_RX_PROMISC, false);
    g.reflect(0, &frames, &[0]);
    g.ok(VLAN_CLASS, add, &5u16.to_le_bytes());
    g.ok(VLAN_CLASS, add, &4095u16.to_le_bytes());
    g.reflect(0, &frames, &[0, 1, 3]);
    g.ok(VLAN_CLASS, del, &5u16.to_le_bytes());
    g.ok(VLAN_CLASS, add, &0u16.to_le_bytes());
    g.reflect(0, &frames, &[0, 3, 4]);
    g.err(VLAN_CLASS, add, &4096u16.to_le_bytes());
    g.err(VLAN_CLASS, add, &[5]);
    g.reflect(0, &frames, &[0, 3, 4]); // refused commands changed nothing

    let (sent, filtered) = (20, 4 + 2 + 2 + 2);
    let dev = dev_stats(&backend, &sock, |d| d["rx_packets"].as_u64() == Some(sent));
    assert_reflect_counts(&dev, sent, sent - filtered, filtered);
    assert_eq!(dev["rx_filter"]["vlans"].as_u64(), Some(2), "{dev}");
    assert_eq!((c(&dev, "ctrl.commands"), c(&dev, "ctrl.errors")), (5, 2), "{dev}");
    backend.stop();
}

// ---- VQ_PAIRS_SET ---------------------------------------------------------------------

fn pair_counter(dev: &Value, pair: usize, name: &str) -> u64 {
    harness::counter(&dev["queues"][pair], name)
}

#[test]
fn vq_pairs_set_decides_which_pairs_reflect() {
    let _serial = harness::serial();
    let (_dir, backend, sock) = start("ctrl-pairs", "reflect", &["--queues", "2"]);
    let mut g = Guest::connect(&sock, 2, ctrl_features() | bit(vn::VIRTIO_NET_F_MQ));
    assert_eq!(g.ctrl, 4, "control queue after 2 pairs");
    let frames: Vec<Vec<u8>> = (0..4).map(|i| frame(DEV_MAC, None, i)).collect();
    let all = [0, 1, 2, 3];
    let set =
        |g: &mut Guest, n: u16| g.cmd(MQ_CLASS, vn::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8, &n.to_le_bytes());

    // Multi-queue starts with one pair: pair 1's frames are consumed, not delivered.
    g.reflect(0, &frames, &all);
    g.reflect(1, &frames, &[]);
    assert_eq!(set(&mut g, 2), OK);
    g.reflect(1, &frames, &all);
    g.reflect(0, &frames, &all);
    assert_eq!(set(&mut g, 0), ERR);
    assert_eq!(set(&mut g, 3), ERR);
    assert_eq!(g.cmd(MQ_CLASS, vn::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8, &[2]), ERR);
    g.reflect(1, &frames, &all); // still two pairs
    assert_eq!(set(&mut g, 1), OK);
    g.reflect(1, &frames, &[]);
    g.reflect(0, &frames, &all);

    let dev = dev_stats(&backend, &sock, |d| d["rx_packets"].as_u64() == Some(28));
    assert_eq!(pair_counter(&dev, 0, "rx_packets"), 12);
    assert_eq!(pair_counter(&dev, 0, "tx_packets"), 12);
    assert_eq!(pair_counter(&dev, 1, "rx_packets"), 16);
    assert_eq!(pair_counter(&dev, 1, "tx_packets"), 8);
    assert_eq!(pair_counter(&dev, 1, "drops.peer_down"), 8, "{dev}");
    assert_eq!(harness::total_drops(&dev), 8, "{dev}");
    assert_eq!(dev["active_pairs"].as_u64(), Some(1));
    assert_eq!((c(&dev, "ctrl.commands"), c(&dev, "ctrl.errors")), (2, 3), "{dev}");
    backend.stop();
}

#[test]
fn gen_fills_only_active_pairs() {
    let _serial = harness::serial();
    let (_dir, backend, sock) = start("ctrl-genpairs", "gen", &["--queues", "2"]);
    let mut g = Guest::connect(&sock, 2, ctrl_features() | bit(vn::VIRTIO_NET_F_MQ));
    let set =
        |g: &mut Guest, n: u16| g.ok(MQ_CLASS, vn::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8, &n.to_le_bytes());
    let n = 8;
    g.fe.post_rx_buffers(0, n, RX_BUF).unwrap();
    g.fe.post_rx_buffers(2, n, RX_BUF).unwrap();
    g.fe.recv_frames(0, n as usize, IO).unwrap();
    std::thread::sleep(QUIET);
    assert!(g.fe.poll_rx(2).unwrap().is_empty(), "pair 1 is not active yet");
    set(&mut g, 2);
    g.fe.recv_frames(2, n as usize, IO).unwrap();
    set(&mut g, 1);
    g.fe.post_rx_buffers(2, n, RX_BUF).unwrap();
    g.fe.post_rx_buffers(0, n, RX_BUF).unwrap();
    g.fe.recv_frames(0, n as usize, IO).unwrap();
    std::thread::sleep(QUIET);
    assert!(g.fe.poll_rx(2).unwrap().is_empty(), "pair 1 is inactive again");

    let dev = dev_stats(&backend, &sock, |d| d["tx_packets"].as_u64() == Some(24));
    assert_eq!(pair_counter(&dev, 0, "tx_packets"), 16);
    assert_eq!(pair_counter(&dev, 1, "tx_packets"), 8);
    assert_eq!(c(&dev, "generated"), 24);
    assert_eq!(harness::total_drops(&dev), 0, "{dev}");
    backend.stop();
}

// ---- guest offloads -------------------------------------------------------------------

/// Payload bytes per super-frame and the MSS of the GSO test.
const PAYLOAD: usize = 4000;
const MSS: usize = 1000;
const HDRS: usize = 54;

/// One's-complement sum of big-endian 16-bit words.
fn sum16(data: &[u8], mut acc: u64) -> u64 {
    for w in data.chunks(2) {
        acc += u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)]) as u64;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// How a delivered packet of the TCP stream looks.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    /// One GSO super-frame (`gso_type` TCPV4, partial checksum).
    Super,
    /// A segment with a partial checksum (`NEEDS_CSUM`).
    PartialSegment,
    /// A segment with a complete checksum (`flags` 0).
    FullSegment,
}

/// Checks one packet (net header + frame) completely and returns its kind, the TCP
/// sequence number and the payload.
fn parse_tcp(p: &[u8]) -> (Kind, u32, Vec<u8>) {
    let (h, f) = p.split_at(NET_HDR_LEN);
    let le = |o: usize| u16::from_le_bytes([h[o], h[o + 1]]);
    assert_eq!(le(10), 1, "num_buffers");
    assert_eq!(&f[12..14], &[0x08, 0x00]);
    assert_eq!(f[23], 6, "TCP");
    assert_eq!(fold(sum16(&f[14..34], 0)), 0xffff, "IPv4 header checksum");
    let ip_len = u16::from_be_bytes([f[16], f[17]]) as usize;
    assert_eq!(ip_len + 14, f.len(), "IPv4 total length");
    let tcp = &f[34..];
    let pseudo = sum16(&f[26..34], 0) + 6 + tcp.len() as u64;
    let partial = h[0] & vn::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0;
    if partial {
        assert_eq!((le(6), le(8)), (34, 16), "csum_start/offset");
        assert_eq!(
            u16::from_be_bytes([tcp[16], tcp[17]]),
            fold(pseudo),
            "partial checksum = pseudo-header sum"
        );
    } else {
        assert_eq!(h[0], 0, "flags");
        assert_eq!(fold(sum16(tcp, pseudo)), 0xffff, "complete TCP checksum");
    }
    let kind = match h[1] {
        0 => {
            assert!(f.len() <= HDRS + MSS, "a segment longer than the MSS: {}", f.len());
            assert_eq!(le(4), 0, "gso_size without GSO");
            if partial {
                Kind::PartialSegment
            } else {
                Kind::FullSegment
            }
        }
        t if t == vn::VIRTIO_NET_HDR_GSO_TCPV4 as u8 => {
            assert!(partial, "GSO without NEEDS_CSUM");
            assert_eq!((le(2), le(4)), (HDRS as u16, MSS as u16), "hdr_len/gso_size");
            Kind::Super
        }
        t => panic!("gso_type {t}"),
    };
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    (kind, seq, tcp[20..].to_vec())
}

/// Receives `n` packets on RX 0 after posting as many buffers, checks they are all of
/// `kind` and reassemble into whole super-frames numbered from `first` (payload: magic,
/// sequence number, then the byte pattern); returns the next super-frame number.
fn expect_stream(g: &mut Guest, n: u16, kind: Kind, first: u64) -> u64 {
    g.fe.post_rx_buffers(0, n, 8192).unwrap();
    let packets = g.fe.recv_packets(0, n as usize, IO).unwrap();
    let mut payload = Vec::new();
    let mut seq = first;
    for p in &packets {
        let (k, tcp_seq, data) = parse_tcp(p);
        assert_eq!(k, kind);
        assert_eq!(tcp_seq as usize, seq as usize * PAYLOAD + payload.len(), "TCP sequence");
        payload.extend_from_slice(&data);
        if payload.len() == PAYLOAD {
            assert_eq!(&payload[..4], b"VNET");
            assert_eq!(u64::from_le_bytes(payload[4..12].try_into().unwrap()), seq);
            assert!(payload[12..].iter().enumerate().all(|(i, b)| *b == i as u8), "payload pattern");
            payload.clear();
            seq += 1;
        }
    }
    assert!(payload.is_empty(), "a super-frame was cut short");
    std::thread::sleep(QUIET);
    assert!(g.fe.poll_rx(0).unwrap().is_empty());
    seq
}

#[test]
fn guest_offloads_decide_between_super_frames_and_segments() {
    let _serial = harness::serial();
    let pkt = (HDRS + PAYLOAD).to_string();
    let mss = MSS.to_string();
    let (_dir, backend, sock) = start("ctrl-gso", "gen", &["--gso-size", &mss, "--pkt-size", &pkt]);
    let csum = bit(vn::VIRTIO_NET_F_GUEST_CSUM);
    let tso4 = bit(vn::VIRTIO_NET_F_GUEST_TSO4);
    let want = bit(vn::VIRTIO_NET_F_CTRL_VQ) | bit(vn::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS) | csum | tso4;
    let mut g = Guest::connect(&sock, 1, want);
    assert_eq!(g.fe.features() & (csum | tso4), csum | tso4, "the gen device offers GUEST_CSUM and TSO4");
    let set = |g: &mut Guest, o: u64| g.cmd(OFFLOADS_CLASS, 0, &o.to_le_bytes());

    // Negotiated offloads are on after feature negotiation: whole super-frames.
    let mut next = expect_stream(&mut g, 2, Kind::Super, 0);
    assert_eq!(set(&mut g, csum), OK);
    next = expect_stream(&mut g, 8, Kind::PartialSegment, next);
    assert_eq!(set(&mut g, 0), OK);
    next = expect_stream(&mut g, 4, Kind::FullSegment, next);
    assert_eq!(set(&mut g, tso4), OK); // TSO needs checksum offload too: still segments
    next = expect_stream(&mut g, 4, Kind::FullSegment, next);
    assert_eq!(set(&mut g, bit(vn::VIRTIO_NET_F_GUEST_TSO6)), ERR, "not negotiated");
    assert_eq!(set(&mut g, csum | tso4 | bit(vn::VIRTIO_NET_F_MQ)), ERR, "not an offload");
    assert_eq!(g.cmd(OFFLOADS_CLASS, 0, &[0; 7]), ERR, "short");
    next = expect_stream(&mut g, 4, Kind::FullSegment, next); // refused: nothing changed
    assert_eq!(set(&mut g, csum | tso4), OK);
    next = expect_stream(&mut g, 1, Kind::Super, next);
    assert_eq!(next, 8);
    let dev = dev_stats(&backend, &sock, |d| d["tx_packets"].as_u64() == Some(23));
    assert_eq!((c(&dev, "generated"), harness::total_drops(&dev)), (8, 0), "{dev}");
    assert_eq!((c(&dev, "ctrl.commands"), c(&dev, "ctrl.errors")), (4, 3), "{dev}");
    assert_eq!(dev["rx_filter"]["guest_offloads"].as_u64(), Some(csum | tso4));

    // A driver that never negotiated TSO4 never gets a super-frame; one without
    // checksum offload gets complete checksums.
    drop(g);
    let mut g = Guest::connect(&sock, 1, bit(vn::VIRTIO_NET_F_CTRL_VQ) | csum);
    next = expect_stream(&mut g, 4, Kind::PartialSegment, next);
    drop(g);
    let mut g = Guest::connect(&sock, 1, 0);
    next = expect_stream(&mut g, 4, Kind::FullSegment, next);
    assert_eq!(next, 10);
    let last = backend.stop();
    let dev = harness::device(&last, &sock);
    assert_eq!((c(dev, "tx_packets"), c(dev, "generated"), harness::total_drops(dev)), (31, 10, 0), "{dev}");
}

// ---- malformed commands -----------------------------------------------------------

#[test]
fn malformed_commands_are_refused_and_a_broken_chain_breaks_only_the_control_queue() {
    let _serial = harness::serial();
    let (_dir, mut backend, sock) = start("ctrl-bad", "reflect", &[]);
    // CTRL_RX and CTRL_VLAN only: no RX_EXTRA, MAC_ADDR, MQ or GUEST_OFFLOADS.
    let want =
        bit(vn::VIRTIO_NET_F_CTRL_VQ) | bit(vn::VIRTIO_NET_F_CTRL_RX) | bit(vn::VIRTIO_NET_F_CTRL_VLAN);
    let mut g = Guest::connect(&sock, 1, want);
    let frames = filter_frames();
    let all: Vec<usize> = (0..frames.len()).collect();

    let refused: Vec<Vec<u8>> = vec![
        vec![],                                          // no header at all (only the ack buffer)
        vec![RX_CLASS],                                  // half a header
        vec![RX_CLASS, 0],                               // PROMISC without its byte
        vec![RX_CLASS, 0, 2],                            // a value that is neither 0 nor 1
        vec![RX_CLASS, 0, 1, 0],                         // one byte too many
        vec![RX_CLASS, 2, 1],                            // ALLUNI needs CTRL_RX_EXTRA
        vec![RX_CLASS, 6, 1],                            // no such RX command
        vec![MAC_CLASS, 1, 2, 0, 0, 0, 0, 1],            // MAC_ADDR_SET needs CTRL_MAC_ADDR
        vec![MAC_CLASS, 0, 0xff, 0xff, 0xff, 0xff],      // a table that claims 4G entries
        vec![MAC_CLASS, 0, 1, 0, 0, 0, 2, 0, 0],         // a table cut short
        vec![VLAN_CLASS, 0, 0x00, 0x10],                 // VLAN 4096
        vec![MQ_CLASS, 0, 1, 0],                         // MQ not negotiated (not even offered)
        vec![OFFLOADS_CLASS, 0, 0, 0, 0, 0, 0, 0, 0, 0], // CTRL_GUEST_OFFLOADS not negotiated
        vec![3, 0],                                      // ANNOUNCE: GUEST_ANNOUNCE not offered
        vec![9, 0],                                      // no such class
        vec![0; 64 * 1024 + 1],                          // longer than any command
    ];
    for cmd in &refused {
        let parts: Vec<&[u8]> = if cmd.is_empty() { vec![] } else { vec![cmd] };
        assert_eq!(g.send(&parts), ERR, "command {:?}", &cmd[..cmd.len().min(10)]);
    }
    g.reflect(0, &frames, &all); // refused commands changed nothing: still promiscuous

    // Framing is the driver's choice: class, command and data in three descriptors.
    assert_eq!(g.send(&[&[RX_CLASS], &[0], &[0]]), OK);
    g.reflect(0, &frames, &[0, 3]);
    // A bigger ack buffer: only the ack byte is written.
    let (len, ack) = g.fe.ctrl_command(g.ctrl, &[&[RX_CLASS, 0, 1]], 8, IO).unwrap();
    g.used += 1;
    assert_eq!((len, ack), (1, Some(OK)));
    g.reflect(0, &frames, &all);
    // No room for the ack: returned unused (length 0) and not applied.
    let (len, ack) = g.fe.ctrl_command(g.ctrl, &[&[RX_CLASS, 0, 0]], 0, IO).unwrap();
    g.used += 1;
    assert_eq!((len, ack), (0, None));
    g.reflect(0, &frames, &all);

    let dev = dev_stats(&backend, &sock, |d| d["rx_packets"].as_u64() == Some(28));
    assert_eq!((c(&dev, "ctrl.commands"), c(&dev, "ctrl.errors")), (2, 17), "{dev}");
    assert_eq!(dev["ctrl"]["broken"], false);

    // A readable descriptor after the writable one breaks the ring protocol: the
    // control queue stops, nothing else does.
    let slot = g.used;
    assert_eq!(g.fe.used_idx(g.ctrl).unwrap(), slot);
    let (ctrl_size, _) = g.fe.ring(g.ctrl).unwrap();
    assert!(ctrl_size >= 2);
    let ack = g.fe.alloc(1, 64).unwrap();
    let cmd = g.fe.alloc(3, 64).unwrap();
    g.fe.write_mem(cmd, &[RX_CLASS, 0, 0]).unwrap();
    g.fe.write_desc(g.ctrl, 0, Descriptor { addr: ack, len: 1, flags: DESC_F_WRITE | DESC_F_NEXT, next: 1 })
        .unwrap();
    g.fe.write_desc(g.ctrl, 1, Descriptor { addr: cmd, len: 3, flags: 0, next: 0 }).unwrap();
    g.fe.write_avail_slot(g.ctrl, slot, 0).unwrap();
    g.fe.set_avail_idx(g.ctrl, slot.wrapping_add(1)).unwrap();
    g.fe.kick(g.ctrl).unwrap();
    let dev = dev_stats(&backend, &sock, |d| d["ctrl"]["broken"] == true);
    assert_eq!(c(&dev, "broken_queues"), 0, "no data queue broke: {dev}");
    g.fe.kick(g.ctrl).unwrap();
    std::thread::sleep(QUIET);
    assert_eq!(g.fe.used_idx(g.ctrl).unwrap(), slot, "the broken control queue completes nothing");
    assert!(backend.is_running(), "log:\n{}", backend.log());
    g.reflect(0, &frames, &all);

    let last = backend.stop();
    let dev = harness::device(&last, &sock);
    assert_reflect_counts(dev, 35, 35 - 5, 5);
    assert_eq!((c(dev, "ctrl.commands"), c(dev, "ctrl.errors")), (2, 17), "{dev}");
    assert_eq!(dev["ctrl"]["broken"], true);
}

// ---- no control queue -----------------------------------------------------------------

#[test]
fn without_ctrl_vq_there_is_no_control_queue_and_no_filtering() {
    let _serial = harness::serial();
    let (_dir, backend, sock) = start("ctrl-none", "reflect", &["--queues", "2"]);
    // As DPDK's virtio-user acks: filter and MQ features, but CTRL_VQ stripped.
    let want = (ctrl_features() & !bit(vn::VIRTIO_NET_F_CTRL_VQ)) | bit(vn::VIRTIO_NET_F_MQ);
    let mut g = Guest::connect(&sock, 2, want);
    let frames = filter_frames();
    let all: Vec<usize> = (0..frames.len()).collect();
    g.reflect(0, &frames, &all);
    g.reflect(1, &frames, &all); // every pair carries traffic (SET_VRING_ENABLE decides)
    g.fe.set_vring_enable(2, false).unwrap();
    g.reflect(1, &frames, &[]);
    let dev = dev_stats(&backend, &sock, |d| d["rx_packets"].as_u64() == Some(21));
    assert_eq!(c(&dev, "tx_packets"), 14);
    assert_eq!((c(&dev, "drops.peer_down"), harness::total_drops(&dev)), (7, 7), "{dev}");
    assert_eq!(dev["active_pairs"].as_u64(), Some(2));
    // Queue 4 does not exist (the backend refuses it and closes the connection, as it
    // does for every refused vhost-user request); the process carries on.
    assert!(g.fe.setup_queue(4, CTRL_RING).is_err(), "queue 4 does not exist without CTRL_VQ");
    let mut backend = backend;
    assert!(backend.is_running());
    backend.stop();
}
