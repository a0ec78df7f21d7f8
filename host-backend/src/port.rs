//! Ports: what happens to a device's traffic. Each port is made of paths, and each path
//! owns the rings it touches (a ring belongs to exactly one path, a path to exactly one
//! worker), so a burst never needs a lock.
//!
//! Owns: the per-burst packet work of `sink` (count and drop), `gen` (generate frames
//! into the guest's receive buffers), and forwarding from one device's transmit queue to
//! a receive queue (`reflect`: the same device; `xconnect`: the other device), with
//! backpressure: a frame waits in the transmit ring until a receive buffer is free; and
//! the control queue path (read a command, have the device apply it, write the ack).
//! Must not: talk to the front-end or change device state other than marking a queue
//! broken (through [`Device::mark_broken`]) and applying control commands (through
//! [`Device::apply_ctrl`], on the control worker only).
//!
//! What is delivered into a receive queue follows the receiving device's [`RxConfig`],
//! the `Arc` its receive ring was activated with (no lock, no atomic per frame): a frame
//! its filters reject is consumed and counted as `filtered` without using a receive
//! buffer; `gen` addresses the device's current MAC and, with `--gso-size`, sends TCP
//! super-frames whole only while guest TSO is on (segments otherwise, see [`crate::gso`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use spec::layout::{NET_HDR_LEN, NET_HDR_NUM_BUFFERS};

use crate::ctrl::{self, Refused, RxConfig};
use crate::device::{ActiveRing, Device};
use crate::gso::TcpGen;
use crate::handoff::{Receiver, Sender};
use crate::iotlb::PendingMiss;
use crate::split_ring::{copy_chain, gather, scatter, RingFault, Chain, DeviceRing, Dir};
use crate::stats::{BurstCounts, DropReason};

/// Most chains handled per ring per burst.
pub const BURST: u16 = 64;
/// Most control commands handled per burst (each may wait for a resync of the workers).
pub const CTRL_BURST: u16 = 16;
/// Frame bytes the receive filter looks at: destination MAC up to the VLAN tag's id.
const FILTER_BYTES: usize = 16;
/// Ethernet header length.
const ETH_HLEN: u64 = 14;
/// Offset of the generator's magic and sequence number in its frames (after
/// Ethernet, IPv4 and UDP headers).
pub const GEN_SEQ_OFFSET: usize = 14 + 20 + 8;
/// Magic bytes before the sequence number in generated frames.
pub const GEN_MAGIC: [u8; 4] = *b"VNET";

/// One queue of one device, as a path refers to it.
pub struct QueueSlot {
    /// The device.
    pub dev: Arc<Device>,
    /// Queue index within the device (even: receive, odd: transmit).
    pub q: u16,
    active: Option<ActiveRing>,
    /// Under a vIOMMU: the translation this queue waits for, if any.
    miss: Option<PendingMiss>,
}

impl QueueSlot {
    fn new(dev: &Arc<Device>, q: u16) -> Self {
        QueueSlot { dev: dev.clone(), q, active: None, miss: None }
    }
    fn pair(&self) -> usize {
        self.q as usize / 2
    }
    fn ring(&mut self) -> Option<&mut DeviceRing> {
        self.active.as_mut().map(|a| &mut a.ring)
    }
    /// The active ring and the receive configuration it was activated with (borrowed:
    /// cloning the `Arc` per burst would bounce its count between workers).
    fn ring_rx(&mut self) -> Option<(&mut DeviceRing, &RxConfig)> {
        self.active.as_mut().map(|a| (&mut a.ring, &*a.rx))
    }
    /// Marks this queue broken and lets go of it; or, for an IOTLB miss, keeps the ring
    /// (the chain stays available and is retried next burst) until the miss times out.
    fn fail(&mut self, bad: RingFault) {
        let bad = match bad {
            RingFault::IotlbMiss { iova, write } => {
                if self.dev.iotlb_miss(&mut self.miss, iova, write) {
                    return;
                }
                RingFault::BadAddress { addr: iova, len: 0 }
            }
            other => other,
        };
        self.active = None;
        self.dev.mark_broken(self.q, bad);
    }
}

/// What a path does per burst.
pub enum Job {
    /// Count and drop what the guest transmits on `src`.
    Sink,
    /// Fill the guest's receive buffers on `dst` with generated frames.
    Gen {
        /// Virtio-net header followed by the frame template; the sequence number is
        /// patched in per frame.
        frame: Vec<u8>,
        /// Next sequence number.
        seq: u64,
        /// `--gso-size`: TCP super-frames instead of `frame`.
        tcp: Option<Box<TcpGen>>,
    },
    /// Serve the control queue `src`: each command is applied by its device and
    /// acknowledged.
    Ctrl {
        /// The command bytes of one chain (capacity [`ctrl::CTRL_MAX_LEN`], allocated once).
        buf: Vec<u8>,
    },
    /// Move frames from `src` (a transmit queue) to `dst` (a receive queue).
    Forward {
        /// Swap source and destination MAC addresses on the way.
        swap_mac: bool,
    },
    /// `--handoff`: copy what `src` (a transmit queue) sends into frame buffers handed
    /// to another worker ([`crate::handoff`]).
    HandOut(Box<Sender>),
    /// `--handoff`: deliver frames another worker handed over into `dst` (a receive
    /// queue).
    HandIn(Box<Receiver>),
}

/// A unit of work a worker runs every loop: one job on the rings it owns.
pub struct Path {
    job: Job,
    src: Option<QueueSlot>,
    dst: Option<QueueSlot>,
    a: Box<Chain>,
    b: Box<Chain>,
    max_frame: u64,
}

/// Which side of a path a bad value came from.
enum Side {
    Src,
    Dst,
}

impl Path {
    fn new(job: Job, src: Option<QueueSlot>, dst: Option<QueueSlot>, mtu: u16) -> Path {
        Path {
            job,
            src,
            dst,
            a: Box::default(),
            b: Box::default(),
            // MTU plus Ethernet header plus one VLAN tag.
            max_frame: mtu as u64 + ETH_HLEN + 4,
        }
    }

    /// A sink on `dev`'s transmit queue `q`.
    pub fn sink(dev: &Arc<Device>, q: u16) -> Path {
        Path::new(Job::Sink, Some(QueueSlot::new(dev, q)), None, dev.params.mtu)
    }

    /// A generator of `pkt_size`-byte frames into `dev`'s receive queue `q`: UDP, or
    /// with `gso_size` TCP super-frames cut at that MSS (see [`crate::gso`]).
    pub fn gen(dev: &Arc<Device>, q: u16, pkt_size: u16, gso_size: Option<u16>) -> Path {
        let tcp = gso_size.map(|mss| Box::new(TcpGen::new(dev.params.mac, pkt_size as usize, mss)));
        let udp_len = if tcp.is_some() { 60 } else { pkt_size as usize };
        let mut frame = vec![0u8; NET_HDR_LEN];
        frame[NET_HDR_NUM_BUFFERS..NET_HDR_NUM_BUFFERS + 2].copy_from_slice(&1u16.to_le_bytes());
        frame.extend_from_slice(&udp_frame(dev.params.mac, udp_len));
        Path::new(Job::Gen { frame, seq: 0, tcp }, None, Some(QueueSlot::new(dev, q)), dev.params.mtu)
    }

    /// The control queue of `dev` (its internal index [`Device::ctrl_queue`]).
    pub fn ctrl(dev: &Arc<Device>) -> Path {
        let job = Job::Ctrl { buf: Vec::with_capacity(ctrl::CTRL_MAX_LEN) };
        Path::new(job, Some(QueueSlot::new(dev, dev.ctrl_queue())), None, dev.params.mtu)
    }

    /// Forwarding from `src`'s transmit queue `sq` to `dst`'s receive queue `dq`.
    pub fn forward(src: &Arc<Device>, sq: u16, dst: &Arc<Device>, dq: u16, swap_mac: bool) -> Path {
        let mtu = src.params.mtu.min(dst.params.mtu);
        Path::new(
            Job::Forward { swap_mac },
            Some(QueueSlot::new(src, sq)),
            Some(QueueSlot::new(dst, dq)),
            mtu,
        )
    }

    /// `--handoff`: the sending half of a cross-connect direction, on `dev`'s transmit
    /// queue `q` (the worker of `dev`).
    pub fn hand_out(dev: &Arc<Device>, q: u16, sender: Sender) -> Path {
        Path::new(Job::HandOut(Box::new(sender)), Some(QueueSlot::new(dev, q)), None, dev.params.mtu)
    }

    /// `--handoff`: the receiving half, on `dev`'s receive queue `q` (the worker of `dev`).
    pub fn hand_in(dev: &Arc<Device>, q: u16, receiver: Receiver) -> Path {
        Path::new(Job::HandIn(Box::new(receiver)), None, Some(QueueSlot::new(dev, q)), dev.params.mtu)
    }

    fn slots(&mut self) -> impl Iterator<Item = &mut QueueSlot> {
        self.src.iter_mut().chain(self.dst.iter_mut())
    }

    /// Lets go of every ring (their positions are written back to their devices).
    pub fn detach(&mut self) {
        for s in self.slots() {
            if let Some(a) = s.active.take() {
                s.dev.deactivate(s.q, a);
            }
        }
    }

    /// Takes every ring that may run now.
    pub fn attach(&mut self) {
        for s in self.slots() {
            if s.active.is_none() {
                s.active = s.dev.activate(s.q);
            }
        }
    }

    /// Whether any of the path's rings is active, or it is a handoff path (which may
    /// always have frames from another worker).
    pub fn any_active(&self) -> bool {
        // A handoff path always may have work: frames from another worker.
        matches!(self.job, Job::HandOut(_) | Job::HandIn(_))
            || self.src.iter().chain(self.dst.iter()).any(|s| s.active.is_some())
    }

    /// Raw kick eventfds of the active rings (for the worker's epoll set). Returns
    /// `false` if an active ring has no kick fd (a front-end in polling mode, vhost-user's
    /// "no fd" flag): then the worker must never sleep.
    pub fn kick_fds(&self, out: &mut Vec<i32>) -> bool {
        use std::os::fd::AsRawFd;
        // Frames handed over by another worker arrive without a kick: a worker with a
        // handoff path polls without sleeping.
        let mut all = !matches!(self.job, Job::HandOut(_) | Job::HandIn(_));
        for a in self.src.iter().chain(self.dst.iter()).filter_map(|s| s.active.as_ref()) {
            match &a.kick {
                Some(k) => out.push(k.as_raw_fd()),
                None => all = false,
            }
        }
        all
    }

    /// Enables or suppresses kicks on every active ring; when enabling, returns whether
    /// work arrived meanwhile.
    pub fn set_kicks(&mut self, enable: bool) -> bool {
        let mut arrived = false;
        for s in self.slots() {
            if let Some(r) = s.ring() {
                arrived |= r.set_kicks(enable);
            }
        }
        arrived
    }

    /// Runs one burst; returns the number of chains it completed.
    pub fn run(&mut self) -> usize {
        let res = match self.job {
            Job::Sink => self.run_sink(),
            Job::Gen { tcp: None, .. } => self.run_gen(),
            Job::Gen { tcp: Some(_), .. } => self.run_gen_tcp(),
            Job::Forward { swap_mac } => self.run_forward(swap_mac),
            Job::Ctrl { .. } => self.run_ctrl(),
            Job::HandOut(_) => self.run_hand_out(),
            Job::HandIn(_) => self.run_hand_in(),
        };
        match res {
            Ok(n) => {
                if n > 0 {
                    // A ring that made progress is not waiting for a translation.
                    for s in self.src.iter_mut().chain(self.dst.iter_mut()) {
                        s.miss = None;
                    }
                }
                n
            }
            Err((side, bad)) => {
                let slot = match side {
                    Side::Src => self.src.as_mut(),
                    Side::Dst => self.dst.as_mut(),
                };
                if let Some(s) = slot {
                    s.fail(bad);
                }
                0
            }
        }
    }

    /// Classifies a transmitted chain: the frame length, or why it is dropped.
    pub(crate) fn tx_frame(chain: &Chain, max_frame: u64) -> Result<u64, DropReason> {
        if chain.truncated {
            Err(DropReason::TooManySegments)
        } else if chain.total < NET_HDR_LEN as u64 + ETH_HLEN {
            Err(DropReason::ShortFrame)
        } else if chain.total - NET_HDR_LEN as u64 > max_frame {
            Err(DropReason::Oversize)
        } else {
            Ok(chain.total - NET_HDR_LEN as u64)
        }
    }

    fn run_sink(&mut self) -> Result<usize, (Side, RingFault)> {
        let max_frame = self.max_frame;
        let Some(src) = self.src.as_mut() else {
            return Ok(0);
        };
        let pair = src.pair();
        let Some(ring) = src.ring() else { return Ok(0) };
        let n = ring.poll_avail().map_err(|b| (Side::Src, b))?.min(BURST);
        if n == 0 {
            return Ok(0);
        }
        let mut c = BurstCounts::default();
        let res = Self::consume_tx(ring, &mut self.a, n, max_frame, &mut c, |_, _| {});
        src.dev.stats[pair].flush_rx(&c);
        res.map_err(|b| (Side::Src, b))
    }

    /// Takes `n` available chains from `ring` (a guest's transmit queue, `n` at most
    /// what `poll_avail` reported): each is walked into `chain` and classified
    /// ([`tx_frame`](Self::tx_frame)); a frame is counted in `c` and handed to
    /// `frame(chain, len)`, a bad one counted as a drop. Every chain is completed with
    /// length 0 and the used index published once. Returns the chains completed, or the
    /// bad descriptor that stopped the burst (the chains before it are completed).
    #[inline(always)]
    pub(crate) fn consume_tx(
        ring: &mut DeviceRing,
        chain: &mut Chain,
        n: u16,
        max_frame: u64,
        c: &mut BurstCounts,
        mut frame: impl FnMut(&Chain, u64),
    ) -> Result<usize, RingFault> {
        let mut done = 0;
        let mut failed = None;
        for i in 0..n {
            let head = match ring.head(i).and_then(|h| ring.walk(h, Dir::DeviceReads, chain).map(|_| h)) {
                Ok(h) => h,
                Err(b) => {
                    failed = Some(b);
                    break;
                }
            };
            match Self::tx_frame(chain, max_frame) {
                Ok(len) => {
                    c.rx_packets += 1;
                    c.rx_bytes += len;
                    frame(chain, len);
                }
                Err(why) => c.drop(why),
            }
            ring.add_used(head, 0);
            done += 1;
        }
        ring.consume(done);
        ring.publish_used();
        match failed {
            Some(b) => Err(b),
            None => Ok(done as usize),
        }
    }

    fn run_gen(&mut self) -> Result<usize, (Side, RingFault)> {
        let Job::Gen { frame, seq, .. } = &mut self.job else {
            return Ok(0);
        };
        let Some(dst) = self.dst.as_mut() else {
            return Ok(0);
        };
        let pair = dst.pair();
        let dev = dst.dev.clone();
        let Some((ring, rx)) = dst.ring_rx() else { return Ok(0) };
        let avail = ring.poll_avail().map_err(|b| (Side::Dst, b))?.min(BURST);
        if avail == 0 {
            return Ok(0);
        }
        let n = dev.take_gen_budget(avail as u64) as u16;
        let mut c = BurstCounts::default();
        // Frames go to the guest's current address; the filter decides once per burst
        // (every frame of a burst has the same header).
        let eth = NET_HDR_LEN..NET_HDR_LEN + 6;
        if frame[eth.clone()] != rx.mac {
            frame[eth].copy_from_slice(&rx.mac);
        }
        if !rx.accepts(&frame[NET_HDR_LEN..NET_HDR_LEN + FILTER_BYTES]) {
            c.drops[DropReason::Filtered as usize] += n as u64;
            dev.stats[pair].flush_tx(&c);
            dev.generated.fetch_add(n as u64, Ordering::Relaxed);
            return Ok(0);
        }
        let mut done = 0u16;
        let mut dropped = 0u16;
        let mut failed = None;
        let need = frame.len() as u64;
        for i in 0..n {
            let walked = ring.head(i).and_then(|h| ring.walk(h, Dir::DeviceWrites, &mut self.b).map(|_| h));
            let head = match walked {
                Ok(h) => h,
                Err(b) => {
                    failed = Some(b);
                    break;
                }
            };
            let capacity: u64 = self.b.segs().iter().map(|s| s.len as u64).sum();
            if capacity < need {
                // The guest's buffer cannot hold the frame: drop the frame, leave the
                // buffer where it is (as DPDK's vhost does without mergeable buffers).
                c.drop(DropReason::RxBufferTooSmall);
                dropped += 1;
                break;
            }
            let at = NET_HDR_LEN + GEN_SEQ_OFFSET + GEN_MAGIC.len();
            frame[at..at + 8].copy_from_slice(&seq.to_le_bytes());
            *seq += 1;
            scatter(&self.b, 0, frame);
            ring.add_used(head, need as u32);
            c.tx_packets += 1;
            c.tx_bytes += need - NET_HDR_LEN as u64;
            done += 1;
        }
        ring.consume(done);
        ring.publish_used();
        dev.stats[pair].flush_tx(&c);
        dev.generated.fetch_add((done + dropped) as u64, Ordering::Relaxed);
        dev.return_gen_budget((n - done - dropped) as u64);
        match failed {
            Some(b) => Err((Side::Dst, b)),
            None => Ok(done as usize),
        }
    }

    /// `gen` with `--gso-size`: one super-frame per receive buffer while guest TSO4 is
    /// on, MSS-sized segments (one per buffer) otherwise; the budget (`--count`) and
    /// `generated` count super-frames, `tx_packets` the frames delivered.
    fn run_gen_tcp(&mut self) -> Result<usize, (Side, RingFault)> {
        let Job::Gen { seq, tcp: Some(tcp), .. } = &mut self.job else {
            return Ok(0);
        };
        let Some(dst) = self.dst.as_mut() else {
            return Ok(0);
        };
        let pair = dst.pair();
        let dev = dst.dev.clone();
        let Some((ring, rx)) = dst.ring_rx() else { return Ok(0) };
        let avail = ring.poll_avail().map_err(|b| (Side::Dst, b))?.min(BURST);
        if avail == 0 {
            return Ok(0);
        }
        let mut c = BurstCounts::default();
        let mut started = 0u64;
        tcp.set_dst_mac(rx.mac);
        if !rx.accepts(tcp.eth_header()) {
            // Rejected: the rest of a super-frame in progress, and as many new ones as
            // there are buffers, are dropped without touching a buffer.
            if tcp.in_progress() {
                tcp.abort();
                c.drop(DropReason::Filtered);
            }
            let n = dev.take_gen_budget(avail as u64);
            c.drops[DropReason::Filtered as usize] += n;
            dev.stats[pair].flush_tx(&c);
            dev.generated.fetch_add(n, Ordering::Relaxed);
            *seq += n;
            return Ok(0);
        }
        let (tso, csum) = (rx.tso4(), rx.csum());
        let mut done = 0u16;
        let mut failed = None;
        for i in 0..avail {
            if !tcp.in_progress() {
                if dev.take_gen_budget(1) == 0 {
                    break;
                }
                tcp.start(*seq);
                *seq += 1;
                started += 1;
            }
            let walked = ring.head(i).and_then(|h| ring.walk(h, Dir::DeviceWrites, &mut self.b).map(|_| h));
            let head = match walked {
                Ok(h) => h,
                Err(b) => {
                    failed = Some(b);
                    break;
                }
            };
            let capacity: u64 = self.b.segs().iter().map(|s| s.len as u64).sum();
            if capacity < tcp.next_len(tso) as u64 {
                // As in `run_gen`: the frame is dropped, the buffer stays.
                tcp.abort();
                c.drop(DropReason::RxBufferTooSmall);
                break;
            }
            let len = tcp.emit(&self.b, tso, csum);
            ring.add_used(head, len as u32);
            c.tx_packets += 1;
            c.tx_bytes += (len - NET_HDR_LEN) as u64;
            done += 1;
        }
        ring.consume(done);
        ring.publish_used();
        dev.stats[pair].flush_tx(&c);
        dev.generated.fetch_add(started, Ordering::Relaxed);
        match failed {
            Some(b) => Err((Side::Dst, b)),
            None => Ok(done as usize),
        }
    }

    /// The control queue: each chain is a command (device-readable bytes: class,
    /// command, data) followed by room for the one-byte ack (device-writable). The device
    /// applies it (and waits until the data workers run with the result) before the ack
    /// is written; a refused command is acknowledged `VIRTIO_NET_ERR`. A chain that
    /// breaks the ring protocol breaks the control queue only.
    fn run_ctrl(&mut self) -> Result<usize, (Side, RingFault)> {
        let Job::Ctrl { buf } = &mut self.job else {
            return Ok(0);
        };
        let Some(src) = self.src.as_mut() else {
            return Ok(0);
        };
        let dev = src.dev.clone();
        let Some(ring) = src.ring() else { return Ok(0) };
        let n = ring.poll_avail().map_err(|b| (Side::Src, b))?.min(CTRL_BURST);
        let mut done = 0;
        let mut failed = None;
        for i in 0..n {
            let walked =
                ring.head(i).and_then(|h| ring.walk(h, Dir::ReadsThenWrites, &mut self.a).map(|_| h));
            let head = match walked {
                Ok(h) => h,
                Err(b) => {
                    failed = Some(b);
                    break;
                }
            };
            let chain = &self.a;
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

    fn run_hand_out(&mut self) -> Result<usize, (Side, RingFault)> {
        let Job::HandOut(sender) = &mut self.job else { return Ok(0) };
        let Some(src) = self.src.as_mut() else { return Ok(0) };
        let pair = src.pair();
        let Some(ring) = src.active.as_mut().map(|a| &mut a.ring) else {
            sender.flush();
            return Ok(0);
        };
        let mut c = BurstCounts::default();
        let res = sender.run(ring, &mut self.a, BURST, self.max_frame, &mut c);
        src.dev.stats[pair].flush_rx(&c);
        res.map_err(|b| (Side::Src, b))
    }

    fn run_hand_in(&mut self) -> Result<usize, (Side, RingFault)> {
        let Job::HandIn(receiver) = &mut self.job else { return Ok(0) };
        let Some(dst) = self.dst.as_mut() else { return Ok(0) };
        let pair = dst.pair();
        let dev = dst.dev.clone();
        let mut c = BurstCounts::default();
        let res = receiver.run(dst.ring_rx(), &mut self.b, BURST as usize, &mut c);
        dev.stats[pair].flush_tx(&c);
        res.map_err(|b| (Side::Dst, b))
    }

    fn run_forward(&mut self, swap_mac: bool) -> Result<usize, (Side, RingFault)> {
        let max_frame = self.max_frame;
        let (Some(src), Some(dst)) = (self.src.as_mut(), self.dst.as_mut()) else {
            return Ok(0);
        };
        let (spair, dpair) = (src.pair(), dst.pair());
        let (sdev, ddev) = (src.dev.clone(), dst.dev.clone());
        let Some(sring) = src.active.as_mut().map(|a| &mut a.ring) else {
            return Ok(0);
        };
        let ntx = sring.poll_avail().map_err(|b| (Side::Src, b))?.min(BURST);
        if ntx == 0 {
            return Ok(0);
        }
        let (mut dring, filter) = match dst.ring_rx() {
            // The filter is looked at per frame only when it is not promiscuous.
            Some((r, rx)) => (Some(r), Some(rx).filter(|rx| !rx.pass_all())),
            None => (None, None),
        };
        let nrx = match dring.as_deref_mut() {
            Some(r) => r.poll_avail().map_err(|b| (Side::Dst, b))?,
            None => 0,
        };
        let peer_down = dring.is_none();
        if let Some(dr) = dring.as_deref_mut() {
            // The receive buffers' header line and first frame line, for the whole
            // burst, before any copy (see `DeviceRing::prefetch_write`).
            for j in 0..nrx.min(ntx) {
                dr.prefetch_write(j, 2);
            }
        }
        let mut sc = BurstCounts::default();
        let mut dc = BurstCounts::default();
        let (mut tx_done, mut rx_done) = (0u16, 0u16);
        let mut failed = None;
        for i in 0..ntx {
            if !peer_down && rx_done == nrx {
                break; // backpressure: the frame waits for a receive buffer
            }
            let walked = sring.head(i).and_then(|h| sring.walk(h, Dir::DeviceReads, &mut self.a).map(|_| h));
            let th = match walked {
                Ok(h) => h,
                Err(b) => {
                    failed = Some((Side::Src, b));
                    break;
                }
            };
            let len = match Self::tx_frame(&self.a, max_frame) {
                Ok(len) => len,
                Err(why) => {
                    sc.drop(why);
                    sring.add_used(th, 0);
                    tx_done += 1;
                    continue;
                }
            };
            sc.rx_packets += 1;
            sc.rx_bytes += len;
            let Some(dr) = dring.as_deref_mut() else {
                sc.drop(DropReason::PeerDown);
                sring.add_used(th, 0);
                tx_done += 1;
                continue;
            };
            if let Some(rx) = filter {
                // The header as it will be delivered (addresses swapped with --swap-mac).
                let mut hdr = [0u8; FILTER_BYTES];
                let got = gather(&self.a, NET_HDR_LEN, &mut hdr);
                if swap_mac {
                    hdr[..12].rotate_left(6);
                }
                if !rx.accepts(&hdr[..got]) {
                    dc.drop(DropReason::Filtered);
                    sring.add_used(th, 0);
                    tx_done += 1;
                    continue;
                }
            }
            let walked = dr.head(rx_done).and_then(|h| dr.walk(h, Dir::DeviceWrites, &mut self.b).map(|_| h));
            let rh = match walked {
                Ok(h) => h,
                Err(b) => {
                    // The frame stays in the transmit ring; only the receive side is broken.
                    sc.rx_packets -= 1;
                    sc.rx_bytes -= len;
                    failed = Some((Side::Dst, b));
                    break;
                }
            };
            let need = NET_HDR_LEN as u64 + len;
            let capacity: u64 = self.b.segs().iter().map(|s| s.len as u64).sum();
            sring.add_used(th, 0);
            tx_done += 1;
            if capacity < need {
                dc.drop(DropReason::RxBufferTooSmall);
                break; // the receive buffer stays; this frame is dropped
            }
            let mut hdr = [0u8; NET_HDR_LEN];
            hdr[NET_HDR_NUM_BUFFERS..NET_HDR_NUM_BUFFERS + 2].copy_from_slice(&1u16.to_le_bytes());
            scatter(&self.b, 0, &hdr);
            copy_chain(&self.a, NET_HDR_LEN, &self.b, NET_HDR_LEN, len as usize);
            if swap_mac {
                let mut macs = [0u8; 12];
                gather(&self.a, NET_HDR_LEN, &mut macs);
                macs.rotate_left(6);
                scatter(&self.b, NET_HDR_LEN, &macs);
            }
            dr.add_used(rh, need as u32);
            rx_done += 1;
            dc.tx_packets += 1;
            dc.tx_bytes += len;
        }
        sring.consume(tx_done);
        match dring {
            Some(dr) => {
                dr.consume(rx_done);
                DeviceRing::publish_used_pair(sring, dr);
            }
            None => {
                sring.publish_used();
            }
        }
        sdev.stats[spair].flush_rx(&sc);
        ddev.stats[dpair].flush_tx(&dc);
        match failed {
            Some(f) => Err(f),
            None => Ok(tx_done as usize),
        }
    }
}

/// A UDP/IPv4 frame of `len` bytes (60 ≤ len) from 10.0.0.1:9 to 10.0.0.2:9, destined to
/// `dst_mac`, whose payload starts with [`GEN_MAGIC`] and an 8-byte little-endian
/// sequence number (patched per frame). The IPv4 header checksum is valid; the UDP
/// checksum is 0 (none), which IPv4 allows.
pub fn udp_frame(dst_mac: [u8; 6], len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (len - 14) as u16;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64; // TTL
    ip[9] = 17; // UDP
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
    let csum = spec::frame::inet_checksum(ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&9u16.to_be_bytes());
    udp[2..4].copy_from_slice(&9u16.to_be_bytes());
    udp[4..6].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f[GEN_SEQ_OFFSET..GEN_SEQ_OFFSET + 4].copy_from_slice(&GEN_MAGIC);
    for (i, b) in f[GEN_SEQ_OFFSET + 12..].iter_mut().enumerate() {
        *b = i as u8;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_frame_is_valid_udp_ipv4() {
        let f = udp_frame([2, 0, 0, 0, 0, 2], 64);
        assert_eq!(f.len(), 64);
        assert_eq!(&f[12..14], &[0x08, 0x00]);
        assert_eq!(spec::frame::inet_checksum(&f[14..34]), 0, "a valid header sums to 0xffff");
        assert_eq!(u16::from_be_bytes([f[16], f[17]]), 50);
        assert_eq!(u16::from_be_bytes([f[38], f[39]]), 30);
        assert_eq!(&f[GEN_SEQ_OFFSET..GEN_SEQ_OFFSET + 4], b"VNET");
    }
}
