//! COM1: a vm-superio 16550 whose interrupt is an irqfd on ISA IRQ 4 and
//! whose output goes to the VMM's stdout through a bounded buffer
//! (`console_out`), so a slow stdout never stalls a vCPU.

use std::io::Write;
use std::sync::Mutex;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// I/O base of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// ISA IRQ of COM1.
pub const COM1_IRQ: u32 = 4;

/// An eventfd that KVM turns into an interrupt (KVM_IRQFD).
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

type Uart = Serial<IrqLine, NoEvents, Box<dyn Write + Send>>;

/// The serial console, shared by the vCPU threads and the stdin reader.
pub struct Console {
    uart: Mutex<Uart>,
}

impl Console {
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

    pub fn read(&self, offset: u8) -> u8 {
        match self.uart.lock() {
            Ok(mut u) => u.read(offset),
            Err(_) => 0xff,
        }
    }

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
