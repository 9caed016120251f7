//! The arena mapping, patch sites and the write path on a real guest: the
//! QEMU TCG dump of the Debian 6.1 kernel (KASLR, 5-level paging, PTI).
//!
//! A dump is read-only and has no reserved arena, so everything is applied
//! to a copy-on-write [`Overlay`] that serves a synthetic arena at
//! 0x2000_0000 — where the VMM would put it for this 512 MiB guest (right
//! after the highest RAM byte, 2 MiB aligned); the test checks the dump
//! really has no memory there. Then the guest's own page tables, walked by
//! the introspection code, must show the arena where and how it was mapped,
//! and everything else exactly as before.
//!
//! Needs QEMU for the first run (guest-images/dump-guest), like
//! dump_introspect.rs.
#![forbid(unsafe_code)]

use klpvisor_guest::GuestPhys;
use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Instant;

use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use klpvisor_engine::arena::{
    slot_of, Arena, Granularity, ImageFacts, NxSource, Perm, WINDOW_END, WINDOW_START,
};
use klpvisor_engine::site::{is_code_kind, FtraceRecords, Site, SiteError, FTRACE_NOP};
use klpvisor_engine::write::{hash_ranges, Plan, Write, WriteError};
use klpvisor_guest::overlay::Overlay;
use klpvisor_guest::paging::{MappedRun, PTI_USER_PGD_BIT};
use klpvisor_guest::Guest;
use klpvisor_guest::{DumpGuest, Kernel, PageTables, VirtRead};

mod common;

use common::{open_dump, ARENA};
const PAGE: u64 = 4096;

struct Fixture {
    guest: DumpGuest,
    kernel: Kernel,
    records: FtraceRecords,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let (_, guest, kernel) = open_dump();
        let records = FtraceRecords::load(&kernel.space(&guest), &kernel.kallsyms, &kernel.btf)
            .unwrap_or_else(|e| panic!("{e}"));
        Fixture {
            guest,
            kernel,
            records,
        }
    })
}

fn sym(f: &Fixture, name: &str) -> u64 {
    f.kernel
        .kallsyms
        .addr(name)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Kernel PGDs to check through: init_top_pgt and every vCPU's (its PTI
/// kernel twin when it was on the user PGD).
fn kernel_pgds(f: &Fixture) -> Vec<PageTables> {
    let mut v = vec![f.kernel.tables];
    for i in 0..f.guest.vcpu_count() {
        let t = PageTables::from_regs(&f.guest.vcpu_regs(i).unwrap());
        let t = PageTables::new(t.root() & !PTI_USER_PGD_BIT, t.five_level());
        if !v.contains(&t) {
            v.push(t);
        }
    }
    v
}

/// Kernel text as guest-physical ranges, minus the `holes` (gpa, len).
fn text_ranges(f: &Fixture, holes: &[(GuestPhys, u64)]) -> Vec<(GuestPhys, u64)> {
    let start = GuestPhys(f.kernel.kaslr.text_phys);
    let end = start + (sym(f, "_etext") - f.kernel.kaslr.text);
    let mut out = Vec::new();
    let mut cur = start;
    let mut holes = holes.to_vec();
    holes.sort_unstable();
    for (g, l) in holes {
        out.push((cur, g.0 - cur.0));
        cur = g + l;
    }
    out.push((cur, end.0 - cur.0));
    out
}

fn runs_outside(runs: &[MappedRun], lo: u64, hi: u64) -> Vec<MappedRun> {
    runs.iter()
        .filter(|r| r.end <= lo || r.start >= hi)
        .copied()
        .collect()
}

#[test]
fn arena_maps_next_to_the_kernel_and_nothing_else_changes() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let mut probe = [0u8; 8];
    assert!(
        f.guest.read_phys(GuestPhys(ARENA.0), &mut probe).is_err(),
        "the dump has memory at the synthetic arena {:#x}",
        ARENA.0
    );
    let g = Overlay::new(&f.guest).with_synthetic_arena(GuestPhys(ARENA.0), ARENA.1);
    let facts = ImageFacts::from_kernel(&f.kernel).unwrap();
    let t0 = Instant::now();
    let mut arena = Arena::new(&g, &facts).unwrap_or_else(|e| panic!("{e}"));
    let layout_time = t0.elapsed();
    let end = sym(f, "_end");
    // Right after _end, 2 MiB aligned; when KASLR put the kernel too close
    // to the top of the 1 GiB window for 8 slots, the highest run below _text.
    let pmd = 2u64 << 20;
    let after_end = end.div_ceil(pmd) * pmd;
    let base = if after_end + 8 * pmd <= WINDOW_END {
        after_end
    } else {
        (sym(f, "_text") & !(pmd - 1)) - 8 * pmd
    };
    assert_eq!(
        arena.va_range().0,
        base,
        "after _end {end:#x} or below _text {:#x}",
        sym(f, "_text")
    );
    assert_eq!(arena.pmd_slots().0, slot_of(base));
    // 4096 pages: 8 PTE pages, 4088 mappable pages in 8 slots.
    assert_eq!((arena.table_pages(), arena.pmd_slots().1), (8, 8));
    let pmd_page_phys = f
        .kernel
        .space(&f.guest)
        .translate(sym(f, "level2_kernel_pgt"))
        .unwrap()
        .phys;
    assert_eq!(GuestPhys(arena.pmd_page()), pmd_page_phys);
    let attrs = arena.attrs();
    // The dump boots with pti=on: the kernel image is not global.
    assert!(!attrs.global, "{attrs:?}");
    assert!(attrs.nx && attrs.nx_source == NxSource::KernelMappings);
    assert_eq!(attrs.cache, 0, "write-back");

    let pgds = kernel_pgds(f);
    let runs_before: Vec<Vec<MappedRun>> = pgds
        .iter()
        .map(|t| t.mapped_runs(&g, WINDOW_START, WINDOW_END).unwrap())
        .collect();
    let text_hash = hash_ranges(&g, &text_ranges(f, &[])).unwrap();
    let mut pmd_page = vec![0u8; 4096];
    f.guest
        .read_phys(GuestPhys(arena.pmd_page()), &mut pmd_page)
        .unwrap();

    // Code, read-only data, data, and a large text block across slots.
    let code = arena.alloc(3 * PAGE + 10, Perm::Text).unwrap();
    let ro = arena.alloc(PAGE, Perm::ReadOnly).unwrap();
    let data = arena.alloc(2 * PAGE, Perm::Data).unwrap();
    let big = arena.alloc(3 << 20, Perm::Text).unwrap();
    let regions = [code, ro, data, big];

    // The patched function: cmdline_proc_show -> "xor %eax,%eax; ret" in the arena.
    let space = f.kernel.space(&g);
    let site = Site::find(
        &space,
        &f.kernel.kallsyms,
        &f.records,
        sym(f, "cmdline_proc_show"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // (After an ENDBR64 on IBT kernels: 6.12.)
    assert_eq!(
        (site.at, site.original),
        (site.func + site.endbr.len(), FTRACE_NOP)
    );

    let mut allowed = arena.allowed();
    allowed.push(site.allowed());
    let mut plan = Plan::new(allowed);
    plan.extend(arena.map_writes(&g, &regions).unwrap());
    plan.push(
        Write::read_expect(
            &g,
            code.gpa,
            vec![0x31, 0xc0, 0xc3],
            "new cmdline_proc_show",
        )
        .unwrap(),
    );
    plan.push(site.redirect_write(code.va.0).unwrap());
    let t0 = Instant::now();
    let undo = plan.commit(&g).unwrap_or_else(|e| panic!("{e}"));
    let commit_time = t0.elapsed();

    // Every PGD sees the arena, with the right rights, 4 KiB pages.
    for t in &pgds {
        for r in &regions {
            let (w, x) = match r.perm {
                Perm::Text => (false, true),
                Perm::ReadOnly => (false, false),
                Perm::Data => (true, false),
            };
            for off in (0..r.len).step_by(PAGE as usize) {
                let tr = t.translate(&g, r.va.0 + off + 7).unwrap();
                assert_eq!(tr.phys, r.gpa + off + 7);
                assert_eq!(
                    (tr.page_size, tr.writable, tr.executable, tr.user),
                    (PAGE, w, x, false),
                    "{r:?} + {off:#x} through {t:?}"
                );
            }
        }
        assert!(
            t.translate(&g, big.va.0 + big.len).is_err(),
            "nothing past the last allocation"
        );
    }
    // The kernel's own mappings are exactly as before, in every PGD.
    let (lo, hi) = arena.va_range();
    for (t, before) in pgds.iter().zip(&runs_before) {
        let after = t.mapped_runs(&g, WINDOW_START, WINDOW_END).unwrap();
        assert_eq!(runs_outside(&after, lo, hi), *before, "{t:?}");
        assert!(
            runs_outside(before, lo, hi) == *before,
            "nothing was mapped there before"
        );
    }
    // Kernel text is byte-identical except the 5 bytes of the site.
    assert_ne!(hash_ranges(&g, &text_ranges(f, &[])).unwrap(), text_hash);
    assert_eq!(
        hash_ranges(&g, &text_ranges(f, &[(site.gpa, 5)])).unwrap(),
        hash_ranges(&f.guest, &text_ranges(f, &[(site.gpa, 5)])).unwrap()
    );
    // Only the arena's slots changed in the kernel's PMD page.
    let mut after = vec![0u8; 4096];
    g.read_phys(GuestPhys(arena.pmd_page()), &mut after)
        .unwrap();
    // (Slots are installed lazily: only those holding allocated pages.)
    let (first, count) = arena.pmd_slots();
    let used = (big.va.0 + big.len - arena.va_range().0).div_ceil(2 << 20);
    assert!(used < count);
    for s in 0..512u64 {
        let i = (s * 8) as usize;
        let same = pmd_page[i..i + 8] == after[i..i + 8];
        assert_eq!(same, !(first..first + used).contains(&s), "slot {s}");
    }
    // The entry now jumps to the new code, and the new code is readable
    // through the kernel's virtual addresses.
    let mut entry = [0u8; 5];
    space.read_virt(site.at, &mut entry).unwrap();
    let ins = Decoder::with_ip(64, &entry, site.at, DecoderOptions::NONE).decode();
    assert_eq!(
        (ins.mnemonic(), ins.near_branch_target()),
        (Mnemonic::Jmp, code.va.0)
    );
    let mut new = [0u8; 3];
    space.read_virt(code.va.0, &mut new).unwrap();
    assert_eq!(new, [0x31, 0xc0, 0xc3]);
    // Re-finding the site now says it is redirected, to the arena.
    match Site::find(&space, &f.kernel.kallsyms, &f.records, site.func) {
        Err(SiteError::Jmp { target, .. }) => assert_eq!(target, code.va.0),
        other => panic!("{other:?}"),
    }

    // Undo restores every byte.
    undo.commit(&g).unwrap_or_else(|e| panic!("{e}"));
    for (gpa, len) in g.write_log() {
        if gpa >= ARENA.0 {
            continue; // the synthetic arena has no original to compare with
        }
        let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
        g.read_phys(GuestPhys(gpa), &mut a).unwrap();
        f.guest.read_phys(GuestPhys(gpa), &mut b).unwrap();
        assert_eq!(a, b, "{gpa:#x}+{len} restored");
    }
    for (t, before) in pgds.iter().zip(&runs_before) {
        assert_eq!(
            t.mapped_runs(&g, WINDOW_START, WINDOW_END).unwrap(),
            *before
        );
    }
    assert_eq!(hash_ranges(&g, &text_ranges(f, &[])).unwrap(), text_hash);
    eprintln!(
        "arena {:#x}+{:#x} at VA {lo:#x}..{hi:#x} (PMD slots {first}..{}), layout {layout_time:?}, \
         commit of {} writes {commit_time:?}; attrs {attrs:?}",
        ARENA.0,
        ARENA.1,
        first + count,
        plan.writes().len()
    );
}

#[test]
fn refused_plans_leave_the_guest_untouched() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let g = Overlay::new(&f.guest).with_synthetic_arena(GuestPhys(ARENA.0), ARENA.1);
    let facts = ImageFacts::from_kernel(&f.kernel).unwrap();
    let mut arena = Arena::new(&g, &facts).unwrap();
    let space = f.kernel.space(&g);
    let site = Site::find(
        &space,
        &f.kernel.kallsyms,
        &f.records,
        sym(f, "cmdline_proc_show"),
    )
    .unwrap();
    let r = arena.alloc(PAGE, Perm::Text).unwrap();
    let guarded = {
        let mut v = text_ranges(f, &[]);
        v.push((GuestPhys(arena.pmd_page()), 4096));
        v.push((GuestPhys(ARENA.0), ARENA.1));
        v
    };
    let before = hash_ranges(&g, &guarded).unwrap();
    let mut allowed = arena.allowed();
    allowed.push(site.allowed());

    // A crafted write into kernel text right after the site.
    let mut plan = Plan::new(allowed.clone());
    plan.extend(arena.map_writes(&g, &[r]).unwrap());
    plan.push(site.redirect_write(r.va.0).unwrap());
    plan.push(Write::read_expect(&g, site.gpa + 5, vec![0xcc], "one byte too far").unwrap());
    let e = plan.commit(&g).unwrap_err();
    assert!(matches!(e, WriteError::Outside { .. }), "{e}");
    // The site changed under us (ftrace started tracing it).
    let mut plan = Plan::new(allowed);
    plan.extend(arena.map_writes(&g, &[r]).unwrap());
    let mut w = site.redirect_write(r.va.0).unwrap();
    w.expect = vec![0xe8, 0, 0, 0, 0];
    plan.push(w);
    let e = plan.commit(&g).unwrap_err();
    assert!(matches!(e, WriteError::Mismatch { .. }), "{e}");
    assert!(g.write_log().is_empty());
    assert_eq!(hash_ranges(&g, &guarded).unwrap(), before);
}

#[test]
fn real_function_entries_decode_as_sites() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let g = Overlay::new(&f.guest);
    let space = f.kernel.space(&g);
    let k = &f.kernel.kallsyms;
    let (text, etext) = (f.kernel.kaslr.text, sym(f, "_etext"));
    let target = sym(f, "_end").div_ceil(2 << 20) * (2 << 20);
    let t0 = Instant::now();
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    let mut sites = 0usize;
    for s in k.symbols() {
        if !is_code_kind(s.kind) || s.addr < text || s.addr >= etext {
            continue;
        }
        // Aliases at one address: kallsyms names the first.
        if k.locate(s.addr)
            .map(|l| l.symbol.name != s.name)
            .unwrap_or(true)
        {
            continue;
        }
        // The 5 bytes after an ENDBR64 (or the nop a sealed one became)
        // on IBT kernels (6.12), else the first 5.
        let mut entry = [0u8; 9];
        space.read_virt(s.addr, &mut entry).unwrap();
        let endbr = match entry[..4] {
            [0xf3, 0x0f, 0x1e, 0xfa] | [0x66, 0x0f, 0x1f, 0x00] => 4,
            _ => 0,
        };
        let head = &entry[endbr..endbr + 5];
        match Site::find(&space, k, &f.records, s.addr) {
            Ok(site) => {
                assert_eq!(
                    head, FTRACE_NOP,
                    "{}: a site that is not the ftrace nop",
                    s.name
                );
                assert_eq!(
                    (site.func, site.at),
                    (s.addr, s.addr + endbr as u64),
                    "{}: the site is right after the ENDBR, if any",
                    s.name
                );
                assert_eq!(site.gpa, space.translate(site.at).unwrap().phys);
                let jmp = site.redirect(target).unwrap();
                let ins = Decoder::with_ip(64, &jmp, site.at, DecoderOptions::NONE).decode();
                assert_eq!(
                    (ins.mnemonic(), ins.len(), ins.near_branch_target()),
                    (Mnemonic::Jmp, 5, target)
                );
                sites += 1;
                *outcomes.entry("site").or_default() += 1;
            }
            Err(e) => {
                assert!(
                    head != FTRACE_NOP || matches!(e, SiteError::NotFtraceSite { .. }),
                    "{}: has the nop but was refused: {e}",
                    s.name
                );
                let kind = match e {
                    SiteError::Unexpected { .. } => "other bytes (notrace)",
                    SiteError::Call { hint, .. }
                    | SiteError::Jmp { hint, .. }
                    | SiteError::Int3 { hint, .. } => hint,
                    SiteError::TooShort { .. } => "too short",
                    SiteError::NotFtraceSite { .. } => "nop, but no ftrace record (jump label)",
                    other => panic!("{}: {other}", s.name),
                };
                *outcomes.entry(kind).or_default() += 1;
            }
        }
    }
    eprintln!(
        "{} text symbols in {:?}:",
        outcomes.values().sum::<usize>(),
        t0.elapsed()
    );
    for (k, n) in &outcomes {
        eprintln!("  {n:6}  {k}");
    }
    assert!(sites > 30_000, "only {sites} sites");
    // Nothing is traced in the dumped guest, and no entry is mid-text_poke.
    assert!(
        !outcomes
            .keys()
            .any(|k| k.contains("traced by ftrace") || k.contains("text_poke")),
        "{outcomes:?}"
    );

    for name in [
        "cmdline_proc_show",
        "__x64_sys_getppid",
        "vfs_read",
        "schedule",
        "_printk",
    ] {
        let site = Site::find(&space, k, &f.records, sym(f, name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(site.original, FTRACE_NOP);
        eprintln!("{site}");
    }
    // memcpy starts with an alternative's short jmp: not a site.
    let e = Site::find(&space, k, &f.records, sym(f, "memcpy")).unwrap_err();
    assert!(matches!(e, SiteError::Unexpected { .. }), "{e}");
    eprintln!("memcpy: {e}");
    // Not functions, or not resident text.
    assert!(matches!(
        Site::find(&space, k, &f.records, sym(f, "init_task")),
        Err(SiteError::NotAFunction { .. })
    ));
    assert!(matches!(
        Site::find(&space, k, &f.records, sym(f, "cmdline_proc_show") + 1),
        Err(SiteError::NotAFunction { .. })
    ));
    let e = Site::find(&space, k, &f.records, sym(f, "start_kernel")).unwrap_err();
    assert!(matches!(e, SiteError::NotInText { .. }), "{e}");

    // ftrace tracing the function: `call ftrace_caller` at the entry.
    let site = Site::find(&space, k, &f.records, sym(f, "cmdline_proc_show")).unwrap();
    let caller = sym(f, "ftrace_caller");
    let rel = (caller as i64 - (site.at as i64 + 5)) as i32;
    let mut call = vec![0xe8];
    call.extend_from_slice(&rel.to_le_bytes());
    g.write_phys(site.gpa, &call).unwrap();
    let e = Site::find(&space, k, &f.records, site.func).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, SiteError::Call { target, .. } if target == caller),
        "{msg}"
    );
    assert!(
        msg.contains("ftrace_caller") && msg.contains("traced by ftrace"),
        "{msg}"
    );
    eprintln!("{msg}");
}

/// The kernel's own list of ftrace sites (`ftrace_pages_start`: pages of
/// `struct dyn_ftrace { ip, flags }`, layouts from BTF) is an independent
/// answer to "where are the ftrace nops": every vmlinux record must be a
/// site we accept, at a function's entry, and every site we accept must be
/// one of them.
#[test]
fn sites_are_exactly_the_kernels_ftrace_records() {
    if common::skip_without_dump() {
        return;
    }
    /// 6.1's flag for records ftrace ignores: weak functions overridden at
    /// link time leave their code and __mcount_loc entry but no symbol.
    const FTRACE_FL_DISABLED: u64 = 1 << 25;
    let f = fixture();
    let space = f.kernel.space(&f.guest);
    let (k, btf) = (&f.kernel.kallsyms, &f.kernel.btf);
    let off = |p: &str| btf.offset_of(p).unwrap_or_else(|e| panic!("{p}: {e}"));
    let (next, records, index) = (
        off("ftrace_page.next"),
        off("ftrace_page.records"),
        off("ftrace_page.index"),
    );
    let (rec_size, rec_ip, rec_flags) = (
        btf.struct_size("dyn_ftrace").unwrap(),
        off("dyn_ftrace.ip"),
        off("dyn_ftrace.flags"),
    );
    let (text, etext) = (f.kernel.kaslr.text, sym(f, "_etext"));
    let mut ips = std::collections::BTreeSet::new();
    let mut disabled = Vec::new();
    let mut page = space.read_u64(sym(f, "ftrace_pages_start")).unwrap();
    let mut pages = 0;
    while page != 0 {
        pages += 1;
        assert!(pages < 100_000, "ftrace page list does not end");
        let recs = space.read_u64(page + records).unwrap();
        let n = space.read_u32(page + index).unwrap();
        assert!(n < 1 << 20);
        for i in 0..u64::from(n) {
            let ip = space.read_u64(recs + i * rec_size + rec_ip).unwrap();
            let flags = space.read_u64(recs + i * rec_size + rec_flags).unwrap();
            if !(text..etext).contains(&ip) {
                continue;
            }
            if flags & FTRACE_FL_DISABLED != 0 {
                disabled.push(ip);
            } else {
                ips.insert(ip);
            }
        }
        page = space.read_u64(page + next).unwrap();
    }
    // FtraceRecords::load (the engine's reader) agrees with this walk.
    assert_eq!(
        f.records.iter().collect::<std::collections::BTreeSet<_>>(),
        ips
    );

    // Every function entry with a 5-byte nop: a site iff it is a record.
    let mut sites = std::collections::BTreeSet::new();
    let mut not_records = Vec::new();
    for s in k.symbols() {
        if !is_code_kind(s.kind) || !(text..etext).contains(&s.addr) {
            continue;
        }
        match Site::find(&space, k, &f.records, s.addr) {
            Ok(site) => {
                sites.insert(site.at);
            }
            Err(SiteError::NotFtraceSite { name, at, .. }) => {
                assert!(!ips.contains(&at));
                not_records.push(name);
            }
            Err(_) => {}
        }
    }
    let missing: Vec<String> = ips
        .difference(&sites)
        .take(10)
        .map(|ip| {
            let why = Site::find(&space, k, &f.records, *ip).map(|s| s.to_string());
            format!("{ip:#x}: {why:?}")
        })
        .collect();
    assert!(missing.is_empty(), "ftrace records we refuse: {missing:#?}");
    assert!(sites.is_subset(&ips));
    // Disabled records are not function entries, and are refused as such.
    for ip in &disabled {
        assert!(
            matches!(
                Site::find(&space, k, &f.records, *ip),
                Err(SiteError::NotAFunction { .. })
            ),
            "disabled record {ip:#x}"
        );
    }
    eprintln!(
        "{} ftrace records in vmlinux text ({pages} pages) + {} disabled: all {} are sites; {} \
         function entries have a 5-byte nop that is no ftrace record (refused): {not_records:?}",
        ips.len(),
        disabled.len(),
        sites.len(),
        not_records.len(),
    );
    // Jump labels / alternatives at entries exist on this kernel (5-level
    // paging checks): make sure the test saw the case it guards against.
    assert!(
        not_records.iter().any(|n| n == "pgd_none"),
        "{not_records:?}"
    );
}

/// The 2 MiB-leaf mode on the real kernel: one PMD entry per slot, no PTE
/// pages, rights per slot; the kernel's mappings unchanged.
#[test]
fn large_page_arena_on_the_real_kernel() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let g = Overlay::new(&f.guest).with_synthetic_arena(GuestPhys(ARENA.0), ARENA.1);
    let facts = ImageFacts::from_kernel(&f.kernel).unwrap();
    let mut arena = Arena::with_granularity(&g, &facts, Granularity::Large2M).unwrap();
    assert_eq!((arena.table_pages(), arena.pmd_slots().1), (0, 8));
    let before = f
        .kernel
        .tables
        .mapped_runs(&g, WINDOW_START, WINDOW_END)
        .unwrap();
    let regions = [
        arena.alloc(PAGE, Perm::Text).unwrap(),
        arena.alloc(PAGE, Perm::ReadOnly).unwrap(),
        arena.alloc(PAGE, Perm::Data).unwrap(),
    ];
    let mut plan = Plan::new(arena.allowed());
    plan.extend(arena.map_writes(&g, &regions).unwrap());
    assert_eq!(plan.writes().len(), 3);
    plan.commit(&g).unwrap();
    for t in kernel_pgds(f) {
        for (r, w, x) in [
            (regions[0], false, true),
            (regions[1], false, false),
            (regions[2], true, false),
        ] {
            let tr = t.translate(&g, r.va.0 + 1).unwrap();
            assert_eq!(
                (tr.phys, tr.page_size, tr.writable, tr.executable),
                (r.gpa + 1, 2 << 20, w, x)
            );
        }
    }
    let (lo, hi) = arena.va_range();
    let after = f
        .kernel
        .tables
        .mapped_runs(&g, WINDOW_START, WINDOW_END)
        .unwrap();
    assert_eq!(runs_outside(&after, lo, hi), before);
    assert!(g.write_log().iter().all(|&(gpa, len)| {
        gpa >= arena.pmd_page() + arena.pmd_slots().0 * 8
            && gpa + len as u64 <= arena.pmd_page() + 4096
    }));
}
