//! Retry: an operator restarts a failed instance where it failed.
//!
//! A failure marks the failing step `failed` and every other open step
//! `cancelled` (see `Run::fail`). Since a cancel ends the instance for good,
//! every `cancelled` step of a *failed* instance was cancelled by that
//! failure: retrying restarts all of them, not only the failed step, so a
//! fan-out branch that was still running when its sibling failed runs again
//! instead of leaving its join waiting on a path that will never complete.
//!
//! Each restarted step gets a new activation (its old activation's late
//! results and jobs are stale and ignored), the instance goes back to
//! `running`, and its failure record moves into the history as a
//! `retried` entry. An instance that failed before its first step ran (its
//! start never applied) starts again.

use super::Run;
use crate::engine::{Disposition, EngineError};
use crate::ids::StepId;
use crate::instance::{HistoryKind, InstanceStatus, StepStatus};

impl Run<'_> {
    pub(super) fn retry(&mut self) -> Result<Disposition, EngineError> {
        if self.inst.status != InstanceStatus::Failed {
            return Err(EngineError::NotFailed(self.inst.status));
        }
        let failure = self.inst.failure.take();
        let (step, activation) = failure
            .as_ref()
            .map_or((None, 0), |f| (f.step.clone(), f.activation));
        if self.inst.steps.is_empty() {
            // Failed before the start was applied: start it now.
            let start = self.wf.start().clone();
            self.history(
                step.as_ref(),
                activation,
                HistoryKind::Retried {
                    failure: failure.map(Box::new),
                    steps: vec![start.step.clone()],
                },
            );
            self.inst.status = InstanceStatus::Pending;
            return Ok(self.start());
        }
        let restart: Vec<StepId> = self
            .inst
            .steps
            .iter()
            .filter(|(_, s)| matches!(s.status, StepStatus::Failed | StepStatus::Cancelled))
            .map(|(id, _)| id.clone())
            .collect();
        if restart.is_empty() {
            // Put the record back: an `Err` leaves the instance untouched.
            self.inst.failure = failure;
            return Err(EngineError::CorruptState(
                "the instance is failed but no step failed or was cancelled: nothing to restart"
                    .to_owned(),
            ));
        }
        self.history(
            step.as_ref(),
            activation,
            HistoryKind::Retried {
                failure: failure.map(Box::new),
                steps: restart.clone(),
            },
        );
        self.inst.status = InstanceStatus::Running;
        for step in &restart {
            self.activate(step);
        }
        Ok(Disposition::Applied)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::engine::tests::{Driver, sid, t0};
    use crate::engine::{Disposition, Effect, EngineError, Input};
    use crate::instance::{AttemptRecord, HistoryKind, InstanceStatus, StepStatus};
    use crate::step::{Completion, StepError, StepOutcome};
    use crate::steps::{Done, FnStep, WaitForEvent};
    use crate::workflow::{Workflow, target};
    use crate::{Scope, StepId};

    fn step(id: &str) -> FnStep {
        FnStep::new(id, ["done"], |_| {
            StepOutcome::complete_with("done", json!({"ok": true}))
        })
    }

    /// `Start ⇉ {A, B} → J → Done`.
    fn diamond() -> Workflow {
        let (start, a, b, j) = (step("Start"), step("A"), step("B"), step("J"));
        Workflow::builder("test")
            .unique("order", Scope::Workflow)
            .start(start.clone())
            .fan_out(start, "done", [target(a.clone()), target(b.clone())])
            .on(a, "done", j.clone())
            .on(b, "done", j.clone())
            .on(j, "done", Done)
            .build()
            .unwrap()
    }

    fn failed(error: &str) -> Input {
        Input::Failed {
            step: Some(sid("A")),
            activation: 1,
            error: StepError::fatal(error),
            attempts: vec![AttemptRecord {
                attempt: 1,
                at: t0(),
                error: StepError::fatal(error),
            }],
        }
    }

    /// A diamond whose `A` failed while `B` still ran.
    fn failed_diamond() -> Driver {
        let mut d = Driver::new(diamond(), json!({}));
        d.feed(Input::Completed {
            step: sid("Start"),
            activation: 1,
            completion: Completion::new("done"),
        })
        .unwrap();
        d.queue.clear();
        d.feed(failed("card declined")).unwrap();
        assert_eq!(d.inst.status, InstanceStatus::Failed);
        d
    }

    fn executions(effects: &[Effect]) -> Vec<(StepId, u32)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Execute { step, activation } => Some((step.clone(), *activation)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn retry_restarts_the_failed_step_and_what_the_failure_cancelled() {
        let mut d = failed_diamond();
        let before = d.inst.failure.clone().unwrap();
        let revision = d.inst.revision;
        let applied = d.feed(Input::Retry).unwrap();
        assert_eq!(applied.disposition, Disposition::Applied);
        assert_eq!(
            executions(&applied.effects),
            vec![(sid("A"), 2), (sid("B"), 2)],
            "a new activation of the failed step and of the cancelled sibling"
        );
        assert_eq!(d.inst.status, InstanceStatus::Running);
        assert_eq!(d.inst.failure, None, "the instance is no longer failed");
        assert_eq!(d.inst.revision, revision + 1);
        for s in ["A", "B"] {
            let state = d.inst.step(s).unwrap();
            assert_eq!((state.status, state.activation), (StepStatus::Active, 2));
        }
        let last = d.inst.history.last().unwrap();
        assert_eq!(
            (last.step.clone(), last.activation),
            (Some(sid("A")), 1),
            "the entry names the step that had failed"
        );
        assert_eq!(
            last.kind,
            HistoryKind::Retried {
                failure: Some(Box::new(before)),
                steps: vec![sid("A"), sid("B")],
            },
            "the failure record is kept in the history"
        );
        // The old activations' late results are stale; the new ones run to the end.
        let late = d
            .feed(Input::Completed {
                step: sid("B"),
                activation: 1,
                completion: Completion::new("done"),
            })
            .unwrap();
        assert!(matches!(late.disposition, Disposition::Ignored(_)));
        d.run();
        assert_eq!(d.inst.status, InstanceStatus::Completed);
        assert_eq!(d.runs_of("J"), 1, "the join runs once, after both branches");
    }

    #[test]
    fn a_retried_instance_can_fail_and_be_retried_again() {
        let mut d = failed_diamond();
        d.feed(Input::Retry).unwrap();
        d.queue.clear();
        d.feed(Input::Failed {
            step: Some(sid("A")),
            activation: 2,
            error: StepError::fatal("declined again"),
            attempts: vec![],
        })
        .unwrap();
        assert_eq!(d.inst.status, InstanceStatus::Failed);
        let applied = d.feed(Input::Retry).unwrap();
        assert_eq!(
            executions(&applied.effects),
            vec![(sid("A"), 3), (sid("B"), 3)]
        );
        let retried: Vec<&HistoryKind> = d
            .inst
            .history
            .iter()
            .map(|h| &h.kind)
            .filter(|k| matches!(k, HistoryKind::Retried { .. }))
            .collect();
        assert_eq!(retried.len(), 2, "each retry keeps its failure");
    }

    #[test]
    fn only_a_failed_instance_can_be_retried() {
        let wait = Workflow::builder("test")
            .unique("order", Scope::Workflow)
            .start(WaitForEvent)
            .on(WaitForEvent, "received", Done)
            .build()
            .unwrap();
        let mut d = Driver::new(wait, json!({}));
        let before = d.inst.clone();
        assert_eq!(
            d.feed(Input::Retry).unwrap_err(),
            EngineError::NotFailed(InstanceStatus::Running)
        );
        assert_eq!(d.inst, before, "an error leaves the instance untouched");
        d.feed(Input::Cancel { reason: None }).unwrap();
        assert_eq!(
            d.feed(Input::Retry).unwrap_err(),
            EngineError::NotFailed(InstanceStatus::Cancelled)
        );
        let mut done = Driver::new(diamond(), json!({}));
        done.run();
        assert_eq!(done.inst.status, InstanceStatus::Completed);
        assert_eq!(
            done.feed(Input::Retry).unwrap_err(),
            EngineError::NotFailed(InstanceStatus::Completed)
        );
        assert_eq!(
            EngineError::NotFailed(InstanceStatus::Waiting).to_string(),
            "instance is waiting, not failed: only a failed instance can be retried"
        );
    }

    #[test]
    fn an_instance_level_failure_restarts_the_steps_it_cancelled() {
        let mut d = failed_diamond();
        // Retry, then fail the instance itself (no step), as a discarded
        // advance or timer job does.
        d.feed(Input::Retry).unwrap();
        d.feed(Input::Failed {
            step: None,
            activation: 0,
            error: StepError::fatal("advance gave up"),
            attempts: vec![],
        })
        .unwrap();
        assert_eq!(d.status("A"), Some(StepStatus::Cancelled));
        let applied = d.feed(Input::Retry).unwrap();
        assert_eq!(
            executions(&applied.effects),
            vec![(sid("A"), 3), (sid("B"), 3)]
        );
        let last = d.inst.history.last().unwrap();
        assert_eq!((last.step.clone(), last.activation), (None, 0));
    }

    #[test]
    fn an_instance_that_failed_before_starting_starts_again() {
        let mut d = Driver::new(diamond(), json!({}));
        // Undo the start: a pending instance whose first advance gave up.
        d.inst.steps.clear();
        d.inst.history.clear();
        d.inst.status = InstanceStatus::Pending;
        d.queue.clear();
        d.feed(Input::Failed {
            step: None,
            activation: 0,
            error: StepError::fatal("database down"),
            attempts: vec![],
        })
        .unwrap();
        assert_eq!(d.inst.status, InstanceStatus::Failed);
        let applied = d.feed(Input::Retry).unwrap();
        assert_eq!(executions(&applied.effects), vec![(sid("Start"), 1)]);
        assert_eq!(d.inst.status, InstanceStatus::Running);
        let kinds: Vec<&HistoryKind> = d.inst.history.iter().map(|h| &h.kind).collect();
        assert!(matches!(
            kinds[kinds.len() - 2],
            HistoryKind::Retried { .. }
        ));
        assert_eq!(kinds[kinds.len() - 1], &HistoryKind::Started);
        d.run();
        assert_eq!(d.inst.status, InstanceStatus::Completed);
    }

    #[test]
    fn retried_history_entries_round_trip_through_json() {
        let mut d = failed_diamond();
        d.feed(Input::Retry).unwrap();
        let entry = d.inst.history.last().unwrap().clone();
        let json = serde_json::to_value(&entry).unwrap();
        assert_eq!(json["kind"], "retried");
        assert_eq!(json["steps"], json!(["A", "B"]));
        assert_eq!(json["failure"]["error"]["message"], "card declined");
        assert_eq!(
            serde_json::from_value::<crate::instance::HistoryEntry>(json).unwrap(),
            entry
        );
    }
}
