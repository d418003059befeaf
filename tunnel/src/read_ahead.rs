//! [`ReadAhead`]: large reads for a reader that asks for small ones, with no buffer held while
//! the connection is quiet.
//!
//! The relay reads each tunnel's WebSocket through a small buffer (see
//! [`RELAY_WS_READ_BUFFER`](crate::RELAY_WS_READ_BUFFER)), since thousands of idle tunnels keep
//! it resident. A burst (a 16 KiB message of merged tokens) then costs a system call per
//! kilobyte. Wrapped in [`ReadAhead`], a read that fills the small buffer to the brim (so more
//! is probably waiting) is followed at once by one read of up to [`READ_AHEAD`] bytes into a
//! block of its own, which later reads are served from; the block is freed as soon as it is
//! drained. Small messages never allocate, and an idle tunnel holds nothing.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Size of the read that follows a full small read: 32 KiB, two of the largest messages.
pub const READ_AHEAD: usize = 32 * 1024;

/// See the module docs.
#[derive(Debug)]
pub struct ReadAhead<T> {
    inner: T,
    /// Bytes read ahead and not yet handed out; empty (and unallocated) most of the time.
    ahead: BytesMut,
    /// An error met while reading ahead, reported once the bytes before it are handed out.
    failed: Option<io::Error>,
}

impl<T> ReadAhead<T> {
    /// Wraps `inner`.
    pub fn new(inner: T) -> Self {
        ReadAhead {
            inner,
            ahead: BytesMut::new(),
            failed: None,
        }
    }

    /// Bytes read ahead and not handed out yet.
    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.ahead.len()
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.ahead.is_empty() {
            let n = this.ahead.len().min(out.remaining());
            out.put_slice(&this.ahead[..n]);
            this.ahead.advance(n);
            if this.ahead.is_empty() {
                // Drained: give the block back now, not when the next burst comes.
                this.ahead = BytesMut::new();
            }
            return Poll::Ready(Ok(()));
        }
        if let Some(err) = this.failed.take() {
            return Poll::Ready(Err(err));
        }
        let wanted = out.remaining();
        let before = out.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, out))?;
        let got = out.filled().len() - before;
        if wanted == 0 || got < wanted || wanted >= READ_AHEAD {
            return Poll::Ready(Ok(()));
        }
        // The small read came back full: more is probably waiting. One more read, into a
        // block of its own; if nothing is there after all, the block goes at once.
        let mut block = BytesMut::with_capacity(READ_AHEAD);
        match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut block) {
            Poll::Ready(Ok(n)) if n > 0 => this.ahead = block,
            // The data already read is the caller's; the error comes with the next read.
            Poll::Ready(Err(err)) => this.failed = Some(err),
            // The end shows on the next read, which asks the inner reader again.
            Poll::Ready(Ok(_)) | Poll::Pending => {}
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    /// A reader that counts the reads that brought data.
    struct Counted {
        inner: DuplexStream,
        reads: Arc<AtomicUsize>,
    }

    impl AsyncRead for Counted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            out: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let before = out.filled().len();
            ready!(Pin::new(&mut self.inner).poll_read(cx, out))?;
            if out.filled().len() > before {
                self.reads.fetch_add(1, Ordering::Relaxed);
            }
            Poll::Ready(Ok(()))
        }
    }

    fn counted(capacity: usize) -> (ReadAhead<Counted>, DuplexStream, Arc<AtomicUsize>) {
        let (ours, theirs) = tokio::io::duplex(capacity);
        let reads = Arc::new(AtomicUsize::new(0));
        let reader = ReadAhead::new(Counted {
            inner: ours,
            reads: reads.clone(),
        });
        (reader, theirs, reads)
    }

    /// Reads `len` bytes in reads of at most 1 KiB, as the relay's WebSocket does.
    async fn read_small(reader: &mut ReadAhead<Counted>, len: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut chunk = [0u8; 1024];
        while got.len() < len {
            let n = reader.read(&mut chunk).await.unwrap();
            assert!(n > 0, "early end after {} bytes", got.len());
            got.extend_from_slice(&chunk[..n]);
        }
        got
    }

    #[tokio::test]
    async fn a_burst_is_read_in_a_few_large_reads_and_in_order() {
        let (mut reader, mut writer, reads) = counted(64 * 1024);
        let data: Vec<u8> = (0..40 * 1024).map(|i| (i % 251) as u8).collect();
        writer.write_all(&data).await.unwrap();
        assert_eq!(read_small(&mut reader, data.len()).await, data);
        // 1 KiB, then 32 KiB ahead, then 1 KiB, then the last 6 KiB ahead: 4 reads, not 40.
        assert_eq!(reads.load(Ordering::Relaxed), 4);
        assert_eq!(reader.buffered(), 0);
    }

    #[tokio::test]
    async fn a_small_message_reads_nothing_ahead() {
        let (mut reader, mut writer, reads) = counted(64 * 1024);
        writer.write_all(&[1u8; 100]).await.unwrap();
        assert_eq!(read_small(&mut reader, 100).await, vec![1u8; 100]);
        assert_eq!(reads.load(Ordering::Relaxed), 1);
        assert_eq!(reader.buffered(), 0);
    }

    #[tokio::test]
    async fn the_end_comes_after_the_data_read_ahead() {
        let (mut reader, mut writer, _) = counted(64 * 1024);
        let data = vec![9u8; 3 * 1024];
        writer.write_all(&data).await.unwrap();
        drop(writer);
        assert_eq!(read_small(&mut reader, data.len()).await, data);
        let mut rest = Vec::new();
        assert_eq!(reader.read_to_end(&mut rest).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn an_error_met_reading_ahead_comes_after_the_data() {
        /// Gives `data` (in reads of the caller's size), then fails once, then reads the end,
        /// as a TCP socket reports a reset.
        struct ThenFail(Vec<u8>, bool);
        impl AsyncRead for ThenFail {
            fn poll_read(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
                out: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                if self.0.is_empty() {
                    if std::mem::replace(&mut self.1, true) {
                        return Poll::Ready(Ok(()));
                    }
                    return Poll::Ready(Err(io::Error::from(io::ErrorKind::ConnectionReset)));
                }
                let n = self.0.len().min(out.remaining());
                out.put_slice(&self.0[..n]);
                self.0.drain(..n);
                Poll::Ready(Ok(()))
            }
        }
        let mut reader = ReadAhead::new(ThenFail(vec![5u8; 1024], false));
        let mut chunk = [0u8; 1024];
        assert_eq!(reader.read(&mut chunk).await.unwrap(), 1024);
        let err = reader.read(&mut chunk).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn writes_pass_through() {
        let (ours, mut writer) = tokio::io::duplex(1024);
        let mut reader = ReadAhead::new(ours);
        reader.write_all(b"hello").await.unwrap();
        reader.flush().await.unwrap();
        let mut got = [0u8; 5];
        writer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
    }
}
