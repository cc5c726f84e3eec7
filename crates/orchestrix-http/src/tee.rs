//! The handler's response on its way to the client: streamed as it arrives, while a copy
//! is kept for replay within a size limit and a time limit.
//!
//! The layer must neither hold a response back from its client in order to keep it, nor
//! wait without end for a body that never ends. So [`split`] divides the body in two:
//!
//! * a [`Collector`], driven by the request's own task (the one that holds the key), reads
//!   the body and forwards each frame to the client at once, keeping a copy of the data up
//!   to the limit. It stops when the body ends, fails, outgrows the limit, or outlasts the
//!   deadline: [`Kept`] says which.
//! * the client's [`Body`] yields the forwarded frames. When the collector gave up on a
//!   body that is still going (too large, too slow), the client's side reads the rest of it
//!   itself, in the connection's task, at the client's pace: the request's task ends at
//!   the deadline at the latest.
//!
//! The *end* of the response (the last frame, or a failure) reaches the client only
//! through [`Tail::send`], which the layer calls after it has stored the outcome, so a
//! client that has the whole response and retries at once gets the replay, not a 409.
//!
//! A client that hangs up does not stop the collector: the copy is still completed (within
//! the limits), so the retry that follows finds the response.
//!
//! Frames travel over an unbounded channel so that collecting does not wait for a slow
//! reader; what is queued is the same (reference-counted) data as the copy, so a response
//! costs about its kept size in memory, and the queue stops growing once the limit is
//! passed.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum_core::body::Body;
use bytes::{Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What became of the copy.
#[derive(Debug)]
pub(crate) enum Kept {
    /// The body ended within the limits: all of its data.
    Whole(Bytes),
    /// The body is larger than the limit.
    TooLarge,
    /// The body did not end before the deadline.
    TimedOut,
    /// The body failed.
    Broken,
}

impl Kept {
    /// Why a response is not kept, for the logs.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::Whole(_) => "kept",
            Self::TooLarge => "it is larger than the body limit",
            Self::TimedOut => "it did not end within the response body timeout",
            Self::Broken => "it failed while being read",
        }
    }
}

/// Splits `body` into the body the client reads and the [`Collector`] that feeds it.
pub(crate) fn split<B>(body: B, limit: usize) -> (Body, Collector<B>)
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (to_client, frames) = mpsc::unbounded_channel();
    let body = Box::pin(body);
    let client = ClientBody {
        frames,
        rest: None,
        remaining: body.size_hint(),
        ended: false,
    };
    let collector = Collector {
        body,
        to_client,
        copy: Vec::new(),
        copied: 0,
        limit,
    };
    (Body::new(client), collector)
}

/// Reads the handler's body, forwards it to the client and keeps a copy.
pub(crate) struct Collector<B> {
    body: Pin<Box<B>>,
    to_client: mpsc::UnboundedSender<Message<B>>,
    copy: Vec<Bytes>,
    copied: usize,
    limit: usize,
}

/// What the client's side of the body still needs once the outcome is stored.
pub(crate) struct Tail<B> {
    to_client: mpsc::UnboundedSender<Message<B>>,
    last: Vec<Message<B>>,
}

impl<B> Tail<B> {
    /// Ends the client's response (or hands it the rest of the body). If the client is
    /// gone, the rest of the body is dropped here.
    pub(crate) fn send(self) {
        for message in self.last {
            if self.to_client.send(message).is_err() {
                return;
            }
        }
    }
}

impl<B> Collector<B>
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    /// Reads the body until it ends, fails, outgrows the limit, or `timeout` has passed.
    ///
    /// # Cancel safety
    /// Dropping the future drops the body; the client's side then reports an error instead
    /// of a truncated response.
    pub(crate) async fn collect(mut self, timeout: Duration) -> (Kept, Tail<B>) {
        let deadline = Instant::now() + timeout;
        if self.body.size_hint().lower() > self.limit as u64 {
            return self.hand_over(Kept::TooLarge, Vec::new());
        }
        loop {
            if self.body.is_end_stream() {
                return self.finish(Vec::new());
            }
            let frame = tokio::select! {
                frame = self.body.frame() => Some(frame),
                () = tokio::time::sleep_until(deadline) => None,
            };
            let frame = match frame {
                None => return self.hand_over(Kept::TimedOut, Vec::new()),
                Some(None) => return self.finish(Vec::new()),
                Some(Some(Err(error))) => {
                    let failed = Message::Failed(error.into());
                    return (Kept::Broken, self.tail(vec![failed]));
                }
                Some(Some(Ok(frame))) => frame,
            };
            if let Some(data) = frame.data_ref() {
                if data.is_empty() {
                    continue;
                }
                self.copied = self.copied.saturating_add(data.len());
                if self.copied > self.limit {
                    return self.hand_over(Kept::TooLarge, vec![Message::Frame(frame)]);
                }
                self.copy.push(data.clone());
            }
            if self.body.is_end_stream() {
                return self.finish(vec![Message::Frame(frame)]);
            }
            // A client that hung up gets nothing, but the copy goes on for its retry.
            let _ = self.to_client.send(Message::Frame(frame));
        }
    }

    /// The body ended: the copy is whole; `last` and the end go to the client later.
    fn finish(self, mut last: Vec<Message<B>>) -> (Kept, Tail<B>) {
        last.push(Message::End);
        let data = match self.copy.len() {
            1 => self.copy.into_iter().next().unwrap_or_default(),
            _ => {
                let mut data = BytesMut::with_capacity(self.copied);
                for chunk in &self.copy {
                    data.extend_from_slice(chunk);
                }
                data.freeze()
            }
        };
        let tail = Tail {
            to_client: self.to_client,
            last,
        };
        (Kept::Whole(data), tail)
    }

    /// Gives up the copy; the client's side reads the rest of the body itself.
    fn hand_over(self, kept: Kept, mut last: Vec<Message<B>>) -> (Kept, Tail<B>) {
        last.push(Message::Rest(self.body));
        let tail = Tail {
            to_client: self.to_client,
            last,
        };
        (kept, tail)
    }

    fn tail(self, last: Vec<Message<B>>) -> Tail<B> {
        Tail {
            to_client: self.to_client,
            last,
        }
    }
}

/// From the collector to the client's side of the body.
enum Message<B> {
    /// The next frame.
    Frame(Frame<Bytes>),
    /// The body failed: the last message.
    Failed(BoxError),
    /// The body ended: the last message.
    End,
    /// The rest of the body, to read directly: the last message.
    Rest(Pin<Box<B>>),
}

/// The body the client reads: the collector's frames, then possibly the rest of the body.
struct ClientBody<B> {
    frames: mpsc::UnboundedReceiver<Message<B>>,
    rest: Option<Pin<Box<B>>>,
    /// What is left to send, as the handler's body announced it.
    remaining: SizeHint,
    ended: bool,
}

impl<B> HttpBody for ClientBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if let Some(rest) = &mut this.rest {
                return rest
                    .as_mut()
                    .poll_frame(cx)
                    .map(|frame| frame.map(|frame| frame.map_err(Into::into)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match ready!(this.frames.poll_recv(cx)) {
                Some(Message::Frame(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        this.remaining = less(this.remaining, data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Some(Message::Rest(body)) => this.rest = Some(body),
                Some(Message::End) => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Some(Message::Failed(error)) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(error)));
                }
                None => {
                    // The request's task ended without finishing the body (the runtime
                    // is shutting down): an error, never a silently truncated response.
                    this.ended = true;
                    return Poll::Ready(Some(Err("the response was cut off".into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.rest {
            Some(rest) => rest.is_end_stream(),
            None => self.ended,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.rest {
            Some(rest) => rest.size_hint(),
            None => self.remaining,
        }
    }
}

/// `hint` after `sent` more bytes.
fn less(hint: SizeHint, sent: u64) -> SizeHint {
    let mut left = SizeHint::new();
    let lower = hint.lower().saturating_sub(sent);
    left.set_lower(lower);
    if let Some(upper) = hint.upper() {
        left.set_upper(upper.saturating_sub(sent).max(lower));
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    use futures_util::{FutureExt, StreamExt, stream};
    use http_body_util::{Full, StreamBody};

    fn chunks(
        parts: &[&'static str],
    ) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>>> {
        let frames: Vec<_> = parts
            .iter()
            .map(|part| Ok(Frame::data(Bytes::from_static(part.as_bytes()))))
            .collect();
        StreamBody::new(stream::iter(frames))
    }

    async fn read(body: Body) -> Result<Bytes, axum_core::Error> {
        Ok(body.collect().await?.to_bytes())
    }

    #[tokio::test]
    async fn a_body_within_the_limits_is_kept_whole_and_reaches_the_client() {
        let (client, collector) = split(chunks(&["ab", "", "cd"]), 4);
        let (kept, tail) = collector.collect(Duration::from_secs(5)).await;
        assert!(
            matches!(&kept, Kept::Whole(data) if data == "abcd"),
            "{kept:?}"
        );
        tail.send();
        assert_eq!(read(client).await.unwrap(), "abcd");
    }

    #[tokio::test]
    async fn the_client_gets_the_end_only_once_the_tail_is_sent() {
        let (mut client, collector) = split(Full::new(Bytes::from_static(b"all")), 16);
        assert_eq!(client.size_hint().exact(), Some(3));
        let (kept, tail) = collector.collect(Duration::from_secs(5)).await;
        assert!(matches!(kept, Kept::Whole(_)));
        assert!(
            client.frame().now_or_never().is_none(),
            "the last frame waits for the tail"
        );
        tail.send();
        assert_eq!(read(client).await.unwrap(), "all");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_not_kept_but_reaches_the_client_whole() {
        let (client, collector) = split(chunks(&["ab", "cd", "ef"]), 3);
        let (kept, tail) = collector.collect(Duration::from_secs(5)).await;
        assert!(matches!(kept, Kept::TooLarge), "{kept:?}");
        tail.send();
        assert_eq!(read(client).await.unwrap(), "abcdef");
    }

    #[tokio::test]
    async fn a_body_announced_over_the_limit_is_not_read_by_the_collector() {
        let (client, collector) = split(Full::new(Bytes::from_static(b"abcdef")), 3);
        let (kept, tail) = collector.collect(Duration::from_secs(5)).await;
        assert!(matches!(kept, Kept::TooLarge));
        tail.send();
        assert_eq!(read(client).await.unwrap(), "abcdef");
    }

    #[tokio::test]
    async fn a_failing_body_is_broken_and_the_client_sees_the_failure() {
        let frames = stream::iter([
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Err(std::io::Error::other("gone")),
        ]);
        let (client, collector) = split(StreamBody::new(frames), 16);
        let (kept, tail) = collector.collect(Duration::from_secs(5)).await;
        assert!(matches!(kept, Kept::Broken));
        tail.send();
        assert!(read(client).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_does_not_end_is_handed_to_the_client_at_the_deadline() {
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let frames =
            stream::once(async { Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"ab"))) })
                .chain(stream::once(async move {
                    let _ = released.await;
                    Ok(Frame::data(Bytes::from_static(b"cd")))
                }));
        let (client, collector) = split(StreamBody::new(frames), 16);
        let (kept, tail) = collector.collect(Duration::from_secs(30)).await;
        assert!(matches!(kept, Kept::TimedOut), "{kept:?}");
        tail.send();
        let _ = release.send(());
        assert_eq!(read(client).await.unwrap(), "abcd");
    }

    #[tokio::test]
    async fn a_client_that_hung_up_does_not_stop_the_copy() {
        let (client, collector) = split(chunks(&["ab", "cd"]), 16);
        drop(client);
        let (kept, tail) = collector.collect(Duration::from_secs(5)).await;
        assert!(matches!(&kept, Kept::Whole(data) if data == "abcd"));
        tail.send();
    }

    #[tokio::test]
    async fn a_client_body_whose_collector_vanished_is_an_error() {
        let (client, collector) = split(chunks(&["ab"]), 16);
        drop(collector);
        assert!(read(client).await.is_err());
    }

    #[test]
    fn size_hints_shrink_without_panicking() {
        let exact = less(SizeHint::with_exact(10), 4);
        assert_eq!(exact.exact(), Some(6));
        let over = less(SizeHint::with_exact(3), 10);
        assert_eq!(over.exact(), Some(0));
        let open = less(SizeHint::new(), 5);
        assert_eq!((open.lower(), open.upper()), (0, None));
    }
}
