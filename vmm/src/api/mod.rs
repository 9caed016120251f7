//! The control socket: an HTTP/1.1 JSON API on a Unix socket, in the style
//! of Firecracker's and Cloud Hypervisor's, so
//! `curl --unix-socket PATH http://localhost/vm` works and the `patcher`
//! CLI is just one client. It runs on its own tokio runtime thread; every
//! operation that touches the VM runs on a blocking worker, because pausing
//! waits on vCPU threads.
//!
//! Routes are in [`routes::route_table`] (the one list the router and the
//! OpenAPI test share) and documented in `vmm/api/openapi.yaml`.
//!
//! Limits (also in the OpenAPI document): request bodies of at most
//! [`MAX_BODY_BYTES`]; at most [`MAX_CONNECTIONS`] connections at once, any
//! beyond are answered 503 at once and closed (not queued); a client must
//! send a request's headers within [`HEADER_TIMEOUT`] (idle keep-alive
//! connections are closed after that too) and its body within
//! [`BODY_TIMEOUT`]; a request is answered within [`REQUEST_TIMEOUT`] or
//! gets 503; a client that stops reading its response for
//! [`WRITE_STALL_TIMEOUT`] is disconnected.

mod error;
mod handlers;
pub mod head;
mod io;
mod peer;
pub mod routes;
mod server;

use std::time::Duration;

pub use error::HttpError;
pub use server::{ApiError, ApiServer};

/// Largest request body accepted (413 beyond).
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Connections served at once (503 beyond).
pub const MAX_CONNECTIONS: usize = 64;
/// Time allowed for a request's headers, and for an idle keep-alive
/// connection to start its next request.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for a request's body (408 beyond).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed for producing a response (503 beyond).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a response write may make no progress before the client is
/// dropped.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(10);
