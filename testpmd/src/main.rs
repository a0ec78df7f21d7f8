//! testpmd: a DPDK-style forwarding and statistics tool on the vnet driver.
//!
//! Parses the command line, opens the ports (or, with no port option, runs the embedded
//! default: our host backend in this process with a `reflect` port on a private socket),
//! then forwards non-interactively for `--duration` or serves the `-i` prompt. Every
//! error is one line on stderr and a non-zero exit.

mod app;
mod burst_stats;
mod capture;
mod config;
mod csum;
mod dump;
mod engine;
mod fivetswap;
mod interactive;
mod latency;
mod noisy;
mod progress;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

use app::App;
use config::{Args, Config, VdevSpec};

/// The embedded back-end: host-backend's library with a reflect port on a socket in a
/// private temporary directory, removed at the end.
struct Embedded {
    backend: Option<host_backend::Backend>,
    dir: std::path::PathBuf,
}

impl Embedded {
    fn start() -> Result<(Embedded, std::path::PathBuf), String> {
        let mut tpl = *b"/tmp/testpmd-XXXXXX\0";
        // SAFETY: mkdtemp rewrites the template in place; it is NUL-terminated.
        let p = unsafe { libc::mkdtemp(tpl.as_mut_ptr() as *mut libc::c_char) };
        if p.is_null() {
            return Err(format!("cannot create a private directory: {}", std::io::Error::last_os_error()));
        }
        let dir =
            std::path::PathBuf::from(std::str::from_utf8(&tpl[..tpl.len() - 1]).map_err(|e| e.to_string())?);
        let sock = dir.join("vnet.sock");
        let cfg = host_backend::config::Config {
            ports: vec![host_backend::config::parse_port(&format!("reflect:{}", sock.display()))
                .map_err(|e| e.to_string())?],
            ..Default::default()
        };
        let backend = host_backend::Backend::start(cfg).map_err(|e| format!("embedded backend: {e}"))?;
        Ok((Embedded { backend: Some(backend), dir }, sock))
    }

    /// The backend's counts: (received from us, sent to us, dropped).
    fn counts(&self) -> (u64, u64, u64) {
        let snaps = self.backend.as_ref().map(|b| b.snapshot()).unwrap_or_default();
        let t = snaps.first().map(|s| s.total()).unwrap_or_default();
        (t.rx_packets, t.tx_packets, t.drops.iter().sum())
    }

    /// Shuts the backend down.
    fn finish(&mut self) {
        if let Some(b) = self.backend.take() {
            b.shutdown();
        }
    }
}

impl Drop for Embedded {
    fn drop(&mut self) {
        if let Some(b) = self.backend.take() {
            b.shutdown();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn run(args: Args) -> Result<(), String> {
    let mut cfg = Config::from_args(&args)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| format!("signal handler: {e}"))?;
    }
    let mut embedded = None;
    if cfg.embedded {
        let (e, sock) = Embedded::start()?;
        eprintln!("testpmd: no port given: embedded host backend (reflect) on {}", sock.display());
        cfg.vdevs = vec![VdevSpec::new(sock)];
        cfg.duration = cfg.duration.or(Some(10.0));
        // 6 bursts of 32 fill three quarters of a 256-entry ring: enough packets in the
        // loop to keep both pollers busy (DPDK's loopback test injects with `start
        // tx_first`, too), with room for one back-end burst (64): the reflect port
        // publishes a burst's receive side before its transmit completions (a back-end
        // that dies between the two then loses no frame uncounted), so frames can come
        // back while their own transmit slots are still taken, and a full ring would
        // drop them.
        cfg.tx_first = cfg.tx_first.or(Some(6));
        embedded = Some(e);
    }
    let mut app = App::open(cfg.clone(), Box::new(std::io::stdout()))?;
    for i in 0..app.nb_ports() {
        app.show_port_info(Some(i))?;
    }
    if cfg.interactive {
        interactive::run(&mut app);
        return app.close();
    }

    app.start(cfg.tx_first);
    let deadline = cfg.duration.map(|d| Instant::now() + Duration::from_secs_f64(d));
    if deadline.is_none() {
        eprintln!("testpmd: forwarding until SIGINT/SIGTERM");
    }
    let period = Duration::from_secs(cfg.stats_period);
    let mut next_stats = Instant::now() + period;
    // The live line, on a terminal, when no statistics blocks are printed.
    let mut progress = if period.is_zero() { progress::Progress::for_terminal() } else { None };
    while !stop.load(Ordering::Relaxed) && deadline.map_or(true, |d| Instant::now() < d) {
        std::thread::sleep(Duration::from_millis(10));
        if !period.is_zero() && Instant::now() >= next_stats {
            next_stats += period;
            app.show_port_stats(None)?;
        }
        if let Some(p) = progress.as_mut() {
            p.tick(|| {
                (0..app.nb_ports())
                    .map(|i| app.port_totals(i))
                    .map(|t| (t.rx_packets, t.tx_packets))
                    .collect()
            });
        }
    }
    if let Some(p) = progress {
        p.finish();
    }
    let totals = app.stop().unwrap_or_default();
    if let Some(mut e) = embedded {
        // Frames still in flight come back now; then compare with the backend's view
        // (read before the port closes, so the device is still there to be counted).
        let drained = app.drain(100);
        app.show_port_stats(None)?;
        let (be_rx, be_tx, be_drops) = e.counts();
        let port0 = app.port_totals(0);
        app.close()?;
        e.finish();
        let mut t = totals.first().copied().unwrap_or_default();
        let mut received = t.rx_packets + drained;
        if cfg.xdp.is_some() {
            // The program consumed some frames (Drop) or sent them itself (Tx): count what
            // crossed the port, from the driver's counters (drained frames included).
            t.tx_packets = port0.tx_packets;
            received = port0.rx_packets;
        }
        let unaccounted = (t.tx_packets as i128) - (received as i128) - (be_drops as i128);
        println!("\n  Embedded default summary (io through the host backend's reflect port):");
        println!(
            "  testpmd sent {} and received {} (+{drained} drained at stop); dropped on TX: {}",
            t.tx_packets, t.rx_packets, t.tx_dropped
        );
        println!("  backend received {be_rx}, sent {be_tx}, dropped {be_drops}");
        println!("  unaccounted loss: {unaccounted}");
        if unaccounted != 0 || be_rx != t.tx_packets || be_tx != received {
            return Err(format!(
                "embedded default: counts disagree (sent {}, backend got {be_rx}, backend sent {be_tx}, received {received})",
                t.tx_packets
            ));
        }
        return Ok(());
    }
    // DPDK's exit statistics: every port's NIC statistics block (with the XDP counters).
    app.show_port_stats(None)?;
    app.close()
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                let _ = e.print();
                std::process::exit(0);
            }
            let msg = e.to_string();
            let first = msg.lines().next().unwrap_or("bad command line").trim_start_matches("error: ");
            eprintln!("testpmd: {first}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args) {
        eprintln!("testpmd: {e}");
        std::process::exit(1);
    }
}
