//! Tier limits and brute-force protection, enforced in memory.
//!
//! Each user gets a token bucket per minute and a count of requests in flight, sized by their
//! tier; each client address gets a budget of failed authentications, after which, for a while,
//! its requests that do not carry a valid token get 429 (valid tokens still pass: see
//! `AppState::authenticate`). Nothing here outlives the process, and idle
//! entries are pruned (see [`Limits::prune`]) so memory follows the active users, not every user
//! ever seen.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

use crate::lock;
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::{RelayConfig, TierLimits};

/// How often idle limiter entries are pruned: a minute, one full refill of any bucket.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// `Retry-After` for a refusal whose end cannot be predicted (a slot in flight frees when some
/// request ends): one second, so clients retry soon without spinning.
const RETRY_SOON: Duration = Duration::from_secs(1);

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The tier's requests per minute.
    RequestsPerMinute,
    /// The tier's requests in flight.
    ConcurrentRequests,
    /// The tier's connected devices.
    Devices,
    /// Failed authentications from one address.
    AuthFailures,
}

impl Limit {
    /// The limit's name in logs, metrics and the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::RequestsPerMinute => "requests_per_minute",
            Limit::ConcurrentRequests => "concurrent_requests",
            Limit::Devices => "devices",
            Limit::AuthFailures => "auth_failures",
        }
    }
}

/// A request refused by a limit: answered with 429, `Retry-After` and `message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The limit.
    pub limit: Limit,
    /// When trying again may succeed.
    pub retry_after: Duration,
    /// What the caller is told.
    pub message: String,
}

impl Refusal {
    /// `Retry-After` in whole seconds, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }

    /// Sets `Retry-After` on a 429 response.
    pub fn set_retry_after(&self, headers: &mut http::HeaderMap) {
        headers.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from(self.retry_after_secs()),
        );
    }
}

/// The relay's limits.
pub struct Limits {
    /// One keyed bucket per tier (a tier's quota is the same for all its users).
    rates: HashMap<String, DefaultKeyedRateLimiter<String>>,
    /// Requests in flight per user; users with none are absent.
    in_flight: Mutex<HashMap<String, u32>>,
    /// Failed authentications per client address.
    failures: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Addresses refused until the given instant.
    blocked: Mutex<HashMap<IpAddr, Instant>>,
    clock: DefaultClock,
}

impl Limits {
    /// Limits for the tiers and auth-failure budget in `config`.
    pub fn new(config: &RelayConfig) -> Self {
        let rates = config
            .tiers
            .iter()
            .map(|(name, tier)| {
                let per_minute =
                    NonZeroU32::new(tier.requests_per_minute).unwrap_or(NonZeroU32::MIN);
                (
                    name.clone(),
                    RateLimiter::keyed(Quota::per_minute(per_minute)),
                )
            })
            .collect();
        let failures = NonZeroU32::new(config.auth_failures_per_minute)
            .map(|n| RateLimiter::keyed(Quota::per_minute(n)));
        Limits {
            rates,
            in_flight: Mutex::default(),
            failures,
            blocked: Mutex::default(),
            clock: DefaultClock::default(),
        }
    }

    /// Admits one request of `user` on `tier` (named `tier_name`), or says which limit refuses
    /// it. A request refused for concurrency does not use up the user's per-minute budget.
    pub fn admit(
        self: &Arc<Self>,
        user: &str,
        tier_name: &str,
        tier: &TierLimits,
    ) -> Result<Admitted, Refusal> {
        let mut in_flight = lock(&self.in_flight);
        let running = in_flight.get(user).copied().unwrap_or(0);
        if running >= tier.concurrent_requests {
            return Err(Refusal {
                limit: Limit::ConcurrentRequests,
                retry_after: RETRY_SOON,
                message: format!(
                    "too many requests at once: the {tier_name} tier allows {} in flight; wait for one to finish",
                    tier.concurrent_requests
                ),
            });
        }
        if let Some(rate) = self.rates.get(tier_name)
            && let Err(not_until) = rate.check_key(&user.to_owned())
        {
            let retry_after = not_until.wait_time_from(self.clock.now());
            return Err(Refusal {
                limit: Limit::RequestsPerMinute,
                retry_after,
                message: format!(
                    "rate limit: the {tier_name} tier allows {} requests per minute; try again in {} s",
                    tier.requests_per_minute,
                    retry_after.as_secs_f64().ceil().max(1.0)
                ),
            });
        }
        *in_flight.entry(user.to_owned()).or_default() += 1;
        Ok(Admitted {
            limits: self.clone(),
            user: user.to_owned(),
            cluster: None,
        })
    }

    /// Whether `ip` is over its budget of failed authentications, and for how long: its
    /// requests without a valid token are then refused with this.
    pub fn blocked(&self, ip: IpAddr) -> Option<Refusal> {
        let until = *lock(&self.blocked).get(&ip)?;
        let left = until.checked_duration_since(Instant::now())?;
        Some(auth_refusal(left))
    }

    /// Records a failed authentication from `ip`. Returns the refusal once the address is over
    /// its budget: until the budget refills, its failures get 429 and are not counted again.
    pub fn auth_failed(&self, ip: IpAddr) -> Option<Refusal> {
        let failures = self.failures.as_ref()?;
        let not_until = failures.check_key(&ip).err()?;
        // Blocked until the bucket holds a few attempts again, not just one: a guesser gets
        // bursts of one attempt otherwise.
        let wait = not_until.wait_time_from(self.clock.now()).max(RETRY_SOON);
        lock(&self.blocked).insert(ip, Instant::now() + wait);
        Some(auth_refusal(wait))
    }

    /// Drops the state of users and addresses that are back to a full budget.
    pub fn prune(&self) {
        for rate in self.rates.values() {
            rate.retain_recent();
            rate.shrink_to_fit();
        }
        if let Some(failures) = &self.failures {
            failures.retain_recent();
            failures.shrink_to_fit();
        }
        let now = Instant::now();
        lock(&self.blocked).retain(|_, until| *until > now);
    }

    /// Users with requests in flight (for tests and metrics).
    pub fn users_in_flight(&self) -> usize {
        lock(&self.in_flight).len()
    }
}

fn auth_refusal(wait: Duration) -> Refusal {
    Refusal {
        limit: Limit::AuthFailures,
        retry_after: wait,
        message: format!(
            "too many failed authentications from your address: try again in {} s",
            wait.as_secs_f64().ceil().max(1.0)
        ),
    }
}

/// One admitted request; dropping it ends the request for the concurrency limit.
pub struct Admitted {
    limits: Arc<Limits>,
    user: String,
    /// In a cluster, the request's place in its user's cluster-wide count.
    cluster: Option<crate::cluster::ClusterSlot>,
}

impl Admitted {
    /// Holds the request's place in the cluster-wide count as long as this one.
    pub(crate) fn attach(&mut self, slot: crate::cluster::ClusterSlot) {
        self.cluster = Some(slot);
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut in_flight = lock(&self.limits.in_flight);
        if let Some(count) = in_flight.get_mut(&self.user) {
            *count -= 1;
            if *count == 0 {
                in_flight.remove(&self.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(auth_failures_per_minute: u32) -> (Arc<Limits>, RelayConfig) {
        let mut config = RelayConfig {
            auth_failures_per_minute,
            ..RelayConfig::default()
        };
        config.tiers.insert(
            "tiny".to_owned(),
            TierLimits {
                requests_per_minute: 3,
                concurrent_requests: 2,
                ..TierLimits::free()
            },
        );
        (Arc::new(Limits::new(&config)), config)
    }

    #[test]
    fn concurrency_and_rate_are_per_user_and_per_tier() {
        let (limits, config) = setup(0);
        let tiny = &config.tiers["tiny"];
        let a = limits.admit("alice", "tiny", tiny).unwrap();
        let b = limits.admit("alice", "tiny", tiny).unwrap();
        let refused = limits.admit("alice", "tiny", tiny).err().unwrap();
        assert_eq!(refused.limit, Limit::ConcurrentRequests);
        assert_eq!(refused.retry_after_secs(), 1);
        assert!(
            refused.message.contains("tiny tier allows 2"),
            "{}",
            refused.message
        );
        // Another user of the same tier is not affected.
        let bob = limits.admit("bob", "tiny", tiny).unwrap();
        drop((a, b, bob));
        assert_eq!(
            limits.users_in_flight(),
            0,
            "finished requests leave no state"
        );

        // Two of alice's three per minute are used; the concurrency refusal cost nothing.
        let c = limits.admit("alice", "tiny", tiny).unwrap();
        drop(c);
        let refused = limits.admit("alice", "tiny", tiny).err().unwrap();
        assert_eq!(refused.limit, Limit::RequestsPerMinute);
        // Refilled at 3 a minute: the next one in about 20 s.
        assert!(
            (15..=20).contains(&refused.retry_after_secs()),
            "{:?}",
            refused.retry_after
        );
        assert!(refused.message.contains("3 requests per minute"));
        // Premium is a different bucket.
        let premium = &config.tiers["premium"];
        assert!(limits.admit("alice", "premium", premium).is_ok());
    }

    #[test]
    fn an_address_over_its_failure_budget_is_blocked_then_pruned() {
        let (limits, _) = setup(2);
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let other: IpAddr = "198.51.100.8".parse().unwrap();
        assert!(limits.blocked(ip).is_none());
        assert!(limits.auth_failed(ip).is_none());
        assert!(limits.auth_failed(ip).is_none());
        let refusal = limits.auth_failed(ip).unwrap();
        assert_eq!(refusal.limit, Limit::AuthFailures);
        assert!(refusal.retry_after_secs() >= 1);
        assert!(limits.blocked(ip).is_some());
        assert!(limits.blocked(other).is_none());
        assert!(limits.auth_failed(other).is_none());

        // Off when the budget is 0.
        let (off, _) = setup(0);
        for _ in 0..100 {
            assert!(off.auth_failed(ip).is_none());
        }
        off.prune();
    }
}
