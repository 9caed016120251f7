//! What to do with each allocatable section of a module, mirroring what the
//! kernel's module loader (kernel/module/main.c, arch/x86/kernel/module.c
//! `module_finalize`) does with it, since klpvisor plays the loader's part
//! from outside the guest.
//!
//! * Code and data are loaded into one of three segments by permission.
//! * Metadata the loader only consumes is read (`__mcount_loc`,
//!   `.return_sites`) or skipped when leaving it unprocessed is still
//!   correct (see [`policy`] for each reason).
//! * The tables the loader registers through `struct module` (exception
//!   fixups, BUG/WARN sites, ORC) are parsed and registered the same way,
//!   from outside ([`crate::register`]).
//! * Sections whose meaning depends on another registration with the
//!   running kernel are refused: the code would misbehave in ways the user
//!   cannot see (a static key would never flip).
//! * Unknown allocatable sections are refused too: we cannot tell whether
//!   the loader would have processed them.

/// The three segments of a linked patch, by page permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Segment {
    /// Read + execute.
    Text,
    /// Read only, no execute.
    Rodata,
    /// Read + write, no execute (`.data`, `.bss`).
    Data,
}

/// The decision for one section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Copied into the arena.
    Load(Segment),
    /// Read by the parser, not loaded.
    Parse,
    /// Not loaded; the reason it is safe.
    Skip(&'static str),
    /// Refused when it is not empty; the reason.
    Refuse(&'static str),
    /// `.data..percpu`: the module's per-CPU variables. Not loaded into the
    /// arena: as the kernel's loader does, klpvisor allocates a per-CPU
    /// block for it in the guest (`percpu_modalloc`), gives its symbols
    /// the block's per-CPU address (`simplify_symbols`) and copies its
    /// initial bytes into every possible CPU's copy (`percpu_modcopy`).
    PerCpu,
    /// `.init.*` / `.exit.*`: never run from outside (klpvisor does not call
    /// module_init); a reference to them from loaded code is an error.
    InitExit,
    /// Not recognised.
    Unknown,
}

/// The one section the kernel's loader treats as per-CPU data
/// (`find_pcpusec`).
pub const PERCPU: &str = ".data..percpu";

/// The section that is the module's `struct module` (THIS_MODULE).
pub const THIS_MODULE: &str = ".gnu.linkonce.this_module";

/// The decision for an allocatable section, by name and flags.
pub fn policy(name: &str, write: bool, exec: bool) -> Policy {
    // Exact names first: metadata sections the loader consumes.
    match name {
        "__mcount_loc" => return Policy::Parse,
        ".return_sites" => return Policy::Parse,
        ".modinfo" | "__versions" => return Policy::Skip("module metadata, checked by the parser"),
        THIS_MODULE => {
            return Policy::Skip(
                "the module's struct module: the patch is not a guest module, so THIS_MODULE is \
                 NULL, as for built-in code",
            )
        }
        ".retpoline_sites" => {
            return Policy::Skip(
                "indirect calls stay calls to the kernel's __x86_indirect_thunk_*, which the \
                 kernel itself patched for its mitigation mode",
            )
        }
        ".orc_header" => {
            return Policy::Skip(
                "a hash of the kernel's ORC entry format (6.4+), for tools that read a \
                 module's ORC data; the module loader does not read it",
            )
        }
        ".call_sites" => {
            return Policy::Skip(
                "call-depth tracking (6.2+): only with retbleed=stuff does the loader point the \
                 patch's direct calls at the callees' accounting thunks; left as plain calls, a \
                 call is not counted and the return-stack refill comes one return earlier, \
                 more often, never later. Calls into the patch go through the old function, \
                 whose callers the kernel already points at its thunk",
            )
        }
        // Tables the module loader registers with the kernel: parsed into
        // entries (module::tables) and written, sorted and relocated, next
        // to the struct module that registers the patch with the guest
        // kernel (crate::register).
        "__ex_table" | "__bug_table" | ".orc_unwind" | ".orc_unwind_ip" | "__jump_table" => {
            return Policy::Parse
        }
        ".smp_locks" => {
            return Policy::Skip("lock prefixes stay, which is correct on SMP and UP alike")
        }
        ".parainstructions" => {
            return Policy::Skip("paravirt call sites stay indirect calls through pv_ops")
        }
        ".static_call_sites" => {
            return Policy::Skip(
                "static calls stay calls to the kernel's __SCT__ trampolines, which the kernel \
                 keeps pointing at the current target",
            )
        }
        // Alternatives: the table and the code it points at are loaded
        // like the kernel loads them, and the linker applies the table for
        // the guest's CPU (link::alternatives).
        ".altinstructions" => return Policy::Load(Segment::Rodata),
        ".altinstr_replacement" | ".altinstr_aux" => return Policy::Load(Segment::Text),
        "__patchable_function_entries" | "__param" => {
            return Policy::Skip("nothing in the patch code depends on it")
        }
        // kpatch-build's patch description (crate::module::kpatch): read
        // from the file as kpatch's hook reads it at init time.
        ".kpatch.funcs" | ".kpatch.strings" => {
            return Policy::Skip("kpatch's patch description, read by klpvisor from the file")
        }
        // kpatch.lds's callback and force tables: refused by the kpatch
        // reader when they hold an entry; only the padding otherwise.
        ".kpatch.callbacks.pre_patch"
        | ".kpatch.callbacks.post_patch"
        | ".kpatch.callbacks.pre_unpatch"
        | ".kpatch.callbacks.post_unpatch"
        | ".kpatch.force" => return Policy::Skip("kpatch's callback and force tables"),
        ".static_call.text" | ".static_call_tramp_key" => {
            return Policy::Refuse("static calls defined by the patch need kernel registration")
        }
        _ => {}
    }
    if name.starts_with(".klp.rela.") {
        // module-elf-format.rst marks klp relocation sections SHF_ALLOC so
        // the kernel's loader keeps them for klp (kpatch-build and
        // klp-convert do); klpvisor reads them from the module file and
        // applies them when their object is patched.
        return Policy::Skip("klp relocations, applied when their object is patched");
    }
    let prefixed = |p: &str| name == p || name.starts_with(&format!("{p}."));
    if prefixed(".init") || prefixed(".exit") {
        return Policy::InitExit;
    }
    if name == PERCPU {
        return Policy::PerCpu;
    }
    if name.starts_with(PERCPU) {
        // DEFINE_PER_CPU_READ_MOSTLY and the like outside of a module's
        // build: the kernel's loader would load such a section as
        // ordinary data, and every this_cpu access to it would address
        // the wrong memory.
        return Policy::Refuse(
            "per-CPU variables outside .data..percpu: the kernel's module loader treats only \
             .data..percpu as per-CPU data (a module's DEFINE_PER_CPU_* variants all go \
             there), so this section's variables would be addressed as ordinary data",
        );
    }
    if name.starts_with("__ksymtab") || name.starts_with("__kcrctab") {
        return Policy::Refuse(
            "the patch exports symbols, which only a module loaded by the kernel can",
        );
    }
    if name.starts_with("__tracepoint")
        || name.starts_with("_ftrace_")
        || name.starts_with("__dyndbg")
        || name.starts_with("__bpf_raw_tp")
        || name == "__kprobes"
    {
        return Policy::Refuse("tracing metadata needs registration with the kernel");
    }
    if name.starts_with(".note") {
        return Policy::Skip("ELF notes (build id, Linux version)");
    }
    if exec {
        if prefixed(".text") || prefixed(".noinstr.text") || prefixed(".sched.text") {
            return Policy::Load(Segment::Text);
        }
        return Policy::Unknown;
    }
    if name == ".data..ro_after_init" {
        // Read-only once module_init has run; nothing runs init here.
        return Policy::Load(Segment::Rodata);
    }
    if !write && (prefixed(".rodata") || name.starts_with(".rodata.")) {
        return Policy::Load(Segment::Rodata);
    }
    if write && (prefixed(".data") || name.starts_with(".data.") || prefixed(".bss")) {
        return Policy::Load(Segment::Data);
    }
    Policy::Unknown
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        assert_eq!(policy(".text", false, true), Policy::Load(Segment::Text));
        assert_eq!(
            policy(".text.unlikely", false, true),
            Policy::Load(Segment::Text)
        );
        assert_eq!(policy(".init.text", false, true), Policy::InitExit);
        assert_eq!(policy(".exit.data", true, false), Policy::InitExit);
        assert_eq!(
            policy(".rodata.str1.1", false, false),
            Policy::Load(Segment::Rodata)
        );
        assert_eq!(
            policy(".data..ro_after_init", true, false),
            Policy::Load(Segment::Rodata)
        );
        assert_eq!(policy(".data", true, false), Policy::Load(Segment::Data));
        assert_eq!(
            policy(".data..read_mostly", true, false),
            Policy::Load(Segment::Data)
        );
        assert_eq!(policy(".bss", true, false), Policy::Load(Segment::Data));
        assert_eq!(policy("__ex_table", false, false), Policy::Parse);
        assert_eq!(policy("__bug_table", true, false), Policy::Parse);
        assert_eq!(policy(".orc_unwind_ip", false, false), Policy::Parse);
        assert_eq!(policy("__jump_table", true, false), Policy::Parse);
        assert!(matches!(
            policy("__ksymtab_gpl", false, false),
            Policy::Refuse(_)
        ));
        assert!(matches!(policy(THIS_MODULE, true, false), Policy::Skip(_)));
        assert_eq!(policy("__mcount_loc", false, false), Policy::Parse);
        // Allocated, as the livepatch ELF format has it, but not loaded.
        assert!(matches!(
            policy(".klp.rela.vmlinux..text", false, false),
            Policy::Skip(_)
        ));
        // 6.4+ kbuild adds both to every module.
        assert!(matches!(
            policy(".orc_header", false, false),
            Policy::Skip(_)
        ));
        assert!(matches!(
            policy(".call_sites", false, false),
            Policy::Skip(_)
        ));
        // Alternatives are loaded and applied by the linker.
        assert_eq!(
            policy(".altinstructions", false, false),
            Policy::Load(Segment::Rodata)
        );
        assert_eq!(
            policy(".altinstr_replacement", false, true),
            Policy::Load(Segment::Text)
        );
        assert_eq!(
            policy(".altinstr_aux", false, true),
            Policy::Load(Segment::Text)
        );
        // Per-CPU data is the loader's one section, never loaded as
        // ordinary data; a variant section is refused.
        assert_eq!(policy(".data..percpu", true, false), Policy::PerCpu);
        for name in [
            ".data..percpu..shared_aligned",
            ".data..percpu..read_mostly",
        ] {
            assert!(
                matches!(policy(name, true, false), Policy::Refuse(r) if r.contains(".data..percpu"))
            );
        }
        assert_eq!(policy(".weird", false, false), Policy::Unknown);
        assert_eq!(policy(".weird", false, true), Policy::Unknown);
        assert_eq!(policy(".rodata", true, false), Policy::Unknown);
    }
}
