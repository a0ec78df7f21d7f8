//! The VM runner's scenario files and their checks (`vm-runner SCENARIO.toml`).
//!
//! This module owns the format and everything decided before anything starts: a
//! scenario (TOML) names our backend's ports, the guest's virtio-net devices (each on a
//! port), the image, the guest's mode and command, and the checks. [`Scenario::load`]
//! parses and validates it: every error (an unknown port kind, a device with no port, a
//! file that does not exist, a check that does not parse) is one line naming the file and
//! what is wrong, before any process starts. The runner (`crate::runner`) boots it and
//! evaluates the checks with [`Check::eval`] against the report.
//!
//! ```toml
//! name = "txonly-to-sink"
//! timeout_secs = 300                  # the boots, all of them (default 300)
//! accel = "auto"                      # auto (KVM when it works, else TCG) | kvm | tcg
//! boots = 1                           # boot the guest this many times, one after the other
//! checks = ["backend.s.rx_packets == guest.port0.tx_packets", "backend.s.drops == 0"]
//!
//! [image]                             # absent: our default image
//! dir = "/path/to/image"              # an image build-image.sh made, or the options:
//! add = ["./myapp", "./app.conf:/etc/app.conf"]   # paths relative to this file
//! init = "./run.sh"
//! no_bind = false
//!
//! [guest]
//! mode = "noiommu"                    # noiommu | viommu | kernel (default: kernel for a
//!                                     # --no-bind image, else noiommu)
//! params = "vt.fwd=txonly vt.secs=5"  # more guest kernel parameters (guest-init.sh)
//! command = "myapp --count 1000"      # run by /init after the image's --init script
//! smp = 2                             # vCPUs (default 2)
//! mem_mib = 1024                      # guest RAM (default 1024)
//!
//! [backend]
//! args = ["--count", "1000"]          # more host-backend options
//!
//! [[ports]]                           # host-backend --port KIND:SOCKET
//! name = "s"
//! kind = "sink"                       # sink | gen | reflect | xconnect | tap | afpacket
//! # ifname = "vnt0"                   # tap and afpacket: the interface
//!
//! [[devices]]                         # a virtio-net-pci device of the guest, in PCI order
//! port = "s"                          # an xconnect port "x" has two ends: "x.a" and "x.b"
//! queues = 1                          # queue pairs (default 1)
//! packed = false                      # packed virtqueues (default false: split)
//! mtu = 1500                          # the device's MTU (QEMU host_mtu, backend --mtu)
//! ```
//!
//! A check is `LHS OP RHS` with `OP` one of `== != < <= > >=`, each side a sum of
//! operands joined by ` + ` or ` - ` (tokens separated by spaces). An operand is a
//! whole number, `backend.END.COUNTER` (the backend's final statistics of the device on
//! that port end, `COUNTER` a field or dotted path such as `rx_packets`,
//! `drops.peer_down` or `iotlb.misses`; an object such as `drops` is the sum of its
//! numbers), or `guest.NAME` (a `VNET-VALUE NAME=N` line the guest printed, or
//! `guest.portN.COUNTER` from our testpmd's `forward_stats` JSON line, or `guest.rc`,
//! the application's or testpmd's exit status).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

/// The port kinds of our host-backend.
pub const PORT_KINDS: [&str; 6] = ["sink", "gen", "reflect", "xconnect", "tap", "afpacket"];
/// Most virtio-net devices a guest gets (each on its own PCIe root port).
pub const MAX_DEVICES: usize = 8;
/// Most queue pairs per device (QEMU's vectors, the backend's `--queues`).
pub const MAX_QUEUES: u16 = 8;

/// How the guest reaches its devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Bound to vfio-pci in no-IOMMU mode (physical addresses).
    NoIommu,
    /// Behind QEMU's `intel-iommu`: type-1 VFIO, the backend with `--iommu`.
    VIommu,
    /// The kernel's own `virtio_net` drives them (legacy interrupts, `vectors=0`).
    Kernel,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::NoIommu => "noiommu",
            Mode::VIommu => "viommu",
            Mode::Kernel => "kernel",
        }
    }

    /// Parses `noiommu`, `viommu` or `kernel`.
    pub fn parse(s: &str) -> Option<Mode> {
        [Mode::NoIommu, Mode::VIommu, Mode::Kernel].into_iter().find(|m| m.name() == s)
    }
}

/// QEMU's accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when a probe boot under it works, TCG otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// `[image]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// An image directory (`vmlinuz`, `initrd.img`) that build-image.sh made.
    pub dir: Option<String>,
    /// `build-image.sh --add SRC[:DEST]` each.
    #[serde(default)]
    pub add: Vec<String>,
    /// `build-image.sh --init SCRIPT`.
    pub init: Option<String>,
    /// `build-image.sh --no-bind`.
    #[serde(default)]
    pub no_bind: bool,
}

/// `[guest]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestSpec {
    pub mode: Option<Mode>,
    #[serde(default)]
    pub params: String,
    pub command: Option<String>,
    #[serde(default = "default_smp")]
    pub smp: u32,
    #[serde(default = "default_mem")]
    pub mem_mib: u32,
}

impl Default for GuestSpec {
    fn default() -> GuestSpec {
        GuestSpec {
            mode: None,
            params: String::new(),
            command: None,
            smp: default_smp(),
            mem_mib: default_mem(),
        }
    }
}

fn default_smp() -> u32 {
    2
}
fn default_mem() -> u32 {
    1024
}
fn default_timeout() -> u64 {
    300
}
fn default_boots() -> u32 {
    1
}
fn default_queues() -> u16 {
    1
}

/// `[backend]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// More host-backend options (`--count N`, `--poll-us N`, ...).
    #[serde(default)]
    pub args: Vec<String>,
}

/// `[[ports]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    pub name: String,
    pub kind: String,
    pub ifname: Option<String>,
}

/// `[[devices]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    pub port: String,
    #[serde(default = "default_queues")]
    pub queues: u16,
    #[serde(default)]
    pub packed: bool,
    pub mtu: Option<u32>,
}

/// A scenario file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    pub name: Option<String>,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    #[serde(default)]
    pub accel: Accel,
    #[serde(default = "default_boots")]
    pub boots: u32,
    #[serde(default)]
    pub checks: Vec<String>,
    #[serde(default)]
    pub image: ImageSpec,
    #[serde(default)]
    pub guest: GuestSpec,
    #[serde(default)]
    pub backend: BackendSpec,
    #[serde(default)]
    pub ports: Vec<PortSpec>,
    #[serde(default)]
    pub devices: Vec<DeviceSpec>,
}

/// Where the guest image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// Our default image (built or reused by build-image.sh).
    Default,
    /// A directory with `vmlinuz` and `initrd.img`.
    Dir(PathBuf),
    /// build-image.sh with these options (`--add`, `--init`, `--no-bind`).
    Build(Vec<String>),
}

/// One end of a port: a vhost-user socket of the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct End {
    /// `PORT` or, for xconnect, `PORT.a` / `PORT.b`.
    pub name: String,
    /// The index of the port in [`Scenario::ports`].
    pub port: usize,
}

/// A validated scenario: what the runner boots.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    /// The file it came from.
    pub path: PathBuf,
    pub timeout_secs: u64,
    pub accel: Accel,
    pub boots: u32,
    pub image: ImageSource,
    /// The image leaves the devices to the kernel (`--no-bind`).
    pub no_bind: bool,
    pub mode: Mode,
    pub guest: GuestSpec,
    pub backend_args: Vec<String>,
    pub ports: Vec<PortSpec>,
    /// Every port's ends (one each; two for xconnect), in port order.
    pub ends: Vec<End>,
    pub devices: Vec<DeviceSpec>,
    /// For each device, the index into [`Scenario::ends`] it is on.
    pub device_ends: Vec<usize>,
    pub checks: Vec<Check>,
}

/// A scenario that cannot run: one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioError(pub String);

impl fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ScenarioError {}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 32 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// `path` relative to `base` unless absolute.
fn resolve(base: &Path, path: &str) -> PathBuf {
    let p = Path::new(path);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

impl Scenario {
    /// Reads, parses and validates the scenario at `path`.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ScenarioError(format!("{}: cannot read: {e}", path.display())))?;
        Scenario::parse(&text, path)
    }

    /// Parses and validates `text`; `path` names it in errors and is where relative paths
    /// start from.
    pub fn parse(text: &str, path: &Path) -> Result<Scenario, ScenarioError> {
        let file: ScenarioFile = toml::from_str(text).map_err(|e| {
            // toml's Display is several lines with a caret; one line: where and what.
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let msg = e.message().replace('\n', " ");
            match line {
                Some(l) => ScenarioError(format!("{}:{l}: {}", path.display(), msg.trim())),
                None => ScenarioError(format!("{}: {}", path.display(), msg.trim())),
            }
        })?;
        Scenario::validate(file, path)
    }

    fn validate(f: ScenarioFile, path: &Path) -> Result<Scenario, ScenarioError> {
        let err = |m: String| ScenarioError(format!("{}: {m}", path.display()));
        let base = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let name = f.name.clone().unwrap_or_else(|| {
            path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "scenario".into())
        });
        if f.timeout_secs == 0 {
            return Err(err("timeout_secs must be at least 1".into()));
        }
        if f.boots == 0 || f.boots > 10 {
            return Err(err(format!("boots = {}: expected 1 to 10", f.boots)));
        }
        if f.guest.smp == 0 || f.guest.smp > 8 {
            return Err(err(format!("guest.smp = {}: expected 1 to 8", f.guest.smp)));
        }
        // base64 on the kernel command line, which holds 2048 bytes on x86 in all
        if f.guest.command.as_ref().is_some_and(|c| c.len() > 1024) {
            return Err(err("guest.command: longer than 1024 bytes (put it in an --init script)".into()));
        }
        if f.guest.params.len() > 512 {
            return Err(err("guest.params: longer than 512 bytes".into()));
        }
        if f.guest.mem_mib < 256 {
            return Err(err(format!("guest.mem_mib = {}: at least 256 MiB", f.guest.mem_mib)));
        }

        // ---- ports and their ends
        if f.ports.is_empty() {
            return Err(err("no [[ports]]: the backend needs at least one".into()));
        }
        let mut ends = Vec::new();
        for (i, p) in f.ports.iter().enumerate() {
            if !valid_name(&p.name) {
                return Err(err(format!(
                    "port {i}: name '{}' must be 1 to 32 letters, digits, '-' or '_'",
                    p.name
                )));
            }
            if f.ports[..i].iter().any(|q| q.name == p.name) {
                return Err(err(format!("port '{}' is named twice", p.name)));
            }
            if !PORT_KINDS.contains(&p.kind.as_str()) {
                return Err(err(format!(
                    "port '{}': unknown port kind '{}' (expected {} or {})",
                    p.name,
                    p.kind,
                    PORT_KINDS[..PORT_KINDS.len() - 1].join(", "),
                    PORT_KINDS[PORT_KINDS.len() - 1]
                )));
            }
            let needs_if = p.kind == "tap" || p.kind == "afpacket";
            match (&p.ifname, needs_if) {
                (None, true) => {
                    return Err(err(format!("port '{}': a {} port needs ifname", p.name, p.kind)))
                }
                (Some(_), false) => {
                    return Err(err(format!("port '{}': ifname is only for tap and afpacket ports", p.name)))
                }
                _ => {}
            }
            if p.kind == "xconnect" {
                ends.push(End { name: format!("{}.a", p.name), port: i });
                ends.push(End { name: format!("{}.b", p.name), port: i });
            } else {
                ends.push(End { name: p.name.clone(), port: i });
            }
        }

        // ---- devices, each on an end no other device uses
        if f.devices.is_empty() {
            return Err(err("no [[devices]]: the guest needs at least one virtio-net device".into()));
        }
        if f.devices.len() > MAX_DEVICES {
            return Err(err(format!("{} devices: at most {MAX_DEVICES}", f.devices.len())));
        }
        let end_names: Vec<&str> = ends.iter().map(|e| e.name.as_str()).collect();
        let mut device_ends = Vec::new();
        for (i, d) in f.devices.iter().enumerate() {
            let Some(e) = ends.iter().position(|e| e.name == d.port) else {
                let hint = if f.ports.iter().any(|p| p.name == d.port && p.kind == "xconnect") {
                    format!(" (an xconnect port's ends are {0}.a and {0}.b)", d.port)
                } else {
                    String::new()
                };
                return Err(err(format!(
                    "device {i}: port '{}' is not a port of this scenario (ports: {}){hint}",
                    d.port,
                    end_names.join(", ")
                )));
            };
            if let Some(j) = device_ends.iter().position(|&x| x == e) {
                return Err(err(format!(
                    "devices {j} and {i} are both on port '{}': one device per port",
                    d.port
                )));
            }
            if d.queues == 0 || d.queues > MAX_QUEUES {
                return Err(err(format!("device {i}: queues = {}: expected 1 to {MAX_QUEUES}", d.queues)));
            }
            if let Some(m) = d.mtu {
                if !(68..=9000).contains(&m) {
                    return Err(err(format!("device {i}: mtu = {m}: expected 68 to 9000")));
                }
            }
            device_ends.push(e);
        }

        // ---- image
        let im = &f.image;
        let building = !im.add.is_empty() || im.init.is_some() || im.no_bind;
        let (image, no_bind) = match (&im.dir, building) {
            (Some(_), true) => {
                return Err(err(
                    "image: dir and the build options (add, init, no_bind) exclude each other".into()
                ))
            }
            (Some(d), false) => {
                let dir = resolve(base, d);
                for f in ["vmlinuz", "initrd.img"] {
                    if !dir.join(f).is_file() {
                        return Err(err(format!("image.dir: {}: no {f} in it", dir.display())));
                    }
                }
                let manifest = std::fs::read_to_string(dir.join("manifest")).unwrap_or_default();
                let no_bind = manifest.lines().any(|l| l.trim() == "no-bind");
                (ImageSource::Dir(dir), no_bind)
            }
            (None, false) => (ImageSource::Default, false),
            (None, true) => {
                let mut opts = Vec::new();
                for a in &im.add {
                    let (src, dest) = match a.split_once(':') {
                        Some((s, d)) => (s, Some(d)),
                        None => (a.as_str(), None),
                    };
                    let p = resolve(base, src);
                    if !p.is_file() {
                        return Err(err(format!("image.add: {}: no such file", p.display())));
                    }
                    if let Some(d) = dest {
                        if !d.starts_with('/') {
                            return Err(err(format!(
                                "image.add: {a}: DEST must be an absolute path in the guest"
                            )));
                        }
                    }
                    opts.push("--add".to_string());
                    opts.push(match dest {
                        Some(d) => format!("{}:{d}", p.display()),
                        None => p.display().to_string(),
                    });
                }
                if let Some(i) = &im.init {
                    let p = resolve(base, i);
                    if !p.is_file() {
                        return Err(err(format!("image.init: {}: no such file", p.display())));
                    }
                    opts.push("--init".into());
                    opts.push(p.display().to_string());
                }
                if im.no_bind {
                    opts.push("--no-bind".into());
                }
                (ImageSource::Build(opts), im.no_bind)
            }
        };
        let mode = match (f.guest.mode, no_bind) {
            (None, true) => Mode::Kernel,
            (None, false) => Mode::NoIommu,
            (Some(m), true) if m != Mode::Kernel => {
                return Err(err(format!(
                    "guest.mode = \"{}\", but the image leaves the devices to the kernel (--no-bind): use \"kernel\"",
                    m.name()
                )))
            }
            (Some(m), _) => m,
        };

        // ---- checks
        let mut checks = Vec::new();
        for c in &f.checks {
            let check = Check::parse(c).map_err(|e| err(format!("check '{c}': {e}")))?;
            for o in check.operands() {
                if let Operand::Backend { end, .. } = o {
                    if !end_names.contains(&end.as_str()) {
                        return Err(err(format!(
                            "check '{c}': backend.{end}: no such port (ports: {})",
                            end_names.join(", ")
                        )));
                    }
                }
            }
            checks.push(check);
        }

        Ok(Scenario {
            name,
            path: path.to_path_buf(),
            timeout_secs: f.timeout_secs,
            accel: f.accel,
            boots: f.boots,
            image,
            no_bind,
            mode,
            guest: f.guest,
            backend_args: f.backend.args,
            ports: f.ports,
            ends,
            devices: f.devices,
            device_ends,
            checks,
        })
    }

    /// The ends that no device uses (free for another front-end, e.g. a test's own port).
    pub fn free_ends(&self) -> Vec<&End> {
        self.ends.iter().enumerate().filter(|(i, _)| !self.device_ends.contains(i)).map(|(_, e)| e).collect()
    }
}

// ------------------------------------------------------------------------------ checks

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    fn parse(s: &str) -> Option<Op> {
        Some(match s {
            "==" => Op::Eq,
            "!=" => Op::Ne,
            "<" => Op::Lt,
            "<=" => Op::Le,
            ">" => Op::Gt,
            ">=" => Op::Ge,
            _ => return None,
        })
    }

    fn holds(self, l: i128, r: i128) -> bool {
        match self {
            Op::Eq => l == r,
            Op::Ne => l != r,
            Op::Lt => l < r,
            Op::Le => l <= r,
            Op::Gt => l > r,
            Op::Ge => l >= r,
        }
    }

    fn text(self) -> &'static str {
        match self {
            Op::Eq => "==",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        }
    }

    /// The operator that held instead, for messages (`999 != 1000`).
    fn negated(self) -> &'static str {
        match self {
            Op::Eq => "!=",
            Op::Ne => "==",
            Op::Lt => ">=",
            Op::Le => ">",
            Op::Gt => "<=",
            Op::Ge => "<",
        }
    }
}

/// One operand of a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operand {
    Number(u64),
    /// `backend.END.PATH`: END may contain a dot (xconnect's `x.a`), resolved when
    /// parsed against the scenario's ends... see [`Check::parse`].
    Backend {
        end: String,
        path: String,
    },
    /// `guest.NAME`.
    Guest(String),
}

/// A side: operands added (`true`) or subtracted.
type Sum = Vec<(bool, Operand)>;

/// A parsed check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub text: String,
    lhs: Sum,
    op: Op,
    rhs: Sum,
}

/// What the checks read: the backend's final stats per end, and the guest's values.
pub trait Values {
    /// The final device stats of the backend for port end `end`.
    fn backend(&self, end: &str) -> Option<&Value>;
    /// A guest value.
    fn guest(&self, name: &str) -> Option<i128>;
}

/// A check's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub check: String,
    pub ok: bool,
    pub lhs: Option<i128>,
    pub rhs: Option<i128>,
    /// Why a side has no value, or what failed: the line a user reads.
    pub message: String,
}

impl Check {
    /// Parses `LHS OP RHS`. A backend operand is `backend.END.PATH` with END the part up
    /// to the second dot, or to the third when the second part is `a` or `b` (an
    /// xconnect end such as `x.a`); [`Scenario::load`] checks END names a port end.
    pub fn parse(text: &str) -> Result<Check, String> {
        let toks: Vec<&str> = text.split_whitespace().collect();
        let Some(op_at) = toks.iter().position(|t| Op::parse(t).is_some()) else {
            return Err("no comparison (==, !=, <, <=, >, >=, separated by spaces)".into());
        };
        let op = Op::parse(toks[op_at]).expect("found above");
        if toks[op_at + 1..].iter().any(|t| Op::parse(t).is_some()) {
            return Err("more than one comparison".into());
        }
        let lhs = parse_sum(&toks[..op_at]).map_err(|e| format!("left side: {e}"))?;
        let rhs = parse_sum(&toks[op_at + 1..]).map_err(|e| format!("right side: {e}"))?;
        Ok(Check { text: toks.join(" "), lhs, op, rhs })
    }

    fn operands(&self) -> impl Iterator<Item = &Operand> {
        self.lhs.iter().chain(self.rhs.iter()).map(|(_, o)| o)
    }

    /// Evaluates the check against `v`.
    pub fn eval(&self, v: &dyn Values) -> Outcome {
        let l = eval_sum(&self.lhs, v);
        let r = eval_sum(&self.rhs, v);
        let (lhs, rhs) = (l.as_ref().ok().copied(), r.as_ref().ok().copied());
        let (ok, message) = match (l, r) {
            (Ok(a), Ok(b)) if self.op.holds(a, b) => {
                (true, format!("{} ({a} {} {b})", self.text, self.op.text()))
            }
            (Ok(a), Ok(b)) => (false, format!("check failed: {} ({a} {} {b})", self.text, self.op.negated())),
            (Err(e), _) | (_, Err(e)) => (false, format!("check failed: {} ({e})", self.text)),
        };
        Outcome { check: self.text.clone(), ok, lhs, rhs, message }
    }
}

fn parse_operand(t: &str) -> Result<Operand, String> {
    if t.chars().all(|c| c.is_ascii_digit()) {
        return t.parse().map(Operand::Number).map_err(|_| format!("{t}: number too large"));
    }
    if let Some(rest) = t.strip_prefix("backend.") {
        let parts: Vec<&str> = rest.split('.').collect();
        let n = if parts.len() >= 3 && (parts[1] == "a" || parts[1] == "b") { 2 } else { 1 };
        if parts.len() <= n || parts.iter().any(|p| p.is_empty()) {
            return Err(format!("{t}: expected backend.PORT.COUNTER (e.g. backend.s.rx_packets)"));
        }
        return Ok(Operand::Backend { end: parts[..n].join("."), path: parts[n..].join(".") });
    }
    if let Some(rest) = t.strip_prefix("guest.") {
        if rest.is_empty()
            || !rest.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-')
        {
            return Err(format!("{t}: expected guest.NAME (e.g. guest.sent or guest.port0.tx_packets)"));
        }
        return Ok(Operand::Guest(rest.to_string()));
    }
    Err(format!("{t}: expected a number, backend.PORT.COUNTER or guest.NAME"))
}

fn parse_sum(toks: &[&str]) -> Result<Sum, String> {
    if toks.is_empty() {
        return Err("empty".into());
    }
    let mut out = Vec::new();
    let mut sign = true;
    for (i, t) in toks.iter().enumerate() {
        if i % 2 == 1 {
            sign = match *t {
                "+" => true,
                "-" => false,
                _ => return Err(format!("expected + or - before '{t}'")),
            };
        } else {
            out.push((sign, parse_operand(t)?));
        }
    }
    if toks.len() % 2 == 0 {
        return Err(format!("ends with '{}'", toks[toks.len() - 1]));
    }
    Ok(out)
}

/// A JSON value as a number: an unsigned integer, or an object's numbers summed.
fn json_number(v: &Value) -> Option<i128> {
    match v {
        Value::Number(n) => n.as_u64().map(i128::from),
        Value::Object(m) => m.values().map(|x| x.as_u64().map(i128::from)).sum(),
        _ => None,
    }
}

fn eval_operand(o: &Operand, v: &dyn Values) -> Result<i128, String> {
    match o {
        Operand::Number(n) => Ok(*n as i128),
        Operand::Backend { end, path } => {
            let dev = v.backend(end).ok_or_else(|| format!("backend.{end}: the backend reported no such device"))?;
            let mut x = dev;
            for p in path.split('.') {
                x = x.get(p).ok_or_else(|| format!("backend.{end}.{path}: no such counter"))?;
            }
            json_number(x).ok_or_else(|| format!("backend.{end}.{path} = {x} is not a number"))
        }
        Operand::Guest(name) => v.guest(name).ok_or_else(|| {
            format!("guest.{name}: the guest printed no such value (a line 'VNET-VALUE {name}=N', or testpmd's forward_stats)")
        }),
    }
}

fn eval_sum(s: &Sum, v: &dyn Values) -> Result<i128, String> {
    let mut acc = 0i128;
    for (plus, o) in s {
        let x = eval_operand(o, v)?;
        acc = if *plus { acc + x } else { acc - x };
    }
    Ok(acc)
}

// ------------------------------------------------------------------------------ guest values

/// The values the guest printed: `VNET-VALUE name=N` lines (anywhere on a line, so the
/// application's `APP| ` prefix does not matter; several pairs may share a line), our
/// testpmd's `forward_stats` JSON (`portN.FIELD` for each number of port N), and `rc`
/// (the exit status in a `VNET-APP END`, `VNET-TESTPMD END` or `VNET-L2FWD END` marker).
pub fn guest_values(serial: &str) -> BTreeMap<String, i128> {
    let mut out = BTreeMap::new();
    for line in serial.lines() {
        if let Some(i) = line.find("VNET-VALUE ") {
            for pair in line[i + "VNET-VALUE ".len()..].split_whitespace() {
                if let Some((k, v)) = pair.split_once('=') {
                    if let Ok(n) = v.parse::<i128>() {
                        out.insert(k.to_string(), n);
                    }
                }
            }
        }
        for m in ["VNET-APP END rc=", "VNET-TESTPMD END rc=", "VNET-L2FWD END rc="] {
            if let Some(i) = line.find(m) {
                if let Some(Ok(rc)) = line[i + m.len()..].split_whitespace().next().map(str::parse::<i128>) {
                    out.insert("rc".into(), rc);
                }
            }
        }
        if let Some(i) = line.find('{').filter(|_| line.contains("\"forward_stats\"")) {
            let v = serde_json::from_str::<Value>(&line[i..]).ok();
            if let Some(v) = v.filter(|v| v.get("type").and_then(Value::as_str) == Some("forward_stats")) {
                for (n, p) in v.get("ports").and_then(Value::as_array).into_iter().flatten().enumerate() {
                    for (k, x) in p.as_object().into_iter().flatten() {
                        if let Some(x) = x.as_u64() {
                            out.insert(format!("port{n}.{k}"), x as i128);
                        }
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct V {
        backend: HashMap<String, Value>,
        guest: BTreeMap<String, i128>,
    }

    impl Values for V {
        fn backend(&self, end: &str) -> Option<&Value> {
            self.backend.get(end)
        }
        fn guest(&self, name: &str) -> Option<i128> {
            self.guest.get(name).copied()
        }
    }

    fn values() -> V {
        let mut backend = HashMap::new();
        backend.insert(
            "s".to_string(),
            serde_json::json!({"rx_packets": 1000, "drops": {"peer_down": 3, "oversize": 1}, "iotlb": {"misses": 0}}),
        );
        backend.insert("x.b".to_string(), serde_json::json!({"tx_packets": 7}));
        let guest = guest_values(
            "APP| VNET-VALUE sent=1000 bytes=60000\n\
             TP| {\"ports\":[{\"tx_packets\":5,\"tx_dropped\":2}],\"type\":\"forward_stats\"}\n\
             ===== VNET-APP END rc=0 =====\n",
        );
        V { backend, guest }
    }

    fn eval(c: &str) -> Outcome {
        Check::parse(c).unwrap_or_else(|e| panic!("{c}: {e}")).eval(&values())
    }

    #[test]
    fn guest_values_from_markers_and_testpmd() {
        let g = values().guest;
        assert_eq!(g.get("sent"), Some(&1000));
        assert_eq!(g.get("bytes"), Some(&60000));
        assert_eq!(g.get("port0.tx_packets"), Some(&5));
        assert_eq!(g.get("port0.tx_dropped"), Some(&2));
        assert_eq!(g.get("rc"), Some(&0));
    }

    #[test]
    fn checks_hold_or_name_both_values() {
        assert!(eval("backend.s.rx_packets == guest.sent").ok);
        assert!(eval("backend.s.drops == 4").ok, "an object is the sum of its numbers");
        assert!(eval("backend.s.drops.peer_down <= 3").ok);
        assert!(eval("guest.port0.tx_packets + guest.port0.tx_dropped == 7").ok);
        assert!(eval("backend.x.b.tx_packets - 7 == 0").ok);
        assert!(eval("backend.s.iotlb.misses == 0").ok);
        let o = eval("backend.s.rx_packets == guest.sent + 1");
        assert!(!o.ok);
        assert_eq!((o.lhs, o.rhs), (Some(1000), Some(1001)));
        assert_eq!(o.message, "check failed: backend.s.rx_packets == guest.sent + 1 (1000 != 1001)");
        let o = eval("guest.missing > 0");
        assert!(
            !o.ok && o.message.contains("guest.missing: the guest printed no such value"),
            "{}",
            o.message
        );
        let o = eval("backend.s.nothing == 0");
        assert!(!o.ok && o.message.contains("backend.s.nothing: no such counter"), "{}", o.message);
    }

    #[test]
    fn bad_checks_are_refused() {
        for (c, want) in [
            ("backend.s.rx_packets", "no comparison"),
            ("1 == 2 == 3", "more than one comparison"),
            ("backend.s == 1", "expected backend.PORT.COUNTER"),
            ("foo == 1", "expected a number"),
            ("1 + == 1", "left side"),
            ("1 * 2 == 1", "expected + or -"),
        ] {
            let e = Check::parse(c).expect_err(c);
            assert!(e.contains(want), "{c}: {e}");
        }
    }

    fn scenario(text: &str) -> Result<Scenario, ScenarioError> {
        Scenario::parse(text, Path::new("/nonexistent/dir/s.toml"))
    }

    const PORTS: &str = "[[ports]]\nname = \"s\"\nkind = \"sink\"\n[[devices]]\nport = \"s\"\n";

    #[test]
    fn a_valid_scenario() {
        let s = scenario(&format!("checks = [\"backend.s.rx_packets > 0\"]\n{PORTS}")).expect("valid");
        assert_eq!(s.name, "s");
        assert_eq!(s.mode, Mode::NoIommu);
        assert_eq!(s.image, ImageSource::Default);
        assert_eq!(s.device_ends, [0]);
        assert_eq!(s.checks.len(), 1);
        let x = scenario(
            "[[ports]]\nname = \"x\"\nkind = \"xconnect\"\n[[devices]]\nport = \"x.a\"\n\
             [guest]\nmode = \"viommu\"\n",
        )
        .expect("valid");
        assert_eq!(x.free_ends().iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["x.b"]);
        assert_eq!(x.mode, Mode::VIommu);
    }

    /// Every error is one line naming the file.
    #[test]
    fn bad_scenarios_are_one_line() {
        for (text, want) in [
            (
                "[[ports]]\nname = \"s\"\nkind = \"sinc\"\n[[devices]]\nport = \"s\"\n",
                "port 's': unknown port kind 'sinc'",
            ),
            (
                "[[ports]]\nname = \"s\"\nkind = \"sink\"\n[[devices]]\nport = \"t\"\n",
                "device 0: port 't' is not a port of this scenario (ports: s)",
            ),
            (
                &format!("{PORTS}[image]\nadd = [\"missing-binary\"]\n"),
                "image.add: /nonexistent/dir/missing-binary: no such file",
            ),
            (&format!("{PORTS}[guest]\nmode = \"vfio\"\n"), "s.toml:7: unknown variant `vfio`"),
            (&format!("{PORTS}colour = 1\n"), "unknown field `colour`"),
            (&format!("checks = [\"backend.t.rx_packets == 1\"]\n{PORTS}"), "backend.t: no such port"),
            (&format!("{PORTS}[[devices]]\nport = \"s\"\n"), "devices 0 and 1 are both on port 's'"),
            ("[[ports]]\nname = \"s\"\nkind = \"sink\"\n", "no [[devices]]"),
            ("[[ports]]\nname = \"t\"\nkind = \"tap\"\n[[devices]]\nport = \"t\"\n", "needs ifname"),
        ] {
            let e = scenario(text).expect_err(text).0;
            assert!(e.starts_with("/nonexistent/dir/s.toml"), "{e}");
            assert!(e.contains(want), "want {want:?} in {e:?}");
            assert!(!e.contains('\n'), "{e:?}");
        }
    }
}
