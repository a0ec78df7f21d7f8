//! A virtio-net port: device initialisation over any [`Transport`] and the queue pairs
//! it hands to the application.
//!
//! Owns: the virtio 1.2 §3.1.1 initialisation sequence (reset, feature negotiation with
//! the device's acceptance checked, queue setup, DRIVER_OK), the DMA arena and buffer
//! pool sizing, port information (MAC, MTU, link, features) and orderly close (device
//! reset first, then buffers back to the pool).
//! Must not: run on the data path (the queues do).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::dma::{ArenaPlan, DmaArena};
use crate::error::{Error, Result};
use crate::layout::{self, features as f};
use crate::mempool::{self, Mempool, DEFAULT_BUF_SIZE, DEFAULT_HEADROOM};
use crate::queue::{PairStats, QueuePair, QueueStatsSnapshot, RxQueue, TxQueue};
use crate::ring::DriverRing;
use crate::transport::pci::PciTransport;
use crate::transport::vhost_user::VhostUserTransport;
use crate::transport::{NetConfig, Transport};

/// Which transport a port uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportConfig {
    /// virtio-user: the driver is the vhost-user front-end of the back-end at `path`.
    VirtioUser {
        /// The back-end's unix socket.
        path: PathBuf,
    },
    /// VFIO-PCI: a virtio-net PCI device bound to `vfio-pci` (type-1 IOMMU or no-IOMMU
    /// mode, whichever its VFIO group is; no-IOMMU forces hugepages).
    VfioPci {
        /// PCI address, `DDDD:BB:DD.F` (or `BB:DD.F`).
        bdf: String,
    },
}

/// How to open a port.
#[derive(Debug, Clone)]
pub struct PortConfig {
    /// The transport.
    pub transport: TransportConfig,
    /// Queue pairs to use.
    pub queue_pairs: u16,
    /// Entries per ring (a power of two).
    pub ring_size: u16,
    /// Buffers in the pool (default: enough to fill every ring twice).
    pub buffers: Option<u32>,
    /// Bytes per buffer, headroom included (a multiple of 64).
    pub buf_size: u32,
    /// Headroom before packet data in every buffer (at least 12, the virtio-net header).
    pub headroom: u16,
    /// Bytes at the end of every buffer the device is not given (for tail growth).
    pub tailroom: u16,
    /// Optional features to negotiate when the device offers them (VERSION_1 is always
    /// required; the defaults add MAC, STATUS, MTU, EVENT_IDX and, with several pairs, MQ).
    pub features: u64,
    /// Back the DMA arena with 2 MiB hugepages (always on for VFIO no-IOMMU, where the
    /// device uses physical addresses).
    pub hugepages: bool,
    /// MAC to use when the device does not report one.
    pub mac: Option<[u8; 6]>,
}

impl PortConfig {
    /// Defaults for a virtio-user port on `path`: one queue pair, 256-entry rings,
    /// 256-byte headroom in 2304-byte buffers.
    pub fn virtio_user(path: impl Into<PathBuf>) -> PortConfig {
        Self::with_transport(TransportConfig::VirtioUser { path: path.into() })
    }

    /// Defaults for a VFIO-PCI port on the device at `bdf` (bound to `vfio-pci`): as
    /// [`PortConfig::virtio_user`].
    pub fn vfio_pci(bdf: impl Into<String>) -> PortConfig {
        Self::with_transport(TransportConfig::VfioPci { bdf: bdf.into() })
    }

    fn with_transport(transport: TransportConfig) -> PortConfig {
        PortConfig {
            transport,
            queue_pairs: 1,
            ring_size: 256,
            buffers: None,
            buf_size: DEFAULT_BUF_SIZE,
            headroom: DEFAULT_HEADROOM,
            tailroom: 64,
            features: default_features(),
            hugepages: false,
            mac: None,
        }
    }
}

/// Optional features the driver asks for by default.
pub fn default_features() -> u64 {
    f::bit(f::NET_MAC)
        | f::bit(f::NET_STATUS)
        | f::bit(f::NET_MTU)
        | f::bit(f::RING_EVENT_IDX)
        | f::bit(f::NET_MQ)
}

/// The hugepage size a physically addressed arena uses.
const HUGE_2M: usize = 2 << 20;

/// Features this driver knows how to use (others are never acknowledged).
const SUPPORTED: u64 = f::bit(f::VERSION_1)
    | f::bit(f::NET_MAC)
    | f::bit(f::NET_STATUS)
    | f::bit(f::NET_MTU)
    | f::bit(f::RING_EVENT_IDX)
    | f::bit(f::NET_MQ);

/// What a port is, once open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    /// Transport description (socket path, PCI address).
    pub description: String,
    /// MAC address.
    pub mac: [u8; 6],
    /// MTU.
    pub mtu: u16,
    /// Link status.
    pub link_up: bool,
    /// Negotiated feature bits.
    pub features: u64,
    /// Queue pairs in use.
    pub queue_pairs: u16,
    /// Entries per ring.
    pub ring_size: u16,
}

/// An open virtio-net port.
pub struct Port {
    transport: Box<dyn Transport>,
    info: PortInfo,
    pool: Mempool,
    pairs: Vec<Option<QueuePair>>,
    stats: Vec<Arc<PairStats>>,
    stopped: Arc<AtomicBool>,
    closed: bool,
}

fn random_mac() -> [u8; 6] {
    let mut b = [0u8; 6];
    // SAFETY: getrandom writes at most 6 bytes into our buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr() as *mut libc::c_void, 6, 0) };
    if n != 6 {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        b = (t.as_nanos() as u64 ^ std::process::id() as u64).to_le_bytes()[..6].try_into().unwrap_or([2; 6]);
    }
    b[0] = (b[0] & 0xfe) | 0x02; // unicast, locally administered
    b
}

impl Port {
    /// Opens a port: connects the transport, negotiates features, sets up and fills the
    /// rings, and starts the device.
    pub fn open(cfg: PortConfig) -> Result<Port> {
        if cfg.queue_pairs == 0 {
            return Err(Error::Config("a port needs at least one queue pair".into()));
        }
        if cfg.ring_size == 0 || !cfg.ring_size.is_power_of_two() || cfg.ring_size > layout::MAX_QUEUE_SIZE {
            return Err(Error::Config(format!(
                "ring size {} is not a power of two in 1..=32768",
                cfg.ring_size
            )));
        }
        // Buffer geometry, checked before anything is connected: headroom, the frame and
        // the reserved tailroom must fit one buffer (and lengths fit the packet's u16s).
        let frame_room = (cfg.buf_size as usize)
            .checked_sub(cfg.headroom as usize + cfg.tailroom as usize)
            .filter(|r| *r >= 60)
            .ok_or_else(|| {
                Error::Config(format!(
                    "buffers of {} bytes cannot hold {} bytes of headroom, {} of tailroom and a 60-byte frame",
                    cfg.buf_size, cfg.headroom, cfg.tailroom
                ))
            })?;
        let nrings = 2 * cfg.queue_pairs as u32;
        let buffers = cfg.buffers.unwrap_or(2 * nrings * cfg.ring_size as u32);
        if buffers < cfg.queue_pairs as u32 * cfg.ring_size as u32 {
            return Err(Error::Config(format!(
                "{buffers} buffers cannot fill {} receive rings of {}",
                cfg.queue_pairs, cfg.ring_size
            )));
        }
        mempool::check_geometry(buffers, cfg.buf_size, cfg.headroom)?;
        let mac = cfg.mac.unwrap_or_else(random_mac);
        let mut transport: Box<dyn Transport> = match &cfg.transport {
            TransportConfig::VirtioUser { path } => {
                Box::new(VhostUserTransport::connect(path, nrings as u16, mac)?)
            }
            TransportConfig::VfioPci { bdf } => Box::new(PciTransport::open(bdf, mac)?),
        };

        // The DMA arena: sized for the pool and rings as the device will address them
        // (whole, or physical hugepage by hugepage), and made reachable by the device
        // before anything is carved from it.
        let physical = transport.needs_physical_dma();
        let mut plan = ArenaPlan::new(physical.then_some(HUGE_2M));
        mempool::plan(&mut plan, buffers, cfg.buf_size)?;
        for _ in 0..nrings {
            for (len, align) in DriverRing::allocations(cfg.ring_size) {
                plan.alloc(len, align)?;
            }
        }
        let mut arena = DmaArena::new(plan.size(), cfg.hugepages || physical).map_err(|e| match e {
            Error::NoHugepages(io) if physical => Error::Vfio {
                op: "allocating the DMA arena",
                reason: format!(
                    "no-IOMMU mode needs hugepages (the device uses physical addresses): {io}; \
                     reserve some in /proc/sys/vm/nr_hugepages"
                ),
            },
            e => e,
        })?;
        transport.map_dma(&mut arena)?;
        let arena = Arc::new(arena);
        match Self::init(&cfg, transport.as_mut(), &arena, buffers, frame_room) {
            Ok((info, pool, pairs, stats, stopped)) => {
                Ok(Port { transport, info, pool, pairs, stats, stopped, closed: false })
            }
            Err(e) => {
                // Stop the device before the rings and buffers it may know go away (the
                // arena itself lives until after this reset).
                if let Err(r) = transport.reset() {
                    log::debug!("{}: reset after a failed open: {r}", transport.describe());
                }
                Err(e)
            }
        }
    }

    /// Feature negotiation, pool and queues, DRIVER_OK (§3.1.1 steps 4-8).
    #[allow(clippy::type_complexity)]
    fn init(
        cfg: &PortConfig,
        transport: &mut dyn Transport,
        arena: &Arc<DmaArena>,
        buffers: u32,
        frame_room: usize,
    ) -> Result<(PortInfo, Mempool, Vec<Option<QueuePair>>, Vec<Arc<PairStats>>, Arc<AtomicBool>)> {
        let nrings = 2 * cfg.queue_pairs as u32;
        let pool = Mempool::new(arena.clone(), buffers, cfg.buf_size, cfg.headroom)?;

        // Feature negotiation (§3.1.1 steps 4-6).
        let offered = transport.device_features()?;
        if offered & f::bit(f::VERSION_1) == 0 {
            return Err(Error::MissingFeature { name: "VIRTIO_F_VERSION_1", bit: f::VERSION_1 });
        }
        if cfg.queue_pairs > 1 && offered & f::bit(f::NET_MQ) == 0 {
            return Err(Error::MissingFeature { name: "VIRTIO_NET_F_MQ", bit: f::NET_MQ });
        }
        let mut want = f::bit(f::VERSION_1) | (cfg.features & SUPPORTED);
        if cfg.queue_pairs == 1 {
            want &= !f::bit(f::NET_MQ);
        }
        let features = (want | transport.platform_features()) & offered;
        transport.negotiate(features)?;
        let config: NetConfig = transport.config(features)?;
        if features & f::bit(f::NET_MQ) != 0 && cfg.queue_pairs > config.max_queue_pairs {
            return Err(Error::Config(format!(
                "{} queue pairs asked for, the device has {}",
                cfg.queue_pairs, config.max_queue_pairs
            )));
        }
        if frame_room < config.mtu as usize + 14 {
            return Err(Error::Config(format!(
                "buffers of {} bytes with {} headroom and {} tailroom hold {frame_room}-byte frames, below MTU {} + 14",
                cfg.buf_size, cfg.headroom, cfg.tailroom, config.mtu
            )));
        }

        // Queues (§3.1.1 step 7), receive rings filled before the device starts.
        let event_idx = features & f::bit(f::RING_EVENT_IDX) != 0;
        let stopped = Arc::new(AtomicBool::new(false));
        let mut pairs = Vec::new();
        let mut stats = Vec::new();
        for p in 0..cfg.queue_pairs {
            let st = Arc::new(PairStats::default());
            let mut rx_ring = DriverRing::new(arena, cfg.ring_size, event_idx)?;
            let mut tx_ring = DriverRing::new(arena, cfg.ring_size, event_idx)?;
            rx_ring.set_notifier(transport.setup_queue(2 * p, cfg.ring_size, rx_ring.addrs())?);
            tx_ring.set_notifier(transport.setup_queue(2 * p + 1, cfg.ring_size, tx_ring.addrs())?);
            let mut rx = RxQueue::new(rx_ring, pool.clone(), st.clone(), cfg.tailroom, stopped.clone());
            rx.refill();
            let tx = TxQueue::new(tx_ring, pool.clone(), st.clone(), stopped.clone());
            pairs.push(Some(QueuePair { index: p, rx, tx }));
            stats.push(st);
        }
        transport.start(nrings as u16)?;
        let info = PortInfo {
            description: transport.describe(),
            mac: config.mac,
            mtu: config.mtu,
            link_up: config.status & layout::net_config::S_LINK_UP != 0,
            features,
            queue_pairs: cfg.queue_pairs,
            ring_size: cfg.ring_size,
        };
        Ok((info, pool, pairs, stats, stopped))
    }

    /// What the port is.
    pub fn info(&self) -> &PortInfo {
        &self.info
    }

    /// The port's buffer pool (allocate transmit packets from it).
    pub fn pool(&self) -> &Mempool {
        &self.pool
    }

    /// Takes queue pair `i` (each pair can be taken once; its halves may go to
    /// different threads).
    pub fn queue_pair(&mut self, i: u16) -> Option<QueuePair> {
        self.pairs.get_mut(i as usize)?.take()
    }

    /// Takes every queue pair not taken yet.
    pub fn take_queue_pairs(&mut self) -> Vec<QueuePair> {
        self.pairs.iter_mut().filter_map(Option::take).collect()
    }

    /// Counters of every queue pair.
    pub fn stats(&self) -> Vec<QueueStatsSnapshot> {
        self.stats.iter().map(|s| s.snapshot()).collect()
    }

    /// Closes the port: resets the device first (it stops touching rings and buffers),
    /// then returns every buffer of `pairs` (the queue pairs taken from this port) to the
    /// pool. Pairs dropped without being handed back keep their in-flight buffers out of
    /// the pool for safety.
    pub fn close(mut self, pairs: Vec<QueuePair>) -> Result<()> {
        let res = self.shutdown();
        drop(pairs);
        self.pairs.clear();
        res
    }

    fn shutdown(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        let res = self.transport.reset();
        // Release: the queues' drop (acquire) sees the device reset before reusing buffers.
        self.stopped.store(true, Ordering::Release);
        res
    }
}

impl Drop for Port {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            log::warn!("{}: reset at close: {e}", self.info.description);
        }
    }
}
