//! `vmm ctl`: the API's client, one command per call, human-readable output by default
//! (`--json` for the raw body). The response is parsed with `httparse`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use super::types::{BalloonStatistics, BalloonView};

/// How long one request may take.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the VMM at {path}")]
    Connect {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the request to the VMM failed")]
    Io(#[source] std::io::Error),
    #[error("the VMM's response is not valid HTTP")]
    BadResponse,
    #[error("{0}")]
    Api(String),
    #[error("the VMM's response is not the JSON expected")]
    Json(#[source] serde_json::Error),
    #[error("invalid duration `{0}`: expected a number with ms, s or m")]
    Duration(String),
    #[error("the balloon holds {actual} of {target} MiB after {waited:?}")]
    Timeout { actual: u64, target: u64, waited: Duration },
}

/// One request; returns the status and the body.
pub fn request(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Result<(u16, Vec<u8>), ClientError> {
    let mut s = UnixStream::connect(socket).map_err(|source| ClientError::Connect { path: socket.into(), source })?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(ClientError::Io)?;
    s.set_write_timeout(Some(TIMEOUT)).map_err(ClientError::Io)?;
    let body = body.unwrap_or("");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    // A server may answer before it has read the whole body (413 for an oversized one) and
    // close: like curl, read its answer even when the write was cut short.
    let sent = s.write_all(head.as_bytes()).and_then(|()| s.write_all(body.as_bytes()));
    let mut raw = Vec::new();
    let read = s.read_to_end(&mut raw);
    if raw.is_empty() {
        sent.and(read).map_err(ClientError::Io)?;
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(len) = resp.parse(&raw).map_err(|_| ClientError::BadResponse)? else {
        return Err(ClientError::BadResponse);
    };
    let code = resp.code.ok_or(ClientError::BadResponse)?;
    Ok((code, raw[len..].to_vec()))
}

/// A request whose answer must be 2xx; returns the body. A 4xx/5xx becomes its
/// `fault_message`.
pub fn call(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Result<Vec<u8>, ClientError> {
    let (code, body) = request(socket, method, path, body)?;
    if (200..300).contains(&code) {
        return Ok(body);
    }
    let msg = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["fault_message"].as_str().map(String::from))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    Err(ClientError::Api(format!("HTTP {code}: {msg}")))
}

fn json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(ClientError::Json)
}

/// Parses `500ms`, `5s`, `2m` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, ClientError> {
    let bad = || ClientError::Duration(s.to_string());
    let (num, unit) = s.find(|c: char| !c.is_ascii_digit()).map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| bad())?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.checked_mul(60).ok_or_else(bad)?)),
        _ => Err(bad()),
    }
}

/// `GET /balloon`, for people.
pub fn balloon_line(v: &BalloonView) -> String {
    format!(
        "balloon: {} MiB (deflate-on-oom {}, guest statistics {})",
        v.amount_mib,
        if v.deflate_on_oom { "on" } else { "off" },
        if v.stats_polling_interval_s == 0 {
            "off".to_string()
        } else {
            format!("every {} s", v.stats_polling_interval_s)
        }
    )
}

/// `GET /balloon/statistics`, for people.
pub fn statistics_table(s: &BalloonStatistics) -> String {
    let mib = |b: u64| b >> 20;
    let mut out = format!(
        "balloon: {} of {} MiB held ({} of {} pages)\n\
         memory: {} MiB total, {} MiB free, {} MiB available, {} MiB in guest caches\n\
         faults: {} major, {} minor; swap: {} in, {} out\n\
         reclaim: {} requests, {} taken by the guest; {} deflates on OOM ({} pages)",
        s.actual_mib,
        s.target_mib,
        s.actual_pages,
        s.target_pages,
        mib(s.total_memory),
        mib(s.free_memory),
        mib(s.available_memory),
        mib(s.disk_caches),
        s.major_faults,
        s.minor_faults,
        s.swap_in,
        s.swap_out,
        s.reclaim_requests,
        s.reclaim_notifications,
        s.deflates_on_oom,
        s.oom_deflated_pages
    );
    for n in &s.nodes {
        out.push_str(&format!("\nnode {}: {} of {} pages", n.node, n.actual_pages, n.target_pages));
    }
    out
}

/// `balloon set SIZE [--wait DURATION]`: sets the balloon and, with a wait, polls its statistics
/// until it holds its target, printing progress. Returns the final statistics.
pub fn balloon_set(
    socket: &Path,
    mib: u64,
    wait: Option<Duration>,
    mut progress: impl FnMut(&BalloonStatistics),
) -> Result<BalloonStatistics, ClientError> {
    call(socket, "PATCH", "/balloon", Some(&format!("{{\"amount_mib\": {mib}}}")))?;
    let start = Instant::now();
    loop {
        let s: BalloonStatistics = json(&call(socket, "GET", "/balloon/statistics", None)?)?;
        let Some(limit) = wait else { return Ok(s) };
        if s.actual_pages == s.target_pages {
            return Ok(s);
        }
        if start.elapsed() >= limit {
            return Err(ClientError::Timeout { actual: s.actual_mib, target: s.target_mib, waited: start.elapsed() });
        }
        progress(&s);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Decodes a body as `T`.
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ClientError> {
    json(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        for bad in ["", "s", "5h", "-1s", "1.5s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
