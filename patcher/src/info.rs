//! `patcher info FILE.ko`: what a livepatch module holds and what klpvisor
//! would make of it, read from the file alone (like `kpatch info`), before
//! anything is sent to a VMM.
//!
//! The engine's own readers do the work ([`inspect`], the signature
//! [`Policy`]); this module turns their answer into a [`Report`], printed
//! as text or, with `--json`, serialised as it is.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use klpvisor_engine::module::{
    inspect, CodeRef, Inspection, KlpLayouts, SectionReport, Segment, Verdict,
};
use klpvisor_engine::signature::{Policy, Provenance, TrustedKeys};

use crate::OfflineError;

/// Everything `patcher info` says about a module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The file, as given.
    pub file: String,
    /// The patch's name (the module's name: what `patcher list`,
    /// `disable` and `enable` call it).
    pub name: String,
    /// `klp_patch` (a static struct klp_patch, as kbuild builds from a
    /// livepatch source) or `kpatch-build` (kpatch's `.kpatch.funcs`).
    pub format: &'static str,
    /// `.modinfo`'s vermagic.
    pub vermagic: Option<String>,
    /// The kernel release it was built for (vermagic's first word): the
    /// guest must run exactly this one.
    pub release: Option<String>,
    /// `.replace`: a cumulative patch that replaces every older one.
    pub replace: bool,
    /// Where the klp structure layouts it was read with came from.
    pub layouts: String,
    /// The patch's objects, in klp's order.
    pub objects: Vec<ObjectInfo>,
    /// Its system states (`struct klp_state`).
    pub states: Vec<StateInfo>,
    /// Every allocatable section and klpvisor's verdict on it.
    pub sections: Vec<SectionInfo>,
    /// How many other sections (symbols, relocations, debug info) the file
    /// has: never loaded, by klpvisor or by the kernel.
    pub unallocated_sections: usize,
    /// Work its module_init or module_exit does besides enabling the
    /// patch, which never happens under klpvisor.
    pub never_run: Vec<String>,
    /// Its signature.
    pub signature: SignatureInfo,
    /// Why klpvisor would refuse it, as far as the file alone tells
    /// (empty: nothing known; the guest's release and symbols are checked
    /// at apply time).
    pub refused: Vec<String>,
}

/// One `struct klp_object`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ObjectInfo {
    /// `vmlinux` or the kernel module's name.
    pub name: String,
    /// Its functions.
    pub funcs: Vec<FuncInfo>,
    /// Its callbacks that are set.
    pub callbacks: Vec<CallbackInfo>,
}

/// One `struct klp_func`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FuncInfo {
    /// The function it replaces.
    pub old_name: String,
    /// klp's `old_sympos` (0: the name must be unique).
    pub sympos: u64,
    /// The patch's function that replaces it.
    pub new_func: String,
}

/// A set callback of an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallbackInfo {
    /// `pre_patch`, `post_patch`, `pre_unpatch` or `post_unpatch`.
    pub callback: &'static str,
    /// The patch's function it calls.
    pub function: String,
}

/// One `struct klp_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StateInfo {
    /// `klp_state.id`.
    pub id: u64,
    /// `klp_state.version`.
    pub version: u32,
}

/// One allocatable section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SectionInfo {
    /// Its name.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// `load`, `parse`, `skip`, `init-exit`, `empty`, `per-cpu` or `refuse`.
    pub verdict: &'static str,
    /// With `load`: `text`, `rodata` or `data`.
    pub segment: Option<&'static str>,
    /// With `skip` and `refuse`: why; with `per-cpu`: what is done.
    pub reason: Option<String>,
}

/// The module's klpvisor signature (and the kernel's, which is never
/// verified).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignatureInfo {
    /// Whether it carries a klpvisor signature (`patcher sign`).
    pub signed: bool,
    /// The signing key's id.
    pub key_id: Option<String>,
    /// The patch level the signature covers.
    pub level: Option<u16>,
    /// Whether it also carries the kernel's module signature (stripped,
    /// never verified by klpvisor).
    pub kernel_signature: bool,
    /// With `--trusted-keys`: whether it verifies; `None` without.
    pub verified: Option<bool>,
    /// The trusted key file it verified with.
    pub trusted_key: Option<String>,
    /// Why it does not verify.
    pub error: Option<String>,
}

/// `patcher info`: prints the report; an error if the module cannot be
/// read, or if klpvisor would refuse it (after printing the report).
pub fn command(
    file: &Path,
    trusted_keys: Option<&Path>,
    btf: Option<&Path>,
    json: bool,
) -> Result<(), OfflineError> {
    let (layouts, layouts_from) = match btf {
        Some(path) => (
            KlpLayouts::from_btf_bytes(&crate::read(path)?).map_err(|source| {
                OfflineError::Module {
                    path: path.to_owned(),
                    source,
                }
            })?,
            format!("BTF {}", path.display()),
        ),
        None => (KlpLayouts::builtin(), BUILTIN.to_owned()),
    };
    let bytes = crate::read(file)?;
    // Accepting anything only strips the signatures and says what they are.
    let checked = Policy::AcceptUnsigned.check(&bytes)?;
    let mut signature = signature_info(&checked.provenance);
    if let Some(dir) = trusted_keys {
        let policy = Policy::RequireSigned(TrustedKeys::load_dir(dir)?);
        match policy.check(&bytes) {
            Ok(c) => {
                signature.verified = Some(true);
                if let Provenance::Verified { key_file, .. } = c.provenance {
                    signature.trusted_key = Some(key_file);
                }
            }
            Err(e) => {
                signature.verified = Some(false);
                signature.error = Some(e.to_string());
            }
        }
    }
    let seen = inspect(checked.module, &layouts).map_err(|source| OfflineError::Module {
        path: file.to_owned(),
        source,
    })?;
    let report = report(file, &seen, layouts_from, signature);
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("patcher: cannot print JSON: {e}"),
        }
    } else {
        print!("{}", render(&report));
    }
    if report.refused.is_empty() {
        Ok(())
    } else {
        Err(OfflineError::Refused {
            path: file.to_owned(),
            why: report.refused.join("; "),
        })
    }
}

/// How the built-in layouts are named in the report.
const BUILTIN: &str = "built-in (x86-64 Linux 6.1 to 6.12)";

fn signature_info(p: &Provenance) -> SignatureInfo {
    let (key_id, level, kernel_signature) = match p {
        Provenance::Unsigned { kernel_signed } => (None, None, *kernel_signed),
        Provenance::NotVerified {
            key_id,
            level,
            kernel_signed,
        }
        | Provenance::Verified {
            key_id,
            level,
            kernel_signed,
            ..
        } => (Some(key_id.to_string()), Some(*level), *kernel_signed),
    };
    SignatureInfo {
        signed: key_id.is_some(),
        key_id,
        level,
        kernel_signature,
        verified: None,
        trusted_key: None,
        error: None,
    }
}

/// The report for an inspected module.
pub fn report(file: &Path, seen: &Inspection, layouts: String, signature: SignatureInfo) -> Report {
    let p = &seen.patch;
    let code = |c: &CodeRef| match &c.symbol {
        Some(s) => s.clone(),
        None => {
            let section = seen
                .sections
                .iter()
                .find(|s| s.index == c.place.section)
                .map_or("?", |s| s.name.as_str());
            format!("{section}+{:#x}", c.place.offset)
        }
    };
    let objects = p
        .objects
        .iter()
        .map(|o| {
            let cb = &o.callbacks;
            ObjectInfo {
                name: o.name.clone().unwrap_or_else(|| "vmlinux".into()),
                funcs: o
                    .funcs
                    .iter()
                    .map(|f| FuncInfo {
                        old_name: f.old_name.clone(),
                        sympos: f.old_sympos,
                        new_func: code(&f.new_func),
                    })
                    .collect(),
                callbacks: [
                    ("pre_patch", &cb.pre_patch),
                    ("post_patch", &cb.post_patch),
                    ("pre_unpatch", &cb.pre_unpatch),
                    ("post_unpatch", &cb.post_unpatch),
                ]
                .into_iter()
                .filter_map(|(callback, c)| {
                    c.as_ref().map(|c| CallbackInfo {
                        callback,
                        function: code(c),
                    })
                })
                .collect(),
            }
        })
        .collect();
    let mut refused: Vec<String> = seen
        .refused_sections()
        .map(|s| match &s.verdict {
            Verdict::Refuse(why) => format!("section {}: {why}", s.name),
            _ => s.name.clone(),
        })
        .collect();
    if let Some(e) = &seen.refusal {
        refused.push(e.to_string());
    }
    if let (Some(false), Some(e)) = (signature.verified, &signature.error) {
        refused.push(format!("signature: {e}"));
    }
    // kpatch-build's init is what builds the patch: nothing else to say.
    let never_run = if seen.kpatch_build {
        Vec::new()
    } else {
        ["module_init", "module_exit"]
            .into_iter()
            .filter_map(|what| {
                let calls: Vec<&str> = seen
                    .init_exit_calls
                    .iter()
                    .filter(|(w, _)| *w == what)
                    .map(|(_, c)| c.as_str())
                    .collect();
                (!calls.is_empty()).then(|| format!("its {what} also calls {}", calls.join(", ")))
            })
            .collect()
    };
    Report {
        file: file.display().to_string(),
        name: p.name.clone(),
        format: if seen.kpatch_build {
            "kpatch-build"
        } else {
            "klp_patch"
        },
        vermagic: seen.modinfo.get("vermagic").map(|v| v.trim().to_owned()),
        release: seen.modinfo.release().map(str::to_owned),
        replace: p.replace,
        layouts,
        objects,
        states: p
            .states
            .iter()
            .map(|s| StateInfo {
                id: s.id,
                version: s.version,
            })
            .collect(),
        sections: seen.sections.iter().map(section_info).collect(),
        unallocated_sections: seen.unallocated_sections,
        never_run,
        signature,
        refused,
    }
}

fn section_info(s: &SectionReport) -> SectionInfo {
    let (verdict, segment, reason) = match &s.verdict {
        Verdict::Load(seg) => (
            "load",
            Some(match seg {
                Segment::Text => "text",
                Segment::Rodata => "rodata",
                Segment::Data => "data",
            }),
            None,
        ),
        Verdict::Parse => ("parse", None, None),
        Verdict::Skip(why) => ("skip", None, Some((*why).to_owned())),
        Verdict::InitExit => ("init-exit", None, None),
        Verdict::Empty => ("empty", None, None),
        Verdict::PerCpu => (
            "per-cpu",
            None,
            Some(
                "per-CPU variables: a block allocated in the guest as the kernel's loader does, \
                 its initial bytes copied to every possible CPU"
                    .to_owned(),
            ),
        ),
        Verdict::Refuse(why) => ("refuse", None, Some(why.clone())),
    };
    SectionInfo {
        name: s.name.clone(),
        size: s.size,
        verdict,
        segment,
        reason,
    }
}

/// `name` or `name,sympos`, as klp's sysfs and `patcher list` spell it.
fn func_name(name: &str, sympos: u64) -> String {
    if sympos == 0 {
        name.to_owned()
    } else {
        format!("{name},{sympos}")
    }
}

/// The text form of a report.
pub fn render(r: &Report) -> String {
    let mut o = String::new();
    // Writing to a String cannot fail.
    let _ = render_into(&mut o, r);
    o
}

fn render_into(o: &mut String, r: &Report) -> std::fmt::Result {
    writeln!(o, "patch:      {}", r.name)?;
    writeln!(o, "file:       {}", r.file)?;
    writeln!(
        o,
        "format:     {}",
        match r.format {
            "kpatch-build" => {
                "kpatch-build module (.kpatch.funcs, read as kpatch's patch hook builds it)"
            }
            _ => "livepatch module (static struct klp_patch)",
        }
    )?;
    writeln!(
        o,
        "built for:  {}",
        r.release
            .as_deref()
            .unwrap_or("? (no vermagic in .modinfo)")
    )?;
    writeln!(
        o,
        "replace:    {}",
        if r.replace {
            "yes (cumulative: replaces every older patch)"
        } else {
            "no"
        }
    )?;
    let states: Vec<String> = r
        .states
        .iter()
        .map(|s| format!("id {} version {}", s.id, s.version))
        .collect();
    writeln!(
        o,
        "states:     {}",
        if states.is_empty() {
            "none".to_owned()
        } else {
            states.join(", ")
        }
    )?;
    writeln!(o, "signature:  {}", signature_line(&r.signature))?;
    writeln!(o, "layouts:    {}", r.layouts)?;
    if r.objects.is_empty() {
        writeln!(o, "objects:    none")?;
    }
    for obj in &r.objects {
        writeln!(
            o,
            "object {} ({} function{})",
            obj.name,
            obj.funcs.len(),
            if obj.funcs.len() == 1 { "" } else { "s" }
        )?;
        for f in &obj.funcs {
            writeln!(
                o,
                "  {} -> {}",
                func_name(&f.old_name, f.sympos),
                f.new_func
            )?;
        }
        for c in &obj.callbacks {
            writeln!(o, "  callback {}: {}", c.callback, c.function)?;
        }
    }
    writeln!(
        o,
        "sections ({} allocatable; {} others, such as symbols and relocations, are never loaded):",
        r.sections.len(),
        r.unallocated_sections
    )?;
    let width = r.sections.iter().map(|s| s.name.len()).max().unwrap_or(0);
    for s in &r.sections {
        let what = match (s.verdict, s.segment, &s.reason) {
            ("load", Some(seg), _) => format!("load ({seg})"),
            ("parse", ..) => "parsed: klpvisor does the module loader's work with it".to_owned(),
            ("skip", _, Some(why)) => format!("skip: {why}"),
            ("init-exit", ..) => "not loaded: init/exit code, never run".to_owned(),
            ("empty", ..) => "empty: ignored".to_owned(),
            ("refuse", _, Some(why)) => format!("REFUSED: {why}"),
            ("per-cpu", _, Some(why)) => why.clone(),
            (v, ..) => v.to_owned(),
        };
        writeln!(o, "  {:<width$} {:>8}  {what}", s.name, s.size)?;
    }
    for n in &r.never_run {
        writeln!(
            o,
            "warning: {n}: klpvisor never runs a patch module's init or exit code"
        )?;
    }
    if r.refused.is_empty() {
        writeln!(
            o,
            "verdict:    nothing found that klpvisor refuses; the guest's release and symbols \
             are checked at apply time"
        )?;
    } else {
        for why in &r.refused {
            writeln!(o, "refused:    {why}")?;
        }
    }
    Ok(())
}

fn signature_line(s: &SignatureInfo) -> String {
    let kernel = if s.kernel_signature {
        "; kernel module signature present (stripped, never verified)"
    } else {
        ""
    };
    let what = match (&s.key_id, s.level) {
        (Some(id), Some(level)) => format!("signed by key {id} at level {level}"),
        (Some(id), None) => format!("signed by key {id}"),
        _ => "unsigned".to_owned(),
    };
    let check = match (s.verified, &s.trusted_key, &s.error) {
        (None, ..) if s.signed => ", not checked (give --trusted-keys DIR)".to_owned(),
        (None, ..) => String::new(),
        (Some(true), Some(file), _) => format!(", verified with {file}"),
        (Some(true), None, _) => ", verified".to_owned(),
        (Some(false), _, Some(e)) => format!(", does NOT verify: {e}"),
        (Some(false), _, None) => ", does NOT verify".to_owned(),
    };
    format!("{what}{check}{kernel}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Report {
        Report {
            file: "fix.ko".into(),
            name: "fix".into(),
            format: "klp_patch",
            vermagic: Some("6.1.0-57-cloud-amd64 SMP preempt mod_unload modversions".into()),
            release: Some("6.1.0-57-cloud-amd64".into()),
            replace: true,
            layouts: BUILTIN.into(),
            objects: vec![
                ObjectInfo {
                    name: "vmlinux".into(),
                    funcs: vec![
                        FuncInfo {
                            old_name: "cmdline_proc_show".into(),
                            sympos: 0,
                            new_func: "livepatch_cmdline_proc_show".into(),
                        },
                        FuncInfo {
                            old_name: "dup".into(),
                            sympos: 2,
                            new_func: ".text+0x40".into(),
                        },
                    ],
                    callbacks: vec![CallbackInfo {
                        callback: "post_patch",
                        function: "fix_post".into(),
                    }],
                },
                ObjectInfo {
                    name: "pvpanic".into(),
                    funcs: vec![FuncInfo {
                        old_name: "pvpanic_panic_notify".into(),
                        sympos: 0,
                        new_func: "new_notify".into(),
                    }],
                    callbacks: vec![
                        CallbackInfo {
                            callback: "pre_patch",
                            function: "pre".into(),
                        },
                        CallbackInfo {
                            callback: "post_unpatch",
                            function: "post".into(),
                        },
                    ],
                },
            ],
            states: vec![StateInfo { id: 7, version: 2 }],
            sections: vec![
                SectionInfo {
                    name: ".text".into(),
                    size: 96,
                    verdict: "load",
                    segment: Some("text"),
                    reason: None,
                },
                SectionInfo {
                    name: "__mcount_loc".into(),
                    size: 16,
                    verdict: "parse",
                    segment: None,
                    reason: None,
                },
                SectionInfo {
                    name: ".data..percpu".into(),
                    size: 8,
                    verdict: "refuse",
                    segment: None,
                    reason: Some("per-CPU variables".into()),
                },
            ],
            unallocated_sections: 9,
            never_run: vec!["its module_init also calls `register_foo`".into()],
            signature: SignatureInfo {
                signed: true,
                key_id: Some("0123456789abcdef".into()),
                level: Some(3),
                kernel_signature: false,
                verified: None,
                trusted_key: None,
                error: None,
            },
            refused: vec!["section .data..percpu: per-CPU variables".into()],
        }
    }

    #[test]
    fn text_names_every_object_function_callback_and_section() {
        let text = render(&sample());
        let lines: Vec<&str> = text.lines().collect();
        for want in [
            "patch:      fix",
            "replace:    yes (cumulative: replaces every older patch)",
            "states:     id 7 version 2",
            "built for:  6.1.0-57-cloud-amd64",
            "signature:  signed by key 0123456789abcdef at level 3, not checked (give \
             --trusted-keys DIR)",
            "object vmlinux (2 functions)",
            "  cmdline_proc_show -> livepatch_cmdline_proc_show",
            "  dup,2 -> .text+0x40",
            "  callback post_patch: fix_post",
            "object pvpanic (1 function)",
            "  callback pre_patch: pre",
            "  callback post_unpatch: post",
            "  .text               96  load (text)",
            "  __mcount_loc        16  parsed: klpvisor does the module loader's work with it",
            "  .data..percpu        8  REFUSED: per-CPU variables",
            "warning: its module_init also calls `register_foo`: klpvisor never runs a patch \
             module's init or exit code",
            "refused:    section .data..percpu: per-CPU variables",
        ] {
            assert!(lines.contains(&want), "no line {want:?} in:\n{text}");
        }
        // Objects come in klp's order, each function under its object.
        let at = |s: &str| text.find(s).unwrap();
        assert!(at("object vmlinux") < at("dup,2") && at("dup,2") < at("object pvpanic"));
        assert!(
            !text.contains("verdict:"),
            "a refused module has no all-clear"
        );
    }

    #[test]
    fn signature_lines_say_what_was_checked() {
        let mut s = sample().signature;
        s.verified = Some(true);
        s.trusted_key = Some("ops.pub".into());
        assert_eq!(
            signature_line(&s),
            "signed by key 0123456789abcdef at level 3, verified with ops.pub"
        );
        s.verified = Some(false);
        s.trusted_key = None;
        s.error = Some("key 0123456789abcdef is not trusted".into());
        assert_eq!(
            signature_line(&s),
            "signed by key 0123456789abcdef at level 3, does NOT verify: key 0123456789abcdef \
             is not trusted"
        );
        let unsigned = SignatureInfo {
            signed: false,
            key_id: None,
            level: None,
            kernel_signature: true,
            verified: None,
            trusted_key: None,
            error: None,
        };
        assert_eq!(
            signature_line(&unsigned),
            "unsigned; kernel module signature present (stripped, never verified)"
        );
    }

    #[test]
    fn json_has_the_same_facts_with_stable_names() {
        let v = serde_json::to_value(sample()).unwrap();
        assert_eq!(v["name"], "fix");
        assert_eq!(v["replace"], true);
        assert_eq!(v["format"], "klp_patch");
        assert_eq!(v["objects"][0]["funcs"][1]["old_name"], "dup");
        assert_eq!(v["objects"][0]["funcs"][1]["sympos"], 2);
        assert_eq!(v["objects"][1]["callbacks"][1]["callback"], "post_unpatch");
        assert_eq!(v["states"][0]["id"], 7);
        assert_eq!(v["states"][0]["version"], 2);
        assert_eq!(v["sections"][0]["verdict"], "load");
        assert_eq!(v["sections"][0]["segment"], "text");
        assert_eq!(v["sections"][2]["verdict"], "refuse");
        assert_eq!(v["signature"]["key_id"], "0123456789abcdef");
        assert_eq!(v["signature"]["level"], 3);
        assert_eq!(v["signature"]["verified"], serde_json::Value::Null);
        assert_eq!(v["refused"].as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn an_accepted_module_ends_with_the_all_clear() {
        let mut r = sample();
        r.refused.clear();
        r.sections.pop();
        r.replace = false;
        let text = render(&r);
        assert!(text.contains("replace:    no\n"), "{text}");
        assert!(
            text.contains("verdict:    nothing found that klpvisor refuses"),
            "{text}"
        );
        assert!(!text.contains("refused:"), "{text}");
    }
}
