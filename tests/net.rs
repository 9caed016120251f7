//! A virtio-net NIC (`vmm --net tap=NAME`): the real guest kernel's
//! virtio_net driver finds it, takes the MAC the VMM gave, and the guest
//! pings the host's end of the tap and makes a TCP round trip to it.
#![forbid(unsafe_code)]

use harness::run_scenario;

#[test]
fn the_guest_pings_and_talks_tcp_over_the_tap() {
    if harness::skip_without_e2e() {
        return;
    }
    let token = format!("n{}", std::process::id());
    let run = run_scenario("net", &[&token]);
    let t = run.transcript();
    let guest = run.fields("KLPV-NET");
    assert_eq!(
        guest.get("mac").map(String::as_str),
        Some("52:54:00:4b:4c:01"),
        "{t}"
    );
    assert_eq!(guest["ping"], "ok", "{t}");
    assert_eq!(guest["received"], "3", "{t}");
    assert_eq!(guest["big"], "ok", "a 1400-byte ping\n{t}");
    assert_eq!(guest["tcp"], format!("echo-{token}"), "{t}");
    let host = run.result("net");
    assert_eq!(host["tcp_server_got"], "hello-from-guest", "{t}");
    assert_eq!(host["rc"], "0", "the guest powered off\n{t}");
    assert_eq!(run.lines_with("KLPV-DMESG warnings=0").len(), 1, "{t}");
}
