//! virtio devices on the virtio-mmio transport (virtio 1.x, "version 2"
//! registers, modern only).
//!
//! Why MMIO and not PCI: the VMM has no PCI bus, and the guest kernel finds
//! virtio-mmio devices in the ACPI DSDT (`LNRO0005`, one register window and
//! one interrupt each; see `arch::x86_64::acpi`), which is all a small VMM
//! needs. The Debian kernel is built without `virtio_mmio.device=` command
//! line devices, so the DSDT is the only way in.
//!
//! Layout of this module, one job each:
//! - [`mmio`]: the transport, i.e. the register file, the device status
//!   state machine, feature negotiation and the queues' configuration;
//! - [`block`]: virtio-blk over a raw image file;
//! - [`net`]: virtio-net over a host tap device, served by its own thread
//!   (queue notifies reach it through KVM ioeventfds);
//! - [`Interrupt`] (here): the interrupt-status register and the irqfd that
//!   raises the device's line.
//!
//! Everything a device reads from guest memory (rings, descriptors, request
//! headers) is hostile input: it is bound-checked by `virtio-queue` and
//! `vm-memory`, and a request that does not make sense is answered with an
//! error status or puts the device in `NEEDS_RESET`; it never stops the VMM.

pub mod block;
pub mod mmio;
pub mod net;

use std::sync::atomic::{AtomicU32, Ordering};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS, VIRTIO_MMIO_QUEUE_NOTIFY,
};
pub use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

/// Guest-physical base of the first device's register window, in the
/// 32-bit MMIO hole well clear of the IOAPIC, LAPIC and KVM's TSS.
pub const MMIO_BASE: u64 = 0xd000_0000;
/// Size of each device's register window (one page, as QEMU and
/// Firecracker use: 0x100 bytes of registers, then the config space).
pub const MMIO_SIZE: u64 = 0x1000;
/// The GSIs (IOAPIC pins) handed to virtio devices, in order. They avoid
/// the ISA lines something else claims: the PIT (0), the i8042 (1, 12),
/// the UARTs (3, 4), the RTC (8), the ACPI SCI (9).
pub const GSIS: [u32; 5] = [5, 6, 7, 10, 11];
/// QueueNotify's offset in a device's window, where the VM's ioeventfds
/// listen (spec 4.2.2).
pub const QUEUE_NOTIFY_OFFSET: u32 = VIRTIO_MMIO_QUEUE_NOTIFY;
/// InterruptStatus's offset: read by the vCPU without the device's lock.
pub const INTERRUPT_STATUS_OFFSET: u32 = VIRTIO_MMIO_INTERRUPT_STATUS;
/// InterruptACK's offset: written by the vCPU without the device's lock.
pub const INTERRUPT_ACK_OFFSET: u32 = VIRTIO_MMIO_INTERRUPT_ACK;
/// How many virtio devices one VM may have (one GSI each).
pub const MAX_DEVICES: usize = GSIS.len();

/// Where device `index` (0-based, in the order the devices were given)
/// sits: its register window's base and its GSI. `None` past
/// [`MAX_DEVICES`].
pub fn slot(index: usize) -> Option<(u64, u32)> {
    let gsi = *GSIS.get(index)?;
    Some((MMIO_BASE + MMIO_SIZE * index as u64, gsi))
}

/// A device's interrupt line: the interrupt-status register the driver
/// reads and acknowledges, and the irqfd that raises the line. Shared with
/// any thread that completes requests (the net device's thread).
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// A line raised through `irqfd` (registered with KVM on the device's GSI).
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Sets `bits` ([`VIRTIO_MMIO_INT_VRING`], [`VIRTIO_MMIO_INT_CONFIG`])
    /// in the status register and raises the line.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        // A full eventfd counter (2^64 - 2) still raises the line; nothing
        // else can go wrong with a write to an eventfd we own.
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("virtio interrupt: {e}");
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// InterruptACK: the driver has seen `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Clears the status register (device reset).
    fn clear(&self) {
        self.status.store(0, Ordering::Release);
    }
}

/// Why a device stopped processing a queue. Any of these sets the device's
/// `NEEDS_RESET` status bit: the driver must reset it before it works again.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The available ring or a used-ring update is not where the driver
    /// said (outside guest memory, or an index beyond the queue size).
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    /// A descriptor chain the device cannot even answer (no status byte).
    #[error("descriptor chain at {head}: {reason}")]
    Chain {
        /// The chain's head descriptor index.
        head: u16,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// What a device implements; [`mmio::MmioTransport`] does the rest.
pub trait VirtioDevice: Send {
    /// The virtio device ID (`VIRTIO_ID_BLOCK`, ...).
    fn device_type(&self) -> u32;
    /// The maximum size of each of its queues; their number is the length.
    fn queue_max_sizes(&self) -> &[u16];
    /// The feature bits the device offers (the transport adds
    /// `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space at `offset`; bytes
    /// past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space; the devices here have no writable
    /// fields, so by default the write is ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(offset, len = data.len(), "ignored virtio config write");
    }
    /// The driver set `DRIVER_OK` after accepting `acked_features` (a
    /// subset of [`VirtioDevice::features`] with `VIRTIO_F_VERSION_1`).
    fn activate(&mut self, acked_features: u64) {
        let _ = acked_features;
    }
    /// The driver notified queue `index`: process what it made available.
    /// Returns whether the used ring changed (then the transport raises
    /// the vring interrupt).
    fn process_queue(
        &mut self,
        index: u16,
        queue: &mut virtio_queue::Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError>;
    /// The driver reset the device: forget every in-flight state.
    fn reset(&mut self) {}
}
