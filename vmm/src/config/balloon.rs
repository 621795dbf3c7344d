//! The `--balloon` argument: `size=SIZE[,deflate-on-oom=on|off][,stats-interval=SECS]`.

use super::{ByteSize, ConfigError};

/// What the user asks of the balloon (`--balloon`, `PATCH /balloon`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BalloonConfig {
    /// Bytes of guest RAM the balloon holds.
    pub size: u64,
    /// An allocation that finds no free frame deflates the balloon instead of failing.
    pub deflate_on_oom: bool,
    /// How often the guest reports its statistics, in seconds (0: never).
    pub stats_interval_s: u64,
}

/// Longest statistics interval accepted, in seconds (a day).
pub const MAX_STATS_INTERVAL_S: u64 = 86_400;

/// Parses `--balloon`.
pub fn parse_balloon_arg(spec: &str) -> Result<BalloonConfig, ConfigError> {
    let bad = |reason: String| ConfigError::InvalidBalloon { spec: spec.to_string(), reason };
    let mut b = BalloonConfig::default();
    let mut seen = Vec::new();
    for kv in spec.split(',') {
        let (k, v) = kv.split_once('=').ok_or_else(|| bad(format!("`{kv}` is not key=value")))?;
        if seen.contains(&k) {
            return Err(bad(format!("`{k}` is given twice")));
        }
        seen.push(k);
        match k {
            "size" => b.size = v.parse::<ByteSize>().map_err(|e| bad(e.to_string()))?.0,
            "deflate-on-oom" => {
                b.deflate_on_oom = match v {
                    "on" => true,
                    "off" => false,
                    _ => return Err(bad(format!("deflate-on-oom `{v}` is not `on` or `off`"))),
                }
            }
            "stats-interval" => {
                let s =
                    v.parse::<u64>().map_err(|_| bad(format!("stats-interval `{v}` is not a number of seconds")))?;
                if s > MAX_STATS_INTERVAL_S {
                    return Err(bad(format!("stats-interval {s} is above {MAX_STATS_INTERVAL_S} seconds")));
                }
                b.stats_interval_s = s;
            }
            _ => return Err(bad(format!("unknown key `{k}`"))),
        }
    }
    if !b.size.is_multiple_of(protocol::PAGE_SIZE) {
        return Err(bad(format!("size {} is not a multiple of 4 KiB", b.size)));
    }
    Ok(b)
}
