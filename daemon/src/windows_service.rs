//! Running `cloudllmd` under the Windows service control manager (`cloudllmd --service`,
//! registered by `cloudllm service install`): the `windows-service` crate's dispatcher calls
//! [`service_main`], which reports the service's state to the SCM and turns its Stop and
//! Shutdown controls into the same graceful shutdown as Ctrl-C (in-flight requests drain within
//! `shutdown_grace`).
//!
//! Compiled on Windows only.

use std::ffi::OsString;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use windows_service::service::{
    ServiceControl, ServiceControlAccept, ServiceExitCode, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::{define_windows_service, service_dispatcher};

use crate::DaemonConfig;

/// The service's name, as `cloudllm service install` registers it.
pub const SERVICE_NAME: &str = "cloudllmd";

/// Added to `shutdown_grace` in the stop wait hint: time to close the socket and report back.
const STOP_MARGIN: Duration = Duration::from_secs(5);

/// How long the SCM should wait for the start: binding the socket and loading credentials.
const START_HINT: Duration = Duration::from_secs(10);

/// The config `run` was given, for the service main that the SCM calls without arguments of ours.
static CONFIG: OnceLock<DaemonConfig> = OnceLock::new();

define_windows_service!(ffi_service_main, service_main);

/// Hands this thread to the service control manager and runs the daemon as the service
/// [`SERVICE_NAME`] until the SCM stops it. Fails at once when the process was not started by
/// the SCM (run `cloudllmd` without `--service` by hand).
pub fn run(config: DaemonConfig) -> anyhow::Result<()> {
    let _ = CONFIG.set(config);
    service_dispatcher::start(SERVICE_NAME, ffi_service_main).context(
        "not started by the Windows service control manager (run cloudllmd without --service)",
    )
}

fn service_main(_arguments: Vec<OsString>) {
    if let Err(err) = run_service() {
        tracing::error!(error = %format!("{err:#}"), "the Windows service failed");
    }
}

fn run_service() -> anyhow::Result<()> {
    let config = CONFIG.get().cloned().context("no configuration")?;
    let grace = config.shutdown_grace;
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let handler = move |control| match control {
        ServiceControl::Stop | ServiceControl::Shutdown | ServiceControl::Preshutdown => {
            stop.cancel();
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    };
    let status = service_control_handler::register(SERVICE_NAME, handler)
        .context("registering the service control handler")?;
    let report = move |state: ServiceState, exit: u32, hint: Duration| {
        let accepted = if state == ServiceState::Running {
            ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN
        } else {
            ServiceControlAccept::empty()
        };
        let _ = status.set_service_status(ServiceStatus {
            service_type: ServiceType::OWN_PROCESS,
            current_state: state,
            controls_accepted: accepted,
            exit_code: ServiceExitCode::Win32(exit),
            checkpoint: 0,
            wait_hint: hint,
            process_id: None,
        });
    };
    report(ServiceState::StartPending, 0, START_HINT);
    let result = tokio::runtime::Runtime::new()
        .context("starting the runtime")
        .and_then(|runtime| {
            runtime.block_on(async {
                let draining = shutdown.clone();
                tokio::spawn(async move {
                    draining.cancelled().await;
                    report(ServiceState::StopPending, 0, grace + STOP_MARGIN);
                });
                report(ServiceState::Running, 0, Duration::ZERO);
                crate::run(config, shutdown).await
            })
        });
    // ERROR_SERVICE_SPECIFIC_ERROR would need a code of ours; 1 (ERROR_INVALID_FUNCTION) says
    // "failed", and the reason is in the daemon's log.
    report(
        ServiceState::Stopped,
        u32::from(result.is_err()),
        Duration::ZERO,
    );
    result
}
