//! Loss, duplicate and reorder detection for one (receiver, publisher) stream of sequence
//! numbers 0..expected.
//!
//! - in order: the next number after the highest seen;
//! - a gap (a number past the next one): the skipped numbers become "missing";
//! - a number at or below the highest seen: *reordered* if it was missing (it arrived late),
//!   otherwise *duplicated*;
//! - at the end, *lost* = still missing + never reached (the tail).
//!
//! The common in-order case costs two integer compares and no memory; the missing set only
//! exists once something arrived out of order.

use std::collections::BTreeSet;

#[derive(Debug, Default, Clone)]
pub struct SeqTracker {
    /// Highest sequence number seen + 1 (0 = none yet).
    next: u32,
    /// Numbers below `next` that have not arrived. Boxed so that the tracker stays at 24
    /// bytes: there is one per (member, publisher), and the set rarely exists.
    #[allow(clippy::box_collection)]
    missing: Option<Box<BTreeSet<u32>>>,
    pub received: u32,
    pub duplicated: u32,
    pub reordered: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    InOrder,
    /// Arrived after a higher number (it was missing).
    Late,
    /// Arrived after a gap (some lower numbers are missing for now).
    AfterGap,
    Duplicate,
    /// Outside 0..expected: not a number this stream can carry.
    Invalid,
}

/// The final verdict for one stream.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SeqCounts {
    pub received: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
}

impl SeqTracker {
    pub fn new() -> SeqTracker {
        SeqTracker::default()
    }

    pub fn see(&mut self, seq: u32, expected: u32) -> Seen {
        if seq >= expected {
            return Seen::Invalid;
        }
        if seq == self.next {
            self.next += 1;
            self.received += 1;
            Seen::InOrder
        } else if seq > self.next {
            let missing = self.missing.get_or_insert_with(Default::default);
            missing.extend(self.next..seq);
            self.next = seq + 1;
            self.received += 1;
            Seen::AfterGap
        } else if self.missing.as_mut().is_some_and(|m| m.remove(&seq)) {
            self.received += 1;
            self.reordered += 1;
            Seen::Late
        } else {
            self.duplicated += 1;
            Seen::Duplicate
        }
    }

    /// True once every number 0..expected arrived (duplicates aside).
    #[cfg(test)]
    pub fn complete(&self, expected: u32) -> bool {
        self.next == expected && self.missing.as_ref().is_none_or(|m| m.is_empty())
    }

    pub fn finish(&self, expected: u32) -> SeqCounts {
        let missing = self.missing.as_ref().map_or(0, |m| m.len() as u64);
        SeqCounts {
            received: u64::from(self.received),
            lost: missing + u64::from(expected.saturating_sub(self.next)),
            duplicated: u64::from(self.duplicated),
            reordered: u64::from(self.reordered),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seqs: &[u32], expected: u32) -> SeqCounts {
        let mut t = SeqTracker::new();
        for &s in seqs {
            t.see(s, expected);
        }
        t.finish(expected)
    }

    #[test]
    fn in_order_is_clean() {
        let seqs: Vec<u32> = (0..100).collect();
        let mut t = SeqTracker::new();
        for &s in &seqs {
            assert_eq!(t.see(s, 100), Seen::InOrder);
        }
        assert!(t.complete(100));
        assert_eq!(
            t.finish(100),
            SeqCounts {
                received: 100,
                lost: 0,
                duplicated: 0,
                reordered: 0
            }
        );
        assert!(t.missing.is_none(), "no allocation on the in-order path");
    }

    #[test]
    fn loss_in_the_middle_and_at_the_tail() {
        let c = run(&[0, 1, 3, 4, 7], 10);
        assert_eq!(
            c,
            SeqCounts {
                received: 5,
                lost: 5,
                duplicated: 0,
                reordered: 0
            }
        );
        // nothing at all
        assert_eq!(run(&[], 4).lost, 4);
    }

    #[test]
    fn duplicates() {
        let c = run(&[0, 1, 1, 2, 0, 3], 4);
        assert_eq!(
            c,
            SeqCounts {
                received: 4,
                lost: 0,
                duplicated: 2,
                reordered: 0
            }
        );
        // a duplicate of a late arrival is still a duplicate
        let c = run(&[0, 2, 1, 1, 3], 4);
        assert_eq!(
            c,
            SeqCounts {
                received: 4,
                lost: 0,
                duplicated: 1,
                reordered: 1
            }
        );
    }

    #[test]
    fn reorders_are_not_losses() {
        let mut t = SeqTracker::new();
        assert_eq!(t.see(0, 5), Seen::InOrder);
        assert_eq!(t.see(2, 5), Seen::AfterGap);
        assert!(!t.complete(5));
        assert_eq!(t.see(1, 5), Seen::Late);
        assert_eq!(t.see(4, 5), Seen::AfterGap);
        assert_eq!(t.see(3, 5), Seen::Late);
        assert!(t.complete(5));
        assert_eq!(
            t.finish(5),
            SeqCounts {
                received: 5,
                lost: 0,
                duplicated: 0,
                reordered: 2
            }
        );
    }

    #[test]
    fn swapped_pairs_everywhere() {
        let mut seqs = Vec::new();
        for i in (0..1000).step_by(2) {
            seqs.push(i + 1);
            seqs.push(i);
        }
        let c = run(&seqs, 1000);
        assert_eq!(
            c,
            SeqCounts {
                received: 1000,
                lost: 0,
                duplicated: 0,
                reordered: 500
            }
        );
    }

    #[test]
    fn out_of_range_is_invalid_not_counted() {
        let mut t = SeqTracker::new();
        assert_eq!(t.see(10, 10), Seen::Invalid);
        assert_eq!(t.see(u32::MAX, 10), Seen::Invalid);
        assert_eq!(t.finish(10).received, 0);
    }
}
