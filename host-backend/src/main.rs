//! `host-backend`: the batching vhost-user virtio-net backend as a command.
//!
//! Parses the command line, starts [`host_backend::Backend`], prints statistics every
//! `--stats-period` seconds and at SIGINT/SIGTERM, and turns every error into one line
//! on stderr and a non-zero exit.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use host_backend::config::{self, Config};
use host_backend::stats::DeviceSnapshot;
use host_backend::Backend;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum StatsFormat {
    Text,
    Json,
}

/// Batching vhost-user virtio-net backend with pinned busy-poll workers.
///
/// Each --port is one port; each socket is one virtio-net device. Port kinds:
/// sink:SOCK (count and drop what the guest sends), gen:SOCK (send generated UDP
/// frames), reflect:SOCK (send each frame back), xconnect:SOCK_A,SOCK_B (A's TX to B's
/// RX and back), tap:SOCK,IFNAME (the device joined to a kernel tap interface, created
/// if it does not exist and removed at exit if we created it), afpacket:SOCK,IFNAME (the
/// device joined to an existing interface through an AF_PACKET socket with mmap rings).
#[derive(Parser, Debug)]
#[command(name = "host-backend", version)]
struct Args {
    /// A port: sink:SOCK, gen:SOCK, reflect:SOCK, xconnect:SOCK_A,SOCK_B or
    /// tap:SOCK,IFNAME or afpacket:SOCK,IFNAME (repeatable).
    #[arg(long = "port", value_name = "KIND:SOCKET", required = true)]
    ports: Vec<String>,
    /// Queue pairs per device.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Connect to listening front-ends instead of listening on the sockets.
    #[arg(long)]
    client: bool,
    /// CPUs for the busy-poll workers, one worker per CPU (e.g. 1, 0,1 or 0-1).
    /// Default: one unpinned worker.
    #[arg(long, value_name = "LIST")]
    cores: Option<String>,
    /// Microseconds a worker spins without work before it sleeps on the kick eventfds
    /// (0 = never sleep).
    #[arg(long, default_value_t = 50)]
    poll_us: u64,
    /// After a loop that found no work, spin this many CPU pause instructions before
    /// polling again (0: poll at once). A probe for how much the polling of rings the
    /// front-end is writing costs it (issue 24's loop levels); not a tuning knob yet.
    #[arg(long, default_value_t = 0, value_name = "N")]
    idle_pause: u32,
    /// reflect/xconnect: before a burst's copies, prefetch the first two lines of every
    /// frame it will read (they were written last on the front-end's core). A probe for
    /// the loop's levels (issue 24); off by default.
    #[arg(long)]
    prefetch_tx: bool,
    /// Frame size of gen ports in bytes (60 to MTU+14; with --gso-size, the TCP
    /// super-frame size, up to 65535).
    #[arg(long, default_value_t = 64)]
    pkt_size: u16,
    /// gen: send TCP/IPv4 super-frames of --pkt-size bytes cut at this MSS: whole while
    /// the guest has TSO4 on, as segments otherwise (offers GUEST_CSUM and GUEST_TSO4).
    #[arg(long, value_name = "MSS")]
    gso_size: Option<u16>,
    /// gen: frames per device before it stops (default: unlimited).
    #[arg(long)]
    count: Option<u64>,
    /// reflect: swap source and destination MAC addresses.
    #[arg(long)]
    swap_mac: bool,
    /// sink: copy every frame out of guest memory (into a worker buffer), as DPDK's vhost
    /// rxonly copies each into an mbuf; without it the sink completes frames unread.
    #[arg(long)]
    sink_read: bool,
    /// tap ports: one write or read system call per frame instead of one io_uring
    /// submission per burst (the default, where the kernel allows io_uring).
    #[arg(long)]
    tap_syscalls: bool,
    /// Offer VIRTIO_F_ACCESS_PLATFORM and serve the vhost-user IOTLB protocol, for
    /// front-ends behind a vIOMMU (QEMU: intel-iommu and iommu_platform=on).
    #[arg(long)]
    iommu: bool,
    /// Do not offer VIRTIO_F_RING_PACKED (offered by default): split rings only.
    #[arg(long)]
    no_packed: bool,
    /// xconnect: serve each device on its own worker (round-robin over --cores) and hand
    /// frames between the workers through batched pointer rings.
    #[arg(long)]
    handoff: bool,
    /// reflect, xconnect (also with --handoff), tap, sink: do not offer checksum and
    /// segmentation offloads (CSUM, HOST_TSO4/6, HOST_USO, GUEST_CSUM, GUEST_TSO4/6;
    /// offered by default; a sink takes super-frames whole and drops them).
    #[arg(long)]
    no_offloads: bool,
    /// MTU reported to front-ends.
    #[arg(long, default_value_t = 1500)]
    mtu: u16,
    /// MAC reported to the first device's front-end (later devices count up).
    #[arg(long)]
    mac: Option<String>,
    /// Permission bits of the listening sockets, in octal (default 0600: the owner
    /// only). Set on the socket before it appears at its path; the umask is not used.
    #[arg(long, value_name = "MODE")]
    socket_mode: Option<String>,
    /// Group of the listening sockets (a name or a gid; default: the process's).
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Print statistics every N seconds (0 = only at exit).
    #[arg(long, default_value_t = 0.0)]
    stats_period: f64,
    /// Statistics format.
    #[arg(long, value_enum, default_value_t = StatsFormat::Text)]
    stats_format: StatsFormat,
}

fn config_from(args: &Args) -> host_backend::Result<Config> {
    let mut cfg = Config {
        ports: args.ports.iter().map(|p| config::parse_port(p)).collect::<Result<_, _>>()?,
        queue_pairs: args.queues,
        client: args.client,
        cores: args.cores.as_deref().map(config::parse_cores).transpose()?,
        poll_us: args.poll_us,
        idle_pause: args.idle_pause,
        prefetch_tx: args.prefetch_tx,
        pkt_size: args.pkt_size,
        gso_size: args.gso_size,
        gen_count: args.count,
        swap_mac: args.swap_mac,
        sink_read: args.sink_read,
        tap_syscalls: args.tap_syscalls,
        iommu: args.iommu,
        no_packed: args.no_packed,
        handoff: args.handoff,
        no_offloads: args.no_offloads,
        mtu: args.mtu,
        ..Config::default()
    };
    if let Some(m) = &args.mac {
        cfg.mac = config::parse_mac(m)?;
    }
    if let Some(m) = &args.socket_mode {
        cfg.socket.mode = host_backend::socket::parse_mode(m)?;
    }
    if let Some(g) = &args.socket_group {
        cfg.socket.group = Some(host_backend::socket::parse_group(g)?);
    }
    if !(args.stats_period >= 0.0 && args.stats_period.is_finite()) {
        return Err(host_backend::Error::Config("--stats-period must be a number of seconds >= 0".into()));
    }
    cfg.validate()?;
    Ok(cfg)
}

fn print_stats(
    backend: &Backend,
    fmt: StatsFormat,
    snaps: &[DeviceSnapshot],
    prev: Option<&[DeviceSnapshot]>,
    secs: f64,
) {
    match fmt {
        StatsFormat::Json => println!("{}", backend.stats_json(snaps, false)),
        StatsFormat::Text => {
            let mut out =
                format!("######## host-backend statistics after {:.1} s ########\n", backend.elapsed_s());
            for (i, s) in snaps.iter().enumerate() {
                out.push_str(&s.to_text(prev.and_then(|p| p.get(i)), secs));
            }
            print!("{out}");
        }
    }
}

fn run(args: Args) -> host_backend::Result<()> {
    let cfg = config_from(&args)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| host_backend::Error::io("installing signal handler", e))?;
    }
    let sockets: Vec<PathBuf> = cfg.ports.iter().flat_map(|p| p.sockets.clone()).collect();
    let backend = Backend::start(cfg)?;
    eprintln!(
        "host-backend: serving {} device(s): {}",
        sockets.len(),
        sockets.iter().map(|s| s.display().to_string()).collect::<Vec<_>>().join(" ")
    );
    let period = Duration::from_secs_f64(args.stats_period);
    let mut last_print = Instant::now();
    let mut prev: Option<Vec<DeviceSnapshot>> = None;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
        if !period.is_zero() && last_print.elapsed() >= period {
            let secs = last_print.elapsed().as_secs_f64();
            last_print = Instant::now();
            let snaps = backend.snapshot();
            print_stats(&backend, args.stats_format, &snaps, prev.as_deref(), secs);
            prev = Some(snaps);
        }
    }
    let secs = last_print.elapsed().as_secs_f64();
    let elapsed = backend.elapsed_s();
    // Final statistics once workers have stopped: nothing moves any more.
    let finals = backend.shutdown();
    match args.stats_format {
        StatsFormat::Json => {
            let devs: Vec<serde_json::Value> = finals.iter().map(|s| s.to_json()).collect();
            println!("{}", serde_json::json!({ "final": true, "elapsed_s": elapsed, "devices": devs }));
        }
        StatsFormat::Text => {
            let mut out = format!("######## host-backend final statistics after {elapsed:.1} s ########\n");
            for (i, s) in finals.iter().enumerate() {
                out.push_str(&s.to_text(prev.as_deref().and_then(|p| p.get(i)), secs));
            }
            print!("{out}");
        }
    }
    Ok(())
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("host-backend: {e}");
        std::process::exit(1);
    }
}
