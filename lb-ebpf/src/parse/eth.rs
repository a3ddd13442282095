//! Ethernet, with at most one 802.1Q tag.

use aya_ebpf::programs::XdpContext;
use network_types::{
    eth::{EthHdr, EtherType},
    vlan::VlanHdr,
};

use super::ptr_at;

/// What the L2 header says: where L3 starts, its ethertype, and the VLAN tag if any.
#[derive(Clone, Copy)]
pub struct L2 {
    /// Offset of the L3 header: 14, or 18 with a VLAN tag.
    pub l3_off: usize,
    /// Ethertype of the L3 header, as in the packet (network byte order).
    pub ether_type: u16,
    /// The frame carries an 802.1Q tag.
    pub tagged: bool,
    /// The VLAN TCI as in the packet (zero when untagged). Not an `Option`: its undefined
    /// payload when `None` can reach the verifier as an uninitialized register spill.
    pub vlan_tci: [u8; 2],
}

#[inline(always)]
pub fn parse_l2(ctx: &XdpContext) -> Option<L2> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: `ptr_at` checked that the header lies inside the packet.
    let ether_type = unsafe { (*eth).ether_type };
    if ether_type != EtherType::Ieee8021q as u16 {
        return Some(L2 {
            l3_off: EthHdr::LEN,
            ether_type,
            tagged: false,
            vlan_tci: [0; 2],
        });
    }
    let vlan: *const VlanHdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: as above.
    let (tci, inner) = unsafe { ((*vlan).tci, (*vlan).ether_type) };
    Some(L2 {
        l3_off: EthHdr::LEN + VlanHdr::LEN,
        ether_type: inner,
        tagged: true,
        vlan_tci: tci,
    })
}
