//! Guest RAM through the QEMU process's own mappings: `/proc/PID/mem` at
//! the host-virtual address QEMU maps each guest-physical range at.
//!
//! Why this and not a shared `memory-backend-file`: it works for every
//! running VM as it is (anonymous RAM included, which is the default for
//! QEMU and libvirt), needs nothing from the operator at VM start, and
//! the layout comes from QEMU itself (`info mtree -f`, `gpa2hva`). A
//! backend file would be simpler to map but exists only when the VM was
//! started with one, and its offset-to-address layout would still have to
//! come from QEMU.
//!
//! The file descriptor is opened once: it stays bound to that process's
//! address space, so a QEMU that exits makes accesses fail (they do not
//! reach a process that reused the pid). Every access is checked against
//! the whole map before any byte moves: an access that is partly outside
//! RAM, or a write partly into ROM, does nothing.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

/// Why a guest RAM access, or setting it up, failed.
#[derive(Debug, thiserror::Error)]
pub enum RamError {
    /// `/proc/PID/mem` or `/proc/PID/maps` could not be opened or read.
    #[error("cannot use {path}: {source} (klpvisor needs ptrace access to the QEMU process: root, or the same user without Yama's ptrace_scope restriction)")]
    Proc {
        /// The file.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The range is not entirely in guest RAM (or ROM, for a read).
    #[error("guest-physical range {gpa:#x}+{len:#x} is not entirely in guest {what}")]
    OutOfRange {
        /// Guest-physical start of the access.
        gpa: u64,
        /// Its length in bytes.
        len: usize,
        /// "RAM or ROM" for a read, "RAM" for a write.
        what: &'static str,
    },
    /// A range QEMU reported is not mapped in its process.
    #[error("QEMU maps {name} (guest-physical {gpa:#x}+{len:#x}) at host {hva:#x}, but process {pid} has no mapping there: wrong process?")]
    NotMapped {
        /// The process.
        pid: u32,
        /// The memory region's name.
        name: String,
        /// Guest-physical start.
        gpa: u64,
        /// Length.
        len: u64,
        /// Host-virtual start.
        hva: u64,
    },
    /// Reading or writing the process's memory failed part way.
    #[error("{op} of {len:#x} bytes at guest-physical {gpa:#x} (host {hva:#x}) in process {pid} failed: {source}")]
    Access {
        /// "read" or "write".
        op: &'static str,
        /// The process.
        pid: u32,
        /// Guest-physical address of the chunk.
        gpa: u64,
        /// Host-virtual address of the chunk.
        hva: u64,
        /// The chunk's length.
        len: usize,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The process's address space is gone: QEMU exited (reads of an
    /// exited process's `/proc/PID/mem` return nothing).
    #[error("QEMU (process {pid}) has exited: its memory is gone")]
    Gone {
        /// The process.
        pid: u32,
    },
    /// The layout from QEMU is inconsistent (overlaps, overflow).
    #[error("QEMU's memory layout is unusable: {0}")]
    Layout(String),
}

/// One guest-physical range and where QEMU maps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapped {
    /// Guest-physical start.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
    /// Host-virtual start in the QEMU process.
    pub hva: u64,
    /// RAM (`true`) or ROM.
    pub writable: bool,
    /// QEMU's region name.
    pub name: String,
}

/// One piece of an access: (host-virtual address, offset in the buffer, length).
type Chunk = (u64, usize, usize);

/// Splits `[gpa, gpa+len)` over `map` (sorted, non-overlapping), or
/// `None` if any byte is outside it or (for `write`) in ROM.
pub fn resolve(map: &[Mapped], gpa: u64, len: usize, write: bool) -> Option<Vec<Chunk>> {
    let mut out = Vec::new();
    let mut done = 0usize;
    while done < len {
        let cur = gpa.checked_add(u64::try_from(done).ok()?)?;
        let i = map.partition_point(|m| m.gpa <= cur).checked_sub(1)?;
        let m = map.get(i)?;
        let off = cur - m.gpa;
        if off >= m.len || (write && !m.writable) {
            return None;
        }
        let n = usize::try_from(m.len - off)
            .unwrap_or(usize::MAX)
            .min(len - done);
        out.push((m.hva.checked_add(off)?, done, n));
        done += n;
    }
    Some(out)
}

/// Whether `[start, start+len)` is covered by the mappings of a
/// `/proc/PID/maps` text (contiguous entries may share the span).
pub fn covered_by_maps(maps: &str, start: u64, len: u64) -> bool {
    let Some(end) = start.checked_add(len) else {
        return false;
    };
    let mut spans: Vec<(u64, u64)> = maps
        .lines()
        .take(1 << 20)
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        })
        .collect();
    spans.sort_unstable();
    let mut reach = start;
    for (a, b) in spans {
        if a <= reach && b > reach {
            reach = b;
            if reach >= end {
                return true;
            }
        }
    }
    false
}

/// The guest's RAM and ROM as the QEMU process maps them.
#[derive(Debug)]
pub struct GuestRam {
    pid: u32,
    mem: File,
    map: Vec<Mapped>,
}

impl GuestRam {
    /// Opens `/proc/PID/mem` and checks that every range of `map` lies in
    /// a mapping of that process (`/proc/PID/maps`).
    pub fn open(pid: u32, mut map: Vec<Mapped>) -> Result<Self, RamError> {
        map.sort_by_key(|m| m.gpa);
        for w in map.windows(2) {
            if w[0].gpa.checked_add(w[0].len).is_none_or(|e| e > w[1].gpa) {
                return Err(RamError::Layout(format!(
                    "{} at {:#x} overlaps {} at {:#x}",
                    w[0].name, w[0].gpa, w[1].name, w[1].gpa
                )));
            }
        }
        let maps_path = format!("/proc/{pid}/maps");
        let maps = std::fs::read_to_string(&maps_path).map_err(|source| RamError::Proc {
            path: maps_path,
            source,
        })?;
        for m in &map {
            if m.len == 0 || !covered_by_maps(&maps, m.hva, m.len) {
                return Err(RamError::NotMapped {
                    pid,
                    name: m.name.clone(),
                    gpa: m.gpa,
                    len: m.len,
                    hva: m.hva,
                });
            }
        }
        let path = format!("/proc/{pid}/mem");
        let mem = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| RamError::Proc { path, source })?;
        Ok(Self { pid, mem, map })
    }

    /// The process whose memory this is.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The ranges, sorted by guest-physical address.
    pub fn map(&self) -> &[Mapped] {
        &self.map
    }

    /// Reads guest-physical memory (RAM or ROM); nothing is read unless
    /// every byte is mapped.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), RamError> {
        let len = buf.len();
        let chunks = resolve(&self.map, gpa, len, false).ok_or(RamError::OutOfRange {
            gpa,
            len,
            what: "RAM or ROM",
        })?;
        for (hva, at, n) in chunks {
            let piece = buf.get_mut(at..at + n).ok_or(RamError::OutOfRange {
                gpa,
                len,
                what: "RAM or ROM",
            })?;
            self.mem
                .read_exact_at(piece, hva)
                .map_err(|source| self.access("read", gpa + at as u64, hva, n, source))?;
        }
        Ok(())
    }

    /// Writes guest-physical RAM; nothing is written unless every byte is
    /// in a RAM range (a write reaching ROM or a hole is refused whole).
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), RamError> {
        let len = data.len();
        let chunks = resolve(&self.map, gpa, len, true).ok_or(RamError::OutOfRange {
            gpa,
            len,
            what: "RAM",
        })?;
        for (hva, at, n) in chunks {
            let piece = data.get(at..at + n).ok_or(RamError::OutOfRange {
                gpa,
                len,
                what: "RAM",
            })?;
            self.mem
                .write_all_at(piece, hva)
                .map_err(|source| self.access("write", gpa + at as u64, hva, n, source))?;
        }
        Ok(())
    }

    fn access(
        &self,
        op: &'static str,
        gpa: u64,
        hva: u64,
        len: usize,
        source: std::io::Error,
    ) -> RamError {
        if source.kind() == std::io::ErrorKind::UnexpectedEof
            || source.raw_os_error() == Some(libc::ESRCH)
        {
            return RamError::Gone { pid: self.pid };
        }
        RamError::Access {
            op,
            pid: self.pid,
            gpa,
            hva,
            len,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(gpa: u64, len: u64, hva: u64, writable: bool) -> Mapped {
        Mapped {
            gpa,
            len,
            hva,
            writable,
            name: "r".into(),
        }
    }

    #[test]
    fn accesses_split_over_ranges_or_are_refused_whole() {
        let map = vec![
            m(0, 0x1000, 0x10_0000, true),
            m(0x1000, 0x1000, 0x50_0000, false),
            m(0x3000, 0x1000, 0x90_0000, true),
        ];
        assert_eq!(
            resolve(&map, 0xff0, 0x20, false).unwrap(),
            vec![(0x10_0ff0, 0, 0x10), (0x50_0000, 0x10, 0x10)]
        );
        // Into ROM: a read goes, a write does not.
        assert!(resolve(&map, 0xff0, 0x20, true).is_none());
        // Across the hole at 0x2000.
        assert!(resolve(&map, 0x1ff0, 0x20, false).is_none());
        // Past the end, and wrapping.
        assert!(resolve(&map, 0x3ff0, 0x20, false).is_none());
        assert!(resolve(&map, u64::MAX, 2, false).is_none());
        assert_eq!(resolve(&map, 0x3000, 0, true).unwrap(), vec![]);
    }

    #[test]
    fn maps_coverage() {
        let maps = "7f0000000000-7f0000100000 rw-p 00000000 00:00 0 \n\
                    7f0000100000-7f0000200000 rw-p 00000000 00:00 0 \n\
                    7f0000300000-7f0000400000 rw-p 00000000 00:00 0 [heap]\n";
        assert!(covered_by_maps(maps, 0x7f00_0000_0000, 0x20_0000));
        assert!(covered_by_maps(maps, 0x7f00_0008_0000, 0x10_0000));
        assert!(!covered_by_maps(maps, 0x7f00_0010_0000, 0x20_0000));
        assert!(!covered_by_maps(maps, u64::MAX - 1, 8));
        assert!(!covered_by_maps("garbage\n", 0, 1));
    }

    /// Our own process stands in for QEMU: a buffer is "guest RAM".
    #[test]
    fn reads_and_writes_through_proc_mem() {
        let mut ram = vec![0u8; 0x2000];
        for (i, b) in ram.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let hva = ram.as_ptr() as u64;
        let map = vec![
            m(0x10_0000, 0x1000, hva, true),
            m(0x20_0000, 0x1000, hva + 0x1000, false),
        ];
        let g = GuestRam::open(std::process::id(), map).unwrap();
        let mut b = [0u8; 4];
        g.read(0x10_0010, &mut b).unwrap();
        assert_eq!(b, [16, 17, 18, 19]);
        g.write(0x10_0010, &[9, 9, 9, 9]).unwrap();
        g.read(0x10_0010, &mut b).unwrap();
        assert_eq!(b, [9; 4]);
        // A write that would reach ROM changes nothing.
        let before = std::hint::black_box(&ram)[0xff0..0x1010].to_vec();
        assert!(matches!(
            g.write(0x10_0ff0, &[0xee; 0x20]),
            Err(RamError::OutOfRange { .. })
        ));
        assert_eq!(std::hint::black_box(&ram)[0xff0..0x1010], before[..]);
        // A range the process does not map is refused at open.
        let e = GuestRam::open(std::process::id(), vec![m(0, 0x1000, 0x1000, true)]).unwrap_err();
        assert!(matches!(e, RamError::NotMapped { .. }), "{e}");
    }
}
