//! What the queues see of a ring, whichever layout it has: the [`Ring`] trait the data
//! path is generic over (monomorphized per layout, so the split path compiles as before)
//! and [`AnyRing`], the layout chosen at open (virtio 1.2 §2.7 split, §2.8 packed).
//!
//! Owns: the trait, its two implementations (each forwarding to the layout's own
//! methods), and `AnyRing`'s per-call dispatch for the control path and setup. Must not:
//! touch ring memory or keep state (each layout's module does), or be matched per packet
//! (the queues match an `AnyRing` once per burst and run generic code on the layout).

use super::packed::PackedRing;
use super::{DriverRing, PostSource, RingAddrs, TokenSink, UsedSink};
use crate::error::DeviceError;
use crate::transport::Notifier;

/// A driver-side ring as the queues use it. The used side is polled with
/// [`poll_used`](Ring::poll_used), which may over-estimate (packed rings); the `pop_*`
/// calls return how many buffers they actually took.
pub trait Ring {
    /// Ring size.
    fn size(&self) -> u16;
    /// Free descriptors.
    fn free_count(&self) -> u16;
    /// Buffers the device holds.
    fn in_flight(&self) -> u16;
    /// Posts one buffer; see [`DriverRing::post`].
    fn post(&mut self, addr: u64, len: u32, device_writes: bool, token: Option<u32>) -> Option<u16>;
    /// Posts one buffer of several parts as a descriptor chain whose token is its head's
    /// id or'd with `tag`; see [`DriverRing::post_chain_id`].
    fn post_chain_id(&mut self, parts: &[(u64, u32, bool)], tag: u32) -> Option<u16>;
    /// Posts a burst of buffers; see [`DriverRing::post_burst`].
    fn post_burst(&mut self, n: u16, device_writes: bool, src: &mut impl PostSource) -> u16;
    /// Publishes and makes the kick decision; see [`DriverRing::publish`].
    fn publish(&mut self) -> bool;
    /// How many used buffers there may be (exact for split rings, an upper bound for
    /// packed ones), or the device error found.
    fn poll_used(&self) -> Result<u16, DeviceError>;
    /// How many of `n` polled buffers a receive burst should take.
    fn rx_take(&self, n: u16) -> u16;
    /// How many of `n` free descriptors a receive refill should post (0: wait for more).
    fn refill_take(&self, n: u16) -> u16;
    /// The next used buffer `(token, len)`, `None` if not used yet (call within what
    /// `poll_used` allowed).
    fn pop_one(&mut self) -> Result<Option<(u32, u32)>, DeviceError>;
    /// Takes up to `n` used buffers into `sink`; see [`DriverRing::pop_used_burst`].
    fn pop_used_burst(&mut self, n: u16, sink: &mut impl UsedSink) -> Result<u16, (u16, DeviceError)>;
    /// Takes up to `n` used buffers' tokens into `sink`; see
    /// [`DriverRing::pop_used_tokens`].
    fn pop_used_tokens(&mut self, n: u16, sink: &mut impl TokenSink) -> Result<u16, (u16, DeviceError)>;
    /// Tokens of every buffer still in flight (at close, after the device reset).
    fn drain_in_flight(&mut self) -> Vec<u32>;
    /// Back to the initial state for a new device, once drained; see
    /// [`DriverRing::reset`].
    fn reset(&mut self);
}

impl Ring for DriverRing {
    #[inline(always)]
    fn size(&self) -> u16 {
        DriverRing::size(self)
    }
    #[inline(always)]
    fn free_count(&self) -> u16 {
        DriverRing::free_count(self)
    }
    #[inline(always)]
    fn in_flight(&self) -> u16 {
        DriverRing::in_flight(self)
    }
    #[inline(always)]
    fn post(&mut self, addr: u64, len: u32, device_writes: bool, token: Option<u32>) -> Option<u16> {
        DriverRing::post(self, addr, len, device_writes, token)
    }
    fn post_chain_id(&mut self, parts: &[(u64, u32, bool)], tag: u32) -> Option<u16> {
        DriverRing::post_chain_id(self, parts, tag)
    }
    #[inline(always)]
    fn post_burst(&mut self, n: u16, device_writes: bool, src: &mut impl PostSource) -> u16 {
        DriverRing::post_burst(self, n, device_writes, src)
    }
    #[inline(always)]
    fn publish(&mut self) -> bool {
        DriverRing::publish(self)
    }
    #[inline(always)]
    fn poll_used(&self) -> Result<u16, DeviceError> {
        DriverRing::poll_used(self)
    }
    #[inline(always)]
    fn rx_take(&self, n: u16) -> u16 {
        self.line_aligned(n)
    }
    #[inline(always)]
    fn refill_take(&self, n: u16) -> u16 {
        n
    }
    #[inline(always)]
    fn pop_one(&mut self) -> Result<Option<(u32, u32)>, DeviceError> {
        self.pop_used().map(Some)
    }
    #[inline(always)]
    fn pop_used_burst(&mut self, n: u16, sink: &mut impl UsedSink) -> Result<u16, (u16, DeviceError)> {
        DriverRing::pop_used_burst(self, n, sink)
    }
    #[inline(always)]
    fn pop_used_tokens(&mut self, n: u16, sink: &mut impl TokenSink) -> Result<u16, (u16, DeviceError)> {
        DriverRing::pop_used_tokens(self, n, sink)
    }
    fn drain_in_flight(&mut self) -> Vec<u32> {
        DriverRing::drain_in_flight(self).collect()
    }
    fn reset(&mut self) {
        DriverRing::reset(self)
    }
}

impl Ring for PackedRing {
    #[inline(always)]
    fn size(&self) -> u16 {
        PackedRing::size(self)
    }
    #[inline(always)]
    fn free_count(&self) -> u16 {
        PackedRing::free_count(self)
    }
    #[inline(always)]
    fn in_flight(&self) -> u16 {
        PackedRing::in_flight(self)
    }
    #[inline(always)]
    fn post(&mut self, addr: u64, len: u32, device_writes: bool, token: Option<u32>) -> Option<u16> {
        PackedRing::post(self, addr, len, device_writes, token)
    }
    fn post_chain_id(&mut self, parts: &[(u64, u32, bool)], tag: u32) -> Option<u16> {
        PackedRing::post_chain_id(self, parts, tag)
    }
    #[inline(always)]
    fn post_burst(&mut self, n: u16, device_writes: bool, src: &mut impl PostSource) -> u16 {
        PackedRing::post_burst(self, n, device_writes, src)
    }
    #[inline(always)]
    fn publish(&mut self) -> bool {
        PackedRing::publish(self)
    }
    #[inline(always)]
    fn poll_used(&self) -> Result<u16, DeviceError> {
        PackedRing::poll_used(self)
    }
    #[inline(always)]
    fn rx_take(&self, n: u16) -> u16 {
        n
    }
    #[inline(always)]
    fn refill_take(&self, n: u16) -> u16 {
        self.line_aligned_post(n)
    }
    #[inline(always)]
    fn pop_one(&mut self) -> Result<Option<(u32, u32)>, DeviceError> {
        self.pop_used()
    }
    #[inline(always)]
    fn pop_used_burst(&mut self, n: u16, sink: &mut impl UsedSink) -> Result<u16, (u16, DeviceError)> {
        PackedRing::pop_used_burst(self, n, sink)
    }
    #[inline(always)]
    fn pop_used_tokens(&mut self, n: u16, sink: &mut impl TokenSink) -> Result<u16, (u16, DeviceError)> {
        PackedRing::pop_used_tokens(self, n, sink)
    }
    fn drain_in_flight(&mut self) -> Vec<u32> {
        PackedRing::drain_in_flight(self).collect()
    }
    fn reset(&mut self) {
        PackedRing::reset(self)
    }
}

/// A ring of the layout negotiated at open.
pub enum AnyRing {
    /// Split virtqueue (§2.7).
    Split(DriverRing),
    /// Packed virtqueue (§2.8, `VIRTIO_F_RING_PACKED`).
    Packed(PackedRing),
}

impl From<DriverRing> for AnyRing {
    fn from(r: DriverRing) -> Self {
        AnyRing::Split(r)
    }
}

impl From<PackedRing> for AnyRing {
    fn from(r: PackedRing) -> Self {
        AnyRing::Packed(r)
    }
}

impl AnyRing {
    /// The ring's device addresses (for the transport).
    pub fn addrs(&self) -> RingAddrs {
        match self {
            AnyRing::Split(r) => r.addrs(),
            AnyRing::Packed(r) => r.addrs(),
        }
    }
    /// Sets how the ring kicks the device.
    pub fn set_notifier(&mut self, n: Notifier) {
        match self {
            AnyRing::Split(r) => r.set_notifier(n),
            AnyRing::Packed(r) => r.set_notifier(n),
        }
    }
    /// Whether this is a packed ring.
    pub fn is_packed(&self) -> bool {
        matches!(self, AnyRing::Packed(_))
    }
    /// Posts a chain (control path); see [`DriverRing::post_chain`].
    pub fn post_chain(&mut self, parts: &[(u64, u32, bool)], token: u32) -> Option<u16> {
        match self {
            AnyRing::Split(r) => r.post_chain(parts, token),
            AnyRing::Packed(r) => r.post_chain(parts, token),
        }
    }
    /// Publishes (control path).
    pub fn publish(&mut self) -> bool {
        match self {
            AnyRing::Split(r) => r.publish(),
            AnyRing::Packed(r) => r.publish(),
        }
    }
    /// The next used buffer, if any (control path).
    pub fn pop_one(&mut self) -> Result<Option<(u32, u32)>, DeviceError> {
        match self {
            AnyRing::Split(r) => match r.poll_used()? {
                0 => Ok(None),
                _ => r.pop_used().map(Some),
            },
            AnyRing::Packed(r) => r.pop_used(),
        }
    }
    /// Forgets every buffer in flight and goes back to the initial state, for a new
    /// device (control path; see [`DriverRing::reset`]).
    pub fn drain_and_reset(&mut self) {
        match self {
            AnyRing::Split(r) => {
                r.drain_in_flight().for_each(drop);
                r.reset();
            }
            AnyRing::Packed(r) => {
                r.drain_in_flight().for_each(drop);
                r.reset();
            }
        }
    }
}
