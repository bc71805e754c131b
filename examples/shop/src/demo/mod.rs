//! `concord demo`: the shop under injected faults, and the checker of its invariants.

pub mod model;
pub mod report;
