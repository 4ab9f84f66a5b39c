//! Reading a server-sent event stream from an upstream body, one event at a time.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// Why a stream ended badly.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// No bytes arrived within the idle (or first-token) timeout.
    #[error("the provider sent nothing for {0:?}")]
    Stalled(Duration),
    /// The connection broke.
    #[error("the provider's stream broke: {0}")]
    Broken(String),
    /// An event grew past the size limit.
    #[error("an event from the provider exceeded {0} bytes")]
    TooLarge(usize),
}

/// Largest single event accepted.
const MAX_EVENT: usize = 1 << 20;

/// Splits an upstream body into SSE events and returns each event's `data` payload.
#[derive(Debug)]
pub struct SseReader {
    body: Incoming,
    buf: BytesMut,
    done: bool,
}

impl SseReader {
    /// Reads from `body`.
    pub fn new(body: Incoming) -> Self {
        Self {
            body,
            buf: BytesMut::new(),
            done: false,
        }
    }

    /// The next event's data (lines joined by `\n`); `None` at a clean end of the body.
    /// Comment lines and events without data are skipped.
    pub async fn next(&mut self, idle: Duration) -> Result<Option<String>, StreamError> {
        loop {
            if let Some(event) = self.take_event() {
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
                return Ok(event_data(&String::from_utf8_lossy(&rest)));
            }
            match tokio::time::timeout(idle, self.body.frame()).await {
                Err(_) => return Err(StreamError::Stalled(idle)),
                Ok(None) => self.done = true,
                Ok(Some(Err(e))) => return Err(StreamError::Broken(e.to_string())),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                        if self.buf.len() > MAX_EVENT {
                            return Err(StreamError::TooLarge(MAX_EVENT));
                        }
                    }
                }
            }
        }
    }

    /// Removes one complete event (terminated by a blank line) from the buffer.
    fn take_event(&mut self) -> Option<String> {
        let bytes = &self.buf[..];
        let mut i = 0;
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
                return Some(event);
            }
            i += 1;
        }
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
