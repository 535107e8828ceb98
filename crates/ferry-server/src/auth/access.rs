//! The principals table and how a credential is matched against it.
//!
//! A call's credential is read once, when it arrives ([`Credential::of`]); it is kept with the
//! call (a digest, never the token), so that a stream opened before a reload can be matched
//! again against the new table, and one whose credential no longer counts be ended.

use std::collections::HashMap;
use std::sync::Arc;

use ferry_core::names::quote;
use tonic::metadata::MetadataMap;

use super::rules::{Right, Rule};
use super::token;
use crate::Config;
use crate::config::{AuthConfig, PrincipalConfig};

/// A declared principal and its rules.
#[derive(Debug)]
pub struct Principal {
    /// Its name, as the configuration gives it.
    pub name: String,
    publish: Vec<Rule>,
    subscribe: Vec<Rule>,
    admin: Vec<Rule>,
}

impl Principal {
    /// Its rules for `right`.
    pub(super) fn rules(&self, right: Right) -> &[Rule] {
        match right {
            Right::Publish => &self.publish,
            Right::Subscribe => &self.subscribe,
            Right::Admin => &self.admin,
        }
    }
}

/// What a call presented to prove who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// Nothing.
    Nothing,
    /// An `authorization` header that is not `Bearer <token>`.
    Malformed,
    /// A bearer token, by its SHA-256 digest.
    Token(token::Digest),
    /// A client certificate (mutual TLS), by the names it carries.
    Certificate(Arc<[String]>),
}

impl Credential {
    /// What `metadata` and, under mutual TLS, the client certificate present; `certificate`
    /// gives the names of the latter, if any, and is asked only when no token is given. A
    /// token, when given, is the credential even beside a certificate: it is the more specific
    /// of the two.
    pub fn of(metadata: &MetadataMap, certificate: impl FnOnce() -> Option<Arc<[String]>>) -> Self {
        if let Some(value) = metadata.get("authorization") {
            let token = value
                .to_str()
                .ok()
                .and_then(|value| value.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim())
                .filter(|token| !token.is_empty());
            return match token {
                Some(token) => Credential::Token(token::digest_of(token.as_bytes())),
                None => Credential::Malformed,
            };
        }
        match certificate() {
            Some(names) => Credential::Certificate(names),
            None => Credential::Nothing,
        }
    }
}

/// The principals table: built from the configuration, and only through [`Access::of`], which
/// checks it.
#[derive(Debug, Default)]
pub struct Access {
    principals: Vec<Arc<Principal>>,
    /// Every token hash, with the index of the principal it authenticates.
    tokens: Vec<(token::Digest, usize)>,
    /// Certificate names, with the principal each authenticates.
    certificates: HashMap<String, usize>,
    /// What is open without credentials.
    pub(super) auth: AuthConfig,
}

impl Access {
    /// The table `config` declares; the error names the key and what is wrong.
    pub fn of(config: &Config) -> Result<Access, String> {
        Access::new(&config.all_principals(), &config.auth)
    }

    fn new(principals: &[PrincipalConfig], auth: &AuthConfig) -> Result<Access, String> {
        let mut access = Access {
            auth: auth.clone(),
            ..Access::default()
        };
        let mut names = HashMap::new();
        for (i, declared) in principals.iter().enumerate() {
            let key = format!("principals[{i}]");
            ferry_core::names::validate("principal", &declared.name)
                .map_err(|e| format!("{key}.name: {e}"))?;
            if let Some(first) = names.insert(declared.name.as_str(), i) {
                return Err(format!(
                    "{key}.name: principal {:?} is declared twice (also principals[{first}])",
                    declared.name
                ));
            }
            if declared.tokens.is_empty() && declared.certificates.is_empty() {
                return Err(format!(
                    "{key}: principal {:?} has no way to authenticate: give it tokens (hashes \
                     from `ferry token hash`) or certificates (names in client certificates)",
                    declared.name
                ));
            }
            access.add_tokens(&key, i, principals)?;
            access.add_certificates(&key, i, principals)?;
            access.principals.push(Arc::new(Principal {
                name: declared.name.clone(),
                publish: parse_rules(&key, Right::Publish, &declared.publish)?,
                subscribe: parse_rules(&key, Right::Subscribe, &declared.subscribe)?,
                admin: parse_rules(&key, Right::Admin, &declared.admin)?,
            }));
        }
        Ok(access)
    }

    fn add_tokens(
        &mut self,
        key: &str,
        i: usize,
        principals: &[PrincipalConfig],
    ) -> Result<(), String> {
        for (j, text) in principals[i].tokens.iter().enumerate() {
            let digest = token::parse_hash(text).map_err(|e| format!("{key}.tokens[{j}]: {e}"))?;
            if let Some(&(_, owner)) = self.tokens.iter().find(|(known, _)| *known == digest) {
                return Err(format!(
                    "{key}.tokens[{j}]: the same token also authenticates principal {:?}",
                    principals[owner].name
                ));
            }
            self.tokens.push((digest, i));
        }
        Ok(())
    }

    fn add_certificates(
        &mut self,
        key: &str,
        i: usize,
        principals: &[PrincipalConfig],
    ) -> Result<(), String> {
        for (j, name) in principals[i].certificates.iter().enumerate() {
            if name.is_empty() {
                return Err(format!("{key}.certificates[{j}]: a name must not be empty"));
            }
            if let Some(other) = self.certificates.insert(name.clone(), i) {
                return Err(format!(
                    "{key}.certificates[{j}]: {name:?} also names principal {:?}",
                    principals[other].name
                ));
            }
        }
        Ok(())
    }

    /// Whether principals are declared (and every call must prove it is one of them).
    pub fn is_enforced(&self) -> bool {
        !self.principals.is_empty()
    }

    /// Whether some principal authenticates with a token.
    pub fn has_tokens(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// The principal `credential` proves, None when no principal is declared. The error says
    /// what to fix, and never repeats a token.
    pub fn identify(&self, credential: &Credential) -> Result<Option<Arc<Principal>>, String> {
        if !self.is_enforced() {
            return Ok(None);
        }
        let owner = match credential {
            Credential::Nothing => {
                return Err(
                    "this broker requires credentials: send \"authorization: Bearer \
                            <token>\" metadata, or a client certificate over mutual TLS"
                        .into(),
                );
            }
            Credential::Malformed => {
                return Err("the authorization metadata must be \"Bearer <token>\"".into());
            }
            Credential::Token(digest) => self.by_token(digest)?,
            Credential::Certificate(names) => self.by_certificate(names)?,
        };
        Ok(Some(self.principals[owner].clone()))
    }

    /// Compares with every known digest, whatever the outcome, so that the time taken says
    /// nothing about which hashes exist.
    fn by_token(&self, presented: &token::Digest) -> Result<usize, String> {
        let mut found = None;
        for (known, owner) in &self.tokens {
            if token::same(known, presented) {
                found = Some(*owner);
            }
        }
        found.ok_or_else(|| "the bearer token is not valid".to_owned())
    }

    fn by_certificate(&self, names: &[String]) -> Result<usize, String> {
        let mut owners: Vec<usize> = names
            .iter()
            .filter_map(|name| self.certificates.get(name).copied())
            .collect();
        owners.sort_unstable();
        owners.dedup();
        match owners.as_slice() {
            [owner] => Ok(*owner),
            [] => Err(format!(
                "the client certificate (names: {}) names no declared principal",
                quote(&names.join(", "))
            )),
            _ => Err(format!(
                "the client certificate (names: {}) names several principals",
                quote(&names.join(", "))
            )),
        }
    }
}

fn parse_rules(key: &str, right: Right, texts: &[String]) -> Result<Vec<Rule>, String> {
    let rules = texts
        .iter()
        .enumerate()
        .map(|(i, text)| Rule::parse(text).map_err(|e| format!("{key}.{right}[{i}]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if right == Right::Publish
        && let Some(i) = rules.iter().position(Rule::is_narrowed)
    {
        return Err(format!(
            "{key}.publish[{i}]: {:?} names subscriptions, but one publishes to channels: \
             leave out the \"/SUBSCRIPTION\" part",
            texts[i]
        ));
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn principal(name: &str, tokens: &[&str], certificates: &[&str]) -> PrincipalConfig {
        PrincipalConfig {
            name: name.into(),
            tokens: tokens.iter().map(|t| token::hash(t)).collect(),
            certificates: certificates.iter().map(|c| c.to_string()).collect(),
            ..PrincipalConfig::default()
        }
    }

    fn presenting(authorization: &str) -> Credential {
        let mut metadata = MetadataMap::new();
        let value: MetadataValue<_> = authorization.parse().unwrap();
        metadata.insert("authorization", value);
        Credential::of(&metadata, || None)
    }

    #[test]
    fn a_bearer_token_is_read_however_its_scheme_is_written() {
        let access = Access::new(
            &[principal("app", &["token-of-the-app-0123"], &[])],
            &AuthConfig::default(),
        )
        .unwrap();
        for header in [
            "Bearer token-of-the-app-0123",
            "bearer token-of-the-app-0123",
            "BEARER   token-of-the-app-0123 ",
        ] {
            let who = access.identify(&presenting(header)).unwrap().unwrap();
            assert_eq!(who.name, "app", "{header}");
        }
        for (header, why) in [
            ("Basic dXNlcjpwYXNz", "Bearer <token>"),
            ("Bearer ", "Bearer <token>"),
            ("token-of-the-app-0123", "Bearer <token>"),
            ("Bearer token-of-another", "not valid"),
        ] {
            let refused = access.identify(&presenting(header)).unwrap_err();
            assert!(refused.contains(why), "{header}: {refused}");
        }
        let refused = access.identify(&Credential::Nothing).unwrap_err();
        assert!(refused.contains("requires credentials"), "{refused}");
    }

    #[test]
    fn a_certificate_names_one_principal_or_none() {
        let access = Access::new(
            &[
                principal("billing", &[], &["billing.internal"]),
                principal("ops", &[], &["ops"]),
            ],
            &AuthConfig::default(),
        )
        .unwrap();
        let names =
            |list: &[&str]| Credential::Certificate(list.iter().map(|n| n.to_string()).collect());
        let who = access
            .identify(&names(&["billing", "billing.internal"]))
            .unwrap();
        assert_eq!(who.unwrap().name, "billing");
        let none = access.identify(&names(&["stranger"])).unwrap_err();
        assert!(none.contains("names no declared principal"), "{none}");
        let both = access
            .identify(&names(&["ops", "billing.internal"]))
            .unwrap_err();
        assert!(both.contains("several principals"), "{both}");
    }

    #[test]
    fn a_token_declared_twice_is_refused_not_a_panic() {
        let twice = principal(
            "app",
            &["same-token-0123456789", "same-token-0123456789"],
            &[],
        );
        let refused = Access::new(&[twice], &AuthConfig::default()).unwrap_err();
        assert!(
            refused.contains("also authenticates principal \"app\""),
            "{refused}"
        );
        let shared = [
            principal("a", &["shared-token-0123456789"], &[]),
            principal("b", &["shared-token-0123456789"], &[]),
        ];
        let refused = Access::new(&shared, &AuthConfig::default()).unwrap_err();
        assert!(refused.contains("principals[1].tokens[0]"), "{refused}");
        assert!(
            Access::new(&[], &AuthConfig::default())
                .unwrap()
                .identify(&Credential::Nothing)
                .unwrap()
                .is_none()
        );
    }
}
