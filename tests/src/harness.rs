//! Process harness for the cross-process tests.
//!
//! * [`serial`] serialises heavy tests (busy pollers, DPDK) across threads and test
//!   binaries with an `flock` on `/tmp/vnet-tests.lock`.
//! * [`TempDir`] is a private `/tmp` directory for sockets and logs, removed on drop.
//! * [`workspace_bin`] finds (building it if needed) a binary of this workspace.
//! * [`Backend`] runs our `host-backend` as a child process, follows its JSON stats on
//!   stdout and keeps its stderr in a log file; it never outlives the test.
//! * [`device`], [`counter`] and [`total_drops`] read the stats JSON.

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The lock file shared by every test binary of the workspace.
const LOCK_PATH: &str = "/tmp/vnet-tests.lock";

// ------------------------------------------------------------------------------ serial

/// Holds the cross-process test lock; released when dropped.
pub struct SerialGuard {
    _file: File,
}

/// Serialises heavy tests (pollers, DPDK) across threads AND across test binaries:
/// an flock on /tmp/vnet-tests.lock held by the returned guard. Every test that starts
/// a poller or DPDK takes it first.
///
/// Each call opens the file anew, so two threads of one process hold two open file
/// descriptions and exclude each other exactly like two processes do.
pub fn serial() -> SerialGuard {
    // flock needs no write access: fall back to read-only if another user created it.
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o666)
        .open(LOCK_PATH)
        .or_else(|_| File::open(LOCK_PATH))
        .unwrap_or_else(|e| panic!("serial(): cannot open {LOCK_PATH}: {e}"));
    loop {
        // SAFETY: `file` is an open file descriptor owned by this function; flock only
        // reads the fd number and does not touch memory.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc == 0 {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            panic!("serial(): flock({LOCK_PATH}) failed: {err}");
        }
    }
    SerialGuard { _file: file }
}

// ------------------------------------------------------------------------------ TempDir

/// A private temporary directory (under /tmp, mode 0700, removed on drop) for sockets
/// and logs.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `/tmp/vnet-<tag>-XXXXXX` with mkdtemp(3). Characters of `tag` other than
    /// ASCII alphanumerics, `-` and `_` become `_`; the tag is cut to 24 characters so
    /// socket paths inside stay well under the 108-byte `sun_path` limit.
    pub fn new(tag: &str) -> TempDir {
        let tag: String = tag
            .chars()
            .take(24)
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' })
            .collect();
        let template =
            CString::new(format!("/tmp/vnet-{tag}-XXXXXX")).expect("TempDir::new: template contains no NUL");
        let mut buf = template.into_bytes_with_nul();
        // SAFETY: `buf` is a writable, NUL-terminated buffer that outlives the call;
        // mkdtemp only rewrites the trailing "XXXXXX" in place.
        let ret = unsafe { libc::mkdtemp(buf.as_mut_ptr().cast::<libc::c_char>()) };
        if ret.is_null() {
            panic!("TempDir::new({tag}): mkdtemp failed: {}", std::io::Error::last_os_error());
        }
        buf.pop(); // the NUL
        TempDir { path: PathBuf::from(OsString::from_vec(buf)) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ------------------------------------------------------------------------------ workspace_bin

/// Path of a workspace binary built by cargo (e.g. "host-backend"): `target/<profile>/NAME`
/// next to the test executable. It is (re)built once per test process with
/// `cargo build [--release|--profile P] -p NAME --bin NAME --target-dir <target>`, which is
/// a quick no-op when it is up to date, so a test never runs a stale binary.
///
/// The package is assumed to have the same name as the binary (true for `host-backend`
/// and `testpmd`). Set `VNET_NO_BUILD=1` to skip the build and only use an existing file.
pub fn workspace_bin(name: &str) -> PathBuf {
    cargo_built(name, "--bin", name)
}

/// Path of an example of a workspace package (e.g. `workspace_example("vnet-driver",
/// "l2fwd")`): `target/<profile>/examples/NAME`, (re)built as [`workspace_bin`] does with
/// `cargo build -p PACKAGE --example NAME`.
pub fn workspace_example(package: &str, name: &str) -> PathBuf {
    cargo_built(package, "--example", name)
}

/// Builds `package`'s target `name` of `kind` (`--bin` or `--example`) once per process.
fn cargo_built(package: &str, kind: &str, name: &str) -> PathBuf {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(|| Mutex::new(HashMap::new()));
    let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
    let key = format!("{package} {kind} {name}");
    if let Some(p) = built.get(&key) {
        return p.clone();
    }

    let exe = std::env::current_exe().expect("workspace_bin: current_exe()");
    // target/<profile>/deps/<test-binary>
    let mut profile_dir =
        exe.parent().expect("workspace_bin: test executable has no parent directory").to_path_buf();
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir.pop();
    }
    let profile = profile_dir.file_name().and_then(|n| n.to_str()).unwrap_or("debug").to_string();
    let target_dir =
        profile_dir.parent().expect("workspace_bin: profile directory has no parent").to_path_buf();
    let bin =
        if kind == "--example" { profile_dir.join("examples").join(name) } else { profile_dir.join(name) };

    let skip_build = std::env::var_os("VNET_NO_BUILD").is_some_and(|v| v == "1");
    if !(skip_build && bin.exists()) {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let workspace =
            Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace_bin: tests/ has a parent");
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(workspace).arg("build");
        match profile.as_str() {
            "debug" => {}
            "release" => {
                cmd.arg("--release");
            }
            other => {
                cmd.args(["--profile", other]);
            }
        }
        cmd.args(["-p", package, kind, name, "--target-dir"]).arg(&target_dir);
        let out =
            cmd.output().unwrap_or_else(|e| panic!("workspace_bin({name}): cannot run {cargo:?} build: {e}"));
        if !out.status.success() {
            panic!(
                "workspace_bin({name}): `{cmd:?}` failed ({}):\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    assert!(bin.exists(), "workspace_bin({name}): {} does not exist after the build", bin.display());
    built.insert(key, bin.clone());
    bin
}

// ------------------------------------------------------------------------------ Backend

/// What the stdout reader thread shares with the [`Backend`].
#[derive(Default)]
struct StdoutState {
    /// The most recent JSON object line.
    latest: Option<Value>,
    /// The most recent JSON object with `"final": true`.
    final_stats: Option<Value>,
    /// Lines that were not JSON objects.
    other: String,
}

/// Our host backend (`host-backend`) running as a child process.
pub struct Backend {
    child: Mutex<Option<Child>>,
    pid: u32,
    state: Arc<Mutex<StdoutState>>,
    reader: Option<JoinHandle<()>>,
    log_path: PathBuf,
    _dir: TempDir,
}

impl Backend {
    /// Spawns `host-backend` with `args` plus `--stats-format json --stats-period 1`
    /// (each unless `args` already has it), stdout piped (JSON lines), stderr captured
    /// to a log file in a temp dir (see [`Backend::log`]). Waits (max 10 s) until every
    /// socket path named in `--port` args exists (port syntax is `KIND:PATH`,
    /// `xconnect:PATH_A,PATH_B` `tap:PATH,IFNAME` or `afpacket:PATH,IFNAME`), else panics with the log.
    pub fn start(args: &[&str]) -> Backend {
        Backend::start_with(&workspace_bin("host-backend"), args)
    }

    /// Like [`Backend::start`] with another executable that speaks the same CLI and
    /// stats protocol.
    pub fn start_with(bin: &Path, args: &[&str]) -> Backend {
        Backend::try_start_with(bin, args).unwrap_or_else(|e| panic!("Backend::start: {e}"))
    }

    /// [`Backend::start_with`], with the error (its first line says what happened, the
    /// backend's log follows) instead of a panic.
    pub fn try_start_with(bin: &Path, args: &[&str]) -> Result<Backend, String> {
        let dir = TempDir::new("backend");
        let log_path = dir.join("host-backend.stderr");
        let log = File::create(&log_path).map_err(|e| format!("create {}: {e}", log_path.display()))?;

        let has = |flag: &str| args.iter().any(|a| *a == flag || a.starts_with(&format!("{flag}=")));
        let mut argv: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        if !has("--stats-format") {
            argv.extend(["--stats-format".into(), "json".into()]);
        }
        if !has("--stats-period") {
            argv.extend(["--stats-period".into(), "1".into()]);
        }
        let sockets = port_sockets(args);

        let mut tries = 0;
        let mut child = loop {
            let err = log.try_clone().map_err(|e| format!("dup log fd: {e}"))?;
            match Command::new(bin)
                .args(&argv)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(err)
                .spawn()
            {
                Ok(c) => break c,
                // A just-written executable is "busy" while another test thread's child,
                // forked before that file was closed, has not reached its exec yet.
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                    tries += 1;
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(format!("cannot run {}: {e}", bin.display())),
            }
        };
        let pid = child.id();
        let stdout = child.stdout.take().ok_or("host-backend: no piped stdout")?;
        let state = Arc::new(Mutex::new(StdoutState::default()));
        let reader = {
            let state = Arc::clone(&state);
            thread::Builder::new()
                .name(format!("backend-{pid}-stdout"))
                .spawn(move || read_stats(stdout, &state))
                .map_err(|e| format!("spawn the stdout reader thread: {e}"))?
        };
        let mut backend =
            Backend { child: Mutex::new(Some(child)), pid, state, reader: Some(reader), log_path, _dir: dir };

        let deadline = Instant::now() + Duration::from_secs(10);
        for sock in &sockets {
            while !sock.exists() {
                if !backend.is_running() {
                    // Its last log line is usually why (a bad option, a busy socket).
                    let log = backend.log();
                    let why =
                        log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
                    return Err(format!(
                        "host-backend exited before creating {}: {why}\n{argv:?}; log:\n{log}",
                        sock.display()
                    ));
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "host-backend {argv:?}: socket {} not created within 10 s; log:\n{}",
                        sock.display(),
                        backend.log()
                    ));
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(backend)
    }

    /// Latest JSON stats object seen on stdout.
    pub fn latest_stats(&self) -> Option<Value> {
        lock(&self.state).latest.clone()
    }

    /// Polls [`Backend::latest_stats`] every 100 ms until `pred` is true or `timeout`
    /// passes; returns the stats that satisfied it, or panics with the log on timeout
    /// (or as soon as the backend has exited).
    pub fn wait_stats(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.latest_stats() {
                if pred(&s) {
                    return s;
                }
            }
            if self.has_exited() {
                panic!(
                    "wait_stats: host-backend exited; last stats: {}\nlog:\n{}",
                    self.stats_text(),
                    self.log()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "wait_stats: condition not met within {timeout:?}; last stats: {}\nlog:\n{}",
                    self.stats_text(),
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Sends SIGTERM, waits (max 10 s, then SIGKILL and panic), asserts exit status 0,
    /// and returns the final stats object (the JSON line with `"final": true`).
    pub fn stop(self) -> Value {
        self.try_stop().unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Backend::stop`], with the error instead of a panic.
    pub fn try_stop(mut self) -> Result<Value, String> {
        let mut child = lock(&self.child).take().ok_or("Backend::stop: the backend was already stopped")?;
        if matches!(child.try_wait(), Ok(None)) {
            signal(self.pid, libc::SIGTERM);
        }
        let status = match wait_timeout(&mut child, Duration::from_secs(10)) {
            Some(st) => st,
            None => {
                signal(self.pid, libc::SIGKILL);
                let _ = child.wait();
                return Err(format!(
                    "host-backend did not exit within 10 s of SIGTERM (killed); log:\n{}",
                    self.log()
                ));
            }
        };
        // The pipe closes when the process is gone: the reader has seen every line.
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        if !status.success() {
            return Err(format!("host-backend exited with {status} after SIGTERM; log:\n{}", self.log()));
        }
        let fin = lock(&self.state).final_stats.clone();
        fin.ok_or_else(|| {
            format!(
                "host-backend printed no stats line with \"final\": true; last stats: {}\nlog:\n{}",
                self.stats_text(),
                self.log()
            )
        })
    }

    /// stderr so far, followed by any stdout lines that were not JSON.
    pub fn log(&self) -> String {
        let mut s = std::fs::read_to_string(&self.log_path)
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log_path.display()));
        let other = lock(&self.state).other.clone();
        if !other.is_empty() {
            s.push_str("\n--- stdout lines that were not JSON ---\n");
            s.push_str(&other);
        }
        s
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn is_running(&mut self) -> bool {
        !self.has_exited()
    }

    /// Whether the child has exited (reaping it if so; `Child` keeps the status).
    pub fn has_exited(&self) -> bool {
        match lock(&self.child).as_mut() {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    fn stats_text(&self) -> String {
        match self.latest_stats() {
            Some(v) => v.to_string(),
            None => "<none>".into(),
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(mut child) = lock(&self.child).take() {
            if matches!(child.try_wait(), Ok(None)) {
                signal(self.pid, libc::SIGKILL);
            }
            let _ = child.wait();
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// Reader thread body: keeps the last JSON object (and the last final one); other lines
/// go to `other`.
fn read_stats(stdout: impl Read, state: &Mutex<StdoutState>) {
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        match serde_json::from_str::<Value>(&line) {
            Ok(v) if v.is_object() => {
                let mut st = lock(state);
                if v.get("final").and_then(Value::as_bool) == Some(true) {
                    st.final_stats = Some(v.clone());
                }
                st.latest = Some(v);
            }
            _ => {
                let mut st = lock(state);
                st.other.push_str(&line);
                st.other.push('\n');
            }
        }
    }
}

/// Socket paths named by `--port KIND:PATH`, `--port=KIND:PATH` and
/// `--port xconnect:A,B` arguments.
fn port_sockets(args: &[&str]) -> Vec<PathBuf> {
    let mut specs = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if *a == "--port" {
            if let Some(v) = it.next() {
                specs.push(*v);
            }
        } else if let Some(v) = a.strip_prefix("--port=") {
            specs.push(v);
        }
    }
    let mut out = Vec::new();
    for spec in specs {
        let Some((kind, rest)) = spec.split_once(':') else {
            continue;
        };
        if kind == "xconnect" {
            out.extend(rest.split(',').map(PathBuf::from));
        } else if kind == "tap" || kind == "afpacket" {
            // tap:SOCKET,IFNAME, afpacket:SOCKET,IFNAME
            out.push(PathBuf::from(rest.split(',').next().unwrap_or(rest)));
        } else {
            out.push(PathBuf::from(rest));
        }
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sends `sig` to `pid` (errors such as ESRCH are ignored: the process is gone).
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) takes plain integers; the pid is one of our own children that has
    // not been reaped yet, so it cannot have been recycled for another process.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// Waits for `child` for at most `timeout`; `None` if it is still running.
pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) => {}
            Err(e) => panic!("wait for child {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

// ------------------------------------------------------------------------------ frames

/// A test Ethernet frame of `len` (>= 14) bytes: locally administered MACs, the local
/// experimental EtherType 0x88b5, then `seed` (big-endian, when it fits) and a payload
/// that depends on `seed` and the offset, so frames of different seeds differ.
pub fn test_frame(len: usize, seed: u16) -> Vec<u8> {
    assert!(len >= 14, "test_frame: {len} bytes cannot hold an Ethernet header");
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]);
    for (i, b) in f.iter_mut().enumerate().skip(14) {
        *b = (i as u16).wrapping_mul(31).wrapping_add(seed) as u8;
    }
    if len >= 16 {
        f[14..16].copy_from_slice(&seed.to_be_bytes());
    }
    f
}

// ------------------------------------------------------------------------------ stats JSON

/// The device object of `stats["devices"]` whose `"socket"` equals `socket`; panics
/// (printing the stats) if there is none.
pub fn device<'a>(stats: &'a Value, socket: &Path) -> &'a Value {
    let want = socket.to_string_lossy();
    stats
        .get("devices")
        .and_then(Value::as_array)
        .and_then(|devs| devs.iter().find(|d| d.get("socket").and_then(Value::as_str) == Some(want.as_ref())))
        .unwrap_or_else(|| panic!("no device with socket {want} in stats: {stats}"))
}

/// `dev[name]` as u64; `name` may be a dotted path such as `"drops.oversize"`.
/// Panics if it is missing or not an unsigned integer.
pub fn counter(dev: &Value, name: &str) -> u64 {
    let mut v = dev;
    for part in name.split('.') {
        v = v.get(part).unwrap_or_else(|| panic!("counter {name:?}: no field {part:?} in {dev}"));
    }
    v.as_u64().unwrap_or_else(|| panic!("counter {name:?}: {v} is not an unsigned integer (in {dev})"))
}

/// Sum of all counters in `dev["drops"]`.
pub fn total_drops(dev: &Value) -> u64 {
    dev.get("drops")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("no \"drops\" object in {dev}"))
        .iter()
        .map(|(k, v)| v.as_u64().unwrap_or_else(|| panic!("drops.{k} = {v} is not an unsigned integer")))
        .sum()
}

/// Runs `f` on its own thread and waits at most `timeout` for it: a peer that stops
/// answering vhost-user requests fails the test instead of hanging it. (On a timeout the
/// thread is left blocked; it unblocks when the peer process is killed as the test
/// unwinds.)
pub fn within<T: Send + 'static>(what: &str, timeout: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let h = thread::Builder::new()
        .name(what.chars().take(15).collect())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("spawn a helper thread");
    match rx.recv_timeout(timeout) {
        Ok(v) => {
            let _ = h.join();
            v
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: no result within {timeout:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => panic!("{what}: helper thread ended without a result"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_socket_parsing() {
        let args = [
            "--port",
            "sink:/tmp/a.sock",
            "--port=gen:/tmp/b.sock",
            "--port",
            "xconnect:/tmp/c.sock,/tmp/d.sock",
            "--port",
            "tap:/tmp/e.sock,vnt0",
            "--queues",
            "2",
        ];
        let got = port_sockets(&args);
        let want: Vec<PathBuf> = ["/tmp/a.sock", "/tmp/b.sock", "/tmp/c.sock", "/tmp/d.sock", "/tmp/e.sock"]
            .iter()
            .map(PathBuf::from)
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn stats_helpers() {
        let stats: Value = serde_json::from_str(
            r#"{"final":false,"devices":[{"socket":"/tmp/x/a.sock","rx_packets":7,
               "drops":{"peer_down":3,"oversize":1}}]}"#,
        )
        .expect("valid JSON");
        let dev = device(&stats, Path::new("/tmp/x/a.sock"));
        assert_eq!(counter(dev, "rx_packets"), 7);
        assert_eq!(counter(dev, "drops.peer_down"), 3);
        assert_eq!(total_drops(dev), 4);
    }

    /// A stand-in for host-backend: creates its `--port` sockets as plain files, prints
    /// noise and JSON stats lines, and prints a final line and exits 0 on SIGTERM.
    const FAKE_BACKEND: &str = r#"#!/bin/bash
set -u
sock=""
while [ $# -gt 0 ]; do
    case "$1" in --port) sock=${2#*:}; : > "$sock"; shift ;; esac
    shift
done
n=0
trap 'echo "{\"final\":true,\"elapsed_s\":$n,\"devices\":[{\"socket\":\"$sock\",\"rx_packets\":$n}]}"; exit 0' TERM
echo "starting" >&2
echo "not json"
while true; do
    echo "{\"final\":false,\"elapsed_s\":$n,\"devices\":[{\"socket\":\"$sock\",\"rx_packets\":$n}]}"
    n=$((n+1))
    sleep 0.1
done
"#;

    #[test]
    fn backend_protocol_with_fake() {
        use std::os::unix::fs::PermissionsExt;
        let dir = TempDir::new("fake-backend");
        let bin = dir.join("fake-backend");
        std::fs::write(&bin, FAKE_BACKEND).expect("write fake backend");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod fake backend");
        let sock = dir.join("s.sock");
        let port = format!("sink:{}", sock.display());
        let mut b = Backend::start_with(&bin, &["--port", &port]);
        assert!(sock.exists());
        assert!(b.is_running());
        let s = b.wait_stats(Duration::from_secs(5), |s| counter(device(s, &sock), "rx_packets") >= 3);
        assert_eq!(s["final"], false);
        assert!(b.log().contains("starting"));
        assert!(b.log().contains("not json"));
        let fin = b.stop();
        assert_eq!(fin["final"], true);
        assert!(counter(device(&fin, &sock), "rx_packets") >= 3);

        // Drop kills a backend that is still running.
        let b = Backend::start_with(&bin, &["--port", &port]);
        let pid = b.pid();
        drop(b);
        // SAFETY: signal 0 only checks for existence; the pid was reaped by drop, so at
        // worst it names an unrelated process and we only read the result.
        let alive = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
        assert!(!alive, "dropped backend {pid} still exists");
    }

    #[test]
    fn tempdir_is_private_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let p;
        {
            let d = TempDir::new("self/test");
            p = d.path().to_path_buf();
            let mode = std::fs::metadata(&p).expect("stat tempdir").permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
            assert!(d.join("x.sock").starts_with(&p));
        }
        assert!(!p.exists());
    }
}
