//! Reading a livepatch module with no guest at hand: what `patcher info`
//! shows before anything is sent to a VMM.
//!
//! [`inspect`] runs the same readers as [`super::Module::parse`] (the ELF
//! file, `.modinfo`, the `struct klp_patch` or kpatch-build's
//! `.kpatch.funcs`, the section policy) but stops short of what needs a
//! guest: it checks no kernel release, resolves no symbol and applies no
//! relocation. It then runs the whole of [`Module::parse_with`] without a
//! release, so what parsing refuses without a guest (a static key of the
//! patch's own, a reference to init data, a relocation type the kernel's
//! loader does not know) is reported too. A module it describes may still
//! be refused at apply time (another release, an unknown old function);
//! one it cannot read would be refused too, for the same reason.

use super::elf::RawElf;
use super::klp::{self, KlpLayouts, Patch};
use super::modinfo::Modinfo;
use super::sections::{Policy, Segment};
use super::{init_exit_calls, section_policies, section_refusals, Module, ModuleError};

/// What a module file says about its patch, read offline.
#[derive(Debug)]
pub struct Inspection {
    /// The patch as klp would see it (for a kpatch-build module, the one
    /// its hook would build at init time).
    pub patch: Patch,
    /// Whether the patch comes from kpatch-build's `.kpatch.funcs` rather
    /// than a static `struct klp_patch`.
    pub kpatch_build: bool,
    /// `.modinfo`: `vermagic` (the kernel release it was built for),
    /// `name`, `license`, ...
    pub modinfo: Modinfo,
    /// Every allocatable section, in file order, with what klpvisor does
    /// with it.
    pub sections: Vec<SectionReport>,
    /// Sections that are not allocatable (symbols, relocations, strings,
    /// debug info): never loaded, by klpvisor or the kernel.
    pub unallocated_sections: usize,
    /// What module_init or module_exit calls besides `klp_enable_patch`:
    /// work that never happens, since klpvisor runs neither.
    pub init_exit_calls: Vec<(&'static str, String)>,
    /// Why parsing would refuse the module, for a reason other than its
    /// sections (those are in [`Self::sections`]); `None` if nothing that
    /// can be checked without the guest refuses it.
    pub refusal: Option<ModuleError>,
}

impl Inspection {
    /// Whether some section makes klpvisor refuse the module.
    pub fn refused_sections(&self) -> impl Iterator<Item = &SectionReport> {
        self.sections
            .iter()
            .filter(|s| matches!(s.verdict, Verdict::Refuse(_)))
    }
}

/// One allocatable section and klpvisor's verdict on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SectionReport {
    /// Its ELF section index (what [`super::Place::section`] refers to).
    pub index: usize,
    /// The section's name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// What klpvisor does with it.
    pub verdict: Verdict,
}

/// What klpvisor does with a section (the policy of
/// [`super::sections::policy`], with the refusal's details).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Copied into the arena, in this segment.
    Load(Segment),
    /// Read by the parser (ftrace sites, return sites, tables the kernel
    /// finds through a struct module), not loaded as such.
    Parse,
    /// Not loaded; why that is safe.
    Skip(&'static str),
    /// `.init.*`/`.exit.*`: never run from outside; loaded code must not
    /// refer to it.
    InitExit,
    /// A kind klpvisor refuses, but empty, so it does not matter.
    Empty,
    /// `.data..percpu`: a per-CPU block allocated in the guest, its
    /// initial bytes copied to every possible CPU, as the kernel's loader
    /// does.
    PerCpu,
    /// The module is refused because of this section: why, what the patch
    /// defines there and where its code uses it.
    Refuse(String),
}

/// Reads `bytes` (a module without signatures: see
/// [`crate::signature::Policy::check`]) with the klp structure layouts
/// `layouts`; an error says why klpvisor could not read it at all.
pub fn inspect(bytes: &[u8], layouts: &KlpLayouts) -> Result<Inspection, ModuleError> {
    let elf = RawElf::parse(bytes)?;
    let modinfo = elf
        .section_by_name(".modinfo")
        .map(|(_, s)| Modinfo::parse(&s.data))
        .unwrap_or_default();
    let patch = klp::read_patch_with(&elf, layouts, modinfo.livepatch(), modinfo.get("name"))?;
    // read_patch takes a static klp_patch when there is one; kpatch's
    // reader, which builds one from .kpatch.funcs, leaves no place.
    let kpatch_build = patch.place.is_none() && elf.section_by_name(".kpatch.funcs").is_some();
    let policies = section_policies(&elf);
    let refusals = section_refusals(&elf, &policies);
    let mut sections = Vec::new();
    let mut unallocated_sections = 0;
    for (i, (s, p)) in elf.sections.iter().zip(&policies).enumerate() {
        let Some(p) = p else {
            // Index 0 is the ELF's null section, not a section of the file.
            if i != 0 {
                unallocated_sections += 1;
            }
            continue;
        };
        let refused = refusals.iter().find(|(at, _)| *at == i);
        let verdict = match (p, refused) {
            (_, Some((_, why))) => Verdict::Refuse(why.clone()),
            (Policy::Load(seg), None) => Verdict::Load(*seg),
            (Policy::Parse, None) => Verdict::Parse,
            (Policy::Skip(why), None) => Verdict::Skip(why),
            (Policy::InitExit, None) => Verdict::InitExit,
            (Policy::PerCpu, None) => Verdict::PerCpu,
            (Policy::Refuse(_) | Policy::Unknown, None) => Verdict::Empty,
        };
        sections.push(SectionReport {
            index: i,
            name: s.name.clone(),
            size: s.size,
            verdict,
        });
    }
    let refusal = match Module::parse_with(bytes, || Ok(*layouts), None) {
        Ok(_) | Err(ModuleError::UnsupportedSections(_)) => None,
        Err(e) => Some(e),
    };
    Ok(Inspection {
        refusal,
        patch,
        kpatch_build,
        modinfo,
        sections,
        unallocated_sections,
        init_exit_calls: init_exit_calls(&elf),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fuzz target's seed: a livepatch module kbuild-like in layout,
    /// built by plain gcc and committed (fuzz/seeds-src/build).
    const SEED: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fuzz/seeds/module/livepatch.ko"
    ));

    fn renamed(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
        assert_eq!(from.len(), to.len());
        let at = bytes
            .windows(from.len())
            .position(|w| w == from)
            .expect("name in the file");
        let mut out = bytes.to_vec();
        out[at..at + to.len()].copy_from_slice(to);
        out
    }

    #[test]
    fn the_seed_module_is_described_without_a_guest() {
        let i = inspect(SEED, &KlpLayouts::builtin()).unwrap_or_else(|e| panic!("{e}"));
        let p = &i.patch;
        assert_eq!(p.name, "fuzz_livepatch");
        assert!(!i.kpatch_build);
        assert_eq!(i.modinfo.release(), Some("6.1.0-fuzz"));
        assert_eq!(p.objects.len(), 1);
        let o = &p.objects[0];
        assert_eq!(o.name, None, "vmlinux");
        let funcs: Vec<(&str, u64, Option<&str>)> = o
            .funcs
            .iter()
            .map(|f| {
                (
                    f.old_name.as_str(),
                    f.old_sympos,
                    f.new_func.symbol.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            funcs,
            [
                ("cmdline_proc_show", 0, Some("livepatch_cmdline_proc_show")),
                ("dup_fn", 2, Some("livepatch_dup_fn")),
            ]
        );
        assert!(o.callbacks.post_patch.is_some());
        assert!(o.callbacks.pre_patch.is_none());
        assert_eq!(p.states, [klp::State { id: 7, version: 1 }]);
        let verdict = |name: &str| {
            i.sections
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.verdict.clone())
        };
        assert_eq!(verdict(".text"), Some(Verdict::Load(Segment::Text)));
        assert_eq!(verdict(".bss"), Some(Verdict::Load(Segment::Data)));
        assert_eq!(verdict("__mcount_loc"), Some(Verdict::Parse));
        assert_eq!(verdict(".init.text"), Some(Verdict::InitExit));
        assert!(matches!(verdict(".modinfo"), Some(Verdict::Skip(_))));
        // Relocation and symbol sections are not allocatable: not listed.
        assert_eq!(verdict(".rela.text"), None);
        assert_eq!(i.unallocated_sections, 7);
        assert_eq!(i.refused_sections().count(), 0);
    }

    #[test]
    fn a_refused_section_is_named_with_the_reason() {
        let bytes = renamed(SEED, b".rodata.str1.1\0", b"__ksymtab_gpl\0\0");
        let i = inspect(&bytes, &KlpLayouts::builtin()).unwrap_or_else(|e| panic!("{e}"));
        let refused: Vec<&SectionReport> = i.refused_sections().collect();
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].name, "__ksymtab_gpl");
        let Verdict::Refuse(why) = &refused[0].verdict else {
            unreachable!()
        };
        assert!(why.contains("exports symbols"), "{why}");
        // The same refusal, word for word, as applying it would give.
        let btf = klpvisor_guest::Btf::parse(include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../fuzz/fixtures/klp.btf"
        )))
        .unwrap();
        match super::super::Module::parse(&bytes, &btf, "6.1.0-fuzz") {
            Err(ModuleError::UnsupportedSections(v)) => {
                assert_eq!(v, [("__ksymtab_gpl".to_owned(), why.clone())])
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn what_cannot_be_read_is_an_error_naming_it() {
        let l = KlpLayouts::builtin();
        assert!(matches!(
            inspect(b"#!/bin/sh\n", &l),
            Err(ModuleError::NotElf)
        ));
        // Every truncation is an error, never a panic (the section headers
        // are at the end of the file).
        for len in 0..SEED.len() {
            assert!(inspect(&SEED[..len], &l).is_err(), "{len} bytes");
        }
        // Without MODULE_INFO(livepatch, "Y") klp would refuse it.
        let unmarked = renamed(SEED, b"livepatch=Y", b"livepatch=N");
        match inspect(&unmarked, &l) {
            Err(e @ ModuleError::NotLivepatch(_)) => {
                assert!(e.to_string().contains("MODULE_INFO(livepatch"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }
}
