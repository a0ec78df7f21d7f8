//! The control virtqueue itself: its ring, its one DMA buffer, and sending one command
//! with a bounded wait for the acknowledgement.
//!
//! Owns: [`ControlQueue`]: laying a command out as Linux does (header, data in one or two
//! parts, the ack byte preset to 0xff in its own cache line), posting it as one chain,
//! waiting for the device's answer with a timeout (spinning, then yielding, then
//! sleeping), a command that timed out staying posted until it completes, and stopping
//! the queue on a protocol violation. Must not: encode command data (`command.rs`),
//! check features or keep port state (`mod.rs`), or run on the data path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::command::Command;
use crate::dma::DmaArena;
use crate::error::{DeviceError, Error, Result};
use crate::layout::ctrl;
use crate::ring::{AnyRing, DriverRing, PackedRing, RingFeatures};

/// Entries in the control ring (one command of at most four descriptors in flight).
pub const CTRL_RING_SIZE: u16 = 16;
/// Bytes of the control queue's DMA buffer.
const BUF_SIZE: usize = 2048;
/// Offset of the ack byte in the buffer (its own cache line, away from the command).
const ACK_OFF: usize = BUF_SIZE - 64;
/// The ack value before the device writes one.
const NO_ACK: u8 = 0xff;

/// The control ring and its DMA buffer.
pub(crate) struct ControlQueue {
    pub(super) ring: AnyRing,
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
    /// What [`ControlQueue::new`] takes from the arena, in order (to size an arena), on a
    /// packed ring or a split one.
    pub(crate) fn allocations(packed: bool) -> [(usize, usize); 4] {
        let [d, a, u] = if packed {
            PackedRing::allocations(CTRL_RING_SIZE)
        } else {
            DriverRing::allocations(CTRL_RING_SIZE)
        };
        [d, a, u, (BUF_SIZE, 64)]
    }

    /// Carves the control ring (packed or split) and its buffer from `arena`.
    pub(crate) fn new(arena: &Arc<DmaArena>, features: RingFeatures, packed: bool) -> Result<ControlQueue> {
        let ring = if packed {
            AnyRing::Packed(PackedRing::new(arena, CTRL_RING_SIZE, features)?)
        } else {
            AnyRing::Split(DriverRing::new(arena, CTRL_RING_SIZE, features)?)
        };
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
    pub(crate) fn ring_mut(&mut self) -> &mut AnyRing {
        &mut self.ring
    }

    /// The device went away: the ring goes back to its initial state for the next one,
    /// a command left unanswered is forgotten (its buffer is ours again), and whether
    /// the device serves the queue is learnt again.
    pub(crate) fn reset_for_new_device(&mut self) {
        self.ring.drain_and_reset();
        self.pending = None;
        self.answered = false;
        self.broken = None;
    }

    /// The token of the next completed command, if one completed.
    fn reap(&mut self) -> std::result::Result<Option<u32>, DeviceError> {
        Ok(self.ring.pop_one()?.map(|(token, _)| token))
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
    pub(super) fn execute(
        &mut self,
        cmd: &Command,
        timeout: Duration,
        device: &str,
        virtio_user: bool,
    ) -> Result<()> {
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
        // Encode: header at 0, data from 2, ack at ACK_OFF (preset to "no answer"). The
        // command is built in a private copy and then copied into the DMA buffer: the
        // device can write that memory at any time, so no Rust reference is made to it.
        let mut buf = [0u8; BUF_SIZE];
        let (class, command) = cmd.class_cmd();
        buf[0] = class;
        buf[1] = command;
        let (len, split) = cmd.encode(&mut buf[ctrl::HDR_LEN..ACK_OFF])?;
        buf[ACK_OFF] = NO_ACK;
        // SAFETY: `self.buf` is BUF_SIZE bytes inside the arena, owned by this queue and
        // not posted (`pending` is None); `buf` is a local array, so the two never overlap.
        unsafe { std::ptr::copy_nonoverlapping(buf.as_ptr(), self.buf, BUF_SIZE) };
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
        // read after the acquire load of used.idx, or of the packed used descriptor's
        // flags, which orders its ack write before).
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
