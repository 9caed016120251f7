//! The offline tests' shared fixtures (the QEMU dump of the real test guest
//! and kbuild-built livepatch modules) are the guest crate's: one file
//! serves both crates' dump tests, so a change to how fixtures are found
//! (a second guest kernel, say) is made once.
#![allow(dead_code)]

#[path = "../../../guest/tests/common/mod.rs"]
mod shared;

pub use shared::*;
