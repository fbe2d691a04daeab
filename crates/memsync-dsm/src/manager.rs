//! The three ways of finding a page's owner (`PROTOCOL.md`, "Managers"), behind one trait.
//!
//! A manager scheme only decides *where a request goes*: to the node that manages the page
//! (which keeps the page's owner and serializes requests for it) or, with no manager, along
//! the requester's probable owner. The node runs the protocol the same way for all three.

use std::fmt;
use std::str::FromStr;

use crate::proto::NodeId;

/// Which manager scheme a region uses (all nodes must agree; HELLO checks it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// One manager (node 0) for every page.
    Centralized = 0,
    /// The manager of page `p` is node `p mod N`.
    Fixed = 1,
    /// No manager: requests follow each node's probable owner, forwarded hop by hop.
    Dynamic = 2,
}

impl Scheme {
    /// Every scheme, for tests and benchmarks.
    pub const ALL: [Scheme; 3] = [Scheme::Centralized, Scheme::Fixed, Scheme::Dynamic];

    /// The scheme's wire value (HELLO).
    #[must_use]
    pub fn to_u8(self) -> u8 {
        self as u8
    }

    /// The scheme of a wire value.
    #[must_use]
    pub fn from_u8(v: u8) -> Option<Scheme> {
        match v {
            0 => Some(Scheme::Centralized),
            1 => Some(Scheme::Fixed),
            2 => Some(Scheme::Dynamic),
            _ => None,
        }
    }

    /// The scheme's manager for a region of `nodes` nodes.
    #[must_use]
    pub fn manager(self, nodes: usize) -> Box<dyn Manager> {
        match self {
            Scheme::Centralized => Box::new(Centralized),
            Scheme::Fixed => Box::new(FixedDistributed { nodes }),
            Scheme::Dynamic => Box::new(DynamicDistributed { nodes }),
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scheme::Centralized => "centralized",
            Scheme::Fixed => "fixed",
            Scheme::Dynamic => "dynamic",
        })
    }
}

impl FromStr for Scheme {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "centralized" | "central" => Ok(Scheme::Centralized),
            "fixed" | "fixed-distributed" => Ok(Scheme::Fixed),
            "dynamic" | "dynamic-distributed" => Ok(Scheme::Dynamic),
            _ => Err(format!(
                "unknown manager scheme {s:?} (centralized, fixed, dynamic)"
            )),
        }
    }
}

/// Where requests for a page go.
pub trait Manager: Send + Sync + fmt::Debug {
    /// The scheme.
    fn scheme(&self) -> Scheme;

    /// The node that manages `page` (keeps its owner and serializes its requests), or `None`
    /// when requests follow the probable owner.
    fn manager_of(&self, page: u64) -> Option<NodeId>;

    /// The owner of `page` before anyone wrote it: the node whose initial data (zeros or the
    /// backing store) is the page's.
    fn initial_owner(&self, page: u64) -> NodeId;

    /// Most forwards a request may take before it is refused as a protocol error (a manager
    /// forwards once; see [`DynamicDistributed`] for the probable-owner chain).
    fn max_hops(&self) -> u8;
}

/// Node 0 manages every page and owns every page at first.
#[derive(Clone, Copy, Debug)]
pub struct Centralized;

impl Manager for Centralized {
    fn scheme(&self) -> Scheme {
        Scheme::Centralized
    }
    fn manager_of(&self, _page: u64) -> Option<NodeId> {
        Some(0)
    }
    fn initial_owner(&self, _page: u64) -> NodeId {
        0
    }
    fn max_hops(&self) -> u8 {
        1
    }
}

/// Page `p` is managed, and owned at first, by node `p mod N`.
#[derive(Clone, Copy, Debug)]
pub struct FixedDistributed {
    pub nodes: usize,
}

impl Manager for FixedDistributed {
    fn scheme(&self) -> Scheme {
        Scheme::Fixed
    }
    fn manager_of(&self, page: u64) -> Option<NodeId> {
        Some(self.initial_owner(page))
    }
    fn initial_owner(&self, page: u64) -> NodeId {
        (page % self.nodes.max(1) as u64) as NodeId
    }
    fn max_hops(&self) -> u8 {
        1
    }
}

/// No manager: every node keeps a probable owner per page (at first `p mod N`, the initial
/// owner) and forwards requests along it.
#[derive(Clone, Copy, Debug)]
pub struct DynamicDistributed {
    pub nodes: usize,
}

impl Manager for DynamicDistributed {
    fn scheme(&self) -> Scheme {
        Scheme::Dynamic
    }
    fn manager_of(&self, _page: u64) -> Option<NodeId> {
        None
    }
    fn initial_owner(&self, page: u64) -> NodeId {
        (page % self.nodes.max(1) as u64) as NodeId
    }
    fn max_hops(&self) -> u8 {
        // Li and Hudak: with no transfer in progress a request reaches the owner in at most
        // N - 1 forwards; one that chases moving ownership takes more. The limit only
        // catches a cycle (a bug): the requester retries.
        u8::try_from(self.nodes.saturating_mul(16).max(16)).unwrap_or(u8::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_route_as_documented() {
        let c = Scheme::Centralized.manager(4);
        let f = Scheme::Fixed.manager(4);
        let d = Scheme::Dynamic.manager(4);
        assert_eq!(c.manager_of(7), Some(0));
        assert_eq!(c.initial_owner(7), 0);
        assert_eq!(f.manager_of(7), Some(3));
        assert_eq!(f.initial_owner(6), 2);
        assert_eq!(d.manager_of(7), None);
        assert_eq!(d.initial_owner(5), 1);
        assert_eq!(d.max_hops(), 64);
        for s in Scheme::ALL {
            assert_eq!(Scheme::from_u8(s.to_u8()), Some(s));
            assert_eq!(s.to_string().parse::<Scheme>(), Ok(s));
        }
        assert_eq!(Scheme::from_u8(3), None);
    }
}
