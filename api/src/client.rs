//! A client of the VMM's control socket: one HTTP/1.1 request per
//! connection over the Unix socket, replies decoded into the [`crate`]
//! types. Blocking from the caller's point of view (a CLI and benchmarks
//! want nothing else); a small current-thread runtime drives hyper inside.
#![warn(missing_docs)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use thiserror::Error;
use tokio::net::UnixStream;

use crate::{
    AddrReply, ErrorKind, ErrorReply, HistoryEntry, MemoryReply, PatchInfo, PatchesReply,
    PauseReply, PendingTransition, RegsReply, ResumeReply, RollbackReply, SymbolsReply, TasksReply,
    TransitionReply, VmInfo,
};

/// How long one request may take end to end (the server's own limit is
/// 30 s; this only catches a VMM that stopped answering altogether).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// How often [`Client::watch`] asks for the pending transition: often
/// enough to show each retry of a transition waiting for a safe point (its
/// backoff grows past this within a second), rarely enough to cost the VMM
/// nothing (`GET /patches` copies a published list, it takes no lock a
/// transition holds).
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);

/// How long one progress poll may take. Short, because the request being
/// watched waits for the poll in flight before it returns its reply (so no
/// progress line is printed after the result); a VMM too busy to answer
/// `GET /patches` in this time just costs one missed line.
const PROGRESS_POLL_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a request to the VMM failed, worded for the user of the CLI.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The socket cannot be reached.
    #[error("cannot connect to {path}: {source}{hint}")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// The connect error.
        source: std::io::Error,
        /// What the error usually means (no VMM, wrong user).
        hint: &'static str,
    },
    /// The HTTP exchange broke off.
    #[error("talking to the VMM at {path}: {message}")]
    Http {
        /// The socket.
        path: PathBuf,
        /// hyper's error.
        message: String,
    },
    /// The connection broke off before the reply and nothing listens on
    /// the socket any more: the VMM exited (or was killed) while it
    /// handled the request.
    #[error(
        "the VMM at {path} went away before answering (nothing listens there any more: \
         it exited or was killed, and its guest with it); whatever this request started \
         did not finish"
    )]
    Gone {
        /// The socket.
        path: PathBuf,
    },
    /// No reply within [`CLIENT_TIMEOUT`].
    #[error("no reply from the VMM at {path} within {} s", CLIENT_TIMEOUT.as_secs())]
    Timeout {
        /// The socket.
        path: PathBuf,
    },
    /// The VMM answered with an error status; `message` is its explanation.
    #[error("{message} (HTTP {status})")]
    Api {
        /// The HTTP status.
        status: u16,
        /// The reply's `kind`, or the one its status implies.
        kind: ErrorKind,
        /// The VMM's `{"error": ...}` text.
        message: String,
    },
    /// The reply is not the JSON this client expects (a VMM of another
    /// version).
    #[error("the VMM's reply to {what} is not what this patcher expects: {message}")]
    Decode {
        /// The request, `METHOD PATH`.
        what: String,
        /// serde's error.
        message: String,
    },
    /// A file to upload cannot be read.
    #[error("cannot read {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The read error.
        source: std::io::Error,
    },
    /// The client's runtime could not start (out of threads or memory).
    #[error("cannot start the client runtime: {0}")]
    Runtime(std::io::Error),
}

/// The socket's address; each call opens one connection.
#[derive(Debug, Clone)]
pub struct Client {
    path: PathBuf,
    runtime: std::sync::Arc<tokio::runtime::Runtime>,
}

/// A raw reply: status and body bytes.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The HTTP status.
    pub status: u16,
    /// The body as sent.
    pub body: Vec<u8>,
}

impl Client {
    /// A client of the socket at `path` (nothing is connected yet).
    pub fn new(path: &Path) -> Result<Self, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        Ok(Self {
            path: path.to_owned(),
            runtime: std::sync::Arc::new(runtime),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends one request; any status is returned, transport failures are
    /// errors.
    pub fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, ClientError> {
        self.send_typed(
            method,
            path_and_query,
            body.map(|b| (b, "application/json")),
        )
    }

    /// Like [`Client::send`] with the body's content type.
    pub fn send_typed(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<(Vec<u8>, &'static str)>,
    ) -> Result<Reply, ClientError> {
        self.send_within(CLIENT_TIMEOUT, method, path_and_query, body)
    }

    /// [`Client::send_typed`] with a limit of its own instead of
    /// [`CLIENT_TIMEOUT`].
    fn send_within(
        &self,
        limit: Duration,
        method: Method,
        path_and_query: &str,
        body: Option<(Vec<u8>, &'static str)>,
    ) -> Result<Reply, ClientError> {
        let fut = self.send_async(method, path_and_query, body);
        self.runtime
            .block_on(async { tokio::time::timeout(limit, fut).await })
            .map_err(|_| ClientError::Timeout {
                path: self.path.clone(),
            })?
    }

    async fn send_async(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<(Vec<u8>, &'static str)>,
    ) -> Result<Reply, ClientError> {
        let stream = UnixStream::connect(&self.path).await.map_err(|source| {
            let hint = match source.kind() {
                std::io::ErrorKind::NotFound => {
                    " (no such socket: is the vmm running with --api-sock at this path?)"
                }
                std::io::ErrorKind::ConnectionRefused => {
                    " (nothing listens there: the vmm has exited)"
                }
                std::io::ErrorKind::PermissionDenied => {
                    " (the socket is mode 0600: run as the VMM's user or root)"
                }
                _ => "",
            };
            ClientError::Connect {
                path: self.path.clone(),
                source,
                hint,
            }
        })?;
        let http = |e: &dyn std::fmt::Display| {
            if listener_gone(&self.path) {
                ClientError::Gone {
                    path: self.path.clone(),
                }
            } else {
                ClientError::Http {
                    path: self.path.clone(),
                    message: e.to_string(),
                }
            }
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(&e))?;
        let driver = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(hyper::header::HOST, "localhost");
        let bytes = match body {
            Some((bytes, content_type)) => {
                req = req.header(hyper::header::CONTENT_TYPE, content_type);
                bytes
            }
            None => Vec::new(),
        };
        let req = req
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| http(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| http(&e))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| http(&e))?
            .to_bytes()
            .to_vec();
        driver.abort();
        Ok(Reply { status, body })
    }

    /// Sends a request and decodes a 2xx JSON reply as `T`; an error status
    /// becomes [`ClientError::Api`] with the server's message.
    pub fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let what = format!("{method} {path_and_query}");
        let reply = self.send(method, path_and_query, body)?;
        check(&reply)?;
        serde_json::from_slice(&reply.body).map_err(|e| ClientError::Decode {
            what,
            message: e.to_string(),
        })
    }

    /// POSTs a file's bytes (`application/octet-stream`) and decodes the
    /// JSON reply.
    pub fn upload<T: DeserializeOwned>(
        &self,
        path_and_query: &str,
        bytes: Vec<u8>,
    ) -> Result<T, ClientError> {
        let reply = self.send_typed(
            Method::POST,
            path_and_query,
            Some((bytes, "application/octet-stream")),
        )?;
        check(&reply)?;
        serde_json::from_slice(&reply.body).map_err(|e| ClientError::Decode {
            what: format!("POST {path_and_query}"),
            message: e.to_string(),
        })
    }

    /// Like [`Client::call`] for a plain-text reply.
    pub fn text(&self, path_and_query: &str) -> Result<String, ClientError> {
        let reply = self.send(Method::GET, path_and_query, None)?;
        check(&reply)?;
        String::from_utf8(reply.body).map_err(|e| ClientError::Decode {
            what: format!("GET {path_and_query}"),
            message: e.to_string(),
        })
    }
}

/// Watching a transition while it waits for a safe point.
impl Client {
    /// Runs `request` (a transition: apply, enable, disable, rollback) and,
    /// while it is outstanding, polls `GET /patches` on a connection of its
    /// own every `interval`, handing each pending transition it sees to
    /// `progress` (on another thread). The VMM answers a transition only
    /// when it has committed or given up, up to its timeout later; the
    /// pending transition is the only way to show meanwhile what it waits
    /// for.
    ///
    /// `request`'s result is returned unchanged: a poll that fails (no
    /// runtime, no answer in time, a VMM that does not list transitions)
    /// is skipped silently. `progress` is never called once `request` has
    /// returned, and this returns only after the last call has finished,
    /// so whatever it prints comes before the caller prints the reply. The
    /// pending transition may be another client's (one runs at a time: ours
    /// is then refused as busy); `progress` tells by its action and patch.
    pub fn watch<T>(
        &self,
        interval: Duration,
        request: impl FnOnce(&Client) -> Result<T, ClientError>,
        mut progress: impl FnMut(&PendingTransition) + Send,
    ) -> Result<T, ClientError> {
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let path = self.path.clone();
        std::thread::scope(|scope| {
            scope.spawn(move || {
                // Its own runtime: the request's blocks the caller's thread.
                let Ok(poller) = Client::new(&path) else {
                    return;
                };
                let ended = || {
                    matches!(
                        finished.try_recv(),
                        Err(std::sync::mpsc::TryRecvError::Disconnected)
                    )
                };
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    finished.recv_timeout(interval)
                {
                    let Ok(reply) = poller.pending_within(PROGRESS_POLL_TIMEOUT) else {
                        continue;
                    };
                    if ended() {
                        return;
                    }
                    if let Some(t) = &reply {
                        progress(t);
                    }
                }
            });
            let result = request(self);
            // Ends the poller's wait at once (it also ends if `request`
            // panics: the sender is dropped while unwinding).
            drop(done);
            result
        })
    }

    /// The pending transition of `GET /patches`, with a short limit.
    fn pending_within(&self, limit: Duration) -> Result<Option<PendingTransition>, ClientError> {
        let reply = self.send_within(limit, Method::GET, "/patches", None)?;
        check(&reply)?;
        serde_json::from_slice::<PatchesReply>(&reply.body)
            .map(|r| r.transition)
            .map_err(|e| ClientError::Decode {
                what: "GET /patches".into(),
                message: e.to_string(),
            })
    }
}

/// Whether nothing listens on `path` any more, after an exchange broke
/// off: a broken exchange with no listener is a VMM that is gone, not an
/// HTTP problem. A process being killed closes its descriptors one by one,
/// so its listening socket can still take a connection just after the
/// request's connection closed: a connect that succeeds is tried again,
/// up to 5 times in about half a second, before the VMM counts as alive.
fn listener_gone(path: &std::path::Path) -> bool {
    for _ in 0..5 {
        match std::os::unix::net::UnixStream::connect(path) {
            Err(e) => {
                return matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::NotFound
                )
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
    false
}

/// How a transition may proceed: the query parameters every change
/// (apply, enable, disable, rollback) takes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TransitionOptions {
    /// Skip the safe-point check (`--force`): the patch is marked forced.
    pub force: bool,
    /// How long to wait for a safe point, in ms (the VMM's default if `None`).
    pub timeout_ms: Option<u64>,
}

impl TransitionOptions {
    fn query(self) -> String {
        match self.timeout_ms {
            Some(ms) => format!("force={}&timeout_ms={ms}", self.force),
            None => format!("force={}", self.force),
        }
    }
}

/// Which address space a `GET /memory` read names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// A kernel-virtual address (`va=`), translated by the guest's page tables.
    Virt,
    /// A guest-physical address (`gpa=`).
    Phys,
}

/// One typed method per route: the only place a client spells the API's
/// paths, so the CLI and the test tools cannot drift from each other.
impl Client {
    /// `GET /vm`: state, vCPUs, the guest kernel as found.
    pub fn vm(&self) -> Result<VmInfo, ClientError> {
        self.call(Method::GET, "/vm", None)
    }

    /// `PUT /vm/pause`.
    pub fn pause(&self) -> Result<PauseReply, ClientError> {
        self.call(Method::PUT, "/vm/pause", None)
    }

    /// `PUT /vm/resume`.
    pub fn resume(&self) -> Result<ResumeReply, ClientError> {
        self.call(Method::PUT, "/vm/resume", None)
    }

    /// `GET /vcpus/{vcpu}/regs`.
    pub fn regs(&self, vcpu: usize) -> Result<RegsReply, ClientError> {
        self.call(Method::GET, &format!("/vcpus/{vcpu}/regs"), None)
    }

    /// `GET /memory?va=|gpa=ADDR&len=LEN`; `addr` is passed as given (hex,
    /// escaped), so the VMM's own parser judges it.
    pub fn memory(&self, space: Space, addr: &str, len: u64) -> Result<MemoryReply, ClientError> {
        let key = match space {
            Space::Virt => "va",
            Space::Phys => "gpa",
        };
        let addr = query_escape(addr);
        self.call(
            Method::GET,
            &format!("/memory?{key}={addr}&len={len}"),
            None,
        )
    }

    /// `GET /symbols?name=NAME`: every address of NAME.
    pub fn symbol(&self, name: &str) -> Result<SymbolsReply, ClientError> {
        let name = query_escape(name);
        self.call(Method::GET, &format!("/symbols?name={name}"), None)
    }

    /// `GET /symbols?addr=ADDR`: the symbol containing ADDR.
    pub fn symbol_at(&self, addr: &str) -> Result<AddrReply, ClientError> {
        let addr = query_escape(addr);
        self.call(Method::GET, &format!("/symbols?addr={addr}"), None)
    }

    /// `GET /symbols/all`: the whole table in /proc/kallsyms format.
    pub fn all_symbols(&self) -> Result<String, ClientError> {
        self.text("/symbols/all")
    }

    /// `GET /tasks`.
    pub fn tasks(&self) -> Result<TasksReply, ClientError> {
        self.call(Method::GET, "/tasks", None)
    }

    /// `GET /patches`: the stack, live redirections, the pending transition.
    pub fn patches(&self) -> Result<PatchesReply, ClientError> {
        self.call(Method::GET, "/patches", None)
    }

    /// `POST /patches`: load a module's bytes and enable it.
    pub fn apply(
        &self,
        module: Vec<u8>,
        opts: TransitionOptions,
    ) -> Result<TransitionReply, ClientError> {
        self.upload(&format!("/patches?{}", opts.query()), module)
    }

    /// `POST /patches/{name}/enable`.
    pub fn enable(
        &self,
        name: &str,
        opts: TransitionOptions,
    ) -> Result<TransitionReply, ClientError> {
        let name = query_escape(name);
        let q = opts.query();
        self.call(Method::POST, &format!("/patches/{name}/enable?{q}"), None)
    }

    /// `POST /patches/{name}/disable`.
    pub fn disable(
        &self,
        name: &str,
        opts: TransitionOptions,
    ) -> Result<TransitionReply, ClientError> {
        let name = query_escape(name);
        let q = opts.query();
        self.call(Method::POST, &format!("/patches/{name}/disable?{q}"), None)
    }

    /// `DELETE /patches/{name}`: forget a patch that is not enabled.
    pub fn remove(&self, name: &str) -> Result<PatchInfo, ClientError> {
        let name = query_escape(name);
        self.call(Method::DELETE, &format!("/patches/{name}"), None)
    }

    /// `GET /history`: the committed transitions.
    pub fn history(&self) -> Result<Vec<HistoryEntry>, ClientError> {
        self.call(Method::GET, "/history", None)
    }

    /// `POST /rollback[?to=N]`: back to the stack before transition N
    /// (default: the last).
    pub fn rollback(
        &self,
        to: Option<u64>,
        opts: TransitionOptions,
    ) -> Result<RollbackReply, ClientError> {
        let to = to.map(|n| format!("to={n}&")).unwrap_or_default();
        self.call(
            Method::POST,
            &format!("/rollback?{to}{}", opts.query()),
            None,
        )
    }
}

/// Turns an error status into [`ClientError::Api`].
pub fn check(reply: &Reply) -> Result<(), ClientError> {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_success() {
        return Ok(());
    }
    let (message, kind) = match serde_json::from_slice::<ErrorReply>(&reply.body) {
        Ok(e) => (e.error, e.kind),
        Err(_) => (String::from_utf8_lossy(&reply.body).into_owned(), None),
    };
    Err(ClientError::Api {
        status: reply.status,
        kind: kind.unwrap_or_else(|| ErrorKind::of_status(reply.status)),
        message,
    })
}

/// Percent-encodes a query value (symbol names may hold `.` and `$`, which
/// are fine, but a user may type anything).
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh socket path of this test process (short: sun_path holds 108
    /// bytes).
    fn socket_path(name: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("klpv-api-{}-{name}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    /// A VMM stand-in on a Unix socket: answers every request (one per
    /// connection, as the client sends them) with `GET /patches`'s reply
    /// showing a transition whose attempts count up.
    fn fake_vmm(name: &str) -> PathBuf {
        use std::io::{Read as _, Write as _};
        let path = socket_path(name);
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
        std::thread::spawn(move || {
            for (attempts, conn) in listener.incoming().enumerate() {
                let Ok(mut conn) = conn else { return };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let body = serde_json::json!({
                    "patches": [],
                    "transition": {
                        "patch": "block_nsleep", "action": "apply", "forced": false,
                        "waited_ms": 100.0 * attempts as f64, "attempts": attempts,
                        "blockers": ["pid 7 (sleep) is in common_nsleep"],
                    },
                })
                .to_string();
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        path
    }

    #[test]
    fn watch_reports_the_pending_transition_while_the_request_is_outstanding() {
        let client = Client::new(&fake_vmm("watch")).expect("client");
        let seen = std::sync::Mutex::new(Vec::new());
        let returned = std::sync::atomic::AtomicBool::new(false);
        let result = client.watch(
            Duration::from_millis(50),
            |_| {
                std::thread::sleep(Duration::from_millis(600));
                Ok::<_, ClientError>(42)
            },
            |t| {
                assert!(
                    !returned.load(std::sync::atomic::Ordering::SeqCst),
                    "no progress after the request returned"
                );
                seen.lock().expect("lock").push(t.attempts);
            },
        );
        returned.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(result.expect("the request's own result"), 42);
        let seen = seen.into_inner().expect("lock");
        assert!(seen.len() >= 3, "polled while the request ran: {seen:?}");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    }

    #[test]
    fn watch_keeps_failed_polls_silent_and_returns_the_requests_error() {
        // No VMM: every poll fails to connect.
        let client = Client::new(&socket_path("none")).expect("client");
        let mut calls = 0;
        let result: Result<(), _> = client.watch(
            Duration::from_millis(20),
            |c| {
                std::thread::sleep(Duration::from_millis(150));
                c.vm().map(|_| ())
            },
            |_| calls += 1,
        );
        assert!(
            matches!(result, Err(ClientError::Connect { .. })),
            "{result:?}"
        );
        assert_eq!(calls, 0);
    }

    #[test]
    fn escapes_reserved_bytes() {
        assert_eq!(query_escape("cmdline_proc_show"), "cmdline_proc_show");
        assert_eq!(query_escape("a b&c=d"), "a%20b%26c%3Dd");
        assert_eq!(query_escape("x.isra.0"), "x.isra.0");
    }

    #[test]
    fn error_status_carries_the_servers_message() {
        let r = Reply {
            status: 409,
            body: br#"{"error":"the VM is already paused"}"#.to_vec(),
        };
        match check(&r) {
            Err(ClientError::Api {
                status,
                kind,
                message,
            }) => {
                assert_eq!(status, 409);
                assert_eq!(kind, ErrorKind::Busy, "implied by the status");
                assert_eq!(message, "the VM is already paused");
            }
            other => panic!("{other:?}"),
        }
        assert!(check(&Reply {
            status: 200,
            body: vec![]
        })
        .is_ok());
    }
}
