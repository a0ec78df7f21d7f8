//! QEMU guests for the VM tests (`tests/tests/vm_*.rs`).
//!
//! * [`build_image`] runs `tests/vm/build-image.sh`: a Debian kernel and an initramfs with
//!   the VFIO modules, our `testpmd` and `tests/vm/guest-init.sh` as `/init`, cached
//!   under `<target>/vm/`; [`ImageBuild`] runs it with a user's files too.
//! * [`Qemu`] boots it under TCG (or KVM, [`VmConfig::kvm`]) with `virtio-net-pci` devices (split rings, or
//!   `packed=on`) whose data plane is a vhost-user socket (our backend's), the serial
//!   console in a file; it is killed on drop.
//! * [`GuestReport`] reads what `/init` printed: its `VNET-` markers, the testpmd output
//!   between `VNET-TESTPMD BEGIN`/`END`, and the `forward_stats` JSON line.
//!
//! The guest's `/init` takes its parameters from the kernel command line
//! (`vt.mode=noiommu vt.fwd=txonly vt.secs=5 ...`, see guest-init.sh).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{signal, wait_timeout, workspace_bin, workspace_example, TempDir};

/// The guest image: kernel and initramfs.
#[derive(Debug, Clone)]
pub struct Image {
    pub vmlinuz: PathBuf,
    pub initrd: PathBuf,
    /// How long `build-image.sh` took.
    pub build_time: Duration,
}

/// Longest a (cold) image build may take: it downloads about 215 MB of Debian packages.
const BUILD_TIMEOUT: Duration = Duration::from_secs(1200);

/// Builds (or reuses) the guest image with `tests/vm/build-image.sh`, putting our
/// `testpmd` of the test's own build profile into it. Panics with the script's output if
/// it fails (a missing prerequisite is a failure, never a skip).
pub fn build_image() -> Image {
    ImageBuild::for_tests(Vec::new()).run().unwrap_or_else(|e| panic!("build_image: {e}"))
}

/// One run of `tests/vm/build-image.sh`.
#[derive(Debug, Clone)]
pub struct ImageBuild {
    /// Our testpmd to put in the image (`None`: the script builds it with cargo).
    pub testpmd: Option<PathBuf>,
    /// The l2fwd example to put in it (`None`: the script builds it).
    pub l2fwd: Option<PathBuf>,
    /// The cache and default output directory (`VNET_VM_DIR`; `None`: the script's
    /// default, `<cargo target dir>/vm`).
    pub vm_dir: Option<PathBuf>,
    /// The script's options for a user's image (`--add`, `--init`, `--no-bind`, `--out`);
    /// none: the default image.
    pub options: Vec<String>,
}

impl ImageBuild {
    /// With the binaries of the test's own build profile (built if needed) and the cache
    /// in `target/vm`.
    pub fn for_tests(options: Vec<String>) -> ImageBuild {
        let testpmd = workspace_bin("testpmd");
        // target/<profile>/testpmd -> target/vm
        let vm_dir = testpmd.parent().and_then(Path::parent).map(|t| t.join("vm"));
        ImageBuild {
            testpmd: Some(testpmd),
            l2fwd: Some(workspace_example("vnet-driver", "l2fwd")),
            vm_dir,
            options,
        }
    }

    /// Runs the script (bounded by [`BUILD_TIMEOUT`]); the error is one line, and the
    /// script's output follows it when it failed.
    pub fn run(&self) -> Result<Image, String> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("vm/build-image.sh");
        let dir = TempDir::new("vm-build");
        let log_path = dir.join("build-image.log");
        let log = File::create(&log_path).map_err(|e| format!("create {}: {e}", log_path.display()))?;
        let log2 = log.try_clone().map_err(|e| format!("dup log: {e}"))?;
        let t0 = Instant::now();
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .args(&self.options)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log2))
            .stderr(Stdio::from(log));
        if let Some(p) = &self.testpmd {
            cmd.env("VNET_TESTPMD", p);
        }
        if let Some(p) = &self.l2fwd {
            cmd.env("VNET_L2FWD", p);
        }
        if let Some(p) = &self.vm_dir {
            cmd.env("VNET_VM_DIR", p);
        }
        let mut child = cmd.spawn().map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let Some(status) = wait_timeout(&mut child, BUILD_TIMEOUT) else {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
            return Err(format!(
                "{} did not finish within {BUILD_TIMEOUT:?}:\n{}",
                script.display(),
                read_lossy(&log_path)
            ));
        };
        let out = read_lossy(&log_path);
        if !status.success() {
            // The script's own error line first (build-image.sh: ERROR: ...), then its output.
            let why = out.lines().rev().find(|l| l.contains("ERROR:")).unwrap_or("").trim().to_string();
            return Err(format!("{} failed ({status}): {why}\n{out}", script.display()));
        }
        let img_dir = out
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("VNET-IMAGE "))
            .map(|s| PathBuf::from(s.trim()))
            .ok_or_else(|| format!("no VNET-IMAGE line in the output of {}:\n{out}", script.display()))?;
        let image = Image::in_dir(&img_dir, t0.elapsed());
        if !(image.vmlinuz.exists() && image.initrd.exists()) {
            return Err(format!("{} lacks vmlinuz/initrd.img", img_dir.display()));
        }
        Ok(image)
    }
}

impl Image {
    /// The image in `dir` (`vmlinuz`, `initrd.img`).
    pub fn in_dir(dir: &Path, build_time: Duration) -> Image {
        Image { vmlinuz: dir.join("vmlinuz"), initrd: dir.join("initrd.img"), build_time }
    }
}

/// `mac` (aa:bb:..:ff) with `add` added to its last byte.
fn next_mac(mac: &str, add: u8) -> String {
    let (head, last) = mac.rsplit_once(':').unwrap_or((mac, "00"));
    let last = u8::from_str_radix(last, 16).unwrap_or(0).wrapping_add(add);
    format!("{head}:{last:02x}")
}

/// How to boot the guest.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The vhost-user socket (QEMU connects to it as the front-end).
    pub socket: PathBuf,
    /// Guest parameters appended to the kernel command line, e.g. `vt.fwd=txonly vt.secs=5`.
    pub params: String,
    /// vCPUs.
    pub smp: u32,
    /// Guest RAM in MiB (one shared memfd).
    pub mem_mib: u32,
    /// The NIC's MAC address.
    pub mac: String,
    /// A virtual IOMMU (`intel-iommu`) in front of the NIC (`iommu_platform=on`).
    pub viommu: bool,
    /// The NIC offers the packed virtqueue layout (`packed=on`: QEMU offers
    /// `VIRTIO_F_RING_PACKED` when the vhost-user back-end does); QEMU's default is off.
    pub packed: bool,
    /// More `virtio-net-pci` properties, comma-separated (e.g. `host_mtu=9000` or
    /// `guest_tso4=off`); empty for none.
    pub nic_opts: String,
    /// A second virtio-net device on this vhost-user socket (same options, the MAC's
    /// last byte plus one, its own root port).
    pub socket2: Option<PathBuf>,
    /// Queue pairs per device: more than 1 adds the netdev's `queues=N` and the NIC's
    /// `mq=on,vectors=2N+2`.
    pub queues: u16,
    /// The chardev reconnects to a back-end that went away (`reconnect=1`: QEMU tries
    /// again every second, and replays the device's state to the new back-end).
    pub reconnect: bool,
    /// Devices each with their own options (the VM runner's): when not empty, these are the
    /// guest's NICs instead of `socket`/`socket2` with the shared options above.
    pub nics: Vec<Nic>,
    /// `-accel kvm` instead of TCG (with `kernel-irqchip=split` under a vIOMMU, which
    /// interrupt remapping needs).
    pub kvm: bool,
}

/// One `virtio-net-pci` device on a vhost-user socket (see [`VmConfig::nics`]).
#[derive(Debug, Clone)]
pub struct Nic {
    pub socket: PathBuf,
    pub mac: String,
    pub packed: bool,
    /// Queue pairs (more than 1: `mq=on`).
    pub queues: u16,
    /// More `virtio-net-pci` properties, comma-separated (e.g. `host_mtu=9000,vectors=0`).
    pub opts: String,
}

impl VmConfig {
    /// No-IOMMU mode (no vIOMMU device; the guest loads vfio with
    /// enable_unsafe_noiommu_mode=1) with `params` for the guest's /init.
    pub fn noiommu(socket: &Path, params: &str) -> VmConfig {
        VmConfig {
            socket: socket.to_path_buf(),
            params: format!("vt.mode=noiommu {params}"),
            smp: 2,
            mem_mib: 1024,
            mac: "52:54:00:12:34:56".into(),
            viommu: false,
            packed: false,
            nic_opts: String::new(),
            socket2: None,
            queues: 1,
            reconnect: false,
            nics: Vec::new(),
            kvm: false,
        }
    }

    /// A stock Linux guest (`vt.mode=kernel`): the kernel's own `virtio_net` drives the
    /// NIC and `/bin/guest-kernel-net.sh` runs the job `params` name; one vCPU and 512 MiB
    /// (two of these share the machine's two cores with the backend). The NIC has no
    /// MSI-X vectors (`vectors=0`, legacy interrupts): Debian's QEMU 7.2 segfaults under
    /// TCG when a guest kernel enables MSI-X on a vhost-user `virtio-net-pci`
    /// (shared/notes/vm-image.md); the vhost-user protocol the backend sees is the same.
    pub fn kernel(socket: &Path, mac: &str, params: &str) -> VmConfig {
        VmConfig {
            params: format!("vt.mode=kernel {params}"),
            smp: 1,
            mem_mib: 512,
            mac: mac.to_string(),
            nic_opts: "vectors=0".into(),
            ..VmConfig::noiommu(socket, "")
        }
    }

    /// vIOMMU mode (`tests/vm/README.md`): QEMU's `intel-iommu` with interrupt
    /// remapping (VFIO type-1 refuses to attach without it) and a device IOTLB, the NIC
    /// behind it with `iommu_platform=on,ats=on`, the guest kernel with
    /// `intel_iommu=on`; the guest uses the type-1 VFIO driver.
    pub fn viommu(socket: &Path, params: &str) -> VmConfig {
        VmConfig {
            params: format!("vt.mode=viommu intel_iommu=on {params}"),
            viommu: true,
            ..VmConfig::noiommu(socket, "")
        }
    }
}

/// A running QEMU (TCG) guest; killed on drop.
pub struct Qemu {
    child: Option<Child>,
    started: Instant,
    serial_path: PathBuf,
    log_path: PathBuf,
    cmdline: Vec<String>,
    _dir: TempDir,
}

impl Qemu {
    /// Boots `image` with `cfg` under TCG: q35, a pcie-root-port with a modern-only
    /// `virtio-net-pci` (no option ROM) on `-netdev vhost-user`, guest RAM from a shared
    /// memfd (the backend maps it), serial console into a file, no display, no reboot.
    /// Panics if QEMU cannot be started.
    pub fn start(image: &Image, cfg: &VmConfig) -> Qemu {
        Qemu::try_start(image, cfg).unwrap_or_else(|e| panic!("Qemu::start: {e}"))
    }

    /// The devices of `cfg`: its [`VmConfig::nics`], or `socket` (and `socket2`) with the
    /// shared options, the MAC counting up.
    fn nics(cfg: &VmConfig) -> Vec<Nic> {
        if !cfg.nics.is_empty() {
            return cfg.nics.clone();
        }
        let mut socks = vec![cfg.socket.clone()];
        socks.extend(cfg.socket2.clone());
        socks
            .into_iter()
            .enumerate()
            .map(|(i, socket)| Nic {
                socket,
                mac: if i == 0 { cfg.mac.clone() } else { next_mac(&cfg.mac, i as u8) },
                packed: cfg.packed,
                queues: cfg.queues,
                opts: cfg.nic_opts.clone(),
            })
            .collect()
    }

    /// The QEMU arguments for `image` and `cfg`.
    pub fn args(image: &Image, cfg: &VmConfig, serial_path: &Path) -> Vec<String> {
        let mem = format!("{}M", cfg.mem_mib);
        let append = format!("console=ttyS0 panic=-1 quiet loglevel=4 {}", cfg.params);
        let machine = if cfg.kvm && cfg.viommu { "q35,kernel-irqchip=split" } else { "q35" };
        let mut args: Vec<String> = vec![
            "-accel".into(),
            if cfg.kvm { "kvm" } else { "tcg" }.into(),
            "-machine".into(),
            machine.into(),
            "-cpu".into(),
            "max".into(),
            "-smp".into(),
            cfg.smp.to_string(),
            "-m".into(),
            mem.clone(),
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            "-numa".into(),
            "node,memdev=mem".into(),
        ];
        // The IOMMU must exist before the devices behind it.
        if cfg.viommu {
            args.extend(["-device".into(), "intel-iommu,intremap=on,device-iotlb=on".into()]);
        }
        let reconnect = if cfg.reconnect { ",reconnect=1" } else { "" };
        for (i, nic) in Qemu::nics(cfg).iter().enumerate() {
            // Device i: its own chardev, netdev and root port.
            let mut dev =
                format!("virtio-net-pci,netdev=n{i},mac={},romfile=,bus=rp{i},disable-legacy=on", nic.mac);
            if nic.packed {
                dev.push_str(",packed=on");
            }
            if !nic.opts.is_empty() {
                dev.push(',');
                dev.push_str(nic.opts.trim_start_matches(','));
            }
            if cfg.viommu {
                dev.push_str(",iommu_platform=on,ats=on");
            }
            if nic.queues > 1 {
                dev.push_str(",mq=on");
                // vectors=0 in `opts` (a guest kernel's driver: legacy interrupts) stays.
                if !nic.opts.contains("vectors=") {
                    dev.push_str(&format!(",vectors={}", 2 * nic.queues + 2));
                }
            }
            let netq = if nic.queues > 1 { format!(",queues={}", nic.queues) } else { String::new() };
            args.extend([
                "-chardev".into(),
                format!("socket,id=c{i},path={}{reconnect}", nic.socket.display()),
                "-netdev".into(),
                format!("vhost-user,id=n{i},chardev=c{i}{netq}"),
                "-device".into(),
                format!("pcie-root-port,id=rp{i},chassis={},slot={}", i + 1, i + 1),
                "-device".into(),
                dev,
            ]);
        }
        args.extend([
            "-kernel".into(),
            image.vmlinuz.display().to_string(),
            "-initrd".into(),
            image.initrd.display().to_string(),
            "-append".into(),
            append,
            "-nographic".into(),
            "-serial".into(),
            format!("file:{}", serial_path.display()),
            "-monitor".into(),
            "none".into(),
            "-no-reboot".into(),
        ]);
        args
    }

    /// [`Qemu::start`], with the error instead of a panic when QEMU cannot be started.
    pub fn try_start(image: &Image, cfg: &VmConfig) -> Result<Qemu, String> {
        let dir = TempDir::new("vm-qemu");
        let serial_path = dir.join("serial.log");
        let log_path = dir.join("qemu.log");
        let args = Qemu::args(image, cfg, &serial_path);
        let log = File::create(&log_path).map_err(|e| format!("create {}: {e}", log_path.display()))?;
        let log2 = log.try_clone().map_err(|e| format!("dup qemu.log: {e}"))?;
        let child = Command::new("qemu-system-x86_64")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log2))
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("cannot run qemu-system-x86_64 ({e}); apt-get install qemu-system-x86"))?;
        let mut cmdline = vec!["qemu-system-x86_64".to_string()];
        cmdline.extend(args);
        Ok(Qemu { child: Some(child), started: Instant::now(), serial_path, log_path, cmdline, _dir: dir })
    }

    /// The serial console so far, without carriage returns.
    pub fn serial(&self) -> String {
        read_lossy(&self.serial_path).replace('\r', "")
    }

    /// QEMU's own stdout/stderr so far.
    pub fn qemu_log(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// The QEMU command line.
    pub fn cmdline(&self) -> String {
        self.cmdline.join(" ")
    }

    /// The QEMU command line, one argument each.
    pub fn argv(&self) -> &[String] {
        &self.cmdline
    }

    /// QEMU's exit status once it has exited (`None` while it runs).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Time since QEMU was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Whether QEMU has exited.
    pub fn has_exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// Waits until the serial console contains `pattern` (a substring: the console may
    /// prefix lines with escape codes); returns the time since QEMU started. Panics with
    /// the console and QEMU's log if the guest reports "VNET-RESULT FAIL" or QEMU exits
    /// first, or `timeout` passes.
    pub fn wait_serial(&mut self, pattern: &str, timeout: Duration) -> Duration {
        let deadline = Instant::now() + timeout;
        loop {
            let serial = self.serial();
            if serial.contains(pattern) {
                return self.elapsed();
            }
            if let Some(reason) = GuestReport::new(serial).marker("VNET-RESULT FAIL") {
                panic!("the guest failed ({reason}) before printing {pattern:?}\n{}", self.diagnostics());
            }
            if self.has_exited() {
                // One last look: the file may have grown right before the exit.
                if self.serial().contains(pattern) {
                    return self.elapsed();
                }
                panic!("QEMU exited before the guest printed {pattern:?}\n{}", self.diagnostics());
            }
            if Instant::now() >= deadline {
                panic!("the guest did not print {pattern:?} within {timeout:?}\n{}", self.diagnostics());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits (max `timeout`, then kills it and panics) for QEMU to exit; returns its
    /// status and the time since it started.
    pub fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, Duration) {
        let child = self.child.as_mut().expect("Qemu::wait_exit: already reaped");
        match wait_timeout(child, timeout) {
            Some(st) => (st, self.started.elapsed()),
            None => {
                self.kill();
                panic!("QEMU did not exit within {timeout:?} (killed)\n{}", self.diagnostics());
            }
        }
    }

    /// Kills QEMU (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                signal(c.id(), libc::SIGKILL);
            }
            let _ = c.wait();
        }
    }

    /// The command line, QEMU's log and the serial console, for failure messages.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- QEMU command line\n{}\n--- QEMU log\n{}\n--- serial console\n{}",
            self.cmdline(),
            self.qemu_log(),
            self.serial()
        )
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What the guest's /init printed (see tests/vm/guest-init.sh).
#[derive(Debug, Clone)]
pub struct GuestReport {
    /// The whole serial console.
    pub serial: String,
}

impl GuestReport {
    pub fn new(serial: String) -> GuestReport {
        GuestReport { serial }
    }

    /// The text after the first occurrence of `marker` on its line (`None` if absent).
    pub fn marker(&self, marker: &str) -> Option<String> {
        self.serial.lines().find_map(|l| l.find(marker).map(|i| l[i + marker.len()..].trim().to_string()))
    }

    /// `Some(true)` for "VNET-RESULT PASS", `Some(false)` for FAIL, `None` if absent.
    pub fn passed(&self) -> Option<bool> {
        self.marker("VNET-RESULT ").map(|r| r.starts_with("PASS"))
    }

    /// testpmd's output: the lines between the BEGIN and END markers, without the
    /// "TP| " / "TP! " prefixes.
    pub fn testpmd_output(&self) -> String {
        let mut out = String::new();
        let mut inside = false;
        for l in self.serial.lines() {
            if l.contains("VNET-TESTPMD BEGIN") {
                inside = true;
            } else if l.contains("VNET-TESTPMD END") {
                inside = false;
            } else if inside {
                out.push_str(l.strip_prefix("TP| ").or_else(|| l.strip_prefix("TP! ")).unwrap_or(l));
                out.push('\n');
            }
        }
        out
    }

    /// testpmd's exit code from the END marker.
    pub fn testpmd_rc(&self) -> Option<i32> {
        let end = self.marker("VNET-TESTPMD END rc=")?;
        end.split_whitespace().next()?.parse().ok()
    }

    /// The `{"type":"forward_stats",...}` object testpmd printed at stop.
    pub fn forward_stats(&self) -> Option<Value> {
        self.serial.lines().filter(|l| l.starts_with("TP| ")).find_map(|l| {
            let i = l.find('{')?;
            let v: Value = serde_json::from_str(&l[i..]).ok()?;
            (v.get("type").and_then(Value::as_str) == Some("forward_stats")).then_some(v)
        })
    }

    /// `port`'s counter `name` in the forward stats (rx_packets, rx_dropped, tx_packets,
    /// tx_dropped); panics with the console if missing.
    pub fn fwd_counter(&self, port: usize, name: &str) -> u64 {
        let fs = self
            .forward_stats()
            .unwrap_or_else(|| panic!("the guest's testpmd printed no forward_stats line\n{}", self.serial));
        fs.get("ports")
            .and_then(|p| p.get(port))
            .and_then(|p| p.get(name))
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("forward_stats has no ports[{port}].{name}: {fs}"))
    }

    /// Guest uptime (s) printed with the marker's `start=`/`end=`/`uptime=` field.
    pub fn field(&self, marker: &str, key: &str) -> Option<f64> {
        self.value(marker, key)?.parse().ok()
    }

    /// The `key=value` field `key` on the marker's line, as text.
    pub fn value(&self, marker: &str, key: &str) -> Option<String> {
        let rest = self.marker(marker)?;
        rest.split_whitespace().find_map(|w| Some(w.strip_prefix(key)?.strip_prefix('=')?.to_string()))
    }
}

fn read_lossy(p: &Path) -> String {
    std::fs::read(p).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
}
