use super::*;

fn facts<'a>(id: &'a str, tag: &'a str, groups: &'a [String], production: bool, seen: u64) -> DeviceFacts<'a> {
    DeviceFacts { id, tag: Some(tag), groups, production, last_seen: (seen > 0).then_some(seen), version: None }
}

const NOW: u64 = 1_000_000;

/// 100 devices d00..d99 on tag `prod`, except d95..d99 on `other`; even ones in group `eu`;
/// d90.. are test (not production) devices; d00..d09 seen a minute ago, d10..d49 eight days
/// ago, the rest never.
fn fleet() -> FleetIndex {
    let mut x = FleetIndex::default();
    let eu = vec!["eu".to_string()];
    for n in 0..100u64 {
        let id = format!("d{n:02}");
        let groups: &[String] = if n % 2 == 0 { &eu } else { &[] };
        let tag = if n >= 95 { "other" } else { "prod" };
        let seen = match n {
            0..=9 => NOW - 60,
            10..=49 => NOW - 8 * 86_400,
            _ => 0,
        };
        x.upsert(facts(&id, tag, groups, n < 90, seen)).unwrap();
    }
    x
}

fn sel<'a>(limit: Option<Limit>, group: Option<&'a str>, uuids: Option<&'a [String]>, seed: u64) -> Selection<'a> {
    Selection { tag: "prod", production: true, group, uuids, limit, seed, now: NOW }
}

fn sorted(x: &FleetIndex, s: &Selected) -> Vec<String> {
    let mut v: Vec<String> = s.devices.iter().map(|&i| x.id(i).to_owned()).collect();
    v.sort();
    v
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_whole_tag_is_the_devices_of_its_production_class() {
    let x = fleet();
    let s = x.select(&sel(None, None, None, 1), |_| false);
    assert_eq!((s.devices.len(), s.population), (90, 90), "d90-d94 are test devices, d95-d99 another tag");
    let t = x.select(&Selection { production: false, ..sel(None, None, None, 1) }, |_| false);
    assert_eq!(sorted(&x, &t), strings(&["d90", "d91", "d92", "d93", "d94"]));
    let none = x.select(&Selection { tag: "nosuch", ..sel(None, None, None, 1) }, |_| false);
    assert!(none.devices.is_empty());
}

#[test]
fn a_limited_sample_prefers_recent_devices_and_repeats_for_a_seed() {
    let x = fleet();
    let a = x.select(&sel(Some(Limit::Count(15)), None, None, 7), |_| false);
    assert_eq!(a.devices.len(), 15);
    let recent: Vec<String> = (0..10).map(|n| format!("d{n:02}")).collect();
    assert!(recent.iter().all(|r| sorted(&x, &a).contains(r)), "the 10 recently active come first");
    assert_eq!(a, x.select(&sel(Some(Limit::Count(15)), None, None, 7), |_| false), "same seed, same sample");
    let b = x.select(&sel(Some(Limit::Count(15)), None, None, 8), |_| false);
    assert_ne!(sorted(&x, &a), sorted(&x, &b), "another seed, another sample of the older devices");
    // 10% of the 90 devices the rollout could reach.
    assert_eq!(x.select(&sel(Some(Limit::PartsPerMillion(100_000)), None, None, 7), |_| false).devices.len(), 9);
    assert_eq!(
        x.select(&sel(Some(Limit::PartsPerMillion(10_000)), None, None, 7), |_| false).devices.len(),
        1,
        "rounded up"
    );
}

#[test]
fn percentages_are_exact() {
    // In floating point 8.8% of 375 comes out a hair above 33 and is rounded up to 34.
    assert_eq!((375_f64 * 8.8 / 100.0).ceil(), 34.0);
    assert_eq!(share(375, 88_000), 33);
    assert_eq!(share(1000, 11_000), 11);
    assert_eq!(share(1000, 11_001), 12, "any excess rounds up");
    assert_eq!(share(3, 333_333), 1);
    assert_eq!(share(1_000_000, 1), 1);
    assert_eq!(share(usize::MAX, 1_000_000), usize::MAX, "no overflow");
    assert_eq!(share(0, 1_000_000), 0);
}

#[test]
fn repeated_limited_rollouts_never_pick_a_device_twice() {
    let x = fleet();
    let mut staged = std::collections::HashSet::new();
    for round in 0..9 {
        let s = x.select(&sel(Some(Limit::Count(10)), None, None, round), |i| staged.contains(&i));
        assert_eq!(s.devices.len(), 10, "round {round}");
        for i in s.devices {
            assert!(staged.insert(i), "round {round}: {} selected twice", x.id(i));
        }
    }
    assert!(x.select(&sel(Some(Limit::Count(10)), None, None, 99), |i| staged.contains(&i)).devices.is_empty());
}

#[test]
fn uuids_are_checked_one_by_one_and_intersected_with_the_group() {
    let x = fleet();
    let list = strings(&["d01", "d02", "d02", "nope", "d91", "d96", "d03", "d04"]);
    let s = x.select(&sel(None, Some("eu"), Some(&list), 1), |i| x.id(i) == "d04");
    assert_eq!(sorted(&x, &s), strings(&["d02"]));
    assert_eq!(
        s.rejected,
        vec![
            ("d01".to_string(), Rejection::NotInGroup),
            ("nope".to_string(), Rejection::Unknown),
            ("d91".to_string(), Rejection::OtherClass),
            ("d96".to_string(), Rejection::OtherTag),
            ("d03".to_string(), Rejection::NotInGroup),
            ("d04".to_string(), Rejection::AlreadyInWave),
        ]
    );
    // --uuids with --limit samples from the list.
    let all: Vec<String> = (0..90).map(|n| format!("d{n:02}")).collect();
    let s = x.select(&sel(Some(Limit::Count(5)), None, Some(&all), 3), |_| false);
    assert_eq!(s.devices.len(), 5);
}

#[test]
fn upserts_move_devices_between_tags_and_groups() {
    let mut x = fleet();
    let none: Vec<String> = Vec::new();
    x.upsert(facts("d00", "other", &none, true, NOW)).unwrap();
    assert_eq!(x.len(), 100, "an update is not a new device");
    let s = x.select(&sel(None, Some("eu"), None, 1), |_| false);
    assert!(!sorted(&x, &s).contains(&"d00".to_string()));
    assert_eq!(x.lookup("d00"), Some(0));
    assert_eq!(x.lookup("zz"), None);
}

#[test]
fn a_removed_device_is_in_no_tag_group_or_lookup_and_takes_its_position_back_when_it_returns() {
    let mut x = fleet();
    let i = x.lookup("d02").unwrap();
    assert_eq!(x.remove("d02"), Some(i));
    assert_eq!((x.lookup("d02"), x.remove("d02"), x.retired()), (None, None, 1));
    assert!(!x.on_tag("prod", true).any(|j| j == i));
    assert!(x.groups().iter().all(|(_, m)| !m.contains(&i)));
    let picked = x.select(&sel(None, None, Some(&strings(&["d02", "d03"])), 1), |_| false);
    assert_eq!(sorted(&x, &picked), ["d03"]);
    let eu = vec!["eu".to_string()];
    assert_eq!(x.upsert(facts("d02", "other", &eu, false, 0)).unwrap(), i, "the same position");
    assert_eq!((x.lookup("d02"), x.retired(), x.len()), (Some(i), 0, 100));
    assert!(x.following("other", false)(i));
}

#[test]
fn versions_no_device_runs_are_forgotten_unless_a_wave_reserved_them() {
    let mut x = fleet();
    x.reserve_version("9.0.0").unwrap();
    // One device reporting ever new versions holds one entry, not one per string.
    for n in 0..200_000u32 {
        x.set_version(3, Some(&format!("junk-{n}")));
    }
    assert_eq!(x.versions(), 2, "the last junk version and the reserved one");
    assert!(x.running("junk-199999")(3));
    assert!(!x.running("junk-0")(3));
    // Two devices on one version: it stays while either runs it.
    x.set_version(4, Some("1.0.0"));
    x.set_version(5, Some("1.0.0"));
    x.set_version(4, Some("1.1.0"));
    assert!(x.running("1.0.0")(5));
    x.set_version(5, None);
    assert!(!x.running_any(|v| v == "1.0.0")(5));
    assert_eq!(x.versions(), 3, "junk-199999, 1.1.0 and the reserved 9.0.0");
    // The reserved version outlives its devices.
    x.set_version(6, Some("9.0.0"));
    x.set_version(6, None);
    x.set_version(7, Some("9.0.0"));
    assert!(x.running("9.0.0")(7));
    // A removed device lets go of its version.
    x.remove("d03");
    assert_eq!(x.versions(), 2, "1.1.0, 9.0.0 (reserved, run by d07) and nothing of d03's");
}
