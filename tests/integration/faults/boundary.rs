//! What enters at the boundary, on both backends: JSON that is not an object
//! where one is needed, nested too deep or too large, zero delays, and rows
//! the single writer refuses. Each is refused with a typed error (nothing
//! stored, no job) or refused with its reason kept, and never wedges the
//! instance it names.

use hephaestus_engine_core::instance::InstanceStatus;
use hephaestus_engine_core::limits::{self, JsonProblem, JsonRole, MAX_BYTES, MAX_DEPTH};
use hephaestus_engine_core::ports::{InstanceFilter, NewStepResult, ResultKind, ResultPayload};
use hephaestus_engine_core::prelude::*;
use hephaestus_engine_core::steps::{Done, FnStep, WAIT_FOR_EVENT_ID, WaitForEvent};
use hephaestus_runner::{Backend, DrainReport, RunnerError, Runtime, StartOptions};
use serde_json::{Map, Value, json};

use super::bad_input::{on_both_backends, postgres_backend, runtime};

on_both_backends!(
    a_start_input_that_is_not_an_object_is_refused_and_nothing_is_stored,
    json_too_deep_or_too_large_is_refused_where_it_enters,
    every_value_at_the_limits_reads_back_identically,
    a_scheduled_resume_needs_a_positive_delay,
    a_refused_row_keeps_its_reason_and_does_not_block_a_valid_resume,
    each_failure_path_records_its_typed_reason,
);

fn approval() -> Workflow {
    let begin = FnStep::new("Begin", ["done"], |input| {
        // Echoes the deepest value the start input carries.
        StepOutcome::complete_with("done", input.context.initial["echo"].clone())
    });
    Workflow::builder("approval")
        .unique("run", Scope::Workflow)
        .start(begin.clone())
        .on(begin, "done", WaitForEvent)
        .on(WaitForEvent, "received", Done)
        .build()
        .unwrap()
}

fn deep_echo() -> Workflow {
    let emit = FnStep::new("Emit", ["done"], |input| {
        let depth = input.context.initial["depth"].as_u64().unwrap_or(1);
        let depth = usize::try_from(depth).unwrap_or(1);
        StepOutcome::complete_with("done", limits::nested(depth))
    })
    .with_retry_policy(RetryPolicy::no_retries());
    Workflow::builder("deep")
        .unique("run", Scope::Workflow)
        .start(emit.clone())
        .on(emit, "done", Done)
        .build()
        .unwrap()
}

async fn nothing_stored<B: Backend>(rt: &Runtime<B>) {
    assert!(
        rt.list(&InstanceFilter::default())
            .await
            .unwrap()
            .is_empty(),
        "no instance was stored"
    );
    assert_eq!(rt.drain().await.unwrap(), DrainReport::default(), "no job");
}

async fn a_start_input_that_is_not_an_object_is_refused_and_nothing_is_stored<B: Backend>(
    backend: B,
) {
    let rt = runtime(&backend, vec![approval()]);
    for (input, found) in [
        (json!([]), "an array"),
        (json!("s"), "a string"),
        (Value::Null, "null"),
        (json!(1), "a number"),
    ] {
        match rt
            .start("approval", "1", input.clone(), StartOptions::default())
            .await
        {
            Err(RunnerError::InvalidJson(invalid)) => {
                assert_eq!(invalid.role, JsonRole::Input);
                assert_eq!(invalid.problem, JsonProblem::NotAnObject { found });
            }
            other => panic!("{input}: expected InvalidJson, got {other:?}"),
        }
        // The facade inside a caller's unit of work refuses it the same way.
        let mut tx = backend.begin().await.unwrap();
        let refused = rt
            .start_in(&mut tx, "approval", "1", input, StartOptions::default())
            .await;
        assert!(
            matches!(refused, Err(RunnerError::InvalidJson(_))),
            "{refused:?}"
        );
        backend.commit(tx).await.unwrap();
    }
    nothing_stored(&rt).await;
}

async fn json_too_deep_or_too_large_is_refused_where_it_enters<B: Backend>(backend: B) {
    let rt = runtime(&backend, vec![approval(), deep_echo()]);
    let too_deep = limits::nested(1_000);
    // The input.
    let err = rt
        .start("approval", "1", too_deep.clone(), StartOptions::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RunnerError::InvalidJson(j) if j.role == JsonRole::Input
            && j.problem == JsonProblem::TooDeep { max: MAX_DEPTH }),
        "{err:?}"
    );
    // Caller metadata.
    let mut metadata = Map::new();
    metadata.insert("m".into(), too_deep.clone());
    let err = rt
        .start(
            "approval",
            "1",
            json!({}),
            StartOptions::default().with_telemetry_metadata(metadata),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RunnerError::InvalidJson(j) if j.role == JsonRole::TelemetryMetadata),
        "{err:?}"
    );
    // Too large.
    let err = rt
        .start(
            "approval",
            "1",
            json!({"blob": "x".repeat(MAX_BYTES)}),
            StartOptions::default(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RunnerError::InvalidJson(j) if j.problem == JsonProblem::TooLarge { max: MAX_BYTES }),
        "{err:?}"
    );
    nothing_stored(&rt).await;

    // A resume payload: refused before anything is recorded; a valid resume
    // of the same activation then goes through.
    let s = rt
        .start("approval", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    rt.drain().await.unwrap();
    let err = rt
        .resume(s.id, WAIT_FOR_EVENT_ID, "received", too_deep)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, RunnerError::InvalidJson(j) if j.role == JsonRole::ResumePayload),
        "{err:?}"
    );
    assert!(
        rt.jobs_of(s.id).await.unwrap().is_empty(),
        "nothing enqueued"
    );
    rt.resume(s.id, WAIT_FOR_EVENT_ID, "received", json!({"ok": true}))
        .await
        .unwrap();
    rt.drain().await.unwrap();
    assert_eq!(
        rt.get(s.id).await.unwrap().unwrap().status,
        InstanceStatus::Completed
    );

    // A step output: the step fails fatally with the reason, the instance
    // fails and frees its business key; every read keeps working.
    let deep = rt
        .start("deep", "1", json!({"depth": 500}), StartOptions::default())
        .await
        .unwrap();
    rt.drain().await.unwrap();
    let failed = rt.get(deep.id).await.unwrap().unwrap();
    assert_eq!(failed.status, InstanceStatus::Failed);
    let failure = failed.failure.expect("a failure record");
    assert!(
        failure.error.message.contains("nested deeper than 64"),
        "{failure:?}"
    );
    assert_eq!(
        failure.reason,
        hephaestus_engine_core::instance::FailureReason::UnstorableValue
    );
    assert_eq!(rt.list(&InstanceFilter::default()).await.unwrap().len(), 2);
    rt.start("deep", "1", json!({"depth": 3}), StartOptions::default())
        .await
        .expect("the business key is free again");
}

async fn every_value_at_the_limits_reads_back_identically<B: Backend>(backend: B) {
    let rt = runtime(&backend, vec![approval()]);
    // The start input itself is the first level: its `echo` may nest
    // MAX_DEPTH - 1 more.
    let echo = limits::nested(MAX_DEPTH - 1);
    let input = json!({
        "echo": echo,
        "text": "ünïcödé \u{1F600} \\ \" \n",
        "numbers": [0, -1, u64::MAX, i64::MIN, 1.5, 1e16, -2.25e-300],
        "empty": {"a": [], "o": {}},
    });
    let mut metadata = Map::new();
    metadata.insert("trace".into(), limits::nested(MAX_DEPTH - 1));
    let s = rt
        .start(
            "approval",
            "1",
            input.clone(),
            StartOptions::default().with_telemetry_metadata(metadata.clone()),
        )
        .await
        .unwrap();
    rt.drain().await.unwrap();
    let payload = limits::nested(MAX_DEPTH);
    rt.resume(s.id, WAIT_FOR_EVENT_ID, "received", payload.clone())
        .await
        .unwrap();
    rt.drain().await.unwrap();
    let done = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(done.status, InstanceStatus::Completed);
    assert_eq!(
        done.context.initial, input,
        "the input reads back identically"
    );
    for (key, value) in &metadata {
        assert_eq!(
            done.telemetry_metadata.get(key),
            Some(value),
            "caller metadata reads back identically"
        );
    }
    assert_eq!(
        done.context.steps["begin"], echo,
        "a step output at the limit"
    );
    assert_eq!(
        done.context.steps["wait_for_event"], payload,
        "a resume payload at the limit"
    );
    let listed = rt.list(&InstanceFilter::default()).await.unwrap();
    assert_eq!(listed, vec![done]);
}

async fn a_scheduled_resume_needs_a_positive_delay<B: Backend>(backend: B) {
    let rt = runtime(&backend, vec![approval()]);
    let s = rt
        .start("approval", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    rt.drain().await.unwrap();
    let err = rt
        .schedule_resume(
            s.id,
            WAIT_FOR_EVENT_ID,
            "received",
            std::time::Duration::ZERO,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RunnerError::InvalidDelay { .. }), "{err:?}");
    let err = rt
        .schedule_resume(
            s.id,
            WAIT_FOR_EVENT_ID,
            "received",
            std::time::Duration::from_secs(u64::MAX),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, RunnerError::InvalidDelay { .. }), "{err:?}");
    assert!(
        rt.jobs_of(s.id).await.unwrap().is_empty(),
        "nothing enqueued"
    );
    assert_eq!(
        rt.get(s.id).await.unwrap().unwrap().status,
        InstanceStatus::Waiting
    );
}

async fn a_refused_row_keeps_its_reason_and_does_not_block_a_valid_resume<B: Backend>(backend: B) {
    let rt = runtime(&backend, vec![approval()]);
    let s = rt
        .start("approval", "1", json!({}), StartOptions::default())
        .await
        .unwrap();
    rt.drain().await.unwrap();
    let waiting = StepId::new(WAIT_FOR_EVENT_ID).unwrap();
    // A resume the step does not declare, written past the API (an older
    // deployment, a bug, a hand-written row), then applied by an advance.
    let mut tx = backend.begin().await.unwrap();
    backend
        .record(
            &mut tx,
            &NewStepResult {
                instance_id: s.id,
                step: Some(waiting.clone()),
                activation: 1,
                payload: ResultPayload::Resume {
                    event: Event::new("bogus").unwrap(),
                    payload: json!({}),
                },
            },
        )
        .await
        .unwrap();
    backend.commit(tx).await.unwrap();
    rt.advance(s.id, None).await.unwrap();
    let refused = backend.refused(s.id).await.unwrap();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].kind, ResultKind::Resume);
    assert_eq!(refused[0].step.as_ref(), Some(&waiting));
    assert!(
        refused[0].reason.contains("bogus"),
        "the reason is kept: {refused:?}"
    );
    assert_eq!(
        rt.get(s.id).await.unwrap().unwrap().status,
        InstanceStatus::Waiting
    );

    // The valid resume of the same activation is not `AlreadyResumed`.
    rt.resume(s.id, WAIT_FOR_EVENT_ID, "received", json!({"ok": 1}))
        .await
        .unwrap();
    rt.drain().await.unwrap();
    let done = rt.get(s.id).await.unwrap().unwrap();
    assert_eq!(done.status, InstanceStatus::Completed);
    assert_eq!(done.context.steps["wait_for_event"], json!({"ok": 1}));
    assert_eq!(backend.refused(s.id).await.unwrap().len(), 1);
}

async fn each_failure_path_records_its_typed_reason<B: Backend>(backend: B) {
    use hephaestus_engine_core::instance::FailureReason;
    use hephaestus_engine_core::workflow::{Pick, target};

    let fatal = FnStep::new("Fatal", ["done"], |_| StepOutcome::fatal("card declined"));
    let liar = FnStep::new("Liar", ["done"], |_| StepOutcome::complete("surprise"));
    let picker = FnStep::new("Picker", ["done"], |input| {
        StepOutcome::complete_with("done", input.context.initial.clone())
    });
    let next = FnStep::new("Next", ["done"], |_| StepOutcome::complete("done"));
    let single = |id: &str, step: FnStep| {
        Workflow::builder(id)
            .unique("run", Scope::Workflow)
            .start(step.clone())
            .on(step, "done", Done)
            .build()
            .unwrap()
    };
    let routed = Workflow::builder("routed")
        .unique("run", Scope::Workflow)
        .start(picker.clone())
        .route(picker, "done", [target(next.clone())], |ctx| {
            ctx.step("picker")
                .and_then(|o| o["pick"].as_str())
                .map(|p| vec![Pick::step(p)])
                .unwrap_or_default()
        })
        .on(next, "done", Done)
        .build()
        .unwrap();
    let rt = runtime(
        &backend,
        vec![single("fatal", fatal), single("liar", liar), routed],
    );
    let cases = [
        ("fatal", json!({}), FailureReason::StepFatal),
        (
            "liar",
            json!({}),
            FailureReason::UndeclaredEvent {
                event: "surprise".to_owned(),
            },
        ),
        ("routed", json!({}), FailureReason::NoTarget),
        (
            "routed",
            json!({"pick": "Ghost"}),
            FailureReason::UndeclaredTarget {
                target: "Ghost".to_owned(),
            },
        ),
    ];
    for (n, (workflow, input, reason)) in cases.into_iter().enumerate() {
        let s = rt
            .start(workflow, &n.to_string(), input, StartOptions::default())
            .await
            .unwrap();
        rt.drain().await.unwrap();
        let failed = rt.get(s.id).await.unwrap().unwrap();
        assert_eq!(failed.status, InstanceStatus::Failed, "{workflow}");
        assert_eq!(failed.failure.unwrap().reason, reason, "{workflow}");
    }
}
