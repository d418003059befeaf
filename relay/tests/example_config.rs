//! `docs/relay.example.toml` is the relay's settings reference: as shipped (every line
//! commented) it loads to the defaults, and with every setting uncommented it loads, validates
//! and sets every field. A field added to `RelayConfig` stops this test from compiling until
//! the example (and this list) names it, so the docs cannot drift.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cloudllm_relay::RelayConfig;
use cloudllm_relay::config::TierLimits;

fn example() -> String {
    let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/relay.example.toml");
    std::fs::read_to_string(path).unwrap()
}

/// The example with its `# key = value` and `# [table]` lines turned into settings, leaving out
/// the `[supabase]` table: it is the alternative to `[jwks]`, and both at once are an error.
fn uncommented(text: &str, with_supabase: bool) -> String {
    let mut in_supabase = false;
    let mut out = Vec::new();
    for line in text.lines() {
        let setting = line.strip_prefix("# ").filter(|rest| is_setting(rest));
        if let Some(rest) = setting {
            if rest.starts_with('[') {
                in_supabase = rest == "[supabase]";
            }
            if in_supabase == with_supabase {
                out.push(rest);
                continue;
            }
        }
        out.push(line);
    }
    out.join("\n")
}

fn is_setting(line: &str) -> bool {
    let key = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    let table = |s: &str| {
        s.strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .is_some_and(|name| name.split('.').all(key))
    };
    table(line) || line.split_once(" = ").is_some_and(|(k, _)| key(k))
}

fn load(text: &str) -> RelayConfig {
    let dir = std::env::temp_dir().join(format!("cloudllm-relay-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("relay-{}.toml", text.len()));
    std::fs::write(&path, text).unwrap();
    let config = RelayConfig::load(&path).unwrap_or_else(|err| panic!("{err:#}"));
    let _ = std::fs::remove_file(&path);
    config
}

#[test]
fn as_shipped_it_is_all_defaults() {
    let shipped = load(&example());
    let defaults = RelayConfig::default();
    assert_eq!(shipped.listen, defaults.listen);
    assert_eq!(shipped.tiers, defaults.tiers);
    assert!(shipped.secret.is_none() && shipped.jwks.is_none());
}

#[test]
fn every_setting_is_named_and_loads() {
    let mut config = load(&uncommented(&example(), false));
    // Everything validates but the certificate files, which exist only on the operator's machine.
    let tls_files = config.tls.take();
    // And the cluster's secret file, likewise.
    let cluster_table = config.cluster.take();
    config.validate().unwrap_or_else(|err| panic!("{err:#}"));
    config.tls = tls_files;
    config.cluster = cluster_table;
    let defaults = RelayConfig::default();
    // Exhaustive on purpose: a new field is a compile error here until it is documented.
    let RelayConfig {
        listen,
        secret,
        jwks,
        login,
        supabase: _, // checked below: the alternative to [jwks]
        implicit_scopes,
        tier_claim,
        default_tier,
        tiers,
        auth_failures_per_minute,
        trusted_proxies,
        max_unauthenticated_connections_per_address,
        max_unauthenticated_connections,
        metrics_listen,
        tcp_keepalive,
        ping_interval,
        ping_timeout,
        session_idle,
        shutdown_grace,
        client_read_timeout,
        token_grace,
        audit_log,
        tls,
        web_url,
        allowed_origins,
        web_login,
        cluster,
        threads,
    } = config;
    for (name, set) in [
        ("secret", secret.is_some()),
        ("[jwks]", jwks.is_some()),
        ("[login]", login.is_some()),
        ("implicit_scopes", implicit_scopes.is_some()),
        ("trusted_proxies", !trusted_proxies.is_empty()),
        ("metrics_listen", metrics_listen.is_some()),
        ("audit_log", audit_log.is_some()),
        ("[tls]", tls.is_some()),
        ("web_url", web_url.is_some()),
        ("allowed_origins", !allowed_origins.is_empty()),
        ("[web_login]", web_login.is_some()),
        ("[cluster]", cluster.is_some()),
    ] {
        assert!(set, "the example does not set {name}");
    }
    // The defaults the example states are the code's.
    assert_eq!(listen, defaults.listen);
    assert_eq!(tier_claim, defaults.tier_claim);
    assert_eq!(default_tier, defaults.default_tier);
    assert_eq!(tiers, defaults.tiers);
    assert_eq!(tiers["free"], TierLimits::free());
    assert_eq!(tiers["premium"], TierLimits::premium());
    assert_eq!(auth_failures_per_minute, defaults.auth_failures_per_minute);
    assert_eq!(
        max_unauthenticated_connections_per_address,
        defaults.max_unauthenticated_connections_per_address
    );
    assert_eq!(
        max_unauthenticated_connections,
        defaults.max_unauthenticated_connections
    );
    assert_eq!(tcp_keepalive, defaults.tcp_keepalive);
    assert_eq!(ping_interval, defaults.ping_interval);
    assert_eq!(ping_timeout, defaults.ping_timeout);
    assert_eq!(session_idle, defaults.session_idle);
    assert_eq!(shutdown_grace, defaults.shutdown_grace);
    assert_eq!(client_read_timeout, defaults.client_read_timeout);
    assert_eq!(token_grace, defaults.token_grace);
    assert_eq!(threads, defaults.threads);
    let cluster = cluster.unwrap();
    assert_eq!(
        cluster.redis_url().unwrap(),
        "rediss://:password@redis.internal:6380/0"
    );
    // Exhaustive too: a new [cluster] key is a compile error here until it is documented.
    let cloudllm_relay::config::ClusterConfig {
        redis_url: _,
        node,
        peer_listen: _,
        advertise,
        secret_file: _,
        ca_file,
        presence_ttl,
    } = cluster;
    assert_eq!(node, "relay-1");
    assert!(advertise.is_some() && ca_file.is_some());
    assert_eq!(presence_ttl, Duration::from_secs(30));
    let jwks = jwks.unwrap();
    assert_eq!(jwks.refresh, Duration::from_secs(600));
    assert_eq!(jwks.refetch_min, Duration::from_secs(30));
}

#[test]
fn the_supabase_alternative_loads() {
    let config = load(&uncommented(&example(), true));
    let supabase = config.supabase.expect("[supabase] is in the example");
    assert_eq!(supabase.url.as_str(), "https://abcdefgh.supabase.co/");
    // The preset fills in the key set and the tier claim.
    assert!(config.jwks.is_some());
    assert_eq!(config.tier_claim, "app_metadata.tier");
}
