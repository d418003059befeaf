//! What one API request costs and leaves behind: its metrics, its audit line, and its place in
//! its tier's limits for as long as its response streams.
//!
//! The record is kept until the response body ends or the caller goes away, so bytes, duration
//! and the first byte's delay are those the caller saw; the tier's `max_stream` ends a response
//! that streams for longer, and its concurrency slot is given back only then.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Context;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use tracing::info;

use super::body::{Meter, Metered};
use crate::AppState;
use crate::audit::{Audit, Event};
use crate::limits::Admitted;
use crate::metrics::{DirectionLabel, Metrics, StatusLabel};

/// The device that served a response (a response extension, for the audit log).
#[derive(Clone)]
pub(super) struct ServedBy(pub(super) String);

/// The model a request named, when the relay read it (a response extension, for the audit
/// log).
#[derive(Clone)]
pub(super) struct Model(pub(super) String);

/// The audit log's fields of one request.
pub(super) struct AuditFields {
    pub(super) request_id: String,
    pub(super) user: String,
    pub(super) device: Option<String>,
    pub(super) model: Option<String>,
    pub(super) method: String,
    pub(super) path: String,
    pub(super) addr: Option<IpAddr>,
}

/// One request's metrics and audit line, recorded when dropped: when its response body ends or
/// the caller goes away.
pub(super) struct RequestRecord {
    metrics: Arc<Metrics>,
    audit_log: Audit,
    /// What the audit line says of the request, when the audit log is on.
    pub(super) audit: Option<AuditFields>,
    /// The response's status.
    pub(super) status: u16,
    /// Bytes of the request body passed to the device so far.
    pub(super) received: Arc<AtomicU64>,
    sent: u64,
    started: tokio::time::Instant,
    first_byte: bool,
}

impl RequestRecord {
    /// A record of a request that came in at `started`; it counts as in flight until dropped.
    pub(super) fn new(state: &AppState, started: tokio::time::Instant) -> Self {
        state.metrics.in_flight.inc();
        RequestRecord {
            metrics: state.metrics.clone(),
            audit_log: state.audit.clone(),
            audit: None,
            status: 0,
            received: Arc::default(),
            sent: 0,
            started,
            first_byte: false,
        }
    }

    fn sent(&mut self, bytes: usize) {
        if !self.first_byte && bytes > 0 {
            self.first_byte = true;
            self.metrics
                .first_byte
                .observe(self.started.elapsed().as_secs_f64());
        }
        self.sent += bytes as u64;
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let elapsed = self.started.elapsed();
        let received = self.received.load(Ordering::Relaxed);
        let metrics = &self.metrics;
        metrics.in_flight.dec();
        metrics
            .requests
            .get_or_create(&StatusLabel {
                status: self.status,
            })
            .inc();
        metrics.duration.observe(elapsed.as_secs_f64());
        metrics
            .bytes
            .get_or_create(&DirectionLabel { direction: "in" })
            .inc_by(received);
        metrics
            .bytes
            .get_or_create(&DirectionLabel { direction: "out" })
            .inc_by(self.sent);
        if let Some(fields) = self.audit.take() {
            self.audit_log.record(Event::Request {
                request_id: fields.request_id,
                user: fields.user,
                device: fields.device,
                model: fields.model,
                method: fields.method,
                path: fields.path,
                status: self.status,
                bytes_in: received,
                bytes_out: self.sent,
                duration_ms: elapsed.as_millis() as u64,
                addr: fields.addr,
            });
        }
    }
}

/// A response body on its way to the caller: counts bytes and the first byte, holds the
/// request's place in its tier's concurrency limit, and ends the response once it has streamed
/// for the tier's `max_stream`.
pub(super) struct Tracked {
    deadline: Pin<Box<tokio::time::Sleep>>,
    max_stream: std::time::Duration,
    record: RequestRecord,
    _admitted: Admitted,
}

impl Tracked {
    /// `response` with its body tracked under `record`, holding `admitted` until it ends.
    pub(super) fn wrap(
        response: Response,
        record: RequestRecord,
        max_stream: std::time::Duration,
        admitted: Admitted,
    ) -> Response {
        response.map(|body| {
            let tracked = Tracked {
                deadline: Box::pin(tokio::time::sleep(max_stream)),
                max_stream,
                record,
                _admitted: admitted,
            };
            Body::new(Metered::metering(body, tracked))
        })
    }
}

impl Meter for Tracked {
    fn check(&mut self, cx: &mut Context<'_>) -> Result<(), axum::Error> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            info!(max_stream = ?self.max_stream, "response streamed for its tier's max_stream: ending it");
            return Err(axum::Error::new(format!(
                "response ended by the relay after {:?}, the tier's max_stream",
                self.max_stream
            )));
        }
        Ok(())
    }

    fn passing(&mut self, data: &Bytes, _: &mut Option<Body>) -> Result<(), axum::Error> {
        self.record.sent(data.len());
        Ok(())
    }
}
