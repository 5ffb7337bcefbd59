//! Properties over random DAGs: validation never panics; a valid workflow
//! driven with random outcomes, interleavings and duplicate deliveries always
//! ends completed, failed or waiting; no step activation runs twice; every
//! join runs exactly once when its taken branches complete.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;

use super::tests::{sid, t0};
use super::*;
use crate::business_id::{BusinessId, Scope};
use crate::instance::StepStatus;
use crate::step::{AsyncWait, EventName, StepOutcome, TimerSpec};
use crate::steps::{DONE_ID, Done, FnStep};
use crate::workflow::{Pick, Workflow, target};

#[derive(Debug, Clone)]
struct Clause {
    targets: BTreeSet<usize>,
    dynamic: bool,
    seed: usize,
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    Complete,
    Async {
        via_timer: bool,
        never_resumed: bool,
    },
    Fail,
}

#[derive(Debug, Clone, Copy)]
struct Behavior {
    event: usize,
    mode: Mode,
    duplicate: bool,
}

fn name(i: usize) -> String {
    format!("s{i}")
}

/// Steps s0..s{n-1}; each s(i<n-1) has 1–3 events whose targets are later
/// steps (the first event always includes s(i+1), so all are reachable);
/// s(n-1) routes to Done, so every path converges there.
fn shape() -> impl Strategy<Value = Vec<Vec<Clause>>> {
    (2usize..9).prop_flat_map(|n| {
        let per_step: Vec<_> = (0..n - 1)
            .map(|i| {
                let clause = (
                    prop::collection::btree_set(i + 1..n, 1..=(n - i - 1).min(3)),
                    prop::bool::weighted(0.3),
                    0usize..100,
                )
                    .prop_map(|(targets, dynamic, seed)| Clause {
                        targets,
                        dynamic,
                        seed,
                    });
                prop::collection::vec(clause, 1..=3).prop_map(move |mut clauses| {
                    clauses[0].targets.insert(i + 1);
                    clauses
                })
            })
            .collect();
        per_step
    })
}

fn behavior() -> impl Strategy<Value = Behavior> {
    let mode = prop_oneof![
        8 => Just(Mode::Complete),
        2 => (any::<bool>(), prop::bool::weighted(0.1))
            .prop_map(|(via_timer, never_resumed)| Mode::Async { via_timer, never_resumed }),
        1 => Just(Mode::Fail),
    ];
    (0usize..3, mode, prop::bool::weighted(0.2)).prop_map(|(event, mode, duplicate)| Behavior {
        event,
        mode,
        duplicate,
    })
}

fn build(shape: &[Vec<Clause>]) -> Workflow {
    let n = shape.len() + 1;
    let events = |i: usize| -> Vec<String> {
        if i == n - 1 {
            vec!["done".into()]
        } else {
            (0..shape[i].len()).map(|k| format!("e{k}")).collect()
        }
    };
    // Execution is scripted by the driver, not by these closures.
    let steps: Vec<FnStep> = (0..n)
        .map(|i| {
            FnStep::new(&name(i), events(i), |_| {
                StepOutcome::fatal("scripted by the driver")
            })
        })
        .collect();
    let mut b = Workflow::builder("random")
        .unique("r", Scope::None)
        .start(steps[0].clone());
    for (i, clauses) in shape.iter().enumerate() {
        for (k, c) in clauses.iter().enumerate() {
            let targets: Vec<_> = c
                .targets
                .iter()
                .map(|t| target(steps[*t].clone()))
                .collect();
            let event = format!("e{k}");
            if c.dynamic {
                let declared: Vec<usize> = c.targets.iter().copied().collect();
                let seed = c.seed;
                b = b.route(steps[i].clone(), &event, targets, move |ctx| {
                    let first = declared[(seed + ctx.steps.len()) % declared.len()];
                    let mut picks = vec![Pick::step(name(first))];
                    if seed % 3 == 0 {
                        picks.push(Pick::step(name(declared[seed % declared.len()])));
                    }
                    picks
                });
            } else {
                b = b.fan_out(steps[i].clone(), &event, targets);
            }
        }
    }
    b.on(steps[n - 1].clone(), "done", Done)
        .build()
        .expect("generated shapes are valid")
}

#[derive(Debug)]
enum Work {
    Execute(StepId, u32),
    Resume(StepId, u32, Event, bool),
    Duplicate(Input),
}

struct Run {
    wf: Workflow,
    inst: Instance,
    execute_effects: BTreeMap<(StepId, u32), usize>,
    executed: BTreeMap<(StepId, u32), usize>,
    never_resumed: bool,
    any_failure: bool,
}

fn drive(shape: &[Vec<Clause>], behaviors: &[Behavior], choices: &[usize]) -> Run {
    let wf = build(shape);
    let engine = Engine::new(&wf);
    let mut inst = engine
        .new_instance(NewInstance {
            id: uuid::Uuid::from_u128(7),
            business_id: BusinessId::parse("r::1::00000000").unwrap(),
            input: json!({}),
            telemetry_metadata: serde_json::Map::new(),
            now: t0(),
        })
        .unwrap();
    let mut run = Run {
        wf: wf.clone(),
        inst: inst.clone(),
        execute_effects: BTreeMap::new(),
        executed: BTreeMap::new(),
        never_resumed: false,
        any_failure: false,
    };
    let mut work: Vec<Work> = Vec::new();
    let record = |applied: &Applied, work: &mut Vec<Work>, run: &mut Run| {
        for e in &applied.effects {
            if let Effect::Execute { step, activation } = e {
                *run.execute_effects
                    .entry((step.clone(), *activation))
                    .or_default() += 1;
                work.push(Work::Execute(step.clone(), *activation));
            }
            if e == &Effect::CancelJobs {
                work.retain(|w| matches!(w, Work::Duplicate(_)));
            }
        }
    };
    let applied = engine.apply(&mut inst, Input::Start, t0()).unwrap();
    record(&applied, &mut work, &mut run);
    let mut tick = 0usize;
    while !work.is_empty() {
        let pick = choices
            .get(tick % choices.len().max(1))
            .copied()
            .unwrap_or(0)
            % work.len();
        tick += 1;
        assert!(tick < 10_000, "the run does not terminate");
        match work.swap_remove(pick) {
            Work::Execute(step, activation) => {
                *run.executed.entry((step.clone(), activation)).or_default() += 1;
                let idx: usize = step
                    .as_str()
                    .strip_prefix('s')
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(usize::MAX);
                let declared = &wf.step(step.as_str()).unwrap().events;
                let behavior = if step.as_str() == DONE_ID {
                    Behavior {
                        event: 0,
                        mode: Mode::Complete,
                        duplicate: false,
                    }
                } else {
                    behaviors[idx % behaviors.len()]
                };
                let event = declared[behavior.event % declared.len()].clone();
                let input = match behavior.mode {
                    Mode::Complete => Input::Completed {
                        step: step.clone(),
                        activation,
                        completion: crate::step::Completion::new(event.as_str())
                            .with_output(json!({"by": step.as_str()})),
                    },
                    Mode::Async {
                        via_timer,
                        never_resumed,
                    } => {
                        if never_resumed {
                            run.never_resumed = true;
                        } else {
                            work.push(Work::Resume(
                                step.clone(),
                                activation,
                                event.clone(),
                                via_timer,
                            ));
                        }
                        Input::Async {
                            step: step.clone(),
                            activation,
                            wait: AsyncWait {
                                timer: via_timer.then(|| TimerSpec {
                                    after: Duration::from_secs(30),
                                    event: EventName(event.as_str().to_owned()),
                                }),
                            },
                        }
                    }
                    Mode::Fail => {
                        run.any_failure = true;
                        Input::Failed {
                            step: Some(step.clone()),
                            activation,
                            error: crate::step::StepError::fatal("boom"),
                            attempts: vec![],
                        }
                    }
                };
                if behavior.duplicate {
                    work.push(Work::Duplicate(input.clone()));
                }
                let applied = engine.apply(&mut inst, input, t0()).unwrap();
                record(&applied, &mut work, &mut run);
            }
            Work::Resume(step, activation, event, via_timer) => {
                let input = if via_timer {
                    Input::TimerFired {
                        step,
                        activation,
                        event,
                    }
                } else {
                    Input::Resume {
                        step,
                        activation: Some(activation),
                        event,
                        payload: json!({}),
                    }
                };
                match engine.apply(&mut inst, input, t0()) {
                    Ok(applied) => record(&applied, &mut work, &mut run),
                    Err(EngineError::InstanceFinished(_)) => {}
                    Err(e) => panic!("unexpected resume error: {e}"),
                }
            }
            Work::Duplicate(input) => {
                let before = inst.clone();
                let applied = engine.apply(&mut inst, input, t0()).unwrap();
                assert!(
                    matches!(applied.disposition, Disposition::Ignored(_)),
                    "{applied:?}"
                );
                assert!(applied.effects.is_empty());
                assert_eq!(inst, before, "a duplicate changed the instance");
            }
        }
    }
    run.inst = inst;
    run
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn valid_workflows_terminate_and_run_each_activation_once(
        shape in shape(),
        behaviors in prop::collection::vec(behavior(), 1..12),
        choices in prop::collection::vec(0usize..64, 1..32),
    ) {
        let run = drive(&shape, &behaviors, &choices);
        let inst = &run.inst;
        // Terminal, or waiting only on a never-resumed step.
        match inst.status {
            InstanceStatus::Completed | InstanceStatus::Failed => {}
            InstanceStatus::Waiting => prop_assert!(run.never_resumed),
            other => prop_assert!(false, "ended {other}"),
        }
        if !run.any_failure && !run.never_resumed {
            prop_assert_eq!(inst.status, InstanceStatus::Completed);
        }
        // Exactly one Execute effect and one execution per activation; no step twice.
        for (key, count) in &run.execute_effects {
            prop_assert_eq!(*count, 1, "{:?} activated {} times", key, count);
            prop_assert_eq!(key.1, 1, "{:?} re-activated", key);
        }
        for (key, count) in &run.executed {
            prop_assert_eq!(*count, 1, "{:?} executed {} times", key, count);
        }
        if inst.status == InstanceStatus::Completed {
            prop_assert_eq!(run.executed.get(&(sid(DONE_ID), 1)).copied(), Some(1));
            // Dead-path elimination invariant: a step ran iff one of its
            // incoming edges was taken; every step is completed or dead.
            for (id, def) in run.wf.steps() {
                let state = inst.step(id.as_str());
                prop_assert!(
                    matches!(state.map(|s| s.status), Some(StepStatus::Completed | StepStatus::Dead)),
                    "{} left {:?}", id, state
                );
                let _ = def;
                if *id == run.wf.start().step {
                    continue;
                }
                let taken = run.wf.incoming(id.as_str()).iter().any(|e| {
                    inst.step(e.from.as_str()).is_some_and(|s| {
                        s.status == StepStatus::Completed && s.event.as_ref() == Some(&e.event) && s.targets.contains(id)
                    })
                });
                let completed = state.is_some_and(|s| s.status == StepStatus::Completed);
                prop_assert_eq!(taken, completed, "{}: taken={} completed={}", id, taken, completed);
                // A join runs after ALL of its taken branches: every source of a
                // taken edge completed before it (its output is in the context).
                if completed && run.wf.predecessors(id.as_str()).len() > 1 {
                    prop_assert_eq!(run.executed.get(&(id.clone(), 1)).copied(), Some(1));
                }
            }
        }
    }

    #[test]
    fn validation_never_panics(
        ids in prop::collection::vec(prop_oneof!["s[0-4]", Just("bad id".to_owned()), Just(DONE_ID.to_owned())], 1..8),
        events in prop::collection::vec(prop_oneof!["e[0-2]", Just("1bad".to_owned())], 1..4),
        edges in prop::collection::vec((0usize..8, 0usize..4, prop::collection::vec(0usize..8, 0..4), any::<bool>()), 0..14),
        start in 0usize..8,
        version in 0u32..3,
        unique_key in prop_oneof![Just("ok".to_owned()), Just("Not OK".to_owned())],
    ) {
        let steps: Vec<FnStep> = (0..5)
            .map(|i| {
                let evs: Vec<String> = events.iter().filter(|e| !e.starts_with('1')).take(i % 3 + 1).cloned().collect();
                FnStep::new(&format!("s{i}"), evs, |_| StepOutcome::complete("e0"))
            })
            .collect();
        let reference = |raw: &str| -> crate::workflow::StepRef {
            use crate::workflow::IntoStepRef;
            match raw.strip_prefix('s').and_then(|d| d.parse::<usize>().ok()) {
                Some(i) if raw.len() == 2 => steps[i].clone().into_step_ref(),
                _ if raw == DONE_ID => Done.into_step_ref(),
                _ => raw.into_step_ref(),
            }
        };
        let mut b = Workflow::builder("fuzz").version(version).unique(unique_key, Scope::Workflow);
        b = b.start(reference(&ids[start % ids.len()]));
        for (from, ev, targets, dynamic) in &edges {
            let from = reference(&ids[from % ids.len()]);
            let event = &events[ev % events.len()];
            let ts: Vec<_> = targets.iter().map(|t| target(reference(&ids[t % ids.len()]))).collect();
            b = if *dynamic {
                b.route(from, event, ts, |_| vec![])
            } else {
                b.fan_out(from, event, ts)
            };
        }
        match b.build() {
            Ok(wf) => {
                // A workflow that builds has only Done as leaf.
                for id in wf.steps().keys() {
                    if id.as_str() != DONE_ID {
                        prop_assert!(wf.successors(id.as_str()).next().is_some(), "{} is a leaf", id);
                    }
                }
            }
            Err(errors) => prop_assert!(!errors.errors.is_empty()),
        }
    }
}
