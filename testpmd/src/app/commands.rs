//! The prompt's control commands on the ports: `set promisc|allmulti`, `mac_addr set`,
//! `rx_vlan add|rm`, `port config all rxq|txq N`, each through the port's control queue
//! ([`driver::Control`]).
//!
//! Owns: checking that a command may run now (forwarding stopped where the state it
//! changes is shared with the forwarding threads) and the line each prints. Must not:
//! parse the prompt (interactive.rs does) or touch the data path.

use super::{mac_str, App};

impl App {
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
}
