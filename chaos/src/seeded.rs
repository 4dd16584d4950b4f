//! Seeded randomness whose output is stable across crate versions.
//!
//! `rand`'s distributions (`random_range`, `Uniform`) do not promise value stability between
//! releases, but ChaCha8's raw stream does. Everything that must replay from `--seed` draws
//! through these helpers, which only use `next_u64`.

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A ChaCha8 generator seeded from `seed` and a `stream` label, so independent consumers
/// (one per proxy, one per schedule) never share a sequence.
pub fn rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Uniform in `lo..=hi` (a modulo bias below 2^-40 for the spans used here is irrelevant).
pub fn range_inclusive(rng: &mut ChaCha8Rng, lo: u64, hi: u64) -> u64 {
    if hi <= lo {
        return lo;
    }
    let span = hi - lo;
    if span == u64::MAX {
        return rng.next_u64();
    }
    lo + rng.next_u64() % (span + 1)
}

/// Uniform in `[0, 1)` with 53 bits of precision.
pub fn unit_f64(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_same_values() {
        let mut a = rng(7, 1);
        let mut b = rng(7, 1);
        let xs: Vec<u64> = (0..8).map(|_| range_inclusive(&mut a, 10, 20)).collect();
        let ys: Vec<u64> = (0..8).map(|_| range_inclusive(&mut b, 10, 20)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|x| (10..=20).contains(x)));
        let mut c = rng(7, 2);
        let zs: Vec<u64> = (0..8)
            .map(|_| range_inclusive(&mut c, 0, u64::MAX - 1))
            .collect();
        let mut d = rng(7, 1);
        let ws: Vec<u64> = (0..8)
            .map(|_| range_inclusive(&mut d, 0, u64::MAX - 1))
            .collect();
        assert_ne!(zs, ws, "different streams must differ");
    }

    #[test]
    fn chacha8_stream_is_pinned() {
        // Pins the raw generator output: if a dependency bump changed it, every recorded
        // seed would replay a different schedule.
        let mut r = rng(42, 0);
        let first = r.next_u64();
        assert_eq!(first, 12_578_764_544_318_200_737, "ChaCha8 output changed");
        assert_eq!(range_inclusive(&mut rng(1, 0), 5, 5), 5);
        let u = unit_f64(&mut rng(3, 3));
        assert!((0.0..1.0).contains(&u));
    }
}
