//! Matching a whole new service list to the running one (reference §7,
//! SIGHUP): which services stay as they are, which get new backends only,
//! which get new settings, which are new and which go. Pure: the caller
//! turns the outcome into the same steps an admin change makes.

use std::collections::{HashMap, HashSet};

use crate::model::config::ServiceConfig;

/// What a reload does to one service, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Its config is the same: it is not touched.
    Unchanged,
    /// Only its backends differ: unchanged backends keep their state and connections.
    Backends,
    /// Its settings differ: they are replaced (backends matched as always).
    Settings,
    /// It is not running yet.
    Added,
    /// It is running and not in the new list.
    Removed,
}

/// Each service of `new` with its fate, in `new`'s order, then each service of
/// `old` that `new` lacks, as [`Fate::Removed`], in `old`'s order. Names are
/// unique within each list (config validation sees to it).
pub fn diff<'a>(old: &'a [ServiceConfig], new: &'a [ServiceConfig]) -> Vec<(&'a str, Fate)> {
    // By name, so that a big config stays linear.
    let running: HashMap<&str, &ServiceConfig> = old.iter().map(|c| (c.name.as_str(), c)).collect();
    let mut fates: Vec<(&str, Fate)> = new
        .iter()
        .map(|c| {
            let fate = match running.get(c.name.as_str()) {
                None => Fate::Added,
                Some(&r) if r == c => Fate::Unchanged,
                Some(&r) if r.settings_equal(c) => Fate::Backends,
                Some(_) => Fate::Settings,
            };
            (c.name.as_str(), fate)
        })
        .collect();
    let kept: HashSet<&str> = new.iter().map(|c| c.name.as_str()).collect();
    fates.extend(old.iter().filter(|c| !kept.contains(c.name.as_str())).map(|c| (c.name.as_str(), Fate::Removed)));
    fates
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::{BackendConfig, Balance};

    fn web(backends: &[&str]) -> ServiceConfig {
        let mut c = ServiceConfig::new("web", "127.0.0.1:8080");
        c.backends = backends.iter().map(|b| BackendConfig::new(*b, "127.0.0.1:9001")).collect();
        c
    }

    #[test]
    fn same_list_changes_nothing() {
        let old = [web(&["b0"]), ServiceConfig::new("api", "127.0.0.1:8081")];
        assert_eq!(diff(&old, &old), [("web", Fate::Unchanged), ("api", Fate::Unchanged)]);
    }

    #[test]
    fn other_backends_are_a_backends_only_update() {
        assert_eq!(diff(&[web(&["b0"])], &[web(&["b0", "b1"])]), [("web", Fate::Backends)]);
        assert_eq!(diff(&[web(&["b0", "b1"])], &[web(&["b1", "b0"])]), [("web", Fate::Backends)], "order balances");
        let mut weighted = web(&["b0"]);
        weighted.backends[0].weight = 0;
        assert_eq!(diff(&[web(&["b0"])], &[weighted]), [("web", Fate::Backends)]);
    }

    #[test]
    fn other_settings_replace_the_service() {
        let lc = ServiceConfig { balance: Balance::LeastConn, ..web(&["b0"]) };
        assert_eq!(diff(&[web(&["b0"])], &[lc]), [("web", Fate::Settings)]);
        let moved = ServiceConfig { address: "127.0.0.1:8082".into(), ..web(&["b1"]) };
        assert_eq!(diff(&[web(&["b0"])], &[moved]), [("web", Fate::Settings)]);
    }

    #[test]
    fn new_names_are_added_and_missing_ones_removed_after_the_rest() {
        let old = [ServiceConfig::new("old", "127.0.0.1:1"), web(&[])];
        let new = [ServiceConfig::new("api", "127.0.0.1:2"), web(&[])];
        assert_eq!(diff(&old, &new), [("api", Fate::Added), ("web", Fate::Unchanged), ("old", Fate::Removed)]);
    }

    #[test]
    fn an_empty_list_removes_everything() {
        let old = [web(&["b0"]), ServiceConfig::new("api", "127.0.0.1:8081")];
        assert_eq!(diff(&old, &[]), [("web", Fate::Removed), ("api", Fate::Removed)]);
        assert_eq!(diff(&[], &old), [("web", Fate::Added), ("api", Fate::Added)]);
    }
}
