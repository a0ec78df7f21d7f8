//! The VM runner's scenarios (`vm-runner SCENARIO.json`, `src/bin/vm_runner.rs`): a small
//! JSON file names the backend's ports, the guest's virtio-net devices (each tied to a
//! port), the image, the guest's parameters and the checks; [`run`] starts our
//! `host-backend`, boots QEMU, streams the serial console with a time limit and returns a
//! JSON report with every check's outcome.
//!
//! ```json
//! {
//!   "name": "afpacket-sender",
//!   "image": { "add": ["sender"], "init": "run.sh", "no_bind": true },
//!   "mode": "kernel",
//!   "ports": [ { "name": "s", "kind": "sink" } ],
//!   "backend_args": ["--poll-us", "1000"],
//!   "devices": [ { "port": "s" } ],
//!   "params": "",
//!   "timeout_secs": 180,
//!   "checks": [ "backend.s.rx_packets == guest.sent", "guest.sent == 1000" ]
//! }
//! ```
//!
//! - `image`: absent (our default image, `tests/vm/build-image.sh`), a directory holding
//!   `vmlinuz` and `initrd.img`, or an object of `build-image.sh` options (`add`, `init`,
//!   `no_bind`; the image goes into `target/vm/user-images/NAME`).
//!   Relative paths are relative to the scenario file.
//! - `mode`: `noiommu` (default), `viommu` (the backend gets `--iommu`) or `kernel` (the
//!   kernel's own `virtio_net` drives the NICs; required for a `no_bind` image).
//! - `ports`: `kind` is `sink`, `gen` or `reflect`; each gets a socket of its own.
//! - `devices`: one or two, each with `port`, and optionally `queues`, `packed`, `mtu`
//!   (both devices must agree on `queues` and `packed`).
//! - `params`: more guest kernel parameters (`vt.fwd=txonly vt.secs=5` for our testpmd).
//! - `accel`: `auto` (default: KVM when /dev/kvm opens and the guest boots with it within
//!   30 s, else TCG), `kvm` or `tcg`.
//! - `checks`: `LHS OP RHS` with OP one of `== != < <= > >=`; an operand is a number,
//!   `backend.PORT.COUNTER` (a counter of that port's device in the backend's final
//!   statistics, such as `rx_packets` or `drops.peer_down`; `drops`, an object, is the sum
//!   of its counters), `guest.NAME` (a `VNET-VALUE NAME=N` line the guest
//!   printed) or `guest.portN.COUNTER` (our testpmd's forward statistics in the guest).
//!
//! Errors in the scenario (an unknown port kind, a device with no port, a missing file)
//! are found by [`load`] before anything starts. Owns: the scenario format, the checks and
//! the report; the processes are `harness::Backend` and `vm::Qemu`.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{device, Backend, TempDir};
use crate::vm::{build_image, build_image_with, vm_dir, GuestReport, Image, Qemu, VmConfig};

/// How the guest reaches its devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestMode {
    NoIommu,
    VIommu,
    Kernel,
}

/// Where the image comes from.
#[derive(Debug, Clone)]
pub enum ImageSpec {
    /// Our default image.
    Default,
    /// A built image's directory.
    Dir(PathBuf),
    /// `build-image.sh` options.
    Build { add: Vec<String>, init: Option<PathBuf>, no_bind: bool },
}

/// A backend port.
#[derive(Debug, Clone)]
pub struct PortSpec {
    pub name: String,
    pub kind: String,
}

/// A guest NIC.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    pub port: String,
    pub queues: u16,
    pub packed: bool,
    pub mtu: Option<u16>,
}

/// One side of a check.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    Num(f64),
    Backend { port: String, counter: String },
    GuestValue(String),
    GuestPort { port: usize, counter: String },
}

/// `LHS OP RHS`.
#[derive(Debug, Clone)]
pub struct Check {
    pub text: String,
    pub lhs: Operand,
    pub op: String,
    pub rhs: Operand,
}

/// A validated scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub image: ImageSpec,
    pub mode: GuestMode,
    pub ports: Vec<PortSpec>,
    pub backend_args: Vec<String>,
    pub devices: Vec<DeviceSpec>,
    pub params: String,
    pub timeout: Duration,
    pub accel: String,
    pub checks: Vec<Check>,
}

const KINDS: [&str; 3] = ["sink", "gen", "reflect"];
const OPS: [&str; 6] = ["==", "!=", "<=", ">=", "<", ">"];

/// Reads and validates a scenario file: every error is one line, found before anything
/// starts.
pub fn load(path: &Path) -> Result<Scenario, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    parse(&text, &base).map_err(|e| format!("{}: {e}", path.display()))
}

/// Parses and validates scenario JSON; relative paths are taken from `base`.
pub fn parse(text: &str, base: &Path) -> Result<Scenario, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let obj = v.as_object().ok_or("the scenario must be a JSON object")?;
    const KEYS: [&str; 10] = [
        "name",
        "image",
        "mode",
        "ports",
        "backend_args",
        "devices",
        "params",
        "timeout_secs",
        "accel",
        "checks",
    ];
    if let Some(k) = obj.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(format!("unknown key \"{k}\" (keys: {})", KEYS.join(", ")));
    }
    let s = |k: &str| v.get(k).and_then(Value::as_str);
    let name = s("name").unwrap_or("scenario").to_string();
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!("name \"{name}\": letters, digits, '-' and '_' only"));
    }
    let abs = |p: &str| if Path::new(p).is_absolute() { PathBuf::from(p) } else { base.join(p) };
    let image = match v.get("image") {
        None | Some(Value::Null) => ImageSpec::Default,
        Some(Value::String(d)) => {
            let d = abs(d);
            for f in ["vmlinuz", "initrd.img"] {
                if !d.join(f).is_file() {
                    return Err(format!("image {}: no {f} in it", d.display()));
                }
            }
            ImageSpec::Dir(d)
        }
        Some(Value::Object(o)) => {
            if let Some(k) = o.keys().find(|k| !["add", "init", "no_bind"].contains(&k.as_str())) {
                return Err(format!("image: unknown key \"{k}\" (add, init, no_bind)"));
            }
            let mut add = Vec::new();
            for a in o.get("add").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]) {
                let a = a.as_str().ok_or("image.add: a list of \"SRC[:DEST]\" strings")?;
                let (src, dest) = match a.split_once(':') {
                    Some((s, d)) => (s, Some(d)),
                    None => (a, None),
                };
                let src = abs(src);
                if !src.is_file() {
                    return Err(format!("image.add: {} is not a file (a missing binary?)", src.display()));
                }
                add.push(match dest {
                    Some(d) => format!("{}:{d}", src.display()),
                    None => src.display().to_string(),
                });
            }
            let init = match o.get("init") {
                None => None,
                Some(i) => {
                    let i = abs(i.as_str().ok_or("image.init: a path")?);
                    if !i.is_file() {
                        return Err(format!("image.init: {} is not a file", i.display()));
                    }
                    Some(i)
                }
            };
            let no_bind = o.get("no_bind").and_then(Value::as_bool).unwrap_or(false);
            ImageSpec::Build { add, init, no_bind }
        }
        Some(_) => return Err("image: a directory or an object of build options".into()),
    };
    let mode = match s("mode").unwrap_or("noiommu") {
        "noiommu" => GuestMode::NoIommu,
        "viommu" => GuestMode::VIommu,
        "kernel" => GuestMode::Kernel,
        m => return Err(format!("mode \"{m}\": noiommu, viommu or kernel")),
    };
    if matches!(image, ImageSpec::Build { no_bind: true, .. }) && mode != GuestMode::Kernel {
        return Err("a no_bind image needs mode \"kernel\" (the kernel's virtio_net drives its NICs)".into());
    }
    let mut ports = Vec::new();
    for p in v.get("ports").and_then(Value::as_array).ok_or("ports: a list is required")? {
        let name = p.get("name").and_then(Value::as_str).ok_or("ports: every port needs a \"name\"")?;
        let kind = p.get("kind").and_then(Value::as_str).ok_or(format!("port {name}: no \"kind\""))?;
        if !KINDS.contains(&kind) {
            return Err(format!("port {name}: unknown port kind \"{kind}\" ({})", KINDS.join(", ")));
        }
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("port \"{name}\": letters, digits and '_' only"));
        }
        if ports.iter().any(|q: &PortSpec| q.name == name) {
            return Err(format!("port {name}: declared twice"));
        }
        ports.push(PortSpec { name: name.into(), kind: kind.into() });
    }
    let mut backend_args = Vec::new();
    for a in v.get("backend_args").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]) {
        backend_args.push(a.as_str().ok_or("backend_args: a list of strings")?.to_string());
    }
    let mut devices = Vec::new();
    for d in v.get("devices").and_then(Value::as_array).ok_or("devices: a list is required")? {
        let port = d.get("port").and_then(Value::as_str).ok_or("devices: a device with no \"port\"")?;
        if !ports.iter().any(|p| p.name == port) {
            return Err(format!("device on port \"{port}\": no such port"));
        }
        let queues = d.get("queues").and_then(Value::as_u64).unwrap_or(1);
        if !(1..=8).contains(&queues) {
            return Err(format!("device on port {port}: queues {queues} (1..=8)"));
        }
        let mtu = match d.get("mtu").and_then(Value::as_u64) {
            Some(m) if !(68..=9000).contains(&m) => {
                return Err(format!("device on port {port}: mtu {m} (68..=9000)"))
            }
            m => m.map(|m| m as u16),
        };
        let packed = d.get("packed").and_then(Value::as_bool).unwrap_or(false);
        devices.push(DeviceSpec { port: port.into(), queues: queues as u16, packed, mtu });
    }
    match devices.as_slice() {
        [] => return Err("devices: at least one".into()),
        [_] => {}
        [a, b] if a.queues != b.queues || a.packed != b.packed || a.mtu != b.mtu => {
            return Err("devices: both devices must have the same queues, packed and mtu".into())
        }
        [_, _] => {}
        _ => return Err("devices: at most two".into()),
    }
    let timeout =
        Duration::from_secs(v.get("timeout_secs").and_then(Value::as_u64).unwrap_or(300).clamp(10, 3600));
    let accel = s("accel").unwrap_or("auto").to_string();
    if !["auto", "kvm", "tcg"].contains(&accel.as_str()) {
        return Err(format!("accel \"{accel}\": auto, kvm or tcg"));
    }
    let mut checks = Vec::new();
    for c in v.get("checks").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]) {
        let c = c.as_str().ok_or("checks: a list of strings")?;
        checks.push(parse_check(c, &ports)?);
    }
    let params = s("params").unwrap_or("").to_string();
    Ok(Scenario { name, image, mode, ports, backend_args, devices, params, timeout, accel, checks })
}

fn parse_check(text: &str, ports: &[PortSpec]) -> Result<Check, String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let [l, op, r] = words.as_slice() else {
        return Err(format!("check \"{text}\": LHS OP RHS, separated by spaces"));
    };
    if !OPS.contains(op) {
        return Err(format!("check \"{text}\": operator {op} ({})", OPS.join(" ")));
    }
    let operand = |w: &str| -> Result<Operand, String> {
        if let Ok(n) = w.parse::<f64>() {
            return Ok(Operand::Num(n));
        }
        let parts: Vec<&str> = w.split('.').collect();
        match parts.as_slice() {
            ["backend", port, counter @ ..] if !counter.is_empty() => {
                if !ports.iter().any(|p| p.name == *port) {
                    return Err(format!("check \"{text}\": no port \"{port}\""));
                }
                Ok(Operand::Backend { port: port.to_string(), counter: counter.join(".") })
            }
            ["guest", p, counter] if p.starts_with("port") => {
                let port = p[4..].parse().map_err(|_| format!("check \"{text}\": {w}: guest.portN.COUNTER"))?;
                Ok(Operand::GuestPort { port, counter: counter.to_string() })
            }
            ["guest", name] => Ok(Operand::GuestValue(name.to_string())),
            _ => Err(format!(
                "check \"{text}\": {w} is not a number, backend.PORT.COUNTER, guest.NAME or guest.portN.COUNTER"
            )),
        }
    };
    Ok(Check { text: text.into(), lhs: operand(l)?, op: op.to_string(), rhs: operand(r)? })
}

/// `VNET-VALUE name=N` lines the guest printed (the last value of each name wins).
fn guest_values(serial: &str) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    for line in serial.lines() {
        let Some((_, rest)) = line.split_once("VNET-VALUE ") else { continue };
        for kv in rest.split_whitespace() {
            if let Some((k, v)) = kv.split_once('=') {
                if let Ok(n) = v.parse::<f64>() {
                    m.insert(k.into(), json!(n));
                }
            }
        }
    }
    m
}

/// Where each port's socket is.
fn sock(dir: &TempDir, port: &str) -> PathBuf {
    dir.join(&format!("{port}.sock"))
}

/// The image, built if the scenario asks for one (into `target/vm/user-images/NAME`).
fn image(sc: &Scenario) -> Image {
    match &sc.image {
        ImageSpec::Default => build_image(),
        ImageSpec::Dir(d) => {
            Image { vmlinuz: d.join("vmlinuz"), initrd: d.join("initrd.img"), build_time: Duration::ZERO }
        }
        ImageSpec::Build { add, init, no_bind } => {
            let mut o = Vec::new();
            for a in add {
                o.extend(["--add".to_string(), a.clone()]);
            }
            if let Some(i) = init {
                o.extend(["--init".to_string(), i.display().to_string()]);
            }
            if *no_bind {
                o.push("--no-bind".into());
            }
            let out = vm_dir().join("user-images").join(&sc.name);
            o.extend(["--out".to_string(), out.display().to_string()]);
            build_image_with(&o)
        }
    }
}

/// Whether /dev/kvm can be opened for read and write.
fn kvm_usable() -> bool {
    OpenOptions::new().read(true).write(true).open("/dev/kvm").is_ok()
}

/// Runs the scenario and returns its report (`passed`: every check held and the guest
/// reported PASS). Panics (with the diagnostics) when a process cannot be started or
/// fails; the binary turns that into one error line.
pub fn run(sc: &Scenario) -> Value {
    let img = image(sc);
    let dir = TempDir::new("vm-runner");
    let mut args: Vec<String> = Vec::new();
    for p in &sc.ports {
        args.extend(["--port".to_string(), format!("{}:{}", p.kind, sock(&dir, &p.name).display())]);
    }
    if sc.mode == GuestMode::VIommu {
        args.push("--iommu".into());
    }
    args.extend(sc.backend_args.iter().cloned());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let backend = Backend::start(&argv);

    let first = sock(&dir, &sc.devices[0].port);
    let mut cfg = match sc.mode {
        GuestMode::NoIommu => VmConfig::noiommu(&first, &sc.params),
        GuestMode::VIommu => VmConfig::viommu(&first, &sc.params),
        GuestMode::Kernel => VmConfig::kernel(&first, "52:54:00:12:34:56", &sc.params),
    };
    cfg.socket2 = sc.devices.get(1).map(|d| sock(&dir, &d.port));
    cfg.queues = sc.devices[0].queues;
    cfg.packed = sc.devices[0].packed;
    if let Some(m) = sc.devices[0].mtu {
        let sep = if cfg.nic_opts.is_empty() { "" } else { "," };
        cfg.nic_opts = format!("{}{sep}host_mtu={m}", cfg.nic_opts);
    }

    // KVM when it works, chosen by trying: the guest must print its first marker.
    let mut accel_note = String::new();
    let try_kvm = match sc.accel.as_str() {
        "kvm" => true,
        "tcg" => false,
        _ => kvm_usable(),
    };
    let started = Instant::now();
    let mut qemu = None;
    if try_kvm {
        cfg.accel = "kvm".into();
        let mut q = Qemu::start(&img, &cfg);
        let until = Instant::now() + Duration::from_secs(30);
        while !q.serial().contains("VNET-INIT") && !q.has_exited() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(100));
        }
        if q.serial().contains("VNET-INIT") {
            qemu = Some(q);
        } else {
            accel_note = if q.has_exited() {
                format!(
                    "kvm: QEMU exited ({}); fell back to tcg",
                    q.qemu_log().lines().last().unwrap_or("no message")
                )
            } else {
                "kvm: the guest printed nothing within 30 s; fell back to tcg".into()
            };
            q.kill();
        }
    } else if sc.accel == "auto" {
        accel_note = "kvm: /dev/kvm cannot be opened; tcg".into();
    }
    let mut qemu = qemu.unwrap_or_else(|| {
        cfg.accel = "tcg".into();
        Qemu::start(&img, &cfg)
    });

    // The console until the guest's result, QEMU's exit or the time limit.
    let end = started + sc.timeout;
    let mut timed_out = false;
    loop {
        if qemu.serial().contains("VNET-RESULT") || qemu.has_exited() {
            break;
        }
        if Instant::now() >= end {
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let exit = if timed_out {
        qemu.kill();
        "killed at the time limit".to_string()
    } else {
        let (st, _) = qemu.wait_exit(Duration::from_secs(60));
        st.to_string()
    };
    let serial = qemu.serial();
    let report = GuestReport::new(serial.clone());
    let log = backend.log();
    let stats = backend.stop();

    let values = guest_values(&serial);
    let value = |o: &Operand| -> Option<f64> {
        match o {
            Operand::Num(n) => Some(*n),
            Operand::Backend { port, counter: c } => {
                // A dotted path into the device's statistics; an object (`drops`) is the
                // sum of its counters.
                let mut v = device(&stats, &sock(&dir, port));
                for part in c.split('.') {
                    v = v.get(part)?;
                }
                match v {
                    Value::Object(o) => Some(o.values().filter_map(Value::as_f64).sum()),
                    v => v.as_f64(),
                }
            }
            Operand::GuestValue(n) => values.get(n).and_then(Value::as_f64),
            Operand::GuestPort { port, counter: c } => report
                .forward_stats()
                .and_then(|f| f["ports"].as_array().and_then(|a| a.get(*port)).and_then(|p| p[c].as_f64())),
        }
    };
    let mut all_ok = true;
    let checks: Vec<Value> = sc
        .checks
        .iter()
        .map(|c| {
            let (l, r) = (value(&c.lhs), value(&c.rhs));
            let ok = match (l, r) {
                (Some(l), Some(r)) => match c.op.as_str() {
                    "==" => l == r,
                    "!=" => l != r,
                    "<" => l < r,
                    "<=" => l <= r,
                    ">" => l > r,
                    _ => l >= r,
                },
                _ => false,
            };
            all_ok &= ok;
            json!({"check": c.text, "lhs": l, "rhs": r, "ok": ok})
        })
        .collect();
    let guest_pass = report.passed() == Some(true);
    let app_output: Vec<&str> =
        serial.lines().filter_map(|l| l.split_once("APP| ").map(|(_, r)| r)).collect();
    let markers: Vec<&str> = serial.lines().filter(|l| l.contains("VNET-")).collect();
    let ports: serde_json::Map<String, Value> =
        sc.ports.iter().map(|p| (p.name.clone(), device(&stats, &sock(&dir, &p.name)).clone())).collect();
    json!({
        "scenario": sc.name,
        "passed": all_ok && guest_pass && !timed_out,
        "accel": cfg.accel,
        "accel_note": accel_note,
        "seconds": started.elapsed().as_secs_f64(),
        "guest": {
            "result": report.marker("VNET-RESULT"),
            "passed": guest_pass,
            "qemu_exit": exit,
            "timed_out": timed_out,
            "values": values,
            "markers": markers,
            "app_output": app_output,
            "testpmd_output": report.testpmd_output(),
        },
        "backend_log": log.lines().rev().take(200).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>(),
        "backend": ports,
        "checks": checks,
        "qemu_cmdline": qemu.cmdline(),
    })
}
