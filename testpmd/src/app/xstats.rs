//! `show port xstats all|N` (DPDK's "NIC extended statistics" block: every counter the
//! driver keeps, per queue and per port, the control queue's results, ring faults and
//! the pool's use) and `show config fwd|rxtx` (which core runs which stream; queues and
//! descriptors per port).
//!
//! Owns: the counter names and both layouts. Must not: change a port, a counter or the
//! forwarding state.

use driver::QueueStatsSnapshot;

use super::show::sum;
use super::{mac_str, App};
use crate::config::{StatsFormat, XdpProg};

/// The extended statistics of one port: (name, value), in print order.
pub fn xstats(
    per_queue: &[QueueStatsSnapshot],
    ctrl: driver::ControlCounts,
    pool: (u32, u32),
) -> Vec<(String, u64)> {
    let t = sum(per_queue);
    let mut v: Vec<(String, u64)> = vec![
        ("rx_good_packets".into(), t.rx_packets),
        ("tx_good_packets".into(), t.tx_packets),
        ("rx_good_bytes".into(), t.rx_bytes),
        ("tx_good_bytes".into(), t.tx_bytes),
        // virtio has no missed counter: a full receive ring is the device's drop.
        ("rx_missed_errors".into(), 0),
        ("rx_errors".into(), t.rx_errors),
        ("tx_errors".into(), t.tx_errors),
        ("rx_mbuf_allocation_errors".into(), t.rx_nombuf),
    ];
    for (q, s) in per_queue.iter().enumerate() {
        let rx = [
            ("packets", s.rx_packets),
            ("bytes", s.rx_bytes),
            ("errors", s.rx_errors),
            ("too_long_errors", s.rx_too_long),
            ("nombuf", s.rx_nombuf),
            ("xdp_pass", s.xdp_pass),
            ("xdp_drop", s.xdp_drop),
            ("xdp_tx", s.xdp_tx),
            ("xdp_redirect", s.xdp_redirect),
            ("xdp_aborted", s.xdp_aborted),
        ];
        v.extend(rx.iter().map(|(n, c)| (format!("rx_q{q}_{n}"), *c)));
        let tx = [
            ("packets", s.tx_packets),
            ("bytes", s.tx_bytes),
            ("errors", s.tx_errors),
            ("ring_full", s.tx_full),
            ("copied", s.tx_copied),
            ("nobuf", s.tx_nobuf),
            ("lost_in_flight", s.tx_lost),
        ];
        v.extend(tx.iter().map(|(n, c)| (format!("tx_q{q}_{n}"), *c)));
        v.push((format!("q{q}_ring_faults"), s.device_errors));
    }
    v.extend([
        ("ring_faults".into(), t.device_errors),
        ("ctrl_cmd_ok".into(), ctrl.ok),
        ("ctrl_cmd_refused".into(), ctrl.refused),
        ("ctrl_cmd_timeout".into(), ctrl.timeout),
        ("ctrl_cmd_failed".into(), ctrl.failed),
        ("pool_capacity".into(), pool.1 as u64),
        ("pool_free".into(), pool.0 as u64),
        ("pool_in_use".into(), (pool.1 - pool.0.min(pool.1)) as u64),
    ]);
    v
}

/// `v` less the counters of the last `clear port xstats` (`base`, same names in the same
/// order); the pool's gauges are levels, not counters, and are shown as they are.
fn since(mut v: Vec<(String, u64)>, base: &[(String, u64)]) -> Vec<(String, u64)> {
    for ((k, c), (bk, b)) in v.iter_mut().zip(base) {
        if k == bk && !k.starts_with("pool_") {
            *c = c.saturating_sub(*b);
        }
    }
    v
}

impl App {
    /// The extended counters of port `i` as the device reports them (since it opened).
    fn port_xstats(&self, i: usize) -> Result<Vec<(String, u64)>, String> {
        let port = self.ports[i].dev()?;
        let pool = port.pool();
        Ok(xstats(&port.stats(), port.control().counts(), (pool.available(), pool.capacity())))
    }

    /// `clear port xstats all|N`: the next `show port xstats` counts from here.
    pub fn clear_port_xstats(&mut self, which: Option<usize>) -> Result<(), String> {
        for i in self.port_range(which)? {
            self.ports[i].xbase = self.port_xstats(i)?;
            self.say(&format!("\n  NIC extended statistics for port {i} cleared\n"));
        }
        Ok(())
    }

    /// `show port xstats all|N`: counters since the port was opened or last cleared.
    pub fn show_port_xstats(&mut self, which: Option<usize>) -> Result<(), String> {
        let mut s = String::new();
        for i in self.port_range(which)? {
            let v = since(self.port_xstats(i)?, &self.ports[i].xbase);
            if self.cfg.stats_format == StatsFormat::Json {
                let m: serde_json::Map<String, serde_json::Value> =
                    v.into_iter().map(|(k, c)| (k, c.into())).collect();
                s += &format!("{}\n", serde_json::json!({"type": "port_xstats", "port": i, "xstats": m}));
                continue;
            }
            s += &format!("###### NIC extended statistics for port {i} \n");
            for (k, c) in v {
                s += &format!("{k}: {c}\n");
            }
        }
        self.say(&s);
        Ok(())
    }

    /// Which forwarding thread runs each stream (in (receive port, queue) order) and how
    /// many threads there are, as [`App::start`] assigns them.
    pub(super) fn stream_cores(&self) -> (usize, Vec<usize>) {
        let by_queue = self.xdp.iter().any(|x| matches!(x, Some(XdpProg::Tx | XdpProg::Redirect(_))));
        let q = self.cfg.queues as usize;
        let n = self.meta.len();
        let groups = if by_queue { q } else { n };
        let cores = self.cfg.nb_cores.min(groups).max(1);
        let of = (0..n).map(|i| (if by_queue { i % q } else { i }) % cores).collect();
        (cores, of)
    }

    /// `show config fwd`: the mode and, per forwarding thread, its streams.
    pub fn show_config_fwd(&mut self) {
        let (cores, of) = self.stream_cores();
        let meta = self.stream_meta();
        let q = self.cfg.queues as usize;
        let mut s = format!(
            "{} packet forwarding - ports={} - cores={cores} - streams={}\n",
            self.cfg.mode.name(),
            self.ports.len(),
            meta.len()
        );
        for c in 0..cores {
            let mine: Vec<usize> = (0..meta.len()).filter(|&i| of[i] == c).collect();
            s += &format!("Logical Core {c} forwards packets on {} streams:\n", mine.len());
            for i in mine {
                let (rx, tx) = meta[i];
                let qi = i % q;
                let stopped =
                    |p: u16| self.ctx[p as usize].stopped.load(std::sync::atomic::Ordering::Relaxed);
                s += &format!(
                    "  RX P={rx}/Q={qi} -> TX P={tx}/Q={qi} peer={}{}\n",
                    mac_str(&self.ctx[tx as usize].peer),
                    if stopped(rx) || stopped(tx) { " (port stopped)" } else { "" }
                );
            }
        }
        self.say(&s);
    }

    /// `show config rxtx`: burst, cores, and per port its queues and descriptors.
    pub fn show_config_rxtx(&mut self) {
        let mut s =
            format!("  {} packet forwarding packets/burst={}\n", self.cfg.mode.name(), self.cfg.burst);
        s += &format!(
            "  nb forwarding cores={} - nb forwarding ports={}\n",
            self.cfg.nb_cores,
            self.ports.len()
        );
        for (i, port) in self.open_ports() {
            let info = port.info();
            let n = port.control().queue_pairs();
            s += &format!("  port {i}: RX queue number: {n} Tx queue number: {n}\n");
            for q in 0..n {
                s += &format!("    RX queue: {q}\n      RX desc={}\n", info.ring_size);
                s += &format!("    TX queue: {q}\n      TX desc={}\n", info.ring_size);
            }
        }
        self.say(&s);
    }
}
