//! The testpmd application state: open ports, the streams of the current forwarding
//! configuration, forwarding threads, and statistics in DPDK testpmd's layout (or JSON).
//!
//! Owns: port setup from the configuration (with the `--xdp-prog` program on every
//! receive queue), start/stop of forwarding, `show port stats|info`, `clear port stats`,
//! the control commands of the prompt (promiscuous and all-multicast modes, MAC address,
//! VLAN filter, number of queue pairs), and the forward statistics printed at stop.
//! Must not: parse the command line or prompt (config.rs and interactive.rs do).
//!
//! Queue pairs: in interactive mode each port sets up as many pairs as the device has
//! (up to [`MAX_QUEUE_PAIRS`]) and activates `--rxq`; `port config all rxq N` changes the
//! active count with the control queue's `VQ_PAIRS_SET` while forwarding is stopped, and
//! the streams are rebuilt from the halves kept aside.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use driver::{Packet, Port, PortConfig, QueueStatsSnapshot, RxQueue, TxQueue, XdpVerdict};

use crate::config::{Config, FwdMode, StatsFormat, XdpProg};
use crate::engine::{forward, FwdParams, PortCtx, Stream, StreamStats};

struct PortState {
    port: Port,
    /// Counters at the last `clear port stats`.
    base: QueueStatsSnapshot,
    /// Counters and time at the last `show port stats` (for the rates).
    last: (QueueStatsSnapshot, Instant),
}

/// Most queue pairs an interactive port sets up (for `port config all rxq N`).
pub const MAX_QUEUE_PAIRS: u16 = 8;

/// The queue halves of one port not in a stream (all of them while streams are rebuilt).
#[derive(Default)]
struct Halves {
    rx: Vec<Option<RxQueue>>,
    tx: Vec<Option<TxQueue>>,
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
    halves: Vec<Halves>,
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
        t.xdp_pass += s.xdp_pass;
        t.xdp_drop += s.xdp_drop;
        t.xdp_tx += s.xdp_tx;
        t.xdp_redirect += s.xdp_redirect;
        t.xdp_aborted += s.xdp_aborted;
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
        xdp_pass: a.xdp_pass - b.xdp_pass,
        xdp_drop: a.xdp_drop - b.xdp_drop,
        xdp_tx: a.xdp_tx - b.xdp_tx,
        xdp_redirect: a.xdp_redirect - b.xdp_redirect,
        xdp_aborted: a.xdp_aborted - b.xdp_aborted,
    }
}

/// The program `--xdp-prog` names.
fn xdp_program(p: XdpProg) -> Box<dyn driver::XdpProgram> {
    match p {
        XdpProg::Pass => Box::new(|_: &mut Packet| XdpVerdict::Pass),
        XdpProg::Drop => Box::new(|_: &mut Packet| XdpVerdict::Drop),
        XdpProg::Tx => Box::new(|p: &mut Packet| {
            let d = p.data_mut();
            if d.len() >= 12 {
                let (a, b) = d[..12].split_at_mut(6);
                a.swap_with_slice(b);
            }
            XdpVerdict::Tx
        }),
        // Target 0 of every queue is the redirect port (the engine maps it).
        XdpProg::Redirect(_) => Box::new(|_: &mut Packet| XdpVerdict::Redirect(0)),
    }
}

/// Parses `on|off`.
pub fn on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("Bad arguments: '{s}' is not on or off")),
    }
}

/// A MAC as testpmd prints it.
pub fn mac_str(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

impl App {
    /// Opens every port of `cfg` and builds the streams.
    pub fn open(cfg: Config, out: Box<dyn Write + Send>) -> Result<App, String> {
        let mut ports: Vec<PortState> = Vec::new();
        let mut ctx = Vec::new();
        // PCI ports first, then virtio-user ones (DPDK's port order).
        let specs = cfg.pci.iter().map(|bdf| (PortConfig::vfio_pci(bdf), bdf.clone())).chain(
            cfg.vdevs.iter().map(|v| {
                let mut pc = PortConfig::virtio_user(&v.path);
                pc.ring_size = v.queue_size;
                pc.mac = v.mac;
                if !v.in_order {
                    pc.features &= !driver::layout::features::bit(driver::layout::features::IN_ORDER);
                }
                (pc, v.path.display().to_string())
            }),
        );
        for (i, (mut pc, name)) in specs.enumerate() {
            pc.queue_pairs = cfg.queues;
            if cfg.interactive {
                pc.max_queue_pairs = Some(MAX_QUEUE_PAIRS.max(cfg.queues));
            }
            pc.buffers = cfg.mbufs;
            pc.headroom = cfg.headroom;
            pc.buf_size = (cfg.headroom as u32 + 2048).div_ceil(64) * 64;
            pc.hugepages = cfg.hugepages;
            // XDP redirect between virtio-user ports: one pool for all of them, so a
            // redirected packet is never copied (the later ports share the first one's
            // memory with their devices).
            let nports = cfg.vdevs.len();
            if matches!(cfg.xdp, Some(XdpProg::Redirect(_))) && cfg.pci.is_empty() && nports > 1 {
                if let Some(first) = ports.first() {
                    pc.pool = Some(first.port.pool().clone());
                } else {
                    let pairs = pc.max_queue_pairs.unwrap_or(1).max(cfg.queues) as u32;
                    let per_port = cfg.mbufs.unwrap_or(2 * 2 * pairs * pc.ring_size as u32);
                    pc.buffers = Some(per_port * nports as u32);
                }
            }
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
        let n = ports.len();
        if let Some(XdpProg::Redirect(t)) = cfg.xdp {
            if t as usize >= n {
                return Err(format!("--xdp-prog redirect:{t}: there are {n} port(s)"));
            }
        }
        let mut halves: Vec<Halves> = Vec::new();
        for (i, ps) in ports.iter_mut().enumerate() {
            let mut h = Halves::default();
            for qp in ps.port.take_queue_pairs() {
                let mut rx = qp.rx;
                if let Some(x) = cfg.xdp {
                    rx.attach_xdp(xdp_program(x))
                        .map_err(|e| format!("port {i}: --xdp-prog {}: {e}", x.name()))?;
                }
                h.rx.push(Some(rx));
                h.tx.push(Some(qp.tx));
            }
            halves.push(h);
        }
        if n % 2 == 1 && n > 1 {
            let _ = writeln!(std::io::stderr(), "Warning! port-topology=paired and odd forward ports number, the last port will pair with itself.");
        }
        let mut app = App {
            cfg,
            ports,
            ctx,
            streams: Vec::new(),
            halves,
            stream_stats: Vec::new(),
            running: None,
            out,
        };
        app.build_streams()?;
        Ok(app)
    }

    /// (Re)builds the streams for `cfg.queues` queues from the halves set aside.
    /// Streams: port p's queue q receives; its peer (p ^ 1, or p itself for the odd last
    /// port, as testpmd's paired topology does) transmits. Every active queue half is in
    /// exactly one stream.
    fn build_streams(&mut self) -> Result<(), String> {
        for s in self.streams.drain(..) {
            self.halves[s.rx_port as usize].rx[s.queue as usize] = Some(s.rxq);
            self.halves[s.tx_port as usize].tx[s.queue as usize] = Some(s.txq);
        }
        let n = self.ports.len();
        let mut streams = Vec::new();
        for p in 0..n {
            let peer = if p ^ 1 < n { p ^ 1 } else { p };
            for q in 0..self.cfg.queues as usize {
                let rxq = self.halves[p].rx.get_mut(q).and_then(Option::take);
                let txq = self.halves[peer].tx.get_mut(q).and_then(Option::take);
                let (Some(rxq), Some(txq)) = (rxq, txq) else {
                    return Err(format!("internal error: queue {q} of port {p} or {peer} is missing"));
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
        self.stream_stats = streams.iter().map(|s| s.stats.clone()).collect();
        self.streams = streams;
        Ok(())
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
            xdp: self.cfg.xdp,
        };
        // XDP Tx/Redirect packets of queue q go out on queue q of another stream: all
        // streams of one queue index share a thread, so no packet crosses threads.
        let by_queue = matches!(self.cfg.xdp, Some(XdpProg::Tx | XdpProg::Redirect(_)));
        let groups = if by_queue { self.cfg.queues as usize } else { self.streams.len() };
        let cores = self.cfg.nb_cores.min(groups).max(1);
        let mut per: Vec<Vec<Stream>> = (0..cores).map(|_| Vec::new()).collect();
        for (i, s) in self.streams.drain(..).enumerate() {
            let k = if by_queue { s.queue as usize } else { i };
            per[k % cores].push(s);
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
        self.stream_stats = self.streams.iter().map(|s| s.stats.clone()).collect();
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
                    "device_errors": d.device_errors,
                    "xdp_pass": d.xdp_pass, "xdp_drop": d.xdp_drop, "xdp_tx": d.xdp_tx,
                    "xdp_redirect": d.xdp_redirect, "xdp_aborted": d.xdp_aborted}));
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
            if self.cfg.xdp.is_some()
                || d.xdp_pass + d.xdp_drop + d.xdp_tx + d.xdp_redirect + d.xdp_aborted > 0
            {
                s += &format!(
                    "  XDP-pass: {:<12} XDP-drop: {:<12} XDP-tx: {:<12} XDP-redirect: {:<12} XDP-aborted: {}\n",
                    d.xdp_pass, d.xdp_drop, d.xdp_tx, d.xdp_redirect, d.xdp_aborted
                );
            }
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

    /// Port `i`'s driver counters since open, over every queue.
    pub fn port_totals(&self, i: usize) -> QueueStatsSnapshot {
        sum(&self.ports[i].port.stats())
    }

    /// `show port info all|N`.
    pub fn show_port_info(&mut self, which: Option<usize>) -> Result<(), String> {
        let range = self.port_range(which)?;
        let mut s = String::new();
        for i in range {
            let info = self.ports[i].port.info().clone();
            s += &format!("\n********************* Infos for port {i}  *********************\n");
            s += &format!("MAC address: {}\n", mac_str(&self.ctx[i].mac));
            s += &format!("Device: {}\n", info.description);
            s += &format!("Link status: {}\n", if info.link_up { "up" } else { "down" });
            s += &format!("MTU: {}\n", info.mtu);
            s += &format!("Negotiated features: {:#x}\n", info.features);
            let ctl = self.ports[i].port.control();
            s += &format!("Current number of RX queues: {}\n", ctl.queue_pairs());
            s += &format!("Max possible RX queues: {}\n", info.queue_pairs);
            s += &format!("Current number of TX queues: {}\n", ctl.queue_pairs());
            s += &format!("Max possible TX queues: {}\n", info.queue_pairs);
            s += &format!(
                "Control queue: {}\n",
                if info.control_queue { "yes" } else { "no (VIRTIO_NET_F_CTRL_VQ not negotiated)" }
            );
            s += &format!(
                "XDP program: {}\n",
                self.cfg.xdp.map(|x| x.name()).unwrap_or_else(|| "none".into())
            );
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

    /// `set promisc all|N on|off`.
    pub fn set_promisc(&mut self, which: Option<usize>, on: bool) -> Result<(), String> {
        for i in self.port_range(which)? {
            self.ports[i].port.control().set_promisc(on).map_err(|e| format!("port {i}: {e}"))?;
            self.say(&format!("Port {i}: promiscuous mode {}\n", if on { "enabled" } else { "disabled" }));
        }
        Ok(())
    }

    /// `set allmulti all|N on|off`.
    pub fn set_allmulti(&mut self, which: Option<usize>, on: bool) -> Result<(), String> {
        for i in self.port_range(which)? {
            self.ports[i].port.control().set_allmulti(on).map_err(|e| format!("port {i}: {e}"))?;
            self.say(&format!("Port {i}: all-multicast mode {}\n", if on { "enabled" } else { "disabled" }));
        }
        Ok(())
    }

    /// `mac_addr set N MAC`: the device's address (and the source MAC of mac/txonly).
    pub fn set_mac_addr(&mut self, port: usize, mac: [u8; 6]) -> Result<(), String> {
        if self.running.is_some() {
            return Err("Please stop forwarding first (the MAC address cannot change while it runs)".into());
        }
        self.port_range(Some(port))?;
        self.ports[port].port.control().set_mac_addr(mac).map_err(|e| format!("port {port}: {e}"))?;
        self.ctx[port].mac = mac;
        self.say(&format!("Port {port}: MAC address set to {}\n", mac_str(&mac)));
        Ok(())
    }

    /// `rx_vlan add|rm ID all|N`.
    pub fn rx_vlan(&mut self, add: bool, vid: u16, which: Option<usize>) -> Result<(), String> {
        for i in self.port_range(which)? {
            let c = self.ports[i].port.control();
            if add { c.vlan_add(vid) } else { c.vlan_del(vid) }.map_err(|e| format!("port {i}: {e}"))?;
            self.say(&format!(
                "Port {i}: VLAN {vid} {}\n",
                if add { "added to the filter" } else { "removed" }
            ));
        }
        Ok(())
    }

    /// `port config all rxq|txq N`: every port uses N queue pairs (forwarding stopped).
    pub fn config_queues(&mut self, n: u16) -> Result<(), String> {
        if self.running.is_some() {
            return Err("Please stop forwarding first (port config needs the ports stopped)".into());
        }
        for (i, ps) in self.ports.iter().enumerate() {
            let max = ps.port.control().max_queue_pairs();
            if n == 0 || n > max {
                return Err(format!("port {i}: {n} queues: 1..={max} are set up on this port"));
            }
        }
        for (i, ps) in self.ports.iter().enumerate() {
            let c = ps.port.control();
            if c.queue_pairs() != n {
                c.set_queue_pairs(n).map_err(|e| format!("port {i}: {e}"))?;
            }
        }
        self.cfg.queues = n;
        self.build_streams()?;
        self.say(&format!("All ports: {n} queue pair(s) (rxq = txq = {n})\n"));
        Ok(())
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
        let halves = std::mem::take(&mut self.halves);
        let mut res = Ok(());
        for (i, ps) in self.ports.drain(..).enumerate() {
            if let Err(e) = ps.port.close(std::mem::take(&mut pairs[i])) {
                res = Err(format!("port {i}: close: {e}"));
            }
        }
        drop(streams);
        drop(halves);
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
