//! The prompt's control commands on the ports: `set promisc|allmulti`, `mac_addr set`,
//! `rx_vlan add|rm`, `port config all rxq|txq N`, `port config all|N rx_offload tcp_lro
//! on|off`, each through the port's control queue
//! ([`driver::Control`]); and the `csum` engine's per-port settings, `csum set|show` and
//! `tso set|show` (checked against the transmit offloads the port negotiated).
//!
//! Owns: checking that a command may run now (forwarding stopped where the state it
//! changes is shared with the forwarding threads) and the line each prints. Must not:
//! parse the prompt (interactive.rs does) or touch the data path.

use driver::layout::features as f;

use super::{mac_str, App};

impl App {
    /// `set promisc all|N on|off`.
    pub fn set_promisc(&mut self, which: Option<usize>, on: bool) -> Result<(), String> {
        for i in self.port_range(which)? {
            self.ports[i].dev()?.control().set_promisc(on).map_err(|e| format!("port {i}: {e}"))?;
            self.say(&format!("Port {i}: promiscuous mode {}\n", if on { "enabled" } else { "disabled" }));
        }
        Ok(())
    }

    /// `set allmulti all|N on|off`.
    pub fn set_allmulti(&mut self, which: Option<usize>, on: bool) -> Result<(), String> {
        for i in self.port_range(which)? {
            self.ports[i].dev()?.control().set_allmulti(on).map_err(|e| format!("port {i}: {e}"))?;
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
        self.ports[port].dev()?.control().set_mac_addr(mac).map_err(|e| format!("port {port}: {e}"))?;
        self.ctx[port].mac = mac;
        self.say(&format!("Port {port}: MAC address set to {}\n", mac_str(&mac)));
        Ok(())
    }

    /// `rx_vlan add|rm ID all|N`.
    pub fn rx_vlan(&mut self, add: bool, vid: u16, which: Option<usize>) -> Result<(), String> {
        for i in self.port_range(which)? {
            let c = self.ports[i].dev()?.control();
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
        for (i, port) in self.open_ports() {
            let max = port.control().max_queue_pairs();
            if n == 0 || n > max {
                return Err(format!("port {i}: {n} queues: 1..={max} are set up on this port"));
            }
        }
        for (i, port) in self.open_ports() {
            let c = port.control();
            if c.queue_pairs() != n {
                c.set_queue_pairs(n).map_err(|e| format!("port {i}: {e}"))?;
            }
        }
        self.cfg.queues = n;
        self.build_streams()?;
        self.say(&format!("All ports: {n} queue pair(s) (rxq = txq = {n})\n"));
        Ok(())
    }

    /// `port config all|N rx_offload tcp_lro on|off`: whether the device may send the
    /// port TCP super-frames (GUEST_TSO4/TSO6, switched through the control queue's
    /// `GUEST_OFFLOADS_SET` at once, forwarding stopped; GUEST_CSUM and the other receive
    /// offloads stay as they are). The port must have negotiated them (`--enable-lro`): as
    /// DPDK's virtio PMD takes `tcp_lro` as GUEST_TSO4/TSO6. With LRO off, the device
    /// segments what it would have sent whole (ours: `port::offload`).
    pub fn config_rx_lro(&mut self, which: Option<usize>, on: bool) -> Result<(), String> {
        if self.running.is_some() {
            return Err("Please stop forwarding first (port config needs the ports stopped)".into());
        }
        let tso = f::bit(f::NET_GUEST_TSO4) | f::bit(f::NET_GUEST_TSO6);
        for i in self.port_range(which)? {
            let feats = self.features(i)?;
            if feats & tso == 0 {
                return Err(format!(
                    "port {i}: tcp_lro was not negotiated (VIRTIO_NET_F_GUEST_TSO4/TSO6; start with --enable-lro)"
                ));
            }
            let c = self.ports[i].dev()?.control();
            let now = c.guest_offloads();
            // ECN rides on TSO: it goes off with it and comes back with it if negotiated.
            let ecn = f::bit(f::NET_GUEST_ECN);
            let want = if on { now | (feats & (tso | ecn)) } else { now & !(tso | ecn) };
            c.set_guest_offloads(want).map_err(|e| format!("port {i}: {e}"))?;
            self.say(&format!("Port {i}: rx_offload tcp_lro {}\n", if on { "on" } else { "off" }));
        }
        Ok(())
    }

    /// Port `port`'s negotiated features, or an error naming the port count.
    fn features(&self, port: usize) -> Result<u64, String> {
        self.port_range(Some(port))?;
        Ok(self.ports[port].dev()?.info().features)
    }

    /// `csum set ip|tcp|udp hw|sw PORT`: how the `csum` engine sets that checksum on the
    /// frames PORT transmits (forwarding stopped; applied at the next `start`). virtio-net
    /// has no IPv4 header checksum offload: `ip hw` is refused, as DPDK refuses an offload
    /// a port lacks; `tcp|udp hw` needs VIRTIO_NET_F_CSUM.
    pub fn csum_set(&mut self, layer: &str, hw: bool, port: usize) -> Result<(), String> {
        if self.running.is_some() {
            return Err("Please stop forwarding first (checksum settings apply at start)".into());
        }
        let feats = self.features(port)?;
        let name = match layer {
            "ip" => "IP",
            "tcp" => "TCP",
            "udp" => "UDP",
            _ => return Err(format!("Bad arguments: '{layer}' is not ip, tcp or udp")),
        };
        if hw && (layer == "ip" || feats & f::bit(f::NET_CSUM) == 0) {
            let why = if layer == "ip" {
                "virtio-net has no IPv4 header checksum offload"
            } else {
                "VIRTIO_NET_F_CSUM not negotiated"
            };
            return Err(format!("{name} checksum offload is not supported by port {port} ({why})"));
        }
        let c = &mut self.csum[port];
        match layer {
            "tcp" => c.tcp_hw = hw,
            "udp" => c.udp_hw = hw,
            _ => {}
        }
        self.say(&format!("{name} checksum offload is {} for port {port}\n", if hw { "hw" } else { "sw" }));
        Ok(())
    }

    /// `csum show PORT`.
    pub fn csum_show(&mut self, port: usize) -> Result<(), String> {
        self.features(port)?;
        let c = self.csum[port];
        let hs = |b: bool| if b { "hw" } else { "sw" };
        self.say(&format!(
            "IP checksum offload is sw\nUDP checksum offload is {}\nTCP checksum offload is {}\n",
            hs(c.udp_hw),
            hs(c.tcp_hw)
        ));
        Ok(())
    }

    /// `tso set MSS PORT`: TCP frames PORT transmits in `csum` mode whose payload is
    /// larger than MSS go out as segmentation requests (0: off). Needs HOST_TSO4 or
    /// HOST_TSO6 negotiated.
    pub fn tso_set(&mut self, mss: u16, port: usize) -> Result<(), String> {
        if self.running.is_some() {
            return Err("Please stop forwarding first (TSO settings apply at start)".into());
        }
        let feats = self.features(port)?;
        if mss != 0 && feats & (f::bit(f::NET_HOST_TSO4) | f::bit(f::NET_HOST_TSO6)) == 0 {
            return Err(format!(
                "TSO is not supported by port {port} (VIRTIO_NET_F_HOST_TSO4/TSO6 not negotiated)"
            ));
        }
        self.csum[port].tso_segsz = mss;
        self.say(&if mss == 0 {
            format!("TSO for non-tunneled packets is disabled on port {port}\n")
        } else {
            format!("TSO segment size for non-tunneled packets is {mss} on port {port}\n")
        });
        Ok(())
    }

    /// `tso show PORT`.
    pub fn tso_show(&mut self, port: usize) -> Result<(), String> {
        self.features(port)?;
        let mss = self.csum[port].tso_segsz;
        self.say(&if mss == 0 {
            "TSO for non-tunneled packets is disabled\n".to_string()
        } else {
            format!("TSO segment size for non-tunneled packets is {mss}\n")
        });
        Ok(())
    }
}
