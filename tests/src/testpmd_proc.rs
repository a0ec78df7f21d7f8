//! Our `testpmd` binary as a child process of a test.
//!
//! [`Testpmd`] spawns `target/<profile>/testpmd` (built like [`workspace_bin`] does) with
//! stdout and stderr captured by reader threads, optionally with stdin piped (for the
//! `-i` prompt) and optionally as another user. Every wait is bounded: on a timeout the
//! process is killed and the test panics with both outputs; dropping a [`Testpmd`] kills
//! a process that still runs, so it never outlives its test.
//!
//! The parsers read what testpmd prints: the port MAC of `show port info`
//! ("MAC address: 52:54:00:12:34:56"), the "Forward statistics for port N" blocks (DPDK's
//! layout, read with [`crate::dpdk::parse_forward_stats`]), the "NIC statistics for
//! port N" blocks, and the `{"type":"forward_stats",...}` JSON line.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::dpdk::{parse_forward_stats, PortCounts};
use crate::harness::{signal, wait_timeout, workspace_bin};

/// The `testpmd` binary of this workspace (built if needed).
pub fn testpmd_bin() -> PathBuf {
    workspace_bin("testpmd")
}

/// How to spawn testpmd.
#[derive(Debug, Clone, Default)]
pub struct Spawn {
    /// Pipe stdin (for `-i`); otherwise stdin is /dev/null.
    pub stdin: bool,
    /// Run as this (uid, gid) instead of ours (supplementary groups are cleared).
    pub user: Option<(u32, u32)>,
}

/// How a testpmd run ended.
#[derive(Debug)]
pub struct Exit {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything it printed on stdout.
    pub stdout: String,
    /// Everything it printed on stderr.
    pub stderr: String,
}

impl Exit {
    /// The exit code (panics, printing the outputs, if a signal ended the process).
    pub fn code(&self) -> i32 {
        self.status.code().unwrap_or_else(|| panic!("testpmd ended by a signal: {}\n{}", self.status, self))
    }
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "--- testpmd stdout ---\n{}\n--- testpmd stderr ---\n{}", self.stdout, self.stderr)
    }
}

/// A running `testpmd`.
pub struct Testpmd {
    child: Option<Child>,
    pid: u32,
    args: Vec<String>,
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
}

fn lock(m: &Mutex<String>) -> std::sync::MutexGuard<'_, String> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn reader(mut r: impl Read + Send + 'static, into: Arc<Mutex<String>>, name: String) -> JoinHandle<()> {
    thread::Builder::new()
        .name(name)
        .spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => lock(&into).push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
        })
        .expect("spawn a testpmd output reader")
}

impl Testpmd {
    /// Spawns testpmd with `args`, stdin from /dev/null.
    pub fn spawn(args: &[&str]) -> Testpmd {
        Testpmd::spawn_with(args, Spawn::default())
    }

    /// Spawns testpmd with `args` and the options of `how`. `RUST_LOG` is removed from
    /// its environment so stderr carries only what testpmd itself prints.
    pub fn spawn_with(args: &[&str], how: Spawn) -> Testpmd {
        Testpmd::spawn_program(&testpmd_bin(), args, how)
    }

    /// As [`Testpmd::spawn_with`] for another program run the same way (the driver's
    /// `l2fwd` example: outputs captured, stopped by a signal, killed on drop).
    pub fn spawn_program(bin: &std::path::Path, args: &[&str], how: Spawn) -> Testpmd {
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .env_remove("RUST_LOG")
            .stdin(if how.stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some((uid, gid)) = how.user {
            // std clears the supplementary groups when root drops to another uid.
            cmd.uid(uid).gid(gid);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {} {args:?}: {e}", bin.display()));
        let pid = child.id();
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            reader(child.stdout.take().expect("piped stdout"), stdout.clone(), format!("testpmd-{pid}-out")),
            reader(child.stderr.take().expect("piped stderr"), stderr.clone(), format!("testpmd-{pid}-err")),
        ];
        let stdin = child.stdin.take();
        Testpmd {
            child: Some(child),
            pid,
            args: args.iter().map(|s| s.to_string()).collect(),
            stdin,
            stdout,
            stderr,
            readers,
        }
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// stdout so far.
    pub fn stdout(&self) -> String {
        lock(&self.stdout).clone()
    }

    /// stderr so far.
    pub fn stderr(&self) -> String {
        lock(&self.stderr).clone()
    }

    /// Both outputs, for failure messages.
    pub fn outputs(&self) -> String {
        format!(
            "testpmd {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.args,
            self.stdout(),
            self.stderr()
        )
    }

    /// Writes `line` and a newline to stdin (needs [`Spawn::stdin`]).
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("Testpmd::send: stdin is not piped");
        if let Err(e) = stdin.write_all(format!("{line}\n").as_bytes()).and_then(|_| stdin.flush()) {
            panic!("Testpmd::send({line:?}): {e}\n{}", self.outputs());
        }
    }

    /// Whether the process still runs.
    pub fn running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits until stdout contains `pattern` `count` times; panics with the outputs after
    /// `timeout` or as soon as testpmd has exited without printing it.
    pub fn wait_stdout_n(&mut self, pattern: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stdout().matches(pattern).count() >= count {
                return;
            }
            if !self.running() {
                // The readers may still be copying the last output.
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                if self.stdout().matches(pattern).count() >= count {
                    return;
                }
                panic!("testpmd exited before printing {pattern:?} (x{count}):\n{}", self.outputs());
            }
            if Instant::now() >= deadline {
                panic!(
                    "testpmd did not print {pattern:?} (x{count}) within {timeout:?}:\n{}",
                    self.outputs()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until stdout contains `pattern` (see [`Testpmd::wait_stdout_n`]).
    pub fn wait_stdout(&mut self, pattern: &str, timeout: Duration) {
        self.wait_stdout_n(pattern, 1, timeout)
    }

    /// Sends `sig` (e.g. `libc::SIGINT`).
    pub fn signal(&self, sig: libc::c_int) {
        if self.child.is_some() {
            signal(self.pid, sig);
        }
    }

    /// Closes stdin (end of input for the prompt).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits at most `timeout` for the process to exit and returns how it ended; on a
    /// timeout kills it and panics with its outputs.
    pub fn wait(mut self, timeout: Duration) -> Exit {
        let mut child = self.child.take().expect("Testpmd::wait: child present");
        let status = match wait_timeout(&mut child, timeout) {
            Some(st) => st,
            None => {
                signal(self.pid, libc::SIGKILL);
                let _ = child.wait();
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
                panic!("testpmd did not exit within {timeout:?} (killed):\n{}", self.outputs());
            }
        };
        self.stdin = None;
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Exit { status, stdout: self.stdout(), stderr: self.stderr() }
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        self.stdin = None;
        if let Some(mut c) = self.child.take() {
            if matches!(c.try_wait(), Ok(None)) {
                signal(self.pid, libc::SIGKILL);
            }
            let _ = c.wait();
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

/// Runs testpmd with `args` to completion (stdin /dev/null), at most `timeout`.
pub fn run(args: &[&str], timeout: Duration) -> Exit {
    Testpmd::spawn(args).wait(timeout)
}

/// The MAC address testpmd printed for `port` ("Infos for port N" ... "MAC address: ..").
pub fn port_mac(stdout: &str, port: usize) -> Option<[u8; 6]> {
    let start = stdout.find(&format!("Infos for port {port} "))?;
    let rest = &stdout[start..];
    let line = rest.lines().find_map(|l| l.strip_prefix("MAC address: "))?;
    let parts: Vec<u8> =
        line.trim().split(':').map(|p| u8::from_str_radix(p, 16)).collect::<Result<_, _>>().ok()?;
    parts.try_into().ok()
}

/// The text from `header` up to (not including) the next statistics header, if any.
fn block<'a>(text: &'a str, header: &str) -> Option<&'a str> {
    let start = text.rfind(header)?;
    let rest = &text[start..];
    let end = ["Forward statistics for port", "Accumulated forward statistics", "NIC statistics for port"]
        .iter()
        .filter_map(|h| rest[header.len()..].find(h).map(|i| i + header.len()))
        .min()
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

/// The last "Forward statistics for port `port`" block of testpmd's text output.
pub fn forward_stats(stdout: &str, port: usize) -> Option<PortCounts> {
    parse_forward_stats(block(stdout, &format!("Forward statistics for port {port} "))?)
}

/// The last "Accumulated forward statistics for all ports" block.
pub fn accumulated_forward_stats(stdout: &str) -> Option<PortCounts> {
    parse_forward_stats(block(stdout, "Accumulated forward statistics for all ports")?)
}

/// The "TX-lost-in-flight" of port `port`'s last NIC statistics block in `stdout` (0
/// when absent: testpmd prints the line only when it is not 0).
pub fn tx_lost(stdout: &str, port: usize) -> u64 {
    let key = format!("NIC statistics for port {port} ");
    let Some(at) = stdout.rfind(&key) else { return 0 };
    let block = &stdout[at..];
    let end = block[key.len()..].find("NIC statistics for port").map_or(block.len(), |e| e + key.len());
    number_after(&block[..end], "TX-lost-in-flight:").unwrap_or(0)
}

/// Checks testpmd's exit lines "Port P: buffers free in pool: X of Y" for ports
/// `0..ports`: each present, X == Y (every pool whole).
pub fn assert_pools_whole(stdout: &str, ports: usize) {
    for p in 0..ports {
        let key = format!("Port {p}: buffers free in pool: ");
        let line =
            stdout.lines().rev().find(|l| l.starts_with(&key)).unwrap_or_else(|| panic!("no {key:?} line"));
        let (free, cap) = line[key.len()..].split_once(" of ").expect("X of Y");
        assert_eq!(free.trim(), cap.trim(), "port {p}: pool not whole at exit: {line}");
    }
}

/// `key` followed by a number in `text` (first occurrence).
pub fn number_after(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    let digits: String = rest.trim_start().chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// The "RX-total:" and "TX-total:" values of the last "Forward statistics for port
/// `port`" block.
pub fn forward_totals(stdout: &str, port: usize) -> Option<(u64, u64)> {
    let b = block(stdout, &format!("Forward statistics for port {port} "))?;
    Some((number_after(b, "RX-total:")?, number_after(b, "TX-total:")?))
}

/// NIC statistics of one port (`show port stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NicStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub rx_errors: u64,
    pub rx_nombuf: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
}

/// The last "NIC statistics for port `port`" block.
pub fn nic_stats(stdout: &str, port: usize) -> Option<NicStats> {
    let b = block(stdout, &format!("NIC statistics for port {port} "))?;
    Some(NicStats {
        rx_packets: number_after(b, "RX-packets:")?,
        rx_bytes: number_after(b, "RX-bytes:")?,
        rx_errors: number_after(b, "RX-errors:")?,
        rx_nombuf: number_after(b, "RX-nombuf:")?,
        tx_packets: number_after(b, "TX-packets:")?,
        tx_bytes: number_after(b, "TX-bytes:")?,
    })
}

/// The last `{"type":"forward_stats",...}` line (`--stats-format json`).
pub fn forward_stats_json(stdout: &str) -> Option<Value> {
    stdout
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .find(|v| v.get("type").and_then(Value::as_str) == Some("forward_stats"))
}

/// Per-port counts of a JSON forward_stats object.
pub fn json_port_counts(v: &Value) -> Vec<PortCounts> {
    let n = |p: &Value, k: &str| p[k].as_u64().unwrap_or_else(|| panic!("forward_stats: no {k} in {p}"));
    v["ports"]
        .as_array()
        .unwrap_or_else(|| panic!("forward_stats without ports: {v}"))
        .iter()
        .map(|p| PortCounts {
            rx_packets: n(p, "rx_packets"),
            rx_dropped: n(p, "rx_dropped"),
            tx_packets: n(p, "tx_packets"),
            tx_dropped: n(p, "tx_dropped"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "
********************* Infos for port 0  *********************
MAC address: 52:54:00:12:34:5A
Device: virtio-user /tmp/x.sock

********************* Infos for port 1  *********************
MAC address: 52:54:00:12:34:5B

  ######################## NIC statistics for port 0  ########################
  RX-packets: 1000       RX-missed: 0          RX-bytes:  100000
  RX-errors: 0
  RX-nombuf:  0         
  TX-packets: 0          TX-errors: 0          TX-bytes:  0
  ############################################################################

  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 10             RX-dropped: 1              RX-total: 11
  TX-packets: 9              TX-dropped: 0              TX-total: 9
  ----------------------------------------------------------------------------

  ---------------------- Forward statistics for port 1  ----------------------
  RX-packets: 20             RX-dropped: 0              RX-total: 20
  TX-packets: 30             TX-dropped: 2              TX-total: 32
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 30             RX-dropped: 1              RX-total: 31
  TX-packets: 39             TX-dropped: 2              TX-total: 41
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++
{\"type\":\"forward_stats\",\"seconds\":1.0,\"ports\":[{\"port\":0,\"rx_packets\":1,\"rx_dropped\":0,\"tx_packets\":2,\"tx_dropped\":3}]}
";

    #[test]
    fn parses_testpmd_output() {
        assert_eq!(port_mac(OUT, 0), Some([0x52, 0x54, 0, 0x12, 0x34, 0x5a]));
        assert_eq!(port_mac(OUT, 1), Some([0x52, 0x54, 0, 0x12, 0x34, 0x5b]));
        assert_eq!(port_mac(OUT, 2), None);
        let p0 = forward_stats(OUT, 0).unwrap();
        assert_eq!((p0.rx_packets, p0.rx_dropped, p0.tx_packets, p0.tx_dropped), (10, 1, 9, 0));
        let p1 = forward_stats(OUT, 1).unwrap();
        assert_eq!((p1.rx_packets, p1.rx_dropped, p1.tx_packets, p1.tx_dropped), (20, 0, 30, 2));
        let acc = accumulated_forward_stats(OUT).unwrap();
        assert_eq!((acc.rx_packets, acc.tx_packets), (30, 39));
        assert_eq!(forward_totals(OUT, 1), Some((20, 32)));
        let nic = nic_stats(OUT, 0).unwrap();
        assert_eq!((nic.rx_packets, nic.rx_bytes, nic.tx_packets), (1000, 100000, 0));
        assert_eq!(nic_stats(OUT, 1), None);
        let j = forward_stats_json(OUT).unwrap();
        let c = json_port_counts(&j);
        assert_eq!((c[0].rx_packets, c[0].tx_packets, c[0].tx_dropped), (1, 2, 3));
    }
}
