//! Writes the generated part of the seed corpus (fuzz/seeds/): kallsyms
//! tables, page tables, a small kernel for the task walk, API bodies. The
//! module and BTF seeds come from C through seeds-src/build instead.
//!
//!     cargo run --manifest-path fuzz/Cargo.toml --example write_seeds
//!
//! Each seed is checked to get past the first checks of its target (it
//! decodes, translates, lists tasks, unwinds), so the fuzzer starts deep.

use std::path::{Path, PathBuf};

use klpvisor_api::{PatchesReply, Regs, RegsReply};
use klpvisor_fuzz::tasks_window::*;
use klpvisor_fuzz::{kallsyms, kernel_tables, PhysGuest, Window, STEXT, WINDOW};
use klpvisor_guest::kallsyms::{Image, Layout, Symbol, MAX_DECODED_BYTES};
use klpvisor_guest::orc::Orc;
use klpvisor_guest::tasks::{TaskLayout, TaskSymbols, ThreadLinks, THREAD_SIZE};
use klpvisor_guest::{AddressSpace, Kallsyms, PageTables, Tasks, VirtRead};

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
        let mut b =
            klpvisor_guest::kallsyms::synth::Builder::new(layout, klpvisor_fuzz::kernel_symbols());
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
        nvcsw: 0x80,
        nivcsw: 0x88,
        start_time: 0x90,
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
    let m = klpvisor_engine::module::Module::parse(
        &ko,
        klpvisor_fuzz::klp_btf(),
        klpvisor_fuzz::RELEASE,
    )?;
    let text = klpvisor_fuzz::END.next_multiple_of(2 << 20);
    let l = m.layout();
    let bases = klpvisor_engine::link::Bases {
        text,
        rodata: text + l.text,
        data: text + l.text + l.rodata,
        percpu: 0x3_1000,
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

/// Signed modules: the seed module signed (trailer version 2, at a
/// level), with a version 1 trailer, over the kernel's own signature, and
/// the kernel's alone; each checked the way the target checks it.
fn signature_seeds() -> Result<()> {
    use ed25519_dalek::{Signer, SigningKey};
    use klpvisor_engine::signature::{
        sign_level, Policy, TrustedKeys, DOMAIN, KERNEL_MAGIC, MAGIC,
    };
    let ko = std::fs::read(seeds().join("module/livepatch.ko"))?;
    let key = klpvisor_fuzz::signing_key();
    let trusting = Policy::RequireSigned(TrustedKeys::from_keys([(key.public(), "k".into())]));
    let v2 = sign_level(&ko, &key, 3)?;
    assert_eq!(trusting.check(&v2)?.provenance.verified_level(), Some(3));
    // Version 1: the same layout, version byte 1, no level.
    let mut header = vec![1u8, 1, 0, 0];
    header.extend_from_slice(&key.id().0);
    let mut message = DOMAIN.to_vec();
    message.extend_from_slice(&header);
    message.extend_from_slice(&ko);
    let signature = SigningKey::from_bytes(&[0x5a; 32]).sign(&message);
    let mut v1 = ko.clone();
    v1.extend_from_slice(&header);
    v1.extend_from_slice(&signature.to_bytes());
    v1.extend_from_slice(MAGIC);
    assert_eq!(trusting.check(&v1)?.provenance.verified_level(), Some(0));
    // The kernel's layout: PKCS#7 blob, struct module_signature, magic.
    let mut kernel = ko.clone();
    kernel.extend_from_slice(&[0x30; 64]);
    kernel.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0]);
    kernel.extend_from_slice(&64u32.to_be_bytes());
    kernel.extend_from_slice(KERNEL_MAGIC);
    assert!(Policy::AcceptUnsigned.check(&kernel).is_ok());
    let both = sign_level(&kernel, &key, 0xffff)?;
    assert_eq!(trusting.check(&both)?.module, &ko[..]);
    write("signature", "signed-v2", &v2)?;
    write("signature", "signed-v1", &v1)?;
    write("signature", "kernel-signed", &kernel)?;
    write("signature", "kernel-and-ours", &both)?;
    write("signature", "magic-only", MAGIC)?;
    Ok(())
}

/// Request heads as a client sends them, in reads: each a length byte
/// (0 for 1 KiB) and the bytes (see fuzz_targets/http_head.rs).
fn http_head_seeds() -> Result<()> {
    fn reads(chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for c in chunks {
            for piece in c.chunks(255) {
                out.push(piece.len() as u8);
                out.extend_from_slice(piece);
            }
        }
        out
    }
    let get = b"GET /vm HTTP/1.1\r\nHost: localhost\r\nUser-Agent: patcher\r\n\r\n";
    write("http_head", "get", &reads(&[get]))?;
    write(
        "http_head",
        "split-blank-line",
        &reads(&[b"GET /patches HTTP/1.1\r\nHost: x\r\n\r", b"\n"]),
    )?;
    write(
        "http_head",
        "patch-with-body",
        &reads(&[
            b"PATCH /vm HTTP/1.1\r\nContent-Type: application/json\r\n",
            b"Content-Length: 18\r\n\r\n{\"state\":\"paused\"}",
        ]),
    )?;
    write(
        "http_head",
        "tls-hello",
        &reads(&[b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"]),
    )?;
    let bytewise: Vec<&[u8]> = get.chunks(1).collect();
    write("http_head", "byte-by-byte", &reads(&bytewise))?;
    // Past the head limit without a blank line, in 1 KiB reads.
    let mut big = Vec::new();
    for _ in 0..(klpvisor_api::head::MAX_HEAD_BYTES / 1024 + 2) {
        big.push(0u8);
        big.extend_from_slice(&[b'a'; 1024]);
    }
    write("http_head", "oversized", &big)?;
    Ok(())
}

/// The ftrace target's input: header, then the list at
/// `FTRACE_PAGES_START` (see fuzz_targets/ftrace.rs).
fn ftrace_seeds() -> Result<()> {
    use klpvisor_engine::site::{FtraceRecords, FTRACE_FL_DISABLED};
    use klpvisor_fuzz::{ftrace_kallsyms, FtraceLayout, ETEXT, FTRACE_PAGES_START};
    let module = 0xffff_ffff_c000_0000u64;
    for (name, l, extra) in [
        ("v6.1", FtraceLayout::V6_1, [0u64; 4]),
        (
            "arch-field-and-module",
            FtraceLayout {
                rec_size: 24,
                ..FtraceLayout::V6_1
            },
            [module, module + 0x1000, 0, 0],
        ),
    ] {
        let mut k = Kernel(vec![0; 0x400]);
        for (i, v) in [
            l.page_size,
            l.next,
            l.records,
            l.index,
            l.rec_size,
            l.ip,
            l.flags,
        ]
        .into_iter()
        .enumerate()
        {
            k.put(WINDOW + 2 * i as u64, &(v as u16).to_le_bytes());
        }
        for (i, v) in extra.iter().enumerate() {
            k.put64(WINDOW + 16 + 8 * i as u64, *v);
        }
        let (page_a, page_b) = (WINDOW + 0x100, WINDOW + 0x140);
        let (recs_a, recs_b) = (WINDOW + 0x200, WINDOW + 0x300);
        k.put64(FTRACE_PAGES_START, page_a);
        for (page, next, recs, n) in [(page_a, page_b, recs_a, 3u32), (page_b, 0, recs_b, 2)] {
            k.put64(page + u64::from(l.next), next);
            k.put64(page + u64::from(l.records), recs);
            k.put32(page + u64::from(l.index), n);
        }
        let size = u64::from(l.rec_size);
        for (i, (ip, flags)) in [
            (STEXT + 0x1000, 0),
            (STEXT + 0x2000, 1u64 << 31),
            (STEXT + 0x3000, FTRACE_FL_DISABLED),
        ]
        .into_iter()
        .enumerate()
        {
            k.put64(recs_a + i as u64 * size + u64::from(l.ip), ip);
            k.put64(recs_a + i as u64 * size + u64::from(l.flags), flags);
        }
        for (i, ip) in [module + 0x10, ETEXT + 0x10].into_iter().enumerate() {
            k.put64(recs_b + i as u64 * size + u64::from(l.ip), ip);
        }
        let btf = l.btf().ok_or("ftrace BTF")?;
        let mem = Window {
            base: WINDOW,
            bytes: &k.0,
        };
        let ranges = [extra[0]..extra[1], extra[2]..extra[3]];
        let r = FtraceRecords::load_in(&mem, ftrace_kallsyms(), &btf, &ranges)?;
        assert_eq!(r.len(), if extra[0] != 0 { 3 } else { 2 }, "{name}");
        write("ftrace", name, &k.0)?;
    }
    Ok(())
}

/// BTF with the gate's structs as 6.1 and 6.12 lay them out.
fn gate_seeds() -> Result<()> {
    use klpvisor_engine::callback::gate::Layout;
    use klpvisor_guest::btf::synth::BtfBuilder;
    for (name, irq_size, func_at, with_irqwait) in
        [("v6.1", 32u32, 16u32, true), ("no-irqwait", 24, 16, false)]
    {
        let mut b = BtfBuilder::new();
        let ulong = b.int("long unsigned int", 8);
        let uint = b.int("unsigned int", 4);
        let ushort = b.int("short unsigned int", 2);
        let list = b.composite(
            false,
            "list_head",
            16,
            &[("next", ulong, 0, 0), ("prev", ulong, 64, 0)],
        );
        let llist = b.composite(false, "llist_node", 8, &[("next", ulong, 0, 0)]);
        let flags = b.composite(
            true,
            "",
            4,
            &[("u_flags", uint, 0, 0), ("a_flags", uint, 0, 0)],
        );
        let node = b.composite(
            false,
            "__call_single_node",
            16,
            &[
                ("llist", llist, 0, 0),
                ("", flags, 64, 0),
                ("src", ushort, 96, 0),
                ("dst", ushort, 112, 0),
            ],
        );
        let mut members = vec![("node", node, 0, 0), ("func", ulong, func_at * 8, 0)];
        if with_irqwait {
            members.push(("irqwait", ulong, 192, 0));
        }
        b.composite(false, "irq_work", irq_size, &members);
        b.composite(
            false,
            "work_struct",
            32,
            &[
                ("data", ulong, 0, 0),
                ("entry", list, 64, 0),
                ("func", ulong, 192, 0),
            ],
        );
        let bytes = b.build();
        Layout::from_btf(&klpvisor_guest::Btf::parse(&bytes)?)?;
        write("gate", name, &bytes)?;
    }
    Ok(())
}

/// Writes little-endian u64s into a flat guest-physical memory.
fn put_phys(m: &mut [u8], gpa: u64, v: u64) {
    let at = gpa as usize;
    m[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

const PS: u64 = 0x80;
const GLOBAL: u64 = 0x100;
const TEXT: u64 = 0xffff_ffff_8100_0000;

/// A kernel's image window as the arena reads it, in 64 KiB: PML4 at
/// 0x1000 (PML5 at 0x5000), PDPT at 0x2000, the PMD page at 0x3000,
/// `_text` a 2 MiB read-only executable leaf at 0x200000, `.rodata` and
/// data the NX slot after it, and a PTE page at 0x4000 mapping the PMD
/// page itself (`level2_kernel_pgt`) in the slot after `_end`. The arena
/// is the 8 pages at 0x8000 (its PTE page first), or 2 MiB at 6 MiB.
fn arena_seeds() -> Result<()> {
    use klpvisor_engine::arena::{Arena, Granularity, ImageFacts, Perm};
    use klpvisor_guest::VcpuRegs;
    let mut m = vec![0u8; 0x10000];
    put_phys(&mut m, 0x5000 + 511 * 8, 0x1000 | P | W);
    put_phys(&mut m, 0x1000 + 511 * 8, 0x2000 | P | W);
    put_phys(&mut m, 0x2000 + 510 * 8, 0x3000 | P | W);
    put_phys(&mut m, 0x3000 + 8 * 8, 0x20_0000 | P | PS | GLOBAL);
    put_phys(&mut m, 0x3000 + 9 * 8, 0x40_0000 | P | W | PS | GLOBAL | NX);
    put_phys(&mut m, 0x3000 + 10 * 8, 0x4000 | P | W);
    put_phys(&mut m, 0x4000 + 3 * 8, 0x3000 | P | W | NX);
    let pmd_va = 0xffff_ffff_8000_0000u64 + 10 * (2 << 20) + 0x3000;
    let end = TEXT + (4 << 20);
    let rodata = TEXT + (2 << 20);
    // (name, root, flags, arena, tables, efer): flags as the target reads them.
    for (name, root, flags, arena, tables, efer) in [
        (
            "pages-4k",
            0x1000u64,
            4u8,
            (0x8000u64, 0x8000u64),
            (0u64, 0u64),
            0u64,
        ),
        (
            "pages-4k-efer-nx",
            0x1000,
            4 | 8,
            (0x8000, 0x8000),
            (0, 0),
            0xd01,
        ),
        (
            "five-level-tables-apart",
            0x5000,
            1 | 4 | 16,
            (0x8000, 0x8000),
            (0x6000, 0x1000),
            0,
        ),
        ("large-2m", 0x1000, 2 | 4, (0x60_0000, 0x20_0000), (0, 0), 0),
    ] {
        let guest = klpvisor_fuzz::FuzzGuest {
            mem: &m,
            regs: vec![VcpuRegs {
                efer: (flags & 8 != 0).then_some(efer),
                ..Default::default()
            }],
            arena,
            arena_tables: (flags & 16 != 0).then_some(tables),
        };
        let facts = ImageFacts {
            tables: klpvisor_guest::PageTables::new(root, flags & 1 != 0),
            text: TEXT,
            text_phys: 0x20_0000,
            end,
            rodata,
            pmd_page_va: Some(pmd_va),
        };
        let g = if flags & 2 != 0 {
            Granularity::Large2M
        } else {
            Granularity::Pages4K
        };
        let mut a = Arena::with_granularity(&guest, &facts, g)?;
        let r = a.alloc(0x2000, Perm::Text)?;
        a.map_writes(&guest, &[r])?;
        let mut s = Vec::new();
        s.extend_from_slice(&root.to_le_bytes());
        s.push(flags);
        for v in [
            TEXT, 0x20_0000, end, rodata, pmd_va, arena.0, arena.1, tables.0, tables.1, efer,
        ] {
            s.extend_from_slice(&v.to_le_bytes());
        }
        for v in [2u16, 1, 3] {
            s.extend_from_slice(&v.to_le_bytes());
        }
        s.extend_from_slice(&[0, 1, 2]);
        s.resize(128, 0);
        s.extend_from_slice(&m);
        write("arena", name, &s)?;
    }
    Ok(())
}

/// A whole kernel for `Kernel::open`, as guest-physical memory from 0: the
/// image mapped at `_text` = 0xffffffff81000000 with 4 KiB pages (page 0
/// text; then `init_top_pgt`, PDPT, PD and PT, which map the image; BTF
/// with `uts_namespace`; the kallsyms tables; last, `init_uts_ns`,
/// writable), and the 128-byte register header of the `kernel` target.
/// `extra` symbols (sorted after `_etext`) and `tokens` make the tables as
/// large and as forged as the kallsyms seeds.
fn kernel_image(extra: &[String], tokens: Vec<(u8, Vec<u8>)>, lstar: bool) -> Result<Vec<u8>> {
    use klpvisor_guest::btf::synth::BtfBuilder;
    use klpvisor_guest::kallsyms::synth::Builder;
    const PAGE: usize = 4096;
    let mut b = BtfBuilder::new();
    let char_ = b.int("char", 1);
    let int = b.int("int", 4);
    let name = b.array(char_, int, 65);
    let fields = [
        "sysname",
        "nodename",
        "release",
        "version",
        "machine",
        "domainname",
    ];
    let members: Vec<(&str, u32, u32, u32)> = fields
        .iter()
        .zip(0u32..)
        .map(|(f, i)| (*f, name, i * 65 * 8, 0))
        .collect();
    let uts = b.composite(false, "new_utsname", 390, &members);
    b.composite(false, "uts_namespace", 400, &[("name", uts, 0, 0)]);
    let btf = b.build();

    let symbols = |btf_at: u64, uts_at: u64, end: u64| {
        let mut v: Vec<(char, String, u64)> = vec![
            ('T', "_text".into(), TEXT),
            ('T', "startup_64".into(), TEXT),
            ('T', "entry_SYSCALL_64".into(), TEXT + 0x40),
            ('T', "_etext".into(), TEXT + 0x1000),
            ('D', "init_top_pgt".into(), TEXT + 0x1000),
            ('R', "__start_BTF".into(), btf_at),
            ('R', "__stop_BTF".into(), btf_at + btf.len() as u64),
            ('D', "init_uts_ns".into(), uts_at),
            ('B', "_end".into(), end),
        ];
        v.extend(
            extra
                .iter()
                .zip(1u64..)
                .map(|(n, i)| ('t', n.clone(), TEXT + 0x100 + i * 16)),
        );
        v.sort_by_key(|s| s.2);
        v
    };
    let build = |syms| {
        let mut b = Builder::new(
            klpvisor_guest::kallsyms::Layout::OffsetsAfterTokenIndex,
            syms,
        );
        b.token_overrides = tokens.clone();
        b.build()
    };
    let btf_page = 5;
    let tables_page = btf_page + btf.len().div_ceil(PAGE);
    let tables_len = build(symbols(0, 0, 0)).len();
    let uts_page = tables_page + tables_len.div_ceil(PAGE);
    let pages = uts_page + 1;
    assert!(pages <= 512, "the image fits one PT");
    let va = |page: usize| TEXT + (page * PAGE) as u64;
    let tables = build(symbols(va(btf_page), va(uts_page), va(pages)));
    assert_eq!(tables.len(), tables_len);

    let mut m = vec![0u8; pages * PAGE];
    m[..8].copy_from_slice(&[0x48, 0x8d, 0x25, 0x51, 0x3f, 0xa0, 0x01, 0x90]);
    put_phys(&mut m, 0x1000 + 511 * 8, 0x2000 | P | W);
    put_phys(&mut m, 0x2000 + 510 * 8, 0x3000 | P | W);
    put_phys(&mut m, 0x3000 + 8 * 8, 0x4000 | P | W);
    for page in 0..pages {
        let perm = match page {
            0 => P,
            p if p == uts_page => P | W | NX,
            _ => P | NX,
        };
        put_phys(
            &mut m,
            0x4000 + page as u64 * 8,
            (page * PAGE) as u64 | perm,
        );
    }
    m[btf_page * PAGE..][..btf.len()].copy_from_slice(&btf);
    m[tables_page * PAGE..][..tables.len()].copy_from_slice(&tables);
    m[uts_page * PAGE + 130..][..10].copy_from_slice(b"6.1.0-fuzz");

    let mut h = vec![0u8]; // one vCPU
    for v in [0x8000_0011u64, 0x1000, 0x20, 0x500, TEXT + 0x40, 0] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h.extend_from_slice(&0x10u16.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.push(if lstar { 1 | 2 | 4 } else { 1 | 4 });
    h.resize(128, 0);
    h.extend_from_slice(&m);
    Ok(h)
}

fn kernel_seeds() -> Result<()> {
    use klpvisor_guest::kallsyms::MAX_DECODED_BYTES;
    const TOKEN: usize = 1000;
    let record = std::mem::size_of::<Symbol>();
    let letters = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let distinct = |i: usize| -> String {
        let l = |d: usize| char::from(letters[d % letters.len()]);
        let n = letters.len();
        format!("~{}{}{}", l(i / (n * n)), l(i / n), l(i))
    };
    let at_limit = MAX_DECODED_BYTES / (record + TOKEN + 3) - 16;
    let long = vec![(b'~', vec![b'a'; TOKEN])];
    for (name, extra, tokens, lstar) in [
        ("small", Vec::new(), Vec::new(), false),
        ("lstar", Vec::new(), Vec::new(), true),
        (
            "long-tokens",
            vec!["~".to_string(), format!("~{}", "x".repeat(23))],
            long.clone(),
            false,
        ),
        (
            "names-at-limit",
            (0..at_limit).map(distinct).collect(),
            long,
            false,
        ),
    ] {
        let input = kernel_image(&extra, tokens, lstar)?;
        let guest = klpvisor_fuzz::FuzzGuest {
            mem: &input[128..],
            regs: vec![klpvisor_guest::VcpuRegs {
                cr0: 0x8000_0011,
                cr3: 0x1000,
                cr4: 0x20,
                efer: Some(0x500),
                lstar: lstar.then_some(TEXT + 0x40),
                cs_selector: 0x10,
                cs_long: true,
                ..Default::default()
            }],
            arena: (0, 0),
            arena_tables: None,
        };
        let k = klpvisor_guest::Kernel::open(&guest)?;
        assert_eq!(k.kaslr.text, TEXT);
        assert_eq!(k.uts(&guest, "release").as_deref(), Some("6.1.0-fuzz"));
        println!(
            "kernel/{name}: {} symbols, {:?}",
            k.kallsyms.len(),
            k.kaslr.evidence
        );
        write("kernel", name, &input)?;
    }
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
    signature_seeds()?;
    http_head_seeds()?;
    ftrace_seeds()?;
    gate_seeds()?;
    arena_seeds()?;
    kernel_seeds()?;
    Ok(())
}
