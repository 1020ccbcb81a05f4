//! Backend choice (SPEC §3): weighted round robin and least connected, and the
//! failover order that follows the choice. Pure: no sockets, no clock.
//!
//! A backend is *eligible* when it is up and its weight is above 0. The
//! balancer returns positions into the slice it was given; the caller maps
//! them to backends.

/// What the balancer needs to know of one backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Connections in a row round robin gives this backend; 0 drains it.
    pub weight: u32,
    /// Whether health checks let traffic go to it.
    pub up: bool,
    /// Connections open (or being opened) to it now.
    pub active: u64,
}

impl Candidate {
    fn eligible(&self) -> bool {
        self.up && self.weight > 0
    }
}

/// A service's balancing position, kept between picks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Position of the backend whose turn it is (RR), or where tie-breaking starts (LC).
    next: usize,
    /// Connections the backend at `next` has taken in its current turn (RR).
    taken: u32,
}

/// Picks with weighted round robin and returns the failover order: the chosen
/// backend first, then every other eligible one in config order after it.
pub fn round_robin(cursor: &mut Cursor, backends: &[Candidate]) -> Vec<usize> {
    let n = backends.len();
    let mut order = Vec::new();
    if n == 0 {
        return order;
    }
    let mut pos = cursor.next % n;
    let mut taken = if pos == cursor.next { cursor.taken } else { 0 };
    for _ in 0..=n {
        let b = &backends[pos];
        if b.eligible() && taken < b.weight {
            break;
        }
        pos = (pos + 1) % n;
        taken = 0;
    }
    if !backends[pos].eligible() {
        return order;
    }
    taken += 1;
    *cursor = if taken >= backends[pos].weight {
        Cursor { next: (pos + 1) % n, taken: 0 }
    } else {
        Cursor { next: pos, taken }
    };
    order.push(pos);
    order.extend((1..n).map(|i| (pos + i) % n).filter(|&i| backends[i].eligible()));
    order
}

/// Picks the eligible backend with the fewest active connections, ties going
/// round robin, and returns the failover order: by active count, ties in
/// rotation order.
pub fn least_connected(cursor: &mut Cursor, backends: &[Candidate]) -> Vec<usize> {
    let n = backends.len();
    if n == 0 {
        return Vec::new();
    }
    let start = cursor.next % n;
    // Rotation order from the cursor, so equal counts take turns.
    let mut order: Vec<usize> = (0..n).map(|i| (start + i) % n).filter(|&i| backends[i].eligible()).collect();
    // Stable sort keeps rotation order among ties.
    order.sort_by_key(|&i| backends[i].active);
    if let Some(&chosen) = order.first() {
        cursor.next = (chosen + 1) % n;
        cursor.taken = 0;
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(weight: u32) -> Candidate {
        Candidate { weight, up: true, active: 0 }
    }

    #[track_caller]
    fn picks(f: fn(&mut Cursor, &[Candidate]) -> Vec<usize>, backends: &[Candidate], count: usize) -> Vec<usize> {
        let mut cursor = Cursor::default();
        (0..count).map(|_| f(&mut cursor, backends)[0]).collect()
    }

    #[test]
    fn rr_weights_1_2_3_give_runs_of_that_length() {
        let got = picks(round_robin, &[up(1), up(2), up(3)], 13);
        assert_eq!(got, [0, 1, 1, 2, 2, 2, 0, 1, 1, 2, 2, 2, 0]);
    }

    #[test]
    fn rr_equal_weights_rotate() {
        assert_eq!(picks(round_robin, &[up(1), up(1), up(1)], 6), [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn rr_skips_drained_and_down_backends() {
        let down = Candidate { weight: 1, up: false, active: 0 };
        assert_eq!(picks(round_robin, &[up(1), up(0), down, up(1)], 4), [0, 3, 0, 3]);
    }

    #[test]
    fn rr_failover_order_lists_every_eligible_backend_once() {
        let mut cursor = Cursor::default();
        let backends = [up(1), up(1), up(0), up(1)];
        round_robin(&mut cursor, &backends);
        assert_eq!(round_robin(&mut cursor, &backends), [1, 3, 0]);
    }

    #[test]
    fn rr_with_nothing_eligible_is_empty() {
        let mut cursor = Cursor::default();
        assert!(round_robin(&mut cursor, &[]).is_empty());
        assert!(round_robin(&mut cursor, &[up(0), Candidate { weight: 1, up: false, active: 0 }]).is_empty());
    }

    #[test]
    fn rr_survives_a_shrinking_backend_list() {
        let mut cursor = Cursor { next: 5, taken: 1 };
        assert_eq!(round_robin(&mut cursor, &[up(1), up(1)])[0], 1);
    }

    #[test]
    fn lc_picks_fewest_active() {
        let mut cursor = Cursor::default();
        let backends =
            [Candidate { active: 3, ..up(1) }, Candidate { active: 1, ..up(1) }, Candidate { active: 2, ..up(1) }];
        assert_eq!(least_connected(&mut cursor, &backends), [1, 2, 0]);
    }

    #[test]
    fn lc_ties_rotate() {
        assert_eq!(picks(least_connected, &[up(1), up(1), up(1)], 6), [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn lc_skips_drained_and_down() {
        let down = Candidate { weight: 1, up: false, active: 0 };
        let backends = [Candidate { active: 5, ..up(1) }, up(0), down];
        assert_eq!(picks(least_connected, &backends, 2), [0, 0]);
    }
}
