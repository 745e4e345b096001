//! How the classes are split over ranks.
//!
//! The split is the published implementation's: rank `i` of `k` holds `C / k` classes, plus one
//! when `i < C mod k`, in consecutive ranges. Rank 0 therefore holds the largest shard, which is
//! the one the memory planner sizes a device by.

/// The contiguous range of global class ids held by one rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// First global class id of the shard.
    pub start: u64,
    /// Number of classes in the shard.
    pub len: u64,
}

impl Shard {
    /// The shard of `rank` when `num_classes` classes are split over `world_size` ranks.
    ///
    /// ```
    /// use partial_fc::Shard;
    /// let shards: Vec<_> = (0..3).map(|r| Shard::of(10, 3, r)).collect();
    /// assert_eq!(shards[0], Shard { start: 0, len: 4 });
    /// assert_eq!(shards[1], Shard { start: 4, len: 3 });
    /// assert_eq!(shards[2], Shard { start: 7, len: 3 });
    /// ```
    pub fn of(num_classes: u64, world_size: usize, rank: usize) -> Shard {
        let k = world_size.max(1) as u64;
        let r = rank as u64;
        let base = num_classes / k;
        let extra = num_classes % k;
        let len = base + u64::from(r < extra);
        let start = r * base + r.min(extra);
        Shard { start, len }
    }

    /// The rank whose shard holds `class` when `num_classes` classes are split over
    /// `world_size` ranks (the inverse of [`Shard::of`]); `None` for a class out of range.
    ///
    /// ```
    /// use partial_fc::Shard;
    /// assert_eq!(Shard::rank_of(10, 3, 3), Some(0)); // ranks hold 0..4, 4..7, 7..10
    /// assert_eq!(Shard::rank_of(10, 3, 4), Some(1));
    /// assert_eq!(Shard::rank_of(10, 3, 9), Some(2));
    /// assert_eq!(Shard::rank_of(10, 3, 10), None);
    /// ```
    pub fn rank_of(num_classes: u64, world_size: usize, class: u64) -> Option<usize> {
        if class >= num_classes {
            return None;
        }
        let k = world_size.max(1) as u64;
        let (base, extra) = (num_classes / k, num_classes % k);
        // The first `extra` ranks hold base + 1 classes, the others base.
        let wide = extra * (base + 1);
        let rank = if class < wide {
            class / (base + 1)
        } else {
            extra + (class - wide) / base
        };
        Some(rank as usize)
    }

    /// One past the last global class id of the shard.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }

    /// Whether a global class id lives in this shard.
    pub fn contains(&self, class: i64) -> bool {
        class >= 0 && (class as u64) >= self.start && (class as u64) < self.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_of_inverts_of() {
        for c in [1u64, 7, 10, 1001] {
            for k in 1..9usize {
                for r in 0..k {
                    let s = Shard::of(c, k, r);
                    for class in s.start..s.end() {
                        assert_eq!(Shard::rank_of(c, k, class), Some(r), "{c} {k} {class}");
                    }
                }
                assert_eq!(Shard::rank_of(c, k, c), None);
            }
        }
    }

    #[test]
    fn shards_tile_the_classes() {
        for c in [0u64, 1, 7, 10, 1001] {
            for k in 1..9 {
                let mut next = 0;
                for r in 0..k {
                    let s = Shard::of(c, k, r);
                    assert_eq!(s.start, next);
                    next = s.end();
                }
                assert_eq!(next, c);
            }
        }
    }
}
