//! The control-queue command parser (`host_backend::ctrl::parse`) over arbitrary
//! commands and negotiated features; a parsed command is applied to a receive
//! configuration and the filter run over a frame. Must never panic.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    features: u64,
    max_pairs: u16,
    command: Vec<u8>,
    frame: Vec<u8>,
}

fuzz_target!(|inp: Input| {
    if std::env::var_os("FUZZ_DEBUG").is_some() {
        eprintln!("{inp:#?}");
    }
    host_backend::fuzz_api::ctrl_command(&inp.command, inp.features, inp.max_pairs, &inp.frame);
});
