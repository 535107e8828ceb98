//! A typed client for Ferry, the durable message broker: publish, subscribe and administer
//! without naming gRPC types.
//!
//! ```no_run
//! use ferry_client::{Client, Message};
//!
//! # async fn example() -> Result<(), ferry_client::Error> {
//! let client = Client::connect("http://127.0.0.1:50051").await?;
//! let publisher = client.publisher("orders.created");
//! publisher.publish(Message::new("order 42").attribute("region", "eu")).await?;
//!
//! let mut deliveries = client.subscribe("orders.created", "billing");
//! while let Some(delivery) = deliveries.next().await {
//!     let delivery = delivery?;
//!     println!("{} #{}: {:?}", delivery.channel, delivery.sequence, delivery.payload);
//!     delivery.ack().await?;
//! }
//! # Ok(())
//! # }
//! ```
//!
//! - [`Client`]: one connection to a broker (it reconnects by itself), cheap to clone;
//! - [`Publisher`]: batches and pipelines what it is given over one stream and confirms each
//!   message once it is durable;
//! - [`Subscription`]: a [`Stream`](tokio_stream::Stream) of [`Delivery`]s, each settled
//!   through itself; deadlines are extended while the application holds a delivery, and the
//!   consumer attaches again with backoff when the connection is lost;
//! - administration: channels, subscriptions, seek and the broker's figures, on [`Client`].

mod admin;
mod convert;
mod error;
mod message;
mod publisher;
mod subscriber;

use std::time::Duration;

use ferry_proto::pb::admin_client::AdminClient;
use ferry_proto::pb::publisher_client::PublisherClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

pub use admin::{
    BrokerInfo, ChannelInfo, ChannelOptions, ConfigAction, ConfigStep, DerivedChannel,
    RedriveSelection, Redriven, RetryPolicy, Start, SubscriptionInfo, SubscriptionOptions,
};
pub use error::{Code, Error, Result};
pub use message::{Message, Published, Received};
pub use publisher::{Confirmation, Publisher, PublisherOptions};
pub use subscriber::{Delivery, Nack, SubscribeOptions, Subscription};

/// The largest response the client reads: a broker may deliver a message of up to 64 MiB
/// (its `max_message_bytes` limit), alone in its event, and list many channels at once.
pub(crate) const MAX_RESPONSE: usize = 256 << 20;

/// How long connecting to a broker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How a TLS connection checks the broker and, for mutual TLS, proves who the client is.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// PEM certificates of the CAs the broker's certificate must chain to.
    pub ca_pem: Vec<u8>,
    /// The client's PEM certificate and key, for a broker that requires them.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// The name to check the broker's certificate against (default: the address's host).
    pub domain: Option<String>,
}

/// The connection every call goes through, carrying the client's credentials.
pub(crate) type Connection = InterceptedService<Channel, Credentials>;

/// What every call presents: a bearer token, when the client has one.
#[derive(Clone, Default)]
pub(crate) struct Credentials {
    authorization: Option<MetadataValue<Ascii>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let token = self.authorization.as_ref().map(|_| "<redacted>");
        f.debug_struct("Credentials")
            .field("token", &token)
            .finish()
    }
}

impl tonic::service::Interceptor for Credentials {
    fn call(&mut self, mut request: tonic::Request<()>) -> tonic::Result<tonic::Request<()>> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A connection to a broker; cheap to clone (clones share it). When the connection is lost,
/// the next call connects again.
#[derive(Clone)]
pub struct Client {
    channel: Channel,
    credentials: Credentials,
    address: String,
}

impl Client {
    /// Connects to a broker at `address` (`http://host:port`; `host:port` works too).
    pub async fn connect(address: impl Into<String>) -> Result<Client> {
        Client::connect_with(address, None).await
    }

    /// Connects over TLS (`https://host:port`, or `host:port`), checking the broker's
    /// certificate against `tls.ca_pem` and, for mutual TLS, presenting `tls.identity`.
    pub async fn connect_tls(address: impl Into<String>, tls: Tls) -> Result<Client> {
        Client::connect_with(address, Some(tls)).await
    }

    async fn connect_with(address: impl Into<String>, tls: Option<Tls>) -> Result<Client> {
        let address = address.into();
        // With TLS asked for, an `http://` address is taken as `https://`: tonic would
        // otherwise connect in plaintext, and send the token in the clear.
        let url = match (address.split_once("://"), tls.is_some()) {
            (Some(("http", rest)), true) => format!("https://{rest}"),
            (Some(_), _) => address.clone(),
            (None, false) => format!("http://{address}"),
            (None, true) => format!("https://{address}"),
        };
        let mut endpoint = Endpoint::from_shared(url)
            .map_err(|e| Error::Invalid(format!("bad broker address {address:?}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        if let Some(tls) = tls {
            let mut config =
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(tls.ca_pem));
            if let Some((cert, key)) = tls.identity {
                config = config.identity(Identity::from_pem(cert, key));
            }
            if let Some(domain) = tls.domain {
                config = config.domain_name(domain);
            }
            endpoint = endpoint.tls_config(config).map_err(|e| {
                Error::Invalid(format!(
                    "bad TLS settings for {address:?}: {}",
                    source_chain(&e)
                ))
            })?;
        }
        let connection = endpoint.connect().await.map_err(|e| Error::Connect {
            address: address.clone(),
            reason: source_chain(&e),
        })?;
        Ok(Client {
            channel: connection,
            credentials: Credentials::default(),
            address,
        })
    }

    /// The same connection, presenting `token` as its bearer token on every call (for a
    /// broker that declares principals); its clones present it too.
    pub fn with_token(mut self, token: &str) -> Result<Client> {
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}").parse().map_err(|_| {
            Error::Invalid("a token must be printable ASCII without line breaks".to_owned())
        })?;
        // Kept out of HTTP/2's header compression table, and out of debug output.
        value.set_sensitive(true);
        self.credentials.authorization = Some(value);
        Ok(self)
    }

    fn connection(&self) -> Connection {
        InterceptedService::new(self.channel.clone(), self.credentials.clone())
    }

    /// The address it connects to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// A publisher of `channel` with default batching.
    pub fn publisher(&self, channel: &str) -> Publisher {
        self.publisher_with(channel, PublisherOptions::default())
    }

    /// A publisher of `channel` that batches and pipelines as `options` say.
    pub fn publisher_with(&self, channel: &str, options: PublisherOptions) -> Publisher {
        Publisher::new(self.connection(), channel.to_owned(), options)
    }

    /// Publishes one batch (all or nothing) and waits until it is durable; returns each
    /// message's confirmation, in order.
    pub async fn publish(&self, channel: &str, messages: Vec<Message>) -> Result<Vec<Published>> {
        let request = ferry_proto::pb::PublishRequest {
            channel: channel.to_owned(),
            messages: messages.into_iter().map(Message::into_proto).collect(),
        };
        let mut client =
            PublisherClient::new(self.connection()).max_decoding_message_size(MAX_RESPONSE);
        let response = client.publish(request).await?.into_inner();
        Ok(Published::of(response))
    }

    /// Attaches a consumer to `subscription` of `channel` (or of a pattern, for a wildcard
    /// subscription) with the default options. Attaching happens in the background: a
    /// subscription that does not exist is the stream's first item, an error.
    pub fn subscribe(&self, channel: &str, subscription: &str) -> Subscription {
        self.subscribe_with(channel, subscription, SubscribeOptions::default())
    }

    /// Attaches a consumer with these options.
    pub fn subscribe_with(
        &self,
        channel: &str,
        subscription: &str,
        options: SubscribeOptions,
    ) -> Subscription {
        Subscription::start(
            self.connection(),
            channel.to_owned(),
            subscription.to_owned(),
            options,
        )
    }

    /// The broker's answer to the standard gRPC health check of the whole server: `SERVING`,
    /// `NOT_SERVING` (its store failed, or it is shutting down), ... in gRPC's words.
    pub async fn health(&self) -> Result<String> {
        use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
        let request = HealthCheckRequest {
            service: String::new(),
        };
        let mut client = HealthClient::new(self.connection());
        let answer = client.check(request).await?.into_inner();
        Ok(answer.status().as_str_name().to_owned())
    }

    fn admin(&self) -> AdminClient<Connection> {
        AdminClient::new(self.connection()).max_decoding_message_size(MAX_RESPONSE)
    }
}

/// An error with its causes, for a message that says what actually failed (a transport
/// error's own text is only "transport error").
fn source_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
