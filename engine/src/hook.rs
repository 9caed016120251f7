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
//!
//! A module object's klp callbacks run in the loading (or unloading) task
//! itself, as klp runs them: the VMM can answer [`CALL`] with a function
//! in `r10` and its first argument in `r11` (and the next three, which the
//! stub leaves alone, in `rsi`, `rdx` and `rcx`); the stub calls it and
//! reads the port again with the result in `rsi`. ftrace's registration
//! of a loading module's functions (`ftrace_set_filter_ip`,
//! `register_ftrace_function`) and its letting go in an unloading one run
//! the same way, where klp runs them. So the task is held only while the VMM
//! works, never while a callback runs, and a callback may sleep, take
//! locks and wait for other CPUs as it could under klp.
//!
//! The stubs, at the page's start and at [`GOING_AT`]:
//!
//! ```text
//! coming: push rdi; push rsi; push rdx; xor esi, esi
//!      1: mov edx, COMING_PORT; in eax, dx
//!         cmp eax, CALL; jne 2f
//!         mov rdi, r11; call r10 (through __x86_indirect_thunk_r10)
//!         mov rsi, rax; mov rdi, [rsp+16]; jmp 1b
//!      2: pop rdx; pop rsi; pop rdi
//!         test eax, eax; jnz 3f; jmp klp_module_coming+nop+5
//!      3: cdqe; ret (or jmp to the return thunk)
//! going:  the same loop on GOING_PORT, then jmp klp_module_going+nop+5
//! ```
//!
//! `rax`, `r10` and `r11` are free at a function's entry (and
//! `klp_module_going` returns nothing); the argument registers are kept.
//! The stubs keep the stack 16-byte aligned for the call. The guest's
//! unwinder knows no ORC for them: a stack dump of a task in a callback
//! shows the frames below as unreliable, as klpvisor's own safe-point check
//! treats them (it scans such a stack conservatively).

use klpvisor_guest::{Guest, Kernel};

use crate::arena::{Arena, ArenaError, Perm, Region};
use crate::site::{FtraceRecords, Site, SiteError};
use crate::write::{Write, WriteError};

/// The port the coming stub reads: the VMM answers 0 or a negative errno.
pub const COMING_PORT: u16 = 0x0ff1;
/// The port the going stub reads (the answer is ignored).
pub const GOING_PORT: u16 = 0x0ff2;
/// Where the going stub starts in the hooks' page.
pub const GOING_AT: u64 = 128;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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

/// Where a stub's `in` ends, from the stub's start: the `rip` a vCPU
/// stopped in a hook has (anything else reading the ports is not a hook).
pub const IN_END: u64 = 11;

/// What the VMM puts in `eax` to make a stub call a function (its
/// address in `r10`, its argument in `r11`) and come back with the result
/// in `rsi`: how a module object's klp callbacks run in the loading task,
/// as klp runs them in `klp_module_coming` / `klp_module_going`.
pub const CALL: i32 = 1;

/// Emits a stub at `b`'s end (at `text + b.len()`): saves the argument
/// registers, then loops reading `port` while the answer is [`CALL`],
/// calling `r10(r11)` (through `indirect_thunk`, a
/// `__x86_indirect_thunk_r10`, when the kernel has one) and passing its
/// result back in `rsi`. Any other answer restores the registers and
/// leaves `eax` holding it.
fn looping(
    b: &mut Vec<u8>,
    text: u64,
    port: u16,
    indirect_thunk: Option<u64>,
) -> Result<(), HookError> {
    // Entry: rsp = 8 mod 16; three pushes make it 0 mod 16 for the call.
    b.extend_from_slice(&[0x57, 0x56, 0x52]); // push rdi; push rsi; push rdx
    b.extend_from_slice(&[0x31, 0xf6]); // xor esi, esi: no result yet
    let top = b.len();
    b.push(0xba); // mov edx, imm32
    b.extend_from_slice(&u32::from(port).to_le_bytes());
    b.push(0xed); // in eax, dx
    b.extend_from_slice(&[0x83, 0xf8, CALL as u8]); // cmp eax, CALL
    let jne = b.len();
    b.extend_from_slice(&[0x75, 0x00]); // jne done (patched below)
    b.extend_from_slice(&[0x4c, 0x89, 0xdf]); // mov rdi, r11
    match indirect_thunk {
        Some(t) => {
            b.push(0xe8); // call __x86_indirect_thunk_r10
            let end = text + b.len() as u64 + 4;
            b.extend_from_slice(&rel32(end, t, text)?);
        }
        None => b.extend_from_slice(&[0x41, 0xff, 0xd2]), // call r10
    }
    b.extend_from_slice(&[0x48, 0x89, 0xc6]); // mov rsi, rax: the result
    b.extend_from_slice(&[0x48, 0x8b, 0x7c, 0x24, 0x10]); // mov rdi, [rsp+16]
    let back = i8::try_from(top as i64 - (b.len() as i64 + 2))
        .map_err(|_| HookError::OutOfReach { text, target: text })?;
    b.extend_from_slice(&[0xeb, back as u8]); // jmp top
    let fwd = u8::try_from(b.len() - (jne + 2))
        .map_err(|_| HookError::OutOfReach { text, target: text })?;
    b[jne + 1] = fwd;
    b.extend_from_slice(&[0x5a, 0x5e, 0x5f]); // pop rdx; pop rsi; pop rdi
    Ok(())
}

/// The stubs' page at `text`: the coming stub resumes at `coming_resume`,
/// the going stub at `going_resume`; a refusal returns through
/// `return_thunk` (or a plain `ret`).
fn code(
    text: u64,
    coming_resume: u64,
    going_resume: u64,
    return_thunk: Option<u64>,
    indirect_thunk: Option<u64>,
) -> Result<Vec<u8>, HookError> {
    let mut b = Vec::new();
    looping(&mut b, text, COMING_PORT, indirect_thunk)?;
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
    if b.len() as u64 > GOING_AT {
        return Err(HookError::OutOfReach {
            text,
            target: text + GOING_AT,
        });
    }
    b.resize(GOING_AT as usize, 0xcc);
    looping(&mut b, text, GOING_PORT, indirect_thunk)?;
    b.push(0xe9); // jmp going_resume
    let end = text + b.len() as u64 + 4;
    b.extend_from_slice(&rel32(end, going_resume, text)?);
    b.resize(PAGE as usize, 0xcc);
    Ok(b)
}

impl Hooks {
    /// The `rip` of a vCPU stopped in the coming stub's and the going
    /// stub's port read.
    pub fn rips(&self) -> (u64, u64) {
        (self.text.va.0 + IN_END, self.text.va.0 + GOING_AT + IN_END)
    }

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
            code(
                text.va.0,
                coming.at + 5,
                going.at + 5,
                return_thunk,
                kernel.kallsyms.addr("__x86_indirect_thunk_r10").ok(),
            )?,
            "module hooks code",
        )?);
        for (s, at) in [(&coming, 0), (&going, GOING_AT)] {
            writes.push(
                s.redirect_write(text.va.0 + at)
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
        let r10 = 0xffff_ffff_8210_0000;
        let b = code(text, coming, going, Some(thunk), Some(r10)).expect("code");
        assert_eq!(b.len(), PAGE as usize);
        let lines = listing(&b, text);
        assert_eq!(
            lines,
            [
                "push %rdi",
                "push %rsi",
                "push %rdx",
                "xor %esi,%esi",
                "mov $0xff1,%edx",
                "in %dx,%eax",
                "cmp $1,%eax",
                "jne 0xffffffffc0000022",
                "mov %r11,%rdi",
                "call 0xffffffff82100000",
                "mov %rax,%rsi",
                "mov 0x10(%rsp),%rdi",
                "jmp 0xffffffffc0000005",
                "pop %rdx",
                "pop %rsi",
                "pop %rdi",
                "test %eax,%eax",
                "jne 0xffffffffc000002e",
                "jmp 0xffffffff81200009",
                "cltq",
                "jmp 0xffffffff82000000",
            ]
        );
        // Both `in`s end at IN_END of their stub.
        assert_eq!(b[IN_END as usize - 1], 0xed);
        assert_eq!(b[(GOING_AT + IN_END) as usize - 1], 0xed);
        let going_lines = listing(&b[GOING_AT as usize..], text + GOING_AT);
        assert_eq!(going_lines[4], "mov $0xff2,%edx");
        assert_eq!(
            going_lines.last().map(String::as_str),
            Some("jmp 0xffffffff81200109")
        );
        // Without thunks: a plain indirect call and a plain ret.
        let plain = code(text, coming, going, None, None).expect("code");
        let plain_lines = listing(&plain, text);
        assert!(
            plain_lines.contains(&"call *%r10".to_owned()),
            "{plain_lines:?}"
        );
        assert_eq!(plain_lines.last().map(String::as_str), Some("ret"));
    }

    #[test]
    fn targets_out_of_reach_are_refused() {
        assert!(matches!(
            code(
                0xffff_ffff_c000_0000,
                0xffff_8880_0000_1000,
                0xffff_8880_0000_2000,
                None,
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
