//! The `--profile` argument: `path=FILE[,hz=N]`.

use std::path::PathBuf;

use super::ConfigError;

/// Where and how often to sample the guest (`--profile`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProfileConfig {
    /// The report written at exit.
    pub path: PathBuf,
    /// Samples per second on each running vCPU.
    pub hz: u32,
}

/// Samples per second unless `hz=` says otherwise.
pub const DEFAULT_HZ: u32 = 1000;
/// The highest rate accepted: every sample is an exit.
pub const MAX_HZ: u32 = 10_000;

/// Parses `--profile`.
pub fn parse_profile_arg(spec: &str) -> Result<ProfileConfig, ConfigError> {
    let bad = |reason: String| ConfigError::InvalidProfile { spec: spec.to_string(), reason };
    let (mut path, mut hz) = (None, None);
    for kv in spec.split(',') {
        let (k, v) = kv.split_once('=').ok_or_else(|| bad(format!("`{kv}` is not key=value")))?;
        match k {
            "path" if path.is_some() => return Err(bad("`path` is given twice".into())),
            "hz" if hz.is_some() => return Err(bad("`hz` is given twice".into())),
            "path" if v.is_empty() => return Err(bad("the path is empty".into())),
            "path" => path = Some(PathBuf::from(v)),
            "hz" => {
                let n = v.parse::<u32>().map_err(|_| bad(format!("hz `{v}` is not a whole number")))?;
                if n == 0 || n > MAX_HZ {
                    return Err(bad(format!("hz {n} is not between 1 and {MAX_HZ}")));
                }
                hz = Some(n);
            }
            _ => return Err(bad(format!("unknown key `{k}`"))),
        }
    }
    let path = path.ok_or_else(|| bad("`path=FILE` is missing".into()))?;
    Ok(ProfileConfig { path, hz: hz.unwrap_or(DEFAULT_HZ) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_and_a_rate_are_parsed_and_bad_ones_named() {
        assert_eq!(parse_profile_arg("path=p.txt").unwrap(), ProfileConfig { path: "p.txt".into(), hz: DEFAULT_HZ });
        assert_eq!(parse_profile_arg("hz=250,path=/tmp/x").unwrap().hz, 250);
        for (spec, says) in [
            ("hz=100", "missing"),
            ("path=", "empty"),
            ("path=a,hz=0", "between"),
            ("path=a,hz=20000", "between"),
            ("path=a,hz=fast", "whole number"),
            ("path=a,path=b", "twice"),
            ("path=a,rate=3", "unknown key"),
            ("p.txt", "key=value"),
        ] {
            let e = parse_profile_arg(spec).unwrap_err().to_string();
            assert!(e.contains(says), "{spec}: {e}");
        }
    }
}
