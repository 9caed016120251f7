//! Where a serial port's output goes: a bounded buffer drained to the
//! VMM's stdout (COM1, the console) or a file (COM2) by a thread of its own.
//!
//! The UART is written by vCPU threads, byte by byte, under the UART lock.
//! Writing each byte straight to stdout made a slow reader of stdout (a
//! terminal scrolled back, a pipe nobody drains) or a guest flooding its
//! console block the vCPU inside the guest's `outb`, and with it every
//! pause, which waits for all vCPUs. Here a write only appends to memory;
//! when the buffer is full the excess is dropped and counted, never waited
//! for. Output still appears at once: the drain thread wakes on every
//! write, so a prompt without a newline shows up immediately.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Console bytes held while stdout is slow, by default (`vmm
/// --console-buffer`): about 1 MiB, minutes of a
/// busy 115200-baud console, and bounded whatever the guest does.
pub const CAPACITY: usize = 1 << 20;

#[derive(Default)]
struct State {
    buf: VecDeque<u8>,
    /// Bytes dropped because the buffer was full, since start.
    dropped: u64,
    /// The drain thread holds bytes it took and has not written yet.
    writing: bool,
    /// No more output will come: the drain thread writes what is left and ends.
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Signalled when there is output to write, or at close.
    work: Condvar,
    /// Signalled when the buffer has been emptied.
    idle: Condvar,
    capacity: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The writing end the UART gets; never blocks on the output.
pub struct ConsoleOut(Arc<Shared>);

/// The VMM's handle on the drain, to flush what is left at exit.
pub struct ConsoleDrain(Arc<Shared>);

/// Starts the drain thread writing to `out`, holding at most `capacity`
/// bytes that `out` has not taken yet.
pub fn start(
    port: &'static str,
    out: Box<dyn Write + Send>,
    capacity: usize,
) -> std::io::Result<(ConsoleOut, ConsoleDrain)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        work: Condvar::new(),
        idle: Condvar::new(),
        capacity,
    });
    let for_thread = shared.clone();
    std::thread::Builder::new()
        .name(port.to_lowercase())
        .spawn(move || {
            crate::seccomp::enter_or_exit(crate::seccomp::Kind::Vmm);
            drain(port, &for_thread, out)
        })?;
    Ok((ConsoleOut(shared.clone()), ConsoleDrain(shared)))
}

fn drain(port: &str, shared: &Shared, mut out: Box<dyn Write + Send>) {
    let mut reported = 0;
    loop {
        let (chunk, dropped) = {
            let mut s = shared.lock();
            while s.buf.is_empty() && !s.closed {
                s = shared.work.wait(s).unwrap_or_else(|p| p.into_inner());
            }
            if s.buf.is_empty() {
                shared.idle.notify_all();
                return;
            }
            s.writing = true;
            let chunk: Vec<u8> = s.buf.drain(..).collect();
            (chunk, s.dropped)
        };
        if dropped > reported {
            tracing::warn!(
                dropped_bytes = dropped,
                "the guest wrote to {port} faster than its output took it; output was \
                 dropped rather than stall the vCPUs"
            );
            reported = dropped;
        }
        // A closed or broken stdout must not stop the guest: the bytes are
        // lost, as they would be on a disconnected serial line.
        let _ = out.write_all(&chunk).and_then(|()| out.flush());
        let mut s = shared.lock();
        s.writing = false;
        if s.buf.is_empty() {
            shared.idle.notify_all();
        }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let mut s = self.0.lock();
        let room = self.0.capacity.saturating_sub(s.buf.len());
        let (kept, lost) = bytes.split_at(bytes.len().min(room));
        s.buf.extend(kept);
        s.dropped = s.dropped.saturating_add(lost.len() as u64);
        drop(s);
        self.0.work.notify_one();
        // Dropped bytes count as written: the UART must not retry them.
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ConsoleDrain {
    /// Bytes dropped so far because stdout did not keep up.
    pub fn dropped(&self) -> u64 {
        self.0.lock().dropped
    }

    /// Waits up to `timeout` for everything buffered to reach stdout, then
    /// stops the drain thread once it has. Returns whether all of it was
    /// written: false when stdout stayed blocked.
    pub fn finish(self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = self.0.lock();
        s.closed = true;
        self.0.work.notify_one();
        while !s.buf.is_empty() || s.writing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .0
                .idle
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A stdout that takes nothing until told to, then records everything.
    struct Gated {
        open: mpsc::Receiver<()>,
        seen: Arc<Mutex<Vec<u8>>>,
        opened: bool,
    }

    impl Write for Gated {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if !self.opened {
                let _ = self.open.recv();
                self.opened = true;
            }
            self.seen.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_blocked_stdout_never_blocks_the_writer_and_the_excess_is_counted() {
        let (tx, rx) = mpsc::channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let out = Gated {
            open: rx,
            seen: seen.clone(),
            opened: false,
        };
        let (mut w, drain) = start("COM1", Box::new(out), 64).unwrap();
        // The drain thread may take the first write before it blocks; all
        // later ones fill the 64-byte buffer, then overflow it.
        let started = Instant::now();
        for _ in 0..1000 {
            assert_eq!(w.write(b"0123456789").unwrap(), 10);
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "writes never wait"
        );
        let dropped = drain.dropped();
        assert!(dropped >= 10_000 - 2 * 64, "dropped {dropped}");
        tx.send(()).unwrap();
        assert!(drain.finish(Duration::from_secs(10)));
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len() as u64 + dropped, 10_000);
        assert!(seen.starts_with(b"0123456789"), "kept in order");
    }

    #[test]
    fn finish_writes_everything_buffered_in_order() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        tx.send(()).unwrap();
        let out = Gated {
            open: rx,
            seen: seen.clone(),
            opened: false,
        };
        let (mut w, drain) = start("COM1", Box::new(out), CAPACITY).unwrap();
        let text: Vec<u8> = (0..100_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        for b in &text {
            w.write_all(std::slice::from_ref(b)).unwrap();
        }
        assert!(drain.finish(Duration::from_secs(10)));
        assert_eq!(*seen.lock().unwrap(), text);
    }

    #[test]
    fn finish_gives_up_on_a_stdout_that_never_takes_anything() {
        let (_tx, rx) = mpsc::channel();
        let out = Gated {
            open: rx,
            seen: Arc::new(Mutex::new(Vec::new())),
            opened: false,
        };
        let (mut w, drain) = start("COM1", Box::new(out), 1024).unwrap();
        w.write_all(b"stuck").unwrap();
        assert!(!drain.finish(Duration::from_millis(100)));
    }
}
