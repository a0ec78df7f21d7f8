//! testpmd's command line: DPDK testpmd's option names and meanings where they exist,
//! parsed and validated into a [`Config`].
//!
//! Owns: option syntax (`--vdev virtio_user0,path=..`, `--eth-peer N,MAC`, ...) and every
//! range check that does not need an open port. Must not: open ports or start threads.

use std::str::FromStr;

use clap::Parser;

/// A forwarding mode (DPDK testpmd's `--forward-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FwdMode {
    /// Forward as received, port pairs to each other.
    Io,
    /// Rewrite source MAC (port's) and destination MAC (the peer's).
    Mac,
    /// `io` through a FIFO and a simulated per-packet memory workload (`--noisy-*`).
    Noisy,
    /// Swap source and destination MACs.
    MacSwap,
    /// Swap source and destination MACs, IP addresses and TCP/UDP ports.
    FiveTSwap,
    /// Receive and drop.
    RxOnly,
    /// Transmit UDP/IPv4 frames of `--txpkts` bytes.
    TxOnly,
    /// Transmit frames of many flows.
    FlowGen,
    /// Answer ARP requests and ICMP echo requests.
    IcmpEcho,
    /// Set IP/TCP/UDP checksums (software or offloaded, `csum set`) and TSO (`tso set`),
    /// then forward as `mac` does (DPDK's `csum` mode).
    Csum,
}

impl FwdMode {
    /// All modes, in help order.
    pub const ALL: [FwdMode; 10] = [
        FwdMode::Io,
        FwdMode::Mac,
        FwdMode::MacSwap,
        FwdMode::RxOnly,
        FwdMode::TxOnly,
        FwdMode::FlowGen,
        FwdMode::IcmpEcho,
        FwdMode::Csum,
        FwdMode::FiveTSwap,
        FwdMode::Noisy,
    ];
    /// The mode's name.
    pub fn name(self) -> &'static str {
        match self {
            FwdMode::Io => "io",
            FwdMode::Mac => "mac",
            FwdMode::MacSwap => "macswap",
            FwdMode::FiveTSwap => "5tswap",
            FwdMode::RxOnly => "rxonly",
            FwdMode::TxOnly => "txonly",
            FwdMode::FlowGen => "flowgen",
            FwdMode::IcmpEcho => "icmpecho",
            FwdMode::Csum => "csum",
            FwdMode::Noisy => "noisy",
        }
    }
}

impl FromStr for FwdMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        FwdMode::ALL.into_iter().find(|m| m.name() == s).ok_or_else(|| {
            format!(
                "unknown forwarding mode '{s}' (expected one of: {})",
                FwdMode::ALL.map(|m| m.name()).join(", ")
            )
        })
    }
}

/// The XDP-style program `--xdp-prog` attaches to every receive queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpProg {
    /// Every frame PASS (to the forwarding engine).
    Pass,
    /// Every frame DROP (recycled in the driver; the engine sees nothing).
    Drop,
    /// Every frame TX: MAC addresses swapped (as Linux's xdp2 sample), out on the same
    /// port and queue.
    Tx,
    /// Every frame REDIRECT, unchanged, to this port's transmit queue of the same index.
    Redirect(u16),
}

impl XdpProg {
    /// The option value naming it.
    pub fn name(self) -> String {
        match self {
            XdpProg::Pass => "pass".into(),
            XdpProg::Drop => "drop".into(),
            XdpProg::Tx => "tx".into(),
            XdpProg::Redirect(p) => format!("redirect:{p}"),
        }
    }
}

impl FromStr for XdpProg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pass" => Ok(XdpProg::Pass),
            "drop" => Ok(XdpProg::Drop),
            "tx" => Ok(XdpProg::Tx),
            _ => match s.strip_prefix("redirect:") {
                Some(p) => p
                    .parse()
                    .map(XdpProg::Redirect)
                    .map_err(|_| format!("--xdp-prog {s}: '{p}' is not a port number")),
                None => Err(format!("--xdp-prog {s}: expected pass, drop, tx or redirect:PORT")),
            },
        }
    }
}

// Port arguments (`--vdev`, `-a`) are the driver library's, shared with its examples.
pub use driver::devargs::{PciSpec, VdevSpec};

/// The message of a driver configuration error, without the driver's prefix.
fn devargs_msg(e: driver::Error) -> String {
    match e {
        driver::Error::Config(m) => m,
        e => e.to_string(),
    }
}

/// Parses one `-a` value.
pub fn parse_pci(s: &str) -> Result<PciSpec, String> {
    driver::devargs::parse_pci(s).map_err(devargs_msg)
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    driver::devargs::parse_mac(s).map_err(devargs_msg)
}

/// Parses one `--vdev` value.
pub fn parse_vdev(s: &str) -> Result<VdevSpec, String> {
    driver::devargs::parse_vdev(s).map_err(devargs_msg)
}

/// Most segments `--txpkts` may list (the driver sends at most this many per packet).
pub const MAX_TX_SEGS: usize = driver::queue::MAX_TX_SEGS;
/// Largest frame (`--txpkts` total, `--max-pkt-len`): a 9000-byte MTU, Ethernet header
/// and a VLAN tag.
pub const MAX_FRAME: usize = 9000 + 14 + 4;

/// Parses `--txpkts A[,B...]` (DPDK: the segment lengths of each generated frame, which
/// is their sum): the segment lengths.
pub fn parse_txpkts(s: &str) -> Result<Vec<usize>, String> {
    let segs = s
        .split(',')
        .map(|x| x.trim().parse::<usize>().map_err(|_| format!("--txpkts {s}: '{x}' is not a number")))
        .collect::<Result<Vec<_>, _>>()?;
    if segs.len() > MAX_TX_SEGS {
        return Err(format!("--txpkts {s}: {} segments, at most {MAX_TX_SEGS}", segs.len()));
    }
    if segs.contains(&0) {
        return Err(format!("--txpkts {s}: a segment of 0 bytes"));
    }
    let total: usize = segs.iter().sum();
    if total < 60 {
        return Err(format!("--txpkts {total} is below the 60-byte Ethernet minimum"));
    }
    if total > MAX_FRAME {
        return Err(format!(
            "--txpkts {total} is above any MTU this driver supports (frames of at most {MAX_FRAME} bytes)"
        ));
    }
    Ok(segs)
}

/// Parses `--eth-peer N,MAC`.
pub fn parse_eth_peer(s: &str) -> Result<(u16, [u8; 6]), String> {
    let (port, mac) = s.split_once(',').ok_or_else(|| format!("--eth-peer {s}: expected PORT,MAC"))?;
    let port = port.parse().map_err(|_| format!("--eth-peer {s}: '{port}' is not a port number"))?;
    Ok((port, parse_mac(mac)?))
}

/// How statistics are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StatsFormat {
    /// DPDK testpmd's layout.
    Text,
    /// One JSON object per line.
    Json,
}

/// The command line.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "testpmd",
    version,
    about = "A DPDK-style testpmd on the vnet virtio-net poll-mode driver.",
    long_about = "A DPDK-style testpmd on the vnet virtio-net poll-mode driver.\n\n\
        With no --vdev or -a it runs its embedded default: our host backend in the same process \
        (a reflect port on a private unix socket), one virtio-user port on it, io forwarding for \
        --duration seconds, then the summary."
)]
pub struct Args {
    /// A virtio-user port: virtio_user0,path=SOCK[,queues=N][,queue_size=N][,mac=MAC][,packed_vq=0|1][,in_order=0|1][,mrg_rxbuf=0|1]
    #[arg(long = "vdev", value_name = "DEVARGS")]
    pub vdev: Vec<String>,
    /// A VFIO-PCI port by PCI address (BDF), e.g. 0000:00:03.0: BDF[,packed_vq=0|1]. Packed
    /// rings when the device offers VIRTIO_F_RING_PACKED (as DPDK's virtio PMD on PCI);
    /// packed_vq=1 requires them, packed_vq=0 keeps split rings.
    #[arg(short = 'a', long = "allow", value_name = "BDF[,DEVARGS]")]
    pub pci: Vec<String>,
    /// Forwarding mode: io, mac, macswap, rxonly, txonly, flowgen, icmpecho, csum, 5tswap, noisy.
    #[arg(long = "forward-mode", default_value = "io")]
    pub forward_mode: String,
    /// Packets per burst.
    #[arg(long, default_value_t = 32)]
    pub burst: usize,
    /// Frame length of txonly/flowgen packets (without CRC), or its segment lengths
    /// A,B,...: each frame is then a chain of buffers of those lengths (DPDK's semantics).
    #[arg(long, default_value = "64", value_name = "N[,N...]")]
    pub txpkts: String,
    /// Bytes per packet buffer, headroom included (DPDK's mbuf data room size; a
    /// multiple of 64). Default: the headroom plus 2048, rounded up to 64.
    #[arg(long = "mbuf-size", value_name = "N")]
    pub mbuf_size: Option<u32>,
    /// Largest frame to receive (Ethernet header included, no CRC). Frames larger than
    /// one buffer need VIRTIO_NET_F_MRG_RXBUF, which it then negotiates.
    #[arg(long = "max-pkt-len", value_name = "N")]
    pub max_pkt_len: Option<usize>,
    /// Receive queues per port (must equal --txq: queues come in pairs).
    #[arg(long, default_value_t = 1)]
    pub rxq: u16,
    /// Transmit queues per port.
    #[arg(long, default_value_t = 1)]
    pub txq: u16,
    /// Forwarding cores (threads).
    #[arg(long = "nb-cores", default_value_t = 1)]
    pub nb_cores: usize,
    /// CPUs to pin forwarding threads to, e.g. 0 or 0,1 (default: unpinned).
    #[arg(long, value_name = "LIST")]
    pub cores: Option<String>,
    /// Destination MAC for port N in mac/txonly/flowgen modes: N,MAC (repeatable).
    #[arg(long = "eth-peer", value_name = "N,MAC")]
    pub eth_peer: Vec<String>,
    /// Print port statistics every N seconds (0: only at stop).
    #[arg(long = "stats-period", default_value_t = 0)]
    pub stats_period: u64,
    /// Statistics format.
    #[arg(long = "stats-format", value_enum, default_value_t = StatsFormat::Text)]
    pub stats_format: StatsFormat,
    /// Buffers per port pool (default: twice what the rings hold).
    #[arg(long = "total-num-mbufs")]
    pub total_num_mbufs: Option<u32>,
    /// Headroom before packet data in every buffer.
    #[arg(long, default_value_t = 256)]
    pub headroom: u16,
    /// Interactive prompt.
    #[arg(short = 'i', long = "interactive")]
    pub interactive: bool,
    /// Seconds to forward before stopping (non-interactive; default: until SIGINT,
    /// or 10 s for the embedded default).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Number of flows in flowgen mode.
    #[arg(long = "flowgen-flows", default_value_t = 1024)]
    pub flowgen_flows: u32,
    /// Injects this many bursts at start (like `start tx_first N`), for loops.
    #[arg(long = "tx-first", value_name = "BURSTS")]
    pub tx_first: Option<u32>,
    /// Back DMA memory with hugepages.
    #[arg(long)]
    pub hugepages: bool,
    /// Attach an XDP-style program to every receive queue: pass, drop, tx (MACs
    /// swapped, out on the same port and queue) or redirect:PORT (to PORT's transmit
    /// queue of the same index).
    #[arg(long = "xdp-prog", value_name = "PROG")]
    pub xdp_prog: Option<String>,
    /// Capture frames into a pcap file: FILE[,port=N][,queue=Q][,dir=rx|tx|both][,count=N].
    #[arg(long = "pcap-out", value_name = "FILE[,KEY=VALUE...]")]
    pub pcap_out: Option<String>,
    /// Latency and loss: txonly/flowgen stamp a sequence number and send time into each
    /// frame (58 bytes or more); receiving streams report p50/p99/p99.9/max latency,
    /// loss and reordering (`show port N latency`, and at stop). txonly also receives
    /// and measures what comes back (a round trip through a reflecting back-end).
    #[arg(long)]
    pub latency: bool,
    /// After a pass over its streams that moved nothing, a forwarding thread spins this
    /// many CPU pause instructions before polling again (0: at once). A probe for what
    /// polling rings the other side is writing costs (issue 24); not a tuning knob yet.
    #[arg(long = "idle-pause", default_value_t = 0, value_name = "N")]
    pub idle_pause: u32,
    /// Large receive (DPDK's option): negotiate GUEST_CSUM, GUEST_TSO4/6 and mergeable
    /// receive buffers where the device offers them, so TCP super-frames arrive whole
    /// (as buffer chains, with their GSO metadata) instead of as segments.
    #[arg(long = "enable-lro")]
    pub enable_lro: bool,
    /// A stream whose transmit ring cannot take all of a burst keeps the rest and sends
    /// it first at its next turn, receiving nothing until it has gone (no frame is
    /// dropped: the backlog holds the receive ring, and the device behind it waits).
    /// DPDK's testpmd drops what does not fit (with `retry`, it waits in place).
    #[arg(long = "hold-tx")]
    pub hold_tx: bool,
    /// Count the packets of every receive and transmit burst call and show how they
    /// spread with the forward statistics (DPDK's option of the same name).
    #[arg(long = "record-burst-stats")]
    pub record_burst_stats: bool,
    /// txonly/flowgen: send at most this many frames per second per stream (0: as
    /// fast as the ring takes them), e.g. for latency at a fixed low load.
    #[arg(long = "tx-pps", default_value_t = 0, value_name = "PPS")]
    pub tx_pps: u64,
    /// noisy mode: frames each stream's FIFO holds (0: no FIFO).
    #[arg(long = "noisy-tx-sw-buffer-size", default_value_t = 0, value_name = "N")]
    pub noisy_bufsz: usize,
    /// noisy mode: milliseconds after which a FIFO is sent (0: every burst).
    #[arg(long = "noisy-tx-sw-buffer-flushtime", default_value_t = 0, value_name = "MS")]
    pub noisy_flush_ms: u64,
    /// noisy mode: megabytes of lookup memory per forwarding thread.
    #[arg(long = "noisy-lkup-memory", default_value_t = 0, value_name = "MB")]
    pub noisy_lkup_mb: usize,
    /// noisy mode: random writes into the lookup memory per packet.
    #[arg(long = "noisy-lkup-num-writes", default_value_t = 0, value_name = "N")]
    pub noisy_writes: u32,
    /// noisy mode: random reads per packet.
    #[arg(long = "noisy-lkup-num-reads", default_value_t = 0, value_name = "N")]
    pub noisy_reads: u32,
    /// noisy mode: random read-modify-writes per packet.
    #[arg(long = "noisy-lkup-num-reads-writes", default_value_t = 0, value_name = "N")]
    pub noisy_reads_writes: u32,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// VFIO-PCI ports (`-a`), with normalised PCI addresses; opened before the
    /// virtio-user ports, as DPDK probes PCI devices before vdevs.
    pub pci: Vec<PciSpec>,
    /// virtio-user ports.
    pub vdevs: Vec<VdevSpec>,
    /// Forwarding mode.
    pub mode: FwdMode,
    /// Burst size.
    pub burst: usize,
    /// txonly/flowgen frame length (the sum of `tx_segs`).
    pub txpkts: usize,
    /// txonly/flowgen segment lengths (one: flat frames).
    pub tx_segs: Vec<usize>,
    /// Bytes per buffer (`--mbuf-size`), if given.
    pub mbuf_size: Option<u32>,
    /// Largest frame to receive (`--max-pkt-len`), if given.
    pub max_pkt_len: Option<usize>,
    /// Queue pairs per port.
    pub queues: u16,
    /// Forwarding threads.
    pub nb_cores: usize,
    /// CPU pinning of forwarding threads.
    pub cores: Option<Vec<usize>>,
    /// Peer MACs by port.
    pub eth_peers: Vec<(u16, [u8; 6])>,
    /// Stats period.
    pub stats_period: u64,
    /// Stats format.
    pub stats_format: StatsFormat,
    /// `--latency`: stamp and measure.
    pub latency: bool,
    /// `--tx-pps`: per-stream pacing of txonly/flowgen (0: none).
    pub tx_pps: u64,
    /// `--record-burst-stats`.
    pub burst_stats: bool,
    /// `--idle-pause`.
    pub idle_pause: u32,
    /// `--enable-lro`.
    pub enable_lro: bool,
    /// `--hold-tx`.
    pub hold_tx: bool,
    /// Pool size per port.
    pub mbufs: Option<u32>,
    /// Headroom.
    pub headroom: u16,
    /// Interactive.
    pub interactive: bool,
    /// Run time.
    pub duration: Option<f64>,
    /// flowgen flows.
    pub flows: u32,
    /// Bursts to inject at start.
    pub tx_first: Option<u32>,
    /// Hugepages.
    pub hugepages: bool,
    /// No port given: the embedded default.
    pub embedded: bool,
    /// The XDP-style program on every receive queue.
    pub xdp: Option<XdpProg>,
    /// `--pcap-out`: the packet capture started with the ports.
    pub capture: Option<crate::capture::CaptureSpec>,
    /// `--noisy-*`.
    pub noisy: crate::noisy::NoisyCfg,
}

/// Largest burst.
pub const MAX_BURST: usize = 512;

impl Config {
    /// Validates `args`.
    pub fn from_args(a: &Args) -> Result<Config, String> {
        let pci = a.pci.iter().map(|b| parse_pci(b)).collect::<Result<Vec<_>, _>>()?;
        let vdevs = a.vdev.iter().map(|v| parse_vdev(v)).collect::<Result<Vec<_>, _>>()?;
        let mode: FwdMode = a.forward_mode.parse()?;
        if a.burst == 0 || a.burst > MAX_BURST {
            return Err(format!("--burst {} out of range 1..={MAX_BURST}", a.burst));
        }
        let tx_segs = parse_txpkts(&a.txpkts)?;
        if let Some(m) = a.mbuf_size {
            if m % 64 != 0 || m <= a.headroom as u32 + 64 + 60 || m > driver::mempool::MAX_BUF_SIZE {
                return Err(format!(
                    "--mbuf-size {m} must be a multiple of 64, above the headroom ({}) + 64 bytes of tailroom + \
                     a 60-byte frame, and at most {}",
                    a.headroom,
                    driver::mempool::MAX_BUF_SIZE
                ));
            }
        }
        if let Some(m) = a.max_pkt_len {
            if !(64..=MAX_FRAME).contains(&m) {
                return Err(format!("--max-pkt-len {m} out of range 64..={MAX_FRAME}"));
            }
        }
        if a.rxq != a.txq {
            return Err(format!("--rxq {} and --txq {} differ: virtio queues come in pairs", a.rxq, a.txq));
        }
        if a.rxq == 0 {
            return Err("--rxq must be at least 1".into());
        }
        if a.noisy_lkup_mb > 16 * 1024 {
            return Err(format!("--noisy-lkup-memory {} MB is more than 16 GiB", a.noisy_lkup_mb));
        }
        if a.latency && matches!(mode, FwdMode::TxOnly | FwdMode::FlowGen) {
            let len: usize = tx_segs.iter().sum();
            if len < crate::latency::MIN_FRAME || tx_segs[0] < crate::latency::MIN_FRAME {
                return Err(format!(
                    "--latency: frames (and their first segment) must be at least {} bytes to carry the stamp",
                    crate::latency::MIN_FRAME
                ));
            }
        }
        if a.nb_cores == 0 {
            return Err("--nb-cores must be at least 1".into());
        }
        if a.headroom < 12 {
            return Err(format!("--headroom {} is below the 12-byte virtio-net header", a.headroom));
        }
        if matches!(a.duration, Some(d) if !(d > 0.0 && d.is_finite())) {
            return Err("--duration must be a positive number of seconds".into());
        }
        let cores = match &a.cores {
            None => None,
            Some(s) => Some(host_backend::config::parse_cores(s).map_err(|e| e.to_string())?),
        };
        for q in vdevs.iter().filter_map(|v| v.queues) {
            if q != a.rxq {
                return Err(format!("--vdev queues={q} differs from --rxq {}", a.rxq));
            }
        }
        Ok(Config {
            embedded: vdevs.is_empty() && pci.is_empty(),
            pci,
            vdevs,
            mode,
            burst: a.burst,
            txpkts: tx_segs.iter().sum(),
            tx_segs,
            mbuf_size: a.mbuf_size,
            max_pkt_len: a.max_pkt_len,
            queues: a.rxq,
            nb_cores: a.nb_cores,
            cores,
            eth_peers: a.eth_peer.iter().map(|p| parse_eth_peer(p)).collect::<Result<_, _>>()?,
            stats_period: a.stats_period,
            stats_format: a.stats_format,
            latency: a.latency,
            tx_pps: a.tx_pps,
            burst_stats: a.record_burst_stats,
            idle_pause: a.idle_pause,
            enable_lro: a.enable_lro,
            hold_tx: a.hold_tx,
            mbufs: a.total_num_mbufs,
            headroom: a.headroom,
            interactive: a.interactive,
            duration: a.duration,
            flows: a.flowgen_flows.max(1),
            tx_first: a.tx_first,
            hugepages: a.hugepages,
            xdp: a.xdp_prog.as_deref().map(str::parse).transpose()?,
            noisy: crate::noisy::NoisyCfg {
                bufsz: a.noisy_bufsz,
                flush_ms: a.noisy_flush_ms,
                lkup_mb: a.noisy_lkup_mb,
                writes: a.noisy_writes,
                reads: a.noisy_reads,
                reads_writes: a.noisy_reads_writes,
            },
            capture: a
                .pcap_out
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(|e| format!("--pcap-out: {e}"))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn cfg(args: &[&str]) -> Result<Config, String> {
        let mut v = vec!["testpmd"];
        v.extend_from_slice(args);
        let a = Args::try_parse_from(v).map_err(|e| e.to_string())?;
        Config::from_args(&a)
    }

    #[test]
    fn parses_dpdk_style_options() {
        let c = cfg(&[
            "--vdev",
            "net_virtio_user0,path=/tmp/a.sock,queues=2,queue_size=512,mac=02:00:00:00:00:05",
            "--forward-mode=macswap",
            "--burst=64",
            "--rxq=2",
            "--txq=2",
            "--eth-peer=0,02:00:00:00:00:09",
            "--txpkts=128",
        ])
        .unwrap();
        assert_eq!(c.vdevs[0].path, PathBuf::from("/tmp/a.sock"));
        assert_eq!((c.vdevs[0].queues, c.vdevs[0].queue_size), (Some(2), 512));
        assert_eq!(c.vdevs[0].mac, Some([2, 0, 0, 0, 0, 5]));
        assert_eq!(c.mode, FwdMode::MacSwap);
        assert_eq!((c.burst, c.queues, c.txpkts), (64, 2, 128));
        assert_eq!(c.eth_peers, vec![(0, [2, 0, 0, 0, 0, 9])]);
        assert!(!c.embedded);
        assert!(!c.vdevs[0].packed_vq, "split rings by default");
        assert!(cfg(&[]).unwrap().embedded);
        let c = cfg(&["--vdev", "virtio_user0,path=/x,packed_vq=1,queue_size=100,in_order=0"]).unwrap();
        assert!(c.vdevs[0].packed_vq && !c.vdevs[0].in_order);
        assert_eq!(c.vdevs[0].queue_size, 100, "packed rings need no power of two");
    }

    #[test]
    fn segments_buffers_and_frame_sizes() {
        let c = cfg(&["--txpkts=60,200,1000,254", "--mbuf-size=4096", "--max-pkt-len=9018"]).unwrap();
        assert_eq!((c.tx_segs.as_slice(), c.txpkts), (&[60, 200, 1000, 254][..], 1514));
        assert_eq!((c.mbuf_size, c.max_pkt_len), (Some(4096), Some(9018)));
        let c = cfg(&["--txpkts=9014", "--forward-mode=csum"]).unwrap();
        assert_eq!((c.tx_segs.as_slice(), c.mode), (&[9014][..], FwdMode::Csum));
        let c = cfg(&["--vdev", "virtio_user0,path=/x,mrg_rxbuf=1"]).unwrap();
        assert!(c.vdevs[0].mrg_rxbuf);
        assert!(!cfg(&["--vdev", "virtio_user0,path=/x"]).unwrap().vdevs[0].mrg_rxbuf);
    }

    #[test]
    fn pci_ports_by_address() {
        let c =
            cfg(&["-a", "00:03.0", "-a", "0000:00:04.0,packed_vq=1", "-a", "00:05.0,packed_vq=0"]).unwrap();
        let bdfs: Vec<&str> = c.pci.iter().map(|p| p.bdf.as_str()).collect();
        assert_eq!(bdfs, ["0000:00:03.0", "0000:00:04.0", "0000:00:05.0"]);
        let packed: Vec<Option<bool>> = c.pci.iter().map(|p| p.packed_vq).collect();
        assert_eq!(packed, [None, Some(true), Some(false)], "default: packed when the device offers it");
        assert!(!c.embedded);
    }

    #[test]
    fn rejects_bad_input_with_a_clear_reason() {
        let err = |a: &[&str]| cfg(a).unwrap_err();
        assert!(err(&["--forward-mode=warp"]).contains("unknown forwarding mode 'warp'"));
        assert!(err(&["--txpkts=59"]).contains("below the 60-byte"));
        assert!(err(&["--txpkts=9100"]).contains("above any MTU"));
        assert!(err(&["--txpkts=5000,5000"]).contains("above any MTU"));
        assert!(err(&["--txpkts=40,x"]).contains("'x' is not a number"));
        assert!(err(&["--txpkts=40,0,40"]).contains("0 bytes"));
        assert!(err(&["--mbuf-size=1000"]).contains("multiple of 64"));
        assert!(err(&["--mbuf-size=320"]).contains("multiple of 64, above the headroom"));
        assert!(err(&["--max-pkt-len=10000"]).contains("out of range"));
        assert!(err(&["--vdev", "virtio_user0,path=/x,mrg_rxbuf=2"]).contains("mrg_rxbuf must be 0 or 1"));
        assert!(err(&["--burst=0"]).contains("--burst"));
        assert!(err(&["--rxq=2", "--txq=1"]).contains("differ"));
        assert!(err(&["--vdev", "virtio_user0"]).contains("path=SOCKET is required"));
        assert!(err(&["--vdev", "virtio_user0,path=/x,packed_vq=2"]).contains("packed_vq must be 0 or 1"));
        assert!(err(&["--vdev", "virtio_user0,path=/x,packed_vq=1,queue_size=0"]).contains("queue_size=0"));
        assert!(err(&["--vdev", "virtio_user0,path=/x,in_order=2"]).contains("in_order must be 0 or 1"));
        assert!(err(&["--vdev", "virtio_user0,path=/x,queue_size=100"]).contains("power of two"));
        assert!(err(&["--vdev", "net_tap0,iface=x"]).contains("only virtio_user"));
        assert!(err(&["--vdev", "virtio_user0,path=/x,bogus=1"]).contains("unknown argument 'bogus'"));
        assert!(err(&["--eth-peer=0,zz"]).contains("invalid MAC"));
        assert!(err(&["-a", "00:03"]).contains("not a PCI address"));
        assert!(err(&["-a", "00:03.0,packed_vq=2"]).contains("packed_vq must be 0 or 1"));
        assert!(err(&["-a", "00:03.0,queues=2"]).contains("unknown argument 'queues'"));
        assert!(err(&["-a", "00:03.0,packed_vq"]).contains("not key=value"));
        assert!(err(&["--bogus-option"]).contains("--bogus-option"));
        assert!(err(&["--headroom=4"]).contains("headroom"));
        assert!(err(&["--xdp-prog=bounce"]).contains("expected pass, drop, tx or redirect:PORT"));
        assert!(err(&["--xdp-prog=redirect:x"]).contains("not a port number"));
    }

    #[test]
    fn xdp_programs_by_name() {
        assert_eq!(cfg(&[]).unwrap().xdp, None);
        for (s, p) in [
            ("pass", XdpProg::Pass),
            ("drop", XdpProg::Drop),
            ("tx", XdpProg::Tx),
            ("redirect:1", XdpProg::Redirect(1)),
        ] {
            assert_eq!(cfg(&["--xdp-prog", s]).unwrap().xdp, Some(p));
            assert_eq!(p.name(), s);
        }
    }
}
