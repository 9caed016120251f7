//! x86-64 relocation arithmetic, as the kernel's `apply_relocate_add`
//! (arch/x86/kernel/module.c) does it: compute, range-check, refuse to
//! overwrite non-zero bytes, write little-endian.

use crate::module::RelocKind;

/// Why one relocation cannot be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelocProblem {
    /// The value does not fit the field.
    Overflow {
        /// The computed value (S + A or S + A - P), before truncation.
        value: u64,
    },
    /// The field already holds something (a relocation applied twice, or
    /// a corrupt module); the kernel refuses this too.
    NotZero,
    /// The field lies outside the buffer.
    OutOfBounds,
}

/// The value a relocation writes: S + A, or S + A - P for PC-relative
/// kinds, in wrapping 64-bit arithmetic, then range-checked exactly as the
/// kernel checks it: 32 bits zero-extended for R_X86_64_32, sign-extended
/// for R_X86_64_32S, PC32 and PLT32.
pub fn value(kind: RelocKind, s: u64, a: i64, p: u64) -> Result<u64, RelocProblem> {
    let mut v = s.wrapping_add_signed(a);
    if kind.pc_relative() {
        v = v.wrapping_sub(p);
    }
    let fits = match kind {
        RelocKind::Abs64 => true,
        RelocKind::Abs32 => v <= u64::from(u32::MAX),
        RelocKind::Abs32S | RelocKind::Pc32 | RelocKind::Plt32 => v as i64 == i64::from(v as i32),
    };
    if fits {
        Ok(v)
    } else {
        Err(RelocProblem::Overflow { value: v })
    }
}

/// Writes `value` into `buf` at `offset` with the field width of `kind`.
pub fn write(buf: &mut [u8], offset: u64, kind: RelocKind, value: u64) -> Result<(), RelocProblem> {
    let width = usize::try_from(kind.width()).map_err(|_| RelocProblem::OutOfBounds)?;
    let start = usize::try_from(offset).map_err(|_| RelocProblem::OutOfBounds)?;
    let field = start
        .checked_add(width)
        .and_then(|end| buf.get_mut(start..end))
        .ok_or(RelocProblem::OutOfBounds)?;
    if field.iter().any(|&b| b != 0) {
        return Err(RelocProblem::NotZero);
    }
    field.copy_from_slice(&value.to_le_bytes()[..width]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KTEXT: u64 = 0xffff_ffff_8b9f_5980;

    #[test]
    fn pc_relative() {
        // call from P to S: rel32 = S + A - P with A = -4.
        let p = 0xffff_ffff_c000_0010u64;
        let v = value(RelocKind::Plt32, KTEXT, -4, p).unwrap();
        assert_eq!(v as u32 as i32 as i64, KTEXT as i64 - 4 - p as i64);
        // Decodes back: next instruction + rel32 = S.
        assert_eq!((p + 4).wrapping_add(v as u32 as i32 as i64 as u64), KTEXT);
        // Far away does not fit (0 would: it is within 2 GiB of the top
        // of the address space, modulo 2^64, as the kernel computes it).
        assert!(matches!(
            value(RelocKind::Pc32, 0x1000_0000_0000, 0, KTEXT),
            Err(RelocProblem::Overflow { .. })
        ));
        assert_eq!(
            value(RelocKind::Pc32, 100, 0, 100 + (1 << 31)),
            Ok((-(1i64 << 31)) as u64)
        );
        assert!(value(RelocKind::Pc32, 100 + (1 << 31), 0, 100).is_err());
        assert!(value(RelocKind::Pc32, 99 + (1 << 31), 0, 100 - 1).is_err());
        assert!(value(RelocKind::Pc32, 98 + (1 << 31), 0, 100 - 1).is_ok());
    }

    #[test]
    fn absolute() {
        assert_eq!(value(RelocKind::Abs64, KTEXT, 0x10, 0), Ok(KTEXT + 0x10));
        // Kernel addresses fit 32S (sign-extended), not 32.
        let v = value(RelocKind::Abs32S, KTEXT, 0, 0).unwrap();
        assert_eq!(v as u32 as i32 as i64 as u64, KTEXT);
        assert!(value(RelocKind::Abs32, KTEXT, 0, 0).is_err());
        // Per-CPU offsets fit both.
        assert_eq!(value(RelocKind::Abs32S, 0x1fb80, 0, 0), Ok(0x1fb80));
        assert_eq!(value(RelocKind::Abs32, 0x1fb80, 0, 0), Ok(0x1fb80));
        assert_eq!(value(RelocKind::Abs32, 0xffff_ffff, 0, 0), Ok(0xffff_ffff));
        assert!(value(RelocKind::Abs32, 0x1_0000_0000, 0, 0).is_err());
        assert!(value(RelocKind::Abs32, 0, -1, 0).is_err());
        // 0x8000_0000 is neither a positive i32 nor a sign-extended address.
        assert!(value(RelocKind::Abs32S, 0x8000_0000, 0, 0).is_err());
        assert!(value(RelocKind::Abs32S, 0xffff_ffff_7fff_ffff, 0, 0).is_err());
        assert!(value(RelocKind::Abs32S, 0xffff_ffff_8000_0000, 0, 0).is_ok());
        assert!(value(RelocKind::Abs32S, 0x7fff_ffff, 0, 0).is_ok());
        // Wrapping S + A stays as the hardware computes it for 64-bit fields.
        assert_eq!(value(RelocKind::Abs64, u64::MAX, 1, 0), Ok(0));
    }

    #[test]
    fn writing() {
        let mut b = [0u8; 8];
        write(&mut b, 2, RelocKind::Pc32, 0xffff_fff0).unwrap();
        assert_eq!(b, [0, 0, 0xf0, 0xff, 0xff, 0xff, 0, 0]);
        assert_eq!(
            write(&mut b, 2, RelocKind::Pc32, 1),
            Err(RelocProblem::NotZero)
        );
        assert_eq!(
            write(&mut b, 5, RelocKind::Pc32, 1),
            Err(RelocProblem::OutOfBounds)
        );
        assert_eq!(
            write(&mut b, 1, RelocKind::Abs64, 1),
            Err(RelocProblem::OutOfBounds)
        );
        assert_eq!(
            write(&mut b, u64::MAX, RelocKind::Abs32, 1),
            Err(RelocProblem::OutOfBounds)
        );
        let mut b = [0u8; 8];
        write(&mut b, 0, RelocKind::Abs64, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0x1122_3344_5566_7788);
    }
}
