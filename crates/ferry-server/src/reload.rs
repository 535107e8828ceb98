//! SIGHUP: the configuration file is read again and its declarations applied without a
//! restart: new channels, subscriptions and derived channels are created, changed settings
//! applied, and what cannot change (a filter, a derived channel) refused with a log line that
//! says why. Nothing is deleted. Keys outside the declarations (`[server]`, `[storage]`,
//! `[limits]`, `[metrics]`) take effect only at a restart, which the log says too.

use std::path::PathBuf;

use ferry_core::Broker;
use ferry_core::broker::Action;
use tokio_util::sync::CancellationToken;

use crate::Config;

/// Listens for SIGHUP until `stop`; installed before the daemon says it is ready, so that a
/// SIGHUP never finds the default action (which ends the process).
#[cfg(unix)]
pub fn on_hangup(
    path: Option<PathBuf>,
    running: Config,
    broker: Broker,
    stop: CancellationToken,
) -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = signal(SignalKind::hangup())?;
    Ok(async move {
        // Compared as the file says, before the environment and flags that override it.
        let mut running = path
            .as_deref()
            .and_then(|path| Config::load(path).ok())
            .unwrap_or(running);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                received = hangup.recv() => if received.is_none() { return },
            }
            let Some(path) = &path else {
                tracing::warn!(
                    "SIGHUP: the broker runs on the built-in configuration: no file to reload"
                );
                continue;
            };
            if let Some(config) = reload(path, &running, &broker).await {
                running = config;
            }
        }
    })
}

/// Reads the file again and applies its declarations; the new configuration, if it was good.
pub async fn reload(path: &std::path::Path, running: &Config, broker: &Broker) -> Option<Config> {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(e) => {
            tracing::error!(error = %e, "reload refused: the file is bad; the running configuration stays");
            return None;
        }
    };
    let restart: Vec<&str> = [
        ("[server]", config.server != running.server),
        ("[storage]", config.storage != running.storage),
        ("[limits]", config.limits != running.limits),
        ("[metrics]", config.metrics != running.metrics),
    ]
    .into_iter()
    .filter(|(_, changed)| *changed)
    .map(|(section, _)| section)
    .collect();
    if !restart.is_empty() {
        tracing::warn!(sections = %restart.join(" "), "reload: these changed and take effect only at a restart");
    }
    let steps = broker
        .reload(&config.declarations(), &config.derived_specs())
        .await;
    let (mut created, mut changed, mut refused) = (0, 0, 0);
    for step in &steps {
        let (object, detail) = (&step.object, &step.detail);
        match step.action {
            Action::Create => {
                created += 1;
                tracing::info!(%object, "reload: created");
            }
            Action::Change => {
                changed += 1;
                tracing::info!(%object, %detail, "reload: changed");
            }
            Action::Refuse => {
                refused += 1;
                tracing::warn!(%object, reason = %detail, "reload: refused");
            }
            Action::Keep => {}
        }
    }
    tracing::info!(file = %path.display(), created, changed, refused, "configuration reloaded");
    Some(config)
}
