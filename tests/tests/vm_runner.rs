//! The VM runner as a user runs it: `vm-runner SCENARIO.toml` (the binary) on an image
//! built with a program that is not ours.
//!
//! * `vm_runner_bad_scenarios_fail_before_boot` (no VM): an unknown port kind, a device
//!   with no port, a missing binary and a check that does not parse are each one line on
//!   stderr and exit status 2, at once, with no report written; build-image.sh's own
//!   option errors are one line and exit status 2 too.
//! * `vm_runner_foreign_afpacket_program`: the test builds `tests/vm/examples/afp-send/
//!   afp_send.c` with gcc (static when libc's static archive is there, else dynamic and
//!   `--add` brings its libraries), and runs that example's scenario: an image with
//!   `--add afp_send --init run.sh --no-bind`, the guest kernel's own `virtio_net` on the
//!   NIC, `afp_send` sending 1000 frames with an AF_PACKET socket. Every check of the
//!   example holds (our sink counted exactly the frames and bytes the program says it
//!   sent, no drops); one more check, added on purpose, does not, and the runner exits
//!   1 naming it with both values.
//!
//! * `vm_runner_user_command_on_bound_devices`: the other path of a user's image: an
//!   `--init` script and a scenario `command` (our testpmd, as a user would start a program
//!   on our driver or DPDK) on the NIC bound to vfio-pci in no-IOMMU mode, run with the
//!   runner's library; the sink received exactly what testpmd sent.
//! * `vm_runner_time_limit_kills_the_guest`: a guest that would run testpmd for 60 s
//!   under a 6 s `timeout_secs` is killed at the limit; the run fails naming the limit, and
//!   no QEMU on the run's sockets outlives the runner.
//!
//! Needs root and qemu-system-x86 (as the other vm_* tests) and gcc-12; one VM at a time
//! under the [`serial`] lock, the runner bounded by the scenario's `timeout_secs` and
//! this test's own limit.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vnet_tests::harness::{serial, signal, workspace_bin, workspace_example, TempDir};
use vnet_tests::runner::{run, Tools};
use vnet_tests::scenario::{Mode, Scenario};

const RUNNER: &str = env!("CARGO_BIN_EXE_vm-runner");

/// The example's directory in the source tree.
fn example_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/examples/afp-send")
}

/// Runs `cmd` with its output captured, killed after `limit`.
fn run_bounded(cmd: &mut Command, limit: Duration) -> (Output, Duration) {
    let t0 = Instant::now();
    let child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait"),
        Err(_) => {
            signal(pid, libc::SIGKILL);
            let _ = waiter.join();
            panic!("{cmd:?} did not finish within {limit:?} (killed)");
        }
    };
    let _ = waiter.join();
    (out, t0.elapsed())
}

const PORT: &str = "[[ports]]\nname = \"s\"\nkind = \"sink\"\n";

#[test]
fn vm_runner_bad_scenarios_fail_before_boot() {
    let dir = TempDir::new("runner-bad");
    for (name, text, want) in [
        (
            "kind",
            "[[ports]]\nname = \"s\"\nkind = \"sinkhole\"\n[[devices]]\nport = \"s\"\n",
            "port 's': unknown port kind 'sinkhole' (expected sink, gen, reflect, xconnect, tap or afpacket)",
        ),
        (
            "noport",
            &format!("{PORT}[[devices]]\nport = \"t\"\n"),
            "device 0: port 't' is not a port of this scenario (ports: s)",
        ),
        (
            "missing",
            &format!("[image]\nadd = [\"no-such-program\"]\n{PORT}[[devices]]\nport = \"s\"\n"),
            "image.add: {DIR}/no-such-program: no such file",
        ),
        (
            "check",
            &format!("checks = [\"backend.s.rx_packets = 5\"]\n{PORT}[[devices]]\nport = \"s\"\n"),
            "check 'backend.s.rx_packets = 5': no comparison (==, !=, <, <=, >, >=, separated by spaces)",
        ),
    ] {
        let path = dir.join(&format!("{name}.toml"));
        std::fs::write(&path, text).expect("write scenario");
        let report = dir.join(&format!("{name}-report.json"));
        let (out, took) = run_bounded(
            Command::new(RUNNER).arg(&path).arg("--report").arg(&report).current_dir(dir.path()),
            Duration::from_secs(30),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        let want = format!(
            "vm-runner: {}: {}",
            path.display(),
            want.replace("{DIR}", &dir.path().display().to_string())
        );
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert_eq!(stderr.trim_end(), want, "{name}: one line naming the file and the error");
        assert!(out.stdout.is_empty(), "{name}: {}", String::from_utf8_lossy(&out.stdout));
        assert!(!report.exists(), "{name}: a report was written");
        // Nothing was built or booted: a boot takes seconds, this is a parse.
        assert!(took < Duration::from_secs(5), "{name}: took {took:?}");
    }

    // build-image.sh refuses bad options in one line, before building anything.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/build-image.sh");
    let missing = dir.join("absent");
    for (args, want) in [
        (
            vec!["--add".to_string(), missing.display().to_string()],
            format!("--add {0}: {0}: no such file", missing.display()),
        ),
        (
            vec!["--init".to_string(), missing.display().to_string()],
            format!("--init {0}: no such file", missing.display()),
        ),
        (
            vec!["--add".to_string(), format!("{RUNNER}:bin/x")],
            format!("--add {RUNNER}:bin/x: DEST must be an absolute path in the guest"),
        ),
        (
            vec!["--frobnicate".to_string()],
            "unknown argument '--frobnicate' (build-image.sh --help)".to_string(),
        ),
    ] {
        let (out, took) = run_bounded(Command::new("bash").arg(&script).args(&args), Duration::from_secs(30));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end(), format!("build-image.sh: ERROR: {want}"), "{args:?}");
        assert!(took < Duration::from_secs(5), "{args:?}: took {took:?}");
    }
}

/// Builds the example's afp_send.c into `out`: static when libc's static archive is
/// installed, else dynamic (build-image.sh's `--add` brings its libraries). Returns
/// whether it is static.
fn build_afp_send(out: &Path) -> bool {
    let src = example_dir().join("afp_send.c");
    let gcc = |extra: &[&str]| {
        let (o, _) = run_bounded(
            Command::new("gcc-12")
                .args(["-O2", "-Wall", "-Wextra", "-Werror", "-o"])
                .arg(out)
                .arg(&src)
                .args(extra),
            Duration::from_secs(120),
        );
        o
    };
    let o = gcc(&["-static"]);
    if o.status.success() {
        return true;
    }
    let o2 = gcc(&[]);
    assert!(
        o2.status.success(),
        "gcc-12 failed (apt-get install gcc-12 libc6-dev):\n{}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o2.stderr)
    );
    false
}

#[test]
fn vm_runner_foreign_afpacket_program() {
    let _g = serial();
    // The runner finds these next to itself (target/<profile>/): fresh builds.
    for p in
        [workspace_bin("host-backend"), workspace_bin("testpmd"), workspace_example("vnet-driver", "l2fwd")]
    {
        assert!(p.is_file(), "{}", p.display());
    }
    let dir = TempDir::new("runner-afp");
    let is_static = build_afp_send(&dir.join("afp_send"));
    eprintln!("afp_send built {}", if is_static { "static" } else { "dynamic" });
    std::fs::copy(example_dir().join("run.sh"), dir.join("run.sh")).expect("copy run.sh");
    // The example's scenario, with one more check that cannot hold.
    let example = std::fs::read_to_string(example_dir().join("scenario.toml")).expect("read the example");
    let wrong = "backend.s.rx_packets == guest.sent + 1";
    let text = example.replacen("checks = [\n", &format!("checks = [\n    \"{wrong}\",\n"), 1);
    assert_ne!(text, example, "the example has no checks list to add to");
    let scenario = dir.join("scenario.toml");
    std::fs::write(&scenario, &text).expect("write scenario");
    let report_path = dir.join("report.json");

    let (out, took) = run_bounded(
        Command::new(RUNNER).arg(&scenario).arg("--report").arg(&report_path).current_dir(dir.path()),
        Duration::from_secs(600),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("vm-runner took {took:?}:\n{stderr}");
    assert_eq!(out.status.code(), Some(1), "the added check must fail the run:\n{stderr}");
    let failed: Vec<&str> = stderr.lines().filter(|l| l.starts_with("vm-runner: FAIL")).collect();
    assert_eq!(failed.len(), 2, "{stderr}");
    assert_eq!(failed[0], format!("vm-runner: FAIL check failed: {wrong} (1000 != 1001)"), "{stderr}");
    assert!(failed[1].starts_with("vm-runner: FAIL (1 failure(s)), report: "), "{stderr}");

    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report_path).expect("the report"))
        .expect("report JSON");
    let ctx = serde_json::to_string_pretty(&report).unwrap_or_default();
    // The guest: the kernel's driver, our program's output and values.
    assert_eq!(report["mode"], "kernel", "{ctx}");
    assert_eq!(report["guest"]["result"], "PASS", "{ctx}");
    assert_eq!(report["guest"]["rc"], 0, "{ctx}");
    let values = &report["guest"]["values"];
    assert_eq!((values["sent"].as_u64(), values["completed"].as_u64()), (Some(1000), Some(1000)), "{ctx}");
    assert_eq!((values["bytes"].as_u64(), values["ifaces"].as_u64()), (Some(60_000), Some(1)), "{ctx}");
    let output = report["guest"]["output"].as_str().unwrap_or_default();
    assert!(output.contains("afp_send: 1000 frames of 60 bytes sent on eth0"), "{output}");
    let markers: Vec<&str> =
        report["guest"]["markers"].as_array().expect("markers").iter().filter_map(Value::as_str).collect();
    assert!(markers.iter().any(|m| m.starts_with("VNET-RESULT PASS app")), "{markers:?}");
    assert!(markers.iter().any(|m| m.starts_with("VNET-IFACE eth0 ")), "{markers:?}");
    // Our sink counted exactly what the program sent.
    let dev = &report["backend"]["devices"]["s"];
    assert_eq!(dev["rx_packets"].as_u64(), Some(1000), "{dev}");
    assert_eq!(dev["rx_bytes"].as_u64(), Some(60_000), "{dev}");
    assert!(dev["drops"].as_object().expect("drops").values().all(|v| v == 0), "{dev}");
    // Every check of the example held, with both values in the report; only ours failed.
    let checks = report["checks"].as_array().expect("checks");
    assert_eq!(checks.len(), 7, "{ctx}");
    for c in checks {
        let ok = c["check"] != wrong;
        assert_eq!(c["ok"], ok, "{c}");
        assert!(c["lhs"].is_i64() && c["rhs"].is_i64(), "{c}");
    }
    assert_eq!(
        report["failures"],
        serde_json::json!([format!("check failed: {wrong} (1000 != 1001)")]),
        "{ctx}"
    );
    // QEMU: the NIC on legacy interrupts for the kernel's driver; the accelerator chosen by trying.
    let cmd = report["qemu"]["command"].as_str().unwrap_or_default();
    assert!(cmd.contains("vectors=0") && cmd.contains("vt.mode=kernel"), "{cmd}");
    let accel = report["accel"].as_str().unwrap_or_default();
    assert!(cmd.starts_with(&format!("qemu-system-x86_64 -accel {accel} ")), "{cmd}");
    assert!(report["accel_note"].as_str().unwrap_or_default().starts_with(accel), "{ctx}");
    // A user image of its own: not the default image our other VM tests boot.
    let initrd = report["image"]["initrd"].as_str().unwrap_or_default();
    assert!(initrd.contains("/vm/user-images/") && !initrd.contains("/vm/image/"), "{initrd}");
}

/// Processes whose command line mentions `needle`.
fn processes_with(needle: &str) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        if !e.file_name().to_string_lossy().chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                out.push(format!("{}: {cmd}", e.file_name().to_string_lossy()));
            }
        }
    }
    out
}

#[test]
fn vm_runner_time_limit_kills_the_guest() {
    let _g = serial();
    for p in
        [workspace_bin("host-backend"), workspace_bin("testpmd"), workspace_example("vnet-driver", "l2fwd")]
    {
        assert!(p.is_file(), "{}", p.display());
    }
    let dir = TempDir::new("runner-limit");
    let scenario = dir.join("slow.toml");
    let text = format!("timeout_secs = 6\naccel = \"tcg\"\n[guest]\nparams = \"vt.fwd=txonly vt.secs=60\"\n{PORT}[[devices]]\nport = \"s\"\n");
    std::fs::write(&scenario, text).expect("write scenario");
    let report_path = dir.join("report.json");
    let (out, took) = run_bounded(
        Command::new(RUNNER).arg(&scenario).arg("--report").arg(&report_path).arg("--quiet"),
        Duration::from_secs(300),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&report_path).expect("the report"))
        .expect("report JSON");
    assert_eq!(
        report["failures"],
        serde_json::json!([
            "timeout: the run took more than timeout_secs = 6 (QEMU killed)",
            "the guest printed no VNET-RESULT line"
        ]),
        "{stderr}"
    );
    assert_eq!(report["boots"][0]["qemu_exit"], "killed at the time limit", "{report}");
    assert_eq!(report["accel"], "tcg");
    assert_eq!(report["accel_note"], "tcg: the scenario asks for it");
    // The boot took the limit, not testpmd's 60 s (the image check and teardown add a few).
    let boot_s = report["boots"][0]["elapsed_s"].as_f64().expect("elapsed_s");
    assert!((6.0..12.0).contains(&boot_s), "boot took {boot_s} s");
    assert!(took < Duration::from_secs(60), "the runner took {took:?}");
    // Nothing of the run is left: QEMU and the backend named the run's sockets.
    let cmd = report["qemu"]["command"].as_str().expect("command");
    let sock = cmd.split("path=").nth(1).and_then(|s| s.split([',', ' ']).next()).expect("a socket path");
    assert!(processes_with(sock).is_empty(), "still running: {:?}", processes_with(sock));
}

#[test]
fn vm_runner_user_command_on_bound_devices() {
    let _g = serial();
    let dir = TempDir::new("runner-bound");
    std::fs::write(
        dir.join("setup.sh"),
        "set -- $VNET_BDFS\necho \"devices: $*\"\necho \"VNET-VALUE bdfs=$# hugepages=$(cat /proc/sys/vm/nr_hugepages)\"\n",
    )
    .expect("write setup.sh");
    let text = format!(
        "checks = [\"guest.bdfs == 1\", \"guest.hugepages == 128\", \"guest.rc == 0\", \"guest.port0.tx_packets > 0\",
                   \"backend.s.rx_packets == guest.port0.tx_packets\", \"backend.s.drops == 0\"]
         [image]\ninit = \"setup.sh\"
         [guest]\nmode = \"noiommu\"
         command = \"testpmd -a $VNET_BDFS --forward-mode=txonly --duration 3 --stats-format json\"
         {PORT}[[devices]]\nport = \"s\"\n"
    );
    let path = dir.join("user-testpmd.toml");
    std::fs::write(&path, text).expect("write scenario");
    let sc = Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(sc.mode, Mode::NoIommu);
    let report = run(&sc, &Tools::for_tests(), false).unwrap_or_else(|e| panic!("{e}"));
    let ctx = serde_json::to_string_pretty(&report.to_json()).unwrap_or_default();
    assert!(report.passed(), "{:?}\n{ctx}", report.failures());
    for c in &report.checks {
        eprintln!("{}", c.message);
    }
    assert_eq!(report.last().reason.split_whitespace().next(), Some("app"), "{ctx}");
    let out = report.output();
    assert!(out.lines().next().is_some_and(|l| l.starts_with("devices: 0000:")), "{out}");
    assert!(report.markers().iter().any(|m| m.starts_with("VNET-VFIO-OK /dev/vfio/noiommu-")), "{ctx}");
    // Exact: what testpmd sent is what the sink received (the checks say so; once more here).
    assert_eq!(
        report.value("port0.tx_packets"),
        report.device("s")["rx_packets"].as_u64().unwrap_or(0),
        "{ctx}"
    );
}
