//! Packet capture (`--pcap-out FILE[,port=N][,queue=Q][,dir=rx|tx|both][,count=N]` and
//! `set capture ...` at the prompt): frames copied off the data path into a bounded ring
//! and written as a standard pcap file (microsecond timestamps, Ethernet link type) by
//! a writer thread.
//!
//! Owns: the capture specification and its parsing, the ring of preallocated slots
//! (a free list and a full list, both lock-free bounded queues), the copy of a burst's
//! frames into free slots, the writer thread and the pcap format. Must not: wait on the
//! data path. A forwarding thread that finds no free slot counts the frame as a capture
//! drop and goes on; it never allocates (slots are made once) and reads the clock once
//! per burst.
//!
//! Received frames are captured as `rx_burst` returned them; frames to send as they are
//! handed to `tx_burst` (so a frame that then does not fit the transmit ring, and is
//! counted in TX-dropped, is in the capture too; DPDK's pdump takes them at the same
//! point).

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crossbeam_queue::ArrayQueue;
use driver::Packet;

/// Bytes of a frame kept (the pcap snapshot length); longer frames are cut, their
/// original length recorded.
pub const SNAPLEN: usize = 9216;
/// Slots in the ring.
pub const SLOTS: usize = 1024;

/// Which frames to capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureSpec {
    /// The pcap file written.
    pub path: PathBuf,
    /// Only this port's frames.
    pub port: Option<u16>,
    /// Only this queue's frames.
    pub queue: Option<u16>,
    /// Received frames.
    pub rx: bool,
    /// Sent frames.
    pub tx: bool,
    /// Stop after this many frames.
    pub count: Option<u64>,
}

impl std::str::FromStr for CaptureSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or("capture: expected FILE[,port=N][,queue=Q][,dir=rx|tx|both][,count=N]")?;
        let mut c =
            CaptureSpec { path: path.into(), port: None, queue: None, rx: true, tx: true, count: None };
        for kv in parts {
            let (k, v) = kv.split_once('=').ok_or_else(|| format!("capture: '{kv}' is not KEY=VALUE"))?;
            let num = |v: &str| v.parse::<u64>().map_err(|_| format!("capture: {k}={v}: not a number"));
            match k {
                "port" => {
                    c.port =
                        Some(u16::try_from(num(v)?).map_err(|_| format!("capture: port={v} is too large"))?)
                }
                "queue" => {
                    c.queue =
                        Some(u16::try_from(num(v)?).map_err(|_| format!("capture: queue={v} is too large"))?)
                }
                "count" => c.count = Some(num(v)?).filter(|&n| n > 0),
                "dir" => {
                    (c.rx, c.tx) = match v {
                        "rx" => (true, false),
                        "tx" => (false, true),
                        "both" => (true, true),
                        _ => return Err(format!("capture: dir={v}: expected rx, tx or both")),
                    }
                }
                _ => return Err(format!("capture: unknown key '{k}' (port, queue, dir, count)")),
            }
        }
        Ok(c)
    }
}

struct Slot {
    sec: u32,
    usec: u32,
    orig_len: u32,
    len: usize,
    data: Box<[u8; SNAPLEN]>,
}

/// What a capture did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CaptureCounts {
    /// Frames taken into the ring.
    pub taken: u64,
    /// Frames written to the file.
    pub written: u64,
    /// Frames that found the ring full (not captured).
    pub dropped: u64,
}

/// A running capture: the ring and its writer thread.
pub struct Capture {
    spec: CaptureSpec,
    free: ArrayQueue<Slot>,
    full: ArrayQueue<Slot>,
    taken: AtomicU64,
    written: AtomicU64,
    dropped: AtomicU64,
    stop: AtomicBool,
    writer: std::sync::Mutex<Option<JoinHandle<Result<(), String>>>>,
}

impl std::fmt::Debug for Capture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Capture").field("spec", &self.spec).field("counts", &self.counts()).finish()
    }
}

fn pcap_header() -> [u8; 24] {
    let mut h = [0u8; 24];
    h[0..4].copy_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    h[4..6].copy_from_slice(&2u16.to_le_bytes());
    h[6..8].copy_from_slice(&4u16.to_le_bytes());
    // thiszone 0, sigfigs 0
    h[16..20].copy_from_slice(&(SNAPLEN as u32).to_le_bytes());
    h[20..24].copy_from_slice(&1u32.to_le_bytes()); // LINKTYPE_ETHERNET
    h
}

impl Capture {
    /// Creates the file, writes the pcap header and starts the writer thread.
    pub fn start(spec: CaptureSpec) -> Result<Arc<Capture>, String> {
        let (cap, out) = Capture::create(spec)?;
        cap.spawn_writer(out)?;
        Ok(cap)
    }

    /// The capture with its file and empty ring, without the writer.
    fn create(spec: CaptureSpec) -> Result<(Arc<Capture>, std::io::BufWriter<std::fs::File>), String> {
        let file = std::fs::File::create(&spec.path)
            .map_err(|e| format!("capture: cannot create {}: {e}", spec.path.display()))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 16, file);
        out.write_all(&pcap_header()).map_err(|e| format!("capture: {}: {e}", spec.path.display()))?;
        let free = ArrayQueue::new(SLOTS);
        for _ in 0..SLOTS {
            let _ = free.push(Slot { sec: 0, usec: 0, orig_len: 0, len: 0, data: Box::new([0; SNAPLEN]) });
        }
        let cap = Arc::new(Capture {
            spec,
            free,
            full: ArrayQueue::new(SLOTS),
            taken: AtomicU64::new(0),
            written: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            writer: std::sync::Mutex::new(None),
        });
        Ok((cap, out))
    }

    fn spawn_writer(self: &Arc<Self>, out: std::io::BufWriter<std::fs::File>) -> Result<(), String> {
        let c = self.clone();
        let t = std::thread::Builder::new()
            .name("capture".into())
            .spawn(move || c.write_loop(out))
            .map_err(|e| format!("capture: cannot start the writer thread: {e}"))?;
        *self.writer.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        Ok(())
    }

    /// The specification.
    pub fn spec(&self) -> &CaptureSpec {
        &self.spec
    }

    /// Counters so far.
    pub fn counts(&self) -> CaptureCounts {
        CaptureCounts {
            taken: self.taken.load(Ordering::Relaxed),
            written: self.written.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }

    fn write_loop(&self, mut out: std::io::BufWriter<std::fs::File>) -> Result<(), String> {
        let name = self.spec.path.display().to_string();
        loop {
            // Read the flag before draining: what was queued before it was set is written.
            let stopping = self.stop.load(Ordering::Acquire);
            let mut any = false;
            while let Some(s) = self.full.pop() {
                any = true;
                let mut rec = [0u8; 16];
                rec[0..4].copy_from_slice(&s.sec.to_le_bytes());
                rec[4..8].copy_from_slice(&s.usec.to_le_bytes());
                rec[8..12].copy_from_slice(&(s.len as u32).to_le_bytes());
                rec[12..16].copy_from_slice(&s.orig_len.to_le_bytes());
                let r = out.write_all(&rec).and_then(|_| out.write_all(&s.data[..s.len]));
                // The slot goes back whatever happened, so the ring never shrinks.
                let _ = self.free.push(s);
                r.map_err(|e| format!("capture: writing {name}: {e}"))?;
                self.written.fetch_add(1, Ordering::Relaxed);
            }
            if stopping {
                break;
            }
            if !any {
                let _ = out.flush();
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        out.flush().map_err(|e| format!("capture: writing {name}: {e}"))
    }

    /// Whether frames of `port`/`queue` in direction `rx` are captured.
    #[inline]
    pub fn wants(&self, port: u16, queue: u16, rx: bool) -> bool {
        (if rx { self.spec.rx } else { self.spec.tx })
            && self.spec.port.map_or(true, |p| p == port)
            && self.spec.queue.map_or(true, |q| q == queue)
    }

    /// Copies the frames of a burst into free slots (never waits: a frame that finds
    /// none is counted as dropped). With `count`, frames beyond it are not taken.
    pub fn offer(&self, pkts: &[Packet]) {
        if pkts.is_empty() {
            return;
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let (sec, usec) = (now.as_secs() as u32, now.subsec_micros());
        for p in pkts {
            if let Some(n) = self.spec.count {
                // Reserve a place among the first `count` frames.
                if self.taken.fetch_add(1, Ordering::Relaxed) >= n {
                    self.taken.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
            }
            let Some(mut s) = self.free.pop() else {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                if self.spec.count.is_some() {
                    self.taken.fetch_sub(1, Ordering::Relaxed);
                }
                continue;
            };
            if self.spec.count.is_none() {
                self.taken.fetch_add(1, Ordering::Relaxed);
            }
            let total = p.total_len();
            let mut at = 0;
            for seg in p.segments() {
                let n = seg.len().min(SNAPLEN - at);
                s.data[at..at + n].copy_from_slice(&seg[..n]);
                at += n;
            }
            (s.sec, s.usec, s.orig_len, s.len) = (sec, usec, total as u32, at);
            // Cannot fail: there are only SLOTS slots.
            let _ = self.full.push(s);
        }
    }

    /// Stops the writer after it has written every frame taken; returns the counters.
    pub fn finish(&self) -> Result<CaptureCounts, String> {
        self.stop.store(true, Ordering::Release);
        let t = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = t {
            t.join().map_err(|_| "capture: the writer thread panicked".to_string())??;
        }
        Ok(self.counts())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_spec() {
        let c: CaptureSpec = "/tmp/a.pcap,port=1,queue=0,dir=rx,count=5".parse().unwrap();
        assert_eq!(
            c,
            CaptureSpec {
                path: "/tmp/a.pcap".into(),
                port: Some(1),
                queue: Some(0),
                rx: true,
                tx: false,
                count: Some(5)
            }
        );
        let c: CaptureSpec = "x.pcap".parse().unwrap();
        assert!(c.rx && c.tx && c.port.is_none() && c.count.is_none());
        assert!("x.pcap,dir=up".parse::<CaptureSpec>().unwrap_err().contains("expected rx, tx or both"));
        assert!("x.pcap,port=a".parse::<CaptureSpec>().unwrap_err().contains("not a number"));
        assert!("x.pcap,snap=1".parse::<CaptureSpec>().unwrap_err().contains("unknown key"));
        assert!(",port=1".parse::<CaptureSpec>().is_err());
    }

    fn frames(n: usize, len: usize) -> (driver::Mempool, Vec<Packet>) {
        let arena = Arc::new(driver::dma::DmaArena::new(4 << 20, false).expect("arena"));
        let pool = driver::Mempool::new(arena, n as u32, 2304, 256).expect("pool");
        let mut v = Vec::new();
        pool.alloc_bulk(n, &mut v);
        for (i, p) in v.iter_mut().enumerate() {
            p.set_data(&vec![i as u8; len]).expect("fits");
        }
        (pool, v)
    }

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("testpmd-capture-{}-{name}.pcap", std::process::id()))
    }

    /// With the writer not yet running, the ring takes SLOTS frames and counts the rest
    /// as drops without waiting; the writer then writes exactly the frames taken.
    #[test]
    fn a_full_ring_counts_drops_and_never_waits() {
        let path = tmp("full");
        let spec =
            CaptureSpec { path: path.clone(), port: None, queue: None, rx: true, tx: true, count: None };
        let (cap, out) = Capture::create(spec).unwrap();
        let (_pool, mut pkts) = frames(64, 100);
        let offers = SLOTS / 64 + 1;
        for _ in 0..offers {
            cap.offer(&pkts);
        }
        assert_eq!(cap.counts(), CaptureCounts { taken: SLOTS as u64, written: 0, dropped: 64 });
        cap.spawn_writer(out).unwrap();
        let c = cap.finish().unwrap();
        assert_eq!(c, CaptureCounts { taken: SLOTS as u64, written: SLOTS as u64, dropped: 64 });
        let d = std::fs::read(&path).unwrap();
        assert_eq!(d.len(), 24 + SLOTS * (16 + 100));
        // Record 1 is frame 1 of the first burst: 100 bytes of 1.
        let r1 = 24 + 116;
        assert_eq!(&d[r1 + 8..r1 + 16], &[100, 0, 0, 0, 100, 0, 0, 0]);
        assert!(d[r1 + 16..r1 + 116].iter().all(|&b| b == 1));
        driver::free_bulk(&mut pkts);
        let _ = std::fs::remove_file(&path);
    }

    /// `count=N` takes the first N frames only; `dir` and `port` filter.
    #[test]
    fn count_and_filters() {
        let path = tmp("count");
        let spec: CaptureSpec = format!("{},count=10,port=1,dir=tx", path.display()).parse().unwrap();
        let cap = Capture::start(spec).unwrap();
        assert!(cap.wants(1, 0, false) && !cap.wants(1, 0, true) && !cap.wants(0, 0, false));
        let (_pool, mut pkts) = frames(64, 60);
        cap.offer(&pkts);
        cap.offer(&pkts);
        let c = cap.finish().unwrap();
        assert_eq!(c, CaptureCounts { taken: 10, written: 10, dropped: 0 });
        assert_eq!(std::fs::read(&path).unwrap().len(), 24 + 10 * (16 + 60));
        driver::free_bulk(&mut pkts);
        let _ = std::fs::remove_file(&path);
    }
}
