//! Pinning the calling thread to one CPU, shared by the measuring examples (`core_rtt`,
//! `copy_ceiling`, `spsc_ref`): each is one file, and this is the one piece they all need.

/// Pins the calling thread to `cpu`.
pub fn pin(cpu: usize) -> std::io::Result<()> {
    // SAFETY: `set` is a plain C struct initialised by CPU_ZERO/CPU_SET; the call only
    // reads it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
