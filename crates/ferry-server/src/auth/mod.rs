//! Who is calling, and whether they may: the principals the configuration declares, how a call
//! proves it is one of them (a bearer token, or a client certificate under mutual TLS), and the
//! rules that say what each may do.
//!
//! With no principal declared, every call is allowed (the loopback-only rule in
//! [`Config::check_exposure`](crate::Config::check_exposure) keeps that safe). Once one is
//! declared, access is denied by default: a call without valid credentials is refused with
//! `UNAUTHENTICATED` before any service sees it, and a call outside its principal's rules with
//! `PERMISSION_DENIED` naming the right it lacks. The table is swapped whole on SIGHUP; each
//! call reads the table current when it arrived.

pub mod certificate;
pub mod rules;
pub mod token;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use ferry_core::names::quote;
use tokio_rustls::rustls::pki_types::CertificateDer;
use tonic::metadata::MetadataMap;
use tonic::{Request, Status};

use crate::Config;
use crate::config::{AuthConfig, PrincipalConfig};
pub use rules::{Resource, Right, Rule};

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
    fn rules(&self, right: Right) -> &[Rule] {
        match right {
            Right::Publish => &self.publish,
            Right::Subscribe => &self.subscribe,
            Right::Admin => &self.admin,
        }
    }

    fn may(&self, right: Right, resource: Resource<'_>) -> bool {
        self.rules(right).iter().any(|rule| rule.reaches(resource))
    }
}

/// Who made a call, found by the [`Authenticator`] and carried in the request's extensions.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No principal is declared: every caller may do everything.
    Anyone,
    /// A declared principal.
    Principal(Arc<Principal>),
}

impl Caller {
    /// The caller of `request`. A request the authenticator did not see is refused: failing
    /// closed is the point.
    pub fn of<T>(request: &Request<T>) -> Result<Caller, Status> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("the call's credentials were not checked"))
    }

    /// Allows the call if the caller holds `right` on `resource`.
    pub fn require(&self, right: Right, resource: Resource<'_>) -> Result<(), Status> {
        self.require_any(&[right], resource)
    }

    /// Allows the call if the caller holds one of `rights` on `resource`.
    pub fn require_any(&self, rights: &[Right], resource: Resource<'_>) -> Result<(), Status> {
        let Caller::Principal(principal) = self else {
            return Ok(());
        };
        if rights.iter().any(|&right| principal.may(right, resource)) {
            return Ok(());
        }
        let needed = match rights {
            [right] => format!("the {right} right"),
            _ => {
                let names: Vec<String> = rights.iter().map(Right::to_string).collect();
                format!("one of the rights {}", names.join(", "))
            }
        };
        Err(Status::permission_denied(format!(
            "principal {} lacks {needed} on {resource}",
            quote(&principal.name)
        )))
    }

    /// Whether the caller holds `right` on `resource`.
    pub fn may(&self, right: Right, resource: Resource<'_>) -> bool {
        self.require(right, resource).is_ok()
    }

    /// Whether any of the caller's rules concerns `channel`: what listings show.
    pub fn may_see_channel(&self, channel: &str) -> bool {
        match self {
            Caller::Anyone => true,
            Caller::Principal(principal) => [Right::Publish, Right::Subscribe, Right::Admin]
                .iter()
                .any(|&right| principal.rules(right).iter().any(|r| r.touches(channel))),
        }
    }

    /// Allows reading `channel`'s figures to a caller with any right that concerns it.
    pub fn require_visible(&self, channel: &str) -> Result<(), Status> {
        match self {
            Caller::Principal(principal) if !self.may_see_channel(channel) => {
                Err(Status::permission_denied(format!(
                    "principal {} lacks every right (publish, subscribe or admin) on {}",
                    quote(&principal.name),
                    Resource::Channel(channel)
                )))
            }
            _ => Ok(()),
        }
    }

    /// Whether the caller may read the figures of subscription `name` of `channel`.
    pub fn may_read_subscription(&self, channel: &str, name: &str) -> bool {
        let resource = Resource::Subscription { channel, name };
        self.may(Right::Subscribe, resource) || self.may(Right::Admin, resource)
    }

    /// The principal's name, for logs (None when no principal is declared).
    pub fn name(&self) -> Option<&str> {
        match self {
            Caller::Anyone => None,
            Caller::Principal(principal) => Some(&principal.name),
        }
    }
}

/// The principals table: built from the configuration, and only through [`Access::new`], which
/// checks it.
#[derive(Debug, Default)]
pub struct Access {
    principals: Vec<Arc<Principal>>,
    /// Token hashes, with the index of the principal each belongs to.
    tokens: Vec<token::Digest>,
    token_owners: Vec<usize>,
    /// Certificate names, with the principal each belongs to.
    certificates: HashMap<String, usize>,
    auth: AuthConfig,
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
            for (j, text) in declared.tokens.iter().enumerate() {
                let digest =
                    token::parse_hash(text).map_err(|e| format!("{key}.tokens[{j}]: {e}"))?;
                if let Some(other) = token::find(&access.tokens, &digest) {
                    return Err(format!(
                        "{key}.tokens[{j}]: the same token also authenticates principal {:?}",
                        access.principals[access.token_owners[other]].name
                    ));
                }
                access.tokens.push(digest);
                access.token_owners.push(i);
            }
            for (j, name) in declared.certificates.iter().enumerate() {
                if name.is_empty() {
                    return Err(format!("{key}.certificates[{j}]: a name must not be empty"));
                }
                if let Some(other) = access.certificates.insert(name.clone(), i) {
                    return Err(format!(
                        "{key}.certificates[{j}]: {name:?} also names principal {:?}",
                        principals[other].name
                    ));
                }
            }
            access.principals.push(Arc::new(Principal {
                name: declared.name.clone(),
                publish: parse_rules(&key, "publish", &declared.publish)?,
                subscribe: parse_rules(&key, "subscribe", &declared.subscribe)?,
                admin: parse_rules(&key, "admin", &declared.admin)?,
            }));
        }
        Ok(access)
    }

    /// Whether principals are declared (and every call must prove it is one of them).
    pub fn is_enforced(&self) -> bool {
        !self.principals.is_empty()
    }

    /// Whether some principal authenticates with a token.
    pub fn has_tokens(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Who presents `metadata` and, under mutual TLS, `certificates` (the client's chain, its
    /// own certificate first). The error says what to fix, and never repeats a token.
    fn authenticate(
        &self,
        metadata: &MetadataMap,
        certificates: Option<&[CertificateDer<'static>]>,
    ) -> Result<Caller, String> {
        if !self.is_enforced() {
            return Ok(Caller::Anyone);
        }
        if let Some(value) = metadata.get("authorization") {
            let presented = value
                .to_str()
                .ok()
                .and_then(|value| value.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim());
            let Some(presented) = presented else {
                return Err("the authorization metadata must be \"Bearer <token>\"".into());
            };
            let digest = token::digest_of(presented.as_bytes());
            return match token::find(&self.tokens, &digest) {
                Some(i) => Ok(self.caller(self.token_owners[i])),
                None => Err("the bearer token is not valid".into()),
            };
        }
        if let Some(leaf) = certificates.and_then(<[_]>::first) {
            let names = certificate::names(leaf);
            let mut owners: Vec<usize> = names
                .iter()
                .filter_map(|name| self.certificates.get(name).copied())
                .collect();
            owners.sort_unstable();
            owners.dedup();
            return match owners.as_slice() {
                [owner] => Ok(self.caller(*owner)),
                [] => Err(format!(
                    "the client certificate (names: {}) names no declared principal",
                    quote(&names.join(", "))
                )),
                _ => Err(format!(
                    "the client certificate (names: {}) names several principals",
                    quote(&names.join(", "))
                )),
            };
        }
        Err(
            "this broker requires credentials: send \"authorization: Bearer <token>\" metadata, \
             or a client certificate over mutual TLS"
                .into(),
        )
    }

    fn caller(&self, index: usize) -> Caller {
        Caller::Principal(self.principals[index].clone())
    }
}

fn parse_rules(key: &str, right: &str, texts: &[String]) -> Result<Vec<Rule>, String> {
    let rules = texts
        .iter()
        .enumerate()
        .map(|(i, text)| Rule::parse(text).map_err(|e| format!("{key}.{right}[{i}]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    if right == "publish"
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

/// The current principals table, shared by every connection and swapped whole on reload.
#[derive(Debug, Clone, Default)]
pub struct Gate(Arc<RwLock<Arc<Access>>>);

impl Gate {
    /// A gate over `access`.
    pub fn new(access: Access) -> Gate {
        Gate(Arc::new(RwLock::new(Arc::new(access))))
    }

    /// The table in force now.
    pub fn current(&self) -> Arc<Access> {
        // A panic while the lock was held cannot leave the Arc half-written.
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `access` in force for the calls that arrive from now on.
    pub fn replace(&self, access: Access) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(access);
    }
}

/// Which service an [`Authenticator`] guards: the health and reflection services may be open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarded {
    /// Publisher, Subscriber and Admin: always guarded.
    Ferry,
    /// The standard health service.
    Health,
    /// The reflection service.
    Reflection,
}

/// Authenticates every call of one service before the service sees it, and leaves its
/// [`Caller`] in the request's extensions.
#[derive(Debug, Clone)]
pub struct Authenticator {
    gate: Gate,
    guarded: Guarded,
}

impl Authenticator {
    /// Guards `guarded` with the table `gate` holds at each call.
    pub fn new(gate: Gate, guarded: Guarded) -> Authenticator {
        Authenticator { gate, guarded }
    }
}

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let access = self.gate.current();
        let open = match self.guarded {
            Guarded::Ferry => false,
            Guarded::Health => access.auth.open_health,
            Guarded::Reflection => access.auth.open_reflection,
        };
        let certificates = request.peer_certs();
        match access.authenticate(
            request.metadata(),
            certificates.as_deref().map(Vec::as_slice),
        ) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Ok(request)
            }
            Err(_) if open => Ok(request),
            Err(reason) => {
                tracing::info!(peer = ?request.remote_addr(), %reason, "call refused: not authenticated");
                Err(Status::unauthenticated(reason))
            }
        }
    }
}
