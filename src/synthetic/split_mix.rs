//! `SplitMix64`: the small seeded generator the examples draw their synthetic data from.

/// SplitMix64 (Steele, Lea and Flood, 2014): 64 bits of state, fully determined by its seed, fast
/// and good enough for test data and synthetic tasks (not for the sampler, whose draws must be
/// reproducible per class on every device: that is [`crate::rng`]'s counter-based Philox). One
/// copy for the examples that used to carry their own.
///
/// ```
/// use partial_fc::synthetic::SplitMix64;
/// let (mut a, mut b) = (SplitMix64::new(7), SplitMix64::new(7));
/// assert_eq!(a.next_u64(), b.next_u64());
/// let u = a.uniform();
/// assert!((0.0..1.0).contains(&u));
/// assert!(a.below(10) < 10);
/// ```
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator whose draws are determined by `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), from the top 53 bits.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n) (by the remainder; its bias is below n / 2⁶⁴). `n` must be > 0.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// The generator's state: a seed that continues its sequence (`SplitMix64::new(state)`
    /// draws what this one would draw next).
    pub fn state(&self) -> u64 {
        self.0
    }

    /// Shuffles `v` in place (Fisher–Yates, from the last element down).
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, (self.next_u64() % (i as u64 + 1)) as usize);
        }
    }

    /// Standard normal by Box–Muller, from two uniforms (the first held above 1e−300 so that
    /// its logarithm is finite).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}
