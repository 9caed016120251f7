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

use std::io::Write;
use std::sync::Mutex;

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

/// An eventfd that KVM turns into an interrupt (KVM_IRQFD).
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

type Uart = Serial<IrqLine, NoEvents, Box<dyn Write + Send>>;

/// One serial port, shared by the vCPU threads and (COM1) the stdin reader.
pub struct Console {
    uart: Mutex<Uart>,
}

impl Console {
    /// A 16550 that raises its interrupt through `irq` (an irqfd) and writes its output to `out`.
    pub fn new(irq: EventFd, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Mutex::new(Serial::new(IrqLine(irq), out)),
        }
    }

    /// A console that discards output, for tests.
    #[cfg(test)]
    pub fn sink() -> Self {
        // An eventfd with no flags cannot fail to be created short of fd exhaustion.
        let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        Self::new(irq, Box::new(std::io::sink()))
    }

    /// A guest `in` from the UART register at `offset` from the port base (0xff if the UART is poisoned).
    pub fn read(&self, offset: u8) -> u8 {
        match self.uart.lock() {
            Ok(mut u) => u.read(offset),
            Err(_) => 0xff,
        }
    }

    /// A guest `out` to the UART register at `offset` from the port base.
    pub fn write(&self, offset: u8, value: u8) {
        if let Ok(mut u) = self.uart.lock() {
            if let Err(e) = u.write(offset, value) {
                tracing::debug!("serial write: {e:?}");
            }
        }
    }

    /// Queues host input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue(&self, bytes: &[u8]) -> usize {
        match self.uart.lock() {
            Ok(mut u) => u.enqueue_raw_bytes(bytes).unwrap_or(0),
            Err(_) => 0,
        }
    }
}
