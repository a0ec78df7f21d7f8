//! The `5tswap` forwarding mode's header rewrite (DPDK testpmd's `5tswap`): every
//! frame goes back where it came from with its Ethernet addresses, IP addresses (IPv4 or
//! IPv6, after at most one 802.1Q/802.1ad tag) and TCP/UDP ports swapped.
//!
//! Owns: the swap. Must not: allocate or recompute checksums (swapping two fields of a
//! ones'-complement sum leaves it unchanged). A header that is cut short is swapped as
//! far as it is whole, never read past the frame.

const ETH_HLEN: usize = 14;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;

fn swap(d: &mut [u8], a: usize, b: usize, n: usize) {
    let (x, y) = d.split_at_mut(b);
    x[a..a + n].swap_with_slice(&mut y[..n]);
}

/// Swaps source and destination at every layer of `d` it recognises.
pub fn swap_5tuple(d: &mut [u8]) {
    if d.len() < ETH_HLEN {
        return;
    }
    swap(d, 0, 6, 6);
    let mut at = 12;
    let mut ty = u16::from_be_bytes([d[at], d[at + 1]]);
    if matches!(ty, 0x8100 | 0x88a8) {
        if d.len() < at + 6 {
            return;
        }
        at += 4;
        ty = u16::from_be_bytes([d[at], d[at + 1]]);
    }
    let l3 = at + 2;
    let (proto, l4) = match ty {
        0x0800 => {
            if d.len() < l3 + 20 || d[l3] >> 4 != 4 {
                return;
            }
            let ihl = (d[l3] & 0xf) as usize * 4;
            swap(d, l3 + 12, l3 + 16, 4);
            // Ports are only in the first fragment.
            let frag_off = u16::from_be_bytes([d[l3 + 6], d[l3 + 7]]) & 0x1fff;
            if ihl < 20 || frag_off != 0 {
                return;
            }
            (d[l3 + 9], l3 + ihl)
        }
        0x86dd => {
            if d.len() < l3 + 40 {
                return;
            }
            swap(d, l3 + 8, l3 + 24, 16);
            (d[l3 + 6], l3 + 40)
        }
        _ => return,
    };
    if matches!(proto, IPPROTO_TCP | IPPROTO_UDP) && d.len() >= l4 + 4 {
        swap(d, l4, l4 + 2, 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swaps_every_layer_of_udp4_and_tcp6() {
        let mut f = vec![0u8; 60];
        f[0..6].copy_from_slice(&[1; 6]);
        f[6..12].copy_from_slice(&[2; 6]);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[23] = 17;
        f[26..30].copy_from_slice(&[10, 0, 0, 1]);
        f[30..34].copy_from_slice(&[10, 0, 0, 2]);
        f[34..36].copy_from_slice(&[0, 7]);
        f[36..38].copy_from_slice(&[0, 9]);
        let mut want = f.clone();
        want[0..6].copy_from_slice(&[2; 6]);
        want[6..12].copy_from_slice(&[1; 6]);
        want[26..30].copy_from_slice(&[10, 0, 0, 2]);
        want[30..34].copy_from_slice(&[10, 0, 0, 1]);
        want[34..36].copy_from_slice(&[0, 9]);
        want[36..38].copy_from_slice(&[0, 7]);
        swap_5tuple(&mut f);
        assert_eq!(f, want);

        let mut g = vec![0u8; 14 + 40 + 20];
        g[12..14].copy_from_slice(&[0x86, 0xdd]);
        g[14] = 0x60;
        g[20] = 6;
        g[22..38].copy_from_slice(&[0xa; 16]);
        g[38..54].copy_from_slice(&[0xb; 16]);
        g[54..58].copy_from_slice(&[1, 2, 3, 4]);
        swap_5tuple(&mut g);
        assert_eq!((&g[22..38], &g[38..54], &g[54..58]), (&[0xb; 16][..], &[0xa; 16][..], &[3, 4, 1, 2][..]));
        // Cut short: no panic.
        for n in 0..g.len() {
            swap_5tuple(&mut g.clone()[..n]);
        }
    }
}
