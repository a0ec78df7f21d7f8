//! The prompt's port-level commands: `port stop|start all|N`, `port config mtu N V`,
//! `port config all|N max-pkt-len L` (applied at `port start`), `mac_addr add|remove N
//! MAC`, `set nbcore N`, `set link-up|link-down port N` and `set verbose N`.
//!
//! Owns: each command's checks, its effect on the app's per-port state, and the line it
//! prints (DPDK testpmd's wording where it has one). Must not: parse the prompt
//! (interactive.rs does) or touch the data path beyond the flags the forwarding threads
//! read once per burst (a port's `stopped`, the verbose level) and, with forwarding
//! stopped, the receive queues' frame limit (`RxQueue::set_mtu`, at `port start`).
//!
//! `port stop` differs from DPDK's in one way: DPDK refuses it while forwarding runs;
//! here it pauses the port's streams (those receiving or transmitting on it) at once,
//! so its counters stop, and `port start` resumes them. A virtio device has no "stopped"
//! state short of a reset: frames for a stopped port wait in its receive ring (the
//! device drops or holds what does not fit, as it does for a slow poller).

use std::sync::atomic::Ordering;

use super::{mac_str, App};
use crate::config::XdpProg;

impl App {
    fn is_stopped(&self, i: usize) -> bool {
        self.ctx[i].stopped.load(Ordering::Relaxed)
    }

    /// `port stop all|N`.
    pub fn port_stop(&mut self, which: Option<usize>) -> Result<(), String> {
        for i in self.port_range(which)? {
            if self.is_stopped(i) {
                self.say(&format!("Port {i} is already stopped\n"));
                continue;
            }
            self.ctx[i].stopped.store(true, Ordering::Relaxed);
            self.say(&format!("Stopping ports...\nPort {i} stopped\n"));
        }
        self.say("Done\n");
        Ok(())
    }

    /// `port start all|N`. A `port config max-pkt-len` given while the port was stopped
    /// takes effect here (forwarding stopped: it changes every receive queue of the port).
    pub fn port_start(&mut self, which: Option<usize>) -> Result<(), String> {
        let list = self.port_range(which)?;
        let pending = |i: &&usize| self.is_stopped(**i) && self.ports[**i].pending_max_pkt_len.is_some();
        if let (Some(i), true) = (list.iter().find(pending), self.running.is_some()) {
            return Err(format!(
                "Please stop forwarding first (port {i}'s max-pkt-len applies at port start)"
            ));
        }
        for i in list {
            if !self.is_stopped(i) {
                self.say(&format!("Port {i} is now not stopped\n"));
                continue;
            }
            if let Some(len) = self.ports[i].pending_max_pkt_len.take() {
                self.apply_max_pkt_len(i, len)?;
            }
            self.ctx[i].stopped.store(false, Ordering::Relaxed);
            self.say(&format!("Port {i}: {}\n", mac_str(&self.ctx[i].mac)));
        }
        self.say("Done\n");
        Ok(())
    }

    /// Port `i`'s receive queues hold frames to `len` bytes (MTU `len` - 18, see
    /// `RxQueue::set_mtu`), and testpmd its transmitted frames to that MTU. On a
    /// refusal the port stays stopped.
    fn apply_max_pkt_len(&mut self, i: usize, len: usize) -> Result<(), String> {
        let mtu = (len - 18) as u16;
        let in_streams = self.streams.iter_mut().filter(|s| s.rx_port as usize == i).map(|s| &mut s.rxq);
        for rx in in_streams.chain(self.halves[i].rx.iter_mut().flatten()) {
            rx.set_mtu(mtu)
                .map_err(|e| format!("Port {i}: max-pkt-len {len} refused, port stays stopped: {e}"))?;
        }
        self.ports[i].mtu = mtu;
        self.ports[i].rx_max_pkt_len = Some(len);
        Ok(())
    }

    /// `port close all|N` (forwarding stopped, the port stopped first, as DPDK asks):
    /// resets the device and gives its buffers back; the port stays closed (commands
    /// naming it say so) and the streams of its pair are gone.
    pub fn port_close(&mut self, which: Option<usize>) -> Result<(), String> {
        if self.running.is_some() {
            return Err("Please stop forwarding first (port close)".into());
        }
        let list = self.port_range(which)?;
        if let Some(i) = list.iter().find(|&&i| !self.is_stopped(i)) {
            return Err(format!("Please stop port {i} first"));
        }
        self.unbuild_streams();
        let mut res = Ok(());
        for i in list {
            let Some(port) = self.ports[i].port.take() else { continue };
            self.say("Closing ports...\n");
            let h = &mut self.halves[i];
            let pairs: Vec<driver::QueuePair> =
                h.rx.iter_mut()
                    .zip(h.tx.iter_mut())
                    .enumerate()
                    .filter_map(|(q, (rx, tx))| {
                        Some(driver::QueuePair { index: q as u16, rx: rx.take()?, tx: tx.take()? })
                    })
                    .collect();
            match port.close(pairs) {
                Ok(()) => self.say(&format!("Port {i} is closed\n")),
                Err(e) => res = res.and(Err(format!("port {i}: close: {e}"))),
            }
        }
        self.build_streams()?;
        self.say("Done\n");
        res
    }

    /// `port config mtu N V`: testpmd holds port N's transmitted frames (txonly,
    /// flowgen, `set txpkts`) to V + 14 bytes. virtio-net's MTU is the device's
    /// (`VIRTIO_NET_F_MTU`, read-only): V may be 68 up to that, never above.
    pub fn port_config_mtu(&mut self, port: usize, mtu: u16) -> Result<(), String> {
        self.port_range(Some(port))?;
        let max = self.ports[port].dev()?.info().mtu;
        if !(68..=max).contains(&mtu) {
            return Err(format!(
                "Set MTU failed. diag=-22 (port {port}: MTU {mtu} is outside 68..={max}, the device's MTU)"
            ));
        }
        let frame = self.cfg.tx_segs.iter().sum::<usize>();
        if matches!(self.cfg.mode, crate::config::FwdMode::TxOnly | crate::config::FwdMode::FlowGen)
            && frame > mtu as usize + 14
        {
            return Err(format!("Set MTU failed: port {port} sends {frame}-byte frames (set txpkts first)"));
        }
        self.ports[port].mtu = mtu;
        Ok(())
    }

    /// `port config all|P max-pkt-len N`: as DPDK, the ports must be stopped (`port stop`)
    /// and the length takes effect at the next `port start`: each port's MTU becomes N
    /// less the Ethernet header and CRC (18 bytes), received frames longer than N bytes
    /// are dropped and counted (`rx_too_long`, in RX-errors) and transmitted ones are held
    /// to the MTU. N may not exceed what the device carries (its MTU + 18), nor, on a
    /// port opened without mergeable receive buffers, one buffer's room.
    pub fn port_config_max_pkt_len(&mut self, which: Option<usize>, len: usize) -> Result<(), String> {
        if !(64..=crate::config::MAX_FRAME).contains(&len) {
            return Err(format!("max-pkt-len {len} out of range 64..={}", crate::config::MAX_FRAME));
        }
        let ports = self.port_range(which)?;
        if let Some(i) = ports.iter().find(|&&i| !self.is_stopped(i)) {
            return Err(format!(
                "Please stop port {i} first (port stop {}): max-pkt-len changes at port start",
                which.map_or("all".to_string(), |p| p.to_string())
            ));
        }
        let mtu = len as i64 - 18;
        for &i in &ports {
            let max = self.ports[i].dev()?.info().max_mtu;
            if !(68..=max as i64).contains(&mtu) {
                return Err(format!(
                    "max-pkt-len {len} refused: port {i}'s MTU would be {mtu}, outside 68..={max} \
                     (what its device carries: max-pkt-len {}..={})",
                    68 + 18,
                    max as usize + 18
                ));
            }
            let room = self.ports[i].rx_room;
            if len > room {
                return Err(format!(
                    "max-pkt-len {len} refused: port {i} receives frames of at most {room} bytes (opened \
                     without mergeable receive buffers): start testpmd with --max-pkt-len {len}"
                ));
            }
            let frame = self.cfg.tx_segs.iter().sum::<usize>();
            if matches!(self.cfg.mode, crate::config::FwdMode::TxOnly | crate::config::FwdMode::FlowGen)
                && frame as i64 > mtu + 14
            {
                return Err(format!(
                    "max-pkt-len {len} refused: port {i} sends {frame}-byte frames (set txpkts first)"
                ));
            }
        }
        for i in ports {
            self.ports[i].pending_max_pkt_len = Some(len);
            self.say(&format!("Port {i}: max-pkt-len {len} (MTU {mtu}) from the next port start\n"));
        }
        Ok(())
    }

    /// `mac_addr add|remove N MAC`: the device's unicast filter (the control queue's
    /// MAC table, `VIRTIO_NET_F_CTRL_RX`) accepts MAC besides the port's own address.
    pub fn mac_addr_add_remove(&mut self, add: bool, port: usize, mac: [u8; 6]) -> Result<(), String> {
        self.port_range(Some(port))?;
        if mac[0] & 1 != 0 {
            return Err(format!(
                "mac_addr_cmd error: (Invalid argument: {} is a multicast address)",
                mac_str(&mac)
            ));
        }
        let mut macs = self.ports[port].macs.clone();
        let at = macs.iter().position(|m| *m == mac);
        match (add, at) {
            (true, Some(_)) => return Ok(()),
            (true, None) => macs.push(mac),
            (false, Some(i)) => {
                macs.remove(i);
            }
            (false, None) => {
                return Err(format!(
                    "mac_addr_cmd error: (Invalid argument: {} was not added)",
                    mac_str(&mac)
                ))
            }
        }
        if macs.len() > driver::ctrl::MAC_TABLE_MAX {
            return Err(format!(
                "mac_addr_cmd error: (No space left: at most {} addresses)",
                driver::ctrl::MAC_TABLE_MAX
            ));
        }
        self.ports[port]
            .dev()?
            .control()
            .set_mac_table(&macs, &[])
            .map_err(|e| format!("mac_addr_cmd error: (port {port}: {e})"))?;
        self.ports[port].macs = macs;
        Ok(())
    }

    /// `set nbcore N`: forwarding threads at the next `start`.
    pub fn set_nbcore(&mut self, n: usize) -> Result<(), String> {
        if self.running.is_some() {
            return Err("Please stop forwarding first (the number of cores applies at start)".into());
        }
        let streams = self.meta.len();
        if n == 0 || n > streams.max(1) {
            return Err(format!(
                "nb cores {n} is out of range 1..={} (one stream per core at most)",
                streams.max(1)
            ));
        }
        self.cfg.nb_cores = n;
        self.say(&format!("Number of forwarding cores set to {n}\n"));
        Ok(())
    }

    /// `set link-up|link-down port N`: virtio-net's link status is the device's
    /// (`VIRTIO_NET_S_LINK_UP`, read-only for the driver), so this is refused as DPDK's
    /// virtio PMD refuses it.
    pub fn set_link(&mut self, up: bool, port: usize) -> Result<(), String> {
        self.port_range(Some(port))?;
        Err(format!(
            "Set link {} fail: not supported (port {port}: a virtio-net device's link status is set by the device, not the driver)",
            if up { "up" } else { "down" }
        ))
    }

    /// `set capture FILE[,...]` (Some) or `set capture off` (None), forwarding stopped:
    /// ends the running capture (every frame taken is written first, and its counts
    /// printed), then starts the new one, which the next `start` feeds.
    pub fn set_capture(&mut self, spec: Option<crate::capture::CaptureSpec>) -> Result<(), String> {
        if self.running.is_some() {
            return Err("Please stop forwarding first (the capture changes at start)".into());
        }
        if let Some(s) = &spec {
            if let Some(p) = s.port {
                self.port_range(Some(p as usize)).map_err(|e| format!("capture: {e}"))?;
            }
        }
        if let Some(c) = self.capture.take() {
            let n = c.finish()?;
            self.say(&format!(
                "Capture: {} frames written to {}, {} dropped (capture ring full)\n",
                n.written,
                c.spec().path.display(),
                n.dropped
            ));
        }
        if let Some(s) = spec {
            let path = s.path.display().to_string();
            self.capture = Some(crate::capture::Capture::start(s)?);
            self.say(&format!("Capturing to {path}\n"));
        }
        Ok(())
    }

    /// `set xdp N pass|drop|tx|redirect:P|off` (forwarding stopped): replaces the
    /// XDP-style program on every receive queue of port N (off: detaches it). The
    /// first program of a port switches its merging receive offloads off, the last one
    /// detached switches them back on (the driver does, over the control queue).
    /// Redirect between ports that do not share a pool copies each frame (the driver
    /// counts `tx_copied`); `--xdp-prog redirect:P` at start-up shares the pool.
    pub fn set_xdp(&mut self, port: usize, prog: Option<XdpProg>) -> Result<(), String> {
        if self.running.is_some() {
            return Err("Please stop forwarding first (the XDP program changes at start)".into());
        }
        self.port_range(Some(port))?;
        if let Some(XdpProg::Redirect(t)) = prog {
            self.port_range(Some(t as usize)).map_err(|e| format!("set xdp: redirect:{t}: {e}"))?;
        }
        let mut rxqs: Vec<&mut driver::RxQueue> =
            self.streams.iter_mut().filter(|s| s.rx_port as usize == port).map(|s| &mut s.rxq).collect();
        rxqs.extend(self.halves[port].rx.iter_mut().flatten());
        for (q, rx) in rxqs.into_iter().enumerate() {
            let r = match prog {
                Some(x) => rx.attach_xdp(super::xdp_program(x)),
                None => rx.detach_xdp(),
            };
            r.map_err(|e| format!("port {port}: set xdp (queue {q}): {e}"))?;
        }
        self.xdp[port] = prog;
        self.say(&format!(
            "Port {port}: XDP program {}\n",
            prog.map_or_else(|| "detached".to_string(), |x| x.name())
        ));
        Ok(())
    }

    /// `set verbose N`: 0 none, bit 0 received frames, bit 1 sent frames (DPDK's).
    pub fn set_verbose(&mut self, level: u8) {
        let old = self.verbose.swap(level, Ordering::Relaxed);
        self.say(&format!("Change verbose level from {old} to {level}\n"));
    }
}
