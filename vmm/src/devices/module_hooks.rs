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
    /// Where the answer goes: 0, or the negative errno that fails the load.
    pub reply: Sender<i32>,
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
    pub fn send(&self, vcpu: u8, event: Event, module: u64) -> Option<Receiver<i32>> {
        let (reply, answer) = channel();
        let handler = self.handler.lock().unwrap_or_else(|p| p.into_inner());
        handler
            .as_ref()?
            .send(HookEvent {
                vcpu,
                event,
                module,
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
        assert!(hooks.send(0, Event::Coming, 0x1000).is_none());
        let (tx, rx) = channel();
        hooks.set_handler(tx);
        let answer = hooks.send(1, Event::Going, 0x2000).expect("sent");
        let e = rx.recv().expect("event");
        assert_eq!((e.vcpu, e.event, e.module), (1, Event::Going, 0x2000));
        e.reply.send(-22).expect("reply");
        assert_eq!(answer.recv(), Ok(-22));
        drop(rx);
        assert!(hooks.send(0, Event::Coming, 0).is_none(), "handler gone");
    }
}
