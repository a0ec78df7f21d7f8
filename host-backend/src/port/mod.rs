//! Ports: what happens to a device's traffic. Each port is made of paths, and each path
//! owns the rings it touches (a ring belongs to exactly one path, a path to exactly one
//! worker), so a burst never needs a lock.
//!
//! Owns: the per-burst packet work of `sink` (count and drop), `gen` (generate frames
//! into the guest's receive buffers), and forwarding from one device's transmit queue to
//! a receive queue (`reflect`: the same device; `xconnect`: the other device), with
//! backpressure: a frame waits in the transmit ring until a receive buffer is free; and
//! the control queue path (read a command, have the device apply it, write the ack).
//! Must not: talk to the front-end or change device state other than marking a queue
//! broken (through [`Device::mark_broken`]) and applying control commands (through
//! [`Device::apply_ctrl`], on the control worker only).
//!
//! What is delivered into a receive queue follows the receiving device's [`RxConfig`],
//! the `Arc` its receive ring was activated with (no lock, no atomic per frame): a frame
//! its filters reject is consumed and counted as `filtered` without using a receive
//! buffer; `gen` addresses the device's current MAC and, with `--gso-size`, sends TCP
//! super-frames whole only while guest TSO is on (segments otherwise, see [`crate::gso`]).
//!
//! Here: a path ([`PortPath`]: its kind, its queues, its chain room) and the one burst
//! entry point [`PortPath::run`]; each kind's burst is in its own file: `sink`, `gen`,
//! `forward` (`reflect` and `xconnect`), `control` (the control queue), `handoff`
//! (`--handoff`'s two halves) and `tap` (a queue pair to and from a kernel tap queue); a
//! frame over several receive chains (mergeable receive buffers) is `mrg`'s, a
//! transmitted frame with a checksum or segmentation request `offload`'s (both out of
//! line: a frame that needs neither never goes there). The split-ring bursts of `gen`,
//! `reflect`/`xconnect`, the control queue and `--handoff` are `#[inline(always)]` into
//! `run`, as they were when they lived in one file; the plain sink's is a function of its
//! own, and packed rings, `sink --sink-read` and taps go through one out-of-line
//! `run_other`, so that what one kind adds does not cost the others' loops registers
//! (`bench/callgrind.sh`).

use std::sync::Arc;

use spec::layout::{NET_HDR_LEN, NET_HDR_NUM_BUFFERS};

use crate::ctrl::{self, RxConfig};
use crate::device::{ActiveRing, Device};
use crate::gso::TcpGen;
use crate::handoff::{Receiver, Sender};
use crate::iotlb::PendingMiss;
use crate::memory::GuestMemory;
use crate::packed_ring::PackedRing;
use crate::ring::Ring;
use crate::split_ring::{ChainBuf, DeviceRing, RingFault};

mod afpacket;
mod control;
mod forward;
mod gen;
mod handoff;
pub(crate) mod mrg;
pub(crate) mod offload;
mod plain;
mod sink;
mod tap;

pub(crate) use gen::udp_frame;
pub(crate) use sink::Took;

/// Most chains handled per ring per burst.
pub const BURST: u16 = 64;
/// Most control commands handled per burst (each may wait for a resync of the workers).
pub const CTRL_BURST: u16 = 16;
/// Frame bytes the receive filter looks at: destination MAC up to the VLAN tag's id.
const FILTER_BYTES: usize = 16;
/// Ethernet header length.
const ETH_HLEN: u64 = 14;
/// The virtio-net header of a frame delivered whole in one receive buffer: nothing
/// asked of the driver, `num_buffers` 1 (little-endian).
const ONE_BUFFER_HDR: [u8; NET_HDR_LEN] = {
    let mut h = [0u8; NET_HDR_LEN];
    h[NET_HDR_NUM_BUFFERS] = 1;
    h
};
/// Offset of the generator's magic and sequence number in its frames (after
/// Ethernet, IPv4 and UDP headers).
pub const GEN_SEQ_OFFSET: usize = 14 + 20 + 8;
/// Magic bytes before the sequence number in generated frames.
pub const GEN_MAGIC: [u8; 4] = *b"VNET";

/// One queue of one device, as a path refers to it.
pub struct QueueSlot {
    /// The device.
    pub dev: Arc<Device>,
    /// Queue index within the device (even: receive, odd: transmit).
    pub q: u16,
    active: Option<ActiveRing>,
    /// Under a vIOMMU: the translation this queue waits for, if any.
    miss: Option<PendingMiss>,
}

impl QueueSlot {
    fn new(dev: &Arc<Device>, q: u16) -> Self {
        QueueSlot { dev: dev.clone(), q, active: None, miss: None }
    }
    fn pair(&self) -> usize {
        self.q as usize / 2
    }
    /// The active ring, if it is an `R` (the engine the burst was chosen for), and the
    /// guest memory its chains borrow (see `split_ring::ChainBuf`).
    #[inline(always)]
    fn ring<R: Ring>(&mut self) -> Option<(&mut R, &GuestMemory)> {
        let a = self.active.as_mut()?;
        Some((R::get(&mut a.ring)?, &*a.mem))
    }
    /// [`ring`](Self::ring) and the receive configuration it was activated with
    /// (borrowed: cloning the `Arc` per burst would bounce its count between workers).
    #[inline(always)]
    fn ring_rx<R: Ring>(&mut self) -> Option<(&mut R, &GuestMemory, &RxConfig)> {
        let a = self.active.as_mut()?;
        Some((R::get(&mut a.ring)?, &*a.mem, &*a.rx))
    }
    /// Whether the active ring is a packed one.
    fn packed(slot: &Option<QueueSlot>) -> bool {
        slot.as_ref().and_then(|s| s.active.as_ref()).is_some_and(|a| a.ring.is_packed())
    }
    /// Marks this queue broken and lets go of it; or, for an IOTLB miss, keeps the ring
    /// (the chain stays available and is retried next burst) until the miss times out.
    fn fail(&mut self, bad: RingFault) {
        let bad = match bad {
            RingFault::IotlbMiss { iova, write } => {
                if self.dev.iotlb_miss(&mut self.miss, iova, write) {
                    return;
                }
                RingFault::BadAddress { addr: iova, len: 0 }
            }
            other => other,
        };
        self.active = None;
        self.dev.mark_broken(self.q, bad);
    }
}

/// What kind of work a path does per burst, with that kind's own state.
pub enum PathKind {
    /// Count and drop what the guest transmits on `src`; with `copy` (`--sink-read`),
    /// each frame is first copied out into it (one slot of the largest frame per frame
    /// of a burst, as DPDK's `rxonly` copies each into its own mbuf).
    Sink {
        /// `BURST` slots of `max_frame` bytes, or `None`: frames are not read.
        copy: Option<Box<[u8]>>,
    },
    /// Fill the guest's receive buffers on `dst` with generated frames.
    Gen {
        /// Virtio-net header followed by the frame template; the sequence number is
        /// patched in per frame.
        frame: Vec<u8>,
        /// Next sequence number.
        seq: u64,
        /// `--gso-size`: TCP super-frames instead of `frame`.
        tcp: Option<Box<TcpGen>>,
    },
    /// Serve the control queue `src`: each command is applied by its device and
    /// acknowledged.
    Ctrl {
        /// The command bytes of one chain (capacity [`ctrl::CTRL_MAX_LEN`], allocated once).
        buf: Vec<u8>,
    },
    /// Move frames from `src` (a transmit queue) to `dst` (a receive queue).
    Forward {
        /// Swap source and destination MAC addresses on the way.
        swap_mac: bool,
    },
    /// `--handoff`: copy what `src` (a transmit queue) sends into frame buffers handed
    /// to another worker ([`crate::handoff`]).
    HandOut(Box<Sender>),
    /// `--handoff`: deliver frames another worker handed over into `dst` (a receive
    /// queue).
    HandIn(Box<Receiver>),
    /// `tap`: what `src` (a transmit queue) sends goes to a tap queue, what the kernel
    /// sends to it comes into `dst` (the same pair's receive queue).
    Tap(Box<tap::TapState>),
    /// `afpacket`: as `Tap`, through an AF_PACKET socket's mmap rings.
    AfPacket(Box<afpacket::AfpState>),
}

/// One path of a port: a unit of work a worker runs every loop, one kind of work on
/// the rings it owns.
pub struct PortPath {
    kind: PathKind,
    src: Option<QueueSlot>,
    dst: Option<QueueSlot>,
    /// Room for the chain walked from `src` (a transmit or control queue), reused by
    /// every burst (see `split_ring::ChainBuf`).
    src_chain: Box<ChainBuf>,
    /// Room for the chain walked from `dst` (a receive queue).
    dst_chain: Box<ChainBuf>,
    /// Room for the further receive chains of a frame that spans several (mergeable
    /// receive buffers, [`mrg`]).
    mrg_chain: Box<ChainBuf>,
    /// A forwarding path's staging buffer for frames with offload requests
    /// ([`offload`]); `None` on other paths and where no host offload is offered.
    staging: Option<Box<offload::Staging>>,
    max_frame: u64,
    /// Whether the source and the destination ring are packed (set when rings are
    /// taken): the engine a burst runs with, chosen once per burst.
    packed: (bool, bool),
    /// The epochs of the source's and the destination's devices when the path last took
    /// its rings (see `Device::epoch`).
    epochs: [u64; 2],
    /// `--prefetch-tx`: a forwarding burst first asks for the lines of every frame it
    /// will read (a probe for issue 24's loop levels; off by default).
    prefetch_tx: bool,
    /// `run` takes this path's bursts out of line ([`run_other`](Self::run_other)): a
    /// packed ring, a `sink --sink-read` or a tap (set with the rings). The split-ring
    /// bursts inlined in `run` are the 64-byte benchmarks': every other kind's code
    /// inlined next to them cost them instructions per frame (`bench/callgrind.sh`).
    out_of_line: bool,
}

/// Which side of a path a bad value came from.
enum Side {
    Src,
    Dst,
}

impl PortPath {
    fn new(kind: PathKind, src: Option<QueueSlot>, dst: Option<QueueSlot>, mtu: u16) -> PortPath {
        PortPath {
            kind,
            src,
            dst,
            src_chain: Box::default(),
            dst_chain: Box::default(),
            mrg_chain: Box::default(),
            staging: None,
            // MTU plus Ethernet header plus one VLAN tag.
            max_frame: mtu as u64 + ETH_HLEN + 4,
            packed: (false, false),
            epochs: [0, 0],
            prefetch_tx: false,
            out_of_line: false,
        }
    }

    /// A sink on `dev`'s transmit queue `q`.
    pub fn sink(dev: &Arc<Device>, q: u16) -> PortPath {
        let slot = dev.params.mtu as usize + ETH_HLEN as usize + 4;
        let copy = dev.params.sink_read.then(|| vec![0u8; BURST as usize * slot].into_boxed_slice());
        PortPath::new(PathKind::Sink { copy }, Some(QueueSlot::new(dev, q)), None, dev.params.mtu)
    }

    /// A generator of `pkt_size`-byte frames into `dev`'s receive queue `q`: UDP, or
    /// with `gso_size` TCP super-frames cut at that MSS (see [`crate::gso`]).
    pub fn gen(dev: &Arc<Device>, q: u16, pkt_size: u16, gso_size: Option<u16>) -> PortPath {
        let tcp = gso_size.map(|mss| Box::new(TcpGen::new(dev.params.mac, pkt_size as usize, mss)));
        let udp_len = if tcp.is_some() { 60 } else { pkt_size as usize };
        let mut frame = vec![0u8; NET_HDR_LEN];
        frame[NET_HDR_NUM_BUFFERS..NET_HDR_NUM_BUFFERS + 2].copy_from_slice(&1u16.to_le_bytes());
        frame.extend_from_slice(&udp_frame(dev.params.mac, udp_len));
        PortPath::new(
            PathKind::Gen { frame, seq: 0, tcp },
            None,
            Some(QueueSlot::new(dev, q)),
            dev.params.mtu,
        )
    }

    /// The control queue of `dev` (its internal index [`Device::ctrl_queue`]).
    pub fn ctrl(dev: &Arc<Device>) -> PortPath {
        let job = PathKind::Ctrl { buf: Vec::with_capacity(ctrl::CTRL_MAX_LEN) };
        PortPath::new(job, Some(QueueSlot::new(dev, dev.ctrl_queue())), None, dev.params.mtu)
    }

    /// Forwarding from `src`'s transmit queue `sq` to `dst`'s receive queue `dq`.
    pub fn forward(src: &Arc<Device>, sq: u16, dst: &Arc<Device>, dq: u16, swap_mac: bool) -> PortPath {
        let mtu = src.params.mtu.min(dst.params.mtu);
        let mut p = PortPath::new(
            PathKind::Forward { swap_mac },
            Some(QueueSlot::new(src, sq)),
            Some(QueueSlot::new(dst, dq)),
            mtu,
        );
        if src.params.host_offloads != 0 {
            p.staging = Some(Box::new(offload::Staging::new(p.max_frame as usize)));
        }
        p.prefetch_tx = src.params.prefetch_tx;
        p
    }

    /// `--handoff`: the sending half of a cross-connect direction, on `dev`'s transmit
    /// queue `q` (the worker of `dev`).
    pub fn hand_out(dev: &Arc<Device>, q: u16, sender: Sender) -> PortPath {
        PortPath::new(PathKind::HandOut(Box::new(sender)), Some(QueueSlot::new(dev, q)), None, dev.params.mtu)
    }

    /// `--handoff`: the receiving half, on `dev`'s receive queue `q` (the worker of `dev`).
    pub fn hand_in(dev: &Arc<Device>, q: u16, receiver: Receiver) -> PortPath {
        PortPath::new(
            PathKind::HandIn(Box::new(receiver)),
            None,
            Some(QueueSlot::new(dev, q)),
            dev.params.mtu,
        )
    }

    /// A tap port's queue pair `txq`/`rxq` of `dev`, joined to the tap queue `q`.
    pub fn tap(dev: &Arc<Device>, txq: u16, rxq: u16, q: crate::tap::TapQueue) -> PortPath {
        // The path's largest frame, as `new` computes it.
        let max_frame = dev.params.mtu as u64 + ETH_HLEN + 4;
        PortPath::new(
            PathKind::Tap(Box::new(tap::TapState::new(q, max_frame, !dev.params.tap_syscalls))),
            Some(QueueSlot::new(dev, txq)),
            Some(QueueSlot::new(dev, rxq)),
            dev.params.mtu,
        )
    }

    /// An afpacket port's queue pair `txq`/`rxq` of `dev`, joined to the socket `s`.
    pub fn afpacket(dev: &Arc<Device>, txq: u16, rxq: u16, s: crate::afpacket::AfPacket) -> PortPath {
        let max_frame = dev.params.mtu as u64 + ETH_HLEN + 4;
        PortPath::new(
            PathKind::AfPacket(Box::new(afpacket::AfpState::new(s, max_frame))),
            Some(QueueSlot::new(dev, txq)),
            Some(QueueSlot::new(dev, rxq)),
            dev.params.mtu,
        )
    }

    fn slots(&mut self) -> impl Iterator<Item = &mut QueueSlot> {
        self.src.iter_mut().chain(self.dst.iter_mut())
    }

    /// Lets go of every ring (their positions are written back to their devices).
    pub fn detach(&mut self) {
        for s in self.slots() {
            if let Some(a) = s.active.take() {
                s.dev.deactivate(s.q, a);
            }
        }
        self.packed = (false, false);
        self.out_of_line = false;
    }

    /// Records the epochs of the path's devices and returns whether any moved since the
    /// last call (or `force`): then the path must let go of its rings and take them anew.
    pub fn take_epochs(&mut self, force: bool) -> bool {
        let now = [&self.src, &self.dst].map(|s| s.as_ref().map_or(0, |s| s.dev.epoch()));
        let moved = force || now != self.epochs;
        self.epochs = now;
        moved
    }

    /// Takes every ring that may run now.
    pub fn attach(&mut self) {
        for s in self.slots() {
            if s.active.is_none() {
                s.active = s.dev.activate(s.q);
            }
        }
        self.packed = (QueueSlot::packed(&self.src), QueueSlot::packed(&self.dst));
        if let PathKind::Tap(t) = &mut self.kind {
            let rx = self.dst.as_ref().and_then(|d| d.active.as_ref()).map(|a| &*a.rx);
            t.configure(rx, self.max_frame);
        }
        self.out_of_line = self.packed != (false, false)
            || matches!(
                self.kind,
                PathKind::Sink { copy: Some(_) } | PathKind::Tap(_) | PathKind::AfPacket(_)
            );
        log::debug!(
            "path attached: src {:?} active {}, dst {:?} active {}",
            self.src.as_ref().map(|s| s.q),
            self.src.as_ref().is_some_and(|s| s.active.is_some()),
            self.dst.as_ref().map(|s| s.q),
            self.dst.as_ref().is_some_and(|s| s.active.is_some()),
        );
    }

    /// Whether this is the sending half of a `--handoff` cross-connect.
    pub fn is_hand_out(&self) -> bool {
        matches!(self.kind, PathKind::HandOut(_))
    }

    /// Whether any of the path's rings is active, or it is a handoff path (which may
    /// always have frames from another worker).
    pub fn any_active(&self) -> bool {
        // A handoff path always may have work: frames from another worker.
        matches!(self.kind, PathKind::HandOut(_) | PathKind::HandIn(_))
            || self.src.iter().chain(self.dst.iter()).any(|s| s.active.is_some())
    }

    /// Raw kick eventfds of the active rings (for the worker's epoll set). Returns
    /// `false` if an active ring has no kick fd (a front-end in polling mode, vhost-user's
    /// "no fd" flag): then the worker must never sleep.
    pub fn kick_fds(&self, out: &mut Vec<i32>) -> bool {
        use std::os::fd::AsRawFd;
        // Frames handed over by another worker arrive without a kick: a worker with a
        // handoff path polls without sleeping.
        let mut all = !matches!(self.kind, PathKind::HandOut(_) | PathKind::HandIn(_));
        for a in self.src.iter().chain(self.dst.iter()).filter_map(|s| s.active.as_ref()) {
            match &a.kick {
                Some(k) => out.push(k.as_raw_fd()),
                None => all = false,
            }
        }
        all
    }

    /// Descriptors other than kick eventfds whose readiness means work for this path (a
    /// tap's): the worker sleeps on them too, edge-triggered, and never reads them.
    pub fn poll_fds(&self, out: &mut Vec<i32>) {
        match &self.kind {
            PathKind::Tap(t) => out.push(t.raw_fd()),
            PathKind::AfPacket(a) => out.push(a.raw_fd()),
            _ => {}
        }
    }

    /// Enables or suppresses kicks on the ring this path's work arrives on; when enabling,
    /// returns whether work arrived meanwhile.
    ///
    /// That ring is the source (frames to take) when the path has one, else the
    /// destination (a `gen` path's receive ring: buffers to fill). A forwarding path's
    /// destination is left alone: the buffers a driver keeps posted there are no work by
    /// themselves (counted as work, they kept a `--poll-us` worker from ever sleeping),
    /// and with its kicks on the driver would kick on every refill. A frame that waits for
    /// buffers is still unconsumed in the source ring, which counts as work (the rings'
    /// `set_kicks`), so the worker polls on instead of sleeping on it.
    ///
    /// A kernel port (tap, AF_PACKET) whose frames wait for receive buffers has work on
    /// its destination too: the guest's refill. Its kicks are enabled then (else a worker
    /// asleep with the kernel's queue full would only wake on its timeout: nothing else
    /// signals), and always suppressed again after the sleep.
    pub fn set_kicks(&mut self, enable: bool) -> bool {
        let waits = match &self.kind {
            PathKind::Tap(t) => Some(t.rx_waiting),
            PathKind::AfPacket(a) => Some(a.rx_waiting()),
            _ => None,
        };
        let mut arrived = false;
        if let Some(waits) = waits {
            if let Some(a) = self.dst.as_mut().and_then(|s| s.active.as_mut()) {
                if waits || !enable {
                    arrived |= a.ring.set_kicks(enable && waits);
                }
            }
        }
        let slot = if self.src.is_some() { self.src.as_mut() } else { self.dst.as_mut() };
        match slot.and_then(|s| s.active.as_mut()) {
            Some(a) => arrived | a.ring.set_kicks(enable),
            None => arrived,
        }
    }

    /// Runs one burst; returns the number of chains it completed.
    ///
    /// Never inlined into the worker's loop: one call per burst costs nothing per packet,
    /// and the burst stays one function (`bench/callgrind.sh` measures it by this name),
    /// whichever codegen unit the worker lands in.
    ///
    /// The ring engine is chosen here, once per burst: each kind's burst is generic over
    /// [`Ring`]; split rings run the bursts inlined here, as before there was a packed
    /// engine, and any packed ring (and `sink --sink-read`, and a tap) goes through
    /// [`run_other`](Self::run_other).
    #[inline(never)]
    pub fn run(&mut self) -> usize {
        let res = if self.out_of_line {
            self.run_other()
        } else {
            match self.kind {
                PathKind::Sink { .. } => self.run_sink_split(),
                PathKind::Gen { tcp: None, .. } => self.run_gen::<DeviceRing>(),
                PathKind::Gen { tcp: Some(_), .. } => self.run_gen_tcp::<DeviceRing>(),
                PathKind::Forward { swap_mac } => self.run_forward::<DeviceRing, DeviceRing>(swap_mac),
                PathKind::Ctrl { .. } => self.run_ctrl::<DeviceRing>(),
                PathKind::HandOut(_) => self.run_hand_out::<DeviceRing>(),
                PathKind::HandIn(_) => self.run_hand_in::<DeviceRing>(),
                // Never here: a tap path is always out of line (`attach`).
                PathKind::Tap(_) | PathKind::AfPacket(_) => Ok(0),
            }
        };
        match res {
            Ok(n) => {
                if n > 0 {
                    // A ring that made progress is not waiting for a translation.
                    for s in self.src.iter_mut().chain(self.dst.iter_mut()) {
                        s.miss = None;
                    }
                }
                n
            }
            Err((side, bad)) => {
                let slot = match side {
                    Side::Src => self.src.as_mut(),
                    Side::Dst => self.dst.as_mut(),
                };
                if let Some(s) = slot {
                    s.fail(bad);
                }
                0
            }
        }
    }

    /// The split-ring sink burst in a function of its own: its loop's registers do not
    /// depend on what else `run` holds.
    #[inline(never)]
    fn run_sink_split(&mut self) -> Result<usize, (Side, RingFault)> {
        self.run_sink::<DeviceRing>()
    }

    /// The packed-ring sink burst out of line, as the split one's.
    #[inline(never)]
    fn run_sink_packed(&mut self) -> Result<usize, (Side, RingFault)> {
        self.run_sink::<PackedRing>()
    }

    /// The forwarding burst between two packed rings (`reflect` on a packed device, or
    /// `xconnect` between two) in a function of its own, as the split sink's: inside
    /// [`run_other`](Self::run_other), among every other packed burst, the loop kept
    /// fewer of its values in registers.
    #[inline(never)]
    fn run_forward_packed(&mut self, swap_mac: bool) -> Result<usize, (Side, RingFault)> {
        self.run_forward::<PackedRing, PackedRing>(swap_mac)
    }

    /// [`run`](Self::run)'s bursts for a path with a packed ring (on either side: a
    /// cross-connect may join a split and a packed device), and `sink --sink-read`'s on
    /// either layout. Out of line, so the split
    /// bursts in `run` stay as they were.
    #[inline(never)]
    fn run_other(&mut self) -> Result<usize, (Side, RingFault)> {
        type S = DeviceRing;
        type P = PackedRing;
        let (sp, dp) = self.packed;
        match self.kind {
            PathKind::Sink { copy: None } => self.run_sink_packed(),
            PathKind::Sink { copy: Some(_) } if sp => self.run_sink_read::<P>(),
            PathKind::Sink { copy: Some(_) } => self.run_sink_read::<S>(),
            PathKind::Gen { tcp: None, .. } => self.run_gen::<P>(),
            PathKind::Gen { tcp: Some(_), .. } => self.run_gen_tcp::<P>(),
            PathKind::Forward { swap_mac } => match (sp, dp) {
                (true, true) => self.run_forward_packed(swap_mac),
                (true, false) => self.run_forward::<P, S>(swap_mac),
                (false, _) => self.run_forward::<S, P>(swap_mac),
            },
            PathKind::Ctrl { .. } => self.run_ctrl::<P>(),
            PathKind::HandOut(_) => self.run_hand_out::<P>(),
            PathKind::HandIn(_) => self.run_hand_in::<P>(),
            // Both rings are the one device's: both packed, or both split.
            PathKind::Tap(_) if sp || dp => self.run_tap::<P>(),
            PathKind::Tap(_) => self.run_tap::<S>(),
            PathKind::AfPacket(_) if sp || dp => self.run_afp::<P>(),
            PathKind::AfPacket(_) => self.run_afp::<S>(),
        }
    }
}
