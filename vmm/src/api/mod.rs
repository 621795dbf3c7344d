//! The control API: HTTP/1.1 with JSON bodies on a Unix socket, shaped like Firecracker's
//! (`GET` to observe, `PATCH` to change a running VM, `PUT` for actions, errors as
//! `{"fault_message": "..."}`), so that `curl --unix-socket PATH http://localhost/balloon` works.
//!
//! hyper serves it on a single-threaded tokio runtime in one thread of its own, with bounds a
//! slow or hostile client cannot get around: at most [`MAX_CONNECTIONS`] served at once (the
//! rest wait in the listen queue), [`HEADER_TIMEOUT`] to send a request head, [`BODY_TIMEOUT`]
//! and [`MAX_BODY`] for its body, [`CONNECTION_TIMEOUT`] for a whole connection. The API knows the
//! VM only through [`Control`]; no request can stop the VM but the shutdown action.

pub mod client;
mod routes;
mod server;
mod types;

use std::time::Duration;

pub use server::ApiServer;
pub use types::{ActionRequest, BalloonPatch, BalloonStatistics, BalloonView, NodeBalloon, SwapPatch};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Longest request body, in bytes.
pub const MAX_BODY: usize = 16 << 10;
/// Time a client has to send a request's head...
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// ...and its body.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of one connection.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("--api-socket {0}: a VMM is already listening there")]
    InUse(std::path::PathBuf),
    #[error("--api-socket {0}: the path exists and is not a socket")]
    NotASocket(std::path::PathBuf),
    #[error("--api-socket {path}: cannot listen there")]
    Bind {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the API thread")]
    Thread(#[source] std::io::Error),
}

/// What the API can ask of the VM.
pub trait Control: Send + Sync + 'static {
    /// `GET /vm`: state, configuration, uptime.
    fn vm(&self) -> serde_json::Value;
    /// `GET /stats`: the stats JSON, live.
    fn stats(&self) -> serde_json::Value;
    /// `GET /balloon`.
    fn balloon(&self) -> BalloonView;
    /// `PATCH /balloon`: `Err` is a message for a 400.
    fn set_balloon(&self, patch: BalloonPatch) -> Result<(), String>;
    /// `GET /balloon/statistics`.
    fn balloon_statistics(&self) -> BalloonStatistics;
    /// `PUT /actions` `{"action_type": "Shutdown"}`.
    fn shutdown(&self);
    /// `GET /swap`: state and figures (`{"enabled": false}` when swap is off).
    fn swap(&self) -> serde_json::Value;
    /// `PATCH /swap`: `Err` is a message for a 400.
    fn set_swap(&self, patch: SwapPatch) -> Result<(), String>;
    /// `PUT /swap/out` (`out`) or `PUT /swap/in`: `Err` is a message for a 400.
    fn swap_action(&self, out: bool) -> Result<(), String>;
}
