//! Bounded priority admission queue for overload and SLO classes: class 0 first, FIFO
//! within a class, lowest-priority newest waiter shed when full.

use std::collections::VecDeque;

/// Number of SLO classes; class numbers above `CLASSES - 1` are clamped to it.
pub const CLASSES: usize = 4;

/// Handle of a queued waiter, for [`AdmissionQueue::remove`]. Unique per queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ticket(u64);

/// Outcome of [`AdmissionQueue::push`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a rejected or shed item must be answered (e.g. with 503/429)"]
pub enum Pushed<T> {
    /// Queued without displacing anyone.
    Queued(Ticket),
    /// The queue is full of waiters of the same or higher priority: the newcomer is
    /// handed back.
    Rejected(T),
    /// The newcomer was queued (`ticket`) by shedding the newest waiter of the lowest
    /// priority class present, which is handed back with its ticket and class.
    Displaced {
        /// The newcomer's ticket.
        ticket: Ticket,
        /// The shed waiter.
        shed: T,
        /// The shed waiter's (now dead) ticket.
        shed_ticket: Ticket,
        /// The shed waiter's class.
        shed_class: u8,
    },
}

/// Waiters with class `0..=3` (0 highest priority), FIFO within a class, at most
/// `capacity` in total. Pure and synchronous; the coordinator wraps it in an actor.
#[derive(Debug)]
pub struct AdmissionQueue<T> {
    capacity: usize,
    next_ticket: u64,
    /// Per class, waiters in arrival order; tickets increase front to back, which lets
    /// `remove` binary-search.
    classes: [VecDeque<(Ticket, T)>; CLASSES],
}

fn clamp_class(class: u8) -> usize {
    usize::from(class).min(CLASSES - 1)
}

impl<T> AdmissionQueue<T> {
    /// Empty queue holding at most `capacity` waiters (0 rejects every push).
    pub fn new(capacity: usize) -> Self {
        AdmissionQueue {
            capacity,
            next_ticket: 0,
            classes: Default::default(),
        }
    }

    /// Enqueues `item` in `class` (clamped to 3). When full, the newest waiter of the
    /// lowest-priority class present is shed if that class is lower priority (a higher
    /// number) than the newcomer's; otherwise the newcomer is rejected.
    pub fn push(&mut self, class: u8, item: T) -> Pushed<T> {
        let c = clamp_class(class);
        if self.len() < self.capacity {
            return Pushed::Queued(self.enqueue(c, item));
        }
        let victim = (c + 1..CLASSES)
            .rev()
            .find(|&v| !self.classes[v].is_empty());
        let Some((v, (shed_ticket, shed))) =
            victim.and_then(|v| self.classes[v].pop_back().map(|w| (v, w)))
        else {
            return Pushed::Rejected(item);
        };
        let ticket = self.enqueue(c, item);
        Pushed::Displaced {
            ticket,
            shed,
            shed_ticket,
            shed_class: v as u8,
        }
    }

    fn enqueue(&mut self, class: usize, item: T) -> Ticket {
        let ticket = Ticket(self.next_ticket);
        self.next_ticket += 1;
        self.classes[class].push_back((ticket, item));
        ticket
    }

    /// Next waiter to admit: lowest class first, FIFO within the class.
    pub fn pop(&mut self) -> Option<(u8, T)> {
        self.classes
            .iter_mut()
            .enumerate()
            .find_map(|(c, q)| q.pop_front().map(|(_, item)| (c as u8, item)))
    }

    /// Removes the waiter holding `ticket` (it timed out or its client left); `None` if
    /// it was already popped, shed or removed.
    pub fn remove(&mut self, ticket: Ticket) -> Option<T> {
        self.classes.iter_mut().find_map(|q| {
            let pos = q.binary_search_by_key(&ticket, |(t, _)| *t).ok()?;
            q.remove(pos).map(|(_, item)| item)
        })
    }

    /// Waiters queued.
    pub fn len(&self) -> usize {
        self.classes.iter().map(VecDeque::len).sum()
    }

    /// True when nobody waits.
    pub fn is_empty(&self) -> bool {
        self.classes.iter().all(VecDeque::is_empty)
    }

    /// Waiters queued per class.
    pub fn len_by_class(&self) -> [usize; CLASSES] {
        std::array::from_fn(|c| self.classes[c].len())
    }

    /// Maximum number of waiters.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ticket(p: Pushed<&'static str>) -> Ticket {
        match p {
            Pushed::Queued(t) => t,
            other => panic!("expected Queued, got {other:?}"),
        }
    }

    #[test]
    fn class_order_then_fifo() {
        let mut q = AdmissionQueue::new(10);
        for (class, item) in [
            (3, "d1"),
            (0, "a1"),
            (2, "c1"),
            (0, "a2"),
            (3, "d2"),
            (9, "d3"),
        ] {
            let _ = ticket(q.push(class, item));
        }
        assert_eq!(q.len_by_class(), [2, 0, 1, 3], "class 9 clamps to 3");
        let order: Vec<_> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(
            order,
            [
                (0, "a1"),
                (0, "a2"),
                (2, "c1"),
                (3, "d1"),
                (3, "d2"),
                (3, "d3")
            ]
        );
        assert!(q.is_empty());
    }

    #[test]
    fn full_queue_sheds_newest_of_lowest_class() {
        let mut q = AdmissionQueue::new(3);
        let _ = ticket(q.push(2, "c-old"));
        let _ = ticket(q.push(2, "c-new"));
        let _ = ticket(q.push(1, "b"));
        match q.push(0, "a") {
            Pushed::Displaced {
                shed, shed_class, ..
            } => {
                assert_eq!((shed, shed_class), ("c-new", 2));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            q.push(2, "c2"),
            Pushed::Rejected("c2"),
            "same class never displaces"
        );
        assert!(matches!(
            q.push(1, "b2"),
            Pushed::Displaced { shed: "c-old", .. }
        ));
        assert_eq!(
            q.push(1, "b3"),
            Pushed::Rejected("b3"),
            "no lower class left"
        );
        assert_eq!(q.len(), 3);
        assert_eq!(q.pop(), Some((0, "a")));
        assert_eq!(q.pop(), Some((1, "b")));
        assert_eq!(q.pop(), Some((1, "b2")));
        assert_eq!(AdmissionQueue::new(0).push(0, 1), Pushed::Rejected(1));
    }

    #[test]
    fn remove_by_ticket() {
        let mut q = AdmissionQueue::new(8);
        let a = ticket(q.push(1, "a"));
        let b = ticket(q.push(1, "b"));
        let c = ticket(q.push(3, "c"));
        assert_eq!(q.remove(b), Some("b"));
        assert_eq!(q.remove(b), None, "second removal finds nothing");
        assert_eq!(q.remove(c), Some("c"));
        assert_eq!(q.len_by_class(), [0, 1, 0, 0]);
        assert_eq!(q.pop(), Some((1, "a")));
        assert_eq!(q.remove(a), None, "popped waiters cannot be removed");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u8),
        Pop,
        Remove(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..6).prop_map(Op::Push),
            Just(Op::Pop),
            any::<usize>().prop_map(Op::Remove)
        ]
    }

    proptest! {
        /// The queue agrees with a naive model: a list of (class, seq) where pop takes the
        /// minimum and shedding takes the maximum of a strictly lower-priority class.
        #[test]
        fn matches_naive_model(cap in 0usize..6, ops in proptest::collection::vec(op(), 0..60)) {
            let mut q = AdmissionQueue::new(cap);
            let mut model: Vec<(usize, u64)> = Vec::new();
            let mut issued: Vec<(Ticket, u64)> = Vec::new();
            let mut seq = 0u64;
            for op in ops {
                match op {
                    Op::Push(class) => {
                        seq += 1;
                        let c = clamp_class(class);
                        let lowest = model.iter().copied().max();
                        match q.push(class, seq) {
                            Pushed::Queued(t) => {
                                prop_assert!(model.len() < cap);
                                model.push((c, seq));
                                issued.push((t, seq));
                            }
                            Pushed::Rejected(s) => {
                                prop_assert_eq!(s, seq);
                                prop_assert!(model.len() >= cap && lowest.is_none_or(|(lc, _)| lc <= c));
                            }
                            Pushed::Displaced { ticket, shed, shed_class, .. } => {
                                let (lc, ls) = lowest.unwrap();
                                prop_assert!(model.len() >= cap && lc > c);
                                prop_assert_eq!((usize::from(shed_class), shed), (lc, ls));
                                model.retain(|&(_, s)| s != ls);
                                model.push((c, seq));
                                issued.push((ticket, seq));
                            }
                        }
                    }
                    Op::Pop => {
                        let want = model.iter().copied().min();
                        model.retain(|&e| Some(e) != want);
                        prop_assert_eq!(q.pop(), want.map(|(c, s)| (c as u8, s)));
                    }
                    Op::Remove(k) if !issued.is_empty() => {
                        let (t, s) = issued[k % issued.len()];
                        let present = model.iter().any(|&(_, ms)| ms == s);
                        model.retain(|&(_, ms)| ms != s);
                        prop_assert_eq!(q.remove(t), present.then_some(s));
                    }
                    Op::Remove(_) => {}
                }
                prop_assert_eq!(q.len(), model.len());
                prop_assert!(q.len() <= cap);
                let mut by_class = [0usize; CLASSES];
                model.iter().for_each(|&(c, _)| by_class[c] += 1);
                prop_assert_eq!(q.len_by_class(), by_class);
            }
        }
    }
}
