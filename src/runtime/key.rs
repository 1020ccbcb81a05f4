//! Generation-checked handles: `Key` names one slab entry for as long as it
//! lives and never its successor in the same slot.
//!
//! `Slots<T>` is the only place generations are checked. It backs the event
//! loop's entries, the services and backends, and the timer wheel's nodes, so
//! a stale token, timer or pair-to-backend link resolves to nothing instead of
//! to whatever reused the slot (mio pitfall 7).

use std::fmt;

use mio::Token;
use slab::Slab;

/// Names one slot's tenant: the slot index and the generation it was given.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub struct Key {
    index: u32,
    generation: u32,
}

/// Which socket of an entry an event is for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Side {
    /// The entry's first socket: a listener, a client, a probe or an admin connection.
    Client,
    /// A proxied pair's backend socket.
    Backend,
}

// Token layout: [ generation: 32 | index: 31 | side: 1 ].
const _: () = assert!(usize::BITS >= 64, "tokens pack a 32-bit generation and a 31-bit index");
const INDEX_LIMIT: usize = 1 << 31;

impl Key {
    /// The slot index (stable while the key lives; reused after).
    pub fn index(self) -> u32 {
        self.index
    }

    /// The mio token that names this key's socket on `side`.
    pub fn token(self, side: Side) -> Token {
        let side_bit = match side {
            Side::Client => 0,
            Side::Backend => 1,
        };
        Token(((self.generation as usize) << 32) | ((self.index as usize) << 1) | side_bit)
    }

    /// Unpacks a token made by [`Key::token`]; `None` for tokens no key makes (generation 0).
    pub fn from_token(token: Token) -> Option<(Key, Side)> {
        let raw = token.0;
        let generation = (raw >> 32) as u32;
        if generation == 0 {
            return None;
        }
        let index = ((raw >> 1) & (INDEX_LIMIT - 1)) as u32;
        let side = if raw & 1 == 0 { Side::Client } else { Side::Backend };
        Some((Key { index, generation }, side))
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}/{}", self.index, self.generation)
    }
}

/// A slab whose handles are generation-checked [`Key`]s.
#[derive(Debug)]
pub struct Slots<T> {
    slab: Slab<(u32, T)>,
    next_generation: u32,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Slots<T> {
    /// An empty set; generations start at 1 so that no key packs to `Token(0)`.
    pub fn new() -> Self {
        Slots { slab: Slab::new(), next_generation: 1 }
    }

    /// An empty set with room for `capacity` values before it reallocates.
    pub fn with_capacity(capacity: usize) -> Self {
        Slots { slab: Slab::with_capacity(capacity), next_generation: 1 }
    }

    fn take_generation(&mut self) -> u32 {
        let generation = self.next_generation;
        // Skip 0 on wrap: generation 0 is reserved for tokens no key makes.
        self.next_generation = self.next_generation.checked_add(1).unwrap_or(1);
        generation
    }

    /// Stores the value built by `make`, which learns its own key first (so
    /// it can register a socket under its final token before it is stored).
    pub fn insert_with(&mut self, make: impl FnOnce(Key) -> T) -> Key {
        let generation = self.take_generation();
        let entry = self.slab.vacant_entry();
        let index = entry.key();
        assert!(index < INDEX_LIMIT, "more than 2^31 live slots");
        let key = Key { index: index as u32, generation };
        entry.insert((generation, make(key)));
        key
    }

    /// Like [`Slots::insert_with`], for a value that may fail to build; nothing is stored on error.
    pub fn try_insert_with<E>(&mut self, make: impl FnOnce(Key) -> Result<T, E>) -> Result<Key, E> {
        let generation = self.take_generation();
        let entry = self.slab.vacant_entry();
        let index = entry.key();
        assert!(index < INDEX_LIMIT, "more than 2^31 live slots");
        let key = Key { index: index as u32, generation };
        entry.insert((generation, make(key)?));
        Ok(key)
    }

    /// Stores `value` and returns its key.
    pub fn insert(&mut self, value: T) -> Key {
        self.insert_with(|_| value)
    }

    /// The value `key` names, if it is still there.
    pub fn get(&self, key: Key) -> Option<&T> {
        match self.slab.get(key.index as usize) {
            Some((generation, value)) if *generation == key.generation => Some(value),
            _ => None,
        }
    }

    /// The value `key` names, mutably, if it is still there.
    pub fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        match self.slab.get_mut(key.index as usize) {
            Some((generation, value)) if *generation == key.generation => Some(value),
            _ => None,
        }
    }

    /// Whether `key` still names a value.
    pub fn contains(&self, key: Key) -> bool {
        self.get(key).is_some()
    }

    /// Takes out the value `key` names; `None` if it is gone already.
    pub fn remove(&mut self, key: Key) -> Option<T> {
        if !self.contains(key) {
            return None;
        }
        self.slab.try_remove(key.index as usize).map(|(_, value)| value)
    }

    /// How many values are stored.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// Whether no value is stored.
    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Every stored value with its key, in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (Key, &T)> + '_ {
        self.slab
            .iter()
            .map(|(index, (generation, value))| (Key { index: index as u32, generation: *generation }, value))
    }

    /// Every stored value, mutably, with its key, in slot order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (Key, &mut T)> + '_ {
        self.slab
            .iter_mut()
            .map(|(index, (generation, value))| (Key { index: index as u32, generation: *generation }, value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip_extremes() {
        for &(index, generation) in &[(0, 1), (INDEX_LIMIT as u32 - 1, u32::MAX), (12345, 7)] {
            let key = Key { index, generation };
            for side in [Side::Client, Side::Backend] {
                assert_eq!(Key::from_token(key.token(side)), Some((key, side)));
            }
        }
    }

    #[test]
    fn token_zero_is_never_a_key() {
        assert_eq!(Key::from_token(Token(0)), None);
        let mut slots = Slots::new();
        let key = slots.insert(());
        assert_ne!(key.token(Side::Client), Token(0));
    }

    #[test]
    fn stale_key_after_reuse_finds_nothing() {
        let mut slots = Slots::new();
        let old = slots.insert("old");
        assert_eq!(slots.remove(old), Some("old"));
        let new = slots.insert("new");
        assert_eq!(old.index, new.index, "the slot is reused");
        assert_eq!(slots.get(old), None);
        assert_eq!(slots.remove(old), None);
        assert_eq!(slots.get(new), Some(&"new"));
    }

    #[test]
    fn generation_skips_zero_on_wrap() {
        let mut slots: Slots<()> = Slots::new();
        slots.next_generation = u32::MAX;
        let a = slots.insert(());
        let b = slots.insert(());
        assert_eq!(a.generation, u32::MAX);
        assert_eq!(b.generation, 1);
    }

    #[test]
    fn insert_with_sees_its_own_key() {
        let mut slots = Slots::new();
        let key = slots.insert_with(|key| key);
        assert_eq!(slots.get(key), Some(&key));
    }
}
