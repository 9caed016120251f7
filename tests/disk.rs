//! A virtio-blk disk (`vmm --disk`): the real guest kernel's virtio_mmio
//! driver finds the device in the DSDT, virtio_blk reads what the host
//! wrote into the image and writes what the host then finds in it after
//! the guest powered off; a read-only disk refuses the guest's write.
#![forbid(unsafe_code)]

use harness::run_scenario;

#[test]
fn the_guest_reads_and_writes_its_disk() {
    if harness::skip_without_e2e() {
        return;
    }
    let token = format!("d{}", std::process::id());
    let run = run_scenario("disk", &[&token]);
    let t = run.transcript();
    let guest = run.fields("KLPV-DISK");
    assert_eq!(guest.get("vda").map(String::as_str), Some("present"), "{t}");
    // 8 MiB in 512-byte sectors.
    assert_eq!(guest["sectors"], "16384", "{t}");
    assert_eq!(guest["ro"], "0", "{t}");
    assert_eq!(guest["read"], format!("KLPV-HOST-{token}"), "{t}");
    assert_eq!(guest["write"], "ok", "{t}");
    let host = run.result("disk");
    assert_eq!(host["rc"], "0", "the guest powered off\n{t}");
    assert_eq!(host["host"], format!("KLPV-GUEST-{token}"), "{t}");
    assert_eq!(host["same"], "1", "nothing else changed\n{t}");
    assert_eq!(host["size"], "8388608", "the image never grows\n{t}");
    assert_eq!(run.lines_with("KLPV-DMESG warnings=0").len(), 1, "{t}");
}

#[test]
fn a_read_only_disk_refuses_the_guests_write() {
    if harness::skip_without_e2e() {
        return;
    }
    let token = format!("r{}", std::process::id());
    let run = run_scenario("disk", &[&token, "ro"]);
    let t = run.transcript();
    let guest = run.fields("KLPV-DISK");
    assert_eq!(guest.get("vda").map(String::as_str), Some("present"), "{t}");
    assert_eq!(guest["ro"], "1", "{t}");
    assert_eq!(guest["read"], format!("KLPV-HOST-{token}"), "{t}");
    assert_eq!(guest["write"], "failed", "{t}");
    let host = run.result("disk");
    assert_eq!(host["rc"], "0", "{t}");
    assert_eq!(host["host"], "none", "{t}");
    assert_eq!(host["same"], "1", "{t}");
}
