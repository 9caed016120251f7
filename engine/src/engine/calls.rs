//! The call gate as the engine drives it: install it, arm a callback, a
//! kernel log line or klp's fake signal, and poll for its result.

use crate::callback::gate::{Gate, GateError, Progress};
use crate::callback::Call;
use crate::write::{AllowKind, Allowed, Plan, Write};
use klpvisor_api::Hex;
use klpvisor_guest::Kernel;
use klpvisor_guest::{all_vcpu_regs, Guest, VirtRead};

/// x86's `TIF_NOTIFY_SIGNAL` (arch/x86/include/asm/thread_info.h, the
/// same bit from 5.11, where it appeared, through 6.16).
const TIF_NOTIFY_SIGNAL: u64 = 1 << 17;
/// `TASK_INTERRUPTIBLE`.
const TASK_INTERRUPTIBLE: u64 = 1;

/// Whether `release` ("6.1.0-28-cloud-amd64") is a kernel whose
/// `TIF_NOTIFY_SIGNAL` is the bit above: 5.11 to 6.16. Later kernels moved
/// the generic TIF bits; a bit klpvisor cannot vouch for is never set.
fn notify_signal_bit_known(release: &str) -> bool {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let (Some(Ok(major)), Some(Ok(minor))) = (
        it.next().map(str::parse::<u32>),
        it.next().map(str::parse::<u32>),
    ) else {
        return false;
    };
    ((5, 11)..=(6, 16)).contains(&(major, minor))
}

use super::*;

impl Engine {
    /// Installs the call gate (see [`crate::callback::gate`]) unless it is
    /// there already. Call with every vCPU paused, before preparing the
    /// transition that needs it: the gate takes arena pages. Returns
    /// whether it installed now.
    pub fn install_gate<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
    ) -> Result<bool, EngineError> {
        if self.gate.is_some() {
            return Ok(false);
        }
        let regs = guest.vcpu_regs(0).map_err(|e| EngineError::VcpuRegisters {
            vcpu: 0,
            source: Box::new(e),
        })?;
        let facts = self.facts(kernel, guest)?;
        let mut arena = facts.arena.clone();
        let (gate, writes) = Gate::plan_install(kernel, guest, &regs, &mut arena)?;
        let mut plan = Plan::new(arena.allowed());
        plan.extend(writes);
        plan.commit(guest)?;
        facts.arena = arena;
        self.gate = Some(gate);
        Ok(true)
    }

    /// The call gate, for the API.
    pub fn gate_info(&self) -> Option<klpvisor_api::GateInfo> {
        let [text, data] = self.gate.as_ref()?.regions();
        Some(klpvisor_api::GateInfo {
            text: Hex(text.va.0),
            data: Hex(data.va.0),
            data_gpa: Hex(data.gpa.0),
            text_gpa: Hex(text.gpa.0),
            calls: self.calls,
        })
    }

    /// Whether the call gate is installed.
    pub fn has_gate(&self) -> bool {
        self.gate.is_some()
    }

    /// Sends `call` into the guest through the gate, to CPU 0 (the boot
    /// CPU, which x86 Linux does not take offline). Call with every vCPU
    /// paused; then raise the gate's vector on [`Armed::vcpu`].
    pub fn arm_call<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        p: &Prepared,
        call: &Call,
    ) -> Result<Armed, EngineError> {
        let func = call
            .func
            .ok_or_else(|| EngineError::Internal(format!("{} has no {}", call.patch, call.kind)))?;
        // The gate calls whatever the mailbox says: it must be the code of
        // the patch the callback belongs to, loaded in the arena now.
        let record = self
            .records
            .get(&call.patch)
            .or(p.record.as_ref().filter(|_| p.name == call.patch));
        if !record.is_some_and(|r| r.text().any(|t| t.contains(&func))) {
            return Err(EngineError::Internal(format!(
                "{} {} at {func:#x} is not in that patch's loaded code; not calling it",
                call.patch, call.kind
            )));
        }
        let (gate, (cpu, base), seq) = self.next_call(kernel, guest)?;
        let plan = gate.plan_arm(kernel, guest, (cpu, base), call, func, seq)?;
        self.show_klp(kernel, guest, p, call)?;
        plan.commit(guest)?;
        self.calls = seq;
        Ok(Armed { seq, vcpu: 0, cpu })
    }

    /// klp's fake signal (`klp_send_signals`) to the task `pid`, which
    /// blocks a transition by sleeping in a function it changes: a user
    /// task gets `TIF_NOTIFY_SIGNAL` and a wake-up from an interruptible
    /// sleep, as `set_notify_signal()` gives it, so its syscall returns
    /// towards user space, handles the "signal" there (there is none to
    /// deliver) and is restarted, outside the function; a kthread in an
    /// interruptible sleep is only woken. The flag is set in this pause;
    /// `wake_up_state(task, TASK_INTERRUPTIBLE)` runs in a kworker through
    /// the gate. Call with every vCPU paused; then raise the gate's vector
    /// on [`Armed::vcpu`].
    ///
    /// `None` when there is nothing to send: the task is gone, runs (it
    /// will leave on its own), is an idle task, a kthread in an
    /// uninterruptible sleep (klp does not wake those either), or the
    /// kernel's flag bit is not one klpvisor knows.
    pub fn arm_nudge<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        pid: i32,
    ) -> Result<Option<Armed>, EngineError> {
        let release = kernel.uts(guest, "release").unwrap_or_default();
        if !notify_signal_bit_known(&release) {
            return Ok(None);
        }
        let wake = kernel
            .kallsyms
            .addr("wake_up_state")
            .map_err(GateError::Symbol)?;
        let flags_at = kernel
            .btf
            .offset_of("task_struct.thread_info.flags")
            .map_err(|e| GateError::Unsupported(format!("BTF: {e}")))?;
        let regs = all_vcpu_regs(guest)?;
        let space = kernel.space(guest);
        let facts = self.facts(kernel, guest)?;
        let tasks = facts.tasks.list(&space, &regs)?;
        let Some(task) = tasks.iter().find(|t| t.pid == pid && t.idle_cpu.is_none()) else {
            return Ok(None);
        };
        if task.running.is_some() || task.on_cpu || task.is_dead() {
            return Ok(None);
        }
        let kthread = task.is_kthread();
        if kthread && u64::from(task.state) & TASK_INTERRUPTIBLE == 0 {
            return Ok(None);
        }
        let (addr, comm) = (task.addr, task.comm.clone());
        let (gate, (cpu, base), seq) = self.next_call(kernel, guest)?;
        let label = format!("#{seq} fake signal to pid {pid} ({comm})");
        let mut plan = gate.plan_call(
            kernel,
            guest,
            (cpu, base),
            wake,
            &[addr, TASK_INTERRUPTIBLE],
            seq,
            &label,
        )?;
        if !kthread {
            let va = addr
                .checked_add(flags_at)
                .filter(|va| va % 8 == 0)
                .ok_or_else(|| {
                    EngineError::Internal(format!(
                        "pid {pid}'s thread flags at {addr:#x}+{flags_at:#x} are not an aligned word"
                    ))
                })?;
            let read = |e: klpvisor_guest::PagingError| GateError::Read {
                what: "a blocking task's thread flags",
                source: Box::new(e),
            };
            let gpa = space.translate(va).map_err(read)?.phys;
            let old = space.read_u64(va).map_err(read)?;
            plan.allow(Allowed {
                gpa,
                len: 8,
                kind: AllowKind::TaskFlags,
            });
            plan.push(Write::new(
                gpa,
                (old | TIF_NOTIFY_SIGNAL).to_le_bytes().to_vec(),
                old.to_le_bytes().to_vec(),
                format!("TIF_NOTIFY_SIGNAL of pid {pid} ({comm})"),
            ));
        }
        plan.commit(guest)?;
        self.calls = seq;
        Ok(Some(Armed { seq, vcpu: 0, cpu }))
    }

    /// What every call through the gate starts from: the gate, the CPU
    /// it goes to (see [`Engine::gate_cpu`]) and the call's number.
    pub(super) fn next_call<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
    ) -> Result<(&mut Gate, (u32, u64), u64), EngineError> {
        let cpu = self.gate_cpu(kernel, guest)?;
        let seq = self.calls + 1;
        let gate = self
            .gate
            .as_mut()
            .ok_or_else(|| EngineError::Internal("the call gate is not installed".into()))?;
        Ok((gate, cpu, seq))
    }

    /// The CPU vCPU 0 runs (its number and per-CPU base), where the gate
    /// sends its calls.
    pub(super) fn gate_cpu<G: Guest + ?Sized>(
        &self,
        kernel: &Kernel,
        guest: &G,
    ) -> Result<(u32, u64), EngineError> {
        let regs = guest.vcpu_regs(0).map_err(|e| EngineError::VcpuRegisters {
            vcpu: 0,
            source: Box::new(e),
        })?;
        let facts = self
            .facts
            .as_ref()
            .ok_or_else(|| EngineError::Internal("kernel facts unavailable".into()))?;
        let bases = facts.tasks.per_cpu_bases(&kernel.space(guest))?;
        // The per-CPU base is GS in the kernel, the other GS base in user
        // mode; try both, so a vCPU caught right at an entry still works.
        [Some(regs.gs_base), regs.kernel_gs_base]
            .into_iter()
            .flatten()
            .find_map(|gs| bases.iter().find(|(_, b)| *b == gs).copied())
            .ok_or(EngineError::NoPerCpuArea(0))
    }

    /// Sends a line to the guest's kernel log through the gate, as klp's
    /// own `pr_notice("livepatch: ...")` would print it: `line` after the
    /// `livepatch: ` prefix, at KERN_NOTICE. Anything but printable ASCII
    /// becomes `?`, and `%` (a printk conversion) `?` too. Call with
    /// every vCPU paused; then raise the gate's vector on [`Armed::vcpu`].
    pub fn arm_log<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        line: &str,
    ) -> Result<Armed, EngineError> {
        let printk = kernel
            .kallsyms
            .addr("_printk")
            .or_else(|_| kernel.kallsyms.addr("printk"))
            .map_err(GateError::Symbol)?;
        let text = log_text(line);
        let (gate, (cpu, base), seq) = self.next_call(kernel, guest)?;
        let plan = gate.plan_log(kernel, guest, (cpu, base), printk, &text, seq)?;
        plan.commit(guest)?;
        self.calls = seq;
        Ok(Armed { seq, vcpu: 0, cpu })
    }

    /// How far a sent callback got (the guest may run meanwhile).
    pub fn poll_call<G: Guest + ?Sized>(
        &self,
        guest: &G,
        armed: &Armed,
    ) -> Result<Progress, EngineError> {
        let gate = self
            .gate
            .as_ref()
            .ok_or_else(|| EngineError::Internal("the call gate is not installed".into()))?;
        Ok(gate.poll(guest, armed.seq)?)
    }
}

#[cfg(test)]
mod tests {
    use super::notify_signal_bit_known;

    #[test]
    fn the_notify_signal_bit_is_set_only_on_kernels_that_have_it_there() {
        for r in [
            "6.1.0-28-cloud-amd64",
            "6.12.95+deb12-cloud-amd64",
            "5.11.0",
            "6.16.3",
        ] {
            assert!(notify_signal_bit_known(r), "{r}");
        }
        for r in ["5.10.0-30-amd64", "6.17.0", "7.0.1", "", "cloud-6.1", "6"] {
            assert!(!notify_signal_bit_known(r), "{r}");
        }
    }
}
