//! Catching the guest's module loads and unloads where klp does.
//!
//! klp patches a module that loads after its patch in
//! `klp_module_coming()`, which the module loader calls from
//! `prepare_coming_module()`: the module is linked, formed and on the
//! modules list (state `COMING`), its ftrace records exist, and none of its
//! code (not even its init) has run yet. If that fails, the load fails
//! with its error. `klp_module_going()`, called once the module's exit has
//! run (or its load failed after the coming step), takes the module's
//! redirects away before its memory is freed.
//!
//! klpvisor hooks the same two calls, from outside: each one's ftrace nop
//! becomes a `jmp` to a few instructions in an arena page that read an I/O
//! port. The read exits to the VMM on the loading vCPU itself, with the
//! `struct module *` in `rdi`. The VMM holds that vCPU there, pauses the
//! others, links and redirects (or unlinks) the module's objects, and puts
//! the answer in `eax`: 0 lets the call go on into the kernel's own
//! function (so an in-guest klp patch still sees the module), a negative
//! errno makes `klp_module_coming()` return it, which fails the load as klp
//! fails it. The hooks are installed with the first patch that has a
//! module object, and stay.
//!
//! The stubs, at the page's start and at [`GOING_AT`]:
//!
//! ```text
//! coming: push rdx; mov edx, COMING_PORT; in eax, dx; pop rdx
//!         test eax, eax; jnz 1f; jmp klp_module_coming+nop+5
//!      1: cdqe; ret (or jmp to the return thunk)
//! going:  push rdx; mov edx, GOING_PORT; in eax, dx; pop rdx
//!         jmp klp_module_going+nop+5
//! ```
//!
//! `rax` is free at a function's entry (and `klp_module_going` returns
//! nothing); `rdx` is kept anyway. The stubs make no calls and keep the
//! stack as the entry found it, so the kernel's unwinder, which knows no
//! ORC for them, is never asked to walk out of them by anything but a
//! stack dump of the held task.

use klpvisor_guest::{Guest, Kernel};

use crate::arena::{Arena, ArenaError, Perm, Region};
use crate::site::{FtraceRecords, Site, SiteError};
use crate::write::{Write, WriteError};

/// The port the coming stub reads: the VMM answers 0 or a negative errno.
pub const COMING_PORT: u16 = 0x0ff1;
/// The port the going stub reads (the answer is ignored).
pub const GOING_PORT: u16 = 0x0ff2;
/// Where the going stub starts in the hooks' page.
pub const GOING_AT: u64 = 64;
const PAGE: u64 = 4096;

/// Why the hooks cannot be installed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    /// The kernel has no such function (built without CONFIG_LIVEPATCH).
    #[error(
        "the guest kernel has no {0} (it is built without CONFIG_LIVEPATCH), so klpvisor cannot \
         patch a module when it loads"
    )]
    NoFunction(&'static str),
    /// The function's entry is not an ftrace site klpvisor can take.
    #[error("cannot hook {name}: {source}")]
    Site {
        /// The function.
        name: &'static str,
        /// Why its site was refused.
        #[source]
        source: Box<SiteError>,
    },
    /// No arena page for the stubs.
    #[error("hooks for module loads: {0}")]
    Arena(#[from] ArenaError),
    /// Reading what the stubs' page replaces failed.
    #[error("hooks for module loads: {0}")]
    Write(#[from] WriteError),
    /// The guest's return thunk could not be read.
    #[error("hooks for module loads: {0}")]
    Link(#[from] crate::link::LinkError),
    /// The arena is too far from the kernel's text (an engine bug: the
    /// arena is placed within reach).
    #[error("the hooks' page at {text:#x} cannot reach {target:#x} with a rel32 jump")]
    OutOfReach {
        /// The stubs' page.
        text: u64,
        /// The jump's target.
        target: u64,
    },
}

/// Which hook a vCPU stopped in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// `klp_module_coming(mod)`: patch `mod` before its code runs.
    Coming,
    /// `klp_module_going(mod)`: take `mod`'s redirects away.
    Going,
}

impl Event {
    /// The hook behind an I/O port read, if the port is one of them.
    pub fn from_port(port: u16) -> Option<Self> {
        match port {
            COMING_PORT => Some(Self::Coming),
            GOING_PORT => Some(Self::Going),
            _ => None,
        }
    }
}

/// The installed hooks.
#[derive(Debug, Clone)]
pub struct Hooks {
    /// The stubs' page.
    pub text: Region,
    /// `klp_module_coming`'s entry, redirected to the coming stub.
    pub coming: Site,
    /// `klp_module_going`'s entry, redirected to the going stub.
    pub going: Site,
}

fn rel32(from_end: u64, target: u64, text: u64) -> Result<[u8; 4], HookError> {
    i32::try_from(target.wrapping_sub(from_end) as i64)
        .map(i32::to_le_bytes)
        .map_err(|_| HookError::OutOfReach { text, target })
}

/// The stubs' page at `text`: the coming stub resumes at `coming_resume`,
/// the going stub at `going_resume`; a refusal returns through
/// `return_thunk` (or a plain `ret`).
fn code(
    text: u64,
    coming_resume: u64,
    going_resume: u64,
    return_thunk: Option<u64>,
) -> Result<Vec<u8>, HookError> {
    let mut b = Vec::new();
    let port = |b: &mut Vec<u8>, port: u16| {
        b.push(0x52); // push rdx
        b.push(0xba); // mov edx, imm32
        b.extend_from_slice(&u32::from(port).to_le_bytes());
        b.push(0xed); // in eax, dx
        b.push(0x5a); // pop rdx
    };
    port(&mut b, COMING_PORT);
    b.extend_from_slice(&[0x85, 0xc0]); // test eax, eax
    b.extend_from_slice(&[0x75, 0x05]); // jnz +5 (over the jmp)
    b.push(0xe9); // jmp coming_resume
    let end = text + b.len() as u64 + 4;
    b.extend_from_slice(&rel32(end, coming_resume, text)?);
    b.extend_from_slice(&[0x48, 0x98]); // cdqe: the int is the return value
    match return_thunk {
        Some(t) => {
            b.push(0xe9);
            let end = text + b.len() as u64 + 4;
            b.extend_from_slice(&rel32(end, t, text)?);
        }
        None => b.push(0xc3),
    }
    b.resize(GOING_AT as usize, 0xcc);
    port(&mut b, GOING_PORT);
    b.push(0xe9); // jmp going_resume
    let end = text + b.len() as u64 + 4;
    b.extend_from_slice(&rel32(end, going_resume, text)?);
    b.resize(PAGE as usize, 0xcc);
    Ok(b)
}

impl Hooks {
    /// Plans installing the hooks: validates both functions' ftrace sites
    /// in `ftrace`, allocates the stubs' page on `arena` and returns the
    /// writes that map and fill it and redirect both entries. The caller
    /// keeps the ftrace records of both sites disabled, as for any site.
    pub fn plan_install<G: Guest + ?Sized>(
        kernel: &Kernel,
        guest: &G,
        ftrace: &FtraceRecords,
        arena: &mut Arena,
    ) -> Result<(Hooks, Vec<Write>), HookError> {
        let space = kernel.space(guest);
        let site = |name: &'static str| -> Result<Site, HookError> {
            let addr = kernel
                .kallsyms
                .addr(name)
                .map_err(|_| HookError::NoFunction(name))?;
            Site::find(&space, &kernel.kallsyms, ftrace, addr).map_err(|e| HookError::Site {
                name,
                source: Box::new(e),
            })
        };
        let coming = site("klp_module_coming")?;
        let going = site("klp_module_going")?;
        let return_thunk = crate::link::guest_return_thunk(&space, &kernel.kallsyms)?
            .filter(|&t| !crate::link::guest_plain_returns(&space, &kernel.kallsyms, Some(t)));
        let text = arena.alloc(PAGE, Perm::Text)?;
        let mut writes = arena.map_writes(guest, &[text])?;
        writes.push(Write::read_expect(
            guest,
            text.gpa,
            code(text.va, coming.at + 5, going.at + 5, return_thunk)?,
            "module hooks code",
        )?);
        for (s, at) in [(&coming, 0), (&going, GOING_AT)] {
            writes.push(
                s.redirect_write(text.va + at)
                    .map_err(|e| HookError::Site {
                        name: if at == 0 {
                            "klp_module_coming"
                        } else {
                            "klp_module_going"
                        },
                        source: Box::new(e),
                    })?,
            );
        }
        Ok((
            Hooks {
                text,
                coming,
                going,
            },
            writes,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, GasFormatter};

    fn listing(bytes: &[u8], va: u64) -> Vec<String> {
        let mut d = Decoder::with_ip(64, bytes, va, DecoderOptions::NONE);
        let mut f = GasFormatter::new();
        f.options_mut().set_uppercase_hex(false);
        let mut out = Vec::new();
        for i in d.iter() {
            if i.code() == iced_x86::Code::Int3 {
                break;
            }
            let mut s = String::new();
            f.format(&i, &mut s);
            out.push(s);
        }
        out
    }

    #[test]
    fn the_stubs_are_what_the_doc_says() {
        let text = 0xffff_ffff_c000_0000;
        let coming = 0xffff_ffff_8120_0009;
        let going = 0xffff_ffff_8120_0109;
        let thunk = 0xffff_ffff_8200_0000;
        let b = code(text, coming, going, Some(thunk)).expect("code");
        assert_eq!(b.len(), PAGE as usize);
        assert_eq!(
            listing(&b, text),
            [
                "push %rdx",
                "mov $0xff1,%edx",
                "in %dx,%eax",
                "pop %rdx",
                "test %eax,%eax",
                "jne 0xffffffffc0000011",
                "jmp 0xffffffff81200009",
                "cltq",
                "jmp 0xffffffff82000000",
            ]
        );
        assert_eq!(
            listing(&b[GOING_AT as usize..], text + GOING_AT),
            [
                "push %rdx",
                "mov $0xff2,%edx",
                "in %dx,%eax",
                "pop %rdx",
                "jmp 0xffffffff81200109",
            ]
        );
        let plain = code(text, coming, going, None).expect("code");
        assert_eq!(
            listing(&plain, text).last().map(String::as_str),
            Some("ret")
        );
        // The refusal path skips exactly the resuming jmp.
        assert_eq!(b[10..12], [0x75, 0x05]);
    }

    #[test]
    fn targets_out_of_reach_are_refused() {
        assert!(matches!(
            code(
                0xffff_ffff_c000_0000,
                0xffff_8880_0000_1000,
                0xffff_8880_0000_2000,
                None
            ),
            Err(HookError::OutOfReach { .. })
        ));
    }

    #[test]
    fn only_the_two_ports_are_hooks() {
        assert_eq!(Event::from_port(COMING_PORT), Some(Event::Coming));
        assert_eq!(Event::from_port(GOING_PORT), Some(Event::Going));
        assert_eq!(Event::from_port(0x0ff0), None);
    }
}
