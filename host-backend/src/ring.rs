//! The seam between the ports and the two ring engines: the operations a burst uses on
//! a device ring ([`Ring`], implemented by the split engine's [`DeviceRing`], virtio 1.2
//! §2.7, and the packed engine's [`PackedRing`], §2.8), and the ring a worker holds
//! ([`AnyRing`]).
//!
//! Owns: that trait, the enum, and the publication of two rings with one fence
//! ([`publish_used_pair`]). Must not: touch ring memory itself (each engine does, with
//! its own orderings) or be dispatched per packet: a port's burst is generic over
//! [`Ring`] and the engine is chosen once per burst (`port::PortPath::run`), so each
//! burst is compiled once per engine and every call below is inlined.

use std::sync::atomic::{fence, Ordering};

use crate::memory::GuestMemory;
use crate::packed_ring::{PackedHead, PackedRing, UsedStep};
use crate::split_ring::{Chain, DeviceRing, Dir, RingFault};

/// What a port's burst does with a device ring (see each engine for the protocol):
/// [`poll_avail`](Ring::poll_avail), [`walk_avail`](Ring::walk_avail) of the `i`-th
/// available chain, [`add_used`](Ring::add_used), [`consume`](Ring::consume), one
/// [`publish_used`](Ring::publish_used) (or [`publish_used_pair`]).
pub(crate) trait Ring {
    /// What a walk hands back for `add_used` (the split ring's head index; the packed
    /// ring's buffer id and extent).
    type Head: Copy;
    /// What the first half of a publication hands its second half.
    type Step: Copy;
    /// How many available chains the burst may walk.
    fn poll_avail(&mut self) -> Result<u16, RingFault>;
    /// [`poll_avail`](Ring::poll_avail) when the burst needs at most `max` chains (it may
    /// return more: the split ring counts them all with one load).
    fn poll_avail_max(&mut self, max: u16) -> Result<u16, RingFault>;
    /// Every available chain this burst may walk, when the burst meets a frame that
    /// needs more receive chains than it polled for (mergeable receive buffers): the
    /// split ring counts them all again, the packed ring looks past what it found (up to
    /// its burst limit) without starting a new burst. Never fewer than before.
    fn poll_more(&mut self) -> Result<u16, RingFault>;
    /// Entries (descriptors) in the ring: a frame that needs more chains than a full
    /// ring can show can never be delivered.
    fn size(&self) -> u16;
    /// Ring descriptors the first `chains` available chains occupy (an indirect table
    /// counts as its one descriptor), at most [`size`](Ring::size): when they fill the
    /// ring the driver can post nothing more until the device uses some. Out of line: only
    /// a frame that found too few receive chains asks (`port::mrg`).
    fn avail_slots(&mut self, chains: u16) -> u16;
    /// Whether [`direct`](Ring::direct) can find anything: a forwarding burst compiles
    /// its loop for plain frames only for rings where it can.
    const DIRECT: bool;
    /// The `i`-th available chain when it is one plain buffer of direction `dir`, lying
    /// whole in guest memory: its host address, length and head; `None` for anything
    /// else (walk it). Checks as [`walk_avail`](Ring::walk_avail) does for that case.
    fn direct(&mut self, mem: &GuestMemory, i: u16, dir: Dir) -> Option<(*mut u8, u32, Self::Head)>;
    /// Walks the `i`-th available chain into `out`.
    fn walk_avail<'m>(
        &mut self,
        mem: &'m GuestMemory,
        i: u16,
        dir: Dir,
        out: &mut Chain<'m>,
    ) -> Result<Self::Head, RingFault>;
    /// Completes a walked chain with `len` bytes written (not yet visible).
    fn add_used(&mut self, head: Self::Head, len: u32);
    /// Marks the first `n` available chains consumed.
    fn consume(&mut self, n: u16);
    /// Publishes what `add_used` wrote and makes the burst's call decision.
    fn publish_used(&mut self) -> bool;
    /// First half of a publication (before the caller's fence): `None` if nothing needs
    /// a call decision.
    fn publish_begin(&mut self) -> Option<Self::Step>;
    /// Second half, after a `SeqCst` fence: the call decision.
    fn publish_end(&mut self, step: Self::Step) -> bool;
    /// Asks for the first `lines` lines of the `i`-th available chain's buffer writable.
    fn prefetch_write(&mut self, i: u16, lines: usize);
    /// Asks for the first `lines` lines of the `i`-th available chain's buffer (to read).
    fn prefetch_read(&mut self, i: u16, lines: usize);
    /// This engine's ring inside `any`, if it is one.
    fn get(any: &mut AnyRing) -> Option<&mut Self>;
}

impl Ring for DeviceRing {
    type Head = u16;
    type Step = (u16, u16);
    #[inline(always)]
    fn poll_avail(&mut self) -> Result<u16, RingFault> {
        DeviceRing::poll_avail(self)
    }
    #[inline(always)]
    fn poll_avail_max(&mut self, _max: u16) -> Result<u16, RingFault> {
        DeviceRing::poll_avail(self)
    }
    #[inline]
    fn poll_more(&mut self) -> Result<u16, RingFault> {
        DeviceRing::poll_avail(self)
    }
    #[inline]
    fn size(&self) -> u16 {
        DeviceRing::size(self)
    }
    fn avail_slots(&mut self, chains: u16) -> u16 {
        DeviceRing::avail_slots(self, chains)
    }
    // The split engine's forwarding bursts walk every chain (not built for it).
    const DIRECT: bool = false;
    #[inline(always)]
    fn direct(&mut self, _mem: &GuestMemory, _i: u16, _dir: Dir) -> Option<(*mut u8, u32, u16)> {
        None
    }
    #[inline(always)]
    fn walk_avail<'m>(
        &mut self,
        mem: &'m GuestMemory,
        i: u16,
        dir: Dir,
        out: &mut Chain<'m>,
    ) -> Result<u16, RingFault> {
        DeviceRing::walk_avail(self, mem, i, dir, out)
    }
    #[inline(always)]
    fn add_used(&mut self, head: u16, len: u32) {
        DeviceRing::add_used(self, head, len)
    }
    #[inline(always)]
    fn consume(&mut self, n: u16) {
        DeviceRing::consume(self, n)
    }
    #[inline(always)]
    fn publish_used(&mut self) -> bool {
        DeviceRing::publish_used(self)
    }
    #[inline(always)]
    fn publish_begin(&mut self) -> Option<(u16, u16)> {
        self.publish_begin()
    }
    #[inline(always)]
    fn publish_end(&mut self, step: (u16, u16)) -> bool {
        self.notify_after_fence(step.0, step.1)
    }
    #[inline(always)]
    fn prefetch_write(&mut self, i: u16, lines: usize) {
        DeviceRing::prefetch_write(self, i, lines)
    }
    #[inline(always)]
    fn prefetch_read(&mut self, i: u16, lines: usize) {
        DeviceRing::prefetch_read(self, i, lines)
    }
    #[inline(always)]
    fn get(any: &mut AnyRing) -> Option<&mut Self> {
        match any {
            AnyRing::Split(r) => Some(r),
            AnyRing::Packed(_) => None,
        }
    }
}

impl Ring for PackedRing {
    type Head = PackedHead;
    type Step = UsedStep;
    #[inline(always)]
    fn poll_avail(&mut self) -> Result<u16, RingFault> {
        PackedRing::poll_avail(self)
    }
    #[inline(always)]
    fn poll_avail_max(&mut self, max: u16) -> Result<u16, RingFault> {
        PackedRing::poll_avail_max(self, max)
    }
    #[inline]
    fn poll_more(&mut self) -> Result<u16, RingFault> {
        PackedRing::poll_more(self)
    }
    #[inline]
    fn size(&self) -> u16 {
        PackedRing::size(self)
    }
    fn avail_slots(&mut self, chains: u16) -> u16 {
        PackedRing::avail_slots(self, chains)
    }
    const DIRECT: bool = true;
    #[inline(always)]
    fn direct(&mut self, mem: &GuestMemory, i: u16, dir: Dir) -> Option<(*mut u8, u32, PackedHead)> {
        PackedRing::direct(self, mem, i, dir)
    }
    #[inline(always)]
    fn walk_avail<'m>(
        &mut self,
        mem: &'m GuestMemory,
        i: u16,
        dir: Dir,
        out: &mut Chain<'m>,
    ) -> Result<PackedHead, RingFault> {
        PackedRing::walk_avail(self, mem, i, dir, out)
    }
    #[inline(always)]
    fn add_used(&mut self, head: PackedHead, len: u32) {
        PackedRing::add_used(self, head, len)
    }
    #[inline(always)]
    fn consume(&mut self, n: u16) {
        PackedRing::consume(self, n)
    }
    #[inline(always)]
    fn publish_used(&mut self) -> bool {
        PackedRing::publish_used(self)
    }
    #[inline(always)]
    fn publish_begin(&mut self) -> Option<UsedStep> {
        PackedRing::publish_begin(self)
    }
    #[inline(always)]
    fn publish_end(&mut self, step: UsedStep) -> bool {
        PackedRing::publish_end(self, step)
    }
    #[inline(always)]
    fn prefetch_write(&mut self, i: u16, lines: usize) {
        PackedRing::prefetch_write(self, i, lines)
    }
    #[inline(always)]
    fn prefetch_read(&mut self, i: u16, lines: usize) {
        PackedRing::prefetch_read(self, i, lines)
    }
    #[inline(always)]
    fn get(any: &mut AnyRing) -> Option<&mut Self> {
        match any {
            AnyRing::Packed(r) => Some(&mut **r),
            AnyRing::Split(_) => None,
        }
    }
}

/// [`Ring::publish_used`] for two rings at once (a forwarding burst's source and
/// destination), with one fence between both publications and both call decisions
/// instead of one per ring. Returns whether each called.
///
/// Why: the fence waits until the publishing store owns its line, which the driver
/// polls from the other core; two publishes in a row wait for two such transfers one
/// after the other, one fence for both lets them overlap. (See
/// `host-backend/bench/results/HISTORY.md` for what could be measured.)
#[inline]
pub(crate) fn publish_used_pair<A: Ring, B: Ring>(a: &mut A, b: &mut B) -> (bool, bool) {
    let pa = a.publish_begin();
    let pb = b.publish_begin();
    if pa.is_none() && pb.is_none() {
        return (false, false);
    }
    // Both publications → both call-decision loads: a full fence, as in each engine.
    fence(Ordering::SeqCst);
    let ca = pa.is_some_and(|s| a.publish_end(s));
    let cb = pb.is_some_and(|s| b.publish_end(s));
    (ca, cb)
}

/// The ring of an active queue: split or packed, as `VIRTIO_F_RING_PACKED` was
/// negotiated for the device.
#[allow(
    clippy::large_enum_variant,
    reason = "the split ring stays inline: boxing it would add a load to every split burst"
)]
pub(crate) enum AnyRing {
    /// A split ring (§2.7).
    Split(DeviceRing),
    /// A packed ring (§2.8), boxed: its burst bookkeeping would otherwise make every
    /// split ring's slot as large.
    Packed(Box<PackedRing>),
}

impl AnyRing {
    /// Where the ring resumes (what `GET_VRING_BASE` reports).
    pub fn last_avail(&self) -> u16 {
        match self {
            AnyRing::Split(r) => r.last_avail(),
            AnyRing::Packed(r) => r.last_avail(),
        }
    }
    /// Enables or suppresses kicks; when enabling, whether work arrived meanwhile.
    pub fn set_kicks(&mut self, enable: bool) -> bool {
        match self {
            AnyRing::Split(r) => r.set_kicks(enable),
            AnyRing::Packed(r) => r.set_kicks(enable),
        }
    }
    /// Whether this is a packed ring.
    #[inline(always)]
    pub fn is_packed(&self) -> bool {
        matches!(self, AnyRing::Packed(_))
    }
}
