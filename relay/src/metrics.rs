//! The relay's metrics, served as Prometheus text on `/metrics`.
//!
//! Counts and timings only — never a user, device, model or path label, so the series stay
//! few and carry nothing personal: connected devices, requests in flight and by status, bytes
//! each way, request duration and time to first byte, authentication failures by route,
//! refusals by limit, and unauthenticated connections with those the connection caps closed.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label: an HTTP status code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// The status, e.g. 200.
    pub status: u16,
}

/// Label: bytes from users (`in`) or to them (`out`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `in` or `out`.
    pub direction: &'static str,
}

/// Label: where an authentication failed (`api` or `tunnel`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// `api` or `tunnel`.
    pub route: &'static str,
}

/// Label: which limit refused a request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    /// See [`crate::limits::Limit::as_str`].
    pub limit: &'static str,
}

/// Label: which connection cap closed a connection.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CapLabel {
    /// See [`crate::connections::Cap::as_str`].
    pub cap: &'static str,
}

/// Every metric the relay keeps.
pub struct Metrics {
    registry: Registry,
    /// Connected devices (set when scraped).
    pub devices: Gauge,
    /// API requests whose response has not ended.
    pub in_flight: Gauge,
    /// API requests by response status, counted when the response ends.
    pub requests: Family<StatusLabel, Counter>,
    /// Body bytes of API requests and responses.
    pub bytes: Family<DirectionLabel, Counter>,
    /// Seconds from a request's arrival to the end of its response.
    pub duration: Histogram,
    /// Seconds from a request's arrival to the first byte of its response body.
    pub first_byte: Histogram,
    /// Failed authentications.
    pub auth_failures: Family<RouteLabel, Counter>,
    /// Requests and tunnels refused by a limit.
    pub rate_limited: Family<LimitLabel, Counter>,
    /// Tunnels with an HTTP/2 session open (the others are idle: their WebSocket only).
    pub sessions_open: Gauge,
    /// HTTP/2 sessions opened on tunnels.
    pub sessions: Counter,
    /// Tunnels open: handshaking, registered, and replaced ones still closing.
    pub tunnels_open: Gauge,
    /// Lanes open: busy tunnels' extra connections, one per relay thread.
    pub lanes_open: Gauge,
    /// Connections that have not carried an admitted request yet (TLS handshakes included).
    pub unauthenticated: Gauge,
    /// New connections closed at accept because a cap on unauthenticated connections was full.
    pub connections_refused: Family<CapLabel, Counter>,
    /// Unauthenticated connections closed to make room for a newer one under a full cap.
    pub connections_evicted: Family<CapLabel, Counter>,
    /// Cluster: requests this node forwarded to the node holding the device.
    pub forwarded_out: Counter,
    /// Cluster: requests other nodes forwarded to this one.
    pub forwarded_in: Counter,
    /// Cluster: node-to-node requests refused (forged, stale or unsigned).
    pub forwarded_refused: Counter,
    /// Cluster: seconds from sending a request to another node to its response's headers.
    pub hop_latency: Histogram,
    /// Cluster: presence records written, refreshed or removed in Redis.
    pub presence_ops: Counter,
    /// Cluster: Redis/Valkey commands that failed.
    pub redis_errors: Counter,
    /// Cluster: 1 while Redis/Valkey cannot be reached (the node serves its own tunnels only).
    pub cluster_degraded: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        // 1 ms to ~9 min in factors of 2.5: from a cached model list to a long generation.
        let buckets = || exponential_buckets(0.001, 2.5, 15);
        let metrics = Metrics {
            registry: Registry::default(),
            devices: Gauge::default(),
            in_flight: Gauge::default(),
            requests: Family::default(),
            bytes: Family::default(),
            duration: Histogram::new(buckets()),
            first_byte: Histogram::new(buckets()),
            auth_failures: Family::default(),
            rate_limited: Family::default(),
            sessions_open: Gauge::default(),
            sessions: Counter::default(),
            tunnels_open: Gauge::default(),
            lanes_open: Gauge::default(),
            unauthenticated: Gauge::default(),
            connections_refused: Family::default(),
            connections_evicted: Family::default(),
            forwarded_out: Counter::default(),
            forwarded_in: Counter::default(),
            forwarded_refused: Counter::default(),
            // 0.1 ms to ~10 s in factors of 2.5: a hop on one network is well under a millisecond.
            hop_latency: Histogram::new(exponential_buckets(0.0001, 2.5, 13)),
            presence_ops: Counter::default(),
            redis_errors: Counter::default(),
            cluster_degraded: Gauge::default(),
        };
        let mut registry = Registry::with_prefix("cloudllm");
        registry.register(
            "devices_connected",
            "Devices with a live tunnel",
            metrics.devices.clone(),
        );
        registry.register(
            "requests_in_flight",
            "API requests whose response has not ended",
            metrics.in_flight.clone(),
        );
        registry.register(
            "requests",
            "API requests by response status",
            metrics.requests.clone(),
        );
        registry.register(
            "body_bytes",
            "Body bytes of API requests (in) and responses (out)",
            metrics.bytes.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to the end of its response",
            metrics.duration.clone(),
        );
        registry.register(
            "time_to_first_byte_seconds",
            "Time from a request's arrival to the first byte of its response body",
            metrics.first_byte.clone(),
        );
        registry.register(
            "auth_failures",
            "Failed authentications by route",
            metrics.auth_failures.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests and tunnels refused by a limit",
            metrics.rate_limited.clone(),
        );
        registry.register(
            "tunnel_sessions_open",
            "Tunnels with an HTTP/2 session open; the others are idle",
            metrics.sessions_open.clone(),
        );
        registry.register(
            "tunnel_sessions",
            "HTTP/2 sessions opened on tunnels",
            metrics.sessions.clone(),
        );
        registry.register(
            "tunnel_lanes_open",
            "Lanes open: busy tunnels' extra connections, one per relay thread",
            metrics.lanes_open.clone(),
        );
        registry.register(
            "tunnels_open",
            "Tunnels open: handshaking, registered, and replaced ones still closing",
            metrics.tunnels_open.clone(),
        );
        registry.register(
            "unauthenticated_connections",
            "Connections that have not carried an admitted request yet",
            metrics.unauthenticated.clone(),
        );
        registry.register(
            "connections_refused",
            "New connections closed at accept: a cap on unauthenticated connections was full",
            metrics.connections_refused.clone(),
        );
        registry.register(
            "connections_evicted",
            "Unauthenticated connections closed to make room for a newer one",
            metrics.connections_evicted.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }
}

impl Metrics {
    /// Adds the cluster's series (with `[cluster]` only: a single relay's metrics stay as
    /// they are).
    pub fn register_cluster(&mut self) {
        let registry = &mut self.registry;
        registry.register(
            "cluster_forwarded_out",
            "Requests forwarded to the node that holds the device",
            self.forwarded_out.clone(),
        );
        registry.register(
            "cluster_forwarded_in",
            "Requests other nodes forwarded to this one",
            self.forwarded_in.clone(),
        );
        registry.register(
            "cluster_forwarded_refused",
            "Node-to-node requests refused: forged, stale or unsigned",
            self.forwarded_refused.clone(),
        );
        registry.register(
            "cluster_hop_latency_seconds",
            "Time from forwarding a request to another node to its response headers",
            self.hop_latency.clone(),
        );
        registry.register(
            "cluster_presence_operations",
            "Presence records written, refreshed or removed in Redis",
            self.presence_ops.clone(),
        );
        registry.register(
            "cluster_redis_errors",
            "Redis/Valkey commands that failed",
            self.redis_errors.clone(),
        );
        registry.register(
            "cluster_degraded",
            "1 while Redis/Valkey cannot be reached: only this node's own tunnels serve",
            self.cluster_degraded.clone(),
        );
    }

    /// The metrics in the text exposition format.
    pub fn encode(&self, devices: usize) -> String {
        self.devices.set(i64::try_from(devices).unwrap_or(i64::MAX));
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// Counts a refusal by `limit`.
    pub fn limited(&self, limit: crate::limits::Limit) {
        self.rate_limited
            .get_or_create(&LimitLabel {
                limit: limit.as_str(),
            })
            .inc();
    }

    /// Counts a new connection closed at accept by `cap`.
    pub fn connection_refused(&self, cap: crate::connections::Cap) {
        self.connections_refused
            .get_or_create(&CapLabel { cap: cap.as_str() })
            .inc();
    }

    /// Counts an unauthenticated connection closed by `cap` to make room.
    pub fn connection_evicted(&self, cap: crate::connections::Cap) {
        self.connections_evicted
            .get_or_create(&CapLabel { cap: cap.as_str() })
            .inc();
    }

    /// Counts an HTTP/2 session as open on a tunnel until the returned guard drops.
    pub fn session_open(&self) -> SessionOpen {
        self.sessions.inc();
        self.sessions_open.inc();
        SessionOpen(self.sessions_open.clone())
    }

    /// Counts a lane as open until the returned guard drops.
    pub fn lane_open(&self) -> SessionOpen {
        self.lanes_open.inc();
        SessionOpen(self.lanes_open.clone())
    }

    /// Counts a tunnel as open until the returned guard drops.
    pub fn tunnel_open(&self) -> SessionOpen {
        self.tunnels_open.inc();
        SessionOpen(self.tunnels_open.clone())
    }

    /// Counts a failed authentication on `route`.
    pub fn auth_failed(&self, route: &'static str) {
        self.auth_failures
            .get_or_create(&RouteLabel { route })
            .inc();
    }
}

/// One open HTTP/2 session in [`Metrics::sessions_open`] (or one open tunnel in
/// [`Metrics::tunnels_open`]); dropping it ends the count.
pub struct SessionOpen(Gauge);

impl Drop for SessionOpen {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Content type of [`Metrics::encode`]'s output (OpenMetrics text, which Prometheus reads).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_metrics_name_every_series() {
        let metrics = Metrics::default();
        metrics
            .requests
            .get_or_create(&StatusLabel { status: 200 })
            .inc();
        metrics.limited(crate::limits::Limit::Devices);
        metrics.auth_failed("api");
        metrics.first_byte.observe(0.002);
        let text = metrics.encode(3);
        for line in [
            "cloudllm_devices_connected 3",
            "cloudllm_requests_total{status=\"200\"} 1",
            "cloudllm_rate_limited_total{limit=\"devices\"} 1",
            "cloudllm_auth_failures_total{route=\"api\"} 1",
            "cloudllm_time_to_first_byte_seconds_count 1",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
