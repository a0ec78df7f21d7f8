//! The vhost-user request handler of one device: every front-end message that configures
//! it (features, memory table, rings, eventfds, enable/disable, config space).
//!
//! Owns: the translation of vhost-user messages into changes of the device's state, each
//! applied under the device's lock and followed by the workers' resync (see the parent
//! module). Must not: touch ring memory or hold the lock while waiting for workers.

use super::*;

/// The vhost-user request handler of one device (interior mutability; the `vhost`
/// crate's `BackendReqHandler` calls it from the device's control thread).
pub struct Handler(pub Arc<Device>);

/// The eventfd in `file`, validated and non-blocking (see `fds.rs`); a refusal is
/// logged and counted (`peer.fds_refused`) and ends the connection (as every refused
/// request does, after the error reply).
fn eventfd_from(dev: &Device, what: &str, index: u8, file: Option<File>) -> VuResult<Option<Arc<EventFd>>> {
    let Some(file) = file else { return Ok(None) };
    match fds::eventfd(file) {
        Ok(e) => Ok(Some(Arc::new(e))),
        Err(why) => {
            warn!("{}: {what} {index} refused: {why}", dev.params.socket.display());
            // Relaxed: a statistics counter.
            dev.peer.fds_refused.fetch_add(1, Ordering::Relaxed);
            Err(VuError::InvalidParam)
        }
    }
}

impl VhostUserBackendReqHandler for Handler {
    fn set_owner(&self) -> VuResult<()> {
        Ok(())
    }
    fn reset_owner(&self) -> VuResult<()> {
        self.0.disconnect();
        self.0.connect();
        Ok(())
    }
    fn reset_device(&self) -> VuResult<()> {
        self.reset_owner()
    }
    fn get_features(&self) -> VuResult<u64> {
        Ok(offered_features(&self.0.params))
    }
    fn set_features(&self, features: u64) -> VuResult<()> {
        let offered = offered_features(&self.0.params);
        log::debug!("{}: SET_FEATURES {features:#x}", self.0.params.socket.display());
        if features & !offered != 0 {
            warn!(
                "{}: front-end acked features {:#x} we did not offer",
                self.0.params.socket.display(),
                features & !offered
            );
            return Err(VuError::InvalidParam);
        }
        {
            let mut st = self.0.lock();
            if st.acked_features != features {
                let rings = if features & f::bit(f::RING_PACKED) != 0 { "packed" } else { "split" };
                info!("{}: features {features:#x} acked ({rings} rings)", self.0.params.socket.display());
                // Feature-derived defaults (§5.1.6.5): empty VLAN table with CTRL_VLAN,
                // every negotiated guest offload on, one pair with CTRL_VQ and MQ (the
                // driver enables more with VQ_PAIRS_SET); without CTRL_VQ every pair
                // carries traffic and SET_VRING_ENABLE decides (QEMU, DPDK).
                st.acked_features = features;
                st.rx = Arc::new(RxConfig::reset(st.rx.mac, features));
                st.active_pairs = if st.acked(f::NET_CTRL_VQ) && st.acked(f::NET_MQ) {
                    1
                } else {
                    self.0.params.queue_pairs
                };
            }
        }
        self.0.resync();
        Ok(())
    }
    fn set_mem_table(
        &self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<vhost::VhostUserMemoryRegionBase>>> {
        let regions: Vec<RegionDesc> = ctx
            .iter()
            .map(|r| RegionDesc {
                gpa: r.guest_phys_addr,
                len: r.memory_size,
                uva: r.user_addr,
                mmap_offset: r.mmap_offset,
            })
            .collect();
        let mem = GuestMemory::map(&regions, files).map_err(|e| {
            // Refused: the previous table (if any) stays in effect.
            warn!("{}: SET_MEM_TABLE refused: {e}", self.0.params.socket.display());
            // Relaxed: a statistics counter.
            self.0.peer.mem_table_refused.fetch_add(1, Ordering::Relaxed);
            VuError::InvalidParam
        })?;
        info!("{}: memory table with {} region(s)", self.0.params.socket.display(), mem.region_count());
        self.0.lock().mem = Some(Arc::new(mem));
        self.0.resync();
        Ok(None)
    }
    fn set_vring_num(&self, index: u32, num: u32) -> VuResult<()> {
        // A split ring's size is a power of two (§2.7); a packed ring's is any size up to
        // 2^15 (§2.8). Features come before ring sizes (QEMU, DPDK).
        let packed = self.0.lock().acked(f::RING_PACKED);
        if num == 0 || num > spec::layout::MAX_QUEUE_SIZE as u32 || (!packed && !num.is_power_of_two()) {
            return Err(VuError::InvalidParam);
        }
        self.0.change_queue(index, |q| {
            q.size = num as u16;
            Ok(())
        })
    }
    fn set_vring_addr(
        &self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        log::debug!(
            "{}: SET_VRING_ADDR {index} desc {descriptor:#x} used {used:#x} avail {available:#x}",
            self.0.params.socket.display()
        );
        self.0.change_queue(index, |q| {
            q.desc = descriptor;
            q.used = used;
            q.avail = available;
            q.addr_set = true;
            q.broken = false;
            Ok(())
        })
    }
    fn set_vring_base(&self, index: u32, base: u32) -> VuResult<()> {
        // A packed ring's base is two halves (vhost-user "Ring states"): bits 0..16 the
        // last avail index and its wrap counter, bits 16..32 the used ones. QEMU sends
        // both (0x8000_8000 on a fresh ring), DPDK's virtio-user only the avail half. The
        // ring resumes with every earlier buffer used (`PackedRing::new`), so the avail
        // half is the whole position and the used half is not read (as DPDK's vhost
        // library does). A split ring's base is one 16-bit index.
        let base = if self.0.lock().acked(f::RING_PACKED) {
            base as u16
        } else {
            u16::try_from(base).map_err(|_| VuError::InvalidParam)?
        };
        self.0.change_queue(index, |q| {
            q.base = base;
            q.broken = false;
            Ok(())
        })
    }
    fn get_vring_base(&self, index: u32) -> VuResult<VhostUserVringState> {
        log::debug!("{}: GET_VRING_BASE {index}", self.0.params.socket.display());
        // Stops the ring (vhost-user: "the back-end must stop the ring"); the pause in
        // `change_queue` makes the worker write its final position back first.
        let q = self.0.change_queue_at(index, |q| {
            q.started = false;
            Ok(())
        })?;
        let st = self.0.lock();
        let base = st.queues[q].base as u32;
        // Packed: the used half equals the avail half, every buffer taken having been
        // used when the ring stopped (QEMU restores both halves from this answer).
        let base = if st.acked(f::RING_PACKED) { base | base << 16 } else { base };
        Ok(VhostUserVringState::new(index, base))
    }
    fn set_vring_kick(&self, index: u8, fd: Option<File>) -> VuResult<()> {
        log::debug!("{}: SET_VRING_KICK {index} (fd: {})", self.0.params.socket.display(), fd.is_some());
        let kick = eventfd_from(&self.0, "SET_VRING_KICK", index, fd)?;
        self.0.change_queue(index as u32, |q| {
            q.kick = kick;
            q.started = true;
            Ok(())
        })
    }
    fn set_vring_call(&self, index: u8, fd: Option<File>) -> VuResult<()> {
        let call = eventfd_from(&self.0, "SET_VRING_CALL", index, fd)?;
        self.0.change_queue(index as u32, |q| {
            q.call = call;
            Ok(())
        })
    }
    fn set_vring_err(&self, index: u8, fd: Option<File>) -> VuResult<()> {
        let err = eventfd_from(&self.0, "SET_VRING_ERR", index, fd)?;
        self.0.change_queue(index as u32, |q| {
            q.err = err;
            Ok(())
        })
    }
    fn get_protocol_features(&self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(offered_protocol_features(&self.0.params))
    }
    fn set_protocol_features(&self, features: u64) -> VuResult<()> {
        self.0.lock().acked_protocol = features;
        Ok(())
    }
    fn get_queue_num(&self) -> VuResult<u64> {
        // For virtio-net, QEMU and DPDK read this as the number of queue pairs.
        Ok(self.0.params.queue_pairs as u64)
    }
    fn set_vring_enable(&self, index: u32, enable: bool) -> VuResult<()> {
        log::debug!("{}: SET_VRING_ENABLE {index} {enable}", self.0.params.socket.display());
        // Enabling a ring that runs already (started by its kick fd, never disabled: the
        // order DPDK's virtio-user, QEMU and our driver use) changes nothing a worker
        // sees, so it is recorded without pausing the ring: a pause would stop, for one
        // resync, the receive ring a `reflect` or `xconnect` path forwards into, and the
        // frames taken meanwhile would be dropped as `peer_down`.
        if enable && self.0.enable_running_queue(index) {
            return Ok(());
        }
        self.0.change_queue(index, |q| {
            q.enabled = Some(enable);
            Ok(())
        })
    }
    fn get_config(&self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        let cfg = self.0.config_space();
        let end = offset.checked_add(size).ok_or(VuError::InvalidParam)? as usize;
        cfg.get(offset as usize..end).map(|s| s.to_vec()).ok_or(VuError::InvalidParam)
    }
    fn set_config(&self, _offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> VuResult<()> {
        Err(VuError::InvalidOperation("virtio-net config space is read-only"))
    }
    fn set_gpu_socket(&self, _gpu_backend: vhost::vhost_user::GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not a GPU device"))
    }
    fn get_shared_object(&self, _uuid: vhost::vhost_user::message::VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation("no shared objects"))
    }
    fn get_inflight_fd(
        &self,
        _inflight: &vhost::vhost_user::message::VhostUserInflight,
    ) -> VuResult<(vhost::vhost_user::message::VhostUserInflight, File)> {
        Err(VuError::InvalidOperation("inflight tracking not offered"))
    }
    fn set_inflight_fd(
        &self,
        _inflight: &vhost::vhost_user::message::VhostUserInflight,
        _file: File,
    ) -> VuResult<()> {
        Err(VuError::InvalidOperation("inflight tracking not offered"))
    }
    fn get_max_mem_slots(&self) -> VuResult<u64> {
        Err(VuError::InvalidOperation("CONFIGURE_MEM_SLOTS not offered"))
    }
    fn add_mem_region(
        &self,
        _region: &vhost::vhost_user::message::VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<vhost::VhostUserMemoryRegionBase>> {
        Err(VuError::InvalidOperation("CONFIGURE_MEM_SLOTS not offered"))
    }
    fn remove_mem_region(
        &self,
        _region: &vhost::vhost_user::message::VhostUserSingleMemoryRegion,
    ) -> VuResult<()> {
        Err(VuError::InvalidOperation("CONFIGURE_MEM_SLOTS not offered"))
    }
    fn set_device_state_fd(
        &self,
        _direction: vhost::vhost_user::message::VhostTransferStateDirection,
        _phase: vhost::vhost_user::message::VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(VuError::InvalidOperation("device state transfer not offered"))
    }
    fn check_device_state(&self) -> VuResult<()> {
        Err(VuError::InvalidOperation("device state transfer not offered"))
    }
    fn get_shmem_config(&self) -> VuResult<vhost::vhost_user::message::VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("no shared memory regions"))
    }
    fn set_log_base(&self, _log: &vhost::vhost_user::message::VhostUserLog, _file: File) -> VuResult<()> {
        Err(VuError::InvalidOperation("dirty logging not offered"))
    }
}
