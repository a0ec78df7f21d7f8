//! The crate's one error type.
//!
//! Owns: every error the backend's library API returns (configuration, socket setup,
//! memory mapping, workers). Guest misbehaviour on a running queue is not an `Error`:
//! it is a `RingFault` (`split_ring`, internal) that marks that queue broken and is counted.

use std::io;
use std::path::PathBuf;

/// Errors of the host backend library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command-line or API configuration value is unusable.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The vhost-user socket could not be created or connected.
    #[error("socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// The front-end's memory table is unusable (overlapping, empty, overflowing regions,
    /// or a mapping that failed).
    #[error("memory table: {0}")]
    Memory(String),
    /// A worker thread could not be started or pinned.
    #[error("worker: {0}")]
    Worker(String),
    /// A tap device could not be created, attached or configured.
    #[error("tap {ifname}: {msg}")]
    Tap {
        /// The interface name.
        ifname: String,
        /// What went wrong, in one line.
        msg: String,
    },
    /// An AF_PACKET socket could not be opened, bound or given its rings.
    #[error("afpacket {ifname}: {msg}")]
    AfPacket {
        /// The interface name.
        ifname: String,
        /// What went wrong, in one line.
        msg: String,
    },
    /// Any other I/O failure, with context.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// What went wrong.
        source: io::Error,
    },
}

impl Error {
    /// An I/O error with what we were doing.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io { context: context.into(), source }
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
