//! Reconnect delays: exponential backoff with full jitter, capped.
//!
//! Full jitter (a uniform delay between zero and the exponential ceiling) spreads thousands of
//! daemons over the whole window when a relay restarts, instead of having them return in waves.

use std::time::Duration;

use rand::Rng;

/// First ceiling: 500 ms, so a brief relay blip costs almost nothing.
const BASE: Duration = Duration::from_millis(500);

/// Reconnect delay state.
#[derive(Debug, Clone)]
pub struct Backoff {
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Backoff whose delays never exceed `cap`.
    pub fn new(cap: Duration) -> Self {
        Backoff { cap, attempt: 0 }
    }

    /// The ceiling for the next delay: `BASE · 2^attempt`, at most the cap.
    pub fn ceiling(&self) -> Duration {
        BASE.saturating_mul(1u32 << self.attempt.min(20))
            .min(self.cap)
    }

    /// How many failures in a row so far.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The delay before the next attempt, uniform in `[0, ceiling]`; raises the ceiling.
    pub fn next_delay(&mut self, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_nanos(rng.random_range(0..=ceiling.as_nanos() as u64))
    }

    /// After a good connection: the next failure starts from the base again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn ceilings_double_up_to_the_cap_and_delays_stay_below() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut backoff = Backoff::new(Duration::from_secs(30));
        let mut ceilings = Vec::new();
        for _ in 0..12 {
            let ceiling = backoff.ceiling();
            let delay = backoff.next_delay(&mut rng);
            assert!(delay <= ceiling, "{delay:?} > {ceiling:?}");
            ceilings.push(ceiling.as_millis());
        }
        assert_eq!(&ceilings[..7], &[500, 1000, 2000, 4000, 8000, 16000, 30000]);
        assert!(ceilings[7..].iter().all(|c| *c == 30000));
        backoff.reset();
        assert_eq!(backoff.ceiling(), BASE);
    }

    #[test]
    fn delays_are_spread_over_the_whole_window() {
        let mut rng = StdRng::seed_from_u64(1);
        let delays: Vec<Duration> = (0..1000)
            .map(|_| {
                Backoff {
                    cap: Duration::from_secs(30),
                    attempt: 10,
                }
                .next_delay(&mut rng)
            })
            .collect();
        let low = delays
            .iter()
            .filter(|d| **d < Duration::from_secs(10))
            .count();
        let high = delays
            .iter()
            .filter(|d| **d > Duration::from_secs(20))
            .count();
        // Uniform over [0, 30 s]: about a third in each band.
        assert!((250..420).contains(&low), "{low}");
        assert!((250..420).contains(&high), "{high}");
    }
}
