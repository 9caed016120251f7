//! What `patcher apply`, `enable`, `disable` and `rollback` print on
//! stderr while their transition waits for a safe point.
//!
//! The VMM answers a transition only once it has committed or given up,
//! up to its timeout (10 s by default) later. Until then the only sign of
//! life is the pending transition in `GET /patches`, which
//! [`klpvisor_api::client::Client::watch`] polls; this decides which of
//! those polls deserve a line. As `kpatch load` says that it is waiting
//! for the patch transition whether or not a terminal reads it, the lines
//! go to stderr in every mode (a script's log then shows what an apply
//! waited for); `--quiet` drops them. stdout and exit codes are the
//! reply's alone.

use klpvisor_api::PendingTransition;

/// Blockers named on one line; the rest are counted. A transition blocked
/// by many tasks would otherwise print a screenful per attempt; the final
/// refusal still names them all.
const BLOCKERS_SHOWN: usize = 3;

/// The transition a command waits for, and what was last said about it.
#[derive(Debug)]
pub struct Progress {
    /// `apply`, `enable`, `disable` or `rollback`, as the VMM names it.
    action: &'static str,
    /// The patch, when the command names it (apply learns it only from the
    /// module, so any pending apply is taken to be its own: a concurrent
    /// one would have made it fail as busy).
    patch: Option<String>,
    /// Attempts and blockers of the last line printed.
    last: Option<(u32, Vec<String>)>,
}

impl Progress {
    /// Watches for `action` of `patch` (any patch if `None`).
    pub fn new(action: &'static str, patch: Option<&str>) -> Self {
        Self {
            action,
            patch: patch.map(str::to_owned),
            last: None,
        }
    }

    /// The line to print for `t`, if `t` is this command's transition, it
    /// has tried at least once (before that it is being prepared, which
    /// waits for nothing), and its attempts or blockers changed since the
    /// last line.
    pub fn line(&mut self, t: &PendingTransition) -> Option<String> {
        if t.action != self.action
            || self.patch.as_deref().is_some_and(|p| p != t.patch)
            || t.attempts == 0
        {
            return None;
        }
        let now = (t.attempts, t.blockers.clone());
        if self.last.as_ref() == Some(&now) {
            return None;
        }
        self.last = Some(now);
        Some(format_line(t))
    }
}

/// `waiting for a safe point: attempt 3, 1.2 s; blocked by: pid 123
/// (sleep) is in common_nsleep (...)`.
pub fn format_line(t: &PendingTransition) -> String {
    let mut line = format!(
        "waiting for a safe point: attempt {}, {:.1} s",
        t.attempts,
        t.waited_ms / 1000.0
    );
    if !t.blockers.is_empty() {
        line.push_str("; blocked by: ");
        let shown: Vec<&str> = t
            .blockers
            .iter()
            .take(BLOCKERS_SHOWN)
            .map(String::as_str)
            .collect();
        line.push_str(&shown.join("; "));
        let more = t.blockers.len().saturating_sub(BLOCKERS_SHOWN);
        if more > 0 {
            line.push_str(&format!("; and {more} more"));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(action: &str, patch: &str, attempts: u32, blockers: &[&str]) -> PendingTransition {
        PendingTransition {
            patch: patch.into(),
            action: action.into(),
            forced: false,
            waited_ms: 1234.0,
            attempts,
            blockers: blockers.iter().map(|b| (*b).to_owned()).collect(),
        }
    }

    const SLEEPER: &str = "pid 123 (sleep) is in common_nsleep (0xffffffff81234567, frame 3 of \
                           its stack)";

    #[test]
    fn a_line_names_the_attempt_the_wait_and_the_blockers() {
        assert_eq!(
            format_line(&pending("apply", "p", 3, &[SLEEPER])),
            format!("waiting for a safe point: attempt 3, 1.2 s; blocked by: {SLEEPER}")
        );
        assert_eq!(
            format_line(&pending("apply", "p", 1, &[])),
            "waiting for a safe point: attempt 1, 1.2 s"
        );
        let many = ["a", "b", "c", "d", "e"];
        assert_eq!(
            format_line(&pending("apply", "p", 2, &many)),
            "waiting for a safe point: attempt 2, 1.2 s; blocked by: a; b; c; and 2 more"
        );
    }

    #[test]
    fn a_line_is_printed_only_when_attempts_or_blockers_change() {
        let mut p = Progress::new("apply", None);
        assert!(p.line(&pending("apply", "x", 1, &[SLEEPER])).is_some());
        // The same attempt seen again (a later poll, a longer wait): nothing.
        let mut again = pending("apply", "x", 1, &[SLEEPER]);
        again.waited_ms = 1800.0;
        assert_eq!(p.line(&again), None);
        assert!(p.line(&pending("apply", "x", 2, &[SLEEPER])).is_some());
        // Another blocker at the same attempt count.
        assert!(p
            .line(&pending("apply", "x", 2, &["pid 9 (cat) ..."]))
            .is_some());
        assert_eq!(
            p.line(&pending("apply", "x", 2, &["pid 9 (cat) ..."])),
            None
        );
    }

    #[test]
    fn only_this_commands_transition_counts_and_only_once_it_has_tried() {
        let mut p = Progress::new("disable", Some("fix"));
        assert_eq!(
            p.line(&pending("disable", "fix", 0, &[])),
            None,
            "preparing"
        );
        assert_eq!(p.line(&pending("disable", "other", 2, &[SLEEPER])), None);
        assert_eq!(p.line(&pending("enable", "fix", 2, &[SLEEPER])), None);
        assert!(p.line(&pending("disable", "fix", 2, &[SLEEPER])).is_some());
        // An apply names no patch: any pending apply is its own.
        let mut a = Progress::new("apply", None);
        assert!(a.line(&pending("apply", "whatever", 1, &[])).is_some());
        assert_eq!(a.line(&pending("rollback", "whatever", 5, &[])), None);
    }
}
