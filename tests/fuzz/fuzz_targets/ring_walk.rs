//! The backend's descriptor walk (split and packed rings) over arbitrary descriptor
//! tables, avail rings and indirect tables: rounds of driver writes into guest memory,
//! each followed by a device burst (poll, walk, gather, scatter, used, publish).
//! `host_backend::fuzz_api::RingSession` panics if a walked buffer lies outside guest
//! memory; libFuzzer reports panics, and hangs through `-timeout`.
#![no_main]

use arbitrary::Arbitrary;
use host_backend::fuzz_api::{self as api, BurstOutcome, RingParams, RingSession};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Placement {
    /// The default areas inside the first region.
    Default,
    /// Offsets (in 16-byte steps) from the first region's front-end address.
    Offsets { desc: u16, avail: u16, used: u16 },
    /// Anything.
    Raw { desc: u64, avail: u64, used: u64 },
}

#[derive(Arbitrary, Debug)]
struct Write {
    /// 0..=2: the ring areas; 3: the first region's data; 4: the second region; else raw.
    area: u8,
    off: u16,
    bytes: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Round {
    writes: Vec<Write>,
    dir: u8,
    max: u8,
    written: u16,
}

#[derive(Arbitrary, Debug)]
struct Input {
    packed: bool,
    size: u16,
    base: u16,
    place: Placement,
    event_idx: bool,
    indirect: bool,
    in_order: bool,
    rounds: Vec<Round>,
}

fuzz_target!(|inp: Input| {
    if std::env::var_os("FUZZ_DEBUG").is_some() {
        eprintln!("{inp:#?}");
    }
    let size = match (inp.packed, inp.size & 0x8000 != 0) {
        (_, true) => inp.size & 0x7fff,
        (false, false) => 1 << (inp.size % 9),
        (true, false) => inp.size % 256 + 1,
    };
    let base = if inp.packed && inp.base & 0x4000 == 0 {
        ((inp.base & 0x7fff) % size.max(1)) | (inp.base & 0x8000)
    } else {
        inp.base
    };
    let (desc, avail, used) = match inp.place {
        Placement::Default => (api::DESC_OFF, api::AVAIL_OFF, api::USED_OFF),
        Placement::Offsets { desc, avail, used } => (desc as u64 * 16, avail as u64 * 16, used as u64 * 16),
        Placement::Raw { desc, avail, used } => (
            desc.wrapping_sub(api::MEM_UVA),
            avail.wrapping_sub(api::MEM_UVA),
            used.wrapping_sub(api::MEM_UVA),
        ),
    };
    let p = RingParams {
        packed: inp.packed,
        size,
        base,
        desc_uva: api::MEM_UVA.wrapping_add(desc),
        avail_uva: api::MEM_UVA.wrapping_add(avail),
        used_uva: api::MEM_UVA.wrapping_add(used),
        event_idx: inp.event_idx,
        indirect: inp.indirect,
        in_order: inp.in_order,
    };
    let Some(mut s) = RingSession::new(&p, &[]) else {
        return;
    };
    for round in inp.rounds.iter().take(64) {
        for w in round.writes.iter().take(32) {
            let gpa = match w.area {
                0 => api::MEM_GPA + desc,
                1 => api::MEM_GPA + avail,
                2 => api::MEM_GPA + used,
                3 => api::MEM_GPA + 0x3000,
                4 => api::MEM2_GPA,
                _ => api::MEM_GPA,
            }
            .wrapping_add(w.off as u64);
            s.write(gpa, &w.bytes);
        }
        if s.burst(round.dir, round.max as u16, round.written as u32) == BurstOutcome::Broken {
            // The queue is broken: a port stops here.
            return;
        }
    }
    let _ = s.last_avail();
});
