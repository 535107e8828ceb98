//! The broker's histograms, observed where the events happen and read by the metrics
//! endpoint: how long a publish waits to be confirmed, how long a message waits between its
//! publish and its first delivery, and what each group commit took (its device sync, its
//! messages).

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// Latency and group histograms (latencies in seconds, buckets from 100 µs, doubling, to
/// about 3.3 s; group sizes from 1 message, doubling, to 32,768).
#[derive(Debug, Clone)]
pub struct Latencies {
    /// From a publish request being queued to its batch being durable.
    pub publish: Histogram,
    /// From a message's publish time to its first delivery to a consumer.
    pub delivery: Histogram,
    /// From the store's writer taking a group to the group being durable (when its callers
    /// are answered; sled indexes it after).
    pub commit: Histogram,
    /// The device sync (`fdatasync`) of the segment log in each commit that had one.
    pub sync: Histogram,
    /// Messages per commit.
    pub group_messages: Histogram,
}

impl Default for Latencies {
    fn default() -> Self {
        let seconds = || exponential_buckets(0.0001, 2.0, 16);
        Self {
            publish: Histogram::new(seconds()),
            delivery: Histogram::new(seconds()),
            commit: Histogram::new(seconds()),
            sync: Histogram::new(seconds()),
            group_messages: Histogram::new(exponential_buckets(1.0, 2.0, 16)),
        }
    }
}

impl ferry_store::CommitObserver for Latencies {
    fn committed(&self, commit: &ferry_store::Commit) {
        self.commit.observe(commit.took.as_secs_f64());
        if let Some(sync) = commit.sync {
            self.sync.observe(sync.as_secs_f64());
        }
        self.group_messages.observe(commit.messages as f64);
    }
}
