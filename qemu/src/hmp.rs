//! Parsers of the HMP commands' text that QMP has no structured command
//! for: `info registers` (vCPU registers), `info mtree -f` (the guest's
//! physical memory map), `gpa2hva` (where QEMU maps a guest-physical
//! address in its own address space) and `xp` (QEMU's own read of guest
//! memory, to check ours against).
//!
//! HMP's text is not a stable interface, so each parser takes only what
//! it recognises, refuses output without the fields it needs (naming the
//! command and field), and bounds what it collects. The formats are those
//! of QEMU 7.2 (`x86_cpu_dump_state`, `mtree_info`), recorded in
//! `tests/data/`.

use std::collections::HashMap;

use klpvisor_guest::VcpuRegs;

/// Most vCPUs one `info registers -a` may describe (QEMU's x86 limit is 1024 for q35/KVM).
pub const MAX_CPUS: usize = 4096;
/// Most RAM ranges taken from a flat view.
pub const MAX_RANGES: usize = 1024;

/// Why HMP output could not be used.
#[derive(Debug, thiserror::Error)]
pub enum HmpError {
    /// The output lacks a field, or a field is malformed.
    #[error("`{command}`: {why}; output begins {start:?}")]
    Unexpected {
        /// The HMP command.
        command: String,
        /// What is missing or malformed.
        why: String,
        /// The start of the output (at most 200 characters).
        start: String,
    },
}

fn unexpected(command: &str, why: impl Into<String>, text: &str) -> HmpError {
    HmpError::Unexpected {
        command: command.into(),
        why: why.into(),
        start: text.chars().take(200).collect(),
    }
}

/// A hex number as HMP prints it (with or without `0x`, at most 16 digits).
fn hex(s: &str) -> Option<u64> {
    let s = s.strip_prefix("0x").unwrap_or(s);
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    u64::from_str_radix(s, 16).ok()
}

/// One segment register line: selector, base, limit, flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    /// The selector.
    pub selector: u16,
    /// The (hidden) base.
    pub base: u64,
    /// The limit.
    pub limit: u32,
    /// QEMU's flags word (descriptor high dword layout: bit 21 is L).
    pub flags: u32,
}

/// One vCPU as `info registers` prints it: the registers [`VcpuRegs`]
/// holds, plus what QEMU prints that it has no field for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HmpCpu {
    /// QEMU's cpu-index (`CPU#N`).
    pub index: usize,
    /// The registers in the engine's terms. `lstar` and `kernel_gs_base`
    /// are `None`: `info registers` prints neither.
    pub regs: VcpuRegs,
    /// The task register: its base is this CPU's TSS, which Linux keeps
    /// in the CPU's own `cpu_entry_area`, so it tells CPUs apart in user
    /// mode too, where GS holds the user's base.
    pub tr: Segment,
    /// CR2 (the last page-fault address).
    pub cr2: u64,
    /// Whether the vCPU is halted (`HLT=1`).
    pub halted: bool,
}

/// Squashes the spaces QEMU puts before `=` (`R8 =`, `CS =`), so every
/// field is one `KEY=VALUE` token.
fn squash(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    for c in line.chars() {
        if c == '=' {
            while out.ends_with(' ') {
                out.pop();
            }
        }
        out.push(c);
    }
    out
}

const SEGMENTS: [&str; 8] = ["ES", "CS", "SS", "DS", "FS", "GS", "LDT", "TR"];

/// Parses one CPU block (the lines after `CPU#N`).
fn parse_cpu(index: usize, lines: &[&str], command: &str, text: &str) -> Result<HmpCpu, HmpError> {
    let mut fields: HashMap<String, String> = HashMap::new();
    let mut segs: HashMap<&'static str, Segment> = HashMap::new();
    let mut tables: HashMap<&'static str, (u64, u32)> = HashMap::new();
    let bad = |why: String| unexpected(command, format!("CPU#{index}: {why}"), text);
    for line in lines {
        let line = squash(line);
        let toks: Vec<&str> = line.split_whitespace().collect();
        let Some((k, v)) = toks.first().and_then(|t| t.split_once('=')) else {
            continue;
        };
        if let Some(&name) = SEGMENTS.iter().find(|&&s| s == k) {
            let seg = (|| {
                Some(Segment {
                    selector: u16::try_from(hex(v)?).ok()?,
                    base: hex(toks.get(1)?)?,
                    limit: u32::try_from(hex(toks.get(2)?)?).ok()?,
                    flags: u32::try_from(hex(toks.get(3)?)?).ok()?,
                })
            })()
            .ok_or_else(|| bad(format!("malformed {name} line {line:?}")))?;
            segs.insert(name, seg);
            continue;
        }
        if let Some(&name) = ["GDT", "IDT"].iter().find(|&&s| s == k) {
            let t = (|| Some((hex(toks.get(1)?)?, u32::try_from(hex(toks.get(2)?)?).ok()?)))()
                .ok_or_else(|| bad(format!("malformed {name} line {line:?}")))?;
            tables.insert(name, t);
            continue;
        }
        for t in &toks {
            if let Some((k, v)) = t.split_once('=') {
                if !v.is_empty() && fields.len() < 256 {
                    fields.entry(k.to_owned()).or_insert_with(|| v.to_owned());
                }
            }
        }
    }
    // 64-bit names where the vCPU is in long mode, 32-bit ones otherwise
    // (QEMU prints the form the CPU's mode has; the high halves are not shown).
    let reg = |names: &[&str]| -> Result<u64, HmpError> {
        for n in names {
            if let Some(v) = fields.get(*n) {
                return hex(v).ok_or_else(|| bad(format!("{n}={v:?} is not hex")));
            }
        }
        Err(bad(format!("no {}", names.join("/"))))
    };
    let long = fields.contains_key("RAX");
    let high = |name: &str| -> Result<u64, HmpError> {
        if long {
            reg(&[name])
        } else {
            Ok(0)
        }
    };
    let seg = |name: &str| {
        segs.get(name)
            .copied()
            .ok_or_else(|| bad(format!("no {name} line")))
    };
    let cs = seg("CS")?;
    let gs = seg("GS")?;
    let tr = seg("TR")?;
    let (idt_base, idt_limit) = tables
        .get("IDT")
        .copied()
        .ok_or_else(|| bad("no IDT line".into()))?;
    let efer = match fields.get("EFER") {
        Some(v) => Some(hex(v).ok_or_else(|| bad(format!("EFER={v:?} is not hex")))?),
        None => None,
    };
    let regs = VcpuRegs {
        rax: reg(&["RAX", "EAX"])?,
        rbx: reg(&["RBX", "EBX"])?,
        rcx: reg(&["RCX", "ECX"])?,
        rdx: reg(&["RDX", "EDX"])?,
        rsi: reg(&["RSI", "ESI"])?,
        rdi: reg(&["RDI", "EDI"])?,
        rbp: reg(&["RBP", "EBP"])?,
        rsp: reg(&["RSP", "ESP"])?,
        r8: high("R8")?,
        r9: high("R9")?,
        r10: high("R10")?,
        r11: high("R11")?,
        r12: high("R12")?,
        r13: high("R13")?,
        r14: high("R14")?,
        r15: high("R15")?,
        rip: reg(&["RIP", "EIP"])?,
        rflags: reg(&["RFL", "EFL"])?,
        cr0: reg(&["CR0"])?,
        cr3: reg(&["CR3"])?,
        cr4: reg(&["CR4"])?,
        efer,
        lstar: None,
        gs_base: gs.base,
        kernel_gs_base: None,
        cs_selector: cs.selector,
        // DESC_L_MASK, as in the ELF dump's QEMUCPUState.
        cs_long: cs.flags & (1 << 21) != 0,
        idtr_base: idt_base,
        idtr_limit: idt_limit.min(0xffff) as u16,
    };
    Ok(HmpCpu {
        index,
        regs,
        tr,
        cr2: reg(&["CR2"])?,
        halted: fields.get("HLT").is_some_and(|v| v == "1"),
    })
}

/// Parses `info registers` (one vCPU) or `info registers -a` (all): one
/// [`HmpCpu`] per `CPU#N` block, in output order.
pub fn parse_registers(text: &str) -> Result<Vec<HmpCpu>, HmpError> {
    const COMMAND: &str = "info registers";
    let mut blocks: Vec<(usize, Vec<&str>)> = Vec::new();
    for line in text.lines() {
        if let Some(n) = line.trim().strip_prefix("CPU#") {
            let index = n
                .parse::<usize>()
                .ok()
                .filter(|&i| i < MAX_CPUS)
                .ok_or_else(|| unexpected(COMMAND, format!("bad header {line:?}"), text))?;
            if blocks.len() >= MAX_CPUS {
                return Err(unexpected(COMMAND, "too many CPUs", text));
            }
            blocks.push((index, Vec::new()));
        } else if let Some((_, lines)) = blocks.last_mut() {
            lines.push(line);
        }
    }
    if blocks.is_empty() {
        return Err(unexpected(COMMAND, "no CPU#N block", text));
    }
    blocks
        .iter()
        .map(|(i, lines)| parse_cpu(*i, lines, COMMAND, text))
        .collect()
}

/// One guest-physical range of RAM or ROM in the system memory map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamRange {
    /// First guest-physical address.
    pub start: u64,
    /// Length in bytes (at least 1).
    pub len: u64,
    /// `ram` (the guest may write it) or `rom` (the guest may not).
    pub writable: bool,
    /// QEMU's memory region name (`pc.ram`, `pc.bios`, ...).
    pub name: String,
}

/// Parses `info mtree -f`: the RAM and ROM ranges of the flat view of the
/// address space named `memory` (what the CPUs see outside SMM), sorted,
/// without I/O regions. ROM device regions in MMIO mode (`romd`) are left
/// out: reading them is a device access.
pub fn parse_flat_ram(text: &str) -> Result<Vec<RamRange>, HmpError> {
    const COMMAND: &str = "info mtree -f";
    let mut in_system = false;
    let mut seen_system = false;
    let mut out: Vec<RamRange> = Vec::new();
    for line in text.lines() {
        if line.starts_with("FlatView #") {
            if seen_system {
                break;
            }
            in_system = false;
            continue;
        }
        let t = line.trim();
        if t.starts_with("AS \"memory\",") {
            in_system = true;
            seen_system = true;
            continue;
        }
        if !in_system {
            continue;
        }
        // "0000000000100000-000000001fffffff (prio 0, ram): pc.ram @0000000000100000"
        let Some((range, rest)) = t.split_once(" (prio ") else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let Some((attrs, name)) = rest.split_once("): ") else {
            continue;
        };
        let kind = attrs.rsplit(", ").next().unwrap_or_default();
        let writable = match kind {
            "ram" => true,
            "rom" => false,
            _ => continue,
        };
        let (Some(start), Some(end)) = (hex(start), hex(end)) else {
            return Err(unexpected(COMMAND, format!("bad range {range:?}"), text));
        };
        let len = end
            .checked_sub(start)
            .and_then(|l| l.checked_add(1))
            .ok_or_else(|| unexpected(COMMAND, format!("bad range {range:?}"), text))?;
        if out.len() >= MAX_RANGES {
            return Err(unexpected(COMMAND, "too many RAM ranges", text));
        }
        let mut name = name.split(" @").next().unwrap_or_default();
        // Under KVM each range KVM maps ends with the accelerator's name
        // ("pc.ram KVM", "pc.bios @0000000000020000 KVM": memory.c's
        // mtree_print_flatview); it is not part of the region's name, and
        // left in, the arena (`klpvarena`) would never be found.
        while let Some(n) = name.strip_suffix(" KVM") {
            name = n;
        }
        out.push(RamRange {
            start,
            len,
            writable,
            name: name.chars().take(128).collect(),
        });
    }
    if !seen_system {
        return Err(unexpected(
            COMMAND,
            "no flat view of address space \"memory\"",
            text,
        ));
    }
    if out.is_empty() {
        return Err(unexpected(
            COMMAND,
            "no RAM in address space \"memory\"",
            text,
        ));
    }
    out.sort_by_key(|r| r.start);
    if out.windows(2).any(|w| {
        w[0].start
            .checked_add(w[0].len)
            .is_none_or(|e| e > w[1].start)
    }) {
        return Err(unexpected(COMMAND, "overlapping RAM ranges", text));
    }
    Ok(out)
}

/// Parses `gpa2hva ADDR`: `Host virtual address for 0x100000 (pc.ram) is 0x7feaf7f00000`.
pub fn parse_gpa2hva(gpa: u64, text: &str) -> Result<u64, HmpError> {
    let command = format!("gpa2hva {gpa:#x}");
    let t = text.trim();
    let want = format!("Host virtual address for {gpa:#x} ");
    if !t.starts_with(&want) {
        return Err(unexpected(&command, "not an address answer", text));
    }
    t.rsplit_once(" is ")
        .and_then(|(_, a)| a.strip_prefix("0x"))
        .and_then(hex)
        .ok_or_else(|| unexpected(&command, "no host address", text))
}

/// Parses `xp /Ngx ADDR`: the quadwords, in order, checked to start at `gpa`.
pub fn parse_xp_qwords(gpa: u64, text: &str) -> Result<Vec<u64>, HmpError> {
    let command = format!("xp /gx {gpa:#x}");
    let mut out = Vec::new();
    let mut expect = gpa;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (addr, vals) = line
            .split_once(": ")
            .ok_or_else(|| unexpected(&command, format!("bad line {line:?}"), text))?;
        if hex(addr.trim()) != Some(expect) {
            return Err(unexpected(
                &command,
                format!("line {line:?} is not at {expect:#x}"),
                text,
            ));
        }
        for v in vals.split_whitespace() {
            let q = v
                .strip_prefix("0x")
                .and_then(hex)
                .ok_or_else(|| unexpected(&command, format!("bad value {v:?}"), text))?;
            out.push(q);
            expect = expect.wrapping_add(8);
        }
        if out.len() > 4096 {
            return Err(unexpected(&command, "too long", text));
        }
    }
    if out.is_empty() {
        return Err(unexpected(&command, "no values", text));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recorded from QEMU 7.2.22 (TCG, -cpu max, 2 vCPUs) running Debian's
    /// 6.1 cloud kernel, both vCPUs idle in the kernel.
    const REGS: &str = include_str!("../tests/data/info-registers-a.txt");
    /// The same QEMU stopped at reset (`-S`): 32-bit form, real mode.
    const REGS_RESET: &str = include_str!("../tests/data/info-registers-a-reset.txt");
    const MTREE: &str = include_str!("../tests/data/info-mtree-f.txt");

    #[test]
    fn registers_of_a_running_kernel() {
        let cpus = parse_registers(REGS).unwrap();
        assert_eq!(cpus.len(), 2);
        let c0 = &cpus[0];
        assert_eq!(c0.index, 0);
        let r = c0.regs;
        assert_eq!(r.rax, 0x1ad40);
        assert_eq!(r.rdx, 0x4000_0000_0000_0000);
        assert_eq!(r.r9, 0x3457_d34c);
        assert_eq!(r.r15, 0x14790);
        assert_eq!(r.rbp, 0xffff_ffff_9281_aa40);
        assert_eq!(r.rsp, 0xffff_ffff_9280_3e98);
        assert_eq!(r.rip, 0xffff_ffff_9181_7a0b);
        assert_eq!(r.rflags, 0x246);
        assert_eq!(
            (r.cr0, r.cr3, r.cr4),
            (0x8005_0033, 0x1180_2000, 0x0075_1eb0)
        );
        assert_eq!(r.efer, Some(0xd01));
        assert_eq!(r.gs_base, 0xff17_4433_9f00_0000);
        assert_eq!((r.cs_selector, r.cpl(), r.cs_long), (0x10, 0, true));
        assert_eq!((r.idtr_base, r.idtr_limit), (0xffff_fe00_0000_0000, 0xfff));
        assert_eq!((r.lstar, r.kernel_gs_base), (None, None));
        assert!(r.in_long_mode());
        assert_eq!(c0.tr.base, 0xffff_fe00_0000_3000);
        assert_eq!(c0.cr2, 0x2561_1730);
        assert!(c0.halted);
        let c1 = &cpus[1];
        assert_eq!(c1.index, 1);
        assert_eq!(c1.regs.gs_base, 0xff17_4433_9f10_0000);
        assert_eq!(c1.tr.base, 0xffff_fe00_0003_e000);
        assert_eq!(c1.regs.cr3, 0x186_e000);
    }

    #[test]
    fn registers_at_reset_are_the_32_bit_form() {
        let cpus = parse_registers(REGS_RESET).unwrap();
        assert_eq!(cpus.len(), 2);
        let r = cpus[1].regs;
        assert_eq!(r.rip, 0xfff0);
        assert_eq!(r.rdx, 0x60fb1);
        assert_eq!(r.r8, 0);
        assert_eq!(r.cr0, 0x6000_0010);
        assert_eq!(r.efer, Some(0));
        assert_eq!(r.cs_selector, 0xf000);
        assert!(!r.cs_long);
        assert!(!r.in_long_mode());
    }

    #[test]
    fn registers_output_that_is_not_registers_is_refused() {
        for bad in [
            "",
            "unknown command: 'info'\n",
            "\nCPU#0\nRAX=zz\n",
            "\nCPU#99999999\n",
        ] {
            assert!(parse_registers(bad).is_err(), "{bad:?}");
        }
        // A block missing its CS line.
        let cut: String = REGS
            .lines()
            .filter(|l| !l.starts_with("CS "))
            .map(|l| format!("{l}\n"))
            .collect();
        let e = parse_registers(&cut).unwrap_err().to_string();
        assert!(e.contains("no CS line"), "{e}");
        // Every prefix of the real output either parses or is an error.
        for n in 0..REGS.len() {
            if REGS.is_char_boundary(n) {
                let _ = parse_registers(&REGS[..n]);
            }
        }
    }

    /// Recorded outputs with random bytes changed, cut or duplicated:
    /// every parser returns, none panics, and what a parser accepts
    /// stays within its bounds.
    #[test]
    fn mutated_outputs_never_panic() {
        let mut seed = 0x9e37_79b9u32;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        let alphabet = b"0123456789abcdefx=:-@() \n#CPUSRAXGDTIE";
        for base in [REGS, REGS_RESET, MTREE] {
            for _ in 0..400 {
                let mut b = base.as_bytes().to_vec();
                for _ in 0..(next() % 8 + 1) {
                    let i = next() as usize % b.len();
                    match next() % 3 {
                        0 => b[i] = alphabet[next() as usize % alphabet.len()],
                        1 => b.truncate(i),
                        _ => {
                            let j = (i + next() as usize % 64).min(b.len());
                            let dup = b[i..j].to_vec();
                            b.splice(i..i, dup);
                        }
                    }
                    if b.is_empty() {
                        break;
                    }
                }
                let t = String::from_utf8_lossy(&b);
                if let Ok(cpus) = parse_registers(&t) {
                    assert!(cpus.len() <= MAX_CPUS);
                }
                if let Ok(r) = parse_flat_ram(&t) {
                    assert!(r.len() <= MAX_RANGES && r.iter().all(|r| r.len > 0));
                }
                let _ = parse_gpa2hva(0x10_0000, &t);
                let _ = parse_xp_qwords(0x1000, &t);
            }
        }
    }

    #[test]
    fn the_system_flat_view() {
        let r = parse_flat_ram(MTREE).unwrap();
        let got: Vec<(u64, u64, bool, &str)> = r
            .iter()
            .map(|r| (r.start, r.len, r.writable, r.name.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 0xc3000, true, "pc.ram"),
                (0xc3000, 0x25000, false, "pc.ram"),
                (0xe8000, 0x8000, true, "pc.ram"),
                (0xf0000, 0x10000, false, "pc.ram"),
                (0x10_0000, 0x1ff0_0000, true, "pc.ram"),
                (0xfffc_0000, 0x4_0000, false, "pc.bios"),
            ]
        );
        assert!(parse_flat_ram("FlatView #0\n AS \"I/O\", root: io\n").is_err());
        assert!(parse_flat_ram("").is_err());
        let overlap = "FlatView #0\n AS \"memory\", root: system\n  0000-0fff (prio 0, ram): a\n  0800-1fff (prio 0, ram): b\n";
        assert!(parse_flat_ram(overlap).is_err());
        let inverted = "FlatView #0\n AS \"memory\", root: system\n  1000-0fff (prio 0, ram): a\n";
        assert!(parse_flat_ram(inverted).is_err());
    }

    /// After `object-add memory-backend-memfd,id=klpvarena,size=16M` and
    /// `device_add ivshmem-plain,memdev=klpvarena` on the running guest
    /// (whose kernel then assigned BAR2 above 4 GiB), the BAR is RAM in
    /// the flat view, the first view listed this time.
    #[test]
    fn a_hot_plugged_ivshmem_bar_is_ram() {
        let r = parse_flat_ram(include_str!("../tests/data/info-mtree-f-ivshmem.txt")).unwrap();
        let bar = r.iter().find(|r| r.name == "klpvarena").unwrap();
        assert_eq!(
            (bar.start, bar.len, bar.writable),
            (0x1_0000_0000, 16 << 20, true)
        );
        // Its MMIO register BAR is I/O and left out.
        assert!(r.iter().all(|r| r.name != "ivshmem-mmio"));
        assert_eq!(r.iter().filter(|r| r.name == "pc.ram").count(), 5);
    }

    /// Recorded from QEMU 7.2.22 with `-enable-kvm`, stopped before the
    /// guest ran (`-S`), the arena on its command line (its BAR not yet
    /// assigned): each RAM and ROM range carries KVM's mark.
    #[test]
    fn kvm_marks_are_not_part_of_the_names() {
        let text = include_str!("../tests/data/info-mtree-f-kvm.txt");
        assert!(text.contains("): pc.ram KVM\n"));
        let r = parse_flat_ram(text).unwrap();
        let names: Vec<&str> = r.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["pc.ram", "pc.rom", "pc.bios", "pc.ram", "pc.bios"]);
        assert_eq!(
            (r[3].start, r[3].len, r[3].writable),
            (0x10_0000, 0xff0_0000, true)
        );
        assert!(!r[1].writable);
        // The hot-plugged arena's range as the guest's BAR assignment makes
        // it appear in that format (the TCG line of
        // info-mtree-f-ivshmem.txt with KVM's mark).
        let arena = "FlatView #0\n AS \"memory\", root: system\n \
            0000000100000000-0000000100ffffff (prio 1, ram): klpvarena KVM\n";
        let r = parse_flat_ram(arena).unwrap();
        assert_eq!(r[0].name, "klpvarena");
    }

    #[test]
    fn gpa2hva_and_xp() {
        let ram = include_str!("../tests/data/gpa2hva-ram.txt");
        assert_eq!(parse_gpa2hva(0x10_0000, ram).unwrap(), 0x7fea_f7f0_0000);
        // An answer for another address is not ours.
        assert!(parse_gpa2hva(0x20_0000, ram).is_err());
        let hole = include_str!("../tests/data/gpa2hva-hole.txt");
        assert!(parse_gpa2hva(0x2000_0000, hole).is_err());
        let unknown = include_str!("../tests/data/unknown.txt");
        assert!(parse_gpa2hva(0, unknown).is_err());
        let xp = include_str!("../tests/data/xp.txt");
        assert_eq!(parse_xp_qwords(0x1000, xp).unwrap(), vec![0; 4]);
        assert!(parse_xp_qwords(0x2000, xp).is_err());
        assert_eq!(
            parse_xp_qwords(
                0x10,
                "0000000000000010: 0x1122334455667788 0x00000000000000ff\n"
            )
            .unwrap(),
            vec![0x1122_3344_5566_7788, 0xff]
        );
    }
}
