//! `ferry subscribe`: prints a subscription's deliveries as they arrive.

use std::io::IsTerminal as _;
use std::time::Duration;

use ferry_client::{Client, Delivery, Error, Received, SubscribeOptions};

use super::{Common, Progress};

/// `ferry subscribe`.
#[derive(clap::Args, Debug)]
pub struct SubscribeArgs {
    /// The channel (or, for a wildcard subscription, its pattern).
    channel: String,
    /// The subscription.
    subscription: String,
    /// Stop after this many deliveries.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// Stop after this long without a delivery (e.g. 2s, 500ms).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    idle: Option<Duration>,
    /// Do not ack: the deliveries are held until the command ends, then go back to the
    /// subscription (delivered again, to this or another consumer).
    #[arg(long)]
    no_ack: bool,
    /// The most deliveries held unacked at once (0: the broker's default).
    #[arg(long, value_name = "N", default_value_t = 0)]
    window: u32,
    #[command(flatten)]
    common: Common,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))
}

impl SubscribeArgs {
    /// Runs the command.
    pub fn run(self) -> std::process::ExitCode {
        let common = self.common.clone();
        super::run(&common, |client| self.subscribe(client))
    }

    async fn subscribe(self, client: Client) -> Result<(), Error> {
        // Held without acks, the deliveries fill the window: it must hold all of them.
        let window = match (self.no_ack, self.count) {
            (true, Some(count)) => self.window.max(u32::try_from(count).unwrap_or(u32::MAX)),
            _ => self.window,
        };
        let options = SubscribeOptions {
            max_messages: window,
            // A command that stops at the first refusal says why instead of retrying.
            reconnect: false,
            ..SubscribeOptions::default()
        };
        let mut deliveries = client.subscribe_with(&self.channel, &self.subscription, options);
        let mut held: Vec<Delivery> = Vec::new();
        let mut seen = 0u64;
        // Deliveries written to a file or a pipe: a count on the terminal meanwhile.
        let mut progress = (!std::io::stdout().is_terminal()).then(|| Progress::new("received"));
        while self.count.is_none_or(|count| seen < count) {
            let next = match self.idle {
                Some(idle) => match tokio::time::timeout(idle, deliveries.next()).await {
                    Ok(next) => next,
                    Err(_) => break,
                },
                None => deliveries.next().await,
            };
            let Some(delivery) = next else { break };
            let delivery = delivery?;
            seen += 1;
            if let Some(progress) = &mut progress {
                progress.show(seen);
            }
            let text = match self.common.json {
                true => super::json::message(delivery.message()).to_string(),
                false => line(delivery.message()),
            };
            // A reader that went away (`| head -1`) ends the command, unacked.
            if !super::print(&text) {
                break;
            }
            match self.no_ack {
                true => held.push(delivery),
                false => delivery.ack().await?,
            }
        }
        if let Some(progress) = progress {
            progress.clear();
        }
        Ok(())
    }
}

/// One delivery for people: where it is from, its key, id and attributes, and its payload
/// (as text when it is UTF-8).
fn line(m: &Received) -> String {
    let mut out = format!("{} #{}", m.channel, m.sequence);
    if m.attempt > 1 {
        out.push_str(&format!(" (attempt {})", m.attempt));
    }
    if !m.key.is_empty() {
        out.push_str(&format!(" key={}", m.key));
    }
    if !m.id.is_empty() {
        out.push_str(&format!(" id={}", m.id));
    }
    let mut attributes: Vec<_> = m.attributes.iter().collect();
    attributes.sort();
    for (name, value) in attributes {
        out.push_str(&format!(" {name}={value}"));
    }
    match std::str::from_utf8(&m.payload) {
        Ok(text) => out.push_str(&format!(": {text}")),
        Err(_) => out.push_str(&format!(": <{} bytes>", m.payload.len())),
    }
    out
}
