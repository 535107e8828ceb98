//! `ferry channels`, `ferry subscriptions` and `ferry status`: administration and a look at a
//! running broker.

use std::time::{Duration, SystemTime};

use ferry_client::{Client, Error, Start, SubscriptionInfo, SubscriptionOptions};
use serde_json::json;

use super::{Common, human_bytes, human_duration, json, table};

/// `ferry channels`.
#[derive(clap::Args, Debug)]
pub struct ChannelsArgs {
    #[command(subcommand)]
    action: ChannelAction,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Subcommand, Debug)]
enum ChannelAction {
    /// List the channels with their figures.
    List,
    /// Create a channel (default settings; a TOML declaration can say more).
    Create {
        /// Its name.
        name: String,
    },
    /// Show a channel and its subscriptions.
    Get {
        /// Its name.
        name: String,
    },
    /// Delete a channel with its messages and subscriptions.
    Delete {
        /// Its name.
        name: String,
    },
}

impl ChannelsArgs {
    /// Runs the command.
    pub fn run(self) -> std::process::ExitCode {
        let common = self.common.clone();
        super::run(&common, |client| self.channels(client))
    }

    async fn channels(self, client: Client) -> Result<(), Error> {
        let json = self.common.json;
        match self.action {
            ChannelAction::List => {
                let channels = client.channels().await?;
                if json {
                    let list: Vec<_> = channels.iter().map(json::channel).collect();
                    println!("{}", serde_json::Value::Array(list));
                    return Ok(());
                }
                let mut rows = vec![header(&[
                    "CHANNEL",
                    "MESSAGES",
                    "BYTES",
                    "NEXT SEQ",
                    "SUBSCRIPTIONS",
                ])];
                for c in &channels {
                    rows.push(vec![
                        c.name.clone(),
                        c.messages.to_string(),
                        human_bytes(c.bytes),
                        c.next_sequence.to_string(),
                        c.subscriptions.len().to_string(),
                    ]);
                }
                table(&rows);
            }
            ChannelAction::Create { name } => {
                let created = client.create_channel(&name).await?;
                match json {
                    true => println!("{}", json::channel(&created)),
                    false => println!("created channel {name}"),
                }
            }
            ChannelAction::Get { name } => {
                let channel = client.channel(&name).await?;
                if json {
                    println!("{}", json::channel(&channel));
                    return Ok(());
                }
                let held = match channel.messages {
                    0 => format!("empty, next sequence {}", channel.next_sequence),
                    n => format!(
                        "{n} message(s), {}, sequences {} to {}",
                        human_bytes(channel.bytes),
                        channel.first_sequence,
                        channel.next_sequence.saturating_sub(1)
                    ),
                };
                let delayed = match channel.delayed {
                    0 => String::new(),
                    n => format!(", {n} delayed"),
                };
                println!("channel {}: {held}{delayed}", channel.name);
                subscriptions_table(&channel.subscriptions);
            }
            ChannelAction::Delete { name } => {
                client.delete_channel(&name).await?;
                match json {
                    true => println!("{}", json!({ "deleted": name })),
                    false => println!("deleted channel {name}"),
                }
            }
        }
        Ok(())
    }
}

/// `ferry subscriptions`.
#[derive(clap::Args, Debug)]
pub struct SubscriptionsArgs {
    #[command(subcommand)]
    action: SubscriptionAction,
    #[command(flatten)]
    common: Common,
}

#[derive(clap::Subcommand, Debug)]
enum SubscriptionAction {
    /// List the subscriptions of a channel (or a pattern's wildcard subscriptions).
    List {
        /// The channel or pattern.
        channel: String,
    },
    /// Create a subscription (on a pattern like orders.*: a wildcard subscription).
    Create {
        /// The channel or pattern.
        channel: String,
        /// Its name.
        name: String,
        /// Deliver only messages that pass this filter (Pub/Sub's syntax).
        #[arg(long)]
        filter: Option<String>,
        /// How long a delivery may stay unacked (e.g. 30s).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        ack_deadline: Option<Duration>,
        /// Dead-letter a message after this many failed deliveries (with --dead-letter).
        #[arg(long, value_name = "N", requires = "dead_letter")]
        max_attempts: Option<u32>,
        /// The dead-letter channel.
        #[arg(long, value_name = "CHANNEL", requires = "max_attempts")]
        dead_letter: Option<String>,
        /// Where it starts: latest (default), earliest, a sequence, or an age (e.g. 1h: the
        /// messages published in the last hour).
        #[arg(long, value_name = "WHERE", value_parser = parse_start, default_value = "latest")]
        start: Start,
    },
    /// Show a subscription's figures.
    Get {
        /// The channel or pattern.
        channel: String,
        /// Its name.
        name: String,
    },
    /// Delete a subscription; its consumers are disconnected.
    Delete {
        /// The channel or pattern.
        channel: String,
        /// Its name.
        name: String,
    },
    /// Move a subscription: messages before the point count as acked, those after as not
    /// (replay, or skip ahead).
    Seek {
        /// The channel or pattern.
        channel: String,
        /// Its name.
        name: String,
        /// Where to: latest, earliest, a sequence, or an age (e.g. 1h: replay the last hour).
        #[arg(long, value_name = "WHERE", value_parser = parse_start)]
        to: Start,
    },
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))
}

fn parse_start(text: &str) -> Result<Start, String> {
    match text {
        "latest" => Ok(Start::Latest),
        "earliest" => Ok(Start::Earliest),
        _ => match text.parse::<u64>() {
            Ok(sequence) => Ok(Start::Sequence(sequence)),
            Err(_) => humantime::parse_duration(text)
                .ok()
                .and_then(|age| SystemTime::now().checked_sub(age))
                .map(Start::Time)
                .ok_or_else(|| {
                    format!("{text:?}: say latest, earliest, a sequence, or an age like 1h")
                }),
        },
    }
}

impl SubscriptionsArgs {
    /// Runs the command.
    pub fn run(self) -> std::process::ExitCode {
        let common = self.common.clone();
        super::run(&common, |client| self.subscriptions(client))
    }

    async fn subscriptions(self, client: Client) -> Result<(), Error> {
        let json = self.common.json;
        match self.action {
            SubscriptionAction::List { channel } => {
                let subscriptions = client.subscriptions(&channel).await?;
                match json {
                    true => {
                        let list: Vec<_> = subscriptions.iter().map(json::subscription).collect();
                        println!("{}", serde_json::Value::Array(list));
                    }
                    false => subscriptions_table(&subscriptions),
                }
            }
            SubscriptionAction::Create {
                channel,
                name,
                filter,
                ack_deadline,
                max_attempts,
                dead_letter,
                start,
            } => {
                let options = SubscriptionOptions {
                    ack_deadline,
                    max_delivery_attempts: max_attempts.unwrap_or(0),
                    dead_letter_channel: dead_letter.unwrap_or_default(),
                    filter: filter.unwrap_or_default(),
                    start,
                    ..SubscriptionOptions::default()
                };
                let created = client.create_subscription(&channel, &name, options).await?;
                match json {
                    true => println!("{}", json::subscription(&created)),
                    false => println!("created subscription {name} of {channel}"),
                }
            }
            SubscriptionAction::Get { channel, name } => {
                let subscription = client.subscription(&channel, &name).await?;
                match json {
                    true => println!("{}", json::subscription(&subscription)),
                    false => subscriptions_table(&[subscription]),
                }
            }
            SubscriptionAction::Seek { channel, name, to } => {
                let moved = client.seek(&channel, &name, to).await?;
                match json {
                    true => println!("{}", json::subscription(&moved)),
                    false => println!(
                        "moved subscription {name} of {channel}: {} unacked, {} waiting",
                        moved.unacked, moved.backlog
                    ),
                }
            }
            SubscriptionAction::Delete { channel, name } => {
                client.delete_subscription(&channel, &name).await?;
                match json {
                    true => println!("{}", json!({ "deleted": name, "channel": channel })),
                    false => println!("deleted subscription {name} of {channel}"),
                }
            }
        }
        Ok(())
    }
}

/// `ferry redrive`.
#[derive(clap::Args, Debug)]
pub struct RedriveArgs {
    /// The dead-letter channel.
    channel: String,
    /// Only dead letters of this subscription (their `ferry.dead_letter.subscription`).
    #[arg(long, value_name = "NAME")]
    subscription: Option<String>,
    /// The first sequence of the dead-letter channel to look at.
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    from: u64,
    /// The last one.
    #[arg(long, value_name = "SEQ", default_value_t = 0)]
    to: u64,
    /// Move at most this many.
    #[arg(long, value_name = "N", default_value_t = 0)]
    limit: u64,
    #[command(flatten)]
    common: Common,
}

impl RedriveArgs {
    /// Runs the command.
    pub fn run(self) -> std::process::ExitCode {
        let common = self.common.clone();
        super::run(&common, |client| self.redrive(client))
    }

    async fn redrive(self, client: Client) -> Result<(), Error> {
        let mut attributes = std::collections::HashMap::new();
        if let Some(subscription) = self.subscription {
            attributes.insert("ferry.dead_letter.subscription".to_owned(), subscription);
        }
        let selection = ferry_client::RedriveSelection {
            first_sequence: self.from,
            last_sequence: self.to,
            attributes,
            limit: self.limit,
        };
        let done = client.redrive(&self.channel, selection).await?;
        match self.common.json {
            true => println!(
                "{}",
                json!({
                    "redriven": done.redriven,
                    "skipped": done.skipped,
                    "first_skip_reason": done.first_skip_reason,
                })
            ),
            false => {
                println!("redrove {} message(s) from {}", done.redriven, self.channel);
                if done.skipped > 0 {
                    println!("left {}: {}", done.skipped, done.first_skip_reason);
                }
            }
        }
        Ok(())
    }
}

/// `ferry status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    common: Common,
}

impl StatusArgs {
    /// Runs the command.
    pub fn run(self) -> std::process::ExitCode {
        let common = self.common.clone();
        super::run(&common, |client| status(client, common.json))
    }
}

/// The broker's version, uptime and storage, and a table of every subscription.
async fn status(client: Client, as_json: bool) -> Result<(), Error> {
    let broker = client.broker().await?;
    let channels = client.channels().await?;
    if as_json {
        let document = json!({
            "server": client.address(),
            "version": broker.version,
            "uptime_ms": broker.uptime.as_millis() as u64,
            "disk_free_bytes": broker.disk_free_bytes,
            "publishing_refused": broker.publishing_refused,
            "message_cache_bytes": broker.message_cache_bytes,
            "channels": channels.iter().map(json::channel).collect::<Vec<_>>(),
        });
        println!("{document}");
        return Ok(());
    }
    let stored: u64 = channels.iter().map(|c| c.bytes).sum();
    println!(
        "ferry {} at {}: up {}, {} channel(s), {} stored, {} free on disk{}",
        broker.version,
        client.address(),
        human_duration(broker.uptime),
        channels.len(),
        human_bytes(stored),
        human_bytes(broker.disk_free_bytes),
        if broker.publishing_refused {
            " (PUBLISHING REFUSED: the disk is nearly full)"
        } else {
            ""
        }
    );
    let mut rows = vec![header(&[
        "CHANNEL",
        "MESSAGES",
        "SUBSCRIPTION",
        "BACKLOG",
        "IN FLIGHT",
        "OLDEST UNACKED",
        "CONSUMERS",
    ])];
    for c in &channels {
        if c.subscriptions.is_empty() {
            rows.push(vec![c.name.clone(), c.messages.to_string(), "-".into()]);
        }
        for s in &c.subscriptions {
            rows.push(vec![
                c.name.clone(),
                c.messages.to_string(),
                s.name.clone(),
                s.backlog.to_string(),
                s.in_flight.to_string(),
                s.oldest_unacked_age.map_or("-".into(), human_duration),
                s.consumers.to_string(),
            ]);
        }
    }
    table(&rows);
    Ok(())
}

fn header(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

fn subscriptions_table(subscriptions: &[SubscriptionInfo]) {
    let mut rows = vec![header(&[
        "SUBSCRIPTION",
        "BACKLOG",
        "IN FLIGHT",
        "ACKED",
        "OLDEST UNACKED",
        "CONSUMERS",
        "DEAD LETTERS",
        "FILTER",
    ])];
    for s in subscriptions {
        rows.push(vec![
            s.name.clone(),
            s.backlog.to_string(),
            s.in_flight.to_string(),
            s.acked.to_string(),
            s.oldest_unacked_age.map_or("-".into(), human_duration),
            s.consumers.to_string(),
            match s.dead_letter_channel.as_str() {
                "" => "-".into(),
                channel => format!("{} to {channel}", s.dead_lettered),
            },
            match s.filter.as_str() {
                "" => "-".into(),
                filter => filter.to_owned(),
            },
        ]);
    }
    table(&rows);
}
