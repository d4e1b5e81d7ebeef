//! `events`: the tenant's event stream (Server-Sent Events), one line each,
//! or one JSON object per line with `-o json`.

use anyhow::bail;
use serde_json::Value;

use crate::{client::Client, output::Format};

pub async fn follow(client: &Client, format: Format, since: Option<&str>, count: Option<usize>) -> anyhow::Result<()> {
    let mut response = client.stream("/api/v1/events", since).await?;
    // Bytes until a whole event is in: a character may be split across reads.
    let mut buffer: Vec<u8> = Vec::new();
    let mut shown = 0;
    if count == Some(0) {
        return Ok(());
    }
    while let Some(bytes) = response.chunk().await? {
        buffer.extend_from_slice(&bytes);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let raw: Vec<u8> = buffer.drain(..end + 2).collect();
            let block = String::from_utf8_lossy(&raw);
            let mut kind = "message".to_owned();
            let mut data = String::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    kind = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim_start());
                }
            }
            if data.is_empty() {
                continue;
            }
            if kind == "lagged" {
                bail!("fell behind the server's event log; events were missed (run again without --since)");
            }
            let event: Value = serde_json::from_str(&data).unwrap_or(Value::String(data));
            match format {
                Format::Json | Format::Yaml => println!("{event}"),
                Format::Table => println!(
                    "{}  {:<20} {:<32} {}",
                    event["id"].as_str().unwrap_or_default(),
                    event["kind"].as_str().unwrap_or_default(),
                    event["subject"].as_str().unwrap_or_default(),
                    event["message"].as_str().unwrap_or_default()
                ),
            }
            shown += 1;
            if count.is_some_and(|c| shown >= c) {
                return Ok(());
            }
        }
    }
    bail!("the server ended the event stream")
}
