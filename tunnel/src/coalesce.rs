//! [`Coalesce`]: a body that merges the data frames already waiting into one, so a burst of
//! small chunks (NDJSON tokens produced faster than they are sent) crosses each hop as a few
//! large frames instead of thousands of tiny ones.
//!
//! It never waits for data to be produced, only for the producer's task to take its turn: a
//! body whose frames come from another task (hyper's HTTP/1 client hands over one chunk at a
//! time and decodes the next only once that one is taken) has nothing ready on the second poll
//! even when the next chunk already sits in the socket. So when the inner body is pending with
//! data in hand, the merge wakes its own task, which lets the tasks already queued (the
//! producer among them) run first, and looks again; it keeps merging while the looks bring
//! more, and passes the frame on after two more looks in a row that bring nothing. A token
//! that comes alone is delayed by two trips through the task queue (microseconds), not by any
//! timer.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};

/// Largest merged frame: 16 KiB, one HTTP/2 frame and one tunnel message.
pub const MAX_MERGED: usize = 16 * 1024;

/// Looks in a row that find nothing new, after the one that came back empty, before a merge
/// goes out: 2. A look can come before the producer had its turn (hyper's HTTP/1 server polls
/// a pending body again in the same go; an idle worker may steal the merging task and poll it
/// at once), so one empty look is no proof that nothing more is coming. Each look costs a trip
/// through the task queue.
const EMPTY_LOOKS: u8 = 2;

/// See the module docs.
pub struct Coalesce<B: Body> {
    inner: B,
    /// Data taken from the inner body and not passed on yet, kept over a yield.
    gathered: Option<Bytes>,
    merged: Option<BytesMut>,
    /// Looks at the inner body that found nothing since data was last gathered.
    empty_looks: u8,
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
            gathered: None,
            merged: None,
            empty_looks: 0,
            failed: None,
            held: None,
            done: false,
        }
    }

    /// Bytes gathered so far.
    fn gathered_len(&self) -> usize {
        match (&self.merged, &self.gathered) {
            (Some(merged), _) => merged.len(),
            (None, Some(first)) => first.len(),
            (None, None) => 0,
        }
    }

    /// Adds `data` to what is gathered, copying only once a second piece comes.
    fn gather(&mut self, data: Bytes) {
        if let Some(merged) = &mut self.merged {
            merged.extend_from_slice(&data);
        } else if let Some(first) = self.gathered.take() {
            let mut merged = BytesMut::with_capacity(MAX_MERGED);
            merged.extend_from_slice(&first);
            merged.extend_from_slice(&data);
            self.merged = Some(merged);
        } else {
            self.gathered = Some(data);
        }
    }

    /// Takes what is gathered as one frame, if anything is.
    fn take_gathered(&mut self) -> Option<Frame<Bytes>> {
        self.empty_looks = 0;
        let data = match self.merged.take() {
            Some(merged) => Some(merged.freeze()),
            None => self.gathered.take(),
        };
        data.map(Frame::data)
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
        if this.gathered_len() == 0 {
            if let Some(err) = this.failed.take() {
                return Poll::Ready(Some(Err(err)));
            }
            match this.held.take() {
                Some(frame) => match frame.into_data() {
                    Ok(data) => this.gather(data),
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                None if this.done => return Poll::Ready(None),
                None => {}
            }
        }
        let mut progressed = false;
        while !this.done && this.held.is_none() && this.gathered_len() < MAX_MERGED {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    // An empty chunk carries nothing: not worth a frame, nor another turn.
                    Ok(data) if data.is_empty() => {}
                    Ok(data) if this.gathered_len() + data.len() <= MAX_MERGED => {
                        this.gather(data);
                        progressed = true;
                    }
                    Ok(data) if this.gathered_len() == 0 => {
                        // Larger than a merge on its own: passed on as it is.
                        this.gather(data);
                        break;
                    }
                    Ok(data) => this.held = Some(Frame::data(data)),
                    Err(trailers) => this.held = Some(trailers),
                },
                // The end, or an error: send what we have; the error or the end comes on the
                // next poll.
                Poll::Ready(None) => this.done = true,
                Poll::Ready(Some(Err(err))) => {
                    this.done = true;
                    this.failed = Some(err);
                }
                Poll::Pending => {
                    if this.gathered_len() == 0 {
                        return Poll::Pending;
                    }
                    if progressed {
                        this.empty_looks = 0;
                    } else {
                        this.empty_looks += 1;
                    }
                    if this.empty_looks < EMPTY_LOOKS {
                        // Give the producer a turn to make its next chunk, then look again.
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                    break;
                }
            }
        }
        if let Some(frame) = this.take_gathered() {
            return Poll::Ready(Some(Ok(frame)));
        }
        // No data came, only trailers, an error or the end: pass it on now.
        if let Some(frame) = this.held.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Poll::Ready(this.failed.take().map(Err))
    }

    fn is_end_stream(&self) -> bool {
        self.gathered_len() == 0
            && self.held.is_none()
            && self.failed.is_none()
            && (self.done || self.inner.is_end_stream())
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
        // A `None` is a look that finds nothing (a producer that needs a turn to make its next
        // chunk); three in a row, the look that came back empty and [`EMPTY_LOOKS`] more, are a
        // pause.
        let out = frames(vec![
            data("a\n"),
            data("b\n"),
            None,
            None,
            None,
            data("c\n"),
            data("d\n"),
        ])
        .await;
        assert_eq!(out, vec![Ok("a\nb\n".to_owned()), Ok("c\nd\n".to_owned())]);
    }

    #[tokio::test]
    async fn a_producer_that_hands_over_one_chunk_per_turn_still_merges() {
        // hyper's HTTP/1 client body: one chunk, then pending until its task runs again.
        let out = frames(vec![
            data("a"),
            None,
            data("b"),
            None,
            data("c"),
            None,
            None,
            None,
            data("d"),
        ])
        .await;
        assert_eq!(out, vec![Ok("abc".to_owned()), Ok("d".to_owned())]);
    }

    #[tokio::test]
    async fn a_second_poll_before_the_producers_turn_waits_for_it() {
        use http_body_util::{BodyExt, StreamBody};
        // A producer on its own task that can hand over its next chunk only once the last was
        // taken, as hyper's HTTP/1 client does; and a consumer that polls a pending body twice
        // in one go, as hyper's HTTP/1 server does. The second look comes before the producer
        // ran and must not end the merge.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        tokio::spawn(async move {
            for chunk in ["a", "b"] {
                tx.send(Bytes::from_static(chunk.as_bytes())).await.unwrap();
            }
        });
        tokio::task::yield_now().await;
        let stream = futures_util::stream::poll_fn(move |cx| {
            rx.poll_recv(cx)
                .map(|chunk| chunk.map(|c| Ok::<_, &'static str>(Frame::data(c))))
        });
        let mut body = Coalesce::new(StreamBody::new(stream));
        for _ in 0..2 {
            let pending = std::future::poll_fn(|cx| {
                Poll::Ready(Pin::new(&mut body).poll_frame(cx).is_pending())
            })
            .await;
            assert!(pending, "nothing goes out before the producer's turn");
        }
        // The consumer's task gives way; the producer runs.
        tokio::task::yield_now().await;
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "ab");
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn a_lone_chunk_is_not_held_waiting_for_more() {
        use http_body_util::BodyExt;
        // A producer that stays pending: the chunk in hand must come out after a few looks.
        struct Once(Option<Bytes>);
        impl Body for Once {
            type Data = Bytes;
            type Error = &'static str;
            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<Frame<Bytes>, &'static str>>> {
                match self.0.take() {
                    Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                    None => Poll::Pending,
                }
            }
        }
        let mut body = Coalesce::new(Once(Some(Bytes::from_static(b"token"))));
        let frame = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
            .await
            .expect("the chunk in hand came out")
            .unwrap()
            .unwrap();
        assert_eq!(frame.into_data().unwrap(), "token");
    }

    #[tokio::test]
    async fn empty_chunks_make_no_frames() {
        let out = frames(vec![data(""), data("a"), data(""), None, None, data("")]).await;
        assert_eq!(out, vec![Ok("a".to_owned())]);
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
    async fn trailers_pass_whether_data_came_before_them_or_not() {
        use http_body_util::BodyExt;
        let trailers = || {
            let mut map = hyper::HeaderMap::new();
            map.insert("x-done", hyper::header::HeaderValue::from_static("1"));
            Some(Ok(Frame::trailers(map)))
        };
        for script in [vec![trailers()], vec![data("a"), trailers()]] {
            let with_data = script.len() > 1;
            let mut body = Coalesce::new(Script(script.into()));
            if with_data {
                let frame = body.frame().await.unwrap().unwrap();
                assert_eq!(frame.into_data().unwrap(), "a");
            }
            let frame = body.frame().await.expect("trailers, not the end").unwrap();
            assert_eq!(frame.into_trailers().unwrap()["x-done"], "1");
            assert!(body.frame().await.is_none());
        }
    }

    #[tokio::test]
    async fn an_error_comes_after_the_data_before_it() {
        let out = frames(vec![data("a"), data("b"), Some(Err("boom"))]).await;
        assert_eq!(out, vec![Ok("ab".to_owned()), Err("boom")]);
    }
}
