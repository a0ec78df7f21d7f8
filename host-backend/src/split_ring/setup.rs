//! Setting a ring up at activation: its placement as the control plane knows it
//! ([`RingConfig`]), and the translation and validation of its three areas.
//!
//! Owns: [`DeviceRing::new`], the one place the ring's area pointers are made; every
//! check the ring's accessors rely on (size a power of two, alignment, each area inside
//! guest memory) is made here. Must not: walk chains or publish used elements.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use spec::layout;
use spec::prefetch::WritePrefetch;

use super::{iotlb_fault, DeviceRing, RingAreas, RingFault};
use crate::iotlb::{Iotlb, IovaView};
use crate::memory::GuestMemory;

/// How a ring is placed and negotiated, as the control plane knows it.
#[derive(Debug, Clone)]
pub(crate) struct RingConfig {
    /// Queue size (a power of two).
    pub size: u16,
    /// Front-end virtual addresses of the three areas.
    pub desc_uva: u64,
    /// Driver area.
    pub avail_uva: u64,
    /// Device area.
    pub used_uva: u64,
    /// Where to resume (`SET_VRING_BASE`).
    pub base: u16,
    /// `VIRTIO_RING_F_EVENT_IDX` negotiated.
    pub event_idx: bool,
    /// `VIRTIO_RING_F_INDIRECT_DESC` negotiated.
    pub indirect: bool,
    /// `VIRTIO_F_IN_ORDER` negotiated (the packed engine returns runs of transmit
    /// buffers with one used descriptor).
    pub in_order: bool,
}

/// Translates a ring's three areas, each `(address, length, device writes it)`, to host
/// pointers: front-end virtual addresses through the memory table, or IOVAs through
/// `view` when there is an IOTLB. Shared by both ring engines' set-up.
pub(crate) fn translate_areas(
    mem: &GuestMemory,
    mut view: Option<&mut IovaView>,
    areas: &[(u64, u64, bool); 3],
) -> Result<[*mut u8; 3], RingFault> {
    let mut host = [std::ptr::null_mut(); 3];
    for (h, &(addr, len, write)) in host.iter_mut().zip(areas) {
        *h = match view.as_deref_mut() {
            None => mem.uva_to_host(addr, len).ok_or(RingFault::RingAddress)?,
            Some(v) => v
                .translate_whole(mem, addr, len, write)
                .map_err(|f| iotlb_fault(f, write, RingFault::RingAddress))?,
        };
    }
    Ok(host)
}

impl DeviceRing {
    /// Translates and validates the ring areas and builds the ring, resuming at
    /// `cfg.base` with every earlier buffer already used (the vhost-user convention:
    /// the used index starts at the base). `call_fd` is the driver's call eventfd.
    /// With `iotlb` (`ACCESS_PLATFORM` negotiated) the ring and buffer addresses are
    /// IOVAs; a missing translation is [`RingFault::IotlbMiss`].
    pub fn new(
        cfg: &RingConfig,
        mem: Arc<GuestMemory>,
        call_fd: Option<i32>,
        iotlb: Option<Arc<Iotlb>>,
    ) -> Result<Self, RingFault> {
        let size = cfg.size;
        if size == 0 || !size.is_power_of_two() || size > layout::MAX_QUEUE_SIZE {
            return Err(RingFault::RingAddress);
        }
        if cfg.desc_uva % layout::DESC_ALIGN != 0
            || cfg.avail_uva % layout::AVAIL_ALIGN != 0
            || cfg.used_uva % layout::USED_ALIGN != 0
        {
            return Err(RingFault::RingAddress);
        }
        let areas = [
            (cfg.desc_uva, layout::desc_table_bytes(size) as u64, false),
            (cfg.avail_uva, layout::avail_bytes(size) as u64, false),
            (cfg.used_uva, layout::used_bytes(size) as u64, true),
        ];
        let mut view = iotlb.map(IovaView::new);
        let host = translate_areas(&mem, view.as_mut(), &areas)?;
        let [desc, avail, used] = host;
        let mut ring = DeviceRing {
            areas: RingAreas { desc, avail, used },
            size,
            mask: size - 1,
            last_avail: cfg.base,
            used_idx: cfg.base,
            pending_used: 0,
            event_idx: cfg.event_idx,
            indirect: cfg.indirect,
            mem,
            hint: 0,
            iova: view,
            notify_fd: call_fd,
            write_prefetch: WritePrefetch::detect(),
            calls: 0,
            consumed: 0,
            walked_at: vec![0; size as usize].into_boxed_slice(),
        };
        // Publish where we stand, so a driver that restarts reads a consistent used idx.
        ring.used_idx_field().store(cfg.base, Ordering::Release);
        ring.set_kicks(false);
        Ok(ring)
    }
}
