//! A copy-on-write view of a guest: reads fall through to the real guest,
//! writes land in private page copies and never reach it.
//!
//! Why: a plan can be dry-run against the live guest (or a read-only memory
//! dump) and its effect inspected through the ordinary page-table walker
//! before anything real is written, and offline tests can "apply" to a dump.
//! An overlay may also serve an arena range the inner guest does not have
//! (a memory dump has no reserved arena): that range reads as zeros until
//! written.

use crate::GuestPhys;
use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use crate::{Guest, VcpuRegs};

const PAGE: u64 = 4096;

/// Errors of the overlay (the inner guest's errors, boxed).
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// A read of the inner guest failed.
    #[error("{0}")]
    Inner(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// An access whose end overflows 64 bits.
    #[error("guest-physical range {gpa:#x}+{len:#x} wraps past the end of the address space")]
    Wraps {
        /// Guest-physical start of the access.
        gpa: u64,
        /// Its length in bytes.
        len: usize,
    },
}

/// Copy-on-write overlay over `inner`.
pub struct Overlay<'g, G: Guest + ?Sized> {
    inner: &'g G,
    /// Private copies of written pages, by page address.
    pages: Mutex<BTreeMap<u64, Box<[u8]>>>,
    /// Every write, in order: (gpa, len).
    log: Mutex<Vec<(u64, usize)>>,
    /// Arena reported instead of the inner guest's, if set.
    arena: Option<(GuestPhys, u64)>,
    /// Reported instead of the inner guest's arena tables.
    tables: Option<(GuestPhys, u64)>,
    /// Range served as zero-filled memory, not read from the inner guest.
    synthetic: Option<(u64, u64)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave a page half-updated in a
    // way that matters more than the panic itself: keep going.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<'g, G: Guest + ?Sized> Overlay<'g, G> {
    /// An overlay with no writes yet, reporting the inner guest's arena.
    pub fn new(inner: &'g G) -> Self {
        Self {
            inner,
            pages: Mutex::new(BTreeMap::new()),
            log: Mutex::new(Vec::new()),
            arena: None,
            tables: None,
            synthetic: None,
        }
    }

    /// Reports `(gpa, size)` as the arena instead of the inner guest's.
    pub fn with_arena(mut self, gpa: GuestPhys, size: u64) -> Self {
        self.arena = Some((gpa, size));
        self
    }

    /// Reports `(gpa, size)` as the region reserved for the arena's PTE
    /// pages (see [`Guest::arena_tables`]).
    pub fn with_arena_tables(mut self, gpa: GuestPhys, size: u64) -> Self {
        self.tables = Some((gpa, size));
        self
    }

    /// Reports `(gpa, size)` as the arena and serves it as zero-filled
    /// memory of the overlay's own (for guests without an arena, e.g. a
    /// dump: the range should lie outside the inner guest's RAM).
    pub fn with_synthetic_arena(mut self, gpa: GuestPhys, size: u64) -> Self {
        self.arena = Some((gpa, size));
        self.synthetic = Some((gpa.0, size));
        self
    }

    /// The guest underneath, which never sees the overlay's writes.
    pub fn inner(&self) -> &'g G {
        self.inner
    }

    /// Every write made through the overlay, in order: (gpa, len).
    pub fn write_log(&self) -> Vec<(u64, usize)> {
        lock(&self.log).clone()
    }

    /// Addresses of the pages the overlay holds private copies of.
    pub fn dirty_pages(&self) -> Vec<u64> {
        lock(&self.pages).keys().copied().collect()
    }

    fn in_synthetic(&self, page: u64) -> bool {
        self.synthetic
            .is_some_and(|(start, len)| page >= start && page - start < len)
    }

    /// Walks `[gpa, gpa + len)` page by page: (page address, offset in the
    /// page, offset in the buffer, chunk length).
    fn chunks(gpa: u64, len: usize) -> Result<Vec<(u64, usize, usize, usize)>, OverlayError> {
        gpa.checked_add(len as u64)
            .ok_or(OverlayError::Wraps { gpa, len })?;
        let mut out = Vec::new();
        let mut done = 0usize;
        while done < len {
            let cur = gpa + done as u64;
            let page = cur & !(PAGE - 1);
            let off = (cur - page) as usize;
            let n = (PAGE as usize - off).min(len - done);
            out.push((page, off, done, n));
            done += n;
        }
        Ok(out)
    }
}

impl<G: Guest + ?Sized> Guest for Overlay<'_, G> {
    type Error = OverlayError;

    fn read_phys(&self, gpa: GuestPhys, buf: &mut [u8]) -> Result<(), OverlayError> {
        let gpa = gpa.0;
        let pages = lock(&self.pages);
        for (page, off, at, n) in Self::chunks(gpa, buf.len())? {
            let Some(dst) = buf.get_mut(at..at + n) else {
                continue;
            };
            if let Some(copy) = pages.get(&page) {
                if let Some(src) = copy.get(off..off + n) {
                    dst.copy_from_slice(src);
                }
            } else if self.in_synthetic(page) {
                dst.fill(0);
            } else {
                self.inner
                    .read_phys(GuestPhys(page + off as u64), dst)
                    .map_err(|e| OverlayError::Inner(Box::new(e)))?;
            }
        }
        Ok(())
    }

    fn write_phys(&self, gpa: GuestPhys, data: &[u8]) -> Result<(), OverlayError> {
        let gpa = gpa.0;
        let chunks = Self::chunks(gpa, data.len())?;
        let mut pages = lock(&self.pages);
        for &(page, off, at, n) in &chunks {
            let copy = match pages.entry(page) {
                Entry::Occupied(o) => o.into_mut(),
                Entry::Vacant(v) => {
                    let mut fresh = vec![0u8; PAGE as usize].into_boxed_slice();
                    if !self.in_synthetic(page) {
                        self.inner
                            .read_phys(GuestPhys(page), &mut fresh)
                            .map_err(|e| OverlayError::Inner(Box::new(e)))?;
                    }
                    v.insert(fresh)
                }
            };
            if let (Some(dst), Some(src)) = (copy.get_mut(off..off + n), data.get(at..at + n)) {
                dst.copy_from_slice(src);
            }
        }
        lock(&self.log).push((gpa, data.len()));
        Ok(())
    }

    fn arena(&self) -> (GuestPhys, u64) {
        self.arena.unwrap_or_else(|| self.inner.arena())
    }

    /// The inner guest's, unless the arena was moved: the tables belong to
    /// the arena they were reserved for.
    fn arena_tables(&self) -> Option<(GuestPhys, u64)> {
        match (self.tables, self.arena) {
            (Some(t), _) => Some(t),
            (None, Some(_)) => None,
            (None, None) => self.inner.arena_tables(),
        }
    }

    fn vcpu_count(&self) -> usize {
        self.inner.vcpu_count()
    }

    fn vcpu_regs(&self, id: usize) -> Result<VcpuRegs, OverlayError> {
        self.inner
            .vcpu_regs(id)
            .map_err(|e| OverlayError::Inner(Box::new(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paging::test_support::FakePhys;

    #[test]
    fn writes_stay_in_the_overlay() {
        let m = FakePhys::new(0x3000);
        m.write_phys(GuestPhys(0xff8), &[1; 16]).unwrap();
        let o = Overlay::new(&m);
        o.write_phys(GuestPhys(0xffc), &[9, 9, 9, 9, 9, 9, 9, 9])
            .unwrap();
        let mut b = [0u8; 16];
        o.read_phys(GuestPhys(0xff8), &mut b).unwrap();
        assert_eq!(b, [1, 1, 1, 1, 9, 9, 9, 9, 9, 9, 9, 9, 1, 1, 1, 1]);
        m.read_phys(GuestPhys(0xff8), &mut b).unwrap();
        assert_eq!(b, [1; 16], "the inner guest is untouched");
        assert_eq!(o.dirty_pages(), vec![0, 0x1000]);
        assert_eq!(o.write_log(), vec![(0xffc, 8)]);
    }

    #[test]
    fn synthetic_arena_beyond_ram() {
        let m = FakePhys::new(0x1000);
        let o = Overlay::new(&m).with_synthetic_arena(GuestPhys(0x10_0000), 0x2000);
        assert_eq!(o.arena(), (GuestPhys(0x10_0000), 0x2000));
        let mut b = [7u8; 4];
        o.read_phys(GuestPhys(0x10_1ffc), &mut b).unwrap();
        assert_eq!(b, [0; 4]);
        o.write_phys(GuestPhys(0x10_0ffe), &[5, 6, 7, 8]).unwrap();
        o.read_phys(GuestPhys(0x10_0ffe), &mut b).unwrap();
        assert_eq!(b, [5, 6, 7, 8]);
        // Outside both: the inner guest's error.
        assert!(o.read_phys(GuestPhys(0x20_0000), &mut b).is_err());
        assert!(o.write_phys(GuestPhys(0x20_0000), &b).is_err());
        assert!(o.read_phys(GuestPhys(u64::MAX - 1), &mut b).is_err());
    }
}
