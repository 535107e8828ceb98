//! A consumer's outbox: the events waiting for its stream to send them, bounded in bytes.
//!
//! The dispatcher and the tasks that answer acks put events in; the consumer's stream takes
//! them out as fast as HTTP/2 flow control lets it send. Three rules keep it bounded whatever
//! the client does:
//!
//! - deliveries go in only while the outbox holds less than its byte limit (an empty outbox
//!   takes one event whatever its size), so a consumer that reads slowly is simply given less
//!   (its redeliveries go to others);
//! - results always go in (the consumer asked for them), but a consumer's next request is only
//!   taken once the outbox is below its limit plus `RESULT_SLACK`, so a client that sends acks
//!   and never reads the answers is pushed back by HTTP/2 flow control instead;
//! - the dispatcher detaches a consumer whose outbox has not drained for the stall timeout.
//!
//! A close (the consumer detached, its subscription deleted, the broker stopping) jumps the
//! queue and empties it at once: the stream ends with its status at its next poll, and the
//! memory of what waited comes back even if the client never reads again.
//!
//! The outbox also holds the consumer's flow-control window and what it holds of it, because a
//! consumer of a wildcard subscription is served by several dispatchers (one per matching
//! channel) that all deliver into its one outbox: they share its window exactly, and each is
//! woken when room or window appears, whichever of them made it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::{ConsumerEvent, CoreError, Window};

/// How far results may take the outbox past its limit before the consumer's requests wait.
pub(crate) const RESULT_SLACK: usize = 1 << 20;

/// The bytes the answer to a request naming these ack ids holds (one result per id).
pub(crate) fn answer_bytes(ack_ids: &[String]) -> usize {
    ack_ids.iter().map(|id| id.len() + 48).sum::<usize>() + 64
}

/// The sending side, held by the dispatcher and by the tasks that answer acks.
#[derive(Clone)]
pub(crate) struct Outbox {
    shared: Arc<Shared>,
    /// Dropped with the last sender, which tells the stream that nothing more will come.
    _senders: Arc<Senders>,
}

/// The receiving side: the events for one consumer's stream, in order.
pub struct ConsumerEvents {
    shared: Arc<Shared>,
}

struct Shared {
    limit: usize,
    queue: Mutex<Queue>,
    /// Bytes of the events in the queue (messages at their heap size).
    queued: AtomicUsize,
    /// Bytes of answers owed but not queued yet (acks waiting for their commit): they hold
    /// back deliveries and requests like queued ones, but are no sign of a stalled stream.
    reserved: AtomicUsize,
    /// When the stream last took an event, or the queue last went from empty to not empty: in
    /// milliseconds since `epoch`.
    active_at: AtomicU64,
    epoch: Instant,
    /// The window and what the consumer holds of it (atomics: every delivery and every ack
    /// goes through them).
    window: Held,
    /// Wake the dispatchers that deliver here when room or window appears (each dispatcher's
    /// one `Notify` serves all its consumers), and how many there are.
    dispatchers: Mutex<Vec<Arc<Notify>>>,
    dispatcher_count: AtomicUsize,
    /// Wakes the consumer's request reader when room appears.
    reader: Notify,
    /// Set when the stream is dropped, so that senders stop queueing and a waiting request
    /// reader stops waiting.
    gone: AtomicBool,
    /// Set when the consumer is closed: its requests are no longer read.
    closed: AtomicBool,
}

#[derive(Default)]
struct Queue {
    events: VecDeque<(usize, ConsumerEvent)>,
    /// Why the stream ends, once it must; taken by the stream.
    closed: Option<CoreError>,
    /// No sender is left.
    ended: bool,
    /// The stream's task, waiting for an event.
    waker: Option<Waker>,
}

/// A consumer's window and its unsettled deliveries against it.
struct Held {
    max_messages: AtomicU32,
    max_bytes: AtomicU64,
    /// Deliveries held in the top bits, their bytes in the low [`HELD_BYTE_BITS`]: one word,
    /// so that taking from the window is one compare-and-swap.
    held: AtomicU64,
}

/// A window holds at most 100,000 deliveries (< 2^20) of at most 64 MiB each (< 2^43 bytes
/// together).
const HELD_BYTE_BITS: u32 = 44;
const HELD_BYTES: u64 = (1 << HELD_BYTE_BITS) - 1;

impl Held {
    fn new(window: Window) -> Self {
        Self {
            max_messages: AtomicU32::new(window.max_messages),
            max_bytes: AtomicU64::new(window.max_bytes),
            held: AtomicU64::new(0),
        }
    }

    fn fits(&self, held: u64, size: u64) -> bool {
        let (messages, bytes) = (held >> HELD_BYTE_BITS, held & HELD_BYTES);
        messages < u64::from(self.max_messages.load(Ordering::Relaxed))
            && (messages == 0 || bytes + size <= self.max_bytes.load(Ordering::Relaxed))
    }
}

struct Senders(Arc<Shared>);

impl Drop for Senders {
    fn drop(&mut self) {
        let waker = {
            let mut queue = self.0.lock();
            queue.ended = true;
            queue.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// A new outbox of `limit` bytes for a consumer with this window; dispatchers [join](Outbox::join)
/// it to deliver into it.
pub(crate) fn outbox(limit: usize, window: Window) -> (Outbox, ConsumerEvents) {
    let shared = Arc::new(Shared {
        limit,
        queue: Mutex::new(Queue::default()),
        queued: AtomicUsize::new(0),
        reserved: AtomicUsize::new(0),
        active_at: AtomicU64::new(0),
        epoch: Instant::now(),
        window: Held::new(window),
        dispatchers: Mutex::new(Vec::new()),
        dispatcher_count: AtomicUsize::new(0),
        reader: Notify::new(),
        gone: AtomicBool::new(false),
        closed: AtomicBool::new(false),
    });
    let outbox = Outbox {
        shared: shared.clone(),
        _senders: Arc::new(Senders(shared.clone())),
    };
    (outbox, ConsumerEvents { shared })
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn release(&self, bytes: usize) {
        self.reserved.fetch_sub(bytes, Ordering::AcqRel);
        self.reader.notify_one();
    }

    /// Bytes queued and reserved: what counts against the limit.
    fn taken(&self) -> usize {
        self.queued.load(Ordering::Acquire) + self.reserved.load(Ordering::Acquire)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().expect("outbox lock")
    }

    /// Wakes every dispatcher that delivers here but `except`.
    fn wake_dispatchers(&self, except: Option<&Arc<Notify>>) {
        // The common case, one dispatcher waking none but itself, takes no lock.
        if except.is_some() && self.dispatcher_count.load(Ordering::Acquire) <= 1 {
            return;
        }
        let dispatchers = self.dispatchers.lock().expect("dispatchers lock");
        for wake in dispatchers.iter() {
            if except.is_none_or(|except| !Arc::ptr_eq(wake, except)) {
                wake.notify_one();
            }
        }
    }
}

impl Outbox {
    /// A dispatcher delivers here from now on: `wake` is notified when room appears.
    pub(crate) fn join(&self, wake: Arc<Notify>) {
        let mut dispatchers = self.shared.dispatchers.lock().expect("dispatchers lock");
        dispatchers.push(wake);
        (self.shared.dispatcher_count).store(dispatchers.len(), Ordering::Release);
    }

    /// A dispatcher delivers here no more.
    pub(crate) fn leave(&self, wake: &Arc<Notify>) {
        let mut dispatchers = self.shared.dispatchers.lock().expect("dispatchers lock");
        dispatchers.retain(|w| !Arc::ptr_eq(w, wake));
        (self.shared.dispatcher_count).store(dispatchers.len(), Ordering::Release);
    }

    /// Whether the window has room for one more delivery of `size` bytes (one delivery is
    /// always allowed when none is held, however large).
    pub(crate) fn window_fits(&self, size: u64) -> bool {
        let window = &self.shared.window;
        window.fits(window.held.load(Ordering::Acquire), size)
    }

    /// Takes a delivery of `size` bytes from the window if it fits: checked and taken at once,
    /// so that dispatchers sharing the window never pass it together.
    pub(crate) fn try_take(&self, size: u64) -> bool {
        let window = &self.shared.window;
        let take = |held: u64| {
            let (messages, bytes) = (held >> HELD_BYTE_BITS, held & HELD_BYTES);
            let bytes = (bytes + size).min(HELD_BYTES);
            window
                .fits(held, size)
                .then_some((messages + 1) << HELD_BYTE_BITS | bytes)
        };
        (window.held)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, take)
            .is_ok()
    }

    /// Gives `messages` deliveries of `bytes` back to the window; the other dispatchers that
    /// deliver here (not `from`, which knows) are woken, as they may have waited for it.
    pub(crate) fn give_back(&self, messages: u32, bytes: u64, from: &Arc<Notify>) {
        let back = |held: u64| {
            let n = (held >> HELD_BYTE_BITS).saturating_sub(u64::from(messages));
            let b = (held & HELD_BYTES).saturating_sub(bytes);
            Some(n << HELD_BYTE_BITS | b)
        };
        let window = &self.shared.window;
        let _ = (window.held).fetch_update(Ordering::AcqRel, Ordering::Acquire, back);
        self.shared.wake_dispatchers(Some(from));
    }

    /// Changes the window; every dispatcher is woken to use what it allows.
    pub(crate) fn set_window(&self, window: Window) {
        let held = &self.shared.window;
        held.max_messages
            .store(window.max_messages, Ordering::Release);
        held.max_bytes.store(window.max_bytes, Ordering::Release);
        self.shared.wake_dispatchers(None);
    }

    /// The deliveries held against the window now.
    pub(crate) fn held_messages(&self) -> u32 {
        (self.shared.window.held.load(Ordering::Acquire) >> HELD_BYTE_BITS) as u32
    }

    /// Queues an event of `bytes`; false when the stream is gone or closed.
    pub(crate) fn push(&self, bytes: usize, event: ConsumerEvent) -> bool {
        let shared = &self.shared;
        let waker = {
            let mut queue = shared.lock();
            if queue.closed.is_some() || queue.ended || shared.gone.load(Ordering::Acquire) {
                return false;
            }
            if shared.queued.fetch_add(bytes, Ordering::AcqRel) == 0 {
                shared.active_at.store(shared.now_ms(), Ordering::Release);
            }
            queue.events.push_back((bytes, event));
            queue.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        true
    }

    /// Whether deliveries of `more` bytes may be queued now, on top of `pending` bytes already
    /// picked for this consumer in this round. An empty outbox always takes one delivery, so
    /// that a message larger than the limit is still delivered.
    pub(crate) fn has_room(&self, pending: usize, more: usize) -> bool {
        let queued = self.shared.taken() + pending;
        queued == 0 || queued + more <= self.shared.limit
    }

    /// Gives back a reservation that will not be queued.
    pub(crate) fn release(&self, bytes: usize) {
        self.shared.release(bytes);
    }

    /// Queues an event whose bytes were reserved (see [`RequestGate::reserve`]); false when
    /// the stream is gone or closed.
    pub(crate) fn push_reserved(&self, bytes: usize, event: ConsumerEvent) -> bool {
        self.shared.release(bytes);
        self.push(bytes, event)
    }

    /// Bytes queued now.
    pub(crate) fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Acquire)
    }

    /// How long the queue has held events without the stream taking any (zero when empty).
    pub(crate) fn stalled_for(&self) -> Duration {
        let shared = &self.shared;
        if shared.queued.load(Ordering::Acquire) == 0 {
            return Duration::ZERO;
        }
        let since = shared.active_at.load(Ordering::Acquire);
        Duration::from_millis(shared.now_ms().saturating_sub(since))
    }

    /// Ends the stream with `reason` before anything still queued, and drops what was queued.
    pub(crate) fn close(&self, reason: CoreError) {
        let shared = &self.shared;
        let (dropped, waker) = {
            let mut queue = shared.lock();
            if queue.closed.is_some() {
                return;
            }
            queue.closed = Some(reason);
            shared.closed.store(true, Ordering::Release);
            shared.queued.store(0, Ordering::Release);
            (std::mem::take(&mut queue.events), queue.waker.take())
        };
        drop(dropped);
        if let Some(waker) = waker {
            waker.wake();
        }
        shared.reader.notify_one();
    }

    /// What the consumer's request reader waits on.
    pub(crate) fn gate(&self) -> RequestGate {
        RequestGate {
            shared: self.shared.clone(),
        }
    }
}

/// Lets a consumer's next request through once its outbox has room for the answer (see the
/// module docs).
#[derive(Clone)]
pub(crate) struct RequestGate {
    shared: Arc<Shared>,
}

impl RequestGate {
    /// Waits until the consumer's next request may be taken: true then, false once the
    /// consumer was closed or its stream is gone (its requests are of no use any more).
    pub(crate) async fn room_for_requests(&self) -> bool {
        let shared = &self.shared;
        loop {
            let notified = shared.reader.notified();
            if shared.gone.load(Ordering::Acquire) || shared.closed.load(Ordering::Acquire) {
                return false;
            }
            if shared.taken() < shared.limit + RESULT_SLACK {
                return true;
            }
            notified.await;
        }
    }

    /// Counts `bytes` of an answer that will be queued later (see
    /// [`Outbox::push_reserved`]).
    pub(crate) fn reserve(&self, bytes: usize) {
        self.shared.reserved.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Gives back a reservation that will not be queued.
    pub(crate) fn release(&self, bytes: usize) {
        self.shared.release(bytes);
    }
}

impl ConsumerEvents {
    /// The next event: a close first if there is one, else the oldest queued event. `None` once
    /// the dispatcher has let go of the consumer.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<ConsumerEvent>> {
        let shared = &self.shared;
        let event = {
            let mut queue = shared.lock();
            if let Some(reason) = queue.closed.take() {
                queue.ended = true;
                return Poll::Ready(Some(ConsumerEvent::Closed(reason)));
            }
            match queue.events.pop_front() {
                // Under the lock, like the close that sets the count to zero: never below it.
                Some((bytes, event)) => {
                    shared.queued.fetch_sub(bytes, Ordering::AcqRel);
                    event
                }
                None if queue.ended => return Poll::Ready(None),
                None => {
                    queue.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        };
        shared.active_at.store(shared.now_ms(), Ordering::Release);
        shared.wake_dispatchers(None);
        shared.reader.notify_one();
        Poll::Ready(Some(event))
    }

    /// Waits for the next event (see [`ConsumerEvents::poll_recv`]).
    pub async fn recv(&mut self) -> Option<ConsumerEvent> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }
}

impl Drop for ConsumerEvents {
    fn drop(&mut self) {
        let shared = &self.shared;
        let dropped = {
            // Under the lock, so that no sender queues after the queue is emptied.
            let mut queue = shared.lock();
            shared.gone.store(true, Ordering::Release);
            shared.queued.store(0, Ordering::Release);
            std::mem::take(&mut queue.events)
        };
        drop(dropped);
        shared.reader.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AckOperation;

    fn results(n: usize) -> ConsumerEvent {
        ConsumerEvent::Results {
            operation: AckOperation::Ack,
            results: Vec::with_capacity(n),
        }
    }

    #[tokio::test]
    async fn counts_bytes_until_the_stream_takes_them() {
        let wake = Arc::new(Notify::new());
        let (outbox, mut events) = outbox(100, crate::DEFAULT_WINDOW);
        outbox.join(wake.clone());
        assert!(outbox.has_room(0, 0) && outbox.has_room(0, 100));
        assert!(
            outbox.has_room(0, 1000),
            "an empty outbox takes one event of any size"
        );
        assert!(outbox.push(60, results(1)));
        assert!(outbox.has_room(0, 40) && !outbox.has_room(0, 41) && !outbox.has_room(30, 11));
        assert!(outbox.push(60, results(2)));
        assert_eq!(outbox.queued(), 120);
        assert!(events.recv().await.is_some());
        assert_eq!(outbox.queued(), 60);
        // Taking an event wakes the dispatcher.
        tokio::time::timeout(Duration::from_secs(1), wake.notified())
            .await
            .unwrap();
        assert!(events.recv().await.is_some());
        assert!(outbox.has_room(0, 0) && outbox.stalled_for() == Duration::ZERO);
    }

    #[test]
    fn dispatchers_share_the_window_and_wake_one_another() {
        let window = Window {
            max_messages: 2,
            max_bytes: 100,
        };
        let (outbox, _events) = outbox(1000, window);
        let (a, b) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
        outbox.join(a.clone());
        outbox.join(b.clone());
        assert!(outbox.try_take(500), "one delivery fits whatever its size");
        assert!(!outbox.window_fits(1) && !outbox.try_take(1));
        outbox.give_back(1, 500, &a);
        assert!(outbox.try_take(60) && outbox.try_take(40));
        assert!(!outbox.try_take(0), "two deliveries at most");
        assert_eq!(outbox.held_messages(), 2);
        // `b` was woken by `a`'s give-back; `a` was not (it knows).
        let woken = |n: &Notify| {
            let notified = n.notified();
            tokio::pin!(notified);
            notified.as_mut().enable()
        };
        assert!(woken(&b) && !woken(&a));
        outbox.leave(&b);
        outbox.set_window(Window {
            max_messages: 3,
            max_bytes: 100,
        });
        assert!(woken(&a) && !woken(&b));
        assert!(outbox.try_take(0));
    }

    #[tokio::test]
    async fn a_close_jumps_the_queue() {
        let (outbox, mut events) = outbox(100, crate::DEFAULT_WINDOW);
        outbox.push(10, results(1));
        outbox.close(CoreError::ShuttingDown);
        assert_eq!(outbox.queued(), 0, "what waited is dropped at once");
        assert!(matches!(
            events.recv().await,
            Some(ConsumerEvent::Closed(CoreError::ShuttingDown))
        ));
        drop(events);
        assert!(!outbox.push(1, results(1)));
    }

    #[tokio::test]
    async fn requests_wait_while_results_go_unread() {
        let (outbox, mut events) = outbox(100, crate::DEFAULT_WINDOW);
        outbox.push(100 + RESULT_SLACK, results(1));
        let gate = outbox.gate();
        let waiting = tokio::spawn(async move { assert!(gate.room_for_requests().await) });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished());
        assert!(outbox.stalled_for() >= Duration::from_millis(200));
        events.recv().await;
        waiting.await.unwrap();
    }

    #[tokio::test]
    async fn answers_owed_count_against_the_limit_but_are_no_stall() {
        let (outbox, mut events) = outbox(100, crate::DEFAULT_WINDOW);
        outbox.gate().reserve(100 + RESULT_SLACK);
        assert!(!outbox.has_room(0, 1), "owed answers hold deliveries back");
        assert_eq!(
            outbox.stalled_for(),
            Duration::ZERO,
            "nothing is waiting to be read"
        );
        let gate = outbox.gate();
        let waiting = tokio::spawn(async move { assert!(gate.room_for_requests().await) });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "requests wait while answers are owed"
        );
        assert!(outbox.push_reserved(100 + RESULT_SLACK, results(1)));
        assert_eq!(outbox.queued(), 100 + RESULT_SLACK);
        events.recv().await;
        waiting.await.unwrap();
        assert!(outbox.has_room(0, 100));
    }
}
