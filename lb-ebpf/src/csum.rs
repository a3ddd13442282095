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
    let w = |i: usize| u32::from_ne_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    ipv4_header_words(&[w(0), w(4), w(8), w(12), w(16)]).to_ne_bytes()
}

/// Checksum of an IPv4 header given as its five words as they sit in memory (checksum field
/// zero), so a header built in registers never has to be in memory.
#[inline(always)]
pub fn ipv4_header_words(words: &[u32; 5]) -> u16 {
    // Summed as whole words with the carries kept above bit 31, then folded: the same
    // one's-complement sum as 16-bit words, in fewer operations.
    let mut sum = 0u64;
    for w in words {
        sum += *w as u64;
    }
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    fold(sum as u32)
}

/// `sum` plus `~old + new` over the 16-bit words of two equally long byte strings, words
/// read as they sit in memory (the byte order of the checksum field they update): the
/// difference RFC 1624's incremental update adds.
#[inline(always)]
pub fn diff_words<const N: usize>(old: &[u8; N], new: &[u8; N], mut sum: u32) -> u32 {
    let mut i = 0;
    while i + 1 < N {
        sum += !u16::from_ne_bytes([old[i], old[i + 1]]) as u32;
        sum += u16::from_ne_bytes([new[i], new[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// A checksum field (bytes as in the packet) after the covered data changed by `diff`
/// (from [`diff_words`]): RFC 1624, `~(~check + diff)`.
#[inline(always)]
pub fn apply_diff(check: [u8; 2], diff: u32) -> [u8; 2] {
    let sum = !u16::from_ne_bytes(check) as u32 + diff;
    fold(sum).to_ne_bytes()
}

/// The checksum after one 16-bit word of the covered data changed from `old` to `new`
/// (given as big-endian values of the bytes in the packet).
#[inline(always)]
pub fn replace16(check_be: [u8; 2], old: u16, new: u16) -> [u8; 2] {
    apply_diff(
        check_be,
        diff_words(&old.to_be_bytes(), &new.to_be_bytes(), 0),
    )
}
