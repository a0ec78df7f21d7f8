//! The testpmd application state: open ports, the streams of the current forwarding
//! configuration, forwarding threads, and statistics in DPDK testpmd's layout (or JSON).
//!
//! Owns: port setup from the configuration (with the `--xdp-prog` program on every
//! receive queue), the streams and forwarding threads, start/stop of forwarding, draining
//! and closing the ports. The statistics it prints are in [`show`], the control commands
//! of the prompt in [`commands`]. Must not: parse the command line or prompt (config.rs
//! and interactive.rs do).
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

use driver::{Packet, Port, QueueStatsSnapshot, RxQueue, TxQueue, XdpVerdict};

use crate::config::{Config, FwdMode, XdpProg};
use crate::csum::CsumCfg;
use crate::engine::{forward, FwdParams, PortCtx, Stream, StreamStats};

mod commands;
mod ports;
mod show;
mod xstats;

use show::sum;

struct PortState {
    /// The device; None once `port close` closed it.
    port: Option<Port>,
    /// Counters at the last `clear port stats`.
    base: QueueStatsSnapshot,
    /// Counters and time at the last `show port stats` (for the rates).
    last: (QueueStatsSnapshot, Instant),
    /// `port config mtu`: the MTU testpmd holds the port to (at most the device's).
    mtu: u16,
    /// `mac_addr add`: the unicast addresses accepted besides the port's own.
    macs: Vec<[u8; 6]>,
    /// Extended counters at the last `clear port xstats` (empty: never cleared).
    xbase: Vec<(String, u64)>,
    /// Largest frame the port receives (one buffer's room; unbounded with MRG_RXBUF).
    rx_room: usize,
    /// `port config max-pkt-len`: the receive limit in force (set at `port start`).
    rx_max_pkt_len: Option<usize>,
    /// `port config max-pkt-len` given while the port was stopped, for its next start.
    pending_max_pkt_len: Option<usize>,
}

impl PortState {
    /// The open device ([`App::port_range`] names no closed port).
    fn dev(&self) -> Result<&Port, String> {
        self.port.as_ref().ok_or_else(|| "the port is closed".to_string())
    }
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
    /// Per port: `csum set` / `tso set` (the `csum` engine applies the transmitting
    /// port's).
    csum: Vec<CsumCfg>,
    /// Per port: forward totals at the last `clear fwd stats` (zero at `start`).
    fwd_base: Vec<FwdTotals>,
    /// `set verbose` level, shared with the forwarding threads.
    verbose: Arc<std::sync::atomic::AtomicU8>,
    /// The packet capture (`--pcap-out`, `set capture`), if one runs.
    capture: Option<Arc<crate::capture::Capture>>,
    /// Per port: the XDP-style program on its receive queues (`--xdp-prog`, `set xdp`).
    xdp: Vec<Option<XdpProg>>,
    /// (rx port, tx port) of each stream, in `stream_stats` order (set with the streams).
    meta: Vec<(u16, u16)>,
    /// Runs started (`start`): the nonce of the next run's latency stamps.
    runs: u8,
}

/// Prints DPDK testpmd's `Port N: link state change event` (and what the link is now)
/// each time port `i`'s link changes, from a thread of its own (as DPDK's callback runs
/// on its interrupt thread), until the port is closed.
fn link_events(i: usize, watch: driver::LinkWatch) {
    let spawned = std::thread::Builder::new().name(format!("link-{i}")).spawn(move || {
        let mut seen = watch.status().changes;
        loop {
            let s = watch.wait_change(seen, std::time::Duration::from_secs(3600));
            if s.closed {
                return;
            }
            if s.changes == seen {
                continue;
            }
            seen = s.changes;
            let now = if s.up {
                format!("up (reconnections: {})", s.reconnects)
            } else if s.failed {
                format!("down for good: {}", s.reason.as_deref().unwrap_or("no reason given"))
            } else {
                format!("down: {}", s.reason.as_deref().unwrap_or("no reason given"))
            };
            println!("\nPort {i}: link state change event\nPort {i}: link {now}");
        }
    });
    if let Err(e) = spawned {
        log::warn!("port {i}: no link state events: {e}");
    }
}

/// The program `--xdp-prog` names.
pub(super) fn xdp_program(p: XdpProg) -> Box<dyn driver::XdpProgram> {
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
        // PCI ports take packed rings when the device offers them unless packed_vq=0
        // says otherwise (DPDK's virtio PMD on PCI); virtio-user ports only when asked.
        let pci = cfg.pci.iter().map(|p| (p.port_config(), p.bdf.clone()));
        let specs = pci.chain(cfg.vdevs.iter().map(|v| (v.port_config(), v.path.display().to_string())));
        for (i, (mut pc, name)) in specs.enumerate() {
            pc.queue_pairs = cfg.queues;
            if cfg.interactive {
                pc.max_queue_pairs = Some(MAX_QUEUE_PAIRS.max(cfg.queues));
            }
            pc.buffers = cfg.mbufs;
            pc.headroom = cfg.headroom;
            pc.buf_size = cfg.mbuf_size.unwrap_or((cfg.headroom as u32 + 2048).div_ceil(64) * 64);
            pc.hugepages = cfg.hugepages;
            // DPDK's testpmd sets the port's MTU from --max-pkt-len (less the Ethernet
            // header and CRC); the driver checks it against what the device carries.
            pc.mtu = cfg.max_pkt_len.map(|m| m.saturating_sub(18) as u16);
            // Transmit offloads when the device offers them (DPDK's virtio PMD takes
            // them as tx offload capabilities; `csum set`/`tso set` use them).
            pc.features |= driver::port::TX_OFFLOADS;
            // Frames larger than one buffer arrive over several (MRG_RXBUF).
            let frame_room = pc.buf_size as usize - pc.headroom as usize - pc.tailroom as usize;
            let want_mrg = cfg.max_pkt_len.is_some_and(|m| m > frame_room);
            if want_mrg {
                pc.features |= driver::layout::features::bit(driver::layout::features::NET_MRG_RXBUF);
            }
            if cfg.enable_lro {
                // DPDK's virtio PMD takes `--enable-lro` as GUEST_TSO4/6 (with the
                // checksum offload they need); super-frames need mergeable buffers here.
                use driver::layout::features::{
                    bit, NET_GUEST_CSUM, NET_GUEST_TSO4, NET_GUEST_TSO6, NET_MRG_RXBUF,
                };
                pc.features |=
                    bit(NET_GUEST_CSUM) | bit(NET_GUEST_TSO4) | bit(NET_GUEST_TSO6) | bit(NET_MRG_RXBUF);
            }
            let data_room = pc.buf_size as usize - pc.headroom as usize;
            if let Some(big) = cfg.tx_segs.iter().find(|&&l| l > data_room) {
                return Err(format!(
                    "--txpkts segment of {big} bytes does not fit a buffer's {data_room}-byte data room \
                     (--mbuf-size {} with --headroom {}): list it as several segments",
                    pc.buf_size, pc.headroom
                ));
            }
            // XDP redirect between virtio-user ports: one pool for all of them, so a
            // redirected packet is never copied (the later ports share the first one's
            // memory with their devices).
            let nports = cfg.vdevs.len();
            if matches!(cfg.xdp, Some(XdpProg::Redirect(_))) && cfg.pci.is_empty() && nports > 1 {
                if let Some(first) = ports.first() {
                    pc.pool = first.port.as_ref().map(|p| p.pool().clone());
                } else {
                    let pairs = pc.max_queue_pairs.unwrap_or(1).max(cfg.queues) as u32;
                    let per_port = cfg.mbufs.unwrap_or(2 * 2 * pairs * pc.ring_size as u32);
                    pc.buffers = Some(per_port * nports as u32);
                }
            }
            let port = Port::open(pc).map_err(|e| format!("port {i} ({name}): {e}"))?;
            link_events(i, port.link_watch());
            let info = port.info().clone();
            let mrg =
                info.features & driver::layout::features::bit(driver::layout::features::NET_MRG_RXBUF) != 0;
            if want_mrg && !mrg {
                return Err(format!(
                    "--max-pkt-len {}: port {i} ({name}) receives frames of at most {frame_room} bytes \
                     (its device does not offer VIRTIO_NET_F_MRG_RXBUF): raise --mbuf-size",
                    cfg.max_pkt_len.unwrap_or(0)
                ));
            }
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
                stopped: Arc::new(AtomicBool::new(false)),
            });
            let snap = sum(&port.stats());
            let mtu = info.mtu;
            ports.push(PortState {
                port: Some(port),
                base: snap,
                last: (snap, Instant::now()),
                mtu,
                macs: Vec::new(),
                xbase: Vec::new(),
                rx_room: if mrg { usize::MAX } else { frame_room },
                rx_max_pkt_len: None,
                pending_max_pkt_len: None,
            });
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
            for qp in ps.port.as_mut().map(|p| p.take_queue_pairs()).unwrap_or_default() {
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
        let csum = vec![CsumCfg::default(); ports.len()];
        let fwd_base = vec![FwdTotals::default(); ports.len()];
        let mut app = App {
            fwd_base,
            verbose: Arc::new(std::sync::atomic::AtomicU8::new(0)),
            capture: None,
            xdp: vec![cfg.xdp; n],
            meta: Vec::new(),
            // Seeded from the clock: a restarted testpmd's stamps differ from the last
            // process's for a receiver that outlives it.
            runs: (crate::latency::now_ns() >> 10) as u8,
            csum,
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
        if let Some(spec) = app.cfg.capture.clone() {
            app.set_capture(Some(spec))?;
        }
        Ok(app)
    }

    /// (Re)builds the streams for `cfg.queues` queues from the halves set aside.
    /// Streams: port p's queue q receives; its peer (p ^ 1, or p itself for the odd last
    /// port, as testpmd's paired topology does) transmits. Every active queue half of an
    /// open port whose peer is open is in exactly one stream (a pair with a closed port
    /// forwards nothing).
    fn build_streams(&mut self) -> Result<(), String> {
        self.unbuild_streams();
        let n = self.ports.len();
        let mut streams = Vec::new();
        for p in 0..n {
            let peer = if p ^ 1 < n { p ^ 1 } else { p };
            if self.ports[p].port.is_none() || self.ports[peer].port.is_none() {
                continue;
            }
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
                    stats: Arc::new(StreamStats::new(self.cfg.burst_stats)),
                    fifo: Default::default(),
                    held: Vec::new(),
                    lat: crate::latency::StreamLatency::new(peer as u16, q as u16),
                });
            }
        }
        self.stream_stats = streams.iter().map(|s| s.stats.clone()).collect();
        self.meta = streams.iter().map(|s| (s.rx_port, s.tx_port)).collect();
        self.streams = streams;
        Ok(())
    }

    /// Puts every stream's halves back aside (forwarding stopped).
    fn unbuild_streams(&mut self) {
        for s in self.streams.drain(..) {
            self.halves[s.rx_port as usize].rx[s.queue as usize] = Some(s.rxq);
            self.halves[s.tx_port as usize].tx[s.queue as usize] = Some(s.txq);
        }
    }

    fn say(&mut self, s: &str) {
        let _ = self.out.write_all(s.as_bytes());
        let _ = self.out.flush();
    }

    /// Whether every port can send frames of segments `segs` (`set txpkts`): each
    /// segment fits a buffer's data room, the frame the port's MTU + 14.
    pub fn check_tx_segs(&self, segs: &[usize]) -> Result<(), String> {
        let total: usize = segs.iter().sum();
        for (i, port) in self.open_ports() {
            let pool = port.pool();
            let room = (pool.buf_size() - pool.headroom() as u32) as usize;
            if let Some(big) = segs.iter().find(|&&l| l > room) {
                return Err(format!(
                    "txpkts: a {big}-byte segment does not fit port {i}'s {room}-byte buffers"
                ));
            }
            let mtu = self.ports[i].mtu as usize;
            if total > mtu + 14 {
                return Err(format!("txpkts: a {total}-byte frame is above port {i}'s MTU {mtu} + 14"));
            }
        }
        Ok(())
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
            s.latency.reset();
            s.rx_spread.reset();
            s.tx_spread.reset();
        }
        // Each run's stamps carry a new nonce: frames of an earlier run still in a ring
        // are told apart (counted stale, not measured).
        self.runs = self.runs.wrapping_add(1);
        for s in self.streams.iter_mut() {
            s.lat.reset(self.runs);
        }
        self.fwd_base.iter_mut().for_each(|b| *b = FwdTotals::default());
        let params = FwdParams {
            mode: self.cfg.mode,
            burst: self.cfg.burst,
            txpkts: self.cfg.txpkts,
            tx_segs: self.cfg.tx_segs.clone(),
            csum: self.csum.clone(),
            flows: self.cfg.flows,
            xdp: self.xdp.clone(),
            verbose: self.verbose.clone(),
            capture: self.capture.clone(),
            noisy: self.cfg.noisy,
            latency: self.cfg.latency,
            tx_pps: self.cfg.tx_pps,
            burst_stats: self.cfg.burst_stats,
            idle_pause: self.cfg.idle_pause,
            hold_tx: self.cfg.hold_tx,
        };
        // XDP Tx/Redirect packets of queue q go out on queue q of another stream: all
        // streams of one queue index share a thread, so no packet crosses threads
        // (`stream_cores`).
        let (cores, of) = self.stream_cores();
        let mut per: Vec<Vec<Stream>> = (0..cores).map(|_| Vec::new()).collect();
        for (i, s) in self.streams.drain(..).enumerate() {
            per[of[i]].push(s);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        // Before the first thread runs: the rates and `--tx-pps` checks divide by this
        // time, and a thread may forward before `start` returns.
        let started = Instant::now();
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
        self.running = Some(Running { stop, threads, started });
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

    /// The open ports `all` (None) or `N` names, or an error naming the port count or
    /// saying the port is closed.
    fn port_range(&self, which: Option<usize>) -> Result<Vec<usize>, String> {
        match which {
            None => Ok(self.open_ports().map(|(i, _)| i).collect()),
            Some(p) if p < self.ports.len() && self.ports[p].port.is_some() => Ok(vec![p]),
            Some(p) if p < self.ports.len() => Err(format!("Port {p} is closed")),
            Some(p) => Err(format!("Invalid port {p}: {} port(s) exist", self.ports.len())),
        }
    }

    /// The ports not closed, with their ids.
    fn open_ports(&self) -> impl Iterator<Item = (usize, &Port)> {
        self.ports.iter().enumerate().filter_map(|(i, ps)| Some((i, ps.port.as_ref()?)))
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
        let halves = std::mem::take(&mut self.halves);
        let mut res = Ok(());
        for (i, ps) in self.ports.drain(..).enumerate() {
            let Some(port) = ps.port else { continue };
            if let Err(e) = port.close(std::mem::take(&mut pairs[i])) {
                res = Err(format!("port {i}: close: {e}"));
            }
        }
        drop(streams);
        drop(halves);
        if let Err(e) = self.set_capture(None) {
            res = res.and(Err(e));
        }
        // Every buffer is back once the ports are closed and the queues dropped (frames
        // lost to a back-end restart included): a shortfall here is a leak.
        let pools: Vec<(u32, u32)> =
            self.ctx.iter().map(|c| (c.pool.available(), c.pool.capacity())).collect();
        for (i, (free, cap)) in pools.into_iter().enumerate() {
            self.say(&format!("Port {i}: buffers free in pool: {free} of {cap}\n"));
        }
        self.say("\nBye...\n");
        res
    }
}
