//! A deliberately misbehaving vhost-user virtio-net device, for testing that the driver
//! treats the device as hostile (docs/ARCHITECTURE.md, "Trust boundaries": used ids and lengths are checked).
//!
//! The device runs in its own process (the `evil-device` binary of this crate, see
//! [`device_main`]) so that it shares with the driver under test exactly what a real
//! back-end shares: a unix socket, eventfds and the front-end's memory. The test side
//! drives it through [`EvilDevice`].
//!
//! # The device
//!
//! `evil-device SOCKET MODE [--good N] [--lifetime SECS] [--in-order] [--packed] [--mtu N] [--hang-on-stop]` listens on `SOCKET`, serves one
//! front-end with the `vhost` crate's back-end request handler and exits when it goes
//! away (or after `--lifetime` seconds, default 60, so that no test can hang on it). It
//! offers `VERSION_1 | MAC | STATUS | MTU | MRG_RXBUF | VHOST_USER_F_PROTOCOL_FEATURES` (plus
//! `VIRTIO_F_IN_ORDER` with `--in-order`: it always uses buffers in order; plus
//! `VIRTIO_F_RING_PACKED` with `--packed`: it then speaks the packed ring, virtio 1.2
//! §2.8, if the driver acks it, and the split ring otherwise), the protocol
//! features `MQ | REPLY_ACK | CONFIG`, and a config space with a fixed MAC
//! ([`DEVICE_MAC`]), link up, one queue pair and MTU 1500 ([`DEVICE_MTU`], or `--mtu`). It maps the front-end's memory
//! (`SET_MEM_TABLE`), translates ring addresses through each region's front-end virtual
//! address and buffer addresses through its guest-physical address, and once both rings
//! of pair 0 are started (addresses, kick fd, enabled) it polls them:
//!
//! * it reflects every frame the driver transmits (queue 1) into the next receive buffer
//!   (queue 0), completing the transmit buffer first and then the receive buffer, each
//!   with its own used-index release store; in `good` mode it does so forever;
//! * in a bad mode it reflects the first `N` frames (`--good`, default 3) faithfully, then
//!   waits for the next [`TRIGGER_FRAMES`] transmit buffers (made available in one burst)
//!   and answers them with the misbehaviour of its [`Mode`]: one bad used entry on the
//!   receive queue, or with a `-tx` suffix on the transmit queue. After that it never
//!   touches either ring again (it still answers vhost-user requests and snapshots).
//!
//! | mode | what the device writes | the driver must report |
//! |---|---|---|
//! | `id-out-of-range[-tx]` | a used element with id = queue size | `UsedIdOutOfRange` |
//! | `id-not-in-flight` | (rx: every descriptor is posted, so) a legitimate completion of a receive buffer and the same id again in the same publish | `UsedIdNotInFlight` |
//! | `id-not-in-flight-tx` | a used element naming the highest transmit descriptor id the driver never made available | `UsedIdNotInFlight` |
//! | `id-twice[-tx]` | a legitimate completion and the same id again, in one publish | `UsedIdNotInFlight` |
//! | `len-too-large[-tx]` | a used length one byte larger than the posted buffer | `UsedLenTooLarge` |
//! | `idx-jump[-tx]` | the used index advanced by the buffers in flight plus one (on rx, only once the ring is full, so the driver's count cannot move under it) | `UsedIdxJump` |
//! | `wrong-wrap[-tx]` | packed only: a used descriptor at the used position whose AVAIL/USED bits carry the other wrap counter | `UsedWrongWrap` |
//! | `used-ahead[-tx]` | packed only: a valid used descriptor for the SECOND buffer taken, written one position past the used position, which stays "available" | nothing: the driver must ignore it (reported as `AHEAD queue=Q pos=P id=I`, not `BAD`) |
//! | `mrg-zero` | receive only, MRG_RXBUF negotiated: a frame whose header says `num_buffers` 0 | `MergeZeroBuffers` |
//! | `mrg-beyond` | receive only, MRG_RXBUF: a frame whose header says 2 buffers, with only its first one used | `MergeBeyondUsed` |
//! | `mrg-bad-len` | receive only, MRG_RXBUF: a frame over 2 buffers whose second has used length 0 | `MergeBadLength` |
//!
//! On a packed ring "one publish" means what it does for a driver's burst: the used
//! descriptors are written in ring order, each one's flags word last, and the first one's
//! flags (with a release store) after all the others, so the driver sees them together.
//! `idx-jump` has no packed form (there is no used index); the packed modes need a
//! packed ring: the device stops (`BROKEN ...`) if the negotiated layout does not fit.
//!
//! With `--hang-on-stop` the device never answers `GET_VRING_BASE` (what a front-end
//! sends to stop a ring, at close): it prints `HANG GET_VRING_BASE` and blocks its
//! request loop until its lifetime ends, a back-end that stops answering.
//!
//! In receive-queue modes both trigger frames are completed correctly on the transmit
//! queue; in transmit-queue modes nothing is written to the receive queue.
//!
//! Where the device writes data for a bad entry into a receive buffer, that data carries
//! [`POISON`], so a test can prove no such packet was ever delivered.
//!
//! # Control channel
//!
//! The device prints one line on stdout per event: `STARTED` when the rings first run,
//! the report of the bad entry it wrote ([`format_report`]: `BAD queue=Q kind=... `), and
//! `DISCONNECTED`. It reads commands on stdin: `snap Q` answers
//! `SNAP q=Q avail_idx=I hash=H`, a hash of everything the driver writes into queue Q's
//! memory (descriptor table and avail ring), or `SNAP q=Q none`; `stats` answers
//! `STATS frames=F dead=D`; `link down` / `link up` clear or set `VIRTIO_NET_S_LINK_UP`
//! in the config space the driver reads (`LINK down` / `LINK up`).
//!
//! Ring memory is only touched through raw pointers with volatile or atomic accesses,
//! never through Rust references, as the driver and the host backend do.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use driver::layout::{self, features as f, net_config, Descriptor, DESC_F_WRITE, NET_HDR_LEN};
use driver::packed;
use driver::DeviceError;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, BackendListener, Error as VuError, GpuBackend, Listener, VhostUserBackendReqHandler,
};
use vhost::VhostUserMemoryRegionBase;
use vm_memory::{FileOffset, MmapRegion};

use crate::harness::{self, TempDir};

type VuResult<T> = std::result::Result<T, VuError>;

/// The driver's receive queue of pair 0.
pub const RX_QUEUE: u16 = 0;
/// The driver's transmit queue of pair 0.
pub const TX_QUEUE: u16 = 1;
/// Transmit buffers the test makes available in one burst to trigger the misbehaviour.
pub const TRIGGER_FRAMES: usize = 2;
/// Frames reflected faithfully before the trigger, unless `--good` says otherwise.
pub const DEFAULT_GOOD_FRAMES: u32 = 3;
/// Marker in every byte the device writes for a bad receive entry.
pub const POISON: &[u8; 16] = b"EVIL-DEVICE-DATA";
/// The MAC address in the device's config space.
pub const DEVICE_MAC: [u8; 6] = [0x02, 0xe7, 0x11, 0xde, 0x71, 0xce];
/// The MTU in the device's config space.
pub const DEVICE_MTU: u16 = 1500;

// ------------------------------------------------------------------------------ modes

/// One way of breaking the used-ring protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A used id at or beyond the queue size.
    IdOutOfRange,
    /// A used id the driver has not in flight (rx: a double completion, since every
    /// receive descriptor is posted; tx: an id never made available).
    IdNotInFlight,
    /// The same used id twice in one publish.
    IdTwice,
    /// A used length larger than the posted buffer.
    LenTooLarge,
    /// The used index moved by more than the buffers in flight.
    IdxJump,
    /// Packed ring: a used descriptor marked with the wrong wrap counter.
    WrongWrap,
    /// Packed ring: a used descriptor written one position ahead of the used position.
    UsedAhead,
    /// MRG_RXBUF: a received frame with `num_buffers` 0.
    MrgZero,
    /// MRG_RXBUF: a received frame that claims more buffers than were used.
    MrgBeyond,
    /// MRG_RXBUF: a received frame whose second buffer is empty.
    MrgBadLen,
}

impl Fault {
    /// Every fault.
    pub const ALL: [Fault; 10] = [
        Fault::IdOutOfRange,
        Fault::IdNotInFlight,
        Fault::IdTwice,
        Fault::LenTooLarge,
        Fault::IdxJump,
        Fault::WrongWrap,
        Fault::UsedAhead,
        Fault::MrgZero,
        Fault::MrgBeyond,
        Fault::MrgBadLen,
    ];

    /// The mode name (without the queue suffix).
    pub fn name(self) -> &'static str {
        match self {
            Fault::IdOutOfRange => "id-out-of-range",
            Fault::IdNotInFlight => "id-not-in-flight",
            Fault::IdTwice => "id-twice",
            Fault::LenTooLarge => "len-too-large",
            Fault::IdxJump => "idx-jump",
            Fault::WrongWrap => "wrong-wrap",
            Fault::UsedAhead => "used-ahead",
            Fault::MrgZero => "mrg-zero",
            Fault::MrgBeyond => "mrg-beyond",
            Fault::MrgBadLen => "mrg-bad-len",
        }
    }

    /// Whether the fault is one of the mergeable-receive lies (receive queue only, with
    /// `VIRTIO_NET_F_MRG_RXBUF` negotiated).
    pub fn merge(self) -> bool {
        matches!(self, Fault::MrgZero | Fault::MrgBeyond | Fault::MrgBadLen)
    }

    /// Whether the fault exists on a split ring (`idx-jump`) or a packed one
    /// (`wrong-wrap`, `used-ahead`); the others exist on both.
    pub fn fits(self, packed: bool) -> bool {
        match self {
            Fault::IdxJump => !packed,
            Fault::WrongWrap | Fault::UsedAhead => packed,
            _ => true,
        }
    }
}

/// What the device does: reflect faithfully (`fault: None`) or break `queue`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// The misbehaviour, if any.
    pub fault: Option<Fault>,
    /// The queue it is applied to ([`RX_QUEUE`] or [`TX_QUEUE`]).
    pub queue: u16,
}

impl Mode {
    /// The faithful device.
    pub const GOOD: Mode = Mode { fault: None, queue: RX_QUEUE };

    /// Parses `good`, `FAULT` (receive queue) or `FAULT-tx` (transmit queue).
    pub fn parse(s: &str) -> Result<Mode, String> {
        if s == "good" {
            return Ok(Mode::GOOD);
        }
        let (name, queue) = match s.strip_suffix("-tx") {
            Some(n) => (n, TX_QUEUE),
            None => (s, RX_QUEUE),
        };
        Fault::ALL.iter().find(|f| f.name() == name).map(|&f| Mode { fault: Some(f), queue }).ok_or_else(
            || {
                let names: Vec<_> = Fault::ALL.iter().map(|f| f.name()).collect();
                format!("unknown mode {s:?}: good, or one of {names:?} with an optional -tx suffix")
            },
        )
    }

    /// The mode as [`parse`](Self::parse) reads it.
    pub fn name(&self) -> String {
        match self.fault {
            None => "good".into(),
            Some(f) if self.queue == TX_QUEUE => format!("{}-tx", f.name()),
            Some(f) => f.name().into(),
        }
    }
}

// ------------------------------------------------------------------------------ reports

/// The line the device prints after writing a bad entry on `queue`: the error the driver
/// must report for it.
pub fn format_report(queue: u16, e: &DeviceError) -> String {
    match *e {
        DeviceError::UsedIdOutOfRange { id } => format!("BAD queue={queue} kind=id-out-of-range id={id}"),
        DeviceError::UsedIdNotInFlight { id } => format!("BAD queue={queue} kind=id-not-in-flight id={id}"),
        DeviceError::UsedLenTooLarge { len, posted } => {
            format!("BAD queue={queue} kind=len-too-large len={len} posted={posted}")
        }
        DeviceError::UsedIdxJump { moved, in_flight } => {
            format!("BAD queue={queue} kind=idx-jump moved={moved} in_flight={in_flight}")
        }
        DeviceError::UsedWrongWrap { pos, flags } => {
            format!("BAD queue={queue} kind=wrong-wrap pos={pos} flags={flags}")
        }
        DeviceError::MergeZeroBuffers => format!("BAD queue={queue} kind=mrg-zero"),
        DeviceError::MergeBeyondUsed { num_buffers, available } => {
            format!("BAD queue={queue} kind=mrg-beyond num_buffers={num_buffers} available={available}")
        }
        DeviceError::MergeBadLength { index, len, total } => {
            format!("BAD queue={queue} kind=mrg-bad-len index={index} len={len} total={total}")
        }
    }
}

/// Parses a [`format_report`] line.
pub fn parse_report(line: &str) -> Option<(u16, DeviceError)> {
    let mut words = line.split_whitespace();
    if words.next()? != "BAD" {
        return None;
    }
    let mut kv = std::collections::HashMap::new();
    for w in words {
        let (k, v) = w.split_once('=')?;
        kv.insert(k, v);
    }
    let num = |k: &str| kv.get(k).and_then(|v| v.parse::<u32>().ok());
    let queue = u16::try_from(num("queue")?).ok()?;
    let e = match *kv.get("kind")? {
        "id-out-of-range" => DeviceError::UsedIdOutOfRange { id: num("id")? },
        "id-not-in-flight" => DeviceError::UsedIdNotInFlight { id: num("id")? },
        "len-too-large" => DeviceError::UsedLenTooLarge { len: num("len")?, posted: num("posted")? },
        "idx-jump" => DeviceError::UsedIdxJump {
            moved: u16::try_from(num("moved")?).ok()?,
            in_flight: u16::try_from(num("in_flight")?).ok()?,
        },
        "wrong-wrap" => DeviceError::UsedWrongWrap {
            pos: u16::try_from(num("pos")?).ok()?,
            flags: u16::try_from(num("flags")?).ok()?,
        },
        "mrg-zero" => DeviceError::MergeZeroBuffers,
        "mrg-beyond" => DeviceError::MergeBeyondUsed {
            num_buffers: u16::try_from(num("num_buffers")?).ok()?,
            available: u16::try_from(num("available")?).ok()?,
        },
        "mrg-bad-len" => DeviceError::MergeBadLength {
            index: u16::try_from(num("index")?).ok()?,
            len: num("len")?,
            total: num("total")?,
        },
        _ => return None,
    };
    Some((queue, e))
}

// ------------------------------------------------------------------------------ device state

/// One region of the front-end's memory, mapped here.
struct Region {
    gpa: u64,
    uva: u64,
    len: u64,
    map: MmapRegion<()>,
}

/// Which address space an address is in.
#[derive(Clone, Copy)]
enum Space {
    /// Guest-physical (descriptor buffer addresses).
    Gpa,
    /// Front-end virtual (ring addresses in `SET_VRING_ADDR`).
    Uva,
}

#[derive(Default)]
struct Queue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    addr_set: bool,
    kick: Option<File>,
    call: Option<File>,
    err: Option<File>,
    enabled: bool,
    /// Stopped by GET_VRING_BASE (until the next SET_VRING_KICK).
    stopped: bool,
    /// Next avail entry to consume (packed: the next ring position to read).
    last_avail: u16,
    /// Next used index to publish (packed: the next ring position to write used).
    used_idx: u16,
    /// Packed: the avail and used wrap counters that go with `last_avail` and `used_idx`.
    avail_wrap: bool,
    used_wrap: bool,
    /// Descriptor ids the driver has ever made available.
    seen: Vec<bool>,
}

/// The rings of one queue, resolved to pointers into the mapped memory. Only valid while
/// the [`State`] lock that produced it is held (the mapping lives in the state).
///
/// A packed ring (`packed`) has the descriptor ring at `desc`, the driver event
/// suppression structure at `avail` and the device's at `used`.
#[derive(Clone, Copy)]
struct Ring {
    size: u16,
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    packed: bool,
}

impl Ring {
    fn mask(&self) -> u16 {
        self.size - 1
    }

    fn u16_atomic(&self, p: *mut u8) -> &AtomicU16 {
        // SAFETY: every caller passes a pointer to a 2-byte field inside a ring area that
        // `State::ring` bounds-checked against a mapped region (areas are at least
        // 2-aligned: the driver aligns them and `State::ring` checks it); atomics may
        // alias memory the other process writes.
        unsafe { AtomicU16::from_ptr(p as *mut u16) }
    }

    /// `avail.idx`, Acquire: pairs with the driver's Release store after it wrote the
    /// descriptors and avail entries it publishes.
    fn avail_idx(&self) -> u16 {
        // SAFETY: AVAIL_IDX (2) + 2 <= avail_bytes(size), checked in `State::ring`.
        self.u16_atomic(unsafe { self.avail.add(layout::AVAIL_IDX) }).load(Ordering::Acquire)
    }

    /// The descriptor id in avail entry `i` (free-running index).
    fn avail_id(&self, i: u16) -> u16 {
        // SAFETY: `avail_entry(i & mask)` + 2 <= avail_bytes(size); 2-aligned. Volatile:
        // the driver owns this memory; our acquire load of `avail.idx` ordered this read
        // after its write.
        u16::from_le(unsafe {
            std::ptr::read_volatile(self.avail.add(layout::avail_entry(i & self.mask())) as *const u16)
        })
    }

    /// Descriptor `id` (< size).
    fn desc(&self, id: u16) -> Descriptor {
        // SAFETY: `id < size`, so the 16 bytes lie inside the descriptor table checked in
        // `State::ring`; volatile as for `avail_id`.
        let b = unsafe {
            std::ptr::read_volatile(self.desc.add(id as usize * layout::DESC_SIZE) as *const [u8; 16])
        };
        Descriptor::from_le_bytes(b)
    }

    /// Writes used element `i` (free-running index); published by `publish_used`.
    fn put_used(&self, i: u16, id: u32, len: u32) {
        // SAFETY: `used_entry(i & mask)` + 8 <= used_bytes(size), 4-aligned (checked in
        // `State::ring`). Volatile: the driver reads it only after our release store of
        // `used.idx`.
        unsafe {
            let p = self.used.add(layout::used_entry(i & self.mask())) as *mut u32;
            std::ptr::write_volatile(p, id.to_le());
            std::ptr::write_volatile(p.add(1), len.to_le());
        }
    }

    /// `used.idx`, Release: the used elements and buffer contents written before are
    /// visible to the driver's acquire load.
    fn publish_used(&self, idx: u16) {
        // SAFETY: USED_IDX (2) + 2 <= used_bytes(size).
        self.u16_atomic(unsafe { self.used.add(layout::USED_IDX) }).store(idx, Ordering::Release);
    }

    /// `used.flags` (Relaxed: a hint the driver reads after its own fence).
    fn set_used_flags(&self, flags: u16) {
        // SAFETY: USED_FLAGS (0) + 2 <= used_bytes(size).
        self.u16_atomic(unsafe { self.used.add(layout::USED_FLAGS) }).store(flags, Ordering::Relaxed);
    }

    /// Asks the driver for no kicks: `used.flags = NO_NOTIFY`, or on a packed ring the
    /// device event suppression flags = DISABLE (§2.8.10). We poll.
    fn no_kicks(&self) {
        if self.packed {
            // SAFETY: EVENT_FLAGS (2) + 2 <= EVENT_SIZE, the device area checked in
            // `State::ring` (4-aligned).
            let p = unsafe { self.used.add(packed::EVENT_FLAGS) };
            // Relaxed: a hint, as `set_used_flags`.
            self.u16_atomic(p).store(packed::EVENT_FLAG_DISABLE.to_le(), Ordering::Relaxed);
        } else {
            self.set_used_flags(layout::USED_F_NO_NOTIFY);
        }
    }

    // ---- packed ring (virtio 1.2 §2.8) ----

    /// The flags word of packed descriptor `pos` (< size).
    fn pk_flags(&self, pos: u16) -> &AtomicU16 {
        debug_assert!(self.packed && pos < self.size);
        // SAFETY: `pos < size`: the descriptor lies inside the descriptor ring checked in
        // `State::ring` (16-aligned, so the flags word at offset 14 is 2-aligned).
        self.u16_atomic(unsafe { self.desc.add(pos as usize * packed::DESC_SIZE + packed::DESC_FLAGS) })
    }

    /// Whether packed descriptor `pos` is available for the avail wrap counter `wrap`.
    /// Acquire: pairs with the driver's release store of these flags (or of its burst's
    /// first descriptor's) after it wrote the descriptor.
    fn pk_is_avail(&self, pos: u16, wrap: bool) -> bool {
        packed::is_avail(u16::from_le(self.pk_flags(pos).load(Ordering::Acquire)), wrap)
    }

    /// Packed descriptor `pos` (< size), read after `pk_is_avail` acquired its flags.
    fn pk_desc(&self, pos: u16) -> packed::PackedDescriptor {
        debug_assert!(self.packed && pos < self.size);
        // SAFETY: `pos < size`, so the 16 bytes lie inside the descriptor ring checked in
        // `State::ring`; volatile: the driver owns this memory until we mark it used.
        let b = unsafe {
            std::ptr::read_volatile(self.desc.add(pos as usize * packed::DESC_SIZE) as *const [u8; 16])
        };
        let word = |r: &[u8]| {
            let mut w = [0u8; 8];
            w.copy_from_slice(r);
            u64::from_ne_bytes(w)
        };
        packed::PackedDescriptor::from_le_words(word(&b[..8]), word(&b[8..]))
    }

    /// `(pos, wrap)` one descriptor on, flipping `wrap` past the ring's end.
    fn pk_next(&self, pos: u16, wrap: bool) -> (u16, bool) {
        if pos + 1 == self.size {
            (0, !wrap)
        } else {
            (pos + 1, wrap)
        }
    }

    /// Writes `entries` (id, len) as used descriptors from `(pos, wrap)` on, in one
    /// publication: id and length with volatile stores, each flags word after them, the
    /// first one's flags last of all with a Release store (so the driver, which looks at
    /// that position first, sees the whole run and the buffer contents written before).
    /// With `lie`, every flags word carries the other wrap counter. Returns the position
    /// and wrap counter after the run.
    fn pk_write_used(&self, mut pos: u16, mut wrap: bool, entries: &[(u32, u32)], lie: bool) -> (u16, bool) {
        let mut first = None;
        for &(id, len) in entries {
            let flags = pk_used_flags(wrap != lie, len);
            // SAFETY: `pos < size` (positions only move through `pk_next`): inside the
            // descriptor ring checked in `State::ring`; the length (offset 8) and id
            // (offset 12) fields are aligned. Volatile: the driver reads them after our
            // release store below.
            unsafe {
                let d = self.desc.add(pos as usize * packed::DESC_SIZE);
                std::ptr::write_volatile(d.add(packed::DESC_LEN) as *mut u32, len.to_le());
                std::ptr::write_volatile(d.add(packed::DESC_ID) as *mut u16, (id as u16).to_le());
            }
            match first {
                None => first = Some((pos, flags)),
                // Relaxed: published by the first one's release store below.
                Some(_) => self.pk_flags(pos).store(flags.to_le(), Ordering::Relaxed),
            }
            (pos, wrap) = self.pk_next(pos, wrap);
        }
        if let Some((p, flags)) = first {
            self.pk_flags(p).store(flags.to_le(), Ordering::Release);
        }
        (pos, wrap)
    }

    /// FNV-1a over everything the driver writes into this queue: the descriptor table
    /// and the whole driver area.
    fn driver_hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |p: *const u8, n: usize| {
            for i in 0..n {
                // SAFETY: `p + n` is the end of an area checked in `State::ring`; volatile
                // byte reads of memory the driver may write concurrently.
                let b = unsafe { std::ptr::read_volatile(p.add(i)) };
                h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
            }
        };
        if self.packed {
            eat(self.desc, packed::desc_ring_bytes(self.size));
            eat(self.avail, packed::EVENT_SIZE);
        } else {
            eat(self.desc, layout::desc_table_bytes(self.size));
            eat(self.avail, layout::avail_bytes(self.size));
        }
        h
    }
}

/// The flags word of a used packed descriptor: AVAIL = USED = `wrap`, and WRITE when the
/// device wrote `len > 0` bytes (§2.8.4).
fn pk_used_flags(wrap: bool, len: u32) -> u16 {
    packed::used_flags(wrap) | if len > 0 { packed::DESC_F_WRITE } else { 0 }
}

struct State {
    mode: Mode,
    good_frames: u32,
    /// Offer `VIRTIO_F_IN_ORDER` (`--in-order`).
    in_order: bool,
    /// Offer `VIRTIO_F_RING_PACKED` (`--packed`).
    packed: bool,
    /// The MTU in the config space (`--mtu`).
    mtu: u16,
    /// Never answer `GET_VRING_BASE` (`--hang-on-stop`).
    hang_on_stop: bool,
    acked_features: u64,
    regions: Vec<Region>,
    queues: [Queue; 2],
    /// Frames reflected faithfully.
    frames: u64,
    /// The config space's `VIRTIO_NET_S_LINK_UP` is clear (stdin `link down`).
    link_down: bool,
    /// The bad entry is written (or the driver broke the protocol): rings untouched.
    dead: bool,
    started: bool,
}

/// A problem with what the driver (front-end) wrote: the device stops its data path.
struct Stop(String);

fn stop<T>(msg: impl Into<String>) -> Result<T, Stop> {
    Err(Stop(msg.into()))
}

impl State {
    fn new(mode: Mode, good_frames: u32, in_order: bool, packed: bool) -> State {
        State {
            mode,
            good_frames,
            in_order,
            packed,
            mtu: DEVICE_MTU,
            hang_on_stop: false,
            acked_features: 0,
            regions: Vec::new(),
            queues: [Queue::default(), Queue::default()],
            frames: 0,
            link_down: false,
            dead: false,
            started: false,
        }
    }

    /// Host pointer for `[addr, addr + len)` in `space`, if one region holds all of it.
    fn translate(&self, space: Space, addr: u64, len: u64) -> Option<*mut u8> {
        let end = addr.checked_add(len)?;
        self.regions.iter().find_map(|r| {
            let start = match space {
                Space::Gpa => r.gpa,
                Space::Uva => r.uva,
            };
            if addr >= start && end <= start + r.len {
                // SAFETY: `addr - start + len <= r.len`, the size of the mapping.
                Some(unsafe { r.map.as_ptr().add((addr - start) as usize) })
            } else {
                None
            }
        })
    }

    fn runnable(&self, q: usize) -> bool {
        let qu = &self.queues[q];
        let protocol = self.acked_features & f::bit(f::VHOST_USER_PROTOCOL_FEATURES) != 0;
        !self.regions.is_empty()
            && qu.size != 0
            && qu.addr_set
            && qu.kick.is_some()
            && (qu.enabled || !protocol)
            && !qu.stopped
    }

    /// Whether the driver acked `VIRTIO_F_RING_PACKED`.
    fn packed_ring(&self) -> bool {
        self.acked_features & f::bit(f::RING_PACKED) != 0
    }

    /// Queue `q`'s rings, if it is runnable and its areas are mapped.
    fn ring(&self, q: usize) -> Option<Ring> {
        if !self.runnable(q) {
            return None;
        }
        let qu = &self.queues[q];
        let size = qu.size;
        let packed = self.packed_ring();
        let (d, a, u) = if packed {
            (packed::desc_ring_bytes(size), packed::EVENT_SIZE, packed::EVENT_SIZE)
        } else {
            (layout::desc_table_bytes(size), layout::avail_bytes(size), layout::used_bytes(size))
        };
        let desc = self.translate(Space::Uva, qu.desc, d as u64)?;
        let avail = self.translate(Space::Uva, qu.avail, a as u64)?;
        let used = self.translate(Space::Uva, qu.used, u as u64)?;
        if desc as usize & 15 != 0 || avail as usize & 3 != 0 || used as usize & 3 != 0 {
            return None;
        }
        Some(Ring { size, desc, avail, used, packed })
    }

    /// Buffers the driver has made available on queue `q` and we have not taken: on a
    /// packed ring, the available descriptors in a row from our position (at most a ring).
    fn pending(&self, q: usize, ring: &Ring) -> Result<u16, Stop> {
        let qu = &self.queues[q];
        if !ring.packed {
            let n = ring.avail_idx().wrapping_sub(qu.last_avail);
            if n > ring.size {
                return stop(format!("queue {q}: avail index {n} ahead of the device"));
            }
            return Ok(n);
        }
        let (mut pos, mut wrap) = (qu.last_avail, qu.avail_wrap);
        let mut n = 0;
        while n < ring.size && ring.pk_is_avail(pos, wrap) {
            n += 1;
            (pos, wrap) = ring.pk_next(pos, wrap);
        }
        Ok(n)
    }

    /// Consumes the next avail entry of queue `q`: its id and descriptor, checked.
    fn take_avail(&mut self, q: usize, ring: &Ring) -> Result<(u16, Descriptor), Stop> {
        if ring.packed {
            return self.take_avail_packed(q, ring);
        }
        let qu = &mut self.queues[q];
        if qu.seen.len() != ring.size as usize {
            qu.seen = vec![false; ring.size as usize];
        }
        let id = ring.avail_id(qu.last_avail);
        if id >= ring.size {
            return stop(format!("queue {q}: avail entry names descriptor {id} of {}", ring.size));
        }
        let d = ring.desc(id);
        let want_write = q == RX_QUEUE as usize;
        if d.flags & !DESC_F_WRITE != 0 || (d.flags & DESC_F_WRITE != 0) != want_write {
            return stop(format!("queue {q}: descriptor {id} has flags {:#x}", d.flags));
        }
        if (d.len as usize) < NET_HDR_LEN || d.len > 65_536 {
            return stop(format!("queue {q}: descriptor {id} has length {}", d.len));
        }
        qu.last_avail = qu.last_avail.wrapping_add(1);
        qu.seen[id as usize] = true;
        Ok((id, d))
    }

    /// [`take_avail`](Self::take_avail) on a packed ring: the descriptor at our position
    /// must be available, alone (no NEXT, no INDIRECT: our driver posts one descriptor
    /// per buffer), of the queue's direction, with an id below the ring size (our
    /// driver's ids are) and a sane length. Returned with only its WRITE flag.
    fn take_avail_packed(&mut self, q: usize, ring: &Ring) -> Result<(u16, Descriptor), Stop> {
        let qu = &mut self.queues[q];
        if qu.seen.len() != ring.size as usize {
            qu.seen = vec![false; ring.size as usize];
        }
        let pos = qu.last_avail;
        if !ring.pk_is_avail(pos, qu.avail_wrap) {
            return stop(format!("queue {q}: descriptor {pos} is not available"));
        }
        let d = ring.pk_desc(pos);
        let want_write = q == RX_QUEUE as usize;
        let shape = d.flags & !(packed::DESC_F_AVAIL | packed::DESC_F_USED);
        if shape & !packed::DESC_F_WRITE != 0 || (shape & packed::DESC_F_WRITE != 0) != want_write {
            return stop(format!("queue {q}: packed descriptor {pos} has flags {:#x}", d.flags));
        }
        if d.id >= ring.size {
            return stop(format!("queue {q}: packed descriptor {pos} has id {} of {}", d.id, ring.size));
        }
        if (d.len as usize) < NET_HDR_LEN || d.len > 65_536 {
            return stop(format!("queue {q}: packed descriptor {pos} has length {}", d.len));
        }
        (qu.last_avail, qu.avail_wrap) = ring.pk_next(pos, qu.avail_wrap);
        qu.seen[d.id as usize] = true;
        let flags = if want_write { DESC_F_WRITE } else { 0 };
        Ok((d.id, Descriptor { addr: d.addr, len: d.len, flags, next: 0 }))
    }

    /// Pointer to the whole buffer of `d`.
    fn buffer(&self, d: &Descriptor) -> Result<*mut u8, Stop> {
        match self.translate(Space::Gpa, d.addr, d.len as u64) {
            Some(p) => Ok(p),
            None => stop(format!("buffer {:#x}+{} is outside the memory table", d.addr, d.len)),
        }
    }

    /// Writes `bytes` (a virtio-net header is put in front) into receive buffer `d`;
    /// returns the used length.
    fn fill_rx(&self, d: &Descriptor, bytes: &[u8]) -> Result<u32, Stop> {
        self.fill_rx_nb(d, bytes, 1)
    }

    /// [`fill_rx`](Self::fill_rx) with `num_buffers` = `nb` in the header.
    fn fill_rx_nb(&self, d: &Descriptor, bytes: &[u8], nb: u16) -> Result<u32, Stop> {
        let total = NET_HDR_LEN + bytes.len();
        if total > d.len as usize {
            return stop(format!("receive buffer of {} bytes for a {total}-byte frame", d.len));
        }
        let dst = self.buffer(d)?;
        let mut hdr = [0u8; NET_HDR_LEN];
        hdr[layout::NET_HDR_NUM_BUFFERS..].copy_from_slice(&nb.to_le_bytes());
        // SAFETY: `dst` points at `d.len >= total` mapped bytes of a buffer the driver
        // made available to the device (it does not touch it until we complete it); raw
        // copies, no reference into the shared memory.
        unsafe {
            std::ptr::copy_nonoverlapping(hdr.as_ptr(), dst, NET_HDR_LEN);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst.add(NET_HDR_LEN), bytes.len());
        }
        Ok(total as u32)
    }

    /// The frame (without the virtio-net header) in transmit buffer `d`.
    fn read_tx(&self, d: &Descriptor) -> Result<Vec<u8>, Stop> {
        let src = self.buffer(d)?;
        let mut v = vec![0u8; d.len as usize - NET_HDR_LEN];
        // SAFETY: `src` points at `d.len` mapped bytes of a buffer the driver made
        // available; copied out with a raw copy.
        unsafe { std::ptr::copy_nonoverlapping(src.add(NET_HDR_LEN), v.as_mut_ptr(), v.len()) };
        Ok(v)
    }

    /// Completes buffer `id` of queue `q` with `len` and publishes it.
    fn complete(&mut self, q: usize, ring: &Ring, id: u16, len: u32) {
        if ring.packed {
            self.put_raw(q, ring, &[(id as u32, len)]);
            return;
        }
        let qu = &mut self.queues[q];
        ring.put_used(qu.used_idx, id as u32, len);
        qu.used_idx = qu.used_idx.wrapping_add(1);
        ring.publish_used(qu.used_idx);
    }

    /// One pass over the rings.
    fn step(&mut self) {
        if self.dead {
            return;
        }
        if let Err(Stop(msg)) = self.step_inner() {
            eprintln!("evil-device: the front-end broke the protocol, data path stopped: {msg}");
            println!("BROKEN {msg}");
            self.dead = true;
        }
    }

    fn step_inner(&mut self) -> Result<(), Stop> {
        let (Some(rx), Some(tx)) = (self.ring(0), self.ring(1)) else { return Ok(()) };
        if !self.started {
            self.started = true;
            // We poll: no kicks needed.
            rx.no_kicks();
            tx.no_kicks();
            println!("STARTED");
        }
        loop {
            let pending = self.pending(1, &tx)?;
            if pending == 0 {
                return Ok(());
            }
            if let Some(fault) = self.mode.fault {
                if self.frames >= self.good_frames as u64 {
                    if (pending as usize) < TRIGGER_FRAMES {
                        return Ok(());
                    }
                    if let Some(report) = self.trigger(fault, &rx, &tx)? {
                        self.dead = true;
                        println!("{report}");
                    }
                    return Ok(());
                }
            }
            if self.pending(0, &rx)? == 0 {
                return Ok(()); // no receive buffer yet
            }
            let (tid, td) = self.take_avail(1, &tx)?;
            let frame = self.read_tx(&td)?;
            let (rid, rd) = self.take_avail(0, &rx)?;
            let len = self.fill_rx(&rd, &frame)?;
            // Transmit completion first, so a driver that saw the frame come back also
            // sees its transmit buffer done.
            self.complete(1, &tx, tid, 0);
            self.complete(0, &rx, rid, len);
            self.frames += 1;
        }
    }

    /// Writes the bad entry for `fault`, once its preconditions hold; returns the report,
    /// or `None` to be called again later.
    fn trigger(&mut self, fault: Fault, rx: &Ring, tx: &Ring) -> Result<Option<String>, Stop> {
        let q = self.mode.queue;
        if !fault.fits(rx.packed) {
            let layout = if rx.packed { "packed" } else { "split" };
            return stop(format!("mode {} does not exist on a {layout} ring", self.mode.name()));
        }
        if fault.merge() && (q != RX_QUEUE || self.acked_features & f::bit(f::NET_MRG_RXBUF) == 0) {
            return stop(format!(
                "mode {} needs the receive queue and MRG_RXBUF negotiated",
                self.mode.name()
            ));
        }
        if q == RX_QUEUE {
            let (offered, in_flight) = if rx.packed {
                // We complete whatever we take at once: all that is in flight is offered.
                let n = self.pending(0, rx)?;
                (n, n)
            } else {
                let rx_avail = rx.avail_idx();
                (
                    rx_avail.wrapping_sub(self.queues[0].last_avail),
                    rx_avail.wrapping_sub(self.queues[0].used_idx),
                )
            };
            let ready = match fault {
                // The driver keeps its receive ring full; once it is, its in-flight count
                // cannot change until we complete something.
                Fault::IdxJump => in_flight == rx.size,
                Fault::IdNotInFlight | Fault::IdTwice => offered >= 1 && in_flight >= 2,
                Fault::IdOutOfRange | Fault::LenTooLarge | Fault::WrongWrap => offered >= 1,
                Fault::MrgZero | Fault::MrgBeyond => offered >= 1,
                Fault::UsedAhead | Fault::MrgBadLen => offered >= 2,
            };
            if !ready {
                return Ok(None);
            }
            // Both trigger frames are transmitted correctly: only the receive queue is bad.
            let mut frames = Vec::new();
            for _ in 0..TRIGGER_FRAMES {
                let (tid, td) = self.take_avail(1, tx)?;
                frames.push(self.read_tx(&td)?);
                self.complete(1, tx, tid, 0);
            }
            let poison: Vec<u8> = POISON.iter().copied().cycle().take(64).collect();
            let rxq = 0;
            let e = match fault {
                Fault::IdOutOfRange => {
                    let (_, rd) = self.take_avail(rxq, rx)?;
                    let len = self.fill_rx(&rd, &poison)?;
                    let id = rx.size as u32;
                    self.put_raw(rxq, rx, &[(id, len)]);
                    DeviceError::UsedIdOutOfRange { id }
                }
                Fault::IdNotInFlight | Fault::IdTwice => {
                    // Every receive descriptor is in flight: the only id not in flight is
                    // one we complete in the same publish.
                    let (rid, rd) = self.take_avail(rxq, rx)?;
                    let len = self.fill_rx(&rd, &frames[0])?;
                    self.put_raw(rxq, rx, &[(rid as u32, len), (rid as u32, len)]);
                    self.frames += 1;
                    DeviceError::UsedIdNotInFlight { id: rid as u32 }
                }
                Fault::LenTooLarge => {
                    let (rid, rd) = self.take_avail(rxq, rx)?;
                    let room = rd.len as usize - NET_HDR_LEN;
                    let fill: Vec<u8> = POISON.iter().copied().cycle().take(room).collect();
                    self.fill_rx(&rd, &fill)?;
                    self.put_raw(rxq, rx, &[(rid as u32, rd.len + 1)]);
                    DeviceError::UsedLenTooLarge { len: rd.len + 1, posted: rd.len }
                }
                Fault::IdxJump => self.jump(rxq, rx, in_flight),
                Fault::WrongWrap => {
                    let (rid, rd) = self.take_avail(rxq, rx)?;
                    let len = self.fill_rx(&rd, &poison)?;
                    self.wrong_wrap(rxq, rx, rid, len)
                }
                Fault::UsedAhead => {
                    self.take_avail(rxq, rx)?;
                    let (rid, rd) = self.take_avail(rxq, rx)?;
                    let len = self.fill_rx(&rd, &poison)?;
                    return Ok(Some(self.used_ahead(rxq, rx, rid, len)));
                }
                Fault::MrgZero => {
                    let (rid, rd) = self.take_avail(rxq, rx)?;
                    let len = self.fill_rx_nb(&rd, &poison, 0)?;
                    self.put_raw(rxq, rx, &[(rid as u32, len)]);
                    DeviceError::MergeZeroBuffers
                }
                Fault::MrgBeyond => {
                    let (rid, rd) = self.take_avail(rxq, rx)?;
                    let len = self.fill_rx_nb(&rd, &poison, 2)?;
                    self.put_raw(rxq, rx, &[(rid as u32, len)]);
                    DeviceError::MergeBeyondUsed { num_buffers: 2, available: 1 }
                }
                Fault::MrgBadLen => {
                    let (r1, d1) = self.take_avail(rxq, rx)?;
                    let len = self.fill_rx_nb(&d1, &poison, 2)?;
                    let (r2, _) = self.take_avail(rxq, rx)?;
                    self.put_raw(rxq, rx, &[(r1 as u32, len), (r2 as u32, 0)]);
                    DeviceError::MergeBadLength { index: 1, len: 0, total: len - NET_HDR_LEN as u32 }
                }
            };
            return Ok(Some(format_report(q, &e)));
        }

        // Transmit queue: both trigger buffers are consumed; what comes back is bad.
        let txq = 1;
        let in_flight = tx.avail_idx().wrapping_sub(self.queues[txq].used_idx);
        let (a, da) = self.take_avail(txq, tx)?;
        let mut last = a;
        for _ in 1..TRIGGER_FRAMES {
            last = self.take_avail(txq, tx)?.0;
        }
        let e = match fault {
            Fault::IdOutOfRange => {
                let id = tx.size as u32;
                self.put_raw(txq, tx, &[(id, 0)]);
                DeviceError::UsedIdOutOfRange { id }
            }
            Fault::IdNotInFlight => {
                let seen = &self.queues[txq].seen;
                let Some(id) = (0..tx.size).rev().find(|&i| !seen[i as usize]) else {
                    return stop("every transmit descriptor has been used: no id left that was never posted");
                };
                self.put_raw(txq, tx, &[(id as u32, 0)]);
                DeviceError::UsedIdNotInFlight { id: id as u32 }
            }
            Fault::IdTwice => {
                self.put_raw(txq, tx, &[(a as u32, 0), (a as u32, 0)]);
                DeviceError::UsedIdNotInFlight { id: a as u32 }
            }
            Fault::LenTooLarge => {
                self.put_raw(txq, tx, &[(a as u32, da.len + 1)]);
                DeviceError::UsedLenTooLarge { len: da.len + 1, posted: da.len }
            }
            Fault::IdxJump => self.jump(txq, tx, in_flight),
            Fault::WrongWrap => self.wrong_wrap(txq, tx, a, 0),
            Fault::UsedAhead => return Ok(Some(self.used_ahead(txq, tx, last, 0))),
            Fault::MrgZero | Fault::MrgBeyond | Fault::MrgBadLen => unreachable!("refused above"),
        };
        Ok(Some(format_report(q, &e)))
    }

    /// Packed: marks buffer `id` used with `len` at the used position, with the other
    /// wrap counter in its flags.
    fn wrong_wrap(&mut self, q: usize, ring: &Ring, id: u16, len: u32) -> DeviceError {
        let qu = &mut self.queues[q];
        let (pos, wrap) = (qu.used_idx, qu.used_wrap);
        (qu.used_idx, qu.used_wrap) = ring.pk_write_used(pos, wrap, &[(id as u32, len)], true);
        DeviceError::UsedWrongWrap { pos, flags: pk_used_flags(!wrap, len) }
    }

    /// Packed: marks buffer `id` used with `len` one position past the used position
    /// (which stays as the driver wrote it); returns the `AHEAD` line.
    fn used_ahead(&mut self, q: usize, ring: &Ring, id: u16, len: u32) -> String {
        let qu = &self.queues[q];
        let (pos, wrap) = ring.pk_next(qu.used_idx, qu.used_wrap);
        ring.pk_write_used(pos, wrap, &[(id as u32, len)], false);
        format!("AHEAD queue={q} pos={pos} id={id}")
    }

    /// Writes `entries` as used elements of queue `q` and publishes them with one store.
    fn put_raw(&mut self, q: usize, ring: &Ring, entries: &[(u32, u32)]) {
        let qu = &mut self.queues[q];
        if ring.packed {
            (qu.used_idx, qu.used_wrap) = ring.pk_write_used(qu.used_idx, qu.used_wrap, entries, false);
            return;
        }
        for &(id, len) in entries {
            ring.put_used(qu.used_idx, id, len);
            qu.used_idx = qu.used_idx.wrapping_add(1);
        }
        ring.publish_used(qu.used_idx);
    }

    /// Moves queue `q`'s used index by `in_flight + 1` without writing elements.
    fn jump(&mut self, q: usize, ring: &Ring, in_flight: u16) -> DeviceError {
        let moved = in_flight + 1;
        let qu = &mut self.queues[q];
        qu.used_idx = qu.used_idx.wrapping_add(moved);
        ring.publish_used(qu.used_idx);
        DeviceError::UsedIdxJump { moved, in_flight }
    }

    fn snapshot(&self, q: usize) -> String {
        match self.queues.get(q).and_then(|_| self.ring(q)) {
            Some(r) => format!("SNAP q={q} avail_idx={} hash={:016x}", r.avail_idx(), r.driver_hash()),
            None => format!("SNAP q={q} none"),
        }
    }
}

// ------------------------------------------------------------------------------ vhost-user

struct Shared {
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn queue<T>(&self, index: u32, f: impl FnOnce(&mut Queue) -> VuResult<T>) -> VuResult<T> {
        let mut st = self.lock();
        let q = st.queues.get_mut(index as usize).ok_or(VuError::InvalidParam)?;
        f(q)
    }
}

struct Handler(Arc<Shared>);

impl Handler {
    fn offered(&self) -> u64 {
        let st = self.0.lock();
        let in_order = if st.in_order { f::bit(f::IN_ORDER) } else { 0 };
        let packed = if st.packed { f::bit(f::RING_PACKED) } else { 0 };
        OFFERED_FEATURES | in_order | packed
    }
}

const OFFERED_FEATURES: u64 = f::bit(f::VERSION_1)
    | f::bit(f::NET_MAC)
    | f::bit(f::NET_STATUS)
    | f::bit(f::NET_MTU)
    | f::bit(f::NET_MRG_RXBUF)
    | f::bit(f::VHOST_USER_PROTOCOL_FEATURES);

fn offered_protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::CONFIG
}

fn config_space(mtu: u16, link_down: bool) -> [u8; net_config::LEN] {
    let mut c = [0u8; net_config::LEN];
    c[net_config::MAC..net_config::MAC + 6].copy_from_slice(&DEVICE_MAC);
    let status = if link_down { 0 } else { net_config::S_LINK_UP };
    c[net_config::STATUS..net_config::STATUS + 2].copy_from_slice(&status.to_le_bytes());
    c[net_config::MAX_VQ_PAIRS..net_config::MAX_VQ_PAIRS + 2].copy_from_slice(&1u16.to_le_bytes());
    c[net_config::MTU..net_config::MTU + 2].copy_from_slice(&mtu.to_le_bytes());
    c
}

fn unsupported<T>(what: &'static str) -> VuResult<T> {
    Err(VuError::InvalidOperation(what))
}

impl VhostUserBackendReqHandler for Handler {
    fn set_owner(&self) -> VuResult<()> {
        Ok(())
    }
    fn reset_owner(&self) -> VuResult<()> {
        let mut st = self.0.lock();
        st.queues = [Queue::default(), Queue::default()];
        st.started = false;
        Ok(())
    }
    fn reset_device(&self) -> VuResult<()> {
        self.reset_owner()
    }
    fn get_features(&self) -> VuResult<u64> {
        Ok(self.offered())
    }
    fn set_features(&self, features: u64) -> VuResult<()> {
        if features & !self.offered() != 0 {
            return Err(VuError::InvalidParam);
        }
        self.0.lock().acked_features = features;
        Ok(())
    }
    fn set_mem_table(
        &self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if ctx.len() != files.len() {
            return Err(VuError::InvalidParam);
        }
        let mut regions = Vec::with_capacity(ctx.len());
        for (r, file) in ctx.iter().zip(files) {
            let (gpa, len, uva, off) = (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset);
            if len == 0
                || gpa.checked_add(len).is_none()
                || uva.checked_add(len).is_none()
                || off.checked_add(len).is_none()
            {
                return Err(VuError::InvalidParam);
            }
            let size = usize::try_from(len).map_err(|_| VuError::InvalidParam)?;
            let map = MmapRegion::<()>::from_file(FileOffset::new(file, off), size).map_err(|e| {
                eprintln!("evil-device: mmap of region gpa {gpa:#x} len {len:#x}: {e}");
                VuError::InvalidParam
            })?;
            regions.push(Region { gpa, uva, len, map });
        }
        self.0.lock().regions = regions;
        Ok(None)
    }
    fn set_vring_num(&self, index: u32, num: u32) -> VuResult<()> {
        if num == 0 || num > layout::MAX_QUEUE_SIZE as u32 || !num.is_power_of_two() {
            return Err(VuError::InvalidParam);
        }
        self.0.queue(index, |q| {
            q.size = num as u16;
            Ok(())
        })
    }
    fn set_vring_addr(
        &self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        self.0.queue(index, |q| {
            q.desc = descriptor;
            q.used = used;
            q.avail = available;
            q.addr_set = true;
            Ok(())
        })
    }
    fn set_vring_base(&self, index: u32, base: u32) -> VuResult<()> {
        let base = u16::try_from(base).map_err(|_| VuError::InvalidParam)?;
        let is_packed = self.0.lock().packed_ring();
        self.0.queue(index, |q| {
            if is_packed {
                // Packed (vhost-user's convention): the offset in bits 0-14, the avail wrap
                // counter in bit 15; it must name a descriptor of the ring.
                let (pos, wrap) = packed::split_off_wrap(base);
                if pos >= q.size {
                    return Err(VuError::InvalidParam);
                }
                (q.last_avail, q.avail_wrap, q.used_idx, q.used_wrap) = (pos, wrap, pos, wrap);
            } else {
                q.last_avail = base;
                q.used_idx = base;
            }
            Ok(())
        })
    }
    fn get_vring_base(&self, index: u32) -> VuResult<VhostUserVringState> {
        if self.0.lock().hang_on_stop {
            println!("HANG GET_VRING_BASE");
            let _ = std::io::stdout().flush();
            // The lifetime thread ends the process.
            loop {
                thread::sleep(Duration::from_secs(3600));
            }
        }
        // Stops the ring. The data path runs under the same lock, so once this returns
        // the device touches neither the ring nor its buffers.
        let is_packed = self.0.lock().packed_ring();
        let base = self.0.queue(index, |q| {
            q.stopped = true;
            Ok(if is_packed { packed::event_off_wrap(q.last_avail, q.avail_wrap) } else { q.last_avail })
        })?;
        Ok(VhostUserVringState::new(index, base as u32))
    }
    fn set_vring_kick(&self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.0.queue(index as u32, |q| {
            q.kick = fd;
            q.stopped = false;
            Ok(())
        })
    }
    fn set_vring_call(&self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.0.queue(index as u32, |q| {
            q.call = fd;
            Ok(())
        })
    }
    fn set_vring_err(&self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.0.queue(index as u32, |q| {
            q.err = fd;
            Ok(())
        })
    }
    fn get_protocol_features(&self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(offered_protocol())
    }
    fn set_protocol_features(&self, features: u64) -> VuResult<()> {
        if features & !offered_protocol().bits() != 0 {
            return Err(VuError::InvalidParam);
        }
        Ok(())
    }
    fn get_queue_num(&self) -> VuResult<u64> {
        Ok(1)
    }
    fn set_vring_enable(&self, index: u32, enable: bool) -> VuResult<()> {
        self.0.queue(index, |q| {
            q.enabled = enable;
            Ok(())
        })
    }
    fn get_config(&self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        let cfg = {
            let st = self.0.lock();
            config_space(st.mtu, st.link_down)
        };
        let end = offset.checked_add(size).ok_or(VuError::InvalidParam)? as usize;
        cfg.get(offset as usize..end).map(<[u8]>::to_vec).ok_or(VuError::InvalidParam)
    }
    fn set_config(&self, _offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> VuResult<()> {
        unsupported("virtio-net config space is read-only")
    }
    fn set_backend_req_fd(&self, _backend: Backend) {}
    fn set_gpu_socket(&self, _gpu_backend: GpuBackend) -> VuResult<()> {
        unsupported("not a GPU device")
    }
    fn get_shared_object(&self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        unsupported("no shared objects")
    }
    fn get_inflight_fd(&self, _inflight: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        unsupported("inflight tracking not offered")
    }
    fn set_inflight_fd(&self, _inflight: &VhostUserInflight, _file: File) -> VuResult<()> {
        unsupported("inflight tracking not offered")
    }
    fn get_max_mem_slots(&self) -> VuResult<u64> {
        unsupported("CONFIGURE_MEM_SLOTS not offered")
    }
    fn add_mem_region(
        &self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        unsupported("CONFIGURE_MEM_SLOTS not offered")
    }
    fn remove_mem_region(&self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        unsupported("CONFIGURE_MEM_SLOTS not offered")
    }
    fn set_device_state_fd(
        &self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        unsupported("device state transfer not offered")
    }
    fn check_device_state(&self) -> VuResult<()> {
        unsupported("device state transfer not offered")
    }
    fn get_shmem_config(&self) -> VuResult<VhostUserShMemConfig> {
        unsupported("no shared memory regions")
    }
    fn set_log_base(&self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        unsupported("dirty logging not offered")
    }
}

// ------------------------------------------------------------------------------ device main

const USAGE: &str =
    "usage: evil-device SOCKET MODE [--good N] [--lifetime SECS] [--in-order] [--packed] [--mtu N] \
                     [--hang-on-stop]";

/// The `evil-device` binary: serves one front-end on the socket in `args`, then exits.
/// Returns the process exit code.
pub fn device_main(args: Vec<OsString>) -> i32 {
    let mut pos = Vec::new();
    let mut good = DEFAULT_GOOD_FRAMES;
    let mut lifetime = 60u64;
    let mut in_order = false;
    let mut packed = false;
    let mut mtu = DEVICE_MTU;
    let mut hang_on_stop = false;
    let mut it = args.into_iter().map(|a| a.to_string_lossy().into_owned());
    while let Some(a) = it.next() {
        let mut num = |name: &str| -> Option<u64> {
            let v = it.next().and_then(|v| v.parse().ok());
            if v.is_none() {
                eprintln!("evil-device: {name} needs a number\n{USAGE}");
            }
            v
        };
        match a.as_str() {
            "--good" => match num("--good") {
                Some(n) => good = n as u32,
                None => return 2,
            },
            "--lifetime" => match num("--lifetime") {
                Some(n) => lifetime = n,
                None => return 2,
            },
            "--in-order" => in_order = true,
            "--packed" => packed = true,
            "--hang-on-stop" => hang_on_stop = true,
            "--mtu" => match num("--mtu").and_then(|n| u16::try_from(n).ok()) {
                Some(n) => mtu = n,
                None => return 2,
            },
            _ => pos.push(a),
        }
    }
    let [sock, mode] = pos.as_slice() else {
        eprintln!("{USAGE}");
        return 2;
    };
    let mode = match Mode::parse(mode) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("evil-device: {e}\n{USAGE}");
            return 2;
        }
    };

    // (A split-only mode with `--packed` is refused at the trigger, if the driver acks
    // the packed ring.)
    if mode.fault.is_some_and(|f| !f.fits(false)) && !packed {
        eprintln!("evil-device: mode {} needs --packed\n{USAGE}", mode.name());
        return 2;
    }

    // Never outlive a test that forgot us.
    thread::spawn(move || {
        thread::sleep(Duration::from_secs(lifetime));
        eprintln!("evil-device: lifetime of {lifetime} s is over, exiting");
        std::process::exit(3);
    });

    let mut state = State::new(mode, good, in_order, packed);
    state.mtu = mtu;
    state.hang_on_stop = hang_on_stop;
    let shared = Arc::new(Shared { state: Mutex::new(state) });
    let mut listener = match Listener::new(sock, true) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("evil-device: cannot listen on {sock}: {e}");
            return 1;
        }
    };
    eprintln!("evil-device: mode {} (good frames {good}) listening on {sock}", mode.name());

    {
        let shared = shared.clone();
        thread::spawn(move || loop {
            shared.lock().step();
            thread::sleep(Duration::from_micros(100));
        });
    }
    {
        let shared = shared.clone();
        thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                let words: Vec<&str> = line.split_whitespace().collect();
                let reply = match words.as_slice() {
                    ["snap", q] => match q.parse::<usize>() {
                        Ok(q) => shared.lock().snapshot(q),
                        Err(_) => format!("ERR bad queue {q:?}"),
                    },
                    ["stats"] => {
                        let st = shared.lock();
                        format!("STATS frames={} dead={}", st.frames, st.dead)
                    }
                    ["link", how @ ("up" | "down")] => {
                        shared.lock().link_down = *how == "down";
                        format!("LINK {how}")
                    }
                    _ => format!("ERR unknown command {line:?}"),
                };
                println!("{reply}");
            }
        });
    }

    let handler = Arc::new(Handler(shared));
    let mut conn = match BackendListener::new(&mut listener, handler).and_then(|mut l| l.accept()) {
        Ok(Some(c)) => c,
        Ok(None) => {
            eprintln!("evil-device: accept returned no connection");
            return 1;
        }
        Err(e) => {
            eprintln!("evil-device: accept: {e}");
            return 1;
        }
    };
    loop {
        match conn.handle_request() {
            Ok(()) => {}
            Err(VuError::Disconnected) | Err(VuError::PartialMessage) | Err(VuError::SocketBroken(_)) => {
                println!("DISCONNECTED");
                return 0;
            }
            Err(e) => {
                eprintln!("evil-device: vhost-user error: {e}; closing");
                println!("DISCONNECTED");
                return 1;
            }
        }
    }
}

// ------------------------------------------------------------------------------ test side

/// What the stdout reader shares with [`EvilDevice`].
#[derive(Default)]
struct Lines {
    unread: VecDeque<String>,
    all: Vec<String>,
    closed: bool,
}

/// An `evil-device` process serving a socket in a private temp dir; killed on drop.
pub struct EvilDevice {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Arc<(Mutex<Lines>, Condvar)>,
    reader: Option<JoinHandle<()>>,
    sock: PathBuf,
    log_path: PathBuf,
    _dir: TempDir,
}

impl EvilDevice {
    /// Starts `bin` (the `evil-device` executable) in `mode` with `good` faithful frames
    /// before the misbehaviour, and waits (max 10 s) for its socket.
    pub fn spawn(bin: &Path, mode: Mode, good: u32) -> EvilDevice {
        Self::spawn_with(bin, mode, good, false)
    }

    /// As [`spawn`](Self::spawn); `in_order` makes the device offer `VIRTIO_F_IN_ORDER`.
    pub fn spawn_with(bin: &Path, mode: Mode, good: u32, in_order: bool) -> EvilDevice {
        Self::spawn_opts(bin, mode, good, in_order, false)
    }

    /// As [`spawn_with`](Self::spawn_with); `packed` makes the device offer
    /// `VIRTIO_F_RING_PACKED` (`--packed`).
    pub fn spawn_opts(bin: &Path, mode: Mode, good: u32, in_order: bool, packed: bool) -> EvilDevice {
        Self::spawn_args(bin, mode, good, in_order, packed, &[])
    }

    /// [`spawn_opts`](Self::spawn_opts) with more arguments (e.g. `["--mtu", "9000"]`).
    pub fn spawn_args(
        bin: &Path,
        mode: Mode,
        good: u32,
        in_order: bool,
        packed: bool,
        extra: &[&str],
    ) -> EvilDevice {
        let dir = TempDir::new(&format!("evil-{}", mode.name()));
        let sock = dir.join("evil.sock");
        let log_path = dir.join("evil-device.stderr");
        let log = File::create(&log_path).unwrap_or_else(|e| panic!("create {}: {e}", log_path.display()));
        let mut child = Command::new(bin)
            .arg(&sock)
            .arg(mode.name())
            .args(["--good", &good.to_string(), "--lifetime", "60"])
            .args(in_order.then_some("--in-order"))
            .args(packed.then_some("--packed"))
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take();
        let lines = Arc::new((Mutex::new(Lines::default()), Condvar::new()));
        let reader = {
            let lines = lines.clone();
            thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let (m, cv) = &*lines;
                    let mut l = m.lock().unwrap_or_else(|e| e.into_inner());
                    l.all.push(line.clone());
                    l.unread.push_back(line);
                    cv.notify_all();
                }
                let (m, cv) = &*lines;
                m.lock().unwrap_or_else(|e| e.into_inner()).closed = true;
                cv.notify_all();
            })
        };
        let mut dev = EvilDevice { child, stdin, lines, reader: Some(reader), sock, log_path, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dev.sock.exists() {
            if let Ok(Some(st)) = dev.child.try_wait() {
                panic!("evil-device exited ({st}) before creating its socket; log:\n{}", dev.log());
            }
            if Instant::now() > deadline {
                panic!("evil-device: no socket within 10 s; log:\n{}", dev.log());
            }
            thread::sleep(Duration::from_millis(10));
        }
        dev
    }

    /// The socket to connect the driver to.
    pub fn socket(&self) -> &Path {
        &self.sock
    }

    /// The device's stderr so far, and every stdout line.
    pub fn log(&self) -> String {
        let mut s = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let (m, _) = &*self.lines;
        let l = m.lock().unwrap_or_else(|e| e.into_inner());
        s.push_str("--- stdout ---\n");
        for line in &l.all {
            s.push_str(line);
            s.push('\n');
        }
        s
    }

    /// Waits (max `timeout`) for the next stdout line starting with `prefix` (skipping
    /// others); `None` on timeout or when the device has closed stdout.
    pub fn wait_line(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let (m, cv) = &*self.lines;
        let mut l = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            while let Some(line) = l.unread.pop_front() {
                if line.starts_with(prefix) {
                    return Some(line);
                }
            }
            let now = Instant::now();
            if l.closed || now >= deadline {
                return None;
            }
            l = cv.wait_timeout(l, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Sends a command and waits (max 5 s) for its reply line starting with `reply`.
    pub fn request(&mut self, cmd: &str, reply: &str) -> String {
        let stdin = self.stdin.as_mut().expect("evil-device stdin");
        writeln!(stdin, "{cmd}")
            .and_then(|_| stdin.flush())
            .unwrap_or_else(|e| panic!("evil-device {cmd}: {e}"));
        self.wait_line(reply, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("evil-device: no reply to {cmd:?}; log:\n{}", self.log()))
    }

    /// What the driver itself writes into queue `q`'s memory right now (see the module
    /// documentation); equal snapshots mean the driver did not touch the queue.
    pub fn snapshot(&mut self, q: u16) -> String {
        self.request(&format!("snap {q}"), "SNAP")
    }

    /// Frames the device has reflected faithfully.
    pub fn frames(&mut self) -> u64 {
        let line = self.request("stats", "STATS");
        line.split_whitespace()
            .find_map(|w| w.strip_prefix("frames="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("evil-device: bad stats line {line:?}"))
    }

    /// Waits (max `timeout`) for the report of the bad entry: the queue and the error the
    /// driver must report.
    pub fn wait_report(&self, timeout: Duration) -> (u16, DeviceError) {
        let line = self.wait_line("BAD", timeout).unwrap_or_else(|| {
            panic!("evil-device wrote no bad entry within {timeout:?}; log:\n{}", self.log())
        });
        parse_report(&line).unwrap_or_else(|| panic!("evil-device: unparsable report {line:?}"))
    }

    /// Whether the device process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for EvilDevice {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if matches!(self.child.try_wait(), Ok(None)) {
            harness::signal(self.child.id(), libc::SIGKILL);
        }
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip() {
        assert_eq!(Mode::parse("good").unwrap(), Mode::GOOD);
        for fault in Fault::ALL {
            for queue in [RX_QUEUE, TX_QUEUE] {
                let m = Mode { fault: Some(fault), queue };
                assert_eq!(Mode::parse(&m.name()).unwrap(), m);
            }
        }
        assert!(Mode::parse("nice").is_err());
        assert!(Mode::parse("idx-jump-rx").is_err());
    }

    #[test]
    fn reports_round_trip() {
        for e in [
            DeviceError::UsedIdOutOfRange { id: 256 },
            DeviceError::UsedIdNotInFlight { id: 3 },
            DeviceError::UsedLenTooLarge { len: 1997, posted: 1996 },
            DeviceError::UsedIdxJump { moved: 257, in_flight: 256 },
            DeviceError::UsedWrongWrap { pos: 5, flags: 0x8080 },
        ] {
            for q in [0, 1] {
                assert_eq!(parse_report(&format_report(q, &e)), Some((q, e)));
            }
        }
        assert_eq!(parse_report("SNAP q=0 none"), None);
    }
}
