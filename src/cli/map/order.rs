//! The order `taskq map` prints outcomes in: input order, each as soon as
//! it and every input before it are done, or completion order
//! (`--unordered`).
//!
//! In input order an outcome that finished before an earlier input waits
//! here. What waits is bounded by the caller's window: an input holds its
//! place in the window until it is printed, not merely until it finishes.

use std::collections::BTreeMap;

/// Outcomes numbered by input (from 0, every number once), handed back in
/// the order they are to be printed.
#[derive(Debug)]
pub(crate) struct Reorder<T> {
    /// In input order; `false` hands each back at once.
    ordered: bool,
    /// The number of the next input to print.
    next: u64,
    /// Finished after a gap, by input number.
    waiting: BTreeMap<u64, T>,
}

impl<T> Reorder<T> {
    /// In input order when `ordered`, else in completion order.
    pub(crate) fn new(ordered: bool) -> Self {
        Self {
            ordered,
            next: 0,
            waiting: BTreeMap::new(),
        }
    }

    /// Takes input `number`'s outcome; returns the outcomes now ready to
    /// print, in order.
    pub(crate) fn finish(&mut self, number: u64, outcome: T) -> Vec<T> {
        if !self.ordered {
            return vec![outcome];
        }
        if number != self.next {
            self.waiting.insert(number, outcome);
            return Vec::new();
        }
        let mut ready = vec![outcome];
        self.next += 1;
        while let Some(outcome) = self.waiting.remove(&self.next) {
            ready.push(outcome);
            self.next += 1;
        }
        ready
    }

    /// Outcomes finished but waiting for an earlier input.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_input_order_each_goes_out_once_everything_before_it_has() {
        let mut order = Reorder::new(true);
        assert_eq!(order.finish(2, 'c'), Vec::<char>::new());
        assert_eq!(order.finish(1, 'b'), Vec::<char>::new());
        assert_eq!(order.waiting(), 2);
        assert_eq!(order.finish(0, 'a'), ['a', 'b', 'c']);
        assert_eq!(order.finish(4, 'e'), Vec::<char>::new());
        assert_eq!(order.finish(3, 'd'), ['d', 'e']);
        assert_eq!(order.waiting(), 0);
    }

    #[test]
    fn unordered_each_goes_out_at_once() {
        let mut order = Reorder::new(false);
        assert_eq!(order.finish(2, 'c'), ['c']);
        assert_eq!(order.finish(0, 'a'), ['a']);
        assert_eq!(order.waiting(), 0);
    }
}
