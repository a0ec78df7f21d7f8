//! The `csum` forwarding engine's per-packet work (DPDK testpmd's `csumonly`): parse the
//! Ethernet/IPv4|IPv6/TCP|UDP headers of a received frame and set its checksums again,
//! in software or as a transmit offload request, per the transmitting port's
//! `csum set ip|tcp|udp hw|sw` and `tso set MSS` settings.
//!
//! Owns: [`CsumCfg`], header parsing (one optional VLAN tag, IPv4 with options, IPv6
//! without extension headers), the software Internet checksums, and turning "hw" into a
//! [`TxOffload`] request with the pseudo-header sum in the checksum field (as Linux and
//! DPDK leave it for the device to complete, §5.1.6.2). Must not: touch queues or ports.
//!
//! virtio-net has no IPv4 header checksum offload: the IPv4 header checksum is always
//! computed here (`csum set ip hw` is refused at the prompt, as DPDK refuses an offload
//! the port lacks). With `tso set MSS` (not 0), a TCP frame whose payload is larger than
//! MSS gets a segmentation request (TCPv4 or TCPv6, the headers' length as `hdr_len`)
//! with its TCP checksum offloaded; its pseudo-header sum leaves out the length, as for
//! Linux's GSO (each segment has its own).
//!
//! A frame this engine cannot parse (another EtherType or protocol, headers outside the
//! first segment) is forwarded unchanged, as DPDK's `csumonly` does.

use driver::offload::{fold, sum, GsoKind};
use driver::{Packet, TxCsum, TxGso, TxOffload};

/// What `csum set` and `tso set` chose for one port (applied to the frames it transmits).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CsumCfg {
    /// TCP checksum by the device (`csum set tcp hw`), else in software.
    pub tcp_hw: bool,
    /// UDP checksum by the device (`csum set udp hw`), else in software.
    pub udp_hw: bool,
    /// TCP segmentation size (`tso set MSS`), 0: off.
    pub tso_segsz: u16,
}

const ETH_HLEN: usize = 14;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

/// The headers of a frame, as offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layers {
    /// Start of the IP header (after Ethernet and an optional VLAN tag).
    pub l3: usize,
    /// Start of the TCP/UDP header.
    pub l4: usize,
    /// End of the TCP/UDP header.
    pub l4_end: usize,
    /// IPv4 (else IPv6).
    pub v4: bool,
    /// TCP (else UDP).
    pub tcp: bool,
}

/// Parses the headers at the front of `d` (the frame is `total` bytes).
pub fn parse(d: &[u8], total: usize) -> Option<Layers> {
    let be16 = |at: usize| d.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let mut l3 = ETH_HLEN;
    let mut et = be16(12)?;
    if et == ETHERTYPE_VLAN {
        et = be16(16)?;
        l3 += 4;
    }
    let (v4, proto, l4) = match et {
        ETHERTYPE_IPV4 => {
            let ihl = (*d.get(l3)? & 0x0f) as usize * 4;
            if *d.get(l3)? >> 4 != 4 || ihl < 20 {
                return None;
            }
            let frag = be16(l3 + 6)?;
            if frag & 0x3fff != 0 {
                return None; // a fragment: no L4 header to checksum
            }
            (true, *d.get(l3 + 9)?, l3 + ihl)
        }
        ETHERTYPE_IPV6 => {
            if *d.get(l3)? >> 4 != 6 {
                return None;
            }
            (false, *d.get(l3 + 6)?, l3 + 40)
        }
        _ => return None,
    };
    let (tcp, l4_end) = match proto {
        IPPROTO_TCP => (true, l4 + ((*d.get(l4 + 12)? >> 4) as usize * 4).max(20)),
        IPPROTO_UDP => (false, l4 + 8),
        _ => return None,
    };
    if l4_end > d.len() || l4_end > total {
        return None;
    }
    Some(Layers { l3, l4, l4_end, v4, tcp })
}

/// The pseudo-header sum (RFC 768/793, RFC 8200 §8.1) for an L4 length of `l4_len`
/// (0 for a segmentation request).
fn pseudo(d: &[u8], l: &Layers, l4_len: usize) -> u64 {
    let proto = if l.tcp { IPPROTO_TCP } else { IPPROTO_UDP } as u64;
    let addrs = if l.v4 { &d[l.l3 + 12..l.l3 + 20] } else { &d[l.l3 + 8..l.l3 + 40] };
    sum(addrs, proto + l4_len as u64)
}

/// The checksum field's offset in the L4 header.
fn csum_off(l: &Layers) -> usize {
    if l.tcp {
        16
    } else {
        6
    }
}

/// Sets `p`'s checksums as `cfg` says (see the module comment); `scratch` holds a copy
/// of a multi-segment frame for the software sums (sized for the largest frame, so it
/// never grows). Returns whether the frame was parsed.
pub fn process(p: &mut Packet, cfg: &CsumCfg, scratch: &mut Vec<u8>) -> bool {
    let total = p.total_len();
    let Some(l) = parse(p.data(), total) else { return false };
    let d = p.data_mut();
    if l.v4 {
        let ihl = l.l4 - l.l3;
        d[l.l3 + 10..l.l3 + 12].copy_from_slice(&[0, 0]);
        let c = !fold(sum(&d[l.l3..l.l3 + ihl], 0));
        d[l.l3 + 10..l.l3 + 12].copy_from_slice(&c.to_be_bytes());
    }
    let l4_len = total - l.l4;
    let at = l.l4 + csum_off(&l);
    let tso = l.tcp && cfg.tso_segsz != 0 && total - l.l4_end > cfg.tso_segsz as usize;
    let hw = if l.tcp { cfg.tcp_hw } else { cfg.udp_hw };
    if hw || tso {
        // The device completes the sum from the L4 header on; the field holds the
        // pseudo-header sum (without the length for segmentation).
        let seed = fold(pseudo(d, &l, if tso { 0 } else { l4_len }));
        d[at..at + 2].copy_from_slice(&seed.to_be_bytes());
        let csum = Some(TxCsum { start: l.l4 as u16, offset: csum_off(&l) as u16 });
        let gso = tso.then_some(TxGso {
            kind: if l.v4 { GsoKind::TcpV4 } else { GsoKind::TcpV6 },
            size: cfg.tso_segsz,
            hdr_len: l.l4_end as u16,
        });
        p.set_tx_offload(TxOffload { csum, gso });
        return true;
    }
    d[at..at + 2].copy_from_slice(&[0, 0]);
    let acc = pseudo(d, &l, l4_len);
    let acc = if p.is_chained() {
        scratch.clear();
        scratch.resize(total, 0);
        if p.copy_to(scratch).is_err() {
            return false;
        }
        sum(&scratch[l.l4..], acc)
    } else {
        sum(&p.data()[l.l4..], acc)
    };
    let mut c = !fold(acc);
    if !l.tcp && c == 0 {
        c = 0xffff; // 0 means "no checksum" for UDP
    }
    p.data_mut()[at..at + 2].copy_from_slice(&c.to_be_bytes());
    p.set_tx_offload(TxOffload::default());
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use driver::dma::DmaArena;
    use driver::Mempool;
    use std::sync::Arc;

    fn pool() -> Mempool {
        Mempool::new(Arc::new(DmaArena::new(4 << 20, false).unwrap()), 64, 2304, 256).unwrap()
    }

    /// Ethernet + IPv4 or IPv6 + TCP (20 bytes) or UDP, `payload` bytes of pattern.
    fn frame(v4: bool, tcp: bool, payload: usize) -> Vec<u8> {
        let l4h = if tcp { 20 } else { 8 };
        let l3h = if v4 { 20 } else { 40 };
        let mut f = vec![0u8; ETH_HLEN + l3h + l4h + payload];
        f[12..14].copy_from_slice(&(if v4 { ETHERTYPE_IPV4 } else { ETHERTYPE_IPV6 }).to_be_bytes());
        let proto = if tcp { IPPROTO_TCP } else { IPPROTO_UDP };
        let l4len = l4h + payload;
        if v4 {
            f[14] = 0x45;
            f[16..18].copy_from_slice(&((20 + l4len) as u16).to_be_bytes());
            f[22] = 64;
            f[23] = proto;
            f[26..34].copy_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        } else {
            f[14] = 0x60;
            f[18..20].copy_from_slice(&(l4len as u16).to_be_bytes());
            f[20] = proto;
            f[21] = 64;
            for i in 0..32 {
                f[22 + i] = i as u8 * 3;
            }
        }
        let l4 = ETH_HLEN + l3h;
        if tcp {
            f[l4 + 12] = 5 << 4;
        } else {
            f[l4 + 4..l4 + 6].copy_from_slice(&(l4len as u16).to_be_bytes());
        }
        for (i, b) in f[l4 + l4h..].iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        f
    }

    /// Whether the frame's IPv4 header and L4 checksums verify (sum to all ones).
    fn verifies(f: &[u8]) -> bool {
        let l = parse(f, f.len()).unwrap();
        let ip_ok = !l.v4 || fold(sum(&f[l.l3..l.l4], 0)) == 0xffff;
        ip_ok && fold(sum(&f[l.l4..], pseudo(f, &l, f.len() - l.l4))) == 0xffff
    }

    #[test]
    fn software_checksums_verify_on_flat_and_chained_frames() {
        let p0 = pool();
        let mut scratch = Vec::with_capacity(70_000);
        for (v4, tcp) in [(true, true), (true, false), (false, true), (false, false)] {
            for (payload, seg) in [(100, 2048), (3000, 1000), (0, 2048), (7, 5)] {
                let f = frame(v4, tcp, payload);
                let mut p = p0.alloc_chain(&f, seg.max(80)).unwrap();
                assert!(process(&mut p, &CsumCfg::default(), &mut scratch));
                assert_eq!(p.tx_offload(), None);
                let mut out = vec![0u8; p.total_len()];
                p.copy_to(&mut out).unwrap();
                assert!(verifies(&out), "v4 {v4} tcp {tcp} payload {payload}");
                // Only the checksum fields changed.
                let l = parse(&f, f.len()).unwrap();
                let at = l.l4 + csum_off(&l);
                let mut a = out.clone();
                let mut b = f.clone();
                for v in [&mut a, &mut b] {
                    v[at..at + 2].fill(0);
                    if v4 {
                        v[24..26].fill(0);
                    }
                }
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn hardware_requests_complete_to_the_software_checksum() {
        let p0 = pool();
        let mut scratch = Vec::new();
        for (v4, tcp) in [(true, true), (true, false), (false, true), (false, false)] {
            let f = frame(v4, tcp, 500);
            let mut sw = p0.alloc_chain(&f, 2048).unwrap();
            process(&mut sw, &CsumCfg::default(), &mut scratch);
            let mut hw = p0.alloc_chain(&f, 2048).unwrap();
            let cfg = CsumCfg { tcp_hw: true, udp_hw: true, tso_segsz: 0 };
            process(&mut hw, &cfg, &mut scratch);
            let o = hw.tx_offload().expect("a request");
            let c = o.csum.expect("a checksum request");
            assert_eq!(o.gso, None);
            // What a device does with NEEDS_CSUM (spec::offload::complete_csum).
            let mut done = hw.data().to_vec();
            driver::offload::complete_csum(&mut done, c.start as usize, c.offset as usize).unwrap();
            assert_eq!(done, sw.data(), "v4 {v4} tcp {tcp}");
        }
    }

    #[test]
    fn tso_asks_for_segmentation_only_above_the_mss() {
        let p0 = pool();
        let mut scratch = Vec::new();
        let cfg = CsumCfg { tcp_hw: false, udp_hw: false, tso_segsz: 1000 };
        let mut big = p0.alloc_chain(&frame(true, true, 1001), 2048).unwrap();
        process(&mut big, &cfg, &mut scratch);
        let o = big.tx_offload().unwrap();
        assert_eq!(o.gso, Some(TxGso { kind: GsoKind::TcpV4, size: 1000, hdr_len: 54 }));
        assert_eq!(o.csum, Some(TxCsum { start: 34, offset: 16 }));
        let mut v6 = p0.alloc_chain(&frame(false, true, 5000), 2048).unwrap();
        process(&mut v6, &cfg, &mut scratch);
        assert_eq!(v6.tx_offload().unwrap().gso.unwrap().kind, GsoKind::TcpV6);
        // At the MSS, or UDP: no segmentation, software checksum.
        for f in [frame(true, true, 1000), frame(true, false, 5000)] {
            let mut p = p0.alloc_chain(&f, 2048).unwrap();
            process(&mut p, &cfg, &mut scratch);
            assert_eq!(p.tx_offload(), None);
        }
    }

    #[test]
    fn other_frames_are_left_alone() {
        let p0 = pool();
        let mut scratch = Vec::new();
        let mut arp = vec![0u8; 60];
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        let mut frag = frame(true, false, 100);
        frag[20] = 0x20; // more fragments
        for f in [arp, frag] {
            let mut p = p0.alloc_chain(&f, 2048).unwrap();
            assert!(!process(&mut p, &CsumCfg { tcp_hw: true, udp_hw: true, tso_segsz: 100 }, &mut scratch));
            assert_eq!(p.data(), f.as_slice());
        }
    }
}
