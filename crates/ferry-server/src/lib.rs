//! Ferry's gRPC front end and the daemon's lifecycle.
//!
//! It maps the broker core onto the `ferry.v1` services ([`publisher`], [`subscriber`],
//! [`admin`]), converting at the edge (`convert`) and turning every broker error into one gRPC
//! status in one place ([`status`]). It also serves the standard health and reflection services,
//! loads the configuration ([`config`]) and runs the daemon from start-up to a clean shutdown
//! ([`serve`]). This is the only crate besides the generated one that knows gRPC.

pub mod activity;
pub mod admin;
pub mod auth;
pub mod config;
mod connections;
mod convert;
pub mod metrics;
pub mod publisher;
pub mod reload;
pub mod status;
pub mod subscriber;
mod throttle;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use ferry_core::{Broker, CoreError};
use ferry_proto::pb::{
    admin_server::AdminServer, publisher_server::PublisherServer,
    subscriber_server::SubscriberServer,
};
use std::pin::Pin;
use std::sync::Arc;

use auth::Guarded;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic::transport::server::Router;
use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};

pub use config::{Config, ConfigError};

/// For the fuzz target: decodes arbitrary bytes as a publish request and puts it through
/// everything the broker checks before it stores a batch. Nothing may panic.
#[cfg(fuzzing)]
pub fn fuzz_publish_request(bytes: &[u8]) {
    use prost::Message as _;
    let Ok(request) = ferry_proto::pb::PublishRequest::decode(bytes) else {
        return;
    };
    let _ = ferry_core::names::validate("channel", &request.channel);
    let _ = ferry_core::names::quote(&request.channel);
    let messages: Result<Vec<_>, _> = request
        .messages
        .into_iter()
        .map(convert::new_message)
        .collect();
    if let Ok(messages) = messages {
        let _ = ferry_core::Limits::default().check_batch(&messages);
    }
}

/// How long a graceful shutdown waits for open calls to finish before it stops waiting (the
/// store is closed and synced before): well within `docker stop`'s default 10 s, so that a
/// client that does not answer cannot get the broker killed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the health service re-checks the store.
const HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store could not be opened or recovered, or the declared channels not created.
    #[error("cannot start the broker: {0}")]
    Broker(#[from] CoreError),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not read the descriptors.
    #[error("cannot build the reflection service: {0}")]
    Reflection(String),
    /// The listening socket failed.
    #[error("listener failed: {0}")]
    Io(#[from] std::io::Error),
    /// The TLS certificate, key or client CA could not be read.
    #[error("{0}")]
    Tls(String),
    /// The principals could not be read.
    #[error("{0}")]
    Auth(String),
}

/// The server's routes, behind its one layer.
type Routes = Router<tower_layer::Stack<status::TransportStatusLayer, tower_layer::Identity>>;

/// What the gRPC services are built over.
struct Services<'a> {
    broker: &'a Broker,
    stop: &'a CancellationToken,
    activity: &'a Arc<activity::Activity>,
    gate: &'a auth::Gate,
}

impl Services<'_> {
    /// Every service, each behind its authenticator, with the server's limits.
    fn router(
        &self,
        config: &Config,
        health: HealthServer<impl Health>,
    ) -> Result<Routes, ServeError> {
        let seen = Arc::new(auth::certificate::Seen::default());
        let guard = |guarded| auth::Authenticator::new(self.gate.clone(), guarded, seen.clone());
        // Generic tools (grpcurl, grpcui, Postman) speak either version of the reflection
        // protocol.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(ferry_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection()
            .build_v1()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;
        let limits = config.broker_options().limits;
        // Room for a whole batch with its framing (a message's protobuf framing, attributes
        // above all, can be as large as its counted size); the broker's own check names the
        // real limit.
        let max_request = limits.max_batch_bytes * 2 + (1 << 20);
        let publisher = PublisherServer::new(publisher::PublisherService::new(
            self.broker.clone(),
            self.stop.clone(),
            max_request,
            self.activity.clone(),
            self.gate.clone(),
        ))
        .max_decoding_message_size(max_request);
        let subscriber = SubscriberServer::new(subscriber::SubscriberService::new(
            self.broker.clone(),
            max_request,
            self.activity.clone(),
            self.gate.clone(),
        ))
        .max_decoding_message_size(max_request);
        let admin = AdminServer::new(admin::AdminService::new(
            self.broker.clone(),
            self.gate.clone(),
        ))
        .max_decoding_message_size(max_request);
        Ok(Server::builder()
            .max_concurrent_streams(config.limits.max_streams_per_connection)
            .http2_max_header_list_size(config.limits.max_header_bytes.0 as u32)
            .layer(status::TransportStatusLayer { max_request })
            .add_service(InterceptedService::new(health, guard(Guarded::Health)))
            .add_service(InterceptedService::new(
                reflection_v1,
                guard(Guarded::Reflection),
            ))
            .add_service(InterceptedService::new(
                reflection_v1alpha,
                guard(Guarded::Reflection),
            ))
            .add_service(InterceptedService::new(publisher, guard(Guarded::Ferry)))
            .add_service(InterceptedService::new(subscriber, guard(Guarded::Ferry)))
            .add_service(InterceptedService::new(admin, guard(Guarded::Ferry))))
    }
}

/// Tokens sent in plaintext beyond loopback can be read off the network: allowed (the network
/// may be trusted), but said.
pub(crate) fn warn_of_clear_tokens(config: &Config, access: &auth::Access) {
    if access.has_tokens()
        && config.server.tls.is_none()
        && !config.server.listen.ip().is_loopback()
    {
        tracing::warn!(
            listen = %config.server.listen,
            "bearer tokens travel unencrypted: serve TLS ([server.tls]) so that they cannot be read off the network"
        );
    }
}

/// Runs the daemon on an already bound listener until `shutdown` resolves, then stops
/// accepting, ends every stream, commits what is queued, syncs the store and returns.
/// `ready` is called with the listen address once the store is open, recovery is done and the
/// declared channels exist, just before the first call is accepted.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let address = listener.local_addr()?;
    // Before the store opens, which may take a while: SIGHUP's default action would end the
    // daemon, even without a file to reload.
    #[cfg(unix)]
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    // Both are read before the store opens: a bad file must not leave a half-started broker.
    let tls = (config.server.tls.as_ref())
        .map(tls::Tls::load)
        .transpose()
        .map_err(ServeError::Tls)?;
    let gate = auth::Gate::new(auth::Access::of(&config).map_err(ServeError::Auth)?);
    warn_of_clear_tokens(&config, &gate.current());
    let broker = open_broker(&config).await?;

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::Serving).await;
    let stop = CancellationToken::new();
    let activity = std::sync::Arc::new(activity::Activity::default());
    let services = Services {
        broker: &broker,
        stop: &stop,
        activity: &activity,
        gate: &gate,
    };
    let router = match services.router(&config, health_service) {
        Ok(router) => router,
        Err(e) => {
            let _ = broker.shutdown().await;
            return Err(e);
        }
    };
    // Small frames (acks, single-message publishes) must not wait for Nagle's algorithm; the
    // builder's own nodelay setting does not reach an incoming stream we hand it.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let incoming = connections::limit(incoming, config.limits.max_connections, activity.clone());
    let until_stopped = stop.clone().cancelled_owned();
    let server: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> =
        match tls.clone() {
            None => Box::pin(router.serve_with_incoming_shutdown(incoming, until_stopped)),
            Some(tls) => {
                Box::pin(router.serve_with_incoming_shutdown(tls.accept(incoming), until_stopped))
            }
        };

    if let Err(e) = start_metrics(&config, &broker, &activity, &stop).await {
        stop.cancel();
        let _ = broker.shutdown().await;
        return Err(e);
    }
    let watchdog = tokio::spawn(watch_health(broker.clone(), health.clone(), stop.clone()));
    // Installed even without a file to read: SIGHUP's default action would end the daemon.
    #[cfg(unix)]
    {
        let source = config.source.clone();
        let live = reload::Live {
            broker: broker.clone(),
            gate: gate.clone(),
            tls,
        };
        let reloads = reload::on_hangup(hangup, source, config.clone(), live, stop.clone());
        tokio::spawn(reloads);
    }
    ready(address);
    tracing::info!(%address, data_dir = %config.server.data_dir.display(), fsync = %config.storage.fsync, "ferry is serving");

    tokio::pin!(server);
    tokio::select! {
        result = &mut server => {
            stop.cancel();
            let _ = broker.shutdown().await;
            result?;
            return Ok(());
        }
        _ = shutdown => {}
    }
    tracing::info!("shutting down: refusing new calls, ending streams, syncing the store");
    set_health(&health, ServingStatus::NotServing).await;
    stop.cancel();
    // Ending the consumers' streams first lets the server's graceful drain complete.
    let closed = broker.shutdown().await;
    match tokio::time::timeout(DRAIN_TIMEOUT, &mut server).await {
        Ok(result) => result?,
        Err(_) => {
            tracing::warn!("some calls were still open after {DRAIN_TIMEOUT:?}; closing anyway")
        }
    }
    watchdog.abort();
    closed?;
    tracing::info!("ferry stopped cleanly");
    Ok(())
}

/// Opens the store and declares the configuration's channels, subscriptions and derived
/// channels; a broker that cannot be set up is shut down again (its store synced).
async fn open_broker(config: &Config) -> Result<Broker, ServeError> {
    let broker = Broker::open(&config.server.data_dir, config.broker_options()).await?;
    let declared = async {
        broker.declare(&config.declarations()).await?;
        for (i, derived) in config.derived.iter().enumerate() {
            (broker.declare_derived(&[derived.spec()]).await)
                .map_err(|e| CoreError::InvalidArgument(format!("derived[{i}]: {e}")))?;
        }
        Ok::<(), ServeError>(())
    };
    if let Err(e) = declared.await {
        let _ = broker.shutdown().await;
        return Err(e);
    }
    Ok(broker)
}

/// Serves `GET /metrics` on the configured address, if there is one, until `stop`.
async fn start_metrics(
    config: &Config,
    broker: &Broker,
    activity: &Arc<activity::Activity>,
    stop: &CancellationToken,
) -> Result<(), ServeError> {
    let Some(address) = config.metrics.listen else {
        return Ok(());
    };
    let listener = TcpListener::bind(address).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot serve metrics on {address}: {e}"))
    })?;
    let bound = listener.local_addr()?;
    tracing::info!(address = %bound, "metrics at GET /metrics");
    let metrics = metrics::serve(listener, broker.clone(), activity.clone(), stop.clone());
    tokio::spawn(metrics);
    Ok(())
}

/// The names the health service answers for: the server as a whole ("") and each service.
const HEALTH_SERVICES: [&str; 4] = [
    "",
    "ferry.v1.Publisher",
    "ferry.v1.Subscriber",
    "ferry.v1.Admin",
];

async fn set_health(health: &tonic_health::server::HealthReporter, status: ServingStatus) {
    for service in HEALTH_SERVICES {
        health.set_service_status(service, status).await;
    }
}

/// Reports NOT_SERVING once the store refuses writes, so orchestrators stop routing to us, and
/// the Publisher service NOT_SERVING while publishing is refused for lack of disk space (the
/// rest of the broker goes on serving then).
async fn watch_health(
    broker: Broker,
    health: tonic_health::server::HealthReporter,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(HEALTH_INTERVAL);
    let mut publishing = true;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if let Some(failure) = broker.failure() {
            tracing::error!(%failure, "store failed: reporting NOT_SERVING");
            set_health(&health, ServingStatus::NotServing).await;
            return;
        }
        let space_ok = !broker.space().low;
        if space_ok != publishing {
            publishing = space_ok;
            let status = if publishing {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health
                .set_service_status("ferry.v1.Publisher", status)
                .await;
        }
    }
}
