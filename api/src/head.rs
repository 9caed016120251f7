//! The request-head pre-parser: what the VMM's control socket reads of a
//! connection before hyper does. Every byte here comes from a local
//! client the peer check has not judged yet (the head is read first), so
//! the work per byte is bounded and nothing here can panic. It lives with
//! the wire types, not in the VMM, so the `http_head` fuzz target (fuzz/)
//! drives it without building the VMM.

/// Largest request head read ahead of hyper; hyper answers bigger ones.
pub const MAX_HEAD_BYTES: usize = 64 << 10;

/// The head ends at the first blank line.
const HEAD_END: &[u8] = b"\r\n\r\n";

/// Where reading a head stands after a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadState {
    /// No blank line yet: read on.
    Partial,
    /// The blank line that ends the head has arrived.
    Complete,
    /// More than [`MAX_HEAD_BYTES`] without a blank line.
    Oversized,
    /// The client closed the connection first.
    Ended,
}

/// A request head being read chunk by chunk.
///
/// Each push looks for the blank line only in the new bytes (and the
/// three before them, where a blank line split across reads starts), so a
/// client sending its head a byte at a time costs linear, not quadratic,
/// work: rescanning the whole buffer on every read let one slow client
/// spend seconds of CPU per connection.
#[derive(Debug, Default)]
pub struct HeadScan {
    buf: Vec<u8>,
    /// The blank line, once found: the offset just past it.
    end: Option<usize>,
    state: Option<HeadState>,
    /// Bytes examined so far (linear in the bytes read; tests check it).
    examined: usize,
}

impl HeadScan {
    /// An empty head: nothing read yet.
    pub fn new() -> Self {
        Self {
            buf: Vec::with_capacity(1024),
            ..Self::default()
        }
    }

    /// Adds `chunk`, just read; an empty chunk is the end of the stream.
    /// Once the state is not [`HeadState::Partial`] further chunks are
    /// ignored: the caller hands the bytes to hyper.
    pub fn push(&mut self, chunk: &[u8]) -> HeadState {
        if let Some(done) = self.state {
            return done;
        }
        if chunk.is_empty() {
            return *self.state.insert(HeadState::Ended);
        }
        let from = self.buf.len().saturating_sub(HEAD_END.len() - 1);
        self.buf.extend_from_slice(chunk);
        let tail = self.buf.get(from..).unwrap_or_default();
        self.examined = self.examined.saturating_add(tail.len());
        if let Some(i) = tail.windows(HEAD_END.len()).position(|w| w == HEAD_END) {
            self.end = Some(from + i + HEAD_END.len());
            return *self.state.insert(HeadState::Complete);
        }
        if self.buf.len() > MAX_HEAD_BYTES {
            return *self.state.insert(HeadState::Oversized);
        }
        HeadState::Partial
    }

    /// Everything read so far (the head and whatever followed it in the
    /// same reads), to replay to hyper.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Every byte read so far, the head and whatever followed it in the
    /// same reads (the start of the body), for hyper to read first.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// The offset just past the head's blank line, once it has arrived.
    pub fn head_end(&self) -> Option<usize> {
        self.end
    }

    /// Bytes examined by all pushes so far.
    pub fn examined(&self) -> usize {
        self.examined
    }
}

/// Whether a request head starts with `METHOD SP TARGET SP HTTP/1.x`:
/// anything else (TLS, HTTP/2's preface, a stray protocol) gets a plain
/// 400 before hyper sees it.
pub fn looks_like_http1(head: &[u8]) -> bool {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let version = parts.next().unwrap_or_default();
    !method.is_empty()
        && method.iter().all(u8::is_ascii_uppercase)
        && target.first() == Some(&b'/')
        && version.starts_with(b"HTTP/1.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_http1_request_lines() {
        assert!(looks_like_http1(b"GET /vm HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(looks_like_http1(b"PATCH /vm HTTP/1.0\r\n\r\n"));
        assert!(!looks_like_http1(b"\x00\x01 not http\r\n\r\n"));
        assert!(!looks_like_http1(b"GET vm HTTP/1.1\r\n\r\n"));
        assert!(!looks_like_http1(b"PRI * HTTP/2.0\r\n\r\n"));
    }

    #[test]
    fn a_blank_line_split_across_reads_ends_the_head() {
        for split in 1..4 {
            let all = b"GET /vm HTTP/1.1\r\n\r\nbody";
            let at = 16 + split;
            let mut s = HeadScan::new();
            assert_eq!(s.push(&all[..at]), HeadState::Partial);
            assert_eq!(s.push(&all[at..]), HeadState::Complete);
            assert_eq!(s.head_end(), Some(20));
            assert_eq!(s.bytes(), all);
        }
        let mut s = HeadScan::new();
        assert_eq!(s.push(b"GET / HTTP/1.1\r\n"), HeadState::Partial);
        assert_eq!(s.push(b""), HeadState::Ended);
        assert_eq!(s.push(b"\r\n"), HeadState::Ended);
    }

    #[test]
    fn a_head_without_end_stops_past_the_limit() {
        let mut s = HeadScan::new();
        let chunk = [b'a'; 1024];
        let mut state = HeadState::Partial;
        while state == HeadState::Partial {
            state = s.push(&chunk);
        }
        assert_eq!(state, HeadState::Oversized);
        assert_eq!(s.bytes().len(), MAX_HEAD_BYTES + 1024);
    }

    /// A client that sends its head one byte per read: each read examines
    /// a few bytes, not the whole buffer again.
    #[test]
    fn a_head_sent_byte_by_byte_costs_linear_work() {
        let mut s = HeadScan::new();
        let mut state = HeadState::Partial;
        while state == HeadState::Partial {
            state = s.push(b"x");
        }
        assert_eq!(state, HeadState::Oversized);
        assert!(s.examined() <= 4 * s.bytes().len(), "{}", s.examined());
    }
}
