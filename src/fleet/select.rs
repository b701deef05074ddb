//! The fleet index and rollout selection: which devices a rollout may reach (the wave's tag,
//! its production class, a group, an explicit list, not already in the wave) and, for
//! `--limit`, a sample that prefers recently active devices and is the same every time for the
//! same seed — so `--dry-run --print-uuids` can be replayed exactly.
//!
//! Pure and compact: no store, no clock (`now` is a parameter); a device costs its id plus
//! about 30 bytes, so a million devices fit in well under 300 bytes each.

use std::collections::HashMap;

/// A device's position in the index.
pub type Idx = u32;

const NO_TAG: u16 = u16::MAX;
/// A device whose running version is unknown (never reported, or the table was full).
const NO_VERSION: u16 = u16::MAX;

/// Most distinct running versions the index tells apart; a version reported after the table
/// is full counts as unknown (never "updated") until a wave reserves it.
pub const MAX_VERSIONS: usize = u16::MAX as usize - 1;

/// Most distinct tags the index holds (ids are u16, one reserved).
pub const MAX_TAGS: usize = u16::MAX as usize - 1;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexError {
    #[error("more than {MAX_TAGS} distinct tags")]
    TooManyTags,
    #[error("more than {} devices", u32::MAX)]
    TooManyDevices,
    #[error("more than {MAX_VERSIONS} distinct running versions")]
    TooManyVersions,
}

/// A stable 64-bit hash of a device id (FNV-1a), the same in every process.
fn id_hash(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// SplitMix64's finaliser: a seed-dependent shuffle of the id hashes.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[derive(Default)]
pub struct FleetIndex {
    /// Every id, one after the other; device `i` is `ids[ends[i-1]..ends[i]]`.
    ids: String,
    ends: Vec<u32>,
    hashes: Vec<u64>,
    /// Id hash → device; a second id with the same hash goes to `collided`.
    by_hash: HashMap<u64, Idx>,
    collided: HashMap<Box<str>, Idx>,
    tag: Vec<u16>,
    production: Vec<bool>,
    /// Unix seconds of the last Status, 0 for never.
    last_seen: Vec<u32>,
    tags: Vec<Box<str>>,
    tag_ids: HashMap<Box<str>, u16>,
    /// The running version of each device's main component, interned.
    version: Vec<u16>,
    version_ids: HashMap<Box<str>, u16>,
    /// Version id → its text (empty for a free id).
    version_names: Vec<Box<str>>,
    /// Version id → devices running it. A version no device runs and no wave reserved is
    /// forgotten, so devices reporting ever new strings cannot fill the table.
    version_refs: Vec<u32>,
    /// Version id → reserved by a wave: kept while no device runs it.
    version_pinned: Vec<bool>,
    /// Ids of forgotten versions, taken before new ones.
    version_free: Vec<u16>,
    /// Members of each group, sorted.
    groups: HashMap<Box<str>, Vec<Idx>>,
    /// Deleted devices: their position stays taken (waves hold positions) but follows no tag
    /// and no lookup finds it; the same id registered again takes it back. The index is
    /// rebuilt without them at the next start.
    retired: HashMap<Box<str>, Idx>,
}

/// What a device is, as selection needs it.
#[derive(Debug, Clone, Copy)]
pub struct DeviceFacts<'a> {
    pub id: &'a str,
    pub tag: Option<&'a str>,
    pub groups: &'a [String],
    pub production: bool,
    pub last_seen: Option<u64>,
    /// The running version of the main component, as last reported.
    pub version: Option<&'a str>,
}

impl FleetIndex {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// Whether `tag` is known, and how many tags are: to refuse a batch that would overflow
    /// [`MAX_TAGS`] before anything of it is written.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tag_ids.contains_key(tag)
    }

    pub fn tag_count(&self) -> usize {
        self.tags.len()
    }

    pub fn id(&self, i: Idx) -> &str {
        let i = i as usize;
        let start = if i == 0 { 0 } else { self.ends[i - 1] as usize };
        &self.ids[start..self.ends[i] as usize]
    }

    pub fn lookup(&self, id: &str) -> Option<Idx> {
        match self.by_hash.get(&id_hash(id)) {
            Some(&i) if self.id(i) == id => Some(i),
            _ => self.collided.get(id).copied(),
        }
    }

    fn tag_id(&mut self, tag: Option<&str>) -> Result<u16, IndexError> {
        let Some(t) = tag else { return Ok(NO_TAG) };
        if let Some(&n) = self.tag_ids.get(t) {
            return Ok(n);
        }
        if self.tags.len() >= MAX_TAGS {
            return Err(IndexError::TooManyTags);
        }
        let n = self.tags.len() as u16;
        self.tags.push(t.into());
        self.tag_ids.insert(t.into(), n);
        Ok(n)
    }

    /// Positions held by deleted devices until the next start.
    pub fn retired(&self) -> usize {
        self.retired.len()
    }

    /// Maps an id's hash to its position (a second id with the same hash goes to `collided`).
    fn map_id(&mut self, id: &str, h: u64, i: Idx) {
        match self.by_hash.entry(h) {
            std::collections::hash_map::Entry::Occupied(_) => {
                self.collided.insert(id.into(), i);
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(i);
            }
        }
    }

    /// Takes a deleted device out of every tag, group and lookup; returns its position.
    pub fn remove(&mut self, id: &str) -> Option<Idx> {
        let i = self.lookup(id)?;
        let h = self.hashes[i as usize];
        if self.by_hash.get(&h) == Some(&i) {
            self.by_hash.remove(&h);
        } else {
            self.collided.remove(id);
        }
        for members in self.groups.values_mut() {
            if let Ok(at) = members.binary_search(&i) {
                members.remove(at);
            }
        }
        let u = i as usize;
        self.tag[u] = NO_TAG;
        self.production[u] = false;
        self.last_seen[u] = 0;
        self.set_version(i, None);
        self.retired.insert(id.into(), i);
        Some(i)
    }

    /// Adds a device or replaces what the index knows of it.
    pub fn upsert(&mut self, d: DeviceFacts<'_>) -> Result<Idx, IndexError> {
        let tag = self.tag_id(d.tag)?;
        if let Some(i) = self.retired.remove(d.id) {
            self.map_id(d.id, self.hashes[i as usize], i);
        }
        let i = match self.lookup(d.id) {
            Some(i) => {
                for members in self.groups.values_mut() {
                    if let Ok(at) = members.binary_search(&i) {
                        members.remove(at);
                    }
                }
                i
            }
            None => {
                let i = Idx::try_from(self.ends.len()).map_err(|_| IndexError::TooManyDevices)?;
                self.ids.push_str(d.id);
                self.ends.push(self.ids.len() as u32);
                let h = id_hash(d.id);
                self.hashes.push(h);
                self.map_id(d.id, h, i);
                self.tag.push(NO_TAG);
                self.production.push(false);
                self.last_seen.push(0);
                self.version.push(NO_VERSION);
                i
            }
        };
        let u = i as usize;
        self.tag[u] = tag;
        self.production[u] = d.production;
        self.last_seen[u] = d.last_seen.map_or(0, |s| s.min(u32::MAX as u64) as u32);
        self.set_version(i, d.version);
        for g in d.groups {
            let members = self.groups.entry(g.as_str().into()).or_default();
            if let Err(at) = members.binary_search(&i) {
                members.insert(at, i);
            }
        }
        Ok(i)
    }

    /// The id of `version` in the table, adding it when there is room, kept until the wave
    /// that reserved it is gone (for as long as the index lives).
    pub fn reserve_version(&mut self, version: &str) -> Result<u16, IndexError> {
        let v = self.intern(version)?;
        self.version_pinned[v as usize] = true;
        Ok(v)
    }

    fn intern(&mut self, version: &str) -> Result<u16, IndexError> {
        if let Some(&v) = self.version_ids.get(version) {
            return Ok(v);
        }
        if self.version_ids.len() >= MAX_VERSIONS {
            return Err(IndexError::TooManyVersions);
        }
        let v = match self.version_free.pop() {
            Some(v) => {
                self.version_names[v as usize] = version.into();
                v
            }
            None => {
                self.version_names.push(version.into());
                self.version_refs.push(0);
                self.version_pinned.push(false);
                (self.version_names.len() - 1) as u16
            }
        };
        self.version_ids.insert(version.into(), v);
        Ok(v)
    }

    /// Records the running version of a device's main component.
    pub fn set_version(&mut self, i: Idx, version: Option<&str>) {
        let Some(old) = self.version.get(i as usize).copied() else { return };
        let new = version.and_then(|v| self.intern(v).ok()).unwrap_or(NO_VERSION);
        if new == old {
            return;
        }
        if let Some(r) = self.version_refs.get_mut(new as usize) {
            *r += 1;
        }
        self.version[i as usize] = new;
        let u = old as usize;
        if let Some(r) = self.version_refs.get_mut(u) {
            *r = r.saturating_sub(1);
            if *r == 0 && !self.version_pinned[u] {
                let name = std::mem::take(&mut self.version_names[u]);
                self.version_ids.remove(&name);
                self.version_free.push(old);
            }
        }
    }

    /// Distinct versions the table holds now.
    pub fn versions(&self) -> usize {
        self.version_ids.len()
    }

    /// A test for "runs `version`" that looks the version up once, for loops over many
    /// devices.
    pub fn running(&self, version: &str) -> impl Fn(Idx) -> bool + '_ {
        let v = self.version_ids.get(version).copied();
        move |i| v.is_some() && self.version.get(i as usize).copied() == v
    }

    /// A test for "runs a version that `pick` chooses", deciding once per distinct version.
    pub fn running_any(&self, pick: impl Fn(&str) -> bool) -> impl Fn(Idx) -> bool + '_ {
        let chosen: Vec<bool> = self.version_names.iter().map(|v| !v.is_empty() && pick(v)).collect();
        move |i| {
            let v = self.version.get(i as usize).copied().unwrap_or(NO_VERSION);
            chosen.get(v as usize).copied().unwrap_or(false)
        }
    }

    /// The devices following `tag` in a production class, in index order.
    pub fn on_tag(&self, tag: &str, production: bool) -> impl Iterator<Item = Idx> + '_ {
        let follows = self.following(tag, production);
        (0..self.len() as Idx).filter(move |&i| follows(i))
    }

    /// A test for "follows `tag` in a production class" that looks the tag up once.
    pub fn following(&self, tag: &str, production: bool) -> impl Fn(Idx) -> bool + '_ {
        let t = self.tag_ids.get(tag).copied();
        move |i| {
            let u = i as usize;
            t.is_some() && self.tag.get(u).copied() == t && self.production[u] == production
        }
    }

    /// Every group with its members (sorted), in name order.
    pub fn groups(&self) -> Vec<(&str, &[Idx])> {
        let mut v: Vec<(&str, &[Idx])> = self.groups.iter().map(|(g, m)| (&**g, m.as_slice())).collect();
        v.sort_unstable_by_key(|(g, _)| *g);
        v
    }

    /// Unix seconds of device `i`'s last Status as the index knows it (0: never).
    pub fn last_seen(&self, i: Idx) -> u64 {
        self.last_seen.get(i as usize).copied().unwrap_or(0) as u64
    }

    pub fn seen(&mut self, i: Idx, secs: u64) {
        if let Some(s) = self.last_seen.get_mut(i as usize) {
            *s = secs.min(u32::MAX as u64) as u32;
        }
    }

    /// Heap bytes the index holds (capacities, and the hash maps' slots), for the per-device
    /// budget.
    pub fn heap_bytes(&self) -> usize {
        let map_slot = |k: usize, v: usize| (k + v + 1) * 8 / 7;
        self.ids.capacity()
            + self.ends.capacity() * 4
            + self.hashes.capacity() * 8
            + self.by_hash.capacity() * map_slot(8, 4)
            + self.tag.capacity() * 2
            + self.production.capacity()
            + self.last_seen.capacity() * 4
            + self.version.capacity() * 2
            + self.version_ids.keys().map(|v| 2 * v.len() + 64).sum::<usize>()
            + self.groups.values().map(|m| m.capacity() * 4 + 32).sum::<usize>()
            + self.collided.len() * 64
            + self.tags.iter().map(|t| t.len() + 48).sum::<usize>()
    }
}

/// How many devices `--limit` asks for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    Count(usize),
    /// A share of the devices the rollout could reach (tag, class, group, list), already in
    /// the wave or not, in parts per million (10% = 100,000); rounded up, in integers, so
    /// 8.8% of 375 is exactly 33.
    PartsPerMillion(u32),
}

/// `ppm` parts per million of `population`, rounded up, in integers.
pub fn share(population: usize, ppm: u32) -> usize {
    (population as u128 * ppm as u128).div_ceil(1_000_000) as usize
}

/// What a rollout asks for.
pub struct Selection<'a> {
    pub tag: &'a str,
    pub production: bool,
    pub group: Option<&'a str>,
    pub uuids: Option<&'a [String]>,
    pub limit: Option<Limit>,
    pub seed: u64,
    pub now: u64,
}

/// Why a device named in `--uuids` is not selected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Unknown,
    OtherTag,
    OtherClass,
    NotInGroup,
    AlreadyInWave,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Selected {
    /// In sample order (most recently active first, then the seed's order).
    pub devices: Vec<Idx>,
    /// Devices named in `--uuids` that were not selected, with the reason.
    pub rejected: Vec<(String, Rejection)>,
    /// Devices the rollout could reach before the limit.
    pub population: usize,
}

/// Recency class: 0 seen within an hour … 4 never seen. The sample takes lower classes first.
fn recency(last_seen: u32, now: u64) -> u64 {
    if last_seen == 0 {
        return 4;
    }
    match now.saturating_sub(last_seen as u64) {
        a if a < 3_600 => 0,
        a if a < 86_400 => 1,
        a if a < 7 * 86_400 => 2,
        _ => 3,
    }
}

impl FleetIndex {
    /// The devices a rollout reaches. `in_wave` says whether a device is already updated or
    /// staged in this wave; those are never selected again.
    pub fn select(&self, s: &Selection<'_>, in_wave: impl Fn(Idx) -> bool) -> Selected {
        let Some(&tag) = self.tag_ids.get(s.tag) else {
            let rejected = s.uuids.unwrap_or_default().iter().map(|u| (u.clone(), self.reject_unknown(u))).collect();
            return Selected { rejected, ..Selected::default() };
        };
        let group = s.group.map(|g| self.groups.get(g).map(Vec::as_slice).unwrap_or_default());
        let fits = |i: Idx| self.tag[i as usize] == tag && self.production[i as usize] == s.production;
        let mut out = Selected::default();
        let mut candidates: Vec<Idx> = Vec::new();
        match s.uuids {
            Some(list) => {
                let mut seen = std::collections::HashSet::with_capacity(list.len());
                for u in list {
                    let Some(i) = self.lookup(u) else {
                        out.rejected.push((u.clone(), Rejection::Unknown));
                        continue;
                    };
                    if !seen.insert(i) {
                        continue;
                    }
                    let why = if self.tag[i as usize] != tag {
                        Some(Rejection::OtherTag)
                    } else if self.production[i as usize] != s.production {
                        Some(Rejection::OtherClass)
                    } else if group.is_some_and(|g| g.binary_search(&i).is_err()) {
                        Some(Rejection::NotInGroup)
                    } else {
                        None
                    };
                    match why {
                        Some(r) => out.rejected.push((u.clone(), r)),
                        None => {
                            out.population += 1;
                            if in_wave(i) {
                                out.rejected.push((u.clone(), Rejection::AlreadyInWave));
                            } else {
                                candidates.push(i);
                            }
                        }
                    }
                }
            }
            None => {
                let mut consider = |i: Idx| {
                    if fits(i) {
                        out.population += 1;
                        if !in_wave(i) {
                            candidates.push(i);
                        }
                    }
                };
                match group {
                    Some(members) => members.iter().copied().for_each(&mut consider),
                    None => (0..self.len() as Idx).for_each(&mut consider),
                }
            }
        }
        let want = match s.limit {
            None => candidates.len(),
            Some(Limit::Count(n)) => n,
            Some(Limit::PartsPerMillion(ppm)) => share(out.population, ppm),
        };
        let key = |i: &Idx| (recency(self.last_seen[*i as usize], s.now), mix(self.hashes[*i as usize] ^ s.seed));
        if want < candidates.len() {
            candidates.select_nth_unstable_by_key(want, key);
            candidates.truncate(want);
        }
        candidates.sort_unstable_by_key(key);
        out.devices = candidates;
        out
    }

    fn reject_unknown(&self, id: &str) -> Rejection {
        if self.lookup(id).is_some() {
            Rejection::OtherTag
        } else {
            Rejection::Unknown
        }
    }
}

#[cfg(test)]
mod tests;
