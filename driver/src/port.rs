//! A virtio-net port: device initialisation over any [`Transport`] and the queue pairs
//! it hands to the application.
//!
//! Owns: the virtio 1.2 §3.1.1 initialisation sequence (reset, feature negotiation with
//! the device's acceptance checked and the spec's feature dependencies applied, queue
//! setup including the control queue, DRIVER_OK, activating the queue pairs), the DMA
//! arena and buffer pool sizing, port information (MAC, MTU, link, features) and orderly
//! close (device reset first, then buffers back to the pool).
//! Must not: run on the data path (the queues do) or encode control commands (ctrl.rs).
//!
//! Queue pairs: `queue_pairs` are active at open; with `max_queue_pairs` more are set up
//! (up to the device's maximum) so that [`Control::set_queue_pairs`] can change the
//! count at run time. Over virtio-user every ring is enabled with `SET_VRING_ENABLE`
//! and the control queue's `VQ_PAIRS_SET` chooses the pairs in use (the rings of
//! inactive pairs are enabled only after it succeeded); a back-end that does not serve
//! the control queue (DPDK's `net_vhost`) gets only the active pairs' rings enabled, as
//! DPDK's virtio-user does. Over virtio-PCI every set-up queue is enabled and
//! `VQ_PAIRS_SET` chooses.
//!
//! Transmit offloads (`VIRTIO_NET_F_CSUM`, `HOST_TSO4`, `HOST_TSO6`, `HOST_USO`) are
//! negotiated when the application lists them in [`PortConfig::features`] and the device
//! offers them (as DPDK's tx offload flags); a packet then asks for them with
//! [`Packet::set_tx_offload`](crate::Packet::set_tx_offload).
//!
//! Mergeable receive buffers (`VIRTIO_NET_F_MRG_RXBUF`) are negotiated when listed in
//! `features`: a frame larger than one buffer then arrives as a chained packet, and
//! neither the MTU nor the receive segmentation offloads need buffers of a whole frame.
//! An application that wants flat frames leaves it out (the default) or linearises
//! ([`Packet::linearize`](crate::Packet::linearize)). The device's MTU
//! (`VIRTIO_NET_F_MTU`) is read and accepted from 68 up to [`MAX_MTU`].
//!
//! Receive offloads: GUEST_CSUM and the segmentation offloads (GUEST_TSO4/TSO6/ECN/UFO)
//! are supported but not asked for by default. A partially checksummed frame forwarded
//! by an application that ignores [`RxMeta`](crate::queue::RxMeta) would leave with a
//! wrong checksum (the transmit path sends no offload request), and a segmentation
//! super-frame can be up to 64 KiB while this driver posts one buffer per frame (no
//! `MRG_RXBUF`): asking for TSO/UFO requires buffers with at least
//! [`GSO_FRAME_ROOM`] bytes of frame room, the most a pool buffer holds with the default
//! headroom and tailroom, unless MRG_RXBUF is negotiated too.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::ctrl::{Control, ControlParams, ControlQueue, CTRL_RING_SIZE};
use crate::dma::{ArenaPlan, DmaArena};
use crate::error::{Error, Result};
use crate::layout::{self, ctrl, features as f};
use crate::link::{LinkShared, LinkStatus, LinkWatch};
use crate::mempool::{self, Mempool, DEFAULT_BUF_SIZE, DEFAULT_HEADROOM, MAX_BUF_SIZE};
use crate::queue::{PairStats, QueuePair, QueueStatsSnapshot, RxQueue, TxQueue};
use crate::ring::{AnyRing, DriverRing, PackedRing, RingFeatures};
use crate::supervisor::{Supervisor, Watched};
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
        /// Server role (DPDK's `server=1`): the driver listens on `path` and the back-end
        /// connects (ours with `--client`, DPDK's `net_vhost` with `client=1`), at open
        /// and again after it restarts. Otherwise the driver connects, and reconnects
        /// with backoff after the back-end went away.
        server: bool,
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
    /// Queue pairs active at open.
    pub queue_pairs: u16,
    /// Queue pairs to set up if more than `queue_pairs` (clamped to the device's
    /// maximum; needs `VIRTIO_NET_F_MQ` and the control queue), so that
    /// [`Control::set_queue_pairs`] can grow the count at run time. `None`: exactly
    /// `queue_pairs`.
    pub max_queue_pairs: Option<u16>,
    /// Entries per ring (a power of two; any size up to 32768 with `packed`; a power of
    /// two with `packed_if_offered`, since the rings may end up split).
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
    /// How long a control command waits for the device's acknowledgement.
    pub ctrl_timeout: Duration,
    /// virtio-user: how long one vhost-user request may wait for the back-end's answer
    /// before it fails with [`Error::VhostUserTimeout`] (and the connection is closed),
    /// so that a back-end that stops answering cannot hang `open`, `close` or a control
    /// call.
    pub vhost_user_timeout: Duration,
    /// virtio-user: the user id the back-end's process must run as, checked on the
    /// connected socket (`SO_PEERCRED`) before anything is sent; `None`: any.
    pub vhost_user_peer_uid: Option<u32>,
    /// Use the packed virtqueue layout (virtio 1.2 §2.8, `VIRTIO_F_RING_PACKED`) for
    /// every ring, the control queue's included; opening fails if the device does not
    /// offer it. `false` (the default): split rings. Packed ring sizes need not be
    /// powers of two.
    pub packed: bool,
    /// Use the packed layout when the device offers `VIRTIO_F_RING_PACKED`, split rings
    /// when it does not (what DPDK's virtio PMD does on a PCI device; testpmd's default
    /// for `-a` ports). Decided from the offered features before the DMA arena is
    /// planned; [`PortInfo::packed`] says which it was. `packed` wins when both are set.
    pub packed_if_offered: bool,
    /// Use this buffer pool (another port's, see [`Port::pool`]) instead of creating
    /// one: packets then move between the two ports without a copy (an XDP redirect, a
    /// forwarding engine). The other port's DMA arena is shared with this device as a
    /// second memory region, so virtio-user only. `buffers`, `buf_size` and `headroom`
    /// are the pool's; it must have buffers for both ports' receive rings.
    pub pool: Option<Mempool>,
    /// The MTU to run at, as DPDK's `rte_eth_dev_set_mtu` (testpmd's `--max-pkt-len`
    /// less 18): at most the MTU the device reports (`VIRTIO_NET_F_MTU` and a config
    /// space that shows it), else at most 9000 (a device that reports none says nothing
    /// about what it carries). `None`: the device's MTU, or 1500.
    pub mtu: Option<u16>,
}

impl PortConfig {
    /// Defaults for a virtio-user port on `path`: one queue pair, 256-entry rings,
    /// 256-byte headroom in 2304-byte buffers.
    pub fn virtio_user(path: impl Into<PathBuf>) -> PortConfig {
        Self::with_transport(TransportConfig::VirtioUser { path: path.into(), server: false })
    }

    /// As [`PortConfig::virtio_user`] in the server role (DPDK's `server=1`): the driver
    /// listens on `path`, and `open` waits up to `vhost_user_timeout` for the back-end to
    /// connect.
    pub fn virtio_user_server(path: impl Into<PathBuf>) -> PortConfig {
        Self::with_transport(TransportConfig::VirtioUser { path: path.into(), server: true })
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
            max_queue_pairs: None,
            ring_size: 256,
            buffers: None,
            buf_size: DEFAULT_BUF_SIZE,
            headroom: DEFAULT_HEADROOM,
            tailroom: 64,
            features: default_features(),
            hugepages: false,
            mac: None,
            ctrl_timeout: Duration::from_secs(1),
            vhost_user_timeout: Duration::from_secs(10),
            vhost_user_peer_uid: None,
            packed: false,
            packed_if_offered: false,
            pool: None,
            mtu: None,
        }
    }
}

/// Optional features the driver asks for by default: config space (MAC, STATUS, MTU),
/// EVENT_IDX, IN_ORDER, multi-queue, and the control queue with every command class
/// this driver sends. Receive offloads are opt-in (see the module documentation).
pub const fn default_features() -> u64 {
    f::bit(f::NET_MAC)
        | f::bit(f::NET_STATUS)
        | f::bit(f::NET_MTU)
        | f::bit(f::RING_EVENT_IDX)
        | f::bit(f::IN_ORDER)
        | f::bit(f::NET_MQ)
        | f::bit(f::NET_CTRL_VQ)
        | f::bit(f::NET_CTRL_RX)
        | f::bit(f::NET_CTRL_VLAN)
        | f::bit(f::NET_CTRL_MAC_ADDR)
        | f::bit(f::NET_CTRL_GUEST_OFFLOADS)
}

/// The largest MTU this driver accepts from a device (`VIRTIO_NET_F_MTU`): jumbo frames.
pub const MAX_MTU: u16 = 9000;
/// The smallest MTU a device may report (virtio 1.2 §5.1.4.1).
const MIN_MTU: u16 = 68;

/// The transmit offloads a port may negotiate (asked for in [`PortConfig::features`]).
pub const TX_OFFLOADS: u64 =
    f::bit(f::NET_CSUM) | f::bit(f::NET_HOST_TSO4) | f::bit(f::NET_HOST_TSO6) | f::bit(f::NET_HOST_USO);

/// The receive offloads that make the device send segmentation super-frames.
const GSO_OFFLOADS: u64 = f::bit(f::NET_GUEST_TSO4) | f::bit(f::NET_GUEST_TSO6) | f::bit(f::NET_GUEST_UFO);

/// Frame room (buffer bytes after the headroom, before the tailroom) a port needs to
/// negotiate GUEST_TSO4/TSO6/UFO: the most a pool buffer holds with the default headroom
/// and tailroom (buffers of [`MAX_BUF_SIZE`]). A device must not send a larger
/// super-frame into such a buffer (ours drops it and counts `rx_buffer_too_small`).
pub const GSO_FRAME_ROOM: usize = MAX_BUF_SIZE as usize - DEFAULT_HEADROOM as usize - 64;

/// Applies the spec's feature dependencies (§5.1.3.1) to a negotiated set: the control
/// command classes need the control queue, the segmentation offloads need GUEST_CSUM,
/// ECN needs TSO.
pub fn apply_dependencies(mut features: u64) -> u64 {
    if features & f::bit(f::NET_CTRL_VQ) == 0 {
        features &= !(f::bit(f::NET_CTRL_RX)
            | f::bit(f::NET_CTRL_VLAN)
            | f::bit(f::NET_CTRL_RX_EXTRA)
            | f::bit(f::NET_GUEST_ANNOUNCE)
            | f::bit(f::NET_CTRL_MAC_ADDR)
            | f::bit(f::NET_CTRL_GUEST_OFFLOADS));
    }
    if features & f::bit(f::NET_CTRL_RX) == 0 {
        features &= !f::bit(f::NET_CTRL_RX_EXTRA);
    }
    if features & f::bit(f::NET_GUEST_CSUM) == 0 {
        features &= !(GSO_OFFLOADS | f::bit(f::NET_GUEST_USO4) | f::bit(f::NET_GUEST_USO6));
    }
    if features & (f::bit(f::NET_GUEST_TSO4) | f::bit(f::NET_GUEST_TSO6)) == 0 {
        features &= !f::bit(f::NET_GUEST_ECN);
    }
    // HOST_TSO4/TSO6/USO require CSUM.
    if features & f::bit(f::NET_CSUM) == 0 {
        features &= !TX_OFFLOADS;
    }
    features
}

/// The hugepage size a physically addressed arena uses.
const HUGE_2M: usize = 2 << 20;

/// Features this driver knows how to use (others are never acknowledged).
const SUPPORTED: u64 = f::bit(f::VERSION_1)
    | default_features()
    | f::bit(f::NET_GUEST_CSUM)
    | GSO_OFFLOADS
    | f::bit(f::NET_GUEST_ECN)
    | f::bit(f::NET_MRG_RXBUF)
    | TX_OFFLOADS;

/// What a port is, once open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    /// Transport description (socket path, PCI address).
    pub description: String,
    /// MAC address.
    pub mac: [u8; 6],
    /// MTU.
    pub mtu: u16,
    /// The largest MTU the device carries: its `VIRTIO_NET_F_MTU`, else [`MAX_MTU`] (what
    /// [`RxQueue::set_mtu`](crate::RxQueue::set_mtu) may set).
    pub max_mtu: u16,
    /// Link status.
    pub link_up: bool,
    /// Negotiated feature bits.
    pub features: u64,
    /// Queue pairs set up (and handed out by [`Port::queue_pair`]); those in use now are
    /// [`Control::queue_pairs`].
    pub queue_pairs: u16,
    /// Queue pairs the device has (1 without `VIRTIO_NET_F_MQ`).
    pub max_queue_pairs: u16,
    /// Whether the port has a control queue (`VIRTIO_NET_F_CTRL_VQ` negotiated).
    pub control_queue: bool,
    /// Entries per ring.
    pub ring_size: u16,
    /// Whether the rings (the control queue's included) are packed (`VIRTIO_F_RING_PACKED`
    /// negotiated) rather than split.
    pub packed: bool,
}

/// What `Port::init` builds.
struct Opened {
    info: PortInfo,
    pool: Mempool,
    pairs: Vec<Option<QueuePair>>,
    stats: Vec<Arc<PairStats>>,
    stopped: Arc<AtomicBool>,
    control: Control,
    link: Arc<LinkShared>,
}

/// An open virtio-net port.
pub struct Port {
    /// Shared with the supervisor (control path only).
    transport: Arc<Mutex<Box<dyn Transport>>>,
    info: PortInfo,
    pool: Mempool,
    /// Queue pairs not taken yet (the supervisor resets their rings after a reconnection).
    pairs: Arc<Mutex<Vec<Option<QueuePair>>>>,
    stats: Vec<Arc<PairStats>>,
    stopped: Arc<AtomicBool>,
    control: Control,
    link: Arc<LinkShared>,
    /// Watches the device and reconnects (`supervisor.rs`); stopped first at close.
    supervisor: Option<Supervisor>,
    closed: bool,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each holder leaves the value consistent between its calls.
    m.lock().unwrap_or_else(|e| e.into_inner())
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
    /// rings, starts the device and activates `queue_pairs` pairs.
    pub fn open(cfg: PortConfig) -> Result<Port> {
        if cfg.queue_pairs == 0 {
            return Err(Error::Config("a port needs at least one queue pair".into()));
        }
        if cfg.ring_size == 0
            || cfg.ring_size > layout::MAX_QUEUE_SIZE
            || (!cfg.packed && !cfg.ring_size.is_power_of_two())
        {
            return Err(Error::Config(format!(
                "ring size {} is not a power of two in 1..=32768 (packed rings may have any size up to 32768)",
                cfg.ring_size
            )));
        }
        if cfg.max_queue_pairs.is_some_and(|m| m > ctrl::MQ_VQ_PAIRS_MAX) {
            return Err(Error::Config(format!("at most {} queue pairs", ctrl::MQ_VQ_PAIRS_MAX)));
        }
        // A shared pool brings its own geometry.
        let mut cfg = cfg;
        if let Some(p) = &cfg.pool {
            cfg.buf_size = p.buf_size();
            cfg.headroom = p.headroom();
            cfg.buffers = Some(p.capacity());
        }
        let cfg = cfg;
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
        // Sized for the most pairs the port may set up (the device's maximum is known only
        // after negotiation, which needs the arena shared already).
        let upper = cfg.queue_pairs.max(cfg.max_queue_pairs.unwrap_or(0));
        let buffers_upper = cfg.buffers.unwrap_or(2 * 2 * upper as u32 * cfg.ring_size as u32);
        if let Some(b) = cfg.buffers {
            if b < cfg.queue_pairs as u32 * cfg.ring_size as u32 {
                return Err(Error::Config(format!(
                    "{b} buffers cannot fill {} receive rings of {}",
                    cfg.queue_pairs, cfg.ring_size
                )));
            }
        }
        mempool::check_geometry(buffers_upper, cfg.buf_size, cfg.headroom)?;
        let mac = cfg.mac.unwrap_or_else(random_mac);
        let mut transport: Box<dyn Transport> = match &cfg.transport {
            TransportConfig::VirtioUser { path, server: false } => Box::new(VhostUserTransport::connect(
                path,
                mac,
                cfg.vhost_user_timeout,
                cfg.vhost_user_peer_uid,
            )?),
            TransportConfig::VirtioUser { path, server: true } => Box::new(VhostUserTransport::listen(
                path,
                mac,
                cfg.vhost_user_timeout,
                cfg.vhost_user_peer_uid,
            )?),
            TransportConfig::VfioPci { bdf } => Box::new(PciTransport::open(bdf, mac)?),
        };
        // The ring layout, before the arena is planned for it: "packed if offered" turns
        // into packed or split here, from the features the device offers.
        let mut cfg = cfg;
        if !cfg.packed && cfg.packed_if_offered {
            cfg.packed = transport.device_features()? & f::bit(f::RING_PACKED) != 0;
        }
        let cfg = cfg;

        // The DMA arena: sized for the pool and rings as the device will address them
        // (whole, or physical hugepage by hugepage), and made reachable by the device
        // before anything is carved from it.
        let physical = transport.needs_physical_dma();
        let mut plan = ArenaPlan::new(physical.then_some(HUGE_2M));
        if cfg.pool.is_none() {
            mempool::plan(&mut plan, buffers_upper, cfg.buf_size)?;
        }
        for (len, align) in ControlQueue::allocations(cfg.packed) {
            plan.alloc(len, align)?;
        }
        let ring_allocations = if cfg.packed {
            PackedRing::allocations(cfg.ring_size)
        } else {
            DriverRing::allocations(cfg.ring_size)
        };
        for _ in 0..2 * upper as u32 {
            for (len, align) in ring_allocations {
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
        if let Some(p) = &cfg.pool {
            transport.share_dma(p.arena())?;
        }
        let arena = Arc::new(arena);
        let mut setup = None;
        match Self::init(&cfg, transport.as_mut(), &arena, frame_room, &mut setup) {
            Ok(p) => {
                let transport = Arc::new(Mutex::new(transport));
                let pairs = Arc::new(Mutex::new(p.pairs));
                let supervisor = Supervisor::start(Watched {
                    transport: transport.clone(),
                    link: p.link.clone(),
                    control: p.control.clone(),
                    untaken: pairs.clone(),
                    features: p.info.features,
                    device: p.info.description.clone(),
                })
                .map_err(|e| Error::io("starting the port's supervisor thread", e));
                let port = Port {
                    transport,
                    info: p.info,
                    pool: p.pool,
                    pairs,
                    stats: p.stats,
                    stopped: p.stopped,
                    control: p.control,
                    link: p.link,
                    supervisor: None,
                    closed: false,
                };
                // Dropping the port on an error resets the device.
                let mut port = port;
                port.supervisor = Some(supervisor?);
                Ok(port)
            }
            Err(e) => {
                // Stop the device before the rings and buffers it may know go away (the
                // arena itself lives until after this reset), then let the queues built
                // so far return their buffers.
                if let Err(r) = transport.reset() {
                    log::debug!("{}: reset after a failed open: {r}", transport.describe());
                }
                if let Some((stopped, pairs)) = setup.take() {
                    stopped.store(true, Ordering::Release);
                    drop(pairs);
                }
                Err(e)
            }
        }
    }

    /// Feature negotiation, pool and queues, DRIVER_OK, active pairs (§3.1.1 steps 4-8).
    /// `built` receives the queues as they are made, so a failure after the device saw
    /// them can reset it before their buffers return to the pool.
    fn init(
        cfg: &PortConfig,
        transport: &mut dyn Transport,
        arena: &Arc<DmaArena>,
        frame_room: usize,
        built: &mut Option<(Arc<AtomicBool>, Vec<Option<QueuePair>>)>,
    ) -> Result<Opened> {
        // Feature negotiation (§3.1.1 steps 4-6).
        let offered = transport.device_features()?;
        if offered & f::bit(f::VERSION_1) == 0 {
            return Err(Error::MissingFeature { name: "VIRTIO_F_VERSION_1", bit: f::VERSION_1 });
        }
        if cfg.queue_pairs > 1 && offered & f::bit(f::NET_MQ) == 0 {
            return Err(Error::MissingFeature { name: "VIRTIO_NET_F_MQ", bit: f::NET_MQ });
        }
        if cfg.packed && offered & f::bit(f::RING_PACKED) == 0 {
            return Err(Error::MissingFeature { name: "VIRTIO_F_RING_PACKED", bit: f::RING_PACKED });
        }
        let mut want = f::bit(f::VERSION_1) | (cfg.features & SUPPORTED);
        if cfg.packed {
            want |= f::bit(f::RING_PACKED);
        }
        if cfg.queue_pairs == 1 && cfg.max_queue_pairs.unwrap_or(1) <= 1 {
            want &= !f::bit(f::NET_MQ);
        }
        let features = apply_dependencies((want | transport.platform_features()) & offered);
        let mrg = features & f::bit(f::NET_MRG_RXBUF) != 0;
        if features & GSO_OFFLOADS != 0 && frame_room < GSO_FRAME_ROOM && !mrg {
            return Err(Error::Config(format!(
                "receive offloads {} send super-frames of up to 64 KiB, but buffers of {} bytes with {} headroom \
                 and {} tailroom hold {frame_room}-byte frames: use {MAX_BUF_SIZE}-byte buffers (frame room \
                 {GSO_FRAME_ROOM}) or leave these features out",
                f::names(features & GSO_OFFLOADS),
                cfg.buf_size,
                cfg.headroom,
                cfg.tailroom
            )));
        }
        if cfg.packed && features & f::bit(f::RING_PACKED) == 0 {
            return Err(Error::MissingFeature { name: "VIRTIO_F_RING_PACKED", bit: f::RING_PACKED });
        }
        transport.negotiate(features)?;
        let mut config: NetConfig = transport.config(features)?;
        if config.mtu < MIN_MTU {
            return Err(Error::Config(format!("the device reports MTU {}, below {MIN_MTU}", config.mtu)));
        }
        if config.mtu > MAX_MTU {
            log::info!("{}: device MTU {} used as {MAX_MTU}", transport.describe(), config.mtu);
            config.mtu = MAX_MTU;
        }
        let max_mtu = if config.mtu_reported { config.mtu } else { MAX_MTU };
        if let Some(mtu) = cfg.mtu {
            let max = max_mtu;
            if !(MIN_MTU..=max).contains(&mtu) {
                return Err(Error::Config(format!(
                    "MTU {mtu} asked for: this device carries {MIN_MTU}..={max}{}",
                    if config.mtu_reported { " (its VIRTIO_NET_F_MTU)" } else { "" }
                )));
            }
            config.mtu = mtu;
        }
        let config = config;
        let mq = features & f::bit(f::NET_MQ) != 0;
        let ctrl_vq = features & f::bit(f::NET_CTRL_VQ) != 0;
        let dev_max = if mq { config.max_queue_pairs } else { 1 };
        if mq && cfg.queue_pairs > dev_max {
            return Err(Error::Config(format!(
                "{} queue pairs asked for, the device has {}",
                cfg.queue_pairs, config.max_queue_pairs
            )));
        }
        if frame_room < config.mtu as usize + 14 && !mrg {
            return Err(Error::Config(format!(
                "buffers of {} bytes with {} headroom and {} tailroom hold {frame_room}-byte frames, below MTU {} + 14 \
                 (negotiate VIRTIO_NET_F_MRG_RXBUF to receive frames over several buffers)",
                cfg.buf_size, cfg.headroom, cfg.tailroom, config.mtu
            )));
        }
        // Pairs beyond the active ones only help with a way to activate them.
        let setup = if mq && ctrl_vq {
            cfg.queue_pairs.max(cfg.max_queue_pairs.unwrap_or(0).min(dev_max))
        } else {
            cfg.queue_pairs
        };
        let buffers = cfg.buffers.unwrap_or(2 * 2 * setup as u32 * cfg.ring_size as u32);
        if buffers < setup as u32 * cfg.ring_size as u32 {
            return Err(Error::Config(format!(
                "{buffers} buffers cannot fill {setup} receive rings of {}",
                cfg.ring_size
            )));
        }
        let pool = match &cfg.pool {
            Some(p) => p.clone(),
            None => Mempool::new(arena.clone(), buffers, cfg.buf_size, cfg.headroom)?,
        };

        // Queues (§3.1.1 step 7): the control queue, then the data queues, receive rings
        // filled before the device starts.
        let ring_features = RingFeatures::from_features(features);
        let ctrl_queue = if ctrl_vq {
            let index = ctrl::queue_index(mq, dev_max);
            let index = u16::try_from(index)
                .map_err(|_| Error::Config(format!("control queue index {index} is beyond 16 bits")))?;
            let mut q = ControlQueue::new(arena, ring_features, cfg.packed)?;
            let ring = q.ring_mut();
            ring.set_notifier(transport.setup_queue(index, CTRL_RING_SIZE, ring.addrs())?);
            Some((index, q))
        } else {
            None
        };
        let ctrl_index = ctrl_queue.as_ref().map(|(i, _)| *i);
        let control = Control::new(
            ControlParams {
                device: transport.describe(),
                features,
                virtio_user: transport.control_queue_may_be_unserved(),
                timeout: cfg.ctrl_timeout,
                pairs: setup,
                active_pairs: 1,
            },
            ctrl_queue.map(|(_, q)| q),
        );
        let stopped = Arc::new(AtomicBool::new(false));
        let link_up = config.status & layout::net_config::S_LINK_UP != 0;
        let link = LinkShared::new(2 * setup as usize, link_up);
        let mut pairs = Vec::new();
        let mut stats = Vec::new();
        for p in 0..setup {
            let st = Arc::new(PairStats::default());
            let (mut rx_ring, mut tx_ring): (AnyRing, AnyRing) = if cfg.packed {
                (
                    PackedRing::new(arena, cfg.ring_size, ring_features)?.into(),
                    PackedRing::new(arena, cfg.ring_size, ring_features)?.into(),
                )
            } else {
                (
                    DriverRing::new(arena, cfg.ring_size, ring_features)?.into(),
                    DriverRing::new(arena, cfg.ring_size, ring_features)?.into(),
                )
            };
            rx_ring.set_notifier(transport.setup_queue(2 * p, cfg.ring_size, rx_ring.addrs())?);
            tx_ring.set_notifier(transport.setup_queue(2 * p + 1, cfg.ring_size, tx_ring.addrs())?);
            let mut rx = RxQueue::with_merge(
                rx_ring,
                pool.clone(),
                st.clone(),
                cfg.tailroom,
                stopped.clone(),
                control.clone(),
                config.mtu,
                mrg,
            );
            rx.set_reset_point(link.reset_point(2 * p as usize));
            rx.set_max_mtu(max_mtu);
            rx.refill();
            let mut tx = TxQueue::new(tx_ring, pool.clone(), st.clone(), stopped.clone(), features);
            tx.set_reset_point(link.reset_point(2 * p as usize + 1));
            pairs.push(Some(QueuePair { index: p, rx, tx }));
            stats.push(st);
        }
        // Handed to the caller's cleanup until the port exists.
        *built = Some((stopped.clone(), pairs));

        // Start (step 8) with the control queue and the active pairs enabled; the rings
        // of the other pairs once the device has been told how many pairs to use.
        if let Some(i) = ctrl_index {
            transport.enable_queue(i)?;
        }
        for q in 0..2 * cfg.queue_pairs {
            transport.enable_queue(q)?;
        }
        transport.start()?;
        let mut enable_rest = true;
        if mq && ctrl_vq && (setup > 1 || cfg.queue_pairs > 1) {
            match control.set_queue_pairs(cfg.queue_pairs) {
                Ok(()) => {}
                Err(e @ Error::ControlNotServed { .. }) => {
                    // DPDK's net_vhost and the like: the active pairs' rings are enabled
                    // (the vhost-user way to choose pairs); the others stay off.
                    log::warn!("{e}; using the {} pair(s) enabled through vhost-user", cfg.queue_pairs);
                    enable_rest = false;
                }
                Err(e) => return Err(e),
            }
        }
        if enable_rest {
            for q in 2 * cfg.queue_pairs..2 * setup {
                transport.enable_queue(q)?;
            }
        }
        let pairs = built.take().map(|(_, p)| p).unwrap_or_default();
        let info = PortInfo {
            description: transport.describe(),
            mac: config.mac,
            mtu: config.mtu,
            max_mtu,
            link_up,
            features,
            queue_pairs: setup,
            max_queue_pairs: dev_max,
            control_queue: ctrl_vq,
            ring_size: cfg.ring_size,
            packed: features & f::bit(f::RING_PACKED) != 0,
        };
        Ok(Opened { info, pool, pairs, stats, stopped, control, link })
    }

    /// The port's control queue: commands (RX mode, MAC and VLAN filters, queue pairs,
    /// receive offloads) from any thread, while the queue pairs run on theirs.
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// What the port is.
    pub fn info(&self) -> &PortInfo {
        &self.info
    }

    /// The port's buffer pool (allocate transmit packets from it).
    pub fn pool(&self) -> &Mempool {
        &self.pool
    }

    /// The link now: up or down and why, changes and reconnections so far.
    pub fn link(&self) -> LinkStatus {
        self.link.status()
    }

    /// A handle to watch the link from any thread: poll it or wait for a change (DPDK's
    /// link state change event).
    pub fn link_watch(&self) -> LinkWatch {
        LinkWatch::new(self.link.clone())
    }

    /// Takes queue pair `i` (each pair can be taken once; its halves may go to
    /// different threads). A queue must then be polled for the port to come back after
    /// its back-end restarted (see `supervisor.rs`).
    pub fn queue_pair(&mut self, i: u16) -> Option<QueuePair> {
        lock(&self.pairs).get_mut(i as usize)?.take()
    }

    /// Takes every queue pair not taken yet.
    pub fn take_queue_pairs(&mut self) -> Vec<QueuePair> {
        lock(&self.pairs).iter_mut().filter_map(Option::take).collect()
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
        lock(&self.pairs).clear();
        res
    }

    fn shutdown(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.closed = true;
        // No reconnection races with the reset.
        self.supervisor = None;
        // No command may race with the reset (a command in progress finishes first).
        self.control.close();
        let res = lock(&self.transport).reset();
        self.link.close();
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
