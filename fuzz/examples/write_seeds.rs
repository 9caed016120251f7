//! Writes the generated part of the seed corpus (fuzz/seeds/): kallsyms
//! tables, page tables, a small kernel for the task walk, API bodies. The
//! module and BTF seeds come from C through seeds-src/build instead.
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --example write_seeds
//!
//! Each seed is checked to get past the first checks of its target (it
//! decodes, translates, lists tasks, unwinds), so the fuzzer starts deep.

use std::path::{Path, PathBuf};

use klpvisor_fuzz::tasks_window::*;
use klpvisor_fuzz::{kallsyms, kernel_tables, PhysGuest, Window, STEXT, WINDOW};
use klpvisor_api::{PatchesReply, Regs, RegsReply};
use klpvisor_guest::kallsyms::{Image, Layout, Symbol, MAX_DECODED_BYTES};
use klpvisor_guest::tasks::{TaskLayout, TaskSymbols, ThreadLinks, THREAD_SIZE};
use klpvisor_guest::{AddressSpace, Kallsyms, PageTables, Tasks, VirtRead};
use klpvisor_guest::orc::Orc;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn seeds() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds")
}

fn write(target: &str, name: &str, bytes: &[u8]) -> Result<()> {
    let dir = seeds().join(target);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(name), bytes)?;
    println!("{target}/{name}: {} bytes", bytes.len());
    Ok(())
}

fn kallsyms_seeds() -> Result<()> {
    for (name, layout, seqs) in [
        ("tables-6.1", Layout::OffsetsFirst, false),
        ("tables-6.3", Layout::OffsetsFirst, true),
        ("tables-6.4", Layout::OffsetsAfterTokenIndex, false),
    ] {
        let mut b = klpvisor_guest::kallsyms::synth::Builder::new(
            layout,
            klpvisor_fuzz::kernel_symbols(),
        );
        b.seqs = seqs;
        let bytes = b.build();
        let k = Kallsyms::from_image(Image {
            base: WINDOW,
            bytes: &bytes,
        })?;
        assert_eq!(k.len(), klpvisor_fuzz::kernel_symbols().len());
        write("kallsyms", name, &bytes)?;
    }
    long_token_seeds()
}

/// Tables whose names expand through a 1000-byte token (`~`), so the
/// fuzzer starts at the decoder's expansion limits rather than 4 KiB
/// below them: "long-tokens" has a name of exactly the longest expansion
/// allowed, "names-at-limit" as many one-token names as the decoded total
/// allows (about 300 KiB of table for 32 MiB decoded; its size also sets
/// libFuzzer's input size limit for the target).
fn long_token_seeds() -> Result<()> {
    const TOKEN: usize = 1000;
    let record = std::mem::size_of::<Symbol>();
    let base = klpvisor_fuzz::kernel_symbols();
    let top = base.iter().map(|s| s.2).max().unwrap_or(WINDOW);
    // Distinct names ("~" and three letters), as a kernel's mostly are.
    let at_limit = MAX_DECODED_BYTES / (record + TOKEN + 3) - base.len();
    let letters = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let distinct = |i: usize| -> String {
        let l = |d: usize| char::from(letters[d % letters.len()]);
        let n = letters.len();
        format!("~{}{}{}", l(i / (n * n)), l(i / n), l(i))
    };
    for (name, extra) in [
        // Type letter, 1000 bytes and 23 more: 1024, the limit.
        (
            "long-tokens",
            vec!["~".to_string(), format!("~{}", "x".repeat(23))],
        ),
        ("names-at-limit", (0..at_limit).map(distinct).collect()),
    ] {
        let mut syms = base.clone();
        syms.extend(
            extra
                .into_iter()
                .zip(1u64..)
                .map(|(n, i)| ('t', n, top + i * 16)),
        );
        let mut b = klpvisor_guest::kallsyms::synth::Builder::new(
            Layout::OffsetsAfterTokenIndex,
            syms.clone(),
        );
        b.token_overrides = vec![(b'~', vec![b'a'; TOKEN])];
        let bytes = b.build();
        let k = Kallsyms::from_image(Image {
            base: WINDOW,
            bytes: &bytes,
        })?;
        assert_eq!(k.len(), syms.len());
        let decoded = k.len() * record + k.symbols().iter().map(|s| s.name.len()).sum::<usize>();
        assert!(decoded <= MAX_DECODED_BYTES);
        println!(
            "kallsyms/{name}: {} symbols, {decoded} bytes decoded",
            k.len()
        );
        write("kallsyms", name, &bytes)?;
    }
    Ok(())
}

const P: u64 = 1;
const W: u64 = 2;
const LARGE: u64 = 0x80;
const NX: u64 = 1 << 63;

/// Page tables in 3 pages of guest-physical memory, sharing pages between
/// levels: 0xffffffff81000000 -> a 4 KiB page at 0x2000, the next 4 KiB
/// read-only and executable, 0xffffffff81200000 -> a 2 MiB page at 0,
/// 0xffffffffc0000000 -> a 1 GiB page at 0. With 5 levels the root's
/// last entry points back at itself.
fn page_tables() -> Vec<u8> {
    let mut m = vec![0u8; 0x2010];
    let mut put = |gpa: usize, v: u64| m[gpa..gpa + 8].copy_from_slice(&v.to_le_bytes());
    put(0xff8, 0x1000 | P | W); // PML4[511] -> PDPT (page 1); PML5[511] -> page 1
    put(0x1ff0, P | W); // PDPT[510] -> PD (page 0)
    put(0x1ff8, P | W | LARGE); // PDPT[511]: 1 GiB at 0
    put(0x40, 0x1000 | P | W); // PD[8] -> PT (page 1)
    put(0x48, P | W | LARGE | NX); // PD[9]: 2 MiB at 0
    put(0x1000, 0x2000 | P | W | NX); // PT[0] -> data
    put(0x1008, 0x2000 | P); // PT[1] -> data, read-only, executable
    m[0x2000..0x2010].copy_from_slice(b"klpvisor paging!");
    m
}

fn paging_seeds() -> Result<()> {
    let mem = page_tables();
    for (name, five, va, len, pages) in [
        ("4level-4k", false, 0xffff_ffff_8100_0000u64, 16u16, 1024u16),
        ("4level-cross", false, 0xffff_ffff_8100_0ff8, 16, 2),
        ("4level-1g", false, 0xffff_ffff_c000_0010, 64, 16),
        ("5level", true, 0xffff_ffff_8100_0000, 16, 1024),
    ] {
        let guest = PhysGuest(&mem);
        let space = AddressSpace::new(&guest, PageTables::new(0, five));
        if !five {
            space.translate(va)?;
        }
        let mut s = Vec::new();
        s.extend_from_slice(&0u64.to_le_bytes());
        s.push(u8::from(five));
        s.extend_from_slice(&va.to_le_bytes());
        s.extend_from_slice(&len.to_le_bytes());
        s.extend_from_slice(&pages.to_le_bytes());
        s.extend_from_slice(&[0; 3]);
        s.extend_from_slice(&mem);
        write("paging", name, &s)?;
    }
    Ok(())
}

/// Builds the tasks target's window: see fuzz_targets/tasks.rs for the
/// header, and tasks.rs's unit tests for the same kernel unrelocated.
struct Kernel(Vec<u8>);

impl Kernel {
    fn put(&mut self, va: u64, b: &[u8]) {
        let o = (va - WINDOW) as usize;
        self.0[o..o + b.len()].copy_from_slice(b);
    }
    fn put64(&mut self, va: u64, v: u64) {
        self.put(va, &v.to_le_bytes());
    }
    fn put32(&mut self, va: u64, v: u32) {
        self.put(va, &v.to_le_bytes());
    }
}

const TASK_A: u64 = WINDOW + 0x400;
const TASK_B: u64 = WINDOW + 0x600;
const IDLE1: u64 = WINDOW + 0x800;
const SIG: u64 = WINDOW + 0xa00;
const PCPU: [u64; 2] = [WINDOW + 0xc00, WINDOW + 0xe00];
const PT_REGS_SIZE: u64 = 21 * 8;
const FRAME_SIZE: u64 = 7 * 8;

fn tasks_kernel() -> Kernel {
    let mut k = Kernel(vec![0; 0x2000]);
    let init = WINDOW + INIT_TASK;
    let top = |i: u64| WINDOW + 0x1400 + i * 0x400;
    // Header: flags; vCPU 0 in user mode on CPU 0; vCPU 1 in the kernel
    // on CPU 1 running B, at cmdline_proc_show+0x10; two changed spans.
    let header = [
        0,
        0,
        PCPU[0],
        0,
        0,
        0x33,
        PCPU[1],
        0,
        STEXT + 0x2010,
        top(2) - 0x100,
        0x10,
        STEXT + 0x2000,
        STEXT + 0x2100,
        STEXT + 0x1000,
        STEXT + 0x1100,
    ];
    for (i, v) in header.iter().enumerate() {
        k.put64(WINDOW + 8 * i as u64, *v);
    }
    k.put64(WINDOW + PER_CPU_OFFSET, PCPU[0]);
    k.put64(WINDOW + PER_CPU_OFFSET + 8, PCPU[1]);
    k.put32(WINDOW + NR_CPU_IDS, 2);
    k.put64(WINDOW + CPU_POSSIBLE_MASK, 0b11);
    for (i, (at, pid, tgid, comm)) in [
        (init, 0, 0, "swapper/0"),
        (TASK_A, 100, 100, "leader"),
        (TASK_B, 101, 100, "worker"),
        (IDLE1, 0, 0, "swapper/1"),
    ]
    .into_iter()
    .enumerate()
    {
        k.put32(at + 0x20, pid);
        k.put32(at + 0x24, tgid);
        k.put(at + 0x30, comm.as_bytes());
        k.put64(at + 0x48, top(i as u64) - 0x4000);
        k.put64(at + 0x1f8, top(i as u64) - 0x100);
    }
    // init_task.tasks <-> A.tasks
    k.put64(init + 0x10, TASK_A + 0x10);
    k.put64(TASK_A + 0x10, init + 0x10);
    // signal->thread_head -> A.thread_node -> B.thread_node -> head, and
    // the thread_group ring A <-> B for the other layout (flags bit 0).
    k.put64(TASK_A + 0x50, SIG);
    k.put64(TASK_B + 0x50, SIG);
    k.put64(SIG + 8, TASK_A + 0x60);
    k.put64(TASK_A + 0x60, TASK_B + 0x60);
    k.put64(TASK_B + 0x60, SIG + 8);
    k.put64(TASK_A + 0x70, TASK_B + 0x70);
    k.put64(TASK_B + 0x70, TASK_A + 0x70);
    // Per-CPU: runqueues.idle at 0x80 + 0x18, current_task at 0x40,
    // hardirq_stack_ptr at 0x50 (CPU 0 only).
    for (i, base) in PCPU.iter().enumerate() {
        k.put64(base + 0x98, if i == 0 { init } else { IDLE1 });
        k.put64(base + 0x40, if i == 0 { init } else { TASK_B });
    }
    k.put64(PCPU[0] + 0x50, WINDOW + 0x1ff8);
    k.put32(TASK_B + 0x40, 1); // on_cpu
    k.put32(TASK_A, 1); // TASK_INTERRUPTIBLE
                        // B's stack holds dup_fn+0x10 just above its RSP.
    k.put64(top(2) - 0x100 + 8, STEXT + 0x1010);

    // ORC: entry i covers STEXT + i * 0x1000. Most are `CALL, sp = sp + 8`;
    // 3 is the end-of-stack hint; 4..7 other rules for the fuzzer to vary.
    for i in 0..ORC_ENTRIES {
        let slot = WINDOW + ORC_IP + 4 * i;
        let ip = STEXT + i * 0x1000;
        k.put32(slot, ip.wrapping_sub(slot) as u32);
        let (sp_offset, bp_offset, flags): (i16, i16, u16) = match i {
            3 => (0, 0, 1 << 10),
            4 => (0, 0, 5 | 1 << 8),    // REGS at sp
            5 => (16, 0, 5 | 2 << 8),   // REGS_PARTIAL
            6 => (16, -16, 4 | 1 << 4), // bp-based, bp from prev_sp
            7 => (8, 0, 9),             // SP_INDIRECT
            _ => (8, 0, 5),
        };
        let e = WINDOW + ORC_UNWIND + 6 * i;
        k.put(e, &sp_offset.to_le_bytes());
        k.put(e + 2, &bp_offset.to_le_bytes());
        k.put(e + 4, &flags.to_le_bytes());
    }
    // A sleeps in cmdline_proc_show+0x20, called from seq_printf+0x20,
    // whose frame ends the stack: unwinds reliably in two frames.
    let f = top(1) - PT_REGS_SIZE - 8 - FRAME_SIZE;
    k.put64(TASK_A + 0x1f8, f);
    k.put64(f + 48, STEXT + 0x2020);
    k.put64(f + FRAME_SIZE, STEXT + 0x3020);
    k
}

fn tasks_seeds() -> Result<()> {
    let k = tasks_kernel();
    let mem = Window {
        base: WINDOW,
        bytes: &k.0,
    };
    let layout = TaskLayout {
        size: 0x200,
        tasks: 0x10,
        pid: 0x20,
        tgid: 0x24,
        comm: 0x30,
        state: 0x00,
        exit_state: 0x28,
        flags: 0x2c,
        on_cpu: 0x40,
        stack: 0x48,
        thread_sp: 0x1f8,
        signal: 0x50,
        threads: ThreadLinks::SignalThreadHead {
            thread_head: 0x08,
            thread_node: 0x60,
        },
        rq_idle: 0x18,
        thread_size: THREAD_SIZE,
    };
    let symbols = TaskSymbols {
        init_task: WINDOW + INIT_TASK,
        per_cpu_offset: WINDOW + PER_CPU_OFFSET,
        nr_cpu_ids: WINDOW + NR_CPU_IDS,
        cpu_possible_mask: None,
        runqueues: 0x80,
        current_task: 0x40,
    };
    let tasks = Tasks::new(layout, symbols).list(&mem, &[])?;
    assert_eq!(tasks.len(), 4);
    let orc = Orc::load(&mem, kallsyms(), Some("6.1.0"))?;
    let frames = orc.unwind_sleeping(&mem, &tasks[2])?;
    assert_eq!(frames, [STEXT + 0x2020, STEXT + 0x3020]);
    assert!(mem.read_u64(WINDOW).is_ok());
    write("tasks", "two-cpus", &k.0)?;
    let mut ring = k;
    ring.put64(WINDOW, 0b11); // thread_group ring, cpu_possible_mask
    write("tasks", "thread-group", &ring.0)?;
    Ok(())
}

fn api_seeds() -> Result<()> {
    let regs = serde_json::to_string(&RegsReply {
        vcpu: 1,
        paused_for_read: true,
        out_of_guest_us: Some(12.5),
        regs: Regs::default(),
    })?;
    let patches = serde_json::to_string(&PatchesReply::default())?;
    let seeds: [(&str, u8, &str); 14] = [
        ("state-change", 0, r#"{"state":"paused"}"#),
        ("error", 1, r#"{"error":"no route GET /x"}"#),
        ("pause", 4, r#"{"state":"paused","latency_us":81.25}"#),
        (
            "resume",
            5,
            r#"{"state":"running","out_of_guest_us":1.5e3}"#,
        ),
        ("regs", 6, &regs),
        (
            "memory",
            7,
            r#"{"gpa":"0x1000","va":"0xffffffff81000000","len":2,"bytes":"0f1f"}"#,
        ),
        (
            "symbols",
            8,
            r#"{"name":"dup_fn","symbols":[{"addr":"0xffffffff81001000","sympos":1,"type":"t","per_cpu":false}]}"#,
        ),
        (
            "addr",
            9,
            r#"{"addr":"0xffffffff81002010","name":"cmdline_proc_show","offset":"0x10","symbol_addr":"0xffffffff81002000","type":"T","sympos":1}"#,
        ),
        (
            "tasks",
            10,
            r#"{"count":0,"out_of_guest_us":null,"tasks":[]}"#,
        ),
        ("patches", 11, &patches),
        ("hex", 15, r#""0xFFFFffff81000000""#),
        ("query-transition", 16, "force=true&timeout_ms=5000"),
        ("query-memory", 16, "va=0xffffffff81000000&len=64&x=%41%zz+"),
        ("parse-hex", 17, "0X1f"),
    ];
    for (name, which, text) in seeds {
        let mut b = vec![which];
        b.extend_from_slice(text.as_bytes());
        write("api", name, &b)?;
    }
    Ok(())
}

/// The module seed (from seeds-src/build) parses with the fixed BTF and
/// links against the fixed kernel: the target starts past both.
fn check_module_seed() -> Result<()> {
    let ko = std::fs::read(seeds().join("module/livepatch.ko"))?;
    let m = klpvisor_engine::module::Module::parse(&ko, klpvisor_fuzz::klp_btf(), klpvisor_fuzz::RELEASE)?;
    let text = klpvisor_fuzz::END.next_multiple_of(2 << 20);
    let l = m.layout();
    let bases = klpvisor_engine::link::Bases {
        text,
        rodata: text + l.text,
        data: text + l.text + l.rodata,
    };
    let options = klpvisor_engine::link::LinkOptions {
        return_thunk: kallsyms().addr("__x86_return_thunk").ok(),
        plain_returns: false,
        // The seed module has no .altinstructions.
        alternatives: None,
    };
    let linked = klpvisor_engine::link::link(&m, kallsyms(), bases, &options)?;
    println!(
        "module/livepatch.ko: {} funcs, {} fentry nops, links",
        linked.funcs.len(),
        linked.fentry_nops.len()
    );
    Ok(())
}

fn main() -> Result<()> {
    // The fixed kernel's own tables must decode, or every target is moot.
    let _ = kernel_tables(Layout::OffsetsFirst);
    let _ = kallsyms();
    kallsyms_seeds()?;
    paging_seeds()?;
    tasks_seeds()?;
    api_seeds()?;
    check_module_seed()?;
    Ok(())
}
