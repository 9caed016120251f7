//! Synthetic `struct alt_instr` tables over a synthetic text image, checked
//! against what each kernel's `apply_alternatives` writes.

use super::*;

const TEXT: u64 = 0xffff_ffff_c000_0000;
const TABLE_VA: u64 = 0xffff_ffff_c000_4000;
/// X86_FEATURE_SMAP (9*32+20).
const SMAP: u16 = 9 * 32 + 20;
const STAC: [u8; 3] = [0x0f, 0x01, 0xcb];

fn cpu(flavor: Flavor, features: &[u16]) -> GuestCpu {
    let mut caps = vec![0u32; 21];
    for &f in features {
        caps[usize::from(f / 32)] |= 1 << (f % 32);
    }
    GuestCpu {
        flavor,
        layout: flavor.default_layout(),
        caps,
        pv_ops: None,
        bug_func: None,
        nop_func: None,
    }
}

/// One table entry: `instr` and `repl` are text offsets; `ft` the raw
/// `cpuid` (6.1) or `ft_flags` (6.12).
fn entry(flavor: Flavor, index: usize, instr: u64, repl: u64, ft: u32, il: u8, rl: u8) -> Vec<u8> {
    let l = flavor.default_layout();
    let at = TABLE_VA + (index * l.size) as u64;
    let mut e = vec![0u8; l.size];
    e[0..4].copy_from_slice(&((TEXT + instr).wrapping_sub(at) as i32).to_le_bytes());
    e[4..8].copy_from_slice(&((TEXT + repl).wrapping_sub(at + 4) as i32).to_le_bytes());
    e[l.feature..l.feature + l.feature_size].copy_from_slice(&ft.to_le_bytes()[..l.feature_size]);
    e[l.instrlen] = il;
    e[l.replacementlen] = rl;
    e
}

/// Applies `entries` (concatenated) to `text` for `cpu`.
fn run(text: &mut [u8], entries: &[Vec<u8>], cpu: &GuestCpu) -> Result<(), AltError> {
    let bytes: Vec<u8> = entries.concat();
    let mut table = read_table(&bytes, TABLE_VA, cpu)?;
    let code = Code {
        module: None,
        text_va: TEXT,
    };
    apply_table(&code, text, &mut table, cpu)
}

/// A call at `text[at..]` and where it goes.
fn call_target(text: &[u8], at: usize) -> u64 {
    assert_eq!(text[at], 0xe8, "{:02x?}", &text[at..at + 5]);
    let rel = i32::from_le_bytes(text[at + 1..at + 5].try_into().unwrap());
    (TEXT + at as u64 + 5).wrapping_add_signed(i64::from(rel))
}

/// `call target` assembled at text offset `at`.
fn call(at: u64, target: u64) -> [u8; 5] {
    let rel = target.wrapping_sub(TEXT + at + 5) as i32;
    let mut b = [0xe8, 0, 0, 0, 0];
    b[1..].copy_from_slice(&rel.to_le_bytes());
    b
}

#[test]
fn stac_is_patched_in_only_with_smap() {
    for flavor in [Flavor::V6_1, Flavor::V6_12] {
        // ALTERNATIVE("", __ASM_STAC, X86_FEATURE_SMAP): the original is
        // padding, the replacement stac.
        let mut text = vec![0xccu8; 64];
        text[0..3].fill(0x90);
        text[32..35].copy_from_slice(&STAC);
        let e = entry(flavor, 0, 0, 32, u32::from(SMAP), 3, 3);
        run(&mut text, std::slice::from_ref(&e), &cpu(flavor, &[SMAP])).unwrap();
        assert_eq!(text[0..3], STAC, "{flavor:?}");
        // Without SMAP the original stays, as one 3-byte nop.
        text[0..3].fill(0x90);
        run(&mut text, &[e], &cpu(flavor, &[])).unwrap();
        assert_eq!(text[0..3], [0x0f, 0x1f, 0x00], "{flavor:?}");
    }
}

#[test]
fn inverted_tests_patch_when_the_feature_is_absent() {
    // 6.1: ALTINSTR_FLAG_INV in cpuid; 6.12: ALT_FLAG_NOT in ft_flags.
    for (flavor, ft) in [
        (Flavor::V6_1, u32::from(SMAP) | 0x8000),
        (Flavor::V6_12, u32::from(SMAP) | 1 << 16),
    ] {
        let fresh = || {
            let mut text = vec![0xccu8; 64];
            text[0..3].fill(0x90);
            text[32..35].copy_from_slice(&STAC);
            text
        };
        let e = entry(flavor, 0, 0, 32, ft, 3, 3);
        let mut text = fresh();
        run(&mut text, std::slice::from_ref(&e), &cpu(flavor, &[])).unwrap();
        assert_eq!(text[0..3], STAC, "{flavor:?}: absent + NOT patches");
        let mut text = fresh();
        run(&mut text, &[e], &cpu(flavor, &[SMAP])).unwrap();
        assert_eq!(
            text[0..3],
            [0x0f, 0x1f, 0x00],
            "{flavor:?}: present + NOT keeps"
        );
    }
}

#[test]
fn a_replacement_call_keeps_its_target() {
    // alternative_call_2-like: `call a` replaced by `call b`.
    let a = TEXT + 0x1000;
    let b = TEXT + 0x2000;
    for flavor in [Flavor::V6_1, Flavor::V6_12] {
        let mut text = vec![0xccu8; 128];
        text[8..13].copy_from_slice(&call(8, a));
        text[100..105].copy_from_slice(&call(100, b));
        let e = entry(flavor, 0, 8, 100, 3 * 32 + 16, 5, 5);
        run(
            &mut text,
            std::slice::from_ref(&e),
            &cpu(flavor, &[3 * 32 + 16]),
        )
        .unwrap();
        assert_eq!(call_target(&text, 8), b, "{flavor:?}");
        text[8..13].copy_from_slice(&call(8, a));
        run(&mut text, &[e], &cpu(flavor, &[])).unwrap();
        assert_eq!(call_target(&text, 8), a, "{flavor:?}");
    }
}

#[test]
fn v6_1_recomputes_a_jump_and_shortens_it_when_it_fits() {
    // The replacement jumps forward to text+0x40 from text+0x80: the
    // site at 0x10 reaches it with a jmp rel8.
    let mut text = vec![0xccu8; 0x100];
    text[0x10..0x15].fill(0x90);
    let rel = (0x40i64 - (0x80 + 5)) as i32;
    text[0x80] = 0xe9;
    text[0x81..0x85].copy_from_slice(&rel.to_le_bytes());
    let e = entry(Flavor::V6_1, 0, 0x10, 0x80, 7 * 32, 5, 5);
    run(&mut text, &[e], &cpu(Flavor::V6_1, &[7 * 32])).unwrap();
    assert_eq!(text[0x10], 0xeb);
    assert_eq!(0x12 + i64::from(text[0x11] as i8), 0x40);
    assert_eq!(
        text[0x12..0x15],
        [0x0f, 0x1f, 0x00],
        "NOP3 after a jmp rel8"
    );

    // Backwards, 6.1 always keeps the 5-byte form.
    let mut text = vec![0xccu8; 0x100];
    text[0x60..0x65].fill(0x90);
    let rel = (0x08i64 - (0x80 + 5)) as i32;
    text[0x80] = 0xe9;
    text[0x81..0x85].copy_from_slice(&rel.to_le_bytes());
    let e = entry(Flavor::V6_1, 0, 0x60, 0x80, 7 * 32, 5, 5);
    run(&mut text, &[e], &cpu(Flavor::V6_1, &[7 * 32])).unwrap();
    assert_eq!(text[0x60], 0xe9);
    let rel = i32::from_le_bytes(text[0x61..0x65].try_into().unwrap());
    assert_eq!(0x65 + i64::from(rel), 0x08);
}

#[test]
fn v6_1_refuses_what_it_would_not_relocate() {
    // `lea sym(%rip), %rax` in a replacement: 6.1 copies it unchanged.
    let mut text = vec![0xccu8; 0x100];
    text[0..7].fill(0x90);
    text[0x80..0x87].copy_from_slice(&[0x48, 0x8d, 0x05, 0x00, 0x10, 0x00, 0x00]);
    let e = entry(Flavor::V6_1, 0, 0, 0x80, 5, 7, 7);
    let err = run(
        &mut text,
        std::slice::from_ref(&e),
        &cpu(Flavor::V6_1, &[5]),
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("does not relocate"), "{msg}");
    assert!(msg.contains("0*32+5"), "{msg}");
    // Not chosen for this CPU: nothing to relocate, nothing refused.
    run(&mut text, &[e], &cpu(Flavor::V6_1, &[])).unwrap();
}

#[test]
fn v6_12_relocates_every_instruction_of_the_replacement() {
    // Replacement: stac; call f; lea g(%rip), %rax; jne h (rel32); jmp i
    // (rel32, out of reach of rel8); jmp internal (rel8), all aimed at
    // absolute addresses from its own place.
    let (f, g, h, far) = (TEXT + 0x3000, TEXT + 0x3100, TEXT + 0x3200, TEXT + 0x9000);
    let repl_at = 0x800usize;
    let mut r = Vec::new();
    r.extend_from_slice(&STAC);
    let at = |r: &Vec<u8>| (repl_at + r.len()) as u64;
    let rel32 = |from_end: u64, to: u64| (to.wrapping_sub(TEXT + from_end) as i32).to_le_bytes();
    let c = call(at(&r), f);
    r.extend_from_slice(&c);
    let end = at(&r) + 7;
    r.extend_from_slice(&[0x48, 0x8d, 0x05]);
    r.extend_from_slice(&rel32(end, g));
    let end = at(&r) + 6;
    r.extend_from_slice(&[0x0f, 0x85]);
    r.extend_from_slice(&rel32(end, h));
    let end = at(&r) + 5;
    r.push(0xe9);
    r.extend_from_slice(&rel32(end, far));
    r.extend_from_slice(&[0xeb, 0x00]); // to the end of the block: internal
    let rl = r.len();
    let il = rl + 4;
    let mut text = vec![0xccu8; 0xa000];
    text[0x10..0x10 + il].fill(0x90);
    text[repl_at..repl_at + rl].copy_from_slice(&r);
    let e = entry(
        Flavor::V6_12,
        0,
        0x10,
        repl_at as u64,
        1,
        il as u8,
        rl as u8,
    );
    run(&mut text, &[e], &cpu(Flavor::V6_12, &[1])).unwrap();

    let site = 0x10usize;
    assert_eq!(text[site..site + 3], STAC);
    assert_eq!(call_target(&text, site + 3), f);
    let disp = i32::from_le_bytes(text[site + 11..site + 15].try_into().unwrap());
    assert_eq!(
        (TEXT + site as u64 + 15).wrapping_add_signed(disp.into()),
        g
    );
    assert_eq!(text[site + 15..site + 17], [0x0f, 0x85]);
    let rel = i32::from_le_bytes(text[site + 17..site + 21].try_into().unwrap());
    assert_eq!((TEXT + site as u64 + 21).wrapping_add_signed(rel.into()), h);
    assert_eq!(text[site + 21], 0xe9, "out of rel8 reach: stays rel32");
    let rel = i32::from_le_bytes(text[site + 22..site + 26].try_into().unwrap());
    assert_eq!(
        (TEXT + site as u64 + 26).wrapping_add_signed(rel.into()),
        far
    );
    assert_eq!(
        text[site + 26..site + 28],
        [0xeb, 0x00],
        "internal: untouched"
    );
    // Four bytes of padding: one NOP4.
    assert_eq!(text[site + 28..site + 32], [0x0f, 0x1f, 0x40, 0x00]);
}

#[test]
fn v6_12_shortens_a_jump_that_now_fits() {
    let mut text = vec![0xccu8; 0x200];
    text[0x10..0x15].fill(0x90);
    // The replacement at 0x100 jumps to 0x30.
    let rel = (0x30i64 - 0x105) as i32;
    text[0x100] = 0xe9;
    text[0x101..0x105].copy_from_slice(&rel.to_le_bytes());
    let e = entry(Flavor::V6_12, 0, 0x10, 0x100, 2, 5, 5);
    run(&mut text, &[e], &cpu(Flavor::V6_12, &[2])).unwrap();
    assert_eq!(text[0x10], 0xeb);
    assert_eq!(0x12 + i64::from(text[0x11] as i8), 0x30);
    assert_eq!(text[0x12..0x15], [0xcc; 3], "int3 after a shortened jmp");
}

#[test]
fn v6_12_nested_sites_share_the_longest_padding() {
    // ALTERNATIVE_2(6-byte orig, 2-byte repl A, feat 1, 3-byte repl B,
    // feat 2): both entries get instrlen 6 before either is applied.
    let mut text = vec![0xccu8; 0x100];
    text[0..6].copy_from_slice(&[0x0f, 0x1f, 0x44, 0x00, 0x00, 0x90]);
    text[0x80..0x82].copy_from_slice(&[0x9c, 0x58]); // pushf; pop %rax
    text[0x90..0x93].copy_from_slice(&STAC);
    let entries = [
        entry(Flavor::V6_12, 0, 0, 0x80, 1, 5, 2),
        entry(Flavor::V6_12, 1, 0, 0x90, 2, 6, 3),
    ];
    run(&mut text, &entries, &cpu(Flavor::V6_12, &[1])).unwrap();
    // A's two bytes and a 4-byte nop: the padding covers all six.
    assert_eq!(text[0..6], [0x9c, 0x58, 0x0f, 0x1f, 0x40, 0x00]);
    // Long padding becomes a jmp over int3s.
    let mut text = vec![0xccu8; 0x100];
    text[0..20].fill(0x90);
    let e = entry(Flavor::V6_12, 0, 0, 0x80, 1, 20, 0);
    run(&mut text, &[e], &cpu(Flavor::V6_12, &[1])).unwrap();
    assert_eq!(text[0..2], [0xeb, 18]);
    assert_eq!(text[2..20], [0xcc; 18]);
}

#[test]
fn v6_1_pads_with_its_own_long_nops() {
    let mut text = vec![0xccu8; 0x100];
    text[0..12].fill(0x90);
    text[0x80..0x83].copy_from_slice(&STAC);
    let e = entry(Flavor::V6_1, 0, 0, 0x80, 1, 12, 3);
    run(&mut text, &[e], &cpu(Flavor::V6_1, &[1])).unwrap();
    assert_eq!(text[0..3], STAC);
    // Nine bytes: NOP8 + NOP1 (6.1 has no longer nops, and no jmp form).
    assert_eq!(text[3..11], [0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0]);
    assert_eq!(text[11], 0x90);
}

#[test]
fn v6_12_direct_call_follows_the_pv_ops_slot() {
    const PV_OPS: u64 = 0xffff_ffff_8200_0000;
    const BUG: u64 = 0xffff_ffff_8100_1000;
    const NOP_FUNC: u64 = 0xffff_ffff_8100_2000;
    const NATIVE: u64 = 0xffff_ffff_8100_3000;
    let mut pv = vec![0u8; 64];
    pv[8..16].copy_from_slice(&NATIVE.to_le_bytes());
    pv[16..24].copy_from_slice(&NOP_FUNC.to_le_bytes());
    let mut c = cpu(Flavor::V6_12, &[3 * 32 + 21]);
    c.pv_ops = Some((PV_OPS, pv));
    c.bug_func = Some(BUG);
    c.nop_func = Some(NOP_FUNC);
    // ALT_CALL_ALWAYS: ALT_FLAG_DIRECT_CALL | X86_FEATURE_ALWAYS.
    let ft = (2u32 << 16) | (3 * 32 + 21);
    let site = |slot: u64| {
        let mut text = vec![0xccu8; 0x100];
        let disp = (PV_OPS + slot).wrapping_sub(TEXT + 6) as i32;
        text[0..2].copy_from_slice(&[0xff, 0x15]);
        text[2..6].copy_from_slice(&disp.to_le_bytes());
        text[0x80..0x85].copy_from_slice(&call(0x80, BUG));
        text
    };
    let mut text = site(8);
    run(&mut text, &[entry(Flavor::V6_12, 0, 0, 0x80, ft, 6, 5)], &c).unwrap();
    assert_eq!(call_target(&text, 0), NATIVE);
    assert_eq!(text[5], 0x90);
    // A slot holding nop_func: the call disappears.
    let mut text = site(16);
    run(&mut text, &[entry(Flavor::V6_12, 0, 0, 0x80, ft, 6, 5)], &c).unwrap();
    assert_eq!(text[0..6], [0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00]);
    // A slot outside pv_ops is refused, not guessed.
    let mut text = site(0x1000);
    let err = run(&mut text, &[entry(Flavor::V6_12, 0, 0, 0x80, ft, 6, 5)], &c).unwrap_err();
    assert!(
        err.to_string().contains("not a slot of the guest's pv_ops"),
        "{err}"
    );
}

#[test]
fn features_outside_x86_capability_are_refused() {
    for flavor in [Flavor::V6_1, Flavor::V6_12] {
        let mut text = vec![0x90u8; 0x100];
        let e = entry(flavor, 0, 0, 0x80, 30 * 32 + 1, 3, 3);
        let err = run(&mut text, &[e], &cpu(flavor, &[])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("feature 30*32+1"), "{msg}");
        assert!(
            msg.contains("outside the guest's x86_capability (21 words)"),
            "{msg}"
        );
    }
}

#[test]
fn malformed_tables_are_refused() {
    let c = cpu(Flavor::V6_1, &[1]);
    let mut text = vec![0x90u8; 0x100];
    let mut e = entry(Flavor::V6_1, 0, 0, 0x80, 1, 3, 3);
    e.pop();
    assert!(matches!(
        run(&mut text, &[e], &c),
        Err(AltError::TableSize {
            size: 11,
            entry: 12
        })
    ));
    // A site outside the patch's code.
    let e = entry(Flavor::V6_1, 0, 0x1000, 0x80, 1, 3, 3);
    let err = run(&mut text, &[e], &c).unwrap_err();
    assert!(
        err.to_string().contains("outside the patch's loaded code"),
        "{err}"
    );
    // A replacement longer than the site.
    let e = entry(Flavor::V6_1, 0, 0, 0x80, 1, 2, 3);
    let err = run(&mut text, &[e], &c).unwrap_err();
    assert!(
        err.to_string().contains("longer than the original"),
        "{err}"
    );
}

#[test]
fn releases_pick_the_rules() {
    assert_eq!(
        Flavor::of_release("6.1.0-57-cloud-amd64"),
        Some(Flavor::V6_1)
    );
    assert_eq!(
        Flavor::of_release("6.12.95+deb12-cloud-amd64"),
        Some(Flavor::V6_12)
    );
    assert_eq!(Flavor::of_release("6.10.3"), None);
    assert_eq!(Flavor::of_release("5.10.0-30-amd64"), None);
    assert_eq!(Flavor::of_release(""), None);
}

#[test]
fn nops_are_the_kernels() {
    for len in 1..=11 {
        assert_eq!(Flavor::V6_12.nop(len).len(), len);
        let (insn, _) = decode(Flavor::V6_12.nop(len)).unwrap();
        assert_eq!(insn.len(), len, "one instruction");
        assert!(is_nop_6_12(Flavor::V6_12.nop(len)));
    }
    assert!(Flavor::V6_1.nop(9).is_empty());
    assert!(!is_nop_6_12(&[0xf3, 0x90]), "pause");
}
