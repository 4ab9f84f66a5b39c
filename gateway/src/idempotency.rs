//! Replaying answers to requests retried with the same `Idempotency-Key`, so a client's
//! retry after a lost response does not buy a second upstream call.
//!
//! Answers are kept per (client, key) for the route's window, in memory bounded by bytes
//! with least-recently-used eviction. The first request with a key leads; duplicates that
//! arrive while it is in flight wait for it and then get its answer. Only complete
//! successful answers are kept: after a failure, the next duplicate leads a fresh call.

use std::collections::hash_map::RandomState;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{HeaderMap, StatusCode};
use lru::LruCache;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::server::Body;

/// Longest accepted `Idempotency-Key`.
pub const MAX_KEY_LEN: usize = 255;

/// A kept answer.
#[derive(Debug)]
pub struct Stored {
    fingerprint: [u8; 32],
    expires: Instant,
    /// Status of the answer.
    pub status: StatusCode,
    /// Headers of the answer, minus per-request ones.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The whole body, as first sent (for streams, every event through `[DONE]`).
    pub body: Bytes,
}

impl Stored {
    fn size(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len())
                .sum::<usize>()
            + 128
    }
}

#[derive(Debug)]
enum Entry {
    /// A leader is serving the key; this receiver sees its lease end.
    Pending {
        fingerprint: [u8; 32],
        done: watch::Receiver<()>,
    },
    Stored(Arc<Stored>),
}

#[derive(Debug, Hash, PartialEq, Eq, Clone)]
struct Key {
    client: String,
    key: String,
}

#[derive(Debug)]
struct Inner {
    entries: LruCache<Key, Entry, RandomState>,
    bytes: usize,
}

/// The replay store of one gateway.
#[derive(Debug)]
pub struct Replays {
    inner: Mutex<Inner>,
    max_bytes: usize,
}

/// What a request carrying a key should do.
#[derive(Debug)]
pub enum Claim {
    /// Answer with this, without calling upstream.
    Replay(Arc<Stored>),
    /// The key was used for a different request body.
    Mismatch,
    /// The first request with this key is still running past the wait limit.
    StillRunning,
    /// Serve the request; hand the answer to the lease.
    Lead(Lease),
}

/// The right, and duty, to serve a key. Dropping it without storing frees the key.
#[derive(Debug)]
pub struct Lease {
    replays: Arc<Replays>,
    key: Key,
    fingerprint: [u8; 32],
    window: Duration,
    stored: bool,
    _done: watch::Sender<()>,
}

impl Replays {
    /// A store holding at most `max_bytes` of answers.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                entries: LruCache::unbounded_with_hasher(RandomState::new()),
                bytes: 0,
            }),
            max_bytes,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Claims `key` for `client`'s request whose body hashes to `fingerprint`; waits for a
    /// running duplicate until `wait_until`.
    pub async fn claim(
        self: &Arc<Self>,
        client: &str,
        key: &str,
        fingerprint: [u8; 32],
        window: Duration,
        wait_until: Instant,
    ) -> Claim {
        let key = Key {
            client: client.to_owned(),
            key: key.to_owned(),
        };
        loop {
            let mut done = {
                let mut inner = self.lock();
                let now = Instant::now();
                match inner.entries.get(&key) {
                    Some(Entry::Stored(s)) if s.expires > now => {
                        return if s.fingerprint == fingerprint {
                            Claim::Replay(s.clone())
                        } else {
                            Claim::Mismatch
                        };
                    }
                    Some(Entry::Pending {
                        fingerprint: f,
                        done,
                    }) => {
                        if *f != fingerprint {
                            return Claim::Mismatch;
                        }
                        done.clone()
                    }
                    // Absent or expired: this request leads.
                    _ => {
                        if let Some(Entry::Stored(old)) = inner.entries.pop(&key) {
                            inner.bytes = inner.bytes.saturating_sub(old.size());
                        }
                        let (tx, rx) = watch::channel(());
                        inner.entries.put(
                            key.clone(),
                            Entry::Pending {
                                fingerprint,
                                done: rx,
                            },
                        );
                        return Claim::Lead(Lease {
                            replays: self.clone(),
                            key,
                            fingerprint,
                            window,
                            stored: false,
                            _done: tx,
                        });
                    }
                }
            };
            // Resolves when the leader's lease ends, stored or not; then look again.
            if tokio::time::timeout_at(wait_until, done.changed())
                .await
                .is_err()
            {
                return Claim::StillRunning;
            }
        }
    }

    /// Bytes of answers held.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

impl Lease {
    /// Keeps the answer for the window.
    pub fn store(mut self, status: StatusCode, headers: &HeaderMap, body: Bytes) {
        let stored = Stored {
            fingerprint: self.fingerprint,
            expires: Instant::now() + self.window,
            status,
            headers: headers
                .iter()
                .filter(|(k, _)| k.as_str() != "x-request-id")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            body,
        };
        let size = stored.size();
        let max = self.replays.max_bytes;
        let mut inner = self.replays.lock();
        self.stored = true;
        if size > max {
            inner.entries.pop(&self.key);
            return;
        }
        inner
            .entries
            .put(self.key.clone(), Entry::Stored(Arc::new(stored)));
        inner.bytes += size;
        // Evict kept answers, least recently used first; requests in flight hold no
        // bytes here and keep their place.
        while inner.bytes > max {
            let Some(oldest) = inner
                .entries
                .iter()
                .rev()
                .find(|(_, e)| matches!(e, Entry::Stored(_)))
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(Entry::Stored(old)) = inner.entries.pop(&oldest) {
                inner.bytes = inner.bytes.saturating_sub(old.size());
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.stored {
            return;
        }
        let mut inner = self.replays.lock();
        if matches!(inner.entries.peek(&self.key), Some(Entry::Pending { .. })) {
            inner.entries.pop(&self.key);
        }
    }
}

/// SHA-256 of what makes two requests the same request.
pub fn fingerprint(path: &str, body: &[u8]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(path.as_bytes());
    ctx.update(b"\n");
    ctx.update(body);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// A response body passed through to the client and kept for replay once it ends
/// complete; a stream ending without `[DONE]` (interrupted) or longer than the limit is
/// not kept.
pub struct Recording {
    inner: Body,
    seen: BytesMut,
    limit: usize,
    stream: bool,
    pending: Option<(Lease, StatusCode, HeaderMap)>,
}

impl Recording {
    /// Records `inner`, the body of a response with `status` and `headers`.
    pub fn new(
        inner: Body,
        lease: Lease,
        status: StatusCode,
        headers: HeaderMap,
        limit: usize,
    ) -> Self {
        let stream = headers
            .get(hyper::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        Self {
            inner,
            seen: BytesMut::new(),
            limit,
            stream,
            pending: Some((lease, status, headers)),
        }
    }

    fn finish(&mut self) {
        let Some((lease, status, headers)) = self.pending.take() else {
            return;
        };
        if self.stream && !self.seen.ends_with(b"data: [DONE]\n\n") {
            return;
        }
        lease.store(status, &headers, std::mem::take(&mut self.seen).freeze());
    }
}

impl HttpBody for Recording {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if self.seen.len() + data.len() > self.limit {
                        self.pending = None;
                        self.seen = BytesMut::new();
                    } else if self.pending.is_some() {
                        self.seen.extend_from_slice(data);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => self.pending = None,
            Poll::Ready(None) => self.finish(),
            Poll::Pending => {}
        }
        // hyper stops polling a body that says it has ended, so a whole body (one frame)
        // never yields the final `None`.
        if matches!(polled, Poll::Ready(Some(Ok(_)))) && self.inner.is_end_stream() {
            self.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(n: u8) -> [u8; 32] {
        [n; 32]
    }

    fn lead(c: Claim) -> Lease {
        match c {
            Claim::Lead(l) => l,
            other => panic!("expected to lead, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stored_answer_is_replayed_within_its_window_only() {
        let r = Arc::new(Replays::new(1 << 20));
        let far = Instant::now() + Duration::from_secs(60);
        let window = Duration::from_secs(10);
        let l = lead(r.claim("app", "k1", fp(1), window, far).await);
        l.store(StatusCode::OK, &HeaderMap::new(), Bytes::from_static(b"{}"));
        assert!(matches!(
            r.claim("app", "k1", fp(1), window, far).await,
            Claim::Replay(s) if s.body == "{}"
        ));
        assert!(matches!(
            r.claim("app", "k1", fp(2), window, far).await,
            Claim::Mismatch
        ));
        // Another client's identical key is its own.
        lead(r.claim("other", "k1", fp(1), window, far).await);
        tokio::time::advance(Duration::from_secs(11)).await;
        lead(r.claim("app", "k1", fp(1), window, far).await);
    }

    #[tokio::test(start_paused = true)]
    async fn duplicates_wait_for_the_leader_and_a_failed_leader_frees_the_key() {
        let r = Arc::new(Replays::new(1 << 20));
        let far = Instant::now() + Duration::from_secs(60);
        let window = Duration::from_secs(10);
        let l = lead(r.claim("app", "k", fp(1), window, far).await);
        let r2 = r.clone();
        let waiter = tokio::spawn(async move { r2.claim("app", "k", fp(1), window, far).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished(), "the duplicate waits");
        drop(l);
        let next = waiter.await.expect("joined");
        assert!(
            matches!(next, Claim::Lead(_)),
            "after a failure the duplicate leads"
        );

        let soon = Instant::now() + Duration::from_secs(2);
        let _held = next;
        assert!(matches!(
            r.claim("app", "k", fp(1), window, soon).await,
            Claim::StillRunning
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn memory_stays_under_the_bound_by_evicting_the_least_recently_used() {
        let r = Arc::new(Replays::new(4096));
        let far = Instant::now() + Duration::from_secs(60);
        let window = Duration::from_secs(600);
        for i in 0..20u8 {
            let l = lead(r.claim("app", &format!("k{i}"), fp(i), window, far).await);
            l.store(
                StatusCode::OK,
                &HeaderMap::new(),
                Bytes::from(vec![b'x'; 1000]),
            );
            assert!(r.bytes() <= 4096, "{} bytes held", r.bytes());
        }
        assert!(matches!(
            r.claim("app", "k19", fp(19), window, far).await,
            Claim::Replay(_)
        ));
        assert!(matches!(
            r.claim("app", "k0", fp(0), window, far).await,
            Claim::Lead(_)
        ));
    }
}
