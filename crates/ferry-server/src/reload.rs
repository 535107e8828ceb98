//! SIGHUP: the configuration file is read again and applied without a restart.
//!
//! Its declarations: new channels, subscriptions and derived channels are created, changed
//! settings applied, and what cannot change (a filter, a derived channel) refused with a log
//! line that says why. Nothing is deleted. The principals and `[auth]` are swapped whole, and
//! the TLS certificate, key and client CA read again (if they are bad, the ones in use stay):
//! both apply to calls and connections that arrive from then on. Other keys (`[server]`,
//! `[storage]`, `[limits]`, `[metrics]`) take effect only at a restart, which the log says.

use std::path::PathBuf;

use ferry_core::Broker;
use ferry_core::broker::Action;
use tokio_util::sync::CancellationToken;

use crate::Config;
use crate::auth::{Access, Gate};
use crate::tls::Tls;

/// What a reload changes in the running daemon.
pub struct Live {
    /// Its declarations go to the broker.
    pub broker: Broker,
    /// The principals table in force.
    pub gate: Gate,
    /// The TLS acceptor in force, if the daemon serves TLS.
    pub tls: Option<Tls>,
}

/// Applies each SIGHUP `hangup` receives until `stop`. The handler is installed by the caller
/// before the store opens, so that a SIGHUP never finds the default action (which ends the
/// process). `serving` is the configuration the daemon started with, environment and flags
/// applied.
#[cfg(unix)]
pub async fn on_hangup(
    mut hangup: tokio::signal::unix::Signal,
    path: Option<PathBuf>,
    serving: Config,
    live: Live,
    stop: CancellationToken,
) {
    // Compared as the file says, before the environment and flags that override it.
    let mut running = path
        .as_deref()
        .and_then(|path| Config::load(path).ok())
        .unwrap_or_else(|| serving.clone());
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
        if let Some(config) = reload(path, &running, &serving, &live).await {
            running = config;
        }
    }
}

/// Refuses a file that would leave the running daemon open to strangers: one that drops the
/// principals or client certificates that made its address safe to serve on.
fn check_exposure(config: &Config, serving: &Config) -> Result<(), String> {
    let mut effective = config.clone();
    effective.server.listen = serving.server.listen;
    effective.server.allow_unauthenticated = serving.server.allow_unauthenticated;
    effective.metrics = serving.metrics.clone();
    // Turning TLS on or off takes a restart: until then, the running mode stays.
    if config.server.tls.is_some() != serving.server.tls.is_some() {
        effective.server.tls = serving.server.tls.clone();
    }
    effective.check_exposure()
}

/// Swaps the principals and reads the TLS files again; nothing changes if either is refused.
fn apply_access(config: &Config, serving: &Config, live: &Live) -> Result<(), String> {
    let access = Access::of(config)?;
    let principals = config.all_principals().len();
    if let (Some(tls), Some(files), true) =
        (&live.tls, &config.server.tls, serving.server.tls.is_some())
    {
        tls.reload(files)?;
        tracing::info!("reload: TLS certificate, key and client CA read again");
    }
    if live.gate.current().is_enforced() && !access.is_enforced() {
        tracing::warn!(
            "reload: no principal is declared any more: every caller may now do everything"
        );
    }
    crate::warn_of_clear_tokens(serving, &access);
    live.gate.replace(access);
    tracing::info!(principals, "reload: principals and [auth] in force");
    Ok(())
}

/// Reads the file again and applies it; the new configuration, if it was good.
pub async fn reload(
    path: &std::path::Path,
    running: &Config,
    serving: &Config,
    live: &Live,
) -> Option<Config> {
    let config = match Config::load(path) {
        Ok(mut config) => {
            config.admin_from_environment = serving.admin_from_environment.clone();
            config
        }
        Err(e) => {
            tracing::error!(error = %e, "reload refused: the file is bad; the running configuration stays");
            return None;
        }
    };
    let applied =
        check_exposure(&config, serving).and_then(|()| apply_access(&config, serving, live));
    if let Err(e) = applied {
        tracing::error!(error = %e, "reload refused: the running configuration stays");
        return None;
    }
    warn_of_restart(&config, running);
    let steps = live
        .broker
        .reload(&config.declarations(), &config.derived_specs())
        .await;
    let (created, changed, refused) = log_steps(&steps);
    tracing::info!(file = %path.display(), created, changed, refused, "configuration reloaded");
    Some(config)
}

/// Says which changed sections take effect only at a restart.
fn warn_of_restart(config: &Config, running: &Config) {
    // TLS files are read again on every reload; only turning TLS on or off takes a restart.
    let server_changed = {
        let (mut new, mut old) = (config.server.clone(), running.server.clone());
        new.tls = new.tls.map(|_| placeholder_tls());
        old.tls = old.tls.map(|_| placeholder_tls());
        new != old
    };
    let restart: Vec<&str> = [
        ("[server]", server_changed),
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
}

/// Logs what the declarations' reload did; how many it created, changed and refused.
fn log_steps(steps: &[ferry_core::broker::Step]) -> (usize, usize, usize) {
    let (mut created, mut changed, mut refused) = (0, 0, 0);
    for step in steps {
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
    (created, changed, refused)
}

fn placeholder_tls() -> crate::config::TlsConfig {
    crate::config::TlsConfig {
        cert_file: PathBuf::new(),
        key_file: PathBuf::new(),
        client_ca_file: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reload_may_not_leave_an_exposed_broker_open() {
        let hash = crate::auth::token::hash("a token long enough to be used");
        let principals = format!("[[principals]]\nname = \"app\"\ntokens = [\"{hash}\"]\n");
        let exposed = "[server]\nlisten = \"0.0.0.0:50051\"\n";
        let serving = Config::parse(&format!("{exposed}{principals}"), "f").unwrap();
        // The file now says loopback (a restart would apply that), but the daemon listens
        // where it listens: dropping its principals would open it to everyone.
        let dropped = Config::parse("[server]\nlisten = \"127.0.0.1:50051\"\n", "f").unwrap();
        let refused = check_exposure(&dropped, &serving).unwrap_err();
        assert!(refused.contains("0.0.0.0:50051"), "{refused}");
        let kept = Config::parse(&principals, "f").unwrap();
        assert!(check_exposure(&kept, &serving).is_ok());
        let mut from_environment = serving.clone();
        from_environment.principals.clear();
        from_environment.add_admin_token(&hash).unwrap();
        let mut reloaded = dropped.clone();
        reloaded.admin_from_environment = from_environment.admin_from_environment.clone();
        assert!(check_exposure(&reloaded, &from_environment).is_ok());
    }
}
