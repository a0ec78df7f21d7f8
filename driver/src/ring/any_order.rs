//! Any-order bookkeeping (the default: `VIRTIO_F_IN_ORDER` not negotiated, virtio 1.2
//! §2.7.13-§2.7.14).
//!
//! Owns: the O(1) free stack of descriptor ids, the driver-private links of each
//! in-flight chain, taking used buffers by the id the device names (checked against what
//! is in flight: range, ownership, length) and draining at close.
//! Must not: touch ring memory except through the accessors of `ring/mod.rs` (`write_desc`,
//! avail entries, used elements), read a chain's links from the descriptor table (the
//! device can write it), or be called on a ring in in-order mode (the entry points in
//! `ring/mod.rs` pick the mode).
//!
//! `free[..nfree]` is the stack (its top at `nfree - 1`); `links[id]` is the next
//! descriptor of the chain `id` belongs to, `NO_NEXT` at its end; `tokens[head]` is
//! `NO_TOKEN` when `head` is not in flight, which is how a used id naming anything but
//! an in-flight head (a chain's tail, a buffer returned twice) is caught.

use super::{DriverRing, PostSource, TokenSink, UsedSink, NO_NEXT, NO_TOKEN};
use crate::error::DeviceError;

impl DriverRing {
    /// [`DriverRing::post`] in any order: the descriptor on top of the free stack. At
    /// least one descriptor is free.
    #[inline]
    pub(super) fn post_any_order(&mut self, addr: u64, len: u32, flags: u16, token: Option<u32>) -> u16 {
        self.nfree -= 1;
        let id = self.free[self.nfree as usize];
        // SAFETY: the free stack holds ids below `size` only.
        unsafe { self.write_desc(id, addr, len, flags, 0) };
        self.push_avail(id);
        let i = id as usize;
        self.tokens[i] = token.unwrap_or(id as u32);
        self.posted_len[i] = len;
        // End of chain.
        self.links[i] = NO_NEXT;
        self.heads += 1;
        id
    }

    /// [`DriverRing::post_chain`] in any order: the chain takes the top `parts.len()`
    /// entries of the free stack (at least that many are free), each descriptor naming
    /// its successor, with the links kept here too. Returns the head and the bytes
    /// posted.
    pub(super) fn post_chain_any_order(&mut self, parts: &[(u64, u32, bool)]) -> (u16, u32) {
        let n = parts.len();
        let first = self.nfree as usize - n;
        let total = self.write_chain(parts, |r, k| r.free[first + k]);
        for k in 0..n {
            let id = self.free[first + k];
            self.links[id as usize] = if k + 1 < n { self.free[first + k + 1] } else { NO_NEXT };
        }
        let head = self.free[first];
        self.nfree -= n as u16;
        self.push_avail(head);
        (head, total)
    }

    /// [`DriverRing::post_burst`] in any order, `n <= free_count`: one
    /// [`post_any_order`](Self::post_any_order) per buffer.
    #[inline(always)]
    pub(super) fn post_burst_any_order(&mut self, n: u16, flags: u16, src: &mut impl PostSource) -> u16 {
        for k in 0..n as usize {
            let id = self.free[self.nfree as usize - 1];
            let (addr, len, token) = src.buffer(k, id);
            self.post_any_order(addr, len, flags, Some(token));
        }
        n
    }

    /// [`DriverRing::pop_used`] in any order: the element names the head, which must be
    /// in flight, with a length no larger than what was posted.
    #[inline(always)]
    pub(super) fn pop_used_any_order(&mut self) -> std::result::Result<(u32, u32), DeviceError> {
        let (id, len) = self.read_used();
        if id >= self.size as u32 {
            return Err(DeviceError::UsedIdOutOfRange { id });
        }
        let token = self.tokens[id as usize];
        if token == NO_TOKEN {
            return Err(DeviceError::UsedIdNotInFlight { id });
        }
        let posted = self.posted_len[id as usize];
        if len > posted {
            return Err(DeviceError::UsedLenTooLarge { len, posted });
        }
        self.tokens[id as usize] = NO_TOKEN;
        self.heads -= 1;
        // Free the chain through the driver's own links (bounded: a chain never holds
        // more than `size` descriptors, and the links were written by `post*`).
        let mut d = id as u16;
        for _ in 0..self.size {
            self.free[self.nfree as usize] = d;
            self.nfree += 1;
            let next = std::mem::replace(&mut self.links[d as usize], NO_NEXT);
            if next == NO_NEXT {
                break;
            }
            d = next;
        }
        self.last_used = self.last_used.wrapping_add(1);
        Ok((token, len))
    }

    /// [`DriverRing::pop_used_burst`] in any order: one
    /// [`pop_used_any_order`](Self::pop_used_any_order) per buffer.
    #[inline(always)]
    pub(super) fn pop_used_burst_any_order(
        &mut self,
        n: u16,
        sink: &mut impl UsedSink,
    ) -> std::result::Result<u16, (u16, DeviceError)> {
        for k in 0..n {
            match self.pop_used_any_order() {
                Ok((token, len)) => sink.used(token, len),
                Err(e) => return Err((k, e)),
            }
        }
        Ok(n)
    }

    /// [`DriverRing::pop_used_tokens`] in any order: the used elements are read and
    /// checked as by [`pop_used_any_order`](Self::pop_used_any_order).
    #[inline(always)]
    pub(super) fn pop_used_tokens_any_order(
        &mut self,
        n: u16,
        sink: &mut impl TokenSink,
    ) -> std::result::Result<u16, (u16, DeviceError)> {
        for k in 0..n {
            match self.pop_used_any_order() {
                Ok((t, _)) => sink.token(t),
                Err(e) => return Err((k, e)),
            }
        }
        Ok(n)
    }

    /// The tokens of the chains in flight, into `out`; their heads are no longer in
    /// flight afterwards.
    pub(super) fn drain_any_order(&mut self, out: &mut Vec<u32>) {
        out.extend(
            self.tokens.iter_mut().filter(|t| **t != NO_TOKEN).map(|t| std::mem::replace(t, NO_TOKEN)),
        );
    }
}
