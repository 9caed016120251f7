//! Static keys in patch code: what `jump_label_add_module` and
//! `jump_label_del_module` (kernel/jump_label.c) do for a module's
//! `__jump_table`, done from outside with every vCPU paused.
//!
//! Why: a static branch or tracepoint in patch code is a 2- or 5-byte site
//! that is a jump or a nop as its key says. The kernel flips every site of
//! a key when the key changes (`echo 1 > .../enable` on a tracepoint), by
//! walking the key's entries: the kernel's own, and one `struct
//! static_key_mod` per module that uses the key. So the patch's entries go
//! on that list, exactly as the module loader puts a module's there, and
//! the kernel's `text_poke()` then flips the patch's sites itself.
//!
//! At registration, per key the patch uses:
//! - the sites are written for the key's state now (jump iff enabled XOR
//!   the entry's branch bit), as `jump_label_add_module` updates sites
//!   whose initial state differs;
//! - a `static_key_mod` of ours (in the registration image) goes at the
//!   head of the key's list; a key with no list yet first gets one whose
//!   only other member holds the kernel's own entries (the "holder", also
//!   ours);
//! - a key sealed at boot (6.10+: linked, no list) gets its sites written
//!   and nothing else, as the kernel does.
//!
//! At removal, ours leaves the list. When only our holder would be left,
//! the list folds back into the key (`static_key_set_entries`), as the
//! kernel does. When a guest module joined the list after us and our
//! holder would stay behind, removal waits: the kernel `kfree`s the last
//! member when that module goes, and it must not free memory of ours.
//!
//! Refused, before anything is written:
//! - `jump_label_mutex` held or a key mid-switch (`enabled` < 0): retried,
//!   like a busy module registry;
//! - a key outside the kernel image (a module's key): not supported yet;
//! - a list that does not end within [`MAX_LIST`] members: corrupt guest.

use super::links::{Mem, Word};
use super::RegisterError;

/// `struct static_key`: `atomic_t enabled` at 0, the `type`/`entries`/
/// `next` union at 8.
pub const KEY_TYPE: u64 = 8;
/// `struct static_key_mod { next, entries, mod }`.
pub const JLM_SIZE: u64 = 24;
const JLM_NEXT: u64 = 0;
const JLM_ENTRIES: u64 = 8;
const JLM_MOD: u64 = 16;
/// `JUMP_TYPE_TRUE`, `JUMP_TYPE_LINKED`, `JUMP_TYPE_MASK`.
const TYPE_TRUE: u64 = 1;
const TYPE_LINKED: u64 = 2;
const TYPE_MASK: u64 = 3;
/// Members of one key's list we follow before calling it corrupt.
pub const MAX_LIST: usize = 4096;

/// x86's `x86_nops[2]` and `x86_nops[5]`: the nops `__jump_label_patch`
/// expects at a disabled site.
const NOP2: [u8; 2] = [0x66, 0x90];
const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

/// The guest's jump-label globals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JumpGlobals {
    /// `jump_label_mutex`, held by every writer of keys' lists and sites.
    pub mutex: u64,
    /// `[_text, _end)`: the keys followed must be the kernel's.
    pub image: (u64, u64),
}

/// One site of the patch: `code` jumps to `target` or is a nop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JumpSite {
    /// The site's address in patch code.
    pub code: u64,
    /// Where it jumps when it jumps.
    pub target: u64,
    /// The entry's branch bit: the site jumps when the key is off.
    pub branch: bool,
}

/// One static key the patch uses, and where its parts of the
/// registration image are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JumpKey {
    /// The `struct static_key`.
    pub key: u64,
    /// The key's first entry in the module's sorted `__jump_table`.
    pub entries: u64,
    /// Our `static_key_mod` for this key.
    pub jlm: u64,
    /// A second one, holding the kernel's entries if the key has no list.
    pub holder: u64,
    /// Its sites in patch code.
    pub sites: Vec<JumpSite>,
}

/// Bytes to write at a site: (va, old, new).
pub type Poke = (u64, Vec<u8>, Vec<u8>);

/// Refuses keys the patch cannot follow: any outside the kernel image.
pub fn check(g: &JumpGlobals, keys: &[JumpKey]) -> Result<(), RegisterError> {
    match keys
        .iter()
        .find(|k| !(g.image.0..g.image.1).contains(&k.key))
    {
        Some(k) => Err(RegisterError::ForeignKey { key: k.key }),
        None => Ok(()),
    }
}

/// Refuses while a key is being switched in the guest (and keys
/// [`check`] refuses).
pub fn quiet(mem: &dyn Mem, g: &JumpGlobals, keys: &[JumpKey]) -> Result<(), RegisterError> {
    if keys.is_empty() {
        return Ok(());
    }
    check(g, keys)?;
    if mem.read_u64(g.mutex)? != 0 {
        return Err(RegisterError::Busy(
            "jump_label_mutex is held (a static key is being switched)",
        ));
    }
    for k in keys {
        if enabled(mem, k.key)? < 0 {
            return Err(RegisterError::Busy("a static key is mid-switch"));
        }
    }
    Ok(())
}

fn enabled(mem: &dyn Mem, key: u64) -> Result<i32, RegisterError> {
    Ok(mem.read_u64(key)? as u32 as i32)
}

/// The bytes a site should hold: a jump to its target or the nop of its
/// length, which is read from what is there now.
fn site_bytes(site: &JumpSite, now: &[u8], jump: bool) -> Result<Vec<u8>, RegisterError> {
    let len = match now {
        [0xeb, ..] | [0x66, 0x90, ..] => 2,
        [0xe9, ..] | [0x0f, 0x1f, 0x44, 0x00, 0x00, ..] => 5,
        _ => {
            return Err(RegisterError::Unexpected(
                "a static-key site in patch code is neither a jmp nor the kernel's nop",
            ))
        }
    };
    if !jump {
        return Ok(if len == 2 {
            NOP2.to_vec()
        } else {
            NOP5.to_vec()
        });
    }
    let disp = site.target.wrapping_sub(site.code + len) as i64;
    if len == 2 {
        let d = i8::try_from(disp).map_err(|_| RegisterError::Reach("a 2-byte static-key jump"))?;
        Ok(vec![0xeb, d as u8])
    } else {
        let d = i32::try_from(disp).map_err(|_| RegisterError::Reach("a static-key jump"))?;
        let mut v = vec![0xe9];
        v.extend_from_slice(&d.to_le_bytes());
        Ok(v)
    }
}

/// The words and site bytes that register `keys` for `module` (vCPUs
/// paused; [`quiet`] first).
pub fn register(
    mem: &dyn Mem,
    g: &JumpGlobals,
    module: u64,
    keys: &[JumpKey],
) -> Result<(Vec<Word>, Vec<Poke>), RegisterError> {
    quiet(mem, g, keys)?;
    let mut words = Vec::new();
    let mut pokes = Vec::new();
    for k in keys {
        let on = enabled(mem, k.key)? > 0;
        for s in &k.sites {
            let now = mem.read_u64(s.code)?.to_le_bytes();
            let want = site_bytes(s, &now, on ^ s.branch)?;
            let old = now[..want.len()].to_vec();
            if old != want {
                pokes.push((s.code, old, want));
            }
        }
        let ty = mem.read_u64(k.key + KEY_TYPE)?;
        let ptr = ty & !TYPE_MASK;
        if ty & TYPE_LINKED != 0 && ptr == 0 {
            // Sealed at boot: no list to join, the key never changes.
            continue;
        }
        let head = if ty & TYPE_LINKED != 0 {
            ptr
        } else {
            // The holder keeps the kernel's own entries (mod NULL: vmlinux).
            words.push((k.holder + JLM_NEXT, 0, 0));
            words.push((k.holder + JLM_ENTRIES, 0, ptr));
            words.push((k.holder + JLM_MOD, 0, 0));
            k.holder
        };
        words.push((k.jlm + JLM_NEXT, 0, head));
        words.push((k.jlm + JLM_ENTRIES, 0, k.entries));
        words.push((k.jlm + JLM_MOD, 0, module));
        words.push((k.key + KEY_TYPE, ty, k.jlm | (ty & TYPE_TRUE) | TYPE_LINKED));
    }
    // Words are (va, old, new): drop the no-op ones (the holder's zeros).
    words.retain(|w| w.1 != w.2);
    Ok((words, pokes))
}

/// The key's list as (member, the word that points at it).
fn list(mem: &dyn Mem, key: u64) -> Result<Vec<(u64, u64)>, RegisterError> {
    let ty = mem.read_u64(key + KEY_TYPE)?;
    let mut out = Vec::new();
    if ty & TYPE_LINKED == 0 {
        return Ok(out);
    }
    let (mut at, mut next) = (key + KEY_TYPE, ty & !TYPE_MASK);
    while next != 0 {
        if out.len() >= MAX_LIST || next & 7 != 0 {
            return Err(RegisterError::Corrupt(
                "a static key's module list does not end or is misaligned",
            ));
        }
        out.push((next, at));
        at = next + JLM_NEXT;
        next = mem.read_u64(at)?;
    }
    Ok(out)
}

/// The words that take `module`'s entries off `keys`' lists, folding a
/// list back into its key when only our holder would remain (vCPUs
/// paused).
pub fn unregister(
    mem: &dyn Mem,
    g: &JumpGlobals,
    keys: &[JumpKey],
) -> Result<Vec<Word>, RegisterError> {
    quiet(mem, g, keys)?;
    let mut words = Vec::new();
    for k in keys {
        let ty = mem.read_u64(k.key + KEY_TYPE)?;
        let members = list(mem, k.key)?;
        let Some(i) = members.iter().position(|&(m, _)| m == k.jlm) else {
            // Never linked (a sealed key), or already off.
            continue;
        };
        let after = mem.read_u64(k.jlm + JLM_NEXT)?;
        let rest: Vec<u64> = members
            .iter()
            .map(|&(m, _)| m)
            .filter(|&m| m != k.jlm)
            .collect();
        if rest == [k.holder] {
            // Fold back: the key points at the kernel's entries again.
            let entries = mem.read_u64(k.holder + JLM_ENTRIES)?;
            words.push((k.key + KEY_TYPE, ty, entries | (ty & TYPE_TRUE)));
            continue;
        }
        if rest.contains(&k.holder) {
            return Err(RegisterError::KeyShared { key: k.key });
        }
        let (_, pointer) = members[i];
        let old = mem.read_u64(pointer)?;
        let new = if pointer == k.key + KEY_TYPE {
            after | (ty & TYPE_MASK)
        } else {
            after
        };
        words.push((pointer, old, new));
    }
    Ok(words)
}

/// The guest words registration and removal may write for `keys`: each
/// key's `type` and the `next` of each member of its list, found by
/// walking the lists, not from the edit.
pub fn allowed(
    mem: &dyn Mem,
    g: &JumpGlobals,
    keys: &[JumpKey],
) -> Result<Vec<u64>, RegisterError> {
    let mut out = Vec::new();
    for k in keys {
        if !(g.image.0..g.image.1).contains(&k.key) {
            return Err(RegisterError::ForeignKey { key: k.key });
        }
        out.push(k.key + KEY_TYPE);
        out.extend(list(mem, k.key)?.iter().map(|&(m, _)| m + JLM_NEXT));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    #[derive(Default)]
    struct Fake(RefCell<BTreeMap<u64, u64>>);

    impl Mem for Fake {
        fn read_u64(&self, va: u64) -> Result<u64, RegisterError> {
            // Unaligned reads (sites) come from two words.
            let m = self.0.borrow();
            let lo = m.get(&(va & !7)).copied().unwrap_or(0);
            let hi = m.get(&((va & !7) + 8)).copied().unwrap_or(0);
            let sh = (va & 7) * 8;
            Ok(if sh == 0 {
                lo
            } else {
                (lo >> sh) | (hi << (64 - sh))
            })
        }
    }

    impl Fake {
        fn set(&self, va: u64, v: u64) {
            self.0.borrow_mut().insert(va, v);
        }
        fn get(&self, va: u64) -> u64 {
            self.read_u64(va).unwrap()
        }
        fn apply(&self, words: &[Word]) {
            for &(va, old, new) in words {
                assert_eq!(self.get(va), old, "{va:#x}");
                self.set(va, new);
            }
        }
    }

    const G: JumpGlobals = JumpGlobals {
        mutex: 0xffff_ffff_8200_0000,
        image: (0xffff_ffff_8100_0000, 0xffff_ffff_8300_0000),
    };
    const KEY: u64 = 0xffff_ffff_8250_0008;
    const VMLINUX_ENTRIES: u64 = 0xffff_ffff_8260_0000;
    const MODULE: u64 = 0xffff_ffff_c000_0000;
    const SITE: u64 = 0xffff_ffff_8400_0000;
    const JLM: u64 = 0xffff_ffff_8410_0000;

    fn key() -> JumpKey {
        JumpKey {
            key: KEY,
            entries: 0xffff_ffff_8410_1000,
            jlm: JLM,
            holder: JLM + JLM_SIZE,
            sites: vec![JumpSite {
                code: SITE,
                target: SITE + 0x40,
                branch: false,
            }],
        }
    }

    fn guest(enabled: u64) -> Fake {
        let f = Fake::default();
        f.set(KEY, enabled);
        f.set(KEY + KEY_TYPE, VMLINUX_ENTRIES);
        // A 5-byte nop at the site, as objtool leaves it.
        f.set(
            SITE,
            u64::from_le_bytes([0x0f, 0x1f, 0x44, 0, 0, 0xcc, 0xcc, 0xcc]),
        );
        f
    }

    #[test]
    fn an_unlinked_key_gets_our_entry_and_a_holder_then_folds_back() {
        let f = guest(0);
        let before = f.get(KEY + KEY_TYPE);
        let (words, pokes) = register(&f, &G, MODULE, &[key()]).unwrap();
        assert!(pokes.is_empty(), "a disabled key leaves the nop");
        f.apply(&words);
        assert_eq!(f.get(KEY + KEY_TYPE), JLM | TYPE_LINKED);
        assert_eq!(f.get(JLM + JLM_NEXT), JLM + JLM_SIZE);
        assert_eq!(f.get(JLM + JLM_MOD), MODULE);
        assert_eq!(f.get(JLM + JLM_SIZE + JLM_ENTRIES), VMLINUX_ENTRIES);
        let allowed = allowed(&f, &G, &[key()]).unwrap();
        assert!(allowed.contains(&(KEY + KEY_TYPE)));
        let words = unregister(&f, &G, &[key()]).unwrap();
        f.apply(&words);
        assert_eq!(f.get(KEY + KEY_TYPE), before);
    }

    #[test]
    fn an_enabled_key_turns_the_site_into_a_jump() {
        let f = guest(1);
        let (_, pokes) = register(&f, &G, MODULE, &[key()]).unwrap();
        assert_eq!(pokes.len(), 1);
        let (va, old, new) = &pokes[0];
        assert_eq!(*va, SITE);
        assert_eq!(old, &NOP5.to_vec());
        // jmp rel32 to SITE + 0x40 from SITE + 5.
        assert_eq!(new, &vec![0xe9, 0x3b, 0, 0, 0]);
        // The branch bit inverts it.
        let mut k = key();
        k.sites[0].branch = true;
        let (_, pokes) = register(&f, &G, MODULE, &[k]).unwrap();
        assert!(pokes.is_empty());
    }

    #[test]
    fn a_linked_key_gets_our_entry_at_the_head_and_we_leave_it() {
        let f = guest(0);
        let theirs = 0xffff_8880_0100_0000;
        f.set(theirs + JLM_NEXT, 0);
        f.set(theirs + JLM_ENTRIES, VMLINUX_ENTRIES);
        f.set(KEY + KEY_TYPE, theirs | TYPE_LINKED | TYPE_TRUE);
        let (words, _) = register(&f, &G, MODULE, &[key()]).unwrap();
        f.apply(&words);
        assert_eq!(f.get(KEY + KEY_TYPE), JLM | TYPE_LINKED | TYPE_TRUE);
        assert_eq!(f.get(JLM + JLM_NEXT), theirs);
        let words = unregister(&f, &G, &[key()]).unwrap();
        f.apply(&words);
        assert_eq!(f.get(KEY + KEY_TYPE), theirs | TYPE_LINKED | TYPE_TRUE);
    }

    #[test]
    fn removal_waits_while_a_module_that_came_later_shares_the_list() {
        let f = guest(0);
        let (words, _) = register(&f, &G, MODULE, &[key()]).unwrap();
        f.apply(&words);
        // A guest module loads and joins at the head.
        let theirs = 0xffff_8880_0100_0000;
        f.set(theirs + JLM_NEXT, JLM);
        f.set(KEY + KEY_TYPE, theirs | TYPE_LINKED);
        let e = unregister(&f, &G, &[key()]).unwrap_err();
        assert!(matches!(e, RegisterError::KeyShared { .. }), "{e}");
        // It unloads: the kernel unlinks its entry (our two remain).
        f.set(KEY + KEY_TYPE, JLM | TYPE_LINKED);
        let words = unregister(&f, &G, &[key()]).unwrap();
        f.apply(&words);
        assert_eq!(f.get(KEY + KEY_TYPE), VMLINUX_ENTRIES);
    }

    #[test]
    fn busy_foreign_sealed_and_corrupt() {
        let f = guest(0);
        f.set(G.mutex, 0xffff_8880_0200_0000);
        assert!(register(&f, &G, MODULE, &[key()]).unwrap_err().is_busy());
        f.set(G.mutex, 0);
        f.set(KEY, u64::from(u32::MAX));
        assert!(register(&f, &G, MODULE, &[key()]).unwrap_err().is_busy());
        f.set(KEY, 0);
        let mut k = key();
        k.key = MODULE + 0x100;
        assert!(matches!(
            check(&G, std::slice::from_ref(&k)),
            Err(RegisterError::ForeignKey { .. })
        ));
        assert!(matches!(
            register(&f, &G, MODULE, &[k]),
            Err(RegisterError::ForeignKey { .. })
        ));
        assert!(check(&G, &[key()]).is_ok());
        // Sealed: the site is set, nothing is linked.
        f.set(KEY, 1);
        f.set(KEY + KEY_TYPE, TYPE_LINKED);
        let (words, pokes) = register(&f, &G, MODULE, &[key()]).unwrap();
        assert!(words.is_empty());
        assert_eq!(pokes.len(), 1);
        // A list that loops.
        let m = 0xffff_8880_0100_0000;
        f.set(KEY + KEY_TYPE, m | TYPE_LINKED);
        f.set(m, m);
        assert!(matches!(
            register(&f, &G, MODULE, &[key()]).and_then(|_| unregister(&f, &G, &[key()])),
            Err(RegisterError::Corrupt(_))
        ));
    }
}
