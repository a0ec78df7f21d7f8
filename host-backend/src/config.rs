//! Backend configuration: what the command line (or an embedding program) asks for,
//! parsed and validated into values the rest of the crate can trust.
//!
//! Owns: the syntax of `--port KIND:SOCKET[,SOCKET]`, core lists and MAC addresses, and
//! every range check. Must not: create sockets or threads.

use std::path::PathBuf;

pub use crate::device::PortKind;
use crate::error::{Error, Result};

/// A port and the socket(s) of its device(s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSpec {
    /// What the port does.
    pub kind: PortKind,
    /// One socket, or two for `xconnect`.
    pub sockets: Vec<PathBuf>,
    /// `tap`, `afpacket`: the interface name.
    pub ifname: Option<String>,
}

/// Everything the backend needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// The ports.
    pub ports: Vec<PortSpec>,
    /// Queue pairs per device.
    pub queue_pairs: u16,
    /// Connect to listening front-ends instead of listening.
    pub client: bool,
    /// One worker per entry, pinned to that CPU (`None`: one unpinned worker).
    pub cores: Option<Vec<usize>>,
    /// Spin time without work before a worker sleeps (0: never sleep).
    pub poll_us: u64,
    /// Pause instructions a data worker spins after a loop without work (`--idle-pause`).
    pub idle_pause: u32,
    /// Forwarding bursts prefetch the frames they will read first (`--prefetch-tx`).
    pub prefetch_tx: bool,
    /// Frame size of `gen` ports (without the virtio-net header); with `gso_size`, the
    /// size of one TCP super-frame.
    pub pkt_size: u16,
    /// `gen`: send TCP/IPv4 super-frames cut at this MSS, whole (guest TSO4) or in
    /// segments, as the guest's offloads allow; offers GUEST_CSUM and GUEST_TSO4.
    pub gso_size: Option<u16>,
    /// Frames each `gen` device produces before it stops (`None`: unlimited).
    pub gen_count: Option<u64>,
    /// `reflect`: swap MAC addresses.
    pub swap_mac: bool,
    /// `sink`: copy each frame out of guest memory into a worker buffer, as DPDK's
    /// vhost `rxonly` copies each into an mbuf (`--sink-read`; benchmarks of equal work).
    pub sink_read: bool,
    /// Offer `VIRTIO_F_ACCESS_PLATFORM` and serve the IOTLB protocol (`--iommu`).
    pub iommu: bool,
    /// Do not offer `VIRTIO_F_RING_PACKED` (`--no-packed`): split rings only.
    pub no_packed: bool,
    /// `xconnect`: each device's rings on its own worker, frames handed between them
    /// through pointer rings (`--handoff`).
    pub handoff: bool,
    /// Do not offer host offloads (`CSUM`, `HOST_TSO4/6`, `HOST_USO`) nor the guest
    /// offloads forwarded super-frames need (`GUEST_CSUM`, `GUEST_TSO4/6`) on `reflect`
    /// and `xconnect`, nor the host offloads on `sink` (`--no-offloads`).
    pub no_offloads: bool,
    /// `tap`: one `write` or `read` system call per frame instead of one io_uring
    /// submission per burst (`--tap-syscalls`; used anyway where io_uring is refused).
    pub tap_syscalls: bool,
    /// MTU reported in config space.
    pub mtu: u16,
    /// MAC of the first device (later devices count up in the last byte).
    pub mac: [u8; 6],
    /// Mode and group of the listening sockets (`--socket-mode`, `--socket-group`;
    /// default 0600, the process's group).
    pub socket: crate::socket::Access,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ports: Vec::new(),
            queue_pairs: 1,
            client: false,
            cores: None,
            poll_us: 50,
            idle_pause: 0,
            prefetch_tx: false,
            pkt_size: 64,
            gso_size: None,
            gen_count: None,
            swap_mac: false,
            sink_read: false,
            iommu: false,
            no_packed: false,
            handoff: false,
            no_offloads: false,
            tap_syscalls: false,
            mtu: 1500,
            mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
            socket: crate::socket::Access::default(),
        }
    }
}

/// Most queue pairs per device.
pub const MAX_QUEUE_PAIRS: u16 = 64;

/// Parses `KIND:SOCKET`, `xconnect:SOCKET_A,SOCKET_B` or `tap:SOCKET,IFNAME`.
pub fn parse_port(s: &str) -> Result<PortSpec> {
    let (kind, rest) = s.split_once(':').ok_or_else(|| {
        Error::Config(format!("port '{s}': expected KIND:SOCKET (e.g. sink:/tmp/vnet.sock)"))
    })?;
    let kind = match kind {
        "sink" => PortKind::Sink,
        "gen" => PortKind::Gen,
        "reflect" => PortKind::Reflect,
        "xconnect" => PortKind::Xconnect,
        "tap" => PortKind::Tap,
        "afpacket" => PortKind::AfPacket,
        other => {
            return Err(Error::Config(format!(
                "unknown port kind '{other}' (expected sink, gen, reflect, xconnect, tap or afpacket)"
            )))
        }
    };
    if matches!(kind, PortKind::Tap | PortKind::AfPacket) {
        let usage = || Error::Config(format!("port '{s}': {} takes SOCKET,IFNAME", kind.name()));
        let Some((sock, ifname)) = rest.split_once(',') else {
            return Err(usage());
        };
        if sock.is_empty() {
            return Err(usage());
        }
        if !crate::tap::valid_name(ifname) {
            return Err(Error::Config(format!(
                "port '{s}': '{ifname}' is not a valid interface name (1 to {} bytes, no '/', ':', ',' or spaces)",
                crate::tap::MAX_IFNAME
            )));
        }
        return Ok(PortSpec { kind, sockets: vec![PathBuf::from(sock)], ifname: Some(ifname.to_string()) });
    }
    let sockets: Vec<PathBuf> = rest.split(',').map(PathBuf::from).collect();
    let want = if kind == PortKind::Xconnect { 2 } else { 1 };
    if sockets.len() != want || sockets.iter().any(|p| p.as_os_str().is_empty()) {
        return Err(Error::Config(format!(
            "port '{s}': {} takes {want} socket path{}",
            kind.name(),
            if want == 2 { "s separated by a comma" } else { "" }
        )));
    }
    Ok(PortSpec { kind, sockets, ifname: None })
}

/// Parses a CPU list such as `1`, `0,1` or `0-3`, checked against the CPUs this process
/// may run on.
pub fn parse_cores(s: &str) -> Result<Vec<usize>> {
    let bad = |why: &str| Error::Config(format!("core list '{s}': {why}"));
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a, b),
            None => (part, part),
        };
        let a: usize = a.parse().map_err(|_| bad("expected numbers like 1, 0,1 or 0-3"))?;
        let b: usize = b.parse().map_err(|_| bad("expected numbers like 1, 0,1 or 0-3"))?;
        if a > b {
            return Err(bad("range goes backwards"));
        }
        for c in a..=b {
            if out.contains(&c) {
                return Err(bad(&format!("cpu {c} listed twice")));
            }
            out.push(c);
        }
    }
    let allowed = allowed_cpus();
    if let Some(c) = out.iter().find(|c| !allowed.contains(c)) {
        return Err(bad(&format!("cpu {c} is not available (usable: {allowed:?})")));
    }
    Ok(out)
}

/// CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `set` is a plain C struct filled by the kernel; CPU_ISSET only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return (0..std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).collect();
        }
        (0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect()
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let bad = || Error::Config(format!("MAC address '{s}': expected six hex bytes like 52:54:00:12:34:56"));
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if mac[0] & 1 != 0 {
        return Err(Error::Config(format!("MAC address '{s}' is a multicast address")));
    }
    Ok(mac)
}

impl Config {
    /// Checks the values that depend on each other.
    pub fn validate(&self) -> Result<()> {
        if self.ports.is_empty() {
            return Err(Error::Config("no port given (use --port KIND:SOCKET)".into()));
        }
        if self.queue_pairs == 0 || self.queue_pairs > MAX_QUEUE_PAIRS {
            return Err(Error::Config(format!("--queues must be 1..={MAX_QUEUE_PAIRS}")));
        }
        if !(68..=9000).contains(&self.mtu) {
            return Err(Error::Config(format!("--mtu {} out of range 68..=9000", self.mtu)));
        }
        if self.handoff && !self.ports.iter().any(|p| p.kind == PortKind::Xconnect) {
            return Err(Error::Config("--handoff applies to xconnect ports, and there is none".into()));
        }
        if let Some(mss) = self.gso_size {
            // A segment is Ethernet + IPv4 + TCP (54 bytes) + MSS and must fit the MTU.
            let max_mss = self.mtu as u32 - 40;
            if mss == 0 || mss as u32 > max_mss {
                return Err(Error::Config(format!(
                    "--gso-size {mss} out of range 1..={max_mss} (MTU {} - 40)",
                    self.mtu
                )));
            }
            if !self.ports.iter().any(|p| p.kind == PortKind::Gen) {
                return Err(Error::Config("--gso-size applies to gen ports, and there is none".into()));
            }
            if (self.pkt_size as usize) < crate::gso::HDRS + crate::gso::PAYLOAD_TAG {
                return Err(Error::Config(format!(
                    "--pkt-size {} too small for a TCP super-frame (at least {})",
                    self.pkt_size,
                    crate::gso::HDRS + crate::gso::PAYLOAD_TAG
                )));
            }
        } else {
            let max_pkt = self.mtu as u32 + 14;
            if (self.pkt_size as u32) < 60 || self.pkt_size as u32 > max_pkt {
                return Err(Error::Config(format!(
                    "--pkt-size {} out of range 60..={max_pkt} (MTU {} + 14)",
                    self.pkt_size, self.mtu
                )));
            }
        }
        if matches!(&self.cores, Some(c) if c.is_empty()) {
            return Err(Error::Config("empty core list".into()));
        }
        let mut names: Vec<&str> = Vec::new();
        for n in self.ports.iter().filter_map(|p| p.ifname.as_deref()) {
            if names.contains(&n) {
                return Err(Error::Config(format!("interface {n} used twice")));
            }
            names.push(n);
        }
        let mut seen: Vec<&PathBuf> = Vec::new();
        for p in self.ports.iter().flat_map(|p| &p.sockets) {
            if seen.contains(&p) {
                return Err(Error::Config(format!("socket {} used twice", p.display())));
            }
            seen.push(p);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_and_reject() {
        assert_eq!(
            parse_port("sink:/tmp/a.sock").unwrap(),
            PortSpec { kind: PortKind::Sink, sockets: vec!["/tmp/a.sock".into()], ifname: None }
        );
        let t = parse_port("tap:/tmp/t.sock,vnt0").unwrap();
        assert_eq!((t.kind, t.ifname.as_deref()), (PortKind::Tap, Some("vnt0")));
        assert_eq!(t.sockets, vec![PathBuf::from("/tmp/t.sock")]);
        assert!(parse_port("tap:/tmp/t.sock").is_err());
        assert!(parse_port("tap:,vnt0").is_err());
        assert!(parse_port("tap:/a,vnt0,x").unwrap_err().to_string().contains("interface name"));
        assert!(parse_port("tap:/a,a234567890123456").is_err());
        let a = parse_port("afpacket:/tmp/a.sock,veth0").unwrap();
        assert_eq!((a.kind, a.ifname.as_deref()), (PortKind::AfPacket, Some("veth0")));
        assert!(parse_port("afpacket:/tmp/a.sock").is_err());
        assert_eq!(parse_port("xconnect:/a,/b").unwrap().sockets.len(), 2);
        assert!(parse_port("bogus:/a").unwrap_err().to_string().contains("unknown port kind 'bogus'"));
        assert!(parse_port("sink").is_err());
        assert!(parse_port("sink:/a,/b").is_err());
        assert!(parse_port("xconnect:/a").is_err());
        assert!(parse_port("gen:").is_err());
    }

    #[test]
    fn cores_parse_and_reject() {
        assert_eq!(parse_cores("0").unwrap(), vec![0]);
        assert!(parse_cores("x").is_err());
        assert!(parse_cores("1-0").is_err());
        assert!(parse_cores("0,0").is_err());
        assert!(parse_cores("100000").unwrap_err().to_string().contains("not available"));
    }

    #[test]
    fn macs_parse_and_reject() {
        assert_eq!(parse_mac("52:54:00:12:34:56").unwrap(), [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert!(parse_mac("52:54:00:12:34").is_err());
        assert!(parse_mac("zz:54:00:12:34:56").is_err());
        assert!(parse_mac("01:00:5e:00:00:01").is_err());
    }

    #[test]
    fn validate_checks_ranges() {
        let mut c = Config { ports: vec![parse_port("gen:/tmp/x").unwrap()], ..Config::default() };
        assert!(c.validate().is_ok());
        c.pkt_size = 59;
        assert!(c.validate().is_err());
        c.pkt_size = 1515;
        assert!(c.validate().is_err());
        c.pkt_size = 1514;
        assert!(c.validate().is_ok());
        c.queue_pairs = 0;
        assert!(c.validate().is_err());
        let dup = Config {
            ports: vec![parse_port("sink:/a").unwrap(), parse_port("gen:/a").unwrap()],
            ..Config::default()
        };
        assert!(dup.validate().unwrap_err().to_string().contains("used twice"));
    }

    #[test]
    fn gso_size_needs_a_gen_port_and_a_segment_within_the_mtu() {
        let mut c = Config {
            ports: vec![parse_port("gen:/tmp/x").unwrap()],
            gso_size: Some(1460),
            pkt_size: 65535,
            ..Config::default()
        };
        assert!(c.validate().is_ok(), "super-frames may exceed the MTU");
        c.gso_size = Some(1461);
        assert!(c.validate().unwrap_err().to_string().contains("--gso-size"));
        c.gso_size = Some(0);
        assert!(c.validate().is_err());
        c.gso_size = Some(1000);
        c.pkt_size = 65;
        assert!(c.validate().unwrap_err().to_string().contains("too small"));
        c.pkt_size = 66;
        assert!(c.validate().is_ok());
        c.ports = vec![parse_port("reflect:/tmp/x").unwrap()];
        assert!(c.validate().unwrap_err().to_string().contains("gen port"));
    }
}
