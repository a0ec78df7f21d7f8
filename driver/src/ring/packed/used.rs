//! Taking used buffers off a packed ring (virtio 1.2 §2.8.1, §2.8.7, §2.8.21-§2.8.22).
//!
//! Owns: reading used descriptors in ring order (flags with `Acquire`, checked against
//! the used wrap counter; then id and length), validating each against what is in flight
//! (the id must name a buffer in flight, the length must fit what was posted unless only
//! tokens are asked for (transmit), an in-order
//! batch must end on a later buffer in flight), moving the used position and wrap counter
//! on by each buffer's descriptor count, and draining at close. Must not: write ring
//! memory, read a chain's shape from the ring (the counts are the driver's own), or index
//! anything with a device-written value before checking it.
//!
//! Only positions holding published, in-flight descriptors are read: each was written in
//! this lap with the avail flags of the used wrap counter (AVAIL = w, USED = !w), so the
//! device's flags word there is either that (not used yet), or the used flags of the same
//! counter (AVAIL = USED = w); anything else is a used descriptor written with the wrong
//! wrap counter, a [`DeviceError::UsedWrongWrap`].

use std::sync::atomic::{AtomicU16, Ordering};

use spec::packed as p;

use super::{PackedRing, NO_BATCH};
use crate::error::DeviceError;
use crate::ring::{TokenSink, UsedSink, NO_TOKEN};

impl PackedRing {
    /// Buffers the device may have used: those published and in flight, if the
    /// descriptor at the used position is marked used (one `Acquire` load), else 0. An
    /// upper bound: the `pop_*` calls stop at the first buffer not used yet, and return
    /// how many they took.
    #[inline]
    pub fn poll_used(&self) -> Result<u16, DeviceError> {
        let published = self.heads - self.unpublished;
        if published == 0 {
            return Ok(0);
        }
        if self.batch_id != NO_BATCH {
            return Ok(published);
        }
        Ok(if self.peek_flags()? { published } else { 0 })
    }

    /// Whether the descriptor at the used position is marked used; an error if its
    /// flags carry the wrong wrap counter. Only called while a published buffer is in
    /// flight (so that position holds one of its descriptors).
    #[inline(always)]
    fn peek_flags(&self) -> Result<bool, DeviceError> {
        // SAFETY: `next_used < size` (it moves only through `advance_used`). Acquire:
        // pairs with the device's release store of these flags after it wrote the id,
        // the length and the buffer.
        let f = u16::from_le(unsafe { self.flags_at(self.next_used) }.load(Ordering::Acquire));
        let state = f & (p::DESC_F_AVAIL | p::DESC_F_USED);
        if state == p::used_flags(self.used_wrap) {
            Ok(true)
        } else if state == p::avail_flags(self.used_wrap) {
            Ok(false)
        } else {
            Err(DeviceError::UsedWrongWrap { pos: self.next_used, flags: f })
        }
    }

    /// The `(id, len)` of the used descriptor at the used position (its flags were
    /// acquired by `peek_flags`).
    #[inline(always)]
    fn read_used(&self) -> (u16, u32) {
        // SAFETY: `next_used < size`: inside the ring, 16-aligned. Volatile: the device
        // wrote these before its release store of the flags we acquired.
        unsafe {
            let d = self.desc.add(self.next_used as usize * p::DESC_SIZE);
            let len = std::ptr::read_volatile(d.add(p::DESC_LEN) as *const u32);
            let id = std::ptr::read_volatile(d.add(p::DESC_ID) as *const u16);
            (u16::from_le(id), u32::from_le(len))
        }
    }

    /// Moves the used position past `n` descriptors (`n <= size`), flipping the used wrap
    /// counter at the ring's end.
    #[inline(always)]
    fn advance_used(&mut self, n: u16) {
        (self.next_used, self.used_wrap) = step(self.size, self.next_used, self.used_wrap, n);
    }

    /// Retires in-flight buffer `id` (checked by the caller) and returns its token.
    #[inline(always)]
    fn retire(&mut self, id: u16) -> u32 {
        let slot = &mut self.slots[id as usize];
        let (token, n) = (slot.token, slot.ndesc);
        slot.token = NO_TOKEN;
        if !self.in_order {
            self.free_ids[self.nfree_ids as usize] = id;
            self.nfree_ids += 1;
        }
        self.advance_used(n);
        self.free_slots += n;
        self.heads -= 1;
        token
    }

    /// Takes the next used buffer: `Ok(Some((token, len)))`, or `Ok(None)` if the device
    /// has not used it yet.
    #[inline(always)]
    pub fn pop_used(&mut self) -> Result<Option<(u32, u32)>, DeviceError> {
        self.pop_used_checked::<true>()
    }

    /// [`pop_used`](Self::pop_used), checking the used length against the posted one
    /// only if `CHECK_LEN`: a transmit queue's buffers are device-readable, the device
    /// writes nothing into them and the driver never uses the length, and DPDK's vhost
    /// leaves the field of an in-order batch's used descriptor as the driver wrote it
    /// (the length of the batch's FIRST buffer, while the id names its last).
    #[inline(always)]
    fn pop_used_checked<const CHECK_LEN: bool>(&mut self) -> Result<Option<(u32, u32)>, DeviceError> {
        if self.batch_id != NO_BATCH {
            return Ok(Some(self.batch_step()));
        }
        if self.heads == self.unpublished || !self.peek_flags()? {
            return Ok(None);
        }
        let (id, len) = self.read_used();
        if id >= self.size {
            return Err(DeviceError::UsedIdOutOfRange { id: id as u32 });
        }
        let slot = self.slots[id as usize];
        if slot.token == NO_TOKEN {
            return Err(DeviceError::UsedIdNotInFlight { id: id as u32 });
        }
        let posted = slot.len;
        if CHECK_LEN && len > posted {
            return Err(DeviceError::UsedLenTooLarge { len, posted });
        }
        let len = len.min(posted);
        if !self.in_order || id == self.next_used {
            return Ok(Some((self.retire(id), len)));
        }
        // In order, a used descriptor naming a later buffer ends a batch that starts
        // here (§2.8.21): `id` holds a token, so it is a buffer in flight, and in-order
        // buffers are in flight in ring order from the used position on, so walking them
        // reaches it.
        self.batch_id = id as u32;
        self.batch_len = len;
        Ok(Some(self.batch_step()))
    }

    /// Takes the next buffer of the batch being taken: the batch's last buffer gets the
    /// length the device wrote, the others their posted length (used whole).
    #[inline(always)]
    fn batch_step(&mut self) -> (u32, u32) {
        let head = self.next_used;
        let len = if head as u32 == self.batch_id {
            self.batch_id = NO_BATCH;
            self.batch_len
        } else if self.heads <= 1 {
            // Cannot happen (the batch's last buffer is in flight behind this one);
            // ends the batch rather than walk past what is in flight.
            self.batch_id = NO_BATCH;
            self.slots[head as usize].len
        } else {
            self.slots[head as usize].len
        };
        (self.retire(head), len)
    }

    /// Takes up to `n` used buffers in ring order, passing each to `sink`; stops at the
    /// first the device has not used. Returns how many it took, or the device error that
    /// stopped it (the buffers before it were passed to `sink`).
    #[inline(always)]
    pub fn pop_used_burst(&mut self, n: u16, sink: &mut impl UsedSink) -> Result<u16, (u16, DeviceError)> {
        let mut k = 0;
        if self.in_order && self.batch_id == NO_BATCH {
            k = self.pop_in_order_singles(n, sink)?;
        }
        while k < n {
            match self.pop_used() {
                Ok(Some((token, len))) => sink.used(token, len),
                Ok(None) => return Ok(k),
                Err(e) => return Err((k, e)),
            }
            k += 1;
        }
        Ok(n)
    }

    /// The start of [`pop_used_burst`](Self::pop_used_burst) on an in-order ring with no
    /// batch being taken: up to `max` used buffers that each have a used descriptor of
    /// their own (its id their position, as a device returns receive buffers), with the
    /// used position, the wrap counter and the counts in locals, written back once.
    /// Stops at the first buffer not used yet and at a used descriptor naming a later
    /// buffer (an in-order batch: `pop_used` takes it from there); the checks and the
    /// steps per buffer are `pop_used_checked`'s and `retire`'s. Returns how many it took,
    /// or the device error that stopped it (the buffers before it were passed to `sink`).
    ///
    /// Why a loop of its own: through `pop_used` every buffer loaded and stored the
    /// ring's positions and counts in memory and looked at the mode and the batch again
    /// (`host-backend/bench/callgrind.sh` fe-grx, per-instruction costs).
    #[inline(always)]
    fn pop_in_order_singles(
        &mut self,
        max: u16,
        sink: &mut impl UsedSink,
    ) -> Result<u16, (u16, DeviceError)> {
        debug_assert!(self.in_order && self.batch_id == NO_BATCH);
        let max = max.min(self.heads - self.unpublished);
        // The ring's fields the loop reads, in locals: the sink writes memory the
        // compiler cannot tell apart from `self`, which would reload them per buffer.
        let (size, desc, slots) = (self.size, self.desc, self.slots.as_mut_ptr());
        let (mut pos, mut wrap) = (self.next_used, self.used_wrap);
        // The two flags states a position in flight can hold in this lap (see the
        // module comment), flipped with the wrap counter.
        let (mut used, mut avail) = (p::used_flags(wrap), p::avail_flags(wrap));
        let (mut took, mut freed) = (0u16, 0u16);
        let mut failed = None;
        while took < max {
            let d = desc.wrapping_add(pos as usize * p::DESC_SIZE);
            // SAFETY: `pos < size` (moved on below as `step` does): `d` is a descriptor of
            // the ring, 16-aligned, its flags 2-aligned; atomics may alias device writes.
            // Acquire: as in `peek_flags`.
            let f = unsafe { AtomicU16::from_ptr(d.add(p::DESC_FLAGS) as *mut u16) }.load(Ordering::Acquire);
            let f = u16::from_le(f);
            let state = f & (p::DESC_F_AVAIL | p::DESC_F_USED);
            if state != used {
                if state != avail {
                    failed = Some(DeviceError::UsedWrongWrap { pos, flags: f });
                }
                break;
            }
            // SAFETY: `d` is a descriptor of the ring (above). Volatile: the device wrote
            // these before its release store of the flags we acquired.
            let (id, len) = unsafe {
                let len = std::ptr::read_volatile(d.add(p::DESC_LEN) as *const u32);
                let id = std::ptr::read_volatile(d.add(p::DESC_ID) as *const u16);
                (u16::from_le(id), u32::from_le(len))
            };
            if id != pos {
                break;
            }
            // SAFETY: `pos < size`, the length of `slots`; driver-private memory that
            // the sink does not touch.
            let slot = unsafe { &mut *slots.add(pos as usize) };
            // In order, the buffers in flight and published start at the used position
            // and follow each other, each with its position as id; fewer than those are
            // taken (`max`), so the one at `pos` is in flight.
            debug_assert!(slot.token != NO_TOKEN);
            if len > slot.len {
                failed = Some(DeviceError::UsedLenTooLarge { len, posted: slot.len });
                break;
            }
            let (token, ndesc) = (slot.token, slot.ndesc);
            slot.token = NO_TOKEN;
            sink.used(token, len);
            took += 1;
            freed += ndesc;
            // `pos + ndesc <= 2 * 32768 - 1`: no overflow.
            let next = pos + ndesc;
            if next >= size {
                (pos, wrap) = (next - size, !wrap);
                (used, avail) = (p::used_flags(wrap), p::avail_flags(wrap));
            } else {
                pos = next;
            }
        }
        (self.next_used, self.used_wrap) = (pos, wrap);
        self.free_slots += freed;
        self.heads -= took;
        match failed {
            Some(e) => Err((took, e)),
            None => Ok(took),
        }
    }

    /// [`pop_used_burst`](Self::pop_used_burst) for a queue that needs only the tokens
    /// (transmit): the same checks but the length's (see `pop_used_checked`).
    ///
    /// The rest of an in-order batch (one used descriptor for many buffers, as DPDK's
    /// vhost and our backend return transmit buffers) is taken in one loop that reads no
    /// ring memory and updates the ring's counters once: the same steps as `batch_step`
    /// and `retire`, per buffer only what differs.
    #[inline(always)]
    pub fn pop_used_tokens(&mut self, n: u16, sink: &mut impl TokenSink) -> Result<u16, (u16, DeviceError)> {
        let mut k = 0;
        while k < n {
            if self.batch_id != NO_BATCH {
                k += self.take_batch_tokens(n - k, sink);
                continue;
            }
            match self.pop_used_checked::<false>() {
                Ok(Some((token, _))) => sink.token(token),
                Ok(None) => return Ok(k),
                Err(e) => return Err((k, e)),
            }
            k += 1;
        }
        Ok(n)
    }

    /// Up to `max` (> 0) buffers of the in-order batch being taken, in ring order from
    /// the used position, their tokens into `sink`; the batch ends at its last buffer
    /// (`batch_id`), or, as in `batch_step`, at the last buffer in flight. Returns how
    /// many it took (at least one).
    #[inline(always)]
    fn take_batch_tokens(&mut self, max: u16, sink: &mut impl TokenSink) -> u16 {
        debug_assert!(self.in_order && self.batch_id != NO_BATCH && max > 0 && self.heads > 0);
        // In locals, as in `pop_in_order_singles`; at most the buffers in flight are taken
        // (the batch cannot end beyond them; `batch_step`'s guard). `batch_id` is a
        // checked id, so `< size`.
        let (size, slots, end) = (self.size, self.slots.as_mut_ptr(), self.batch_id as u16);
        let max = max.min(self.heads);
        let (mut pos, mut wrap) = (self.next_used, self.used_wrap);
        let (mut took, mut freed) = (0u16, 0u16);
        let mut ended = false;
        while took < max && !ended {
            // One stretch of positions without the ring's end inside: up to the batch's
            // last buffer if it lies ahead in this lap, else up to the ring's last
            // position (the batch goes on after the wrap). In a stretch a buffer costs
            // no wrap test and no end test: positions only grow.
            let last = if end >= pos { end } else { size - 1 };
            let from = pos;
            while took < max && pos <= last {
                // SAFETY: in order, the buffer at the used position is in flight with
                // id `pos` (`take_id`), so `pos < size`, the length of `slots`;
                // driver-private memory that the sink does not touch.
                let slot = unsafe { &mut *slots.add(pos as usize) };
                let token = std::mem::replace(&mut slot.token, NO_TOKEN);
                sink.token(token);
                took += 1;
                // `pos + ndesc <= 2 * 32768 - 1`: no overflow.
                pos += slot.ndesc;
            }
            freed += pos - from;
            // Past `end` in the stretch that stops there: its buffer was taken.
            ended = last == end && pos > end;
            if pos >= size {
                (pos, wrap) = (pos - size, !wrap);
            }
        }
        if ended || took == self.heads {
            self.batch_id = NO_BATCH;
        }
        (self.next_used, self.used_wrap) = (pos, wrap);
        self.free_slots += freed;
        self.heads -= took;
        took
    }

    /// Tokens of every buffer still in flight (to return them to the pool at close).
    pub fn drain_in_flight(&mut self) -> impl Iterator<Item = u32> + '_ {
        let out: Vec<u32> = self
            .slots
            .iter_mut()
            .filter(|s| s.token != NO_TOKEN)
            .map(|s| std::mem::replace(&mut s.token, NO_TOKEN))
            .collect();
        self.heads = 0;
        self.unpublished = 0;
        self.batch_id = NO_BATCH;
        out.into_iter()
    }
}

/// Ring position `pos` of a ring of `size` moved on by `n` descriptors (`n <= size`),
/// with its wrap counter flipped past the ring's end.
#[inline(always)]
fn step(size: u16, pos: u16, wrap: bool, n: u16) -> (u16, bool) {
    let next = pos as u32 + n as u32;
    if next >= size as u32 {
        ((next - size as u32) as u16, !wrap)
    } else {
        (next as u16, wrap)
    }
}
