//! Issue 18: the `afpacket` port (an AF_PACKET socket with `PACKET_MMAP` rings, bound to
//! an existing interface). Each test creates veth pairs: one end moved into a private
//! namespace (with an address), the other end left in our namespace (up, no address,
//! IPv6 off on it) for the backend to bind to. The test created them and removes them
//! at the end (deleting one end deletes the pair; the namespace's removal does too).
//!
//! * `namespace_pings_testpmd_icmpecho_on_an_afpacket_port`: our testpmd in `icmpecho`
//!   on the afpacket port; the namespace's kernel pings an address on the link and gets
//!   every reply; the backend's counters equal testpmd's both ways, no drop.
//! * `ping_and_tcp_cross_two_namespaces_through_two_afpacket_ports`: two veth pairs, two
//!   afpacket ports, testpmd `io` between its two ports: pings across (exact count), then
//!   64 MiB over TCP with the sha256 equal at the far end; frames equal on both sides of
//!   each port, no drop in the backend.
//! * `afpacket_errors_are_one_line_and_exit_1`: a missing interface, and no CAP_NET_RAW
//!   (as `nobody`): one line, exit code 1.
//!
//! Each test takes the cross-binary [`serial`] lock and bounds every wait; guards remove
//! the veths and namespaces also when an assertion fails (the backend stops first).

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

/// A veth pair: `ours` stays in our namespace (up, no address), `theirs` goes into `ns`
/// with `addr` (down until `ns.up`). Removed on drop.
struct Veth {
    ours: String,
    theirs: String,
}

impl Veth {
    fn new(tag: &str, ns: &Netns, addr: &str) -> Veth {
        let pid = std::process::id();
        let v = Veth { ours: format!("vaf{tag}{pid}"), theirs: format!("vag{tag}{pid}") };
        let _ = Command::new("ip").args(["link", "del", &v.ours]).stderr(Stdio::null()).status();
        run("ip", &["link", "add", &v.ours, "type", "veth", "peer", "name", &v.theirs]);
        let _ = Command::new("sysctl")
            .args(["-q", "-w", &format!("net.ipv6.conf.{}.disable_ipv6=1", v.ours)])
            .stderr(Stdio::null())
            .status();
        ns.take(&v.theirs, addr);
        run("ip", &["link", "set", &v.ours, "up"]);
        v
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.ours]).stderr(Stdio::null()).status();
    }
}

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
fn namespace_pings_testpmd_icmpecho_on_an_afpacket_port() {
    let _lock = serial();
    let ns = Netns::new("fe");
    let veth = Veth::new("e", &ns, "10.78.0.1/24");
    let dir = TempDir::new("afp");
    let sock = dir.join("e.sock");
    let port = format!("afpacket:{},{}", sock.display(), veth.ours);
    let backend = Backend::start(&["--port", &port]);
    let vdev = format!("virtio_user0,path={}", sock.display());
    let tp = Testpmd::spawn(&["--vdev", &vdev, "--forward-mode", "icmpecho", "--duration", "600"]);
    backend.wait_stats(WAIT, |s| testpmd_connected(s, &[&sock]));
    ns.up(&veth.theirs);
    assert_eq!(ns.ping("10.78.0.9"), PINGS, "echo replies from testpmd's icmpecho");
    settle(&backend);
    tp.signal(libc::SIGINT);
    let out = tp.wait(WAIT);
    let fin = backend.stop();
    let d = device(&fin, &sock);
    let p0 = forward_stats(&out.stdout, 0).unwrap_or_else(|| panic!("no stats for port 0:\n{out}"));
    assert_eq!(counter(d, "tx_packets"), p0.rx_packets, "veth → testpmd");
    assert_eq!(counter(d, "rx_packets"), p0.tx_packets, "testpmd → veth");
    assert!(p0.tx_packets > PINGS as u64, "an ARP reply and {PINGS} echo replies at least: {p0:?}");
    assert_eq!(d["port"].as_str(), Some("afpacket"));
    assert_eq!(total_drops(d), 0, "drops on the afpacket device: {d}");
    drop(veth);
    assert!(!link_exists(&format!("vafe{}", std::process::id())));
}

#[test]
fn ping_and_tcp_cross_two_namespaces_through_two_afpacket_ports() {
    let _lock = serial();
    let ns_a = Netns::new("fa");
    let ns_b = Netns::new("fb");
    let va = Veth::new("a", &ns_a, "10.78.0.1/24");
    let vb = Veth::new("b", &ns_b, "10.78.0.2/24");
    let dir = TempDir::new("afp");
    let (sa, sb) = (dir.join("a.sock"), dir.join("b.sock"));
    let port_a = format!("afpacket:{},{}", sa.display(), va.ours);
    let port_b = format!("afpacket:{},{}", sb.display(), vb.ours);
    let backend = Backend::start(&["--port", &port_a, "--port", &port_b]);
    let vdev_a = format!("virtio_user0,path={}", sa.display());
    let vdev_b = format!("virtio_user1,path={}", sb.display());
    let tp =
        Testpmd::spawn(&["--vdev", &vdev_a, "--vdev", &vdev_b, "--forward-mode", "io", "--duration", "600"]);
    backend.wait_stats(WAIT, |s| testpmd_connected(s, &[&sa, &sb]));
    ns_a.up(&va.theirs);
    ns_b.up(&vb.theirs);

    assert_eq!(ns_a.ping("10.78.0.2"), PINGS, "ping replies across the two namespaces");

    let listener = ns_b
        .spawn(|| TcpListener::bind(SocketAddrV4::new(Ipv4Addr::new(10, 78, 0, 2), 5001)).expect("bind in B"))
        .join()
        .expect("listener thread");
    let receiver = thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
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
    });
    let sender = ns_a.spawn(move || {
        let addr = "10.78.0.2:5001".parse().expect("addr");
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).expect("connect from A");
        s.set_write_timeout(Some(Duration::from_secs(60))).expect("timeout");
        let mut sha = Sha::new();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut buf = vec![0u8; 1 << 20];
        for _ in 0..XFER / buf.len() {
            fill(&mut buf, &mut state);
            s.write_all(&buf).expect("send");
            sha.update(&buf);
        }
        s.shutdown(std::net::Shutdown::Write).expect("shutdown");
        (XFER, sha.hex())
    });
    let (sent, got) = within("tcp transfer", Duration::from_secs(120), move || {
        (sender.join().expect("sender"), receiver.join().expect("receiver"))
    });
    assert_eq!(got.0, XFER, "bytes received in B");
    assert_eq!(got, sent, "sha256 of what B received against what A sent");

    settle(&backend);
    tp.signal(libc::SIGINT);
    let out = tp.wait(WAIT);
    let fin = backend.stop();
    let (a, b) = (device(&fin, &sa), device(&fin, &sb));
    let p0 = forward_stats(&out.stdout, 0).unwrap_or_else(|| panic!("no stats for port 0:\n{out}"));
    let p1 = forward_stats(&out.stdout, 1).unwrap_or_else(|| panic!("no stats for port 1:\n{out}"));
    assert_eq!(counter(a, "tx_packets"), p0.rx_packets, "veth A → port 0");
    assert_eq!(counter(b, "rx_packets"), p1.tx_packets, "port 1 → veth B");
    assert_eq!(counter(b, "tx_packets"), p1.rx_packets, "veth B → port 1");
    assert_eq!(counter(a, "rx_packets"), p0.tx_packets, "port 0 → veth A");
    assert_eq!(total_drops(a), 0, "drops on A's device: {a}");
    assert_eq!(total_drops(b), 0, "drops on B's device: {b}");
    assert!(counter(a, "tx_bytes") >= XFER as u64, "the transfer went through A's device");
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

#[test]
fn afpacket_errors_are_one_line_and_exit_1() {
    let _lock = serial();
    let dir = TempDir::new("afp");
    let sock = dir.join("x.sock");
    let port = format!("afpacket:{},vafnone{}", sock.display(), std::process::id());
    let (code, err) = backend_fails(&["--port", &port], None);
    assert_eq!((code, err.lines().count()), (1, 1), "{err}");
    assert!(err.contains("no such interface"), "{err}");

    let port = format!("afpacket:{},lo", sock.display());
    let (code, err) = backend_fails(&["--port", &port], Some(65534));
    assert_eq!(code, 1, "{err}");
    assert!(err.lines().last().unwrap_or_default().contains("CAP_NET_RAW"), "{err}");
}
