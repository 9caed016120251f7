//! The socket and its accept loop: binding safely, one task per
//! connection, the connection cap, peer checks and timeouts.

use std::convert::Infallible;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use thiserror::Error;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use super::error::forbidden;
use super::io::{first_head, Rewind, StallGuard};
use super::peer::{self, Verdict};
use super::routes::router;
use super::{HEADER_TIMEOUT, MAX_CONNECTIONS, WRITE_STALL_TIMEOUT};
use crate::control::Control;
use klpvisor_api::head::looks_like_http1;

/// Why the control socket could not be set up or served.
#[derive(Debug, Error)]
pub enum ApiError {
    /// A live process answers on the socket path.
    #[error("--api-sock {0}: another process is listening on it (another vmm?); pick another path or stop that process")]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("--api-sock {0}: exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// A file-system step on the socket path failed.
    #[error("--api-sock {path}: {what}: {source}")]
    Io {
        /// The `--api-sock` path.
        path: PathBuf,
        /// The step that failed.
        what: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The API thread could not be spawned.
    #[error("cannot start the API thread: {0}")]
    Thread(std::io::Error),
}

/// The bound control socket; the file is removed when this is dropped.
pub struct ApiServer {
    path: PathBuf,
    listener: Option<std::os::unix::net::UnixListener>,
    thread: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Creates the socket at `path` with mode 0600. A leftover socket file
    /// nobody listens on is replaced; a live one, or any other file, is not.
    pub fn bind(path: &Path) -> Result<Self, ApiError> {
        let io = |what: &'static str| {
            let path = path.to_owned();
            move |source| ApiError::Io { path, what, source }
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(_) => return Err(ApiError::InUse(path.to_owned())),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                        tracing::info!("removing stale socket {}", path.display());
                        std::fs::remove_file(path).map_err(io("cannot remove the stale socket"))?;
                    }
                    Err(e) => return Err(io("cannot check whether the socket is in use")(e)),
                }
            }
            Ok(_) => return Err(ApiError::NotASocket(path.to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot inspect the path")(e)),
        }
        // The socket must never exist with looser rights, not even between
        // bind and chmod: create it under a umask that leaves only 0600.
        // SAFETY: umask only swaps the process's file-creation mask; this
        // runs at start-up before any other thread creates files.
        let old = unsafe { libc::umask(0o177) };
        let bound = std::os::unix::net::UnixListener::bind(path);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(io("cannot create the socket"))?;
        let server = Self {
            path: path.to_owned(),
            listener: Some(listener),
            thread: None,
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io("cannot set the socket's mode to 0600"))?;
        Ok(server)
    }

    /// The socket's path (`--api-sock`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts serving on a thread of its own with its own runtime.
    pub fn start(&mut self, control: Arc<Control>) -> Result<(), ApiError> {
        let Some(listener) = self.listener.take() else {
            return Ok(()); // already serving
        };
        let path = self.path.clone();
        listener
            .set_nonblocking(true)
            .map_err(|source| ApiError::Io {
                path: path.clone(),
                what: "cannot make the socket non-blocking",
                source,
            })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(16)
            .thread_name("api")
            .on_thread_start(|| crate::seccomp::enter_or_exit(crate::seccomp::Kind::Api))
            .enable_all()
            .build()
            .map_err(ApiError::Thread)?;
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                crate::seccomp::enter_or_exit(crate::seccomp::Kind::Api);
                runtime.block_on(async move {
                    // Once a second, what the VMM does between requests:
                    // letting go of ftrace redirects no patch needs.
                    let hk = control.clone();
                    tokio::spawn(async move {
                        let mut tick = tokio::time::interval(Duration::from_secs(1));
                        loop {
                            tick.tick().await;
                            let c = hk.clone();
                            let _ = tokio::task::spawn_blocking(move || c.housekeeping()).await;
                        }
                    });
                    match UnixListener::from_std(listener) {
                        Ok(l) => accept_loop(l, router(control)).await,
                        Err(e) => tracing::error!("API socket {} unusable: {e}", path.display()),
                    }
                })
            })
            .map_err(ApiError::Thread)?;
        self.thread = Some(thread);
        tracing::info!("API listening on {}", self.path.display());
        Ok(())
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn accept_loop(listener: UnixListener, app: Router) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("API: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tokio::spawn(refuse_busy(stream));
            continue;
        };
        let verdict = peer::check(&stream, euid);
        let app = app.clone();
        tokio::spawn(async move {
            serve(stream, verdict, app).await;
            drop(permit);
        });
    }
}

async fn serve(mut stream: UnixStream, verdict: Verdict, app: Router) {
    let head = match first_head(&mut stream, HEADER_TIMEOUT).await {
        // A partial first line (a huge head cut at the read-ahead limit)
        // still starts like HTTP; hyper answers the rest.
        Ok(Some(head)) => head,
        Ok(None) => {
            refuse(
                stream,
                "408 Request Timeout",
                &format!(
                    "the request's headers did not arrive within {} s; send the whole request at once",
                    HEADER_TIMEOUT.as_secs()
                ),
            )
            .await;
            return;
        }
        Err(e) => {
            tracing::debug!("API connection ended before a request: {e}");
            return;
        }
    };
    if !head.is_empty() && !looks_like_http1(&head) {
        refuse(
            stream,
            "400 Bad Request",
            "this is not an HTTP/1.1 request; the control socket speaks HTTP/1.1 + JSON \
             (try: curl --unix-socket PATH http://localhost/vm)",
        )
        .await;
        return;
    }
    let io = TokioIo::new(StallGuard::new(
        Rewind::new(head, stream),
        WRITE_STALL_TIMEOUT,
    ));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let result = match verdict {
        Verdict::Allowed => {
            builder
                .serve_connection(io, TowerToHyperService::new(app))
                .await
        }
        Verdict::Refused(message) => {
            let svc = hyper::service::service_fn(move |_req| {
                let resp = forbidden(&message);
                async move { Ok::<_, Infallible>(resp) }
            });
            builder.keep_alive(false).serve_connection(io, svc).await
        }
    };
    if let Err(e) = result {
        // Timeouts, clients that vanish mid-request, garbage instead of
        // HTTP: the connection ends, nothing else is affected.
        tracing::debug!("API connection ended: {e}");
    }
}

/// Answers a connection beyond the cap with 503 and closes it.
async fn refuse_busy(stream: UnixStream) {
    tracing::warn!("API: more than {MAX_CONNECTIONS} connections; refusing one");
    refuse(
        stream,
        "503 Service Unavailable",
        &format!(
            "too many connections: the VMM serves at most {MAX_CONNECTIONS} at once; retry when one closes"
        ),
    )
    .await;
}

/// Writes one JSON error response outside hyper and closes the connection.
async fn refuse(mut stream: UnixStream, status: &str, message: &str) {
    let body = serde_json::to_string(&klpvisor_api::ErrorReply {
        error: message.to_owned(),
        kind: Some(klpvisor_api::ErrorKind::of_status(
            status
                .split_whitespace()
                .next()
                .and_then(|c| c.parse().ok())
                .unwrap_or(503),
        )),
    })
    .unwrap_or_default();
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(resp.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}
