//! Tests of the software offloads. The segments are checked against what the test's own
//! builder knows about the frame (offsets, lengths, flags), with checksums verified by a
//! separately written reference (`reference_csum`, byte pairs into a wide sum) and by
//! `etherparse`, an independent parser and checksum implementation.

use super::*;
use proptest::prelude::*;

// ---- An independent reference: RFC 1071, byte pairs over the concatenated parts. ----

/// The Internet checksum over the concatenation of `parts` (0 when the parts already
/// carry a correct checksum).
fn reference_csum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut s: u64 = 0;
    let mut i = 0;
    while i < bytes.len() {
        let hi = bytes[i] as u64;
        let lo = if i + 1 < bytes.len() { bytes[i + 1] as u64 } else { 0 };
        s += (hi << 8) | lo;
        i += 2;
    }
    while s > 0xffff {
        s = (s >> 16) + (s & 0xffff);
    }
    !(s as u16)
}

/// The TCP/UDP pseudo-header for an IPv4 or IPv6 packet whose IP header starts at `l3`.
fn pseudo_header(f: &[u8], l3: usize, v6: bool, proto: u8, l4_len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    if v6 {
        p.extend_from_slice(&f[l3 + 8..l3 + 40]);
        p.extend_from_slice(&(l4_len as u32).to_be_bytes());
        p.extend_from_slice(&[0, 0, 0, proto]);
    } else {
        p.extend_from_slice(&f[l3 + 12..l3 + 20]);
        p.extend_from_slice(&[0, proto]);
        p.extend_from_slice(&(l4_len as u16).to_be_bytes());
    }
    p
}

fn rd16(f: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([f[at], f[at + 1]])
}

fn rd32(f: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([f[at], f[at + 1], f[at + 2], f[at + 3]])
}

// ---- A super-frame builder: the test knows every offset of what it builds. ----

const FIN: u8 = 0x01;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;
const URG: u8 = 0x20;
const ECE: u8 = 0x40;
const CWR: u8 = 0x80;

#[derive(Clone, Debug)]
struct Spec {
    v6: bool,
    udp: bool,
    vlan: bool,
    /// IPv4: option words (0..=10); IPv6: 8-byte extension headers (hop-by-hop first,
    /// then destination options).
    ip_ext: usize,
    /// TCP option words (0..=10).
    tcp_opts: usize,
    payload: usize,
    mss: u16,
    id: u16,
    seq: u32,
    flags: u8,
    /// TCP only: NEEDS_CSUM set (USO always sets it).
    needs_csum: bool,
    seed: u64,
}

impl Spec {
    fn tcp4(payload: usize, mss: u16) -> Spec {
        Spec {
            v6: false,
            udp: false,
            vlan: false,
            ip_ext: 0,
            tcp_opts: 0,
            payload,
            mss,
            id: 100,
            seq: 1000,
            flags: ACK,
            needs_csum: true,
            seed: 1,
        }
    }

    fn l3(&self) -> usize {
        14 + if self.vlan { 4 } else { 0 }
    }

    fn l4(&self) -> usize {
        self.l3() + if self.v6 { 40 + 8 * self.ip_ext } else { 20 + 4 * self.ip_ext }
    }

    fn hdr(&self) -> usize {
        self.l4() + if self.udp { 8 } else { 20 + 4 * self.tcp_opts }
    }

    fn proto(&self) -> u8 {
        if self.udp {
            17
        } else {
            6
        }
    }

    fn gso_type(&self) -> u8 {
        match (self.udp, self.v6) {
            (true, _) => net_hdr::GSO_UDP_L4,
            (false, false) => net_hdr::GSO_TCPV4,
            (false, true) => net_hdr::GSO_TCPV6,
        }
    }

    fn payload_bytes(&self) -> Vec<u8> {
        let mut x = self.seed | 1;
        (0..self.payload)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    /// The super-frame, with consistent lengths and the pseudo-header seed in the
    /// transport checksum (as a guest sends it), and its virtio-net header.
    fn build(&self) -> (Vec<u8>, NetHdr) {
        let (l3, l4, hdr) = (self.l3(), self.l4(), self.hdr());
        let len = hdr + self.payload;
        let mut f = vec![0u8; len];
        f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
        let mut at = 12;
        if self.vlan {
            f[12..16].copy_from_slice(&[0x81, 0x00, 0x00, 0x05]);
            at = 16;
        }
        f[at..at + 2].copy_from_slice(&if self.v6 { [0x86, 0xdd] } else { [0x08, 0x00] });
        if self.v6 {
            f[l3] = 0x60;
            f[l3 + 4..l3 + 6].copy_from_slice(&((len - l3 - 40) as u16).to_be_bytes());
            f[l3 + 6] = if self.ip_ext > 0 { 0 } else { self.proto() };
            f[l3 + 7] = 64;
            f[l3 + 8..l3 + 24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            f[l3 + 24..l3 + 40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
            for e in 0..self.ip_ext {
                let x = l3 + 40 + 8 * e;
                f[x] = if e + 1 < self.ip_ext { 60 } else { self.proto() };
                f[x + 1] = 0;
                f[x + 2..x + 8].copy_from_slice(&[1, 4, 0, 0, 0, 0]); // PadN
            }
        } else {
            f[l3] = 0x40 | (5 + self.ip_ext as u8);
            f[l3 + 2..l3 + 4].copy_from_slice(&((len - l3) as u16).to_be_bytes());
            f[l3 + 4..l3 + 6].copy_from_slice(&self.id.to_be_bytes());
            f[l3 + 6] = 0x40;
            f[l3 + 8] = 64;
            f[l3 + 9] = self.proto();
            f[l3 + 12..l3 + 16].copy_from_slice(&[10, 0, 0, 1]);
            f[l3 + 16..l3 + 20].copy_from_slice(&[10, 0, 0, 2]);
            for b in &mut f[l3 + 20..l4] {
                *b = 1; // NOP options
            }
            let c = reference_csum(&[&f[l3..l4]]);
            f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        }
        f[l4..l4 + 2].copy_from_slice(&1234u16.to_be_bytes());
        f[l4 + 2..l4 + 4].copy_from_slice(&80u16.to_be_bytes());
        let csum_at = if self.udp {
            f[l4 + 4..l4 + 6].copy_from_slice(&((len - l4) as u16).to_be_bytes());
            l4 + 6
        } else {
            f[l4 + 4..l4 + 8].copy_from_slice(&self.seq.to_be_bytes());
            f[l4 + 8..l4 + 12].copy_from_slice(&0x0102_0304u32.to_be_bytes());
            f[l4 + 12] = ((5 + self.tcp_opts) as u8) << 4;
            f[l4 + 13] = self.flags;
            f[l4 + 14..l4 + 16].copy_from_slice(&0xfff0u16.to_be_bytes());
            f[l4 + 18..l4 + 20].copy_from_slice(&7u16.to_be_bytes()); // urgent pointer
            for b in &mut f[l4 + 20..hdr] {
                *b = 1;
            }
            l4 + 16
        };
        // The seed: the pseudo-header sum, not complemented.
        let seed = !reference_csum(&[&pseudo_header(&f, l3, self.v6, self.proto(), len - l4)]);
        f[csum_at..csum_at + 2].copy_from_slice(&seed.to_be_bytes());
        f[hdr..].copy_from_slice(&self.payload_bytes());
        let needs_csum = self.udp || self.needs_csum;
        let h = NetHdr {
            flags: if needs_csum { net_hdr::F_NEEDS_CSUM } else { 0 },
            gso_type: self.gso_type(),
            hdr_len: hdr as u16,
            gso_size: self.mss,
            csum_start: if needs_csum { l4 as u16 } else { 0 },
            csum_offset: if needs_csum { (csum_at - l4) as u16 } else { 0 },
            num_buffers: 0,
        };
        (f, h)
    }
}

fn collect(frame: &[u8], h: &NetHdr) -> Result<Vec<Vec<u8>>> {
    let mut segs = Vec::new();
    let n = segment(frame, h, |s| segs.push(s.to_vec()))?;
    assert_eq!(n, segs.len());
    Ok(segs)
}

/// Checks every rule on the segments of `spec`'s super-frame `frame` with the test's
/// own knowledge of the layout and the reference checksum; returns a description of the
/// first broken rule.
fn check_segments(spec: &Spec, frame: &[u8], segs: &[Vec<u8>]) -> core::result::Result<(), String> {
    let (l3, l4, hdr) = (spec.l3(), spec.l4(), spec.hdr());
    let mss = spec.mss as usize;
    let payload = &frame[hdr..];
    let n = if payload.len() <= mss { 1 } else { payload.len().div_ceil(mss) };
    if segs.len() != n {
        return Err(format!("{} segments, expected {n}", segs.len()));
    }
    let mut joined = Vec::new();
    for (k, s) in segs.iter().enumerate() {
        let last = k + 1 == n;
        let want = if last { payload.len() - k * mss } else { mss };
        if s.len() != hdr + want {
            return Err(format!("segment {k}: {} bytes, expected {}", s.len(), hdr + want));
        }
        joined.extend_from_slice(&s[hdr..]);
        // Every header byte is the super-frame's except the fields the rules rewrite.
        let mut rewritten = vec![false; hdr];
        let mut mark = |r: Range<usize>| r.for_each(|i| rewritten[i] = true);
        if spec.v6 {
            mark(l3 + 4..l3 + 6);
        } else {
            mark(l3 + 2..l3 + 6);
            mark(l3 + 10..l3 + 12);
        }
        if spec.udp {
            mark(l4 + 4..l4 + 8);
        } else {
            mark(l4 + 4..l4 + 8);
            mark(l4 + 13..l4 + 14);
            mark(l4 + 16..l4 + 18);
        }
        if let Some(i) = (0..hdr).find(|&i| !rewritten[i] && s[i] != frame[i]) {
            return Err(format!("segment {k}: header byte {i} changed"));
        }
        // IP.
        if spec.v6 {
            if rd16(s, l3 + 4) as usize != s.len() - l3 - 40 {
                return Err(format!("segment {k}: IPv6 payload length"));
            }
        } else {
            if rd16(s, l3 + 2) as usize != s.len() - l3 {
                return Err(format!("segment {k}: IPv4 total length"));
            }
            if rd16(s, l3 + 4) != spec.id.wrapping_add(k as u16) {
                return Err(format!("segment {k}: IPv4 id {:#x}", rd16(s, l3 + 4)));
            }
            if reference_csum(&[&s[l3..l4]]) != 0 {
                return Err(format!("segment {k}: IPv4 header checksum"));
            }
        }
        // Transport.
        let ph = pseudo_header(s, l3, spec.v6, spec.proto(), s.len() - l4);
        if reference_csum(&[&ph, &s[l4..]]) != 0 {
            return Err(format!("segment {k}: transport checksum"));
        }
        if spec.udp {
            if rd16(s, l4 + 4) as usize != s.len() - l4 {
                return Err(format!("segment {k}: UDP length"));
            }
            if rd16(s, l4 + 6) == 0 {
                return Err(format!("segment {k}: UDP checksum 0"));
            }
        } else {
            let seq = spec.seq.wrapping_add((k * mss) as u32);
            if rd32(s, l4 + 4) != seq {
                return Err(format!("segment {k}: TCP seq {:#x}, expected {seq:#x}", rd32(s, l4 + 4)));
            }
            let mut flags = spec.flags;
            if !last {
                flags &= !(FIN | PSH);
            }
            if k != 0 {
                flags &= !CWR;
            }
            if s[l4 + 13] != flags {
                return Err(format!("segment {k}: TCP flags {:#x}, expected {flags:#x}", s[l4 + 13]));
            }
        }
        etherparse_check(spec, s).map_err(|e| format!("segment {k}: etherparse: {e}"))?;
    }
    if joined != payload {
        return Err("the payloads do not concatenate to the super-frame's".into());
    }
    Ok(())
}

// ---- etherparse, the independent parser and checksums. ----

/// Parses a segment with `etherparse` and checks with its code: the lengths it reads,
/// the IPv4 header checksum and the TCP/UDP checksum.
fn etherparse_check(spec: &Spec, s: &[u8]) -> core::result::Result<(), String> {
    let p = etherparse::PacketHeaders::from_ethernet_slice(s).map_err(|e| format!("{e:?}"))?;
    let payload = p.payload.slice();
    if payload.len() != s.len() - spec.hdr() {
        return Err(format!("payload of {} bytes", payload.len()));
    }
    etherparse_checksums(&p, s)
}

/// The IPv4 header checksum and the TCP/UDP checksum of a parsed packet, by etherparse;
/// the IP length must end where the packet does.
fn etherparse_checksums(p: &etherparse::PacketHeaders<'_>, s: &[u8]) -> core::result::Result<(), String> {
    use etherparse::{NetHeaders, TransportHeader};
    let payload = p.payload.slice();
    if payload.as_ptr() as usize + payload.len() != s.as_ptr() as usize + s.len() {
        return Err("the IP length does not end where the segment does".into());
    }
    let (got, want) = match (&p.net, &p.transport) {
        (Some(NetHeaders::Ipv4(ip, _)), Some(TransportHeader::Tcp(t))) => {
            if ip.header_checksum != ip.calc_header_checksum() {
                return Err("IPv4 header checksum".into());
            }
            (t.checksum, t.calc_checksum_ipv4(ip, payload).map_err(|e| format!("{e:?}"))?)
        }
        (Some(NetHeaders::Ipv6(ip, _)), Some(TransportHeader::Tcp(t))) => {
            (t.checksum, t.calc_checksum_ipv6(ip, payload).map_err(|e| format!("{e:?}"))?)
        }
        (Some(NetHeaders::Ipv4(ip, _)), Some(TransportHeader::Udp(u))) => {
            if ip.header_checksum != ip.calc_header_checksum() {
                return Err("IPv4 header checksum".into());
            }
            (u.checksum, u.calc_checksum_ipv4(ip, payload).map_err(|e| format!("{e:?}"))?)
        }
        (Some(NetHeaders::Ipv6(ip, _)), Some(TransportHeader::Udp(u))) => {
            (u.checksum, u.calc_checksum_ipv6(ip, payload).map_err(|e| format!("{e:?}"))?)
        }
        (net, tr) => return Err(format!("parsed as {net:?} / {tr:?}")),
    };
    // etherparse writes a computed TCP checksum of 0 as 0 and a UDP one as 0xffff, the
    // same convention as this module.
    if got != want {
        return Err(format!("checksum {got:#06x}, etherparse computes {want:#06x}"));
    }
    Ok(())
}

// ---- Unit tests, one rule each. ----

#[test]
fn net_hdr_is_little_endian_and_round_trips() {
    let b = [1, 4, 0x36, 0, 0xdc, 0x05, 0x22, 0, 0x10, 0, 1, 0];
    let h = NetHdr::parse(&b).unwrap();
    assert_eq!(
        h,
        NetHdr {
            flags: net_hdr::F_NEEDS_CSUM,
            gso_type: net_hdr::GSO_TCPV6,
            hdr_len: 0x36,
            gso_size: 1500,
            csum_start: 0x22,
            csum_offset: 0x10,
            num_buffers: 1,
        }
    );
    assert_eq!(h.to_bytes(), b);
    assert!(h.needs_csum());
    let mut out = [0u8; 13];
    h.write(&mut out).unwrap();
    assert_eq!(out[..12], b);
    assert_eq!(h.write(&mut out[..11]), Err(OffloadError::BufferTooSmall { need: 12, have: 11 }));
    assert_eq!(NetHdr::parse(&b[..11]), Err(OffloadError::HeaderTruncated(Layer::NetHdr)));
    assert_eq!(NetHdr::parse(&[0xab; 40]).unwrap().to_bytes(), [0xab; 12], "only 12 bytes are read");
}

#[test]
fn gso_types_are_classified_as_linux_accepts_them() {
    use net_hdr::*;
    assert_eq!(GsoKind::from_gso_type(GSO_NONE), Ok(None));
    assert_eq!(GsoKind::from_gso_type(GSO_TCPV4), Ok(Some(GsoKind::TcpV4)));
    assert_eq!(GsoKind::from_gso_type(GSO_TCPV4 | GSO_ECN), Ok(Some(GsoKind::TcpV4)));
    assert_eq!(GsoKind::from_gso_type(GSO_TCPV6 | GSO_ECN), Ok(Some(GsoKind::TcpV6)));
    assert_eq!(GsoKind::from_gso_type(GSO_UDP_L4), Ok(Some(GsoKind::UdpL4)));
    for t in [GSO_UDP, GSO_UDP_L4 | GSO_ECN, GSO_NONE | GSO_ECN, 2, 6, 0x7f, 0xff] {
        assert_eq!(GsoKind::from_gso_type(t), Err(OffloadError::UnsupportedGsoType(t)), "{t:#x}");
    }
}

#[test]
fn complete_csum_gives_the_full_udp_checksum() {
    let full = crate::frame::udp4_frame(300, [2; 6], [4; 6], [10, 0, 0, 1], [10, 0, 0, 2], 7, 9, |i| i as u8);
    let l4 = 34;
    let mut f = full.clone();
    let seed = !reference_csum(&[&pseudo_header(&f, 14, false, 17, f.len() - l4)]);
    f[l4 + 6..l4 + 8].copy_from_slice(&seed.to_be_bytes());
    complete_csum(&mut f, l4, 6).unwrap();
    assert_eq!(f, full);
}

#[test]
fn complete_csum_gives_the_full_tcp_checksum_for_v4_and_v6() {
    for v6 in [false, true] {
        let spec = Spec { v6, tcp_opts: 3, ip_ext: 1, ..Spec::tcp4(333, 1000) };
        let (mut f, h) = spec.build();
        complete_csum(&mut f, h.csum_start as usize, h.csum_offset as usize).unwrap();
        let l4 = spec.l4();
        let ph = pseudo_header(&f, spec.l3(), v6, 6, f.len() - l4);
        assert_eq!(reference_csum(&[&ph, &f[l4..]]), 0, "v6 {v6}");
    }
}

#[test]
fn complete_csum_writes_zero_as_ffff() {
    // Seed 0 and data whose sum is 0xffff: the checksum would be 0.
    let mut f = [0, 0, 0xff, 0xff];
    complete_csum(&mut f, 0, 0).unwrap();
    assert_eq!(f, [0xff, 0xff, 0xff, 0xff]);
    assert_eq!(reference_csum(&[&f]), 0, "and it still verifies");
    // A sum of 0 (all zero) gives 0xffff without any mapping.
    let mut z = [0u8; 6];
    complete_csum(&mut z, 2, 2).unwrap();
    assert_eq!(z, [0, 0, 0, 0, 0xff, 0xff]);
    // Odd lengths pad the last byte with zero; an odd start is only where the sum
    // starts.
    let mut o = [0x12, 0, 0, 0x34, 0x56, 0x78];
    complete_csum(&mut o, 1, 0).unwrap();
    assert_eq!(reference_csum(&[&o[1..]]), 0);
    let mut o = [0x12, 0x34, 0, 0, 0x56];
    complete_csum(&mut o, 0, 2).unwrap();
    assert_eq!(reference_csum(&[&o]), 0);
}

#[test]
fn complete_csum_refuses_an_odd_offset() {
    let orig = [0x12, 0, 0, 0x34, 0x56];
    let mut o = orig;
    assert_eq!(complete_csum(&mut o, 0, 1), Err(OffloadError::CsumOffsetOdd { offset: 1 }));
    assert_eq!(o, orig);
}

#[test]
fn complete_csum_refuses_fields_outside_the_frame_and_leaves_it_alone() {
    let orig = [7u8; 20];
    for (start, offset) in
        [(20, 0), (0, 19), (18, 1), (19, 0), (usize::MAX, 0), (1, usize::MAX), (usize::MAX - 1, 0)]
    {
        let mut f = orig;
        assert_eq!(
            complete_csum(&mut f, start, offset),
            Err(OffloadError::CsumOutOfFrame { start, offset, len: 20 })
        );
        assert_eq!(f, orig);
    }
    let mut f = orig;
    complete_csum(&mut f, 18, 0).unwrap();
    assert_eq!(f[..18], orig[..18]);
    let mut e: [u8; 0] = [];
    assert!(complete_csum(&mut e, 0, 0).is_err());
}

#[test]
fn tcpv4_segments_follow_linux_rules_across_id_and_seq_wrap() {
    let spec = Spec {
        id: 0xfffe,
        seq: 0xffff_fc00,
        flags: FIN | PSH | CWR | ECE | ACK | URG,
        ..Spec::tcp4(2500, 1000)
    };
    let (f, h) = spec.build();
    let segs = collect(&f, &h).unwrap();
    check_segments(&spec, &f, &segs).unwrap();
    let l4 = spec.l4();
    let lens: Vec<usize> = segs.iter().map(|s| s.len() - spec.hdr()).collect();
    assert_eq!(lens, [1000, 1000, 500]);
    let ids: Vec<u16> = segs.iter().map(|s| rd16(s, 18)).collect();
    assert_eq!(ids, [0xfffe, 0xffff, 0]);
    let seqs: Vec<u32> = segs.iter().map(|s| rd32(s, l4 + 4)).collect();
    assert_eq!(seqs, [0xffff_fc00, 0xffff_ffe8, 0x3d0]);
    let flags: Vec<u8> = segs.iter().map(|s| s[l4 + 13]).collect();
    assert_eq!(flags, [CWR | ECE | ACK | URG, ECE | ACK | URG, FIN | PSH | ECE | ACK | URG]);
    assert!(segs.iter().all(|s| rd16(s, l4 + 18) == 7), "urgent pointer copied, as Linux");
}

#[test]
fn options_and_extension_headers_are_copied_into_every_segment() {
    for (v6, udp) in [(false, false), (true, false), (false, true), (true, true)] {
        let spec = Spec { v6, udp, ip_ext: 2, tcp_opts: 10, vlan: true, ..Spec::tcp4(5000, 1400) };
        let (f, h) = spec.build();
        let g = Gso::new(&f, &h).unwrap();
        assert_eq!(g.header_len(), spec.hdr(), "v6 {v6} udp {udp}");
        assert_eq!(g.l4_offset(), spec.l4());
        assert_eq!(g.segments(), 4);
        let segs = collect(&f, &h).unwrap();
        check_segments(&spec, &f, &segs).unwrap();
    }
}

#[test]
fn a_payload_that_fits_gso_size_is_one_segment() {
    for payload in [0, 1, 999, 1000] {
        for udp in [false, true] {
            let spec = Spec { udp, flags: FIN | PSH | CWR | ACK, ..Spec::tcp4(payload, 1000) };
            let (f, h) = spec.build();
            let segs = collect(&f, &h).unwrap();
            assert_eq!(segs.len(), 1);
            check_segments(&spec, &f, &segs).unwrap();
            assert_eq!(segs[0].len(), f.len());
        }
    }
}

#[test]
fn mss_one_makes_one_segment_per_byte() {
    let spec = Spec { flags: PSH | ACK, ..Spec::tcp4(300, 1) };
    let (f, h) = spec.build();
    let segs = collect(&f, &h).unwrap();
    assert_eq!(segs.len(), 300);
    check_segments(&spec, &f, &segs).unwrap();
}

/// Finds a payload whose last two bytes make the segment's transport checksum 0.
fn zero_checksum_frame(udp: bool) -> (Spec, Vec<u8>, NetHdr) {
    let spec = Spec { udp, ..Spec::tcp4(64, 1000) };
    let (mut f, h) = spec.build();
    let l4 = spec.l4();
    let n = f.len();
    f[n - 2..].copy_from_slice(&[0, 0]);
    // The segment's checksum field is written by the segmenter; with the field 0 the
    // rest must sum to 0xffff for the checksum to be 0.
    let mut t = f.clone();
    let csum_at = l4 + if udp { UDP_CSUM_OFFSET } else { TCP_CSUM_OFFSET };
    t[csum_at..csum_at + 2].copy_from_slice(&[0, 0]);
    let ph = pseudo_header(&t, spec.l3(), false, spec.proto(), n - l4);
    let s = !reference_csum(&[&ph, &t[l4..]]); // the folded sum
    let fill = 0xffff - s; // s + fill = 0xffff
    f[n - 2..].copy_from_slice(&fill.to_be_bytes());
    (spec, f, h)
}

#[test]
fn a_zero_udp_checksum_is_sent_as_ffff_and_a_zero_tcp_one_as_zero() {
    let (spec, f, h) = zero_checksum_frame(true);
    let segs = collect(&f, &h).unwrap();
    assert_eq!(rd16(&segs[0], spec.l4() + 6), 0xffff, "UDP: CSUM_MANGLED_0");
    check_segments(&spec, &f, &segs).unwrap();
    let (spec, f, h) = zero_checksum_frame(false);
    let segs = collect(&f, &h).unwrap();
    assert_eq!(rd16(&segs[0], spec.l4() + 16), 0, "TCP: 0, as tcp_gso_segment");
    check_segments(&spec, &f, &segs).unwrap();
}

#[test]
fn hdr_len_is_only_a_hint_but_must_lie_inside_the_frame() {
    let spec = Spec::tcp4(3000, 1000);
    let (f, mut h) = spec.build();
    for hint in [0, 1, 20, spec.hdr() as u16 + 100, f.len() as u16] {
        h.hdr_len = hint;
        let segs = collect(&f, &h).unwrap();
        check_segments(&spec, &f, &segs).unwrap();
    }
    h.hdr_len = f.len() as u16 + 1;
    assert_eq!(
        Gso::new(&f, &h).unwrap_err(),
        OffloadError::HdrLenPastFrame { hdr_len: f.len() + 1, len: f.len() }
    );
}

#[test]
fn the_super_frames_own_lengths_and_seed_are_not_trusted() {
    let spec = Spec::tcp4(3000, 1000);
    let (mut f, h) = spec.build();
    let (l3, l4) = (spec.l3(), spec.l4());
    f[l3 + 2..l3 + 4].copy_from_slice(&[0, 0]); // total length 0 (as BIG TCP)
    f[l3 + 10..l3 + 12].copy_from_slice(&[0xde, 0xad]); // header checksum wrong
    f[l4 + 16..l4 + 18].copy_from_slice(&[0xbe, 0xef]); // seed wrong
    let segs = collect(&f, &h).unwrap();
    // check_segments compares the unchanged header bytes with `f`: lengths and
    // checksums are rewritten fields, so the damage above must not show.
    check_segments(&spec, &f, &segs).unwrap();
    // TCP without NEEDS_CSUM is accepted, as Linux does.
    let spec = Spec { needs_csum: false, ..spec };
    let (f, h) = spec.build();
    check_segments(&spec, &f, &collect(&f, &h).unwrap()).unwrap();
}

#[test]
fn gather_api_matches_the_copying_one() {
    let spec = Spec { v6: true, ip_ext: 1, tcp_opts: 3, ..Spec::tcp4(4000, 1448) };
    let (f, h) = spec.build();
    let g = Gso::new(&f, &h).unwrap();
    assert_eq!(g.kind(), GsoKind::TcpV6);
    assert_eq!(g.gso_size(), 1448);
    assert_eq!(g.max_segment_len(), spec.hdr() + 1448);
    let segs = collect(&f, &h).unwrap();
    let mut hbuf = [0u8; 256];
    for (k, s) in segs.iter().enumerate() {
        let n = g.write_header(k, &mut hbuf).unwrap();
        let r = g.payload_range(k).unwrap();
        assert_eq!(g.segment_len(k).unwrap(), s.len());
        assert_eq!([&hbuf[..n], &f[r]].concat(), *s);
    }
    let n = g.segments();
    assert_eq!(g.payload_range(n), Err(OffloadError::NoSuchSegment { index: n, segments: n }));
    assert_eq!(g.write_header(n, &mut hbuf), Err(OffloadError::NoSuchSegment { index: n, segments: n }));
    assert_eq!(
        g.segment_len(usize::MAX),
        Err(OffloadError::NoSuchSegment { index: usize::MAX, segments: n })
    );
    let need = spec.hdr();
    assert_eq!(
        g.write_header(0, &mut hbuf[..need - 1]),
        Err(OffloadError::BufferTooSmall { need, have: need - 1 })
    );
    let mut small = vec![0u8; spec.hdr() + 1447];
    assert_eq!(
        g.write_segment(0, &mut small),
        Err(OffloadError::BufferTooSmall { need: spec.hdr() + 1448, have: spec.hdr() + 1447 })
    );
}

#[test]
fn bad_requests_are_typed_errors() {
    use OffloadError::*;
    let spec = Spec::tcp4(3000, 1000);
    let (f, h) = spec.build();
    let l4 = spec.l4();
    let e = |f: &[u8], h: &NetHdr| Gso::new(f, h).unwrap_err();

    assert_eq!(e(&f, &NetHdr { gso_type: net_hdr::GSO_NONE, ..h }), NotGso);
    assert_eq!(e(&f, &NetHdr { gso_type: net_hdr::GSO_UDP, ..h }), UnsupportedGsoType(net_hdr::GSO_UDP));
    assert_eq!(e(&f, &NetHdr { gso_size: 0, ..h }), GsoSizeZero);
    assert_eq!(
        e(&f, &NetHdr { gso_type: net_hdr::GSO_TCPV6, ..h }),
        GsoIpMismatch { gso_type: net_hdr::GSO_TCPV6 }
    );
    assert_eq!(e(&f, &NetHdr { gso_type: net_hdr::GSO_UDP_L4, ..h }), L4Mismatch { expected: 17, found: 6 });
    assert_eq!(e(&f, &NetHdr { csum_offset: 6, ..h }), CsumMismatch { start: l4, offset: 6, l4 });
    assert_eq!(e(&f, &NetHdr { csum_start: 14, ..h }), CsumMismatch { start: 14, offset: 16, l4 });

    // Cut anywhere inside the headers: the layer whose header is cut.
    let cut = |n: usize| e(&f[..n], &NetHdr { hdr_len: 0, ..h });
    assert_eq!(cut(0), HeaderTruncated(Layer::Ethernet));
    assert_eq!(cut(13), HeaderTruncated(Layer::Ethernet));
    assert_eq!(cut(14), HeaderTruncated(Layer::Ipv4));
    assert_eq!(cut(33), HeaderTruncated(Layer::Ipv4));
    assert_eq!(cut(34), HeaderTruncated(Layer::Tcp));
    assert_eq!(cut(53), HeaderTruncated(Layer::Tcp));
    assert!(Gso::new(&f[..54], &NetHdr { hdr_len: 0, ..h }).is_ok(), "headers only");

    let patched = |at: usize, v: &[u8]| {
        let mut g = f.clone();
        g[at..at + v.len()].copy_from_slice(v);
        g
    };
    assert_eq!(e(&patched(12, &[0x08, 0x06]), &h), NotIp(0x0806));
    assert_eq!(e(&patched(12, &[0x81, 0x00, 0, 1, 0x81, 0, 0, 1, 0x88, 0xa8]), &h), NotIp(0x88a8));
    assert_eq!(e(&patched(14, &[0x65]), &h), BadIpHeader, "version 6 in an IPv4 EtherType");
    assert_eq!(e(&patched(14, &[0x44]), &h), BadIpHeader, "ihl 4");
    assert_eq!(
        e(&patched(14, &[0x4f])[..40], &NetHdr { hdr_len: 0, ..h }),
        HeaderTruncated(Layer::Ipv4),
        "options cut"
    );
    assert_eq!(e(&patched(20, &[0x20, 0]), &h), IpFragment, "MF");
    assert_eq!(e(&patched(20, &[0x40, 1]), &h), IpFragment, "offset");
    assert_eq!(e(&patched(l4 + 12, &[0x40]), &h), BadTcpHeader);
    assert_eq!(e(&patched(23, &[17]), &h), L4Mismatch { expected: 6, found: 17 });
    let udp = Spec { udp: true, ..spec.clone() };
    let (uf, uh) = udp.build();
    assert_eq!(e(&uf, &NetHdr { flags: 0, ..uh }), CsumRequired);
    assert_eq!(
        e(&uf, &NetHdr { gso_size: 23, ..uh }),
        TooManySegments { segments: 131, max: UDP_MAX_SEGMENTS }
    );
    assert!(Gso::new(&uf, &NetHdr { gso_size: 24, ..uh }).is_ok(), "125 segments");
    let v6 = Spec { v6: true, ..spec.clone() };
    let (sf, sh) = v6.build();
    assert_eq!(
        e(&sf, &NetHdr { gso_type: net_hdr::GSO_TCPV4, ..sh }),
        GsoIpMismatch { gso_type: net_hdr::GSO_TCPV4 }
    );
    let frag = {
        let mut g = sf.clone();
        g[14 + 6] = 44;
        g
    };
    assert_eq!(e(&frag, &sh), IpFragment);
    let routing = {
        let mut g = sf.clone();
        g[14 + 6] = 43;
        g
    };
    assert_eq!(e(&routing, &sh), L4Mismatch { expected: 6, found: 43 });
    // A segment longer than 16 bits of IP length.
    let big = vec![0u8; 70_000];
    let mut bf = f.clone();
    bf.extend_from_slice(&big);
    assert_eq!(e(&bf, &NetHdr { gso_size: 0xffff, ..h }), LengthOverflow);
    for err in [NotGso, LengthOverflow, HeaderTruncated(Layer::Udp), TooManySegments { segments: 2, max: 1 }]
    {
        assert!(!err.to_string().is_empty());
    }
}

// ---- Properties. ----

/// Random super-frames: IPv4 or IPv6, TCP or UDP, a VLAN tag or not, IPv4 options or
/// IPv6 extension headers, TCP options, payload 1 B to 65000 B, and an MSS that makes
/// from 1 to 1024 segments (128 for USO), sometimes larger than the payload.
fn super_frames(max_payload: usize) -> impl Strategy<Value = Spec> {
    let payload = prop_oneof![1usize..=200, 1usize..=max_payload];
    let want_segments = prop_oneof![1usize..=4, 1usize..=64, 1usize..=1024];
    (
        (any::<bool>(), any::<bool>(), any::<bool>(), 0usize..=10, 0usize..=10),
        (payload, want_segments, 0usize..=3),
        (any::<u16>(), any::<u32>(), any::<u8>(), any::<bool>(), any::<u64>()),
    )
        .prop_map(
            |(
                (v6, udp, vlan, ip_ext, tcp_opts),
                (payload, want, jitter),
                (id, seq, flags, needs_csum, seed),
            )| {
                let want = if udp { (want - 1) % UDP_MAX_SEGMENTS + 1 } else { want };
                let mss = (payload.div_ceil(want) + jitter).min(0xffff) as u16;
                Spec {
                    v6,
                    udp,
                    vlan,
                    ip_ext: if v6 { ip_ext % 3 } else { ip_ext },
                    tcp_opts,
                    payload,
                    mss,
                    id,
                    seq,
                    flags,
                    needs_csum,
                    seed,
                }
            },
        )
}

/// What `etherparse` makes of a segment, if it parses it as TCP or UDP over IP: its
/// checksums must match and the IP length must end where the segment does.
fn etherparse_verdict(s: &[u8]) -> Option<core::result::Result<(), String>> {
    let p = etherparse::PacketHeaders::from_ethernet_slice(s).ok()?;
    if p.net.is_none() || p.transport.is_none() {
        return None;
    }
    if let Some(etherparse::NetHeaders::Ipv4(ip, _)) = &p.net {
        // etherparse rebuilds the IPv4 header from its fields and drops the reserved
        // flag bit (0x80 of byte 6), so its header checksum differs when a damaged frame
        // sets it: the reference checks that header instead, and etherparse is not asked.
        let l3 = s.len()
            - p.payload.slice().len()
            - p.transport.as_ref().map_or(0, |t| t.header_len())
            - ip.header_len();
        if s[l3 + 6] & 0x80 != 0 {
            return Some(if reference_csum(&[&s[l3..l3 + ip.header_len()]]) == 0 {
                Ok(())
            } else {
                Err("IPv4 header checksum (reference)".into())
            });
        }
    }
    if let Some(etherparse::TransportHeader::Tcp(t)) = &p.transport {
        // etherparse rebuilds the TCP header from its fields and drops the reserved
        // bits of byte 12, so its checksum differs when a damaged frame sets them.
        let l4 = s.len() - p.payload.slice().len() - t.header_len();
        if s[l4 + 12] & 0x0e != 0 {
            return None;
        }
    }
    Some(etherparse_checksums(&p, s))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Every rule, on random super-frames, checked by the reference and by etherparse.
    #[test]
    fn random_super_frames_segment_by_the_rules(spec in super_frames(65_000)) {
        let (f, h) = spec.build();
        let segs = collect(&f, &h).map_err(|e| TestCaseError::fail(format!("{e}")))?;
        check_segments(&spec, &f, &segs).map_err(TestCaseError::fail)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// Arbitrary bytes as frame and header: no panic; what is accepted is consistent.
    #[test]
    fn arbitrary_bytes_never_panic(
        frame in prop::collection::vec(any::<u8>(), 0..300),
        hdr in any::<[u8; 12]>(),
        start in 0usize..400,
        offset in prop_oneof![0usize..400, any::<usize>()],
    ) {
        let h = NetHdr::from_bytes(hdr);
        check_any_outcome(&frame, &h)?;
        check_complete_csum(&frame, start, offset)?;
    }

    /// Valid super-frames with random bytes changed (mostly in the headers), cut short
    /// and with a changed virtio-net header: no panic, and whatever is accepted comes
    /// out well formed.
    #[test]
    fn damaged_super_frames_never_panic_and_accepted_ones_come_out_well_formed(
        spec in super_frames(3000),
        muts in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in prop::option::of(any::<prop::sample::Index>()),
        hdr_muts in prop::collection::vec((0usize..12, any::<u8>()), 0..3),
    ) {
        let (mut f, h) = spec.build();
        for (i, v) in muts {
            // Three in four land in the headers.
            let span = if v % 4 == 0 { f.len() } else { spec.hdr() + 2 };
            let at = i.index(span.min(f.len()));
            f[at] = v;
        }
        if let Some(c) = cut {
            f.truncate(c.index(f.len() + 1));
        }
        let mut hb = h.to_bytes();
        for (i, v) in hdr_muts {
            hb[i] = v;
        }
        let h = NetHdr::from_bytes(hb);
        check_any_outcome(&f, &h)?;
        let (start, offset) = (h.csum_start as usize, h.csum_offset as usize);
        check_complete_csum(&f, start, offset)?;
    }
}

/// Whatever `segment` makes of `frame` and `h`: an error with a message, or segments
/// whose payloads concatenate to the frame's, as many as announced, of the announced
/// lengths, with checksums etherparse agrees with.
fn check_any_outcome(frame: &[u8], h: &NetHdr) -> core::result::Result<(), TestCaseError> {
    let mut segs = Vec::new();
    match segment(frame, h, |s| segs.push(s.to_vec())) {
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            prop_assert!(Gso::new(frame, h).is_err());
        }
        Ok(n) => {
            let g = Gso::new(frame, h).unwrap();
            prop_assert_eq!(n, segs.len());
            prop_assert_eq!(n, g.segments());
            let hl = g.header_len();
            let mut joined = Vec::new();
            for (k, s) in segs.iter().enumerate() {
                prop_assert_eq!(s.len(), g.segment_len(k).unwrap());
                prop_assert!(s.len() <= g.max_segment_len());
                prop_assert!(k + 1 == n || s.len() - hl == h.gso_size as usize);
                joined.extend_from_slice(&s[hl..]);
                if let Some(v) = etherparse_verdict(s) {
                    v.map_err(|e| TestCaseError::fail(format!("segment {k}: {e}")))?;
                }
            }
            prop_assert_eq!(&joined[..], &frame[hl..]);
        }
    }
    Ok(())
}

/// `complete_csum` either refuses, leaving the frame alone, or changes only the two
/// checksum bytes so that seed plus region sums to 0xffff.
fn check_complete_csum(frame: &[u8], start: usize, offset: usize) -> core::result::Result<(), TestCaseError> {
    let mut f = frame.to_vec();
    match complete_csum(&mut f, start, offset) {
        Err(e) => {
            let inside =
                start.checked_add(offset).and_then(|a| a.checked_add(2)).is_some_and(|e| e <= frame.len());
            if inside {
                prop_assert_eq!(e, OffloadError::CsumOffsetOdd { offset });
                prop_assert!(offset % 2 == 1);
            } else {
                prop_assert_eq!(e, OffloadError::CsumOutOfFrame { start, offset, len: frame.len() });
            }
            prop_assert_eq!(&f[..], frame);
        }
        Ok(()) => {
            let at = start + offset;
            prop_assert!(at + 2 <= frame.len());
            prop_assert_eq!(&f[..at], &frame[..at]);
            prop_assert_eq!(&f[at + 2..], &frame[at + 2..]);
            prop_assert!(f[at..at + 2] != [0, 0]);
            // The seed was counted in the sum and then overwritten: seed plus the
            // completed region verify.
            prop_assert!(offset % 2 == 0);
            let seed = [frame[at], frame[at + 1]];
            prop_assert_eq!(reference_csum(&[&seed, &f[start..]]), 0);
        }
    }
    Ok(())
}

#[test]
fn two_vlan_tags_are_skipped_and_a_long_ipv6_extension_chain_is_refused() {
    // 802.1ad outer tag, 802.1Q inner tag.
    let spec = Spec { vlan: true, ..Spec::tcp4(3000, 1000) };
    let (f, h) = spec.build();
    let mut q = f[..12].to_vec();
    q.extend_from_slice(&[0x88, 0xa8, 0x00, 0x07]);
    q.extend_from_slice(&f[12..]);
    let h2 = NetHdr { csum_start: h.csum_start + 4, hdr_len: h.hdr_len + 4, ..h };
    let g = Gso::new(&q, &h2).unwrap();
    assert_eq!(g.header_len(), spec.hdr() + 4);
    assert_eq!(g.segments(), 3);
    let mut segs = Vec::new();
    segment(&q, &h2, |s| segs.push(s.to_vec())).unwrap();
    for s in &segs {
        assert_eq!(s[12..18], [0x88, 0xa8, 0x00, 0x07, 0x81, 0x00]);
        etherparse_verdict(s).expect("parses").unwrap();
    }

    // Five destination-options headers: more than MAX_IPV6_EXT_HEADERS are not skipped.
    let spec = Spec { v6: true, ip_ext: 2, ..Spec::tcp4(3000, 1000) };
    let (f, h) = spec.build();
    let l3 = spec.l3();
    let mut long = f[..l3 + 40].to_vec();
    long[l3 + 6] = 60;
    for i in 0..5 {
        long.extend_from_slice(&[if i < 4 { 60 } else { 6 }, 0, 1, 4, 0, 0, 0, 0]);
    }
    long.extend_from_slice(&f[spec.l4()..]);
    let h5 = NetHdr { csum_start: h.csum_start + 24, ..h };
    assert_eq!(Gso::new(&long, &h5).unwrap_err(), OffloadError::L4Mismatch { expected: 6, found: 60 });
    // Four are.
    let mut four = f[..l3 + 40].to_vec();
    four[l3 + 6] = 60;
    for i in 0..4 {
        four.extend_from_slice(&[if i < 3 { 60 } else { 6 }, 0, 1, 4, 0, 0, 0, 0]);
    }
    four.extend_from_slice(&f[spec.l4()..]);
    let h4 = NetHdr { csum_start: h.csum_start + 16, ..h };
    assert_eq!(Gso::new(&four, &h4).unwrap().l4_offset(), l3 + 40 + 32);
}
