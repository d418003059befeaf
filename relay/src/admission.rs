//! Admission: the one path by which a caller gets in, whatever the route — first the client's
//! address and its failure budget, then the token, then the tier.
//!
//! `/tunnel` (agent tokens) and `/api/*`, `/v1/*` (client tokens) both start with
//! [`AppState::admit`], so an address locked out for guessing tokens, a forged or expired
//! token, and a token's tier are handled the same way on every route, counted in the same
//! metrics and written to the same audit log. What the tier then bounds is the route's own:
//! requests per minute and in flight for the API ([`crate::limits`]), devices and open tunnels
//! for a tunnel ([`crate::tunnel`]). A refusal by a limit is answered by
//! [`AppState::too_many`], in the shape the route's clients read.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request};
use axum::response::Response;
use http::{HeaderMap, StatusCode};

use crate::AppState;
use crate::auth::{self, Identity, Scope};
use crate::client_addr::client_ip;
use crate::config::TierLimits;
use crate::limits::Refusal;

/// Why a caller was turned away by [`AppState::authenticate`].
pub(crate) enum Denied {
    /// Over the address's failure budget: 429 with `Retry-After`.
    Limited(Refusal),
    /// The credentials: 401, or 403 for the wrong scope.
    Auth(auth::AuthError),
}

/// A caller that passed admission: who it is, under which tier, and from where.
pub(crate) struct Caller<'a> {
    /// The verified token's user and claims.
    pub(crate) identity: Identity,
    /// The tier's name: the token's tier claim when configured, else `default_tier`.
    pub(crate) tier_name: &'a str,
    /// The tier's limits.
    pub(crate) tier: &'a TierLimits,
}

impl AppState {
    /// The client's address: the peer's, or the one a trusted proxy names for it.
    pub(crate) fn client_addr(&self, req: &Request) -> Option<IpAddr> {
        let peer = req
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0);
        client_ip(peer, req.headers(), &self.config.trusted_proxies)
    }

    /// Admits a request from `addr` on `route` (`api` or `tunnel`) that needs scope `need`:
    /// the address's failure budget and the token ([`AppState::authenticate`]), then the
    /// tier the token names.
    pub(crate) async fn admit(
        &self,
        headers: &HeaderMap,
        addr: Option<IpAddr>,
        need: Scope,
        route: &'static str,
    ) -> Result<Caller<'_>, Denied> {
        let identity = self.authenticate(headers, addr, need, route).await?;
        let (tier_name, tier) = self.config.tier(identity.tier.as_deref());
        Ok(Caller {
            identity,
            tier_name,
            tier,
        })
    }

    /// Authenticates a request from `addr` on `route` (`api` or `tunnel`) that needs scope
    /// `need`, with the per-address brute-force protection.
    ///
    /// A valid token always passes, even from an address over its failure budget: the budget
    /// counts failures and must not lock out the users behind a shared address (a NAT, a
    /// company proxy) because one of them, or anyone else there, sends bad tokens. A request from
    /// such an address that does not authenticate gets 429 instead of 401, is not counted again,
    /// and its token is checked against cached keys only, so made-up key ids from it never make
    /// the relay fetch the identity provider's keys.
    pub(crate) async fn authenticate(
        &self,
        headers: &HeaderMap,
        addr: Option<IpAddr>,
        need: Scope,
        route: &'static str,
    ) -> Result<Identity, Denied> {
        let blocked = addr.and_then(|ip| self.limits.blocked(ip));
        let fetch = match blocked {
            Some(_) => auth::KeyFetch::CachedOnly,
            None => auth::KeyFetch::Allowed,
        };
        match (
            self.keys.authenticate_with(headers, need, fetch).await,
            blocked,
        ) {
            (Ok(identity), _) => Ok(identity),
            (Err(_), Some(refusal)) => Err(Denied::Limited(refusal)),
            (Err(err), None) => Err(self.auth_failed(addr, route, err)),
        }
    }

    /// Records a failed authentication from `addr` on `route` (metrics, audit log, the
    /// address's failure budget) and says how to answer it: 429 once the budget is spent.
    pub(crate) fn auth_failed(
        &self,
        addr: Option<IpAddr>,
        route: &'static str,
        err: auth::AuthError,
    ) -> Denied {
        self.metrics.auth_failed(route);
        self.audit.record(crate::audit::Event::AuthFailure {
            reason: err.to_string(),
            route,
            addr,
        });
        match addr.and_then(|ip| self.limits.auth_failed(ip)) {
            Some(refusal) => Denied::Limited(refusal),
            None => Denied::Auth(err),
        }
    }

    /// Answers a request refused by a limit: 429 with `Retry-After`, worded by `render`,
    /// counted in the metrics and the audit log.
    pub(crate) fn too_many(
        &self,
        refusal: &Refusal,
        user: Option<&str>,
        addr: Option<IpAddr>,
        route: &'static str,
        render: impl FnOnce(StatusCode, &str) -> Response,
    ) -> Response {
        self.record_refusal(user, addr, route, refusal);
        let mut response = render(StatusCode::TOO_MANY_REQUESTS, &refusal.message);
        refusal.set_retry_after(response.headers_mut());
        response
    }

    /// Counts a refusal by a limit in the metrics and the audit log.
    pub(crate) fn record_refusal(
        &self,
        user: Option<&str>,
        addr: Option<IpAddr>,
        route: &'static str,
        refusal: &Refusal,
    ) {
        self.metrics.limited(refusal.limit);
        self.audit.record(crate::audit::Event::RateLimited {
            user: user.map(str::to_owned),
            limit: refusal.limit.as_str(),
            route,
            addr,
        });
    }
}
