//! Setting a packed ring up at activation: the translation and validation of its three
//! areas (virtio 1.2 §2.8: descriptor ring; §2.8.10: driver and device event
//! suppression) and
//! of the ring base.
//!
//! Owns: [`PackedRing::new`], the one place the ring's area pointers are made; every
//! check the ring's accessors rely on (size 1..=32768, any value: §2.8 does not ask for a
//! power of two; alignment; each area inside guest memory; the base offset inside the
//! ring) is made here. Must not: walk chains or publish used descriptors.

use std::sync::Arc;

use spec::packed;
use spec::prefetch::WritePrefetch;

use super::{ChainAt, PackedRing, IDS, MAX_BURST};
use crate::iotlb::{Iotlb, IovaView};
use crate::memory::GuestMemory;
use crate::split_ring::{translate_areas, RingConfig, RingFault};

impl PackedRing {
    /// Translates and validates the ring areas and builds the ring, resuming at
    /// `cfg.base` (bits 0..15: the next available offset; bit 15: the avail wrap
    /// counter, vhost-user's convention for packed rings) with every earlier buffer
    /// already used: the used position and wrap counter start equal to the avail ones.
    /// `cfg.avail_uva` is the driver area, `cfg.used_uva` the device area (vhost-user's
    /// `SET_VRING_ADDR` fields for a packed ring). `call_fd` is the driver's call eventfd;
    /// with `iotlb` (`ACCESS_PLATFORM`) every address is an IOVA.
    pub fn new(
        cfg: &RingConfig,
        mem: Arc<GuestMemory>,
        call_fd: Option<i32>,
        iotlb: Option<Arc<Iotlb>>,
    ) -> Result<Self, RingFault> {
        let size = cfg.size;
        if size == 0 || size > packed::MAX_QUEUE_SIZE {
            return Err(RingFault::RingAddress);
        }
        let (pos, wrap) = (cfg.base & 0x7fff, cfg.base & 0x8000 != 0);
        if pos >= size {
            return Err(RingFault::BadBase { base: cfg.base });
        }
        if cfg.desc_uva % packed::DESC_ALIGN != 0
            || cfg.avail_uva % packed::EVENT_ALIGN != 0
            || cfg.used_uva % packed::EVENT_ALIGN != 0
        {
            return Err(RingFault::RingAddress);
        }
        // The device writes used descriptors into the descriptor ring and its own event
        // suppression; it only reads the driver's.
        let areas = [
            (cfg.desc_uva, packed::desc_ring_bytes(size) as u64, true),
            (cfg.avail_uva, packed::EVENT_SIZE as u64, false),
            (cfg.used_uva, packed::EVENT_SIZE as u64, true),
        ];
        let mut view = iotlb.map(IovaView::new);
        let host = translate_areas(&mem, view.as_mut(), &areas)?;
        let [desc, driver, device] = host;
        let mut ring = PackedRing {
            desc,
            driver,
            device,
            size,
            avail_pos: pos,
            avail_wrap: wrap,
            used_pos: pos,
            used_wrap: wrap,
            signalled: pos,
            found: 0,
            chains: [ChainAt::default(); MAX_BURST],
            seen_pos: pos,
            seen_wrap: wrap,
            found_in: vec![0u16; IDS].into_boxed_slice(),
            burst: 0,
            id_fault: None,
            pending: 0,
            first_pos: 0,
            first_flags: 0,
            in_order: cfg.in_order,
            run_pos: None,
            run_id: 0,
            run_skip: 0,
            event_idx: cfg.event_idx,
            indirect: cfg.indirect,
            mem,
            hint: 0,
            iova: view,
            notify_fd: call_fd,
            write_prefetch: WritePrefetch::detect(),
            calls: 0,
        };
        ring.set_kicks(false);
        Ok(ring)
    }
}
