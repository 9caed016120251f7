//! A minimal MC146818 CMOS RTC on ports 0x70/0x71: the host's UTC time in
//! BCD, never "update in progress". Without it Linux's rtc_cmos driver spins
//! for seconds on a floating bus before giving up, and the guest boots with
//! the clock at 1970.

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// The index port: selects a CMOS register (bit 7 is the NMI mask).
pub const INDEX_PORT: u16 = 0x70;
/// The data port: reads or writes the selected register.
pub const DATA_PORT: u16 = 0x71;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_WEEKDAY: u8 = 0x06;
const REG_DAY: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_CENTURY: u8 = 0x32;

/// 32.768 kHz time base, 1024 Hz rate; UIP (bit 7) always clear.
const REG_A_VALUE: u8 = 0x26;
/// 24-hour mode, BCD.
const REG_B_VALUE: u8 = 0x02;
/// Valid RAM and time.
const REG_D_VALUE: u8 = 0x80;

/// Calendar fields of a UTC time.
#[derive(Debug, PartialEq, Eq)]
struct Civil {
    year: i64,
    month: u8,
    day: u8,
    weekday: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil(unix: i64) -> Civil {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    Civil {
        year,
        month,
        day,
        // 1970-01-01 was a Thursday; the RTC counts Sunday as 1.
        weekday: ((days + 4).rem_euclid(7) + 1) as u8,
        hour: (secs / 3600) as u8,
        minute: (secs / 60 % 60) as u8,
        second: (secs % 60) as u8,
    }
}

fn bcd(v: u8) -> u8 {
    ((v / 10) << 4) | (v % 10)
}

/// The RTC: an index latch and 128 bytes of CMOS RAM.
pub struct Cmos {
    state: Mutex<(u8, [u8; 128])>,
}

impl Default for Cmos {
    fn default() -> Self {
        Self {
            state: Mutex::new((0, [0; 128])),
        }
    }
}

impl Cmos {
    /// A guest `in`: the index, or the selected register (the time registers from the host's UTC clock, in BCD).
    pub fn read(&self, port: u16) -> u8 {
        let Ok(state) = self.state.lock() else {
            return 0xff;
        };
        if port == INDEX_PORT {
            return state.0;
        }
        let index = state.0 & 0x7f;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let t = civil(now);
        match index {
            REG_SECONDS => bcd(t.second),
            REG_MINUTES => bcd(t.minute),
            REG_HOURS => bcd(t.hour),
            REG_WEEKDAY => bcd(t.weekday),
            REG_DAY => bcd(t.day),
            REG_MONTH => bcd(t.month),
            REG_YEAR => bcd(t.year.rem_euclid(100) as u8),
            REG_CENTURY => bcd(t.year.div_euclid(100).clamp(0, 99) as u8),
            REG_A => REG_A_VALUE,
            REG_B => REG_B_VALUE,
            REG_C => 0,
            REG_D => REG_D_VALUE,
            i => state.1[usize::from(i)],
        }
    }

    /// A guest `out`: selects a register, or writes CMOS RAM (writes to the
    /// clock and status registers are dropped: they follow the host clock).
    pub fn write(&self, port: u16, value: u8) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        if port == INDEX_PORT {
            // Bit 7 is the NMI mask; keep it so reads of the index are faithful.
            state.0 = value;
            return;
        }
        let index = state.0 & 0x7f;
        // Time and status registers are derived from the host clock.
        if index > REG_D {
            state.1[usize::from(index)] = value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(
            civil(0),
            Civil {
                year: 1970,
                month: 1,
                day: 1,
                weekday: 5,
                hour: 0,
                minute: 0,
                second: 0
            }
        );
        // 2026-11-22 12:34:56 UTC, a Sunday.
        let t = civil(1795350896);
        assert_eq!((t.year, t.month, t.day, t.weekday), (2026, 11, 22, 1));
        assert_eq!((t.hour, t.minute, t.second), (12, 34, 56));
        // Leap day.
        let t = civil(951_782_400);
        assert_eq!((t.year, t.month, t.day), (2000, 2, 29));
    }

    #[test]
    fn registers() {
        let c = Cmos::default();
        c.write(INDEX_PORT, REG_A);
        assert_eq!(c.read(DATA_PORT) & 0x80, 0, "never update-in-progress");
        c.write(INDEX_PORT, 0x80 | REG_D);
        assert_eq!(c.read(DATA_PORT), REG_D_VALUE);
        c.write(INDEX_PORT, 0x40);
        c.write(DATA_PORT, 0x5a);
        assert_eq!(c.read(DATA_PORT), 0x5a, "CMOS RAM keeps writes");
        c.write(INDEX_PORT, REG_SECONDS);
        c.write(DATA_PORT, 0x99);
        assert!(c.read(DATA_PORT) < 0x60, "time comes from the host");
    }
}
