//! The names a client certificate proves under mutual TLS: its subject's common names and its
//! DNS, URI and email subject alternative names. The TLS handshake has already checked the
//! certificate against the client CA (chain, signature, validity dates) before anything here
//! reads it. A connection's certificate is parsed once, at its first call ([`Seen`]).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};

use tokio_rustls::rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// A client's certificate chain as tonic hands it to every call of one connection: the same
/// `Arc` for all of them.
pub type Chain = Arc<Vec<CertificateDer<'static>>>;

/// How many connections' names are remembered; past that the oldest is parsed again at its
/// next call.
const REMEMBERED: usize = 256;

/// The names of the certificates of recent connections, so that a connection's calls share
/// one parse (an x509 parse costs a few microseconds, a unary call not many more).
///
/// A connection is known by its chain's `Arc`. The `Weak` kept for it holds that allocation,
/// so its address cannot be reused by another connection's chain while it is remembered.
#[derive(Debug, Default)]
pub struct Seen {
    recent: Mutex<VecDeque<Remembered>>,
}

/// A connection's chain, held weakly, and its leaf's names.
type Remembered = (Weak<Vec<CertificateDer<'static>>>, Arc<[String]>);

impl Seen {
    /// The names of `chain`'s leaf certificate (none if it has none or cannot be parsed).
    pub fn names(&self, chain: &Chain) -> Arc<[String]> {
        let known = |recent: &VecDeque<Remembered>| {
            // Newest first: a connection's calls come close together.
            recent
                .iter()
                .rev()
                .find(|(seen, _)| std::ptr::eq(seen.as_ptr(), Arc::as_ptr(chain)))
                .map(|(_, names)| names.clone())
        };
        if let Some(names) = known(&self.recent.lock().expect("certificate names lock")) {
            return names;
        }
        // Parsed outside the lock: another call of the same connection may parse it too.
        let names: Arc<[String]> = chain
            .first()
            .map(|leaf| names(leaf))
            .unwrap_or_default()
            .into();
        let mut recent = self.recent.lock().expect("certificate names lock");
        recent.retain(|(seen, _)| seen.strong_count() > 0);
        if known(&recent).is_none() {
            if recent.len() == REMEMBERED {
                recent.pop_front();
            }
            recent.push_back((Arc::downgrade(chain), names.clone()));
        }
        names
    }
}

/// Every name `der` (the client's end-entity certificate) carries; none if it cannot be parsed.
pub fn names(der: &[u8]) -> Vec<String> {
    let Ok((_, certificate)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut names: Vec<String> = certificate
        .subject()
        .iter_common_name()
        .filter_map(|name| name.as_str().ok())
        .map(str::to_owned)
        .collect();
    if let Ok(Some(alternatives)) = certificate.subject_alternative_name() {
        for name in &alternatives.value.general_names {
            match name {
                GeneralName::DNSName(name)
                | GeneralName::URI(name)
                | GeneralName::RFC822Name(name) => names.push((*name).to_owned()),
                _ => {}
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    #[test]
    fn a_certificate_names_its_common_name_and_its_alternative_names() {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["billing.internal".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "billing");
        params.subject_alt_names.extend([
            SanType::URI("spiffe://example.org/billing".try_into().unwrap()),
            SanType::Rfc822Name("ops@example.org".try_into().unwrap()),
            SanType::IpAddress([127, 0, 0, 1].into()),
        ]);
        let der = params.self_signed(&key).unwrap().der().to_vec();
        let mut names = super::names(&der);
        names.sort();
        assert_eq!(
            names,
            [
                "billing",
                "billing.internal",
                "ops@example.org",
                "spiffe://example.org/billing"
            ]
        );
        assert!(super::names(b"not a certificate").is_empty());
    }

    #[test]
    fn a_connections_certificate_is_parsed_once_and_connections_are_remembered_within_bounds() {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["billing.internal".to_owned()]).unwrap();
        let der = params.self_signed(&key).unwrap().der().clone();
        let expected = super::names(&der);
        assert!(expected.contains(&"billing.internal".to_owned()));
        let seen = super::Seen::default();
        let connection: super::Chain = Arc::new(vec![der.clone()]);
        let first = seen.names(&connection);
        assert_eq!(*first, *expected);
        assert!(
            Arc::ptr_eq(&first, &seen.names(&connection)),
            "parsed again"
        );

        // Another connection with the same certificate is another chain: parsed for itself.
        let other: super::Chain = Arc::new(vec![der.clone()]);
        assert!(!Arc::ptr_eq(&first, &seen.names(&other)));

        // Closed connections are forgotten, and open ones are remembered up to the bound.
        drop(other);
        let open: Vec<super::Chain> = (0..super::REMEMBERED + 10)
            .map(|_| Arc::new(vec![der.clone()]))
            .collect();
        for chain in &open {
            assert_eq!(*seen.names(chain), *expected);
        }
        assert_eq!(seen.recent.lock().unwrap().len(), super::REMEMBERED);
        let empty: super::Chain = Arc::new(Vec::new());
        assert!(seen.names(&empty).is_empty());
    }
}
