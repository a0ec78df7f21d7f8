//! A batching vhost-user virtio-net backend: the host side of the data path.
//!
//! Front-ends (QEMU, DPDK's virtio-user, our driver's virtio-user mode) connect to one
//! unix socket per device. Each device belongs to a port (`sink`, `gen`, `reflect`,
//! `xconnect`, `tap`); pinned busy-poll workers move packets through a batched split-ring
//! engine. Everything a guest writes is validated; a bad value breaks only that queue.
//!
//! Each device also serves a control queue (`VIRTIO_NET_F_CTRL_VQ`) to front-ends that
//! negotiate it: RX mode, MAC and VLAN filters, MAC address, `VQ_PAIRS_SET` and guest
//! offloads (the internal `ctrl` module), applied to what the device delivers into the guest's receive
//! queues. One control worker thread owns every device's control queue and sleeps
//! until kicked; QEMU and DPDK's virtio-user terminate the control queue themselves and
//! use `SET_VRING_ENABLE`, which keeps deciding which pairs run.
//!
//! ```no_run
//! use host_backend::{config::{parse_port, Config}, Backend};
//! let cfg = Config { ports: vec![parse_port("reflect:/tmp/vnet.sock")?], ..Config::default() };
//! let backend = Backend::start(cfg)?;
//! // ... a front-end connects to /tmp/vnet.sock and traffic flows ...
//! for dev in backend.shutdown() {
//!     println!("{}", dev.to_json());
//! }
//! # Ok::<(), host_backend::Error>(())
//! ```
//!
//! Public: [`Backend`], [`config`] (what to start), [`stats`] (what it counted),
//! [`Error`], and [`ptr_ring`] (the batched pointer ring between host threads, a
//! component of its own with its own benchmark).
//!
//! Internal modules: `memory` (guest memory and translation), `split_ring` and
//! `packed_ring` (the device-side ring engines) and `ring` (what ports use of them), `device` (device state and the vhost-user handler), `ctrl`
//! (control commands and receive filters), `port` (what each port does per burst), `gso`
//! (the generator's TCP super-frames), `iotlb` (translations under a vIOMMU) and
//! `iotlb_channel` (their vhost-user messages), `handoff` (frames between workers),
//! `worker` (busy-poll threads and the control worker), `server` (sockets), `tap` (tap
//! devices' descriptors).

pub(crate) mod afpacket;
pub mod config;
pub(crate) mod ctrl;
pub(crate) mod device;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzz_api;
pub(crate) mod gso;
pub(crate) mod handoff;
pub(crate) mod iotlb;
pub(crate) mod iotlb_channel;
pub(crate) mod memory;
pub(crate) mod packed_ring;
pub(crate) mod port;
pub mod ptr_ring;
pub(crate) mod ring;
pub(crate) mod server;
pub(crate) mod sigbus;
pub mod socket;
pub(crate) mod split_ring;
pub mod stats;
pub(crate) mod tap;
pub(crate) mod worker;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

pub use config::PortKind;
pub use error::{Error, Result};

use config::Config;
use device::{Device, DeviceParams};
use port::PortPath;
use server::{Server, ServerHandle};
use stats::DeviceSnapshot;
use worker::{Engine, Worker};

/// Guest offloads a `gen` port with `--gso-size` offers: checksum and TCP segmentation.
/// It generates TCP/IPv4 only, but offers TSO6 too: DPDK's virtio PMD takes large
/// receive (`--enable-lro`) only from a device that offers both TSO4 and TSO6. Not ECN,
/// UFO or USO.
fn gso_offloads() -> u64 {
    use spec::layout::features::bit;
    use virtio_bindings::virtio_net as vn;
    bit(vn::VIRTIO_NET_F_GUEST_CSUM) | bit(vn::VIRTIO_NET_F_GUEST_TSO4) | bit(vn::VIRTIO_NET_F_GUEST_TSO6)
}

/// Offloads a forwarding port (`reflect`, `xconnect`, also with `--handoff`) offers
/// unless `--no-offloads`: the host side (the device completes checksums and segments
/// TCPv4/TCPv6/UDP super-frames a guest sends, `port::offload`; with `--handoff` the
/// frames and their headers cross between the workers, `handoff`), and the guest side, so
/// that a super-frame reaches a guest that takes it whole. A `sink` offers the host side
/// too (it drops every frame, and takes a super-frame whole, `port::sink`).
fn forward_offloads() -> (u64, u64) {
    use spec::layout::features::{self as f, bit};
    let host = bit(f::NET_CSUM) | bit(f::NET_HOST_TSO4) | bit(f::NET_HOST_TSO6) | bit(f::NET_HOST_USO);
    let guest = bit(f::NET_GUEST_CSUM) | bit(f::NET_GUEST_TSO4) | bit(f::NET_GUEST_TSO6);
    (host, guest)
}

/// Offloads a `tap` port offers unless `--no-offloads`: the host side passes a guest's
/// checksum, TCP (also with ECN) and UDP segmentation requests to the kernel in the
/// tap's virtio-net header
/// (the kernel completes and segments them), and the guest side lets the kernel hand
/// partially checksummed frames and TCP super-frames to a guest that takes them
/// (`TUNSETOFFLOAD`, set from what the guest negotiated, `port::tap`).
fn tap_offloads() -> (u64, u64) {
    use spec::layout::features::{self as f, bit};
    let host = bit(f::NET_CSUM)
        | bit(f::NET_HOST_TSO4)
        | bit(f::NET_HOST_TSO6)
        | bit(f::NET_HOST_USO)
        | bit(f::NET_HOST_ECN);
    let guest = bit(f::NET_GUEST_CSUM) | bit(f::NET_GUEST_TSO4) | bit(f::NET_GUEST_TSO6);
    (host, guest)
}

/// A running backend.
pub struct Backend {
    engine: Arc<Engine>,
    devices: Vec<Arc<Device>>,
    workers: Vec<JoinHandle<Vec<PortPath>>>,
    servers: Vec<(ServerHandle, JoinHandle<()>)>,
    started: Instant,
}

impl Backend {
    /// Creates the sockets, starts the workers and the control threads.
    pub fn start(cfg: Config) -> Result<Backend> {
        cfg.validate()?;
        let cores: Vec<Option<usize>> = match &cfg.cores {
            Some(c) => c.iter().map(|&c| Some(c)).collect(),
            None => vec![None],
        };
        // One slot per data worker, then the control worker's.
        let engine = Engine::new(cores.len(), 1)?;

        // Devices and the paths that move their traffic.
        let mut devices = Vec::new();
        // (group, path): paths of one group run on one worker; groups go round-robin.
        let mut paths: Vec<(usize, PortPath)> = Vec::new();
        let mut group = 0;
        let mut next_group = || {
            group += 1;
            group - 1
        };
        for spec in &cfg.ports {
            let forwards = matches!(spec.kind, PortKind::Reflect | PortKind::Xconnect) && !cfg.no_offloads;
            let devs: Vec<Arc<Device>> = spec
                .sockets
                .iter()
                .map(|s| {
                    let mut mac = cfg.mac;
                    mac[5] = mac[5].wrapping_add(devices.len() as u8);
                    let d = Device::new(
                        DeviceParams {
                            socket: s.clone(),
                            kind: spec.kind,
                            queue_pairs: cfg.queue_pairs,
                            mac,
                            mtu: cfg.mtu,
                            guest_offloads: if spec.kind == PortKind::Gen && cfg.gso_size.is_some() {
                                gso_offloads()
                            } else if forwards {
                                forward_offloads().1
                            } else if matches!(spec.kind, PortKind::Tap | PortKind::AfPacket)
                                && !cfg.no_offloads
                            {
                                tap_offloads().1
                            } else {
                                0
                            },
                            host_offloads: if forwards || (spec.kind == PortKind::Sink && !cfg.no_offloads) {
                                forward_offloads().0
                            } else if matches!(spec.kind, PortKind::Tap | PortKind::AfPacket)
                                && !cfg.no_offloads
                            {
                                tap_offloads().0
                            } else {
                                0
                            },
                            iommu: cfg.iommu,
                            packed: !cfg.no_packed,
                            sink_read: cfg.sink_read,
                            prefetch_tx: cfg.prefetch_tx,
                            tap: spec.ifname.clone(),
                            tap_syscalls: cfg.tap_syscalls,
                        },
                        engine.clone(),
                        (spec.kind == PortKind::Gen).then_some(cfg.gen_count).flatten(),
                    );
                    devices.push(d.clone());
                    d
                })
                .collect();
            // With --handoff, each device of a cross-connect is one group (both its rings
            // on one worker); otherwise every path is a group of its own.
            // A tap port's interface, opened now: a missing capability or a busy device is
            // an error before any thread starts. One queue per queue pair.
            let mut tap_queues = match (&spec.kind, &spec.ifname) {
                (PortKind::Tap, Some(name)) => tap::open(name, cfg.queue_pairs)?.queues.into_iter(),
                _ => Vec::new().into_iter(),
            };
            // An afpacket port's socket and rings, likewise opened now (one queue pair).
            let mut afp = match (&spec.kind, &spec.ifname) {
                (PortKind::AfPacket, Some(name)) => {
                    if cfg.queue_pairs != 1 {
                        return Err(Error::Config(format!(
                            "afpacket {name}: one queue pair only (--queues 1)"
                        )));
                    }
                    Some(afpacket::open(name)?)
                }
                _ => None,
            };
            let device_groups =
                (spec.kind == PortKind::Xconnect && cfg.handoff).then(|| (next_group(), next_group()));
            for p in 0..cfg.queue_pairs {
                let (rxq, txq) = (2 * p, 2 * p + 1);
                match spec.kind {
                    PortKind::Sink => paths.push((next_group(), PortPath::sink(&devs[0], txq))),
                    PortKind::Gen => {
                        paths.push((next_group(), PortPath::gen(&devs[0], rxq, cfg.pkt_size, cfg.gso_size)))
                    }
                    PortKind::Reflect => paths
                        .push((next_group(), PortPath::forward(&devs[0], txq, &devs[0], rxq, cfg.swap_mac))),
                    PortKind::Xconnect if device_groups.is_some() => {
                        let (ga, gb) = device_groups.expect("checked by the guard");
                        let max_frame = cfg.mtu as usize + 18;
                        // Offload events are counted on the sending device's pair.
                        let counted = |d: &Arc<Device>| {
                            forwards.then(|| handoff::OffloadStats::new(d.clone(), p as usize))
                        };
                        let (s_ab, r_ab) = handoff::channel(max_frame, counted(&devs[0]));
                        let (s_ba, r_ba) = handoff::channel(max_frame, counted(&devs[1]));
                        paths.push((ga, PortPath::hand_out(&devs[0], txq, s_ab)));
                        paths.push((ga, PortPath::hand_in(&devs[0], rxq, r_ba)));
                        paths.push((gb, PortPath::hand_out(&devs[1], txq, s_ba)));
                        paths.push((gb, PortPath::hand_in(&devs[1], rxq, r_ab)));
                    }
                    PortKind::Xconnect => {
                        paths.push((next_group(), PortPath::forward(&devs[0], txq, &devs[1], rxq, false)));
                        paths.push((next_group(), PortPath::forward(&devs[1], txq, &devs[0], rxq, false)));
                    }
                    PortKind::Tap => {
                        let q = tap_queues.next().ok_or_else(|| {
                            Error::Config("tap port without an interface name (use tap:SOCKET,IFNAME)".into())
                        })?;
                        paths.push((next_group(), PortPath::tap(&devs[0], txq, rxq, q)));
                    }
                    PortKind::AfPacket => {
                        let s = afp.take().ok_or_else(|| {
                            Error::Config(
                                "afpacket port without an interface name (use afpacket:SOCKET,IFNAME)".into(),
                            )
                        })?;
                        paths.push((next_group(), PortPath::afpacket(&devs[0], txq, rxq, s)));
                    }
                }
            }
        }

        // Sockets first (they can fail on bad paths), before any thread starts.
        let listeners = if cfg.client {
            None
        } else {
            Some(
                devices
                    .iter()
                    .map(|d| server::listen(&d.params.socket, cfg.socket))
                    .collect::<Result<Vec<_>>>()?,
            )
        };

        // Groups round-robin over workers (groups are numbered densely in the order they
        // are first used): every ring is owned by exactly one worker.
        let mut per_worker: Vec<Vec<PortPath>> = (0..cores.len()).map(|_| Vec::new()).collect();
        for (g, p) in paths {
            per_worker[g % cores.len()].push(p);
        }
        let mut workers = Vec::new();
        for (i, (cpu, paths)) in cores.iter().zip(per_worker).enumerate() {
            workers.push(Worker::new(i, *cpu, paths, engine.clone(), cfg.poll_us, cfg.idle_pause).spawn()?);
        }
        // Every device's control queue on the control worker (the last engine slot).
        let ctrl_paths = devices.iter().map(PortPath::ctrl).collect();
        workers.push(Worker::control(cores.len(), ctrl_paths, engine.clone()).spawn()?);

        let mut servers = Vec::new();
        let mut listeners = listeners.map(|l| l.into_iter());
        for d in &devices {
            let (srv, handle) = Server::new(d.clone());
            let name = format!("vnet-ctl-{}", servers.len());
            let join = match listeners.as_mut().and_then(|l| l.next()) {
                Some(listener) => {
                    log::info!("listening on {}", d.params.socket.display());
                    std::thread::Builder::new().name(name).spawn(move || srv.run_listening(listener))
                }
                None => {
                    let path = d.params.socket.clone();
                    std::thread::Builder::new().name(name).spawn(move || srv.run_client(path))
                }
            }
            .map_err(|e| Error::Worker(format!("cannot start control thread: {e}")))?;
            servers.push((handle, join));
        }
        Ok(Backend { engine, devices, workers, servers, started: Instant::now() })
    }

    /// Statistics of every device now.
    pub fn snapshot(&self) -> Vec<DeviceSnapshot> {
        self.devices.iter().map(|d| d.snapshot()).collect()
    }

    /// Seconds since start.
    pub fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// One statistics line as JSON (the format the README documents).
    pub fn stats_json(&self, snaps: &[DeviceSnapshot], last: bool) -> String {
        let devs: Vec<serde_json::Value> = snaps.iter().map(|s| s.to_json()).collect();
        serde_json::json!({
            "final": last,
            "elapsed_s": (self.elapsed_s() * 1000.0).round() / 1000.0,
            "devices": devs,
        })
        .to_string()
    }

    /// Stops workers and control threads, closes connections, removes the sockets, and
    /// returns the final statistics.
    ///
    /// In that order: a front-end takes a closed connection as the back-end gone and
    /// may hand its rings to the next back-end at once (QEMU with `reconnect=` restarts
    /// each ring from its used index), so no worker may touch a ring after the close.
    pub fn shutdown(self) -> Vec<DeviceSnapshot> {
        self.engine.stop();
        let mut paths: Vec<PortPath> = Vec::new();
        for w in self.workers {
            paths.extend(w.join().unwrap_or_default());
        }
        // Frames between `--handoff` workers: sending halves first, then receiving ones.
        for p in paths.iter_mut().filter(|p| p.is_hand_out()) {
            p.account_in_flight();
        }
        for p in paths.iter_mut().filter(|p| !p.is_hand_out()) {
            p.account_in_flight();
        }
        drop(paths);
        for (h, _) in &self.servers {
            h.shutdown();
        }
        for (_, j) in self.servers {
            let _ = j.join();
        }
        self.devices.iter().map(|d| d.snapshot()).collect()
    }
}
