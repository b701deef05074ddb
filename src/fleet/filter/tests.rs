use super::*;
use crate::fleet::DeviceSpec;

fn device(id: &str, tag: Option<&str>, groups: &[&str], production: bool, hw: Option<&str>) -> Device {
    Device {
        spec: DeviceSpec {
            id: id.into(),
            tag: tag.map(Into::into),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            production,
            hardware: hw.map(Into::into),
            inventory: None,
        },
        running: Default::default(),
        last_seen: None,
        created_at: 0,
    }
}

/// A small fleet with every attribute varied.
fn fleet() -> Vec<Device> {
    let mut a = device("cid-1", Some("release"), &["eu", "canary"], true, Some("nrf52"));
    a.running.insert("main".into(), "2.0.1".into());
    a.running.insert("bios".into(), "1.9".into());
    a.last_seen = Some(1_767_225_600); // 2026-01-01T00:00:00Z
    let mut b = device("cid-2", Some("release"), &["us"], true, Some("esp32"));
    b.running.insert("main".into(), "2.10".into());
    b.last_seen = Some(1_767_225_700);
    let mut c = device("lab-7", Some("beta"), &[], false, None);
    c.running.insert("main".into(), "nightly-42".into());
    let d = device("new-1", None, &["eu"], false, Some("nrf52"));
    vec![a, b, c, d]
}

fn ids(q: &str) -> Vec<String> {
    let f = Filter::parse(q).unwrap_or_else(|e| panic!("{q}: {e}"));
    fleet().iter().filter(|d| f.matches(d)).map(|d| d.spec.id.clone()).collect()
}

#[test]
fn every_operator_on_every_field() {
    let cases: &[(&str, &[&str])] = &[
        ("id==cid-1", &["cid-1"]),
        ("id!=cid-1", &["cid-2", "lab-7", "new-1"]),
        ("id=lt=cid-2", &["cid-1"]),
        ("id=le=cid-2", &["cid-1", "cid-2"]),
        ("id=gt=lab-7", &["new-1"]),
        ("id=ge=lab-7", &["lab-7", "new-1"]),
        ("id=in=(cid-2,new-1)", &["cid-2", "new-1"]),
        ("id=out=(cid-2,new-1)", &["cid-1", "lab-7"]),
        ("id<cid-2", &["cid-1"]),
        ("id<=cid-2", &["cid-1", "cid-2"]),
        ("id>lab-7", &["new-1"]),
        ("id>=lab-7", &["lab-7", "new-1"]),
        ("tag==release", &["cid-1", "cid-2"]),
        ("tag!=release", &["lab-7", "new-1"]),
        ("tag=out=(release,beta)", &["new-1"]),
        ("group==eu", &["cid-1", "new-1"]),
        ("group!=eu", &["cid-2", "lab-7"]),
        ("group=in=(us,canary)", &["cid-1", "cid-2"]),
        ("production==true", &["cid-1", "cid-2"]),
        ("production==false", &["lab-7", "new-1"]),
        ("production!=true", &["lab-7", "new-1"]),
        ("hardware==nrf52", &["cid-1", "new-1"]),
        ("hardware!=nrf52", &["cid-2", "lab-7"]),
        ("version==2.0.1", &["cid-1"]),
        // Versions order as releases: 2.10 is newer than 2.0.1; a non-version orders nowhere.
        ("version=gt=2.1", &["cid-2"]),
        ("version=lt=2.1", &["cid-1"]),
        ("version=ge=2.0.1", &["cid-1", "cid-2"]),
        ("version=le=2.0.1", &["cid-1"]),
        ("version!=2.10", &["cid-1", "lab-7", "new-1"]),
        ("version.bios==1.9", &["cid-1"]),
        ("version.bios=lt=2", &["cid-1"]),
        ("version.bios!=1.9", &["cid-2", "lab-7", "new-1"]),
        ("lastseen==1767225600", &["cid-1"]),
        ("lastseen=gt=1767225600", &["cid-2"]),
        ("lastseen=ge=2026-01-01T00:00:00Z", &["cid-1", "cid-2"]),
        ("lastseen=lt=1767225700", &["cid-1"]),
        ("lastseen!=1767225600", &["cid-2", "lab-7", "new-1"]),
    ];
    for (q, want) in cases {
        assert_eq!(ids(q), *want, "{q}");
    }
}

#[test]
fn and_binds_tighter_than_or_and_parentheses_group() {
    assert_eq!(ids("tag==beta,tag==release;group==us"), ["cid-2", "lab-7"]);
    assert_eq!(ids("(tag==beta,tag==release);group==us"), ["cid-2"]);
    assert_eq!(ids("tag==beta or tag==release and group==us"), ["cid-2", "lab-7"]);
    assert_eq!(ids("( tag==beta , tag==release ) ; group==us"), ["cid-2"]);
    assert_eq!(ids("tag==release;hardware==nrf52"), ["cid-1"]);
    assert_eq!(ids("((id==cid-1))"), ["cid-1"]);
}

#[test]
fn wildcards_and_quoted_values() {
    assert_eq!(ids("id==cid-*"), ["cid-1", "cid-2"]);
    assert_eq!(ids("id==*-1"), ["cid-1", "new-1"]);
    assert_eq!(ids("id==*i*-*"), ["cid-1", "cid-2"]);
    assert_eq!(ids("id!=*-1"), ["cid-2", "lab-7"]);
    assert_eq!(ids("version=in=(2.*,nightly-*)"), ["cid-1", "cid-2", "lab-7"]);
    assert_eq!(ids("id==*"), ["cid-1", "cid-2", "lab-7", "new-1"]);
    assert_eq!(ids("tag==*"), ["cid-1", "cid-2", "lab-7"], "a device without a tag has none to match");
    assert_eq!(ids("hardware=='nrf52'"), ["cid-1", "new-1"]);
    assert_eq!(ids("id==\"lab-7\""), ["lab-7"]);
    assert!(wildcard("a*b*c", "abc") && wildcard("a*b*c", "axxbyyc") && !wildcard("a*b*c", "acb"));
    assert!(!wildcard("ab*ab", "ab"), "the prefix and suffix may not overlap");
}

#[test]
fn malformed_queries_name_the_position_and_what_was_expected() {
    let cases: &[(&str, usize, &str)] = &[
        ("", 0, "empty filter"),
        ("tag", 3, "operator"),
        ("tag==", 5, "a value"),
        ("tag=release", 3, "operator"),
        ("tag==release;", 13, "a field name"),
        ("tag==release,,id==x", 13, "a field name"),
        ("(tag==release", 13, "`)`"),
        ("tag==release)", 12, "the end"),
        ("id=in=(a,b", 10, "`,` or `)`"),
        ("id==\"open", 9, "closing quote"),
        ("colour==red", 0, "unknown field \"colour\""),
        ("version.==1", 0, "unknown field"),
        ("production==yes", 12, "true or false"),
        ("production=lt=true", 0, "use == or !="),
        ("lastseen=gt=yesterday", 12, "Unix seconds"),
        ("version=lt=newest", 11, "not a version"),
        ("id==(a,b)", 7, "takes one value"),
        // Positions count characters, not bytes.
        ("tag==release;id==ä;colour==x", 19, "unknown field"),
    ];
    for (q, position, words) in cases {
        let e = Filter::parse(q).expect_err(q);
        assert_eq!(e.position, *position, "{q}: {e}");
        assert!(e.message.contains(words), "{q}: {e}");
    }
}
