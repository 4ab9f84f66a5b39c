//! Reading a server-sent event stream from an upstream body, one event at a time.
//!
//! Deadlines are instants, not per-read timeouts: an upstream that keeps sending comments
//! (`: keep-alive`) or events without data is not making progress, so it must not push
//! the caller's first-token, idle or total deadline back.

use bytes::{Buf, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::budget::{MemoryBudget, OverBudget, Reservation};

/// Why a stream ended badly.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StreamError {
    /// No data event arrived before the caller's deadline.
    #[error("the provider sent no data in time")]
    TimedOut,
    /// The connection broke.
    #[error("the provider's stream broke: {0}")]
    Broken(String),
    /// An event grew past the size limit.
    #[error("an event from the provider exceeded {0} bytes")]
    TooLarge(usize),
    /// An event did not fit in the memory budget.
    #[error(transparent)]
    OverBudget(#[from] OverBudget),
}

/// Largest single event accepted.
const MAX_EVENT: usize = 1 << 20;

/// Events up to this size are read without reserving memory; the budget counts larger
/// partial events, which only a misbehaving provider sends.
const SMALL_EVENT: usize = 64 << 10;

/// Splits an upstream body into SSE events and returns each event's `data` payload.
#[derive(Debug)]
pub struct SseReader {
    body: Incoming,
    buf: BytesMut,
    /// How much of `buf` is known to hold no event boundary.
    scanned: usize,
    done: bool,
    budget: MemoryBudget,
    held: Reservation,
}

impl SseReader {
    /// Reads from `body`, counting large partial events against `budget`.
    pub fn new(body: Incoming, budget: MemoryBudget) -> Self {
        Self {
            body,
            buf: BytesMut::new(),
            scanned: 0,
            done: false,
            budget,
            held: Reservation::default(),
        }
    }

    /// The next event's data (lines joined by `\n`); `None` at a clean end of the body.
    /// Comment lines and events without data are skipped and do not extend `until`.
    pub async fn next(&mut self, until: Instant) -> Result<Option<String>, StreamError> {
        loop {
            if let Some(event) = self.take_event() {
                if self.buf.len() <= SMALL_EVENT {
                    self.held.release();
                }
                if let Some(data) = event_data(&event) {
                    return Ok(Some(data));
                }
                continue;
            }
            if self.done {
                // A final event without its blank line still counts.
                if self.buf.is_empty() {
                    return Ok(None);
                }
                let rest = self.buf.split().freeze();
                self.held.release();
                return Ok(event_data(&String::from_utf8_lossy(&rest)));
            }
            match tokio::time::timeout_at(until, self.body.frame()).await {
                Err(_) => return Err(StreamError::TimedOut),
                Ok(None) => self.done = true,
                Ok(Some(Err(e))) => return Err(StreamError::Broken(e.to_string())),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        let len = self.buf.len() + data.len();
                        if len > MAX_EVENT {
                            return Err(StreamError::TooLarge(MAX_EVENT));
                        }
                        if len > SMALL_EVENT {
                            self.budget.ensure(&mut self.held, len)?;
                        }
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }

    /// Removes one complete event (terminated by a blank line) from the buffer.
    fn take_event(&mut self) -> Option<String> {
        let bytes = &self.buf[..];
        // A separator may straddle what was scanned and what arrived since.
        let mut i = self.scanned.saturating_sub(3);
        while i + 1 < bytes.len() {
            let end = if bytes[i] == b'\n' && bytes[i + 1] == b'\n' {
                Some(2)
            } else if bytes[i..].starts_with(b"\r\n\r\n") {
                Some(4)
            } else {
                None
            };
            if let Some(sep) = end {
                let event = String::from_utf8_lossy(&bytes[..i]).into_owned();
                self.buf.advance(i + sep);
                self.scanned = 0;
                return Some(event);
            }
            i += 1;
        }
        self.scanned = self.buf.len();
        None
    }
}

fn event_data(event: &str) -> Option<String> {
    let lines: Vec<&str> = event
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::event_data;

    #[test]
    fn data_lines_are_joined_and_comments_skipped() {
        assert_eq!(event_data("data: {\"a\":1}"), Some("{\"a\":1}".to_owned()));
        assert_eq!(event_data(": keep-alive"), None);
        assert_eq!(
            event_data("event: x\ndata: one\ndata: two"),
            Some("one\ntwo".to_owned())
        );
        assert_eq!(event_data("data:[DONE]"), Some("[DONE]".to_owned()));
    }
}
