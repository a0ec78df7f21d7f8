//! DPDK-style device arguments: `--vdev net_virtio_user0,path=SOCK,...` and
//! `-a BDF[,packed_vq=0|1]`, parsed into specs that turn into a [`PortConfig`].
//!
//! Owns: the syntax of those two option values (as DPDK's EAL and testpmd take them) and
//! how each key maps onto a [`PortConfig`]. Applications (testpmd, the `l2fwd` example)
//! share it so that a port is named the same way everywhere. Must not: open ports, or
//! decide application-wide settings (buffer sizes, MTU, queue counts beyond `queues=`).

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::layout::features as f;
use crate::port::PortConfig;

/// A virtio-user port from `--vdev virtio_user<N>,path=SOCK[,server=0|1][,queues=N][,queue_size=N][,mac=..][,packed_vq=0|1][,in_order=0|1][,mrg_rxbuf=0|1]`
/// (the `net_` prefix is optional).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdevSpec {
    /// The back-end socket.
    pub path: PathBuf,
    /// Queue pairs (DPDK's `queues=`).
    pub queues: Option<u16>,
    /// Ring size.
    pub queue_size: u16,
    /// MAC to use if the device reports none.
    pub mac: Option<[u8; 6]>,
    /// Negotiate `VIRTIO_F_IN_ORDER` when the device offers it (DPDK's `in_order=`,
    /// default 1).
    pub in_order: bool,
    /// Use packed rings (DPDK's `packed_vq=`, default 0: split rings); the device must
    /// offer `VIRTIO_F_RING_PACKED`.
    pub packed_vq: bool,
    /// Negotiate `VIRTIO_NET_F_MRG_RXBUF` when offered (DPDK's `mrg_rxbuf=`; default 0
    /// here, so receive stays on flat frames unless asked).
    pub mrg_rxbuf: bool,
    /// Server role (DPDK's `server=1`): listen on `path` for the back-end.
    pub server: bool,
}

impl VdevSpec {
    /// A spec with DPDK's defaults for the back-end socket `path`.
    pub fn new(path: impl Into<PathBuf>) -> VdevSpec {
        VdevSpec {
            path: path.into(),
            queues: None,
            queue_size: 256,
            mac: None,
            in_order: true,
            packed_vq: false,
            mrg_rxbuf: false,
            server: false,
        }
    }

    /// The port configuration these arguments ask for (other fields at their defaults;
    /// `queue_pairs` from `queues=`, else 1).
    pub fn port_config(&self) -> PortConfig {
        let mut pc = if self.server {
            PortConfig::virtio_user_server(&self.path)
        } else {
            PortConfig::virtio_user(&self.path)
        };
        pc.ring_size = self.queue_size;
        pc.mac = self.mac;
        pc.packed = self.packed_vq;
        pc.queue_pairs = self.queues.unwrap_or(1);
        if !self.in_order {
            pc.features &= !f::bit(f::IN_ORDER);
        }
        if self.mrg_rxbuf {
            pc.features |= f::bit(f::NET_MRG_RXBUF);
        }
        pc
    }
}

/// A VFIO-PCI port from `-a BDF[,packed_vq=0|1]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciSpec {
    /// The normalised PCI address, `DDDD:BB:DD.F`.
    pub bdf: String,
    /// The ring layout: `None` (the default) takes packed rings when the device offers
    /// `VIRTIO_F_RING_PACKED` and split rings otherwise, as DPDK's virtio PMD does on a
    /// PCI device; `packed_vq=1` requires packed rings, `packed_vq=0` keeps split ones.
    pub packed_vq: Option<bool>,
}

impl PciSpec {
    /// The port configuration these arguments ask for (other fields at their defaults).
    pub fn port_config(&self) -> PortConfig {
        let mut pc = PortConfig::vfio_pci(&self.bdf);
        pc.packed = self.packed_vq == Some(true);
        pc.packed_if_offered = self.packed_vq.is_none();
        pc
    }
}

/// Parses one `-a` value. Errors are [`Error::Config`] naming the value.
pub fn parse_pci(s: &str) -> Result<PciSpec> {
    let bad = |m: String| Error::Config(format!("-a {s}: {m}"));
    let mut parts = s.split(',');
    let bdf = parts.next().unwrap_or_default();
    let bdf = crate::vfio::parse_bdf(bdf).map_err(|e| match e {
        Error::Config(m) => bad(m),
        e => bad(e.to_string()),
    })?;
    let mut spec = PciSpec { bdf, packed_vq: None };
    for kv in parts {
        let (k, v) = kv.split_once('=').ok_or_else(|| bad(format!("'{kv}' is not key=value")))?;
        match (k, v) {
            ("packed_vq", "0") => spec.packed_vq = Some(false),
            ("packed_vq", "1") => spec.packed_vq = Some(true),
            ("packed_vq", _) => return Err(bad("packed_vq must be 0 or 1".into())),
            (other, _) => {
                return Err(bad(format!("unknown argument '{other}' (PCI ports take packed_vq=0|1)")))
            }
        }
    }
    Ok(spec)
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let bad = || Error::Config(format!("invalid MAC address '{s}' (expected aa:bb:cc:dd:ee:ff)"));
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

/// Parses one `--vdev` value. Errors are [`Error::Config`] naming the value.
pub fn parse_vdev(s: &str) -> Result<VdevSpec> {
    let bad = |m: String| Error::Config(format!("--vdev {s}: {m}"));
    let flag = |k: &str, v: &str| match v {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(bad(format!("{k} must be 0 or 1"))),
    };
    let mut parts = s.split(',');
    let name = parts.next().unwrap_or_default();
    let name = name.strip_prefix("net_").unwrap_or(name);
    if !name.starts_with("virtio_user") {
        return Err(bad("only virtio_user devices are supported (e.g. virtio_user0,path=/tmp/sock)".into()));
    }
    let mut spec = VdevSpec::new(PathBuf::new());
    for kv in parts {
        let (k, v) = kv.split_once('=').ok_or_else(|| bad(format!("'{kv}' is not key=value")))?;
        let num = |what: &str| v.parse::<u16>().map_err(|_| bad(format!("{what}={v} is not a number")));
        match k {
            "path" => spec.path = PathBuf::from(v),
            "queues" => spec.queues = Some(num("queues")?),
            "queue_size" => spec.queue_size = num("queue_size")?,
            "mac" => spec.mac = Some(parse_mac(v)?),
            "in_order" => spec.in_order = flag(k, v)?,
            "packed_vq" => spec.packed_vq = flag(k, v)?,
            "mrg_rxbuf" => spec.mrg_rxbuf = flag(k, v)?,
            "server" => spec.server = flag(k, v)?,
            other => return Err(bad(format!("unknown argument '{other}'"))),
        }
    }
    if spec.path.as_os_str().is_empty() {
        return Err(bad("path=SOCKET is required".into()));
    }
    if spec.queues == Some(0) {
        return Err(bad("queues=0: a port needs at least one queue pair".into()));
    }
    if spec.queue_size == 0
        || spec.queue_size > 32768
        || (!spec.packed_vq && !spec.queue_size.is_power_of_two())
    {
        return Err(bad(format!(
            "queue_size={} is not a power of two in 1..=32768 (with packed_vq=1: any size up to 32768)",
            spec.queue_size
        )));
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vdev_keys_and_their_port_config() {
        let v = parse_vdev("net_virtio_user0,path=/tmp/a.sock,queues=2,queue_size=512,mac=02:00:00:00:00:05")
            .unwrap();
        assert_eq!(v.path, PathBuf::from("/tmp/a.sock"));
        assert_eq!((v.queues, v.queue_size, v.mac), (Some(2), 512, Some([2, 0, 0, 0, 0, 5])));
        let pc = v.port_config();
        assert_eq!((pc.queue_pairs, pc.ring_size, pc.packed), (2, 512, false));
        assert!(
            !v.server && matches!(pc.transport, crate::TransportConfig::VirtioUser { server: false, .. })
        );
        let v = parse_vdev("virtio_user1,path=/x,packed_vq=1,queue_size=100,in_order=0,mrg_rxbuf=1,server=1")
            .unwrap();
        assert!(v.packed_vq && !v.in_order && v.mrg_rxbuf && v.server);
        assert!(matches!(v.port_config().transport, crate::TransportConfig::VirtioUser { server: true, .. }));
        let pc = v.port_config();
        assert_eq!(pc.features & f::bit(f::IN_ORDER), 0);
        assert_ne!(pc.features & f::bit(f::NET_MRG_RXBUF), 0);
    }

    #[test]
    fn bad_vdevs_name_the_problem() {
        for (arg, want) in [
            ("net_tap0,iface=x", "only virtio_user"),
            ("virtio_user0", "path=SOCKET is required"),
            ("virtio_user0,path=/x,queues=0", "queues=0"),
            ("virtio_user0,path=/x,queue_size=100", "queue_size=100"),
            ("virtio_user0,path=/x,speed=10", "unknown argument 'speed'"),
            ("virtio_user0,path=/x,in_order=2", "in_order must be 0 or 1"),
            ("virtio_user0,path=/x,mac=1:2", "invalid MAC"),
        ] {
            let e = parse_vdev(arg).unwrap_err().to_string();
            assert!(e.contains(want), "{arg}: {e}");
        }
    }

    #[test]
    fn pci_addresses_and_ring_layout() {
        let p = parse_pci("00:03.0").unwrap();
        assert_eq!((p.bdf.as_str(), p.packed_vq), ("0000:00:03.0", None));
        assert!(p.port_config().packed_if_offered);
        let p = parse_pci("0000:00:04.0,packed_vq=1").unwrap();
        assert!(p.port_config().packed && !p.port_config().packed_if_offered);
        assert!(parse_pci("00:04.0,queues=2").unwrap_err().to_string().contains("unknown argument"));
        assert!(parse_pci("zz").is_err());
    }
}
