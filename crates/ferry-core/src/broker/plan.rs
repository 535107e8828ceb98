//! Declarations against what the broker holds: what applying a configuration's channels,
//! subscriptions and derived channels would create, change, keep or refuse ([`Broker::plan`],
//! for `ferry config diff`), and applying the safe part of it ([`Broker::reload`], for SIGHUP).
//!
//! Nothing is ever deleted by a declaration: what the configuration no longer names stays.
//! Refused are the changes nothing can apply (a subscription's filter, a derived channel's
//! filter or reshaping) and what cannot exist (a dead-letter channel that is neither held nor
//! declared); everything else is applied as `declare` does at start-up.

use std::collections::BTreeSet;

use super::Broker;
use crate::derive::DerivedSpec;
use crate::error::CoreError;
use crate::pattern::Pattern;
use crate::{ChannelDecl, ChannelSettings, SubscriptionDecl, SubscriptionSettings};

/// What a declaration comes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// It does not exist: it would be created.
    Create,
    /// It exists with other settings: they would be changed.
    Change,
    /// It exists as declared.
    Keep,
    /// It cannot be applied (the detail says why).
    Refuse,
}

/// One declaration and what it comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// What would be done.
    pub action: Action,
    /// What it is about: `channel orders`, `subscription billing of orders`,
    /// `derived orders.* -> audit`.
    pub object: String,
    /// What changes, or why it is refused ("" when there is nothing to say).
    pub detail: String,
}

/// A step and what carries it out.
struct Planned<'a> {
    step: Step,
    todo: Option<Todo<'a>>,
}

enum Todo<'a> {
    Channel(&'a ChannelDecl),
    Subscription(&'a str, &'a SubscriptionDecl),
    Derived(&'a DerivedSpec),
}

impl Broker {
    /// What applying these declarations would do, step by step, changing nothing.
    pub async fn plan(&self, channels: &[ChannelDecl], derived: &[DerivedSpec]) -> Vec<Step> {
        let planned = self.planned(channels, derived).await;
        planned.into_iter().map(|p| p.step).collect()
    }

    /// Applies what of these declarations can be (creations and changes), refuses the rest,
    /// and says what became of each step (a step that failed as it was applied is refused,
    /// with the error).
    pub async fn reload(&self, channels: &[ChannelDecl], derived: &[DerivedSpec]) -> Vec<Step> {
        let mut out = Vec::new();
        for Planned { mut step, todo } in self.planned(channels, derived).await {
            if let Some(todo) = todo
                && matches!(step.action, Action::Create | Action::Change)
                && let Err(e) = self.carry_out(todo, step.action).await
            {
                step.action = Action::Refuse;
                step.detail = e.to_string();
            }
            out.push(step);
        }
        out
    }

    async fn carry_out(&self, todo: Todo<'_>, action: Action) -> Result<(), CoreError> {
        match (todo, action) {
            (Todo::Channel(decl), Action::Create) => self
                .create_channel(&decl.name, decl.settings)
                .await
                .map(drop),
            (Todo::Channel(decl), _) => self
                .update_channel(&decl.name, decl.settings)
                .await
                .map(drop),
            (Todo::Subscription(channel, sub), Action::Create) => self
                .create_subscription(
                    channel,
                    &sub.name,
                    sub.settings.clone(),
                    crate::Point::Latest,
                )
                .await
                .map(drop),
            (Todo::Subscription(channel, sub), _) => {
                self.update_subscription(channel, &sub.name, sub.settings.clone())
                    .await
            }
            (Todo::Derived(spec), _) => self.create_derived(spec.clone()).await.map(drop),
        }
    }

    async fn planned<'a>(
        &self,
        channels: &'a [ChannelDecl],
        derived: &'a [DerivedSpec],
    ) -> Vec<Planned<'a>> {
        let mut out = Vec::new();
        // Channels the plan holds once applied: a subscription may name one as its
        // dead-letter channel although it is only declared.
        let mut held: BTreeSet<String> = (self.inner.channels.read().expect("channels lock"))
            .keys()
            .cloned()
            .collect();
        for decl in channels.iter().filter(|d| !Pattern::is_pattern(&d.name)) {
            let object = format!("channel {}", decl.name);
            let step = match self.channel_info(&decl.name).await {
                Err(_) => step(Action::Create, object, String::new()),
                Ok(info) => match channel_changes(&info.settings, &decl.settings) {
                    changes if changes.is_empty() => step(Action::Keep, object, String::new()),
                    changes => step(Action::Change, object, changes.join(", ")),
                },
            };
            held.insert(decl.name.clone());
            out.push(Planned {
                step,
                todo: Some(Todo::Channel(decl)),
            });
        }
        for decl in channels {
            for sub in &decl.subscriptions {
                let step = self.plan_subscription(&decl.name, sub, &held).await;
                out.push(Planned {
                    step,
                    todo: Some(Todo::Subscription(&decl.name, sub)),
                });
            }
        }
        let existing = self.list_derived();
        for spec in derived {
            let object = format!("derived {} -> {}", spec.source, spec.target);
            let found = existing
                .iter()
                .find(|d| d.spec.source == spec.source && d.spec.target == spec.target);
            let step = match found {
                Some(d) if d.spec == *spec => step(Action::Keep, object, String::new()),
                Some(_) => step(
                    Action::Refuse,
                    object,
                    "a derived channel cannot change its filter or reshaping: delete it \
                     (Admin.DeleteDerived) to declare it anew"
                        .to_owned(),
                ),
                None if !Pattern::is_pattern(&spec.source) && !held.contains(&spec.source) => {
                    let why = format!(
                        "its source {:?} neither exists nor is declared",
                        spec.source
                    );
                    step(Action::Refuse, object, why)
                }
                None => match spec
                    .reshape
                    .check()
                    .and_then(|()| self.check_new_derived(spec))
                {
                    Ok(()) => step(Action::Create, object, String::new()),
                    Err(e) => step(Action::Refuse, object, e.to_string()),
                },
            };
            out.push(Planned {
                step,
                todo: Some(Todo::Derived(spec)),
            });
        }
        out
    }

    async fn plan_subscription(
        &self,
        channel: &str,
        sub: &SubscriptionDecl,
        held: &BTreeSet<String>,
    ) -> Step {
        let object = format!("subscription {} of {channel}", sub.name);
        let wanted = &sub.settings;
        if let Some(dead) = &wanted.dead_letter_channel {
            let feeds_back = match Pattern::parse(channel) {
                Ok(pattern) => pattern.matches(dead),
                Err(_) => dead == channel,
            };
            let why = if !held.contains(dead) {
                Some(format!(
                    "its dead-letter channel {dead:?} neither exists nor is declared"
                ))
            } else if feeds_back {
                Some(format!(
                    "its dead-letter channel {dead:?} is one it reads: a message that keeps \
                     failing would come back to it"
                ))
            } else {
                None
            };
            if let Some(why) = why {
                return step(Action::Refuse, object, why);
            }
        }
        let Ok(info) = self.subscription_info(channel, &sub.name).await else {
            return step(Action::Create, object, String::new());
        };
        let current = info.client_settings();
        if current.filter != wanted.filter {
            let why = format!(
                "its filter is {:?}; a filter cannot change (as in Pub/Sub): create a new \
                 subscription with the new filter",
                current.filter.unwrap_or_default()
            );
            return step(Action::Refuse, object, why);
        }
        match subscription_changes(&current, wanted) {
            changes if changes.is_empty() => step(Action::Keep, object, String::new()),
            changes => step(Action::Change, object, changes.join(", ")),
        }
    }
}

fn step(action: Action, object: String, detail: String) -> Step {
    Step {
        action,
        object,
        detail,
    }
}

/// `name: old -> new` for each setting that differs.
#[derive(Default)]
struct Changes(Vec<String>);

impl Changes {
    fn differ(&mut self, name: &str, old: String, new: String) {
        if old != new {
            self.0.push(format!("{name}: {old} -> {new}"));
        }
    }
}

fn channel_changes(current: &ChannelSettings, wanted: &ChannelSettings) -> Vec<String> {
    let mut out = Changes::default();
    let debug = |value: &dyn std::fmt::Debug| format!("{value:?}");
    out.differ(
        "retention",
        debug(&current.retention),
        debug(&wanted.retention),
    );
    out.differ(
        "dedup_window",
        ms(current.dedup_window_ms),
        ms(wanted.dedup_window_ms),
    );
    out.differ("ttl", ms(current.default_ttl_ms), ms(wanted.default_ttl_ms));
    out.differ("limits", debug(&current.limits), debug(&wanted.limits));
    out.0
}

fn subscription_changes(
    current: &SubscriptionSettings,
    wanted: &SubscriptionSettings,
) -> Vec<String> {
    let mut out = Changes::default();
    let dead_letter =
        |s: &SubscriptionSettings| format!("{:?}", s.dead_letter_channel.as_deref().unwrap_or(""));
    out.differ(
        "ack_deadline",
        ms(current.ack_deadline_ms),
        ms(wanted.ack_deadline_ms),
    );
    out.differ(
        "retry",
        format!("{:?}", current.retry),
        format!("{:?}", wanted.retry),
    );
    let attempts = |s: &SubscriptionSettings| s.max_delivery_attempts.to_string();
    out.differ("max_delivery_attempts", attempts(current), attempts(wanted));
    out.differ(
        "dead_letter_channel",
        dead_letter(current),
        dead_letter(wanted),
    );
    out.differ(
        "ordering",
        current.ordering.to_string(),
        wanted.ordering.to_string(),
    );
    out.0
}

fn ms(value: u64) -> String {
    format!("{value}ms")
}
