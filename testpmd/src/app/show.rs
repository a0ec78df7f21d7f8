//! What testpmd prints about its ports: DPDK's "Forward statistics" block at stop,
//! `show port stats|info all|N` and `clear port stats all|N`, in DPDK testpmd's layout or
//! as JSON lines (`--stats-format json`).
//!
//! Owns: summing the driver's per-queue counters per port, the rates since the last show,
//! the layouts. Must not: change a port or the forwarding state (beyond the counters'
//! baselines that `clear` and `show` keep).

use std::sync::atomic::Ordering;
use std::time::Instant;

use driver::QueueStatsSnapshot;

use super::{mac_str, App, FwdTotals};
use crate::config::StatsFormat;

pub(super) fn sum(v: &[QueueStatsSnapshot]) -> QueueStatsSnapshot {
    let mut t = QueueStatsSnapshot::default();
    for s in v {
        t.rx_packets += s.rx_packets;
        t.rx_bytes += s.rx_bytes;
        t.rx_errors += s.rx_errors;
        t.rx_too_long += s.rx_too_long;
        t.rx_nombuf += s.rx_nombuf;
        t.tx_packets += s.tx_packets;
        t.tx_bytes += s.tx_bytes;
        t.tx_full += s.tx_full;
        t.tx_copied += s.tx_copied;
        t.tx_nobuf += s.tx_nobuf;
        t.tx_errors += s.tx_errors;
        t.tx_lost += s.tx_lost;
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
        rx_too_long: a.rx_too_long - b.rx_too_long,
        rx_nombuf: a.rx_nombuf - b.rx_nombuf,
        tx_packets: a.tx_packets - b.tx_packets,
        tx_bytes: a.tx_bytes - b.tx_bytes,
        tx_full: a.tx_full - b.tx_full,
        tx_copied: a.tx_copied - b.tx_copied,
        tx_nobuf: a.tx_nobuf - b.tx_nobuf,
        tx_errors: a.tx_errors - b.tx_errors,
        tx_lost: a.tx_lost - b.tx_lost,
        device_errors: a.device_errors - b.device_errors,
        xdp_pass: a.xdp_pass - b.xdp_pass,
        xdp_drop: a.xdp_drop - b.xdp_drop,
        xdp_tx: a.xdp_tx - b.xdp_tx,
        xdp_redirect: a.xdp_redirect - b.xdp_redirect,
        xdp_aborted: a.xdp_aborted - b.xdp_aborted,
    }
}

impl App {
    /// Forward totals per port since the last start or `clear fwd stats`.
    pub fn fwd_totals(&self) -> Vec<FwdTotals> {
        let mut t = self.fwd_totals_since_start();
        for (t, b) in t.iter_mut().zip(&self.fwd_base) {
            t.rx_packets -= b.rx_packets;
            t.rx_dropped -= b.rx_dropped;
            t.tx_packets -= b.tx_packets;
            t.tx_dropped -= b.tx_dropped;
        }
        t
    }

    /// `show fwd stats all`: the forward statistics block (as at `stop`), while
    /// forwarding runs or after.
    pub fn show_fwd_stats(&mut self) {
        let totals = self.fwd_totals();
        let secs = self.running.as_ref().map_or(0.0, |r| r.started.elapsed().as_secs_f64());
        self.print_fwd_stats_inner(&totals, secs, false);
    }

    /// `clear fwd stats all`: the forward counters start from zero again. The
    /// forwarding threads own the counters, so this keeps a baseline instead of writing
    /// them.
    pub fn clear_fwd_stats(&mut self) {
        self.fwd_base = self.fwd_totals_since_start();
        self.say("\n  Forward statistics cleared\n");
    }

    fn fwd_totals_since_start(&self) -> Vec<FwdTotals> {
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

    /// `--record-burst-stats`: port `i`'s receive and transmit burst spreads (its
    /// streams' added up).
    fn burst_spreads(&self, i: usize) -> (Vec<u64>, Vec<u64>) {
        let (mut rx, mut tx) = (Vec::new(), Vec::new());
        for ((r, t), st) in self.stream_meta().into_iter().zip(&self.stream_stats) {
            if r as usize == i {
                st.rx_spread.add_to(&mut rx);
            }
            if t as usize == i {
                st.tx_spread.add_to(&mut tx);
            }
        }
        (rx, tx)
    }

    /// (rx port, tx port) of each stream, in `stream_stats` order.
    pub(super) fn stream_meta(&self) -> Vec<(u16, u16)> {
        self.meta.clone()
    }

    pub(super) fn print_fwd_stats(&mut self, totals: &[FwdTotals], secs: f64) {
        self.print_fwd_stats_inner(totals, secs, true);
        if self.cfg.latency {
            let _ = self.show_port_latency(None);
        }
    }

    fn print_fwd_stats_inner(&mut self, totals: &[FwdTotals], secs: f64, done: bool) {
        if self.cfg.stats_format == StatsFormat::Json {
            let ports: Vec<serde_json::Value> = totals
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let mut v = serde_json::json!({"port": i, "rx_packets": t.rx_packets,
                        "rx_dropped": t.rx_dropped, "tx_packets": t.tx_packets, "tx_dropped": t.tx_dropped});
                    if self.cfg.burst_stats {
                        let (rx, tx) = self.burst_spreads(i);
                        // Burst size -> calls, sizes that occurred only.
                        let nz = |c: &[u64]| -> serde_json::Map<String, serde_json::Value> {
                            c.iter()
                                .enumerate()
                                .filter(|(_, &n)| n > 0)
                                .map(|(k, &n)| (k.to_string(), n.into()))
                                .collect()
                        };
                        v["rx_bursts"] = nz(&rx).into();
                        v["tx_bursts"] = nz(&tx).into();
                    }
                    v
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
            if self.cfg.burst_stats {
                let (rx, tx) = self.burst_spreads(i);
                s += &crate::burst_stats::line("RX", &rx).unwrap_or_default();
                s += &crate::burst_stats::line("TX", &tx).unwrap_or_default();
            }
            s += "  ----------------------------------------------------------------------------\n";
            acc.rx_packets += t.rx_packets;
            acc.rx_dropped += t.rx_dropped;
            acc.tx_packets += t.tx_packets;
            acc.tx_dropped += t.tx_dropped;
        }
        s += "\n  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++\n";
        s += &fwd_lines(&acc);
        s += "  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++\n";
        if done {
            s += "\nDone.\n";
        }
        self.say(&s);
    }

    /// `show port N latency` (and at stop with `--latency`): each port's receiving
    /// streams merged; figures since the last `start`.
    pub fn show_port_latency(&mut self, which: Option<usize>) -> Result<(), String> {
        if !self.cfg.latency {
            return Err("latency is not measured: start testpmd with --latency".into());
        }
        let mut s = String::new();
        for i in self.port_range(which)? {
            let r = crate::latency::report(
                self.stream_meta()
                    .into_iter()
                    .zip(&self.stream_stats)
                    .filter(|((rx, _), _)| *rx as usize == i)
                    .map(|(_, st)| &st.latency),
            );
            if self.cfg.stats_format == StatsFormat::Json {
                s += &format!("{}\n", r.json(i));
            } else {
                s += &r.text(i);
            }
        }
        self.say(&s);
        Ok(())
    }

    /// `show port stats all|N`.
    pub fn show_port_stats(&mut self, which: Option<usize>) -> Result<(), String> {
        let range = self.port_range(which)?;
        let mut s = String::new();
        let mut lines = Vec::new();
        for i in range {
            let now = Instant::now();
            let ps = &mut self.ports[i];
            let cur = sum(&ps.dev()?.stats());
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
                    "rx_nombuf": d.rx_nombuf, "tx_packets": d.tx_packets, "tx_errors": d.tx_errors, "tx_bytes": d.tx_bytes,
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
                d.tx_packets, d.tx_errors, d.tx_bytes
            );
            if d.tx_lost > 0 {
                // Frames the device held when its back-end went away (not in DPDK's block).
                s += &format!("  TX-lost-in-flight: {}\n", d.tx_lost);
            }
            if self.xdp[i].is_some()
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
        self.ports[i].port.as_ref().map(|p| sum(&p.stats())).unwrap_or_default()
    }

    /// `show port N rss-hash`: DPDK shows the RSS hash functions and key. Our driver does
    /// not negotiate `VIRTIO_NET_F_RSS` (nor HASH_REPORT), so there is none to show: the
    /// device picks the receive queue itself (vhost-user back-ends: per queue pair).
    pub fn show_rss_hash(&mut self, port: usize) -> Result<(), String> {
        self.port_range(Some(port))?;
        self.say(&format!(
            "RSS disabled\nport {port}: the driver does not negotiate VIRTIO_NET_F_RSS; \
             the device chooses each frame's receive queue\n"
        ));
        Ok(())
    }

    /// `show port info all|N`.
    pub fn show_port_info(&mut self, which: Option<usize>) -> Result<(), String> {
        let range = self.port_range(which)?;
        let mut s = String::new();
        for i in range {
            let info = self.ports[i].dev()?.info().clone();
            s += &format!("\n********************* Infos for port {i}  *********************\n");
            s += &format!("MAC address: {}\n", mac_str(&self.ctx[i].mac));
            s += &format!("Device: {}\n", info.description);
            let link = self.ports[i].dev()?.link();
            s += &format!("Link status: {}\n", if link.up { "up" } else { "down" });
            if let Some(why) = &link.reason {
                s += &format!("Link down because: {why}{}\n", if link.failed { " (for good)" } else { "" });
            }
            s += &format!("Link changes: {}, reconnections: {}\n", link.changes, link.reconnects);
            s += &format!("MTU: {}\n", self.ports[i].mtu);
            if let Some(len) = self.ports[i].rx_max_pkt_len {
                s += &format!("Max RX frame: {len} (port config max-pkt-len)\n");
            }
            if let Some(len) = self.ports[i].pending_max_pkt_len {
                s += &format!("max-pkt-len at the next port start: {len}\n");
            }
            s += &format!("Negotiated features: {:#x}\n", info.features);
            let ctl = self.ports[i].dev()?.control();
            s += &format!("Current number of RX queues: {}\n", ctl.queue_pairs());
            s += &format!("Max possible RX queues: {}\n", info.queue_pairs);
            s += &format!("Current number of TX queues: {}\n", ctl.queue_pairs());
            s += &format!("Max possible TX queues: {}\n", info.queue_pairs);
            s += &format!(
                "Control queue: {}\n",
                if info.control_queue { "yes" } else { "no (VIRTIO_NET_F_CTRL_VQ not negotiated)" }
            );
            s +=
                &format!("XDP program: {}\n", self.xdp[i].map(|x| x.name()).unwrap_or_else(|| "none".into()));
            s += &format!("Ring size: {}\n", info.ring_size);
            s += &format!(
                "Ring layout: {}\n",
                if info.packed { "packed (VIRTIO_F_RING_PACKED)" } else { "split" }
            );
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
            let cur = sum(&ps.dev()?.stats());
            ps.base = cur;
            ps.last = (cur, Instant::now());
            self.say(&format!("\n  NIC statistics for port {i} cleared\n"));
        }
        Ok(())
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
