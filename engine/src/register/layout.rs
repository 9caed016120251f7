//! Where the fields of the guest's `struct module` and of the kernel's
//! module registries are, from the guest's BTF: nothing here is a
//! per-version constant except the two facts BTF cannot give (named where
//! they are used).

use klpvisor_guest::Btf;

use super::RegisterError;

/// `MODULE_STATE_LIVE`, the first enumerator of `enum module_state` in
/// every kernel that has one.
pub const MODULE_STATE_LIVE: u32 = 0;
/// `TAINT_LIVEPATCH` ('K'), bit 15 of the taint mask since 4.0.
pub const TAINT_LIVEPATCH: u32 = 15;
/// `MODULE_REF_BASE`: the reference count of a module nobody uses.
pub const MODULE_REF_BASE: u32 = 1;
/// Size of `struct rb_node`: parent-and-colour, right, left.
pub const RB_NODE: u64 = 24;

/// How the module's memory is described.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Memory {
    /// Up to 6.3: `struct module_layout core_layout` (one range, text
    /// first; `text_size`, `ro_size`, `ro_after_init_size` inside it).
    Layout {
        /// Offset of `core_layout` in `struct module`.
        at: u64,
        /// Offset of `size` in `struct module_layout`.
        size: u64,
        /// Offset of `text_size` (registration writes all four sizes as the
        /// text's length).
        text_size: u64,
        /// Offset of `ro_size`.
        ro_size: u64,
        /// Offset of `ro_after_init_size`.
        ro_after_init_size: u64,
        /// Offset of `mtn`, the range's `struct mod_tree_node`.
        mtn: u64,
    },
    /// 6.4+: `struct module_memory mem[MOD_MEM_NUM_TYPES]`, one range per
    /// kind; the kernel's commit "module: replace module_layout with
    /// module_memory" made `MOD_TEXT` (0) the first, so its entry is at
    /// `at`.
    Mem {
        /// Offset of `mem` in `struct module`.
        at: u64,
        /// Size of `struct module_memory`: the distance between entries.
        stride: u64,
        /// Offset of `size` in `struct module_memory`.
        size: u64,
        /// Offset of `mtn`, the range's `struct mod_tree_node`.
        mtn: u64,
    },
}

impl Memory {
    /// Offset of the text range's `base` in `struct module`.
    pub fn text_base(&self) -> u64 {
        match *self {
            Memory::Layout { at, .. } | Memory::Mem { at, .. } => at,
        }
    }

    /// Offset of the text range's `struct mod_tree_node` in `struct module`.
    pub fn text_mtn(&self) -> u64 {
        match *self {
            Memory::Layout { at, mtn, .. } | Memory::Mem { at, mtn, .. } => at + mtn,
        }
    }

    /// Offset of `mtn` within the range's struct (`module_layout` or
    /// `module_memory`): the kernel's tree compares `container_of(mtn)
    /// ->base`, so a node's key is read at `node - index * RB_NODE -
    /// node_in_mtn - mtn_in_range`.
    pub fn mtn_in_range(&self) -> u64 {
        match *self {
            Memory::Layout { mtn, .. } | Memory::Mem { mtn, .. } => mtn,
        }
    }

    /// Offset of the range's 32-bit `size`, relative to its `base`.
    pub fn size_in_range(&self) -> u64 {
        match *self {
            Memory::Layout { size, .. } | Memory::Mem { size, .. } => size,
        }
    }
}

/// Offsets in the guest's `struct module` and in the registries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModuleLayout {
    /// Size of `struct module`; the image's tables follow it.
    pub size: u64,
    /// `module.state`, written [`MODULE_STATE_LIVE`].
    pub state: u64,
    /// `module.list`: the node on the kernel's `modules` list.
    pub list: u64,
    /// `module.name`, the NUL-terminated name.
    pub name: u64,
    /// Bytes of `module.name`, NUL included; longer names are refused.
    pub name_len: u64,
    /// `module.num_exentries`: entries in the patch's exception table.
    pub num_exentries: u64,
    /// `module.extable`: that table, as `search_module_extables` finds it.
    pub extable: u64,
    /// Where the module's text range is described (the layout changed in 6.4).
    pub memory: Memory,
    /// In `struct mod_tree_node`: `mod`, and the `latch_tree_node`.
    pub mtn_mod: u64,
    /// `mod_tree_node.node`: one `rb_node` per copy of the latch tree.
    pub mtn_node: u64,
    /// `module.arch.num_orcs`; `None` on a kernel without the ORC unwinder.
    pub num_orcs: Option<u64>,
    /// `module.arch.orc_unwind_ip`; `None` without ORC.
    pub orc_unwind_ip: Option<u64>,
    /// `module.arch.orc_unwind`; `None` without ORC.
    pub orc_unwind: Option<u64>,
    /// `module.taints`, written with [`TAINT_LIVEPATCH`] set.
    pub taints: u64,
    /// `module.num_bugs`: entries in the patch's bug table.
    pub num_bugs: u64,
    /// `module.bug_list`: the node on `module_bug_list`; an empty list when the
    /// patch has no bug table.
    pub bug_list: u64,
    /// `module.bug_table`: the patch's `struct bug_entry`s, for
    /// `module_find_bug`.
    pub bug_table: u64,
    /// `module.kallsyms`: the pointer `%pS` and `/proc/kallsyms` follow, aimed
    /// at `core_kallsyms`.
    pub kallsyms: u64,
    /// `module.core_kallsyms`: the `struct mod_kallsyms` inside the module.
    pub core_kallsyms: u64,
    /// In `struct mod_kallsyms`.
    pub ks_symtab: u64,
    /// `num_symtab`: symbols, the leading null symbol included.
    pub ks_num_symtab: u64,
    /// `strtab`: the symbols' names.
    pub ks_strtab: u64,
    /// `typetab`: one kallsyms type letter per symbol.
    pub ks_typetab: u64,
    /// `module.klp`, set to mark a livepatch module; `None` without
    /// CONFIG_LIVEPATCH.
    pub klp: Option<u64>,
    /// `module.source_list` (modules using this one), written empty.
    pub source_list: u64,
    /// `module.target_list` (modules this one uses), written empty.
    pub target_list: u64,
    /// `module.refcnt`: held once, as klp holds an enabled patch's module, so
    /// `rmmod` in the guest answers "in use"; removal refuses if anyone else
    /// holds it.
    pub refcnt: u64,
    /// `jump_entries` and `num_jump_entries` (CONFIG_JUMP_LABEL).
    pub jump_entries: Option<u64>,
    /// Their count (the patch's static-key sites).
    pub num_jump_entries: Option<u64>,
    /// `module.percpu` and `module.percpu_size` (CONFIG_SMP): the
    /// patch's per-CPU block, as `percpu_modalloc` records it.
    pub percpu: Option<(u64, u64)>,
    /// `param_lock.wait_list`: an empty list must point at itself.
    pub param_wait_list: Option<u64>,
    /// In `struct mod_tree_root`: the latch's sequence, its two trees'
    /// root pointers, and the address bounds.
    pub root_seq: u64,
    /// The two copies' root pointers, at `latch_tree_root.tree[0]` and `[1]`.
    pub root_tree: [u64; 2],
    /// `mod_tree_root.addr_min`: the lowest module address, which the kernel
    /// checks before it searches the tree.
    pub addr_min: u64,
    /// `mod_tree_root.addr_max`: the highest.
    pub addr_max: u64,
    /// `struct orc_entry` (6 on every kernel so far).
    pub orc_entry: u64,
    /// Offsets of every range struct that has a tree node (core and init
    /// layout, or each `mem[]` entry), the first `ranges` of them.
    pub range_at: [u64; MAX_RANGES],
    /// How many entries of `range_at` are in use.
    pub ranges: usize,
}

/// More than `MOD_MEM_NUM_TYPES` (7 in 6.4 to 6.12).
pub const MAX_RANGES: usize = 16;

fn off(btf: &Btf, path: &str) -> Result<u64, RegisterError> {
    btf.offset_of(path).map_err(|source| RegisterError::Layout {
        path: path.to_owned(),
        source,
    })
}

fn opt(btf: &Btf, path: &str) -> Option<u64> {
    btf.offset_of(path).ok()
}

fn size(btf: &Btf, name: &str) -> Result<u64, RegisterError> {
    btf.struct_size(name)
        .map_err(|source| RegisterError::Layout {
            path: name.to_owned(),
            source,
        })
}

impl ModuleLayout {
    /// Reads every offset from the guest's BTF; refuses a kernel whose
    /// structures differ from what registration writes (naming the member or
    /// the fact).
    pub fn from_btf(btf: &Btf) -> Result<Self, RegisterError> {
        let memory = if let Ok(at) = btf.offset_of("module.core_layout") {
            Memory::Layout {
                at,
                size: off(btf, "module_layout.size")?,
                text_size: off(btf, "module_layout.text_size")?,
                ro_size: off(btf, "module_layout.ro_size")?,
                ro_after_init_size: off(btf, "module_layout.ro_after_init_size")?,
                mtn: off(btf, "module_layout.mtn")?,
            }
        } else {
            Memory::Mem {
                at: off(btf, "module.mem")?,
                stride: size(btf, "module_memory")?,
                size: off(btf, "module_memory.size")?,
                mtn: off(btf, "module_memory.mtn")?,
            }
        };
        if off(btf, "module_layout.base").unwrap_or(0) != 0
            || opt(btf, "module_memory.base").unwrap_or(0) != 0
        {
            return Err(RegisterError::Unexpected(
                "the module range's `base` is not its first member",
            ));
        }
        let name_len = btf
            .field("module.name")
            .map_err(|source| RegisterError::Layout {
                path: "module.name".into(),
                source,
            })?
            .size
            .ok_or(RegisterError::Unexpected("module.name has no size"))?;
        let tree = off(btf, "latch_tree_root.tree")?;
        let mut range_at = [0u64; MAX_RANGES];
        let ranges = match memory {
            Memory::Layout { at, .. } => {
                range_at[0] = at;
                range_at[1] = off(btf, "module.init_layout")?;
                2
            }
            Memory::Mem { at, stride, .. } => {
                let total = btf
                    .field("module.mem")
                    .ok()
                    .and_then(|f| f.size)
                    .ok_or(RegisterError::Unexpected("module.mem has no size"))?;
                let n = usize::try_from(total / stride.max(1)).unwrap_or(usize::MAX);
                if n == 0 || n > MAX_RANGES {
                    return Err(RegisterError::Unexpected(
                        "module.mem has an unexpected length",
                    ));
                }
                for (i, r) in range_at.iter_mut().enumerate().take(n) {
                    *r = at + i as u64 * stride;
                }
                n
            }
        };
        let layout = Self {
            size: size(btf, "module")?,
            state: off(btf, "module.state")?,
            list: off(btf, "module.list")?,
            name: off(btf, "module.name")?,
            name_len,
            num_exentries: off(btf, "module.num_exentries")?,
            extable: off(btf, "module.extable")?,
            memory,
            mtn_mod: off(btf, "mod_tree_node.mod")?,
            mtn_node: off(btf, "mod_tree_node.node")?,
            num_orcs: opt(btf, "module.arch.num_orcs"),
            orc_unwind_ip: opt(btf, "module.arch.orc_unwind_ip"),
            orc_unwind: opt(btf, "module.arch.orc_unwind"),
            taints: off(btf, "module.taints")?,
            num_bugs: off(btf, "module.num_bugs")?,
            bug_list: off(btf, "module.bug_list")?,
            bug_table: off(btf, "module.bug_table")?,
            kallsyms: off(btf, "module.kallsyms")?,
            core_kallsyms: off(btf, "module.core_kallsyms")?,
            ks_symtab: off(btf, "mod_kallsyms.symtab")?,
            ks_num_symtab: off(btf, "mod_kallsyms.num_symtab")?,
            ks_strtab: off(btf, "mod_kallsyms.strtab")?,
            ks_typetab: off(btf, "mod_kallsyms.typetab")?,
            klp: opt(btf, "module.klp"),
            source_list: off(btf, "module.source_list")?,
            target_list: off(btf, "module.target_list")?,
            refcnt: off(btf, "module.refcnt")?,
            jump_entries: opt(btf, "module.jump_entries"),
            num_jump_entries: opt(btf, "module.num_jump_entries"),
            percpu: opt(btf, "module.percpu").zip(opt(btf, "module.percpu_size")),
            param_wait_list: opt(btf, "module.param_lock")
                .zip(opt(btf, "mutex.wait_list"))
                .map(|(a, b)| a + b),
            root_seq: off(btf, "mod_tree_root.root")? + off(btf, "latch_tree_root.seq")?,
            root_tree: [
                off(btf, "mod_tree_root.root")? + tree,
                off(btf, "mod_tree_root.root")? + tree + 8,
            ],
            addr_min: off(btf, "mod_tree_root.addr_min")?,
            addr_max: off(btf, "mod_tree_root.addr_max")?,
            orc_entry: btf.struct_size("orc_entry").unwrap_or(6),
            range_at,
            ranges,
        };
        let rb = size(btf, "rb_node")?;
        if rb != RB_NODE || size(btf, "latch_tree_node")? != 2 * RB_NODE {
            return Err(RegisterError::Unexpected(
                "struct rb_node is not 24 bytes or latch_tree_node not two of them",
            ));
        }
        if layout.orc_entry != 6 {
            return Err(RegisterError::Unexpected("struct orc_entry is not 6 bytes"));
        }
        Ok(layout)
    }
}
