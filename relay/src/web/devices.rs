//! The page's two small read endpoints: `GET /cloudllm/web` (how the page may sign in, public
//! like `/.well-known/cloudllm`) and `GET /cloudllm/devices` (the caller's connected devices and
//! the models each has, which the merged `/api/tags` cannot say; in a cluster, on every node).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::{json, signed_in};
use crate::AppState;
use crate::auth::Scope;
use crate::config::RelayConfig;

/// The page's sign-in settings, `GET /cloudllm/web` (public, like `/.well-known/cloudllm`).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WebConfig {
    /// OpenID Connect in the page, with `[login]` and `[web_login]`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oidc: Option<WebOidc>,
}

/// The provider and client the page signs in with.
#[derive(Debug, Serialize, Deserialize)]
pub struct WebOidc {
    /// The provider's issuer URL.
    pub issuer: String,
    /// The page's client id.
    pub client_id: String,
    /// The scopes it asks for.
    pub scopes: Vec<String>,
}

/// The [`WebConfig`] of `config`.
pub fn web_config_of(config: &RelayConfig) -> WebConfig {
    let oidc = match (&config.login, &config.web_login) {
        (Some(login), Some(web)) => Some(WebOidc {
            issuer: login.issuer.clone(),
            client_id: web.client_id.clone(),
            scopes: web.scopes.clone(),
        }),
        _ => None,
    };
    WebConfig { oidc }
}

pub(super) async fn web_config(State(state): State<Arc<AppState>>) -> Response {
    json(&web_config_of(&state.config))
}

/// One connected device, as `GET /cloudllm/devices` lists it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device's name (what `x-cloudllm-device` takes).
    pub name: String,
    /// Its stable id (also accepted by `x-cloudllm-device`).
    pub id: String,
    /// The models its Ollama has, as the daemon last reported them.
    pub models: Vec<String>,
    /// Requests it is serving now.
    pub busy: usize,
}

/// The body of `GET /cloudllm/devices`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Devices {
    /// The caller's connected devices, by name.
    pub devices: Vec<DeviceInfo>,
}

/// `GET /cloudllm/devices` with a client token: the caller's connected devices and their models.
pub(super) async fn devices(State(state): State<Arc<AppState>>, mut req: Request) -> Response {
    let identity = match signed_in(&state, &mut req, Scope::Client).await {
        Ok(identity) => identity,
        Err(refused) => return refused,
    };
    let mut list: Vec<DeviceInfo> = state
        .registry
        .devices_of(&identity.user)
        .iter()
        .map(|device| DeviceInfo {
            name: device.name.clone(),
            id: device.id.clone(),
            models: device.models(),
            busy: device.in_flight(),
        })
        .collect();
    // In a cluster, the devices held by the other nodes too, as their presence records say.
    if let Some(cluster) = &state.cluster {
        list.extend(
            cluster
                .remote_devices(&identity.user)
                .await
                .into_iter()
                .map(|device| DeviceInfo {
                    name: device.name,
                    id: device.id,
                    models: device.models,
                    busy: device.load,
                }),
        );
    }
    list.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
    json(&Devices { devices: list })
}
