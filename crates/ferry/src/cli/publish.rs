//! `ferry publish`: one message from the command line or a file, or one per line of a file or
//! of standard input.

use std::collections::VecDeque;
use std::path::PathBuf;

use bytes::Bytes;
use ferry_client::{Client, Confirmation, Error, Message, Published};
use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, BufReader};

use super::{Common, Progress};

/// `ferry publish`.
#[derive(clap::Args, Debug)]
pub struct PublishArgs {
    /// The channel to publish to.
    channel: String,
    /// The payload. Without it, the payload is --file, or standard input.
    data: Option<String>,
    /// Publish this file: as one message, or one per line with --lines.
    #[arg(long, value_name = "FILE", conflicts_with = "data")]
    file: Option<PathBuf>,
    /// One message per line (of --file, or of standard input), in order, pipelined.
    #[arg(long, conflicts_with = "data")]
    lines: bool,
    /// An attribute, NAME=VALUE (repeatable).
    #[arg(long = "attr", value_name = "NAME=VALUE", value_parser = parse_attribute)]
    attributes: Vec<(String, String)>,
    /// The ordering key.
    #[arg(long)]
    key: Option<String>,
    /// The id the channel de-duplicates on (with --lines, ID-1, ID-2, ... by line).
    #[arg(long)]
    id: Option<String>,
    #[command(flatten)]
    common: Common,
}

fn parse_attribute(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not NAME=VALUE")),
    }
}

impl PublishArgs {
    /// Runs the command.
    pub fn run(self) -> std::process::ExitCode {
        let common = self.common.clone();
        super::run(&common, |client| self.publish(client))
    }

    fn message(&self, payload: Bytes, line: Option<u64>) -> Message {
        let mut message = Message::new(payload);
        for (name, value) in &self.attributes {
            message = message.attribute(name.clone(), value.clone());
        }
        if let Some(key) = &self.key {
            message = message.key(key.clone());
        }
        if let Some(id) = &self.id {
            message = message.id(match line {
                Some(n) => format!("{id}-{n}"),
                None => id.clone(),
            });
        }
        message
    }

    async fn publish(self, client: Client) -> Result<(), Error> {
        let input: Box<dyn AsyncRead + Unpin + Send> = match (&self.data, &self.file) {
            (Some(data), _) => Box::new(std::io::Cursor::new(data.clone().into_bytes())),
            (None, Some(path)) => Box::new(
                tokio::fs::File::open(path)
                    .await
                    .map_err(|e| Error::Invalid(format!("cannot read {}: {e}", path.display())))?,
            ),
            (None, None) => Box::new(tokio::io::stdin()),
        };
        match self.lines {
            true => self.publish_lines(&client, input).await,
            false => self.publish_one(&client, input).await,
        }
    }

    async fn publish_one(
        &self,
        client: &Client,
        mut input: Box<dyn AsyncRead + Unpin + Send>,
    ) -> Result<(), Error> {
        let mut payload = Vec::new();
        (input.read_to_end(&mut payload).await)
            .map_err(|e| Error::Invalid(format!("cannot read the payload: {e}")))?;
        let message = self.message(payload.into(), None);
        let published = client.publisher(&self.channel).publish(message).await?;
        match self.common.json {
            true => println!(
                "{}",
                serde_json::json!({
                    "channel": self.channel,
                    "sequence": published.sequence,
                    "duplicate": published.duplicate,
                    "delayed": published.delayed,
                })
            ),
            false => println!("{}: {}", self.channel, describe(&published)),
        }
        Ok(())
    }

    async fn publish_lines(
        &self,
        client: &Client,
        input: Box<dyn AsyncRead + Unpin + Send>,
    ) -> Result<(), Error> {
        let publisher = client.publisher(&self.channel);
        let mut input = BufReader::new(input);
        let mut progress = Progress::new("published");
        let mut pending: VecDeque<Confirmation> = VecDeque::new();
        let mut outcome = Outcome::default();
        let mut number = 0;
        loop {
            // Lines are bytes: a payload need not be text.
            let mut line = Vec::new();
            let read = (input.read_until(b'\n', &mut line).await)
                .map_err(|e| Error::Invalid(format!("cannot read line {}: {e}", number + 1)));
            let read = match read {
                Ok(read) => read,
                Err(e) => {
                    // What was sent is settled and said before the error.
                    settle_all(&mut pending, &mut outcome).await;
                    eprintln!("ferry: stopped after {} message(s)", outcome.published);
                    return Err(e);
                }
            };
            if read == 0 {
                break;
            }
            if line.ends_with(b"\n") {
                line.pop();
                if line.ends_with(b"\r") {
                    line.pop();
                }
            }
            number += 1;
            let message = self.message(Bytes::from(line), Some(number));
            pending.push_back(publisher.send(message).await?);
            // Confirmations come in order: waiting for the oldest bounds what is pending.
            if pending.len() >= PENDING {
                outcome.add(pending.pop_front().expect("pending").await?);
                progress.show(outcome.published);
            }
        }
        for confirmation in pending {
            outcome.add(confirmation.await?);
        }
        progress.clear();
        match self.common.json {
            true => println!(
                "{}",
                serde_json::json!({
                    "channel": self.channel,
                    "published": outcome.published,
                    "duplicates": outcome.duplicates,
                    "first_sequence": outcome.first,
                    "last_sequence": outcome.last,
                })
            ),
            false => println!(
                "{}: published {} message(s){}{}",
                self.channel,
                outcome.published,
                match (outcome.first, outcome.last) {
                    (Some(first), Some(last)) => format!(", sequences {first} to {last}"),
                    _ => String::new(),
                },
                match outcome.duplicates {
                    0 => String::new(),
                    n => format!(" ({n} duplicate(s) not stored again)"),
                }
            ),
        }
        Ok(())
    }
}

/// Waits for what was sent, counting what was confirmed (a refusal ends the count).
async fn settle_all(pending: &mut VecDeque<Confirmation>, outcome: &mut Outcome) {
    while let Some(confirmation) = pending.pop_front() {
        match confirmation.await {
            Ok(published) => outcome.add(published),
            Err(_) => break,
        }
    }
}

/// The most confirmations waited for at once.
const PENDING: usize = 10_000;

/// What a run of lines came to.
#[derive(Default)]
struct Outcome {
    published: u64,
    duplicates: u64,
    first: Option<u64>,
    last: Option<u64>,
}

impl Outcome {
    fn add(&mut self, published: Published) {
        self.published += 1;
        if published.duplicate {
            self.duplicates += 1;
        } else if published.sequence > 0 {
            self.first.get_or_insert(published.sequence);
            self.last = Some(published.sequence);
        }
    }
}

fn describe(published: &Published) -> String {
    match (published.duplicate, published.delayed) {
        (true, _) => format!(
            "duplicate of sequence {} (not stored again)",
            published.sequence
        ),
        (false, true) => "delayed (it gets its sequence when due)".to_owned(),
        (false, false) => format!("sequence {}", published.sequence),
    }
}
