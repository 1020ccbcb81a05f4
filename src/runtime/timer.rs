//! The timer wheel: deadlines go in with a value, expired values come out of `poll` one at a time.
//!
//! Hierarchical hashed wheel, tokio's geometry: 6 levels × 64 slots, 1 ms per level-0 slot, so a
//! level-`l` slot spans 64^l ms and the wheel 2^36 ms (~2.2 years). Time is whole ms ("ticks")
//! since `origin`; deadlines round up and clock readings down, so nothing fires before its
//! `Instant`, nor a whole tick after it. Nodes live in `Slots` and lists link them by `Key`:
//! O(1) insert and cancel, and a fired or cancelled timer's key resolves to nothing.
//!
//! Invariants (asserted by `tests::check`):
//! - `elapsed`, the wheel's time, never passes an occupied slot's start: `poll` empties slots in
//!   start order and only then moves `elapsed` up to `now`.
//! - A slotted node has `when > elapsed`, sits in `slot_for(when, level_for(elapsed, when))`,
//!   and that slot's `slot_start` is in `(elapsed, when]`. Only the top level wraps: a deadline
//!   beyond the span is clamped into its top digit's slot and re-placed each time that comes up.
//! - `pending` holds exactly the nodes with `when <= elapsed`; they fire on the next `poll`.
//! - Bit `s` of a level's `occupied` is set exactly when slot `s` is non-empty.

use std::fmt;
use std::time::{Duration, Instant};

use crate::runtime::key::{Key, Slots};

/// Handle of one armed timer; generation-checked, so a fired or cancelled timer's key resolves to nothing.
pub type TimerKey = Key;

const LEVELS: usize = 6;
const BITS: usize = 6;
const SLOTS: usize = 1 << BITS;
const SLOT_MASK: u64 = SLOTS as u64 - 1;
// Ticks the wheel spans before its top level wraps: 2^36 ms, about 2.2 years.
const SPAN: u64 = 1 << (BITS * LEVELS);
const NANOS_PER_TICK: u128 = 1_000_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Place {
    Pending,
    Slot { level: usize, slot: usize },
}

struct Node<T> {
    value: T,
    when: u64,
    place: Place,
    prev: Option<Key>,
    next: Option<Key>,
}

#[derive(Clone, Copy)]
struct Level {
    occupied: u64,
    heads: [Option<Key>; SLOTS],
}

const EMPTY_LEVEL: Level = Level { occupied: 0, heads: [None; SLOTS] };

/// A hierarchical timer wheel of values of type `T`, with 1 ms resolution.
pub struct Wheel<T> {
    origin: Instant,
    elapsed: u64,
    nodes: Slots<Node<T>>,
    levels: [Level; LEVELS],
    pending: Option<Key>,
}

impl<T> Wheel<T> {
    /// An empty wheel whose tick 0 is `origin`.
    pub fn new(origin: Instant) -> Self {
        Wheel { origin, elapsed: 0, nodes: Slots::new(), levels: [EMPTY_LEVEL; LEVELS], pending: None }
    }

    /// Arms a timer for `at` in O(1); a deadline at or before the wheel's time fires on the next poll.
    pub fn insert(&mut self, at: Instant, value: T) -> TimerKey {
        let when = self.ticks(at, true);
        let key = self.nodes.insert(Node { value, when, place: Place::Pending, prev: None, next: None });
        self.place(key, when);
        key
    }

    /// Disarms a timer in O(1) and returns its value; `None` if it already fired or was cancelled.
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        self.unlink(key);
        self.nodes.remove(key).map(|node| node.value)
    }

    /// When to call `poll` next (O(levels)): a lower bound on the next expiry, `None` if nothing is armed.
    pub fn next_deadline(&self) -> Option<Instant> {
        let tick = if self.pending.is_some() { self.elapsed } else { self.next_expiration()?.2 };
        self.origin.checked_add(Duration::from_millis(tick))
    }

    /// Takes one value whose deadline is at or before `now`; call until it returns `None`.
    pub fn poll(&mut self, now: Instant) -> Option<T> {
        // A reading behind the wheel's time (or before origin) means "now": time never goes back.
        let now = self.ticks(now, false).max(self.elapsed);
        loop {
            if let Some(key) = self.pending {
                return self.cancel(key);
            }
            match self.next_expiration() {
                Some((level, slot, start)) if start <= now => {
                    self.elapsed = start;
                    self.cascade(level, slot);
                }
                _ => {
                    self.elapsed = now;
                    return None;
                }
            }
        }
    }

    /// How many timers are armed.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no timer is armed.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn ticks(&self, at: Instant, round_up: bool) -> u64 {
        let nanos = at.saturating_duration_since(self.origin).as_nanos();
        let ticks = if round_up { nanos.div_ceil(NANOS_PER_TICK) } else { nanos / NANOS_PER_TICK };
        u64::try_from(ticks).unwrap_or(u64::MAX)
    }

    /// The first occupied slot ahead of `elapsed`, with its start tick.
    fn next_expiration(&self) -> Option<(usize, usize, u64)> {
        // Every slot of a level starts after every slot of the levels below it, so the
        // lowest occupied level holds the next expiry.
        let (level, occupied) =
            self.levels.iter().enumerate().find_map(|(i, l)| (l.occupied != 0).then_some((i, l.occupied)))?;
        // Start after `elapsed`'s own slot: below the top it is behind us; at the top it holds
        // only clamped nodes, due a whole rotation later, so it must come last.
        let first = ((self.elapsed >> (level * BITS)) + 1) & SLOT_MASK;
        let slot = (first + u64::from(occupied.rotate_right(first as u32).trailing_zeros())) & SLOT_MASK;
        Some((level, slot as usize, slot_start(self.elapsed, level, slot)))
    }

    /// Empties a slot that `elapsed` has reached: due nodes go to pending, the rest to finer slots.
    fn cascade(&mut self, level: usize, slot: usize) {
        // Detach the whole list first: a clamped node may land back in this very slot, and
        // walking into it again would never end (tokio's "infinite loop" warning).
        let mut cursor = self.set_head(Place::Slot { level, slot }, None);
        while let Some(key) = cursor {
            let Some(node) = self.nodes.get(key) else { break };
            cursor = node.next;
            let when = node.when;
            self.place(key, when);
        }
    }

    fn place(&mut self, key: Key, when: u64) {
        let place = if when <= self.elapsed {
            Place::Pending
        } else {
            let level = level_for(self.elapsed, when);
            Place::Slot { level, slot: slot_for(when, level) }
        };
        self.link(key, place);
    }

    /// Replaces a list's head: the one place that keeps `occupied` in step with the slots.
    fn set_head(&mut self, place: Place, head: Option<Key>) -> Option<Key> {
        match place {
            Place::Pending => std::mem::replace(&mut self.pending, head),
            Place::Slot { level, slot } => {
                let level = &mut self.levels[level];
                level.occupied = (level.occupied & !(1 << slot)) | (u64::from(head.is_some()) << slot);
                std::mem::replace(&mut level.heads[slot], head)
            }
        }
    }

    /// Pushes `key` onto the front of `place`'s list, overwriting whatever links it had.
    fn link(&mut self, key: Key, place: Place) {
        let next = self.set_head(place, Some(key));
        if let Some(old_head) = next.and_then(|next| self.nodes.get_mut(next)) {
            old_head.prev = Some(key);
        }
        if let Some(node) = self.nodes.get_mut(key) {
            (node.place, node.prev, node.next) = (place, None, next);
        }
    }

    /// Takes `key` off its list; a key that names nothing is left alone.
    fn unlink(&mut self, key: Key) {
        let Some(node) = self.nodes.get_mut(key) else { return };
        let (prev, next, place) = (node.prev.take(), node.next.take(), node.place);
        if let Some(prev) = prev {
            if let Some(prev) = self.nodes.get_mut(prev) {
                prev.next = next;
            }
        } else {
            self.set_head(place, next);
        }
        if let Some(next) = next.and_then(|next| self.nodes.get_mut(next)) {
            next.prev = prev;
        }
    }
}

impl<T> fmt::Debug for Wheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wheel")
            .field("origin", &self.origin)
            .field("elapsed_ms", &self.elapsed)
            .field("len", &self.len())
            .field("occupied", &self.levels.map(|level| level.occupied))
            .finish_non_exhaustive()
    }
}

/// The level whose slots tell `when` apart from `elapsed`: the highest base-64 digit where they
/// differ, clamped to the top level for deadlines beyond the span.
fn level_for(elapsed: u64, when: u64) -> usize {
    let differing = ((elapsed ^ when) | SLOT_MASK).min(SPAN - 1);
    differing.ilog2() as usize / BITS
}

fn slot_for(when: u64, level: usize) -> usize {
    ((when >> (level * BITS)) & SLOT_MASK) as usize
}

/// The first tick after `elapsed` at which `slot` of `level` begins.
fn slot_start(elapsed: u64, level: usize, slot: u64) -> u64 {
    let shift = level * BITS;
    let level_range = 1u64 << (shift + BITS);
    let start = (elapsed & !(level_range - 1)) + (slot << shift);
    // Only the top level wraps (see `next_expiration`); its slot then comes up next rotation.
    start + if start <= elapsed { level_range } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const YEAR: Duration = Duration::from_secs(365 * 24 * 3600);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn fresh<T>() -> (Instant, Wheel<T>) {
        let t0 = Instant::now();
        (t0, Wheel::new(t0))
    }

    /// Asserts every invariant in the module doc.
    fn check<T>(wheel: &Wheel<T>) {
        let mut lists = vec![(Place::Pending, wheel.pending)];
        for (level, l) in wheel.levels.iter().enumerate() {
            for (slot, head) in l.heads.iter().enumerate() {
                assert_eq!(l.occupied >> slot & 1 == 1, head.is_some(), "occupied bit of {level}/{slot}");
                lists.push((Place::Slot { level, slot }, *head));
            }
        }
        let mut seen = 0;
        for (place, head) in lists {
            let (mut prev, mut cursor) = (None, head);
            while let Some(key) = cursor {
                let node = wheel.nodes.get(key).expect("lists link live nodes");
                assert_eq!((node.place, node.prev), (place, prev));
                match place {
                    Place::Pending => assert!(node.when <= wheel.elapsed),
                    Place::Slot { level, slot } => {
                        assert!(node.when > wheel.elapsed);
                        assert_eq!((level_for(wheel.elapsed, node.when), slot_for(node.when, level)), (level, slot));
                        let start = slot_start(wheel.elapsed, level, slot as u64);
                        assert!(wheel.elapsed < start && start <= node.when, "slot {level}/{slot} starts at {start}");
                        let wraps = (wheel.elapsed ^ node.when) >> (BITS * (level + 1)) != 0;
                        assert!(level == LEVELS - 1 || !wraps, "only the top level wraps");
                    }
                }
                (seen, prev, cursor) = (seen + 1, cursor, node.next);
            }
        }
        assert_eq!(seen, wheel.len(), "every node is on exactly one list");
    }

    /// Polls at every `next_deadline` up to `until`, then at `until`; returns (poll time, value).
    fn run_until<T>(wheel: &mut Wheel<T>, until: Instant) -> Vec<(Instant, T)> {
        let mut fired = Vec::new();
        let mut wakeups = 0;
        while let Some(at) = wheel.next_deadline().filter(|&at| at <= until) {
            wakeups += 1;
            assert!(wakeups < 10_000, "the wheel spins");
            let before = fired.len();
            fired.extend(std::iter::from_fn(|| wheel.poll(at)).map(|value| (at, value)));
            let progressed = fired.len() > before || wheel.next_deadline().is_none_or(|next| next > at);
            assert!(progressed, "poll(next_deadline()) changed nothing at {at:?}");
            check(wheel);
        }
        fired.extend(std::iter::from_fn(|| wheel.poll(until)).map(|value| (until, value)));
        fired
    }

    struct XorShift(u64);

    impl XorShift {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    #[test]
    fn insert_then_poll_fires_in_order() {
        let (t0, mut wheel) = fresh();
        for n in [300, 10, 5_000, 20, 70_000, 1] {
            wheel.insert(t0 + ms(n), n);
        }
        assert_eq!(wheel.poll(t0), None);
        let fired = run_until(&mut wheel, t0 + ms(100_000));
        assert_eq!(fired.iter().map(|&(_, n)| n).collect::<Vec<_>>(), [1, 10, 20, 300, 5_000, 70_000]);
        assert!(fired.iter().all(|&(at, n)| at == t0 + ms(n)), "each fires at its own tick: {fired:?}");
    }

    #[test]
    fn same_tick_entries_all_fire() {
        let (t0, mut wheel) = fresh();
        for n in 0..100 {
            wheel.insert(t0 + Duration::from_micros(6_900 + n), n);
        }
        assert_eq!(wheel.poll(t0 + ms(6)), None);
        let mut fired: Vec<_> = std::iter::from_fn(|| wheel.poll(t0 + ms(7))).collect();
        fired.sort_unstable();
        assert_eq!(fired, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn nothing_fires_before_its_deadline() {
        let (t0, mut wheel) = fresh();
        for at in [Duration::from_micros(1_500), ms(64), ms(4_097), Duration::from_micros(262_144_001)] {
            wheel.insert(t0 + at, at);
        }
        for (fired_at, at) in run_until(&mut wheel, t0 + ms(300_000)) {
            assert!(fired_at >= t0 + at && fired_at < t0 + at + ms(1), "{at:?} fired at {:?}", fired_at - t0);
        }
        assert!(wheel.is_empty());
    }

    #[test]
    fn past_and_pre_origin_deadlines_fire_on_next_poll() {
        let (t0, mut wheel) = fresh();
        assert_eq!(wheel.poll(t0 + ms(100)), None);
        wheel.insert(t0.checked_sub(ms(5)).unwrap_or(t0), "before origin");
        wheel.insert(t0 + ms(50), "before wheel time");
        assert_eq!(wheel.next_deadline(), Some(t0 + ms(100)));
        let mut fired: Vec<_> = std::iter::from_fn(|| wheel.poll(t0 + ms(10))).collect();
        fired.sort_unstable();
        assert_eq!(fired, ["before origin", "before wheel time"]);
    }

    #[test]
    fn cancel_before_fire_removes_it() {
        let (t0, mut wheel) = fresh();
        let a = wheel.insert(t0 + ms(5_000), 'a');
        wheel.insert(t0 + ms(5_000), 'b');
        assert_eq!(wheel.cancel(a), Some('a'));
        assert_eq!(wheel.len(), 1);
        check(&wheel);
        assert_eq!(run_until(&mut wheel, t0 + ms(10_000)), [(t0 + ms(5_000), 'b')]);
    }

    #[test]
    fn cancel_after_fire_is_none() {
        let (t0, mut wheel) = fresh();
        let a = wheel.insert(t0 + ms(3), 'a');
        assert_eq!(wheel.poll(t0 + ms(3)), Some('a'));
        assert_eq!(wheel.cancel(a), None);
    }

    #[test]
    fn stale_key_after_slot_reuse_cancels_nothing() {
        let (t0, mut wheel) = fresh();
        let old = wheel.insert(t0 + ms(3), "old");
        assert_eq!(wheel.cancel(old), Some("old"));
        let new = wheel.insert(t0 + ms(3), "new");
        let slot = |key: TimerKey| key.to_string().split('/').next().map(str::to_owned);
        assert_eq!((slot(old), old == new), (slot(new), false), "same slab slot, new generation");
        assert_eq!(wheel.cancel(old), None);
        assert_eq!(wheel.len(), 1);
        assert_eq!(wheel.poll(t0 + ms(3)), Some("new"));
    }

    #[test]
    fn far_future_is_clamped_and_fires_on_time() {
        let (t0, mut wheel) = fresh();
        let at = t0 + 3 * YEAR + Duration::from_micros(1_234_567);
        wheel.insert(at, "far");
        wheel.insert(t0 + ms(SPAN - 1), "top edge");
        assert!(wheel.next_deadline().is_some_and(|next| next <= at));
        let fired = run_until(&mut wheel, at - ms(1));
        assert_eq!(fired, [(t0 + ms(SPAN - 1), "top edge")]);
        let fired = run_until(&mut wheel, at + ms(1));
        assert_eq!(fired.len(), 1);
        assert!(fired[0].0 >= at && fired[0].0 - at < ms(1), "fired at the first tick after its deadline");
    }

    #[test]
    fn poll_at_next_deadline_always_makes_progress_across_the_span_edge() {
        let (t0, mut wheel) = fresh();
        let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
        // Park the wheel just before its top level wraps, so most deadlines cross the wrap.
        let edge = t0 + ms(SPAN - 3);
        assert_eq!(wheel.poll(edge), None);
        for n in 0..2_000 {
            let offset = [rng.below(10), rng.below(5_000), rng.below(1 << 40)][n % 3];
            wheel.insert(edge + Duration::from_micros(offset), offset);
        }
        let fired = run_until(&mut wheel, edge + Duration::from_micros(1 << 40));
        assert_eq!(fired.len(), 2_000);
        assert!(fired.iter().all(|&(at, offset)| at >= edge + Duration::from_micros(offset)));
    }

    #[test]
    fn random_ops_match_a_btreemap_model() {
        let (t0, mut wheel) = fresh();
        let tick = |at: Instant| (at - t0).as_nanos().div_ceil(NANOS_PER_TICK) as u64;
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        // (deadline tick, seq) -> exact deadline; the wheel's value is the model's key.
        let mut model: BTreeMap<(u64, u64), Instant> = BTreeMap::new();
        let mut keys = Vec::new();
        let mut now = t0;
        for seq in 0..10_000 {
            match rng.below(10) {
                0..=4 => {
                    let at = now + Duration::from_micros(rng.below(600_000_000));
                    keys.push((wheel.insert(at, (tick(at), seq)), (tick(at), seq)));
                    model.insert((tick(at), seq), at);
                }
                5 | 6 if !keys.is_empty() => {
                    let (key, id) = keys.swap_remove(rng.below(keys.len() as u64) as usize);
                    assert_eq!(wheel.cancel(key), model.remove(&id).map(|_| id), "cancel of {id:?}");
                }
                _ => {
                    now += match rng.below(4) {
                        0 => Duration::from_micros(rng.below(2_000)),
                        1 => ms(rng.below(3_000)),
                        2 => wheel.next_deadline().map_or(Duration::ZERO, |d| d.saturating_duration_since(now)),
                        _ => Duration::ZERO,
                    };
                    while let Some(id) = wheel.poll(now) {
                        let at = model.remove(&id).expect("fires once, and only while armed");
                        assert!(at <= now, "{id:?} fired early");
                    }
                    let floor = ((now - t0).as_nanos() / NANOS_PER_TICK) as u64;
                    if let Some((&(due, _), _)) = model.first_key_value() {
                        assert!(due > floor, "tick {due} still armed at tick {floor}");
                    }
                }
            }
            assert_eq!(wheel.len(), model.len());
            if seq % 250 == 0 {
                check(&wheel);
            }
        }
        for (at, id) in run_until(&mut wheel, now + ms(700_000)) {
            assert!(model.remove(&id).is_some_and(|deadline| deadline <= at), "{id:?} early or twice");
        }
        assert!(model.is_empty() && wheel.is_empty());
    }
}
