//! Everything the XDP program and the agent must agree on: map names and sizes, the layout of
//! every key and value, statistics indices, the flow hash, and (with the `user` feature) the
//! Maglev table builder.
//!
//! Conventions: every shared struct is `#[repr(C)]` with explicit padding and a size assertion;
//! fields in network byte order end in `_be`, everything else is host order.
#![no_std]

#[cfg(feature = "user")]
extern crate std;

pub mod bench;
pub mod flowtab;
pub mod hash;
pub mod maps;
pub mod stats;
pub mod types;

#[cfg(feature = "user")]
pub mod maglev;
#[cfg(feature = "user")]
mod pod;

pub use stats::Reason;
pub use types::*;
