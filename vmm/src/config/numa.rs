//! The NUMA layout: `--numa` node specs, `--numa-distance`, and their validation into a
//! [`NumaConfig`].

use std::str::FromStr;

use protocol::{MAX_NODES, PAGE_SIZE};

use super::{ByteSize, ConfigError, LOCAL_DISTANCE, MAX_CPUS_ANY_HOST, REMOTE_DISTANCE};

/// Parses a CPU list: `A`, `A-B`, or items joined by `:` (`0-3:8`). Returns the sorted ids
/// (duplicates kept, so the caller can report overlaps).
pub fn parse_cpu_list(s: &str) -> Result<Vec<u32>, ConfigError> {
    let bad = || ConfigError::InvalidCpuList(s.to_string());
    let mut cpus = Vec::new();
    for item in s.split(':') {
        let (lo, hi) = match item.split_once('-') {
            Some((a, b)) => (a, b),
            None => (item, item),
        };
        let lo: u32 = lo.trim().parse().map_err(|_| bad())?;
        let hi: u32 = hi.trim().parse().map_err(|_| bad())?;
        if lo > hi || hi >= MAX_CPUS_ANY_HOST {
            return Err(bad());
        }
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    Ok(cpus)
}

/// `cpus` (sorted) as `0-3:8`, the form [`parse_cpu_list`] reads (`none` for no CPU).
pub fn format_cpu_list(cpus: &[u32]) -> String {
    let mut items: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        items.push(if i == j { cpus[i].to_string() } else { format!("{}-{}", cpus[i], cpus[j]) });
        i = j + 1;
    }
    if items.is_empty() { "none".into() } else { items.join(":") }
}

/// How a node's host memory is bound to a host NUMA node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HostPolicy {
    /// `MPOL_PREFERRED`: allocate there when possible, elsewhere otherwise.
    Preferred,
    /// `MPOL_BIND`: only there.
    Bind,
}

/// Host NUMA placement of one guest node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HostBinding {
    /// Host node id.
    pub node: u32,
    /// Binding policy.
    pub policy: HostPolicy,
}

/// One `--numa` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NumaNodeSpec {
    pub id: u32,
    pub size: u64,
    pub cpus: Vec<u32>,
    pub host: Option<HostBinding>,
}

impl FromStr for NumaNodeSpec {
    type Err = ConfigError;

    fn from_str(spec: &str) -> Result<Self, ConfigError> {
        let bad = |reason: String| ConfigError::InvalidNuma { spec: spec.to_string(), reason };
        let (mut id, mut size, mut cpus, mut host_node, mut policy) = (None, None, None, None, None);
        for kv in spec.split(',') {
            let (k, v) = kv.split_once('=').ok_or_else(|| bad(format!("`{kv}` is not key=value")))?;
            let dup = |k: &str| bad(format!("`{k}` is given twice"));
            match k {
                "node" => {
                    let n = v.parse::<u32>().map_err(|_| bad(format!("node id `{v}` is not a number")))?;
                    if id.replace(n).is_some() {
                        return Err(dup(k));
                    }
                }
                "size" => {
                    let s = v.parse::<ByteSize>().map_err(|e| bad(e.to_string()))?;
                    if size.replace(s.0).is_some() {
                        return Err(dup(k));
                    }
                }
                "cpus" => {
                    let c = parse_cpu_list(v).map_err(|e| bad(e.to_string()))?;
                    if cpus.replace(c).is_some() {
                        return Err(dup(k));
                    }
                }
                "host-node" => {
                    let n = v.parse::<u32>().map_err(|_| bad(format!("host node `{v}` is not a number")))?;
                    if host_node.replace(n).is_some() {
                        return Err(dup(k));
                    }
                }
                "host-policy" => {
                    let p = match v {
                        "preferred" => HostPolicy::Preferred,
                        "bind" => HostPolicy::Bind,
                        _ => return Err(bad(format!("host-policy `{v}` is not `preferred` or `bind`"))),
                    };
                    if policy.replace(p).is_some() {
                        return Err(dup(k));
                    }
                }
                _ => return Err(bad(format!("unknown key `{k}`"))),
            }
        }
        let id = id.ok_or_else(|| bad("`node=ID` is missing".into()))?;
        let size = size.ok_or_else(|| bad("`size=SIZE` is missing".into()))?;
        let host = match (host_node, policy) {
            (Some(node), p) => Some(HostBinding { node, policy: p.unwrap_or(HostPolicy::Preferred) }),
            (None, Some(_)) => return Err(bad("host-policy needs host-node".into())),
            (None, None) => None,
        };
        Ok(NumaNodeSpec { id, size, cpus: cpus.unwrap_or_default(), host })
    }
}

/// One `--numa-distance A:B=D` argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DistanceSpec {
    pub a: u32,
    pub b: u32,
    pub distance: u32,
}

impl FromStr for DistanceSpec {
    type Err = ConfigError;

    fn from_str(spec: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::InvalidDistance {
            spec: spec.to_string(),
            reason: "expected A:B=D with node ids A, B and a distance D".into(),
        };
        let (nodes, d) = spec.split_once('=').ok_or_else(bad)?;
        let (a, b) = nodes.split_once(':').ok_or_else(bad)?;
        Ok(DistanceSpec {
            a: a.trim().parse().map_err(|_| bad())?,
            b: b.trim().parse().map_err(|_| bad())?,
            distance: d.trim().parse().map_err(|_| bad())?,
        })
    }
}

/// A validated NUMA node.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NumaNode {
    pub id: u32,
    pub size: u64,
    pub cpus: Vec<u32>,
    pub host: Option<HostBinding>,
}

/// The validated NUMA layout.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NumaConfig {
    pub nodes: Vec<NumaNode>,
    /// `distance[a][b]`, symmetric, 10 on the diagonal.
    pub distance: Vec<Vec<u8>>,
}

impl NumaConfig {
    /// Node of every vCPU, indexed by vCPU id.
    pub fn cpu_nodes(&self, cpus: u32) -> Vec<u32> {
        let mut out = vec![0; cpus as usize];
        for n in &self.nodes {
            for &c in &n.cpus {
                out[c as usize] = n.id;
            }
        }
        out
    }
}

pub(super) fn validate_numa(
    mut specs: Vec<NumaNodeSpec>,
    distances: &[DistanceSpec],
    memory: Option<u64>,
    cpus: Option<u32>,
) -> Result<(u64, u32, NumaConfig), ConfigError> {
    if specs.len() > MAX_NODES {
        return Err(ConfigError::TooManyNodes(specs.len()));
    }
    specs.sort_by_key(|n| n.id);
    if let Some(w) = specs.windows(2).find(|w| w[0].id == w[1].id) {
        return Err(ConfigError::DuplicateNode(w[0].id));
    }
    for (expect, n) in (0u32..).zip(&specs) {
        if n.id != expect {
            return Err(ConfigError::MissingNode(expect));
        }
    }
    let mut sum = 0u64;
    for n in &specs {
        if n.size == 0 {
            return Err(ConfigError::BadNodeSize { node: n.id, size: n.size, reason: "zero" });
        }
        if n.size % PAGE_SIZE != 0 {
            return Err(ConfigError::BadNodeSize { node: n.id, size: n.size, reason: "not a multiple of 4 KiB" });
        }
        sum = sum.checked_add(n.size).ok_or(ConfigError::BadNodeSize {
            node: n.id,
            size: n.size,
            reason: "too large",
        })?;
    }
    if let Some(m) = memory
        && m != sum
    {
        return Err(ConfigError::NodeSizesMismatch { sum, memory: m });
    }

    // Every vCPU in exactly one node.
    let mut owner: Vec<Option<u32>> = Vec::new();
    for n in &specs {
        for &cpu in &n.cpus {
            let c = cpu as usize;
            if owner.len() <= c {
                owner.resize(c + 1, None);
            }
            if let Some(first) = owner[c] {
                return Err(ConfigError::OverlappingCpu { cpu, first, second: n.id });
            }
            owner[c] = Some(n.id);
        }
    }
    let cpus = match cpus {
        Some(c) => {
            for n in &specs {
                if let Some(&cpu) = n.cpus.iter().find(|&&cpu| cpu >= c) {
                    return Err(ConfigError::CpuOutOfRange { node: n.id, cpu, cpus: c });
                }
            }
            c
        }
        None => {
            // parse_cpu_list bounds ids, so the count fits.
            let c = u32::try_from(owner.len()).unwrap_or(u32::MAX);
            if c == 0 {
                return Err(ConfigError::MissingCpu(0));
            }
            if c > MAX_CPUS_ANY_HOST {
                return Err(ConfigError::TooManyCpus(c));
            }
            c
        }
    };
    if let Some(missing) = (0..cpus).find(|&c| owner.get(c as usize).copied().flatten().is_none()) {
        return Err(ConfigError::MissingCpu(missing));
    }

    let nr = specs.len();
    let mut distance = vec![vec![REMOTE_DISTANCE; nr]; nr];
    for (i, row) in distance.iter_mut().enumerate() {
        row[i] = LOCAL_DISTANCE;
    }
    let mut given: Vec<Vec<Option<u8>>> = vec![vec![None; nr]; nr];
    for d in distances {
        for x in [d.a, d.b] {
            if x as usize >= nr {
                return Err(ConfigError::UnknownDistanceNode(x));
            }
        }
        if d.distance < u32::from(LOCAL_DISTANCE) {
            return Err(ConfigError::DistanceTooSmall { a: d.a, b: d.b, d: d.distance });
        }
        let v =
            u8::try_from(d.distance).map_err(|_| ConfigError::DistanceTooLarge { a: d.a, b: d.b, d: d.distance })?;
        if d.a == d.b && v != LOCAL_DISTANCE {
            return Err(ConfigError::BadLocalDistance { a: d.a, d: d.distance });
        }
        let (a, b) = (d.a as usize, d.b as usize);
        if let Some(prev) = given[a][b]
            && prev != v
        {
            return Err(ConfigError::ConflictingDistance { a: d.a, b: d.b, d1: prev, d2: v });
        }
        given[a][b] = Some(v);
        given[b][a] = Some(v);
        distance[a][b] = v;
        distance[b][a] = v;
    }

    let nodes = specs.into_iter().map(|s| NumaNode { id: s.id, size: s.size, cpus: s.cpus, host: s.host }).collect();
    Ok((sum, cpus, NumaConfig { nodes, distance }))
}
