//! The control queue's burst (virtio 1.2 §5.1.6.5): read a command, have the device apply
//! it, write the ack.
//!
//! Owns: taking command chains from a control queue and acknowledging them.
//! Must not: parse commands (`crate::ctrl` does) or change device state other than
//! through `Device::apply_ctrl` / `Device::refuse_ctrl`, on the control worker only.

use super::{PathKind, PortPath, Side, CTRL_BURST};
use crate::ctrl::{self, Refused};
use crate::ring::Ring;
use crate::split_ring::{gather, scatter, Dir, RingFault};

impl PortPath {
    /// The control queue: each chain is a command (device-readable bytes: class,
    /// command, data) followed by room for the one-byte ack (device-writable). The device
    /// applies it (and waits until the data workers run with the result) before the ack
    /// is written; a refused command is acknowledged `VIRTIO_NET_ERR`. A chain that
    /// breaks the ring protocol breaks the control queue only.
    #[inline]
    pub(super) fn run_ctrl<R: Ring>(&mut self) -> Result<usize, (Side, RingFault)> {
        let PathKind::Ctrl { buf } = &mut self.kind else {
            return Ok(0);
        };
        let Some(src) = self.src.as_mut() else {
            return Ok(0);
        };
        let dev = src.dev.clone();
        let Some((ring, mem)) = src.ring::<R>() else { return Ok(0) };
        let chain = self.src_chain.chain(mem);
        let n = ring.poll_avail().map_err(|b| (Side::Src, b))?.min(CTRL_BURST);
        let mut done = 0;
        let mut failed = None;
        for i in 0..n {
            let head = match ring.walk_avail(mem, i, Dir::ReadsThenWrites, chain) {
                Ok(h) => h,
                Err(b) => {
                    failed = Some(b);
                    break;
                }
            };
            let written = if chain.truncated || chain.total == chain.readable {
                // No byte to acknowledge in (or it lies past the segments we mapped):
                // the command is not applied and the chain is returned empty.
                dev.refuse_ctrl(&Refused::NoAck);
                0
            } else {
                let ack = if chain.readable > ctrl::CTRL_MAX_LEN as u64 {
                    dev.refuse_ctrl(&Refused::TooLong { len: chain.readable });
                    ctrl::ACK_ERR
                } else {
                    // No allocation: `buf` was created with CTRL_MAX_LEN capacity.
                    buf.resize(chain.readable as usize, 0);
                    gather(chain, 0, buf);
                    dev.apply_ctrl(buf)
                };
                scatter(chain, chain.readable as usize, &[ack]);
                1
            };
            ring.add_used(head, written);
            done += 1;
        }
        ring.consume(done);
        ring.publish_used();
        match failed {
            Some(b) => Err((Side::Src, b)),
            None => Ok(done as usize),
        }
    }
}
