//! The engine's side of showing patches to the guest's own klp while
//! their callbacks run ([`crate::register::livepatch`]): which world each
//! callback sees, and the plans that show and hide it on the one write
//! path.

use klpvisor_guest::{Guest, Kernel};

use super::modules::SpaceMem;
use super::{Engine, EngineError, Prepared};
use crate::callback::Call;
use crate::register::livepatch::{self, KlpGlobals, World};
use crate::register::Word;
use crate::write::{AllowKind, Plan};

impl Engine {
    /// The `struct klp_patch` of every enabled patch, in the order klp
    /// would hold them on `klp_patches` (the order they were enabled).
    pub(super) fn klp_enabled(&self) -> Vec<u64> {
        self.stack
            .entries()
            .iter()
            .filter(|e| e.state == klpvisor_api::PatchState::Enabled)
            .filter_map(|e| self.records.get(&e.name)?.klp_patch)
            .collect()
    }

    fn klp_globals(&self) -> Option<KlpGlobals> {
        self.registry().ok()?.klp
    }

    /// Before `call` runs in the guest: shows the guest's klp the world
    /// klp would be in during that callback (`klp_transition_patch` and
    /// `klp_patches`), unless it is shown already. A patch without a
    /// `struct klp_patch` of its own (kpatch-build's), or a guest whose
    /// klp lacks the symbols, gets nothing shown: `klp_get_prev_state()`
    /// then returns NULL, with the guest's warning. vCPUs paused.
    pub(super) fn show_klp<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
        p: &Prepared,
        call: &Call,
    ) -> Result<(), EngineError> {
        let Some(g) = self.klp_globals() else {
            return Ok(());
        };
        let patch = self
            .records
            .get(&call.patch)
            .or(p.record.as_ref().filter(|_| p.name == call.patch))
            .and_then(|r| r.klp_patch);
        let want = patch.map(|t| World::of(t, &p.klp_before));
        if self.klp_shown.as_ref().map(|s| &s.world) == want.as_ref() {
            return Ok(());
        }
        let space = kernel.space(guest);
        let (words, shown) =
            livepatch::switch(&SpaceMem(&space), &g, self.klp_shown.as_ref(), want)?;
        self.klp_plan(kernel, guest, &g, &words)?.commit(guest)?;
        self.klp_shown = shown;
        Ok(())
    }

    /// Takes back what [`Engine::show_klp`] showed: every word as it was.
    /// Busy while the guest's klp holds its mutex. vCPUs paused.
    pub fn hide_klp<G: Guest + ?Sized>(
        &mut self,
        kernel: &Kernel,
        guest: &G,
    ) -> Result<(), EngineError> {
        let (Some(shown), Some(g)) = (self.klp_shown.as_ref(), self.klp_globals()) else {
            return Ok(());
        };
        let space = kernel.space(guest);
        let words = livepatch::hide(&SpaceMem(&space), &g, shown)?;
        self.klp_plan(kernel, guest, &g, &words)?.commit(guest)?;
        self.klp_shown = None;
        Ok(())
    }

    /// Whether the guest's klp is shown the `struct klp_patch` at `patch`
    /// now (its pages must stay until it is hidden).
    pub(super) fn klp_shows(&self, patch: Option<u64>) -> bool {
        patch.is_some_and(|p| {
            self.klp_shown
                .as_ref()
                .is_some_and(|s| s.world.patches.contains(&p))
        })
    }

    /// Whether anything is shown to the guest's klp now.
    pub fn klp_shown(&self) -> bool {
        self.klp_shown.is_some()
    }

    /// `words` as a plan, allowed in the arena (our `struct klp_patch`es)
    /// and at the klp words [`livepatch::allowed`] names.
    fn klp_plan<G: Guest + ?Sized>(
        &self,
        kernel: &Kernel,
        guest: &G,
        g: &KlpGlobals,
        words: &[Word],
    ) -> Result<Plan, EngineError> {
        let space = kernel.space(guest);
        let allowed = livepatch::allowed(&SpaceMem(&space), g)?;
        self.word_plan(&space, allowed, AllowKind::KlpPatches, words, "klp_patches")
    }
}
