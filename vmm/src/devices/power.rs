//! The hardware-reduced ACPI sleep control/status and reset registers, all on
//! one port (the FADT points there), plus the i8042 reset latch. Writing
//! SLP_TYP=5 with SLP_EN is soft-off; writing RESET_VALUE is a reboot.

use std::sync::atomic::{AtomicBool, Ordering};

use super::GuestEvent;
use crate::arch::x86_64::acpi::RESET_VALUE;

/// Sleep control and reset register; `POWER_PORT + 1` is sleep status.
pub const POWER_PORT: u16 = 0x600;
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7 << SLP_TYP_SHIFT;
/// SLP_TYPa of `\_S5_` in our DSDT.
const S5: u8 = 5;

/// Whether `port` is one of the sleep control/status ports.
pub fn claims(port: u16) -> bool {
    port == POWER_PORT || port == POWER_PORT + 1
}

/// A guest `in`: always zero (never woken, nothing to report).
pub fn read(_port: u16, data: &mut [u8]) {
    // Sleep status: never "woken"; nothing else to report.
    data.fill(0);
}

/// A guest `out`: S5 with SLP_EN powers off, RESET_VALUE on the control port reboots.
pub fn write(port: u16, value: u8) -> Option<GuestEvent> {
    if port != POWER_PORT {
        return None;
    }
    if value & SLP_EN != 0 && (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT == S5 {
        return Some(GuestEvent::PowerOff);
    }
    (value == RESET_VALUE).then_some(GuestEvent::Reset)
}

/// Remembers an i8042 "pulse reset line" command until the bus collects it.
#[derive(Debug, Default)]
pub struct ResetLatch(AtomicBool);

impl ResetLatch {
    /// Whether the i8042 asked for a reset since the last call; clears the latch.
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::SeqCst)
    }
}

impl vm_superio::Trigger for ResetLatch {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}
