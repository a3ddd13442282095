//! BGP announcement through BIRD 2.
//!
//! The agent owns BIRD's whole configuration file: [`render`] writes it from the
//! [`BgpSettings`] and the VIPs this node announces (each a blackhole host route with its
//! [`RouteAttrs`]), and [`Bird::apply`] puts it in place and has the running daemon
//! (`bird -f -c /run/xdp-lb/bird.conf -s /run/xdp-lb/bird.ctl`, a sidecar) reload it with
//! `birdc configure`. BIRD keeps the sessions of unchanged peers up across a reload, so
//! announcing or withdrawing a VIP only sends UPDATEs.
//!
//! - `settings`: the `bgp` section of the static configuration, checked ([`settings()`]).
//! - `render`: bird.conf from settings and routes.
//! - `bird`: the running daemon ([`Bird`]).

mod bird;
mod render;
mod settings;

pub use bird::{Applied, BIRDC_TIMEOUT, BgpError, Bird};
pub use render::{STATIC4, STATIC6, protocol_name, render};
pub use settings::{
    BgpPeer, BgpSettings, BirdPaths, DEFAULT_BIRDC, DEFAULT_CONFIG, DEFAULT_HOLD_TIME_S,
    DEFAULT_PORT, DEFAULT_SOCKET, FieldError, RawBgp, RawBird, RawPeer, RouteAttrs, link_bandwidth,
    settings,
};
pub(crate) use settings::{community, large_community};
