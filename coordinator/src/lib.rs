//! Coordinator logic that does not depend on the network: how a recipe's
//! global batch maps onto a given number of ranks.

pub mod plan;
