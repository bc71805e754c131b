//! Server-sent events: the subscription to the global log, and an incremental parser of a
//! `text/event-stream` body (WHATWG HTML, "Server-sent events").

use std::collections::VecDeque;

use concord_api::events::EventOut;
use reqwest::Response;

use crate::ClientError;

/// A live subscription to the global log.
#[derive(Debug)]
pub struct Subscription {
    response: Option<Response>,
    parser: Parser,
    ready: VecDeque<Frame>,
    last_position: u64,
}

impl Subscription {
    /// Reads the events of `response`, a `text/event-stream` that starts after `after`.
    pub(crate) fn new(response: Response, after: u64) -> Self {
        Self {
            response: Some(response),
            parser: Parser::default(),
            ready: VecDeque::new(),
            last_position: after,
        }
    }

    /// The next event; `None` once the server closed the stream or after a transport error.
    /// An event whose data does not decode yields [`ClientError::Decode`] and the subscription
    /// goes on.
    pub async fn next(&mut self) -> Option<Result<EventOut, ClientError>> {
        loop {
            while let Some(frame) = self.ready.pop_front() {
                if frame.event != "event" {
                    continue;
                }
                return Some(match serde_json::from_str::<EventOut>(&frame.data) {
                    Ok(event) => {
                        self.last_position = event.position;
                        Ok(event)
                    }
                    Err(e) => Err(ClientError::Decode(format!(
                        "event id {}: {e}",
                        frame.id.as_deref().unwrap_or("-")
                    ))),
                });
            }
            let response = self.response.as_mut()?;
            match response.chunk().await {
                Ok(Some(chunk)) => self.ready.extend(self.parser.feed(&chunk)),
                Ok(None) => {
                    self.response = None;
                    return None;
                }
                Err(e) => {
                    self.response = None;
                    return Some(Err(e.into()));
                }
            }
        }
    }

    /// The position of the last event returned, or the `after` the subscription started from.
    #[must_use]
    pub fn last_position(&self) -> u64 {
        self.last_position
    }
}

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub(crate) id: Option<String>,
    pub(crate) event: String,
    pub(crate) data: String,
}

#[derive(Debug, Default)]
pub(crate) struct Parser {
    line: Vec<u8>,
    after_cr: bool,
    started: bool,
    id: Option<String>,
    event: String,
    data: String,
}

impl Parser {
    /// Consumes the next bytes of the body; answers the events they complete. Lines end in
    /// CRLF, LF or CR, and may be split anywhere between chunks.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut rest = chunk;
        while let Some((&first, tail)) = rest.split_first() {
            if std::mem::take(&mut self.after_cr) && first == b'\n' {
                rest = tail;
                continue;
            }
            let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
                self.line.extend_from_slice(rest);
                break;
            };
            self.line.extend_from_slice(&rest[..end]);
            self.after_cr = rest[end] == b'\r';
            rest = &rest[end + 1..];
            let line = std::mem::take(&mut self.line);
            self.line_done(&String::from_utf8_lossy(&line), &mut frames);
            self.line = line;
            self.line.clear();
        }
        frames
    }

    fn line_done(&mut self, line: &str, frames: &mut Vec<Frame>) {
        let line = if self.started {
            line
        } else {
            self.started = true;
            line.strip_prefix('\u{feff}').unwrap_or(line)
        };
        if line.is_empty() {
            self.dispatch(frames);
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => value.clone_into(&mut self.event),
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
            }
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            _ => {}
        }
    }

    fn dispatch(&mut self, frames: &mut Vec<Frame>) {
        let event = std::mem::take(&mut self.event);
        if self.data.is_empty() {
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop();
        frames.push(Frame {
            id: self.id.clone(),
            event: if event.is_empty() { "message".to_owned() } else { event },
            data,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(chunks: &[&[u8]]) -> Vec<Frame> {
        let mut parser = Parser::default();
        chunks.iter().flat_map(|chunk| parser.feed(chunk)).collect()
    }

    fn frame(id: &str, event: &str, data: &str) -> Frame {
        Frame {
            id: Some(id.into()),
            event: event.into(),
            data: data.into(),
        }
    }

    const TWO: &[u8] = b": keep-alive\n\nid: 1\nevent: event\ndata: {\"a\":1}\n\n\
                         : ping\nid: 2\nevent: event\ndata: {\"b\":2}\n\n";

    #[test]
    fn parses_events_and_skips_comments() {
        assert_eq!(
            feed_all(&[TWO]),
            [frame("1", "event", "{\"a\":1}"), frame("2", "event", "{\"b\":2}")]
        );
    }

    #[test]
    fn any_split_into_chunks_gives_the_same_events() {
        let whole = feed_all(&[TWO]);
        let bytes: Vec<&[u8]> = TWO.chunks(1).collect();
        assert_eq!(feed_all(&bytes), whole);
        for at in 0..=TWO.len() {
            let (a, b) = TWO.split_at(at);
            assert_eq!(feed_all(&[a, b]), whole, "split at {at}");
        }
    }

    #[test]
    fn crlf_lf_and_cr_line_endings_mix() {
        let input: &[u8] = b"id: 7\r\nevent: event\rdata: x\n\r\nid: 8\revent: event\r\ndata: y\r\r";
        let expected = [frame("7", "event", "x"), frame("8", "event", "y")];
        assert_eq!(feed_all(&[input]), expected);
        for at in 0..=input.len() {
            let (a, b) = input.split_at(at);
            assert_eq!(feed_all(&[a, b]), expected, "split at {at}");
        }
    }

    #[test]
    fn crlf_split_between_chunks_is_one_line_end() {
        assert_eq!(
            feed_all(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"]),
            [Frame {
                id: None,
                event: "message".into(),
                data: "a\nb".into()
            }]
        );
    }

    #[test]
    fn field_forms_follow_the_spec() {
        let frames =
            feed_all(&[b"\xEF\xBB\xBFdata:no-space\ndata:  two spaces\ndata\nevent:custom\nretry: 10\nunknown: z\n\n"]);
        assert_eq!(
            frames,
            [Frame {
                id: None,
                event: "custom".into(),
                data: "no-space\n two spaces\n".into()
            }]
        );
    }

    #[test]
    fn events_without_data_are_not_dispatched_and_reset_the_type() {
        let frames = feed_all(&[b"id: 3\nevent: event\n\ndata: d\n\n"]);
        assert_eq!(frames, [frame("3", "message", "d")]);
    }

    #[test]
    fn an_unterminated_event_is_held_back() {
        let mut parser = Parser::default();
        assert!(parser.feed(b"id: 9\nevent: event\ndata: {}\n").is_empty());
        assert_eq!(parser.feed(b"\n"), [frame("9", "event", "{}")]);
    }

    #[test]
    fn split_utf8_is_decoded_whole() {
        let input = "data: é€😀\n\n".as_bytes();
        let chunks: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(feed_all(&chunks)[0].data, "é€😀");
    }
}
