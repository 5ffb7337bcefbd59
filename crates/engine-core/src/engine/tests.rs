//! Engine semantics: the spec's reference traces, dead-path joins, per-step
//! waiting, resumes, timers, failures, cancel, idempotency.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use serde_json::{Value, json};
use uuid::Uuid;

use super::*;
use crate::business_id::Scope;
use crate::instance::{HistoryKind, StepStatus};
use crate::step::StepOutcome;
use crate::steps::{DONE_ID, Done, FnStep, Wait, WaitForEvent};
use crate::test_support::block_on;
use crate::workflow::{Pick, Workflow, target};

pub(crate) fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
}

pub(crate) fn sid(s: &str) -> StepId {
    StepId::new(s).unwrap()
}

pub(crate) fn ev(s: &str) -> Event {
    Event::new(s).unwrap()
}

/// Drives an instance the way a runner would: executes effects, feeds the
/// outcomes back, records every execution.
pub(crate) struct Driver {
    pub wf: Workflow,
    pub inst: Instance,
    pub now: DateTime<Utc>,
    pub queue: Vec<(StepId, u32)>,
    pub executed: Vec<(StepId, u32)>,
    pub batches: Vec<Vec<StepId>>,
    pub timers: Vec<(StepId, u32, DateTime<Utc>, Event)>,
    pub effects: Vec<Effect>,
}

impl Driver {
    pub fn new(wf: Workflow, input: Value) -> Self {
        let engine = Engine::new(&wf);
        let inst = engine
            .new_instance(NewInstance {
                id: Uuid::from_u128(1),
                business_id: crate::business_id::BusinessId::parse("order::1").unwrap(),
                input,
                telemetry_metadata: serde_json::Map::new(),
                now: t0(),
            })
            .unwrap();
        let mut d = Self {
            wf,
            inst,
            now: t0(),
            queue: Vec::new(),
            executed: Vec::new(),
            batches: Vec::new(),
            timers: Vec::new(),
            effects: Vec::new(),
        };
        d.feed(Input::Start).unwrap();
        d
    }

    pub fn feed(&mut self, input: Input) -> Result<Applied, EngineError> {
        let applied = Engine::new(&self.wf).apply(&mut self.inst, input, self.now)?;
        for e in &applied.effects {
            match e {
                Effect::Execute { step, activation } => {
                    self.queue.push((step.clone(), *activation));
                }
                Effect::ScheduleTimer {
                    step,
                    activation,
                    fire_at,
                    event,
                } => self
                    .timers
                    .push((step.clone(), *activation, *fire_at, event.clone())),
                Effect::CancelTimer { step, activation } => {
                    self.timers
                        .retain(|(s, a, _, _)| !(s == step && a == activation));
                }
                Effect::CancelJobs => {
                    self.queue.clear();
                    self.timers.clear();
                }
                Effect::Emit(_) => {}
            }
        }
        self.effects.extend(applied.effects.iter().cloned());
        Ok(applied)
    }

    fn execute(&self, step: &StepId, activation: u32) -> StepOutcome {
        let def = self.wf.step(step.as_str()).unwrap();
        let input = crate::step::StepInput {
            context: &self.inst.context,
            config: self.inst.step_configs.get(step),
            instance_id: self.inst.id,
            business_id: self.inst.business_id.as_str(),
            activation,
            attempt: 1,
            idempotency_key: crate::ids::IdempotencyKey {
                instance_id: self.inst.id,
                step: step.clone(),
                activation,
            },
            cancellation: crate::step::CancellationSignal::new(),
        };
        block_on(def.step.execute(input))
    }

    /// Runs every queued step, batch by batch (all of a batch see the same
    /// snapshot, like parallel workers), until nothing is queued.
    pub fn run(&mut self) {
        while !self.queue.is_empty() {
            let batch = std::mem::take(&mut self.queue);
            self.batches
                .push(batch.iter().map(|(s, _)| s.clone()).collect());
            let outcomes: Vec<_> = batch
                .iter()
                .map(|(s, a)| (s.clone(), *a, self.execute(s, *a)))
                .collect();
            for (s, a, outcome) in outcomes {
                self.executed.push((s.clone(), a));
                if let Some(input) = Input::from_outcome(s, a, outcome) {
                    self.feed(input).unwrap();
                }
            }
        }
    }

    pub fn status(&self, step: &str) -> Option<StepStatus> {
        self.inst.step(step).map(|s| s.status)
    }

    pub fn runs_of(&self, step: &str) -> usize {
        self.executed
            .iter()
            .filter(|(s, _)| s.as_str() == step)
            .count()
    }
}

fn step(id: &str, event: &'static str, output: Value) -> FnStep {
    FnStep::new(id, [event], move |_| {
        StepOutcome::complete_with(event, output.clone())
    })
}

fn wf() -> crate::workflow::WorkflowBuilder {
    Workflow::builder("test").unique("order", Scope::Workflow)
}

#[test]
fn reference_trace_linear() {
    let a = step("StepA", "done", json!({}));
    let b = step("StepB", "done", json!({"processed": true}));
    let workflow = wf()
        .start(a.clone())
        .on(a, "done", b.clone())
        .on(b, "done", Done)
        .build()
        .unwrap();
    let mut d = Driver::new(workflow, json!({}));
    d.run();
    let names: Vec<Vec<&str>> = d
        .batches
        .iter()
        .map(|b| b.iter().map(StepId::as_str).collect())
        .collect();
    assert_eq!(names, vec![vec!["StepA"], vec!["StepB"], vec![DONE_ID]]);
    assert_eq!(d.inst.status, InstanceStatus::Completed);
    assert_eq!(d.inst.open_steps().count(), 0);
    assert_eq!(
        serde_json::to_value(&d.inst.context.steps).unwrap(),
        json!({"step_a": {}, "step_b": {"processed": true}, "done": {}})
    );
    // Deviation from the original: the history is the audit trail.
    let kinds: Vec<&HistoryKind> = d.inst.history.iter().map(|h| &h.kind).collect();
    assert_eq!(kinds.first(), Some(&&HistoryKind::Started));
    assert_eq!(kinds.last(), Some(&&HistoryKind::Finished));
    assert_eq!(
        kinds
            .iter()
            .filter(|k| matches!(k, HistoryKind::Completed { .. }))
            .count(),
        3
    );
}

fn async_step(id: &str, events: &[&str]) -> FnStep {
    FnStep::new(id, events.iter().copied(), |_| StepOutcome::wait())
}

#[test]
fn reference_trace_event_workflow_waits_then_resumes() {
    let a = step("StepA", "done", json!({}));
    let wait = async_step("WaitForEvent", &["payment_confirmed"]);
    let b = step("StepB", "done", json!({"processed": true}));
    let workflow = wf()
        .start(a.clone())
        .on(a, "done", wait.clone())
        .on(wait, "payment_confirmed", b.clone())
        .on(b, "done", Done)
        .build()
        .unwrap();
    let mut d = Driver::new(workflow, json!({}));
    d.run();
    assert_eq!(d.inst.status, InstanceStatus::Waiting);
    assert_eq!(d.status("WaitForEvent"), Some(StepStatus::Waiting));
    assert_eq!(d.status("StepA"), Some(StepStatus::Completed));
    assert_eq!(d.inst.open_steps().count(), 1);
    d.feed(Input::Resume {
        step: sid("WaitForEvent"),
        activation: None,
        event: ev("payment_confirmed"),
        payload: json!({}),
    })
    .unwrap();
    d.run();
    assert_eq!(d.inst.status, InstanceStatus::Completed);
    assert_eq!(
        serde_json::to_value(&d.inst.context.steps).unwrap(),
        json!({"step_a": {}, "wait_for_event": {}, "step_b": {"processed": true}, "done": {}})
    );
}

#[test]
fn reference_trace_async_then_resumed() {
    let s = async_step("AsyncStep", &["timeout", "resumed"]);
    let workflow = wf()
        .start(s.clone())
        .on(s.clone(), "timeout", Done)
        .on(s, "resumed", Done)
        .build()
        .unwrap();
    let mut d = Driver::new(workflow, json!({}));
    d.run();
    assert_eq!(d.inst.status, InstanceStatus::Waiting);
    d.feed(Input::Resume {
        step: sid("AsyncStep"),
        activation: Some(1),
        event: ev("resumed"),
        payload: json!({"ok": 1}),
    })
    .unwrap();
    d.run();
    assert_eq!(d.inst.status, InstanceStatus::Completed);
    assert_eq!(d.status("AsyncStep"), Some(StepStatus::Completed));
    assert_eq!(d.inst.context.steps["async_step"], json!({"ok": 1}));
    assert_eq!(
        d.runs_of(DONE_ID),
        1,
        "Done runs once although both events lead to it"
    );
}

fn branching(choice: &'static str) -> Workflow {
    let a = FnStep::new("A", ["ok", "ko"], move |_| StepOutcome::complete(choice));
    let b = step("B", "done", json!({"b": 1}));
    let c = step("C", "done", json!({"c": 1}));
    let d = step("D", "done", json!({}));
    wf().start(a.clone())
        .on(a.clone(), "ok", b.clone())
        .on(a, "ko", c.clone())
        .on(b, "done", d.clone())
        .on(c, "done", d.clone())
        .on(d, "done", Done)
        .build()
        .unwrap()
}

#[test]
fn exclusive_branch_join_runs_exactly_once_g1() {
    for (choice, taken, dead) in [("ok", "B", "C"), ("ko", "C", "B")] {
        let mut d = Driver::new(branching(choice), json!({}));
        d.run();
        assert_eq!(d.inst.status, InstanceStatus::Completed, "{choice}");
        assert_eq!(
            d.runs_of("D"),
            1,
            "{choice}: the join after exclusive branches runs once"
        );
        assert_eq!(d.runs_of(DONE_ID), 1);
        assert_eq!(d.runs_of(taken), 1);
        assert_eq!(d.runs_of(dead), 0);
        assert_eq!(d.status(dead), Some(StepStatus::Dead));
        assert!(d.effects.iter().any(|e| matches!(e, Effect::Emit(EngineEvent::StepsDead { steps }) if steps == &vec![sid(dead)])));
    }
}

#[test]
fn dead_paths_propagate_through_chains() {
    // A -ok-> B -> C -> D(join) ; A -ko-> D directly.
    let a = FnStep::new("A", ["ok", "ko"], |_| StepOutcome::complete("ko"));
    let b = step("B", "done", json!({}));
    let c = step("C", "done", json!({}));
    let d = step("D", "done", json!({}));
    let workflow = wf()
        .start(a.clone())
        .on(a.clone(), "ok", b.clone())
        .on(a, "ko", d.clone())
        .on(b, "done", c.clone())
        .on(c, "done", d.clone())
        .on(d, "done", Done)
        .build()
        .unwrap();
    let mut drv = Driver::new(workflow, json!({}));
    drv.run();
    assert_eq!(drv.inst.status, InstanceStatus::Completed);
    assert_eq!(drv.status("B"), Some(StepStatus::Dead));
    assert_eq!(drv.status("C"), Some(StepStatus::Dead));
    assert_eq!(drv.runs_of("D"), 1);
}

#[test]
fn fan_out_fan_in_waits_for_every_branch() {
    let start = step("Start", "done", json!({}));
    let a = step("BranchA", "done", json!({"processed": "a"}));
    let b = step("BranchB", "done", json!({"processed": "b"}));
    let c = step("BranchC", "done", json!({"processed": "c"}));
    let join = step("Join", "done", json!({}));
    let workflow = wf()
        .start(start.clone())
        .fan_out(
            start,
            "done",
            [target(a.clone()), target(b.clone()), target(c.clone())],
        )
        .on(a, "done", join.clone())
        .on(b, "done", join.clone())
        .on(c, "done", join.clone())
        .on(join, "done", Done)
        .build()
        .unwrap();
    let mut d = Driver::new(workflow, json!({}));
    // Run the start, then complete the branches one at a time.
    let first = std::mem::take(&mut d.queue);
    assert_eq!(first, vec![(sid("Start"), 1)]);
    let out = d.execute(&sid("Start"), 1);
    d.feed(Input::from_outcome(sid("Start"), 1, out).unwrap())
        .unwrap();
    let branches = std::mem::take(&mut d.queue);
    assert_eq!(branches.len(), 3);
    for (i, (s, a)) in branches.iter().enumerate() {
        let out = d.execute(s, *a);
        let applied = d
            .feed(Input::from_outcome(s.clone(), *a, out).unwrap())
            .unwrap();
        let joined = applied.executions().any(|(s, _)| s.as_str() == "Join");
        assert_eq!(
            joined,
            i == 2,
            "the join activates only after the last branch"
        );
        let transition = applied.effects.iter().find_map(|e| match e {
            Effect::Emit(EngineEvent::Transition { targets, .. }) => Some(targets.len()),
            _ => None,
        });
        assert_eq!(transition, Some(usize::from(i == 2)));
    }
    d.run();
    assert_eq!(d.inst.status, InstanceStatus::Completed);
    assert_eq!(
        serde_json::to_value(&d.inst.context.steps).unwrap(),
        json!({"start": {}, "branch_a": {"processed": "a"}, "branch_b": {"processed": "b"}, "branch_c": {"processed": "c"}, "join": {}, "done": {}})
    );
    assert_eq!(d.runs_of("Join"), 1);
}

fn dynamic(picks: Vec<Pick>) -> Workflow {
    let a = step("A", "done", json!({"amount": 10}));
    let b = step("B", "done", json!({}));
    let c = step("C", "done", json!({}));
    let j = step("J", "done", json!({}));
    wf().start(a.clone())
        .route(
            a,
            "done",
            [target(b.clone()), target(c.clone())],
            move |_| picks.clone(),
        )
        .on(b, "done", j.clone())
        .on(c, "done", j.clone())
        .on(j, "done", Done)
        .build()
        .unwrap()
}

#[test]
fn dynamic_routing_picks_declared_targets_and_joins_once() {
    let mut d = Driver::new(dynamic(vec![Pick::step("C")]), json!({}));
    d.run();
    assert_eq!(d.inst.status, InstanceStatus::Completed);
    assert_eq!(d.runs_of("C"), 1);
    assert_eq!(d.status("B"), Some(StepStatus::Dead));
    assert_eq!(d.runs_of("J"), 1);

    let mut both = Driver::new(
        dynamic(vec![Pick::step("B"), Pick::step("C"), Pick::step("B")]),
        json!({}),
    );
    both.run();
    assert_eq!(both.inst.status, InstanceStatus::Completed);
    assert_eq!(
        (both.runs_of("B"), both.runs_of("C"), both.runs_of("J")),
        (1, 1, 1)
    );
}

#[test]
fn dynamic_routes_see_the_completing_steps_output() {
    let a = step("A", "done", json!({"amount": 150}));
    let big = step("Big", "done", json!({}));
    let small = step("Small", "done", json!({}));
    let workflow = wf()
        .start(a.clone())
        .route(
            a,
            "done",
            [target(big.clone()), target(small.clone())],
            |ctx| {
                let amount = ctx
                    .step("a")
                    .and_then(|o| o["amount"].as_u64())
                    .unwrap_or(0);
                vec![Pick::step(if amount > 100 { "Big" } else { "Small" })]
            },
        )
        .on(big, "done", Done)
        .on(small, "done", Done)
        .build()
        .unwrap();
    let mut d = Driver::new(workflow, json!({}));
    d.run();
    assert_eq!((d.runs_of("Big"), d.runs_of("Small")), (1, 0));
}

#[test]
fn dynamic_route_errors_fail_the_instance_g26() {
    let mut none = Driver::new(dynamic(vec![]), json!({}));
    none.run();
    assert_eq!(none.inst.status, InstanceStatus::Failed);
    let failure = none.inst.failure.as_ref().unwrap();
    assert!(failure.error.message.contains("NoTarget"), "{failure:?}");
    assert_eq!(failure.step, Some(sid("A")));

    let mut rogue = Driver::new(dynamic(vec![Pick::step("J")]), json!({}));
    rogue.run();
    assert_eq!(rogue.inst.status, InstanceStatus::Failed);
    assert!(
        rogue
            .inst
            .failure
            .as_ref()
            .unwrap()
            .error
            .message
            .contains("not among its declared targets")
    );
    assert_eq!(rogue.runs_of("J"), 0);
}

#[test]
fn undeclared_event_fails_the_step_fatally_g26() {
    let a = FnStep::new("A", ["done"], |_| StepOutcome::complete("surprise"));
    let workflow = wf().start(a.clone()).on(a, "done", Done).build().unwrap();
    let mut d = Driver::new(workflow, json!({}));
    d.run();
    assert_eq!(d.inst.status, InstanceStatus::Failed);
    assert_eq!(d.status("A"), Some(StepStatus::Failed));
    let f = d.inst.failure.as_ref().unwrap();
    assert!(
        f.error.message.contains("undeclared event \"surprise\""),
        "{f:?}"
    );
    assert!(!f.error.is_retryable());
}

#[test]
fn output_with_nul_fails_the_step() {
    let a = step("A", "done", json!({"bad": "x\u{0}"}));
    let workflow = wf().start(a.clone()).on(a, "done", Done).build().unwrap();
    let mut d = Driver::new(workflow, json!({}));
    d.run();
    assert_eq!(d.inst.status, InstanceStatus::Failed);
    assert!(
        d.inst
            .failure
            .as_ref()
            .unwrap()
            .error
            .message
            .contains("U+0000")
    );
}

/// Start fans out to Approval (async) and Work, which join; driven until
/// Approval waits while Work is still to run.
fn approval_waiting_beside_work() -> Driver {
    let start = step("Start", "done", json!({}));
    let wait = async_step("Approval", &["approved"]);
    let work = step("Work", "done", json!({"w": 1}));
    let join = step("Join", "done", json!({}));
    let workflow = wf()
        .start(start.clone())
        .fan_out(start, "done", [target(wait.clone()), target(work.clone())])
        .on(wait, "approved", join.clone())
        .on(work, "done", join.clone())
        .on(join, "done", Done)
        .build()
        .unwrap();
    let mut d = Driver::new(workflow, json!({}));
    let out = d.execute(&sid("Start"), 1);
    d.queue.clear();
    d.feed(Input::from_outcome(sid("Start"), 1, out).unwrap())
        .unwrap();
    d.feed(Input::Async {
        step: sid("Approval"),
        activation: 1,
        wait: crate::step::AsyncWait::default(),
    })
    .unwrap();
    d
}

#[test]
fn waiting_is_per_step_other_branches_keep_running_g6_g10() {
    // Start, then apply the async marker before Work's result.
    let mut d = approval_waiting_beside_work();
    d.queue.clear();
    assert_eq!(
        d.inst.status,
        InstanceStatus::Running,
        "Work is still runnable"
    );
    let out = d.execute(&sid("Work"), 1);
    d.feed(Input::from_outcome(sid("Work"), 1, out).unwrap())
        .unwrap();
    assert_eq!(
        d.inst.status,
        InstanceStatus::Waiting,
        "only the waiting step is left"
    );
    assert!(d.queue.is_empty(), "the join waits for the approval");
    d.feed(Input::Resume {
        step: sid("Approval"),
        activation: None,
        event: ev("approved"),
        payload: json!({"by": "ann"}),
    })
    .unwrap();
    d.run();
    assert_eq!(d.inst.status, InstanceStatus::Completed);
    assert_eq!(
        d.runs_of("Approval"),
        0,
        "the async step is never re-executed"
    );
    assert_eq!(d.inst.context.steps["approval"], json!({"by": "ann"}));
}

fn waiting_instance() -> Driver {
    let s = async_step("Hold", &["go", "stop"]);
    let workflow = wf()
        .start(s.clone())
        .on(s.clone(), "go", Done)
        .on(s, "stop", Done)
        .build()
        .unwrap();
    let mut d = Driver::new(workflow, json!({}));
    d.run();
    d
}

#[test]
fn resume_validates_the_event_and_the_state_g7() {
    let mut d = waiting_instance();
    let before = d.inst.clone();
    let err = d
        .feed(Input::Resume {
            step: sid("Hold"),
            activation: None,
            event: ev("nope"),
            payload: json!({}),
        })
        .unwrap_err();
    assert!(matches!(err, EngineError::UndeclaredEvent { .. }), "{err}");
    assert!(err.to_string().contains("declared: go, stop"), "{err}");
    assert_eq!(
        d.inst, before,
        "a rejected input leaves the instance untouched"
    );

    let err = d
        .feed(Input::Resume {
            step: sid("Ghost"),
            activation: None,
            event: ev("go"),
            payload: json!({}),
        })
        .unwrap_err();
    assert_eq!(err, EngineError::UnknownStep(sid("Ghost")));

    let err = d
        .feed(Input::Resume {
            step: sid("Hold"),
            activation: Some(9),
            event: ev("go"),
            payload: json!({}),
        })
        .unwrap_err();
    assert!(
        matches!(err, EngineError::StaleResume { current: 1, .. }),
        "{err}"
    );

    d.feed(Input::Resume {
        step: sid("Hold"),
        activation: None,
        event: ev("go"),
        payload: json!({}),
    })
    .unwrap();
    let err = d
        .feed(Input::Resume {
            step: sid("Hold"),
            activation: None,
            event: ev("stop"),
            payload: json!({}),
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::NotWaiting {
                state: Some(StepStatus::Completed),
                ..
            }
        ),
        "{err}"
    );
    d.run();
    let err = d
        .feed(Input::Resume {
            step: sid("Hold"),
            activation: None,
            event: ev("go"),
            payload: json!({}),
        })
        .unwrap_err();
    assert_eq!(
        err,
        EngineError::InstanceFinished(InstanceStatus::Completed)
    );
    assert!(
        Engine::new(&d.wf)
            .check_resume(&d.inst, &sid("Hold"), &ev("go"))
            .is_err()
    );
}

#[test]
fn resume_before_the_async_marker_is_kept_then_applied() {
    let s = async_step("Hold", &["go"]);
    let workflow = wf().start(s.clone()).on(s, "go", Done).build().unwrap();
    let mut d = Driver::new(workflow, json!({}));
    d.queue.clear();
    // The step is executing; a resume arrives first.
    let applied = d
        .feed(Input::Resume {
            step: sid("Hold"),
            activation: None,
            event: ev("go"),
            payload: json!({"early": true}),
        })
        .unwrap();
    assert_eq!(applied.disposition, Disposition::Deferred);
    assert_eq!(d.status("Hold"), Some(StepStatus::Active));
    let err = d
        .feed(Input::Resume {
            step: sid("Hold"),
            activation: None,
            event: ev("go"),
            payload: json!({}),
        })
        .unwrap_err();
    assert_eq!(err, EngineError::AlreadyResumed(sid("Hold")));
    // The marker arrives: the kept resume applies at once, no timer.
    let applied = d
        .feed(Input::Async {
            step: sid("Hold"),
            activation: 1,
            wait: crate::step::AsyncWait {
                timer: Some(crate::step::TimerSpec {
                    after: Duration::from_secs(60),
                    event: crate::step::EventName("go".into()),
                }),
            },
        })
        .unwrap();
    assert!(
        !applied
            .effects
            .iter()
            .any(|e| matches!(e, Effect::ScheduleTimer { .. }))
    );
    assert_eq!(d.status("Hold"), Some(StepStatus::Completed));
    assert_eq!(d.inst.context.steps["hold"], json!({"early": true}));
    d.run();
    assert_eq!(d.inst.status, InstanceStatus::Completed);
}

#[test]
fn a_kept_resume_is_dropped_and_reported_when_the_step_completes() {
    let s = FnStep::new("Quick", ["go"], |_| StepOutcome::complete("go"));
    let workflow = wf().start(s.clone()).on(s, "go", Done).build().unwrap();
    let mut d = Driver::new(workflow, json!({}));
    d.feed(Input::Resume {
        step: sid("Quick"),
        activation: Some(1),
        event: ev("go"),
        payload: json!({}),
    })
    .unwrap();
    let applied = d
        .feed(Input::Completed {
            step: sid("Quick"),
            activation: 1,
            completion: Completion::new("go"),
        })
        .unwrap();
    assert!(
        applied
            .effects
            .iter()
            .any(|e| matches!(e, Effect::Emit(EngineEvent::ResumeDropped { .. })))
    );
    assert!(
        d.inst
            .history
            .iter()
            .any(|h| matches!(h.kind, HistoryKind::ResumeDropped { .. }))
    );
}

#[test]
fn timers_schedule_fire_and_are_cancelled_by_resume() {
    let workflow = wf()
        .start_with(WaitForEvent, json!({"timeout_ms": 5000}))
        .on(WaitForEvent, "received", Done)
        .on(WaitForEvent, "timeout", Done)
        .build()
        .unwrap();
    // Timer fires.
    let mut d = Driver::new(workflow.clone(), json!({}));
    d.run();
    assert_eq!(d.timers.len(), 1);
    let (step, activation, fire_at, event) = d.timers[0].clone();
    assert_eq!(fire_at, t0() + chrono::Duration::milliseconds(5000));
    assert_eq!(event, ev("timeout"));
    d.feed(Input::TimerFired {
        step: step.clone(),
        activation,
        event: event.clone(),
    })
    .unwrap();
    d.run();
    assert_eq!(d.inst.status, InstanceStatus::Completed);
    assert!(d.inst.history.iter().any(|h| matches!(
        h.kind,
        HistoryKind::Resumed {
            source: crate::instance::ResumeSource::Timer,
            ..
        }
    )));
    // A duplicate firing is ignored.
    let again = d
        .feed(Input::TimerFired {
            step,
            activation,
            event,
        })
        .unwrap();
    assert!(matches!(again.disposition, Disposition::Ignored(_)));

    // Resumed first: the timer is cancelled and a late firing is stale.
    let mut d = Driver::new(workflow, json!({}));
    d.run();
    let applied = d
        .feed(Input::Resume {
            step: sid(crate::steps::WAIT_FOR_EVENT_ID),
            activation: None,
            event: ev("received"),
            payload: json!({}),
        })
        .unwrap();
    assert!(
        applied
            .effects
            .iter()
            .any(|e| matches!(e, Effect::CancelTimer { .. }))
    );
    assert!(d.timers.is_empty());
    let late = d
        .feed(Input::TimerFired {
            step: sid(crate::steps::WAIT_FOR_EVENT_ID),
            activation: 1,
            event: ev("timeout"),
        })
        .unwrap();
    assert!(matches!(
        late.disposition,
        Disposition::Ignored(Ignored::InstanceFinished(_) | Ignored::StaleTimer { .. })
    ));
}

#[test]
fn wait_schedules_its_own_durable_timer_g8() {
    let workflow = wf()
        .start_with(Wait, json!({"duration": 2, "unit": "hour"}))
        .on(Wait, "timeout", Done)
        .build()
        .unwrap();
    let mut d = Driver::new(workflow, json!({}));
    d.run();
    assert_eq!(d.inst.status, InstanceStatus::Waiting);
    assert_eq!(d.timers.len(), 1);
    assert_eq!(d.timers[0].2, t0() + chrono::Duration::hours(2));
    let timer = d
        .inst
        .step(crate::steps::WAIT_ID)
        .unwrap()
        .timer
        .clone()
        .unwrap();
    assert_eq!(timer.fire_at, t0() + chrono::Duration::hours(2));
}

#[test]
fn a_timer_with_an_undeclared_event_fails_the_step() {
    let s = FnStep::new("Hold", ["go"], |_| {
        StepOutcome::wait_with_timer(Duration::from_secs(1), "later")
    });
    let workflow = wf().start(s.clone()).on(s, "go", Done).build().unwrap();
    let mut d = Driver::new(workflow, json!({}));
    d.run();
    assert_eq!(d.inst.status, InstanceStatus::Failed);
}

#[test]
fn applying_the_same_result_twice_is_a_no_op() {
    let a = step("A", "done", json!({"x": 1}));
    let b = step("B", "done", json!({}));
    let workflow = wf()
        .start(a.clone())
        .on(a, "done", b.clone())
        .on(b, "done", Done)
        .build()
        .unwrap();
    let mut d = Driver::new(workflow, json!({}));
    let input = Input::Completed {
        step: sid("A"),
        activation: 1,
        completion: Completion::new("done"),
    };
    let first = d.feed(input.clone()).unwrap();
    assert_eq!(first.executions().count(), 1);
    let snapshot = d.inst.clone();
    let second = d.feed(input).unwrap();
    assert_eq!(
        second.disposition,
        Disposition::Ignored(Ignored::StaleActivation {
            step: sid("A"),
            activation: 1
        })
    );
    assert!(second.effects.is_empty());
    assert_eq!(d.inst, snapshot);
    // A forged result for a step that is not active changes nothing either.
    let forged = d
        .feed(Input::Completed {
            step: sid("B"),
            activation: 2,
            completion: Completion::new("done"),
        })
        .unwrap();
    assert!(matches!(forged.disposition, Disposition::Ignored(_)));
    assert_eq!(d.inst, snapshot);
    let again = d.feed(Input::Start).unwrap();
    assert_eq!(
        again.disposition,
        Disposition::Ignored(Ignored::AlreadyStarted)
    );
}

#[test]
fn failure_marks_the_instance_failed_and_cancels_the_rest_g4_g5() {
    let start = step("Start", "done", json!({}));
    let a = step("A", "done", json!({}));
    let b = step("B", "done", json!({}));
    let j = step("J", "done", json!({}));
    let workflow = wf()
        .start(start.clone())
        .fan_out(start, "done", [target(a.clone()), target(b.clone())])
        .on(a, "done", j.clone())
        .on(b, "done", j.clone())
        .on(j, "done", Done)
        .build()
        .unwrap();
    let mut d = Driver::new(workflow, json!({}));
    d.feed(Input::Completed {
        step: sid("Start"),
        activation: 1,
        completion: Completion::new("done"),
    })
    .unwrap();
    let attempts = vec![crate::instance::AttemptRecord {
        attempt: 1,
        at: t0(),
        error: StepError::retryable("timeout"),
    }];
    let applied = d
        .feed(Input::Failed {
            step: Some(sid("A")),
            activation: 1,
            error: StepError::retryable("timeout again"),
            attempts: attempts.clone(),
        })
        .unwrap();
    assert!(applied.effects.contains(&Effect::CancelJobs));
    assert_eq!(d.inst.status, InstanceStatus::Failed);
    assert_eq!(d.status("A"), Some(StepStatus::Failed));
    assert_eq!(d.status("B"), Some(StepStatus::Cancelled));
    assert_eq!(d.inst.open_steps().count(), 0, "active steps are cleared");
    let failure = d.inst.failure.clone().unwrap();
    assert_eq!(failure.step, Some(sid("A")));
    assert_eq!(failure.error.message, "timeout again");
    assert_eq!(failure.attempts, attempts);
    // B's late result is ignored.
    let late = d
        .feed(Input::Completed {
            step: sid("B"),
            activation: 1,
            completion: Completion::new("done"),
        })
        .unwrap();
    assert_eq!(
        late.disposition,
        Disposition::Ignored(Ignored::InstanceFinished(InstanceStatus::Failed))
    );
    // An instance-level failure (no step) is possible too.
    let mut d2 = waiting_instance();
    d2.feed(Input::Failed {
        step: None,
        activation: 0,
        error: StepError::fatal("corrupt"),
        attempts: vec![],
    })
    .unwrap();
    assert_eq!(d2.inst.status, InstanceStatus::Failed);
    assert_eq!(d2.status("Hold"), Some(StepStatus::Cancelled));
}

#[test]
fn stale_failures_are_ignored() {
    let mut d = waiting_instance();
    let out = d
        .feed(Input::Failed {
            step: Some(sid("Hold")),
            activation: 7,
            error: StepError::fatal("x"),
            attempts: vec![],
        })
        .unwrap();
    assert!(matches!(
        out.disposition,
        Disposition::Ignored(Ignored::StaleActivation { .. })
    ));
    assert_eq!(d.inst.status, InstanceStatus::Waiting);
}

#[test]
fn cancel_is_first_class_g14() {
    let mut d = waiting_instance();
    let applied = d
        .feed(Input::Cancel {
            reason: Some("customer asked".into()),
        })
        .unwrap();
    assert!(applied.effects.contains(&Effect::CancelJobs));
    assert_eq!(d.inst.status, InstanceStatus::Cancelled);
    assert_eq!(d.status("Hold"), Some(StepStatus::Cancelled));
    assert!(d.inst.history.iter().any(
        |h| matches!(&h.kind, HistoryKind::Cancelled { reason: Some(r) } if r == "customer asked")
    ));
    // Nothing applies after cancel, and cancelling again is an error.
    let resumed = d.feed(Input::Resume {
        step: sid("Hold"),
        activation: None,
        event: ev("go"),
        payload: json!({}),
    });
    assert_eq!(
        resumed.unwrap_err(),
        EngineError::InstanceFinished(InstanceStatus::Cancelled)
    );
    assert_eq!(
        d.feed(Input::Cancel { reason: None }).unwrap_err(),
        EngineError::InstanceFinished(InstanceStatus::Cancelled)
    );
    assert_eq!(
        d.inst.status,
        InstanceStatus::Cancelled,
        "never turns completed (G14)"
    );
}

#[test]
fn metadata_merges_shallowly_and_outputs_replace() {
    let a = FnStep::new("A", ["done"], |_| {
        StepOutcome::Complete(
            Completion::new("done")
                .with_metadata(json!({"k": 1, "a": true}).as_object().cloned().unwrap()),
        )
    });
    let b = FnStep::new("B", ["done"], |_| {
        StepOutcome::Complete(
            Completion::new("done").with_metadata(json!({"k": 2}).as_object().cloned().unwrap()),
        )
    });
    let workflow = wf()
        .start(a.clone())
        .on(a, "done", b.clone())
        .on(b, "done", Done)
        .build()
        .unwrap();
    let mut d = Driver::new(workflow, json!({}));
    d.run();
    assert_eq!(
        serde_json::Value::Object(d.inst.runtime_metadata.clone()),
        json!({"k": 2, "a": true})
    );
}

#[test]
fn configs_flow_from_transitions_to_steps() {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    let b = FnStep::new("B", ["done"], move |input| {
        log.lock().unwrap().push(input.config.cloned());
        StepOutcome::complete("done")
    });
    let a = step("A", "done", json!({}));
    let workflow = wf()
        .start(a.clone())
        .on_with(a, "done", b.clone(), json!({"limit": 3}))
        .on(b, "done", Done)
        .build()
        .unwrap();
    let mut d = Driver::new(workflow, json!({}));
    d.run();
    assert_eq!(*seen.lock().unwrap(), vec![Some(json!({"limit": 3}))]);
    assert_eq!(d.inst.step_configs.get("B"), Some(&json!({"limit": 3})));
}

#[test]
fn instances_carry_ids_claims_and_reject_nul_input() {
    let a = step("A", "done", json!({}));
    let workflow = wf().start(a.clone()).on(a, "done", Done).build().unwrap();
    let d = Driver::new(workflow.clone(), json!({"k": "v"}));
    assert_eq!(d.inst.workflow_id.as_str(), "test");
    assert_eq!(
        d.inst.unique_claim.as_ref().unwrap().as_str(),
        "workflow|test|order::1"
    );
    assert_eq!(d.inst.status, InstanceStatus::Running);
    let err = Engine::new(&workflow)
        .new_instance(NewInstance {
            id: Uuid::from_u128(2),
            business_id: crate::business_id::BusinessId::parse("order::2").unwrap(),
            input: json!({"bad": "\u{0}"}),
            telemetry_metadata: serde_json::Map::new(),
            now: t0(),
        })
        .unwrap_err();
    assert!(matches!(
        err,
        EngineError::InvalidJson(crate::limits::InvalidJson {
            role: crate::limits::JsonRole::Input,
            problem: crate::limits::JsonProblem::ContainsNul,
        })
    ));
}

#[test]
fn a_start_input_must_be_an_object_storable_and_readable() {
    let a = step("A", "done", json!({}));
    let workflow = wf().start(a.clone()).on(a, "done", Done).build().unwrap();
    let new = |input: Value, metadata: serde_json::Map<String, Value>| {
        Engine::new(&workflow).new_instance(NewInstance {
            id: Uuid::from_u128(3),
            business_id: crate::business_id::BusinessId::parse("order::3").unwrap(),
            input,
            telemetry_metadata: metadata,
            now: t0(),
        })
    };
    for bad in [json!([]), json!("s"), json!(null), json!(1)] {
        let err = new(bad.clone(), serde_json::Map::new()).unwrap_err();
        assert!(
            matches!(&err, EngineError::InvalidJson(j) if j.role == crate::limits::JsonRole::Input
                && matches!(j.problem, crate::limits::JsonProblem::NotAnObject { .. })),
            "{bad}: {err:?}"
        );
    }
    let err = new(
        crate::limits::nested(crate::limits::MAX_DEPTH + 1),
        serde_json::Map::new(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("nested deeper than 64"), "{err}");
    let mut deep_meta = serde_json::Map::new();
    deep_meta.insert("m".into(), crate::limits::nested(crate::limits::MAX_DEPTH));
    let err = new(json!({}), deep_meta).unwrap_err();
    assert!(
        matches!(&err, EngineError::InvalidJson(j) if j.role == crate::limits::JsonRole::TelemetryMetadata),
        "{err:?}"
    );
    assert!(
        new(
            crate::limits::nested(crate::limits::MAX_DEPTH),
            serde_json::Map::new()
        )
        .is_ok()
    );
}

#[test]
fn an_output_too_deep_fails_the_step_and_a_payload_too_deep_is_refused() {
    let deep = crate::limits::nested(crate::limits::MAX_DEPTH + 1);
    let a = step("A", "done", deep.clone());
    let workflow = wf().start(a.clone()).on(a, "done", Done).build().unwrap();
    let mut d = Driver::new(workflow, json!({}));
    d.run();
    assert_eq!(d.inst.status, InstanceStatus::Failed);
    let failure = format!("{:?}", d.inst.failure);
    assert!(failure.contains("nested deeper than 64"), "{failure}");

    let mut w = waiting_instance();
    let before = w.inst.clone();
    let err = w
        .feed(Input::Resume {
            step: sid("Hold"),
            activation: None,
            event: ev("go"),
            payload: deep,
        })
        .unwrap_err();
    assert!(
        matches!(&err, EngineError::InvalidJson(j) if j.role == crate::limits::JsonRole::ResumePayload),
        "{err:?}"
    );
    assert_eq!(w.inst, before);
}

#[test]
fn a_mismatched_or_corrupt_instance_is_rejected_untouched() {
    let d = waiting_instance();
    let other = wf().version(2).start(Done).build().unwrap();
    let mut inst = d.inst.clone();
    let err = Engine::new(&other)
        .apply(&mut inst, Input::Cancel { reason: None }, t0())
        .unwrap_err();
    assert!(matches!(err, EngineError::WorkflowMismatch { .. }), "{err}");
    assert_eq!(inst, d.inst);
    let mut corrupt = d.inst.clone();
    let state = corrupt.steps.values().next().cloned().unwrap();
    corrupt.steps.insert(sid("Ghost"), state);
    let snapshot = corrupt.clone();
    let err = Engine::new(&d.wf)
        .apply(&mut corrupt, Input::Cancel { reason: None }, t0())
        .unwrap_err();
    assert!(matches!(err, EngineError::CorruptState(_)), "{err}");
    assert_eq!(corrupt, snapshot);
}

#[test]
fn revision_and_timestamps_advance_only_when_applied() {
    let mut d = waiting_instance();
    let rev = d.inst.revision;
    d.now = t0() + chrono::Duration::seconds(5);
    d.feed(Input::TimerFired {
        step: sid("Hold"),
        activation: 1,
        event: ev("go"),
    })
    .unwrap();
    assert_eq!(d.inst.revision, rev, "stale timer: no change");
    d.feed(Input::Resume {
        step: sid("Hold"),
        activation: None,
        event: ev("go"),
        payload: json!({}),
    })
    .unwrap();
    assert_eq!(d.inst.revision, rev + 1);
    assert_eq!(d.inst.updated_at, t0() + chrono::Duration::seconds(5));
}

#[test]
fn instance_state_round_trips_through_json() {
    let mut d = Driver::new(
        branching("ko"),
        json!({"n": 1.5, "u": "ünï", "big": 9_007_199_254_740_993_u64}),
    );
    d.run();
    let json = serde_json::to_value(&d.inst).unwrap();
    let back: Instance = serde_json::from_value(json).unwrap();
    assert_eq!(back, d.inst);
    let _unused: BTreeMap<String, Value> = BTreeMap::new();
}

#[test]
fn only_final_outcomes_become_inputs() {
    assert!(Input::from_outcome(sid("a"), 1, StepOutcome::retry("later")).is_none());
    assert!(matches!(
        Input::from_outcome(sid("a"), 1, StepOutcome::fatal("no")),
        Some(Input::Failed { step: Some(_), .. })
    ));
    assert!(matches!(
        Input::from_outcome(sid("a"), 3, StepOutcome::wait()),
        Some(Input::Async { activation: 3, .. })
    ));
}

#[test]
fn engine_events_serialize_with_their_names() {
    let e = EngineEvent::Transition {
        from: sid("a"),
        event: ev("done"),
        targets: vec![sid("b")],
    };
    assert_eq!(
        serde_json::to_value(&e).unwrap(),
        json!({"name": "transition", "from": "a", "event": "done", "targets": ["b"]})
    );
    assert_eq!(
        serde_json::to_value(EngineEvent::WorkflowCompleted).unwrap(),
        json!({"name": "workflow_completed"})
    );
}

#[test]
fn the_idempotency_key_is_stable_across_attempts() {
    let keys = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = keys.clone();
    let a = FnStep::new("A", ["done"], move |input| {
        log.lock()
            .unwrap()
            .push((input.idempotency_key.to_string(), input.attempt));
        StepOutcome::complete("done")
    });
    let workflow = wf().start(a.clone()).on(a, "done", Done).build().unwrap();
    let mut d = Driver::new(workflow, json!({}));
    d.run();
    let keys = keys.lock().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].0, format!("{}:A:1", d.inst.id));
}

#[test]
fn steps_with_and_open_steps_report_state() {
    let d = waiting_instance();
    let waiting: Vec<&str> = d
        .inst
        .steps_with(StepStatus::Waiting)
        .map(StepId::as_str)
        .collect();
    assert_eq!(waiting, ["Hold"]);
    assert!(!d.inst.is_step_active("Hold", 1));
    assert_eq!(d.inst.open_steps().count(), 1);
    assert!(d.inst.status.is_active());
}

#[test]
fn a_resumed_step_has_exactly_one_history_entry_the_resume() {
    let mut d = waiting_instance();
    d.feed(Input::Resume {
        step: sid("Hold"),
        activation: None,
        event: ev("go"),
        payload: json!({}),
    })
    .unwrap();
    let entries: Vec<&HistoryKind> = d
        .inst
        .history
        .iter()
        .filter(|h| h.step.as_ref().map(StepId::as_str) == Some("Hold"))
        .map(|h| &h.kind)
        .filter(|k| !matches!(k, HistoryKind::Async { .. }))
        .collect();
    assert!(
        matches!(
            entries.as_slice(),
            [HistoryKind::Resumed {
                source: crate::instance::ResumeSource::External,
                ..
            }]
        ),
        "{entries:?}"
    );
}

#[test]
fn failure_reasons_are_stored_typed_and_old_records_still_read() {
    use crate::instance::{FailureReason, FailureRecord};
    let record = FailureRecord {
        reason: FailureReason::UndeclaredTarget {
            target: "Ghost".to_owned(),
        },
        step: Some(sid("Pick")),
        activation: 1,
        error: StepError::fatal("x"),
        attempts: Vec::new(),
        at: t0(),
    };
    let stored = serde_json::to_value(&record).unwrap();
    assert_eq!(
        stored["reason"],
        json!({"kind": "undeclared_target", "target": "Ghost"})
    );
    assert_eq!(
        serde_json::from_value::<FailureRecord>(stored.clone()).unwrap(),
        record
    );
    let mut old = stored;
    old.as_object_mut().unwrap().remove("reason");
    assert_eq!(
        serde_json::from_value::<FailureRecord>(old).unwrap().reason,
        FailureReason::Unknown,
        "a record written before reasons were kept"
    );
    let panicked = StepError::retryable("boom").with_cause(FailureReason::StepPanicked);
    assert_eq!(
        FailureReason::of_step_error(&panicked, 3),
        FailureReason::StepPanicked
    );
    assert_eq!(
        FailureReason::of_step_error(&StepError::retryable("x"), 3),
        FailureReason::AttemptsExhausted { attempts: 3 }
    );
}

#[test]
fn done_is_completed_inline_and_the_rest_of_the_effects_keep_their_order() {
    let a = step("StepA", "done", json!({}));
    let b = step("StepB", "done", json!({}));
    // A fans out to B and Done's join; B's completion leaves only Done.
    let workflow = wf()
        .start(a.clone())
        .on(a, "done", b.clone())
        .on(b, "done", Done)
        .build()
        .unwrap();
    let mut d = Driver::new(workflow, json!({}));
    let engine = Engine::new(&d.wf);
    let a_done = engine
        .apply(
            &mut d.inst,
            Input::Completed {
                step: sid("StepA"),
                activation: 1,
                completion: Completion::new("done"),
            },
            d.now,
        )
        .unwrap();
    // Nothing to do inline: B's execution stays, in place.
    let inline = engine
        .complete_inline(&mut d.inst, a_done.effects.clone(), d.now)
        .unwrap();
    assert!(inline.completed.is_empty());
    assert_eq!(inline.effects, a_done.effects);

    let b_done = engine
        .apply(
            &mut d.inst,
            Input::Completed {
                step: sid("StepB"),
                activation: 1,
                completion: Completion::new("done"),
            },
            d.now,
        )
        .unwrap();
    assert!(
        b_done.executions().any(|(s, _)| s.as_str() == DONE_ID),
        "B activates Done"
    );
    let inline = engine
        .complete_inline(&mut d.inst, b_done.effects, d.now)
        .unwrap();
    assert_eq!(inline.completed, vec![(sid(DONE_ID), 1)]);
    assert!(
        inline
            .effects
            .iter()
            .all(|e| !matches!(e, Effect::Execute { .. })),
        "no job runs Done: {:?}",
        inline.effects
    );
    assert!(
        inline
            .effects
            .contains(&Effect::Emit(EngineEvent::WorkflowCompleted)),
        "the completion Done applied is reported: {:?}",
        inline.effects
    );
    assert_eq!(d.inst.status, InstanceStatus::Completed);
    assert_eq!(
        d.inst.step(DONE_ID).map(|s| s.status),
        Some(StepStatus::Completed)
    );
}

#[test]
fn fail_instance_cancels_every_open_step_and_records_the_cause() {
    let mut d = approval_waiting_beside_work();
    assert_eq!(d.status("Approval"), Some(StepStatus::Waiting));
    assert_eq!(d.status("Work"), Some(StepStatus::Active));
    let revision = d.inst.revision;
    let later = d.now + chrono::Duration::seconds(5);
    let reason = crate::instance::FailureReason::JobDiscarded {
        job: "advance".into(),
    };
    let error = StepError::fatal("the instance cannot be advanced").with_cause(reason.clone());

    let applied = Engine::fail_instance(&mut d.inst, error, later).unwrap();

    assert_eq!(applied.disposition, Disposition::Applied);
    assert_eq!(
        applied.effects,
        vec![
            Effect::Emit(EngineEvent::WorkflowFailed {
                step: None,
                message: "the instance cannot be advanced".into(),
            }),
            Effect::CancelJobs,
        ]
    );
    assert_eq!(d.inst.status, InstanceStatus::Failed);
    // Neither open step is blamed: both are cancelled, their timers gone.
    assert_eq!(d.status("Approval"), Some(StepStatus::Cancelled));
    assert_eq!(d.status("Work"), Some(StepStatus::Cancelled));
    assert_eq!(d.status("Start"), Some(StepStatus::Completed));
    assert!(d.inst.steps.values().all(|s| s.timer.is_none()));
    let failure = d.inst.failure.clone().unwrap();
    assert_eq!(failure.reason, reason);
    assert_eq!(failure.step, None);
    assert_eq!(failure.at, later);
    assert_eq!(d.inst.revision, revision + 1);
    assert_eq!(d.inst.updated_at, later);
    let last = d.inst.history.last().unwrap();
    assert_eq!(last.at, later);
    assert!(
        matches!(&last.kind, HistoryKind::Failed { message } if message == "the instance cannot be advanced")
    );

    // A finished instance is refused and left as it is.
    let before = d.inst.clone();
    let again = Engine::fail_instance(&mut d.inst, StepError::fatal("again"), later);
    assert!(matches!(
        again,
        Err(EngineError::InstanceFinished(InstanceStatus::Failed))
    ));
    assert_eq!(d.inst, before);
}

#[test]
fn fail_instance_without_a_cause_takes_the_reason_from_the_error_kind() {
    let only = step("Only", "done", json!({}));
    let workflow = wf()
        .start(only.clone())
        .on(only, "done", Done)
        .build()
        .unwrap();
    let mut d = Driver::new(workflow, json!({}));
    Engine::fail_instance(&mut d.inst, StepError::fatal("gone"), d.now).unwrap();
    assert_eq!(
        d.inst.failure.clone().unwrap().reason,
        crate::instance::FailureReason::StepFatal
    );
    assert_eq!(d.status("Only"), Some(StepStatus::Cancelled));
}
