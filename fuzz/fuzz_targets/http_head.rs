//! The control socket's request-head pre-parser (`klpvisor_api::head`): the
//! bytes a local client sends before hyper sees them, in reads of sizes
//! the input picks. Each read is a length byte (0 = a 1 KiB read, the
//! server's buffer) and that many bytes; the input's end is the client
//! closing the connection.
//!
//! Invariants: the head is complete exactly when the bytes read hold a
//! blank line, and it ends just past the first one; nothing is lost or
//! reordered; reading stops past the head limit; the work is linear in
//! the bytes read.
#![no_main]

use klpvisor_api::head::{looks_like_http1, HeadScan, HeadState, MAX_HEAD_BYTES};
use libfuzzer_sys::fuzz_target;

fn first_blank_line(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

fuzz_target!(|data: &[u8]| {
    let mut scan = HeadScan::new();
    let mut rest = data;
    let mut sent = Vec::new();
    let mut state = HeadState::Partial;
    while state == HeadState::Partial {
        let Some((&len, tail)) = rest.split_first() else {
            state = scan.push(&[]);
            break;
        };
        let len = if len == 0 { 1024 } else { usize::from(len) };
        let (chunk, tail) = tail.split_at(len.min(tail.len()));
        rest = tail;
        if chunk.is_empty() {
            continue;
        }
        sent.extend_from_slice(chunk);
        state = scan.push(chunk);
    }
    assert_eq!(scan.bytes(), &sent[..]);
    assert!(scan.examined() <= 2 * sent.len() + 3 * data.len());
    let end = first_blank_line(&sent);
    match state {
        HeadState::Complete => assert_eq!(scan.head_end(), end),
        HeadState::Oversized => {
            assert!(end.is_none() && sent.len() > MAX_HEAD_BYTES);
        }
        HeadState::Ended => assert!(end.is_none()),
        HeadState::Partial => unreachable!(),
    }
    if looks_like_http1(scan.bytes()) {
        let b = scan.bytes();
        assert!(b.first().is_some_and(u8::is_ascii_uppercase));
        assert!(b.windows(8).any(|w| w == b" HTTP/1."));
    }
});
