//! The copy ceiling of one core: how many frames a second one thread can read out when it
//! copies every byte of each frame, the work a receiving side does per frame at large
//! sizes (our `sink --sink-read`, DPDK's vhost `rxonly` copying into mbufs, a guest's
//! receive).
//!
//! Why the benchmark runner needs it: at 9000 B the rate rows move 10-20 GB/s of frame
//! bytes through one core, and a ratio against DPDK means little once both sides sit at
//! what one core can copy. This program copies frames laid out as a transmitting front-end
//! lays them out (SOURCE frames in a pool, each as SEG-byte segments in buffers of their
//! own, taken in ring order) into a ring of 64 destination slots, as `sink --sink-read`
//! does, with no ring or device around it.
//!
//! ```sh
//! cargo run --release -p host-backend --example copy_ceiling -- [SIZE [SEG [SOURCE [SECONDS [CPU]]]]]
//! ```
//! Defaults: 9000-byte frames in 2000-byte segments, 256 source frames (one 256-entry
//! ring's worth), 2 s, cpu 1. Output: one line, `frames_per_s=N gbytes_per_s=G` with the
//! median of 0.1-second windows.

#[path = "common/pin.rs"]
mod common_pin;
use common_pin::pin;

use std::time::{Duration, Instant};

fn arg<T: std::str::FromStr>(args: &[String], i: usize, default: T) -> Result<T, String> {
    match args.get(i) {
        None => Ok(default),
        Some(s) => s.parse().map_err(|_| format!("copy_ceiling: argument {i} ({s:?}) is not a number")),
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let size: usize = arg(&args, 1, 9000)?;
    let seg: usize = arg(&args, 2, 2000)?;
    let source: usize = arg(&args, 3, 256)?;
    let secs: f64 = arg(&args, 4, 2.0)?;
    let cpu: usize = arg(&args, 5, 1)?;
    if size == 0 || seg == 0 || source == 0 || secs.is_nan() || secs <= 0.0 {
        return Err("copy_ceiling: SIZE, SEG, SOURCE and SECONDS must be above 0".into());
    }
    pin(cpu).map_err(|e| format!("copy_ceiling: pinning to cpu {cpu}: {e}"))?;
    // Each frame's segments in buffers of their own, one SEG-sized buffer apart plus a
    // cache line (pool buffers carry headroom), written once so that the pages exist.
    let nseg = size.div_ceil(seg);
    let stride = seg + 64;
    let src: Vec<u8> = (0..source * nseg * stride).map(|i| i as u8).collect();
    const SLOTS: usize = 64;
    let mut dst = vec![0u8; SLOTS * size];
    let window = Duration::from_millis(100);
    let (mut frames, mut k) = (0u64, 0usize);
    let mut rates = Vec::new();
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut start = Instant::now();
    while start < end {
        let mut n = 0u64;
        loop {
            for _ in 0..16 {
                let f = k % source;
                let slot = &mut dst[(k % SLOTS) * size..][..size];
                for (j, part) in slot.chunks_mut(seg).enumerate() {
                    let at = (f * nseg + j) * stride;
                    part.copy_from_slice(&src[at..at + part.len()]);
                }
                std::hint::black_box(&mut *slot);
                k += 1;
                n += 1;
            }
            if start.elapsed() >= window {
                break;
            }
        }
        let t = start.elapsed().as_secs_f64();
        rates.push(n as f64 / t);
        frames += n;
        start = Instant::now();
    }
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    println!(
        "frames_per_s={:.0} gbytes_per_s={:.2} size={size} seg={seg} source={source} windows={} frames={frames}",
        median,
        median * size as f64 / 1e9,
        rates.len()
    );
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("{e}");
        std::process::exit(1);
    }
}
