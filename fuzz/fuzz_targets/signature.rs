//! The signature trailer (versions 1 and 2, with the u16 patch level) and
//! the kernel's appended signature, parsed from arbitrary module bytes by
//! both policies: without trusted keys (strip, do not verify) and with
//! the one key of `klpvisor_fuzz::signing_key` trusted (verify).
//!
//! Invariants: whatever is accepted is a prefix of the input; a verified
//! input is accepted without keys too, as the same module at the same
//! level; an ELF input without our trailer signs at any level, and the
//! signed file verifies at exactly that level and strips back to the same
//! module.
#![no_main]

use std::sync::OnceLock;

use klpvisor_engine::signature::{sign_level, Policy, Provenance, SignatureError, TrustedKeys};
use klpvisor_fuzz::signing_key;
use libfuzzer_sys::fuzz_target;

fn trusting() -> &'static Policy {
    static P: OnceLock<Policy> = OnceLock::new();
    P.get_or_init(|| {
        Policy::RequireSigned(TrustedKeys::from_keys([(
            signing_key().public(),
            "fuzz.pub".to_string(),
        )]))
    })
}

fuzz_target!(|data: &[u8]| {
    let open = Policy::AcceptUnsigned.check(data);
    let strict = trusting().check(data);
    if let Ok(c) = &open {
        assert!(data.starts_with(c.module));
        let _ = c.provenance.to_string();
    }
    if let Ok(c) = &strict {
        assert!(data.starts_with(c.module));
        let Provenance::Verified { level, .. } = c.provenance else {
            panic!(
                "accepted with trusted keys but not verified: {:?}",
                c.provenance
            );
        };
        let Ok(o) = &open else {
            panic!("verified, but refused without keys");
        };
        assert_eq!(o.module, c.module);
        assert!(matches!(o.provenance, Provenance::NotVerified { level: l, .. } if l == level));
    }
    // Sign at a level the input picks (bytes 4..6 of an ELF header: its
    // class and data bytes, varied by the fuzzer like any other).
    let level = u16::from_le_bytes([
        data.get(4).copied().unwrap_or(0),
        data.get(5).copied().unwrap_or(0),
    ]);
    match sign_level(data, &signing_key(), level) {
        Ok(signed) => {
            // Only an open-policy error can be the kernel signature's.
            let c = match trusting().check(&signed) {
                Ok(c) => c,
                Err(SignatureError::Malformed(m)) if open.is_err() => {
                    assert!(m.contains("kernel"), "{m}");
                    return;
                }
                Err(e) => panic!("a module just signed does not verify: {e}"),
            };
            assert_eq!(c.provenance.verified_level(), Some(level));
            if let Ok(o) = &open {
                assert_eq!(o.module, c.module);
            }
        }
        Err(SignatureError::NotElf) => assert!(!data.starts_with(b"\x7fELF")),
        Err(SignatureError::AlreadySigned(_)) => {}
        Err(SignatureError::Malformed(_)) => assert!(open.is_err()),
        Err(e) => panic!("signing failed: {e}"),
    }
});
