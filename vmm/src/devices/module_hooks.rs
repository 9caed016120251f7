//! The hooks on the guest's module loads and unloads (see
//! `klpvisor_engine::hook`): a vCPU that reads one of the hook ports has
//! stopped in `klp_module_coming` or `klp_module_going`. Its thread hands
//! the event to the control's handler and waits for the answer, parking
//! like any paused vCPU whenever a pause is asked for meanwhile (the
//! handler pauses the VM to do its work).

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;

pub use klpvisor_engine::hook::Event;

/// One vCPU stopped in a hook.
#[derive(Debug)]
pub struct HookEvent {
    /// The vCPU.
    pub vcpu: u8,
    /// Which hook.
    pub event: Event,
    /// The `struct module *` it was called with (`rdi`).
    pub module: u64,
    /// What the function the VMM last had the stub call returned (`rsi`).
    pub result: u64,
    /// Where the vCPU stopped (after its port read) and its privilege
    /// level: only klpvisor's stub, in the kernel, is a hook.
    pub rip: u64,
    /// The vCPU's privilege level at the stop (0: kernel).
    pub cpl: u8,
    /// Where the answer goes.
    pub reply: Sender<Answer>,
}

/// What a stub does after its port read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Go on into the kernel's function (0), or return this errno from
    /// `klp_module_coming`, which fails the load.
    Return(i32),
    /// Call `func(args...)` in the held task and read the port again with
    /// the result (a klp callback of the module's object, or ftrace's
    /// registration of a module function's `ftrace_ops`).
    Call {
        /// Kernel-virtual address of the function to call.
        func: u64,
        /// Its first four arguments (for a klp callback, the
        /// `struct klp_object *` and nothing else).
        args: [u64; 4],
    },
}

/// Where hook events go.
#[derive(Debug, Default)]
pub struct ModuleHooks {
    handler: Mutex<Option<Sender<HookEvent>>>,
}

impl ModuleHooks {
    /// Sends every later event to `handler`.
    pub fn set_handler(&self, handler: Sender<HookEvent>) {
        *self.handler.lock().unwrap_or_else(|p| p.into_inner()) = Some(handler);
    }

    /// Hands an event to the handler; `None` when there is none (then the
    /// call goes on as if klpvisor were not there).
    pub fn send(
        &self,
        vcpu: u8,
        event: Event,
        regs: &kvm_bindings::kvm_regs,
        cpl: u8,
    ) -> Option<Receiver<Answer>> {
        let (reply, answer) = channel();
        let handler = self.handler.lock().unwrap_or_else(|p| p.into_inner());
        handler
            .as_ref()?
            .send(HookEvent {
                vcpu,
                event,
                module: regs.rdi,
                result: regs.rsi,
                rip: regs.rip,
                cpl,
                reply,
            })
            .ok()?;
        Some(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_handler_the_call_goes_on_and_with_one_it_is_answered() {
        let hooks = ModuleHooks::default();
        let regs = |rdi, rsi| kvm_bindings::kvm_regs {
            rdi,
            rsi,
            rip: 0xffff_ffff_c000_004b,
            ..Default::default()
        };
        assert!(hooks.send(0, Event::Coming, &regs(0x1000, 0), 0).is_none());
        let (tx, rx) = channel();
        hooks.set_handler(tx);
        let answer = hooks
            .send(1, Event::Going, &regs(0x2000, 7), 0)
            .expect("sent");
        let e = rx.recv().expect("event");
        assert_eq!(
            (e.vcpu, e.event, e.module, e.result, e.rip, e.cpl),
            (1, Event::Going, 0x2000, 7, 0xffff_ffff_c000_004b, 0)
        );
        e.reply.send(Answer::Return(-22)).expect("reply");
        assert_eq!(answer.recv(), Ok(Answer::Return(-22)));
        drop(rx);
        assert!(
            hooks.send(0, Event::Coming, &regs(0, 0), 0).is_none(),
            "handler gone"
        );
    }
}
