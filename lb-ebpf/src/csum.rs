//! Internet checksum helpers.

/// Fold a 32-bit one's-complement sum into 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Checksum of a 20-byte IPv4 header whose checksum field is zero. The words are summed as
/// they sit in memory; the folded result is therefore already in network byte order when
/// stored back with `to_ne_bytes`.
#[inline(always)]
pub fn ipv4_header(hdr: &[u8; 20]) -> [u8; 2] {
    let mut sum = 0u32;
    let mut i = 0;
    while i < 20 {
        sum += u16::from_ne_bytes([hdr[i], hdr[i + 1]]) as u32;
        i += 2;
    }
    fold(sum).to_ne_bytes()
}

/// RFC 1624 incremental update: the checksum after one 16-bit word of the covered data
/// changed from `old` to `new` (all in network byte order as read from the packet).
#[inline(always)]
pub fn replace16(check_be: [u8; 2], old: u16, new: u16) -> [u8; 2] {
    let hc = !u16::from_be_bytes(check_be) as u32;
    let sum = hc + (!old as u32) + new as u32;
    fold(sum).to_be_bytes()
}
