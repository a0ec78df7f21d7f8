//! The IOTLB table (`host_backend::iotlb`) against a naive model: sequences of updates
//! (newest translation wins) and invalidations, with every probe's answer from the table
//! and from a ring's translation view compared with what the model's history says.
#![no_main]

use arbitrary::Arbitrary;
use host_backend::fuzz_api::{IotlbSession, UpdateOutcome, MEM_LEN, MEM_UVA};
use libfuzzer_sys::fuzz_target;

/// An address: mostly small (so ranges meet), sometimes near the top or anything.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Addr {
    Small(u16),
    Top(u16),
    Raw(u64),
}

impl Addr {
    fn get(self) -> u64 {
        match self {
            Addr::Small(x) => x as u64 * 16,
            Addr::Top(x) => u64::MAX - x as u64,
            Addr::Raw(x) => x,
        }
    }
}

#[derive(Arbitrary, Debug, Clone, Copy)]
enum Target {
    /// Inside the memory the translations point into.
    Mem(u16),
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Update { iova: Addr, size: Addr, uaddr: Target, perm: u8 },
    Invalidate { iova: Addr, size: Addr },
    Probe { iova: Addr, len: u16, write: bool },
    ProbeWhole { iova: Addr, len: u16, write: bool },
}

#[derive(Debug, Clone, Copy)]
enum Event {
    Map { iova: u64, size: u64, uaddr: u64, perm: u8 },
    Unmap { start: u64, end: u64 },
}

/// The model's answer for one byte: the newest event covering it decides.
fn model(history: &[Event], x: u64) -> Option<(u64, u8)> {
    for e in history.iter().rev() {
        match *e {
            Event::Map { iova, size, uaddr, perm } if x >= iova && x - iova < size => {
                return Some((uaddr + (x - iova), perm))
            }
            Event::Unmap { start, end } if x >= start && x < end => return None,
            _ => {}
        }
    }
    None
}

fn in_mem(uaddr: u64) -> bool {
    uaddr >= MEM_UVA && uaddr - MEM_UVA < MEM_LEN
}

fuzz_target!(|ops: Vec<Op>| {
    if std::env::var_os("FUZZ_DEBUG").is_some() {
        eprintln!("{ops:#?}");
    }
    let s = IotlbSession::new();
    let mut history = Vec::new();
    for op in ops.iter().take(2048) {
        match *op {
            Op::Update { iova, size, uaddr, perm } => {
                let (iova, size) = (iova.get(), size.get());
                let uaddr = match uaddr {
                    Target::Mem(o) => MEM_UVA + o as u64,
                    Target::Raw(u) => u,
                };
                let valid = size != 0
                    && iova.checked_add(size).is_some()
                    && uaddr.checked_add(size).is_some()
                    && perm != 0
                    && perm & !3 == 0;
                match s.update(iova, size, uaddr, perm) {
                    UpdateOutcome::Added(_) => {
                        assert!(valid, "accepted a bad update {op:?}");
                        history.push(Event::Map { iova, size, uaddr, perm });
                    }
                    UpdateOutcome::Refused => assert!(!valid, "refused a good update {op:?}"),
                }
            }
            Op::Invalidate { iova, size } => {
                let (start, size) = (iova.get(), size.get());
                let changed = s.invalidate(start, size);
                if size != 0 {
                    history.push(Event::Unmap { start, end: start.saturating_add(size) });
                } else {
                    assert!(!changed);
                }
            }
            Op::Probe { iova, len, write } => {
                let x = iova.get();
                let want = model(&history, x);
                assert_eq!(s.lookup(x), want, "table lookup of {x:#x}");
                let need = if write { 2 } else { 1 };
                let got = s.translate(x, len as u64, write);
                match want {
                    Some((u, perm)) if perm & need != 0 && in_mem(u) => {
                        let (gu, n) =
                            got.unwrap_or_else(|| panic!("no translation of {x:#x}, model {want:x?}"));
                        assert_eq!(gu, u, "translation of {x:#x}");
                        // Every byte of the contiguous run maps where the model says.
                        for k in (0..n).step_by(((n / 16) as usize).max(1)).chain([n - 1]) {
                            let (mu, mp) = model(&history, x + k).expect("run byte mapped");
                            assert_eq!(mu, u + k, "byte {k} of the run from {x:#x}");
                            assert!(mp & need != 0);
                            assert!(in_mem(mu));
                        }
                    }
                    _ => assert!(got.is_none(), "translated {x:#x} to {got:x?}, model {want:x?}"),
                }
            }
            Op::ProbeWhole { iova, len, write } => {
                let x = iova.get();
                let len = len as u64 % 128 + 1;
                let ok = s.translate_whole(x, len, write);
                let need = if write { 2 } else { 1 };
                // Whole: every byte mapped with the permission, and contiguous in memory.
                let model_ok = x.checked_add(len).is_some()
                    && (0..len).all(|k| {
                        matches!(model(&history, x + k),
                            Some((u, p)) if p & need != 0 && in_mem(u) && model(&history, x).map(|(u0, _)| u0 + k) == Some(u))
                    });
                assert_eq!(ok, model_ok, "whole translation of {x:#x}+{len}");
            }
        }
    }
});
