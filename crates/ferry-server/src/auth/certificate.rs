//! The names a client certificate proves under mutual TLS: its subject's common names and its
//! DNS, URI and email subject alternative names. The TLS handshake has already checked the
//! certificate against the client CA (chain, signature, validity dates) before anything here
//! reads it.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

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
}
