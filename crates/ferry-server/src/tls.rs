//! TLS for the gRPC server (`[server.tls]`): the certificate and key it presents, and, for
//! mutual TLS, the CAs whose certificates clients must present.

use ferry_core::names::quote;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::ServeError;
use crate::config::TlsConfig;

/// The server's TLS configuration from the files `tls` names.
pub fn server_config(tls: &TlsConfig) -> Result<ServerTlsConfig, ServeError> {
    let read = |what: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            ServeError::Tls(format!(
                "cannot read the TLS {what} {}: {e}",
                quote(&path.display().to_string())
            ))
        })
    };
    let cert = read("certificate (server.tls.cert_file)", &tls.cert_file)?;
    let key = read("key (server.tls.key_file)", &tls.key_file)?;
    let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
    if let Some(path) = &tls.client_ca_file {
        let ca = read("client CA (server.tls.client_ca_file)", path)?;
        config = config.client_ca_root(Certificate::from_pem(ca));
    }
    Ok(config)
}
