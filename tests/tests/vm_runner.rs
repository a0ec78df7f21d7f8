//! The VM runner (`vm-runner SCENARIO.json`, `vnet_tests::scenario`) as a user runs it.
//!
//! - Bad scenarios are one clear error line and exit status 2 before anything starts.
//! - A program that is not ours runs in a user image: a small C program, built here with
//!   gcc. It sends frames through the kernel's own `virtio_net` with an AF_PACKET socket
//!   and says how many it sent.
//!   - The image is built by the runner from the scenario (`build-image.sh --add
//!     --init --no-bind`).
//!   - The report must show that our backend's `sink` counted exactly that many.
//!
//! The boot test needs root, qemu-system-x86 and gcc (tests/run.sh installs them). It holds
//! the [`serial`] lock (one VM at a time), and the runner bounds the guest with the
//! scenario's time limit and kills QEMU and the backend when it ends.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use vnet_tests::harness::{serial, TempDir};

fn runner() -> &'static str {
    env!("CARGO_BIN_EXE_vm-runner")
}

/// Runs vm-runner on `scenario` (written to `dir`); returns (exit code, stderr).
fn run_scenario(dir: &Path, name: &str, scenario: &str, report: Option<&Path>) -> (i32, String) {
    let f = dir.join(format!("{name}.json"));
    std::fs::write(&f, scenario).expect("write scenario");
    let mut cmd = Command::new(runner());
    cmd.arg(&f);
    if let Some(r) = report {
        cmd.arg("--report").arg(r);
    }
    let out = cmd.output().expect("run vm-runner");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// An unknown port kind, a device with no port, a missing binary, a bad check: each is one
/// line naming the fault and exit status 2, before any process starts (well under the
/// second a QEMU boot alone would take).
#[test]
fn bad_scenarios_are_one_error_line_before_anything_boots() {
    let dir = TempDir::new("vm-runner-bad");
    let cases = [
        (
            "kind",
            r#"{"ports": [{"name": "a", "kind": "bridge"}], "devices": [{"port": "a"}]}"#,
            "port a: unknown port kind \"bridge\" (sink, gen, reflect)",
        ),
        (
            "noport",
            r#"{"ports": [{"name": "a", "kind": "sink"}], "devices": [{"port": "b"}]}"#,
            "device on port \"b\": no such port",
        ),
        (
            "missing",
            r#"{"image": {"add": ["no-such-program"], "no_bind": true}, "mode": "kernel",
                "ports": [{"name": "a", "kind": "sink"}], "devices": [{"port": "a"}]}"#,
            "no-such-program is not a file (a missing binary?)",
        ),
        (
            "check",
            r#"{"ports": [{"name": "a", "kind": "sink"}], "devices": [{"port": "a"}],
                "checks": ["backend.b.rx_packets == 1"]}"#,
            "no port \"b\"",
        ),
        (
            "nobind",
            r#"{"image": {"no_bind": true}, "ports": [{"name": "a", "kind": "sink"}], "devices": [{"port": "a"}]}"#,
            "a no_bind image needs mode \"kernel\"",
        ),
    ];
    for (name, sc, want) in cases {
        let t0 = Instant::now();
        let (code, err) = run_scenario(dir.path(), name, sc, None);
        assert_eq!(code, 2, "{name}: exit status; stderr:\n{err}");
        assert_eq!(err.lines().count(), 1, "{name}: one line expected:\n{err}");
        assert!(err.contains(want), "{name}: {err:?} does not say {want:?}");
        assert!(err.starts_with("vm-runner: "), "{name}: {err}");
        assert!(t0.elapsed() < Duration::from_secs(2), "{name}: took {:?}", t0.elapsed());
    }
}

/// The foreign program: AF_PACKET, broadcast frames of 60 bytes on the interface it is
/// given, then it waits (bounded) until the interface's tx_packets counter, which
/// virtio_net advances when the device has taken a frame, shows them all.
const SENDER_C: &str = r#"
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long tx_packets(const char *ifname) {
    char p[256]; long v = -1;
    snprintf(p, sizeof p, "/sys/class/net/%s/statistics/tx_packets", ifname);
    FILE *f = fopen(p, "r");
    if (f) { if (fscanf(f, "%ld", &v) != 1) v = -1; fclose(f); }
    return v;
}

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: afp_sender IFNAME COUNT\n"); return 2; }
    long n = atol(argv[2]), sent = 0, before = tx_packets(argv[1]);
    int s = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_ALL));
    if (s < 0) { perror("socket"); return 1; }
    struct sockaddr_ll a = {0};
    a.sll_family = AF_PACKET; a.sll_ifindex = if_nametoindex(argv[1]); a.sll_halen = 6;
    if (!a.sll_ifindex) { perror("if_nametoindex"); return 1; }
    unsigned char f[60] = {0xff,0xff,0xff,0xff,0xff,0xff, 0x02,0,0,0,0,0x42, 0x88,0xb5};
    struct timespec pause = {0, 200000};
    for (long i = 0; i < n; i++) {
        memcpy(f + 14, &i, sizeof i);
        if (sendto(s, f, sizeof f, 0, (struct sockaddr *)&a, sizeof a) == sizeof f) sent++;
        else perror("sendto");
        if (i % 50 == 49) nanosleep(&pause, 0);
    }
    for (int t = 0; t < 1000 && tx_packets(argv[1]) - before < sent; t++) usleep(10000);
    printf("afp_sender: %ld of %ld frames sent on %s, tx_packets +%ld\n", sent, n, argv[1], tx_packets(argv[1]) - before);
    printf("VNET-VALUE sent=%ld\n", sent);
    return sent == n ? 0 : 1;
}
"#;

const FRAMES: u64 = 1000;

/// A user image with a program of its own, on the kernel's virtio_net (`--no-bind`), one
/// NIC on our `sink`: the report's checks hold and the sink counted exactly the frames
/// the program says it sent.
#[test]
fn a_foreign_program_in_a_user_image_is_counted_exactly_by_the_sink() {
    let _g = serial();
    let dir = TempDir::new("vm-runner-afp");
    let src = dir.join("afp_sender.c");
    std::fs::write(&src, SENDER_C).expect("write C source");
    let bin = dir.join("afp_sender");
    // Static when the C library allows it (one file in the image), else dynamic: the
    // image build then copies the libraries `ldd` lists.
    // `gcc` where the gcc package is installed, `gcc-12` where only that is.
    let build = |cc: &str, extra: &[&str]| {
        Command::new(cc).args(["-O2", "-Wall", "-o"]).arg(&bin).arg(&src).args(extra).status()
    };
    let ok = ["gcc", "gcc-12"].iter().any(|cc| {
        build(cc, &["-static"]).is_ok_and(|s| s.success()) || build(cc, &[]).is_ok_and(|s| s.success())
    });
    assert!(ok, "gcc could not build the sender (apt-get install gcc-12 libc6-dev)");
    std::fs::write(
        dir.join("run.sh"),
        format!("#!/bin/sh\nset -e\nfor i in $VNET_IFACES; do /bin/afp_sender $i {FRAMES}; done\n"),
    )
    .expect("write init script");
    let scenario = format!(
        r#"{{
  "name": "afp-sender",
  "image": {{ "add": ["afp_sender"], "init": "run.sh", "no_bind": true }},
  "mode": "kernel",
  "ports": [ {{ "name": "s", "kind": "sink" }} ],
  "devices": [ {{ "port": "s" }} ],
  "timeout_secs": 240,
  "checks": [ "backend.s.rx_packets == guest.sent", "guest.sent == {FRAMES}" ]
}}"#
    );
    let report = dir.join("report.json");
    let (code, err) = run_scenario(dir.path(), "afp-sender", &scenario, Some(&report));
    let text = std::fs::read_to_string(&report).unwrap_or_default();
    assert_eq!(code, 0, "vm-runner failed:\n{err}\nreport:\n{text}");
    let r: Value = serde_json::from_str(&text).expect("the report is JSON");
    eprintln!(
        "{err}accel: {} ({}); {:.1} s",
        r["accel"],
        r["accel_note"],
        r["seconds"].as_f64().unwrap_or(0.0)
    );
    assert_eq!(r["passed"], true, "{text}");
    assert_eq!(r["guest"]["values"]["sent"].as_f64(), Some(FRAMES as f64), "{text}");
    assert_eq!(r["backend"]["s"]["rx_packets"].as_u64(), Some(FRAMES), "{text}");
    assert_eq!(r["backend"]["s"]["rx_bytes"].as_u64(), Some(FRAMES * 60), "{text}");
    let checks = r["checks"].as_array().expect("checks");
    assert_eq!(checks.len(), 2, "{text}");
    assert!(checks.iter().all(|c| c["ok"] == true), "{text}");
    assert!(
        r["guest"]["app_output"].as_array().is_some_and(|a| a
            .iter()
            .any(|l| l.as_str().is_some_and(|l| l.contains("afp_sender: 1000 of 1000")))),
        "{text}"
    );
    assert!(r["qemu_cmdline"].as_str().is_some_and(|c| c.contains("vhost-user")), "{text}");
}
