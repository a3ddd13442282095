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
