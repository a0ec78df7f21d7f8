//! The VM runner: boots a [`Scenario`] and writes its [`Report`] (`vm-runner`, and our
//! own VM tests through [`run`] or the steps of [`Run`]).
//!
//! It owns the run: the image (ours, a directory, or built with the scenario's
//! `build-image.sh` options), the accelerator (KVM when a probe boot under it prints the
//! kernel's banner, TCG otherwise), our `host-backend` with the scenario's ports, QEMU
//! with its devices (one boot or several, one after the other), the serial console
//! (streamed to stderr when asked, the whole run bounded by `timeout_secs`), the backend's
//! final statistics per port end, and the checks (`timeout_secs` bounds the boots, from the
//! first QEMU start; an image build has its own bound). Every process it starts is killed when
//! the run ends or fails. A guest that fails or a check that does not hold is part of the
//! report (`passed: false`); an `Err` means the run itself could not happen (a missing
//! tool, an image build or a backend that failed), one line first, details after.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{signal, workspace_bin, Backend, TempDir};
use crate::scenario::{guest_values, Accel, ImageSource, Mode, Outcome, Scenario, Values};
use crate::vm::{Image, ImageBuild, Nic, Qemu, VmConfig};

/// The programs a run uses.
#[derive(Debug, Clone)]
pub struct Tools {
    /// Our `host-backend`.
    pub backend: PathBuf,
    /// How images are built (our testpmd and l2fwd, the cache directory).
    pub image: ImageBuild,
}

impl Tools {
    /// The binaries of the test's own build profile (built if needed).
    pub fn for_tests() -> Tools {
        Tools { backend: workspace_bin("host-backend"), image: ImageBuild::for_tests(Vec::new()) }
    }

    /// The binaries next to `exe` (`target/<profile>/vm-runner`): `host-backend` there
    /// (or `backend` when given), our testpmd and l2fwd there when they exist (else
    /// build-image.sh builds them), the image cache in `target/vm`.
    pub fn beside(exe: &Path, backend: Option<PathBuf>) -> Result<Tools, String> {
        let dir = exe.parent().ok_or_else(|| format!("{}: no directory", exe.display()))?;
        let backend = backend.unwrap_or_else(|| dir.join("host-backend"));
        if !backend.is_file() {
            return Err(format!(
                "{}: no such file (cargo build --release -p host-backend, or --backend PATH)",
                backend.display()
            ));
        }
        let some = |p: PathBuf| p.is_file().then_some(p);
        Ok(Tools {
            backend,
            image: ImageBuild {
                testpmd: some(dir.join("testpmd")),
                l2fwd: some(dir.join("examples/l2fwd")),
                vm_dir: dir.parent().map(|t| t.join("vm")),
                options: Vec::new(),
            },
        })
    }
}

/// How long the backend may take to see QEMU go after it exited.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long QEMU may run on once the guest printed its result (it powers off).
const POWEROFF_GRACE: Duration = Duration::from_secs(30);
/// How long a KVM probe boot may take to print the kernel's banner.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------------------ KVM probe

/// Whether KVM works here: `/dev/kvm` opens and a guest kernel booted under `-accel
/// kvm` prints its banner on the serial console. Probed once per process.
pub fn kvm_probe(image: &Image) -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE.get_or_init(|| probe(image)).clone()
}

fn probe(image: &Image) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm: {e}"))?;
    let dir = TempDir::new("kvm-probe");
    let serial = dir.join("serial.log");
    let log = dir.join("qemu.log");
    let out = std::fs::File::create(&log).map_err(|e| format!("create {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| format!("dup: {e}"))?;
    // No initramfs: the kernel prints its banner, panics (no root) and QEMU exits.
    let mut child = std::process::Command::new("qemu-system-x86_64")
        .args(["-accel", "kvm", "-machine", "q35", "-cpu", "max", "-m", "256", "-kernel"])
        .arg(&image.vmlinuz)
        .args(["-append", "console=ttyS0 panic=-1", "-serial"])
        .arg(format!("file:{}", serial.display()))
        .args(["-display", "none", "-monitor", "none", "-no-reboot"])
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot run qemu-system-x86_64: {e}"))?;
    let t0 = Instant::now();
    let result = loop {
        if read_lossy(&serial).contains("Linux version") {
            break Ok(());
        }
        if let Ok(Some(st)) = child.try_wait() {
            let qlog = read_lossy(&log);
            let why = qlog.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
            break Err(format!("QEMU under KVM exited ({st}) before the kernel printed anything: {why}"));
        }
        if t0.elapsed() > KVM_PROBE_TIMEOUT {
            break Err(format!("no kernel output within {KVM_PROBE_TIMEOUT:?} under KVM"));
        }
        thread::sleep(Duration::from_millis(50));
    };
    if matches!(child.try_wait(), Ok(None)) {
        signal(child.id(), libc::SIGKILL);
    }
    let _ = child.wait();
    result
}

// ------------------------------------------------------------------------------ report

/// One boot of the guest.
#[derive(Debug, Clone)]
pub struct Boot {
    /// `PASS`, `FAIL` or `none` (no `VNET-RESULT` line).
    pub result: String,
    /// The text after the result.
    pub reason: String,
    /// How QEMU ended: its exit status, or why it was killed.
    pub qemu_exit: String,
    pub elapsed: Duration,
    /// The serial console, carriage returns removed.
    pub console: String,
    /// Port ends the backend saw QEMU connected on during the boot.
    pub connected: Vec<String>,
    /// What went wrong, one line each.
    pub failures: Vec<String>,
}

/// What a run found; [`Report::to_json`] is the file `vm-runner` writes.
#[derive(Debug, Clone)]
pub struct Report {
    pub scenario: String,
    pub file: PathBuf,
    /// `kvm` or `tcg`, and why.
    pub accel: String,
    pub accel_note: String,
    pub mode: Mode,
    pub image: Image,
    pub backend_argv: Vec<String>,
    /// The backend's final statistics of each port end's device.
    pub backend: BTreeMap<String, Value>,
    /// The ring layout each end's device last negotiated (`split`/`packed`), from the
    /// backend's log.
    pub rings: BTreeMap<String, String>,
    /// The QEMU command line of the last boot.
    pub qemu_argv: Vec<String>,
    pub boots: Vec<Boot>,
    /// Values the guest printed in its last boot (see [`guest_values`]).
    pub values: BTreeMap<String, i128>,
    pub checks: Vec<Outcome>,
    pub elapsed: Duration,
}

impl Values for Report {
    fn backend(&self, end: &str) -> Option<&Value> {
        self.backend.get(end)
    }
    fn guest(&self, name: &str) -> Option<i128> {
        self.values.get(name).copied()
    }
}

/// Lines of the guest's applications: (prefix, what it is).
const OUTPUT_PREFIXES: [&str; 5] = ["APP| ", "TP| ", "TP! ", "L2| ", "L2! "];

impl Report {
    /// Every failure: the boots' and the checks' that did not hold.
    pub fn failures(&self) -> Vec<String> {
        let mut f: Vec<String> = self.boots.iter().flat_map(|b| b.failures.iter().cloned()).collect();
        f.extend(self.checks.iter().filter(|c| !c.ok).map(|c| c.message.clone()));
        f
    }

    pub fn passed(&self) -> bool {
        self.failures().is_empty()
    }

    /// The last boot.
    pub fn last(&self) -> &Boot {
        self.boots.last().expect("a report has at least one boot")
    }

    /// The `VNET-` lines of /init in the last boot (console escape codes cut off).
    pub fn markers(&self) -> Vec<String> {
        self.last()
            .console
            .lines()
            .filter(|l| !OUTPUT_PREFIXES.iter().any(|p| l.starts_with(p)))
            .filter_map(|l| l.find("VNET-").map(|i| l[i..].trim_end_matches(['=', ' ']).to_string()))
            .collect()
    }

    /// The guest applications' output in the last boot (the user's, testpmd's or
    /// l2fwd's lines, prefixes removed).
    pub fn output(&self) -> String {
        let mut out = String::new();
        for l in self.last().console.lines() {
            if let Some(rest) = OUTPUT_PREFIXES.iter().find_map(|p| l.strip_prefix(p)) {
                out.push_str(rest);
                out.push('\n');
            }
        }
        out
    }

    /// The backend's final statistics of `end`'s device; panics (for tests) if absent.
    pub fn device(&self, end: &str) -> &Value {
        self.backend
            .get(end)
            .unwrap_or_else(|| panic!("no backend device for port end {end}: {:?}", self.backend))
    }

    /// A guest value; panics (for tests) with the console if absent.
    pub fn value(&self, name: &str) -> u64 {
        let v =
            self.values.get(name).unwrap_or_else(|| panic!("no guest value {name}\n{}", self.last().console));
        u64::try_from(*v).unwrap_or_else(|_| panic!("guest value {name} = {v} is negative"))
    }

    /// The report as `vm-runner` writes it.
    pub fn to_json(&self) -> Value {
        let last = self.last();
        json!({
            "scenario": self.scenario,
            "file": self.file,
            "passed": self.passed(),
            "failures": self.failures(),
            "elapsed_s": secs(self.elapsed),
            "accel": self.accel,
            "accel_note": self.accel_note,
            "mode": self.mode.name(),
            "image": {
                "vmlinuz": self.image.vmlinuz,
                "initrd": self.image.initrd,
                "build_s": secs(self.image.build_time),
            },
            "guest": {
                "result": last.result,
                "reason": last.reason,
                "rc": self.values.get("rc").map(|v| *v as i64),
                "markers": self.markers(),
                "output": self.output(),
                "values": self.values.iter().map(|(k, v)| (k.clone(), json!(*v as i64))).collect::<serde_json::Map<_, _>>(),
            },
            "backend": {
                "command": self.backend_argv,
                "devices": self.backend,
                "rings": self.rings,
            },
            "qemu": {
                "command": self.qemu_argv.join(" "),
                "exit": last.qemu_exit,
            },
            "checks": self.checks.iter().map(|c| json!({
                "check": c.check, "ok": c.ok, "lhs": c.lhs.map(|v| v as i64),
                "rhs": c.rhs.map(|v| v as i64), "message": c.message,
            })).collect::<Vec<_>>(),
            "boots": self.boots.iter().map(|b| json!({
                "result": b.result, "reason": b.reason, "qemu_exit": b.qemu_exit,
                "elapsed_s": secs(b.elapsed), "connected": b.connected, "failures": b.failures,
            })).collect::<Vec<_>>(),
            "console": last.console,
        })
    }
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

// ------------------------------------------------------------------------------ the run

/// A run in progress: the image is there and the backend runs. [`run`] does
/// `start`, `boot_all` and `finish`; a test that needs a port end of its own (a free
/// end, see [`Scenario::free_ends`]) opens it between `start` and `boot_all`.
pub struct Run {
    sc: Scenario,
    image: Image,
    kvm: bool,
    accel_note: String,
    backend: Backend,
    backend_argv: Vec<String>,
    /// The socket of each end, in `sc.ends` order.
    sockets: Vec<PathBuf>,
    boots: Vec<Boot>,
    qemu_argv: Vec<String>,
    stream: bool,
    t0: Instant,
    deadline: Instant,
    _dir: TempDir,
}

/// Runs `sc` from start to report; `stream` copies the serial console to stderr.
pub fn run(sc: &Scenario, tools: &Tools, stream: bool) -> Result<Report, String> {
    let mut r = Run::start(sc, tools, stream)?;
    r.boot_all()?;
    r.finish()
}

impl Run {
    /// The image (built if the scenario asks), the accelerator, the backend.
    pub fn start(sc: &Scenario, tools: &Tools, stream: bool) -> Result<Run, String> {
        let t0 = Instant::now();
        let image = match &sc.image {
            ImageSource::Default => tools.image.run().map_err(|e| format!("image build failed: {e}"))?,
            ImageSource::Dir(d) => Image::in_dir(d, Duration::ZERO),
            ImageSource::Build(opts) => {
                let mut b = tools.image.clone();
                b.options = opts.clone();
                b.run().map_err(|e| format!("image build failed: {e}"))?
            }
        };
        let (kvm, accel_note) = match sc.accel {
            Accel::Tcg => (false, "tcg: the scenario asks for it".to_string()),
            Accel::Kvm => {
                kvm_probe(&image).map_err(|e| format!("accel = \"kvm\", but KVM does not work here: {e}"))?;
                (true, "kvm: the scenario asks for it, and the probe boot worked".to_string())
            }
            Accel::Auto => match kvm_probe(&image) {
                Ok(()) => (true, "kvm: the probe boot worked".to_string()),
                Err(e) => (false, format!("tcg: KVM does not work here ({e})")),
            },
        };

        let dir = TempDir::new(&format!("run-{}", sc.name));
        let sockets: Vec<PathBuf> = sc.ends.iter().map(|e| dir.join(&format!("{}.sock", e.name))).collect();
        let mut argv: Vec<String> = Vec::new();
        for (i, p) in sc.ports.iter().enumerate() {
            let socks: Vec<String> = sc
                .ends
                .iter()
                .zip(&sockets)
                .filter(|(e, _)| e.port == i)
                .map(|(_, s)| s.display().to_string())
                .collect();
            let mut spec = format!("{}:{}", p.kind, socks.join(","));
            if let Some(ifname) = &p.ifname {
                spec.push(',');
                spec.push_str(ifname);
            }
            argv.extend(["--port".to_string(), spec]);
        }
        let has =
            |flag: &str| sc.backend_args.iter().any(|a| a == flag || a.starts_with(&format!("{flag}=")));
        // A worker that sleeps while QEMU boots leaves TCG its CPU.
        if !has("--poll-us") {
            argv.extend(["--poll-us".into(), "1000".into()]);
        }
        if sc.mode == Mode::VIommu && !has("--iommu") {
            argv.push("--iommu".into());
        }
        let queues = sc.devices.iter().map(|d| d.queues).max().unwrap_or(1);
        if queues > 1 && !has("--queues") {
            argv.extend(["--queues".into(), queues.to_string()]);
        }
        if let Some(mtu) = sc.devices.iter().filter_map(|d| d.mtu).max() {
            if !has("--mtu") {
                argv.extend(["--mtu".into(), mtu.to_string()]);
            }
        }
        argv.extend(sc.backend_args.iter().cloned());
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        let backend = Backend::try_start_with(&tools.backend, &args)
            .map_err(|e| format!("the backend did not start: {e}"))?;
        let mut backend_argv = vec![tools.backend.display().to_string()];
        backend_argv.extend(argv);
        Ok(Run {
            sc: sc.clone(),
            image,
            kvm,
            accel_note,
            backend,
            backend_argv,
            sockets,
            boots: Vec::new(),
            qemu_argv: Vec::new(),
            stream,
            t0,
            // set when the boots start: an image build is bounded on its own
            deadline: Instant::now() + Duration::from_secs(sc.timeout_secs),
            _dir: dir,
        })
    }

    /// The socket of port end `end` (e.g. `s`, `x.b`).
    pub fn socket(&self, end: &str) -> Option<&Path> {
        self.sc.ends.iter().position(|e| e.name == end).map(|i| self.sockets[i].as_path())
    }

    /// The running backend.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The guest's kernel parameters and devices.
    fn vm_config(&self) -> VmConfig {
        let sc = &self.sc;
        let mut params = format!("vt.mode={}", sc.mode.name());
        if sc.mode == Mode::VIommu {
            params.push_str(" intel_iommu=on");
        }
        if !sc.guest.params.trim().is_empty() {
            params.push(' ');
            params.push_str(sc.guest.params.trim());
        }
        if let Some(cmd) = &sc.guest.command {
            params.push_str(&format!(" vt.cmd={}", base64(cmd.as_bytes())));
        }
        let nics = sc
            .devices
            .iter()
            .zip(&sc.device_ends)
            .enumerate()
            .map(|(i, (d, &e))| {
                let mut opts = Vec::new();
                if let Some(m) = d.mtu {
                    opts.push(format!("host_mtu={m}"));
                }
                // Debian's QEMU 7.2 segfaults under TCG when a guest kernel enables MSI-X
                // on a vhost-user virtio-net-pci: legacy interrupts for the kernel's driver.
                if sc.mode == Mode::Kernel {
                    opts.push("vectors=0".into());
                }
                Nic {
                    socket: self.sockets[e].clone(),
                    mac: format!("52:54:00:12:34:{:02x}", 0x56 + i),
                    packed: d.packed,
                    queues: d.queues,
                    opts: opts.join(","),
                }
            })
            .collect();
        VmConfig {
            params,
            smp: sc.guest.smp,
            mem_mib: sc.guest.mem_mib,
            viommu: sc.mode == Mode::VIommu,
            nics,
            kvm: self.kvm,
            ..VmConfig::noiommu(&self.sockets[0], "")
        }
    }

    /// Boots the guest `boots` times, one after the other; each boot's failures are in
    /// the report. `Err` only when QEMU cannot be started.
    pub fn boot_all(&mut self) -> Result<(), String> {
        self.deadline = Instant::now() + Duration::from_secs(self.sc.timeout_secs);
        for n in 0..self.sc.boots {
            let boot = self.boot(n)?;
            let stop = boot.result == "none";
            self.boots.push(boot);
            if stop {
                break;
            }
        }
        Ok(())
    }

    /// The sockets the devices are on, with their end names.
    fn device_sockets(&self) -> Vec<(String, PathBuf)> {
        self.sc.device_ends.iter().map(|&e| (self.sc.ends[e].name.clone(), self.sockets[e].clone())).collect()
    }

    fn connected(&self, stats: &Value, sock: &Path) -> bool {
        device_of(stats, sock).and_then(|d| d.get("connected")).and_then(Value::as_bool) == Some(true)
    }

    fn boot(&mut self, n: u32) -> Result<Boot, String> {
        let cfg = self.vm_config();
        let mut qemu = Qemu::try_start(&self.image, &cfg)?;
        self.qemu_argv = qemu.argv().to_vec();
        let tag = if self.sc.boots > 1 { format!("boot {}: ", n + 1) } else { String::new() };
        let devs = self.device_sockets();
        let mut connected: Vec<String> = Vec::new();
        let mut failures = Vec::new();
        let mut streamed = 0usize;
        let mut result_at: Option<Instant> = None;
        let qemu_exit = loop {
            let console = qemu.serial();
            if self.stream {
                streamed = stream_lines(&mut std::io::stderr().lock(), &console, streamed);
            }
            if let Some(s) = self.backend.latest_stats() {
                for (name, sock) in &devs {
                    if self.connected(&s, sock) && !connected.contains(name) {
                        connected.push(name.clone());
                    }
                }
            }
            if result_at.is_none() && console.lines().any(|l| l.contains("VNET-RESULT ")) {
                result_at = Some(Instant::now());
            }
            if let Some(st) = qemu.exit_status() {
                // the console may have grown right before the exit
                if self.stream {
                    stream_lines(&mut std::io::stderr().lock(), &qemu.serial(), streamed);
                }
                if !st.success() {
                    failures.push(format!("{tag}QEMU exited with {st}: {}", last_line(&qemu.qemu_log())));
                }
                break st.to_string();
            }
            if result_at.is_some_and(|t| t.elapsed() > POWEROFF_GRACE) {
                qemu.kill();
                break format!("killed {POWEROFF_GRACE:?} after the guest's result (it did not power off)");
            }
            if Instant::now() >= self.deadline {
                qemu.kill();
                failures.push(format!(
                    "{tag}timeout: the run took more than timeout_secs = {} (QEMU killed)",
                    self.sc.timeout_secs
                ));
                break "killed at the time limit".to_string();
            }
            thread::sleep(Duration::from_millis(50));
        };
        let console = qemu.serial();
        let (result, reason) =
            match console.lines().rev().find_map(|l| l.find("VNET-RESULT ").map(|i| &l[i + 12..])) {
                Some(r) => {
                    let (res, reason) = r.trim().split_once(' ').unwrap_or((r.trim(), ""));
                    (res.to_string(), reason.to_string())
                }
                None => ("none".to_string(), String::new()),
            };
        match result.as_str() {
            "PASS" => {}
            "none" => failures.push(format!("{tag}the guest printed no VNET-RESULT line")),
            _ => failures.push(format!("{tag}the guest reported {result}: {reason}")),
        }
        for (name, _) in &devs {
            if !connected.contains(name) {
                failures.push(format!("{tag}the backend never saw QEMU connected on port {name}"));
            }
        }
        // The backend must see QEMU go before the next boot (or the final statistics).
        let t = Instant::now();
        loop {
            let gone =
                self.backend.latest_stats().is_some_and(|s| devs.iter().all(|(_, p)| !self.connected(&s, p)));
            if gone {
                break;
            }
            if self.backend.has_exited() {
                return Err(format!("the backend exited during the run; log:\n{}", self.backend.log()));
            }
            if t.elapsed() > DISCONNECT_TIMEOUT {
                failures.push(format!(
                    "{tag}the backend did not see QEMU disconnect within {DISCONNECT_TIMEOUT:?}"
                ));
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(Boot { result, reason, qemu_exit, elapsed: qemu.elapsed(), console, connected, failures })
    }

    /// Stops the backend, reads its final statistics and evaluates the checks.
    pub fn finish(self) -> Result<Report, String> {
        let log = self.backend.log();
        let fin = self.backend.try_stop().map_err(|e| format!("the backend did not stop cleanly: {e}"))?;
        let mut backend = BTreeMap::new();
        let mut rings = BTreeMap::new();
        for (e, sock) in self.sc.ends.iter().zip(&self.sockets) {
            if let Some(d) = device_of(&fin, sock) {
                backend.insert(e.name.clone(), d.clone());
            }
            let tag = format!("{}: features ", sock.display());
            let last = log.lines().rev().find(|l| l.contains(&tag) && l.contains(" acked ("));
            if let Some(l) = last {
                let layout = if l.contains("(packed rings)") { "packed" } else { "split" };
                rings.insert(e.name.clone(), layout.to_string());
            }
        }
        let values = self.boots.last().map(|b| guest_values(&b.console)).unwrap_or_default();
        let mut report = Report {
            scenario: self.sc.name.clone(),
            file: self.sc.path.clone(),
            accel: if self.kvm { "kvm" } else { "tcg" }.into(),
            accel_note: self.accel_note,
            mode: self.sc.mode,
            image: self.image,
            backend_argv: self.backend_argv,
            backend,
            rings,
            qemu_argv: self.qemu_argv,
            boots: self.boots,
            values,
            checks: Vec::new(),
            elapsed: self.t0.elapsed(),
        };
        if report.boots.is_empty() {
            return Err("no boot ran".into());
        }
        report.checks = self.sc.checks.iter().map(|c| c.eval(&report)).collect();
        Ok(report)
    }
}

/// The device of `stats["devices"]` on `sock`.
fn device_of<'a>(stats: &'a Value, sock: &Path) -> Option<&'a Value> {
    let want = sock.to_string_lossy();
    stats.get("devices")?.as_array()?.iter().find(|d| d.get("socket").and_then(Value::as_str) == Some(&want))
}

/// Writes the complete lines of `console` after byte `from` to `out` (stderr), prefixed
/// `guest| `; returns where the next call starts.
fn stream_lines(out: &mut dyn Write, console: &str, from: usize) -> usize {
    let Some(new) = console.get(from..) else { return from };
    let Some(end) = new.rfind('\n') else { return from };
    for l in new[..end].lines() {
        let _ = writeln!(out, "guest| {l}");
    }
    from + end + 1
}

fn last_line(s: &str) -> String {
    s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string()
}

fn read_lossy(p: &Path) -> String {
    std::fs::read(p).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}

/// Standard base64 with padding (what busybox `base64 -d` reads).
fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in data.chunks(3) {
        let b = [c[0], *c.get(1).unwrap_or(&0), *c.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= c.len() {
                out.push(ABC[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"afp_send $VNET_IFACES 1000"), "YWZwX3NlbmQgJFZORVRfSUZBQ0VTIDEwMDA=");
    }

    #[test]
    fn streaming_prints_whole_lines_once() {
        let mut out = Vec::new();
        assert_eq!(stream_lines(&mut out, "abc", 0), 0);
        assert_eq!(stream_lines(&mut out, "abc\nde", 0), 4);
        assert_eq!(stream_lines(&mut out, "abc\ndef\n", 4), 8);
        assert_eq!(String::from_utf8_lossy(&out), "guest| abc\nguest| def\n");
    }
}
