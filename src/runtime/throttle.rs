//! Log lines that an attacker or a storm could repeat thousands of times a
//! second are let through at most once per period, with the count of those
//! held back (every log rate is bounded).

use std::time::{Duration, Instant};

/// Lets one line through per period.
#[derive(Debug, Clone)]
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
    held: u64,
}

impl Throttle {
    /// At most one line per `every`.
    pub const fn new(every: Duration) -> Throttle {
        Throttle { every, last: None, held: 0 }
    }

    /// `Some(n)` if a line may be logged now, `n` being how many were held
    /// back since the last one; `None` (and one more held back) otherwise.
    pub fn ready(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(last) if now < last + self.every => {
                self.held += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.held))
            }
        }
    }
}

/// " (and N more like it)" for a line that stood for others held back.
pub fn more(held: u64) -> String {
    match held {
        0 => String::new(),
        1 => " (and 1 more like it)".into(),
        n => format!(" (and {n} more like it)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_with_the_count_held_back() {
        let t0 = Instant::now();
        let mut throttle = Throttle::new(Duration::from_secs(1));
        assert_eq!(throttle.ready(t0), Some(0));
        assert_eq!(throttle.ready(t0 + Duration::from_millis(10)), None);
        assert_eq!(throttle.ready(t0 + Duration::from_millis(20)), None);
        assert_eq!(throttle.ready(t0 + Duration::from_secs(1)), Some(2));
        assert_eq!(more(2), " (and 2 more like it)");
    }
}
