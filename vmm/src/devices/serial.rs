//! The serial ports: vm-superio 16550s whose interrupts are irqfds on their
//! ISA IRQs and whose output goes through a bounded buffer (`console_out`),
//! so a slow reader never stalls a vCPU.
//!
//! COM1 is the console: kernel messages, and input from the VMM's stdin.
//! COM2 (`vmm --serial2-out`) is output only, to a file or FIFO. The kernel
//! never prints there unless told to (`console=ttyS1`), so a program in the
//! guest that writes its lines to ttyS1 never has a kernel message spliced
//! into one, as can happen on the console, where printk writes straight to
//! the UART between the chunks of a process's write.
//!
//! # The transmitter's pace
//!
//! vm-superio's transmitter is empty again the moment a byte is written and
//! raises its "transmitter empty" (THRE) interrupt at once. Linux's 8250
//! driver answers that interrupt with the next 16 bytes of the tty's buffer
//! and then reads the interrupt identification again, in a loop, so a
//! program that writes to the port without pause (a console flood) kept a
//! CPU inside the port's interrupt handler for as long as it wrote: no
//! softirq, no kworker, no RCU quiescent state on that CPU. Nested, where
//! each port access is a costly exit, that was a livelock: the guest's RCU
//! stall detector fired, and work queued on that CPU (the tty's input, so
//! the guest never read its console again) never ran.
//!
//! A real UART cannot do that: its FIFO empties at the line's speed, about
//! 87 µs a byte at 115200 baud, and only then says so. Here the THRE
//! condition is ours ([`Transmitter`]; vm-superio keeps the receive side):
//! after a data write the transmitter is busy until
//! - the line, modelled at [`BYTE_TIME`] per byte, has sent what was
//!   written, and
//! - as long again has passed since the last byte as the guest spent
//!   writing that burst (at most [`MAX_BACKOFF`]), so the port's transmit
//!   interrupts take at most about half of a vCPU, however slow its exits,
//!
//! and only then is THRE pending (reported in the interrupt identification
//! and raised on the IRQ line, by a thread per port, [`pacer`]).
//! Received bytes interrupt at once, and the line status register still
//! says the transmitter is empty, so the kernel's own console output
//! (printk polls that register, byte by byte) is not slowed at all.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// I/O base of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u32 = 4;
/// I/O base of COM2.
pub const COM2_PORT: u16 = 0x2f8;
/// ISA IRQ of COM2.
pub const COM2_IRQ: u32 = 3;

/// The modelled line's time per byte: 10 bits (start, 8 data, stop) at
/// 115200 baud, the speed serial consoles are set to.
pub const BYTE_TIME: Duration = Duration::from_nanos(86_806);

/// The longest the transmitter stays busy for the guest's own time spent
/// writing the previous burst (a vCPU the host descheduled in the middle
/// of a burst would otherwise stretch it).
pub const MAX_BACKOFF: Duration = Duration::from_millis(10);

/// UART registers (offsets from the port base) and bits this module
/// handles itself; the rest is vm-superio's.
const DATA: u8 = 0;
const IER: u8 = 1;
const IIR: u8 = 2;
const LCR: u8 = 3;
const LCR_DLAB: u8 = 0x80;
const IER_THRI: u8 = 0x02;
const IIR_NO_INT: u8 = 0x01;
/// "Transmitter holding register empty", with the FIFO-enabled bits a
/// 16550A reports.
const IIR_THRE_FIFO: u8 = 0xc2;

/// The transmit side of the UART: when it is empty again, and whether the
/// guest has been told.
#[derive(Debug)]
struct Transmitter {
    /// The guest's IER "transmitter empty" bit (vm-superio never sees it).
    thri: bool,
    /// Bytes were written that the transmitter has not reported sent.
    busy: bool,
    /// THRE is pending: reported by the next IIR read that has nothing of
    /// higher priority, cleared by it or by a data write.
    pending: bool,
    /// When the modelled line will have sent every byte written so far.
    line_free: Instant,
    /// The first and the last byte of the burst written since the
    /// transmitter was last reported empty.
    burst: Option<(Instant, Instant)>,
}

impl Transmitter {
    fn new(now: Instant) -> Self {
        Self {
            thri: false,
            busy: false,
            pending: false,
            line_free: now,
            burst: None,
        }
    }

    /// The guest wrote a byte at `now`.
    fn byte(&mut self, now: Instant) {
        self.line_free = self.line_free.max(now) + BYTE_TIME;
        self.burst = Some(match self.burst {
            Some((first, _)) => (first, now),
            None => (now, now),
        });
        self.busy = true;
        self.pending = false;
    }

    /// When the transmitter is empty again: the line has sent every byte,
    /// and the guest has had as long again as its last burst took.
    fn empty_at(&self) -> Instant {
        match self.burst {
            Some((first, last)) => {
                let took = last.saturating_duration_since(first).min(MAX_BACKOFF);
                self.line_free.max(last + took)
            }
            None => self.line_free,
        }
    }

    /// At `now`, while busy: `Ok(raise)` once the transmitter is empty
    /// (raise the IRQ when that makes THRE pending), `Err(when)` to look
    /// again at `when`.
    fn settle(&mut self, now: Instant) -> Result<bool, Instant> {
        let at = self.empty_at();
        if now < at {
            return Err(at);
        }
        self.busy = false;
        self.burst = None;
        self.pending = self.thri;
        Ok(self.pending)
    }

    /// The guest wrote IER's THRE bit; whether that raises the interrupt
    /// (enabled while the transmitter is empty, as on a 16550).
    fn enable(&mut self, thri: bool) -> bool {
        let raise = thri && !self.thri && !self.busy;
        self.thri = thri;
        self.pending = if thri { self.pending || raise } else { false };
        raise
    }

    /// The interrupt identification the guest reads, from vm-superio's
    /// (`iir`, the receive side): THRE is reported only when nothing of
    /// higher priority is, and reporting it clears it.
    fn identify(&mut self, iir: u8) -> u8 {
        if self.pending && iir & IIR_NO_INT != 0 {
            self.pending = false;
            return IIR_THRE_FIFO;
        }
        iir
    }
}

/// An eventfd that KVM turns into an interrupt (KVM_IRQFD).
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

type Uart = Serial<IrqLine, NoEvents, Box<dyn Write + Send>>;

/// The UART and its transmitter, under one lock.
struct Port {
    uart: Uart,
    tx: Transmitter,
}

impl Port {
    fn raise(&self) {
        if let Err(e) = self.uart.interrupt_evt().trigger() {
            tracing::debug!("serial interrupt: {e}");
        }
    }

    fn dlab(&mut self) -> bool {
        self.uart.read(LCR) & LCR_DLAB != 0
    }
}

struct Shared {
    port: Mutex<Port>,
    /// Signalled when the transmitter turns busy, and at drop.
    busy: Condvar,
}

impl Shared {
    fn lock(&self) -> Option<MutexGuard<'_, Port>> {
        self.port.lock().ok()
    }
}

/// One serial port, shared by the vCPU threads, (COM1) the stdin reader,
/// and its pacer.
pub struct Console {
    shared: Arc<Shared>,
}

impl Console {
    /// A 16550 that raises its interrupt through `irq` (an irqfd) and
    /// writes its output to `out`; starts its pacer thread, `NAME-tx`.
    pub fn new(name: &str, irq: EventFd, out: Box<dyn Write + Send>) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            port: Mutex::new(Port {
                uart: Serial::new(IrqLine(irq), out),
                tx: Transmitter::new(Instant::now()),
            }),
            busy: Condvar::new(),
        });
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name(format!("{name}-tx"))
            .spawn(move || {
                crate::seccomp::enter_or_exit(crate::seccomp::Kind::Vmm);
                pacer(&weak);
            })?;
        Ok(Self { shared })
    }

    /// A console that discards output, for tests.
    #[cfg(test)]
    pub fn sink() -> Self {
        // An eventfd with no flags cannot fail to be created short of fd exhaustion.
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        Self::new("sink", irq, Box::new(std::io::sink())).expect("pacer thread")
    }

    /// A guest `in` from the UART register at `offset` from the port base (0xff if the UART is poisoned).
    pub fn read(&self, offset: u8) -> u8 {
        let Some(mut p) = self.shared.lock() else {
            return 0xff;
        };
        match offset {
            IER if !p.dlab() => p.uart.read(IER) | if p.tx.thri { IER_THRI } else { 0 },
            IIR => {
                let iir = p.uart.read(IIR);
                p.tx.identify(iir)
            }
            _ => p.uart.read(offset),
        }
    }

    /// A guest `out` to the UART register at `offset` from the port base.
    pub fn write(&self, offset: u8, value: u8) {
        let Some(mut p) = self.shared.lock() else {
            return;
        };
        let mut value = value;
        let mut raise = false;
        if !p.dlab() {
            match offset {
                DATA => p.tx.byte(Instant::now()),
                IER => {
                    raise = p.tx.enable(value & IER_THRI != 0);
                    value &= !IER_THRI;
                }
                _ => {}
            }
        }
        if let Err(e) = p.uart.write(offset, value) {
            tracing::debug!("serial write: {e:?}");
        }
        if raise {
            p.raise();
        }
        if p.tx.busy {
            self.shared.busy.notify_one();
        }
    }

    /// Queues host input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue(&self, bytes: &[u8]) -> usize {
        match self.shared.lock() {
            Some(mut p) => p.uart.enqueue_raw_bytes(bytes).unwrap_or(0),
            None => 0,
        }
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        // The pacer holds only a weak reference: waking it lets it see
        // the port is gone and end.
        self.shared.busy.notify_all();
    }
}

/// Reports the transmitter empty when it is ([`Transmitter::settle`]),
/// raising THRE if the guest enabled it. Ends once the port is dropped.
fn pacer(shared: &Weak<Shared>) {
    /// How long the pacer sleeps with nothing sent before it looks whether
    /// the port still exists.
    const IDLE: Duration = Duration::from_secs(1);
    loop {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let Some(mut p) = shared.lock() else {
            return;
        };
        let now = Instant::now();
        let wait = if p.tx.busy {
            match p.tx.settle(now) {
                Ok(raise) => {
                    if raise {
                        p.raise();
                    }
                    continue;
                }
                Err(at) => at.saturating_duration_since(now),
            }
        } else {
            IDLE
        };
        // Woken early by a new write; a spurious wake-up only looks again.
        let _ = shared.busy.wait_timeout(p, wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, us: u64) -> Instant {
        t0 + Duration::from_micros(us)
    }

    #[test]
    fn a_burst_is_reported_sent_when_the_line_has_sent_it() {
        let t0 = Instant::now();
        let mut tx = Transmitter::new(t0);
        assert!(tx.enable(true), "enabled while empty: THRE at once");
        assert_eq!(tx.identify(IIR_NO_INT), IIR_THRE_FIFO);
        assert_eq!(tx.identify(IIR_NO_INT), IIR_NO_INT, "reading it cleared it");
        // Sixteen bytes written within 15 µs: empty when the line has sent them.
        for i in 0..16 {
            tx.byte(at(t0, 10_000 + i));
        }
        assert_eq!(tx.identify(IIR_NO_INT), IIR_NO_INT, "busy: no THRE");
        let sent = at(t0, 10_000) + BYTE_TIME * 16;
        assert_eq!(tx.settle(at(t0, 10_100)), Err(sent));
        assert_eq!(tx.settle(sent), Ok(true));
        assert_eq!(tx.identify(IIR_NO_INT), IIR_THRE_FIFO);
    }

    #[test]
    fn a_slow_burst_buys_the_guest_as_long_again() {
        let t0 = Instant::now();
        let mut tx = Transmitter::new(t0);
        tx.enable(true);
        // The guest took 5 ms for a burst of 4 bytes (slow exits): the
        // transmitter is busy 5 ms past the last, though the line was
        // free long before.
        for us in [0, 1_000, 3_000, 5_000] {
            tx.byte(at(t0, us));
        }
        assert_eq!(tx.settle(at(t0, 6_000)), Err(at(t0, 10_000)));
        assert_eq!(tx.settle(at(t0, 10_000)), Ok(true));
        // Never longer than MAX_BACKOFF.
        tx.byte(at(t0, 20_000));
        tx.byte(at(t0, 80_000));
        assert_eq!(tx.settle(at(t0, 80_001)), Err(at(t0, 80_000) + MAX_BACKOFF));
    }

    #[test]
    fn input_comes_first_and_a_masked_or_rewritten_thre_is_gone() {
        let t0 = Instant::now();
        let mut tx = Transmitter::new(t0);
        tx.enable(true);
        // Received data outranks THRE; THRE stays for the next read.
        let rda = 0xc4;
        assert_eq!(tx.identify(rda), rda);
        assert_eq!(tx.identify(IIR_NO_INT), IIR_THRE_FIFO);
        // Disabled while busy: settling raises nothing.
        tx.byte(at(t0, 0));
        assert!(!tx.enable(false));
        assert_eq!(tx.settle(at(t0, 1_000)), Ok(false));
        assert_eq!(tx.identify(IIR_NO_INT), IIR_NO_INT);
        // Enabled while busy: THRE waits for the line.
        tx.byte(at(t0, 2_000));
        assert!(!tx.enable(true));
        assert_eq!(tx.identify(IIR_NO_INT), IIR_NO_INT);
        // A pending THRE is cleared by a data write.
        assert_eq!(tx.settle(at(t0, 3_000)), Ok(true));
        tx.byte(at(t0, 3_001));
        assert_eq!(tx.identify(IIR_NO_INT), IIR_NO_INT);
    }

    /// The port end to end, answered as Linux's 8250 driver does: on each
    /// interrupt, read IIR until it says "none", writing 16 bytes for each
    /// THRE. However the test thread is scheduled, the port never reports
    /// THRE before the line has sent every byte written before: a flood
    /// runs at the line's pace, not as fast as the handler can loop.
    /// (The backoff for slow bursts is [`Transmitter`]'s, tested above
    /// with explicit times.) Input still interrupts at once.
    #[test]
    fn a_flood_is_paced_and_input_is_not() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let c = Console::new("test", irq.try_clone().unwrap(), Box::new(std::io::sink())).unwrap();
        // Enable the THRE and RDA interrupts: THRE is raised at once.
        c.write(IER, 0b11);
        assert_eq!(c.read(IER) & 0b11, 0b11);
        assert_eq!(irq.read().unwrap(), 1);
        let start = Instant::now();
        let mut bytes = 0u32;
        while bytes < 800 {
            // One interrupt's handler.
            loop {
                let iir = c.read(IIR);
                if iir & IIR_NO_INT != 0 {
                    break;
                }
                assert_eq!(iir, IIR_THRE_FIFO);
                // Every byte written before this THRE has left the line.
                let sent = start.elapsed();
                assert!(
                    sent >= BYTE_TIME * bytes,
                    "THRE after {bytes} bytes at {sent:?}"
                );
                for b in 0..16u8 {
                    c.write(DATA, b'a' + b);
                }
                bytes += 16;
            }
            // Wait for the next interrupt. (One may find nothing: a burst
            // this thread was descheduled in the middle of can let the line
            // empty and interrupt before its last byte takes THRE back, as
            // on a real UART.)
            let deadline = Instant::now() + Duration::from_secs(10);
            while irq.read().is_err() {
                assert!(Instant::now() < deadline, "the transmitter never emptied");
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        // Input interrupts at once while the transmitter is busy (with
        // its interrupt masked, so the line emptying raises nothing).
        c.write(IER, 0b01);
        for _ in 0..64 {
            c.write(DATA, b'x');
        }
        let _ = irq.read();
        assert_eq!(c.enqueue(b"y"), 1);
        assert_eq!(irq.read().unwrap(), 1, "the input interrupt waited");
        assert_eq!(c.read(IIR) & 0x0f, 0x04, "received data is identified");
    }

    /// With DLAB set, offsets 0 and 1 are the divisor latch: no byte is
    /// sent and no interrupt enabled.
    #[test]
    fn the_divisor_latch_is_not_the_transmitter() {
        let c = Console::sink();
        c.write(LCR, LCR_DLAB);
        c.write(DATA, 1);
        c.write(IER, IER_THRI);
        assert_eq!(c.read(IER), IER_THRI, "the divisor's high byte");
        c.write(LCR, 0x03);
        assert_eq!(c.read(IER), 0);
        let p = c.shared.lock().unwrap();
        assert!(!p.tx.busy && !p.tx.thri);
    }
}
