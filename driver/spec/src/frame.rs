//! Small helpers for the Ethernet, ARP, IPv4, UDP and ICMP headers that packet
//! generators and responders build (testpmd's engines, the backend's generator).
//!
//! Owns: header offsets and checksums (RFC 791/768/792/826). Must not: know about
//! rings, queues or pools.

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// EtherType IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// IPv4 header length without options.
pub const IPV4_HLEN: usize = 20;
/// UDP header length.
pub const UDP_HLEN: usize = 8;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// IP protocol number of ICMP.
pub const IPPROTO_ICMP: u8 = 1;

/// The Internet checksum (one's complement of the one's-complement sum) of `data`.
pub fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut chunks = data.chunks_exact(2);
    for w in &mut chunks {
        sum += u16::from_be_bytes([w[0], w[1]]) as u32;
    }
    if let [b] = chunks.remainder() {
        sum += (*b as u32) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The EtherType of an Ethernet frame.
pub fn ethertype(f: &[u8]) -> Option<u16> {
    f.get(12..14).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

/// Writes an Ethernet header.
pub fn write_eth(f: &mut [u8], dst: [u8; 6], src: [u8; 6], ethertype: u16) {
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&ethertype.to_be_bytes());
}

/// Writes an IPv4 header (no options) for a payload of `payload_len` bytes, checksum
/// included.
pub fn write_ipv4(h: &mut [u8], proto: u8, src: [u8; 4], dst: [u8; 4], payload_len: usize, id: u16) {
    h[0] = 0x45;
    h[1] = 0;
    h[2..4].copy_from_slice(&((IPV4_HLEN + payload_len) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&id.to_be_bytes());
    h[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
    h[8] = 64;
    h[9] = proto;
    h[10..12].copy_from_slice(&[0, 0]);
    h[12..16].copy_from_slice(&src);
    h[16..20].copy_from_slice(&dst);
    let c = inet_checksum(&h[..IPV4_HLEN]);
    h[10..12].copy_from_slice(&c.to_be_bytes());
}

/// The UDP checksum over the IPv4 pseudo-header and `udp` (header with a zero checksum
/// field, plus payload); 0 is sent as 0xffff (RFC 768).
pub fn udp4_checksum(src: [u8; 4], dst: [u8; 4], udp: &[u8]) -> u16 {
    let mut pseudo = Vec::with_capacity(12 + udp.len());
    pseudo.extend_from_slice(&src);
    pseudo.extend_from_slice(&dst);
    pseudo.extend_from_slice(&[0, IPPROTO_UDP]);
    pseudo.extend_from_slice(&(udp.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(udp);
    match inet_checksum(&pseudo) {
        0 => 0xffff,
        c => c,
    }
}

/// Builds a UDP/IPv4 frame of exactly `len` bytes (>= 42) with valid IPv4 and UDP
/// checksums; the payload is `payload_byte(i)` for payload byte `i`.
#[allow(clippy::too_many_arguments)]
pub fn udp4_frame(
    len: usize,
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src_ip: [u8; 4],
    dst_ip: [u8; 4],
    sport: u16,
    dport: u16,
    payload_byte: impl Fn(usize) -> u8,
) -> Vec<u8> {
    let mut f = vec![0u8; len];
    let l4 = ETH_HLEN + IPV4_HLEN;
    write_eth(&mut f, dst_mac, src_mac, ETHERTYPE_IPV4);
    let udp_len = len - l4;
    write_ipv4(&mut f[ETH_HLEN..l4], IPPROTO_UDP, src_ip, dst_ip, udp_len, 0);
    f[l4..l4 + 2].copy_from_slice(&sport.to_be_bytes());
    f[l4 + 2..l4 + 4].copy_from_slice(&dport.to_be_bytes());
    f[l4 + 4..l4 + 6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    for (i, b) in f[l4 + UDP_HLEN..].iter_mut().enumerate() {
        *b = payload_byte(i);
    }
    let c = udp4_checksum(src_ip, dst_ip, &f[l4..]);
    f[l4 + 6..l4 + 8].copy_from_slice(&c.to_be_bytes());
    f
}

/// Checks that `f` is a UDP/IPv4 frame whose lengths and checksums are all valid.
pub fn valid_udp4(f: &[u8]) -> bool {
    let l4 = ETH_HLEN + IPV4_HLEN;
    if f.len() < l4 + UDP_HLEN || ethertype(f) != Some(ETHERTYPE_IPV4) || f[ETH_HLEN] != 0x45 {
        return false;
    }
    let ip = &f[ETH_HLEN..l4];
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if ip[9] != IPPROTO_UDP || inet_checksum(ip) != 0 || ETH_HLEN + total > f.len() {
        return false;
    }
    let udp = &f[l4..ETH_HLEN + total];
    let ulen = u16::from_be_bytes([udp[4], udp[5]]) as usize;
    if ulen != udp.len() {
        return false;
    }
    let csum = u16::from_be_bytes([udp[6], udp[7]]);
    if csum == 0 {
        return true; // no checksum (allowed for IPv4)
    }
    let mut copy = udp.to_vec();
    copy[6] = 0;
    copy[7] = 0;
    let src = [ip[12], ip[13], ip[14], ip[15]];
    let dst = [ip[16], ip[17], ip[18], ip[19]];
    udp4_checksum(src, dst, &copy) == csum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_frames_validate_and_corruption_is_caught() {
        let mut f = udp4_frame(64, [2; 6], [4; 6], [10, 0, 0, 1], [10, 0, 0, 2], 9, 9, |i| i as u8);
        assert_eq!(f.len(), 64);
        assert!(valid_udp4(&f));
        f[50] ^= 1;
        assert!(!valid_udp4(&f), "payload corruption breaks the UDP checksum");
        let g = udp4_frame(1514, [2; 6], [4; 6], [1, 2, 3, 4], [5, 6, 7, 8], 1000, 2000, |_| 0xab);
        assert!(valid_udp4(&g));
    }

    #[test]
    fn checksum_of_rfc1071_example() {
        // RFC 1071 §3 example words 0001 f203 f4f5 f6f7 sum to ddf2; checksum is its complement.
        assert_eq!(inet_checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]), !0xddf2);
    }
}
