//! Issue 18: the `tap` port. Two private network namespaces, created and removed by the
//! test, each hold one tap interface served by one backend (two `tap` ports); our
//! testpmd forwards between its two virtio-user ports in `io` mode, so the kernel of one
//! namespace reaches the other only through tap → backend → our driver → backend → tap.
//!
//! * `ping_and_tcp_cross_two_namespaces_through_testpmd`: 20 pings across, 20 replies;
//!   64 MiB over TCP from one namespace to the other (a sender and a receiver thread,
//!   each moved into its namespace with `setns`), the receiver's byte count and sha256
//!   equal to the sender's; every frame one tap port took from its guest reached the
//!   other tap port's guest (backend counters against testpmd's), no drop anywhere in
//!   the backend; both tap interfaces gone once the backend exits.
//! * `namespace_pings_testpmd_icmpecho_on_a_tap_port`: one tap port, testpmd in
//!   `icmpecho` mode; the namespace's kernel pings an address on the link and gets 20
//!   replies of 20 (testpmd answers the ARP request and every echo request).
//! * `an_existing_persistent_tap_is_attached_and_left_in_place`: the same against a tap
//!   made beforehand with `ip tuntap add` (backend and tap inside the namespace); the
//!   tap is still there after the backend exits.
//! * `tcp_with_checksum_and_tso_offloads_passed_through_whole`: instead of testpmd, a
//!   bridge of two ports of our driver in this process that negotiate checksum and TSO
//!   offloads both ways and pass each frame's offload information on: 64 MiB over TCP
//!   with the sha256 equal, TCP super-frames from the kernel each way, passed whole to
//!   the other kernel (the backend's `offloads` counters equal what the bridge saw); then
//!   guest TSO switched off on one port (GUEST_OFFLOADS_SET) and a second 64 MiB: the
//!   kernel sends that port no further super-frame.
//! * `udp_super_frames_are_segmented_by_the_kernel`: our driver (in this process)
//!   negotiates CSUM and HOST_USO on a tap port and sends UDP super-frames (8000 bytes of
//!   payload cut at 1000, IPv4); a UDP socket in the namespace receives exactly 8
//!   datagrams of 1000 bytes per super-frame, equal to the payload in order; the backend
//!   counts each request passed whole to the kernel.
//! * `frames_without_a_guest_are_dropped_as_no_buffer`: no front-end; what the kernel
//!   sends into the tap is counted as `no_buffer`, exactly the tap's own `tx_packets`.
//! * `frames_waiting_for_buffers_arrive_when_the_guest_refills`: a guest (our driver in
//!   this process) that stops taking frames while the kernel sends 600 (an AF_PACKET
//!   socket on the tap in the namespace); the worker
//!   (default `--poll-us`) sleeps with frames waiting in the kernel for receive buffers;
//!   once the guest takes frames again, its refill wakes the worker and all 600 arrive,
//!   sooner than the worker's own sleep timeout could have.
//! * `a_receive_batch_keeps_order_and_bytes_across_filtered_frames`: promiscuous mode
//!   off, a ring's worth of filler then 200 frames of varied lengths from an AF_PACKET
//!   socket, every other one to another address, read in batches once the guest
//!   refills: the guest gets every filler and exactly the 100 to its own address, in
//!   order and equal byte for byte (the batch copies each down past the chains the
//!   filtered ones left), and the backend counts exactly 100 `filtered`.
//! * `tap_errors_are_one_line_and_exit_1`: without CAP_NET_ADMIN (as `nobody`), a tap
//!   held by another backend (busy), `lo` (not a tap), a bad name: one line, exit 1.
//!
//! Each test takes the cross-binary [`serial`] lock, bounds every wait, and removes its
//! namespaces in `Drop` guards, also when an assertion fails (the backend, which owns
//! the taps, is stopped first, so the taps go away with it). IPv6 is switched off in the
//! namespaces so that the only traffic is the test's (ARP, ICMP, TCP). The host's own
//! interfaces are never touched.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Duration;

use serde_json::Value;
use vnet_tests::harness::{counter, device, serial, total_drops, within, workspace_bin, Backend, TempDir};
use vnet_tests::netns::{fill, link_exists, run, Netns, Sha, PINGS};
use vnet_tests::testpmd_proc::{forward_stats, Testpmd};

const WAIT: Duration = Duration::from_secs(20);
/// Bytes sent over TCP.
const XFER: usize = 64 << 20;

fn testpmd_connected(stats: &Value, socks: &[&std::path::Path]) -> bool {
    socks.iter().all(|s| {
        stats["devices"]
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["socket"] == s.to_str().unwrap() && d["connected"] == true))
    })
}

/// Waits until two successive stats lines of the backend show the same device counters.
fn settle(backend: &Backend) {
    let last = std::sync::Mutex::new((String::new(), String::new()));
    backend.wait_stats(WAIT, |s| {
        let (t, key) = (s["elapsed_s"].to_string(), s["devices"].to_string());
        let mut l = last.lock().unwrap_or_else(|p| p.into_inner());
        let same = l.0 != t && l.1 == key;
        *l = (t, key);
        same
    });
}

#[test]
fn ping_and_tcp_cross_two_namespaces_through_testpmd() {
    cross_namespaces(1, "", &[], &[]);
}

/// The same with one system call per frame each way (`--tap-syscalls`, what the backend
/// falls back to where io_uring is refused) instead of one io_uring submission per
/// burst.
#[test]
fn ping_and_tcp_cross_with_one_system_call_per_frame() {
    cross_namespaces(1, "", &[], &["--tap-syscalls"]);
}

/// The same with mergeable receive buffers of 768 bytes: each full-size frame from the
/// kernel is read over two receive chains at once, and testpmd sends it on as a chain of
/// two buffers (one `writev` over both).
#[test]
fn ping_and_tcp_cross_with_mergeable_buffers_over_small_chains() {
    cross_namespaces(1, ",mrg_rxbuf=1", &["--mbuf-size", "1024", "--max-pkt-len", "1518"], &[]);
}

/// Packed rings (`packed_vq=1`): the same paths over the packed-ring engine.
#[test]
fn ping_and_tcp_cross_packed_rings() {
    cross_namespaces(1, ",packed_vq=1", &[], &[]);
}

/// `--queues 2`: multi-queue taps (`IFF_MULTI_QUEUE`), one tap queue per queue pair;
/// 16 TCP connections of 4 MiB each, which the kernel spreads over both tap queues.
#[test]
fn ping_and_tcp_cross_multi_queue_taps() {
    cross_namespaces(2, ",queues=2", &["--rxq", "2", "--txq", "2"], &[]);
}

/// Sends `XFER` bytes from `ns_a` to 10.77.0.2:5001 in `ns_b` over `flows` TCP
/// connections; returns (bytes, sha256) of each connection as sent and as received,
/// both sorted.
type Flows = Vec<(usize, String)>;
fn tcp_transfer(ns_a: &Netns, ns_b: &Netns, flows: usize) -> (Flows, Flows) {
    let listener = ns_b
        .spawn(|| TcpListener::bind(SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 2), 5001)).expect("bind in B"))
        .join()
        .expect("listener thread");
    let receiver = thread::spawn(move || {
        let conns: Vec<_> = (0..flows)
            .map(|_| {
                let (mut s, _) = listener.accept().expect("accept");
                thread::spawn(move || {
                    s.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
                    let mut sha = Sha::new();
                    let mut buf = vec![0u8; 1 << 20];
                    let mut n = 0usize;
                    loop {
                        let k = s.read(&mut buf).expect("receive");
                        if k == 0 {
                            break;
                        }
                        sha.update(&buf[..k]);
                        n += k;
                    }
                    (n, sha.hex())
                })
            })
            .collect();
        conns.into_iter().map(|h| h.join().expect("receiving connection")).collect::<Vec<_>>()
    });
    let senders: Vec<_> = (0..flows)
        .map(|f| {
            ns_a.spawn(move || {
                let addr = "10.77.0.2:5001".parse().expect("addr");
                let mut s =
                    TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect from A");
                s.set_write_timeout(Some(Duration::from_secs(60))).expect("timeout");
                let mut sha = Sha::new();
                let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ (f as u64 + 1);
                let mut buf = vec![0u8; 1 << 20];
                for _ in 0..XFER / flows / buf.len() {
                    fill(&mut buf, &mut state);
                    s.write_all(&buf).expect("send");
                    sha.update(&buf);
                }
                s.shutdown(std::net::Shutdown::Write).expect("shutdown");
                (XFER / flows, sha.hex())
            })
        })
        .collect();
    within("tcp transfer", Duration::from_secs(120), move || {
        let mut sent: Vec<_> = senders.into_iter().map(|h| h.join().expect("sender")).collect();
        let mut got = receiver.join().expect("receiver");
        sent.sort();
        got.sort();
        (sent, got)
    })
}

/// Two private namespaces, each holding one of the two tap ports of one backend (taps
/// `vnta<pid>` at 10.77.0.1/24 and `vntb<pid>` at 10.77.0.2/24, links still down).
/// Field order is drop order: the backend goes first (its exit removes the taps), then
/// the namespaces.
struct TwoTaps {
    backend: Backend,
    tap_a: String,
    tap_b: String,
    sa: std::path::PathBuf,
    sb: std::path::PathBuf,
    ns_a: Netns,
    ns_b: Netns,
    _dir: TempDir,
}

impl TwoTaps {
    /// Starts the backend with `extra` arguments and moves its taps into the namespaces.
    fn new(extra: &[&str]) -> TwoTaps {
        let pid = std::process::id();
        let (tap_a, tap_b) = (format!("vnta{pid}"), format!("vntb{pid}"));
        let ns_a = Netns::new("a");
        let ns_b = Netns::new("b");
        let dir = TempDir::new("tap");
        let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
        let port_a = format!("tap:{},{tap_a}", sa.display());
        let port_b = format!("tap:{},{tap_b}", sb.display());
        let mut args = vec!["--port", &port_a, "--port", &port_b];
        args.extend_from_slice(extra);
        let backend = Backend::start(&args);
        assert!(
            link_exists(&tap_a) && link_exists(&tap_b),
            "the backend created no taps:\n{}",
            backend.log()
        );
        ns_a.take(&tap_a, "10.77.0.1/24");
        ns_b.take(&tap_b, "10.77.0.2/24");
        TwoTaps { backend, tap_a, tap_b, sa, sb, ns_a, ns_b, _dir: dir }
    }
}

fn cross_namespaces(queues: u16, devargs: &str, testpmd_args: &[&str], backend_args: &[&str]) {
    let _lock = serial();
    let nq = queues.to_string();
    let mut bargs = vec!["--queues", &nq];
    bargs.extend_from_slice(backend_args);
    // Bound last, dropped first: the backend (whose exit removes the taps) before the namespaces.
    let TwoTaps { _dir, ns_a, ns_b, sa, sb, tap_a, tap_b, backend } = TwoTaps::new(&bargs);
    // How the tap queues move frames: what was asked, or io_uring where the kernel
    // allows it (the log says when a tap queue makes one system call per frame, and why).
    let io_uring_allowed =
        std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled").map_or(true, |v| v.trim() == "0");
    let per_frame = backend.log().matches("one system call per frame").count();
    if backend_args.contains(&"--tap-syscalls") {
        assert_eq!(
            per_frame,
            2 * queues as usize,
            "every tap queue moves frames one by one:\n{}",
            backend.log()
        );
    } else if io_uring_allowed {
        assert_eq!(per_frame, 0, "every tap queue batches through io_uring:\n{}", backend.log());
    }

    let vdev_a = format!("virtio_user0,path={}{devargs}", sa.display());
    let vdev_b = format!("virtio_user1,path={}{devargs}", sb.display());
    let mut args = vec!["--vdev", &vdev_a, "--vdev", &vdev_b, "--forward-mode", "io", "--duration", "600"];
    args.extend_from_slice(testpmd_args);
    let tp = Testpmd::spawn(&args);
    backend.wait_stats(WAIT, |s| testpmd_connected(s, &[&sa, &sb]));
    ns_a.up(&tap_a);
    ns_b.up(&tap_b);

    assert_eq!(ns_a.ping("10.77.0.2"), PINGS, "ping replies across the two namespaces");

    // 64 MiB from A to B over TCP (16 connections with several queues).
    let flows = if queues > 1 { 16 } else { 1 };
    let (sent, got) = tcp_transfer(&ns_a, &ns_b, flows);
    assert_eq!(got.iter().map(|g| g.0).sum::<usize>(), XFER, "bytes received in B");
    assert!(got.iter().all(|g| g.1.len() == 64), "a sha256 from sha256sum per connection: {got:?}");
    assert_eq!(got, sent, "sha256 of what B received against what A sent, per connection");

    // Quiet: the counters settle (two stats lines a period apart the same), then the
    // two sides are compared.
    settle(&backend);
    tp.signal(libc::SIGINT);
    let out = tp.wait(WAIT);
    let fin = backend.stop();
    if devargs.contains("packed_vq=1") {
        assert_eq!(
            out.stdout.matches("Ring layout: packed").count(),
            2,
            "both ports on packed rings:\n{out}"
        );
    }
    if devargs.contains("mrg_rxbuf=1") {
        let feats: Vec<u64> = out
            .stdout
            .lines()
            .filter_map(|l| l.strip_prefix("Negotiated features: 0x"))
            .map(|h| u64::from_str_radix(h.trim(), 16).expect("hex features"))
            .collect();
        assert_eq!(feats.len(), 2, "two ports' features:\n{out}");
        assert!(feats.iter().all(|f| f & (1 << 15) != 0), "MRG_RXBUF negotiated on both ports: {feats:x?}");
    }
    let (a, b) = (device(&fin, &sa), device(&fin, &sb));
    let (p0, p1) = (
        forward_stats(&out.stdout, 0).unwrap_or_else(|| panic!("no stats for port 0:\n{out}")),
        forward_stats(&out.stdout, 1).unwrap_or_else(|| panic!("no stats for port 1:\n{out}")),
    );
    // What tap A's kernel sent reached testpmd's port 0, and what testpmd sent out of
    // port 1 reached tap B's kernel (and back); the backend dropped nothing.
    assert_eq!(counter(a, "tx_packets"), p0.rx_packets, "tap A → port 0");
    assert_eq!(counter(b, "rx_packets"), p1.tx_packets, "port 1 → tap B");
    assert_eq!(counter(b, "tx_packets"), p1.rx_packets, "tap B → port 1");
    assert_eq!(counter(a, "rx_packets"), p0.tx_packets, "port 0 → tap A");
    assert_eq!((a["port"].as_str(), a["tap"].as_str()), (Some("tap"), Some(tap_a.as_str())));
    assert_eq!(b["tap"].as_str(), Some(tap_b.as_str()));
    assert_eq!(total_drops(a), 0, "drops on tap A's device: {a}");
    assert_eq!(total_drops(b), 0, "drops on tap B's device: {b}");
    assert!(counter(a, "tx_bytes") >= XFER as u64, "the transfer went through tap A's device");
    let qs = |d: &Value, key: &str| -> Vec<u64> {
        d["queues"].as_array().expect("queues").iter().map(|q| q[key].as_u64().expect("counter")).collect()
    };
    assert_eq!(qs(a, "rx_packets").len(), queues as usize, "one statistics entry per tap queue");
    if queues > 1 {
        // Both tap queues carried the transfer, each way.
        for (d, key) in [(a, "rx_packets"), (b, "tx_packets"), (b, "rx_packets"), (a, "tx_packets")] {
            let per = qs(d, key);
            assert!(per.iter().all(|&n| n > 0), "{key} per queue of {}: {per:?}", d["socket"]);
        }
    }
    // The backend created the taps; they went away with it.
    assert!(!link_exists(&tap_a) && !link_exists(&tap_b));
    for ns in [&ns_a, &ns_b] {
        let links = run("ip", &["-n", &ns.name, "-o", "link", "show"]);
        assert!(!links.contains("vnt"), "a tap left in {}:\n{links}", ns.name);
    }
}

/// One `tap` port (backend on one pinned worker, default `--poll-us`) whose tap is in
/// a new namespace as 10.77.0.1/24, still down: (namespace, tap, its directory, the
/// socket, backend). Bound in this order, the backend is dropped first (the taps go with
/// it before the namespace does).
fn one_tap(tag: &str) -> (Netns, String, TempDir, std::path::PathBuf, Backend) {
    let tap = format!("vnt{tag}{}", std::process::id());
    let ns = Netns::new(tag);
    let dir = TempDir::new("tap");
    let sock = dir.join(&format!("{tag}.sock"));
    let spec = format!("tap:{},{tap}", sock.display());
    let backend = Backend::start(&["--port", &spec, "--cores", "1"]);
    ns.take(&tap, "10.77.0.1/24");
    (ns, tap, dir, sock, backend)
}

/// USO through a tap: see the module comment.
#[test]
fn udp_super_frames_are_segmented_by_the_kernel() {
    use driver::layout::features as f;
    use driver::offload::GsoKind;
    use driver::{Packet, Port, PortConfig, TxCsum, TxGso, TxOffload};
    const SUPER: usize = 3;
    const PAYLOAD: usize = 8000;
    const MSS: usize = 1000;
    let _lock = serial();
    let (ns, tap, _dir, sock, backend) = one_tap("u");
    let want = f::bit(f::NET_CSUM) | f::bit(f::NET_HOST_USO);
    let mut cfg = PortConfig::virtio_user(&sock);
    cfg.features |= want;
    let mut port = within("Port::open", WAIT, move || Port::open(cfg)).expect("Port::open");
    assert_eq!(port.info().features & want, want, "the tap port offers CSUM and HOST_USO");
    let mut qp = port.queue_pair(0).expect("queue pair 0");
    ns.up(&tap);
    let mac: Vec<u8> = ns
        .exec("cat", &[&format!("/sys/class/net/{tap}/address")])
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).expect("hex"))
        .collect();
    // The receiver, bound before anything is sent.
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = ns.spawn(move || {
        let s = std::net::UdpSocket::bind("10.77.0.1:5300").expect("bind");
        s.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        ready_tx.send(()).expect("ready");
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        while got.len() < SUPER * PAYLOAD / MSS {
            match s.recv(&mut buf) {
                Ok(n) => got.push(buf[..n].to_vec()),
                Err(_) => break,
            }
        }
        got
    });
    ready_rx.recv().expect("receiver ready");
    let payload: Vec<u8> = (0..SUPER * PAYLOAD).map(|i| (i * 7 + i / 251) as u8).collect();
    for k in 0..SUPER {
        let data = &payload[k * PAYLOAD..(k + 1) * PAYLOAD];
        // Ethernet, IPv4 (header checksum), UDP (partial checksum: the pseudo-header's).
        let mut fr = Vec::with_capacity(42 + PAYLOAD);
        fr.extend_from_slice(&mac);
        fr.extend_from_slice(&[2, 0, 0, 0, 0, 2, 0x08, 0x00]);
        let ip_len = (20 + 8 + PAYLOAD) as u16;
        let mut ip = [0x45, 0, 0, 0, 0, k as u8, 0, 0, 64, 17, 0, 0, 10, 77, 0, 2, 10, 77, 0, 1];
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        let fold = |mut a: u32| {
            while a >> 16 != 0 {
                a = (a & 0xffff) + (a >> 16);
            }
            a as u16
        };
        let sum = fold(ip.chunks(2).map(|w| u16::from_be_bytes([w[0], w[1]]) as u32).sum());
        ip[10..12].copy_from_slice(&(!sum).to_be_bytes());
        fr.extend_from_slice(&ip);
        let udp_len = (8 + PAYLOAD) as u16;
        let pseudo = fold(0x0a4d + 0x0002 + 0x0a4d + 0x0001 + 17 + udp_len as u32);
        fr.extend_from_slice(&4000u16.to_be_bytes());
        fr.extend_from_slice(&5300u16.to_be_bytes());
        fr.extend_from_slice(&udp_len.to_be_bytes());
        fr.extend_from_slice(&pseudo.to_be_bytes());
        fr.extend_from_slice(data);
        let mut head: Option<Packet> = None;
        for part in fr.chunks(2000) {
            let mut p = port.pool().alloc().expect("a pool buffer");
            p.set_data(part).expect("2000 bytes fit a buffer");
            match head.as_mut() {
                None => head = Some(p),
                Some(h) => h.append(p).expect("same pool"),
            }
        }
        let mut pkt = head.expect("a frame");
        pkt.set_tx_offload(TxOffload {
            csum: Some(TxCsum { start: 34, offset: 6 }),
            gso: Some(TxGso { kind: GsoKind::UdpL4, size: MSS as u16, hdr_len: 42 }),
        });
        let mut v = vec![pkt];
        let deadline = std::time::Instant::now() + WAIT;
        while !v.is_empty() {
            qp.tx.tx_burst(&mut v);
            assert!(std::time::Instant::now() < deadline, "transmit ring stuck: {:?}", qp.tx.error());
        }
    }
    let got = receiver.join().expect("receiver");
    assert_eq!(got.len(), SUPER * PAYLOAD / MSS, "datagrams received");
    assert!(got.iter().all(|d| d.len() == MSS), "each a segment of {MSS} bytes");
    assert_eq!(got.concat(), payload, "the payloads in order, byte for byte");
    drop(qp);
    drop(port);
    let fin = backend.stop();
    let d = device(&fin, &sock);
    let off = |k: &str| d["offloads"][k].as_u64().unwrap_or_else(|| panic!("offloads.{k} in {d}"));
    assert_eq!((off("gso_requests"), off("passed_whole")), (SUPER as u64, SUPER as u64), "{d}");
    assert_eq!(counter(d, "rx_packets"), SUPER as u64, "{d}");
    assert_eq!(total_drops(d), 0, "{d}");
}

/// A guest that stops taking frames: see the module comment.
#[test]
fn frames_waiting_for_buffers_arrive_when_the_guest_refills() {
    use driver::{Packet, Port, PortConfig};
    const SENT: usize = 600;
    let _lock = serial();
    // The default --poll-us: an idle worker sleeps.
    let (ns, tap, _dir, sock, backend) = one_tap("w");
    let cfg = PortConfig::virtio_user(&sock);
    let mut port = within("Port::open", WAIT, move || Port::open(cfg)).expect("Port::open");
    let ring = port.info().ring_size as usize;
    assert!(
        ring < SENT && SENT - ring < 500,
        "more frames than buffers, fewer than the tap queues: ring {ring}"
    );
    let mut qp = port.queue_pair(0).expect("queue pair 0");
    ns.up(&tap);
    // SENT frames of an experimental ethertype (0x88b5), each sent once through an
    // AF_PACKET socket on the tap (the kernel queues them for the tap's reader).
    let frames = (0..SENT)
        .map(|i| {
            let mut f = vec![0u8; 64];
            f[..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
            f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
            f[12..14].copy_from_slice(&[0x88, 0xb5]);
            f[14..16].copy_from_slice(&(i as u16).to_be_bytes());
            f
        })
        .collect();
    let sent = send_raw(&ns, &tap, frames);
    assert_eq!(sent, SENT, "frames the AF_PACKET socket sent");
    let stat = |name: &str| -> u64 {
        ns.exec("cat", &[&format!("/sys/class/net/{tap}/statistics/{name}")])
            .trim()
            .parse()
            .expect("a number")
    };
    // The guest's buffers are full, the rest waits in the kernel; the worker is asleep.
    settle(&backend);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(stat("tx_dropped"), 0, "the tap queue held what the guest had no room for");
    let mut batch: Vec<Packet> = Vec::with_capacity(64);
    let (mut ours, mut others) = (0usize, 0usize);
    let start = std::time::Instant::now();
    while ours < SENT && start.elapsed() < Duration::from_secs(5) {
        qp.rx.rx_burst(&mut batch, 64);
        for p in batch.drain(..) {
            let d = p.data();
            if d.len() >= 16 && d[12..14] == [0x88, 0xb5] {
                assert_eq!(u16::from_be_bytes([d[14], d[15]]) as usize, ours, "in order");
                ours += 1;
            } else {
                others += 1;
            }
        }
    }
    let took = start.elapsed();
    assert_eq!(ours, SENT, "every frame reached the guest ({others} other frames)");
    // A worker that slept on until its timeout (1 s) would take that long for the second
    // ring's worth; the refill's kick wakes it at once.
    assert!(took < Duration::from_millis(500), "the queued frames took {took:?} after the guest refilled");
    drop(qp);
    drop(port);
    let fin = backend.stop();
    let d = device(&fin, &sock);
    assert_eq!(counter(d, "tx_packets"), (ours + others) as u64, "the backend's count: {d}");
    assert_eq!(total_drops(d), 0, "no drop: {d}");
}

/// Sends each of `frames` once through an AF_PACKET socket on `tap` in `ns` (the kernel
/// queues them for the tap's reader); returns how many the socket took.
fn send_raw(ns: &Netns, tap: &str, frames: Vec<Vec<u8>>) -> usize {
    let ifname = tap.to_string();
    ns.spawn(move || {
        // SAFETY: socket() with constant arguments; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
        let name = std::ffi::CString::new(ifname).expect("no NUL");
        // SAFETY: a NUL-terminated name that outlives the call.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        // SAFETY: all zeros is a valid sockaddr_ll.
        let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sa.sll_family = libc::AF_PACKET as u16;
        sa.sll_ifindex = index as i32;
        sa.sll_halen = 6;
        let mut n = 0;
        for f in &frames {
            // SAFETY: `f` and `sa` are alive and readable for the lengths given.
            let r = unsafe {
                libc::sendto(
                    fd,
                    f.as_ptr().cast(),
                    f.len(),
                    0,
                    &sa as *const libc::sockaddr_ll as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if r == f.len() as isize {
                n += 1;
            }
        }
        // SAFETY: our descriptor, closed once.
        unsafe { libc::close(fd) };
        n
    })
    .join()
    .expect("sender thread")
}

/// Receive batches whose frames alternate between accepted and filtered: the guest
/// (promiscuous mode off) gets exactly the accepted half, in order and byte for byte.
/// The frames wait in the kernel's queue behind a full ring until the guest refills, so
/// they are read many per batch; each filtered frame leaves its receive chain available,
/// so the accepted frames after it in the batch were read into later chains than the
/// ones they are delivered in (the batch copies them down).
#[test]
fn a_receive_batch_keeps_order_and_bytes_across_filtered_frames() {
    use driver::{Packet, Port, PortConfig};
    const SENT: usize = 200;
    let _lock = serial();
    let (ns, tap, _dir, sock, backend) = one_tap("f");
    let cfg = PortConfig::virtio_user(&sock);
    let mut port = within("Port::open", WAIT, move || Port::open(cfg)).expect("Port::open");
    let mac = port.info().mac;
    let ring = port.info().ring_size as usize;
    assert!(ring + SENT < 500, "fewer frames than the tap queues: ring {ring}");
    port.control().set_promisc(false).expect("promiscuous mode off");
    let mut qp = port.queue_pair(0).expect("queue pair 0");
    ns.up(&tap);
    // Frame i: to us when i is even, else to another unicast address; lengths vary (60
    // to 660 bytes), the payload is a pattern of i.
    let frame = |i: usize| -> Vec<u8> {
        let mut f: Vec<u8> = (0..60 + (i % 7) * 100).map(|j| (i * 13 + j) as u8).collect();
        let dst = if i % 2 == 0 { mac } else { [2, 0, 0, 0, 0, 2] };
        f[..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        f[12..14].copy_from_slice(&[0x88, 0xb5]);
        f[14..16].copy_from_slice(&(i as u16).to_be_bytes());
        f
    };
    // First a ring's worth of filler to us (ethertype 0x88b6), which fills the guest's
    // receive buffers while it takes nothing: the test's frames wait in the kernel's
    // queue and are read in batches once the guest refills.
    let filler = (0..ring).map(|_| {
        let mut f = frame(0);
        f[12..14].copy_from_slice(&[0x88, 0xb6]);
        f
    });
    let sent = send_raw(&ns, &tap, filler.chain((0..SENT).map(frame)).collect());
    assert_eq!(sent, ring + SENT, "frames the AF_PACKET socket sent");
    settle(&backend);
    let mut batch: Vec<Packet> = Vec::with_capacity(64);
    let (mut ours, mut fillers, mut others) = (0usize, 0usize, 0usize);
    let start = std::time::Instant::now();
    while ours < SENT / 2 && start.elapsed() < Duration::from_secs(5) {
        qp.rx.rx_burst(&mut batch, 64);
        for p in batch.drain(..) {
            let d = p.data();
            if d.len() >= 16 && d[12..14] == [0x88, 0xb6] {
                fillers += 1;
            } else if d.len() >= 16 && d[12..14] == [0x88, 0xb5] {
                let i = u16::from_be_bytes([d[14], d[15]]) as usize;
                assert_eq!(i, 2 * ours, "accepted frames in order");
                assert!(d == &frame(i)[..], "frame {i} byte for byte");
                ours += 1;
            } else {
                others += 1;
            }
        }
    }
    assert_eq!(ours, SENT / 2, "every accepted frame reached the guest ({others} other frames)");
    assert_eq!(fillers, ring, "every filler frame reached the guest");
    // Nothing more of ours arrives.
    thread::sleep(Duration::from_millis(200));
    qp.rx.rx_burst(&mut batch, 64);
    for p in batch.drain(..) {
        assert!(p.data().get(12..14) != Some(&[0x88, 0xb5][..]), "a filtered frame arrived");
        others += 1;
    }
    drop(qp);
    drop(port);
    let fin = backend.stop();
    let d = device(&fin, &sock);
    assert_eq!(counter(d, "tx_packets"), (ours + fillers + others) as u64, "the backend's count: {d}");
    // With IPv6 off nothing else of the kernel's is addressed elsewhere.
    assert_eq!(
        d["drops"]["filtered"].as_u64(),
        Some((SENT / 2) as u64),
        "every frame to another address: {d}"
    );
    assert_eq!(total_drops(d), (SENT / 2) as u64, "no other drop: {d}");
}

/// `host-backend` with `args`, run to its exit (bounded): its exit code and stderr.
fn backend_fails(args: &[&str], user: Option<u32>) -> (i32, String) {
    let bin = workspace_bin("host-backend");
    let mut cmd = Command::new(&bin);
    cmd.args(args).stdin(Stdio::null());
    if let Some(uid) = user {
        use std::os::unix::process::CommandExt;
        cmd.uid(uid).gid(uid);
    }
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawn host-backend");
    let out = within("host-backend exit", WAIT, move || child.wait_with_output().expect("wait"));
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).to_string())
}

/// Errors are one clear line and exit code 1: no CAP_NET_ADMIN (run as `nobody`), a
/// tap another process has open, a name that is not a tap (`lo`), a bad name.
#[test]
fn tap_errors_are_one_line_and_exit_1() {
    let _lock = serial();
    let dir = TempDir::new("tap");
    let pid = std::process::id();
    let sock = dir.join("x.sock");
    let name = format!("vntx{pid}");

    let port = format!("tap:{},{name}", sock.display());
    let (code, err) = backend_fails(&["--port", &port], Some(65534));
    assert_eq!(code, 1, "{err}");
    let line = err.lines().last().unwrap_or_default();
    assert!(line.contains(&format!("tap {name}:")) && line.contains("CAP_NET_ADMIN"), "{err}");
    assert!(!link_exists(&name));

    let holder = Backend::start(&["--port", &port]);
    let sock2 = dir.join("y.sock");
    let port2 = format!("tap:{},{name}", sock2.display());
    let (code, err) = backend_fails(&["--port", &port2], None);
    assert_eq!(code, 1, "{err}");
    assert!(err.lines().last().unwrap_or_default().contains("busy"), "{err}");
    let fin = holder.stop();
    assert_eq!(total_drops(device(&fin, &sock)), 0);
    assert!(!link_exists(&name), "the tap the backend created is gone after it exits");

    let lo = format!("tap:{},lo", sock2.display());
    let (code, err) = backend_fails(&["--port", &lo], None);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("tap lo: an interface of that name exists and is not a tap device"), "{err}");

    let bad = format!("tap:{},a/b", sock2.display());
    let (code, err) = backend_fails(&["--port", &bad], None);
    assert_eq!((code, err.lines().count()), (1, 1), "{err}");
    assert!(err.contains("not a valid interface name"), "{err}");
}

/// A persistent tap made beforehand (`ip tuntap add`, inside a private namespace where
/// the backend runs too) is attached to, carries traffic, and stays when the backend
/// exits.
#[test]
fn an_existing_persistent_tap_is_attached_and_left_in_place() {
    let _lock = serial();
    let tap = format!("vntp{}", std::process::id());
    let ns = Netns::new("p");
    ns.exec("ip", &["tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr"]);
    ns.exec("ip", &["addr", "add", "10.77.0.1/24", "dev", &tap]);
    let dir = TempDir::new("tap");
    let sock = dir.join("p.sock");
    let port = format!("tap:{},{tap}", sock.display());
    let bin = workspace_bin("host-backend");
    let backend = Backend::start_with(
        std::path::Path::new("ip"),
        &["netns", "exec", &ns.name, bin.to_str().expect("utf-8 path"), "--port", &port],
    );
    icmpecho_answers_pings(&ns, &tap, &sock, backend);
    let links = ns.exec("ip", &["-o", "link", "show", &tap]);
    assert!(links.contains(&tap), "the persistent tap stays after the backend exits:\n{links}");
}

/// What one direction of [`offload_bridge`] saw.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    frames: u64,
    /// Super-frames (a GSO type in the header).
    gso: u64,
    /// Partial checksums (`NEEDS_CSUM`).
    csum: u64,
    /// The largest frame.
    max_len: usize,
}

/// A bridge between two virtio-user ports of our driver (in this process), the way a
/// guest's kernel bridge would be: every received frame is sent on by the other port
/// with its receive offload information turned into the matching transmit request (a
/// partial checksum stays partial, a super-frame stays whole). Runs until `stop`.
/// Hands back port A's control handle through `ctl` once both ports are open, and counts
/// the super-frames port A receives into `gso_a` as they come.
fn offload_bridge(
    socks: [std::path::PathBuf; 2],
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ctl: std::sync::mpsc::Sender<driver::Control>,
    gso_a: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> thread::JoinHandle<[Seen; 2]> {
    use driver::layout::features as f;
    use driver::layout::net_hdr;
    use driver::offload::GsoKind;
    use driver::{Packet, Port, PortConfig, RxMeta, RxQueue, TxCsum, TxGso, TxOffload, TxQueue};

    fn open(sock: &std::path::Path) -> Port {
        let mut cfg = PortConfig::virtio_user(sock);
        let want = [
            f::NET_MRG_RXBUF,
            f::NET_CSUM,
            f::NET_HOST_TSO4,
            f::NET_HOST_TSO6,
            f::NET_GUEST_CSUM,
            f::NET_GUEST_TSO4,
            f::NET_GUEST_TSO6,
        ]
        .iter()
        .fold(0, |a, b| a | f::bit(*b));
        cfg.features |= want;
        let sock = sock.to_path_buf();
        let port = within("Port::open", WAIT, move || Port::open(cfg))
            .unwrap_or_else(|e| panic!("open {sock:?}: {e}"));
        assert_eq!(port.info().features & want, want, "the tap port offers the offloads");
        port
    }

    fn pass(rx: &mut RxQueue, tx: &mut TxQueue, pend: &mut Vec<Packet>, seen: &mut Seen) {
        let (mut batch, mut meta): (Vec<Packet>, Vec<RxMeta>) =
            (Vec::with_capacity(32), Vec::with_capacity(32));
        if pend.is_empty() {
            rx.rx_burst_meta(&mut batch, &mut meta, 32);
            for (mut p, m) in batch.drain(..).zip(meta.drain(..)) {
                seen.frames += 1;
                seen.max_len = seen.max_len.max(p.total_len());
                let mut o = TxOffload::default();
                if m.needs_csum() {
                    seen.csum += 1;
                    o.csum = Some(TxCsum { start: m.csum_start, offset: m.csum_offset });
                }
                if m.is_gso() {
                    seen.gso += 1;
                    let kind = match m.gso_type & !net_hdr::GSO_ECN {
                        net_hdr::GSO_TCPV4 => GsoKind::TcpV4,
                        net_hdr::GSO_TCPV6 => GsoKind::TcpV6,
                        other => panic!("unexpected gso_type {other:#x}"),
                    };
                    o.gso = Some(TxGso { kind, size: m.gso_size, hdr_len: m.hdr_len });
                }
                p.set_tx_offload(o);
                pend.push(p);
            }
        }
        if !pend.is_empty() {
            tx.tx_burst(pend);
        } else {
            tx.reclaim();
        }
    }

    thread::spawn(move || {
        let mut pa = open(&socks[0]);
        let mut pb = open(&socks[1]);
        let mut qa = pa.take_queue_pairs().remove(0);
        let mut qb = pb.take_queue_pairs().remove(0);
        ctl.send(pa.control()).expect("hand out the control handle");
        let mut seen = [Seen::default(); 2];
        let (mut ab, mut ba) = (Vec::new(), Vec::new());
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            pass(&mut qa.rx, &mut qb.tx, &mut ab, &mut seen[0]);
            gso_a.store(seen[0].gso, std::sync::atomic::Ordering::Relaxed);
            pass(&mut qb.rx, &mut qa.tx, &mut ba, &mut seen[1]);
        }
        drop((ab, ba));
        for (port, qp) in [(pa, qa), (pb, qb)] {
            within("Port::close", WAIT, move || port.close(vec![qp])).expect("close");
        }
        seen
    })
}

/// Offloads end to end: the bridge's ports negotiate GUEST_CSUM/TSO4/TSO6 and
/// CSUM/HOST_TSO4/TSO6 with MRG_RXBUF; the kernel then hands tap A's port TCP
/// super-frames (`TUNSETOFFLOAD` followed the guest), the bridge sends them on whole with
/// their request, and tap B's kernel takes them as they are (it segments or not, as it
/// likes): 64 MiB over TCP with the sha256 equal, super-frames seen each way, the
/// backend counting them as passed whole, and no drops.
#[test]
fn tcp_with_checksum_and_tso_offloads_passed_through_whole() {
    let _lock = serial();
    // Bound last, dropped first: the backend (whose exit removes the taps) before the namespaces.
    let TwoTaps { _dir, ns_a, ns_b, sa, sb, tap_a, tap_b, backend } = TwoTaps::new(&[]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ctl_tx, ctl_rx) = std::sync::mpsc::channel();
    let gso_a = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let bridge = offload_bridge([sa.clone(), sb.clone()], stop.clone(), ctl_tx, gso_a.clone());
    let ctl_a = ctl_rx.recv_timeout(WAIT).expect("the bridge's ports opened");
    backend.wait_stats(WAIT, |s| testpmd_connected(s, &[&sa, &sb]));
    ns_a.up(&tap_a);
    ns_b.up(&tap_b);
    assert_eq!(ns_a.ping("10.77.0.2"), PINGS, "ping replies across the bridge");
    let (sent, got) = tcp_transfer(&ns_a, &ns_b, 1);
    assert_eq!(got, sent, "bytes and sha256 of what B received against what A sent");
    settle(&backend);
    let gso_before = gso_a.load(std::sync::atomic::Ordering::Relaxed);
    assert!(gso_before > 0, "super-frames from tap A's kernel");
    // Guest TSO off on port A (GUEST_OFFLOADS_SET): the kernel must stop sending it
    // super-frames (TUNSETOFFLOAD follows); checksum offload stays.
    {
        use driver::layout::features as f;
        within("GUEST_OFFLOADS_SET", WAIT, move || ctl_a.set_guest_offloads(f::bit(f::NET_GUEST_CSUM)))
            .expect("GUEST_OFFLOADS_SET");
    }
    let (sent, got) = tcp_transfer(&ns_a, &ns_b, 1);
    assert_eq!(got, sent, "the second transfer, without guest TSO on port A");
    settle(&backend);
    assert_eq!(gso_a.load(std::sync::atomic::Ordering::Relaxed), gso_before, "no super-frame after TSO off");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let [ab, ba] = within("bridge", WAIT, move || bridge.join().expect("bridge thread"));
    eprintln!("bridge saw: A→B {ab:?}, B→A {ba:?}");
    let fin = backend.stop();
    let (a, b) = (device(&fin, &sa), device(&fin, &sb));
    assert!(ab.gso == gso_before && ab.max_len > 1514, "super-frames from tap A's kernel: {ab:?}");
    assert_eq!(counter(a, "tx_packets"), ab.frames, "tap A → bridge");
    assert_eq!(counter(b, "rx_packets"), ab.frames, "bridge → tap B");
    assert_eq!(counter(b, "tx_packets"), ba.frames, "tap B → bridge");
    assert_eq!(counter(a, "rx_packets"), ba.frames, "bridge → tap A");
    let off = |d: &Value, k: &str| d["offloads"][k].as_u64().unwrap_or_else(|| panic!("offloads.{k} in {d}"));
    assert_eq!(off(b, "gso_requests"), ab.gso, "super-frames passed to tap B's kernel");
    assert_eq!(off(b, "passed_whole"), ab.csum, "every request passed whole");
    assert_eq!(off(a, "gso_requests"), ba.gso);
    assert_eq!(total_drops(a), 0, "drops: {a}");
    assert_eq!(total_drops(b), 0, "drops: {b}");
}

/// With no front-end connected, what the namespace's kernel sends into the tap is read
/// and dropped as `no_buffer`: exactly the frames the kernel's tap counter says it handed
/// over (`tx_packets` in the namespace's sysfs).
#[test]
fn frames_without_a_guest_are_dropped_as_no_buffer() {
    let _lock = serial();
    let tap = format!("vntn{}", std::process::id());
    let ns = Netns::new("n");
    let dir = TempDir::new("tap");
    let sock = dir.join("n.sock");
    let port = format!("tap:{},{tap}", sock.display());
    let backend = Backend::start(&["--port", &port]);
    ns.take(&tap, "10.77.0.1/24");
    ns.up(&tap);
    // Nobody answers: ARP requests go out through the tap (ping's own result is moot).
    let _ = Command::new("ip")
        .args(["netns", "exec", &ns.name, "ping", "-c", "3", "-i", "0.2", "-w", "3", "-q", "10.77.0.9"])
        .stdin(Stdio::null())
        .output()
        .expect("ping");
    settle(&backend);
    let handed: u64 = ns
        .exec("cat", &[&format!("/sys/class/net/{tap}/statistics/tx_packets")])
        .trim()
        .parse()
        .expect("a number");
    let fin = backend.stop();
    let d = device(&fin, &sock);
    assert!(handed > 0, "the kernel sent ARP requests into the tap");
    assert_eq!(d["drops"]["no_buffer"].as_u64(), Some(handed), "no_buffer against the tap's tx_packets: {d}");
    assert_eq!(total_drops(d), handed, "no other drop: {d}");
    assert_eq!(counter(d, "tx_packets"), 0);
}

#[test]
fn namespace_pings_testpmd_icmpecho_on_a_tap_port() {
    let _lock = serial();
    let tap = format!("vnte{}", std::process::id());
    let ns = Netns::new("e");
    let dir = TempDir::new("tap");
    let sock = dir.join("e.sock");
    let port = format!("tap:{},{tap}", sock.display());
    let backend = Backend::start(&["--port", &port]);
    ns.take(&tap, "10.77.0.1/24");
    icmpecho_answers_pings(&ns, &tap, &sock, backend);
    assert!(!link_exists(&tap));
}

/// Our testpmd in `icmpecho` mode on the tap port `sock` (its interface `tap` in `ns`,
/// at 10.77.0.x/24): the namespace pings 10.77.0.9 and gets every reply; then the
/// backend stops, its counters equal testpmd's both ways (an ARP reply and the echo
/// replies at least), with no drop.
fn icmpecho_answers_pings(ns: &Netns, tap: &str, sock: &std::path::Path, backend: Backend) {
    let vdev = format!("virtio_user0,path={}", sock.display());
    let tp = Testpmd::spawn(&["--vdev", &vdev, "--forward-mode", "icmpecho", "--duration", "600"]);
    backend.wait_stats(WAIT, |s| testpmd_connected(s, &[sock]));
    ns.up(tap);
    assert_eq!(ns.ping("10.77.0.9"), PINGS, "echo replies from testpmd's icmpecho");
    settle(&backend);
    tp.signal(libc::SIGINT);
    let out = tp.wait(WAIT);
    let fin = backend.stop();
    let d = device(&fin, sock);
    let p0 = forward_stats(&out.stdout, 0).unwrap_or_else(|| panic!("no stats for port 0:\n{out}"));
    assert_eq!(counter(d, "tx_packets"), p0.rx_packets, "tap → testpmd");
    assert_eq!(counter(d, "rx_packets"), p0.tx_packets, "testpmd → tap");
    assert!(p0.tx_packets > PINGS as u64, "an ARP reply and {PINGS} echo replies at least: {p0:?}");
    assert_eq!(total_drops(d), 0, "drops on the tap's device: {d}");
}
