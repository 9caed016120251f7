//! The call gate's doorbell (see `klpvisor_engine::callback::gate`): the gate's
//! work function writes the number of the call it finished to this port,
//! and the control thread waiting for that call wakes at once instead of
//! polling guest memory.
//!
//! The guest can ring it at will; a ring only wakes the waiter, which then
//! reads and checks the mailbox itself.

use std::sync::{Condvar, Mutex};
use std::time::Instant;

pub use klpvisor_engine::callback::gate::DOORBELL_PORT;

/// Counts the gate's rings and wakes whoever waits for one.
#[derive(Debug, Default)]
pub struct Doorbell {
    /// Rings so far.
    rings: Mutex<u64>,
    rung: Condvar,
}

impl Doorbell {
    /// A guest `out` to the port.
    pub fn ring(&self) {
        let mut n = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        *n += 1;
        self.rung.notify_all();
    }

    /// Rings so far: pass it to [`Doorbell::wait_past`] to wait for the
    /// next one without missing a ring that comes in between.
    pub fn rings(&self) -> u64 {
        *self.rings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until more than `seen` rings happened or `deadline` passed;
    /// returns whether a ring came.
    pub fn wait_past(&self, seen: u64, deadline: Instant) -> bool {
        let mut n = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        while *n <= seen {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            n = match self.rung.wait_timeout(n, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_ring_wakes_a_waiter_and_none_times_out() {
        let bell = Arc::new(Doorbell::default());
        let seen = bell.rings();
        assert!(!bell.wait_past(seen, Instant::now() + Duration::from_millis(5)));
        let b = bell.clone();
        let t =
            std::thread::spawn(move || b.wait_past(seen, Instant::now() + Duration::from_secs(60)));
        bell.ring();
        assert!(t.join().unwrap());
        // A ring before the wait is not missed.
        assert!(bell.wait_past(seen, Instant::now()));
    }
}
