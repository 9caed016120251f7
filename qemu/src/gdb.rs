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
    use std::io::BufRead;

    /// A fake stub on one end of a socket pair: answers each packet with
    /// `answer(data)` (several packets, raw bytes), after a stop reply.
    fn fake_stub(
        mut answer: impl FnMut(&str) -> Vec<u8> + Send + 'static,
    ) -> (Gdb, std::thread::JoinHandle<Vec<String>>) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let h = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut r = std::io::BufReader::new(theirs.try_clone().unwrap());
            let mut w = theirs;
            loop {
                let mut buf = Vec::new();
                // Packets end with `#xx`: read up to '#', then two digits.
                match r.read_until(b'#', &mut buf) {
                    Ok(0) | Err(_) => return seen,
                    Ok(_) => {}
                }
                let mut sum = [0u8; 2];
                if r.read_exact(&mut sum).is_err() {
                    return seen;
                }
                let text = String::from_utf8_lossy(&buf).into_owned();
                let data = text
                    .trim_start_matches('+')
                    .trim_start_matches('$')
                    .trim_end_matches('#')
                    .to_owned();
                let _ = w.write_all(b"+");
                let _ = w.write_all(&frame("T02thread:01;"));
                let _ = w.write_all(&answer(&data));
                seen.push(data);
            }
        });
        let dir = std::env::temp_dir().join(format!("klpv-gdb-test-{}", std::process::id()));
        let g = Gdb {
            stream: ours,
            dir,
            timeout: Duration::from_millis(500),
        };
        (g, h)
    }

    #[test]
    fn writes_are_hex_packets_of_at_most_a_kib_and_stop_replies_are_skipped() {
        let (mut g, h) = fake_stub(|_| frame("OK"));
        let data: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        g.write_phys(0x1000, &data).unwrap();
        drop(g);
        let seen = h.join().unwrap();
        assert_eq!(seen.len(), 3);
        assert!(
            seen[0].starts_with("M1000,400:000102"),
            "{}",
            &seen[0][..20]
        );
        assert!(seen[1].starts_with("M1400,400:"));
        assert!(seen[2].starts_with("M1800,1c4:"));
        assert_eq!(seen[2].len(), "M1800,1c4:".len() + 2 * 0x1c4);
    }

    #[test]
    fn an_error_reply_a_flood_and_silence_are_errors() {
        let (mut g, _h) = fake_stub(|_| frame("E14"));
        let e = g.write_phys(0x1000, &[1, 2]).unwrap_err();
        assert!(
            matches!(e, GdbError::Reply { ref reply, .. } if reply == "E14"),
            "{e}"
        );

        let (mut g, _h) = fake_stub(|_| {
            let mut v = b"$".to_vec();
            v.extend(std::iter::repeat_n(b'x', MAX_PACKET + 10));
            v
        });
        let e = g.write_phys(0x1000, &[1]).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");

        let (mut g, _h) = fake_stub(|_| Vec::new());
        let t = Instant::now();
        let e = g.write_phys(0x1000, &[1]).unwrap_err();
        assert!(matches!(e, GdbError::Timeout(_)), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

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
