//! A queue's ready tasks in hand-out order: highest priority first, and
//! within one priority by id. Ids are made in put order, so a new task goes
//! to the tail of its line, and a task that comes back (its lease lost, its
//! delay or backoff over) takes its place by id, ahead of every task put
//! after it.
//!
//! Rules:
//! - Each line stays sorted by id, stale entries (tasks no longer pending)
//!   included: they are skipped when popped and dropped when a line is
//!   compacted.
//! - Priority 0, the default, has a line of its own outside the map, so
//!   a queue that never uses priorities pays one deque, as before
//!   priorities existed. Other lines leave the map once empty, so the
//!   highest line that holds anything is always the map's first.

use std::cmp::Reverse;
use std::collections::{BTreeMap, VecDeque};

use super::TaskId;
use super::timers::COMPACT_SLACK;

#[derive(Default)]
pub(super) struct ReadyLines {
    /// Priority 0.
    default: VecDeque<TaskId>,
    /// Every other priority's line, highest first.
    others: BTreeMap<Reverse<i32>, VecDeque<TaskId>>,
}

impl ReadyLines {
    fn line_mut(&mut self, priority: i32) -> &mut VecDeque<TaskId> {
        if priority == 0 {
            &mut self.default
        } else {
            self.others.entry(Reverse(priority)).or_default()
        }
    }

    /// A new task at the tail of its priority's line. The line is compacted
    /// first (keeping entries `is_live` accepts) once it holds more than
    /// twice `live` (what can be live in it) plus [`COMPACT_SLACK`].
    pub(super) fn push_new(
        &mut self,
        id: TaskId,
        priority: i32,
        live: usize,
        is_live: impl FnMut(&TaskId) -> bool,
    ) {
        let line = self.line_mut(priority);
        if line.len() > 2 * live + COMPACT_SLACK {
            line.retain(is_live);
        }
        debug_assert!(
            line.back().is_none_or(|last| *last < id),
            "ids come in order"
        );
        line.push_back(id);
    }

    /// A task back in line: in its place by id (at the head, unless tasks
    /// older than it are back too).
    pub(super) fn insert(&mut self, id: TaskId, priority: i32) {
        let line = self.line_mut(priority);
        let at = line.partition_point(|other| *other < id);
        line.insert(at, id);
    }

    /// The entry at the head of the highest line (it may be stale).
    pub(super) fn pop(&mut self) -> Option<TaskId> {
        if let Some(mut line) = self.others.first_entry()
            && (line.key().0 > 0 || self.default.is_empty())
        {
            let id = line.get_mut().pop_front();
            if line.get().is_empty() {
                line.remove();
            }
            return id;
        }
        self.default.pop_front()
    }

    /// Empties every line: their entries, stale ones included, in
    /// hand-out order.
    pub(super) fn take_all(&mut self) -> Vec<TaskId> {
        let mut above = std::mem::take(&mut self.others);
        let below = above.split_off(&Reverse(0));
        let default = std::mem::take(&mut self.default);
        above
            .into_values()
            .flatten()
            .chain(default)
            .chain(below.into_values().flatten())
            .collect()
    }

    /// The first `n` entries of each line, stale ones included: the oldest
    /// pending task is among them, unless more than `n` stale entries lead
    /// its line.
    pub(super) fn heads(&self, n: usize) -> impl Iterator<Item = &TaskId> {
        self.default.iter().take(n).chain(
            self.others
                .values()
                .flat_map(move |line| line.iter().take(n)),
        )
    }

    /// Entries held, stale ones included.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.default.len() + self.others.values().map(VecDeque::len).sum::<usize>()
    }

    /// How many times `id` is in a line.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(super) fn count(&self, id: &TaskId) -> usize {
        self.default
            .iter()
            .chain(self.others.values().flatten())
            .filter(|entry| *entry == id)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::IdMaker;

    fn ids(n: usize) -> Vec<TaskId> {
        let mut maker = IdMaker::new();
        (0..n).map(|_| maker.next(1)).collect()
    }

    fn drain(lines: &mut ReadyLines) -> Vec<TaskId> {
        std::iter::from_fn(|| lines.pop()).collect()
    }

    #[test]
    fn higher_priorities_go_first_and_each_line_in_id_order() {
        let id = ids(6);
        let mut lines = ReadyLines::default();
        for (i, priority) in [(0, 0), (1, -5), (2, 7), (3, 0), (4, 7), (5, -5)] {
            lines.push_new(id[i], priority, 10, |_| true);
        }
        assert_eq!(
            drain(&mut lines),
            [id[2], id[4], id[0], id[3], id[1], id[5]]
        );
        assert!(lines.others.is_empty(), "empty lines leave the map");
    }

    #[test]
    fn a_task_back_in_line_takes_its_place_by_id() {
        let id = ids(5);
        let mut lines = ReadyLines::default();
        for i in [1, 3, 4] {
            lines.push_new(id[i], 0, 10, |_| true);
        }
        lines.insert(id[2], 0);
        lines.insert(id[0], 0);
        assert_eq!(drain(&mut lines), [id[0], id[1], id[2], id[3], id[4]]);
    }

    #[test]
    fn take_all_empties_every_line_in_hand_out_order() {
        let id = ids(3);
        let mut lines = ReadyLines::default();
        lines.push_new(id[0], -1, 10, |_| true);
        lines.push_new(id[1], 0, 10, |_| true);
        lines.push_new(id[2], 1, 10, |_| true);
        assert_eq!(lines.take_all(), [id[2], id[1], id[0]]);
        assert_eq!(lines.len(), 0);
    }
}
