//! Surviving a front-end that takes its memory away: SIGBUS on guest memory.
//!
//! Owns: the process-wide SIGBUS handler, the lock-free table of guest-memory mappings it
//! may repair, and the counter of repairs that workers compare once per loop iteration.
//! Must not: touch device state or take a lock (the handler runs inside a fault, on any
//! thread), or repair a fault outside a registered guest mapping.
//!
//! Why a handler at all. `SET_MEM_TABLE` hands us the front-end's files; `memory.rs`
//! refuses a region longer than its file (fstat at map time), but the front-end keeps
//! the file and may `ftruncate` it afterwards (or a hugetlbfs file may have no huge page
//! left when a page is first touched). Any access to such a page raises SIGBUS in the
//! worker that made it, which by default kills the whole process and every other
//! device with it. Seals would prevent the truncation (`F_SEAL_SHRINK`), but QEMU's
//! file- and hugetlbfs-backed memory and DPDK's memfds are not sealed (DPDK creates its
//! memfds without `MFD_ALLOW_SEALING`, so no seal can be added later either), and
//! refusing unsealed memory would refuse every real front-end; adding a seal to a peer's
//! file where it is allowed would change the peer's own file under it. So the realistic
//! fix is to make the fault survivable: the handler maps a private anonymous page (a
//! whole huge page for hugetlbfs memory, whose mappings split only on huge-page
//! boundaries) over the faulting page with `MAP_FIXED`, so the faulting instruction
//! restarts and completes on zeros (writes go to the private page, nobody sees them),
//! and counts the repair in the region's slot. The worker then sees [`repairs`] change,
//! re-syncs, and the device whose memory it was is marked broken when its rings are
//! re-activated (`Device::activate` asks `GuestMemory::faulted`): that device stops,
//! the others never notice. Unmapping the region later (the table replaced or the
//! front-end gone) unmaps the private pages with it.
//!
//! A SIGBUS at an address that is no guest mapping (a bug elsewhere, or a `kill -BUS`)
//! restores the handler that was installed before ours and lets it happen again, so
//! behaviour outside guest memory is what it would be without this module.
//!
//! The handler uses only atomics and `mmap`/`sigaction`/`raise`, which are single system
//! calls on Linux (async-signal-safe in practice; `mmap` is not on POSIX's list, but
//! glibc's and musl's wrappers take no lock).

use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Once;

use crate::error::{Error, Result};

/// Mappings that can be registered at once. vhost-user tables have at most 8 regions (32
/// with `CONFIGURE_MEM_SLOTS`, which is not offered); a replaced table stays mapped until
/// the last worker drops it, so this allows about 60 devices with two live tables each.
const SLOTS: usize = 1024;

const FREE: u8 = 0;
const CLAIMED: u8 = 1;
const LIVE: u8 = 2;

struct Slot {
    state: AtomicU8,
    start: AtomicUsize,
    len: AtomicUsize,
    /// The unit a repair maps: the file's page size (a huge page on hugetlbfs).
    page: AtomicUsize,
    /// Repairs made in this mapping.
    faults: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)] // the array initialiser below only
const EMPTY: Slot = Slot {
    state: AtomicU8::new(FREE),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    page: AtomicUsize::new(0),
    faults: AtomicU64::new(0),
};

static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];
/// Repairs made anywhere; workers re-sync when it changes.
static REPAIRS: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();
/// The SIGBUS action before ours (written once, before ours is installed).
static mut PREVIOUS: Option<libc::sigaction> = None;

/// How many faults the handler has repaired in this process (workers compare it once per
/// loop iteration; it changes only when a front-end took memory away).
#[inline(always)]
pub(crate) fn repairs() -> u64 {
    // Relaxed: a change only makes the worker re-read device state under its mutex.
    REPAIRS.load(Ordering::Relaxed)
}

/// A registered mapping; unregisters itself on drop (before the mapping is unmapped: the
/// owner must drop this first).
#[derive(Debug)]
pub(crate) struct Guard {
    slot: usize,
}

impl Guard {
    /// Faults repaired in this mapping so far.
    pub(crate) fn faults(&self) -> u64 {
        // Relaxed: a count, read after the worker noticed `repairs` changed.
        TABLE[self.slot].faults.load(Ordering::Relaxed)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let s = &TABLE[self.slot];
        // Release: a later claimer's Acquire CAS sees the slot fully retired.
        s.state.store(FREE, Ordering::Release);
    }
}

/// Registers `[start, start + len)`, a shared mapping of a front-end's file whose page
/// size is `page`, installing the handler on first use.
pub(crate) fn register(start: *mut u8, len: usize, page: usize) -> Result<Guard> {
    install()?;
    let page = if page.is_power_of_two() && page >= 4096 { page } else { 4096 };
    for (i, s) in TABLE.iter().enumerate() {
        // Acquire: pairs with the Release of the last `Guard::drop` of this slot.
        if s.state.compare_exchange(FREE, CLAIMED, Ordering::Acquire, Ordering::Relaxed).is_ok() {
            s.start.store(start as usize, Ordering::Relaxed);
            s.len.store(len, Ordering::Relaxed);
            s.page.store(page, Ordering::Relaxed);
            s.faults.store(0, Ordering::Relaxed);
            // Release: the handler's Acquire load of LIVE sees the fields above.
            s.state.store(LIVE, Ordering::Release);
            return Ok(Guard { slot: i });
        }
    }
    Err(Error::Memory(format!("more than {SLOTS} guest memory regions mapped at once")))
}

fn install() -> Result<()> {
    let mut res = Ok(());
    INSTALL.call_once(|| {
        // SAFETY: plain C structs; `sigaction` reads `act` and writes `old`, both locals.
        // `PREVIOUS` is written here only, once, before the handler that reads it exists.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) != 0 {
                res = Err(Error::io("sigaction(SIGBUS)", std::io::Error::last_os_error()));
                return;
            }
            PREVIOUS = Some(old);
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigbus as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut act.sa_mask);
            if libc::sigaction(libc::SIGBUS, &act, std::ptr::null_mut()) != 0 {
                res = Err(Error::io("sigaction(SIGBUS)", std::io::Error::last_os_error()));
            }
        }
    });
    res
}

/// The registered slot holding `addr`, if any.
fn find(addr: usize) -> Option<&'static Slot> {
    TABLE.iter().find(|s| {
        // Acquire: pairs with `register`'s Release store of LIVE.
        s.state.load(Ordering::Acquire) == LIVE && {
            let start = s.start.load(Ordering::Relaxed);
            addr.wrapping_sub(start) < s.len.load(Ordering::Relaxed)
        }
    })
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // si_code > 0: raised by the kernel for a fault at `addr` (not sent by a process).
    if code > 0 {
        if let Some(s) = find(addr) {
            let start = s.start.load(Ordering::Relaxed);
            let end = start + s.len.load(Ordering::Relaxed);
            let page = s.page.load(Ordering::Relaxed);
            let from = (addr & !(page - 1)).max(start);
            let to = (from + page).min(end);
            // SAFETY: replaces pages inside a guest mapping this process owns (registered
            // and not yet unregistered, so not yet unmapped) with private anonymous
            // memory of the same protection; nothing holds a Rust reference into guest
            // memory, and the mapping's owner unmaps the whole range later.
            let p = unsafe {
                libc::mmap(
                    from as *mut libc::c_void,
                    to - from,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED {
                // Relaxed: counters; the worker re-syncs through the device mutex.
                s.faults.fetch_add(1, Ordering::Relaxed);
                REPAIRS.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
    }
    // Not ours: put the previous action back and let the signal happen again under it
    // (a fault re-executes the instruction; a sent signal is raised anew).
    // SAFETY: `PREVIOUS` was written before this handler was installed and never since;
    // sigaction and raise are async-signal-safe.
    unsafe {
        let prev = (*std::ptr::addr_of!(PREVIOUS)).unwrap_or_else(|| {
            let mut d: libc::sigaction = std::mem::zeroed();
            d.sa_sigaction = libc::SIG_DFL;
            d
        });
        libc::sigaction(sig, &prev, std::ptr::null_mut());
        if code <= 0 {
            libc::raise(sig);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::tests::memfd;
    use std::os::fd::AsRawFd;

    /// A shared mapping of a memfd truncated under it: the read that would kill the
    /// process reads zeros, the repair is counted in its slot, and an unregistered
    /// mapping's slot is reused.
    #[test]
    fn truncated_shared_mapping_reads_zeros_and_counts() {
        let len = 4 * 4096;
        let f = memfd(len as u64);
        // SAFETY: a fresh shared mapping of `len` bytes of a memfd of that size.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let p = p as *mut u8;
        // SAFETY: inside the mapping; volatile, no reference formed.
        unsafe { p.add(4096).write_volatile(7) };
        let guard = register(p, len, 4096).unwrap();
        let before = repairs();
        f.set_len(4096).unwrap();
        // SAFETY: inside the mapping; the page past the file's end is repaired by the
        // handler instead of killing the process.
        let v = unsafe { p.add(2 * 4096 + 5).read_volatile() };
        assert_eq!(v, 0);
        // SAFETY: as above: the first page is still backed by the file.
        unsafe { p.write_volatile(1) };
        assert_eq!(guard.faults(), 1);
        assert!(repairs() > before);
        drop(guard);
        // SAFETY: unmaps the mapping made above (and the repaired page in it).
        assert_eq!(unsafe { libc::munmap(p.cast(), len) }, 0);
    }
}
