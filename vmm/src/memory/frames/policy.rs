//! NUMA placement of guest requests: which nodes to try, in which order.

use crate::memory::addr::NodeId;

/// A placement policy, validated from a memory call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// The calling vCPU's node first, then the others by distance.
    Local,
    /// Only this node.
    Bind(NodeId),
    /// This node first, then the others by distance from it.
    Preferred(NodeId),
    /// Round-robin over all nodes.
    Interleave,
}

/// Node orders for every starting node: `order[n]` is all nodes sorted by distance from `n`
/// (ties by id), `n` first.
#[derive(Debug, Clone)]
pub struct Fallback {
    order: Vec<Vec<NodeId>>,
}

impl Fallback {
    /// From the SLIT-style distance matrix.
    pub fn new(distance: &[Vec<u8>]) -> Self {
        let n = distance.len();
        let order = (0..n)
            .map(|from| {
                let mut nodes: Vec<usize> = (0..n).collect();
                nodes.sort_by_key(|&to| (to != from, distance[from][to], to));
                nodes.into_iter().map(|i| NodeId(u32::try_from(i).expect("few nodes"))).collect()
            })
            .collect();
        Fallback { order }
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.order.len()
    }

    /// Nodes to try for `policy`, for a vCPU on `local`; `rotor` picks the interleave start.
    pub fn candidates(&self, policy: Policy, local: NodeId, rotor: u64) -> Vec<NodeId> {
        match policy {
            Policy::Local => self.order[local.0 as usize].clone(),
            Policy::Bind(n) => vec![n],
            Policy::Preferred(n) => self.order[n.0 as usize].clone(),
            Policy::Interleave => {
                let n = self.order.len() as u64;
                (0..n).map(|i| NodeId(u32::try_from((rotor + i) % n).expect("few nodes"))).collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_by_distance() {
        let d = vec![vec![10, 30, 20], vec![30, 10, 20], vec![20, 20, 10]];
        let f = Fallback::new(&d);
        assert_eq!(f.candidates(Policy::Local, NodeId(0), 0), vec![NodeId(0), NodeId(2), NodeId(1)]);
        assert_eq!(f.candidates(Policy::Preferred(NodeId(1)), NodeId(0), 0), vec![NodeId(1), NodeId(2), NodeId(0)]);
        assert_eq!(f.candidates(Policy::Bind(NodeId(2)), NodeId(0), 0), vec![NodeId(2)]);
        assert_eq!(f.candidates(Policy::Interleave, NodeId(0), 4), vec![NodeId(1), NodeId(2), NodeId(0)]);
    }
}
