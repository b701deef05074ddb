//! Who is in which wave: the waves in memory, their members as bitsets over the fleet
//! index, and the rules that decide whom a complete wave still has to reach.

use super::{Wave, WaveState};
use crate::firmware::version_order;
use crate::fleet::select::{FleetIndex, Idx};
use std::collections::{BTreeMap, HashMap, HashSet};

/// A set of device positions (of the fleet index).
#[derive(Debug, Default, Clone)]
pub(super) struct Members(Vec<u64>);

impl Members {
    pub(super) fn insert(&mut self, i: Idx) {
        let (w, b) = (i as usize / 64, i % 64);
        if self.0.len() <= w {
            self.0.resize(w + 1, 0);
        }
        self.0[w] |= 1 << b;
    }

    pub(super) fn remove(&mut self, i: Idx) {
        if let Some(w) = self.0.get_mut(i as usize / 64) {
            *w &= !(1 << (i % 64));
        }
    }

    pub(super) fn contains(&self, i: Idx) -> bool {
        self.0.get(i as usize / 64).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

#[derive(Default)]
pub(super) struct Book {
    pub(super) waves: BTreeMap<String, Wave>,
    /// Who is staged in each wave that can still stage devices: the active ones and the
    /// latest complete one of each tag and class.
    pub(super) members: HashMap<String, Members>,
}

impl Book {
    pub(super) fn active_on(&self, tag: &str, production: bool) -> Option<&Wave> {
        self.waves.values().find(|w| w.state == WaveState::Active && w.tag == tag && w.production == production)
    }

    /// Complete waves of a tag and class, in completion order.
    pub(super) fn complete_on(&self, tag: &str, production: bool) -> Vec<&Wave> {
        let mut v: Vec<&Wave> = self
            .waves
            .values()
            .filter(|w| w.state == WaveState::Complete && w.tag == tag && w.production == production)
            .collect();
        v.sort_by_key(|w| w.order);
        v
    }

    /// The tag's production versions: each complete wave adds its version and removes the
    /// ones it prunes.
    pub(super) fn production_versions(&self, tag: &str, production: bool) -> Vec<String> {
        let mut have: Vec<String> = Vec::new();
        for w in self.complete_on(tag, production) {
            have.retain(|v| !w.prune.contains(v));
            if !have.contains(&w.version) {
                have.push(w.version.clone());
            }
        }
        have
    }

    /// Who the active wave of a tag and class has staged: devices no complete wave may take
    /// back from it.
    pub(super) fn active_members(&self, tag: &str, production: bool) -> Option<&Members> {
        self.active_on(tag, production).and_then(|w| self.members.get(&w.name))
    }

    pub(super) fn latest_complete(&self, tag: &str, production: bool) -> Option<&Wave> {
        self.complete_on(tag, production).pop()
    }

    /// The latest complete wave of each tag and class: the ones that stage joiners.
    pub(super) fn latest_complete_each(&self) -> Vec<Wave> {
        let mut tags: Vec<(&str, bool)> =
            self.waves.values().map(|w| (w.tag.as_str(), w.production)).collect::<HashSet<_>>().into_iter().collect();
        tags.sort();
        tags.into_iter().filter_map(|(t, p)| self.latest_complete(t, p).cloned()).collect()
    }
}

/// A test for "a complete wave still has to reach device `i`": not staged in it, not staged by
/// the tag's active wave (whose queued operation it would replace: the newer wave owns the
/// device), and running neither its version nor a newer one (e.g. from a later wave that was
/// canceled after they updated) — a complete wave never stages a downgrade.
pub(super) fn not_reached<'a>(x: &'a FleetIndex, wave: &'a Wave, book: &'a Book) -> impl Fn(Idx) -> bool + 'a {
    let done = x.running_any(at_least(&wave.version));
    let (members, active) = (book.members.get(&wave.name), book.active_members(&wave.tag, wave.production));
    move |i| !members.is_some_and(|m| m.contains(i)) && !active.is_some_and(|m| m.contains(i)) && !done(i)
}

/// A test for "`v` is `version` or newer" (semver order where both parse).
pub(super) fn at_least(version: &str) -> impl Fn(&str) -> bool + '_ {
    let order = version_order(version);
    move |v| v == version || version_order(v).is_some_and(|o| Some(o) > order)
}
