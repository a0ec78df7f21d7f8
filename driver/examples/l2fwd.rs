//! l2fwd: DPDK's layer-2 forwarding sample, on this driver. Start here to write an
//! application.
//!
//! Every frame received on a port leaves on its paired port, with (by default) its MAC
//! addresses rewritten as DPDK's l2fwd does: destination `02:00:00:00:00:<out port>`,
//! source the out port's own MAC. Usage (EAL-style and application options may come in
//! any order; a lone `--` is ignored, so DPDK command lines work unchanged):
//!
//! ```text
//! l2fwd [-l 0-1] (--vdev net_virtio_user0,path=SOCK[,queues=N] | -a BDF)... [--]
//!       [-p PORTMASK] [-q RXQ_PER_THREAD] [-T SECS] [--[no-]mac-updating]
//!       [--portmap "(0,1),(2,3)"] [--queues N] [--drop-ethertype 0x86dd] [--hugepages]
//! ```
//!
//! What it shows, in the order the code does it:
//! 1. Ports: `--vdev`/`-a` are parsed by [`driver::devargs`] (the same syntax as testpmd)
//!    into a [`PortConfig`]; [`Port::open`] negotiates features and, with several queue
//!    pairs, sets the pair count through the control queue.
//! 2. Zero copy: when every port is virtio-user they share port 0's buffer pool, so a
//!    packet received on one port is sent on the other without a copy.
//! 3. Work split: each (port, queue) receive queue is one unit; a unit sends on the same
//!    queue index of its destination port, so every queue half has exactly one thread and
//!    nothing is locked. `-q` units go to each thread (DPDK's "rx queues per lcore").
//! 4. The XDP-style hook: `--drop-ethertype` attaches a tiny program to every receive
//!    queue that drops a frame type before the application ever sees it.
//! 5. Back-pressure instead of loss: what the destination ring refuses waits and is sent
//!    first on the next pass, and the unit receives nothing new meanwhile (DPDK's l2fwd
//!    drops such packets instead; here "dropped" counts only filtered or refused ones).
//! 6. Shutdown: SIGINT/SIGTERM stop the threads, which hand their queues back; the
//!    ports close (device reset first) and DPDK-style statistics are printed.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use driver::devargs::{parse_pci, parse_vdev};
use driver::{Packet, Port, PortConfig, QueuePair, QueueStatsSnapshot, RxQueue, TxQueue, XdpVerdict};

/// Packets per receive burst (DPDK's MAX_PKT_BURST).
const BURST: usize = 32;

/// The command line, validated.
struct Opts {
    ports: Vec<PortConfig>,
    portmask: u64,
    rxq_per_thread: usize,
    stats_period: u64,
    mac_updating: bool,
    portmap: Vec<(usize, usize)>,
    lcores: Option<Vec<usize>>,
    drop_ethertype: Option<u16>,
}

fn usage() -> String {
    "usage: l2fwd [-l CORES] (--vdev virtio_user0,path=SOCK[,queues=N] | -a BDF)... [--] \
     [-p PORTMASK] [-q N] [-T SECS] [--[no-]mac-updating] [--portmap \"(0,1)\"] [--queues N] \
     [--drop-ethertype 0xHHHH] [--hugepages]"
        .into()
}

fn parse_num(opt: &str, v: &str) -> Result<u64, String> {
    let r = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => v.parse(),
    };
    r.map_err(|_| format!("{opt} {v}: not a number"))
}

/// `0-1,3` -> [0, 1, 3].
fn parse_cores(v: &str) -> Result<Vec<usize>, String> {
    let mut out = Vec::new();
    for part in v.split(',') {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b) = (parse_num("-l", a)? as usize, parse_num("-l", b)? as usize);
        if a > b || b >= 1024 {
            return Err(format!("-l {v}: bad core range '{part}'"));
        }
        out.extend(a..=b);
    }
    Ok(out)
}

/// `(0,1),(2,3)` -> [(0, 1), (2, 3)].
fn parse_portmap(v: &str) -> Result<Vec<(usize, usize)>, String> {
    let bad = || format!("--portmap {v}: expected \"(P,Q),(P,Q)...\"");
    let mut out = Vec::new();
    for pair in v.split(')').map(|s| s.trim_start_matches(',').trim()).filter(|s| !s.is_empty()) {
        let (a, b) = pair.strip_prefix('(').and_then(|p| p.split_once(',')).ok_or_else(bad)?;
        out.push((a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?));
    }
    Ok(out)
}

fn parse_args() -> Result<Opts, String> {
    let mut o = Opts {
        ports: Vec::new(),
        portmask: u64::MAX,
        rxq_per_thread: 1,
        stats_period: 10,
        mac_updating: true,
        portmap: Vec::new(),
        lcores: None,
        drop_ethertype: None,
    };
    let (mut pci, mut vdevs, mut queues, mut huge) = (Vec::new(), Vec::new(), None, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        // Both `--opt value` and `--opt=value`.
        let (name, inline) = match a.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut val = || inline.clone().or_else(|| args.next()).ok_or(format!("{name} needs a value"));
        match name.as_str() {
            "--" => {}
            "--vdev" => vdevs.push(parse_vdev(&val()?).map_err(|e| e.to_string())?),
            "-a" | "--allow" => pci.push(parse_pci(&val()?).map_err(|e| e.to_string())?),
            "-l" | "--lcores" => o.lcores = Some(parse_cores(&val()?)?),
            "-p" => o.portmask = parse_num("-p", &val()?)?,
            "-q" => o.rxq_per_thread = parse_num("-q", &val()?)?.clamp(1, 64) as usize,
            "-T" => o.stats_period = parse_num("-T", &val()?)?,
            "--mac-updating" => o.mac_updating = true,
            "--no-mac-updating" => o.mac_updating = false,
            "--portmap" => o.portmap = parse_portmap(&val()?)?,
            "--queues" => queues = Some(parse_num("--queues", &val()?)?.clamp(1, 256) as u16),
            "--drop-ethertype" => o.drop_ethertype = Some(parse_num("--drop-ethertype", &val()?)? as u16),
            "--hugepages" => huge = true,
            "-h" | "--help" => return Err(usage()),
            other => return Err(format!("unknown option '{other}'\n{}", usage())),
        }
    }
    // DPDK's port order: PCI devices first, then virtual devices.
    o.ports.extend(pci.iter().map(|p| p.port_config()));
    let n_pci = o.ports.len();
    for v in &vdevs {
        let mut pc = v.port_config();
        if let (Some(q), None) = (queues, v.queues) {
            pc.queue_pairs = q;
        }
        o.ports.push(pc);
    }
    for pc in &mut o.ports[..n_pci] {
        pc.queue_pairs = queues.unwrap_or(1);
    }
    for pc in &mut o.ports {
        pc.hugepages |= huge; // 2 MiB pages: fewer IOMMU mappings (always on for no-IOMMU)
    }
    if o.ports.is_empty() {
        return Err(format!("no port given\n{}", usage()));
    }
    Ok(o)
}

/// The destination of every enabled port: `--portmap` pairs, else consecutive enabled
/// ports in pairs (a last odd port forwards to itself, as in DPDK).
fn destinations(o: &Opts) -> Result<Vec<Option<usize>>, String> {
    let n = o.ports.len();
    let enabled: Vec<usize> = (0..n).filter(|&p| p < 64 && o.portmask & (1 << p) != 0).collect();
    let mut dst = vec![None; n];
    if o.portmap.is_empty() {
        for pair in enabled.chunks(2) {
            let (a, b) = (pair[0], *pair.get(1).unwrap_or(&pair[0]));
            (dst[a], dst[b]) = (Some(b), Some(a));
        }
    }
    for &(a, b) in &o.portmap {
        if !enabled.contains(&a) || !enabled.contains(&b) {
            return Err(format!("--portmap ({a},{b}): port not enabled by -p or not given"));
        }
        (dst[a], dst[b]) = (Some(b), Some(a));
    }
    Ok(dst)
}

/// Queue halves by `[port][queue]`, taken out as units claim them.
type Slots<T> = Vec<Vec<Option<T>>>;

/// One unit of work: a receive queue and the transmit queue its frames leave on.
struct Unit {
    rx_port: usize,
    tx_port: usize,
    queue: u16,
    rx: RxQueue,
    tx: TxQueue,
    /// Source MAC for frames out of `tx_port` (that port's own).
    tx_mac: [u8; 6],
    /// Frames the destination ring refused; sent first on the next pass.
    pending: Vec<Packet>,
}

/// DPDK's l2fwd_mac_updating: dst 02:00:00:00:00:<out port>, src the out port's MAC.
fn update_mac(pkt: &mut Packet, out_port: usize, out_mac: &[u8; 6]) {
    let d = pkt.data_mut();
    if d.len() >= 12 {
        d[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, out_port as u8]);
        d[6..12].copy_from_slice(out_mac);
    }
}

/// The polling loop of one thread: no allocation, no lock, no syscall per packet.
fn poll(units: &mut [Unit], stop: &AtomicBool, mac_updating: bool) {
    while !stop.load(Ordering::Relaxed) {
        for u in units.iter_mut() {
            if !u.pending.is_empty() {
                u.tx.tx_burst(&mut u.pending);
                if !u.pending.is_empty() {
                    continue; // Destination still full: leave our receive ring alone.
                }
            }
            if u.rx.rx_burst(&mut u.pending, BURST) == 0 {
                continue;
            }
            if mac_updating {
                for p in u.pending.iter_mut() {
                    update_mac(p, u.tx_port, &u.tx_mac);
                }
            }
            u.tx.tx_burst(&mut u.pending);
        }
    }
}

/// Pins the calling thread to `core` (best effort: a warning if refused).
fn pin(core: usize) {
    // SAFETY: cpu_set_t is plain data; zeroed is the empty set, and CPU_SET indexes
    // within its fixed size (core < 1024 = CPU_SETSIZE, checked by parse_cores).
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        eprintln!("l2fwd: cannot pin a thread to core {core}: {}", std::io::Error::last_os_error());
    }
}

/// Port totals: (sent, received, dropped). Dropped: frames the filter dropped on receive
/// and frames the transmit queue refused (bad offload request, no buffer to copy into).
fn totals(q: &[QueueStatsSnapshot]) -> (u64, u64, u64) {
    q.iter().fold((0, 0, 0), |(s, r, d), q| {
        (s + q.tx_packets, r + q.rx_packets, d + q.xdp_drop + q.xdp_aborted + q.tx_errors + q.tx_nobuf)
    })
}

fn print_stats(out: &mut impl Write, ports: &[Port], enabled: &[bool], per_queue: bool) {
    let mut all = (0, 0, 0);
    let _ = writeln!(out, "\nPort statistics ====================================");
    for (i, port) in ports.iter().enumerate().filter(|(i, _)| enabled[*i]) {
        let q = port.stats();
        let (s, r, d) = totals(&q);
        all = (all.0 + s, all.1 + r, all.2 + d);
        let _ = writeln!(out, "Statistics for port {i} ------------------------------");
        let _ = writeln!(out, "Packets sent: {s:>24}\nPackets received: {r:>20}\nPackets dropped: {d:>21}");
        for (n, q) in q.iter().enumerate().filter(|_| per_queue) {
            let _ = writeln!(out, "  queue {n}: received {} sent {}", q.rx_packets, q.tx_packets);
        }
    }
    let _ = writeln!(out, "Aggregate statistics ===============================");
    let _ = writeln!(out, "Total packets sent: {:>18}\nTotal packets received: {:>14}", all.0, all.1);
    let _ = writeln!(out, "Total packets dropped: {:>15}", all.2);
    let _ = writeln!(out, "====================================================");
    let _ = out.flush();
}

fn run() -> Result<(), String> {
    let mut o = parse_args()?;
    let dst = destinations(&o)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).map_err(|e| format!("signal handler: {e}"))?;
    }

    // 1-2. Open every port (all of them, so port numbers match the command line). If all
    // are virtio-user, ports 1.. use port 0's pool: forwarding then never copies.
    let all_user = o.ports.iter().all(|p| matches!(p.transport, driver::TransportConfig::VirtioUser { .. }));
    let mut ports: Vec<Port> = Vec::new();
    for (i, mut pc) in std::mem::take(&mut o.ports).into_iter().enumerate() {
        if all_user {
            match ports.first() {
                Some(p0) => pc.pool = Some(p0.pool().clone()),
                // Enough buffers to fill every ring of every port twice.
                None => pc.buffers = Some(4 * pc.ring_size as u32 * pc.queue_pairs as u32 * dst.len() as u32),
            }
        }
        let port = Port::open(pc).map_err(|e| format!("port {i}: {e}"))?;
        let mac = port.info().mac.map(|b| format!("{b:02X}")).join(":");
        println!("Port {i}: MAC {mac}, {} queue pair(s)", port.stats().len());
        ports.push(port);
    }

    // 3. Split the queue pairs into units: unit (p, q) receives on p's queue q and sends
    // on queue q of dst(p). Queue-major order, so `-q 2` with two ports gives each thread
    // one queue index of both ports.
    let (mut rx, mut tx): (Slots<RxQueue>, Slots<TxQueue>) = (Vec::new(), Vec::new());
    for port in ports.iter_mut() {
        let (r, t) = port.take_queue_pairs().into_iter().map(|qp| (Some(qp.rx), Some(qp.tx))).unzip();
        rx.push(r);
        tx.push(t);
    }
    let max_q = rx.iter().map(Vec::len).max().unwrap_or(0);
    let mut units = Vec::new();
    for q in 0..max_q {
        for (p, d) in dst.iter().enumerate() {
            let Some(d) = *d else { continue };
            let (Some(r), Some(t)) =
                (rx[p].get_mut(q).and_then(Option::take), tx[d].get_mut(q).and_then(Option::take))
            else {
                return Err(format!("ports {p} and {d} must have the same number of queue pairs"));
            };
            let tx_mac = ports[d].info().mac;
            units.push(Unit {
                rx_port: p,
                tx_port: d,
                queue: q as u16,
                rx: r,
                tx: t,
                tx_mac,
                pending: Vec::with_capacity(BURST),
            });
        }
    }
    if units.is_empty() {
        return Err("no port enabled by -p".into());
    }

    // 4. The optional filter, in front of forwarding.
    if let Some(et) = o.drop_ethertype {
        for u in units.iter_mut() {
            let prog = move |p: &mut Packet| {
                let d = p.data();
                if d.len() >= 14 && u16::from_be_bytes([d[12], d[13]]) == et {
                    XdpVerdict::Drop
                } else {
                    XdpVerdict::Pass
                }
            };
            u.rx.attach_xdp(Box::new(prog)).map_err(|e| format!("port {}: XDP filter: {e}", u.rx_port))?;
        }
    }

    // Threads: `-q` units each; with -l, one core per thread.
    let nthreads = units.len().div_ceil(o.rxq_per_thread);
    if let Some(l) = &o.lcores {
        if l.len() < nthreads {
            return Err(format!(
                "{} queue(s) at -q {} need {nthreads} lcores, -l gives {}",
                units.len(),
                o.rxq_per_thread,
                l.len()
            ));
        }
    }
    let mut workers = Vec::new();
    for t in 0..nthreads {
        let mine: Vec<Unit> = units.drain(..o.rxq_per_thread.min(units.len())).collect();
        for u in &mine {
            println!("thread {t}: port {} queue {} -> port {}", u.rx_port, u.queue, u.tx_port);
        }
        let (stop, mac_updating, core) = (stop.clone(), o.mac_updating, o.lcores.as_ref().map(|l| l[t]));
        workers.push(thread::spawn(move || {
            if let Some(c) = core {
                pin(c);
            }
            let mut mine = mine;
            poll(&mut mine, &stop, mac_updating);
            mine
        }));
    }

    // The main thread prints statistics every -T seconds until a signal.
    let enabled: Vec<bool> = dst.iter().map(Option::is_some).collect();
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(100));
        if o.stats_period > 0 && last.elapsed() >= Duration::from_secs(o.stats_period) {
            print_stats(&mut std::io::stdout().lock(), &ports, &enabled, false);
            last = Instant::now();
        }
    }

    // 6. Shutdown: take every queue back, rebuild the pairs, close each port.
    let mut back: Vec<Unit> = Vec::new();
    for w in workers {
        back.extend(w.join().map_err(|_| "a forwarding thread panicked".to_string())?);
    }
    for u in back {
        rx[u.rx_port][u.queue as usize] = Some(u.rx);
        tx[u.tx_port][u.queue as usize] = Some(u.tx);
        // `u.pending` (frames never sent) is dropped here: buffers back to the pool.
    }
    println!("Closing ports...");
    print_stats(&mut std::io::stdout().lock(), &ports, &enabled, true);
    for (i, port) in ports.into_iter().enumerate() {
        let qps = rx[i]
            .iter_mut()
            .zip(tx[i].iter_mut())
            .enumerate()
            .filter_map(|(n, (r, t))| Some(QueuePair { index: n as u16, rx: r.take()?, tx: t.take()? }))
            .collect();
        port.close(qps).map_err(|e| format!("port {i}: close: {e}"))?;
    }
    println!("Bye...");
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("l2fwd: {e}");
        std::process::exit(1);
    }
}
