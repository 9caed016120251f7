//! Reaches the guest of a QEMU process that is already running, from
//! outside it, so the patch engine can work on VMs klpvisor did not start:
//!
//! - [`qmp`]: the QMP client (greeting, capabilities, commands, HMP
//!   through `human-monitor-command`, file descriptor passing);
//! - [`hmp`]: parsers of the HMP text QMP has no structured command for
//!   (`info registers`, `info mtree -f`, `gpa2hva`, `xp`);
//! - [`mem`]: guest RAM through the QEMU process's `/proc/PID/mem`;
//! - [`gdb`]: writes through QEMU's gdbstub, which drop TCG's cached
//!   translations of the code written;
//! - [`attach`]: [`QemuGuest`], all of it as a [`klpvisor_guest::Guest`],
//!   with pause and resume (`stop`/`cont`).
//!
//! QMP's socket and the guest's memory are hostile input: every read is
//! bounded, every parse refuses what it does not recognise.

pub mod attach;
pub mod gdb;
pub mod hmp;
pub mod mem;
pub mod qmp;

pub use attach::{AttachOptions, Paused, QemuError, QemuGuest};
pub use qmp::{QemuVersion, Qmp, QmpError};
