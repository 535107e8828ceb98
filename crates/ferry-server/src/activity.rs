//! What the server has open now: client connections, publish streams and consumer streams,
//! counted for the metrics endpoint. Each is counted by a guard that lives as long as it does.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// The counts, shared by the services and the metrics endpoint.
#[derive(Debug, Default)]
pub struct Activity {
    counts: [AtomicI64; 3],
}

/// What is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// A client connection.
    Connection = 0,
    /// A `PublishStream` call.
    PublishStream = 1,
    /// A `Subscribe` call (one consumer).
    SubscribeStream = 2,
}

/// Counts one open thing until it is dropped.
#[derive(Debug)]
pub struct Held {
    activity: Arc<Activity>,
    what: Open,
}

impl Activity {
    /// Counts one more `what` while the returned guard lives.
    pub fn open(self: &Arc<Self>, what: Open) -> Held {
        self.counts[what as usize].fetch_add(1, Ordering::Relaxed);
        Held {
            activity: self.clone(),
            what,
        }
    }

    /// How many `what` are open now.
    pub fn now(&self, what: Open) -> u64 {
        self.counts[what as usize].load(Ordering::Relaxed).max(0) as u64
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.activity.counts[self.what as usize].fetch_sub(1, Ordering::Relaxed);
    }
}
