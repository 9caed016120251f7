//! The BTF reader over arbitrary bytes, then the lookups the engine makes
//! (struct sizes, member offsets through nested and anonymous members).
#![no_main]

use klpvisor_guest::Btf;
use libfuzzer_sys::fuzz_target;

/// Paths the engine looks up (tasks, klp structures, uts_namespace) and
/// the seeds' own, so lookups reach deep into valid inputs.
const PATHS: &[&str] = &[
    "task_struct.thread.sp",
    "task_struct.comm",
    "task_struct.__state",
    "task_struct.pid",
    "task_struct.flag_bit",
    "task_struct.u_b",
    "signal_struct.thread_head",
    "rq.idle",
    "pcpu_hot.current_task",
    "uts_namespace.name.release",
    "klp_patch.objs",
    "klp_patch.replace",
    "klp_object.callbacks.post_patch",
    "klp_func.old_sympos",
    "klp_state.version",
    "module.name",
    "a.b.c.d.e.f.g.h",
    "",
    ".",
];

/// Type ids sized per input.
const MAX_IDS: u32 = 256;

fuzz_target!(|data: &[u8]| {
    let Ok(btf) = Btf::parse(data) else {
        return;
    };
    for path in PATHS {
        if let Ok(f) = btf.field(path) {
            // A byte offset is the bit offset of a byte-aligned non-bitfield.
            if let Some(b) = f.byte_offset() {
                assert_eq!(b * 8, f.bit_offset);
            }
        }
        let _ = btf.offset_of(path);
        let ty = path.split('.').next().unwrap_or_default();
        let _ = btf.struct_size(ty);
        let _ = btf.has_type(ty);
    }
    let n = u32::try_from(btf.type_count()).unwrap_or(u32::MAX);
    for id in 0..n.min(MAX_IDS).saturating_add(2) {
        let _ = btf.size_of_type(id);
    }
});
