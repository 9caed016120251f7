//! klpvisor-attach on a running QEMU/KVM VM: Debian's QEMU boots the test
//! guest on (L1's) KVM, and klpvisor-attach, holding one of its QMP
//! sockets, applies, replaces, disables and rolls back patches that the
//! guest's own programs then show; refuses a patch with callbacks without
//! writing a byte; lets go on SIGTERM with the guest running on patched;
//! and, when QEMU is killed while a transition waits, says so.
#![forbid(unsafe_code)]

use std::collections::HashMap;

use harness::{fields, run_scenario, Run};
use klpvisor_api::{PatchState, PatchesReply, VmInfo};

/// What the guest printed at `step` (`KLPV-SEEN <step> ...`).
fn seen(run: &Run, step: &str) -> HashMap<String, String> {
    let tag = format!("KLPV-SEEN {step} ");
    let line = run
        .lines
        .iter()
        .find_map(|l| l.split_once(&tag).map(|(_, r)| r.to_owned()))
        .unwrap_or_else(|| panic!("no `{tag}` line\n{}", run.transcript()));
    fields(&line)
}

/// The text of `KLPV-MSG <step> ...`.
fn msg(run: &Run, step: &str) -> String {
    let tag = format!("KLPV-MSG {step} ");
    run.lines
        .iter()
        .find_map(|l| l.split_once(&tag).map(|(_, r)| r.to_owned()))
        .unwrap_or_else(|| panic!("no `{tag}` line\n{}", run.transcript()))
}

/// (f, g, h, direct-g, direct-h) as klpv-observe printed them.
fn level(s: &HashMap<String, String>) -> [&str; 5] {
    ["f", "g", "h", "direct-g", "direct-h"].map(|k| s.get(k).map_or("?", String::as_str))
}

const ORIG: [&str; 5] = ["orig", "-", "-", "orig", "orig"];
const V1: [&str; 5] = ["v1", "g1", "orig", "g1", "orig"];
const V2: [&str; 5] = ["v2", "orig", "h2", "orig", "h2"];
const PATCHED: &str = "this_has_been_live_patched";

/// Whether an error says QEMU went away: its QMP connection closed, or
/// its memory gone (whichever the request touched first after the kill).
fn names_qemus_end(m: &str) -> bool {
    m.contains("QEMU closed the QMP connection")
        || (m.contains("QEMU (process ") && m.contains("has exited"))
}

fn state(p: &PatchesReply, name: &str) -> PatchState {
    p.patches
        .iter()
        .find(|x| x.name == name)
        .map(|x| x.state)
        .unwrap_or_else(|| panic!("no patch {name} in {p:?}"))
}

#[test]
fn klpvisor_attach_patches_a_qemu_kvm_guest_and_lets_go() {
    if harness::skip_without_e2e() {
        return;
    }
    let run = run_scenario("qemu-attach", &[]);
    let t = run.transcript();
    assert!(run.success, "{t}");

    // Before: the guest's own command line and no patch level.
    let orig = seen(&run, "orig");
    assert_eq!(level(&orig), ORIG, "{t}");
    let own = orig["cmdline"].clone();
    assert!(own.contains("console=ttyS0"), "{t}");
    assert_eq!(run.result("attach")["rc"], "0", "{t}");
    let vm: VmInfo = run.json("KLPV-JSON-VM", "attached");
    assert_eq!(
        vm.arena_size,
        16 << 20,
        "the hot-plugged ivshmem arena\n{t}"
    );
    assert!(vm.kernel.is_some(), "{t}");

    // A second attach on the socket the first holds: refused, no API.
    let second = run.result("second-attach");
    assert_ne!(second["rc"], "0", "{t}");
    assert_eq!(second["sock"], "0", "{t}");
    assert!(msg(&run, "second-attach").contains("no greeting"), "{t}");

    // Apply, replace, a patch on top, disable, roll back, roll back over
    // the replace, enable: each seen by the guest.
    for s in [
        "v1",
        "v2",
        "sample",
        "disable",
        "undo-disable",
        "before-v2",
        "enable-sample",
    ] {
        assert_eq!(run.result(&format!("step-{s}"))["rc"], "0", "{s}\n{t}");
    }
    let v1 = seen(&run, "v1");
    assert_eq!(level(&v1), V1, "{t}");
    assert_eq!(v1["cmdline"], own, "{t}");
    assert_eq!(level(&seen(&run, "v2")), V2, "v2 replaced v1\n{t}");
    let p: PatchesReply = run.json("KLPV-JSON-PATCHES", "v2");
    assert_eq!(state(&p, "klpv_v1"), PatchState::Replaced, "{t}");
    assert_eq!(state(&p, "klpv_v2"), PatchState::Enabled, "{t}");
    assert!(p.gate.is_none(), "no call gate on QEMU\n{t}");
    let sample = seen(&run, "sample");
    assert_eq!(sample["cmdline"], PATCHED, "{t}");
    assert_eq!(level(&sample), V2, "{t}");
    let disabled = seen(&run, "disabled");
    assert_eq!(disabled["cmdline"], own, "{t}");
    assert_eq!(level(&disabled), V2, "{t}");
    let undone = seen(&run, "undone");
    assert_eq!(
        undone["cmdline"], PATCHED,
        "the rollback undid the disable\n{t}"
    );
    assert_eq!(level(&undone), V2, "{t}");
    assert_ne!(run.result("history")["v2seq"], "none", "{t}");
    let before = seen(&run, "before-v2");
    assert_eq!(level(&before), V1, "rolled back over the replace\n{t}");
    assert_eq!(before["cmdline"], own, "{t}");
    let enabled = seen(&run, "enabled");
    assert_eq!(level(&enabled), V1, "{t}");
    assert_eq!(enabled["cmdline"], PATCHED, "{t}");
    let p: PatchesReply = run.json("KLPV-JSON-PATCHES", "enabled");
    assert_eq!(state(&p, "klpv_v1"), PatchState::Enabled, "{t}");
    assert_eq!(state(&p, "livepatch_sample"), PatchState::Enabled, "{t}");
    assert_ne!(state(&p, "klpv_v2"), PatchState::Enabled, "{t}");

    // Callbacks: refused with the reason, not a byte written.
    assert_eq!(run.result("step-callbacks")["rc"], "1", "{t}");
    let why = msg(&run, "callbacks");
    assert!(why.contains("HTTP 422"), "{why}");
    assert!(why.contains("klp callbacks"), "{why}");
    assert!(why.contains("raises a chosen interrupt vector"), "{why}");
    let hashes = run.results("guest-hash");
    assert_eq!(hashes.len(), 2, "{t}");
    assert_eq!(
        hashes[0], hashes[1],
        "a refused patch changed guest memory\n{t}"
    );
    let p: PatchesReply = run.json("KLPV-JSON-PATCHES", "refused");
    assert!(p.patches.iter().all(|x| x.name != "callbacks_v1"), "{t}");
    let refused = seen(&run, "refused");
    assert_eq!(
        (level(&refused), refused["cmdline"].as_str()),
        (V1, PATCHED),
        "{t}"
    );

    // QEMU's own monitor answers while attached and after.
    let qmp = run.results("qmp-status");
    for label in ["attached", "detached-2", "detached-1"] {
        let q = qmp
            .iter()
            .find(|q| q["label"] == label)
            .unwrap_or_else(|| panic!("no qmp-status {label}\n{t}"));
        assert_eq!(q["ok"], "1", "{label}\n{t}");
        assert_eq!(q["running"], "true", "{label}\n{t}");
    }

    // Detach: the socket goes, the guest runs on as patched, and then
    // powers off cleanly.
    let detach = run.result("detach");
    assert_eq!(
        (detach["rc"].as_str(), detach["sock_gone"].as_str()),
        ("0", "1"),
        "{t}"
    );
    let after = seen(&run, "detached");
    assert_eq!(
        (level(&after), after["cmdline"].as_str()),
        (V1, PATCHED),
        "{t}"
    );
    assert_eq!(run.result("qemu1-exit")["rc"], "0", "{t}");
    // (Only the first guest gets to print it: the second is killed.)
    let dmesg = run.lines_with("KLPV-DMESG warnings=");
    assert_eq!(dmesg.len(), 1, "{t}");
    assert!(
        dmesg[0].ends_with("warnings=0"),
        "the guest's kernel log has warnings\n{t}"
    );

    // QEMU killed while an apply waits for a sleeper.
    assert_eq!(run.result("attach2")["rc"], "0", "{t}");
    let killed = run.result("killed");
    assert_eq!(
        killed["blocked"], "1",
        "the apply waited for the sleeper\n{t}"
    );
    let p: PatchesReply = run.json("KLPV-JSON-PATCHES", "waiting");
    let pending = p.transition.expect("the waiting transition");
    assert_eq!(
        (pending.patch.as_str(), pending.action.as_str()),
        ("block_nsleep", "apply")
    );
    assert!(
        pending.blockers.iter().any(|b| b.contains("(sleep)")),
        "{t}"
    );
    assert!(
        pending.blockers.iter().any(|b| b.contains("common_nsleep")),
        "{t}"
    );
    // Refused as busy (patcher's exit 5), naming the change under way.
    assert_eq!(run.result("busy")["rc"], "5", "{t}");
    let busy = msg(&run, "busy");
    assert!(
        busy.contains("another change is under way (apply of block_nsleep)"),
        "{busy}"
    );
    // SIGKILL: 128 + 9.
    assert_eq!(killed["qemu_rc"], "137", "{t}");
    // The waiting apply, and a later request, fail (HTTP 500, patcher's
    // exit 7) naming QEMU's end, not a hang or a timeout.
    assert_eq!(killed["held_rc"], "7", "{t}");
    let held = msg(&run, "held");
    assert!(names_qemus_end(&held), "{held}");
    assert_eq!(killed["status_rc"], "7", "{t}");
    assert!(names_qemus_end(&msg(&run, "status-after")), "{t}");
    assert_ne!(killed["reattach_rc"], "0", "{t}");
    assert!(
        msg(&run, "reattach").contains("cannot connect to the QMP socket"),
        "{t}"
    );
    assert_eq!(run.result("detach2")["rc"], "0", "{t}");
    assert_eq!(
        run.lines_with("KLPV-RESULT qemu-attach-done").len(),
        1,
        "{t}"
    );
}
