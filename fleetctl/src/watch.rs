//! `rollout watch`: a live view of a rollout, one line per change, with a
//! progress bar per stage, until it ends.

use std::{process::ExitCode, time::Duration};

use serde_json::Value;

use crate::{client::Client, output::cell};

const BAR: usize = 20;

/// How often the rollout is read again.
const POLL: Duration = Duration::from_millis(300);

fn bar(done: u64, total: u64) -> String {
    let filled = if total == 0 {
        BAR
    } else {
        (done as usize * BAR) / total as usize
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(BAR - filled.min(BAR)))
}

/// One stage as a line: `stage 2/3  50%  [########------------]  8/20 applied, 1 failed`.
fn stage_line(stage: &Value, stages: usize, current: u64) -> String {
    let agents = stage["agents"].as_u64().unwrap_or(0);
    let phases = &stage["phases"];
    let count = |name: &str| phases[name].as_u64().unwrap_or(0);
    let applied = count("APPLIED");
    let failed = count("FAILED");
    let reverted = count("REVERTED");
    let marker = if stage["stage"].as_u64() == Some(current) {
        ">"
    } else {
        " "
    };
    let mut line = format!(
        "{marker} stage {}/{stages} {:>3}% {} {applied}/{agents} applied",
        cell(&stage["stage"]),
        cell(&stage["percent"]),
        bar(applied, agents),
    );
    if failed > 0 {
        line.push_str(&format!(", {failed} failed"));
    }
    if reverted > 0 {
        line.push_str(&format!(", {reverted} reverted"));
    }
    line
}

/// Follows rollout `id` until it ends; exit success only if it completed.
pub async fn follow(client: &Client, id: &str) -> anyhow::Result<ExitCode> {
    let mut last_view = String::new();
    let mut events_shown = 0;
    loop {
        let r = client.get(&format!("/api/v1/rollouts/{id}")).await?;
        let events = r["events"].as_array().cloned().unwrap_or_default();
        for event in events.iter().skip(events_shown) {
            println!("  {}", cell(&event["message"]));
        }
        events_shown = events.len();
        let state = cell(&r["state"]);
        let stages = r["stages"].as_array().cloned().unwrap_or_default();
        let current = r["stage"].as_u64().unwrap_or(0);
        let mut view = format!("rollout {id}: {state}\n");
        for stage in &stages {
            view.push_str(&stage_line(stage, stages.len(), current));
            view.push('\n');
            for failure in stage["failures"].as_array().into_iter().flatten() {
                view.push_str(&format!(
                    "      failed {}: {}\n",
                    cell(&failure["instance_uid"]),
                    cell(&failure["reason"])
                ));
            }
        }
        if view != last_view {
            print!("{view}");
            last_view = view;
        }
        match state.as_str() {
            "COMPLETED" => return Ok(ExitCode::SUCCESS),
            "ROLLED_BACK" | "ABORTED" | "FAILED" => {
                let reason = cell(&r["reason"]);
                eprintln!("error: rollout {id} ended {state}: {reason}");
                return Ok(ExitCode::FAILURE);
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_stage_line_shows_progress_and_failures() {
        let stage = json!({ "stage": 2, "percent": 50, "agents": 20, "phases": { "APPLIED": 10, "FAILED": 1 } });
        assert_eq!(
            stage_line(&stage, 3, 2),
            "> stage 2/3  50% [##########----------] 10/20 applied, 1 failed"
        );
    }
}
