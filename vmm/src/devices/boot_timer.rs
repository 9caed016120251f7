//! Boot timer (Firecracker's convention): the guest's init writes 123 to port
//! 0x3f0 once userspace is up, and the VMM logs the time since it started.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The port the guest's init writes the boot marker to.
pub const BOOT_TIMER_PORT: u16 = 0x3f0;
/// The byte that marks userspace as up (any other value is ignored).
pub const BOOT_MARKER: u8 = 123;

/// When the VMM process began and when the guest first reported readiness.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    marked: OnceLock<Duration>,
}

impl Default for BootTimer {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl BootTimer {
    /// A timer counting from `start`, the VMM's start.
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            marked: OnceLock::new(),
        }
    }

    /// Handles a guest write to the port: the first boot marker fixes the boot time and is logged.
    pub fn record(&self, value: u8) {
        if value != BOOT_MARKER {
            return;
        }
        let elapsed = self.start.elapsed();
        if self.marked.set(elapsed).is_ok() {
            tracing::info!(
                boot_ms = elapsed.as_secs_f64() * 1e3,
                "guest boot marker: {:.1} ms from VMM start to guest init",
                elapsed.as_secs_f64() * 1e3
            );
        }
    }

    /// Time from VMM start to the first boot marker, if the guest wrote one.
    pub fn boot_time(&self) -> Option<Duration> {
        self.marked.get().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_first_marker_counts() {
        let t = BootTimer::default();
        t.record(1);
        assert!(t.boot_time().is_none());
        t.record(BOOT_MARKER);
        let first = t.boot_time().unwrap();
        t.record(BOOT_MARKER);
        assert_eq!(t.boot_time(), Some(first));
    }
}
