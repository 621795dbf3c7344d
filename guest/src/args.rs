//! `key=value` guest arguments.

#[derive(Clone, Copy)]
pub struct Args<'a>(pub &'a str);

impl<'a> Args<'a> {
    /// The value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.0.split_ascii_whitespace().find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == key).then_some(v)
        })
    }

    /// A numeric argument (decimal, or hex with 0x), `default` when absent.
    pub fn num(&self, key: &str, default: u64) -> Result<u64, &'a str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => parse_num(v).ok_or(v),
        }
    }
}

/// Decimal, or hex with a `0x` prefix, with an optional K/M/G suffix.
pub fn parse_num(v: &str) -> Option<u64> {
    let (digits, mult) = match v.as_bytes().last()? {
        b'K' | b'k' => (&v[..v.len() - 1], 1 << 10),
        b'M' | b'm' => (&v[..v.len() - 1], 1 << 20),
        b'G' | b'g' => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    let n = match digits.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok()?,
        None => digits.parse().ok()?,
    };
    n.checked_mul(mult)
}
