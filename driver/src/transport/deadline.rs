//! A bound on how long one request to a vhost-user back-end may take.
//!
//! Owns: one watchdog thread per connection, which shuts the connection's socket down
//! when a request it was armed for is still waiting at its deadline; the blocked read
//! (or write) inside the `vhost` crate then returns, and the request fails. Must not:
//! read or write the socket, or know the protocol (the transport arms and disarms it
//! around each request and turns a fired deadline into its error).
//!
//! Why a thread and not a socket timeout: the `vhost` crate retries a read that fails
//! with `EAGAIN` (what `SO_RCVTIMEO` produces) in a loop, so a timeout on the socket
//! would turn a silent back-end into a busy loop instead of an error; and its requests
//! give no other way in. A shut-down socket ends the read with end-of-file at once.
//! The thread sleeps on a condition variable and costs nothing between requests; it is
//! control path only (the data path never talks to the socket).

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    /// The deadline of the request in progress.
    armed: Option<Instant>,
    /// The deadline passed and the socket was shut down.
    fired: bool,
    /// The connection is going away: the thread ends.
    stop: bool,
}

/// The watchdog of one connection (see the module comment).
pub(crate) struct Deadline {
    shared: Arc<(Mutex<State>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    limit: Duration,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    // The state is a few plain values, consistent after every write.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Deadline {
    /// Watches `sock` (a handle on the connection's socket): a request may take up to
    /// `limit`.
    pub(crate) fn new(sock: UnixStream, limit: Duration) -> std::io::Result<Deadline> {
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let s2 = shared.clone();
        let thread = std::thread::Builder::new().name("vnet-vu-deadline".into()).spawn(move || {
            let (m, cv) = &*s2;
            let mut st = lock(m);
            loop {
                if st.stop {
                    return;
                }
                st = match st.armed {
                    None => cv.wait(st).unwrap_or_else(|e| e.into_inner()),
                    Some(t) => {
                        let now = Instant::now();
                        if now >= t {
                            // Ends the blocked request (and every later one) with an error.
                            let _ = sock.shutdown(Shutdown::Both);
                            st.fired = true;
                            st.armed = None;
                            continue;
                        }
                        cv.wait_timeout(st, t - now).unwrap_or_else(|e| e.into_inner()).0
                    }
                };
            }
        })?;
        Ok(Deadline { shared, thread: Some(thread), limit })
    }

    /// The bound on one request.
    pub(crate) fn limit(&self) -> Duration {
        self.limit
    }

    /// Runs `f` (one request) under a deadline of `limit` (the connection's
    /// [`limit`](Self::limit), or a heartbeat's, shorter). Returns its result and whether
    /// the deadline fired (then the connection is shut down, whatever `f` returned).
    pub(crate) fn run_within<T>(&self, limit: Duration, f: impl FnOnce() -> T) -> (T, bool) {
        let (m, cv) = &*self.shared;
        {
            let mut st = lock(m);
            if !st.fired {
                st.armed = Some(Instant::now() + limit);
            }
        }
        cv.notify_one();
        let r = f();
        let mut st = lock(m);
        st.armed = None;
        (r, st.fired)
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        let (m, cv) = &*self.shared;
        lock(m).stop = true;
        cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
