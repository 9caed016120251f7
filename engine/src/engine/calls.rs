//! The call gate as the engine drives it: install it, arm a callback or a
//! kernel log line, and poll for its result.

use crate::callback::gate::{Gate, GateError, Progress};
use crate::callback::Call;
use crate::write::Plan;
use klpvisor_api::Hex;
use klpvisor_guest::Guest;
use klpvisor_guest::Kernel;

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
        let (cpu, base) = self.gate_cpu(kernel, guest)?;
        let gate = self
            .gate
            .as_mut()
            .ok_or_else(|| EngineError::Internal("the call gate is not installed".into()))?;
        let seq = self.calls + 1;
        let plan = gate.plan_arm(kernel, guest, (cpu, base), call, func, seq)?;
        self.show_klp(kernel, guest, p, call)?;
        plan.commit(guest)?;
        self.calls = seq;
        Ok(Armed { seq, vcpu: 0, cpu })
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
        let (cpu, base) = self.gate_cpu(kernel, guest)?;
        let gate = self
            .gate
            .as_mut()
            .ok_or_else(|| EngineError::Internal("the call gate is not installed".into()))?;
        let seq = self.calls + 1;
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
