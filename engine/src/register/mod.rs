//! Registering a patch with the guest kernel as the module loader would
//! register a livepatch module: a `struct module` of the guest's own
//! layout, written from outside, that the kernel's lookups find.
//!
//! Why: patch code is full of constructs whose meaning the kernel looks up
//! by instruction address, through the module that owns it:
//! - a fault in an inlined user access finds its fixup in
//!   `mod->extable` (`search_module_extables`), so it returns `-EFAULT`
//!   instead of oopsing;
//! - a `WARN`/`BUG` finds its file and line in `mod->bug_table`
//!   (`module_find_bug`), so a `WARN` reports and continues instead of
//!   oopsing on the `ud2`;
//! - the guest's ORC unwinder finds `mod->arch.orc_unwind*`, so stack
//!   traces and `/proc/PID/stack` walk through patch frames;
//! - `%pS`, stack traces and `/proc/kallsyms` name patch functions from
//!   `mod->kallsyms`, with the module's name in brackets;
//! - the module carries taint `K`, and shows in `/proc/modules` as a
//!   livepatch module would.
//!
//! How: [`image`] lays out the `struct module` and its tables in an arena
//! region of the patch; [`links`] computes, with every vCPU paused, the
//! pointer writes that put it on `modules`, `module_bug_list` and both
//! copies of the `mod_tree` latch tree ([`rbtree`] does the red-black
//! insert and erase exactly as `lib/rbtree.c`); both go through the write
//! path's allow-list and expectations. Removal is the reverse, when the
//! patch's code is freed.
//!
//! Failure modes, each refused before anything is written:
//! - `module_mutex` held, or the latch sequence odd: a module load or
//!   unload in the guest is mid-way; the step is retried (it is a blocker
//!   like a task in a patched function);
//! - a registry that is not a consistent list or red-black tree (a
//!   corrupt or hostile guest): the patch is refused with the reason;
//! - a guest whose BTF lacks one of the structures: refused, naming it.

pub mod image;
pub mod jump;
pub mod layout;
pub mod links;
pub mod livepatch;
pub mod rbtree;
#[cfg(test)]
mod tests;

use klpvisor_guest::{Btf, BtfError, Kallsyms, KallsymsError};

use crate::link::Linked;
use crate::module::tables::BugLayout;
use crate::module::Module;
pub use image::{Counts, Image};
use layout::ModuleLayout;
pub use links::{Globals, Mem, Word};

/// Why a patch cannot be registered with, or removed from, the guest
/// kernel's module registries.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The guest's BTF lacks a member or struct the registration writes.
    #[error("the guest's BTF lacks `{path}`, needed to register the patch as a module")]
    Layout {
        /// `struct.member` as looked up.
        path: String,
        /// What the BTF lookup said.
        #[source]
        source: BtfError,
    },
    /// A layout fact the code relies on does not hold.
    #[error("unexpected module layout in the guest's BTF: {0}")]
    Unexpected(&'static str),
    /// `modules`, `mod_tree`, `module_bug_list` or `module_mutex` missing.
    #[error("the guest kernel lacks a symbol needed to register the patch as a module")]
    Symbol(#[source] KallsymsError),
    /// The patch's name does not fit `struct module`'s `name`.
    #[error("the patch name `{name}` is not a valid module name (at most {max} bytes)")]
    Name {
        /// The patch's name.
        name: String,
        /// `MODULE_NAME_LEN - 1` of the guest.
        max: u64,
    },
    /// A table entry cannot reach its target with 32 bits.
    #[error("{0}: an entry is more than 2 GiB from what it points at")]
    Reach(&'static str),
    /// A module load or unload is mid-way in the guest: retry later.
    #[error("the guest's module registry is busy: {0}")]
    Busy(&'static str),
    /// Code in the guest holds references to the patch's module (a kprobe
    /// on its code): its memory stays until they are dropped.
    #[error(
        "the patch's module is in use inside the guest ({refs} reference(s) beyond klp's own, \
         e.g. a kprobe on its code); its code stays mapped until they are dropped"
    )]
    InUse {
        /// References beyond the one klpvisor holds.
        refs: u32,
    },
    /// A static key the patch uses is not the kernel's own.
    #[error(
        "the patch uses the static key at {key:#x}, which is outside the kernel image (a \
         module's key); only the kernel's own static keys and tracepoints can be followed"
    )]
    ForeignKey {
        /// The key's address.
        key: u64,
    },
    /// A guest module joined a key's list after the patch: removing the
    /// patch's entry would leave klpvisor's memory for the kernel to free.
    #[error(
        "the static key at {key:#x} is shared with a module loaded after the patch; its code \
         stays mapped until that module is unloaded"
    )]
    KeyShared {
        /// The key's address.
        key: u64,
    },
    /// The guest's own klp is changing `klp_patches`, or runs a transition
    /// of its own: retry later.
    #[error("the guest's klp is busy: {0}")]
    KlpBusy(&'static str),
    /// `klp_patches` is not a consistent list (corrupt or hostile guest).
    #[error("the guest's klp_patches list is inconsistent: {0}")]
    KlpCorrupt(&'static str),
    /// A registry is not a consistent list (corrupt or hostile guest).
    #[error("the guest's module registry is inconsistent: {0}")]
    Corrupt(&'static str),
    /// The module tree could not be edited (see the tree error).
    #[error("the guest's module tree: {0}")]
    Tree(#[from] rbtree::TreeError),
    /// Guest memory the registration needs could not be read.
    #[error("cannot read guest memory at {va:#x}")]
    Read {
        /// The kernel virtual address.
        va: u64,
        /// Why the read failed.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A bug in klpvisor.
    #[error("internal registration error: {0}")]
    Internal(&'static str),
}

impl RegisterError {
    /// Whether trying again later may succeed (the guest was mid-way
    /// through changing its registries).
    pub fn is_busy(&self) -> bool {
        matches!(self, RegisterError::Busy(_) | RegisterError::KlpBusy(_))
    }
}

/// A patch registered with the guest kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// Its `struct module`.
    pub module: u64,
    /// The text range the kernel finds it by.
    pub text: std::ops::Range<u64>,
    /// On `module_bug_list`.
    pub bugs: bool,
    /// Entries of each table.
    pub counts: Counts,
    /// The static keys its code uses.
    pub jumps: Vec<jump::JumpKey>,
    /// Its ORC table, `(ip, entry)` sorted by ip.
    pub orc: Vec<(u64, [u8; 6])>,
}

/// The guest kernel's module layout and registries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Registry {
    /// `struct module` and the registries, from BTF.
    pub layout: ModuleLayout,
    /// `struct bug_entry`, if the guest has the relative layout.
    pub bug: Option<BugLayout>,
    /// The registries' addresses.
    pub globals: Globals,
    /// For patches with static-key sites: `None` if the guest lacks
    /// `jump_label_mutex` or the image bounds.
    pub jump: Option<jump::JumpGlobals>,
    /// For callbacks that ask the guest's klp about earlier patches
    /// ([`livepatch`]): `None` if the guest's klp lacks what that needs.
    pub klp: Option<livepatch::KlpGlobals>,
}

impl Registry {
    /// From the guest's BTF and kallsyms.
    pub fn new(btf: &Btf, kallsyms: &Kallsyms) -> Result<Self, RegisterError> {
        let sym = |n: &str| kallsyms.addr(n).map_err(RegisterError::Symbol);
        Ok(Self {
            layout: ModuleLayout::from_btf(btf)?,
            bug: BugLayout::from_btf(btf),
            globals: Globals {
                modules: sym("modules")?,
                module_bug_list: sym("module_bug_list")?,
                mod_tree: sym("mod_tree")?,
                module_mutex: sym("module_mutex")?,
                tainted_mask: kallsyms.addr("tainted_mask").ok(),
            },
            jump: match (
                kallsyms.addr("jump_label_mutex"),
                kallsyms.addr("_text"),
                kallsyms.addr("_end"),
            ) {
                (Ok(mutex), Ok(text), Ok(end)) => Some(jump::JumpGlobals {
                    mutex,
                    image: (text, end),
                }),
                _ => None,
            },
            klp: livepatch::KlpGlobals::new(btf, kallsyms),
        })
    }

    /// Bytes of the arena region [`Registry::image`] fills for `module`.
    pub fn size(&self, module: &Module) -> u64 {
        image::size(&self.layout, self.bug, module)
    }

    /// The region's bytes for `module` linked as `linked`, at `va`.
    pub fn image(
        &self,
        name: &str,
        module: &Module,
        linked: &Linked,
        va: u64,
    ) -> Result<Image, RegisterError> {
        image::build(&self.layout, self.bug, name, module, linked, va)
    }

    /// The words that put the module in the registries, and the bytes of
    /// its static-key sites for the keys' states (vCPUs paused).
    pub fn register(
        &self,
        mem: &dyn Mem,
        r: &Registered,
    ) -> Result<(Vec<Word>, Vec<jump::Poke>), RegisterError> {
        let (mut words, pokes) = match r.jumps.is_empty() {
            true => (Vec::new(), Vec::new()),
            false => jump::register(mem, self.jump_globals()?, r.module, &r.jumps)?,
        };
        words.extend(links::register(
            mem,
            &self.layout,
            &self.globals,
            r.module,
            r.text.clone(),
            r.bugs,
        )?);
        Ok((words, pokes))
    }

    /// Refuses static keys the patch cannot follow (see [`jump::check`]).
    pub fn check_keys(&self, keys: &[jump::JumpKey]) -> Result<(), RegisterError> {
        if keys.is_empty() {
            return Ok(());
        }
        jump::check(self.jump_globals()?, keys)
    }

    fn jump_globals(&self) -> Result<&jump::JumpGlobals, RegisterError> {
        self.jump.as_ref().ok_or(RegisterError::Unexpected(
            "the patch has static-key sites but the guest kernel has no jump_label_mutex",
        ))
    }

    /// Refuses while a module load or unload is mid-way in the guest.
    pub fn quiet(&self, mem: &dyn Mem) -> Result<(), RegisterError> {
        links::quiet(mem, &self.layout, &self.globals)
    }

    /// The words that take it out again (vCPUs paused).
    pub fn unregister(&self, mem: &dyn Mem, r: &Registered) -> Result<Vec<Word>, RegisterError> {
        let mut words = links::unregister(mem, &self.layout, &self.globals, r.module, r.bugs)?;
        if !r.jumps.is_empty() {
            words.extend(jump::unregister(mem, self.jump_globals()?, &r.jumps)?);
        }
        Ok(words)
    }

    /// The guest words either may write (see [`links::allowed`] and
    /// [`jump::allowed`]); `jumps` are the keys of the patches concerned.
    pub fn allowed(
        &self,
        mem: &dyn Mem,
        ours: &[u64],
        jumps: &[jump::JumpKey],
    ) -> Result<Vec<u64>, RegisterError> {
        let mut v = links::allowed(mem, &self.layout, &self.globals, ours)?;
        if !jumps.is_empty() {
            v.extend(jump::allowed(mem, self.jump_globals()?, jumps)?);
        }
        Ok(v)
    }
}
