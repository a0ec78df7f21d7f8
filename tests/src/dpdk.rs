//! DPDK `dpdk-testpmd` (22.11, Debian package `dpdk-dev`) as a peer process.
//!
//! [`Testpmd`] runs testpmd in interactive mode with one vhost-user vdev: either the
//! virtio-user PMD (a guest-like front-end that connects to a socket) or the vhost PMD
//! (a back-end that listens on one). Commands go through a FIFO that we hold open for
//! reading and writing, so testpmd never sees EOF on stdin. stdout and stderr go to a
//! log file; testpmd runs under `stdbuf -oL` so that its printf output reaches the log
//! line by line instead of at exit (glibc block-buffers a redirected stdout).
//!
//! EAL runs with `--in-memory`: hugepages are memfd-backed (virtio-user still passes
//! them to the back-end by fd), so even a killed testpmd leaves no hugepage files.
//! [`Drop`] removes `/dev/hugepages/<prefix>map_*` and `/var/run/dpdk/<prefix>` anyway.
//!
//! [`Testpmd::quit`] returns the per-port counters of the last "Forward statistics for
//! port 0" block that `stop` prints, which in 22.11 looks like this:
//!
//! ```text
//!   ---------------------- Forward statistics for port 0  ----------------------
//!   RX-packets: 0              RX-dropped: 0             RX-total: 0
//!   TX-packets: 17074112       TX-dropped: 694016        TX-total: 17768128
//!   ----------------------------------------------------------------------------
//! ```
//!
//! The counters are deltas since the `start` command: RX-packets/TX-packets are the
//! port's ipackets/opackets, RX-dropped is its imissed (always 0 for virtio-user), and
//! TX-dropped counts packets the forwarding engine built or received but could not place
//! in the TX ring (testpmd frees them).

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::{signal, wait_timeout, TempDir};

/// Which DPDK PMD testpmd drives, and the vhost-user socket it uses.
pub enum Role {
    /// `net_virtio_user0,path=P,queues=N`: the front-end; connects to a listening back-end.
    VirtioUser { path: PathBuf, queues: u16 },
    /// `net_vhost0,iface=P,queues=N`: the back-end; creates and listens on the socket.
    Vhost { path: PathBuf, queues: u16 },
}

/// Per-port totals printed by testpmd's `stop` (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PortCounts {
    pub rx_packets: u64,
    /// "RX-dropped": the port's imissed.
    pub rx_dropped: u64,
    pub tx_packets: u64,
    /// "TX-dropped": packets the engine could not place in the TX ring.
    pub tx_dropped: u64,
}

/// A running `dpdk-testpmd` with one port (port 0).
pub struct Testpmd {
    child: Option<Child>,
    pid: u32,
    /// The command FIFO, opened read+write and held so testpmd never reads EOF.
    fifo: Option<File>,
    log_path: PathBuf,
    prefix: String,
    _dir: TempDir,
}

impl Testpmd {
    /// Starts `dpdk-testpmd` in interactive mode (see the module doc for the details):
    /// EAL `--lcores=0@M,1@F` (main lcore on another cpu than the forwarding lcore on
    /// `fwd_cpu`), `--no-pci --file-prefix=vnettest-<pid>-<n> -m 256 --in-memory`,
    /// `--single-file-segments` for virtio-user, and app args `-i --nb-cores=1 --rxq=N
    /// --txq=N --txpkts=<pkt_size> --total-num-mbufs=16384` plus `extra_app_args`.
    /// Panics if dpdk-testpmd is not installed, if it exits early, or if the prompt
    /// "testpmd>" does not appear within 30 s.
    pub fn start(role: Role, pkt_size: u16, fwd_cpu: u32, extra_app_args: &[&str]) -> Testpmd {
        Testpmd::start_with_devargs(role, "", pkt_size, fwd_cpu, extra_app_args)
    }

    /// Like [`Testpmd::start`], with extra vdev arguments appended to the `--vdev`
    /// string (e.g. `"packed_vq=1"` or `"mrg_rxbuf=0"` for virtio-user).
    pub fn start_with_devargs(
        role: Role,
        devargs: &str,
        pkt_size: u16,
        fwd_cpu: u32,
        extra_app_args: &[&str],
    ) -> Testpmd {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let testpmd = find_in_path("dpdk-testpmd").unwrap_or_else(|| {
            panic!(
                "dpdk-testpmd is not installed (not in PATH). It comes from the Debian package \
                 `dpdk-dev` (`apt-get install dpdk dpdk-dev`); .ci/run installs it."
            )
        });
        let prefix = format!("vnettest-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed));
        let dir = TempDir::new("testpmd");
        let fifo_path = dir.join("cmd.fifo");
        make_fifo(&fifo_path);
        // Opening a FIFO O_RDWR never blocks on Linux; with this writer held open, the
        // read-only open for testpmd's stdin does not block either.
        let fifo = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo_path)
            .unwrap_or_else(|e| panic!("Testpmd: open {} rw: {e}", fifo_path.display()));
        let stdin = File::open(&fifo_path)
            .unwrap_or_else(|e| panic!("Testpmd: open {} ro: {e}", fifo_path.display()));
        let log_path = dir.join("testpmd.log");
        let log =
            File::create(&log_path).unwrap_or_else(|e| panic!("Testpmd: create {}: {e}", log_path.display()));
        let log2 = log.try_clone().expect("Testpmd: dup log fd");

        let main_cpu = other_cpu(fwd_cpu);
        let mut eal: Vec<String> = vec![
            format!("--lcores=0@{main_cpu},1@{fwd_cpu}"),
            "--no-pci".into(),
            format!("--file-prefix={prefix}"),
            "-m".into(),
            "256".into(),
            "--in-memory".into(),
        ];
        let sep = if devargs.is_empty() { "" } else { "," };
        let (vdev, queues) = match &role {
            Role::VirtioUser { path, queues } => {
                // Without it every 2 MiB page is one memory region and vhost-user allows 8.
                eal.push("--single-file-segments".into());
                (format!("net_virtio_user0,path={},queues={queues}{sep}{devargs}", path.display()), *queues)
            }
            Role::Vhost { path, queues } => {
                (format!("net_vhost0,iface={},queues={queues}{sep}{devargs}", path.display()), *queues)
            }
        };
        eal.extend(["--vdev".into(), vdev]);
        let mut app: Vec<String> = vec![
            "-i".into(),
            "--nb-cores=1".into(),
            format!("--rxq={queues}"),
            format!("--txq={queues}"),
            format!("--txpkts={pkt_size}"),
            "--total-num-mbufs=16384".into(),
        ];
        app.extend(extra_app_args.iter().map(|s| s.to_string()));

        let mut cmd = match find_in_path("stdbuf") {
            Some(stdbuf) => {
                let mut c = Command::new(stdbuf);
                c.arg("-oL").arg(&testpmd);
                c
            }
            None => Command::new(&testpmd),
        };
        cmd.args(&eal)
            .arg("--")
            .args(&app)
            .stdin(Stdio::from(stdin))
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let cmdline = format!("{cmd:?}");
        let child = cmd.spawn().unwrap_or_else(|e| panic!("Testpmd: spawn {cmdline}: {e}"));
        drop(cmd); // closes our copy of the read end
        let pid = child.id();
        let mut t = Testpmd { child: Some(child), pid, fifo: Some(fifo), log_path, prefix, _dir: dir };

        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = t.log();
            if log.contains("testpmd>") {
                if log.contains("No probed ethernet devices") {
                    panic!("testpmd could not create its port: {cmdline}\nlog:\n{log}");
                }
                break;
            }
            if t.has_exited() {
                panic!(
                    "testpmd exited during start-up: {cmdline}\n(free 2 MiB hugepages: {})\nlog:\n{log}",
                    free_hugepages()
                );
            }
            if Instant::now() > deadline {
                panic!("testpmd: no prompt within 30 s: {cmdline}\nlog:\n{log}");
            }
            thread::sleep(Duration::from_millis(50));
        }
        t
    }

    /// Writes one command line to testpmd's stdin FIFO.
    pub fn cmd(&mut self, line: &str) {
        let fifo = self.fifo.as_mut().expect("Testpmd::cmd: FIFO open");
        fifo.write_all(format!("{line}\n").as_bytes())
            .unwrap_or_else(|e| panic!("Testpmd::cmd({line:?}): write to FIFO: {e}"));
    }

    /// Polls the log every 50 ms until it contains `pattern`; false after `timeout`.
    pub fn wait_log(&self, pattern: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(pattern) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Number of times `pattern` occurs in the log so far.
    pub fn log_count(&self, pattern: &str) -> usize {
        self.log().matches(pattern).count()
    }

    /// Sends "stop" then "quit", waits for exit (max 15 s, then SIGKILL), and returns
    /// the counters of the last "Forward statistics for port" block in the log (the one
    /// printed by the last `stop` that had forwarding to stop). Panics with the log if
    /// there is none.
    pub fn quit(mut self) -> PortCounts {
        self.cmd("stop");
        self.cmd("quit");
        let mut child = self.child.take().expect("Testpmd::quit: child present");
        if wait_timeout(&mut child, Duration::from_secs(15)).is_none() {
            eprintln!("testpmd {} did not quit within 15 s: killing it", self.pid);
            signal(self.pid, libc::SIGKILL);
            let _ = child.wait();
        }
        let log = self.log();
        parse_forward_stats(&log)
            .unwrap_or_else(|| panic!("no \"Forward statistics\" block in testpmd log:\n{log}"))
    }

    /// Everything testpmd printed so far (stdout and stderr).
    pub fn log(&self) -> String {
        match std::fs::read(&self.log_path) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) => format!("<cannot read {}: {e}>", self.log_path.display()),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The EAL `--file-prefix` of this instance.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn has_exited(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                signal(self.pid, libc::SIGKILL);
            }
            let _ = child.wait();
        }
        self.fifo = None;
        let file_prefix = format!("{}map_", self.prefix);
        if let Ok(entries) = std::fs::read_dir("/dev/hugepages") {
            for e in entries.flatten() {
                if e.file_name().as_bytes().starts_with(file_prefix.as_bytes()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir_all(Path::new("/var/run/dpdk").join(&self.prefix));
    }
}

/// Parses the last "Forward statistics for port" block (or, failing that, the last
/// "Accumulated forward statistics for all ports" block) of a testpmd log.
pub fn parse_forward_stats(log: &str) -> Option<PortCounts> {
    let start = log
        .rfind("Forward statistics for port")
        .or_else(|| log.rfind("Accumulated forward statistics for all ports"))?;
    // The block is the lines after the header up to the closing border line.
    let block: Vec<&str> = log[start..]
        .lines()
        .skip(1)
        .take_while(|l| {
            let t = l.trim_start();
            !(t.starts_with("----") || t.starts_with("++++"))
        })
        .collect();
    let block = block.join("\n");
    Some(PortCounts {
        rx_packets: field(&block, "RX-packets:")?,
        rx_dropped: field(&block, "RX-dropped:")?,
        tx_packets: field(&block, "TX-packets:")?,
        tx_dropped: field(&block, "TX-dropped:")?,
    })
}

/// The number after `key` (testpmd pads with `%-14` so wide numbers can run straight
/// into the next key, e.g. "RX-dropped: 123456789012345RX-total:").
fn field(block: &str, key: &str) -> Option<u64> {
    let rest = &block[block.find(key)? + key.len()..];
    let digits: String = rest.trim_start().chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// The cpu for testpmd's main (CLI) lcore: a different one than `fwd_cpu` when the
/// machine has more than one.
fn other_cpu(fwd_cpu: u32) -> u32 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if n > 1 {
        (fwd_cpu + 1) % n as u32
    } else {
        fwd_cpu
    }
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/usr/local/bin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn make_fifo(path: &Path) {
    let c = CString::new(path.as_os_str().as_bytes()).expect("FIFO path has no NUL");
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    if rc != 0 {
        panic!("mkfifo {}: {}", path.display(), std::io::Error::last_os_error());
    }
}

fn free_hugepages() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("HugePages_Free:"))
                .map(|l| l["HugePages_Free:".len()..].trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::serial;

    /// Output of DPDK 22.11.11 testpmd (virtio-user, txonly) at `stop`, then `quit`.
    const STOP_OUTPUT: &str = "\
Telling cores to stop...
Waiting for lcores to finish...

  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 0              RX-dropped: 0             RX-total: 0
  TX-packets: 17074112       TX-dropped: 694016        TX-total: 17768128
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 0              RX-dropped: 0             RX-total: 0
  TX-packets: 17074112       TX-dropped: 694016        TX-total: 17768128
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++

Done.

  ######################## NIC statistics for port 0  ########################
  RX-packets: 0          RX-missed: 0          RX-bytes:  0
  RX-errors: 0
  RX-nombuf:  0         
  TX-packets: 17074112   TX-errors: 0          TX-bytes:  1092743168
  ############################################################################
testpmd> quit
Packet forwarding not started
";

    #[test]
    fn parses_stop_block() {
        let c = parse_forward_stats(STOP_OUTPUT).expect("block found");
        assert_eq!(c, PortCounts { rx_packets: 0, rx_dropped: 0, tx_packets: 17074112, tx_dropped: 694016 });
        assert_eq!(parse_forward_stats("testpmd> quit\nBye...\n"), None);
        // Wide numbers run into the next key; an RX-error line may appear.
        let wide = "  ---- Forward statistics for port 0  ----\n  RX-packets: 123456789012345RX-dropped: 7             RX-total: 1\n  RX-error: 0\n  RX-nombufs: 3\n  TX-packets: 5              TX-dropped: 6             TX-total: 11\n  ----\n";
        let c = parse_forward_stats(wide).expect("block found");
        assert_eq!(c.rx_packets, 123456789012345);
        assert_eq!(c.rx_dropped, 7);
        assert_eq!(c.tx_packets, 5);
        assert_eq!(c.tx_dropped, 6);
    }

    /// DPDK against DPDK: validates the harness (start-up, FIFO commands, the parsed
    /// counters) on real testpmd output, independent of our own code. It is the DPDK-only
    /// mirror of `dpdk_io_through_reflect` (tests/dpdk_backend.rs), with the vhost PMD in
    /// `io` mode in the place of our reflect port: the virtio-user side injects 2 bursts
    /// (64 frames) with `start tx_first 2` into an `io` loop. 64 frames never fill a
    /// 256-entry ring, so nothing is dropped; after the virtio-user side stops, the vhost
    /// side moves every frame into its RX ring, and the counters balance exactly.
    #[test]
    fn testpmd_vhost_virtio_user_io_loop() {
        const INJECTED: u64 = 64;
        let _serial = serial();
        let dir = TempDir::new("dpdk-self");
        let sock = dir.join("vhost.sock");
        let mut host = Testpmd::start(Role::Vhost { path: sock.clone(), queues: 1 }, 64, 1, &[]);
        let mut guest = Testpmd::start(Role::VirtioUser { path: sock.clone(), queues: 1 }, 64, 0, &[]);
        assert!(
            host.wait_log("virtio is now ready", Duration::from_secs(10)),
            "vhost side never became ready:\n{}",
            host.log()
        );
        host.cmd("set fwd io");
        host.cmd("start");
        assert!(host.wait_log("io packet forwarding - ports", Duration::from_secs(5)));
        guest.cmd("set fwd io");
        guest.cmd("start tx_first 2");
        thread::sleep(Duration::from_secs(1));
        guest.cmd("stop");
        assert!(
            guest.wait_log("Forward statistics for port 0", Duration::from_secs(5)),
            "virtio-user stop printed no stats:\n{}",
            guest.log()
        );
        // The vhost side moves what is left in the guest's TX ring to its RX ring.
        thread::sleep(Duration::from_millis(300));
        host.cmd("stop");
        assert!(host.wait_log("Forward statistics for port 0", Duration::from_secs(5)));
        let g = guest.quit();
        let h = host.quit();
        eprintln!("vhost: {h:?}\nvirtio-user: {g:?}");
        assert!(g.rx_packets > INJECTED * 100, "the loop hardly ran: {g:?}");
        assert_eq!((h.rx_dropped, h.tx_dropped), (0, 0), "{h:?}");
        assert_eq!((g.rx_dropped, g.tx_dropped), (0, 0), "{g:?}");
        assert_eq!(g.tx_packets, g.rx_packets + INJECTED, "virtio-user: tx = rx + injected");
        assert_eq!(h.rx_packets, g.tx_packets, "vhost received all virtio-user sent");
        assert_eq!(h.tx_packets, h.rx_packets, "vhost io forwards every frame");
        assert_eq!(h.tx_packets, g.rx_packets + INJECTED, "injected frames left in the RX ring");
    }
}
