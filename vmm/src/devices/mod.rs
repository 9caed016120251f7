//! Port-I/O devices, the virtio-mmio devices, and their dispatch. The guest sees a 16550 UART on COM1
//! (and on COM2 when the VMM was given somewhere to write its output),
//! a CMOS RTC, an i8042 that can only reset, the ACPI sleep/reset register, a pvpanic
//! port, the boot-timer port, the call gate's doorbell and the module hooks' ports
//! (which the vCPU threads handle themselves). Unclaimed reads float high (0xff) like an
//! empty ISA bus, so probes for absent hardware fail fast. The virtio
//! devices (`--disk`) sit in the MMIO hole, one page each ([`virtio`]).

pub mod boot_timer;
pub mod cmos;
pub mod console_out;
pub mod doorbell;
pub mod module_hooks;
pub mod power;
pub mod pvpanic;
pub mod serial;
pub mod virtio;

use std::sync::{Arc, Mutex};

use boot_timer::BootTimer;
use serial::Console;

/// A guest action that ends the VM's run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestEvent {
    /// The guest wrote S5 (soft-off) to the ACPI sleep register.
    PowerOff,
    /// The guest asked for a reboot (ACPI reset register or i8042 reset line).
    Reset,
    /// The guest's pvpanic driver reported a kernel panic.
    Panic,
}

const COM1_START: u16 = serial::COM1_PORT;
const COM1_END: u16 = 0x3ff;
const COM2_START: u16 = serial::COM2_PORT;
const COM2_END: u16 = 0x2ff;
const I8042_DATA: u16 = 0x60;
const I8042_COMMAND: u16 = 0x64;

/// All port-I/O devices of one VM.
pub struct PioDevices {
    /// COM1: the guest's console, fed from the VMM's stdin.
    pub console: Console,
    /// COM2, output only; without it the ports float high and the guest's
    /// 8250 driver finds no UART there.
    com2: Option<Console>,
    i8042: Mutex<vm_superio::I8042Device<power::ResetLatch>>,
    cmos: cmos::Cmos,
    /// Logs when the guest's init reports it is up.
    pub boot_timer: BootTimer,
    /// Wakes the control thread when the call gate finishes a call.
    pub doorbell: doorbell::Doorbell,
    /// Where a vCPU stopped in a module hook sends its event.
    pub module_hooks: module_hooks::ModuleHooks,
    /// The virtio-mmio devices: each one's window base and transport.
    /// A device is served under its lock by the vCPU that touched it.
    /// Shared with a device's own thread (the net device's thread).
    virtio: Vec<VirtioSlot>,
}

/// One virtio device as the vCPUs reach it.
struct VirtioSlot {
    base: u64,
    transport: Arc<Mutex<virtio::mmio::MmioTransport>>,
    /// The device's interrupt status, read and acknowledged without the
    /// transport's lock (see [`virtio::mmio::MmioTransport::interrupt`]).
    interrupt: Arc<virtio::Interrupt>,
}

impl PioDevices {
    /// The devices of one VM; COM2 only when the VMM writes its output somewhere.
    pub fn new(console: Console, com2: Option<Console>, boot_timer: BootTimer) -> Self {
        Self {
            console,
            com2,
            i8042: Mutex::new(vm_superio::I8042Device::new(power::ResetLatch::default())),
            cmos: cmos::Cmos::default(),
            boot_timer,
            doorbell: doorbell::Doorbell::default(),
            module_hooks: module_hooks::ModuleHooks::default(),
            virtio: Vec::new(),
        }
    }

    /// Adds a virtio device whose register window starts at `base`
    /// ([`virtio::slot`]).
    pub fn add_virtio(&mut self, base: u64, transport: Arc<Mutex<virtio::mmio::MmioTransport>>) {
        let interrupt = match transport.lock() {
            Ok(t) => t.interrupt(),
            Err(poisoned) => poisoned.into_inner().interrupt(),
        };
        self.virtio.push(VirtioSlot {
            base,
            transport,
            interrupt,
        });
    }

    /// The virtio device whose window holds `addr`, and the offset in it.
    fn virtio_at(&self, addr: u64) -> Option<(&VirtioSlot, u64)> {
        self.virtio.iter().find_map(|slot| {
            let offset = addr.checked_sub(slot.base)?;
            (offset < virtio::MMIO_SIZE).then_some((slot, offset))
        })
    }

    /// Handles an MMIO read; false when no device claims `addr`.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((slot, offset)) = self.virtio_at(addr) else {
            return false;
        };
        data.fill(0);
        if offset == u64::from(virtio::INTERRUPT_STATUS_OFFSET) {
            // The guest's interrupt handler: no lock (whole 32-bit reads only).
            if let Ok(word) = <&mut [u8; 4]>::try_from(data) {
                *word = slot.interrupt.status().to_le_bytes();
            }
            return true;
        }
        if let Ok(mut t) = slot.transport.lock() {
            t.read(offset, data);
        }
        true
    }

    /// Handles an MMIO write; false when no device claims `addr`.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((slot, offset)) = self.virtio_at(addr) else {
            return false;
        };
        if offset == u64::from(virtio::INTERRUPT_ACK_OFFSET) {
            if let Ok(word) = <[u8; 4]>::try_from(data) {
                slot.interrupt.ack(u32::from_le_bytes(word));
            }
            return true;
        }
        if let Ok(mut t) = slot.transport.lock() {
            t.write(offset, data);
        }
        true
    }

    /// Handles an `in` from the guest.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        match port {
            COM1_START..=COM1_END => {
                if let Some(b) = data.first_mut() {
                    *b = self.console.read((port - COM1_START) as u8);
                }
            }
            COM2_START..=COM2_END => {
                if let (Some(b), Some(com2)) = (data.first_mut(), &self.com2) {
                    *b = com2.read((port - COM2_START) as u8);
                }
            }
            I8042_DATA | I8042_COMMAND => {
                if let (Some(b), Ok(mut dev)) = (data.first_mut(), self.i8042.lock()) {
                    *b = dev.read((port - I8042_DATA) as u8);
                }
            }
            pvpanic::PVPANIC_PORT => {
                if let Some(b) = data.first_mut() {
                    *b = pvpanic::read();
                }
            }
            cmos::INDEX_PORT | cmos::DATA_PORT => {
                if let Some(b) = data.first_mut() {
                    *b = self.cmos.read(port);
                }
            }
            p if power::claims(p) => power::read(p, data),
            _ => {}
        }
    }

    /// Handles an `out` from the guest; returns an event that ends the run.
    pub fn write(&self, port: u16, data: &[u8]) -> Option<GuestEvent> {
        if port == doorbell::DOORBELL_PORT {
            self.doorbell.ring();
            return None;
        }
        let value = *data.first()?;
        match port {
            COM1_START..=COM1_END => {
                self.console.write((port - COM1_START) as u8, value);
                None
            }
            COM2_START..=COM2_END => {
                if let Some(com2) = &self.com2 {
                    com2.write((port - COM2_START) as u8, value);
                }
                None
            }
            I8042_DATA | I8042_COMMAND => {
                let mut dev = self.i8042.lock().ok()?;
                // ResetLatch::trigger is infallible.
                let _ = dev.write((port - I8042_DATA) as u8, value);
                dev.reset_evt().take().then_some(GuestEvent::Reset)
            }
            pvpanic::PVPANIC_PORT => pvpanic::write(value),
            cmos::INDEX_PORT | cmos::DATA_PORT => {
                self.cmos.write(port, value);
                None
            }
            boot_timer::BOOT_TIMER_PORT => {
                self.boot_timer.record(value);
                None
            }
            p if power::claims(p) => power::write(p, value),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> PioDevices {
        PioDevices::new(Console::sink(), None, BootTimer::default())
    }

    #[test]
    fn com2_is_absent_unless_given_an_output() {
        let d = devices();
        let mut b = [0u8];
        // The 8250 driver's probe reads the scratch and line-status
        // registers; an empty bus answers 0xff and no UART is found.
        d.read(COM2_START + 7, &mut b);
        assert_eq!(b[0], 0xff);

        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Shared {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let com2 = Console::new("com2", irq, Box::new(Shared(out.clone()))).unwrap();
        let d = PioDevices::new(Console::sink(), Some(com2), BootTimer::default());
        d.write(COM2_START + 7, &[0x5a]);
        d.read(COM2_START + 7, &mut b);
        assert_eq!(b[0], 0x5a, "scratch register");
        for c in b"KLPV-X\n" {
            d.write(COM2_START, &[*c]);
        }
        assert_eq!(&out.lock().unwrap()[..], b"KLPV-X\n");
    }

    #[test]
    fn unclaimed_ports_float_high() {
        let d = devices();
        let mut buf = [0u8; 4];
        d.read(0xcfc, &mut buf);
        assert_eq!(buf, [0xff; 4]);
        assert_eq!(d.write(0xcf8, &[0, 0, 0, 0x80]), None);
    }

    #[test]
    fn i8042_reset_command_resets() {
        let d = devices();
        assert_eq!(d.write(I8042_COMMAND, &[0xaa]), None);
        assert_eq!(d.write(I8042_COMMAND, &[0xfe]), Some(GuestEvent::Reset));
        // The latch is consumed.
        assert_eq!(d.write(I8042_COMMAND, &[0xaa]), None);
    }

    #[test]
    fn acpi_sleep_and_reset() {
        let d = devices();
        assert_eq!(
            d.write(power::POWER_PORT, &[(5 << 2) | (1 << 5)]),
            Some(GuestEvent::PowerOff)
        );
        assert_eq!(
            d.write(power::POWER_PORT, &[crate::arch::x86_64::acpi::RESET_VALUE]),
            Some(GuestEvent::Reset)
        );
        assert_eq!(
            d.write(power::POWER_PORT, &[(3 << 2) | (1 << 5)]),
            None,
            "S3 is not supported"
        );
    }

    #[test]
    fn a_virtio_window_claims_its_page_only() {
        use virtio::block::Block;
        let path = std::env::temp_dir().join(format!("klpv-mmio-{}.img", std::process::id()));
        std::fs::File::create(&path).unwrap().set_len(4096).unwrap();
        let block = Block::open(&path, true).unwrap();
        let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(
            vm_memory::GuestAddress(0),
            0x10_0000,
        )])
        .unwrap();
        let irq = Arc::new(virtio::Interrupt::new(
            vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        let t = virtio::mmio::MmioTransport::new(Box::new(block), mem, irq.clone()).unwrap();
        let mut d = devices();
        let (base, _) = virtio::slot(0).unwrap();
        d.add_virtio(base, Arc::new(Mutex::new(t)));
        let mut w = [0u8; 4];
        assert!(d.mmio_read(base, &mut w));
        assert_eq!(&w, b"virt", "magic value");
        assert!(d.mmio_read(base + 8, &mut w));
        assert_eq!(u32::from_le_bytes(w), 2, "block device ID");
        assert!(d.mmio_read(base + 0x100, &mut w), "config space");
        assert_eq!(u32::from_le_bytes(w), 8, "capacity: 8 sectors");
        assert!(
            !d.mmio_read(base + virtio::MMIO_SIZE, &mut w),
            "next page is not ours"
        );
        assert!(!d.mmio_read(base - 4, &mut w));
        assert!(!d.mmio_write(base + virtio::MMIO_SIZE, &[0; 4]));

        // The interrupt registers answer while a device thread holds the
        // transport (here this thread: a lock taken again would hang).
        let status = base + u64::from(virtio::INTERRUPT_STATUS_OFFSET);
        let ack = base + u64::from(virtio::INTERRUPT_ACK_OFFSET);
        irq.trigger(virtio::VIRTIO_MMIO_INT_VRING);
        let held = d.virtio[0].transport.lock().unwrap();
        assert!(d.mmio_read(status, &mut w));
        assert_eq!(u32::from_le_bytes(w), virtio::VIRTIO_MMIO_INT_VRING);
        assert!(d.mmio_write(ack, &virtio::VIRTIO_MMIO_INT_VRING.to_le_bytes()));
        assert!(d.mmio_read(status, &mut w));
        assert_eq!(u32::from_le_bytes(w), 0);
        drop(held);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn pvpanic_reports_panic() {
        let d = devices();
        let mut b = [0u8];
        d.read(pvpanic::PVPANIC_PORT, &mut b);
        assert_eq!(b[0] & 1, 1, "advertises PANICKED");
        assert_eq!(
            d.write(pvpanic::PVPANIC_PORT, &[1]),
            Some(GuestEvent::Panic)
        );
    }
}
