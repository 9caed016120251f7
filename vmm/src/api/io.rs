//! A connection wrapper that drops clients which stop reading: hyper's
//! timeouts cover reading requests, not writing responses, so a client that
//! asks for the 3 MB symbol table and never reads it would otherwise hold a
//! connection slot and its buffers for ever.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use klpvisor_api::head::{HeadScan, HeadState};

/// `inner` whose writes fail with `TimedOut` after `limit` without progress.
pub struct StallGuard<S> {
    inner: S,
    limit: Duration,
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> StallGuard<S> {
    pub fn new(inner: S, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Called when a write is pending: starts the clock, or reports that it
    /// ran out.
    fn check_stall(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading its response",
            ));
        }
        Ok(())
    }

    fn progress<T>(&mut self, p: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match p {
            Poll::Pending => match self.check_stall(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for StallGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for StallGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(p, cx)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(p, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.progress(p, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress(p, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Reads a connection's first request head (up to the blank line) within
/// `limit`. hyper's own header timeout just closes the connection; reading
/// the head first lets a client that stalls mid-headers get a 408 saying
/// why. Returns the bytes read (to replay to hyper with [`Rewind`]), or
/// `None` if the client stalled.
pub async fn first_head<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> io::Result<Option<Vec<u8>>> {
    use tokio::io::AsyncReadExt;
    let mut scan = HeadScan::new();
    let read = async {
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await?;
            // EOF, a complete head, or more than any valid head: hyper
            // takes it from here (and answers oversized heads itself).
            if scan.push(chunk.get(..n).unwrap_or_default()) != HeadState::Partial {
                return Ok::<_, io::Error>(());
            }
        }
    };
    match tokio::time::timeout(limit, read).await {
        Ok(r) => r.map(|()| Some(scan.into_bytes())),
        Err(_) => Ok(None),
    }
}

/// `inner` with `prefix` (bytes already read from it) served first.
pub struct Rewind<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_stalled_head_is_reported_and_a_complete_one_replayed() {
        let (mut a, mut b) = tokio::io::duplex(256);
        b.write_all(b"GET /vm HTTP/1.1\r\nHost: x").await.unwrap();
        assert!(first_head(&mut a, Duration::from_secs(10))
            .await
            .unwrap()
            .is_none());

        let (mut a, mut b) = tokio::io::duplex(256);
        b.write_all(b"GET /vm HTTP/1.1\r\n\r\nrest").await.unwrap();
        drop(b);
        let head = first_head(&mut a, Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        let mut all = Vec::new();
        Rewind::new(head, a).read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET /vm HTTP/1.1\r\n\r\nrest");
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_reader_that_stops_is_dropped() {
        let (a, _b) = tokio::io::duplex(64);
        let mut g = StallGuard::new(a, Duration::from_secs(5));
        let big = vec![0u8; 1024];
        let err = g.write_all(&big).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_reader_that_keeps_up_is_fine() {
        let (a, mut b) = tokio::io::duplex(64);
        let reader = tokio::spawn(async move {
            let mut n = 0;
            let mut buf = [0u8; 16];
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                match tokio::io::AsyncReadExt::read(&mut b, &mut buf).await {
                    Ok(0) | Err(_) => return n,
                    Ok(k) => n += k,
                }
            }
        });
        let mut g = StallGuard::new(a, Duration::from_secs(5));
        g.write_all(&[1u8; 512]).await.unwrap();
        g.shutdown().await.unwrap();
        drop(g);
        assert_eq!(reader.await.unwrap(), 512);
    }
}
