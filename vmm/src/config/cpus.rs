//! The `--cpus` argument: `N`, or `boot=N[,affinity=auto|[V@[LIST],...]]` (Cloud Hypervisor's
//! shape), and where the VMM's busy threads run.
//!
//! Pinning matters here because the slab rings' service thread polls while the guest
//! allocates, and the guest spins for it (`protocol::slab::SERVICE_WAIT_US`) before it exits. When
//! the host scheduler puts the service on the CPU of a running vCPU, the two take turns for
//! milliseconds and every wait turns into an exit (rptest, 1 vCPU on 2 host CPUs: 111-257 exits
//! unpinned against 34-41 pinned, and 1.5-2x the throughput). Pinning is off by default, as in
//! Firecracker and Cloud Hypervisor: on a shared host (parallel tests, other VMs) fixed CPUs
//! would stack every VM's vCPU 0 on one host CPU.

use super::ConfigError;
use super::numa::parse_cpu_list;

/// Where vCPU threads run.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    /// Anywhere the host scheduler likes.
    #[default]
    Off,
    /// When the host has CPUs to spare (more than vCPUs): vCPU `i` on the `i`-th host CPU the
    /// VMM may use and the rings' service on the CPUs left over. Otherwise nothing is pinned
    /// (with 2 vCPUs on 2 CPUs the service parks and pinning did not pay: larson 0.9-1.0x).
    Auto,
    /// The host CPUs of each listed vCPU (unlisted ones run anywhere); the service gets the
    /// CPUs no vCPU is given, when every vCPU is listed.
    Explicit(Vec<(u32, Vec<u32>)>),
}

/// `--cpus` as given.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpusArg {
    /// vCPU count (`N`, `boot=N`).
    pub boot: Option<u32>,
    pub affinity: Affinity,
}

/// Parses `--cpus`.
pub fn parse_cpus_arg(spec: &str) -> Result<CpusArg, ConfigError> {
    let bad = |reason: String| ConfigError::InvalidCpus { spec: spec.to_string(), reason };
    if let Ok(n) = spec.trim().parse::<u32>() {
        return Ok(CpusArg { boot: Some(n), affinity: Affinity::Off });
    }
    let mut arg = CpusArg::default();
    let mut seen_affinity = false;
    for kv in split_top(spec) {
        let (k, v) = kv.split_once('=').ok_or_else(|| bad(format!("`{kv}` is not key=value (or a number)")))?;
        match k {
            "boot" if arg.boot.is_some() => return Err(bad("`boot` is given twice".into())),
            "affinity" if seen_affinity => return Err(bad("`affinity` is given twice".into())),
            "boot" => arg.boot = Some(v.parse().map_err(|_| bad(format!("boot `{v}` is not a whole number")))?),
            "affinity" => {
                seen_affinity = true;
                arg.affinity = parse_affinity(v).map_err(bad)?;
            }
            _ => return Err(bad(format!("unknown key `{k}`"))),
        }
    }
    Ok(arg)
}

/// Splits `spec` at the commas outside brackets.
fn split_top(spec: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in spec.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&spec[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&spec[start..]);
    parts
}

/// `off`, `auto`, or `[V@[LIST],...]` (LIST as in `--numa`'s `cpus=`, or with commas).
fn parse_affinity(v: &str) -> Result<Affinity, String> {
    match v {
        "off" => return Ok(Affinity::Off),
        "auto" => return Ok(Affinity::Auto),
        _ => {}
    }
    let inner = v
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .ok_or_else(|| format!("affinity `{v}` is not off, auto or [VCPU@[CPUS],...]"))?;
    let mut pins: Vec<(u32, Vec<u32>)> = Vec::new();
    for item in split_top(inner).into_iter().filter(|s| !s.is_empty()) {
        let (vcpu, list) = item.split_once('@').ok_or_else(|| format!("`{item}` is not VCPU@[CPUS]"))?;
        let vcpu: u32 = vcpu.trim().parse().map_err(|_| format!("vCPU `{vcpu}` is not a whole number"))?;
        let list = list
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .ok_or_else(|| format!("the host CPUs of vCPU {vcpu} are not in brackets"))?;
        let mut cpus = parse_cpu_list(&list.replace(',', ":")).map_err(|e| e.to_string())?;
        cpus.dedup();
        if pins.iter().any(|(v, _)| *v == vcpu) {
            return Err(format!("vCPU {vcpu} is listed twice"));
        }
        pins.push((vcpu, cpus));
    }
    if pins.is_empty() {
        return Err("the affinity list is empty".into());
    }
    pins.sort_unstable();
    Ok(Affinity::Explicit(pins))
}

/// Checks the rules that need no host: every listed vCPU exists.
pub fn check_affinity(affinity: &Affinity, cpus: u32) -> Result<(), ConfigError> {
    if let Affinity::Explicit(pins) = affinity
        && let Some(&(vcpu, _)) = pins.iter().find(|(v, _)| *v >= cpus)
    {
        return Err(ConfigError::AffinityCpuOutOfRange { vcpu, cpus });
    }
    Ok(())
}

/// Where each thread goes, for a host whose usable CPUs are known.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// The host CPUs of each vCPU (`None`: anywhere).
    pub vcpus: Vec<Option<Vec<u32>>>,
    /// The host CPUs of the rings' service (`None`: anywhere).
    pub service: Option<Vec<u32>>,
}

/// Places `cpus` vCPUs by `affinity` on the host CPUs in `allowed` (the VMM's own affinity);
/// a listed host CPU outside it is an error.
pub fn place(affinity: &Affinity, cpus: u32, allowed: &[u32]) -> Result<Placement, ConfigError> {
    let n = cpus as usize;
    let vcpus: Vec<Option<Vec<u32>>> = match affinity {
        Affinity::Off => return Ok(Placement { vcpus: vec![None; n], service: None }),
        // No CPU to spare for the service: pinning would only take the scheduler's freedom.
        Affinity::Auto if allowed.len() <= n => vec![None; n],
        Affinity::Auto => (0..n).map(|i| Some(vec![allowed[i]])).collect(),
        Affinity::Explicit(pins) => {
            let mut v = vec![None; n];
            for (vcpu, list) in pins {
                if let Some(&c) = list.iter().find(|c| !allowed.contains(c)) {
                    return Err(ConfigError::UnavailableHostCpu { cpu: c, allowed: allowed.to_vec() });
                }
                if let Some(slot) = v.get_mut(*vcpu as usize) {
                    *slot = Some(list.clone());
                }
            }
            v
        }
    };
    let service = vcpus.iter().all(Option::is_some).then(|| {
        let used: Vec<u32> = vcpus.iter().flatten().flatten().copied().collect();
        allowed.iter().copied().filter(|c| !used.contains(c)).collect::<Vec<u32>>()
    });
    Ok(Placement { vcpus, service: service.filter(|s| !s.is_empty()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_keyed_forms_are_parsed() {
        assert_eq!(parse_cpus_arg("2").unwrap(), CpusArg { boot: Some(2), affinity: Affinity::Off });
        assert_eq!(parse_cpus_arg("boot=1,affinity=auto").unwrap().affinity, Affinity::Auto);
        assert_eq!(parse_cpus_arg("affinity=off").unwrap(), CpusArg { boot: None, affinity: Affinity::Off });
        let a = parse_cpus_arg("boot=2,affinity=[1@[2-3],0@[0,5]]").unwrap();
        assert_eq!(a.boot, Some(2));
        assert_eq!(a.affinity, Affinity::Explicit(vec![(0, vec![0, 5]), (1, vec![2, 3])]));
        for (spec, says) in [
            ("boot=x", "whole number"),
            ("boot=1,boot=2", "twice"),
            ("boot=1,affinity=auto,affinity=off", "twice"),
            ("boot=1,pin=on", "unknown key"),
            ("many", "key=value"),
            ("affinity=sometimes", "not off, auto"),
            ("affinity=[0@1]", "brackets"),
            ("affinity=[0-1]", "VCPU@[CPUS]"),
            ("affinity=[x@[1]]", "whole number"),
            ("affinity=[0@[1],0@[2]]", "twice"),
            ("affinity=[]", "empty"),
            ("affinity=[0@[3-1]]", "CPU list"),
        ] {
            let e = parse_cpus_arg(spec).unwrap_err().to_string();
            assert!(e.contains(says), "{spec}: {e}");
        }
    }

    #[test]
    fn placement_follows_the_affinity_and_leaves_spare_cpus_to_the_service() {
        assert_eq!(place(&Affinity::Off, 2, &[0, 1]).unwrap(), Placement { vcpus: vec![None, None], service: None });
        // One vCPU on a 2-CPU host: the service gets the other CPU.
        let p = place(&Affinity::Auto, 1, &[0, 1]).unwrap();
        assert_eq!(p, Placement { vcpus: vec![Some(vec![0])], service: Some(vec![1]) });
        let p = place(&Affinity::Auto, 2, &[4, 6, 7]).unwrap();
        assert_eq!(p, Placement { vcpus: vec![Some(vec![4]), Some(vec![6])], service: Some(vec![7]) });
        // As many vCPUs as CPUs (or more): nothing to spare for the service, nothing pinned.
        assert_eq!(place(&Affinity::Auto, 2, &[0, 1]).unwrap(), Placement { vcpus: vec![None, None], service: None });
        // Explicit: unlisted vCPUs float, and then the service floats too.
        let pins = Affinity::Explicit(vec![(1, vec![2])]);
        assert_eq!(place(&pins, 2, &[0, 1, 2]).unwrap(), Placement { vcpus: vec![None, Some(vec![2])], service: None });
        let pins = Affinity::Explicit(vec![(0, vec![0]), (1, vec![2])]);
        assert_eq!(place(&pins, 2, &[0, 1, 2, 3]).unwrap().service, Some(vec![1, 3]));
        let e = place(&Affinity::Explicit(vec![(0, vec![7])]), 1, &[0, 1]).unwrap_err().to_string();
        assert!(e.contains("host CPU 7"), "{e}");
        assert!(check_affinity(&Affinity::Explicit(vec![(2, vec![0])]), 2).is_err());
        assert!(check_affinity(&Affinity::Explicit(vec![(1, vec![0])]), 2).is_ok());
    }
}
