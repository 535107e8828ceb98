//! TLS for the gRPC server (`[server.tls]`): the certificate and key it presents, and, for
//! mutual TLS, the CAs whose certificates clients must present.
//!
//! Ferry terminates TLS itself rather than through tonic's server setting, which is fixed when
//! the server starts: the acceptor here can be swapped on SIGHUP, so that renewed certificates
//! take effect for new connections without dropping the open ones. Handshakes run beside the
//! accept loop, each bounded in time, so a client that stalls mid-handshake does not hold up
//! the handshakes of others (it does hold one of the `max_connections` places meanwhile).

use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ferry_core::names::quote;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::Connected;

use crate::config::TlsConfig;
use crate::connections::Counted;
use crate::throttle::Throttle;

/// How long a client may take to complete its TLS handshake (while it holds one of the
/// `max_connections` places).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections whose handshake is done, waiting for the server to take them.
const HANDSHAKEN_QUEUE: usize = 64;
/// Failed handshakes are logged at most once a second.
static FAILED_HANDSHAKES: Throttle = Throttle::new();

/// The TLS acceptor in force; clones share it, and [`Tls::reload`] swaps it for all of them.
#[derive(Clone)]
pub struct Tls {
    acceptor: Arc<RwLock<TlsAcceptor>>,
}

impl Tls {
    /// An acceptor from the files `config` names; the error names the file and the problem.
    pub fn load(config: &TlsConfig) -> Result<Tls, String> {
        Ok(Tls {
            acceptor: Arc::new(RwLock::new(acceptor(config)?)),
        })
    }

    /// Reads the files again; new connections use them from now on. If they are bad, the
    /// acceptor in force stays and the error says why.
    pub fn reload(&self, config: &TlsConfig) -> Result<(), String> {
        let fresh = acceptor(config)?;
        *self.acceptor.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    fn current(&self) -> TlsAcceptor {
        self.acceptor
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The TLS connections of `incoming`: each handshake runs in its own task; one that fails
    /// or times out is logged and closed. Accepting stops once the result is dropped.
    pub(crate) fn accept(
        self,
        incoming: impl Stream<Item = io::Result<Counted>> + Send + 'static,
    ) -> impl Stream<Item = io::Result<TlsStream<Counted>>> {
        let (handshaken, taken) = mpsc::channel(HANDSHAKEN_QUEUE);
        tokio::spawn(async move {
            tokio::pin!(incoming);
            loop {
                let accepted = tokio::select! {
                    // The server stopped taking connections: dropping `incoming` closes the
                    // listening socket.
                    _ = handshaken.closed() => return,
                    accepted = incoming.next() => accepted,
                };
                let stream = match accepted {
                    None => return,
                    Some(Err(e)) => {
                        if handshaken.send(Err(e)).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Some(Ok(stream)) => stream,
                };
                let (acceptor, handshaken) = (self.current(), handshaken.clone());
                tokio::spawn(async move {
                    let peer = stream.connect_info().remote_addr();
                    let handshake = acceptor.accept(stream);
                    let failure = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(tls)) => {
                            let _ = handshaken.send(Ok(tls)).await;
                            return;
                        }
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => format!("timed out after {HANDSHAKE_TIMEOUT:?}"),
                    };
                    if let Some(left_out) = FAILED_HANDSHAKES.pass() {
                        tracing::info!(?peer, error = %failure, left_out, "TLS handshake failed");
                    }
                });
            }
        });
        ReceiverStream::new(taken)
    }
}

fn acceptor(config: &TlsConfig) -> Result<TlsAcceptor, String> {
    let chain = certificates("certificate (server.tls.cert_file)", &config.cert_file)?;
    let key_bytes = read("key (server.tls.key_file)", &config.key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| {
        format!(
            "the TLS key (server.tls.key_file) {} holds no usable PEM private key: {e}",
            shown(&config.key_file)
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot set up TLS: {e}"))?;
    let builder = match &config.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let what = "client CA (server.tls.client_ca_file)";
            let mut roots = RootCertStore::empty();
            for ca in certificates(what, path)? {
                roots.add(ca).map_err(|e| {
                    format!(
                        "the TLS {what} {} holds a bad CA certificate: {e}",
                        shown(path)
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("the TLS {what} {} cannot be used: {e}", shown(path)))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "the TLS certificate {} and key {} cannot be used together: {e}",
            shown(&config.cert_file),
            shown(&config.key_file)
        )
    })?;
    // gRPC is HTTP/2; clients that insist on ALPN (grpc-go does) must be told so.
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(server)))
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read the TLS {what} {}: {e}", shown(path)))
}

fn certificates(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(what, path)?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the TLS {what} {} is not PEM: {e}", shown(path)))?;
    if certificates.is_empty() {
        return Err(format!(
            "the TLS {what} {} holds no PEM certificate",
            shown(path)
        ));
    }
    Ok(certificates)
}

fn shown(path: &Path) -> String {
    quote(&path.display().to_string())
}
