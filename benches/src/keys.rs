//! Which key the next operation touches: uniform or (scrambled) Zipfian choice over `records`.
//!
//! A benchmark's key distribution decides how much contention and caching it sees. Two are
//! offered, the two YCSB made standard:
//!
//! * **Uniform**: every record equally likely. Little contention; the worst case for caches.
//! * **Zipfian**: record of rank `k` (from 1) chosen with probability proportional to
//!   `1 / k^θ`, θ = 0.99 by default (YCSB's "zipfian constant"). A few records take most of the
//!   traffic, as in real workloads, so concurrent writes to one key and its siblings happen.
//!
//! # The Zipfian generator
//!
//! [`Zipfian`] is the constant-time method of Gray et al., "Quickly generating billion-record
//! synthetic databases" (SIGMOD 1994), as YCSB implements it: precompute
//! `ζ(n, θ) = Σ_{i=1..n} 1/i^θ` once (O(n), a few milliseconds for a million records), then
//! turn one uniform draw `u` into a rank with a closed form. It needs `0 < θ < 1`.
//!
//! # Scrambling
//!
//! Raw Zipfian ranks put the hottest records next to each other (ranks 0, 1, 2...). Since key
//! names sort the same way, that would bunch the hot keys together in whatever structure
//! orders keys. [`KeyChooser`] therefore scrambles like YCSB's `ScrambledZipfianGenerator`: the
//! rank is hashed (FNV-1a, 64 bit) and reduced modulo `records`. The popularity curve is
//! unchanged up to hash collisions (two ranks may share a record, which only makes that record
//! slightly hotter); the hot records are spread over the key space. QuorumKV hashes keys onto
//! its ring anyway, so scrambling matters little there, but it keeps the workload identical
//! for engines that do not (sled, etcd).
//!
//! Keys are rendered by [`key_name`] as `user` plus twelve digits, so every key has the same
//! length (16 bytes) whatever the record count.

use anyhow::{bail, Result};
use rand::Rng;

/// YCSB's default Zipfian constant.
pub const DEFAULT_ZIPFIAN_CONSTANT: f64 = 0.99;

/// How keys are chosen, as given on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyDistribution {
    /// Every record equally likely.
    Uniform,
    /// Scrambled Zipfian (YCSB): a few hot records take most operations.
    Zipfian,
}

/// The name of record `index`: `user` and twelve digits, 16 bytes.
pub fn key_name(index: u64) -> Vec<u8> {
    format!("user{index:012}").into_bytes()
}

/// Draws record indexes in `0..records` from one [`KeyDistribution`].
#[derive(Clone, Debug)]
pub enum KeyChooser {
    /// Uniform over `0..records`.
    Uniform { records: u64 },
    /// Zipfian ranks, scrambled onto `0..records` (see the module docs).
    ScrambledZipfian(Zipfian),
}

impl KeyChooser {
    /// A chooser over `records` records (at least one); `theta` is used by Zipfian only.
    pub fn new(distribution: KeyDistribution, records: u64, theta: f64) -> Result<KeyChooser> {
        if records == 0 {
            bail!("--records must be at least 1");
        }
        Ok(match distribution {
            KeyDistribution::Uniform => KeyChooser::Uniform { records },
            KeyDistribution::Zipfian => KeyChooser::ScrambledZipfian(Zipfian::new(records, theta)?),
        })
    }

    /// The next record index, in `0..records`.
    pub fn next<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        match self {
            KeyChooser::Uniform { records } => rng.random_range(0..*records),
            KeyChooser::ScrambledZipfian(zipfian) => {
                fnv1a_64(zipfian.next_rank(rng)) % zipfian.items()
            }
        }
    }
}

/// Zipfian ranks in `0..items`: rank 0 is the most popular (see the module docs).
#[derive(Clone, Debug)]
pub struct Zipfian {
    items: u64,
    theta: f64,
    alpha: f64,
    zeta_n: f64,
    eta: f64,
    /// `1 + 0.5^θ`: below it (after scaling by ζ(n)) the rank is 1.
    second_threshold: f64,
}

impl Zipfian {
    /// A generator over `items` ranks (at least one) with constant `theta` in (0, 1).
    pub fn new(items: u64, theta: f64) -> Result<Zipfian> {
        if items == 0 {
            bail!("a Zipfian distribution needs at least one item");
        }
        if !(theta > 0.0 && theta < 1.0) {
            bail!("the Zipfian constant must be strictly between 0 and 1, not {theta}");
        }
        let zeta_n = zeta(items, theta);
        let zeta_2 = zeta(2.min(items), theta);
        // With one item every draw is rank 0 (the first threshold catches it); eta is unused.
        let eta = if items > 1 {
            (1.0 - (2.0 / items as f64).powf(1.0 - theta)) / (1.0 - zeta_2 / zeta_n)
        } else {
            0.0
        };
        Ok(Zipfian {
            items,
            theta,
            alpha: 1.0 / (1.0 - theta),
            zeta_n,
            eta,
            second_threshold: 1.0 + 0.5f64.powf(theta),
        })
    }

    /// How many ranks there are.
    pub fn items(&self) -> u64 {
        self.items
    }

    /// The Zipfian constant θ.
    pub fn theta(&self) -> f64 {
        self.theta
    }

    /// The next rank, in `0..items`.
    pub fn next_rank<R: Rng + ?Sized>(&self, rng: &mut R) -> u64 {
        let u: f64 = rng.random();
        let uz = u * self.zeta_n;
        if uz < 1.0 {
            return 0;
        }
        if uz < self.second_threshold {
            return 1.min(self.items - 1);
        }
        let rank = (self.items as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64;
        // Floating-point rounding can land exactly on `items`; the closed form never exceeds it.
        rank.min(self.items - 1)
    }
}

/// `ζ(n, θ) = Σ_{i=1..n} 1/i^θ`.
fn zeta(n: u64, theta: f64) -> f64 {
    (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum()
}

/// FNV-1a over the eight little-endian bytes of `value`, as YCSB's `fnvhash64`.
fn fnv1a_64(value: u64) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    value.to_le_bytes().iter().fold(OFFSET_BASIS, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(PRIME)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::SeedableRng;

    const DRAWS: usize = 200_000;

    fn rng() -> SmallRng {
        SmallRng::seed_from_u64(7)
    }

    #[test]
    fn zipfian_ranks_stay_in_range() {
        let mut rng = rng();
        for items in [1u64, 2, 3, 10, 1000] {
            let zipfian = Zipfian::new(items, DEFAULT_ZIPFIAN_CONSTANT).unwrap();
            for _ in 0..20_000 {
                assert!(zipfian.next_rank(&mut rng) < items, "items {items}");
            }
        }
    }

    #[test]
    fn zipfian_skews_towards_low_ranks() {
        let items = 1000u64;
        let zipfian = Zipfian::new(items, DEFAULT_ZIPFIAN_CONSTANT).unwrap();
        let mut rng = rng();
        let mut counts = vec![0u64; items as usize];
        for _ in 0..DRAWS {
            counts[zipfian.next_rank(&mut rng) as usize] += 1;
        }
        // Rank 0 has probability 1/ζ(1000, 0.99) ≈ 0.13; uniform would give 0.001.
        let top = counts[0] as f64 / DRAWS as f64;
        assert!((0.10..0.17).contains(&top), "rank 0 share {top}");
        // Popularity falls with rank: the first ten ranks outweigh the last five hundred.
        let head: u64 = counts[..10].iter().sum();
        let tail: u64 = counts[500..].iter().sum();
        assert!(head > tail, "head {head} tail {tail}");
        assert!(
            counts[0] > counts[1] && counts[1] > counts[9],
            "{:?}",
            &counts[..10]
        );
    }

    #[test]
    fn scrambled_zipfian_stays_in_range_and_keeps_a_hot_record() {
        let records = 10_000u64;
        let chooser = KeyChooser::new(KeyDistribution::Zipfian, records, 0.99).unwrap();
        let mut rng = rng();
        let mut counts = std::collections::HashMap::<u64, u64>::new();
        for _ in 0..DRAWS {
            let index = chooser.next(&mut rng);
            assert!(index < records);
            *counts.entry(index).or_default() += 1;
        }
        let hottest = counts.values().copied().max().unwrap_or(0) as f64 / DRAWS as f64;
        assert!(hottest > 0.05, "the hottest record took only {hottest}");
        // Scrambled: the hottest record is not simply record 0.
        let hottest_index = counts.iter().max_by_key(|(_, n)| **n).map(|(i, _)| *i);
        assert_eq!(hottest_index, Some(fnv1a_64(0) % records));
    }

    #[test]
    fn uniform_covers_the_range_evenly() {
        let records = 100u64;
        let chooser = KeyChooser::new(KeyDistribution::Uniform, records, 0.99).unwrap();
        let mut rng = rng();
        let mut counts = vec![0u64; records as usize];
        for _ in 0..DRAWS {
            counts[chooser.next(&mut rng) as usize] += 1;
        }
        let expected = (DRAWS as u64 / records) as f64;
        for (index, count) in counts.iter().enumerate() {
            let ratio = *count as f64 / expected;
            assert!((0.8..1.2).contains(&ratio), "record {index}: {count}");
        }
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(Zipfian::new(0, 0.99).is_err());
        assert!(Zipfian::new(10, 1.0).is_err());
        assert!(Zipfian::new(10, 0.0).is_err());
        assert!(Zipfian::new(10, f64::NAN).is_err());
        assert!(KeyChooser::new(KeyDistribution::Uniform, 0, 0.99).is_err());
    }

    #[test]
    fn keys_have_one_length() {
        assert_eq!(key_name(0), b"user000000000000".to_vec());
        assert_eq!(key_name(123_456_789).len(), 16);
    }
}
