//! The broker's latency histograms, observed where the events happen and read by the metrics
//! endpoint: how long a publish waits to be confirmed, and how long a message waits between
//! its publish and its first delivery.

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// Latency histograms, in seconds (buckets from 100 µs, doubling, to about 3.3 s).
#[derive(Debug, Clone)]
pub struct Latencies {
    /// From a publish request being queued to its batch being durable.
    pub publish: Histogram,
    /// From a message's publish time to its first delivery to a consumer.
    pub delivery: Histogram,
}

impl Default for Latencies {
    fn default() -> Self {
        let buckets = || exponential_buckets(0.0001, 2.0, 16);
        Self {
            publish: Histogram::new(buckets()),
            delivery: Histogram::new(buckets()),
        }
    }
}
