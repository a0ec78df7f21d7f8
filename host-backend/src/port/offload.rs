//! Host offloads on the forwarding paths (`reflect`, `xconnect`): a transmitted frame
//! whose virtio-net header asks for a checksum (`NEEDS_CSUM`, §5.1.6.2) or segmentation
//! (a GSO type) is checked, copied into the path's staging buffer and delivered either
//! whole with its header (the receiving driver negotiated the matching `GUEST_*`
//! offload, §5.1.6.4) or completed and segmented here, each segment its own received
//! frame, with `spec::offload` doing the checksums and Linux's segmentation rules.
//!
//! Owns: the checks that turn a request into a counted drop (not negotiated, malformed,
//! too large for the MTU, a chain that ends inside the headers: [`check`]), the choice
//! between whole and segmented delivery and a checked frame's delivery across bursts
//! ([`Delivery`]), and the staging buffer of one path ([`Staging`], allocated once, with
//! the path: a super-frame is up to 64 KiB, one segment up to the path's largest frame):
//! the transmit chain is completed as soon as its frame is staged, and what the receive
//! ring cannot take yet waits here (the path takes no new transmit frame meanwhile, so
//! frames stay in order). `--handoff` uses [`check`] and [`Delivery`] with its own frame
//! buffers (`crate::handoff`: checked by the sending worker, planned and delivered by the
//! receiving one).
//! Must not: parse or build headers itself (`spec::offload` does), walk transmit
//! chains, or allocate per frame.
//!
//! Out of line: a frame without a request (every frame of the 64-byte benchmarks)
//! costs the burst one two-byte look at its header ([`requested`]).

use spec::layout::features::{self as f, bit};
use spec::layout::{net_hdr, NET_HDR_LEN, NET_HDR_NUM_BUFFERS};
use spec::offload::{complete_csum, Gso, GsoKind, Layer, NetHdr, OffloadError};

use super::mrg::{self, FrameSrc, Placed};
use super::ETH_HLEN;
use crate::ctrl::RxConfig;
use crate::memory::GuestMemory;
use crate::ring::Ring;
use crate::split_ring::{gather, scatter, Chain, ChainBuf, Dir, RingFault};
use crate::stats::{BurstCounts, DropReason, OffloadCounts, OffloadEvent};

/// Largest super-frame: a 64 KiB IP packet behind an Ethernet header and two VLAN tags.
pub(crate) const MAX_SUPER_FRAME: usize = 65535 + 14 + 8;
/// Most segments one super-frame may make (TCP itself sets no limit, see
/// `spec::offload`; a 64 KiB super-frame cut at an MSS of 64 bytes makes about 1000).
pub(crate) const MAX_SEGMENTS: usize = 1024;

/// The host offload features: a driver that negotiated none of them cannot ask for one.
pub(crate) const HOST_OFFLOADS: u64 =
    bit(f::NET_CSUM) | bit(f::NET_HOST_TSO4) | bit(f::NET_HOST_TSO6) | bit(f::NET_HOST_USO);

/// Whether a transmitted chain's virtio-net header asks for an offload: `NEEDS_CSUM` in
/// its flags, or a GSO type (other flag bits mean nothing on transmit).
#[inline(always)]
pub(crate) fn requested(chain: &Chain<'_>) -> bool {
    let mut b = [0u8; 2];
    gather(chain, 0, &mut b);
    (b[0] & net_hdr::F_NEEDS_CSUM) | b[1] != 0
}

/// What is left to deliver of a checked frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Mode {
    /// Nothing staged.
    #[default]
    Idle,
    /// The frame as it is, behind `Delivery::out_hdr`.
    Whole,
    /// Segments `next .. count` of the super-frame.
    Segments { next: usize, count: usize },
}

/// How one checked frame (see [`check`]) reaches a receive queue, and how much of it
/// has: planned once for the receiver ([`plan`](Self::plan)), then delivered over as
/// many bursts as its receive buffers take ([`drain`](Self::drain)). The frame's bytes
/// stay with their owner (a path's [`Staging`] buffer, or a `--handoff` frame buffer,
/// `crate::handoff`), lent to each call.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Delivery {
    hdr: NetHdr,
    /// The header a whole delivery writes (`num_buffers` set at delivery).
    out_hdr: [u8; NET_HDR_LEN],
    mode: Mode,
}

/// One path's staging buffer and the frame in it.
pub(crate) struct Staging {
    frame: Box<[u8]>,
    len: usize,
    hdr: NetHdr,
    seg: Box<[u8]>,
    out: Delivery,
}

/// The drop reason for what `spec::offload` refused.
fn reason(e: OffloadError) -> DropReason {
    log::debug!("offload request refused: {e}");
    match e {
        OffloadError::HeaderTruncated(Layer::NetHdr) => DropReason::ShortFrame,
        // `hdr_len` past the end: the chain ends before the headers the request names.
        OffloadError::HeaderTruncated(_) | OffloadError::HdrLenPastFrame { .. } => {
            DropReason::TruncatedHeader
        }
        OffloadError::CsumOutOfFrame { .. }
        | OffloadError::CsumOffsetOdd { .. }
        | OffloadError::CsumMismatch { .. }
        | OffloadError::CsumRequired => DropReason::BadCsum,
        _ => DropReason::BadGso,
    }
}

/// The feature a driver negotiates to send super-frames of `kind` (virtio 1.2 §5.1.6.2).
pub(super) fn host_gso_feature(kind: GsoKind) -> u64 {
    match kind {
        GsoKind::TcpV4 => bit(f::NET_HOST_TSO4),
        GsoKind::TcpV6 => bit(f::NET_HOST_TSO6),
        GsoKind::UdpL4 => bit(f::NET_HOST_USO),
    }
}

/// Takes a transmitted chain whose header asks for an offload ([`requested`]): checks the
/// request against the features the sending driver negotiated (`features`) and against
/// the frame, and copies the frame into `buf` (`swap_mac`: addresses swapped there).
/// Returns the frame's length and its header, or why it is dropped (`Oversize` also for a
/// frame longer than `buf`). The caller completes the chain either way.
///
/// A GSO request must make segments that fit `max_frame` (a `gso_size` larger than the
/// MTU allows is refused; one larger than the payload is one segment, as Linux takes it);
/// a checksum request without GSO must name two bytes inside the frame at an even offset.
#[inline(never)]
pub(crate) fn check(
    chain: &Chain<'_>,
    features: u64,
    max_frame: u64,
    swap_mac: bool,
    buf: &mut [u8],
) -> Result<(usize, NetHdr), DropReason> {
    if chain.truncated {
        return Err(DropReason::TooManySegments);
    }
    if chain.total < NET_HDR_LEN as u64 + ETH_HLEN {
        return Err(DropReason::ShortFrame);
    }
    let mut h = [0u8; NET_HDR_LEN];
    gather(chain, 0, &mut h);
    let hdr = NetHdr::from_bytes(h);
    let kind = hdr.gso_kind().map_err(reason)?;
    let mut need = if hdr.needs_csum() { bit(f::NET_CSUM) } else { 0 };
    need |= kind.map_or(0, host_gso_feature);
    if hdr.gso_type & net_hdr::GSO_ECN != 0 {
        need |= bit(f::NET_HOST_ECN);
    }
    if features & need != need {
        return Err(DropReason::OffloadNotNegotiated);
    }
    let len = (chain.total - NET_HDR_LEN as u64) as usize;
    let limit = if kind.is_some() { MAX_SUPER_FRAME } else { max_frame as usize };
    if len > limit || len > buf.len() {
        return Err(DropReason::Oversize);
    }
    let frame = &mut buf[..len];
    if gather(chain, NET_HDR_LEN, frame) != len {
        return Err(DropReason::ShortFrame);
    }
    match kind {
        Some(_) => {
            let gso = Gso::new(frame, &hdr).map_err(reason)?;
            if gso.max_segment_len() as u64 > max_frame || gso.segments() > MAX_SEGMENTS {
                return Err(DropReason::BadGso);
            }
        }
        None => {
            let (start, off) = (hdr.csum_start as usize, hdr.csum_offset as usize);
            if off % 2 != 0 || start + off + 2 > len {
                return Err(DropReason::BadCsum);
            }
        }
    }
    if swap_mac {
        frame[..12].rotate_left(6);
    }
    Ok((len, hdr))
}

/// The event a checked request counts on the sending pair.
pub(crate) fn request_event(hdr: &NetHdr) -> OffloadEvent {
    if hdr.gso_type == 0 {
        OffloadEvent::CsumRequests
    } else {
        OffloadEvent::GsoRequests
    }
}

impl Delivery {
    /// Whether a planned frame (or some of its segments) still waits for receive buffers.
    #[inline]
    pub fn pending(&self) -> bool {
        self.mode != Mode::Idle
    }

    /// Lets go of the planned frame (its receiver went away); returns how many frames
    /// that drops (the segments not delivered yet, or 1; 0 if nothing was planned).
    #[inline(never)]
    pub fn discard(&mut self) -> u64 {
        let n = match self.mode {
            Mode::Idle => 0,
            Mode::Whole => 1,
            Mode::Segments { next, count } => (count - next) as u64,
        };
        self.mode = Mode::Idle;
        n
    }

    /// Decides how a checked frame (`frame`, asking what `hdr` says) reaches a receive
    /// queue configured `rx`: whole, with its header, when the driver there takes it
    /// (`GUEST_CSUM` for a partial checksum; `GUEST_TSO4`/`GUEST_TSO6` and `GUEST_CSUM`
    /// for a TCP super-frame that carries `NEEDS_CSUM`), else its checksum completed here
    /// (in `frame`) and it goes without offload fields, or it is cut into segments.
    /// Counts the choice into `oc`.
    #[inline(never)]
    pub fn plan(&mut self, hdr: NetHdr, frame: &mut [u8], rx: &RxConfig, oc: &mut OffloadCounts) {
        self.hdr = hdr;
        self.mode = match hdr.gso_kind() {
            Ok(None) => {
                if rx.csum() {
                    let out = NetHdr { flags: net_hdr::F_NEEDS_CSUM, hdr_len: 0, num_buffers: 0, ..hdr };
                    self.out_hdr = out.to_bytes();
                    Mode::Whole
                } else if complete_csum(frame, hdr.csum_start as usize, hdr.csum_offset as usize).is_ok() {
                    self.out_hdr = [0; NET_HDR_LEN];
                    Mode::Whole
                } else {
                    Mode::Idle // `check` checked what `complete_csum` checks
                }
            }
            Ok(Some(kind)) => {
                let whole = hdr.needs_csum()
                    && hdr.gso_type & net_hdr::GSO_ECN == 0
                    && match kind {
                        GsoKind::TcpV4 => rx.tso4(),
                        GsoKind::TcpV6 => rx.tso6(),
                        GsoKind::UdpL4 => false,
                    };
                match Gso::new(frame, &hdr) {
                    Ok(gso) if whole => {
                        let out = NetHdr {
                            flags: net_hdr::F_NEEDS_CSUM,
                            hdr_len: gso.header_len() as u16,
                            num_buffers: 0,
                            ..hdr
                        };
                        self.out_hdr = out.to_bytes();
                        Mode::Whole
                    }
                    Ok(gso) => Mode::Segments { next: 0, count: gso.segments() },
                    Err(_) => Mode::Idle, // `check` checked it
                }
            }
            Err(_) => Mode::Idle,
        };
        match self.mode {
            Mode::Idle => {}
            Mode::Whole if self.out_hdr == [0; NET_HDR_LEN] => oc.add(OffloadEvent::SwCsum, 1),
            Mode::Whole => oc.add(OffloadEvent::PassedWhole, 1),
            Mode::Segments { count, .. } => {
                oc.add(OffloadEvent::SwGso, 1);
                oc.add(OffloadEvent::SwSegments, count as u64);
            }
        }
    }

    /// Delivers what is left of the planned `frame` (the same bytes `plan` saw; `seg`:
    /// room for one segment) into the receive chains `*rx_done ..` of `dr` (`nrx` known
    /// available; `first` and `more` the path's chain rooms; `mrg`: the driver
    /// negotiated mergeable buffers), as far as they go, counting into `dc`; what does
    /// not fit yet stays pending. A chain that breaks the protocol is the receive ring's
    /// fault.
    #[inline(never)]
    #[allow(clippy::too_many_arguments, reason = "the burst's receive side, borrowed piece by piece")]
    pub fn drain<'m, D: Ring>(
        &mut self,
        frame: &[u8],
        seg: &mut [u8],
        dr: &mut D,
        dmem: &'m GuestMemory,
        nrx: &mut u16,
        rx_done: &mut u16,
        first: &mut Chain<'m>,
        more: &mut ChainBuf,
        mrg: bool,
        dc: &mut BurstCounts,
    ) -> Result<(), RingFault> {
        match self.mode {
            Mode::Idle => {}
            Mode::Whole => {
                match deliver(dr, dmem, nrx, *rx_done, first, more, mrg, self.out_hdr, frame)? {
                    Placed::Done(k) => {
                        *rx_done += k;
                        dc.tx_packets += 1;
                        dc.tx_bytes += frame.len() as u64;
                    }
                    Placed::Wait => return Ok(()),
                    Placed::NoFit => dc.drop(DropReason::RxBufferTooSmall),
                    Placed::RingTooSmall => dc.drop(DropReason::RxRingTooSmall),
                }
                self.mode = Mode::Idle;
            }
            Mode::Segments { mut next, count } => {
                let Ok(gso) = Gso::new(frame, &self.hdr) else {
                    dc.drops[DropReason::BadGso as usize] += (count - next) as u64;
                    self.mode = Mode::Idle;
                    return Ok(());
                };
                while next < count {
                    let Ok(n) = gso.write_segment(next, seg) else {
                        dc.drops[DropReason::BadGso as usize] += (count - next) as u64;
                        break;
                    };
                    let bytes = &seg[..n];
                    match deliver(dr, dmem, nrx, *rx_done, first, more, mrg, [0; NET_HDR_LEN], bytes)? {
                        Placed::Done(k) => {
                            *rx_done += k;
                            dc.tx_packets += 1;
                            dc.tx_bytes += n as u64;
                            next += 1;
                        }
                        Placed::Wait => {
                            self.mode = Mode::Segments { next, count };
                            return Ok(());
                        }
                        Placed::NoFit => {
                            dc.drops[DropReason::RxBufferTooSmall as usize] += (count - next) as u64;
                            break;
                        }
                        Placed::RingTooSmall => {
                            dc.drops[DropReason::RxRingTooSmall as usize] += (count - next) as u64;
                            break;
                        }
                    }
                }
                self.mode = Mode::Idle;
            }
        }
        Ok(())
    }
}

impl Staging {
    /// A staging buffer for a path whose frames are at most `max_frame` bytes.
    pub fn new(max_frame: usize) -> Staging {
        Staging {
            frame: vec![0u8; MAX_SUPER_FRAME].into_boxed_slice(),
            len: 0,
            hdr: NetHdr::default(),
            seg: vec![0u8; max_frame].into_boxed_slice(),
            out: Delivery::default(),
        }
    }

    /// Whether a staged frame (or some of its segments) still waits for receive buffers.
    #[inline]
    pub fn pending(&self) -> bool {
        self.out.pending()
    }

    /// The staged frame's first bytes, for the receive filter.
    pub fn head(&self) -> &[u8] {
        &self.frame[..self.len.min(16)]
    }

    /// Lets go of the staged frame (filtered, or its receiver went away); returns how many
    /// frames that drops (the segments not delivered yet, or 1).
    pub fn discard(&mut self) -> u64 {
        self.out.discard()
    }

    /// [`check`]s a transmitted chain into the staging buffer and keeps its header.
    /// Returns the frame's length, or why it is dropped. The caller completes the chain
    /// either way, then calls [`plan`](Self::plan).
    pub fn stage(
        &mut self,
        chain: &Chain<'_>,
        features: u64,
        max_frame: u64,
        swap_mac: bool,
    ) -> Result<u64, DropReason> {
        debug_assert!(!self.pending());
        let (len, hdr) = check(chain, features, max_frame, swap_mac, &mut self.frame)?;
        self.len = len;
        self.hdr = hdr;
        Ok(len as u64)
    }

    /// [`Delivery::plan`] for the staged frame.
    pub fn plan(&mut self, rx: &RxConfig, oc: &mut OffloadCounts) {
        self.out.plan(self.hdr, &mut self.frame[..self.len], rx, oc);
    }

    /// What [`Delivery::drain`] works on for the staged frame: its delivery, the frame,
    /// room for a segment.
    pub fn parts(&mut self) -> (&mut Delivery, &[u8], &mut [u8]) {
        (&mut self.out, &self.frame[..self.len], &mut self.seg)
    }
}

/// What [`forward`] needs to know about the path and the sending driver.
#[derive(Clone, Copy)]
pub(crate) struct Forward {
    /// The path's largest frame.
    pub max_frame: u64,
    /// Swap the MAC addresses (`reflect --swap-mac`).
    pub swap_mac: bool,
    /// The sending driver's negotiated features.
    pub features: u64,
    /// The receiving device's filter is not promiscuous: look at each frame.
    pub filter: bool,
    /// The receiving driver negotiated mergeable receive buffers.
    pub mrg: bool,
}

/// One transmitted frame that asks for an offload (`requested`), on a forwarding
/// burst: staged (or dropped, counted in `counts.0`, the sending side), filtered, planned
/// for the receiving side `rx` (its ring, memory, chain room and configuration; `None`:
/// it does not run) and delivered as far as its receive buffers go (counted in
/// `counts.1`); what the offload did is counted in `counts.2` (the sending side's). The caller has completed the transmit chain. Returns whether some of the
/// frame waits for receive buffers (the burst must take no further frame), or the
/// receive ring's fault.
#[cold]
#[inline(never)]
#[allow(clippy::too_many_arguments, reason = "the burst's state, borrowed piece by piece")]
pub(crate) fn forward<'m, D: Ring>(
    staging: Option<&mut Staging>,
    chain: &Chain<'_>,
    cx: Forward,
    rx: Option<(&mut D, &'m GuestMemory, &mut Chain<'m>, &RxConfig)>,
    nrx: &mut u16,
    rx_done: &mut u16,
    more: &mut ChainBuf,
    counts: (&mut BurstCounts, &mut BurstCounts, &mut OffloadCounts),
) -> Result<bool, RingFault> {
    let (sc, dc, oc) = counts;
    let Some(st) = staging else {
        sc.drop(DropReason::OffloadNotNegotiated);
        return Ok(false);
    };
    let len = match st.stage(chain, cx.features, cx.max_frame, cx.swap_mac) {
        Ok(len) => len,
        Err(why) => {
            sc.drop(why);
            return Ok(false);
        }
    };
    sc.rx_packets += 1;
    sc.rx_bytes += len;
    oc.add(request_event(&st.hdr), 1);
    let Some((dr, dmem, dchain, rx)) = rx else {
        sc.drop(DropReason::PeerDown);
        return Ok(false);
    };
    if cx.filter && !rx.accepts(st.head()) {
        dc.drop(DropReason::Filtered);
        return Ok(false);
    }
    st.plan(rx, oc);
    let (out, frame, seg) = st.parts();
    out.drain(frame, seg, dr, dmem, nrx, rx_done, dchain, more, cx.mrg, dc)?;
    Ok(st.pending())
}

/// Delivers `hdr` and `bytes` into receive chain `at` of `dr` (and the ones after it
/// with mergeable buffers), looking for more available chains when the burst's poll has
/// none left.
#[allow(clippy::too_many_arguments, reason = "the burst's receive side, borrowed piece by piece")]
pub(super) fn deliver<'m, D: Ring>(
    dr: &mut D,
    dmem: &'m GuestMemory,
    nrx: &mut u16,
    at: u16,
    first: &mut Chain<'m>,
    more: &mut ChainBuf,
    mrg: bool,
    mut hdr: [u8; NET_HDR_LEN],
    bytes: &[u8],
) -> Result<Placed, RingFault> {
    if at >= *nrx {
        *nrx = dr.poll_more()?;
        if at >= *nrx {
            return Ok(Placed::Wait);
        }
    }
    let head = dr.walk_avail(dmem, at, Dir::DeviceWrites, first)?;
    let cap = mrg::capacity(first);
    let need = (NET_HDR_LEN + bytes.len()) as u64;
    if cap >= need {
        hdr[NET_HDR_NUM_BUFFERS..NET_HDR_NUM_BUFFERS + 2].copy_from_slice(&1u16.to_le_bytes());
        scatter(first, 0, &hdr);
        scatter(first, NET_HDR_LEN, bytes);
        dr.add_used(head, need as u32);
        return Ok(Placed::Done(1));
    }
    if mrg && cap >= NET_HDR_LEN as u64 + ETH_HLEN {
        return mrg::scatter(dr, dmem, nrx, at, first, head, more, hdr, FrameSrc::Bytes(bytes), bytes.len());
    }
    Ok(Placed::NoFit)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ctrl::RxConfig;

    const MAX_FRAME: u64 = 1518;

    /// Ethernet + IPv4 + TCP (no options) + `payload` bytes; checksum fields zero.
    pub(crate) fn tcp4(payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20 + payload];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[14 + 2..14 + 4].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
        f[14 + 8] = 64;
        f[14 + 9] = 6;
        f[34 + 12] = 5 << 4;
        for (i, b) in f[54..].iter_mut().enumerate() {
            *b = i as u8;
        }
        f
    }

    pub(crate) fn packet(h: NetHdr, frame: &[u8]) -> Vec<u8> {
        let mut p = h.to_bytes().to_vec();
        p.extend_from_slice(frame);
        p
    }

    pub(crate) fn tso4(mss: u16) -> NetHdr {
        NetHdr {
            flags: net_hdr::F_NEEDS_CSUM,
            gso_type: net_hdr::GSO_TCPV4,
            hdr_len: 54,
            gso_size: mss,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        }
    }

    pub(crate) fn all() -> u64 {
        bit(f::NET_CSUM) | bit(f::NET_HOST_TSO4) | bit(f::NET_HOST_TSO6) | bit(f::NET_HOST_USO)
    }

    fn stage(st: &mut Staging, mut p: Vec<u8>, features: u64) -> Result<u64, DropReason> {
        let c = Chain::over(&mut p);
        st.stage(&c, features, MAX_FRAME, false)
    }

    #[test]
    fn only_needs_csum_or_a_gso_type_is_a_request() {
        for (flags, gso, want) in [
            (0, 0, false),
            (net_hdr::F_DATA_VALID, 0, false),
            (net_hdr::F_NEEDS_CSUM, 0, true),
            (0, net_hdr::GSO_TCPV4, true),
        ] {
            let mut p = packet(NetHdr { flags, gso_type: gso, ..NetHdr::default() }, &tcp4(10));
            assert_eq!(requested(&Chain::over(&mut p)), want, "flags {flags:#x} gso {gso:#x}");
        }
    }

    #[test]
    fn requests_are_checked_against_the_negotiated_features() {
        let mut st = Staging::new(MAX_FRAME as usize);
        let p = packet(tso4(1448), &tcp4(4000));
        assert_eq!(stage(&mut st, p.clone(), bit(f::NET_CSUM)), Err(DropReason::OffloadNotNegotiated));
        let ecn = NetHdr { gso_type: net_hdr::GSO_TCPV4 | net_hdr::GSO_ECN, ..tso4(1448) };
        assert_eq!(stage(&mut st, packet(ecn, &tcp4(4000)), all()), Err(DropReason::OffloadNotNegotiated));
        let csum = NetHdr { gso_type: 0, gso_size: 0, hdr_len: 0, ..tso4(0) };
        assert_eq!(stage(&mut st, packet(csum, &tcp4(100)), 0), Err(DropReason::OffloadNotNegotiated));
        assert_eq!(stage(&mut st, p, all()), Ok(4054));
    }

    #[test]
    fn malformed_requests_are_dropped_with_their_reason() {
        let mut st = Staging::new(MAX_FRAME as usize);
        let f = tcp4(4000);
        // Segments over the MTU, an unknown type, gso_size 0.
        assert_eq!(stage(&mut st, packet(tso4(1500), &f), all()), Err(DropReason::BadGso));
        let unknown = NetHdr { gso_type: 0x42, ..tso4(1448) };
        assert_eq!(stage(&mut st, packet(unknown, &f), all()), Err(DropReason::BadGso));
        assert_eq!(stage(&mut st, packet(tso4(0), &f), all()), Err(DropReason::BadGso));
        // The chain ends inside the TCP header (before and after hdr_len says).
        assert_eq!(stage(&mut st, packet(tso4(1448), &f[..44]), all()), Err(DropReason::TruncatedHeader));
        let no_hint = NetHdr { hdr_len: 0, ..tso4(1448) };
        assert_eq!(stage(&mut st, packet(no_hint, &f[..44]), all()), Err(DropReason::TruncatedHeader));
        // Checksum field past the end, at an odd offset, not the TCP header's.
        let past = NetHdr { gso_type: 0, gso_size: 0, hdr_len: 0, csum_offset: 100, ..tso4(0) };
        assert_eq!(stage(&mut st, packet(past, &tcp4(40)), all()), Err(DropReason::BadCsum));
        let odd = NetHdr { csum_offset: 15, ..past };
        assert_eq!(stage(&mut st, packet(odd, &tcp4(40)), all()), Err(DropReason::BadCsum));
        let wrong = NetHdr { csum_start: 30, ..tso4(1448) };
        assert_eq!(stage(&mut st, packet(wrong, &f), all()), Err(DropReason::BadCsum));
        // A frame with only a checksum request is held to the MTU; a chain shorter
        // than the header and an Ethernet header is short.
        let csum = NetHdr { gso_type: 0, gso_size: 0, hdr_len: 0, ..tso4(0) };
        assert_eq!(stage(&mut st, packet(csum, &tcp4(1500)), all()), Err(DropReason::Oversize));
        assert_eq!(stage(&mut st, packet(csum, &f[..10]), all()), Err(DropReason::ShortFrame));
        assert!(!st.pending());
    }

    #[test]
    fn plan_follows_the_receivers_offloads() {
        let mut st = Staging::new(MAX_FRAME as usize);
        let none = RxConfig::reset([2, 0, 0, 0, 0, 1], 0);
        let tso = RxConfig::reset([2, 0, 0, 0, 0, 1], bit(f::NET_GUEST_CSUM) | bit(f::NET_GUEST_TSO4));
        let mut oc = OffloadCounts::default();
        stage(&mut st, packet(tso4(1448), &tcp4(4000)), all()).unwrap();
        st.plan(&none, &mut oc);
        assert_eq!(st.out.mode, Mode::Segments { next: 0, count: 3 });
        assert_eq!(st.discard(), 3);
        stage(&mut st, packet(tso4(1448), &tcp4(4000)), all()).unwrap();
        st.plan(&tso, &mut oc);
        assert_eq!(st.out.mode, Mode::Whole);
        let out = NetHdr::from_bytes(st.out.out_hdr);
        assert_eq!(out, NetHdr { num_buffers: 0, ..tso4(1448) });
        assert_eq!(st.discard(), 1);
        // A partial checksum for a receiver without GUEST_CSUM is completed here.
        let csum = NetHdr { gso_type: 0, gso_size: 0, hdr_len: 0, ..tso4(0) };
        let frame = tcp4(100);
        stage(&mut st, packet(csum, &frame), all()).unwrap();
        st.plan(&none, &mut oc);
        assert_eq!((st.out.mode, st.out.out_hdr), (Mode::Whole, [0; NET_HDR_LEN]));
        // One each of segmented (into 3), passed whole, completed here.
        assert_eq!(oc.0, [0, 0, 1, 1, 1, 3]);
        let mut want = frame.clone();
        complete_csum(&mut want, 34, 16).unwrap();
        assert_ne!(want, frame);
        assert_eq!(&st.frame[..st.len], &want[..]);
    }
}
