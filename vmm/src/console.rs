//! The guest's console: bytes become lines (at most [`MAX_LINE`] bytes each), and lines that
//! start with `@result ` are kept as machine-readable results, within fixed bounds: the last
//! [`KEEP_PER_SCENARIO`] per scenario, for at most [`MAX_SCENARIOS`] scenarios, counting what was
//! dropped. Everything here is guest-controlled; nothing it sends can grow the VMM without
//! bound.

use std::collections::{BTreeMap, VecDeque};

/// Longest console line kept; the rest of a longer line is dropped.
pub const MAX_LINE: usize = 4096;
/// Result lines kept per scenario (the newest).
pub const KEEP_PER_SCENARIO: usize = 64;
/// Scenarios whose results are kept apart; results of further ones share one bucket.
pub const MAX_SCENARIOS: usize = 32;
/// The bucket for results without a scenario, or beyond [`MAX_SCENARIOS`].
const OTHER: &str = "_other";

/// Assembles one vCPU's console bytes into lines.
#[derive(Debug, Default)]
pub struct LineBuffer {
    line: Vec<u8>,
}

impl LineBuffer {
    /// Takes `bytes`; calls `emit` for every line they complete.
    pub fn push(&mut self, bytes: &[u8], mut emit: impl FnMut(&str)) {
        for &b in bytes {
            if b == b'\n' {
                self.flush(&mut emit);
            } else if self.line.len() < MAX_LINE {
                self.line.push(b);
            }
        }
    }

    /// Emits what is buffered as a line, if anything.
    pub fn flush(&mut self, mut emit: impl FnMut(&str)) {
        if self.line.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.line).into_owned();
        self.line.clear();
        emit(&text);
    }
}

/// The guest's `@result` lines, bounded.
#[derive(Debug, Default)]
pub struct ResultLog {
    /// Per scenario: `(sequence number, line)`, oldest first.
    kept: BTreeMap<String, VecDeque<(u64, String)>>,
    /// Per scenario: lines dropped to stay within bounds.
    dropped: BTreeMap<String, u64>,
    next: u64,
}

impl ResultLog {
    /// Keeps `line` (which starts with `@result `), dropping its scenario's oldest line if the
    /// scenario already has [`KEEP_PER_SCENARIO`].
    pub fn push(&mut self, line: &str) {
        let scenario = scenario_of(line);
        let key = if self.kept.contains_key(scenario) || self.kept.len() < MAX_SCENARIOS { scenario } else { OTHER };
        let lines = self.kept.entry(key.to_string()).or_default();
        if lines.len() == KEEP_PER_SCENARIO {
            lines.pop_front();
            *self.dropped.entry(key.to_string()).or_default() += 1;
        }
        lines.push_back((self.next, line.to_string()));
        self.next += 1;
    }

    /// The kept lines, in the order the guest printed them.
    pub fn lines(&self) -> Vec<String> {
        let mut all: Vec<&(u64, String)> = self.kept.values().flatten().collect();
        all.sort_unstable_by_key(|(seq, _)| *seq);
        all.into_iter().map(|(_, l)| l.clone()).collect()
    }

    /// Lines dropped, per scenario.
    pub fn dropped(&self) -> &BTreeMap<String, u64> {
        &self.dropped
    }
}

/// The `scenario=` value of a result line (a bucket of its own when it has none).
fn scenario_of(line: &str) -> &str {
    line.split_whitespace().find_map(|kv| kv.strip_prefix("scenario=")).unwrap_or(OTHER)
}

/// `@result a=1 b=x` as `{"a": 1, "b": "x"}` (numbers where they parse as numbers).
pub fn parse_result(line: &str) -> BTreeMap<String, serde_json::Value> {
    let body = line.strip_prefix(protocol::RESULT_PREFIX).unwrap_or(line);
    body.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            let value = if let Ok(n) = v.parse::<u64>() {
                serde_json::Value::from(n)
            } else if let Ok(n) = v.parse::<i64>() {
                serde_json::Value::from(n)
            } else if let Some(f) = v.parse::<f64>().ok().filter(|f| f.is_finite()) {
                serde_json::Value::from(f)
            } else {
                serde_json::Value::from(v)
            };
            (k.to_string(), value)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_bounded_and_split() {
        let mut b = LineBuffer::default();
        let mut out = Vec::new();
        b.push(b"ab\ncd", |l| out.push(l.to_string()));
        b.push(&[b'x'; MAX_LINE + 10], |l| out.push(l.to_string()));
        b.push(b"\n\n", |l| out.push(l.to_string()));
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], "ab");
        assert_eq!(out[1].len(), MAX_LINE);
        assert!(out[1].starts_with("cdxx"));
    }

    #[test]
    fn results_keep_the_newest_per_scenario_and_count_the_rest() {
        let mut r = ResultLog::default();
        for i in 0..KEEP_PER_SCENARIO + 5 {
            r.push(&format!("@result scenario=a i={i}"));
            if i < 3 {
                r.push(&format!("@result scenario=b i={i}"));
            }
        }
        let lines = r.lines();
        assert_eq!(lines.len(), KEEP_PER_SCENARIO + 3);
        assert_eq!(lines[0], "@result scenario=b i=0", "in print order");
        assert!(lines.iter().any(|l| l == "@result scenario=a i=5"));
        assert!(!lines.iter().any(|l| l == "@result scenario=a i=4"));
        assert_eq!(r.dropped().get("a"), Some(&5));
        // Endless new scenario names share one bucket.
        for i in 0..1000 {
            r.push(&format!("@result scenario=s{i}"));
        }
        assert!(r.lines().len() <= MAX_SCENARIOS * KEEP_PER_SCENARIO + KEEP_PER_SCENARIO);
    }

    #[test]
    fn parses_numbers_and_words() {
        let m = parse_result("@result scenario=x n=3 m=-2 f=1.5 inf=inf w=hello junk");
        assert_eq!(m["n"], 3);
        assert_eq!(m["m"], -2);
        assert_eq!(m["f"], 1.5);
        assert_eq!(m["inf"], "inf");
        assert_eq!(m["w"], "hello");
        assert!(!m.contains_key("junk"));
    }
}
