//! [`Coalesce`]: a body that merges the data frames already waiting into one, so a burst of
//! small chunks (NDJSON tokens produced faster than they are sent) crosses each hop as a few
//! large frames instead of thousands of tiny ones. It never waits for data: a frame is passed
//! on as soon as the inner body has nothing more ready, so latency is unchanged.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};

/// Largest merged frame: 16 KiB, one HTTP/2 frame and one tunnel message.
pub const MAX_MERGED: usize = 16 * 1024;

/// See the module docs.
pub struct Coalesce<B: Body> {
    inner: B,
    /// An error met after data was merged: reported on the next poll, after that data.
    failed: Option<B::Error>,
    /// A frame read past the end of a merge (trailers, or data that would overflow).
    held: Option<Frame<Bytes>>,
    /// The inner body ended or failed; nothing more to poll.
    done: bool,
}

impl<B: Body> Coalesce<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        Coalesce {
            inner,
            failed: None,
            held: None,
            done: false,
        }
    }
}

impl<B> Body for Coalesce<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if let Some(err) = this.failed.take() {
            return Poll::Ready(Some(Err(err)));
        }
        let first = match this.held.take() {
            Some(frame) => frame,
            None if this.done => return Poll::Ready(None),
            None => match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => frame,
                Poll::Ready(other) => {
                    this.done = true;
                    return Poll::Ready(other);
                }
                Poll::Pending => return Poll::Pending,
            },
        };
        let first = match first.into_data() {
            Ok(data) => data,
            Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
        };
        if first.len() >= MAX_MERGED || this.done {
            return Poll::Ready(Some(Ok(Frame::data(first))));
        }
        let mut merged: Option<BytesMut> = None;
        let mut size = first.len();
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) if size + data.len() <= MAX_MERGED => {
                        let buffer = merged.get_or_insert_with(|| {
                            let mut buffer = BytesMut::with_capacity(MAX_MERGED);
                            buffer.extend_from_slice(&first);
                            buffer
                        });
                        size += data.len();
                        buffer.extend_from_slice(&data);
                    }
                    Ok(data) => {
                        this.held = Some(Frame::data(data));
                        break;
                    }
                    Err(trailers) => {
                        this.held = Some(trailers);
                        break;
                    }
                },
                // End, error or nothing ready: send what we have; an error or the end comes
                // on the next poll.
                Poll::Ready(None) => {
                    this.done = true;
                    break;
                }
                Poll::Ready(Some(Err(err))) => {
                    this.done = true;
                    this.failed = Some(err);
                    break;
                }
                Poll::Pending => break,
            }
        }
        let data = merged.map_or(first, BytesMut::freeze);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && self.failed.is_none() && (self.done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// A body that yields scripted results, `Pending` where the script says so.
    struct Script(VecDeque<Option<Result<Frame<Bytes>, &'static str>>>);

    impl Body for Script {
        type Data = Bytes;
        type Error = &'static str;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, &'static str>>> {
            match self.0.pop_front() {
                Some(Some(item)) => Poll::Ready(Some(item)),
                Some(None) => {
                    cx.waker().wake_by_ref();
                    Poll::Pending
                }
                None => Poll::Ready(None),
            }
        }
    }

    fn data(text: &str) -> Option<Result<Frame<Bytes>, &'static str>> {
        Some(Ok(Frame::data(Bytes::from(text.to_owned()))))
    }

    async fn frames(
        script: Vec<Option<Result<Frame<Bytes>, &'static str>>>,
    ) -> Vec<Result<String, &'static str>> {
        use http_body_util::BodyExt;
        let mut body = Coalesce::new(Script(script.into()));
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            out.push(frame.map(|f| String::from_utf8(f.into_data().unwrap().to_vec()).unwrap()));
        }
        out
    }

    #[tokio::test]
    async fn ready_chunks_merge_and_a_pause_ends_a_frame() {
        let out = frames(vec![
            data("a\n"),
            data("b\n"),
            None,
            data("c\n"),
            data("d\n"),
        ])
        .await;
        assert_eq!(out, vec![Ok("a\nb\n".to_owned()), Ok("c\nd\n".to_owned())]);
    }

    #[tokio::test]
    async fn frames_never_grow_past_the_cap() {
        let chunk = "x".repeat(1000);
        let script = (0..40).map(|_| data(&chunk)).collect();
        let out = frames(script).await;
        let total: usize = out.iter().map(|f| f.as_ref().unwrap().len()).sum();
        assert_eq!(total, 40_000);
        assert!(out.iter().all(|f| f.as_ref().unwrap().len() <= MAX_MERGED));
        assert_eq!(out.len(), 3);
    }

    #[tokio::test]
    async fn an_error_comes_after_the_data_before_it() {
        let out = frames(vec![data("a"), data("b"), Some(Err("boom"))]).await;
        assert_eq!(out, vec![Ok("ab".to_owned()), Err("boom")]);
    }
}
