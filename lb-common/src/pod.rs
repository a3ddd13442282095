//! `aya::Pod` for the shared map types: they are `repr(C)`, padded explicitly and valid for
//! every bit pattern.

use crate::bench::{GenFrame, HarnessFrame, SinkConfig};
use crate::types::{
    AffinityKey, BackendValue, Counters, DecapAddr, DnatKey, DnatValue, FloodWindow, FlowBucket4,
    FlowBucket6, FlowKey, FlowKeyV4, FlowValue, NodeConfig, RevNatValue, ServiceCounters,
    ServiceKey, ServiceRecord, ServiceValue, SourceRange, VipKey, VipValue,
};

// SAFETY: each type is `repr(C)`, has no implicit padding (sizes asserted in `types`), and
// every bit pattern is a valid value.
unsafe impl aya::Pod for ServiceKey {}
unsafe impl aya::Pod for ServiceValue {}
unsafe impl aya::Pod for ServiceRecord {}
unsafe impl aya::Pod for BackendValue {}
unsafe impl aya::Pod for NodeConfig {}
unsafe impl aya::Pod for Counters {}
unsafe impl aya::Pod for FlowKey {}
unsafe impl aya::Pod for FlowKeyV4 {}
unsafe impl aya::Pod for FlowValue {}
unsafe impl aya::Pod for FlowBucket4 {}
unsafe impl aya::Pod for FlowBucket6 {}
unsafe impl aya::Pod for FloodWindow {}
unsafe impl aya::Pod for ServiceCounters {}
unsafe impl aya::Pod for VipKey {}
unsafe impl aya::Pod for VipValue {}
unsafe impl aya::Pod for SourceRange {}
unsafe impl aya::Pod for AffinityKey {}
unsafe impl aya::Pod for DecapAddr {}
unsafe impl aya::Pod for DnatKey {}
unsafe impl aya::Pod for DnatValue {}
unsafe impl aya::Pod for RevNatValue {}
// SAFETY: as above; the size is asserted in `bench`.
unsafe impl aya::Pod for HarnessFrame {}
// SAFETY: as above.
unsafe impl aya::Pod for GenFrame {}
// SAFETY: as above.
unsafe impl aya::Pod for SinkConfig {}
