//! Measures what one cache line costs to move between two CPUs: two threads, pinned, pass
//! a counter back and forth through two cache lines, and the median round trip of
//! 0.1-second windows is printed in nanoseconds.
//!
//! Why the benchmark runner needs it: every forwarding path here moves cache lines
//! between the front-end's and the back-end's cores (ring indices, descriptors, frames),
//! and on this virtual machine that cost is not a constant: it sits on levels about 5x
//! apart (about 100 ns and about 500 ns a round trip) and moves between them within
//! seconds, as the host places the two vCPUs. `host-backend/bench/vs-dpdk.sh` runs this
//! before every run so that each rate comes with the level the machine was on.
//!
//! ```sh
//! cargo run --release -p host-backend --example core_rtt -- [CPU_A CPU_B [SECONDS]]
//! ```
//! Defaults: cpus 0 and 1, 0.5 s. Output: one line, `rtt_ns=N windows=W min=A max=B`.

#[path = "common/pin.rs"]
mod common_pin;
use common_pin::pin;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One counter on its own cache line.
#[repr(align(64))]
struct Line(AtomicU64);

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> T {
    match args.get(i) {
        None => default,
        Some(s) => s.parse().unwrap_or_else(|_| {
            eprintln!(
                "core_rtt: '{s}' is not a valid argument {i} (usage: core_rtt [CPU_A CPU_B [SECONDS]])"
            );
            std::process::exit(2)
        }),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (a, b): (usize, usize) = (arg(&args, 1, 0), arg(&args, 2, 1));
    let secs: f64 = arg(&args, 3, 0.5);
    if !(0.1..=600.0).contains(&secs) {
        eprintln!("core_rtt: SECONDS must be in 0.1..=600");
        std::process::exit(2);
    }
    let ping = Arc::new(Line(AtomicU64::new(0)));
    let pong = Arc::new(Line(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let peer = {
        let (ping, pong, stop) = (ping.clone(), pong.clone(), stop.clone());
        std::thread::spawn(move || -> std::io::Result<()> {
            pin(b)?;
            let mut seen = 0;
            while !stop.load(Ordering::Relaxed) {
                let v = ping.0.load(Ordering::Acquire);
                if v != seen {
                    seen = v;
                    pong.0.store(v, Ordering::Release);
                }
            }
            Ok(())
        })
    };
    if let Err(e) = pin(a) {
        eprintln!("core_rtt: cannot pin to cpu {a}: {e}");
        std::process::exit(1);
    }
    let window = Duration::from_millis(100);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut rtts = Vec::new();
    let mut v = 0u64;
    'outer: while Instant::now() < end {
        let t0 = Instant::now();
        let mut n = 0u64;
        while t0.elapsed() < window {
            for _ in 0..256 {
                v += 1;
                ping.0.store(v, Ordering::Release);
                let spin = Instant::now();
                while pong.0.load(Ordering::Acquire) != v {
                    std::hint::spin_loop();
                    if spin.elapsed() > Duration::from_secs(1) {
                        // The peer is not running (its cpu is taken): no measurement.
                        break 'outer;
                    }
                }
            }
            n += 256;
        }
        rtts.push(t0.elapsed().as_nanos() as f64 / n as f64);
    }
    stop.store(true, Ordering::Relaxed);
    match peer.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            eprintln!("core_rtt: cannot pin to cpu {b}: {e}");
            std::process::exit(1);
        }
        Err(_) => {
            eprintln!("core_rtt: the peer thread panicked");
            std::process::exit(1);
        }
    }
    if rtts.is_empty() {
        eprintln!("core_rtt: no round trip completed within 1 s (is cpu {b} busy?)");
        std::process::exit(1);
    }
    rtts.sort_by(f64::total_cmp);
    println!(
        "rtt_ns={:.0} windows={} min={:.0} max={:.0}",
        rtts[rtts.len() / 2],
        rtts.len(),
        rtts[0],
        rtts[rtts.len() - 1]
    );
}
