//! Issue 17, testpmd side: our `testpmd` (a process) against DPDK 22.11's vhost PMD
//! (`net_vhost` in `dpdk-testpmd`).
//!
//! * `txpkts_segments_arrive_whole_at_dpdk`: `--txpkts 60,200,1000,254` makes every
//!   txonly frame a chain of four buffers; DPDK's `rxonly` receives exactly as many frames
//!   as our testpmd sent, each 1514 bytes (its byte counter is frames × 1514).
//! * `csum_mode_with_jumbo_chains_through_dpdk_io`: `--max-pkt-len 9018` (MRG_RXBUF
//!   negotiated), `--txpkts` of five segments making 9014-byte UDP frames, the `csum`
//!   engine with `csum set udp hw` (a checksum offload request on every frame) looping
//!   through DPDK's `io` engine; the prompt refuses `csum set ip hw` (virtio-net has no
//!   IPv4 checksum offload) and `tso set` without HOST_TSO; every frame our testpmd
//!   receives and sends is 9014 bytes, with no receive or transmit error.
//!
//! Each test takes the cross-binary [`serial`] lock and bounds every wait; both
//! processes are killed on drop if an assertion fails first.

use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use vnet_tests::dpdk::{Role, Testpmd as Dpdk};
use vnet_tests::harness::{serial, TempDir};
use vnet_tests::testpmd_proc::{forward_stats, nic_stats, number_after, Spawn, Testpmd};

const DPDK_FWD_CPU: u32 = 1;
const WAIT: Duration = Duration::from_secs(20);

fn vhost(sock: &Path, devargs: &str) -> Dpdk {
    Dpdk::start_with_devargs(
        Role::Vhost { path: sock.to_path_buf(), queues: 1 },
        devargs,
        64,
        DPDK_FWD_CPU,
        &["--no-flush-rx", "--mbuf-size=2176", "--max-pkt-len=9018"],
    )
}

/// DPDK's "RX-bytes:" or "TX-bytes:" of port 0 from `show port stats 0`.
fn dpdk_bytes(pmd: &mut Dpdk, key: &str) -> u64 {
    const HDR: &str = "NIC statistics for port 0";
    let before = pmd.log_count(HDR);
    pmd.cmd("show port stats 0");
    let deadline = Instant::now() + WAIT;
    loop {
        let log = pmd.log();
        if log.matches(HDR).count() > before {
            let block = &log[log.rfind(HDR).expect("counted")..];
            if let Some(v) = number_after(block, key) {
                return v;
            }
        }
        assert!(Instant::now() < deadline, "no {key} in DPDK's `show port stats 0`:\n{log}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Our testpmd with the prompt on `sock` and `args`.
fn ours(sock: &Path, devargs: &str, args: &[&str]) -> Testpmd {
    let vdev = format!("virtio_user0,path={}{devargs}", sock.display());
    let mut v = vec!["-i", "--vdev", &vdev];
    v.extend_from_slice(args);
    let mut t = Testpmd::spawn_with(&v, Spawn { stdin: true, ..Spawn::default() });
    t.wait_stdout("testpmd> ", WAIT);
    t
}

/// `stop`, then `show port stats 0`: returns our NIC statistics and the TX-errors line.
fn stop_and_stats(t: &mut Testpmd) -> (vnet_tests::testpmd_proc::NicStats, u64) {
    t.send("stop");
    t.wait_stdout("Forward statistics for port 0", WAIT);
    let n = t.stdout().matches("NIC statistics for port 0").count();
    t.send("show port stats 0");
    t.wait_stdout_n("NIC statistics for port 0", n + 1, WAIT);
    t.wait_stdout_n("Tx-pps:", n + 1, WAIT);
    let out = t.stdout();
    let stats = nic_stats(&out, 0).unwrap_or_else(|| panic!("no NIC statistics:\n{out}"));
    let block = &out[out.rfind("NIC statistics for port 0").expect("printed")..];
    let tx_errors = number_after(block, "TX-errors:").expect("TX-errors");
    (stats, tx_errors)
}

#[test]
fn txpkts_segments_arrive_whole_at_dpdk() {
    let _serial = serial();
    let dir = TempDir::new("tp-offload-txpkts");
    let sock = dir.join("vhost.sock");
    let mut pmd = vhost(&sock, "");
    let mut t = ours(&sock, "", &["--forward-mode", "txonly", "--txpkts", "60,200,1000,254"]);
    assert!(pmd.wait_log("virtio is now ready", WAIT), "{}", pmd.log());
    pmd.cmd("set fwd rxonly");
    pmd.cmd("start");
    assert!(pmd.wait_log("rxonly packet forwarding - ports", WAIT), "{}", pmd.log());
    t.send("start");
    t.wait_stdout("txonly packet forwarding", WAIT);
    thread::sleep(Duration::from_secs(2));
    let (st, tx_errors) = stop_and_stats(&mut t);
    // DPDK keeps dequeuing what our ring still holds.
    thread::sleep(Duration::from_millis(500));
    let rx_bytes = dpdk_bytes(&mut pmd, "RX-bytes:");
    // Ours first: its close talks to DPDK's vhost-user socket.
    t.send("quit");
    let exit = t.wait(WAIT);
    assert_eq!(exit.code(), 0, "{exit}");
    let dpdk = pmd.quit();
    eprintln!("ours {st:?}; DPDK {dpdk:?}, RX-bytes {rx_bytes}");
    assert!(st.tx_packets > 0, "nothing sent: {exit}");
    assert_eq!(tx_errors, 0);
    assert_eq!(st.tx_bytes, st.tx_packets * 1514, "every frame 1514 bytes");
    assert_eq!(dpdk.rx_packets, st.tx_packets, "DPDK received every frame we sent");
    assert_eq!(rx_bytes, st.tx_packets * 1514, "each arrived whole");
}

#[test]
fn csum_mode_with_jumbo_chains_through_dpdk_io() {
    const LEN: u64 = 9014;
    let _serial = serial();
    let dir = TempDir::new("tp-offload-csum");
    let sock = dir.join("vhost.sock");
    let mut pmd = vhost(&sock, "");
    let mut t = ours(
        &sock,
        "",
        &["--forward-mode", "csum", "--max-pkt-len", "9018", "--txpkts", "2000,2000,2000,2000,1014"],
    );
    assert!(pmd.wait_log("virtio is now ready", WAIT), "{}", pmd.log());
    pmd.cmd("set fwd io");
    pmd.cmd("start");
    assert!(pmd.wait_log("io packet forwarding - ports", WAIT), "{}", pmd.log());

    t.send("csum set ip hw 0");
    t.wait_stdout("IP checksum offload is not supported by port 0", WAIT);
    t.send("tso set 1000 0");
    t.wait_stdout("TSO is not supported by port 0", WAIT);
    t.send("csum set udp hw 0");
    t.wait_stdout("UDP checksum offload is hw for port 0", WAIT);
    t.send("csum show 0");
    t.wait_stdout("TCP checksum offload is sw", WAIT);

    t.send("start tx_first 1");
    t.wait_stdout("csum packet forwarding", WAIT);
    thread::sleep(Duration::from_secs(2));
    let (st, tx_errors) = stop_and_stats(&mut t);
    // DPDK keeps dequeuing what our ring still holds after our `stop`: wait (bounded)
    // until it has taken every frame we sent, before our close resets the device.
    let deadline = Instant::now() + WAIT;
    while dpdk_bytes(&mut pmd, "RX-packets:") < st.tx_packets && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
    }
    let fwd = forward_stats(&t.stdout(), 0).expect("forward statistics");
    // Ours first: its close talks to DPDK's vhost-user socket.
    t.send("quit");
    let exit = t.wait(WAIT);
    assert_eq!(exit.code(), 0, "{exit}");
    let dpdk = pmd.quit();
    eprintln!("ours {st:?} {fwd:?}; DPDK {dpdk:?}");
    assert!(st.rx_packets > 32, "the frames looped: {st:?}");
    assert_eq!((st.rx_errors, tx_errors), (0, 0), "{exit}");
    assert_eq!(st.rx_bytes, st.rx_packets * LEN, "every frame received whole (merged)");
    assert_eq!(st.tx_bytes, st.tx_packets * LEN, "every frame sent whole (chained)");
    assert_eq!(fwd.rx_packets, st.rx_packets);
    assert_eq!(dpdk.rx_packets, st.tx_packets, "DPDK took every frame we sent");
    assert_eq!(dpdk.rx_packets, dpdk.tx_packets + dpdk.tx_dropped, "DPDK's io sent back what it took");
    // What DPDK sent back and we did not take before `stop` waits in our receive ring.
    assert!(dpdk.tx_packets >= st.rx_packets, "we received no more than DPDK sent");
}
