//! A userspace virtio-net poll-mode driver.
//!
//! A [`Port`] is one virtio-net device reached through a transport: virtio-user (the
//! driver is the vhost-user front-end of a back-end's unix socket) or VFIO-PCI (a
//! virtio-net PCI device bound to `vfio-pci`, see [`PortConfig::vfio_pci`]). It hands out
//! [`QueuePair`]s whose halves ([`RxQueue`], [`TxQueue`]) move packets in bursts, each
//! usable from its own thread without locks. Packets are [`Packet`]s: owned buffers from
//! a [`Mempool`] with XDP-style headroom and tailroom, returned to their pool on drop.
//!
//! ```
//! use driver::{Port, PortConfig};
//! # let dir = std::env::temp_dir().join(format!("vnet-doc-{}", std::process::id()));
//! # std::fs::create_dir_all(&dir).unwrap();
//! # let sock = dir.join("reflect.sock");
//! # let backend = host_backend::Backend::start(host_backend::config::Config {
//! #     ports: vec![host_backend::config::parse_port(&format!("reflect:{}", sock.display())).unwrap()],
//! #     ..Default::default()
//! # }).unwrap();
//! // A back-end (here our host-backend's `reflect` port) listens on `sock`.
//! let mut port = Port::open(PortConfig::virtio_user(&sock))?;
//! println!("MAC {:02x?}, MTU {}", port.info().mac, port.info().mtu);
//! let mut qp = port.queue_pair(0).unwrap();
//!
//! // Send one frame...
//! let mut pkt = port.pool().alloc().unwrap();
//! pkt.set_data(&[0xffu8; 64])?;
//! let mut batch = vec![pkt];
//! assert_eq!(qp.tx.tx_burst(&mut batch), 1);
//!
//! // ...and receive it back from the reflecting back-end.
//! let mut rx = Vec::with_capacity(32);
//! let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
//! while qp.rx.rx_burst(&mut rx, 32) == 0 && std::time::Instant::now() < deadline {}
//! assert_eq!(rx[0].data(), &[0xffu8; 64][..]);
//! drop(rx);
//! port.close(vec![qp])?;
//! # backend.shutdown();
//! # Ok::<(), driver::Error>(())
//! ```
//!
//! A port's [`Control`] sends control-queue commands (RX mode, MAC and VLAN filters,
//! queue pairs, receive offloads) from any thread, and each [`RxQueue`] can run an
//! XDP-style program ([`XdpProgram`]) on the frames it receives.
//!
//! Modules: [`layout`] and [`frame`] (the wire format shared with the host backend,
//! re-exported from the `vnet-spec` crate), [`dma`] (the DMA arena), [`mempool`] (buffers and packets), [`ring`] (the driver-side split and packed rings),
//! [`queue`] (rx/tx bursts, the XDP hook), [`ctrl`] (the control queue), [`transport`]
//! (virtio-user and virtio-PCI), [`vfio`] (userspace VFIO: groups, BARs, DMA mapping),
//! [`port`] (device init), [`link`] (link state, change notifications, the ring reset
//! after a back-end restart; the supervisor thread that reconnects lives in
//! `supervisor.rs`), [`devargs`] (DPDK-style `--vdev`/`-a` port arguments).

pub mod ctrl;
pub mod devargs;
pub mod dma;
pub mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz_api;
pub mod link;
pub mod mempool;
pub mod port;
pub mod queue;
pub mod ring;
mod supervisor;
pub mod transport;
pub mod vfio;

/// The virtio-net wire format this driver shares with the host backend (the `vnet-spec`
/// crate in `driver/spec/`): split- and packed-ring layouts, feature bits, headers, frame
/// builders.
pub use spec::{frame, layout, offload, packed};

pub use ctrl::{Control, ControlCounts};
pub use error::{DeviceError, Error, Result};
pub use link::{LinkStatus, LinkWatch};
pub use mempool::{for_each_data_mut, free_bulk, Mempool, Packet, TxCsum, TxGso, TxOffload};
pub use port::{Port, PortConfig, PortInfo, TransportConfig};
pub use queue::{QueuePair, QueueStatsSnapshot, RxMeta, RxQueue, TxQueue, XdpOut, XdpProgram, XdpVerdict};
