//! TCP/IPv4 super-frames for the `gen` port (`--gso-size`), delivered as the guest's
//! offload state allows (virtio 1.2 §5.1.6.4):
//!
//! * guest TSO4 (with guest checksum) on: one frame per super-frame, `gso_type` TCPV4,
//!   `gso_size` = MSS, `NEEDS_CSUM` with the TCP checksum set to the pseudo-header sum;
//! * guest checksum on, TSO off: MSS-sized segments, each `NEEDS_CSUM` (partial checksum);
//! * both off: MSS-sized segments with complete checksums and `flags` 0.
//!
//! Owns: the super-frame template (Ethernet, IPv4, TCP, payload with [`GEN_MAGIC`] and a
//! sequence number), cutting it into segments, and the IPv4/TCP checksums.
//! Must not: touch rings other than writing one frame into a chain it is given.

use virtio_bindings::virtio_net as vn;

use crate::port::GEN_MAGIC;
use crate::split_ring::{scatter, Chain};
use spec::layout::{NET_HDR_LEN, NET_HDR_NUM_BUFFERS};

/// Ethernet + IPv4 + TCP header bytes before the payload (no options).
pub const HDRS: usize = 14 + 20 + 20;
/// Offset of the IPv4 header in a frame.
const IP: usize = 14;
/// Offset of the TCP header in a frame.
const TCP: usize = 34;
/// Offset of the TCP checksum field from the start of the TCP header.
const TCP_CSUM: usize = 16;
/// Payload bytes at the start of each super-frame: magic and sequence number.
pub const PAYLOAD_TAG: usize = 12;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;

/// One's-complement sum of `data` as big-endian 16-bit words (an odd last byte is padded
/// with zero), added to `acc`, not yet folded.
pub fn sum16(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(2);
    for w in &mut words {
        acc += u16::from_be_bytes([w[0], w[1]]) as u64;
    }
    if let [b] = words.remainder() {
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

/// The TCP/IPv4 pseudo-header sum for a TCP segment of `tcp_len` bytes (header included).
fn pseudo(ip_hdr: &[u8], tcp_len: usize) -> u64 {
    let acc = sum16(&ip_hdr[12..20], 0); // source and destination addresses
    acc + 6 + tcp_len as u64
}

/// The generator's TCP stream: one super-frame after another, each delivered whole or
/// in segments.
pub struct TcpGen {
    /// Ethernet, IPv4 and TCP headers; length, id, sequence, flags and checksums are
    /// patched per delivered frame.
    hdr: [u8; HDRS],
    /// One super-frame's payload; its first bytes are [`GEN_MAGIC`] and the super-frame's
    /// sequence number (little-endian u64).
    payload: Vec<u8>,
    mss: usize,
    /// TCP sequence number of the current super-frame's first payload byte.
    tcp_seq: u32,
    ip_id: u16,
    /// Payload offset of the next segment of the super-frame being delivered.
    next: Option<usize>,
}

impl TcpGen {
    /// A stream of `frame_len`-byte super-frames (headers included, `HDRS + 12 ..=
    /// 65535 + 14`) from 10.0.0.1:9 to 10.0.0.2:9 at `dst_mac`, cut at `mss` payload bytes.
    pub fn new(dst_mac: [u8; 6], frame_len: usize, mss: u16) -> TcpGen {
        let mut hdr = [0u8; HDRS];
        hdr[0..6].copy_from_slice(&dst_mac);
        hdr[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        hdr[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut hdr[IP..TCP];
        ip[0] = 0x45;
        ip[6] = 0x40; // don't fragment
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
        ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
        let tcp = &mut hdr[TCP..];
        tcp[0..2].copy_from_slice(&9u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&9u16.to_be_bytes());
        tcp[12] = 5 << 4; // data offset: 20 bytes
        tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes()); // window
        let mut payload = vec![0u8; frame_len.saturating_sub(HDRS).max(PAYLOAD_TAG)];
        payload[..4].copy_from_slice(&GEN_MAGIC);
        for (i, b) in payload[PAYLOAD_TAG..].iter_mut().enumerate() {
            *b = i as u8;
        }
        TcpGen { hdr, payload, mss: mss.max(1) as usize, tcp_seq: 0, ip_id: 0, next: None }
    }

    /// Addresses the frames to `mac` (the guest's current address).
    pub fn set_dst_mac(&mut self, mac: [u8; 6]) {
        self.hdr[0..6].copy_from_slice(&mac);
    }

    /// The first 16 bytes of every frame (what the receive filter looks at).
    pub fn eth_header(&self) -> &[u8] {
        &self.hdr[..16]
    }

    /// A super-frame is partly delivered (its remaining segments come next).
    pub fn in_progress(&self) -> bool {
        self.next.is_some()
    }

    /// Starts super-frame number `seq`.
    pub fn start(&mut self, seq: u64) {
        self.payload[4..PAYLOAD_TAG].copy_from_slice(&seq.to_le_bytes());
        self.next = Some(0);
    }

    /// Gives up the super-frame in progress (the rest of it is dropped).
    pub fn abort(&mut self) {
        if self.next.take().is_some() {
            self.tcp_seq = self.tcp_seq.wrapping_add(self.payload.len() as u32);
        }
    }

    /// Payload bytes of the next frame, and whether it goes out as one GSO frame.
    fn next_cut(&self, tso: bool) -> (usize, usize, bool) {
        let off = self.next.unwrap_or(0);
        let total = self.payload.len();
        if tso && off == 0 {
            (off, total, total > self.mss)
        } else {
            (off, (total - off).min(self.mss), false)
        }
    }

    /// Bytes (virtio-net header included) the next frame needs in a receive buffer.
    pub fn next_len(&self, tso: bool) -> usize {
        NET_HDR_LEN + HDRS + self.next_cut(tso).1
    }

    /// Writes the next frame of the current super-frame (see [`start`](Self::start))
    /// into `chain`, which must hold [`next_len`](Self::next_len) bytes. `tso`: guest TSO4
    /// may be used; `csum`: partial checksums may be delivered. Returns the bytes written.
    pub fn emit(&mut self, chain: &Chain<'_>, tso: bool, csum: bool) -> usize {
        let (out, off, len) = self.next_frame(tso, csum);
        scatter(chain, 0, &out);
        scatter(chain, out.len(), &self.payload[off..off + len]);
        self.advance(off, len);
        NET_HDR_LEN + HDRS + len
    }

    /// The next frame without writing it anywhere: its virtio-net header and protocol
    /// headers, and where its payload lies in [`payload`](Self::payload); then
    /// [`advance`](Self::advance) once it is delivered (for frames spread over mergeable
    /// buffers by the caller).
    pub fn next_frame(&mut self, tso: bool, csum: bool) -> ([u8; NET_HDR_LEN + HDRS], usize, usize) {
        let (off, len, gso) = self.next_cut(tso);
        let total = self.payload.len();
        let last = off + len == total;
        let mut out = [0u8; NET_HDR_LEN + HDRS];
        out[NET_HDR_LEN..].copy_from_slice(&self.hdr);
        let f = &mut out[NET_HDR_LEN..];
        let tcp_len = 20 + len;
        // IPv4: total length, id, header checksum.
        f[IP + 2..IP + 4].copy_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
        f[IP + 4..IP + 6].copy_from_slice(&self.ip_id.to_be_bytes());
        self.ip_id = self.ip_id.wrapping_add(1);
        let ipsum = !fold(sum16(&f[IP..TCP], 0));
        f[IP + 10..IP + 12].copy_from_slice(&ipsum.to_be_bytes());
        // TCP: sequence number, flags, checksum (partial: the pseudo-header sum).
        f[TCP + 4..TCP + 8].copy_from_slice(&self.tcp_seq.wrapping_add(off as u32).to_be_bytes());
        f[TCP + 13] = TCP_ACK | if last { TCP_PSH } else { 0 };
        let ph = pseudo(&f[IP..TCP], tcp_len);
        let data = &self.payload[off..off + len];
        let partial = csum || gso;
        let check = if partial { fold(ph) } else { !fold(sum16(data, sum16(&f[TCP..], ph))) };
        f[TCP + TCP_CSUM..TCP + TCP_CSUM + 2].copy_from_slice(&check.to_be_bytes());
        // virtio_net_hdr_v1 (§5.1.6): flags, gso_type, hdr_len, gso_size, csum_start,
        // csum_offset, num_buffers.
        let h = &mut out[..NET_HDR_LEN];
        if partial {
            h[0] = vn::VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
            h[6..8].copy_from_slice(&(TCP as u16).to_le_bytes());
            h[8..10].copy_from_slice(&(TCP_CSUM as u16).to_le_bytes());
        }
        if gso {
            h[1] = vn::VIRTIO_NET_HDR_GSO_TCPV4 as u8;
            h[2..4].copy_from_slice(&(HDRS as u16).to_le_bytes());
            h[4..6].copy_from_slice(&(self.mss as u16).to_le_bytes());
        }
        h[NET_HDR_NUM_BUFFERS..NET_HDR_NUM_BUFFERS + 2].copy_from_slice(&1u16.to_le_bytes());
        (out, off, len)
    }

    /// The super-frame's payload (what [`next_frame`](Self::next_frame)'s range is in).
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The frame [`next_frame`](Self::next_frame) described (payload `off .. off + len`)
    /// was delivered: the next one follows it.
    pub fn advance(&mut self, off: usize, len: usize) {
        let total = self.payload.len();
        if off + len == total {
            self.next = None;
            self.tcp_seq = self.tcp_seq.wrapping_add(total as u32);
        } else {
            self.next = Some(off + len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain over one heap buffer (the test owns it; the chain borrows it).
    fn chain_over(buf: &mut [u8]) -> Chain<'_> {
        Chain::over(buf)
    }

    struct Frame {
        hdr: Vec<u8>,
        frame: Vec<u8>,
    }

    fn run(g: &mut TcpGen, tso: bool, csum: bool) -> Vec<Frame> {
        let mut out = Vec::new();
        loop {
            let mut buf = vec![0u8; 70_000];
            let need = g.next_len(tso);
            let n = g.emit(&chain_over(&mut buf), tso, csum);
            assert_eq!(n, need);
            out.push(Frame { hdr: buf[..NET_HDR_LEN].to_vec(), frame: buf[NET_HDR_LEN..n].to_vec() });
            if !g.in_progress() {
                return out;
            }
        }
    }

    /// Checks IPv4 and TCP checksums (completing a partial one as the guest would).
    fn check_frame(f: &Frame) -> (u32, usize) {
        let b = &f.frame;
        assert_eq!(fold(sum16(&b[IP..TCP], 0)), 0xffff, "IPv4 header checksum");
        let ip_len = u16::from_be_bytes([b[IP + 2], b[IP + 3]]) as usize;
        assert_eq!(ip_len + 14, b.len(), "IPv4 total length");
        let tcp = &b[TCP..];
        let ph = pseudo(&b[IP..TCP], tcp.len());
        if f.hdr[0] & 1 != 0 {
            assert_eq!(u16::from_le_bytes([f.hdr[6], f.hdr[7]]), 34);
            assert_eq!(u16::from_le_bytes([f.hdr[8], f.hdr[9]]), 16);
            assert_eq!(u16::from_be_bytes([tcp[16], tcp[17]]), fold(ph), "partial = pseudo-header sum");
            let mut t = tcp.to_vec();
            t[16] = 0;
            t[17] = 0;
            let full = !fold(sum16(&t, ph));
            t[16..18].copy_from_slice(&full.to_be_bytes());
            assert_eq!(fold(sum16(&t, ph)), 0xffff);
        } else {
            assert_eq!(fold(sum16(tcp, ph)), 0xffff, "complete TCP checksum");
        }
        let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        (seq, tcp.len() - 20)
    }

    #[test]
    fn segments_and_super_frames_carry_the_same_bytes_with_valid_checksums() {
        let mss = 1000;
        let len = HDRS + 3500;
        for (tso, csum) in [(true, true), (false, true), (false, false)] {
            let mut g = TcpGen::new([2, 0, 0, 0, 0, 2], len, mss);
            let mut payloads = Vec::new();
            for seq in 0..2u64 {
                g.start(seq);
                let frames = run(&mut g, tso, csum);
                assert_eq!(frames.len(), if tso { 1 } else { 4 }, "tso {tso} csum {csum}");
                let mut p = Vec::new();
                for (i, f) in frames.iter().enumerate() {
                    let (tcp_seq, n) = check_frame(f);
                    assert_eq!(tcp_seq as usize, seq as usize * 3500 + p.len());
                    assert_eq!(f.hdr[0] & 1 != 0, csum, "NEEDS_CSUM iff guest csum");
                    assert_eq!(f.hdr[1], if tso { 1 } else { 0 }, "gso_type");
                    assert_eq!(u16::from_le_bytes([f.hdr[4], f.hdr[5]]), if tso { mss } else { 0 });
                    assert_eq!(u16::from_le_bytes([f.hdr[10], f.hdr[11]]), 1, "num_buffers");
                    if !tso {
                        assert!(n <= mss as usize);
                        assert!(f.frame.len() <= 14 + 1500);
                    }
                    let psh = f.frame[TCP + 13] & TCP_PSH != 0;
                    assert_eq!(psh, i + 1 == frames.len());
                    p.extend_from_slice(&f.frame[HDRS..]);
                }
                assert_eq!(p.len(), 3500);
                assert_eq!(&p[..4], b"VNET");
                assert_eq!(u64::from_le_bytes(p[4..12].try_into().unwrap()), seq);
                payloads.push(p);
            }
            assert_eq!(payloads[0][12..], payloads[1][12..]);
        }
    }

    #[test]
    fn small_super_frame_is_one_plain_frame_and_abort_skips_the_rest() {
        let mut g = TcpGen::new([2, 0, 0, 0, 0, 2], 100, 1000);
        g.start(0);
        let f = run(&mut g, true, true);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].hdr[1], 0, "fits one MSS: no GSO");
        check_frame(&f[0]);

        let mut g = TcpGen::new([2, 0, 0, 0, 0, 2], HDRS + 3000, 1000);
        g.start(0);
        let mut buf = vec![0u8; 2000];
        g.emit(&chain_over(&mut buf), false, false);
        assert!(g.in_progress());
        g.abort();
        assert!(!g.in_progress());
        g.start(1);
        let f = run(&mut g, false, false);
        assert_eq!(check_frame(&f[0]).0, 3000, "the next super-frame starts after the aborted one");
    }
}
