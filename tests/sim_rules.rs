//! Each rule the simulator's invariants guard, broken on purpose (`planner::rules`): the
//! simulator must catch every one, with the invariant that guards it. A broken rule is
//! process-wide: the tests of this binary run one at a time (`RULES`).

use fwgate::planner::rules::{set_broken, Rule};
use fwgate::sim::{run, SimConfig};

/// With `rule` broken, runs seeds 1, 2, … (2,000 steps each, at most 40) until one fails:
/// that seed, its failure, and the steps run in all. The rule is mended before it returns.
fn first_failure(rule: Rule, cluster: bool) -> (u64, fwgate::sim::Failure, u64) {
    set_broken(rule, true);
    let mut caught = None;
    let mut steps = 0;
    for seed in 1..=40 {
        let r = run(&SimConfig { seed, steps: 2_000, cluster, ..SimConfig::default() });
        steps += r.steps;
        if let Some(f) = r.failure {
            caught = Some((seed, f));
            break;
        }
    }
    set_broken(rule, false);
    let (seed, f) = caught.unwrap_or_else(|| panic!("{rule:?} broken, and no invariant caught it in 40 seeds"));
    (seed, f, steps)
}

/// Held by each test while it breaks a rule.
static RULES: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn every_deliberately_broken_rule_is_caught_by_its_invariant() {
    let _one = RULES.lock().unwrap_or_else(|e| e.into_inner());
    let expected: [(Rule, &[&str]); 5] = [
        (Rule::OneTransfer, &["one transfer per device"]),
        (Rule::Admission, &["admission"]),
        (
            Rule::AtomicStep,
            &[
                "one transfer per device",
                "actions: stored, recounted, nothing lost",
                "rollouts: stored, recounted, nothing lost",
            ],
        ),
        (Rule::LeftStored, &["rollouts: stored, recounted, nothing lost"]),
        (Rule::FinishSettled, &["rollouts: stored, recounted, nothing lost", "every plan ends"]),
    ];
    let mut lines = Vec::new();
    for (rule, invariants) in expected {
        let (seed, f, steps) = first_failure(rule, false);
        assert!(
            invariants.contains(&f.invariant),
            "{rule:?} was caught by '{}', not by {invariants:?}: {f}",
            f.invariant
        );
        lines.push(format!("{rule:?}: caught by '{}' at seed {seed}, after {steps} steps in all", f.invariant));
    }
    println!("{}", lines.join("\n"));
    // Mended, the same seeds pass again.
    let r = run(&SimConfig { seed: 1, steps: 2_000, ..SimConfig::default() });
    assert!(r.failure.is_none(), "{}", r.failure.unwrap());
}

/// Cluster mode's own rules: the planner clears deleted devices' views again when a node
/// reconnects (its clean session gets only the retained views, and a device deleted meanwhile
/// has none: without it the old view is served for good), and a node answers WAIT past its
/// view's trust deadline.
#[test]
fn the_nodes_broken_rules_are_caught_in_cluster_mode() {
    let _one = RULES.lock().unwrap_or_else(|e| e.into_inner());
    let expected: [(Rule, &str); 2] =
        [(Rule::TombstoneReplay, "views converge"), (Rule::TrustDeadline, "admission (node)")];
    let mut lines = Vec::new();
    for (rule, invariant) in expected {
        let (seed, f, steps) = first_failure(rule, true);
        assert_eq!(f.invariant, invariant, "{rule:?}: {f}");
        lines.push(format!("{rule:?}: caught by '{}' at seed {seed}, after {steps} steps in all", f.invariant));
    }
    println!("{}", lines.join("\n"));
}
