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

use crate::budget::{MemoryBudget, Reservation};
use crate::response::Body;

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

/// What an entry costs beyond its strings, headers and body: the LRU node and its hash
/// slot, the `Arc` around a kept answer, a pending entry's watch channel, and the
/// allocator's rounding of each of those. Checked against a counting allocator in the
/// tests below, so the bytes reported are the bytes held.
const ENTRY_OVERHEAD: usize = 576;

/// What each kept header costs beyond its name and value.
const HEADER_OVERHEAD: usize = 64;

impl Stored {
    fn size(&self) -> usize {
        self.body.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + HEADER_OVERHEAD)
                .sum::<usize>()
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

impl Entry {
    fn size(&self) -> usize {
        match self {
            Self::Pending { .. } => 0,
            Self::Stored(s) => s.size(),
        }
    }
}

#[derive(Debug, Hash, PartialEq, Eq, Clone)]
struct Key {
    client: String,
    key: String,
}

impl Key {
    fn size(&self) -> usize {
        ENTRY_OVERHEAD + self.client.len() + self.key.len()
    }
}

/// The entries and what they hold in total, requests in flight included.
#[derive(Debug)]
struct Inner {
    entries: LruCache<Key, Entry, RandomState>,
    bytes: usize,
}

impl Inner {
    fn put(&mut self, key: Key, entry: Entry) {
        let key_size = key.size();
        self.bytes += key_size + entry.size();
        if let Some(old) = self.entries.put(key, entry) {
            self.bytes = self.bytes.saturating_sub(key_size + old.size());
        }
    }

    fn pop(&mut self, key: &Key) -> Option<Entry> {
        let old = self.entries.pop(key)?;
        self.bytes = self.bytes.saturating_sub(key.size() + old.size());
        Some(old)
    }
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
                        inner.pop(&key);
                        let (tx, rx) = watch::channel(());
                        inner.put(
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

    /// Bytes held: kept answers and the keys of requests in flight.
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
        let size = self.key.size() + stored.size();
        let max = self.replays.max_bytes;
        let mut inner = self.replays.lock();
        self.stored = true;
        if size > max {
            inner.pop(&self.key);
            return;
        }
        inner.put(self.key.clone(), Entry::Stored(Arc::new(stored)));
        // Evict kept answers, least recently used first; requests in flight keep their
        // place (their number is bounded by the connection cap).
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
            inner.pop(&oldest);
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
            inner.pop(&self.key);
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
    /// `seen`'s share of the memory budget; without room, the answer is not kept.
    budget: MemoryBudget,
    held: Reservation,
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
        budget: MemoryBudget,
    ) -> Self {
        let stream = headers
            .get(hyper::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        Self {
            inner,
            seen: BytesMut::new(),
            budget,
            held: Reservation::default(),
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
                if let Some(data) = frame.data_ref()
                    && self.pending.is_some()
                {
                    let len = self.seen.len() + data.len();
                    let this = &mut *self;
                    if len > this.limit || this.budget.ensure(&mut this.held, len).is_err() {
                        this.pending = None;
                        this.seen = BytesMut::new();
                        this.held.release();
                    } else {
                        this.seen.extend_from_slice(data);
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

/// Counts, per thread, the bytes malloc really holds for this thread's allocations (the
/// request rounded up to glibc's 16-byte chunks plus its 8-byte header), so a test can
/// compare what a structure reports with what it costs.
#[cfg(test)]
#[allow(unsafe_code)]
pub(crate) mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static NET: Cell<isize> = const { Cell::new(0) };
    }

    fn chunk(layout: Layout) -> isize {
        let size = (layout.size() + 8 + 15) & !15;
        isize::try_from(size.max(32)).unwrap_or(isize::MAX)
    }

    fn add(n: isize) {
        let _ = NET.try_with(|c| c.set(c.get() + n));
    }

    /// Bytes this thread holds now, as counted.
    pub fn held() -> isize {
        NET.try_with(Cell::get).unwrap_or(0)
    }

    struct Counting;

    // SAFETY: every call is passed to the system allocator unchanged; only a counter in
    // thread-local storage (const-initialised, so touching it never allocates) changes.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            add(chunk(layout));
            // SAFETY: the caller's contract is the system allocator's.
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            add(-chunk(layout));
            // SAFETY: `ptr` came from `alloc` above with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_bytes_reported_are_the_bytes_held_even_with_long_keys_and_small_answers() {
        let window = Duration::from_secs(600);
        let far = Instant::now() + window;
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("x-switchyard-provider", HeaderValue::from_static("alpha"));
        let fill = |r: &Arc<Replays>, n: usize| {
            let r = r.clone();
            let headers = headers.clone();
            async move {
                for i in 0..n {
                    let key = format!("{i:0>255}");
                    let l = lead(
                        r.claim("client-with-a-long-name", &key, fp(1), window, far)
                            .await,
                    );
                    l.store(
                        StatusCode::OK,
                        &headers,
                        Bytes::from(format!("{{\"n\":{i}}}")),
                    );
                }
            }
        };
        // Everything fits: what is reported covers what is held.
        let r = Arc::new(Replays::new(usize::MAX));
        let before = counting::held();
        fill(&r, 4000).await;
        let held = usize::try_from(counting::held() - before).expect("grew");
        let reported = r.bytes();
        assert!(
            reported >= held && reported <= held * 2,
            "reported {reported} bytes for {held} held"
        );
        drop(r);
        // At the bound: memory stays near it however many keys arrive.
        let max = 512 << 10;
        let r = Arc::new(Replays::new(max));
        let before = counting::held();
        fill(&r, 20_000).await;
        let held = usize::try_from(counting::held() - before).expect("grew");
        assert!(r.bytes() <= max, "{} > {max}", r.bytes());
        assert!(
            held <= max + max / 4,
            "{held} bytes held for a bound of {max}"
        );
    }

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
