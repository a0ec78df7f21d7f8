//! `set verbose 1|2|3`: DPDK testpmd's per-packet dump lines for the frames of a burst
//! ("port P/queue Q: received N packets", then one line per frame with its addresses,
//! EtherType, length and segment count).
//!
//! Owns: the dump layout. Must not: change a frame or a counter. Runs on the forwarding
//! threads only when asked (verbose output is slow by nature, as DPDK's is): one write
//! of the whole burst's text to stdout, so the lines of two threads do not interleave.

use std::fmt::Write as _;
use std::io::Write;

use driver::Packet;

fn mac(out: &mut String, m: &[u8]) {
    for (i, b) in m.iter().enumerate() {
        let _ = write!(out, "{}{b:02X}", if i == 0 { "" } else { ":" });
    }
}

/// The dump of `pkts`, received (`rx`) or about to be sent on `port`/`queue`.
pub fn format(port: u16, queue: u16, rx: bool, pkts: &[Packet]) -> String {
    let mut s = String::with_capacity(64 + pkts.len() * 120);
    let what = if rx { "received" } else { "sent" };
    let _ = writeln!(s, "port {port}/queue {queue}: {what} {} packets", pkts.len());
    for p in pkts {
        let d = p.data();
        s.push_str("  src=");
        mac(&mut s, d.get(6..12).unwrap_or(&[0; 6]));
        s.push_str(" - dst=");
        mac(&mut s, d.get(0..6).unwrap_or(&[0; 6]));
        let ty = d.get(12..14).map_or(0, |t| u16::from_be_bytes([t[0], t[1]]));
        let _ = write!(s, " - type={ty:#06x} - length={} - nb_segs={}", p.total_len(), p.nb_segs());
        if rx {
            let _ = write!(s, " - Receive queue={queue:#x}");
        }
        s.push('\n');
    }
    s
}

/// Prints the dump of `pkts` (see [`format`]).
pub fn burst(port: u16, queue: u16, rx: bool, pkts: &[Packet]) {
    let s = format(port, queue, rx, pkts);
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(s.as_bytes());
    let _ = out.flush();
}
