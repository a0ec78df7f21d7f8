//! In-order bookkeeping (`VIRTIO_F_IN_ORDER` negotiated, virtio 1.2 §2.7.9 / §2.8.22).
//!
//! Owns: the table-order descriptor allocation of an in-order ring, taking its used
//! buffers (one element each, or one element per batch) and draining it at close.
//! Must not: touch ring memory except through the accessors of `ring/mod.rs` (`write_desc`,
//! avail entries, used elements), or be called on a ring in any-order mode (the entry
//! points in [`super`] pick the mode).
//!
//! The device uses buffers in the order they were made available, so the driver takes
//! descriptors in table order (wrapping at the end), keeps no free stack and no links,
//! and knows which buffer a used element is for before reading it. `links[head]` holds
//! the number of descriptors in the chain at `head`; `next_desc` and `used_desc` are the
//! table positions (wrapping counters) of the next descriptor to post and of the oldest
//! in-flight chain's head. The avail ring's entries repeat lap after lap and are written
//! only when they change (as DPDK does), so their cache lines stay clean.
//!
//! A device may return a batch with one used element naming its last buffer (§2.7.9):
//! [`DriverRing::pop_used`] takes the earlier buffers of the batch as used whole (their
//! posted length, as Linux's in-order ring does), and [`DriverRing::pop_used_tokens`]
//! (transmit) reads no used element at all.

use super::{DriverRing, PostSource, TokenSink, UsedSink, NO_BATCH};
use crate::error::DeviceError;

impl DriverRing {
    /// Puts chain head `id` in the next avail slot (not yet visible). The entry usually
    /// holds `id` already from the previous lap: it is then left alone, so the line stays
    /// clean in the device's cache.
    #[inline(always)]
    fn push_avail_if_changed(&mut self, id: u16) {
        let e = self.next_avail_entry();
        // SAFETY: an avail entry of this ring (`next_avail_entry`), which only the driver
        // writes.
        unsafe {
            if std::ptr::read_volatile(e) != id.to_le() {
                std::ptr::write_volatile(e, id.to_le());
            }
        }
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// [`DriverRing::post`] in order: the next descriptor in table order. At least one
    /// descriptor is free.
    #[inline]
    pub(super) fn post_in_order(&mut self, addr: u64, len: u32, flags: u16, token: Option<u32>) -> u16 {
        self.nfree -= 1;
        let id = self.next_desc & self.mask;
        self.next_desc = self.next_desc.wrapping_add(1);
        // SAFETY: `id` is masked below `size`.
        unsafe { self.write_desc(id, addr, len, flags, 0) };
        self.push_avail_if_changed(id);
        let i = id as usize;
        self.tokens[i] = token.unwrap_or(id as u32);
        self.posted_len[i] = len;
        // A chain of one.
        self.links[i] = 1;
        self.heads += 1;
        id
    }

    /// [`DriverRing::post_chain`] in order: the chain takes the next positions in the
    /// table (§2.7.5.1 with IN_ORDER: `next` is x + 1, and 0 after the table's last
    /// entry). At least `parts.len()` descriptors are free. Returns the head and the
    /// bytes posted.
    pub(super) fn post_chain_in_order(&mut self, parts: &[(u64, u32, bool)]) -> (u16, u32) {
        let n = parts.len();
        let total = self.write_chain(parts, |r, k| r.next_desc.wrapping_add(k as u16) & r.mask);
        let head = self.next_desc & self.mask;
        self.nfree -= n as u16;
        self.next_desc = self.next_desc.wrapping_add(n as u16);
        self.links[head as usize] = n as u16;
        self.push_avail_if_changed(head);
        (head, total)
    }

    /// [`DriverRing::post_burst`] in order, `n <= free_count`. The ring's addresses and
    /// counters are copied into locals for the loop, so that they stay in registers
    /// whatever `src` stores.
    #[inline(always)]
    pub(super) fn post_burst_in_order(&mut self, n: u16, flags: u16, src: &mut impl PostSource) -> u16 {
        let (mask, mut next_desc, mut avail_idx) = (self.mask, self.next_desc, self.avail_idx);
        let (desc, avail) = (self.desc, self.avail);
        let (tokens, posted_len, links) =
            (self.tokens.as_mut_ptr(), self.posted_len.as_mut_ptr(), self.links.as_mut_ptr());
        for k in 0..n as usize {
            let id = next_desc & mask;
            let (addr, len, token) = src.buffer(k, id);
            // SAFETY: (both) `desc` and `avail` are this ring's table and driver area, `id`
            // and the slot are masked below `size`. The avail entry usually holds `id`
            // from the previous lap: then it is left alone, so the line stays clean in the
            // device's cache; only the driver writes it.
            unsafe {
                Self::write_desc_at(desc, id, addr, len, flags, 0);
                let e = Self::avail_entry_at(avail, avail_idx & mask);
                if std::ptr::read_volatile(e) != id.to_le() {
                    std::ptr::write_volatile(e, id.to_le());
                }
            }
            // SAFETY: (the three stores) `id <= mask < size`, the length of each array;
            // driver-private memory, not borrowed elsewhere during the loop.
            unsafe {
                *tokens.add(id as usize) = token;
                *posted_len.add(id as usize) = len;
                *links.add(id as usize) = 1;
            }
            next_desc = next_desc.wrapping_add(1);
            avail_idx = avail_idx.wrapping_add(1);
        }
        self.next_desc = next_desc;
        self.avail_idx = avail_idx;
        self.nfree -= n;
        self.heads += n;
        n
    }

    /// [`DriverRing::pop_used`] in order. The element must name the oldest in-flight
    /// head, or a later in-flight head, which ends a batch.
    #[inline(always)]
    pub(super) fn pop_used_in_order(&mut self) -> std::result::Result<(u32, u32), DeviceError> {
        let head = self.used_desc & self.mask;
        let (id, len) =
            if self.batch_id == NO_BATCH { self.read_used() } else { (self.batch_id, self.batch_len) };
        let len = if id == head as u32 {
            self.batch_id = NO_BATCH;
            let posted = self.posted_len[head as usize];
            if len > posted {
                return Err(DeviceError::UsedLenTooLarge { len, posted });
            }
            len
        } else {
            // A batch ending at `id`: it must be a position still in flight ahead of us.
            if id >= self.size as u32 {
                return Err(DeviceError::UsedIdOutOfRange { id });
            }
            let ahead = (id as u16).wrapping_sub(head) & self.mask;
            let descs_in_flight = self.next_desc.wrapping_sub(self.used_desc);
            if ahead >= descs_in_flight {
                return Err(DeviceError::UsedIdNotInFlight { id });
            }
            self.batch_id = id;
            self.batch_len = len;
            self.posted_len[head as usize]
        };
        Ok((self.take_head(head), len))
    }

    /// Retires the oldest in-flight chain, whose head is `head`, and returns its token.
    #[inline(always)]
    fn take_head(&mut self, head: u16) -> u32 {
        let n = self.links[head as usize];
        self.used_desc = self.used_desc.wrapping_add(n);
        self.nfree += n;
        self.heads -= 1;
        self.last_used = self.last_used.wrapping_add(1);
        self.tokens[head as usize]
    }

    /// [`DriverRing::pop_used_burst`] in order.
    #[inline(always)]
    pub(super) fn pop_used_burst_in_order(
        &mut self,
        n: u16,
        sink: &mut impl UsedSink,
    ) -> std::result::Result<u16, (u16, DeviceError)> {
        let mut k = 0;
        while k < n {
            if self.batch_id == NO_BATCH {
                // The common case, one used element per buffer, with the counters in
                // registers; anything else (a batch) goes through `pop_used_in_order`.
                // The ring's addresses in locals too, so that they stay in registers
                // whatever `sink` stores.
                // The loop counts with `last_used` alone (up to `end`) and frees by
                // `used_desc` alone; what it took and freed follows from the two at the
                // end, so that fewer counters compete for registers.
                let (mask, first_desc, first_used) = (self.mask, self.used_desc, self.last_used);
                let (used, tokens, posted_len, links) =
                    (self.used, self.tokens.as_ptr(), self.posted_len.as_ptr(), self.links.as_ptr());
                let end = first_used.wrapping_add(n - k);
                let (mut used_desc, mut last_used) = (first_desc, first_used);
                while last_used != end {
                    let head = used_desc & mask;
                    // SAFETY: `used` is this ring's device area; the slot is masked below
                    // `size`.
                    let (id, len) = unsafe { Self::read_used_at(used, last_used & mask) };
                    if id != head as u32 {
                        break;
                    }
                    // SAFETY: (the three loads) `head <= mask < size`, each array's length;
                    // driver-private memory, not written during the loop.
                    let (posted, nd, token) = unsafe {
                        (
                            *posted_len.add(head as usize),
                            *links.add(head as usize),
                            *tokens.add(head as usize),
                        )
                    };
                    if len > posted {
                        break;
                    }
                    used_desc = used_desc.wrapping_add(nd);
                    last_used = last_used.wrapping_add(1);
                    sink.used(token, len);
                }
                let took = last_used.wrapping_sub(first_used);
                k += took;
                self.used_desc = used_desc;
                self.last_used = last_used;
                self.nfree += used_desc.wrapping_sub(first_desc);
                self.heads -= took;
                if k == n {
                    break;
                }
            }
            match self.pop_used_in_order() {
                Ok((token, len)) => sink.used(token, len),
                Err(e) => return Err((k, e)),
            }
            k += 1;
        }
        Ok(k)
    }

    /// [`DriverRing::pop_used_tokens`] in order: reads nothing the device wrote.
    #[inline(always)]
    pub(super) fn pop_used_tokens_in_order(
        &mut self,
        n: u16,
        sink: &mut impl TokenSink,
    ) -> std::result::Result<u16, (u16, DeviceError)> {
        let (mask, mut used_desc) = (self.mask, self.used_desc);
        let (tokens, links) = (self.tokens.as_ptr(), self.links.as_ptr());
        let mut freed = 0u16;
        for _ in 0..n {
            let head = used_desc & mask;
            // SAFETY: `head <= mask < size`, each array's length; driver-private memory,
            // not written during the loop.
            let (nd, token) = unsafe { (*links.add(head as usize), *tokens.add(head as usize)) };
            used_desc = used_desc.wrapping_add(nd);
            freed += nd;
            sink.token(token);
        }
        self.used_desc = used_desc;
        self.last_used = self.last_used.wrapping_add(n);
        self.nfree += freed;
        self.heads -= n;
        Ok(n)
    }

    /// The tokens of the chains in flight, oldest first, into `out`.
    pub(super) fn drain_in_order(&self, out: &mut Vec<u32>) {
        let mut pos = self.used_desc;
        for _ in 0..self.heads {
            let head = pos & self.mask;
            out.push(self.tokens[head as usize]);
            pos = pos.wrapping_add(self.links[head as usize]);
        }
    }
}
