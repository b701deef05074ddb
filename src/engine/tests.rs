use super::*;
use crate::protocol::UpdateProgress;

const CFG: EngineConfig =
    EngineConfig { max_block: 1024, default_mtu: 512, max_window: 4, sync_poll: 300, wait_poll: 30 };

fn image() -> Vec<u8> {
    (0..2500u32).map(|i| (i % 251) as u8).collect()
}

fn target(image: &[u8]) -> Target<'_> {
    Target { version: "1.1.0", image, sha256: [7; 32] }
}

fn status<'a>(version: &'a str, update: Option<(&'a str, u32)>) -> Status<'a> {
    Status { update: update.map(|(version, offset)| UpdateProgress { version, offset }), ..Status::new(version) }
}

fn writes<'a>(step: &Step<'a>) -> Vec<(u32, usize)> {
    step.commands
        .iter()
        .map(|c| match c {
            Command::Write { offset, data, .. } => (*offset, data.len()),
            other => panic!("expected WRITE, got {other:?}"),
        })
        .collect()
}

#[test]
fn no_assignment_syncs_on_the_running_version() {
    let s = Status { correlation_id: Some(9), ..status("1.0.0", None) };
    let step = handle_status(&CFG, &s, None);
    assert_eq!(step.commands, vec![Command::Sync { version: "1.0.0", correlation_id: Some(9), poll: Some(300) }]);
    assert_eq!(step.transition, None);
}

#[test]
fn first_status_starts_at_zero_with_default_mtu() {
    let img = image();
    let step = handle_status(&CFG, &status("1.0.0", None), Some((OpState::Pending, target(&img))));
    assert_eq!(writes(&step), vec![(0, 512)]);
    assert_eq!(step.transition, Some(OpState::Downloading));
    match step.commands[0] {
        Command::Write { data, .. } => assert_eq!(data, &img[..512]),
        _ => unreachable!(),
    }
}

#[test]
fn resumes_at_the_reported_offset_and_caps_block_and_window() {
    let img = image();
    let s = Status { mtu: Some(4096), window: Some(50), ..status("1.0.0", Some(("1.1.0", 1000))) };
    let step = handle_status(&CFG, &s, Some((OpState::Downloading, target(&img))));
    // Block capped at max_block 1024, window at 4, and the image ends at 2500.
    assert_eq!(writes(&step), vec![(1000, 1024), (2024, 476)]);
    assert_eq!(step.transition, None);
    assert_eq!(step.progress, Some(1000));
}

#[test]
fn another_update_version_or_offset_past_the_end_restarts() {
    let img = image();
    let other =
        handle_status(&CFG, &status("1.0.0", Some(("0.9.9", 2000))), Some((OpState::Downloading, target(&img))));
    assert_eq!(writes(&other), vec![(0, 512)]);
    let past =
        handle_status(&CFG, &status("1.0.0", Some(("1.1.0", 99_999))), Some((OpState::Downloading, target(&img))));
    assert_eq!(writes(&past), vec![(0, 512)]);
}

#[test]
fn complete_image_gets_swap_then_success() {
    let img = image();
    let step = handle_status(&CFG, &status("1.0.0", Some(("1.1.0", 2500))), Some((OpState::Downloading, target(&img))));
    assert_eq!(step.commands, vec![Command::Swap { version: "1.1.0", correlation_id: None, checksum: [7; 32] }]);
    assert_eq!(step.transition, Some(OpState::Swapping));
    // A late duplicate of the last Status gets the SWAP again, with no new transition.
    let again = handle_status(&CFG, &status("1.0.0", Some(("1.1.0", 2500))), Some((OpState::Swapping, target(&img))));
    assert_eq!(again.commands[0].op(), "SWAP");
    assert_eq!(again.transition, None);
    let done = handle_status(&CFG, &status("1.1.0", None), Some((OpState::Swapping, target(&img))));
    assert_eq!(done.transition, Some(OpState::Succeeded));
    assert_eq!(done.commands[0].op(), "SYNC");
}

#[test]
fn old_version_after_swap_is_a_rollback() {
    let img = image();
    let step = handle_status(&CFG, &status("1.0.0", None), Some((OpState::Swapping, target(&img))));
    assert_eq!(step.transition, Some(OpState::Failed));
    assert_eq!(step.commands, vec![Command::Sync { version: "1.0.0", correlation_id: None, poll: Some(300) }]);
}

#[test]
fn terminal_operations_are_not_retried() {
    let img = image();
    for state in [OpState::Failed, OpState::TimedOut, OpState::Succeeded, OpState::Canceled] {
        let step = handle_status(&CFG, &status("1.0.0", None), Some((state, target(&img))));
        assert_eq!(step.commands[0].op(), "SYNC", "{state:?}");
        assert_eq!(step.transition, None, "{state:?}");
    }
}

#[test]
fn already_running_the_target_succeeds_at_once() {
    let img = image();
    let step = handle_status(&CFG, &status("1.1.0", None), Some((OpState::Pending, target(&img))));
    assert_eq!(step.transition, Some(OpState::Succeeded));
}

#[test]
fn timeouts_apply_to_started_operations_only() {
    assert!(timed_out(OpState::Downloading, 100, 200, 100));
    assert!(!timed_out(OpState::Downloading, 100, 199, 100));
    assert!(timed_out(OpState::Swapping, 0, 1000, 100));
    assert!(!timed_out(OpState::Pending, 0, 1000, 100));
    assert!(!timed_out(OpState::Succeeded, 0, 1000, 100));
}

#[test]
fn a_whole_transfer_driven_through_the_step_reassembles_the_image() {
    let img = image();
    let mut got = Vec::new();
    let mut state = OpState::Pending;
    let mut offset = None;
    for _ in 0..100 {
        let s = Status { mtu: Some(300), window: Some(3), ..status("1.0.0", offset.map(|o| ("1.1.0", o))) };
        let step = handle_status(&CFG, &s, Some((state, target(&img))));
        if let Some(t) = step.transition {
            state = t;
        }
        match step.commands[0] {
            Command::Swap { .. } => break,
            _ => {
                for c in &step.commands {
                    if let Command::Write { offset: o, data, .. } = c {
                        assert_eq!(*o as usize, got.len());
                        got.extend_from_slice(data);
                    }
                }
                offset = Some(got.len() as u32);
            }
        }
    }
    assert_eq!(got, img);
    assert_eq!(state, OpState::Swapping);
}

#[test]
fn states_are_staged_in_the_order_operations_move() {
    let order = [OpState::Pending, OpState::Downloading, OpState::Swapping, OpState::Succeeded];
    assert!(order.windows(2).all(|w| w[0].stage() < w[1].stage()));
    assert!(OpState::ALL.iter().filter(|s| s.is_terminal()).all(|s| s.stage() == 3));
}
