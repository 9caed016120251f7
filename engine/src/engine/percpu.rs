//! Per-CPU variables in patch code, as the kernel's module loader
//! (kernel/module/main.c) does them for a module's `.data..percpu`:
//!
//! - `percpu_modalloc`: a block of the section's size and alignment is
//!   allocated with `__alloc_reserved_percpu` (6.10+:
//!   `pcpu_alloc_noprof(size, align, true, GFP_KERNEL)`, which that name
//!   became a macro for). It runs in the guest kernel, in a kworker,
//!   through the call gate, before the patch is linked: its address goes
//!   into the relocations.
//! - `simplify_symbols`: every symbol in the section gets the block's
//!   address added ([`crate::link::Bases::percpu`]).
//! - `percpu_modcopy`: the section's bytes are copied into every possible
//!   CPU's copy (`block + __per_cpu_offset[cpu]` for each CPU of
//!   `__cpu_possible_mask`), here as writes of the plan that loads the
//!   patch's code, so in the same pause and before any of its code runs.
//! - `struct module`'s `percpu` and `percpu_size` are set
//!   ([`crate::register`]), so `is_module_percpu_address()` knows them.
//! - `free_percpu(mod->percpu)` once the patch's code is freed, or when
//!   the apply is abandoned; again through the gate, so after the pause
//!   that decided it.
//!
//! The engine owns each block from the allocation's return: first as
//! the apply's pending block, then in the patch's record (or a retired
//! record), then on the list of blocks to free. A free is taken off the
//! list once it is sent, whatever becomes of it, so a block is never
//! freed twice; one that cannot be sent stays listed and is tried again.
//!
//! Everything read from the guest (the CPU count, the possible mask, each
//! CPU's offset, the returned block) is bounded and checked before a byte
//! is written: guest memory is hostile input.

use klpvisor_guest::tasks::MAX_CPUS;
use klpvisor_guest::{Guest, Kernel, VirtRead};

use super::*;
use crate::callback::gate::GateError;
use crate::module::PerCpu;
use crate::write::{AllowKind, Allowed, Write};

/// `GFP_KERNEL` (`__GFP_RECLAIM | __GFP_IO | __GFP_FS`: bits 10, 11, 6
/// and 7 of 6.12's `gfp_types.h`, unchanged since long before 6.10, where
/// `pcpu_alloc_noprof` appeared). Older kernels take no flags: their
/// `__alloc_reserved_percpu` passes it.
const GFP_KERNEL: u64 = 0xcc0;

/// The lowest kernel-space address on x86-64 (4- and 5-level paging).
const KERNEL_SPACE: u64 = 0xff00_0000_0000_0000;

/// A patch's per-CPU block in the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PercpuBlock {
    /// The per-CPU address the guest's allocator returned (what
    /// `mod->percpu` holds): an offset from each CPU's per-CPU base.
    pub ptr: u64,
    /// Its size (`mod->percpu_size`).
    pub size: u64,
    /// The alignment it was allocated with.
    pub align: u64,
}

/// A block allocated for an apply that has not committed yet.
#[derive(Debug, Clone)]
pub(super) struct Pending {
    patch: String,
    block: PercpuBlock,
}

/// What a prepared apply needs of per-CPU memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct PercpuNeed {
    pub(super) size: u64,
    pub(super) align: u64,
    /// The block its link used; `None`: not allocated yet, so the plan was
    /// linked with a placeholder address and must never be written.
    pub(super) block: Option<PercpuBlock>,
}

/// Why per-CPU data of a patch cannot be set up or given back.
#[derive(Debug, thiserror::Error)]
pub enum PercpuError {
    /// Neither allocator the kernel's loader uses is in kallsyms.
    #[error(
        "the guest kernel has neither __alloc_reserved_percpu nor pcpu_alloc_noprof in \
         kallsyms: klpvisor cannot allocate the patch's per-CPU variables as the module loader \
         would (is it an SMP kernel?)"
    )]
    NoAllocator,
    /// A symbol the copy or the free needs is missing.
    #[error("the guest kernel has no {name} in kallsyms: {source}")]
    Symbol {
        /// The symbol.
        name: &'static str,
        /// The lookup's error.
        #[source]
        source: klpvisor_guest::KallsymsError,
    },
    /// The guest's allocator returned NULL.
    #[error(
        "{patch}: the guest could not allocate {size} bytes of per-CPU data (alignment \
         {align}): __alloc_reserved_percpu returned NULL (-ENOMEM). Modules and patches share \
         the kernel's reserved per-CPU memory (8 KiB on most kernels); unload a module or \
         remove a patch that uses it, or make this patch's per-CPU variables smaller"
    )]
    NoMemory {
        /// The patch.
        patch: String,
        /// Bytes asked for.
        size: u64,
        /// Alignment asked for.
        align: u64,
    },
    /// The allocation did not finish in time.
    #[error(
        "{patch}: allocating its per-CPU data did not finish ({progress}); the apply was \
         abandoned. If the guest completes it later, that block stays allocated in the guest"
    )]
    Unfinished {
        /// The patch.
        patch: String,
        /// How far the call got.
        progress: String,
    },
    /// A value read from the guest is impossible: the message says which.
    #[error("the guest's per-CPU data cannot be trusted: {0}")]
    Hostile(String),
    /// Guest memory the copy needs could not be read or translated.
    #[error("reading {what} at {va:#x} failed: {source}")]
    Read {
        /// What was read.
        what: &'static str,
        /// Kernel-virtual address.
        va: u64,
        /// The paging error.
        #[source]
        source: klpvisor_guest::PagingError,
    },
}

/// Kernel addresses the copy reads, from kallsyms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CpuSymbols {
    /// `nr_cpu_ids` (unsigned int).
    pub nr_cpu_ids: u64,
    /// `__cpu_possible_mask` (the `cpu_possible_mask` bitmap).
    pub possible_mask: u64,
    /// `__per_cpu_offset[]`.
    pub per_cpu_offset: u64,
}

impl CpuSymbols {
    fn from_kallsyms(kallsyms: &klpvisor_guest::Kallsyms) -> Result<Self, PercpuError> {
        let sym = |name: &'static str| {
            kallsyms
                .addr(name)
                .map_err(|source| PercpuError::Symbol { name, source })
        };
        Ok(Self {
            nr_cpu_ids: sym("nr_cpu_ids")?,
            possible_mask: sym("__cpu_possible_mask")?,
            per_cpu_offset: sym("__per_cpu_offset")?,
        })
    }
}

/// Every possible CPU and its per-CPU offset (`for_each_possible_cpu`,
/// `__per_cpu_offset[cpu]`), bounded: at most [`MAX_CPUS`] CPUs, bits of
/// the mask past `nr_cpu_ids` ignored, as the kernel's iterator ignores
/// them.
pub(crate) fn possible_cpus<M: VirtRead + ?Sized>(
    mem: &M,
    s: &CpuSymbols,
) -> Result<Vec<(u32, u64)>, PercpuError> {
    let read = |what, va| move |source| PercpuError::Read { what, va, source };
    let n = mem
        .read_u32(s.nr_cpu_ids)
        .map_err(read("nr_cpu_ids", s.nr_cpu_ids))?;
    if n == 0 || n > MAX_CPUS {
        return Err(PercpuError::Hostile(format!(
            "nr_cpu_ids is {n}, not 1 to {MAX_CPUS}"
        )));
    }
    let mut out = Vec::new();
    for word in 0..n.div_ceil(64) {
        let at = s
            .possible_mask
            .checked_add(u64::from(word) * 8)
            .ok_or_else(|| PercpuError::Hostile("__cpu_possible_mask wraps".into()))?;
        let bits = mem.read_u64(at).map_err(read("__cpu_possible_mask", at))?;
        for bit in 0..64 {
            let cpu = word * 64 + bit;
            if cpu >= n || bits & (1 << bit) == 0 {
                continue;
            }
            let at = s
                .per_cpu_offset
                .checked_add(u64::from(cpu) * 8)
                .ok_or_else(|| PercpuError::Hostile("__per_cpu_offset[] wraps".into()))?;
            let offset = mem.read_u64(at).map_err(read("__per_cpu_offset[]", at))?;
            out.push((cpu, offset));
        }
    }
    if out.is_empty() {
        return Err(PercpuError::Hostile(
            "no CPU is in __cpu_possible_mask".into(),
        ));
    }
    Ok(out)
}

/// Where each CPU's copy of `block` lies (`per_cpu_ptr(block, cpu)`), in
/// CPU order: each must be kernel space without wrapping, and no two may
/// overlap (each CPU has its own unit of the per-CPU area).
pub(crate) fn copy_targets(
    block: PercpuBlock,
    cpus: &[(u32, u64)],
) -> Result<Vec<(u32, u64)>, PercpuError> {
    let mut out = Vec::with_capacity(cpus.len());
    for &(cpu, offset) in cpus {
        let va = offset
            .checked_add(block.ptr)
            .filter(|&va| va >= KERNEL_SPACE)
            .filter(|va| va.checked_add(block.size).is_some())
            .ok_or_else(|| {
                PercpuError::Hostile(format!(
                    "CPU {cpu}'s copy of the block at {:#x} ({} bytes) would be at offset \
                     {offset:#x} + {:#x}, outside kernel space",
                    block.ptr, block.size, block.ptr
                ))
            })?;
        out.push((cpu, va));
    }
    let mut sorted = out.clone();
    sorted.sort_unstable_by_key(|&(_, va)| va);
    for w in sorted.windows(2) {
        if let [(a, va), (b, vb)] = w {
            if va + block.size > *vb {
                return Err(PercpuError::Hostile(format!(
                    "the per-CPU copies of CPUs {a} and {b} overlap ({va:#x} and {vb:#x}, {} \
                     bytes each)",
                    block.size
                )));
            }
        }
    }
    Ok(out)
}

/// `len` bytes at `va` cut at 4 KiB page boundaries: (va, offset in the
/// bytes, length) of each piece, each translated on its own (a per-CPU
/// area mapped page by page need not be contiguous in guest memory).
pub(crate) fn page_pieces(va: u64, len: u64) -> Vec<(u64, u64, u64)> {
    let mut out = Vec::new();
    let mut done = 0;
    while done < len {
        let at = va + done;
        let room = crate::module::PAGE - at % crate::module::PAGE;
        let n = room.min(len - done);
        out.push((at, done, n));
        done += n;
    }
    out
}

impl Engine {
    /// The block allocated for `patch`'s apply, if it fits `percpu`.
    pub(super) fn percpu_block_for(&self, patch: &str, percpu: &PerCpu) -> Option<PercpuBlock> {
        self.percpu_pending
            .as_ref()
            .filter(|p| p.patch == patch)
            .map(|p| p.block)
            .filter(|b| b.size == percpu.size && b.align == percpu.align)
    }

    /// The writes that copy `data` into every possible CPU's copy of
    /// `block`, each allowed only for its own bytes.
    pub(super) fn percpu_copy_plan<G: Guest + ?Sized>(
        kernel: &Kernel,
        guest: &G,
        patch: &str,
        block: PercpuBlock,
        data: &[u8],
        plan: &mut crate::write::Plan,
    ) -> Result<(), EngineError> {
        if data.len() as u64 != block.size {
            return Err(EngineError::Internal(format!(
                "{patch}: {} bytes of per-CPU data for a {}-byte block",
                data.len(),
                block.size
            )));
        }
        let space = kernel.space(guest);
        let cpus = possible_cpus(&space, &CpuSymbols::from_kallsyms(&kernel.kallsyms)?)?;
        for (cpu, va) in copy_targets(block, &cpus)? {
            for (at, off, len) in page_pieces(va, block.size) {
                let gpa = space
                    .translate(at)
                    .map_err(|source| PercpuError::Read {
                        what: "a CPU's copy of the per-CPU block",
                        va: at,
                        source,
                    })?
                    .phys;
                plan.allow(Allowed {
                    gpa,
                    len,
                    kind: AllowKind::PerCpu { cpu },
                });
                // Offsets within `data`, whose length was checked above.
                let bytes = data
                    .get(off as usize..(off + len) as usize)
                    .ok_or_else(|| EngineError::Internal("per-CPU copy piece".into()))?;
                plan.push(
                    Write::read_expect(
                        guest,
                        gpa,
                        bytes.to_vec(),
                        format!("{patch} per-CPU data, CPU {cpu}"),
                    )
                    .map_err(EngineError::Write)?,
                );
            }
        }
        Ok(())
    }

    /// Sends the allocation `p` needs (its per-CPU block is not allocated
    /// yet) through the call gate: `__alloc_reserved_percpu(size, align)`,
    /// or `pcpu_alloc_noprof(size, align, true, GFP_KERNEL)` where that
    /// name is a macro (6.10+). `None` if `p` needs none. Call with every
    /// vCPU paused; then raise the gate's vector on [`Armed::vcpu`].
    pub fn arm_percpu_alloc<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        p: &Prepared,
    ) -> Result<Option<Armed>, EngineError> {
        let Some(need) = p.percpu.filter(|n| n.block.is_none()) else {
            return Ok(None);
        };
        let (func, args) = match kernel.kallsyms.addr("__alloc_reserved_percpu") {
            Ok(f) => (f, vec![need.size, need.align]),
            Err(_) => match kernel.kallsyms.addr("pcpu_alloc_noprof") {
                Ok(f) => (f, vec![need.size, need.align, 1, GFP_KERNEL]),
                Err(_) => return Err(PercpuError::NoAllocator.into()),
            },
        };
        let (gate, (cpu, base), seq) = self.next_call(kernel, guest)?;
        let label = format!(
            "#{seq} per-CPU allocation of {} bytes for {}",
            need.size, p.name
        );
        let plan = gate.plan_call(kernel, guest, (cpu, base), func, &args, seq, &label)?;
        plan.commit(guest)?;
        self.calls = seq;
        Ok(Some(Armed { seq, vcpu: 0, cpu }))
    }

    /// Takes what the allocation for `p` returned: NULL is -ENOMEM and
    /// fails the apply; a block is remembered for `p`'s patch until the
    /// apply commits (then its record owns it) or is abandoned (then it
    /// is freed, see [`Engine::abandon_percpu`]).
    pub fn percpu_allocated(&mut self, p: &Prepared, ret: u64) -> Result<(), EngineError> {
        let need = p
            .percpu
            .ok_or_else(|| EngineError::Internal(format!("{} needs no per-CPU block", p.name)))?;
        if ret == 0 {
            return Err(PercpuError::NoMemory {
                patch: p.name.clone(),
                size: need.size,
                align: need.align,
            }
            .into());
        }
        let block = PercpuBlock {
            ptr: ret,
            size: need.size,
            align: need.align,
        };
        // Whatever it is, the guest gave it to this patch: it is ours to
        // free from now on, even if it turns out unusable.
        if let Some(old) = self.percpu_pending.replace(Pending {
            patch: p.name.clone(),
            block,
        }) {
            self.percpu_free.push((old.patch, old.block));
        }
        if ret.checked_add(need.size).is_none() || ret % need.align != 0 {
            return Err(PercpuError::Hostile(format!(
                "the allocator returned {ret:#x} for {} bytes aligned to {}",
                need.size, need.align
            ))
            .into());
        }
        tracing::info!(
            patch = p.name,
            ptr = format_args!("{ret:#x}"),
            size = need.size,
            "per-CPU block allocated in the guest"
        );
        Ok(())
    }

    /// The apply the pending block was allocated for did not commit and
    /// its code was not kept: the block is queued to be freed (see
    /// [`Engine::arm_percpu_free`]). A block whose patch was retired with
    /// its pages went with its record, and is freed with them.
    pub fn abandon_percpu(&mut self) {
        if let Some(p) = self.percpu_pending.take() {
            tracing::info!(
                patch = p.patch,
                "freeing the abandoned apply's per-CPU block"
            );
            self.percpu_free.push((p.patch, p.block));
        }
    }

    /// A committed or retired record took the pending block.
    pub(super) fn percpu_adopted(&mut self, record: &Record) {
        if record.percpu.is_some()
            && self.percpu_pending.as_ref().map(|p| Some(p.block)) == Some(record.percpu)
        {
            self.percpu_pending = None;
        }
    }

    /// Per-CPU blocks waiting to be freed in the guest.
    pub fn percpu_frees(&self) -> usize {
        self.percpu_free.len()
    }

    /// Sends `free_percpu(block)` for the oldest block waiting to be freed
    /// through the call gate, and forgets the block once sent (a free sent
    /// twice would free memory the guest may have handed out again).
    /// `None` if none waits. Call with every vCPU paused; then raise the
    /// gate's vector on [`Armed::vcpu`].
    pub fn arm_percpu_free<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
    ) -> Result<Option<(Armed, String)>, EngineError> {
        let Some((patch, block)) = self.percpu_free.first().cloned() else {
            return Ok(None);
        };
        let free = kernel
            .kallsyms
            .addr("free_percpu")
            .map_err(GateError::Symbol)?;
        let (gate, (cpu, base), seq) = self.next_call(kernel, guest)?;
        let label = format!("#{seq} free_percpu({:#x}) of {patch}", block.ptr);
        let plan = gate.plan_call(kernel, guest, (cpu, base), free, &[block.ptr], seq, &label)?;
        plan.commit(guest)?;
        self.calls = seq;
        self.percpu_free.remove(0);
        Ok(Some((Armed { seq, vcpu: 0, cpu }, patch)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use klpvisor_guest::PagingError;
    use std::collections::BTreeMap;

    /// Kernel memory as a map of 8-byte words.
    #[derive(Default)]
    struct Words(BTreeMap<u64, u64>);

    impl VirtRead for Words {
        fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), PagingError> {
            for (i, b) in buf.iter_mut().enumerate() {
                let at = va + i as u64;
                let word = self
                    .0
                    .get(&(at & !7))
                    .ok_or(PagingError::Unmapped { va: at })?;
                *b = word.to_le_bytes()[(at & 7) as usize];
            }
            Ok(())
        }
    }

    const SYMS: CpuSymbols = CpuSymbols {
        nr_cpu_ids: 0xffff_ffff_8300_0000,
        possible_mask: 0xffff_ffff_8300_1000,
        per_cpu_offset: 0xffff_ffff_8300_2000,
    };
    const UNIT: u64 = 0x20_0000;
    const BASE: u64 = 0xffff_8880_7f00_0000;

    /// A guest with `n` CPU ids whose possible mask is `mask` (words).
    fn guest(n: u32, mask: &[u64]) -> Words {
        let mut m = Words::default();
        m.0.insert(SYMS.nr_cpu_ids, u64::from(n));
        for (i, w) in mask.iter().enumerate() {
            m.0.insert(SYMS.possible_mask + i as u64 * 8, *w);
        }
        for cpu in 0..u64::from(n) {
            m.0.insert(SYMS.per_cpu_offset + cpu * 8, BASE + cpu * UNIT);
        }
        m
    }

    const BLOCK: PercpuBlock = PercpuBlock {
        ptr: 0x3_1000,
        size: 24,
        align: 8,
    };

    #[test]
    fn every_possible_cpu_gets_a_copy_and_no_other() {
        // CPUs 0, 2, 5 and 70 possible out of 72 ids: a sparse mask over
        // two words, and a stray bit past nr_cpu_ids the kernel ignores.
        let m = guest(72, &[0b10_0101, (1 << 6) | (1 << 40)]);
        let cpus = possible_cpus(&m, &SYMS).unwrap();
        assert_eq!(
            cpus,
            [
                (0, BASE),
                (2, BASE + 2 * UNIT),
                (5, BASE + 5 * UNIT),
                (70, BASE + 70 * UNIT)
            ]
        );
        let targets = copy_targets(BLOCK, &cpus).unwrap();
        assert_eq!(
            targets,
            [
                (0, BASE + BLOCK.ptr),
                (2, BASE + 2 * UNIT + BLOCK.ptr),
                (5, BASE + 5 * UNIT + BLOCK.ptr),
                (70, BASE + 70 * UNIT + BLOCK.ptr)
            ]
        );
    }

    #[test]
    fn hostile_cpu_counts_and_offsets_are_refused() {
        // Too many CPUs, none, or an empty mask.
        for n in [0, MAX_CPUS + 1, u32::MAX] {
            let mut m = guest(1, &[1]);
            m.0.insert(SYMS.nr_cpu_ids, u64::from(n));
            assert!(matches!(
                possible_cpus(&m, &SYMS),
                Err(PercpuError::Hostile(_))
            ));
        }
        assert!(matches!(
            possible_cpus(&guest(4, &[0]), &SYMS),
            Err(PercpuError::Hostile(_))
        ));
        // A mask or offset the guest does not map.
        let mut m = guest(2, &[0b11]);
        m.0.remove(&(SYMS.per_cpu_offset + 8));
        assert!(matches!(
            possible_cpus(&m, &SYMS),
            Err(PercpuError::Read { .. })
        ));
        // An offset that puts a copy in user space, or past the top.
        for offset in [0, 0x7fff_0000_0000, u64::MAX - 8] {
            assert!(matches!(
                copy_targets(BLOCK, &[(0, BASE), (1, offset)]),
                Err(PercpuError::Hostile(_))
            ));
        }
        // Two CPUs sharing a unit, or overlapping by a byte.
        for other in [BASE, BASE + BLOCK.size - 1] {
            assert!(matches!(
                copy_targets(BLOCK, &[(0, BASE), (1, other)]),
                Err(PercpuError::Hostile(m)) if m.contains("overlap")
            ));
        }
        assert!(copy_targets(BLOCK, &[(0, BASE), (1, BASE + BLOCK.size)]).is_ok());
    }

    #[test]
    fn copies_are_cut_at_page_boundaries() {
        assert_eq!(page_pieces(0x1000, 24), [(0x1000, 0, 24)]);
        assert_eq!(page_pieces(0x1ff8, 24), [(0x1ff8, 0, 8), (0x2000, 8, 16)]);
        assert_eq!(
            page_pieces(0xff0, 0x2020),
            [
                (0xff0, 0, 0x10),
                (0x1000, 0x10, 0x1000),
                (0x2000, 0x1010, 0x1000),
                (0x3000, 0x2010, 0x10)
            ]
        );
        assert!(page_pieces(0x1000, 0).is_empty());
    }

    fn prepared(name: &str, need: Option<PercpuNeed>) -> Prepared {
        let mut p = Engine::default()
            .prepared_sites(
                name,
                "apply",
                crate::stack::Change {
                    sites: BTreeMap::new(),
                    states: Vec::new(),
                    push: None,
                    reenable: None,
                    restore: None,
                    forced: false,
                },
                crate::callback::Calls::default(),
            )
            .unwrap();
        p.percpu = need;
        p
    }

    const NEED: PercpuNeed = PercpuNeed {
        size: 24,
        align: 8,
        block: None,
    };

    #[test]
    fn a_null_block_is_enomem_and_nothing_is_kept() {
        let mut e = Engine::default();
        let p = prepared("p", Some(NEED));
        let err = e.percpu_allocated(&p, 0).unwrap_err();
        assert!(
            matches!(&err, EngineError::PerCpu(PercpuError::NoMemory { .. })),
            "{err}"
        );
        assert!(err.to_string().contains("-ENOMEM"), "{err}");
        e.abandon_percpu();
        assert_eq!(e.percpu_frees(), 0);
    }

    #[test]
    fn an_abandoned_apply_frees_its_block_once() {
        let mut e = Engine::default();
        let p = prepared("p", Some(NEED));
        e.percpu_allocated(&p, 0x3_1000).unwrap();
        let percpu = PerCpu {
            elf_index: 3,
            size: 24,
            align: 8,
            data: vec![0; 24],
        };
        // The next prepare links with it; another patch's does not.
        assert_eq!(
            e.percpu_block_for("p", &percpu),
            Some(PercpuBlock {
                ptr: 0x3_1000,
                size: 24,
                align: 8
            })
        );
        assert_eq!(e.percpu_block_for("q", &percpu), None);
        e.abandon_percpu();
        e.abandon_percpu();
        assert_eq!(e.percpu_frees(), 1);
        assert_eq!(e.percpu_block_for("p", &percpu), None);
    }

    #[test]
    fn a_committed_or_retired_record_takes_the_block() {
        let mut e = Engine::default();
        let p = prepared("p", Some(NEED));
        e.percpu_allocated(&p, 0x3_1000).unwrap();
        let block = e.percpu_pending.as_ref().map(|p| p.block);
        let record = Record {
            percpu: block,
            ..Record::default()
        };
        e.percpu_adopted(&record);
        // Nothing left to free on abandon: the record frees it with its
        // code (the sweep).
        e.abandon_percpu();
        assert_eq!(e.percpu_frees(), 0);
    }

    #[test]
    fn a_misaligned_block_is_still_freed() {
        let mut e = Engine::default();
        let p = prepared("p", Some(NEED));
        assert!(matches!(
            e.percpu_allocated(&p, 0x3_1001),
            Err(EngineError::PerCpu(PercpuError::Hostile(_)))
        ));
        e.abandon_percpu();
        assert_eq!(e.percpu_frees(), 1);
    }
}
