//! Patch sites: where an old function gets its `jmp` to the new one.
//!
//! A kernel built with ftrace starts every traceable function with a
//! 5-byte `call __fentry__` that the kernel turns into a 5-byte nop at boot
//! (`0f 1f 44 00 00`, x86's ideal nop on every 64-bit CPU). That nop is the
//! one place in a function that can be replaced by a 5-byte `jmp rel32`
//! while the function is live: no instruction boundary inside it is a
//! return address or a branch target. It is where the kernel's own
//! livepatch (through ftrace) diverts a function too.
//!
//! Before the nop may come a 4-byte ENDBR64 (`f3 0f 1e fa`, kernels with
//! CONFIG_X86_KERNEL_IBT), or what IBT sealing leaves of an ENDBR that no
//! indirect call needs (`66 0f 1f 00`, "osp nopl (%rax)"). Kernels with
//! CONFIG_CALL_PADDING (6.2+) place 16 bytes of padding (nops, or a kCFI
//! hash / call-depth accounting code) *before* the symbol: the symbol is
//! still the entry and the site is still at the entry (after ENDBR); the
//! padding is never touched.
//!
//! Anything else at the site is refused with what it is: a `call` (ftrace
//! is tracing the function, or an in-guest livepatch diverts it through an
//! ftrace trampoline), a `jmp rel32` (someone already redirected it), an
//! `int3` (a kprobe or a text_poke in progress), or other bytes (the
//! function is `notrace`: there is no safe site). Bytes are decoded with
//! iced-x86, and shown disassembled in errors.

use std::collections::BTreeSet;
use std::fmt;

use iced_x86::{Decoder, DecoderOptions, Formatter, GasFormatter, Instruction, Mnemonic};

use klpvisor_guest::{AddressSpace, Btf, Kallsyms, LoadedModule, VirtRead};
use klpvisor_guest::{Guest, GuestPhys};

/// The ideal 5-byte nop the kernel writes over `call __fentry__`.
pub const FTRACE_NOP: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// `gen_endbr_poison()`: a sealed ENDBR (IBT on, no indirect callers).
const ENDBR_POISON: [u8; 4] = [0x66, 0x0f, 0x1f, 0x00];
/// Bytes read at an entry: ENDBR + nop + a little to disassemble in errors.
const ENTRY_READ: usize = 16;
const JMP_REL32: u8 = 0xe9;
/// `FTRACE_FL_DISABLED` (bit 25 since Linux 4.x, unchanged through 6.x): a
/// record ftrace ignores — the code of a weak function that was overridden
/// at link time keeps its `__mcount_loc` entry but has no symbol.
/// klpvisor sets it too, on the record of every function it redirects,
/// so the guest's ftrace leaves that entry alone (see [`Site::ftrace_flags`]).
pub const FTRACE_FL_DISABLED: u64 = 1 << 25;
/// Bounds on the guest's ftrace page list (a hostile guest may loop it).
const MAX_FTRACE_PAGES: u64 = 1 << 16;
const MAX_FTRACE_RECORDS: u64 = 1 << 22;
const MAX_FTRACE_PAGE_BYTES: u64 = 64 << 20;
/// The kernel module area, where ftrace trampolines are allocated.
const MODULES_START: u64 = 0xffff_ffff_c000_0000;

/// Errors of finding and decoding a patch site.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    /// `func` is not the first byte of a code symbol (kallsyms for vmlinux, the
    /// module's own symbols for a module).
    #[error("{func:#x} is not the start of a kernel function ({why})")]
    NotAFunction {
        /// The address asked for (kernel-virtual).
        func: u64,
        /// What is there instead.
        why: String,
    },
    /// The function lies outside vmlinux's resident text (e.g. in init code,
    /// freed after boot).
    #[error(
        "{name} at {func:#x} is not in the kernel's resident text [{text_start:#x}, {text_end:#x}) \
         (init code is freed after boot; a module's function needs a klp_object naming the module)"
    )]
    NotInText {
        /// Function name (kallsyms).
        name: String,
        /// Its kernel-virtual address.
        func: u64,
        /// `_text` (kallsyms).
        text_start: u64,
        /// `_etext` (kallsyms).
        text_end: u64,
    },
    /// The function lies outside its module's resident text (e.g. in the
    /// module's init code, freed once it is live).
    #[error(
        "{name} at {func:#x} is not in module {module}'s resident text [{text_start:#x}, \
         {text_end:#x}) (its init code is freed once the module is live)"
    )]
    NotInModuleText {
        /// Function name (the module's symbols).
        name: String,
        /// The module's name.
        module: String,
        /// Its kernel-virtual address.
        func: u64,
        /// Start of the module's resident text.
        text_start: u64,
        /// End of it (exclusive).
        text_end: u64,
    },
    /// The function is shorter than its ENDBR (if any) plus the 5-byte site.
    #[error("{name} at {func:#x} is {size} bytes long: too short for a {need}-byte entry site")]
    TooShort {
        /// Function name.
        name: String,
        /// Its kernel-virtual address.
        func: u64,
        /// Bytes of it there were to decode.
        size: u64,
        /// Bytes the site needs: the ENDBR, if any, plus 5.
        need: u64,
    },
    /// The entry holds a `call` where the nop should be; `hint` says what that
    /// usually means, by where it goes.
    #[error(
        "the entry of {name} at {at:#x} is a call to {target_desc} ({code}): {hint}; refusing \
         to redirect it"
    )]
    Call {
        /// Function name.
        name: String,
        /// Kernel-virtual address of the site (after any ENDBR).
        at: u64,
        /// Where the call goes (kernel-virtual).
        target: u64,
        /// `target` named with kallsyms ([`classify_target`]).
        target_desc: String,
        /// Bytes and disassembly.
        code: String,
        /// What such a call usually means.
        hint: &'static str,
    },
    /// The entry already holds a `jmp rel32`: something redirected the
    /// function, or it is a jump stub with no ftrace site.
    #[error("the entry of {name} at {at:#x} jumps to {target_desc} ({bytes}): {hint}")]
    Jmp {
        /// Function name.
        name: String,
        /// Kernel-virtual address of the site (after any ENDBR).
        at: u64,
        /// Where the jmp goes (kernel-virtual).
        target: u64,
        /// `target` named with kallsyms ([`classify_target`]).
        target_desc: String,
        /// The 5 bytes, as hex.
        bytes: String,
        /// What such a jmp usually means.
        hint: &'static str,
    },
    /// The entry starts with `int3`: a kprobe, a text_poke in progress, or
    /// padding.
    #[error("the entry of {name} at {at:#x} is an int3 ({bytes}): {hint}")]
    Int3 {
        /// Function name.
        name: String,
        /// Kernel-virtual address of the site (after any ENDBR).
        at: u64,
        /// Up to 5 bytes at the site, as hex.
        bytes: String,
        /// Which of those it most likely is (a retry may help).
        hint: &'static str,
    },
    /// The entry holds neither the nop nor a recognised diversion; the function
    /// is probably notrace.
    #[error(
        "the entry of {name} at {at:#x} is not the 5-byte ftrace nop: {bytes} ({disasm}); the \
         function may be notrace"
    )]
    Unexpected {
        /// Function name.
        name: String,
        /// Kernel-virtual address of the site (after any ENDBR).
        at: u64,
        /// Up to 5 bytes at the site, as hex.
        bytes: String,
        /// Up to 3 instructions from the site, disassembled.
        disasm: String,
    },
    /// A 5-byte nop at the entry that is not one of the kernel's ftrace records
    /// ([`FtraceRecords`]): a jump label or alternative the kernel may rewrite.
    #[error(
        "the entry of {name} at {at:#x} is a 5-byte nop ({bytes}) but not one of the kernel's \
         ftrace sites: it is a jump label or alternative the kernel may rewrite; refusing to \
         redirect it"
    )]
    NotFtraceSite {
        /// Function name.
        name: String,
        /// Kernel-virtual address of the nop.
        at: u64,
        /// The nop, as hex.
        bytes: String,
    },
    /// The ftrace record list could not be read: a BTF layout or kallsyms
    /// symbol is missing, guest memory is unreadable, or the list exceeds
    /// klpvisor's bounds.
    #[error("cannot read the kernel's ftrace records: {0}")]
    Records(String),
    /// The function's entry could not be read or translated through the
    /// kernel's page tables.
    #[error("cannot read the entry of {name} at {func:#x}: {source}")]
    Read {
        /// Function name.
        name: String,
        /// Its kernel-virtual address.
        func: u64,
        /// The page-table walk's error.
        #[source]
        source: klpvisor_guest::PagingError,
    },
    /// The 5-byte site crosses into a page that is not physically adjacent, so
    /// one write cannot cover it.
    #[error(
        "the site of {name} at {at:#x} is not physically contiguous across a page boundary; \
         refusing to split a 5-byte write"
    )]
    Straddles {
        /// Function name.
        name: String,
        /// Kernel-virtual address of the site (after any ENDBR).
        at: u64,
    },
    /// The site's page is not executable kernel text in the kernel's page
    /// tables (not executable, or user-accessible).
    #[error(
        "the site of {name} at {at:#x} is not executable in the kernel's page tables: not kernel \
         text"
    )]
    NotExecutable {
        /// Function name.
        name: String,
        /// Kernel-virtual address of the site (after any ENDBR).
        at: u64,
    },
    /// A `jmp rel32` reaches at most ±2 GiB.
    #[error("a jmp from {at:#x} cannot reach {target:#x}: more than ±2 GiB away")]
    OutOfReach {
        /// Kernel-virtual address of the jmp.
        at: u64,
        /// Where it would go (kernel-virtual).
        target: u64,
    },
}

/// What precedes the nop at a function's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endbr {
    /// No ENDBR: the nop is the first instruction.
    None,
    /// `endbr64`.
    Endbr64,
    /// An ENDBR sealed by the kernel at boot (IBT on, no indirect callers).
    Sealed,
}

impl Endbr {
    /// Bytes before the nop: 0 or 4.
    pub fn len(self) -> u64 {
        match self {
            Endbr::None => 0,
            Endbr::Endbr64 | Endbr::Sealed => 4,
        }
    }

    /// Whether nothing precedes the nop.
    pub fn is_empty(self) -> bool {
        self.len() == 0
    }
}

/// Where a call or jmp found at an entry goes, for the error message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// "symbol+off (address)" or the address and what is there.
    pub desc: String,
    /// Which kind of code it is; picks the hint in the error.
    pub kind: TargetKind,
}

/// What kind of code a call or jmp at an entry reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetKind {
    /// ftrace's own entry code (`ftrace_caller`, `ftrace_regs_caller`, ...).
    Ftrace,
    /// The module area: ftrace trampolines (which an in-guest livepatch
    /// uses), optimized-kprobe detours, module code.
    ModuleArea,
    /// Another kernel text symbol: ordinary code (a tail call, a static
    /// call trampoline, a plain call in a notrace function).
    KernelText,
    /// Anywhere else, e.g. patch code in an arena.
    Elsewhere,
}

impl TargetKind {
    fn call_hint(self) -> &'static str {
        match self {
            TargetKind::Ftrace | TargetKind::ModuleArea => {
                "the function is traced by ftrace or patched by a livepatch inside the guest"
            }
            TargetKind::KernelText => {
                "the function starts with an ordinary call, not the ftrace nop (it is notrace)"
            }
            TargetKind::Elsewhere => "someone else diverted the function",
        }
    }

    fn jmp_hint(self) -> &'static str {
        match self {
            TargetKind::KernelText => {
                "a jump stub (tail call or static-call trampoline) with no ftrace site; not \
                 patchable"
            }
            TargetKind::ModuleArea => {
                "already redirected (an optimized kprobe, or a detour in module memory)"
            }
            TargetKind::Ftrace | TargetKind::Elsewhere => {
                "already redirected by someone else (an earlier patch in the arena, or another \
                 tool)"
            }
        }
    }
}

/// ftrace's entry code: a `call` to these at an entry means "traced"
/// (or a dynamically allocated trampoline in the module area). Not
/// `ftrace_stub`: the call sites inside ftrace's own trampolines call it.
const FTRACE_ENTRIES: [&str; 3] = ["ftrace_caller", "ftrace_regs_caller", "__fentry__"];

/// The decoded entry of a function (virtual addresses only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The function's kernel-virtual address.
    pub func: u64,
    /// What precedes the nop.
    pub endbr: Endbr,
    /// Address of the nop.
    pub at: u64,
    /// The nop's 5 bytes.
    pub original: [u8; 5],
}

/// The module a site lies in, as it was when the site was validated: a
/// transition writing the site first checks the module is still that one
/// (not unloaded, not reloaded elsewhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InModule {
    /// The module's name.
    pub name: String,
    /// Its `struct module`.
    pub addr: u64,
    /// Its resident text.
    pub text: std::ops::Range<u64>,
}

/// A validated patch site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    /// The module it is in (`None`: vmlinux).
    pub module: Option<InModule>,
    /// Function name (kallsyms).
    pub name: String,
    /// Function address.
    pub func: u64,
    /// The function's code, as far as the guest tells: up to the next
    /// kallsyms symbol (vmlinux) or its `st_size` (a module function).
    /// No task may be inside it when its entry changes.
    pub extent: std::ops::Range<u64>,
    /// What precedes the nop at the entry.
    pub endbr: Endbr,
    /// Virtual address of the nop.
    pub at: u64,
    /// Guest-physical address of the nop.
    pub gpa: GuestPhys,
    /// The bytes there (restored on disable).
    pub original: [u8; 5],
    /// The `flags` word of its `struct dyn_ftrace`. While the function is
    /// redirected, klpvisor sets `FTRACE_FL_DISABLED` there: ftrace then
    /// skips the record (the function tracer, a filter naming it, kprobes
    /// and BPF trampolines on ftrace leave the entry alone) instead of
    /// finding a `jmp` where it expects its nop, which makes it warn and
    /// shut itself down (`ftrace_bug`).
    pub ftrace_flags: Option<u64>,
    /// Whether the entry held ftrace's `call` when validated (the function
    /// traced in the guest): only a redirect through ftrace itself may
    /// then be used (see [`crate::ftrace_ops`]); its bytes are never
    /// written.
    pub traced: bool,
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// AT&T disassembly of up to `max` instructions of `code` at `ip`.
pub fn disasm(code: &[u8], ip: u64, max: usize) -> String {
    let mut dec = Decoder::with_ip(64, code, ip, DecoderOptions::NONE);
    let mut fmt = GasFormatter::new();
    // Like objdump: lowercase hex.
    fmt.options_mut().set_uppercase_hex(false);
    let mut out = Vec::new();
    let mut ins = Instruction::default();
    while dec.can_decode() && out.len() < max {
        dec.decode_out(&mut ins);
        if ins.is_invalid() {
            out.push("(bad)".to_owned());
            break;
        }
        let mut s = String::new();
        fmt.format(&ins, &mut s);
        out.push(s);
    }
    if out.is_empty() {
        "nothing to decode".into()
    } else {
        out.join("; ")
    }
}

/// `jmp rel32` from the 5 bytes at `at` to `target`.
pub fn jmp_rel32(at: u64, target: u64) -> Result<[u8; 5], SiteError> {
    // Without wrap-around: a jmp from the top of the address space to a low
    // (user) address is encodable but never a valid redirect.
    let rel = i128::from(target) - (i128::from(at) + 5);
    let rel = i32::try_from(rel).map_err(|_| SiteError::OutOfReach { at, target })?;
    let r = rel.to_le_bytes();
    Ok([JMP_REL32, r[0], r[1], r[2], r[3]])
}

/// What precedes the ftrace site at the start of `code`.
fn endbr_of(code: &[u8]) -> Endbr {
    match code.get(..4) {
        Some(b) if b == ENDBR64 => Endbr::Endbr64,
        Some(b) if b == ENDBR_POISON => Endbr::Sealed,
        _ => Endbr::None,
    }
}

/// Decodes a function entry from its first bytes. `code` starts at `func`
/// and holds the function (at most to its end, so a short function is
/// caught); `name` only labels errors; `classify` names call/jmp targets.
pub fn decode_entry(
    name: &str,
    func: u64,
    code: &[u8],
    classify: &dyn Fn(u64) -> Target,
) -> Result<Entry, SiteError> {
    let endbr = endbr_of(code);
    let skip = endbr.len() as usize;
    let at = func + endbr.len();
    let rest = code.get(skip..).unwrap_or_default();
    let need = endbr.len() + 5;
    let bytes = hex(rest.get(..5).unwrap_or(rest));

    let mut dec = Decoder::with_ip(64, rest, at, DecoderOptions::NONE);
    let ins = dec.decode();
    let len = ins.len();
    if !ins.is_invalid() {
        match ins.mnemonic() {
            Mnemonic::Call if rest.first() == Some(&0xe8) => {
                let target = ins.near_branch_target();
                let t = classify(target);
                return Err(SiteError::Call {
                    name: name.into(),
                    at,
                    target,
                    target_desc: t.desc,
                    code: format!(
                        "{}: {}",
                        hex(rest.get(..len).unwrap_or(rest)),
                        disasm(rest, at, 1)
                    ),
                    hint: t.kind.call_hint(),
                });
            }
            Mnemonic::Jmp if rest.first() == Some(&JMP_REL32) && len == 5 => {
                let target = ins.near_branch_target();
                let t = classify(target);
                return Err(SiteError::Jmp {
                    name: name.into(),
                    at,
                    target,
                    target_desc: t.desc,
                    bytes: hex(rest.get(..5).unwrap_or(rest)),
                    hint: t.kind.jmp_hint(),
                });
            }
            Mnemonic::Int3 => {
                // text_poke_bp() puts an int3 over the first byte while it
                // changes an instruction; the rest is still the nop.
                let hint = if rest.get(1..5) == FTRACE_NOP.get(1..5) {
                    "a breakpoint over the ftrace nop: the kernel is changing it (text_poke), \
                     or a kprobe; try again later"
                } else {
                    "int3 padding or a breakpoint: not a patchable function entry"
                };
                return Err(SiteError::Int3 {
                    name: name.into(),
                    at,
                    bytes,
                    hint,
                });
            }
            // Any single 5-byte nop is a safe site (its bytes are restored
            // exactly); this kernel, like all x86-64 ones, uses FTRACE_NOP.
            Mnemonic::Nop if len == 5 => {
                let mut original = [0u8; 5];
                if let Some(b) = rest.get(..5) {
                    original.copy_from_slice(b);
                    return Ok(Entry {
                        func,
                        endbr,
                        at,
                        original,
                    });
                }
            }
            _ => {}
        }
    }
    if (code.len() as u64) < need {
        return Err(SiteError::TooShort {
            name: name.into(),
            func,
            size: code.len() as u64,
            need,
        });
    }
    Err(SiteError::Unexpected {
        name: name.into(),
        at,
        bytes,
        disasm: disasm(rest, at, 3),
    })
}

/// kallsyms types a function can have: 't'/'T', and 'W'/'w' for weak
/// definitions (nm reports weak functions that way wherever they live; the
/// caller still checks the address is in kernel text).
pub fn is_code_kind(kind: char) -> bool {
    matches!(kind, 't' | 'T' | 'W' | 'w')
}

/// Names and classifies an address with kallsyms, for errors.
pub fn classify_target(kallsyms: &Kallsyms, target: u64) -> Target {
    match kallsyms.locate(target) {
        Some(l) => {
            let desc = if l.offset == 0 {
                format!("{} ({target:#x})", l.symbol.name)
            } else {
                format!("{}+{:#x} ({target:#x})", l.symbol.name, l.offset)
            };
            let kind = if l.offset == 0 && FTRACE_ENTRIES.contains(&l.symbol.name.as_str()) {
                TargetKind::Ftrace
            } else if is_code_kind(l.symbol.kind) {
                TargetKind::KernelText
            } else {
                TargetKind::Elsewhere
            };
            Target { desc, kind }
        }
        None if target >= MODULES_START => Target {
            desc: format!("{target:#x} in the module area"),
            kind: TargetKind::ModuleArea,
        },
        None => Target {
            desc: format!("{target:#x} (no kernel symbol)"),
            kind: TargetKind::Elsewhere,
        },
    }
}

/// The kernel's own list of ftrace sites in vmlinux text: the addresses
/// of the `call __fentry__` it turned into nops (`ftrace_pages_start`, a
/// list of `struct ftrace_page` holding `struct dyn_ftrace { ip, flags }`,
/// layouts from BTF). A nop at a function's entry is a patch site only if
/// it is one of these: a jump label or an alternative can also be a 5-byte
/// nop at an entry (e.g. `pgd_none` on a 5-level kernel), and the kernel
/// rewrites those when a static key flips. It is also the set klp can
/// patch (it hooks functions through these records).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FtraceRecords {
    ips: BTreeSet<u64>,
    /// Every record read (disabled ones too): ip -> address of its
    /// `flags` word.
    flags: std::collections::BTreeMap<u64, u64>,
}

impl FtraceRecords {
    /// Reads the records in `[_text, _etext)`, skipping disabled ones.
    /// Every read is bounded: page count, records per page, bytes.
    pub fn load<M: VirtRead + ?Sized>(
        mem: &M,
        kallsyms: &Kallsyms,
        btf: &Btf,
    ) -> Result<Self, SiteError> {
        Self::load_in(mem, kallsyms, btf, &[])
    }

    /// As [`FtraceRecords::load`], keeping also the records in `extra`
    /// (loaded modules' text: the kernel adds a module's records to the
    /// same list when it loads it, `ftrace_module_init`). Read afresh for
    /// every module patch: modules come and go.
    pub fn load_in<M: VirtRead + ?Sized>(
        mem: &M,
        kallsyms: &Kallsyms,
        btf: &Btf,
        extra: &[std::ops::Range<u64>],
    ) -> Result<Self, SiteError> {
        let err = |e: &dyn fmt::Display| SiteError::Records(e.to_string());
        let off = |p: &str| btf.offset_of(p).map_err(|e| err(&e));
        let (next, records, index) = (
            off("ftrace_page.next")?,
            off("ftrace_page.records")?,
            off("ftrace_page.index")?,
        );
        let (ip_off, flags_off) = (off("dyn_ftrace.ip")?, off("dyn_ftrace.flags")?);
        let size = btf.struct_size("dyn_ftrace").map_err(|e| err(&e))?;
        if !(16..=256).contains(&size) || ip_off + 8 > size || flags_off + 8 > size {
            return Err(err(&format!(
                "implausible struct dyn_ftrace ({size} bytes)"
            )));
        }
        let sym = |n: &str| kallsyms.addr(n).map_err(|e| err(&e));
        let (text, etext) = (sym("_text")?, sym("_etext")?);
        let mut page = mem
            .read_u64(sym("ftrace_pages_start")?)
            .map_err(|e| err(&e))?;
        let (mut pages, mut total) = (0u64, 0u64);
        let mut ips = BTreeSet::new();
        let mut flags_at = std::collections::BTreeMap::new();
        while page != 0 {
            pages += 1;
            if pages > MAX_FTRACE_PAGES {
                return Err(err(&"the ftrace page list does not end"));
            }
            let recs = mem
                .read_u64(page.wrapping_add(records))
                .map_err(|e| err(&e))?;
            let n = u64::from(
                mem.read_u32(page.wrapping_add(index))
                    .map_err(|e| err(&e))?,
            );
            total += n;
            if total > MAX_FTRACE_RECORDS {
                return Err(err(&format!("more than {MAX_FTRACE_RECORDS} records")));
            }
            let bytes = mem
                .read_vec(recs, n * size, MAX_FTRACE_PAGE_BYTES, "ftrace records")
                .map_err(|e| err(&e))?;
            for (i, rec) in bytes.chunks_exact(size as usize).enumerate() {
                let field = |o: u64| {
                    rec.get(o as usize..o as usize + 8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_le_bytes)
                        .unwrap_or(0)
                };
                let (ip, flags) = (field(ip_off), field(flags_off));
                let wanted = (text..etext).contains(&ip) || extra.iter().any(|r| r.contains(&ip));
                if !wanted {
                    continue;
                }
                flags_at.insert(ip, recs.wrapping_add(i as u64 * size + flags_off));
                if flags & FTRACE_FL_DISABLED == 0 {
                    ips.insert(ip);
                }
            }
            page = mem.read_u64(page.wrapping_add(next)).map_err(|e| err(&e))?;
        }
        Ok(Self {
            ips,
            flags: flags_at,
        })
    }

    /// A record set given directly (tests, or a source other than memory).
    pub fn from_ips(ips: impl IntoIterator<Item = u64>) -> Self {
        Self {
            ips: ips.into_iter().collect(),
            flags: Default::default(),
        }
    }

    /// Address of the `flags` word of the record at `ip`, disabled or not.
    pub fn flags_word(&self, ip: u64) -> Option<u64> {
        self.flags.get(&ip).copied()
    }

    /// Whether `ip` (the kernel-virtual address of a nop) is an enabled ftrace
    /// site.
    pub fn contains(&self, ip: u64) -> bool {
        self.ips.contains(&ip)
    }

    /// Enabled records kept.
    pub fn len(&self) -> usize {
        self.ips.len()
    }

    /// Whether no enabled record was kept.
    pub fn is_empty(&self) -> bool {
        self.ips.is_empty()
    }

    /// The enabled sites' addresses, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.ips.iter().copied()
    }
}

impl Site {
    /// Finds and validates the site of the kernel function at `func`: it
    /// must be the start of a code ([`is_code_kind`]) kallsyms symbol inside resident kernel
    /// text `[_text, _etext)`, long enough, executable, with the expected
    /// nop at its entry, and that nop one of the kernel's ftrace `records`.
    pub fn find<G: Guest + ?Sized>(
        space: &AddressSpace<'_, G>,
        kallsyms: &Kallsyms,
        records: &FtraceRecords,
        func: u64,
    ) -> Result<Site, SiteError> {
        Self::find_with(space, kallsyms, records, func, false)
    }

    /// [`Site::find`], but a function the guest traces (ftrace's `call`
    /// at its entry, to ftrace's own code or a trampoline in the module
    /// area) is taken too, marked [`Site::traced`]: for a redirect through
    /// ftrace, which shares the entry with the guest's tracers.
    pub fn find_shared<G: Guest + ?Sized>(
        space: &AddressSpace<'_, G>,
        kallsyms: &Kallsyms,
        records: &FtraceRecords,
        func: u64,
    ) -> Result<Site, SiteError> {
        Self::find_with(space, kallsyms, records, func, true)
    }

    fn find_with<G: Guest + ?Sized>(
        space: &AddressSpace<'_, G>,
        kallsyms: &Kallsyms,
        records: &FtraceRecords,
        func: u64,
        traced_ok: bool,
    ) -> Result<Site, SiteError> {
        let not_fn = |why: String| SiteError::NotAFunction { func, why };
        let located = kallsyms
            .locate(func)
            .ok_or_else(|| not_fn("no kallsyms symbol covers it".into()))?;
        if located.offset != 0 {
            return Err(not_fn(format!(
                "it is {}+{:#x}",
                located.symbol.name, located.offset
            )));
        }
        let name = located.symbol.name.clone();
        if !is_code_kind(located.symbol.kind) {
            return Err(not_fn(format!(
                "{name} has kallsyms type '{}', not a text symbol",
                located.symbol.kind
            )));
        }
        let bound = |s: &str| {
            kallsyms
                .addr(s)
                .map_err(|e| not_fn(format!("cannot bound kernel text: {e}")))
        };
        let (text_start, text_end) = (bound("_text")?, bound("_etext")?);
        if func < text_start || func >= text_end {
            return Err(SiteError::NotInText {
                name,
                func,
                text_start,
                text_end,
            });
        }
        // The function ends where the next higher symbol starts (kallsyms
        // has no sizes).
        let next = kallsyms
            .extent(func)
            .map_or(text_end, |r| r.end.min(text_end));
        Self::at_entry(space, kallsyms, records, name, func, next, traced_ok)
    }

    /// Finds and validates the site of the function at `func` in loaded
    /// module `module`: a code symbol of the module starting there, in its
    /// resident text (init text is freed after init), with the expected
    /// nop, one of the kernel's ftrace `records` (loaded with the module's
    /// text, [`FtraceRecords::load_in`]). `traced_ok`: a function the guest
    /// traces is taken too, as [`Site::find_shared`] takes one.
    pub fn find_in_module<G: Guest + ?Sized>(
        space: &AddressSpace<'_, G>,
        kallsyms: &Kallsyms,
        module: &LoadedModule,
        records: &FtraceRecords,
        func: u64,
        traced_ok: bool,
    ) -> Result<Site, SiteError> {
        let not_fn = |why: String| SiteError::NotAFunction { func, why };
        let symbol = module
            .symbol_at(func)
            .ok_or_else(|| not_fn(format!("no symbol of module {} starts there", module.name)))?;
        let name = symbol.name.clone();
        if !is_code_kind(symbol.kind) {
            return Err(not_fn(format!(
                "{name} has kallsyms type '{}' in module {}, not a text symbol",
                symbol.kind, module.name
            )));
        }
        if !module.text.contains(&func) {
            return Err(SiteError::NotInModuleText {
                name,
                module: module.name.clone(),
                func,
                text_start: module.text.start,
                text_end: module.text.end,
            });
        }
        // st_size bounds the function; 0 (hand-written asm) means "up to
        // the end of the module's text".
        let end = match func.checked_add(symbol.size) {
            Some(e) if symbol.size > 0 => e.min(module.text.end),
            _ => module.text.end,
        };
        let mut site = Self::at_entry(space, kallsyms, records, name, func, end, traced_ok)?;
        site.module = Some(InModule {
            name: module.name.clone(),
            addr: module.addr,
            text: module.text.clone(),
        });
        Ok(site)
    }

    /// The checks common to vmlinux and module functions, for the
    /// function `name` in `[func, end)`.
    fn at_entry<G: Guest + ?Sized>(
        space: &AddressSpace<'_, G>,
        kallsyms: &Kallsyms,
        records: &FtraceRecords,
        name: String,
        func: u64,
        end: u64,
        traced_ok: bool,
    ) -> Result<Site, SiteError> {
        let size = end - func;
        let mut code = vec![0u8; (size.min(ENTRY_READ as u64)) as usize];
        space
            .read_virt(func, &mut code)
            .map_err(|source| SiteError::Read {
                name: name.clone(),
                func,
                source,
            })?;
        let (entry, traced) =
            match decode_entry(&name, func, &code, &|t| classify_target(kallsyms, t)) {
                Ok(e) => (e, false),
                // ftrace's call: the guest traces the function. Its record
                // (checked below) says the site is ftrace's.
                Err(SiteError::Call { at, target, .. })
                    if traced_ok
                        && matches!(
                            classify_target(kallsyms, target).kind,
                            TargetKind::Ftrace | TargetKind::ModuleArea
                        ) =>
                {
                    let off = (at - func) as usize;
                    let mut original = [0u8; 5];
                    match code.get(off..off + 5) {
                        Some(b) => original.copy_from_slice(b),
                        None => {
                            return Err(SiteError::TooShort {
                                name,
                                func,
                                size,
                                need: off as u64 + 5,
                            })
                        }
                    }
                    let endbr = endbr_of(&code);
                    (
                        Entry {
                            func,
                            endbr,
                            at,
                            original,
                        },
                        true,
                    )
                }
                Err(e) => return Err(e),
            };
        if !records.contains(entry.at) {
            return Err(SiteError::NotFtraceSite {
                name,
                at: entry.at,
                bytes: hex(&entry.original),
            });
        }
        let first = space
            .translate(entry.at)
            .map_err(|source| SiteError::Read {
                name: name.clone(),
                func,
                source,
            })?;
        let last = space
            .translate(entry.at + 4)
            .map_err(|source| SiteError::Read {
                name: name.clone(),
                func,
                source,
            })?;
        if !first.executable || !last.executable || first.user {
            return Err(SiteError::NotExecutable { name, at: entry.at });
        }
        if last.phys != first.phys + 4 {
            return Err(SiteError::Straddles { name, at: entry.at });
        }
        Ok(Site {
            module: None,
            name,
            func: entry.func,
            extent: func..end,
            endbr: entry.endbr,
            at: entry.at,
            gpa: first.phys,
            original: entry.original,
            ftrace_flags: records.flags_word(entry.at),
            traced,
        })
    }

    /// The 5 bytes that divert this function to `target` (`jmp rel32`).
    pub fn redirect(&self, target: u64) -> Result<[u8; 5], SiteError> {
        jmp_rel32(self.at, target)
    }

    /// The write that diverts this function to `target`, expecting the nop.
    pub fn redirect_write(&self, target: u64) -> Result<crate::write::Write, SiteError> {
        Ok(crate::write::Write::new(
            self.gpa,
            self.redirect(target)?.to_vec(),
            self.original.to_vec(),
            format!("site {} ({:#x})", self.name, self.at),
        ))
    }

    /// The allow-list entry for this site's 5 bytes.
    pub fn allowed(&self) -> crate::write::Allowed {
        crate::write::Allowed {
            gpa: self.gpa,
            len: 5,
            kind: crate::write::AllowKind::Site { func: self.func },
        }
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:#x}: nop at {:#x} (gpa {:#x}, {})",
            self.name,
            self.func,
            self.at,
            self.gpa,
            hex(&self.original)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: u64 = 0xffff_ffff_9a00_1000;

    fn none(t: u64) -> Target {
        Target {
            desc: format!("{t:#x}"),
            kind: TargetKind::Elsewhere,
        }
    }

    fn body(prefix: &[u8]) -> Vec<u8> {
        let mut v = prefix.to_vec();
        v.extend_from_slice(&[0x55, 0x48, 0x89, 0xe5, 0x5d, 0xc3]); // push rbp; mov; pop; ret
        v
    }

    #[test]
    fn plain_nop_site() {
        let e = decode_entry("f", F, &body(&FTRACE_NOP), &none).unwrap();
        assert_eq!((e.at, e.endbr, e.original), (F, Endbr::None, FTRACE_NOP));
    }

    #[test]
    fn endbr_and_sealed_endbr_are_skipped() {
        let mut code = ENDBR64.to_vec();
        code.extend_from_slice(&FTRACE_NOP);
        let e = decode_entry("f", F, &body(&code), &none).unwrap();
        assert_eq!((e.at, e.endbr), (F + 4, Endbr::Endbr64));
        let mut code = ENDBR_POISON.to_vec();
        code.extend_from_slice(&FTRACE_NOP);
        let e = decode_entry("f", F, &body(&code), &none).unwrap();
        assert_eq!((e.at, e.endbr), (F + 4, Endbr::Sealed));
    }

    #[test]
    fn call_padding_before_the_symbol_is_not_looked_at() {
        // 16 bytes of padding nops precede the symbol; we are handed the
        // bytes from the symbol on, and the padding stays outside the site.
        let mut image = vec![0x90u8; 16];
        image.extend_from_slice(&ENDBR64);
        image.extend_from_slice(&FTRACE_NOP);
        let e = decode_entry("f", F, &body(image.get(16..).unwrap()), &none).unwrap();
        assert_eq!(e.at, F + 4);
    }

    #[test]
    fn traced_function_is_refused() {
        // call ftrace_caller, as ftrace writes it when tracing.
        let target = F - 0x10_0000;
        let rel = (target as i64 - (F as i64 + 5)) as i32;
        let mut code = vec![0xe8];
        code.extend_from_slice(&rel.to_le_bytes());
        let ftrace = |_| Target {
            desc: "ftrace_caller".into(),
            kind: TargetKind::Ftrace,
        };
        let e = decode_entry("f", F, &body(&code), &ftrace).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, SiteError::Call { target: t, .. } if t == target),
            "{msg}"
        );
        assert!(
            msg.contains("traced by ftrace") && msg.contains("call"),
            "{msg}"
        );
        let plain = |_| Target {
            desc: "verify_cpu".into(),
            kind: TargetKind::KernelText,
        };
        let m2 = decode_entry("f", F, &body(&code), &plain)
            .unwrap_err()
            .to_string();
        assert!(
            m2.contains("notrace") && !m2.contains("traced by ftrace"),
            "{m2}"
        );
        assert!(msg.contains("e8 "), "{msg}");
    }

    #[test]
    fn redirected_function_is_refused() {
        let site = jmp_rel32(F, F + 0x123_4567).unwrap();
        let e = decode_entry("f", F, &body(&site), &none).unwrap_err();
        assert!(matches!(e, SiteError::Jmp { target, .. } if target == F + 0x123_4567));
        assert!(e.to_string().contains("already redirected"), "{e}");
        let stub = |_| Target {
            desc: "bpf_trace_run1".into(),
            kind: TargetKind::KernelText,
        };
        let e = decode_entry("f", F, &body(&site), &stub).unwrap_err();
        assert!(e.to_string().contains("jump stub"), "{e}");
    }

    #[test]
    fn unexpected_bytes_are_shown() {
        // A notrace function: push %rbp; mov %rsp,%rbp.
        let e = decode_entry("g", F, &body(&[]), &none).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, SiteError::Unexpected { .. }));
        assert!(msg.contains("55 48 89 e5") && msg.contains("push"), "{msg}");
        // A short jmp (an alternative at memcpy's entry) is not a redirect.
        let e = decode_entry("memcpy", F, &body(&[0xeb, 0x1e]), &none).unwrap_err();
        assert!(matches!(e, SiteError::Unexpected { .. }), "{e}");
        let e = decode_entry("k", F, &body(&[0xcc, 0xcc]), &none).unwrap_err();
        assert!(matches!(e, SiteError::Int3 { .. }));
        assert!(e.to_string().contains("padding"), "{e}");
        let e = decode_entry("k", F, &body(&[0xcc, 0x1f, 0x44, 0, 0]), &none).unwrap_err();
        assert!(e.to_string().contains("text_poke"), "{e}");
        // Garbage that does not decode.
        let e = decode_entry("x", F, &[0x0f, 0xff, 0xff, 0xff, 0xff, 0xff], &none).unwrap_err();
        assert!(matches!(e, SiteError::Unexpected { .. }), "{e}");
    }

    #[test]
    fn too_short() {
        let e = decode_entry("t", F, &[0x0f, 0x1f, 0x44], &none).unwrap_err();
        assert!(
            matches!(
                e,
                SiteError::TooShort {
                    size: 3,
                    need: 5,
                    ..
                }
            ),
            "{e}"
        );
        let mut code = ENDBR64.to_vec();
        code.extend_from_slice(&[0xc3]);
        let e = decode_entry("t", F, &code, &none).unwrap_err();
        assert!(matches!(e, SiteError::TooShort { need: 9, .. }), "{e}");
    }

    #[test]
    fn jmp_encoding_and_reach() {
        let b = jmp_rel32(F, F + 5 + 0x10).unwrap();
        assert_eq!(b, [0xe9, 0x10, 0, 0, 0]);
        let b = jmp_rel32(F, F - 0x100).unwrap();
        let mut d = Decoder::with_ip(64, &b, F, DecoderOptions::NONE);
        let i = d.decode();
        assert_eq!(
            (i.mnemonic(), i.near_branch_target()),
            (Mnemonic::Jmp, F - 0x100)
        );
        let g = 0xffff_ffff_0000_0000u64;
        assert!(jmp_rel32(g, g + (1 << 31) + 5).is_err());
        assert!(jmp_rel32(g, g + (1 << 31) + 4).is_ok());
        assert!(jmp_rel32(g, g - (1 << 31) + 5).is_ok());
        assert!(jmp_rel32(g, g - (1 << 31) + 4).is_err());
        assert!(jmp_rel32(F, 0x1000).is_err());
    }

    mod records {
        use std::collections::BTreeMap;

        use super::super::*;
        use klpvisor_guest::btf::synth::BtfBuilder;
        use klpvisor_guest::kallsyms::synth::{Builder as TablesBuilder, BASE as TABLES_BASE};
        use klpvisor_guest::kallsyms::{Image, Layout};
        use klpvisor_guest::PagingError;

        const TEXT: u64 = 0xffff_ffff_8100_0000;
        const ETEXT: u64 = 0xffff_ffff_8120_0000;
        const START: u64 = 0xffff_ffff_8300_0000;
        const PAGE_A: u64 = 0xffff_8880_0000_1000;
        const PAGE_B: u64 = 0xffff_8880_0000_2000;
        const RECS_A: u64 = 0xffff_8880_0001_0000;
        const RECS_B: u64 = 0xffff_8880_0002_0000;

        /// Kernel virtual memory as a few byte ranges.
        #[derive(Default)]
        struct Mem(BTreeMap<u64, Vec<u8>>);

        impl Mem {
            fn put(&mut self, va: u64, bytes: Vec<u8>) {
                self.0.insert(va, bytes);
            }
            fn put_u64s(&mut self, va: u64, words: &[u64]) {
                self.put(va, words.iter().flat_map(|w| w.to_le_bytes()).collect());
            }
        }

        impl VirtRead for Mem {
            fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), PagingError> {
                let (start, bytes) = self
                    .0
                    .range(..=va)
                    .next_back()
                    .ok_or(PagingError::Unmapped { va })?;
                let off = (va - start) as usize;
                let src = bytes
                    .get(off..off + buf.len())
                    .ok_or(PagingError::Unmapped { va })?;
                buf.copy_from_slice(src);
                Ok(())
            }
        }

        fn kallsyms() -> Kallsyms {
            let syms = vec![
                ('T', "_text".to_string(), TEXT),
                ('T', "f".to_string(), TEXT + 0x100),
                ('T', "_etext".to_string(), ETEXT),
                ('b', "ftrace_pages_start".to_string(), START),
            ];
            let bytes = TablesBuilder::new(Layout::OffsetsFirst, syms).build();
            Kallsyms::from_image(Image {
                base: TABLES_BASE,
                bytes: &bytes,
            })
            .unwrap()
        }

        /// struct ftrace_page { next; records; int index; int order; }
        /// struct dyn_ftrace { unsigned long ip, flags; }
        fn btf() -> Btf {
            let mut b = BtfBuilder::new();
            let ulong = b.int("long unsigned int", 8);
            let int = b.int("int", 4);
            let rec = b.composite(
                false,
                "dyn_ftrace",
                16,
                &[("ip", ulong, 0, 0), ("flags", ulong, 64, 0)],
            );
            let rec_p = b.ptr(rec);
            let page_p = b.ptr(0);
            b.composite(
                false,
                "ftrace_page",
                24,
                &[
                    ("next", page_p, 0, 0),
                    ("records", rec_p, 64, 0),
                    ("index", int, 128, 0),
                    ("order", int, 160, 0),
                ],
            );
            Btf::parse(&b.build()).unwrap()
        }

        fn page(mem: &mut Mem, at: u64, next: u64, recs: u64, n: u64) {
            mem.put_u64s(at, &[next, recs, n]);
        }

        #[test]
        fn reads_enabled_text_records() {
            let mut m = Mem::default();
            m.put_u64s(START, &[PAGE_A]);
            page(&mut m, PAGE_A, PAGE_B, RECS_A, 2);
            page(&mut m, PAGE_B, 0, RECS_B, 2);
            m.put_u64s(RECS_A, &[TEXT + 0x100, 0, TEXT + 0x200, 1 << 31]);
            // A disabled record and one outside vmlinux text (a module's).
            m.put_u64s(RECS_B, &[TEXT + 0x300, FTRACE_FL_DISABLED, ETEXT + 0x10, 0]);
            let r = FtraceRecords::load(&m, &kallsyms(), &btf()).unwrap();
            assert_eq!(
                r.iter().collect::<Vec<_>>(),
                vec![TEXT + 0x100, TEXT + 0x200]
            );
            assert!(r.contains(TEXT + 0x100) && !r.contains(TEXT + 0x300));
        }

        #[test]
        fn hostile_lists_end_in_errors() {
            let (k, b) = (kallsyms(), btf());
            // A list that loops.
            let mut m = Mem::default();
            m.put_u64s(START, &[PAGE_A]);
            page(&mut m, PAGE_A, PAGE_A, RECS_A, 0);
            m.put_u64s(RECS_A, &[0]);
            let e = FtraceRecords::load(&m, &k, &b).unwrap_err();
            assert!(e.to_string().contains("does not end"), "{e}");
            // An index that would make us allocate gigabytes.
            let mut m = Mem::default();
            m.put_u64s(START, &[PAGE_A]);
            page(&mut m, PAGE_A, 0, RECS_A, 0xffff_ffff);
            let e = FtraceRecords::load(&m, &k, &b).unwrap_err();
            assert!(matches!(e, SiteError::Records(_)), "{e}");
            // A page pointer into nowhere.
            let mut m = Mem::default();
            m.put_u64s(START, &[0xdead_0000]);
            assert!(FtraceRecords::load(&m, &k, &b).is_err());
        }
    }
}
