//! A QMP client over QEMU's Unix socket: the greeting, capability
//! negotiation, commands with their replies matched by `id`, HMP commands
//! through `human-monitor-command`, and passing a file descriptor
//! (`getfd`).
//!
//! The socket is hostile input like guest memory: every line is bounded in
//! length ([`MAX_LINE`]), every wait by a deadline, and the number of
//! asynchronous events skipped while waiting for a reply by
//! [`MAX_SKIPPED`]. A socket that does not greet with QMP's
//! `{"QMP": {"version": ...}}` is refused before anything is sent to it.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest reply line accepted: `info mtree -f` of a VM with many devices
/// is a few hundred KiB; 16 MiB bounds a socket that never sends a newline.
pub const MAX_LINE: usize = 16 << 20;
/// Most lines (events, replies to other ids) skipped while waiting for one
/// reply: a flood of events ends the wait instead of spinning forever.
pub const MAX_SKIPPED: usize = 100_000;
/// Default deadline of one command (greeting included).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why talking QMP failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected to (missing, not a socket, no
    /// permission, nobody listening).
    #[error("cannot connect to the QMP socket {path}: {source}")]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// The connect error.
        #[source]
        source: std::io::Error,
    },
    /// The peer did not greet as a QMP server does.
    #[error("{path} is not a QEMU QMP socket: {why}")]
    NotQmp {
        /// The socket's path.
        path: PathBuf,
        /// What was (or was not) received.
        why: String,
    },
    /// Reading or writing the socket failed.
    #[error("QMP socket I/O failed while {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU closed the connection (it exited, or another client took over).
    #[error("QEMU closed the QMP connection while {what}")]
    Closed {
        /// What was being done.
        what: String,
    },
    /// No complete reply before the deadline.
    #[error("no QMP reply within {timeout:?} while {what}")]
    Timeout {
        /// What was being done.
        what: String,
        /// The deadline that passed.
        timeout: Duration,
    },
    /// A line longer than [`MAX_LINE`], or more than [`MAX_SKIPPED`]
    /// lines without the reply.
    #[error("QMP peer sent too much while {what}: {why}")]
    Flood {
        /// What was being done.
        what: String,
        /// Which bound was hit.
        why: String,
    },
    /// A line that is not a JSON object.
    #[error("QMP peer sent a line that is not a JSON object while {what}: {line}")]
    BadJson {
        /// What was being done.
        what: String,
        /// The start of the line (at most 200 characters).
        line: String,
    },
    /// QEMU answered the command with an error.
    #[error("QEMU refused `{command}`: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QMP's error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// QEMU's message.
        desc: String,
    },
    /// A reply whose shape is not the one the command documents.
    #[error("unexpected reply to `{command}`: {why}")]
    Unexpected {
        /// The command.
        command: String,
        /// What did not fit.
        why: String,
    },
}

/// QEMU's version from the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct QemuVersion {
    /// Major version.
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Micro version.
    pub micro: u64,
}

impl std::fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// A connection to QEMU's QMP monitor in command mode.
#[derive(Debug)]
pub struct Qmp {
    path: PathBuf,
    stream: UnixStream,
    /// Bytes read but not yet consumed as a line.
    pending: Vec<u8>,
    next_id: u64,
    timeout: Duration,
    version: QemuVersion,
}

/// At most 200 characters of `bytes`, printable, for error messages.
fn excerpt(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .take(200)
        .map(|c| if c.is_control() { '.' } else { c })
        .collect()
}

/// Parses QMP's greeting line: `{"QMP": {"version": {"qemu": {...}}, ...}}`.
pub fn parse_greeting(line: &[u8]) -> Result<QemuVersion, String> {
    let v: Value = serde_json::from_slice(line)
        .map_err(|_| format!("its first line is not JSON: {:?}", excerpt(line)))?;
    let q = v
        .get("QMP")
        .and_then(|q| q.get("version"))
        .and_then(|v| v.get("qemu"))
        .ok_or_else(|| format!("its first line is not a QMP greeting: {:?}", excerpt(line)))?;
    let n = |k: &str| q.get(k).and_then(Value::as_u64);
    match (n("major"), n("minor"), n("micro")) {
        (Some(major), Some(minor), Some(micro)) => Ok(QemuVersion {
            major,
            minor,
            micro,
        }),
        _ => Err(format!(
            "its greeting has no numeric version: {:?}",
            excerpt(line)
        )),
    }
}

/// What one reply line means for the command waiting on id `id`.
#[derive(Debug, PartialEq)]
pub enum Line {
    /// The reply: `return`'s value.
    Return(Value),
    /// The reply: an error (class, description).
    Error(String, String),
    /// Anything else: an event, or a reply to another id.
    Skip,
}

/// Classifies one line read while waiting for the reply to `id`.
pub fn classify(v: &Value, id: u64) -> Line {
    if v.get("event").is_some() || v.get("id").and_then(Value::as_u64) != Some(id) {
        return Line::Skip;
    }
    if let Some(r) = v.get("return") {
        return Line::Return(r.clone());
    }
    if let Some(e) = v.get("error") {
        let s = |k: &str| {
            e.get(k)
                .and_then(Value::as_str)
                .unwrap_or("(none)")
                .to_owned()
        };
        return Line::Error(s("class"), s("desc"));
    }
    Line::Skip
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting and leaves
    /// capability negotiation (`qmp_capabilities`), each bounded by
    /// `timeout`. A socket that stays silent is refused too: QEMU greets at
    /// once, unless another client (libvirt) holds its one connection.
    pub fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<Self, QmpError> {
        let path = path.as_ref().to_path_buf();
        let stream = UnixStream::connect(&path).map_err(|source| QmpError::Connect {
            path: path.clone(),
            source,
        })?;
        let mut qmp = Self {
            path,
            stream,
            pending: Vec::new(),
            next_id: 1,
            timeout,
            version: QemuVersion {
                major: 0,
                minor: 0,
                micro: 0,
            },
        };
        let deadline = Instant::now() + timeout;
        let line = match qmp.read_line(deadline, "reading the greeting") {
            Ok(l) => l,
            Err(QmpError::Timeout { .. }) => {
                return Err(QmpError::NotQmp {
                    path: qmp.path,
                    why: format!(
                        "no greeting within {timeout:?} (not QMP, or another client such as \
                         libvirt holds QEMU's only connection on it)"
                    ),
                })
            }
            Err(QmpError::Closed { .. }) => {
                return Err(QmpError::NotQmp {
                    path: qmp.path,
                    why: "the peer closed the connection without a greeting".into(),
                })
            }
            Err(QmpError::Flood { why, .. }) => {
                return Err(QmpError::NotQmp {
                    path: qmp.path,
                    why,
                })
            }
            Err(e) => return Err(e),
        };
        qmp.version = parse_greeting(&line).map_err(|why| QmpError::NotQmp {
            path: qmp.path.clone(),
            why,
        })?;
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// QEMU's version, from its greeting.
    pub fn version(&self) -> QemuVersion {
        self.version
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the deadline of each later command.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The pid of the process that listens on the socket, from the kernel
    /// (`SO_PEERCRED`), so QEMU cannot misstate it. When another process
    /// created the listening socket and passed it to QEMU (libvirt does
    /// so for its monitor), this is that process's pid; the caller checks.
    pub fn peer_pid(&self) -> Result<u32, QmpError> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` and `len` are valid for writes of the sizes given;
        // the fd is our open socket for the call's duration.
        let rc = unsafe {
            libc::getsockopt(
                self.stream.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(QmpError::Io {
                what: "asking the socket for its peer's pid (SO_PEERCRED)".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        u32::try_from(cred.pid)
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| QmpError::Unexpected {
                command: "SO_PEERCRED".into(),
                why: format!("peer pid {}", cred.pid),
            })
    }

    /// Runs QMP command `command` with `arguments` and returns its
    /// `return` value. Events and replies to other ids are skipped.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_with_fd(command, arguments, None)
    }

    /// As [`Qmp::execute`], with `fd` passed alongside the command
    /// (`SCM_RIGHTS`), as `getfd` and `add-fd` expect it.
    pub fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<RawFd>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let (Some(a), Some(obj)) = (arguments, msg.as_object_mut()) {
            obj.insert("arguments".into(), a);
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        let what = format!("running `{command}`");
        let deadline = Instant::now() + self.timeout;
        match fd {
            None => self.stream.write_all(&bytes),
            Some(fd) => send_with_fd(&self.stream, &bytes, fd),
        }
        .map_err(|source| match source.kind() {
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset => {
                QmpError::Closed { what: what.clone() }
            }
            _ => QmpError::Io {
                what: what.clone(),
                source,
            },
        })?;
        for _ in 0..MAX_SKIPPED {
            let line = self.read_line(deadline, &what)?;
            let v: Value = serde_json::from_slice(&line).map_err(|_| QmpError::BadJson {
                what: what.clone(),
                line: excerpt(&line),
            })?;
            if !v.is_object() {
                return Err(QmpError::BadJson {
                    what,
                    line: excerpt(&line),
                });
            }
            match classify(&v, id) {
                Line::Return(r) => return Ok(r),
                Line::Error(class, desc) => {
                    return Err(QmpError::Command {
                        command: command.into(),
                        class,
                        desc,
                    })
                }
                Line::Skip => {}
            }
        }
        Err(QmpError::Flood {
            what,
            why: format!("{MAX_SKIPPED} lines without the reply"),
        })
    }

    /// Runs an HMP command through `human-monitor-command` (on vCPU
    /// `cpu_index` for per-CPU commands such as `info registers`) and
    /// returns its text with `\r` removed. HMP reports its own errors as
    /// text; the parsers of its output refuse what they do not expect.
    pub fn hmp(
        &mut self,
        command_line: &str,
        cpu_index: Option<usize>,
    ) -> Result<String, QmpError> {
        let mut args = json!({ "command-line": command_line });
        if let (Some(i), Some(obj)) = (cpu_index, args.as_object_mut()) {
            obj.insert("cpu-index".into(), json!(i));
        }
        match self.execute("human-monitor-command", Some(args))? {
            Value::String(s) => Ok(s.replace('\r', "")),
            other => Err(QmpError::Unexpected {
                command: format!("human-monitor-command {command_line}"),
                why: format!(
                    "return is not a string: {}",
                    excerpt(other.to_string().as_bytes())
                ),
            }),
        }
    }

    /// Reads one line (without its `\n`), bounded by `deadline` and [`MAX_LINE`].
    fn read_line(&mut self, deadline: Instant, what: &str) -> Result<Vec<u8>, QmpError> {
        let mut chunk = vec![0u8; 64 << 10];
        let mut scanned = 0usize;
        loop {
            if let Some(i) = self
                .pending
                .get(scanned..)
                .and_then(|p| p.iter().position(|&b| b == b'\n'))
            {
                let end = scanned + i;
                let mut line: Vec<u8> = self.pending.drain(..=end).collect();
                line.pop();
                return Ok(line);
            }
            scanned = self.pending.len();
            if self.pending.len() > MAX_LINE {
                return Err(QmpError::Flood {
                    what: what.into(),
                    why: format!("a line longer than {MAX_LINE} bytes"),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout {
                    what: what.into(),
                    timeout: self.timeout,
                });
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(|source| QmpError::Io {
                    what: what.into(),
                    source,
                })?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(QmpError::Closed { what: what.into() }),
                Ok(n) => self
                    .pending
                    .extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // QEMU exiting with our command unread in its socket
                // resets the connection instead of ending it.
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    return Err(QmpError::Closed { what: what.into() })
                }
                Err(source) => {
                    return Err(QmpError::Io {
                        what: what.into(),
                        source,
                    })
                }
            }
        }
    }
}

/// Writes `bytes` with `fd` attached as `SCM_RIGHTS` ancillary data on the
/// first `sendmsg`, then the rest, if any, plainly.
fn send_with_fd(stream: &UnixStream, bytes: &[u8], fd: RawFd) -> std::io::Result<()> {
    // Room for one cmsghdr carrying one int, aligned as CMSG_SPACE wants.
    let mut control = [0u64; 8];
    // SAFETY: CMSG_SPACE only computes a size from its argument.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    if space > std::mem::size_of_val(&control) {
        return Err(std::io::Error::other("SCM_RIGHTS control buffer too small"));
    }
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty message header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `control`, at least `space` bytes, so
    // CMSG_FIRSTHDR returns a pointer inside it (non-null, as controllen
    // holds a whole header); CMSG_DATA of that header has room for one fd
    // (CMSG_SPACE of its size was checked to fit).
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null() {
            return Err(std::io::Error::other("no room for the SCM_RIGHTS header"));
        }
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
    }
    // SAFETY: `msg` and everything it points to (iov over `bytes`,
    // `control`) live until the call returns; the socket fd is open.
    let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    let sent = usize::try_from(sent).map_err(|_| std::io::Error::last_os_error())?;
    let mut rest = bytes.get(sent..).unwrap_or_default();
    let mut s = stream;
    while !rest.is_empty() {
        let n = s.write(rest)?;
        if n == 0 {
            return Err(ErrorKind::WriteZero.into());
        }
        rest = rest.get(n..).unwrap_or_default();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread;

    /// QEMU 7.2.22's greeting, as captured from this host's QEMU.
    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#;

    fn sock_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("klpv-qmp-{tag}-{}.sock", std::process::id()))
    }

    /// A fake server: sends `greeting`, then for each received line the
    /// next canned answer (with `ID` replaced by the request's id).
    fn serve(tag: &str, greeting: Option<&'static str>, answers: Vec<&'static str>) -> PathBuf {
        let path = sock_path(tag);
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            if let Some(g) = greeting {
                s.write_all(g.as_bytes()).unwrap();
            }
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            for a in answers {
                let mut line = String::new();
                if std::io::BufRead::read_line(&mut r, &mut line).unwrap() == 0 {
                    return;
                }
                let v: Value = serde_json::from_str(&line).unwrap();
                let id = v["id"].as_u64().unwrap();
                let _ = s.write_all(a.replace("ID", &id.to_string()).as_bytes());
            }
            thread::sleep(Duration::from_secs(5));
        });
        path
    }

    #[test]
    fn greeting_of_qemu_7_2() {
        let v = parse_greeting(GREETING.as_bytes()).unwrap();
        assert_eq!(v.to_string(), "7.2.22");
        assert!(
            parse_greeting(b"QEMU 7.2.22 monitor - type 'help' for more information")
                .unwrap_err()
                .contains("not JSON")
        );
        assert!(parse_greeting(br#"{"hello": 1}"#)
            .unwrap_err()
            .contains("not a QMP greeting"));
    }

    #[test]
    fn replies_are_matched_by_id_and_events_skipped() {
        let stop_event =
            r#"{"timestamp": {"seconds": 1796356445, "microseconds": 562826}, "event": "STOP"}"#;
        let v: Value = serde_json::from_str(stop_event).unwrap();
        assert_eq!(classify(&v, 3), Line::Skip);
        let v = json!({"return": {}, "id": 2});
        assert_eq!(classify(&v, 3), Line::Skip);
        assert_eq!(classify(&v, 2), Line::Return(json!({})));
        let v = json!({"id": 4, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}});
        assert_eq!(
            classify(&v, 4),
            Line::Error(
                "CommandNotFound".into(),
                "The command nope has not been found".into()
            )
        );
    }

    #[test]
    fn a_session_with_events_errors_and_hmp() {
        let g = concat!(
            r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#,
            "\n"
        );
        let path = serve(
            "session",
            Some(g),
            vec![
                "{\"return\": {}, \"id\": ID}\n",
                "{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\n{\"return\": {}, \"id\": ID}\n",
                "{\"id\": ID, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command nope has not been found\"}}\n",
                "{\"return\": \"Host virtual address for 0x100000 (pc.ram) is 0x7feaf7f00000\\r\\n\", \"id\": ID}\n",
            ],
        );
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        assert_eq!(q.version().to_string(), "7.2.22");
        assert_eq!(q.execute("stop", None).unwrap(), json!({}));
        let e = q.execute("nope", None).unwrap_err();
        assert!(
            matches!(e, QmpError::Command { ref class, .. } if class == "CommandNotFound"),
            "{e}"
        );
        assert_eq!(
            q.hmp("gpa2hva 0x100000", None).unwrap(),
            "Host virtual address for 0x100000 (pc.ram) is 0x7feaf7f00000\n"
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_socket_that_is_not_qmp_is_refused() {
        // QEMU's human monitor on a socket greets in text.
        let path = serve(
            "hmp",
            Some("QEMU 7.2.22 monitor - type 'help' for more information\r\n(qemu) "),
            vec![],
        );
        let e = Qmp::connect(&path, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, QmpError::NotQmp { .. }), "{e}");
        assert!(e.to_string().contains("not JSON"), "{e}");
        let _ = std::fs::remove_file(path);

        // A silent peer.
        let path = serve("silent", None, vec![]);
        let t = Instant::now();
        let e = Qmp::connect(&path, Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, QmpError::NotQmp { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(3));
        let _ = std::fs::remove_file(path);

        // No socket at all.
        let e = Qmp::connect(sock_path("missing"), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, QmpError::Connect { .. }), "{e}");
    }

    #[test]
    fn a_peer_that_goes_away_with_a_command_unread_is_closed_not_io() {
        // As QEMU killed while our command sits in its socket: the close
        // resets the connection (ECONNRESET on our read, not 0).
        let path = sock_path("reset");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(format!("{GREETING}\n").as_bytes()).unwrap();
            let mut r = std::io::BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            std::io::BufRead::read_line(&mut r, &mut line).unwrap();
            s.write_all(b"{\"return\": {}, \"id\": 1}\n").unwrap();
            // One byte of the next command, the rest left unread.
            let mut one = [0u8; 1];
            std::io::Read::read_exact(r.get_mut(), &mut one).unwrap();
        });
        let mut q = Qmp::connect(&path, Duration::from_secs(5)).unwrap();
        let e = q.execute("query-status", None).unwrap_err();
        assert!(
            matches!(e, QmpError::Closed { .. }),
            "{e} (a reset must read as QEMU closing the connection)"
        );
        assert_eq!(
            e.to_string(),
            "QEMU closed the QMP connection while running `query-status`"
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn a_line_without_end_is_bounded() {
        let path = sock_path("flood");
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path).unwrap();
        thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let junk = vec![b'x'; 1 << 20];
            for _ in 0..(MAX_LINE >> 20) + 2 {
                if s.write_all(&junk).is_err() {
                    return;
                }
            }
        });
        let e = Qmp::connect(&path, Duration::from_secs(20)).unwrap_err();
        assert!(
            matches!(e, QmpError::NotQmp { ref why, .. } if why.contains("longer than")),
            "{e}"
        );
        let _ = std::fs::remove_file(path);
    }
}
