//! Software offloads for frames that carry a virtio-net header: the header itself
//! ([`NetHdr`]), checksum completion ([`complete_csum`]) and segmentation of TCP/IPv4,
//! TCP/IPv6 and UDP (USO) super-frames ([`Gso`], [`segment`]), as pure functions over
//! byte slices.
//!
//! What the header means is virtio 1.2 §5.1.6.2 (a driver's transmitted packet:
//! `NEEDS_CSUM` with `csum_start`/`csum_offset`, `gso_type`, `gso_size`, `hdr_len`) and
//! §5.1.6.4 (a received packet: what a device may hand a driver that negotiated
//! `GUEST_CSUM`, `GUEST_TSO4`/`TSO6`, `GUEST_USO4`/`USO6`). When a frame arrives with
//! such metadata and must go where the offload was not negotiated, the work has to be
//! done in software, the way Linux does it for a device without the feature:
//! `skb_checksum_help` for a partial checksum, and `tcp_gso_segment` /
//! `__udp_gso_segment` under `inet_gso_segment` / `ipv6_gso_segment` for a super-frame.
//!
//! Who uses it (issue 17): the backend's forwarding paths (`reflect`, `xconnect`;
//! `host-backend/src/port/offload.rs`), to segment a guest's TSO/USO super-frame for a
//! peer without the matching `GUEST_*` feature and to complete `NEEDS_CSUM` frames for a
//! peer without `GUEST_CSUM`; an error here is an error for that packet (counted,
//! dropped), never a malformed frame sent on. (`--handoff` carries no offloads.)
//!
//! Owns: the 12-byte `virtio_net_hdr_v1` as a value, the checks that a header agrees
//! with its frame, the Ethernet/IPv4/IPv6/TCP/UDP parsing this needs, and rewriting each
//! segment's headers with complete checksums. Must not: touch ring or guest memory (the
//! caller hands in its own copy of the frame: [`Gso`] reads the headers once to check
//! them and again per segment, so the bytes must not change underneath), know which
//! features were negotiated (refusing "GSO without the negotiated feature" is the
//! caller's decision; this module only checks that a request is well formed), allocate
//! per segment, or keep state. The backend's `gso.rs` (its generator's own template)
//! is separate and untouched.
//!
//! Linux's rules, per segment `k` of `n` (payload `gso_size` bytes, the last one the
//! rest): IPv4 total length, id `id + k` (wrapping) and header checksum; IPv6 payload
//! length (extension headers included); TCP sequence number advanced by the payload
//! before the segment, FIN and PSH only on the last segment, CWR only on the first, the
//! other flags, options and the urgent pointer copied to every segment; UDP length; the
//! TCP or UDP checksum complete (pseudo-header, header, payload). Deliberate choices:
//!
//! * Checksums are computed from scratch, not by adjusting the sender's pseudo-header
//!   seed as Linux does, so a wrong seed cannot produce a wrong checksum. A TCP checksum
//!   of 0 is written as 0 (as `tcp_gso_segment`); a UDP one as 0xffff (`CSUM_MANGLED_0`,
//!   as `__udp_gso_segment`: 0 means "no checksum" for UDP).
//! * `hdr_len` is a hint (§5.1.6.2: unless `HOST_HDRLEN` is negotiated, and Linux
//!   guests send the linear length): the header length is parsed from the frame, as
//!   Linux does. A `hdr_len` past the end of the frame is refused, as Linux's tun and
//!   packet sockets do.
//! * The super-frame's own IPv4 total length, IPv6 payload length and UDP length are
//!   not trusted either: the frame's length is (Linux uses `skb->len`).
//! * A super-frame whose payload fits in one `gso_size` is one segment (its headers
//!   rewritten as above), not an error: Linux's `virtio_net_hdr_to_skb` does not treat
//!   such a packet as GSO ("too small packets are not really GSO ones").
//! * With `NEEDS_CSUM` set, `csum_start` must be the parsed transport header and
//!   `csum_offset` its checksum field (Linux checks the offset; it takes `csum_start` as
//!   the transport header, so a mismatch there would checksum the wrong bytes). USO
//!   requires `NEEDS_CSUM` and at most [`UDP_MAX_SEGMENTS`] segments, as
//!   `virtio_net_hdr_to_skb` does; TCP without `NEEDS_CSUM` is accepted (the checksum is
//!   computed anyway), as Linux does. TCP has no segment limit here (nor in Linux): a
//!   64 KiB super-frame with a `gso_size` of 1 makes some 65 000 segments, so a caller
//!   that must bound its work per frame checks [`Gso::segments`] first.
//! * [`complete_csum`] refuses an odd `csum_offset` (Linux does not, and stores a value
//!   that cannot verify).
//! * Frames: Ethernet with up to two 802.1Q/802.1ad tags; IPv4 with options, not a
//!   fragment; IPv6 with hop-by-hop and destination-options extension headers (a
//!   routing header would change the pseudo-header's destination and is refused, as is
//!   a fragment header). Not done: UFO (`GSO_UDP`, IP fragmentation), tunnels
//!   (encapsulated GSO), Linux's `FIXEDID` and GSO_PARTIAL, IPv6 jumbograms.

use core::fmt;
use core::ops::Range;

use crate::layout::{net_hdr, NET_HDR_LEN, NET_HDR_NUM_BUFFERS};

/// What the functions of this module return.
pub type Result<T> = core::result::Result<T, OffloadError>;

/// Most segments a USO super-frame may ask for (Linux's `UDP_MAX_SEGMENTS`).
pub const UDP_MAX_SEGMENTS: usize = 128;
/// Most VLAN tags in front of the IP header.
pub const MAX_VLAN_TAGS: usize = 2;
/// Most IPv6 extension headers skipped before the transport header.
pub const MAX_IPV6_EXT_HEADERS: usize = 4;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
/// Offset of the checksum field in a TCP header.
pub const TCP_CSUM_OFFSET: usize = 16;
/// Offset of the checksum field in a UDP header.
pub const UDP_CSUM_OFFSET: usize = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// A header of the frame, for [`OffloadError::HeaderTruncated`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    /// The virtio-net header.
    NetHdr,
    /// Ethernet (and VLAN tags).
    Ethernet,
    /// IPv4.
    Ipv4,
    /// IPv6 (and its extension headers).
    Ipv6,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

/// Why a frame, its header or a request about them is refused. Every refusal is one of
/// these: no function of this module panics on any input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffloadError {
    /// The bytes end before this header does (a chain that ends mid-header).
    HeaderTruncated(Layer),
    /// An output buffer is smaller than what must be written into it.
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes given.
        have: usize,
    },
    /// The checksum field (`start + offset`, two bytes) is not inside the frame.
    CsumOutOfFrame {
        /// `csum_start`.
        start: usize,
        /// `csum_offset`.
        offset: usize,
        /// Frame length.
        len: usize,
    },
    /// `csum_offset` is odd: no one's-complement checksum field sits at an odd offset
    /// from where its sum starts (TCP 16, UDP 6, ICMP 2), and a value stored there
    /// would not verify.
    CsumOffsetOdd {
        /// `csum_offset`.
        offset: usize,
    },
    /// `NEEDS_CSUM` names a checksum field other than the parsed transport header's.
    CsumMismatch {
        /// `csum_start` asked for.
        start: usize,
        /// `csum_offset` asked for.
        offset: usize,
        /// Where the transport header is.
        l4: usize,
    },
    /// A USO super-frame without `NEEDS_CSUM` (Linux refuses it).
    CsumRequired,
    /// `gso_type` is not one this module segments (UFO, unknown values, ECN on
    /// something other than TCP).
    UnsupportedGsoType(u8),
    /// `gso_type` is `GSO_NONE`: there is nothing to segment.
    NotGso,
    /// `gso_size` is 0.
    GsoSizeZero,
    /// `hdr_len` is past the end of the frame.
    HdrLenPastFrame {
        /// `hdr_len`.
        hdr_len: usize,
        /// Frame length.
        len: usize,
    },
    /// The EtherType (after any VLAN tags) is not IPv4 or IPv6, or there are more than
    /// [`MAX_VLAN_TAGS`] tags.
    NotIp(u16),
    /// The IP version does not match the EtherType, or IPv4's header length is under 20.
    BadIpHeader,
    /// The IP version does not match `gso_type` (TCPV4 on IPv6 or TCPV6 on IPv4).
    GsoIpMismatch {
        /// `gso_type`.
        gso_type: u8,
    },
    /// The IP packet is a fragment (IPv4 MF or offset, or an IPv6 fragment header).
    IpFragment,
    /// The transport protocol is not the one `gso_type` asks for (TCP GSO on a non-TCP
    /// packet, USO on a non-UDP one; an IPv6 extension header this module does not skip
    /// shows up here too, as its number).
    L4Mismatch {
        /// Protocol number `gso_type` needs.
        expected: u8,
        /// Protocol number found.
        found: u8,
    },
    /// TCP data offset under 5 words.
    BadTcpHeader,
    /// More segments than allowed ([`UDP_MAX_SEGMENTS`] for USO).
    TooManySegments {
        /// Segments the frame would make.
        segments: usize,
        /// The limit.
        max: usize,
    },
    /// A segment's IP or UDP length would not fit in 16 bits.
    LengthOverflow,
    /// There is no segment with this index.
    NoSuchSegment {
        /// The index asked for.
        index: usize,
        /// How many segments there are.
        segments: usize,
    },
}

impl fmt::Display for OffloadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use OffloadError::*;
        match *self {
            HeaderTruncated(l) => write!(f, "frame ends inside its {l:?} header"),
            BufferTooSmall { need, have } => write!(f, "buffer of {have} bytes, {need} needed"),
            CsumOutOfFrame { start, offset, len } => {
                write!(f, "checksum at {start}+{offset} is outside the {len}-byte frame")
            }
            CsumOffsetOdd { offset } => write!(f, "checksum offset {offset} is odd"),
            CsumMismatch { start, offset, l4 } => write!(
                f,
                "NEEDS_CSUM at {start}+{offset} is not the checksum of the transport header at {l4}"
            ),
            CsumRequired => write!(f, "USO super-frame without NEEDS_CSUM"),
            UnsupportedGsoType(t) => write!(f, "unsupported gso_type {t:#x}"),
            NotGso => write!(f, "gso_type is GSO_NONE"),
            GsoSizeZero => write!(f, "gso_size is 0"),
            HdrLenPastFrame { hdr_len, len } => {
                write!(f, "hdr_len {hdr_len} is past the end of the {len}-byte frame")
            }
            NotIp(t) => write!(f, "EtherType {t:#06x} is not IPv4 or IPv6"),
            BadIpHeader => write!(f, "malformed IP header"),
            GsoIpMismatch { gso_type } => write!(f, "gso_type {gso_type:#x} does not match the IP version"),
            IpFragment => write!(f, "IP fragment"),
            L4Mismatch { expected, found } => {
                write!(f, "transport protocol {found}, gso_type needs {expected}")
            }
            BadTcpHeader => write!(f, "TCP data offset under 5"),
            TooManySegments { segments, max } => write!(f, "{segments} segments, at most {max}"),
            LengthOverflow => write!(f, "a segment's length does not fit in 16 bits"),
            NoSuchSegment { index, segments } => write!(f, "segment {index} of {segments}"),
        }
    }
}

impl std::error::Error for OffloadError {}

/// `struct virtio_net_hdr_v1` (virtio 1.2 §5.1.6), the 12 bytes in front of every frame
/// once `VERSION_1` is negotiated; all fields little endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHdr {
    /// `NEEDS_CSUM`, `DATA_VALID`, `RSC_INFO` ([`net_hdr::F_NEEDS_CSUM`] ...).
    pub flags: u8,
    /// `GSO_NONE`, `GSO_TCPV4`, ... with the `GSO_ECN` bit ([`net_hdr::GSO_TCPV4`] ...).
    pub gso_type: u8,
    /// Length of the headers (a hint unless `HOST_HDRLEN`/`GUEST_HDRLEN`).
    pub hdr_len: u16,
    /// Payload bytes per segment (the MSS).
    pub gso_size: u16,
    /// Where the checksum starts (with `NEEDS_CSUM`).
    pub csum_start: u16,
    /// Where the checksum is stored, counted from `csum_start`.
    pub csum_offset: u16,
    /// Buffers a received packet spans (mergeable receive buffers); 0 on transmit.
    pub num_buffers: u16,
}

impl NetHdr {
    /// Bytes on the wire.
    pub const LEN: usize = NET_HDR_LEN;

    /// Reads a header from the first 12 bytes of `b`.
    pub fn parse(b: &[u8]) -> Result<NetHdr> {
        match b.get(..NET_HDR_LEN) {
            Some(h) => {
                let mut a = [0u8; NET_HDR_LEN];
                a.copy_from_slice(h);
                Ok(NetHdr::from_bytes(a))
            }
            None => Err(OffloadError::HeaderTruncated(Layer::NetHdr)),
        }
    }

    /// The header these 12 bytes hold.
    pub fn from_bytes(b: [u8; NET_HDR_LEN]) -> NetHdr {
        let le = |at: usize| u16::from_le_bytes([b[at], b[at + 1]]);
        NetHdr {
            flags: b[net_hdr::FLAGS],
            gso_type: b[net_hdr::GSO_TYPE],
            hdr_len: le(net_hdr::HDR_LEN),
            gso_size: le(net_hdr::GSO_SIZE),
            csum_start: le(net_hdr::CSUM_START),
            csum_offset: le(net_hdr::CSUM_OFFSET),
            num_buffers: le(NET_HDR_NUM_BUFFERS),
        }
    }

    /// The 12 bytes on the wire.
    pub fn to_bytes(&self) -> [u8; NET_HDR_LEN] {
        let mut b = [0u8; NET_HDR_LEN];
        b[net_hdr::FLAGS] = self.flags;
        b[net_hdr::GSO_TYPE] = self.gso_type;
        for (at, v) in [
            (net_hdr::HDR_LEN, self.hdr_len),
            (net_hdr::GSO_SIZE, self.gso_size),
            (net_hdr::CSUM_START, self.csum_start),
            (net_hdr::CSUM_OFFSET, self.csum_offset),
            (NET_HDR_NUM_BUFFERS, self.num_buffers),
        ] {
            b[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Writes the header into the first 12 bytes of `out`.
    pub fn write(&self, out: &mut [u8]) -> Result<()> {
        let have = out.len();
        match out.get_mut(..NET_HDR_LEN) {
            Some(o) => {
                o.copy_from_slice(&self.to_bytes());
                Ok(())
            }
            None => Err(OffloadError::BufferTooSmall { need: NET_HDR_LEN, have }),
        }
    }

    /// `NEEDS_CSUM` is set: the checksum at `csum_start + csum_offset` is partial.
    pub fn needs_csum(&self) -> bool {
        self.flags & net_hdr::F_NEEDS_CSUM != 0
    }

    /// What `gso_type` asks for: `None` for `GSO_NONE`, an error for what this module
    /// does not segment (see [`GsoKind::from_gso_type`]).
    pub fn gso_kind(&self) -> Result<Option<GsoKind>> {
        GsoKind::from_gso_type(self.gso_type)
    }
}

/// A segmentation request this module carries out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GsoKind {
    /// `GSO_TCPV4` (with or without `GSO_ECN`).
    TcpV4,
    /// `GSO_TCPV6` (with or without `GSO_ECN`).
    TcpV6,
    /// `GSO_UDP_L4` (USO), over IPv4 or IPv6.
    UdpL4,
}

impl GsoKind {
    /// Classifies `gso_type`: `Ok(None)` for `GSO_NONE`; `UnsupportedGsoType` for UFO
    /// (`GSO_UDP`), unknown values, and `GSO_ECN` with anything but TCP (as Linux's
    /// `virtio_net_hdr_to_skb`).
    pub fn from_gso_type(t: u8) -> Result<Option<GsoKind>> {
        let ecn = t & net_hdr::GSO_ECN != 0;
        match t & !net_hdr::GSO_ECN {
            net_hdr::GSO_NONE if !ecn => Ok(None),
            net_hdr::GSO_TCPV4 => Ok(Some(GsoKind::TcpV4)),
            net_hdr::GSO_TCPV6 => Ok(Some(GsoKind::TcpV6)),
            net_hdr::GSO_UDP_L4 if !ecn => Ok(Some(GsoKind::UdpL4)),
            _ => Err(OffloadError::UnsupportedGsoType(t)),
        }
    }

    fn proto(self) -> u8 {
        match self {
            GsoKind::TcpV4 | GsoKind::TcpV6 => IPPROTO_TCP,
            GsoKind::UdpL4 => IPPROTO_UDP,
        }
    }
}

/// One's-complement sum of `data` as big-endian 16-bit words (an odd last byte padded
/// with zero), added to `acc`, not folded. Summing 32-bit words is the same sum once
/// folded (2^16 ≡ 1 modulo 0xffff, RFC 1071 §2).
pub fn sum(data: &[u8], mut acc: u64) -> u64 {
    let mut quads = data.chunks_exact(4);
    for q in &mut quads {
        acc += u32::from_be_bytes([q[0], q[1], q[2], q[3]]) as u64;
    }
    let mut rest = quads.remainder().chunks_exact(2);
    for w in &mut rest {
        acc += u16::from_be_bytes([w[0], w[1]]) as u64;
    }
    if let [b] = rest.remainder() {
        acc += (*b as u64) << 8;
    }
    acc
}

/// Folds a sum to 16 bits (end-around carry).
pub fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

fn be16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

fn put16(f: &mut [u8], at: usize, v: u16) {
    f[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Completes a partial checksum, as Linux's `skb_checksum_help` does for a device
/// without checksum offload (virtio 1.2 §5.1.6.2: `NEEDS_CSUM`): the 16-bit field at
/// `start + offset` holds the sender's seed (for TCP and UDP, the pseudo-header sum);
/// the one's-complement sum of `frame[start..]`, the seed included, is folded,
/// complemented and stored there, big endian.
///
/// A result of 0 is stored as 0xffff, whatever the protocol, as `skb_checksum_help`
/// does (`csum_fold(csum) ?: CSUM_MANGLED_0`): for UDP 0 would mean "no checksum"
/// (and is not allowed over IPv6), and for TCP or anything else 0xffff and 0 are the
/// same number in one's-complement arithmetic, so the receiver's check passes either
/// way. The sum runs to the end of `frame`, as Linux's runs to `skb->len`: pass the
/// frame without any padding after the IP packet.
///
/// Refused, the frame untouched: `CsumOutOfFrame` unless the two checksum bytes lie
/// inside the frame; `CsumOffsetOdd` for an odd `offset`. Linux does not check the
/// parity, but its result at an odd offset does not verify (the stored value straddles
/// two of the words the sum adds), so such a frame would go out malformed; no protocol
/// with this checksum puts the field there.
pub fn complete_csum(frame: &mut [u8], start: usize, offset: usize) -> Result<()> {
    let len = frame.len();
    let at = match start.checked_add(offset) {
        Some(at) if at.checked_add(2).is_some_and(|end| end <= len) => at,
        _ => return Err(OffloadError::CsumOutOfFrame { start, offset, len }),
    };
    if offset % 2 != 0 {
        return Err(OffloadError::CsumOffsetOdd { offset });
    }
    let c = match !fold(sum(&frame[start..], 0)) {
        0 => 0xffff,
        c => c,
    };
    put16(frame, at, c);
    Ok(())
}

/// A checked segmentation request: a super-frame and its virtio-net header, parsed and
/// validated once by [`Gso::new`], then written out one segment at a time into the
/// caller's buffers ([`write_segment`](Self::write_segment), or
/// [`write_header`](Self::write_header) plus the frame's bytes at
/// [`payload_range`](Self::payload_range) for a caller that gathers).
#[derive(Clone, Debug)]
pub struct Gso<'a> {
    frame: &'a [u8],
    kind: GsoKind,
    /// Offset of the IP header.
    l3: usize,
    /// IPv4 (else IPv6).
    v4: bool,
    /// IPv4 header length (options included); unused for IPv6.
    ihl: usize,
    /// Offset of the TCP or UDP header.
    l4: usize,
    /// Length of all headers: where the payload starts.
    hdr_len: usize,
    gso_size: usize,
    segments: usize,
}

impl<'a> Gso<'a> {
    /// Parses `frame` (the Ethernet frame, without the virtio-net header) and checks it
    /// against `hdr`; see the module comment for what is accepted.
    pub fn new(frame: &'a [u8], hdr: &NetHdr) -> Result<Gso<'a>> {
        let kind = hdr.gso_kind()?.ok_or(OffloadError::NotGso)?;
        let gso_size = hdr.gso_size as usize;
        if gso_size == 0 {
            return Err(OffloadError::GsoSizeZero);
        }
        let len = frame.len();
        if hdr.hdr_len as usize > len {
            return Err(OffloadError::HdrLenPastFrame { hdr_len: hdr.hdr_len as usize, len });
        }

        // Ethernet, VLAN tags.
        let mut et_at = 12;
        let mut tags = 0;
        let ethertype = loop {
            if et_at + 2 > len {
                return Err(OffloadError::HeaderTruncated(Layer::Ethernet));
            }
            let et = be16(frame, et_at);
            if et != ETHERTYPE_VLAN && et != ETHERTYPE_QINQ {
                break et;
            }
            if tags == MAX_VLAN_TAGS {
                return Err(OffloadError::NotIp(et));
            }
            tags += 1;
            et_at += 4;
        };
        let l3 = et_at + 2;

        // IP.
        let (v4, ihl, l4, proto) = match ethertype {
            ETHERTYPE_IPV4 => {
                if l3 + IPV4_HLEN > len {
                    return Err(OffloadError::HeaderTruncated(Layer::Ipv4));
                }
                let ihl = (frame[l3] & 0x0f) as usize * 4;
                if frame[l3] >> 4 != 4 || ihl < IPV4_HLEN {
                    return Err(OffloadError::BadIpHeader);
                }
                if l3 + ihl > len {
                    return Err(OffloadError::HeaderTruncated(Layer::Ipv4));
                }
                if be16(frame, l3 + 6) & 0x3fff != 0 {
                    return Err(OffloadError::IpFragment);
                }
                (true, ihl, l3 + ihl, frame[l3 + 9])
            }
            ETHERTYPE_IPV6 => {
                if l3 + IPV6_HLEN > len {
                    return Err(OffloadError::HeaderTruncated(Layer::Ipv6));
                }
                if frame[l3] >> 4 != 6 {
                    return Err(OffloadError::BadIpHeader);
                }
                let mut next = frame[l3 + 6];
                let mut at = l3 + IPV6_HLEN;
                let mut exts = 0;
                while next == IPV6_HOPOPTS || next == IPV6_DSTOPTS {
                    if exts == MAX_IPV6_EXT_HEADERS {
                        break;
                    }
                    if at + 2 > len {
                        return Err(OffloadError::HeaderTruncated(Layer::Ipv6));
                    }
                    let ext_len = (frame[at + 1] as usize + 1) * 8;
                    if at + ext_len > len {
                        return Err(OffloadError::HeaderTruncated(Layer::Ipv6));
                    }
                    next = frame[at];
                    at += ext_len;
                    exts += 1;
                }
                if next == IPV6_FRAGMENT {
                    return Err(OffloadError::IpFragment);
                }
                (false, 0, at, next)
            }
            et => return Err(OffloadError::NotIp(et)),
        };
        if matches!((kind, v4), (GsoKind::TcpV4, false) | (GsoKind::TcpV6, true)) {
            return Err(OffloadError::GsoIpMismatch { gso_type: hdr.gso_type });
        }
        if proto != kind.proto() {
            return Err(OffloadError::L4Mismatch { expected: kind.proto(), found: proto });
        }

        // TCP or UDP.
        let (hdr_end, csum_offset) = if kind == GsoKind::UdpL4 {
            if l4 + UDP_HLEN > len {
                return Err(OffloadError::HeaderTruncated(Layer::Udp));
            }
            (l4 + UDP_HLEN, UDP_CSUM_OFFSET)
        } else {
            if l4 + TCP_HLEN > len {
                return Err(OffloadError::HeaderTruncated(Layer::Tcp));
            }
            let doff = (frame[l4 + 12] >> 4) as usize * 4;
            if doff < TCP_HLEN {
                return Err(OffloadError::BadTcpHeader);
            }
            if l4 + doff > len {
                return Err(OffloadError::HeaderTruncated(Layer::Tcp));
            }
            (l4 + doff, TCP_CSUM_OFFSET)
        };

        // The checksum request, if any, must name this transport header's checksum.
        if hdr.needs_csum() {
            let (start, offset) = (hdr.csum_start as usize, hdr.csum_offset as usize);
            if start != l4 || offset != csum_offset {
                return Err(OffloadError::CsumMismatch { start, offset, l4 });
            }
        } else if kind == GsoKind::UdpL4 {
            return Err(OffloadError::CsumRequired);
        }

        // Segments and their lengths.
        let payload = len - hdr_end;
        let segments = payload.div_ceil(gso_size).max(1);
        if kind == GsoKind::UdpL4 && segments > UDP_MAX_SEGMENTS {
            return Err(OffloadError::TooManySegments { segments, max: UDP_MAX_SEGMENTS });
        }
        // The first segment is the longest; IPv4 counts its header, IPv6 does not, UDP
        // counts its own.
        let first = payload.min(gso_size);
        let ip_hdrs = if v4 { hdr_end - l3 } else { hdr_end - l3 - IPV6_HLEN };
        let ip_len = ip_hdrs + first;
        if ip_len > 0xffff {
            return Err(OffloadError::LengthOverflow);
        }
        Ok(Gso { frame, kind, l3, v4, ihl, l4, hdr_len: hdr_end, gso_size, segments })
    }

    /// The request's kind.
    pub fn kind(&self) -> GsoKind {
        self.kind
    }

    /// How many segments the super-frame makes (1 if its payload fits in `gso_size`).
    pub fn segments(&self) -> usize {
        self.segments
    }

    /// Length of the headers every segment starts with (Ethernet to TCP/UDP, as parsed).
    pub fn header_len(&self) -> usize {
        self.hdr_len
    }

    /// Offset of the TCP or UDP header.
    pub fn l4_offset(&self) -> usize {
        self.l4
    }

    /// Payload bytes per segment (all but the last).
    pub fn gso_size(&self) -> usize {
        self.gso_size
    }

    /// Where segment `k`'s payload lies in the super-frame.
    pub fn payload_range(&self, k: usize) -> Result<Range<usize>> {
        if k >= self.segments {
            return Err(OffloadError::NoSuchSegment { index: k, segments: self.segments });
        }
        let start = self.hdr_len + k * self.gso_size;
        let end = if k + 1 == self.segments { self.frame.len() } else { start + self.gso_size };
        Ok(start..end)
    }

    /// Length of segment `k`, headers included.
    pub fn segment_len(&self, k: usize) -> Result<usize> {
        Ok(self.hdr_len + self.payload_range(k)?.len())
    }

    /// Length of the longest segment (the first), headers included.
    pub fn max_segment_len(&self) -> usize {
        self.hdr_len + (self.frame.len() - self.hdr_len).min(self.gso_size)
    }

    /// Writes segment `k`'s headers, lengths, ids, sequence number, flags and checksums
    /// complete, into the first [`header_len`](Self::header_len) bytes of `out`; its
    /// payload is the super-frame's bytes at [`payload_range`](Self::payload_range).
    /// Returns the bytes written.
    pub fn write_header(&self, k: usize, out: &mut [u8]) -> Result<usize> {
        let payload = self.payload_range(k)?;
        let h = self.hdr_len;
        if out.len() < h {
            return Err(OffloadError::BufferTooSmall { need: h, have: out.len() });
        }
        let out = &mut out[..h];
        out.copy_from_slice(&self.frame[..h]);
        let (l3, l4, n) = (self.l3, self.l4, payload.len());
        let last = k + 1 == self.segments;

        // IP: lengths, IPv4 id and header checksum; the pseudo-header's addresses.
        let addrs = if self.v4 {
            put16(out, l3 + 2, (h - l3 + n) as u16);
            let id = be16(out, l3 + 4).wrapping_add(k as u16);
            put16(out, l3 + 4, id);
            put16(out, l3 + 10, 0);
            let c = !fold(sum(&out[l3..l3 + self.ihl], 0));
            put16(out, l3 + 10, c);
            l3 + 12..l3 + 20
        } else {
            put16(out, l3 + 4, (h - l3 - IPV6_HLEN + n) as u16);
            l3 + 8..l3 + 40
        };
        let l4_len = h - l4 + n;
        let pseudo = sum(&out[addrs], self.kind.proto() as u64 + l4_len as u64);

        // Transport: TCP sequence and flags, UDP length; then the checksum.
        let csum_at = if self.kind == GsoKind::UdpL4 {
            put16(out, l4 + 4, l4_len as u16);
            l4 + UDP_CSUM_OFFSET
        } else {
            let seq = u32::from_be_bytes([out[l4 + 4], out[l4 + 5], out[l4 + 6], out[l4 + 7]]);
            let seq = seq.wrapping_add((k * self.gso_size) as u32);
            out[l4 + 4..l4 + 8].copy_from_slice(&seq.to_be_bytes());
            if !last {
                out[l4 + 13] &= !(TCP_FIN | TCP_PSH);
            }
            if k != 0 {
                out[l4 + 13] &= !TCP_CWR;
            }
            l4 + TCP_CSUM_OFFSET
        };
        put16(out, csum_at, 0);
        // The transport header's length is even (TCP: words; UDP: 8), so the payload's
        // words line up with the header's.
        let c = !fold(sum(&self.frame[payload], sum(&out[l4..], pseudo)));
        let c = if c == 0 && self.kind == GsoKind::UdpL4 { 0xffff } else { c };
        put16(out, csum_at, c);
        Ok(h)
    }

    /// Writes segment `k` (headers and payload) into the start of `out`; returns its
    /// length.
    pub fn write_segment(&self, k: usize, out: &mut [u8]) -> Result<usize> {
        let payload = self.payload_range(k)?;
        let need = self.hdr_len + payload.len();
        if out.len() < need {
            return Err(OffloadError::BufferTooSmall { need, have: out.len() });
        }
        self.write_header(k, out)?;
        out[self.hdr_len..need].copy_from_slice(&self.frame[payload]);
        Ok(need)
    }
}

/// Segments `frame` as `hdr` asks and hands each segment, complete, to `out` in order;
/// returns how many there were. Nothing is handed out unless the whole request is valid
/// ([`Gso::new`] checks it first). One buffer of the longest segment's size is
/// allocated per call; a caller that has its own buffers uses [`Gso`] directly.
pub fn segment(frame: &[u8], hdr: &NetHdr, mut out: impl FnMut(&[u8])) -> Result<usize> {
    let g = Gso::new(frame, hdr)?;
    let mut buf = vec![0u8; g.max_segment_len()];
    for k in 0..g.segments() {
        let n = g.write_segment(k, &mut buf)?;
        out(&buf[..n]);
    }
    Ok(g.segments())
}

#[cfg(test)]
mod tests;
