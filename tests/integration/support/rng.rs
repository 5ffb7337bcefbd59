//! A seeded generator for test plans (SplitMix64): the same seed gives the
//! same plan, so a failing run can be replayed from the seed it prints.

/// SplitMix64.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// An index below `len`.
    pub fn pick(&mut self, len: usize) -> usize {
        let n = u64::try_from(len).unwrap_or(u64::MAX);
        usize::try_from(self.below(n)).unwrap_or(0)
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[cfg(test)]
mod tests {
    use super::Rng;

    #[test]
    fn a_seed_replays_its_sequence_and_stays_in_range() {
        let (mut a, mut b) = (Rng(7), Rng(7));
        let drawn: Vec<u64> = (0..5).map(|_| a.below(10)).collect();
        assert_eq!(drawn, (0..5).map(|_| b.below(10)).collect::<Vec<_>>());
        assert!(drawn.iter().all(|n| *n < 10));
        assert_eq!(Rng(1).below(0), 0);
        assert!(!Rng(3).chance(0));
        assert!(Rng(3).chance(100));
    }
}
