//! Write prefetch: asks for a cache line's ownership ahead of the store that needs it.
//!
//! Owns: the CPU check and the one instruction (`PREFETCHW`), behind a token
//! ([`WritePrefetch`]) that only the check hands out, so the instruction cannot be issued
//! on a CPU that lacks it. Must not: know what the line holds.
//!
//! Why: a transmitted frame's virtio-net header is written into a line that the device
//! usually wrote last (a received frame's header, forwarded). Such a store waits for the
//! line to come over from the other core, and the burst's one fence (the avail-index
//! publish) waits for every such store; asking for all the lines of a burst first lets
//! their transfers overlap (`host-backend/bench/results/HISTORY.md` has what it measured).
//!
//! Shared because the host backend has the mirror image of this problem (the receive
//! buffers it fills were written last by the driver) and uses the same check and hint.

use std::sync::atomic::{AtomicU8, Ordering};

/// 0: not checked yet, 1: no, 2: yes.
static WRITE_PREFETCH: AtomicU8 = AtomicU8::new(0);

/// Proof that this CPU has `PREFETCHW`: obtained only from [`WritePrefetch::detect`].
/// Zero-sized and `Copy`, so a hot path keeps an `Option<WritePrefetch>` at no cost.
#[derive(Clone, Copy, Debug)]
pub struct WritePrefetch(());

impl WritePrefetch {
    /// The token if this CPU has `PREFETCHW` (CPUID 0x8000_0001 ECX bit 8,
    /// "3DNowPrefetch"; without it the instruction may fault), checked once per process.
    pub fn detect() -> Option<WritePrefetch> {
        let yes = match WRITE_PREFETCH.load(Ordering::Relaxed) {
            0 => {
                let yes = detect();
                WRITE_PREFETCH.store(if yes { 2 } else { 1 }, Ordering::Relaxed);
                yes
            }
            v => v == 2,
        };
        yes.then_some(WritePrefetch(()))
    }

    /// Asks for the line holding `p` in a writable state. A hint: it never faults,
    /// whatever `p` is, and reads or writes nothing.
    #[inline(always)]
    pub fn line(self, p: *const u8) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: PREFETCHW is present (this token exists only when `detect` found it); it
        // only hints the cache, reads and writes no architectural state and does not fault
        // on any address.
        unsafe {
            std::arch::asm!("prefetchw [{0}]", in(reg) p, options(nostack, preserves_flags, readonly))
        };
        #[cfg(not(target_arch = "x86_64"))]
        let _ = p;
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> bool {
    use std::arch::x86_64::__cpuid;
    // SAFETY: CPUID exists on every x86_64 CPU; leaf 0x8000_0000 reports the highest
    // extended leaf, and 0x8000_0001 is read only when it exists. (`__cpuid` is safe
    // from Rust 1.87 on, unsafe before: the workspace supports 1.80.)
    #[allow(unused_unsafe)]
    unsafe {
        __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & (1 << 8) != 0
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::WritePrefetch;

    #[test]
    fn the_check_is_stable_and_the_hint_is_harmless() {
        let a = WritePrefetch::detect();
        assert_eq!(a.is_some(), WritePrefetch::detect().is_some());
        let line = [0u8; 64];
        if let Some(t) = a {
            t.line(line.as_ptr());
            t.line(std::ptr::null()); // a hint on an unmapped address: no fault
        }
        assert_eq!(line, [0u8; 64]);
    }
}
