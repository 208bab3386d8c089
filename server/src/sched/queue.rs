//! The dynamic batcher's state, kept free of channels and threads so tests can drive it
//! with made-up instants. A batch is cut when it is full (max_batch_size rows, or a
//! preferred size that can be formed exactly), when its oldest item has waited
//! max_queue_delay, or (with the adaptive hold, the default) as soon as nothing more is
//! expected to join it in time.
//!
//! Adaptive hold: max_queue_delay is a bound, not a wait. An idle instance holds a partial
//! batch only while more items are expected: the requests answered by the batches that
//! finished within the last delay have not all come back yet (their clients, in a closed
//! loop, send again right away), or items are still arriving back to back (a burst, such
//! as one request's fan-out). A trickle of requests is cut on arrival instead of each
//! waiting the whole delay and then queueing behind a batch that started late.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What the queue needs to know about an item; the payload is opaque to it.
pub trait Item {
    /// Rows this item contributes along the batch dimension.
    fn rows(&self) -> usize;
    /// Items can share a batch only if their non-batch dims agree.
    fn batch_key(&self) -> &[Vec<usize>];
    /// The caller went away (timed out, cancelled): drop before computing.
    fn is_abandoned(&self) -> bool;
    fn enqueued(&self) -> Instant;
    /// This item's own limit on waiting for its batch (a pipeline node's override of
    /// the model's max_queue_delay); `None`: the model's.
    fn max_delay(&self) -> Option<Duration> {
        None
    }
    /// The largest batch this item may run in (a pipeline node's override, at most the
    /// model's max_batch_size); `None`: the model's.
    fn max_batch(&self) -> Option<usize> {
        None
    }
}

#[derive(Debug, Clone)]
pub struct BatchPolicy {
    /// 0: the model has no batch dimension, every item runs alone.
    pub max_batch_size: usize,
    pub max_queue_delay: Duration,
    /// Sorted ascending.
    pub preferred: Vec<usize>,
    pub max_queue_size: usize,
    /// Hold partial batches only while more items are expected (false: always until the
    /// delay, Triton's behaviour).
    pub adaptive: bool,
}

#[derive(Debug)]
pub enum Poll<T> {
    /// Run these together.
    Batch(Vec<T>),
    /// Nothing to cut yet: wait until this instant (or a new item), `None`: until a new item.
    Wait(Option<Instant>),
}

pub struct BatchQueue<T> {
    items: VecDeque<T>,
    policy: BatchPolicy,
    abandoned: u64,
    /// When the latest item arrived, and whether it came within [`BURST_GAP`] of the one
    /// before.
    last_arrival: Option<Instant>,
    in_burst: bool,
    /// Items answered by recently finished batches whose senders have not sent again yet,
    /// and until when that is expected (a finish plus the delay).
    owed: usize,
    owed_until: Option<Instant>,
}

/// Arrivals this close together are a burst: the batch is held a little longer for the
/// next. Items submitted back to back (one request's fan-out, many clients answered at
/// once) arrive microseconds apart, and the instance may look at the queue between two.
const BURST_GAP: Duration = Duration::from_micros(100);

impl<T: Item> BatchQueue<T> {
    pub fn new(mut policy: BatchPolicy) -> Self {
        policy.preferred.sort_unstable();
        policy.preferred.dedup();
        BatchQueue {
            items: VecDeque::new(),
            policy,
            abandoned: 0,
            last_arrival: None,
            in_burst: false,
            owed: 0,
            owed_until: None,
        }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Items dropped so far because their caller went away.
    pub fn abandoned(&self) -> u64 {
        self.abandoned
    }

    /// Adds an item, or hands it back when the queue is full: the caller rejects it at
    /// once rather than letting the queue grow.
    pub fn push(&mut self, item: T) -> Result<(), T> {
        if self.items.len() >= self.policy.max_queue_size {
            return Err(item);
        }
        let at = item.enqueued();
        self.in_burst = self.last_arrival.is_some_and(|last| at.saturating_duration_since(last) < BURST_GAP);
        self.last_arrival = Some(self.last_arrival.map_or(at, |last| last.max(at)));
        self.owed = self.owed.saturating_sub(1);
        self.items.push_back(item);
        Ok(())
    }

    /// A batch of `items` requests finished at `now`: their senders may send again.
    pub fn completed(&mut self, now: Instant, items: usize) {
        if self.owed_until.is_none_or(|t| now >= t) {
            self.owed = 0;
        }
        self.owed += items;
        self.owed_until = Some(now + self.policy.max_queue_delay);
    }

    /// Until when a partial batch whose cut-off is `deadline` is worth holding at `now`;
    /// `None`: cut it now.
    fn hold_until(&self, now: Instant, deadline: Instant) -> Option<Instant> {
        if !self.policy.adaptive {
            return Some(deadline);
        }
        let returning = self.owed_until.filter(|&t| self.owed > 0 && now < t);
        let burst = self.last_arrival.filter(|_| self.in_burst).map(|last| last + BURST_GAP);
        let until = match (returning, burst) {
            (Some(a), Some(b)) => a.max(b),
            (a, b) => a.or(b)?,
        };
        Some(until.min(deadline))
    }

    /// Decides what to run now. With `flush` (shutdown), waiting items are cut at once.
    pub fn poll(&mut self, now: Instant, flush: bool) -> Poll<T> {
        let before = self.items.len();
        self.items.retain(|it| !it.is_abandoned());
        self.abandoned += (before - self.items.len()) as u64;

        let Some(first) = self.items.front() else {
            return Poll::Wait(None);
        };
        let max = self.policy.max_batch_size;
        if max == 0 {
            return Poll::Batch(vec![self.items.pop_front().expect("non-empty")]);
        }

        // Walk the queue in order, taking compatible items while they fit. The batch may
        // be no larger than the smallest limit of the items in it.
        let key = first.batch_key().to_vec();
        let mut picked = Vec::new();
        let mut rows = 0;
        let mut limit = max;
        let mut full = false;
        for (i, it) in self.items.iter().enumerate() {
            if it.batch_key() != key.as_slice() {
                continue;
            }
            let with_it = limit.min(it.max_batch().unwrap_or(max)).max(1);
            if rows + it.rows() > with_it && !picked.is_empty() {
                full = true;
                break;
            }
            limit = with_it;
            rows += it.rows();
            picked.push(i);
            if rows >= limit {
                full = true;
                break;
            }
        }

        // Cut when any item of the batch has waited as long as it may.
        let deadline = picked
            .iter()
            .map(|&i| &self.items[i])
            .map(|it| it.enqueued() + it.max_delay().unwrap_or(self.policy.max_queue_delay))
            .min()
            .expect("the first item is always picked");
        let take = if full || flush || now >= deadline {
            picked.len()
        } else if let Some(n) = self.preferred_prefix(&picked) {
            n
        } else {
            match self.hold_until(now, deadline) {
                Some(until) if now < until => return Poll::Wait(Some(until)),
                _ => picked.len(),
            }
        };
        Poll::Batch(self.remove(&picked[..take]))
    }

    /// The longest prefix of `picked` whose rows add up exactly to a preferred size,
    /// preferring the largest such size.
    fn preferred_prefix(&self, picked: &[usize]) -> Option<usize> {
        if self.policy.preferred.is_empty() {
            return None;
        }
        let mut rows = 0;
        let mut best = None;
        for (n, &i) in picked.iter().enumerate() {
            rows += self.items[i].rows();
            if self.policy.preferred.binary_search(&rows).is_ok() {
                best = Some(n + 1);
            }
        }
        best
    }

    fn remove(&mut self, idx: &[usize]) -> Vec<T> {
        // idx is ascending; remove from the back so earlier indices stay valid.
        let mut out: Vec<T> = idx.iter().rev().map(|&i| self.items.remove(i).expect("index from this queue")).collect();
        out.reverse();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct It {
        id: u32,
        rows: usize,
        key: Vec<Vec<usize>>,
        at: Instant,
        gone: bool,
        delay: Option<Duration>,
        cap: Option<usize>,
    }
    impl Item for It {
        fn max_delay(&self) -> Option<Duration> {
            self.delay
        }
        fn max_batch(&self) -> Option<usize> {
            self.cap
        }
        fn rows(&self) -> usize {
            self.rows
        }
        fn batch_key(&self) -> &[Vec<usize>] {
            &self.key
        }
        fn is_abandoned(&self) -> bool {
            self.gone
        }
        fn enqueued(&self) -> Instant {
            self.at
        }
    }

    fn queue(max: usize, delay_ms: u64, preferred: Vec<usize>, cap: usize) -> BatchQueue<It> {
        BatchQueue::new(BatchPolicy {
            max_batch_size: max,
            max_queue_delay: Duration::from_millis(delay_ms),
            preferred,
            max_queue_size: cap,
            adaptive: true,
        })
    }

    fn it(id: u32, rows: usize, at: Instant) -> It {
        It { id, rows, key: vec![vec![3]], at, gone: false, delay: None, cap: None }
    }

    fn ids(p: Poll<It>) -> Vec<u32> {
        match p {
            Poll::Batch(b) => b.iter().map(|i| i.id).collect(),
            Poll::Wait(w) => panic!("expected a batch, got Wait({w:?})"),
        }
    }

    #[test]
    fn waits_for_the_delay_then_cuts_what_is_there() {
        let t0 = Instant::now();
        let mut q = queue(8, 10, vec![], 16);
        q.completed(t0, 4);
        q.push(it(1, 1, t0)).unwrap();
        q.push(it(2, 1, t0 + Duration::from_millis(4))).unwrap();
        match q.poll(t0 + Duration::from_millis(5), false) {
            Poll::Wait(Some(t)) => assert_eq!(t, t0 + Duration::from_millis(10)),
            other => panic!("{other:?}"),
        }
        assert_eq!(ids(q.poll(t0 + Duration::from_millis(10), false)), vec![1, 2]);
        assert!(matches!(q.poll(t0 + Duration::from_millis(11), false), Poll::Wait(None)));
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_trickle_of_requests_is_not_held_for_a_batch() {
        // One request every 30 ms against a 2 ms delay: none has company, none waits.
        let t0 = Instant::now();
        let mut q = queue(8, 2, vec![], 16);
        for (id, at) in [(1, 0), (2, 30), (3, 60), (4, 90)] {
            q.push(it(id, 1, t0 + ms(at))).unwrap();
            assert_eq!(ids(q.poll(t0 + ms(at), false)), vec![id], "cut on arrival");
            q.completed(t0 + ms(at + 1), 1);
        }
    }

    #[test]
    fn a_closed_loop_at_low_concurrency_is_not_held() {
        // One client that sends again as soon as it is answered: nobody else is coming.
        let t0 = Instant::now();
        let mut q = queue(8, 2, vec![], 16);
        let mut at = t0;
        for id in 0..5 {
            q.push(it(id, 1, at)).unwrap();
            assert_eq!(ids(q.poll(at, false)), vec![id]);
            at += Duration::from_micros(300);
            q.completed(at, 1);
            at += Duration::from_micros(100);
        }
    }

    #[test]
    fn the_senders_of_a_finished_batch_are_waited_for_within_the_delay() {
        let t0 = Instant::now();
        let mut q = queue(8, 10, vec![], 16);
        q.completed(t0, 3);
        q.push(it(1, 1, t0 + ms(1))).unwrap();
        assert!(matches!(q.poll(t0 + ms(1), false), Poll::Wait(Some(t)) if t == t0 + ms(10)));
        q.push(it(2, 1, t0 + ms(3))).unwrap();
        assert!(matches!(q.poll(t0 + ms(3), false), Poll::Wait(Some(_))));
        q.push(it(3, 1, t0 + ms(5))).unwrap();
        assert_eq!(ids(q.poll(t0 + ms(5), false)), vec![1, 2, 3], "all three came back: cut");
        // A batch whose senders do not all come back is cut when its finish is a delay old.
        q.completed(t0 + ms(6), 3);
        q.push(it(4, 1, t0 + ms(7))).unwrap();
        assert!(matches!(q.poll(t0 + ms(7), false), Poll::Wait(Some(t)) if t == t0 + ms(16)));
        assert_eq!(ids(q.poll(t0 + ms(16), false)), vec![4]);
    }

    #[test]
    fn a_burst_is_gathered_and_cut_when_it_ends() {
        // Items 20 us apart are held while they keep coming, and cut BURST_GAP after the
        // last one, well before the 10 ms delay.
        let t0 = Instant::now();
        let us = Duration::from_micros;
        let mut q = queue(16, 10, vec![], 32);
        q.push(it(0, 1, t0)).unwrap();
        for i in 1..6u64 {
            let now = t0 + us(20 * i);
            q.push(it(i as u32, 1, now)).unwrap();
            assert!(matches!(q.poll(now, false), Poll::Wait(Some(t)) if t == now + BURST_GAP), "item {i}");
        }
        assert_eq!(ids(q.poll(t0 + us(100) + BURST_GAP, false)), vec![0, 1, 2, 3, 4, 5]);
    }

    #[test]
    fn without_the_adaptive_hold_every_batch_waits_for_the_delay() {
        let t0 = Instant::now();
        let mut q = queue(8, 2, vec![], 16);
        q.policy.adaptive = false;
        q.push(it(1, 1, t0)).unwrap();
        assert!(matches!(q.poll(t0, false), Poll::Wait(Some(t)) if t == t0 + ms(2)));
        assert_eq!(ids(q.poll(t0 + ms(2), false)), vec![1]);
    }

    #[test]
    fn full_batch_is_cut_before_the_delay() {
        let t0 = Instant::now();
        let mut q = queue(4, 1000, vec![], 16);
        for i in 0..6 {
            q.push(it(i, 1, t0)).unwrap();
        }
        assert_eq!(ids(q.poll(t0, false)), vec![0, 1, 2, 3]);
        assert_eq!(q.len(), 2);
    }

    #[test]
    fn multi_row_items_never_exceed_max() {
        let t0 = Instant::now();
        let mut q = queue(4, 1000, vec![], 16);
        q.push(it(1, 3, t0)).unwrap();
        q.push(it(2, 2, t0)).unwrap();
        // 3 + 2 > 4: the batch is as full as it can get.
        assert_eq!(ids(q.poll(t0, false)), vec![1]);
        assert!(matches!(q.poll(t0, false), Poll::Wait(Some(_))));
    }

    #[test]
    fn preferred_size_is_cut_at_once() {
        let t0 = Instant::now();
        let mut q = queue(8, 1000, vec![2, 4], 16);
        q.completed(t0, 8);
        q.push(it(1, 1, t0)).unwrap();
        assert!(matches!(q.poll(t0, false), Poll::Wait(Some(_))));
        q.push(it(2, 1, t0)).unwrap();
        q.push(it(3, 1, t0)).unwrap();
        // 3 rows queued: the largest preferred size that can be formed is 2.
        assert_eq!(ids(q.poll(t0, false)), vec![1, 2]);
    }

    #[test]
    fn zero_delay_cuts_immediately() {
        let t0 = Instant::now();
        let mut q = queue(8, 0, vec![], 16);
        q.push(it(1, 1, t0)).unwrap();
        assert_eq!(ids(q.poll(t0, false)), vec![1]);
    }

    #[test]
    fn incompatible_shapes_wait_for_their_own_batch() {
        let t0 = Instant::now();
        let mut q = queue(8, 0, vec![], 16);
        q.push(it(1, 1, t0)).unwrap();
        let mut other = it(2, 1, t0);
        other.key = vec![vec![5]];
        q.push(other).unwrap();
        q.push(it(3, 1, t0)).unwrap();
        assert_eq!(ids(q.poll(t0, false)), vec![1, 3]);
        assert_eq!(ids(q.poll(t0, false)), vec![2]);
    }

    #[test]
    fn abandoned_items_are_dropped_and_counted() {
        let t0 = Instant::now();
        let mut q = queue(8, 0, vec![], 16);
        let mut gone = it(1, 1, t0);
        gone.gone = true;
        q.push(gone).unwrap();
        q.push(it(2, 1, t0)).unwrap();
        assert_eq!(ids(q.poll(t0, false)), vec![2]);
        assert_eq!(q.abandoned(), 1);
    }

    #[test]
    fn full_queue_hands_the_item_back() {
        let t0 = Instant::now();
        let mut q = queue(8, 1000, vec![], 2);
        q.push(it(1, 1, t0)).unwrap();
        q.push(it(2, 1, t0)).unwrap();
        let back = q.push(it(3, 1, t0)).unwrap_err();
        assert_eq!(back.id, 3);
    }

    #[test]
    fn flush_cuts_without_waiting() {
        let t0 = Instant::now();
        let mut q = queue(8, 1000, vec![], 16);
        q.push(it(1, 1, t0)).unwrap();
        assert_eq!(ids(q.poll(t0, true)), vec![1]);
    }

    #[test]
    fn no_batch_dimension_runs_items_alone() {
        let t0 = Instant::now();
        let mut q = queue(0, 1000, vec![], 16);
        q.push(it(1, 1, t0)).unwrap();
        q.push(it(2, 1, t0)).unwrap();
        assert_eq!(ids(q.poll(t0, false)), vec![1]);
    }

    #[test]
    fn an_item_with_a_shorter_delay_cuts_the_batch_sooner() {
        let t0 = Instant::now();
        let mut q = queue(8, 10, vec![], 16);
        q.completed(t0, 4);
        q.push(it(1, 1, t0)).unwrap();
        let mut urgent = it(2, 1, t0 + Duration::from_millis(1));
        urgent.delay = Some(Duration::from_millis(2));
        q.push(urgent).unwrap();
        assert!(
            matches!(q.poll(t0 + Duration::from_millis(2), false), Poll::Wait(Some(d)) if d == t0 + Duration::from_millis(3))
        );
        assert_eq!(ids(q.poll(t0 + Duration::from_millis(3), false)), vec![1, 2], "cut at the urgent item's limit");
    }

    #[test]
    fn an_item_with_a_smaller_batch_limit_caps_its_batch() {
        let t0 = Instant::now();
        let mut q = queue(8, 10, vec![], 16);
        q.push(it(1, 1, t0)).unwrap();
        let mut capped = it(2, 1, t0);
        capped.cap = Some(2);
        q.push(capped).unwrap();
        q.push(it(3, 1, t0)).unwrap();
        assert_eq!(ids(q.poll(t0, false)), vec![1, 2], "full at the capped item's limit of 2");
        assert_eq!(ids(q.poll(t0 + Duration::from_millis(10), false)), vec![3]);
    }
}
