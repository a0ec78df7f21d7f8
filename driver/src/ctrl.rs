//! The control virtqueue (virtio 1.2 §5.1.6.5) and the [`Control`] handle that
//! applications send commands with.
//!
//! Owns: command encoding (`struct virtio_net_ctrl_hdr`, command data, the ack byte),
//! the control ring with its one DMA buffer, the bounded wait for the acknowledgement,
//! the check that each command's feature was negotiated, the number of active queue
//! pairs, and the port-wide receive-offload state (what the application asked for, what
//! attached XDP programs need switched off, what the device was last told).
//! Must not: run on the data path. Commands are synchronous and serialised by a mutex;
//! the queue pairs keep running on their own threads meanwhile.
//!
//! A command is one chain, laid out as Linux lays it out: the 2-byte header, the data
//! (one part; two for the MAC table, one per table), then the 1-byte ack, each in its
//! own descriptor. Only one command is in flight at a time. The ack byte is preset to
//! 0xff, so a device that completes the chain without writing it is caught.
//!
//! A command that gets no answer within the timeout stays posted (the device may still
//! write its ack, so its buffer is not reused): the next command first looks whether it
//! completed meanwhile, and fails at once if not. Over virtio-user a back-end that has
//! never answered is reported as not serving the control queue at all
//! ([`Error::ControlNotServed`]): QEMU and DPDK's virtio-user terminate the control
//! queue in the front-end, so vhost-user back-ends such as DPDK's `net_vhost` offer
//! `VIRTIO_NET_F_CTRL_VQ` without serving it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::dma::DmaArena;
use crate::error::{DeviceError, Error, Result};
use crate::layout::{ctrl, features as f};
use crate::ring::{DriverRing, RingFeatures};

/// Entries in the control ring (one command of at most four descriptors in flight).
pub const CTRL_RING_SIZE: u16 = 16;
/// Bytes of the control queue's DMA buffer.
const BUF_SIZE: usize = 2048;
/// Offset of the ack byte in the buffer (its own cache line, away from the command).
const ACK_OFF: usize = BUF_SIZE - 64;
/// Most MAC addresses in one `MAC_TABLE_SET` (unicast and multicast together).
pub const MAC_TABLE_MAX: usize = 256;
/// The ack value before the device writes one.
const NO_ACK: u8 = 0xff;

/// One control command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command<'a> {
    /// `VIRTIO_NET_CTRL_RX_PROMISC`: receive every frame (on) or only those the filters
    /// accept (off).
    Promisc(bool),
    /// `VIRTIO_NET_CTRL_RX_ALLMULTI`: receive every multicast frame.
    AllMulti(bool),
    /// `VIRTIO_NET_CTRL_MAC_TABLE_SET`: the unicast and multicast addresses to accept
    /// besides the device's own.
    MacTable {
        /// Unicast addresses.
        unicast: &'a [[u8; 6]],
        /// Multicast addresses.
        multicast: &'a [[u8; 6]],
    },
    /// `VIRTIO_NET_CTRL_MAC_ADDR_SET`: the device's own address.
    MacAddr([u8; 6]),
    /// `VIRTIO_NET_CTRL_VLAN_ADD`: accept frames tagged with this VLAN id.
    VlanAdd(u16),
    /// `VIRTIO_NET_CTRL_VLAN_DEL`: stop accepting this VLAN id.
    VlanDel(u16),
    /// `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`: the number of queue pairs the device uses.
    QueuePairs(u16),
    /// `VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET`: the receive offloads in use (feature bits).
    GuestOffloads(u64),
}

impl Command<'_> {
    /// The command's name in the spec.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Promisc(_) => "VIRTIO_NET_CTRL_RX_PROMISC",
            Command::AllMulti(_) => "VIRTIO_NET_CTRL_RX_ALLMULTI",
            Command::MacTable { .. } => "VIRTIO_NET_CTRL_MAC_TABLE_SET",
            Command::MacAddr(_) => "VIRTIO_NET_CTRL_MAC_ADDR_SET",
            Command::VlanAdd(_) => "VIRTIO_NET_CTRL_VLAN_ADD",
            Command::VlanDel(_) => "VIRTIO_NET_CTRL_VLAN_DEL",
            Command::QueuePairs(_) => "VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET",
            Command::GuestOffloads(_) => "VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET",
        }
    }

    /// `(class, command)`.
    pub fn class_cmd(&self) -> (u8, u8) {
        match self {
            Command::Promisc(_) => (ctrl::CLASS_RX, ctrl::RX_PROMISC),
            Command::AllMulti(_) => (ctrl::CLASS_RX, ctrl::RX_ALLMULTI),
            Command::MacTable { .. } => (ctrl::CLASS_MAC, ctrl::MAC_TABLE_SET),
            Command::MacAddr(_) => (ctrl::CLASS_MAC, ctrl::MAC_ADDR_SET),
            Command::VlanAdd(_) => (ctrl::CLASS_VLAN, ctrl::VLAN_ADD),
            Command::VlanDel(_) => (ctrl::CLASS_VLAN, ctrl::VLAN_DEL),
            Command::QueuePairs(_) => (ctrl::CLASS_MQ, ctrl::MQ_VQ_PAIRS_SET),
            Command::GuestOffloads(_) => (ctrl::CLASS_GUEST_OFFLOADS, ctrl::GUEST_OFFLOADS_SET),
        }
    }

    /// The feature bit the command needs (besides `VIRTIO_NET_F_CTRL_VQ`), §5.1.6.5.
    pub fn feature(&self) -> u32 {
        match self {
            Command::Promisc(_) | Command::AllMulti(_) | Command::MacTable { .. } => f::NET_CTRL_RX,
            Command::MacAddr(_) => f::NET_CTRL_MAC_ADDR,
            Command::VlanAdd(_) | Command::VlanDel(_) => f::NET_CTRL_VLAN,
            Command::QueuePairs(_) => f::NET_MQ,
            Command::GuestOffloads(_) => f::NET_CTRL_GUEST_OFFLOADS,
        }
    }

    /// Writes the command-specific data into `out`; returns its length and where a
    /// second descriptor starts (the MAC table's multicast half), if anywhere.
    pub fn encode(&self, out: &mut [u8]) -> Result<(usize, Option<usize>)> {
        let need = match self {
            Command::MacTable { unicast, multicast } => {
                if unicast.len() + multicast.len() > MAC_TABLE_MAX {
                    return Err(Error::Config(format!(
                        "a MAC table of {} addresses: at most {MAC_TABLE_MAX}",
                        unicast.len() + multicast.len()
                    )));
                }
                8 + 6 * (unicast.len() + multicast.len())
            }
            Command::MacAddr(_) => 6,
            Command::VlanAdd(_) | Command::VlanDel(_) | Command::QueuePairs(_) => 2,
            Command::GuestOffloads(_) => 8,
            Command::Promisc(_) | Command::AllMulti(_) => 1,
        };
        if out.len() < need {
            return Err(Error::Config(format!("{}: {need} bytes of data do not fit", self.name())));
        }
        match self {
            Command::Promisc(on) | Command::AllMulti(on) => out[0] = *on as u8,
            Command::MacTable { unicast, multicast } => {
                let mut at = 0;
                let mut table = |macs: &[[u8; 6]], at: &mut usize| {
                    out[*at..*at + 4].copy_from_slice(&(macs.len() as u32).to_le_bytes());
                    *at += 4;
                    for m in macs {
                        out[*at..*at + 6].copy_from_slice(m);
                        *at += 6;
                    }
                };
                table(unicast, &mut at);
                let split = at;
                table(multicast, &mut at);
                return Ok((at, Some(split)));
            }
            Command::MacAddr(m) => out[..6].copy_from_slice(m),
            Command::VlanAdd(v) | Command::VlanDel(v) | Command::QueuePairs(v) => {
                out[..2].copy_from_slice(&v.to_le_bytes())
            }
            Command::GuestOffloads(o) => out[..8].copy_from_slice(&o.to_le_bytes()),
        }
        Ok((need, None))
    }
}

/// The control ring and its DMA buffer.
pub(crate) struct ControlQueue {
    ring: DriverRing,
    buf: *mut u8,
    iova: u64,
    /// Token of a command posted but never answered (its buffer is still the device's).
    pending: Option<u32>,
    next_token: u32,
    /// The device has answered at least one command.
    answered: bool,
    /// A protocol violation stopped the queue.
    broken: Option<DeviceError>,
    _arena: Arc<DmaArena>,
}

// SAFETY: `buf` points into the arena kept alive by `_arena`; the queue is used under the
// control mutex only (one thread at a time).
unsafe impl Send for ControlQueue {}

impl ControlQueue {
    /// What [`ControlQueue::new`] takes from the arena, in order (to size an arena).
    pub(crate) fn allocations() -> [(usize, usize); 4] {
        let [d, a, u] = DriverRing::allocations(CTRL_RING_SIZE);
        [d, a, u, (BUF_SIZE, 64)]
    }

    /// Carves the control ring and its buffer from `arena`.
    pub(crate) fn new(arena: &Arc<DmaArena>, features: RingFeatures) -> Result<ControlQueue> {
        let ring = DriverRing::new(arena, CTRL_RING_SIZE, features)?;
        let (buf, iova) = arena.alloc(BUF_SIZE, 64)?;
        Ok(ControlQueue {
            ring,
            buf,
            iova,
            pending: None,
            next_token: 0,
            answered: false,
            broken: None,
            _arena: arena.clone(),
        })
    }

    /// The ring (for queue setup).
    pub(crate) fn ring_mut(&mut self) -> &mut DriverRing {
        &mut self.ring
    }

    /// The token of the next completed command, if one completed.
    fn reap(&mut self) -> std::result::Result<Option<u32>, DeviceError> {
        if self.ring.poll_used()? == 0 {
            return Ok(None);
        }
        Ok(Some(self.ring.pop_used()?.0))
    }

    fn no_answer(&self, command: &'static str, device: &str, waited: Duration, virtio_user: bool) -> Error {
        let (device, waited_ms) = (device.to_string(), waited.as_millis() as u64);
        if virtio_user && !self.answered {
            Error::ControlNotServed { command, device, waited_ms }
        } else {
            Error::ControlTimeout { command, device, waited_ms }
        }
    }

    /// Sends `cmd` and waits up to `timeout` for its acknowledgement.
    fn execute(&mut self, cmd: &Command, timeout: Duration, device: &str, virtio_user: bool) -> Result<()> {
        if let Some(e) = self.broken {
            return Err(Error::Device(e));
        }
        if let Some(old) = self.pending {
            match self.reap() {
                Ok(Some(t)) if t == old => {
                    self.pending = None;
                    self.answered = true;
                    log::info!("{device}: a control command that had timed out was answered late");
                }
                Ok(_) => return Err(self.no_answer(cmd.name(), device, Duration::ZERO, virtio_user)),
                Err(e) => return Err(self.fail(e)),
            }
        }
        // Encode: header at 0, data from 2, ack at ACK_OFF (preset to "no answer").
        // SAFETY: the buffer is ours (nothing is in flight: `pending` is None), BUF_SIZE
        // bytes inside the arena; no other reference to it exists.
        let buf = unsafe { std::slice::from_raw_parts_mut(self.buf, BUF_SIZE) };
        let (class, command) = cmd.class_cmd();
        buf[0] = class;
        buf[1] = command;
        let (len, split) = cmd.encode(&mut buf[ctrl::HDR_LEN..ACK_OFF])?;
        buf[ACK_OFF] = NO_ACK;
        let data = self.iova + ctrl::HDR_LEN as u64;
        let mut parts = [(0u64, 0u32, false); 4];
        let mut n = 0;
        let mut push = |p: (u64, u32, bool)| {
            parts[n] = p;
            n += 1;
        };
        push((self.iova, ctrl::HDR_LEN as u32, false));
        match split {
            Some(s) => {
                push((data, s as u32, false));
                push((data + s as u64, (len - s) as u32, false));
            }
            None if len > 0 => push((data, len as u32, false)),
            None => {}
        }
        push((self.iova + ACK_OFF as u64, 1, true));
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(1) & 0x7fff_ffff;
        if self.ring.post_chain(&parts[..n], token).is_none() {
            // One command at a time in a 16-entry ring: only a bug gets here.
            return Err(Error::Config("control ring unexpectedly full".into()));
        }
        self.ring.publish();

        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            match self.reap() {
                Ok(Some(t)) if t == token => break,
                // Only this command is in flight, so `pop_used` rejects anything else;
                // should that ever change, a stray completion still fails cleanly.
                Ok(Some(t)) => {
                    return Err(Error::Config(format!(
                        "control queue: completion of command {t} while waiting for {token}"
                    )))
                }
                Ok(None) => {}
                Err(e) => return Err(self.fail(e)),
            }
            let waited = start.elapsed();
            if waited >= timeout {
                self.pending = Some(token);
                return Err(self.no_answer(cmd.name(), device, waited, virtio_user));
            }
            spins += 1;
            if spins < 2000 {
                std::hint::spin_loop();
            } else if spins < 4000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        self.answered = true;
        // SAFETY: inside the buffer; the device is done with it (its used entry was
        // read after the acquire load of used.idx, which orders its ack write before).
        let ack = unsafe { std::ptr::read_volatile(self.buf.add(ACK_OFF)) };
        match ack {
            ctrl::OK => Ok(()),
            ctrl::ERR => Err(Error::ControlRefused { command: cmd.name() }),
            ack => Err(Error::ControlBadAck { command: cmd.name(), ack }),
        }
    }

    fn fail(&mut self, e: DeviceError) -> Error {
        log::error!("control queue stopped: {e}");
        self.broken = Some(e);
        Error::Device(e)
    }
}

/// What a [`Control`] knows about its port.
pub(crate) struct ControlParams {
    /// The port's description.
    pub device: String,
    /// Negotiated features.
    pub features: u64,
    /// virtio-user transport (a back-end may not serve the control queue).
    pub virtio_user: bool,
    /// How long to wait for an acknowledgement.
    pub timeout: Duration,
    /// Queue pairs set up (the most `VQ_PAIRS_SET` may ask for).
    pub pairs: u16,
    /// Queue pairs the device uses at start.
    pub active_pairs: u16,
}

struct State {
    queue: Option<ControlQueue>,
    closed: bool,
    active_pairs: u16,
    /// The receive offloads the application wants (initially every negotiated one).
    wanted_offloads: u64,
    /// The receive offloads the device uses now.
    offloads: u64,
    /// Receive queues with an XDP program attached.
    xdp_programs: u32,
}

struct Shared {
    p: ControlParams,
    state: Mutex<State>,
}

/// A handle to a port's control queue: cheap to clone, usable from any thread while the
/// queue pairs run on theirs. Every command returns `Ok` only once the device
/// acknowledged it with `VIRTIO_NET_OK`; a command whose feature was not negotiated is
/// [`Error::Unsupported`] (naming the feature), a refusal is
/// [`Error::ControlRefused`], no answer within the port's timeout is
/// [`Error::ControlTimeout`] or [`Error::ControlNotServed`].
#[derive(Clone)]
pub struct Control {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, fm: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        fm.debug_struct("Control")
            .field("device", &self.shared.p.device)
            .field("queue", &s.queue.is_some())
            .field("active_pairs", &s.active_pairs)
            .field("offloads", &format_args!("{:#x}", s.offloads))
            .field("xdp_programs", &s.xdp_programs)
            .finish()
    }
}

impl Control {
    /// A handle over `queue` (None: `VIRTIO_NET_F_CTRL_VQ` was not negotiated).
    pub(crate) fn new(p: ControlParams, queue: Option<ControlQueue>) -> Control {
        let offloads = p.features & f::GUEST_OFFLOADS;
        let state = State {
            queue,
            closed: false,
            active_pairs: p.active_pairs,
            wanted_offloads: offloads,
            offloads,
            xdp_programs: 0,
        };
        Control { shared: Arc::new(Shared { p, state: Mutex::new(state) }) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent state (every field is updated
        // after the command it describes succeeded): carry on.
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the port has a control queue (`VIRTIO_NET_F_CTRL_VQ` negotiated).
    pub fn has_queue(&self) -> bool {
        self.lock().queue.is_some()
    }
    /// The features negotiated on the port.
    pub fn features(&self) -> u64 {
        self.shared.p.features
    }
    /// Queue pairs the device uses now.
    pub fn queue_pairs(&self) -> u16 {
        self.lock().active_pairs
    }
    /// Queue pairs set up at open (the most [`set_queue_pairs`](Self::set_queue_pairs)
    /// accepts).
    pub fn max_queue_pairs(&self) -> u16 {
        self.shared.p.pairs
    }
    /// The receive offloads (feature bits) the device uses now.
    pub fn guest_offloads(&self) -> u64 {
        self.lock().offloads
    }
    /// Receive queues with an XDP program attached.
    pub fn xdp_programs(&self) -> u32 {
        self.lock().xdp_programs
    }

    /// Checks that `feature` and the control queue were negotiated.
    fn need(&self, what: &'static str, feature: u32) -> Result<()> {
        for bit in [f::NET_CTRL_VQ, feature] {
            if self.shared.p.features & f::bit(bit) == 0 {
                return Err(Error::Unsupported { what, feature: f::name(bit), bit });
            }
        }
        Ok(())
    }

    /// Sends `cmd` with the state locked.
    fn send(&self, s: &mut State, cmd: &Command) -> Result<()> {
        if s.closed {
            return Err(Error::PortClosed(self.shared.p.device.clone()));
        }
        let p = &self.shared.p;
        let Some(q) = s.queue.as_mut() else {
            return Err(Error::Unsupported {
                what: cmd.name(),
                feature: f::name(f::NET_CTRL_VQ),
                bit: f::NET_CTRL_VQ,
            });
        };
        q.execute(cmd, p.timeout, &p.device, p.virtio_user)
    }

    /// Checks the feature, then sends `cmd`.
    fn run(&self, cmd: Command) -> Result<()> {
        self.need(cmd.name(), cmd.feature())?;
        let mut s = self.lock();
        self.send(&mut s, &cmd)
    }

    /// Promiscuous mode on or off (`VIRTIO_NET_F_CTRL_RX`).
    pub fn set_promisc(&self, on: bool) -> Result<()> {
        self.run(Command::Promisc(on))
    }

    /// All-multicast mode on or off (`VIRTIO_NET_F_CTRL_RX`).
    pub fn set_allmulti(&self, on: bool) -> Result<()> {
        self.run(Command::AllMulti(on))
    }

    /// The unicast and multicast addresses accepted besides the device's own
    /// (`VIRTIO_NET_F_CTRL_RX`; at most [`MAC_TABLE_MAX`] in all).
    pub fn set_mac_table(&self, unicast: &[[u8; 6]], multicast: &[[u8; 6]]) -> Result<()> {
        if let Some(m) = unicast.iter().find(|m| m[0] & 1 != 0) {
            return Err(Error::Config(format!("{m:02x?} in the unicast table is a multicast address")));
        }
        if let Some(m) = multicast.iter().find(|m| m[0] & 1 == 0) {
            return Err(Error::Config(format!("{m:02x?} in the multicast table is a unicast address")));
        }
        self.run(Command::MacTable { unicast, multicast })
    }

    /// The device's own MAC address (`VIRTIO_NET_F_CTRL_MAC_ADDR`).
    pub fn set_mac_addr(&self, mac: [u8; 6]) -> Result<()> {
        if mac[0] & 1 != 0 {
            return Err(Error::Config(format!("{mac:02x?} is a multicast address")));
        }
        self.run(Command::MacAddr(mac))
    }

    /// Accepts frames of VLAN `vid` (0..=4095; `VIRTIO_NET_F_CTRL_VLAN`).
    pub fn vlan_add(&self, vid: u16) -> Result<()> {
        check_vid(vid)?;
        self.run(Command::VlanAdd(vid))
    }

    /// Stops accepting frames of VLAN `vid` (`VIRTIO_NET_F_CTRL_VLAN`).
    pub fn vlan_del(&self, vid: u16) -> Result<()> {
        check_vid(vid)?;
        self.run(Command::VlanDel(vid))
    }

    /// Makes the device use the first `n` queue pairs (`VIRTIO_NET_F_MQ`), 1 up to the
    /// pairs set up at open. Safe while traffic flows: receive queues beyond `n` get no
    /// new frames (those already in their rings stay there to be received), and the
    /// application should transmit only on the first `n`.
    pub fn set_queue_pairs(&self, n: u16) -> Result<()> {
        let cmd = Command::QueuePairs(n);
        self.need(cmd.name(), cmd.feature())?;
        let max = self.shared.p.pairs;
        if n == 0 || n > max {
            return Err(Error::Config(format!("{n} queue pairs: the port set up {max} (1..={max})")));
        }
        let mut s = self.lock();
        self.send(&mut s, &cmd)?;
        s.active_pairs = n;
        Ok(())
    }

    /// The receive offloads the device may use (feature bits among
    /// [`features::GUEST_OFFLOADS`](crate::layout::features::GUEST_OFFLOADS), each
    /// negotiated; `VIRTIO_NET_F_CTRL_GUEST_OFFLOADS`). While an XDP program is
    /// attached, the merging offloads (TSO/UFO/ECN/USO) stay off and asking for them is
    /// an error.
    pub fn set_guest_offloads(&self, offloads: u64) -> Result<()> {
        let cmd = Command::GuestOffloads(offloads);
        self.need(cmd.name(), cmd.feature())?;
        let negotiated = self.shared.p.features & f::GUEST_OFFLOADS;
        if offloads & !negotiated != 0 {
            return Err(Error::Config(format!(
                "receive offloads {} were not negotiated (negotiated: {})",
                f::names(offloads & !negotiated),
                f::names(negotiated)
            )));
        }
        let seg = f::GUEST_GRO_HW & !f::bit(f::NET_GUEST_ECN);
        if offloads & seg != 0 && offloads & f::bit(f::NET_GUEST_CSUM) == 0 {
            return Err(Error::Config(format!(
                "receive offloads {} need VIRTIO_NET_F_GUEST_CSUM on too",
                f::names(offloads & seg)
            )));
        }
        let tso = f::bit(f::NET_GUEST_TSO4) | f::bit(f::NET_GUEST_TSO6);
        if offloads & f::bit(f::NET_GUEST_ECN) != 0 && offloads & tso == 0 {
            return Err(Error::Config("VIRTIO_NET_F_GUEST_ECN needs GUEST_TSO4 or GUEST_TSO6 on too".into()));
        }
        let mut s = self.lock();
        if s.xdp_programs > 0 && offloads & f::GUEST_GRO_HW != 0 {
            return Err(Error::Config(format!(
                "an XDP program is attached: receive offloads {} stay off until it is detached",
                f::names(offloads & f::GUEST_GRO_HW)
            )));
        }
        self.send(&mut s, &cmd)?;
        s.wanted_offloads = offloads;
        s.offloads = offloads;
        Ok(())
    }

    /// An XDP program is being attached: switches the merging receive offloads off if
    /// they are on (the first program), or refuses when the device cannot.
    pub(crate) fn xdp_attach(&self) -> Result<()> {
        let mut s = self.lock();
        if s.closed {
            return Err(Error::PortClosed(self.shared.p.device.clone()));
        }
        let merging = s.offloads & f::GUEST_GRO_HW;
        if s.xdp_programs == 0 && merging != 0 {
            if self.shared.p.features & f::bit(f::NET_CTRL_GUEST_OFFLOADS) == 0 {
                return Err(Error::XdpOffloads { offloads: f::names(merging) });
            }
            let off = s.offloads & !f::GUEST_GRO_HW;
            self.send(&mut s, &Command::GuestOffloads(off))?;
            s.offloads = off;
        }
        s.xdp_programs += 1;
        Ok(())
    }

    /// An XDP program was detached: the last one restores the offloads the application
    /// wants. The program counts as detached even if the device refuses.
    pub(crate) fn xdp_detach(&self) -> Result<()> {
        let mut s = self.lock();
        s.xdp_programs = s.xdp_programs.saturating_sub(1);
        if s.xdp_programs == 0 && s.offloads != s.wanted_offloads && !s.closed {
            let want = s.wanted_offloads;
            self.send(&mut s, &Command::GuestOffloads(want))?;
            s.offloads = want;
        }
        Ok(())
    }

    /// The port is closing: no command goes out any more.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
    }
}

fn check_vid(vid: u16) -> Result<()> {
    if vid > 4095 {
        return Err(Error::Config(format!("VLAN id {vid} is out of range 0..=4095")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::fake::FakeDevice;
    use std::sync::mpsc;

    /// How the fake device answers.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Answer {
        Ok,
        Err,
        Garbage,
        /// Completes the chain without writing the ack.
        NoWrite,
        /// Never completes the chain.
        Silent,
    }

    /// A control queue played by a device thread: it records every command (class,
    /// command, data bytes, descriptor count) and answers as `answer` says.
    struct Rig {
        control: Control,
        seen: mpsc::Receiver<(u8, u8, Vec<u8>, usize)>,
        answer: Arc<Mutex<Answer>>,
        stop: Arc<std::sync::atomic::AtomicBool>,
        dev: Option<std::thread::JoinHandle<()>>,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(d) = self.dev.take() {
                let _ = d.join();
            }
        }
    }

    fn rig_with(features: u64, virtio_user: bool) -> Rig {
        let arena = Arc::new(DmaArena::new(1 << 20, false).unwrap());
        let q = ControlQueue::new(&arena, Default::default()).unwrap();
        let mut dev = FakeDevice::new(&q.ring);
        let (tx, seen) = mpsc::channel();
        let answer = Arc::new(Mutex::new(Answer::Ok));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (a, st) = (answer.clone(), stop.clone());
        let dev = std::thread::spawn(move || {
            let _arena = arena;
            let mut silent: Vec<(u16, u64)> = Vec::new();
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                let Some((head, chain)) = dev.pop_avail() else {
                    // A late answer to the commands left unanswered once answering resumes.
                    if !silent.is_empty() && *a.lock().unwrap() != Answer::Silent {
                        for (h, ack) in silent.drain(..) {
                            dev.write(ack, &[ctrl::OK]);
                            dev.push_used(h as u32, 1);
                        }
                    }
                    std::thread::yield_now();
                    continue;
                };
                let readable: Vec<u8> = chain
                    .iter()
                    .filter(|d| d.flags & crate::layout::DESC_F_WRITE == 0)
                    .flat_map(|d| dev.read(d.addr, d.len as usize))
                    .collect();
                let ack = chain.iter().find(|d| d.flags & crate::layout::DESC_F_WRITE != 0).unwrap();
                let _ = tx.send((readable[0], readable[1], readable[2..].to_vec(), chain.len()));
                let answer = *a.lock().unwrap();
                match answer {
                    Answer::Silent => {
                        silent.push((head, ack.addr));
                        continue;
                    }
                    Answer::Ok => dev.write(ack.addr, &[ctrl::OK]),
                    Answer::Err => dev.write(ack.addr, &[ctrl::ERR]),
                    Answer::Garbage => dev.write(ack.addr, &[7]),
                    Answer::NoWrite => {}
                }
                dev.push_used(head as u32, 1);
            }
        });
        let p = ControlParams {
            device: "test".into(),
            features,
            virtio_user,
            timeout: Duration::from_millis(100),
            pairs: 4,
            active_pairs: 1,
        };
        Rig { control: Control::new(p, Some(q)), seen, answer, stop, dev: Some(dev) }
    }

    fn all() -> u64 {
        [
            f::NET_CTRL_VQ,
            f::NET_CTRL_RX,
            f::NET_CTRL_VLAN,
            f::NET_CTRL_MAC_ADDR,
            f::NET_MQ,
            f::NET_CTRL_GUEST_OFFLOADS,
            f::NET_GUEST_CSUM,
            f::NET_GUEST_TSO4,
            f::NET_GUEST_TSO6,
        ]
        .iter()
        .fold(0, |m, b| m | f::bit(*b))
    }

    #[test]
    fn every_command_is_encoded_as_the_spec_lays_it_out() {
        let r = rig_with(all(), true);
        let c = &r.control;
        let next = || r.seen.recv_timeout(Duration::from_secs(5)).unwrap();
        c.set_promisc(true).unwrap();
        assert_eq!(next(), (0, 0, vec![1], 3));
        c.set_allmulti(false).unwrap();
        assert_eq!(next(), (0, 1, vec![0], 3));
        let uni = [[2, 0, 0, 0, 0, 1]];
        let multi = [[0x01, 0, 0x5e, 0, 0, 1], [0x33, 0x33, 0, 0, 0, 1]];
        c.set_mac_table(&uni, &multi).unwrap();
        let mut want = vec![1, 0, 0, 0, 2, 0, 0, 0, 0, 1, 2, 0, 0, 0];
        want.extend_from_slice(&[0x01, 0, 0x5e, 0, 0, 1, 0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(next(), (1, 0, want, 4), "header, unicast table, multicast table, ack");
        c.set_mac_table(&[], &[]).unwrap();
        assert_eq!(next(), (1, 0, vec![0; 8], 4));
        c.set_mac_addr([2, 1, 2, 3, 4, 5]).unwrap();
        assert_eq!(next(), (1, 1, vec![2, 1, 2, 3, 4, 5], 3));
        c.vlan_add(0x123).unwrap();
        assert_eq!(next(), (2, 0, vec![0x23, 0x01], 3));
        c.vlan_del(4095).unwrap();
        assert_eq!(next(), (2, 1, vec![0xff, 0x0f], 3));
        c.set_queue_pairs(3).unwrap();
        assert_eq!(next(), (4, 0, vec![3, 0], 3));
        assert_eq!(c.queue_pairs(), 3);
        let o = f::bit(f::NET_GUEST_CSUM) | f::bit(f::NET_GUEST_TSO4);
        c.set_guest_offloads(o).unwrap();
        assert_eq!(next(), (5, 0, o.to_le_bytes().to_vec(), 3));
        assert_eq!(c.guest_offloads(), o);
    }

    #[test]
    fn arguments_are_checked_before_anything_is_sent() {
        let r = rig_with(all(), true);
        let c = &r.control;
        assert!(matches!(c.vlan_add(4096), Err(Error::Config(_))));
        assert!(matches!(c.set_queue_pairs(0), Err(Error::Config(_))));
        assert!(matches!(c.set_queue_pairs(5), Err(Error::Config(_))), "only 4 pairs set up");
        assert!(matches!(c.set_mac_addr([1, 0, 0, 0, 0, 0]), Err(Error::Config(_))));
        assert!(matches!(c.set_mac_table(&[[1, 0, 0, 0, 0, 0]], &[]), Err(Error::Config(_))));
        assert!(matches!(c.set_mac_table(&[], &[[2, 0, 0, 0, 0, 0]]), Err(Error::Config(_))));
        let many = vec![[2u8, 0, 0, 0, 0, 0]; MAC_TABLE_MAX + 1];
        assert!(matches!(c.set_mac_table(&many, &[]), Err(Error::Config(_))));
        let e = c.set_guest_offloads(f::bit(f::NET_GUEST_UFO)).unwrap_err();
        assert!(e.to_string().contains("VIRTIO_NET_F_GUEST_UFO"), "{e}");
        let e = c.set_guest_offloads(f::bit(f::NET_GUEST_TSO4)).unwrap_err();
        assert!(e.to_string().contains("GUEST_CSUM"), "{e}");
        assert!(r.seen.try_recv().is_err(), "nothing reached the device");
        assert_eq!(c.queue_pairs(), 1);
    }

    #[test]
    fn missing_features_are_named() {
        let r = rig_with(f::bit(f::NET_CTRL_VQ) | f::bit(f::NET_CTRL_RX), true);
        let c = &r.control;
        let cases: [(Result<()>, &str); 4] = [
            (c.vlan_add(5), "VIRTIO_NET_F_CTRL_VLAN"),
            (c.set_mac_addr([2, 0, 0, 0, 0, 1]), "VIRTIO_NET_F_CTRL_MAC_ADDR"),
            (c.set_queue_pairs(2), "VIRTIO_NET_F_MQ"),
            (c.set_guest_offloads(0), "VIRTIO_NET_F_CTRL_GUEST_OFFLOADS"),
        ];
        for (res, name) in cases {
            match res {
                Err(Error::Unsupported { feature, .. }) => assert_eq!(feature, name),
                other => panic!("{name}: {other:?}"),
            }
        }
        c.set_promisc(true).unwrap();
        // Without the control queue at all, even CTRL_RX commands are unsupported.
        let p = ControlParams {
            device: "none".into(),
            features: 0,
            virtio_user: true,
            timeout: Duration::from_millis(10),
            pairs: 1,
            active_pairs: 1,
        };
        let none = Control::new(p, None);
        let e = none.set_promisc(true).unwrap_err();
        assert!(matches!(e, Error::Unsupported { bit: f::NET_CTRL_VQ, .. }), "{e}");
        assert!(e.to_string().contains("VIRTIO_NET_F_CTRL_VQ"), "{e}");
    }

    #[test]
    fn acks_other_than_ok_are_errors() {
        let r = rig_with(all(), false);
        let c = &r.control;
        *r.answer.lock().unwrap() = Answer::Err;
        assert!(matches!(
            c.set_promisc(true),
            Err(Error::ControlRefused { command: "VIRTIO_NET_CTRL_RX_PROMISC" })
        ));
        *r.answer.lock().unwrap() = Answer::Garbage;
        assert!(matches!(c.vlan_add(1), Err(Error::ControlBadAck { ack: 7, .. })));
        *r.answer.lock().unwrap() = Answer::NoWrite;
        assert!(matches!(c.vlan_add(1), Err(Error::ControlBadAck { ack: 0xff, .. })));
        // A refused VQ_PAIRS_SET leaves the pair count as it was.
        *r.answer.lock().unwrap() = Answer::Err;
        assert!(c.set_queue_pairs(2).is_err());
        assert_eq!(c.queue_pairs(), 1);
        *r.answer.lock().unwrap() = Answer::Ok;
        c.set_queue_pairs(2).unwrap();
        assert_eq!(c.queue_pairs(), 2);
    }

    #[test]
    fn a_silent_device_times_out_and_a_late_answer_heals_the_queue() {
        // virtio-user, never answered: the back-end does not serve the control queue.
        let r = rig_with(all(), true);
        let c = &r.control;
        *r.answer.lock().unwrap() = Answer::Silent;
        let t = Instant::now();
        let e = c.set_promisc(true).unwrap_err();
        assert!(matches!(e, Error::ControlNotServed { .. }), "{e}");
        assert!(e.to_string().contains("does not serve the control virtqueue"), "{e}");
        assert!(t.elapsed() >= Duration::from_millis(100) && t.elapsed() < Duration::from_secs(5));
        // The command is still posted: the next one fails at once, without waiting.
        let t = Instant::now();
        assert!(matches!(c.set_promisc(false), Err(Error::ControlNotServed { waited_ms: 0, .. })));
        assert!(t.elapsed() < Duration::from_millis(50));
        // The device answers (late) before the next command: the queue works again.
        *r.answer.lock().unwrap() = Answer::Ok;
        std::thread::sleep(Duration::from_millis(50));
        c.set_allmulti(true).unwrap();
        // Once answered, a later silence is a timeout, not "not served".
        *r.answer.lock().unwrap() = Answer::Silent;
        assert!(matches!(c.vlan_add(3), Err(Error::ControlTimeout { .. })));
    }

    #[test]
    fn xdp_switches_merging_offloads_off_and_back() {
        let r = rig_with(all(), true);
        let c = &r.control;
        let negotiated = f::bit(f::NET_GUEST_CSUM) | f::bit(f::NET_GUEST_TSO4) | f::bit(f::NET_GUEST_TSO6);
        assert_eq!(c.guest_offloads(), negotiated);
        c.xdp_attach().unwrap();
        let (class, cmd, data, _) = r.seen.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!((class, cmd, data), (5, 0, f::bit(f::NET_GUEST_CSUM).to_le_bytes().to_vec()));
        assert_eq!(c.guest_offloads(), f::bit(f::NET_GUEST_CSUM), "checksum offload stays on");
        // A second program: nothing to switch.
        c.xdp_attach().unwrap();
        assert!(r.seen.recv_timeout(Duration::from_millis(50)).is_err());
        // Asking for TSO while programs are attached is refused.
        assert!(c.set_guest_offloads(negotiated).is_err());
        c.xdp_detach().unwrap();
        assert!(r.seen.recv_timeout(Duration::from_millis(50)).is_err(), "one program is still attached");
        c.xdp_detach().unwrap();
        let (_, _, data, _) = r.seen.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(data, negotiated.to_le_bytes().to_vec(), "restored");
        assert_eq!(c.guest_offloads(), negotiated);
        // With the offloads switched off by the application, attach sends nothing.
        c.set_guest_offloads(f::bit(f::NET_GUEST_CSUM)).unwrap();
        r.seen.recv_timeout(Duration::from_secs(5)).unwrap();
        c.xdp_attach().unwrap();
        c.xdp_detach().unwrap();
        assert!(r.seen.recv_timeout(Duration::from_millis(50)).is_err());
    }

    #[test]
    fn xdp_attach_is_refused_when_offloads_cannot_be_switched() {
        let feats = all() & !f::bit(f::NET_CTRL_GUEST_OFFLOADS);
        let r = rig_with(feats, true);
        let e = r.control.xdp_attach().unwrap_err();
        assert!(matches!(e, Error::XdpOffloads { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("VIRTIO_NET_F_GUEST_TSO4") && msg.contains("VIRTIO_NET_F_CTRL_GUEST_OFFLOADS"),
            "{msg}"
        );
        assert_eq!(r.control.xdp_programs(), 0);
        // Checksum offload alone does not stop a program.
        let r = rig_with(f::bit(f::NET_CTRL_VQ) | f::bit(f::NET_GUEST_CSUM), true);
        r.control.xdp_attach().unwrap();
    }

    #[test]
    fn a_closed_port_sends_nothing() {
        let r = rig_with(all(), true);
        r.control.close();
        assert!(matches!(r.control.set_promisc(true), Err(Error::PortClosed(_))));
        assert!(r.seen.recv_timeout(Duration::from_millis(50)).is_err());
    }
}
