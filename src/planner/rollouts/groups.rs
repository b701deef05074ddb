//! Deployment groups: how a rollout's devices are split into them, and when a group's success
//! or error condition is met.

use serde::{Deserialize, Serialize};

use crate::fleet::filter::Filter;
use crate::fleet::Device;

/// What happens when a group's success condition is met.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SuccessAction {
    /// The next group starts.
    #[default]
    NextGroup,
    /// The rollout pauses until an operator resumes it.
    Pause,
}

/// How many failed devices stop the whole rollout: more than this many (strictly).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ErrorThreshold {
    /// A percentage of the group's devices.
    Percent(u8),
    /// A number of devices.
    Count(u64),
}

impl ErrorThreshold {
    /// `5%` or `5`.
    pub fn parse(text: &str) -> Result<ErrorThreshold, String> {
        let bad = || format!("error threshold {text:?}: a percentage (5%) or a number of devices (5)");
        match text.trim().strip_suffix('%') {
            Some(p) => match p.trim().parse::<u8>() {
                Ok(p) if p <= 100 => Ok(ErrorThreshold::Percent(p)),
                _ => Err(bad()),
            },
            None => text.trim().parse().map(ErrorThreshold::Count).map_err(|_| bad()),
        }
    }
}

/// A group's conditions; hawkBit's defaults are 50% and 50%.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Conditions {
    /// Percentage of the group's devices that must have finished successfully.
    pub success_percent: u8,
    pub success_action: SuccessAction,
    pub error: ErrorThreshold,
}

impl Default for Conditions {
    fn default() -> Conditions {
        Conditions { success_percent: 50, success_action: SuccessAction::NextGroup, error: ErrorThreshold::Percent(50) }
    }
}

/// Where a group's devices are.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Counts {
    pub total: u64,
    /// Updated and verified.
    pub succeeded: u64,
    pub failed: u64,
    pub canceled: u64,
}

impl Counts {
    fn ended(&self) -> u64 {
        self.succeeded + self.failed + self.canceled
    }
}

/// What a group's counts call for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep going.
    Pending,
    /// More failed than the error threshold allows: stop the rollout.
    Error,
    /// The success condition is met (or every device has ended): its success action.
    Success,
}

impl Conditions {
    /// The error condition first, then the success condition. A group whose devices have all
    /// ended succeeds even below the threshold, and an empty group succeeds at once (both as
    /// hawkBit does).
    pub fn evaluate(&self, c: &Counts) -> Verdict {
        let too_many = match self.error {
            ErrorThreshold::Percent(p) => c.failed * 100 > p as u64 * c.total,
            ErrorThreshold::Count(n) => c.failed > n,
        };
        if too_many {
            return Verdict::Error;
        }
        if c.ended() >= c.total || c.succeeded * 100 >= self.success_percent as u64 * c.total {
            return Verdict::Success;
        }
        Verdict::Pending
    }

    /// How far a group is toward each threshold, in percent of it (for `rollouts status`).
    pub fn progress(&self, c: &Counts) -> (f64, f64) {
        // An empty group has met its success condition and has no failures.
        let pct = |n: u64, empty: f64| if c.total == 0 { empty } else { n as f64 * 100.0 / c.total as f64 };
        let success = if self.success_percent == 0 {
            100.0
        } else {
            pct(c.succeeded, 100.0) * 100.0 / self.success_percent as f64
        };
        let error = match self.error {
            // Any failure meets a zero threshold.
            ErrorThreshold::Percent(0) | ErrorThreshold::Count(0) => {
                if c.failed > 0 {
                    100.0
                } else {
                    0.0
                }
            }
            ErrorThreshold::Percent(p) => pct(c.failed, 0.0) * 100.0 / p as f64,
            ErrorThreshold::Count(n) => c.failed as f64 * 100.0 / n as f64,
        };
        (success.min(100.0), error.min(100.0))
    }
}

/// `devices` (sorted by id) into `n` groups whose sizes differ by at most one, the larger
/// ones first: the same split every time for the same devices. The ids are moved, not copied.
pub fn split_evenly(mut devices: Vec<String>, n: usize) -> Vec<Vec<String>> {
    let n = n.max(1);
    let (base, extra) = (devices.len() / n, devices.len() % n);
    let mut out = Vec::with_capacity(n);
    for g in (0..n).rev() {
        let size = base + usize::from(g < extra);
        out.push(devices.split_off(devices.len() - size));
    }
    out.reverse();
    out
}

/// An explicitly defined group: a sub-filter and/or a percentage of the devices (matching the
/// sub-filter) not yet in an earlier group. The last group takes every device left.
#[derive(Debug, Clone, Default)]
pub struct GroupSpec {
    pub filter: Option<Filter>,
    /// 1–100; `None` is 100.
    pub percent: Option<u8>,
}

/// `devices` (sorted by id) into the explicit `groups`.
pub fn split_defined(devices: &[Device], groups: &[GroupSpec]) -> Vec<Vec<String>> {
    let mut taken = vec![false; devices.len()];
    let mut out = Vec::with_capacity(groups.len());
    for (i, g) in groups.iter().enumerate() {
        let last = i + 1 == groups.len();
        let candidates: Vec<usize> = (0..devices.len())
            .filter(|&d| !taken[d] && (last || g.filter.as_ref().is_none_or(|f| f.matches(&devices[d]))))
            .collect();
        let want = if last {
            candidates.len()
        } else {
            let p = g.percent.unwrap_or(100).min(100) as usize;
            (candidates.len() * p).div_ceil(100)
        };
        let chosen: Vec<String> = candidates[..want].iter().map(|&d| devices[d].spec.id.clone()).collect();
        for &d in &candidates[..want] {
            taken[d] = true;
        }
        out.push(chosen);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::DeviceSpec;

    fn counts(total: u64, succeeded: u64, failed: u64) -> Counts {
        Counts { total, succeeded, failed, canceled: 0 }
    }

    #[test]
    fn the_error_condition_is_strict_and_comes_before_success() {
        let c = Conditions { success_percent: 80, error: ErrorThreshold::Percent(10), ..Default::default() };
        assert_eq!(c.evaluate(&counts(10, 0, 1)), Verdict::Pending, "10% is not more than 10%");
        assert_eq!(c.evaluate(&counts(10, 0, 2)), Verdict::Error);
        assert_eq!(c.evaluate(&counts(10, 8, 2)), Verdict::Error, "error before success");
        assert_eq!(c.evaluate(&counts(10, 8, 1)), Verdict::Success);
        assert_eq!(c.evaluate(&counts(10, 7, 1)), Verdict::Pending);
        let n = Conditions { error: ErrorThreshold::Count(2), ..c };
        assert_eq!(n.evaluate(&counts(100, 0, 2)), Verdict::Pending);
        assert_eq!(n.evaluate(&counts(100, 0, 3)), Verdict::Error);
    }

    #[test]
    fn a_group_whose_devices_all_ended_succeeds_below_the_threshold_and_an_empty_one_at_once() {
        let c = Conditions { success_percent: 90, error: ErrorThreshold::Percent(50), ..Default::default() };
        assert_eq!(c.evaluate(&counts(10, 6, 4)), Verdict::Success);
        assert_eq!(c.evaluate(&Counts { total: 10, succeeded: 6, failed: 1, canceled: 3 }), Verdict::Success);
        assert_eq!(c.evaluate(&counts(0, 0, 0)), Verdict::Success);
        assert_eq!(
            Conditions::default(),
            Conditions {
                success_percent: 50,
                success_action: SuccessAction::NextGroup,
                error: ErrorThreshold::Percent(50)
            }
        );
    }

    #[test]
    fn progress_toward_each_threshold_is_a_percentage_of_it() {
        let c = Conditions { success_percent: 80, error: ErrorThreshold::Percent(10), ..Default::default() };
        assert_eq!(c.progress(&counts(10, 4, 1)), (50.0, 100.0));
        assert_eq!(c.progress(&counts(10, 10, 0)), (100.0, 0.0));
        let n = Conditions { error: ErrorThreshold::Count(4), ..c };
        assert_eq!(n.progress(&counts(1000, 0, 1)), (0.0, 25.0));
        let zero = Conditions { error: ErrorThreshold::Count(0), ..c };
        assert_eq!(zero.progress(&counts(1000, 0, 1)).1, 100.0);
        assert_eq!(zero.progress(&counts(1000, 0, 0)).1, 0.0);
        assert_eq!(c.progress(&counts(0, 0, 0)), (100.0, 0.0), "an empty group has succeeded and failed nothing");
    }

    #[test]
    fn thresholds_parse_as_percentages_or_counts() {
        assert_eq!(ErrorThreshold::parse("5%"), Ok(ErrorThreshold::Percent(5)));
        assert_eq!(ErrorThreshold::parse("5"), Ok(ErrorThreshold::Count(5)));
        for bad in ["101%", "-1", "five", "%", ""] {
            assert!(ErrorThreshold::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn groups_split_evenly_and_deterministically() {
        let ids: Vec<String> = (0..10).map(|i| format!("d-{i:02}")).collect();
        let g = split_evenly(ids.clone(), 3);
        assert_eq!(g.iter().map(Vec::len).collect::<Vec<_>>(), [4, 3, 3]);
        assert_eq!(g.concat(), ids, "every device once, in order");
        assert_eq!(split_evenly(ids.clone(), 3), g);
        assert_eq!(split_evenly(ids[..2].to_vec(), 4).iter().map(Vec::len).collect::<Vec<_>>(), [1, 1, 0, 0]);
    }

    #[test]
    fn defined_groups_take_a_share_of_what_matches_and_the_last_takes_the_rest() {
        let dev = |id: &str, hw: &str| Device {
            spec: DeviceSpec { id: id.into(), hardware: Some(hw.into()), ..Default::default() },
            running: Default::default(),
            last_seen: None,
            created_at: 0,
        };
        let devices: Vec<Device> =
            (0..10).map(|i| dev(&format!("d-{i}"), if i % 2 == 0 { "nrf52" } else { "esp32" })).collect();
        let groups = [
            GroupSpec { filter: Some(Filter::parse("hardware==nrf52").unwrap()), percent: Some(40) },
            GroupSpec { filter: None, percent: Some(50) },
            GroupSpec { filter: Some(Filter::parse("hardware==nrf52").unwrap()), percent: Some(10) },
        ];
        let g = split_defined(&devices, &groups);
        assert_eq!(g[0], ["d-0", "d-2"], "40% of the 5 nrf52 devices, rounded up");
        assert_eq!(g[1], ["d-1", "d-3", "d-4", "d-5"], "50% of the 8 left");
        assert_eq!(g[2], ["d-6", "d-7", "d-8", "d-9"], "the last takes the rest, whatever it says");
    }
}
