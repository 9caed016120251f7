//! klpvisor's live-patch engine: it parses a livepatch module, resolves it
//! against the guest's own kallsyms and BTF, links it into the reserved
//! arena and switches the guest to it while every vCPU is paused.
//!
//! The engine never talks to KVM. It sees the guest only through
//! [`klpvisor_guest::Guest`], which the VMM implements (and a memory dump
//! can implement for offline tests), so data flows one way: patch bytes ->
//! parse -> resolve -> link -> plan -> (pause) check, commit (resume).
#![forbid(unsafe_code)]

pub mod arena;
pub mod callback;
pub mod engine;
pub mod ftrace_ops;
pub mod hook;
pub mod link;
pub mod module;
pub mod register;
pub mod safepoint;
pub mod signature;
pub mod site;
pub mod stack;
pub mod state;
pub mod switches;
pub mod transition;
pub mod write;
