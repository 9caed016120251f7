//! vCPU threads and their pause state machine.
//!
//! Each vCPU runs `KVM_RUN` on its own thread. To pause, the controller sets
//! the vCPU's `pause` flag and sends it [`kick_signal`]; the handler sets
//! `kvm_run.immediate_exit`, so the thread leaves (or never enters) guest
//! mode even if the signal lands between the flag check and the ioctl. KVM
//! completes a pending port or MMIO read before honouring `immediate_exit`,
//! so parked register state is always consistent. A parked thread acks, then
//! serves register snapshots until told to resume.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;

use kvm_bindings::{kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use thiserror::Error;

use crate::devices::{GuestEvent, PioDevices};
use crate::vm::VmExit;

/// A failure to read a parked vCPU's state from KVM.
#[derive(Debug, Clone, Error)]
pub enum VcpuError {
    /// A KVM get ioctl failed.
    #[error("reading vCPU {id} {what} failed: {source}")]
    Read {
        /// The vCPU's index.
        id: u8,
        /// What was being read (registers, special registers or MSRs).
        what: &'static str,
        /// The ioctl's error.
        source: kvm_ioctls::Error,
    },
}

/// Registers of a paused vCPU, everything the patch engine needs to find
/// the kernel from outside.
#[derive(Debug, Clone)]
pub struct VcpuState {
    /// The vCPU's index.
    pub id: u8,
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment and control registers (CR0/CR3/CR4, EFER, IDT, CS).
    pub sregs: kvm_sregs,
    /// IA32_LSTAR: the kernel's `syscall` entry (kernel-virtual), which
    /// confirms where `_text` is.
    pub lstar: u64,
    /// IA32_GS_BASE: the per-CPU area while the vCPU is in the kernel.
    pub gs_base: u64,
    /// IA32_KERNEL_GS_BASE: the other GS base, swapped in by `swapgs`.
    pub kernel_gs_base: u64,
}

/// Why a vCPU thread stopped running the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuExitReason {
    /// The guest powered off, reset or panicked through a device port.
    Guest(GuestEvent),
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    TripleFault,
    /// Something KVM or the guest did that we cannot continue from.
    Fatal(String),
    /// The controller asked the thread to stop.
    Stopped,
}

/// Messages from a vCPU thread to its controller.
#[derive(Debug)]
pub enum VcpuReport {
    /// Parked for the pause request of this generation.
    Paused {
        /// The vCPU's index.
        id: u8,
        /// The `VcpuControl::generation` it parked for.
        generation: u64,
        /// Its registers as it parked: every thread reads its own, at
        /// once, instead of the controller asking each in turn inside the
        /// pause. They cannot change until the thread resumes.
        state: Box<Result<VcpuState, VcpuError>>,
    },
    /// The thread has left its run loop for good.
    Exited {
        /// The vCPU's index.
        id: u8,
        /// Why it stopped running the guest.
        reason: VcpuExitReason,
    },
}

/// Requests to a parked vCPU thread.
pub enum VcpuRequest {
    /// Leave the pause and run the guest again.
    Resume,
}

/// Flags the controller flips and the vCPU thread polls.
#[derive(Debug, Default)]
pub struct VcpuControl {
    /// Set to ask the thread to park at its next exit.
    pub pause: AtomicBool,
    /// Set to ask the thread to leave its run loop for good.
    pub stop: AtomicBool,
    /// Set by the thread once it has left its run loop.
    pub exited: AtomicBool,
    /// Generation of the pause request being honoured.
    pub generation: std::sync::atomic::AtomicU64,
}

thread_local! {
    /// `kvm_run.immediate_exit` of the vCPU owned by this thread.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: one thread-local read and one volatile byte store.
    let _ = IMMEDIATE_EXIT.try_with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: the pointer targets this thread's own kvm_run mapping and
            // is cleared before that mapping is dropped (see `VcpuThread::run`).
            unsafe { std::ptr::write_volatile(p, 1) };
        }
    });
}

/// Publishes this thread's `kvm_run.immediate_exit` to the kick handler
/// for as long as it lives.
struct ImmediateExitPointer;

impl ImmediateExitPointer {
    fn publish(ptr: *mut u8) -> Self {
        IMMEDIATE_EXIT.with(|p| p.set(ptr));
        Self
    }
}

impl Drop for ImmediateExitPointer {
    fn drop(&mut self) {
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
    }
}

/// Runs a vCPU's loop, turning a panic into a fatal exit. Without this a
/// panicking vCPU thread would vanish without telling the VM loop, which
/// would then wait for an exit forever: a zombie VMM. With it the VM stops
/// with the fatal-error exit code and says which vCPU failed and why.
fn contain_panic(id: u8, run: impl FnOnce() -> VcpuExitReason) -> VcpuExitReason {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
        Ok(reason) => reason,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".to_owned());
            tracing::error!(vcpu = id, "the vCPU thread panicked: {what}");
            VcpuExitReason::Fatal(format!(
                "the vCPU {id} thread panicked (a klpvisor bug; please report it with the \
                 log): {what}"
            ))
        }
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
}

/// How often a vCPU held in a module hook looks for a pause request.
const HOOK_POLL: std::time::Duration = std::time::Duration::from_millis(1);

const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_GS_BASE: u32 = 0xc000_0101;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Everything a vCPU thread owns.
pub struct VcpuThread {
    /// The vCPU's index (KVM's vCPU id).
    pub id: u8,
    /// The KVM vCPU this thread runs.
    pub fd: VcpuFd,
    /// The flags shared with the controller.
    pub control: Arc<VcpuControl>,
    /// The VM's port-I/O devices, shared by every vCPU thread.
    pub devices: Arc<PioDevices>,
    /// Requests served while parked.
    pub requests: Receiver<VcpuRequest>,
    /// Pause acks and the final exit go here.
    pub reports: Sender<VcpuReport>,
    /// Exits that end the VM's run (guest events, triple faults, fatal errors).
    pub exits: Sender<VmExit>,
}

enum Step {
    Continue,
    /// The guest read a module hook's port (`klpvisor_engine::hook`).
    Hook(crate::devices::module_hooks::Event),
    /// The last exit was port or MMIO I/O: KVM finishes the instruction
    /// (register write-back, RIP advance) only on the next KVM_RUN.
    ContinueIo,
    Exit(VcpuExitReason),
}

impl VcpuThread {
    /// The thread body: run until the guest or the controller ends it.
    pub fn run(mut self) {
        crate::seccomp::enter_or_exit(crate::seccomp::Kind::Vcpu);
        let ptr: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        let reason = {
            // Cleared on every way out of this block, unwinding included,
            // so a kick never writes through a pointer into a mapping that
            // is being dropped.
            let _published = ImmediateExitPointer::publish(ptr);
            contain_panic(self.id, || self.run_loop())
        };
        tracing::debug!(vcpu = self.id, ?reason, "vCPU thread exits");
        self.control.exited.store(true, Ordering::Release);
        let exit = match &reason {
            VcpuExitReason::Guest(event) => Some(VmExit::Guest(*event)),
            VcpuExitReason::TripleFault => Some(VmExit::TripleFault { vcpu: self.id }),
            VcpuExitReason::Fatal(reason) => Some(VmExit::Fatal {
                vcpu: self.id,
                reason: reason.clone(),
            }),
            VcpuExitReason::Stopped => None,
        };
        if let Some(exit) = exit {
            let _ = self.exits.send(exit);
        }
        let _ = self.reports.send(VcpuReport::Exited {
            id: self.id,
            reason,
        });
    }

    fn run_loop(&mut self) -> VcpuExitReason {
        let mut io_pending = false;
        loop {
            if self.control.stop.load(Ordering::Acquire) {
                return VcpuExitReason::Stopped;
            }
            if self.control.pause.load(Ordering::Acquire) {
                if io_pending {
                    if let Some(reason) = self.complete_io() {
                        return reason;
                    }
                    io_pending = false;
                }
                if !self.park() {
                    return VcpuExitReason::Stopped;
                }
                continue;
            }
            match self.step() {
                Step::Continue => io_pending = false,
                Step::Hook(event) => {
                    io_pending = false;
                    if let Some(reason) = self.complete_io() {
                        return reason;
                    }
                    if let Some(reason) = self.hook(event) {
                        return reason;
                    }
                }
                Step::ContinueIo => io_pending = true,
                Step::Exit(VcpuExitReason::TripleFault) => {
                    self.log_fault_state();
                    return VcpuExitReason::TripleFault;
                }
                Step::Exit(reason) => return reason,
            }
        }
    }

    /// Lets KVM finish a pending I/O instruction without entering the guest,
    /// so a parked vCPU's registers are those after the instruction.
    fn complete_io(&mut self) -> Option<VcpuExitReason> {
        self.fd.set_kvm_immediate_exit(1);
        let result = match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(VcpuExitReason::Fatal(format!("completing I/O failed: {e}"))),
            Ok(exit) => Some(VcpuExitReason::Fatal(format!(
                "KVM entered the guest while completing I/O: {exit:?}"
            ))),
        };
        self.fd.set_kvm_immediate_exit(0);
        result
    }

    /// This vCPU stopped in a module hook, its `in` completed: hands the
    /// event to the handler, parks whenever a pause is asked for while
    /// waiting for the answer, and puts the answer in `rax` (with a call's
    /// function in `r10`, its first argument in `r11` and the next three
    /// in `rsi`, `rdx` and `rcx`).
    fn hook(&mut self, event: crate::devices::module_hooks::Event) -> Option<VcpuExitReason> {
        let mut regs = match self.fd.get_regs() {
            Ok(r) => r,
            Err(e) => {
                return Some(VcpuExitReason::Fatal(format!(
                    "reading registers in a module hook failed: {e}"
                )))
            }
        };
        // The privilege level, from CS's selector (its low two bits).
        let cpl = match self.fd.get_sregs() {
            Ok(s) => (s.cs.selector & 3) as u8,
            Err(e) => {
                return Some(VcpuExitReason::Fatal(format!(
                    "reading special registers in a module hook failed: {e}"
                )))
            }
        };
        let Some(answer) = self.devices.module_hooks.send(self.id, event, &regs, cpl) else {
            // No handler: rax is 0, the call goes on.
            return None;
        };
        let answer = loop {
            match answer.recv_timeout(HOOK_POLL) {
                Ok(v) => break v,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if self.control.stop.load(Ordering::Acquire) {
                        return Some(VcpuExitReason::Stopped);
                    }
                    if self.control.pause.load(Ordering::Acquire) && !self.park() {
                        return Some(VcpuExitReason::Stopped);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    break crate::devices::module_hooks::Answer::Return(0)
                }
            }
        };
        match answer {
            crate::devices::module_hooks::Answer::Return(v) => regs.rax = i64::from(v) as u64,
            crate::devices::module_hooks::Answer::Call { func, args } => {
                // The stub moves r11 into rdi; the other argument
                // registers it leaves alone until the call.
                regs.rax = klpvisor_engine::hook::CALL as u64;
                regs.r10 = func;
                regs.r11 = args[0];
                regs.rsi = args[1];
                regs.rdx = args[2];
                regs.rcx = args[3];
            }
        }
        match self.fd.set_regs(&regs) {
            Ok(()) => None,
            Err(e) => Some(VcpuExitReason::Fatal(format!(
                "writing registers in a module hook failed: {e}"
            ))),
        }
    }

    /// Reads its registers, acks the pause with them, and waits until
    /// resumed. Returns false when the controller has gone away.
    fn park(&mut self) -> bool {
        let generation = self.control.generation.load(Ordering::Acquire);
        if self
            .reports
            .send(VcpuReport::Paused {
                id: self.id,
                generation,
                state: Box::new(self.snapshot()),
            })
            .is_err()
        {
            return false;
        }
        match self.requests.recv() {
            Ok(VcpuRequest::Resume) => true,
            Err(_) => false,
        }
    }

    fn step(&mut self) -> Step {
        let id = self.id;
        match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    if let Some(event) = crate::devices::module_hooks::Event::from_port(port) {
                        // The answer goes into rax once the read is done.
                        data.fill(0);
                        return Step::Hook(event);
                    }
                    self.devices.read(port, data);
                    Step::ContinueIo
                }
                VcpuExit::IoOut(port, data) => match self.devices.write(port, data) {
                    Some(event) => Step::Exit(VcpuExitReason::Guest(event)),
                    None => Step::ContinueIo,
                },
                VcpuExit::MmioRead(addr, data) => {
                    if self.devices.mmio_read(addr, data) {
                        return Step::ContinueIo;
                    }
                    tracing::trace!(vcpu = id, addr, "unclaimed MMIO read");
                    data.fill(0xff);
                    Step::ContinueIo
                }
                VcpuExit::MmioWrite(addr, data) => {
                    if self.devices.mmio_write(addr, data) {
                        return Step::ContinueIo;
                    }
                    tracing::trace!(vcpu = id, addr, "unclaimed MMIO write");
                    Step::ContinueIo
                }
                VcpuExit::Shutdown => Step::Exit(VcpuExitReason::TripleFault),
                VcpuExit::Hlt => Step::Exit(VcpuExitReason::Fatal(
                    "guest executed HLT with interrupts disabled outside the in-kernel irqchip"
                        .into(),
                )),
                VcpuExit::SystemEvent(kind, _) => match kind {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => {
                        Step::Exit(VcpuExitReason::Guest(GuestEvent::PowerOff))
                    }
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => {
                        Step::Exit(VcpuExitReason::Guest(GuestEvent::Reset))
                    }
                    kvm_bindings::KVM_SYSTEM_EVENT_CRASH => {
                        Step::Exit(VcpuExitReason::Guest(GuestEvent::Panic))
                    }
                    other => Step::Exit(VcpuExitReason::Fatal(format!(
                        "unknown KVM system event {other}"
                    ))),
                },
                VcpuExit::FailEntry(reason, cpu) => Step::Exit(VcpuExitReason::Fatal(format!(
                    "VM entry failed on host CPU {cpu}: hardware reason {reason:#x}"
                ))),
                VcpuExit::InternalError => {
                    Step::Exit(VcpuExitReason::Fatal("KVM internal error".into()))
                }
                VcpuExit::Intr => Step::Continue,
                other => Step::Exit(VcpuExitReason::Fatal(format!(
                    "unexpected KVM exit {other:?}"
                ))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Step::Continue
            }
            Err(e) => Step::Exit(VcpuExitReason::Fatal(format!("KVM_RUN failed: {e}"))),
        }
    }

    /// The registers a triple fault left behind, for whoever reads the log:
    /// on Intel KVM keeps them after KVM_EXIT_SHUTDOWN, and RIP, CR2 and the
    /// IDT say which fault could not be delivered. On AMD KVM has already
    /// reinitialized the VMCB (its state is undefined after a shutdown
    /// intercept), so the vCPU reads as reset; say so instead.
    fn log_fault_state(&self) {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) if r.rip == 0xfff0 && s.cs.selector == 0xf000 => tracing::error!(
                vcpu = self.id,
                "triple fault; KVM reset the vCPU, its registers at the fault are lost"
            ),
            (Ok(r), Ok(s)) => tracing::error!(
                vcpu = self.id,
                rip = format_args!("{:#x}", r.rip),
                rsp = format_args!("{:#x}", r.rsp),
                rflags = format_args!("{:#x}", r.rflags),
                cr0 = format_args!("{:#x}", s.cr0),
                cr2 = format_args!("{:#x}", s.cr2),
                cr3 = format_args!("{:#x}", s.cr3),
                cr4 = format_args!("{:#x}", s.cr4),
                efer = format_args!("{:#x}", s.efer),
                idt = format_args!("{:#x}+{:#x}", s.idt.base, s.idt.limit),
                cs = format_args!("{:#x}", s.cs.selector),
                "triple fault"
            ),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(vcpu = self.id, "triple fault; registers unreadable: {e}")
            }
        }
    }

    fn snapshot(&self) -> Result<VcpuState, VcpuError> {
        let id = self.id;
        let err = |what| move |source| VcpuError::Read { id, what, source };
        let regs = self.fd.get_regs().map_err(err("registers"))?;
        let sregs = self.fd.get_sregs().map_err(err("special registers"))?;
        let mut msrs = Msrs::from_entries(&[
            kvm_bindings::kvm_msr_entry {
                index: MSR_LSTAR,
                ..Default::default()
            },
            kvm_bindings::kvm_msr_entry {
                index: MSR_GS_BASE,
                ..Default::default()
            },
            kvm_bindings::kvm_msr_entry {
                index: MSR_KERNEL_GS_BASE,
                ..Default::default()
            },
        ])
        .map_err(|_| VcpuError::Read {
            id,
            what: "MSRs",
            source: kvm_ioctls::Error::new(libc::ENOMEM),
        })?;
        self.fd.get_msrs(&mut msrs).map_err(err("MSRs"))?;
        let m = msrs.as_slice();
        Ok(VcpuState {
            id,
            regs,
            sregs,
            lstar: m[0].data,
            gs_base: m[1].data,
            kernel_gs_base: m[2].data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_vcpu_loop_becomes_a_fatal_exit_naming_the_vcpu() {
        let r = contain_panic(3, || panic!("slice index 4104 out of range"));
        match r {
            VcpuExitReason::Fatal(why) => {
                assert!(why.contains("vCPU 3 thread panicked"), "{why}");
                assert!(why.contains("slice index 4104"), "{why}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            contain_panic(0, || VcpuExitReason::Stopped),
            VcpuExitReason::Stopped
        ));
    }

    #[test]
    fn the_kick_pointer_is_cleared_when_its_owner_unwinds() {
        let mut byte = 0u8;
        let ptr: *mut u8 = &mut byte;
        let _ = std::panic::catch_unwind(|| {
            let _published = ImmediateExitPointer::publish(ptr);
            assert_eq!(IMMEDIATE_EXIT.with(|p| p.get()), ptr);
            panic!("unwind");
        });
        assert!(IMMEDIATE_EXIT.with(|p| p.get()).is_null());
    }
}
