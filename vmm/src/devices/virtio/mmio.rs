//! The virtio-mmio transport, version 2 (virtio 1.x "modern" devices only):
//! the register window the guest driver programs, the device status state
//! machine, feature negotiation and the queues' addresses.
//!
//! Why modern only: legacy (version 1) devices need the guest page size and
//! PFN-addressed rings, and every driver this VMM boots speaks virtio 1.x.
//! `FEATURES_OK` is refused unless the driver accepted `VIRTIO_F_VERSION_1`,
//! so a legacy driver fails cleanly at probe time instead of misreading
//! the device.
//!
//! The state machine follows the spec's driver initialisation sequence
//! (ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK): a status bit is only
//! taken after its predecessor, bits are never cleared except by writing
//! 0 (reset), feature bits are only written between DRIVER and FEATURES_OK,
//! and queue registers only between FEATURES_OK and DRIVER_OK. Writes out
//! of order are ignored (and logged): a confused or hostile driver gets a
//! device that does not work, never a VMM that stops.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{Interrupt, VirtioDevice, VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

/// "virt" in little-endian: the MagicValue register.
const MAGIC: u32 = 0x7472_6976;
/// The transport version: 2 is virtio 1.x (modern).
const VERSION: u32 = 2;
/// VendorID: "KLPV", ours.
const VENDOR: u32 = 0x5650_4c4b;

/// One virtio device behind its virtio-mmio register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    /// Per queue: the driver wrote a value the queue refused.
    bad_queues: Vec<bool>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    status: u32,
}

impl MmioTransport {
    /// `device` on guest memory `mem`, interrupting through `interrupt`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            device,
            mem,
            interrupt,
            bad_queues: vec![false; queues.len()],
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            status: 0,
        })
    }

    /// The device status register (for tests and logs).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | (1 << VIRTIO_F_VERSION_1)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Whether the driver may program queues now: after FEATURES_OK,
    /// before DRIVER_OK.
    fn queues_writable(&self) -> bool {
        self.status & (VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK)
            == VIRTIO_CONFIG_S_FEATURES_OK
    }

    /// A read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            data.fill(0);
            self.device
                .read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        // Registers are 32 bits wide and read whole (spec 4.2.2.2).
        let Ok(word) = <&mut [u8; 4]>::try_from(data) else {
            tracing::debug!(offset, "virtio-mmio: register read not 32 bits wide");
            return;
        };
        let select_half = |features: u64, select: u32| match select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        let value = match offset as u32 {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                select_half(self.offered_features(), self.device_features_select)
            }
            VIRTIO_MMIO_QUEUE_NUM_MAX => {
                self.selected_queue().map_or(0, |q| u32::from(q.max_size()))
            }
            VIRTIO_MMIO_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status,
            // The configuration space never changes under the driver.
            VIRTIO_MMIO_CONFIG_GENERATION => 0,
            // No shared memory regions: length -1 says so.
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            _ => {
                tracing::debug!(
                    offset,
                    "virtio-mmio: read of a write-only or unknown register"
                );
                0
            }
        };
        *word = value.to_le_bytes();
    }

    /// A write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            self.device
                .write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        let Ok(word) = <[u8; 4]>::try_from(data) else {
            tracing::debug!(offset, "virtio-mmio: register write not 32 bits wide");
            return;
        };
        let v = u32::from_le_bytes(word);
        match offset as u32 {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = v,
            VIRTIO_MMIO_DRIVER_FEATURES => self.set_driver_features(v),
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = v,
            VIRTIO_MMIO_QUEUE_NOTIFY => self.notify(v),
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            VIRTIO_MMIO_STATUS => self.set_status(v),
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue(offset as u32, v),
            _ => tracing::debug!(
                offset,
                "virtio-mmio: write to a read-only or unknown register"
            ),
        }
    }

    fn set_driver_features(&mut self, v: u32) {
        if self.status & (VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK)
            != VIRTIO_CONFIG_S_DRIVER
        {
            tracing::warn!("virtio-mmio: driver features written outside negotiation, ignored");
            return;
        }
        // Bits the device did not offer are dropped: the driver cannot
        // turn on what the device does not implement.
        let offered = self.offered_features();
        let (mask, bits) = match self.driver_features_select {
            0 => (0xffff_ffff, u64::from(v)),
            1 => (0xffff_ffff_0000_0000, u64::from(v) << 32),
            _ => return,
        };
        self.acked_features = (self.acked_features & !mask) | (bits & offered);
    }

    fn write_queue(&mut self, register: u32, v: u32) {
        if !self.queues_writable() {
            tracing::warn!(
                register,
                "virtio-mmio: queue register written outside set-up, ignored"
            );
            return;
        }
        let index = self.queue_select as usize;
        let (Some(q), Some(bad)) = (self.queues.get_mut(index), self.bad_queues.get_mut(index))
        else {
            tracing::debug!("virtio-mmio: write to an absent queue");
            return;
        };
        let low = |old: u64| GuestAddress((old & !0xffff_ffff) | u64::from(v));
        let high = |old: u64| GuestAddress((old & 0xffff_ffff) | (u64::from(v) << 32));
        // `virtio-queue` keeps the old value when a new one is invalid (a
        // size that is 0, too big or not a power of two, a misaligned
        // ring): remember it, so DRIVER_OK finds the queue broken rather
        // than running on values the driver did not ask for.
        let result = match register {
            VIRTIO_MMIO_QUEUE_NUM => u16::try_from(v)
                .map_err(|_| virtio_queue::Error::InvalidSize)
                .and_then(|size| q.try_set_size(size)),
            VIRTIO_MMIO_QUEUE_READY => {
                q.set_ready(v == 1);
                Ok(())
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW => q.try_set_desc_table_address(low(q.desc_table())),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => q.try_set_desc_table_address(high(q.desc_table())),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.try_set_avail_ring_address(low(q.avail_ring())),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.try_set_avail_ring_address(high(q.avail_ring())),
            VIRTIO_MMIO_QUEUE_USED_LOW => q.try_set_used_ring_address(low(q.used_ring())),
            VIRTIO_MMIO_QUEUE_USED_HIGH => q.try_set_used_ring_address(high(q.used_ring())),
            _ => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(queue = index, "virtio-mmio: {e}");
            *bad = true;
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        if v & old != old {
            tracing::warn!(
                old,
                new = v,
                "virtio-mmio: driver cleared status bits without a reset, ignored"
            );
            return;
        }
        let added = v & !old;
        if added & VIRTIO_CONFIG_S_FAILED != 0 {
            tracing::warn!("virtio-mmio: the driver gave up on the device (FAILED)");
            self.status |= VIRTIO_CONFIG_S_FAILED;
            return;
        }
        // Each step needs the one before it, in the spec's order.
        let order = [
            (VIRTIO_CONFIG_S_ACKNOWLEDGE, 0),
            (VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_ACKNOWLEDGE),
            (VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_DRIVER),
            (VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK),
        ];
        let known = order.iter().fold(0, |a, (bit, _)| a | bit);
        if added & !known != 0 {
            tracing::warn!(
                new = v,
                "virtio-mmio: driver set a device-only status bit, ignored"
            );
            return;
        }
        for (bit, needs) in order {
            if added & bit == 0 {
                continue;
            }
            if v & needs != needs {
                tracing::warn!(new = v, "virtio-mmio: status bits out of order, ignored");
                return;
            }
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0
        {
            // The driver reads the status back and sees FEATURES_OK
            // missing: the device is unusable for a legacy driver.
            tracing::warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1; legacy drivers are not supported");
            self.status = v & !(VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK);
            return;
        }
        self.status = v;
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            let mem = &self.mem;
            let broken = self
                .queues
                .iter()
                .zip(&self.bad_queues)
                .any(|(q, bad)| q.ready() && (*bad || !q.is_valid(mem)));
            if broken {
                tracing::warn!("virtio-mmio: a ready queue is outside guest memory or badly sized");
                self.needs_reset();
                return;
            }
            self.device.activate(self.acked_features);
        }
    }

    fn notify(&mut self, v: u32) {
        // Without VIRTIO_F_NOTIFICATION_DATA the value is the queue index.
        let Ok(index) = u16::try_from(v) else {
            return;
        };
        if !self.run_queue(index) {
            tracing::debug!(index, "virtio-mmio: notify of a queue not running, ignored");
        }
    }

    /// Runs queue `index` for the device's own back end (the net device's
    /// device thread, on a notify through its ioeventfd or when frames
    /// arrive): as a notify from the driver would.
    /// Returns false when the queue is not running (no DRIVER_OK yet, the
    /// device needs a reset, or the queue is absent or not ready).
    pub fn process_from_backend(&mut self, index: u16) -> bool {
        self.run_queue(index)
    }

    fn run_queue(&mut self, index: u16) -> bool {
        if self.status & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET)
            != VIRTIO_CONFIG_S_DRIVER_OK
        {
            return false;
        }
        let Some(queue) = self.queues.get_mut(usize::from(index)) else {
            return false;
        };
        if !queue.ready() {
            return false;
        }
        match self.device.process_queue(index, queue, &self.mem) {
            Ok(true) => {
                if interrupt_wanted(queue, &self.mem, self.acked_features) {
                    self.interrupt.trigger(VIRTIO_MMIO_INT_VRING);
                }
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(index, "virtio-mmio: {e}; the device needs a reset");
                self.needs_reset();
            }
        }
        true
    }

    /// The interrupt line and status register, which the vCPU reads and
    /// acknowledges without taking the transport's lock: a device thread
    /// that holds it for a batch of frames must not stall the guest's
    /// interrupt handler.
    pub fn interrupt(&self) -> Arc<Interrupt> {
        self.interrupt.clone()
    }

    /// Stops the device until the driver resets it, and tells the driver
    /// with a configuration-change interrupt (spec 2.1.2).
    fn needs_reset(&mut self) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
        self.interrupt.trigger(VIRTIO_MMIO_INT_CONFIG);
    }

    fn reset(&mut self) {
        self.status = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.bad_queues.fill(false);
        self.interrupt.clear();
        self.device.reset();
    }
}

/// Whether the driver wants an interrupt for the used entries just added
/// to `queue`. Without `VIRTIO_F_EVENT_IDX` (not offered) a driver sets
/// `VRING_AVAIL_F_NO_INTERRUPT` while it polls the queue anyway (Linux
/// does, for the whole of a NAPI poll and of virtio-blk's completion
/// loop), and the device should not interrupt it then (spec 2.7.7). Each
/// such interrupt costs the guest two exits to the VMM (the status read
/// and the acknowledgement), the dearest thing a frame does nested.
///
/// No interrupt is lost: the used index was written before the flags are
/// read (the fence), and the driver clears the flag before it reads the
/// used index again, so either the device sees the flag cleared or the
/// driver sees the new entries. An unreadable ring interrupts.
fn interrupt_wanted(queue: &Queue, mem: &GuestMemoryMmap, acked_features: u64) -> bool {
    if acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0 {
        // The flags are not the driver's word then; the queue's own
        // event-index check would be.
        return true;
    }
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    match mem.load::<u16>(
        GuestAddress(queue.avail_ring()),
        std::sync::atomic::Ordering::SeqCst,
    ) {
        Ok(flags) => flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0,
        Err(_) => true,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::QueueError;
    use vmm_sys_util::eventfd::EventFd;

    /// A device with one queue that counts notifications.
    struct Dummy {
        notified: Arc<std::sync::atomic::AtomicU32>,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = offset as u8 + i as u8;
            }
        }
        fn process_queue(
            &mut self,
            _: u16,
            _: &mut Queue,
            _: &GuestMemoryMmap,
        ) -> Result<bool, QueueError> {
            self.notified
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(true)
        }
    }

    pub(crate) fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn transport() -> (MmioTransport, Arc<std::sync::atomic::AtomicU32>) {
        let notified = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let t = MmioTransport::new(
            Box::new(Dummy {
                notified: notified.clone(),
            }),
            memory(),
            irq,
        )
        .unwrap();
        (t, notified)
    }

    fn r(t: &mut MmioTransport, off: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u32, v: u32) {
        t.write(u64::from(off), &v.to_le_bytes());
    }

    /// The Linux driver's sequence up to DRIVER_OK, with a valid queue.
    pub(crate) fn bring_up(t: &mut MmioTransport, features: u64, queues: &[(u32, u64)]) {
        w(t, VIRTIO_MMIO_STATUS, 0);
        w(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        w(
            t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        w(t, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_FEATURES_OK);
        for (i, &(size, base)) in queues.iter().enumerate() {
            w(t, VIRTIO_MMIO_QUEUE_SEL, i as u32);
            w(t, VIRTIO_MMIO_QUEUE_NUM, size);
            w(t, VIRTIO_MMIO_QUEUE_DESC_LOW, base as u32);
            w(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, (base >> 32) as u32);
            w(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (base + 0x1000) as u32);
            w(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
            w(t, VIRTIO_MMIO_QUEUE_USED_LOW, (base + 0x2000) as u32);
            w(t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
            w(t, VIRTIO_MMIO_QUEUE_READY, 1);
        }
        w(
            t,
            VIRTIO_MMIO_STATUS,
            s | VIRTIO_CONFIG_S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK,
        );
    }

    #[test]
    fn identifies_as_a_modern_device() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MAGIC);
        assert_eq!(r(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), 42);
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
            1,
            "VERSION_1 is bit 32"
        );
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1 << 3);
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "no second queue");
        let mut c = [0u8; 2];
        t.read(0x104, &mut c);
        assert_eq!(c, [4, 5], "config space at 0x100");
        // A narrow register read is ignored, not a panic.
        let mut b = [0xaau8; 2];
        t.read(u64::from(VIRTIO_MMIO_MAGIC_VALUE), &mut b);
        assert_eq!(b, [0xaa; 2]);
    }

    #[test]
    fn feature_negotiation_needs_version_1_and_drops_unoffered_bits() {
        let (mut t, _) = transport();
        bring_up(&mut t, (1 << 3) | (1 << 5) | (1 << 32), &[(16, 0x1_0000)]);
        assert_eq!(
            t.acked_features(),
            (1 << 3) | (1 << 32),
            "bit 5 was not offered"
        );
        assert_ne!(t.status() & VIRTIO_CONFIG_S_DRIVER_OK, 0);

        // A legacy driver (no VERSION_1) never gets FEATURES_OK.
        bring_up(&mut t, 1 << 3, &[(16, 0x1_0000)]);
        assert_eq!(t.status() & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        assert_eq!(t.status() & VIRTIO_CONFIG_S_DRIVER_OK, 0);
    }

    #[test]
    fn status_bits_out_of_order_are_ignored() {
        let (mut t, _) = transport();
        w(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER_OK);
        assert_eq!(t.status(), 0);
        w(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        assert_eq!(t.status(), VIRTIO_CONFIG_S_ACKNOWLEDGE);
        // Features cannot be written before DRIVER.
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1 << 3);
        assert_eq!(t.acked_features(), 0);
        // Queue registers cannot be written before FEATURES_OK.
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
    }

    #[test]
    fn notify_processes_and_interrupts_only_when_live() {
        let (mut t, notified) = transport();
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(notified.load(std::sync::atomic::Ordering::SeqCst), 0);
        bring_up(&mut t, 1 << 32, &[(16, 0x1_0000)]);
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 7);
        assert_eq!(notified.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(
            r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
        w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn no_interrupt_while_the_driver_says_it_polls() {
        let (mut t, notified) = transport();
        bring_up(&mut t, 1 << 32, &[(16, 0x1_0000)]);
        // The avail ring's flags (bring_up puts the ring a page up).
        let flags = GuestAddress(0x1_1000);
        t.mem.write_obj(1u16, flags).unwrap();
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(notified.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        t.mem.write_obj(0u16, flags).unwrap();
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(
            r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_VRING
        );
    }

    #[test]
    fn a_queue_outside_memory_needs_reset_and_reset_recovers() {
        let (mut t, notified) = transport();
        bring_up(&mut t, 1 << 32, &[(16, 0x4000_0000)]);
        assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert_eq!(
            r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS),
            VIRTIO_MMIO_INT_CONFIG
        );
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(notified.load(std::sync::atomic::Ordering::SeqCst), 0);
        // A queue size that is not a power of two is as bad.
        bring_up(&mut t, 1 << 32, &[(12, 0x1_0000)]);
        assert_ne!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);

        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(t.status(), 0);
        assert_eq!(t.acked_features(), 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        bring_up(&mut t, 1 << 32, &[(16, 0x1_0000)]);
        assert_eq!(t.status() & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(notified.load(std::sync::atomic::Ordering::SeqCst), 1);
    }
}
