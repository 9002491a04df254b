//! Fixed, process-independent hash functions used for IP affinity and prefix block hashing.
//!
//! `std`'s `RandomState` is seeded per process, so anything whose result must agree across
//! coordinator restarts (which worker a client sticks to, which blocks a worker holds) uses
//! FNV-1a 64 over the bytes followed by the SplitMix64 finaliser (FNV alone mixes poorly).

use std::net::IpAddr;
use xpyd_engine::sampling::splitmix64;

/// FNV-1a 64-bit offset basis.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Continues an FNV-1a 64 hash from `state` over `bytes`.
pub fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        state ^= u64::from(b);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// Rendezvous (highest-random-weight) weight of worker `id` for client `ip`.
///
/// IPv4-mapped IPv6 addresses are canonicalised first, so `::ffff:10.0.0.1` and
/// `10.0.0.1` stick to the same worker. A `0xff` separator keeps the address and id
/// byte streams from running into each other.
pub fn rendezvous_weight(ip: IpAddr, id: &str) -> u64 {
    let state = match ip.to_canonical() {
        IpAddr::V4(v4) => fnv1a(fnv1a(FNV_OFFSET, &[4]), &v4.octets()),
        IpAddr::V6(v6) => fnv1a(fnv1a(FNV_OFFSET, &[6]), &v6.octets()),
    };
    splitmix64(fnv1a(fnv1a(state, &[0xff]), id.as_bytes()))
}

/// Chain hashes of the full `block_size`-token blocks of `tokens` (a trailing partial block
/// is ignored): hash `i` covers block `i` and, through hash `i-1`, every block before it,
/// so equal hashes mean equal prefixes. `block_size` 0 is treated as 1.
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    let bs = block_size.max(1);
    let mut prev = FNV_OFFSET;
    tokens
        .chunks_exact(bs)
        .map(|block| {
            let mut state = prev;
            for t in block {
                state = fnv1a(state, &t.to_le_bytes());
            }
            prev = splitmix64(state);
            prev
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_reference_vectors() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a(FNV_OFFSET, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(FNV_OFFSET, b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn rendezvous_canonicalises_mapped_v4() {
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(rendezvous_weight(v4, "w0"), rendezvous_weight(mapped, "w0"));
        assert_ne!(rendezvous_weight(v4, "w0"), rendezvous_weight(v4, "w1"));
    }

    #[test]
    fn block_hashes_chain_and_ignore_partial_tail() {
        let a: Vec<u32> = (0..40).collect();
        let ha = block_hashes(&a, 16);
        assert_eq!(ha.len(), 2, "40 tokens hold two full 16-token blocks");
        // Same second block after a different first block hashes differently (chaining).
        let mut b = a.clone();
        b[0] = 999;
        let hb = block_hashes(&b, 16);
        assert_ne!(ha[0], hb[0]);
        assert_ne!(ha[1], hb[1]);
        // Shared prefix → shared leading hashes; divergence later keeps the prefix.
        let mut c = a.clone();
        c[20] = 7;
        let hc = block_hashes(&c, 16);
        assert_eq!(ha[0], hc[0]);
        assert_ne!(ha[1], hc[1]);
        assert!(block_hashes(&a[..15], 16).is_empty());
        assert_eq!(block_hashes(&a[..3], 0).len(), 3);
    }
}
