//! Permission rules: what each right of a principal reaches.
//!
//! A rule names channels, by name or by pattern (`orders.*`, `orders.>`, and `>` alone for
//! every channel), and may narrow them to some of their subscriptions: `orders.*/billing`. A
//! resource that is itself a pattern (a wildcard subscription, a derived channel's source) is
//! reached only by a rule that covers every channel the pattern could match.

use std::fmt;

use ferry_core::names::{self, quote};
use ferry_core::pattern::Pattern;

/// One of the three rights a rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Right {
    /// Publish and PublishStream.
    Publish,
    /// Subscribe (with its acks, nacks and extensions) and reading a subscription's figures.
    Subscribe,
    /// Everything that creates, changes or deletes.
    Admin,
}

impl fmt::Display for Right {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Right::Publish => "publish",
            Right::Subscribe => "subscribe",
            Right::Admin => "admin",
        })
    }
}

/// What a call acts on.
#[derive(Debug, Clone, Copy)]
pub enum Resource<'a> {
    /// A channel, or a channel pattern.
    Channel(&'a str),
    /// A subscription of a channel (or of a pattern, for a wildcard subscription).
    Subscription {
        /// The channel or pattern.
        channel: &'a str,
        /// The subscription's name.
        name: &'a str,
    },
    /// The whole broker (a plan of a whole configuration): only `>` reaches it.
    Everything,
}

impl Resource<'_> {
    /// A wildcard subscription's member on one channel is named `PATTERN/NAME`: rights over it
    /// are rights over the wildcard subscription. Any other name with a `/` (which no client
    /// can create) is reached by no rule: None.
    fn normalized(self) -> Option<Self> {
        let Resource::Subscription { channel, name } = self else {
            return Some(self);
        };
        let Some((pattern, name)) = name.split_once('/') else {
            return Some(self);
        };
        let member = Pattern::is_pattern(pattern)
            && Pattern::parse(pattern).is_ok_and(|p| p.matches(channel));
        member.then_some(Resource::Subscription {
            channel: pattern,
            name,
        })
    }
}

impl fmt::Display for Resource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Channel(channel) => write!(f, "channel {}", quote(channel)),
            Resource::Subscription { channel, name } => {
                write!(f, "subscription {} of {}", quote(name), quote(channel))
            }
            Resource::Everything => f.write_str("every channel (\">\")"),
        }
    }
}

/// Names a rule reaches: one name, or what a pattern matches.
#[derive(Debug, Clone)]
enum Names {
    Exact(String),
    Matching(Pattern),
}

impl Names {
    fn parse(what: &str, text: &str) -> Result<Names, String> {
        if Pattern::is_pattern(text) {
            Pattern::parse(text)
                .map(Names::Matching)
                .map_err(|e| e.to_string())
        } else {
            names::validate(what, text)
                .map(|()| Names::Exact(text.to_owned()))
                .map_err(|e| e.to_string())
        }
    }

    /// Whether it reaches `target`, a name or, for a wildcard resource, a pattern.
    fn covers(&self, target: &str) -> bool {
        match (self, Pattern::is_pattern(target)) {
            (Names::Exact(name), false) => name == target,
            (Names::Exact(_), true) => false,
            (Names::Matching(pattern), false) => pattern.matches(target),
            (Names::Matching(pattern), true) => {
                Pattern::parse(target).is_ok_and(|inner| pattern.covers(&inner))
            }
        }
    }

    fn is_everything(&self) -> bool {
        matches!(self, Names::Matching(pattern) if pattern.as_str() == ">")
    }
}

/// One rule: channels, and optionally which of their subscriptions.
#[derive(Debug, Clone)]
pub struct Rule {
    channels: Names,
    subscriptions: Option<Names>,
}

impl Rule {
    /// Parses `CHANNEL` or `CHANNEL/SUBSCRIPTION`, each a name or a pattern.
    pub fn parse(text: &str) -> Result<Rule, String> {
        let (channels, subscriptions) = match text.split_once('/') {
            Some((channels, subscriptions)) => (channels, Some(subscriptions)),
            None => (text, None),
        };
        Ok(Rule {
            channels: Names::parse("channel", channels)?,
            subscriptions: subscriptions
                .map(|s| Names::parse("subscription", s))
                .transpose()?,
        })
    }

    /// Whether the rule names subscriptions rather than whole channels.
    pub fn is_narrowed(&self) -> bool {
        self.subscriptions.is_some()
    }

    /// Whether the rule reaches `resource`. A rule narrowed to subscriptions does not reach
    /// their channel itself.
    pub fn reaches(&self, resource: Resource<'_>) -> bool {
        let Some(resource) = resource.normalized() else {
            return false;
        };
        match resource {
            Resource::Channel(channel) => {
                self.subscriptions.is_none() && self.channels.covers(channel)
            }
            Resource::Subscription { channel, name } => {
                self.channels.covers(channel)
                    && self.subscriptions.as_ref().is_none_or(|s| s.covers(name))
            }
            Resource::Everything => self.subscriptions.is_none() && self.channels.is_everything(),
        }
    }

    /// Whether the rule says anything about `channel` (or one of its subscriptions): what
    /// makes a channel visible in listings.
    pub fn touches(&self, channel: &str) -> bool {
        self.channels.covers(channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reaches(rule: &str, resource: Resource<'_>) -> bool {
        Rule::parse(rule).unwrap().reaches(resource)
    }

    #[test]
    fn rules_reach_channels_by_name_and_pattern() {
        use Resource::Channel;
        assert!(reaches("orders.created", Channel("orders.created")));
        assert!(!reaches("orders.created", Channel("orders.updated")));
        assert!(reaches("orders.*", Channel("orders.created")));
        assert!(!reaches("orders.*", Channel("orders.eu.created")));
        assert!(reaches("orders.>", Channel("orders.eu.created")));
        assert!(reaches(">", Channel("anything.at.all")));
        // A wildcard resource needs a rule that covers all it could match.
        assert!(reaches("orders.>", Channel("orders.*")));
        assert!(!reaches("orders.*", Channel("orders.>")));
        assert!(!reaches("orders.created", Channel("orders.*")));
        assert!(reaches(">", Resource::Everything));
        assert!(!reaches("orders.>", Resource::Everything));
    }

    #[test]
    fn narrowed_rules_reach_only_their_subscriptions() {
        let sub = |channel, name| Resource::Subscription { channel, name };
        assert!(reaches(
            "orders.*/billing",
            sub("orders.created", "billing")
        ));
        assert!(!reaches("orders.*/billing", sub("orders.created", "audit")));
        assert!(!reaches(
            "orders.*/billing",
            Resource::Channel("orders.created")
        ));
        assert!(reaches("orders.>", sub("orders.created", "audit")));
        assert!(reaches("orders.*/billing.*", sub("orders.x", "billing.eu")));
        // A wildcard subscription's member is judged as the wildcard subscription.
        assert!(reaches(
            "orders.>/audit",
            sub("orders.created", "orders.*/audit")
        ));
        assert!(!reaches(
            "orders.created/audit",
            sub("orders.created", "orders.*/audit")
        ));
        // Not a member: its pattern must be a pattern, and match the channel.
        assert!(!reaches(">", sub("orders.created", "payments.*/audit")));
        assert!(!reaches(">", sub("orders.created", "orders/audit")));
        let rule = Rule::parse("orders.*/billing").unwrap();
        assert!(rule.touches("orders.created") && !rule.touches("payments.created"));
    }

    #[test]
    fn bad_rules_are_explained() {
        for (bad, why) in [
            ("orders.>.x", "last word"),
            ("orders created", "contains ' '"),
            ("orders.*/", "must not be empty"),
            ("", "must not be empty"),
        ] {
            let message = Rule::parse(bad).unwrap_err();
            assert!(message.contains(why), "{bad}: {message}");
        }
    }
}
