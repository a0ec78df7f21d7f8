//! The forwarding burst's loop for plain frames, on rings that hand out direct buffers
//! ([`Ring::DIRECT`]: the packed engine): a one-descriptor chain on each side, a frame
//! that passes [`PortPath::tx_frame`]'s checks and fits its receive buffer, and nothing
//! asked of the device but the copy (no offload, no receive filter). `forward.rs` runs it
//! first in a burst; the general loop takes over at the first frame that is not plain.
//!
//! Why a loop of its own: through the general loop every frame was walked into two
//! [`Chain`](crate::split_ring::Chain)s and copied piece by piece, with the chains'
//! records in memory; a plain frame needs two translated pointers and one copy
//! (`bench/callgrind.sh` be-loop, packed).
//!
//! Owns: the checks a plain frame must pass, its copy (the header, the frame, the MAC
//! swap) and the completion of both chains. Must not: drop a frame, count a drop, or
//! decide anything about a frame that is not plain: it stops there and leaves that frame
//! and everything after it to the general loop, which applies its own rules.

use spec::layout::NET_HDR_LEN;

use super::{PortPath, ONE_BUFFER_HDR};
use crate::memory::GuestMemory;
use crate::ring::Ring;
use crate::split_ring::Dir;

/// Forwards the plain frames among the first `n` chains the last polls found on `src`
/// (transmitted frames) and `dst` (receive buffers), chain `i` of one into chain `i` of
/// the other, each completed on both rings (published by the caller). Stops at the first
/// that is not plain. Returns the frames forwarded and their bytes (without the header).
#[inline(always)]
pub(super) fn forward<S: Ring, D: Ring>(
    src: &mut S,
    smem: &GuestMemory,
    dst: &mut D,
    dmem: &GuestMemory,
    n: u16,
    max_frame: u64,
    swap_mac: bool,
) -> (u16, u64) {
    let (mut done, mut bytes) = (0u16, 0u64);
    while done < n {
        let Some((from, total, th)) = src.direct(smem, done, Dir::DeviceReads) else { break };
        // A frame `tx_frame` would drop is the general loop's.
        let Ok(len) = PortPath::frame_len(total as u64, max_frame) else { break };
        let Some((to, room, rh)) = dst.direct(dmem, done, Dir::DeviceWrites) else { break };
        if room < total {
            break; // several receive buffers (or none big enough): the general loop's
        }
        let len = len as usize;
        // SAFETY: `from .. + total` lies whole in guest memory (translated by `direct`,
        // mapped while `smem` is borrowed), `to .. + room` likewise in `dmem`, device-
        // writable, and `total <= room`; the frame is at least an Ethernet header long,
        // so its 12 address bytes are inside both. `copy` (memmove semantics): guest
        // memory is foreign and a driver may point both buffers at the same bytes; bytes
        // it rewrites meanwhile arrive torn, which only harms that driver.
        unsafe {
            std::ptr::copy(ONE_BUFFER_HDR.as_ptr(), to, NET_HDR_LEN);
            std::ptr::copy(from.add(NET_HDR_LEN), to.add(NET_HDR_LEN), len);
            if swap_mac {
                let mut macs = [0u8; 12];
                std::ptr::copy(from.add(NET_HDR_LEN), macs.as_mut_ptr(), macs.len());
                macs.rotate_left(6);
                std::ptr::copy(macs.as_ptr(), to.add(NET_HDR_LEN), macs.len());
            }
        }
        src.add_used(th, 0);
        dst.add_used(rh, total);
        bytes += len as u64;
        done += 1;
    }
    (done, bytes)
}
