//! The XDP-style hook of a receive queue: verdicts, programs, the output vectors, and
//! carrying out a verdict.
//!
//! Owns: [`XdpVerdict`], [`XdpProgram`], [`XdpOut`], the per-burst verdict counts, and
//! attaching and detaching a program on an [`RxQueue`] (with the geometry check and
//! the port-wide offload switch through [`Control`](crate::Control)). Must not: touch
//! the ring (the receive burst in `rx.rs` runs the program on frames it has taken) or
//! wait on a lock (the packets a program sends on are parked in [`XdpOut`]).
//!
//! What a program may do with a frame, where the packets it sends on go, and how
//! attaching switches the merging receive offloads off are described in the `queue`
//! module documentation (the public face of this hook).

use crate::error::{Error, Result};
use crate::layout::NET_HDR_LEN;
use crate::mempool::Packet;

use super::rx::{on_half, RxHalf, RxQueue};
use super::stats::{bump, RxStats};
use super::Recycle;
use crate::ring::Ring;

/// Headroom (pool headroom, the virtio-net header's 12 bytes included) a receive buffer
/// needs for an XDP program, as Linux's `VIRTIO_XDP_HEADROOM`.
pub const XDP_HEADROOM: usize = 256;
/// Redirect targets an XDP program may name (`XdpVerdict::Redirect(0..XDP_TARGETS)`).
pub const XDP_TARGETS: usize = 8;
/// Bytes of the Ethernet header a full frame adds to the MTU.
const ETH_HLEN: usize = 14;

/// What an XDP program decides for one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpVerdict {
    /// Deliver it through `rx_burst`.
    Pass,
    /// Recycle the buffer at once.
    Drop,
    /// Send it back out on the same queue pair (through [`XdpOut::tx`]).
    Tx,
    /// Send it out through the transmit queue the application maps this target to
    /// (through [`XdpOut::redirect`]; targets `0..XDP_TARGETS`).
    Redirect(u16),
}

/// A program run on every received frame of a queue (see the module documentation).
pub trait XdpProgram: Send {
    /// Looks at (and may rewrite, grow or shrink) one received frame.
    fn run(&mut self, pkt: &mut Packet) -> XdpVerdict;
}

impl<F: FnMut(&mut Packet) -> XdpVerdict + Send> XdpProgram for F {
    fn run(&mut self, pkt: &mut Packet) -> XdpVerdict {
        self(pkt)
    }
}

/// The packets an XDP program sent on: to be handed to `tx_burst` by the application.
/// The vectors are sized at attach (the ring size each) and never grow.
#[derive(Default)]
pub struct XdpOut {
    /// Answered [`XdpVerdict::Tx`]: for this queue pair's transmit half.
    pub tx: Vec<Packet>,
    /// Answered [`XdpVerdict::Redirect`]`(t)`, in `redirect[t]`.
    pub redirect: Vec<Vec<Packet>>,
}

impl XdpOut {
    /// Packets waiting.
    pub fn len(&self) -> usize {
        self.tx.len() + self.redirect.iter().map(Vec::len).sum::<usize>()
    }
    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Drops every waiting packet (buffers back to their pools).
    pub fn clear(&mut self) {
        crate::mempool::free_bulk(&mut self.tx);
        for r in self.redirect.iter_mut() {
            crate::mempool::free_bulk(r);
        }
    }
}

/// Verdict counts of one burst.
#[derive(Default)]
pub(super) struct Verdicts {
    pass: u64,
    drop: u64,
    tx: u64,
    redirect: u64,
    aborted: u64,
}

impl Verdicts {
    /// Adds this burst's counts to the queue's counters.
    pub(super) fn count(&self, rx: &RxStats) {
        bump(&rx.xdp_pass, self.pass);
        bump(&rx.xdp_drop, self.drop);
        bump(&rx.xdp_tx, self.tx);
        bump(&rx.xdp_redirect, self.redirect);
        bump(&rx.xdp_aborted, self.aborted);
    }
}

/// Runs `prog` on received frame `p` and carries out its verdict: returns the packet
/// when it passed, else parks it in `out` (Tx, Redirect) or recycles it (Drop, or an
/// abort: a super-frame (`gso`), a full output vector, a target out of range).
#[inline]
pub(super) fn run(
    prog: &mut dyn XdpProgram,
    out: &mut XdpOut,
    v: &mut Verdicts,
    rec: &mut Recycle<'_>,
    gso: bool,
    mut p: Packet,
) -> Option<Packet> {
    if gso {
        // Placed in the ring before the offloads were switched off: the
        // program sees single frames only.
        v.aborted += 1;
        rec.packet(p);
        return None;
    }
    match prog.run(&mut p) {
        XdpVerdict::Pass => {
            v.pass += 1;
            return Some(p);
        }
        XdpVerdict::Drop => {
            v.drop += 1;
            rec.packet(p);
        }
        XdpVerdict::Tx => {
            if out.tx.len() < out.tx.capacity() {
                out.tx.push(p);
                v.tx += 1;
            } else {
                v.aborted += 1;
                rec.packet(p);
            }
        }
        XdpVerdict::Redirect(t) => match out.redirect.get_mut(t as usize) {
            Some(q) if q.len() < q.capacity() => {
                q.push(p);
                v.redirect += 1;
            }
            _ => {
                v.aborted += 1;
                rec.packet(p);
            }
        },
    }
    None
}

impl<R: Ring> RxHalf<R> {
    /// Attaches an XDP program (replacing the one attached, if any). The first program
    /// of the port switches the merging receive offloads off (see the module
    /// documentation); fails with [`Error::XdpGeometry`] when a full frame and
    /// [`XDP_HEADROOM`] do not fit a buffer, with [`Error::XdpOffloads`] when the
    /// offloads cannot be switched off, or with the control command's error.
    fn attach_xdp(&mut self, prog: Box<dyn XdpProgram>) -> Result<()> {
        let headroom = self.headroom as usize;
        let frame_room = self.post_len as usize - NET_HDR_LEN;
        let frame = self.mtu as usize + ETH_HLEN;
        if headroom < XDP_HEADROOM || frame_room < frame {
            return Err(Error::XdpGeometry {
                mtu: self.mtu,
                frame,
                headroom,
                need: XDP_HEADROOM,
                room: headroom + frame_room,
            });
        }
        if self.xdp.is_none() {
            self.control.xdp_attach()?;
            let cap = self.ring.size() as usize;
            if self.xdp_out.tx.capacity() < cap {
                self.xdp_out.tx.reserve_exact(cap - self.xdp_out.tx.len());
            }
            while self.xdp_out.redirect.len() < XDP_TARGETS {
                self.xdp_out.redirect.push(Vec::with_capacity(cap));
            }
        }
        self.xdp = Some(prog);
        Ok(())
    }

    /// Detaches the XDP program, if any: frames are delivered by `rx_burst` again from
    /// the next burst on. The last program of the port restores the receive offloads;
    /// if the device refuses, the program is detached anyway and the error returned.
    /// Packets waiting in [`xdp_out`](Self::xdp_out) stay there for the caller.
    fn detach_xdp(&mut self) -> Result<()> {
        if self.xdp.take().is_none() {
            return Ok(());
        }
        self.control.xdp_detach()
    }

    /// Whether an XDP program is attached.
    fn xdp_attached(&self) -> bool {
        self.xdp.is_some()
    }

    /// The packets the XDP program sent on, waiting for the application to pass them to
    /// `tx_burst` (see the module documentation).
    fn xdp_out(&mut self) -> &mut XdpOut {
        &mut self.xdp_out
    }
}

impl RxQueue {
    /// Attaches an XDP program (replacing the one attached, if any). The first program
    /// of the port switches the merging receive offloads off (see the module
    /// documentation); fails with [`Error::XdpGeometry`] when a full frame and
    /// [`XDP_HEADROOM`] do not fit a buffer, with [`Error::XdpOffloads`] when the
    /// offloads cannot be switched off, or with the control command's error.
    pub fn attach_xdp(&mut self, prog: Box<dyn XdpProgram>) -> Result<()> {
        on_half!(self.half(), h => h.attach_xdp(prog))
    }

    /// Detaches the XDP program, if any: frames are delivered by `rx_burst` again from
    /// the next burst on. The last program of the port restores the receive offloads;
    /// if the device refuses, the program is detached anyway and the error returned.
    /// Packets waiting in [`xdp_out`](Self::xdp_out) stay there for the caller.
    pub fn detach_xdp(&mut self) -> Result<()> {
        on_half!(self.half(), h => h.detach_xdp())
    }

    /// Whether an XDP program is attached.
    pub fn xdp_attached(&self) -> bool {
        on_half!(self.half_ref(), h => h.xdp_attached())
    }

    /// The packets the XDP program sent on, waiting for the application to pass them to
    /// `tx_burst` (see the module documentation).
    pub fn xdp_out(&mut self) -> &mut XdpOut {
        on_half!(self.half(), h => h.xdp_out())
    }
}
