//! A device's side of the IOTLB protocol (vhost-user §"IOMMU support"): misses sent to
//! the front-end and the updates and invalidations it sends back.
//!
//! Owns: asking for a translation a ring misses (and giving up after `MISS_TIMEOUT`),
//! applying `IOTLB_MSG` requests to the device's IOTLB and counting both.
//! Must not: translate addresses (the rings do, through `IovaView`) or touch ring memory.

use super::*;

impl Device {
    /// Asks the front-end for the translation of `iova` on the backend channel (logged
    /// once if there is none: a front-end that negotiated ACCESS_PLATFORM without
    /// BACKEND_REQ can never fill a miss).
    pub(super) fn send_miss(&self, iova: u64, write: bool) {
        let mut chan = self.backend_channel.lock().unwrap_or_else(|e| e.into_inner());
        let res = match chan.as_ref() {
            Some(c) => c.send_miss(iova, write),
            None => Err(std::io::Error::new(std::io::ErrorKind::NotConnected, "no backend channel")),
        };
        if res.as_ref().is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock) {
            // A failed or partial write leaves the channel out of step: stop using it.
            *chan = None;
        }
        drop(chan);
        match res {
            // Relaxed: a statistics counter.
            Ok(()) => {
                self.iotlb_stats.misses.fetch_add(1, Ordering::Relaxed);
                debug!("{}: IOTLB miss {iova:#x} ({})", self.params.socket.display(), rw(write));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {} // asked again later
            Err(e) => {
                if !self.logged_iotlb.swap(true, Ordering::Relaxed) {
                    warn!("{}: cannot send IOTLB miss for {iova:#x}: {e}", self.params.socket.display());
                }
            }
        }
    }

    /// A ring's chain needs a translation the IOTLB lacks. Asks the front-end (again
    /// every [`MISS_RESEND`]) and returns `true` while the ring should wait and retry
    /// that chain; `false` once the address stayed untranslated for [`MISS_TIMEOUT`]
    /// (counted: the caller breaks the queue, as for any other bad address).
    pub fn iotlb_miss(&self, pending: &mut Option<PendingMiss>, iova: u64, write: bool) -> bool {
        let now = Instant::now();
        match pending {
            Some(p) if p.iova == iova => {
                if now.duration_since(p.since) >= MISS_TIMEOUT {
                    *pending = None;
                    // Relaxed: a statistics counter.
                    self.iotlb_stats.timeouts.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        "{}: no IOTLB translation for {iova:#x} ({}) after {MISS_TIMEOUT:?}",
                        self.params.socket.display(),
                        rw(write)
                    );
                    return false;
                }
                if now.duration_since(p.asked) < MISS_RESEND {
                    return true;
                }
                p.asked = now;
            }
            _ => *pending = Some(PendingMiss { iova, since: now, asked: now }),
        }
        self.iotlb_waiting.store(true, Ordering::Relaxed);
        self.send_miss(iova, write);
        true
    }

    /// Serves one IOTLB-protocol request whose header `hdr` was peeked on `sock` (see
    /// `iotlb_channel.rs`). An update takes effect for the next lookup; an
    /// invalidation is acknowledged only after every worker has dropped its cached
    /// translations (a resync). An error closes the connection.
    pub fn handle_iotlb_request(&self, sock: &UnixStream, hdr: &Header) -> Result<(), ChannelError> {
        let ok = match iotlb_channel::read_request(sock, hdr)? {
            Request::BackendChannel(s) => match super::fds::socket(s.as_raw_fd()) {
                Ok(()) => {
                    *self.backend_channel.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(BackendChannel::new(s)?);
                    debug!("{}: backend channel set", self.params.socket.display());
                    true
                }
                Err(why) => {
                    warn!("{}: SET_BACKEND_REQ_FD refused: {why}", self.params.socket.display());
                    // Relaxed: a statistics counter.
                    self.peer.fds_refused.fetch_add(1, Ordering::Relaxed);
                    false
                }
            },
            Request::Iotlb(m) => {
                let st = self.lock();
                let (platform, tlb) = (st.acked(f::ACCESS_PLATFORM), st.iotlb.clone());
                drop(st);
                let res = match m.kind {
                    _ if !platform => Err("VIRTIO_F_ACCESS_PLATFORM is not negotiated".to_string()),
                    MSG_UPDATE => tlb.update(m.mapping()).map_err(|e| e.to_string()).map(|replaced| {
                        // Relaxed: a statistics counter.
                        self.iotlb_stats.updates.fetch_add(1, Ordering::Relaxed);
                        // A replaced mapping may sit in a worker's cache with its old
                        // permission or target: resync as for an invalidation. A waiting
                        // ring retries (and its worker wakes) through the resync too.
                        if self.iotlb_waiting.swap(false, Ordering::Relaxed) || replaced {
                            self.resync();
                        }
                    }),
                    MSG_INVALIDATE => {
                        self.iotlb_stats.invalidates.fetch_add(1, Ordering::Relaxed);
                        if tlb.invalidate(m.iova, m.size) && !self.resync() {
                            // A worker may still hold the old translation: never
                            // acknowledge; the device stops instead.
                            self.break_all(RingFault::NotQuiescent);
                            Err("a worker did not drop the old translation in time; device stopped"
                                .to_string())
                        } else {
                            Ok(())
                        }
                    }
                    other => Err(format!("IOTLB message type {other} is not served")),
                };
                match res {
                    Ok(()) => true,
                    Err(why) => {
                        self.iotlb_stats.refused.fetch_add(1, Ordering::Relaxed);
                        warn!(
                            "{}: IOTLB message refused ({why}): iova {:#x} size {:#x} uaddr {:#x} perm {}",
                            self.params.socket.display(),
                            m.iova,
                            m.size,
                            m.uaddr,
                            m.perm
                        );
                        false
                    }
                }
            }
        };
        if hdr.need_reply() {
            iotlb_channel::reply(sock, hdr, ok)?;
        }
        Ok(())
    }
}

/// "read" or "write", for the log.
fn rw(write: bool) -> &'static str {
    if write {
        "write"
    } else {
        "read"
    }
}
