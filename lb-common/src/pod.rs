//! `aya::Pod` for the shared map types: they are `repr(C)`, padded explicitly and valid for
//! every bit pattern.

use crate::types::{BackendValue, Counters, NodeConfig, ServiceKey, ServiceValue};

// SAFETY: each type is `repr(C)`, has no implicit padding (sizes asserted in `types`), and
// every bit pattern is a valid value.
unsafe impl aya::Pod for ServiceKey {}
unsafe impl aya::Pod for ServiceValue {}
unsafe impl aya::Pod for BackendValue {}
unsafe impl aya::Pod for NodeConfig {}
unsafe impl aya::Pod for Counters {}
