//! Forwarding engines and the per-core forwarding loop.
//!
//! Owns: what each `--forward-mode` does to a burst (DPDK testpmd's semantics), the
//! stream model (one stream = a receive queue of one port and a transmit queue of its
//! peer port, each queue in exactly one stream), per-stream forward counters, the loop a
//! forwarding thread runs over the streams it owns, and the hand-over of the packets an
//! XDP program sent on (Tx: to the stream transmitting on the receiving port's queue;
//! Redirect: to the stream transmitting on the target port's queue, both of the same
//! queue index and so on this thread), skipping the streams of a stopped port (`port
//! stop`), and handing frames to the `set verbose` dumps and the packet capture.
//! Must not: open ports, or print anything but the verbose dumps ([`crate::dump`]).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use driver::frame::{self, ETH_HLEN, IPV4_HLEN, UDP_HLEN};
use driver::{Mempool, Packet, RxQueue, TxQueue};

use crate::config::{FwdMode, XdpProg};
use crate::csum::{self, CsumCfg};

/// Forward counters of one stream (single writer: its forwarding thread).
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct StreamStats {
    /// Packets received on the stream's receive queue.
    pub rx_packets: AtomicU64,
    /// Packets the engine dropped after receiving them (e.g. icmpecho non-requests).
    pub rx_dropped: AtomicU64,
    /// Packets queued on the transmit queue.
    pub tx_packets: AtomicU64,
    /// Packets that did not fit the transmit ring (freed).
    pub tx_dropped: AtomicU64,
    /// `--latency`: what the stream received, measured.
    pub latency: crate::latency::RxLatency,
    /// `--record-burst-stats`: packets per receive / transmit burst call (empty when off).
    pub rx_spread: crate::burst_stats::Spread,
    pub tx_spread: crate::burst_stats::Spread,
}

impl StreamStats {
    /// Counters for a new stream; burst spreads only if `burst_stats`.
    pub fn new(burst_stats: bool) -> Self {
        StreamStats {
            rx_spread: crate::burst_stats::Spread::new(burst_stats),
            tx_spread: crate::burst_stats::Spread::new(burst_stats),
            ..Default::default()
        }
    }
}

#[inline]
fn bump(c: &AtomicU64, v: u64) {
    if v != 0 {
        c.store(c.load(Ordering::Relaxed) + v, Ordering::Relaxed);
    }
}

/// What the engines need to know about a port.
#[derive(Clone)]
pub struct PortCtx {
    /// Port id.
    pub id: u16,
    /// Its MAC.
    pub mac: [u8; 6],
    /// Its peer's MAC (`--eth-peer`, default 02:00:00:00:00:<id>).
    pub peer: [u8; 6],
    /// Its buffer pool.
    pub pool: Mempool,
    /// `port stop N`: its streams (receiving or transmitting on it) are not run.
    pub stopped: Arc<AtomicBool>,
}

/// Settings the engines read; copied into each forwarding thread at start.
#[derive(Clone, Debug)]
pub struct FwdParams {
    /// Mode.
    pub mode: FwdMode,
    /// Burst size.
    pub burst: usize,
    /// txonly/flowgen frame length.
    pub txpkts: usize,
    /// txonly/flowgen segment lengths (more than one: chained frames, DPDK's
    /// `--txpkts A,B`).
    pub tx_segs: Vec<usize>,
    /// `csum` mode: each transmitting port's checksum and TSO settings, by port id.
    pub csum: Vec<CsumCfg>,
    /// flowgen flows.
    pub flows: u32,
    /// The XDP-style program on each port's receive queues, by port id (`--xdp-prog`,
    /// `set xdp`).
    pub xdp: Vec<Option<XdpProg>>,
    /// `set verbose`: bit 0 dumps received frames, bit 1 sent ones (DPDK's levels);
    /// read once per burst, so it changes while forwarding runs.
    pub verbose: Arc<AtomicU8>,
    /// The packet capture, if one runs.
    pub capture: Option<Arc<crate::capture::Capture>>,
    /// `noisy` mode settings.
    pub noisy: crate::noisy::NoisyCfg,
    /// `--latency`: stamp what txonly/flowgen send, measure what is received.
    pub latency: bool,
    /// `--tx-pps`: txonly/flowgen frames per second per stream (0: unpaced).
    pub tx_pps: u64,
    /// `--record-burst-stats`.
    pub burst_stats: bool,
    /// `--idle-pause`: pause instructions after a pass that moved nothing.
    pub idle_pause: u32,
    /// `--hold-tx`: what the transmit ring does not take waits in [`Stream::held`].
    pub hold_tx: bool,
}

/// One receive queue → one transmit queue.
pub struct Stream {
    /// Receiving port.
    pub rx_port: u16,
    /// Queue index (same on both ports).
    pub queue: u16,
    /// Transmitting port.
    pub tx_port: u16,
    /// Receive half.
    pub rxq: RxQueue,
    /// Transmit half.
    pub txq: TxQueue,
    /// Counters.
    pub stats: Arc<StreamStats>,
    /// `noisy` mode: frames held back.
    pub fifo: crate::noisy::Fifo,
    /// `--hold-tx`: frames the transmit ring did not take, sent before anything is
    /// received again (at most a burst).
    pub held: Vec<Packet>,
    /// `--latency` / `--tx-pps`: stamps, pacing and sequence state.
    pub lat: crate::latency::StreamLatency,
}

/// The frame txonly sends: UDP/IPv4 from 198.18.0.1:9 to 198.18.0.2:9 (DPDK's txonly
/// addresses), a valid IPv4 header checksum and no UDP checksum (0, which IPv4 allows,
/// as DPDK's txonly sends): only the headers are written per packet (see
/// [`EngineState::new`]), so the checksum must not cover the payload.
pub fn txonly_template(len: usize, src: [u8; 6], dst: [u8; 6]) -> Vec<u8> {
    let mut f = frame::udp4_frame(len, dst, src, [198, 18, 0, 1], [198, 18, 0, 2], 9, 9, |i| i as u8);
    let c = ETH_HLEN + IPV4_HLEN + 6;
    if f.len() >= c + 2 {
        f[c..c + 2].copy_from_slice(&[0, 0]);
    }
    f
}

/// Header bytes txonly and flowgen write per packet: Ethernet, IPv4 and UDP.
const TX_HDR: usize = ETH_HLEN + IPV4_HLEN + UDP_HLEN;

/// Writes `tpl` into every free buffer of `pool` at the default headroom, so that a
/// generated packet only needs its headers written (DPDK's txonly, too, writes only
/// headers per packet). A buffer that later carries other data (a received frame, in io
/// mode before `start tx_first`) keeps those payload bytes: the UDP checksum is none.
fn prefill(pool: &Mempool, tpl: &[u8]) {
    let mut all = Vec::with_capacity(pool.available() as usize);
    pool.alloc_bulk(pool.available() as usize, &mut all);
    for p in all.iter_mut() {
        let _ = p.set_data(tpl);
    }
    driver::free_bulk(&mut all);
}

/// Per-thread state of an engine (templates built once, flow counter).
pub struct EngineState {
    params: FwdParams,
    /// txonly/flowgen template per transmitting port id.
    templates: Vec<Vec<u8>>,
    next_flow: u32,
    batch: Vec<Packet>,
    /// `csum` mode: a multi-segment frame's bytes for the software sums (sized once for
    /// the largest frame).
    scratch: Vec<u8>,
    /// `--txpkts A,B,...`: a burst's buffers before they are chained (sized once).
    segs: Vec<Packet>,
    /// `noisy` mode: the lookup memory and FIFO policy.
    noisy: Option<crate::noisy::Noisy>,
}

impl EngineState {
    /// State for `params` over `ports` (pre-filling their pools with the txonly payload).
    pub fn new(params: FwdParams, ports: &[PortCtx]) -> Self {
        let templates: Vec<Vec<u8>> =
            ports.iter().map(|p| txonly_template(params.txpkts, p.mac, p.peer)).collect();
        for (p, t) in ports.iter().zip(&templates) {
            prefill(&p.pool, t);
        }
        let batch = Vec::with_capacity(params.burst);
        let scratch = Vec::with_capacity(if params.mode == FwdMode::Csum {
            driver::queue::MAX_MERGED_FRAME
        } else {
            0
        });
        let segs = Vec::with_capacity(if params.tx_segs.len() > 1 {
            params.burst * params.tx_segs.len()
        } else {
            0
        });
        let noisy =
            (params.mode == FwdMode::Noisy).then(|| crate::noisy::Noisy::new(params.noisy, params.burst));
        EngineState { params, templates, next_flow: 0, batch, scratch, segs, noisy }
    }

    /// Fills `self.batch` with up to `n` generated packets for `port`.
    fn generate(&mut self, port: &PortCtx, flowgen: bool, n: usize) {
        if self.params.tx_segs.len() > 1 {
            return self.generate_chained(port, flowgen, n);
        }
        port.pool.alloc_bulk(n, &mut self.batch);
        let tpl = &self.templates[port.id as usize];
        let hdr = TX_HDR.min(tpl.len());
        for p in self.batch.iter_mut() {
            // The template fits: txpkts <= MTU + 14 was checked against the port. The
            // payload is in the buffer already (`prefill`).
            if let Ok(d) = p.push_tail(tpl.len()) {
                d[..hdr].copy_from_slice(&tpl[..hdr]);
            }
            if flowgen {
                let flow = self.next_flow;
                self.next_flow = (self.next_flow + 1) % self.params.flows;
                let d = p.data_mut();
                let ip = &mut d[ETH_HLEN..ETH_HLEN + IPV4_HLEN];
                ip[18..20].copy_from_slice(&(flow as u16).to_be_bytes());
                ip[10..12].copy_from_slice(&[0, 0]);
                let c = frame::inet_checksum(ip);
                ip[10..12].copy_from_slice(&c.to_be_bytes());
            }
        }
    }

    /// `generate` with `--txpkts A,B,...`: each frame a chain of buffers of those
    /// lengths (DPDK's txonly with several segments). As DPDK's, the burst's buffers are
    /// taken from the pool at once and only the headers are written (into whichever
    /// segments hold them); the payload is what the buffers already hold. A burst the
    /// pool cannot fill whole sends the frames it could complete.
    fn generate_chained(&mut self, port: &PortCtx, flowgen: bool, n: usize) {
        let tpl = &self.templates[port.id as usize];
        let hdr = TX_HDR.min(tpl.len());
        let nseg = self.params.tx_segs.len();
        let mut segs = std::mem::take(&mut self.segs);
        port.pool.alloc_bulk(n * nseg, &mut segs);
        let frames = segs.len() / nseg;
        let mut it = segs.drain(..frames * nseg);
        'frames: for _ in 0..frames {
            let mut head: Option<Packet> = None;
            let mut at = 0;
            for &len in &self.params.tx_segs {
                let Some(mut seg) = it.next() else { break 'frames };
                // `--txpkts` checked that each segment fits a buffer.
                let Ok(d) = seg.push_tail(len) else { break 'frames };
                if at < hdr {
                    let n = len.min(hdr - at);
                    d[..n].copy_from_slice(&tpl[at..at + n]);
                }
                at += len;
                match head.as_mut() {
                    None => head = Some(seg),
                    Some(h) => {
                        if h.append(seg).is_err() {
                            break 'frames;
                        }
                    }
                }
            }
            let Some(mut h) = head else { break };
            if flowgen && h.len() >= ETH_HLEN + IPV4_HLEN {
                let flow = self.next_flow;
                self.next_flow = (self.next_flow + 1) % self.params.flows;
                let ip = &mut h.data_mut()[ETH_HLEN..ETH_HLEN + IPV4_HLEN];
                ip[18..20].copy_from_slice(&(flow as u16).to_be_bytes());
                ip[10..12].copy_from_slice(&[0, 0]);
                let c = frame::inet_checksum(ip);
                ip[10..12].copy_from_slice(&c.to_be_bytes());
            }
            self.batch.push(h);
        }
        drop(it);
        // What did not make a whole frame (or was left after a failure) goes back.
        driver::free_bulk(&mut segs);
        self.segs = segs;
    }

    /// Runs one burst of the engine on `s`; returns the packets moved.
    pub fn burst(&mut self, s: &mut Stream, ports: &[PortCtx]) -> usize {
        let mode = self.params.mode;
        let mut rx_dropped = 0u64;
        let received = match mode {
            FwdMode::TxOnly | FwdMode::FlowGen => {
                if s.rxq.reset_pending() && !self.params.latency {
                    // The receive queue this engine never reads still resets its ring
                    // when its back-end went away (what the old one delivered is freed).
                    s.rxq.rx_burst(&mut self.batch, self.params.burst);
                    driver::free_bulk(&mut self.batch);
                }
                let mut n = self.params.burst;
                if self.params.latency || self.params.tx_pps != 0 {
                    n = self.measure_and_pace(s);
                    if n == 0 {
                        return 0;
                    }
                }
                self.generate(&ports[s.tx_port as usize], mode == FwdMode::FlowGen, n);
                if self.params.latency {
                    Self::stamp(s, &mut self.batch);
                }
                0
            }
            _ => {
                if self.params.hold_tx && !s.held.is_empty() && !Self::send_held(s) {
                    return 0;
                }
                let n = s.rxq.rx_burst(&mut self.batch, self.params.burst);
                if self.params.burst_stats {
                    s.stats.rx_spread.record(n);
                }
                if n == 0 {
                    // An idle transmit queue still resets its ring when its back-end
                    // went away (the driver's `reset_pending`), so the port comes back
                    // whole.
                    if s.txq.reset_pending() {
                        s.txq.reclaim();
                    }
                    if let Some(noisy) = self.noisy.as_mut() {
                        let (txq, burst) = (&mut s.txq, self.params.burst);
                        let (sent, dropped) = noisy.flush(&mut s.fifo, burst, &mut |v| txq.tx_burst(v));
                        bump(&s.stats.tx_packets, sent);
                        bump(&s.stats.tx_dropped, dropped);
                        return sent as usize;
                    }
                    return 0;
                }
                if self.params.latency {
                    Self::measure(s, &self.batch);
                }
                if self.params.verbose.load(Ordering::Relaxed) & 1 != 0 {
                    crate::dump::burst(s.rx_port, s.queue, true, &self.batch);
                }
                if let Some(c) = self.params.capture.as_deref().filter(|c| c.wants(s.rx_port, s.queue, true))
                {
                    c.offer(&self.batch);
                }
                n
            }
        };
        match mode {
            FwdMode::RxOnly => {
                driver::free_bulk(&mut self.batch);
                bump(&s.stats.rx_packets, received as u64);
                return received;
            }
            FwdMode::Mac => {
                let tx = &ports[s.tx_port as usize];
                driver::for_each_data_mut(&mut self.batch, |d| {
                    if d.len() >= 12 {
                        d[0..6].copy_from_slice(&tx.peer);
                        d[6..12].copy_from_slice(&tx.mac);
                    }
                });
            }
            FwdMode::Csum => {
                let tx = &ports[s.tx_port as usize];
                let cfg = self.params.csum.get(s.tx_port as usize).copied().unwrap_or_default();
                for p in self.batch.iter_mut() {
                    csum::process(p, &cfg, &mut self.scratch);
                    let d = p.data_mut();
                    if d.len() >= 12 {
                        d[0..6].copy_from_slice(&tx.peer);
                        d[6..12].copy_from_slice(&tx.mac);
                    }
                }
            }
            FwdMode::MacSwap => driver::for_each_data_mut(&mut self.batch, |d| {
                if d.len() >= 12 {
                    let (a, b) = d[..12].split_at_mut(6);
                    a.swap_with_slice(b);
                }
            }),
            FwdMode::FiveTSwap => {
                for p in self.batch.iter_mut() {
                    crate::fivetswap::swap_5tuple(p.data_mut());
                }
            }
            FwdMode::IcmpEcho => {
                let me = ports[s.rx_port as usize].mac;
                let before = self.batch.len();
                self.batch.retain_mut(|p| icmpecho_reply(p, me));
                rx_dropped = (before - self.batch.len()) as u64;
            }
            FwdMode::Noisy => {
                if let Some(noisy) = self.noisy.as_mut() {
                    let (txq, burst) = (&mut s.txq, self.params.burst);
                    let mut send = |v: &mut Vec<Packet>| txq.tx_burst(v);
                    let (sent, dropped) = noisy.enqueue(&mut s.fifo, &mut self.batch, &mut send);
                    let (fs, fd) = noisy.flush(&mut s.fifo, burst, &mut send);
                    bump(&s.stats.rx_packets, received as u64);
                    bump(&s.stats.tx_packets, sent + fs);
                    bump(&s.stats.tx_dropped, dropped + fd);
                    return received;
                }
            }
            FwdMode::Io | FwdMode::TxOnly | FwdMode::FlowGen => {}
        }
        if self.params.verbose.load(Ordering::Relaxed) & 2 != 0 && !self.batch.is_empty() {
            crate::dump::burst(s.tx_port, s.queue, false, &self.batch);
        }
        if let Some(c) = self.params.capture.as_deref().filter(|c| c.wants(s.tx_port, s.queue, false)) {
            c.offer(&self.batch);
        }
        let sent = s.txq.tx_burst(&mut self.batch);
        if self.params.burst_stats {
            s.stats.tx_spread.record(sent);
        }
        if self.params.hold_tx
            && !self.batch.is_empty()
            && !matches!(mode, FwdMode::TxOnly | FwdMode::FlowGen)
        {
            s.held.append(&mut self.batch);
        }
        let dropped = self.batch.len();
        if matches!(mode, FwdMode::TxOnly | FwdMode::FlowGen)
            && (self.params.latency || self.params.tx_pps != 0)
        {
            s.lat.sent(sent, dropped);
        }
        driver::free_bulk(&mut self.batch); // frees what did not fit
        bump(&s.stats.rx_packets, received as u64);
        bump(&s.stats.rx_dropped, rx_dropped);
        bump(&s.stats.tx_packets, sent as u64);
        bump(&s.stats.tx_dropped, dropped as u64);
        received.max(sent)
    }

    /// `--hold-tx`: sends what the stream holds; returns whether all of it went (out of
    /// line: without the option, or with nothing held, a burst never comes here).
    #[inline(never)]
    fn send_held(s: &mut Stream) -> bool {
        let sent = s.txq.tx_burst(&mut s.held);
        bump(&s.stats.tx_packets, sent as u64);
        s.held.is_empty()
    }

    /// txonly/flowgen with `--latency` or `--tx-pps`, before generating: measures what
    /// came back, and returns how many frames the pacing allows now. Out of line: plain
    /// txonly never comes here and its burst stays as small as before.
    #[inline(never)]
    fn measure_and_pace(&mut self, s: &mut Stream) -> usize {
        let now = crate::latency::now_ns();
        if self.params.latency {
            self.receive_measured(s, now);
        }
        s.lat.allowance(self.params.tx_pps, self.params.burst, now)
    }

    /// `--latency`: records a received burst (out of line, as above).
    #[inline(never)]
    fn measure(s: &mut Stream, batch: &[Packet]) {
        s.lat.measure(&s.stats.latency, batch, crate::latency::now_ns());
    }

    /// `--latency`: stamps a generated burst (out of line, as above).
    #[inline(never)]
    fn stamp(s: &mut Stream, batch: &mut [Packet]) {
        s.lat.stamp(batch, crate::latency::now_ns());
    }

    /// txonly/flowgen with `--latency`: takes what came back on the stream's receive
    /// queue (a reflecting back-end returns the frames sent), measures and frees it.
    fn receive_measured(&mut self, s: &mut Stream, now: u64) {
        let n = s.rxq.rx_burst(&mut self.batch, self.params.burst);
        if self.params.burst_stats {
            s.stats.rx_spread.record(n);
        }
        if n == 0 {
            return;
        }
        s.lat.measure(&s.stats.latency, &self.batch, now);
        if let Some(c) = self.params.capture.as_deref().filter(|c| c.wants(s.rx_port, s.queue, true)) {
            c.offer(&self.batch);
        }
        driver::free_bulk(&mut self.batch);
        bump(&s.stats.rx_packets, n as u64);
    }

    /// Sends `bursts` bursts of txonly packets on `s` (DPDK's `start tx_first`).
    pub fn tx_first(&mut self, s: &mut Stream, ports: &[PortCtx], bursts: u32) {
        for _ in 0..bursts {
            self.generate(&ports[s.tx_port as usize], false, self.params.burst);
            if self.params.latency {
                s.lat.stamp(&mut self.batch, crate::latency::now_ns());
            }
            if let Some(c) = self.params.capture.as_deref().filter(|c| c.wants(s.tx_port, s.queue, false)) {
                c.offer(&self.batch);
            }
            let sent = s.txq.tx_burst(&mut self.batch);
            if self.params.latency {
                s.lat.sent(sent, self.batch.len());
            }
            bump(&s.stats.tx_packets, sent as u64);
            bump(&s.stats.tx_dropped, self.batch.len() as u64);
            driver::free_bulk(&mut self.batch);
        }
    }
}

/// Turns an ARP request or ICMP echo request into its reply in place (DPDK icmpecho:
/// ARP requests are answered with this port's MAC for the address asked; echo requests
/// addressed to this MAC or broadcast are answered). Returns `false` for anything else
/// (the caller drops it).
pub fn icmpecho_reply(p: &mut Packet, me: [u8; 6]) -> bool {
    let d = p.data_mut();
    match frame::ethertype(d) {
        Some(frame::ETHERTYPE_ARP) => {
            // Ethernet/IPv4 ARP request (RFC 826): htype 1, ptype 0x0800, hlen 6, plen 4, op 1.
            if d.len() < ETH_HLEN + 28 || d[ETH_HLEN..ETH_HLEN + 8] != [0, 1, 8, 0, 6, 4, 0, 1] {
                return false;
            }
            let a = ETH_HLEN;
            let sha: [u8; 6] = d[a + 8..a + 14].try_into().expect("6 bytes");
            let spa: [u8; 4] = d[a + 14..a + 18].try_into().expect("4 bytes");
            let tpa: [u8; 4] = d[a + 24..a + 28].try_into().expect("4 bytes");
            frame::write_eth(d, sha, me, frame::ETHERTYPE_ARP);
            d[a + 7] = 2; // reply
            d[a + 8..a + 14].copy_from_slice(&me);
            d[a + 14..a + 18].copy_from_slice(&tpa);
            d[a + 18..a + 24].copy_from_slice(&sha);
            d[a + 24..a + 28].copy_from_slice(&spa);
            true
        }
        Some(frame::ETHERTYPE_IPV4) => {
            let l4 = ETH_HLEN + IPV4_HLEN;
            if d.len() < l4 + 8 || d[ETH_HLEN] != 0x45 || d[ETH_HLEN + 9] != frame::IPPROTO_ICMP || d[l4] != 8
            {
                return false;
            }
            if d[0..6] != me && d[0..6] != [0xff; 6] {
                return false;
            }
            let total = u16::from_be_bytes([d[ETH_HLEN + 2], d[ETH_HLEN + 3]]) as usize;
            if ETH_HLEN + total > d.len() || total < IPV4_HLEN + 8 {
                return false;
            }
            let src: [u8; 6] = d[6..12].try_into().expect("6 bytes");
            frame::write_eth(d, src, me, frame::ETHERTYPE_IPV4);
            let ip = &mut d[ETH_HLEN..l4];
            let (s, t) = ip[12..20].split_at_mut(4);
            s.swap_with_slice(t);
            ip[10..12].copy_from_slice(&[0, 0]);
            let c = frame::inet_checksum(ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            let icmp = &mut d[l4..ETH_HLEN + total];
            icmp[0] = 0; // echo reply
            icmp[2..4].copy_from_slice(&[0, 0]);
            let c = frame::inet_checksum(icmp);
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
            true
        }
        _ => false,
    }
}

/// The loop of one forwarding thread: bursts over its streams until `stop`; returns the
/// streams so forwarding can restart later.
pub fn forward(
    mut streams: Vec<Stream>,
    ports: Vec<PortCtx>,
    params: FwdParams,
    tx_first: Option<u32>,
    cpu: Option<usize>,
    stop: Arc<AtomicBool>,
) -> Vec<Stream> {
    if let Some(c) = cpu {
        pin(c);
    }
    let routes = xdp_routes(&streams, &params.xdp);
    if params.mode == FwdMode::Noisy {
        for s in streams.iter_mut() {
            s.fifo.reserve(params.noisy.bufsz);
        }
    }
    if params.hold_tx {
        for s in streams.iter_mut() {
            s.held.reserve(params.burst);
        }
    }
    let mut eng = EngineState::new(params, &ports);
    if let Some(n) = tx_first {
        for s in streams.iter_mut() {
            eng.tx_first(s, &ports, n);
        }
    }
    let idle_pause = eng.params.idle_pause;
    while !stop.load(Ordering::Relaxed) {
        let mut moved = 0;
        for i in 0..streams.len() {
            let (rp, tp) = (streams[i].rx_port as usize, streams[i].tx_port as usize);
            if ports[rp].stopped.load(Ordering::Relaxed) || ports[tp].stopped.load(Ordering::Relaxed) {
                continue;
            }
            moved += eng.burst(&mut streams[i], &ports);
            if let Some(r) = routes.get(i) {
                flush_xdp(&mut streams, i, *r);
            }
        }
        if moved == 0 {
            for _ in 0..idle_pause {
                std::hint::spin_loop();
            }
        }
    }
    // --hold-tx: what is still held goes out now if the ring takes it, else it is
    // dropped and counted.
    for s in streams.iter_mut().filter(|s| !s.held.is_empty()) {
        let sent = s.txq.tx_burst(&mut s.held);
        bump(&s.stats.tx_packets, sent as u64);
        bump(&s.stats.tx_dropped, s.held.len() as u64);
        driver::free_bulk(&mut s.held);
    }
    // noisy: what the FIFOs still hold goes out now (or is dropped and counted).
    if let Some(noisy) = eng.noisy.as_mut() {
        for s in streams.iter_mut() {
            let txq = &mut s.txq;
            let (sent, dropped) = noisy.flush_all(&mut s.fifo, eng.params.burst, &mut |v| txq.tx_burst(v));
            bump(&s.stats.tx_packets, sent);
            bump(&s.stats.tx_dropped, dropped);
        }
    }
    streams
}

/// Where the XDP output of each stream's receive queue goes: the index (in this
/// thread's streams) of the stream transmitting on (rx port, queue) for Tx, and on
/// (redirect port, queue) for Redirect; (None, None) for a stream whose receiving port
/// has no program that sends. Empty when no port has one.
pub fn xdp_routes(streams: &[Stream], xdp: &[Option<XdpProg>]) -> Vec<(Option<usize>, Option<usize>)> {
    if !xdp.iter().any(|x| matches!(x, Some(XdpProg::Tx | XdpProg::Redirect(_)))) {
        return Vec::new();
    }
    let find = |port: u16, queue: u16| streams.iter().position(|t| t.tx_port == port && t.queue == queue);
    streams
        .iter()
        .map(|s| match xdp.get(s.rx_port as usize).copied().flatten() {
            Some(XdpProg::Tx) => (find(s.rx_port, s.queue), None),
            Some(XdpProg::Redirect(p)) => (None, find(p, s.queue)),
            _ => (None, None),
        })
        .collect()
}

/// Two distinct streams, mutably.
fn two(v: &mut [Stream], i: usize, j: usize) -> (&mut Stream, &mut Stream) {
    if i < j {
        let (a, b) = v.split_at_mut(j);
        (&mut a[i], &mut b[0])
    } else {
        let (a, b) = v.split_at_mut(i);
        (&mut b[0], &mut a[j])
    }
}

/// Sends what stream `i`'s XDP program queued (Tx, Redirect target 0) on the streams
/// `route` names, without a copy; what the transmit ring has no room for waits in the
/// receive queue's XDP output for the next round. Output without a route (never, when
/// streams are grouped by queue) is dropped and counted as `tx_dropped`.
pub fn flush_xdp(streams: &mut [Stream], i: usize, route: (Option<usize>, Option<usize>)) {
    for (redirect, target) in [(false, route.0), (true, route.1)] {
        let pending = {
            let out = streams[i].rxq.xdp_out();
            if redirect {
                out.redirect.first().map_or(0, Vec::len)
            } else {
                out.tx.len()
            }
        };
        if pending == 0 {
            continue;
        }
        let Some(j) = target else {
            let out = streams[i].rxq.xdp_out();
            let v = if redirect { &mut out.redirect[0] } else { &mut out.tx };
            let n = v.len() as u64;
            driver::free_bulk(v);
            bump(&streams[i].stats.tx_dropped, n);
            continue;
        };
        let (src, dst) = if i == j {
            let s = &mut streams[i];
            (&mut s.rxq, (&mut s.txq, &s.stats))
        } else {
            let (a, b) = two(streams, i, j);
            (&mut a.rxq, (&mut b.txq, &b.stats))
        };
        let out = src.xdp_out();
        let v = if redirect { &mut out.redirect[0] } else { &mut out.tx };
        let sent = dst.0.tx_burst(v);
        bump(&dst.1.tx_packets, sent as u64);
    }
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t filled by CPU_SET is a valid argument; the call only reads it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        log::warn!("cannot pin forwarding thread to cpu {cpu}: {}", std::io::Error::last_os_error());
    }
}
