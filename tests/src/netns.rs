//! Private network namespaces for the tests that need a real network (`ip netns`):
//! created by the test, removed on drop, never touching the host's own interfaces; and
//! what those tests share: running a command, a streaming `sha256sum`, a byte stream
//! that does not compress.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::thread;

/// Pings [`Netns::ping`] sends.
pub const PINGS: u32 = 20;

/// Runs a command to completion; panics with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd} {args:?}: {e} (is it installed? tests/run.sh installs it)"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd} {args:?} failed ({}):\n{text}", out.status);
    text
}

/// A private network namespace, removed on drop.
pub struct Netns {
    /// The namespace's name (`vnt-TAG-PID`).
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Netns {
        let name = format!("vnt-{tag}-{}", std::process::id());
        // A namespace left behind by an earlier run of this process id.
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        run("ip", &["netns", "add", &name]);
        let ns = Netns { name };
        ns.exec("sysctl", &["-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"]);
        ns.exec("sysctl", &["-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"]);
        ns
    }

    pub fn exec(&self, cmd: &str, args: &[&str]) -> String {
        let mut a = vec!["netns", "exec", &self.name, cmd];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Moves the interface `tap` (in our namespace) into this one, with `addr`; the link
    /// stays down until [`up`](Self::up).
    pub fn take(&self, tap: &str, addr: &str) {
        run("ip", &["link", "set", tap, "netns", &self.name]);
        run("ip", &["-n", &self.name, "addr", "add", addr, "dev", tap]);
    }

    pub fn up(&self, tap: &str) {
        run("ip", &["-n", &self.name, "link", "set", tap, "up"]);
    }

    /// Runs `f` on a thread that has entered this namespace (sockets it opens live there).
    pub fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        thread::spawn(move || {
            // SAFETY: setns only reads the descriptor number; it moves this thread (a
            // plain thread of ours, which owns no other namespace state) into the
            // network namespace of an open /var/run/netns file.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }

    /// Pings `addr` `PINGS` times (bounded to 60 s); returns the replies received.
    pub fn ping(&self, addr: &str) -> u32 {
        let n = PINGS.to_string();
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "ping", "-c", &n, "-i", "0.2", "-w", "60", "-q", addr])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("ping: {e} (tests/run.sh installs iputils-ping)"));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let line = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .unwrap_or_else(|| panic!("no ping summary:\n{text}{}", String::from_utf8_lossy(&out.stderr)));
        let got = line.split(", ").find_map(|p| p.strip_suffix(" received")).and_then(|v| v.parse().ok());
        got.unwrap_or_else(|| panic!("cannot read the reply count in '{line}'"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).stderr(Stdio::null()).status();
    }
}

/// Whether an interface of that name exists in our namespace.
pub fn link_exists(name: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(name).exists()
}

/// `sha256sum` of what is written into it.
pub struct Sha {
    child: std::process::Child,
}

impl Sha {
    /// A `sha256sum` process fed by [`update`](Self::update).
    #[allow(clippy::new_without_default)]
    pub fn new() -> Sha {
        let child = Command::new("sha256sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("sha256sum: {e}"));
        Sha { child }
    }
    pub fn update(&mut self, b: &[u8]) {
        self.child.stdin.as_mut().expect("piped").write_all(b).expect("write to sha256sum");
    }
    pub fn hex(mut self) -> String {
        drop(self.child.stdin.take());
        let mut s = String::new();
        self.child.stdout.take().expect("piped").read_to_string(&mut s).expect("sha256sum output");
        self.child.wait().expect("sha256sum exit");
        s.split_whitespace().next().unwrap_or_default().to_string()
    }
}

/// The sender's bytes: a xorshift stream (not compressible, not periodic in 64 MiB).
pub fn fill(buf: &mut [u8], state: &mut u64) {
    for c in buf.chunks_mut(8) {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        c.copy_from_slice(&state.to_le_bytes()[..c.len()]);
    }
}
