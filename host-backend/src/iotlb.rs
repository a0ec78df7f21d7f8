//! The device IOTLB of one device behind a virtual IOMMU (vhost-user §"IOMMU support").
//!
//! When `VIRTIO_F_ACCESS_PLATFORM` is negotiated with a front-end that has a vIOMMU
//! (QEMU with `iommu_platform=on` and `intel-iommu`), every address the driver gives the
//! device (ring areas, descriptors, indirect tables) is an I/O virtual address. The
//! front-end sends translations (`VHOST_USER_IOTLB_MSG` updates: IOVA range → its own
//! virtual address, with read/write permission) and withdraws them (invalidations);
//! the device asks for a missing one with a miss message on the backend channel.
//!
//! Owns: the shared translation table of one connection ([`Iotlb`]: sorted,
//! non-overlapping mappings behind a read-write lock that only the control thread
//! writes) and the per-ring translation cache ([`IovaView`]) that the data path uses
//! without taking that lock on a hit.
//! Must not: send or receive messages (`iotlb_channel.rs` does), or touch guest memory
//! (it only computes pointers; the ring engine reads and writes).
//!
//! How invalidation stays correct without a lock on the data path: a view is part of a
//! ring, and a ring lives only between two resyncs of its worker. An invalidation first
//! changes the table, then resyncs the device's rings (`Device::resync`): every worker
//! holding one of them drops it (and so every cached translation) at a burst boundary
//! and rebuilds it from the new table; only then is the front-end told that the invalidation is done.
//! An update needs no resync unless it replaces part of an existing mapping (then it is
//! an invalidation too): a view that misses its cache looks at the table.
//!
//! Why a per-ring cache of a few entries and not a copy of the table: the driver's
//! buffers live in a handful of IOMMU mappings (2 MiB pages with hugepages), so a linear
//! scan of a few entries hits almost always, costs no lock and no cache line shared with
//! another thread.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use crate::memory::GuestMemory;

/// `perm` bit: the device may read (`VHOST_ACCESS_RO`).
pub const ACCESS_READ: u8 = 0x1;
/// `perm` bit: the device may write (`VHOST_ACCESS_WO`).
pub const ACCESS_WRITE: u8 = 0x2;

/// `struct vhost_iotlb_msg` `type`: the device asks for a translation.
pub const MSG_MISS: u8 = 1;
/// The front-end adds a translation.
pub const MSG_UPDATE: u8 = 2;
/// The front-end withdraws translations of a range.
pub const MSG_INVALIDATE: u8 = 3;

/// Most mappings one table holds: bounds what a front-end can make us allocate (65536
/// 4 KiB pages are 256 MiB of buffers; 2 MiB pages cover far more).
pub const MAX_ENTRIES: usize = 1 << 16;

/// Entries in each ring's translation cache.
const CACHE_ENTRIES: usize = 8;

/// How often a ring that waits for a translation asks again.
pub const MISS_RESEND: Duration = Duration::from_millis(100);
/// How long a ring waits for a translation before the address counts as bad (the
/// front-end answers a miss it can translate within milliseconds; one it cannot
/// translate it never answers).
pub const MISS_TIMEOUT: Duration = Duration::from_secs(3);

/// A ring's outstanding miss: the address it waits for and since when.
#[derive(Debug, Clone, Copy)]
pub struct PendingMiss {
    /// The IOVA asked for.
    pub iova: u64,
    /// When the ring first missed it.
    pub since: Instant,
    /// When it last asked.
    pub asked: Instant,
}

/// One translation: `[iova, iova + size)` is the front-end's `[uaddr, uaddr + size)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// First I/O virtual address.
    pub iova: u64,
    /// Length in bytes (> 0).
    pub size: u64,
    /// The front-end's virtual address of `iova` (translated through the memory table).
    pub uaddr: u64,
    /// [`ACCESS_READ`] and/or [`ACCESS_WRITE`].
    pub perm: u8,
}

impl Mapping {
    fn end(&self) -> u64 {
        self.iova + self.size
    }
}

/// Why an update was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Zero size, or the range wraps in IOVA or front-end address space.
    BadRange,
    /// `perm` is not a non-empty combination of read and write.
    BadPerm,
    /// The table already holds [`MAX_ENTRIES`] mappings.
    Full,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refused::BadRange => "empty or wrapping range",
            Refused::BadPerm => "permission is neither read nor write",
            Refused::Full => "translation table full",
        })
    }
}

/// The translations of one connection. Written by the device's control thread only;
/// read by data-path views on a cache miss.
///
/// Bounded on every path: it never holds more than its capacity ([`MAX_ENTRIES`]). An
/// update that would exceed it is refused before anything changes (the table stays as
/// it was, so nothing cached needs dropping); an invalidation that splits a mapping
/// (a hole punched in its middle) when the table is full withdraws the split-off tail
/// too (a translation the front-end still wanted becomes a miss it answers again; a
/// withdrawn one never stays).
#[derive(Debug)]
pub struct Iotlb {
    /// Keyed by `iova`; the mappings never overlap.
    table: RwLock<BTreeMap<u64, Mapping>>,
    /// Most mappings held.
    capacity: usize,
}

impl Default for Iotlb {
    fn default() -> Self {
        Iotlb { table: RwLock::default(), capacity: MAX_ENTRIES }
    }
}

/// What removing a range from the table does: the keys of the mappings it overlaps, and
/// the parts of the first and last of them that lie outside the range and stay.
struct Cut {
    hit: Vec<u64>,
    head: Option<Mapping>,
    tail: Option<Mapping>,
}

impl Cut {
    /// The table's length after the cut.
    fn len_after(&self, len: usize) -> usize {
        len - self.hit.len() + self.head.is_some() as usize + self.tail.is_some() as usize
    }
}

impl Iotlb {
    /// An empty table.
    pub fn new() -> Arc<Iotlb> {
        Arc::new(Iotlb::default())
    }

    /// An empty table of at most `capacity` mappings (for tests of the bound).
    #[cfg(test)]
    fn with_capacity(capacity: usize) -> Iotlb {
        Iotlb { table: RwLock::default(), capacity }
    }

    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<u64, Mapping>> {
        // The table is consistent after every write (each is a whole insert or remove),
        // so a poisoned lock still holds a usable table.
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<u64, Mapping>> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// No mappings.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Adds `m`, replacing whatever it overlaps (the newest translation wins). Returns
    /// whether it replaced something: then cached translations of the old mapping must
    /// be dropped as for an invalidation (its permission or target may have changed).
    /// Refused (and nothing changed) if the table would hold more than its capacity.
    pub fn update(&self, m: Mapping) -> Result<bool, Refused> {
        if m.size == 0 || m.iova.checked_add(m.size).is_none() || m.uaddr.checked_add(m.size).is_none() {
            return Err(Refused::BadRange);
        }
        if m.perm == 0 || m.perm & !(ACCESS_READ | ACCESS_WRITE) != 0 {
            return Err(Refused::BadPerm);
        }
        let mut t = self.write();
        let cut = plan_cut(&t, m.iova, m.end());
        if cut.len_after(t.len()) + 1 > self.capacity {
            return Err(Refused::Full);
        }
        let replaced = apply_cut(&mut t, cut);
        t.insert(m.iova, m);
        Ok(replaced)
    }

    /// Withdraws every translation of `[iova, iova + size)` (parts of mappings outside
    /// the range stay, unless keeping a split-off part would exceed the capacity: then
    /// it goes too). Returns whether anything changed. A wrapping range means "to the
    /// end of the address space".
    pub fn invalidate(&self, iova: u64, size: u64) -> bool {
        let end = iova.saturating_add(size);
        if size == 0 {
            return false;
        }
        let mut t = self.write();
        let mut cut = plan_cut(&t, iova, end);
        // At most one more mapping than before (a hole in one mapping), so dropping the
        // tail brings it back within the capacity.
        if cut.len_after(t.len()) > self.capacity {
            cut.tail = None;
        }
        apply_cut(&mut t, cut)
    }

    /// The mapping holding `iova`, if any.
    pub fn lookup(&self, iova: u64) -> Option<Mapping> {
        let t = self.read();
        let (_, m) = t.range(..=iova).next_back()?;
        (iova < m.end()).then_some(*m)
    }

    /// Every mapping, in IOVA order (for tests and logging).
    #[cfg(test)]
    pub fn mappings(&self) -> Vec<Mapping> {
        self.read().values().copied().collect()
    }
}

/// What removing `[start, end)` from `t` would do (see [`Cut`]); changes nothing.
fn plan_cut(t: &BTreeMap<u64, Mapping>, start: u64, end: u64) -> Cut {
    // Mappings are sorted and disjoint: the overlapping ones are the run that starts
    // before `end`, walked backwards until one ends at or before `start`; only the
    // lowest can stick out before `start`, only the highest after `end`.
    let hit: Vec<u64> = t.range(..end).rev().take_while(|(_, m)| m.end() > start).map(|(k, _)| *k).collect();
    let head =
        hit.last().map(|k| t[k]).filter(|m| m.iova < start).map(|m| Mapping { size: start - m.iova, ..m });
    let tail = hit.first().map(|k| t[k]).filter(|m| m.end() > end).map(|m| {
        let cut = end - m.iova;
        Mapping { iova: end, size: m.end() - end, uaddr: m.uaddr + cut, perm: m.perm }
    });
    Cut { hit, head, tail }
}

/// Applies a [`Cut`] planned on `t`; returns whether anything was removed.
fn apply_cut(t: &mut BTreeMap<u64, Mapping>, cut: Cut) -> bool {
    for k in &cut.hit {
        t.remove(k);
    }
    for piece in [cut.head, cut.tail].into_iter().flatten() {
        t.insert(piece.iova, piece);
    }
    !cut.hit.is_empty()
}

/// Why a view could not translate an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// No translation for this IOVA (yet): ask the front-end.
    Miss { iova: u64 },
    /// A translation exists but forbids this access, or points at memory the
    /// front-end never shared with us: the driver gave a bad address.
    Denied { iova: u64 },
}

#[derive(Clone, Copy)]
struct Cached {
    iova: u64,
    end: u64,
    host: *mut u8,
    perm: u8,
}

const EMPTY: Cached = Cached { iova: 0, end: 0, host: std::ptr::null_mut(), perm: 0 };

/// One ring's window onto the IOTLB: a few recently used translations, already
/// resolved to pointers into this process's mapping of guest memory.
pub struct IovaView {
    tlb: Arc<Iotlb>,
    cache: [Cached; CACHE_ENTRIES],
    next: usize,
}

// SAFETY: the cached pointers point into the guest-memory mapping of the ring that owns
// this view (its `Arc<GuestMemory>` keeps it mapped); the view moves to a worker with
// its ring and is used by that thread only.
unsafe impl Send for IovaView {}

impl IovaView {
    /// An empty view of `tlb`.
    pub fn new(tlb: Arc<Iotlb>) -> IovaView {
        IovaView { tlb, cache: [EMPTY; CACHE_ENTRIES], next: 0 }
    }

    /// Translates `[iova, iova + len)` (`len > 0`) for a read (`write == false`) or a
    /// write by the device: a pointer into `mem` and how many bytes (at most `len`)
    /// are contiguous there.
    #[inline]
    pub fn translate(
        &mut self,
        mem: &GuestMemory,
        iova: u64,
        len: u64,
        write: bool,
    ) -> Result<(*mut u8, u64), Fault> {
        let need = if write { ACCESS_WRITE } else { ACCESS_READ };
        let c = match self.cache.iter().find(|c| iova.wrapping_sub(c.iova) < c.end.wrapping_sub(c.iova)) {
            Some(c) => *c,
            None => self.fill(mem, iova)?,
        };
        if c.perm & need == 0 {
            return Err(Fault::Denied { iova });
        }
        let off = iova - c.iova;
        // SAFETY: `off < c.end - c.iova`, and `[c.host, c.host + (c.end - c.iova))` lies
        // inside one region of `mem` (checked in `fill`).
        let host = unsafe { c.host.add(off as usize) };
        Ok((host, (c.end - iova).min(len)))
    }

    /// Translates a range that must be contiguous in this process (a ring area or an
    /// indirect table): pieces from adjacent mappings are accepted when they are
    /// adjacent here too.
    pub fn translate_whole(
        &mut self,
        mem: &GuestMemory,
        iova: u64,
        len: u64,
        write: bool,
    ) -> Result<*mut u8, Fault> {
        let end = iova.checked_add(len).ok_or(Fault::Denied { iova })?;
        let (first, mut n) = self.translate(mem, iova, len, write)?;
        while iova + n < end {
            let at = iova + n;
            let (p, m) = self.translate(mem, at, end - at, write)?;
            if p != first.wrapping_add(n as usize) {
                return Err(Fault::Denied { iova: at });
            }
            n += m;
        }
        Ok(first)
    }

    /// Looks `iova` up in the table and caches the part of its mapping that lies in one
    /// region of guest memory.
    #[cold]
    fn fill(&mut self, mem: &GuestMemory, iova: u64) -> Result<Cached, Fault> {
        let m = self.tlb.lookup(iova).ok_or(Fault::Miss { iova })?;
        let uva = m.uaddr + (iova - m.iova);
        let (host, before, after) = mem.uva_span(uva).ok_or(Fault::Denied { iova })?;
        // The cached window: the mapping, clipped to the region holding `uva`.
        let lo = iova - before.min(iova - m.iova);
        let hi = m.end().min(iova.saturating_add(after));
        let c = Cached {
            iova: lo,
            end: hi,
            // SAFETY: `iova - lo <= before`, the bytes of the region before `host`.
            host: unsafe { host.sub((iova - lo) as usize) },
            perm: m.perm,
        };
        self.cache[self.next] = c;
        self.next = (self.next + 1) % CACHE_ENTRIES;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{tests::memfd, RegionDesc};

    fn m(iova: u64, size: u64, uaddr: u64, perm: u8) -> Mapping {
        Mapping { iova, size, uaddr, perm }
    }

    #[test]
    fn update_replaces_overlaps_and_invalidate_trims() {
        let t = Iotlb::new();
        assert_eq!(t.update(m(0x1000, 0x3000, 0x10_0000, 3)), Ok(false));
        assert_eq!(t.update(m(0x2000, 0x1000, 0x20_0000, 1)), Ok(true), "replaces a part");
        assert_eq!(
            t.mappings(),
            vec![
                m(0x1000, 0x1000, 0x10_0000, 3),
                m(0x2000, 0x1000, 0x20_0000, 1),
                m(0x3000, 0x1000, 0x10_2000, 3)
            ]
        );
        assert!(t.invalidate(0x1800, 0x2000));
        assert_eq!(t.mappings(), vec![m(0x1000, 0x800, 0x10_0000, 3), m(0x3800, 0x800, 0x10_2800, 3)]);
        assert!(!t.invalidate(0x2000, 0x1000), "nothing left there");
        assert_eq!(t.lookup(0x17ff).map(|x| x.iova), Some(0x1000));
        assert_eq!(t.lookup(0x1800), None);
        assert!(t.invalidate(0, u64::MAX), "everything");
        assert!(t.is_empty());
    }

    #[test]
    fn refuses_bad_updates() {
        let t = Iotlb::new();
        assert_eq!(t.update(m(0, 0, 0, 3)), Err(Refused::BadRange));
        assert_eq!(t.update(m(u64::MAX - 1, 2, 0, 3)), Err(Refused::BadRange));
        assert_eq!(t.update(m(0, 2, u64::MAX, 3)), Err(Refused::BadRange));
        assert_eq!(t.update(m(0, 2, 0, 0)), Err(Refused::BadPerm));
        assert_eq!(t.update(m(0, 2, 0, 4)), Err(Refused::BadPerm));
        assert!(t.is_empty());
    }

    #[test]
    fn table_is_bounded() {
        let t = Iotlb::new();
        for i in 0..MAX_ENTRIES as u64 {
            t.update(m(i * 0x1000, 0x1000, i * 0x1000, 3)).unwrap();
        }
        assert_eq!(t.update(m(u64::MAX / 2, 0x1000, 0, 3)), Err(Refused::Full));
        // Replacing an existing mapping is still possible.
        assert_eq!(t.update(m(0, 0x1000, 0x5000, 1)), Ok(true));
        assert_eq!(t.len(), MAX_ENTRIES);
    }

    #[test]
    fn a_refused_update_changes_nothing_and_splits_stay_bounded() {
        let t = Iotlb::with_capacity(3);
        t.update(m(0x0000, 0x3000, 0x10_0000, 3)).unwrap();
        t.update(m(0x8000, 0x1000, 0x20_0000, 3)).unwrap();
        t.update(m(0xa000, 0x1000, 0x30_0000, 3)).unwrap();
        let before = t.mappings();
        // Replacing the middle of the first mapping would make four.
        assert_eq!(t.update(m(0x1000, 0x800, 0x40_0000, 1)), Err(Refused::Full));
        assert_eq!(t.mappings(), before, "a refused update leaves the table as it was");
        // A hole in the first mapping: its tail goes too, to stay within three.
        assert!(t.invalidate(0x1000, 0x800));
        assert_eq!(t.len(), 3);
        assert_eq!(t.mappings()[0], m(0x0000, 0x1000, 0x10_0000, 3));
        assert_eq!(t.lookup(0x2000), None, "the split-off tail was withdrawn too");
        // With room, a hole keeps both sides.
        assert!(t.invalidate(0xa000, 0x1000));
        t.update(m(0x0000, 0x3000, 0x10_0000, 3)).unwrap();
        assert!(t.invalidate(0x1000, 0x800));
        assert_eq!(t.len(), 3);
        assert_eq!(t.lookup(0x2000).map(|x| x.uaddr), Some(0x10_1800));
    }

    proptest::proptest! {
        /// Random updates and invalidations over a small IOVA space against a model that
        /// knows each byte's translation: the table never exceeds its capacity, never
        /// holds overlapping mappings, never gives a translation the model does not
        /// have (a withdrawn or replaced one never survives), holds every accepted
        /// update whole, and a refused update changes nothing.
        #[test]
        fn table_agrees_with_a_byte_model(
            cap in 1usize..6,
            ops in proptest::collection::vec((proptest::bool::ANY, 0u64..64, 1u64..24, 0u64..1000, 1u8..4), 1..60),
        ) {
            let t = Iotlb::with_capacity(cap);
            let mut model: Vec<Option<(u64, u8)>> = vec![None; 96];
            for (is_update, iova, size, uaddr, perm) in ops {
                if is_update {
                    let before = t.mappings();
                    match t.update(m(iova, size, uaddr, perm)) {
                        Ok(_) => {
                            for a in iova..iova + size {
                                model[a as usize] = Some((uaddr + a - iova, perm));
                            }
                        }
                        Err(e) => {
                            proptest::prop_assert_eq!(e, Refused::Full);
                            proptest::prop_assert_eq!(t.mappings(), before);
                        }
                    }
                } else {
                    t.invalidate(iova, size);
                    for a in iova..iova + size {
                        model[a as usize] = None;
                    }
                }
                let maps = t.mappings();
                proptest::prop_assert!(maps.len() <= cap);
                for w in maps.windows(2) {
                    proptest::prop_assert!(w[0].end() <= w[1].iova);
                }
                for (a, want) in model.iter().enumerate() {
                    let got = t.lookup(a as u64).map(|x| (x.uaddr + a as u64 - x.iova, x.perm));
                    if got.is_some() {
                        proptest::prop_assert_eq!(got, *want, "iova {}", a);
                    }
                }
                if is_update {
                    // The update just accepted (if it was) is there whole.
                    if let Some(x) = t.lookup(iova).filter(|x| x.iova == iova && x.size == size) {
                        proptest::prop_assert_eq!((x.uaddr, x.perm), (uaddr, perm));
                    }
                }
            }
        }
    }

    fn memory() -> GuestMemory {
        // Two regions, adjacent in front-end address space, 0x2000 bytes each.
        let regions = [
            RegionDesc { gpa: 0, len: 0x2000, uva: 0x7000_0000, mmap_offset: 0 },
            RegionDesc { gpa: 0x2000, len: 0x2000, uva: 0x7000_2000, mmap_offset: 0 },
        ];
        GuestMemory::map(&regions, vec![memfd(0x2000), memfd(0x2000)]).unwrap()
    }

    #[test]
    fn view_translates_checks_permissions_and_clips_to_regions() {
        let mem = memory();
        let t = Iotlb::new();
        // IOVA 0x10_0000.. maps the whole 0x4000 bytes (both regions), read-only.
        t.update(m(0x10_0000, 0x4000, 0x7000_0000, ACCESS_READ)).unwrap();
        // IOVA 0x20_0000 maps 0x100 bytes of the second region, write-only.
        t.update(m(0x20_0000, 0x100, 0x7000_3000, ACCESS_WRITE)).unwrap();
        // IOVA 0x30_0000 maps memory the front-end never shared.
        t.update(m(0x30_0000, 0x1000, 0x9000_0000, 3)).unwrap();
        let mut v = IovaView::new(t.clone());
        let (p, n) = v.translate(&mem, 0x10_1000, 0x2000, false).unwrap();
        assert_eq!(n, 0x1000, "stops at the end of the first region");
        assert_eq!(Some(p), mem.uva_to_host(0x7000_1000, 1));
        let (p2, n2) = v.translate(&mem, 0x10_2000, 0x10, false).unwrap();
        assert_eq!((Some(p2), n2), (mem.uva_to_host(0x7000_2000, 1), 0x10));
        assert_eq!(v.translate(&mem, 0x10_0000, 4, true), Err(Fault::Denied { iova: 0x10_0000 }));
        assert_eq!(v.translate(&mem, 0x20_0000, 4, false), Err(Fault::Denied { iova: 0x20_0000 }));
        assert!(v.translate(&mem, 0x20_00f0, 0x100, true).is_ok_and(|(_, n)| n == 0x10));
        assert_eq!(v.translate(&mem, 0x20_0100, 4, true), Err(Fault::Miss { iova: 0x20_0100 }));
        assert_eq!(v.translate(&mem, 0x30_0000, 4, true), Err(Fault::Denied { iova: 0x30_0000 }));
        // Across the region boundary the pieces are not adjacent in this process.
        assert_eq!(v.translate_whole(&mem, 0x10_1ff0, 0x20, false), Err(Fault::Denied { iova: 0x10_2000 }));
        assert!(v.translate_whole(&mem, 0x10_1000, 0x1000, false).is_ok());
        // A fresh view sees an update made after the first one was built.
        t.update(m(0x20_0100, 0x100, 0x7000_3100, ACCESS_WRITE)).unwrap();
        assert!(v.translate(&mem, 0x20_0100, 4, true).is_ok());
    }

    #[test]
    fn adjacent_mappings_form_one_contiguous_range() {
        let mem = memory();
        let t = Iotlb::new();
        t.update(m(0x1000, 0x800, 0x7000_0000, 3)).unwrap();
        t.update(m(0x1800, 0x800, 0x7000_0800, 3)).unwrap();
        let mut v = IovaView::new(t);
        assert_eq!(v.translate_whole(&mem, 0x1400, 0x800, true).ok(), mem.uva_to_host(0x7000_0400, 0x800));
        assert_eq!(v.translate_whole(&mem, 0x1400, 0x1000, true), Err(Fault::Miss { iova: 0x2000 }));
    }
}
