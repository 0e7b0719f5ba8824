//! One error type for the library: every failure a user can cause says what is wrong
//! and, where we know it, how to fix it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A graph was built with inconsistent shapes or dtypes.
    #[error("{op}: {msg}")]
    Shape { op: String, msg: String },
    /// A configuration key has a wrong value, is unknown, or conflicts with another.
    #[error("config: {0}")]
    Config(String),
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its contents are not what we expect.
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    /// A dataset row or file is malformed.
    #[error("dataset: {0}")]
    Data(String),
    /// A backend could not be created or failed while running.
    #[error("{backend}: {msg}")]
    Backend { backend: &'static str, msg: String },
    /// Anything else, already phrased for the user.
    #[error("{0}")]
    Msg(String),
    /// Another rank of a distributed run stopped first (it failed, exited or aborted the
    /// collective): this rank's failure is a consequence, the cause is in that rank's log.
    #[error("{0}")]
    PeerLost(String),
}

/// The exit status of `ferrotune` when a rank stops only because another rank stopped
/// first, so a launcher can tell the rank that failed first from those that followed.
pub const PEER_LOST_EXIT: i32 = 3;

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The process exit status this error ends `ferrotune` with: [`PEER_LOST_EXIT`] for a
    /// consequence of another rank's failure, 1 for everything else (2 is a command-line
    /// usage error, as clap reports it).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::PeerLost(_) => PEER_LOST_EXIT,
            _ => 1,
        }
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }
    pub fn shape(op: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Shape {
            op: op.into(),
            msg: msg.into(),
        }
    }
    pub fn backend(backend: &'static str, msg: impl Into<String>) -> Self {
        Error::Backend {
            backend,
            msg: msg.into(),
        }
    }
}

/// `bail!(Variant(...))`-free shorthand for a user-facing message.
#[macro_export]
macro_rules! msg {
    ($($t:tt)*) => { $crate::error::Error::Msg(format!($($t)*)) };
}
