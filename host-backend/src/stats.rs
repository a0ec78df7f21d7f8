//! Per-queue-pair counters, shared between one worker (the only writer) and the stats
//! reporter, and their text and JSON renderings.
//!
//! Owns: the counter layout and names, and the per-burst accumulator workers flush once
//! per burst (one relaxed `fetch_add` per counter that changed, never per packet).
//! Must not: know about rings or sockets.
//!
//! Direction naming is the device's, as DPDK's vhost PMD names it: `rx` = frames the
//! guest transmitted to us, `tx` = frames we delivered into the guest's receive queue.
//! Byte counts are frame bytes, without the 12-byte virtio-net header.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    /// A descriptor broke the protocol (the queue is now broken).
    BadDescriptor = 0,
    /// A transmitted frame longer than MTU + Ethernet header (+ one VLAN tag).
    Oversize,
    /// The guest's receive buffer was too small for header and frame.
    RxBufferTooSmall,
    /// A transmitted chain shorter than the net header plus an Ethernet header.
    ShortFrame,
    /// The destination queue is not running (not connected, not enabled, or broken).
    PeerDown,
    /// A chain with more than `MAX_SEGS` buffers.
    TooManySegments,
    /// The receiving device's filters (RX mode, MAC table, VLAN table, set through its
    /// control queue) reject the frame.
    Filtered,
    /// A transmitted frame asks for an offload its driver did not negotiate
    /// (`NEEDS_CSUM` without `CSUM`, a GSO type without its `HOST_*` feature).
    OffloadNotNegotiated,
    /// A transmitted super-frame whose GSO request cannot be carried out: an unknown or
    /// unsupported `gso_type`, a `gso_size` of 0 or one whose segments would not fit the
    /// MTU, a frame that is not TCP/UDP over IPv4/IPv6 as the type says, too many
    /// segments.
    BadGso,
    /// A transmitted frame whose checksum request is wrong: the checksum field outside
    /// the frame, at an odd offset, or not the transport header's.
    BadCsum,
    /// A transmitted frame with an offload request whose chain ends inside the headers
    /// the request needs (Ethernet, IP, TCP or UDP).
    TruncatedHeader,
    /// `tap`: the kernel refused a frame the guest sent (the tap's `write` failed: the
    /// interface is down, or the kernel rejected the virtio-net header).
    KernelRefused,
    /// `tap`: a frame the kernel sent to the tap had no receive buffer to go to (the
    /// guest's receive queue is not running), so it was read and dropped.
    NoBuffer,
    /// `afpacket`: frames the kernel dropped because the socket's receive ring was full
    /// (its `PACKET_STATISTICS` `tp_drops`).
    KernelRingFull,
    /// With mergeable receive buffers: a frame that needs more receive buffers than the
    /// guest's receive ring can ever offer at once (every descriptor of the ring is
    /// posted and their room is too small, or it would take more than `port::mrg`'s
    /// limit of chains). Dropped rather than waited for: no buffer the guest can post
    /// would make it fit, and the frames behind it keep flowing.
    RxRingTooSmall,
}

/// Number of drop reasons.
pub const DROP_REASONS: usize = 15;
/// JSON/text names of the drop reasons, in `DropReason` order.
pub const DROP_NAMES: [&str; DROP_REASONS] = [
    "bad_descriptor",
    "oversize",
    "rx_buffer_too_small",
    "short_frame",
    "peer_down",
    "too_many_segments",
    "filtered",
    "offload_not_negotiated",
    "bad_gso",
    "bad_csum",
    "truncated_header",
    "kernel_refused",
    "no_buffer",
    "kernel_ring_full",
    "rx_ring_too_small",
];

/// What the host offloads did with the frames a queue pair's driver transmitted that
/// asked for one (`port::offload`); counted on the sending pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum OffloadEvent {
    /// A frame asking for a checksum only (`NEEDS_CSUM`, no GSO type), accepted.
    CsumRequests = 0,
    /// A super-frame (a GSO type), accepted.
    GsoRequests,
    /// A frame delivered whole with its offload header: the receiving driver negotiated
    /// the matching `GUEST_*` offload.
    PassedWhole,
    /// A checksum completed here (the receiver did not negotiate `GUEST_CSUM`).
    SwCsum,
    /// A super-frame segmented here (the receiver did not negotiate its `GUEST_TSO*`).
    SwGso,
    /// The segments those super-frames made.
    SwSegments,
}

/// Number of offload events.
pub const OFFLOAD_EVENTS: usize = 6;
/// JSON/text names of the offload events, in `OffloadEvent` order.
pub const OFFLOAD_NAMES: [&str; OFFLOAD_EVENTS] =
    ["csum_requests", "gso_requests", "passed_whole", "sw_csum", "sw_gso", "sw_segments"];

/// Offload events of one frame (or a few), added to [`PairStats`] right away (`--handoff`:
/// at the end of the burst, as both of its workers add to the sending pair's): the
/// offload path is out of line and per super-frame, so the 64-byte bursts' accumulator
/// ([`BurstCounts`]) does not carry them.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct OffloadCounts(pub [u64; OFFLOAD_EVENTS]);

impl OffloadCounts {
    /// Counts `n` of `what`.
    #[inline]
    pub fn add(&mut self, what: OffloadEvent, n: u64) {
        self.0[what as usize] += n;
    }
}

/// Counters of one queue pair. Cache-line aligned: the pairs of one device sit side by
/// side in a `Vec`, and pairs served by different workers must not share a line that
/// both write once per burst.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct PairStats {
    /// Frames received from the guest (its TX queue).
    pub rx_packets: AtomicU64,
    /// Their bytes.
    pub rx_bytes: AtomicU64,
    /// Frames delivered to the guest (its RX queue).
    pub tx_packets: AtomicU64,
    /// Their bytes.
    pub tx_bytes: AtomicU64,
    /// Drops by reason.
    pub drops: [AtomicU64; DROP_REASONS],
    /// Offload events ([`OffloadEvent`]) of frames this pair's driver transmitted.
    pub offloads: [AtomicU64; OFFLOAD_EVENTS],
    /// A queue of this pair is broken.
    pub broken: AtomicBool,
}

/// A worker's counts for one burst, flushed into [`PairStats`] at its end.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct BurstCounts {
    /// See [`PairStats`].
    pub rx_packets: u64,
    /// See [`PairStats`].
    pub rx_bytes: u64,
    /// See [`PairStats`].
    pub tx_packets: u64,
    /// See [`PairStats`].
    pub tx_bytes: u64,
    /// See [`PairStats`].
    pub drops: [u64; DROP_REASONS],
}

impl BurstCounts {
    /// Counts one drop.
    #[inline]
    pub fn drop(&mut self, why: DropReason) {
        self.drops[why as usize] += 1;
    }
    /// Adds another accumulator's counts (out-of-line work counts into its own). Always
    /// inlined, so that the burst's own accumulator never has its address taken.
    #[inline(always)]
    pub fn add(&mut self, o: &BurstCounts) {
        self.rx_packets += o.rx_packets;
        self.rx_bytes += o.rx_bytes;
        self.tx_packets += o.tx_packets;
        self.tx_bytes += o.tx_bytes;
        for (d, s) in self.drops.iter_mut().zip(o.drops) {
            *d += s;
        }
    }
}

fn add(c: &AtomicU64, v: u64) {
    if v != 0 {
        // Relaxed: a statistics counter; readers need no ordering with anything else.
        c.fetch_add(v, Ordering::Relaxed);
    }
}

impl PairStats {
    /// Adds the receive-side (from guest) part of a burst.
    pub fn flush_rx(&self, b: &BurstCounts) {
        add(&self.rx_packets, b.rx_packets);
        add(&self.rx_bytes, b.rx_bytes);
        self.flush_drops(b);
    }
    /// Adds the transmit-side (to guest) part of a burst.
    pub fn flush_tx(&self, b: &BurstCounts) {
        add(&self.tx_packets, b.tx_packets);
        add(&self.tx_bytes, b.tx_bytes);
        self.flush_drops(b);
    }
    fn flush_drops(&self, b: &BurstCounts) {
        for (c, v) in self.drops.iter().zip(b.drops) {
            add(c, v);
        }
    }
    /// Adds offload events.
    pub fn flush_offloads(&self, o: &OffloadCounts) {
        for (c, v) in self.offloads.iter().zip(o.0) {
            add(c, v);
        }
    }
    /// A plain copy of the counters.
    pub fn snapshot(&self) -> PairSnapshot {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PairSnapshot {
            rx_packets: l(&self.rx_packets),
            rx_bytes: l(&self.rx_bytes),
            tx_packets: l(&self.tx_packets),
            tx_bytes: l(&self.tx_bytes),
            drops: std::array::from_fn(|i| l(&self.drops[i])),
            offloads: std::array::from_fn(|i| l(&self.offloads[i])),
            broken: self.broken.load(Ordering::Relaxed),
        }
    }
}

/// Counters of one queue pair at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PairSnapshot {
    /// Frames received from the guest (its TX queue).
    pub rx_packets: u64,
    /// Their bytes (without the virtio-net header).
    pub rx_bytes: u64,
    /// Frames delivered to the guest (its RX queue).
    pub tx_packets: u64,
    /// Their bytes (without the virtio-net header).
    pub tx_bytes: u64,
    /// Drops by reason ([`DropReason`] indexes it, [`DROP_NAMES`] names it).
    pub drops: [u64; DROP_REASONS],
    /// Offload events of frames this pair's driver transmitted ([`OffloadEvent`]
    /// indexes it, [`OFFLOAD_NAMES`] names it).
    pub offloads: [u64; OFFLOAD_EVENTS],
    /// A queue of this pair is broken.
    pub broken: bool,
}

/// Counters of one device at one moment.
#[derive(Debug, Clone)]
pub struct DeviceSnapshot {
    /// The device's socket path.
    pub socket: String,
    /// Port kind name.
    pub port: &'static str,
    /// A front-end is connected.
    pub connected: bool,
    /// Frames a `gen` port produced (delivered plus dropped).
    pub generated: u64,
    /// Per queue pair.
    pub pairs: Vec<PairSnapshot>,
    /// The control queue's commands.
    pub ctrl: CtrlSnapshot,
    /// Queue pairs whose receive queues carry traffic (`VQ_PAIRS_SET`).
    pub active_pairs: u16,
    /// The receive filter and guest-offload state (see `RxConfig::to_json`).
    pub rx_filter: serde_json::Value,
    /// The IOTLB protocol (under a vIOMMU).
    pub iotlb: IotlbSnapshot,
    /// `tap`: the interface name (the JSON's `"tap"`, present on tap devices only).
    pub tap: Option<String>,
    /// What the front-end had refused or took away (see `device::PeerCounters`).
    pub peer: PeerSnapshot,
    /// Rings handed to workers over the device's life (each setup, and each re-sync
    /// after a change of this device's state).
    pub activations: u64,
}

/// Front-end messages refused and memory lost on one device (the JSON's `"peer"`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PeerSnapshot {
    /// `SET_MEM_TABLE` messages refused.
    pub mem_table_refused: u64,
    /// Kick, call or error file descriptors refused.
    pub fds_refused: u64,
    /// Memory tables truncated under the device.
    pub mem_faults: u64,
}

/// IOTLB counters of one device (see `device::IotlbCounters`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IotlbSnapshot {
    /// Translations the front-end added.
    pub updates: u64,
    /// Invalidations the front-end sent.
    pub invalidates: u64,
    /// Misses we sent.
    pub misses: u64,
    /// Requests refused.
    pub refused: u64,
    /// Misses never answered (counted as bad descriptors).
    pub timeouts: u64,
    /// Translations held now.
    pub entries: u64,
}

/// Counters of one device's control queue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CtrlSnapshot {
    /// Commands acknowledged `VIRTIO_NET_OK`.
    pub ok: u64,
    /// Commands refused (`VIRTIO_NET_ERR`, or no room to acknowledge).
    pub err: u64,
    /// The control queue broke on a protocol violation.
    pub broken: bool,
}

impl DeviceSnapshot {
    /// Sum over the queue pairs.
    pub fn total(&self) -> PairSnapshot {
        let mut t = PairSnapshot::default();
        for p in &self.pairs {
            t.rx_packets += p.rx_packets;
            t.rx_bytes += p.rx_bytes;
            t.tx_packets += p.tx_packets;
            t.tx_bytes += p.tx_bytes;
            for i in 0..DROP_REASONS {
                t.drops[i] += p.drops[i];
            }
            for i in 0..OFFLOAD_EVENTS {
                t.offloads[i] += p.offloads[i];
            }
            t.broken |= p.broken;
        }
        t
    }

    /// Queue pairs with a broken queue.
    pub fn broken_pairs(&self) -> usize {
        self.pairs.iter().filter(|p| p.broken).count()
    }

    fn named_json(names: &[&str], d: &[u64]) -> serde_json::Value {
        let m: serde_json::Map<String, serde_json::Value> =
            names.iter().zip(d).map(|(n, v)| (n.to_string(), (*v).into())).collect();
        serde_json::Value::Object(m)
    }

    /// The JSON object documented in the README.
    pub fn to_json(&self) -> serde_json::Value {
        let t = self.total();
        let queues: Vec<serde_json::Value> = self
            .pairs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                serde_json::json!({
                    "index": i,
                    "rx_packets": p.rx_packets, "rx_bytes": p.rx_bytes,
                    "tx_packets": p.tx_packets, "tx_bytes": p.tx_bytes,
                    "drops": Self::named_json(&DROP_NAMES, &p.drops),
                    "offloads": Self::named_json(&OFFLOAD_NAMES, &p.offloads),
                    "broken": p.broken,
                })
            })
            .collect();
        let mut v = serde_json::json!({
            "socket": self.socket, "port": self.port, "connected": self.connected,
            "rx_packets": t.rx_packets, "rx_bytes": t.rx_bytes,
            "tx_packets": t.tx_packets, "tx_bytes": t.tx_bytes,
            "generated": self.generated,
            "drops": Self::named_json(&DROP_NAMES, &t.drops),
            "offloads": Self::named_json(&OFFLOAD_NAMES, &t.offloads),
            "broken_queues": self.broken_pairs(),
            "queues": queues,
            "ctrl": {"commands": self.ctrl.ok, "errors": self.ctrl.err, "broken": self.ctrl.broken},
            "active_pairs": self.active_pairs,
            "rx_filter": self.rx_filter,
            "iotlb": {
                "updates": self.iotlb.updates, "invalidates": self.iotlb.invalidates,
                "misses": self.iotlb.misses, "refused": self.iotlb.refused,
                "timeouts": self.iotlb.timeouts, "entries": self.iotlb.entries,
            },
            "activations": self.activations,
            "peer": {
                "mem_table_refused": self.peer.mem_table_refused,
                "fds_refused": self.peer.fds_refused,
                "mem_faults": self.peer.mem_faults,
            },
        });
        if let (Some(name), Some(o)) = (&self.tap, v.as_object_mut()) {
            o.insert("tap".into(), name.clone().into());
        }
        v
    }

    /// Human-readable lines, in the spirit of testpmd's port statistics.
    pub fn to_text(&self, prev: Option<&DeviceSnapshot>, secs: f64) -> String {
        let t = self.total();
        let rate = |now: u64, before: Option<u64>| match before {
            Some(b) if secs > 0.0 => (now.saturating_sub(b)) as f64 / secs,
            _ => 0.0,
        };
        let pt = prev.map(|p| p.total());
        let drops: Vec<String> =
            DROP_NAMES.iter().zip(t.drops).filter(|(_, v)| *v > 0).map(|(n, v)| format!("{n}={v}")).collect();
        let offloads: Vec<String> = OFFLOAD_NAMES
            .iter()
            .zip(t.offloads)
            .filter(|(_, v)| *v > 0)
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        format!(
            "  {} [{}] {}\n    RX-packets: {:<14} RX-bytes: {:<16} Rx-pps: {:.0}\n    TX-packets: {:<14} TX-bytes: {:<16} Tx-pps: {:.0}\n    generated: {}  broken queue pairs: {}  drops: {}{}\n    control: {} ok, {} refused{}  active pairs: {}\n",
            self.socket,
            match &self.tap {
                Some(name) => format!("{} {name}", self.port),
                None => self.port.to_string(),
            },
            if self.connected { "connected" } else { "waiting for front-end" },
            t.rx_packets,
            t.rx_bytes,
            rate(t.rx_packets, pt.map(|p| p.rx_packets)),
            t.tx_packets,
            t.tx_bytes,
            rate(t.tx_packets, pt.map(|p| p.tx_packets)),
            self.generated,
            self.broken_pairs(),
            if drops.is_empty() { "none".to_string() } else { drops.join(" ") },
            if offloads.is_empty() { String::new() } else { format!("  offloads: {}", offloads.join(" ")) },
            self.ctrl.ok,
            self.ctrl.err,
            if self.ctrl.broken { " (queue broken)" } else { "" },
            self.active_pairs,
        )
    }
}
