//! One memory budget for everything the gateway buffers on behalf of requests: client
//! bodies, non-streamed upstream answers, upstream error bodies, oversized stream events
//! and answers recorded for idempotent replay.
//!
//! Per-request caps alone do not bound memory: twenty 64 MiB answers at once are 1.3 GB.
//! Every buffer therefore reserves its bytes here as it grows, and a reservation that
//! does not fit fails at once, so the request that would have exceeded the budget is the
//! one refused (503 `memory_budget_exhausted`) while everything already running keeps
//! its memory. Reservations are released when the buffer is dropped.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::response::Body;

/// The gateway's budget of buffered bytes.
#[derive(Debug, Clone)]
pub struct MemoryBudget {
    permits: Arc<Semaphore>,
    total: usize,
}

/// Bytes held against the budget; released on drop.
#[derive(Debug, Default)]
pub struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
}

/// The budget had no room for a buffer.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error(
    "this gateway replica's memory budget ({0} bytes for buffered bodies) is in use by other requests"
)]
pub struct OverBudget(pub usize);

impl MemoryBudget {
    /// A budget of `total` bytes.
    pub fn new(total: usize) -> Self {
        let total = total.min(Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// The budget's size.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes reserved now.
    pub fn in_use(&self) -> usize {
        self.total - self.permits.available_permits()
    }

    /// Adds `bytes` to `held`, or fails without waiting when they do not fit.
    pub fn grow(&self, held: &mut Reservation, bytes: usize) -> Result<(), OverBudget> {
        if bytes == 0 {
            return Ok(());
        }
        let n = u32::try_from(bytes).map_err(|_| OverBudget(self.total))?;
        let permit = self
            .permits
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| OverBudget(self.total))?;
        match &mut held.permit {
            Some(p) => p.merge(permit),
            None => held.permit = Some(permit),
        }
        Ok(())
    }

    /// Holds `held` at `bytes` or more, reserving only the difference.
    pub fn ensure(&self, held: &mut Reservation, bytes: usize) -> Result<(), OverBudget> {
        let short = bytes.saturating_sub(held.bytes());
        self.grow(held, short)
    }
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.permit
            .as_ref()
            .map_or(0, OwnedSemaphorePermit::num_permits)
    }

    /// Gives every byte back.
    pub fn release(&mut self) {
        self.permit = None;
    }
}

/// A response body that keeps its bytes' reservation until hyper has sent it.
pub struct HeldBody {
    inner: Body,
    _held: Reservation,
}

impl HeldBody {
    /// `inner`, holding `held` for as long as it lives.
    pub fn wrap(inner: Body, held: Reservation) -> Body {
        if held.bytes() == 0 {
            return inner;
        }
        Self { inner, _held: held }.boxed()
    }
}

impl hyper::body::Body for HeldBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why reading a body into memory stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Longer than the caller's limit.
    #[error("the body exceeds {0} bytes")]
    TooLarge(usize),
    /// The memory budget is full.
    #[error(transparent)]
    OverBudget(#[from] OverBudget),
    /// Not all of it arrived in time.
    #[error("the body did not arrive within {0:?}")]
    TimedOut(Duration),
    /// The connection failed while reading.
    #[error("the body broke off: {0}")]
    Broken(String),
}

/// A message's declared `Content-Length`, if it has a valid one.
pub fn declared_length(headers: &hyper::HeaderMap) -> Option<u64> {
    headers
        .get(hyper::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// How much of a body to read, and how many copies of it to count.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// Largest body accepted, in bytes.
    pub max: usize,
    /// Copies of the body that will be held at once: a client body is also copied into
    /// the request sent upstream.
    pub copies: usize,
    /// Time for the whole body.
    pub timeout: Duration,
}

/// Reads all of `body` within `limits`, reserving each chunk (times its copies) before it
/// is kept. A declared length is reserved up front, so a body that cannot fit is refused
/// before any of it is read.
pub async fn read_body<B>(
    budget: &MemoryBudget,
    body: B,
    declared: Option<u64>,
    limits: ReadLimits,
) -> Result<(Bytes, Reservation), ReadError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let ReadLimits {
        max: limit,
        copies,
        timeout,
    } = limits;
    let mut held = Reservation::default();
    let mut buf = BytesMut::new();
    if let Some(n) = declared {
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if n > limit {
            return Err(ReadError::TooLarge(limit));
        }
        budget.grow(&mut held, n.saturating_mul(copies))?;
        buf.reserve(n);
    }
    let read = async {
        let mut body = body;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ReadError::Broken(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            let len = buf.len() + data.len();
            if len > limit {
                return Err(ReadError::TooLarge(limit));
            }
            if len > buf.capacity() {
                // Grow by doubling, as the buffer would, but reserve what it will hold
                // before it is allocated.
                let cap = len.max(buf.capacity() * 2).min(limit);
                budget.ensure(&mut held, cap.saturating_mul(copies))?;
                buf.reserve(cap - buf.len());
            }
            buf.extend_from_slice(&data);
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Err(_) => Err(ReadError::TimedOut(timeout)),
        Ok(Err(e)) => Err(e),
        Ok(Ok(())) => Ok((buf.freeze(), held)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    fn limits(max: usize) -> ReadLimits {
        ReadLimits {
            max,
            copies: 1,
            timeout: Duration::from_secs(5),
        }
    }

    #[test]
    fn reservations_add_up_and_are_given_back_on_drop() {
        let budget = MemoryBudget::new(100);
        let mut a = Reservation::default();
        budget.grow(&mut a, 60).expect("fits");
        let mut b = Reservation::default();
        assert!(budget.grow(&mut b, 50).is_err(), "60 + 50 > 100");
        budget.ensure(&mut b, 40).expect("fits exactly");
        budget.ensure(&mut b, 30).expect("already held");
        assert_eq!((budget.in_use(), b.bytes()), (100, 40));
        drop(a);
        assert_eq!(budget.in_use(), 40);
        b.release();
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn a_body_is_refused_at_the_limit_or_when_the_budget_is_full() {
        let budget = MemoryBudget::new(1000);
        let body = || Full::new(Bytes::from(vec![b'x'; 600]));
        let (bytes, held) = read_body(&budget, body(), None, limits(800))
            .await
            .expect("fits");
        assert_eq!((bytes.len(), held.bytes()), (600, 600));
        let second = read_body(&budget, body(), None, limits(800)).await;
        assert!(
            matches!(second, Err(ReadError::OverBudget(_))),
            "{second:?}"
        );
        assert_eq!(budget.in_use(), 600, "a refused read keeps nothing");
        let declared = read_body(&budget, body(), Some(900), limits(800)).await;
        assert!(matches!(declared, Err(ReadError::TooLarge(800))));
        drop((bytes, held));
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn a_declared_length_is_reserved_before_reading() {
        let budget = MemoryBudget::new(1000);
        let mut other = Reservation::default();
        budget.grow(&mut other, 500).expect("fits");
        // A body that never sends anything: refused at once, not after the timeout.
        let (_tx, mut rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(1);
        let never = StreamBody::new(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
        let read = read_body(&budget, never, Some(600), limits(800)).await;
        assert!(matches!(read, Err(ReadError::OverBudget(_))), "{read:?}");
    }
}
