//! Summaries of repeated measurements. The machines are shared and noisy, so every figure is
//! a median with its spread, never a single run or a mean.

/// Order statistics of a set of samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// 25th and 75th percentiles.
    pub p25: f64,
    pub p75: f64,
    pub p99: f64,
}

impl Summary {
    /// `None` for no samples or a non-finite one.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() || samples.iter().any(|s| !s.is_finite()) {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        Some(Summary {
            n: sorted.len(),
            median: percentile(&sorted, 50.0),
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            p25: percentile(&sorted, 25.0),
            p75: percentile(&sorted, 75.0),
            p99: percentile(&sorted, 99.0),
        })
    }

    /// Half the interquartile range: a robust "±" for a median.
    pub fn half_iqr(&self) -> f64 {
        (self.p75 - self.p25) / 2.0
    }
}

/// The `p`-th percentile (0..=100) of sorted samples, interpolating linearly between the two
/// nearest ranks (the definition spreadsheets and numpy use by default).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => f64::NAN,
        1 => sorted[0],
        n => {
            let rank = (p.clamp(0.0, 100.0) / 100.0) * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = rank.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(Summary::of(&[3.0, 1.0, 2.0]).unwrap().median, 2.0);
        assert_eq!(Summary::of(&[4.0, 1.0, 3.0, 2.0]).unwrap().median, 2.5);
        assert_eq!(Summary::of(&[7.0]).unwrap().median, 7.0);
    }

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let sorted: Vec<f64> = (0..=100).map(f64::from).collect();
        assert_eq!(percentile(&sorted, 99.0), 99.0);
        assert_eq!(percentile(&sorted, 25.0), 25.0);
        assert_eq!(percentile(&[0.0, 10.0], 75.0), 7.5);
        assert_eq!(percentile(&[1.0, 2.0], 150.0), 2.0, "clamped");
        assert!(percentile(&[], 50.0).is_nan());
    }

    #[test]
    fn summary_is_order_independent_and_rejects_bad_input() {
        let s = Summary::of(&[5.0, 1.0, 9.0, 3.0, 7.0]).unwrap();
        assert_eq!((s.n, s.min, s.max, s.median), (5, 1.0, 9.0, 5.0));
        assert_eq!((s.p25, s.p75, s.half_iqr()), (3.0, 7.0, 2.0));
        assert_eq!(Summary::of(&[9.0, 7.0, 5.0, 3.0, 1.0]), Some(s));
        assert_eq!(Summary::of(&[]), None);
        assert_eq!(Summary::of(&[1.0, f64::NAN]), None);
    }
}
