//! testpmd: a DPDK-style forwarding and statistics tool on the `driver` crate.
//!
//! Not built yet (issue 4 builds it on the driver of issue 3). Until then the binary
//! says so and exits non-zero instead of pretending to forward.

fn main() {
    eprintln!("testpmd: not implemented yet (the driver library it needs is still being built)");
    std::process::exit(2);
}
