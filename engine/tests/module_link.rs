//! Parsing and linking real livepatch modules against a real guest, offline.
//!
//! The modules are built from guest-images/patches/ by
//! guest-images/build-livepatch (kbuild against the guest kernel's Debian
//! headers; cached in build/patches), the guest is the memory dump of
//! guest-images/dump-guest (cached in build/dump), as in dump_introspect.rs.
//! Every module is parsed with the dump's BTF and release and linked
//! against the dump's kallsyms; the results are checked against the
//! guest's own /proc/kallsyms.
#![forbid(unsafe_code)]

use std::process::Command;
use std::sync::OnceLock;

use klpvisor_engine::link::{self, Bases, GuestSymbols, LinkError, LinkOptions, Linked, NOP5};
use klpvisor_engine::module::{
    inspect, KlpLayouts, Module, ModuleError, RelocKind, Segment, SymbolDef,
};
use klpvisor_guest::{DumpGuest, Kernel, VirtRead};

struct Fixture {
    guest: DumpGuest,
    kernel: Kernel,
    release: String,
    kallsyms_txt: String,
}

mod common;

use common::{guest_suffix, ko, open_dump, root};

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let (dir, guest, kernel) = open_dump();
        // The guest's `uname -r`, from its own memory.
        let space = kernel.space(&guest);
        let uts = kernel.kallsyms.addr("init_uts_ns").unwrap();
        let off = kernel.btf.offset_of("uts_namespace.name.release").unwrap();
        let raw = space.read_vec(uts + off, 65, 65, "release").unwrap();
        let release =
            String::from_utf8_lossy(&raw[..raw.iter().position(|&b| b == 0).unwrap()]).into_owned();
        let kver =
            std::fs::read_to_string(root().join(format!("build/guest{}/kver", guest_suffix())))
                .unwrap();
        assert_eq!(release, kver.trim(), "the dump runs build/guest's kernel");
        let kallsyms_txt = std::fs::read_to_string(dir.join("kallsyms.txt")).unwrap();
        Fixture {
            guest,
            kernel,
            release,
            kallsyms_txt,
        }
    })
}

/// Every address the guest's /proc/kallsyms gives `name`, in order.
fn proc_addrs(f: &Fixture, name: &str) -> Vec<u64> {
    f.kallsyms_txt
        .lines()
        .filter(|l| !l.contains('[') && l.split(' ').nth(2) == Some(name))
        .map(|l| u64::from_str_radix(l.split(' ').next().unwrap(), 16).unwrap())
        .collect()
}

fn parse(f: &Fixture, name: &str) -> Result<Module, ModuleError> {
    Module::parse(&ko(name), &f.kernel.btf, &f.release)
}

/// Addresses like the arena's: just past the kernel image, 2 MiB aligned,
/// within rel32 reach of all kernel text.
fn bases(f: &Fixture, m: &Module) -> Bases {
    let end = f.kernel.kallsyms.addr("_end").unwrap();
    let text = end.next_multiple_of(2 << 20);
    let l = m.layout();
    Bases {
        text,
        rodata: text + l.text,
        data: text + l.text + l.rodata,
        // A per-CPU address from the reserved chunk, as the guest's
        // allocator hands out to modules.
        percpu: 0x3_1000,
    }
}

fn options(f: &Fixture) -> LinkOptions {
    let space = f.kernel.space(&f.guest);
    let thunk = link::guest_return_thunk(&space, &f.kernel.kallsyms).unwrap();
    LinkOptions {
        return_thunk: thunk,
        plain_returns: link::guest_plain_returns(&space, &f.kernel.kallsyms, thunk),
        alternatives: Some(
            link::alternatives::guest_cpu(&space, &f.kernel.kallsyms, &f.kernel.btf, &f.release)
                .unwrap(),
        ),
    }
}

fn link_ok(f: &Fixture, m: &Module) -> Linked {
    link::link(m, &f.kernel.kallsyms, bases(f, m), &options(f)).unwrap_or_else(|e| panic!("{e}"))
}

/// Decodes every relocated field back and compares it with its target.
fn check_relocations(f: &Fixture, m: &Module, l: &Linked) {
    let o = options(f);
    let thunk = o.return_thunk;
    for (i, r) in m.relocs.iter().enumerate() {
        let p = l.va(r.place).unwrap();
        if o.plain_returns && m.return_jumps.contains(&i) {
            // A plain `ret` replaced the jmp and its rel32.
            assert_eq!(l.read(p - 1, 5).unwrap(), [0xc3, 0xcc, 0xcc, 0xcc, 0xcc]);
            continue;
        }
        let s = if m.return_jumps.contains(&i) {
            thunk.unwrap()
        } else {
            l.symbol_value(m, r.symbol).unwrap()
        };
        let want = s.wrapping_add_signed(r.addend);
        let b = l.read(p, r.kind.width()).unwrap();
        let got = match r.kind {
            RelocKind::Abs64 => u64::from_le_bytes(b.try_into().unwrap()),
            RelocKind::Abs32 => u64::from(u32::from_le_bytes(b.try_into().unwrap())),
            RelocKind::Abs32S => i32::from_le_bytes(b.try_into().unwrap()) as i64 as u64,
            RelocKind::Pc32 | RelocKind::Plt32 => {
                p.wrapping_add_signed(i64::from(i32::from_le_bytes(b.try_into().unwrap())))
            }
        };
        assert_eq!(
            got,
            want,
            "{:?} at {} for `{}`",
            r.kind,
            m.describe(r.place),
            m.symbols[r.symbol].name
        );
    }
}

/// The target of the `call rel32` (e8) whose relocation names `symbol`.
fn call_targets(m: &Module, l: &Linked, symbol: &str) -> Vec<u64> {
    m.relocs
        .iter()
        .filter(|r| m.symbols[r.symbol].name == symbol && r.kind.pc_relative())
        .map(|r| {
            let p = l.va(r.place).unwrap();
            assert_eq!(l.read(p - 1, 1).unwrap(), [0xe8], "a call");
            let rel = i32::from_le_bytes(l.read(p, 4).unwrap().try_into().unwrap());
            (p + 4).wrapping_add_signed(i64::from(rel))
        })
        .collect()
}

#[test]
fn sample_parses_links_and_resolves() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let m = parse(f, "livepatch-sample").unwrap_or_else(|e| panic!("{e}"));
    let p = &m.patch;
    assert_eq!(p.name, "livepatch_sample");
    assert!(!p.replace);
    assert!(p.states.is_empty());
    assert_eq!(p.objects.len(), 1);
    let o = &p.objects[0];
    assert_eq!(o.name, None, "vmlinux");
    assert_eq!(o.callbacks, Default::default());
    assert_eq!(o.funcs.len(), 1);
    assert_eq!(o.funcs[0].old_name, "cmdline_proc_show");
    assert_eq!(o.funcs[0].old_sympos, 0);
    assert_eq!(
        o.funcs[0].new_func.symbol.as_deref(),
        Some("livepatch_cmdline_proc_show")
    );
    let layout = m.layout();
    assert!(layout.text > 0 && layout.rodata > 0 && layout.data > 0);
    assert!([layout.text, layout.rodata, layout.data]
        .iter()
        .all(|s| s % 4096 == 0));

    let l = link_ok(f, &m);
    assert_eq!(l.funcs.len(), 1);
    assert_eq!(l.funcs[0].old_addr, proc_addrs(f, "cmdline_proc_show")[0]);
    let b = bases(f, &m);
    assert!((b.text..b.text + layout.text).contains(&l.funcs[0].new_addr));
    assert_eq!(l.text.bytes.len() as u64, layout.text);
    assert_eq!(
        [l.text.va, l.rodata.va, l.data.va],
        [b.text, b.rodata, b.data]
    );

    check_relocations(f, &m, &l);
    // The call to seq_printf lands on the guest's seq_printf.
    assert_eq!(
        call_targets(&m, &l, "seq_printf"),
        proc_addrs(f, "seq_printf")
    );
    // The string the new function prints is in rodata, reachable by 32S.
    let s = b"this has been live patched";
    assert!(l.rodata.bytes.windows(s.len()).any(|w| w == s));

    // Every function's `call __fentry__` is now the ftrace nop.
    assert_eq!(
        m.fentry_sites.len(),
        3,
        "livepatch_init, livepatch_exit and the new function"
    );
    assert_eq!(l.fentry_nops.len(), m.fentry_sites.len());
    // (After the ENDBR64 that starts it in an IBT kernel's modules.)
    let new = l.funcs[0].new_addr;
    assert!(l.fentry_nops.contains(&new) || l.fentry_nops.contains(&(new + 4)));
    for &va in &l.fentry_nops {
        assert_eq!(l.read(va, 5).unwrap(), NOP5);
    }
    // No relocation is left against __fentry__.
    assert!(!m
        .relocs
        .iter()
        .any(|r| m.symbols[r.symbol].name == "__fentry__"));

    // Return sites jump to the guest's chosen return thunk (6.1), or are
    // plain `ret`s where the default thunk warns (6.12 on this CPU).
    let o = options(f);
    let thunk = o.return_thunk.expect("the guest has x86_return_thunk");
    eprintln!("{}: plain returns {}", f.release, o.plain_returns);
    assert!(!m.return_jumps.is_empty());
    for &i in &m.return_jumps {
        let p = l.va(m.relocs[i].place).unwrap();
        if o.plain_returns {
            assert_eq!(l.read(p - 1, 5).unwrap(), [0xc3, 0xcc, 0xcc, 0xcc, 0xcc]);
            continue;
        }
        assert_eq!(l.read(p - 1, 1).unwrap(), [0xe9]);
        let rel = i32::from_le_bytes(l.read(p, 4).unwrap().try_into().unwrap());
        assert_eq!((p + 4).wrapping_add_signed(i64::from(rel)), thunk);
    }
    eprintln!(
        "sample: layout {layout:?}, {} relocations, {} fentry nops, {} return sites, \
         x86_return_thunk {thunk:#x} (__x86_return_thunk {:#x})",
        m.relocs.len(),
        l.fentry_nops.len(),
        m.return_jumps.len(),
        proc_addrs(f, "__x86_return_thunk")[0]
    );

    // Without the guest's thunk the jumps stay on __x86_return_thunk.
    let plain = link::link(&m, &f.kernel.kallsyms, b, &LinkOptions::default()).unwrap();
    for &i in &m.return_jumps {
        let p = plain.va(m.relocs[i].place).unwrap();
        let rel = i32::from_le_bytes(plain.read(p, 4).unwrap().try_into().unwrap());
        assert_eq!(
            (p + 4).wrapping_add_signed(i64::from(rel)),
            proc_addrs(f, "__x86_return_thunk")[0]
        );
    }
}

/// klpvisor never runs a patch module's init or exit code: what they do
/// besides `klp_enable_patch` is found, to be reported.
#[test]
fn what_module_init_and_exit_do_besides_klp_enable_patch_is_found() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    // The kernel's shadow-variable sample frees its variables on exit.
    let m = parse(f, "shadow-fix1").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        m.init_exit_calls,
        [("module_exit", "`klp_shadow_free_all`".to_owned())]
    );
    // The usual patch: init only enables, exit does nothing.
    for name in ["livepatch-sample", "klpv-state-v2", "callbacks-v1"] {
        let m = parse(f, name).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(m.init_exit_calls, [], "{name}");
    }
}

#[test]
fn hot_patch_has_replace_states_callbacks_and_percpu() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let m = parse(f, "hot-getppid").unwrap_or_else(|e| panic!("{e}"));
    let p = &m.patch;
    assert_eq!(p.name, "hot_getppid");
    assert!(p.replace);
    assert_eq!(p.states.len(), 1);
    assert_eq!((p.states[0].id, p.states[0].version), (1, 2));
    let o = &p.objects[0];
    assert_eq!(o.funcs[0].old_name, "__x64_sys_getppid");
    let cb = &o.callbacks;
    assert_eq!(
        cb.pre_patch.as_ref().and_then(|c| c.symbol.as_deref()),
        Some("hot_pre_patch")
    );
    assert_eq!(
        cb.post_unpatch.as_ref().and_then(|c| c.symbol.as_deref()),
        Some("hot_post_unpatch")
    );
    assert!(cb.post_patch.is_none() && cb.pre_unpatch.is_none());

    let l = link_ok(f, &m);
    assert_eq!(l.funcs[0].old_addr, proc_addrs(f, "__x64_sys_getppid")[0]);
    assert_eq!(l.funcs[0].new_symbol.as_deref(), Some("livepatch_getppid"));
    let c = &l.callbacks[0];
    assert!(c.pre_patch.is_some() && c.post_unpatch.is_some());
    assert!(c.post_patch.is_none() && c.pre_unpatch.is_none());
    check_relocations(f, &m, &l);
    // `current` is a %gs-relative per-CPU reference: the absolute per-CPU
    // offset of current_task (6.1) or of pcpu_hot, which holds it (6.2+;
    // 6.12 reads it through its alias const_pcpu_hot),
    // not an address.
    let percpu = ["current_task", "pcpu_hot", "const_pcpu_hot"];
    let current = m
        .relocs
        .iter()
        .find(|r| percpu.contains(&m.symbols[r.symbol].name.as_str()))
        .expect("a reference to current_task or pcpu_hot");
    let name = m.symbols[current.symbol].name.as_str();
    assert_eq!(
        l.symbol_value(&m, current.symbol),
        Some(proc_addrs(f, name)[0])
    );
    assert!(proc_addrs(f, name)[0] < 0x10_0000);
    // The call counter lives in the data segment (.bss).
    let counter = m
        .symbols
        .iter()
        .position(|s| s.name == "hot_getppid_calls")
        .unwrap();
    let va = l.symbol_value(&m, counter).unwrap();
    assert!((l.data.va..l.data.va + l.data.bytes.len() as u64).contains(&va));
    assert!(m
        .sections
        .iter()
        .any(|s| s.name == ".bss" && s.segment == Segment::Data));
}

/// percpu-uptime's own per-CPU variable (`.data..percpu`, 8 bytes, 1000):
/// `this_cpu_inc` compiles to `incq %gs:var(%rip)` (R_X86_64_PC32) and
/// `per_cpu` takes `$var` (R_X86_64_32S). Linked for a block, both reach
/// the block's offset: the absolute one holds it, and rip + rel32 wraps
/// to it, as with the kernel's loader.
#[test]
fn a_patchs_own_per_cpu_variable_is_reached_at_its_block() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let m = parse(f, "percpu-uptime").unwrap_or_else(|e| panic!("{e}"));
    let pc = m.percpu.as_ref().expect("a .data..percpu section");
    assert_eq!(pc.size, 8);
    assert_eq!(pc.data, 1000u64.to_le_bytes());
    let l = link_ok(f, &m);
    let block = bases(f, &m).percpu;
    let mut kinds = Vec::new();
    for r in &m.relocs {
        let SymbolDef::PerCpu(offset) = m.symbols[r.symbol].def else {
            continue;
        };
        let va = l.va(r.place).unwrap();
        let field = i32::from_le_bytes(l.read(va, 4).unwrap().try_into().unwrap());
        let reached = if r.kind.pc_relative() {
            va.wrapping_add(field as i64 as u64)
        } else {
            field as i64 as u64
        };
        let want = (block + offset).wrapping_add_signed(r.addend);
        assert_eq!(reached, want, "{:?} at {}", r.kind, m.describe(r.place));
        kinds.push(r.kind);
    }
    assert!(kinds.contains(&RelocKind::Pc32), "{kinds:?}");
    assert!(kinds.contains(&RelocKind::Abs32S), "{kinds:?}");
}

#[test]
fn section_refusals() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    // A static key of the patch's own: refused, naming it.
    match parse(f, "bad-own-key") {
        Err(e @ ModuleError::BadTable(_)) => {
            let e = e.to_string();
            assert!(e.contains("livepatch_round_expiry"), "{e}");
            assert!(e.contains("defined by the patch"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // A tracepoint's key is the kernel's: its sites are parsed for
    // registration.
    let m = parse(f, "trace-itimer").unwrap_or_else(|e| panic!("{e}"));
    assert!(!m.tables.jumps.is_empty());
    assert!(m.tables.jumps.iter().all(|j| !j.branch));
    match parse(f, "bad-init-ref") {
        Err(e @ ModuleError::InitReferenced { .. }) => {
            let ModuleError::InitReferenced { from, to, section } = &e else {
                unreachable!()
            };
            assert!(from.starts_with("livepatch_show+"), "{e}");
            assert!(to.contains("banner"), "{e}");
            assert_eq!(section, ".init.data");
        }
        other => panic!("{other:?}"),
    }
}

/// Static calls in patch code follow `static_call_update`: each
/// `.static_call_sites` entry of trace-itimer (the tracepoint's
/// `tp_func_itimer_state`, whose target the kernel switches when a probe
/// registers, and on 6.1 `preempt_schedule_notrace`, which `preempt=`
/// switches) stays a call to
/// the kernel's own `__SCT__` trampoline, which `static_call_update`
/// rewrites, so the patch's call reaches whatever target the kernel chose
/// last. (The kernel would also rewrite a module's call sites in place;
/// going through the trampoline costs one jump and needs no registration.)
#[test]
fn static_calls_go_through_the_kernels_trampolines() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let m = parse(f, "trace-itimer").unwrap_or_else(|e| panic!("{e}"));
    let l = link_ok(f, &m);
    let mut tramps: Vec<&str> = m
        .relocs
        .iter()
        .map(|r| m.symbols[r.symbol].name.as_str())
        .filter(|n| n.starts_with("__SCT__"))
        .collect();
    tramps.sort_unstable();
    tramps.dedup();
    assert!(
        tramps.contains(&"__SCT__tp_func_itimer_state"),
        "the tracepoint's static call: {tramps:?}"
    );
    for tramp in tramps {
        let want = f.kernel.kallsyms.addr(tramp).unwrap();
        let targets = call_targets(&m, &l, tramp);
        assert!(!targets.is_empty(), "trace-itimer calls {tramp}");
        assert!(
            targets.iter().all(|&t| t == want),
            "{tramp}: {targets:x?} != {want:#x}"
        );
    }
}

#[test]
fn not_livepatch_and_module_objects() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    assert!(matches!(
        parse(f, "not-livepatch"),
        Err(ModuleError::NotLivepatch(_))
    ));
    // A module object parses; it is resolved against that module alone.
    let m = parse(f, "bad-module-object").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.patch.objects[0].name.as_deref(), Some("pvpanic"));
    let modules = f.kernel.modules(&f.guest).unwrap();
    let symbols = GuestSymbols {
        kallsyms: &f.kernel.kallsyms,
        modules: &modules,
    };
    match link::link_objects(&m, &symbols, bases(f, &m), &options(f)) {
        Err(e @ LinkError::ModuleFunctionNotFound { .. }) => {
            let LinkError::ModuleFunctionNotFound { module, name } = &e else {
                unreachable!()
            };
            assert_eq!(
                (module.as_str(), name.as_str()),
                ("pvpanic", "klpv_no_such_function")
            );
            assert!(e.to_string().contains("module `pvpanic`"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // Without the module loaded, the object waits: nothing to redirect.
    let l = link_ok(f, &m);
    assert_eq!(l.objects.len(), 1);
    assert!(!l.objects[0].loaded);
    assert!(l.funcs.is_empty() && l.callbacks.is_empty());
}

/// A kpatch-build module (kpatch-cmdline: kpatch's own patch hook from
/// Debian's kpatch-build package, and a .kpatch.funcs entry in kpatch's
/// layout) has no static klp_patch: the patch is the one kpatch's hook
/// would build at init time. Its fixed function keeps the original name,
/// its reference to the unexported saved_command_line is a klp relocation,
/// and kpatch-build's default makes it a replace patch. With a callback in
/// kpatch's callback table it is refused, naming the table.
#[test]
fn a_kpatch_build_module_is_read_as_its_hook_would_build_it() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let m = parse(f, "kpatch-cmdline").unwrap_or_else(|e| panic!("{e}"));
    let p = &m.patch;
    assert_eq!(p.name, "kpatch_cmdline");
    assert!(p.replace, "KLP_REPLACE_ENABLE defaults to true");
    assert!(p.states.is_empty());
    assert_eq!(p.objects.len(), 1);
    let o = &p.objects[0];
    assert_eq!(o.name, None, "vmlinux");
    assert_eq!(o.callbacks, Default::default());
    assert_eq!(o.funcs.len(), 1);
    assert_eq!(o.funcs[0].old_name, "cmdline_proc_show");
    assert_eq!(o.funcs[0].old_sympos, 0);
    assert_eq!(
        o.funcs[0].new_func.symbol.as_deref(),
        Some("cmdline_proc_show")
    );
    let l = link_ok(f, &m);
    assert_eq!(l.funcs.len(), 1);
    assert_eq!(l.funcs[0].old_addr, proc_addrs(f, "cmdline_proc_show")[0]);
    check_relocations(f, &m, &l);
    // The seq_puts calls land on the guest's seq_puts (6.11+ inlines it
    // into __seq_puts, or seq_write for a constant string).
    let callee = ["seq_puts", "__seq_puts"]
        .into_iter()
        .find(|n| !proc_addrs(f, n).is_empty())
        .unwrap();
    let addr = proc_addrs(f, callee)[0];
    let targets = call_targets(&m, &l, callee);
    assert!(
        !targets.is_empty() && targets.iter().all(|&t| t == addr),
        "{targets:x?}"
    );

    // A callback in kpatch's callback table is refused, named.
    match parse(f, "bad-kpatch-callback") {
        Err(e @ ModuleError::Kpatch(_)) => {
            assert!(e.to_string().contains(".kpatch.callbacks.pre_patch"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

/// A patch with a vmlinux object, an object for the loaded pvpanic module
/// and one for dummy (not loaded): the first two link (the module's old
/// function at the address its own kallsyms gives, and with its size),
/// dummy waits.
#[test]
fn module_objects_resolve_in_their_module_and_absent_ones_wait() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let m = parse(f, "module-pvpanic").unwrap_or_else(|e| panic!("{e}"));
    let modules = f.kernel.modules(&f.guest).unwrap();
    let pvpanic = modules.iter().find(|m| m.name == "pvpanic").unwrap();
    let symbols = GuestSymbols {
        kallsyms: &f.kernel.kallsyms,
        modules: &modules,
    };
    let l = link::link_objects(&m, &symbols, bases(f, &m), &options(f))
        .unwrap_or_else(|e| panic!("{e}"));
    check_relocations(f, &m, &l);
    let objects: Vec<_> = l
        .objects
        .iter()
        .map(|o| (o.name.as_deref(), o.loaded, o.funcs))
        .collect();
    assert_eq!(
        objects,
        [
            (None, true, 1),
            (Some("pvpanic"), true, 1),
            (Some("dummy"), false, 1)
        ]
    );
    assert_eq!(l.funcs.len(), 2);
    assert_eq!(l.funcs[0].old_addr, proc_addrs(f, "cmdline_proc_show")[0]);
    let show = pvpanic.lookup("capability_show")[0].symbol;
    assert_eq!(l.funcs[1].object.as_deref(), Some("pvpanic"));
    assert_eq!(l.funcs[1].old_addr, show.addr);
    assert_eq!(l.funcs[1].old_size, Some(show.size));
    // The guest's /proc/kallsyms says the same.
    let line = format!("{:016x} t capability_show\t[pvpanic]", show.addr);
    assert!(f.kallsyms_txt.lines().any(|x| x == line), "{line}");
    assert_eq!(
        l.callbacks.len(),
        2,
        "the waiting object's callbacks wait too"
    );
}

#[test]
fn old_function_errors() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let link_err = |name: &str| {
        let m = parse(f, name).unwrap_or_else(|e| panic!("{name}: {e}"));
        link::link(&m, &f.kernel.kallsyms, bases(f, &m), &options(f)).unwrap_err()
    };
    match link_err("bad-noold") {
        LinkError::OldFunctionNotFound { name } => assert_eq!(name, "klpv_no_such_function"),
        other => panic!("{other}"),
    }
    let version_show = proc_addrs(f, "version_show");
    // Two in 6.1, three in 6.12.
    assert!(
        version_show.len() >= 2,
        "the guest has several version_show"
    );
    match link_err("bad-ambiguous") {
        e @ LinkError::OldFunctionAmbiguous { .. } => {
            let LinkError::OldFunctionAmbiguous { name, candidates } = &e else {
                unreachable!()
            };
            assert_eq!(name, "version_show");
            let want: Vec<(u32, u64)> = (1..).zip(version_show.iter().copied()).collect();
            assert_eq!(candidates, &want);
            assert!(e.to_string().contains(&format!("{:#x}", version_show[1])));
        }
        other => panic!("{other}"),
    }
    match link_err("bad-sympos") {
        LinkError::OldFunctionNoSuchPosition {
            name,
            sympos,
            count,
        } => assert_eq!(
            (name.as_str(), sympos, count),
            ("version_show", 9, version_show.len())
        ),
        other => panic!("{other}"),
    }
    match link_err("bad-unresolved") {
        e @ LinkError::Unresolved(_) => {
            let LinkError::Unresolved(list) = &e else {
                unreachable!()
            };
            let mut names: Vec<&str> = list.iter().map(|u| u.name.as_str()).collect();
            names.sort_unstable();
            assert_eq!(
                names,
                [
                    "cmdline_proc_show",
                    "klpv_missing_function",
                    "klpv_missing_variable"
                ]
            );
            let msg = e.to_string();
            assert!(msg.contains("static"), "{msg}");
        }
        other => panic!("{other}"),
    }
}

#[test]
fn release_machine_and_garbage() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let sample = ko("livepatch-sample");
    // Built for another release: the same module with its vermagic edited.
    // (Its first digit changed: same length, for any release.)
    let other = format!("9{}", &f.release[1..]);
    let other = other.as_str();
    assert_ne!(other, f.release);
    let edited = replace_bytes(&sample, f.release.as_bytes(), other.as_bytes());
    match Module::parse(&edited, &f.kernel.btf, &f.release) {
        Err(ModuleError::ReleaseMismatch { module, guest }) => {
            assert_eq!(
                (module.as_str(), guest.as_str()),
                (other, f.release.as_str())
            )
        }
        other => panic!("{other:?}"),
    }
    // Or, equally, the guest runs another release.
    assert!(matches!(
        Module::parse(&sample, &f.kernel.btf, "6.1.0-0-cloud-amd64"),
        Err(ModuleError::ReleaseMismatch { .. })
    ));
    let mut arm = sample.clone();
    arm[18..20].copy_from_slice(&183u16.to_le_bytes()); // EM_AARCH64
    assert!(matches!(
        Module::parse(&arm, &f.kernel.btf, &f.release),
        Err(ModuleError::WrongMachine { machine: 183, .. })
    ));
    assert!(matches!(
        Module::parse(b"hello, world", &f.kernel.btf, &f.release),
        Err(ModuleError::NotElf)
    ));
}

fn replace_bytes(hay: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut out = hay.to_vec();
    let mut i = 0;
    while i + from.len() <= out.len() {
        if &out[i..i + from.len()] == from {
            out[i..i + from.len()].copy_from_slice(to);
            i += from.len();
        } else {
            i += 1;
        }
    }
    out
}

/// Every prefix of a real module fails cleanly, never panics.
#[test]
fn every_truncation_fails_without_panic() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let sample = ko("livepatch-sample");
    for len in 0..sample.len() {
        assert!(
            Module::parse(&sample[..len], &f.kernel.btf, &f.release).is_err(),
            "a {len}-byte prefix parsed"
        );
    }
}

/// Corrupting the headers and tables of a (debug-stripped) module gives
/// errors or modules, never a panic; and whatever parses also links or
/// fails cleanly.
#[test]
fn corrupted_modules_never_panic() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let dir = root().join(format!("build/patches{}", guest_suffix()));
    let stripped = dir.join("livepatch-sample.stripped.ko");
    let status = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(dir.join("livepatch-sample.ko"))
        .arg(&stripped)
        .status()
        .expect("objcopy");
    assert!(status.success());
    // Build the .ko first (the call above needs it).
    let _ = ko("livepatch-sample");
    let good = std::fs::read(&stripped).unwrap();
    let m = Module::parse(&good, &f.kernel.btf, &f.release).unwrap_or_else(|e| panic!("{e}"));
    let b = bases(f, &m);
    let mut parsed = 0;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for pos in 0..good.len() {
        for value in [0u8, 0xff, 0x80, good[pos].wrapping_add(1)] {
            // Every byte of the first 4 KiB and of the last 4 KiB (headers,
            // symbols, relocations), a random sample elsewhere.
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if pos >= 4096 && pos + 4096 < good.len() && rng % 8 != 0 {
                continue;
            }
            let mut bad = good.clone();
            bad[pos] = value;
            if let Ok(m) = Module::parse(&bad, &f.kernel.btf, &f.release) {
                parsed += 1;
                let _ = link::link(&m, &f.kernel.kallsyms, b, &LinkOptions::default());
            }
        }
    }
    eprintln!(
        "{} bytes; {parsed} corrupted variants still parsed",
        good.len()
    );
}

/// A guest whose mitigation picked another return thunk (retbleed/SRSO):
/// every `jmp __x86_return_thunk` goes to it, as apply_returns would make it.
#[test]
fn return_sites_follow_the_guests_thunk() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let m = parse(f, "hot-getppid").unwrap_or_else(|e| panic!("{e}"));
    let other = proc_addrs(f, "srso_return_thunk")
        .first()
        .copied()
        .unwrap_or(proc_addrs(f, "__x86_return_thunk")[0] + 0x40);
    let l = link::link(
        &m,
        &f.kernel.kallsyms,
        bases(f, &m),
        &LinkOptions {
            return_thunk: Some(other),
            plain_returns: false,
            alternatives: None,
        },
    )
    .unwrap();
    assert!(!m.return_jumps.is_empty());
    for &i in &m.return_jumps {
        let p = l.va(m.relocs[i].place).unwrap();
        assert_eq!(l.read(p - 1, 1).unwrap(), [0xe9]);
        let rel = i32::from_le_bytes(l.read(p, 4).unwrap().try_into().unwrap());
        assert_eq!((p + 4).wrapping_add_signed(i64::from(rel)), other);
    }
}

/// `.klp.sym.<object>.<name>,<sympos>` symbols (what klp-convert or
/// kpatch-build emit to reach static kernel symbols): made here from
/// bad-unresolved.ko by renaming its undefined symbols with objcopy.
#[test]
fn klp_sym_references_follow_sympos() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let _ = ko("bad-unresolved");
    let dir = root().join(format!("build/patches{}", guest_suffix()));
    let convert = |out: &str, renames: &[(&str, &str)]| -> Vec<u8> {
        let path = dir.join(out);
        let mut cmd = Command::new("objcopy");
        for (from, to) in renames {
            cmd.arg(format!("--redefine-sym={from}={to}"));
        }
        let status = cmd
            .arg(dir.join("bad-unresolved.ko"))
            .arg(&path)
            .status()
            .expect("objcopy");
        assert!(status.success());
        std::fs::read(path).unwrap()
    };
    let bytes = convert(
        "klp-sym.ko",
        &[
            ("cmdline_proc_show", ".klp.sym.vmlinux.cmdline_proc_show,0"),
            ("klpv_missing_function", ".klp.sym.vmlinux.version_show,2"),
            (
                "klpv_missing_variable",
                ".klp.sym.vmlinux.saved_command_line,0",
            ),
        ],
    );
    let m = Module::parse(&bytes, &f.kernel.btf, &f.release).unwrap_or_else(|e| panic!("{e}"));
    let l = link_ok(f, &m);
    check_relocations(f, &m, &l);
    let value = |name: &str| {
        let i = m.symbols.iter().position(|s| s.name == name).unwrap();
        l.symbol_value(&m, i).unwrap()
    };
    assert_eq!(
        value(".klp.sym.vmlinux.cmdline_proc_show,0"),
        proc_addrs(f, "cmdline_proc_show")[0]
    );
    assert_eq!(
        value(".klp.sym.vmlinux.version_show,2"),
        proc_addrs(f, "version_show")[1]
    );
    assert_eq!(
        value(".klp.sym.vmlinux.saved_command_line,0"),
        proc_addrs(f, "saved_command_line")[0]
    );

    // Wrong sympos and an ambiguous name are reported together.
    let bytes = convert(
        "klp-sym-bad.ko",
        &[
            ("cmdline_proc_show", ".klp.sym.vmlinux.cmdline_proc_show,2"),
            ("klpv_missing_function", ".klp.sym.vmlinux.version_show,0"),
        ],
    );
    let m = Module::parse(&bytes, &f.kernel.btf, &f.release).unwrap_or_else(|e| panic!("{e}"));
    match link::link(&m, &f.kernel.kallsyms, bases(f, &m), &options(f)) {
        Err(LinkError::Unresolved(list)) => {
            let names: Vec<&str> = list.iter().map(|u| u.name.as_str()).collect();
            assert_eq!(names.len(), 3, "{list:?}");
            assert!(names.contains(&".klp.sym.vmlinux.cmdline_proc_show,2"));
            assert!(names.contains(&".klp.sym.vmlinux.version_show,0"));
            assert!(names.contains(&"klpv_missing_variable"));
        }
        other => panic!("{other:?}"),
    }

    // `.klp.sym.<module>` symbols resolve in that module only, sympos
    // counted there; with the module absent their relocations wait.
    let bytes = convert(
        "klp-sym-module.ko",
        &[
            ("cmdline_proc_show", ".klp.sym.vmlinux.cmdline_proc_show,0"),
            (
                "klpv_missing_function",
                ".klp.sym.pvpanic.capability_show,1",
            ),
            ("klpv_missing_variable", ".klp.sym.pvpanic.pvpanic_list,0"),
        ],
    );
    let m = Module::parse(&bytes, &f.kernel.btf, &f.release).unwrap_or_else(|e| panic!("{e}"));
    let waiting: Vec<_> = m
        .relocs
        .iter()
        .filter_map(|r| r.object.as_deref())
        .collect();
    assert!(!waiting.is_empty() && waiting.iter().all(|o| *o == "pvpanic"));
    let modules = f.kernel.modules(&f.guest).unwrap();
    let pvpanic = modules.iter().find(|m| m.name == "pvpanic").unwrap();
    let symbols = GuestSymbols {
        kallsyms: &f.kernel.kallsyms,
        modules: &modules,
    };
    let l = link::link_objects(&m, &symbols, bases(f, &m), &options(f))
        .unwrap_or_else(|e| panic!("{e}"));
    check_relocations(f, &m, &l);
    let value = |l: &Linked, name: &str| {
        let i = m.symbols.iter().position(|s| s.name == name).unwrap();
        l.symbol_value(&m, i)
    };
    assert_eq!(
        value(&l, ".klp.sym.pvpanic.capability_show,1"),
        Some(pvpanic.lookup("capability_show")[0].symbol.addr)
    );
    assert_eq!(
        value(&l, ".klp.sym.pvpanic.pvpanic_list,0"),
        Some(pvpanic.lookup("pvpanic_list")[0].symbol.addr)
    );
    // vmlinux alone: the pvpanic symbols get no value, their relocation
    // fields stay as compiled (zero) until the module is there.
    let alone = link_ok(f, &m);
    assert_eq!(value(&alone, ".klp.sym.pvpanic.capability_show,1"), None);
    for r in m.relocs.iter().filter(|r| r.object.is_some()) {
        let p = alone.va(r.place).unwrap();
        assert!(alone
            .read(p, r.kind.width())
            .unwrap()
            .iter()
            .all(|&b| b == 0));
    }
    // sympos counts within the module: pvpanic has one capability_show
    // (vmlinux has none), so position 2 does not exist.
    let bytes = convert(
        "klp-sym-module-bad.ko",
        &[
            ("cmdline_proc_show", ".klp.sym.vmlinux.cmdline_proc_show,0"),
            (
                "klpv_missing_function",
                ".klp.sym.pvpanic.capability_show,2",
            ),
            ("klpv_missing_variable", ".klp.sym.pvpanic.pvpanic_list,0"),
        ],
    );
    let m = Module::parse(&bytes, &f.kernel.btf, &f.release).unwrap_or_else(|e| panic!("{e}"));
    match link::link_objects(&m, &symbols, bases(f, &m), &options(f)) {
        Err(LinkError::Unresolved(list)) => {
            assert_eq!(list.len(), 1, "{list:?}");
            assert_eq!(list[0].name, ".klp.sym.pvpanic.capability_show,2");
            assert!(
                list[0].reason.contains("module `pvpanic` has 1"),
                "{list:?}"
            );
        }
        other => panic!("{other:?}"),
    }
}

/// `bytes` (an ELF64 .ko) with section `from` renamed to `to` and `flags`
/// ORed into its sh_flags: what klp-convert would have emitted. The new
/// name is appended to the file and `.shstrtab` stretched to reach it.
fn with_section(bytes: &[u8], from: &str, to: &str, flags: u64) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap()) as usize;
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let (shoff, shentsize, shnum, shstrndx) = (
        u64_at(&b, 0x28) as usize,
        u16_at(&b, 0x3a),
        u16_at(&b, 0x3c),
        u16_at(&b, 0x3e),
    );
    let strsh = shoff + shstrndx * shentsize;
    let strtab = u64_at(&b, strsh + 0x18) as usize;
    let new_name = b.len() - strtab;
    b.extend_from_slice(to.as_bytes());
    b.push(0);
    let size = (b.len() - strtab) as u64;
    b[strsh + 0x20..strsh + 0x28].copy_from_slice(&size.to_le_bytes());
    for i in 0..shnum {
        let sh = shoff + i * shentsize;
        let name = strtab + u32::from_le_bytes(b[sh..sh + 4].try_into().unwrap()) as usize;
        if b[name..].starts_with(from.as_bytes()) && b[name + from.len()] == 0 {
            b[sh..sh + 4].copy_from_slice(&(new_name as u32).to_le_bytes());
            let f = u64_at(&b, sh + 8) | flags;
            b[sh + 8..sh + 16].copy_from_slice(&f.to_le_bytes());
            return b;
        }
    }
    panic!("no section {from}");
}

/// klp's rules for a module's `.klp.rela.<module>.*` section: only
/// `.klp.sym` symbols (klp_resolve_symbols refuses anything else). Made
/// by turning livepatch-sample's `.rela.text` into `.klp.rela.pvpanic.text`
/// with SHF_RELA_LIVEPATCH: its relocations use plain symbols.
#[test]
fn module_klp_rela_sections_need_klp_symbols() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let bytes = with_section(
        &ko("livepatch-sample"),
        ".rela.text",
        ".klp.rela.pvpanic.text",
        0x0010_0000, // SHF_RELA_LIVEPATCH
    );
    match Module::parse(&bytes, &f.kernel.btf, &f.release) {
        Err(e @ ModuleError::KlpRelaPlainSymbol { .. }) => {
            assert!(e.to_string().contains(".klp.rela.pvpanic.text"), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

/// The old functions the test patches replace start with the 5-byte
/// ftrace nop in the running guest (what the redirect overwrites).
#[test]
fn old_functions_start_with_the_ftrace_nop() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let space = f.kernel.space(&f.guest);
    for name in ["cmdline_proc_show", "__x64_sys_getppid", "__x64_sys_time"] {
        let va = proc_addrs(f, name)[0];
        let mut b = [0u8; 9];
        space.read_virt(va, &mut b).unwrap();
        let entry = if b[..4] == [0xf3, 0x0f, 0x1e, 0xfa] {
            &b[4..9] // ENDBR64 first
        } else {
            &b[..5]
        };
        assert_eq!(entry, NOP5, "{name} at {va:#x}: {b:02x?}");
    }
}

/// The multiset of instructions that show which way each interrupt-flag
/// alternative went: `pushf`, `popf`, `cli`, `sti` inline, or a paravirt
/// `call *pv_ops+X(%rip)`.
fn irq_flag_code(bytes: &[u8]) -> Vec<&'static str> {
    use iced_x86::{Decoder, DecoderOptions};
    let mut out = Vec::new();
    let mut d = Decoder::with_ip(64, bytes, 0, DecoderOptions::NONE);
    while d.can_decode() {
        let at = d.position();
        let insn = d.decode();
        assert!(!insn.is_invalid(), "undecodable at +{at:#x}: {bytes:02x?}");
        let b = &bytes[at..at + insn.len()];
        match b {
            [0x9c] => out.push("pushf"),
            [0x9d] => out.push("popf"),
            [0xfa] => out.push("cli"),
            [0xfb] => out.push("sti"),
            [0xff, 0x15, ..] => out.push("call *rip"),
            _ => {}
        }
    }
    out.sort_unstable();
    out
}

/// A copy of a real 6.1 function with alternatives (local_irq_save and
/// local_irq_restore are paravirt alternatives, static_cpu_has one with
/// .altinstr_aux) links to the code the guest kernel chooses for a
/// non-Xen CPU: `pushf; pop %rax`, `cli` and `sti` inline instead of the
/// paravirt calls, and no jump into .altinstr_aux.
#[test]
fn alternatives_follow_the_guests_own_choice() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    let m = parse(f, "alt-gsbase").unwrap_or_else(|e| panic!("{e}"));
    assert!(link::alternatives::used_by(&m));
    let l = link_ok(f, &m);
    // (No check_relocations: alternatives rewrite relocated fields.)
    let func = &l.funcs[0];
    let size = m
        .symbols
        .iter()
        .find(|s| s.name == "livepatch_x86_gsbase_read_cpu_inactive")
        .unwrap()
        .size;
    let new = l.read(func.new_addr, size).unwrap();
    // The guest is not a Xen PV guest: its kernel chose the native
    // inline code for every interrupt-flag alternative (6.1: ALT_NOT
    // XENPV; 6.12: the same, nested over ALT_CALL_ALWAYS), and so must we.
    let cpu = options(f).alternatives.unwrap();
    assert_eq!(cpu.has(8 * 32 + 16), Some(false), "X86_FEATURE_XENPV");
    let ours = irq_flag_code(new);
    // rdmsrl's two paravirt calls: on 6.1 indirect calls through pv_ops
    // (not alternatives); on 6.12 ALT_CALL alternatives that become direct
    // calls to the native function, as the guest's kernel made them.
    // (Both 6.1 flavours, cloud and generic, are the 6.1 case.)
    let want: &[&str] = if guest_suffix() != "-6.12" {
        &["call *rip", "call *rip", "cli", "pushf", "sti"]
    } else {
        &["cli", "pushf", "sti"]
    };
    assert_eq!(ours, want, "{new:02x?}");

    // static_cpu_has(X86_FEATURE_XENPV) was decided: nothing in the patch
    // jumps into .altinstr_aux (the test-at-runtime slow path).
    let aux = m
        .sections
        .iter()
        .find(|s| s.name == ".altinstr_aux")
        .unwrap();
    let aux_va = l
        .va(klpvisor_engine::module::Place {
            section: aux.elf_index,
            offset: 0,
        })
        .unwrap();
    let helper = m
        .symbols
        .iter()
        .find(|s| s.name == "alt_rdgsbase_inactive")
        .map(|s| s.size);
    let mut d = iced_x86::Decoder::with_ip(64, &l.text.bytes, l.text.va, 0);
    while d.can_decode() {
        let insn = d.decode();
        let t = insn.near_branch_target();
        assert!(
            t == 0 || !(aux_va..aux_va + aux.data.len() as u64).contains(&t),
            "{:#x} still jumps to .altinstr_aux ({helper:?})",
            insn.ip()
        );
    }
}

/// `patcher info` reads modules with klpvisor's built-in klp layouts (no
/// guest at hand): they must be the real guest's, and reading with them
/// must give the patch that parsing against the guest gives, for a plain
/// livepatch module, one with module objects, callbacks and states, and a
/// kpatch-build module.
#[test]
fn offline_inspection_reads_the_patch_the_guest_would_get() {
    if common::skip_without_dump() {
        return;
    }
    let f = fixture();
    assert_eq!(
        KlpLayouts::from_btf(&f.kernel.btf).unwrap_or_else(|e| panic!("{e}")),
        KlpLayouts::builtin(),
        "the guest's klp layouts differ from the built-in ones"
    );
    for name in [
        "livepatch-sample",
        "module-pvpanic",
        "callbacks-v1",
        "klpv-state-v2",
        "kpatch-cmdline",
    ] {
        let bytes = ko(name);
        let parsed = Module::parse(&bytes, &f.kernel.btf, &f.release)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let seen =
            inspect(&bytes, &KlpLayouts::builtin()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(seen.patch, parsed.patch, "{name}");
        assert_eq!(seen.kpatch_build, name == "kpatch-cmdline", "{name}");
        assert_eq!(seen.modinfo.release(), Some(f.release.as_str()), "{name}");
        assert_eq!(seen.refused_sections().count(), 0, "{name}");
    }
}
