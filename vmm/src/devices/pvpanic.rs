//! pvpanic on an I/O port (ACPI `QEMU0001`): Linux's pvpanic-mmio driver
//! writes PANICKED here from its panic notifier, which is how a guest panic
//! becomes a distinct VMM exit code instead of a silent hang.

use super::GuestEvent;

/// The pvpanic I/O port (the DSDT's `QEMU0001` device points the driver here).
pub const PVPANIC_PORT: u16 = 0x505;
const PVPANIC_PANICKED: u8 = 1 << 0;

/// The events we understand; the driver masks its notifications with this.
pub fn read() -> u8 {
    PVPANIC_PANICKED
}

/// A guest write: the PANICKED bit means the guest kernel panicked.
pub fn write(value: u8) -> Option<GuestEvent> {
    (value & PVPANIC_PANICKED != 0).then_some(GuestEvent::Panic)
}
