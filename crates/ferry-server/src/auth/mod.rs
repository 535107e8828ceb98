//! Who is calling, and whether they may: the principals the configuration declares, how a call
//! proves it is one of them (a bearer token, or a client certificate under mutual TLS), and the
//! rules that say what each may do.
//!
//! With no principal declared, every call is allowed (the loopback-only rule in
//! [`Config::check_exposure`](crate::Config::check_exposure) keeps that safe). Once one is
//! declared, access is denied by default: a call without valid credentials is refused with
//! `UNAUTHENTICATED` before any service sees it, and a call outside its principal's rules with
//! `PERMISSION_DENIED` naming the right it lacks. The table is swapped whole on SIGHUP; a call
//! is judged by the table in force when it arrives, and a stream again at each reload.

mod access;
pub mod certificate;
pub mod rules;
pub mod token;

use std::sync::Arc;

use ferry_core::names::quote;
use tokio::sync::watch;
use tonic::{Request, Status};

pub use access::{Access, Credential, Principal};

use crate::throttle::Throttle;
pub use rules::{Resource, Right, Rule};

/// Who made a call, found by the [`Authenticator`] and carried in the request's extensions.
#[derive(Debug, Clone)]
pub struct Caller {
    /// None when no principal is declared: every caller may do everything.
    principal: Option<Arc<Principal>>,
    /// What it presented, to be matched again after a reload.
    credential: Arc<Credential>,
    /// The table it was found in.
    access: Arc<Access>,
}

impl Caller {
    /// The caller of `request`, judged by the principals `gate` holds now (a reload may have
    /// come between its headers and its body). A request the authenticator did not see is
    /// refused: failing closed is the point.
    pub fn of<T>(request: &Request<T>, gate: &Gate) -> Result<Caller, Status> {
        let caller = request.extensions().get::<Caller>().ok_or_else(|| {
            tracing::error!("a call reached a service without being authenticated: refused");
            Status::unauthenticated("the call's credentials were not checked")
        })?;
        caller.current(gate)
    }

    /// The caller as the table in force now sees it: itself if the table has not changed,
    /// `UNAUTHENTICATED` if what it presented no longer counts.
    pub fn current(&self, gate: &Gate) -> Result<Caller, Status> {
        let access = gate.current();
        if Arc::ptr_eq(&access, &self.access) {
            return Ok(self.clone());
        }
        let principal = access.identify(&self.credential).map_err(|reason| {
            Status::unauthenticated(format!("since the configuration was reloaded, {reason}"))
        })?;
        Ok(Caller {
            principal,
            credential: self.credential.clone(),
            access,
        })
    }

    /// Whether the caller holds `right` on `resource`.
    pub fn may(&self, right: Right, resource: Resource<'_>) -> bool {
        match &self.principal {
            None => true,
            Some(principal) => principal.rules(right).iter().any(|r| r.reaches(resource)),
        }
    }

    /// Allows the call if the caller holds `right` on `resource`.
    pub fn require(&self, right: Right, resource: Resource<'_>) -> Result<(), Status> {
        self.require_any(&[right], resource)
    }

    /// Allows the call if the caller holds one of `rights` on `resource`.
    pub fn require_any(&self, rights: &[Right], resource: Resource<'_>) -> Result<(), Status> {
        let Some(principal) = &self.principal else {
            return Ok(());
        };
        if rights.iter().any(|&right| self.may(right, resource)) {
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

    /// Whether any of the caller's rules concerns `channel`: what listings show.
    pub fn may_see_channel(&self, channel: &str) -> bool {
        match &self.principal {
            None => true,
            Some(principal) => [Right::Publish, Right::Subscribe, Right::Admin]
                .iter()
                .any(|&right| principal.rules(right).iter().any(|r| r.touches(channel))),
        }
    }

    /// Allows reading `channel`'s figures to a caller with any right that concerns it.
    pub fn require_visible(&self, channel: &str) -> Result<(), Status> {
        match &self.principal {
            Some(principal) if !self.may_see_channel(channel) => {
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
}

/// The principals table in force, shared by every connection and swapped whole on reload;
/// streams watch it to be judged again.
#[derive(Debug, Clone)]
pub struct Gate(Arc<watch::Sender<Arc<Access>>>);

impl Gate {
    /// A gate over `access`.
    pub fn new(access: Access) -> Gate {
        Gate(Arc::new(watch::channel(Arc::new(access)).0))
    }

    /// The table in force now.
    pub fn current(&self) -> Arc<Access> {
        self.0.borrow().clone()
    }

    /// Puts `access` in force for the calls that arrive from now on, and tells open streams.
    pub fn replace(&self, access: Access) {
        self.0.send_replace(Arc::new(access));
    }

    /// Wakes at every later replacement.
    pub fn changes(&self) -> watch::Receiver<Arc<Access>> {
        self.0.subscribe()
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
    /// The names of the certificates of recent connections, shared by every service's
    /// authenticator.
    seen: Arc<certificate::Seen>,
}

impl Authenticator {
    /// Guards `guarded` with the table `gate` holds at each call, reading certificates'
    /// names through `seen`.
    pub fn new(gate: Gate, guarded: Guarded, seen: Arc<certificate::Seen>) -> Authenticator {
        Authenticator {
            gate,
            guarded,
            seen,
        }
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
        // A certificate's names are read (an x509 parse, once per connection) only when
        // principals could match them: with none declared, every caller may do everything.
        let credential = Credential::of(request.metadata(), || {
            let chain = request
                .peer_certs()
                .filter(|chain| access.is_enforced() && !chain.is_empty())?;
            Some(self.seen.names(&chain))
        });
        match access.identify(&credential) {
            Ok(principal) => {
                request.extensions_mut().insert(Caller {
                    principal,
                    credential: Arc::new(credential),
                    access,
                });
                Ok(request)
            }
            Err(_) if open => Ok(request),
            Err(reason) => {
                log_refusal(&request, &reason);
                Err(Status::unauthenticated(reason))
            }
        }
    }
}

/// Refusals are logged at most once a second.
static REFUSALS: Throttle = Throttle::new();

fn log_refusal<T>(request: &Request<T>, reason: &str) {
    if let Some(left_out) = REFUSALS.pass() {
        tracing::info!(peer = ?request.remote_addr(), %reason, left_out, "call refused: not authenticated");
    }
}
