//! Unit tests of the control queue and the [`Control`] handle, against a device
//! thread playing the control ring.

use std::time::Instant;

use super::*;
use crate::dma::DmaArena;
use crate::layout::ctrl;
use crate::ring::fake::FakeDevice;
use std::sync::mpsc;

/// How the fake device answers.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Answer {
    Ok,
    Err,
    Garbage,
    /// Completes the chain without writing the ack.
    NoWrite,
    /// Never completes the chain.
    Silent,
}

/// A control queue played by a device thread: it records every command (class,
/// command, data bytes, descriptor count) and answers as `answer` says.
struct Rig {
    control: Control,
    seen: mpsc::Receiver<(u8, u8, Vec<u8>, usize)>,
    answer: Arc<Mutex<Answer>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    dev: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(d) = self.dev.take() {
            let _ = d.join();
        }
    }
}

fn rig_with(features: u64, virtio_user: bool) -> Rig {
    let arena = Arc::new(DmaArena::new(1 << 20, false).unwrap());
    let q = ControlQueue::new(&arena, Default::default(), false).unwrap();
    let crate::ring::AnyRing::Split(ring) = &q.ring else { unreachable!("a split ring was asked for") };
    let mut dev = FakeDevice::new(ring);
    let (tx, seen) = mpsc::channel();
    let answer = Arc::new(Mutex::new(Answer::Ok));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (a, st) = (answer.clone(), stop.clone());
    let dev = std::thread::spawn(move || {
        let _arena = arena;
        let mut silent: Vec<(u16, u64)> = Vec::new();
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            let Some((head, chain)) = dev.pop_avail() else {
                // A late answer to the commands left unanswered once answering resumes.
                if !silent.is_empty() && *a.lock().unwrap() != Answer::Silent {
                    for (h, ack) in silent.drain(..) {
                        dev.write(ack, &[ctrl::OK]);
                        dev.push_used(h as u32, 1);
                    }
                }
                std::thread::yield_now();
                continue;
            };
            let readable: Vec<u8> = chain
                .iter()
                .filter(|d| d.flags & crate::layout::DESC_F_WRITE == 0)
                .flat_map(|d| dev.read(d.addr, d.len as usize))
                .collect();
            let ack = chain.iter().find(|d| d.flags & crate::layout::DESC_F_WRITE != 0).unwrap();
            let _ = tx.send((readable[0], readable[1], readable[2..].to_vec(), chain.len()));
            let answer = *a.lock().unwrap();
            match answer {
                Answer::Silent => {
                    silent.push((head, ack.addr));
                    continue;
                }
                Answer::Ok => dev.write(ack.addr, &[ctrl::OK]),
                Answer::Err => dev.write(ack.addr, &[ctrl::ERR]),
                Answer::Garbage => dev.write(ack.addr, &[7]),
                Answer::NoWrite => {}
            }
            dev.push_used(head as u32, 1);
        }
    });
    let p = ControlParams {
        device: "test".into(),
        features,
        virtio_user,
        timeout: Duration::from_millis(100),
        pairs: 4,
        active_pairs: 1,
    };
    Rig { control: Control::new(p, Some(q)), seen, answer, stop, dev: Some(dev) }
}

fn all() -> u64 {
    [
        f::NET_CTRL_VQ,
        f::NET_CTRL_RX,
        f::NET_CTRL_VLAN,
        f::NET_CTRL_MAC_ADDR,
        f::NET_MQ,
        f::NET_CTRL_GUEST_OFFLOADS,
        f::NET_GUEST_CSUM,
        f::NET_GUEST_TSO4,
        f::NET_GUEST_TSO6,
    ]
    .iter()
    .fold(0, |m, b| m | f::bit(*b))
}

#[test]
fn every_command_is_encoded_as_the_spec_lays_it_out() {
    let r = rig_with(all(), true);
    let c = &r.control;
    let next = || r.seen.recv_timeout(Duration::from_secs(5)).unwrap();
    c.set_promisc(true).unwrap();
    assert_eq!(next(), (0, 0, vec![1], 3));
    c.set_allmulti(false).unwrap();
    assert_eq!(next(), (0, 1, vec![0], 3));
    let uni = [[2, 0, 0, 0, 0, 1]];
    let multi = [[0x01, 0, 0x5e, 0, 0, 1], [0x33, 0x33, 0, 0, 0, 1]];
    c.set_mac_table(&uni, &multi).unwrap();
    let mut want = vec![1, 0, 0, 0, 2, 0, 0, 0, 0, 1, 2, 0, 0, 0];
    want.extend_from_slice(&[0x01, 0, 0x5e, 0, 0, 1, 0x33, 0x33, 0, 0, 0, 1]);
    assert_eq!(next(), (1, 0, want, 4), "header, unicast table, multicast table, ack");
    c.set_mac_table(&[], &[]).unwrap();
    assert_eq!(next(), (1, 0, vec![0; 8], 4));
    c.set_mac_addr([2, 1, 2, 3, 4, 5]).unwrap();
    assert_eq!(next(), (1, 1, vec![2, 1, 2, 3, 4, 5], 3));
    c.vlan_add(0x123).unwrap();
    assert_eq!(next(), (2, 0, vec![0x23, 0x01], 3));
    c.vlan_del(4095).unwrap();
    assert_eq!(next(), (2, 1, vec![0xff, 0x0f], 3));
    c.set_queue_pairs(3).unwrap();
    assert_eq!(next(), (4, 0, vec![3, 0], 3));
    assert_eq!(c.queue_pairs(), 3);
    let o = f::bit(f::NET_GUEST_CSUM) | f::bit(f::NET_GUEST_TSO4);
    c.set_guest_offloads(o).unwrap();
    assert_eq!(next(), (5, 0, o.to_le_bytes().to_vec(), 3));
    assert_eq!(c.guest_offloads(), o);
}

#[test]
fn arguments_are_checked_before_anything_is_sent() {
    let r = rig_with(all(), true);
    let c = &r.control;
    assert!(matches!(c.vlan_add(4096), Err(Error::Config(_))));
    assert!(matches!(c.set_queue_pairs(0), Err(Error::Config(_))));
    assert!(matches!(c.set_queue_pairs(5), Err(Error::Config(_))), "only 4 pairs set up");
    assert!(matches!(c.set_mac_addr([1, 0, 0, 0, 0, 0]), Err(Error::Config(_))));
    assert!(matches!(c.set_mac_table(&[[1, 0, 0, 0, 0, 0]], &[]), Err(Error::Config(_))));
    assert!(matches!(c.set_mac_table(&[], &[[2, 0, 0, 0, 0, 0]]), Err(Error::Config(_))));
    let many = vec![[2u8, 0, 0, 0, 0, 0]; MAC_TABLE_MAX + 1];
    assert!(matches!(c.set_mac_table(&many, &[]), Err(Error::Config(_))));
    let e = c.set_guest_offloads(f::bit(f::NET_GUEST_UFO)).unwrap_err();
    assert!(e.to_string().contains("VIRTIO_NET_F_GUEST_UFO"), "{e}");
    let e = c.set_guest_offloads(f::bit(f::NET_GUEST_TSO4)).unwrap_err();
    assert!(e.to_string().contains("GUEST_CSUM"), "{e}");
    assert!(r.seen.try_recv().is_err(), "nothing reached the device");
    assert_eq!(c.queue_pairs(), 1);
}

#[test]
fn missing_features_are_named() {
    let r = rig_with(f::bit(f::NET_CTRL_VQ) | f::bit(f::NET_CTRL_RX), true);
    let c = &r.control;
    let cases: [(Result<()>, &str); 4] = [
        (c.vlan_add(5), "VIRTIO_NET_F_CTRL_VLAN"),
        (c.set_mac_addr([2, 0, 0, 0, 0, 1]), "VIRTIO_NET_F_CTRL_MAC_ADDR"),
        (c.set_queue_pairs(2), "VIRTIO_NET_F_MQ"),
        (c.set_guest_offloads(0), "VIRTIO_NET_F_CTRL_GUEST_OFFLOADS"),
    ];
    for (res, name) in cases {
        match res {
            Err(Error::Unsupported { feature, .. }) => assert_eq!(feature, name),
            other => panic!("{name}: {other:?}"),
        }
    }
    c.set_promisc(true).unwrap();
    // Without the control queue at all, even CTRL_RX commands are unsupported.
    let p = ControlParams {
        device: "none".into(),
        features: 0,
        virtio_user: true,
        timeout: Duration::from_millis(10),
        pairs: 1,
        active_pairs: 1,
    };
    let none = Control::new(p, None);
    let e = none.set_promisc(true).unwrap_err();
    assert!(matches!(e, Error::Unsupported { bit: f::NET_CTRL_VQ, .. }), "{e}");
    assert!(e.to_string().contains("VIRTIO_NET_F_CTRL_VQ"), "{e}");
}

#[test]
fn acks_other_than_ok_are_errors() {
    let r = rig_with(all(), false);
    let c = &r.control;
    *r.answer.lock().unwrap() = Answer::Err;
    assert!(matches!(
        c.set_promisc(true),
        Err(Error::ControlRefused { command: "VIRTIO_NET_CTRL_RX_PROMISC" })
    ));
    *r.answer.lock().unwrap() = Answer::Garbage;
    assert!(matches!(c.vlan_add(1), Err(Error::ControlBadAck { ack: 7, .. })));
    *r.answer.lock().unwrap() = Answer::NoWrite;
    assert!(matches!(c.vlan_add(1), Err(Error::ControlBadAck { ack: 0xff, .. })));
    // A refused VQ_PAIRS_SET leaves the pair count as it was.
    *r.answer.lock().unwrap() = Answer::Err;
    assert!(c.set_queue_pairs(2).is_err());
    assert_eq!(c.queue_pairs(), 1);
    *r.answer.lock().unwrap() = Answer::Ok;
    c.set_queue_pairs(2).unwrap();
    assert_eq!(c.queue_pairs(), 2);
    // Two refusals (ERR), two bad acks, one success.
    assert_eq!(c.counts(), crate::ctrl::ControlCounts { ok: 1, refused: 2, timeout: 0, failed: 2 });
}

#[test]
fn a_silent_device_times_out_and_a_late_answer_heals_the_queue() {
    // virtio-user, never answered: the back-end does not serve the control queue.
    let r = rig_with(all(), true);
    let c = &r.control;
    *r.answer.lock().unwrap() = Answer::Silent;
    let t = Instant::now();
    let e = c.set_promisc(true).unwrap_err();
    assert!(matches!(e, Error::ControlNotServed { .. }), "{e}");
    assert!(e.to_string().contains("does not serve the control virtqueue"), "{e}");
    assert!(t.elapsed() >= Duration::from_millis(100) && t.elapsed() < Duration::from_secs(5));
    // The command is still posted: the next one fails at once, without waiting.
    let t = Instant::now();
    assert!(matches!(c.set_promisc(false), Err(Error::ControlNotServed { waited_ms: 0, .. })));
    assert!(t.elapsed() < Duration::from_millis(50));
    // The device answers (late) before the next command: the queue works again.
    *r.answer.lock().unwrap() = Answer::Ok;
    std::thread::sleep(Duration::from_millis(50));
    c.set_allmulti(true).unwrap();
    // Once answered, a later silence is a timeout, not "not served".
    *r.answer.lock().unwrap() = Answer::Silent;
    assert!(matches!(c.vlan_add(3), Err(Error::ControlTimeout { .. })));
}

#[test]
fn xdp_switches_merging_offloads_off_and_back() {
    let r = rig_with(all(), true);
    let c = &r.control;
    let negotiated = f::bit(f::NET_GUEST_CSUM) | f::bit(f::NET_GUEST_TSO4) | f::bit(f::NET_GUEST_TSO6);
    assert_eq!(c.guest_offloads(), negotiated);
    c.xdp_attach().unwrap();
    let (class, cmd, data, _) = r.seen.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!((class, cmd, data), (5, 0, f::bit(f::NET_GUEST_CSUM).to_le_bytes().to_vec()));
    assert_eq!(c.guest_offloads(), f::bit(f::NET_GUEST_CSUM), "checksum offload stays on");
    // A second program: nothing to switch.
    c.xdp_attach().unwrap();
    assert!(r.seen.recv_timeout(Duration::from_millis(50)).is_err());
    // Asking for TSO while programs are attached is refused.
    assert!(c.set_guest_offloads(negotiated).is_err());
    c.xdp_detach().unwrap();
    assert!(r.seen.recv_timeout(Duration::from_millis(50)).is_err(), "one program is still attached");
    c.xdp_detach().unwrap();
    let (_, _, data, _) = r.seen.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(data, negotiated.to_le_bytes().to_vec(), "restored");
    assert_eq!(c.guest_offloads(), negotiated);
    // With the offloads switched off by the application, attach sends nothing.
    c.set_guest_offloads(f::bit(f::NET_GUEST_CSUM)).unwrap();
    r.seen.recv_timeout(Duration::from_secs(5)).unwrap();
    c.xdp_attach().unwrap();
    c.xdp_detach().unwrap();
    assert!(r.seen.recv_timeout(Duration::from_millis(50)).is_err());
}

#[test]
fn xdp_attach_is_refused_when_offloads_cannot_be_switched() {
    let feats = all() & !f::bit(f::NET_CTRL_GUEST_OFFLOADS);
    let r = rig_with(feats, true);
    let e = r.control.xdp_attach().unwrap_err();
    assert!(matches!(e, Error::XdpOffloads { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("VIRTIO_NET_F_GUEST_TSO4") && msg.contains("VIRTIO_NET_F_CTRL_GUEST_OFFLOADS"),
        "{msg}"
    );
    assert_eq!(r.control.xdp_programs(), 0);
    // Checksum offload alone does not stop a program.
    let r = rig_with(f::bit(f::NET_CTRL_VQ) | f::bit(f::NET_GUEST_CSUM), true);
    r.control.xdp_attach().unwrap();
}

#[test]
fn a_closed_port_sends_nothing() {
    let r = rig_with(all(), true);
    r.control.close();
    assert!(matches!(r.control.set_promisc(true), Err(Error::PortClosed(_))));
    assert!(r.seen.recv_timeout(Duration::from_millis(50)).is_err());
}
