//! Writes through QEMU's gdbstub, for one reason: under TCG, QEMU runs
//! the guest's code from translations it caches by guest-physical page,
//! and drops a page's translations only when the page is written through
//! QEMU's own memory API. A write through `/proc/PID/mem` bypasses it: the
//! vCPUs would go on running the old code (a redirect written at a
//! function's entry would never be taken; tried, see the README). QEMU
//! has no QMP or HMP command that writes guest memory, but its gdbstub
//! does, in physical mode (`Qqemu.PhyMemMode:1`, then `M` packets), with
//! `cpu_physical_memory_write`, which invalidates the translations of
//! the bytes written. Under KVM the guest's CPU reads the memory itself
//! and none of this is needed.
//!
//! The stub is started with HMP `gdbserver` on a Unix socket in a private
//! directory, and stopped (`gdbserver none`) when the [`Gdb`] is dropped.
//! A gdb connection makes QEMU stop the VM, and every later stop sends the
//! client an unsolicited stop reply: the client skips those. Replies are
//! bounded ([`MAX_PACKET`]), each command has a deadline.

use std::io::{Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::qmp::{Qmp, QmpError};

/// Bytes of guest memory per `M` packet: QEMU's gdbstub takes packets of
/// up to 4096 bytes, and `M` sends each byte as two hex digits.
const CHUNK: usize = 1024;
/// Longest packet accepted from the stub.
pub const MAX_PACKET: usize = 64 << 10;
/// Most packets skipped (stop replies, acks) while waiting for a reply.
const MAX_SKIPPED: usize = 10_000;

/// Why the gdbstub could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum GdbError {
    /// Talking to QMP failed.
    #[error(transparent)]
    Qmp(#[from] QmpError),
    /// QEMU did not start its gdbstub.
    #[error("QEMU did not start its gdbstub on {path}: {answer}")]
    Start {
        /// The socket asked for.
        path: String,
        /// QEMU's answer.
        answer: String,
    },
    /// Setting up or using the stub's socket failed.
    #[error("QEMU's gdbstub: {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The stub answered something else than expected, or too much.
    #[error("QEMU's gdbstub answered `{request}` with `{reply}`")]
    Reply {
        /// The packet sent (without its data).
        request: String,
        /// What came back (cut to 200 bytes).
        reply: String,
    },
    /// No reply within the deadline.
    #[error("QEMU's gdbstub did not answer `{0}` in time")]
    Timeout(String),
}

/// A connection to QEMU's gdbstub in physical-memory mode.
#[derive(Debug)]
pub struct Gdb {
    stream: UnixStream,
    dir: PathBuf,
    timeout: Duration,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> GdbError {
    let what = what.into();
    move |source| GdbError::Io { what, source }
}

/// `$data#checksum`.
pub fn frame(data: &str) -> Vec<u8> {
    let sum = data.bytes().fold(0u8, |a, b| a.wrapping_add(b));
    format!("${data}#{sum:02x}").into_bytes()
}

/// Takes one packet's data out of `buf` (skipping acks and noise before
/// it); `None` until a whole packet is there.
pub fn take_packet(buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let start = buf.iter().position(|&b| b == b'$')?;
    let hash = start + buf[start..].iter().position(|&b| b == b'#')?;
    if buf.len() < hash + 3 {
        return None;
    }
    let data = buf[start + 1..hash].to_vec();
    buf.drain(..hash + 3);
    Some(data)
}

impl Gdb {
    /// Starts QEMU's gdbstub through `q` and connects to it. The VM should
    /// be paused: QEMU stops it when a client connects.
    pub fn start(q: &mut Qmp, timeout: Duration) -> Result<Self, GdbError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir =
            std::env::temp_dir().join(format!("klpvisor-gdb-{}-{nanos:x}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io(format!("creating {}", dir.display())))?;
        let path = dir.join("gdb.sock");
        let started = Self::connect(q, &path, timeout);
        match started {
            Ok(stream) => {
                let mut g = Self {
                    stream,
                    dir,
                    timeout,
                };
                g.command("Qqemu.PhyMemMode:1", "Qqemu.PhyMemMode:1")?;
                Ok(g)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn connect(
        q: &mut Qmp,
        path: &std::path::Path,
        timeout: Duration,
    ) -> Result<UnixStream, GdbError> {
        let spec = format!("unix:{},server=on,wait=off", path.display());
        let answer = q.hmp(&format!("gdbserver {spec}"), None)?;
        if !answer.contains("Waiting for gdb connection") {
            return Err(GdbError::Start {
                path: path.display().to_string(),
                answer: answer.trim().chars().take(200).collect(),
            });
        }
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(io("connecting")(e));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(io("setting a read timeout"))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(io("setting a write timeout"))?;
        Ok(stream)
    }

    /// Sends one packet that QEMU answers `OK` to.
    fn command(&mut self, data: &str, what: &str) -> Result<(), GdbError> {
        self.stream
            .write_all(&frame(data))
            .map_err(io(format!("sending `{what}`")))?;
        let reply = self.reply(what)?;
        if reply == "OK" {
            Ok(())
        } else {
            Err(GdbError::Reply {
                request: what.into(),
                reply: reply.chars().take(200).collect(),
            })
        }
    }

    /// The first reply that is not a stop reply (`T..`, `S..`: QEMU sends
    /// one each time the VM stops).
    fn reply(&mut self, what: &str) -> Result<String, GdbError> {
        let deadline = Instant::now() + self.timeout;
        let mut buf = Vec::new();
        let mut skipped = 0;
        let mut chunk = [0u8; 4096];
        loop {
            while let Some(p) = take_packet(&mut buf) {
                let _ = self.stream.write_all(b"+");
                let reply = String::from_utf8_lossy(&p).into_owned();
                if reply.starts_with('T') || reply.starts_with('S') {
                    skipped += 1;
                    if skipped > MAX_SKIPPED {
                        return Err(GdbError::Timeout(what.into()));
                    }
                    continue;
                }
                return Ok(reply);
            }
            if buf.len() > MAX_PACKET {
                return Err(GdbError::Reply {
                    request: what.into(),
                    reply: format!("more than {MAX_PACKET} bytes"),
                });
            }
            if Instant::now() >= deadline {
                return Err(GdbError::Timeout(what.into()));
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    return Err(io(format!("reading the reply to `{what}`"))(
                        std::io::ErrorKind::UnexpectedEof.into(),
                    ))
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(io(format!("reading the reply to `{what}`"))(e)),
            }
        }
    }

    /// Writes `data` at guest-physical `gpa` through QEMU's memory API.
    pub fn write_phys(&mut self, gpa: u64, data: &[u8]) -> Result<(), GdbError> {
        let mut at = gpa;
        for c in data.chunks(CHUNK) {
            let mut p = format!("M{at:x},{:x}:", c.len());
            let what = p.trim_end_matches(':').to_owned();
            for b in c {
                p.push_str(&format!("{b:02x}"));
            }
            self.command(&p, &what)?;
            at += c.len() as u64;
        }
        Ok(())
    }

    /// Stops QEMU's gdbstub (best effort: QEMU may be gone).
    pub fn stop(&self, q: &mut Qmp) {
        let _ = q.hmp("gdbserver none", None);
    }
}

impl Drop for Gdb {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_and_packets() {
        assert_eq!(frame("OK"), b"$OK#9a");
        let mut buf = b"+$T02thread:01;#07$O".to_vec();
        assert_eq!(take_packet(&mut buf).unwrap(), b"T02thread:01;");
        assert_eq!(take_packet(&mut buf), None, "a packet not whole yet");
        buf.extend_from_slice(b"K#9a");
        assert_eq!(take_packet(&mut buf).unwrap(), b"OK");
        assert!(buf.is_empty());
        let mut junk = b"no packet here".to_vec();
        assert_eq!(take_packet(&mut junk), None);
    }
}
