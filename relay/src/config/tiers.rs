//! Tiers: the limits each tier's users get, built in (`free`, `premium`) or from
//! `[tiers.NAME]` tables, and which tier a token's claim selects.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::RelayConfig;

/// The limits of one tier. Every field is required in a `[tiers.NAME]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierLimits {
    /// Requests a user may start per minute (a token bucket: this many at once, refilled
    /// evenly over the minute).
    pub requests_per_minute: u32,
    /// Requests a user may have in flight at once, over all devices.
    pub concurrent_requests: u32,
    /// Devices a user may have connected at once.
    pub devices: u32,
    /// Largest request body, in bytes.
    pub max_body_bytes: u64,
    /// Longest a response may stream; then the relay ends it.
    #[serde(with = "humantime_serde")]
    pub max_stream: Duration,
}

impl TierLimits {
    /// `free`: one device, a person's interactive use.
    pub fn free() -> Self {
        TierLimits {
            requests_per_minute: 60,
            concurrent_requests: 4,
            devices: 1,
            // 8 MiB: a chat with an image or two.
            max_body_bytes: 8 * 1024 * 1024,
            max_stream: Duration::from_secs(30 * 60),
        }
    }

    /// `premium`: several devices, tools and agents.
    pub fn premium() -> Self {
        TierLimits {
            requests_per_minute: 600,
            concurrent_requests: 32,
            devices: 10,
            // 32 MiB: room for several images in a multimodal request.
            max_body_bytes: 32 * 1024 * 1024,
            max_stream: Duration::from_secs(4 * 3600),
        }
    }
}

pub(super) fn builtin_tiers() -> BTreeMap<String, TierLimits> {
    BTreeMap::from([
        ("free".to_owned(), TierLimits::free()),
        ("premium".to_owned(), TierLimits::premium()),
    ])
}

/// `[tiers]` from the file, laid over the built-in tiers.
pub(super) fn tiers_over_builtins<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<BTreeMap<String, TierLimits>, D::Error> {
    let mut tiers = builtin_tiers();
    tiers.extend(BTreeMap::<String, TierLimits>::deserialize(deserializer)?);
    Ok(tiers)
}

/// Limits used if the default tier were missing; `validate` refuses such a config, so this
/// only keeps `tier` total.
static FALLBACK_TIER: std::sync::LazyLock<TierLimits> = std::sync::LazyLock::new(TierLimits::free);

impl RelayConfig {
    /// The limits for a token's tier claim: its tier when configured, else the default tier.
    pub fn tier(&self, claimed: Option<&str>) -> (&str, &TierLimits) {
        if let Some((name, limits)) = claimed.and_then(|c| self.tiers.get_key_value(c)) {
            return (name, limits);
        }
        let limits = self
            .tiers
            .get(&self.default_tier)
            .unwrap_or_else(|| &FALLBACK_TIER);
        (&self.default_tier, limits)
    }
}

#[cfg(test)]
mod tests {
    use cloudllm_proto::Secret;

    use super::*;
    use crate::config::MIN_SECRET_BYTES;
    use crate::config::tests::parsed;

    #[test]
    fn tiers_extend_the_builtins_and_are_checked() {
        let mut config = parsed(
            "default_tier = \"team\"\n[tiers.team]\nrequests_per_minute = 100\nconcurrent_requests = 8\n\
             devices = 3\nmax_body_bytes = 1000\nmax_stream = \"1h\"\n",
        );
        config.secret = Some(Secret::new("x".repeat(MIN_SECRET_BYTES)));
        assert!(config.validate().is_ok());
        assert_eq!(
            config.tiers.keys().collect::<Vec<_>>(),
            ["free", "premium", "team"]
        );
        assert_eq!(config.tier(Some("premium")).0, "premium");
        assert_eq!(
            config.tier(Some("platinum")).0,
            "team",
            "unknown tiers get the default"
        );
        assert_eq!(config.tier(None).1.devices, 3);

        // A table must name every limit.
        let err =
            toml::from_str::<RelayConfig>("[tiers.x]\nrequests_per_minute = 1\n").unwrap_err();
        assert!(err.to_string().contains("missing field"), "{err}");
        let zero = parsed(
            "[tiers.free]\nrequests_per_minute = 0\nconcurrent_requests = 1\ndevices = 1\n\
             max_body_bytes = 1\nmax_stream = \"1s\"\n",
        );
        let mut zero = zero;
        zero.secret = Some(Secret::new("x".repeat(MIN_SECRET_BYTES)));
        let err = zero.validate().unwrap_err().to_string();
        assert!(err.contains("[tiers.free]"), "{err}");
        let mut missing = RelayConfig {
            default_tier: "gold".into(),
            secret: Some(Secret::new("x".repeat(MIN_SECRET_BYTES))),
            ..RelayConfig::default()
        };
        let err = missing.validate().unwrap_err().to_string();
        assert!(
            err.contains("gold") && err.contains("free, premium"),
            "{err}"
        );
        missing.default_tier = "free".into();
        missing.tier_claim = "app_metadata.".into();
        let err = missing.validate().unwrap_err().to_string();
        assert!(err.contains("tier_claim"), "{err}");
    }
}
