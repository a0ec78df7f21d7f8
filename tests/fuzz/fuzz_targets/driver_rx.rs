//! The driver's receive queue (split and packed rings; checksum and segmentation
//! offloads, mergeable buffers and in-order use negotiated or not) against a device
//! that completes posted buffers with any header and length, or writes anything into
//! the memory a device may write. `driver::fuzz_api::RxSession` checks the buffer
//! accounting after every step, every header shown to the application, and that close
//! returns every buffer once.
#![no_main]

use arbitrary::Arbitrary;
use driver::fuzz_api::RxSession;
use driver::layout::features as f;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Complete {
        n: u8,
        hdr: [u8; 12],
        len: u16,
    },
    /// A length anywhere in u32.
    CompleteRaw {
        n: u8,
        hdr: [u8; 12],
        len: u32,
    },
    Device {
        which: u8,
        off: u16,
        bytes: Vec<u8>,
    },
    Rx {
        max: u8,
        meta: bool,
        keep: bool,
    },
    Release,
}

#[derive(Arbitrary, Debug)]
struct Input {
    packed: bool,
    size: u16,
    /// Which of the receive-side features are negotiated.
    feats: u16,
    ops: Vec<Op>,
}

const CHOICES: [u32; 10] = [
    f::NET_GUEST_CSUM,
    f::NET_GUEST_TSO4,
    f::NET_GUEST_TSO6,
    f::NET_GUEST_ECN,
    f::NET_GUEST_UFO,
    f::NET_GUEST_USO4,
    f::NET_MRG_RXBUF,
    f::IN_ORDER,
    f::RING_EVENT_IDX,
    f::NET_GUEST_USO6,
];

fuzz_target!(|inp: Input| {
    if std::env::var_os("FUZZ_DEBUG").is_some() {
        eprintln!("{inp:#?}");
    }
    let features = CHOICES
        .iter()
        .enumerate()
        .filter(|(i, _)| inp.feats & (1 << i) != 0)
        .fold(f::bit(f::VERSION_1), |a, (_, &b)| a | f::bit(b));
    let mut s = RxSession::new(inp.packed, inp.size, features);
    for op in inp.ops.iter().take(128) {
        match op {
            Op::Complete { n, hdr, len } => {
                s.complete(*n % 16, hdr, *len as u32);
            }
            Op::CompleteRaw { n, hdr, len } => {
                s.complete(*n % 16, hdr, *len);
            }
            Op::Device { which, off, bytes } => s.device_write(*which, *off, bytes),
            Op::Rx { max, meta, keep } => {
                s.rx(*max, *meta, *keep);
            }
            Op::Release => s.release(),
        }
        if s.broken() {
            break;
        }
    }
    s.close();
});
