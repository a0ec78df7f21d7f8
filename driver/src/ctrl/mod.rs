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
//!
//! One job per file: `command.rs` ([`Command`] and its encoding), `queue.rs` (the control
//! ring, its buffer and the bounded wait for an ack); this file holds the [`Control`]
//! handle and the port-wide state behind its mutex.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::layout::features as f;

mod command;
mod queue;

#[cfg(test)]
mod packed_tests;
#[cfg(test)]
mod tests;

pub use command::{Command, MAC_TABLE_MAX};
pub(crate) use queue::ControlQueue;
pub use queue::CTRL_RING_SIZE;

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

/// A MAC table as last set: unicast and multicast addresses.
type MacTable = (Vec<[u8; 6]>, Vec<[u8; 6]>);

struct State {
    queue: Option<ControlQueue>,
    closed: bool,
    /// The link is down (the device went away), with the reason: commands fail at once.
    down: Option<String>,
    /// What the application set, replayed on a new device after a reconnection
    /// ([`Control::replay`]); `None`: never set (the device's default).
    promisc: Option<bool>,
    allmulti: Option<bool>,
    mac: Option<[u8; 6]>,
    mac_table: Option<MacTable>,
    /// VLANs added and not deleted, in order.
    vlans: Vec<u16>,
    active_pairs: u16,
    /// The receive offloads the application wants (initially every negotiated one).
    wanted_offloads: u64,
    /// The receive offloads the device uses now.
    offloads: u64,
    /// Receive queues with an XDP program attached.
    xdp_programs: u32,
    /// Commands sent and their results (for statistics).
    counts: ControlCounts,
}

/// How the commands sent on a port's control queue ended (the device's answers).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ControlCounts {
    /// Acknowledged with `VIRTIO_NET_OK`.
    pub ok: u64,
    /// Answered with `VIRTIO_NET_ERR` (or any other status).
    pub refused: u64,
    /// Not answered in time (or the back-end does not serve the queue).
    pub timeout: u64,
    /// Anything else: a bad acknowledgement, no control queue, the port closed, or the
    /// ring failed.
    pub failed: u64,
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
            down: None,
            promisc: None,
            allmulti: None,
            mac: None,
            mac_table: None,
            vlans: Vec::new(),
            active_pairs: p.active_pairs,
            wanted_offloads: offloads,
            offloads,
            xdp_programs: 0,
            counts: ControlCounts::default(),
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
    /// How the commands sent so far ended.
    pub fn counts(&self) -> ControlCounts {
        self.lock().counts
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

    /// Sends `cmd` with the state locked and counts how it ended.
    fn send(&self, s: &mut State, cmd: &Command) -> Result<()> {
        let r = self.send_uncounted(s, cmd);
        let c = &mut s.counts;
        match &r {
            Ok(()) => c.ok += 1,
            Err(Error::ControlRefused { .. }) => c.refused += 1,
            Err(Error::ControlTimeout { .. } | Error::ControlNotServed { .. }) => c.timeout += 1,
            Err(_) => c.failed += 1,
        }
        r
    }

    fn send_uncounted(&self, s: &mut State, cmd: &Command) -> Result<()> {
        if s.closed {
            return Err(Error::PortClosed(self.shared.p.device.clone()));
        }
        if let Some(reason) = &s.down {
            return Err(Error::LinkDown { device: self.shared.p.device.clone(), reason: reason.clone() });
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
        self.run(Command::Promisc(on))?;
        self.lock().promisc = Some(on);
        Ok(())
    }

    /// All-multicast mode on or off (`VIRTIO_NET_F_CTRL_RX`).
    pub fn set_allmulti(&self, on: bool) -> Result<()> {
        self.run(Command::AllMulti(on))?;
        self.lock().allmulti = Some(on);
        Ok(())
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
        self.run(Command::MacTable { unicast, multicast })?;
        self.lock().mac_table = Some((unicast.to_vec(), multicast.to_vec()));
        Ok(())
    }

    /// The device's own MAC address (`VIRTIO_NET_F_CTRL_MAC_ADDR`).
    pub fn set_mac_addr(&self, mac: [u8; 6]) -> Result<()> {
        if mac[0] & 1 != 0 {
            return Err(Error::Config(format!("{mac:02x?} is a multicast address")));
        }
        self.run(Command::MacAddr(mac))?;
        self.lock().mac = Some(mac);
        Ok(())
    }

    /// Accepts frames of VLAN `vid` (0..=4095; `VIRTIO_NET_F_CTRL_VLAN`).
    pub fn vlan_add(&self, vid: u16) -> Result<()> {
        check_vid(vid)?;
        self.run(Command::VlanAdd(vid))?;
        let mut s = self.lock();
        if !s.vlans.contains(&vid) {
            s.vlans.push(vid);
        }
        Ok(())
    }

    /// Stops accepting frames of VLAN `vid` (`VIRTIO_NET_F_CTRL_VLAN`).
    pub fn vlan_del(&self, vid: u16) -> Result<()> {
        check_vid(vid)?;
        self.run(Command::VlanDel(vid))?;
        self.lock().vlans.retain(|v| *v != vid);
        Ok(())
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

    /// The device went away (`reason`): commands fail at once with
    /// [`Error::LinkDown`] until [`replay`](Self::replay); the control ring is put back
    /// in its initial state for the next device (a command left unanswered is
    /// forgotten: the old device is gone). Control path (the port's supervisor).
    pub(crate) fn device_gone(&self, reason: &str) {
        let mut s = self.lock();
        s.down = Some(reason.to_string());
        if let Some(q) = s.queue.as_mut() {
            q.reset_for_new_device();
        }
    }

    /// The port is on a new device, started: commands go out again, and what the
    /// application had set is sent to it, in the order a fresh port would: the MAC, the
    /// receive modes, the MAC table, the VLANs, the queue pairs in use and the receive
    /// offloads. Stops at the first command that gets no answer (a back-end that does
    /// not serve the control queue, as DPDK's `net_vhost`: the pairs in use are then
    /// the rings enabled over vhost-user). Returns how many commands were sent and the
    /// first error, if any.
    pub(crate) fn replay(&self) -> (u32, Option<Error>) {
        let mut s = self.lock();
        s.down = None;
        if s.queue.is_none() || s.closed {
            return (0, None);
        }
        let p = &self.shared.p;
        let mut cmds: Vec<Command<'_>> = Vec::new();
        // Owned copies: the commands borrow them while the state is locked.
        let (mac, promisc, allmulti, table, vlans) =
            (s.mac, s.promisc, s.allmulti, s.mac_table.clone(), s.vlans.clone());
        if let Some(m) = mac {
            cmds.push(Command::MacAddr(m));
        }
        if let Some(on) = promisc {
            cmds.push(Command::Promisc(on));
        }
        if let Some(on) = allmulti {
            cmds.push(Command::AllMulti(on));
        }
        if let Some((u, m)) = &table {
            cmds.push(Command::MacTable { unicast: u, multicast: m });
        }
        cmds.extend(vlans.iter().map(|v| Command::VlanAdd(*v)));
        if p.features & f::bit(f::NET_MQ) != 0 && p.pairs > 1 {
            cmds.push(Command::QueuePairs(s.active_pairs));
        }
        if s.offloads != p.features & f::GUEST_OFFLOADS {
            cmds.push(Command::GuestOffloads(s.offloads));
        }
        let mut sent = 0;
        for c in &cmds {
            if p.features & f::bit(c.feature()) == 0 {
                continue;
            }
            sent += 1;
            if let Err(e) = self.send(&mut s, c) {
                return (sent, Some(e));
            }
        }
        (sent, None)
    }
}

fn check_vid(vid: u16) -> Result<()> {
    if vid > 4095 {
        return Err(Error::Config(format!("VLAN id {vid} is out of range 0..=4095")));
    }
    Ok(())
}
