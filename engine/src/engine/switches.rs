//! The switch log as the engine drives it: installed and registered once,
//! through the call gate, before a transition's first safe-point check;
//! read in every pause after (see [`crate::switches`]).

use crate::switches::{LogState, SwitchLog};
use crate::write::Plan;
use klpvisor_guest::{Guest, Kernel};

use super::*;

impl Engine {
    /// Whether a transition should register the switch log first: the
    /// gate is there to do it, and no earlier try settled the matter.
    pub fn switch_log_wanted(&self) -> bool {
        self.gate.is_some()
            && self.switches_off.is_none()
            && self
                .switches
                .as_ref()
                .is_none_or(|l| matches!(l.state(), LogState::Installed | LogState::Unregistered))
    }

    /// Installs the log's pages if needed and sends its registration
    /// (`tracepoint_probe_register`) through the gate; `None` when the
    /// guest cannot have a log (the reason is kept, and logged once).
    /// Call with every vCPU paused; then raise the gate's vector on
    /// [`Armed::vcpu`] and give the result to [`Engine::switch_log_done`].
    pub fn arm_switch_log<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
    ) -> Result<Option<Armed>, EngineError> {
        if !self.switch_log_wanted() {
            return Ok(None);
        }
        if self.switches.is_none() {
            let facts = self.facts(kernel, guest)?;
            let mut arena = facts.arena.clone();
            match SwitchLog::plan_install(kernel, guest, &mut arena) {
                Ok((log, writes)) => {
                    let mut plan = Plan::new(arena.allowed());
                    plan.extend(writes);
                    plan.commit(guest)?;
                    facts.arena = arena;
                    self.switches = Some(log);
                }
                Err(e) => {
                    tracing::warn!("every safe-point pause reads every task: {e}");
                    self.switches_off = Some(e.to_string());
                    return Ok(None);
                }
            }
        }
        let call = match &self.switches {
            Some(log) => log.register_call(),
            None => return Ok(None),
        };
        self.arm_log_call(kernel, guest, call, "tracepoint_probe_register")
            .map(Some)
    }

    /// Sends `call` (a function and its three arguments) through the gate.
    fn arm_log_call<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        (func, args): (u64, [u64; 3]),
        what: &str,
    ) -> Result<Armed, EngineError> {
        let (gate, (cpu, base), seq) = self.next_call(kernel, guest)?;
        let label = format!("#{seq} {what} for the switch log");
        let plan = gate.plan_call(kernel, guest, (cpu, base), func, &args, seq, &label)?;
        plan.commit(guest)?;
        self.calls = seq;
        Ok(Armed { seq, vcpu: 0, cpu })
    }

    /// What the registration returned (`None`: it did not finish in
    /// time). A log that did not register is never trusted, and never
    /// registered again: its call may still run in the guest one day.
    pub fn switch_log_done(&mut self, ret: Option<u64>) {
        let Some(log) = self.switches.as_mut() else {
            return;
        };
        match log.registered(ret) {
            Ok(()) => tracing::info!("switch log registered on sched_switch"),
            Err(e) => {
                tracing::warn!("every safe-point pause reads every task: {e}");
                self.switches_off = Some(e);
            }
        }
    }

    /// Never registers the log in this guest, for `why` (the operator's
    /// choice): every pause reads every task.
    pub fn switch_log_off(&mut self, why: String) {
        self.switches_off = Some(why);
    }

    /// Whether the log's pages are in the arena (a plan made before they
    /// were must be made again).
    pub fn switch_log_installed(&self) -> bool {
        self.switches.is_some()
    }

    /// Whether the log is registered (and so is let go once changes pause).
    pub fn switch_log_registered(&self) -> bool {
        self.switches
            .as_ref()
            .is_some_and(|l| l.state() == LogState::Registered)
    }

    /// Sends the log's unregistration (`tracepoint_probe_unregister`)
    /// through the gate; `None` if it is not registered. Call with every
    /// vCPU paused; then raise the gate's vector on [`Armed::vcpu`] and
    /// give the result to [`Engine::switch_log_released`].
    pub fn arm_switch_log_release<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
    ) -> Result<Option<Armed>, EngineError> {
        let call = match &self.switches {
            Some(log) if log.state() == LogState::Registered => log.unregister_call(),
            _ => return Ok(None),
        };
        self.arm_log_call(kernel, guest, call, "tracepoint_probe_unregister")
            .map(Some)
    }

    /// What the unregistration returned (`None`: it did not finish).
    pub fn switch_log_released(&mut self, ret: Option<u64>) {
        let Some(log) = self.switches.as_mut() else {
            return;
        };
        match log.unregistered(ret) {
            Ok(()) => tracing::info!("switch log unregistered from sched_switch"),
            Err(e) => {
                tracing::warn!("the switch log is off from now on: {e}");
                self.switches_off = Some(e);
            }
        }
    }

    /// The log as `GET /patches` shows it, once installed; the head is
    /// read from `guest` now (0 if that fails).
    pub fn switch_log_info<G: Guest + ?Sized>(
        &self,
        guest: &G,
    ) -> Option<klpvisor_api::SwitchLogInfo> {
        let log = self.switches.as_ref()?;
        let state = match (log.state(), &self.switches_off) {
            (_, Some(why)) => format!("off: {why}"),
            (LogState::Registered, None) => "registered".into(),
            (LogState::Installed, None) => "installed".into(),
            (LogState::Unregistered, None) => "unregistered".into(),
            (LogState::Lost, None) => "off".into(),
        };
        let [text, ring] = log.regions();
        Some(klpvisor_api::SwitchLogInfo {
            state,
            probe: klpvisor_api::Hex(text.va.0),
            probe_gpa: klpvisor_api::Hex(text.gpa.0),
            ring: klpvisor_api::Hex(ring.va.0),
            ring_gpa: klpvisor_api::Hex(ring.gpa.0),
            ring_bytes: ring.len,
            entries: crate::switches::ENTRIES,
            head: log.head(guest).unwrap_or(0),
        })
    }
}
