//! The `--swap` argument:
//! `limit=SIZE[,dir=DIR][,file-max=SIZE][,compress=lz4|off][,pool=SIZE][,policy=clock|fifo]`.

use std::path::PathBuf;

use super::{ByteSize, ConfigError};

/// Least limit accepted: the VMM's own frames (page tables, per-vCPU areas, the image) must fit.
pub const MIN_SWAP_LIMIT: u64 = 16 << 20;

/// How cold pages are chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SwapPolicy {
    /// A clock over the accessed bits of the guest's leaf page-table entries: a page the guest
    /// touched since the hand last passed gets a second chance.
    #[default]
    Clock,
    /// The same hand, blind to accesses: first in, first out by address. For comparison only.
    Fifo,
}

/// Host-side swap (`--swap`, `PATCH /swap`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SwapConfig {
    /// Host memory guest RAM may use: resident frames plus the compressed pool.
    pub limit: u64,
    /// Where the (unnamed) swap file lives.
    pub dir: PathBuf,
    /// Largest the swap file may grow (`None`: guest RAM).
    pub file_max: Option<u64>,
    /// Whether pages that compress well go to an in-memory pool first.
    pub compress: bool,
    /// The pool's size (`None`: a fifth of the limit).
    pub pool: Option<u64>,
    pub policy: SwapPolicy,
}

impl SwapConfig {
    /// The pool's size for limit `limit`.
    pub fn pool_for(&self, limit: u64) -> u64 {
        if !self.compress {
            return 0;
        }
        self.pool.unwrap_or(limit / 5).min(limit / 2)
    }
}

/// The default swap directory: `$TMPDIR`, else `/var/tmp`.
pub fn default_swap_dir() -> PathBuf {
    std::env::var_os("TMPDIR").filter(|d| !d.is_empty()).map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from)
}

/// Parses `--swap`.
pub fn parse_swap_arg(spec: &str) -> Result<SwapConfig, ConfigError> {
    let bad = |reason: String| ConfigError::InvalidSwap { spec: spec.to_string(), reason };
    let size = |k: &str, v: &str| v.parse::<ByteSize>().map(|b| b.0).map_err(|e| bad(format!("{k}: {e}")));
    let mut limit = None;
    let mut c = SwapConfig {
        limit: 0,
        dir: default_swap_dir(),
        file_max: None,
        compress: true,
        pool: None,
        policy: SwapPolicy::Clock,
    };
    let mut seen = Vec::new();
    for kv in spec.split(',') {
        let (k, v) = kv.split_once('=').ok_or_else(|| bad(format!("`{kv}` is not key=value")))?;
        if seen.contains(&k) {
            return Err(bad(format!("`{k}` is given twice")));
        }
        seen.push(k);
        match k {
            "limit" => limit = Some(size(k, v)?),
            "dir" if v.is_empty() => return Err(bad("dir is empty".into())),
            "dir" => c.dir = PathBuf::from(v),
            "file-max" => c.file_max = Some(size(k, v)?),
            "pool" => c.pool = Some(size(k, v)?),
            "compress" => {
                c.compress = match v {
                    "lz4" => true,
                    "off" => false,
                    _ => return Err(bad(format!("compress `{v}` is not `lz4` or `off`"))),
                }
            }
            "policy" => {
                c.policy = match v {
                    "clock" => SwapPolicy::Clock,
                    "fifo" => SwapPolicy::Fifo,
                    _ => return Err(bad(format!("policy `{v}` is not `clock` or `fifo`"))),
                }
            }
            _ => return Err(bad(format!("unknown key `{k}`"))),
        }
    }
    c.limit = limit.ok_or_else(|| bad("limit is missing".into()))?;
    check_limit(c.limit).map_err(bad)?;
    if c.file_max == Some(0) {
        return Err(bad("file-max is 0".into()));
    }
    if let Some(p) = c.pool {
        if !c.compress && p > 0 {
            return Err(bad("pool is set but compress is off".into()));
        }
        if p > c.limit / 2 {
            return Err(bad(format!("pool {p} is more than half the limit")));
        }
    }
    Ok(c)
}

/// Whether `limit` is acceptable (also for `PATCH /swap`).
pub fn check_limit(limit: u64) -> Result<(), String> {
    if limit < MIN_SWAP_LIMIT {
        return Err(format!("limit {limit} is below the least, {} MiB", MIN_SWAP_LIMIT >> 20));
    }
    if !limit.is_multiple_of(protocol::PAGE_SIZE) {
        return Err(format!("limit {limit} is not a multiple of 4 KiB"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let c = parse_swap_arg("limit=128M,dir=/x,file-max=1G,compress=off,policy=fifo").unwrap();
        assert_eq!((c.limit, c.dir.to_str(), c.file_max, c.compress), (128 << 20, Some("/x"), Some(1 << 30), false));
        assert_eq!((c.policy, c.pool_for(c.limit)), (SwapPolicy::Fifo, 0));
        let c = parse_swap_arg("limit=100M").unwrap();
        assert_eq!(c.pool_for(c.limit), 20 << 20);
        for bad in [
            "",
            "dir=/x",
            "limit=1M",
            "limit=100M,limit=200M",
            "limit=100M,compress=zstd",
            "limit=100M,pool=80M",
            "limit=100M,compress=off,pool=1M",
            "limit=100M,file-max=0",
            "limit=100M,dir=",
            "limit=100M,colour=red",
            "limit=abc",
        ] {
            assert!(parse_swap_arg(bad).is_err(), "{bad}");
        }
    }
}
