//! The control queue on a packed ring: command chains (header, data, ack in separate
//! descriptors, NEXT in ring order) against a thread playing the device with
//! [`PackedFake`](crate::ring::packed::fake::PackedFake).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::command::Command;
use super::queue::ControlQueue;
use crate::dma::DmaArena;
use crate::layout::ctrl;
use crate::ring::packed::fake::PackedFake;
use crate::ring::{AnyRing, RingFeatures};

#[test]
fn commands_go_out_as_chains_on_a_packed_ring() {
    for in_order in [false, true] {
        let arena = Arc::new(DmaArena::new(1 << 20, false).unwrap());
        let mut q = ControlQueue::new(&arena, RingFeatures { event_idx: true, in_order }, true).unwrap();
        let AnyRing::Packed(ring) = &q.ring else { unreachable!("a packed ring was asked for") };
        let mut dev = PackedFake::new(ring);
        let (tx, seen) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let device = std::thread::spawn(move || {
            let _arena = arena;
            while !st.load(Ordering::Relaxed) {
                let Some((id, chain)) = dev.pop_avail() else {
                    std::thread::yield_now();
                    continue;
                };
                let hdr = dev.read(chain[0].addr, 2);
                let ack = chain.last().unwrap();
                assert_ne!(ack.flags & spec::packed::DESC_F_WRITE, 0, "the ack is device-writable");
                let _ = tx.send((hdr[0], hdr[1], chain.len()));
                dev.write(ack.addr, &[ctrl::OK]);
                dev.push_used(id, 1, chain.len() as u16);
            }
        });
        // 16-entry ring, 3 descriptors a command: many laps of both wrap counters.
        for k in 0..40u16 {
            let cmd = if k % 2 == 0 { Command::Promisc(k % 4 == 0) } else { Command::VlanAdd(k) };
            q.execute(&cmd, Duration::from_secs(5), "fake", false).unwrap();
            let (class, command, descs) = seen.recv().unwrap();
            assert_eq!((class, command), cmd.class_cmd());
            assert_eq!(descs, 3, "header, data, ack");
        }
        stop.store(true, Ordering::Relaxed);
        device.join().unwrap();
    }
}
