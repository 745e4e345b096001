//! Synthetic identities: deterministic "face images" whose identity hides behind a nuisance.
//!
//! Identity `c` is a latent point `z_c ~ N(0, I_L)`. One view of it is
//!
//! ```text
//! h = (z_c + σ_w·u) · A / √L  +  σ_n·n · P / √Q        u ~ N(0, I_L), n ~ N(0, I_Q)
//! x = tanh(g·h) + σ_e·ε                                  ε ~ N(0, I_D)
//! ```
//!
//! `A` (L × D) and `P` (Q × D) are fixed random mixing matrices. The nuisance `n` lives in a
//! low-dimensional subspace shared by every identity (pose, lighting): two different identities
//! seen under similar nuisance look alike, which is what makes raw-input or random-feature
//! verification poor at low false-accept rates. `u` is within-identity variation no model can
//! remove, and the `tanh` warp makes the nuisance impossible to project out linearly.
//!
//! Every number comes from the counter-based Philox generator keyed by (seed, stream, identity,
//! view), so any sample can be regenerated alone, in any order, on any thread; identities
//! `0..n` train and identities from `n` on are held out.

use crate::cpu::gemm::gemm_nn;
use crate::error::{PfcError, Result};
use crate::rng::philox4x32_10;
use rayon::prelude::*;

/// Random streams of the generator (the counter's top byte), so that no two uses share bits.
#[derive(Clone, Copy)]
#[repr(u32)]
enum Stream {
    Mixing = 1,
    Identity = 2,
    View = 3,
    Pixel = 4,
}

/// Fills `out` with N(0, 1) values keyed by (seed, stream, a, b): the same key always gives the
/// same values, whatever else was drawn before.
fn normals(seed: u64, stream: Stream, a: u64, b: u32, out: &mut [f32]) {
    let key = [seed as u32, (seed >> 32) as u32];
    for (j, quad) in out.chunks_mut(4).enumerate() {
        let bits = philox4x32_10(
            [
                a as u32,
                (a >> 32) as u32,
                b,
                ((stream as u32) << 24) | j as u32,
            ],
            key,
        );
        for (pair, o) in quad.chunks_mut(2).enumerate() {
            // Box–Muller from two uniforms in (0, 1].
            let u1 = (bits[2 * pair] as f32 + 1.0) / 4_294_967_296.0;
            let u2 = bits[2 * pair + 1] as f32 / 4_294_967_296.0;
            let radius = (-2.0 * u1.ln()).sqrt();
            let angle = std::f32::consts::TAU * u2;
            o[0] = radius * angle.cos();
            if o.len() > 1 {
                o[1] = radius * angle.sin();
            }
        }
    }
}

/// Shape and difficulty of the synthetic task.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratorConfig {
    /// Dimension D of a sample (the "image").
    pub input_dim: usize,
    /// Dimension L of the identity latent.
    pub identity_dim: usize,
    /// Dimension Q of the nuisance subspace shared by all identities.
    pub nuisance_dim: usize,
    /// σ_w: within-identity variation, relative to the identity latent (1 = as large).
    pub within_noise: f32,
    /// σ_n: strength of the nuisance relative to the identity.
    pub nuisance_scale: f32,
    /// σ_e: independent per-coordinate noise added after the warp.
    pub pixel_noise: f32,
    /// g: gain of the `tanh` warp (larger = more nonlinear).
    pub warp_gain: f32,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        GeneratorConfig {
            input_dim: 256,
            identity_dim: 32,
            nuisance_dim: 8,
            within_noise: 0.4,
            nuisance_scale: 2.0,
            pixel_noise: 0.3,
            warp_gain: 1.5,
        }
    }
}

impl GeneratorConfig {
    /// Checks every field.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("input_dim", self.input_dim),
            ("identity_dim", self.identity_dim),
            ("nuisance_dim", self.nuisance_dim),
        ] {
            if v == 0 || v > 1 << 16 {
                return Err(PfcError::param(name, v, "must lie in [1, 65536]"));
            }
        }
        for (name, v) in [
            ("within_noise", self.within_noise),
            ("nuisance_scale", self.nuisance_scale),
            ("pixel_noise", self.pixel_noise),
            ("warp_gain", self.warp_gain),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(PfcError::param(name, v, "must be finite and >= 0"));
            }
        }
        if self.warp_gain == 0.0 {
            return Err(PfcError::param("warp_gain", 0, "must be > 0"));
        }
        Ok(())
    }
}

/// One sample's address: which identity, which of its views.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SampleId {
    /// Global identity id (also the class label of training identities).
    pub identity: u64,
    /// View index within the identity.
    pub view: u32,
}

/// The generator: fixed mixing matrices drawn from the seed, samples drawn on demand.
///
/// ```
/// use partial_fc::synthetic::data::{GeneratorConfig, SampleId, SyntheticIdentities};
/// let gen = SyntheticIdentities::new(GeneratorConfig::default(), 7).unwrap();
/// let ids = [SampleId { identity: 3, view: 0 }, SampleId { identity: 3, view: 1 }];
/// let x = gen.generate(&ids).unwrap();
/// assert_eq!(x.len(), 2 * gen.config().input_dim);
/// assert_eq!(x, gen.generate(&ids).unwrap()); // deterministic
/// ```
#[derive(Debug, Clone)]
pub struct SyntheticIdentities {
    config: GeneratorConfig,
    seed: u64,
    /// `(L + Q) × D`: the identity rows scaled by 1/√L, then the nuisance rows by σ_n/√Q.
    mixing: Vec<f32>,
}

impl SyntheticIdentities {
    /// Draws the mixing matrices for `seed`.
    pub fn new(config: GeneratorConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let (l, q, d) = (config.identity_dim, config.nuisance_dim, config.input_dim);
        let mut mixing = vec![0.0f32; (l + q) * d];
        mixing.par_chunks_mut(d).enumerate().for_each(|(row, out)| {
            normals(seed, Stream::Mixing, row as u64, 0, out);
            let scale = if row < l {
                1.0 / (l as f32).sqrt()
            } else {
                config.nuisance_scale / (q as f32).sqrt()
            };
            out.iter_mut().for_each(|v| *v *= scale);
        });
        Ok(SyntheticIdentities {
            config,
            seed,
            mixing,
        })
    }

    /// The task's configuration.
    pub fn config(&self) -> &GeneratorConfig {
        &self.config
    }

    /// The identity latent `z_c` (length L).
    pub fn identity_latent(&self, identity: u64) -> Vec<f32> {
        let mut z = vec![0.0; self.config.identity_dim];
        normals(self.seed, Stream::Identity, identity, 0, &mut z);
        z
    }

    /// The samples `ids`, `ids.len() × D` row-major.
    ///
    /// # Errors
    ///
    /// [`PfcError::Shape`] when `ids.len() × D` values overflow `usize`.
    pub fn generate(&self, ids: &[SampleId]) -> Result<Vec<f32>> {
        let c = &self.config;
        let (l, q, d) = (c.identity_dim, c.nuisance_dim, c.input_dim);
        let k = l + q;
        let values = |width: usize| {
            ids.len().checked_mul(width).ok_or_else(|| {
                PfcError::Shape(format!(
                    "{} samples of {width} values overflow usize",
                    ids.len()
                ))
            })
        };
        // Latent of each sample: [z_c + σ_w·u, n].
        let mut latent = vec![0.0f32; values(k)?];
        latent
            .par_chunks_mut(k)
            .zip(ids.par_iter())
            .for_each(|(row, id)| {
                let (ident, nuis) = row.split_at_mut(l);
                normals(self.seed, Stream::Identity, id.identity, 0, ident);
                let mut view = vec![0.0f32; k];
                normals(self.seed, Stream::View, id.identity, id.view, &mut view);
                for (z, u) in ident.iter_mut().zip(&view[..l]) {
                    *z += c.within_noise * u;
                }
                nuis.copy_from_slice(&view[l..]);
            });
        let mut x = vec![0.0f32; values(d)?];
        gemm_nn(ids.len(), d, k, &latent, &self.mixing, &mut x)?;
        x.par_chunks_mut(d)
            .zip(ids.par_iter())
            .for_each(|(row, id)| {
                let mut noise = vec![0.0f32; d];
                normals(self.seed, Stream::Pixel, id.identity, id.view, &mut noise);
                for (v, e) in row.iter_mut().zip(&noise) {
                    *v = (c.warp_gain * *v).tanh() + c.pixel_noise * e;
                }
            });
        Ok(x)
    }
}

/// Every view of identities `first..first + count`, `views` each, identity-major.
///
/// # Errors
///
/// [`PfcError::Param`] when the identities run past `u64::MAX` or `count × views` samples do
/// not fit in memory's address space.
pub fn all_views(first: u64, count: u64, views: u32) -> Result<Vec<SampleId>> {
    let end = first.checked_add(count).ok_or_else(|| {
        PfcError::param(
            "identities",
            format!("{first} + {count}"),
            "identity ids run past u64::MAX",
        )
    })?;
    let samples = usize::try_from(count)
        .ok()
        .and_then(|c| c.checked_mul(views as usize))
        .filter(|&n| n <= isize::MAX as usize / std::mem::size_of::<SampleId>())
        .ok_or_else(|| {
            PfcError::param(
                "identities",
                format!("{count} × {views} views"),
                "too many samples to list",
            )
        })?;
    let mut ids = Vec::new();
    ids.try_reserve_exact(samples).map_err(|_| {
        PfcError::param(
            "identities",
            format!("{count} × {views} views"),
            format!("cannot allocate {samples} sample ids"),
        )
    })?;
    ids.extend(
        (first..end).flat_map(|identity| (0..views).map(move |view| SampleId { identity, view })),
    );
    Ok(ids)
}

/// A deterministic permutation of `0..n` for `(seed, epoch)` (Fisher–Yates on Philox bits).
pub fn permutation(n: usize, seed: u64, epoch: u64) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        let bits = philox4x32_10(
            [i as u32, epoch as u32, (epoch >> 32) as u32, 0x5bff_1e00],
            [seed as u32, (seed >> 32) as u32],
        );
        let r = (u64::from(bits[0]) << 32 | u64::from(bits[1])) % (i as u64 + 1);
        p.swap(i, r as usize);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_samples_any_order() {
        let gen = SyntheticIdentities::new(GeneratorConfig::default(), 11).unwrap();
        let ids = all_views(5, 3, 4).unwrap();
        let x = gen.generate(&ids).unwrap();
        let mut reversed: Vec<SampleId> = ids.clone();
        reversed.reverse();
        let y = gen.generate(&reversed).unwrap();
        let d = gen.config().input_dim;
        for (i, row) in x.chunks(d).enumerate() {
            assert_eq!(row, &y[(ids.len() - 1 - i) * d..(ids.len() - i) * d]);
        }
        let again = SyntheticIdentities::new(GeneratorConfig::default(), 11).unwrap();
        assert_eq!(x, again.generate(&ids).unwrap());
    }

    #[test]
    fn seeds_and_views_differ() {
        let a = SyntheticIdentities::new(GeneratorConfig::default(), 1).unwrap();
        let b = SyntheticIdentities::new(GeneratorConfig::default(), 2).unwrap();
        let ids = all_views(0, 1, 2).unwrap();
        let xa = a.generate(&ids).unwrap();
        assert_ne!(xa, b.generate(&ids).unwrap());
        let d = a.config().input_dim;
        assert_ne!(xa[..d], xa[d..]);
        assert!(xa.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn normals_have_unit_moments() {
        let mut v = vec![0.0f32; 40_000];
        normals(3, Stream::Pixel, 0, 0, &mut v);
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32;
        assert!(
            mean.abs() < 0.03 && (var - 1.0).abs() < 0.03,
            "{mean} {var}"
        );
    }

    #[test]
    fn permutation_is_a_deterministic_permutation() {
        let p = permutation(1000, 4, 2);
        let mut s = p.clone();
        s.sort_unstable();
        assert_eq!(s, (0..1000).collect::<Vec<u32>>());
        assert_eq!(p, permutation(1000, 4, 2));
        assert_ne!(p, permutation(1000, 4, 3));
    }

    #[test]
    fn all_views_past_u64_max_is_an_error() {
        // `first + count` used to overflow (a panic in debug, a wrapped empty range in release).
        for (first, count, views) in [(u64::MAX, 2, 1), (u64::MAX - 1, u64::MAX, 3)] {
            let r = all_views(first, count, views);
            assert!(matches!(r, Err(PfcError::Param { .. })), "{r:?}");
        }
        // More samples than an address space holds: an error, not a capacity-overflow panic.
        assert!(matches!(
            all_views(0, u64::MAX / 2, u32::MAX),
            Err(PfcError::Param { .. })
        ));
        let ids = all_views(u64::MAX - 2, 2, 2).unwrap();
        assert_eq!(ids.len(), 4);
        assert_eq!(ids[3].identity, u64::MAX - 1);
    }

    #[test]
    fn bad_config_is_an_error() {
        let bad = GeneratorConfig {
            input_dim: 0,
            ..GeneratorConfig::default()
        };
        assert!(SyntheticIdentities::new(bad, 0).is_err());
        let bad = GeneratorConfig {
            pixel_noise: f32::NAN,
            ..GeneratorConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
