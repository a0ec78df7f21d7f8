//! The interactive prompt (`-i`): DPDK testpmd's commands, with line editing and
//! history (rustyline) on a terminal and plain line reading otherwise (scripts, tests).
//!
//! Owns: command parsing and dispatch. Must not: hold forwarding state (the app does).

use std::io::BufRead;

use crate::app::{on_off, App};
use crate::config::{parse_mac, parse_txpkts, FwdMode, MAX_BURST};

const HELP: &str = "\
Commands:
  start                       start forwarding
  start tx_first [N]          inject N (default 1) bursts first, then forward
  stop                        stop forwarding and show forward statistics
  show port stats all|N       port statistics (Rx-pps/Tx-pps since the last show)
  show port info all|N        MAC, link, MTU, features, queues
  clear port stats all|N      reset port statistics
  show port xstats all|N      every counter of the port (per queue, XDP, control queue, pool)
  clear port xstats all|N     count extended statistics from here
  show port N latency         latency (p50/p99/p99.9/max), loss, reordering (--latency)
  show port N rss-hash        RSS hash settings (none: VIRTIO_NET_F_RSS is not negotiated)
  show fwd stats all          forward statistics (as at stop), while forwarding runs
  clear fwd stats all         reset forward statistics
  show config fwd|rxtx        streams per forwarding core | queues and descriptors
  port stop|start all|N       pause / resume the port's streams (its counters stop)
  port close all|N            close a stopped port (device reset; it stays closed)
  port config mtu N V         hold port N's frames to MTU V (68 up to the device's MTU)
  mac_addr add|remove N MAC   accept / stop accepting MAC (control queue MAC table)
  set nbcore N                forwarding threads at the next start
  set link-up|link-down port N  refused: a virtio device sets its own link status
  set verbose 0|1|2|3         dump received (1), sent (2) or both (3) frames
  set xdp N pass|drop|tx|redirect:P|off  XDP-style program on port N's receive queues
  set capture FILE[,port=N][,queue=Q][,dir=rx|tx|both][,count=N]
                              capture frames into a pcap file from the next start
  set capture off             end the capture (its counts are printed)
  set fwd MODE                io, mac, macswap, rxonly, txonly, flowgen, icmpecho, csum,
                              5tswap, noisy
  set burst N                 packets per burst
  set txpkts N[,N...]         txonly/flowgen frame length, or its segments (a chain)
  csum set ip|tcp|udp hw|sw N csum mode: checksum by the device (hw) or in software
  csum show N                 csum mode settings of port N
  tso set MSS N               csum mode: TCP segmentation offload of MSS (0: off)
  tso show N                  TSO setting of port N
  set promisc all|N on|off    promiscuous mode (control queue)
  set allmulti all|N on|off   all-multicast mode (control queue)
  mac_addr set N MAC          the port's MAC address (control queue)
  rx_vlan add|rm ID all|N     accept / stop accepting VLAN ID (control queue)
  port config all rxq|txq N   use N queue pairs on every port (forwarding stopped)
  port config all|P max-pkt-len N  ports stopped: from the next port start, frames above
                              N bytes are dropped on receive and the MTU is N - 18
  port config all|N rx_offload tcp_lro on|off  whether the device may send TCP super-frames
                              (GUEST_TSO4/6, negotiated with --enable-lro; control queue)
  help                        this text
  quit                        stop, close the ports and exit
";

fn port_arg(s: Option<&str>) -> Result<Option<usize>, String> {
    match s {
        Some("all") => Ok(None),
        Some(n) => {
            n.parse().map(Some).map_err(|_| format!("Bad arguments: '{n}' is not a port number or 'all'"))
        }
        None => Err("Bad arguments: expected 'all' or a port number".into()),
    }
}

/// Runs one command line; returns `false` on `quit`.
pub fn execute(app: &mut App, line: &str) -> Result<bool, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let idle = |app: &App, what: &str| {
        if app.is_running() {
            Err(format!("Please stop forwarding first ({what} cannot change while it runs)"))
        } else {
            Ok(())
        }
    };
    match words.as_slice() {
        [] => {}
        ["help"] => print!("{HELP}"),
        ["quit"] | ["exit"] => return Ok(false),
        ["start"] => app.start(None),
        ["start", "tx_first"] => app.start(Some(1)),
        ["start", "tx_first", n] => {
            let n = n.parse().map_err(|_| format!("Bad arguments: tx_first '{n}' is not a number"))?;
            app.start(Some(n))
        }
        ["stop"] => {
            app.stop();
        }
        ["show", "port", "stats", p] => app.show_port_stats(port_arg(Some(p))?)?,
        ["show", "port", "info", p] => app.show_port_info(port_arg(Some(p))?)?,
        ["clear", "port", "stats", p] => app.clear_port_stats(port_arg(Some(p))?)?,
        ["show", "port", "xstats", p] => app.show_port_xstats(port_arg(Some(p))?)?,
        ["clear", "port", "xstats", p] => app.clear_port_xstats(port_arg(Some(p))?)?,
        ["show", "port", p, "latency"] | ["show", "port", "latency", p] => {
            app.show_port_latency(port_arg(Some(p))?)?
        }
        ["show", "port", p, "rss-hash"] => {
            let p = port_arg(Some(p))?.ok_or("Bad arguments: show port N rss-hash needs one port number")?;
            app.show_rss_hash(p)?
        }
        ["show", "fwd", "stats", "all"] => app.show_fwd_stats(),
        ["clear", "fwd", "stats", "all"] => app.clear_fwd_stats(),
        ["show", "config", "fwd"] => app.show_config_fwd(),
        ["show", "config", "rxtx"] => app.show_config_rxtx(),
        ["port", "stop", p] => app.port_stop(port_arg(Some(p))?)?,
        ["port", "start", p] => app.port_start(port_arg(Some(p))?)?,
        ["port", "close", p] => app.port_close(port_arg(Some(p))?)?,
        ["port", "config", p, "mtu", v] | ["port", "config", "mtu", p, v] => {
            let p = port_arg(Some(p))?.ok_or("Bad arguments: port config mtu needs one port number")?;
            let v: u16 = v.parse().map_err(|_| format!("Bad arguments: MTU '{v}' is not a number"))?;
            app.port_config_mtu(p, v)?
        }
        ["mac_addr", op @ ("add" | "remove"), p, mac] => {
            let p = port_arg(Some(p))?.ok_or("Bad arguments: mac_addr needs one port number")?;
            app.mac_addr_add_remove(*op == "add", p, parse_mac(mac)?)?
        }
        ["set", "nbcore", n] => {
            let n: usize = n.parse().map_err(|_| format!("Bad arguments: '{n}' is not a number of cores"))?;
            app.set_nbcore(n)?
        }
        ["set", op @ ("link-up" | "link-down"), "port", p] => {
            let p = port_arg(Some(p))?.ok_or("Bad arguments: set link needs one port number")?;
            app.set_link(*op == "link-up", p)?
        }
        ["set", "xdp", p, prog] => {
            let p = port_arg(Some(p))?.ok_or("Bad arguments: set xdp needs one port number")?;
            let prog = if *prog == "off" { None } else { Some(prog.parse()?) };
            app.set_xdp(p, prog)?
        }
        ["set", "capture", "off"] => app.set_capture(None)?,
        ["set", "capture", spec] => app.set_capture(Some(spec.parse()?))?,
        ["set", "verbose", n] => {
            let n: u8 =
                n.parse().map_err(|_| format!("Bad arguments: verbose level '{n}' is not a number"))?;
            app.set_verbose(n)
        }
        ["set", "fwd", m] => {
            idle(app, "the forwarding mode")?;
            let mode: FwdMode = m.parse()?;
            if matches!(mode, FwdMode::TxOnly | FwdMode::FlowGen) && app.nb_ports() == 0 {
                return Err("no ports".into());
            }
            app.cfg.mode = mode;
            println!("Set {} packet forwarding mode", mode.name());
        }
        ["set", "burst", n] => {
            idle(app, "the burst size")?;
            let n: usize = n.parse().map_err(|_| format!("Bad arguments: burst '{n}' is not a number"))?;
            if n == 0 || n > MAX_BURST {
                return Err(format!("burst must be 1..={MAX_BURST}"));
            }
            app.cfg.burst = n;
            println!("Number of packets per burst set to {n}");
        }
        ["set", "txpkts", n] => {
            idle(app, "the packet length")?;
            let segs = parse_txpkts(n)?;
            app.check_tx_segs(&segs)?;
            app.cfg.txpkts = segs.iter().sum();
            app.cfg.tx_segs = segs;
        }
        ["csum", "set", layer, mode @ ("hw" | "sw"), p] => {
            let p = port_arg(Some(p))?.ok_or("Bad arguments: csum set needs one port number")?;
            app.csum_set(layer, *mode == "hw", p)?
        }
        ["csum", "show", p] => {
            let p = port_arg(Some(p))?.ok_or("Bad arguments: csum show needs one port number")?;
            app.csum_show(p)?
        }
        ["tso", "set", mss, p] => {
            let mss: u16 = mss.parse().map_err(|_| format!("Bad arguments: MSS '{mss}' is not a number"))?;
            let p = port_arg(Some(p))?.ok_or("Bad arguments: tso set needs one port number")?;
            app.tso_set(mss, p)?
        }
        ["tso", "show", p] => {
            let p = port_arg(Some(p))?.ok_or("Bad arguments: tso show needs one port number")?;
            app.tso_show(p)?
        }
        ["set", "promisc", p, v] => app.set_promisc(port_arg(Some(p))?, on_off(v)?)?,
        ["set", "allmulti", p, v] => app.set_allmulti(port_arg(Some(p))?, on_off(v)?)?,
        ["mac_addr", "set", p, mac] => {
            let p = port_arg(Some(p))?.ok_or("Bad arguments: mac_addr set needs one port number")?;
            app.set_mac_addr(p, parse_mac(mac)?)?
        }
        ["rx_vlan", op @ ("add" | "rm"), id, p] => {
            let vid: u16 =
                id.parse().map_err(|_| format!("Bad arguments: VLAN id '{id}' is not a number"))?;
            app.rx_vlan(*op == "add", vid, port_arg(Some(p))?)?
        }
        ["port", "config", p, "max-pkt-len", n] => {
            let p = port_arg(Some(p))?;
            let n: usize =
                n.parse().map_err(|_| format!("Bad arguments: max-pkt-len '{n}' is not a number"))?;
            app.port_config_max_pkt_len(p, n)?
        }
        ["port", "config", p, "rx_offload", "tcp_lro", v] => {
            app.config_rx_lro(port_arg(Some(p))?, on_off(v)?)?
        }
        ["port", "config", "all", "rxq" | "txq", n] => {
            let n: u16 = n.parse().map_err(|_| format!("Bad arguments: '{n}' is not a number of queues"))?;
            app.config_queues(n)?
        }
        _ => return Err(format!("Bad arguments: unknown command '{line}' (type 'help')")),
    }
    Ok(true)
}

/// The prompt loop; returns at `quit` or end of input.
pub fn run(app: &mut App) {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        let mut rl = match rustyline::DefaultEditor::new() {
            Ok(rl) => rl,
            Err(e) => {
                eprintln!("testpmd: line editing unavailable ({e}); reading plain lines");
                return run_plain(app);
            }
        };
        // Ends on Ctrl-D / Ctrl-C (an error from readline) or `quit`.
        while let Ok(line) = rl.readline("testpmd> ") {
            let _ = rl.add_history_entry(line.as_str());
            match execute(app, &line) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => println!("{e}"),
            }
        }
    } else {
        run_plain(app);
    }
}

fn run_plain(app: &mut App) {
    use std::io::Write;
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        print!("testpmd> ");
        let _ = std::io::stdout().flush();
        let Some(Ok(line)) = lines.next() else { break };
        println!("{}", line.trim_end());
        match execute(app, &line) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => println!("{e}"),
        }
    }
}
