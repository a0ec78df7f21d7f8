//! The testpmd application state: open ports, the streams of the current forwarding
//! configuration, forwarding threads, and statistics in DPDK testpmd's layout (or JSON).
//!
//! Owns: port setup from the configuration, start/stop of forwarding, `show port
//! stats|info`, `clear port stats`, and the forward statistics printed at stop.
//! Must not: parse the command line or prompt (config.rs and interactive.rs do).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use driver::{Port, PortConfig, QueueStatsSnapshot};

use crate::config::{Config, FwdMode, StatsFormat};
use crate::engine::{forward, FwdParams, PortCtx, Stream, StreamStats};

struct PortState {
    port: Port,
    /// Counters at the last `clear port stats`.
    base: QueueStatsSnapshot,
    /// Counters and time at the last `show port stats` (for the rates).
    last: (QueueStatsSnapshot, Instant),
}

struct Running {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Stream>>>,
    started: Instant,
}

/// Forward totals of one port (DPDK's "Forward statistics for port N").
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FwdTotals {
    /// Received.
    pub rx_packets: u64,
    /// Received, then dropped by the engine (a subset of `rx_packets`).
    pub rx_dropped: u64,
    /// Sent.
    pub tx_packets: u64,
    /// Did not fit the transmit ring.
    pub tx_dropped: u64,
}

/// The application.
pub struct App {
    /// Settings (mode, burst, txpkts change at the prompt).
    pub cfg: Config,
    ports: Vec<PortState>,
    ctx: Vec<PortCtx>,
    streams: Vec<Stream>,
    stream_stats: Vec<Arc<StreamStats>>,
    running: Option<Running>,
    out: Box<dyn Write + Send>,
}

fn sum(v: &[QueueStatsSnapshot]) -> QueueStatsSnapshot {
    let mut t = QueueStatsSnapshot::default();
    for s in v {
        t.rx_packets += s.rx_packets;
        t.rx_bytes += s.rx_bytes;
        t.rx_errors += s.rx_errors;
        t.rx_nombuf += s.rx_nombuf;
        t.tx_packets += s.tx_packets;
        t.tx_bytes += s.tx_bytes;
        t.tx_full += s.tx_full;
        t.tx_copied += s.tx_copied;
        t.tx_nobuf += s.tx_nobuf;
        t.device_errors += s.device_errors;
    }
    t
}

fn sub(a: QueueStatsSnapshot, b: QueueStatsSnapshot) -> QueueStatsSnapshot {
    QueueStatsSnapshot {
        rx_packets: a.rx_packets - b.rx_packets,
        rx_bytes: a.rx_bytes - b.rx_bytes,
        rx_errors: a.rx_errors - b.rx_errors,
        rx_nombuf: a.rx_nombuf - b.rx_nombuf,
        tx_packets: a.tx_packets - b.tx_packets,
        tx_bytes: a.tx_bytes - b.tx_bytes,
        tx_full: a.tx_full - b.tx_full,
        tx_copied: a.tx_copied - b.tx_copied,
        tx_nobuf: a.tx_nobuf - b.tx_nobuf,
        device_errors: a.device_errors - b.device_errors,
    }
}

/// A MAC as testpmd prints it.
pub fn mac_str(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

impl App {
    /// Opens every port of `cfg` and builds the streams.
    pub fn open(cfg: Config, out: Box<dyn Write + Send>) -> Result<App, String> {
        let mut ports = Vec::new();
        let mut ctx = Vec::new();
        // PCI ports first, then virtio-user ones (DPDK's port order).
        let specs = cfg.pci.iter().map(|bdf| (PortConfig::vfio_pci(bdf), bdf.clone())).chain(
            cfg.vdevs.iter().map(|v| {
                let mut pc = PortConfig::virtio_user(&v.path);
                pc.ring_size = v.queue_size;
                pc.mac = v.mac;
                (pc, v.path.display().to_string())
            }),
        );
        for (i, (mut pc, name)) in specs.enumerate() {
            pc.queue_pairs = cfg.queues;
            pc.buffers = cfg.mbufs;
            pc.headroom = cfg.headroom;
            pc.buf_size = (cfg.headroom as u32 + 2048).div_ceil(64) * 64;
            pc.hugepages = cfg.hugepages;
            let port = Port::open(pc).map_err(|e| format!("port {i} ({name}): {e}"))?;
            let info = port.info().clone();
            if matches!(cfg.mode, FwdMode::TxOnly | FwdMode::FlowGen) && cfg.txpkts > info.mtu as usize + 14 {
                return Err(format!(
                    "--txpkts {} is above port {i}'s MTU {} + 14 bytes",
                    cfg.txpkts, info.mtu
                ));
            }
            let peer = cfg.eth_peers.iter().rev().find(|(p, _)| *p as usize == i).map(|(_, m)| *m);
            ctx.push(PortCtx {
                id: i as u16,
                mac: info.mac,
                peer: peer.unwrap_or([0x02, 0, 0, 0, 0, i as u8]),
                pool: port.pool().clone(),
            });
            let snap = sum(&port.stats());
            ports.push(PortState { port, base: snap, last: (snap, Instant::now()) });
        }
        // Streams: port p's queue q receives; its peer (p ^ 1, or p itself for the odd
        // last port, as testpmd's paired topology does) transmits. Every queue half is in
        // exactly one stream.
        let n = ports.len();
        let mut rx_halves: Vec<Vec<Option<driver::RxQueue>>> = Vec::new();
        let mut tx_halves: Vec<Vec<Option<driver::TxQueue>>> = Vec::new();
        for ps in ports.iter_mut() {
            let (mut r, mut t) = (Vec::new(), Vec::new());
            for qp in ps.port.take_queue_pairs() {
                r.push(Some(qp.rx));
                t.push(Some(qp.tx));
            }
            rx_halves.push(r);
            tx_halves.push(t);
        }
        let mut streams = Vec::new();
        for p in 0..n {
            let peer = if p ^ 1 < n { p ^ 1 } else { p };
            for q in 0..cfg.queues as usize {
                let (Some(rxq), Some(txq)) = (rx_halves[p][q].take(), tx_halves[peer][q].take()) else {
                    return Err("internal error: a queue half was assigned twice".into());
                };
                streams.push(Stream {
                    rx_port: p as u16,
                    queue: q as u16,
                    tx_port: peer as u16,
                    rxq,
                    txq,
                    stats: Arc::new(StreamStats::default()),
                });
            }
        }
        if n % 2 == 1 && n > 1 {
            let _ = writeln!(std::io::stderr(), "Warning! port-topology=paired and odd forward ports number, the last port will pair with itself.");
        }
        let stream_stats = streams.iter().map(|s| s.stats.clone()).collect();
        Ok(App { cfg, ports, ctx, streams, stream_stats, running: None, out })
    }

    fn say(&mut self, s: &str) {
        let _ = self.out.write_all(s.as_bytes());
        let _ = self.out.flush();
    }

    /// Number of ports.
    pub fn nb_ports(&self) -> usize {
        self.ports.len()
    }
    /// Whether forwarding runs.
    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Starts forwarding (`tx_first`: bursts to inject first).
    pub fn start(&mut self, tx_first: Option<u32>) {
        if self.running.is_some() {
            self.say("Packet forwarding already started\n");
            return;
        }
        for s in &self.stream_stats {
            for c in [&s.rx_packets, &s.rx_dropped, &s.tx_packets, &s.tx_dropped] {
                c.store(0, Ordering::Relaxed);
            }
        }
        let params = FwdParams {
            mode: self.cfg.mode,
            burst: self.cfg.burst,
            txpkts: self.cfg.txpkts,
            flows: self.cfg.flows,
        };
        let cores = self.cfg.nb_cores.min(self.streams.len()).max(1);
        let mut per: Vec<Vec<Stream>> = (0..cores).map(|_| Vec::new()).collect();
        for (i, s) in self.streams.drain(..).enumerate() {
            per[i % cores].push(s);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (i, streams) in per.into_iter().enumerate() {
            let (ports, params, stop) = (self.ctx.clone(), params.clone(), stop.clone());
            let cpu = self.cfg.cores.as_ref().and_then(|c| c.get(i).copied());
            let t = std::thread::Builder::new()
                .name(format!("fwd-{i}"))
                .spawn(move || forward(streams, ports, params, tx_first, cpu, stop))
                .expect("spawning a forwarding thread");
            threads.push(t);
        }
        let msg = format!(
            "{} packet forwarding - ports={} - cores={} - streams={} - burst={}\n",
            self.cfg.mode.name(),
            self.ports.len(),
            cores,
            self.stream_stats.len(),
            self.cfg.burst
        );
        self.say(&msg);
        self.running = Some(Running { stop, threads, started: Instant::now() });
    }

    /// Stops forwarding and prints the forward statistics; returns the per-port totals.
    pub fn stop(&mut self) -> Option<Vec<FwdTotals>> {
        let Some(r) = self.running.take() else {
            self.say("Packet forwarding not started\n");
            return None;
        };
        self.say("Telling cores to stop...\nWaiting for lcores to finish...\n");
        r.stop.store(true, Ordering::Relaxed);
        for t in r.threads {
            match t.join() {
                Ok(s) => self.streams.extend(s),
                Err(_) => self.say("a forwarding thread panicked; its streams are lost\n"),
            }
        }
        self.streams.sort_by_key(|s| (s.rx_port, s.queue));
        let secs = r.started.elapsed().as_secs_f64();
        let totals = self.fwd_totals();
        self.print_fwd_stats(&totals, secs);
        Some(totals)
    }

    /// Forward totals per port since the last start.
    pub fn fwd_totals(&self) -> Vec<FwdTotals> {
        let mut t = vec![FwdTotals::default(); self.ports.len()];
        let l = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        for (s, st) in self.stream_meta().into_iter().zip(&self.stream_stats) {
            t[s.0 as usize].rx_packets += l(&st.rx_packets);
            t[s.0 as usize].rx_dropped += l(&st.rx_dropped);
            t[s.1 as usize].tx_packets += l(&st.tx_packets);
            t[s.1 as usize].tx_dropped += l(&st.tx_dropped);
        }
        t
    }

    /// (rx port, tx port) of each stream, in `stream_stats` order.
    fn stream_meta(&self) -> Vec<(u16, u16)> {
        let n = self.ports.len();
        let mut v = Vec::new();
        for p in 0..n {
            let peer = if p ^ 1 < n { p ^ 1 } else { p };
            for _ in 0..self.cfg.queues {
                v.push((p as u16, peer as u16));
            }
        }
        v
    }

    fn print_fwd_stats(&mut self, totals: &[FwdTotals], secs: f64) {
        if self.cfg.stats_format == StatsFormat::Json {
            let ports: Vec<serde_json::Value> = totals
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    serde_json::json!({"port": i, "rx_packets": t.rx_packets, "rx_dropped": t.rx_dropped,
                        "tx_packets": t.tx_packets, "tx_dropped": t.tx_dropped})
                })
                .collect();
            let line = serde_json::json!({"type": "forward_stats", "seconds": secs, "ports": ports});
            self.say(&format!("{line}\n"));
            return;
        }
        let mut s = String::new();
        let mut acc = FwdTotals::default();
        for (i, t) in totals.iter().enumerate() {
            s += &format!(
                "\n  ---------------------- Forward statistics for port {i}  ----------------------\n"
            );
            s += &fwd_lines(t);
            s += "  ----------------------------------------------------------------------------\n";
            acc.rx_packets += t.rx_packets;
            acc.rx_dropped += t.rx_dropped;
            acc.tx_packets += t.tx_packets;
            acc.tx_dropped += t.tx_dropped;
        }
        s += "\n  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++\n";
        s += &fwd_lines(&acc);
        s += "  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++\n\nDone.\n";
        self.say(&s);
    }

    fn port_range(&self, which: Option<usize>) -> Result<std::ops::Range<usize>, String> {
        match which {
            None => Ok(0..self.ports.len()),
            Some(p) if p < self.ports.len() => Ok(p..p + 1),
            Some(p) => Err(format!("Invalid port {p}: {} port(s) exist", self.ports.len())),
        }
    }

    /// `show port stats all|N`.
    pub fn show_port_stats(&mut self, which: Option<usize>) -> Result<(), String> {
        let range = self.port_range(which)?;
        let mut s = String::new();
        let mut lines = Vec::new();
        for i in range {
            let now = Instant::now();
            let ps = &mut self.ports[i];
            let cur = sum(&ps.port.stats());
            let d = sub(cur, ps.base);
            let secs = now.duration_since(ps.last.1).as_secs_f64();
            let rate = |a: u64, b: u64| if secs > 0.0 { (a - b) as f64 / secs } else { 0.0 };
            let rx_pps = rate(cur.rx_packets, ps.last.0.rx_packets);
            let tx_pps = rate(cur.tx_packets, ps.last.0.tx_packets);
            let rx_bps = rate(cur.rx_bytes, ps.last.0.rx_bytes) * 8.0;
            let tx_bps = rate(cur.tx_bytes, ps.last.0.tx_bytes) * 8.0;
            ps.last = (cur, now);
            if self.cfg.stats_format == StatsFormat::Json {
                lines.push(serde_json::json!({"type": "port_stats", "port": i,
                    "rx_packets": d.rx_packets, "rx_missed": 0, "rx_bytes": d.rx_bytes, "rx_errors": d.rx_errors,
                    "rx_nombuf": d.rx_nombuf, "tx_packets": d.tx_packets, "tx_errors": 0, "tx_bytes": d.tx_bytes,
                    "rx_pps": rx_pps.round() as u64, "tx_pps": tx_pps.round() as u64,
                    "device_errors": d.device_errors}));
                continue;
            }
            s += &format!(
                "\n  ######################## NIC statistics for port {i}  ########################\n"
            );
            s += &format!(
                "  RX-packets: {:<10} RX-missed: {:<10} RX-bytes:  {}\n",
                d.rx_packets, 0, d.rx_bytes
            );
            s += &format!(
                "  RX-errors: {}\n  RX-nombuf:  {:<10}\n",
                d.rx_errors + d.device_errors,
                d.rx_nombuf
            );
            s += &format!(
                "  TX-packets: {:<10} TX-errors: {:<10} TX-bytes:  {}\n",
                d.tx_packets, 0, d.tx_bytes
            );
            s += "\n  Throughput (since last show)\n";
            s += &format!("  Rx-pps: {:>12.0}          Rx-bps: {:>12.0}\n", rx_pps, rx_bps);
            s += &format!("  Tx-pps: {:>12.0}          Tx-bps: {:>12.0}\n", tx_pps, tx_bps);
            s += "  ############################################################################\n";
        }
        for l in lines {
            s += &format!("{l}\n");
        }
        self.say(&s);
        Ok(())
    }

    /// `show port info all|N`.
    pub fn show_port_info(&mut self, which: Option<usize>) -> Result<(), String> {
        let range = self.port_range(which)?;
        let mut s = String::new();
        for i in range {
            let info = self.ports[i].port.info().clone();
            s += &format!("\n********************* Infos for port {i}  *********************\n");
            s += &format!("MAC address: {}\n", mac_str(&info.mac));
            s += &format!("Device: {}\n", info.description);
            s += &format!("Link status: {}\n", if info.link_up { "up" } else { "down" });
            s += &format!("MTU: {}\n", info.mtu);
            s += &format!("Negotiated features: {:#x}\n", info.features);
            s += &format!("Current number of RX queues: {}\n", info.queue_pairs);
            s += &format!("Current number of TX queues: {}\n", info.queue_pairs);
            s += &format!("Ring size: {}\n", info.ring_size);
            s += &format!(
                "Buffers free in pool: {} of {}\n",
                self.ctx[i].pool.available(),
                self.ctx[i].pool.capacity()
            );
        }
        self.say(&s);
        Ok(())
    }

    /// `clear port stats all|N`.
    pub fn clear_port_stats(&mut self, which: Option<usize>) -> Result<(), String> {
        for i in self.port_range(which)? {
            let ps = &mut self.ports[i];
            let cur = sum(&ps.port.stats());
            ps.base = cur;
            ps.last = (cur, Instant::now());
            self.say(&format!("\n  NIC statistics for port {i} cleared\n"));
        }
        Ok(())
    }

    /// After stop: receives whatever is still arriving for up to `quiet_ms` of silence and
    /// drops it; returns how many packets that was (they count as received, not lost).
    pub fn drain(&mut self, quiet_ms: u64) -> u64 {
        let mut n = 0u64;
        let mut batch = Vec::with_capacity(64);
        let mut last = Instant::now();
        while last.elapsed().as_millis() < quiet_ms as u128 {
            let mut got = 0;
            for s in self.streams.iter_mut() {
                got += s.rxq.rx_burst(&mut batch, 64);
                driver::free_bulk(&mut batch);
            }
            if got > 0 {
                n += got as u64;
                last = Instant::now();
            }
        }
        n
    }

    /// Stops forwarding if it runs, then closes every port (device reset, buffers back).
    pub fn close(mut self) -> Result<(), String> {
        if self.running.is_some() {
            self.stop();
        }
        let mut pairs: Vec<Vec<driver::QueuePair>> = (0..self.ports.len()).map(|_| Vec::new()).collect();
        // Streams hold halves of different ports; the device reset happens first (in
        // `close`), so dropping the halves afterwards returns their buffers.
        let streams = std::mem::take(&mut self.streams);
        let mut res = Ok(());
        for (i, ps) in self.ports.drain(..).enumerate() {
            if let Err(e) = ps.port.close(std::mem::take(&mut pairs[i])) {
                res = Err(format!("port {i}: close: {e}"));
            }
        }
        drop(streams);
        self.say("\nBye...\n");
        res
    }
}

fn fwd_lines(t: &FwdTotals) -> String {
    format!(
        "  RX-packets: {:<14} RX-dropped: {:<14} RX-total: {}\n  TX-packets: {:<14} TX-dropped: {:<14} TX-total: {}\n",
        t.rx_packets,
        t.rx_dropped,
        // Every frame that reached the port; the engine's drops are among them (virtio
        // has no "missed" counter that DPDK would add here).
        t.rx_packets,
        t.tx_packets,
        t.tx_dropped,
        t.tx_packets + t.tx_dropped
    )
}
