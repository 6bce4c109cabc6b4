//! Reads `GET /api/v1/events` as a person's `EventSource` would.

use futures_util::StreamExt;
use futures_util::stream::BoxStream;

use crate::DEADLINE;

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

pub struct EventStream {
    body: BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl EventStream {
    /// Subscribes to `url` with the API key.
    pub async fn open(http: &reqwest::Client, url: &str, api_key: &str) -> EventStream {
        let response = http
            .get(url)
            .bearer_auth(api_key)
            .send()
            .await
            .expect("events request");
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        EventStream {
            body: response.bytes_stream().boxed(),
            buffer: String::new(),
        }
    }

    /// The next event that is not a keep-alive comment; `None` when the stream ended.
    pub async fn next(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut event = SseEvent {
                    event: "message".into(),
                    data: String::new(),
                };
                let mut any = false;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event.event = v.trim().to_owned();
                        any = true;
                    } else if let Some(v) = line.strip_prefix("data:") {
                        event.data.push_str(v.trim_start());
                        any = true;
                    }
                }
                if any {
                    return Some(event);
                }
                continue;
            }
            let chunk = tokio::time::timeout(DEADLINE, self.body.next())
                .await
                .expect("an event before the deadline");
            match chunk {
                Some(Ok(bytes)) => self.buffer.push_str(&String::from_utf8_lossy(&bytes)),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// The next event, which must exist.
    pub async fn expect(&mut self) -> SseEvent {
        self.next().await.expect("the event stream is still open")
    }
}
